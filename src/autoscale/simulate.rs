//! The `llmd autoscale simulate` command: replays a trace against every policy and reports.
use super::config::{AutoscaleConfig, Role};
use super::policy::build_policy;
use super::sim::{self, RunResult};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// A CSV trace: TIMESTAMP,ContextTokens,GeneratedTokens (any length).
    #[arg(long)]
    pub trace: PathBuf,
    /// The autoscaler's YAML config (default: the fleet and priority mix of
    /// deploy/autoscale/default.yaml, compiled in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Replays the trace this many times faster (arrival times divided by it).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Replays each request this many times (overrides the config's replay.rate_scale).
    #[arg(long)]
    pub rate_scale: Option<f64>,
    /// Policies to run, comma-separated (default: llmd, wva-saturation, hpa-queue,
    /// static-peak, and with prefill/decode variants also llmd-ratio-1:1 and llmd-ratio-1:3).
    #[arg(long, value_delimiter = ',')]
    pub policies: Option<Vec<String>>,
    /// Prints one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Writes a PNG per policy run here (load, replicas per variant, TTFT p95 vs the SLO).
    #[arg(long)]
    pub png_dir: Option<PathBuf>,
}

pub fn main(a: SimulateArgs) -> Result<(), String> {
    let mut cfg = match &a.config {
        Some(p) => AutoscaleConfig::load(p)?,
        None => AutoscaleConfig::default_config()?,
    };
    if let Some(r) = a.rate_scale {
        cfg.replay.rate_scale = r;
        cfg.validate().map_err(|e| format!("--rate-scale: {e}"))?;
    }
    let trace = sim::read_trace(&a.trace, a.time_scale)?;
    let (reqs, refused) = sim::refuse_over_model_len(&cfg, sim::expand(&trace, &cfg));
    let pd = cfg.variants.iter().any(|v| v.role == Role::Prefill);
    let names: Vec<String> = match &a.policies {
        Some(p) => p.clone(),
        None => {
            let mut n: Vec<String> = ["llmd", "wva-saturation", "hpa-queue", "static-peak"]
                .map(String::from)
                .to_vec();
            if pd {
                n.extend(["llmd-ratio-1:1".into(), "llmd-ratio-1:3".into()]);
            }
            n
        }
    };
    for n in &names {
        build_policy(n, &cfg)?;
    }
    let start = sim::initial_fleet(&cfg, &reqs);
    let mut results: Vec<RunResult> = Vec::new();
    let mut static_counts = None;
    for n in &names {
        let r = if n == "static-peak" {
            let counts = sim::size_static_peak(&cfg, &reqs);
            let mut c = cfg.clone();
            for v in &mut c.variants {
                v.static_replicas = Some(counts[&v.name]);
            }
            let mut p = build_policy(n, &c)?;
            static_counts = Some(counts.clone());
            sim::run(&c, &reqs, p.as_mut(), &counts)
        } else {
            let mut p = build_policy(n, &cfg)?;
            sim::run(&cfg, &reqs, p.as_mut(), &start)
        };
        if let Some(dir) = &a.png_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("--png-dir {}: {e}", dir.display()))?;
            let file = dir.join(format!("{}.png", n.replace(':', "-")));
            super::plot::write_png(&file, &cfg, &r)?;
        }
        results.push(r);
    }
    let bound = sim::hindsight_bound(&cfg, &reqs);
    let causal = sim::causal_reference(&cfg, &bound);
    if a.json {
        let policies: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let att: BTreeMap<String, f64> = r
                    .bands
                    .iter()
                    .filter_map(|b| b.attainment.map(|x| (b.priority.to_string(), x)))
                    .collect();
                let shed: BTreeMap<String, u64> =
                    r.bands.iter().map(|b| (b.priority.to_string(), b.shed)).collect();
                let requests: BTreeMap<String, u64> =
                    r.bands.iter().map(|b| (b.priority.to_string(), b.requests)).collect();
                json!({
                    "name": r.policy,
                    "replica_hours": r.replica_hours,
                    "cost": r.cost,
                    "slo_attainment": att,
                    "shed": shed,
                    "scale_events": r.scale_events,
                    "variant_replica_hours": r.variant_replica_hours,
                    "requests": requests,
                    "minutes": r.minutes,
                    "per_minute": r.bands.iter().map(|b| (b.priority.to_string(), json!({"ttft_p95": b.ttft_p95, "itl_p95": b.itl_p95}))).collect::<BTreeMap<_, _>>(),
                    "timeline": r.timeline,
                    "max_replicas": r.timeline.iter().map(|p| p.replicas.iter().sum::<u32>()).max().unwrap_or(0),
                })
            })
            .collect();
        let out = json!({
            "trace_requests": trace.len(),
            "replayed_requests": reqs.len(),
            "refused_over_max_model_len": refused,
            "time_scale": a.time_scale,
            "rate_scale": cfg.replay.rate_scale,
            "initial_fleet": start,
            "static_peak_replicas": static_counts,
            "hindsight_bound": {"replica_hours": bound.replica_hours, "cost": bound.cost, "per_minute": bound.per_minute},
            "causal_reference": causal,
            "policies": policies,
        });
        println!("{out}");
    } else {
        println!(
            "{} trace requests, {} replayed (time scale {}, rate scale {}; {refused} refused: prompt + output over max_model_len), {} minutes",
            trace.len(),
            reqs.len(),
            a.time_scale,
            cfg.replay.rate_scale,
            results.first().map_or(0, |r| r.minutes)
        );
        let prios: Vec<i32> = cfg.bands.iter().map(|b| b.priority).collect();
        print!("| policy | replica-hours | cost | scale events |");
        for p in &prios {
            print!(" attainment p{p} | shed p{p} |");
        }
        println!();
        for r in &results {
            print!(
                "| {} | {:.2} | {:.2} | {} |",
                r.policy, r.replica_hours, r.cost, r.scale_events
            );
            for b in &r.bands {
                match b.attainment {
                    Some(x) => print!(" {:.1} % |", 100.0 * x),
                    None => print!(" — |"),
                }
                print!(" {} |", b.shed);
            }
            println!();
        }
        println!(
            "hindsight bound (each minute alone on the least idle fleet that meets it): {:.2} replica-hours, cost {:.2}",
            bound.replica_hours, bound.cost
        );
        println!(
            "causal reference (knows the bound of each minute begun when it must ask, a start-up ahead; the highest of the last {} plus the least margin {:?} that meets every minute): {:.2} replica-hours, cost {:.2}",
            causal.window_minutes, causal.margin, causal.replica_hours, causal.cost
        );
    }
    Ok(())
}
