//! `llmd autoscale run`: the live loop. Every interval it scrapes the router's and the
//! workers' `/metrics` ([`super::scrape`]), turns the last two scrapes into a
//! [`Telemetry`], asks the policy for the replicas of each variant, and acts: the decision is
//! always published on the autoscaler's own `/metrics` as `llmd:desired_replicas{variant}`
//! (for a KEDA `ScaledObject` or an HPA external metric, as WVA publishes its own), and —
//! unless `--dry-run` — written to each variant's scale target ([`super::target`]).
use super::config::{self, AutoscaleConfig, Role};
use super::scrape::{self, Scrape, VariantScrape, WorkerScrape};
use super::target::{
    Kubernetes, LocalPool, LocalPoolConfig, Replicas, ScaleTarget, WorkersFile, WorkloadKind,
};
use super::telemetry::Telemetry;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// `llmd autoscale run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The autoscaler's YAML config: variants (with their scale targets), bands and SLOs,
    /// interval, GPU budget.
    #[arg(long)]
    pub config: PathBuf,
    /// The router (`llmd route`) whose /metrics gives the demand per band and the workers.
    #[arg(long)]
    pub router: String,
    /// The policy: llmd, wva-saturation, hpa-queue or static-peak.
    #[arg(long, default_value = "llmd")]
    pub policy: String,
    /// Serve llmd:desired_replicas{variant} (for KEDA or an HPA external metric) on this port's
    /// /metrics.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    pub metrics_host: String,
    /// Decide and publish, but never write a scale target.
    #[arg(long)]
    pub dry_run: bool,
    /// The router's --workers-file: where local pools list their workers (needed when a
    /// variant's target is `local`).
    #[arg(long)]
    pub workers_file: Option<PathBuf>,
    /// Seconds a leaving local worker may take to finish its requests before it is stopped.
    #[arg(long, default_value_t = 120.0)]
    pub drain_timeout: f64,
    /// Echo every line of the local workers' logs (otherwise only warnings and errors).
    #[arg(long)]
    pub verbose_workers: bool,
    /// The Kubernetes API server (default: from KUBERNETES_SERVICE_HOST/_PORT).
    #[arg(long)]
    pub k8s_api: Option<String>,
    /// Read and check the config, the policy and the flags, print what would run, and exit
    /// (nothing started, nothing scaled).
    #[arg(long)]
    pub check_config: bool,
    /// The service account token (default: the pod's), read again for every call.
    #[arg(long)]
    pub k8s_token_file: Option<PathBuf>,
}

const SA: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The role a variant's workers have in the router's list.
fn router_role(r: Role) -> &'static str {
    match r {
        Role::Both => "prefill-decode",
        Role::Prefill => "prefill",
        Role::Decode => "decode",
    }
}

/// The loop's variants from the config: each with its scale target.
pub fn variants(cfg: &AutoscaleConfig, a: &RunArgs) -> Result<Vec<LiveVariant>, String> {
    let mut api: Option<Arc<crate::router::k8s::Api>> = None;
    let mut file: Option<Arc<WorkersFile>> = None;
    let mut out = Vec::new();
    for (i, v) in cfg.variants.iter().enumerate() {
        let target: Box<dyn ScaleTarget> = match &v.target {
            config::ScaleTarget::Kubernetes {
                kind,
                name,
                namespace,
            } => {
                let api = match &api {
                    Some(a) => a.clone(),
                    None => {
                        let base = match &a.k8s_api {
                            Some(u) => u.clone(),
                            None => {
                                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                                    format!("variants[{i}].target: kubernetes outside a pod needs --k8s-api (KUBERNETES_SERVICE_HOST is unset)")
                                })?;
                                let port = std::env::var("KUBERNETES_SERVICE_PORT")
                                    .unwrap_or("443".into());
                                format!("https://{host}:{port}")
                            }
                        };
                        let token_file = a.k8s_token_file.clone().or_else(|| {
                            Some(PathBuf::from(format!("{SA}/token"))).filter(|p| p.exists())
                        });
                        let ca = std::fs::read(format!("{SA}/ca.crt")).ok();
                        let made = Arc::new(crate::router::k8s::Api {
                            base,
                            token_file,
                            timeout: crate::router::workers::K8S_TIMEOUT,
                            client: crate::router::k8s::Api::client(ca.as_deref())?,
                        });
                        api = Some(made.clone());
                        made
                    }
                };
                Box::new(Kubernetes {
                    api,
                    kind: match kind {
                        config::WorkloadKind::Deployment => WorkloadKind::Deployment,
                        config::WorkloadKind::LeaderWorkerSet => WorkloadKind::LeaderWorkerSet,
                    },
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
            }
            config::ScaleTarget::Local {
                model,
                args,
                sidecar_args,
            } => {
                let f = match &file {
                    Some(f) => f.clone(),
                    None => {
                        let path = a.workers_file.clone().ok_or_else(|| {
                            format!("variants[{i}].target: a local pool needs --workers-file (the router's)")
                        })?;
                        let made = WorkersFile::create(path)?;
                        file = Some(made.clone());
                        made
                    }
                };
                let exe =
                    std::env::current_exe().map_err(|e| format!("finding the llmd binary: {e}"))?;
                Box::new(LocalPool::new(
                    LocalPoolConfig {
                        name: v.name.clone(),
                        exe,
                        model: model.clone(),
                        args: args.clone(),
                        router: a.router.trim_end_matches('/').to_string(),
                        start_timeout: Duration::from_secs_f64(v.startup_s.max(1.0) * 4.0 + 30.0),
                        drain_timeout: Duration::from_secs_f64(a.drain_timeout),
                        verbose: a.verbose_workers,
                        role: v.role,
                        sidecar_args: sidecar_args.clone(),
                    },
                    f,
                )?)
            }
        };
        out.push(LiveVariant {
            name: v.name.clone(),
            role: router_role(v.role).to_string(),
            min_replicas: v.min_replicas,
            max_replicas: v.max_replicas,
            target,
        });
    }
    Ok(out)
}

/// Runs the loop until SIGINT/SIGTERM.
pub fn run(a: RunArgs) -> Result<(), String> {
    let cfg = AutoscaleConfig::load(&a.config)?;
    if !(a.drain_timeout.is_finite() && a.drain_timeout > 0.0) {
        return Err("--drain-timeout must be a positive number of seconds".into());
    }
    if !(a.router.starts_with("http://") || a.router.starts_with("https://")) {
        return Err(format!("--router {:?}: an http:// URL", a.router));
    }
    let mut policy = super::policy::build_policy(&a.policy, &cfg)?;
    if a.check_config {
        println!("llmd autoscale run: configuration OK (nothing started)");
        println!("policy: {}", policy.name());
        println!("router: {}", a.router);
        println!("metrics: {}:{}", a.metrics_host, a.metrics_port);
        for v in &cfg.variants {
            let target = match &v.target {
                config::ScaleTarget::Kubernetes {
                    kind,
                    name,
                    namespace,
                } => {
                    format!("{kind:?} {namespace}/{name}")
                }
                config::ScaleTarget::Local { model, .. } => {
                    if a.workers_file.is_none() {
                        return Err(format!(
                            "variant {}: a local pool needs --workers-file",
                            v.name
                        ));
                    }
                    format!("local pool of {model}")
                }
            };
            println!(
                "variant {}: {} replicas {}..={}, {}{}",
                v.name,
                router_role(v.role),
                v.min_replicas,
                v.max_replicas,
                target,
                if a.dry_run {
                    " (dry run: never written)"
                } else {
                    ""
                }
            );
        }
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(async move {
        // Local pools start their workers inside the runtime.
        let mut lp = Loop::new(variants(&cfg, &a)?, a.router.clone(), a.dry_run)?;
        let listener = tokio::net::TcpListener::bind((a.metrics_host.as_str(), a.metrics_port))
            .await
            .map_err(|e| format!("binding the metrics port {}:{}: {e}", a.metrics_host, a.metrics_port))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(%addr, policy = policy.name(), dry_run = a.dry_run, variants = lp.variants.len(), "autoscaler: metrics listening");
        tokio::spawn(serve_metrics(listener, lp.outputs.clone()));
        // Local pools begin at their minimum (a workload already has its replicas).
        if !a.dry_run {
            for v in &lp.variants {
                if v.target.endpoints().is_some() {
                    v.target.scale(v.min_replicas.max(1)).await?;
                }
            }
        }
        let mut decide = move |t: &Telemetry| policy.decide(t);
        lp.run(
            Duration::from_secs_f64(cfg.interval_s),
            &mut decide,
            |s| {
                for v in &s.telemetry.variants {
                    tracing::debug!(variant = %v.variant, ready = v.ready_replicas, starting = v.starting_replicas, waiting = v.waiting, running = v.running, kv_usage = v.kv_usage, desired = s.desired.get(&v.variant).copied().unwrap_or(0), "decision");
                }
            },
            crate::router::sidecar::shutdown_signal(),
        )
        .await;
        tracing::info!("autoscaler: stopping (local workers are stopped with it)");
        Ok(())
    })
}

/// A variant as the loop drives it.
pub struct LiveVariant {
    pub name: String,
    /// Its workers' role as the router lists them (`prefill-decode`, `prefill`, `decode`):
    /// which of the router's workers are this variant's when the target does not say.
    pub role: String,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub target: Box<dyn ScaleTarget>,
}

/// What the loop last decided and saw, per variant: what `/metrics` serves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VariantOutput {
    pub desired: u32,
    pub current: u32,
    pub ready: u32,
}

/// The autoscaler's own metrics, shared with its HTTP server.
#[derive(Default)]
pub struct Outputs {
    state: Mutex<OutputState>,
}

#[derive(Default)]
struct OutputState {
    variants: BTreeMap<String, VariantOutput>,
    /// Unix time of the last decision.
    last_decision: Option<f64>,
    decisions: u64,
    scale_errors: u64,
    scrape_errors: u64,
}

impl Outputs {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn variant(&self, name: &str) -> Option<VariantOutput> {
        self.lock().variants.get(name).cloned()
    }

    /// The Prometheus text `/metrics` serves.
    pub fn render(&self) -> String {
        let g = self.lock();
        let mut out = String::new();
        type Pick = fn(&VariantOutput) -> u32;
        let series: [(&str, &str, Pick); 3] = [
            (
                "llmd:desired_replicas",
                "Replicas the autoscaler wants for the variant (its last decision).",
                |v| v.desired,
            ),
            (
                "llmd:current_replicas",
                "Replicas the variant's scale target has asked for (starting ones included).",
                |v| v.current,
            ),
            (
                "llmd:ready_replicas",
                "Replicas of the variant serving now.",
                |v| v.ready,
            ),
        ];
        for (name, help, pick) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (variant, v) in &g.variants {
                let _ = writeln!(out, "{name}{{variant=\"{variant}\"}} {}", pick(v));
            }
        }
        if let Some(t) = g.last_decision {
            let _ = writeln!(out, "# HELP llmd:autoscale_last_decision_timestamp_seconds Unix time of the autoscaler's last decision.\n# TYPE llmd:autoscale_last_decision_timestamp_seconds gauge\nllmd:autoscale_last_decision_timestamp_seconds {t}");
        }
        let _ = writeln!(out, "# HELP llmd:autoscale_decisions_total Decisions made.\n# TYPE llmd:autoscale_decisions_total counter\nllmd:autoscale_decisions_total {}", g.decisions);
        let _ = writeln!(out, "# HELP llmd:autoscale_scale_errors_total Writes to a scale target that failed.\n# TYPE llmd:autoscale_scale_errors_total counter\nllmd:autoscale_scale_errors_total {}", g.scale_errors);
        let _ = writeln!(out, "# HELP llmd:autoscale_scrape_errors_total Scrapes of the router or a worker that failed.\n# TYPE llmd:autoscale_scrape_errors_total counter\nllmd:autoscale_scrape_errors_total {}", g.scrape_errors);
        out
    }
}

/// Serves `/metrics` (and `/health`) with the loop's outputs until the task is dropped.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    outputs: Arc<Outputs>,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let o = outputs.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        o.render(),
                    )
                }
            }),
        )
        .route("/health", axum::routing::get(|| async { "ok" }));
    axum::serve(listener, app).await
}

/// One interval's result.
#[derive(Clone, Debug)]
pub struct Step {
    pub telemetry: Telemetry,
    /// The policy's answer, clamped to each variant's min..=max.
    pub desired: BTreeMap<String, u32>,
}

/// The loop's state between intervals.
pub struct Loop {
    pub variants: Vec<LiveVariant>,
    /// The router's base URL.
    pub router: String,
    pub dry_run: bool,
    pub outputs: Arc<Outputs>,
    client: reqwest::Client,
    started: Instant,
    last: Option<Scrape>,
}

impl Loop {
    pub fn new(variants: Vec<LiveVariant>, router: String, dry_run: bool) -> Result<Self, String> {
        Ok(Self {
            variants,
            router: router.trim_end_matches('/').to_string(),
            dry_run,
            outputs: Arc::new(Outputs::default()),
            client: reqwest::Client::builder()
                .timeout(scrape::SCRAPE_TIMEOUT)
                .build()
                .map_err(|e| format!("building the HTTP client: {e}"))?,
            started: Instant::now(),
            last: None,
        })
    }

    /// Reads the router, the targets and every variant's workers now.
    async fn scrape(&self) -> Scrape {
        let at_s = self.started.elapsed().as_secs_f64();
        let router = match scrape::fetch(&self.client, &self.router).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "scraping the router failed");
                self.outputs.lock().scrape_errors += 1;
                Vec::new()
            }
        };
        let listed = scrape::router_workers(&router);
        let mut variants = Vec::new();
        for v in &self.variants {
            let r = match v.target.replicas().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(variant = %v.name, error = %e, "reading the replicas failed");
                    Replicas::default()
                }
            };
            let urls = v.target.endpoints().unwrap_or_else(|| {
                listed
                    .iter()
                    .filter(|(_, role)| *role == v.role)
                    .map(|(u, _)| u.clone())
                    .collect()
            });
            let got =
                futures_util::future::join_all(urls.iter().map(|u| scrape::fetch(&self.client, u)))
                    .await;
            let mut workers = Vec::new();
            for (url, g) in urls.into_iter().zip(got) {
                match g {
                    Ok(samples) => workers.push(WorkerScrape { url, samples }),
                    Err(e) => {
                        tracing::debug!(error = %e, "scraping a worker failed");
                        self.outputs.lock().scrape_errors += 1;
                    }
                }
            }
            variants.push(VariantScrape {
                name: v.name.clone(),
                ready: r.ready,
                starting: r.starting,
                workers,
            });
        }
        Scrape {
            at_s,
            router,
            variants,
        }
    }

    /// One interval: scrape, and with a scrape before it, decide and act. The first call only
    /// scrapes (there is no interval yet) and returns None.
    pub async fn step(
        &mut self,
        decide: &mut (dyn FnMut(&Telemetry) -> BTreeMap<String, u32> + Send),
    ) -> Option<Step> {
        let now = self.scrape().await;
        let before = self.last.replace(now)?;
        let now = self.last.as_ref()?;
        let t = scrape::telemetry(&before, now);
        let asked = decide(&t);
        let mut desired = BTreeMap::new();
        for (v, seen) in self.variants.iter().zip(&t.variants) {
            let want = asked
                .get(&v.name)
                .copied()
                .unwrap_or(seen.ready_replicas + seen.starting_replicas)
                .clamp(v.min_replicas, v.max_replicas);
            desired.insert(v.name.clone(), want);
            let current = seen.ready_replicas + seen.starting_replicas;
            if want != current {
                tracing::info!(
                    variant = %v.name,
                    from = current,
                    to = want,
                    dry_run = self.dry_run,
                    target = %v.target.describe(),
                    "scaling"
                );
                if !self.dry_run {
                    if let Err(e) = v.target.scale(want).await {
                        tracing::error!(variant = %v.name, error = %e, "scaling failed");
                        self.outputs.lock().scale_errors += 1;
                    }
                }
            }
            let mut g = self.outputs.lock();
            g.variants.insert(
                v.name.clone(),
                VariantOutput {
                    desired: want,
                    current,
                    ready: seen.ready_replicas,
                },
            );
        }
        {
            let mut g = self.outputs.lock();
            g.decisions += 1;
            g.last_decision = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs_f64());
        }
        Some(Step {
            telemetry: t,
            desired,
        })
    }

    /// Runs [`Loop::step`] every `interval` until `stop` resolves; `on_step` sees each result.
    pub async fn run(
        &mut self,
        interval: Duration,
        decide: &mut (dyn FnMut(&Telemetry) -> BTreeMap<String, u32> + Send),
        mut on_step: impl FnMut(&Step),
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            if let Some(s) = self.step(decide).await {
                on_step(&s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_render_one_family_each_with_every_variant() {
        let o = Outputs::default();
        {
            let mut g = o.lock();
            for (name, d) in [("decode-h100", 3), ("prefill-h100", 1)] {
                g.variants.insert(
                    name.into(),
                    VariantOutput {
                        desired: d,
                        current: 2,
                        ready: 1,
                    },
                );
            }
            g.last_decision = Some(1.7e9);
            g.decisions = 4;
        }
        let text = o.render();
        let s = crate::prometheus::parse(&text).unwrap();
        let get = |name: &str, v: &str| {
            s.iter()
                .find(|x| x.name == name && x.label("variant") == Some(v))
                .map(|x| x.value)
        };
        assert_eq!(get("llmd:desired_replicas", "decode-h100"), Some(3.0));
        assert_eq!(get("llmd:desired_replicas", "prefill-h100"), Some(1.0));
        assert_eq!(get("llmd:current_replicas", "decode-h100"), Some(2.0));
        assert_eq!(get("llmd:ready_replicas", "prefill-h100"), Some(1.0));
        assert_eq!(
            text.matches("# TYPE llmd:desired_replicas gauge").count(),
            1
        );
        assert!(s.iter().any(
            |x| x.name == "llmd:autoscale_last_decision_timestamp_seconds" && x.value == 1.7e9
        ));
    }
}
