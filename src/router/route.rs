//! `llmd route`: the router in front of the workers — llm-d's endpoint picker as one process.
//!
//! For each completion or chat request it tokenizes the prompt (same `tokenizer.json` and chat
//! template as the workers), keys its full blocks ([`super::index`]), looks up how much of it
//! each worker holds (the index is fed by the workers' KV events, [`super::events`]), scores
//! the healthy workers ([`super::scorers`]: cached prefix, queue, KV usage, from `/metrics`
//! scraped every `scrape_interval` and the router's own in-flight counts) and proxies the
//! request to the best, streaming the answer back untouched. With prefill and decode workers,
//! a prompt whose uncached part is over the P/D threshold goes to the decode worker's sidecar
//! with `x-prefiller-host-port` naming the best prefill worker; otherwise to a decode worker
//! alone (or an aggregated one).
//!
//! A worker that fails (no connection, a 5xx, no answer within the timeout) is taken out for a
//! back-off and the request is sent once more to the next best; one that fails its scrapes
//! three times in a row is dropped from the index until it answers again.
//!
//! What a client cannot do through the router: send `kv_transfer_params` (removed from every
//! generation request) or `x-llmd-trusted-hop` (removed; the router sets its own when it has
//! the cluster secret), reach `/v1/*` without `--api-key`'s key when one is set, or make it
//! route a prompt longer than `max_model_len` (400), or ask for a model not among
//! `--served-model-name` (404). Parsing, tokenizing and keying the prompt run on blocking
//! threads, never on the async ones; the prefix index is bounded
//! ([`super::index::IndexLimits`]).
//!
//! With `--epp-port` the same decision core (`prepare`, `decide`, the pending-prefix
//! `expect`, the in-flight counts) also answers a gateway over Envoy's ext_proc
//! ([`super::epp`]).
use super::bands::BandStats;
use super::events::central::CentralStats;
use super::events::SubStats;
use super::flow::{FlowConfig, FlowController, FlowRequest, Objectives, Shed};
use super::index::{IndexLimits, Keyer, PrefixIndex};
use super::scorers::{self, Candidate, RoutingConfig};
use super::workers::{Role, WorkerSource, WorkerSpec};
use crate::kv::auth::ClusterSecret;
use crate::tokenizer::Tokenizer;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router as Axum;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// What `llmd route` runs with.
pub struct RouteConfig {
    pub host: String,
    pub port: u16,
    pub source: Box<dyn WorkerSource>,
    /// How often the source is asked again (a static list or a watching source: never; a
    /// watching one says when it changed).
    pub refresh: Option<Duration>,
    pub tokenizer: Arc<Tokenizer>,
    pub keyer: Keyer,
    pub routing: RoutingConfig,
    pub scrape_interval: Duration,
    /// Limit on a worker's response headers (the body streams as long as it takes).
    pub timeout: Duration,
    /// How long a failed worker is left out.
    pub backoff: Duration,
    /// `/v1/*` needs `Authorization: Bearer` this key.
    pub api_key: Option<String>,
    /// The cluster secret: what the router forwards carries the trusted-hop header.
    pub secret: Option<ClusterSecret>,
    /// Longest prompt routed, in tokens (longer: 400 from the router).
    pub max_model_len: usize,
    /// Blocks the prefix index holds per worker.
    pub max_index_blocks_per_worker: usize,
    /// Bind one KV events SUB socket here that workers' PUB sockets connect to, each telling
    /// itself by its topic `kv@<host:port>@<model>` ([`super::events::central`]).
    pub kv_events_bind: Option<String>,
    /// The names a request's `model` may give (`--served-model-name`); a request naming
    /// another is refused (404). Never empty.
    pub served_model_names: Vec<String>,
    /// Largest request body read, in bytes (larger: 413).
    pub max_body: usize,
    /// Serve Envoy's ext_proc (the Endpoint Picker Protocol) on this port too.
    pub epp_port: Option<u16>,
    /// Flow control ([`super::flow`]).
    pub flow: FlowConfig,
    /// Priorities by `InferenceObjective` name.
    pub objectives: Arc<Objectives>,
    /// Send a request's non-zero priority to the worker (vLLM's `priority`, negated).
    pub forward_priority: bool,
}

/// Default of `llmd route --max-model-len`.
pub const DEFAULT_MAX_MODEL_LEN: usize = 131_072;

/// What the router scraped from a worker's `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
struct Scraped {
    waiting: f64,
    running: f64,
    kv_usage: f64,
    prefix_hits: f64,
    prefix_queries: f64,
    /// When it was scraped (None: never).
    at: Option<Instant>,
}

pub(super) struct Worker {
    pub(super) spec: WorkerSpec,
    pub(super) in_flight: AtomicUsize,
    scraped: Mutex<Scraped>,
    /// Consecutive failed scrapes.
    scrape_failures: AtomicU32,
    /// Left out until then (a failed request or scrape).
    down_until: Mutex<Option<Instant>>,
    pub(super) requests: AtomicU64,
    failures: AtomicU64,
    pub(super) predicted_hit_tokens: AtomicU64,
    events: Option<(tokio::task::JoinHandle<()>, Arc<SubStats>)>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some((task, _)) = &self.events {
            task.abort();
        }
    }
}

impl Worker {
    pub(super) fn name(&self) -> &str {
        &self.spec.url
    }

    fn up(&self, now: Instant) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|t| t <= now)
    }

    fn take_out(&self, backoff: Duration) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + backoff);
    }
}

#[derive(Default)]
struct Counters {
    /// Decisions by the scorer that made them.
    decisions: Mutex<BTreeMap<&'static str, u64>>,
    disaggregated: AtomicU64,
    aggregated: AtomicU64,
    retries: AtomicU64,
    failed: AtomicU64,
}

pub(super) struct RouterState {
    pub(super) cfg: RouteConfig,
    client: reqwest::Client,
    workers: RwLock<Vec<Arc<Worker>>>,
    pub(super) index: Arc<Mutex<PrefixIndex>>,
    rotation: AtomicUsize,
    counters: Counters,
    /// The trusted-hop header's value, with a cluster secret.
    pub(super) hop: Option<HeaderValue>,
    /// The counters of the bound KV events socket (`--kv-events-bind`).
    central: Option<Arc<CentralStats>>,
    flow: Arc<FlowController>,
    /// Demand per priority band ([`super::bands`]).
    pub(super) bands: Arc<BandStats>,
}

/// Default of `llmd route --max-body-bytes`.
pub const DEFAULT_MAX_BODY: usize = 32 << 20;
const REQUEST_ID: &str = "x-request-id";
pub(super) const PREFILLER_HEADER: &str = "x-prefiller-host-port";
/// How long a prompt the router sent to a worker counts as cached there without an event
/// confirming it.
pub(super) const PENDING_TTL: Duration = Duration::from_secs(30);

/// Serves until SIGINT/SIGTERM; `ready` gets the bound address.
pub async fn serve(
    cfg: RouteConfig,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .with_context(|| format!("binding {}:{}", cfg.host, cfg.port))?;
    let addr = listener.local_addr()?;
    let central = match &cfg.kv_events_bind {
        Some(endpoint) => Some(super::events::central::bind(endpoint).await?),
        None => None,
    };
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let state = Arc::new_cyclic(|me: &std::sync::Weak<RouterState>| RouterState {
        flow: Arc::new(FlowController::new(cfg.flow.clone(), flow_view(me.clone()))),
        client,
        index: Arc::new(Mutex::new(PrefixIndex::with_limits(
            cfg.keyer.clone(),
            IndexLimits {
                max_blocks_per_worker: cfg.max_index_blocks_per_worker,
                ..IndexLimits::default()
            },
        ))),
        hop: cfg.secret.as_ref().map(super::sidecar::hop_header),
        cfg,
        workers: RwLock::new(Vec::new()),
        rotation: AtomicUsize::new(0),
        counters: Counters::default(),
        central: central.as_ref().map(|_| Arc::new(CentralStats::default())),
        bands: Arc::new(BandStats::default()),
    });
    state.sync_workers().await?;
    if let (Some((sub, endpoint)), Some(stats)) = (central, state.central.clone()) {
        tracing::info!(%endpoint, "KV events: SUB socket bound for the workers to connect to");
        tokio::spawn(serve_central(Arc::downgrade(&state), sub, stats));
    }
    tokio::spawn(refresh_loop(state.clone()));
    tokio::spawn(scrape_loop(state.clone()));
    tracing::info!(%addr, workers = state.workers().len(), "router listening");
    if let Some(port) = state.cfg.epp_port {
        let epp = tokio::net::TcpListener::bind((state.cfg.host.as_str(), port))
            .await
            .with_context(|| format!("binding the EPP port {}:{port}", state.cfg.host))?;
        tracing::info!(grpc = %epp.local_addr()?, "endpoint picker (ext_proc) listening");
        let st = state.clone();
        tokio::spawn(async move {
            if let Err(e) = super::epp::serve(st, epp).await {
                tracing::error!(error = %e, "the endpoint picker's gRPC server stopped");
            }
        });
    }
    if let Some(r) = ready {
        let _ = r.send(addr);
    }
    let app = crate::telemetry::traced(
        Axum::new()
            .route("/health", axum::routing::get(health))
            .route("/metrics", axum::routing::get(metrics))
            .fallback(route)
            .with_state(state),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(super::sidecar::shutdown_signal())
        .await?;
    Ok(())
}

impl RouterState {
    pub(super) fn workers(&self) -> Vec<Arc<Worker>> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks the source for the workers: new ones are subscribed to, gone ones dropped (with
    /// what the index held for them).
    async fn sync_workers(&self) -> anyhow::Result<()> {
        let listed = self
            .cfg
            .source
            .list()
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let current = self.workers();
        let mut next = Vec::with_capacity(listed.len());
        for spec in listed {
            if let Some(w) = current.iter().find(|w| w.spec == spec) {
                next.push(w.clone());
                continue;
            }
            tracing::info!(worker = %spec.url, role = spec.role.as_str(), "worker added");
            let events = spec.events.clone().map(|endpoint| {
                let stats = Arc::new(SubStats::default());
                let index = self.index.clone();
                let name = spec.url.clone();
                let task = tokio::spawn(super::events::subscribe(
                    endpoint,
                    spec.replay.clone(),
                    stats.clone(),
                    move |u| {
                        index
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .update(&name, &u)
                    },
                ));
                (task, stats)
            });
            next.push(Arc::new(Worker {
                spec,
                in_flight: AtomicUsize::new(0),
                scraped: Mutex::new(Scraped::default()),
                scrape_failures: AtomicU32::new(0),
                down_until: Mutex::new(None),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                predicted_hit_tokens: AtomicU64::new(0),
                events,
            }));
        }
        for gone in current
            .iter()
            .filter(|w| !next.iter().any(|n| Arc::ptr_eq(n, w)))
        {
            tracing::info!(worker = %gone.name(), "worker removed");
            self.index
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drop_worker(gone.name());
        }
        if let Some(stats) = &self.central {
            stats.retain(|name| next.iter().any(|w| w.name() == name));
        }
        *self.workers.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }
}

/// Feeds the index from the bound KV events socket until the router is gone: each batch goes
/// to the worker its topic names.
async fn serve_central(
    state: std::sync::Weak<RouterState>,
    sub: zeromq::SubSocket,
    stats: Arc<CentralStats>,
) {
    let Some(index) = state.upgrade().map(|s| s.index.clone()) else {
        return;
    };
    let resolve = move |id: &str| {
        let state = state.upgrade()?;
        let workers = state.workers.read().unwrap_or_else(|e| e.into_inner());
        super::events::central::match_worker(
            id,
            workers.iter().map(|w| (w.name(), w.spec.host_port())),
        )
        .map(str::to_string)
    };
    super::events::central::serve(sub, stats, resolve, move |name, u| {
        index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update(name, &u)
    })
    .await;
}

/// Lists the workers again every refresh interval and whenever the source says they changed
/// (a watching source; a static one does neither).
async fn refresh_loop(state: Arc<RouterState>) {
    loop {
        let every = state.cfg.refresh;
        tokio::select! {
            _ = async { match every {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            } } => {}
            _ = state.cfg.source.changed() => {}
        }
        if let Err(e) = state.sync_workers().await {
            tracing::warn!(error = %e, "worker discovery failed; keeping the last list");
        }
    }
}

async fn scrape_loop(state: Arc<RouterState>) {
    loop {
        let workers = state.workers();
        let scrapes = workers.iter().map(|w| scrape(&state, w));
        futures_util::future::join_all(scrapes).await;
        state.flow.metrics_refreshed();
        tokio::time::sleep(state.cfg.scrape_interval).await;
    }
}

async fn scrape(state: &RouterState, w: &Worker) {
    let url = format!("{}/metrics", w.spec.url);
    let got = async {
        let r = state
            .client
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.text().await.ok()
    }
    .await;
    match got {
        Some(text) => {
            let s = Scraped {
                waiting: sample(&text, "vllm:num_requests_waiting").unwrap_or(0.0),
                running: sample(&text, "vllm:num_requests_running").unwrap_or(0.0),
                kv_usage: sample(&text, "vllm:kv_cache_usage_perc").unwrap_or(0.0),
                prefix_hits: sample(&text, "vllm:prefix_cache_hits_total").unwrap_or(0.0),
                prefix_queries: sample(&text, "vllm:prefix_cache_queries_total").unwrap_or(0.0),
                at: Some(Instant::now()),
            };
            *w.scraped.lock().unwrap_or_else(|e| e.into_inner()) = s;
            if w.scrape_failures.swap(0, Relaxed) >= 3 {
                tracing::info!(worker = %w.name(), "worker answers again");
            }
            // A worker that answers its scrape is back (a request's failure still stands
            // until its back-off ends).
        }
        None => {
            let n = w.scrape_failures.fetch_add(1, Relaxed) + 1;
            w.take_out(state.cfg.backoff);
            if n == 3 {
                tracing::warn!(worker = %w.name(), "worker unreachable; dropped from the prefix index");
                state
                    .index
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drop_worker(w.name());
            }
        }
    }
}

/// The sum of `name`'s samples over its label sets in Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    crate::prometheus::sum(text, name)
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (status, axum::Json(error_body(kind, message))).into_response()
}

/// An OpenAI-style error body.
pub(super) fn error_body(kind: &str, message: impl Into<String>) -> Value {
    json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}})
}

async fn health(State(s): State<Arc<RouterState>>) -> Response {
    let now = Instant::now();
    let up = s.workers().iter().filter(|w| w.up(now)).count();
    if up > 0 {
        (StatusCode::OK, axum::Json(json!({"workers_up": up}))).into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "no worker is up",
        )
    }
}

/// A generation request as the router forwards it.
#[derive(Debug)]
pub(super) struct Prepared {
    /// The body without the client's `kv_transfer_params`.
    pub(super) body: axum::body::Bytes,
    /// Tokens of the (first) prompt.
    pub(super) prompt_len: usize,
    /// Keys of its full blocks.
    pub(super) keys: Vec<u64>,
}

/// Why a request is refused before routing: the client's fault.
#[derive(Debug, PartialEq)]
pub(super) enum Refused {
    /// 400: not JSON, not an object, a prompt over `max_model_len`.
    Invalid(String),
    /// 404: a `model` the router does not serve.
    UnknownModel(String),
}

impl Refused {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Refused::Invalid(_) => StatusCode::BAD_REQUEST,
            Refused::UnknownModel(_) => StatusCode::NOT_FOUND,
        }
    }

    /// The OpenAI error type.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Refused::Invalid(_) => "invalid_request_error",
            Refused::UnknownModel(_) => "not_found_error",
        }
    }

    pub(super) fn message(&self) -> &str {
        match self {
            Refused::Invalid(m) | Refused::UnknownModel(m) => m,
        }
    }
}

impl From<String> for Refused {
    fn from(m: String) -> Self {
        Refused::Invalid(m)
    }
}

/// Reads a generation request's body: refuses a `model` not among `models`, drops the
/// client's `kv_transfer_params`, tokenizes the prompts as the workers will (none when the
/// router cannot: the worker answers), refuses one longer than `max_model_len` and keys the
/// first. Runs on a blocking thread. Errors are the client's.
pub(super) fn prepare(
    tok: &Tokenizer,
    keyer: &Keyer,
    max_model_len: usize,
    models: &[String],
    path: &str,
    body: &[u8],
    priority: i32,
) -> Result<Prepared, Refused> {
    let mut v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the request body is not valid JSON: {e}"))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(Refused::Invalid(
            "the request body must be a JSON object".into(),
        ));
    };
    match obj.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if models.iter().any(|n| n == m) => {}
        Some(m) => {
            return Err(Refused::UnknownModel(format!(
                "The model `{}` does not exist (served here: {}).",
                m.as_str().map_or_else(|| m.to_string(), str::to_string),
                models.join(", ")
            )))
        }
    }
    // Only a producer's answer, relayed by a sidecar, may tell a worker where KV is.
    obj.remove("kv_transfer_params");
    // The router sets the worker's priority (vLLM's: lower first) from the objective's
    // (higher first); a client's own would jump the queue.
    obj.remove("priority");
    if priority != 0 {
        obj.insert("priority".into(), json!(-i64::from(priority)));
    }
    let prompts = prompt_tokens(tok, path, &v);
    if let Some(longest) = prompts.iter().map(Vec::len).max() {
        if longest > max_model_len {
            return Err(Refused::Invalid(format!(
                "This model's maximum context length is {max_model_len} tokens. However, the \
                 prompt has {longest} tokens. Please reduce the length of the prompt."
            )));
        }
    }
    let first = prompts.into_iter().next().unwrap_or_default();
    // A cache salt is in the first block's hash on the workers: in its key here too, so one
    // tenant's cached prefix never draws another's requests.
    let salt = crate::kv::block_hash::salt_keys(v["cache_salt"].as_str());
    Ok(Prepared {
        body: serde_json::to_vec(&v)
            .map_err(|e| format!("re-encoding the request: {e}"))?
            .into(),
        prompt_len: first.len(),
        keys: keyer.keys_salted(&first, &salt),
    })
}

/// The prompts' token ids as the workers will see them (none when the body is not a request
/// the router understands: the worker answers it).
fn prompt_tokens(tok: &Tokenizer, path: &str, v: &Value) -> Vec<Vec<u32>> {
    if path == "/v1/chat/completions" {
        let Ok(messages) = serde_json::from_value::<Vec<crate::server::openai::ChatMessageIn>>(
            v["messages"].clone(),
        ) else {
            return Vec::new();
        };
        return crate::server::chat::render(tok, &messages)
            .ok()
            .into_iter()
            .collect();
    }
    let Ok(prompt) =
        serde_json::from_value::<crate::server::openai::PromptField>(v["prompt"].clone())
    else {
        return Vec::new();
    };
    crate::server::completions::tokenize_prompts(tok, prompt).unwrap_or_default()
}

/// Where a request goes.
pub(super) struct Decision {
    pub(super) worker: Arc<Worker>,
    pub(super) prefiller: Option<Arc<Worker>>,
    pub(super) predicted_blocks: usize,
}

impl RouterState {
    /// The best worker of `pool` for `keys` (None when the pool is empty), skipping
    /// `exclude`; workers taken out are used only when no other is left.
    pub(super) fn pick(
        &self,
        pool: &[Arc<Worker>],
        keys: &[u64],
        exclude: &[Arc<Worker>],
    ) -> Option<(Arc<Worker>, usize)> {
        let (w, blocks, decided_by) = self.choose(pool, keys, exclude)?;
        *self
            .counters
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(decided_by)
            .or_default() += 1;
        Some((w, blocks))
    }

    /// [`Self::pick`] without counting the decision (and the scorer that made it).
    pub(super) fn choose(
        &self,
        pool: &[Arc<Worker>],
        keys: &[u64],
        exclude: &[Arc<Worker>],
    ) -> Option<(Arc<Worker>, usize, &'static str)> {
        let now = Instant::now();
        let eligible: Vec<&Arc<Worker>> = pool
            .iter()
            .filter(|w| !exclude.iter().any(|x| Arc::ptr_eq(x, w)))
            .collect();
        let up: Vec<&Arc<Worker>> = eligible.iter().copied().filter(|w| w.up(now)).collect();
        let cands = if up.is_empty() { eligible } else { up };
        if cands.is_empty() {
            return None;
        }
        let (matches, candidates) = self.candidates(&cands, keys);
        let rotation = self.rotation.fetch_add(1, Relaxed);
        let p = scorers::pick(&self.cfg.routing, &candidates, keys.len(), rotation);
        Some((
            cands[p.index].clone(),
            matches[p.index].blocks,
            p.decided_by,
        ))
    }

    /// What the scorers know of each of `cands` for a prompt keyed `keys`, with its cached
    /// prefix.
    fn candidates(
        &self,
        cands: &[&Arc<Worker>],
        keys: &[u64],
    ) -> (Vec<super::index::PrefixMatch>, Vec<Candidate>) {
        let weights = self.cfg.routing.tier_weights;
        let names: Vec<&str> = cands.iter().map(|w| w.name()).collect();
        let matches = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prefix_all(&names, keys, &weights);
        let candidates = cands
            .iter()
            .zip(&matches)
            .map(|(w, m)| {
                let s = *w.scraped.lock().unwrap_or_else(|e| e.into_inner());
                Candidate {
                    waiting: s.waiting,
                    kv_usage: s.kv_usage,
                    in_flight: w.in_flight.load(Relaxed),
                    prefix_weighted: m.weighted,
                }
            })
            .collect();
        (matches, candidates)
    }

    /// The `route_decision` span under `parent` (tracing on): the worker chosen, the
    /// prefiller (P/D) or none, every candidate's cached prefix blocks and scores, and flow
    /// control's queue wait; `took` is when the decision started and ended. Call it before
    /// [`Self::dispatch`], which changes what the candidates look like. Its context.
    pub(super) fn trace_decision(
        &self,
        parent: &crate::telemetry::TraceContext,
        d: &Decision,
        keys: &[u64],
        took: (Instant, Instant),
        queue_wait: Option<Duration>,
    ) -> Option<crate::telemetry::TraceContext> {
        use crate::telemetry::Attr;
        let (pool, _) = self.destinations();
        let refs: Vec<&Arc<Worker>> = pool.iter().collect();
        let (matches, cands) = self.candidates(&refs, keys);
        let scores = scorers::score(&self.cfg.routing, &cands, keys.len());
        let described: Vec<opentelemetry::StringValue> = pool
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let mut line = format!("{} prefix_blocks={}", w.name(), matches[i].blocks);
                for (sc, v) in self.cfg.routing.scorers.iter().zip(&scores) {
                    let _ = write!(line, " {}={:.3}", sc.kind, v[i]);
                }
                line.into()
            })
            .collect();
        let mut attrs = vec![
            Attr::new("llmd.worker", d.worker.name().to_string()),
            Attr::new("llmd.pd", d.prefiller.is_some()),
            Attr::new("llmd.predicted_prefix_blocks", d.predicted_blocks as i64),
            Attr::new("llmd.prompt_blocks", keys.len() as i64),
            Attr::new(
                "llmd.candidates",
                opentelemetry::Value::Array(described.into()),
            ),
        ];
        if let Some(p) = &d.prefiller {
            attrs.push(Attr::new("llmd.prefiller", p.spec.host_port().to_string()));
        }
        if let Some(w) = queue_wait {
            attrs.push(Attr::new(
                "llmd.flow_control.queue_wait_ms",
                w.as_secs_f64() * 1e3,
            ));
        }
        crate::telemetry::record(
            parent,
            "route_decision",
            crate::telemetry::wall(took.0),
            crate::telemetry::wall(took.1),
            attrs,
            None,
        )
    }

    /// The workers a request is sent to (decode workers when there are prefill ones too), and
    /// the prefill workers.
    pub(super) fn destinations(&self) -> (Vec<Arc<Worker>>, Vec<Arc<Worker>>) {
        let all = self.workers();
        let by_role = |r: Role| -> Vec<Arc<Worker>> {
            all.iter().filter(|w| w.spec.role == r).cloned().collect()
        };
        let (prefill, decode) = (by_role(Role::Prefill), by_role(Role::Decode));
        if !prefill.is_empty() && !decode.is_empty() {
            return (decode, prefill);
        }
        let both = by_role(Role::Both);
        (if both.is_empty() { all.clone() } else { both }, Vec::new())
    }

    /// Where a prompt of `prompt_len` tokens whose full blocks have `keys` goes.
    pub(super) fn decide(
        &self,
        prompt_len: usize,
        keys: &[u64],
        exclude: &[Arc<Worker>],
    ) -> Option<Decision> {
        let (pool, prefill) = self.destinations();
        if !prefill.is_empty() {
            let decode = pool;
            let (worker, blocks) = self.pick(&decode, keys, exclude)?;
            let cached = blocks * self.cfg.keyer.block_size;
            let uncached = prompt_len.saturating_sub(cached);
            let prefiller = if uncached > self.cfg.routing.pd_threshold {
                self.pick(&prefill, keys, &[]).map(|(p, _)| p)
            } else {
                None
            };
            let c = if prefiller.is_some() {
                &self.counters.disaggregated
            } else {
                &self.counters.aggregated
            };
            c.fetch_add(1, Relaxed);
            return Some(Decision {
                worker,
                prefiller,
                predicted_blocks: blocks,
            });
        }
        let (worker, blocks) = self.pick(&pool, keys, exclude)?;
        self.counters.aggregated.fetch_add(1, Relaxed);
        Some(Decision {
            worker,
            prefiller: None,
            predicted_blocks: blocks,
        })
    }
}

/// Decrements a worker's in-flight count when the response (or its stream) is done.
pub(super) struct InFlight(Arc<Worker>);

impl InFlight {
    /// Counts one more request in flight on `w` until the guard drops.
    pub(super) fn on(w: &Arc<Worker>) -> Self {
        w.in_flight.fetch_add(1, Relaxed);
        InFlight(w.clone())
    }
}

impl RouterState {
    /// Parses, checks, strips and keys a generation request's body on a blocking thread.
    pub(super) async fn prepare_request(
        self: &Arc<Self>,
        path: &str,
        body: axum::body::Bytes,
        priority: i32,
    ) -> Result<Prepared, (StatusCode, &'static str, String)> {
        let priority = if self.cfg.forward_priority {
            priority
        } else {
            0
        };
        let st = self.clone();
        let p = path.to_string();
        let prepared = tokio::task::spawn_blocking(move || {
            prepare(
                &st.cfg.tokenizer,
                &st.cfg.keyer,
                st.cfg.max_model_len,
                &st.cfg.served_model_names,
                &p,
                &body,
                priority,
            )
        })
        .await;
        match prepared {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(why)) => Err((why.status(), why.kind(), why.message().to_string())),
            Err(e) => Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "router_error",
                format!("reading the request: {e}"),
            )),
        }
    }

    /// Flow control's admission of a generation request of `priority` in the flow
    /// `fairness_id` (`x-gateway-inference-fairness-id`) with a body of `bytes`: waits while
    /// the workers are saturated (dropping the future leaves the queue); the guard holds the
    /// request's place until it is dropped (the response is done).
    pub(super) async fn admit(
        &self,
        priority: i32,
        fairness_id: Option<&str>,
        bytes: usize,
    ) -> Result<super::flow::Admitted, Shed> {
        let req = FlowRequest {
            priority,
            flow_id: fairness_id.unwrap_or(super::flow::DEFAULT_FLOW).to_string(),
            bytes: bytes as u64,
        };
        self.flow.admit(req).await
    }

    /// Records that `keys` go to `w` (requests for the prompt that follow before the worker's
    /// events confirm it go there too) and counts the request in flight there.
    pub(super) fn dispatch(&self, w: &Arc<Worker>, keys: &[u64]) -> InFlight {
        if !keys.is_empty() {
            self.index.lock().unwrap_or_else(|e| e.into_inner()).expect(
                w.name(),
                keys,
                PENDING_TTL,
            );
        }
        InFlight::on(w)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

async fn route(State(s): State<Arc<RouterState>>, req: Request) -> Response {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    // Everything but /health and /metrics (their own routes) needs the key.
    if let Some(key) = &s.cfg.api_key {
        if !crate::server::bearer_ok(&parts.headers, key) {
            return super::sidecar::unauthorized();
        }
    }
    let path = parts.uri.path().to_string();
    let path_q = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_string());
    let body = match axum::body::to_bytes(body, s.cfg.max_body).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                e.to_string(),
            )
        }
    };
    let mut headers = parts.headers;
    if !headers.contains_key(REQUEST_ID) {
        let id = format!("{:032x}", super::sidecar::rand_id());
        if let Ok(v) = HeaderValue::from_str(&id) {
            headers.insert(REQUEST_ID, v);
        }
    }
    let generation = parts.method == Method::POST
        && (path == "/v1/completions" || path == "/v1/chat/completions");
    let known = generation
        || (parts.method == Method::GET
            && (path == "/v1/models" || path.starts_with("/v1/models/")));
    if !known {
        return error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("no route {} {path} on the router", parts.method),
        );
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let priority = s
        .cfg
        .objectives
        .resolve(header(super::flow::OBJECTIVE_HEADER));
    let (body, prompt_len, keys) = if generation {
        match s.prepare_request(&path, body, priority).await {
            Ok(p) => {
                s.bands.arrived(priority, p.prompt_len);
                (p.body, p.prompt_len, p.keys)
            }
            Err((status, kind, why)) => return error(status, kind, why),
        }
    } else {
        (body, 0, Vec::new())
    };
    let trace = crate::telemetry::current();
    let queued = trace.as_ref().map(|_| Instant::now());
    // Waits here while the workers are saturated; a client that leaves drops this future and
    // so its place in the queue.
    let mut admitted = if generation {
        match s
            .admit(priority, header(super::flow::FAIRNESS_HEADER), body.len())
            .await
        {
            Ok(a) => Some(a),
            Err(shed) => return shed_response(&shed),
        }
    } else {
        None
    };
    let queue_wait = queued.filter(|_| generation).map(|t| t.elapsed());
    let mut tried: Vec<Arc<Worker>> = Vec::new();
    for attempt in 0..2 {
        let deciding = trace.as_ref().map(|_| Instant::now());
        let Some(d) = s.decide(prompt_len, &keys, &tried) else {
            break;
        };
        // The decision's span, and the call's, whose context goes to the worker (tracing on).
        let call = trace.as_ref().zip(deciding).and_then(|(cx, t)| {
            s.trace_decision(cx, &d, &keys, (t, Instant::now()), queue_wait);
            let attrs = vec![
                crate::telemetry::Attr::new("llmd.worker", d.worker.name().to_string()),
                crate::telemetry::Attr::new("llmd.attempt", attempt as i64),
            ];
            crate::telemetry::start(
                cx,
                "route_forward",
                crate::telemetry::SpanKind::Client,
                attrs,
            )
            .map(crate::telemetry::EndOnDrop)
        });
        if attempt > 0 {
            s.counters.retries.fetch_add(1, Relaxed);
        }
        let w = d.worker.clone();
        // Where this prompt will be cached: requests for it that follow before the worker's
        // events say so go there too.
        let guard = s.dispatch(&w, &keys);
        let url = format!("{}{path_q}", w.spec.url);
        let mut out_headers = forwarded_with(&headers, d.prefiller.as_deref(), s.hop.as_ref());
        if let Some(c) = &call {
            crate::telemetry::inject(&c.0, &mut out_headers);
        }
        let built = s
            .client
            .request(parts.method.clone(), &url)
            .headers(out_headers)
            .body(body.clone())
            .build();
        let built = match built {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_GATEWAY, "router_error", e.to_string()),
        };
        // Only the wait for the response's headers is bounded: a stream takes as long as it
        // takes.
        let r = match tokio::time::timeout(s.cfg.timeout, s.client.execute(built)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                failed_call(&call, &e.to_string());
                fail(&s, &w, &format!("{url}: {e}"));
                tried.push(w);
                continue;
            }
            Err(_) => {
                failed_call(&call, "no answer within the timeout");
                fail(
                    &s,
                    &w,
                    &format!("{url}: no answer within {:?}", s.cfg.timeout),
                );
                tried.push(w);
                continue;
            }
        };
        let status = r.status();
        if matches!(status.as_u16(), 500 | 502 | 503 | 504) {
            failed_call(&call, status.as_str());
            fail(&s, &w, &format!("{url}: {status}"));
            tried.push(w);
            continue;
        }
        w.requests.fetch_add(1, Relaxed);
        w.predicted_hit_tokens.fetch_add(
            (d.predicted_blocks * s.cfg.keyer.block_size) as u64,
            Relaxed,
        );
        let resp_headers = r.headers().clone();
        let admitted = admitted.take();
        // A generation answer's first token and output tokens, for its band.
        let mut watch = (generation && status.is_success()).then(|| {
            let sse = resp_headers
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.starts_with("text/event-stream"));
            s.bands.watch(priority, arrived, sse)
        });
        let stream = futures_util::StreamExt::map(r.bytes_stream(), move |c| {
            let _keep = (&guard, &admitted, &call);
            if let (Some(w), Ok(bytes)) = (&mut watch, &c) {
                w.chunk(bytes);
            }
            c
        });
        let mut resp = Response::new(Body::from_stream(stream));
        *resp.status_mut() = status;
        for (k, v) in &resp_headers {
            if !super::sidecar::is_hop_by_hop(k) {
                resp.headers_mut().insert(k.clone(), v.clone());
            }
        }
        if let Ok(v) = HeaderValue::from_str(w.name()) {
            resp.headers_mut().insert("x-llmd-worker", v);
        }
        return resp;
    }
    s.counters.failed.fetch_add(1, Relaxed);
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        if tried.is_empty() {
            "no worker to route to".to_string()
        } else {
            format!(
                "every worker tried failed: {}",
                tried
                    .iter()
                    .map(|w| w.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    )
}

/// A request flow control refused: 429 (queue full, waited too long) or 503 (no endpoint), as
/// an OpenAI error whose `code` names the reason.
fn shed_response(shed: &Shed) -> Response {
    let (status, body) = shed_error(shed);
    (status, axum::Json(body)).into_response()
}

/// A request flow control shed: its status (429, or 503 with no endpoint) and OpenAI error
/// body, whose `code` names the reason; the same in both modes.
pub(super) fn shed_error(shed: &Shed) -> (StatusCode, Value) {
    let status = StatusCode::from_u16(shed.status()).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let kind = if status == StatusCode::SERVICE_UNAVAILABLE {
        "service_unavailable"
    } else {
        "rate_limit_error"
    };
    let mut body = error_body(kind, shed.message());
    body["error"]["code"] = json!(shed.outcome());
    (status, body)
}

/// What flow control sees of the workers: each one's scraped queue and KV usage with their age.
fn flow_view(state: std::sync::Weak<RouterState>) -> super::flow::PoolView {
    Box::new(move |f| {
        let Some(s) = state.upgrade() else {
            return;
        };
        let now = Instant::now();
        for w in s.workers.read().unwrap_or_else(|e| e.into_inner()).iter() {
            let sc = *w.scraped.lock().unwrap_or_else(|e| e.into_inner());
            f(super::flow::EndpointLoad {
                waiting: sc.waiting,
                kv_usage: sc.kv_usage,
                age: sc.at.map(|t| now.saturating_duration_since(t)),
            });
        }
    })
}

/// Marks a call to a worker that failed on its span (tracing on).
fn failed_call(call: &Option<crate::telemetry::EndOnDrop>, why: &str) {
    if let Some(c) = call {
        crate::telemetry::fail(&c.0, why);
    }
}

fn fail(s: &RouterState, w: &Worker, why: &str) {
    tracing::warn!(worker = %w.name(), reason = why, backoff_secs = s.cfg.backoff.as_secs_f64(), "worker failed; taken out and the request retried elsewhere");
    w.failures.fetch_add(1, Relaxed);
    w.take_out(s.cfg.backoff);
}

/// What goes to a worker: the client's headers less its hop-by-hop ones, any
/// `x-prefiller-host-port` and `x-llmd-trusted-hop` it sent, plus the router's own of both.
fn forwarded_with(
    headers: &HeaderMap,
    prefiller: Option<&Worker>,
    hop: Option<&HeaderValue>,
) -> HeaderMap {
    let mut h = super::sidecar::forwarded(headers, hop);
    h.remove(PREFILLER_HEADER);
    if let Some(p) = prefiller {
        if let Ok(v) = HeaderValue::from_str(p.spec.host_port()) {
            h.insert(PREFILLER_HEADER, v);
        }
    }
    h
}

/// `f` of a worker's KV event counters: its own subscription's plus the bound socket's.
fn sub_stats(s: &RouterState, w: &Worker, f: impl Fn(&SubStats) -> u64) -> u64 {
    let own = w.events.as_ref().map_or(0, |(_, st)| f(st));
    let central = s.central.as_ref().and_then(|c| c.worker(w.name()));
    own + central.map_or(0, |st| f(&st))
}

async fn metrics(State(s): State<Arc<RouterState>>) -> Response {
    let mut out = String::new();
    let now = Instant::now();
    let workers = s.workers();
    let ix = s.index.lock().unwrap_or_else(|e| e.into_inner());
    type Series<'a> = (&'a str, &'a str, &'a str, &'a dyn Fn(&Worker) -> String);
    let per_worker: [Series; 11] = [
        ("llmd_router:worker_up", "gauge", "1 when the worker is routed to (not in back-off).", &|w| u8::from(w.up(now)).to_string()),
        ("llmd_router:in_flight_requests", "gauge", "Requests sent to the worker that have not finished.", &|w| w.in_flight.load(Relaxed).to_string()),
        ("llmd_router:requests_total", "counter", "Requests the worker answered (any status but a retried 5xx).", &|w| w.requests.load(Relaxed).to_string()),
        ("llmd_router:worker_failures_total", "counter", "Requests to the worker that failed (no connection, 5xx, timeout) and were retried elsewhere.", &|w| w.failures.load(Relaxed).to_string()),
        ("llmd_router:prefix_hit_tokens_predicted_total", "counter", "Prompt tokens the router expected the worker to have cached, summed over the requests it sent there.", &|w| w.predicted_hit_tokens.load(Relaxed).to_string()),
        ("llmd_router:prefix_hit_tokens_reported_total", "counter", "The worker's own vllm:prefix_cache_hits_total, as last scraped.", &|w| w.scraped.lock().unwrap_or_else(|e| e.into_inner()).prefix_hits.to_string()),
        ("llmd_router:prefix_queried_tokens_reported_total", "counter", "The worker's own vllm:prefix_cache_queries_total, as last scraped.", &|w| w.scraped.lock().unwrap_or_else(|e| e.into_inner()).prefix_queries.to_string()),
        ("llmd_router:worker_waiting_requests", "gauge", "The worker's vllm:num_requests_waiting, as last scraped.", &|w| w.scraped.lock().unwrap_or_else(|e| e.into_inner()).waiting.to_string()),
        ("llmd_router:worker_running_requests", "gauge", "The worker's vllm:num_requests_running, as last scraped.", &|w| w.scraped.lock().unwrap_or_else(|e| e.into_inner()).running.to_string()),
        ("llmd_router:index_blocks", "gauge", "KV blocks the prefix index holds for the worker.", &|w| ix.num_blocks(w.name()).to_string()),
        ("llmd_router:kv_event_batches_total", "counter", "KV event batches received from the worker (live and replayed; its own subscription and the bound socket).", &|w| sub_stats(&s, w, |st| st.batches.load(Relaxed) + st.replayed.load(Relaxed)).to_string()),
    ];
    for (name, kind, help, f) in per_worker {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for w in &workers {
            let _ = writeln!(
                out,
                "{name}{{worker=\"{}\",role=\"{}\"}} {}",
                w.name(),
                w.spec.role.as_str(),
                f(w)
            );
        }
    }
    let _ = writeln!(out, "# HELP llmd_router:kv_event_gaps_total Sequence gaps in the workers' KV event streams (each answered by a replay when the worker has a replay socket).\n# TYPE llmd_router:kv_event_gaps_total counter");
    for w in &workers {
        let gaps = sub_stats(&s, w, |st| st.gaps.load(Relaxed));
        let _ = writeln!(
            out,
            "llmd_router:kv_event_gaps_total{{worker=\"{}\"}} {gaps}",
            w.name()
        );
    }
    let _ = writeln!(out, "# HELP llmd_router:kv_event_batches_dropped_total KV event batches not applied: over the size cap (oversized) or not decodable (malformed).\n# TYPE llmd_router:kv_event_batches_dropped_total counter");
    for w in &workers {
        let big = sub_stats(&s, w, |st| st.oversized.load(Relaxed));
        let bad = sub_stats(&s, w, |st| st.malformed.load(Relaxed));
        for (reason, n) in [("oversized", big), ("malformed", bad)] {
            let _ = writeln!(
                out,
                "llmd_router:kv_event_batches_dropped_total{{worker=\"{}\",reason=\"{reason}\"}} {n}",
                w.name()
            );
        }
    }
    if let Some(c) = &s.central {
        let _ = writeln!(out, "# HELP llmd_router:kv_event_unattributed_batches_total Messages on the bound KV events socket (--kv-events-bind) not applied to any worker: the topic names no known worker (unknown_topic), or the message is not [kv@ID@MODEL, seq, payload] (malformed).\n# TYPE llmd_router:kv_event_unattributed_batches_total counter\nllmd_router:kv_event_unattributed_batches_total{{reason=\"unknown_topic\"}} {}\nllmd_router:kv_event_unattributed_batches_total{{reason=\"malformed\"}} {}", c.unknown_topic.load(Relaxed), c.malformed.load(Relaxed));
    }
    let _ = writeln!(out, "# HELP llmd_router:index_evictions_total Blocks dropped from the prefix index because their worker's share (--max-index-blocks-per-worker) was full, least recently used first.\n# TYPE llmd_router:index_evictions_total counter\nllmd_router:index_evictions_total {}", ix.evicted);
    drop(ix);
    let _ = writeln!(out, "# HELP llmd_router:decisions_total Routing decisions by the scorer that made them (the one separating the winner most from the runner-up; tie, round_robin or only_candidate otherwise).\n# TYPE llmd_router:decisions_total counter");
    for (by, n) in s
        .counters
        .decisions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "llmd_router:decisions_total{{decided_by=\"{by}\"}} {n}"
        );
    }
    let c = &s.counters;
    let _ = writeln!(out, "# HELP llmd_router:pd_decisions_total Requests sent disaggregated (through a decode worker's sidecar with a prefiller) or not.\n# TYPE llmd_router:pd_decisions_total counter\nllmd_router:pd_decisions_total{{mode=\"disaggregated\"}} {}\nllmd_router:pd_decisions_total{{mode=\"aggregated\"}} {}", c.disaggregated.load(Relaxed), c.aggregated.load(Relaxed));
    let _ = writeln!(out, "# HELP llmd_router:retries_total Requests sent again to another worker after one failed.\n# TYPE llmd_router:retries_total counter\nllmd_router:retries_total {}", c.retries.load(Relaxed));
    let _ = writeln!(out, "# HELP llmd_router:failed_requests_total Requests no worker could answer.\n# TYPE llmd_router:failed_requests_total counter\nllmd_router:failed_requests_total {}", c.failed.load(Relaxed));
    s.flow.write_metrics(&mut out);
    s.bands.write_metrics(&mut out);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Tokenizer {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/stories260K");
        Tokenizer::from_dir(&dir).expect("the stories260K tokenizer")
    }

    #[test]
    fn prepare_drops_client_transfer_params_and_refuses_long_prompts_and_non_objects() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/stories260K");
        if !dir.exists() {
            eprintln!("skipped: no {}", dir.display());
            return;
        }
        let tok = tiny();
        let keyer = Keyer::new(super::super::index::KeyScheme::Fnv64a, "0", 4);
        let models = ["m".to_string(), "alias".to_string()];
        let body = br#"{"prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9], "max_tokens": 2,
            "kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "x"}}"#;
        let p = prepare(&tok, &keyer, 64, &models, "/v1/completions", body, 0).unwrap();
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert!(v.get("kv_transfer_params").is_none(), "{v}");
        assert_eq!(v["max_tokens"], 2);
        assert_eq!((p.prompt_len, p.keys.len()), (9, 2));
        assert_eq!(p.keys, keyer.keys(&[1, 2, 3, 4, 5, 6, 7, 8, 9]));
        // A cache salt keys the prompt as the workers hash it: other keys, all of them.
        let salted = br#"{"prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9], "cache_salt": "tenant-a"}"#;
        let s = prepare(&tok, &keyer, 64, &models, "/v1/completions", salted, 0).unwrap();
        let salt = ["tenant-a".to_string()];
        assert_eq!(
            s.keys,
            keyer.keys_salted(&[1, 2, 3, 4, 5, 6, 7, 8, 9], &salt)
        );
        assert!(s.keys.iter().zip(&p.keys).all(|(a, b)| a != b));
        // The priority: the router's, negated for vLLM (lower first), never the client's own.
        let own = br#"{"prompt": [1, 2], "priority": -100}"#;
        let v: Value = serde_json::from_slice(
            &prepare(&tok, &keyer, 64, &models, "/v1/completions", own, 10)
                .unwrap()
                .body,
        )
        .unwrap();
        assert_eq!(v["priority"], -10);
        let v: Value = serde_json::from_slice(
            &prepare(&tok, &keyer, 64, &models, "/v1/completions", own, 0)
                .unwrap()
                .body,
        )
        .unwrap();
        assert!(v.get("priority").is_none(), "{v}");
        // Every prompt of a list counts; the limit is on tokens.
        let long = json!({"prompt": [[1, 2], vec![5u32; 65]]}).to_string();
        let e = prepare(
            &tok,
            &keyer,
            64,
            &models,
            "/v1/completions",
            long.as_bytes(),
            0,
        )
        .unwrap_err();
        let Refused::Invalid(e) = e else {
            panic!("{e:?}")
        };
        assert!(
            e.contains("maximum context length is 64") && e.contains("65"),
            "{e}"
        );
        assert!(prepare(
            &tok,
            &keyer,
            65,
            &models,
            "/v1/completions",
            long.as_bytes(),
            0
        )
        .is_ok());
        for bad in [&b"[1,2]"[..], b"\"x\"", b"3", b"null", b"{"] {
            assert!(prepare(&tok, &keyer, 64, &models, "/v1/completions", bad, 0).is_err());
        }
        // What the router cannot tokenize goes on (the worker answers it), still stripped.
        let odd = br#"{"prompt": {"no": 1}, "kv_transfer_params": {}}"#;
        let p = prepare(&tok, &keyer, 64, &models, "/v1/completions", odd, 0).unwrap();
        assert_eq!(p.prompt_len, 0);
        assert!(!String::from_utf8_lossy(&p.body).contains("kv_transfer_params"));
        // The model: one of the served names, or none; another is a 404 naming it.
        for ok in [
            &br#"{"model": "alias", "prompt": [1]}"#[..],
            br#"{"model": null, "prompt": [1]}"#,
        ] {
            assert!(prepare(&tok, &keyer, 64, &models, "/v1/completions", ok, 0).is_ok());
        }
        for bad in [
            &br#"{"model": "gpt-4", "prompt": [1]}"#[..],
            br#"{"model": 7, "prompt": [1]}"#,
        ] {
            let e = prepare(&tok, &keyer, 64, &models, "/v1/chat/completions", bad, 0).unwrap_err();
            assert_eq!(e.status(), StatusCode::NOT_FOUND, "{e:?}");
            assert!(e.message().contains("does not exist") && e.message().contains("alias"));
        }
    }
}
