//! The Endpoint Picker's decision overhead, beside the proxy mode's, in one run: one
//! `llmd route --epp-port` (SmolLM2's tokenizer) in front of an instant fake worker (this
//! process answers every completion at once, so what is measured is the router).
//!
//! - EPP: an ext_proc stream as Envoy opens it per request — request headers, then a ~2k-token
//!   completion body in 4 chunks — timed until the router's answer is in (the headers response
//!   with the endpoints and the body given back); then the response passes through (untimed).
//! - Proxy: a body of the same kind POSTed through the router, minus one POSTed straight to the
//!   fake worker (interleaved, so all see the same machine).
//!
//! Three kinds of body, each ~2k tokens: `unique` (every request a text the router has never
//! seen: all of it is tokenized), `conversation` (every request shares a 1.5k-token history and
//! ends with ~512 tokens never seen), `repeated` (the same body every time). The EPP and the
//! proxy are never given the same body, so neither finds the other's text in the router's cache.
//!
//! Prints p50/p99 of each. `cargo bench --bench epp` (env: EPP_BENCH_REQUESTS, default 400).
#[path = "support/env.rs"]
mod env;
#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/splitmix.rs"]
mod splitmix;
use env::env_or;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_client::ExternalProcessorClient, processing_request::Request as Msg,
    processing_response::Response as Reply, HttpBody, HttpHeaders, ProcessingRequest,
};
use process::{free_port, Echo, LlmdProcess};
use std::time::{Duration, Instant};

/// The fake worker: every completion answered at once; empty metrics.
async fn fake_worker() -> String {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route(
            "/v1/completions",
            post(|_b: axum::body::Bytes| async {
                axum::Json(
                    serde_json::json!({"object": "text_completion", "choices": [{"text": "ok"}]}),
                )
            }),
        )
        .route("/metrics", get(|| async { "" }))
        .route("/health", get(|| async { "ok" }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    HeaderMap {
        headers: pairs
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_string(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect(),
    }
}

/// One ext_proc exchange; the time until the router's answer to the request is complete.
async fn epp_once(
    client: &mut ExternalProcessorClient<tonic::transport::Channel>,
    body: &[u8],
) -> Duration {
    let (tx, rx) = tokio::sync::mpsc::channel::<ProcessingRequest>(16);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let len = body.len().to_string();
    let start = Instant::now();
    tx.send(ProcessingRequest {
        request: Some(Msg::RequestHeaders(HttpHeaders {
            headers: Some(headers(&[
                (":method", "POST"),
                (":path", "/v1/completions"),
                (":authority", "gw"),
                ("content-type", "application/json"),
                ("content-length", &len),
            ])),
            ..Default::default()
        })),
        ..Default::default()
    })
    .await
    .unwrap();
    let chunk = body.len().div_ceil(4);
    let pieces: Vec<&[u8]> = body.chunks(chunk).collect();
    for (i, p) in pieces.iter().enumerate() {
        tx.send(ProcessingRequest {
            request: Some(Msg::RequestBody(HttpBody {
                body: p.to_vec(),
                end_of_stream: i + 1 == pieces.len(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut replies = client.process(outbound).await.unwrap().into_inner();
    let mut routed = false;
    loop {
        let r = replies.message().await.unwrap().expect("an answer");
        match r.response {
            Some(Reply::RequestHeaders(_)) => routed = true,
            Some(Reply::RequestBody(b)) => {
                let end = b
                    .response
                    .and_then(|c| c.body_mutation)
                    .and_then(|m| m.mutation)
                    .is_some_and(|m| {
                        matches!(m, envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation::StreamedResponse(s) if s.end_of_stream)
                    });
                if end {
                    break;
                }
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let took = start.elapsed();
    assert!(routed);
    // The response passes through; the stream ends (the worker's in-flight count drops).
    tx.send(ProcessingRequest {
        request: Some(Msg::ResponseHeaders(HttpHeaders {
            headers: Some(headers(&[(":status", "200")])),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    })
    .await
    .unwrap();
    let _ = replies.message().await;
    drop(tx);
    took
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let model = format!(
        "{}/../shared/models/smollm2-135m-instruct",
        env!("CARGO_MANIFEST_DIR")
    );
    if !std::path::Path::new(&model).join("tokenizer.json").exists() {
        eprintln!("skipping: {model} is not there");
        return;
    }
    let n = env_or("EPP_BENCH_REQUESTS", 400usize);
    let tok = llmd::tokenizer::Tokenizer::from_dir(std::path::Path::new(&model)).unwrap();
    // ~2k-token prompts: words drawn at random (SplitMix64 from a seed per text).
    let words = [
        "the", "router", "reads", "each", "request", "and", "keys", "its", "blocks", "before",
        "it", "picks", "a", "worker", "for", "prompt", "cache", "reuse", "under", "load",
    ];
    let text = |n: usize, seed: u64| -> String {
        let mut x = seed;
        (0..n)
            .map(|_| words[(splitmix::next(&mut x) % words.len() as u64) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut n_words = 2048;
    while tok.encode(&text(n_words, 7), false).unwrap().len() < 2048 {
        n_words += 16;
    }
    let body = |prompt: String| -> axum::body::Bytes {
        serde_json::to_vec(&serde_json::json!({"prompt": prompt, "max_tokens": 1}))
            .unwrap()
            .into()
    };
    let history = text(n_words * 3 / 4, 1);
    let kinds: Vec<(&str, Vec<axum::body::Bytes>)> = vec![
        (
            "unique",
            (0..2 * (n + 20))
                .map(|i| body(text(n_words, 1000 + i as u64)))
                .collect(),
        ),
        (
            "conversation",
            (0..2 * (n + 20))
                .map(|i| {
                    body(format!(
                        "{history} {}",
                        text(n_words / 4, 100_000 + i as u64)
                    ))
                })
                .collect(),
        ),
        ("repeated", vec![body(text(n_words, 7))]),
    ];
    let tokens = tok.encode(&text(n_words, 7), false).unwrap().len();
    let bytes = kinds[0].1[0].len();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let worker = fake_worker().await;
        let epp_port = free_port();
        let router = LlmdProcess::spawn(
            &[
                "route",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--model",
                &model,
                "--worker",
                &worker,
                "--epp-port",
                &epp_port.to_string(),
            ]
            .map(String::from),
            "warn,llmd::router::route=info",
            Echo::Errors,
            Duration::from_secs(60),
        );
        router.wait_healthy("/health", Duration::from_secs(60)).await;
        let mut client = loop {
            match ExternalProcessorClient::connect(format!("http://127.0.0.1:{epp_port}")).await
            {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let http = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
        let post = |url: String, body: axum::body::Bytes| {
            let http = http.clone();
            async move {
                let start = Instant::now();
                let r = http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.status());
                r.bytes().await.unwrap();
                start.elapsed()
            }
        };
        println!(
            "{n} requests of each kind, ~{tokens}-token completion bodies (~{bytes} bytes), router with SmolLM2's tokenizer, instant fake worker"
        );
        println!("| body | EPP p50 | EPP p99 | proxy overhead p50 | proxy overhead p99 | direct p50 |");
        println!("|---|---|---|---|---|---|");
        let mut goals = Vec::new();
        for (kind, bodies) in &kinds {
            let at = |i: usize| bodies[i % bodies.len()].clone();
            let (mut epp, mut via, mut direct) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..n + 20 {
                let e = epp_once(&mut client, &at(2 * i)).await;
                let v = post(router.url("/v1/completions"), at(2 * i + 1)).await;
                let d = post(format!("{worker}/v1/completions"), at(2 * i + 1)).await;
                if i >= 20 {
                    epp.push(e.as_secs_f64() * 1e3);
                    via.push(v.as_secs_f64() * 1e3);
                    direct.push(d.as_secs_f64() * 1e3);
                }
            }
            let (e50, e99) = (pct(&mut epp, 0.5), pct(&mut epp, 0.99));
            let (v50, v99) = (pct(&mut via, 0.5), pct(&mut via, 0.99));
            let (d50, d99) = (pct(&mut direct, 0.5), pct(&mut direct, 0.99));
            println!(
                "| {kind} | {e50:.3} ms | {e99:.3} ms | {:.3} ms | {:.3} ms | {d50:.3} ms |",
                v50 - d50,
                v99 - d99
            );
            goals.push(format!("{kind}: p50 {e50:.3} ms, p99 {e99:.3} ms"));
        }
        println!("EPP added time (goal p50 ≤ 1 ms, p99 ≤ 5 ms): {}", goals.join("; "));
    });
}
