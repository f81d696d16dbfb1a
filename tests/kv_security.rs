//! Security of the KV data path (issue 20), through real `llmd serve` processes on loopback:
//! nobody can bind another prompt's KV to their own, read held KV without its token, pose as a
//! producer, or exhaust a producer's side channel.
mod common;

use common::{free_port, metric, LlmdProcess};
use serde_json::{json, Value};
use std::time::Duration;

const PRODUCER: &str = r#"{"kv_connector": "NixlConnector", "kv_role": "kv_producer"}"#;
const CONSUMER: &str = r#"{"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}"#;

/// The issue's two prompts: the same number of tokens, one with a secret in it.
const A: &str = "The secret password of the bank vault is swordfish and the capital of Germany is";
const B: &str = "Tell me a story about a cat named Tom who lives in a very small house";

/// `llmd serve` on `model` with `extra` flags, on a free port.
async fn serve(tag: &str, model: &std::path::Path, extra: &[&str]) -> LlmdProcess {
    let mut args: Vec<String> = ["serve", "--model"].map(String::from).to_vec();
    args.push(model.display().to_string());
    args.extend(
        [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--kv-cache-memory-gb",
            "0.05",
            "--max-model-len",
            "512",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    LlmdProcess::start(tag, &args, "/health").await
}

/// Posts `body` to `path`; `trusted` adds the trusted-hop header of the tests' secret, as
/// llmd's sidecar or router would.
async fn post(p: &LlmdProcess, path: &str, body: &Value, trusted: bool) -> Value {
    let mut r = reqwest::Client::new().post(p.url(path)).json(body);
    if trusted {
        r = r.header(llmd::kv::auth::TRUSTED_HOP_HEADER, common::hop_token());
    }
    let r = r.send().await.expect("request");
    let status = r.status();
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(status, 200, "{v}");
    v
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn completion(prompt: &str) -> Value {
    json!({"prompt": prompt, "max_tokens": 12, "temperature": 0})
}

/// What a prefiller returns for `prompt` held for a decoder.
async fn prefill(producer: &LlmdProcess, prompt: &str) -> Value {
    let mut p = completion(prompt);
    p["kv_transfer_params"] = json!({"do_remote_decode": true});
    p["max_tokens"] = json!(1);
    let v = post(producer, "/v1/completions", &p, true).await;
    let params = v["kv_transfer_params"].clone();
    assert!(params["remote_transfer_token"].is_string(), "{v}");
    params
}

/// What `decoder` answers for `prompt` with `params`, sent through a trusted hop.
async fn decode(decoder: &LlmdProcess, prompt: &str, params: &Value) -> Value {
    post(
        decoder,
        "/v1/completions",
        &with_params(prompt, params),
        true,
    )
    .await
}

fn with_params(prompt: &str, params: &Value) -> Value {
    let mut b = completion(prompt);
    b["kv_transfer_params"] = params.clone();
    b
}

/// A prefiller with its side channel on `side` and a decoder (with `decoder_extra` flags),
/// sharing the tests' cluster secret.
async fn prefiller_and_decoder(
    model: &std::path::Path,
    side: u16,
    decoder_extra: &[&str],
) -> (LlmdProcess, LlmdProcess) {
    let secret = common::secret_file().display().to_string();
    let side = side.to_string();
    let with_secret = ["--kv-transfer-secret-file", secret.as_str()];
    let mut p = vec![
        "--kv-transfer-config",
        PRODUCER,
        "--kv-transfer-port",
        &side,
    ];
    p.extend(with_secret);
    let mut d = vec!["--kv-transfer-config", CONSUMER];
    d.extend(with_secret);
    d.extend(decoder_extra);
    (
        serve("producer", model, &p).await,
        serve("decoder", model, &d).await,
    )
}

/// The issue's reproduction: prompt A's KV held by a prefiller, offered to a decoder with
/// prompt B. Today's code decoded B from A's KV, committed it under B's hashes and served A's
/// secret to the next client whose prompt starts like B. Now the decoder answers B from B —
/// whether the parameters come from a client (ignored: not a trusted hop), from a trusted hop
/// (the prompt hash differs: not pulled), or name the KV with the prompt hash removed (pulled,
/// then refused block by block) — and the prefix cache never holds A's KV under B's hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_prompts_kv_is_never_bound_to_a_prompt_nor_cached_for_the_next_client() {
    let Some(model) = common::shared_model("smollm2-135m-instruct") else {
        return;
    };
    let (producer, decoder) =
        prefiller_and_decoder(&model, free_port(), &["--enable-prompt-tokens-details"]).await;
    let clean = serve("clean", &model, &[]).await;
    let b_alone = text(&post(&clean, "/v1/completions", &completion(B), false).await);
    let b2 = format!("{B} ");
    let b2_alone = text(&post(&clean, "/v1/completions", &completion(&b2), false).await);

    // 1. A's KV held for a decoder; 2. B sent to the decoder with A's parameters, three ways.
    let params = prefill(&producer, A).await;
    let v = post(&decoder, "/v1/completions", &with_params(B, &params), false).await;
    assert_eq!(
        text(&v),
        b_alone,
        "a client's parameters steered the decoder"
    );
    let v = decode(&decoder, B, &params).await;
    assert_eq!(text(&v), b_alone, "B was answered from A's KV");
    let mut no_hash = prefill(&producer, A).await;
    no_hash
        .as_object_mut()
        .unwrap()
        .remove("remote_prompt_hash");
    let v = decode(&decoder, B, &no_hash).await;
    assert_eq!(text(&v), b_alone, "B was answered from A's pulled KV");
    assert!(!text(&v).contains("swordfish"));
    let m = decoder.metrics().await;
    assert_eq!(
        metric(&m, "llmd:kv_transfer_params_untrusted_total", ""),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "llmd:kv_transfer_fallbacks_total",
            "cause=\"prompt_mismatch\""
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "llmd:kv_transfer_blocks_received_total", ""),
        0.0
    );

    // 3. An unrelated client's B + " ": its answer is its own, whatever the cache holds.
    let v = post(&decoder, "/v1/completions", &completion(&b2), false).await;
    assert_eq!(
        text(&v),
        b2_alone,
        "A's KV was served from the prefix cache"
    );
    assert!(!text(&v).contains("swordfish"), "{v}");

    // The real flow still works: A's parameters with A's prompt, through a trusted hop.
    let params = prefill(&producer, A).await;
    let v = decode(&decoder, A, &params).await;
    let a_alone = text(&post(&clean, "/v1/completions", &completion(A), false).await);
    assert_eq!(text(&v), a_alone);
    let m = decoder.metrics().await;
    assert!(
        metric(&m, "llmd:kv_transfer_blocks_received_total", "") >= 1.0,
        "{m}"
    );
}

/// Held KV is read only with its token: a pull with a wrong token or none gets nothing (and
/// the blocks stay for their decoder), and a decoder that names a producer which cannot prove
/// the cluster secret (a stranger's listener) refuses it. Every refusal is counted by cause
/// and the prompt is computed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_token_and_a_forged_producer_get_nothing() {
    let Some(model) = common::shared_model("stories260K") else {
        return;
    };
    let (producer, decoder) = prefiller_and_decoder(&model, free_port(), &[]).await;
    let prompt = "Once upon a time, there was a little girl named Lily who loved to play outside in the park with her friends.";
    let clean = serve("clean", &model, &[]).await;
    let want = text(&post(&clean, "/v1/completions", &completion(prompt), false).await);

    let params = prefill(&producer, prompt).await;
    let mut wrong = params.clone();
    wrong["remote_transfer_token"] = json!("00".repeat(16));
    let v = decode(&decoder, prompt, &wrong).await;
    assert_eq!(text(&v), want);
    let mut missing = params.clone();
    missing
        .as_object_mut()
        .unwrap()
        .remove("remote_transfer_token");
    let v = decode(&decoder, prompt, &missing).await;
    assert_eq!(text(&v), want);
    let m = decoder.metrics().await;
    assert_eq!(
        metric(&m, "llmd:kv_transfer_fallbacks_total", "cause=\"not_held\""),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "llmd:kv_transfer_fallbacks_total",
            "cause=\"unauthorized\""
        ),
        1.0,
        "{m}"
    );
    // Still held for the decoder with the right token, which gets it.
    let pm = producer.metrics().await;
    assert_eq!(metric(&pm, "llmd:kv_held_requests", ""), 1.0, "{pm}");
    let v = decode(&decoder, prompt, &params).await;
    assert_eq!(text(&v), want);
    assert!(metric(&decoder.metrics().await, "llmd:kv_transfer_pulls_total", "") == 1.0);

    // A forged producer: a listener that answers the handshake without the secret.
    let forged = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let forged_port = forged.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for c in forged.incoming().take(1) {
            let mut c = c.unwrap();
            let mut hello = [0u8; 24];
            let _ = c.read_exact(&mut hello);
            let _ = c.write_all(&[0x5a; 48]);
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        }
    });
    let params = prefill(&producer, prompt).await;
    let mut at_forged = params.clone();
    at_forged["remote_port"] = json!(forged_port);
    let v = decode(&decoder, prompt, &at_forged).await;
    assert_eq!(text(&v), want);
    let m = decoder.metrics().await;
    assert_eq!(
        metric(
            &m,
            "llmd:kv_transfer_fallbacks_total",
            "cause=\"unauthorized\""
        ),
        2.0,
        "{m}"
    );
    assert_eq!(metric(&m, "llmd:kv_transfer_pulls_total", ""), 1.0);
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

/// 200 side-channel connections that never say anything: the producer keeps serving pulls,
/// closes them at its hello deadline, closes at once what is over its cap of 256, and its
/// memory stays where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_side_channel_connections_do_not_stop_a_producer() {
    let Some(model) = common::shared_model("stories260K") else {
        return;
    };
    let side = free_port();
    let (producer, decoder) = prefiller_and_decoder(&model, side, &[]).await;
    let prompt = "Once upon a time, there was a little boy named Tim who had a big red ball.";
    let before = rss(producer.child.id());

    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", side))
                .await
                .unwrap(),
        );
    }
    // While they sit there, a real transfer goes through.
    let params = prefill(&producer, prompt).await;
    let v = decode(&decoder, prompt, &params).await;
    assert!(!text(&v).is_empty());
    assert_eq!(
        metric(&decoder.metrics().await, "llmd:kv_transfer_pulls_total", ""),
        1.0
    );
    // The idle ones are closed at the hello deadline: every one reads end-of-stream.
    use tokio::io::AsyncReadExt;
    for c in idle.iter_mut() {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(20), c.read(&mut b))
            .await
            .expect("closed by the producer's deadline")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    // 300 at once: past the cap of 256, the rest are closed unread (and counted).
    let mut burst = Vec::new();
    for _ in 0..300 {
        burst.push(
            tokio::net::TcpStream::connect(("127.0.0.1", side))
                .await
                .unwrap(),
        );
    }
    let m = producer
        .metrics_until("connections over the cap refused", |m| {
            metric(m, "llmd:kv_transfer_connections_refused_total", "") >= 44.0
        })
        .await;
    assert!(metric(&m, "llmd:kv_transfer_connections_refused_total", "") <= 300.0);
    drop(burst);
    // And it serves again as before, its memory bounded.
    let params = prefill(&producer, prompt).await;
    decode(&decoder, prompt, &params).await;
    assert_eq!(
        metric(&decoder.metrics().await, "llmd:kv_transfer_pulls_total", ""),
        2.0
    );
    let after = rss(producer.child.id());
    assert!(
        after < before + (64 << 20),
        "RSS grew from {before} to {after} bytes"
    );
}

/// Tenants with different `cache_salt` share no cached block; requests with the same salt
/// share them; and `cached_tokens` is reported only with `--enable-prompt-tokens-details`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_salt_separates_tenants_and_cached_tokens_are_opt_in() {
    let Some(model) = common::shared_model("stories260K") else {
        return;
    };
    let w = serve("salted", &model, &["--enable-prompt-tokens-details"]).await;
    let prompt = "Once upon a time, there was a little girl named Lily. She loved to play in the garden with her dog and her cat every day.";
    let ask = |salt: Option<&str>| {
        let mut b = completion(prompt);
        if let Some(s) = salt {
            b["cache_salt"] = json!(s);
        }
        b
    };
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    let first = post(&w, "/v1/completions", &ask(Some("tenant-a")), false).await;
    assert_eq!(cached(&first), Some(0));
    let same = post(&w, "/v1/completions", &ask(Some("tenant-a")), false).await;
    assert!(cached(&same).unwrap() >= 16, "{same}");
    assert_eq!(text(&same), text(&first));
    let other = post(&w, "/v1/completions", &ask(Some("tenant-b")), false).await;
    assert_eq!(cached(&other), Some(0), "a hit across tenants: {other}");
    let unsalted = post(&w, "/v1/completions", &ask(None), false).await;
    assert_eq!(
        cached(&unsalted),
        Some(0),
        "a salted prefix hit unsalted: {unsalted}"
    );
    assert_eq!(text(&other), text(&first));
    // An empty salt is refused.
    let r = reqwest::Client::new()
        .post(w.url("/v1/completions"))
        .json(&ask(Some("")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "cache_salt", "{e}");

    // Without the flag, usage has no prompt_tokens_details.
    let plain = serve("plain", &model, &[]).await;
    let v = post(&plain, "/v1/completions", &ask(None), false).await;
    let v2 = post(&plain, "/v1/completions", &ask(None), false).await;
    assert!(v["usage"].get("prompt_tokens_details").is_none(), "{v}");
    assert!(v2["usage"].get("prompt_tokens_details").is_none(), "{v2}");
}
