//! Offload bandwidth, GPU → host, against one plain `cudaMemcpy` of the same number of bytes
//! into page-locked host memory, measured in the same run (target, issue 25: ≥ 0.8):
//! - async: the path the KV tiers take after each step (`Backend::read_kv_blocks_async`: a
//!   gather kernel, then a copy on a second stream into a page-locked slot; up to
//!   `KV_PINNED_SLOTS` reads in flight, each waited for as a tier thread would, bytes copied
//!   out of the slot included), and the share of that time the engine thread spends starting
//!   the reads;
//! - batched: `Backend::read_kv_blocks` (P/D sends: gather, one copy to pageable memory);
//! - per-block: `Backend::read_kv_block` of each layer of each block (the path before).
//!
//! Geometry: SmolLM2-135M's (30 layers, 3 KV heads of 64, blocks of 16 tokens, bf16 cache) and
//! a Llama-3-8B-like one (32 layers, 8 KV heads of 128). Without a CUDA device it says so and
//! exits 0. Run on the GPU machine: `cargo bench --bench kv_offload_gpu`.
#[path = "support/gpu.rs"]
mod gpu;

use llmd::backend::cuda::device::{KV_PINNED_SLOTS, KV_STAGING_BYTES};
use llmd::backend::{Backend, KvCacheDims, PendingKvRead};
use std::time::Instant;

fn main() {
    let Some(g) = gpu::device_or_skip("kv_offload_gpu") else {
        return;
    };
    let repeat = gpu::repeat(5);
    println!(
        "KV offload GPU -> host vs a pinned cudaMemcpy of the same bytes on {} (best of {repeat})",
        g.arch()
    );
    println!(
        "{:<14} {:>6} {:>7} {:>11} {:>8} {:>11} {:>11} {:>11} {:>7} {:>7} {:>9}",
        "geometry",
        "blocks",
        "MB",
        "async GB/s",
        "start %",
        "batch GB/s",
        "block GB/s",
        "pinned GB/s",
        "async",
        "batch",
        "per-block"
    );
    for (name, layers, kv_heads, head_dim) in
        [("SmolLM2-135M", 30, 3, 64), ("Llama-3-8B", 32, 8, 128)]
    {
        let blocks = 256;
        let dims = KvCacheDims {
            num_blocks: blocks,
            block_size: 16,
            num_kv_heads: kv_heads,
            head_dim,
        };
        let caches: Vec<_> = (0..layers)
            .map(|_| g.alloc_kv_cache(dims).expect("KV cache"))
            .collect();
        let per_layer = 2
            * dims.block_numel()
            * <llmd::backend::cuda::CudaBackend as Backend>::KV_ELEMENT_BYTES;
        let bytes = blocks * layers * per_layer;
        let ids: Vec<usize> = (0..blocks).collect();
        // What the engine does after each step: start a read of the step's committed blocks
        // (here: as many as a slot holds), which a tier thread waits for.
        let per_read = (KV_STAGING_BYTES / (layers * per_layer)).max(1);
        let mut starting = 0.0f64;
        let asynced = gpu::best_secs(&g, repeat, || {
            let mut inflight = std::collections::VecDeque::new();
            let mut started = 0.0;
            for group in ids.chunks(per_read) {
                if inflight.len() == KV_PINNED_SLOTS {
                    let p: Box<dyn PendingKvRead> = inflight.pop_front().expect("in flight");
                    std::hint::black_box(p.wait().expect("async read"));
                }
                let t = Instant::now();
                let p = g
                    .read_kv_blocks_async(&caches, group, group.len() * layers * per_layer)
                    .expect("read_kv_blocks_async");
                started += t.elapsed().as_secs_f64();
                inflight.push_back(p);
            }
            for p in inflight {
                std::hint::black_box(p.wait().expect("async read"));
            }
            starting = started;
        });
        // P/D sends: every block at once, to pageable memory.
        let mut packed = vec![0u8; bytes];
        let batched = gpu::best_secs(&g, repeat, || {
            g.read_kv_blocks(&caches, &ids, &mut packed)
                .expect("read_kv_blocks");
        });
        // What it did before: each layer of each block on its own.
        let mut out = vec![0u8; layers * per_layer];
        let tier = gpu::best_secs(&g, repeat, || {
            for b in 0..blocks {
                for (l, c) in caches.iter().enumerate() {
                    g.read_kv_block(c, b, &mut out[l * per_layer..(l + 1) * per_layer])
                        .expect("read_kv_block");
                }
            }
        });
        // The device's own figure: one copy of the same bytes into pinned memory.
        let src = g.stream().alloc_zeros::<u8>(bytes).expect("device buffer");
        // SAFETY: the pinned buffer is written by the copy before anything reads it.
        let mut pinned = unsafe { g.stream().context().alloc_pinned::<u8>(bytes) }.expect("pinned");
        let plain = gpu::best_secs(&g, repeat, || {
            g.stream().memcpy_dtoh(&src, &mut pinned).expect("memcpy");
        });
        let gbs = |s: f64| bytes as f64 / s / 1e9;
        println!(
            "{name:<14} {blocks:>6} {:>7.1} {:>11.2} {:>8.1} {:>11.2} {:>11.2} {:>11.2} {:>7.3} {:>7.3} {:>9.3}",
            bytes as f64 / 1e6,
            gbs(asynced),
            100.0 * starting / asynced,
            gbs(batched),
            gbs(tier),
            gbs(plain),
            plain / asynced,
            plain / batched,
            plain / tier
        );
    }
}
