//! What `generate`, `chat` and the streams return, in vLLM's shapes: `RequestOutput` (one per
//! prompt) holding one `CompletionOutput` per choice, whose `logprobs` are, per generated
//! token, a dict from token id to `Logprob`.
//!
//! [`Choice`] gathers one engine request's deltas without the GIL; the Python objects are built
//! from it once the caller holds the GIL again.
use llmd::engine::TokenLogprob;
use llmd::tokenizer::Tokenizer;
use llmd::{FinishReason, TokenId};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

#[pyclass(module = "llmd", name = "Logprob", frozen, get_all)]
pub struct PyLogprob {
    pub logprob: f64,
    /// 1 for the most likely token; None for a sampled token outside the returned top ones.
    pub rank: Option<usize>,
    pub decoded_token: Option<String>,
}

#[pymethods]
impl PyLogprob {
    fn __repr__(&self) -> String {
        format!(
            "Logprob(logprob={:?}, rank={}, decoded_token={:?})",
            self.logprob,
            self.rank.map_or("None".into(), |r| r.to_string()),
            self.decoded_token.as_deref().unwrap_or("None"),
        )
    }
}

#[pyclass(module = "llmd", name = "CompletionOutput", frozen, get_all)]
pub struct PyCompletionOutput {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<TokenId>,
    /// Sum of the sampled tokens' logprobs; None unless logprobs were requested.
    pub cumulative_logprob: Option<f64>,
    /// Per token `{token_id: Logprob}`; None unless logprobs were requested.
    pub logprobs: Option<Py<PyList>>,
    /// `"stop"`, `"length"`, `"abort"`, or None while unfinished.
    pub finish_reason: Option<&'static str>,
}

#[pymethods]
impl PyCompletionOutput {
    fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    fn __repr__(&self) -> String {
        format!(
            "CompletionOutput(index={}, text={:?}, token_ids={:?}, cumulative_logprob={}, finish_reason={})",
            self.index,
            self.text,
            self.token_ids,
            self.cumulative_logprob.map_or("None".into(), |c| format!("{c:?}")),
            self.finish_reason.map_or("None".into(), |r| format!("{r:?}")),
        )
    }
}

#[pyclass(module = "llmd", name = "RequestOutput", frozen, get_all)]
pub struct PyRequestOutput {
    pub request_id: String,
    /// The prompt's text (for chat, the rendered template); None for token-id prompts.
    pub prompt: Option<String>,
    pub prompt_token_ids: Vec<TokenId>,
    /// Never computed (vLLM's field, None unless `prompt_logprobs` is asked for).
    pub prompt_logprobs: Option<Py<PyAny>>,
    pub outputs: Vec<Py<PyCompletionOutput>>,
    pub finished: bool,
    /// Prompt tokens served from the prefix cache.
    pub num_cached_tokens: usize,
}

#[pymethods]
impl PyRequestOutput {
    fn __repr__(&self) -> String {
        let outputs: Vec<String> = self.outputs.iter().map(|o| o.get().__repr__()).collect();
        format!(
            "RequestOutput(request_id={:?}, prompt={}, prompt_token_ids={:?}, outputs=[{}], finished={}, num_cached_tokens={})",
            self.request_id,
            self.prompt.as_ref().map_or("None".into(), |p| format!("{p:?}")),
            self.prompt_token_ids,
            outputs.join(", "),
            if self.finished { "True" } else { "False" },
            self.num_cached_tokens,
        )
    }
}

/// One prompt as submitted: what `RequestOutput` reports about it.
#[derive(Clone, Debug)]
pub struct PromptInfo {
    pub request_id: String,
    pub text: Option<String>,
    pub token_ids: Vec<TokenId>,
    /// Logprobs were requested: `CompletionOutput.logprobs` is a list, not None.
    pub want_logprobs: bool,
}

/// One choice's tokens and text so far (all of them, or one stream delta).
#[derive(Clone, Debug, Default)]
pub struct Choice {
    pub index: usize,
    pub token_ids: Vec<TokenId>,
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub num_cached_tokens: usize,
    /// Sum of the sampled logprobs up to and including these tokens.
    pub cumulative_logprob: f64,
}

impl Choice {
    pub fn new(index: usize) -> Self {
        Self {
            index,
            ..Self::default()
        }
    }

    /// Appends an engine delta.
    pub fn push(&mut self, o: llmd::RequestOutput) {
        self.token_ids.extend(o.new_token_ids);
        self.text.push_str(&o.new_text);
        self.cumulative_logprob += o.logprobs.iter().map(|l| l.logprob as f64).sum::<f64>();
        self.logprobs.extend(o.logprobs);
        self.num_cached_tokens = o.num_cached_tokens;
        if o.finish_reason.is_some() {
            self.finish_reason = o.finish_reason;
        }
    }

    /// The delta `o` alone, carrying the running logprob sum of `self` (the choice so far).
    pub fn delta(&mut self, o: llmd::RequestOutput) -> Choice {
        let mut d = Choice::new(self.index);
        d.push(o);
        self.cumulative_logprob += d.cumulative_logprob;
        d.cumulative_logprob = self.cumulative_logprob;
        self.finish_reason = d.finish_reason.or(self.finish_reason);
        d
    }

    fn to_py(
        &self,
        py: Python<'_>,
        tok: &Tokenizer,
        want_logprobs: bool,
    ) -> PyResult<Py<PyCompletionOutput>> {
        let logprobs = if want_logprobs {
            Some(logprobs_list(py, tok, &self.logprobs)?)
        } else {
            None
        };
        Py::new(
            py,
            PyCompletionOutput {
                index: self.index,
                text: self.text.clone(),
                token_ids: self.token_ids.clone(),
                cumulative_logprob: want_logprobs.then_some(self.cumulative_logprob),
                logprobs,
                finish_reason: self.finish_reason.map(FinishReason::as_str),
            },
        )
    }
}

/// Per position `{token_id: Logprob}`: the sampled token, then the top alternatives, as vLLM
/// lays them out.
fn logprobs_list(py: Python<'_>, tok: &Tokenizer, lps: &[TokenLogprob]) -> PyResult<Py<PyList>> {
    let decode = |id: TokenId| tok.decode(&[id], false).ok();
    let list = PyList::empty(py);
    for lp in lps {
        let d = PyDict::new(py);
        let rank = lp
            .top
            .iter()
            .position(|&(t, _)| t == lp.token)
            .map(|i| i + 1);
        d.set_item(
            lp.token,
            PyLogprob {
                logprob: lp.logprob as f64,
                rank,
                decoded_token: decode(lp.token),
            },
        )?;
        for (i, &(t, l)) in lp.top.iter().enumerate() {
            if t != lp.token {
                d.set_item(
                    t,
                    PyLogprob {
                        logprob: l as f64,
                        rank: Some(i + 1),
                        decoded_token: decode(t),
                    },
                )?;
            }
        }
        list.append(d)?;
    }
    Ok(list.unbind())
}

/// The `RequestOutput` of `prompt` with `choices` (all of a prompt's, or one stream delta).
pub fn request_output(
    py: Python<'_>,
    tok: &Tokenizer,
    prompt: &PromptInfo,
    choices: &[Choice],
    finished: bool,
) -> PyResult<Py<PyRequestOutput>> {
    let outputs = choices
        .iter()
        .map(|c| c.to_py(py, tok, prompt.want_logprobs))
        .collect::<PyResult<Vec<_>>>()?;
    Py::new(
        py,
        PyRequestOutput {
            request_id: prompt.request_id.clone(),
            prompt: prompt.text.clone(),
            prompt_token_ids: prompt.token_ids.clone(),
            prompt_logprobs: None,
            outputs,
            finished,
            num_cached_tokens: choices
                .iter()
                .map(|c| c.num_cached_tokens)
                .max()
                .unwrap_or(0),
        },
    )
}
