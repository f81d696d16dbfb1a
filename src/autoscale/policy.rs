//! Policies: from one interval's [`Telemetry`] to the desired replicas of every variant.
//!
//! - `llmd`: the cheapest replica counts (and, for P/D, the prefill:decode ratio) that meet every
//!   non-sheddable band's TTFT and ITL p95 for the demand forecast one start-up time ahead, by a
//!   queueing model over the capacity model it learns from the telemetry; fast up, stabilised down,
//!   within the GPU budget. `llmd-ratio-P:D` is the same sizing held to a fixed prefill:decode
//!   ratio (the smallest multiple of P:D that covers both needs), the baseline of the P/D replay.
//! - `wva-saturation`: llm-d WVA's saturation analyzer with its default thresholds.
//! - `hpa-queue`: a Kubernetes HPA on waiting requests per replica.
//! - `static-peak`: fixed counts.
use super::capacity::{Calibration, Learner};
use super::config::{AutoscaleConfig, Role, Variant};
use super::telemetry::{Telemetry, VariantTelemetry};
use std::collections::{BTreeMap, VecDeque};

pub trait Policy: Send {
    fn name(&self) -> &str;
    /// Desired replicas per variant name, given this interval's telemetry.
    fn decide(&mut self, t: &Telemetry) -> BTreeMap<String, u32>;
}

/// The policies by name: "llmd" | "wva-saturation" | "hpa-queue" | "static-peak", and
/// "llmd-ratio-P:D" (e.g. "llmd-ratio-1:3") for a config with prefill and decode variants.
pub fn build_policy(name: &str, cfg: &AutoscaleConfig) -> Result<Box<dyn Policy>, String> {
    match name {
        "llmd" => Ok(Box::new(LlmdPolicy::new(cfg, None))),
        "wva-saturation" => Ok(Box::new(WvaSaturation::new(cfg))),
        "hpa-queue" => Ok(Box::new(HpaQueue::new(cfg))),
        "static-peak" => Ok(Box::new(StaticPeak::new(cfg))),
        other => {
            if let Some(r) = other.strip_prefix("llmd-ratio-") {
                let parse = || -> Option<(u32, u32)> {
                    let (p, d) = r.split_once(':')?;
                    let (p, d) = (p.parse().ok()?, d.parse().ok()?);
                    (p > 0 && d > 0).then_some((p, d))
                };
                let ratio = parse().ok_or_else(|| {
                    format!("policy {other:?}: the ratio must be two positive integers P:D")
                })?;
                let pd = cfg.variants.iter().any(|v| v.role == Role::Prefill);
                if !pd {
                    return Err(format!(
                        "policy {other:?} needs a config with prefill and decode variants"
                    ));
                }
                let mut p = LlmdPolicy::new(cfg, Some(ratio));
                p.name = other.to_string();
                return Ok(Box::new(p));
            }
            Err(format!(
                "unknown policy {other:?} (llmd, wva-saturation, hpa-queue, static-peak, llmd-ratio-P:D)"
            ))
        }
    }
}

fn clamp(v: &Variant, n: u32) -> u32 {
    n.clamp(v.min_replicas, v.max_replicas)
}

/// Cuts counts until the fleet fits the GPU budget: one replica at a time from the variant
/// with the most GPUs above its minimum.
pub fn fit_budget(cfg: &AutoscaleConfig, want: &mut BTreeMap<String, u32>) {
    let gpus = |w: &BTreeMap<String, u32>| -> u64 {
        cfg.variants
            .iter()
            .map(|v| u64::from(w[&v.name]) * u64::from(v.gpus_per_replica))
            .sum()
    };
    while gpus(want) > u64::from(cfg.gpu_budget) {
        let cut = cfg
            .variants
            .iter()
            .filter(|v| want[&v.name] > v.min_replicas)
            .max_by_key(|v| (want[&v.name] - v.min_replicas) * v.gpus_per_replica);
        match cut {
            Some(v) => *want.get_mut(&v.name).unwrap() -= 1,
            None => break,
        }
    }
}

/// Scale-down stabilisation: the highest recommendation within the window (so scale-up, the
/// newest recommendation being the highest, is immediate), as Kubernetes' HPA does.
#[derive(Clone, Debug)]
pub struct Stabilizer {
    window_s: f64,
    history: VecDeque<(f64, BTreeMap<String, u32>)>,
}

impl Stabilizer {
    pub fn new(window_s: f64) -> Self {
        Stabilizer {
            window_s,
            history: VecDeque::new(),
        }
    }

    /// Counts that stand as if recommended at `at_s` (the fleet found at the first decision).
    pub fn seed(&mut self, at_s: f64, counts: BTreeMap<String, u32>) {
        if self.history.is_empty() {
            self.history.push_back((at_s, counts));
        }
    }

    pub fn apply(&mut self, at_s: f64, rec: BTreeMap<String, u32>) -> BTreeMap<String, u32> {
        self.history.push_back((at_s, rec.clone()));
        while self
            .history
            .front()
            .is_some_and(|(t, _)| *t < at_s - self.window_s)
        {
            self.history.pop_front();
        }
        let mut out = rec;
        for (_, past) in &self.history {
            for (k, v) in out.iter_mut() {
                *v = (*v).max(past.get(k).copied().unwrap_or(0));
            }
        }
        out
    }
    /// A policy's last step: the fleet found at the first decision stands for a window as a
    /// recommendation, scale-down takes the window's highest, then the GPU budget applies.
    pub fn decide(
        &mut self,
        cfg: &AutoscaleConfig,
        t: &Telemetry,
        rec: BTreeMap<String, u32>,
    ) -> BTreeMap<String, u32> {
        let found = cfg
            .variants
            .iter()
            .map(|v| (v.name.clone(), current(t, v)))
            .collect();
        self.seed(t.at_s, found);
        let mut out = self.apply(t.at_s, rec);
        fit_budget(cfg, &mut out);
        out
    }
}

fn variant_t<'a>(t: &'a Telemetry, name: &str) -> Option<&'a VariantTelemetry> {
    t.variants.iter().find(|v| v.variant == name)
}

fn current(t: &Telemetry, v: &Variant) -> u32 {
    variant_t(t, &v.name)
        .map(|x| x.ready_replicas + x.starting_replicas)
        .unwrap_or(v.min_replicas)
}

// ---------------------------------------------------------------------------------------------
// static-peak

pub struct StaticPeak {
    counts: BTreeMap<String, u32>,
}

impl StaticPeak {
    /// Each variant's `static_replicas`, or its `max_replicas` when unset.
    pub fn new(cfg: &AutoscaleConfig) -> Self {
        StaticPeak {
            counts: cfg
                .variants
                .iter()
                .map(|v| (v.name.clone(), v.static_replicas.unwrap_or(v.max_replicas)))
                .collect(),
        }
    }
}

impl Policy for StaticPeak {
    fn name(&self) -> &str {
        "static-peak"
    }
    fn decide(&mut self, _t: &Telemetry) -> BTreeMap<String, u32> {
        self.counts.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// hpa-queue

/// Kubernetes' HPA on an external metric, waiting requests per ready replica:
/// `desired = ceil(ready × metric / target)`, no change within the 10 % tolerance, scale-up at
/// most max(4 pods, 100 %) per decision, scale-down stabilised over HPA's default 300 s.
pub struct HpaQueue {
    cfg: AutoscaleConfig,
    target: f64,
    stab: Stabilizer,
}

/// HPA's default `--horizontal-pod-autoscaler-downscale-stabilization`.
pub const HPA_DOWNSCALE_STABILIZATION_S: f64 = 300.0;
/// HPA's default `--horizontal-pod-autoscaler-tolerance`.
pub const HPA_TOLERANCE: f64 = 0.1;

impl HpaQueue {
    pub fn new(cfg: &AutoscaleConfig) -> Self {
        HpaQueue {
            cfg: cfg.clone(),
            target: cfg.replay.hpa_target_queue,
            stab: Stabilizer::new(HPA_DOWNSCALE_STABILIZATION_S),
        }
    }
}

impl Policy for HpaQueue {
    fn name(&self) -> &str {
        "hpa-queue"
    }
    fn decide(&mut self, t: &Telemetry) -> BTreeMap<String, u32> {
        let mut rec = BTreeMap::new();
        for v in &self.cfg.variants {
            let cur = current(t, v);
            let want = match variant_t(t, &v.name) {
                Some(x) if x.ready_replicas > 0 => {
                    let ready = f64::from(x.ready_replicas);
                    let ratio = (x.waiting / ready) / self.target;
                    if (ratio - 1.0).abs() <= HPA_TOLERANCE {
                        cur
                    } else {
                        let d = (ready * ratio).ceil() as u32;
                        // Pods still starting count as meeting the target on a scale-up.
                        let d = if d > x.ready_replicas { d.max(cur) } else { d };
                        d.min(cur.saturating_add(4).max(cur.saturating_mul(2)))
                    }
                }
                _ => cur,
            };
            rec.insert(v.name.clone(), clamp(v, want));
        }
        self.stab.decide(&self.cfg, t, rec)
    }
}

// ---------------------------------------------------------------------------------------------
// wva-saturation

/// WVA's saturation thresholds (its `capacity-scaling-config` defaults).
#[derive(Clone, Copy, Debug)]
pub struct WvaThresholds {
    pub kv_cache_threshold: f64,
    pub queue_length_threshold: f64,
    pub kv_spare_trigger: f64,
    pub queue_spare_trigger: f64,
}

impl Default for WvaThresholds {
    fn default() -> Self {
        WvaThresholds {
            kv_cache_threshold: 0.8,
            queue_length_threshold: 5.0,
            kv_spare_trigger: 0.1,
            queue_spare_trigger: 3.0,
        }
    }
}

/// llm-d WVA's saturation analyzer (its `docs/saturation-analyzer.md`): over the ready replicas
/// of all variants of a role, a replica is saturated at KV ≥ 0.8 or waiting ≥ 5 (peaks over the
/// interval, as WVA's `max_over_time`); the mean spare KV (0.8 − kv) and spare queue (5 − waiting)
/// of the non-saturated ones trigger a scale-up when below 0.1 or 3 (or when none is
/// non-saturated): the cheapest variant goes to ready + 1. Scale-down, when the load of the
/// non-saturated replicas spread over one fewer still leaves spare ≥ the triggers and at least
/// two are non-saturated: the most expensive variant goes to ready − 1. Otherwise no change.
pub struct WvaSaturation {
    cfg: AutoscaleConfig,
    th: WvaThresholds,
}

impl WvaSaturation {
    pub fn new(cfg: &AutoscaleConfig) -> Self {
        WvaSaturation {
            cfg: cfg.clone(),
            th: WvaThresholds::default(),
        }
    }
}

/// WVA's verdict on one group of replicas (`(kv, waiting)` peaks).
#[derive(Debug, PartialEq, Eq)]
pub enum WvaVerdict {
    ScaleUp,
    ScaleDown,
    Hold,
}

pub fn wva_verdict(th: &WvaThresholds, replicas: &[(f64, f64)]) -> WvaVerdict {
    let free: Vec<&(f64, f64)> = replicas
        .iter()
        .filter(|(kv, q)| *kv < th.kv_cache_threshold && *q < th.queue_length_threshold)
        .collect();
    if replicas.is_empty() {
        return WvaVerdict::Hold;
    }
    if free.is_empty() {
        return WvaVerdict::ScaleUp;
    }
    let n = free.len() as f64;
    let spare_kv = free
        .iter()
        .map(|r| th.kv_cache_threshold - r.0)
        .sum::<f64>()
        / n;
    let spare_q = free
        .iter()
        .map(|r| th.queue_length_threshold - r.1)
        .sum::<f64>()
        / n;
    if spare_kv < th.kv_spare_trigger || spare_q < th.queue_spare_trigger {
        return WvaVerdict::ScaleUp;
    }
    if free.len() >= 2 {
        let kv_after = free.iter().map(|r| r.0).sum::<f64>() / (n - 1.0);
        let q_after = free.iter().map(|r| r.1).sum::<f64>() / (n - 1.0);
        if th.kv_cache_threshold - kv_after >= th.kv_spare_trigger
            && th.queue_length_threshold - q_after >= th.queue_spare_trigger
        {
            return WvaVerdict::ScaleDown;
        }
    }
    WvaVerdict::Hold
}

impl Policy for WvaSaturation {
    fn name(&self) -> &str {
        "wva-saturation"
    }
    fn decide(&mut self, t: &Telemetry) -> BTreeMap<String, u32> {
        let mut out: BTreeMap<String, u32> = self
            .cfg
            .variants
            .iter()
            .map(|v| (v.name.clone(), current(t, v)))
            .collect();
        for role in [Role::Both, Role::Prefill, Role::Decode] {
            let group: Vec<&Variant> = self
                .cfg
                .variants
                .iter()
                .filter(|v| v.role == role)
                .collect();
            if group.is_empty() {
                continue;
            }
            let mut reps = Vec::new();
            let mut starting = 0;
            for v in &group {
                if let Some(x) = variant_t(t, &v.name) {
                    reps.extend(x.replicas.iter().map(|r| (r.kv_usage, r.waiting)));
                    starting += x.starting_replicas;
                }
            }
            let ready = |v: &Variant| variant_t(t, &v.name).map_or(0, |x| x.ready_replicas);
            match wva_verdict(&self.th, &reps) {
                WvaVerdict::ScaleUp => {
                    // Cheapest variant with room; ties to the alphabetically first.
                    let pick = group
                        .iter()
                        .filter(|v| ready(v) < v.max_replicas)
                        .min_by(|a, b| {
                            a.cost_per_replica_hour
                                .total_cmp(&b.cost_per_replica_hour)
                                .then(a.name.cmp(&b.name))
                        });
                    if let Some(v) = pick {
                        let cur = out[&v.name];
                        out.insert(v.name.clone(), cur.max(ready(v) + 1));
                    }
                }
                WvaVerdict::ScaleDown if starting == 0 => {
                    let pick = group
                        .iter()
                        .filter(|v| ready(v) > v.min_replicas)
                        .max_by(|a, b| {
                            a.cost_per_replica_hour
                                .total_cmp(&b.cost_per_replica_hour)
                                .then(a.name.cmp(&b.name))
                        });
                    if let Some(v) = pick {
                        out.insert(v.name.clone(), ready(v) - 1);
                    }
                }
                _ => {}
            }
        }
        for v in &self.cfg.variants {
            let n = out[&v.name];
            out.insert(v.name.clone(), clamp(v, n));
        }
        fit_budget(&self.cfg, &mut out);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// llmd

/// The demand of the bands that buy capacity, for one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Demand {
    /// Requests/s, prompt tokens/s and output tokens/s.
    pub rate: f64,
    pub prompt_tps: f64,
    pub output_tps: f64,
    /// Sheddable prompt tokens/s: never sized for, but served when there is room, so their
    /// prefills add to the residual wait of everyone else's (the `W0` of the queueing model).
    pub sheddable_prompt_tps: f64,
}

/// One band's share of the load, for the priority queueing model.
#[derive(Clone, Copy, Debug)]
pub struct BandLoad {
    pub priority: i32,
    /// Fraction of the non-sheddable requests.
    pub fraction: f64,
    pub ttft_slo: f64,
    pub itl_slo: f64,
}

/// Margins of the sizing model.
#[derive(Clone, Copy, Debug)]
pub struct Margins {
    /// Predicted p95s must stay below this fraction of the SLO.
    pub slo_fraction: f64,
    /// The p95 of a queueing delay or a prompt as a multiple of its mean (3 ≈ ln 20, an
    /// exponential tail).
    pub tail: f64,
    /// Highest fraction of `max_batch` and of the KV capacity the predicted batch may fill.
    pub fill: f64,
}

impl Default for Margins {
    fn default() -> Self {
        Margins {
            slo_fraction: 0.8,
            tail: 3.0,
            fill: 0.85,
        }
    }
}

/// Predicted TTFT p95 of each band (by priority, highest first) on one replica that prefills
/// `prompt_tps` tokens/s at an effective `p_eff` tokens/s: a non-preemptive priority M/G/1
/// (service of a mean prompt `S`, exponential-like so E[S²] = 2S²),
/// `W_k = W0 / ((1 − σ_higher)(1 − σ_≤k))`, p95 ≈ tail × (W_k + S). `None` if overloaded.
pub fn ttft_p95(
    demand: &Demand,
    bands: &[BandLoad],
    p_eff: f64,
    m: &Margins,
) -> Option<Vec<(i32, f64)>> {
    if demand.rate <= 0.0 {
        return Some(bands.iter().map(|b| (b.priority, 0.0)).collect());
    }
    let s = demand.prompt_tps / demand.rate / p_eff;
    let u = demand.prompt_tps / p_eff;
    if u >= 1.0 {
        return None;
    }
    // Sheddable prefills take what room is left (at most all of it).
    let u_shed = (demand.sheddable_prompt_tps / p_eff).min(1.0 - u);
    let w0 = (u + u_shed) * s;
    let mut sorted = bands.to_vec();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.priority));
    let mut higher = 0.0;
    let mut out = Vec::new();
    for b in sorted {
        let upto = higher + u * b.fraction;
        let w = w0 / ((1.0 - higher) * (1.0 - upto).max(1e-9));
        out.push((b.priority, m.tail * (w + s)));
        higher = upto;
    }
    Some(out)
}

/// Replicas of a combined (prefill + decode) variant for `d` (fleet-wide): the least n whose
/// per-replica share meets the bands' SLOs, `None` if even `max` does not.
pub fn size_combined(
    c: &Calibration,
    d: &Demand,
    bands: &[BandLoad],
    m: &Margins,
    max: u32,
) -> Option<u32> {
    (1..=max).find(|&n| combined_ok(c, &per_replica(d, n), bands, m))
}

fn per_replica(d: &Demand, n: u32) -> Demand {
    let n = f64::from(n);
    Demand {
        rate: d.rate / n,
        prompt_tps: d.prompt_tps / n,
        output_tps: d.output_tps / n,
        sheddable_prompt_tps: d.sheddable_prompt_tps / n,
    }
}

/// Batch and step time of a decoder producing `d.output_tps` tokens/s while a fraction `busy`
/// of its time goes elsewhere (prefill): `T(1 − busy) = base + (per_seq + per_ctx·ctx)·B`,
/// `B = out_tps·T`. `None` if it cannot keep up.
fn decode_point(c: &Calibration, d: &Demand, busy: f64) -> Option<(f64, f64)> {
    if d.rate <= 0.0 {
        return Some((0.0, c.step_base_s));
    }
    let ctx = d.prompt_tps / d.rate + 0.5 * d.output_tps / d.rate;
    let per_b = c.step_per_seq_s + c.step_per_ctx_token_s * ctx;
    let denom = 1.0 - busy - per_b * d.output_tps;
    if denom <= 0.0 {
        return None;
    }
    let t = c.step_base_s / denom;
    Some((d.output_tps * t, t))
}

fn fits(c: &Calibration, d: &Demand, batch: f64, m: &Margins) -> bool {
    let per_req = if d.rate > 0.0 {
        (d.prompt_tps + d.output_tps) / d.rate
    } else {
        0.0
    };
    batch <= m.fill * f64::from(c.max_batch) && batch * per_req <= m.fill * c.kv_capacity_tokens
}

/// One combined replica at per-replica demand `d`: each band's predicted TTFT p95 and the ITL
/// p95, `None` if it cannot keep up or overflows its batch or KV.
pub fn combined_latency(
    c: &Calibration,
    d: &Demand,
    bands: &[BandLoad],
    m: &Margins,
) -> Option<(Vec<(i32, f64)>, f64)> {
    let rho_p = c.prefill_s(d.prompt_tps);
    let (batch, _) = decode_point(c, d, rho_p)?;
    if !fits(c, d, batch, m) {
        return None;
    }
    let ctx = if d.rate > 0.0 {
        batch * (d.prompt_tps / d.rate + 0.5 * d.output_tps / d.rate)
    } else {
        0.0
    };
    let chunk = f64::from(c.prefill_chunk_tokens);
    let decode = c.decode_step_s(batch, ctx);
    // A step carries a prefill chunk most of the time once prefill is a sizeable share.
    let itl = decode
        + if rho_p > 0.05 {
            c.prefill_s(chunk)
        } else {
            0.0
        };
    // Prefill proceeds a chunk per step: its effective rate is a chunk per (decode + chunk).
    let p_eff = chunk / (decode + c.prefill_s(chunk));
    Some((ttft_p95(d, bands, p_eff, m)?, itl))
}

/// Does one combined replica meet every band's SLO at per-replica demand `d`?
pub fn combined_ok(c: &Calibration, d: &Demand, bands: &[BandLoad], m: &Margins) -> bool {
    let Some((ttfts, itl)) = combined_latency(c, d, bands, m) else {
        return false;
    };
    bands.iter().all(|b| {
        let ttft = ttfts
            .iter()
            .find(|x| x.0 == b.priority)
            .map_or(0.0, |x| x.1);
        ttft <= m.slo_fraction * b.ttft_slo && itl <= m.slo_fraction * b.itl_slo
    })
}

/// Replicas of a prefill-only variant: TTFT of every band from the priority queueing model.
pub fn size_prefill(
    c: &Calibration,
    d: &Demand,
    bands: &[BandLoad],
    m: &Margins,
    max: u32,
) -> Option<u32> {
    (1..=max).find(|&n| {
        let r = per_replica(d, n);
        ttft_p95(&r, bands, c.prefill_tokens_per_s, m).is_some_and(|t| {
            bands.iter().all(|b| {
                let x = t.iter().find(|x| x.0 == b.priority).map_or(0.0, |x| x.1);
                x <= m.slo_fraction * b.ttft_slo
            })
        })
    })
}

/// Replicas of a decode-only variant: ITL (no prefill in its steps), batch and KV limits.
pub fn size_decode(
    c: &Calibration,
    d: &Demand,
    bands: &[BandLoad],
    m: &Margins,
    max: u32,
) -> Option<u32> {
    let itl_slo = bands
        .iter()
        .map(|b| b.itl_slo)
        .fold(f64::INFINITY, f64::min);
    (1..=max).find(|&n| {
        let r = per_replica(d, n);
        decode_point(c, &r, 0.0).is_some_and(|(batch, _)| {
            let ctx = if r.rate > 0.0 {
                batch * (r.prompt_tps / r.rate + 0.5 * r.output_tps / r.rate)
            } else {
                0.0
            };
            fits(c, &r, batch, m) && c.decode_step_s(batch, ctx) <= m.slo_fraction * itl_slo
        })
    })
}

/// Seconds within which the llmd policy plans to clear a backlog.
pub const BACKLOG_CLEAR_S: f64 = 60.0;
/// Requests the token mix (prompt and output tokens per request) is estimated over, at least:
/// the latest intervals holding this many, a minute at least and [`MIX_MAX_INTERVALS`] at most.
/// A fleet seeing hundreds of requests a minute estimates it over the minute; a small one over
/// minutes, so that a few long prompts do not read as a lasting surge.
pub const MIX_MIN_REQUESTS: f64 = 200.0;
/// The most decision intervals the token mix looks back over.
pub const MIX_MAX_INTERVALS: usize = 40;
/// The most the trend may add to the recent demand, as a fraction of it.
pub const TREND_CAP: f64 = 0.3;

/// The `llmd` policy.
pub struct LlmdPolicy {
    name: String,
    cfg: AutoscaleConfig,
    learners: BTreeMap<String, Learner>,
    history: VecDeque<(f64, Demand)>,
    /// Requests, prompt tokens and output tokens of the bands that buy capacity, per interval
    /// (the latest [`MIX_MAX_INTERVALS`]).
    mix: VecDeque<(f64, f64, f64)>,
    stab: Stabilizer,
    /// Multiplies the model's counts; grows when an SLO is seen at risk, decays back.
    headroom: f64,
    ratio: Option<(u32, u32)>,
    pub margins: Margins,
    /// Observed ÷ predicted TTFT p95, smoothed: scales the queueing model's tail factor.
    tail_scale: f64,
}

/// The queueing model's p95-to-mean factor before it has learned the fleet's own.
pub const BASE_TAIL: f64 = 3.0;

impl LlmdPolicy {
    pub fn new(cfg: &AutoscaleConfig, ratio: Option<(u32, u32)>) -> Self {
        LlmdPolicy {
            name: "llmd".into(),
            cfg: cfg.clone(),
            learners: cfg
                .variants
                .iter()
                .map(|v| (v.name.clone(), Learner::new(v.capacity.clone())))
                .collect(),
            history: VecDeque::new(),
            mix: VecDeque::new(),
            stab: Stabilizer::new(cfg.scale_down_stabilization_s),
            headroom: 1.0,
            ratio,
            margins: Margins::default(),
            tail_scale: 1.0,
        }
    }

    /// The learned model of a variant now.
    pub fn model(&self, variant: &str) -> Option<Calibration> {
        self.learners.get(variant).map(|l| l.model())
    }

    /// Demand now and its forecast one start-up time ahead: the mean of the last four
    /// intervals (a minute, the SLO's unit), plus the recent trend (least squares over the last 8 intervals, if rising)
    /// times the horizon, plus the backlog of the bands that buy capacity at the router cleared
    /// within a minute. The tokens per request are those of the latest intervals holding at
    /// least [`MIX_MIN_REQUESTS`] requests (the minute's on a busy fleet). (Replicas' waiting
    /// requests are not counted: they are mostly sheddable ones, which each replica queues
    /// behind everything else.)
    fn forecast(&mut self, t: &Telemetry) -> (Demand, Vec<BandLoad>, Demand) {
        let mut d = Demand::default();
        let mut bands = Vec::new();
        let mut queued = 0.0;
        for b in &self.cfg.bands {
            let Some(x) = t.bands.iter().find(|x| x.priority == b.priority) else {
                continue;
            };
            if b.sheddable() {
                d.sheddable_prompt_tps += x.arrivals_per_s * x.mean_prompt_tokens;
            }
        }
        for b in self.cfg.slo_bands() {
            let bt = t.bands.iter().find(|x| x.priority == b.priority);
            let rate = bt.map_or(0.0, |x| x.arrivals_per_s);
            d.rate += rate;
            if let Some(x) = bt {
                d.prompt_tps += rate * x.mean_prompt_tokens;
                d.output_tps += rate * x.mean_output_tokens;
                queued += x.queued;
            }
            bands.push(BandLoad {
                priority: b.priority,
                fraction: rate,
                ttft_slo: b.ttft_p95_s.unwrap_or(f64::INFINITY),
                itl_slo: b.itl_p95_s.unwrap_or(f64::INFINITY),
            });
        }
        for b in &mut bands {
            b.fraction = if d.rate > 0.0 {
                b.fraction / d.rate
            } else {
                1.0 / self.cfg.slo_bands().count() as f64
            };
        }
        self.history.push_back((t.at_s, d));
        while self.history.len() > 8 {
            self.history.pop_front();
        }
        let secs = t.interval_s;
        self.mix
            .push_back((d.rate * secs, d.prompt_tps * secs, d.output_tps * secs));
        while self.mix.len() > MIX_MAX_INTERVALS {
            self.mix.pop_front();
        }
        let horizon = self
            .cfg
            .variants
            .iter()
            .map(|v| v.startup_s)
            .fold(0.0, f64::max)
            + self.cfg.interval_s;
        let last4: Vec<&Demand> = self.history.iter().rev().take(4).map(|x| &x.1).collect();
        let n4 = last4.len() as f64;
        let recent = Demand {
            rate: last4.iter().map(|x| x.rate).sum::<f64>() / n4,
            prompt_tps: last4.iter().map(|x| x.prompt_tps).sum::<f64>() / n4,
            output_tps: last4.iter().map(|x| x.output_tps).sum::<f64>() / n4,
            sheddable_prompt_tps: last4.iter().map(|x| x.sheddable_prompt_tps).sum::<f64>() / n4,
        };
        let slope = |f: fn(&Demand) -> f64| -> f64 {
            let n = self.history.len() as f64;
            if n < 3.0 {
                return 0.0;
            }
            let mt = self.history.iter().map(|x| x.0).sum::<f64>() / n;
            let my = self.history.iter().map(|x| f(&x.1)).sum::<f64>() / n;
            let sxy: f64 = self
                .history
                .iter()
                .map(|x| (x.0 - mt) * (f(&x.1) - my))
                .sum();
            let sxx: f64 = self.history.iter().map(|x| (x.0 - mt).powi(2)).sum();
            if sxx > 0.0 {
                (sxy / sxx).max(0.0)
            } else {
                0.0
            }
        };
        // The trend's contribution is capped at TREND_CAP of the recent level: a noisy slope
        // over two minutes must not double the fleet.
        let up = |level: f64, slope: f64| level + (slope * horizon).min(TREND_CAP * level);
        let mut f = Demand {
            rate: up(recent.rate, slope(|d| d.rate)),
            prompt_tps: up(recent.prompt_tps, slope(|d| d.prompt_tps)),
            output_tps: up(recent.output_tps, slope(|d| d.output_tps)),
            sheddable_prompt_tps: recent.sheddable_prompt_tps,
        };
        // The token mix over enough requests: the forecast's tokens per request scaled from the
        // last minute's to that of the latest intervals holding MIX_MIN_REQUESTS.
        // One walk back: the last four intervals, then more until MIX_MIN_REQUESTS.
        let (mut minute, mut long) = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0));
        for (i, x) in self.mix.iter().rev().enumerate() {
            if i >= 4 && long.0 >= MIX_MIN_REQUESTS {
                break;
            }
            long = (long.0 + x.0, long.1 + x.1, long.2 + x.2);
            if i < 4 {
                minute = long;
            }
        }
        if minute.0 > 0.0 && long.0 > 0.0 {
            if minute.1 > 0.0 {
                f.prompt_tps *= (long.1 / long.0) / (minute.1 / minute.0);
            }
            if minute.2 > 0.0 {
                f.output_tps *= (long.2 / long.0) / (minute.2 / minute.0);
            }
        }
        if d.rate > 0.0 && queued > 0.0 {
            let extra = queued / BACKLOG_CLEAR_S;
            f.rate += extra;
            f.prompt_tps += extra * d.prompt_tps / d.rate;
            f.output_tps += extra * d.output_tps / d.rate;
        }
        (f, bands, d)
    }

    /// Learns how the observed TTFT p95s compare with what the queueing model predicts for the
    /// fleet and demand of the interval just past (their ratio, smoothed, scales the model's tail
    /// factor within [0.35, 1.5]), and adds headroom while an SLO is being missed.
    fn feedback(&mut self, t: &Telemetry, now: &Demand, bands: &[BandLoad]) {
        let mut worst: f64 = 0.0;
        let mut ratio: Option<f64> = None;
        let unit = Margins {
            tail: BASE_TAIL,
            ..self.margins
        };
        let predicted = self.predict_ttft(t, now, bands, &unit);
        for b in self.cfg.slo_bands() {
            let Some(bt) = t.bands.iter().find(|x| x.priority == b.priority) else {
                continue;
            };
            let Some(q) = bt.ttft.quantile(0.95) else {
                continue;
            };
            if let Some(slo) = b.ttft_p95_s {
                worst = worst.max(q / slo);
            }
            let pred = predicted
                .as_ref()
                .and_then(|p| p.iter().find(|x| x.0 == b.priority).map(|x| x.1));
            if let Some(p) = pred.filter(|&p| p > 0.0 && bt.ttft.count >= 30.0) {
                ratio = Some(ratio.map_or(q / p, |r: f64| r.max(q / p)));
            }
        }
        if let Some(r) = ratio {
            // One overloaded interval (observed far above any model) must not swing it.
            let r = r.clamp(0.25, 1.5);
            self.tail_scale = (0.9 * self.tail_scale + 0.1 * r).clamp(0.4, 1.25);
        }
        self.margins.tail = BASE_TAIL * self.tail_scale;
        // ITL against each band's own SLO where the router measures it per band; otherwise
        // each variant's (all bands mixed, sheddable ones included) against the tightest.
        let per_band: Vec<f64> = self
            .cfg
            .slo_bands()
            .filter_map(|b| {
                let bt = t.bands.iter().find(|x| x.priority == b.priority)?;
                Some(bt.itl.quantile(0.95)? / b.itl_p95_s?)
            })
            .collect();
        if per_band.is_empty() {
            let (_, itl_slo) = self.cfg.tightest_slo();
            for v in &t.variants {
                if let Some(q) = v.itl.quantile(0.95) {
                    worst = worst.max(q / itl_slo);
                }
            }
        } else {
            worst = per_band.into_iter().fold(worst, f64::max);
        }
        // Headroom only while an SLO is being missed now; gone as soon as it is met again
        // (a lasting multiplier over-provisioned for minutes after each transient).
        self.headroom = if worst > 1.0 { 1.2 } else { 1.0 };
    }

    /// The model's TTFT p95 per band for the ready fleet at demand `d`.
    fn predict_ttft(
        &self,
        t: &Telemetry,
        d: &Demand,
        bands: &[BandLoad],
        m: &Margins,
    ) -> Option<Vec<(i32, f64)>> {
        let pd = self.cfg.variants.iter().any(|v| v.role == Role::Prefill);
        let role = if pd { Role::Prefill } else { Role::Both };
        let v = self.cfg.variants.iter().find(|v| v.role == role)?;
        let ready: u32 = self
            .cfg
            .variants
            .iter()
            .filter(|v| v.role == role)
            .filter_map(|v| variant_t(t, &v.name))
            .map(|x| x.ready_replicas)
            .sum();
        if ready == 0 || d.rate <= 0.0 {
            return None;
        }
        let c = self.learners.get(&v.name)?.model();
        let r = per_replica(d, ready);
        if pd {
            ttft_p95(&r, bands, c.prefill_tokens_per_s, m)
        } else {
            combined_latency(&c, &r, bands, m).map(|x| x.0)
        }
    }
}

impl Policy for LlmdPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn decide(&mut self, t: &Telemetry) -> BTreeMap<String, u32> {
        for v in &t.variants {
            if let Some(l) = self.learners.get_mut(&v.variant) {
                l.observe(v);
            }
        }
        let (demand, bands, now) = self.forecast(t);
        self.feedback(t, &now, &bands);
        let m = self.margins;
        let h = self.headroom;
        let scaled = |n: u32| (f64::from(n) * h).ceil() as u32;
        let mut rec: BTreeMap<String, u32> = self
            .cfg
            .variants
            .iter()
            .map(|v| (v.name.clone(), v.min_replicas))
            .collect();
        let models: BTreeMap<String, Calibration> = self
            .learners
            .iter()
            .map(|(k, l)| (k.clone(), l.model()))
            .collect();
        let pd = self.cfg.variants.iter().any(|v| v.role == Role::Prefill);
        if pd {
            // The cheapest prefill variant and the cheapest decode variant, each sized for its
            // own SLO: the ratio is whatever the demand's token mix asks for.
            let best = |role: Role, size: &dyn Fn(&Calibration, u32) -> Option<u32>| {
                self.cfg
                    .variants
                    .iter()
                    .filter(|v| v.role == role)
                    .map(|v| {
                        let n = size(&models[&v.name], v.max_replicas).unwrap_or(v.max_replicas);
                        (v, n)
                    })
                    .min_by(|a, b| {
                        (f64::from(a.1) * a.0.cost_per_replica_hour)
                            .total_cmp(&(f64::from(b.1) * b.0.cost_per_replica_hour))
                    })
            };
            let p = best(Role::Prefill, &|c, max| {
                size_prefill(c, &demand, &bands, &m, max)
            });
            let d = best(Role::Decode, &|c, max| {
                size_decode(c, &demand, &bands, &m, max)
            });
            if let (Some((pv, np)), Some((dv, nd))) = (p, d) {
                let (mut np, mut nd) = (scaled(np), scaled(nd));
                if let Some((rp, rd)) = self.ratio {
                    let k = np.div_ceil(rp).max(nd.div_ceil(rd)).max(1);
                    (np, nd) = (k * rp, k * rd);
                }
                rec.insert(pv.name.clone(), clamp(pv, np));
                rec.insert(dv.name.clone(), clamp(dv, nd));
            }
        } else {
            let pick = self
                .cfg
                .variants
                .iter()
                .filter(|v| v.role == Role::Both)
                .map(|v| {
                    let n = size_combined(&models[&v.name], &demand, &bands, &m, v.max_replicas)
                        .unwrap_or(v.max_replicas);
                    (v, n)
                })
                .min_by(|a, b| {
                    (f64::from(a.1) * a.0.cost_per_replica_hour)
                        .total_cmp(&(f64::from(b.1) * b.0.cost_per_replica_hour))
                });
            if let Some((v, n)) = pick {
                rec.insert(v.name.clone(), clamp(v, scaled(n)));
            }
        }
        self.stab.decide(&self.cfg, t, rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::telemetry::{BandTelemetry, Histogram, ReplicaTelemetry};

    fn cfg() -> AutoscaleConfig {
        AutoscaleConfig::default_config().unwrap()
    }

    fn fleet(ready: u32, starting: u32, reps: &[(f64, f64)], waiting: f64) -> Telemetry {
        Telemetry {
            at_s: 100.0,
            interval_s: 15.0,
            variants: vec![VariantTelemetry {
                variant: "h200-8b".into(),
                ready_replicas: ready,
                starting_replicas: starting,
                waiting,
                replicas: reps
                    .iter()
                    .map(|&(kv_usage, waiting)| ReplicaTelemetry { kv_usage, waiting })
                    .collect(),
                ..Default::default()
            }],
            bands: vec![],
        }
    }

    #[test]
    fn wva_verdicts_match_hand_computed_cases() {
        let th = WvaThresholds::default();
        // Spare KV (0.8−0.75 + 0.8−0.7)/2 = 0.075 < 0.1: up.
        assert_eq!(
            wva_verdict(&th, &[(0.75, 0.0), (0.7, 0.0)]),
            WvaVerdict::ScaleUp
        );
        // Spare queue 5 − 2.5 = 2.5 < 3: up.
        assert_eq!(
            wva_verdict(&th, &[(0.1, 2.0), (0.1, 3.0)]),
            WvaVerdict::ScaleUp
        );
        // Every replica saturated (kv 0.85; queue 6): up.
        assert_eq!(
            wva_verdict(&th, &[(0.85, 0.0), (0.2, 6.0)]),
            WvaVerdict::ScaleUp
        );
        // Three at kv 0.2, queue 0: two would hold kv 0.3 (spare 0.5), queue 0: down.
        assert_eq!(
            wva_verdict(&th, &[(0.2, 0.0), (0.2, 0.0), (0.2, 0.0)]),
            WvaVerdict::ScaleDown
        );
        // Two at kv 0.4: one would hold 0.8 (spare 0 < 0.1): hold.
        assert_eq!(
            wva_verdict(&th, &[(0.4, 0.0), (0.4, 0.0)]),
            WvaVerdict::Hold
        );
        // One replica never scales down.
        assert_eq!(wva_verdict(&th, &[(0.0, 0.0)]), WvaVerdict::Hold);
    }

    #[test]
    fn wva_steps_by_one_from_ready_replicas() {
        let c = cfg();
        let mut p = build_policy("wva-saturation", &c).unwrap();
        assert_eq!(p.name(), "wva-saturation");
        let up = p.decide(&fleet(3, 0, &[(0.1, 4.0), (0.1, 4.0), (0.1, 4.0)], 12.0));
        assert_eq!(up["h200-8b"], 4);
        // Scale-up while one is starting: ready + 1 = current, no cascade.
        let up = p.decide(&fleet(3, 1, &[(0.1, 4.0), (0.1, 4.0), (0.1, 4.0)], 12.0));
        assert_eq!(up["h200-8b"], 4);
        let down = p.decide(&fleet(3, 0, &[(0.1, 0.0), (0.1, 0.0), (0.1, 0.0)], 0.0));
        assert_eq!(down["h200-8b"], 2);
    }

    #[test]
    fn hpa_follows_its_formula_and_stabilises_down_for_five_minutes() {
        let c = cfg();
        let mut p = build_policy("hpa-queue", &c).unwrap();
        // 4 ready, 24 waiting = 6 a replica, target 3: ceil(4 × 6/3) = 8.
        let mut t = fleet(4, 0, &[], 24.0);
        assert_eq!(p.decide(&t)["h200-8b"], 8);
        // 8 ready, 12 waiting = 1.5 a replica: ceil(8 × 0.5) = 4, but 8 stays for 300 s.
        t = fleet(8, 0, &[], 12.0);
        t.at_s = 200.0;
        assert_eq!(p.decide(&t)["h200-8b"], 8);
        t.at_s = 401.0;
        assert_eq!(p.decide(&t)["h200-8b"], 4);
        // Within the 10 % tolerance: no change (4 ready, 12.8 waiting = 3.2 a replica).
        t = fleet(4, 0, &[], 12.8);
        t.at_s = 800.0;
        assert_eq!(p.decide(&t)["h200-8b"], 4);
        // Scale-up is limited to max(4 pods, 100 %) a decision: 2 → 4... not 2 → 20.
        t = fleet(2, 0, &[], 60.0);
        t.at_s = 1200.0;
        assert_eq!(p.decide(&t)["h200-8b"], 6);
    }

    #[test]
    fn static_peak_never_moves() {
        let mut c = cfg();
        c.variants[0].static_replicas = Some(7);
        let mut p = build_policy("static-peak", &c).unwrap();
        for n in [1, 30] {
            assert_eq!(p.decide(&fleet(n, 0, &[], 100.0))["h200-8b"], 7);
        }
        assert!(build_policy("nope", &c).is_err());
        assert!(
            build_policy("llmd-ratio-1:3", &c).is_err(),
            "no P/D variants"
        );
    }

    #[test]
    fn the_priority_queue_model_matches_a_hand_computed_case() {
        // One replica, 2 req/s of 500-token prompts at 2000 tokens/s: S = 0.25 s, u = 0.5,
        // W0 = 0.125 s. High band (half the load): σ = 0.25, W = 0.125/(1·0.75) = 1/6 s;
        // low band: W = 0.125/(0.75·0.5) = 1/3 s. p95 = 3 (W + S).
        let d = Demand {
            rate: 2.0,
            prompt_tps: 1000.0,
            output_tps: 0.0,
            sheddable_prompt_tps: 0.0,
        };
        let b = |priority| BandLoad {
            priority,
            fraction: 0.5,
            ttft_slo: 1.0,
            itl_slo: 1.0,
        };
        let got = ttft_p95(&d, &[b(0), b(2)], 2000.0, &Margins::default()).unwrap();
        assert_eq!(got[0].0, 2);
        assert!((got[0].1 - 3.0 * (1.0 / 6.0 + 0.25)).abs() < 1e-12);
        assert!((got[1].1 - 3.0 * (1.0 / 3.0 + 0.25)).abs() < 1e-12);
        // Overloaded: none.
        let over = Demand {
            prompt_tps: 2500.0,
            ..d
        };
        assert!(ttft_p95(&over, &[b(0)], 2000.0, &Margins::default()).is_none());
    }

    fn demand_telemetry(at: f64, rate: f64, prompt: f64, output: f64, priority: i32) -> Telemetry {
        Telemetry {
            at_s: at,
            interval_s: 15.0,
            variants: vec![VariantTelemetry {
                variant: "h200-8b".into(),
                ready_replicas: 1,
                ..Default::default()
            }],
            bands: vec![BandTelemetry {
                priority,
                arrivals_per_s: rate,
                mean_prompt_tokens: prompt,
                mean_output_tokens: output,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn llmd_sizes_by_prefill_demand_and_ignores_sheddable_traffic() {
        let c = cfg();
        let m = Margins::default();
        let cal = &c.variants[0].capacity;
        // Hand-computed lower bound: 60 req/s × 1000 prompt tokens = 60,000 tokens/s of prefill
        // at ≤ 6,250 tokens/s a replica needs ≥ 10 replicas.
        let d = Demand {
            rate: 60.0,
            prompt_tps: 60_000.0,
            output_tps: 6_000.0,
            sheddable_prompt_tps: 0.0,
        };
        let bands = [BandLoad {
            priority: 0,
            fraction: 1.0,
            ttft_slo: 5.0,
            itl_slo: 0.25,
        }];
        let n = size_combined(cal, &d, &bands, &m, 64).unwrap();
        assert!((10..=20).contains(&n), "{n}");
        assert!(combined_ok(cal, &per_replica(&d, n), &bands, &m));
        assert!(!combined_ok(cal, &per_replica(&d, n - 1), &bands, &m));

        let mut p = build_policy("llmd", &c).unwrap();
        let got = p.decide(&demand_telemetry(15.0, 60.0, 1000.0, 100.0, 0))["h200-8b"];
        assert!(got >= 10, "{got}");
        // Only sheddable traffic: min replicas, however much of it.
        let mut p = build_policy("llmd", &c).unwrap();
        for i in 1..20 {
            let t = demand_telemetry(15.0 * f64::from(i), 500.0, 3000.0, 300.0, -1);
            assert_eq!(p.decide(&t)["h200-8b"], c.variants[0].min_replicas);
        }
    }

    #[test]
    fn itl_is_judged_per_band_against_its_own_slo_when_the_router_measures_it() {
        let c = cfg();
        // ITL p95 of 0.22 s: over the tightest band's 0.2 s, under priority 0's 0.25 s.
        let slow = Histogram {
            buckets: vec![(0.2, 0.0), (0.225, 100.0), (f64::INFINITY, 100.0)],
            count: 100.0,
            sum: 22.0,
        };
        let base = demand_telemetry(15.0, 30.0, 1000.0, 100.0, 0);
        let decide = |t: &Telemetry| build_policy("llmd", &c).unwrap().decide(t)["h200-8b"];
        let calm = decide(&base);
        // Only the variant's ITL (all bands mixed): judged against the tightest SLO, so the
        // policy adds headroom.
        let mut mixed = base.clone();
        mixed.variants[0].itl = slow.clone();
        assert!(decide(&mixed) > calm, "{} vs {calm}", decide(&mixed));
        // The router's per-band ITL says priority 0 (the only band with traffic) meets its own.
        let mut banded = mixed.clone();
        banded.bands[0].itl = slow.clone();
        assert_eq!(decide(&banded), calm);
        // And a band over its own SLO does add headroom.
        let mut over = mixed.clone();
        over.bands[0].itl = Histogram {
            buckets: vec![(0.25, 0.0), (0.3, 100.0), (f64::INFINITY, 100.0)],
            count: 100.0,
            sum: 28.0,
        };
        assert!(decide(&over) > calm);
    }

    #[test]
    fn the_token_mix_is_read_over_enough_requests() {
        let c = cfg();
        // A small fleet: 0.5 requests/s of 500-token prompts (7.5 requests an interval), then
        // an interval whose requests are all 8,000 tokens long.
        let feed = |rate: f64| {
            let mut p = LlmdPolicy::new(&c, None);
            for i in 0..39 {
                p.forecast(&demand_telemetry(
                    15.0 * f64::from(i),
                    rate,
                    500.0,
                    100.0,
                    0,
                ));
            }
            p.forecast(&demand_telemetry(15.0 * 39.0, rate, 8000.0, 100.0, 0))
                .0
        };
        let f = feed(0.5);
        // The last minute's mix is (3 × 500 + 8000) / 4 = 2375 tokens a request, its prompt
        // tokens/s 1187.5, raised by the (capped) trend to 1.3 × 1187.5. The mix over the
        // latest 27 intervals (≥ 200 requests) is (26 × 500 + 8000) / 27.
        let want = 1.3 * 1187.5 * (21_000.0 / 27.0) / 2375.0;
        assert!(
            (f.prompt_tps - want).abs() < 1e-6,
            "{} vs {want}",
            f.prompt_tps
        );
        assert!(
            (f.output_tps - 0.5 * 100.0).abs() < 1e-9,
            "{}",
            f.output_tps
        );
        // A large fleet has ≥ 200 requests in its last minute: the minute's mix stands.
        let f = feed(100.0);
        let minute = 100.0 * (3.0 * 500.0 + 8000.0) / 4.0;
        assert!(
            (f.prompt_tps - 1.3 * minute).abs() < 1e-6,
            "{}",
            f.prompt_tps
        );
    }

    #[test]
    fn llmd_scales_up_at_once_and_down_only_after_the_window() {
        let c = cfg();
        let mut p = build_policy("llmd", &c).unwrap();
        let hi = p.decide(&demand_telemetry(0.0, 60.0, 1000.0, 100.0, 0))["h200-8b"];
        // Load gone: the stabilisation window holds the count, then it drops.
        let mut at = 0.0;
        let mut last = hi;
        while at < c.scale_down_stabilization_s - 30.0 {
            at += 15.0;
            last = p.decide(&demand_telemetry(at, 0.0, 0.0, 0.0, 0))["h200-8b"];
            assert_eq!(last, hi, "dropped at {at} s");
        }
        for _ in 0..40 {
            at += 15.0;
            last = p.decide(&demand_telemetry(at, 0.0, 0.0, 0.0, 0))["h200-8b"];
        }
        assert_eq!(last, c.variants[0].min_replicas);
    }

    #[test]
    fn the_budget_cuts_the_largest_first() {
        let mut c = cfg();
        c.gpu_budget = 10;
        let mut w: BTreeMap<String, u32> = [("h200-8b".to_string(), 30)].into();
        fit_budget(&c, &mut w);
        assert_eq!(w["h200-8b"], 10);
    }
}
