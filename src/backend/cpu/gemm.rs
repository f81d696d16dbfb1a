//! Batch-invariant f32 matrix multiply for `nn.Linear`-shaped weights: `out = x · wᵀ`.
//!
//! Batch invariance is the contract: `out[i, j]` is bitwise the same whatever `m` is, whichever
//! other rows are in `x`, and however many threads run. Each output element is one dot product
//! of `x[i]` and `w[j]` accumulated in 8 fixed lanes (lane `l` sums the products at `k ≡ l mod
//! 8`, in increasing `k`), combined by a fixed tree, then the tail `k % 8` elements in order.
//! Tiling and threading only decide *when* each dot product runs, never its arithmetic.
//!
//! Speed: threads split the weight rows (so at `m = 1` every core streams its own part of `w`,
//! the memory-bound decode case); inside a task a block of 4 weight rows stays in L1 while it is
//! dotted with every row of an `x` tile, so weights are read from memory once per step. AVX2+FMA
//! is used when the CPU has it (detected once); other CPUs run the portable path, which has the
//! same lane structure (FMA and non-FMA results differ in rounding, so a process always uses one).
use rayon::prelude::*;
use std::sync::OnceLock;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 16;
/// Rows of `x` processed against one weight block before moving on (keeps the x tile in L2).
const X_TILE: usize = 64;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, all row-major.
pub fn matmul_nt(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "matmul_nt: buffers too small for m={m} k={k} n={n}"
    );
    if m == 0 || n == 0 {
        return;
    }
    let out_ptr = SendPtr(out.as_mut_ptr());
    let kernel = kernel();
    let tasks = n.div_ceil(ROWS_PER_TASK);
    let run = |t: usize| {
        let j0 = t * ROWS_PER_TASK;
        let j1 = (j0 + ROWS_PER_TASK).min(n);
        for i0 in (0..m).step_by(X_TILE) {
            let i1 = (i0 + X_TILE).min(m);
            let mut j = j0;
            while j < j1 {
                let rows = (j1 - j).min(4);
                for i in i0..i1 {
                    let xi = &x[i * k..(i + 1) * k];
                    let mut acc = [0f32; 4];
                    kernel(xi, &w[j * k..(j + rows) * k], k, rows, &mut acc);
                    // SAFETY: task t alone writes columns j0..j1 of every row, and
                    // i < m, j + rows <= n keep the writes inside `out`.
                    unsafe {
                        let dst = out_ptr.get().add(i * n + j);
                        std::ptr::copy_nonoverlapping(acc.as_ptr(), dst, rows);
                    }
                }
                j += rows;
            }
        }
    };
    // Small products are not worth a thread hand-off.
    if m * n * k < 1 << 15 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only for the disjoint column ranges described in `matmul_nt`.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Dot products of one `x` row with `rows` (1..=4) consecutive weight rows.
type Kernel = fn(x: &[f32], w: &[f32], k: usize, rows: usize, out: &mut [f32; 4]);

fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return dots_avx2_entry;
        }
        dots_portable
    })
}

/// The fixed combination of the 8 lanes.
#[inline(always)]
fn reduce8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

fn dots_portable(x: &[f32], w: &[f32], k: usize, rows: usize, out: &mut [f32; 4]) {
    let body = k / 8 * 8;
    for r in 0..rows {
        let wr = &w[r * k..(r + 1) * k];
        let mut acc = [0f32; 8];
        for (xc, wc) in x[..body].chunks_exact(8).zip(wr[..body].chunks_exact(8)) {
            for l in 0..8 {
                acc[l] += xc[l] * wc[l];
            }
        }
        let mut s = reduce8(acc);
        for t in body..k {
            s += x[t] * wr[t];
        }
        out[r] = s;
    }
}

#[cfg(target_arch = "x86_64")]
fn dots_avx2_entry(x: &[f32], w: &[f32], k: usize, rows: usize, out: &mut [f32; 4]) {
    // SAFETY: selected only when the CPU reports AVX2 and FMA.
    unsafe { dots_avx2(x, w, k, rows, out) }
}

/// Same lanes as `dots_portable`, with FMA: four weight rows share each load of `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(x: &[f32], w: &[f32], k: usize, rows: usize, out: &mut [f32; 4]) {
    use std::arch::x86_64::*;
    let body = k / 8 * 8;
    let xp = x.as_ptr();
    let wp = w.as_ptr();
    let store = |v: __m256| {
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), v);
        a
    };
    if rows == 4 {
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let mut t = 0;
        while t < body {
            let xv = _mm256_loadu_ps(xp.add(t));
            a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wp.add(t)), a0);
            a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wp.add(k + t)), a1);
            a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wp.add(2 * k + t)), a2);
            a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wp.add(3 * k + t)), a3);
            t += 8;
        }
        for (r, a) in [a0, a1, a2, a3].into_iter().enumerate() {
            let mut s = reduce8(store(a));
            for t in body..k {
                s = x[t].mul_add(w[r * k + t], s);
            }
            out[r] = s;
        }
    } else {
        for r in 0..rows {
            let mut a = _mm256_setzero_ps();
            let mut t = 0;
            while t < body {
                a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xp.add(t)),
                    _mm256_loadu_ps(wp.add(r * k + t)),
                    a,
                );
                t += 8;
            }
            let mut s = reduce8(store(a));
            for t in body..k {
                s = x[t].mul_add(w[r * k + t], s);
            }
            out[r] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut o = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        o
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        let mut seed = 1;
        for (m, k, n) in [
            (1, 64, 192),
            (3, 61, 37),
            (16, 576, 67),
            (37, 13, 5),
            (70, 200, 9),
            (1, 7, 1),
        ] {
            let x = rand_vec(m * k, &mut seed);
            let w = rand_vec(n * k, &mut seed);
            let mut out = vec![0f32; m * n];
            matmul_nt(&x, &w, &mut out, m, k, n);
            let r = reference(&x, &w, m, k, n);
            for (a, b) in out.iter().zip(&r) {
                let tol = 1e-4 * (1.0 + b.abs()) * (k as f64).sqrt();
                assert!((*a as f64 - b).abs() < tol, "m={m} k={k} n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn hand_computed() {
        // x = [[1, 2], [3, 4]], w = [[1, 0], [0, 1], [1, 1]] → x·wᵀ = [[1, 2, 3], [3, 4, 7]]
        let mut out = [0f32; 6];
        matmul_nt(
            &[1.0, 2.0, 3.0, 4.0],
            &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            &mut out,
            2,
            2,
            3,
        );
        assert_eq!(out, [1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
    }

    #[test]
    fn batch_and_thread_invariant() {
        let mut seed = 9;
        let (m, k, n) = (150, 333, 131);
        let x = rand_vec(m * k, &mut seed);
        let w = rand_vec(n * k, &mut seed);
        let mut full = vec![0f32; m * n];
        matmul_nt(&x, &w, &mut full, m, k, n);
        for i in [0, 1, 63, 64, 149] {
            let mut one = vec![0f32; n];
            matmul_nt(&x[i * k..(i + 1) * k], &w, &mut one, 1, k, n);
            let row: Vec<u32> = full[i * n..(i + 1) * n]
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let alone: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
            assert_eq!(row, alone, "row {i} differs alone vs batched");
        }
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut o = vec![0f32; m * n];
            pool.install(|| matmul_nt(&x, &w, &mut o, m, k, n));
            assert!(
                o.iter().zip(&full).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{threads} threads"
            );
        }
    }
}
