//! Offload bandwidth, GPU → host: the path the KV tiers take (`Backend::read_kv_block` of each
//! layer of each block, as `ModelRunner::read_kv_block` calls it after a step) against one
//! plain `cudaMemcpy` of the same number of bytes into pinned host memory, measured in the same
//! run. Target (issue 8): ≥ 0.8.
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
        "{:<28} {:>7} {:>10} {:>12} {:>12} {:>7}",
        "geometry", "blocks", "MB", "tier GB/s", "pinned GB/s", "ratio"
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
        // What the engine does for each committed block.
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
            "{name:<28} {blocks:>7} {:>10.1} {:>12.2} {:>12.2} {:>7.3}",
            bytes as f64 / 1e6,
            gbs(tier),
            gbs(plain),
            plain / tier
        );
    }
}
