//! Paged decode attention on the GPU, as a fraction of the same device's copy bandwidth
//! measured in the same run. Target (issue 3): ≥ 0.85 at batch 64, context 4096, 32 query
//! heads / 8 KV heads, head dim 128.
//!
//! Achieved bandwidth = bytes of K and V read + bytes of queries read, over the kernel time.
//! Copy bandwidth = 2 × bytes of a device-to-device copy of the same size as the K/V read
//! (it reads and writes every byte), over its time. Both are the best of `LLMD_BENCH_REPEAT`
//! (default 20) runs after a warm-up. Without a CUDA device it says so and exits 0.
//!
//! Each shape runs on both decode kernels ("kernel" column): per-lane dot products (`lanes`)
//! and tensor cores over the GQA group's heads (`mma`, head dims 64 and 128); the engine uses
//! `mma` from `DEFAULT_DECODE_MMA_MIN_GROUP` query heads per KV head.
//!
//! Run on the GPU machine: `cargo bench --bench cuda_attention`.
use llmd::backend::cuda::device::CudaKvCache;
#[path = "support/gpu.rs"]
mod gpu;

use llmd::backend::cuda::CudaBackend;
use llmd::backend::{AttnDims, Backend, BatchPlan, KvCacheDims, SeqPlan};

fn main() {
    let Some(g) = gpu::device_or_skip("cuda_attention") else {
        return;
    };
    let repeat = gpu::repeat(20);
    println!(
        "decode attention vs copy bandwidth on {} (best of {repeat})",
        g.arch()
    );
    println!(
        "{:>5} {:>7} {:>6} {:>4} {:>6} {:>10} {:>10} {:>10} {:>7}",
        "batch", "context", "heads", "hd", "kernel", "attn GB/s", "copy GB/s", "time us", "ratio"
    );
    for (batch, ctx, nh, nkv, hd) in [
        (64, 4096, 32, 8, 128),
        (1, 4096, 32, 8, 128),
        (16, 32768, 32, 8, 128),
        (64, 4096, 32, 32, 128),
        (64, 4096, 14, 2, 64),
        (64, 4096, 32, 4, 128),
        (64, 4096, 9, 3, 64),
        (1, 32768, 32, 8, 128),
    ] {
        for (kernel, min_group) in [("lanes", usize::MAX), ("mma", 1)] {
            if kernel == "mma" && hd != 64 && hd != 128 {
                continue;
            }
            g.set_decode_mma_min_group(min_group);
            run(&g, kernel, batch, ctx, nh, nkv, hd, repeat);
        }
    }
    g.set_decode_mma_min_group(llmd::backend::cuda::device::DEFAULT_DECODE_MMA_MIN_GROUP);
}

#[allow(clippy::too_many_arguments)]
fn run(
    g: &CudaBackend,
    kernel: &str,
    batch: usize,
    ctx: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    repeat: usize,
) {
    let bs = 16;
    let blocks_per_seq = ctx.div_ceil(bs);
    let kd = KvCacheDims {
        num_blocks: batch * blocks_per_seq,
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
    // Random-looking but cheap contents: attention time does not depend on the values.
    let fill = |n: usize, salt: u32| -> Vec<u16> {
        (0..n as u32)
            .map(|i| {
                half::bf16::from_f32(
                    ((i.wrapping_mul(2654435761) ^ salt) % 1000) as f32 / 1000.0 - 0.5,
                )
                .to_bits()
            })
            .collect()
    };
    let cache = CudaKvCache {
        dims: kd,
        k: g.stream().clone_htod(&fill(kd.numel(), 1)).unwrap(),
        v: g.stream().clone_htod(&fill(kd.numel(), 2)).unwrap(),
    };
    // Blocks of a sequence scattered through the pool, as after a while of serving.
    let mut plan = BatchPlan {
        max_blocks_per_seq: blocks_per_seq,
        num_decode_seqs: batch,
        ..Default::default()
    };
    for s in 0..batch {
        plan.seqs.push(SeqPlan {
            query_start: s,
            query_len: 1,
            context_len: ctx,
        });
        plan.token_ids.push(0);
        plan.positions.push((ctx - 1) as u32);
        for b in 0..blocks_per_seq {
            plan.block_tables.push((b * batch + s) as u32);
        }
        let last = plan.block_tables[s * blocks_per_seq + (ctx - 1) / bs];
        plan.slot_mapping
            .push(last * bs as u32 + ((ctx - 1) % bs) as u32);
    }
    let step = g.prepare_step(&plan).unwrap();
    let qkv = g.upload(&vec![0.01f32; batch * dims.qkv_width()]).unwrap();
    let mut out = g.alloc(batch * dims.q_width()).unwrap();
    let t_attn = gpu::best_secs(g, repeat, || {
        g.paged_attention_decode(&qkv, &cache, &step, dims, &mut out)
    });
    let kv_bytes = 2 * batch * ctx * nkv * hd * 2;
    let q_bytes = batch * nh * hd * 2;
    let attn_bw = (kv_bytes + q_bytes) as f64 / t_attn;
    let copy_bw = gpu::copy_bandwidth(g, kv_bytes / 2, repeat);
    println!(
        "{batch:>5} {ctx:>7} {:>6} {hd:>4} {kernel:>6} {:>10.1} {:>10.1} {:>10.1} {:>6.2}x",
        format!("{nh}/{nkv}"),
        attn_bw / 1e9,
        copy_bw / 1e9,
        t_attn * 1e6,
        attn_bw / copy_bw
    );
}
