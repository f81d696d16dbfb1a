//! Paged prefill attention on the GPU (tensor-core kernels): TFLOP/s of causal attention over
//! whole prompts, one line per shape and kernel (`tiled`, `pipelined`) in a form
//! `benches/prefill_vs_sdpa.py` reads to compare with PyTorch's flash SDPA on the same GPU in
//! the same run.
//!
//! FLOPs counted as a causal attention does them: 4 · heads · d · n(n+1)/2 (Q·Kᵀ and P·V).
//! Best of `LLMD_BENCH_REPEAT` (default 10) after a warm-up. Without a CUDA device it says so
//! and exits 0. Run: `cargo bench --bench cuda_prefill`.
use llmd::backend::cuda::device::{CudaKvCache, KernelChoice, PrefillKernel};
#[path = "support/gpu.rs"]
mod gpu;

use llmd::backend::{AttnDims, Backend, BatchPlan, KvCacheDims, SeqPlan};

/// (batch, prompt tokens, query heads, KV heads, head dim); shared with prefill_vs_sdpa.py.
pub const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (1, 4096, 32, 8, 128),
    (4, 2048, 32, 8, 128),
    (1, 8192, 32, 8, 128),
    (2, 4096, 14, 2, 64),
];

fn main() {
    let Some(g) = gpu::device_or_skip("cuda_prefill") else {
        return;
    };
    let repeat = gpu::repeat(10);
    for &(batch, n, nh, nkv, hd) in SHAPES {
        let bs = 16;
        let per_seq = n.div_ceil(bs);
        let kd = KvCacheDims {
            num_blocks: batch * per_seq,
            block_size: bs,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let dims = AttnDims {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            sliding_window: None,
            softcap: None,
        };
        let mut cache = CudaKvCache {
            dims: kd,
            k: g.stream().alloc_zeros(kd.numel()).unwrap(),
            v: g.stream().alloc_zeros(kd.numel()).unwrap(),
        };
        let mut plan = BatchPlan {
            max_blocks_per_seq: per_seq,
            ..Default::default()
        };
        for s in 0..batch {
            plan.seqs.push(SeqPlan {
                query_start: s * n,
                query_len: n,
                context_len: n,
            });
            for b in 0..per_seq {
                plan.block_tables.push((b * batch + s) as u32);
            }
            for pos in 0..n {
                plan.token_ids.push(0);
                plan.positions.push(pos as u32);
                let block = plan.block_tables[s * per_seq + pos / bs];
                plan.slot_mapping
                    .push(block * bs as u32 + (pos % bs) as u32);
            }
        }
        let step = g.prepare_step(&plan).unwrap();
        let rows = batch * n;
        let qkv: Vec<f32> = (0..rows * dims.qkv_width())
            .map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let qkv = g.upload(&qkv).unwrap();
        g.write_kv(&qkv, &mut cache, &step, dims);
        let mut out = g.alloc(rows * dims.q_width()).unwrap();
        for &kernel in PrefillKernel::ALL {
            g.set_prefill_kernel(kernel);
            let best = gpu::best_secs(&g, repeat, || {
                g.paged_attention_prefill(&qkv, &cache, &step, dims, &mut out)
            });
            let flops = 4.0 * (batch * nh * hd) as f64 * (n * (n + 1) / 2) as f64;
            println!(
                "prefill kernel={} batch={batch} seq={n} heads={nh} kv_heads={nkv} head_dim={hd} ms={:.3} tflops={:.2}",
                kernel.name(),
                best * 1e3,
                flops / best / 1e12
            );
        }
    }
}
