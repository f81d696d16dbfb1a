//! End-to-end decode on the GPU: batch-1 tokens/s as a fraction of the bandwidth roofline
//! (each token reads every weight once: roofline = copy bandwidth / weight bytes), and batch-64
//! throughput, printed in a form `benches/decode_vs_transformers.py` reads to compare with
//! Hugging Face transformers `generate` on the same GPU and model in the same run.
//!
//! Model: `LLMD_BENCH_MODEL` or the first complete shared model (SmolLM2-135M, else
//! stories260K). Without a CUDA device it says so and exits 0.
//! Run: `cargo bench --bench gpu_decode`.
use llmd::backend::cuda::{driver_available, CudaBackend};
use llmd::backend::Backend;
use llmd::config::DeviceKind;
use llmd::{Engine, EngineConfig, Prompt, SamplingParams};
use std::path::PathBuf;
use std::time::Instant;

const GEN: usize = 128;
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

fn main() {
    if !driver_available() {
        println!("gpu_decode: no CUDA driver on this machine; nothing to measure");
        return;
    }
    let Some(dir) = model_dir() else {
        println!("gpu_decode: no complete model");
        return;
    };
    // Copy bandwidth of this device, measured now.
    let copy_bw = {
        let g = CudaBackend::new(0).expect("CUDA device");
        let n = 256 << 20; // 512 MiB of bf16
        let src = g.alloc(n).unwrap();
        let mut dst = g.alloc(n).unwrap();
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t = Instant::now();
            g.stream().memcpy_dtod(&src, &mut dst).unwrap();
            g.synchronize().unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        2.0 * (n * 2) as f64 / best
    };
    let mut cfg = EngineConfig::new(&dir);
    cfg.device = DeviceKind::Cuda(0);
    let engine = Engine::new(cfg).expect("engine on cuda:0");
    let params = SamplingParams {
        max_tokens: Some(GEN),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    // Batch 1: time between the first and the last token (prefill excluded).
    let mut best_b1 = 0f64;
    for _ in 0..3 {
        let mut h = engine
            .add_request(PROMPT.into(), params.clone())
            .expect("request");
        let (mut first, mut last, mut n) = (None, Instant::now(), 0usize);
        while let Some(d) = h.next_blocking() {
            n += d.expect("delta").new_token_ids.len();
            last = Instant::now();
            first.get_or_insert(last);
        }
        let secs = (last - first.unwrap()).as_secs_f64();
        best_b1 = best_b1.max((n - 1) as f64 / secs);
    }
    let wbytes = weight_bytes(&dir);
    let roofline = copy_bw / wbytes as f64;
    // Batch 64: wall time of the whole generation.
    let prompts: Vec<Prompt> = (0..64).map(|_| PROMPT.into()).collect();
    engine.generate(prompts.clone(), &params).expect("warm-up");
    let t = Instant::now();
    let out = engine.generate(prompts, &params).expect("generate");
    let tokens: usize = out.iter().map(|o| o.token_ids.len()).sum();
    let b64 = tokens as f64 / t.elapsed().as_secs_f64();
    println!("model {}", dir.display());
    println!(
        "batch1 tok_s={best_b1:.1} roofline_tok_s={roofline:.1} fraction={:.2} weight_mb={:.1} copy_gb_s={:.1}",
        best_b1 / roofline,
        wbytes as f64 / 1e6,
        copy_bw / 1e9
    );
    println!("batch64 gen={GEN} tok_s={b64:.1}");
}
