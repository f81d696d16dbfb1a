//! `llmd autoscale run`: the live loop. Every interval it scrapes the router's and the
//! workers' `/metrics` ([`super::scrape`]), turns the last two scrapes into a
//! [`Telemetry`], asks the policy for the replicas of each variant, and acts: the decision is
//! always published on the autoscaler's own `/metrics` as `llmd:desired_replicas{variant}`
//! (for a KEDA `ScaledObject` or an HPA external metric, as WVA publishes its own), and —
//! unless `--dry-run` — written to each variant's scale target ([`super::target`]).
use super::scrape::{self, Scrape, VariantScrape, WorkerScrape};
use super::target::{Replicas, ScaleTarget};
use super::telemetry::Telemetry;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
        let Some(before) = self.last.replace(now) else {
            return None;
        };
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
