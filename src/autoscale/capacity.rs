//! A variant's capacity model: how fast one replica prefills, how long a decode step takes for
//! a batch and its context, and how many tokens of KV it holds.
//!
//! The simulator serves with a [`Calibration`] (measured by `benches/autoscale_calibrate.rs`, or
//! derived from BENCHMARKS.md); a policy starts from the same figures as a prior and then
//! [`Learner`] refits them from the telemetry it sees, so a fleet that is slower or faster than
//! its calibration is sized by what it does, not by what it was said to do.
use super::telemetry::VariantTelemetry;
use serde::{Deserialize, Serialize};

/// One replica's service figures.
///
/// A decode step of `b` sequences holding `k` tokens of context in all takes
/// `step_base_s + step_per_seq_s·b + step_per_ctx_token_s·k`; prefilling `n` prompt tokens adds
/// `n / prefill_tokens_per_s` to the step that does it (at most `prefill_chunk_tokens` a step).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Where the figures come from (a bench run, or which BENCHMARKS.md rows).
    #[serde(default)]
    pub source: String,
    pub prefill_tokens_per_s: f64,
    pub step_base_s: f64,
    pub step_per_seq_s: f64,
    pub step_per_ctx_token_s: f64,
    pub kv_capacity_tokens: f64,
    pub max_batch: u32,
    pub prefill_chunk_tokens: u32,
    /// The longest sequence (prompt + output tokens) a replica serves, as `--max-model-len`; a
    /// longer request is refused (400) before it reaches the fleet. None: no limit known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u32>,
}

impl Calibration {
    pub fn validate(&self) -> Result<(), String> {
        let pos = |x: f64| x.is_finite() && x > 0.0;
        let nonneg = |x: f64| x.is_finite() && x >= 0.0;
        if !pos(self.prefill_tokens_per_s) {
            return Err("prefill_tokens_per_s: must be positive".into());
        }
        if !pos(self.step_base_s) {
            return Err("step_base_s: must be positive".into());
        }
        if !nonneg(self.step_per_seq_s) {
            return Err("step_per_seq_s: must be ≥ 0".into());
        }
        if !nonneg(self.step_per_ctx_token_s) {
            return Err("step_per_ctx_token_s: must be ≥ 0".into());
        }
        if !pos(self.kv_capacity_tokens) {
            return Err("kv_capacity_tokens: must be positive".into());
        }
        if self.max_batch == 0 {
            return Err("max_batch: must be at least 1".into());
        }
        if self.prefill_chunk_tokens == 0 {
            return Err("prefill_chunk_tokens: must be at least 1".into());
        }
        Ok(())
    }

    /// Seconds of one decode step of `batch` sequences holding `ctx_tokens` of context in all.
    pub fn decode_step_s(&self, batch: f64, ctx_tokens: f64) -> f64 {
        self.step_base_s + self.step_per_seq_s * batch + self.step_per_ctx_token_s * ctx_tokens
    }

    /// Seconds to prefill `tokens` prompt tokens.
    pub fn prefill_s(&self, tokens: f64) -> f64 {
        tokens / self.prefill_tokens_per_s
    }
}

/// One observation: a replica's mean step (its mean ITL) with its mean batch, context and
/// prompt tokens prefilled per step.
#[derive(Clone, Copy, Debug)]
struct Sample {
    x: [f64; 4],
    y: f64,
}

/// Fits a [`Calibration`] to telemetry, pulled towards a prior.
///
/// The mean inter-token latency of an interval is the mean step time the tokens saw:
/// `itl = base + per_seq·B + per_ctx·K + (p/s)/P`, with B the mean batch per replica
/// (`running / ready`), K the context held per replica (`kv_usage × kv_capacity`), p/s the
/// prompt tokens prefilled per step (prompt tokens/s ÷ steps/s). That is linear in
/// (base, per_seq, per_ctx, 1/P): a least-squares fit, ridge-regularised towards the prior with
/// the weight of `prior_weight` samples. Prefill-only replicas have no ITL: a backlogged one
/// (waiting ≥ 1 a replica) prefills flat out, so its prompt tokens/s per replica is P.
#[derive(Clone, Debug)]
pub struct Learner {
    pub prior: Calibration,
    /// How many samples the prior weighs.
    pub prior_weight: f64,
    samples: Vec<Sample>,
    prefill_rates: Vec<f64>,
    kv_capacity: Option<f64>,
    /// Oldest samples are dropped past this many.
    pub window: usize,
}

impl Learner {
    pub fn new(prior: Calibration) -> Self {
        Learner {
            prior,
            prior_weight: 4.0,
            samples: Vec::new(),
            prefill_rates: Vec::new(),
            kv_capacity: None,
            window: 480,
        }
    }

    pub fn samples(&self) -> usize {
        self.samples.len() + self.prefill_rates.len()
    }

    /// Takes one interval of one variant's telemetry.
    pub fn observe(&mut self, v: &VariantTelemetry) {
        if v.kv_capacity_tokens > 0.0 {
            self.kv_capacity = Some(v.kv_capacity_tokens);
        }
        let ready = f64::from(v.ready_replicas);
        if ready <= 0.0 {
            return;
        }
        if v.itl.count >= 1.0 && v.steps_per_s > 0.0 && v.itl.sum > 0.0 {
            let batch = v.running / ready;
            let ctx = v.kv_usage * self.kv_capacity.unwrap_or(self.prior.kv_capacity_tokens);
            let per_step = v.prompt_tokens_per_s / v.steps_per_s;
            push(
                &mut self.samples,
                Sample {
                    x: [1.0, batch, ctx, per_step],
                    y: v.itl.sum / v.itl.count,
                },
                self.window,
            );
        } else if v.itl.count < 1.0 && v.waiting / ready >= 1.0 && v.prompt_tokens_per_s > 0.0 {
            push(
                &mut self.prefill_rates,
                v.prompt_tokens_per_s / ready,
                self.window,
            );
        }
    }

    /// The current fit.
    pub fn model(&self) -> Calibration {
        let p = &self.prior;
        let mut out = p.clone();
        if let Some(k) = self.kv_capacity {
            out.kv_capacity_tokens = k;
        }
        let prior_theta = [
            p.step_base_s,
            p.step_per_seq_s,
            p.step_per_ctx_token_s,
            1.0 / p.prefill_tokens_per_s,
        ];
        if !self.samples.is_empty() {
            // Solve for φ = θ / θ_prior (so all unknowns are of one scale), with ridge terms
            // λ (φ_j − 1)²: λ is prior_weight samples' worth of the feature's energy for one
            // sample and fades as 1/n (the fit's directions are ill-conditioned — base and
            // per-sequence cost move together — so a fixed-weight prior would bias them).
            let scale: [f64; 4] = std::array::from_fn(|j| {
                if prior_theta[j] > 0.0 {
                    prior_theta[j]
                } else {
                    1e-9
                }
            });
            let mut a = [[0.0f64; 4]; 4];
            let mut b = [0.0f64; 4];
            for s in &self.samples {
                let z: [f64; 4] = std::array::from_fn(|j| s.x[j] * scale[j]);
                for i in 0..4 {
                    b[i] += z[i] * s.y;
                    for j in 0..4 {
                        a[i][j] += z[i] * z[j];
                    }
                }
            }
            let n = self.samples.len() as f64;
            for i in 0..4 {
                let energy = (a[i][i] / n).max(1e-30);
                let lambda = self.prior_weight * energy / n;
                a[i][i] += lambda;
                b[i] += lambda;
            }
            if let Some(phi) = solve4(a, b) {
                let theta: [f64; 4] = std::array::from_fn(|j| scale[j] * phi[j].max(0.02));
                out.step_base_s = theta[0];
                out.step_per_seq_s = theta[1];
                out.step_per_ctx_token_s = theta[2];
                out.prefill_tokens_per_s = 1.0 / theta[3];
            }
        }
        if !self.prefill_rates.is_empty() {
            let n = self.prefill_rates.len() as f64;
            let w = self.prior_weight;
            let mean = self.prefill_rates.iter().sum::<f64>() / n;
            out.prefill_tokens_per_s = (mean * n + out.prefill_tokens_per_s * w) / (n + w);
        }
        out
    }
}

fn push<T>(v: &mut Vec<T>, x: T, window: usize) {
    if v.len() >= window {
        v.remove(0);
    }
    v.push(x);
}

/// One measured decode step: `batch` sequences holding `ctx_tokens` of context in all, taking
/// `step_s` seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPoint {
    pub batch: f64,
    pub ctx_tokens: f64,
    pub step_s: f64,
}

/// Fits `step = base + per_seq·B + per_ctx·K` to measured decode steps by least squares on the
/// relative error (each point weighted by 1/step², so a 10 ms step counts as much as a 500 ms
/// one), and returns `(base, per_seq, per_ctx)`. A slope the fit would make negative (noise on
/// a cost too small to see) is pinned at 0 and the others refitted, since a [`Calibration`]
/// refuses negative rates. `None` when the points cannot pin the coefficients (fewer than
/// three, a step that is not positive, or batches and contexts that do not vary
/// independently).
pub fn fit_step_model(points: &[StepPoint]) -> Option<(f64, f64, f64)> {
    if points.len() < 3
        || points.iter().any(|p| {
            !(p.step_s.is_finite()
                && p.step_s > 0.0
                && p.batch.is_finite()
                && p.ctx_tokens.is_finite())
        })
    {
        return None;
    }
    let features = |p: &StepPoint| [1.0, p.batch, p.ctx_tokens];
    // Columns scaled to unit weighted RMS, so the normal equations are well conditioned even
    // though K is thousands of times B.
    let mut scale = [0.0f64; 3];
    for p in points {
        let w = 1.0 / (p.step_s * p.step_s);
        for (s, x) in scale.iter_mut().zip(features(p)) {
            *s += w * x * x;
        }
    }
    let n = points.len() as f64;
    let scale = scale.map(|s| (s / n).sqrt());
    if scale.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
        return None;
    }
    let mut pinned = [false; 3];
    loop {
        // The fourth unknown of the shared 4×4 solver, and any pinned slope, is held at 0 by a
        // row of its own (n on the diagonal, like an active column's).
        let mut a = [[0.0f64; 4]; 4];
        let mut b = [0.0f64; 4];
        for p in points {
            let w = 1.0 / (p.step_s * p.step_s);
            let x = features(p);
            let z: [f64; 3] =
                std::array::from_fn(|j| if pinned[j] { 0.0 } else { x[j] / scale[j] });
            for i in 0..3 {
                b[i] += w * z[i] * p.step_s;
                for j in 0..3 {
                    a[i][j] += w * z[i] * z[j];
                }
            }
        }
        for (j, row) in a.iter_mut().enumerate() {
            if j == 3 || pinned[j] {
                *row = [0.0; 4];
                row[j] = n;
            }
        }
        for (j, bj) in b.iter_mut().enumerate().take(3) {
            if pinned[j] {
                *bj = 0.0;
            }
        }
        // With unit-RMS columns the active block of a/n has a unit diagonal, so its
        // determinant lies in [0, 1] and a tiny one means two columns move together (e.g. one
        // context per sequence throughout, so K is a multiple of B): nothing pins them apart.
        let g = |i: usize, j: usize| a[i][j] / n;
        let det = g(0, 0) * (g(1, 1) * g(2, 2) - g(1, 2) * g(2, 1))
            - g(0, 1) * (g(1, 0) * g(2, 2) - g(1, 2) * g(2, 0))
            + g(0, 2) * (g(1, 0) * g(2, 1) - g(1, 1) * g(2, 0));
        if det.abs() < 1e-9 {
            return None;
        }
        let phi = solve4(a, b)?;
        if phi.iter().any(|x| !x.is_finite()) {
            return None;
        }
        let theta: [f64; 3] =
            std::array::from_fn(|j| if pinned[j] { 0.0 } else { phi[j] / scale[j] });
        // Pin the most negative slope (the intercept is never pinned) and refit.
        match (1..3)
            .filter(|&j| theta[j] < 0.0)
            .min_by(|&i, &j| (theta[i] * scale[i]).total_cmp(&(theta[j] * scale[j])))
        {
            Some(j) => pinned[j] = true,
            None => return Some((theta[0], theta[1], theta[2])),
        }
    }
}

/// Gaussian elimination with partial pivoting; `None` when singular.
fn solve4(mut a: [[f64; 4]; 4], mut b: [f64; 4]) -> Option<[f64; 4]> {
    for col in 0..4 {
        let piv = (col..4).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for row in col + 1..4 {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; 4];
    for i in (0..4).rev() {
        let s: f64 = (i + 1..4).map(|k| a[i][k] * x[k]).sum();
        x[i] = (b[i] - s) / a[i][i];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::telemetry::Histogram;

    fn truth() -> Calibration {
        Calibration {
            source: "synthetic".into(),
            prefill_tokens_per_s: 8000.0,
            step_base_s: 0.004,
            step_per_seq_s: 0.00005,
            step_per_ctx_token_s: 2e-8,
            kv_capacity_tokens: 500_000.0,
            max_batch: 256,
            prefill_chunk_tokens: 512,
            max_model_len: None,
        }
    }

    /// A prior that is wrong by 2–3× in every rate.
    fn wrong_prior() -> Calibration {
        Calibration {
            prefill_tokens_per_s: 3000.0,
            step_base_s: 0.01,
            step_per_seq_s: 0.00002,
            step_per_ctx_token_s: 6e-8,
            kv_capacity_tokens: 100_000.0,
            ..truth()
        }
    }

    /// What `replicas` synthetic workers with the true rates report over one interval at a
    /// given batch, context per sequence and prompt tokens per step.
    fn interval(
        replicas: u32,
        batch: f64,
        ctx_per_seq: f64,
        prompt_per_step: f64,
    ) -> VariantTelemetry {
        let t = truth();
        let k = batch * ctx_per_seq;
        let step = t.decode_step_s(batch, k) + t.prefill_s(prompt_per_step);
        let r = f64::from(replicas);
        let steps_per_s = r / step;
        let tokens = steps_per_s * batch * 10.0;
        VariantTelemetry {
            variant: "v".into(),
            ready_replicas: replicas,
            running: batch * r,
            kv_usage: k / t.kv_capacity_tokens,
            kv_capacity_tokens: t.kv_capacity_tokens,
            prompt_tokens_per_s: steps_per_s * prompt_per_step,
            generation_tokens_per_s: steps_per_s * batch,
            steps_per_s,
            itl: Histogram {
                buckets: vec![],
                count: tokens,
                sum: tokens * step,
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_fit_recovers_known_rates_from_synthetic_workers() {
        let mut l = Learner::new(wrong_prior());
        for i in 0..200u32 {
            let batch = 1.0 + f64::from(i % 17) * 6.0;
            let ctx = 200.0 + f64::from((i * 7) % 23) * 150.0;
            let prompt = f64::from((i * 5) % 11) * 90.0;
            l.observe(&interval(1 + i % 4, batch, ctx, prompt));
        }
        let m = l.model();
        let t = truth();
        let close = |got: f64, want: f64, what: &str| {
            assert!(
                (got - want).abs() <= 0.03 * want,
                "{what}: fitted {got}, true {want}"
            )
        };
        close(m.step_base_s, t.step_base_s, "step_base_s");
        close(m.step_per_seq_s, t.step_per_seq_s, "step_per_seq_s");
        close(
            m.step_per_ctx_token_s,
            t.step_per_ctx_token_s,
            "step_per_ctx_token_s",
        );
        close(
            m.prefill_tokens_per_s,
            t.prefill_tokens_per_s,
            "prefill_tokens_per_s",
        );
        assert_eq!(m.kv_capacity_tokens, t.kv_capacity_tokens);
    }

    #[test]
    fn without_samples_the_prior_stands_and_few_samples_move_it_part_way() {
        let l = Learner::new(wrong_prior());
        assert_eq!(l.model(), wrong_prior());
        let mut l = Learner::new(wrong_prior());
        l.observe(&interval(2, 30.0, 500.0, 100.0));
        let m = l.model();
        // One sample cannot pin four unknowns: it stays between the prior and the truth.
        assert!(m.step_base_s < wrong_prior().step_base_s);
    }

    #[test]
    fn a_backlogged_prefill_replica_teaches_the_prefill_rate() {
        let mut l = Learner::new(wrong_prior());
        for _ in 0..100 {
            l.observe(&VariantTelemetry {
                ready_replicas: 3,
                waiting: 9.0,
                prompt_tokens_per_s: 3.0 * 8000.0,
                ..Default::default()
            });
        }
        let p = l.model().prefill_tokens_per_s;
        assert!((p - 8000.0).abs() < 0.05 * 8000.0, "{p}");
    }

    /// The calibration bench's grid: batches × contexts per sequence, steps from `truth`
    /// times `1 + noise(i)`.
    fn grid(known: (f64, f64, f64), noise: impl Fn(usize) -> f64) -> Vec<StepPoint> {
        let mut out = Vec::new();
        for ctx in [64.0, 256.0, 1024.0] {
            for batch in [1.0, 2.0, 4.0, 8.0, 16.0] {
                let k = batch * ctx;
                let step = known.0 + known.1 * batch + known.2 * k;
                out.push(StepPoint {
                    batch,
                    ctx_tokens: k,
                    step_s: step * (1.0 + noise(out.len())),
                });
            }
        }
        out
    }

    /// Reproducible noise in [-amp, amp] (SplitMix64 of the index).
    fn jitter(amp: f64) -> impl Fn(usize) -> f64 {
        move |i| {
            let mut z = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            amp * (2.0 * (z >> 11) as f64 / (1u64 << 53) as f64 - 1.0)
        }
    }

    #[test]
    fn the_step_fit_recovers_known_coefficients_exactly_without_noise() {
        // A CPU-like replica (20 ms base, 3 ms a sequence, 1.5 µs a context token) and the
        // H200 calibration's figures (context cost 10⁵ times smaller than a sequence's).
        for known in [(0.02, 0.003, 1.5e-6), (0.005563, 0.00001976, 4.34e-8)] {
            let (b, s, c) = fit_step_model(&grid(known, |_| 0.0)).unwrap();
            for (got, want, what) in [
                (b, known.0, "base"),
                (s, known.1, "per_seq"),
                (c, known.2, "per_ctx"),
            ] {
                assert!(
                    ((got - want) / want).abs() < 1e-9,
                    "{what}: fitted {got}, true {want}"
                );
            }
        }
    }

    #[test]
    fn the_step_fit_with_noise_stays_close_and_never_goes_negative() {
        let known = (0.02, 0.003, 1.5e-6);
        let points = grid(known, jitter(0.03));
        let (b, s, c) = fit_step_model(&points).unwrap();
        // ±3 % noise on 15 points: each coefficient within 15 %, every step predicted within
        // the noise plus a little.
        for (got, want, what) in [
            (b, known.0, "base"),
            (s, known.1, "per_seq"),
            (c, known.2, "per_ctx"),
        ] {
            assert!(
                ((got - want) / want).abs() < 0.15,
                "{what}: fitted {got}, true {want}"
            );
        }
        for p in &points {
            let want = known.0 + known.1 * p.batch + known.2 * p.ctx_tokens;
            let got = b + s * p.batch + c * p.ctx_tokens;
            assert!(((got - want) / want).abs() < 0.04, "{p:?}: {got} vs {want}");
        }
        // No context cost at all: noise would fit a negative one, which is pinned at 0 and the
        // rest refitted.
        let flat = (0.02, 0.003, 0.0);
        let (b, s, c) = fit_step_model(&grid(flat, jitter(0.03))).unwrap();
        assert!(
            c >= 0.0 && s >= 0.0,
            "negative slope: per_seq {s}, per_ctx {c}"
        );
        assert!(((b - flat.0) / flat.0).abs() < 0.15, "base {b}");
        assert!(((s - flat.1) / flat.1).abs() < 0.15, "per_seq {s}");
        let cal = Calibration {
            step_base_s: b,
            step_per_seq_s: s,
            step_per_ctx_token_s: c,
            ..truth()
        };
        cal.validate().unwrap();
        // A context cost that is truly negative (no worker has one; it forces the pinning):
        // the fit holds it at exactly 0 and still returns positive base and per-sequence cost.
        let (b, s, c) = fit_step_model(&grid((0.05, 0.003, -1e-6), |_| 0.0)).unwrap();
        assert_eq!(c, 0.0);
        assert!(b > 0.0 && s > 0.0, "base {b}, per_seq {s}");
    }

    #[test]
    fn the_step_fit_refuses_points_that_cannot_pin_it() {
        let good = grid((0.02, 0.003, 1.5e-6), |_| 0.0);
        assert_eq!(
            fit_step_model(&good[..2]),
            None,
            "two points, three unknowns"
        );
        // One context per sequence throughout: K = 256·B, so B and K cannot be told apart.
        let collinear: Vec<StepPoint> = good
            .iter()
            .filter(|p| p.ctx_tokens == 256.0 * p.batch)
            .copied()
            .collect();
        assert_eq!(collinear.len(), 5);
        assert_eq!(fit_step_model(&collinear), None);
        let mut bad = good.clone();
        bad[3].step_s = 0.0;
        assert_eq!(fit_step_model(&bad), None, "a zero step");
        bad[3].step_s = f64::NAN;
        assert_eq!(fit_step_model(&bad), None, "a NaN step");
    }

    #[test]
    fn the_step_model_is_the_documented_formula() {
        let t = truth();
        // 0.004 + 0.00005·10 + 2e-8·10,000 = 0.0047 s; 512 tokens at 8000/s = 0.064 s.
        assert!((t.decode_step_s(10.0, 10_000.0) - 0.0047).abs() < 1e-12);
        assert!((t.prefill_s(512.0) - 0.064).abs() < 1e-12);
    }
}
