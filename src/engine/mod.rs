//! The engine: validates and admits requests, runs scheduler → model → sampler steps, and
//! reports each request's progress.
//!
//! [`EngineCore`] is the synchronous step loop (used directly by tests that control arrival
//! steps); [`Engine`] runs it on its own thread behind a channel, with streaming
//! [`RequestHandle`]s and a blocking [`Engine::generate`].
//!
//! Invariant: every request that leaves — finished, aborted, or failed — is removed from the
//! scheduler, which frees its KV blocks in the same call.
mod handle;
mod output;

pub use handle::{CompletedRequest, Engine, EngineStats, RequestHandle};
pub use output::{RequestOutput, TokenLogprob};

use crate::backend::cpu::sampling::RowSampling;
use crate::backend::cpu::CpuBackend;
use crate::backend::{BatchPlan, SeqPlan};
use crate::config::{DeviceKind, EngineConfig};
use crate::error::{Error, Result};
use crate::kv::{BlockHasher, KvCacheManager};
use crate::model::{Model, ModelConfig, ModelError, ModelLimits, ModelRunner};
use crate::request::{FinishReason, RequestId, TokenId};
use crate::sampling::{mask_tokens, SamplingParams};
use crate::scheduler::{Request, Scheduler, SchedulerOutput};
use crate::tokenizer::{ChatMessage, Tokenizer};
use output::OutputState;
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

/// Limits derived from the config and the model, shared with the front end for validation.
#[derive(Clone, Debug)]
pub struct EngineLimits {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub max_waiting_requests: Option<usize>,
    pub num_blocks: usize,
    pub block_size: usize,
    pub enable_prefix_caching: bool,
    /// The block hash scheme's name (`xxh3_64`, `sha256_cbor_64bit`).
    pub block_hash_algo: &'static str,
}

/// The synchronous engine: one `step()` runs one batch.
pub struct EngineCore {
    model: Box<dyn ModelRunner>,
    tokenizer: Arc<Tokenizer>,
    scheduler: Scheduler,
    states: HashMap<RequestId, OutputState>,
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
        // f32 K and V for every layer. Checked: with a huge block size the product overflows,
        // a panic in debug builds and, wrapped to 0, a division by zero below in release ones.
        let bytes_per_block = [
            model_cfg.num_hidden_layers,
            2,
            block_size,
            model_cfg.num_key_value_heads,
            model_cfg.head_dim,
            4,
        ]
        .iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .ok_or_else(|| Error::Config {
            field: "block_size",
            reason: format!("one KV block of {block_size} tokens for this model overflows usize"),
        })?;
        let num_blocks = config
            .cache
            .num_blocks
            .unwrap_or(config.cache.kv_cache_memory_bytes / bytes_per_block);
        if num_blocks * block_size < max_model_len {
            return Err(Error::Config {
                field: "num_blocks",
                reason: format!(
                    "{num_blocks} blocks of {block_size} tokens cannot hold one sequence of max_model_len {max_model_len}; add KV memory or lower max_model_len"
                ),
            });
        }
        let sched_cfg = config.scheduler.clone();
        let limits = ModelLimits {
            max_tokens: sched_cfg.max_num_batched_tokens,
            max_logit_rows: sched_cfg.max_num_seqs,
            max_positions: max_model_len,
            num_blocks,
            block_size,
        };
        let model: Box<dyn ModelRunner> = match config.device {
            DeviceKind::Cpu => Box::new(Model::load(
                CpuBackend,
                &config.model,
                model_cfg.clone(),
                limits,
                progress,
            )?),
            DeviceKind::Cuda(n) => Box::new(Model::load(
                crate::backend::cuda::CudaBackend::with_graphs(n, !config.enforce_eager)
                    .map_err(ModelError::from)?,
                &config.model,
                model_cfg.clone(),
                limits,
                progress,
            )?),
        };
        let mut eos_token_ids = tokenizer.eos_token_ids().to_vec();
        for id in &model_cfg.eos_token_ids {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }
        let kv = KvCacheManager::new(
            num_blocks,
            block_size,
            config.cache.enable_prefix_caching,
            BlockHasher::new(config.cache.block_hash_algo, &config.cache.block_hash_seed),
        );
        let random_on_device = config
            .device_sampling
            .unwrap_or_else(|| model.samples_on_device());
        Ok(Self {
            model,
            tokenizer,
            scheduler: Scheduler::new(sched_cfg.clone(), kv),
            states: HashMap::new(),
            limits: EngineLimits {
                max_model_len,
                vocab_size: model_cfg.vocab_size,
                max_waiting_requests: sched_cfg.max_waiting_requests,
                num_blocks,
                block_size,
                enable_prefix_caching: config.cache.enable_prefix_caching,
                block_hash_algo: config.cache.block_hash_algo.as_str(),
            },
            eos_token_ids,
            logits: Vec::new(),
            device_tokens: Vec::new(),
            row_params: Vec::new(),
            random_on_device,
            counters: Counters::default(),
            pool,
        })
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
        self.counters
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
        let ids = match prompt {
            Prompt::Text(t) => self.tokenizer.encode(t, true)?,
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Chat(msgs) => {
                let text = self.tokenizer.apply_chat_template(msgs, true)?;
                // The template writes its own special tokens.
                self.tokenizer.encode(&text, false)?
            }
        };
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.limits.vocab_size) {
            return Err(Error::TokenOutOfVocab {
                token: bad,
                vocab_size: self.limits.vocab_size,
            });
        }
        Ok(ids)
    }

    /// Validates and queues a request.
    pub fn add_request(
        &mut self,
        id: RequestId,
        prompt: &Prompt,
        params: SamplingParams,
        priority: i32,
    ) -> Result<()> {
        params.validate()?;
        if self.scheduler.contains(&id) {
            return Err(Error::DuplicateRequest(id.0));
        }
        if let Some(limit) = self.limits.max_waiting_requests {
            if self.scheduler.num_waiting() >= limit {
                return Err(Error::QueueFull { limit });
            }
        }
        let ids = self.tokenize(prompt)?;
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
            .insert(id.clone(), OutputState::new(params, &ids));
        self.scheduler
            .add_request(Request::new(id, ids, priority, Vec::new()));
        Ok(())
    }

    /// Stops a request and frees its blocks at once. Returns false for unknown ids.
    pub fn abort_request(&mut self, id: &RequestId) -> bool {
        self.states.remove(id);
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
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let sched = self.scheduler.schedule();
        if sched.is_empty() {
            return Ok(Vec::new());
        }
        self.counters.steps += 1;
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
        let result = self.pool.install(|| {
            if params.iter().all(Option::is_none) {
                model.execute(&plan, logits)
            } else {
                model.execute_sampled(&plan, params, tokens, logits)
            }
        });
        if let Err(e) = result {
            for s in &sched.seqs {
                self.abort_request(&s.id);
            }
            return Err(e.into());
        }
        for s in &sched.seqs {
            if let Some(r) = self.scheduler.request(&s.id) {
                let end = (s.num_computed_tokens + s.num_new_tokens).min(r.prompt_len);
                self.counters.prompt_tokens_computed +=
                    end.saturating_sub(s.num_computed_tokens) as u64;
            }
        }
        let vocab = self.limits.vocab_size;
        let mut outputs = Vec::new();
        for (row, s) in sched.seqs.iter().filter(|s| s.samples).enumerate() {
            let Some(state) = self.states.get_mut(&s.id) else {
                continue;
            };
            let sampled = if self.row_params[row].is_some() {
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
            let (len, cached) = self
                .scheduler
                .request(&s.id)
                .map(|r| (r.tokens.len(), r.num_cached_tokens.unwrap_or(0)))
                .unwrap_or_default();
            let out = state.on_token(
                &s.id,
                &self.tokenizer,
                sampled,
                &self.eos_token_ids,
                len >= self.limits.max_model_len,
                cached,
            );
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    self.abort_request(&s.id);
                    return Err(e.into());
                }
            };
            if let Some(reason) = out.finish_reason {
                self.states.remove(&s.id);
                self.scheduler.finish(&s.id, reason);
                self.counters.finished_requests += 1;
            }
            outputs.push(out);
        }
        Ok(outputs)
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
