//! Prometheus metrics under vLLM's names, so llm-d's endpoint picker and vLLM dashboards read
//! llmd unchanged, plus a few `llmd:` extras (KV pool block counts).
//!
//! Gauges and engine counters are read from [`EngineStats`] at scrape time; per-request
//! histograms are recorded here by a [`RequestTracker`], one per engine request, which records
//! exactly once: when the request finishes, or when it is dropped unfinished (client gone,
//! counted as `abort`). The text format is written by hand: it is small and fixed.
use crate::engine::{EngineLimits, EngineStats};
use crate::{FinishReason, RequestOutput};
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// vLLM's buckets, so dashboards built for vLLM bin our values the same way.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
pub const TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Buckets of a KV pull's duration (seconds): loopback pulls take milliseconds, a slow
/// network or a huge prompt seconds.
pub const TRANSFER_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A cumulative Prometheus histogram.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// `[bounds.len()]`: observations `<= bounds[i]` (not yet cumulative).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(out, name, labels);
    }

    /// The samples of one label set, without the HELP and TYPE lines (for a family of several).
    pub fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {:?}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Request-level observations.
struct Recorded {
    ttft: Histogram,
    itl: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    prompt_tokens: Histogram,
    generation_tokens: Histogram,
    /// Finished requests by reason: stop, length, abort.
    success: [u64; 3],
}

pub struct Metrics {
    /// Label set for every series: `model_name="...",engine="0"`.
    labels: String,
    /// `vllm:cache_config_info`'s labels: the KV cache's fixed configuration.
    cache_info: String,
    /// Start time (Unix seconds), the value of `vllm:lora_requests_info` as in vLLM.
    started: f64,
    recorded: Mutex<Recorded>,
}

/// 1, 2, 5, 10, 20, 50, ... up to `max` (vLLM's `build_1_2_5_buckets`).
fn buckets_1_2_5(max: usize) -> &'static [f64] {
    let mut v = Vec::new();
    let mut exp = 1.0;
    'outer: loop {
        for m in [1.0, 2.0, 5.0] {
            let b = m * exp;
            if b > max as f64 {
                break 'outer;
            }
            v.push(b);
        }
        exp *= 10.0;
    }
    // Leaked once per process: the bucket layout is fixed for the server's life.
    Box::leak(v.into_boxed_slice())
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn new(model_name: &str, limits: &EngineLimits) -> Self {
        let tokens = buckets_1_2_5(limits.max_model_len);
        let python_bool = |b: bool| if b { "True" } else { "False" };
        Self {
            labels: format!("model_name=\"{}\",engine=\"0\"", escape_label(model_name)),
            cache_info: format!(
                "block_size=\"{}\",num_gpu_blocks=\"{}\",enable_prefix_caching=\"{}\",prefix_caching_hash_algo=\"{}\",cache_dtype=\"auto\"",
                limits.block_size,
                limits.num_blocks,
                python_bool(limits.enable_prefix_caching),
                limits.block_hash_algo,
            ),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            recorded: Mutex::new(Recorded {
                ttft: Histogram::new(TTFT_BUCKETS),
                itl: Histogram::new(TPOT_BUCKETS),
                tpot: Histogram::new(TPOT_BUCKETS),
                e2e: Histogram::new(LATENCY_BUCKETS),
                prompt_tokens: Histogram::new(tokens),
                generation_tokens: Histogram::new(tokens),
                success: [0; 3],
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Recorded) -> R) -> Option<R> {
        self.recorded.lock().ok().map(|mut g| f(&mut g))
    }

    /// The label set every series carries (`model_name="…"`).
    pub fn labels(&self) -> &str {
        &self.labels
    }

    /// The exposition text: gauges and counters from `stats`, then the histograms.
    pub fn render(&self, stats: &EngineStats) -> String {
        let l = &self.labels;
        let mut out = String::new();
        // What llm-d's endpoint picker reads besides the load gauges: the cache layout (block
        // size, for prefix-aware routing) and the LoRA adapters (none here).
        let _ = writeln!(
            out,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{{{}}} 1.0",
            self.cache_info
        );
        let _ = writeln!(
            out,
            "# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\nvllm:lora_requests_info{{max_lora=\"0\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}} {:?}",
            self.started
        );
        let mut scalar = |name: &str, kind: &str, help: &str, value: String| {
            write_scalar(&mut out, name, kind, help, l, value);
        };
        let c = &stats.counters;
        scalar(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            stats.num_running.to_string(),
        );
        scalar(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            stats.num_waiting.to_string(),
        );
        scalar(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            format!("{:?}", stats.kv_usage),
        );
        scalar(
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage. DEPRECATED: use vllm:kv_cache_usage_perc.",
            format!("{:?}", stats.kv_usage),
        );
        scalar(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache.queries.to_string(),
        );
        scalar(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache.hits.to_string(),
        );
        scalar(
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemptions from the engine.",
            stats.num_preemptions.to_string(),
        );
        scalar(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            c.prompt_tokens.to_string(),
        );
        scalar(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            c.generation_tokens.to_string(),
        );
        scalar(
            "llmd:kv_free_blocks",
            "gauge",
            "Free KV-cache blocks (evictable cached blocks included).",
            stats.num_free_blocks.to_string(),
        );
        scalar(
            "llmd:kv_total_blocks",
            "gauge",
            "KV-cache blocks in the pool.",
            stats.num_total_blocks.to_string(),
        );
        scalar(
            "llmd:prompt_tokens_computed_total",
            "counter",
            "Prompt tokens actually computed (prefix-cache hits excluded, recomputation included).",
            c.prompt_tokens_computed.to_string(),
        );
        scalar(
            "llmd:engine_steps_total",
            "counter",
            "Engine steps run.",
            c.steps.to_string(),
        );
        scalar(
            "llmd:engine_failed_steps_total",
            "counter",
            "Engine steps whose model call failed (their requests were aborted with an error).",
            c.failed_steps.to_string(),
        );
        scalar(
            "llmd:num_requests_waiting_for_kv",
            "gauge",
            "Requests waiting for their prefix to load from a KV tier below the device.",
            stats.num_waiting_for_kv.to_string(),
        );
        if let Some(t) = &stats.tiers {
            render_tiers(&mut out, l, t);
        }
        let Some(r) = self.with(|r| {
            let mut text = String::new();
            let _ = writeln!(
                text,
                "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter"
            );
            for (reason, n) in ["stop", "length", "abort"].iter().zip(r.success) {
                let _ = writeln!(
                    text,
                    "vllm:request_success_total{{{l},finished_reason=\"{reason}\"}} {n}"
                );
            }
            r.ttft.render(&mut text, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", l);
            r.itl.render(&mut text, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", l);
            r.tpot.render(&mut text, "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds (per request: decode time over output tokens after the first).", l);
            r.e2e.render(&mut text, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", l);
            r.prompt_tokens.render(&mut text, "vllm:request_prompt_tokens", "Number of prefill tokens processed.", l);
            r.generation_tokens.render(&mut text, "vllm:request_generation_tokens", "Number of generation tokens processed.", l);
            text
        }) else {
            return out;
        };
        out.push_str(&r);
        out
    }
}

/// One gauge or counter with its HELP and TYPE lines, labelled `labels`.
pub fn write_scalar(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    labels: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}"
    );
}

/// The KV tiers' metrics: one series per tier where it applies.
pub fn render_tiers(out: &mut String, l: &str, t: &crate::kv::connector::TierStats) {
    use crate::kv::tiers::Tier;
    let per_tier =
        |out: &mut String, name: &str, kind: &str, help: &str, v: &dyn Fn(usize) -> String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for tier in Tier::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{{l},tier=\"{}\"}} {}",
                    tier.as_str(),
                    v(tier.index())
                );
            }
        };
    per_tier(
        out,
        "llmd:kv_tier_blocks",
        "gauge",
        "KV blocks held by each tier below the device (remote: blocks this worker stored).",
        &|i| t.blocks[i].to_string(),
    );
    per_tier(
        out,
        "llmd:kv_tier_capacity_blocks",
        "gauge",
        "KV blocks each tier holds at most (0: off, or managed by the server).",
        &|i| t.capacity[i].to_string(),
    );
    per_tier(
        out,
        "llmd:kv_tier_offload_bytes_total",
        "counter",
        "Bytes of KV block records written into each tier.",
        &|i| t.stored_bytes[i].to_string(),
    );
    per_tier(
        out,
        "llmd:kv_tier_load_bytes_total",
        "counter",
        "Bytes of KV block records read from each tier for loads.",
        &|i| t.loaded_bytes[i].to_string(),
    );
    per_tier(
        out,
        "llmd:kv_tier_loaded_blocks_total",
        "counter",
        "KV blocks read from each tier: loaded instead of recomputed, or sent to a peer.",
        &|i| t.loaded_blocks[i].to_string(),
    );
    per_tier(out, "llmd:kv_tier_errors_total", "counter", "Failed tier reads and writes (I/O errors, remote server down); each costs a recompute at most.", &|i| t.errors[i].to_string());
    let secs = |ns: f64| ns / 1e9;
    per_tier(
        out,
        "llmd:kv_tier_load_cost_seconds_per_block",
        "gauge",
        "Measured cost of loading one KV block from each tier (0: tier off).",
        &|i| format!("{:?}", secs(t.costs.load_ns[i])),
    );
    per_tier(out, "llmd:kv_tier_load_chosen", "gauge", "1 when loading from the tier is measured cheaper than recomputing (the engine loads), else 0.", &|i| {
        u8::from(t.costs.load_wins(Tier::ALL[i])).to_string()
    });
    let scalar = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
        write_scalar(out, name, kind, help, l, v);
    };
    scalar(
        out,
        "llmd:kv_recompute_cost_seconds_per_block",
        "gauge",
        "Measured cost of recomputing one KV block's tokens (prefill).",
        format!("{:?}", secs(t.costs.recompute_ns)),
    );
    scalar(
        out,
        "llmd:kv_tier_load_hit_tokens_total",
        "counter",
        "Prompt tokens whose KV was loaded from a tier instead of recomputed.",
        t.load_hit_tokens.to_string(),
    );
    scalar(
        out,
        "llmd:kv_tier_peer_read_blocks_total",
        "counter",
        "KV blocks read from the host and disk tiers for peers' pulls (not through the device).",
        t.peer_read_blocks.to_string(),
    );
    scalar(
        out,
        "llmd:kv_tier_loads_total",
        "counter",
        "Loads from the tiers (one per request prefix).",
        t.loads.to_string(),
    );
    scalar(
        out,
        "llmd:kv_tier_load_seconds_total",
        "counter",
        "Time the tier thread spent reading and verifying loads.",
        format!("{:?}", t.load_seconds),
    );
    scalar(
        out,
        "llmd:kv_tier_checksum_failures_total",
        "counter",
        "KV block records refused by their check (corrupt, truncated, foreign, bad MAC) and recomputed.",
        t.checksum_failures.to_string(),
    );
    scalar(
        out,
        "llmd:kv_tier_auth_failures_total",
        "counter",
        "Remote-tier values whose MAC under the cluster secret did not verify (planted by a writer without the secret), refused and recomputed.",
        t.auth_failures.to_string(),
    );
    scalar(
        out,
        "llmd:kv_tier_dropped_blocks_total",
        "counter",
        "Newly committed KV blocks not stored in the tiers because the tier queue was full.",
        t.dropped_blocks.to_string(),
    );
    scalar(
        out,
        "llmd:kv_tier_skipped_loads_total",
        "counter",
        "Loads from the tiers not started because the tier queue was full (recomputed instead).",
        t.skipped_loads.to_string(),
    );
    scalar(
        out,
        "llmd:kv_tier_queued_blocks",
        "gauge",
        "KV blocks waiting for the tier thread now (bounded by --kv-tier-queue-blocks).",
        t.queued_blocks.to_string(),
    );
}

/// Times one engine request and records it into [`Metrics`] once, with one log line.
pub struct RequestTracker {
    metrics: Arc<Metrics>,
    id: String,
    arrival: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    prompt_tokens: usize,
    output_tokens: usize,
    /// Gaps between consecutive tokens, recorded at finish (batched into one lock).
    gaps: Vec<f64>,
    done: bool,
    /// Its stages' times for its trace spans, when tracing is on.
    pub trace: Option<crate::telemetry::EngineTimes>,
}

impl RequestTracker {
    pub fn new(metrics: Arc<Metrics>, id: String, arrival: Instant, prompt_tokens: usize) -> Self {
        Self {
            metrics,
            id,
            arrival,
            first: None,
            last: None,
            prompt_tokens,
            output_tokens: 0,
            gaps: Vec::new(),
            done: false,
            trace: None,
        }
    }

    pub fn on_output(&mut self, o: &RequestOutput) {
        let now = Instant::now();
        if self.first.is_none() {
            self.first = Some(now);
            if let Some(t) = &mut self.trace {
                t.first = Some(now);
                t.scheduled = o.scheduled_at;
                t.cached_tokens = o.num_cached_tokens;
            }
        } else if let Some(last) = self.last {
            self.gaps.push((now - last).as_secs_f64());
        }
        self.last = Some(now);
        self.output_tokens = o.num_output_tokens;
        if let Some(reason) = o.finish_reason {
            self.finish(reason);
        }
    }

    /// Forgets the request without recording it: it was refused before it ever ran.
    pub fn discard(&mut self) {
        self.done = true;
    }

    /// Records the request (at most once).
    pub fn finish(&mut self, reason: FinishReason) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let now = Instant::now();
        let e2e = (now - self.arrival).as_secs_f64();
        let ttft = self.first.map(|f| (f - self.arrival).as_secs_f64());
        let tpot = match (self.first, self.last) {
            (Some(f), Some(l)) if self.output_tokens > 1 => {
                Some((l - f).as_secs_f64() / (self.output_tokens - 1) as f64)
            }
            _ => None,
        };
        let slot = match reason {
            FinishReason::Stop => 0,
            FinishReason::Length => 1,
            FinishReason::Abort => 2,
        };
        if let Some(t) = &self.trace {
            t.emit(
                &self.id,
                self.prompt_tokens,
                self.output_tokens,
                reason.as_str(),
            );
        }
        let gaps = std::mem::take(&mut self.gaps);
        self.metrics.with(|r| {
            r.success[slot] += 1;
            r.e2e.observe(e2e);
            r.prompt_tokens.observe(self.prompt_tokens as f64);
            r.generation_tokens.observe(self.output_tokens as f64);
            if let Some(t) = ttft {
                r.ttft.observe(t);
            }
            if let Some(t) = tpot {
                r.tpot.observe(t);
            }
            for g in gaps {
                r.itl.observe(g);
            }
        });
        tracing::info!(
            request_id = %self.id,
            prompt_tokens = self.prompt_tokens,
            output_tokens = self.output_tokens,
            ttft_ms = ttft.map_or(-1.0, |t| t * 1e3),
            latency_ms = e2e * 1e3,
            finish_reason = reason.as_str(),
            "request finished"
        );
    }
}

impl Drop for RequestTracker {
    /// A request dropped before finishing was aborted (the client went away or another
    /// choice of the same request failed).
    fn drop(&mut self) {
        self.finish(FinishReason::Abort);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help", "a=\"b\"");
        assert!(s.contains("x_bucket{a=\"b\",le=\"0.1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{a=\"b\",le=\"1.0\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_count{a=\"b\"} 4\n"), "{s}");
        assert!(s.contains("x_sum{a=\"b\"} 4.25\n"), "{s}");
    }

    #[test]
    fn buckets_follow_1_2_5() {
        assert_eq!(
            buckets_1_2_5(100),
            &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(
            buckets_1_2_5(512),
            &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]
        );
    }

    #[test]
    fn tracker_records_once_and_dropped_counts_as_abort() {
        let limits = EngineLimits {
            max_model_len: 512,
            vocab_size: 100,
            max_waiting_requests: None,
            scheduling_policy: Default::default(),
            num_blocks: 64,
            block_size: 16,
            enable_prefix_caching: true,
            block_hash_algo: "sha256_cbor_64bit",
            kv_layout: crate::kv::transfer::TransferLayout {
                identity: "m".into(),
                payload_len: 1,
            },
            block_hasher: crate::kv::BlockHasher::new(crate::kv::BlockHashAlgo::Xxh3, "0"),
            prefill_cost: Default::default(),
        };
        let m = Arc::new(Metrics::new("m\"x", &limits));
        {
            let mut t = RequestTracker::new(m.clone(), "a".into(), Instant::now(), 3);
            t.finish(FinishReason::Length);
            t.finish(FinishReason::Stop);
        }
        drop(RequestTracker::new(
            m.clone(),
            "b".into(),
            Instant::now(),
            3,
        ));
        let text = m.render(&EngineStats::default());
        assert!(text.contains(r#"model_name="m\"x""#), "{text}");
        assert!(text.contains("finished_reason=\"length\"} 1\n"), "{text}");
        assert!(text.contains("finished_reason=\"stop\"} 0\n"), "{text}");
        assert!(text.contains("finished_reason=\"abort\"} 1\n"), "{text}");
        assert!(
            text.contains(
                "vllm:e2e_request_latency_seconds_count{model_name=\"m\\\"x\",engine=\"0\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("vllm:num_requests_running{"), "{text}");
        assert!(text.contains("vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"64\",enable_prefix_caching=\"True\",prefix_caching_hash_algo=\"sha256_cbor_64bit\""), "{text}");
        assert!(
            text.contains("vllm:lora_requests_info{max_lora=\"0\""),
            "{text}"
        );
    }
}
