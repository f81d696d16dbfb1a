//! The engine: validates and admits requests, runs scheduler → model → sampler steps, and
//! reports each request's progress.
//!
//! [`EngineCore`] is the synchronous step loop (used directly by tests that control arrival
//! steps); it deals in token ids only. [`Engine`] runs it on its own thread behind a channel,
//! with streaming [`RequestHandle`]s and a blocking [`Engine::generate`]; tokenization,
//! detokenization and stop strings run on the callers' threads, never on the engine's.
//!
//! Invariants: every request that leaves — finished, aborted, or failed — is removed from the
//! scheduler, which frees its KV blocks in the same call; a block is findable in the prefix
//! cache only after the step that wrote its KV succeeded.
pub mod fault;
mod handle;
mod output;

pub use fault::{Fault, FaultInjector};
pub use handle::{
    AddOutcome, CompletedRequest, Engine, EngineStats, PendingAdd, RequestHandle,
    DEFAULT_COMMAND_CAPACITY,
};
pub use output::{EngineOutput, RequestOutput, TokenLogprob};

use crate::backend::cpu::sampling::RowSampling;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BackendError, BatchPlan, SeqPlan};
use crate::config::{DeviceKind, EngineConfig};
use crate::error::{Error, Result};
use crate::kv::block_record::KvIdentity;
pub use crate::kv::connector::PrefillCost;
use crate::kv::connector::{BlockLayout, KvConnector, StoreBlock, TierStats};
use crate::kv::transfer::HeldKv;
use crate::kv::{BlockHasher, KvCacheManager, KvEvent, KvEventSink, Medium};
use crate::model::{Model, ModelConfig, ModelError, ModelLimits, ModelRunner, RopeScaling};
use crate::request::{FinishReason, RequestId, TokenId};
use crate::sampling::{mask_tokens, SamplingParams};
use crate::scheduler::{Request, Scheduler, SchedulerOutput};
use crate::tokenizer::{ChatMessage, Tokenizer};
use output::RequestState;
use std::collections::HashMap;
use std::sync::Arc;

/// What to generate from.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Text, tokenized with the model's special tokens (BOS) added.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<TokenId>),
    /// Chat messages, rendered with the model's chat template (generation prompt added).
    Chat(Vec<ChatMessage>),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

/// How a request's KV is keyed, and how it crosses workers (disaggregated prefill/decode).
#[derive(Clone, Debug, Default)]
pub struct KvOptions {
    /// Keep the request's KV blocks when it finishes, for a decode worker to read.
    pub hold: Option<Hold>,
    /// KV received from a prefill worker for the prompt's first tokens.
    pub received: Option<ReceivedKv>,
    /// vLLM's `cache_salt`: mixed into the first block's hash, so only requests with the same
    /// salt share cached blocks (one tenant's prefix is never another's cache hit).
    pub cache_salt: Option<String>,
}

impl KvOptions {
    /// The request's extra block-hash keys ([`crate::kv::block_hash::block_extra`]).
    pub fn extra_keys(&self) -> Vec<String> {
        crate::kv::block_hash::salt_keys(self.cache_salt.as_deref())
    }
}

/// A finished request's KV kept for a decode worker: for at most `lease` (sooner when
/// [`EngineCore::release_held`] frees it), readable only with `token`.
#[derive(Clone, Debug)]
pub struct Hold {
    pub lease: std::time::Duration,
    pub token: crate::kv::auth::TransferToken,
}

/// Verified K/V of a prompt's first blocks: `payloads[i]` is block `i` (all layers), covering
/// the first `covered` tokens (the last block may be partial).
#[derive(Clone, Debug)]
pub struct ReceivedKv {
    pub payloads: Vec<Vec<u8>>,
    pub covered: usize,
}

/// A finished request's KV kept for a decode worker.
#[derive(Debug)]
struct Held {
    blocks: Vec<crate::kv::BlockId>,
    prompt_len: usize,
    /// What binds the blocks to the prompt ([`crate::kv::BlockHasher::hash_prompt`]).
    hashes: Vec<crate::kv::BlockHash>,
    token: crate::kv::auth::TransferToken,
    expires: std::time::Instant,
}

/// Limits derived from the config and the model, shared with the front end for validation.
#[derive(Clone, Debug)]
pub struct EngineLimits {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub max_waiting_requests: Option<usize>,
    /// How waiting requests are ordered (a request's `priority` counts only under `Priority`).
    pub scheduling_policy: crate::config::SchedulingPolicy,
    pub num_blocks: usize,
    pub block_size: usize,
    pub enable_prefix_caching: bool,
    /// The block hash scheme's name (`xxh3_64`, `sha256_cbor_64bit`).
    pub block_hash_algo: &'static str,
    /// What a KV block sent to another worker is checked against (model and layout identity,
    /// bytes per block).
    pub kv_layout: crate::kv::transfer::TransferLayout,
    /// How this engine hashes blocks (to ask a peer for a cached prefix by hash).
    pub block_hasher: BlockHasher,
    /// What a prompt token costs to prefill here, measured on real steps (whether pulling
    /// KV from a peer beats computing it).
    pub prefill_cost: Arc<PrefillCost>,
}

/// A held request's K/V on its way out of the device ([`EngineCore::start_read_held`]).
pub struct PendingHeldKv {
    copy: Box<dyn crate::backend::PendingKvRead>,
    block_bytes: usize,
    prompt_len: usize,
    hashes: Vec<crate::kv::BlockHash>,
}

impl PendingHeldKv {
    /// Waits for the copy (blocking: call it off the async runtime's workers).
    pub fn wait(self) -> Result<HeldKv> {
        let bytes = self.copy.wait()?;
        Ok(HeldKv {
            payloads: split_payloads(&bytes, self.block_bytes),
            prompt_len: self.prompt_len,
            hashes: self.hashes,
        })
    }
}

/// Blocks' payloads, back to back in `packed`, one `Vec` each.
fn split_payloads(packed: &[u8], block_bytes: usize) -> Vec<Vec<u8>> {
    packed
        .chunks_exact(block_bytes.max(1))
        .map(<[u8]>::to_vec)
        .collect()
}

/// A cached prefix being read for a peer: the device's part, and the tiers' part on its way.
#[derive(Debug)]
pub struct PrefixRead {
    pub device: Vec<Vec<u8>>,
    pub tiers: Option<tokio::sync::oneshot::Receiver<Vec<Vec<u8>>>>,
}

impl PrefixRead {
    /// Every payload, in prefix order.
    pub async fn finish(self) -> Vec<Vec<u8>> {
        let mut out = self.device;
        if let Some(rx) = self.tiers {
            out.extend(rx.await.unwrap_or_default());
        }
        out
    }

    /// [`Self::finish`], for callers off any async runtime.
    pub fn finish_blocking(self) -> Vec<Vec<u8>> {
        let mut out = self.device;
        if let Some(rx) = self.tiers {
            out.extend(rx.blocking_recv().unwrap_or_default());
        }
        out
    }
}

/// The synchronous engine: one `step()` runs one batch.
pub struct EngineCore {
    model: Box<dyn ModelRunner>,
    tokenizer: Arc<Tokenizer>,
    scheduler: Scheduler,
    states: HashMap<RequestId, RequestState>,
    limits: EngineLimits,
    eos_token_ids: Vec<TokenId>,
    /// Host logits of the last step `[rows, vocab]`.
    logits: Vec<f32>,
    /// Tokens of the last step's rows that the backend picked.
    device_tokens: Vec<TokenId>,
    /// Per sampled row of the step: the backend picks its token (`Some`) or the host does.
    row_params: Vec<Option<RowSampling>>,
    /// Random (non-greedy) rows are sampled by the backend too, not only greedy ones.
    random_on_device: bool,
    counters: Counters,
    /// Threads of the CPU work. The whole forward runs inside the pool, so each op's parallel
    /// loop starts on a worker instead of paying a cross-thread hand-off per op.
    pool: rayon::ThreadPool,
    /// Where the KV events of each step go.
    kv_events: Option<Arc<dyn KvEventSink>>,
    /// Bytes of one block's K and V over all layers (a tier record's payload).
    kv_block_bytes: usize,
    /// Requests to keep the KV of when they finish.
    hold_for: HashMap<RequestId, Hold>,
    /// Finished requests' KV kept for decode workers.
    held: HashMap<RequestId, Held>,
    /// Prompt tokens of each request whose KV came from a prefill worker.
    received: HashMap<RequestId, usize>,
}

/// Monotonic totals since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub steps: u64,
    /// Prompt tokens actually computed (prefix-cache hits excluded, recomputes included).
    pub prompt_tokens_computed: u64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub finished_requests: u64,
    /// Tokens of random (non-greedy) rows that the backend picked (device sampling).
    pub backend_sampled_random: u64,
    /// Steps whose model call failed (their requests were aborted).
    pub failed_steps: u64,
    /// Held KV freed because no decode worker read it within its lease.
    pub kv_leases_expired: u64,
    /// Held KV freed before its lease ended to keep held blocks under their cap.
    pub kv_held_evicted: u64,
    /// Wall time of the steps that ran a batch (schedule, plan, model call, outputs), in ns.
    pub step_ns: u64,
    /// Of that, the model call (upload, launch, wait for the device, read back), in ns.
    pub model_ns: u64,
    /// Device-clock time of those steps' kernels (0 where the backend cannot tell), in ns:
    /// `step_ns - device_ns` is what the host adds.
    pub device_ns: u64,
}

/// Bytes of K and V of one block across all layers, with `element_bytes` per cached element
/// (the backend's KV dtype). None on overflow (a nonsensical config).
pub fn kv_bytes_per_block(
    cfg: &ModelConfig,
    block_size: usize,
    element_bytes: usize,
) -> Option<usize> {
    [
        cfg.num_hidden_layers,
        2,
        block_size,
        cfg.num_key_value_heads,
        cfg.head_dim,
        element_bytes,
    ]
    .into_iter()
    .try_fold(1usize, usize::checked_mul)
}

/// Bytes of device memory the KV cache is not given even under `gpu_memory_utilization`: CUDA
/// graphs, cuBLAS's own allocations and the lazily grown scratch of odd step shapes.
pub const DEVICE_HEADROOM_BYTES: usize = 256 << 20;

/// Most of the KV pool that finished requests' KV held for decode workers may take; past it the
/// oldest held KV is freed first.
pub const MAX_HELD_FRACTION: f64 = 0.5;

/// Where the KV pool's size comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvBudget {
    /// `num_blocks` (vLLM's `--num-gpu-blocks-override`).
    Blocks(usize),
    /// A number of bytes (`--kv-cache-memory-gb`, or the CPU's default).
    Bytes(usize),
    /// What `utilization` × `total` leaves once the device holds `used` bytes (weights, step
    /// buffers, scratch) and [`DEVICE_HEADROOM_BYTES`].
    Device {
        utilization: f64,
        free: usize,
        total: usize,
    },
}

impl KvBudget {
    /// The budget for `cache` on a device reporting `memory` (`(free, total)`, None on the CPU).
    pub fn new(cache: &crate::config::CacheConfig, memory: Option<(usize, usize)>) -> Self {
        match (cache.num_blocks, cache.kv_cache_memory_bytes, memory) {
            (Some(n), _, _) => KvBudget::Blocks(n),
            (None, Some(b), _) => KvBudget::Bytes(b),
            (None, None, Some((free, total))) => KvBudget::Device {
                utilization: cache.gpu_memory_utilization,
                free,
                total,
            },
            (None, None, None) => KvBudget::Bytes(crate::config::CPU_KV_CACHE_BYTES),
        }
    }

    /// Bytes the KV cache may take (None: a block count was given).
    pub fn bytes(&self) -> Option<usize> {
        match *self {
            KvBudget::Blocks(_) => None,
            KvBudget::Bytes(b) => Some(b),
            KvBudget::Device {
                utilization,
                free,
                total,
            } => {
                let allowed = (utilization * total as f64) as usize;
                let used = total.saturating_sub(free);
                Some(allowed.saturating_sub(used + DEVICE_HEADROOM_BYTES))
            }
        }
    }

    /// The pool's block count at `per_block` bytes each, refusing a pool that cannot hold the
    /// KV of one sequence — `seq_tokens`: `max_model_len`, or for a model whose every layer
    /// has a sliding window, that window plus one step's tokens ([`sequence_kv_tokens`]) — with
    /// the number of tokens it could hold (as vLLM says it) and what to change.
    pub fn blocks(&self, per_block: usize, block_size: usize, seq_tokens: usize) -> Result<usize> {
        let n = match (*self, self.bytes()) {
            (KvBudget::Blocks(n), _) => {
                if n.checked_mul(per_block).is_none() {
                    return Err(Error::Config {
                        field: "num_blocks",
                        reason: format!("{n} KV blocks of {per_block} bytes overflow"),
                    });
                }
                n
            }
            (_, Some(bytes)) => bytes / per_block.max(1),
            (_, None) => 0,
        };
        let tokens = n.saturating_mul(block_size);
        if tokens >= seq_tokens {
            return Ok(n);
        }
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let (field, how) = match *self {
            KvBudget::Blocks(_) => ("num_blocks", "raise --num-gpu-blocks-override".to_string()),
            KvBudget::Bytes(b) => (
                "kv_cache_memory_bytes",
                format!("{:.2} GiB of KV cache; raise --kv-cache-memory-gb", gib(b)),
            ),
            KvBudget::Device {
                utilization,
                free,
                total,
            } => (
                "gpu_memory_utilization",
                format!(
                    "{:.2} GiB left for the KV cache: {utilization} of the GPU's {:.2} GiB, of which the weights and step buffers use {:.2} GiB; raise --gpu-memory-utilization",
                    gib(self.bytes().unwrap_or(0)),
                    gib(total),
                    gib(total.saturating_sub(free)),
                ),
            ),
        };
        Err(Error::Config {
            field,
            reason: format!(
                "one sequence's KV ({seq_tokens} tokens: the model's max_model_len, or its sliding window plus one step) is larger than the {tokens} tokens the KV cache can hold ({n} blocks of {block_size}, {how}, or lower --max-model-len)"
            ),
        })
    }
}

/// Tokens of KV one sequence may hold at once: `max_model_len`, or with a sliding window on
/// every layer (`window`) the window, the most tokens one step adds and two partial blocks.
pub fn sequence_kv_tokens(
    max_model_len: usize,
    window: Option<usize>,
    max_step_tokens: usize,
    block_size: usize,
) -> usize {
    match window {
        // Saturating: a window past any length (a config may say `u64::MAX`) is no window.
        Some(w) => max_model_len.min(
            w.saturating_add(max_step_tokens)
                .saturating_add(block_size.saturating_mul(2)),
        ),
        None => max_model_len,
    }
}

/// A model loaded on its backend, with its KV pool's size.
struct Loaded {
    model: Box<dyn ModelRunner>,
    num_blocks: usize,
    /// Bytes of one block's K and V over all layers, in the backend's KV dtype.
    kv_block_bytes: usize,
}

/// Loads the model on `backend`, then sizes the KV pool from the backend's own element size
/// and, on a device, from the memory the weights and step buffers left (vLLM's
/// `--gpu-memory-utilization`).
fn load_on<B: Backend>(
    backend: B,
    config: &EngineConfig,
    model_cfg: &ModelConfig,
    max_model_len: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Loaded> {
    let block_size = config.cache.block_size;
    let per_block = kv_bytes_per_block(model_cfg, block_size, B::KV_ELEMENT_BYTES)
        .filter(|&b| b > 0)
        .ok_or_else(|| Error::Config {
            field: "block_size",
            reason: format!(
                "one KV block of {block_size} tokens for this model overflows or is empty"
            ),
        })?;
    // A block count or byte size given outright is checked before any weight loads.
    let seq_tokens = sequence_kv_tokens(
        max_model_len,
        model_cfg.kv_window(),
        config.scheduler.max_num_batched_tokens,
        block_size,
    );
    if config.cache.num_blocks.is_some() || config.cache.kv_cache_memory_bytes.is_some() {
        KvBudget::new(&config.cache, None).blocks(per_block, block_size, seq_tokens)?;
    }
    let limits = ModelLimits {
        max_tokens: config.scheduler.max_num_batched_tokens,
        max_logit_rows: config.scheduler.max_num_seqs,
        max_positions: max_model_len,
        num_blocks: 0,
        block_size,
    };
    let cache = &config.cache;
    let model = Model::load_sized(
        backend,
        &config.model,
        model_cfg.clone(),
        limits,
        |b: &B| {
            let budget = KvBudget::new(cache, b.memory_info());
            let n = budget.blocks(per_block, block_size, seq_tokens)?;
            tracing::info!(
                ?budget,
                blocks = n,
                tokens = n * block_size,
                gib = (n * per_block) as f64 / (1u64 << 30) as f64,
                "KV cache sized"
            );
            Ok::<_, Error>(n)
        },
        progress,
    )?;
    let num_blocks = model.limits().num_blocks;
    Ok(Loaded {
        model: Box::new(model),
        num_blocks,
        kv_block_bytes: per_block,
    })
}

impl EngineCore {
    pub fn new(config: EngineConfig) -> Result<Self> {
        Self::with_progress(config, &mut |_, _| {})
    }

    /// Loads the model, calling `progress(done_bytes, total_bytes)` while weights load.
    pub fn with_progress(
        config: EngineConfig,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        config.validate()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.num_threads.unwrap_or(0))
            .thread_name(|i| format!("llmd-cpu-{i}"))
            .build()
            .map_err(|e| Error::Config {
                field: "num_threads",
                reason: e.to_string(),
            })?;
        let model_cfg = ModelConfig::from_dir(&config.model)?;
        let tokenizer = Arc::new(Tokenizer::from_dir(&config.model)?);
        let max_model_len = match config.max_model_len {
            None => model_cfg.max_position_embeddings,
            Some(n) if n <= model_cfg.max_position_embeddings => n,
            Some(n) => {
                return Err(Error::Config {
                    field: "max_model_len",
                    reason: format!(
                        "{n} exceeds the model's max_position_embeddings {}",
                        model_cfg.max_position_embeddings
                    ),
                })
            }
        };
        let block_size = config.cache.block_size;
        let sched_cfg = config.scheduler.clone();
        let Loaded {
            model,
            num_blocks,
            kv_block_bytes,
        } = match config.device {
            DeviceKind::Cpu => {
                let cpu = CpuBackend {
                    f32_matrices_to_bf16: config.cpu_bf16_weights,
                    int8_weights: config.quantization == Some(crate::config::Quantization::Int8),
                };
                load_on(cpu, &config, &model_cfg, max_model_len, progress)?
            }
            DeviceKind::Cuda(n) => load_on(
                crate::backend::cuda::CudaBackend::with_graphs(n, !config.enforce_eager)
                    .map_err(ModelError::from)?,
                &config,
                &model_cfg,
                max_model_len,
                progress,
            )?,
        };
        let model = match &config.fault_injection {
            Some(f) => f.wrap(model),
            None => model,
        };
        let mut eos_token_ids = tokenizer.eos_token_ids().to_vec();
        for id in &model_cfg.eos_token_ids {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }
        let mut kv = KvCacheManager::new(
            num_blocks,
            block_size,
            config.cache.enable_prefix_caching,
            BlockHasher::new(config.cache.block_hash_algo, &config.cache.block_hash_seed),
        );
        // Every layer windowed: blocks behind each request's window go back to the pool.
        kv.set_window(model_cfg.kv_window());
        let random_on_device = config
            .device_sampling
            .unwrap_or_else(|| model.samples_on_device());
        let mut model = model;
        let mut scheduler = Scheduler::new(sched_cfg.clone(), kv);
        let kv_events = config.kv_events.as_ref().map(|h| h.0.clone());
        if kv_events.is_some() {
            scheduler.record_kv_changes();
        }
        let fingerprint =
            crate::kv::connector::model_fingerprint(&config.model).map_err(|e| Error::Config {
                field: "model",
                reason: format!("fingerprinting the model's files for KV identity: {e}"),
            })?;
        let rope_variant = model_cfg.rope_variant(max_model_len);
        if let (
            Some("longrope-long"),
            Some(RopeScaling::LongRope {
                original_max_position_embeddings: original,
                ..
            }),
        ) = (rope_variant, &model_cfg.rope_scaling)
        {
            tracing::warn!(
                max_model_len,
                original,
                "LongRoPE: the long factors serve every position, which costs some quality on \
                 short sequences; a --max-model-len of at most {original} keeps the short ones"
            );
        }
        // KV crosses processes (tiers, transfers) only between engines that computed it alike:
        // LongRoPE's factor set depends on this engine's context, not only on the files.
        let identity = KvIdentity {
            model: match rope_variant {
                Some(v) => format!("{fingerprint}+{v}"),
                None => fingerprint,
            },
            num_layers: model_cfg.num_hidden_layers,
            num_kv_heads: model_cfg.num_key_value_heads,
            head_dim: model_cfg.head_dim,
            block_size,
            dtype: model.kv_dtype(),
        };
        let kv_layout = crate::kv::transfer::TransferLayout {
            identity: identity.canonical(),
            payload_len: kv_block_bytes,
        };
        let prefill_cost = Arc::new(PrefillCost::default());
        if config.kv_tiers.is_enabled() {
            let limit = [
                256,
                sched_cfg.max_num_batched_tokens,
                max_model_len - 1,
                num_blocks * block_size,
            ]
            .into_iter()
            .min()
            .unwrap_or(1)
            .max(1);
            let ns = pool.install(|| measure_prefill(model.as_mut(), limit, block_size))?;
            prefill_cost.observe(ns);
            let layout = BlockLayout {
                identity,
                payload_len: kv_block_bytes,
            };
            let connector = KvConnector::start(
                &config.kv_tiers,
                &layout,
                prefill_cost.clone(),
                kv_events.clone(),
            )
            .map_err(|e| Error::Config {
                field: "kv_offloading",
                reason: e.to_string(),
            })?;
            scheduler.set_connector(connector);
        }
        Ok(Self {
            model,
            tokenizer,
            scheduler,
            states: HashMap::new(),
            limits: EngineLimits {
                max_model_len,
                vocab_size: model_cfg.vocab_size,
                max_waiting_requests: sched_cfg.max_waiting_requests,
                scheduling_policy: sched_cfg.policy,
                num_blocks,
                block_size,
                enable_prefix_caching: config.cache.enable_prefix_caching,
                block_hash_algo: config.cache.block_hash_algo.as_str(),
                kv_layout,
                block_hasher: BlockHasher::new(
                    config.cache.block_hash_algo,
                    &config.cache.block_hash_seed,
                ),
                prefill_cost,
            },
            eos_token_ids,
            logits: Vec::new(),
            device_tokens: Vec::new(),
            row_params: Vec::new(),
            random_on_device,
            counters: Counters::default(),
            pool,
            kv_events,
            kv_block_bytes,
            hold_for: HashMap::new(),
            held: HashMap::new(),
            received: HashMap::new(),
        })
    }

    /// Requests whose KV is held for a decode worker.
    pub fn num_held(&self) -> usize {
        self.held.len()
    }

    /// The K/V of a held request's prompt blocks (for a decode worker), its prompt length and
    /// the hashes binding the blocks to the prompt; None when nothing is held under `id` with
    /// `token` (never held, released, its lease expired, or the token is not its own: the
    /// caller cannot tell which).
    /// `blocks` (clamped) names the blocks whose payloads are read, so a transfer reads a
    /// chunk between two steps instead of a whole prompt at once.
    pub fn read_held(
        &self,
        id: &RequestId,
        token: &crate::kv::auth::TransferToken,
        blocks: std::ops::Range<usize>,
    ) -> Result<Option<HeldKv>> {
        self.start_read_held(id, token, blocks)?
            .map(PendingHeldKv::wait)
            .transpose()
    }

    /// [`Self::read_held`] that only starts the copy out of the device (on a GPU: a gather
    /// and an asynchronous copy), for the caller to wait for off the engine thread. The held
    /// blocks stay the request's until it is released, so nothing overwrites them meanwhile.
    pub fn start_read_held(
        &self,
        id: &RequestId,
        token: &crate::kv::auth::TransferToken,
        blocks: std::ops::Range<usize>,
    ) -> Result<Option<PendingHeldKv>> {
        let Some(h) = self.held.get(id).filter(|h| h.token.matches(token)) else {
            return Ok(None);
        };
        let n = h.blocks.len();
        let ids: Vec<usize> = h.blocks[blocks.start.min(n)..blocks.end.min(n)]
            .iter()
            .map(|b| b.0 as usize)
            .collect();
        Ok(Some(PendingHeldKv {
            copy: self
                .model
                .read_kv_blocks_async(&ids, ids.len() * self.kv_block_bytes)?,
            block_bytes: self.kv_block_bytes,
            prompt_len: h.prompt_len,
            hashes: h.hashes.clone(),
        }))
    }

    /// The K/V of each of `blocks` (all layers, as a tier record's payload), read in one go
    /// (one gather and one copy on a GPU).
    fn read_blocks(&self, blocks: &[crate::kv::BlockId]) -> Result<Vec<Vec<u8>>> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<usize> = blocks.iter().map(|b| b.0 as usize).collect();
        let mut packed = vec![0u8; self.kv_block_bytes * ids.len()];
        self.model.read_kv_blocks(&ids, &mut packed)?;
        Ok(split_payloads(&packed, self.kv_block_bytes))
    }

    /// The K/V of the leading run of `hashes` this engine has cached (a peer pulling a
    /// cached prefix instead of recomputing it): first what the device's prefix cache has,
    /// read between steps so the blocks cannot change while they are read; then, where the
    /// device's run ends, what the host and disk tiers have, read from there on the tier
    /// thread (never staged through the device). [`PrefixRead::finish`] joins the two.
    pub fn read_cached_prefix(&self, hashes: &[crate::kv::BlockHash]) -> Result<PrefixRead> {
        let device = self.read_blocks(&self.scheduler.kv().cached_run(hashes))?;
        let tiers = self
            .scheduler
            .connector()
            .and_then(|c| c.read_run(&hashes[device.len().min(hashes.len())..]));
        Ok(PrefixRead { device, tiers })
    }

    /// How many of the leading `hashes` are in the prefix cache.
    pub fn cached_prefix_blocks(&self, hashes: &[crate::kv::BlockHash]) -> usize {
        self.scheduler.kv().cached_run(hashes).len()
    }

    /// Frees a held request's blocks (its decoder has them). False when nothing was held.
    pub fn release_held(&mut self, id: &RequestId) -> bool {
        match self.held.remove(id) {
            Some(h) => {
                self.scheduler.release_blocks(h.blocks);
                true
            }
            None => false,
        }
    }

    /// Frees the oldest held requests until `more` blocks fit under the cap on held blocks
    /// ([`MAX_HELD_FRACTION`] of the pool): decoders that never pull (or a client that only
    /// asks for prefills) cannot pin the whole pool until their leases run out.
    fn make_room_to_hold(&mut self, more: usize) {
        let cap = ((self.limits.num_blocks as f64 * MAX_HELD_FRACTION) as usize).max(more);
        let mut total: usize = self.held.values().map(|h| h.blocks.len()).sum();
        while total + more > cap {
            let Some(oldest) = self
                .held
                .iter()
                .min_by_key(|(_, h)| h.expires)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            tracing::warn!(request_id = %oldest, "held KV over its cap; freeing the oldest before its lease ends");
            total -= self.held.get(&oldest).map_or(0, |h| h.blocks.len());
            self.release_held(&oldest);
            self.counters.kv_held_evicted += 1;
        }
    }

    /// Frees held KV whose lease ran out; returns how many.
    pub fn expire_held(&mut self) -> usize {
        let now = std::time::Instant::now();
        let expired: Vec<RequestId> = self
            .held
            .iter()
            .filter(|(_, h)| h.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            tracing::warn!(request_id = %id, "held KV lease expired before a decode worker read it; freeing its blocks");
            self.release_held(id);
        }
        self.counters.kv_leases_expired += expired.len() as u64;
        expired.len()
    }

    /// When the next held lease runs out.
    pub fn next_lease_expiry(&self) -> Option<std::time::Instant> {
        self.held.values().map(|h| h.expires).min()
    }

    /// What the KV tiers hold and did (None when they are off).
    pub fn tier_stats(&self) -> Option<TierStats> {
        self.scheduler.connector().map(KvConnector::stats)
    }

    /// A live view of [`Self::tier_stats`] for other threads.
    pub fn tier_stats_handle(&self) -> Option<crate::kv::connector::TierStatsHandle> {
        self.scheduler.connector().map(KvConnector::stats_handle)
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    pub fn counters(&self) -> Counters {
        Counters {
            device_ns: self.model.device_time_ns(),
            ..self.counters
        }
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn num_free_blocks(&self) -> usize {
        self.scheduler.kv().num_free_blocks()
    }

    pub fn has_unfinished_requests(&self) -> bool {
        self.scheduler.has_unfinished()
    }

    /// Turns a prompt into checked token ids.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<TokenId>> {
        tokenize(&self.tokenizer, prompt, self.limits.vocab_size)
    }

    /// Tokenizes (on this thread), validates and queues a request.
    pub fn add_request(
        &mut self,
        id: RequestId,
        prompt: &Prompt,
        params: SamplingParams,
        priority: i32,
    ) -> Result<()> {
        let ids = self.tokenize(prompt)?;
        self.add_tokens(id, ids, params, priority)
    }

    /// Validates and queues a request given as token ids.
    pub fn add_tokens(
        &mut self,
        id: RequestId,
        ids: Vec<TokenId>,
        params: SamplingParams,
        priority: i32,
    ) -> Result<()> {
        self.add_tokens_with_kv(id, ids, params, priority, KvOptions::default())
    }

    /// [`Self::add_tokens`] with KV kept for or received from another worker.
    pub fn add_tokens_with_kv(
        &mut self,
        id: RequestId,
        ids: Vec<TokenId>,
        params: SamplingParams,
        priority: i32,
        kv: KvOptions,
    ) -> Result<()> {
        params.validate()?;
        if self.held.contains_key(&id) {
            return Err(Error::DuplicateRequest(id.0));
        }
        if let Some(r) = &kv.received {
            let bs = self.limits.block_size;
            let ok = r.covered <= ids.len()
                && r.payloads.len() == r.covered.div_ceil(bs)
                && r.payloads.iter().all(|p| p.len() == self.kv_block_bytes);
            if !ok {
                return Err(Error::Config {
                    field: "kv_transfer_params",
                    reason: format!(
                        "received KV of {} blocks for {} tokens does not fit a prompt of {} tokens",
                        r.payloads.len(),
                        r.covered,
                        ids.len()
                    ),
                });
            }
        }
        if self.scheduler.contains(&id) {
            return Err(Error::DuplicateRequest(id.0));
        }
        if let Some(limit) = self.limits.max_waiting_requests {
            if self.scheduler.num_waiting() >= limit {
                return Err(Error::QueueFull { limit });
            }
        }
        check_tokens(&ids, self.limits.vocab_size)?;
        // Saturating: `max_tokens` may be anything up to usize::MAX.
        let needed = ids.len().saturating_add(params.max_tokens.unwrap_or(1));
        if needed > self.limits.max_model_len {
            return Err(Error::PromptTooLong {
                prompt_len: ids.len(),
                needed,
                max_model_len: self.limits.max_model_len,
            });
        }
        self.counters.prompt_tokens += ids.len() as u64;
        self.states
            .insert(id.clone(), RequestState::new(params, &ids));
        if let Some(hold) = &kv.hold {
            self.scheduler.keep_all_blocks(&id);
            self.hold_for.insert(id.clone(), hold.clone());
        }
        let req = Request::new(id.clone(), ids, priority, kv.extra_keys());
        match kv.received {
            Some(r) => {
                self.received.insert(id, r.covered);
                self.scheduler
                    .add_request_with_kv(req, r.payloads, r.covered);
            }
            None => self.scheduler.add_request(req),
        }
        Ok(())
    }

    /// Stops a request and frees its blocks at once. Returns false for unknown ids.
    pub fn abort_request(&mut self, id: &RequestId) -> bool {
        self.states.remove(id);
        self.hold_for.remove(id);
        self.received.remove(id);
        if self.scheduler.finish(id, FinishReason::Abort).is_some() {
            self.counters.finished_requests += 1;
            true
        } else {
            false
        }
    }

    /// Runs one step. Returns the progress of every request that sampled a token (and of those
    /// it finished). On a model error every request of the step is aborted and the error
    /// returned.
    pub fn step(&mut self) -> Result<Vec<EngineOutput>> {
        if !self.held.is_empty() {
            self.expire_held();
        }
        let sched = self.scheduler.schedule();
        if sched.is_empty() {
            if self.scheduler.num_waiting_for_kv() > 0 {
                // Only loads in flight: wait for one instead of spinning.
                self.scheduler
                    .poll_kv_loads(std::time::Duration::from_millis(2));
            }
            self.publish_kv_changes();
            return Ok(Vec::new());
        }
        self.counters.steps += 1;
        let step_started = std::time::Instant::now();
        let outputs = self.run_scheduled(sched);
        self.counters.step_ns += step_started.elapsed().as_nanos() as u64;
        outputs
    }

    /// [`Self::step`] once the scheduler gave it a batch.
    fn run_scheduled(&mut self, sched: SchedulerOutput) -> Result<Vec<EngineOutput>> {
        // Loaded blocks land before the step that attends to them, in one copy.
        if !sched.kv_writes.is_empty() {
            // Each payload must be one block: a short one would shift every later block.
            let written = match sched
                .kv_writes
                .iter()
                .find(|(_, p)| p.len() != self.kv_block_bytes)
            {
                Some((b, p)) => Err(ModelError::Backend(BackendError::Shape {
                    op: "write_kv_blocks",
                    expected: format!("{} bytes for block {}", self.kv_block_bytes, b.0),
                    got: format!("{} bytes", p.len()),
                })),
                None => {
                    let ids: Vec<usize> =
                        sched.kv_writes.iter().map(|(b, _)| b.0 as usize).collect();
                    let packed = sched
                        .kv_writes
                        .iter()
                        .map(|(_, p)| &p[..])
                        .collect::<Vec<_>>()
                        .concat();
                    self.model.write_kv_blocks(&ids, &packed)
                }
            };
            if let Err(e) = written {
                self.counters.failed_steps += 1;
                for s in &sched.seqs {
                    self.abort_request(&s.id);
                }
                return Err(e.into());
            }
        }
        let plan = self.build_plan(&sched);
        // The backend picks the tokens of greedy rows (and of random ones where it samples on
        // the device) so their logits never leave it; rows that need the host (logprobs,
        // penalties, tokens masked until min_tokens) get the logits there.
        self.row_params.clear();
        for s in sched.seqs.iter().filter(|s| s.samples) {
            let p = self.states.get_mut(&s.id).and_then(|st| {
                if st.num_output_tokens < st.params.min_tokens {
                    None
                } else {
                    st.sampler.device_params(self.random_on_device)
                }
            });
            self.row_params.push(p);
        }
        let (model, logits, tokens, params) = (
            &mut self.model,
            &mut self.logits,
            &mut self.device_tokens,
            &self.row_params,
        );
        let started = std::time::Instant::now();
        let result = self.pool.install(|| {
            if params.iter().all(Option::is_none) {
                model.execute(&plan, logits)
            } else {
                model.execute_sampled(&plan, params, tokens, logits)
            }
        });
        self.counters.model_ns += started.elapsed().as_nanos() as u64;
        // A step of mostly prefill tokens updates what recomputing a block costs.
        let prefill = plan.num_tokens() - plan.num_decode_tokens();
        if result.is_ok() && prefill >= 64 && prefill * 10 >= plan.num_tokens() * 9 {
            let ns = started.elapsed().as_nanos() as f64 / plan.num_tokens() as f64;
            // The tiers' load-or-recompute decision reads the same estimate.
            self.limits.prefill_cost.observe(ns);
        }
        if let Err(e) = result {
            // Their blocks go back to the pool unpublished: the KV of this step may be
            // partly written or not at all.
            self.counters.failed_steps += 1;
            for s in &sched.seqs {
                self.abort_request(&s.id);
            }
            return Err(e.into());
        }
        self.scheduler.commit_step(&sched);
        self.publish_kv_changes();
        for s in &sched.seqs {
            if let Some(r) = self.scheduler.request(&s.id) {
                // Tokens whose KV a prefill worker sent are not this worker's work, even the
                // last one, run again for its logits.
                let start = s
                    .num_computed_tokens
                    .max(self.received.get(&s.id).copied().unwrap_or(0));
                let end = (s.num_computed_tokens + s.num_new_tokens).min(r.prompt_len);
                self.counters.prompt_tokens_computed += end.saturating_sub(start) as u64;
            }
        }
        let vocab = self.limits.vocab_size;
        let mut outputs = Vec::new();
        for (row, s) in sched.seqs.iter().filter(|s| s.samples).enumerate() {
            let Some(state) = self.states.get_mut(&s.id) else {
                continue;
            };
            let sampled = if let Some(p) = &self.row_params[row] {
                if p.temperature > 0.0 && p.top_k != 1 {
                    self.counters.backend_sampled_random += 1;
                }
                state.sampler.accept_device(self.device_tokens[row])
            } else {
                let logits = &mut self.logits[row * vocab..(row + 1) * vocab];
                if state.num_output_tokens < state.params.min_tokens {
                    mask_tokens(logits, &state.params.stop_token_ids);
                    if !state.params.ignore_eos {
                        mask_tokens(logits, &self.eos_token_ids);
                    }
                }
                state.sampler.sample(logits)
            };
            let token = sampled.token;
            self.scheduler.append_token(&s.id, token);
            self.counters.generation_tokens += 1;
            let (len, cached, scheduled_at) = self
                .scheduler
                .request(&s.id)
                .map(|r| {
                    (
                        r.tokens.len(),
                        r.num_cached_tokens.unwrap_or(0),
                        r.first_scheduled,
                    )
                })
                .unwrap_or_default();
            let mut out = state.on_token(
                &s.id,
                sampled,
                &self.eos_token_ids,
                len >= self.limits.max_model_len,
                cached,
            );
            if out.num_output_tokens == 1 {
                out.scheduled_at = scheduled_at;
            }
            if let Some(reason) = out.finish_reason {
                self.states.remove(&s.id);
                self.received.remove(&s.id);
                match self.hold_for.remove(&s.id) {
                    Some(hold) => {
                        if let Some((r, blocks)) =
                            self.scheduler.finish_keeping_blocks(&s.id, reason)
                        {
                            // Only the prompt's blocks: the decoder computes the rest.
                            let bs = self.limits.block_size;
                            let keep = r.prompt_len.div_ceil(bs);
                            let mut blocks = blocks;
                            let extra = blocks.split_off(keep.min(blocks.len()));
                            self.scheduler.release_blocks(extra);
                            let hashes = self.limits.block_hasher.hash_prompt(
                                &r.tokens[..r.prompt_len],
                                bs,
                                &r.extra_keys,
                            );
                            self.make_room_to_hold(blocks.len());
                            self.held.insert(
                                s.id.clone(),
                                Held {
                                    blocks,
                                    prompt_len: r.prompt_len,
                                    hashes,
                                    token: hold.token,
                                    expires: std::time::Instant::now() + hold.lease,
                                },
                            );
                        }
                    }
                    None => {
                        self.scheduler.finish(&s.id, reason);
                    }
                }
                self.counters.finished_requests += 1;
            }
            outputs.push(out);
        }
        Ok(outputs)
    }

    /// The worker half of the KV connector after a step: copies newly committed blocks that
    /// no tier holds yet out of the device and hands them to the tiers, and publishes the
    /// device's KV events (stored, evicted).
    fn publish_kv_changes(&mut self) {
        let (committed, evicted) = self.scheduler.take_kv_changes();
        if committed.is_empty() && evicted.is_empty() {
            return;
        }
        if let Some(c) = self.scheduler.connector() {
            // The copy is only started here (on a GPU: a gather and an async copy into
            // page-locked memory); the tier thread waits for it.
            let (mut new, mut ids) = (Vec::new(), Vec::new());
            for b in committed.iter().filter(|b| !c.holds(&b.hash)) {
                ids.push(b.block.0 as usize);
                new.push(StoreBlock {
                    hash: b.hash,
                    parent: b.parent,
                    tokens: b.tokens.clone(),
                    extra_keys: b.extra_keys.clone(),
                    payload: Vec::new(),
                });
            }
            if !new.is_empty() {
                // What the tier queue has no room for is dropped (and counted) by the
                // connector: not copied.
                ids.truncate(c.room());
                match self
                    .model
                    .read_kv_blocks_async(&ids, ids.len() * self.kv_block_bytes)
                {
                    Ok(pending) => c.store_pending(new, pending),
                    Err(e) => tracing::warn!(error = %e, "reading KV blocks for the tiers failed"),
                }
            }
        }
        if let Some(sink) = &self.kv_events {
            let mut events = Vec::new();
            if !evicted.is_empty() {
                events.push(KvEvent::BlockRemoved {
                    block_hashes: evicted.iter().map(|h| h.external()).collect(),
                    medium: Medium::Gpu,
                });
            }
            let blocks: Vec<_> = committed
                .iter()
                .map(|b| {
                    (
                        b.hash,
                        b.parent,
                        b.tokens.as_slice(),
                        b.extra_keys.as_slice(),
                    )
                })
                .collect();
            events.extend(crate::kv::events::stored_in_runs(
                &blocks,
                self.limits.block_size,
                Medium::Gpu,
            ));
            sink.publish(events);
        }
    }

    /// Lays out the step's tokens (decodes first, as scheduled) with positions, cache slots and
    /// block tables.
    fn build_plan(&self, sched: &SchedulerOutput) -> BatchPlan {
        let bs = self.limits.block_size;
        let mut plan = BatchPlan {
            max_blocks_per_seq: sched
                .seqs
                .iter()
                .map(|s| (s.num_computed_tokens + s.num_new_tokens).div_ceil(bs))
                .max()
                .unwrap_or(0),
            ..Default::default()
        };
        for s in &sched.seqs {
            let req = self
                .scheduler
                .request(&s.id)
                .expect("scheduled request exists");
            let table = self.scheduler.block_table(&s.id);
            let start = plan.token_ids.len();
            for pos in s.num_computed_tokens..s.num_computed_tokens + s.num_new_tokens {
                plan.token_ids.push(req.tokens[pos]);
                plan.positions.push(pos as u32);
                plan.slot_mapping
                    .push(table[pos / bs].0 * bs as u32 + (pos % bs) as u32);
            }
            let context_len = s.num_computed_tokens + s.num_new_tokens;
            if s.num_new_tokens == 1
                && plan.seqs.len() == plan.num_decode_seqs
                && s.num_computed_tokens >= req.prompt_len
            {
                plan.num_decode_seqs += 1;
            }
            plan.seqs.push(SeqPlan {
                query_start: start,
                query_len: s.num_new_tokens,
                context_len,
            });
            let row_start = plan.block_tables.len();
            plan.block_tables
                .extend(table[..context_len.div_ceil(bs)].iter().map(|b| b.0));
            plan.block_tables
                .resize(row_start + plan.max_blocks_per_seq, 0);
            if s.samples {
                plan.logits_indices
                    .push((start + s.num_new_tokens - 1) as u32);
            }
        }
        plan
    }
}

/// Times a prefill of `tokens` tokens (after one to warm up) in blocks that are free at start:
/// what recomputing costs per token, for the KV tiers' load-or-recompute decision.
fn measure_prefill(model: &mut dyn ModelRunner, tokens: usize, block_size: usize) -> Result<f64> {
    let plan = |n: usize| {
        let blocks = n.div_ceil(block_size);
        BatchPlan {
            token_ids: (0..n as u32).map(|t| t % 64).collect(),
            positions: (0..n as u32).collect(),
            slot_mapping: (0..n as u32).collect(),
            seqs: vec![SeqPlan {
                query_start: 0,
                query_len: n,
                context_len: n,
            }],
            num_decode_seqs: 0,
            block_tables: (0..blocks as u32).collect(),
            max_blocks_per_seq: blocks,
            logits_indices: vec![n as u32 - 1],
        }
    };
    let mut logits = Vec::new();
    model.execute(&plan(tokens.min(block_size)), &mut logits)?;
    let t = std::time::Instant::now();
    model.execute(&plan(tokens), &mut logits)?;
    Ok(t.elapsed().as_nanos() as f64 / tokens as f64)
}

/// Token ids of `prompt`, checked against the vocabulary: text with the model's special tokens
/// (BOS), chat messages through the chat template, ids as they are.
pub fn tokenize(tokenizer: &Tokenizer, prompt: &Prompt, vocab_size: usize) -> Result<Vec<TokenId>> {
    let ids = match prompt {
        Prompt::Text(t) => tokenizer.encode(t, true)?,
        Prompt::Tokens(ids) => ids.clone(),
        Prompt::Chat(msgs) => render_chat(tokenizer, msgs, true)?.1,
    };
    check_tokens(&ids, vocab_size)?;
    Ok(ids)
}

/// A chat prompt's text and token ids: `messages` rendered with the model's chat template
/// (with the assistant's turn opened when `add_generation_prompt`), then tokenized without
/// adding special tokens, since the template writes its own. [`Prompt::Chat`] goes through
/// here; so do front ends that also need the rendered text (the Python bindings).
pub fn render_chat(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<(String, Vec<TokenId>)> {
    let text = tokenizer.apply_chat_template(messages, add_generation_prompt)?;
    let ids = tokenizer.encode(&text, false)?;
    Ok((text, ids))
}

fn check_tokens(ids: &[TokenId], vocab_size: usize) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(Error::TokenOutOfVocab {
            token: bad,
            vocab_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::CudaBackend;
    use crate::config::CacheConfig;

    #[test]
    fn a_window_past_any_length_is_no_window() {
        // Found by tests/fuzz.rs: `"sliding_window": 18446744073709551615` overflowed.
        assert_eq!(sequence_kv_tokens(4096, Some(usize::MAX), 512, 16), 4096);
        assert_eq!(
            sequence_kv_tokens(4096, Some(1024), 512, 16),
            1024 + 512 + 32
        );
        assert_eq!(sequence_kv_tokens(4096, None, 512, 16), 4096);
    }

    /// SmolLM2-135M's geometry: 30 layers, 3 KV heads of 64.
    fn smollm2() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64,
                "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": true}"#,
        )
        .unwrap()
    }

    #[test]
    fn kv_pool_is_sized_by_the_backends_element_size() {
        assert_eq!(<CpuBackend as Backend>::KV_ELEMENT_BYTES, 4);
        assert_eq!(<CudaBackend as Backend>::KV_ELEMENT_BYTES, 2, "bf16 cache");
        let cfg = smollm2();
        // 30 layers × K and V × 16 tokens × 3 heads × 64 dims.
        let elements = 30 * 2 * 16 * 3 * 64;
        assert_eq!(kv_bytes_per_block(&cfg, 16, 2), Some(elements * 2));
        let cache = CacheConfig {
            kv_cache_memory_bytes: Some(1 << 30),
            num_blocks: None,
            ..CacheConfig::default()
        };
        let budget = KvBudget::new(&cache, Some((80 << 30, 80 << 30)));
        assert_eq!(
            budget,
            KvBudget::Bytes(1 << 30),
            "explicit bytes beat the device"
        );
        let cpu = budget.blocks(elements * 4, 16, 8192).unwrap();
        let cuda = budget.blocks(elements * 2, 16, 8192).unwrap();
        assert_eq!(cpu, (1 << 30) / (elements * 4));
        assert_eq!(
            cuda,
            (1 << 30) / (elements * 2),
            "a bf16 pool uses the whole budget"
        );
        let fixed = CacheConfig {
            num_blocks: Some(7000),
            ..cache
        };
        let b = KvBudget::new(&fixed, Some((1 << 30, 1 << 30)));
        assert_eq!(b.blocks(elements * 2, 16, 8192).unwrap(), 7000);
        assert_eq!(kv_bytes_per_block(&cfg, usize::MAX, 2), None, "overflow");
        let huge = KvBudget::Blocks(usize::MAX / 4);
        assert!(huge.blocks(elements * 2, 16, 8192).is_err());
        // The CPU backend reports no device memory: the fixed CPU default.
        let default = CacheConfig::default();
        assert_eq!(
            KvBudget::new(&default, None),
            KvBudget::Bytes(crate::config::CPU_KV_CACHE_BYTES)
        );
    }

    #[test]
    fn kv_pool_on_a_device_takes_what_the_utilization_leaves() {
        let gib = 1usize << 30;
        let cache = CacheConfig::default();
        assert_eq!(cache.gpu_memory_utilization, 0.9, "vLLM's default");
        // An 80 GiB device with 20 GiB in use after loading: 0.9 × 80 − 20 − headroom.
        let b = KvBudget::new(&cache, Some((60 * gib, 80 * gib)));
        let want = (0.9 * (80 * gib) as f64) as usize - 20 * gib - DEVICE_HEADROOM_BYTES;
        assert_eq!(b.bytes(), Some(want));
        assert_eq!(b.blocks(1 << 20, 16, 8192).unwrap(), want >> 20);
        // SmolLM2-1.7B's shape (24 layers, 32 KV heads of 64, bf16): 3 MiB per block of 16,
        // so the old fixed 2 GiB held 682 blocks = 10912 tokens; an H200 with the weights
        // loaded holds over 50 sequences of 8192 tokens.
        let per_block = 24 * 2 * 16 * 32 * 64 * 2;
        let h200 = KvBudget::new(&cache, Some((139 * gib, 143 * gib)));
        assert!(h200.blocks(per_block, 16, 8192).unwrap() * 16 > 50 * 8192);
        // Used beyond the fraction: nothing left, and the error says how many tokens fit and
        // what to change.
        let full = KvBudget::new(&cache, Some((4 * gib, 80 * gib)));
        assert_eq!(full.bytes(), Some(0));
        let e = full.blocks(per_block, 16, 8192).unwrap_err().to_string();
        assert!(
            e.contains("gpu_memory_utilization") && e.contains("0 tokens"),
            "{e}"
        );
        assert!(
            e.contains("--gpu-memory-utilization") && e.contains("--max-model-len"),
            "{e}"
        );
        // A little room: the tokens that fit are named.
        let tight = KvBudget::new(
            &cache,
            Some((8 * gib + DEVICE_HEADROOM_BYTES + 30 * per_block, 80 * gib)),
        );
        let e = tight.blocks(per_block, 16, 8192).unwrap_err().to_string();
        assert!(
            e.contains("(8192 tokens") && e.contains("480 tokens"),
            "{e}"
        );
    }
}
