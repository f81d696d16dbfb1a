//! Truncation filters: top-k and top-p (nucleus) selection over one logit row.
//!
//! Both define "the best tokens" by the order (logit descending, then id ascending), so ties
//! always go to the lower id and results never depend on how an unstable selection happened
//! to permute equal elements. Neither sorts the whole vocabulary: top-k selects in O(vocab);
//! top-p over the full vocabulary finds its cut with one histogram pass and sorts only the
//! tokens that share the cut's histogram bucket.
use crate::request::TokenId;

/// A token still in the running. `weight` is its unnormalised probability
/// `exp((logit - max) / temperature)`, so the best token weighs exactly 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Candidate {
    pub id: TokenId,
    pub logit: f32,
    pub weight: f32,
}

pub(super) fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Leaves in `cands` the `k` best finite-logit tokens of `logits` (`[vocab]`), in id order and
/// with weight 0 (fewer when fewer are finite). `scratch` is reused memory.
pub(super) fn top_k(logits: &[f32], k: usize, scratch: &mut Vec<f32>, cands: &mut Vec<Candidate>) {
    cands.clear();
    if k == 0 {
        return;
    }
    // The k-th largest logit by an O(vocab) selection over plain floats (NaN as -inf, since
    // total_cmp ranks NaN above +inf), then one gather in id order.
    scratch.clear();
    scratch.extend(
        logits
            .iter()
            .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }),
    );
    let kth = if k < scratch.len() {
        *scratch
            .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a))
            .1
    } else {
        f32::NEG_INFINITY
    };
    cands.extend(
        logits
            .iter()
            .enumerate()
            .filter(|(_, &l)| l >= kth && l > f32::NEG_INFINITY)
            .map(|(i, &l)| Candidate {
                id: i as TokenId,
                logit: l,
                weight: 0.0,
            }),
    );
    if cands.len() > k {
        // Ties at the k-th value: the lowest ids win.
        let mut ties_left = k - cands.iter().filter(|c| c.logit > kth).count();
        cands.retain(|c| {
            if c.logit > kth {
                return true;
            }
            let keep = ties_left > 0;
            ties_left = ties_left.saturating_sub(1);
            keep
        });
    }
}

/// Nucleus over an already-small candidate set: keeps the shortest prefix, in the best-first
/// order, whose weight reaches `top_p` of the set's total (always at least one).
pub(super) fn top_p_sparse(cands: &mut Vec<Candidate>, top_p: f32) {
    let total: f64 = cands.iter().map(|c| f64::from(c.weight)).sum();
    let target = f64::from(top_p) * total;
    cands.sort_unstable_by(by_logit_desc);
    cut_sorted(cands, 0, 0.0, target);
}

/// Histogram bucket of a weight in [0, 1]: its float bits without the low mantissa bits, so
/// buckets are ordered like the weights and each spans a quarter of a binade.
const KEY_SHIFT: u32 = 21;
const NUM_KEYS: usize = (1.0f32.to_bits() >> KEY_SHIFT) as usize + 1;
/// Independent histograms, so consecutive tokens landing in one bucket do not serialise on
/// a single memory location.
const HIST_LANES: usize = 4;

fn key(w: f32) -> usize {
    ((w.to_bits() >> KEY_SHIFT) as usize).min(NUM_KEYS - 1)
}

/// Nucleus over the whole vocabulary: fills `cands` with the shortest best-first prefix of
/// tokens whose `weights` (`[vocab]`, in [0, 1], 0 for masked) reach `top_p` of the total.
/// `hist` is reused memory. The kept tokens come out in no particular order.
pub(super) fn top_p_dense(
    weights: &[f32],
    logits: &[f32],
    top_p: f32,
    hist: &mut Vec<f64>,
    cands: &mut Vec<Candidate>,
) {
    hist.clear();
    hist.resize(HIST_LANES * NUM_KEYS, 0.0);
    let chunks = weights.chunks_exact(HIST_LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (lane, &w) in c.iter().enumerate() {
            hist[lane * NUM_KEYS + key(w)] += f64::from(w);
        }
    }
    for &w in tail {
        hist[key(w)] += f64::from(w);
    }
    let (mass, other_lanes) = hist.split_at_mut(NUM_KEYS);
    for lane in other_lanes.chunks_exact(NUM_KEYS) {
        for (m, &x) in mass.iter_mut().zip(lane) {
            *m += x;
        }
    }
    let target = f64::from(top_p) * mass.iter().sum::<f64>();
    // Every token of a heavier bucket precedes every token of a lighter one in the best-first
    // order, so the cut falls inside the first bucket where the running mass reaches target.
    let mut above = 0.0f64;
    let mut boundary = None;
    for k in (0..NUM_KEYS).rev() {
        if above + mass[k] >= target {
            boundary = Some(k);
            break;
        }
        above += mass[k];
    }
    cands.clear();
    let Some(boundary) = boundary else {
        // Rounding kept the running mass just short of target: keep every token with mass.
        cands.extend(gather(weights, logits, |w| w > 0.0));
        return;
    };
    cands.extend(gather(weights, logits, |w| w > 0.0 && key(w) >= boundary));
    // Move the boundary bucket to the back; only it needs ordering.
    let mut split = 0;
    for i in 0..cands.len() {
        if key(cands[i].weight) > boundary {
            cands.swap(i, split);
            split += 1;
        }
    }
    cands[split..].sort_unstable_by(by_logit_desc);
    cut_sorted(cands, split, above, target);
}

fn gather<'a>(
    weights: &'a [f32],
    logits: &'a [f32],
    keep: impl Fn(f32) -> bool + 'a,
) -> impl Iterator<Item = Candidate> + 'a {
    weights
        .iter()
        .zip(logits)
        .enumerate()
        .filter(move |(_, (&w, _))| keep(w))
        .map(|(i, (&w, &l))| Candidate {
            id: i as TokenId,
            logit: l,
            weight: w,
        })
}

/// `cands[from..]` is sorted best-first and `mass_before` is the weight of `cands[..from]`:
/// truncates right after the first candidate at which the running mass reaches `target`
/// (keeping everything if it never does).
fn cut_sorted(cands: &mut Vec<Candidate>, from: usize, mass_before: f64, target: f64) {
    let mut acc = mass_before;
    for i in from..cands.len() {
        acc += f64::from(cands[i].weight);
        if acc >= target {
            cands.truncate(i + 1);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::vecmath;

    fn ids(cands: &[Candidate]) -> Vec<TokenId> {
        let mut ids: Vec<TokenId> = cands.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids
    }

    fn top_k_ids(logits: &[f32], k: usize) -> Vec<TokenId> {
        let mut cands = Vec::new();
        top_k(logits, k, &mut Vec::new(), &mut cands);
        ids(&cands)
    }

    #[test]
    fn top_k_breaks_ties_by_lowest_id_and_skips_masked() {
        let logits = [1.0, 3.0, 3.0, 2.0, 3.0];
        assert_eq!(top_k_ids(&logits, 1), vec![1]);
        assert_eq!(top_k_ids(&logits, 2), vec![1, 2]);
        assert_eq!(top_k_ids(&logits, 3), vec![1, 2, 4]);
        assert_eq!(top_k_ids(&logits, 4), vec![1, 2, 3, 4]);
        assert_eq!(top_k_ids(&logits, 9), vec![0, 1, 2, 3, 4]);
        let masked = [f32::NAN, f32::NEG_INFINITY, 0.5, -7.0];
        assert_eq!(top_k_ids(&masked, 1), vec![2]);
        assert_eq!(top_k_ids(&masked, 3), vec![2, 3]);
    }

    /// Reference nucleus: full sort best-first, prefix reaching `top_p` of the total.
    fn reference(weights: &[f32], logits: &[f32], top_p: f32) -> Vec<TokenId> {
        let mut all: Vec<Candidate> = gather(weights, logits, |w| w > 0.0).collect();
        let total: f64 = all.iter().map(|c| f64::from(c.weight)).sum();
        all.sort_by(by_logit_desc);
        let mut acc = 0.0;
        let mut kept = Vec::new();
        for c in all {
            kept.push(c.id);
            acc += f64::from(c.weight);
            if acc >= f64::from(top_p) * total {
                break;
            }
        }
        kept.sort_unstable();
        kept
    }

    fn uniform_logits(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        // A fixed LCG: reproducible, and independent of the code under test.
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn top_p_dense_and_sparse_match_a_full_sort() {
        let mut peaked = uniform_logits(7, 49_152, 3.0);
        for (i, boost) in [(17, 12.0), (4242, 11.0), (999, 10.0)] {
            peaked[i] += boost;
        }
        let mut long_tail = vec![-14.0; 49_152];
        long_tail[777] = 0.0;
        long_tail[12] = f32::NEG_INFINITY;
        let cases = [
            (uniform_logits(1, 49_152, 1.0), 0.9),
            (uniform_logits(2, 49_152, 8.0), 0.95),
            (uniform_logits(3, 49_152, 20.0), 0.9),
            (uniform_logits(4, 1_000, 4.0), 0.5),
            (uniform_logits(5, 1_001, 4.0), 0.01),
            (peaked, 0.9),
            (long_tail, 0.99),
            (vec![0.0; 10], 0.5),
        ];
        for (case, (logits, top_p)) in cases.into_iter().enumerate() {
            let temperature = 0.8;
            let mut weights = Vec::new();
            vecmath::softmax_weights(
                &logits,
                vecmath::max(&logits),
                1.0 / temperature,
                &mut weights,
            );
            let want = reference(&weights, &logits, top_p);
            let mut cands = Vec::new();
            top_p_dense(&weights, &logits, top_p, &mut Vec::new(), &mut cands);
            assert_eq!(ids(&cands), want, "dense, case {case}");
            let mut cands: Vec<Candidate> = gather(&weights, &logits, |w| w > 0.0).collect();
            top_p_sparse(&mut cands, top_p);
            assert_eq!(ids(&cands), want, "sparse, case {case}");
        }
    }

    #[test]
    fn top_p_on_equal_logits_keeps_the_lowest_ids() {
        let logits = [0.0f32; 10];
        let weights = [1.0f32; 10];
        let mut cands = Vec::new();
        top_p_dense(&weights, &logits, 0.5, &mut Vec::new(), &mut cands);
        assert_eq!(ids(&cands), vec![0, 1, 2, 3, 4]);
        top_p_dense(&weights, &logits, 0.05, &mut Vec::new(), &mut cands);
        assert_eq!(ids(&cands), vec![0]);
    }
}
