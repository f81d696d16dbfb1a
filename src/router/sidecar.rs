//! `llmd sidecar`: llm-d's routing sidecar for disaggregated prefill/decode, in front of the
//! decode worker of its pod.
//!
//! For `POST /v1/completions` and `/v1/chat/completions` carrying `x-prefiller-host-port`
//! (set by llm-d's scheduler):
//! 1. the prefiller must match `--prefiller-allowlist` (none does without it): otherwise the
//!    client gets a 403 and nothing is sent anywhere;
//! 2. the same request goes to that prefiller with `kv_transfer_params.do_remote_decode: true`,
//!    `stream: false`, `max_tokens: 1` (and `max_completion_tokens: 1` for chat), without
//!    `stream_options`;
//! 3. the prefiller's top-level `kv_transfer_params` are put into the original request, which
//!    goes to the decoder unchanged otherwise (its own `stream`, limits and sampling); the
//!    decoder's response streams back untouched;
//! 4. a prefiller answer of 4xx goes back to the client; anything else that fails (5xx, no
//!    connection, no parameters, an answer over [`MAX_PREFILL_ANSWER`]) sends the original
//!    request to the decoder alone, which then prefills itself.
//!
//! Without the header, and for every other route, requests go straight to the decoder. Each
//! request gets an `x-request-id` when it has none. A generation request's body must be a JSON
//! object (else 400); any `kv_transfer_params` the client put in it are removed, so the only
//! ones the decoder sees are the prefiller's. Any `x-llmd-trusted-hop` header the client sent
//! is removed too; with the cluster secret the sidecar sets its own on what it forwards. With
//! `--api-key`, everything but `/health` and `/metrics` needs `Authorization: Bearer KEY`.
use crate::kv::auth::{ClusterSecret, TRUSTED_HOP_HEADER};
use crate::router::sidecar_flags::PeerTls;
use crate::telemetry::SpanKind;
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
    /// The prefillers `x-prefiller-host-port` may name (empty: none).
    pub prefiller_allowlist: PrefillerAllowlist,
    /// Everything but `/health` and `/metrics` needs `Authorization: Bearer` this key.
    pub api_key: Option<String>,
    /// The cluster secret: what the sidecar forwards carries the trusted-hop header.
    pub secret: Option<ClusterSecret>,
    /// How prefillers are reached (llm-d's `--prefiller-use-tls`, `--enable-tls`).
    pub prefiller_tls: PeerTls,
    /// How the decoder is reached (its scheme is `decoder`'s; this says whether its
    /// certificate is verified).
    pub decoder_tls: PeerTls,
}

struct Sidecar {
    config: SidecarConfig,
    /// To the decoder.
    client: reqwest::Client,
    /// To the prefillers (their own TLS verification).
    prefill_client: reqwest::Client,
    /// The trusted-hop header's value, with a cluster secret.
    hop: Option<HeaderValue>,
}

const PREFILLER_HEADER: &str = "x-prefiller-host-port";
const REQUEST_ID: &str = "x-request-id";
/// Largest request body forwarded (the worker's own limit).
const MAX_BODY: usize = 32 << 20;
/// Largest prefiller answer read (one token and its `kv_transfer_params` are a few KiB); a
/// bigger one is a failed prefill, dropped as it arrives.
pub const MAX_PREFILL_ANSWER: usize = 1 << 20;

/// `--prefiller-allowlist`: `host:port` patterns, `*` matching any run of characters in the
/// host or the port (`10.0.*:8000`, `prefill-*.svc:*`, `[fd00::*]:8000`). Hosts compare
/// without case; a bracketed IPv6 address is matched in its canonical form.
#[derive(Clone, Debug, Default)]
pub struct PrefillerAllowlist {
    patterns: Vec<(glob::Pattern, glob::Pattern)>,
}

/// A glob where only `*` is special.
fn star_pattern(s: &str) -> Result<glob::Pattern, String> {
    let escaped: Vec<String> = s.split('*').map(glob::Pattern::escape).collect();
    glob::Pattern::new(&escaped.join("*")).map_err(|e| format!("{s:?}: {e}"))
}

impl PrefillerAllowlist {
    /// Comma-separated `host:port` patterns; an error names the first bad one.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = |why: &str| format!("prefiller pattern {item:?}: {why}");
            let Some((host, port)) = item.rsplit_once(':') else {
                return Err(bad(
                    "expected HOST:PORT (e.g. 10.0.*:8000 or prefill-*.svc:*)",
                ));
            };
            if host.is_empty() || port.is_empty() {
                return Err(bad("expected HOST:PORT with neither empty"));
            }
            if !port.bytes().all(|b| b.is_ascii_digit() || b == b'*') {
                return Err(bad("the port may hold only digits and *"));
            }
            let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(v6) => v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'*'),
                None => host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'*'),
            };
            if !host_ok {
                return Err(bad(
                    "the host may hold only letters, digits, '.', '-' and * (an IPv6 address in brackets)",
                ));
            }
            patterns.push((
                star_pattern(&host.to_ascii_lowercase()).map_err(|e| bad(&e))?,
                star_pattern(port).map_err(|e| bad(&e))?,
            ));
        }
        Ok(Self { patterns })
    }

    /// Every prefiller: what llm-d's sidecar calls without `--enable-ssrf-protection`.
    pub fn any() -> Self {
        Self::parse("*:*").expect("a constant pattern")
    }

    /// Whether `hp` matches a pattern.
    pub fn allows(&self, hp: &HostPort) -> bool {
        let port = hp.port.to_string();
        self.patterns
            .iter()
            .any(|(h, p)| h.matches(&hp.host) && p.matches(&port))
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// A prefiller's address as `x-prefiller-host-port` gives it, checked to be nothing more: a
/// DNS name or a dotted-quad IPv4 address (lowercase), or a bracketed IPv6 address (canonical),
/// and a port. No user info, path, query or other URL syntax gets through to the URL built
/// from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{PREFILLER_HEADER} {s:?}: {why}");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some((v6, port)) = rest.split_once("]:") else {
                return Err(bad("expected [IPV6]:PORT"));
            };
            let addr: std::net::Ipv6Addr = v6.parse().map_err(|_| bad("not an IPv6 address"))?;
            (format!("[{addr}]"), port)
        } else {
            let Some((host, port)) = s.rsplit_once(':') else {
                return Err(bad("expected HOST:PORT"));
            };
            if host.is_empty()
                || host.len() > 253
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            {
                return Err(bad("the host must be a DNS name or an IPv4 address"));
            }
            // A name ending in a number is an IPv4 address to a URL parser, which also reads
            // octal, hex and fewer than four parts ("10.1", "0x7f.1"): only the dotted quad is
            // taken, so that what the allowlist matched is where the request goes.
            let last = host.rsplit('.').next().unwrap_or(host);
            let numeric = !last.is_empty()
                && (last.bytes().all(|b| b.is_ascii_digit())
                    || last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x")));
            if numeric && host.parse::<std::net::Ipv4Addr>().is_err() {
                return Err(bad("an IPv4 address must be four decimal numbers"));
            }
            (host.to_ascii_lowercase(), port)
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(bad("the port must be a number from 1 to 65535")),
        };
        Ok(Self { host, port })
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Serves until SIGINT/SIGTERM.
pub async fn serve(config: SidecarConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    if config.prefiller_allowlist.is_empty() {
        tracing::warn!(
            "no --prefiller-allowlist: requests naming a prefiller in {PREFILLER_HEADER} are refused"
        );
    }
    tracing::info!(%addr, decoder = %config.decoder, "sidecar listening");
    let client = |tls: PeerTls| {
        reqwest::Client::builder()
            .tcp_nodelay(true)
            .danger_accept_invalid_certs(tls == PeerTls::SkipVerify)
            .build()
            .context("building the HTTP client")
    };
    let state = Arc::new(Sidecar {
        client: client(config.decoder_tls)?,
        prefill_client: client(config.prefiller_tls)?,
        hop: config.secret.as_ref().map(hop_header),
        config,
    });
    let app = crate::telemetry::traced(Router::new().fallback(route).with_state(state));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

/// The trusted-hop header's value for `secret` (never logged).
pub(crate) fn hop_header(secret: &ClusterSecret) -> HeaderValue {
    let mut v = HeaderValue::from_str(&secret.hop_token()).expect("hex is a header value");
    v.set_sensitive(true);
    v
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

/// An OpenAI-style error.
fn error(status: StatusCode, kind: &str, code: Option<&str>, message: String) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, axum::Json(body)).into_response()
}

/// The 401 for a missing or wrong API key (as `llmd serve` answers it).
pub(crate) fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        Some("invalid_api_key"),
        "missing or invalid API key: send `Authorization: Bearer <key>`".into(),
    )
}

fn bad_request(message: String) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        None,
        message,
    )
}

async fn route(State(s): State<Arc<Sidecar>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let Some(key) = &s.config.api_key {
        let open = matches!(parts.uri.path(), "/health" | "/metrics");
        if !open && !crate::server::bearer_ok(&parts.headers, key) {
            return unauthorized();
        }
    }
    let mut headers = parts.headers;
    if !headers.contains_key(REQUEST_ID) {
        let id = format!("{:032x}", rand_id());
        if let Ok(v) = HeaderValue::from_str(&id) {
            headers.insert(REQUEST_ID, v);
        }
    }
    // The decoder's request is a child of this one's span (when tracing is on).
    if let Some(cx) = crate::telemetry::current() {
        crate::telemetry::inject(&cx, &mut headers);
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                None,
                e.to_string(),
            )
        }
    };
    let is_generation = parts.method == axum::http::Method::POST
        && (parts.uri.path() == "/v1/completions" || parts.uri.path() == "/v1/chat/completions");
    if !is_generation {
        return s.forward(parts.method, &path, &headers, body).await;
    }
    let mut request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("the request body is not valid JSON: {e}")),
    };
    let Some(fields) = request.as_object_mut() else {
        return bad_request("the request body must be a JSON object".into());
    };
    // Only the prefiller's answer may tell the decoder where the prompt's KV is.
    fields.remove("kv_transfer_params");
    let prefiller = match headers.get(PREFILLER_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) if v.trim().is_empty() => None,
        Some(Ok(v)) => match HostPort::parse(v.trim()) {
            Ok(hp) => Some(hp),
            Err(e) => return bad_request(e),
        },
        Some(Err(_)) => return bad_request(format!("{PREFILLER_HEADER} is not ASCII")),
    };
    if let Some(hp) = prefiller {
        if !s.config.prefiller_allowlist.allows(&hp) {
            tracing::warn!(prefiller = %hp, "prefiller not in --prefiller-allowlist; refused");
            return error(
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("prefiller_not_allowed"),
                format!("prefiller {hp} is not in this sidecar's --prefiller-allowlist"),
            );
        }
        // The prefill call's span, whose context the prefiller gets (when tracing is on).
        let span = crate::telemetry::current().and_then(|cx| {
            use crate::telemetry::Attr;
            let attrs = vec![Attr::new("llmd.prefiller", hp.to_string())];
            crate::telemetry::start(&cx, "sidecar_prefill", SpanKind::Client, attrs)
        });
        let traced;
        let prefill_headers = match &span {
            Some(cx) => {
                traced = with_trace(&headers, cx);
                &traced
            }
            None => &headers,
        };
        let outcome = s.prefill(&hp, &path, prefill_headers, &request).await;
        if let Some(cx) = &span {
            let (what, err) = match &outcome {
                Prefill::Params(_) => ("kv_transfer_params", None),
                Prefill::ClientError(r) => ("client_error", Some(r.status().to_string())),
                Prefill::Fallback(why) => ("fallback", Some(why.clone())),
            };
            crate::telemetry::annotate(
                cx,
                vec![crate::telemetry::Attr::new("llmd.prefill.outcome", what)],
            );
            if let Some(e) = err {
                crate::telemetry::fail(cx, e);
            }
            crate::telemetry::end(cx);
        }
        match outcome {
            Prefill::Params(params) => {
                if let Some(fields) = request.as_object_mut() {
                    fields.insert("kv_transfer_params".into(), params);
                }
            }
            Prefill::ClientError(r) => return r,
            Prefill::Fallback(why) => {
                tracing::warn!(prefiller = %hp, reason = %why, "prefill failed; the decoder prefills itself");
            }
        }
    }
    let body = match serde_json::to_vec(&request) {
        Ok(b) => Bytes::from(b),
        Err(e) => return bad_request(format!("re-encoding the request: {e}")),
    };
    s.forward(parts.method, &path, &headers, body).await
}

enum Prefill {
    /// The prefiller's `kv_transfer_params`.
    Params(Value),
    /// The prefiller refused the request (4xx): the client gets that answer.
    ClientError(Response),
    /// Anything else: decode-only.
    Fallback(String),
}

/// The body of `r`, refused (not read further) past `cap` bytes.
async fn read_capped(mut r: reqwest::Response, cap: usize) -> Result<Bytes, String> {
    if let Some(n) = r.content_length().filter(|&n| n > cap as u64) {
        return Err(format!("an answer of {n} bytes (at most {cap} are read)"));
    }
    let mut buf = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
        if buf.len() + chunk.len() > cap {
            return Err(format!("an answer over {cap} bytes"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}

impl Sidecar {
    /// The headers of what the sidecar sends on: the client's less the hop-by-hop ones, its
    /// `x-prefiller-host-port` and `x-llmd-trusted-hop`, plus the sidecar's own hop header.
    fn outgoing(&self, headers: &HeaderMap) -> HeaderMap {
        let mut h = forwarded(headers, self.hop.as_ref());
        h.remove(PREFILLER_HEADER);
        h
    }

    async fn prefill(
        &self,
        prefiller: &HostPort,
        path: &str,
        headers: &HeaderMap,
        original: &Value,
    ) -> Prefill {
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
        let url = format!("{}://{prefiller}{path}", self.config.prefiller_tls.scheme());
        let sent = self
            .prefill_client
            .post(&url)
            .headers(self.outgoing(headers))
            .timeout(self.config.prefill_timeout)
            .json(&p)
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(e) => return Prefill::Fallback(format!("{url}: {e}")),
        };
        let status = r.status();
        let bytes = match read_capped(r, MAX_PREFILL_ANSWER).await {
            Ok(b) => b,
            Err(e) => return Prefill::Fallback(format!("{url}: {status}: {e}")),
        };
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
        match params {
            Some(params) => Prefill::Params(params),
            None => Prefill::Fallback(format!("{url}: no kv_transfer_params in the answer")),
        }
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
            .headers(self.outgoing(headers))
            .body(body)
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    "sidecar_error",
                    None,
                    format!("decoder {url}: {e}"),
                )
            }
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

/// `headers` with `cx`'s `traceparent`/`tracestate` in place of the caller's.
fn with_trace(headers: &HeaderMap, cx: &crate::telemetry::TraceContext) -> HeaderMap {
    let mut h = headers.clone();
    crate::telemetry::inject(cx, &mut h);
    h
}

/// The client's headers minus those that belong to one connection and any trusted-hop header
/// (a client never gets to forward one), plus `hop` as that header when given.
pub(crate) fn forwarded(headers: &HeaderMap, hop: Option<&HeaderValue>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in headers {
        if !is_hop_by_hop(k)
            && k != axum::http::header::HOST
            && k != axum::http::header::CONTENT_LENGTH
            && k.as_str() != TRUSTED_HOP_HEADER
        {
            out.append(k.clone(), v.clone());
        }
    }
    if let Some(v) = hop {
        out.insert(TRUSTED_HOP_HEADER, v.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> HostPort {
        HostPort::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn prefiller_addresses_are_host_and_port_and_nothing_else() {
        assert_eq!(
            hp("Prefill-0.SVC:8000"),
            HostPort {
                host: "prefill-0.svc".into(),
                port: 8000
            }
        );
        assert_eq!(hp("[0:0::1]:80").to_string(), "[::1]:80");
        for bad in [
            "10.0.0.1",
            "10.0.0.1:",
            ":8000",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.1:+80",
            "10.0.0.1:80/x",
            "10.0.0.1:80@evil:80",
            "user@10.0.0.1:80",
            "evil/x?:80",
            "10.0.0.1 :80",
            "010.0.0.1:80",
            "10.1:80",
            "0x7f.0.0.1:80",
            "10.0.0.0x7f:80",
            "[::1]80",
            "[nope]:80",
        ] {
            assert!(HostPort::parse(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn allowlists_match_host_and_port_with_wildcards() {
        let a = PrefillerAllowlist::parse("10.0.*:8000, prefill-*.svc:*,[fd00::*]:80").unwrap();
        assert!(a.allows(&hp("10.0.3.4:8000")));
        assert!(!a.allows(&hp("10.0.3.4:8001")));
        assert!(!a.allows(&hp("10.1.0.1:8000")));
        assert!(a.allows(&hp("PREFILL-3.svc:1234")));
        assert!(!a.allows(&hp("prefill-3.svc.evil:1234")));
        assert!(a.allows(&hp("[fd00::5]:80")));
        assert!(!a.allows(&hp("[fd01::5]:80")));
        assert!(!PrefillerAllowlist::parse("")
            .unwrap()
            .allows(&hp("10.0.3.4:8000")));
        assert!(PrefillerAllowlist::any().allows(&hp("[fd00::5]:80")));
        assert!(PrefillerAllowlist::any().allows(&hp("prefill-0.svc:8000")));
        // Glob syntax other than * is refused, and so is anything but host:port.
        let b = PrefillerAllowlist::parse("a?c:1").unwrap_err();
        assert!(b.contains("a?c:1"), "{b}");
        for bad in ["10.0.0.1", "host:", ":80", "a/b:80", "a:8x", "[zz]:80"] {
            assert!(PrefillerAllowlist::parse(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn api_keys_are_checked_whole() {
        use crate::server::bearer_ok;
        let mut h = HeaderMap::new();
        assert!(!bearer_ok(&h, "k3y"));
        for (given, ok) in [
            ("Bearer k3y", true),
            ("Bearer k3y ", true),
            ("Bearer k3", false),
            ("Bearer k3yy", false),
            ("Basic k3y", false),
            ("k3y", false),
        ] {
            h.insert(
                axum::http::header::AUTHORIZATION,
                HeaderValue::from_str(given).unwrap(),
            );
            assert_eq!(bearer_ok(&h, "k3y"), ok, "{given:?}");
        }
    }

    #[test]
    fn a_clients_hop_header_never_goes_on() {
        let mut h = HeaderMap::new();
        h.insert(TRUSTED_HOP_HEADER, HeaderValue::from_static("forged"));
        h.insert("x-other", HeaderValue::from_static("1"));
        let out = forwarded(&h, None);
        assert!(out.get(TRUSTED_HOP_HEADER).is_none());
        assert_eq!(out["x-other"], "1");
        let secret = ClusterSecret::new(b"0123456789abcdef0123").unwrap();
        let out = forwarded(&h, Some(&hop_header(&secret)));
        let got = out[TRUSTED_HOP_HEADER].to_str().unwrap();
        assert!(secret.is_trusted_hop(got));
    }
}
