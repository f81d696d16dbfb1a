//! The OpenAI wire types (requests and responses of `/v1/completions` and
//! `/v1/chat/completions`) and the checks that turn a request into engine [`SamplingParams`].
//!
//! Field names and defaults follow OpenAI's API, with vLLM's extensions (`top_k`, `min_p`,
//! `repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`, ...). Everything a
//! client can get wrong is reported as a 400 naming the field; the engine's own validation
//! (`SamplingParams::validate`) runs here too, so no bad request reaches the engine.
use super::error::ApiError;
use crate::{SamplingParams, TokenId};
use serde::{Deserialize, Serialize};

/// Most choices one request may ask for.
pub const MAX_N: usize = 128;

/// `stop`: one string or a list of them.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's convention: 0 or -1 disables top-k.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub stop_token_ids: Option<Vec<TokenId>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<usize>,
    pub include_stop_str_in_output: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    /// vLLM's `priority`: under `--scheduling-policy priority` a lower value is served first
    /// (default 0); under `fcfs` only 0 is accepted.
    pub priority: Option<i64>,
}

/// `prompt` of a completion request.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<TokenId>),
    TokenLists(Vec<Vec<TokenId>>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptField,
    pub max_tokens: Option<usize>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Number of top alternatives per token (0 gives only the sampled token's logprob).
    pub logprobs: Option<usize>,
    pub echo: Option<bool>,
    pub best_of: Option<usize>,
    pub suffix: Option<String>,
    /// Disaggregated prefill/decode (llm-d's sidecar, vLLM's field).
    pub kv_transfer_params: Option<super::disagg::KvTransferParams>,
    /// vLLM's `cache_salt`: only requests with the same salt share prefix-cache blocks.
    pub cache_salt: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// A chat message's `content`: a string, or a list of parts of which only text is supported.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<ContentField>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    /// Disaggregated prefill/decode (llm-d's sidecar, vLLM's field).
    pub kv_transfer_params: Option<super::disagg::KvTransferParams>,
    /// vLLM's `cache_salt`: only requests with the same salt share prefix-cache blocks.
    pub cache_salt: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Checks `n` and returns it (default 1).
pub fn check_n(n: Option<usize>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        0 => Err(ApiError::invalid("n", "n must be at least 1")),
        n if n > MAX_N => Err(ApiError::invalid(
            "n",
            format!("n must be at most {MAX_N}, got {n}"),
        )),
        n => Ok(n),
    }
}

/// Builds and validates the engine's parameters. `max_tokens` is set later, once the prompt
/// length is known (see [`resolve_max_tokens`]).
pub fn sampling_params(
    f: &SamplingFields,
    logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1 (disabled) or at least 1, got {k}"),
            ))
        }
    };
    let d = SamplingParams::default();
    let p = SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        top_p: f.top_p.unwrap_or(d.top_p),
        top_k,
        min_p: f.min_p.unwrap_or(d.min_p),
        seed: f.seed,
        repetition_penalty: f.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: f.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: f.frequency_penalty.unwrap_or(d.frequency_penalty),
        max_tokens: None,
        min_tokens: f.min_tokens.unwrap_or(0),
        stop: match &f.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        },
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        logprobs,
        include_stop_str_in_output: f.include_stop_str_in_output.unwrap_or(false),
        skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
    };
    p.validate().map_err(crate::Error::from)?;
    Ok(p)
}

/// The request's `priority`, checked against the worker's policy as vLLM does: any 32-bit
/// value under `priority`, only 0 under `fcfs` (400 otherwise).
pub fn check_priority(
    priority: Option<i64>,
    policy: crate::config::SchedulingPolicy,
) -> Result<i32, ApiError> {
    let p = priority.unwrap_or(0);
    let Ok(p32) = i32::try_from(p) else {
        return Err(ApiError::invalid(
            "priority",
            format!("priority must be a 32-bit integer, got {p}"),
        ));
    };
    if p32 != 0 && policy != crate::config::SchedulingPolicy::Priority {
        return Err(ApiError::invalid(
            "priority",
            format!(
                "Got priority {p32} but Priority scheduling is not enabled (start the worker \
                 with --scheduling-policy priority)."
            ),
        ));
    }
    Ok(p32)
}

/// The output budget: the request's `max_tokens`, else `default` (None: whatever the context
/// has left, as vLLM does for chat). Refuses requests that cannot fit in `max_model_len`,
/// blaming `prompt_param` (`prompt` or `messages`).
pub fn resolve_max_tokens(
    requested: Option<usize>,
    default: Option<usize>,
    prompt_len: usize,
    max_model_len: usize,
    prompt_param: &str,
) -> Result<usize, ApiError> {
    let room = max_model_len.saturating_sub(prompt_len);
    let max_tokens = requested.or(default).unwrap_or(room);
    if max_tokens == 0 && requested.is_some() {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    // Saturating: `max_tokens` is the client's number, up to usize::MAX (found by tests/fuzz.rs).
    let requested_total = prompt_len.saturating_add(max_tokens);
    if requested_total > max_model_len || room == 0 {
        return Err(ApiError::invalid(
            prompt_param,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {requested_total} tokens ({prompt_len} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion."
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(max_tokens)
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from a cache (prefix cache, KV tiers, a prefill worker's KV).
    pub cached_tokens: usize,
}

impl Usage {
    /// With `prompt_tokens_details.cached_tokens` when given (`--enable-prompt-tokens-details`:
    /// off by default, as in vLLM, since a hit tells one client what others sent).
    pub fn with_cached(mut self, cached_tokens: Option<usize>) -> Self {
        self.prompt_tokens_details =
            cached_tokens.map(|cached_tokens| PromptTokensDetails { cached_tokens });
        self
    }

    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }
}

/// Completions' `logprobs` object (the legacy shape).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A completion response, or (with `object` "text_completion" as OpenAI does) a stream chunk.
#[derive(Clone, Debug, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// For a decode worker: where this prefill's KV waits (`do_remote_decode` requests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_transfer_params: Option<super::disagg::KvTransferParams>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_transfer_params: Option<super::disagg::KvTransferParams>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// JSON has no -inf; vLLM reports impossible tokens as -9999.
pub fn finite_logprob(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> SamplingFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn prompt_field_accepts_every_openai_form() {
        let p = |s: &str| serde_json::from_str::<PromptField>(s).unwrap();
        assert!(matches!(p(r#""hi""#), PromptField::Text(t) if t == "hi"));
        assert!(matches!(p(r#"["a","b"]"#), PromptField::Texts(v) if v.len() == 2));
        assert!(matches!(p("[1,2,3]"), PromptField::Tokens(v) if v == [1, 2, 3]));
        assert!(matches!(p("[[1],[2,3]]"), PromptField::TokenLists(v) if v.len() == 2));
    }

    #[test]
    fn sampling_fields_map_and_validate() {
        let p = sampling_params(
            &fields(r#"{"temperature":0,"top_k":-1,"stop":"x","seed":7}"#),
            Some(2),
        )
        .unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_k, 0);
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert_eq!(p.seed, Some(7));
        assert_eq!(p.logprobs, Some(2));
        let e = sampling_params(&fields(r#"{"top_p":1.5}"#), None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_p"));
        let e = sampling_params(&fields(r#"{"top_k":-3}"#), None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_k"));
        let e = sampling_params(&fields(r#"{"temperature":-1}"#), None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
    }

    #[test]
    fn max_tokens_resolution() {
        assert_eq!(
            resolve_max_tokens(Some(5), Some(16), 10, 100, "prompt").unwrap(),
            5
        );
        assert_eq!(
            resolve_max_tokens(None, Some(16), 10, 100, "prompt").unwrap(),
            16
        );
        assert_eq!(
            resolve_max_tokens(None, None, 10, 100, "prompt").unwrap(),
            90
        );
        let e = resolve_max_tokens(Some(95), None, 10, 100, "messages").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(
            e.message.contains("maximum context length is 100"),
            "{}",
            e.message
        );
        assert!(resolve_max_tokens(None, None, 100, 100, "prompt").is_err());
        assert!(resolve_max_tokens(Some(0), None, 1, 100, "prompt").is_err());
        // Regression: this sum overflowed (a panic in debug builds, and in release a wrapped
        // total that let the request through).
        let e = resolve_max_tokens(Some(usize::MAX), None, 10, 100, "prompt").unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
    }

    #[test]
    fn n_bounds() {
        assert_eq!(check_n(None).unwrap(), 1);
        assert!(check_n(Some(0)).is_err());
        assert!(check_n(Some(MAX_N + 1)).is_err());
    }

    #[test]
    fn logprobs_are_finite() {
        assert_eq!(finite_logprob(f32::NEG_INFINITY), -9999.0);
        assert_eq!(finite_logprob(-1.5), -1.5);
    }
}
