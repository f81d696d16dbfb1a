//! Flow control and priorities with real processes on loopback (stories260K).
//!
//! - The worker side: `llmd serve --scheduling-policy priority` serves a waiting request of
//!   lower `priority` value before earlier ones of higher value; under `fcfs` (the default) a
//!   non-zero `priority` is a 400, as in vLLM.
//! - Priorities under overload: `llmd route` with an `--objectives` file in front of a worker,
//!   60 s of open-loop arrivals at 3× the capacity measured first, 20 % priority 10, 60 %
//!   priority 0, 20 % priority −1. Priority 10's p90 time to first token stays within 2× of its
//!   p90 on the idle pool; no request of priority ≥ 0 is refused for room while sheddable ones
//!   are queued (they are displaced instead); sheddable requests are shed with 429 after their
//!   TTL; a queued client that disconnects leaves the queue at once.
mod common;

use common::{args, metric, stories, LlmdProcess};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn worker(tag: &str, extra: &[&str]) -> LlmdProcess {
    let mut a = args(&[
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--kv-cache-memory-gb",
        "0.05",
        "--model",
        &stories(),
    ]);
    a.extend(args(extra));
    LlmdProcess::start(tag, &a, "/health").await
}

fn completion(max_tokens: usize, priority: Option<i64>, stream: bool) -> Value {
    let mut b = json!({
        "prompt": "Once upon a time, there was a little",
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "temperature": 0,
        "stream": stream,
    });
    if let Some(p) = priority {
        b["priority"] = json!(p);
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_serves_by_priority_under_the_priority_policy_and_fcfs_refuses_one() {
    let fcfs = worker("fcfs", &[]).await;
    let http = reqwest::Client::new();
    let r = http
        .post(fcfs.url("/v1/completions"))
        .json(&completion(2, Some(3), false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "priority", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Priority scheduling is not enabled"),
        "{e}"
    );
    for ok in [None, Some(0)] {
        let r = http
            .post(fcfs.url("/v1/chat/completions"))
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": ok}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    drop(fcfs);

    // One sequence at a time: blockers hold the engine while the others queue behind them.
    let w = worker(
        "prio",
        &["--scheduling-policy", "priority", "--max-num-seqs", "1"],
    )
    .await;
    let bad = http
        .post(w.url("/v1/completions"))
        .json(&completion(2, Some(1i64 << 40), false))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let send = |name: &'static str, body: Value| {
        let (http, url, order) = (http.clone(), w.url("/v1/completions"), order.clone());
        tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200, "{name}");
            r.bytes().await.unwrap();
            order.lock().unwrap().push(name);
        })
    };
    for _ in 0..3 {
        tasks.push(send("blocker", completion(460, Some(0), false)));
    }
    // All three in the worker before the rest.
    w.metrics_until("the blockers never reached the worker", |m| {
        metric(m, "vllm:num_requests_running", "") + metric(m, "vllm:num_requests_waiting", "")
            >= 3.0
    })
    .await;
    for _ in 0..3 {
        tasks.push(send("low", completion(8, Some(5), false)));
    }
    w.metrics_until("the low ones never queued", |m| {
        metric(m, "vllm:num_requests_waiting", "") >= 5.0
    })
    .await;
    tasks.push(send("high", completion(8, Some(-5), false)));
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let high = order.iter().position(|n| *n == "high").unwrap();
    let first_low = order.iter().position(|n| *n == "low").unwrap();
    // The high one, sent last, overtook every waiting request of higher value (the waiting
    // blockers too: 0 > -5).
    assert!(high < first_low, "{order:?}");
    assert!(
        order[..high].iter().filter(|n| **n == "blocker").count() <= 2,
        "{order:?}"
    );
}

const OBJECTIVES: &str = "\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {poolRef: {name: stories}, priority: 10}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: standard}
spec: {poolRef: {name: stories}}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {poolRef: {name: stories}, priority: -1}
";

/// Tokens each request generates (the engine's work per request).
const GEN: usize = 160;
/// Requests the router lets run at once on the worker for priority ≤ 0 ...
const SLOTS: usize = 2;
/// ... and the headroom priority 10 gets past that (the worker has SLOTS × (1 + headroom)).
const HEADROOM: usize = 2;
/// Seconds a request may wait in the router.
const TTL: f64 = 3.0;
const LOAD_SECS: f64 = 60.0;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Seconds to the first streamed token of a priority-10 request through the router.
async fn ttft(http: &reqwest::Client, url: &str) -> Result<f64, u16> {
    use futures_util::StreamExt;
    let t0 = Instant::now();
    let r = http
        .post(url)
        .header("x-gateway-inference-objective", "critical")
        .json(&completion(GEN, None, true))
        .send()
        .await
        .unwrap();
    if r.status() != 200 {
        return Err(r.status().as_u16());
    }
    let mut s = r.bytes_stream();
    let mut first = None;
    let mut text = Vec::new();
    while let Some(c) = s.next().await {
        let c = c.unwrap();
        if first.is_none() && c.windows(6).any(|w| w == b"\"text\"") {
            first = Some(t0.elapsed().as_secs_f64());
        }
        text.extend_from_slice(&c);
    }
    assert!(
        String::from_utf8_lossy(&text).contains("[DONE]"),
        "the stream ended early"
    );
    Ok(first.expect("no token streamed"))
}

#[derive(Debug, Default)]
struct Outcome {
    ok: usize,
    /// 429/503 by error code, with how long the client waited for each.
    shed: Vec<(String, f64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn priorities_under_overload() {
    let seqs = (SLOTS * (1 + HEADROOM)).to_string();
    let w = worker(
        "w",
        &["--scheduling-policy", "priority", "--max-num-seqs", &seqs],
    )
    .await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();

    // Capacity: SLOTS requests at a time straight on the worker, as the router will allow.
    let (done, t0) = (
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        Instant::now(),
    );
    let loops: Vec<_> = (0..SLOTS)
        .map(|_| {
            let (http, url, done) = (http.clone(), w.url("/v1/completions"), done.clone());
            tokio::spawn(async move {
                while t0.elapsed() < Duration::from_secs(3) {
                    let r = http
                        .post(&url)
                        .json(&completion(GEN, None, false))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    for l in loops {
        l.await.unwrap();
    }
    let capacity =
        done.load(std::sync::atomic::Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    eprintln!("capacity: {capacity:.1} requests/s at {SLOTS} at a time");

    // The queue holds what priority ≥ 0 can pile up over a TTL (arrivals are evenly spaced:
    // at most 1.8× capacity × TTL of priority 0), not that plus the sheddable ones (0.6×):
    // sheddable requests must be displaced for room.
    let max_queued = (2.0 * capacity * TTL).ceil() as usize;
    let dir = std::env::temp_dir().join(format!("llmd-flow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let objectives = dir.join("objectives.yaml");
    std::fs::write(&objectives, OBJECTIVES).unwrap();
    let r = LlmdProcess::start(
        "route",
        &args(&[
            "route",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model",
            &stories(),
            "--worker",
            &w.base,
            "--objectives",
            objectives.to_str().unwrap(),
            "--scrape-interval",
            "0.05",
            "--flow-max-concurrency",
            &SLOTS.to_string(),
            "--flow-priority-headroom",
            &HEADROOM.to_string(),
            "--flow-default-request-ttl",
            &TTL.to_string(),
            "--flow-max-requests",
            &max_queued.to_string(),
        ]),
        "/health",
    )
    .await;
    let url = r.url("/v1/completions");

    // Priority 10 on the idle pool, one at a time.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(ttft(&http, &url).await.expect("idle request refused"));
    }
    let idle_p90 = percentile(&mut idle, 0.9);

    // A queued client that disconnects leaves the queue at once: fill the slots, queue one.
    let long = |objective: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            http.post(&url)
                .header("x-gateway-inference-objective", objective)
                .json(&completion(480, None, false))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let blockers: Vec<_> = (0..SLOTS).map(|_| long("standard")).collect();
    r.metrics_until("the blockers were not admitted", |m| {
        metric(m, "llmd_router:flow_control_active_requests", "") >= SLOTS as f64
    })
    .await;
    let queued = long("batch");
    r.metrics_until("the sheddable request never queued", |m| {
        metric(
            m,
            "inference_extension_flow_control_queue_size",
            "priority=\"-1\"",
        ) == 1.0
    })
    .await;
    queued.abort();
    let m = r
        .metrics_until("the disconnected client stayed queued", |m| {
            metric(
                m,
                "inference_extension_flow_control_queue_size",
                "priority=\"-1\"",
            ) == 0.0
        })
        .await;
    assert_eq!(
        metric(
            &m,
            "llmd_router:flow_control_requests_total",
            "priority=\"-1\",outcome=\"cancelled\""
        ),
        1.0,
        "{m}"
    );
    for b in blockers {
        assert_eq!(b.await.unwrap().unwrap(), 200);
    }

    // 60 s at 3× capacity: 1 in 5 priority 10, 3 in 5 priority 0, 1 in 5 priority -1, evenly
    // spaced.
    let rate = 3.0 * capacity;
    let n = (rate * LOAD_SECS) as usize;
    let start = tokio::time::Instant::now();
    let mut high = Vec::new();
    let mut rest = Vec::new();
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let (http, url) = (http.clone(), url.clone());
        match i % 5 {
            0 => high.push(tokio::spawn(async move { ttft(&http, &url).await })),
            k => {
                let (objective, priority) = if k == 4 {
                    ("batch", -1)
                } else {
                    ("standard", 0)
                };
                rest.push(tokio::spawn(async move {
                    let t0 = Instant::now();
                    let r = http
                        .post(&url)
                        .header("x-gateway-inference-objective", objective)
                        .header(
                            "x-gateway-inference-fairness-id",
                            format!("tenant-{}", i % 3),
                        )
                        .json(&completion(GEN, None, false))
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.unwrap();
                    let waited = t0.elapsed().as_secs_f64();
                    (priority, status, v, waited)
                }));
            }
        }
    }
    let mut loaded = Vec::new();
    for h in high {
        loaded.push(h.await.unwrap().expect("a priority-10 request was refused"));
    }
    let mut by = std::collections::BTreeMap::<i32, Outcome>::new();
    for h in rest {
        let (priority, status, v, waited) = h.await.unwrap();
        let o = by.entry(priority).or_default();
        match status {
            200 => o.ok += 1,
            429 | 503 => o.shed.push((
                v["error"]["code"].as_str().unwrap_or("?").to_string(),
                waited,
            )),
            s => panic!("status {s}: {v}"),
        }
    }
    let loaded_p90 = percentile(&mut loaded, 0.9);
    let m = r.metrics().await;
    eprintln!(
        "priority 10 TTFT p90: idle {:.1} ms, at 3x capacity {:.1} ms ({} requests)",
        idle_p90 * 1e3,
        loaded_p90 * 1e3,
        loaded.len()
    );
    for (p, o) in &by {
        let mut codes = std::collections::BTreeMap::<&str, usize>::new();
        for (c, _) in &o.shed {
            *codes.entry(c).or_default() += 1;
        }
        eprintln!("priority {p}: {} served, shed {codes:?}", o.ok);
    }

    assert!(
        loaded_p90 <= 2.0 * idle_p90,
        "priority 10's p90 TTFT at 3x capacity ({loaded_p90:.4} s) is over twice its idle p90 ({idle_p90:.4} s)"
    );
    // Room: a request of priority ≥ 0 was never refused for it (sheddable ones were
    // displaced instead, and there were).
    for p in [0, 10] {
        assert!(
            !by.get(&p)
                .is_some_and(|o| o.shed.iter().any(|(c, _)| c == "rejected_capacity")),
            "priority {p} refused for room"
        );
    }
    let sheddable = &by[&-1];
    let displaced = sheddable
        .shed
        .iter()
        .filter(|(c, _)| c == "evicted_displaced")
        .count();
    assert!(displaced > 0, "no sheddable request was displaced");
    // Sheddable requests shed at their TTL with 429 (the client waited at least that long).
    let expired: Vec<f64> = sheddable
        .shed
        .iter()
        .filter(|(c, _)| c == "evicted_ttl")
        .map(|(_, w)| *w)
        .collect();
    assert!(!expired.is_empty(), "no sheddable request reached its TTL");
    assert!(expired.iter().all(|w| *w >= TTL), "{expired:?}");
    assert!(
        sheddable
            .shed
            .iter()
            .all(|(c, _)| c != "evicted_no_endpoints"),
        "a sheddable request got 503 with the worker up"
    );
    // The router's own counts agree with what the clients saw.
    assert_eq!(
        metric(
            &m,
            "llmd_router:flow_control_requests_total",
            "priority=\"-1\",outcome=\"evicted_ttl\""
        ) as usize,
        expired.len(),
        "{m}"
    );
    assert_eq!(
        metric(&m, "inference_extension_flow_control_queue_size", ""),
        0.0,
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
