//! `llmd route --epp-port` as a Gateway API Endpoint Picker, driven by a client that is not
//! ours: `tests/epp_client.py` plays Envoy with Envoy's own protos (envoy-data-plane over
//! grpclib), sends real ext_proc streams for completions and chat with bodies in several
//! chunks, forwards each request to the endpoint it was given, as Envoy would, to real
//! `llmd serve` workers on loopback (stories260K), and reports the response's served endpoint
//! back. Checked: a shared prefix lands on the worker holding it (the workers' own
//! `vllm:prefix_cache_hits_total`), the subset hint, 503 for an empty or foreign subset, the
//! ordered distinct fallback list equal in header and metadata, the served endpoint moving the
//! in-flight count, the band metrics read from the response bodies, gRPC health for its three
//! names, P/D's prefiller header, the model names, and malformed streams answered with a clear
//! ImmediateResponse while the router stays up.
mod common;

use common::{args, free_port, metric, python_imports, stories, LlmdProcess};
use serde_json::{json, Value};

/// A worker publishing KV events; its `--worker` argument.
async fn worker(tag: &str) -> (LlmdProcess, String) {
    let pub_port = free_port();
    let events = format!(r#"{{"enable_kv_cache_events": true, "endpoint": "tcp://*:{pub_port}"}}"#);
    let a = args(&[
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
        "--served-model-name",
        "stories",
    ]);
    let p = LlmdProcess::start(tag, &a, "/health").await;
    let spec = format!("{},events=tcp://127.0.0.1:{pub_port}", p.base);
    (p, spec)
}

/// `llmd route` with an EPP port; the process and `127.0.0.1:<epp port>`.
async fn router(extra: &[String]) -> (LlmdProcess, String) {
    let epp = free_port();
    let mut a = args(&[
        "route",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--model",
        &stories(),
        "--epp-port",
        &epp.to_string(),
    ]);
    a.extend(extra.iter().cloned());
    let r = LlmdProcess::start("route", &a, "/health").await;
    (r, format!("127.0.0.1:{epp}"))
}

/// Runs the Envoy stand-in over `scenarios`; one result per scenario.
fn envoy(epp: &str, scenarios: &Value) -> Vec<Value> {
    use std::io::Write;
    let script = format!("{}/tests/epp_client.py", env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new("python3")
        .args([&script, epp])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("running python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scenarios.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("the Envoy stand-in");
    assert!(out.status.success(), "the Envoy stand-in failed");
    serde_json::from_slice(&out.stdout).expect("the Envoy stand-in's JSON")
}

fn has_python() -> bool {
    python_imports(
        &["envoy_data_plane", "grpclib"],
        "python3 -m pip install envoy-data-plane grpclib",
    )
}

fn shared_prefix() -> String {
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. ".repeat(6)
}

/// The immediate response's status and parsed body; panics when the router routed instead.
fn immediate(r: &Value) -> (u64, Value) {
    let i = &r["immediate"];
    assert!(i.is_object(), "expected an immediate response: {r}");
    assert_eq!(i["content_type"], "application/json", "{r}");
    let body: Value = serde_json::from_str(i["body"].as_str().unwrap()).unwrap();
    (i["status"].as_u64().unwrap(), body)
}

/// The endpoints the router answered with, checked: header == metadata, distinct.
fn endpoints(r: &Value) -> Vec<String> {
    assert!(r["immediate"].is_null(), "refused: {r}");
    assert_eq!(
        r["header"], r["metadata"],
        "header and metadata differ: {r}"
    );
    let list: Vec<String> = r["header"]
        .as_str()
        .unwrap_or_else(|| panic!("no destination: {r}"))
        .split(',')
        .map(str::to_string)
        .collect();
    let mut d = list.clone();
    d.sort();
    d.dedup();
    assert_eq!(
        d.len(),
        list.len(),
        "the fallback list repeats an endpoint: {r}"
    );
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_envoy_client_is_routed_by_the_endpoint_picker() {
    if !has_python() {
        return;
    }
    let (w1, s1) = worker("w1").await;
    let (w2, s2) = worker("w2").await;
    let (w3, s3) = worker("w3").await;
    let workers = [&w1, &w2, &w3];
    let (r, epp) = router(&args(&[
        "--worker",
        &s1,
        "--worker",
        &s2,
        "--worker",
        &s3,
        "--max-body-bytes",
        "65536",
        "--served-model-name",
        "stories",
        "tiny-stories",
    ]))
    .await;
    let prefix = shared_prefix();
    let completion = |suffix: &str| {
        json!({"model": "stories", "prompt": format!("{prefix}{suffix}"), "max_tokens": 4,
               "temperature": 0, "kv_transfer_params": {"do_remote_prefill": true}})
    };

    // gRPC health, and the first request of the shared prefix.
    let res = envoy(
        &epp,
        &json!([
            {"health": ["liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor", "no-such-service"]},
            {"name": "first", "body": completion("One day"), "chunks": 4},
        ]),
    );
    let h = &res[0]["health"];
    for n in [
        "liveness",
        "readiness",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        assert_eq!(h[n], "SERVING", "{h}");
    }
    assert_eq!(h["no-such-service"], "error:NOT_FOUND", "{h}");
    let first = &res[1];
    let list = endpoints(first);
    assert_eq!(list.len(), 3, "every worker is a fallback: {first}");
    assert_eq!(first["status"], 200, "{first}");
    assert_eq!(first["clear_route_cache"], true);
    assert_eq!(first["echoed_intact"], true, "{first}");
    assert_eq!(first["closed"], true, "{first}");
    // The body given back is the client's less its kv_transfer_params, and says how long.
    let back: Value = serde_json::from_str(first["body_back"].as_str().unwrap()).unwrap();
    assert!(back.get("kv_transfer_params").is_none(), "{back}");
    assert_eq!(back["prompt"], completion("One day")["prompt"]);
    assert_eq!(
        first["content_length"],
        first["body_back"].as_str().unwrap().len().to_string()
    );
    assert_eq!(
        first["hop_removed"], true,
        "a client's trusted-hop header is dropped"
    );
    assert_eq!(first["prefiller_removed"], true);
    let holder = list[0].clone();
    // Wait for the worker's KV events to reach the router's index.
    r.metrics_until("the router never indexed the prefix", |m| {
        metric(m, "llmd_router:index_blocks", &format!("http://{holder}")) > 0.0
    })
    .await;
    let hits_before: Vec<f64> = {
        let mut v = Vec::new();
        for w in workers {
            v.push(metric(
                &w.metrics().await,
                "vllm:prefix_cache_hits_total",
                "",
            ));
        }
        v
    };

    // The same prefix, other suffixes, completions and chat: all to the holder.
    let others: Vec<&str> = workers
        .iter()
        .map(|w| w.host_port())
        .filter(|hp| *hp != holder)
        .collect();
    let unshared = |prompt: &str| json!({"model": "stories", "prompt": prompt, "max_tokens": 4, "temperature": 0});
    let chat = json!({"model": "stories", "messages": [{"role": "user", "content": format!("{prefix}Tell me more.")}],
                      "max_tokens": 4, "temperature": 0});
    let res = envoy(
        &epp,
        &json!([
            {"name": "then", "body": completion("Then"), "chunks": 3},
            {"name": "later", "body": completion("Later that day"), "chunks": 5},
            {"name": "soon", "body": completion("Soon"), "chunks": 4},
            {"name": "chat", "path": "/v1/chat/completions", "body": chat, "chunks": 4},
            // Subset hint: only those endpoints, the holder excluded. Their prompts lack the
            // shared prefix, so the holder stays its only holder for the requests after them.
            {"name": "subset", "body": unshared("Soon after the rain"), "subset": [others[0], others[1]]},
            {"name": "subset-one", "body": unshared("At last the sun came out"), "subset": [others[1]]},
            {"name": "subset-empty", "body": completion("x"), "subset": []},
            {"name": "subset-foreign", "body": completion("x"), "subset": ["10.9.9.9:8000"]},
            // Served by the second endpoint (as after Envoy's fallback), the in-flight count
            // read while the response is still streaming.
            {"name": "fallback", "body": completion("In the evening"), "served": "second",
             "metrics_url": r.url("/metrics")},
            // Streamed: the router reads its first token, gaps and usage in the response
            // body the gateway passes it.
            {"name": "stream", "body": {"model": "stories", "prompt": format!("{prefix}At night"),
             "max_tokens": 8, "temperature": 0, "stream": true,
             "stream_options": {"include_usage": true}}, "chunks": 2},
        ]),
    );
    assert_eq!(res[9]["status"], 200, "{}", res[9]);
    assert!(res[9]["response"]
        .as_str()
        .unwrap()
        .contains("data: [DONE]"));
    for (i, name) in ["then", "later", "soon"].iter().enumerate() {
        let list = endpoints(&res[i]);
        assert_eq!(list[0], holder, "{name} went elsewhere: {}", res[i]);
        assert_eq!(res[i]["status"], 200, "{}", res[i]);
    }
    let chat_r = &res[3];
    assert_eq!(endpoints(chat_r).len(), 3);
    assert_eq!(chat_r["status"], 200, "{chat_r}");
    assert!(chat_r["response"]
        .as_str()
        .unwrap()
        .contains("chat.completion"));
    let sub = endpoints(&res[4]);
    let mut want = vec![others[0].to_string(), others[1].to_string()];
    want.sort();
    let mut got = sub.clone();
    got.sort();
    assert_eq!(got, want, "only the subset: {}", res[4]);
    assert_eq!(res[4]["status"], 200);
    assert_eq!(endpoints(&res[5]), vec![others[1].to_string()]);
    for i in [6, 7] {
        let (status, body) = immediate(&res[i]);
        assert_eq!(status, 503, "{}", res[i]);
        assert_eq!(body["error"]["type"], "service_unavailable");
    }
    assert!(immediate(&res[6]).1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("names no endpoint"));
    assert!(immediate(&res[7]).1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("10.9.9.9:8000"));
    let fb = &res[8];
    let fb_list = endpoints(fb);
    assert_eq!(fb_list[0], holder);
    let served = fb["served"].as_str().unwrap();
    assert_eq!(served, fb_list[1]);
    assert_eq!(fb["status"], 200);
    // While the response streamed, the request counted on the endpoint that served it.
    let m = fb["metrics"].as_str().unwrap();
    let in_flight = |hp: &str| {
        metric(
            m,
            "llmd_router:in_flight_requests",
            &format!("worker=\"http://{hp}\""),
        )
    };
    assert_eq!(in_flight(served), 1.0, "{m}");
    assert_eq!(in_flight(&holder), 0.0, "{m}");
    // And once every stream ended, nothing is in flight.
    let m = r.metrics().await;
    assert_eq!(metric(&m, "llmd_router:in_flight_requests", ""), 0.0, "{m}");
    // The band's demand as an autoscaler reads it: 11 generation requests of the default
    // band (the two refused for their subset included), the output tokens of the 9 answered
    // (8 JSON answers' usage, the stream's), one first token and its gaps (the stream's).
    let band = |name: &str| metric(&m, name, "priority=\"0\"");
    assert_eq!(band("inference_objective_request_total"), 11.0, "{m}");
    assert_eq!(band("inference_objective_input_tokens_count"), 11.0, "{m}");
    assert!(
        band("inference_objective_input_tokens_sum") > 11.0 * 100.0,
        "{m}"
    );
    assert_eq!(band("inference_objective_output_tokens_count"), 9.0, "{m}");
    assert!(band("inference_objective_output_tokens_sum") >= 9.0, "{m}");
    assert_eq!(band("llmd_router:band_ttft_seconds_count"), 1.0, "{m}");
    assert!(band("llmd_router:band_itl_seconds_count") >= 1.0, "{m}");
    assert!(
        metric(
            &m,
            "llmd_router:requests_total",
            &format!("worker=\"http://{served}\"")
        ) >= 1.0,
        "{m}"
    );
    // The workers' own counters: the holder reused the prefix, the others barely.
    for (i, w) in workers.iter().enumerate() {
        let hits = metric(&w.metrics().await, "vllm:prefix_cache_hits_total", "") - hits_before[i];
        if w.host_port() == holder {
            assert!(hits >= 3.0 * 16.0 * 4.0, "the holder reused it: {hits}");
        }
    }

    // Malformed streams: a clear immediate response each, and the router keeps routing.
    let big = "word ".repeat(20_000);
    let res = envoy(
        &epp,
        &json!([
            {"name": "body-first", "body": completion("x"), "body_first": true},
            {"name": "garbage", "raw": "{\"prompt\": \"unterminated", "chunks": 3},
            {"name": "not-object", "raw": "[1, 2, 3]"},
            {"name": "too-big", "body": {"prompt": big}, "chunks": 8},
            {"name": "unknown-path", "path": "/v1/embeddings", "body": completion("x")},
            {"name": "unknown-model", "body": {"model": "gpt-4", "prompt": "Hi"}},
            {"name": "no-body-models", "method": "GET", "path": "/v1/models"},
            {"health": ["readiness"]},
            {"name": "after", "body": completion("And then"), "chunks": 2},
        ]),
    );
    let expect = [
        (0, 400, "before the request headers"),
        (1, 400, "not valid JSON"),
        (2, 400, "JSON object"),
        (3, 413, "65536"),
        (4, 404, "/v1/embeddings"),
        (5, 404, "gpt-4"),
    ];
    for (i, status, says) in expect {
        let (s, body) = immediate(&res[i]);
        assert_eq!(s, status, "{}", res[i]);
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{}: {msg}", res[i]["name"]);
    }
    // A request without a body is routed on its headers.
    let models = &res[6];
    assert_eq!(endpoints(models).len(), 3);
    assert_eq!(models["status"], 200, "{models}");
    assert_eq!(res[7]["health"]["readiness"], "SERVING");
    assert_eq!(endpoints(&res[8])[0], holder);
    assert_eq!(res[8]["status"], 200);

    // The proxy mode checks the same names (and the HTTP port is still there).
    let client = reqwest::Client::new();
    let post = |model: &str| {
        client
            .post(r.url("/v1/completions"))
            .json(&json!({"model": model, "prompt": "Hi", "max_tokens": 2}))
            .send()
    };
    let ok = post("stories").await.unwrap();
    assert_eq!(ok.status(), 200);
    // Another of the router's names passes the router (the worker answers for its own).
    let alias = post("tiny-stories").await.unwrap();
    assert!(alias.headers().contains_key("x-llmd-worker"), "forwarded");
    let nf = post("stories260K").await.unwrap();
    assert_eq!(nf.status(), 404, "not among --served-model-name");
    assert!(
        !nf.headers().contains_key("x-llmd-worker"),
        "refused by the router"
    );
    let v: Value = nf.json().await.unwrap();
    assert_eq!(v["error"]["type"], "not_found_error", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("stories260K"));

    // Without --served-model-name the model directory's name is served (the path too);
    // with P/D workers the prefiller is named in its header.
    let (_pd, pd_epp) = router(&args(&["--prefill-worker", &s1, "--decode-worker", &s2])).await;
    let long = json!({"model": "stories260K", "prompt": "The big red dog ran to the farm and met a cat. ".repeat(8), "max_tokens": 2});
    let res = envoy(
        &pd_epp,
        &json!([
            {"name": "pd", "body": long, "forward": false},
            {"name": "path-name", "body": {"model": stories(), "prompt": "Hi"}, "forward": false},
        ]),
    );
    assert_eq!(endpoints(&res[0]), vec![w2.host_port().to_string()]);
    assert_eq!(res[0]["prefiller"], w1.host_port(), "{}", res[0]);
    assert_eq!(endpoints(&res[1]), vec![w2.host_port().to_string()]);
}

/// Flow control in EPP mode: the router's one flow controller admits ext_proc requests too.
/// One worker, one request in flight at most (`--flow-max-concurrency 1`): a priority-10
/// request is routed with vLLM's (negated) `priority` in the body given back and held open;
/// a sheddable one whose client leaves while it waits leaves the queue at once; another waits
/// in the router and is shed after its TTL with a 429 ImmediateResponse naming the reason,
/// counted as such on `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flow_control_holds_sheds_and_forwards_the_priority_in_epp_mode() {
    if !has_python() {
        return;
    }
    let (_w, spec) = worker("w-flow").await;
    let dir = tempfile::tempdir().unwrap();
    let objectives = dir.path().join("objectives.yaml");
    std::fs::write(
        &objectives,
        "apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: premium}\n\
         spec: {poolRef: {name: stories}, priority: 10}\n---\n\
         apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: batch}\n\
         spec: {poolRef: {name: stories}, priority: -1}\n",
    )
    .unwrap();
    let (r, epp) = router(&args(&[
        "--worker",
        &spec,
        "--served-model-name",
        "stories",
        "--objectives",
        objectives.to_str().unwrap(),
        "--flow-max-concurrency",
        "1",
        "--flow-default-request-ttl",
        "3",
        "--scrape-interval",
        "0.2",
    ]))
    .await;
    // Flow control reads the worker's scraped metrics: wait for the first scrape.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let body = |prompt: &str| json!({"model": "stories", "prompt": prompt, "max_tokens": 4});
    let metrics_url = format!("{}/metrics", r.base);
    let got = envoy(
        &epp,
        &json!([
            {"name": "premium", "body": body("Once upon a time"), "chunks": 3,
             "headers": {"x-gateway-inference-objective": "premium"}, "hold": true},
            {"name": "leaves", "body": body("Tim saw"), "chunks": 2,
             "headers": {"x-gateway-inference-objective": "batch"}, "abandon_after": 1.0},
            {"metrics_url": metrics_url},
            {"name": "batch", "body": body("Lily went"), "chunks": 2,
             "headers": {"x-gateway-inference-objective": "batch",
                         "x-gateway-inference-fairness-id": "tenant-b"}},
            {"metrics_url": metrics_url},
        ]),
    );
    // Routed, with the priority the worker's scheduler reads (vLLM: lower first).
    let premium = &got[0];
    endpoints(premium);
    let back: Value = serde_json::from_str(premium["body_back"].as_str().unwrap()).unwrap();
    assert_eq!(back["priority"], -10, "{premium}");
    // A client that leaves while queued (the gateway cancels the stream) leaves the queue at
    // once: counted as cancelled, the queue empty, long before its TTL.
    assert_eq!(got[1]["abandoned"], true, "{}", got[1]);
    let m = got[2]["metrics"].as_str().unwrap();
    assert_eq!(
        metric(
            m,
            "llmd_router:flow_control_requests_total",
            "outcome=\"cancelled\""
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(m, "inference_extension_flow_control_queue_size", "priority"),
        0.0,
        "{m}"
    );
    // Queued behind it, then shed at its TTL.
    let (status, err) = immediate(&got[3]);
    assert_eq!(status, 429, "{}", got[3]);
    assert_eq!(err["error"]["code"], "evicted_ttl", "{err}");
    let m = got[4]["metrics"].as_str().unwrap();
    assert_eq!(
        metric(
            m,
            "llmd_router:flow_control_requests_total",
            "outcome=\"evicted_ttl\""
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            m,
            "llmd_router:flow_control_requests_total",
            "outcome=\"dispatched\""
        ),
        1.0,
        "{m}"
    );
}
