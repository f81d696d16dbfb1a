//! `POST /v1/completions`: text or token prompts (one or many), `n` choices each, streamed
//! or joined.
//!
//! Choice `prompt_index * n + i` runs as engine request `<id>-<that index>`; with a seed, choice
//! `i` of each prompt uses `seed + i`, so choices differ yet each is reproducible.
use super::error::{ApiError, ApiJson};
use super::logprobs;
use super::openai::{
    check_n, resolve_max_tokens, sampling_params, CompletionChoice, CompletionRequest,
    CompletionResponse, PromptField, Usage,
};
use super::stream::{submit, ChoiceRequest, ChunkFormat};
use super::{unix_now, AppState};
use crate::tokenizer::Tokenizer;
use crate::{RequestOutput, TokenId};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::collections::VecDeque;
use std::sync::Arc;

/// OpenAI's default output budget for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = std::time::Instant::now();
    let ready = state.ready()?;
    state.check_model(req.model.as_deref())?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let n = check_n(req.n)?;
    if req.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::invalid(
            "best_of",
            "best_of other than n is not supported",
        ));
    }
    let base = sampling_params(&req.sampling, req.logprobs)?;
    let priority = super::openai::check_priority(
        req.sampling.priority,
        ready.engine.limits().scheduling_policy,
    )?;
    let num_prompts = match &req.prompt {
        PromptField::Text(_) | PromptField::Tokens(_) => 1,
        PromptField::Texts(ts) => ts.len(),
        PromptField::TokenLists(ls) => ls.len(),
    };
    state.check_choices(num_prompts, n)?;
    let tok = ready.engine.tokenizer().clone();
    // Tokenizing a long prompt takes milliseconds: not on a runtime worker.
    let prompts = {
        let tok = tok.clone();
        let prompt = req.prompt;
        state
            .text_pool
            .run(move || tokenize_prompts(&tok, prompt))
            .await??
    };
    let max_model_len = ready.engine.limits().max_model_len;
    let mut choices = Vec::with_capacity(prompts.len() * n);
    let mut prompt_tokens = 0;
    for (p, ids) in prompts.into_iter().enumerate() {
        let max_tokens = resolve_max_tokens(
            req.max_tokens,
            Some(DEFAULT_MAX_TOKENS),
            ids.len(),
            max_model_len,
            "prompt",
        )?;
        prompt_tokens += ids.len();
        for i in 0..n {
            choices.push(ChoiceRequest::new(
                p * n + i,
                i,
                ids.clone(),
                &base,
                max_tokens,
            ));
        }
    }
    let kv = super::disagg::kv_options(
        ready,
        &headers,
        req.kv_transfer_params.as_ref(),
        req.cache_salt.as_deref(),
        &choices.iter().map(|c| c.prompt.clone()).collect::<Vec<_>>(),
        n,
        req.stream,
    )
    .await?;
    for c in &mut choices {
        c.kv = kv.clone();
        c.priority = priority;
    }
    let id = state.next_id("cmpl");
    let kv_reply = choices
        .first()
        .and_then(|c| super::disagg::reply(ready, &kv, &format!("{id}-0"), &c.prompt));
    let generation = submit(&state, &id, choices, arrival).await?;
    let created = unix_now();
    let want_logprobs = req.logprobs.is_some();
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let format = CompletionChunks {
            id,
            created,
            model: state.model_name.clone(),
            tok,
            want_logprobs,
            text_len: vec![0; generation.num_choices],
        };
        return Ok(generation
            .into_sse(format, prompt_tokens, include_usage)
            .into_response());
    }
    let collected = generation.collect().await?;
    let completion_tokens = collected.iter().map(|c| c.num_output_tokens).sum();
    // Per prompt, not per choice: its n choices share it.
    let cached_tokens = collected
        .iter()
        .step_by(n)
        .map(|c| c.num_cached_tokens)
        .sum();
    let choices = collected
        .into_iter()
        .enumerate()
        .map(|(index, c)| CompletionChoice {
            index,
            logprobs: want_logprobs
                .then(|| logprobs::completion(&tok, &c.logprobs, &c.text_offsets)),
            text: c.text,
            finish_reason: c.finish_reason.map(|r| r.as_str()),
        })
        .collect();
    Ok(axum::Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model: state.model_name.clone(),
        choices,
        usage: Some(
            Usage::new(prompt_tokens, completion_tokens)
                .with_cached(state.prompt_tokens_details.then_some(cached_tokens)),
        ),
        kv_transfer_params: kv_reply,
    })
    .into_response())
}

/// Every prompt as token ids: text is tokenized with the model's special tokens (BOS), ids
/// are taken as they are. Empty prompts and ids outside the vocabulary are refused.
pub(crate) fn tokenize_prompts(
    tok: &Tokenizer,
    prompt: PromptField,
) -> Result<Vec<Vec<TokenId>>, ApiError> {
    let encode = |t: &str| {
        tok.encode(t, true)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))
    };
    let prompts = match prompt {
        PromptField::Text(t) => vec![encode(&t)?],
        PromptField::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        PromptField::Tokens(ids) => vec![ids],
        PromptField::TokenLists(lists) => lists,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "prompt must not be an empty list",
        ));
    }
    if prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid("prompt", "prompt must not be empty"));
    }
    Ok(prompts)
}

/// Stream chunks of `/v1/completions`.
struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    tok: Arc<Tokenizer>,
    want_logprobs: bool,
    /// Bytes of text sent so far per choice (for `text_offset`).
    text_len: Vec<usize>,
}

impl CompletionChunks {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        let c = CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            kv_transfer_params: None,
        };
        serde_json::to_string(&c).unwrap_or_default()
    }
}

impl ChunkFormat for CompletionChunks {
    fn on_output(&mut self, index: usize, o: RequestOutput, out: &mut VecDeque<String>) {
        if o.new_text.is_empty() && o.logprobs.is_empty() && o.finish_reason.is_none() {
            return;
        }
        let start = self.text_len.get(index).copied().unwrap_or(0);
        if let Some(len) = self.text_len.get_mut(index) {
            *len += o.new_text.len();
        }
        let logprobs = self.want_logprobs.then(|| {
            let offsets = vec![start; o.logprobs.len()];
            logprobs::completion(&self.tok, &o.logprobs, &offsets)
        });
        let choice = CompletionChoice {
            index,
            text: o.new_text,
            logprobs,
            finish_reason: o.finish_reason.map(|r| r.as_str()),
        };
        out.push_back(self.chunk(vec![choice], None));
    }

    fn usage_chunk(&self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(usage))
    }
}
