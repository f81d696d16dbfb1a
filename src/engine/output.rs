//! What a request produces, and the per-request state that turns sampled tokens into it:
//! the sampler (RNG, penalties), the incremental detokenizer and stop-string matching.
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

/// One step's progress of one request (a streaming delta).
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
}

impl RequestOutput {
    pub fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// The engine-side state of one live request.
pub(crate) struct OutputState {
    pub params: SamplingParams,
    pub sampler: SequenceSampler,
    detok: IncrementalDetokenizer,
    stops: StopStrings,
    /// Bytes of the detokenized text already emitted.
    sent: usize,
    pub num_prompt_tokens: usize,
    pub num_output_tokens: usize,
}

impl OutputState {
    pub fn new(params: SamplingParams, prompt: &[TokenId]) -> Self {
        Self {
            sampler: SequenceSampler::new(&params, prompt),
            detok: IncrementalDetokenizer::new(prompt, params.skip_special_tokens),
            stops: StopStrings::new(&params.stop, params.include_stop_str_in_output),
            params,
            sent: 0,
            num_prompt_tokens: prompt.len(),
            num_output_tokens: 0,
        }
    }

    /// Records a sampled token and decides whether the request is done.
    /// `eos` are the model's end-of-sequence ids; `at_max_len` is true when the context is full.
    #[allow(clippy::too_many_arguments)]
    pub fn on_token(
        &mut self,
        id: &RequestId,
        tok: &Tokenizer,
        sampled: SampledToken,
        eos: &[TokenId],
        at_max_len: bool,
        num_cached_tokens: usize,
    ) -> Result<RequestOutput, TokenizerError> {
        let token = sampled.token;
        self.num_output_tokens += 1;
        let p = &self.params;
        let mut finish = None;
        let is_eos = !p.ignore_eos && eos.contains(&token);
        let is_stop_id = p.stop_token_ids.contains(&token);
        if is_eos || is_stop_id {
            finish = Some(FinishReason::Stop);
        } else {
            let before = self.detok.output_text().len();
            self.detok.push(tok, token)?;
            if let StopMatch::Stopped { truncate_to } =
                self.stops.check(self.detok.output_text(), before)
            {
                finish = Some(FinishReason::Stop);
                return Ok(self.emit(
                    id,
                    token,
                    sampled,
                    finish,
                    Some(truncate_to),
                    num_cached_tokens,
                ));
            }
        }
        if finish.is_none()
            && (p.max_tokens.is_some_and(|m| self.num_output_tokens >= m) || at_max_len)
        {
            finish = Some(FinishReason::Length);
        }
        if finish.is_some() {
            // Text held back for a possibly incomplete character is final now.
            self.detok.flush(tok)?;
        }
        Ok(self.emit(id, token, sampled, finish, None, num_cached_tokens))
    }

    fn emit(
        &mut self,
        id: &RequestId,
        token: TokenId,
        sampled: SampledToken,
        finish_reason: Option<FinishReason>,
        truncate_to: Option<usize>,
        num_cached_tokens: usize,
    ) -> RequestOutput {
        let text = self.detok.output_text();
        let end = match (truncate_to, finish_reason) {
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
        let logprobs = match (self.params.logprobs, sampled.logprob) {
            (Some(_), Some(lp)) => vec![TokenLogprob {
                token,
                logprob: lp,
                top: sampled.top_logprobs,
            }],
            _ => vec![],
        };
        RequestOutput {
            request_id: id.clone(),
            new_token_ids: vec![token],
            new_text,
            logprobs,
            finish_reason,
            num_prompt_tokens: self.num_prompt_tokens,
            num_output_tokens: self.num_output_tokens,
            num_cached_tokens,
        }
    }
}
