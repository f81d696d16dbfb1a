//! [`SequenceSampler`]: one request's logits → token step, with the state that step needs.
//!
//! Order of operations per step (vLLM's, with its default "raw" logprobs):
//! 1. logprobs from the raw logits (log-softmax before any penalty or temperature);
//! 2. repetition penalty (prompt + output tokens), then presence/frequency (output tokens);
//! 3. greedy argmax when temperature is 0 or top_k is 1 (ties → lowest id, no RNG draw);
//!    otherwise temperature, top-k, top-p, min-p, and one draw from the renormalised rest.
//!
//! Invariants: the RNG is advanced exactly once per non-greedy step and by nothing else, so a
//! seeded request gives the same tokens whatever batch it runs in; the penalty state holds
//! exactly the prompt plus every token `sample` returned. NaN logits are treated as -inf.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::filter::{self, Candidate};
use super::{vecmath, SamplingParams};
use crate::backend::cpu::sampling::RowSampling;
use crate::request::TokenId;

/// The outcome of one sampling step.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token: TokenId,
    /// Raw log-probability of `token`; `Some` only when the request asked for logprobs.
    pub logprob: Option<f32>,
    /// The `logprobs` most likely tokens by raw log-probability, descending (ties → lower id).
    pub top_logprobs: Vec<(TokenId, f32)>,
}

/// Sets the logits of `ids` to -inf so they cannot be sampled (ids outside the vocab are
/// ignored). The engine uses it to hold back EOS / stop tokens until `min_tokens` outputs.
pub fn mask_tokens(logits: &mut [f32], ids: &[TokenId]) {
    for &id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// One request's sampling state. See the module docs for the per-step order of operations.
pub struct SequenceSampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    logprobs: Option<usize>,
    rng: ChaCha8Rng,
    /// Distinct prompt and output tokens; kept only when the repetition penalty is active.
    seen: HashSet<TokenId>,
    /// Occurrences of each token in the output; kept only when presence/frequency is active.
    output_counts: HashMap<TokenId, u32>,
    num_output_tokens: usize,
    /// Scratch reused across steps so a step allocates nothing once warm. `[<= vocab]`
    candidates: Vec<Candidate>,
    /// Scratch: unnormalised weights of the dense path. `[vocab]`
    weights: Vec<f32>,
    /// Scratch: per-block sums of `weights` for the dense draw. `[vocab / DRAW_BLOCK]`
    block_sums: Vec<f64>,
    /// Scratch: the top-p weight histogram.
    hist: Vec<f64>,
    /// Copy of the raw logits, kept only for the sampled token's logprob. `[vocab]`
    raw_logits: Vec<f32>,
}

impl SequenceSampler {
    /// `params` are assumed validated ([`SamplingParams::validate`]).
    pub fn new(params: &SamplingParams, prompt: &[TokenId]) -> Self {
        let seed = params.seed.unwrap_or_else(entropy_seed);
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            logprobs: params.logprobs,
            rng: ChaCha8Rng::seed_from_u64(seed),
            seen,
            output_counts: HashMap::new(),
            num_output_tokens: 0,
            candidates: Vec::new(),
            weights: Vec::new(),
            block_sums: Vec::new(),
            hist: Vec::new(),
            raw_logits: Vec::new(),
        }
    }

    /// How many tokens `sample` has produced so far.
    pub fn num_output_tokens(&self) -> usize {
        self.num_output_tokens
    }

    /// Picks the next token from `logits` (`[vocab]`, modified in place by the penalties) and
    /// records it into the penalty state.
    pub fn sample(&mut self, logits: &mut [f32]) -> SampledToken {
        let raw = self.logprobs.map(|n| {
            self.raw_logits.clear();
            self.raw_logits.extend_from_slice(logits);
            RawLogprobs::compute(logits, n)
        });
        self.apply_penalties(logits);
        let token = if self.temperature == 0.0 || self.top_k == 1 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        self.record(token);
        match raw {
            Some(raw) => SampledToken {
                token,
                logprob: Some(
                    raw.logprob(
                        self.raw_logits
                            .get(token as usize)
                            .copied()
                            .unwrap_or(f32::NEG_INFINITY),
                    ),
                ),
                top_logprobs: raw.top,
            },
            None => SampledToken {
                token,
                logprob: None,
                top_logprobs: Vec::new(),
            },
        }
    }

    /// What a device needs to pick this step's token itself, so the logits never leave it:
    /// `None` when the step needs the host (logprobs, penalties). A greedy row draws nothing;
    /// a random one (only when `random` is true) takes its one uniform number of the step
    /// from the request's RNG now, so seeded requests stay reproducible.
    pub fn device_params(&mut self, random: bool) -> Option<RowSampling> {
        if self.logprobs.is_some()
            || self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
        {
            return None;
        }
        if self.temperature == 0.0 || self.top_k == 1 {
            return Some(RowSampling::GREEDY);
        }
        if !random {
            return None;
        }
        Some(RowSampling {
            temperature: self.temperature,
            top_k: u32::try_from(self.top_k).unwrap_or(u32::MAX),
            top_p: self.top_p,
            min_p: self.min_p,
            u: uniform_f64(&mut self.rng),
        })
    }

    /// Takes a token the device picked from this step's [`Self::device_params`].
    pub fn accept_device(&mut self, token: TokenId) -> SampledToken {
        self.record(token);
        SampledToken {
            token,
            logprob: None,
            top_logprobs: Vec::new(),
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        if self.repetition_penalty != 1.0 {
            let rp = self.repetition_penalty;
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    // HF semantics: always move the logit towards "less likely".
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            for (&t, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= self.frequency_penalty * count as f32 + self.presence_penalty;
                }
            }
        }
    }

    fn record(&mut self, token: TokenId) {
        self.num_output_tokens += 1;
        if self.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
    }

    /// The filtered, renormalised distribution a random step draws from (`[vocab]`).
    #[cfg(test)]
    pub(crate) fn probabilities(&mut self, logits: &[f32]) -> Vec<f64> {
        let mut p = vec![0f64; logits.len()];
        match self.filter(logits) {
            Filtered::Dense => {
                for (p, &w) in p.iter_mut().zip(&self.weights) {
                    *p = f64::from(w);
                }
            }
            Filtered::Sparse => {
                for c in &self.candidates {
                    p[c.id as usize] = f64::from(c.weight);
                }
            }
            Filtered::Empty => {}
        }
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= total);
        p
    }

    /// Random sampling: filter, then one draw from the sequence's RNG.
    fn draw(&mut self, logits: &[f32]) -> TokenId {
        // Drawn before filtering so the RNG advances once per step whatever survives.
        let u = uniform_f64(&mut self.rng);
        let picked = match self.filter(logits) {
            Filtered::Sparse => draw_sparse(&self.candidates, u),
            Filtered::Dense => draw_dense(&self.weights, u, &mut self.block_sums),
            Filtered::Empty => None,
        };
        // Nothing had mass (every logit masked): fall back to argmax's convention.
        picked.unwrap_or_else(|| argmax(logits))
    }

    /// Applies temperature, top-k, top-p and min-p, leaving the surviving tokens' unnormalised
    /// weights in `self.weights` (dense) or `self.candidates` (sparse) as the result says.
    fn filter(&mut self, logits: &[f32]) -> Filtered {
        let max = vecmath::max(logits);
        if max == f32::NEG_INFINITY {
            return Filtered::Empty;
        }
        let inv_t = 1.0 / self.temperature;
        if self.top_k > 0 && self.top_k < logits.len() {
            filter::top_k(logits, self.top_k, &mut self.weights, &mut self.candidates);
            for c in &mut self.candidates {
                c.weight = if c.logit == max {
                    1.0
                } else {
                    vecmath::exp_nonpos((c.logit - max) * inv_t)
                };
            }
            if self.top_p < 1.0 {
                filter::top_p_sparse(&mut self.candidates, self.top_p);
            }
        } else {
            vecmath::softmax_weights(logits, max, inv_t, &mut self.weights);
            if self.top_p >= 1.0 {
                if self.min_p > 0.0 {
                    let min_p = self.min_p;
                    for w in &mut self.weights {
                        if *w < min_p {
                            *w = 0.0;
                        }
                    }
                }
                return Filtered::Dense;
            }
            filter::top_p_dense(
                &self.weights,
                logits,
                self.top_p,
                &mut self.hist,
                &mut self.candidates,
            );
        }
        if self.min_p > 0.0 {
            // The best token weighs 1, so "prob < min_p × max prob" is "weight < min_p".
            let min_p = self.min_p;
            self.candidates.retain(|c| c.weight >= min_p);
        }
        Filtered::Sparse
    }
}

/// Where [`SequenceSampler::filter`] left the distribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Filtered {
    /// `weights[id]` for every token, 0 for dropped ones (no top-k/top-p: nothing to order).
    Dense,
    /// `candidates`, the only tokens left (top-k or top-p ran).
    Sparse,
    /// Every logit is -inf or NaN.
    Empty,
}

/// Inverse-CDF draw over the candidates; `None` when none has mass.
fn draw_sparse(cands: &[Candidate], u: f64) -> Option<TokenId> {
    let total: f64 = cands.iter().map(|c| f64::from(c.weight)).sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let target = u * total;
    let mut acc = 0.0f64;
    let mut last_positive = None;
    for c in cands {
        if c.weight > 0.0 {
            last_positive = Some(c.id);
            acc += f64::from(c.weight);
            if target < acc {
                return Some(c.id);
            }
        }
    }
    // Rounding left `target` just past the final sum: the last token with mass wins.
    last_positive
}

/// Tokens per block of the two-level dense draw.
const DRAW_BLOCK: usize = 1024;

/// Inverse-CDF draw over dense weights (`[vocab]`): vectorised per-block sums find the block,
/// a short sequential walk finds the token. `None` when no token has mass.
fn draw_dense(weights: &[f32], u: f64, block_sums: &mut Vec<f64>) -> Option<TokenId> {
    block_sums.clear();
    block_sums.extend(weights.chunks(DRAW_BLOCK).map(vecmath::sum));
    let total: f64 = block_sums.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let target = u * total;
    let mut acc = 0.0f64;
    for (b, &mass) in block_sums.iter().enumerate() {
        if mass > 0.0 && target < acc + mass {
            let start = b * DRAW_BLOCK;
            let block = &weights[start..(start + DRAW_BLOCK).min(weights.len())];
            let mut last_positive = None;
            for (i, &w) in block.iter().enumerate() {
                if w > 0.0 {
                    last_positive = Some(i);
                    acc += f64::from(w);
                    if target < acc {
                        return Some((start + i) as TokenId);
                    }
                }
            }
            // The block's vectorised sum rounded differently from this walk.
            return last_positive.map(|i| (start + i) as TokenId);
        }
        acc += mass;
    }
    weights.iter().rposition(|&w| w > 0.0).map(|i| i as TokenId)
}

/// Argmax with ties to the lowest id; NaN never wins. All -inf/NaN → token 0.
fn argmax(logits: &[f32]) -> TokenId {
    // Two vectorisable passes beat one branchy compare-and-track pass.
    let max = vecmath::max(logits);
    logits.iter().position(|&l| l == max).unwrap_or(0) as TokenId
}

/// Log-softmax normaliser and top-n of the raw logits.
struct RawLogprobs {
    /// log Σ exp(logit); -inf when every logit is masked.
    log_sum_exp: f32,
    /// `[n]`, descending by logprob, ties → lower id.
    top: Vec<(TokenId, f32)>,
}

impl RawLogprobs {
    fn compute(logits: &[f32], n: usize) -> Self {
        let log_sum_exp = vecmath::log_sum_exp(logits);
        // A small sorted list beats selecting over the vocabulary for n <= MAX_LOGPROBS;
        // once it is full, almost every logit is rejected by one compare with `floor`.
        let mut top: Vec<(TokenId, f32)> = Vec::with_capacity(n + 1);
        let mut floor = f32::NEG_INFINITY;
        if n > 0 {
            for (i, &l) in logits.iter().enumerate() {
                let full = top.len() == n;
                if l.is_nan() || (full && l <= floor) {
                    continue;
                }
                // Inserting after equal values keeps earlier (lower) ids ahead on ties.
                let pos = top.partition_point(|&(_, m)| m >= l);
                top.insert(pos, (i as TokenId, l));
                top.truncate(n);
                if top.len() == n {
                    floor = top[n - 1].1;
                }
            }
        }
        for entry in &mut top {
            entry.1 = logprob_of(entry.1, log_sum_exp);
        }
        Self { log_sum_exp, top }
    }

    fn logprob(&self, raw_logit: f32) -> f32 {
        logprob_of(raw_logit, self.log_sum_exp)
    }
}

fn logprob_of(logit: f32, log_sum_exp: f32) -> f32 {
    if logit == f32::NEG_INFINITY || logit.is_nan() {
        f32::NEG_INFINITY
    } else {
        logit - log_sum_exp
    }
}

/// Uniform in [0, 1) with 53 random bits.
fn uniform_f64(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A fresh seed for unseeded requests. std's `RandomState` keys come from OS entropy once per
/// thread and change on every construction; time and a counter add per-call variation. The
/// seed never leaves the process, so an unstable source is fine here.
fn entropy_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(1234),
            ..SamplingParams::default()
        };
        f(&mut p);
        p.validate().unwrap();
        p
    }

    /// Logits whose softmax is exactly `probs`.
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn random_logits(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| (uniform_f64(&mut rng) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    fn draws(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<TokenId> {
        let mut s = SequenceSampler::new(p, &[]);
        (0..n)
            .map(|_| s.sample(&mut logits.to_vec()).token)
            .collect()
    }

    fn kept_ids(p: &SamplingParams, logits: &[f32]) -> Vec<TokenId> {
        let mut s = SequenceSampler::new(p, &[]);
        let mut ids: Vec<TokenId> = match s.filter(logits) {
            Filtered::Sparse => s
                .candidates
                .iter()
                .filter(|c| c.weight > 0.0)
                .map(|c| c.id)
                .collect(),
            Filtered::Dense => (0..s.weights.len() as TokenId)
                .filter(|&i| s.weights[i as usize] > 0.0)
                .collect(),
            Filtered::Empty => Vec::new(),
        };
        ids.sort_unstable();
        ids
    }

    /// Pearson chi-square of observed draws against expected probabilities.
    fn chi_square(tokens: &[TokenId], expected: &[f64]) -> f64 {
        let mut counts = vec![0usize; expected.len()];
        for &t in tokens {
            counts[t as usize] += 1;
        }
        let n = tokens.len() as f64;
        counts
            .iter()
            .zip(expected)
            .map(|(&o, &p)| {
                if p == 0.0 {
                    assert_eq!(o, 0, "drew a token of probability 0");
                    0.0
                } else {
                    (o as f64 - n * p).powi(2) / (n * p)
                }
            })
            .sum()
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties_and_ignores_nan() {
        let p = SamplingParams::greedy();
        let mut s = SequenceSampler::new(&p, &[]);
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0, 1.9]).token, 1);
        assert_eq!(s.sample(&mut [0.5, 3.0, 3.0, 3.0]).token, 1);
        assert_eq!(s.sample(&mut [f32::NAN, -5.0, f32::NAN, -6.0]).token, 1);
        assert_eq!(s.num_output_tokens(), 3);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let p = params(|p| {
            p.top_k = 1;
            p.temperature = 1.5;
        });
        for seed in 0..20 {
            let mut logits = random_logits(seed, 1000, 3.0);
            let expected = argmax(&logits);
            let mut s = SequenceSampler::new(&p, &[]);
            assert_eq!(s.sample(&mut logits).token, expected);
        }
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different() {
        let logits = random_logits(9, 512, 1.0);
        let a = draws(&params(|p| p.seed = Some(7)), &logits, 64);
        let b = draws(&params(|p| p.seed = Some(7)), &logits, 64);
        let c = draws(&params(|p| p.seed = Some(8)), &logits, 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Unseeded requests get distinct seeds.
        let u1 = draws(&params(|p| p.seed = None), &logits, 64);
        let u2 = draws(&params(|p| p.seed = None), &logits, 64);
        assert_ne!(u1, u2);
    }

    #[test]
    fn seeded_request_is_independent_of_its_batch_neighbours() {
        let logits = random_logits(3, 300, 2.0);
        let alone = draws(&params(|p| p.seed = Some(42)), &logits, 32);
        let mut me = SequenceSampler::new(&params(|p| p.seed = Some(42)), &[]);
        let mut other = SequenceSampler::new(&params(|p| p.seed = Some(43)), &[]);
        let mut interleaved = Vec::new();
        for _ in 0..32 {
            other.sample(&mut logits.clone());
            interleaved.push(me.sample(&mut logits.clone()).token);
            other.sample(&mut logits.clone());
        }
        assert_eq!(alone, interleaved);
    }

    #[test]
    fn draws_match_the_distribution() {
        // dof 3, p = 0.001 critical value 16.27; the seed is fixed so this cannot flake.
        let probs = [0.1f32, 0.2, 0.3, 0.4];
        let tokens = draws(&params(|_| {}), &logits_of(&probs), 40_000);
        let expected: Vec<f64> = probs.iter().map(|&p| f64::from(p)).collect();
        let stat = chi_square(&tokens, &expected);
        assert!(stat < 16.27, "chi-square {stat}");
        // Temperature 0.5 squares the probabilities: [1, 4, 9, 16] / 30.
        let tokens = draws(&params(|p| p.temperature = 0.5), &logits_of(&probs), 40_000);
        let expected = [1.0 / 30.0, 4.0 / 30.0, 9.0 / 30.0, 16.0 / 30.0];
        let stat = chi_square(&tokens, &expected);
        assert!(stat < 16.27, "chi-square {stat}");
        // A grossly wrong hypothesis is rejected by the same statistic.
        assert!(chi_square(&tokens, &[0.25, 0.25, 0.25, 0.25]) > 100.0);
    }

    #[test]
    fn top_k_keeps_the_k_best_and_renormalises() {
        let probs = [0.3f32, 0.05, 0.4, 0.25];
        let p = params(|p| p.top_k = 2);
        assert_eq!(kept_ids(&p, &logits_of(&probs)), vec![0, 2]);
        let tokens = draws(&p, &logits_of(&probs), 20_000);
        let stat = chi_square(&tokens, &[3.0 / 7.0, 0.0, 4.0 / 7.0, 0.0]);
        assert!(stat < 10.83, "chi-square {stat}");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Sorted: 0.4 (id 2), 0.3 (id 0), 0.2 (id 3), 0.1 (id 1).
        let logits = logits_of(&[0.3, 0.1, 0.4, 0.2]);
        let kept = |top_p| kept_ids(&params(|p| p.top_p = top_p), &logits);
        assert_eq!(kept(0.3), vec![2], "the best token alone already exceeds p");
        assert_eq!(kept(0.6), vec![0, 2]);
        assert_eq!(kept(0.75), vec![0, 2, 3]);
        assert_eq!(kept(0.95), vec![0, 1, 2, 3]);
        assert_eq!(kept(0.01), vec![2]);
        let tokens = draws(&params(|p| p.top_p = 0.75), &logits, 20_000);
        let stat = chi_square(&tokens, &[1.0 / 3.0, 0.0, 4.0 / 9.0, 2.0 / 9.0]);
        assert!(stat < 13.82, "chi-square {stat}");
    }

    #[test]
    #[ignore = "timing report, run with --ignored --nocapture"]
    fn timing_vocab_49152() {
        // Flat: uniform logits. Peaked: a few strong tokens over a noisy background, closer
        // to what a trained model emits.
        let flat = random_logits(5, 49_152, 10.0);
        let mut peaked = random_logits(6, 49_152, 3.0);
        for (i, boost) in [(17, 12.0), (4242, 11.0), (999, 10.0), (30_000, 9.0)] {
            peaked[i] += boost;
        }
        for (dist, logits) in [("flat", flat), ("peaked", peaked)] {
            let configs: [(&str, SamplingParams); 6] = [
                ("greedy", SamplingParams::greedy()),
                ("temperature", params(|_| {})),
                ("top_k 50", params(|p| p.top_k = 50)),
                ("top_p 0.9", params(|p| p.top_p = 0.9)),
                ("min_p 0.05", params(|p| p.min_p = 0.05)),
                ("logprobs 5", params(|p| p.logprobs = Some(5))),
            ];
            for (name, p) in configs {
                let mut s = SequenceSampler::new(&p, &[]);
                let mut buf = logits.clone();
                let start = std::time::Instant::now();
                for _ in 0..200 {
                    buf.copy_from_slice(&logits);
                    s.sample(&mut buf);
                }
                println!("{dist} {name}: {:?} per step", start.elapsed() / 200);
            }
        }
    }

    #[test]
    fn min_p_drops_tokens_below_fraction_of_best() {
        let logits = logits_of(&[0.15, 0.5, 0.05, 0.3]);
        let kept = |min_p| kept_ids(&params(|p| p.min_p = min_p), &logits);
        assert_eq!(kept(0.2), vec![0, 1, 3], "threshold 0.1 drops only 0.05");
        assert_eq!(kept(0.5), vec![1, 3], "threshold 0.25");
        assert_eq!(kept(1.0), vec![1]);
        let tokens = draws(&params(|p| p.min_p = 0.5), &logits, 20_000);
        let stat = chi_square(&tokens, &[0.0, 0.625, 0.0, 0.375]);
        assert!(stat < 10.83, "chi-square {stat}");
    }

    #[test]
    fn penalties_change_logits_by_hand_computed_amounts() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        let mut s = SequenceSampler::new(&p, &[0]);
        for _ in 0..2 {
            assert_eq!(s.sample(&mut [0.0, 100.0, 0.0, 0.0]).token, 1);
        }
        // Token 0: prompt only → 2.0 / 2. Token 1: output twice, negative →
        // -1.0 * 2 - 0.25 * 2 - 0.5 = -3.0. Tokens 2, 3: never seen.
        let mut logits = [2.0, -1.0, 0.5, 3.0];
        assert_eq!(s.sample(&mut logits).token, 3);
        assert_eq!(logits, [1.0, -3.0, 0.5, 3.0]);
        // Token 3 is now an output too: 3.0 / 2 - 0.25 - 0.5 = 0.75.
        let mut logits = [2.0, -1.0, 0.5, 3.0];
        assert_eq!(s.sample(&mut logits).token, 0);
        assert_eq!(logits, [1.0, -3.0, 0.5, 0.75]);
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax() {
        let raw = [1.0f32, 2.0, 3.0, 4.0];
        let lse = (raw.iter().map(|&l| f64::from(l).exp()).sum::<f64>()).ln() as f32;
        // The prompt token 3 is penalised hard, so greedy picks 2, but logprobs stay raw.
        let p = SamplingParams {
            repetition_penalty: 10.0,
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let mut s = SequenceSampler::new(&p, &[3]);
        let out = s.sample(&mut raw.clone());
        assert_eq!(out.token, 2);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-6;
        assert!(close(out.logprob.unwrap(), 3.0 - lse));
        assert_eq!(out.top_logprobs.len(), 2);
        assert_eq!(out.top_logprobs[0].0, 3);
        assert!(close(out.top_logprobs[0].1, 4.0 - lse));
        assert_eq!(out.top_logprobs[1].0, 2);
        assert!(close(out.top_logprobs[1].1, 3.0 - lse));
        // Ties rank the lower id first; masked tokens have -inf.
        let p = params(|p| p.logprobs = Some(3));
        let mut s = SequenceSampler::new(&p, &[]);
        let out = s.sample(&mut [f32::NEG_INFINITY, 0.0, 0.0, 0.0, 0.0]);
        let ids: Vec<TokenId> = out.top_logprobs.iter().map(|e| e.0).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert!(out.top_logprobs.iter().all(|e| close(e.1, -(4f32.ln()))));
        assert!(close(out.logprob.unwrap(), -(4f32.ln())));
    }

    #[test]
    fn logprobs_only_when_requested() {
        let mut s = SequenceSampler::new(&SamplingParams::greedy(), &[]);
        let out = s.sample(&mut [0.0, 1.0]);
        assert_eq!((out.logprob, out.top_logprobs.len()), (None, 0));
        let p = SamplingParams {
            logprobs: Some(0),
            ..SamplingParams::greedy()
        };
        let out = SequenceSampler::new(&p, &[]).sample(&mut [0.0, 0.0]);
        assert!((out.logprob.unwrap() - (0.5f32).ln()).abs() < 1e-6);
        assert!(out.top_logprobs.is_empty());
    }

    #[test]
    fn masked_tokens_are_never_drawn() {
        let mut logits = vec![0.0f32; 8];
        mask_tokens(&mut logits, &[0, 1, 2, 3, 4, 5, 7, 1_000_000]);
        assert_eq!(logits.iter().filter(|l| l.is_infinite()).count(), 7);
        let tokens = draws(&params(|p| p.temperature = 2.0), &logits, 100);
        assert!(tokens.iter().all(|&t| t == 6));
    }
}
