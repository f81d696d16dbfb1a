//! `llmd route` in front of real `llmd serve` processes on loopback (stories260K): requests
//! sharing a prefix land on the worker whose KV events said it has the prefix (checked by the
//! workers' own `vllm:prefix_cache_hits_total`), a killed worker is routed around without a
//! failed request, long prompts go through a decode worker's sidecar with a prefiller, and
//! Kubernetes discovery reads a pod list from an API server. Against fake workers that record
//! what reaches them: the client's `kv_transfer_params` and trusted-hop header never do, prompts
//! longer than `--max-model-len` are refused before routing, `--api-key`; against a fake API
//! server: the service account token is read again when it rotates, and a call that never
//! answers times out.
mod common;
mod fake_http;

use common::{args, free_port, metric, stories, LlmdProcess};
use serde_json::{json, Value};

/// A worker publishing KV events on a free port (with replay); its `--worker` argument.
async fn worker(tag: &str, extra: &[&str]) -> (LlmdProcess, String) {
    let (pub_port, replay_port) = (free_port(), free_port());
    let events = format!(
        r#"{{"enable_kv_cache_events": true, "endpoint": "tcp://*:{pub_port}", "replay_endpoint": "tcp://*:{replay_port}"}}"#
    );
    let mut a = args(&[
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--kv-cache-memory-gb",
        "0.02",
        "--kv-events-config",
        &events,
        "--model",
        &stories(),
    ]);
    a.extend(args(extra));
    let p = LlmdProcess::start(tag, &a, "/health").await;
    let spec = format!(
        "{},events=tcp://127.0.0.1:{pub_port},replay=tcp://127.0.0.1:{replay_port}",
        p.base
    );
    (p, spec)
}

async fn router(extra: &[String]) -> LlmdProcess {
    router_with(extra, "/health").await
}

/// `llmd route` with `extra` arguments, once `health_path` answers 200 (not waited for when
/// empty).
async fn router_with(extra: &[String], health_path: &str) -> LlmdProcess {
    let mut a = args(&[
        "route",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--model",
        &stories(),
        "--backoff",
        "30",
        "--worker-timeout",
        "20",
    ]);
    a.extend(extra.iter().cloned());
    LlmdProcess::start("route", &a, health_path).await
}

/// POSTs `body` to the router; status, JSON and the worker that answered.
async fn post(r: &LlmdProcess, path: &str, body: &Value) -> (u16, Value, String) {
    let resp = reqwest::Client::new()
        .post(r.url(path))
        .json(body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let worker = resp
        .headers()
        .get("x-llmd-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v, worker)
}

/// Waits until the router's index holds blocks for `worker`.
async fn indexed(r: &LlmdProcess, worker: &str) {
    let label = format!("worker=\"{worker}\"");
    r.metrics_until(&format!("the router never indexed {worker}"), |m| {
        metric(m, "llmd_router:index_blocks", &label) > 0.0
    })
    .await;
}

fn shared_prefix() -> String {
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. ".repeat(6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_sharing_a_prefix_land_on_the_worker_that_has_it() {
    let (w1, s1) = worker("w1", &[]).await;
    let (w2, s2) = worker("w2", &[]).await;
    let (w3, s3) = worker("w3", &[]).await;
    let workers = [&w1, &w2, &w3];
    let r = router(&args(&["--worker", &s1, "--worker", &s2, "--worker", &s3])).await;
    let prefix = shared_prefix();
    let body = |suffix: &str| json!({"prompt": format!("{prefix}{suffix}"), "max_tokens": 4, "temperature": 0});
    let (status, v, first) = post(&r, "/v1/completions", &body("One day")).await;
    assert_eq!(status, 200, "{v}");
    assert!(
        !first.is_empty(),
        "the router names the worker that answered"
    );
    indexed(&r, &first).await;
    let hits_before: Vec<f64> = {
        let mut h = Vec::new();
        for w in workers {
            h.push(metric(
                &w.metrics().await,
                "vllm:prefix_cache_hits_total",
                "",
            ));
        }
        h
    };
    // Different suffixes, the same long prefix: every one goes where the prefix is.
    for (i, suffix) in [
        "Then",
        "Later that day",
        "In the evening",
        "The next morning",
        "Soon",
    ]
    .iter()
    .enumerate()
    {
        let (status, v, w) = post(&r, "/v1/completions", &body(suffix)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            w, first,
            "request {i} went to {w}, the prefix is on {first}"
        );
    }
    // A chat request is rendered and keyed the way the worker renders it.
    let chat = json!({"messages": [{"role": "user", "content": format!("{prefix}Tell me more.")}],
        "max_tokens": 4, "temperature": 0});
    let (status, v, w) = post(&r, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{v}");
    let _ = w; // stories260K has no chat template: its rendering differs from the plain prompt
    for (i, w) in workers.iter().enumerate() {
        let hits = metric(&w.metrics().await, "vllm:prefix_cache_hits_total", "") - hits_before[i];
        if w.base == first {
            assert!(
                hits >= 5.0 * 16.0 * 4.0,
                "the prefix's worker reused it: {hits} hit tokens"
            );
        } else {
            assert!(hits <= 16.0 * 8.0, "worker {} reused {hits} tokens", w.base);
        }
    }
    let m = r.metrics().await;
    assert!(
        metric(
            &m,
            "llmd_router:decisions_total",
            "decided_by=\"prefix-cache-scorer\""
        ) >= 5.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "llmd_router:prefix_hit_tokens_predicted_total",
            &format!("worker=\"{first}\"")
        ) >= 5.0 * 64.0,
        "{m}"
    );
    // Streaming passes through untouched.
    let resp = reqwest::Client::new()
        .post(r.url("/v1/completions"))
        .json(
            &json!({"prompt": format!("{prefix}Then"), "max_tokens": 4, "temperature": 0,
            "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .is_some_and(|c| c.to_str().unwrap().starts_with("text/event-stream")));
    let text = resp.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // Unknown routes get an OpenAI-style 404; /v1/models comes from a worker.
    let resp = reqwest::get(r.url("/v1/nope")).await.unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
    let v: Value = reqwest::get(r.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_is_routed_around_and_no_request_fails() {
    let (w1, s1) = worker("w1", &[]).await;
    let (w2, s2) = worker("w2", &[]).await;
    let (w3, s3) = worker("w3", &[]).await;
    let mut workers = [w1, w2, w3];
    let r = router(&args(&["--worker", &s1, "--worker", &s2, "--worker", &s3])).await;
    let prefix = shared_prefix();
    let body = json!({"prompt": format!("{prefix}One day"), "max_tokens": 4, "temperature": 0});
    let (status, _, first) = post(&r, "/v1/completions", &body).await;
    assert_eq!(status, 200);
    indexed(&r, &first).await;
    // Kill the worker the router prefers for this prefix, then keep asking for it, several at
    // once.
    let i = workers.iter().position(|w| w.base == first).unwrap();
    workers[i].kill();
    let mut tasks = Vec::new();
    for k in 0..6 {
        let url = r.url("/v1/completions");
        let body =
            json!({"prompt": format!("{prefix}Then {k}"), "max_tokens": 4, "temperature": 0});
        tasks.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            let w = resp
                .headers()
                .get("x-llmd-worker")
                .map(|v| v.to_str().unwrap().to_string());
            (resp.status().as_u16(), w)
        }));
    }
    for t in tasks {
        let (status, w) = t.await.unwrap();
        assert_eq!(status, 200, "a request failed after a worker died");
        assert_ne!(w.as_deref(), Some(first.as_str()));
    }
    let m = r.metrics().await;
    assert!(metric(&m, "llmd_router:retries_total", "") >= 1.0, "{m}");
    assert_eq!(
        metric(&m, "llmd_router:failed_requests_total", ""),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "llmd_router:worker_up", &format!("worker=\"{first}\"")),
        0.0,
        "{m}"
    );
    // Three failed scrapes and the dead worker's blocks leave the index.
    let label = format!("worker=\"{first}\"");
    r.metrics_until("the dead worker is still indexed", |m| {
        metric(m, "llmd_router:index_blocks", &label) == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_prompts_go_through_the_sidecar_with_a_prefiller_short_ones_do_not() {
    let producer = r#"{"kv_connector": "NixlConnector", "kv_role": "kv_producer"}"#;
    let consumer = r#"{"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}"#;
    let side = free_port().to_string();
    // The workers believe the sidecar's kv_transfer_params: it proves the cluster secret.
    let secret = common::secret_file().display().to_string();
    let (prefill, p_spec) = worker(
        "prefill",
        &[
            "--kv-transfer-config",
            producer,
            "--kv-transfer-port",
            &side,
            "--kv-transfer-secret-file",
            &secret,
        ],
    )
    .await;
    let (decode, _) = worker(
        "decode",
        &[
            "--kv-transfer-config",
            consumer,
            "--kv-transfer-secret-file",
            &secret,
        ],
    )
    .await;
    let decoder_port = decode.base.rsplit(':').next().unwrap().to_string();
    let sidecar = LlmdProcess::start(
        "sidecar",
        &args(&[
            "sidecar",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--decoder-port",
            &decoder_port,
            "--prefiller-allowlist",
            "127.0.0.1:*",
            "--kv-transfer-secret-file",
            &secret,
        ]),
        "/health",
    )
    .await;
    let r = router(&args(&[
        "--prefill-worker",
        &p_spec,
        "--decode-worker",
        &sidecar.base,
    ]))
    .await;
    let single = worker("single", &[]).await.0;
    let long = json!({"prompt": shared_prefix(), "max_tokens": 12, "temperature": 0});
    let (status, v, w) = post(&r, "/v1/completions", &long).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        w, sidecar.base,
        "a decode request goes to the decode worker's sidecar"
    );
    let want = reqwest::Client::new()
        .post(single.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["text"], want["choices"][0]["text"]);
    let dm = decode.metrics().await;
    assert_eq!(
        metric(&dm, "llmd:prompt_tokens_computed_total", ""),
        0.0,
        "the decoder got the prompt's KV from the prefiller:\n{dm}"
    );
    assert!(
        metric(&dm, "llmd:kv_transfer_pulls_total", "") >= 1.0,
        "{dm}"
    );
    let pm = prefill.metrics().await;
    assert!(
        metric(&pm, "llmd:kv_transfer_pulls_served_total", "") >= 1.0,
        "{pm}"
    );
    // A prompt shorter than the threshold (16 uncached tokens) is decoded alone.
    let short = json!({"prompt": "Once upon", "max_tokens": 4, "temperature": 0});
    let (status, v, _) = post(&r, "/v1/completions", &short).await;
    assert_eq!(status, 200, "{v}");
    let m = r.metrics().await;
    assert_eq!(
        metric(
            &m,
            "llmd_router:pd_decisions_total",
            "mode=\"disaggregated\""
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "llmd_router:pd_decisions_total", "mode=\"aggregated\""),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &prefill.metrics().await,
            "llmd:kv_transfer_pulls_served_total",
            ""
        ),
        1.0,
        "the short prompt never reached the prefiller"
    );
}

/// A Kubernetes API server answering the pod list with the recorded response.
async fn fake_kubernetes() -> (u16, tokio::task::JoinHandle<()>) {
    let list = std::fs::read_to_string(format!(
        "{}/tests/fixtures/k8s_pod_list.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let app = axum::Router::new().route(
        "/api/v1/namespaces/llm/pods",
        axum::routing::get(
            move |q: axum::extract::Query<std::collections::HashMap<String, String>>| {
                let list = list.clone();
                async move {
                    let sel = q.get("labelSelector").cloned().unwrap_or_default();
                    assert!(sel.starts_with("llm-d.ai/role in ("), "{sel}");
                    ([("content-type", "application/json")], list)
                }
            },
        ),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_discovery_lists_the_ready_pods_by_role() {
    let (port, _api) = fake_kubernetes().await;
    let r = router_with(
        &args(&[
            "--k8s-namespace",
            "llm",
            "--k8s-api",
            &format!("http://127.0.0.1:{port}"),
            "--k8s-events-port",
            "5557",
        ]),
        "",
    )
    .await;
    // The pods' addresses are not reachable from here: the router lists them and finds them
    // down.
    let m = r
        .metrics_until("no pods discovered", |m| m.contains("10.244.0.14"))
        .await;
    for (ip, role) in [
        ("10.244.0.11", "prefill"),
        ("10.244.0.12", "decode"),
        ("10.244.0.14", "prefill-decode"),
    ] {
        assert!(
            m.contains(&format!(
                "llmd_router:in_flight_requests{{worker=\"http://{ip}:8000\",role=\"{role}\"}}"
            )),
            "{ip} as {role}:\n{m}"
        );
    }
    for ip in ["10.244.0.13", "10.244.0.15", "10.244.0.16"] {
        assert!(
            !m.contains(ip),
            "{ip} is not ready, terminating or has no role:\n{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_started_after_the_workers_learns_their_caches_from_the_replay() {
    let (w1, s1) = worker("w1", &[]).await;
    let (w2, s2) = worker("w2", &[]).await;
    let prefix = shared_prefix();
    // w2 computes the prefix before any router exists.
    let r = reqwest::Client::new()
        .post(w2.url("/v1/completions"))
        .json(&json!({"prompt": format!("{prefix}One day"), "max_tokens": 2, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = router(&args(&["--worker", &s1, "--worker", &s2])).await;
    indexed(&r, &w2.base).await;
    for suffix in ["Then", "Later", "Soon"] {
        let body =
            json!({"prompt": format!("{prefix}{suffix}"), "max_tokens": 2, "temperature": 0});
        let (status, v, w) = post(&r, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            w, w2.base,
            "routed to the worker the replay said has the prefix"
        );
    }
    assert_eq!(
        metric(&w1.metrics().await, "vllm:prefix_cache_hits_total", ""),
        0.0
    );
}

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

/// POSTs raw `body` to `path` with `headers`: status and body as JSON.
async fn post_raw(
    r: &LlmdProcess,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(r.url(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_transfer_params_and_hop_headers_never_reach_a_worker_nor_do_long_prompts() {
    use llmd::kv::auth::{ClusterSecret, TRUSTED_HOP_HEADER};
    let w = fake_http::Fake::start(fake_http::worker).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let secret = ClusterSecret::new(SECRET).unwrap();
    let r = router(&args(&[
        "--worker",
        &w.url(),
        "--kv-transfer-secret-file",
        secret_file.to_str().unwrap(),
        "--max-model-len",
        "64",
    ]))
    .await;
    let params = json!({"do_remote_prefill": true, "remote_engine_id": "victim",
        "remote_block_ids": [1, 2, 3], "remote_host": "127.0.0.1", "remote_port": 5600});
    let forged = [(TRUSTED_HOP_HEADER, "00ff")];
    let completion = json!({"prompt": "Once upon a time", "max_tokens": 4,
        "kv_transfer_params": params});
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "kv_transfer_params": params});
    for (path, body) in [
        ("/v1/completions", &completion),
        ("/v1/chat/completions", &chat),
    ] {
        let (status, v) = post_raw(&r, path, &body.to_string(), &forged).await;
        assert_eq!(status, 200, "{path}: {v}");
    }
    let got = w.requests();
    assert_eq!(got.len(), 2);
    for g in &got {
        let v = g.json();
        assert!(v.get("kv_transfer_params").is_none(), "{}: {v}", g.path);
        assert_eq!(v["max_tokens"], 4, "the rest of the request is intact");
        let hop: Vec<_> = g.headers.get_all(TRUSTED_HOP_HEADER).iter().collect();
        assert_eq!(hop.len(), 1, "{:?}", g.headers);
        assert!(secret.is_trusted_hop(hop[0].to_str().unwrap()));
    }
    // Longer than --max-model-len, as token ids or as text: 400 before any routing.
    let ids: Vec<u32> = (1..=65).collect();
    let text = "Once upon a time there was a little girl. ".repeat(20);
    for body in [
        json!({"prompt": ids, "max_tokens": 1}),
        json!({"prompt": text, "max_tokens": 1}),
        json!({"prompt": ["Once", text], "max_tokens": 1}),
    ] {
        let (status, v) = post_raw(&r, "/v1/completions", &body.to_string(), &[]).await;
        assert_eq!(status, 400, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("maximum context length is 64"), "{v}");
    }
    // JSON that is not an object is the client's error too.
    for body in ["[1,2]", "\"x\"", "3", "{\"prompt\": "] {
        let (status, v) = post_raw(&r, "/v1/completions", body, &[]).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    assert_eq!(w.requests().len(), 2, "none of them reached the worker");
    let ok: Vec<u32> = (1..=64).collect();
    let (status, v) = post_raw(
        &r,
        "/v1/completions",
        &json!({"prompt": ok}).to_string(),
        &[],
    )
    .await;
    assert_eq!(status, 200, "at the limit: {v}");
    // Without the secret the router proves nothing and passes on no client's proof, even a
    // valid one.
    let w2 = fake_http::Fake::start(fake_http::worker).await;
    let plain = router(&args(&["--worker", &w2.url()])).await;
    let token = secret.hop_token();
    let (status, v) = post_raw(
        &plain,
        "/v1/completions",
        &completion.to_string(),
        &[(TRUSTED_HOP_HEADER, &token)],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let got = w2.requests();
    assert_eq!(got.len(), 1);
    assert!(got[0].headers.get(TRUSTED_HOP_HEADER).is_none());
    assert!(got[0].json().get("kv_transfer_params").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_api_key_guards_v1_and_leaves_health_and_metrics_open() {
    let w = fake_http::Fake::start(fake_http::worker).await;
    let r = router(&args(&["--worker", &w.url(), "--api-key", "s3cret"])).await;
    let body = r#"{"prompt": "Once", "max_tokens": 1}"#;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cre"),
        Some("s3cret"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let (status, v) = post_raw(&r, "/v1/completions", body, &headers).await;
        assert_eq!(status, 401, "{auth:?}: {v}");
        assert_eq!(v["error"]["type"], "authentication_error", "{v}");
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    }
    assert_eq!(
        reqwest::get(r.url("/v1/models")).await.unwrap().status(),
        401
    );
    assert!(w.requests().is_empty(), "{:?}", w.requests());
    let (status, v) = post_raw(
        &r,
        "/v1/completions",
        body,
        &[("authorization", "Bearer s3cret")],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(w.requests().len(), 1);
    for open in ["/health", "/metrics"] {
        assert_eq!(
            reqwest::get(r.url(open)).await.unwrap().status(),
            200,
            "{open}"
        );
    }
}

/// Waits until `api` got a request with `Authorization: Bearer <token>`; panics after 20 s.
async fn bearer_seen(api: &fake_http::Fake, token: &str) {
    let want = format!("Bearer {token}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let all = api.all();
        if all.iter().any(|s| {
            s.headers
                .get("authorization")
                .is_some_and(|v| v == want.as_str())
        }) {
            return;
        }
        let sent: Vec<_> = all.iter().map(|s| s.headers.get("authorization")).collect();
        assert!(
            std::time::Instant::now() < deadline,
            "the API never got {want:?}; it got {sent:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_token_is_read_again_when_it_rotates() {
    let list = std::fs::read_to_string(format!(
        "{}/tests/fixtures/k8s_pod_list.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let api = fake_http::Fake::start(move |_| {
        let mut r = axum::response::Response::new(axum::body::Body::from(list.clone()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "token-one\n").unwrap();
    let r = router_with(
        &args(&[
            "--k8s-namespace",
            "llm",
            "--k8s-api",
            &api.url(),
            "--k8s-token-file",
            token.to_str().unwrap(),
            "--k8s-refresh-interval",
            "0.1",
        ]),
        "",
    )
    .await;
    bearer_seen(&api, "token-one").await;
    // Kubelet rotates a projected token by swapping the file.
    let next = dir.path().join("token.new");
    std::fs::write(&next, "token-two\n").unwrap();
    std::fs::rename(&next, &token).unwrap();
    bearer_seen(&api, "token-two").await;
    drop(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_api_that_never_answers_is_an_error_not_a_hang() {
    use llmd::router::workers::{KubernetesSource, WorkerSource};
    // Accepts connections (the kernel's backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let timeout = std::time::Duration::from_millis(300);
    let k = KubernetesSource {
        api: format!("http://{}", silent.local_addr().unwrap()),
        namespace: "llm".into(),
        selector: None,
        token_file: None,
        timeout,
        http_port: 8000,
        events_port: None,
        replay_port: None,
        client: KubernetesSource::client(None, timeout).unwrap(),
    };
    let got = tokio::time::timeout(std::time::Duration::from_secs(60), k.list())
        .await
        .expect("the list hung");
    let e = got.unwrap_err();
    assert!(e.starts_with("Kubernetes API:"), "{e}");
}
