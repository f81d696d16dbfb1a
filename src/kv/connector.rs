//! The KV connector: how blocks move between the device pool and the tiers below it, split
//! the way vLLM splits its KV connector.
//!
//! - The **scheduler half** ([`KvConnector`], owned by the scheduler) answers "how many of
//!   this request's next blocks can be loaded instead of recomputed" from the tier index and the
//!   measured costs, starts loads (a request then waits in `WaitingForKv`), and collects the
//!   finished ones.
//! - The **worker half** is the engine around the forward pass: it writes loaded blocks into
//!   the device cache before the step that reads them, and after a step copies newly committed
//!   blocks out of the device into records handed to the tier thread ([`KvConnector::store`]).
//! - The **tier thread** (`llmd-kv-tiers`) owns the stores: it keeps the host → disk chain
//!   (and writes through to the remote tier), serves loads, verifies every record it returns
//!   and publishes the tiers' KV events.
//!
//! The queue to the tier thread is bounded: at most [`TierConfig::queue_capacity`] blocks wait
//! to be stored, and at most [`QUEUE_JOBS`] jobs of any kind. A store that finds it full is
//! dropped (counted in [`TierStats::dropped_blocks`]), a load that finds it full is not started
//! (the request recomputes; [`TierStats::skipped_loads`]): a slow or stuck tier (a full disk, a
//! server that answers slowly) never blocks the engine thread or holds unbounded memory.
//!
//! Blocks are stored when their step commits (write-through), not when the device pool evicts
//! them: eviction happens while a step is being planned, with the evicted block about to be
//! overwritten, so copying then would sit on the critical path; a block already held below is
//! not copied again. Loads are values with a completion ticket; a loaded block becomes visible
//! to the prefix cache only when the step that follows its write commits, like any other.
//!
//! Invariant: a payload reaches the device only after `block_record::decode` accepted it for
//! that block hash, this model's identity and this layout's size.
use super::block_record::{self, KvIdentity};
use super::events::{KvEvent, KvEventSink};
use super::tiers::remote::Fetched;
use super::tiers::{DiskStore, HostStore, RemoteStore, Storage, Tier, TierConfig, TierError};
use super::BlockHash;
use crate::backend::PendingKvRead;
use crate::request::RequestId;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// A running estimate: `sample` folded into `estimate` (0: none yet) with weight 0.2.
pub fn ewma(estimate: f64, sample: f64) -> f64 {
    if estimate > 0.0 {
        0.8 * estimate + 0.2 * sample
    } else {
        sample
    }
}

/// A running estimate of the prefill time per token (ns), from steps that were mostly
/// prefill; 0 until one has run (or the start-up measurement, with KV tiers on). Shared by the
/// engine (which measures), the tiers' load-or-recompute decision and the P/D pull decision.
#[derive(Debug, Default)]
pub struct PrefillCost(std::sync::atomic::AtomicU64);

impl PrefillCost {
    pub fn ns_per_token(&self) -> f64 {
        f64::from_bits(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn observe(&self, ns_per_token: f64) {
        if !(ns_per_token.is_finite() && ns_per_token > 0.0) {
            return;
        }
        let new = ewma(self.ns_per_token(), ns_per_token);
        self.0
            .store(new.to_bits(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// What one block costs to bring back from each tier vs to recompute, per block.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TierCosts {
    /// Recomputing one block's tokens (the model's prefill time per token × block size), from
    /// the engine's [`PrefillCost`] when the stats are read.
    pub recompute_ns: f64,
    /// Loading one block from each tier (read + verify + device write), by [`Tier::index`];
    /// 0 where the tier is off.
    pub load_ns: [f64; 3],
}

impl TierCosts {
    /// Whether loading from `tier` beats recomputing.
    pub fn load_wins(&self, tier: Tier) -> bool {
        let l = self.load_ns[tier.index()];
        l > 0.0 && (self.recompute_ns <= 0.0 || l < self.recompute_ns)
    }

    /// Folds a measured block load from `tier` into the running estimate.
    fn observe_load(&mut self, tier: Tier, ns_per_block: f64) {
        let l = &mut self.load_ns[tier.index()];
        *l = ewma(*l, ns_per_block);
    }
}

/// Totals since start, per tier where it applies (indexed by [`Tier::index`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TierStats {
    /// Records held now and at most (remote: records this worker put; capacity 0).
    pub blocks: [usize; 3],
    pub capacity: [usize; 3],
    /// Bytes written into each tier (offload) and read from it for loads.
    pub stored_bytes: [u64; 3],
    pub loaded_bytes: [u64; 3],
    /// Blocks read from each tier: loaded into the device, or sent to a peer.
    pub loaded_blocks: [u64; 3],
    /// Blocks read from the host and disk tiers for a peer's pull (not into the device).
    pub peer_read_blocks: u64,
    /// Records refused by the check (corrupt, truncated, foreign, or a remote value whose
    /// MAC did not verify) and dropped.
    pub checksum_failures: u64,
    /// Of those, remote values whose MAC under the cluster secret did not verify: planted by
    /// someone without the secret.
    pub auth_failures: u64,
    /// Newly committed blocks not stored because the tier queue was full.
    pub dropped_blocks: u64,
    /// Loads not started because the tier queue was full (the request recomputed).
    pub skipped_loads: u64,
    /// Blocks waiting in the queue for the tier thread now (at most the queue's capacity).
    pub queued_blocks: usize,
    /// Store or read calls that failed (I/O, server down).
    pub errors: [u64; 3],
    /// Prompt tokens served by loads instead of recompute.
    pub load_hit_tokens: u64,
    /// Seconds spent in loads (tier thread: read + verify).
    pub load_seconds: f64,
    pub loads: u64,
    /// The current estimates the decisions use.
    pub costs: TierCosts,
}

/// A newly committed device block on its way to the tiers.
#[derive(Clone, Debug)]
pub struct StoreBlock {
    pub hash: BlockHash,
    /// The previous block of its sequence (None for a first block), and its token ids: what
    /// the tiers' `BlockStored` events carry.
    pub parent: Option<BlockHash>,
    pub tokens: Vec<u32>,
    /// The extra keys of its hash (a first block's cache salt).
    pub extra_keys: Vec<String>,
    /// Its K and V over all layers: left empty by the engine, filled on the tier thread from
    /// the copy [`KvConnector::store_pending`] was given.
    pub payload: Vec<u8>,
}

enum Job {
    /// Blocks to store and the copy that gives their payloads (one per block, in order).
    Store {
        blocks: Vec<StoreBlock>,
        pending: Box<dyn PendingKvRead>,
    },
    Load {
        ticket: u64,
        hashes: Vec<BlockHash>,
        allowed: [bool; 3],
    },
    /// A peer's pull served from the host and disk tiers (not through the device).
    Read {
        hashes: Vec<BlockHash>,
        reply: tokio::sync::oneshot::Sender<Vec<Vec<u8>>>,
    },
}

/// A finished load: the verified payloads of the leading `payloads.len()` requested blocks.
#[derive(Debug)]
pub struct LoadDone {
    pub ticket: u64,
    pub payloads: Vec<Vec<u8>>,
}

/// State shared by the two halves and the tier thread.
struct Shared {
    /// Where each block held below the device is (host or disk; the remote tier is asked).
    index: Mutex<HashMap<BlockHash, Tier>>,
    stats: Mutex<TierStats>,
    /// What recomputing costs: the engine's estimate, per token.
    prefill: Arc<PrefillCost>,
    block_size: usize,
    /// Blocks of the store jobs queued and not yet taken by the tier thread.
    queued_blocks: AtomicUsize,
}

impl Shared {
    /// The stats with the current recompute cost.
    fn stats(&self) -> TierStats {
        let mut s = *lock(&self.stats);
        s.costs.recompute_ns = self.prefill.ns_per_token() * self.block_size as f64;
        s.queued_blocks = self.queued_blocks.load(Ordering::Relaxed);
        s
    }
}

/// Jobs of any kind (stores, loads, peer reads) that may wait for the tier thread at most.
pub const QUEUE_JOBS: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A live view of the tiers' stats, readable from any thread (the tier thread keeps them
/// current even while the engine is idle).
#[derive(Clone)]
pub struct TierStatsHandle(Arc<Shared>);

impl TierStatsHandle {
    pub fn get(&self) -> TierStats {
        self.0.stats()
    }
}

/// The scheduler half, and the handle of the tier thread.
pub struct KvConnector {
    jobs: Option<mpsc::SyncSender<Job>>,
    /// Blocks that may wait in the queue at most.
    queue_blocks: usize,
    done: mpsc::Receiver<LoadDone>,
    shared: Arc<Shared>,
    identity: String,
    payload_len: usize,
    block_size: usize,
    remote: bool,
    always_load: bool,
    next_ticket: u64,
    /// Loads in flight: ticket → request and the index of its first block.
    pending: HashMap<u64, (RequestId, usize)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a store or load needs to know about the blocks: the identity they were made under and
/// their size.
#[derive(Clone, Debug)]
pub struct BlockLayout {
    pub identity: KvIdentity,
    /// Bytes of one block's K and V over all layers.
    pub payload_len: usize,
}

impl KvConnector {
    /// Opens the tiers of `config` (the disk tier indexes what an earlier run left), measures
    /// what a load costs from each, and starts the tier thread. `prefill` is the engine's
    /// running estimate of what recomputing costs (measured at start, updated by real steps).
    pub fn start(
        config: &TierConfig,
        layout: &BlockLayout,
        prefill: Arc<PrefillCost>,
        events: Option<Arc<dyn KvEventSink>>,
    ) -> Result<Self, TierError> {
        let identity = layout.identity.canonical();
        let record_len =
            block_record::encode(&BlockHash([0; 32]), &identity, &vec![0; layout.payload_len])
                .len();
        let host =
            (config.host_bytes > 0).then(|| HostStore::new(config.host_bytes / record_len.max(1)));
        let disk = match &config.disk_path {
            Some(p) => Some(DiskStore::open(
                p,
                &identity,
                usize::try_from(config.disk_bytes / record_len.max(1) as u64).unwrap_or(usize::MAX),
                record_len,
            )?),
            None => None,
        };
        let remote = match &config.remote_url {
            Some(u) => Some(RemoteStore::open(u, &identity, &config.remote)?),
            None => None,
        };
        let mut costs = TierCosts::default();
        let probe = Probe {
            identity: &identity,
            payload_len: layout.payload_len,
        };
        let mut worker = TierWorker {
            host,
            disk,
            remote,
            identity: identity.clone(),
            payload_len: layout.payload_len,
            block_size: layout.identity.block_size,
            shared: Arc::new(Shared {
                index: Mutex::new(HashMap::new()),
                stats: Mutex::new(TierStats::default()),
                prefill,
                block_size: layout.identity.block_size,
                queued_blocks: AtomicUsize::new(0),
            }),
            events,
            meta: HashMap::new(),
        };
        for tier in Tier::ALL {
            if let Some(ns) = worker.measure_load(tier, &probe) {
                costs.load_ns[tier.index()] = ns;
            }
        }
        {
            let mut index = lock(&worker.shared.index);
            if let Some(d) = &worker.disk {
                for h in d.hashes() {
                    index.insert(h, Tier::Disk);
                }
            }
        }
        lock(&worker.shared.stats).costs = costs;
        worker.refresh_sizes();
        let shared = worker.shared.clone();
        let remote = worker.remote.is_some();
        let (jobs, jobs_rx) = mpsc::sync_channel(QUEUE_JOBS);
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("llmd-kv-tiers".into())
            .spawn(move || worker.run(jobs_rx, done_tx))
            .map_err(|e| TierError::Config(format!("starting the KV tier thread: {e}")))?;
        let c = Self {
            jobs: Some(jobs),
            queue_blocks: config.queue_capacity(),
            done,
            shared,
            identity,
            payload_len: layout.payload_len,
            block_size: layout.identity.block_size,
            remote,
            always_load: config.always_load,
            next_ticket: 0,
            pending: HashMap::new(),
            thread: Some(thread),
        };
        c.log_decision();
        Ok(c)
    }

    fn log_decision(&self) {
        let costs = self.stats().costs;
        let per_token = |ns: f64| ns / 1e3 / self.block_size as f64;
        for tier in Tier::ALL {
            let l = costs.load_ns[tier.index()];
            if l > 0.0 {
                tracing::info!(
                    tier = tier.as_str(),
                    load_us_per_token = format!("{:.2}", per_token(l)),
                    recompute_us_per_token = format!("{:.2}", per_token(costs.recompute_ns)),
                    decision = if costs.load_wins(tier) {
                        "load"
                    } else {
                        "recompute"
                    },
                    "KV tier: load vs recompute, measured"
                );
            }
        }
    }

    /// Totals and current sizes.
    pub fn stats(&self) -> TierStats {
        self.shared.stats()
    }

    /// A handle that reads [`Self::stats`] from another thread.
    pub fn stats_handle(&self) -> TierStatsHandle {
        TierStatsHandle(self.shared.clone())
    }

    /// Counts prompt tokens a load served.
    pub fn count_hit_tokens(&self, tokens: usize) {
        lock(&self.shared.stats).load_hit_tokens += tokens as u64;
    }

    /// The record identity (model and layout).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Bytes of one block's payload.
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// Whether `hash` is held by the host or disk tier (the engine skips copying it again).
    pub fn holds(&self, hash: &BlockHash) -> bool {
        lock(&self.shared.index).contains_key(hash)
    }

    /// The verified payloads of the leading run of `hashes` the host and disk tiers hold,
    /// read on the tier thread (a peer's pull of a cached prefix, served from the tiers
    /// without going through the device). None when the tiers hold none of it.
    pub fn read_run(
        &self,
        hashes: &[BlockHash],
    ) -> Option<tokio::sync::oneshot::Receiver<Vec<Vec<u8>>>> {
        if !self.holds(hashes.first()?) {
            return None;
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job::Read {
            hashes: hashes.to_vec(),
            reply,
        };
        // A full queue: the peer is answered from the device or recomputes.
        self.jobs.as_ref()?.try_send(job).ok()?;
        Some(rx)
    }

    /// Blocks the queue has room for now: a copy for the tiers need not read more.
    pub fn room(&self) -> usize {
        let queued = self.shared.queued_blocks.load(Ordering::Acquire);
        self.queue_blocks.saturating_sub(queued)
    }

    /// Hands newly committed device blocks to the tiers, as many as the queue has room for;
    /// the rest are dropped and counted (never waits). Their payloads come from `pending`, a
    /// copy out of the device that may still run (one payload per block, in order; it may hold
    /// only the first [`Self::room`] of them): the tier thread waits for it, and a copy that
    /// fails drops its blocks, logged.
    pub fn store_pending(&self, mut blocks: Vec<StoreBlock>, pending: Box<dyn PendingKvRead>) {
        if blocks.is_empty() {
            return;
        }
        let Some(j) = &self.jobs else { return };
        // Only this thread adds to the count (the tier thread takes away), so the room seen
        // here is at least the room there is.
        let room = self.room();
        let mut dropped = blocks.len().saturating_sub(room);
        blocks.truncate(room);
        if !blocks.is_empty() {
            let n = blocks.len();
            self.shared.queued_blocks.fetch_add(n, Ordering::AcqRel);
            // Encoded (copied and checksummed) on the tier thread, off the step's path.
            if let Err(e) = j.try_send(Job::Store { blocks, pending }) {
                self.shared.queued_blocks.fetch_sub(n, Ordering::AcqRel);
                if matches!(e, mpsc::TrySendError::Full(_)) {
                    dropped += n;
                }
            }
        }
        if dropped > 0 {
            let mut s = lock(&self.shared.stats);
            if s.dropped_blocks == 0 {
                tracing::warn!(
                    capacity = self.queue_blocks,
                    "KV tier queue full: dropping new blocks instead of waiting for the tiers \
                     (counted in llmd:kv_tier_dropped_blocks_total)"
                );
            }
            s.dropped_blocks += dropped as u64;
        }
    }

    /// Starts loading the leading run of `hashes` (blocks `first_block..` of `req`) that the
    /// tiers hold and that is cheaper to load than to recompute. None when there is nothing
    /// worth loading; else the load's ticket, finished through [`Self::poll`].
    pub fn start_load(
        &mut self,
        req: &RequestId,
        first_block: usize,
        hashes: &[BlockHash],
    ) -> Option<u64> {
        let first = hashes.first()?;
        let costs = self.stats().costs;
        // A remote tier that could not be timed at start (the server was down) is tried: its
        // first real loads measure it, and the estimate decides from then on.
        let untimed_remote = self.remote && costs.load_ns[Tier::Remote.index()] == 0.0;
        let allowed = Tier::ALL.map(|t| {
            self.always_load || costs.load_wins(t) || (t == Tier::Remote && untimed_remote)
        });
        let local = lock(&self.shared.index).get(first).copied();
        let worth = match local {
            Some(t) => allowed[t.index()],
            None => self.remote && allowed[Tier::Remote.index()],
        };
        if !worth {
            return None;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let job = Job::Load {
            ticket,
            hashes: hashes.to_vec(),
            allowed,
        };
        if self.jobs.as_ref()?.try_send(job).is_err() {
            // The tier thread is behind: recomputing beats waiting for it.
            lock(&self.shared.stats).skipped_loads += 1;
            return None;
        }
        self.pending.insert(ticket, (req.clone(), first_block));
        Some(ticket)
    }

    /// Loads in flight.
    pub fn num_pending(&self) -> usize {
        self.pending.len()
    }

    /// Finished loads: request, index of its first loaded block, verified payloads. Waits up
    /// to `wait` for the first when none is ready (and loads are in flight).
    pub fn poll(&mut self, wait: Duration) -> Vec<(RequestId, usize, Vec<Vec<u8>>)> {
        let mut out = Vec::new();
        let mut next = if self.pending.is_empty() || wait.is_zero() {
            self.done.try_recv().ok()
        } else {
            self.done.recv_timeout(wait).ok()
        };
        while let Some(d) = next {
            if let Some((req, first)) = self.pending.remove(&d.ticket) {
                out.push((req, first, d.payloads));
            }
            next = self.done.try_recv().ok();
        }
        out
    }
}

impl Drop for KvConnector {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A block-sized record used to time each tier at start.
struct Probe<'a> {
    identity: &'a str,
    payload_len: usize,
}

/// The tier thread's state.
struct TierWorker {
    host: Option<HostStore>,
    disk: Option<DiskStore>,
    remote: Option<RemoteStore>,
    identity: String,
    payload_len: usize,
    block_size: usize,
    shared: Arc<Shared>,
    events: Option<Arc<dyn KvEventSink>>,
    /// Parent, tokens and extra keys of the blocks the local tiers hold (for their events).
    meta: HashMap<BlockHash, BlockMeta>,
}

/// What a tier's `BlockStored` event says of a block besides its hash.
type BlockMeta = (Option<BlockHash>, Vec<u32>, Vec<String>);

impl TierWorker {
    fn run(mut self, jobs: mpsc::Receiver<Job>, done: mpsc::Sender<LoadDone>) {
        while let Ok(job) = jobs.recv() {
            let mut events = Vec::new();
            match job {
                Job::Store {
                    mut blocks,
                    pending,
                } => {
                    self.shared
                        .queued_blocks
                        .fetch_sub(blocks.len(), Ordering::AcqRel);
                    match pending.wait() {
                        Ok(bytes) => {
                            // Blocks the copy left out (no room when it started): dropped.
                            let copied = bytes.len() / self.payload_len.max(1);
                            if copied < blocks.len() {
                                lock(&self.shared.stats).dropped_blocks +=
                                    (blocks.len() - copied) as u64;
                            }
                            blocks.truncate(copied);
                            for (b, payload) in
                                blocks.iter_mut().zip(bytes.chunks_exact(self.payload_len))
                            {
                                b.payload = payload.to_vec();
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, blocks = blocks.len(),
                                "copying KV blocks out of the device for the tiers failed");
                            blocks.clear();
                        }
                    }
                    let records = blocks
                        .into_iter()
                        .map(|b| {
                            self.meta.insert(b.hash, (b.parent, b.tokens, b.extra_keys));
                            let r = block_record::encode(&b.hash, &self.identity, &b.payload);
                            (b.hash, r)
                        })
                        .collect();
                    self.store(records, &mut events)
                }
                Job::Read { hashes, reply } => {
                    let (payloads, _) = self.load(&hashes, [true, true, false]);
                    lock(&self.shared.stats).peer_read_blocks += payloads.len() as u64;
                    let _ = reply.send(payloads);
                }
                Job::Load {
                    ticket,
                    hashes,
                    allowed,
                } => {
                    let t = Instant::now();
                    let (payloads, used) = self.load(&hashes, allowed);
                    let secs = t.elapsed().as_secs_f64();
                    {
                        let mut s = lock(&self.shared.stats);
                        s.loads += 1;
                        s.load_seconds += secs;
                        if let (Some(tier), n) = (used, payloads.len()) {
                            if n > 0 {
                                s.costs.observe_load(tier, secs * 1e9 / n as f64);
                            }
                        }
                    }
                    let _ = done.send(LoadDone { ticket, payloads });
                }
            }
            self.refresh_sizes();
            if let (Some(sink), false) = (&self.events, events.is_empty()) {
                sink.publish(events);
            }
        }
    }

    fn store(&mut self, records: Vec<(BlockHash, Vec<u8>)>, events: &mut Vec<KvEvent>) {
        let mut stored = [Vec::new(), Vec::new()];
        let mut removed = [Vec::new(), Vec::new()];
        for (hash, record) in records {
            let len = record.len() as u64;
            if let Some(r) = &mut self.remote {
                let ok = r.put(hash, record.clone()).is_ok();
                let mut s = lock(&self.shared.stats);
                if ok {
                    s.stored_bytes[Tier::Remote.index()] += len;
                } else {
                    s.errors[Tier::Remote.index()] += 1;
                }
            }
            // Into the host tier when there is one, its evictions on to disk; else straight to
            // disk.
            let to_disk = match &mut self.host {
                Some(h) => {
                    let evicted = h.put(hash, record).unwrap_or_default();
                    lock(&self.shared.index).insert(hash, Tier::Host);
                    lock(&self.shared.stats).stored_bytes[Tier::Host.index()] += len;
                    stored[0].push(hash);
                    for (e, _) in &evicted {
                        lock(&self.shared.index).remove(e);
                        removed[0].push(*e);
                    }
                    evicted
                }
                None => vec![(hash, record)],
            };
            let Some(d) = &mut self.disk else {
                continue;
            };
            for (h, rec) in to_disk {
                let len = rec.len() as u64;
                match d.put(h, rec) {
                    Ok(evicted) => {
                        let mut index = lock(&self.shared.index);
                        index.insert(h, Tier::Disk);
                        for (e, _) in &evicted {
                            index.remove(e);
                            removed[1].push(*e);
                        }
                        lock(&self.shared.stats).stored_bytes[Tier::Disk.index()] += len;
                        stored[1].push(h);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "disk KV tier: store failed");
                        lock(&self.shared.stats).errors[Tier::Disk.index()] += 1;
                    }
                }
            }
        }
        for (i, tier) in [Tier::Host, Tier::Disk].into_iter().enumerate() {
            let medium = tier.medium().expect("local tiers have a medium");
            if !removed[i].is_empty() {
                events.push(KvEvent::BlockRemoved {
                    block_hashes: removed[i].iter().map(BlockHash::external).collect(),
                    medium,
                });
            }
            events.extend(self.stored_events(&stored[i], medium));
        }
        // A block gone from every local tier needs no metadata any more.
        let index = lock(&self.shared.index);
        self.meta.retain(|h, _| index.contains_key(h));
    }

    /// `BlockStored` events for `hashes`, one per run of blocks that chain (parent → child),
    /// with their parents and tokens.
    fn stored_events(&self, hashes: &[BlockHash], medium: super::Medium) -> Vec<KvEvent> {
        let blocks: Vec<_> = hashes
            .iter()
            .map(|h| {
                let m = self.meta.get(h);
                (
                    *h,
                    m.and_then(|m| m.0),
                    m.map_or(&[][..], |m| m.1.as_slice()),
                    m.map_or(&[][..], |m| m.2.as_slice()),
                )
            })
            .collect();
        super::events::stored_in_runs(&blocks, self.block_size, medium)
    }

    /// The verified payloads of the leading blocks of `hashes` held by allowed tiers, and the
    /// slowest tier read.
    fn load(&mut self, hashes: &[BlockHash], allowed: [bool; 3]) -> (Vec<Vec<u8>>, Option<Tier>) {
        let mut out = Vec::new();
        let mut slowest = None;
        let mut remote_batch: Option<std::vec::IntoIter<Fetched>> = None;
        for (i, hash) in hashes.iter().enumerate() {
            let local = lock(&self.shared.index).get(hash).copied();
            let (tier, record) = match local {
                Some(t) if allowed[t.index()] => {
                    let store = self.storage_mut(t).expect("indexed tiers exist");
                    match store.get(hash) {
                        Ok(r) => (t, r),
                        Err(e) => {
                            tracing::warn!(error = %e, "KV tier read failed; recomputing");
                            lock(&self.shared.stats).errors[t.index()] += 1;
                            break;
                        }
                    }
                }
                Some(_) => break,
                None if allowed[Tier::Remote.index()] => {
                    let Some(r) = &mut self.remote else { break };
                    // One round trip for the rest of the run.
                    if remote_batch.is_none() {
                        match r.get_many(&hashes[i..]) {
                            Ok(v) => remote_batch = Some(v.into_iter()),
                            Err(_) => {
                                lock(&self.shared.stats).errors[Tier::Remote.index()] += 1;
                                break;
                            }
                        }
                    }
                    match remote_batch.as_mut().and_then(Iterator::next) {
                        Some(Fetched::Record(r)) => (Tier::Remote, Some(r)),
                        Some(Fetched::Forged) => {
                            tracing::warn!(block = %format!("{:016x}", hash.external()), "remote KV tier: refusing a record whose MAC does not verify under the cluster secret (planted by a writer without it?); recomputing it");
                            {
                                let mut s = lock(&self.shared.stats);
                                s.auth_failures += 1;
                                s.checksum_failures += 1;
                            }
                            self.drop_block(Tier::Remote, hash);
                            break;
                        }
                        Some(Fetched::Missing) | None => (Tier::Remote, None),
                    }
                }
                None => break,
            };
            let Some(record) = record else { break };
            match block_record::decode(&record, hash, &self.identity, self.payload_len) {
                Ok(p) => {
                    let mut s = lock(&self.shared.stats);
                    s.loaded_bytes[tier.index()] += record.len() as u64;
                    s.loaded_blocks[tier.index()] += 1;
                    drop(s);
                    out.push(p.to_vec());
                    slowest = Some(slowest.map_or(tier, |s: Tier| s.max(tier)));
                }
                Err(e) => {
                    tracing::warn!(tier = tier.as_str(), block = %format!("{:016x}", hash.external()), error = %e, "KV tier: dropping a block that failed its check; recomputing it");
                    lock(&self.shared.stats).checksum_failures += 1;
                    self.drop_block(tier, hash);
                    break;
                }
            }
        }
        (out, slowest)
    }

    /// The store of `tier`, when that tier is on.
    fn storage_mut(&mut self, tier: Tier) -> Option<&mut dyn Storage> {
        match tier {
            Tier::Host => self.host.as_mut().map(|s| s as &mut dyn Storage),
            Tier::Disk => self.disk.as_mut().map(|s| s as &mut dyn Storage),
            Tier::Remote => self.remote.as_mut().map(|s| s as &mut dyn Storage),
        }
    }

    fn storage(&self, tier: Tier) -> Option<&dyn Storage> {
        match tier {
            Tier::Host => self.host.as_ref().map(|s| s as &dyn Storage),
            Tier::Disk => self.disk.as_ref().map(|s| s as &dyn Storage),
            Tier::Remote => self.remote.as_ref().map(|s| s as &dyn Storage),
        }
    }

    fn drop_block(&mut self, tier: Tier, hash: &BlockHash) {
        if let Some(s) = self.storage_mut(tier) {
            s.remove(hash);
        }
        if tier != Tier::Remote {
            lock(&self.shared.index).remove(hash);
            if let (Some(sink), Some(medium)) = (&self.events, tier.medium()) {
                sink.publish(vec![KvEvent::BlockRemoved {
                    block_hashes: vec![hash.external()],
                    medium,
                }]);
            }
        }
    }

    fn refresh_sizes(&self) {
        let mut s = lock(&self.shared.stats);
        for tier in Tier::ALL {
            if let Some(st) = self.storage(tier) {
                s.blocks[tier.index()] = st.len();
                s.capacity[tier.index()] = st.capacity();
            }
        }
    }

    /// Times one block-sized load from `tier` (read and verify; disk from a cold page cache),
    /// with a probe record written there and removed after. None when the tier is off or
    /// failed.
    fn measure_load(&mut self, tier: Tier, probe: &Probe<'_>) -> Option<f64> {
        let payload: Vec<u8> = (0..probe.payload_len)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        // A hash no real chain produces: all 0xff.
        let h = BlockHash([0xff; 32]);
        let record = block_record::encode(&h, probe.identity, &payload);
        const ROUNDS: u32 = 3;
        let mut best = f64::MAX;
        for _ in 0..ROUNDS {
            let ns = match tier {
                Tier::Host => {
                    let s = self.host.as_mut()?;
                    s.put(h, record.clone()).ok()?;
                    let t = Instant::now();
                    let r = s.get(&h).ok()??;
                    block_record::decode(&r, &h, probe.identity, probe.payload_len).ok()?;
                    let ns = t.elapsed().as_nanos() as f64;
                    s.remove(&h);
                    ns
                }
                Tier::Disk => {
                    let s = self.disk.as_mut()?;
                    s.put(h, record.clone()).ok()?;
                    drop_page_cache(&s.path(&h));
                    let t = Instant::now();
                    let r = s.get(&h).ok()??;
                    block_record::decode(&r, &h, probe.identity, probe.payload_len).ok()?;
                    let ns = t.elapsed().as_nanos() as f64;
                    s.remove(&h);
                    ns
                }
                Tier::Remote => {
                    let s = self.remote.as_mut()?;
                    s.put(h, record.clone()).ok()?;
                    let t = Instant::now();
                    let Fetched::Record(r) = s.get_many(&[h]).ok()?.pop()? else {
                        return None;
                    };
                    block_record::decode(&r, &h, probe.identity, probe.payload_len).ok()?;
                    let ns = t.elapsed().as_nanos() as f64;
                    s.remove(&h);
                    ns
                }
            };
            best = best.min(ns);
        }
        Some(best)
    }
}

/// Asks the kernel to forget `path`'s cached pages, so the next read goes to the device.
fn drop_page_cache(path: &Path) {
    #[cfg(target_os = "linux")]
    if let Ok(f) = std::fs::File::open(path) {
        use std::os::fd::AsRawFd;
        let _ = f.sync_all();
        // SAFETY: fadvise only takes a valid descriptor and a range.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// A fingerprint of a model directory's contents for block identities: config.json, and for
/// each safetensors file its size and three 1 MiB samples (start with the header, middle,
/// end), so two checkpoints of one architecture (a base and its fine-tune) never share blocks.
pub fn model_fingerprint(dir: &Path) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(&std::fs::read(dir.join("config.json"))?);
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    const SAMPLE: u64 = 1 << 20;
    let mut buf = vec![0u8; SAMPLE as usize];
    for f in files {
        let mut file = std::fs::File::open(&f)?;
        let len = file.metadata()?.len();
        h.update(&len.to_le_bytes());
        for at in [0, len / 2, len.saturating_sub(SAMPLE)] {
            file.seek(SeekFrom::Start(at))?;
            let n = (len - at).min(SAMPLE) as usize;
            file.read_exact(&mut buf[..n])?;
            h.update(&buf[..n]);
        }
    }
    Ok(format!("xxh3:{:016x}", h.digest()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, BackendResult, ReadyKvRead};

    struct Failed;

    impl PendingKvRead for Failed {
        fn wait(self: Box<Self>) -> BackendResult<Vec<u8>> {
            Err(BackendError::Shape {
                op: "test",
                expected: "a copy".into(),
                got: "a failure".into(),
            })
        }
    }

    fn block(i: u8) -> StoreBlock {
        StoreBlock {
            hash: BlockHash([i; 32]),
            parent: None,
            tokens: vec![u32::from(i); 4],
            extra_keys: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// Blocks handed over with a copy still running get the copy's payloads, in order; a copy
    /// that covers only the first blocks stores those; a failed copy stores nothing.
    #[test]
    fn pending_copies_give_their_blocks_payloads() {
        let layout = BlockLayout {
            identity: KvIdentity {
                model: "test".into(),
                num_layers: 2,
                num_kv_heads: 1,
                head_dim: 4,
                block_size: 4,
                dtype: "f32",
            },
            payload_len: 64,
        };
        let config = TierConfig {
            host_bytes: 1 << 20,
            ..TierConfig::default()
        };
        let c = KvConnector::start(&config, &layout, Arc::default(), None).unwrap();
        let bytes: Vec<u8> = (0..128).map(|i| i as u8).collect();
        c.store_pending(
            vec![block(1), block(2)],
            Box::new(ReadyKvRead(bytes.clone())),
        );
        c.store_pending(
            vec![block(3), block(4)],
            Box::new(ReadyKvRead(bytes[..64].to_vec())),
        );
        c.store_pending(vec![block(5)], Box::new(Failed));
        // Jobs run in order: once block 6 is in, the failed copy was handled.
        c.store_pending(vec![block(6)], Box::new(ReadyKvRead(bytes[64..].to_vec())));
        let stored = |n: usize| lock(&c.shared.stats).blocks[0] == n;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stored(4) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(stored(4), "{:?}", lock(&c.shared.stats).blocks);
        for (i, held) in [
            (1, true),
            (2, true),
            (3, true),
            (4, false),
            (5, false),
            (6, true),
        ] {
            assert_eq!(c.holds(&BlockHash([i; 32])), held, "block {i}");
        }
        let rx = c
            .read_run(&[BlockHash([1; 32]), BlockHash([2; 32]), BlockHash([3; 32])])
            .unwrap();
        let payloads = rx.blocking_recv().unwrap();
        assert_eq!(payloads, [&bytes[..64], &bytes[64..], &bytes[..64]]);
    }
}
