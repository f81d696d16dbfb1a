//! Batch-invariant matrix multiply for `nn.Linear`-shaped weights, `out = x · wᵀ`, with the
//! weights kept in their checkpoint's precision (bf16, f16 or f32) and widened to f32 in
//! registers; activations and accumulation are f32.
//!
//! Batch invariance is the contract: `out[i, j]` is bitwise the same whatever `m` is, whichever
//! other rows are in `x`, however many threads run, and whichever kernel path computes it. Each
//! output element is one chain of fused multiply-adds over `k` in increasing order, starting
//! from 0: `s = fma(x[i, t], w[j, t], s)`. Widening bf16/f16 to f32 is exact, so every path
//! (AVX-512, AVX2+FMA+F16C, the portable one, widened in registers or in a packed panel) does
//! the same arithmetic and gets the same bits; tiling and threading only decide *when* each
//! chain runs. The portable path uses `f32::mul_add`, a true fused multiply-add (a libm call on
//! an x86 CPU without FMA: slow, but such CPUs predate AVX2).
//!
//! Layout: weights are packed at load into panels of [`NR`] = 16 consecutive output rows,
//! `[n / 16][k][16]` (the last panel zero-padded), so one 16-wide vector holds the 16 panel
//! rows' elements at one `k`. A kernel broadcasts `x[i, t]` and multiplies it into a whole
//! vector of outputs: no horizontal sums, and the decode product (`m = 1`, memory-bound) reads
//! the weights as one contiguous stream. Threads split the panels, so at `m = 1` each core
//! streams its own part of `w`. For larger `m` (prefill) the micro-kernel keeps an `MR × 4`
//! panel tile of accumulators in registers (6 × 64 outputs with AVX-512), and a task's half
//! precision panels are first widened once into an f32 scratch buffer that stays in L2, so the
//! inner loop is loads, broadcasts and FMAs only.
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Output rows (weight rows) per panel: one AVX-512 vector, two AVX2 vectors.
pub const NR: usize = 16;
/// Most `x` rows a micro-kernel call handles.
const MR_MAX: usize = 6;
/// Most panels a micro-kernel call handles.
const NP_MAX: usize = 4;
/// From this many `x` rows on, half-precision panels are widened into an f32 scratch buffer
/// once per task instead of in registers for every `x` row group. Below it, writing and
/// re-reading the f32 copy costs more than it saves (measured: a batch of 16 decode rows ran
/// 13 % slower with the scratch than the old f32 weights did).
const WIDEN_MIN_M: usize = 32;
/// Bytes of f32 scratch per task: about half of a 2 MiB L2, the rest for the `x` rows.
const SCRATCH_BYTES: usize = 1 << 20;

/// Element type of a packed weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDType {
    F32,
    Bf16,
    F16,
    /// int8 in blocks of 32 along `k`, one f16 scale each (`--quantization int8`; see `q8`).
    Q8_0,
}

impl WeightDType {
    /// Bytes per element (Q8_0: its int8 value; the block scales add 1/16 byte more).
    pub fn size(self) -> usize {
        match self {
            WeightDType::F32 => 4,
            WeightDType::Bf16 | WeightDType::F16 => 2,
            WeightDType::Q8_0 => 1,
        }
    }
}

/// Packed elements: f32 values, or the raw bits of bf16/f16 ones.
enum Panels {
    F32(Vec<f32>),
    Half(Vec<u16>),
    /// Q8_0 panels, `q8`'s layout.
    Q8(Vec<u8>),
}

/// A `[n, k]` weight in the panel layout described in the module docs.
pub struct PackedMatrix {
    pub n: usize,
    pub k: usize,
    pub dtype: WeightDType,
    data: Panels,
}

impl PackedMatrix {
    /// Packs row-major f32 rows (`rows.len() == n * k`).
    pub fn from_f32(rows: &[f32], n: usize, k: usize) -> Option<Self> {
        assert_eq!(rows.len(), n * k, "PackedMatrix::from_f32: {n}x{k}");
        let data = pack(rows, n, k)?;
        Some(Self {
            n,
            k,
            dtype: WeightDType::F32,
            data: Panels::F32(data),
        })
    }

    /// Packs row-major bf16 or f16 bits (`rows.len() == n * k`).
    pub fn from_half_bits(rows: &[u16], n: usize, k: usize, dtype: WeightDType) -> Option<Self> {
        assert_eq!(rows.len(), n * k, "PackedMatrix::from_half_bits: {n}x{k}");
        assert!(dtype != WeightDType::F32, "half bits need a half dtype");
        let data = pack(rows, n, k)?;
        Some(Self {
            n,
            k,
            dtype,
            data: Panels::Half(data),
        })
    }

    /// Quantizes row-major f32 rows (`rows.len() == n * k`) to Q8_0.
    pub fn from_f32_q8(rows: &[f32], n: usize, k: usize) -> Option<Self> {
        assert_eq!(rows.len(), n * k, "PackedMatrix::from_f32_q8: {n}x{k}");
        Self::q8_with(n, k, |j, out| {
            out.copy_from_slice(&rows[j * k..(j + 1) * k])
        })
    }

    /// Quantizes `n` rows of `k` to Q8_0, row `j` written into the buffer by `row(j, buf)`.
    pub fn q8_with(n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Option<Self> {
        Some(Self {
            n,
            k,
            dtype: WeightDType::Q8_0,
            data: Panels::Q8(super::q8::pack(n, k, row)?),
        })
    }

    /// Bytes held (panels included padding).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Panels::F32(v) => v.len() * 4,
            Panels::Half(v) => v.len() * 2,
            Panels::Q8(v) => v.len(),
        }
    }

    fn index(&self, j: usize, t: usize) -> usize {
        (j / NR) * self.k * NR + t * NR + j % NR
    }

    /// Element `(j, t)` widened to f32 (exact; Q8_0: dequantized).
    pub fn get(&self, j: usize, t: usize) -> f32 {
        let i = self.index(j, t);
        match &self.data {
            Panels::F32(v) => v[i],
            Panels::Half(v) => widen(self.dtype, v[i]),
            Panels::Q8(v) => super::q8::get(v, self.k, j, t),
        }
    }

    /// Row `j` widened to f32 into `out` (`out.len() == k`): an embedding lookup.
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n && out.len() == self.k, "row_into: row {j}");
        let base = self.index(j, 0);
        match &self.data {
            Panels::F32(v) => {
                for (t, o) in out.iter_mut().enumerate() {
                    *o = v[base + t * NR];
                }
            }
            Panels::Half(v) => {
                for (t, o) in out.iter_mut().enumerate() {
                    *o = widen(self.dtype, v[base + t * NR]);
                }
            }
            Panels::Q8(v) => super::q8::row_into(v, self.k, j, out),
        }
    }

    /// Panel data as bytes from panel `p` on.
    fn panel_ptr(&self, p: usize) -> *const u8 {
        let off = p * self.k * NR;
        match &self.data {
            Panels::F32(v) => v[off..].as_ptr().cast(),
            Panels::Half(v) => v[off..].as_ptr().cast(),
            Panels::Q8(_) => unreachable!("Q8_0 panels go through q8::matmul"),
        }
    }
}

#[inline]
fn widen(dtype: WeightDType, bits: u16) -> f32 {
    match dtype {
        WeightDType::Bf16 => f32::from_bits((bits as u32) << 16),
        WeightDType::F16 => half::f16::from_bits(bits).to_f32(),
        WeightDType::F32 | WeightDType::Q8_0 => unreachable!("not stored as half bits"),
    }
}

/// Row-major `[n, k]` to panels; None when the allocation fails.
fn pack<T: Copy + Default>(rows: &[T], n: usize, k: usize) -> Option<Vec<T>> {
    let panels = n.div_ceil(NR);
    let mut data = Vec::new();
    data.try_reserve_exact(panels * k * NR).ok()?;
    data.resize(panels * k * NR, T::default());
    if k == 0 {
        return Some(data);
    }
    for (p, panel) in data.chunks_exact_mut(k * NR).enumerate() {
        for c in 0..NR.min(n - p * NR) {
            let row = &rows[(p * NR + c) * k..(p * NR + c + 1) * k];
            for (t, &v) in row.iter().enumerate() {
                panel[t * NR + c] = v;
            }
        }
    }
    Some(data)
}

/// The kernel families; [`detected_isa`] picks the best the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// `f32::mul_add` loops (auto-vectorized where the target has FMA, e.g. aarch64 NEON).
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512F.
    Avx512,
}

/// The paths this CPU can run, portable first.
pub fn available_isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            v.push(Isa::Avx2);
        }
        if has!("avx512f") {
            v.push(Isa::Avx512);
        }
    }
    v
}

/// The best path of this CPU (detected once).
pub fn detected_isa() -> Isa {
    static I: OnceLock<Isa> = OnceLock::new();
    *I.get_or_init(|| *available_isas().last().expect("portable is always there"))
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, row-major `x` and `out`.
pub fn matmul(x: &[f32], w: &PackedMatrix, out: &mut [f32], m: usize) {
    matmul_with(detected_isa(), x, w, out, m);
}

/// [`matmul`] on a chosen path (tests and benches force each one); panics if the CPU lacks it.
pub fn matmul_with(isa: Isa, x: &[f32], w: &PackedMatrix, out: &mut [f32], m: usize) {
    let (k, n) = (w.k, w.n);
    assert!(
        x.len() >= m * k && out.len() >= m * n,
        "matmul: buffers too small for m={m} k={k} n={n}"
    );
    assert!(available_isas().contains(&isa), "{isa:?} is not available");
    if m == 0 || n == 0 {
        return;
    }
    if let Panels::Q8(data) = &w.data {
        return super::q8::matmul(isa, x, data, n, k, out, m);
    }
    let out_ptr = SendPtr(out.as_mut_ptr());
    let panels = n.div_ceil(NR);
    let widen = w.dtype != WeightDType::F32 && m >= WIDEN_MIN_M;
    let per_task = if widen {
        panels_per_task(panels).min((SCRATCH_BYTES / (k * NR * 4).max(1)).max(1))
    } else {
        panels_per_task(panels)
    };
    for_panel_tasks(panels, per_task, m * n * k, |p0, p1| {
        if widen {
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let len = (p1 - p0) * k * NR;
                if s.len() < len {
                    s.resize(len, 0.0);
                }
                let Panels::Half(bits) = &w.data else {
                    unreachable!()
                };
                widen_slice(w.dtype, &bits[p0 * k * NR..p1 * k * NR], &mut s[..len]);
                let base = s.as_ptr().cast::<u8>();
                block(isa, WeightDType::F32, x, m, k, n, base, p0, p1, out_ptr);
            });
        } else {
            block(isa, w.dtype, x, m, k, n, w.panel_ptr(p0), p0, p1, out_ptr);
        }
    });
}

/// Panels a task takes: enough tasks to balance the threads (every split gives the same bits).
pub(super) fn panels_per_task(panels: usize) -> usize {
    panels
        .div_ceil(rayon::current_num_threads() * 4)
        .clamp(1, 64)
}

/// Runs `run(p0, p1)` over `0..panels` in tasks of `per_task` panels: on the thread pool, or
/// on this thread when the product (`work` multiply-adds) is too small to be worth a hand-off.
pub(super) fn for_panel_tasks(
    panels: usize,
    per_task: usize,
    work: usize,
    run: impl Fn(usize, usize) + Sync,
) {
    let task = |t: usize| {
        let p0 = t * per_task;
        run(p0, (p0 + per_task).min(panels));
    };
    let tasks = panels.div_ceil(per_task);
    if work < 1 << 15 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

thread_local! {
    /// A task's panels widened to f32 (prefill).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn widen_slice(dtype: WeightDType, bits: &[u16], out: &mut [f32]) {
    match dtype {
        WeightDType::Bf16 => {
            for (o, &b) in out.iter_mut().zip(bits) {
                *o = f32::from_bits((b as u32) << 16);
            }
        }
        WeightDType::F16 => {
            use half::slice::HalfFloatSliceExt;
            let h: &[half::f16] = bytemuck::cast_slice(bits);
            h.convert_to_f32_slice(out);
        }
        WeightDType::F32 | WeightDType::Q8_0 => unreachable!(),
    }
}

/// The output buffer, shared by a product's tasks.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: used only for the disjoint column ranges of a product's tasks (`for_panel_tasks`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Accumulator tile handed back by a micro-kernel: `MR_MAX` rows of `NP_MAX` panels.
type Tile = [[f32; NR * NP_MAX]; MR_MAX];

/// Panels `p0..p1` (data at `wp`, panel `p0` first) against every row of `x`.
#[allow(clippy::too_many_arguments)]
fn block(
    isa: Isa,
    dtype: WeightDType,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    wp: *const u8,
    p0: usize,
    p1: usize,
    out: SendPtr,
) {
    let esize = dtype.size();
    let mut tile: Tile = [[0.0; NR * NP_MAX]; MR_MAX];
    let mr_max = match isa {
        Isa::Avx512 => 6,
        Isa::Avx2 => 6,
        Isa::Portable => 4,
    };
    let mut i0 = 0;
    while i0 < m {
        let mr = (m - i0).min(mr_max);
        let mut p = p0;
        while p < p1 {
            let np = match isa {
                Isa::Avx2 if mr > 1 => 1,
                _ => (p1 - p).min(NP_MAX),
            };
            let np = if np == NP_MAX { NP_MAX } else { 1 };
            // SAFETY: rows i0..i0+mr of x and panels p..p+np exist (p + np <= p1 <= panels).
            unsafe {
                let w = wp.add((p - p0) * k * NR * esize);
                let xs = x.as_ptr().add(i0 * k);
                micro(isa, dtype, mr, np, xs, k, w, &mut tile);
            }
            for (r, row) in tile.iter().enumerate().take(mr) {
                let j0 = p * NR;
                let cols = (np * NR).min(n - j0);
                // SAFETY: this task alone writes columns of panels p0..p1; i0 + r < m and
                // j0 + cols <= n keep the write inside `out`.
                unsafe {
                    let dst = out.0.add((i0 + r) * n + j0);
                    std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols);
                }
            }
            p += np;
        }
        i0 += mr;
    }
}

/// One micro-kernel call: `mr` rows of `x` (row stride `k`) times `np` panels at `w`.
///
/// # Safety
/// `x` must hold `mr * k` floats, `w` `np` panels of `k * NR` elements of `dtype`, and the
/// CPU must have `isa`.
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    isa: Isa,
    dtype: WeightDType,
    mr: usize,
    np: usize,
    x: *const f32,
    k: usize,
    w: *const u8,
    tile: &mut Tile,
) {
    match isa {
        Isa::Portable => portable(dtype, mr, np, x, k, w, tile),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::avx512(dtype, mr, np, x, k, w, tile),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::avx2(dtype, mr, np, x, k, w, tile),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("x86 paths are never available here"),
    }
}

/// The portable kernel: the same FMA chains, `f32::mul_add`.
unsafe fn portable(
    dtype: WeightDType,
    mr: usize,
    np: usize,
    x: *const f32,
    k: usize,
    w: *const u8,
    tile: &mut Tile,
) {
    let cols = np * NR;
    let mut wv = [0f32; NR * NP_MAX];
    for row in tile.iter_mut().take(mr) {
        row[..cols].fill(0.0);
    }
    for t in 0..k {
        for p in 0..np {
            let base = p * k * NR + t * NR;
            for c in 0..NR {
                wv[p * NR + c] = match dtype {
                    WeightDType::F32 => *w.cast::<f32>().add(base + c),
                    d => widen(d, *w.cast::<u16>().add(base + c)),
                };
            }
        }
        for (i, row) in tile.iter_mut().enumerate().take(mr) {
            let xv = *x.add(i * k + t);
            for (acc, &wc) in row[..cols].iter_mut().zip(&wv[..cols]) {
                *acc = xv.mul_add(wc, *acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, WeightDType, NR};
    use std::arch::x86_64::*;

    const F32: u8 = 0;
    const BF16: u8 = 1;
    const F16: u8 = 2;

    fn code(d: WeightDType) -> u8 {
        match d {
            WeightDType::F32 => F32,
            WeightDType::Bf16 => BF16,
            WeightDType::F16 | WeightDType::Q8_0 => F16,
        }
    }

    /// Dispatches `(dtype, mr, np)` to a monomorphized kernel `$f::<DT, MR, NP>`.
    macro_rules! dispatch {
        ($f:ident, $dt:expr, $mr:expr, $np:expr, $args:tt) => {
            match ($dt, $mr, $np) {
                (F32, m, n) => dispatch!(@mr $f, F32, m, n, $args),
                (BF16, m, n) => dispatch!(@mr $f, BF16, m, n, $args),
                (_, m, n) => dispatch!(@mr $f, F16, m, n, $args),
            }
        };
        (@mr $f:ident, $d:ident, $mr:expr, $np:expr, ($($a:expr),*)) => {
            match ($mr, $np) {
                (1, 4) => $f::<$d, 1, 4>($($a),*),
                (2, 4) => $f::<$d, 2, 4>($($a),*),
                (3, 4) => $f::<$d, 3, 4>($($a),*),
                (4, 4) => $f::<$d, 4, 4>($($a),*),
                (5, 4) => $f::<$d, 5, 4>($($a),*),
                (6, 4) => $f::<$d, 6, 4>($($a),*),
                (1, 1) => $f::<$d, 1, 1>($($a),*),
                (2, 1) => $f::<$d, 2, 1>($($a),*),
                (3, 1) => $f::<$d, 3, 1>($($a),*),
                (4, 1) => $f::<$d, 4, 1>($($a),*),
                (5, 1) => $f::<$d, 5, 1>($($a),*),
                (6, 1) => $f::<$d, 6, 1>($($a),*),
                (m, n) => unreachable!("no kernel for {m}x{n}"),
            }
        };
    }

    pub(super) unsafe fn avx512(
        dtype: WeightDType,
        mr: usize,
        np: usize,
        x: *const f32,
        k: usize,
        w: *const u8,
        tile: &mut Tile,
    ) {
        dispatch!(k512, code(dtype), mr, np, (x, k, w, tile))
    }

    pub(super) unsafe fn avx2(
        dtype: WeightDType,
        mr: usize,
        np: usize,
        x: *const f32,
        k: usize,
        w: *const u8,
        tile: &mut Tile,
    ) {
        dispatch!(k256, code(dtype), mr, np, (x, k, w, tile))
    }

    /// 16 elements of type `DT` at element index `i` of `w`, widened.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const DT: u8>(w: *const u8, i: usize) -> __m512 {
        match DT {
            F32 => _mm512_loadu_ps(w.cast::<f32>().add(i)),
            BF16 => {
                let h = _mm256_loadu_si256(w.cast::<u16>().add(i).cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            _ => _mm512_cvtph_ps(_mm256_loadu_si256(w.cast::<u16>().add(i).cast())),
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn k512<const DT: u8, const MR: usize, const NP: usize>(
        x: *const f32,
        k: usize,
        w: *const u8,
        tile: &mut Tile,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        for t in 0..k {
            let mut wv = [_mm512_setzero_ps(); NP];
            for (p, v) in wv.iter_mut().enumerate() {
                *v = load16::<DT>(w, p * k * NR + t * NR);
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*x.add(i * k + t));
                for (a, v) in a.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xb, *v, *a);
                }
            }
        }
        for (row, a) in tile.iter_mut().zip(&acc) {
            for (p, a) in a.iter().enumerate() {
                _mm512_storeu_ps(row.as_mut_ptr().add(p * NR), *a);
            }
        }
    }

    /// 8 elements of type `DT` at element index `i` of `w`, widened.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<const DT: u8>(w: *const u8, i: usize) -> __m256 {
        match DT {
            F32 => _mm256_loadu_ps(w.cast::<f32>().add(i)),
            BF16 => {
                let h = _mm_loadu_si128(w.cast::<u16>().add(i).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            _ => _mm256_cvtph_ps(_mm_loadu_si128(w.cast::<u16>().add(i).cast())),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn k256<const DT: u8, const MR: usize, const NP: usize>(
        x: *const f32,
        k: usize,
        w: *const u8,
        tile: &mut Tile,
    ) {
        let mut lo = [[_mm256_setzero_ps(); NP]; MR];
        let mut hi = [[_mm256_setzero_ps(); NP]; MR];
        for t in 0..k {
            let mut wl = [_mm256_setzero_ps(); NP];
            let mut wh = [_mm256_setzero_ps(); NP];
            for p in 0..NP {
                wl[p] = load8::<DT>(w, p * k * NR + t * NR);
                wh[p] = load8::<DT>(w, p * k * NR + t * NR + 8);
            }
            for i in 0..MR {
                let xb = _mm256_set1_ps(*x.add(i * k + t));
                for p in 0..NP {
                    lo[i][p] = _mm256_fmadd_ps(xb, wl[p], lo[i][p]);
                    hi[i][p] = _mm256_fmadd_ps(xb, wh[p], hi[i][p]);
                }
            }
        }
        for i in 0..MR {
            for p in 0..NP {
                let dst = tile[i].as_mut_ptr().add(p * NR);
                _mm256_storeu_ps(dst, lo[i][p]);
                _mm256_storeu_ps(dst.add(8), hi[i][p]);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `n` pseudo-random values in [-1, 1) from `seed` (shared with the other kernels' tests).
    pub(in crate::backend::cpu) fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `w` packed as `dtype` (rounded to it first), and the f32 values actually held.
    fn packed(w: &[f32], n: usize, k: usize, dtype: WeightDType) -> (PackedMatrix, Vec<f32>) {
        match dtype {
            WeightDType::F32 => (PackedMatrix::from_f32(w, n, k).unwrap(), w.to_vec()),
            WeightDType::Bf16 => {
                let b: Vec<u16> = w
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                let held = b.iter().map(|&b| widen(dtype, b)).collect();
                (PackedMatrix::from_half_bits(&b, n, k, dtype).unwrap(), held)
            }
            WeightDType::F16 => {
                let b: Vec<u16> = w
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect();
                let held = b.iter().map(|&b| widen(dtype, b)).collect();
                (PackedMatrix::from_half_bits(&b, n, k, dtype).unwrap(), held)
            }
            WeightDType::Q8_0 => unreachable!("q8's own tests"),
        }
    }

    const DTYPES: [WeightDType; 3] = [WeightDType::F32, WeightDType::Bf16, WeightDType::F16];

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

    pub(in crate::backend::cpu) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    /// `(m, k, n)` products with partial panels, partial row groups, `k` not a multiple of the
    /// block or panel, tiny `k` and `n`: every product kernel's test shapes.
    pub(in crate::backend::cpu) const ODD_SHAPES: [(usize, usize, usize); 7] = [
        (1, 64, 192),
        (3, 61, 37),
        (16, 576, 67),
        (37, 13, 5),
        (70, 200, 9),
        (1, 7, 1),
        (9, 1, 129),
    ];

    /// Every path and dtype against an f64 product of the values the weight holds, on shapes
    /// with partial panels, partial row groups and tiny `k`; and every path bitwise equal to
    /// the portable one.
    #[test]
    fn matches_f64_reference_on_odd_shapes_on_every_path() {
        let mut seed = 1;
        for (m, k, n) in ODD_SHAPES {
            let x = rand_vec(m * k, &mut seed);
            let w = rand_vec(n * k, &mut seed);
            for dtype in DTYPES {
                let (pw, held) = packed(&w, n, k, dtype);
                let r = reference(&x, &held, m, k, n);
                let mut first = None;
                for isa in available_isas() {
                    let mut out = vec![f32::NAN; m * n];
                    matmul_with(isa, &x, &pw, &mut out, m);
                    for (a, b) in out.iter().zip(&r) {
                        let tol = 1e-5 * (1.0 + b.abs()) * k as f64;
                        assert!(
                            (*a as f64 - b).abs() < tol,
                            "{isa:?} {dtype:?} m={m} k={k} n={n}: {a} vs {b}"
                        );
                    }
                    let first = first.get_or_insert_with(|| out.clone());
                    assert_eq!(bits(first), bits(&out), "{isa:?} {dtype:?} {m}x{k}x{n}");
                }
            }
        }
    }

    #[test]
    fn hand_computed() {
        // x = [[1, 2], [3, 4]], w = [[1, 0], [0, 1], [1, 1]] → x·wᵀ = [[1, 2, 3], [3, 4, 7]]
        let w = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        for dtype in DTYPES {
            let (pw, _) = packed(&w, 3, 2, dtype);
            let mut out = [0f32; 6];
            matmul(&[1.0, 2.0, 3.0, 4.0], &pw, &mut out, 2);
            assert_eq!(out, [1.0, 2.0, 3.0, 3.0, 4.0, 7.0], "{dtype:?}");
        }
    }

    #[test]
    fn packed_rows_read_back() {
        let mut seed = 5;
        let (n, k) = (37, 11);
        let w = rand_vec(n * k, &mut seed);
        for dtype in DTYPES {
            let (pw, held) = packed(&w, n, k, dtype);
            let mut row = vec![0f32; k];
            for j in 0..n {
                pw.row_into(j, &mut row);
                assert_eq!(bits(&row), bits(&held[j * k..(j + 1) * k]), "{dtype:?} {j}");
                assert_eq!(pw.get(j, 3).to_bits(), held[j * k + 3].to_bits());
            }
        }
    }

    /// A row's result is the same bits alone (m = 1: weights widened in registers) and in a
    /// batch (panels widened into scratch), with 1, 2 or 3 threads, on every path and dtype.
    #[test]
    fn batch_and_thread_invariant() {
        let mut seed = 9;
        let (m, k, n) = (150, 333, 131);
        let x = rand_vec(m * k, &mut seed);
        let w = rand_vec(n * k, &mut seed);
        for dtype in DTYPES {
            let (pw, _) = packed(&w, n, k, dtype);
            for isa in available_isas() {
                let mut full = vec![0f32; m * n];
                matmul_with(isa, &x, &pw, &mut full, m);
                for i in [0, 1, 5, 6, 63, 64, 149] {
                    let mut one = vec![0f32; n];
                    matmul_with(isa, &x[i * k..(i + 1) * k], &pw, &mut one, 1);
                    assert_eq!(
                        bits(&full[i * n..(i + 1) * n]),
                        bits(&one),
                        "{isa:?} {dtype:?}: row {i} differs alone vs batched"
                    );
                }
                // A few rows at once (below the widening threshold).
                let mut three = vec![0f32; 3 * n];
                matmul_with(isa, &x[7 * k..10 * k], &pw, &mut three, 3);
                assert_eq!(
                    bits(&full[7 * n..10 * n]),
                    bits(&three),
                    "{isa:?} {dtype:?}"
                );
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut o = vec![0f32; m * n];
                    pool.install(|| matmul_with(isa, &x, &pw, &mut o, m));
                    assert_eq!(bits(&o), bits(&full), "{isa:?} {dtype:?} {threads} threads");
                }
            }
        }
    }
}
