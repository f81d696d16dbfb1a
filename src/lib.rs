//! llmd: a native LLM inference engine.
//!
//! The layers, from the bottom up:
//! - [`backend`]: the small op trait every device implements (CPU now, CUDA next).
//! - [`model`]: Hugging Face config/weights loading and the one transformer forward, written over
//!   the backend trait.
//! - [`kv`]: the paged KV cache: block hashing, the block pool, the per-request cache manager.
//! - [`scheduler`]: continuous batching with chunked prefill and preemption.
//! - [`sampling`] and [`tokenizer`]: turning logits into tokens and tokens into text.
//! - [`engine`]: the loop tying them together, with a streaming Rust API.
//! - [`server`]: `llmd serve`, the OpenAI-compatible HTTP worker with vLLM-named metrics.
//! - [`router`]: what routes in front of workers (`llmd sidecar`, llm-d's P/D sidecar).
//! - [`autoscale`]: `llmd autoscale`, replica counts per variant from live telemetry and SLOs.
//! - [`telemetry`]: OpenTelemetry traces across router, sidecar and workers (off by default).
pub mod autoscale;
pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod kv;
pub mod model;
pub mod prometheus;
pub mod request;
pub mod router;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod telemetry;
pub mod tokenizer;

pub use config::{CacheConfig, EngineConfig, SchedulerConfig};
pub use engine::{CompletedRequest, Engine, EngineCore, Prompt, RequestHandle, RequestOutput};
pub use error::{Error, Result};
pub use request::{FinishReason, RequestId, TokenId};
pub use sampling::SamplingParams;
