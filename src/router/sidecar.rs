//! `llmd sidecar`: llm-d's routing sidecar for disaggregated prefill/decode, in front of the
//! decode worker of its pod.
//!
//! For `POST /v1/completions` and `/v1/chat/completions` carrying `x-prefiller-host-port`
//! (set by llm-d's scheduler):
//! 1. the same request goes to that prefiller with `kv_transfer_params.do_remote_decode: true`,
//!    `stream: false`, `max_tokens: 1` (and `max_completion_tokens: 1` for chat), without
//!    `stream_options`;
//! 2. the prefiller's top-level `kv_transfer_params` are put into the original request, which
//!    goes to the decoder unchanged otherwise (its own `stream`, limits and sampling); the
//!    decoder's response streams back untouched;
//! 3. a prefiller answer of 4xx goes back to the client; anything else that fails (5xx, no
//!    connection, no parameters) sends the original request to the decoder alone, which then
//!    prefills itself.
//!
//! Without the header, and for every other route, requests go straight to the decoder. Each
//! request gets an `x-request-id` when it has none.
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Where the sidecar listens and what it fronts.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    pub host: String,
    pub port: u16,
    /// Base URL of the decode worker, e.g. `http://127.0.0.1:8001`.
    pub decoder: String,
    /// Limit on the prefill request.
    pub prefill_timeout: Duration,
}

struct Sidecar {
    config: SidecarConfig,
    client: reqwest::Client,
}

const PREFILLER_HEADER: &str = "x-prefiller-host-port";
const REQUEST_ID: &str = "x-request-id";
/// Largest request body forwarded (the worker's own limit).
const MAX_BODY: usize = 32 << 20;

/// Serves until SIGINT/SIGTERM.
pub async fn serve(config: SidecarConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, decoder = %config.decoder, "sidecar listening");
    let state = Arc::new(Sidecar {
        client: reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?,
        config,
    });
    let app = Router::new().fallback(route).with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn error(status: StatusCode, message: String) -> Response {
    let body = json!({"error": {"message": message, "type": "sidecar_error", "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

async fn route(State(s): State<Arc<Sidecar>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    if !headers.contains_key(REQUEST_ID) {
        let id = format!("{:032x}", rand_id());
        if let Ok(v) = HeaderValue::from_str(&id) {
            headers.insert(REQUEST_ID, v);
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
    };
    let is_generation = parts.method == axum::http::Method::POST
        && (parts.uri.path() == "/v1/completions" || parts.uri.path() == "/v1/chat/completions");
    let prefiller = headers
        .get(PREFILLER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match (is_generation, prefiller) {
        (true, Some(p)) => match s.prefill(&p, &path, &headers, &body).await {
            Prefill::Params(body) => body,
            Prefill::ClientError(r) => return r,
            Prefill::Fallback(why) => {
                tracing::warn!(prefiller = %p, reason = %why, "prefill failed; the decoder prefills itself");
                body
            }
        },
        _ => body,
    };
    s.forward(parts.method, &path, &headers, body).await
}

enum Prefill {
    /// The original request with the prefiller's `kv_transfer_params`.
    Params(Bytes),
    /// The prefiller refused the request (4xx): the client gets that answer.
    ClientError(Response),
    /// Anything else: decode-only.
    Fallback(String),
}

impl Sidecar {
    async fn prefill(
        &self,
        prefiller: &str,
        path: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Prefill {
        let Ok(original) = serde_json::from_slice::<Value>(body) else {
            // Not JSON: the decoder answers it with a proper 400.
            return Prefill::Fallback("the request body is not JSON".into());
        };
        let mut p = original.clone();
        p["kv_transfer_params"] = json!({
            "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null,
        });
        p["stream"] = json!(false);
        p["max_tokens"] = json!(1);
        if path.starts_with("/v1/chat/completions") {
            p["max_completion_tokens"] = json!(1);
        }
        if let Some(o) = p.as_object_mut() {
            o.remove("stream_options");
        }
        let url = format!("http://{prefiller}{path}");
        let sent = self
            .client
            .post(&url)
            .headers(forwarded(headers))
            .timeout(self.config.prefill_timeout)
            .json(&p)
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(e) => return Prefill::Fallback(format!("{url}: {e}")),
        };
        let status = r.status();
        let bytes = r.bytes().await.unwrap_or_default();
        if status.is_client_error() {
            let mut resp = Response::new(Body::from(bytes));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Prefill::ClientError(resp);
        }
        if !status.is_success() {
            return Prefill::Fallback(format!("{url}: {status}"));
        }
        let params = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .map(|v| v["kv_transfer_params"].clone())
            .filter(|p| p.is_object());
        let Some(params) = params else {
            return Prefill::Fallback(format!("{url}: no kv_transfer_params in the answer"));
        };
        let mut decode = original;
        decode["kv_transfer_params"] = params;
        Prefill::Params(Bytes::from(serde_json::to_vec(&decode).unwrap_or_default()))
    }

    /// Sends the request to the decoder and streams its answer back as it comes.
    async fn forward(
        &self,
        method: axum::http::Method,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let url = format!("{}{path}", self.config.decoder);
        let sent = self
            .client
            .request(method, &url)
            .headers(forwarded(headers))
            .body(body)
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_GATEWAY, format!("decoder {url}: {e}")),
        };
        let status = r.status();
        let headers = r.headers().clone();
        let mut resp = Response::new(Body::from_stream(r.bytes_stream()));
        *resp.status_mut() = status;
        for (k, v) in &headers {
            if !is_hop_by_hop(k) {
                resp.headers_mut().insert(k.clone(), v.clone());
            }
        }
        resp
    }
}

/// The client's headers minus those that belong to one connection.
pub(crate) fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in headers {
        if !is_hop_by_hop(k)
            && k != axum::http::header::HOST
            && k != axum::http::header::CONTENT_LENGTH
        {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

pub(crate) fn is_hop_by_hop(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
    )
}

/// A request id: time and a process-wide counter, mixed.
pub(crate) fn rand_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = NEXT.fetch_add(1, Ordering::Relaxed) as u128;
    let pid = std::process::id() as u128;
    xxhash_rust::xxh3::xxh3_128(&(t ^ (n << 64) ^ (pid << 96)).to_le_bytes())
}
