//! The autoscaler's YAML config: the variants it scales, the SLOs of the priority bands, the
//! decision cadence and the cluster's GPU budget, plus the simulator's replay settings.
//!
//! Without `--config` the documented default in `deploy/autoscale/default.yaml` (compiled in)
//! is used. Every field a config gets wrong is refused with the field's path named.
use super::capacity::Calibration;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The default fleet and priority mix, kept in the repository.
pub const DEFAULT_CONFIG: &str = include_str!("../../deploy/autoscale/default.yaml");
/// The calibration files shipped in the repository, found by file name when a config's
/// `calibration` cannot be read from disk (the compiled-in default config names them).
const BUILTIN_CALIBRATIONS: &[(&str, &str)] = &[(
    "calibration-h200.json",
    include_str!("../../deploy/autoscale/calibration-h200.json"),
)];

/// What a variant's replicas do in a request's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Prefill,
    Decode,
    Both,
}

/// The Kubernetes workload kind whose `scale` subresource a variant's replicas are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadKind {
    Deployment,
    LeaderWorkerSet,
}

/// Where a variant's replicas live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ScaleTarget {
    /// A Kubernetes workload, scaled through its `scale` subresource.
    Kubernetes {
        kind: WorkloadKind,
        name: String,
        #[serde(default = "default_namespace")]
        namespace: String,
    },
    /// A pool of local `llmd serve` processes on this machine (a decode variant's each behind
    /// an `llmd sidecar`, given `sidecar_args`).
    Local {
        model: String,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        sidecar_args: Vec<String>,
    },
}

fn default_namespace() -> String {
    "default".into()
}

/// One way of serving the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    pub role: Role,
    pub accelerator: String,
    /// GPUs one replica takes (counted against `gpu_budget`); 0 for a CPU replica
    /// (`accelerator: cpu`), which takes none of the budget.
    #[serde(default = "one")]
    pub gpus_per_replica: u32,
    pub cost_per_replica_hour: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Seconds from asking for a replica to its serving.
    pub startup_s: f64,
    /// The calibration (a JSON file, relative to the config file) that is the capacity model's
    /// prior for this variant and the simulator's service model of it.
    pub calibration: String,
    /// `{kubernetes: {kind, name, namespace}}` or `{local: {model, args}}`.
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub target: ScaleTarget,
    /// Only for `static-peak`: a fixed replica count (the simulator finds one when absent).
    #[serde(default)]
    pub static_replicas: Option<u32>,
    /// Filled by [`AutoscaleConfig::load`]/[`AutoscaleConfig::parse`] from `calibration`.
    #[serde(skip)]
    pub capacity: Calibration,
}

impl Variant {
    /// A CPU replica (`accelerator: cpu`, any case): the only kind that may take 0 GPUs.
    pub fn is_cpu(&self) -> bool {
        self.accelerator.eq_ignore_ascii_case("cpu")
    }
}

fn one() -> u32 {
    1
}

/// One priority band (an `InferenceObjective` priority) and its SLO.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    pub priority: i32,
    /// Optional for sheddable bands (priority < 0), which never buy capacity.
    #[serde(default)]
    pub ttft_p95_s: Option<f64>,
    #[serde(default)]
    pub itl_p95_s: Option<f64>,
    /// The simulator's priority mix: this band's share of the trace's requests.
    #[serde(default)]
    pub share: f64,
}

impl Band {
    pub fn sheddable(&self) -> bool {
        self.priority < 0
    }
}

/// How the simulator replays a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    /// Seed of the priority assignment and of the copies' jitter.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Each request is replayed this many times (copies offset by up to one second, seeded):
    /// the trace's rate scaled, its shape kept. Fractions replay a copy with that probability.
    #[serde(default = "one_f")]
    pub rate_scale: f64,
    /// A sheddable request waiting this long at the router is shed.
    #[serde(default = "default_ttl")]
    pub shed_ttl_s: f64,
    /// HPA baseline's target waiting requests per replica.
    #[serde(default = "default_hpa_target")]
    pub hpa_target_queue: f64,
}

fn default_seed() -> u64 {
    7
}
fn one_f() -> f64 {
    1.0
}
fn default_ttl() -> f64 {
    30.0
}
fn default_hpa_target() -> f64 {
    3.0
}

impl Default for Replay {
    fn default() -> Self {
        Replay {
            seed: default_seed(),
            rate_scale: 1.0,
            shed_ttl_s: default_ttl(),
            hpa_target_queue: default_hpa_target(),
        }
    }
}

/// The whole config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleConfig {
    /// Seconds between decisions.
    pub interval_s: f64,
    /// Scale-down takes the highest recommendation over this window (scale-up is immediate).
    pub scale_down_stabilization_s: f64,
    /// GPUs the whole fleet may take (0 only when every variant is a CPU one taking none).
    pub gpu_budget: u32,
    pub variants: Vec<Variant>,
    pub bands: Vec<Band>,
    #[serde(default)]
    pub replay: Replay,
}

impl AutoscaleConfig {
    /// The compiled-in default.
    pub fn default_config() -> Result<Self, String> {
        Self::parse(DEFAULT_CONFIG, None)
    }

    /// Reads and validates a YAML file; calibrations are found relative to it.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        Self::parse(&text, path.parent())
    }

    /// Parses and validates YAML text; `dir` is where relative calibration paths are looked up.
    pub fn parse(text: &str, dir: Option<&Path>) -> Result<Self, String> {
        let mut cfg: AutoscaleConfig =
            serde_yaml_ng::from_str(text).map_err(|e| format!("config: {e}"))?;
        cfg.validate()?;
        for (i, v) in cfg.variants.iter_mut().enumerate() {
            let text = read_calibration(&v.calibration, dir)
                .map_err(|e| format!("variants[{i}].calibration: {e}"))?;
            v.capacity = serde_json::from_str(&text)
                .map_err(|e| format!("variants[{i}].calibration: {}: {e}", v.calibration))?;
            v.capacity
                .validate()
                .map_err(|e| format!("variants[{i}].calibration: {}: {e}", v.calibration))?;
        }
        Ok(cfg)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        let pos = |x: f64| x.is_finite() && x > 0.0;
        if !pos(self.interval_s) {
            return Err("interval_s: must be a positive number of seconds".into());
        }
        if !(self.scale_down_stabilization_s.is_finite() && self.scale_down_stabilization_s >= 0.0)
        {
            return Err("scale_down_stabilization_s: must be ≥ 0 seconds".into());
        }
        if self.gpu_budget == 0 && self.variants.iter().any(|v| v.gpus_per_replica > 0) {
            return Err(
                "gpu_budget: must be at least 1 (0 only for a fleet of CPU replicas)".into(),
            );
        }
        if self.variants.is_empty() {
            return Err("variants: at least one variant is needed".into());
        }
        let mut min_gpus = 0u64;
        for (i, v) in self.variants.iter().enumerate() {
            let f = |field: &str, why: &str| Err(format!("variants[{i}].{field}: {why}"));
            if v.name.is_empty() {
                return f("name", "must not be empty");
            }
            if self.variants[..i].iter().any(|w| w.name == v.name) {
                return f("name", &format!("{:?} is used twice", v.name));
            }
            if v.accelerator.is_empty() {
                return f("accelerator", "must not be empty");
            }
            if v.gpus_per_replica == 0 && !v.is_cpu() {
                return f(
                    "gpus_per_replica",
                    "must be at least 1 (0 only with accelerator cpu)",
                );
            }
            if !(v.cost_per_replica_hour.is_finite() && v.cost_per_replica_hour >= 0.0) {
                return f("cost_per_replica_hour", "must be ≥ 0");
            }
            if v.max_replicas == 0 {
                return f("max_replicas", "must be at least 1");
            }
            if v.min_replicas > v.max_replicas {
                return f(
                    "min_replicas",
                    &format!(
                        "{} is above max_replicas {}",
                        v.min_replicas, v.max_replicas
                    ),
                );
            }
            if !(v.startup_s.is_finite() && v.startup_s >= 0.0) {
                return f("startup_s", "must be ≥ 0 seconds");
            }
            if v.calibration.is_empty() {
                return f("calibration", "must name a calibration file");
            }
            match &v.target {
                ScaleTarget::Kubernetes {
                    name, namespace, ..
                } => {
                    if name.is_empty() {
                        return f("target.kubernetes.name", "must not be empty");
                    }
                    if namespace.is_empty() {
                        return f("target.kubernetes.namespace", "must not be empty");
                    }
                }
                ScaleTarget::Local {
                    model,
                    sidecar_args,
                    ..
                } => {
                    if model.is_empty() {
                        return f("target.local.model", "must not be empty");
                    }
                    if !sidecar_args.is_empty() && v.role != Role::Decode {
                        return f(
                            "target.local.sidecar_args",
                            "only a decode variant's workers have sidecars",
                        );
                    }
                }
            }
            if let Some(s) = v.static_replicas {
                if s < v.min_replicas || s > v.max_replicas {
                    return f(
                        "static_replicas",
                        "must lie within min_replicas..=max_replicas",
                    );
                }
            }
            min_gpus += u64::from(v.min_replicas) * u64::from(v.gpus_per_replica);
        }
        let has = |r: Role| self.variants.iter().any(|v| v.role == r);
        if has(Role::Prefill) != has(Role::Decode) {
            return Err(
                "variants: a prefill variant needs a decode variant and the other way round".into(),
            );
        }
        if min_gpus > u64::from(self.gpu_budget) {
            return Err(format!(
                "gpu_budget: {} is below the {} GPUs the variants' min_replicas take",
                self.gpu_budget, min_gpus
            ));
        }
        if self.bands.is_empty() {
            return Err("bands: at least one priority band is needed".into());
        }
        for (i, b) in self.bands.iter().enumerate() {
            let f = |field: &str, why: &str| Err(format!("bands[{i}].{field}: {why}"));
            if self.bands[..i].iter().any(|c| c.priority == b.priority) {
                return f("priority", &format!("{} is used twice", b.priority));
            }
            for (field, v) in [("ttft_p95_s", b.ttft_p95_s), ("itl_p95_s", b.itl_p95_s)] {
                match v {
                    None if !b.sheddable() => {
                        return f(field, "a band with priority ≥ 0 needs an SLO")
                    }
                    Some(x) if !pos(x) => return f(field, "must be a positive number of seconds"),
                    _ => {}
                }
            }
            if !(b.share.is_finite() && b.share >= 0.0) {
                return f("share", "must be ≥ 0");
            }
        }
        if self.bands.iter().map(|b| b.share).sum::<f64>() <= 0.0 {
            return Err("bands: the shares of the priority mix must not all be 0".into());
        }
        let r = &self.replay;
        if !(pos(r.rate_scale) && r.rate_scale <= 1000.0) {
            return Err("replay.rate_scale: must be in (0, 1000]".into());
        }
        if !pos(r.shed_ttl_s) {
            return Err("replay.shed_ttl_s: must be a positive number of seconds".into());
        }
        if !pos(r.hpa_target_queue) {
            return Err("replay.hpa_target_queue: must be positive".into());
        }
        Ok(())
    }

    /// The bands that buy capacity (priority ≥ 0).
    pub fn slo_bands(&self) -> impl Iterator<Item = &Band> {
        self.bands.iter().filter(|b| !b.sheddable())
    }

    /// The tightest TTFT and ITL p95 SLOs over the bands that buy capacity.
    pub fn tightest_slo(&self) -> (f64, f64) {
        let mut t = (f64::INFINITY, f64::INFINITY);
        for b in self.slo_bands() {
            t.0 = t.0.min(b.ttft_p95_s.unwrap_or(f64::INFINITY));
            t.1 = t.1.min(b.itl_p95_s.unwrap_or(f64::INFINITY));
        }
        t
    }

    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name == name)
    }
}

fn read_calibration(name: &str, dir: Option<&Path>) -> Result<String, String> {
    let path = match dir {
        Some(d) => d.join(name),
        None => Path::new(name).to_path_buf(),
    };
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(t),
        Err(e) => {
            let file = Path::new(name).file_name().and_then(|f| f.to_str());
            BUILTIN_CALIBRATIONS
                .iter()
                .find(|(n, _)| Some(*n) == file && dir.is_none())
                .map(|(_, t)| t.to_string())
                .ok_or_else(|| format!("cannot read {}: {e}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> String {
        DEFAULT_CONFIG.to_string()
    }

    fn refused(text: &str) -> String {
        AutoscaleConfig::parse(text, None).expect_err("a bad config was accepted")
    }

    #[test]
    fn the_default_config_parses_with_its_calibration() {
        let c = AutoscaleConfig::default_config().unwrap();
        assert!(!c.variants.is_empty());
        assert!(c.variants[0].capacity.prefill_tokens_per_s > 0.0);
        assert!(c.bands.iter().any(|b| b.sheddable()));
        let (ttft, itl) = c.tightest_slo();
        assert!(ttft.is_finite() && itl.is_finite());
    }

    #[test]
    fn bad_configs_are_refused_naming_the_field() {
        let cases = [
            ("interval_s: 15", "interval_s: -1", "interval_s"),
            (
                "min_replicas: 1",
                "min_replicas: 99",
                "variants[0].min_replicas",
            ),
            (
                "max_replicas: 64",
                "max_replicas: 0",
                "variants[0].max_replicas",
            ),
            ("startup_s: 120", "startup_s: .nan", "variants[0].startup_s"),
            ("gpu_budget: 64", "gpu_budget: 0", "gpu_budget"),
            ("ttft_p95_s: 2.0", "ttft_p95_s: 0", "bands[0].ttft_p95_s"),
            ("priority: 0", "priority: 2", "bands[1].priority"),
            (
                "calibration: calibration-h200.json",
                "calibration: nowhere.json",
                "variants[0].calibration",
            ),
            ("rate_scale: 8", "rate_scale: 0", "replay.rate_scale"),
            (
                "gpus_per_replica: 1",
                "gpus_per_replica: 0",
                "variants[0].gpus_per_replica",
            ),
            ("kind: Deployment", "kind: StatefulSet", "kind"),
            ("role: both", "role: sideways", "role"),
        ];
        for (from, to, field) in cases {
            let text = base();
            assert!(text.contains(from), "the default config lacks {from:?}");
            let err = refused(&text.replacen(from, to, 1));
            assert!(err.contains(field), "{to:?}: {err:?} does not name {field}");
        }
        // A field nobody knows is refused too.
        let err = refused(&base().replacen("interval_s: 15", "interval_s: 15\nintervl: 3", 1));
        assert!(err.contains("intervl"), "{err}");
        // A sheddable band may go without an SLO; a priority-0 one may not.
        let err = refused(&base().replacen("    ttft_p95_s: 5.0\n", "", 1));
        assert!(err.contains("bands[1].ttft_p95_s"), "{err}");
        // Only a decode variant's local workers have sidecars.
        let local = "local: {model: m, sidecar_args: [--prefiller-allowlist, '*']}";
        let text = base().replacen(
            "kubernetes: {kind: Deployment, name: llmd-8b, namespace: default}",
            local,
            1,
        );
        assert!(text.contains(local));
        let err = refused(&text);
        assert!(
            err.contains("variants[0].target.local.sidecar_args"),
            "{err}"
        );
        let decode = AutoscaleConfig::parse(&text.replacen("role: both", "role: decode", 1), None);
        assert!(
            decode.as_ref().is_ok() || !decode.as_ref().unwrap_err().contains("sidecar_args"),
            "{decode:?}"
        );
    }

    #[test]
    fn the_cpu_fleet_loads_with_the_calibration_the_bench_measured() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/autoscale");
        let c = AutoscaleConfig::load(&dir.join("cpu-smollm2.yaml")).unwrap();
        let measured: Calibration = serde_json::from_str(
            &std::fs::read_to_string(dir.join("calibration-cpu-smollm2.json")).unwrap(),
        )
        .unwrap();
        assert!(
            measured.source.contains("benches/autoscale_calibrate.rs"),
            "{}",
            measured.source
        );
        assert_eq!(c.variants.len(), 1);
        let v = &c.variants[0];
        assert_eq!(v.capacity, measured);
        assert_eq!(
            (v.role, v.gpus_per_replica, c.gpu_budget),
            (Role::Both, 0, 0)
        );
        assert!(v.is_cpu());
        // A local pool serves with the step budget the calibration was measured under.
        let ScaleTarget::Local { args, .. } = &v.target else {
            panic!("{:?}", v.target)
        };
        let chunk = measured.prefill_chunk_tokens.to_string();
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--max-num-batched-tokens" && w[1] == chunk),
            "{args:?}"
        );
        // The trace's ~5 requests/s are scaled down to a CPU fleet's size.
        assert!(c.replay.rate_scale < 1.0);
        // A GPU variant may not take 0 GPUs, nor a fleet with one a 0 GPU budget.
        let text = std::fs::read_to_string(dir.join("cpu-smollm2.yaml")).unwrap();
        let gpu = text.replacen("accelerator: cpu", "accelerator: H200", 1);
        let err = AutoscaleConfig::parse(&gpu, Some(&dir)).unwrap_err();
        assert!(err.contains("variants[0].gpus_per_replica"), "{err}");
        let gpu = gpu.replacen("gpus_per_replica: 0", "gpus_per_replica: 1", 1);
        let err = AutoscaleConfig::parse(&gpu, Some(&dir)).unwrap_err();
        assert!(err.starts_with("gpu_budget"), "{err}");
    }
}
