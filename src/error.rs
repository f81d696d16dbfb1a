//! The crate error: one variant per module error, each with structured fields.
use crate::kv::KvError;
use crate::model::ModelError;
use crate::sampling::SamplingError;
use crate::tokenizer::TokenizerError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error("invalid configuration: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("prompt is {prompt_len} tokens; with max_tokens the request needs up to {needed} but max_model_len is {max_model_len}")]
    PromptTooLong {
        prompt_len: usize,
        needed: usize,
        max_model_len: usize,
    },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("token id {token} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfVocab { token: u32, vocab_size: usize },
    #[error("request id {0} is already in use")]
    DuplicateRequest(String),
    #[error("the engine step running this request failed: {0}")]
    StepFailed(String),
    #[error("the engine has shut down")]
    EngineStopped,
    #[error("the engine died ({reason}); the worker must be restarted")]
    EngineDead { reason: String },
    #[error("the request ran past its deadline of {seconds} s and was aborted")]
    Timeout { seconds: f64 },
    #[error("the waiting queue is full ({limit} requests)")]
    QueueFull { limit: usize },
}

impl Error {
    /// True when the device can no longer be trusted after this step error: a CUDA error
    /// poisons its context, so every later step would fail or compute garbage. The engine
    /// dies on such an error instead of carrying on.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Model(ModelError::Backend(
                crate::backend::BackendError::DeviceUnavailable { .. }
            )) | Error::Backend(crate::backend::BackendError::DeviceUnavailable { .. })
        )
    }
}
