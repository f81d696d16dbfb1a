//! Picking a worker: weighted scorers and the P/D decision, configured the way llm-d's
//! endpoint picker (EPP) is — a list of plugins by type, and a scheduling profile that weights
//! them — in YAML or JSON:
//!
//! ```yaml
//! plugins:
//!   - type: prefix-cache-scorer          # longest cached prefix, tier-aware
//!     parameters: {gpuWeight: 1.0, cpuWeight: 0.8, diskWeight: 0.5}
//!   - type: queue-scorer                 # waiting requests (scraped) + the router's in-flight
//!   - type: kv-cache-utilization-scorer  # 1 - vllm:kv_cache_usage_perc
//!   - type: prefix-based-pd-decider      # disaggregate when enough prompt is not cached
//!     parameters: {nonCachedTokens: 16}
//! schedulingProfiles:
//!   - name: default
//!     plugins:
//!       - {pluginRef: prefix-cache-scorer, weight: 3}
//!       - {pluginRef: queue-scorer, weight: 1}
//!       - {pluginRef: kv-cache-utilization-scorer, weight: 1}
//! ```
//!
//! A plugin of type `round-robin-picker` in the profile replaces scoring with rotation (the
//! baseline the benchmark compares against). Every score is in [0, 1]; a worker's total is
//! the weighted mean; the highest wins, ties going to the one with fewest requests in flight,
//! then to rotation.
use super::index::TierWeights;
use serde::Deserialize;
use std::collections::HashMap;

/// llm-d's plugin names.
pub const PREFIX: &str = "prefix-cache-scorer";
pub const QUEUE: &str = "queue-scorer";
pub const KV_USAGE: &str = "kv-cache-utilization-scorer";
pub const PD_DECIDER: &str = "prefix-based-pd-decider";
pub const ROUND_ROBIN: &str = "round-robin-picker";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    #[serde(default)]
    scheduling_profiles: Vec<RawProfile>,
}

#[derive(Debug, Deserialize)]
struct RawPlugin {
    #[serde(rename = "type")]
    kind: String,
    /// Defaults to the type.
    name: Option<String>,
    #[serde(default)]
    parameters: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct RawProfile {
    #[serde(default)]
    plugins: Vec<RawRef>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRef {
    plugin_ref: String,
    weight: Option<f64>,
}

/// A scorer of the profile with its weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Weighted {
    /// The plugin type (one of the constants above).
    pub kind: &'static str,
    pub weight: f64,
}

/// The routing configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingConfig {
    pub scorers: Vec<Weighted>,
    pub tier_weights: TierWeights,
    /// Rotate instead of scoring.
    pub round_robin: bool,
    /// Disaggregate a request when more prompt tokens than this are not cached on the
    /// chosen decode worker (llm-d's `nonCachedTokens`).
    pub pd_threshold: usize,
}

impl Default for RoutingConfig {
    /// Prefix 3, queue 1, KV usage 1; P/D threshold 16.
    fn default() -> Self {
        Self {
            scorers: vec![
                Weighted {
                    kind: PREFIX,
                    weight: 3.0,
                },
                Weighted {
                    kind: QUEUE,
                    weight: 1.0,
                },
                Weighted {
                    kind: KV_USAGE,
                    weight: 1.0,
                },
            ],
            tier_weights: TierWeights::default(),
            round_robin: false,
            pd_threshold: 16,
        }
    }
}

impl RoutingConfig {
    /// Parses YAML (JSON is YAML too).
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawConfig =
            serde_yaml_ng::from_str(text).map_err(|e| format!("routing config: {e}"))?;
        let mut by_name: HashMap<String, (&'static str, serde_json::Value)> = HashMap::new();
        for p in raw.plugins {
            let kind = match p.kind.as_str() {
                PREFIX => PREFIX,
                QUEUE => QUEUE,
                KV_USAGE => KV_USAGE,
                PD_DECIDER => PD_DECIDER,
                ROUND_ROBIN => ROUND_ROBIN,
                // llm-d's picker and filter plugins that this router's behaviour already is.
                "max-score-picker"
                | "decode-filter"
                | "prefill-filter"
                | "single-profile-handler"
                | "pd-profile-handler" => continue,
                other => {
                    return Err(format!(
                        "routing config: unknown plugin type {other:?} (known: {PREFIX}, \
                         {QUEUE}, {KV_USAGE}, {PD_DECIDER}, {ROUND_ROBIN})"
                    ))
                }
            };
            by_name.insert(p.name.unwrap_or(p.kind), (kind, p.parameters));
        }
        let mut c = RoutingConfig {
            scorers: Vec::new(),
            ..Default::default()
        };
        for (kind, params) in by_name.values() {
            let num = |key: &str| params.get(key).and_then(serde_json::Value::as_f64);
            match *kind {
                PREFIX => {
                    let d = TierWeights::default();
                    c.tier_weights = TierWeights {
                        gpu: num("gpuWeight").unwrap_or(d.gpu),
                        cpu: num("cpuWeight").unwrap_or(d.cpu),
                        disk: num("diskWeight").unwrap_or(d.disk),
                    };
                }
                PD_DECIDER => {
                    if let Some(t) = num("nonCachedTokens") {
                        if t < 0.0 {
                            return Err("routing config: nonCachedTokens must be ≥ 0".into());
                        }
                        c.pd_threshold = t as usize;
                    }
                }
                _ => {}
            }
        }
        let profile = raw.scheduling_profiles.into_iter().next();
        let refs = match profile {
            Some(p) => p.plugins,
            // No profile: every scorer plugin at weight 1.
            None => by_name
                .keys()
                .map(|n| RawRef {
                    plugin_ref: n.clone(),
                    weight: None,
                })
                .collect(),
        };
        for r in refs {
            let (kind, _) = by_name.get(&r.plugin_ref).ok_or_else(|| {
                format!(
                    "routing config: the profile names {:?}, which no plugin defines",
                    r.plugin_ref
                )
            })?;
            let weight = r.weight.unwrap_or(1.0);
            if !(weight.is_finite() && weight >= 0.0) {
                return Err(format!(
                    "routing config: the weight of {:?} must be a number ≥ 0",
                    r.plugin_ref
                ));
            }
            match *kind {
                ROUND_ROBIN => c.round_robin = true,
                PD_DECIDER => {}
                k => c.scorers.push(Weighted { kind: k, weight }),
            }
        }
        c.scorers.sort_by_key(|w| w.kind);
        Ok(c)
    }
}

/// What the scorers know of one candidate worker.
#[derive(Clone, Copy, Debug, Default)]
pub struct Candidate {
    /// `vllm:num_requests_waiting` as last scraped.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc` (0–1) as last scraped.
    pub kv_usage: f64,
    /// Requests the router has sent it that have not finished.
    pub in_flight: usize,
    /// Its cached prefix of the request, tier-weighted, in blocks.
    pub prefix_weighted: f64,
}

/// Scores of every candidate by every scorer of `config` (`[scorer][candidate]`, each in
/// [0, 1]), for `total_blocks` full blocks in the prompt.
pub fn score(
    config: &RoutingConfig,
    candidates: &[Candidate],
    total_blocks: usize,
) -> Vec<Vec<f64>> {
    config
        .scorers
        .iter()
        .map(|s| match s.kind {
            PREFIX => candidates
                .iter()
                .map(|c| {
                    if total_blocks == 0 {
                        0.0
                    } else {
                        (c.prefix_weighted / total_blocks as f64).clamp(0.0, 1.0)
                    }
                })
                .collect(),
            QUEUE => {
                // llm-d's queue scorer: (max - q) / (max - min), all 1 when equal.
                let q: Vec<f64> = candidates
                    .iter()
                    .map(|c| c.waiting + c.in_flight as f64)
                    .collect();
                let (lo, hi) = q
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                q.iter()
                    .map(|&v| if hi > lo { (hi - v) / (hi - lo) } else { 1.0 })
                    .collect()
            }
            KV_USAGE => candidates
                .iter()
                .map(|c| (1.0 - c.kv_usage).clamp(0.0, 1.0))
                .collect(),
            _ => vec![0.0; candidates.len()],
        })
        .collect()
}

/// The pick among candidates: its index, and the scorer that decided it (the one whose
/// weighted score separates the winner most from the runner-up; `tie` when all totals are
/// equal, `round_robin` when rotating).
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    pub index: usize,
    pub decided_by: &'static str,
}

/// Picks from `candidates` (non-empty) by `config`; `rotation` breaks ties and drives
/// round-robin.
pub fn pick(
    config: &RoutingConfig,
    candidates: &[Candidate],
    total_blocks: usize,
    rotation: usize,
) -> Pick {
    let n = candidates.len();
    if config.round_robin || config.scorers.is_empty() {
        return Pick {
            index: rotation % n,
            decided_by: "round_robin",
        };
    }
    let scores = score(config, candidates, total_blocks);
    let weight_sum: f64 = config
        .scorers
        .iter()
        .map(|s| s.weight)
        .sum::<f64>()
        .max(1e-12);
    let totals: Vec<f64> = (0..n)
        .map(|i| {
            config
                .scorers
                .iter()
                .zip(&scores)
                .map(|(s, v)| s.weight * v[i])
                .sum::<f64>()
                / weight_sum
        })
        .collect();
    // Highest total; then fewest in flight; then the first at or after the rotation point.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        totals[b]
            .partial_cmp(&totals[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(candidates[a].in_flight.cmp(&candidates[b].in_flight))
            .then(((a + n - rotation % n) % n).cmp(&((b + n - rotation % n) % n)))
    });
    let index = order[0];
    let decided_by = match order.get(1) {
        Some(&second) if (totals[index] - totals[second]).abs() > 1e-12 => config
            .scorers
            .iter()
            .zip(&scores)
            .map(|(s, v)| (s.kind, s.weight * (v[index] - v[second])))
            .max_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
            .map_or("tie", |(k, _)| k),
        Some(_) => "tie",
        None => "only_candidate",
    };
    Pick { index, decided_by }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(waiting: f64, kv: f64, in_flight: usize, prefix: f64) -> Candidate {
        Candidate {
            waiting,
            kv_usage: kv,
            in_flight,
            prefix_weighted: prefix,
        }
    }

    #[test]
    fn the_llm_d_style_yaml_config_is_read() {
        let yaml = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: prefix-cache-scorer
    parameters: {cpuWeight: 0.7}
  - type: queue-scorer
  - type: kv-cache-utilization-scorer
  - type: prefix-based-pd-decider
    parameters:
      nonCachedTokens: 64
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: prefix-cache-scorer
        weight: 5
      - pluginRef: queue-scorer
        weight: 2
"#;
        let c = RoutingConfig::parse(yaml).unwrap();
        assert_eq!(
            c.scorers,
            vec![
                Weighted {
                    kind: PREFIX,
                    weight: 5.0
                },
                Weighted {
                    kind: QUEUE,
                    weight: 2.0
                }
            ]
        );
        assert_eq!(c.pd_threshold, 64);
        assert_eq!(c.tier_weights.cpu, 0.7);
        assert!(!c.round_robin);
        let json = r#"{"plugins": [{"type": "round-robin-picker"}]}"#;
        assert!(RoutingConfig::parse(json).unwrap().round_robin);
        let e = RoutingConfig::parse("plugins: [{type: lora-affinity-scorer}]").unwrap_err();
        assert!(e.contains("lora-affinity-scorer"), "{e}");
        let e = RoutingConfig::parse(
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{plugins: [{pluginRef: nope}]}]",
        )
        .unwrap_err();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn the_cached_prefix_wins_unless_the_queue_outweighs_it() {
        let cfg = RoutingConfig::default();
        // Worker 1 holds 8 of 10 blocks; all else equal it wins, decided by the prefix.
        let cands = [
            c(0.0, 0.1, 0, 0.0),
            c(0.0, 0.1, 0, 8.0),
            c(0.0, 0.1, 0, 2.0),
        ];
        let p = pick(&cfg, &cands, 10, 0);
        assert_eq!(
            p,
            Pick {
                index: 1,
                decided_by: PREFIX
            }
        );
        // A long queue there (and KV nearly full) sends the request elsewhere.
        let cands = [
            c(0.0, 0.1, 0, 0.0),
            c(30.0, 0.99, 4, 2.0),
            c(0.0, 0.1, 0, 2.0),
        ];
        let p = pick(&cfg, &cands, 10, 0);
        assert_eq!(p.index, 2, "{p:?}");
        // Nothing cached anywhere, nothing queued: rotation among equals.
        let idle = [c(0.0, 0.0, 0, 0.0); 3];
        let picks: Vec<usize> = (0..3).map(|r| pick(&cfg, &idle, 10, r).index).collect();
        assert_eq!(picks, [0, 1, 2]);
        assert_eq!(pick(&cfg, &idle, 10, 0).decided_by, "tie");
        // In-flight requests count as queue.
        let busy = [c(0.0, 0.0, 3, 0.0), c(0.0, 0.0, 1, 0.0)];
        assert_eq!(pick(&cfg, &busy, 0, 0).index, 1);
    }

    #[test]
    fn round_robin_ignores_the_scores() {
        let cfg = RoutingConfig {
            round_robin: true,
            ..Default::default()
        };
        let cands = [c(0.0, 0.0, 0, 10.0), c(9.0, 0.9, 9, 0.0)];
        assert_eq!(pick(&cfg, &cands, 10, 1).index, 1);
        assert_eq!(pick(&cfg, &cands, 10, 2).index, 0);
    }
}
