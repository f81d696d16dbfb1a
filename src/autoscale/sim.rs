//! `llmd autoscale simulate`: a discrete-event model of the fleet replaying a trace.
//!
//! Arrivals come from a CSV in the shared trace's format (`TIMESTAMP,ContextTokens,
//! GeneratedTokens`), time-scaled and rate-scaled by stated factors, each request given a
//! priority band by a seeded draw over the config's mix. The router queues per replica by
//! priority, holds sheddable requests while every replica is saturated (KV ≥ 0.8 or 5 waiting,
//! the EPP's saturation defaults) and sheds them after `shed_ttl_s`. Each replica batches
//! continuously with the variant's [`Calibration`]: a step decodes one token for every running
//! sequence and prefills up to a chunk of prompt tokens, and takes the capacity model's time;
//! the batch is limited by `max_batch` and by KV (a request reserves prompt + output tokens).
//! New replicas serve after `startup_s`; removed ones drain (finish what they hold). Every
//! interval the simulator hands the policy the same [`Telemetry`] the live loop scrapes.
use super::capacity::Calibration;
use super::config::{AutoscaleConfig, Role};
use super::policy::{self, BandLoad, Demand, Margins, Policy};
use super::telemetry::{BandTelemetry, Histogram, ReplicaTelemetry, Telemetry, VariantTelemetry};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::Path;

/// One request of a trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TraceRequest {
    /// Seconds since the trace's first request.
    pub at_s: f64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

/// Reads a `TIMESTAMP,ContextTokens,GeneratedTokens` CSV (timestamps as
/// `YYYY-MM-DD HH:MM:SS[.fraction]` or as seconds), sorted by time, times relative to the first
/// and divided by `time_scale` (2 replays twice as fast).
pub fn read_trace(path: &Path, time_scale: f64) -> Result<Vec<TraceRequest>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read trace {}: {e}", path.display()))?;
    parse_trace(&text, time_scale).map_err(|e| format!("trace {}: {e}", path.display()))
}

pub fn parse_trace(text: &str, time_scale: f64) -> Result<Vec<TraceRequest>, String> {
    if !(time_scale.is_finite() && time_scale > 0.0) {
        return Err("--time-scale must be a positive number".into());
    }
    let mut lines = text.lines().enumerate();
    let header = lines.next().ok_or("empty file")?.1;
    let cols: Vec<&str> = header.split(',').map(|c| c.trim()).collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or(format!(
                "line 1: no {name} column (want TIMESTAMP,ContextTokens,GeneratedTokens)"
            ))
    };
    let (ct, cc, cg) = (
        col("TIMESTAMP")?,
        col("ContextTokens")?,
        col("GeneratedTokens")?,
    );
    let mut out = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(|c| c.trim()).collect();
        let get = |c: usize| {
            f.get(c)
                .copied()
                .ok_or(format!("line {}: too few fields", i + 1))
        };
        let at =
            parse_time(get(ct)?).ok_or(format!("line {}: bad TIMESTAMP {:?}", i + 1, get(ct)?))?;
        let tok = |c: usize, what: &str| -> Result<u32, String> {
            get(c)?
                .parse::<u32>()
                .map_err(|_| format!("line {}: bad {what} {:?}", i + 1, f[c]))
        };
        out.push(TraceRequest {
            at_s: at,
            prompt_tokens: tok(cc, "ContextTokens")?.max(1),
            output_tokens: tok(cg, "GeneratedTokens")?.max(1),
        });
    }
    if out.is_empty() {
        return Err("no requests".into());
    }
    out.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let t0 = out[0].at_s;
    for r in &mut out {
        r.at_s = (r.at_s - t0) / time_scale;
    }
    Ok(out)
}

/// Seconds since 1970 of `YYYY-MM-DD HH:MM:SS[.frac]`, or a plain number of seconds.
fn parse_time(s: &str) -> Option<f64> {
    if let Ok(x) = s.parse::<f64>() {
        return x.is_finite().then_some(x);
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.trim_end_matches('Z').split(':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&dd)
        || h > 23
        || mi > 59
        || !(0.0..61.0).contains(&sec)
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + h * 3600 + mi * 60) as f64 + sec)
}

fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// One request of the replay: the trace's, copied `rate_scale` times and given a band.
#[derive(Clone, Debug)]
pub struct SimRequest {
    pub at_s: f64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    /// Index into the config's bands.
    pub band: usize,
}

/// The replay's requests: `rate_scale` copies of each (the first at the trace's time, the others
/// up to one second later; a fraction of a copy is a seeded coin), bands drawn by the config's
/// shares, all from `replay.seed`.
pub fn expand(trace: &[TraceRequest], cfg: &AutoscaleConfig) -> Vec<SimRequest> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.replay.seed);
    let total: f64 = cfg.bands.iter().map(|b| b.share).sum();
    let scale = cfg.replay.rate_scale;
    let mut out = Vec::new();
    for r in trace {
        let whole = scale.floor() as u32;
        let copies = whole + u32::from(uniform(&mut rng) < scale - f64::from(whole));
        for c in 0..copies {
            let at = if c == 0 {
                r.at_s
            } else {
                r.at_s + uniform(&mut rng)
            };
            let mut x = uniform(&mut rng) * total;
            let mut band = cfg.bands.len() - 1;
            for (i, b) in cfg.bands.iter().enumerate() {
                if x < b.share {
                    band = i;
                    break;
                }
                x -= b.share;
            }
            out.push(SimRequest {
                at_s: at,
                prompt_tokens: r.prompt_tokens,
                output_tokens: r.output_tokens,
                band,
            });
        }
    }
    out.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    out
}

/// The requests a fleet serves and how many it refuses: a request whose prompt and output
/// together exceed the shortest `max_model_len` of the variants' calibrations gets a 400 from
/// the worker (as vLLM's) and never reaches a queue, so it is left out of the replay.
pub fn refuse_over_model_len(
    cfg: &AutoscaleConfig,
    reqs: Vec<SimRequest>,
) -> (Vec<SimRequest>, usize) {
    let Some(max) = cfg
        .variants
        .iter()
        .filter_map(|v| v.capacity.max_model_len)
        .min()
    else {
        return (reqs, 0);
    };
    let n = reqs.len();
    let kept: Vec<SimRequest> = reqs
        .into_iter()
        .filter(|r| u64::from(r.prompt_tokens) + u64::from(r.output_tokens) <= u64::from(max))
        .collect();
    let refused = n - kept.len();
    (kept, refused)
}

// ---------------------------------------------------------------------------------------------
// Histograms

/// vLLM's TTFT and ITL bucket bounds.
const TTFT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

#[derive(Clone, Debug)]
struct HistAcc {
    bounds: &'static [f64],
    counts: Vec<f64>,
    sum: f64,
}

impl HistAcc {
    fn new(bounds: &'static [f64]) -> Self {
        HistAcc {
            bounds,
            counts: vec![0.0; bounds.len() + 1],
            sum: 0.0,
        }
    }
    fn add(&mut self, x: f64, n: f64) {
        let i = self.bounds.partition_point(|&b| b < x);
        self.counts[i] += n;
        self.sum += x * n;
    }
    fn take(&mut self) -> Histogram {
        let mut cum = 0.0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            cum += c;
            buckets.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), cum));
        }
        let h = Histogram {
            buckets,
            count: cum,
            sum: self.sum,
        };
        *self = HistAcc::new(self.bounds);
        h
    }
}

/// A fine log-bucketed histogram (2 % wide) for the per-minute p95s.
#[derive(Clone, Debug, Default)]
struct FineHist {
    counts: BTreeMap<i32, f64>,
    total: f64,
}

impl FineHist {
    const RATIO: f64 = 1.02;
    fn add(&mut self, x: f64, n: f64) {
        let k = if x <= 1e-6 {
            i32::MIN
        } else {
            (x.ln() / Self::RATIO.ln()).ceil() as i32
        };
        *self.counts.entry(k).or_default() += n;
        self.total += n;
    }
    /// Upper bound of the bucket holding the q quantile.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.total <= 0.0 {
            return None;
        }
        let rank = q * self.total;
        let mut cum = 0.0;
        for (&k, &c) in &self.counts {
            cum += c;
            if cum >= rank {
                return Some(if k == i32::MIN {
                    0.0
                } else {
                    Self::RATIO.powi(k)
                });
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Starting,
    Ready,
    Draining,
    Gone,
}

#[derive(Clone, Debug)]
struct Req {
    at: f64,
    prompt: u32,
    output: u32,
    band: usize,
    priority: i32,
    prefilled: u32,
    generated: u32,
}

impl Req {
    fn kv(&self) -> f64 {
        f64::from(self.prompt + self.output)
    }
}

struct Replica {
    variant: usize,
    state: State,
    started_at: f64,
    ended_at: Option<f64>,
    /// Waiting requests, highest priority first, then oldest.
    waiting: Vec<usize>,
    prefilling: Vec<usize>,
    decoding: Vec<usize>,
    /// Context tokens of the decoding sequences.
    dec_ctx: f64,
    kv_reserved: f64,
    kv_used: f64,
    /// The step in flight: its duration and the prompt tokens it prefills per request.
    step: Option<(f64, Vec<(usize, u32)>)>,
    peak_kv: f64,
    peak_waiting: f64,
}

impl Replica {
    fn load(&self) -> usize {
        self.waiting.len() + self.prefilling.len() + self.decoding.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    Arrival(usize),
    StepEnd(usize),
    Ready(usize),
    Decide,
}

#[derive(Clone, Copy, Debug)]
struct Timed {
    at: f64,
    seq: u64,
    ev: Event,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    // Earliest first out of a max-heap.
    fn cmp(&self, o: &Self) -> Ordering {
        o.at.total_cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Clone, Debug)]
struct VariantAcc {
    steps: f64,
    prompt_tokens: f64,
    gen_tokens: f64,
    ttft: HistAcc,
    itl: HistAcc,
}

#[derive(Clone, Debug)]
struct BandAcc {
    arrivals: f64,
    prompt: f64,
    output: f64,
    shed: f64,
    ttft: HistAcc,
    itl: HistAcc,
}

/// One point of a run's timeline (one per decision).
#[derive(Clone, Debug, Serialize)]
pub struct TimelinePoint {
    pub at_s: f64,
    /// Requests/s arriving over the last interval (all bands).
    pub arrivals_per_s: f64,
    /// Replicas asked for (ready + starting) per variant, in config order.
    pub replicas: Vec<u32>,
}

/// One band's result.
#[derive(Clone, Debug, Serialize)]
pub struct BandResult {
    pub priority: i32,
    /// Fraction of minutes whose TTFT p95 and ITL p95 both met the band's SLO (a minute with
    /// none of the band's requests meets it); `None` for a band without an SLO.
    pub attainment: Option<f64>,
    pub shed: u64,
    pub requests: u64,
    /// TTFT p95 and ITL p95 per minute (seconds; `None` with no samples).
    pub ttft_p95: Vec<Option<f64>>,
    pub itl_p95: Vec<Option<f64>>,
}

/// One policy's run.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub policy: String,
    pub replica_hours: f64,
    pub cost: f64,
    /// Decisions that changed some variant's count.
    pub scale_events: u64,
    pub variant_replica_hours: BTreeMap<String, f64>,
    pub bands: Vec<BandResult>,
    pub minutes: usize,
    pub timeline: Vec<TimelinePoint>,
}

impl RunResult {
    /// Does every band with priority ≥ 0 meet its SLO in at least `fraction` of minutes?
    pub fn meets(&self, fraction: f64) -> bool {
        self.bands
            .iter()
            .filter(|b| b.priority >= 0)
            .all(|b| b.attainment.unwrap_or(1.0) >= fraction)
    }
}

struct Sim<'a> {
    cfg: &'a AutoscaleConfig,
    caps: Vec<Calibration>,
    reqs: Vec<Req>,
    replicas: Vec<Replica>,
    events: BinaryHeap<Timed>,
    seq: u64,
    now: f64,
    /// Requests held at the router (no replica, or sheddable while all are saturated).
    router: Vec<usize>,
    /// P/D: prefilled requests waiting for a decode replica.
    decode_queue: Vec<usize>,
    pd: bool,
    done: usize,
    vacc: Vec<VariantAcc>,
    bacc: Vec<BandAcc>,
    minute_ttft: Vec<Vec<Vec<f64>>>,
    minute_itl: Vec<Vec<FineHist>>,
    shed: Vec<u64>,
    arrivals_interval: f64,
}

fn insert_by_priority(q: &mut Vec<usize>, reqs: &[Req], id: usize) {
    let key = |i: usize| (std::cmp::Reverse(reqs[i].priority), reqs[i].at);
    let k = key(id);
    let pos = q.partition_point(|&x| {
        let kx = key(x);
        kx.0 < k.0 || (kx.0 == k.0 && kx.1 <= k.1)
    });
    q.insert(pos, id);
}

impl<'a> Sim<'a> {
    fn push(&mut self, at: f64, ev: Event) {
        self.seq += 1;
        self.events.push(Timed {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn minute(&self, t: f64, minutes: usize) -> usize {
        ((t / 60.0) as usize).min(minutes - 1)
    }

    fn saturated(&self, r: &Replica) -> bool {
        let cap = &self.caps[r.variant];
        r.kv_used / cap.kv_capacity_tokens >= 0.8 || r.waiting.len() >= 5
    }

    fn entry_role(&self) -> Role {
        if self.pd {
            Role::Prefill
        } else {
            Role::Both
        }
    }

    /// The ready replica of `role` with the fewest waiting, then least KV; `None` if none.
    fn pick(&self, role: Role, unsaturated_only: bool) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, r) in self.replicas.iter().enumerate() {
            if r.state != State::Ready || self.cfg.variants[r.variant].role != role {
                continue;
            }
            if unsaturated_only && self.saturated(r) {
                continue;
            }
            let cap = &self.caps[r.variant];
            let score = r.waiting.len() as f64 + r.kv_reserved / cap.kv_capacity_tokens;
            if best.is_none_or(|b| score < b.1) {
                best = Some((i, score));
            }
        }
        best.map(|b| b.0)
    }

    fn enqueue(&mut self, rep: usize, id: usize) {
        insert_by_priority(&mut self.replicas[rep].waiting, &self.reqs, id);
        let w = self.replicas[rep].waiting.len() as f64;
        let r = &mut self.replicas[rep];
        r.peak_waiting = r.peak_waiting.max(w);
        if r.step.is_none() {
            self.start_step(rep);
        }
    }

    /// Tries to place a request at the entry role; false if it must stay at the router.
    fn dispatch(&mut self, id: usize) -> bool {
        let sheddable = self.reqs[id].priority < 0;
        match self.pick(self.entry_role(), sheddable) {
            Some(rep) => {
                self.enqueue(rep, id);
                true
            }
            None => false,
        }
    }

    /// Sheds expired sheddable requests and places what it can of the router's queue.
    fn drain_router(&mut self, minutes: usize) {
        let ttl = self.cfg.replay.shed_ttl_s;
        let now = self.now;
        let mut keep = Vec::new();
        let held = std::mem::take(&mut self.router);
        for id in held {
            let r = &self.reqs[id];
            if r.priority < 0 && now - r.at >= ttl {
                self.shed[r.band] += 1;
                self.bacc[r.band].shed += 1.0;
                self.done += 1;
                let _ = minutes;
                continue;
            }
            if !self.dispatch(id) {
                keep.push(id);
            }
        }
        self.router = keep;
        if self.pd {
            let held = std::mem::take(&mut self.decode_queue);
            for id in held {
                match self.pick(Role::Decode, false) {
                    Some(rep) => self.enqueue(rep, id),
                    None => self.decode_queue.push(id),
                }
            }
        }
    }

    fn start_step(&mut self, rep: usize) {
        let role = self.cfg.variants[self.replicas[rep].variant].role;
        let cap = self.caps[self.replicas[rep].variant].clone();
        let r = &mut self.replicas[rep];
        if r.step.is_some() || !matches!(r.state, State::Ready | State::Draining) {
            return;
        }
        let max_batch = cap.max_batch as usize;
        let mut prefill = Vec::new();
        let mut prefill_tokens = 0u32;
        if role == Role::Decode {
            while let Some(&id) = r.waiting.first() {
                let need = self.reqs[id].kv();
                if r.decoding.len() >= max_batch || r.kv_reserved + need > cap.kv_capacity_tokens {
                    break;
                }
                r.waiting.remove(0);
                r.kv_reserved += need;
                let ctx = f64::from(self.reqs[id].prompt + self.reqs[id].generated);
                r.kv_used += ctx;
                r.dec_ctx += ctx;
                r.decoding.push(id);
            }
        } else {
            let mut budget = cap.prefill_chunk_tokens;
            for &id in &r.prefilling {
                if budget == 0 {
                    break;
                }
                let q = &self.reqs[id];
                let take = (q.prompt - q.prefilled).min(budget);
                budget -= take;
                prefill.push((id, take));
            }
            while budget > 0 {
                let Some(&id) = r.waiting.first() else { break };
                let need = self.reqs[id].kv();
                if r.prefilling.len() + r.decoding.len() >= max_batch
                    || r.kv_reserved + need > cap.kv_capacity_tokens
                {
                    break;
                }
                r.waiting.remove(0);
                r.kv_reserved += need;
                r.prefilling.push(id);
                let take = self.reqs[id].prompt.min(budget);
                budget -= take;
                prefill.push((id, take));
            }
            prefill_tokens = cap.prefill_chunk_tokens - budget;
        }
        if r.decoding.is_empty() && prefill_tokens == 0 {
            return;
        }
        let dur = cap.decode_step_s(r.decoding.len() as f64, r.dec_ctx)
            + cap.prefill_s(f64::from(prefill_tokens));
        r.step = Some((dur, prefill));
        let at = self.now + dur;
        self.push(at, Event::StepEnd(rep));
    }

    fn finish(&mut self, rep: usize, id: usize) {
        let kv = self.reqs[id].kv();
        let r = &mut self.replicas[rep];
        r.kv_reserved -= kv;
        self.done += 1;
    }

    fn step_end(&mut self, rep: usize, minutes: usize) {
        let now = self.now;
        let (dur, prefill) = self.replicas[rep].step.take().expect("a step in flight");
        let v = self.replicas[rep].variant;
        let role = self.cfg.variants[v].role;
        let minute = self.minute(now, minutes);
        // Decode: one token for every decoding sequence.
        let decoding = std::mem::take(&mut self.replicas[rep].decoding);
        let mut keep = Vec::with_capacity(decoding.len());
        let mut per_band = vec![0.0; self.cfg.bands.len()];
        for id in decoding {
            let q = &mut self.reqs[id];
            q.generated += 1;
            per_band[q.band] += 1.0;
            let r = &mut self.replicas[rep];
            r.dec_ctx += 1.0;
            r.kv_used += 1.0;
            if q.generated >= q.output {
                let ctx = f64::from(q.prompt + q.generated);
                r.dec_ctx -= ctx;
                r.kv_used -= ctx;
                self.finish(rep, id);
            } else {
                keep.push(id);
            }
        }
        self.replicas[rep].decoding = keep;
        let n_dec: f64 = per_band.iter().sum();
        for (b, &n) in per_band.iter().enumerate() {
            if n > 0.0 {
                self.minute_itl[b][minute].add(dur, n);
                self.bacc[b].itl.add(dur, n);
            }
        }
        self.vacc[v].itl.add(dur, n_dec);
        self.vacc[v].gen_tokens += n_dec;
        self.vacc[v].steps += 1.0;
        // Prefill.
        for (id, take) in prefill {
            self.vacc[v].prompt_tokens += f64::from(take);
            self.replicas[rep].kv_used += f64::from(take);
            let q = &mut self.reqs[id];
            q.prefilled += take;
            if q.prefilled < q.prompt {
                continue;
            }
            q.generated = 1;
            let ttft = now - q.at;
            let (band, at) = (q.band, q.at);
            let arrival_minute = self.minute(at, minutes);
            self.minute_ttft[band][arrival_minute].push(ttft);
            self.vacc[v].ttft.add(ttft, 1.0);
            self.bacc[band].ttft.add(ttft, 1.0);
            self.vacc[v].gen_tokens += 1.0;
            let r = &mut self.replicas[rep];
            r.prefilling.retain(|&x| x != id);
            let q = &self.reqs[id];
            let ctx = f64::from(q.prompt + 1);
            if q.generated >= q.output {
                r.kv_used -= f64::from(q.prompt);
                self.finish(rep, id);
            } else if role == Role::Prefill {
                // The KV moves to a decoder (transfer time not modelled).
                r.kv_used -= f64::from(q.prompt);
                r.kv_reserved -= q.kv();
                match self.pick(Role::Decode, false) {
                    Some(d) => self.enqueue(d, id),
                    None => self.decode_queue.push(id),
                }
            } else {
                r.kv_used += 1.0;
                r.dec_ctx += ctx;
                r.decoding.push(id);
            }
        }
        let cap = &self.caps[v];
        let r = &mut self.replicas[rep];
        r.peak_kv = r.peak_kv.max(r.kv_used / cap.kv_capacity_tokens);
        if r.state == State::Draining && r.load() == 0 {
            r.state = State::Gone;
            r.ended_at = Some(now);
        }
        if !self.router.is_empty() || !self.decode_queue.is_empty() {
            self.drain_router(minutes);
        }
        self.start_step(rep);
    }

    fn active(&self, v: usize) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&i| {
                self.replicas[i].variant == v
                    && matches!(self.replicas[i].state, State::Starting | State::Ready)
            })
            .collect()
    }

    fn add_replica(&mut self, v: usize, ready_now: bool) {
        let id = self.replicas.len();
        self.replicas.push(Replica {
            variant: v,
            state: if ready_now {
                State::Ready
            } else {
                State::Starting
            },
            started_at: self.now,
            ended_at: None,
            waiting: Vec::new(),
            prefilling: Vec::new(),
            decoding: Vec::new(),
            dec_ctx: 0.0,
            kv_reserved: 0.0,
            kv_used: 0.0,
            step: None,
            peak_kv: 0.0,
            peak_waiting: 0.0,
        });
        if !ready_now {
            let at = self.now + self.cfg.variants[v].startup_s;
            self.push(at, Event::Ready(id));
        }
    }

    /// Moves variant `v` to `want` replicas; true if that changed anything.
    fn scale(&mut self, v: usize, want: u32) -> bool {
        let active = self.active(v);
        let have = active.len() as u32;
        if want > have {
            for _ in have..want {
                self.add_replica(v, false);
            }
        } else if want < have {
            let mut excess = (have - want) as usize;
            // Cancel starting replicas first, newest first, then drain the least loaded.
            let mut starting: Vec<usize> = active
                .iter()
                .copied()
                .filter(|&i| self.replicas[i].state == State::Starting)
                .collect();
            starting.reverse();
            for i in starting.into_iter().take(excess) {
                self.replicas[i].state = State::Gone;
                self.replicas[i].ended_at = Some(self.now);
                excess -= 1;
            }
            let mut ready: Vec<usize> = active
                .into_iter()
                .filter(|&i| self.replicas[i].state == State::Ready)
                .collect();
            ready.sort_by_key(|&i| (self.replicas[i].load(), std::cmp::Reverse(i)));
            for i in ready.into_iter().take(excess) {
                let r = &mut self.replicas[i];
                if r.load() == 0 {
                    r.state = State::Gone;
                    r.ended_at = Some(self.now);
                } else {
                    r.state = State::Draining;
                }
            }
        }
        want != have
    }

    fn telemetry(&mut self, interval: f64) -> Telemetry {
        let mut variants = Vec::new();
        for (vi, v) in self.cfg.variants.iter().enumerate() {
            let cap = &self.caps[vi];
            let mut vt = VariantTelemetry {
                variant: v.name.clone(),
                kv_capacity_tokens: cap.kv_capacity_tokens,
                ..Default::default()
            };
            let mut kv = 0.0;
            for r in self.replicas.iter_mut().filter(|r| r.variant == vi) {
                match r.state {
                    State::Ready => {
                        vt.ready_replicas += 1;
                        vt.waiting += r.waiting.len() as f64;
                        vt.running += (r.prefilling.len() + r.decoding.len()) as f64;
                        let now_kv = r.kv_used / cap.kv_capacity_tokens;
                        kv += now_kv;
                        vt.replicas.push(ReplicaTelemetry {
                            kv_usage: r.peak_kv.max(now_kv),
                            waiting: r.peak_waiting.max(r.waiting.len() as f64),
                        });
                    }
                    State::Starting => vt.starting_replicas += 1,
                    _ => {}
                }
                r.peak_kv = r.kv_used / cap.kv_capacity_tokens;
                r.peak_waiting = r.waiting.len() as f64;
            }
            if vt.ready_replicas > 0 {
                vt.kv_usage = kv / f64::from(vt.ready_replicas);
            }
            let a = &mut self.vacc[vi];
            vt.steps_per_s = a.steps / interval;
            vt.prompt_tokens_per_s = a.prompt_tokens / interval;
            vt.generation_tokens_per_s = a.gen_tokens / interval;
            vt.ttft = a.ttft.take();
            vt.itl = a.itl.take();
            (a.steps, a.prompt_tokens, a.gen_tokens) = (0.0, 0.0, 0.0);
            variants.push(vt);
        }
        let mut bands = Vec::new();
        for (bi, b) in self.cfg.bands.iter().enumerate() {
            let a = &mut self.bacc[bi];
            let queued = self
                .router
                .iter()
                .filter(|&&id| self.reqs[id].band == bi)
                .count() as f64;
            bands.push(BandTelemetry {
                priority: b.priority,
                arrivals_per_s: a.arrivals / interval,
                mean_prompt_tokens: if a.arrivals > 0.0 {
                    a.prompt / a.arrivals
                } else {
                    0.0
                },
                mean_output_tokens: if a.arrivals > 0.0 {
                    a.output / a.arrivals
                } else {
                    0.0
                },
                queued,
                shed: a.shed,
                ttft: a.ttft.take(),
                itl: a.itl.take(),
            });
            (a.arrivals, a.prompt, a.output, a.shed) = (0.0, 0.0, 0.0, 0.0);
        }
        Telemetry {
            at_s: self.now,
            interval_s: interval,
            variants,
            bands,
        }
    }
}

/// The fleet every dynamic policy starts with: sized by the calibrated model for the replay's
/// first minute of non-sheddable demand, as if the service had been running before the replay.
pub fn initial_fleet(cfg: &AutoscaleConfig, reqs: &[SimRequest]) -> BTreeMap<String, u32> {
    // The busiest minute of the first start-up time + one minute: what a policy that had been
    // running would have had ready when the replay begins.
    let startup = cfg.variants.iter().map(|v| v.startup_s).fold(0.0, f64::max);
    let span = startup + 60.0;
    let mut d = Demand::default();
    let mut per_band = vec![0.0; cfg.bands.len()];
    let mut from = 0.0;
    while from < span {
        let mut m = Demand::default();
        let mut pb = vec![0.0; cfg.bands.len()];
        for r in reqs
            .iter()
            .filter(|r| r.at_s >= from && r.at_s < from + 60.0)
        {
            if cfg.bands[r.band].sheddable() {
                m.sheddable_prompt_tps += f64::from(r.prompt_tokens) / 60.0;
                continue;
            }
            m.rate += 1.0 / 60.0;
            m.prompt_tps += f64::from(r.prompt_tokens) / 60.0;
            m.output_tps += f64::from(r.output_tokens) / 60.0;
            pb[r.band] += 1.0;
        }
        if m.prompt_tps > d.prompt_tps {
            (d, per_band) = (m, pb);
        }
        from += 60.0;
    }
    let total: f64 = per_band.iter().sum::<f64>().max(1.0);
    let bands: Vec<BandLoad> = cfg
        .bands
        .iter()
        .enumerate()
        .filter(|(_, b)| !b.sheddable())
        .map(|(i, b)| BandLoad {
            priority: b.priority,
            fraction: per_band[i] / total,
            ttft_slo: b.ttft_p95_s.unwrap_or(f64::INFINITY),
            itl_slo: b.itl_p95_s.unwrap_or(f64::INFINITY),
        })
        .collect();
    let m = Margins::default();
    let mut out = BTreeMap::new();
    let pd = cfg.variants.iter().any(|v| v.role == Role::Prefill);
    let mut first_of = |role: Role| {
        let mut done = false;
        for v in cfg.variants.iter().filter(|v| v.role == role) {
            let n = if done {
                v.min_replicas
            } else {
                done = true;
                let c = &v.capacity;
                match role {
                    Role::Both => policy::size_combined(c, &d, &bands, &m, v.max_replicas),
                    Role::Prefill => policy::size_prefill(c, &d, &bands, &m, v.max_replicas),
                    Role::Decode => policy::size_decode(c, &d, &bands, &m, v.max_replicas),
                }
                .unwrap_or(v.max_replicas)
            };
            out.insert(v.name.clone(), n.clamp(v.min_replicas, v.max_replicas));
        }
    };
    if pd {
        first_of(Role::Prefill);
        first_of(Role::Decode);
    }
    first_of(Role::Both);
    out
}

/// Replays `reqs` with `policy` deciding every interval from the given starting fleet.
pub fn run(
    cfg: &AutoscaleConfig,
    reqs: &[SimRequest],
    policy: &mut dyn Policy,
    start: &BTreeMap<String, u32>,
) -> RunResult {
    let nb = cfg.bands.len();
    let last = reqs.last().map_or(0.0, |r| r.at_s);
    let minutes = ((last / 60.0).floor() as usize + 1).max(1);
    let mut sim = Sim {
        cfg,
        caps: cfg.variants.iter().map(|v| v.capacity.clone()).collect(),
        reqs: reqs
            .iter()
            .map(|r| Req {
                at: r.at_s,
                prompt: r.prompt_tokens,
                output: r.output_tokens,
                band: r.band,
                priority: cfg.bands[r.band].priority,
                prefilled: 0,
                generated: 0,
            })
            .collect(),
        replicas: Vec::new(),
        events: BinaryHeap::new(),
        seq: 0,
        now: 0.0,
        router: Vec::new(),
        decode_queue: Vec::new(),
        pd: cfg.variants.iter().any(|v| v.role == Role::Prefill),
        done: 0,
        vacc: vec![
            VariantAcc {
                steps: 0.0,
                prompt_tokens: 0.0,
                gen_tokens: 0.0,
                ttft: HistAcc::new(TTFT_BOUNDS),
                itl: HistAcc::new(ITL_BOUNDS),
            };
            cfg.variants.len()
        ],
        bacc: vec![
            BandAcc {
                arrivals: 0.0,
                prompt: 0.0,
                output: 0.0,
                shed: 0.0,
                ttft: HistAcc::new(TTFT_BOUNDS),
                itl: HistAcc::new(ITL_BOUNDS),
            };
            nb
        ],
        minute_ttft: vec![vec![Vec::new(); minutes]; nb],
        minute_itl: vec![vec![FineHist::default(); minutes]; nb],
        shed: vec![0; nb],
        arrivals_interval: 0.0,
    };
    for (vi, v) in cfg.variants.iter().enumerate() {
        for _ in 0..start.get(&v.name).copied().unwrap_or(v.min_replicas) {
            sim.add_replica(vi, true);
        }
    }
    for (i, r) in reqs.iter().enumerate() {
        sim.push(r.at_s, Event::Arrival(i));
    }
    sim.push(cfg.interval_s, Event::Decide);
    let mut timeline = Vec::new();
    let mut scale_events = 0;
    // Past the last arrival, the replay runs until every request is done (or an hour more).
    let give_up = last + 3600.0;
    while let Some(Timed { at, ev, .. }) = sim.events.pop() {
        if sim.done >= sim.reqs.len() && !matches!(ev, Event::StepEnd(_)) && at > last {
            break;
        }
        if at > give_up {
            break;
        }
        sim.now = at;
        match ev {
            Event::Arrival(id) => {
                let (b, p, o) = (sim.reqs[id].band, sim.reqs[id].prompt, sim.reqs[id].output);
                sim.bacc[b].arrivals += 1.0;
                sim.bacc[b].prompt += f64::from(p);
                sim.bacc[b].output += f64::from(o);
                sim.arrivals_interval += 1.0;
                if !sim.dispatch(id) {
                    sim.router.push(id);
                    let held = std::mem::take(&mut sim.router);
                    for h in held {
                        insert_by_priority(&mut sim.router, &sim.reqs, h);
                    }
                }
            }
            Event::StepEnd(rep) => sim.step_end(rep, minutes),
            Event::Ready(rep) => {
                if sim.replicas[rep].state == State::Starting {
                    sim.replicas[rep].state = State::Ready;
                    sim.drain_router(minutes);
                }
            }
            Event::Decide => {
                sim.drain_router(minutes);
                let t = sim.telemetry(cfg.interval_s);
                let want = policy.decide(&t);
                let mut changed = false;
                for (vi, v) in cfg.variants.iter().enumerate() {
                    let n = want
                        .get(&v.name)
                        .copied()
                        .unwrap_or(v.min_replicas)
                        .clamp(v.min_replicas, v.max_replicas);
                    changed |= sim.scale(vi, n);
                }
                scale_events += u64::from(changed);
                timeline.push(TimelinePoint {
                    at_s: sim.now,
                    arrivals_per_s: sim.arrivals_interval / cfg.interval_s,
                    replicas: (0..cfg.variants.len())
                        .map(|v| sim.active(v).len() as u32)
                        .collect(),
                });
                sim.arrivals_interval = 0.0;
                sim.drain_router(minutes);
                let next = sim.now + cfg.interval_s;
                sim.push(next, Event::Decide);
            }
        }
    }
    let end = sim.now.max(last);
    let mut variant_replica_hours = BTreeMap::new();
    let (mut hours, mut cost) = (0.0, 0.0);
    for (vi, v) in cfg.variants.iter().enumerate() {
        let h: f64 = sim
            .replicas
            .iter()
            .filter(|r| r.variant == vi)
            .map(|r| (r.ended_at.unwrap_or(end).min(end) - r.started_at).max(0.0) / 3600.0)
            .sum();
        hours += h;
        cost += h * v.cost_per_replica_hour;
        variant_replica_hours.insert(v.name.clone(), h);
    }
    // Requests never served count as an infinite TTFT in their arrival minute.
    let mut unserved = vec![vec![0usize; minutes]; nb];
    for q in &sim.reqs {
        if q.prefilled < q.prompt && q.priority >= 0 {
            unserved[q.band][((q.at / 60.0) as usize).min(minutes - 1)] += 1;
        }
    }
    let mut bands = Vec::new();
    for (bi, b) in cfg.bands.iter().enumerate() {
        let mut met = 0;
        let mut ttft_p95 = Vec::new();
        let mut itl_p95 = Vec::new();
        for (m, &lost) in unserved[bi].iter().enumerate() {
            let mut xs = std::mem::take(&mut sim.minute_ttft[bi][m]);
            xs.extend(std::iter::repeat_n(f64::INFINITY, lost));
            let t = p95(&mut xs);
            let i = sim.minute_itl[bi][m].quantile(0.95);
            let ok_t = match (t, b.ttft_p95_s) {
                (Some(x), Some(s)) => x <= s,
                _ => true,
            };
            let ok_i = match (i, b.itl_p95_s) {
                (Some(x), Some(s)) => x <= s,
                _ => true,
            };
            met += usize::from(ok_t && ok_i);
            ttft_p95.push(t);
            itl_p95.push(i);
        }
        let has_slo = b.ttft_p95_s.is_some() || b.itl_p95_s.is_some();
        bands.push(BandResult {
            priority: b.priority,
            attainment: has_slo.then(|| met as f64 / minutes as f64),
            shed: sim.shed[bi],
            requests: sim.reqs.iter().filter(|q| q.band == bi).count() as u64,
            ttft_p95,
            itl_p95,
        });
    }
    RunResult {
        policy: policy.name().to_string(),
        replica_hours: hours,
        cost,
        scale_events,
        variant_replica_hours,
        bands,
        minutes,
        timeline,
    }
}

/// The p95 by nearest rank; `None` when empty.
fn p95(xs: &mut [f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let rank = ((0.95 * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    Some(xs[rank - 1])
}

/// static-peak's counts: the smallest fixed fleet that meets every band's SLO (priority ≥ 0) in
/// ≥ 99 % of minutes on this replay, found by replaying (bisection per role: decode first with
/// prefill at its maximum, then prefill). The best any static provisioning could do with
/// hindsight of the whole trace; the maximum if even that misses.
pub fn size_static_peak(cfg: &AutoscaleConfig, reqs: &[SimRequest]) -> BTreeMap<String, u32> {
    let mut counts: BTreeMap<String, u32> = cfg
        .variants
        .iter()
        .map(|v| (v.name.clone(), v.static_replicas.unwrap_or(v.max_replicas)))
        .collect();
    let order: Vec<usize> = {
        let mut o: Vec<usize> = (0..cfg.variants.len())
            .filter(|&i| cfg.variants[i].static_replicas.is_none())
            .collect();
        o.sort_by_key(|&i| match cfg.variants[i].role {
            Role::Decode => 0,
            Role::Both => 1,
            Role::Prefill => 2,
        });
        o
    };
    for vi in order {
        let v = &cfg.variants[vi];
        let ok = |n: u32, counts: &BTreeMap<String, u32>| {
            let mut c = cfg.clone();
            for w in &mut c.variants {
                w.static_replicas = Some(if w.name == v.name { n } else { counts[&w.name] });
            }
            let mut p = policy::StaticPeak::new(&c);
            let start: BTreeMap<String, u32> = c
                .variants
                .iter()
                .map(|w| (w.name.clone(), w.static_replicas.unwrap()))
                .collect();
            run(&c, reqs, &mut p, &start).meets(0.99)
        };
        let (mut lo, mut hi) = (v.min_replicas.max(1), v.max_replicas);
        if !ok(hi, &counts) {
            continue;
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if ok(mid, &counts) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        counts.insert(v.name.clone(), hi);
    }
    counts
}

/// What no policy can beat on a replay, estimated with hindsight.
#[derive(Clone, Debug, Serialize)]
pub struct HindsightBound {
    pub replica_hours: f64,
    pub cost: f64,
    /// The least fleet per minute (variant → replicas).
    pub per_minute: Vec<BTreeMap<String, u32>>,
    /// Hours each minute counts for (the last one only up to the last arrival).
    #[serde(skip)]
    pub minute_hours: Vec<f64>,
}

/// What a policy that must ask for replicas a start-up time ahead could reach if it knew the
/// hindsight bound of every minute already begun: see [`causal_reference`].
#[derive(Clone, Debug, Serialize)]
pub struct CausalReference {
    pub replica_hours: f64,
    pub cost: f64,
    /// Minutes of the bound's past it provisions for (their highest).
    pub window_minutes: usize,
    /// The constant margin per variant (replicas) that meets every minute.
    pub margin: BTreeMap<String, u32>,
}

/// A reference for causal policies, built on the hindsight bound: minute `m`'s fleet must be
/// asked for one start-up time and one decision interval before the minute begins (the
/// slowest variant's), when the bound of every minute begun by then is known exactly (even the
/// one only partly seen: generous); the fleet is the highest bound of the last `w` known
/// minutes plus the least constant margin that makes it reach every minute's bound (the first
/// minutes, before anything is known, get their own bound). The best `w` of 1–10 is kept. No
/// real policy knows a minute's bound, so a policy far above this has room to gain, and a goal
/// below it is out of reach of this whole family of forecasts.
pub fn causal_reference(cfg: &AutoscaleConfig, bound: &HindsightBound) -> CausalReference {
    let lead = cfg.variants.iter().map(|v| v.startup_s).fold(0.0, f64::max) + cfg.interval_s;
    let known = |m: usize| {
        let at = 60.0 * m as f64 - lead;
        (at >= 0.0).then(|| (at / 60.0).floor() as usize)
    };
    let mut best: Option<CausalReference> = None;
    for w in 1..=10usize {
        let (mut replica_hours, mut cost) = (0.0, 0.0);
        let mut margin = BTreeMap::new();
        for v in &cfg.variants {
            let need = |m: usize| bound.per_minute[m][&v.name];
            let base = |m: usize| {
                known(m).map(|k| (k + 1 - w.min(k + 1)..=k).map(need).max().unwrap_or(0))
            };
            let h = (0..bound.per_minute.len())
                .filter_map(|m| base(m).map(|b| need(m).saturating_sub(b)))
                .max()
                .unwrap_or(0);
            for (m, hours) in bound.minute_hours.iter().enumerate() {
                let n = f64::from(base(m).map_or(need(m), |b| b + h));
                replica_hours += n * hours;
                cost += n * hours * v.cost_per_replica_hour;
            }
            margin.insert(v.name.clone(), h);
        }
        if best
            .as_ref()
            .is_none_or(|b| replica_hours < b.replica_hours)
        {
            best = Some(CausalReference {
                replica_hours,
                cost,
                window_minutes: w,
                margin,
            });
        }
    }
    best.expect("ten windows tried")
}

/// The least replica-hours any policy could spend meeting every minute's SLOs on this replay:
/// each minute's requests are replayed alone on an idle fixed fleet (no backlog from the minute
/// before, no start-up delay, perfect foresight of the minute), the least fleet that meets that
/// minute is found as `size_static_peak` finds static-peak's, and the fleets are summed over the
/// replay's length. It is optimistic (a real fleet carries queues across minutes and must start
/// replicas a start-up time ahead), so a policy's ratio to it says how much room is left.
pub fn hindsight_bound(cfg: &AutoscaleConfig, reqs: &[SimRequest]) -> HindsightBound {
    let last = reqs.last().map_or(0.0, |r| r.at_s);
    let minutes = ((last / 60.0).floor() as usize + 1).max(1);
    let mut per_minute = Vec::with_capacity(minutes);
    let mut minute_hours = Vec::with_capacity(minutes);
    let (mut replica_hours, mut cost) = (0.0, 0.0);
    for m in 0..minutes {
        let from = 60.0 * m as f64;
        let mine: Vec<SimRequest> = reqs
            .iter()
            .filter(|r| r.at_s >= from && r.at_s < from + 60.0)
            .map(|r| SimRequest {
                at_s: r.at_s - from,
                ..r.clone()
            })
            .collect();
        let counts: BTreeMap<String, u32> = if mine.iter().any(|r| !cfg.bands[r.band].sheddable()) {
            size_static_peak(cfg, &mine)
        } else {
            cfg.variants
                .iter()
                .map(|v| (v.name.clone(), v.min_replicas))
                .collect()
        };
        // Runs end at the last arrival, so the last minute counts only up to it.
        let hours = (last - from).clamp(0.0, 60.0) / 3600.0;
        for v in &cfg.variants {
            let n = f64::from(counts[&v.name]);
            replica_hours += n * hours;
            cost += n * hours * v.cost_per_replica_hour;
        }
        per_minute.push(counts);
        minute_hours.push(hours);
    }
    HindsightBound {
        replica_hours,
        cost,
        per_minute,
        minute_hours,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_timestamps_parse_relative_and_scaled() {
        let t = parse_trace(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:15:46.5,374,44\n2023-11-16 18:16:46.5,10,0\n2023-11-17 00:00:00,5,5\n",
            2.0,
        )
        .unwrap();
        assert_eq!(t[0].at_s, 0.0);
        assert!((t[1].at_s - 30.0).abs() < 1e-9);
        // Across midnight: 5 h 44 min 13.5 s later, halved.
        assert!((t[2].at_s - (5.0 * 3600.0 + 44.0 * 60.0 + 13.5) / 2.0).abs() < 1e-6);
        assert_eq!(t[1].output_tokens, 1, "0 generated tokens is one token");
        for bad in [
            "a,b,c\n1,2,3\n",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n",
            "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,x,1\n",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-13-16 18:15:46,1,1\n",
        ] {
            assert!(parse_trace(bad, 1.0).is_err(), "{bad:?}");
        }
        assert!(parse_trace("TIMESTAMP,ContextTokens,GeneratedTokens\n1,1,1\n", 0.0).is_err());
    }

    /// The default fleet with one band (priority 0, all the traffic) and each request once.
    fn one_band() -> AutoscaleConfig {
        let mut cfg = AutoscaleConfig::default_config().unwrap();
        cfg.bands.retain(|b| b.priority == 0);
        cfg.bands[0].share = 1.0;
        cfg.replay.rate_scale = 1.0;
        cfg.variants[0].min_replicas = 1;
        cfg
    }

    #[test]
    fn the_hindsight_bound_sizes_each_minute_alone() {
        let cfg = one_band();
        let c = cfg.variants[0].capacity.clone();
        // Minute 0: 1000-token prompts at three times one replica's prefill rate (two replicas
        // would fall 30 s of work behind within the minute, far past the 5 s SLO); minute 1 (to
        // 90 s): one request every 10 s, which one replica serves at once.
        let every = 1000.0 / (3.0 * c.prefill_tokens_per_s);
        let mut trace: Vec<TraceRequest> = (0..(60.0 / every) as usize)
            .map(|i| TraceRequest {
                at_s: i as f64 * every,
                prompt_tokens: 1000,
                output_tokens: 2,
            })
            .collect();
        trace.extend((0..4).map(|i| TraceRequest {
            at_s: 60.0 + 10.0 * f64::from(i),
            prompt_tokens: 1000,
            output_tokens: 2,
        }));
        let reqs = expand(&trace, &cfg);
        let b = hindsight_bound(&cfg, &reqs);
        assert_eq!(b.per_minute.len(), 2);
        let (n0, n1) = (b.per_minute[0]["h200-8b"], b.per_minute[1]["h200-8b"]);
        assert!(n0 >= 3, "three times one replica's rate needs three: {n0}");
        assert_eq!(n1, 1);
        // Minute 1 counts up to the last arrival (90 s).
        let want = (f64::from(n0) * 60.0 + 30.0) / 3600.0;
        assert!((b.replica_hours - want).abs() < 1e-9, "{}", b.replica_hours);
        assert!((b.cost - want * cfg.variants[0].cost_per_replica_hour).abs() < 1e-9);
        // The whole replay's static fleet must cover its busiest minute.
        assert!(size_static_peak(&cfg, &reqs)["h200-8b"] >= n0);
    }

    #[test]
    fn the_causal_reference_asks_a_start_up_ahead_with_the_least_margin() {
        // Start-up 60 s + a 15 s interval: minute m is asked for at 60m − 75 s, when minutes
        // up to m − 2 have begun. Bound 2, 2, 5, 2, 2: minute 2's jump is seen only from
        // minute 4 on, so the margin is 3 whatever the window.
        let mut cfg = one_band();
        cfg.variants[0].startup_s = 60.0;
        cfg.interval_s = 15.0;
        let name = cfg.variants[0].name.clone();
        let bound = HindsightBound {
            replica_hours: 0.0,
            cost: 0.0,
            per_minute: [2, 2, 5, 2, 2]
                .iter()
                .map(|&n| BTreeMap::from([(name.clone(), n)]))
                .collect(),
            minute_hours: vec![1.0 / 60.0; 5],
        };
        let r = causal_reference(&cfg, &bound);
        assert_eq!(r.margin[&name], 3);
        // Minutes 0, 1 at their own bound (2 + 2), then 2 + 3, 2 + 3, 5 + 3.
        assert!((r.replica_hours - 22.0 / 60.0).abs() < 1e-12, "{r:?}");
        assert_eq!(r.window_minutes, 1);
        let per_hour = cfg.variants[0].cost_per_replica_hour;
        assert!((r.cost - per_hour * 22.0 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn requests_over_the_model_length_are_refused() {
        let mut cfg = one_band();
        let req = |p, o| SimRequest {
            at_s: 0.0,
            prompt_tokens: p,
            output_tokens: o,
            band: 0,
        };
        let reqs = vec![req(100, 28), req(100, 29), req(8000, 1)];
        let (kept, refused) = refuse_over_model_len(&cfg, reqs.clone());
        assert_eq!((kept.len(), refused), (3, 0), "no limit known");
        cfg.variants[0].capacity.max_model_len = Some(128);
        let (kept, refused) = refuse_over_model_len(&cfg, reqs);
        assert_eq!(refused, 2);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].output_tokens, 28, "128 tokens in all fit");
    }

    #[test]
    fn a_lone_request_takes_the_calibrated_time() {
        let cfg = one_band();
        let c = cfg.variants[0].capacity.clone();
        let reqs = expand(
            &[TraceRequest {
                at_s: 0.0,
                prompt_tokens: 1000,
                output_tokens: 3,
            }],
            &cfg,
        );
        let mut p = policy::StaticPeak::new(&cfg);
        let start = [("h200-8b".to_string(), 1)].into();
        let r = run(&cfg, &reqs, &mut p, &start);
        // Two steps of prefill: 512 then 488 tokens (each with the step's base cost).
        let ttft = 2.0 * c.step_base_s + c.prefill_s(1000.0);
        let got = r.bands[0].ttft_p95[0].unwrap();
        assert!((got - ttft).abs() < 1e-9, "{got} vs {ttft}");
        // Then two decode steps of one sequence with 1001 and 1002 tokens of context.
        let itl = c.decode_step_s(1.0, 1001.0);
        let got = r.bands[0].itl_p95[0].unwrap();
        assert!(got >= itl && got <= itl * 1.03, "{got} vs {itl}");
        assert_eq!(r.bands[0].attainment, Some(1.0));
    }
}
