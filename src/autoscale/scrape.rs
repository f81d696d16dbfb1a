//! The live loop's eyes: the router's and every worker's `/metrics` (Prometheus text), scraped
//! each interval, and two successive scrapes turned into the [`Telemetry`] a policy sees.
//!
//! Counters become rates over the interval (a worker that was not there at the first scrape
//! counts from zero; a counter that went down was reset and counts from zero too); histograms
//! become the interval's bucket deltas, all workers of a variant merged; gauges are read at the
//! second scrape (queues summed over a variant's workers, KV usage averaged; per replica, the
//! higher of the two scrapes' KV usage and queue, WVA's peak over the interval).
//!
//! What is read, from each worker: `vllm:num_requests_waiting`, `vllm:num_requests_running`,
//! `vllm:kv_cache_usage_perc`, `llmd:kv_total_blocks` × `vllm:cache_config_info{block_size}`,
//! `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, `llmd:engine_steps_total`,
//! `vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`; from the router, per
//! `priority`: `inference_objective_request_total`, `inference_objective_input_tokens`,
//! `inference_objective_output_tokens`, `llmd_router:band_ttft_seconds`,
//! `llmd_router:band_itl_seconds`, `inference_extension_flow_control_queue_size` and `llmd_router:flow_control_requests_total`
//! (every outcome but `dispatched` and `cancelled` is a request shed).
use super::telemetry::{BandTelemetry, Histogram, ReplicaTelemetry, Telemetry, VariantTelemetry};
use crate::prometheus::Sample;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// One worker's samples.
#[derive(Clone, Debug, Default)]
pub struct WorkerScrape {
    pub url: String,
    pub samples: Vec<Sample>,
}

/// One variant at a scrape: its replicas as the scale target reports them, and the samples of
/// the ready ones that answered.
#[derive(Clone, Debug, Default)]
pub struct VariantScrape {
    pub name: String,
    pub ready: u32,
    pub starting: u32,
    pub workers: Vec<WorkerScrape>,
}

/// Everything read at one moment.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    /// Seconds since the loop started.
    pub at_s: f64,
    pub router: Vec<Sample>,
    pub variants: Vec<VariantScrape>,
}

/// Limit on one scrape.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest `/metrics` answer read.
const MAX_METRICS: usize = 16 << 20;

/// `GET base/metrics`, parsed.
pub async fn fetch(client: &reqwest::Client, base: &str) -> Result<Vec<Sample>, String> {
    let url = format!("{}/metrics", base.trim_end_matches('/'));
    let r = client
        .get(&url)
        .timeout(SCRAPE_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("{url}: {}", r.status()));
    }
    let body = r.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    if body.len() > MAX_METRICS {
        return Err(format!("{url}: over {MAX_METRICS} bytes"));
    }
    crate::prometheus::parse(&String::from_utf8_lossy(&body)).map_err(|e| format!("{url}: {e}"))
}

/// The workers the router lists on its `/metrics` (`llmd_router:worker_up{worker,role}`), with
/// their roles.
pub fn router_workers(router: &[Sample]) -> Vec<(String, String)> {
    router
        .iter()
        .filter(|s| s.name == "llmd_router:worker_up")
        .filter_map(|s| {
            Some((
                s.label("worker")?.to_string(),
                s.label("role").unwrap_or("prefill-decode").to_string(),
            ))
        })
        .collect()
}

/// The sum of `name`'s samples that `keep` keeps.
fn total(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> Option<f64> {
    let mut found = None;
    for s in samples.iter().filter(|s| s.name == name && keep(s)) {
        *found.get_or_insert(0.0) += s.value;
    }
    found
}

/// The histogram `base` (its `_bucket`, `_sum`, `_count`) as it stands, series `keep` keeps
/// summed by bound.
fn histogram(samples: &[Sample], base: &str, keep: impl Fn(&Sample) -> bool) -> Histogram {
    let bucket = format!("{base}_bucket");
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == bucket && keep(s)) {
        let le = match s.label("le") {
            Some("+Inf") => f64::INFINITY,
            Some(v) => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
            None => continue,
        };
        // Ordered by the bound's bits: non-negative floats order as their bits do.
        by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
    }
    Histogram {
        buckets: by_le.into_values().collect(),
        count: total(samples, &format!("{base}_count"), &keep).unwrap_or(0.0),
        sum: total(samples, &format!("{base}_sum"), &keep).unwrap_or(0.0),
    }
}

/// A counter's growth from `before` (None: it was not there) to `now`; a reset counts from 0.
fn growth(before: Option<f64>, now: f64) -> f64 {
    match before {
        Some(b) if now >= b => now - b,
        _ => now,
    }
}

/// `now - before`, bound by bound (a bound `before` lacks, or a reset, counts from 0).
fn histogram_growth(before: Option<&Histogram>, now: &Histogram) -> Histogram {
    let Some(b) = before else {
        return now.clone();
    };
    if now.count < b.count {
        return now.clone();
    }
    let at = |le: f64| b.buckets.iter().find(|x| x.0 == le).map(|x| x.1);
    Histogram {
        buckets: now
            .buckets
            .iter()
            .map(|&(le, c)| (le, growth(at(le), c)))
            .collect(),
        count: now.count - b.count,
        sum: (now.sum - b.sum).max(0.0),
    }
}

/// Adds `h` into `into`, bound by bound.
fn merge(into: &mut Histogram, h: &Histogram) {
    for &(le, c) in &h.buckets {
        match into.buckets.iter_mut().find(|x| x.0 == le) {
            Some(x) => x.1 += c,
            None => into.buckets.push((le, c)),
        }
    }
    into.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    into.count += h.count;
    into.sum += h.sum;
}

fn all(_: &Sample) -> bool {
    true
}

fn variant(before: Option<&VariantScrape>, now: &VariantScrape, secs: f64) -> VariantTelemetry {
    let mut v = VariantTelemetry {
        variant: now.name.clone(),
        ready_replicas: now.ready,
        starting_replicas: now.starting,
        ..Default::default()
    };
    let mut kv_usage = Vec::new();
    let mut kv_tokens = Vec::new();
    for w in &now.workers {
        let s = &w.samples;
        let prev = before.and_then(|b| b.workers.iter().find(|p| p.url == w.url));
        let prev_total = |name: &str| prev.and_then(|p| total(&p.samples, name, all));
        let rate =
            |name: &str| total(s, name, all).map_or(0.0, |n| growth(prev_total(name), n)) / secs;
        let waiting = total(s, "vllm:num_requests_waiting", all).unwrap_or(0.0);
        let kv = total(s, "vllm:kv_cache_usage_perc", all).unwrap_or(0.0);
        // The replica's peak of the interval as far as two looks tell: the higher of both.
        let was = |name: &str| {
            prev.and_then(|p| total(&p.samples, name, all))
                .unwrap_or(0.0)
        };
        v.replicas.push(ReplicaTelemetry {
            kv_usage: kv.max(was("vllm:kv_cache_usage_perc")),
            waiting: waiting.max(was("vllm:num_requests_waiting")),
        });
        v.waiting += waiting;
        v.running += total(s, "vllm:num_requests_running", all).unwrap_or(0.0);
        if let Some(u) = total(s, "vllm:kv_cache_usage_perc", all) {
            kv_usage.push(u);
        }
        let block_size = s
            .iter()
            .find(|x| x.name == "vllm:cache_config_info")
            .and_then(|x| x.label("block_size")?.parse::<f64>().ok());
        if let (Some(blocks), Some(bs)) = (total(s, "llmd:kv_total_blocks", all), block_size) {
            kv_tokens.push(blocks * bs);
        }
        v.prompt_tokens_per_s += rate("vllm:prompt_tokens_total");
        v.generation_tokens_per_s += rate("vllm:generation_tokens_total");
        v.steps_per_s += rate("llmd:engine_steps_total");
        for (base, into) in [
            ("vllm:time_to_first_token_seconds", &mut v.ttft),
            ("vllm:inter_token_latency_seconds", &mut v.itl),
        ] {
            let was = prev.map(|p| histogram(&p.samples, base, all));
            merge(
                into,
                &histogram_growth(was.as_ref(), &histogram(s, base, all)),
            );
        }
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    v.kv_usage = mean(&kv_usage);
    v.kv_capacity_tokens = mean(&kv_tokens);
    v
}

/// Outcomes of `llmd_router:flow_control_requests_total` that are not a request shed.
const NOT_SHED: [&str; 2] = ["dispatched", "cancelled"];

fn bands(before: &[Sample], now: &[Sample], secs: f64) -> Vec<BandTelemetry> {
    let priorities: BTreeSet<i32> = now
        .iter()
        .filter(|s| {
            s.name.starts_with("inference_objective_")
                || s.name
                    .starts_with("inference_extension_flow_control_queue_size")
                || s.name == "llmd_router:flow_control_requests_total"
                || s.name.starts_with("llmd_router:band_")
        })
        .filter_map(|s| s.label("priority")?.parse().ok())
        .collect();
    let mut out = Vec::new();
    for p in priorities {
        let ps = p.to_string();
        let band = |s: &Sample| s.label("priority") == Some(ps.as_str());
        let grown = |name: &str| {
            total(now, name, band).map_or(0.0, |n| growth(total(before, name, band), n))
        };
        let mean = |base: &str| {
            let n = grown(&format!("{base}_count"));
            if n > 0.0 {
                grown(&format!("{base}_sum")) / n
            } else {
                0.0
            }
        };
        let shed_of =
            |s: &Sample| band(s) && !s.label("outcome").is_some_and(|o| NOT_SHED.contains(&o));
        let shed =
            total(now, "llmd_router:flow_control_requests_total", shed_of).map_or(0.0, |n| {
                growth(
                    total(before, "llmd_router:flow_control_requests_total", shed_of),
                    n,
                )
            });
        let grown_histogram = |base: &str| {
            let was = histogram(before, base, band);
            histogram_growth(
                Some(&was).filter(|h| !h.buckets.is_empty()),
                &histogram(now, base, band),
            )
        };
        out.push(BandTelemetry {
            priority: p,
            arrivals_per_s: grown("inference_objective_request_total") / secs,
            mean_prompt_tokens: mean("inference_objective_input_tokens"),
            mean_output_tokens: mean("inference_objective_output_tokens"),
            queued: total(now, "inference_extension_flow_control_queue_size", band).unwrap_or(0.0),
            shed,
            ttft: grown_histogram("llmd_router:band_ttft_seconds"),
            itl: grown_histogram("llmd_router:band_itl_seconds"),
        });
    }
    out
}

/// The telemetry of the interval between two scrapes.
pub fn telemetry(before: &Scrape, now: &Scrape) -> Telemetry {
    // Never a zero or negative interval (rates stay finite).
    let secs = (now.at_s - before.at_s).max(1e-3);
    Telemetry {
        at_s: now.at_s,
        interval_s: secs,
        variants: now
            .variants
            .iter()
            .map(|v| {
                let was = before.variants.iter().find(|b| b.name == v.name);
                variant(was, v, secs)
            })
            .collect(),
        bands: bands(&before.router, &now.router, secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prometheus::parse;

    /// A worker's /metrics as llmd serve writes it (trimmed to what is read, values made up).
    fn worker(
        waiting: u32,
        running: u32,
        prompt: u64,
        gen: u64,
        steps: u64,
        ttft: [u64; 3],
    ) -> Vec<Sample> {
        let [a, b, c] = ttft;
        parse(&format!(
            "# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name=\"stories260K\",engine=\"0\"}} {running}
vllm:num_requests_waiting{{model_name=\"stories260K\",engine=\"0\"}} {waiting}
vllm:kv_cache_usage_perc{{model_name=\"stories260K\",engine=\"0\"}} 0.{running}
vllm:cache_config_info{{block_size=\"16\",num_gpu_blocks=\"64\",enable_prefix_caching=\"True\",prefix_caching_hash_algo=\"sha256_cbor\",cache_dtype=\"auto\"}} 1
llmd:kv_total_blocks{{model_name=\"stories260K\",engine=\"0\"}} 64
vllm:prompt_tokens_total{{model_name=\"stories260K\",engine=\"0\"}} {prompt}
vllm:generation_tokens_total{{model_name=\"stories260K\",engine=\"0\"}} {gen}
llmd:engine_steps_total{{model_name=\"stories260K\",engine=\"0\"}} {steps}
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{model_name=\"stories260K\",engine=\"0\",le=\"0.1\"}} {a}
vllm:time_to_first_token_seconds_bucket{{model_name=\"stories260K\",engine=\"0\",le=\"0.5\"}} {}
vllm:time_to_first_token_seconds_bucket{{model_name=\"stories260K\",engine=\"0\",le=\"+Inf\"}} {}
vllm:time_to_first_token_seconds_sum{{model_name=\"stories260K\",engine=\"0\"}} 1.5
vllm:time_to_first_token_seconds_count{{model_name=\"stories260K\",engine=\"0\"}} {}
",
            a + b,
            a + b + c,
            a + b + c
        ))
        .unwrap()
    }

    fn router(
        requests: u64,
        prompt_sum: u64,
        out_sum: u64,
        answered: u64,
        queued: u32,
        shed: u64,
    ) -> Vec<Sample> {
        parse(&format!(
            "llmd_router:worker_up{{worker=\"http://127.0.0.1:9001\",role=\"prefill-decode\"}} 1
inference_extension_flow_control_queue_size{{priority=\"0\"}} {queued}
inference_extension_flow_control_queue_size{{priority=\"-1\"}} 0
llmd_router:flow_control_requests_total{{priority=\"0\",outcome=\"dispatched\"}} {answered}
llmd_router:flow_control_requests_total{{priority=\"0\",outcome=\"evicted_ttl\"}} {shed}
llmd_router:flow_control_requests_total{{priority=\"0\",outcome=\"cancelled\"}} 5
inference_objective_request_total{{priority=\"0\"}} {requests}
inference_objective_input_tokens_sum{{priority=\"0\"}} {prompt_sum}
inference_objective_input_tokens_count{{priority=\"0\"}} {requests}
inference_objective_output_tokens_sum{{priority=\"0\"}} {out_sum}
inference_objective_output_tokens_count{{priority=\"0\"}} {answered}
llmd_router:band_ttft_seconds_bucket{{priority=\"0\",le=\"0.1\"}} {answered}
llmd_router:band_ttft_seconds_bucket{{priority=\"0\",le=\"+Inf\"}} {answered}
llmd_router:band_ttft_seconds_sum{{priority=\"0\"}} 0.5
llmd_router:band_ttft_seconds_count{{priority=\"0\"}} {answered}
llmd_router:band_itl_seconds_bucket{{priority=\"0\",le=\"0.05\"}} {out_sum}
llmd_router:band_itl_seconds_bucket{{priority=\"0\",le=\"+Inf\"}} {out_sum}
llmd_router:band_itl_seconds_sum{{priority=\"0\"}} 1.0
llmd_router:band_itl_seconds_count{{priority=\"0\"}} {out_sum}
"
        ))
        .unwrap()
    }

    #[test]
    fn two_scrapes_make_rates_histogram_deltas_and_gauges() {
        let w = |url: &str, samples| WorkerScrape {
            url: url.into(),
            samples,
        };
        let before = Scrape {
            at_s: 10.0,
            router: router(100, 1000, 400, 90, 0, 2),
            variants: vec![VariantScrape {
                name: "cpu".into(),
                ready: 1,
                starting: 1,
                workers: vec![w("http://a", worker(0, 1, 1000, 500, 200, [5, 0, 0]))],
            }],
        };
        let now = Scrape {
            at_s: 12.0,
            router: router(140, 1800, 1000, 120, 3, 4),
            variants: vec![VariantScrape {
                name: "cpu".into(),
                ready: 2,
                starting: 0,
                workers: vec![
                    // +400 prompt tokens, +100 generated, +50 steps; TTFT +5 ≤ 0.1, +4 ≤ 0.5.
                    w("http://a", worker(2, 3, 1400, 600, 250, [10, 4, 0])),
                    // New since the first scrape: counts from zero.
                    w("http://b", worker(1, 1, 200, 100, 50, [1, 0, 1])),
                ],
            }],
        };
        let t = telemetry(&before, &now);
        assert_eq!((t.at_s, t.interval_s), (12.0, 2.0));
        let v = &t.variants[0];
        assert_eq!((v.ready_replicas, v.starting_replicas), (2, 0));
        assert_eq!((v.waiting, v.running), (3.0, 4.0));
        assert!((v.kv_usage - 0.2).abs() < 1e-12, "mean of 0.3 and 0.1");
        assert_eq!(v.kv_capacity_tokens, 64.0 * 16.0);
        // Per replica: the higher of both looks (a: 0.1 then 0.3 KV, 0 then 2 waiting).
        let peaks: Vec<(f64, f64)> = v.replicas.iter().map(|r| (r.kv_usage, r.waiting)).collect();
        assert_eq!(peaks, [(0.3, 2.0), (0.1, 1.0)]);
        assert_eq!(v.prompt_tokens_per_s, (400.0 + 200.0) / 2.0);
        assert_eq!(v.generation_tokens_per_s, (100.0 + 100.0) / 2.0);
        assert_eq!(v.steps_per_s, (50.0 + 50.0) / 2.0);
        assert_eq!(
            v.ttft.buckets,
            vec![(0.1, 6.0), (0.5, 10.0), (f64::INFINITY, 11.0)]
        );
        assert_eq!(v.ttft.count, 11.0);
        let b: Vec<i32> = t.bands.iter().map(|b| b.priority).collect();
        assert_eq!(b, [-1, 0]);
        let b = &t.bands[1];
        assert_eq!(b.arrivals_per_s, 20.0);
        assert_eq!(b.mean_prompt_tokens, 20.0);
        assert_eq!(b.mean_output_tokens, 20.0);
        assert_eq!((b.queued, b.shed), (3.0, 2.0));
        assert_eq!(b.ttft.count, 30.0);
        assert_eq!(b.ttft.quantile(0.95), Some(0.095));
        // 600 gaps in the interval, all ≤ 50 ms.
        assert_eq!(b.itl.count, 600.0);
        assert_eq!(b.itl.quantile(0.95), Some(0.0475));
        // A sheddable band with only a queue gauge: no demand seen.
        assert_eq!(t.bands[0].arrivals_per_s, 0.0);
        assert_eq!(
            router_workers(&now.router),
            [(
                "http://127.0.0.1:9001".to_string(),
                "prefill-decode".to_string()
            )]
        );
    }

    #[test]
    fn a_reset_counter_counts_from_zero_and_no_interval_is_zero() {
        assert_eq!(growth(Some(100.0), 30.0), 30.0);
        assert_eq!(growth(None, 30.0), 30.0);
        assert_eq!(growth(Some(10.0), 30.0), 20.0);
        let s = Scrape::default();
        let t = telemetry(&s, &s);
        assert!(t.interval_s > 0.0 && t.variants.is_empty() && t.bands.is_empty());
    }
}
