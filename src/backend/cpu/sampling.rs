//! Reference of on-device sampling (`kernels/sampling.cu`): one token per logits row from a
//! row's temperature, top-k, top-p, min-p and one uniform number the host drew from the
//! request's RNG, so only token ids leave the device.
//!
//! The rules, which the kernel follows exactly:
//! - Logits are ordered by [`order_key`] (NaN counts as -inf); -inf tokens are never picked.
//! - Greedy rows (`temperature == 0` or `top_k == 1`) take the argmax, lowest id on ties.
//! - A token's weight is `exp((logit - max) / temperature)` (the best weighs exactly 1),
//!   counted in fixed point: `weight × 2^40`, truncated, summed in u64. Integer sums do not
//!   depend on the order of addition, so a row gives the same token however the device's
//!   threads happened to run.
//! - top-k keeps the tokens whose key is at least the k-th largest key; top-p then keeps the
//!   tokens whose key is at least the largest key `v` such that the kept tokens with key ≥ `v`
//!   hold at least `ceil(top_p × total)` of the mass. Tokens tied with the cut are all kept
//!   (as vLLM's GPU sampler does), so ties never depend on ids; this is where it differs from
//!   the host sampler, which breaks cut ties by lowest id.
//! - min-p drops tokens whose weight is below `min_p` (the best weighs 1).
//! - The draw walks the kept tokens in id order and returns the first whose running mass
//!   exceeds `floor(u × total)`.
//!
//! Without ties at a cut this is the host sampler's distribution (tested below against
//! `SequenceSampler`); the walk order differs, so the same `u` may pick a different token than
//! the host sampler does.

/// One row's parameters. `temperature == 0` or `top_k == 1` is greedy; `top_k == 0` and
/// `top_p == 1` disable those filters; `u` is in `[0, 1)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub u: f64,
}

/// 32-bit words per row in the kernel's parameter array (see [`RowSampling::words`]).
pub const ROW_WORDS: usize = 6;

/// Fixed-point scale of weights: a weight of 1 counts `2^40`.
const FIXED_ONE: f32 = (1u64 << 40) as f32;

impl RowSampling {
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        u: 0.0,
    };

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// The layout the kernel reads: temperature, top_k, top_p, min_p (f32 bits), then `u` as
    /// the low and high words of its f64 bits.
    pub fn words(&self) -> [u32; ROW_WORDS] {
        let u = self.u.to_bits();
        [
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.min_p.to_bits(),
            u as u32,
            (u >> 32) as u32,
        ]
    }
}

/// A u32 whose unsigned order is the float order (NaN is taken as -inf).
pub fn order_key(v: f32) -> u32 {
    let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Argmax, lowest id on ties, NaN never wins; all -inf/NaN → 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_v {
            best_v = l;
            best = i;
        }
    }
    best as u32
}

fn clean(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else {
        l
    }
}

/// The kept tokens' fixed-point weights (`[vocab]`, 0 for dropped tokens); `None` when every
/// logit is -inf or NaN. `p` must not be greedy.
pub fn kept_weights(logits: &[f32], p: &RowSampling) -> Option<Vec<u64>> {
    let floor = order_key(f32::NEG_INFINITY) + 1;
    let max = logits
        .iter()
        .map(|&l| clean(l))
        .fold(f32::NEG_INFINITY, f32::max);
    if order_key(max) < floor {
        return None;
    }
    let inv_t = 1.0 / p.temperature;
    let weight = |l: f32| {
        let l = clean(l);
        if l == max {
            1.0
        } else {
            ((l - max) * inv_t).exp()
        }
    };
    let fixed = |w: f32| (w * FIXED_ONE) as u64;
    let keys: Vec<u32> = logits.iter().map(|&l| order_key(l)).collect();
    let k = p.top_k as usize;
    let k_cut = if k > 0 && k < logits.len() {
        select(&keys, |_| 1, k as u64, floor)
    } else {
        floor
    };
    let cut = if p.top_p < 1.0 {
        let total: u64 = (0..logits.len())
            .filter(|&i| keys[i] >= k_cut)
            .map(|i| fixed(weight(logits[i])))
            .sum();
        let target = ((f64::from(p.top_p) * total as f64).ceil() as u64).clamp(1, total);
        select(&keys, |i| fixed(weight(logits[i])), target, k_cut)
    } else {
        k_cut
    };
    Some(
        (0..logits.len())
            .map(|i| {
                let w = weight(logits[i]);
                if keys[i] >= cut && w >= p.min_p {
                    fixed(w)
                } else {
                    0
                }
            })
            .collect(),
    )
}

/// The largest key `v >= floor` such that the tokens with key ≥ `v` (and ≥ `floor`) have at
/// least `target` of `mass`; `floor` when all of them together have less.
fn select(keys: &[u32], mass: impl Fn(usize) -> u64, target: u64, floor: u32) -> u32 {
    let mut order: Vec<usize> = (0..keys.len()).filter(|&i| keys[i] >= floor).collect();
    order.sort_by(|&a, &b| keys[b].cmp(&keys[a]));
    let mut acc = 0u64;
    let mut i = 0;
    while i < order.len() {
        let key = keys[order[i]];
        while i < order.len() && keys[order[i]] == key {
            acc += mass(order[i]);
            i += 1;
        }
        if acc >= target {
            return key;
        }
    }
    floor
}

/// One row's token under the rules in the module docs.
pub fn sample_row(logits: &[f32], p: &RowSampling) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let Some(w) = kept_weights(logits, p) else {
        return 0;
    };
    let total: u64 = w.iter().sum();
    let target = ((p.u * total as f64) as u64).min(total - 1);
    let mut acc = 0u64;
    for (i, &x) in w.iter().enumerate() {
        acc += x;
        if target < acc {
            return i as u32;
        }
    }
    unreachable!("the best token is always kept with weight 2^40")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{SamplingParams, SequenceSampler};
    use rand_chacha::ChaCha8Rng;
    use rand_core::{RngCore, SeedableRng};

    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| (rng.next_u32() as f64 / u32::MAX as f64 * 16.0 - 8.0) as f32)
            .collect()
    }

    fn row(temperature: f32, top_k: u32, top_p: f32, min_p: f32) -> RowSampling {
        RowSampling {
            temperature,
            top_k,
            top_p,
            min_p,
            u: 0.0,
        }
    }

    fn probs(w: &[u64]) -> Vec<f64> {
        let total: u64 = w.iter().sum();
        w.iter().map(|&x| x as f64 / total as f64).collect()
    }

    #[test]
    fn order_keys_sort_like_floats() {
        let vals = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            0.0,
            1e-30,
            2.0,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(order_key(w[0]) < order_key(w[1]), "{w:?}");
        }
        assert_eq!(order_key(f32::NAN), order_key(f32::NEG_INFINITY));
    }

    #[test]
    fn same_distribution_as_the_host_sampler_without_ties() {
        let logits = random_logits(4000, 7);
        let cases = [
            row(0.7, 0, 1.0, 0.0),
            row(1.0, 50, 1.0, 0.0),
            row(0.8, 0, 0.9, 0.0),
            row(1.3, 40, 0.8, 0.0),
            row(1.0, 0, 1.0, 0.05),
            row(0.5, 100, 0.95, 0.02),
            row(2.0, 0, 0.3, 0.0),
        ];
        for p in cases {
            let params = SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k as usize,
                top_p: p.top_p,
                min_p: p.min_p,
                ..SamplingParams::default()
            };
            let host = SequenceSampler::new(&params, &[]).probabilities(&logits);
            let ours = probs(&kept_weights(&logits, &p).unwrap());
            for (i, (a, b)) in host.iter().zip(&ours).enumerate() {
                assert_eq!(*a > 0.0, *b > 0.0, "{p:?}: token {i} kept by one side only");
                assert!((a - b).abs() < 1e-6, "{p:?}: token {i}: host {a} vs {b}");
            }
        }
    }

    #[test]
    fn the_draw_follows_the_kept_mass() {
        let logits = [0.5, -1.0, 2.0, f32::NAN, 1.5, f32::NEG_INFINITY, 0.0, -0.5];
        let p = row(0.9, 5, 0.97, 0.0);
        let want = probs(&kept_weights(&logits, &p).unwrap());
        let n = 100_000;
        let mut counts = vec![0usize; logits.len()];
        for j in 0..n {
            let u = (j as f64 + 0.5) / n as f64;
            counts[sample_row(&logits, &RowSampling { u, ..p }) as usize] += 1;
        }
        for (i, (&c, &w)) in counts.iter().zip(&want).enumerate() {
            assert!(
                (c as f64 - w * n as f64).abs() <= 1.0,
                "token {i}: {c} draws for probability {w}"
            );
        }
        assert_eq!(counts[3] + counts[5], 0, "NaN and -inf are never drawn");
    }

    #[test]
    fn ties_at_a_cut_are_all_kept() {
        // top-k 2 over [3, 1, 3, 3]: the three tokens tied at 3 stay.
        let w = kept_weights(&[3.0, 1.0, 3.0, 3.0], &row(1.0, 2, 1.0, 0.0)).unwrap();
        assert_eq!(
            w.iter().map(|&x| x > 0).collect::<Vec<_>>(),
            [true, false, true, true]
        );
        // top-p 0.5 with two equal best tokens: both stay.
        let w = kept_weights(&[2.0, 2.0, 0.0], &row(1.0, 0, 0.5, 0.0)).unwrap();
        assert_eq!(
            w.iter().map(|&x| x > 0).collect::<Vec<_>>(),
            [true, true, false]
        );
    }

    #[test]
    fn edge_rows() {
        let all_masked = [f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY];
        assert_eq!(sample_row(&all_masked, &row(1.0, 0, 0.9, 0.0)), 0);
        assert_eq!(argmax(&all_masked), 0);
        // Greedy: lowest id on ties, NaN never wins.
        assert_eq!(argmax(&[1.0, f32::NAN, 4.0, 4.0]), 2);
        assert_eq!(sample_row(&[1.0, 4.0, 4.0], &RowSampling::GREEDY), 1);
        assert_eq!(sample_row(&[1.0, 4.0, 9.0], &row(1.0, 1, 1.0, 0.0)), 2);
        // min_p 1 keeps only the best; u at the very top still lands on a kept token.
        let p = RowSampling {
            u: 1.0 - f64::EPSILON,
            ..row(1.0, 0, 1.0, 1.0)
        };
        assert_eq!(sample_row(&[0.0, 3.0, 1.0], &p), 1);
        // top_k at or above the vocabulary is no filter.
        let a = kept_weights(&[0.0, 1.0], &row(1.0, 2, 1.0, 0.0)).unwrap();
        let b = kept_weights(&[0.0, 1.0], &row(1.0, 0, 1.0, 0.0)).unwrap();
        assert_eq!(a, b);
        // Fewer finite tokens than k: every finite one stays.
        let logits = [0.0, f32::NEG_INFINITY, f32::NAN, 1.0];
        let w = kept_weights(&logits, &row(1.0, 3, 1.0, 0.0)).unwrap();
        assert_eq!(
            w.iter().map(|&x| x > 0).collect::<Vec<_>>(),
            [true, false, false, true]
        );
    }

    #[test]
    fn words_round_trip() {
        let p = RowSampling {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            u: 0.123456789012345,
        };
        let w = p.words();
        assert_eq!(f32::from_bits(w[0]), 0.7);
        assert_eq!(w[1], 40);
        assert_eq!(f32::from_bits(w[2]), 0.9);
        assert_eq!(f32::from_bits(w[3]), 0.05);
        assert_eq!(f64::from_bits(u64::from(w[4]) | u64::from(w[5]) << 32), p.u);
    }
}
