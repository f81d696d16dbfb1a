//! The threaded engine: an [`EngineCore`] stepping on its own thread, fed through a channel.
//!
//! Each request gets an unbounded channel of [`RequestOutput`] deltas, readable blocking
//! (`next_blocking`) or async (`next`). Dropping a [`RequestHandle`] before its request finished
//! aborts it — this is how a disconnected HTTP client frees its KV blocks.
use super::{EngineCore, EngineLimits, Prompt, RequestOutput, TokenLogprob};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::kv::PrefixCacheStats;
use crate::request::{FinishReason, RequestId, TokenId};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::mpsc as tmpsc;

type OutputTx = tmpsc::UnboundedSender<Result<RequestOutput>>;

enum Command {
    Add {
        id: RequestId,
        prompt: Prompt,
        params: SamplingParams,
        priority: i32,
        tx: OutputTx,
    },
    Abort(RequestId),
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
}

pub struct Engine {
    tx: mpsc::Sender<Command>,
    tokenizer: Arc<Tokenizer>,
    limits: EngineLimits,
    stats: Arc<Mutex<EngineStats>>,
    next_id: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

/// The stream of one request's outputs.
pub struct RequestHandle {
    id: RequestId,
    rx: tmpsc::UnboundedReceiver<Result<RequestOutput>>,
    engine: mpsc::Sender<Command>,
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
        let (tx, rx) = mpsc::channel();
        let tokenizer = core.tokenizer().clone();
        let limits = core.limits().clone();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let loop_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("llmd-engine".into())
            .spawn(move || run_loop(core, rx, loop_stats))
            .expect("spawning the engine thread");
        Self {
            tx,
            tokenizer,
            limits,
            stats,
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
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Queues a request under a fresh id. Validation errors (bad parameters, prompt too long,
    /// queue full) arrive as the first item of the handle.
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
        let (tx, rx) = tmpsc::unbounded_channel();
        self.tx
            .send(Command::Add {
                id: id.clone(),
                prompt,
                params,
                priority,
                tx,
            })
            .map_err(|_| Error::EngineStopped)?;
        Ok(RequestHandle {
            id,
            rx,
            engine: self.tx.clone(),
            done: false,
        })
    }

    pub fn abort(&self, id: &RequestId) {
        let _ = self.tx.send(Command::Abort(id.clone()));
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

    fn track(&mut self, item: Option<Result<RequestOutput>>) -> Option<Result<RequestOutput>> {
        match &item {
            None | Some(Err(_)) => self.done = true,
            Some(Ok(o)) if o.finished() => self.done = true,
            _ => {}
        }
        item
    }

    /// The next delta, waiting for it; None once the request has ended. Blocks the thread, so
    /// it must not run on an async runtime's worker (use [`RequestHandle::next`] there).
    pub fn next_blocking(&mut self) -> Option<Result<RequestOutput>> {
        if self.done {
            return None;
        }
        let item = self.rx.blocking_recv();
        self.track(item)
    }

    /// The next delta (async); None once the request has ended.
    pub async fn next(&mut self) -> Option<Result<RequestOutput>> {
        if self.done {
            return None;
        }
        let item = self.rx.recv().await;
        self.track(item)
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
            let _ = self.engine.send(Command::Abort(self.id.clone()));
        }
    }
}

fn publish(core: &EngineCore, stats: &Mutex<EngineStats>) {
    let s = core.scheduler();
    let snapshot = EngineStats {
        num_running: s.num_running(),
        num_waiting: s.num_waiting(),
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

fn run_loop(mut core: EngineCore, rx: mpsc::Receiver<Command>, stats: Arc<Mutex<EngineStats>>) {
    let mut senders: HashMap<RequestId, OutputTx> = HashMap::new();
    publish(&core, &stats);
    loop {
        // Block only when idle; otherwise take what has arrived and step.
        let first = if core.has_unfinished_requests() {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        let mut cmd = first;
        while let Some(c) = cmd {
            match c {
                Command::Add {
                    id,
                    prompt,
                    params,
                    priority,
                    tx,
                } => match core.add_request(id.clone(), &prompt, params, priority) {
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
                Command::Shutdown => return,
            }
            cmd = rx.try_recv().ok();
        }
        // Requests whose handle is gone (client disconnected) are aborted before the step.
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
            publish(&core, &stats);
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
        publish(&core, &stats);
    }
}
