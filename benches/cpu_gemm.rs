//! CPU GEMM/GEMV micro-bench on SmolLM2-135M's shapes, against this machine's measured limits,
//! in one run:
//!
//! - memory: a parallel copy (read + written bytes) and a parallel read (sum) of 256 MiB each;
//! - FMA peak: a tight loop of independent FMA chains on every thread, with the widest vectors
//!   the CPU has (the peak the GEMM could reach);
//! - decode (`m = 1`): one token's worth of products through 30 layers of distinct weights
//!   (qkv 960×576, o 576×576, gate_up 3072×576, down 576×1536) plus the 49152×576 lm_head, so
//!   the working set (bf16 ≈ 270 MB) is far beyond the caches: weight bytes read per second,
//!   int8 (Q8_0), bf16 and f32 weights, every kernel path, and the ratio to the read bandwidth;
//! - prefill (`m` = 512): GFLOP/s per shape and the fraction of the FMA peak, for our kernels and
//!   for the `gemm` crate (f32, on the same weights widened; not batch invariant) as a yardstick.
//!
//! Run: `cargo bench --bench cpu_gemm` (RAYON_NUM_THREADS sets the threads; LLMD_BENCH_M the
//! prefill rows).
#[path = "support/env.rs"]
mod env;
#[path = "support/splitmix.rs"]
mod splitmix;
use env::env_usize;

use llmd::backend::cpu::gemm::WeightDType;
use llmd::backend::cpu::gemm::{available_isas, detected_isa, matmul_with, Isa, PackedMatrix};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

const HIDDEN: usize = 576;
const INTER: usize = 1536;
const VOCAB: usize = 49152;
const HEAD_DIM: usize = 64;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const LAYERS: usize = 30;

/// `n` values uniform in [-0.1, 0.1) from the benches' SplitMix64.
fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| ((splitmix::next(seed) >> 40) as f32 / (1u64 << 24) as f32) * 0.2 - 0.1)
        .collect()
}

fn pack(w: &[f32], n: usize, k: usize, dtype: WeightDType) -> PackedMatrix {
    match dtype {
        WeightDType::F32 => PackedMatrix::from_f32(w, n, k).unwrap(),
        WeightDType::Bf16 => {
            let b: Vec<u16> = w
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            PackedMatrix::from_half_bits(&b, n, k, dtype).unwrap()
        }
        WeightDType::F16 => {
            let b: Vec<u16> = w
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            PackedMatrix::from_half_bits(&b, n, k, dtype).unwrap()
        }
        WeightDType::Q8_0 => PackedMatrix::from_f32_q8(w, n, k).unwrap(),
    }
}

/// Best seconds per call of `f` over a few rounds of at least `min` each.
fn time(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    // Best of several rounds: on a shared machine the quiet rounds are the machine's figure.
    for _ in 0..5 {
        let (t0, mut n) = (Instant::now(), 0u32);
        while t0.elapsed() < min || n == 0 {
            f();
            n += 1;
        }
        best = best.min(t0.elapsed().as_secs_f64() / n as f64);
    }
    best
}

/// Copy and read bandwidth, GB/s.
fn memory_bandwidth() -> (f64, f64) {
    let len = 256 << 20;
    let src: Vec<u64> = (0..len / 8).map(|i| i as u64).collect();
    let mut dst = vec![0u64; len / 8];
    let chunk = (1 << 20) / 8;
    let copy = time(Duration::from_millis(300), || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        black_box(&mut dst);
    });
    let read = time(Duration::from_millis(300), || {
        let s: u64 = src
            .par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .sum();
        black_box(s);
    });
    (2.0 * len as f64 / copy / 1e9, len as f64 / read / 1e9)
}

/// FMA peak over all threads, GFLOP/s (2 flops per lane per FMA).
fn fma_peak(isa: Isa) -> f64 {
    let threads = rayon::current_num_threads();
    let iters = 20_000_000usize;
    let t = time(Duration::from_millis(200), || {
        let f: f32 = (0..threads)
            .into_par_iter()
            .map(|i| fma_loop(isa, iters / 16, i as f32))
            .sum();
        black_box(f);
    });
    let lanes = match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 => 8,
        Isa::Portable => 1,
    };
    (threads * (iters / 16) * 12 * lanes * 2) as f64 / t / 1e9
}

fn fma_loop(isa: Isa, iters: usize, seed: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: only for paths the CPU has.
        Isa::Avx512 => return unsafe { fma_avx512(iters, seed) },
        Isa::Avx2 => return unsafe { fma_avx2(iters, seed) },
        Isa::Portable => {}
    }
    let mut a = [seed; 12];
    for _ in 0..iters {
        for v in &mut a {
            *v = v.mul_add(0.999_999, 1e-7);
        }
    }
    a.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(iters: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let (m, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut a = [_mm512_set1_ps(seed); 12];
    for _ in 0..iters {
        for v in &mut a {
            *v = _mm512_fmadd_ps(*v, m, c);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in a {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut a = [_mm256_set1_ps(seed); 12];
    for _ in 0..iters {
        for v in &mut a {
            *v = _mm256_fmadd_ps(*v, m, c);
        }
    }
    let mut out = [0f32; 8];
    let mut s = _mm256_setzero_ps();
    for v in a {
        s = _mm256_add_ps(s, v);
    }
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

/// `(name, n, k)` of one layer's products.
fn layer_shapes() -> [(&'static str, usize, usize); 4] {
    let qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
    [
        ("qkv", qkv, HIDDEN),
        ("o", HIDDEN, HEADS * HEAD_DIM),
        ("gate_up", 2 * INTER, HIDDEN),
        ("down", HIDDEN, INTER),
    ]
}

fn main() {
    let threads = rayon::current_num_threads();
    println!(
        "cpu_gemm: {threads} threads, best path {:?}",
        detected_isa()
    );
    let (copy_bw, read_bw) = memory_bandwidth();
    println!("memory: copy {copy_bw:.1} GB/s (read + written), read {read_bw:.1} GB/s");
    let best = detected_isa();
    // The best of a few tries (a busy core lowers it, nothing raises it).
    let peak = (0..3).map(|_| fma_peak(best)).fold(0.0, f64::max);
    println!("FMA peak ({best:?}, f32): {peak:.1} GFLOP/s");

    // Decode: a whole model's distinct weights, one token.
    let mut seed = 7;
    for dtype in [WeightDType::Q8_0, WeightDType::Bf16, WeightDType::F32] {
        let mut mats = Vec::new();
        for _ in 0..LAYERS {
            for (_, n, k) in layer_shapes() {
                mats.push(pack(&rand_vec(n * k, &mut seed), n, k, dtype));
            }
        }
        mats.push(pack(
            &rand_vec(VOCAB * HIDDEN, &mut seed),
            VOCAB,
            HIDDEN,
            dtype,
        ));
        let bytes: usize = mats.iter().map(|m| m.bytes()).sum();
        let x = rand_vec(INTER, &mut seed);
        let mut out = vec![0f32; VOCAB];
        for isa in available_isas() {
            if isa == Isa::Portable && best != Isa::Portable {
                continue; // minutes per figure; the tests cover its results
            }
            let t = time(Duration::from_millis(500), || {
                for w in &mats {
                    matmul_with(isa, &x[..w.k], w, &mut out[..w.n], 1);
                }
                black_box(&mut out);
            });
            let gbs = bytes as f64 / t / 1e9;
            println!(
                "decode m=1 {dtype:?} {isa:?}: {:.2} ms/token, {:.0} MB weights, {gbs:.1} GB/s = {:.2} × read bandwidth",
                t * 1e3,
                bytes as f64 / 1e6,
                gbs / read_bw
            );
        }
    }

    // Prefill (LLMD_BENCH_M=0: decode only).
    let m = env_usize("LLMD_BENCH_M", 512);
    if m == 0 {
        return;
    }
    let x = rand_vec(m * INTER, &mut seed);
    for (name, n, k) in layer_shapes() {
        let w = rand_vec(n * k, &mut seed);
        let flops = 2.0 * (m * n * k) as f64;
        let mut out = vec![0f32; m * n];
        for dtype in [WeightDType::Q8_0, WeightDType::Bf16, WeightDType::F32] {
            let pw = pack(&w, n, k, dtype);
            for isa in available_isas() {
                if isa == Isa::Portable && best != Isa::Portable {
                    continue;
                }
                let t = time(Duration::from_millis(300), || {
                    matmul_with(isa, &x[..m * k], &pw, &mut out, m);
                    black_box(&mut out);
                });
                let g = flops / t / 1e9;
                println!(
                    "prefill m={m} {name} {n}x{k} {dtype:?} {isa:?}: {g:.1} GFLOP/s = {:.2} × peak",
                    g / peak
                );
            }
        }
        // The gemm crate, f32 weights (bf16 values widened), same product.
        let t = time(Duration::from_millis(300), || {
            // SAFETY: x is m×k row-major, w n×k row-major read as wᵀ (k×n, column stride k),
            // out m×n row-major; all in bounds.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            }
            black_box(&mut out);
        });
        let g = flops / t / 1e9;
        println!(
            "prefill m={m} {name} {n}x{k} gemm crate f32: {g:.1} GFLOP/s = {:.2} × peak",
            g / peak
        );
    }
}
