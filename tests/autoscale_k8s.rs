//! The autoscaler's Kubernetes scale target against a fake API server on loopback
//! (tests/fake_http): the `scale` subresource of a `Deployment` (apps/v1) and of a
//! `LeaderWorkerSet` (leaderworkerset.x-k8s.io/v1) read with GET and written with a JSON merge
//! patch of `spec.replicas` alone, with the service account's token; an API error is an error
//! naming the workload. Then `llmd autoscale run` for real, as a process: against a fake router
//! and the fake API, `--dry-run` publishes `llmd:desired_replicas` and never writes, and
//! without it the Deployment is patched to the policy's count.
mod common;
mod fake_http;

use axum::http::StatusCode;
use axum::response::Response;
use common::LlmdProcess;
use fake_http::{json, Fake, Seen};
use llmd::autoscale::target::{Kubernetes, Replicas, ScaleTarget, WorkloadKind};
use llmd::router::k8s::Api;
use serde_json::{json as j, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DEPLOY: &str = "/apis/apps/v1/namespaces/llm/deployments/decode/scale";
const LWS: &str = "/apis/leaderworkerset.x-k8s.io/v1/namespaces/llm/leaderworkersets/wide-ep/scale";

/// A fake API holding (spec, status) replicas per `scale` path; GET answers the `Scale`, a
/// merge patch of `spec.replicas` sets it; anything else is the error the real server gives.
async fn fake_api(scales: &[(&str, u32, u32)]) -> Fake {
    let state: Arc<Mutex<HashMap<String, (u32, u32)>>> = Arc::new(Mutex::new(
        scales
            .iter()
            .map(|(p, s, t)| (p.to_string(), (*s, *t)))
            .collect(),
    ));
    Fake::start(move |s: &Seen| {
        let mut g = state.lock().unwrap();
        let Some(entry) = g.get_mut(&s.path) else {
            return status(StatusCode::NOT_FOUND, "not found");
        };
        if s.headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer sa-token") {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
        match s.method.as_str() {
            "GET" => {}
            "PATCH" => {
                let ct = s.headers.get("content-type").and_then(|v| v.to_str().ok());
                if ct != Some("application/merge-patch+json") {
                    return status(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "the patch's content type",
                    );
                }
                let Some(n) = s.json()["spec"]["replicas"].as_u64() else {
                    return status(StatusCode::UNPROCESSABLE_ENTITY, "spec.replicas");
                };
                entry.0 = n as u32;
            }
            _ => return status(StatusCode::METHOD_NOT_ALLOWED, "method"),
        }
        let (spec, st) = *entry;
        json(j!({
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": "x", "namespace": "llm"},
            "spec": {"replicas": spec}, "status": {"replicas": st, "selector": "app=x"}
        }))
    })
    .await
}

fn status(code: StatusCode, message: &str) -> Response {
    let mut r = json(
        j!({"kind": "Status", "status": "Failure", "message": message, "code": code.as_u16()}),
    );
    *r.status_mut() = code;
    r
}

/// A token file of its own for each caller (the tests run at once and remove theirs).
fn token_file() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!(
        "llmd-autoscale-k8s-token-{}-{n}",
        std::process::id()
    ));
    std::fs::write(&p, "sa-token\n").unwrap();
    p
}

fn api(base: String, token: Option<std::path::PathBuf>) -> Arc<Api> {
    Arc::new(Api {
        base,
        token_file: token,
        timeout: Duration::from_secs(5),
        client: Api::client(None).unwrap(),
    })
}

#[tokio::test]
async fn the_scale_subresource_is_read_and_patched_for_deployments_and_leaderworkersets() {
    let fake = fake_api(&[(DEPLOY, 2, 1), (LWS, 1, 1)]).await;
    let token = token_file();
    let target = |kind, name: &str| Kubernetes {
        api: api(fake.url(), Some(token.clone())),
        kind,
        namespace: "llm".into(),
        name: name.into(),
    };
    let d = target(WorkloadKind::Deployment, "decode");
    assert_eq!(
        d.replicas().await.unwrap(),
        Replicas {
            desired: 2,
            ready: 1,
            starting: 1
        }
    );
    d.scale(5).await.unwrap();
    assert_eq!(d.replicas().await.unwrap().desired, 5);
    let l = target(WorkloadKind::LeaderWorkerSet, "wide-ep");
    l.scale(3).await.unwrap();
    assert_eq!(l.replicas().await.unwrap().desired, 3);
    let seen = fake.requests();
    let patches: Vec<&Seen> = seen.iter().filter(|s| s.method == "PATCH").collect();
    assert_eq!(patches.len(), 2);
    assert_eq!(
        (patches[0].path.as_str(), patches[0].json()),
        (DEPLOY, j!({"spec": {"replicas": 5}}))
    );
    assert_eq!(
        (patches[1].path.as_str(), patches[1].json()),
        (LWS, j!({"spec": {"replicas": 3}}))
    );
    assert!(seen.iter().all(|s| s.query.is_empty()));
    // No such workload, or no token: an error naming the workload and the API's answer.
    let e = target(WorkloadKind::Deployment, "gone")
        .scale(1)
        .await
        .unwrap_err();
    assert!(
        e.contains("Deployment llm/gone") && e.contains("404"),
        "{e}"
    );
    let anon = Kubernetes {
        api: api(fake.url(), None),
        kind: WorkloadKind::Deployment,
        namespace: "llm".into(),
        name: "decode".into(),
    };
    let e = anon.replicas().await.unwrap_err();
    assert!(e.contains("401") && e.contains("Unauthorized"), "{e}");
    // Not a Scale: refused.
    let wrong = Fake::start(|_| json(j!({"kind": "Deployment"}))).await;
    let e = Kubernetes {
        api: api(wrong.url(), None),
        ..anon
    }
    .replicas()
    .await
    .unwrap_err();
    assert!(e.contains("not Scale"), "{e}");
    std::fs::remove_file(token).ok();
}

/// A router's /metrics: one worker up, some demand in band 0.
fn router_metrics(s: &Seen) -> Response {
    assert_eq!(
        s.path, "/metrics",
        "the autoscaler only reads the router's metrics"
    );
    Response::new(axum::body::Body::from(
        "llmd_router:worker_up{worker=\"http://127.0.0.1:1\",role=\"decode\"} 1\ninference_objective_request_total{priority=\"0\"} 10\n",
    ))
}

async fn autoscaler_run(
    fake: &Fake,
    router: &Fake,
    dir: &std::path::Path,
    dry_run: bool,
) -> Vec<Seen> {
    let token = token_file();
    let cfg = dir.join("autoscale.yaml");
    std::fs::write(dir.join("cal.json"), r#"{"prefill_tokens_per_s": 1000.0, "step_base_s": 0.01, "step_per_seq_s": 0.0, "step_per_ctx_token_s": 0.0, "kv_capacity_tokens": 10000.0, "max_batch": 8, "prefill_chunk_tokens": 512}"#).unwrap();
    std::fs::write(
        &cfg,
        "interval_s: 0.5\nscale_down_stabilization_s: 0\ngpu_budget: 8\nvariants:\n  - name: decode\n    role: decode\n    accelerator: H100\n    cost_per_replica_hour: 4\n    min_replicas: 1\n    max_replicas: 8\n    startup_s: 60\n    calibration: cal.json\n    static_replicas: 4\n    target:\n      kubernetes: {kind: Deployment, name: decode, namespace: llm}\n  - name: prefill\n    role: prefill\n    accelerator: H100\n    cost_per_replica_hour: 4\n    min_replicas: 1\n    max_replicas: 8\n    startup_s: 60\n    calibration: cal.json\n    static_replicas: 1\n    target:\n      kubernetes: {kind: LeaderWorkerSet, name: wide-ep, namespace: llm}\nbands:\n  - priority: 0\n    ttft_p95_s: 2\n    itl_p95_s: 0.1\n    share: 1\n",
    )
    .unwrap();
    let mut args = common::args(&[
        "autoscale",
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--router",
        &router.url(),
        "--policy",
        "static-peak",
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--k8s-api",
        &fake.url(),
        "--k8s-token-file",
        token.to_str().unwrap(),
    ]);
    if dry_run {
        args.push("--dry-run".into());
    }
    let p = LlmdProcess::start("autoscale", &args, "/health").await;
    // Two decisions (the first interval only scrapes).
    let text = p
        .metrics_until("two decisions", |t| {
            common::metric(t, "llmd:autoscale_decisions_total", "") >= 2.0
        })
        .await;
    assert_eq!(
        common::metric(&text, "llmd:desired_replicas", "variant=\"decode\""),
        4.0,
        "{text}"
    );
    assert_eq!(
        common::metric(&text, "llmd:desired_replicas", "variant=\"prefill\""),
        1.0,
        "{text}"
    );
    assert_eq!(
        common::metric(&text, "llmd:current_replicas", "variant=\"decode\""),
        if dry_run { 2.0 } else { 4.0 },
        "{text}"
    );
    drop(p);
    std::fs::remove_file(token).ok();
    fake.requests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmd_autoscale_run_publishes_desired_replicas_and_patches_only_without_dry_run() {
    let dir = std::env::temp_dir().join(format!("llmd-autoscale-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let router = Fake::start(router_metrics).await;
    let fake = fake_api(&[(DEPLOY, 2, 2), (LWS, 1, 1)]).await;
    let seen = autoscaler_run(&fake, &router, &dir, true).await;
    assert!(seen.iter().any(|s| s.method == "GET" && s.path == DEPLOY));
    assert!(
        seen.iter().all(|s| s.method == "GET"),
        "a dry run wrote: {seen:?}"
    );
    let fake = fake_api(&[(DEPLOY, 2, 2), (LWS, 1, 1)]).await;
    let seen = autoscaler_run(&fake, &router, &dir, false).await;
    let patches: Vec<(String, Value)> = seen
        .iter()
        .filter(|s| s.method == "PATCH")
        .map(|s| (s.path.clone(), s.json()))
        .collect();
    // The Deployment goes 2 -> 4 once; the LeaderWorkerSet is where the policy wants it.
    assert_eq!(
        patches,
        [(DEPLOY.to_string(), j!({"spec": {"replicas": 4}}))]
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn check_config_reads_everything_and_starts_nothing_and_bad_flags_are_named() {
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmd"))
            .args(["autoscale", "run", "--config"])
            .arg(format!(
                "{}/deploy/autoscale/default.yaml",
                env!("CARGO_MANIFEST_DIR")
            ))
            .args(extra)
            .arg("--check-config")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = run(&["--router", "http://router:8000", "--dry-run"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("configuration OK")
            && text.contains("Deployment default/llmd-8b")
            && text.contains("dry run"),
        "{text}"
    );
    let (ok, text) = run(&["--router", "router:8000"]);
    assert!(!ok && text.contains("--router"), "{text}");
    let (ok, text) = run(&["--router", "http://r", "--policy", "wva"]);
    assert!(!ok && text.contains("unknown policy"), "{text}");
}
