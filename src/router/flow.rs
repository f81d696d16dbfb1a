//! Flow control: while the workers are saturated, requests wait in the router and leave it
//! highest priority first as capacity frees — llm-d's flow controller, for the proxy and the
//! endpoint-picker modes alike.
//!
//! - A request's **priority** comes from its `InferenceObjective` ([`Objectives`], named by the
//!   `x-gateway-inference-objective` header; unset or unknown: 0). Requests of one priority
//!   form a **band**; bands are served in strict order, higher value first. A negative priority
//!   is *sheddable*: it waits like any other, but it is the first to go when room is short.
//! - Inside a band, requests are grouped in **flows** by `x-gateway-inference-fairness-id`;
//!   the band takes one request from each flow in turn (round robin), each flow first come
//!   first served.
//! - The **saturation detector** ([`pool_saturation`]) scores each endpoint by its scraped
//!   queue depth and KV usage against thresholds (llm-d's utilization detector: metrics older
//!   than the staleness limit score as saturated), adds the requests the router admitted since
//!   the last scrape (which the scrape could not see yet), and optionally caps requests in
//!   flight per endpoint. The pool is saturated at an average score of 1; requests of positive
//!   priority may be given headroom past it (`priority_headroom`), room that lower priorities
//!   never take, since a worker does not preempt a running request for a waiting one.
//! - **Shedding**: a full band (`maxRequests`/`maxBytes`) refuses a request (429); a full pool
//!   (the global limits) first displaces queued sheddable requests of lower priority, newest
//!   first, so a request of priority ≥ 0 is never refused while sheddable ones hold room (429);
//!   a request waits at most `defaultRequestTTL` (429), or `noEndpointRequestTTL` while the pool
//!   has no endpoint at all (the scale-from-zero waiting room; 503).
//! - A waiting request is a future: dropping it (the client went away) takes it out of its
//!   queue at once. An admitted one holds an [`Admitted`] guard until its response ends;
//!   dropping the guard lets the next request in.
//!
//! With nothing queued and the pool not saturated, admission takes one lock and no
//! allocation.
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Names the request's `InferenceObjective`.
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
/// Names the request's flow (tenant) inside its band.
pub const FAIRNESS_HEADER: &str = "x-gateway-inference-fairness-id";
/// The flow of a request without a fairness id.
pub const DEFAULT_FLOW: &str = "default-flow";

// ---------------------------------------------------------------------------------------------
// Objectives

/// Priorities by `InferenceObjective` name, shared by the request path and whatever keeps them
/// current (`--objectives FILE` at start, a Kubernetes watch).
#[derive(Debug, Default)]
pub struct Objectives(RwLock<HashMap<String, i32>>);

impl Objectives {
    pub fn new(m: HashMap<String, i32>) -> Self {
        Self(RwLock::new(m))
    }

    /// Replaces every objective at once.
    pub fn replace_all(&self, m: HashMap<String, i32>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = m;
    }

    pub fn priority(&self, name: &str) -> Option<i32> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    /// A request's priority from its objective header's value: 0 when unset or unknown.
    pub fn resolve(&self, objective: Option<&str>) -> i32 {
        objective.and_then(|n| self.priority(n)).unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectiveDoc {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<ObjectiveMeta>,
    spec: Option<ObjectiveSpec>,
}

#[derive(Deserialize)]
struct ObjectiveMeta {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectiveSpec {
    pool_ref: Option<PoolRef>,
    priority: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize)]
struct PoolRef {
    name: Option<String>,
}

/// A DNS-1123 subdomain, as Kubernetes requires of an object's name.
fn dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Reads `llm-d.ai/v1alpha2` `InferenceObjective` manifests (YAML, one or more documents):
/// name → priority (unset: 0). Refuses, by name, a manifest of another kind or version, without
/// a valid name or `spec.poolRef.name`, with a priority that is not a 32-bit integer, or a name
/// given twice.
pub fn parse_objectives(yaml: &str) -> Result<HashMap<String, i32>, String> {
    let mut out = HashMap::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let v = serde_yaml_ng::Value::deserialize(doc)
            .map_err(|e| format!("document {}: not YAML: {e}", i + 1))?;
        if v.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        let d: ObjectiveDoc = serde_yaml_ng::from_value(v)
            .map_err(|e| format!("document {}: not an InferenceObjective: {e}", i + 1))?;
        let name = d.metadata.and_then(|m| m.name).unwrap_or_default();
        let who = if name.is_empty() {
            format!("document {}", i + 1)
        } else {
            format!("InferenceObjective {name:?}")
        };
        if d.api_version.as_deref() != Some("llm-d.ai/v1alpha2") {
            return Err(format!(
                "{who}: apiVersion must be llm-d.ai/v1alpha2, not {:?}",
                d.api_version.unwrap_or_default()
            ));
        }
        if d.kind.as_deref() != Some("InferenceObjective") {
            return Err(format!(
                "{who}: kind must be InferenceObjective, not {:?}",
                d.kind.unwrap_or_default()
            ));
        }
        if !dns_subdomain(&name) {
            return Err(format!(
                "{who}: metadata.name must be a DNS subdomain (lowercase letters, digits, '-', '.')"
            ));
        }
        let Some(spec) = d.spec else {
            return Err(format!("{who}: spec is required"));
        };
        match spec.pool_ref.and_then(|p| p.name) {
            Some(p) if !p.is_empty() && p.len() <= 253 => {}
            _ => return Err(format!("{who}: spec.poolRef.name is required")),
        }
        let priority = match spec.priority {
            None | Some(serde_yaml_ng::Value::Null) => 0,
            Some(p) => p
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| format!("{who}: spec.priority must be a 32-bit integer"))?,
        };
        if out.insert(name.clone(), priority).is_some() {
            return Err(format!("{who}: given twice"));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// Limits of one band (or of the whole queue).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_requests: usize,
    pub max_bytes: u64,
}

/// The saturation detector's knobs (llm-d's utilization detector, plus an optional
/// concurrency cap).
#[derive(Clone, Copy, Debug)]
pub struct SaturationConfig {
    /// Waiting requests at which an endpoint counts as full (`queueDepthThreshold`).
    pub queue_depth_threshold: f64,
    /// KV usage (0..1] at which an endpoint counts as full (`kvCacheUtilThreshold`).
    pub kv_cache_util_threshold: f64,
    /// Metrics older than this count as saturated (`metricsStalenessThreshold`).
    pub staleness: Duration,
    /// Requests in flight per endpoint at which the pool counts as full (`maxConcurrency`).
    pub max_concurrency: Option<usize>,
    /// How far past saturation requests of positive priority are still let through (0.5: up
    /// to a saturation of 1.5): room held back for them that lower priorities never take.
    pub priority_headroom: f64,
}

impl SaturationConfig {
    /// The saturation below which a request of `priority` may go.
    pub fn ceiling(&self, priority: i32) -> f64 {
        if priority > 0 {
            1.0 + self.priority_headroom
        } else {
            1.0
        }
    }
}

impl Default for SaturationConfig {
    fn default() -> Self {
        Self {
            queue_depth_threshold: 5.0,
            kv_cache_util_threshold: 0.8,
            staleness: Duration::from_secs(1),
            max_concurrency: None,
            priority_headroom: 0.0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct FlowConfig {
    /// Off: every request is admitted at once (counted, never queued or shed).
    pub enabled: bool,
    /// Limits of a band not in `bands`.
    pub band: Limits,
    /// Limits by priority.
    pub bands: BTreeMap<i32, Limits>,
    /// Limits of all bands together.
    pub pool: Limits,
    /// Longest wait while the pool has endpoints (`defaultRequestTTL`).
    pub ttl: Duration,
    /// Longest wait while it has none (`noEndpointRequestTTL`).
    pub no_endpoint_ttl: Duration,
    pub saturation: SaturationConfig,
}

pub const DEFAULT_BAND_LIMITS: Limits = Limits {
    max_requests: 1024,
    max_bytes: 256 << 20,
};
pub const DEFAULT_POOL_LIMITS: Limits = Limits {
    max_requests: 4096,
    max_bytes: 1 << 30,
};
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            band: DEFAULT_BAND_LIMITS,
            bands: BTreeMap::new(),
            pool: DEFAULT_POOL_LIMITS,
            ttl: DEFAULT_TTL,
            no_endpoint_ttl: DEFAULT_TTL,
            saturation: SaturationConfig::default(),
        }
    }
}

impl FlowConfig {
    fn band_limits(&self, priority: i32) -> Limits {
        self.bands.get(&priority).copied().unwrap_or(self.band)
    }
}

/// `llmd route`'s flow-control flags.
#[derive(clap::Args, Clone, Debug)]
pub struct FlowArgs {
    /// Flow control: `on` (requests wait in the router while the workers are saturated, highest
    /// priority first) or `off` (every request goes straight to a worker).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub flow_control: String,
    /// `llm-d.ai/v1alpha2` `InferenceObjective` manifests (YAML, multi-document): the priority
    /// of a request naming one in `x-gateway-inference-objective`. With --pool-name and no
    /// file, the InferenceObjectives whose poolRef names the pool are watched instead.
    #[arg(long)]
    pub objectives: Option<std::path::PathBuf>,
    /// Seconds a request may wait in the router (`defaultRequestTTL`); then 429.
    #[arg(long, default_value_t = 30.0)]
    pub flow_default_request_ttl: f64,
    /// Seconds a request may wait while the pool has no endpoint (`noEndpointRequestTTL`,
    /// default: --flow-default-request-ttl); then 503.
    #[arg(long)]
    pub flow_no_endpoint_request_ttl: Option<f64>,
    /// Requests one priority band may queue (`maxRequests`).
    #[arg(long, default_value_t = DEFAULT_BAND_LIMITS.max_requests)]
    pub flow_band_max_requests: usize,
    /// Request-body bytes one band may queue (`maxBytes`).
    #[arg(long, default_value_t = DEFAULT_BAND_LIMITS.max_bytes)]
    pub flow_band_max_bytes: u64,
    /// One band's own limits: `PRIORITY:maxRequests=N,maxBytes=N` (either key may be left
    /// out). Repeat for each band.
    #[arg(long = "flow-band")]
    pub flow_bands: Vec<String>,
    /// Requests all bands together may queue; past it, queued sheddable requests of lower
    /// priority are displaced.
    #[arg(long, default_value_t = DEFAULT_POOL_LIMITS.max_requests)]
    pub flow_max_requests: usize,
    /// Request-body bytes all bands together may queue.
    #[arg(long, default_value_t = DEFAULT_POOL_LIMITS.max_bytes)]
    pub flow_max_bytes: u64,
    /// Waiting requests on a worker at which it counts as saturated (`queueDepthThreshold`).
    #[arg(long, default_value_t = 5.0)]
    pub flow_queue_depth_threshold: f64,
    /// KV cache usage (0..1] at which a worker counts as saturated (`kvCacheUtilThreshold`).
    #[arg(long, default_value_t = 0.8)]
    pub flow_kv_cache_util_threshold: f64,
    /// Seconds after which a worker's scraped metrics count as saturated
    /// (`metricsStalenessThreshold`; default: 4 scrape intervals, at least 1).
    #[arg(long)]
    pub flow_metrics_staleness_threshold: Option<f64>,
    /// Requests in flight from the router per worker at which the pool counts as saturated
    /// (default: no such cap; the scraped queue depth and KV usage decide).
    #[arg(long)]
    pub flow_max_concurrency: Option<usize>,
    /// Room past saturation kept for requests of positive priority, as a fraction of it
    /// (0.5: they still go up to 1.5× the thresholds). Workers run requests to completion, so
    /// without it a high-priority request waits for a running low-priority one to end; with
    /// it, give the workers the extra room (e.g. --max-num-seqs).
    #[arg(long, default_value_t = 0.0)]
    pub flow_priority_headroom: f64,
    /// Do not send the priority to the workers (vLLM's `priority` field); for workers started
    /// with `--scheduling-policy fcfs`, which refuse a non-zero one.
    #[arg(long)]
    pub no_forward_priority: bool,
}

fn secs(v: f64, flag: &str) -> Result<Duration, String> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "{flag} must be a positive number of seconds, got {v}"
        ))
    }
}

/// Parses `PRIORITY:maxRequests=N,maxBytes=N` over `default`.
pub fn parse_band(s: &str, default: Limits) -> Result<(i32, Limits), String> {
    let bad = |why: &str| format!("--flow-band {s:?}: {why} (PRIORITY:maxRequests=N,maxBytes=N)");
    let (p, rest) = s.split_once(':').ok_or_else(|| bad("no ':'"))?;
    let p: i32 = p
        .trim()
        .parse()
        .map_err(|_| bad("the priority is not an integer"))?;
    let mut l = default;
    for kv in rest.split(',').filter(|x| !x.trim().is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad("a limit without '='"))?;
        match k.trim() {
            "maxRequests" => {
                l.max_requests = v.trim().parse().map_err(|_| bad("maxRequests"))?;
            }
            "maxBytes" => l.max_bytes = v.trim().parse().map_err(|_| bad("maxBytes"))?,
            other => return Err(bad(&format!("unknown limit {other:?}"))),
        }
    }
    Ok((p, l))
}

impl FlowArgs {
    /// The configuration, with the router's scrape interval (the staleness default and
    /// lower bound).
    pub fn config(&self, scrape_interval: Duration) -> Result<FlowConfig, String> {
        let ttl = secs(self.flow_default_request_ttl, "--flow-default-request-ttl")?;
        let no_endpoint_ttl = match self.flow_no_endpoint_request_ttl {
            Some(v) => secs(v, "--flow-no-endpoint-request-ttl")?,
            None => ttl,
        };
        let band = Limits {
            max_requests: self.flow_band_max_requests,
            max_bytes: self.flow_band_max_bytes,
        };
        let mut bands = BTreeMap::new();
        for b in &self.flow_bands {
            let (p, l) = parse_band(b, band)?;
            if bands.insert(p, l).is_some() {
                return Err(format!("--flow-band: priority {p} given twice"));
            }
        }
        let q = self.flow_queue_depth_threshold;
        if !(q.is_finite() && q > 0.0) {
            return Err(format!(
                "--flow-queue-depth-threshold must be positive, got {q}"
            ));
        }
        let kv = self.flow_kv_cache_util_threshold;
        if !(kv > 0.0 && kv <= 1.0) {
            return Err(format!(
                "--flow-kv-cache-util-threshold must be in (0, 1], got {kv}"
            ));
        }
        let staleness = match self.flow_metrics_staleness_threshold {
            Some(v) => secs(v, "--flow-metrics-staleness-threshold")?,
            None => (scrape_interval * 4).max(Duration::from_secs(1)),
        };
        if staleness <= scrape_interval {
            return Err(format!(
                "--flow-metrics-staleness-threshold ({:?}) must be longer than --scrape-interval \
                 ({scrape_interval:?}), or every worker would always count as saturated",
                staleness
            ));
        }
        let h = self.flow_priority_headroom;
        if !(h.is_finite() && (0.0..=100.0).contains(&h)) {
            return Err(format!(
                "--flow-priority-headroom must be between 0 and 100, got {h}"
            ));
        }
        if self.flow_max_concurrency == Some(0) {
            return Err("--flow-max-concurrency must be at least 1".into());
        }
        Ok(FlowConfig {
            enabled: self.flow_control == "on",
            band,
            bands,
            pool: Limits {
                max_requests: self.flow_max_requests,
                max_bytes: self.flow_max_bytes,
            },
            ttl,
            no_endpoint_ttl,
            saturation: SaturationConfig {
                queue_depth_threshold: q,
                kv_cache_util_threshold: kv,
                staleness,
                max_concurrency: self.flow_max_concurrency,
                priority_headroom: h,
            },
        })
    }

    /// The objectives of `--objectives` (none without it).
    pub fn objectives(&self) -> Result<HashMap<String, i32>, String> {
        let Some(path) = &self.objectives else {
            return Ok(HashMap::new());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--objectives {}: {e}", path.display()))?;
        parse_objectives(&text).map_err(|e| format!("--objectives {}: {e}", path.display()))
    }
}

// ---------------------------------------------------------------------------------------------
// Saturation

/// What the detector knows of one endpoint.
#[derive(Clone, Copy, Debug, Default)]
pub struct EndpointLoad {
    /// Scraped waiting requests (`vllm:num_requests_waiting`).
    pub waiting: f64,
    /// Scraped KV usage, 0..1 (`vllm:kv_cache_usage_perc`).
    pub kv_usage: f64,
    /// Age of those metrics (None: never scraped).
    pub age: Option<Duration>,
}

/// Where the controller reads the pool from: calls `f` once per endpoint.
pub type PoolView = Box<dyn Fn(&mut dyn FnMut(EndpointLoad)) + Send + Sync>;

/// The pool's saturation (≥ 1: saturated) from its endpoints, the requests admitted and not
/// finished (`active`), and how many more of them there are than at the last scrape (those the
/// scrape could not count: each counts as waiting). Infinite without endpoints.
pub fn pool_saturation(
    cfg: &SaturationConfig,
    endpoints: impl IntoIterator<Item = EndpointLoad>,
    active: usize,
    since_scrape: usize,
) -> f64 {
    let (mut n, mut sum) = (0usize, 0.0f64);
    for e in endpoints {
        n += 1;
        sum += endpoint_score(cfg, &e);
    }
    combine(cfg, n, sum, active, since_scrape)
}

/// One endpoint's score: its fuller resource against its threshold; 1 when its metrics are
/// stale or missing (fail closed, as llm-d's detector).
fn endpoint_score(cfg: &SaturationConfig, e: &EndpointLoad) -> f64 {
    match e.age {
        Some(a) if a <= cfg.staleness => {
            (e.waiting / cfg.queue_depth_threshold).max(e.kv_usage / cfg.kv_cache_util_threshold)
        }
        _ => 1.0,
    }
}

fn combine(cfg: &SaturationConfig, n: usize, sum: f64, active: usize, since: usize) -> f64 {
    if n == 0 {
        return f64::INFINITY;
    }
    let nf = n as f64;
    let mut s = (sum + since as f64 / cfg.queue_depth_threshold) / nf;
    if let Some(c) = cfg.max_concurrency {
        s = s.max(active as f64 / (c as f64 * nf));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The controller

/// A request asking to be let through.
#[derive(Clone, Debug)]
pub struct FlowRequest {
    pub priority: i32,
    /// The fairness id (`x-gateway-inference-fairness-id`).
    pub flow_id: String,
    /// Its body's size.
    pub bytes: u64,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq)]
pub enum Shed {
    /// Its band holds `maxRequests` or `maxBytes` already.
    BandFull { priority: i32 },
    /// All bands together are full and nothing of lower priority could be displaced.
    PoolFull,
    /// A request of higher priority took its place in the queue (sheddable requests only).
    Displaced,
    /// It waited `defaultRequestTTL` for capacity.
    Ttl { waited: Duration },
    /// It waited `noEndpointRequestTTL` with no endpoint in the pool.
    NoEndpoints { waited: Duration },
}

impl Shed {
    /// The HTTP status: 503 for no endpoints, 429 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            Shed::NoEndpoints { .. } => 503,
            _ => 429,
        }
    }

    /// The `outcome` label of the metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Shed::BandFull { .. } | Shed::PoolFull => "rejected_capacity",
            Shed::Displaced => "evicted_displaced",
            Shed::Ttl { .. } => "evicted_ttl",
            Shed::NoEndpoints { .. } => "evicted_no_endpoints",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Shed::BandFull { priority } => format!(
                "too many requests: the router's queue for priority {priority} is full; retry later"
            ),
            Shed::PoolFull => "too many requests: the router's queue is full; retry later".into(),
            Shed::Displaced => "too many requests: this sheddable request was dropped from the \
                                router's queue for one of higher priority; retry later"
                .into(),
            Shed::Ttl { waited } => format!(
                "too many requests: the workers stayed saturated for the {:.1} s this request \
                 may wait in the router's queue; retry later",
                waited.as_secs_f64()
            ),
            Shed::NoEndpoints { waited } => format!(
                "no worker to serve the request: the pool had no endpoint for {:.1} s",
                waited.as_secs_f64()
            ),
        }
    }
}

impl std::fmt::Display for Shed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

/// Upper bounds (seconds) of the wait-time histogram.
const WAIT_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; WAIT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(WAIT_BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }
}

struct Entry {
    id: u64,
    bytes: u64,
    enqueued: Instant,
    tx: oneshot::Sender<Result<(), Shed>>,
}

#[derive(Default)]
struct Band {
    flows: HashMap<Arc<str>, VecDeque<Entry>>,
    /// Flows with requests, in their turn's order.
    turn: VecDeque<Arc<str>>,
    len: usize,
    bytes: u64,
}

impl Band {
    /// The next request: the first of the flow whose turn it is.
    fn pop(&mut self) -> Option<Entry> {
        let flow = self.turn.pop_front()?;
        let q = self.flows.get_mut(&flow)?;
        let e = q.pop_front()?;
        if q.is_empty() {
            self.flows.remove(&flow);
        } else {
            self.turn.push_back(flow);
        }
        self.len -= 1;
        self.bytes -= e.bytes;
        Some(e)
    }

    fn remove(&mut self, flow: &str, id: u64) -> Option<Entry> {
        let q = self.flows.get_mut(flow)?;
        let at = q.iter().position(|e| e.id == id)?;
        let e = q.remove(at)?;
        if q.is_empty() {
            self.flows.remove(flow);
            self.turn.retain(|f| &**f != flow);
        }
        self.len -= 1;
        self.bytes -= e.bytes;
        Some(e)
    }

    /// The flow of the most recently queued request.
    fn newest(&self) -> Option<(Arc<str>, u64)> {
        self.flows
            .iter()
            .filter_map(|(f, q)| q.back().map(|e| (f.clone(), e.id)))
            .max_by_key(|(_, id)| *id)
    }
}

#[derive(Default)]
struct Inner {
    bands: BTreeMap<i32, Band>,
    queued: usize,
    bytes: u64,
    /// Admitted and not finished.
    active: usize,
    /// `active` when the last scrape ended.
    active_at_scrape: usize,
    next_id: u64,
    stats: BTreeMap<i32, BandStats>,
}

#[derive(Default)]
struct BandStats {
    /// Requests by outcome.
    outcomes: BTreeMap<&'static str, u64>,
    /// Time in the queue, by outcome.
    wait: BTreeMap<&'static str, Histogram>,
}

impl Inner {
    fn record(&mut self, priority: i32, outcome: &'static str, waited: Duration) {
        let s = self.stats.entry(priority).or_default();
        *s.outcomes.entry(outcome).or_default() += 1;
        s.wait
            .entry(outcome)
            .or_default()
            .observe(waited.as_secs_f64());
    }

    fn take(&mut self, priority: i32, flow: &str, id: u64) -> Option<Entry> {
        let band = self.bands.get_mut(&priority)?;
        let e = band.remove(flow, id)?;
        self.queued -= 1;
        self.bytes -= e.bytes;
        Some(e)
    }
}

/// The flow controller. Share it in an `Arc`.
pub struct FlowController {
    cfg: FlowConfig,
    pool: PoolView,
    inner: Mutex<Inner>,
}

impl FlowController {
    pub fn new(cfg: FlowConfig, pool: PoolView) -> Self {
        Self {
            cfg,
            pool,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn config(&self) -> &FlowConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Saturation now, from the pool view and `inner`'s counts (∞ without endpoints).
    fn saturation(&self, inner: &Inner) -> f64 {
        let cfg = &self.cfg.saturation;
        let (mut n, mut sum) = (0usize, 0.0f64);
        (self.pool)(&mut |e| {
            n += 1;
            sum += endpoint_score(cfg, &e);
        });
        let since = inner.active.saturating_sub(inner.active_at_scrape);
        combine(cfg, n, sum, inner.active, since)
    }

    fn has_endpoints(&self) -> bool {
        let mut any = false;
        (self.pool)(&mut |_| any = true);
        any
    }

    /// Waits until `req` may go to a worker: `Admitted` (hold it until the response ends) or
    /// why it was refused. Dropping the future leaves the queue.
    pub async fn admit(self: &Arc<Self>, req: FlowRequest) -> Result<Admitted, Shed> {
        let (rx, id, flow, enqueued) = {
            let mut g = self.lock();
            let ahead = g.bands.range(req.priority..).any(|(_, b)| b.len > 0);
            if !self.cfg.enabled
                || (!ahead && self.saturation(&g) < self.cfg.saturation.ceiling(req.priority))
            {
                g.active += 1;
                if self.cfg.enabled {
                    g.record(req.priority, "dispatched", Duration::ZERO);
                }
                return Ok(Admitted {
                    ctl: self.clone(),
                    waited: Duration::ZERO,
                });
            }
            self.enqueue(&mut g, req.priority, &req.flow_id, req.bytes)?
        };
        let mut w = Waiting {
            ctl: self.clone(),
            id,
            priority: req.priority,
            flow,
            rx: Some(rx),
        };
        self.pump();
        loop {
            let deadline = self.next_check(enqueued);
            let rx = w.rx.as_mut().expect("receiver held until answered");
            tokio::select! {
                r = rx => {
                    w.rx = None;
                    return match r {
                        Ok(Ok(())) => Ok(Admitted { ctl: self.clone(), waited: enqueued.elapsed() }),
                        Ok(Err(shed)) => Err(shed),
                        // The sender is dropped only with an answer; this is unreachable.
                        Err(_) => Err(Shed::PoolFull),
                    };
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if let Some(shed) = self.expire(&w, enqueued) {
                        w.rx = None;
                        return Err(shed);
                    }
                }
            }
        }
    }

    /// Queues a request (or refuses it): its receiver, id and flow.
    #[allow(clippy::type_complexity)]
    fn enqueue(
        &self,
        g: &mut Inner,
        priority: i32,
        flow_id: &str,
        bytes: u64,
    ) -> Result<(oneshot::Receiver<Result<(), Shed>>, u64, Arc<str>, Instant), Shed> {
        let limits = self.cfg.band_limits(priority);
        let (blen, bbytes) = g.bands.get(&priority).map_or((0, 0), |b| (b.len, b.bytes));
        if blen + 1 > limits.max_requests || bbytes + bytes > limits.max_bytes {
            let shed = Shed::BandFull { priority };
            g.record(priority, shed.outcome(), Duration::ZERO);
            return Err(shed);
        }
        let pool = self.cfg.pool;
        let over = |g: &Inner| g.queued + 1 > pool.max_requests || g.bytes + bytes > pool.max_bytes;
        if over(g) {
            // Room held by sheddable requests of lower priority is given up, newest first —
            // but only if that makes enough.
            let (mut n, mut b) = (0usize, 0u64);
            for (_, band) in g.bands.range(..priority.min(0)) {
                n += band.len;
                b += band.bytes;
            }
            let fits = g.queued - n < pool.max_requests && g.bytes - b + bytes <= pool.max_bytes;
            if !fits || bytes > pool.max_bytes {
                let shed = Shed::PoolFull;
                g.record(priority, shed.outcome(), Duration::ZERO);
                return Err(shed);
            }
            while over(g) {
                let Some((&p, band)) = g
                    .bands
                    .range_mut(..priority.min(0))
                    .find(|(_, b)| b.len > 0)
                else {
                    break;
                };
                let Some((flow, id)) = band.newest() else {
                    break;
                };
                if let Some(e) = g.take(p, &flow, id) {
                    let waited = e.enqueued.elapsed();
                    g.record(p, Shed::Displaced.outcome(), waited);
                    let _ = e.tx.send(Err(Shed::Displaced));
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = g.next_id;
        g.next_id += 1;
        let band = g.bands.entry(priority).or_default();
        let flow: Arc<str> = match band.flows.get_key_value(flow_id) {
            Some((k, _)) => k.clone(),
            None => Arc::from(flow_id),
        };
        let q = band.flows.entry(flow.clone()).or_default();
        if q.is_empty() {
            band.turn.push_back(flow.clone());
        }
        let enqueued = Instant::now();
        q.push_back(Entry {
            id,
            bytes,
            enqueued,
            tx,
        });
        band.len += 1;
        band.bytes += bytes;
        g.queued += 1;
        g.bytes += bytes;
        Ok((rx, id, flow, enqueued))
    }

    /// When a request queued at `enqueued` should next look at its TTLs.
    fn next_check(&self, enqueued: Instant) -> Instant {
        let (a, b) = (self.cfg.ttl, self.cfg.no_endpoint_ttl);
        let first = enqueued + a.min(b);
        let now = Instant::now();
        if now < first {
            first
        } else {
            // Past the shorter TTL the pool's state decides which applies: look again soon.
            (enqueued + a.max(b)).min(now + Duration::from_millis(250))
        }
    }

    /// Sheds a waiting request past the TTL that applies now.
    fn expire(&self, w: &Waiting, enqueued: Instant) -> Option<Shed> {
        let waited = enqueued.elapsed();
        let endpoints = self.has_endpoints();
        let ttl = if endpoints {
            self.cfg.ttl
        } else {
            self.cfg.no_endpoint_ttl
        };
        if waited < ttl {
            return None;
        }
        let shed = if endpoints {
            Shed::Ttl { waited }
        } else {
            Shed::NoEndpoints { waited }
        };
        let mut g = self.lock();
        // Already answered (dispatched or displaced) while the timer fired: that answer stands.
        g.take(w.priority, &w.flow, w.id)?;
        g.record(w.priority, shed.outcome(), waited);
        Some(shed)
    }

    /// Lets queued requests go, highest priority first, while the pool is not saturated. Call
    /// it when the pool's metrics change (after each scrape, [`Self::metrics_refreshed`]);
    /// finishing requests call it themselves.
    pub fn pump(&self) {
        let mut g = self.lock();
        while g.queued > 0 {
            let sat = self.saturation(&g);
            let ceiling = &|p| self.cfg.saturation.ceiling(p);
            // Strict priority: when the highest waiting band may not go, no lower one may.
            let Some((&p, band)) = g.bands.iter_mut().rev().find(|(_, b)| b.len > 0) else {
                break;
            };
            if sat >= ceiling(p) {
                break;
            }
            let Some(e) = band.pop() else {
                break;
            };
            g.queued -= 1;
            g.bytes -= e.bytes;
            let waited = e.enqueued.elapsed();
            if e.tx.send(Ok(())).is_ok() {
                g.active += 1;
                g.record(p, "dispatched", waited);
            } else {
                g.record(p, "cancelled", waited);
            }
        }
    }

    /// The workers' metrics were just scraped: what the router admitted so far is in them.
    pub fn metrics_refreshed(&self) {
        {
            let mut g = self.lock();
            g.active_at_scrape = g.active;
        }
        self.pump();
    }

    /// Requests queued now.
    pub fn queued(&self) -> usize {
        self.lock().queued
    }

    /// Admitted requests not yet finished.
    pub fn active(&self) -> usize {
        self.lock().active
    }

    /// Appends the flow-control metrics (Prometheus text) to `out`.
    pub fn write_metrics(&self, out: &mut String) {
        if !self.cfg.enabled {
            return;
        }
        let g = self.lock();
        let mut priorities: Vec<i32> = g.stats.keys().chain(g.bands.keys()).copied().collect();
        priorities.sort_unstable();
        priorities.dedup();
        let band = |p: i32| g.bands.get(&p).map_or((0, 0), |b| (b.len, b.bytes));
        let _ = writeln!(out, "# HELP inference_extension_flow_control_queue_size Requests waiting in the router's flow-control queue, by priority band.\n# TYPE inference_extension_flow_control_queue_size gauge");
        for &p in &priorities {
            let _ = writeln!(
                out,
                "inference_extension_flow_control_queue_size{{priority=\"{p}\"}} {}",
                band(p).0
            );
        }
        let _ = writeln!(out, "# HELP inference_extension_flow_control_queue_bytes Request-body bytes waiting in the router's flow-control queue, by priority band.\n# TYPE inference_extension_flow_control_queue_bytes gauge");
        for &p in &priorities {
            let _ = writeln!(
                out,
                "inference_extension_flow_control_queue_bytes{{priority=\"{p}\"}} {}",
                band(p).1
            );
        }
        let _ = writeln!(out, "# HELP inference_extension_flow_control_request_queue_duration_seconds Time requests spent in the flow-control queue, by priority and outcome (dispatched, rejected_capacity, evicted_displaced, evicted_ttl, evicted_no_endpoints, cancelled).\n# TYPE inference_extension_flow_control_request_queue_duration_seconds histogram");
        for (p, s) in &g.stats {
            for (outcome, h) in &s.wait {
                let l = format!("priority=\"{p}\",outcome=\"{outcome}\"");
                for (b, c) in WAIT_BUCKETS.iter().zip(h.counts) {
                    let _ = writeln!(out, "inference_extension_flow_control_request_queue_duration_seconds_bucket{{{l},le=\"{b}\"}} {c}");
                }
                let _ = writeln!(out, "inference_extension_flow_control_request_queue_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}\ninference_extension_flow_control_request_queue_duration_seconds_sum{{{l}}} {}\ninference_extension_flow_control_request_queue_duration_seconds_count{{{l}}} {}", h.count, h.sum, h.count);
            }
        }
        let _ = writeln!(out, "# HELP llmd_router:flow_control_requests_total Requests through flow control by priority and outcome: dispatched (to a worker), rejected_capacity (band or queue full, 429), evicted_displaced (sheddable, displaced by a higher priority, 429), evicted_ttl (429), evicted_no_endpoints (503), cancelled (the client left while queued).\n# TYPE llmd_router:flow_control_requests_total counter");
        for (p, s) in &g.stats {
            for (outcome, n) in &s.outcomes {
                let _ = writeln!(
                    out,
                    "llmd_router:flow_control_requests_total{{priority=\"{p}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        let sat = self.saturation(&g);
        let _ = writeln!(out, "# HELP inference_extension_flow_control_pool_saturation The pool's saturation as the detector sees it (1 and over: saturated; stale metrics count as 1).\n# TYPE inference_extension_flow_control_pool_saturation gauge\ninference_extension_flow_control_pool_saturation {}", if sat.is_finite() { sat } else { 1.0 });
        let _ = writeln!(out, "# HELP llmd_router:flow_control_active_requests Requests admitted by flow control whose response has not ended.\n# TYPE llmd_router:flow_control_active_requests gauge\nllmd_router:flow_control_active_requests {}", g.active);
    }
}

/// A request let through: hold it until its response ends.
pub struct Admitted {
    ctl: Arc<FlowController>,
    /// How long it waited in the queue.
    pub waited: Duration,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        {
            let mut g = self.ctl.lock();
            g.active = g.active.saturating_sub(1);
        }
        self.ctl.pump();
    }
}

/// A queued request's place; dropping it before an answer leaves the queue.
struct Waiting {
    ctl: Arc<FlowController>,
    id: u64,
    priority: i32,
    flow: Arc<str>,
    rx: Option<oneshot::Receiver<Result<(), Shed>>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut g = self.ctl.lock();
        if let Some(e) = g.take(self.priority, &self.flow, self.id) {
            let waited = e.enqueued.elapsed();
            g.record(self.priority, "cancelled", waited);
            return;
        }
        // Dispatched as the client left: give the room back.
        if let Ok(Ok(())) = rx.try_recv() {
            g.active = g.active.saturating_sub(1);
            drop(g);
            self.ctl.pump();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    /// A pool of `n` endpoints (settable) that are saturated or not (settable).
    struct Pool {
        n: AtomicUsize,
        waiting: AtomicUsize,
    }

    fn controller(cfg: FlowConfig) -> (Arc<FlowController>, Arc<Pool>) {
        let pool = Arc::new(Pool {
            n: AtomicUsize::new(1),
            waiting: AtomicUsize::new(100),
        });
        let p = pool.clone();
        let view: PoolView = Box::new(move |f| {
            for _ in 0..p.n.load(Relaxed) {
                f(EndpointLoad {
                    waiting: p.waiting.load(Relaxed) as f64,
                    kv_usage: 0.0,
                    age: Some(Duration::ZERO),
                })
            }
        });
        (Arc::new(FlowController::new(cfg, view)), pool)
    }

    fn req(priority: i32, flow: &str) -> FlowRequest {
        FlowRequest {
            priority,
            flow_id: flow.into(),
            bytes: 10,
        }
    }

    /// Starts `admit` for each request on its own task, in order (each queued before the next
    /// starts), and returns their handles.
    async fn queue_all(
        fc: &Arc<FlowController>,
        reqs: Vec<FlowRequest>,
    ) -> Vec<tokio::task::JoinHandle<Result<Admitted, Shed>>> {
        let mut out = Vec::new();
        for r in reqs {
            let before = fc.queued();
            let f = fc.clone();
            out.push(tokio::spawn(async move { f.admit(r).await }));
            while fc.queued() == before {
                tokio::task::yield_now().await;
            }
        }
        out
    }

    /// Frees one slot at a time and returns the order (index into `handles`) of admission.
    async fn drain_order(
        fc: &Arc<FlowController>,
        pool: &Pool,
        mut handles: Vec<tokio::task::JoinHandle<Result<Admitted, Shed>>>,
    ) -> Vec<usize> {
        // One endpoint, one slot: at most one admitted at a time.
        pool.waiting.store(0, Relaxed);
        fc.metrics_refreshed();
        let mut order = Vec::new();
        let mut held = None;
        while order.len() < handles.len() {
            drop(held.take());
            let Some(i) =
                (0..handles.len()).find(|&i| !order.contains(&i) && handles[i].is_finished())
            else {
                tokio::task::yield_now().await;
                continue;
            };
            let a = (&mut handles[i]).await.unwrap().expect("admitted");
            order.push(i);
            held = Some(a);
        }
        order
    }

    fn one_slot() -> FlowConfig {
        FlowConfig {
            saturation: SaturationConfig {
                max_concurrency: Some(1),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn fast_path_admits_at_once_when_not_saturated() {
        let (fc, pool) = controller(FlowConfig::default());
        pool.waiting.store(0, Relaxed);
        let a = fc.admit(req(0, "x")).await.unwrap();
        assert_eq!((fc.active(), fc.queued()), (1, 0));
        drop(a);
        assert_eq!(fc.active(), 0);
        let mut m = String::new();
        fc.write_metrics(&mut m);
        assert!(
            m.contains(
                "llmd_router:flow_control_requests_total{priority=\"0\",outcome=\"dispatched\"} 1"
            ),
            "{m}"
        );
    }

    #[tokio::test]
    async fn strict_priority_between_bands_fcfs_inside_a_flow() {
        let (fc, pool) = controller(one_slot());
        let hs = queue_all(
            &fc,
            vec![
                req(0, "a"),
                req(-1, "a"),
                req(10, "a"),
                req(0, "a"),
                req(10, "a"),
            ],
        )
        .await;
        assert_eq!(fc.queued(), 5);
        assert_eq!(drain_order(&fc, &pool, hs).await, vec![2, 4, 0, 3, 1]);
    }

    #[tokio::test]
    async fn round_robin_among_flows_of_a_band() {
        let (fc, pool) = controller(one_slot());
        let hs = queue_all(
            &fc,
            vec![
                req(0, "a"),
                req(0, "a"),
                req(0, "a"),
                req(0, "b"),
                req(0, "c"),
                req(0, "b"),
            ],
        )
        .await;
        // a, b, c in turn from the first queued: a0, b3, c4, a1, b5, a2.
        assert_eq!(drain_order(&fc, &pool, hs).await, vec![0, 3, 4, 1, 5, 2]);
    }

    #[tokio::test]
    async fn band_limits_refuse_and_pool_limits_displace_sheddable_first() {
        let mut cfg = one_slot();
        cfg.bands.insert(
            5,
            Limits {
                max_requests: 1,
                max_bytes: 1000,
            },
        );
        cfg.pool = Limits {
            max_requests: 3,
            max_bytes: 1000,
        };
        let (fc, _pool) = controller(cfg);
        let hs = queue_all(&fc, vec![req(5, "a"), req(-1, "a"), req(-2, "a")]).await;
        // Band 5 holds one already.
        assert_eq!(
            fc.admit(req(5, "b")).await.err(),
            Some(Shed::BandFull { priority: 5 })
        );
        // The pool is full: a priority 0 request displaces the lowest band's newest.
        let f = fc.clone();
        let h0 = tokio::spawn(async move { f.admit(req(0, "a")).await });
        let mut hs = hs.into_iter();
        let (h5, hm1, hm2) = (hs.next().unwrap(), hs.next().unwrap(), hs.next().unwrap());
        assert_eq!(hm2.await.unwrap().err(), Some(Shed::Displaced));
        assert!(!hm1.is_finished());
        while fc.queued() != 3 {
            tokio::task::yield_now().await;
        }
        // Another -1 cannot displace a -1 (only lower bands): refused.
        assert_eq!(fc.admit(req(-1, "z")).await.err(), Some(Shed::PoolFull));
        // Bytes count too: a request over the pool's bytes is refused without displacing.
        let big = FlowRequest {
            priority: 3,
            flow_id: "a".into(),
            bytes: 2000,
        };
        assert_eq!(fc.admit(big).await.err(), Some(Shed::PoolFull));
        assert!(!hm1.is_finished());
        assert_eq!(Shed::PoolFull.status(), 429);
        for h in [h5, hm1, h0] {
            h.abort();
        }
    }

    #[tokio::test]
    async fn ttl_sheds_with_429_and_no_endpoint_ttl_with_503() {
        let (ttl, no_ep) = (Duration::from_millis(200), Duration::from_millis(600));
        let cfg = FlowConfig {
            ttl,
            no_endpoint_ttl: no_ep,
            ..one_slot()
        };
        let (fc, pool) = controller(cfg);
        let t0 = Instant::now();
        let e = fc.admit(req(-1, "a")).await.err().unwrap();
        assert!(matches!(e, Shed::Ttl { .. }) && e.status() == 429, "{e:?}");
        let waited = t0.elapsed();
        assert!(waited >= ttl, "{waited:?}");
        assert_eq!(fc.queued(), 0);
        // No endpoints: the longer TTL applies, then 503.
        pool.n.store(0, Relaxed);
        let t0 = Instant::now();
        let e = fc.admit(req(0, "a")).await.err().unwrap();
        assert!(
            matches!(e, Shed::NoEndpoints { .. }) && e.status() == 503,
            "{e:?}"
        );
        assert!(t0.elapsed() >= no_ep);
        // Endpoints that come back while it waits let it through.
        let f = fc.clone();
        let h = tokio::spawn(async move { f.admit(req(0, "a")).await.map(|a| a.waited) });
        while fc.queued() == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(ttl / 2).await;
        pool.n.store(1, Relaxed);
        pool.waiting.store(0, Relaxed);
        fc.metrics_refreshed();
        assert!(h.await.unwrap().unwrap() >= ttl / 2);
        let mut m = String::new();
        fc.write_metrics(&mut m);
        for want in [
            "outcome=\"evicted_ttl\"} 1",
            "outcome=\"evicted_no_endpoints\"} 1",
            "inference_extension_flow_control_request_queue_duration_seconds_bucket{priority=\"-1\",outcome=\"evicted_ttl\",le=\"0.1\"} 0",
            "inference_extension_flow_control_request_queue_duration_seconds_bucket{priority=\"-1\",outcome=\"evicted_ttl\",le=\"1\"} 1",
        ] {
            assert!(m.contains(want), "{want} in\n{m}");
        }
    }

    #[tokio::test]
    async fn a_dropped_waiter_leaves_the_queue_at_once() {
        let (fc, pool) = controller(one_slot());
        let hs = queue_all(&fc, vec![req(0, "a"), req(0, "b")]).await;
        assert_eq!(fc.queued(), 2);
        let mut hs = hs.into_iter();
        let first = hs.next().unwrap();
        first.abort();
        let _ = first.await;
        assert_eq!(fc.queued(), 1);
        // The other is the next admitted; the cancelled one holds nothing.
        pool.waiting.store(0, Relaxed);
        fc.pump();
        let a = hs.next().unwrap().await.unwrap().unwrap();
        assert_eq!(fc.active(), 1);
        drop(a);
        assert_eq!((fc.active(), fc.queued()), (0, 0));
        let mut m = String::new();
        fc.write_metrics(&mut m);
        assert!(m.contains("outcome=\"cancelled\"} 1"), "{m}");
    }

    #[tokio::test]
    async fn finishing_requests_let_the_next_in_and_off_admits_everything() {
        let (fc, pool) = controller(one_slot());
        pool.waiting.store(0, Relaxed);
        let a = fc.admit(req(0, "a")).await.unwrap();
        let hs = queue_all(&fc, vec![req(0, "a")]).await;
        assert_eq!(fc.queued(), 1);
        drop(a);
        let b = hs.into_iter().next().unwrap().await.unwrap().unwrap();
        assert_eq!((fc.active(), fc.queued()), (1, 0));
        drop(b);
        let (off, _) = controller(FlowConfig {
            enabled: false,
            ..one_slot()
        });
        let all: Vec<_> = (0..5).map(|_| off.admit(req(-1, "a"))).collect();
        for f in all {
            f.await.unwrap();
        }
    }

    #[tokio::test]
    async fn positive_priorities_use_the_headroom_lower_ones_wait() {
        let cfg = FlowConfig {
            saturation: SaturationConfig {
                max_concurrency: Some(2),
                priority_headroom: 1.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let (fc, pool) = controller(cfg);
        pool.waiting.store(0, Relaxed);
        let held = [
            fc.admit(req(0, "a")).await.unwrap(),
            fc.admit(req(0, "a")).await.unwrap(),
        ];
        // Saturated for priority 0 (two in flight of two) ...
        let hs = queue_all(&fc, vec![req(0, "a")]).await;
        // ... not for priority 1, which passes the queued 0 up to four in flight.
        let a = fc.admit(req(1, "a")).await.unwrap();
        let b = fc.admit(req(1, "a")).await.unwrap();
        assert_eq!((fc.active(), fc.queued()), (4, 1));
        let hs1 = queue_all(&fc, vec![req(1, "b")]).await;
        // A slot frees: the priority 1 request goes (3 in flight), the 0 still waits.
        drop(a);
        let c = hs1.into_iter().next().unwrap().await.unwrap().unwrap();
        assert_eq!((fc.active(), fc.queued()), (4, 1));
        drop((b, c));
        assert_eq!(
            fc.queued(),
            1,
            "two in flight: still saturated for priority 0"
        );
        drop(held);
        hs.into_iter().next().unwrap().await.unwrap().unwrap();
    }

    #[test]
    fn saturation_scores_queue_kv_staleness_and_own_requests() {
        let cfg = SaturationConfig::default(); // queue 5, kv 0.8, staleness 1 s
        let fresh = |waiting, kv_usage| EndpointLoad {
            waiting,
            kv_usage,
            age: Some(Duration::from_millis(100)),
        };
        assert!(pool_saturation(&cfg, [fresh(0.0, 0.0)], 0, 0) < 1.0);
        assert!(pool_saturation(&cfg, [fresh(5.0, 0.0)], 0, 0) >= 1.0);
        assert!(pool_saturation(&cfg, [fresh(0.0, 0.8)], 0, 0) >= 1.0);
        // Averaged over the pool: one full endpoint of two is not saturation.
        assert!(pool_saturation(&cfg, [fresh(5.0, 0.0), fresh(0.0, 0.0)], 0, 0) < 1.0);
        // Stale or never scraped: saturated.
        let stale = EndpointLoad {
            age: Some(Duration::from_secs(2)),
            ..fresh(0.0, 0.0)
        };
        assert!(pool_saturation(&cfg, [stale], 0, 0) >= 1.0);
        assert!(pool_saturation(&cfg, [EndpointLoad::default()], 0, 0) >= 1.0);
        // Requests admitted since the scrape count as waiting.
        assert!(pool_saturation(&cfg, [fresh(2.0, 0.0)], 3, 3) >= 1.0);
        assert!(pool_saturation(&cfg, [fresh(2.0, 0.0)], 3, 2) < 1.0);
        // The concurrency cap.
        let capped = SaturationConfig {
            max_concurrency: Some(2),
            ..cfg
        };
        assert!(pool_saturation(&capped, [fresh(0.0, 0.0)], 2, 0) >= 1.0);
        assert!(pool_saturation(&capped, [fresh(0.0, 0.0)], 1, 0) < 1.0);
        assert!(pool_saturation(&cfg, std::iter::empty(), 0, 0).is_infinite());
    }

    #[test]
    fn objectives_are_read_and_bad_ones_refused_by_name() {
        let ok = "apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: critical}\nspec: {poolRef: {name: pool}, priority: 10}\n---\napiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: batch}\nspec: {poolRef: {name: pool}, priority: -1}\n---\napiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: plain}\nspec: {poolRef: {name: pool}}\n---\n";
        let m = parse_objectives(ok).unwrap();
        assert_eq!(
            (m["critical"], m["batch"], m["plain"], m.len()),
            (10, -1, 0, 3)
        );
        let o = Objectives::new(m);
        assert_eq!(
            (
                o.resolve(Some("critical")),
                o.resolve(Some("nope")),
                o.resolve(None)
            ),
            (10, 0, 0)
        );
        o.replace_all(HashMap::from([("x".to_string(), 3)]));
        assert_eq!((o.priority("critical"), o.priority("x")), (None, Some(3)));
        for (bad, want) in [
            ("apiVersion: llm-d.ai/v1alpha1\nkind: InferenceObjective\nmetadata: {name: a}\nspec: {poolRef: {name: p}}", "\"a\": apiVersion"),
            ("apiVersion: llm-d.ai/v1alpha2\nkind: InferencePool\nmetadata: {name: a}\nspec: {poolRef: {name: p}}", "\"a\": kind"),
            ("apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: Bad_Name}\nspec: {poolRef: {name: p}}", "metadata.name"),
            ("apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: a}\nspec: {priority: 1}", "\"a\": spec.poolRef.name"),
            ("apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: a}\nspec: {poolRef: {name: p}, priority: 4294967296}", "\"a\": spec.priority"),
            ("apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: a}\nspec: {poolRef: {name: p}, priority: high}", "spec.priority"),
            ("apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: a}", "\"a\": spec is required"),
            ("apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: a}\nspec: {poolRef: {name: p}}\n---\napiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: a}\nspec: {poolRef: {name: p}}", "\"a\": given twice"),
            ("[1, 2", "not YAML"),
            ("- 1\n- 2", "document 1"),
        ] {
            let e = parse_objectives(bad).unwrap_err();
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn band_flags_parse() {
        let d = DEFAULT_BAND_LIMITS;
        assert_eq!(
            parse_band("-1:maxRequests=5", d).unwrap(),
            (
                -1,
                Limits {
                    max_requests: 5,
                    max_bytes: d.max_bytes
                }
            )
        );
        assert_eq!(
            parse_band("10:maxRequests=1,maxBytes=2", d).unwrap().1,
            Limits {
                max_requests: 1,
                max_bytes: 2
            }
        );
        for bad in ["x:maxRequests=1", "1", "1:maxReq=2", "1:maxBytes=-3"] {
            assert!(parse_band(bad, d).is_err(), "{bad}");
        }
    }
}
