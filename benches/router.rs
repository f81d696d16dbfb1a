//! Prefix-aware routing vs round-robin, in one run, on this machine: 4 `llmd serve` workers
//! (SmolLM2-135M-Instruct, real weights, CPU) behind `llmd route`, a shared-prefix workload —
//! 8 system prompts of ~1k tokens, many users each asking a short question after one of them —
//! with Poisson arrivals. Each worker's KV pool holds about 3 system prompts, so spreading all
//! 8 over every worker (round-robin) evicts them, while the prefix-aware router keeps each on
//! the workers it is on. Prints p50/p99 time to first token and requests per second for both,
//! and the TTFT ratio.
//!
//! `cargo bench --bench router` (env: ROUTER_BENCH_REQUESTS, default 48; ROUTER_BENCH_RATE
//! req/s, default 0.5; ROUTER_BENCH_PROMPT_WORDS, default 800).
#[path = "support/env.rs"]
mod env;
#[path = "../tests/common/process.rs"]
mod process;
use env::env_or;
use process::{free_port, Echo, LlmdProcess};
use rand_core::{RngCore, SeedableRng};
use serde_json::json;
use std::time::{Duration, Instant};

/// `llmd <args>`, quiet but for errors.
fn spawn(args: &[String]) -> LlmdProcess {
    LlmdProcess::spawn(
        args,
        "warn,llmd::server=info,llmd::router::route=info",
        Echo::Errors,
        Duration::from_secs(120),
    )
}

async fn wait_healthy(p: &LlmdProcess) {
    p.wait_healthy("/health", Duration::from_secs(300)).await;
}

const WORDS: &[&str] = &[
    "the",
    "system",
    "assistant",
    "answers",
    "questions",
    "about",
    "orders",
    "shipping",
    "returns",
    "account",
    "billing",
    "policy",
    "customer",
    "product",
    "warranty",
    "service",
    "always",
    "never",
    "politely",
    "clearly",
    "briefly",
    "refund",
    "invoice",
    "delivery",
    "address",
    "payment",
    "card",
    "support",
    "ticket",
    "escalate",
    "manager",
    "hours",
    "weekend",
    "holiday",
    "discount",
    "coupon",
    "member",
    "points",
    "store",
    "online",
];

/// System prompt `i`: `words` words drawn with seed `i`.
fn system_prompt(i: u64, words: usize) -> String {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1000 + i);
    let mut s = format!("You are support agent number {i}. ");
    for k in 0..words {
        s.push_str(WORDS[(rng.next_u32() as usize) % WORDS.len()]);
        s.push(if k % 12 == 11 { '.' } else { ' ' });
    }
    s
}

struct Outcome {
    ttft: Vec<f64>,
    wall: f64,
    failed: usize,
}

async fn run_policy(round_robin: bool, model: &str, n: usize, rate: f64, words: usize) -> Outcome {
    let mut workers = Vec::new();
    let mut specs = Vec::new();
    for _ in 0..4 {
        let (pub_port, replay_port) = (free_port(), free_port());
        let events = format!(
            r#"{{"enable_kv_cache_events": true, "endpoint": "tcp://*:{pub_port}", "replay_endpoint": "tcp://*:{replay_port}"}}"#
        );
        let w = spawn(
            &[
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--model",
                model,
                "--threads",
                "1",
                "--kv-cache-memory-gb",
                "0.15",
                "--max-model-len",
                "2048",
                "--kv-events-config",
                &events,
            ]
            .map(String::from),
        );
        specs.push(format!(
            "{},events=tcp://127.0.0.1:{pub_port},replay=tcp://127.0.0.1:{replay_port}",
            w.base
        ));
        workers.push(w);
    }
    for w in &workers {
        wait_healthy(w).await;
    }
    let mut args: Vec<String> = [
        "route",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--model",
        model,
    ]
    .map(String::from)
    .to_vec();
    for s in &specs {
        args.push("--worker".into());
        args.push(s.clone());
    }
    if round_robin {
        args.push("--round-robin".into());
    }
    args.extend(["--worker-timeout", "600"].map(String::from));
    let router = spawn(&args);
    wait_healthy(&router).await;
    let prompts: Vec<String> = (0..8).map(|i| system_prompt(i, words)).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let client = reqwest::Client::new();
    let start = Instant::now();
    let mut at = 0.0f64;
    let mut tasks = Vec::new();
    for k in 0..n {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        at += -(1.0 - u).ln() / rate;
        let sys = &prompts[(rng.next_u32() as usize) % prompts.len()];
        let body = json!({
            "prompt": format!("{sys}\nUser {k}: where is my order number {}?\nAssistant:", rng.next_u32() % 100000),
            "max_tokens": 8, "temperature": 0, "stream": true,
        });
        let (client, url) = (client.clone(), format!("{}/v1/completions", router.base));
        let send_at = start + Duration::from_secs_f64(at);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(send_at.into()).await;
            let t0 = Instant::now();
            let mut resp = match client.post(url).json(&body).send().await {
                Ok(r) if r.status() == 200 => r,
                _ => return None,
            };
            let mut ttft = None;
            while let Ok(Some(chunk)) = resp.chunk().await {
                if ttft.is_none() && chunk.windows(5).any(|w| w == b"text\"") {
                    ttft = Some(t0.elapsed().as_secs_f64());
                }
            }
            ttft
        }));
    }
    let mut ttft = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some(v) => ttft.push(v),
            None => failed += 1,
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let m = reqwest::get(format!("{}/metrics", router.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let decided: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("llmd_router:decisions_total"))
        .collect();
    eprintln!(
        "{}: decisions {decided:?}",
        if round_robin {
            "round-robin"
        } else {
            "prefix-aware"
        }
    );
    ttft.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Outcome { ttft, wall, failed }
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let model = format!(
        "{}/../shared/models/smollm2-135m-instruct",
        env!("CARGO_MANIFEST_DIR")
    );
    if !std::path::Path::new(&model)
        .join("model.safetensors.index.json")
        .exists()
    {
        eprintln!("skipping: {model} is not there");
        return;
    }
    let n = env_or("ROUTER_BENCH_REQUESTS", 48usize);
    let rate = env_or("ROUTER_BENCH_RATE", 0.5f64);
    let words = env_or("ROUTER_BENCH_PROMPT_WORDS", 800usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let aware = rt.block_on(run_policy(false, &model, n, rate, words));
    let rr = rt.block_on(run_policy(true, &model, n, rate, words));
    println!(
        "4 workers (SmolLM2-135M, CPU, 1 thread each, 0.15 GiB KV each: 218 blocks of 16 tokens), 8 system prompts of {words} words, {n} requests, Poisson {rate} req/s, max_tokens 8"
    );
    println!("| policy | ok | failed | TTFT p50 | TTFT p99 | req/s |");
    println!("|---|---|---|---|---|---|");
    for (name, o) in [("prefix-aware", &aware), ("round-robin", &rr)] {
        println!(
            "| {name} | {} | {} | {:.0} ms | {:.0} ms | {:.3} |",
            o.ttft.len(),
            o.failed,
            pct(&o.ttft, 0.5) * 1e3,
            pct(&o.ttft, 0.99) * 1e3,
            o.ttft.len() as f64 / o.wall
        );
    }
    println!(
        "p50 TTFT round-robin / prefix-aware: {:.2}× (goal ≥ 3×); p99: {:.2}×",
        pct(&rr.ttft, 0.5) / pct(&aware.ttft, 0.5),
        pct(&rr.ttft, 0.99) / pct(&aware.ttft, 0.99)
    );
}
