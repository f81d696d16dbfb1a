//! STUB (helper B implements).
use crate::request::TokenId;

pub const MAX_LOGPROBS: usize = 20;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<TokenId>,
    pub ignore_eos: bool,
    pub logprobs: Option<usize>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: Some(16),
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            include_stop_str_in_output: false,
            skip_special_tokens: true,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
    pub fn validate(&self) -> Result<(), SamplingError> {
        todo!()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("invalid sampling parameter {param}: {reason}")]
    InvalidParam { param: &'static str, reason: String },
}

#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token: TokenId,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(TokenId, f32)>,
}

pub fn mask_tokens(_logits: &mut [f32], _ids: &[TokenId]) {
    todo!()
}

pub struct SequenceSampler {}

impl SequenceSampler {
    pub fn new(_params: &SamplingParams, _prompt: &[TokenId]) -> Self {
        todo!()
    }
    pub fn sample(&mut self, _logits: &mut [f32]) -> SampledToken {
        todo!()
    }
}
