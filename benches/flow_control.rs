//! Flow control on vs off, in one run, on this machine: a slice of the Azure LLM conversation
//! trace (../shared/traces/azure-llm-2023-conv.csv: arrival times, prompt and output lengths)
//! replayed at 2× the measured capacity of one `llmd serve` worker (stories260K, CPU,
//! `--max-num-seqs 4 --scheduling-policy priority`) behind `llmd route`, 20 % of requests
//! priority 10, 60 % priority 0, 20 % priority −1 (an `--objectives` file).
//!
//! - on: `llmd route` with flow control (the router holds what the worker cannot start, at most
//!   4 in flight for priority ≤ 0, 8 for priority 10, a 10 s TTL) and the priority forwarded
//!   to the worker;
//! - off: `--flow-control off --no-forward-priority` (the router before flow control: every
//!   request straight to the worker, which serves them in arrival order).
//!
//! Prints per priority TTFT p50/p99 (of the requests served) and the share shed, and the
//! ratio of priority 10's p99 TTFT on/off (goal ≤ 1/3).
//!
//! Lengths are scaled to stories260K's 512-token context: prompt = ContextTokens / 4 (at most
//! 320, at least 8), output = min(GeneratedTokens, 160). Arrival gaps are the trace's, scaled so
//! the slice's mean rate is 2× capacity.
//!
//! `cargo bench --bench flow_control` (env: FLOW_BENCH_SECS, seconds of arrivals per mode,
//! default 40; FLOW_BENCH_OFFSET, first trace line, default 0).
#[path = "support/env.rs"]
mod env;
#[path = "../tests/common/process.rs"]
mod process;
use env::env_or;
use process::{Echo, LlmdProcess};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SEQS: usize = 4;
const PRIORITIES: [(i32, &str); 3] = [(10, "critical"), (0, "standard"), (-1, "batch")];

fn spawn(args: &[&str]) -> LlmdProcess {
    LlmdProcess::spawn(
        &args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "warn,llmd::server=info,llmd::router::route=info",
        Echo::Errors,
        Duration::from_secs(120),
    )
}

struct Req {
    /// Seconds from the slice's start (before scaling).
    at: f64,
    prompt: usize,
    gen: usize,
}

fn trace(offset: usize) -> Vec<Req> {
    let path = format!(
        "{}/../shared/traces/azure-llm-2023-conv.csv",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Vec::new();
    let mut t0 = None;
    for line in text.lines().skip(1 + offset) {
        let f: Vec<&str> = line.split(',').collect();
        let (Some(ts), Some(ctx), Some(gen)) = (f.first(), f.get(1), f.get(2)) else {
            continue;
        };
        // `YYYY-MM-DD HH:MM:SS.fffffff`: seconds of the day are enough inside one hour.
        let Some(clock) = ts.split(' ').nth(1) else {
            continue;
        };
        let hms: Vec<f64> = clock.split(':').filter_map(|x| x.parse().ok()).collect();
        if hms.len() != 3 {
            continue;
        }
        let t = hms[0] * 3600.0 + hms[1] * 60.0 + hms[2];
        let t0 = *t0.get_or_insert(t);
        let (ctx, gen): (usize, usize) = (ctx.parse().unwrap_or(0), gen.parse().unwrap_or(0));
        out.push(Req {
            at: t - t0,
            prompt: (ctx / 4).clamp(8, 320),
            gen: gen.clamp(1, 160),
        });
    }
    out
}

fn body(r: &Req, i: usize, stream: bool) -> Value {
    // A fixed pseudo-random prompt of exactly `r.prompt` token ids.
    let ids: Vec<u32> = (0..r.prompt)
        .map(|k| 3 + ((i * 7919 + k * 104_729) % 500) as u32)
        .collect();
    json!({"prompt": ids, "max_tokens": r.gen, "min_tokens": r.gen, "ignore_eos": true,
           "temperature": 0, "stream": stream})
}

/// Seconds to the first token, or the refusal's status.
async fn send(http: &reqwest::Client, url: &str, objective: &str, b: Value) -> Result<f64, u16> {
    use futures_util::StreamExt;
    let t0 = Instant::now();
    let r = http
        .post(url)
        .header("x-gateway-inference-objective", objective)
        .json(&b)
        .send()
        .await
        .expect("request");
    if r.status() != 200 {
        return Err(r.status().as_u16());
    }
    let mut s = r.bytes_stream();
    let mut first = None;
    while let Some(c) = s.next().await {
        let c = c.expect("stream");
        if first.is_none() && c.windows(6).any(|w| w == b"\"text\"") {
            first = Some(t0.elapsed().as_secs_f64());
        }
    }
    first.ok_or(599)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Replays `reqs` (times already scaled) against `url`; TTFTs and refusals by priority.
async fn replay(
    http: &reqwest::Client,
    url: &str,
    reqs: &[(f64, Req)],
) -> BTreeMap<i32, (Vec<f64>, usize)> {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, (at, r)) in reqs.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_secs_f64(*at)).await;
        let (p, objective) = match i % 5 {
            0 => PRIORITIES[0],
            4 => PRIORITIES[2],
            _ => PRIORITIES[1],
        };
        let (http, url, b) = (http.clone(), url.to_string(), body(r, i, true));
        tasks.push(tokio::spawn(async move {
            (p, send(&http, &url, objective, b).await)
        }));
    }
    let mut out: BTreeMap<i32, (Vec<f64>, usize)> = BTreeMap::new();
    for t in tasks {
        let (p, r) = t.await.expect("task");
        let e = out.entry(p).or_default();
        match r {
            Ok(t) => e.0.push(t),
            Err(_) => e.1 += 1,
        }
    }
    out
}

fn main() {
    let model = format!(
        "{}/../shared/models/stories260K",
        env!("CARGO_MANIFEST_DIR")
    );
    let secs: f64 = env_or("FLOW_BENCH_SECS", 40.0);
    let offset: usize = env_or("FLOW_BENCH_OFFSET", 0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let seqs = SEQS.to_string();
        let w = spawn(&[
            "serve", "--host", "127.0.0.1", "--port", "0", "--model", &model,
            "--kv-cache-memory-gb", "0.1", "--max-num-seqs", &seqs,
            "--scheduling-policy", "priority",
        ]);
        w.wait_healthy("/health", Duration::from_secs(120)).await;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()
            .unwrap();
        let all = trace(offset);

        // Capacity: SEQS requests of the trace at a time, straight on the worker, for 8 s.
        let t0 = Instant::now();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let all = std::sync::Arc::new(all);
        let loops: Vec<_> = (0..SEQS)
            .map(|_| {
                let (http, url, next, all) =
                    (http.clone(), w.url("/v1/completions"), next.clone(), all.clone());
                tokio::spawn(async move {
                    while t0.elapsed() < Duration::from_secs(8) {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let r = http.post(&url).json(&body(&all[i], i, false)).send().await.unwrap();
                        assert_eq!(r.status(), 200);
                        r.bytes().await.unwrap();
                    }
                })
            })
            .collect();
        for l in loops {
            l.await.unwrap();
        }
        let done = next.load(std::sync::atomic::Ordering::Relaxed);
        let capacity = done as f64 / t0.elapsed().as_secs_f64();
        let rate = 2.0 * capacity;
        let n = (rate * secs) as usize;
        let all = std::sync::Arc::try_unwrap(all).ok().unwrap();
        let slice: Vec<Req> = all.into_iter().take(n).collect();
        let span = slice.last().map_or(1.0, |r| r.at).max(1e-3);
        // Scale the slice's gaps so it lasts n / rate seconds.
        let scale = (n as f64 / rate) / span;
        println!(
            "capacity {capacity:.1} req/s ({SEQS} at a time); replaying trace lines {}..{} ({:.0} s of the trace) in {:.0} s: {rate:.1} req/s, 2x capacity",
            offset + 1,
            offset + n,
            span,
            span * scale
        );
        let dir = std::env::temp_dir().join(format!("llmd-flow-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let objectives = dir.join("objectives.yaml");
        let yaml: Vec<String> = PRIORITIES
            .iter()
            .map(|(p, name)| format!("apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {{name: {name}}}\nspec: {{poolRef: {{name: stories}}, priority: {p}}}\n"))
            .collect();
        std::fs::write(&objectives, yaml.join("---\n")).unwrap();
        let obj = objectives.to_str().unwrap().to_string();
        let mut results = Vec::new();
        for mode in ["on", "off"] {
            let mut a = vec![
                "route", "--host", "127.0.0.1", "--port", "0", "--model", &model,
                "--worker", &w.base, "--objectives", &obj, "--scrape-interval", "0.05",
                "--worker-timeout", "600",
            ];
            if mode == "on" {
                a.extend(["--flow-max-concurrency", &seqs, "--flow-priority-headroom", "1",
                          "--flow-default-request-ttl", "10"]);
            } else {
                a.extend(["--flow-control", "off", "--no-forward-priority"]);
            }
            let r = spawn(&a);
            r.wait_healthy("/health", Duration::from_secs(60)).await;
            let reqs: Vec<(f64, Req)> = slice
                .iter()
                .map(|q| (q.at * scale, Req { at: q.at, prompt: q.prompt, gen: q.gen }))
                .collect();
            let t = Instant::now();
            let out = replay(&http, &r.url("/v1/completions"), &reqs).await;
            println!("flow control {mode}: {} requests in {:.0} s", reqs.len(), t.elapsed().as_secs_f64());
            results.push((mode, out));
            drop(r);
        }
        println!("\n{:<5} {:>9} {:>13} {:>13} {:>8}", "mode", "priority", "TTFT p50 ms", "TTFT p99 ms", "shed");
        let mut p99_10 = [f64::NAN; 2];
        for (k, (mode, out)) in results.iter_mut().enumerate() {
            for (p, (ttfts, shed)) in out.iter_mut().rev() {
                let total = ttfts.len() + *shed;
                let (p50, p99) = (pct(ttfts, 0.5), pct(ttfts, 0.99));
                if *p == 10 {
                    p99_10[k] = p99;
                }
                println!(
                    "{mode:<5} {p:>9} {:>13.1} {:>13.1} {:>7.1}%",
                    p50 * 1e3,
                    p99 * 1e3,
                    100.0 * *shed as f64 / total.max(1) as f64
                );
            }
        }
        println!(
            "\npriority 10 p99 TTFT on/off: {:.3} (goal <= 0.333)",
            p99_10[0] / p99_10[1]
        );
        let _ = std::fs::remove_dir_all(&dir);
    });
}
