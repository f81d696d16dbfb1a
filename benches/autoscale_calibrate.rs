//! Calibrates the autoscaler's per-replica service model (`llmd::autoscale::capacity::Calibration`)
//! from the real engine on this machine, and writes it as the JSON the autoscale configs name.
//!
//! One `EngineCore` with `llmd serve`'s CPU defaults (max_num_seqs 256, 16-token blocks, the
//! 2 GiB CPU KV pool) except the token budget a step, `LLMD_BENCH_CHUNK` (default 256), which is
//! the calibration's `prefill_chunk_tokens` (serve with `--max-num-batched-tokens` of the same:
//! on two cores SmolLM2-135M prefills a few hundred tokens a second, so serve's 2048-token
//! budget would stall every decode sharing a step for seconds; 256 keeps that near one second).
//! Prompts are random token ids, so nothing hits the prefix cache. It measures:
//! - prefill: `LLMD_BENCH_PREFILL_REQUESTS` (4) prompts of `LLMD_BENCH_PREFILL_PROMPT` (1024,
//!   about the trace's mean) tokens, one output token each, so every step is a pure prefill
//!   chunk: tokens over the steps' wall time;
//! - decode: for each context `LLMD_BENCH_CONTEXTS` (64,256,1024 tokens a sequence), the
//!   largest batch of `LLMD_BENCH_BATCHES` (1,2,4,8,16) is prefilled, then its sequences are
//!   aborted down through the smaller batches; at each batch one untimed step, then
//!   `LLMD_BENCH_STEPS` (10) timed decode steps, whose median is the point's step time and
//!   whose mean context held (prompt + generated, all sequences) is its K;
//! - the fit `step = base + per_seq·B + per_ctx·K` (`capacity::fit_step_model`), printed point
//!   by point with its prediction and worst relative error; the steps that mixed decodes with a
//!   prefill chunk (while the decode batches were prefilled) are checked against
//!   `decode_step + chunk / prefill_tokens_per_s`, the simulator's additive model;
//! - `kv_capacity_tokens` (the blocks the engine allocated × block size) and `max_batch` (its
//!   max_num_seqs), read from the engine.
//!
//! `prefill_tokens_per_s` is stored net of the fitted step base (the simulator charges the base
//! to every step, a pure prefill step included); the raw rate is printed and in `source`.
//! Output: `LLMD_CALIBRATION_OUT`, default `deploy/autoscale/calibration-cpu-smollm2.json` (or
//! `calibration-cpu-<model>.json` for another model). Run it on a quiet machine (`uptime`);
//! the load average at start and end is printed and recorded in `source`.
//!
//! Run: `cargo bench --bench autoscale_calibrate` (`LLMD_BENCH_MODELS=stories260K` picks the
//! tiny model instead of smollm2-135m-instruct; contexts past its 512-token limit are dropped).
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/env.rs"]
mod env;
#[path = "support/splitmix.rs"]
mod splitmix;
use env::env_usize;

use llmd::autoscale::capacity::{fit_step_model, Calibration, StepPoint};
use llmd::engine::{EngineCore, Prompt};
use llmd::{EngineConfig, RequestId, SamplingParams};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// The env knobs this bench reads (recorded in the calibration's command line when set).
const KNOBS: &[&str] = &[
    "LLMD_BENCH_MODELS",
    "LLMD_BENCH_CHUNK",
    "LLMD_BENCH_PREFILL_PROMPT",
    "LLMD_BENCH_PREFILL_REQUESTS",
    "LLMD_BENCH_CONTEXTS",
    "LLMD_BENCH_BATCHES",
    "LLMD_BENCH_STEPS",
    "LLMD_CALIBRATION_OUT",
];

/// A comma-separated list of numbers from `name`, else `default`.
fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: {x:?} is not a number"))
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// `len` random token ids, skipping the first few (special tokens).
fn prompt(seed: &mut u64, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|_| (3 + splitmix::next(seed) % (vocab as u64 - 3)) as u32)
        .collect()
}

fn params(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Today's date and time in UTC, from the system clock (civil-from-days, Hinnant's algorithm).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// One timed step that mixed decodes with a prefill chunk.
struct MixedStep {
    decodes: f64,
    ctx_tokens: f64,
    prefill_tokens: f64,
    step_s: f64,
}

/// Steps a batch of pure prefill chunks: (prompt tokens, seconds, steps).
fn measure_prefill(
    core: &mut EngineCore,
    seed: &mut u64,
    vocab: usize,
    len: usize,
    requests: usize,
) -> (u64, f64, u64) {
    for i in 0..requests {
        core.add_request(
            RequestId(format!("prefill{i}")),
            &Prompt::Tokens(prompt(seed, len, vocab)),
            params(1),
            0,
        )
        .unwrap();
    }
    let (mut tokens, mut secs, mut steps) = (0u64, 0.0, 0u64);
    while core.has_unfinished_requests() {
        let before = core.counters().prompt_tokens_computed;
        let t = Instant::now();
        let out = core.step().unwrap();
        let dt = t.elapsed().as_secs_f64();
        for o in &out {
            assert_eq!(
                o.num_cached_tokens, 0,
                "a random prompt hit the prefix cache"
            );
            assert!(o.finished(), "a one-token request did not finish");
        }
        let n = core.counters().prompt_tokens_computed - before;
        if n > 0 {
            tokens += n;
            secs += dt;
            steps += 1;
        }
    }
    (tokens, secs, steps)
}

/// Output tokens a sequence of the decode phase may need: one a step while the others are
/// prefilled (at most one step per chunk and one per sequence), then every timed batch's steps.
fn decode_max_tokens(ctx: usize, chunk: usize, batches: &[usize], steps: usize) -> usize {
    let most = batches.iter().max().copied().unwrap_or(1);
    most * ctx.div_ceil(chunk) + most + batches.len() * (steps + 1) + 4
}

/// One context: prefills the largest batch, then times decode steps at each batch size,
/// aborting sequences down through the sizes. Returns the points (B, K, median step) and the
/// steps that mixed decodes with prefill chunks while the batch was prefilled.
fn measure_decode(
    core: &mut EngineCore,
    seed: &mut u64,
    vocab: usize,
    ctx: usize,
    chunk: usize,
    batches: &[usize],
    steps: usize,
) -> (Vec<StepPoint>, Vec<MixedStep>) {
    let most = *batches.iter().max().unwrap();
    let max_tokens = decode_max_tokens(ctx, chunk, batches, steps);
    let ids: Vec<RequestId> = (0..most)
        .map(|i| RequestId(format!("ctx{ctx}-seq{i}")))
        .collect();
    for id in &ids {
        core.add_request(
            id.clone(),
            &Prompt::Tokens(prompt(seed, ctx, vocab)),
            params(max_tokens),
            0,
        )
        .unwrap();
    }
    // Output tokens each sequence has so far (a decode step attends prompt + these).
    let mut generated: HashMap<RequestId, usize> = HashMap::new();
    let mut mixed = Vec::new();
    while generated.len() < most {
        let decoders: Vec<&RequestId> = ids.iter().filter(|i| generated.contains_key(i)).collect();
        let k: usize = decoders.iter().map(|i| ctx + generated[*i]).sum();
        let before = core.counters().prompt_tokens_computed;
        let t = Instant::now();
        let out = core.step().unwrap();
        let dt = t.elapsed().as_secs_f64();
        let prefilled = core.counters().prompt_tokens_computed - before;
        if !decoders.is_empty() && prefilled > 0 {
            mixed.push(MixedStep {
                decodes: decoders.len() as f64,
                ctx_tokens: k as f64,
                prefill_tokens: prefilled as f64,
                step_s: dt,
            });
        }
        for o in out {
            assert_eq!(
                o.num_cached_tokens, 0,
                "a random prompt hit the prefix cache"
            );
            generated.insert(o.request_id, o.num_output_tokens);
        }
    }
    let mut sizes = batches.to_vec();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let mut points = Vec::new();
    for b in sizes {
        for id in &ids[b..] {
            if generated.remove(id).is_some() {
                core.abort_request(id);
            }
        }
        let mut times = Vec::with_capacity(steps);
        let mut ks = Vec::with_capacity(steps);
        for timed in 0..=steps {
            let k: usize = generated.values().map(|g| ctx + g).sum();
            let t = Instant::now();
            let out = core.step().unwrap();
            let dt = t.elapsed().as_secs_f64();
            assert_eq!(
                out.len(),
                b,
                "a decode step of batch {b} did not decode every sequence"
            );
            for o in out {
                assert!(
                    !o.finished(),
                    "a sequence finished before its batch was timed"
                );
                generated.insert(o.request_id, o.num_output_tokens);
            }
            // The first step after a prefill or an abort is not timed (it reshapes the batch).
            if timed > 0 {
                times.push(dt);
                ks.push(k as f64);
            }
        }
        points.push(StepPoint {
            batch: b as f64,
            ctx_tokens: ks.iter().sum::<f64>() / ks.len() as f64,
            step_s: median(times),
        });
    }
    for id in generated.keys() {
        core.abort_request(id);
    }
    assert!(!core.has_unfinished_requests());
    (points, mixed)
}

fn main() {
    let chunk = env_usize("LLMD_BENCH_CHUNK", 256);
    let prefill_len = env_usize("LLMD_BENCH_PREFILL_PROMPT", 1024);
    let prefill_requests = env_usize("LLMD_BENCH_PREFILL_REQUESTS", 4);
    let contexts = env_list("LLMD_BENCH_CONTEXTS", &[64, 256, 1024]);
    let batches = env_list("LLMD_BENCH_BATCHES", &[1, 2, 4, 8, 16]);
    let steps = env_usize("LLMD_BENCH_STEPS", 10).max(1);
    assert!(
        chunk > 0 && prefill_len > 0 && prefill_requests > 0,
        "chunk, prefill prompt and requests must be positive"
    );
    assert!(
        !batches.is_empty() && batches.iter().all(|&b| b > 0),
        "LLMD_BENCH_BATCHES: positive batch sizes"
    );
    let Some((name, dir)) = ["smollm2-135m-instruct", "stories260K"]
        .into_iter()
        .filter(|n| env::model_selected(n))
        .find_map(|n| common::shared_model(n).map(|d| (n, d)))
    else {
        eprintln!("no shared model selected and complete: nothing to calibrate");
        return;
    };
    let load_start = loadavg();
    let model_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vocab = model_json["vocab_size"].as_u64().unwrap() as usize;
    let dtype = model_json["torch_dtype"]
        .as_str()
        .unwrap_or("?")
        .to_string();

    let mut cfg = EngineConfig::new(&dir);
    cfg.scheduler.max_num_batched_tokens = chunk;
    let mut core = EngineCore::new(cfg).unwrap();
    let limits = core.limits();
    let max_model_len = limits.max_model_len;
    let kv_capacity_tokens = (limits.num_blocks * limits.block_size) as f64;
    let (num_blocks, block_size) = (limits.num_blocks, limits.block_size);
    let max_batch = core.scheduler().config().max_num_seqs;
    let threads = rayon::current_num_threads();
    let cpu = cpu_model();

    let (contexts, dropped): (Vec<usize>, Vec<usize>) = contexts
        .into_iter()
        .partition(|&c| c + decode_max_tokens(c, chunk, &batches, steps) <= max_model_len);
    if !dropped.is_empty() {
        println!("contexts {dropped:?} dropped: past max_model_len {max_model_len}");
    }
    let prefill_len = prefill_len.min(max_model_len - 1);
    println!(
        "autoscale calibration: {name} ({dtype}) on {cpu}, {threads} threads; chunk {chunk} tokens, \
         KV {num_blocks} blocks x {block_size} = {kv_capacity_tokens} tokens, max_num_seqs {max_batch}; \
         load average {load_start}"
    );

    let mut seed = 0x5eed_ca1b_u64;
    // Warm-up (first-touch of weights and buffers), not counted.
    measure_prefill(&mut core, &mut seed, vocab, chunk.min(prefill_len), 1);
    let (p_tokens, p_secs, p_steps) =
        measure_prefill(&mut core, &mut seed, vocab, prefill_len, prefill_requests);
    let raw_prefill = p_tokens as f64 / p_secs;
    println!(
        "prefill: {p_tokens} tokens ({prefill_requests} prompts of {prefill_len}) in {p_steps} steps, \
         {:.1} ms a step: {raw_prefill:.0} tokens/s",
        p_secs / p_steps as f64 * 1e3
    );

    let mut points = Vec::new();
    let mut mixed = Vec::new();
    for &ctx in &contexts {
        let (p, m) = measure_decode(&mut core, &mut seed, vocab, ctx, chunk, &batches, steps);
        points.extend(p);
        mixed.extend(m);
    }
    let (base, per_seq, per_ctx) = fit_step_model(&points).unwrap_or_else(|| {
        panic!("the decode points cannot pin the step model (need ≥ 2 contexts and ≥ 2 batches)")
    });
    println!(
        "decode step fit: {:.3} ms + {:.4} ms per sequence + {:.3} us per context token \
         (least squares on relative error, {} points, median of {steps} steps each)",
        base * 1e3,
        per_seq * 1e3,
        per_ctx * 1e6,
        points.len()
    );
    println!(
        "{:>6} {:>8} {:>8} {:>12} {:>12} {:>8}",
        "batch", "K/seq", "K", "step ms", "fit ms", "error"
    );
    let mut worst: f64 = 0.0;
    for p in &points {
        let fit = base + per_seq * p.batch + per_ctx * p.ctx_tokens;
        let err = (fit - p.step_s) / p.step_s;
        worst = worst.max(err.abs());
        println!(
            "{:>6} {:>8.0} {:>8.0} {:>12.2} {:>12.2} {:>+7.1}%",
            p.batch,
            p.ctx_tokens / p.batch,
            p.ctx_tokens,
            p.step_s * 1e3,
            fit * 1e3,
            err * 1e2
        );
    }
    println!("worst relative error of the fit: {:.1}%", worst * 1e2);

    let prefill_net = p_tokens as f64 / (p_secs - base * p_steps as f64);
    assert!(
        prefill_net.is_finite() && prefill_net > 0.0,
        "the fitted step base exceeds the prefill steps' time"
    );
    println!(
        "prefill net of the step base: {prefill_net:.0} tokens/s (raw {raw_prefill:.0}; the \
         simulator charges base + chunk / rate to a prefill step)"
    );
    let mixed_summary = if mixed.is_empty() {
        "no mixed steps seen".to_string()
    } else {
        let errs: Vec<f64> = mixed
            .iter()
            .map(|m| {
                let model = base
                    + per_seq * m.decodes
                    + per_ctx * m.ctx_tokens
                    + m.prefill_tokens / prefill_net;
                (model - m.step_s) / m.step_s
            })
            .collect();
        let mean = errs.iter().sum::<f64>() / errs.len() as f64;
        let worst = errs.iter().fold(0.0f64, |w, e| w.max(e.abs()));
        format!(
            "{} steps mixing decodes with a prefill chunk: the additive model's error mean {:+.1}%, worst {:.1}%",
            errs.len(),
            mean * 1e2,
            worst * 1e2
        )
    };
    println!("{mixed_summary}");
    let load_end = loadavg();
    println!("load average at the end: {load_end}");

    let mut command: Vec<String> = KNOBS
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
        .collect();
    command.push("cargo bench --bench autoscale_calibrate".into());
    let command = command.join(" ");
    let cal = Calibration {
        source: format!(
            "Measured by benches/autoscale_calibrate.rs ({command}) on {} with {cpu}, {threads} threads, \
             load average {load_start} at start and {load_end} at the end; model {name} ({dtype}) with \
             llmd serve's CPU defaults and a {chunk}-token step budget (serve it with \
             --max-num-batched-tokens {chunk}). Prefill: {prefill_requests} prompts of {prefill_len} \
             tokens in {p_steps} pure-prefill steps, {raw_prefill:.0} tokens/s raw, stored net of the \
             fitted step base. Decode: median of {steps} steps at batches {batches:?} x contexts \
             {contexts:?} tokens a sequence, fitted by least squares on relative error, worst error \
             {:.1}%; {mixed_summary}. kv_capacity_tokens: the engine's {num_blocks} blocks x \
             {block_size} (its 2 GiB CPU KV default); max_batch: its max_num_seqs; max_model_len: \
             the engine's.",
            utc_now(),
            worst * 1e2
        ),
        prefill_tokens_per_s: prefill_net,
        step_base_s: base,
        step_per_seq_s: per_seq,
        step_per_ctx_token_s: per_ctx,
        kv_capacity_tokens,
        max_batch: max_batch as u32,
        prefill_chunk_tokens: chunk as u32,
        max_model_len: Some(max_model_len as u32),
    };
    cal.validate()
        .unwrap_or_else(|e| panic!("the measured calibration is not valid: {e}"));
    let out = std::env::var_os("LLMD_CALIBRATION_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let short = if name.starts_with("smollm2") {
                "smollm2"
            } else {
                name
            };
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(format!("deploy/autoscale/calibration-cpu-{short}.json"))
        });
    let text = serde_json::to_string_pretty(&cal).unwrap() + "\n";
    std::fs::write(&out, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
    println!("wrote {}", out.display());
}
