//! Models: Hugging Face configuration and weights, and the transformer forward.
//!
//! [`llama::Model`] is the one forward (Llama, Mistral, Qwen2, Qwen3, Phi-3, SmolLM), generic over the
//! [`Backend`](crate::backend::Backend); [`ModelRunner`] erases the backend type for the engine.
pub mod config;
pub mod hub;
pub mod llama;
pub mod weights;

pub use config::{Architecture, ModelConfig, MoeConfig, RopeScaling};
pub use llama::{Model, ModelLimits};
pub use weights::WeightFiles;

use crate::backend::{BackendError, BatchPlan};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config.json is not valid: {reason}")]
    ConfigParse { reason: String },
    #[error("config.json field {field}: {reason}")]
    ConfigField { field: &'static str, reason: String },
    #[error("unknown architecture {architectures:?} (model_type {model_type:?}); supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, Gemma3ForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM")]
    UnknownArchitecture {
        architectures: Vec<String>,
        model_type: Option<String>,
    },
    #[error("no model.safetensors or model.safetensors.index.json in {dir}")]
    MissingWeights { dir: PathBuf },
    #[error("corrupt weight file {path}: {reason}")]
    CorruptWeights { path: PathBuf, reason: String },
    #[error("tensor {name} is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor {name} has unsupported dtype {dtype} (f32, f16, bf16 are supported)")]
    TensorDType { name: String, dtype: String },
    #[error("model {model:?}: {reason}")]
    Hub { model: String, reason: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{what}")]
    Unsupported { what: String },
    #[error("injected fault at step {step}")]
    Injected { step: u64 },
}

/// A loaded model on some backend, as the engine sees it.
pub trait ModelRunner: Send {
    fn config(&self) -> &ModelConfig;
    fn backend_name(&self) -> &'static str;
    /// Runs one step. `logits` receives `[plan.logits_indices.len(), vocab_size]`.
    fn execute(&mut self, plan: &BatchPlan, logits: &mut Vec<f32>) -> Result<(), ModelError>;
    /// True when the backend picks random tokens on the device ([`Self::execute_sampled`]
    /// with random rows then saves the logits' trip to the host).
    fn samples_on_device(&self) -> bool;
    /// Runs one step; rows with `Some` parameters get their token in `tokens[row]`, picked by
    /// the backend under the rules of [`crate::backend::cpu::sampling`]; when any row is
    /// `None`, `logits` receives every row for the host sampler.
    fn execute_sampled(
        &mut self,
        plan: &BatchPlan,
        params: &[Option<crate::backend::cpu::sampling::RowSampling>],
        tokens: &mut Vec<crate::request::TokenId>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError>;
    /// The cached element type's name (`f32`, `bf16`): part of a KV block's identity.
    fn kv_dtype(&self) -> &'static str;
    /// Copies KV blocks `blocks` to `out`, back to back, each block all its layers
    /// (`[layers][K, V][block_size, kv_heads, head_dim]` in the cache's dtype,
    /// [`crate::engine::kv_bytes_per_block`] bytes a block), in one go
    /// ([`crate::backend::Backend::read_kv_blocks`]: one gather and one copy on a GPU).
    fn read_kv_blocks(&self, blocks: &[usize], out: &mut [u8]) -> Result<(), ModelError>;
    /// [`ModelRunner::read_kv_blocks`] (of `bytes` in all) without waiting where the backend
    /// copies asynchronously ([`crate::backend::Backend::read_kv_blocks_async`]).
    fn read_kv_blocks_async(
        &self,
        blocks: &[usize],
        bytes: usize,
    ) -> Result<Box<dyn crate::backend::PendingKvRead>, ModelError>;
    /// Overwrites KV blocks `blocks` of every layer from `data` laid out as
    /// [`ModelRunner::read_kv_blocks`] gives it.
    fn write_kv_blocks(&mut self, blocks: &[usize], data: &[u8]) -> Result<(), ModelError>;
    /// Nanoseconds the device spent running steps so far (0 where the backend cannot tell):
    /// with the engine's wall time per step, what the host adds.
    fn device_time_ns(&self) -> u64 {
        0
    }
}
