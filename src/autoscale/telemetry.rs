//! What a policy sees each interval: the shared input of the live loop and the simulator.
//!
//! The live loop fills it from scraped Prometheus text (rates are deltas of counters between two
//! scrapes divided by the interval); the simulator fills it from its model of the fleet. Policies
//! and the capacity model read only this, so a policy decides the same way in both.
use serde::{Deserialize, Serialize};

/// A histogram over one interval: cumulative bucket counts at each upper bound (Prometheus `le`),
/// as the delta between two scrapes, plus the interval's count and sum.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// `(le, cumulative count)`, ascending by `le`; the last bound may be `f64::INFINITY`.
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
    pub sum: f64,
}

impl Histogram {
    /// The `q` quantile (0..=1) by linear interpolation inside its bucket, as PromQL's
    /// `histogram_quantile` does; `None` with no observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map(|b| b.1).unwrap_or(0.0);
        if total <= 0.0 || self.buckets.is_empty() {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let (mut lo, mut below) = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= rank {
                if le.is_infinite() {
                    return Some(lo);
                }
                let inside = cum - below;
                let frac = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lo + (le - lo) * frac);
            }
            (lo, below) = (le, cum);
        }
        Some(lo)
    }
}

/// One variant's fleet over the last interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VariantTelemetry {
    /// The variant's name, as in the autoscaler's config.
    pub variant: String,
    /// Replicas serving (ready) now, and replicas asked for but still starting.
    pub ready_replicas: u32,
    pub starting_replicas: u32,
    /// Sums over the ready replicas of `vllm:num_requests_waiting` / `vllm:num_requests_running`.
    pub waiting: f64,
    pub running: f64,
    /// Mean over the ready replicas of `vllm:kv_cache_usage_perc` (0..=1).
    pub kv_usage: f64,
    /// KV capacity of one replica in tokens (`llmd:kv_total_blocks` × block size), 0 if unknown.
    pub kv_capacity_tokens: f64,
    /// Fleet-wide rates of `vllm:prompt_tokens_total` and `vllm:generation_tokens_total` (tokens/s).
    pub prompt_tokens_per_s: f64,
    pub generation_tokens_per_s: f64,
    /// Rate of `llmd:engine_steps_total` summed over replicas (steps/s), 0 if unknown.
    pub steps_per_s: f64,
    /// TTFT and ITL over the interval (`vllm:time_to_first_token_seconds`,
    /// `vllm:inter_token_latency_seconds`), all replicas merged.
    pub ttft: Histogram,
    pub itl: Histogram,
    /// Per ready replica, the highest KV usage and waiting count over the interval (WVA reads
    /// `max_over_time(...[1m])` per pod); empty when unknown.
    #[serde(default)]
    pub replicas: Vec<ReplicaTelemetry>,
}

/// One ready replica's peak load over the interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaTelemetry {
    /// Highest `vllm:kv_cache_usage_perc` (0..=1).
    pub kv_usage: f64,
    /// Highest `vllm:num_requests_waiting`.
    pub waiting: f64,
}

/// One priority band's demand over the last interval, seen at the router.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BandTelemetry {
    /// The band's priority (`InferenceObjective` priority; < 0 is sheddable).
    pub priority: i32,
    /// Requests arriving per second, and their mean prompt and output lengths in tokens.
    pub arrivals_per_s: f64,
    pub mean_prompt_tokens: f64,
    pub mean_output_tokens: f64,
    /// Requests of this band waiting in the router's flow-control queue now.
    pub queued: f64,
    /// Requests of this band shed over the interval (full band, TTL, no endpoints).
    pub shed: f64,
    /// TTFT seen by this band's requests over the interval, when the router measures it.
    pub ttft: Histogram,
    /// Inter-token latency of this band's streamed answers over the interval, when the router
    /// measures it.
    #[serde(default)]
    pub itl: Histogram,
}

/// Everything a policy sees at one decision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// Seconds since the loop (or the replay) started.
    pub at_s: f64,
    /// Length of the interval the rates and histograms cover.
    pub interval_s: f64,
    pub variants: Vec<VariantTelemetry>,
    pub bands: Vec<BandTelemetry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_a_bucket_as_promql_does() {
        // 10 observations ≤ 0.1, 10 more in (0.1, 0.5], none above.
        let h = Histogram {
            buckets: vec![(0.1, 10.0), (0.5, 20.0), (f64::INFINITY, 20.0)],
            count: 20.0,
            sum: 4.0,
        };
        assert_eq!(h.quantile(0.5), Some(0.1));
        // rank 15 is halfway through the second bucket.
        assert!((h.quantile(0.75).unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(Histogram::default().quantile(0.9), None);
        // Past the last finite bound, the answer is that bound.
        let tail = Histogram {
            buckets: vec![(1.0, 1.0), (f64::INFINITY, 4.0)],
            count: 4.0,
            sum: 9.0,
        };
        assert_eq!(tail.quantile(0.99), Some(1.0));
    }
}
