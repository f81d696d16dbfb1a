//! OpenTelemetry traces across real processes on loopback (stories260K): a prefill
//! `llmd serve`, a decode `llmd serve`, an `llmd sidecar` in front of the decoder and an
//! `llmd route` with both, all exporting to `tests/tracing.py` (an OTLP/gRPC receiver built on
//! the OpenTelemetry project's own protos over grpcio, not ours) through the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`. One P/D request through the router with a client
//! `traceparent` must come back as one trace: spans from all four services under the client's
//! trace id, every span's parent among them (the root's is the client's span), and the route
//! decision, the sidecar's prefill call, the prefill, the KV pull and the decode with their key
//! attributes. With the variables unset nothing is exported, no exporter thread runs and no
//! connection is made.
mod common;

use common::{args, free_port, python_imports, secret_file, stories, LlmdProcess};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `tests/tracing.py` on a free port, its spans collected as they come.
struct Receiver {
    child: Child,
    port: u16,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start() -> Self {
        let mut child = Command::new("python3")
            .arg(format!("{}/tests/tracing.py", env!("CARGO_MANIFEST_DIR")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning tests/tracing.py");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let first = lines
            .next()
            .expect("the receiver said nothing")
            .expect("reading the receiver");
        let port = first
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("not a port: {first}"));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let into = spans.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a span line that is not JSON ({e}): {line}"));
                into.lock().unwrap().push(v);
            }
        });
        Self { child, port, spans }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans once `done` holds for them; panics with `what` and them after 15 s.
    async fn until(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.spans();
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}; the spans received:\n{}",
                summary(&s)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The spans once one of each `(service, name)` in `expected` has come, every one of them
    /// checked to be in the trace `trace_id` (probes and scrapes are not traced); `what` names
    /// the request.
    async fn trace(&self, what: &str, expected: &[(&str, &str)], trace_id: &str) -> Vec<Value> {
        let spans = self
            .until(&format!("{what}'s spans never all came"), |s| {
                expected
                    .iter()
                    .all(|(svc, n)| s.iter().any(|x| x["service"] == *svc && x["name"] == *n))
            })
            .await;
        for s in &spans {
            assert_eq!(
                s["trace_id"],
                trace_id,
                "a span outside the client's trace:\n{}",
                summary(&spans)
            );
        }
        spans
    }
}

/// The span `name` from the service `svc`; panics, listing `spans`, when there is none.
fn find<'a>(spans: &'a [Value], svc: &str, name: &str) -> &'a Value {
    spans
        .iter()
        .find(|x| x["service"] == svc && x["name"] == name)
        .unwrap_or_else(|| panic!("no {name} span from {svc}:\n{}", summary(spans)))
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn summary(spans: &[Value]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} trace={} span={} parent={} {}",
                s["service"],
                s["name"],
                s["trace_id"],
                s["span_id"],
                s["parent_span_id"],
                s["attributes"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn receiver() -> Option<Receiver> {
    python_imports(
        &[
            "grpc",
            "opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
        ],
        "python3 -m pip install opentelemetry-proto grpcio",
    )
    .then(Receiver::start)
}

/// Every OTLP variable unset but the endpoint and service name (and a short batch delay).
fn otel_env<'a>(endpoint: &'a str, service: &'a str) -> Vec<(&'a str, Option<&'a str>)> {
    let mut e = unset_env();
    e.retain(|(k, _)| *k != "OTEL_EXPORTER_OTLP_ENDPOINT" && *k != "OTEL_SERVICE_NAME");
    e.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", Some(endpoint)),
        ("OTEL_SERVICE_NAME", Some(service)),
        ("OTEL_BSP_SCHEDULE_DELAY", Some("100")),
    ]);
    e
}

fn unset_env() -> Vec<(&'static str, Option<&'static str>)> {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_TRACES_EXPORTER",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ]
    .into_iter()
    .map(|k| (k, None))
    .collect()
}

/// A worker `llmd serve` with `extra` arguments and `env`.
async fn serve(tag: &str, extra: &[&str], env: &[(&str, Option<&str>)]) -> LlmdProcess {
    let mut a = args(&[
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--kv-cache-memory-gb",
        "0.02",
        "--model",
        &stories(),
    ]);
    a.extend(args(extra));
    LlmdProcess::start_env(tag, &a, env, "/health").await
}

/// The TCP connections process `pid` holds to 127.0.0.1:`port` (its socket inodes matched
/// against /proc/net/tcp).
fn connections_to(pid: u32, port: u16) -> usize {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9 && f[2] == want && inodes.contains(f[9])
        })
        .count()
}

/// Whether process `pid` runs the SDK's batch exporter thread
/// (`OpenTelemetry.Traces.BatchProcessor`, cut to 15 bytes in `comm`).
fn has_exporter_thread(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .any(|c| c.starts_with("OpenTelemetry"))
        })
        .unwrap_or(false)
}

fn attr<'a>(s: &'a Value, key: &str) -> &'a Value {
    &s["attributes"][key]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_pd_request_through_router_sidecar_prefiller_and_decoder_is_one_trace() {
    let Some(rx) = receiver() else {
        return;
    };
    let endpoint = rx.endpoint();
    let producer = r#"{"kv_connector": "NixlConnector", "kv_role": "kv_producer"}"#;
    let consumer = r#"{"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}"#;
    let side = free_port().to_string();
    let secret = secret_file().display().to_string();
    let prefill = serve(
        "prefill",
        &[
            "--kv-transfer-config",
            producer,
            "--kv-transfer-port",
            &side,
            "--kv-transfer-secret-file",
            &secret,
        ],
        &otel_env(&endpoint, "test-prefill"),
    )
    .await;
    let decode = serve(
        "decode",
        &[
            "--kv-transfer-config",
            consumer,
            "--kv-transfer-secret-file",
            &secret,
        ],
        &otel_env(&endpoint, "test-decode"),
    )
    .await;
    let decoder_port = decode.base.rsplit(':').next().unwrap().to_string();
    let sidecar = LlmdProcess::start_env(
        "sidecar",
        &args(&[
            "sidecar",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--decoder-port",
            &decoder_port,
            "--prefiller-allowlist",
            "127.0.0.1:*",
            "--kv-transfer-secret-file",
            &secret,
        ]),
        &otel_env(&endpoint, "test-sidecar"),
        "/health",
    )
    .await;
    let router = LlmdProcess::start_env(
        "route",
        &args(&[
            "route",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model",
            &stories(),
            "--prefill-worker",
            &prefill.base,
            "--decode-worker",
            &sidecar.base,
        ]),
        &otel_env(&endpoint, "test-route"),
        "/health",
    )
    .await;

    // A client that traces: its span is the root's parent.
    let (trace_id, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let prompt = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. ".repeat(6);
    let max_tokens = 8;
    let resp = reqwest::Client::new()
        .post(router.url("/v1/completions"))
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .json(&json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("JSON answer");
    assert_eq!(body["usage"]["completion_tokens"], max_tokens, "{body}");

    let services = ["test-route", "test-sidecar", "test-prefill", "test-decode"];
    let expected = [
        ("test-route", "POST /v1/completions"),
        ("test-route", "route_decision"),
        ("test-route", "route_forward"),
        ("test-sidecar", "POST /v1/completions"),
        ("test-sidecar", "sidecar_prefill"),
        ("test-prefill", "POST /v1/completions"),
        ("test-prefill", "llm_request"),
        ("test-prefill", "prefill"),
        ("test-decode", "POST /v1/completions"),
        ("test-decode", "kv_pull"),
        ("test-decode", "llm_request"),
        ("test-decode", "queue_wait"),
        ("test-decode", "prefill"),
        ("test-decode", "decode"),
    ];
    // One request, one trace: the client's; no other spans (probes and scrapes are not traced).
    let spans = rx.trace("the request", &expected, trace_id).await;
    let all = summary(&spans);
    let find = |svc: &str, name: &str| find(&spans, svc, name);
    let seen: HashSet<&str> = spans.iter().filter_map(|s| s["service"].as_str()).collect();
    for svc in services {
        assert!(seen.contains(svc), "no span from {svc}:\n{all}");
    }
    // Every parent is in the set, but the root's, which is the client's span.
    let ids: HashMap<&str, &Value> = spans
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap(), s))
        .collect();
    assert_eq!(ids.len(), spans.len(), "span ids repeat:\n{all}");
    let roots: Vec<&Value> = spans
        .iter()
        .filter(|s| s["parent_span_id"] == client_span)
        .collect();
    assert_eq!(roots.len(), 1, "one span under the client's:\n{all}");
    assert_eq!(roots[0]["service"], "test-route");
    assert_eq!(roots[0]["name"], "POST /v1/completions");
    for s in &spans {
        let p = s["parent_span_id"].as_str().unwrap();
        assert!(
            p == client_span || ids.contains_key(p),
            "the parent of {} ({}) is not in the trace:\n{all}",
            s["name"],
            s["service"]
        );
    }
    let parent_of = |s: &Value| -> &Value { ids[s["parent_span_id"].as_str().unwrap()] };
    // The hops: router → sidecar → prefiller (through the prefill call) and → decoder.
    let forward = find("test-route", "route_forward");
    assert_eq!(forward["kind"], 3, "route_forward is a client span");
    assert_eq!(
        parent_of(find("test-sidecar", "POST /v1/completions"))["span_id"],
        forward["span_id"],
        "{all}"
    );
    let prefill_call = find("test-sidecar", "sidecar_prefill");
    assert_eq!(
        parent_of(find("test-prefill", "POST /v1/completions"))["span_id"],
        prefill_call["span_id"],
        "{all}"
    );
    assert_eq!(
        parent_of(find("test-decode", "POST /v1/completions"))["service"],
        "test-sidecar",
        "{all}"
    );
    // The engine's spans hang from the engine request, which hangs from the HTTP one.
    for svc in ["test-prefill", "test-decode"] {
        let req = find(svc, "llm_request");
        assert_eq!(parent_of(req)["name"], "POST /v1/completions", "{all}");
        assert_eq!(parent_of(find(svc, "prefill"))["span_id"], req["span_id"]);
        for key in ["gen_ai.usage.prompt_tokens", "gen_ai.latency.time_in_queue"] {
            assert!(
                !attr(req, key).is_null(),
                "{svc} llm_request lacks {key}:\n{all}"
            );
        }
    }

    // The route decision: P/D, the sidecar as the worker, the prefiller, every candidate.
    let decision = find("test-route", "route_decision");
    let sidecar_hp = sidecar.host_port();
    assert!(
        attr(decision, "llmd.worker")
            .as_str()
            .is_some_and(|w| w.contains(sidecar_hp)),
        "{decision}"
    );
    assert_eq!(attr(decision, "llmd.pd"), true, "{decision}");
    assert_eq!(
        attr(decision, "llmd.prefiller"),
        prefill.host_port(),
        "{decision}"
    );
    let cands = attr(decision, "llmd.candidates")
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(cands.len(), 1, "one decode candidate: {decision}");
    assert!(
        cands[0]
            .as_str()
            .is_some_and(|c| c.contains("prefix_blocks=")),
        "{decision}"
    );
    assert!(
        attr(decision, "llmd.prompt_blocks").as_i64().unwrap_or(0) > 0,
        "{decision}"
    );
    assert!(
        !attr(decision, "llmd.flow_control.queue_wait_ms").is_null(),
        "{decision}"
    );

    // The sidecar's prefill call got the prefiller's kv_transfer_params.
    assert_eq!(attr(prefill_call, "llmd.prefiller"), prefill.host_port());
    assert_eq!(
        attr(prefill_call, "llmd.prefill.outcome"),
        "kv_transfer_params"
    );

    // The decoder pulled the prompt's KV over TCP, and decoded the tokens asked for.
    let pull = find("test-decode", "kv_pull");
    assert!(
        attr(pull, "llmd.kv.bytes").as_i64().unwrap_or(0) > 0,
        "{pull}"
    );
    assert!(
        attr(pull, "llmd.kv.blocks").as_i64().unwrap_or(0) > 0,
        "{pull}"
    );
    assert_eq!(attr(pull, "llmd.kv.transport"), "tcp", "{pull}");
    assert!(attr(pull, "llmd.kv.fallback_cause").is_null(), "{pull}");
    assert_eq!(
        attr(pull, "llmd.kv.peer").as_str(),
        Some(format!("127.0.0.1:{side}").as_str())
    );
    let decode_span = find("test-decode", "decode");
    assert_eq!(
        attr(decode_span, "llmd.output_tokens"),
        max_tokens,
        "{decode_span}"
    );
    let decode_req = find("test-decode", "llm_request");
    assert!(
        attr(decode_req, "llmd.cached_tokens").as_i64().unwrap_or(0) > 0,
        "the decoder's prompt came from the prefiller: {decode_req}"
    );
    // Spans' times are in order: the pull before the decode.
    assert!(
        pull["end"].as_u64() <= decode_span["start"].as_u64(),
        "{all}"
    );

    // A pull that fails (no prefiller on its port): the decoder prefills itself and the
    // kv_pull span says why, as an error.
    let failing = "0af7651916cd43dd8448eb211c80319c";
    let dead = free_port();
    let resp = reqwest::Client::new()
        .post(decode.url("/v1/completions"))
        .header("traceparent", format!("00-{failing}-b7ad6b7169203331-01"))
        .header("x-llmd-trusted-hop", common::hop_token())
        .json(&json!({
            "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0,
            "kv_transfer_params": {
                "do_remote_decode": false, "do_remote_prefill": true,
                "remote_engine_id": "gone", "remote_request_id": "gone-0",
                "remote_host": "127.0.0.1", "remote_port": dead,
                "remote_transfer_token": "00".repeat(16),
            },
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(
        resp.status(),
        200,
        "a failed pull falls back to a local prefill"
    );
    let spans = rx
        .until("no kv_pull span for the failed pull", |s| {
            s.iter()
                .any(|x| x["trace_id"] == failing && x["name"] == "kv_pull")
        })
        .await;
    let failed = spans
        .iter()
        .find(|x| x["trace_id"] == failing && x["name"] == "kv_pull")
        .unwrap();
    assert_eq!(attr(failed, "llmd.kv.fallback_cause"), "io", "{failed}");
    assert_eq!(attr(failed, "llmd.kv.bytes"), 0, "{failed}");
    assert_eq!(
        failed["status"], 2,
        "the failed pull is an error span: {failed}"
    );

    // Each process exports over its own connection to the receiver, from the SDK's thread.
    for p in [&prefill, &decode, &sidecar, &router] {
        let pid = p.child.id();
        assert!(
            connections_to(pid, rx.port) > 0,
            "{} has no connection to the receiver",
            p.base
        );
        assert!(
            has_exporter_thread(pid),
            "{} runs no exporter thread",
            p.base
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_variables_unset_nothing_is_exported_and_nothing_connects() {
    let Some(rx) = receiver() else {
        return;
    };
    let worker = serve("untraced", &[], &unset_env()).await;
    let resp = reqwest::Client::new()
        .post(worker.url("/v1/completions"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    // Longer than any batch delay: a span would have come by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        rx.spans().is_empty(),
        "spans exported:\n{}",
        summary(&rx.spans())
    );
    let pid = worker.child.id();
    assert!(!has_exporter_thread(pid), "an exporter thread runs");
    assert_eq!(connections_to(pid, rx.port), 0);
    // Nor does it reach for the default endpoint (localhost:4317).
    assert_eq!(connections_to(pid, 4317), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_batched_are_flushed_when_a_worker_shuts_down_and_the_flag_names_the_endpoint()
{
    let Some(rx) = receiver() else {
        return;
    };
    let endpoint = rx.endpoint();
    let mut env = otel_env(&endpoint, "test-flush");
    // A batch delay no test waits for: only the shutdown's flush can send the spans.
    env.retain(|(k, _)| *k != "OTEL_BSP_SCHEDULE_DELAY");
    env.push(("OTEL_BSP_SCHEDULE_DELAY", Some("600000")));
    // The endpoint by vLLM's flag instead of the variable (which names a closed port here).
    env.retain(|(k, _)| *k != "OTEL_EXPORTER_OTLP_ENDPOINT");
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", Some("http://127.0.0.1:9")));
    let mut worker = serve("flush", &["--otlp-traces-endpoint", &endpoint], &env).await;
    let resp = reqwest::Client::new()
        .post(worker.url("/v1/completions"))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().contains_key("content-length"),
        "a traced JSON answer keeps its length"
    );
    resp.bytes().await.expect("body");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.spans().is_empty(), "exported before the batch delay");
    // SIGTERM: a graceful shutdown, which flushes the batch.
    let pid = worker.child.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || {
        let s = worker.child.wait();
        (worker, s)
    })
    .await
    .unwrap();
    worker = status.0;
    assert!(
        status.1.expect("wait").success(),
        "the worker exits cleanly"
    );
    drop(worker);
    let spans = rx
        .until("the batched spans were not flushed at shutdown", |s| {
            ["POST /v1/completions", "llm_request", "decode"]
                .iter()
                .all(|n| s.iter().any(|x| x["name"] == *n))
        })
        .await;
    assert!(spans.iter().all(|s| s["service"] == "test-flush"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_epp_mode_the_ext_proc_headers_carry_the_trace_to_the_worker() {
    let Some(rx) = receiver() else {
        return;
    };
    if !python_imports(
        &["envoy_data_plane", "grpclib"],
        "python3 -m pip install envoy-data-plane grpclib",
    ) {
        return;
    }
    let endpoint = rx.endpoint();
    let worker = serve("epp-worker", &[], &otel_env(&endpoint, "test-epp-worker")).await;
    let epp = free_port();
    let _router = LlmdProcess::start_env(
        "epp",
        &args(&[
            "route",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model",
            &stories(),
            "--epp-port",
            &epp.to_string(),
            "--worker",
            &worker.base,
        ]),
        &otel_env(&endpoint, "test-epp"),
        "/health",
    )
    .await;
    // tests/epp_client.py plays Envoy: the client's traceparent comes in the ext_proc request
    // headers, and the request goes to the worker with the headers the router set.
    let (trace_id, client_span) = ("5af7651916cd43dd8448eb211c80319d", "c7ad6b7169203331");
    let scenarios = json!([{
        "name": "traced",
        "body": {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0},
        "headers": {"traceparent": format!("00-{trace_id}-{client_span}-01")},
    }]);
    let script = format!("{}/tests/epp_client.py", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("python3")
        .args([&script, &format!("127.0.0.1:{epp}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scenarios.to_string().as_bytes())
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("the Envoy stand-in");
    assert!(out.status.success(), "the Envoy stand-in failed");
    let res: Vec<Value> = serde_json::from_slice(&out.stdout).expect("its JSON");
    assert_eq!(res[0]["status"], 200, "{}", res[0]);

    let expected = [
        ("test-epp", "ext_proc route"),
        ("test-epp", "route_decision"),
        ("test-epp-worker", "decode"),
    ];
    let spans = rx.trace("the EPP request", &expected, trace_id).await;
    let all = summary(&spans);
    let find = |svc: &str, name: &str| find(&spans, svc, name);
    let root = find("test-epp", "ext_proc route");
    assert_eq!(root["parent_span_id"], client_span, "{all}");
    assert_eq!(root["kind"], 2, "a server span: {root}");
    let decision = find("test-epp", "route_decision");
    assert_eq!(decision["parent_span_id"], root["span_id"], "{all}");
    assert_eq!(
        attr(decision, "llmd.worker"),
        worker.base.as_str(),
        "{decision}"
    );
    assert_eq!(attr(decision, "llmd.pd"), false, "{decision}");
    // The worker's request hangs from the decision, through the header the router set.
    let served = find("test-epp-worker", "POST /v1/completions");
    assert_eq!(served["parent_span_id"], decision["span_id"], "{all}");
}
