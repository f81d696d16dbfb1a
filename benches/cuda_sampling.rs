//! On-device sampling against the path it replaces: copying the logits to the host and running
//! the host sampler there, both measured in the same run on the same logits. Rows cycle
//! through top-k, top-p, top-k + top-p and min-p; the greedy argmax is printed as a floor.
//! Times are per step (all rows), wall clock including the token ids' trip back, best of
//! `LLMD_BENCH_REPEAT` (default 20) after a warm-up. Without a CUDA device it says so and
//! exits 0.
//!
//! Run on the GPU machine: `cargo bench --bench cuda_sampling`.
use llmd::backend::cpu::sampling::RowSampling;
#[path = "support/gpu.rs"]
mod gpu;

use llmd::backend::cuda::CudaBackend;
use llmd::backend::Backend;
use llmd::sampling::{SamplingParams, SequenceSampler};

fn main() {
    let Some(g) = gpu::device_or_skip("cuda_sampling") else {
        return;
    };
    let repeat = gpu::repeat(20);
    println!(
        "sampling on {} vs logits to host + host sampler (best of {repeat})",
        g.arch()
    );
    println!(
        "{:>5} {:>7} {:>12} {:>12} {:>12} {:>9}",
        "rows", "vocab", "device us", "host us", "argmax us", "speed-up"
    );
    for (rows, vocab) in [
        (1, 49152),
        (16, 49152),
        (64, 49152),
        (64, 151936),
        (256, 151936),
    ] {
        run(&g, rows, vocab, repeat);
    }
}

fn run(g: &CudaBackend, rows: usize, vocab: usize, repeat: usize) {
    // Logit-like values: a spread of a few units with a handful of clear favourites.
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2654435761);
            let base = (h % 10_000) as f32 / 10_000.0 * 8.0 - 4.0;
            if h.is_multiple_of(997) {
                base + 10.0
            } else {
                base
            }
        })
        .collect();
    let d_logits = g.upload(&logits).unwrap();
    let kinds = [
        (0.8, 50, 1.0, 0.0),
        (1.0, 0, 0.9, 0.0),
        (0.7, 40, 0.95, 0.0),
        (1.0, 0, 1.0, 0.05),
    ];
    let params: Vec<RowSampling> = (0..rows)
        .map(|r| {
            let (temperature, top_k, top_p, min_p) = kinds[r % kinds.len()];
            RowSampling {
                temperature,
                top_k,
                top_p,
                min_p,
                u: (r as f64 * 0.618_033_988_75).fract(),
            }
        })
        .collect();
    let mut samplers: Vec<SequenceSampler> = params
        .iter()
        .enumerate()
        .map(|(r, p)| {
            let sp = SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k as usize,
                top_p: p.top_p,
                min_p: p.min_p,
                seed: Some(r as u64),
                ..SamplingParams::default()
            };
            SequenceSampler::new(&sp, &[])
        })
        .collect();
    let mut ids = Vec::new();
    let device = 1e6
        * gpu::best_secs(g, repeat, || {
            g.sample_rows(&d_logits, vocab, &params, &mut ids).unwrap();
        });
    let mut host_logits = vec![0f32; rows * vocab];
    let host = 1e6
        * gpu::best_secs(g, repeat, || {
            g.to_host(&d_logits, &mut host_logits).unwrap();
            for (row, s) in host_logits.chunks_exact_mut(vocab).zip(&mut samplers) {
                std::hint::black_box(s.sample(row));
            }
        });
    let argmax = 1e6
        * gpu::best_secs(g, repeat, || {
            g.argmax_rows(&d_logits, rows, vocab, &mut ids).unwrap();
        });
    println!(
        "{rows:>5} {vocab:>7} {device:>12.1} {host:>12.1} {argmax:>12.1} {:>8.2}x",
        host / device
    );
}
