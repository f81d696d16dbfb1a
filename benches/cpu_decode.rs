//! CPU decode throughput: llmd vs candle-transformers' Llama on the same weights, in one run.
//!
//! For each model and batch size (1 and 16): `batch` distinct random prompts of PROMPT tokens are
//! prefilled, then GEN greedy tokens are decoded; the figure is decode tokens per second (all
//! sequences) over the decode phase only. Prints both figures and llmd / candle, and llmd's
//! engine time per decode step outside the model call (scheduling, plans, sampling, outputs:
//! what the CUDA path adds its own host work to).
//!
//! Models: the shared real models that are complete, plus a random-weight model with
//! SmolLM2-135M's exact shape (so the figure is meaningful while that checkpoint is incomplete).
//! Each figure is the best of LLMD_BENCH_REPEAT runs (default 3), for both engines alike.
//! Run: `cargo bench --bench cpu_decode` (LLMD_BENCH_GEN, LLMD_BENCH_PROMPT override lengths;
//! LLMD_BENCH_MODELS=a,b limits the models by name prefix).
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/env.rs"]
mod env;
use env::env_usize;

use candle_core::{DType as CDType, Device, Tensor};
use candle_transformers::models::llama as cllama;
use llmd::engine::{EngineCore, Prompt};
use llmd::{EngineConfig, RequestId, SamplingParams};
use std::path::Path;
use std::time::Instant;

fn prompts(batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut s = 12345u64;
    (0..batch)
        .map(|_| {
            (0..len)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // Skip the first ids (special tokens).
                    (3 + (s >> 33) % (vocab as u64 - 3)) as u32
                })
                .collect()
        })
        .collect()
}

/// Decode tokens/s of llmd.
/// Decode tokens/s of llmd, and the engine's µs per decode step outside the model call.
fn llmd_decode(dir: &Path, ps: &[Vec<u32>], gen: usize) -> (f64, f64) {
    let mut c = EngineConfig::new(dir);
    c.max_model_len = Some(ps[0].len() + gen + 1);
    c.scheduler.max_num_seqs = ps.len();
    c.scheduler.max_num_batched_tokens = ps.len() * ps[0].len();
    c.cache.num_blocks = Some(ps.len() * (ps[0].len() + gen).div_ceil(16) + 8);
    let mut core = EngineCore::new(c).unwrap();
    let params = SamplingParams {
        max_tokens: Some(gen),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    for (i, p) in ps.iter().enumerate() {
        core.add_request(
            RequestId(format!("b{i}")),
            &Prompt::Tokens(p.clone()),
            params.clone(),
            0,
        )
        .unwrap();
    }
    // Prefill: every prompt fits the budget, so one step samples every first token.
    let first = core.step().unwrap();
    assert_eq!(first.len(), ps.len());
    let (before, start) = (core.counters(), Instant::now());
    let mut tokens = 0;
    while core.has_unfinished_requests() {
        tokens += core.step().unwrap().len();
    }
    let rate = tokens as f64 / start.elapsed().as_secs_f64();
    let after = core.counters();
    let engine_ns = (after.step_ns - before.step_ns) - (after.model_ns - before.model_ns);
    let steps = (after.steps - before.steps).max(1);
    (rate, engine_ns as f64 / steps as f64 / 1e3)
}

/// Decode tokens/s of candle-transformers' Llama (f32, KV cache on).
fn candle_decode(dir: &Path, ps: &[Vec<u32>], gen: usize) -> f64 {
    let dev = Device::Cpu;
    let cfg: cllama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&files, CDType::F32, &dev).unwrap()
    };
    let model = cllama::Llama::load(vb, &cfg).unwrap();
    let mut cache = cllama::Cache::new(true, CDType::F32, &cfg, &dev).unwrap();
    let (b, n) = (ps.len(), ps[0].len());
    let flat: Vec<u32> = ps.concat();
    let input = Tensor::from_vec(flat, (b, n), &dev).unwrap();
    let mut logits = model.forward(&input, 0, &mut cache).unwrap();
    let start = Instant::now();
    for i in 0..gen - 1 {
        let next = logits.argmax(candle_core::D::Minus1).unwrap();
        let next = next.reshape((b, 1)).unwrap();
        logits = model.forward(&next, n + i, &mut cache).unwrap();
    }
    // Make sure the last step's work is done.
    let _ = logits
        .argmax(candle_core::D::Minus1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    (b * (gen - 1)) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let prompt_len = env_usize("LLMD_BENCH_PROMPT", 32);
    let gen = env_usize("LLMD_BENCH_GEN", 128);
    let repeat = env_usize("LLMD_BENCH_REPEAT", 3);
    let selected = env::model_selected;
    let mut models: Vec<(String, std::path::PathBuf)> = Vec::new();
    for name in ["stories260K", "smollm2-135m-instruct"] {
        if !selected(name) {
            continue;
        }
        if let Some(dir) = common::shared_model(name) {
            models.push((name.to_string(), dir));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    if selected("random") && common::shared_model("smollm2-135m-instruct").is_none() {
        let mut spec = common::TinyModelSpec::new(common::Arch::SmolLm);
        spec.hidden = 576;
        spec.layers = 30;
        spec.heads = 9;
        spec.kv_heads = 3;
        spec.intermediate = 1536;
        spec.vocab = 49152;
        spec.max_pos = 2048;
        spec.dtype = common::DType::BF16;
        common::write_tiny_model(tmp.path(), &spec);
        models.push((
            "random SmolLM2-135M shape (bf16)".into(),
            tmp.path().to_path_buf(),
        ));
    }
    println!(
        "CPU decode, prompt {prompt_len} tokens, {gen} generated, best of {repeat}, threads {}",
        rayon::current_num_threads()
    );
    println!(
        "{:<36} {:>5} {:>12} {:>12} {:>8} {:>15}",
        "model", "batch", "llmd tok/s", "candle tok/s", "ratio", "engine us/step"
    );
    for (name, dir) in &models {
        let vocab: usize = {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            v["vocab_size"].as_u64().unwrap() as usize
        };
        for batch in [1, 16] {
            let ps = prompts(batch, prompt_len, vocab);
            let runs: Vec<(f64, f64)> = (0..repeat).map(|_| llmd_decode(dir, &ps, gen)).collect();
            let ours = runs.iter().map(|r| r.0).fold(0.0, f64::max);
            let engine_us = runs.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
            let theirs = (0..repeat)
                .map(|_| candle_decode(dir, &ps, gen))
                .fold(0.0, f64::max);
            println!(
                "{name:<36} {batch:>5} {ours:>12.1} {theirs:>12.1} {:>7.2}x {engine_us:>15.1}",
                ours / theirs
            );
        }
    }
}
