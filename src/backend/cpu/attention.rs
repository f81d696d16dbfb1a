//! Paged attention on the CPU: K/V are read only through block tables.
//!
//! This is both the CPU backend's implementation and the reference for the CUDA kernels: one
//! function serves decode (query_len 1) and prefill chunks (causal over cached prefix + chunk).
//! Each query row is computed independently with a fixed reduction order, so results do not
//! depend on batching or chunking.
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
    if seqs.is_empty() {
        return;
    }
    let q_w = dims.q_width();
    let width = dims.qkv_width();
    let first_row = plan.seqs[seqs.start].query_start;
    // row -> (seq index, position of the query token)
    let rows: Vec<(usize, usize)> = seqs
        .clone()
        .flat_map(|s| {
            let sp = plan.seqs[s];
            (0..sp.query_len).map(move |i| (s, sp.context_len - sp.query_len + i))
        })
        .collect();
    let out = &mut out[first_row * q_w..(first_row + rows.len()) * q_w];
    out.par_chunks_mut(q_w)
        .zip(rows.par_iter())
        .enumerate()
        .for_each(|(i, (o, &(seq, pos)))| {
            let q = &qkv[(first_row + i) * width..(first_row + i) * width + q_w];
            attend_one_token(q, cache, plan.block_table(seq), pos, dims, o);
        });
}

/// All heads of one query token at absolute position `pos`, attending to positions
/// `lo..=pos` (`lo` from the sliding window, else 0).
fn attend_one_token(
    q: &[f32],
    cache: &CpuKvCache,
    block_table: &[u32],
    pos: usize,
    dims: AttnDims,
    out: &mut [f32],
) {
    let hd = dims.head_dim;
    let bs = cache.dims.block_size;
    let kv_w = dims.kv_width();
    let group = dims.num_heads / dims.num_kv_heads;
    let lo = dims
        .sliding_window
        .map_or(0, |w| (pos + 1).saturating_sub(w));
    let n = pos + 1 - lo;
    let slot = |t: usize| block_table[t / bs] as usize * bs + t % bs;
    let mut scores = vec![0f32; n];
    for h in 0..dims.num_heads {
        let kvh = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            let base = slot(lo + j) * kv_w + kvh * hd;
            let k = &cache.k[base..base + hd];
            *s = dot(qh, k) * dims.scale;
            if let Some(c) = dims.softcap {
                *s = c * (*s / c).tanh();
            }
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let oh = &mut out[h * hd..(h + 1) * hd];
        oh.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let base = slot(lo + j) * kv_w + kvh * hd;
            let v = &cache.v[base..base + hd];
            let w = p / sum;
            for (o, &v) in oh.iter_mut().zip(v) {
                *o += w * v;
            }
        }
    }
}

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
}
