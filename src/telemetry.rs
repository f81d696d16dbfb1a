//! OpenTelemetry traces: one request is one trace across `llmd route`, `llmd sidecar` and the
//! prefill and decode `llmd serve` workers.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (the
//! standard variables, which llm-d's chart sets; `OTEL_TRACES_EXPORTER=none` turns it off). When
//! on, spans go to that OTLP/gRPC endpoint through the SDK's batch processor (its own thread;
//! `OTEL_BSP_*`), sampled by `OTEL_TRACES_SAMPLER(_ARG)`, named by `OTEL_SERVICE_NAME` (else
//! the process's role: `llmd-route`, `llmd-sidecar`, `llmd-serve`), all read by the SDK itself.
//! W3C `traceparent`/`tracestate` are read from incoming HTTP requests (and the ext_proc
//! request headers of the EPP mode) and written on the outgoing ones.
//!
//! `OTEL_SDK_DISABLED=true` also keeps it off. Only OTLP over gRPC is built in (the project's
//! tonic); `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf` or `http/json` is logged and leaves
//! tracing off.
//!
//! When off nothing is built: no exporter, no thread, no connection; each hook costs one check
//! of [`enabled`]. The engine runs on its own thread, so a worker's engine spans (queue wait,
//! prefill, decode) are made when the request ends, from the times its tracker recorded
//! ([`EngineTimes::emit`]), never held across the scheduler.
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

pub use opentelemetry::trace::{FutureExt, SpanKind};
pub use opentelemetry::{Context as TraceContext, KeyValue as Attr};

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Whether spans are exported (set once, at start-up).
#[inline]
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// The exporter when tracing is on: flushed and stopped by [`Telemetry::shutdown`].
pub struct Telemetry(Option<SdkTracerProvider>);

/// The endpoint the environment names, when tracing is on by it.
fn env_endpoint() -> Option<String> {
    let set = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"))
        || set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    {
        return None;
    }
    set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

impl Telemetry {
    /// Starts exporting when the environment (or `endpoint`, e.g. vLLM's
    /// `--otlp-traces-endpoint`) names an OTLP endpoint; `service` is the service name unless
    /// `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) gives one. Must run
    /// inside the Tokio runtime the process serves on (the gRPC channel lives there). A
    /// configuration that cannot export is logged and leaves tracing off: it never stops the
    /// process from serving.
    pub fn init(service: &str, endpoint: Option<&str>) -> Self {
        let endpoint = endpoint.map(str::to_string).or_else(env_endpoint);
        let Some(endpoint) = endpoint else {
            return Self(None);
        };
        let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_default();
        if !matches!(protocol.trim(), "" | "grpc") {
            tracing::warn!(
                protocol = %protocol,
                "OTEL_EXPORTER_OTLP_PROTOCOL: only grpc is built in; traces are not exported"
            );
            return Self(None);
        }
        use opentelemetry_otlp::WithExportConfig;
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, %endpoint, "OTLP trace exporter not started; traces are not exported");
                return Self(None);
            }
        };
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
                v.split(',')
                    .any(|kv| kv.trim().starts_with("service.name="))
            });
        let mut resource = opentelemetry_sdk::Resource::builder();
        if !named {
            resource = resource.with_service_name(service.to_string());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let _ = TRACER.set(opentelemetry::trace::TracerProvider::tracer(
            &provider, "llmd",
        ));
        tracing::info!(%endpoint, "exporting OpenTelemetry traces (OTLP/gRPC)");
        Self(Some(provider))
    }

    /// Exports what is left and stops the exporter (bounded: a collector that is gone costs at
    /// most a few seconds).
    pub fn shutdown(self) {
        if let Some(p) = self.0 {
            if let Err(e) = p.shutdown_with_timeout(Duration::from_secs(5)) {
                tracing::warn!(error = %e, "flushing the last spans");
            }
        }
    }
}

/// Runs `serve` on `runtime` with tracing set up first (as `service`, to `endpoint` when
/// given, else as the environment says) and flushed after.
pub fn run<F>(
    runtime: &tokio::runtime::Runtime,
    service: &str,
    endpoint: Option<&str>,
    serve: F,
) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let t = {
        let _in = runtime.enter();
        Telemetry::init(service, endpoint)
    };
    let r = runtime.block_on(serve);
    t.shutdown();
    r
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The caller's trace context from `traceparent`/`tracestate` (an empty context when absent).
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// Writes `cx`'s `traceparent`/`tracestate` into `headers`, replacing the caller's.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    headers.remove("traceparent");
    headers.remove("tracestate");
    TraceContextPropagator::new().inject_context(cx, &mut HeadersMut(headers));
}

/// `traceparent`/`tracestate` of `cx`, as (name, value) pairs (for the EPP's header mutation).
pub fn header_pairs(cx: &Context) -> Vec<(String, String)> {
    let mut h = HeaderMap::new();
    inject(cx, &mut h);
    h.iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// A span started now under `parent`, in a context of its own (None when tracing is off).
pub fn start(
    parent: &Context,
    name: &'static str,
    kind: SpanKind,
    attrs: Vec<KeyValue>,
) -> Option<Context> {
    let t = tracer()?;
    let span = t
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attrs)
        .start_with_context(t, parent);
    Some(parent.with_span(span))
}

/// A span under `parent` from `start` to `end`, made whole at once (None when off).
pub fn record(
    parent: &Context,
    name: &'static str,
    start: SystemTime,
    end: SystemTime,
    attrs: Vec<KeyValue>,
    error: Option<String>,
) -> Option<Context> {
    let t = tracer()?;
    let mut span = t
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attrs)
        .start_with_context(t, parent);
    if let Some(e) = error {
        span.set_status(Status::error(e));
    }
    span.end_with_timestamp(end);
    Some(parent.with_remote_span_context(span.span_context().clone()))
}

/// Adds attributes to the span of `cx`.
pub fn annotate(cx: &Context, attrs: Vec<KeyValue>) {
    cx.span().set_attributes(attrs);
}

/// Marks the span of `cx` as failed.
pub fn fail(cx: &Context, why: impl Into<String>) {
    cx.span().set_status(Status::error(why.into()));
}

/// Ends the span of `cx` now.
pub fn end(cx: &Context) {
    cx.span().end();
}

/// The wall-clock time of `t` (spans carry wall-clock times; the engine records `Instant`s).
pub fn wall(t: Instant) -> SystemTime {
    let now = Instant::now();
    let sys = SystemTime::now();
    if t <= now {
        sys - (now - t)
    } else {
        sys + (t - now)
    }
}

/// The context of the request being served (the HTTP server span of [`traced`]), when on.
pub fn current() -> Option<Context> {
    enabled().then(Context::current)
}

/// `app` with a server span per request (parented by the caller's `traceparent`) whose context
/// the handler runs in, ended when the response body is done; `app` itself when off.
pub fn traced(app: axum::Router) -> axum::Router {
    if enabled() {
        app.layer(axum::middleware::from_fn(server_span))
    } else {
        app
    }
}

async fn server_span(req: Request, next: Next) -> Response {
    let Some(t) = tracer() else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_string();
    // Probes and scrapes are not requests anyone traces.
    if path == "/health" || path == "/metrics" {
        return next.run(req).await;
    }
    let parent = extract(req.headers());
    let method = req.method().as_str().to_string();
    let span = t
        .span_builder(format!("{method} {path}"))
        .with_kind(SpanKind::Server)
        .with_attributes([
            KeyValue::new("http.request.method", method),
            KeyValue::new("url.path", path),
        ])
        .start_with_context(t, &parent);
    let cx = parent.with_span(span);
    let resp = next.run(req).with_context(cx.clone()).await;
    let status = resp.status();
    cx.span().set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status.as_u16()),
    ));
    if status.is_server_error() {
        cx.span().set_status(Status::error(status.to_string()));
    }
    // The span ends with the body: a stream is part of the request.
    let (parts, body) = resp.into_parts();
    let body = TracedBody {
        inner: body,
        _span: EndOnDrop(cx),
    };
    Response::from_parts(parts, axum::body::Body::new(body))
}

/// A response body that holds its request's span open until it is done (or dropped), sizes
/// and frames unchanged.
struct TracedBody {
    inner: axum::body::Body,
    _span: EndOnDrop,
}

impl http_body::Body for TracedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Ends the span of its context when dropped.
pub struct EndOnDrop(pub Context);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.span().end();
    }
}

/// When one engine request of a worker went through its stages, for its spans.
#[derive(Clone, Debug)]
pub struct EngineTimes {
    /// The request's context (the worker's HTTP server span).
    pub parent: Context,
    /// Handed to the engine.
    pub submitted: Instant,
    /// First scheduled (so `submitted..scheduled` is its wait in the queue).
    pub scheduled: Option<Instant>,
    /// Its first token (the end of prefill).
    pub first: Option<Instant>,
    /// Prompt tokens it did not compute (prefix cache, tiers, KV pulled from a prefiller).
    pub cached_tokens: usize,
}

impl EngineTimes {
    /// The context of the request being served, when tracing is on.
    pub fn begin() -> Option<Self> {
        Some(Self {
            parent: current()?,
            submitted: Instant::now(),
            scheduled: None,
            first: None,
            cached_tokens: 0,
        })
    }

    /// The engine request's spans, made at its end: `llm_request` with `queue_wait`,
    /// `prefill` and `decode` under it.
    pub fn emit(&self, id: &str, prompt_tokens: usize, output_tokens: usize, finish: &str) {
        let end = Instant::now();
        let mut all = vec![
            KeyValue::new("gen_ai.request.id", id.to_string()),
            KeyValue::new("gen_ai.usage.prompt_tokens", prompt_tokens as i64),
            KeyValue::new("gen_ai.usage.completion_tokens", output_tokens as i64),
            KeyValue::new("llmd.cached_tokens", self.cached_tokens as i64),
            KeyValue::new("llmd.finish_reason", finish.to_string()),
        ];
        if let Some(s) = self.scheduled {
            all.push(KeyValue::new(
                "gen_ai.latency.time_in_queue",
                s.saturating_duration_since(self.submitted).as_secs_f64(),
            ));
        }
        let error = (finish == "abort").then(|| "aborted".to_string());
        let Some(cx) = record(
            &self.parent,
            "llm_request",
            wall(self.submitted),
            wall(end),
            all,
            error,
        ) else {
            return;
        };
        let scheduled = self.scheduled.unwrap_or(self.submitted);
        record(
            &cx,
            "queue_wait",
            wall(self.submitted),
            wall(scheduled),
            vec![],
            None,
        );
        if let Some(first) = self.first {
            record(&cx, "prefill", wall(scheduled), wall(first), vec![], None);
            record(
                &cx,
                "decode",
                wall(first),
                wall(end),
                vec![KeyValue::new("llmd.output_tokens", output_tokens as i64)],
                None,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId};

    #[test]
    fn traceparent_and_tracestate_go_out_as_they_came_in() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert("tracestate", HeaderValue::from_static("vendor=abc"));
        let cx = extract(&h);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        // A child's context replaces the caller's headers, keeping the trace and its state.
        let child = Context::new().with_remote_span_context(SpanContext::new(
            sc.trace_id(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            false,
            sc.trace_state().clone(),
        ));
        inject(&child, &mut h);
        assert_eq!(
            h["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01"
        );
        assert_eq!(h["tracestate"], "vendor=abc");
        let pairs = header_pairs(&child);
        assert!(pairs.contains(&(
            "traceparent".to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01".to_string()
        )));
    }

    #[test]
    fn a_missing_or_malformed_traceparent_is_no_parent() {
        let mut h = HeaderMap::new();
        assert!(!extract(&h).span().span_context().is_valid());
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-zz-00f067aa0ba902b7-01"),
        );
        assert!(!extract(&h).span().span_context().is_valid());
        // Nothing to carry: nothing goes out.
        let mut out = HeaderMap::new();
        inject(&Context::new(), &mut out);
        assert!(out.is_empty());
    }
}
