//! `llmd serve`: an OpenAI-compatible HTTP worker, as vLLM's API server is inside llm-d.
//!
//! Life of the process:
//! 1. bind the port, then load the weights on their own thread; `/health` answers 503 until the
//!    engine is up (a Kubernetes readiness probe), API routes answer 503 too;
//! 2. serve `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`;
//! 3. on SIGTERM/SIGINT stop accepting, report 503 on `/health`, let in-flight requests finish
//!    within the shutdown deadline, then drop what is left — which aborts those requests.
//!
//! Invariant: the engine is only reachable through [`AppState::ready`], so no handler runs a
//! request before the model is loaded.
pub(crate) mod chat;
pub(crate) mod completions;
pub mod disagg;
pub mod error;
pub mod kv_events;
mod logprobs;
pub mod metrics;
pub mod openai;
mod stream;
mod text_pool;

use error::{ApiError, ErrorKind};
use metrics::Metrics;

use crate::Engine;
use anyhow::{bail, Context};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest request body: token-id prompts near a long context run to a few MB of JSON.
const MAX_BODY_BYTES: usize = 32 << 20;

/// What `llmd serve` was asked for, besides the engine's own configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The name clients put in `model` and see in `/v1/models`.
    pub served_model_name: String,
    /// The model directory, reported as the model's `root`; also accepted as its name.
    pub model_path: String,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// Most engine requests one API request may create (prompts × `n`).
    pub max_choices_per_request: usize,
    /// When set, a request still running this long after it arrived is aborted (408).
    pub request_timeout: Option<Duration>,
    /// Disaggregated prefill/decode (`--kv-transfer-config`); None: off.
    pub kv_transfer: Option<disagg::KvTransferConfig>,
    /// `--enable-prompt-tokens-details`: report `usage.prompt_tokens_details.cached_tokens`.
    pub prompt_tokens_details: bool,
}

/// Default of [`ServerConfig::max_choices_per_request`]: OpenAI's largest `n` (128) twice over,
/// enough for batch clients, far from a body of a million one-token prompts.
pub const DEFAULT_MAX_CHOICES_PER_REQUEST: usize = 256;

/// How long a worker whose engine died keeps answering (503 on `/health`, 500 on the API)
/// before it exits: long enough for the in-flight requests' error responses to reach their
/// clients and for a probe to see the state.
const DEAD_ENGINE_GRACE: Duration = Duration::from_secs(2);

/// The loaded engine and what exists only once it does.
pub struct Ready {
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    /// Disaggregated prefill/decode (`--kv-transfer-config`), when on.
    pub disagg: Option<disagg::Disagg>,
}

pub struct AppState {
    pub model_name: String,
    model_path: String,
    api_key: Option<String>,
    created: u64,
    ready: OnceLock<Ready>,
    shutting_down: AtomicBool,
    /// Per-process random prefix of response ids, so ids from restarts do not collide.
    id_prefix: u64,
    next_id: AtomicU64,
    max_choices_per_request: usize,
    pub request_timeout: Option<Duration>,
    /// Where prompts are tokenized and chat templates rendered.
    pub text_pool: text_pool::TextPool,
    /// Report cached prompt tokens in `usage` (`--enable-prompt-tokens-details`).
    pub prompt_tokens_details: bool,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AppState {
    fn new(cfg: &ServerConfig) -> std::io::Result<Self> {
        Ok(Self {
            model_name: cfg.served_model_name.clone(),
            model_path: cfg.model_path.clone(),
            api_key: cfg.api_key.clone(),
            created: unix_now(),
            ready: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            id_prefix: std::collections::hash_map::RandomState::new().hash_one(unix_now()),
            next_id: AtomicU64::new(0),
            max_choices_per_request: cfg.max_choices_per_request,
            request_timeout: cfg.request_timeout,
            text_pool: text_pool::TextPool::new(text_pool::default_threads())?,
            prompt_tokens_details: cfg.prompt_tokens_details,
        })
    }

    /// Refuses a request that would create more than `--max-choices-per-request` engine
    /// requests.
    pub fn check_choices(&self, num_prompts: usize, n: usize) -> Result<(), ApiError> {
        let total = num_prompts.saturating_mul(n);
        if total > self.max_choices_per_request {
            let (param, what) = if num_prompts > 1 {
                ("prompt", format!("{num_prompts} prompts × n={n} = {total}"))
            } else {
                ("n", format!("n={n}"))
            };
            return Err(ApiError::invalid(
                param,
                format!(
                    "{what} choices exceed this server's limit of {} per request (--max-choices-per-request)",
                    self.max_choices_per_request
                ),
            )
            .with_code("too_many_choices"));
        }
        Ok(())
    }

    /// The engine, or 503 while the model is loading.
    pub fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| {
            ApiError::new(ErrorKind::Unavailable, "the model is still loading")
                .with_code("model_loading")
        })
    }

    /// Accepts no `model`, the served name, or the model path.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            None => Ok(()),
            Some(m) if m == self.model_name || m == self.model_path => Ok(()),
            Some(m) => Err(
                ApiError::invalid("model", format!("The model `{m}` does not exist."))
                    .with_code("model_not_found"),
            ),
        }
    }

    /// A fresh response id, e.g. `cmpl-<16 hex><8 hex>`.
    pub fn next_id(&self, kind: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{kind}-{:016x}{n:08x}", self.id_prefix)
    }
}

fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The router of `serve`, already ready with `engine`: for driving the API in-process (tests,
/// fuzzing) without binding a port.
pub fn app_with_engine(cfg: &ServerConfig, engine: Engine) -> std::io::Result<Router> {
    let state = Arc::new(AppState::new(cfg)?);
    let metrics = Arc::new(Metrics::new(&state.model_name, engine.limits()));
    // A fresh state's cell is empty, so this set cannot fail.
    let _ = state.ready.set(Ready {
        engine,
        metrics,
        disagg: None,
    });
    Ok(router(state))
}

/// Whether `headers` carry `Authorization: Bearer <key>`, compared in constant time (of the
/// keys' SHA-256, so not even the length leaks).
pub(crate) fn bearer_ok(headers: &axum::http::HeaderMap, key: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let Some(given) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (
        Sha256::digest(given.trim().as_bytes()),
        Sha256::digest(key.as_bytes()),
    );
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        if !bearer_ok(req.headers(), key) {
            return ApiError::new(
                ErrorKind::Authentication,
                "missing or invalid API key: send `Authorization: Bearer <key>`",
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

/// 200 once the engine is up and the server is not draining; 503 otherwise, and for good
/// once the engine has died.
async fn health(State(state): State<Arc<AppState>>) -> Result<StatusCode, ApiError> {
    let ready = state.ready()?;
    if let Some(reason) = ready.engine.dead_reason() {
        return Err(
            ApiError::new(ErrorKind::Unavailable, format!("the engine died: {reason}"))
                .with_code("engine_dead"),
        );
    }
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(
            ApiError::new(ErrorKind::Unavailable, "shutting down").with_code("shutting_down")
        );
    }
    Ok(StatusCode::OK)
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    Ok(axum::Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "llmd",
            "root": state.model_path,
            "parent": null,
            "max_model_len": ready.engine.limits().max_model_len,
        }],
    }))
    .into_response())
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    let stats = ready.engine.stats();
    let mut text = ready.metrics.render(&stats);
    if let Some(d) = &ready.disagg {
        d.render_metrics(
            &mut text,
            ready.metrics.labels(),
            &stats,
            ready.engine.limits(),
        );
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// The address a log line's `addr=` field names (the "listening" line every llmd server logs
/// at start, with its bound port): how a parent that started `--port 0` learns where it listens.
pub fn logged_addr(line: &str) -> Option<String> {
    let i = line.find("addr=")?;
    Some(
        line[i + 5..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect(),
    )
}

/// Runs the server until a signal; `load` builds the engine on its own thread (it may take
/// minutes and shows its own progress).
pub async fn serve<L>(cfg: ServerConfig, load: L) -> anyhow::Result<()>
where
    L: FnOnce() -> anyhow::Result<Engine> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .with_context(|| format!("binding {}:{}", cfg.host, cfg.port))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, model = %cfg.served_model_name, "listening; loading the model");
    let state = Arc::new(AppState::new(&cfg).context("starting the text threads")?);
    let (drain_tx, mut drain_rx) = tokio::sync::watch::channel(false);
    let app = crate::telemetry::traced(router(state.clone()));
    // Streams send one small SSE event per token: without TCP_NODELAY, Nagle's algorithm holds
    // each one back until the client's delayed ACK (~40 ms), which would set the token pace.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = drain_rx.wait_for(|&d| d).await;
            })
            .await
    });
    let (load_tx, load_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("llmd-load".into())
        .spawn(move || {
            let _ = load_tx.send(load());
        })
        .context("spawning the loader thread")?;
    let signal = shutdown_signal();
    tokio::pin!(signal);

    tokio::select! {
        loaded = load_rx => {
            let engine = match loaded {
                Ok(Ok(engine)) => engine,
                Ok(Err(e)) => return Err(e),
                Err(_) => bail!("the loader thread died"),
            };
            let limits = engine.limits().clone();
            if !engine.tokenizer().has_chat_template() {
                tracing::warn!("the model has no chat template: chat requests are rendered as the message contents, one per line");
            }
            let metrics = Arc::new(Metrics::new(&state.model_name, &limits));
            let disagg = match cfg.kv_transfer.clone() {
                Some(c) => {
                    let fabric = match &c.transport {
                        disagg::TransportKind::Rdma { device, .. } => Some(
                            crate::kv::transfer::verbs::open_device(device)?,
                        ),
                        disagg::TransportKind::Tcp => None,
                    };
                    Some(
                        disagg::Disagg::new(c, limits.kv_layout.clone(), fabric)
                            .map_err(|e| anyhow::anyhow!("--kv-transfer-config: {e}"))?,
                    )
                }
                None => None,
            };
            if state.ready.set(Ready { engine, metrics, disagg }).is_err() {
                bail!("the engine was set twice");
            }
            if let Some(d) = state.ready().ok().and_then(|r| r.disagg.as_ref()) {
                tracing::info!(
                    connector = %d.config.connector,
                    role = ?d.config.role,
                    engine_id = %d.engine_id,
                    "disaggregated prefill/decode on"
                );
                if d.config.role.produces() {
                    // On the host it advertises (the pod IP), never every interface.
                    let side = d.start_producer(&state, &d.config.advertise_host).await?;
                    tracing::info!(
                        side_channel = %side,
                        advertised = %format!("{}:{}", d.config.advertise_host, d.config.port),
                        lease_secs = d.config.lease.as_secs_f64(),
                        "KV side channel listening"
                    );
                }
            }
            tracing::info!(
                %addr,
                max_model_len = limits.max_model_len,
                kv_blocks = limits.num_blocks,
                block_size = limits.block_size,
                "ready"
            );
        }
        () = &mut signal => {
            tracing::info!("signal received while loading; exiting");
            return Ok(());
        }
        r = &mut server => {
            r.context("server task")?.context("server")?;
            bail!("the server stopped while the model was loading");
        }
    }

    let dead = async {
        match state.ready.get() {
            Some(r) => r.engine.wait_dead().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = &mut signal => {}
        reason = dead => {
            // vLLM's EngineDeadError: the in-flight requests have their errors; give the
            // responses a moment to go out, then exit non-zero so the pod is restarted.
            tracing::error!(%reason, "the engine died; /health is 503; exiting");
            tokio::time::sleep(DEAD_ENGINE_GRACE).await;
            state.shutting_down.store(true, Ordering::Relaxed);
            let _ = drain_tx.send(true);
            if tokio::time::timeout(Duration::from_secs(1), &mut server).await.is_err() {
                server.abort();
            }
            bail!("the engine died: {reason}");
        }
        r = &mut server => {
            r.context("server task")?.context("server")?;
            return Ok(());
        }
    }
    let in_flight = state
        .ready
        .get()
        .map(|r| r.engine.stats())
        .map_or(0, |s| s.num_running + s.num_waiting);
    tracing::info!(
        in_flight,
        deadline_s = cfg.shutdown_timeout.as_secs_f64(),
        "shutting down: no new connections, draining in-flight requests"
    );
    state.shutting_down.store(true, Ordering::Relaxed);
    let _ = drain_tx.send(true);
    match tokio::time::timeout(cfg.shutdown_timeout, &mut server).await {
        Ok(r) => {
            r.context("server task")?.context("server")?;
            tracing::info!("drained; bye");
        }
        Err(_) => {
            // Dropping the connections drops their request handles, which aborts them.
            server.abort();
            tracing::warn!("shutdown deadline passed; aborting the requests still running");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_and_ids() {
        let s = AppState::new(&ServerConfig {
            host: "127.0.0.1".into(),
            port: 0,
            api_key: None,
            served_model_name: "m".into(),
            model_path: "/x/m".into(),
            shutdown_timeout: Duration::from_secs(1),
            max_choices_per_request: 4,
            request_timeout: None,
            kv_transfer: None,
            prompt_tokens_details: false,
        })
        .unwrap();
        assert!(s.check_model(None).is_ok());
        assert!(s.check_model(Some("m")).is_ok());
        assert!(s.check_model(Some("/x/m")).is_ok());
        let e = s.check_model(Some("gpt-4")).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.code, Some("model_not_found"));
        assert_ne!(s.next_id("cmpl"), s.next_id("cmpl"));
        assert!(s.ready().is_err());
        assert!(s.check_choices(2, 2).is_ok());
        let e = s.check_choices(3, 2).unwrap_err();
        assert_eq!(
            (e.status(), e.param.as_deref()),
            (StatusCode::BAD_REQUEST, Some("prompt"))
        );
        assert!(e.message.contains("limit of 4"), "{}", e.message);
        assert_eq!(
            s.check_choices(1, 5).unwrap_err().param.as_deref(),
            Some("n")
        );
    }
}
