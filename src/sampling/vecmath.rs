//! Dense float loops over a vocabulary-sized logit row, written so LLVM can vectorise them.
//!
//! Sampling touches every logit a few times per token (max, exp, sums); with scalar libm `exp`
//! and sequential f64 sums that alone costs ~0.2 ms per sequence at vocab 49152. These
//! helpers keep independent lanes (no reassociation is needed, so results stay deterministic
//! for a given input) and use a branch-free `exp` for non-positive arguments.

/// Lanes of the manual reductions: wide enough for AVX, harmless on SSE2.
const LANES: usize = 8;

/// `exp(x)` for `x <= 0`, ~1 ulp (Cephes `expf` polynomial). Exactly 0 below -87 (where f32
/// leaves the normal range), for -inf and for NaN, so masked logits get exactly zero weight.
#[inline(always)]
pub(super) fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so n·ln2 is subtracted without rounding error.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer without `floor`,
    // which SSE2 lacks as an instruction.
    const ROUND: f32 = 12_582_912.0;
    let in_range = x >= -87.0;
    let xc = if in_range { x } else { -87.0 };
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // `shifted` has an ulp of 1, so its low mantissa bits hold n as an integer: reading them
    // avoids a saturating float→int cast, which blocks vectorisation. n is in [-126, 0] here,
    // so the biased exponent stays in the normal range.
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    if in_range {
        y * scale
    } else {
        0.0
    }
}

/// Largest value, ignoring NaN; -inf for an empty or all-NaN/-inf row.
pub(super) fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    tail.iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Σ xs, accumulated in f64 lanes.
pub(super) fn sum(xs: &[f32]) -> f64 {
    let mut lanes = [0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (s, &x) in lanes.iter_mut().zip(c) {
            *s += f64::from(x);
        }
    }
    lanes.iter().sum::<f64>() + tail.iter().map(|&x| f64::from(x)).sum::<f64>()
}

/// log Σ exp(xs); -inf when every entry is -inf or NaN (NaN entries count as -inf).
pub(super) fn log_sum_exp(xs: &[f32]) -> f32 {
    let m = max(xs);
    if m == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    if m == f32::INFINITY {
        return f32::INFINITY;
    }
    // exp into a stack block, then the lane sum: a plain element-wise loop is what LLVM's
    // loop vectoriser handles; folding exp into the reduction left it scalar (3x slower).
    const BLOCK: usize = 1024;
    let mut buf = [0f32; BLOCK];
    let mut total = 0f64;
    for block in xs.chunks(BLOCK) {
        let out = &mut buf[..block.len()];
        for (o, &x) in out.iter_mut().zip(block) {
            *o = exp_nonpos(x - m);
        }
        total += sum(out);
    }
    m + total.ln() as f32
}

/// `out[i] = exp((logits[i] - max) / temperature)`: unnormalised softmax weights, the best
/// token at exactly 1 (also when `max` is +inf), masked tokens at exactly 0. `[vocab]`
pub(super) fn softmax_weights(logits: &[f32], max: f32, inv_temperature: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend(logits.iter().map(|&l| {
        let w = exp_nonpos((l - max) * inv_temperature);
        if l == max {
            1.0
        } else {
            w
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpos_matches_f64_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = f64::from(exp_nonpos(x));
            let want = f64::from(x).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-88.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(f32::NAN), 0.0);
    }

    #[test]
    fn reductions_match_scalar_versions() {
        let xs: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        assert_eq!(
            max(&xs),
            xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
        let want: f64 = xs.iter().map(|&x| f64::from(x)).sum();
        assert!((sum(&xs) - want).abs() < 1e-9);
        let m = f64::from(max(&xs));
        let want = m + xs
            .iter()
            .map(|&x| (f64::from(x) - m).exp())
            .sum::<f64>()
            .ln();
        assert!((f64::from(log_sum_exp(&xs)) - want).abs() < 1e-5);
        assert_eq!(max(&[f32::NAN, -1.0]), -1.0);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn softmax_weights_pin_best_and_masked() {
        let mut out = Vec::new();
        softmax_weights(
            &[0.0, -1.0, f32::NEG_INFINITY, f32::NAN],
            0.0,
            0.5,
            &mut out,
        );
        assert_eq!(out[0], 1.0);
        assert!((out[1] - (-0.5f32).exp()).abs() < 1e-7);
        assert_eq!((out[2], out[3]), (0.0, 0.0));
        softmax_weights(&[f32::INFINITY, 3.0], f32::INFINITY, 1.0, &mut out);
        assert_eq!(out, vec![1.0, 0.0]);
    }
}
