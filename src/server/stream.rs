//! Running one API request's engine requests (one per choice) and turning their deltas into a
//! joined result or an SSE stream.
//!
//! Lifetimes carry the cancellation: every [`RequestHandle`] lives inside the stream that reads
//! it, and the stream lives inside the response body (streaming) or the handler future
//! (non-streaming). When a client disconnects, hyper drops the body or the future, which drops
//! the handles, which aborts their requests and frees their KV blocks.
//!
//! Submission waits for each request's first item before answering, so engine-side refusals
//! (queue full, invalid parameters) become proper HTTP errors instead of errors inside an
//! already-started 200 stream. The engine's command channel is bounded: an add that finds it
//! full waits on the blocking pool, never on a runtime worker.
//!
//! A request with a deadline (`--request-timeout`, counted from arrival) that passes it ends
//! with a timeout error — a 408 before the response started, a final SSE error event after —
//! and dropping its handles aborts it in the engine and frees its blocks.
use super::error::ApiError;
use super::metrics::RequestTracker;
use super::openai::Usage;
use super::AppState;
use crate::engine::{AddOutcome, TokenLogprob};
use crate::{FinishReason, Prompt, RequestId, RequestOutput, SamplingParams, TokenId};
use axum::response::sse::{Event, Sse};
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One engine request of an API request: choice `index` of the response.
pub struct ChoiceRequest {
    pub index: usize,
    pub prompt: Vec<TokenId>,
    pub params: SamplingParams,
    /// KV held for, or received from, another worker (disaggregated prefill/decode).
    pub kv: crate::engine::KvOptions,
    /// vLLM's `priority` (lower first under the priority policy).
    pub priority: i32,
}

impl ChoiceRequest {
    /// Choice `index`, the `i`-th of its prompt's `n`: the request's parameters with the output
    /// budget, and seed `seed + i`, so the choices differ yet each is reproducible.
    pub fn new(
        index: usize,
        i: usize,
        prompt: Vec<TokenId>,
        base: &SamplingParams,
        max_tokens: usize,
    ) -> Self {
        let mut params = base.clone();
        params.max_tokens = Some(max_tokens);
        params.seed = base.seed.map(|s| s.wrapping_add(i as u64));
        Self {
            index,
            prompt,
            params,
            kv: Default::default(),
            priority: 0,
        }
    }
}

type Item = (usize, crate::Result<RequestOutput>);

/// The running engine requests of one API request.
pub struct Generation {
    merged: SelectAll<BoxStream<'static, Item>>,
    pub num_choices: usize,
    deadline: Deadline,
}

/// When an API request must be over, from its arrival and `--request-timeout`.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(Option<(tokio::time::Instant, Duration)>);

impl Deadline {
    pub fn new(arrival: Instant, timeout: Option<Duration>) -> Self {
        Self(timeout.map(|t| (tokio::time::Instant::from_std(arrival) + t, t)))
    }

    /// Runs `f` until the deadline; past it, the timeout error.
    pub async fn run<T>(&self, f: impl std::future::Future<Output = T>) -> Result<T, crate::Error> {
        match self.0 {
            None => Ok(f.await),
            Some((at, t)) => {
                tokio::time::timeout_at(at, f)
                    .await
                    .map_err(|_| crate::Error::Timeout {
                        seconds: t.as_secs_f64(),
                    })
            }
        }
    }
}

struct ChoiceState {
    index: usize,
    first: Option<crate::Result<RequestOutput>>,
    handle: crate::RequestHandle,
    tracker: RequestTracker,
}

/// Queues every choice (engine ids `<base_id>-<index>`) and waits until each is accepted.
pub async fn submit(
    state: &Arc<AppState>,
    base_id: &str,
    choices: Vec<ChoiceRequest>,
    arrival: Instant,
) -> Result<Generation, ApiError> {
    let deadline = Deadline::new(arrival, state.request_timeout);
    let mut states = deadline
        .run(add_all(state, base_id, choices, arrival))
        .await??;
    let first_items = deadline
        .run(async {
            for s in &mut states {
                s.first = s.handle.next().await;
            }
        })
        .await;
    if let Err(e) = first_items {
        // Past the deadline while queued: the requests were in the engine, so dropping their
        // trackers records them as aborted.
        return Err(e.into());
    }
    if let Some(s) = states.iter_mut().find(|s| !matches!(s.first, Some(Ok(_)))) {
        let Some(Err(e)) = s.first.take() else {
            return Err(crate::Error::StepFailed("request ended without output".into()).into());
        };
        // Refused: nothing ran, so nothing is recorded; dropping `states` aborts the choices
        // already accepted.
        for s in &mut states {
            s.tracker.discard();
        }
        return Err(e.into());
    }
    let num_choices = states.len();
    let merged = stream::select_all(states.into_iter().map(choice_stream));
    Ok(Generation {
        merged,
        num_choices,
        deadline,
    })
}

/// Adds every choice to the engine; one that finds its command channel full waits for room
/// on the blocking pool. On a refusal the choices already added are dropped, which aborts
/// them, and nothing is recorded.
async fn add_all(
    state: &Arc<AppState>,
    base_id: &str,
    choices: Vec<ChoiceRequest>,
    arrival: Instant,
) -> Result<Vec<ChoiceState>, ApiError> {
    let ready = state.ready()?;
    let mut states: Vec<ChoiceState> = Vec::with_capacity(choices.len());
    for c in choices {
        let id = format!("{base_id}-{}", c.index);
        let mut tracker =
            RequestTracker::new(ready.metrics.clone(), id.clone(), arrival, c.prompt.len());
        tracker.trace = crate::telemetry::EngineTimes::begin();
        let prompt = Prompt::Tokens(c.prompt);
        let added = match ready.engine.try_add_request_with_kv(
            RequestId(id),
            prompt,
            c.params,
            c.priority,
            c.kv,
        ) {
            Ok(AddOutcome::Queued(h)) => Ok(h),
            Ok(AddOutcome::Full(pending)) => tokio::task::spawn_blocking(move || pending.wait())
                .await
                .unwrap_or_else(|e| Err(crate::Error::StepFailed(e.to_string()))),
            Err(e) => Err(e),
        };
        let handle = match added {
            Ok(h) => h,
            Err(e) => {
                tracker.discard();
                for s in &mut states {
                    s.tracker.discard();
                }
                return Err(e.into());
            }
        };
        states.push(ChoiceState {
            index: c.index,
            first: None,
            handle,
            tracker,
        });
    }
    Ok(states)
}

fn choice_stream(s: ChoiceState) -> BoxStream<'static, Item> {
    stream::unfold(s, |mut s| async move {
        let item = match s.first.take() {
            Some(first) => first,
            None => s.handle.next().await?,
        };
        match &item {
            Ok(o) => s.tracker.on_output(o),
            Err(_) => s.tracker.finish(FinishReason::Abort),
        }
        Some(((s.index, item), s))
    })
    .boxed()
}

/// One choice's joined output.
#[derive(Clone, Debug, Default)]
pub struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    /// Byte offset in `text` where each token's text starts (for completions' `text_offset`).
    pub text_offsets: Vec<usize>,
    pub finish_reason: Option<FinishReason>,
    pub num_output_tokens: usize,
    /// Prompt tokens whose KV was not computed for it (prefix cache, tiers, a prefill worker).
    pub num_cached_tokens: usize,
}

impl Generation {
    /// Runs every choice to the end; results indexed by choice.
    pub async fn collect(mut self) -> Result<Vec<Collected>, ApiError> {
        let mut out = vec![Collected::default(); self.num_choices];
        let deadline = self.deadline;
        while let Some((index, item)) = deadline.run(self.merged.next()).await? {
            let o = item?;
            let Some(c) = out.get_mut(index) else {
                continue;
            };
            for _ in &o.logprobs {
                c.text_offsets.push(c.text.len());
            }
            c.text.push_str(&o.new_text);
            c.logprobs.extend(o.logprobs);
            c.num_output_tokens = o.num_output_tokens;
            c.num_cached_tokens = o.num_cached_tokens;
            if o.finish_reason.is_some() {
                c.finish_reason = o.finish_reason;
            }
        }
        Ok(out)
    }

    /// An SSE response: `format`'s chunks, an optional usage chunk, then `data: [DONE]`.
    pub fn into_sse<F: ChunkFormat>(
        self,
        format: F,
        prompt_tokens: usize,
        include_usage: bool,
    ) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
        let mut pending = VecDeque::new();
        let mut format = format;
        format.start(self.num_choices, &mut pending);
        let state = SseState {
            output_tokens: vec![0; self.num_choices],
            merged: self.merged,
            format,
            pending,
            prompt_tokens,
            include_usage,
            done: false,
            deadline: self.deadline,
        };
        Sse::new(stream::unfold(state, |mut st| async move {
            loop {
                if let Some(data) = st.pending.pop_front() {
                    return Some((Ok(Event::default().data(data)), st));
                }
                if st.done {
                    return None;
                }
                let next = match st.deadline.run(st.merged.next()).await {
                    Ok(next) => next,
                    // Past the deadline: dropping the handles (with `st`) aborts the requests.
                    Err(e) => Some((0, Err(e))),
                };
                match next {
                    Some((index, Ok(o))) => {
                        if let Some(n) = st.output_tokens.get_mut(index) {
                            *n = o.num_output_tokens;
                        }
                        st.format.on_output(index, o, &mut st.pending);
                    }
                    Some((_, Err(e))) => {
                        st.pending.push_back(ApiError::from(e).body_json());
                        st.pending.push_back("[DONE]".into());
                        st.done = true;
                        // Ends the other choices now, not when the client goes away.
                        st.merged = SelectAll::new();
                    }
                    None => {
                        if st.include_usage {
                            let usage = Usage::new(st.prompt_tokens, st.output_tokens.iter().sum());
                            st.pending.push_back(st.format.usage_chunk(usage));
                        }
                        st.pending.push_back("[DONE]".into());
                        st.done = true;
                    }
                }
            }
        }))
    }
}

struct SseState<F> {
    merged: SelectAll<BoxStream<'static, Item>>,
    format: F,
    /// `data:` payloads ready to send.
    pending: VecDeque<String>,
    /// Latest output-token count per choice.
    output_tokens: Vec<usize>,
    prompt_tokens: usize,
    include_usage: bool,
    done: bool,
    deadline: Deadline,
}

/// How an endpoint writes its stream chunks (JSON strings, without the `data: ` framing).
pub trait ChunkFormat: Send + 'static {
    /// Chunks sent before any token (chat's role deltas).
    fn start(&mut self, _num_choices: usize, _out: &mut VecDeque<String>) {}
    /// Chunks for one delta of choice `index`; may write none (text held back by stop-string
    /// matching, with nothing else to report).
    fn on_output(&mut self, index: usize, o: RequestOutput, out: &mut VecDeque<String>);
    /// The final chunk carrying usage and no choices.
    fn usage_chunk(&self, usage: Usage) -> String;
}
