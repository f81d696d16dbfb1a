//! `llmd sidecar` as a process on loopback, between a client and fake decode and prefill
//! workers that record what reaches them: the prefiller allowlist (a refused prefiller gets
//! nothing, not even a connection), the cap on a prefiller's answer, JSON bodies that are not
//! objects, the client's `kv_transfer_params` and trusted-hop header never reaching a worker,
//! and `--api-key`.
mod common;
mod fake_http;

use axum::body::Body;
use axum::response::Response;
use common::LlmdProcess;
use fake_http::{json as answer_json, Fake, Seen};
use llmd::kv::auth::{ClusterSecret, TRUSTED_HOP_HEADER};
use serde_json::{json, Value};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A decode worker that answers every completion with `{"text": "decoded"}`.
async fn decoder() -> Fake {
    Fake::start(|_| answer_json(json!({"choices": [{"index": 0, "text": "decoded"}]}))).await
}

/// `llmd sidecar` in front of `decoder`, with `extra` arguments.
async fn sidecar(decoder: &Fake, extra: &[&str]) -> LlmdProcess {
    let port = decoder.port.to_string();
    let mut a = args(&[
        "sidecar",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--decoder-port",
        &port,
        "--prefill-timeout",
        "2",
    ]);
    a.extend(args(extra));
    LlmdProcess::start("sidecar", &a, "/health").await
}

/// POSTs `body` (raw) to the sidecar with `headers`: status and body as JSON.
async fn post(s: &LlmdProcess, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req
        .send()
        .await
        .expect("the sidecar answered (it did not drop the connection)");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

fn assert_openai_error(v: &Value) {
    assert!(
        v["error"]["message"].is_string() && v["error"]["type"].is_string(),
        "not an OpenAI error body: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefiller_outside_the_allowlist_is_refused_and_nothing_is_sent() {
    let d = decoder().await;
    // What a client would like the sidecar to call: a listener nobody accepts on, so a
    // connection attempt would wait in its backlog.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_hp = target.local_addr().unwrap().to_string();
    let other = common::free_port();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 4}).to_string();
    // Without --prefiller-allowlist no prefiller is allowed.
    let open = sidecar(&d, &[]).await;
    let (status, v) = post(&open, &body, &[("x-prefiller-host-port", &target_hp)]).await;
    assert_eq!(status, 403, "{v}");
    assert_openai_error(&v);
    assert_eq!(v["error"]["code"], "prefiller_not_allowed", "{v}");
    // With one, only what it matches; tricks that would smuggle another host into the URL are
    // not addresses at all (400).
    let allow = format!("127.0.0.1:{other},localhost:*");
    let listed = sidecar(&d, &["--prefiller-allowlist", &allow]).await;
    let (status, v) = post(&listed, &body, &[("x-prefiller-host-port", &target_hp)]).await;
    assert_eq!(status, 403, "{v}");
    assert_openai_error(&v);
    for trick in [
        format!("127.0.0.1:{other}@{target_hp}"),
        format!("127.0.0.1:{other}/@{target_hp}"),
        format!("localhost:{other}@{target_hp}"),
        format!("{target_hp}#localhost:{other}"),
    ] {
        let (status, v) = post(&listed, &body, &[("x-prefiller-host-port", &trick)]).await;
        assert_eq!(status, 400, "{trick}: {v}");
        assert_openai_error(&v);
    }
    // The sidecar answered before anything could connect: nothing is waiting on the target,
    // and the decoder got nothing either.
    target.set_nonblocking(true).unwrap();
    match target.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the refused prefiller was connected to: {other:?}"),
    }
    assert!(d.requests().is_empty(), "{:?}", d.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefillers_answer_is_capped_and_bodies_must_be_json_objects() {
    let d = decoder().await;
    // A prefiller whose answer to the prompt "big" is 2 MiB (streamed, no length up front)
    // with valid parameters at its start.
    let p = Fake::start(|s: &Seen| {
        let params = json!({"do_remote_prefill": true, "remote_engine_id": "p1"});
        if s.json()["prompt"] == "big" {
            let head = format!(r#"{{"kv_transfer_params": {params}, "pad": ""#);
            let chunks = std::iter::once(head)
                .chain((0..32).map(|_| "x".repeat(64 << 10)))
                .chain(std::iter::once("\"}".to_string()))
                .map(Ok::<_, std::io::Error>);
            let mut r = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        } else {
            answer_json(json!({"choices": [{"text": "x"}], "kv_transfer_params": params}))
        }
    })
    .await;
    let s = sidecar(&d, &["--prefiller-allowlist", &p.host_port]).await;
    let prefiller = [("x-prefiller-host-port", p.host_port.as_str())];
    let (status, v) = post(&s, r#"{"prompt": "small", "max_tokens": 4}"#, &prefiller).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = post(&s, r#"{"prompt": "big", "max_tokens": 4}"#, &prefiller).await;
    assert_eq!(status, 200, "the decoder prefills itself: {v}");
    let got = d.requests();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].json()["kv_transfer_params"]["remote_engine_id"],
        "p1"
    );
    assert!(
        got[1].json().get("kv_transfer_params").is_none(),
        "an answer over the cap is a failed prefill: {}",
        got[1].json()
    );
    assert_eq!(p.requests().len(), 2);
    // JSON that is not an object is the client's error, with or without a prefiller.
    for body in ["[1,2]", "\"x\"", "3", "null", "{\"prompt\": "] {
        for headers in [&prefiller[..], &[]] {
            let (status, v) = post(&s, body, headers).await;
            assert_eq!(status, 400, "{body}: {v}");
            assert_openai_error(&v);
        }
    }
    assert_eq!(d.requests().len(), 2, "none of them reached the decoder");
    assert_eq!(p.requests().len(), 2, "nor the prefiller");
    s.wait_healthy("/health", std::time::Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_transfer_params_and_hop_headers_never_reach_a_worker() {
    let d = decoder().await;
    let p = Fake::start(|_: &Seen| {
        answer_json(json!({"choices": [{"text": "x"}],
            "kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "prefiller",
                                   "remote_block_ids": [7, 8]}}))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let secret = ClusterSecret::new(SECRET).unwrap();
    let s = sidecar(
        &d,
        &[
            "--prefiller-allowlist",
            "127.0.0.1:*",
            "--kv-transfer-secret-file",
            secret_file.to_str().unwrap(),
        ],
    )
    .await;
    // A client names someone else's KV and forges the hop header.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 4,
        "kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "victim",
                               "remote_block_ids": [1, 2, 3], "remote_host": "127.0.0.1"}})
    .to_string();
    let forged = [(TRUSTED_HOP_HEADER, "00ff")];
    let (status, v) = post(&s, &body, &forged).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = post(
        &s,
        &body,
        &[forged[0], ("x-prefiller-host-port", p.host_port.as_str())],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let got = d.requests();
    assert_eq!(got.len(), 2);
    assert!(
        got[0].json().get("kv_transfer_params").is_none(),
        "decode alone: {}",
        got[0].json()
    );
    assert_eq!(
        got[1].json()["kv_transfer_params"],
        json!({"do_remote_prefill": true, "remote_engine_id": "prefiller", "remote_block_ids": [7, 8]}),
        "only the prefiller's parameters"
    );
    let prefilled = p.requests();
    assert_eq!(prefilled.len(), 1);
    assert_eq!(
        prefilled[0].json()["kv_transfer_params"]["do_remote_decode"],
        true
    );
    assert!(prefilled[0].json()["kv_transfer_params"]["remote_engine_id"].is_null());
    for r in got.iter().chain(&prefilled) {
        let hop: Vec<_> = r.headers.get_all(TRUSTED_HOP_HEADER).iter().collect();
        assert_eq!(hop.len(), 1, "{:?}", r.headers);
        assert!(secret.is_trusted_hop(hop[0].to_str().unwrap()), "{hop:?}");
    }
    // Without the secret the sidecar proves nothing, and passes on no client's proof, even a
    // valid one.
    let d2 = decoder().await;
    let plain = sidecar(&d2, &[]).await;
    let token = secret.hop_token();
    let (status, v) = post(&plain, &body, &[(TRUSTED_HOP_HEADER, &token)]).await;
    assert_eq!(status, 200, "{v}");
    let got = d2.requests();
    assert_eq!(got.len(), 1);
    assert!(got[0].headers.get(TRUSTED_HOP_HEADER).is_none());
    assert!(got[0].json().get("kv_transfer_params").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_v1_and_leaves_health_and_metrics_open() {
    let d = decoder().await;
    let s = sidecar(&d, &["--api-key", "s3cret"]).await;
    let body = r#"{"prompt": "Once", "max_tokens": 1}"#;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cre"),
        Some("s3cret"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let (status, v) = post(&s, body, &headers).await;
        assert_eq!(status, 401, "{auth:?}: {v}");
        assert_openai_error(&v);
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let r = reqwest::get(s.url("/v1/models")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(d.requests().is_empty(), "{:?}", d.requests());
    let (status, v) = post(&s, body, &[("authorization", "Bearer s3cret")]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(d.requests().len(), 1);
    for open in ["/health", "/metrics"] {
        let r = reqwest::get(s.url(open)).await.unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_as_llm_ds_routing_proxy_it_calls_the_prefiller_the_scheduler_named() {
    // Exactly the arguments llm-d's modelservice chart gives its routing proxy (the port 0
    // aside): no allowlist can be passed there, so a prefiller is trusted as llm-d's sidecar
    // trusts it without --enable-ssrf-protection.
    let d = decoder().await;
    let p = Fake::start(|_: &Seen| {
        answer_json(json!({"choices": [{"text": "x"}],
            "kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "prefill-0",
                                   "remote_block_ids": [3, 4]}}))
    })
    .await;
    let a = args(&[
        "sidecar",
        "--host=127.0.0.1",
        "--port=0",
        &format!("--vllm-port={}", d.port),
        "--connector=nixlv2",
        "--zap-encoder=json",
        "--zap-log-level=debug",
        "--secure-proxy=false",
    ]);
    let s = LlmdProcess::start("sidecar", &a, "/health").await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 4}).to_string();
    let (status, v) = post(&s, &body, &[("x-prefiller-host-port", &p.host_port)]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(p.requests().len(), 1, "the prefiller was called");
    assert_eq!(
        p.requests()[0].json()["kv_transfer_params"]["do_remote_decode"],
        true
    );
    let got = d.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].json()["kv_transfer_params"]["remote_engine_id"],
        "prefill-0"
    );
    // An allowlist, when given, still decides.
    let listed = sidecar(
        &d,
        &["--connector=nixlv2", "--prefiller-allowlist=10.9.9.9:1"],
    )
    .await;
    let (status, v) = post(&listed, &body, &[("x-prefiller-host-port", &p.host_port)]).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(p.requests().len(), 1);
}

/// A prefiller over HTTPS with a self-signed certificate (Python's ssl, not ours): its port,
/// and the process (killed when dropped).
struct TlsPrefiller(std::process::Child, u16);

impl Drop for TlsPrefiller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tls_prefiller() -> TlsPrefiller {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, pem) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&pem, key.signing_key.serialize_pem()).unwrap();
    let server = r#"
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        out = json.dumps({"choices": [{"text": "x"}], "kv_transfer_params":
                          {"do_remote_prefill": True, "remote_engine_id": "tls-prefill"}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", server])
        .arg(&cert)
        .arg(&pem)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().expect("the HTTPS prefiller's port");
    // The certificate is loaded before the port is printed: its files may go.
    drop(dir);
    TlsPrefiller(child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_ds_prefiller_tls_flags_are_honoured() {
    let d = decoder().await;
    let p = tls_prefiller();
    let hp = format!("127.0.0.1:{}", p.1);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 4}).to_string();
    // (flags, whether the decoder gets the HTTPS prefiller's parameters)
    for (flags, prefilled) in [
        // HTTPS without verifying the self-signed certificate: prefilled.
        (
            &[
                "--prefiller-use-tls=true",
                "--prefiller-tls-insecure-skip-verify=true",
            ][..],
            true,
        ),
        (
            &[
                "--enable-tls=prefiller",
                "--tls-insecure-skip-verify=prefiller",
            ],
            true,
        ),
        // Verified against the Mozilla roots: the certificate is refused, the decoder
        // prefills itself.
        (&["--prefiller-use-tls"], false),
        // Plain HTTP to an HTTPS port: no answer, the decoder prefills itself.
        (&[], false),
    ] {
        let mut a = vec!["--connector=nixlv2"];
        a.extend_from_slice(flags);
        let s = sidecar(&d, &a).await;
        let before = d.requests().len();
        let (status, v) = post(&s, &body, &[("x-prefiller-host-port", &hp)]).await;
        assert_eq!(status, 200, "{flags:?}: {v}");
        let got = d.requests();
        assert_eq!(got.len(), before + 1);
        let params = &got[before].json()["kv_transfer_params"];
        if prefilled {
            assert_eq!(params["remote_engine_id"], "tls-prefill", "{flags:?}");
        } else {
            assert!(params.is_null(), "{flags:?}: {params}");
        }
    }
}
