//! The autoscaler's loop for real: a local pool of `llmd serve` workers (stories260K, every
//! model step stalled 20 ms — a slower device, so a worker's capacity is known whatever this
//! machine's cores are doing), registered with a real `llmd route` through its workers file,
//! driven by [`llmd::autoscale::live::Loop`] every second with the `llmd` policy (its capacity
//! model's prior a calibration of the stalled worker, learned on from the scraped metrics; the
//! demand per band from the router's own metrics). A load step replayed from the Azure
//! conversation trace (arrival times kept, sped up 3×; prompt and output lengths ÷ 8, capped)
//! must scale the pool 1 → N while the router's TTFT p95 still meets the SLO, and back to 1
//! once the load has ended, with every request answered in full: the workers taken away are
//! drained first (unlisted, idle, then SIGTERM).
mod common;

use common::{stories, LlmdProcess};
use llmd::autoscale::config::AutoscaleConfig;
use llmd::autoscale::live::{LiveVariant, Loop};
use llmd::autoscale::policy::build_policy;
use llmd::autoscale::target::{LocalPool, LocalPoolConfig, ScaleTarget, WorkersFile};
use llmd::autoscale::telemetry::Telemetry;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The TTFT p95 the one band must meet (seconds, at the router: queueing included).
const TTFT_SLO: f64 = 3.0;
/// The policy deciding.
const POLICY: &str = "llmd";
/// The trace is replayed this many times faster than it happened.
const SPEEDUP: f64 = 3.0;
/// Trace seconds replayed: from 60 s into the hour, this long.
const TRACE_FROM_S: f64 = 60.0;
const TRACE_LEN_S: f64 = 36.0;

/// Then the trace's next seconds, replayed at half speed: a trickle one worker serves, so the
/// pool scales down while requests still run on the workers it takes away.
const TAIL_LEN_S: f64 = 6.0;
const TAIL_SLOWDOWN: f64 = 2.0;

/// (arrival offset in seconds after the speed-up, prompt tokens, output tokens): the load step,
/// then the tail.
fn load_step() -> Vec<(f64, usize, usize)> {
    let path = format!(
        "{}/../shared/traces/azure-llm-2023-conv.csv",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("the shared trace");
    let mut out = Vec::new();
    let mut t0 = None;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let ts = parse_ts(f[0]);
        let t0 = *t0.get_or_insert(ts);
        let at = ts - t0 - TRACE_FROM_S;
        if at < 0.0 {
            continue;
        }
        let at = if at < TRACE_LEN_S {
            at / SPEEDUP
        } else if at < TRACE_LEN_S + TAIL_LEN_S {
            TRACE_LEN_S / SPEEDUP + (at - TRACE_LEN_S) * TAIL_SLOWDOWN
        } else {
            break;
        };
        let (ctx, gen): (usize, usize) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        out.push((at, (ctx / 8).clamp(4, 200), (gen / 8).clamp(2, 64)));
    }
    out
}

/// `2023-11-16 18:15:46.6805900` as seconds since that day began (the trace is one hour).
fn parse_ts(s: &str) -> f64 {
    let time = s.split(' ').nth(1).expect("date and time");
    let mut p = time.split(':');
    let h: f64 = p.next().unwrap().parse().unwrap();
    let m: f64 = p.next().unwrap().parse().unwrap();
    let sec: f64 = p.next().unwrap().parse().unwrap();
    h * 3600.0 + m * 60.0 + sec
}

/// The autoscaler's config for the test: one local variant of stalled workers; its
/// calibration (the capacity model's prior, which the policy then learns from the scraped
/// metrics) is what the flags make of a worker: 20 ms a step, 4 sequences a batch, 256 blocks
/// of 16 tokens.
fn config(dir: &std::path::Path) -> AutoscaleConfig {
    std::fs::write(
        dir.join("calibration-stall20.json"),
        r#"{"source": "llmd serve stories260K --fault-injection stall@*:20 --max-num-seqs 4 --num-gpu-blocks-override 256",
            "prefill_tokens_per_s": 20000.0, "step_base_s": 0.021, "step_per_seq_s": 0.0002,
            "step_per_ctx_token_s": 0.0, "kv_capacity_tokens": 4096.0, "max_batch": 4,
            "prefill_chunk_tokens": 512}"#,
    )
    .unwrap();
    let yaml = format!(
        "interval_s: 1
scale_down_stabilization_s: 3
gpu_budget: 4
variants:
  - name: cpu-stall20
    role: both
    accelerator: cpu
    cost_per_replica_hour: 1.0
    min_replicas: 1
    max_replicas: 4
    startup_s: 1
    calibration: calibration-stall20.json
    target:
      local: {{model: {}, args: []}}
bands:
  - priority: 0
    ttft_p95_s: {TTFT_SLO}
    itl_p95_s: 0.5
    share: 1.0
",
        stories()
    );
    AutoscaleConfig::parse(&yaml, Some(dir)).unwrap()
}

/// One streamed completion: Ok(time to first token) once it ended with `[DONE]`.
async fn one(
    client: &reqwest::Client,
    url: &str,
    seed: u64,
    prompt: usize,
    out: usize,
) -> Result<f64, String> {
    // Every prompt its own (no prefix shared: the router spreads them by load).
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let ids: Vec<u32> = (0..prompt)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            3 + (x % 500) as u32
        })
        .collect();
    let body = serde_json::json!({
        "prompt": ids, "max_tokens": out, "ignore_eos": true, "stream": true, "temperature": 0.0,
    });
    let t = Instant::now();
    let mut r = client
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!(
            "{}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let (mut ttft, mut text) = (None, String::new());
    while let Some(c) = r.chunk().await.map_err(|e| e.to_string())? {
        ttft.get_or_insert(t.elapsed().as_secs_f64());
        text.push_str(&String::from_utf8_lossy(&c));
    }
    if !text.contains("data: [DONE]") || text.contains("\"error\"") {
        return Err(format!(
            "cut short: {}",
            text.chars().rev().take(300).collect::<String>()
        ));
    }
    Ok(ttft.unwrap_or(0.0))
}

/// `llmd route` over stories260K, its workers from `workers` (re-read every 0.2 s).
async fn router(workers: &std::path::Path) -> LlmdProcess {
    LlmdProcess::start(
        "router",
        &common::args(&[
            "route",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model",
            &stories(),
            "--workers-file",
            workers.to_str().unwrap(),
            "--scrape-interval",
            "0.2",
        ]),
        "",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_step_scales_the_local_pool_up_and_back_down_with_no_request_failing() {
    let dir = std::env::temp_dir().join(format!("llmd-autoscale-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = WorkersFile::create(dir.join("workers")).unwrap();
    let cfg = config(&dir);
    let router = router(&file.path).await;
    let pool = LocalPool::new(
        LocalPoolConfig {
            name: "cpu-stall20".into(),
            exe: env!("CARGO_BIN_EXE_llmd").into(),
            model: stories(),
            args: common::args(&[
                "--max-num-seqs",
                "4",
                "--fault-injection",
                "stall@*:20",
                "--shutdown-timeout",
                "30",
                "--num-gpu-blocks-override",
                "256",
            ]),
            router: router.base.clone(),
            start_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            verbose: false,
            role: llmd::autoscale::config::Role::Both,
            sidecar_args: Vec::new(),
        },
        file.clone(),
    )
    .unwrap();
    pool.scale(1).await.unwrap();
    // Registered through the file: the router has a worker up.
    router
        .wait_healthy("/health", Duration::from_secs(60))
        .await;
    let pool = Arc::new(pool);
    let mut lp = Loop::new(
        vec![LiveVariant {
            name: "cpu-stall20".into(),
            role: "prefill-decode".into(),
            min_replicas: 1,
            max_replicas: 4,
            target: Box::new(pool.clone()),
        }],
        router.base.clone(),
        false,
    )
    .unwrap();
    let outputs = lp.outputs.clone();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", metrics.local_addr().unwrap());
    tokio::spawn(llmd::autoscale::live::serve_metrics(
        metrics,
        outputs.clone(),
    ));

    // The loop, every second, until told to stop; every step kept.
    let steps = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let looped = {
        let steps = steps.clone();
        tokio::spawn(async move {
            let mut policy = build_policy(POLICY, &cfg).unwrap();
            let mut decide = move |t: &Telemetry| policy.decide(t);
            lp.run(
                Duration::from_secs(1),
                &mut decide,
                |s| steps.lock().unwrap().push(s.clone()),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await;
        })
    };

    // 2 s quiet at one worker, then the load step.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let load = load_step();
    let n = load.len();
    eprintln!(
        "load step: {n} requests over {:.1} s ({SPEEDUP}x the trace's {TRACE_LEN_S} s from {TRACE_FROM_S} s, then its next {TAIL_LEN_S} s at 1/{TAIL_SLOWDOWN} speed)",
        load.last().unwrap().0
    );
    let client = reqwest::Client::new();
    let url = router.url("/v1/completions");
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut peak_metric = 0.0f64;
    for (i, (at, prompt, out)) in load.into_iter().enumerate() {
        let wait = Duration::from_secs_f64(at).saturating_sub(start.elapsed());
        tokio::time::sleep(wait).await;
        let (c, u) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            one(&c, &u, i as u64, prompt, out).await
        }));
        if let Ok(r) = client.get(&metrics_url).send().await {
            let text = r.text().await.unwrap();
            peak_metric = peak_metric.max(common::metric(
                &text,
                "llmd:desired_replicas",
                "variant=\"cpu-stall20\"",
            ));
        }
    }
    let mut ttfts = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(ttft) => ttfts.push(ttft),
            Err(e) => panic!("a request failed: {e}"),
        }
    }
    let load_end = start.elapsed().as_secs_f64();
    // Back down: one worker listed, none draining, within a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = pool.replicas().await.unwrap();
        if r.ready == 1 && r.starting == 0 && pool.draining() == 0 && pool.pids().len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back to one worker: {r:?}, {} draining",
            pool.draining()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_tx.send(());
    looped.await.unwrap();

    let steps = steps.lock().unwrap().clone();
    for s in &steps {
        let v = &s.telemetry.variants[0];
        let band = s.telemetry.bands.iter().find(|b| b.priority == 0);
        eprintln!(
            "t={:5.1}s ready={} starting={} waiting={:4.1} running={:4.1} arrivals={:5.2}/s ttft_p95={:?} -> {}",
            s.telemetry.at_s,
            v.ready_replicas,
            v.starting_replicas,
            v.waiting,
            v.running,
            band.map_or(0.0, |b| b.arrivals_per_s),
            band.and_then(|b| b.ttft.quantile(0.95)),
            s.desired["cpu-stall20"]
        );
    }
    ttfts.sort_by(f64::total_cmp);
    let p95 = ttfts[(ttfts.len() * 95).div_ceil(100) - 1];
    eprintln!(
        "{n} requests, all answered in full; client TTFT p95 {p95:.3} s; load ended at {load_end:.1} s; {} of the workers taken away still had requests when unlisted",
        pool.busy_drains()
    );
    let desired: Vec<u32> = steps.iter().map(|s| s.desired["cpu-stall20"]).collect();
    let peak = desired.iter().copied().max().unwrap();
    assert!(peak >= 2, "the load step scaled nothing: {desired:?}");
    assert!(
        peak_metric >= 2.0,
        "llmd:desired_replicas never showed the scale-up"
    );
    let ready_peak = steps
        .iter()
        .map(|s| s.telemetry.variants[0].ready_replicas)
        .max()
        .unwrap();
    assert!(ready_peak >= 2, "no second worker ever served: {desired:?}");
    // Up before the SLO broke: every interval up to the first scale-up decision met it.
    let first_up = steps
        .iter()
        .position(|s| s.desired["cpu-stall20"] >= 2)
        .unwrap();
    for s in &steps[..=first_up] {
        if let Some(p) = s
            .telemetry
            .bands
            .iter()
            .find(|b| b.priority == 0)
            .and_then(|b| b.ttft.quantile(0.95))
        {
            assert!(
                p <= TTFT_SLO,
                "TTFT p95 {p:.2} s broke the {TTFT_SLO} s SLO at {:.1} s, before the scale-up",
                s.telemetry.at_s
            );
        }
    }
    // And down again at the end, by the loop's own decision.
    assert_eq!(*desired.last().unwrap(), 1, "{desired:?}");
    let served = outputs.render();
    assert_eq!(
        common::metric(&served, "llmd:desired_replicas", "variant=\"cpu-stall20\""),
        1.0,
        "{served}"
    );
    drop(pool);
    std::fs::remove_dir_all(&dir).ok();
}

/// A fresh directory for an `llmd autoscale run` test, with the calibration file and an empty
/// workers file, and a router reading that file.
async fn run_dir(tag: &str) -> (std::path::PathBuf, std::path::PathBuf, LlmdProcess) {
    let dir = std::env::temp_dir().join(format!("llmd-autoscale-run-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let workers = dir.join("workers");
    std::fs::write(&workers, "").unwrap();
    let router = router(&workers).await;
    config(&dir); // the calibration file
    (dir, workers, router)
}

/// `llmd autoscale run` with `config` and the static-peak policy, writing the router's workers
/// file, its metrics on a free loopback port.
async fn autoscale_run(
    config: &std::path::Path,
    router: &LlmdProcess,
    workers: &std::path::Path,
) -> LlmdProcess {
    LlmdProcess::start(
        "autoscale",
        &common::args(&[
            "autoscale",
            "run",
            "--config",
            config.to_str().unwrap(),
            "--router",
            &router.base,
            "--policy",
            "static-peak",
            "--workers-file",
            workers.to_str().unwrap(),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            "0",
        ]),
        "/health",
    )
    .await
}

/// SIGTERMs the autoscaler and waits for it to exit cleanly.
async fn sigterm_and_wait(mut scaler: LlmdProcess) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(scaler.child.id() as libc::pid_t, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || scaler.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// `llmd autoscale run` as a process with a local variant: its pool starts the policy's count of
/// real workers and lists them in the router's workers file (the router serves through them),
/// and SIGTERM stops the autoscaler and every worker it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmd_autoscale_run_starts_a_local_pool_and_stops_it_on_sigterm() {
    let (dir, workers, router) = run_dir("local").await;
    std::fs::write(
        dir.join("autoscale.yaml"),
        format!(
            "interval_s: 0.5
scale_down_stabilization_s: 0
gpu_budget: 4
variants:
  - name: tiny
    role: both
    accelerator: cpu
    cost_per_replica_hour: 1.0
    min_replicas: 1
    max_replicas: 4
    startup_s: 1
    calibration: calibration-stall20.json
    static_replicas: 2
    target:
      local: {{model: {}, args: [--num-gpu-blocks-override, '64']}}
bands:
  - {{priority: 0, ttft_p95_s: 3, itl_p95_s: 0.5, share: 1}}
",
            stories()
        ),
    )
    .unwrap();
    let scaler = autoscale_run(&dir.join("autoscale.yaml"), &router, &workers).await;
    // Two ready workers, listed, and the router serving through them.
    let text = scaler
        .metrics_until("two ready workers", |t| {
            common::metric(t, "llmd:ready_replicas", "variant=\"tiny\"") == 2.0
        })
        .await;
    assert_eq!(
        common::metric(&text, "llmd:desired_replicas", "variant=\"tiny\""),
        2.0
    );
    let listed =
        llmd::router::workers::parse_workers_file(&std::fs::read_to_string(&workers).unwrap())
            .unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    router
        .wait_healthy("/health", Duration::from_secs(30))
        .await;
    let client = reqwest::Client::new();
    for i in 0..4 {
        assert_eq!(
            one(&client, &router.url("/v1/completions"), i, 8, 4)
                .await
                .map(|_| ()),
            Ok(())
        );
    }
    // SIGTERM: the autoscaler exits and takes its workers with it.
    sigterm_and_wait(scaler).await;
    for w in &listed {
        assert!(
            reqwest::get(format!("{}/health", w.url)).await.is_err(),
            "{} still answers after the autoscaler stopped",
            w.url
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The process ids whose parent is `pid` (from `/proc/*/stat`).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so read after its closing paren.
        let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            if let Ok(child) = e.file_name().to_string_lossy().parse() {
                out.push(child);
            }
        }
    }
    out
}

/// Prefill and decode variants on local pools: the prefill pool's worker is a KV producer on a
/// side-channel port the pool picked, the decode pool's worker a KV consumer behind its own
/// `llmd sidecar`; both are listed with their roles in the router's workers file, a long prompt
/// through the router is prefilled on one and decoded from the pulled KV on the other, and
/// SIGTERM stops the autoscaler with every worker and sidecar it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_and_decode_local_pools_serve_disaggregated() {
    let (dir, workers, router) = run_dir("pd").await;
    let secret = common::secret_file().display().to_string();
    let variant = |name: &str, sidecar: &str| {
        format!(
            "  - name: {name}
    role: {name}
    accelerator: cpu
    cost_per_replica_hour: 1.0
    min_replicas: 1
    max_replicas: 2
    startup_s: 1
    calibration: calibration-stall20.json
    static_replicas: 1
    target:
      local: {{model: {}, args: [--num-gpu-blocks-override, '64', --kv-transfer-secret-file, {secret}]{sidecar}}}
",
            stories()
        )
    };
    let sidecar = format!(
        ", sidecar_args: [--prefiller-allowlist, '127.0.0.1:*', --kv-transfer-secret-file, {secret}]"
    );
    std::fs::write(
        dir.join("autoscale.yaml"),
        format!(
            "interval_s: 0.5
scale_down_stabilization_s: 0
gpu_budget: 4
variants:
{}{}bands:
  - {{priority: 0, ttft_p95_s: 3, itl_p95_s: 0.5, share: 1}}
",
            variant("prefill", ""),
            variant("decode", &sidecar)
        ),
    )
    .unwrap();
    let scaler = autoscale_run(&dir.join("autoscale.yaml"), &router, &workers).await;
    scaler
        .metrics_until("a ready replica of each", |t| {
            common::metric(t, "llmd:ready_replicas", "variant=\"prefill\"") == 1.0
                && common::metric(t, "llmd:ready_replicas", "variant=\"decode\"") == 1.0
        })
        .await;
    let listed =
        llmd::router::workers::parse_workers_file(&std::fs::read_to_string(&workers).unwrap())
            .unwrap();
    use llmd::router::workers::Role as R;
    let with_role = |r: R| {
        let of: Vec<&str> = listed
            .iter()
            .filter(|w| w.role == r)
            .map(|w| w.url.as_str())
            .collect();
        assert_eq!(of.len(), 1, "one {r:?} worker listed: {listed:?}");
        of[0].to_string()
    };
    let (_prefill, decode) = (with_role(R::Prefill), with_role(R::Decode));
    assert_eq!(listed.len(), 2, "{listed:?}");
    // Three processes: the two workers and the decode worker's sidecar.
    let started = children(scaler.child.id());
    assert_eq!(started.len(), 3, "{started:?}");
    router
        .metrics_until("the router lists both", |m| {
            common::metric(m, "llmd_router:worker_up", "") == 2.0
        })
        .await;
    let long = serde_json::json!({"prompt": "Once upon a time, there was a little girl named Lily. She loved to play outside. ".repeat(4),
                                  "max_tokens": 8, "temperature": 0});
    let r = reqwest::Client::new()
        .post(router.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let served_by = r.headers()["x-llmd-worker"].to_str().unwrap().to_string();
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(
        served_by, decode,
        "decoded behind the decode pool's sidecar"
    );
    let m = router.metrics().await;
    assert_eq!(
        common::metric(
            &m,
            "llmd_router:pd_decisions_total",
            "mode=\"disaggregated\""
        ),
        1.0,
        "{m}"
    );
    // The sidecar passes /metrics to its worker: the prompt's KV was pulled, not recomputed.
    let dm = reqwest::get(format!("{decode}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        common::metric(&dm, "llmd:kv_transfer_pulls_total", "") >= 1.0,
        "{dm}"
    );
    assert_eq!(
        common::metric(&dm, "llmd:prompt_tokens_computed_total", ""),
        0.0,
        "{dm}"
    );
    // SIGTERM: the autoscaler exits and takes the workers and the sidecar with it.
    sigterm_and_wait(scaler).await;
    for pid in started {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s
                    .rsplit_once(')')
                    .is_some_and(|x| x.1.trim_start().starts_with('Z'))),
            "process {pid} outlived the autoscaler"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
