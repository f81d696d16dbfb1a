//! `llmd serve` end to end: the built binary on a loopback port with the real stories260K
//! model, driven over real sockets. Each test starts its own server (port 0, address read from
//! the log), so tests run in parallel without sharing engine state.
mod common;

use common::free_port;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/stories260K")
}

/// A running `llmd serve`, killed on drop.
struct Server {
    p: common::LlmdProcess,
}

impl Server {
    /// Starts the server on stories260K and waits until `/health` is 200.
    async fn start(extra: &[&str]) -> Server {
        Self::start_with(&model_dir(), extra).await
    }

    /// Starts the server on `model` and waits until `/health` is 200 (503 until then).
    async fn start_with(model: &Path, extra: &[&str]) -> Server {
        let mut args: Vec<String> = ["serve", "--model"].map(String::from).to_vec();
        args.push(model.display().to_string());
        args.extend(
            [
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--kv-cache-memory-gb",
                "0.02",
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|a| a.to_string()));
        if extra.contains(&"--kv-transfer-config") && !extra.contains(&"--kv-transfer-secret-file")
        {
            // The P/D workers of these tests share a cluster secret, and the tests send the
            // trusted-hop header a sidecar would ([`Server::send`]).
            args.push("--kv-transfer-secret-file".into());
            args.push(common::secret_file().display().to_string());
        }
        let server = Server {
            p: common::LlmdProcess::start("llmd", &args, "").await,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = reqwest::get(server.url("/health")).await {
                if r.status() == 200 {
                    break;
                }
                assert_eq!(r.status(), 503, "health while loading");
            }
            assert!(Instant::now() < deadline, "server not ready in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn url(&self, path: &str) -> String {
        self.p.url(path)
    }

    /// Sends `body` and returns the response unread (streams, status checks).
    /// Posts `body` as llmd's sidecar or router would: with the trusted-hop header of the
    /// tests' cluster secret (which workers without one ignore).
    async fn send(&self, path: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .header(llmd::kv::auth::TRUSTED_HOP_HEADER, common::hop_token())
            .json(body)
            .send()
            .await
            .expect("request")
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.send(path, body).await;
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, v)
    }

    /// One metric sample, e.g. `metric(&text, "llmd:kv_free_blocks")`.
    async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    fn pid(&self) -> u32 {
        self.p.child.id()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.p.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// The value of the first sample of `name` whose labels contain `label` ("" for any).
fn sample(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} {label} in:\n{text}"))
}

/// `data:` payloads of an SSE body.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_type: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(e["type"], want_type, "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let s = Server::start(&["--api-key", "sekrit", "--max-model-len", "128"]).await;
    let client = reqwest::Client::new();
    let send = |path: &str, body: &str, key: Option<&str>| {
        let mut r = client
            .post(s.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move {
            let r = r.send().await.expect("request");
            let status = r.status().as_u16();
            let text = r.text().await.expect("body");
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
            (status, v)
        }
    };
    let ok = r#"{"prompt":"Once upon a time","max_tokens":4}"#;

    // Authentication.
    let (st, b) = send("/v1/completions", ok, None).await;
    assert_error(st, &b, 401, "authentication_error");
    assert_eq!(b["error"]["code"], "invalid_api_key");
    let (st, b) = send("/v1/completions", ok, Some("wrong")).await;
    assert_error(st, &b, 401, "authentication_error");
    let r = client.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let (st, b) = send("/v1/completions", ok, Some("sekrit")).await;
    assert_eq!(st, 200, "{b}");
    // Health and metrics stay open to probes and scrapers.
    assert_eq!(reqwest::get(s.url("/health")).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(s.url("/metrics")).await.unwrap().status(), 200);

    let key = Some("sekrit");
    let cases: &[(&str, &str, Option<&str>)] = &[
        // Malformed JSON, missing fields, wrong types.
        ("/v1/completions", r#"{"prompt": "x", "#, None),
        ("/v1/completions", "", None),
        ("/v1/completions", r#"{"max_tokens": 3}"#, None),
        (
            "/v1/completions",
            r#"{"prompt":"x","temperature":"hot"}"#,
            None,
        ),
        ("/v1/completions", r#"{"prompt":"x","max_tokens":-1}"#, None),
        ("/v1/chat/completions", r#"{"model":"x"}"#, None),
        ("/v1/chat/completions", r#"{"messages":"hi"}"#, None),
        // Unknown model.
        (
            "/v1/completions",
            r#"{"model":"gpt-4","prompt":"x"}"#,
            Some("model"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"x"}]}"#,
            Some("model"),
        ),
        // Invalid parameters.
        (
            "/v1/completions",
            r#"{"prompt":"x","top_p":2}"#,
            Some("top_p"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","temperature":-1}"#,
            Some("temperature"),
        ),
        ("/v1/completions", r#"{"prompt":"x","n":0}"#, Some("n")),
        (
            "/v1/completions",
            r#"{"prompt":"x","max_tokens":0}"#,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","logprobs":50}"#,
            Some("logprobs"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","top_k":-5}"#,
            Some("top_k"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","min_p":3}"#,
            Some("min_p"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","presence_penalty":9}"#,
            Some("presence_penalty"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","stop":[""]}"#,
            Some("stop"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","min_tokens":9,"max_tokens":2}"#,
            Some("min_tokens"),
        ),
        ("/v1/completions", r#"{"prompt":[]}"#, Some("prompt")),
        (
            "/v1/completions",
            r#"{"prompt":[1,2,99999]}"#,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","echo":true}"#,
            Some("echo"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[]}"#,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":3}"#,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
            Some("top_logprobs"),
        ),
        // Longer than the context (128): as text, as token ids, and through max_tokens.
        (
            "/v1/completions",
            r#"{"prompt":"x","max_tokens":200}"#,
            Some("prompt"),
        ),
    ];
    for (path, body, param) in cases {
        let (st, b) = send(path, body, key).await;
        assert_error(st, &b, 400, "invalid_request_error");
        if let Some(p) = param {
            assert_eq!(b["error"]["param"], *p, "{body} -> {b}");
        }
    }
    let long_ids: Vec<u32> = (0..200).map(|i| 3 + i % 400).collect();
    let (st, b) = send(
        "/v1/completions",
        &json!({"prompt": long_ids, "max_tokens": 1}).to_string(),
        key,
    )
    .await;
    assert_error(st, &b, 400, "invalid_request_error");
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let long_text = "Once upon a time there was a little girl. ".repeat(40);
    let (st, b) = send(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": long_text}], "stream": true}).to_string(),
        key,
    )
    .await;
    assert_error(st, &b, 400, "invalid_request_error");
    assert_eq!(b["error"]["param"], "messages");

    // Unknown routes are JSON 404s too.
    let r = client.get(s.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["type"], "not_found_error");
    // A known route with the wrong method: a JSON 405.
    let r = client
        .get(s.url("/v1/completions"))
        .bearer_auth("sekrit")
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let b: Value = r.json().await.unwrap();
    assert_error(st, &b, 405, "invalid_request_error");

    // The server is still healthy and serving after all of that.
    let (st, b) = send("/v1/completions", ok, key).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["usage"]["completion_tokens"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429() {
    // With no room in the waiting queue every request is refused: the engine's QueueFull
    // reaches the client as 429, before any stream starts.
    let s = Server::start(&["--max-waiting-requests", "0"]).await;
    for stream in [false, true] {
        let (st, b) = s
            .post(
                "/v1/completions",
                &json!({"prompt": "Once upon a time", "max_tokens": 4, "stream": stream}),
            )
            .await;
        assert_error(st, &b, 429, "rate_limit_exceeded");
        assert_eq!(b["error"]["code"], "queue_full");
    }
    let m = s.metrics().await;
    assert_eq!(sample(&m, "vllm:num_requests_waiting", ""), 0.0);
    assert_eq!(
        sample(&m, "llmd:kv_free_blocks", ""),
        sample(&m, "llmd:kv_total_blocks", "")
    );
}

/// Polls the metrics until `f` holds on them.
async fn wait_metrics(s: &Server, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = s.metrics().await;
        if f(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "never {what}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_with_room_admits_then_refuses() {
    // One running slot and one waiting slot: the second request waits (and later runs), the
    // third is refused with 429.
    let s = Server::start(&["--max-num-seqs", "1", "--max-waiting-requests", "1"]).await;
    let client = reqwest::Client::new();
    let mut running = s
        .send(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": true,
                      "stream": true}),
        )
        .await;
    assert_eq!(running.status(), 200);
    running.chunk().await.unwrap().expect("a first chunk");
    let waiting = {
        let (client, url) = (client.clone(), s.url("/v1/completions"));
        tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&json!({"prompt": "Lily", "max_tokens": 5, "ignore_eos": true}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    wait_metrics(&s, "one request waiting", |m| {
        sample(m, "vllm:num_requests_waiting", "") == 1.0
    })
    .await;
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "Tom", "max_tokens": 5}),
        )
        .await;
    assert_error(st, &b, 429, "rate_limit_exceeded");
    // The running stream goes away; the waiting request runs and completes.
    drop(running);
    let (st, b) = waiting.await.unwrap();
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["usage"]["completion_tokens"], 5);
    wait_metrics(&s, "an idle pool", |m| {
        sample(m, "llmd:kv_free_blocks", "") == sample(m, "llmd:kv_total_blocks", "")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_per_request_are_capped_and_bodies_limited() {
    let s = Server::start(&["--max-choices-per-request", "4"]).await;
    // 3 prompts × n=2 = 6 engine requests > 4: refused before anything is tokenized or queued.
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"prompt": [[1, 2], [1, 3], [1, 4]], "n": 2, "max_tokens": 2}),
        )
        .await;
    assert_error(st, &b, 400, "invalid_request_error");
    assert_eq!(b["error"]["code"], "too_many_choices");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 4"),
        "{b}"
    );
    let (st, b) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "n": 5, "max_tokens": 2}),
        )
        .await;
    assert_error(st, &b, 400, "invalid_request_error");
    assert_eq!(b["error"]["param"], "n");
    // 2 × 2 fits.
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"prompt": [[1, 2], [1, 3]], "n": 2, "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["choices"].as_array().unwrap().len(), 4);
    // The 32 MB body of one-token prompts the limit exists for: a 413 (over the body limit) on
    // every route that reads a body, with or without a length header.
    let huge = format!("{{\"prompt\": [{}[1]]}}", "[1],".repeat(9 << 20));
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let (st, text) = send_oversized(&s, path, &huge, true).await;
        let b: Value = serde_json::from_str(&text).unwrap();
        assert_error(st, &b, 413, "invalid_request_error");
        let (st, _) = send_oversized(&s, path, &huge, false).await;
        assert_eq!(st, 413, "{path} without content-length");
    }
    // Just under the cap of choices but a million prompts is still far over the body limit;
    // the server is alive and idle after all of it.
    let m = s.metrics().await;
    assert_eq!(
        sample(&m, "llmd:kv_free_blocks", ""),
        sample(&m, "llmd:kv_total_blocks", "")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_aborts_and_frees_blocks() {
    // Step 2 and step 4 stall for 1.5 s: the first request (alone, non-streaming) is past its
    // 0.3 s deadline during step 2; the second (streaming) has its first token from step 3
    // and is past its deadline during step 4. No race with the machine's speed.
    let s = Server::start(&[
        "--request-timeout",
        "0.3",
        "--fault-injection",
        "stall@2:1500,stall@4:1500",
    ])
    .await;
    let long = |stream: bool| {
        json!({"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": true,
               "stream": stream})
    };
    let started = Instant::now();
    let (st, b) = s.post("/v1/completions", &long(false)).await;
    assert_error(st, &b, 408, "timeout_error");
    assert_eq!(b["error"]["code"], "request_timeout");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Streaming, once the engine is past the first stall and idle: the stream ends with an
    // error event naming the timeout, then [DONE].
    wait_metrics(&s, "the first request aborted", |m| {
        sample(m, "vllm:num_requests_running", "") == 0.0
    })
    .await;
    let r = s.send("/v1/completions", &long(true)).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "request_timeout", "{body}");
    assert!(!body.contains("\"finish_reason\":\"length\""), "{body}");
    // Both requests were aborted in the engine: the pool is whole again.
    let m = wait_metrics(&s, "an idle pool", |m| {
        sample(m, "vllm:num_requests_running", "") == 0.0
            && sample(m, "llmd:kv_free_blocks", "") == sample(m, "llmd:kv_total_blocks", "")
    })
    .await;
    assert!(
        sample(&m, "vllm:generation_tokens_total", "") < 960.0,
        "{m}"
    );
    // A short request is not affected.
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "Lily", "max_tokens": 3}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_step_is_an_error_and_the_worker_carries_on() {
    // The engine's 3rd step fails: its request gets a 500 (never a truncated 200), its blocks
    // are freed, the failure is counted, and the worker stays healthy and serves the next one.
    let s = Server::start(&["--fault-injection", "error@3"]).await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 20, "ignore_eos": true});
    let (st, b) = s.post("/v1/completions", &body).await;
    assert_error(st, &b, 500, "server_error");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("injected fault"),
        "{b}"
    );
    let m = s.metrics().await;
    assert_eq!(sample(&m, "llmd:engine_failed_steps_total", ""), 1.0);
    assert_eq!(
        sample(&m, "llmd:kv_free_blocks", ""),
        sample(&m, "llmd:kv_total_blocks", "")
    );
    assert_eq!(reqwest::get(s.url("/health")).await.unwrap().status(), 200);
    let (st, b) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["usage"]["completion_tokens"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_engine_fails_requests_and_exits_nonzero() {
    // The engine's first step stalls for 2 s, so all three requests are in by the time it
    // runs; its 10th step panics, with streaming and non-streaming requests in flight: each
    // gets an OpenAI error (a final SSE error event; a 500), never a clean end; /health turns
    // 503; the process exits non-zero so Kubernetes restarts it.
    let mut s = Server::start(&["--fault-injection", "stall@1:2000,panic@10"]).await;
    let client = reqwest::Client::new();
    let body = |stream: bool| {
        json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true,
               "stream": stream})
    };
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let (client, url, b) = (client.clone(), s.url("/v1/completions"), body(true));
            tokio::spawn(async move {
                let r = client.post(url).json(&b).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
        .collect();
    let joined = {
        let (client, url, b) = (client.clone(), s.url("/v1/completions"), body(false));
        tokio::spawn(async move {
            let r = client.post(url).json(&b).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    for t in streams {
        let (st, text) = t.await.unwrap();
        assert_eq!(st, 200, "{text}");
        let events = sse_events(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(err["error"]["code"], "engine_dead", "{text}");
        assert_eq!(err["error"]["type"], "server_error", "{text}");
        assert!(!text.contains("\"finish_reason\":\"length\""), "{text}");
    }
    let (st, b) = joined.await.unwrap();
    assert_error(st, &b, 500, "server_error");
    assert_eq!(b["error"]["code"], "engine_dead");
    let health = reqwest::get(s.url("/health")).await.unwrap();
    assert_eq!(health.status(), 503);
    let (st, b) = s.post("/v1/completions", &body(false)).await;
    assert_error(st, &b, 500, "server_error");
    let status = tokio::task::block_in_place(|| s.wait_exit(Duration::from_secs(20)))
        .expect("a worker with a dead engine must exit");
    assert!(!status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_http_equals_engine() {
    let s = Server::start(&["--served-model-name", "stories"]).await;
    let prompts = [
        "Once upon a time",
        "The little dog",
        "Lily and Ben went to the park",
    ];
    let mut cfg = llmd::EngineConfig::new(model_dir());
    cfg.cache.num_blocks = Some(512);
    let engine = llmd::Engine::new(cfg).expect("engine");
    let params = llmd::SamplingParams {
        max_tokens: Some(40),
        ..llmd::SamplingParams::greedy()
    };
    // `generate` blocks; inside the test's runtime it must say so.
    let direct = tokio::task::block_in_place(|| {
        engine.generate(prompts.iter().map(|&p| p.into()).collect(), &params)
    })
    .expect("generate");
    for (p, d) in prompts.iter().zip(&direct) {
        let body = json!({"model": "stories", "prompt": p, "max_tokens": 40, "temperature": 0});
        let (st, b) = s.post("/v1/completions", &body).await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["object"], "text_completion");
        assert_eq!(b["model"], "stories");
        assert_eq!(b["choices"][0]["text"], d.text.as_str(), "prompt {p:?}");
        assert_eq!(b["choices"][0]["finish_reason"], d.finish_reason.as_str());
        assert_eq!(b["usage"]["completion_tokens"], d.token_ids.len());
        assert_eq!(b["usage"]["prompt_tokens"], d.num_prompt_tokens);
        assert_eq!(
            b["usage"]["total_tokens"],
            d.num_prompt_tokens + d.token_ids.len()
        );

        // The same prompt as token ids, and streamed: the same text.
        let ids = engine.tokenizer().encode(p, true).unwrap();
        let (_, b) = s
            .post(
                "/v1/completions",
                &json!({"prompt": ids, "max_tokens": 40, "temperature": 0}),
            )
            .await;
        assert_eq!(b["choices"][0]["text"], d.text.as_str());
        let r = s
            .send(
                "/v1/completions",
                &json!({"prompt": p, "max_tokens": 40, "temperature": 0, "stream": true,
                          "stream_options": {"include_usage": true}}),
            )
            .await;
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let events = sse_events(&r.text().await.unwrap());
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["text"].as_str()))
            .collect();
        assert_eq!(text, d.text);
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["completion_tokens"], d.token_ids.len());
        assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    }

    // A list of prompts gives one choice per prompt, in order.
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"prompt": prompts, "max_tokens": 40, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    for (i, d) in direct.iter().enumerate() {
        assert_eq!(b["choices"][i]["index"], i);
        assert_eq!(b["choices"][i]["text"], d.text.as_str());
    }

    // /v1/models and the metrics reflect the traffic.
    let r: Value = reqwest::get(s.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["data"][0]["id"], "stories");
    assert_eq!(r["data"][0]["max_model_len"], 512);
    let m = s.metrics().await;
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "llmd:kv_free_blocks",
        "llmd:kv_total_blocks",
    ] {
        sample(&m, name, "model_name=\"stories\"");
    }
    assert_eq!(
        sample(&m, "vllm:cache_config_info", "block_size=\"16\""),
        1.0
    );
    assert!(sample(&m, "vllm:prompt_tokens_total", "") > 0.0);
    // 12 requests: each prompt as text, as ids and streamed, then all three as a list.
    let generated: usize = direct.iter().map(|d| d.token_ids.len()).sum::<usize>() * 4;
    assert_eq!(
        sample(&m, "vllm:generation_tokens_total", ""),
        generated as f64
    );
    assert_eq!(
        sample(&m, "vllm:e2e_request_latency_seconds_count", ""),
        12.0
    );
    assert_eq!(
        sample(&m, "vllm:time_to_first_token_seconds_count", ""),
        12.0
    );
    assert!(sample(&m, "vllm:inter_token_latency_seconds_count", "") > 0.0);
    assert!(sample(&m, "vllm:time_per_output_token_seconds_count", "") > 0.0);
    let finished = sample(&m, "vllm:request_success_total", "finished_reason=\"stop\"")
        + sample(
            &m,
            "vllm:request_success_total",
            "finished_reason=\"length\"",
        );
    assert_eq!(finished, 12.0);
    assert_eq!(
        sample(
            &m,
            "vllm:request_success_total",
            "finished_reason=\"abort\""
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_template_http_equals_engine() {
    // A SmolLM-layout model with a chat template in tokenizer_config.json: the server renders
    // the messages with it exactly as the engine's own chat prompt does.
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(
        dir.path(),
        &common::TinyModelSpec::new(common::Arch::SmolLm),
    );
    let s = Server::start_with(dir.path(), &[]).await;
    let messages = vec![
        llmd::tokenizer::ChatMessage {
            role: "system".into(),
            content: "You are brief.".into(),
        },
        llmd::tokenizer::ChatMessage {
            role: "user".into(),
            content: "Tell me a story about a cat".into(),
        },
    ];
    let engine = llmd::Engine::new(llmd::EngineConfig::new(dir.path())).expect("engine");
    let params = llmd::SamplingParams {
        max_tokens: Some(16),
        ignore_eos: true,
        ..llmd::SamplingParams::greedy()
    };
    let direct = tokio::task::block_in_place(|| {
        engine.generate(vec![llmd::Prompt::Chat(messages.clone())], &params)
    })
    .expect("generate")
    .remove(0);
    let want_prompt = engine
        .tokenizer()
        .apply_chat_template(&messages, true)
        .unwrap();
    assert!(want_prompt.ends_with("<|assistant|>\n"), "{want_prompt:?}");
    let msgs: Vec<Value> = messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let body = json!({"messages": msgs, "max_tokens": 16, "temperature": 0, "ignore_eos": true});
    let (st, b) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["choices"][0]["message"]["content"], direct.text.as_str());
    assert_eq!(b["usage"]["prompt_tokens"], direct.num_prompt_tokens);
    assert_eq!(b["usage"]["completion_tokens"], 16);
    // Content given as a list of text parts is the same message.
    let mut parts = body.clone();
    parts["messages"][1]["content"] = json!([{"type": "text", "text": "Tell me a story "},
                                             {"type": "text", "text": "about a cat"}]);
    let (st, b) = s.post("/v1/chat/completions", &parts).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["choices"][0]["message"]["content"], direct.text.as_str());
    // Non-text parts are refused by name.
    parts["messages"][1]["content"] = json!([{"type": "image_url", "image_url": {"url": "x"}}]);
    let (st, b) = s.post("/v1/chat/completions", &parts).await;
    assert_error(st, &b, 400, "invalid_request_error");
    assert_eq!(b["error"]["param"], "messages[1].content");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_n_seed_and_logprobs() {
    let s = Server::start(&[]).await;
    let msgs = json!([{"role": "user", "content": "Once upon a time"}]);
    let body = json!({"messages": msgs, "n": 3, "seed": 11, "temperature": 1.0, "max_tokens": 24,
                      "logprobs": true, "top_logprobs": 2});
    let (st, a) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{a}");
    let (_, b) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(a["object"], "chat.completion");
    let texts: Vec<&str> = (0..3)
        .map(|i| a["choices"][i]["message"]["content"].as_str().unwrap())
        .collect();
    for i in 0..3 {
        assert_eq!(a["choices"][i]["message"]["role"], "assistant");
        assert_eq!(
            a["choices"][i]["message"]["content"],
            b["choices"][i]["message"]["content"]
        );
        let content = a["choices"][i]["logprobs"]["content"].as_array().unwrap();
        assert!(!content.is_empty());
        for t in content {
            assert!(t["logprob"].as_f64().unwrap() <= 0.0);
            assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
        }
    }
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "seed+i choices all equal: {texts:?}"
    );
    assert_eq!(
        a["usage"]["completion_tokens"].as_u64().unwrap(),
        (0..3)
            .map(|i| a["choices"][i]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .len() as u64)
            .sum::<u64>()
    );

    // Completions logprobs: the legacy shape, one entry per token.
    let (st, c) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 8, "logprobs": 3,
                    "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{c}");
    let lp = &c["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 8);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 8);
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), 8);
    for top in lp["top_logprobs"].as_array().unwrap() {
        assert!(!top.as_object().unwrap().is_empty());
    }
    assert_eq!(c["usage"]["completion_tokens"], 8);

    // Stop strings cut the text; min_tokens and ignore_eos are honoured.
    let (_, free) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}),
        )
        .await;
    let free = free["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = free.chars().skip(6).take(4).collect();
    let (_, cut) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 40,
                                          "temperature": 0, "stop": stop}),
        )
        .await;
    let cut_text = cut["choices"][0]["text"].as_str().unwrap();
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    assert!(
        free.starts_with(cut_text) && !cut_text.contains(&stop),
        "{free:?} / {cut_text:?} / {stop:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_aborts_and_frees_blocks() {
    let s = Server::start(&["--num-gpu-blocks-override", "256"]).await;
    let m = s.metrics().await;
    let total = sample(&m, "llmd:kv_total_blocks", "");
    assert_eq!(sample(&m, "llmd:kv_free_blocks", ""), total);
    let mut r = s
        .send(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": true,
                      "temperature": 1.0, "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("a first chunk");
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = s.metrics().await;
        let idle = sample(&m, "vllm:num_requests_running", "") == 0.0
            && sample(&m, "vllm:num_requests_waiting", "") == 0.0
            && sample(&m, "llmd:kv_free_blocks", "") == total
            && sample(&m, "vllm:e2e_request_latency_seconds_count", "") == 1.0;
        if idle {
            let aborted = sample(
                &m,
                "vllm:request_success_total",
                "finished_reason=\"abort\"",
            );
            let generated = sample(&m, "vllm:generation_tokens_total", "");
            // Either the abort reached the engine before the request could finish, or (on a
            // machine fast enough to finish 480 tokens first) it finished: both free the pool,
            // but only the first exercises the abort path, which is the common case.
            assert!(aborted == 1.0 || generated == 480.0, "{m}");
            if aborted == 1.0 {
                assert!(generated < 480.0, "{m}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pool not freed after disconnect:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_streams() {
    let s = Server::start(&[]).await;
    let client = reqwest::Client::new();
    let prompts = [
        "Once upon a time",
        "The cat",
        "Tom had a red ball",
        "One day",
    ];
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            let url = s.url(if i % 2 == 0 { "/v1/completions" } else { "/v1/chat/completions" });
            let max_tokens = 8 + i % 24;
            let p = prompts[i % prompts.len()];
            let body = if i % 2 == 0 {
                json!({"prompt": p, "max_tokens": max_tokens, "ignore_eos": true, "stream": true,
                       "stream_options": {"include_usage": true}})
            } else {
                json!({"messages": [{"role": "user", "content": p}], "max_tokens": max_tokens,
                       "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}})
            };
            tokio::spawn(async move {
                let r = client.post(url).json(&body).send().await.expect("send");
                assert_eq!(r.status(), 200);
                let events = sse_events(&r.text().await.expect("body"));
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
                let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
                assert_eq!(usage["usage"]["completion_tokens"], max_tokens, "{usage}");
                let finish = events[..events.len() - 2].iter().rev().find_map(|e| {
                    let v: Value = serde_json::from_str(e).unwrap();
                    v["choices"][0]["finish_reason"].as_str().map(str::to_string)
                });
                assert_eq!(finish.as_deref(), Some("length"));
            })
        })
        .collect();
    let all = futures_util::future::join_all(tasks);
    let results = tokio::time::timeout(Duration::from_secs(300), all)
        .await
        .expect("200 streams did not finish in time");
    for r in results {
        r.expect("a stream task failed");
    }
    let m = s.metrics().await;
    assert_eq!(
        sample(&m, "vllm:e2e_request_latency_seconds_count", ""),
        200.0
    );
    assert_eq!(
        sample(
            &m,
            "vllm:request_success_total",
            "finished_reason=\"length\""
        ),
        200.0
    );
    let expected: usize = (0..200).map(|i| 8 + i % 24).sum();
    assert_eq!(
        sample(&m, "vllm:generation_tokens_total", ""),
        expected as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_and_exits_zero() {
    let mut s = Server::start(&["--shutdown-timeout", "20"]).await;
    let mut r = s
        .send(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut body = String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()).to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // The in-flight stream still runs to its end.
    while let Some(c) = r.chunk().await.expect("stream cut during drain") {
        body.push_str(&String::from_utf8_lossy(&c));
    }
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 300);
    let status = tokio::task::block_in_place(|| s.wait_exit(Duration::from_secs(20)))
        .expect("server did not exit within the deadline");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_aborts_stuck_requests() {
    // A deadline of 0 s: in-flight requests are dropped at once and the process still exits 0.
    let mut s = Server::start(&["--shutdown-timeout", "0"]).await;
    let mut r = s
        .send(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": true,
                      "stream": true}),
        )
        .await;
    r.chunk().await.unwrap().unwrap();
    Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .expect("kill");
    let status = tokio::task::block_in_place(|| s.wait_exit(Duration::from_secs(10)))
        .expect("server did not exit after its 0 s deadline");
    assert!(status.success(), "exit status {status}");
}

/// Runs a pytest file of the official `openai` client against the built binary.
fn run_openai_pytest(file: &str) {
    run_openai_pytest_on(file, &model_dir(), None);
}

/// [`run_openai_pytest`] on `model`, with extra `llmd serve` flags where the file takes them.
fn run_openai_pytest_on(file: &str, model: &Path, serve_args: Option<&str>) {
    let probe = Command::new("python3")
        .args(["-c", "import openai, pytest"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => panic!(
            "the openai client tests need Python 3 with the `openai` and `pytest` modules: \
             run `python3 -m pip install openai pytest`"
        ),
    }
    let status = Command::new("python3")
        .args(["-m", "pytest", "-q", file])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("LLMD_BIN", env!("CARGO_BIN_EXE_llmd"))
        .env("LLMD_MODEL", model)
        .envs(serve_args.map(|a| ("LLMD_SERVE_ARGS", a)))
        .status()
        .expect("running pytest");
    assert!(
        status.success(),
        "pytest {file} on {} failed: {status}",
        model.display()
    );
}

#[test]
fn openai_python_client() {
    run_openai_pytest("tests/openai_client.py");
}

/// Prefiller, decoder and sidecar processes, driven through the sidecar by the `openai`
/// client, against a single worker (tests/disagg_openai.py).
#[test]
fn disaggregated_serving_with_the_openai_client() {
    run_openai_pytest("tests/disagg_openai.py");
}

/// The same three processes on SmolLM2's real weights.
#[test]
fn disaggregated_serving_of_smollm2_with_the_openai_client() {
    let Some(model) = common::shared_model("smollm2-135m-instruct") else {
        return;
    };
    run_openai_pytest_on(
        "tests/disagg_openai.py",
        &model,
        Some("--max-model-len 512 --kv-cache-memory-gb 0.1"),
    );
}

/// Resident memory of process `pid`, in kB.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// 1000 concurrent streams (completions and chat, 8–55 tokens each); every one must end with
/// its full token count, `length` and `[DONE]`.
async fn thousand_streams(s: &Server, round: usize) {
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let client = client.clone();
            let chat = (i + round) % 2 == 1;
            let url = s.url(if chat { "/v1/chat/completions" } else { "/v1/completions" });
            let max_tokens = 8 + (i * 7 + round) % 48;
            // The same 1000 prompts every round: the warm-up fills every cache that is bounded
            // by design (the tokenizer caches up to 10k whole prompts for a tokenizer without a
            // pre-tokenizer, as stories260K's), so later growth would be a leak.
            let p = format!("Story {i}: once upon a time");
            let body = if chat {
                json!({"messages": [{"role": "user", "content": p}], "max_tokens": max_tokens,
                       "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}})
            } else {
                json!({"prompt": p, "max_tokens": max_tokens, "ignore_eos": true, "stream": true,
                       "stream_options": {"include_usage": true}})
            };
            tokio::spawn(async move {
                let r = client.post(url).json(&body).send().await.expect("send");
                assert_eq!(r.status(), 200);
                let events = sse_events(&r.text().await.expect("body"));
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
                let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
                assert_eq!(usage["usage"]["completion_tokens"], max_tokens, "{usage}");
            })
        })
        .collect();
    let results = tokio::time::timeout(
        Duration::from_secs(600),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("1000 streams did not finish in time");
    for r in results {
        r.expect("a stream lost its request");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_thousand_concurrent_streams() {
    // Two warm-up rounds, then two measured rounds of 1000 concurrent streams through the real
    // server (more than max_num_seqs, so requests queue and get preempted): no request is
    // lost, the KV pool comes back whole, and resident memory returns to within 10 % of its
    // value after the warm-up (no per-request leak). Warm-up fills what is bounded by design:
    // the tokenizer threads' word caches, map capacities, the allocator's arenas.
    let s = Server::start(&[]).await;
    let m = s.metrics().await;
    let total = sample(&m, "llmd:kv_total_blocks", "");
    assert_eq!(sample(&m, "llmd:kv_free_blocks", ""), total);
    let idle = |m: &str| {
        sample(m, "vllm:num_requests_running", "") == 0.0
            && sample(m, "vllm:num_requests_waiting", "") == 0.0
            && sample(m, "llmd:kv_free_blocks", "") == total
    };
    for round in 0..2 {
        thousand_streams(&s, round).await;
    }
    wait_metrics(&s, "idle after the warm-up", idle).await;
    let warm = rss_kb(s.pid());
    for round in 2..4 {
        thousand_streams(&s, round).await;
    }
    let m = wait_metrics(&s, "idle after the soak", idle).await;
    let after = rss_kb(s.pid());
    eprintln!("RSS after warm-up {warm} kB, after 2000 more streams {after} kB");
    // Only growth would be a leak; the idle engine hands free pages back, so it may shrink.
    assert!(
        after * 10 <= warm * 11,
        "RSS {after} kB vs {warm} kB after warm-up"
    );
    assert_eq!(
        sample(
            &m,
            "vllm:request_success_total",
            "finished_reason=\"length\""
        ),
        4000.0
    );
    assert_eq!(
        sample(
            &m,
            "vllm:request_success_total",
            "finished_reason=\"abort\""
        ),
        0.0
    );
}

/// Posts `body` (far over the body limit) to `path`, with a length header or streamed without
/// one; the status and body of the answer. The server may answer 413 and close while the client
/// is still writing, which the client sees as a broken pipe, not the answer: such a try is made
/// again (up to 10 times), so the 413 itself is what gets checked.
async fn send_oversized(s: &Server, path: &str, body: &str, with_length: bool) -> (u16, String) {
    for _ in 0..10 {
        let req = reqwest::Client::new()
            .post(s.url(path))
            .header("content-type", "application/json");
        let req = if with_length {
            req.body(body.to_string())
        } else {
            let chunks: Vec<Result<String, std::io::Error>> = body
                .as_bytes()
                .chunks(1 << 20)
                .map(|c| Ok(String::from_utf8_lossy(c).into_owned()))
                .collect();
            req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
        };
        match req.send().await {
            Ok(r) => {
                let st = r.status().as_u16();
                return (st, r.text().await.unwrap_or_default());
            }
            Err(e) => assert!(e.is_request() || e.is_body(), "{path}: {e:?}"),
        }
    }
    panic!("{path}: never read the answer to an oversized body in 10 tries");
}

/// A long stories prompt (about 200 tokens).
fn long_story() -> String {
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. ".repeat(8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_kv_tier_serves_old_prefixes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().to_str().unwrap().to_string();
    let args = [
        "--kv-disk-path",
        disk.as_str(),
        "--kv-disk-gb",
        "1",
        "--kv-tier-always-load",
    ];
    let body = json!({"prompt": long_story(), "max_tokens": 12, "temperature": 0});
    let first_text = {
        let mut s = Server::start(&args).await;
        let (status, v) = s.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        // The tier thread writes behind the engine: wait for the blocks to be on disk.
        wait_metrics(&s, "blocks on disk", |m| {
            sample(m, "llmd:kv_tier_blocks", "tier=\"disk\"") >= 10.0
        })
        .await;
        let m = s.metrics().await;
        assert_eq!(
            sample(&m, "llmd:kv_tier_loaded_blocks_total", "tier=\"disk\""),
            0.0
        );
        s.p.kill();
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let s = Server::start(&args).await;
    let m = s.metrics().await;
    assert!(
        sample(&m, "llmd:kv_tier_blocks", "tier=\"disk\"") >= 10.0,
        "the index was rebuilt"
    );
    let (status, v) = s.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), first_text);
    let m = s.metrics().await;
    assert!(
        sample(&m, "llmd:kv_tier_loaded_blocks_total", "tier=\"disk\"") >= 10.0,
        "{m}"
    );
    assert!(sample(&m, "llmd:kv_tier_load_hit_tokens_total", "") >= 160.0);
    assert_eq!(
        sample(&m, "vllm:prefix_cache_hits_total", ""),
        0.0,
        "nothing came from the device"
    );
    assert_eq!(sample(&m, "llmd:kv_tier_checksum_failures_total", ""), 0.0);
    // The decision is exported for every tier.
    for tier in ["host", "disk", "remote"] {
        sample(&m, "llmd:kv_tier_load_chosen", &format!("tier=\"{tier}\""));
    }
}

/// The 64-bit published hashes of `tokens`' full blocks (default algorithm and seed).
fn published_hashes(tokens: &[u32]) -> Vec<u64> {
    let seed = std::env::var("PYTHONHASHSEED").unwrap_or_else(|_| "0".into());
    let hasher = llmd::kv::BlockHasher::new(llmd::kv::BlockHashAlgo::Xxh3, &seed);
    let mut out: Vec<llmd::kv::BlockHash> = Vec::new();
    for chunk in tokens.chunks_exact(16) {
        let h = hasher.hash(out.last(), chunk, &[]);
        out.push(h);
    }
    out.iter().map(|h| h.external()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_of_the_engine_and_tiers_reach_a_real_subscriber() {
    if !common::python_has_zmq() {
        return;
    }
    let (pub_port, replay_port) = (free_port(), free_port());
    let topic = "kv@test-pod@stories260K";
    let events = json!({
        "enable_kv_cache_events": true, "publisher": "zmq",
        "endpoint": format!("tcp://*:{pub_port}"),
        "replay_endpoint": format!("tcp://*:{replay_port}"),
        "topic": topic,
    })
    .to_string();
    let s = Server::start(&[
        "--num-gpu-blocks-override",
        "20",
        "--max-model-len",
        "256",
        "--kv-offloading-size",
        "0.05",
        "--kv-tier-always-load",
        "--kv-events-config",
        &events,
    ])
    .await;
    // A prefix, a filler that evicts most of it from the 20-block pool, the prefix again.
    let ids = |n: usize, seed: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| 4 + (i * 7919 + seed * 104_729) % 500)
            .collect()
    };
    let a = ids(160, 1);
    for (prompt, n) in [
        (a.clone(), 4),
        (ids(230, 2), 4),
        ([a.clone(), ids(20, 3)].concat(), 4),
    ] {
        let (status, v) = s
            .post(
                "/v1/completions",
                &json!({"prompt": prompt, "max_tokens": n, "temperature": 0}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
    }
    // The subscriber joins late: one live batch, then everything from 0 through the replay.
    let dump = tempfile::NamedTempFile::new().unwrap();
    let mut sub = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kv_events_subscriber.py"))
        .args(["--endpoint", &format!("tcp://127.0.0.1:{pub_port}")])
        .args(["--replay", &format!("tcp://127.0.0.1:{replay_port}")])
        .args([
            "--topic",
            topic,
            "--expect",
            "1",
            "--quiet",
            "--timeout",
            "60",
        ])
        .arg("--dump")
        .arg(dump.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "READY");
    let (status, v) = s
        .post(
            "/v1/completions",
            &json!({"prompt": ids(40, 4), "max_tokens": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(sub.wait().unwrap().success(), "subscriber failed: {rest:?}");
    let batches: Vec<(u64, Vec<Value>)> =
        serde_json::from_str(&std::fs::read_to_string(dump.path()).unwrap()).unwrap();
    assert_eq!(batches[0].0, 0, "the replay starts at 0");

    // What the events say about A's blocks, per medium.
    let a_hashes = published_hashes(&a);
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    let mut removed: HashMap<String, Vec<u64>> = HashMap::new();
    let mut first_gpu_store: Option<Value> = None;
    for (_, evs) in &batches {
        for e in evs {
            let kind = e[0].as_str().unwrap();
            let hashes = || -> Vec<u64> {
                e[1].as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h.as_u64().unwrap())
                    .collect()
            };
            match kind {
                "BlockStored" => {
                    let medium = e[6].as_str().unwrap().to_string();
                    if medium == "GPU" && first_gpu_store.is_none() {
                        first_gpu_store = Some(e.clone());
                    }
                    stored.entry(medium).or_default().extend(hashes());
                }
                "BlockRemoved" => removed
                    .entry(e[2].as_str().unwrap().to_string())
                    .or_default()
                    .extend(hashes()),
                other => panic!("unexpected event {other}"),
            }
        }
    }
    // A's 10 blocks were stored on the GPU as one chain, with their tokens and no parent.
    let first = first_gpu_store.expect("a GPU BlockStored");
    let first_hashes: Vec<u64> = first[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_u64().unwrap())
        .collect();
    assert_eq!(first_hashes, a_hashes[..first_hashes.len()]);
    assert!(first[2].is_null(), "the first block has no parent");
    let tokens: Vec<u32> = first[3]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tokens, a[..16 * first_hashes.len()]);
    assert_eq!(first[4], 16);
    for h in &a_hashes {
        assert!(
            stored["GPU"].contains(h),
            "A's block {h:016x} never stored on the GPU"
        );
        assert!(
            stored["CPU"].contains(h),
            "A's block {h:016x} never offloaded to the host"
        );
    }
    // The filler evicted some of A from the GPU, and A's return stored them there again.
    let evicted: Vec<&u64> = a_hashes
        .iter()
        .filter(|h| removed["GPU"].contains(h))
        .collect();
    assert!(!evicted.is_empty(), "nothing of A was evicted: {removed:?}");
    for h in evicted {
        let n = stored["GPU"].iter().filter(|x| *x == h).count();
        assert_eq!(
            n, 2,
            "block {h:016x} evicted, then loaded back and stored again"
        );
    }
    let m = s.metrics().await;
    assert!(
        sample(&m, "llmd:kv_tier_loaded_blocks_total", "tier=\"host\"") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_prefixes_through_redis_and_outlive_it() {
    let Some(mut redis) = common::RedisServer::start() else {
        return;
    };
    let url = redis.url();
    let args = ["--kv-remote-url", url.as_str(), "--kv-tier-always-load"];
    let body = json!({"prompt": long_story(), "max_tokens": 12, "temperature": 0});
    let first = Server::start(&args).await;
    let (status, v) = first.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    wait_metrics(&first, "blocks on the server", |m| {
        sample(m, "llmd:kv_tier_blocks", "tier=\"remote\"") >= 10.0
    })
    .await;

    // Another worker: the prefix comes from the server, not from its own prefill.
    let second = Server::start(&args).await;
    let (status, v) = second.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), text);
    let m = second.metrics().await;
    assert!(
        sample(&m, "llmd:kv_tier_loaded_blocks_total", "tier=\"remote\"") >= 10.0,
        "{m}"
    );
    let prompt_tokens = v["usage"]["prompt_tokens"].as_f64().unwrap();
    assert!(
        sample(&m, "llmd:prompt_tokens_computed_total", "") <= prompt_tokens - 160.0,
        "the second worker recomputed the prefix: {m}"
    );

    // The server dies: both workers keep answering, recomputing.
    redis.kill();
    let other =
        json!({"prompt": "Tom had a red kite. ".repeat(10), "max_tokens": 8, "temperature": 0});
    for s in [&first, &second] {
        let (status, v) = s.post("/v1/completions", &other).await;
        assert_eq!(status, 200, "{v}");
    }
    let m = second.metrics().await;
    assert!(
        sample(&m, "llmd:kv_tier_errors_total", "tier=\"remote\"") >= 1.0,
        "{m}"
    );
    assert_eq!(sample(&m, "llmd:engine_failed_steps_total", ""), 0.0);
}

/// The text of a completion or chat response, joined from SSE chunks when streamed.
async fn answer_text(s: &Server, path: &str, body: &Value) -> String {
    let r = s.send(path, body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let pick = |v: &Value| -> String {
        let c = &v["choices"][0];
        c["text"]
            .as_str()
            .or(c["message"]["content"].as_str())
            .or(c["delta"]["content"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    if body["stream"] == true {
        sse_events(&text)
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| pick(&serde_json::from_str(e).unwrap()))
            .collect()
    } else {
        pick(&serde_json::from_str(&text).unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_on_one_worker_decode_on_another() {
    let side = free_port();
    let side_s = side.to_string();
    let prefiller = Server::start(&[
        "--kv-transfer-config",
        r#"{"kv_connector": "NixlConnector", "kv_role": "kv_producer"}"#,
        "--kv-transfer-port",
        &side_s,
        "--kv-transfer-lease-secs",
        "30",
        "--enable-prompt-tokens-details",
    ])
    .await;
    let decoder = Server::start(&[
        "--kv-transfer-config",
        r#"{"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}"#,
        "--enable-prompt-tokens-details",
    ])
    .await;
    let single = Server::start(&[]).await;
    let idle = sample(&prefiller.metrics().await, "llmd:kv_free_blocks", "");
    let story = long_story();
    let cases = [
        (
            "/v1/completions",
            json!({"prompt": story, "max_tokens": 24, "temperature": 0}),
        ),
        (
            "/v1/completions",
            json!({"prompt": story, "max_tokens": 24, "temperature": 0, "stream": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": story}], "max_tokens": 24, "temperature": 0}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": story}], "max_tokens": 24, "temperature": 0, "stream": true}),
        ),
    ];
    for (path, body) in &cases {
        let want = answer_text(&single, path, body).await;
        // Step 2 of llm-d's flow: the sidecar asks the prefiller for one token, KV kept.
        let mut prefill = body.clone();
        prefill["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null});
        prefill["stream"] = json!(false);
        prefill["max_tokens"] = json!(1);
        if path.contains("chat") {
            prefill["max_completion_tokens"] = json!(1);
        }
        let (status, pv) = prefiller.post(path, &prefill).await;
        assert_eq!(status, 200, "{pv}");
        let params = pv["kv_transfer_params"].clone();
        assert_eq!(params["do_remote_prefill"], true, "{pv}");
        assert_eq!(params["do_remote_decode"], false);
        assert_eq!(params["remote_port"], side);
        assert_eq!(params["tp_size"], 1);
        assert!(params["remote_engine_id"].is_string() && params["remote_request_id"].is_string());
        assert!(!params["remote_block_ids"].as_array().unwrap().is_empty());
        // Step 4: the original request, with those parameters, to the decoder.
        let mut decode = body.clone();
        decode["kv_transfer_params"] = params;
        let got = answer_text(&decoder, path, &decode).await;
        assert_eq!(got, want, "{path} stream={}", body["stream"]);
    }
    let m = decoder.metrics().await;
    assert_eq!(
        sample(&m, "llmd:prompt_tokens_computed_total", ""),
        0.0,
        "the decoder prefilled: {m}"
    );
    assert!(sample(&m, "llmd:kv_transfer_blocks_received_total", "") >= 4.0 * 10.0);
    assert_eq!(sample(&m, "llmd:kv_transfer_pulls_total", ""), 4.0);
    assert_eq!(sample(&m, "llmd:kv_transfer_pull_seconds_count", ""), 4.0);
    // The prefiller freed every block once its decoder had them.
    let m = wait_metrics(&prefiller, "held KV released", |m| {
        sample(m, "llmd:kv_held_requests", "") == 0.0
    })
    .await;
    assert_eq!(sample(&m, "llmd:kv_free_blocks", ""), idle);
    assert_eq!(sample(&m, "llmd:kv_transfer_pulls_served_total", ""), 4.0);

    // The usage says where the prompt's KV came from: nothing cached on the prefiller, all but
    // the last token (run again for its logits) on the decoder.
    let (path, body) = &cases[0];
    let params = prefill_params(&prefiller, body).await;
    let (pstatus, pv) = prefiller.post(path, body).await;
    assert_eq!(pstatus, 200);
    assert!(
        pv["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64(),
        "{pv}"
    );
    let (status, v) = decoder.post(path, &with_params(body, &params)).await;
    assert_eq!(status, 200, "{v}");
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(prompt_tokens - 1),
        "{v}"
    );

    // The same parameters again: the blocks are gone, so the decoder prefills itself — a
    // correct answer, and a fallback counted.
    let mut prefill = body.clone();
    prefill["kv_transfer_params"] = json!({"do_remote_decode": true});
    prefill["max_tokens"] = json!(1);
    let (_, pv) = prefiller.post(path, &prefill).await;
    let mut decode = body.clone();
    decode["kv_transfer_params"] = pv["kv_transfer_params"].clone();
    let want = answer_text(&single, path, body).await;
    assert_eq!(answer_text(&decoder, path, &decode).await, want);
    assert_eq!(
        answer_text(&decoder, path, &decode).await,
        want,
        "second use of released KV"
    );
    let m = decoder.metrics().await;
    assert_eq!(
        sample(&m, "llmd:kv_transfer_fallbacks_total", "cause=\"not_held\""),
        1.0,
        "{m}"
    );
    // A stale engine id (a restarted prefiller) is refused, and recomputed too.
    let (_, pv) = prefiller.post(path, &prefill).await;
    let mut stale = pv["kv_transfer_params"].clone();
    stale["remote_engine_id"] = json!("llmd-1-1");
    let mut decode = body.clone();
    decode["kv_transfer_params"] = stale;
    assert_eq!(answer_text(&decoder, path, &decode).await, want);
    let m = decoder.metrics().await;
    assert_eq!(
        sample(
            &m,
            "llmd:kv_transfer_fallbacks_total",
            "cause=\"stale_engine\""
        ),
        1.0
    );
    // Asking a worker without --kv-transfer-config for a transfer is a 400.
    let (status, v) = single.post(path, &prefill).await;
    assert_error(status, &v, 400, "invalid_request_error");
}

/// A prefiller on side-channel port `side` (with `extra` flags) and a decoder.
async fn producer(side: u16, extra: &[&str]) -> Server {
    let side = side.to_string();
    let mut args = vec![
        "--kv-transfer-config",
        r#"{"kv_connector": "NixlConnector", "kv_role": "kv_producer"}"#,
        "--kv-transfer-port",
        side.as_str(),
    ];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

async fn consumer() -> Server {
    Server::start(&[
        "--kv-transfer-config",
        r#"{"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}"#,
    ])
    .await
}

/// Step 2 of llm-d's flow against `prefiller`: the parameters for the decoder.
async fn prefill_params(prefiller: &Server, body: &Value) -> Value {
    let mut p = body.clone();
    p["kv_transfer_params"] = json!({"do_remote_decode": true});
    p["max_tokens"] = json!(1);
    let (status, v) = prefiller.post("/v1/completions", &p).await;
    assert_eq!(status, 200, "{v}");
    v["kv_transfer_params"].clone()
}

fn with_params(body: &Value, params: &Value) -> Value {
    let mut b = body.clone();
    b["kv_transfer_params"] = params.clone();
    b
}

fn story_body() -> Value {
    json!({"prompt": long_story(), "max_tokens": 16, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_nobody_pulls_is_freed_by_its_lease() {
    // The decoder died after step 3: nobody pulls, the lease frees the blocks.
    let p = producer(free_port(), &["--kv-transfer-lease-secs", "1"]).await;
    let idle = sample(&p.metrics().await, "llmd:kv_free_blocks", "");
    let started = Instant::now();
    prefill_params(&p, &story_body()).await;
    let m = p.metrics().await;
    assert_eq!(sample(&m, "llmd:kv_held_requests", ""), 1.0);
    assert!(sample(&m, "llmd:kv_free_blocks", "") < idle);
    let m = wait_metrics(&p, "the lease to free the blocks", |m| {
        sample(m, "llmd:kv_free_blocks", "") == idle
    })
    .await;
    let held = started.elapsed();
    assert!(
        held < Duration::from_secs(10),
        "held {held:?} with a 1 s lease"
    );
    assert_eq!(sample(&m, "llmd:kv_held_requests", ""), 0.0);
    assert_eq!(sample(&m, "llmd:kv_transfer_leases_expired_total", ""), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_damaged_in_flight_are_read_again_or_recomputed() {
    let single = Server::start(&[]).await;
    let body = story_body();
    let (_, v) = single.post("/v1/completions", &body).await;
    let want = v["choices"][0]["text"].clone();
    for (fault, reread, fallbacks) in [("corrupt@1", 1.0, 0.0), ("corrupt2@0", 0.0, 1.0)] {
        let p = producer(free_port(), &["--kv-transfer-fault", fault]).await;
        let d = consumer().await;
        let params = prefill_params(&p, &body).await;
        let (status, v) = d
            .post("/v1/completions", &with_params(&body, &params))
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], want, "{fault}");
        let m = d.metrics().await;
        assert_eq!(
            sample(&m, "llmd:kv_transfer_reread_blocks_total", ""),
            reread,
            "{fault}"
        );
        assert_eq!(
            sample(&m, "llmd:kv_transfer_fallbacks_total", "cause=\"corrupt\""),
            fallbacks,
            "{fault}"
        );
        // Recomputed or not, the producer's blocks are freed.
        wait_metrics(&p, "held KV released", |m| {
            sample(m, "llmd:kv_held_requests", "") == 0.0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_mid_transfer_costs_only_a_recompute() {
    let single = Server::start(&[]).await;
    let body = story_body();
    let (_, v) = single.post("/v1/completions", &body).await;
    let want = v["choices"][0]["text"].clone();
    // The producer pauses after its third block; it is killed during the pause.
    let mut p = producer(free_port(), &["--kv-transfer-fault", "stall@2:5000"]).await;
    let d = consumer().await;
    let params = prefill_params(&p, &body).await;
    let url = d.url("/v1/completions");
    let decode = tokio::spawn({
        let b = with_params(&body, &params);
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .header(llmd::kv::auth::TRUSTED_HOP_HEADER, common::hop_token())
                .json(&b)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    p.p.kill();
    let (status, v) = decode.await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want);
    let m = d.metrics().await;
    assert_eq!(
        sample(&m, "llmd:kv_transfer_fallbacks_total", "cause=\"io\""),
        1.0,
        "{m}"
    );
    assert!(
        sample(&m, "llmd:prompt_tokens_computed_total", "") > 0.0,
        "it prefilled itself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_producer_is_not_confused_with_its_predecessor() {
    let single = Server::start(&[]).await;
    let body = story_body();
    let (_, v) = single.post("/v1/completions", &body).await;
    let want = v["choices"][0]["text"].clone();
    let side = free_port();
    let mut p = producer(side, &[]).await;
    let d = consumer().await;
    let params = prefill_params(&p, &body).await;
    // Between steps 3 and 4 the prefiller restarts on the same side-channel port.
    p.p.kill();
    let p2 = producer(side, &[]).await;
    let (status, v) = d
        .post("/v1/completions", &with_params(&body, &params))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want);
    let m = d.metrics().await;
    assert_eq!(
        sample(
            &m,
            "llmd:kv_transfer_fallbacks_total",
            "cause=\"stale_engine\""
        ),
        1.0,
        "{m}"
    );
    let m = p2.metrics().await;
    assert_eq!(sample(&m, "llmd:kv_transfer_pulls_refused_total", ""), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_pulls_a_prefix_a_peer_has_cached() {
    // East/west: the router names a peer that holds the prefix; no request id, no prefill step.
    let both = r#"{"kv_connector": "NixlConnector", "kv_role": "kv_both"}"#;
    let (side_a, side_b) = (free_port().to_string(), free_port().to_string());
    let a = Server::start(&["--kv-transfer-config", both, "--kv-transfer-port", &side_a]).await;
    let b = Server::start(&["--kv-transfer-config", both, "--kv-transfer-port", &side_b]).await;
    let single = Server::start(&[]).await;
    let shared = long_story();
    let (status, v) = a
        .post(
            "/v1/completions",
            &json!({"prompt": shared, "max_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let body =
        json!({"prompt": format!("{shared}Then it rained."), "max_tokens": 16, "temperature": 0});
    let (_, want) = single.post("/v1/completions", &body).await;
    let mut pull = body.clone();
    pull["kv_transfer_params"] = json!({"do_remote_prefill": true, "remote_host": "127.0.0.1", "remote_port": side_a.parse::<u16>().unwrap()});
    let (status, v) = b.post("/v1/completions", &pull).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want["choices"][0]["text"]);
    let m = b.metrics().await;
    let prompt_tokens = v["usage"]["prompt_tokens"].as_f64().unwrap();
    let received = sample(&m, "llmd:kv_transfer_blocks_received_total", "");
    assert!(received >= 10.0, "{m}");
    assert_eq!(
        sample(&m, "llmd:prompt_tokens_computed_total", ""),
        prompt_tokens - 16.0 * received,
        "only what the peer did not have was computed"
    );
    // The same prefix again: this worker now has it cached, so it does not pull it.
    let (status, v) = b.post("/v1/completions", &pull).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want["choices"][0]["text"]);
    let m = b.metrics().await;
    assert_eq!(
        sample(&m, "llmd:kv_transfer_blocks_received_total", ""),
        received,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "llmd:kv_transfer_pulls_skipped_total",
            "reason=\"cached_here\""
        ),
        1.0,
        "{m}"
    );
    assert!(
        sample(&m, "llmd:kv_transfer_pull_cost_seconds_per_block", "") > 0.0,
        "{m}"
    );
    // A peer that has nothing of the prompt: nothing received, computed locally.
    let other = json!({"prompt": "A completely different story about a dog.", "max_tokens": 4,
        "temperature": 0, "kv_transfer_params": {"do_remote_prefill": true,
        "remote_host": "127.0.0.1", "remote_port": side_a.parse::<u16>().unwrap()}});
    let (status, v) = b.post("/v1/completions", &other).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        sample(
            &b.metrics().await,
            "llmd:kv_transfer_blocks_received_total",
            ""
        ),
        received
    );
}
