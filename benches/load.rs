//! Load generator for `llmd serve`: streaming completions arriving as a Poisson process at a
//! sweep of request rates, against the real binary over loopback HTTP.
//!
//! Prints, per rate: achieved request rate, output tokens/s, p50/p99 time to first token and
//! p50/p99 inter-token latency, and the output throughput as a fraction of the same engine's
//! offline throughput (all requests handed to `Engine::generate` at once, in-process, measured
//! in the same run) — the limit the server can at best reach on this machine.
//!
//! Knobs (environment): `LLMD_LOAD_MODEL` (model dir, default the shared stories260K),
//! `LLMD_LOAD_REQUESTS` (per rate, default 120), `LLMD_LOAD_MAX_TOKENS` (default 64),
//! `LLMD_LOAD_RATES` (comma list of req/s; default fractions 0.25/0.5/0.75/1.0/1.5 of the offline
//! request rate, then `inf` = all at once).
#[path = "support/env.rs"]
mod env;
#[path = "../tests/common/process.rs"]
mod process;
use env::env_usize;
use process::{Echo, LlmdProcess};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PROMPTS: &[&str] = &[
    "Once upon a time",
    "The little dog ran to the park and",
    "Lily and Ben were best friends. One day",
    "Tom had a red ball. He",
    "There was a big tree in the garden. Every morning the birds",
    "Sue wanted to bake a cake for her mom, so she",
];

/// `llmd serve` on `model` (port 0), quiet.
fn start_server(model: &Path) -> LlmdProcess {
    let args = [
        "serve".to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        "0".into(),
        "--model".into(),
        model.display().to_string(),
    ];
    LlmdProcess::spawn(
        &args,
        "warn,llmd::server=info",
        Echo::Silent,
        Duration::from_secs(120),
    )
}

/// One streamed request's timings.
#[derive(Default)]
struct Sample {
    ttft: f64,
    itl: Vec<f64>,
    output_tokens: usize,
    ok: bool,
}

async fn one_request(
    client: reqwest::Client,
    url: String,
    prompt: &str,
    max_tokens: usize,
) -> Sample {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true,
                      "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let start = Instant::now();
    let mut s = Sample::default();
    let Ok(mut r) = client.post(url).json(&body).send().await else {
        return s;
    };
    if r.status() != 200 {
        return s;
    }
    let mut buf = String::new();
    let mut last: Option<Instant> = None;
    while let Ok(Some(chunk)) = r.chunk().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                s.ok = s.output_tokens == max_tokens;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                s.output_tokens = n as usize;
            }
            let has_token = v["choices"]
                .get(0)
                .is_some_and(|c| c["text"].as_str().is_some_and(|t| !t.is_empty()));
            if has_token {
                let now = Instant::now();
                match last {
                    None => s.ttft = (now - start).as_secs_f64(),
                    Some(l) => s.itl.push((now - l).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    s
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

/// Output tokens/s of the engine run in-process with every request submitted at once.
fn offline_throughput(model: &Path, n: usize, max_tokens: usize) -> f64 {
    let engine = llmd::Engine::new(llmd::EngineConfig::new(model)).expect("engine");
    let params = llmd::SamplingParams {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..llmd::SamplingParams::greedy()
    };
    let prompts: Vec<llmd::Prompt> = (0..n).map(|i| PROMPTS[i % PROMPTS.len()].into()).collect();
    let t = Instant::now();
    let out = engine.generate(prompts, &params).expect("generate");
    let tokens: usize = out.iter().map(|o| o.token_ids.len()).sum();
    tokens as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let model = std::env::var_os("LLMD_LOAD_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/stories260K")
        });
    if !model.join("config.json").exists() {
        eprintln!("skipping: no model at {}", model.display());
        return;
    }
    let n = env_usize("LLMD_LOAD_REQUESTS", 120);
    let max_tokens = env_usize("LLMD_LOAD_MAX_TOKENS", 64);
    let offline = offline_throughput(&model, n, max_tokens);
    let offline_rps = offline / max_tokens as f64;
    let rates: Vec<f64> = match std::env::var("LLMD_LOAD_RATES") {
        Ok(s) => s
            .split(',')
            .map(|r| r.trim().parse().expect("LLMD_LOAD_RATES: numbers or inf"))
            .collect(),
        Err(_) => [0.25, 0.5, 0.75, 1.0, 1.5]
            .iter()
            .map(|f| f * offline_rps)
            .chain([f64::INFINITY])
            .collect(),
    };
    let server = start_server(&model);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = reqwest::Client::new();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !matches!(reqwest::get(format!("{}/health", server.base)).await, Ok(r) if r.status() == 200)
        {
            assert!(Instant::now() < deadline, "server not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    println!(
        "llmd serve load: model {}, {n} streaming completions per rate, {max_tokens} output tokens each",
        model.display()
    );
    println!("offline limit (Engine::generate, all at once, same machine): {offline:.1} output tok/s ({offline_rps:.2} req/s)");
    println!(
        "{:>10} {:>9} {:>6} {:>11} {:>8} {:>9} {:>9} {:>8} {:>8}",
        "rate req/s",
        "got req/s",
        "ok",
        "out tok/s",
        "vs limit",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99"
    );
    let url = format!("{}/v1/completions", server.base);
    for (ri, &rate) in rates.iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(ri as u64);
        let start = Instant::now();
        let samples: Vec<Sample> = rt.block_on(async {
            let mut tasks = Vec::with_capacity(n);
            let mut at = 0.0f64;
            for i in 0..n {
                if rate.is_finite() {
                    // Exponential inter-arrival times: a Poisson process at `rate`.
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    at += -(1.0 - u).ln() / rate;
                    let wait = Duration::from_secs_f64(at).saturating_sub(start.elapsed());
                    tokio::time::sleep(wait).await;
                }
                let prompt = PROMPTS[i % PROMPTS.len()];
                tasks.push(tokio::spawn(one_request(
                    client.clone(),
                    url.clone(),
                    prompt,
                    max_tokens,
                )));
            }
            let mut out = Vec::with_capacity(n);
            for t in tasks {
                out.push(t.await.unwrap_or_default());
            }
            out
        });
        let elapsed = start.elapsed().as_secs_f64();
        let ok = samples.iter().filter(|s| s.ok).count();
        let tokens: usize = samples.iter().map(|s| s.output_tokens).sum();
        let mut ttft: Vec<f64> = samples.iter().filter(|s| s.ok).map(|s| s.ttft).collect();
        let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.itl.iter().copied()).collect();
        let tok_s = tokens as f64 / elapsed;
        println!(
            "{:>10} {:>9.2} {:>6} {:>11.1} {:>7.2}x {:>7.1}ms {:>7.1}ms {:>6.2}ms {:>6.2}ms",
            if rate.is_finite() {
                format!("{rate:.2}")
            } else {
                "inf".into()
            },
            n as f64 / elapsed,
            format!("{ok}/{n}"),
            tok_s,
            tok_s / offline,
            percentile(&mut ttft, 0.5) * 1e3,
            percentile(&mut ttft, 0.99) * 1e3,
            percentile(&mut itl, 0.5) * 1e3,
            percentile(&mut itl, 0.99) * 1e3,
        );
    }
}
