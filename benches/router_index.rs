//! The router's prefix index at cluster scale, in one run: the Mooncake conversation trace
//! (`../shared/traces/mooncake-fast25-conversation.jsonl`, an hour of Kimi's real prefix
//! sharing) replayed against 64 simulated workers that publish KV events as a real one does,
//! into the router's real subscription path.
//!
//! - Each simulated worker is an LRU of KV blocks sized like an H200 serving a Llama-3.1-8B
//!   class model: 128 KiB of KV per token (32 layers × 8 KV heads × 128 dims × K and V ×
//!   bf16), so 2 MiB per 16-token block; ~110 GiB left for KV after the weights and
//!   activations at 0.9 memory utilization → 56,320 blocks per worker, 3.6M in the cluster.
//! - Every trace hash id (512 tokens) becomes 32 blocks of 16 pseudo-random tokens fixed by
//!   the id, so requests share exactly the blocks the trace says they share; tokens past the
//!   trace's ids (the output, the prompt's ragged end) are the request's own. A worker's block
//!   hashes chain on the parent as vLLM's do.
//! - Serving a request, the worker hits its cached prefix (LRU touch), evicts least recently
//!   used blocks for the new ones (`BlockRemoved`) and stores the rest (`BlockStored`, with
//!   the parent's hash), one batch per 512 blocks (an 8k-token prefill step), then one batch
//!   for the output's blocks. Batches go through the crate's own publisher
//!   (`ZmqEventPublisher`: vLLM's msgpack over a ZeroMQ PUB on loopback) to the router's own
//!   subscriber (`router::events::subscribe`) applying them to a `PrefixIndex` behind a mutex,
//!   as `llmd route` does.
//! - Each request is routed first, on the main thread, by the router's own scorer (prefix 3,
//!   queue 1, KV usage 1: lock, the prefix lookup of every worker (`prefix_all`), `scorers::pick`; then, untimed,
//!   `expect`),
//!   with each worker's in-flight requests simulated in trace time (prefill 10k uncached
//!   tokens/s, 15 ms per output token). Round robin is replayed on the same simulated workers
//!   (without events: it does not read the index).
//! - Events are paced to ROUTER_INDEX_RATE blocks per second (stored + removed; default
//!   100,000), which compresses the trace's hour by whatever factor that takes.
//!
//! Prints: (1) events published and applied per second, the router's sequence gaps, batches
//! the publishers dropped, how long the router took to drain after the last one; (2) the RSS
//! of an index holding 1M blocks (measured alone, before the live run) and at the end of the
//! live run; (3) decision time p50/p99 under that event load vs idle (the same loop over the
//! same requests replayed after the run — decide, `expect`, simulate — with no events
//! flowing); (4) the prefix hit rate of
//! prefix-aware vs round-robin routing on the trace, beside the trace's own ceiling (one
//! infinite cache).
//!
//! `cargo bench --bench router_index` (env: ROUTER_INDEX_REQUESTS, default all 12,031;
//! ROUTER_INDEX_QUICK=1 for the first 3,000; ROUTER_INDEX_RATE blocks/s, default 100000;
//! ROUTER_INDEX_WORKERS, default 64; ROUTER_INDEX_BLOCKS_PER_WORKER, default 56320).
#[path = "support/env.rs"]
mod env;
#[path = "support/splitmix.rs"]
mod splitmix;
use env::env_or;
use llmd::kv::{KvEvent, KvEventSink, Medium};
use llmd::router::events::{subscribe, SubStats, Update};
use llmd::router::index::{IndexLimits, KeyScheme, Keyer, PrefixIndex};
use llmd::router::scorers::{self, Candidate, RoutingConfig};
use llmd::server::kv_events::{KvEventsConfig, Publisher, ZmqEventPublisher};
use lru::LruCache;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: usize = 16;
/// Tokens per trace hash id.
const ID_TOKENS: usize = 512;
/// Blocks per published batch: an 8,192-token prefill step.
const STEP_BLOCKS: usize = 512;
/// Simulated service time: uncached prompt tokens per second, seconds per output token.
const PREFILL_TOK_S: f64 = 10_000.0;
const TPOT_S: f64 = 0.015;
/// How long an `expect`ed prompt counts as cached (route.rs's PENDING_TTL).
const PENDING_TTL: Duration = Duration::from_secs(30);

struct Req {
    ts: f64,
    input: usize,
    output: usize,
    ids: Vec<u64>,
}

fn load_trace(path: &str, limit: usize) -> Vec<Req> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .take(limit)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            Req {
                ts: v["timestamp"].as_f64().expect("timestamp") / 1e3,
                input: v["input_length"].as_u64().expect("input_length") as usize,
                output: v["output_length"].as_u64().expect("output_length") as usize,
                ids: v["hash_ids"]
                    .as_array()
                    .expect("hash_ids")
                    .iter()
                    .map(|h| h.as_u64().expect("a hash id"))
                    .collect(),
            }
        })
        .collect()
}

/// `x` mixed: SplitMix64's number after `x`.
fn mix(mut x: u64) -> u64 {
    splitmix::next(&mut x)
}

/// A request's blocks: per full block of prompt + output, its content id (the trace id and
/// the block's place in it, or the request's own) and the worker's chained hash.
struct Blocks {
    /// Full prompt blocks (the router keys these).
    prompt: usize,
    content: Vec<u64>,
    hashes: Vec<u64>,
}

const OWN: u64 = 1 << 62;

fn blocks_of(r: &Req, n: usize) -> Blocks {
    let prompt = r.input / BLOCK;
    let total = (r.input + r.output) / BLOCK;
    let per_id = ID_TOKENS / BLOCK;
    let mut content = Vec::with_capacity(total);
    let mut hashes = Vec::with_capacity(total);
    let mut parent = 0u64;
    for b in 0..total {
        let c = match r.ids.get(b / per_id) {
            Some(&id) if b < prompt => (id << 6) | (b % per_id) as u64,
            _ => OWN | ((n as u64) << 24) | b as u64,
        };
        content.push(c);
        parent = mix(parent ^ mix(c));
        hashes.push(parent);
    }
    Blocks {
        prompt,
        content,
        hashes,
    }
}

/// The 16 tokens of a block of content id `c`.
fn tokens_into(c: u64, out: &mut Vec<u32>) {
    for t in 0..BLOCK as u64 {
        out.push((mix(c.wrapping_mul(31).wrapping_add(t)) % 128_000) as u32);
    }
}

/// One simulated worker's KV cache and load.
struct SimWorker {
    cache: LruCache<u64, ()>,
    cap: usize,
    /// (trace time it finishes, its blocks) of each request in flight.
    running: Vec<(f64, usize)>,
}

impl SimWorker {
    fn new(cap: usize) -> Self {
        Self {
            cache: LruCache::unbounded(),
            cap,
            running: Vec::new(),
        }
    }

    fn load(&mut self, now: f64) -> (usize, f64) {
        self.running.retain(|(t, _)| *t > now);
        let blocks: usize = self.running.iter().map(|(_, b)| b).sum();
        (self.running.len(), blocks as f64 / self.cap as f64)
    }

    /// Serves `r`: the leading prompt blocks it had, and the event batches it publishes.
    fn serve(&mut self, r: &Req, b: &Blocks, now: f64) -> (usize, Vec<Vec<KvEvent>>) {
        let mut hit = 0;
        while hit < b.prompt && self.cache.get(&b.hashes[hit]).is_some() {
            hit += 1;
        }
        let uncached = r.input.saturating_sub(hit * BLOCK);
        let t = uncached as f64 / PREFILL_TOK_S + r.output as f64 * TPOT_S;
        self.running.push((now + t, b.hashes.len()));
        let mut batches = Vec::new();
        let mut start = hit;
        while start < b.hashes.len() {
            // Prefill steps, then the output's blocks in one batch.
            let end = if start < b.prompt {
                (start + STEP_BLOCKS).min(b.prompt)
            } else {
                b.hashes.len()
            };
            let mut removed = Vec::new();
            let fresh = (start..end)
                .filter(|&i| !self.cache.contains(&b.hashes[i]))
                .count();
            while self.cache.len() + fresh > self.cap {
                let Some((h, ())) = self.cache.pop_lru() else {
                    break;
                };
                removed.push(h);
            }
            let mut token_ids = Vec::with_capacity((end - start) * BLOCK);
            for i in start..end {
                self.cache.put(b.hashes[i], ());
                tokens_into(b.content[i], &mut token_ids);
            }
            let mut events = Vec::with_capacity(2);
            if !removed.is_empty() {
                events.push(KvEvent::BlockRemoved {
                    block_hashes: removed,
                    medium: Medium::Gpu,
                });
            }
            events.push(KvEvent::BlockStored {
                block_hashes: b.hashes[start..end].to_vec(),
                parent_block_hash: start.checked_sub(1).map(|p| b.hashes[p]),
                token_ids,
                block_size: BLOCK,
                medium: Medium::Gpu,
                extra_keys: vec![Vec::new(); end - start],
            });
            batches.push(events);
            start = end;
        }
        (hit, batches)
    }
}

fn event_blocks(events: &[KvEvent]) -> u64 {
    events
        .iter()
        .map(|e| match e {
            KvEvent::BlockStored { block_hashes, .. }
            | KvEvent::BlockRemoved { block_hashes, .. } => block_hashes.len() as u64,
            KvEvent::AllBlocksCleared => 0,
        })
        .sum()
}

fn prompt_tokens(b: &Blocks) -> Vec<u32> {
    let mut t = Vec::with_capacity(b.prompt * BLOCK);
    for &c in &b.content[..b.prompt] {
        tokens_into(c, &mut t);
    }
    t
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// This thread's CPU time, in seconds: a decision's wall time beyond it was spent preempted.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn keyer() -> Keyer {
    Keyer::new(KeyScheme::Fnv64a, "0", BLOCK)
}

fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("http://10.0.{}.{}:8000", i / 250, i % 250 + 1))
        .collect()
}

/// The trace's own ceiling: one cache that never evicts, prompt prefixes only.
fn ceiling(reqs: &[Req]) -> f64 {
    let mut seen = HashSet::new();
    let (mut hit, mut total) = (0usize, 0usize);
    for (n, r) in reqs.iter().enumerate() {
        let b = blocks_of(r, n);
        let mut leading = true;
        for &h in &b.hashes[..b.prompt] {
            leading &= !seen.insert(h);
            hit += leading as usize;
        }
        total += b.prompt;
    }
    hit as f64 / total.max(1) as f64
}

/// Round robin over fresh simulated workers: the prefix hit rate.
fn round_robin(reqs: &[Req], workers: usize, cap: usize) -> f64 {
    let mut sim: Vec<SimWorker> = (0..workers).map(|_| SimWorker::new(cap)).collect();
    let (mut hit, mut total) = (0usize, 0usize);
    for (n, r) in reqs.iter().enumerate() {
        let b = blocks_of(r, n);
        hit += sim[n % workers].serve(r, &b, r.ts).0;
        total += b.prompt;
    }
    hit as f64 / total.max(1) as f64
}

/// RSS of an index holding `target` blocks, measured alone: the events (stored by workers
/// that never evict, round robin) are built first, then applied.
fn index_memory(reqs: &[Req], workers: usize, target: u64) -> (u64, u64) {
    let names = names(workers);
    let mut sim: Vec<SimWorker> = (0..workers).map(|_| SimWorker::new(usize::MAX)).collect();
    let mut events: Vec<(usize, Vec<KvEvent>)> = Vec::new();
    let mut stored = 0u64;
    for (n, r) in reqs.iter().enumerate() {
        if stored >= target {
            break;
        }
        let b = blocks_of(r, n);
        for batch in sim[n % workers].serve(r, &b, r.ts).1 {
            stored += event_blocks(&batch);
            events.push((n % workers, batch));
        }
    }
    // The simulated workers stay: memory they free could be reused by the index, hiding it.
    let before = rss_bytes();
    let mut ix = PrefixIndex::with_limits(keyer(), IndexLimits::default());
    for (w, batch) in &events {
        ix.apply(&names[*w], batch);
    }
    let after = rss_bytes();
    let held: u64 = names.iter().map(|n| ix.num_blocks(n) as u64).sum();
    drop(ix);
    drop(sim);
    (held, after.saturating_sub(before))
}

/// The router's state, as route.rs keeps it.
struct Router {
    index: Arc<Mutex<PrefixIndex>>,
    cfg: RoutingConfig,
    keyer: Keyer,
    names: Vec<String>,
    rotation: usize,
    /// Seconds each pick waited for the index lock.
    lock_waits: Vec<f64>,
}

impl Router {
    /// Route.rs's `pick`: lock, every worker's prefix (`prefix_all`), score; (worker, predicted blocks).
    fn pick(&mut self, keys: &[u64], load: &[(usize, f64)]) -> (usize, usize) {
        let weights = self.cfg.tier_weights;
        let matches: Vec<_> = {
            let t = Instant::now();
            let ix = self.index.lock().unwrap_or_else(|e| e.into_inner());
            self.lock_waits.push(t.elapsed().as_secs_f64());
            let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
            ix.prefix_all(&names, keys, &weights)
        };
        let candidates: Vec<Candidate> = load
            .iter()
            .zip(&matches)
            .map(|(&(in_flight, kv_usage), m)| Candidate {
                waiting: 0.0,
                kv_usage,
                in_flight,
                prefix_weighted: m.weighted,
            })
            .collect();
        self.rotation += 1;
        let p = scorers::pick(&self.cfg, &candidates, keys.len(), self.rotation);
        (p.index, matches[p.index].blocks)
    }
}

struct Live {
    hit_rate: f64,
    predicted_blocks: u64,
    hit_blocks: u64,
    published: u64,
    applied: u64,
    publish_wall: f64,
    apply_wall: f64,
    drain: f64,
    gaps: u64,
    malformed: u64,
    dropped: u64,
    batches: u64,
    decide_load: Vec<f64>,
    decision_load: Vec<f64>,
    decide_idle: Vec<f64>,
    decision_idle: Vec<f64>,
    lock_load: Vec<f64>,
    lock_idle: Vec<f64>,
    cpu_load: Vec<f64>,
    cpu_idle: Vec<f64>,
    index_blocks: u64,
    rss: u64,
    trace_span: f64,
}

fn live(reqs: &[Req], workers: usize, cap: usize, rate: f64) -> Live {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let names = names(workers);
    let index = Arc::new(Mutex::new(PrefixIndex::with_limits(
        keyer(),
        IndexLimits::default(),
    )));
    let applied = Arc::new(AtomicU64::new(0));
    let last_apply_ns = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let cfg = KvEventsConfig {
        enable_kv_cache_events: true,
        publisher: Publisher::Zmq,
        endpoint: "tcp://*:0".to_string(),
        replay_endpoint: None,
        buffer_steps: 0,
        ..KvEventsConfig::default()
    };
    let mut pubs = Vec::new();
    let mut stats = Vec::new();
    for name in &names {
        let p = ZmqEventPublisher::start(&cfg, Some(0)).expect("a publisher");
        let st = Arc::new(SubStats::default());
        let (ix, name, applied, last) = (
            index.clone(),
            name.clone(),
            applied.clone(),
            last_apply_ns.clone(),
        );
        rt.spawn(subscribe(
            p.endpoint().to_string(),
            None,
            st.clone(),
            move |u| {
                let mut ix = ix.lock().unwrap_or_else(|e| e.into_inner());
                match u {
                    Update::Events(events) => {
                        ix.apply(&name, &events);
                        drop(ix);
                        applied.fetch_add(event_blocks(&events), Relaxed);
                        last.store(epoch.elapsed().as_nanos() as u64, Relaxed);
                    }
                    Update::Reset => ix.drop_worker(&name),
                }
            },
        ));
        pubs.push(p);
        stats.push(st);
    }
    // Each subscription is live once it has received a batch (a PUB drops what it sends
    // before the subscription reaches it): until then, ping.
    let t = Instant::now();
    while stats.iter().any(|s| s.batches.load(Relaxed) == 0) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "subscriptions never came up"
        );
        for (p, s) in pubs.iter().zip(&stats) {
            if s.batches.load(Relaxed) == 0 {
                p.publish(vec![KvEvent::AllBlocksCleared]);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let gaps0: u64 = stats.iter().map(|s| s.gaps.load(Relaxed)).sum();
    let batches0: u64 = stats.iter().map(|s| s.batches.load(Relaxed)).sum();

    let mut router = Router {
        index: index.clone(),
        cfg: RoutingConfig::default(),
        keyer: keyer(),
        names: names.clone(),
        rotation: 0,
        lock_waits: Vec::with_capacity(reqs.len()),
    };
    let mut sim: Vec<SimWorker> = (0..workers).map(|_| SimWorker::new(cap)).collect();
    let (mut hit, mut total, mut predicted) = (0u64, 0u64, 0u64);
    let mut published = 0u64;
    let mut decide_load = Vec::with_capacity(reqs.len());
    let mut decision_load = Vec::with_capacity(reqs.len());
    let mut cpu_load = Vec::with_capacity(reqs.len());
    let start = Instant::now();
    let start_ns = epoch.elapsed().as_nanos() as u64;
    for (n, r) in reqs.iter().enumerate() {
        let b = blocks_of(r, n);
        let tokens = prompt_tokens(&b);
        let load: Vec<(usize, f64)> = sim.iter_mut().map(|w| w.load(r.ts)).collect();
        let (c0, t0) = (thread_cpu(), Instant::now());
        let keys = router.keyer.keys(&tokens);
        let t1 = Instant::now();
        let (w, pred) = router.pick(&keys, &load);
        let t2 = Instant::now();
        cpu_load.push(thread_cpu() - c0);
        decide_load.push((t2 - t1).as_secs_f64());
        decision_load.push((t2 - t0).as_secs_f64());
        // Where the prompt will be cached, as route.rs records it after deciding.
        router
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expect(&names[w], &keys, PENDING_TTL);
        let (h, batches) = sim[w].serve(r, &b, r.ts);
        hit += h as u64;
        total += b.prompt as u64;
        predicted += pred.min(b.prompt) as u64;
        for batch in batches {
            published += event_blocks(&batch);
            pubs[w].publish(batch);
        }
        // Pace: `rate` event blocks per second.
        let due = Duration::from_secs_f64(published as f64 / rate);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let publish_wall = start.elapsed().as_secs_f64();
    let t = Instant::now();
    while applied.load(Relaxed) < published && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let apply_wall = last_apply_ns.load(Relaxed).saturating_sub(start_ns) as f64 / 1e9;
    let drain = (apply_wall - publish_wall).max(0.0);
    let gaps = stats.iter().map(|s| s.gaps.load(Relaxed)).sum::<u64>() - gaps0;
    let batches = stats.iter().map(|s| s.batches.load(Relaxed)).sum::<u64>() - batches0;
    let malformed = stats
        .iter()
        .map(|s| s.malformed.load(Relaxed) + s.oversized.load(Relaxed))
        .sum();
    let dropped = pubs.iter().map(|p| p.dropped_batches()).sum();
    let index_blocks = {
        let ix = index.lock().unwrap();
        names.iter().map(|n| ix.num_blocks(n) as u64).sum()
    };
    let rss = rss_bytes();

    let lock_load = std::mem::take(&mut router.lock_waits);
    // Idle: the same loop over the same requests — the decision, `expect`, the simulated
    // workers serving it (fresh ones) — with nothing published, so what differs from the run
    // above is only the events flowing into the index (deciding back to back instead would
    // find the index in warm caches, which no router between two requests does).
    let mut decide_idle = Vec::with_capacity(reqs.len());
    let mut decision_idle = Vec::with_capacity(reqs.len());
    let mut cpu_idle = Vec::with_capacity(reqs.len());
    let mut sim: Vec<SimWorker> = (0..workers).map(|_| SimWorker::new(cap)).collect();
    for (n, r) in reqs.iter().enumerate() {
        let b = blocks_of(r, n);
        let tokens = prompt_tokens(&b);
        let load: Vec<(usize, f64)> = sim.iter_mut().map(|w| w.load(r.ts)).collect();
        let (c0, t0) = (thread_cpu(), Instant::now());
        let keys = router.keyer.keys(&tokens);
        let t1 = Instant::now();
        let (w, _) = router.pick(&keys, &load);
        let t2 = Instant::now();
        cpu_idle.push(thread_cpu() - c0);
        decide_idle.push((t2 - t1).as_secs_f64());
        decision_idle.push((t2 - t0).as_secs_f64());
        router
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expect(&names[w], &keys, PENDING_TTL);
        std::hint::black_box(sim[w].serve(r, &b, r.ts));
    }
    let lock_idle = std::mem::take(&mut router.lock_waits);
    drop(pubs);
    rt.shutdown_timeout(Duration::from_secs(1));
    Live {
        hit_rate: hit as f64 / total.max(1) as f64,
        predicted_blocks: predicted,
        hit_blocks: hit,
        published,
        applied: applied.load(Relaxed),
        publish_wall,
        apply_wall,
        drain,
        gaps,
        malformed,
        dropped,
        batches,
        decide_load,
        decision_load,
        decide_idle,
        decision_idle,
        lock_load,
        lock_idle,
        cpu_load,
        cpu_idle,
        index_blocks,
        rss,
        trace_span: reqs.last().map_or(0.0, |r| r.ts) - reqs.first().map_or(0.0, |r| r.ts),
    }
}

fn main() {
    let path = format!(
        "{}/../shared/traces/mooncake-fast25-conversation.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    if !std::path::Path::new(&path).exists() {
        eprintln!("skipping: {path} is not there");
        return;
    }
    let quick = env_or("ROUTER_INDEX_QUICK", 0u8) != 0;
    let limit = env_or(
        "ROUTER_INDEX_REQUESTS",
        if quick { 3000 } else { usize::MAX },
    );
    let rate = env_or("ROUTER_INDEX_RATE", 100_000f64);
    let workers = env_or("ROUTER_INDEX_WORKERS", 64usize);
    let cap = env_or("ROUTER_INDEX_BLOCKS_PER_WORKER", 56_320usize);
    let reqs = load_trace(&path, limit);
    let prompt_blocks: usize = reqs.iter().map(|r| r.input / BLOCK).sum();
    println!(
        "trace: {} requests over {:.0} s, {} prompt blocks of {BLOCK} tokens; {workers} workers × {cap} blocks (H200, Llama-8B-class KV: 2 MiB a block, ~110 GiB)",
        reqs.len(),
        reqs.last().map_or(0.0, |r| r.ts),
        prompt_blocks
    );

    let (held, bytes) = index_memory(&reqs, workers, 1_000_000);
    println!(
        "(2) memory: an index of {held} blocks over {workers} workers adds {:.0} MiB RSS = {:.0} bytes/block → {:.0} MiB per 1M blocks (goal ≤ 1024)",
        bytes as f64 / (1u64 << 20) as f64,
        bytes as f64 / held.max(1) as f64,
        bytes as f64 / held.max(1) as f64 * 1e6 / (1u64 << 20) as f64
    );

    let ceil = ceiling(&reqs);
    let rr = round_robin(&reqs, workers, cap);
    let mut l = live(&reqs, workers, cap, rate);
    println!(
        "(1) events: {} blocks (stored + removed) in {} batches published in {:.1} s = {:.0} blocks/s ({:.0}× the trace's pace); applied {} in {:.1} s = {:.0} blocks/s; drained {:.3} s after the last publish",
        l.published,
        l.batches,
        l.publish_wall,
        l.published as f64 / l.publish_wall,
        l.trace_span / l.publish_wall,
        l.applied,
        l.apply_wall,
        l.applied as f64 / l.apply_wall,
        l.drain
    );
    println!(
        "    sequence gaps seen by the router: {}; batches dropped by the publishers: {}; malformed: {} — the router {}",
        l.gaps,
        l.dropped,
        l.malformed,
        if l.gaps == 0 && l.applied == l.published {
            "kept up"
        } else {
            "did NOT keep up"
        }
    );
    println!(
        "    at the end the index holds {} blocks; process RSS {:.0} MiB (index, 64 publishers, simulated workers' LRUs, trace)",
        l.index_blocks,
        l.rss as f64 / (1u64 << 20) as f64
    );
    let ms = |v: &mut Vec<f64>, p| pct(v, p) * 1e3;
    let (dl50, dl99) = (ms(&mut l.decide_load, 0.5), ms(&mut l.decide_load, 0.99));
    let (di50, di99) = (ms(&mut l.decide_idle, 0.5), ms(&mut l.decide_idle, 0.99));
    let (tl50, tl99) = (
        ms(&mut l.decision_load, 0.5),
        ms(&mut l.decision_load, 0.99),
    );
    let (ti50, ti99) = (
        ms(&mut l.decision_idle, 0.5),
        ms(&mut l.decision_idle, 0.99),
    );
    let (ll50, ll99) = (ms(&mut l.lock_load, 0.5), ms(&mut l.lock_load, 0.99));
    let (li50, li99) = (ms(&mut l.lock_idle, 0.5), ms(&mut l.lock_idle, 0.99));
    let (cl50, cl99) = (ms(&mut l.cpu_load, 0.5), ms(&mut l.cpu_load, 0.99));
    let (ci50, ci99) = (ms(&mut l.cpu_idle, 0.5), ms(&mut l.cpu_idle, 0.99));
    println!(
        "(3) decision time over {} requests, {workers} workers:",
        reqs.len()
    );
    println!("| part | idle p50 | idle p99 | under load p50 | under load p99 | p50 load/idle | p99 load/idle |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| prefix lookups (index lock) + score | {di50:.3} ms | {di99:.3} ms | {dl50:.3} ms | {dl99:.3} ms | {:.2}× | {:.2}× |",
        dl50 / di50,
        dl99 / di99
    );
    println!(
        "| keys + lookup + score | {ti50:.3} ms | {ti99:.3} ms | {tl50:.3} ms | {tl99:.3} ms | {:.2}× (goal ≤ 1.5×) | {:.2}× |",
        tl50 / ti50,
        tl99 / ti99
    );
    println!(
        "| of which waiting for the index lock | {li50:.3} ms | {li99:.3} ms | {ll50:.3} ms | {ll99:.3} ms | | |"
    );
    println!(
        "| keys + lookup + score, this thread's CPU time | {ci50:.3} ms | {ci99:.3} ms | {cl50:.3} ms | {cl99:.3} ms | {:.2}× | {:.2}× |",
        cl50 / ci50,
        cl99 / ci99
    );
    println!(
        "(4) prefix hit rate (prompt blocks found cached on the chosen worker): prefix-aware {:.1} %, round robin {:.1} %, trace ceiling (one infinite cache) {:.1} %; prefix-aware / round robin {:.2}×",
        l.hit_rate * 1e2,
        rr * 1e2,
        ceil * 1e2,
        l.hit_rate / rr.max(1e-12)
    );
    println!(
        "    the router predicted {} cached blocks for its picks, the workers had {} ({:.1} %)",
        l.predicted_blocks,
        l.hit_blocks,
        l.hit_blocks as f64 / l.predicted_blocks.max(1) as f64 * 1e2
    );
}
