//! The threaded engine: an [`EngineCore`] stepping on its own thread, fed through a channel.
//!
//! Work is split as vLLM v1 splits it: the caller's thread tokenizes the prompt (and renders a
//! chat template) before the request is sent, and the [`RequestHandle`] that reads a request
//! detokenizes its tokens and matches stop strings; the engine thread only schedules, runs the
//! model and samples. A stop string found by the handle aborts the request in the engine.
//!
//! Bounds and failure:
//! - the command channel holds at most [`DEFAULT_COMMAND_CAPACITY`] commands: a caller adding a
//!   request waits while it is full (backpressure) instead of growing it without limit;
//! - a panic on the engine thread, or a step error that leaves the device untrustworthy, kills
//!   the engine: every in-flight request gets [`Error::EngineDead`], later requests too, and
//!   [`Engine::dead_reason`] / [`Engine::wait_dead`] report it (the server turns unhealthy and
//!   exits). A handle whose engine went away without a word reports the same, never a silent
//!   end of stream.
//!
//! Dropping a [`RequestHandle`] before its request finished aborts it — this is how a
//! disconnected HTTP client frees its KV blocks.
use super::output::{EngineOutput, OutputProcessor};
use super::{tokenize, EngineCore, EngineLimits, Prompt, RequestOutput, TokenLogprob};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::kv::PrefixCacheStats;
use crate::request::{FinishReason, RequestId, TokenId};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::{mpsc as tmpsc, watch};

/// Commands the engine channel holds before adders wait.
pub const DEFAULT_COMMAND_CAPACITY: usize = 1024;

type OutputTx = tmpsc::UnboundedSender<Result<EngineOutput>>;

enum Command {
    Add {
        id: RequestId,
        tokens: Vec<TokenId>,
        params: SamplingParams,
        priority: i32,
        kv: Box<super::KvOptions>,
        tx: OutputTx,
    },
    Abort(RequestId),
    /// The K/V of a finished request held for a decode worker.
    ReadHeld {
        id: RequestId,
        token: crate::kv::auth::TransferToken,
        blocks: std::ops::Range<usize>,
        reply: tokio::sync::oneshot::Sender<Result<Option<super::PendingHeldKv>>>,
    },
    ReleaseHeld(RequestId),
    /// The K/V of a cached prefix, by block hash (a peer's pull).
    ReadPrefix {
        hashes: Vec<crate::kv::BlockHash>,
        reply: tokio::sync::oneshot::Sender<Result<super::PrefixRead>>,
    },
    /// How many of the leading `hashes` are in this engine's prefix cache.
    CachedBlocks {
        hashes: Vec<crate::kv::BlockHash>,
        reply: tokio::sync::oneshot::Sender<Result<usize>>,
    },
    Shutdown,
}

/// A snapshot of the engine's state, refreshed after every step.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub num_running: usize,
    pub num_waiting: usize,
    pub num_free_blocks: usize,
    pub num_total_blocks: usize,
    pub kv_usage: f32,
    pub prefix_cache: PrefixCacheStats,
    pub num_preemptions: u64,
    pub counters: super::Counters,
    /// Requests waiting for their prefix to load from a KV tier.
    pub num_waiting_for_kv: usize,
    /// Finished prefills whose KV is held for a decode worker.
    pub num_held_kv: usize,
    /// The KV tiers' sizes, traffic and decisions (None when off).
    pub tiers: Option<crate::kv::connector::TierStats>,
}

/// Whether the engine thread is alive; `Some(reason)` once it died.
#[derive(Debug)]
struct Health(watch::Sender<Option<String>>);

impl Health {
    fn reason(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    fn die(&self, reason: String) {
        self.0.send_replace(Some(reason));
    }

    /// The error for a request whose engine is gone: dead (with why) or shut down.
    fn gone(&self) -> Error {
        match self.reason() {
            Some(reason) => Error::EngineDead { reason },
            None => Error::EngineStopped,
        }
    }
}

pub struct Engine {
    tx: mpsc::SyncSender<Command>,
    tokenizer: Arc<Tokenizer>,
    limits: EngineLimits,
    stats: Arc<Mutex<EngineStats>>,
    /// The KV tiers' stats, read live: the tier thread works on after the engine goes idle.
    tiers: Option<crate::kv::connector::TierStatsHandle>,
    health: Arc<Health>,
    next_id: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

/// What [`Engine::try_add_request_with_id`] did with a request.
pub enum AddOutcome {
    /// In the engine's channel; its outputs come through the handle.
    Queued(RequestHandle),
    /// The channel was full: nothing was sent yet.
    Full(Box<PendingAdd>),
}

/// A request waiting for room in the engine's command channel.
pub struct PendingAdd {
    cmd: Command,
    handle: RequestHandle,
}

impl PendingAdd {
    /// Sends the request, blocking the thread until the channel has room.
    pub fn wait(self: Box<Self>) -> Result<RequestHandle> {
        let PendingAdd { cmd, handle } = *self;
        match handle.engine.send(cmd) {
            Ok(()) => Ok(handle.live()),
            Err(_) => Err(handle.health.gone()),
        }
    }
}

/// The stream of one request's outputs.
pub struct RequestHandle {
    id: RequestId,
    rx: tmpsc::UnboundedReceiver<Result<EngineOutput>>,
    engine: mpsc::SyncSender<Command>,
    tokenizer: Arc<Tokenizer>,
    processor: OutputProcessor,
    health: Arc<Health>,
    done: bool,
}

/// A finished request, all deltas joined.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletedRequest {
    pub request_id: RequestId,
    pub token_ids: Vec<TokenId>,
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: FinishReason,
    pub num_prompt_tokens: usize,
    pub num_cached_tokens: usize,
}

impl Engine {
    /// Loads the model (on this thread, so load errors are returned here) and starts the loop.
    pub fn new(config: EngineConfig) -> Result<Self> {
        Self::with_progress(config, &mut |_, _| {})
    }

    pub fn with_progress(
        config: EngineConfig,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let core = EngineCore::with_progress(config, progress)?;
        Ok(Self::from_core(core))
    }

    pub fn from_core(core: EngineCore) -> Self {
        Self::from_core_with_capacity(core, DEFAULT_COMMAND_CAPACITY)
    }

    /// Like [`Engine::from_core`] with a command channel of `capacity` (at least 1).
    pub fn from_core_with_capacity(core: EngineCore, capacity: usize) -> Self {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        let tokenizer = core.tokenizer().clone();
        let limits = core.limits().clone();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        // Stats describe the engine from the start (pool size, tiers), not only after the
        // loop's first turn: a probe right after start-up must see them.
        publish(&core, &stats);
        let tiers = core.tier_stats_handle();
        let health = Arc::new(Health(watch::channel(None).0));
        let (loop_stats, loop_health) = (stats.clone(), health.clone());
        let thread = std::thread::Builder::new()
            .name("llmd-engine".into())
            .spawn(move || run_loop(core, rx, loop_stats, loop_health))
            .expect("spawning the engine thread");
        Self {
            tx,
            tokenizer,
            limits,
            stats,
            tiers,
            health,
            next_id: AtomicU64::new(0),
            thread: Some(thread),
        }
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(t) = &self.tiers {
            s.tiers = Some(t.get());
        }
        s
    }

    /// Why the engine died, or None while it is alive.
    pub fn dead_reason(&self) -> Option<String> {
        self.health.reason()
    }

    /// Resolves with the reason once the engine has died (never while it lives).
    pub async fn wait_dead(&self) -> String {
        let mut rx = self.health.0.subscribe();
        let reason = rx
            .wait_for(Option::is_some)
            .await
            .map(|r| r.clone().unwrap_or_default());
        match reason {
            Ok(r) => r,
            // The sender lives in `self`, so this cannot happen while `self` exists.
            Err(_) => std::future::pending().await,
        }
    }

    /// Queues a request under a fresh id. Tokenization errors are returned here; engine-side
    /// refusals (bad parameters, prompt too long, queue full) arrive as the first item of the
    /// handle. Tokenizes on this thread and blocks while the command channel is full: from
    /// async code, call it inside `spawn_blocking`.
    pub fn add_request(&self, prompt: Prompt, params: SamplingParams) -> Result<RequestHandle> {
        let id = RequestId(format!(
            "req-{}",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        ));
        self.add_request_with_id(id, prompt, params, 0)
    }

    pub fn add_request_with_id(
        &self,
        id: RequestId,
        prompt: Prompt,
        params: SamplingParams,
        priority: i32,
    ) -> Result<RequestHandle> {
        match self.try_add_request_with_id(id, prompt, params, priority)? {
            AddOutcome::Queued(h) => Ok(h),
            AddOutcome::Full(pending) => pending.wait(),
        }
    }

    /// Like [`Engine::add_request_with_id`] without waiting: when the command channel is full
    /// the request comes back as [`AddOutcome::Full`], to be sent with [`PendingAdd::wait`]
    /// where blocking is fine (async callers: `spawn_blocking`). So the common case costs no
    /// thread hop, and only a full channel parks a thread.
    pub fn try_add_request_with_id(
        &self,
        id: RequestId,
        prompt: Prompt,
        params: SamplingParams,
        priority: i32,
    ) -> Result<AddOutcome> {
        self.try_add_request_with_kv(id, prompt, params, priority, super::KvOptions::default())
    }

    /// [`Engine::try_add_request_with_id`] with KV kept for, or received from, another worker
    /// (disaggregated prefill/decode).
    pub fn try_add_request_with_kv(
        &self,
        id: RequestId,
        prompt: Prompt,
        params: SamplingParams,
        priority: i32,
        kv: super::KvOptions,
    ) -> Result<AddOutcome> {
        if let Some(reason) = self.health.reason() {
            return Err(Error::EngineDead { reason });
        }
        let tokens = match prompt {
            Prompt::Tokens(ids) => {
                super::check_tokens(&ids, self.limits.vocab_size)?;
                ids
            }
            p => tokenize(&self.tokenizer, &p, self.limits.vocab_size)?,
        };
        let processor = OutputProcessor::new(&params, &tokens);
        let (tx, rx) = tmpsc::unbounded_channel();
        let handle = RequestHandle {
            id: id.clone(),
            rx,
            engine: self.tx.clone(),
            tokenizer: self.tokenizer.clone(),
            processor,
            health: self.health.clone(),
            // Not live until the command is in the channel: dropping it before sends no abort.
            done: true,
        };
        let cmd = Command::Add {
            id,
            tokens,
            params,
            priority,
            kv: Box::new(kv),
            tx,
        };
        match self.tx.try_send(cmd) {
            Ok(()) => Ok(AddOutcome::Queued(handle.live())),
            Err(mpsc::TrySendError::Full(cmd)) => {
                Ok(AddOutcome::Full(Box::new(PendingAdd { cmd, handle })))
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(self.health.gone()),
        }
    }

    /// The K/V a finished request holds for a decode worker (see
    /// [`super::KvOptions::hold`]); Ok(None) when nothing is held under `id` with `token`.
    pub async fn read_held(
        &self,
        id: &RequestId,
        token: &crate::kv::auth::TransferToken,
        blocks: std::ops::Range<usize>,
    ) -> Result<Option<crate::kv::transfer::HeldKv>> {
        let pending = self
            .ask(|reply| Command::ReadHeld {
                id: id.clone(),
                token: *token,
                blocks,
                reply,
            })
            .await?;
        // The engine thread only started the copy out of the device: it is waited for here,
        // on a blocking thread.
        match pending {
            None => Ok(None),
            Some(p) => match tokio::task::spawn_blocking(move || p.wait()).await {
                Ok(held) => held.map(Some),
                Err(e) => match e.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    Err(_) => Err(Error::EngineStopped),
                },
            },
        }
    }

    /// The K/V of the leading run of `hashes` this engine has cached, in its device or in
    /// its host/disk tiers (a peer pulling a cached prefix; see
    /// [`super::EngineCore::read_cached_prefix`]). The tiers' part is awaited here, off the
    /// engine thread.
    pub async fn read_cached_prefix(
        &self,
        hashes: Vec<crate::kv::BlockHash>,
    ) -> Result<Vec<Vec<u8>>> {
        let read = self
            .ask(|reply| Command::ReadPrefix { hashes, reply })
            .await?;
        Ok(read.finish().await)
    }

    /// How many of the leading `hashes` this engine has in its prefix cache (whether pulling
    /// a prefix from a peer is worth it).
    pub async fn cached_prefix_blocks(&self, hashes: Vec<crate::kv::BlockHash>) -> Result<usize> {
        self.ask(|reply| Command::CachedBlocks { hashes, reply })
            .await
    }

    /// Sends the command `make` builds around a reply channel and waits for the engine's
    /// answer. A full channel is a busy engine: the caller (a peer's pull) gets an error and
    /// its side recomputes rather than wait here.
    async fn ask<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => Error::QueueFull {
                limit: DEFAULT_COMMAND_CAPACITY,
            },
            mpsc::TrySendError::Disconnected(_) => self.health.gone(),
        })?;
        rx.await.map_err(|_| self.health.gone())?
    }

    /// Frees a held request's blocks (a decode worker has them).
    pub fn release_held(&self, id: &RequestId) {
        if self.tx.try_send(Command::ReleaseHeld(id.clone())).is_err() {
            // Busy: the blocks go when their lease runs out.
            tracing::warn!(request_id = %id, "engine busy; held KV is freed by its lease");
        }
    }

    pub fn abort(&self, id: &RequestId) {
        // A full channel drops the abort; the engine still sees the handle's closed channel.
        let _ = self.tx.try_send(Command::Abort(id.clone()));
    }

    /// Runs every prompt to completion with the same parameters; outputs in prompt order.
    /// Blocks the calling thread: from async code, call it inside `spawn_blocking` or
    /// `block_in_place` (or stream with [`RequestHandle::next`] instead).
    pub fn generate(
        &self,
        prompts: Vec<Prompt>,
        params: &SamplingParams,
    ) -> Result<Vec<CompletedRequest>> {
        let handles = prompts
            .into_iter()
            .map(|p| self.add_request(p, params.clone()))
            .collect::<Result<Vec<_>>>()?;
        handles.into_iter().map(RequestHandle::collect).collect()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl RequestHandle {
    pub fn id(&self) -> &RequestId {
        &self.id
    }

    /// Marks the request as in the engine: from now on dropping the handle aborts it.
    fn live(mut self) -> Self {
        self.done = false;
        self
    }

    /// Turns what the engine sent into the user's delta, ending the handle on a finish or an
    /// error.
    fn process(&mut self, item: Option<Result<EngineOutput>>) -> Option<Result<RequestOutput>> {
        let engine_finished = matches!(&item, Some(Ok(o)) if o.finished());
        let out = match item {
            // The engine went away before this request finished: never a silent end.
            None => Err(self.health.gone()),
            Some(Err(e)) => Err(e),
            Some(Ok(o)) => self
                .processor
                .process(&self.tokenizer, o)
                .map_err(Error::from),
        };
        match &out {
            Ok(o) if !o.finished() => {}
            Ok(_) => {
                self.done = true;
                if !engine_finished {
                    // A stop string, which the engine does not know about: stop it there too.
                    self.stop_engine_request();
                }
            }
            Err(_) => {
                self.done = true;
                self.stop_engine_request();
            }
        }
        Some(out)
    }

    /// Tells the engine this request is over: the closed channel alone is enough (the engine
    /// aborts requests whose handle channel closed), the abort command is the fast path.
    fn stop_engine_request(&mut self) {
        self.rx.close();
        let _ = self.engine.try_send(Command::Abort(self.id.clone()));
    }

    /// The next delta, waiting for it; None once the request has ended. Blocks the thread, so
    /// it must not run on an async runtime's worker (use [`RequestHandle::next`] there).
    pub fn next_blocking(&mut self) -> Option<Result<RequestOutput>> {
        if self.done {
            return None;
        }
        let item = self.rx.blocking_recv();
        self.process(item)
    }

    /// The next delta (async); None once the request has ended.
    pub async fn next(&mut self) -> Option<Result<RequestOutput>> {
        if self.done {
            return None;
        }
        let item = self.rx.recv().await;
        self.process(item)
    }

    /// Waits for the request to finish and joins its deltas.
    pub fn collect(mut self) -> Result<CompletedRequest> {
        let mut c = CompletedRequest {
            request_id: self.id.clone(),
            token_ids: vec![],
            text: String::new(),
            logprobs: vec![],
            finish_reason: FinishReason::Abort,
            num_prompt_tokens: 0,
            num_cached_tokens: 0,
        };
        while let Some(item) = self.next_blocking() {
            let o = item?;
            c.token_ids.extend(o.new_token_ids);
            c.text.push_str(&o.new_text);
            c.logprobs.extend(o.logprobs);
            c.num_prompt_tokens = o.num_prompt_tokens;
            c.num_cached_tokens = o.num_cached_tokens;
            if let Some(r) = o.finish_reason {
                c.finish_reason = r;
            }
        }
        Ok(c)
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        if !self.done {
            self.stop_engine_request();
        }
    }
}

fn publish(core: &EngineCore, stats: &Mutex<EngineStats>) {
    let s = core.scheduler();
    let snapshot = EngineStats {
        num_running: s.num_running(),
        num_waiting: s.num_waiting() + s.num_waiting_for_kv(),
        num_waiting_for_kv: s.num_waiting_for_kv(),
        num_held_kv: core.num_held(),
        // Filled live by `Engine::stats` (the tier thread works on while the loop idles).
        tiers: None,
        num_free_blocks: s.kv().num_free_blocks(),
        num_total_blocks: s.kv().num_total_blocks(),
        kv_usage: s.kv().usage(),
        prefix_cache: s.prefix_cache_stats(),
        num_preemptions: s.num_preemptions(),
        counters: core.counters(),
    };
    if let Ok(mut g) = stats.lock() {
        *g = snapshot;
    }
}

/// Runs the loop; when it dies (a panic, or a fatal step error), records why, tells every
/// in-flight request and answers every queued command with the same error.
fn run_loop(
    mut core: EngineCore,
    rx: mpsc::Receiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
    health: Arc<Health>,
) {
    let mut senders: HashMap<RequestId, OutputTx> = HashMap::new();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        step_loop(&mut core, &rx, &stats, &mut senders)
    }));
    let reason = match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown payload".into());
            format!("engine thread panicked: {what}")
        }
    };
    tracing::error!(%reason, in_flight = senders.len(), "the engine died");
    health.die(reason.clone());
    for (_, tx) in senders.drain() {
        let _ = tx.send(Err(Error::EngineDead {
            reason: reason.clone(),
        }));
    }
    // Adds already queued get the same answer; dropping `rx` then fails every later send.
    while let Ok(c) = rx.try_recv() {
        if let Command::Add { tx, .. } = c {
            let _ = tx.send(Err(Error::EngineDead {
                reason: reason.clone(),
            }));
        }
    }
}

/// The engine loop. Returns Ok on shutdown, Err on a fatal step error.
fn step_loop(
    core: &mut EngineCore,
    rx: &mpsc::Receiver<Command>,
    stats: &Mutex<EngineStats>,
    senders: &mut HashMap<RequestId, OutputTx>,
) -> Result<()> {
    publish(core, stats);
    let mut last_trim = std::time::Instant::now();
    loop {
        // Block only when idle; otherwise take what has arrived and step.
        let first = if core.has_unfinished_requests() {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
            }
        } else {
            // At most once a second, so a trickle of single requests does not pay for it.
            if last_trim.elapsed() >= std::time::Duration::from_secs(1) {
                release_free_memory();
                last_trim = std::time::Instant::now();
            }
            // Held KV must be freed when its lease runs out, even with nothing else to do.
            match core.next_lease_expiry() {
                Some(at) => {
                    let wait = at.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(c) => Some(c),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            core.expire_held();
                            None
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                    }
                }
                None => match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return Ok(()),
                },
            }
        };
        let mut cmd = first;
        while let Some(c) = cmd {
            match c {
                Command::Add {
                    id,
                    tokens,
                    params,
                    priority,
                    kv,
                    tx,
                } => match core.add_tokens_with_kv(id.clone(), tokens, params, priority, *kv) {
                    Ok(()) => {
                        senders.insert(id, tx);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                },
                Command::Abort(id) => {
                    core.abort_request(&id);
                    senders.remove(&id);
                }
                Command::ReadHeld {
                    id,
                    token,
                    blocks,
                    reply,
                } => {
                    let _ = reply.send(core.start_read_held(&id, &token, blocks));
                }
                Command::ReleaseHeld(id) => {
                    core.release_held(&id);
                }
                Command::ReadPrefix { hashes, reply } => {
                    let _ = reply.send(core.read_cached_prefix(&hashes));
                }
                Command::CachedBlocks { hashes, reply } => {
                    let _ = reply.send(Ok(core.cached_prefix_blocks(&hashes)));
                }
                Command::Shutdown => return Ok(()),
            }
            cmd = rx.try_recv().ok();
        }
        // Requests whose handle is gone (client disconnected, stop string) are aborted
        // before the step.
        senders.retain(|id, tx| {
            let open = !tx.is_closed();
            if !open {
                core.abort_request(id);
            }
            open
        });
        if core.has_unfinished_requests() {
            let result = core.step();
            // Stats before outputs: a client that has its last token and then reads the stats
            // (e.g. scrapes /metrics) must find that token counted.
            publish(core, stats);
            match result {
                Ok(outputs) => {
                    for o in outputs {
                        let finished = o.finished();
                        let id = o.request_id.clone();
                        if let Some(tx) = senders.get(&id) {
                            if tx.send(Ok(o)).is_err() {
                                core.abort_request(&id);
                            }
                        }
                        if finished {
                            senders.remove(&id);
                        }
                    }
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    tracing::error!(error = %e, "engine step failed; its requests were aborted");
                    let msg = e.to_string();
                    senders.retain(|id, tx| {
                        if core.scheduler().contains(id) {
                            return true;
                        }
                        let _ = tx.send(Err(Error::StepFailed(msg.clone())));
                        false
                    });
                }
            }
        }
        // Again after the sends: aborts of closed handles changed the pool.
        publish(core, stats);
    }
}

/// Hands the allocator's free pages back to the OS. Called when the engine goes idle: after a
/// burst of requests, glibc keeps the freed memory of every thread's arena mapped, so resident
/// memory would stay at the burst's high-water mark; this makes it track what is in use.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
