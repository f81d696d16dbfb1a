//! Mixture-of-experts routing and the CPU experts: the reference every backend's MoE follows.
//!
//! Routing as Mixtral and Qwen3-MoE define it (transformers): softmax of the router logits in
//! f32, the `top_k` most probable experts (ties to the lower expert id), their probabilities
//! renormalized to sum to 1 when asked. The experts run as batched GEMMs: each expert's rows
//! gathered, `gate_up`, SiLU-gate, `down`, then added into the output with the row's weight
//! for that expert, experts in id order.
use super::{gemm::matmul, CpuBackend, CpuWeight};
use crate::backend::{Backend, MoeWeights};

/// The `top_k` experts of one row of router logits and their weights, most probable first.
pub fn route(logits: &[f32], top_k: usize, renormalize: bool) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable: equal probabilities keep the lower expert id first.
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]));
    let chosen: Vec<(usize, f32)> = order
        .into_iter()
        .take(top_k)
        .map(|e| (e, exp[e] / sum))
        .collect();
    if !renormalize {
        return chosen;
    }
    let total: f32 = chosen.iter().map(|&(_, p)| p).sum();
    chosen.into_iter().map(|(e, p)| (e, p / total)).collect()
}

/// [`Backend::moe`] on the CPU.
pub fn moe(be: &CpuBackend, x: &[f32], moe: &MoeWeights<CpuWeight>, rows: usize, out: &mut [f32]) {
    let (h, inter, n_exp) = (moe.hidden, moe.intermediate, moe.gate_up.len());
    let mut logits = vec![0f32; rows * n_exp];
    be.matmul(
        &x[..rows * h].to_vec(),
        &moe.router,
        None,
        &mut logits,
        rows,
    );
    // Rows (and their weights) per expert.
    let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n_exp];
    for r in 0..rows {
        for (e, w) in route(
            &logits[r * n_exp..(r + 1) * n_exp],
            moe.top_k,
            moe.renormalize,
        ) {
            routed[e].push((r, w));
        }
    }
    let out = &mut out[..rows * h];
    out.fill(0.0);
    for (e, rows_e) in routed.iter().enumerate() {
        if rows_e.is_empty() {
            continue;
        }
        let m = rows_e.len();
        let mut xe = vec![0f32; m * h];
        for (i, &(r, _)) in rows_e.iter().enumerate() {
            xe[i * h..(i + 1) * h].copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut gate_up = vec![0f32; m * 2 * inter];
        matmul(&xe, moe.gate_up[e].matrix(), &mut gate_up, m);
        let mut act = vec![0f32; m * inter];
        be.silu_mul(&gate_up, &mut act, m, inter);
        let mut ye = vec![0f32; m * h];
        matmul(&act, moe.down[e].matrix(), &mut ye, m);
        for (i, &(r, w)) in rows_e.iter().enumerate() {
            for (o, y) in out[r * h..(r + 1) * h]
                .iter_mut()
                .zip(&ye[i * h..(i + 1) * h])
            {
                *o += w * y;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_to_the_most_probable_experts() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let r = route(&logits, 2, false);
        // Experts 1 and 3 tie: the lower id first; probabilities of the full softmax.
        assert_eq!(r.iter().map(|&(e, _)| e).collect::<Vec<_>>(), vec![1, 3]);
        let total: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((r[0].1 - 2f32.exp() / total).abs() < 1e-6);
        let n = route(&logits, 2, true);
        assert!((n[0].1 - 0.5).abs() < 1e-6 && (n[1].1 - 0.5).abs() < 1e-6);
        let one = route(&logits, 1, true);
        assert_eq!(one, vec![(1, 1.0)]);
    }

    /// The batched experts equal a row-by-row evaluation of the same formula.
    #[test]
    fn batched_experts_equal_the_per_row_formula() {
        let (h, inter, n_exp, rows) = (8, 6, 4, 5);
        let mut seed = 7u32;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        let w = |shape: Vec<usize>, data: &[f32]| {
            CpuBackend::default()
                .load_weight(crate::backend::HostTensor {
                    dtype: crate::backend::HostDType::F32,
                    shape: &shape,
                    data: bytemuck::cast_slice(data),
                })
                .unwrap()
        };
        let router = rnd(n_exp * h);
        let gate_ups: Vec<Vec<f32>> = (0..n_exp).map(|_| rnd(2 * inter * h)).collect();
        let downs: Vec<Vec<f32>> = (0..n_exp).map(|_| rnd(h * inter)).collect();
        let moe_w = MoeWeights {
            router: w(vec![n_exp, h], &router),
            gate_up: gate_ups.iter().map(|g| w(vec![2 * inter, h], g)).collect(),
            down: downs.iter().map(|d| w(vec![h, inter], d)).collect(),
            top_k: 2,
            renormalize: true,
            hidden: h,
            intermediate: inter,
        };
        let x = rnd(rows * h);
        let mut out = vec![0f32; rows * h];
        moe(&CpuBackend::default(), &x, &moe_w, rows, &mut out);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        for r in 0..rows {
            let xr = &x[r * h..(r + 1) * h];
            let logits: Vec<f32> = (0..n_exp)
                .map(|e| dot(&router[e * h..(e + 1) * h], xr))
                .collect();
            let mut want = vec![0f32; h];
            for (e, p) in route(&logits, 2, true) {
                let gu = &gate_ups[e];
                let act: Vec<f32> = (0..inter)
                    .map(|i| {
                        let g = dot(&gu[i * h..(i + 1) * h], xr);
                        let u = dot(&gu[(inter + i) * h..(inter + i + 1) * h], xr);
                        g / (1.0 + (-g).exp()) * u
                    })
                    .collect();
                for (o, want) in want.iter_mut().enumerate() {
                    *want += p * dot(&downs[e][o * inter..(o + 1) * inter], &act);
                }
            }
            for (got, want) in out[r * h..(r + 1) * h].iter().zip(&want) {
                assert!((got - want).abs() < 1e-5, "row {r}: {got} vs {want}");
            }
        }
    }
}
