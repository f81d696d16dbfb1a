//! Q8_0 weights (`--quantization int8`): int8 values in blocks of [`QK`] = 32 along `k` with one
//! f16 scale per block, and the batch-invariant product of such a weight with f32 activations.
//!
//! Quantization (at load, and of each activation row per product), as llama.cpp's Q8_0: for a
//! block `v[0..32]`, `d = max|v| / 127`, `q[t] = round(v[t] / d)` (computed as `v[t] * (1/d)`,
//! rounded half away from zero), so `q ∈ [-127, 127]`. The weight's `d` is stored as f16 (34
//! bytes per 32 weights, 1.0625 byte/param); the activation's stays f32 (it is never stored). A
//! `k` that is not a multiple of 32 is zero-padded.
//!
//! Arithmetic, the same on every path: for output `(i, j)`, with `idot_b` the exact integer dot
//! product of block `b` (`|idot| <= 32·127² < 2²⁴`, so its f32 conversion is exact too),
//! `s = 0; for b in 0..k/32 { s = fma(sx[i, b] * sw[j, b], idot_b as f32, s) }`: one f32 product
//! and one fused multiply-add per block, in increasing `b`. The integer dot is exact whatever
//! instruction computes it, so every path (AVX-512 VNNI, AVX2, portable), every `m`, every split
//! between threads gives the same bits, and a row's result never depends on its batch.
//!
//! Layout: panels of [`NR`] = 16 output rows as the other weights; panel `p` is `k/32` chunks of
//! [`CHUNK`] = 544 bytes, one per block: the 16 rows' f16 scales (32 bytes), then the int8 values
//! as `[8 groups][16 rows][4 bytes]` (512 bytes), so one 64-byte vector holds 4 consecutive `k`
//! of all 16 rows and a 4-way dot instruction (`vpdpbusd`, or `pmaddubsw` + `pmaddwd`) sums them
//! into one 32-bit lane per row: no horizontal sums, and at `m = 1` the weights stream as one
//! contiguous read. The values are stored offset by 128 (`q + 128` as an unsigned byte), because
//! `vpdpbusd` multiplies unsigned by signed bytes: the VNNI path takes the weight as the unsigned
//! operand and the activation as the signed one, and subtracts `128 · Σ x` over the block (a
//! per-row number the activation quantizer computes once), so the correction costs no
//! instruction per weight vector. The AVX2 path flips the offset back (`xor 0x80`) and uses the
//! sign trick (`|w|` times `x · sign(w)`, which cannot saturate `pmaddubsw` as `|q| <= 127`).
use super::gemm::{for_panel_tasks, panels_per_task, Isa, SendPtr, NR};
use rayon::prelude::*;
use std::cell::RefCell;

/// Weights per block along `k`.
pub const QK: usize = 32;
/// Bytes of one panel's block: 16 f16 scales, then 16 × 32 int8 values.
pub const CHUNK: usize = NR * 2 + NR * QK;
/// Byte offset of the int8 values in a chunk.
const VALS: usize = NR * 2;
/// Most `x` rows a micro-kernel call handles.
const MR_MAX: usize = 6;
/// Most panels a micro-kernel call handles.
const NP_MAX: usize = 2;

/// `k` padded to whole blocks.
pub fn blocks(k: usize) -> usize {
    k.div_ceil(QK)
}

/// Quantizes one block (`v.len() <= 32`, the rest taken as 0) into `q`; returns the scale `d`.
#[inline]
fn quantize_block(v: &[f32], q: &mut [i8; QK]) -> f32 {
    let mut b = [0f32; QK];
    b[..v.len()].copy_from_slice(v);
    // Straight-line loops over a full block, which the compiler vectorizes (`max` written as a
    // compare so that it may: the values are finite).
    let amax = b
        .iter()
        .fold(0f32, |a, &x| if x.abs() > a { x.abs() } else { a });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &x) in q.iter_mut().zip(&b) {
        *q = round_away(x * id).clamp(-127, 127) as i8;
    }
    d
}

/// `v` rounded half away from zero (`f32::round`, without its libm call on baseline x86-64):
/// exact, as `v - trunc(v)` is exact for |v| < 2²³.
#[inline]
fn round_away(v: f32) -> i32 {
    let t = v as i32;
    let f = v - t as f32;
    t + i32::from(f >= 0.5) - i32::from(f <= -0.5)
}

/// Packs `n` rows of `k` (row `j` written by `row(j, buf)`) as Q8_0 panels; None when the
/// allocation fails.
pub fn pack(n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Option<Vec<u8>> {
    let kb = blocks(k);
    let panel_bytes = kb * CHUNK;
    let mut data = Vec::new();
    data.try_reserve_exact(n.div_ceil(NR) * panel_bytes).ok()?;
    data.resize(n.div_ceil(NR) * panel_bytes, 0u8);
    if kb == 0 {
        return Some(data);
    }
    data.par_chunks_mut(panel_bytes)
        .enumerate()
        .for_each(|(p, panel)| {
            let mut buf = vec![0f32; k];
            let mut q = [0i8; QK];
            for c in 0..NR.min(n - p * NR) {
                row(p * NR + c, &mut buf);
                for b in 0..kb {
                    let chunk = &mut panel[b * CHUNK..(b + 1) * CHUNK];
                    let d = quantize_block(&buf[b * QK..((b + 1) * QK).min(k)], &mut q);
                    let d = half::f16::from_f32(d).to_le_bytes();
                    chunk[2 * c..2 * c + 2].copy_from_slice(&d);
                    for (t, &v) in q.iter().enumerate() {
                        chunk[val_index(c, t)] = (v as u8) ^ 0x80;
                    }
                }
            }
        });
    Some(data)
}

/// Byte index in a chunk of row `c`'s value `t` of the block.
#[inline]
fn val_index(c: usize, t: usize) -> usize {
    VALS + (t / 4) * NR * 4 + c * 4 + t % 4
}

/// Scale of row `j`'s block `b` (f16 widened, exact).
fn scale(data: &[u8], k: usize, j: usize, b: usize) -> f32 {
    let at = (j / NR) * blocks(k) * CHUNK + b * CHUNK + 2 * (j % NR);
    half::f16::from_le_bytes([data[at], data[at + 1]]).to_f32()
}

/// Element `(j, t)` dequantized: `d · q`.
pub fn get(data: &[u8], k: usize, j: usize, t: usize) -> f32 {
    let (b, r) = (t / QK, t % QK);
    let at = (j / NR) * blocks(k) * CHUNK + b * CHUNK + val_index(j % NR, r);
    scale(data, k, j, b) * (data[at] ^ 0x80) as i8 as f32
}

/// Row `j` dequantized into `out` (`out.len() == k`): an embedding lookup.
pub fn row_into(data: &[u8], k: usize, j: usize, out: &mut [f32]) {
    for (b, o) in out.chunks_mut(QK).enumerate() {
        let d = scale(data, k, j, b);
        let base = (j / NR) * blocks(k) * CHUNK + b * CHUNK;
        for (r, o) in o.iter_mut().enumerate() {
            *o = d * (data[base + val_index(j % NR, r)] ^ 0x80) as i8 as f32;
        }
    }
}

/// Quantized activation rows: `m` rows of `kb * 32` signed bytes, `kb` f32 scales and `kb`
/// offset corrections `128 · Σ q` (one per block) each.
#[derive(Default)]
struct QRows {
    q: Vec<i8>,
    d: Vec<f32>,
    c: Vec<i32>,
}

thread_local! {
    /// The quantized activations' buffers, kept between products (taken out while in use, so a
    /// product started by a task this thread runs while it waits gets its own).
    static XQ: RefCell<QRows> = RefCell::new(QRows::default());
}

/// One row's input, values, scales and corrections, as `quantize_rows`' zipped iterators give them.
type RowParts<'a> = (((&'a [f32], &'a mut [i8]), &'a mut [f32]), &'a mut [i32]);

/// Quantizes the `m` rows of `x` (row length `k`) into `xq`.
fn quantize_rows(x: &[f32], m: usize, k: usize, xq: &mut QRows) {
    let kb = blocks(k);
    xq.q.resize(m * kb * QK, 0);
    xq.d.resize(m * kb, 0.0);
    xq.c.resize(m * kb, 0);
    let one = |(((xr, qr), dr), cr): RowParts| {
        let mut q = [0i8; QK];
        for b in 0..kb {
            dr[b] = quantize_block(&xr[b * QK..((b + 1) * QK).min(k)], &mut q);
            qr[b * QK..(b + 1) * QK].copy_from_slice(&q);
            cr[b] = 128 * q.iter().map(|&v| v as i32).sum::<i32>();
        }
    };
    let (x, q, d, c) = (&x[..m * k], &mut xq.q[..], &mut xq.d[..], &mut xq.c[..]);
    if m >= 16 {
        x.par_chunks(k)
            .zip(q.par_chunks_mut(kb * QK))
            .zip(d.par_chunks_mut(kb))
            .zip(c.par_chunks_mut(kb))
            .for_each(one);
    } else {
        x.chunks(k)
            .zip(q.chunks_mut(kb * QK))
            .zip(d.chunks_mut(kb))
            .zip(c.chunks_mut(kb))
            .for_each(one);
    }
}

/// Whether `isa`'s int8 kernel for `m` rows is the VNNI one (else AVX2's or the portable one).
/// A single row (decode) takes the AVX2 kernel even where VNNI is there: measured on this
/// project's AMD EPYC VM (cpu_gemm, m = 1), it streams the weights faster (5.6 against 6.3-6.9
/// ms per SmolLM2 token on 2 threads, 11 against 13-17 on one), while VNNI is the faster one
/// from a few rows on (BENCHMARKS.md, issue 24). Both give the same bits, so the choice changes no
/// result.
fn vnni(isa: Isa, m: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        m > 1 && isa == Isa::Avx512 && has!("avx512bw") && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, m);
        false
    }
}

/// Accumulator tile of a micro-kernel: `MR_MAX` rows of `NP_MAX` panels.
type Tile = [[f32; NR * NP_MAX]; MR_MAX];

/// `out[m, n] = x[m, k] · wᵀ` for a Q8_0 weight `w` (`pack`'s layout) on path `isa`.
pub fn matmul(isa: Isa, x: &[f32], w: &[u8], n: usize, k: usize, out: &mut [f32], m: usize) {
    if m == 0 || n == 0 {
        return;
    }
    let kb = blocks(k);
    if kb == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    let vnni = vnni(isa, m);
    let mut xq = XQ.with(|c| c.take());
    quantize_rows(x, m, k, &mut xq);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let panels = n.div_ceil(NR);
    let xr = &xq;
    for_panel_tasks(panels, panels_per_task(panels), m * n * k, |p0, p1| {
        block(isa, vnni, xr, m, kb, n, w, p0, p1, out_ptr)
    });
    XQ.with(|c| c.replace(xq));
}

/// Panels `p0..p1` against every row of `xq`.
#[allow(clippy::too_many_arguments)]
fn block(
    isa: Isa,
    vnni: bool,
    xq: &QRows,
    m: usize,
    kb: usize,
    n: usize,
    w: &[u8],
    p0: usize,
    p1: usize,
    out: SendPtr,
) {
    let mut tile: Tile = [[0.0; NR * NP_MAX]; MR_MAX];
    let (mr_max, np_max) = match isa {
        Isa::Avx512 if vnni => (6, 2),
        Isa::Avx512 | Isa::Avx2 => (4, 1),
        Isa::Portable => (4, 1),
    };
    let panel_bytes = kb * CHUNK;
    let mut i0 = 0;
    while i0 < m {
        let mr = (m - i0).min(mr_max);
        let mut p = p0;
        while p < p1 {
            let np = if p1 - p >= np_max { np_max } else { 1 };
            let wp = &w[p * panel_bytes..(p + np) * panel_bytes];
            let xs = &xq.q[i0 * kb * QK..(i0 + mr) * kb * QK];
            let ds = &xq.d[i0 * kb..(i0 + mr) * kb];
            let cs = &xq.c[i0 * kb..(i0 + mr) * kb];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `vnni` says the CPU has AVX-512 BW and VNNI; the slices hold `mr` rows
                // of `kb` blocks and `np` panels.
                Isa::Avx512 if vnni => unsafe { x86::vnni(mr, np, xs, ds, cs, kb, wp, &mut tile) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: both of these paths are only offered on CPUs with AVX2.
                Isa::Avx512 | Isa::Avx2 => unsafe { x86::avx2(mr, xs, ds, kb, wp, &mut tile) },
                _ => portable(mr, np, xs, ds, kb, wp, &mut tile),
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

/// The portable kernel, and the reference the others must equal bit for bit.
fn portable(mr: usize, np: usize, xq: &[i8], xd: &[f32], kb: usize, w: &[u8], tile: &mut Tile) {
    for (i, row) in tile.iter_mut().enumerate().take(mr) {
        for p in 0..np {
            for c in 0..NR {
                let mut s = 0f32;
                for b in 0..kb {
                    let chunk = &w[(p * kb + b) * CHUNK..(p * kb + b + 1) * CHUNK];
                    let x = &xq[(i * kb + b) * QK..(i * kb + b + 1) * QK];
                    let idot: i32 = (0..QK)
                        .map(|t| x[t] as i32 * (chunk[val_index(c, t)] ^ 0x80) as i8 as i32)
                        .sum();
                    let sw = half::f16::from_le_bytes([chunk[2 * c], chunk[2 * c + 1]]).to_f32();
                    s = (xd[i * kb + b] * sw).mul_add(idot as f32, s);
                }
                row[p * NR + c] = s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, CHUNK, NR, QK, VALS};
    use std::arch::x86_64::*;

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn vnni(
        mr: usize,
        np: usize,
        xq: &[i8],
        xd: &[f32],
        xc: &[i32],
        kb: usize,
        w: &[u8],
        tile: &mut Tile,
    ) {
        let (x, d, c, w) = (xq.as_ptr(), xd.as_ptr(), xc.as_ptr(), w.as_ptr());
        match (mr, np) {
            (1, 1) => kvnni::<1, 1>(x, d, c, kb, w, tile),
            (2, 1) => kvnni::<2, 1>(x, d, c, kb, w, tile),
            (3, 1) => kvnni::<3, 1>(x, d, c, kb, w, tile),
            (4, 1) => kvnni::<4, 1>(x, d, c, kb, w, tile),
            (5, 1) => kvnni::<5, 1>(x, d, c, kb, w, tile),
            (6, 1) => kvnni::<6, 1>(x, d, c, kb, w, tile),
            (1, 2) => kvnni::<1, 2>(x, d, c, kb, w, tile),
            (2, 2) => kvnni::<2, 2>(x, d, c, kb, w, tile),
            (3, 2) => kvnni::<3, 2>(x, d, c, kb, w, tile),
            (4, 2) => kvnni::<4, 2>(x, d, c, kb, w, tile),
            (5, 2) => kvnni::<5, 2>(x, d, c, kb, w, tile),
            (6, 2) => kvnni::<6, 2>(x, d, c, kb, w, tile),
            (m, n) => unreachable!("no int8 kernel for {m}x{n}"),
        }
    }

    /// `MR` rows of signed activations times `NP` panels of offset (`q + 128`) weights, with
    /// `vpdpbusd` (weights unsigned, activations signed), less `128 · Σ x` per block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn kvnni<const MR: usize, const NP: usize>(
        x: *const i8,
        xd: *const f32,
        xc: *const i32,
        kb: usize,
        w: *const u8,
        tile: &mut Tile,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        for b in 0..kb {
            // Two accumulator sets (even and odd groups of 4) halve the dependency chains; the
            // integer sums are exact, so how they are split changes no bit.
            let mut iacc = [[[_mm512_setzero_si512(); NP]; MR]; 2];
            for g in 0..QK / 4 {
                let mut wv = [_mm512_setzero_si512(); NP];
                for (p, v) in wv.iter_mut().enumerate() {
                    let at = (p * kb + b) * CHUNK + VALS + g * NR * 4;
                    *v = _mm512_loadu_si512(w.add(at).cast());
                }
                for (i, a) in iacc[g % 2].iter_mut().enumerate() {
                    let xv = x
                        .add((i * kb + b) * QK + g * 4)
                        .cast::<i32>()
                        .read_unaligned();
                    let xb = _mm512_set1_epi32(xv);
                    for (a, v) in a.iter_mut().zip(&wv) {
                        *a = _mm512_dpbusd_epi32(*a, *v, xb);
                    }
                }
            }
            let mut sw = [_mm512_setzero_ps(); NP];
            for (p, s) in sw.iter_mut().enumerate() {
                let at = (p * kb + b) * CHUNK;
                *s = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(at).cast()));
            }
            for i in 0..MR {
                let sx = _mm512_set1_ps(*xd.add(i * kb + b));
                let corr = _mm512_set1_epi32(*xc.add(i * kb + b));
                for p in 0..NP {
                    let dd = _mm512_mul_ps(sx, sw[p]);
                    let sum = _mm512_add_epi32(iacc[0][i][p], iacc[1][i][p]);
                    let idot = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, corr));
                    acc[i][p] = _mm512_fmadd_ps(dd, idot, acc[i][p]);
                }
            }
        }
        for (row, a) in tile.iter_mut().zip(&acc) {
            for (p, a) in a.iter().enumerate() {
                _mm512_storeu_ps(row.as_mut_ptr().add(p * NR), *a);
            }
        }
    }

    pub(super) unsafe fn avx2(
        mr: usize,
        xq: &[i8],
        xd: &[f32],
        kb: usize,
        w: &[u8],
        tile: &mut Tile,
    ) {
        let (x, d, w) = (xq.as_ptr(), xd.as_ptr(), w.as_ptr());
        match mr {
            1 => k256::<1>(x, d, kb, w, tile),
            2 => k256::<2>(x, d, kb, w, tile),
            3 => k256::<3>(x, d, kb, w, tile),
            4 => k256::<4>(x, d, kb, w, tile),
            m => unreachable!("no int8 AVX2 kernel for {m} rows"),
        }
    }

    /// `MR` rows of signed activations times one panel: `|w| · (x · sign(w))` with
    /// `pmaddubsw`, pairs summed to 32 bits with `pmaddwd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn k256<const MR: usize>(
        x: *const i8,
        xd: *const f32,
        kb: usize,
        w: *const u8,
        tile: &mut Tile,
    ) {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let mut lo = [_mm256_setzero_ps(); MR];
        let mut hi = [_mm256_setzero_ps(); MR];
        for b in 0..kb {
            let mut ilo = [_mm256_setzero_si256(); MR];
            let mut ihi = [_mm256_setzero_si256(); MR];
            for g in 0..QK / 4 {
                let at = b * CHUNK + VALS + g * NR * 4;
                let wl = _mm256_xor_si256(_mm256_loadu_si256(w.add(at).cast()), flip);
                let wh = _mm256_xor_si256(_mm256_loadu_si256(w.add(at + 32).cast()), flip);
                let (al, ah) = (_mm256_abs_epi8(wl), _mm256_abs_epi8(wh));
                for i in 0..MR {
                    let xv = x
                        .add((i * kb + b) * QK + g * 4)
                        .cast::<i32>()
                        .read_unaligned();
                    let xb = _mm256_set1_epi32(xv);
                    let pl = _mm256_maddubs_epi16(al, _mm256_sign_epi8(xb, wl));
                    let ph = _mm256_maddubs_epi16(ah, _mm256_sign_epi8(xb, wh));
                    ilo[i] = _mm256_add_epi32(ilo[i], _mm256_madd_epi16(pl, ones));
                    ihi[i] = _mm256_add_epi32(ihi[i], _mm256_madd_epi16(ph, ones));
                }
            }
            let sl = _mm256_cvtph_ps(_mm_loadu_si128(w.add(b * CHUNK).cast()));
            let sh = _mm256_cvtph_ps(_mm_loadu_si128(w.add(b * CHUNK + 16).cast()));
            for i in 0..MR {
                let sx = _mm256_set1_ps(*xd.add(i * kb + b));
                let il = _mm256_cvtepi32_ps(ilo[i]);
                let ih = _mm256_cvtepi32_ps(ihi[i]);
                lo[i] = _mm256_fmadd_ps(_mm256_mul_ps(sx, sl), il, lo[i]);
                hi[i] = _mm256_fmadd_ps(_mm256_mul_ps(sx, sh), ih, hi[i]);
            }
        }
        for i in 0..MR {
            _mm256_storeu_ps(tile[i].as_mut_ptr(), lo[i]);
            _mm256_storeu_ps(tile[i].as_mut_ptr().add(8), hi[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::tests::{bits, rand_vec, ODD_SHAPES};
    use super::super::gemm::{available_isas, matmul_with, PackedMatrix};
    use super::*;

    fn q8(w: &[f32], n: usize, k: usize) -> PackedMatrix {
        PackedMatrix::from_f32_q8(w, n, k).unwrap()
    }

    #[test]
    fn blocks_quantize_as_llama_cpp_q8_0() {
        // max |v| = 2.54 → d = 0.02; 1.0 / 0.02 = 50, -2.54 → -127, 0.011 / 0.02 = 0.55 → 1.
        let mut v = vec![0f32; QK];
        v[0] = 1.0;
        v[1] = -2.54;
        v[2] = 0.011;
        v[3] = 0.009;
        let mut q = [0i8; QK];
        let d = quantize_block(&v, &mut q);
        assert!((d - 0.02).abs() < 1e-7, "{d}");
        assert_eq!(&q[..5], &[50, -127, 1, 0, 0]);
        // An all-zero block: scale 0, values 0 (no division by zero).
        assert_eq!(quantize_block(&[0.0; 7], &mut q), 0.0);
        assert_eq!(q, [0; QK]);
    }

    /// Dequantized elements read back within half a step of the original, through `get` and
    /// the embedding lookup alike; 1.0625 bytes per padded weight.
    #[test]
    fn weights_read_back_within_half_a_step() {
        let mut seed = 3;
        let (n, k) = (37, 70);
        let w = rand_vec(n * k, &mut seed);
        let pw = q8(&w, n, k);
        assert_eq!(pw.bytes(), 48 * 96 * 34 / 32);
        let mut row = vec![0f32; k];
        for j in 0..n {
            pw.row_into(j, &mut row);
            for t in 0..k {
                assert_eq!(row[t].to_bits(), pw.get(j, t).to_bits());
                let b = t / QK;
                let amax = w[j * k + b * QK..j * k + ((b + 1) * QK).min(k)]
                    .iter()
                    .fold(0f32, |a, v| a.max(v.abs()));
                // Half a step of the f16-rounded scale, plus the scale's own rounding.
                let tol = amax / 127.0 * 0.5 * 1.01 + amax * 1e-3;
                assert!((row[t] - w[j * k + t]).abs() <= tol, "({j}, {t})");
            }
        }
    }

    /// Every path against an f64 product of the dequantized weights and activations (odd `n`,
    /// `k` not a multiple of 32, partial row groups), and every path bitwise equal to the
    /// portable one.
    #[test]
    fn every_path_gives_the_portable_bits() {
        let mut seed = 1;
        for (m, k, n) in ODD_SHAPES.into_iter().chain([(13, 96, 48)]) {
            let x = rand_vec(m * k, &mut seed);
            let w = rand_vec(n * k, &mut seed);
            let pw = q8(&w, n, k);
            let mut first = None;
            for isa in available_isas() {
                let mut out = vec![f32::NAN; m * n];
                matmul_with(isa, &x, &pw, &mut out, m);
                // The reference: activations quantized the same way, products in f64.
                for i in 0..m {
                    let mut xr = x[i * k..(i + 1) * k].to_vec();
                    for b in xr.chunks_mut(QK) {
                        let mut q = [0i8; QK];
                        let d = quantize_block(b, &mut q);
                        for (v, q) in b.iter_mut().zip(q) {
                            *v = d * q as f32;
                        }
                    }
                    for j in 0..n {
                        let r: f64 = (0..k).map(|t| xr[t] as f64 * pw.get(j, t) as f64).sum();
                        let a = out[i * n + j] as f64;
                        let tol = 1e-5 * (1.0 + r.abs()) * k as f64;
                        assert!(
                            (a - r).abs() < tol,
                            "{isa:?} {m}x{k}x{n} ({i}, {j}): {a} vs {r}"
                        );
                    }
                }
                let first = first.get_or_insert_with(|| out.clone());
                assert_eq!(bits(first), bits(&out), "{isa:?} {m}x{k}x{n}");
            }
        }
    }

    /// The int8 product is close to the f32 one: Q8_0's error, not a broken kernel.
    #[test]
    fn close_to_the_f32_product() {
        let mut seed = 7;
        let (m, k, n) = (5, 576, 40);
        let x = rand_vec(m * k, &mut seed);
        let w = rand_vec(n * k, &mut seed);
        let pw = q8(&w, n, k);
        let mut out = vec![0f32; m * n];
        super::super::gemm::matmul(&x, &pw, &mut out, m);
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                // Each factor's relative error is about 1/254 per element, uncorrelated: the sum's
                // error is ~ sqrt(k) · |x||w| / 180; 0.05 is > 4 sigma for uniform [-1, 1] data.
                assert!((out[i * n + j] as f64 - r).abs() < 0.05 * (k as f64).sqrt() / 4.0);
            }
        }
    }

    /// A row's result is the same bits alone and in a batch, with 1, 2 or 3 threads, on every
    /// path.
    #[test]
    fn batch_and_thread_invariant() {
        let mut seed = 9;
        let (m, k, n) = (150, 333, 131);
        let x = rand_vec(m * k, &mut seed);
        let w = rand_vec(n * k, &mut seed);
        let pw = q8(&w, n, k);
        for isa in available_isas() {
            let mut full = vec![0f32; m * n];
            matmul_with(isa, &x, &pw, &mut full, m);
            for i in [0, 1, 5, 6, 63, 64, 149] {
                let mut one = vec![0f32; n];
                matmul_with(isa, &x[i * k..(i + 1) * k], &pw, &mut one, 1);
                assert_eq!(
                    bits(&full[i * n..(i + 1) * n]),
                    bits(&one),
                    "{isa:?}: row {i} differs alone vs batched"
                );
            }
            let mut three = vec![0f32; 3 * n];
            matmul_with(isa, &x[7 * k..10 * k], &pw, &mut three, 3);
            assert_eq!(bits(&full[7 * n..10 * n]), bits(&three), "{isa:?}");
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut o = vec![0f32; m * n];
                pool.install(|| matmul_with(isa, &x, &pw, &mut o, m));
                assert_eq!(bits(&o), bits(&full), "{isa:?} {threads} threads");
            }
        }
    }
}
