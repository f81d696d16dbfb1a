//! Offload bandwidth, GPU → host: the path the KV tiers take (`Backend::read_kv_blocks` of a
//! step's committed blocks: one gather kernel and one copy through a pinned staging buffer, as
//! the engine calls it after a step), and the one-block path it replaced
//! (`Backend::read_kv_block` of each layer of each block), against one plain `cudaMemcpy` of
//! the same number of bytes into pinned host memory, measured in the same run. Target (issue
//! 25): ≥ 0.8.
//!
//! Geometry: SmolLM2-135M's (30 layers, 3 KV heads of 64, blocks of 16 tokens, bf16 cache) and
//! a Llama-3-8B-like one (32 layers, 8 KV heads of 128). Without a CUDA device it says so and
//! exits 0. Run on the GPU machine: `cargo bench --bench kv_offload_gpu`.
#[path = "support/gpu.rs"]
mod gpu;

use llmd::backend::{Backend, KvCacheDims};

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
        "{:<14} {:>7} {:>8} {:>13} {:>13} {:>12} {:>7} {:>10}",
        "geometry",
        "blocks",
        "MB",
        "batched GB/s",
        "per-block GB/s",
        "pinned GB/s",
        "ratio",
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
        // What the engine does with a step's committed blocks: every block at once.
        let ids: Vec<usize> = (0..blocks).collect();
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
            "{name:<14} {blocks:>7} {:>8.1} {:>13.2} {:>13.2} {:>12.2} {:>7.3} {:>10.3}",
            bytes as f64 / 1e6,
            gbs(batched),
            gbs(tier),
            gbs(plain),
            plain / batched,
            plain / tier
        );
    }
}
