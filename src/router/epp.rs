//! `llmd route --epp-port`: the router as a Gateway API Endpoint Picker — Envoy's external
//! processing service (`envoy.service.ext_proc.v3.ExternalProcessor`) as the Endpoint Picker
//! Protocol asks, answered by the same decision core as the proxy mode ([`super::route`]).
//!
//! One gRPC stream is one HTTP request. Its request headers are held; its body (in as many
//! chunks as the gateway sends, up to `--max-body-bytes`) is reassembled, parsed, checked and
//! keyed like a proxied one; then the router answers the held headers with the picked
//! endpoints (`x-gateway-destination-endpoint` header and `envoy.lb` dynamic metadata, the same
//! ordered, distinct `ip:port,ip:port,…` list, best first; `x-prefiller-host-port` for P/D;
//! the trusted hop's header with a cluster secret) and gives the body back, less the client's
//! `kv_transfer_params`. That is ext_proc's `FULL_DUPLEX_STREAMED` body mode, the one the
//! protocol's reference gateways configure; the response's headers, body and trailers pass
//! through unchanged. The response headers' `envoy.lb` metadata
//! `x-gateway-destination-endpoint-served` names the endpoint that really served (the
//! gateway may have fallen back down the list): the request's in-flight count and the
//! prompt's pending-prefix entries move there.
//!
//! Whatever a request cannot be routed for is an `ImmediateResponse` with an OpenAI-style JSON
//! body: 400 (a body before headers, not JSON, a prompt over `max_model_len`), 401 (no
//! `--api-key` bearer), 404 (an unknown path or model), 413 (over the body limit), 503 (no
//! eligible endpoint: an empty subset hint, one naming no worker, no worker at all).
//!
//! gRPC health (`grpc.health.v1`) answers for `liveness`, `readiness` and the ext_proc service
//! name.
use super::route::PREFILLER_HEADER;
use super::route::{error_body, Decision, InFlight, RouterState, Worker, PENDING_TTL};
use crate::kv::auth::TRUSTED_HOP_HEADER;
use crate::telemetry::SpanKind;
use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue as EnvoyHeader, HeaderValueOption,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation,
    common_response::ResponseStatus,
    external_processor_server::{ExternalProcessor, ExternalProcessorServer},
    processing_request::Request as Msg,
    processing_response::Response as Reply,
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value as PbValue};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

/// The ext_proc service's name, also a health service name.
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
/// The header and metadata key naming the picked endpoints.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// The metadata key naming the endpoint that served.
pub const SERVED: &str = "x-gateway-destination-endpoint-served";
/// The metadata key of the subset hint.
pub const SUBSET: &str = "x-gateway-destination-endpoint-subset";
/// Namespaces of the picked/served endpoints and of the subset hint.
pub const LB_NAMESPACE: &str = "envoy.lb";
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Most endpoints in the answer's fallback list.
const MAX_ENDPOINTS: usize = 4;
/// How long a stream refused with an immediate response waits for the gateway to close it.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);
/// Body chunks given back are at most this big (under gRPC's default 4 MiB message limit, as
/// large bodies need).
const BODY_CHUNK: usize = 62 * 1024;

/// Serves ext_proc and gRPC health on `listener` until SIGINT/SIGTERM.
pub(super) async fn serve(
    state: Arc<RouterState>,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // The worker list has been read once (the datastore is synced) before this runs; there is
    // one replica, so no leader election to wait for.
    for name in ["liveness", "readiness", SERVICE_NAME] {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(ExternalProcessorServer::new(Epp { state }))
        .serve_with_incoming_shutdown(incoming, super::sidecar::shutdown_signal())
        .await?;
    Ok(())
}

struct Epp {
    state: Arc<RouterState>,
}

type Replies =
    Pin<Box<dyn futures_util::Stream<Item = Result<ProcessingResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Epp {
    type ProcessStream = Replies;

    async fn process(
        &self,
        request: tonic::Request<tonic::Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Replies>, tonic::Status> {
        let inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(exchange(self.state.clone(), inbound, tx));
        let out = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (Ok(m), rx))
        });
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

/// One HTTP request's stream, as far as it went.
#[derive(Default)]
struct Exchange {
    /// The request headers, held until the body is in.
    headers: Option<axum::http::HeaderMap>,
    path: String,
    method: String,
    /// `Some` once the subset hint was given: only these `ip:port` are eligible.
    subset: Option<Vec<String>>,
    body: Vec<u8>,
    /// Whether the gateway wants the response body back chunk by chunk (full duplex).
    echo_response_body: bool,
    /// Where the request went, once routed.
    routed: Option<Routed>,
    /// When the request headers came (the request's arrival at the router).
    arrived: Option<Instant>,
    /// A generation request's priority band, once it is counted.
    band: Option<i32>,
    /// The answer's first token, gaps and output tokens, watched in the response body.
    watch: Option<super::bands::ResponseWatch>,
}

struct Routed {
    /// Where the router sent it (and where its in-flight count and pending prefix are).
    worker: Arc<Worker>,
    keys: Vec<u64>,
    _in_flight: InFlight,
    /// Flow control's hold on a place among the requests in flight, until the response ends.
    _admitted: Option<super::flow::Admitted>,
}

/// A request the router refuses: what the gateway answers the client instead.
struct Refusal {
    status: u16,
    /// What the log says.
    message: String,
    /// The OpenAI-style error body the client gets.
    body: serde_json::Value,
}

impl Refusal {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        let message = message.into();
        Refusal {
            status,
            body: error_body(kind, message.clone()),
            message,
        }
    }

    /// Flow control shed the request: the proxy mode's status and body (the reason in `code`).
    fn shed(shed: &super::flow::Shed) -> Self {
        let (status, body) = super::route::shed_error(shed);
        Refusal {
            status: status.as_u16(),
            message: shed.message(),
            body,
        }
    }

    fn reply(&self) -> ProcessingResponse {
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        ProcessingResponse {
            response: Some(Reply::ImmediateResponse(ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(self.status),
                }),
                headers: Some(HeaderMutation {
                    set_headers: vec![set_header("content-type", "application/json")],
                    ..Default::default()
                }),
                body,
                details: format!("llmd_epp_{}", self.status),
                ..Default::default()
            })),
            ..Default::default()
        }
    }
}

async fn exchange(
    state: Arc<RouterState>,
    mut inbound: tonic::Streaming<ProcessingRequest>,
    tx: tokio::sync::mpsc::Sender<ProcessingResponse>,
) {
    let mut ex = Exchange {
        echo_response_body: true,
        ..Default::default()
    };
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            // The gateway closed the stream (the request is over) or broke it.
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "ext_proc stream ended");
                return;
            }
        };
        let stepped = tokio::select! {
            r = step(&state, &mut ex, msg) => r,
            // The gateway dropped the stream (its client left): a request waiting in flow
            // control leaves the queue at once.
            () = tx.closed() => return,
        };
        let replies = match stepped {
            Ok(r) => r,
            Err(refusal) => {
                tracing::info!(
                    status = refusal.status,
                    reason = %refusal.message,
                    "EPP request refused"
                );
                let _ = tx.send(refusal.reply()).await;
                // The gateway stops sending and closes its side; the stream ends then (not
                // before: a reset while the answer is in flight could lose it), or after
                // a while for one that never does.
                let drain = async { while let Ok(Some(_)) = inbound.message().await {} };
                let _ = tokio::time::timeout(DRAIN, drain).await;
                return;
            }
        };
        for r in replies {
            if tx.send(r).await.is_err() {
                return;
            }
        }
    }
}

/// What the router answers one message of the stream with (possibly nothing yet).
async fn step(
    state: &Arc<RouterState>,
    ex: &mut Exchange,
    msg: ProcessingRequest,
) -> Result<Vec<ProcessingResponse>, Refusal> {
    if let Some(pc) = &msg.protocol_config {
        let full_duplex = BodySendMode::FullDuplexStreamed as i32;
        if pc.request_body_mode != full_duplex {
            return Err(Refusal::new(
                500,
                "router_error",
                format!(
                    "llmd's endpoint picker needs the ext_proc request_body_mode \
                     FULL_DUPLEX_STREAMED (got {})",
                    BodySendMode::try_from(pc.request_body_mode)
                        .map_or("an unknown mode", |m| m.as_str_name())
                ),
            ));
        }
        ex.echo_response_body = pc.response_body_mode == full_duplex;
    }
    match msg.request {
        Some(Msg::RequestHeaders(h)) => {
            if ex.headers.is_some() {
                return Err(Refusal::new(
                    400,
                    "invalid_request_error",
                    "request headers twice on one ext_proc stream",
                ));
            }
            ex.arrived = Some(Instant::now());
            request_headers(state, ex, &h, msg.metadata_context.as_ref())?;
            if h.end_of_stream {
                // No body (e.g. GET /v1/models): routed by load alone.
                return route_request(state, ex).await;
            }
            Ok(Vec::new())
        }
        Some(Msg::RequestBody(b)) => {
            if ex.headers.is_none() {
                return Err(Refusal::new(
                    400,
                    "invalid_request_error",
                    "a request body before the request headers",
                ));
            }
            if ex.routed.is_some() {
                return Err(Refusal::new(
                    400,
                    "invalid_request_error",
                    "a request body after the request was routed",
                ));
            }
            if ex.body.len() + b.body.len() > state.cfg.max_body {
                return Err(Refusal::new(
                    413,
                    "invalid_request_error",
                    format!(
                        "the request body is over the router's limit of {} bytes",
                        state.cfg.max_body
                    ),
                ));
            }
            ex.body.extend_from_slice(&b.body);
            if b.end_of_stream {
                return route_request(state, ex).await;
            }
            Ok(Vec::new())
        }
        Some(Msg::RequestTrailers(_)) => {
            if ex.headers.is_none() {
                return Err(Refusal::new(
                    400,
                    "invalid_request_error",
                    "request trailers before the request headers",
                ));
            }
            // The body ended with trailers rather than an end-of-stream chunk.
            let mut out = if ex.routed.is_none() {
                route_request(state, ex).await?
            } else {
                Vec::new()
            };
            out.push(reply(Reply::RequestTrailers(TrailersResponse::default())));
            Ok(out)
        }
        Some(Msg::ResponseHeaders(h)) => {
            served(state, ex, msg.metadata_context.as_ref());
            watch_response(state, ex, &h);
            if h.end_of_stream {
                ex.routed = None;
                ex.watch = None;
            }
            Ok(vec![reply(Reply::ResponseHeaders(HeadersResponse {
                response: Some(CommonResponse::default()),
            }))])
        }
        Some(Msg::ResponseBody(b)) => {
            if let Some(w) = &mut ex.watch {
                w.chunk(&b.body);
            }
            if b.end_of_stream {
                // The response is done: the worker's in-flight count drops, the band's
                // output tokens are counted.
                ex.routed = None;
                ex.watch = None;
            }
            let common = if ex.echo_response_body {
                CommonResponse {
                    body_mutation: Some(BodyMutation {
                        mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                            body: b.body,
                            end_of_stream: b.end_of_stream,
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }
            } else {
                CommonResponse::default()
            };
            Ok(vec![reply(Reply::ResponseBody(BodyResponse {
                response: Some(common),
            }))])
        }
        Some(Msg::ResponseTrailers(_)) => {
            ex.routed = None;
            ex.watch = None;
            Ok(vec![reply(Reply::ResponseTrailers(
                TrailersResponse::default(),
            ))])
        }
        None => Err(Refusal::new(
            400,
            "invalid_request_error",
            "an ext_proc message with no request",
        )),
    }
}

fn reply(r: Reply) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

/// Reads the request headers: the path, the method, the API key and the subset hint.
/// A header's value: Envoy sends it in `raw_value` (bytes) or, older, in `value`.
fn header_value(hv: &EnvoyHeader) -> &[u8] {
    if hv.raw_value.is_empty() {
        hv.value.as_bytes()
    } else {
        &hv.raw_value
    }
}

fn request_headers(
    state: &RouterState,
    ex: &mut Exchange,
    h: &HttpHeaders,
    metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
) -> Result<(), Refusal> {
    let mut map = axum::http::HeaderMap::new();
    for hv in h.headers.iter().flat_map(|m| &m.headers) {
        let value = header_value(hv);
        match hv.key.as_str() {
            ":path" => ex.path = String::from_utf8_lossy(value).into_owned(),
            ":method" => ex.method = String::from_utf8_lossy(value).into_owned(),
            k if k.starts_with(':') => {}
            k => {
                if let (Ok(n), Ok(v)) = (
                    axum::http::HeaderName::from_bytes(k.as_bytes()),
                    axum::http::HeaderValue::from_bytes(value),
                ) {
                    map.append(n, v);
                }
            }
        }
    }
    if let Some(key) = &state.cfg.api_key {
        if !crate::server::bearer_ok(&map, key) {
            return Err(Refusal::new(
                401,
                "authentication_error",
                "a valid API key is required (Authorization: Bearer <key>)",
            ));
        }
    }
    ex.subset = subset_hint(metadata);
    ex.headers = Some(map);
    Ok(())
}

/// The `x-gateway-destination-endpoint-subset` list of the `envoy.lb.subset_hint` filter
/// metadata (`None` when it is not set; `Some(empty)` when set to no endpoint).
fn subset_hint(
    metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
) -> Option<Vec<String>> {
    let v = metadata?
        .filter_metadata
        .get(SUBSET_NAMESPACE)?
        .fields
        .get(SUBSET)?;
    Some(match &v.kind {
        Some(Kind::ListValue(l)) => l
            .values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.trim().to_string()),
                _ => None,
            })
            .collect(),
        // A single string, possibly comma-separated, is read as a list too.
        Some(Kind::StringValue(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    })
}

/// The `envoy.lb` `x-gateway-destination-endpoint-served` metadata.
fn served_endpoint(
    metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
) -> Option<String> {
    match &metadata?
        .filter_metadata
        .get(LB_NAMESPACE)?
        .fields
        .get(SERVED)?
        .kind
    {
        Some(Kind::StringValue(s)) => Some(s.trim().to_string()),
        _ => None,
    }
}

/// A successful generation answer's body is watched for its band's first token, inter-token
/// gaps and output tokens (as the proxy mode does), from the request's arrival at the router.
fn watch_response(state: &Arc<RouterState>, ex: &mut Exchange, h: &HttpHeaders) {
    let (Some(band), Some(arrived)) = (ex.band, ex.arrived) else {
        return;
    };
    let mut status = None;
    let mut sse = false;
    for hv in h.headers.iter().flat_map(|m| &m.headers) {
        let value = header_value(hv);
        match hv.key.as_str() {
            ":status" => {
                status = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u16>().ok())
            }
            "content-type" => sse = value.starts_with(b"text/event-stream"),
            _ => {}
        }
    }
    if status.is_some_and(|s| (200..300).contains(&s)) {
        ex.watch = Some(state.bands.watch(band, arrived, sse));
    }
}

/// The response came from the endpoint the gateway names: the request's in-flight count and
/// its prompt's pending prefix move there when that is not where the router sent it.
fn served(
    state: &RouterState,
    ex: &mut Exchange,
    metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
) {
    let Some(routed) = &ex.routed else {
        return;
    };
    let Some(served) = served_endpoint(metadata) else {
        routed
            .worker
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    };
    if served == routed.worker.spec.host_port() {
        routed
            .worker
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    }
    let Some(w) = state
        .workers()
        .into_iter()
        .find(|w| w.spec.host_port() == served)
    else {
        tracing::warn!(served = %served, "the gateway reports an endpoint the router does not know");
        return;
    };
    tracing::debug!(picked = %routed.worker.name(), served = %w.name(), "served by a fallback endpoint");
    w.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if !routed.keys.is_empty() {
        let mut ix = state.index.lock().unwrap_or_else(|e| e.into_inner());
        ix.unexpect(routed.worker.name(), &routed.keys);
        ix.expect(w.name(), &routed.keys, PENDING_TTL);
    }
    let Some(old) = ex.routed.take() else {
        return;
    };
    ex.routed = Some(Routed {
        _in_flight: InFlight::on(&w),
        worker: w,
        keys: old.keys,
        _admitted: old._admitted,
    });
}

/// The request is in (headers and whole body): checks, keys, picks, and answers the held
/// headers with the endpoints and gives the body back.
async fn route_request(
    state: &Arc<RouterState>,
    ex: &mut Exchange,
) -> Result<Vec<ProcessingResponse>, Refusal> {
    let path = ex.path.split('?').next().unwrap_or("").to_string();
    let generation =
        ex.method == "POST" && (path == "/v1/completions" || path == "/v1/chat/completions");
    let known = generation
        || (ex.method == "GET" && (path == "/v1/models" || path.starts_with("/v1/models/")));
    if !known {
        return Err(Refusal::new(
            404,
            "not_found_error",
            format!("no route {} {path} on the router", ex.method),
        ));
    }
    let header = |name: &str| {
        ex.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let priority = state
        .cfg
        .objectives
        .resolve(header(super::flow::OBJECTIVE_HEADER).as_deref());
    let fairness = header(super::flow::FAIRNESS_HEADER);
    // This exchange's span, under the caller's `traceparent` (tracing on); the worker's
    // request is a child of its decision's, through the header set below.
    let trace = ex
        .headers
        .as_ref()
        .filter(|_| crate::telemetry::enabled())
        .and_then(|h| {
            let attrs = vec![
                crate::telemetry::Attr::new("http.request.method", ex.method.clone()),
                crate::telemetry::Attr::new("url.path", path.clone()),
            ];
            let parent = crate::telemetry::extract(h);
            crate::telemetry::start(&parent, "ext_proc route", SpanKind::Server, attrs)
        })
        .map(crate::telemetry::EndOnDrop);
    let body = std::mem::take(&mut ex.body);
    let (body, prompt_len, keys) = if generation {
        let p = state
            .prepare_request(&path, body.into(), priority)
            .await
            .map_err(|(status, kind, message)| Refusal::new(status.as_u16(), kind, message))?;
        state.bands.arrived(priority, p.prompt_len);
        ex.band = Some(priority);
        (Some(p.body), p.prompt_len, p.keys)
    } else {
        (None, 0, Vec::new())
    };
    // Flow control, as in the proxy mode: waits while the workers are saturated (the stream
    // going away drops this and so the request's place in the queue, see `exchange`).
    let queued = trace.as_ref().map(|_| Instant::now());
    let admitted = if generation {
        let bytes = body.as_ref().map_or(0, |b| b.len());
        match state.admit(priority, fairness.as_deref(), bytes).await {
            Ok(a) => Some(a),
            Err(shed) => return Err(Refusal::shed(&shed)),
        }
    } else {
        None
    };
    let deciding = trace.as_ref().map(|_| Instant::now());
    let queue_wait = queued
        .zip(deciding)
        .filter(|_| generation)
        .map(|(q, d)| d - q);
    let (d, endpoints) = pick(state, ex.subset.as_deref(), prompt_len, &keys)?;
    let decided = trace.as_ref().zip(deciding).and_then(|(t, at)| {
        state.trace_decision(&t.0, &d, &keys, (at, Instant::now()), queue_wait)
    });
    let w = d.worker.clone();
    w.predicted_hit_tokens.fetch_add(
        (d.predicted_blocks * state.cfg.keyer.block_size) as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    ex.routed = Some(Routed {
        _in_flight: state.dispatch(&w, &keys),
        _admitted: admitted,
        worker: w,
        keys,
    });
    let list = endpoints.join(",");
    let mut set = vec![set_header(DESTINATION, &list)];
    let mut remove = Vec::new();
    match &d.prefiller {
        Some(p) => set.push(set_header(PREFILLER_HEADER, p.spec.host_port())),
        None => remove.push(PREFILLER_HEADER.to_string()),
    }
    match state.hop.as_ref().and_then(|h| h.to_str().ok()) {
        Some(hop) => set.push(set_header(TRUSTED_HOP_HEADER, hop)),
        None => remove.push(TRUSTED_HOP_HEADER.to_string()),
    }
    if let Some(b) = &body {
        set.push(set_header("content-length", &b.len().to_string()));
    }
    if let Some(cx) = &decided {
        for (k, v) in crate::telemetry::header_pairs(cx) {
            set.push(set_header(&k, &v));
        }
    }
    let headers = ProcessingResponse {
        response: Some(Reply::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse {
                status: ResponseStatus::Continue as i32,
                header_mutation: Some(HeaderMutation {
                    set_headers: set,
                    remove_headers: remove,
                }),
                clear_route_cache: true,
                ..Default::default()
            }),
        })),
        dynamic_metadata: Some(Struct {
            fields: [(
                LB_NAMESPACE.to_string(),
                PbValue {
                    kind: Some(Kind::StructValue(Struct {
                        fields: [(
                            DESTINATION.to_string(),
                            PbValue {
                                kind: Some(Kind::StringValue(list)),
                            },
                        )]
                        .into(),
                    })),
                },
            )]
            .into(),
        }),
        ..Default::default()
    };
    let mut out = vec![headers];
    if let Some(b) = body {
        let n = b.len().div_ceil(BODY_CHUNK).max(1);
        for (i, chunk) in b
            .chunks(BODY_CHUNK)
            .chain((b.is_empty()).then_some(&b[..]))
            .enumerate()
        {
            out.push(reply(Reply::RequestBody(BodyResponse {
                response: Some(CommonResponse {
                    body_mutation: Some(BodyMutation {
                        mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                            body: chunk.to_vec(),
                            end_of_stream: i + 1 == n,
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
            })));
        }
    }
    Ok(out)
}

/// The decision and its ordered, distinct fallback list (`ip:port`, best first) among the
/// eligible workers (the subset hint's, when given).
fn pick(
    state: &RouterState,
    subset: Option<&[String]>,
    prompt_len: usize,
    keys: &[u64],
) -> Result<(Decision, Vec<String>), Refusal> {
    let (pool, _) = state.destinations();
    let mut excluded: Vec<Arc<Worker>> = match subset {
        Some(s) => pool
            .iter()
            .filter(|w| !s.iter().any(|e| e == w.spec.host_port()))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    if pool.len() == excluded.len() {
        return Err(Refusal::new(
            503,
            "service_unavailable",
            match subset {
                Some([]) => "the subset hint names no endpoint".to_string(),
                Some(s) => format!(
                    "no endpoint of the subset hint ({}) is a worker of this pool",
                    s.join(", ")
                ),
                None => "no worker to route to".to_string(),
            },
        ));
    }
    let Some(d) = state.decide(prompt_len, keys, &excluded) else {
        return Err(Refusal::new(
            503,
            "service_unavailable",
            "no worker to route to",
        ));
    };
    let mut endpoints = vec![d.worker.spec.host_port().to_string()];
    excluded.push(d.worker.clone());
    while endpoints.len() < MAX_ENDPOINTS {
        let Some((w, _, _)) = state.choose(&pool, keys, &excluded) else {
            break;
        };
        let hp = w.spec.host_port().to_string();
        if !endpoints.contains(&hp) {
            endpoints.push(hp);
        }
        excluded.push(w);
    }
    Ok((d, endpoints))
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(EnvoyHeader {
            key: key.to_string(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::google::protobuf::ListValue;

    fn meta(ns: &str, key: &str, v: Kind) -> Metadata {
        Metadata {
            filter_metadata: [(
                ns.to_string(),
                Struct {
                    fields: [(key.to_string(), PbValue { kind: Some(v) })].into(),
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn subset_hint_and_served_endpoint_are_read_from_their_namespaces() {
        let list = Kind::ListValue(ListValue {
            values: ["10.0.0.1:8000", " 10.0.0.2:8000"]
                .iter()
                .map(|s| PbValue {
                    kind: Some(Kind::StringValue(s.to_string())),
                })
                .collect(),
        });
        let m = meta(SUBSET_NAMESPACE, SUBSET, list);
        assert_eq!(
            subset_hint(Some(&m)),
            Some(vec![
                "10.0.0.1:8000".to_string(),
                "10.0.0.2:8000".to_string()
            ])
        );
        assert_eq!(subset_hint(None), None);
        assert_eq!(subset_hint(Some(&Metadata::default())), None);
        // Set but empty: nothing is eligible (a 503), unlike unset.
        let empty = meta(
            SUBSET_NAMESPACE,
            SUBSET,
            Kind::ListValue(ListValue::default()),
        );
        assert_eq!(subset_hint(Some(&empty)), Some(vec![]));
        // The served endpoint is in envoy.lb, not in the hint's namespace.
        let s = meta(
            LB_NAMESPACE,
            SERVED,
            Kind::StringValue("10.0.0.2:8000".into()),
        );
        assert_eq!(served_endpoint(Some(&s)).as_deref(), Some("10.0.0.2:8000"));
        let wrong = meta(SUBSET_NAMESPACE, SERVED, Kind::StringValue("x:1".into()));
        assert_eq!(served_endpoint(Some(&wrong)), None);
    }

    #[test]
    fn a_refusal_is_an_immediate_response_with_an_openai_error() {
        let r = Refusal::new(503, "service_unavailable", "no worker").reply();
        let Some(Reply::ImmediateResponse(i)) = r.response else {
            panic!("not an immediate response");
        };
        assert_eq!(i.status.map(|s| s.code), Some(503));
        let v: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
        assert_eq!(v["error"]["message"], "no worker");
        assert_eq!(v["error"]["type"], "service_unavailable");
    }
}
