//! The CUDA backend against the CPU reference, on the GPU machine:
//! `cargo test --release --test gpu -- --ignored` (every test here needs a CUDA device and is
//! `#[ignore]`d so CI, which has none, skips them).
//!
//! - every kernel vs the CPU backend on random and edge-case shapes (block boundaries, one
//!   token, GQA ratios 1/4/8, head dims 64/128, contexts up to 32k; mixture-of-experts
//!   routing and grouped GEMMs over odd row counts, starved experts and ties);
//! - model logits on GPU vs CPU at every position of a 64-token prompt, within bf16 tolerance;
//! - greedy output of the shared models on GPU equals CPU for the first 32 tokens.
//!
//! Inputs are rounded to bf16 before either side sees them, so the only differences are the
//! GPU's bf16 intermediate storage and summation order.
mod common;

use llmd::backend::cpu::{CpuBackend, CpuKvCache};
use llmd::backend::cuda::device::{
    CudaKvCache, DecodeGemm, KernelChoice, PrefillKernel, WeightData, KV_PINNED_SLOTS,
    KV_STAGING_BYTES,
};
use llmd::backend::cuda::CudaBackend;
use llmd::backend::{
    AttnDims, Backend, BatchPlan, HostDType, HostTensor, KvCacheDims, MoeWeights, SeqPlan,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

fn gpu() -> CudaBackend {
    CudaBackend::new(0).expect("a CUDA device (these tests run on the GPU machine)")
}

fn bf16(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

/// Uniform values in `[-scale, scale]`, already bf16-representable.
fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
            bf16((u * 2.0 - 1.0) * scale)
        })
        .collect()
}

fn tensor<'a>(shape: &'a [usize], data: &'a [f32]) -> HostTensor<'a> {
    HostTensor {
        dtype: HostDType::F32,
        shape,
        data: bytemuck::cast_slice(data),
    }
}

/// Asserts `|a - b| <= atol + rtol * |b|` everywhere, naming the worst element.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > worst.1 || !g.is_finite() {
            worst = (i, excess.max(f32::MIN_POSITIVE));
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} is {} on the GPU, {} on the CPU",
        worst.0,
        got[worst.0],
        want[worst.0]
    );
}

#[test]
#[ignore]
fn norms_activation_matmul_match_cpu() {
    let (cpu, g) = (CpuBackend::default(), gpu());
    for (rows, hidden) in [(1, 64), (3, 576), (17, 4096), (64, 896)] {
        let x = rand_vec(rows * hidden, 1, 2.0);
        let r = rand_vec(rows * hidden, 2, 2.0);
        let w = rand_vec(hidden, 3, 1.0);
        let shape = [hidden];
        let (cw, gw) = (
            cpu.load_weight(tensor(&shape, &w)).unwrap(),
            g.load_weight(tensor(&shape, &w)).unwrap(),
        );
        let mut cout = vec![0f32; rows * hidden];
        cpu.rms_norm(&x, &cw, 1e-5, &mut cout, rows);
        let mut gout = g.alloc(rows * hidden).unwrap();
        g.rms_norm(&g.upload(&x).unwrap(), &gw, 1e-5, &mut gout, rows);
        let got = g.download(&gout, rows * hidden).unwrap();
        assert_close(
            &format!("rms_norm {rows}x{hidden}"),
            &got,
            &cout,
            1e-2,
            1e-2,
        );

        // add_rms_norm: the GPU stores the residual in bf16, so the CPU gets it rounded too.
        let mut cres = r.clone();
        cpu.add_rms_norm(&mut cres, &x, &cw, 1e-5, &mut cout, rows);
        let mut gres = g.upload(&r).unwrap();
        g.add_rms_norm(
            &mut gres,
            &g.upload(&x).unwrap(),
            &gw,
            1e-5,
            &mut gout,
            rows,
        );
        let got_res = g.download(&gres, rows * hidden).unwrap();
        let want_res: Vec<f32> = cres.iter().map(|&v| bf16(v)).collect();
        assert_close("add_rms_norm residual", &got_res, &want_res, 0.0, 0.0);
        let got = g.download(&gout, rows * hidden).unwrap();
        assert_close("add_rms_norm out", &got, &cout, 2e-2, 2e-2);
    }
    for (rows, inter) in [(1, 128), (5, 1536), (33, 14336)] {
        let gu = rand_vec(rows * 2 * inter, 4, 4.0);
        let mut cout = vec![0f32; rows * inter];
        cpu.silu_mul(&gu, &mut cout, rows, inter);
        let mut gout = g.alloc(rows * inter).unwrap();
        g.silu_mul(&g.upload(&gu).unwrap(), &mut gout, rows, inter);
        let got = g.download(&gout, rows * inter).unwrap();
        assert_close(&format!("silu_mul {rows}x{inter}"), &got, &cout, 1e-2, 1e-2);

        cpu.gelu_tanh_mul(&gu, &mut cout, rows, inter);
        g.gelu_tanh_mul(&g.upload(&gu).unwrap(), &mut gout, rows, inter);
        let got = g.download(&gout, rows * inter).unwrap();
        assert_close(
            &format!("gelu_tanh_mul {rows}x{inter}"),
            &got,
            &cout,
            1e-2,
            1e-2,
        );

        // Gemma's embedding scale, √hidden.
        let mut x = gu.clone();
        let mut gx = g.upload(&x).unwrap();
        cpu.scale(&mut x, rows * inter, 33.94);
        g.scale(&mut gx, rows * inter, 33.94);
        let got = g.download(&gx, rows * 2 * inter).unwrap();
        assert_close(&format!("scale {rows}x{inter}"), &got, &x, 1e-2, 1e-2);

        // Gemma 2's final-logit soft-capping (30), on logits that reach past it.
        let mut x = rand_vec(rows * inter, 8, 100.0);
        let mut gx = g.upload(&x).unwrap();
        cpu.softcap(&mut x, rows * inter, 30.0);
        g.softcap(&mut gx, rows * inter, 30.0);
        let got = g.download(&gx, rows * inter).unwrap();
        assert_close(&format!("softcap {rows}x{inter}"), &got, &x, 1e-2, 1e-2);
    }
    for (m, n, k, with_bias) in [
        (1, 64, 64, false),
        (7, 896, 896, true),
        (64, 4096, 576, true),
    ] {
        let x = rand_vec(m * k, 5, 1.0);
        let w = rand_vec(n * k, 6, 0.1);
        let b = rand_vec(n, 7, 1.0);
        let (ws, bs) = ([n, k], [n]);
        let cw = cpu.load_weight(tensor(&ws, &w)).unwrap();
        let gw = g.load_weight(tensor(&ws, &w)).unwrap();
        let cb = cpu.load_weight(tensor(&bs, &b)).unwrap();
        let gb = g.load_weight(tensor(&bs, &b)).unwrap();
        let mut cout = vec![0f32; m * n];
        cpu.matmul(&x, &cw, with_bias.then_some(&cb), &mut cout, m);
        let mut gout = g.alloc(m * n).unwrap();
        g.matmul(
            &g.upload(&x).unwrap(),
            &gw,
            with_bias.then_some(&gb),
            &mut gout,
            m,
        );
        let got = g.download(&gout, m * n).unwrap();
        assert_close(&format!("matmul {m}x{n}x{k}"), &got, &cout, 2e-2, 2e-2);
    }
}

/// The skinny decode GEMM against the CPU's matmul on bf16 inputs (1 to 16 rows; odd, partial-
/// tile and large shapes, reductions that split unevenly over the warps), bit for bit batch
/// invariant (a row alone or among 16 gives the same bits), and against cuBLAS.
#[test]
#[ignore]
fn skinny_gemm_matches_cpu_and_is_batch_invariant() {
    let (cpu, g) = (CpuBackend::default(), gpu());
    let round = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(bf16).collect() };
    for (n, k) in [
        (16, 64),
        (17, 72),
        (40, 8),
        (1000, 4104),
        (6144, 4096),
        (33, 14336),
        (8016, 576),
    ] {
        let w = round(rand_vec(n * k, 20, 0.05));
        let ws = [n, k];
        let cw = cpu.load_weight(tensor(&ws, &w)).unwrap();
        let gw = g.load_weight(tensor(&ws, &w)).unwrap();
        let x16 = round(rand_vec(16 * k, 21, 1.0));
        let gx16 = g.upload(&x16).unwrap();
        let mut rows16 = Vec::new();
        for m in [1, 2, 7, 8, 9, 16] {
            let x = &x16[..m * k];
            let mut cout = vec![0f32; m * n];
            cpu.matmul(&x.to_vec(), &cw, None, &mut cout, m);
            let gx = g.upload(x).unwrap();
            let mut gout = g.alloc(m * n).unwrap();
            g.set_decode_gemm(DecodeGemm::Skinny);
            g.matmul(&gx, &gw, None, &mut gout, m);
            let got = g.download(&gout, m * n).unwrap();
            assert_close(&format!("skinny {m}x{n}x{k}"), &got, &cout, 2e-2, 2e-2);
            g.set_decode_gemm(DecodeGemm::Cublas);
            g.matmul(&gx, &gw, None, &mut gout, m);
            let blas = g.download(&gout, m * n).unwrap();
            assert_close(
                &format!("skinny vs cuBLAS {m}x{n}x{k}"),
                &got,
                &blas,
                2e-2,
                2e-2,
            );
            if m == 16 {
                rows16 = got;
            } else {
                // The same rows among 16 give the same bits.
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    rows16_prefix(&g, &gx16, &gw, m, n),
                    "skinny {m}x{n}x{k}: rows depend on the batch"
                );
            }
        }
        assert_eq!(rows16.len(), 16 * n);
    }
    g.set_decode_gemm(DecodeGemm::Cublas);
}

/// The first `m` rows of a 16-row skinny matmul, as bits.
fn rows16_prefix(
    g: &CudaBackend,
    x16: &llmd::backend::cuda::device::CudaBuffer,
    w: &llmd::backend::cuda::device::CudaWeight,
    m: usize,
    n: usize,
) -> Vec<u32> {
    g.set_decode_gemm(DecodeGemm::Skinny);
    let mut out = g.alloc(16 * n).unwrap();
    g.matmul(x16, w, None, &mut out, 16);
    let all = g.download(&out, 16 * n).unwrap();
    all[..m * n].iter().map(|v| v.to_bits()).collect()
}

/// A plan of `seqs` = (cached tokens, new tokens), decodes (new = 1) first, with block tables
/// drawn from a shuffled pool so attention really follows them.
fn plan(seqs: &[(usize, usize)], block_size: usize, num_blocks: usize, seed: u64) -> BatchPlan {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pool: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..pool.len()).rev() {
        pool.swap(i, rng.next_u32() as usize % (i + 1));
    }
    let max_blocks = seqs
        .iter()
        .map(|&(c, n)| (c + n).div_ceil(block_size))
        .max()
        .unwrap_or(1);
    let mut p = BatchPlan {
        max_blocks_per_seq: max_blocks,
        num_decode_seqs: seqs.iter().take_while(|&&(_, n)| n == 1).count(),
        ..Default::default()
    };
    let mut next = 0;
    for &(cached, new) in seqs {
        let ctx = cached + new;
        let table: Vec<u32> = pool[next..next + ctx.div_ceil(block_size)].to_vec();
        next += table.len();
        p.seqs.push(SeqPlan {
            query_start: p.token_ids.len(),
            query_len: new,
            context_len: ctx,
        });
        for pos in cached..ctx {
            p.token_ids.push(0);
            p.positions.push(pos as u32);
            p.slot_mapping
                .push(table[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
        }
        let mut row = table;
        row.resize(max_blocks, 0);
        p.block_tables.extend(row);
    }
    p
}

/// `mma`: decode on tensor cores for every group size (the kernel for head dims 64 and 128),
/// else never. `softcap`: Gemma 2's score cap, with scale 1 (Gemma's query scaling is
/// separate), so that scores reach the cap; the case checks that the cap changes the CPU's
/// output beyond the tolerance, so a kernel that ignores it fails.
fn attention_case(
    nh: usize,
    nkv: usize,
    hd: usize,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    mma: bool,
    softcap: Option<f32>,
) {
    let (cpu, g) = (CpuBackend::default(), gpu());
    g.set_decode_mma_min_group(if mma { 1 } else { usize::MAX });
    let bs = 16;
    let num_blocks: usize = seqs
        .iter()
        .map(|&(c, n)| (c + n).div_ceil(bs))
        .sum::<usize>()
        + 3;
    let p = plan(seqs, bs, num_blocks, (nh * 1000 + hd) as u64);
    let dims = AttnDims {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        scale: if softcap.is_some() {
            1.0
        } else {
            1.0 / (hd as f32).sqrt()
        },
        sliding_window: window,
        softcap,
    };
    let kd = KvCacheDims {
        num_blocks,
        block_size: bs,
        num_kv_heads: nkv,
        head_dim: hd,
    };
    // The cached prefix: random K/V already in the cache; this step's tokens are written by
    // write_kv from their qkv rows.
    let k = rand_vec(kd.numel(), 11, 1.0);
    let v = rand_vec(kd.numel(), 12, 1.0);
    let mut ccache = CpuKvCache {
        dims: kd,
        k: k.clone(),
        v: v.clone(),
    };
    let bits = |x: &[f32]| -> Vec<u16> {
        x.iter()
            .map(|&f| half::bf16::from_f32(f).to_bits())
            .collect()
    };
    let mut gcache = CudaKvCache {
        dims: kd,
        k: g.stream().clone_htod(&bits(&k)).unwrap(),
        v: g.stream().clone_htod(&bits(&v)).unwrap(),
    };
    let n = p.num_tokens();
    let qkv = rand_vec(n * dims.qkv_width(), 13, 1.0);
    let cstep = cpu.prepare_step(&p).unwrap();
    let gstep = g.prepare_step(&p).unwrap();
    cpu.write_kv(&qkv, &mut ccache, &cstep, dims);
    let gqkv = g.upload(&qkv).unwrap();
    g.write_kv(&gqkv, &mut gcache, &gstep, dims);
    let mut cout = vec![0f32; n * dims.q_width()];
    cpu.paged_attention_decode(&qkv, &ccache, &cstep, dims, &mut cout);
    cpu.paged_attention_prefill(&qkv, &ccache, &cstep, dims, &mut cout);
    let what = format!(
        "attention heads {nh}/{nkv} d{hd} seqs {seqs:?} window {window:?} mma {mma} \
         softcap {softcap:?}"
    );
    // Both prefill kernels (the choice matters for head dims 64 and 128).
    for &kernel in PrefillKernel::ALL {
        g.set_prefill_kernel(kernel);
        let mut gout = g.alloc(n * dims.q_width()).unwrap();
        g.paged_attention_decode(&gqkv, &gcache, &gstep, dims, &mut gout);
        g.paged_attention_prefill(&gqkv, &gcache, &gstep, dims, &mut gout);
        let got = g.download(&gout, n * dims.q_width()).unwrap();
        assert_close(
            &format!("{what} prefill {}", kernel.name()),
            &got,
            &cout,
            1e-2,
            2e-2,
        );
    }
    if softcap.is_some() {
        let uncapped = AttnDims {
            softcap: None,
            ..dims
        };
        let mut plain = vec![0f32; n * dims.q_width()];
        cpu.paged_attention_decode(&qkv, &ccache, &cstep, uncapped, &mut plain);
        cpu.paged_attention_prefill(&qkv, &ccache, &cstep, uncapped, &mut plain);
        let bite = common::max_abs_diff(&plain, &cout);
        assert!(
            bite > 0.1,
            "{what}: the cap changes the output by only {bite}"
        );
    }
    // The cache written by write_kv matches too.
    let gk: Vec<u16> = g.stream().clone_dtoh(&gcache.k).unwrap();
    let gk: Vec<f32> = gk
        .iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect();
    assert_close("K cache after write_kv", &gk, &ccache.k, 0.0, 0.0);
}

#[test]
#[ignore]
fn attention_matches_cpu_on_edge_shapes() {
    // Both decode kernels: per-lane dot products, and tensor cores over the group's heads.
    for mma in [false, true] {
        let case = |nh, nkv, hd, seqs: &[(usize, usize)], window| {
            attention_case(nh, nkv, hd, seqs, window, mma, None)
        };
        for (nh, nkv) in [(8, 8), (32, 8), (32, 4)] {
            for hd in [64, 128] {
                // One token; block boundaries (15, 16, 17); decode after a long prompt; chunked
                // prefill over a cached prefix; a mixed batch.
                case(nh, nkv, hd, &[(0, 1)], None);
                case(nh, nkv, hd, &[(14, 1), (15, 1), (16, 1), (31, 1)], None);
                case(nh, nkv, hd, &[(0, 15), (0, 16), (0, 17)], None);
                case(nh, nkv, hd, &[(600, 1), (100, 1), (48, 200), (0, 33)], None);
                case(nh, nkv, hd, &[(1000, 1), (0, 100)], Some(256));
                // Prefills of many key tiles (the pipelined kernel's two stages and its
                // edge-only masks): whole prompts, chunks over a cached prefix, tile edges,
                // a window narrower than the chunk.
                case(
                    nh,
                    nkv,
                    hd,
                    &[(0, 1000), (700, 300), (0, 64), (0, 65)],
                    None,
                );
                case(nh, nkv, hd, &[(0, 700), (300, 129)], Some(100));
            }
        }
        // Long contexts: split along the sequence with the reduce step.
        case(
            32,
            8,
            128,
            &[(4095, 1), (8191, 1), (32767, 1), (511, 1), (512, 1)],
            None,
        );
        // Small head dims of the test models.
        case(8, 4, 8, &[(40, 1), (0, 20)], None);
        case(4, 2, 16, &[(40, 1), (0, 20)], None);
        // Group sizes the kernels round up or pad (3: SmolLM2, 7: Qwen2-0.5B), head dim 256
        // (Gemma 3) and 32, odd and partial-block contexts, single-sequence split-K over a
        // long context.
        case(
            9,
            3,
            64,
            &[(0, 1), (16, 1), (99, 1), (1000, 1), (4095, 1)],
            None,
        );
        case(14, 2, 64, &[(7, 1), (333, 1), (2049, 1)], None);
        case(8, 4, 256, &[(0, 1), (17, 1), (500, 1), (3000, 1)], None);
        case(8, 2, 256, &[(100, 1)], Some(64));
        case(4, 4, 32, &[(63, 1), (65, 1), (1025, 1)], None);
        case(32, 8, 128, &[(65535, 1)], None);
        case(32, 4, 128, &[(16383, 1)], Some(4096));

        // Gemma 2's soft-capped scores: decode (one and split partitions), prefill on tensor
        // cores (head dims 64, 128 and Gemma 2's 256 token by token), a window, small heads.
        let capped = |nh, nkv, hd, seqs: &[(usize, usize)], window| {
            attention_case(nh, nkv, hd, seqs, window, mma, Some(2.0))
        };
        for (nh, nkv, hd) in [(8, 8, 64), (32, 8, 128), (8, 4, 256)] {
            capped(nh, nkv, hd, &[(0, 1), (15, 1), (600, 1), (4095, 1)], None);
            capped(nh, nkv, hd, &[(100, 1), (48, 200), (0, 33)], None);
            capped(nh, nkv, hd, &[(1000, 1), (0, 100)], Some(256));
        }
        capped(4, 2, 16, &[(40, 1), (0, 20)], None);
    }
}

#[test]
#[ignore]
fn embedding_rope_gather_match_cpu() {
    let (cpu, g) = (CpuBackend::default(), gpu());
    let (vocab, hidden) = (1000, 256);
    let table = rand_vec(vocab * hidden, 21, 1.0);
    let shape = [vocab, hidden];
    let ct = cpu.load_weight(tensor(&shape, &table)).unwrap();
    let gt = g.load_weight(tensor(&shape, &table)).unwrap();
    let mut p = plan(&[(3, 1), (0, 7)], 16, 8, 1);
    p.token_ids = vec![5, 0, 999, 17, 17, 3, 400, 2];
    p.logits_indices = vec![0, 7, 3];
    let (cs, gs) = (cpu.prepare_step(&p).unwrap(), g.prepare_step(&p).unwrap());
    let mut cout = vec![0f32; 8 * hidden];
    cpu.embedding(&ct, &cs, &mut cout);
    let mut gout = g.alloc(8 * hidden).unwrap();
    g.embedding(&gt, &gs, &mut gout);
    assert_close(
        "embedding",
        &g.download(&gout, 8 * hidden).unwrap(),
        &cout,
        0.0,
        0.0,
    );
    let mut cg = vec![0f32; 3 * hidden];
    cpu.gather_rows(&cout, &cs, hidden, &mut cg);
    let mut gg = g.alloc(3 * hidden).unwrap();
    g.gather_rows(&gout, &gs, hidden, &mut gg);
    assert_close(
        "gather_rows",
        &g.download(&gg, 3 * hidden).unwrap(),
        &cg,
        0.0,
        0.0,
    );

    // (heads, kv heads, head_dim, rotated dimensions): partial rotary (Phi-4-mini) too.
    for (nh, nkv, hd, rot) in [
        (4, 2, 64, 64),
        (32, 8, 128, 128),
        (6, 2, 128, 96),
        (4, 4, 64, 16),
    ] {
        let max_pos = 64;
        let mut cos_sin = vec![0f32; max_pos * rot];
        for pos in 0..max_pos {
            for i in 0..rot / 2 {
                let f = (pos as f32) * 10000f32.powf(-2.0 * i as f32 / rot as f32);
                cos_sin[pos * rot + i] = f.cos();
                cos_sin[pos * rot + rot / 2 + i] = f.sin();
            }
        }
        let ts = [max_pos, rot];
        let ctab = cpu.load_table(tensor(&ts, &cos_sin)).unwrap();
        let gtab = g.load_table(tensor(&ts, &cos_sin)).unwrap();
        assert!(matches!(gtab.data, WeightData::F32(_)));
        let dims = AttnDims {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            scale: 1.0,
            sliding_window: None,
            softcap: None,
        };
        let mut qkv = rand_vec(8 * dims.qkv_width(), 22, 1.0);
        let mut gq = g.upload(&qkv).unwrap();
        cpu.rope(&mut qkv, &ctab, &cs, dims);
        g.rope(&mut gq, &gtab, &gs, dims);
        let got = g.download(&gq, 8 * dims.qkv_width()).unwrap();
        assert_close(
            &format!("rope {nh}/{nkv} d{hd} rot{rot}"),
            &got,
            &qkv,
            1e-2,
            1e-2,
        );

        // Qwen3's per-head q/k RMSNorm (the V heads are left alone).
        let hs = [hd];
        let (qw, kw) = (rand_vec(hd, 23, 1.0), rand_vec(hd, 24, 1.0));
        let (cqw, ckw) = (
            cpu.load_weight(tensor(&hs, &qw)).unwrap(),
            cpu.load_weight(tensor(&hs, &kw)).unwrap(),
        );
        let (gqw, gkw) = (
            g.load_weight(tensor(&hs, &qw)).unwrap(),
            g.load_weight(tensor(&hs, &kw)).unwrap(),
        );
        let mut qkv: Vec<f32> = rand_vec(8 * dims.qkv_width(), 25, 3.0)
            .into_iter()
            .map(bf16)
            .collect();
        let mut gq = g.upload(&qkv).unwrap();
        cpu.qk_norm(&mut qkv, &cqw, &ckw, 1e-6, 8, dims);
        g.qk_norm(&mut gq, &gqw, &gkw, 1e-6, 8, dims);
        let got = g.download(&gq, 8 * dims.qkv_width()).unwrap();
        assert_close(&format!("qk_norm {nh}/{nkv} d{hd}"), &got, &qkv, 2e-2, 2e-2);
    }
}

/// One MoE layer on both backends: `rows` rows, `n_exp` experts of `[2 * inter, hidden]` /
/// `[hidden, inter]`. Expert 1 is starved (every row's first feature is 1 and its router row
/// weighs it -16) so that one segment in the middle is empty; with 8 experts, router rows 2
/// and 3 are equal, so they tie exactly and the lower id must win.
fn moe_case(
    rows: usize,
    n_exp: usize,
    top_k: usize,
    renormalize: bool,
    hidden: usize,
    inter: usize,
) {
    let (cpu, g) = (CpuBackend::default(), gpu());
    let seed = (rows * 131 + n_exp * 17 + top_k * 7 + hidden + inter) as u64;
    let mut x = rand_vec(rows * hidden, seed, 1.0);
    for r in 0..rows {
        x[r * hidden] = 1.0;
    }
    let mut router = rand_vec(n_exp * hidden, seed + 1, 0.2);
    for e in 0..n_exp {
        router[e * hidden] = if e == 1 { -16.0 } else { 0.0 };
    }
    if n_exp == 8 {
        let (a, b) = router.split_at_mut(3 * hidden);
        b[..hidden].copy_from_slice(&a[2 * hidden..]);
    }
    let gate_up: Vec<Vec<f32>> = (0..n_exp)
        .map(|e| rand_vec(2 * inter * hidden, seed + 10 + e as u64, 0.2))
        .collect();
    let down: Vec<Vec<f32>> = (0..n_exp)
        .map(|e| rand_vec(hidden * inter, seed + 100 + e as u64, 0.2))
        .collect();
    let (rs, gs, ds) = ([n_exp, hidden], [2 * inter, hidden], [hidden, inter]);
    macro_rules! weights {
        ($be:expr) => {
            MoeWeights {
                router: $be.load_weight(tensor(&rs, &router)).unwrap(),
                gate_up: gate_up
                    .iter()
                    .map(|w| $be.load_weight(tensor(&gs, w)).unwrap())
                    .collect(),
                down: down
                    .iter()
                    .map(|w| $be.load_weight(tensor(&ds, w)).unwrap())
                    .collect(),
                top_k,
                renormalize,
                hidden,
                intermediate: inter,
            }
        };
    }
    let (cw, gw) = (weights!(cpu), weights!(g));
    let mut cout = vec![0f32; rows * hidden];
    cpu.moe(&x, &cw, rows, &mut cout);
    let gx = g.upload(&x).unwrap();
    let mut gout = g.alloc(rows * hidden).unwrap();
    g.moe(&gx, &gw, rows, &mut gout);
    let got = g.download(&gout, rows * hidden).unwrap();
    let what = format!(
        "moe rows {rows} experts {n_exp} top_k {top_k} renormalize {renormalize} \
         hidden {hidden} inter {inter}"
    );
    assert_close(&what, &got, &cout, 2e-2, 2e-2);
    // Batch invariance: the last row alone gives the same bits as within the batch.
    let last = (rows - 1) * hidden;
    let gx1 = g.upload(&x[last..]).unwrap();
    let mut gout1 = g.alloc(hidden).unwrap();
    g.moe(&gx1, &gw, 1, &mut gout1);
    let alone = g.download(&gout1, hidden).unwrap();
    assert_close(
        &format!("{what}: last row alone"),
        &alone,
        &got[last..],
        0.0,
        0.0,
    );
}

#[test]
#[ignore]
fn moe_matches_cpu() {
    // Hidden and intermediate sizes off the 32/64 tiles; 100 and 36 are not multiples of 8
    // either (the element-by-element copy path of the GEMM tiles).
    for (hidden, inter) in [(200, 72), (100, 36), (256, 160)] {
        for rows in [1, 7, 64, 300] {
            for n_exp in [4, 8] {
                for top_k in [1, 2] {
                    for renormalize in [false, true] {
                        moe_case(rows, n_exp, top_k, renormalize, hidden, inter);
                    }
                }
            }
        }
    }
    // Qwen3-MoE's routing width: 128 experts, 8 per token, more rows than a tile.
    moe_case(130, 128, 8, true, 128, 64);
}

/// Logits of all 64 positions of one prompt through `Model` on both backends.
fn logits_both(dir: &std::path::Path, prompt: &[u32]) -> (Vec<f32>, Vec<f32>) {
    use llmd::model::{Model, ModelConfig, ModelLimits, ModelRunner};
    let n = prompt.len();
    let limits = ModelLimits {
        max_tokens: n,
        max_logit_rows: n,
        max_positions: 512,
        num_blocks: 64,
        block_size: 16,
    };
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let mut p = plan(&[(0, n)], 16, 64, 3);
    p.token_ids = prompt.to_vec();
    p.logits_indices = (0..n as u32).collect();
    let mut cpu_logits = Vec::new();
    let mut gpu_logits = Vec::new();
    Model::load(
        CpuBackend::default(),
        dir,
        cfg.clone(),
        limits,
        &mut |_, _| {},
    )
    .unwrap()
    .execute(&p, &mut cpu_logits)
    .unwrap();
    Model::load(gpu(), dir, cfg, limits, &mut |_, _| {})
        .unwrap()
        .execute(&p, &mut gpu_logits)
        .unwrap();
    (cpu_logits, gpu_logits)
}

#[test]
#[ignore]
fn model_logits_match_cpu_within_bf16() {
    let mut dirs = Vec::new();
    let tmp = tempfile::tempdir().unwrap();
    // Every architecture: mixtures of experts (Mixtral, Qwen3-MoE) and soft-capping (Gemma 2)
    // included.
    for arch in common::Arch::ALL {
        // head_dim 64, the smallest real-model head size, with GQA 2.
        let mut spec = common::TinyModelSpec::new(arch);
        spec.hidden = 256;
        spec.heads = 4;
        spec.kv_heads = 2;
        spec.intermediate = 512;
        let d = tmp.path().join(format!("{arch:?}"));
        common::write_tiny_model(&d, &spec);
        dirs.push(d);
    }
    // Phi-3 LongRoPE (long factors: 512 positions over 32 original) with Phi-4-mini's partial
    // rotary (48 of 64 dimensions): the rope kernel reads the narrower table.
    let mut spec = common::TinyModelSpec::new(common::Arch::Phi3);
    (spec.hidden, spec.heads, spec.kv_heads, spec.intermediate) = (256, 4, 2, 512);
    let d = tmp.path().join("Phi3-longrope-partial");
    common::write_tiny_model(&d, &spec);
    common::set_longrope(&d, &spec, 32, Some(0.75));
    dirs.push(d);
    // Windows shorter than the 64-token prompt: every layer (Mistral), alternating (Gemma 2,
    // with its soft-capping).
    for (arch, window) in [(common::Arch::Mistral, 24), (common::Arch::Gemma2, 16)] {
        let mut spec = common::TinyModelSpec::new(arch);
        (spec.hidden, spec.heads, spec.kv_heads, spec.intermediate) = (256, 4, 2, 512);
        let d = tmp.path().join(format!("{arch:?}-window{window}"));
        common::write_tiny_model(&d, &spec);
        common::edit_config(&d, |cfg| cfg["sliding_window"] = serde_json::json!(window));
        dirs.push(d);
    }
    dirs.extend(common::gpu_models().into_iter().map(|(_, d)| d));
    for dir in dirs {
        let vocab = llmd::model::ModelConfig::from_dir(&dir).unwrap().vocab_size as u32;
        let prompt: Vec<u32> = (0..64u32).map(|i| 1 + (i * 7919) % (vocab - 1)).collect();
        let (c, g) = logits_both(&dir, &prompt);
        let scale = c.iter().fold(0f32, |m, &v| m.max(v.abs()));
        let diff = common::max_abs_diff(&c, &g);
        println!(
            "{}: max |logit diff| {diff:.4} (logit scale {scale:.2})",
            dir.display()
        );
        assert!(
            diff <= 0.05 * scale.max(1.0),
            "{}: {diff} vs scale {scale}",
            dir.display()
        );
    }
}

#[test]
#[ignore]
fn shared_models_greedy_32_tokens_match_cpu() {
    for (name, dir) in common::gpu_models() {
        let params = llmd::SamplingParams {
            max_tokens: Some(32),
            ignore_eos: true,
            ..llmd::SamplingParams::greedy()
        };
        let prompts: Vec<llmd::Prompt> = vec![
            "Once upon a time".into(),
            "The little dog was very happy".into(),
        ];
        let run = |device| {
            let mut cfg = llmd::EngineConfig::new(&dir);
            cfg.device = device;
            // Defaults throughout: on the GPU the KV cache is sized from its memory.
            llmd::Engine::new(cfg)
                .unwrap()
                .generate(prompts.clone(), &params)
                .unwrap()
        };
        let cpu = run(llmd::config::DeviceKind::Cpu);
        let gpu = run(llmd::config::DeviceKind::Cuda(0));
        for (c, g) in cpu.iter().zip(&gpu) {
            assert_eq!(
                g.token_ids, c.token_ids,
                "{name}: {:?} vs {:?}",
                g.text, c.text
            );
        }
    }
}

#[test]
#[ignore]
fn cuda_graphs_give_the_eager_tokens() {
    // The largest model of the run (the last of LLMD_GPU_MODELS), never a silent fallback.
    let (_, dir) = common::gpu_models()
        .pop()
        .expect("LLMD_GPU_MODELS names no model");
    graphs_give_the_eager_tokens(&dir);
}

#[test]
#[ignore]
fn moe_models_give_the_eager_tokens_in_cuda_graphs() {
    // Routing, permutation and the grouped GEMMs captured in decode graphs and replayed with
    // other batches (and padding rows, which are routed too).
    for arch in [common::Arch::Mixtral, common::Arch::Qwen3Moe] {
        let dir = common::tiny_model_dir(&common::TinyModelSpec::new(arch));
        graphs_give_the_eager_tokens(dir.path());
    }
}

/// Decode batches of several sizes (padded to the captured sizes 1, 2, 4, 8, 16 ...), each
/// size seen three times (eager warm-up, capture, replay): the same tokens as eager mode.
fn graphs_give_the_eager_tokens(dir: &std::path::Path) {
    let params = llmd::SamplingParams {
        max_tokens: Some(24),
        ignore_eos: true,
        ..llmd::SamplingParams::greedy()
    };
    let prompts: Vec<llmd::Prompt> = (0..13)
        .map(|i| format!("Story number {i}: once upon a time").into())
        .collect();
    let run = |eager: bool| {
        let mut cfg = llmd::EngineConfig::new(dir);
        cfg.device = llmd::config::DeviceKind::Cuda(0);
        cfg.enforce_eager = eager;
        cfg.cache.num_blocks = Some(512);
        let engine = llmd::Engine::new(cfg).unwrap();
        let mut all = Vec::new();
        for k in [1usize, 3, 5, 13] {
            all.push(engine.generate(prompts[..k].to_vec(), &params).unwrap());
        }
        all
    };
    let (eager, graphs) = (run(true), run(false));
    for (e, g) in eager.iter().flatten().zip(graphs.iter().flatten()) {
        assert_eq!(g.token_ids, e.token_ids, "{:?} vs {:?}", g.text, e.text);
    }
}

#[test]
#[ignore]
fn device_argmax_matches_host_argmax() {
    let (cpu, g) = (CpuBackend::default(), gpu());
    for (rows, vocab) in [(1, 512), (7, 49152), (64, 151936)] {
        let mut logits = rand_vec(rows * vocab, 31, 8.0);
        // A tie in every row: the lowest id must win on both sides.
        for r in 0..rows {
            logits[r * vocab + 3] = 100.0;
            logits[r * vocab + vocab - 1] = 100.0;
        }
        let (mut c, mut d) = (Vec::new(), Vec::new());
        cpu.argmax_rows(&logits, rows, vocab, &mut c).unwrap();
        g.argmax_rows(&g.upload(&logits).unwrap(), rows, vocab, &mut d)
            .unwrap();
        assert_eq!(d, c, "{rows}x{vocab}");
        assert!(c.iter().all(|&t| t == 3));
    }
}

#[test]
#[ignore]
fn device_sampling_matches_the_reference() {
    use llmd::backend::cpu::sampling::{kept_weights, sample_row, RowSampling};
    let g = gpu();
    let row = |temperature, top_k, top_p, min_p| RowSampling {
        temperature,
        top_k,
        top_p,
        min_p,
        u: 0.0,
    };
    let kinds = [
        row(1.0, 0, 1.0, 0.0),
        row(0.7, 50, 1.0, 0.0),
        row(0.8, 0, 0.9, 0.0),
        row(1.3, 40, 0.8, 0.0),
        row(1.0, 0, 1.0, 0.05),
        row(0.5, 100, 0.95, 0.02),
        row(2.0, 0, 0.3, 0.0),
        RowSampling::GREEDY,
        row(1.0, 1, 1.0, 0.0),
        row(1e-3, 0, 0.5, 0.0),
    ];
    let (mut samples, mut mismatches) = (0usize, Vec::new());
    for (rows, vocab, scale) in [(10, 512, 4.0), (30, 49152, 12.0), (20, 151936, 20.0)] {
        // bf16 logits: many exact ties, which both sides must treat alike.
        let mut logits = rand_vec(rows * vocab, vocab as u64, scale);
        // Edge rows: one finite token; NaN and -inf scattered; all masked.
        logits[..vocab].fill(f32::NEG_INFINITY);
        logits[vocab / 2] = 1.0;
        for i in (0..vocab).step_by(7) {
            logits[vocab + i] = if i % 2 == 0 {
                f32::NAN
            } else {
                f32::NEG_INFINITY
            };
        }
        logits[2 * vocab..3 * vocab].fill(f32::NEG_INFINITY);
        let d_logits = g.upload(&logits).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(rows as u64);
        for trial in 0..20 {
            let params: Vec<RowSampling> = (0..rows)
                .map(|r| RowSampling {
                    u: (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64,
                    ..kinds[(r + trial) % kinds.len()]
                })
                .collect();
            let mut got = Vec::new();
            g.sample_rows(&d_logits, vocab, &params, &mut got).unwrap();
            for (r, p) in params.iter().enumerate() {
                let l = &logits[r * vocab..(r + 1) * vocab];
                let want = sample_row(l, p);
                samples += 1;
                if got[r] == want {
                    continue;
                }
                // expf on the device and exp here may differ in the last bit, which moves a
                // draw that lands right on a boundary: allowed rarely, and only onto a token
                // the reference keeps.
                let kept =
                    p.is_greedy() || kept_weights(l, p).is_some_and(|w| w[got[r] as usize] > 0);
                assert!(kept, "{rows}x{vocab} row {r} {p:?}: {} is not kept", got[r]);
                assert!(!p.is_greedy(), "greedy row {r}: {} vs {want}", got[r]);
                mismatches.push((vocab, r, *p, got[r], want));
            }
        }
    }
    assert!(
        mismatches.len() * 200 <= samples,
        "{} of {samples} draws differ: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );
}

#[test]
#[ignore]
fn bf16_weights_upload_as_stored() {
    let g = gpu();
    let vals = rand_vec(1000, 41, 3.0);
    let bits: Vec<u16> = vals
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    let mut bytes = vec![0u8]; // one byte in front: `bytes[1..]` is misaligned for u16
    bytes.extend(bits.iter().flat_map(|b| b.to_le_bytes()));
    let shape = [1000];
    for data in [&bytes[1..], bytemuck::cast_slice::<u16, u8>(&bits)] {
        let t = HostTensor {
            dtype: HostDType::BF16,
            shape: &shape,
            data,
        };
        let w = g.load_weight(t).unwrap();
        let WeightData::Bf16(d) = &w.data else {
            panic!("bf16 weight expected")
        };
        assert_close(
            "bf16 upload",
            &g.download(d, 1000).unwrap(),
            &vals,
            0.0,
            0.0,
        );
    }
}

/// The KV tiers' block copies: a block read from the GPU cache holds exactly the CPU cache's
/// values (in bf16), and writing it into another block of a fresh cache makes that block equal.
#[test]
#[ignore = "needs a CUDA device"]
fn kv_block_read_write_match_cpu() {
    let (cpu, g) = (CpuBackend::default(), gpu());
    let kd = KvCacheDims {
        num_blocks: 9,
        block_size: 16,
        num_kv_heads: 3,
        head_dim: 64,
    };
    let k = rand_vec(kd.numel(), 21, 1.0);
    let v = rand_vec(kd.numel(), 22, 1.0);
    let bits = |x: &[f32]| -> Vec<u16> {
        x.iter()
            .map(|&f| half::bf16::from_f32(f).to_bits())
            .collect()
    };
    let ccache = CpuKvCache {
        dims: kd,
        k: k.clone(),
        v: v.clone(),
    };
    let gcache = CudaKvCache {
        dims: kd,
        k: g.stream().clone_htod(&bits(&k)).unwrap(),
        v: g.stream().clone_htod(&bits(&v)).unwrap(),
    };
    let n = kd.block_numel();
    let mut c = vec![0u8; 2 * n * 4];
    let mut b = vec![0u8; 2 * n * 2];
    for block in [0, 4, 8] {
        cpu.read_kv_block(&ccache, block, &mut c).unwrap();
        g.read_kv_block(&gcache, block, &mut b).unwrap();
        let from_cpu: Vec<u16> = c
            .chunks_exact(4)
            .map(|x| half::bf16::from_f32(f32::from_le_bytes([x[0], x[1], x[2], x[3]])).to_bits())
            .collect();
        let from_gpu: Vec<u16> = b
            .chunks_exact(2)
            .map(|x| u16::from_le_bytes([x[0], x[1]]))
            .collect();
        assert_eq!(from_gpu, from_cpu, "block {block}");
        // Into block 1 of a zeroed cache: only that block changes.
        let mut fresh = g.alloc_kv_cache(kd).unwrap();
        g.write_kv_block(&mut fresh, 1, &b).unwrap();
        let mut back = vec![0u8; b.len()];
        g.read_kv_block(&fresh, 1, &mut back).unwrap();
        assert_eq!(back, b);
        g.read_kv_block(&fresh, 2, &mut back).unwrap();
        assert!(back.iter().all(|&x| x == 0), "block 2 untouched");
    }
    assert!(
        g.read_kv_block(&gcache, 9, &mut b).is_err(),
        "block out of range"
    );
    assert!(
        g.read_kv_block(&gcache, 0, &mut b[1..]).is_err(),
        "wrong size"
    );

    // Many blocks of several layers at once (the gather and scatter kernels, through the
    // device staging buffer): the bytes of the one-block path, block after block and layer
    // after layer, and more blocks than one round of the staging buffer holds.
    let random_layers = |dims: KvCacheDims, layers: usize, seed: u64| -> Vec<CudaKvCache> {
        let upload = |s: u64| {
            g.stream()
                .clone_htod(&bits(&rand_vec(dims.numel(), s, 1.0)))
                .unwrap()
        };
        (0..layers as u64)
            .map(|l| CudaKvCache {
                dims,
                k: upload(seed + 2 * l),
                v: upload(seed + 2 * l + 1),
            })
            .collect()
    };
    let layers = random_layers(kd, 3, 30);
    let blocks = [8, 0, 3, 3, 5];
    let piece = 2 * n * 2;
    let mut packed = vec![0u8; blocks.len() * layers.len() * piece];
    g.read_kv_blocks(&layers, &blocks, &mut packed).unwrap();
    let mut want = Vec::new();
    for &blk in &blocks {
        for c in &layers {
            g.read_kv_block(c, blk, &mut b).unwrap();
            want.extend_from_slice(&b);
        }
    }
    assert_eq!(packed, want, "gathered blocks");
    let mut fresh: Vec<CudaKvCache> = (0..3).map(|_| g.alloc_kv_cache(kd).unwrap()).collect();
    let to = [1, 2, 4, 6, 7];
    g.write_kv_blocks(&mut fresh, &to, &packed).unwrap();
    let mut back = vec![0u8; packed.len()];
    g.read_kv_blocks(&fresh, &to, &mut back).unwrap();
    assert_eq!(back, packed, "scattered blocks read back");
    let mut zero = vec![0u8; layers.len() * piece];
    g.read_kv_blocks(&fresh, &[0], &mut zero).unwrap();
    assert!(zero.iter().all(|&x| x == 0), "block 0 untouched");
    assert!(
        g.read_kv_blocks(&layers, &[9], &mut zero).is_err(),
        "out of range"
    );
    assert!(
        g.read_kv_blocks(&layers, &[0], &mut zero[2..]).is_err(),
        "wrong size"
    );
    // Rounds: a geometry whose blocks are 1/3 of the staging buffer, 7 blocks of it.
    let big = KvCacheDims {
        num_blocks: 8,
        block_size: 64,
        num_kv_heads: 8,
        head_dim: 128,
    };
    let per_layer = 2 * big.block_numel() * 2;
    let nl = (KV_STAGING_BYTES / 3 / per_layer).max(1);
    let caches = random_layers(big, nl, 50);
    let blocks = [7, 6, 5, 4, 3, 2, 1];
    let mut packed = vec![0u8; blocks.len() * nl * per_layer];
    g.read_kv_blocks(&caches, &blocks, &mut packed).unwrap();
    let mut one = vec![0u8; per_layer];
    for (i, &blk) in blocks.iter().enumerate() {
        for (l, c) in caches.iter().enumerate() {
            g.read_kv_block(c, blk, &mut one).unwrap();
            let at = (i * nl + l) * per_layer;
            assert!(
                packed[at..at + per_layer] == one[..],
                "block {blk} layer {l}"
            );
        }
    }
    let mut fresh: Vec<CudaKvCache> = (0..nl).map(|_| g.alloc_kv_cache(big).unwrap()).collect();
    g.write_kv_blocks(&mut fresh, &blocks, &packed).unwrap();
    let mut back = vec![0u8; packed.len()];
    g.read_kv_blocks(&fresh, &blocks, &mut back).unwrap();
    assert!(back == packed, "rounds of the staging buffer");
    // Asynchronously (the tiers' offload): more than one slot holds reads at once too.
    let got = g
        .read_kv_blocks_async(&caches, &blocks, packed.len())
        .unwrap()
        .wait()
        .unwrap();
    assert!(got == packed, "an async read larger than a slot");
    let two = &blocks[..2];
    let want2 = &packed[..2 * nl * per_layer];
    let inflight: Vec<_> = (0..KV_PINNED_SLOTS + 2)
        .map(|_| g.read_kv_blocks_async(&caches, two, want2.len()).unwrap())
        .collect();
    // The staging buffer written again while the copies run: they still give what was read.
    g.write_kv_blocks(
        &mut fresh,
        &[0, 1],
        &packed[2 * nl * per_layer..4 * nl * per_layer],
    )
    .unwrap();
    for (i, p) in inflight.into_iter().enumerate() {
        assert!(p.wait().unwrap() == want2, "async read {i}");
    }
    drop(g.read_kv_blocks_async(&caches, two, want2.len()).unwrap());
    let got = g
        .read_kv_blocks_async(&fresh, &[0, 1], want2.len())
        .unwrap()
        .wait()
        .unwrap();
    assert!(
        got[..] == packed[2 * nl * per_layer..4 * nl * per_layer],
        "after a dropped read"
    );
}

/// With defaults the KV cache takes what `--gpu-memory-utilization` (0.9) leaves once the
/// weights and step buffers are in: the device ends up between 80 % and 90 % used, and a
/// request runs. A utilization below what the weights already use is refused, naming it.
#[test]
#[ignore = "needs a CUDA device"]
fn kv_cache_is_sized_from_gpu_memory() {
    let (_, dir) = common::gpu_models()
        .into_iter()
        .next()
        .expect("a GPU test model");
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    let (free0, total) = ctx.mem_get_info().unwrap();
    let mut cfg = llmd::EngineConfig::new(&dir);
    cfg.device = llmd::config::DeviceKind::Cuda(0);
    let engine = llmd::Engine::new(cfg).unwrap();
    let (free, _) = ctx.mem_get_info().unwrap();
    let used = (total - free) as f64 / total as f64;
    let others = (total - free0) as f64 / total as f64;
    println!(
        "device {:.1} GiB: {:.3} used before, {used:.3} with the engine, {} KV blocks",
        total as f64 / (1u64 << 30) as f64,
        others,
        engine.limits().num_blocks
    );
    assert!(used <= 0.9 + 0.01, "used {used}");
    assert!(used >= 0.8, "the KV cache left memory unused: {used}");
    let params = llmd::SamplingParams {
        max_tokens: Some(8),
        ..llmd::SamplingParams::greedy()
    };
    let out = engine
        .generate(vec!["Once upon a time".into()], &params)
        .unwrap();
    assert_eq!(out[0].token_ids.len(), 8);
    drop(engine);
    let mut cfg = llmd::EngineConfig::new(&dir);
    cfg.device = llmd::config::DeviceKind::Cuda(0);
    cfg.cache.gpu_memory_utilization = 0.0001;
    let e = llmd::Engine::new(cfg)
        .err()
        .expect("no room for the KV cache")
        .to_string();
    assert!(
        e.contains("--gpu-memory-utilization") && e.contains("tokens"),
        "{e}"
    );
}
