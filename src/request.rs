//! Request identity and the per-request state the scheduler owns.
//!
//! Invariant: `num_computed_tokens <= all_tokens().len()`; tokens before `num_computed_tokens`
//! have their K/V written in the request's blocks (or shared prefix blocks).
use std::fmt;

/// A vocabulary index.
pub type TokenId = u32;

/// Caller-chosen request identifier (unique among live requests of one engine).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub String);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for RequestId {
    fn from(s: &str) -> Self {
        RequestId(s.to_string())
    }
}

impl From<String> for RequestId {
    fn from(s: String) -> Self {
        RequestId(s)
    }
}

/// Why a request stopped producing tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached, or the context reached `max_model_len`.
    Length,
    /// Aborted by the caller.
    Abort,
}

impl FinishReason {
    /// The OpenAI API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestStatus {
    Waiting,
    /// Waiting for blocks of its prefix to load from a tier below the device (vLLM's
    /// `WAITING_FOR_REMOTE_KVS`); the rest of the batch runs meanwhile.
    WaitingForKv,
    Running,
    /// Preempted: its blocks were freed and its tokens will be recomputed when resumed.
    Preempted,
    Finished(FinishReason),
}
