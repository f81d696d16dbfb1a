//! Paged attention on the CPU: K/V are read only through block tables.
//!
//! This is both the CPU backend's implementation and the reference for the CUDA kernels: one
//! function serves decode (query_len 1) and prefill chunks (causal over cached prefix + chunk).
//! Each query row is computed independently with a fixed reduction order, so results do not
//! depend on batching or chunking.
use super::gemm::{available_isas, detected_isa, Isa};
use super::CpuKvCache;
use crate::backend::{AttnDims, BatchPlan};
use rayon::prelude::*;
use std::ops::Range;

/// Copies each token's K and V heads from `qkv` (`[num_tokens, qkv_width]`) into its cache slot.
pub fn write_kv(qkv: &[f32], cache: &mut CpuKvCache, slot_mapping: &[u32], dims: AttnDims) {
    let kv_w = dims.kv_width();
    let q_w = dims.q_width();
    let width = dims.qkv_width();
    for (t, &slot) in slot_mapping.iter().enumerate() {
        let row = &qkv[t * width..(t + 1) * width];
        let dst = slot as usize * kv_w..(slot as usize + 1) * kv_w;
        cache.k[dst.clone()].copy_from_slice(&row[q_w..q_w + kv_w]);
        cache.v[dst].copy_from_slice(&row[q_w + kv_w..q_w + 2 * kv_w]);
    }
}

/// Attention for the sequences `seqs` of the plan, writing their rows of `out`
/// (`[num_tokens, num_heads * head_dim]`). Their rows must be contiguous (the plan orders
/// decodes first, then prefills).
pub fn paged_attention(
    qkv: &[f32],
    cache: &CpuKvCache,
    plan: &BatchPlan,
    seqs: Range<usize>,
    dims: AttnDims,
    out: &mut [f32],
) {
    paged_attention_with(detected_isa(), qkv, cache, plan, seqs, dims, out);
}

/// Query tokens of one sequence taken together: each key and value row read from the cache
/// serves all their heads before the next is read.
const TILE_TOKENS: usize = 16;
/// Keys visited per pass over a tile's query rows (their K or V rows stay in cache meanwhile).
const KEY_BLOCK: usize = 128;

/// [`paged_attention`] compiled for a chosen instruction set (tests force each one; panics if
/// the CPU lacks it). Every path runs the same scalar code, only vectorised wider, with no
/// contraction of multiply and add, and each query row's arithmetic is the same whatever tile
/// or batch it is in: the results are the same bits on every path and in every batch.
pub fn paged_attention_with(
    isa: Isa,
    qkv: &[f32],
    cache: &CpuKvCache,
    plan: &BatchPlan,
    seqs: Range<usize>,
    dims: AttnDims,
    out: &mut [f32],
) {
    if seqs.is_empty() {
        return;
    }
    assert!(available_isas().contains(&isa), "{isa:?} is not available");
    let q_w = dims.q_width();
    let width = dims.qkv_width();
    let first_row = plan.seqs[seqs.start].query_start;
    // Tiles: (sequence, first row after first_row, position of its first token, tokens).
    let mut tiles = Vec::new();
    let mut row = 0;
    for s in seqs {
        let sp = plan.seqs[s];
        let first_pos = sp.context_len - sp.query_len;
        for i in (0..sp.query_len).step_by(TILE_TOKENS) {
            let n = (sp.query_len - i).min(TILE_TOKENS);
            tiles.push((s, row + i, first_pos + i, n));
        }
        row += sp.query_len;
    }
    let mut rest = &mut out[first_row * q_w..(first_row + row) * q_w];
    let mut outs = Vec::with_capacity(tiles.len());
    for t in &tiles {
        let (o, r) = std::mem::take(&mut rest).split_at_mut(t.3 * q_w);
        outs.push(o);
        rest = r;
    }
    tiles
        .par_iter()
        .zip(outs)
        .for_each(|(&(seq, row, first_pos, tokens), out)| {
            let rows = (first_row + row) * width..(first_row + row + tokens) * width;
            let tile = Tile {
                q: &qkv[rows],
                cache,
                table: plan.block_table(seq),
                first_pos,
                tokens,
                dims,
                out,
            };
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has the features (asserted above).
                Isa::Avx512 => unsafe { attend_avx512(tile) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2 => unsafe { attend_avx2(tile) },
                _ => attend_tile(tile, score_keys),
            }
        });
}

/// Consecutive query tokens of one sequence: their q/k/v rows, where their keys live, and
/// their output rows.
struct Tile<'a> {
    q: &'a [f32],
    cache: &'a CpuKvCache,
    table: &'a [u32],
    first_pos: usize,
    tokens: usize,
    dims: AttnDims,
    out: &'a mut [f32],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(t: Tile) {
    attend_tile(t, |q, k, at, out| score_keys_avx(q, k, at, out))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(t: Tile) {
    attend_tile(t, |q, k, at, out| score_keys_avx(q, k, at, out))
}

/// All heads of a tile's query tokens, each attending to its positions `lo..=pos` (`lo` from
/// the sliding window, else 0). Per query row and head, in key order: scores (q·k × scale, then
/// the softcap), their maximum, e^(s − max), their [`sum16`], weights = e / sum, and each output
/// element the sum of weight × v. Keys are visited in blocks shared by the tile's rows, which
/// changes where the work happens but not any row's order of operations. Inlined into each
/// instruction set's wrapper.
#[inline(always)]
fn attend_tile(t: Tile, score: impl Fn(&[f32], &[f32], &[usize], &mut [f32])) {
    let d = t.dims;
    let (hd, heads) = (d.head_dim, d.num_heads);
    let group = heads / d.num_kv_heads;
    let (width, q_w, bs) = (d.qkv_width(), d.q_width(), t.cache.dims.block_size);
    let lo = |pos: usize| d.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let base = lo(t.first_pos);
    let last = t.first_pos + t.tokens - 1;
    // Each key's offset in the cache (keys base..=last), found once for the tile.
    let at: Vec<usize> = (base..=last)
        .map(|p| (t.table[p / bs] as usize * bs + p % bs) * d.kv_width())
        .collect();
    let keys = at.len();
    // Token i's keys, as indices into `at`.
    let span = |i: usize| {
        let pos = t.first_pos + i;
        (lo(pos) - base, pos + 1 - base)
    };
    let mut scores = vec![0f32; t.tokens * heads * keys];
    let row_of = |i: usize, h: usize| (i * heads + h) * keys;
    for kvh in 0..d.num_kv_heads {
        let k = &t.cache.k[kvh * hd..];
        each_block(keys, t.tokens, span, |i, l, j0, j1| {
            for h in kvh * group..(kvh + 1) * group {
                let qh = &t.q[i * width + h * hd..][..hd];
                let s = &mut scores[row_of(i, h)..][j0 - l..j1 - l];
                score(qh, k, &at[j0..j1], s);
            }
        });
    }
    for i in 0..t.tokens {
        let (l, r) = span(i);
        for h in 0..heads {
            let s = &mut scores[row_of(i, h)..][..r - l];
            for s in s.iter_mut() {
                *s *= d.scale;
            }
            if let Some(c) = d.softcap {
                for s in s.iter_mut() {
                    *s = c * (*s / c).tanh();
                }
            }
            let max = max16(s);
            for s in s.iter_mut() {
                *s = exp(*s - max);
            }
            let sum = sum16(s);
            for s in s.iter_mut() {
                *s /= sum;
            }
        }
    }
    t.out.fill(0.0);
    for kvh in 0..d.num_kv_heads {
        let v = &t.cache.v[kvh * hd..];
        each_block(keys, t.tokens, span, |i, l, j0, j1| {
            // The group's heads together: each V row loaded serves all of them.
            let h0 = kvh * group;
            let o = &mut t.out[i * q_w + h0 * hd..][..group * hd];
            let w = &scores[row_of(i, h0) + j0 - l..];
            let rows = PvRows {
                w,
                stride: keys,
                at: &at[j0..j1],
                v,
                hd,
            };
            match group {
                1 => pv_group::<1>(o, rows),
                2 => pv_group::<2>(o, rows),
                3 => pv_group::<3>(o, rows),
                4 => pv_group::<4>(o, rows),
                _ => {
                    for (g, o) in o.chunks_exact_mut(hd).enumerate() {
                        let w = &w[g * keys..];
                        pv_group::<1>(o, PvRows { w, ..rows });
                    }
                }
            }
        });
    }
}

/// For each block of `KEY_BLOCK` keys in order, and each of the `tokens` whose keys (`span(i)`:
/// `l..r`, indices into the tile's keys) meet it: `f(i, l, j0, j1)` with `j0..j1` the keys of the
/// block that token attends to.
#[inline(always)]
fn each_block(
    keys: usize,
    tokens: usize,
    span: impl Fn(usize) -> (usize, usize),
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    for b in (0..keys).step_by(KEY_BLOCK) {
        let b_end = (b + KEY_BLOCK).min(keys);
        for i in 0..tokens {
            let (l, r) = span(i);
            let (j0, j1) = (b.max(l), b_end.min(r));
            if j0 < j1 {
                f(i, l, j0, j1);
            }
        }
    }
}

/// e^x in plain f32 arithmetic, so it vectorises and gives the same bits on every instruction
/// set (no fused multiply-add): x = n·ln 2 + r with |r| ≤ ln 2 / 2 (ln 2 split in two parts so
/// n·ln 2 is exact), e^r by Cephes' degree-6 polynomial (relative error ≈ 1e-7), times 2^n built
/// from its bits. Inputs are clamped to [-87.3, 88.7], so it never returns 0 or infinity.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_55, 88.722_83);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The largest of `x` (NaNs ignored, as `f32::max` does), in 16 lanes: a maximum is exact in
/// any order, so this is the sequential maximum's value, vectorised.
#[inline(always)]
fn max16(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a = a.max(v);
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// The sum of `x` in 16 lanes (lane `l` sums elements `l`, `l + 16`, …, in order), then the
/// lanes pairwise: a fixed order that vectorises.
#[inline(always)]
fn sum16(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a += v;
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

/// The weights and values one group of heads sums over: head `g`'s weight for key `j` is
/// `w[g * stride + j]`, the key's V row starts at `v[at[j]]`, `hd` elements a head.
#[derive(Clone, Copy)]
struct PvRows<'a> {
    w: &'a [f32],
    stride: usize,
    at: &'a [usize],
    v: &'a [f32],
    hd: usize,
}

/// `out` (`G` heads of `hd`) += Σ over the keys, in order, weight × V: every element adds key
/// by key in order, blocks of 32 then 16 elements of all `G` heads kept in registers between
/// one load and one store.
#[inline(always)]
fn pv_group<const G: usize>(out: &mut [f32], r: PvRows) {
    let e = pv_blocks::<G, 32>(out, 0, r);
    let e = pv_blocks::<G, 16>(out, e, r);
    for g in 0..G {
        for x in e..r.hd {
            let o = &mut out[g * r.hd + x];
            for (&w, &a) in r.w[g * r.stride..].iter().zip(r.at) {
                *o += w * r.v[a + x];
            }
        }
    }
}

#[inline(always)]
fn pv_blocks<const G: usize, const N: usize>(out: &mut [f32], mut e: usize, r: PvRows) -> usize {
    while e + N <= r.hd {
        let mut acc = [[0f32; N]; G];
        for (g, acc) in acc.iter_mut().enumerate() {
            acc.copy_from_slice(&out[g * r.hd + e..][..N]);
        }
        for (j, &base) in r.at.iter().enumerate() {
            let v = &r.v[base + e..][..N];
            for (g, acc) in acc.iter_mut().enumerate() {
                let w = r.w[g * r.stride + j];
                for (a, &v) in acc.iter_mut().zip(v) {
                    *a += w * v;
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            out[g * r.hd + e..][..N].copy_from_slice(acc);
        }
        e += N;
    }
    e
}

/// `out[j]` = q · the key at `k[at[j]..]`.
#[inline(always)]
fn score_keys(q: &[f32], k: &[f32], at: &[usize], out: &mut [f32]) {
    for (s, &base) in out.iter_mut().zip(at) {
        *s = dot(q, &k[base..base + q.len()]);
    }
}

/// [`score_keys`] on AVX, four keys at a time where the head size is a multiple of 8 (four
/// independent chains, one horizontal reduction for the four): the same bits as [`dot`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn score_keys_avx(q: &[f32], k: &[f32], at: &[usize], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let mut j = 0;
    if hd.is_multiple_of(8) {
        while j + 4 <= at.len() {
            let keys: [&[f32]; 4] = std::array::from_fn(|i| &k[at[j + i]..at[j + i] + hd]);
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in (0..hd).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                for (a, key) in acc.iter_mut().zip(&keys) {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, _mm256_loadu_ps(key.as_ptr().add(c))));
                }
            }
            // Per key: (a0 + a4, a1 + a5, a2 + a6, a3 + a7), then (b0 + b1) + (b2 + b3).
            let h: [__m128; 4] = std::array::from_fn(|i| {
                _mm_add_ps(
                    _mm256_castps256_ps128(acc[i]),
                    _mm256_extractf128_ps::<1>(acc[i]),
                )
            });
            let s = _mm_hadd_ps(_mm_hadd_ps(h[0], h[1]), _mm_hadd_ps(h[2], h[3]));
            _mm_storeu_ps(out.as_mut_ptr().add(j), s);
            j += 4;
        }
    }
    for (s, &base) in out[j..].iter_mut().zip(&at[j..]) {
        *s = dot_avx(q, &k[base..base + hd]);
    }
}

/// [`dot`] on AVX: the same eight lanes, products and sums (no fused multiply-add), and the
/// same reduction tree, so the same bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_avx(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let c = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < c {
        let p = _mm256_mul_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
        );
        acc = _mm256_add_ps(acc, p);
        i += 8;
    }
    // (a0 + a4, a1 + a5, a2 + a6, a3 + a7), then (b0 + b1) + (b2 + b3).
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let mut l = [0f32; 4];
    _mm_storeu_ps(l.as_mut_ptr(), h);
    let mut s = (l[0] + l[1]) + (l[2] + l[3]);
    for j in c..n {
        s += a[j] * b[j];
    }
    s
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight fixed lanes: vectorizes and keeps one reduction order.
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{KvCacheDims, SeqPlan};

    fn dims(h: usize, kvh: usize, hd: usize) -> AttnDims {
        AttnDims {
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            sliding_window: None,
            softcap: None,
        }
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Dense causal attention over contiguous K/V for one sequence: the independent reference.
    fn dense(
        q: &[Vec<f32>],
        k: &[Vec<f32>],
        v: &[Vec<f32>],
        d: AttnDims,
        start: usize,
    ) -> Vec<f32> {
        let hd = d.head_dim;
        let group = d.num_heads / d.num_kv_heads;
        let mut out = vec![];
        for (i, qt) in q.iter().enumerate() {
            let pos = start + i;
            for h in 0..d.num_heads {
                let kvh = h / group;
                let s: Vec<f64> = (0..=pos)
                    .map(|t| {
                        (0..hd)
                            .map(|x| (qt[h * hd + x] * k[t][kvh * hd + x]) as f64)
                            .sum::<f64>()
                            * d.scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for x in 0..hd {
                    let o: f64 = (0..=pos)
                        .map(|t| e[t] / z * v[t][kvh * hd + x] as f64)
                        .sum();
                    out.push(o as f32);
                }
            }
        }
        out
    }

    #[test]
    fn hand_computed_single_head() {
        // One head, head_dim 2, two cached positions; query attends to both.
        let d = AttnDims {
            scale: 1.0,
            ..dims(1, 1, 2)
        };
        let kvd = KvCacheDims {
            num_blocks: 2,
            block_size: 1,
            num_kv_heads: 1,
            head_dim: 2,
        };
        // Block table [1, 0]: position 0 lives in block 1, position 1 in block 0.
        let cache = CpuKvCache {
            dims: kvd,
            k: vec![0.0, 0.0, 1.0, 0.0],
            v: vec![0.0, 10.0, 10.0, 0.0],
        };
        let plan = BatchPlan {
            seqs: vec![SeqPlan {
                query_start: 0,
                query_len: 1,
                context_len: 2,
            }],
            num_decode_seqs: 1,
            block_tables: vec![1, 0],
            max_blocks_per_seq: 2,
            ..Default::default()
        };
        let qkv = vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0]; // q = [1, 0]
        let mut out = vec![0.0; 2];
        paged_attention(&qkv, &cache, &plan, 0..1, d, &mut out);
        // scores: pos0 = q·[1,0] = 1, pos1 = 0 → weights e/(e+1), 1/(e+1).
        let e = std::f32::consts::E;
        let expect = [10.0 * e / (e + 1.0), 10.0 / (e + 1.0)];
        assert!((out[0] - expect[0]).abs() < 1e-5 && (out[1] - expect[1]).abs() < 1e-5);
    }

    /// Chunked prefill on a cached prefix, with scattered blocks and GQA, against dense attention.
    #[test]
    fn paged_matches_dense_for_gqa_chunks_and_decode() {
        for (h, kvh, hd, bs) in [
            (4usize, 1usize, 8usize, 4usize),
            (8, 2, 16, 16),
            (4, 4, 4, 2),
        ] {
            let d = dims(h, kvh, hd);
            let total: usize = 23;
            let cached = 9;
            let mut seed = 7u64;
            let rnd = |n: usize, seed: &mut u64| (0..n).map(|_| lcg(seed)).collect::<Vec<f32>>();
            let q: Vec<Vec<f32>> = (0..total).map(|_| rnd(h * hd, &mut seed)).collect();
            let k: Vec<Vec<f32>> = (0..total).map(|_| rnd(kvh * hd, &mut seed)).collect();
            let v: Vec<Vec<f32>> = (0..total).map(|_| rnd(kvh * hd, &mut seed)).collect();
            let nblocks = total.div_ceil(bs);
            // Scatter: logical block i lives in physical block (nblocks - 1 - i) + 3.
            let table: Vec<u32> = (0..nblocks).map(|i| (nblocks - 1 - i + 3) as u32).collect();
            let kvd = KvCacheDims {
                num_blocks: nblocks + 3,
                block_size: bs,
                num_kv_heads: kvh,
                head_dim: hd,
            };
            let mut cache = CpuKvCache {
                dims: kvd,
                k: vec![0.0; kvd.numel()],
                v: vec![0.0; kvd.numel()],
            };
            let slot = |t: usize| table[t / bs] * bs as u32 + (t % bs) as u32;
            // Write all K/V through write_kv, as the engine does.
            let qkv: Vec<f32> = (0..total)
                .flat_map(|t| [q[t].clone(), k[t].clone(), v[t].clone()].concat())
                .collect();
            let slots: Vec<u32> = (0..total).map(slot).collect();
            write_kv(&qkv, &mut cache, &slots, d);
            // Batch: one decode of the last token, then a prefill chunk of positions cached..total-1.
            let chunk = total - 1 - cached;
            let mut bq = qkv[(total - 1) * d.qkv_width()..].to_vec();
            bq.extend_from_slice(&qkv[cached * d.qkv_width()..(total - 1) * d.qkv_width()]);
            let plan = BatchPlan {
                seqs: vec![
                    SeqPlan {
                        query_start: 0,
                        query_len: 1,
                        context_len: total,
                    },
                    SeqPlan {
                        query_start: 1,
                        query_len: chunk,
                        context_len: total - 1,
                    },
                ],
                num_decode_seqs: 1,
                block_tables: [table.clone(), table.clone()].concat(),
                max_blocks_per_seq: nblocks,
                ..Default::default()
            };
            let mut out = vec![0.0; (1 + chunk) * d.q_width()];
            paged_attention(&bq, &cache, &plan, 0..1, d, &mut out);
            paged_attention(&bq, &cache, &plan, 1..2, d, &mut out);
            let want_decode = dense(&q[total - 1..], &k, &v, d, total - 1);
            let want_chunk = dense(&q[cached..total - 1], &k, &v, d, cached);
            let got = &out[..];
            let want = [want_decode, want_chunk].concat();
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-5, "h={h} kvh={kvh} hd={hd} bs={bs}: max err {err}");
        }
    }

    #[test]
    fn sliding_window_limits_context() {
        let d = AttnDims {
            sliding_window: Some(2),
            softcap: None,
            scale: 1.0,
            ..dims(1, 1, 1)
        };
        let kvd = KvCacheDims {
            num_blocks: 4,
            block_size: 1,
            num_kv_heads: 1,
            head_dim: 1,
        };
        // Positions 0..3 with V = 100, 0, 1, 2 and equal keys: window 2 at pos 3 sees V 1 and 2.
        let cache = CpuKvCache {
            dims: kvd,
            k: vec![1.0; 4],
            v: vec![100.0, 0.0, 1.0, 2.0],
        };
        let plan = BatchPlan {
            seqs: vec![SeqPlan {
                query_start: 0,
                query_len: 1,
                context_len: 4,
            }],
            num_decode_seqs: 1,
            block_tables: vec![0, 1, 2, 3],
            max_blocks_per_seq: 4,
            ..Default::default()
        };
        let mut out = vec![0.0];
        paged_attention(&[1.0, 0.0, 0.0], &cache, &plan, 0..1, d, &mut out);
        assert!((out[0] - 1.5).abs() < 1e-6, "{}", out[0]);
    }

    /// Every instruction set's path gives the same bits as the portable one: prefill with GQA,
    /// groups of 1 to 8 heads, head sizes with and without a remainder past 32, 16 and 8 lanes,
    /// softcap and a window, and prompts long enough for several tiles and key blocks. A chunk
    /// of the prompt's last rows (tiled differently) gives the same bits as those rows of the
    /// whole prompt, and the long prompt without a window matches dense attention in f64.
    #[test]
    fn every_isa_path_gives_the_same_bits() {
        for (h, kvh, hd, window, softcap, total) in [
            (9usize, 3usize, 64usize, None, None, 19usize),
            (4, 2, 20, Some(5), None, 19),
            (2, 1, 35, None, Some(30.0f32), 19),
            (8, 1, 16, None, None, 19),
            (3, 3, 48, None, None, 40),
            (4, 2, 64, None, None, 300),
            (4, 2, 64, Some(150), None, 300),
        ] {
            let d = AttnDims {
                sliding_window: window,
                softcap,
                ..dims(h, kvh, hd)
            };
            let bs = 4usize;
            let nblocks = total.div_ceil(bs);
            let kvd = KvCacheDims {
                num_blocks: nblocks + 1,
                block_size: bs,
                num_kv_heads: kvh,
                head_dim: hd,
            };
            let mut seed = 11u64;
            let qkv: Vec<f32> = (0..total * d.qkv_width()).map(|_| lcg(&mut seed)).collect();
            let table: Vec<u32> = (0..nblocks as u32).rev().collect();
            let slots: Vec<u32> = (0..total)
                .map(|t| table[t / bs] * bs as u32 + (t % bs) as u32)
                .collect();
            let mut cache = CpuKvCache {
                dims: kvd,
                k: vec![0.0; kvd.numel()],
                v: vec![0.0; kvd.numel()],
            };
            write_kv(&qkv, &mut cache, &slots, d);
            let plan = |query: usize| BatchPlan {
                seqs: vec![SeqPlan {
                    query_start: 0,
                    query_len: query,
                    context_len: total,
                }],
                num_decode_seqs: 0,
                block_tables: table.clone(),
                max_blocks_per_seq: nblocks,
                ..Default::default()
            };
            let run = |isa, query: usize| {
                let mut out = vec![0.0; query * d.q_width()];
                let rows = &qkv[(total - query) * d.qkv_width()..];
                paged_attention_with(isa, rows, &cache, &plan(query), 0..1, d, &mut out);
                out.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
            };
            let want = run(Isa::Portable, total);
            let tail = 37.min(total - 1);
            for isa in available_isas() {
                assert_eq!(
                    run(isa, total),
                    want,
                    "{isa:?}, heads {h}/{kvh}, head_dim {hd}"
                );
                assert_eq!(
                    run(isa, tail)[..],
                    want[(total - tail) * d.q_width()..],
                    "{isa:?}: the last {tail} rows alone"
                );
            }
            if window.is_none() && softcap.is_none() && total > 100 {
                let row =
                    |t: usize, at: usize, n: usize| qkv[t * d.qkv_width() + at..][..n].to_vec();
                let q: Vec<Vec<f32>> = (0..total).map(|t| row(t, 0, d.q_width())).collect();
                let k: Vec<Vec<f32>> = (0..total)
                    .map(|t| row(t, d.q_width(), d.kv_width()))
                    .collect();
                let v: Vec<Vec<f32>> = (0..total)
                    .map(|t| row(t, d.q_width() + d.kv_width(), d.kv_width()))
                    .collect();
                let dense = dense(&q, &k, &v, d, 0);
                let err = want
                    .iter()
                    .zip(&dense)
                    .map(|(&a, b)| (f32::from_bits(a) - b).abs())
                    .fold(0.0, f32::max);
                assert!(err < 1e-5, "long prompt against dense: max err {err}");
            }
        }
    }

    /// The vectorisable e^x against the standard library's over softmax's range and beyond.
    #[test]
    fn exp_is_within_a_few_ulps_of_the_standard_library() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(f32::NEG_INFINITY) > 0.0);
    }
}
