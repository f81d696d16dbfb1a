//! `POST /v1/chat/completions`: messages rendered with the model's chat template, `n` choices,
//! streamed (a role delta per choice first, then content deltas) or joined.
//!
//! A model without a chat template (base models such as stories260K) gets a plain fallback:
//! the message contents, one per line, tokenized with BOS — announced once in the log at
//! start-up, so clients of a base model still get continuations rather than an error.
use super::error::{ApiError, ApiJson};
use super::logprobs;
use super::openai::{
    check_n, resolve_max_tokens, sampling_params, ChatChoice, ChatChunk, ChatChunkChoice,
    ChatDelta, ChatMessageIn, ChatMessageOut, ChatRequest, ChatResponse, ContentField, Usage,
};
use super::stream::{submit, ChoiceRequest, ChunkFormat};
use super::{unix_now, AppState};
use crate::sampling::MAX_LOGPROBS;
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::{RequestOutput, TokenId};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::collections::VecDeque;
use std::sync::Arc;

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let arrival = std::time::Instant::now();
    let ready = state.ready()?;
    state.check_model(req.model.as_deref())?;
    let n = check_n(req.n)?;
    state.check_choices(1, n)?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (true, top) => {
            let top = top.unwrap_or(0);
            if top > MAX_LOGPROBS {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be at most {MAX_LOGPROBS}, got {top}"),
                ));
            }
            Some(top)
        }
        (false, Some(top)) if top > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ))
        }
        (false, _) => None,
    };
    let base = sampling_params(&req.sampling, logprobs)?;
    let priority = super::openai::check_priority(
        req.sampling.priority,
        ready.engine.limits().scheduling_policy,
    )?;
    let tok = ready.engine.tokenizer().clone();
    // A chat template can be slow to render and the prompt long to tokenize: not on a
    // runtime worker.
    let prompt = {
        let tok = tok.clone();
        let messages = req.messages;
        state
            .text_pool
            .run(move || render(&tok, &messages))
            .await??
    };
    let max_tokens = resolve_max_tokens(
        req.max_completion_tokens.or(req.max_tokens),
        None,
        prompt.len(),
        ready.engine.limits().max_model_len,
        "messages",
    )?;
    let prompt_tokens = prompt.len();
    let kv = super::disagg::kv_options(
        ready,
        &headers,
        req.kv_transfer_params.as_ref(),
        req.cache_salt.as_deref(),
        std::slice::from_ref(&prompt),
        n,
        req.stream,
    )
    .await?;
    let choices = (0..n)
        .map(|i| {
            let mut c = ChoiceRequest::new(i, i, prompt.clone(), &base, max_tokens);
            c.kv = kv.clone();
            c.priority = priority;
            c
        })
        .collect();
    let id = state.next_id("chatcmpl");
    let kv_reply = super::disagg::reply(ready, &kv, &format!("{id}-0"), &prompt);
    let generation = submit(&state, &id, choices, arrival).await?;
    let created = unix_now();
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let format = ChatChunks {
            id,
            created,
            model: state.model_name.clone(),
            tok,
            want_logprobs: logprobs.is_some(),
        };
        return Ok(generation
            .into_sse(format, prompt_tokens, include_usage)
            .into_response());
    }
    let collected = generation.collect().await?;
    let completion_tokens = collected.iter().map(|c| c.num_output_tokens).sum();
    let cached_tokens = collected.first().map_or(0, |c| c.num_cached_tokens);
    let choices = collected
        .into_iter()
        .enumerate()
        .map(|(index, c)| ChatChoice {
            index,
            logprobs: logprobs.map(|_| logprobs::chat(&tok, &c.logprobs)),
            message: ChatMessageOut {
                role: "assistant",
                content: c.text,
            },
            finish_reason: c.finish_reason.map(|r| r.as_str()),
        })
        .collect();
    Ok(axum::Json(ChatResponse {
        id,
        object: "chat.completion",
        created,
        model: state.model_name.clone(),
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens)
            .with_cached(state.prompt_tokens_details.then_some(cached_tokens)),
        kv_transfer_params: kv_reply,
    })
    .into_response())
}

/// The prompt's token ids: the chat template's rendering (which writes its own special
/// tokens), or the plain fallback for models without one.
pub(crate) fn render(
    tok: &Tokenizer,
    messages: &[ChatMessageIn],
) -> Result<Vec<TokenId>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None => String::new(),
                Some(ContentField::Text(t)) => t.clone(),
                Some(ContentField::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    format!(
                                        "content part type {kind:?} is not supported (text only)"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (text, add_special) = if tok.has_chat_template() {
        let text = tok
            .apply_chat_template(&messages, true)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        (text, false)
    } else {
        let lines: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        (lines.join("\n"), true)
    };
    let ids = tok
        .encode(&text, add_special)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the rendered prompt is empty",
        ));
    }
    Ok(ids)
}

/// Stream chunks of `/v1/chat/completions`.
struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    tok: Arc<Tokenizer>,
    want_logprobs: bool,
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        let c = ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&c).unwrap_or_default()
    }
}

impl ChunkFormat for ChatChunks {
    fn start(&mut self, num_choices: usize, out: &mut VecDeque<String>) {
        for index in 0..num_choices {
            let delta = ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
            };
            out.push_back(self.chunk(
                vec![ChatChunkChoice {
                    index,
                    delta,
                    logprobs: None,
                    finish_reason: None,
                }],
                None,
            ));
        }
    }

    fn on_output(&mut self, index: usize, o: RequestOutput, out: &mut VecDeque<String>) {
        if o.new_text.is_empty() && o.logprobs.is_empty() && o.finish_reason.is_none() {
            return;
        }
        let choice = ChatChunkChoice {
            index,
            logprobs: self
                .want_logprobs
                .then(|| logprobs::chat(&self.tok, &o.logprobs)),
            delta: ChatDelta {
                role: None,
                content: (!o.new_text.is_empty()).then_some(o.new_text),
            },
            finish_reason: o.finish_reason.map(|r| r.as_str()),
        };
        out.push_back(self.chunk(vec![choice], None));
    }

    fn usage_chunk(&self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(usage))
    }
}
