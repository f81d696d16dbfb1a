//! End-to-end decode on the GPU: batch-1 tokens/s as a fraction of the bandwidth roofline
//! (each token reads every weight once: roofline = copy bandwidth / weight bytes), batch-N
//! throughput, and where a step's time goes: the engine's wall time per step next to the
//! device-clock time of its kernels (CUDA events), so the host's share is visible without a
//! profiler. Printed in a form `benches/decode_vs_transformers.py` reads to compare with
//! Hugging Face transformers `generate` on the same GPU and model in the same run.
//!
//! Knobs (environment): `LLMD_BENCH_MODEL` (default: the first complete shared model),
//! `LLMD_BENCH_BATCH` (64), `LLMD_BENCH_GEN` (128 new tokens), `LLMD_BENCH_KV_GB` (KV cache
//! GiB; default: sized from GPU memory), `LLMD_BENCH_MAX_MODEL_LEN`, `LLMD_BENCH_EAGER=1` (no
//! CUDA graphs), `LLMD_BENCH_KV_OFFLOAD_GB` (a host KV tier of that many GiB: every committed
//! block is copied out after its step, as `--kv-offloading-size`; compare the step times with
//! a run without it). `benches/mk_models.py` writes random-weight models of the shapes in
//! BENCHMARKS.md. Without a CUDA device it says so and exits 0.
//! Run: `cargo bench --bench gpu_decode`.
#[path = "support/env.rs"]
mod env;
#[path = "support/gpu.rs"]
mod gpu;

use llmd::backend::cuda::{driver_available, CudaBackend};
use llmd::config::DeviceKind;
use llmd::engine::Counters;
use llmd::{Engine, EngineConfig, Prompt, SamplingParams};
use std::path::PathBuf;
use std::time::Instant;

const PROMPT: &str = "Once upon a time, in a small village by the sea, there lived";

fn model_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LLMD_BENCH_MODEL") {
        return Some(PathBuf::from(d));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models");
    ["smollm2-135m-instruct", "stories260K"]
        .iter()
        .map(|n| root.join(n))
        .find(|d| llmd::model::WeightFiles::open(d).is_ok())
}

/// Bytes of the weights as the GPU holds them (bf16): 2 per parameter.
fn weight_bytes(dir: &std::path::Path) -> usize {
    let files = llmd::model::WeightFiles::open(dir).expect("weights");
    files.total_elements() * 2
}

/// Per-step figures between two counter snapshots, in µs.
struct StepTimes {
    steps: u64,
    wall_us: f64,
    model_us: f64,
    gpu_us: f64,
}

impl StepTimes {
    fn between(a: &Counters, b: &Counters) -> Self {
        let steps = (b.steps - a.steps).max(1);
        let per = |x: u64, y: u64| (y - x) as f64 / steps as f64 / 1e3;
        StepTimes {
            steps,
            wall_us: per(a.step_ns, b.step_ns),
            model_us: per(a.model_ns, b.model_ns),
            gpu_us: per(a.device_ns, b.device_ns),
        }
    }

    fn line(&self, what: &str) -> String {
        format!(
            "{what} steps={} step_us={:.1} model_call_us={:.1} gpu_us={:.1} host_us={:.1}",
            self.steps,
            self.wall_us,
            self.model_us,
            self.gpu_us,
            self.wall_us - self.gpu_us
        )
    }
}

fn main() {
    if !driver_available() {
        println!("gpu_decode: no CUDA driver on this machine; nothing to measure");
        return;
    }
    let Some(dir) = model_dir() else {
        println!("gpu_decode: no complete model");
        return;
    };
    let batch = env::env_usize("LLMD_BENCH_BATCH", 64);
    let gen = env::env_usize("LLMD_BENCH_GEN", 128);
    // Copy bandwidth of this device, measured now.
    let copy_bw = {
        let g = CudaBackend::new(0).expect("CUDA device");
        gpu::copy_bandwidth(&g, 256 << 20, 10) // 512 MiB of bf16
    };
    let mut cfg = EngineConfig::new(&dir);
    cfg.device = DeviceKind::Cuda(0);
    cfg.enforce_eager = env::env_usize("LLMD_BENCH_EAGER", 0) == 1;
    if let Ok(g) = std::env::var("LLMD_BENCH_KV_GB") {
        let g: f64 = g.parse().expect("LLMD_BENCH_KV_GB: GiB");
        cfg.cache.kv_cache_memory_bytes = Some((g * (1u64 << 30) as f64) as usize);
    }
    if let Ok(g) = std::env::var("LLMD_BENCH_KV_OFFLOAD_GB") {
        let g: f64 = g.parse().expect("LLMD_BENCH_KV_OFFLOAD_GB: GiB");
        cfg.kv_tiers.host_bytes = (g * (1u64 << 30) as f64) as usize;
    }
    if let Ok(n) = std::env::var("LLMD_BENCH_MAX_MODEL_LEN") {
        cfg.max_model_len = Some(n.parse().expect("LLMD_BENCH_MAX_MODEL_LEN: tokens"));
    }
    let started = Instant::now();
    let engine = Engine::new(cfg).expect("engine on cuda:0");
    let limits = engine.limits().clone();
    println!("model {}", dir.display());
    println!(
        "engine start_s={:.1} kv_blocks={} kv_tokens={} max_model_len={}",
        started.elapsed().as_secs_f64(),
        limits.num_blocks,
        limits.num_blocks * limits.block_size,
        limits.max_model_len
    );
    let params = SamplingParams {
        max_tokens: Some(gen),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    // Batch 1: time between the first and the last token (prefill excluded), best of 3; the
    // step figures are those of the last run's decode steps.
    let mut best_b1 = 0f64;
    let mut b1_steps = None;
    let mut interval_us = 0f64;
    for _ in 0..3 {
        let mut h = engine
            .add_request(PROMPT.into(), params.clone())
            .expect("request");
        let (mut first, mut last, mut n) = (None, Instant::now(), 0usize);
        let mut at_first = None;
        while let Some(d) = h.next_blocking() {
            n += d.expect("delta").new_token_ids.len();
            last = Instant::now();
            if first.is_none() {
                first = Some(last);
                at_first = Some(engine.stats().counters);
            }
        }
        let secs = (last - first.unwrap()).as_secs_f64();
        let tok_s = (n - 1) as f64 / secs;
        if tok_s > best_b1 {
            best_b1 = tok_s;
            interval_us = secs / (n - 1) as f64 * 1e6;
            // The engine publishes its stats after each step; let the last one land.
            std::thread::sleep(std::time::Duration::from_millis(20));
            b1_steps = Some(StepTimes::between(
                &at_first.unwrap(),
                &engine.stats().counters,
            ));
        }
    }
    let wbytes = weight_bytes(&dir);
    let roofline = copy_bw / wbytes as f64;
    println!(
        "batch1 tok_s={best_b1:.1} roofline_tok_s={roofline:.1} fraction={:.2} weight_mb={:.1} copy_gb_s={:.1}",
        best_b1 / roofline,
        wbytes as f64 / 1e6,
        copy_bw / 1e9
    );
    if let Some(t) = b1_steps {
        println!(
            "{} token_interval_us={interval_us:.1}",
            t.line("batch1_decode_step")
        );
    }
    // Batch N: wall time of the whole generation, and its steps.
    let prompts: Vec<Prompt> = (0..batch).map(|_| PROMPT.into()).collect();
    engine.generate(prompts.clone(), &params).expect("warm-up");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let before = engine.stats().counters;
    let t = Instant::now();
    let out = engine.generate(prompts, &params).expect("generate");
    let secs = t.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let steps = StepTimes::between(&before, &engine.stats().counters);
    let tokens: usize = out.iter().map(|o| o.token_ids.len()).sum();
    let prompt_len = llmd::engine::tokenize(
        engine.tokenizer(),
        &PROMPT.into(),
        engine.limits().vocab_size,
    )
    .expect("the prompt tokenizes")
    .len();
    println!(
        "batch64 gen={gen} tok_s={:.1} batch={batch}",
        tokens as f64 / secs
    );
    println!("{}", steps.line(&format!("batch{batch}_step")));
    // What one decode step must read at the least: every weight once, and each sequence's
    // K and V at its mean context over the run.
    let cfg = engine.limits();
    let m = llmd::model::ModelConfig::from_dir(&dir).expect("config");
    let kv_per_token = m.num_hidden_layers * 2 * m.num_key_value_heads * m.head_dim * 2;
    let mean_ctx = prompt_len + gen / 2;
    let step_bytes = wbytes + batch * mean_ctx * kv_per_token;
    let bytes_us = step_bytes as f64 / copy_bw * 1e6;
    println!(
        "batch{batch}_step_vs_bytes gpu_over_bytes={:.2} step_over_bytes={:.2} bytes_floor_us={bytes_us:.1} (weights {:.1} MB + KV {:.1} MB per step, block_size {})",
        steps.gpu_us / bytes_us,
        steps.wall_us / bytes_us,
        wbytes as f64 / 1e6,
        (batch * mean_ctx * kv_per_token) as f64 / 1e6,
        cfg.block_size
    );
}
