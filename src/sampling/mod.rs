//! Sampling: how one request turns logits into its next token.
//!
//! - [`SamplingParams`] is the request's validated knob set (OpenAI / vLLM field names and
//!   defaults); [`SamplingParams::validate`] rejects every out-of-range value with an error that
//!   names the parameter, so the sampler itself never has to second-guess its inputs.
//! - [`SequenceSampler`] is one request's sampling state: its own seeded RNG and the token
//!   history that the penalties need. It lives as long as the request and sees only that
//!   request's logits, which is what makes a seeded request reproducible whatever else shares
//!   its batch.
//!
//! Stop strings, EOS and `min_tokens` are the engine's business; [`mask_tokens`] is the helper
//! it uses to forbid EOS before `min_tokens` outputs.
mod filter;
mod sampler;
mod vecmath;

pub use sampler::{mask_tokens, SampledToken, SequenceSampler};

use crate::request::TokenId;

/// The most alternatives a request may ask for per position (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

/// Per-request sampling parameters. `Default` matches the OpenAI API defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy; otherwise logits are divided by it before top-k/top-p/min-p.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// Seeds the request's own RNG; `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// HF-style multiplicative penalty on tokens seen in prompt or output; 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI-style additive penalty on tokens present in the output.
    pub presence_penalty: f32,
    /// OpenAI-style additive penalty per occurrence in the output.
    pub frequency_penalty: f32,
    /// `None` means "until max_model_len".
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<TokenId>,
    pub ignore_eos: bool,
    /// Number of top alternatives to return per token (`Some(0)`: only the sampled token's).
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

    /// Checks every numeric range and list constraint; the first violation is returned.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(invalid(
                "temperature",
                format!("must be finite and >= 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(invalid(
                "min_p",
                format!("must be in [0, 1], got {}", self.min_p),
            ));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(invalid(
                "repetition_penalty",
                format!("must be finite and > 0, got {}", self.repetition_penalty),
            ));
        }
        for (param, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(invalid(param, format!("must be in [-2, 2], got {value}")));
            }
        }
        if let Some(max_tokens) = self.max_tokens {
            if max_tokens == 0 {
                return Err(invalid("max_tokens", "must be at least 1".to_string()));
            }
            if self.min_tokens > max_tokens {
                return Err(invalid(
                    "min_tokens",
                    format!(
                        "must be <= max_tokens ({max_tokens}), got {}",
                        self.min_tokens
                    ),
                ));
            }
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return Err(invalid(
                    "logprobs",
                    format!("must be <= {MAX_LOGPROBS}, got {n}"),
                ));
            }
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return Err(invalid("stop", format!("stop string {i} is empty")));
        }
        Ok(())
    }

    /// True when sampling reduces to argmax: no draw from the RNG happens.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

fn invalid(param: &'static str, reason: String) -> SamplingError {
    SamplingError::InvalidParam { param, reason }
}

#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("invalid sampling parameter {param}: {reason}")]
    InvalidParam { param: &'static str, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected_param(p: &SamplingParams) -> &'static str {
        match p.validate() {
            Err(SamplingError::InvalidParam { param, .. }) => param,
            Ok(()) => panic!("expected {p:?} to be rejected"),
        }
    }

    #[test]
    fn defaults_and_greedy_are_valid() {
        SamplingParams::default().validate().unwrap();
        SamplingParams::greedy().validate().unwrap();
        assert!(SamplingParams::greedy().is_greedy());
        assert!(!SamplingParams::default().is_greedy());
        let edge = SamplingParams {
            top_p: 1.0,
            min_p: 1.0,
            top_k: 0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            max_tokens: None,
            min_tokens: 1000,
            logprobs: Some(MAX_LOGPROBS),
            stop: vec!["x".into()],
            ..SamplingParams::default()
        };
        edge.validate().unwrap();
    }

    #[test]
    fn every_invalid_parameter_is_named() {
        let d = SamplingParams::default;
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..d()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..d()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..d()
                },
                "temperature",
            ),
            (SamplingParams { top_p: 0.0, ..d() }, "top_p"),
            (SamplingParams { top_p: 1.01, ..d() }, "top_p"),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..d()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: -0.01,
                    ..d()
                },
                "min_p",
            ),
            (SamplingParams { min_p: 1.5, ..d() }, "min_p"),
            (
                SamplingParams {
                    min_p: f32::NAN,
                    ..d()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..d()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: -1.0,
                    ..d()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f32::INFINITY,
                    ..d()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..d()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: -2.01,
                    ..d()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..d()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..d()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    max_tokens: Some(0),
                    ..d()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    max_tokens: Some(4),
                    min_tokens: 5,
                    ..d()
                },
                "min_tokens",
            ),
            (
                SamplingParams {
                    logprobs: Some(MAX_LOGPROBS + 1),
                    ..d()
                },
                "logprobs",
            ),
            (
                SamplingParams {
                    stop: vec!["ok".into(), String::new()],
                    ..d()
                },
                "stop",
            ),
        ];
        for (params, expected) in cases {
            assert_eq!(rejected_param(&params), expected, "{params:?}");
        }
    }
}
