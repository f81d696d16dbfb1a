//! What a request produces, in two stages, as vLLM v1 splits it:
//! - on the engine thread, [`RequestState`] turns sampled tokens into [`EngineOutput`]s (token
//!   ids, logprobs, and the finishes the engine can see: EOS, stop token ids, length);
//! - in the frontend (the [`RequestHandle`](super::RequestHandle) reading the request),
//!   [`OutputProcessor`] detokenizes incrementally and matches stop strings, producing the
//!   [`RequestOutput`] deltas users see.
//!
//! So text work, whose cost grows with the output and the stop strings, never delays a step.
use crate::request::{FinishReason, RequestId, TokenId};
use crate::sampling::{SampledToken, SamplingParams, SequenceSampler};
use crate::tokenizer::{IncrementalDetokenizer, StopMatch, StopStrings, Tokenizer, TokenizerError};

/// Log-probability of a generated token and the top alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenId,
    pub logprob: f32,
    /// Most likely tokens at this position, best first (`params.logprobs` of them).
    pub top: Vec<(TokenId, f32)>,
}

/// One step's progress of one request as the engine core reports it: tokens, no text.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineOutput {
    pub request_id: RequestId,
    pub new_token_ids: Vec<TokenId>,
    /// One per new token when logprobs were requested.
    pub logprobs: Vec<TokenLogprob>,
    /// `Stop` here means an EOS or stop token id (the last new token); stop strings are the
    /// frontend's.
    pub finish_reason: Option<FinishReason>,
    pub num_prompt_tokens: usize,
    /// Output tokens so far.
    pub num_output_tokens: usize,
    /// Prompt tokens that were served from the prefix cache.
    pub num_cached_tokens: usize,
    /// When the request was first scheduled (its queue wait's end); on its first output only.
    pub scheduled_at: Option<std::time::Instant>,
}

impl EngineOutput {
    pub fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// One step's progress of one request (a streaming delta), text included.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutput {
    pub request_id: RequestId,
    pub new_token_ids: Vec<TokenId>,
    /// Text completed by this step. Text that might begin a stop string is held back until it
    /// is known not to.
    pub new_text: String,
    /// One per new token when logprobs were requested.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub num_prompt_tokens: usize,
    /// Output tokens so far.
    pub num_output_tokens: usize,
    /// Prompt tokens that were served from the prefix cache.
    pub num_cached_tokens: usize,
    /// When the request was first scheduled (its queue wait's end); on its first output only.
    pub scheduled_at: Option<std::time::Instant>,
}

impl RequestOutput {
    pub fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// The engine-side state of one live request.
pub(crate) struct RequestState {
    pub params: SamplingParams,
    pub sampler: SequenceSampler,
    pub num_prompt_tokens: usize,
    pub num_output_tokens: usize,
}

impl RequestState {
    pub fn new(params: SamplingParams, prompt: &[TokenId]) -> Self {
        Self {
            sampler: SequenceSampler::new(&params, prompt),
            params,
            num_prompt_tokens: prompt.len(),
            num_output_tokens: 0,
        }
    }

    /// Records a sampled token and decides whether the request is done by the rules the
    /// engine sees. `eos` are the model's end-of-sequence ids; `at_max_len` is true when the
    /// context is full.
    pub fn on_token(
        &mut self,
        id: &RequestId,
        sampled: SampledToken,
        eos: &[TokenId],
        at_max_len: bool,
        num_cached_tokens: usize,
    ) -> EngineOutput {
        let token = sampled.token;
        self.num_output_tokens += 1;
        let p = &self.params;
        let finish_reason =
            if (!p.ignore_eos && eos.contains(&token)) || p.stop_token_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if p.max_tokens.is_some_and(|m| self.num_output_tokens >= m) || at_max_len {
                Some(FinishReason::Length)
            } else {
                None
            };
        let logprobs = match (p.logprobs, sampled.logprob) {
            (Some(_), Some(lp)) => vec![TokenLogprob {
                token,
                logprob: lp,
                top: sampled.top_logprobs,
            }],
            _ => vec![],
        };
        EngineOutput {
            request_id: id.clone(),
            new_token_ids: vec![token],
            logprobs,
            finish_reason,
            num_prompt_tokens: self.num_prompt_tokens,
            num_output_tokens: self.num_output_tokens,
            num_cached_tokens,
            scheduled_at: None,
        }
    }
}

/// The frontend half of one request: incremental detokenization and stop strings.
pub(crate) struct OutputProcessor {
    detok: IncrementalDetokenizer,
    stops: StopStrings,
    /// Bytes of the detokenized text already emitted.
    sent: usize,
}

impl OutputProcessor {
    pub fn new(params: &SamplingParams, prompt: &[TokenId]) -> Self {
        Self {
            detok: IncrementalDetokenizer::new(prompt, params.skip_special_tokens),
            stops: StopStrings::new(&params.stop, params.include_stop_str_in_output),
            sent: 0,
        }
    }

    /// Turns an engine delta into the user's delta. A stop string found here finishes the
    /// request with `Stop` (the caller then aborts it in the engine).
    pub fn process(
        &mut self,
        tok: &Tokenizer,
        o: EngineOutput,
    ) -> Result<RequestOutput, TokenizerError> {
        let mut finish = o.finish_reason;
        let mut truncate_to = None;
        // An EOS or stop token id ends the text without being part of it.
        let last_is_stop_token = finish == Some(FinishReason::Stop);
        let n = o.new_token_ids.len();
        for (i, &token) in o.new_token_ids.iter().enumerate() {
            if last_is_stop_token && i + 1 == n {
                break;
            }
            let before = self.detok.output_text().len();
            self.detok.push(tok, token)?;
            if let StopMatch::Stopped { truncate_to: t } =
                self.stops.check(self.detok.output_text(), before)
            {
                finish = Some(FinishReason::Stop);
                truncate_to = Some(t);
                break;
            }
        }
        if finish.is_some() && truncate_to.is_none() {
            // Text held back for a possibly incomplete character is final now.
            self.detok.flush(tok)?;
        }
        let text = self.detok.output_text();
        let end = match (truncate_to, finish) {
            (Some(t), _) => t,
            (None, Some(_)) => text.len(),
            (None, None) => text.len() - self.stops.holdback(text),
        };
        let new_text = if end > self.sent {
            text[self.sent..end].to_string()
        } else {
            String::new()
        };
        self.sent = self.sent.max(end);
        Ok(RequestOutput {
            request_id: o.request_id,
            new_token_ids: o.new_token_ids,
            new_text,
            logprobs: o.logprobs,
            finish_reason: finish,
            num_prompt_tokens: o.num_prompt_tokens,
            num_output_tokens: o.num_output_tokens,
            num_cached_tokens: o.num_cached_tokens,
            scheduled_at: o.scheduled_at,
        })
    }
}
