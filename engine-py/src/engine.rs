//! `llmd._llmd.Engine`: an [`llmd::Engine`] owned by Python, and the blocking and asyncio
//! batch calls behind `LLM.generate`, `LLM.chat` and `LLM.generate_async`.
//!
//! Invariants:
//! - the GIL is released for everything the engine does: loading, tokenizing, submitting and
//!   waiting; it is taken back only to call the progress callback, to poll for signals and to
//!   build the Python outputs;
//! - a blocking wait polls Python's signal handlers every [`SIGNAL_POLL`]: Ctrl-C raises
//!   `KeyboardInterrupt` within that time, and every request of the interrupted call is
//!   aborted (its handle dropped), so its KV blocks go back to the pool;
//! - every error, from any request of a batch, aborts the whole batch before it is raised.
use crate::errors::to_py;
use crate::outputs::{request_output, Choice, PromptInfo, PyRequestOutput};
use crate::params::PySamplingParams;
use crate::stream::PyRequestStream;
use futures_util::stream::{FuturesUnordered, StreamExt};
use llmd::config::DeviceKind;
use llmd::engine::{render_chat, tokenize};
use llmd::tokenizer::ChatMessage;
use llmd::{EngineConfig, Prompt, RequestHandle, RequestId, TokenId};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::oneshot;

/// How often a blocking wait looks for a pending signal (Ctrl-C).
pub const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// The runtime that waits on request handles: blocking calls drive it from the caller's thread
/// (`block_on`), asyncio calls run on its one worker. It lives for the whole process, so no
/// Python object's destructor ever waits for its threads.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("llmd-py")
            .enable_time()
            .build()
            .expect("starting the bindings' tokio runtime")
    })
}

/// One prompt as Python passed it.
pub enum Input {
    Text(String),
    Tokens(Vec<TokenId>),
    Chat(Vec<ChatMessage>),
}

impl Input {
    /// `chat`: a conversation, as `[(role, content), ...]`; else a str or a list of token ids.
    pub fn from_py(obj: &Bound<'_, PyAny>, chat: bool) -> PyResult<Self> {
        if chat {
            let turns: Vec<(String, String)> = obj.extract().map_err(|_| {
                PyValueError::new_err("messages must be a list of (role, content) pairs")
            })?;
            return Ok(Input::Chat(
                turns
                    .into_iter()
                    .map(|(role, content)| ChatMessage { role, content })
                    .collect(),
            ));
        }
        if obj.is_instance_of::<PyString>() {
            return Ok(Input::Text(obj.extract()?));
        }
        let ids: Vec<i64> = obj.extract().map_err(|_| {
            PyValueError::new_err("prompt must be a str or a list of token ids (int)")
        })?;
        ids.into_iter()
            .map(|t| {
                TokenId::try_from(t).map_err(|_| {
                    PyValueError::new_err(format!("prompt token id {t} is not a valid id"))
                })
            })
            .collect::<PyResult<_>>()
            .map(Input::Tokens)
    }
}

/// A request's engine parameters and its number of choices (`n`).
type Choices = (llmd::SamplingParams, usize);

/// A prompt's requests in the engine, one per choice.
pub struct Submitted {
    pub info: PromptInfo,
    pub handles: Vec<RequestHandle>,
}

#[pyclass(module = "llmd._llmd", name = "Engine", frozen)]
pub struct PyEngine {
    pub(crate) engine: Arc<llmd::Engine>,
    next_id: AtomicU64,
}

/// Bytes from GiB, refusing what is not a size.
fn gib(field: &str, g: f64) -> PyResult<f64> {
    if !(g.is_finite() && g >= 0.0) {
        return Err(PyValueError::new_err(format!(
            "{field} must be a number of GiB >= 0, got {g}"
        )));
    }
    Ok(g * (1u64 << 30) as f64)
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (
        model,
        device = "auto",
        max_model_len = None,
        block_size = 16,
        enable_prefix_caching = true,
        kv_cache_memory_gb = None,
        gpu_memory_utilization = 0.9,
        num_gpu_blocks_override = None,
        max_num_seqs = 256,
        max_num_batched_tokens = None,
        enforce_eager = false,
        kv_offloading_size = None,
        kv_disk_path = None,
        kv_disk_gb = None,
        kv_remote_url = None,
        num_threads = None,
        fault_injection = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: &str,
        device: &str,
        max_model_len: Option<usize>,
        block_size: usize,
        enable_prefix_caching: bool,
        kv_cache_memory_gb: Option<f64>,
        gpu_memory_utilization: f64,
        num_gpu_blocks_override: Option<usize>,
        max_num_seqs: usize,
        max_num_batched_tokens: Option<usize>,
        enforce_eager: bool,
        kv_offloading_size: Option<f64>,
        kv_disk_path: Option<std::path::PathBuf>,
        kv_disk_gb: Option<f64>,
        kv_remote_url: Option<String>,
        num_threads: Option<usize>,
        fault_injection: Option<&str>,
    ) -> PyResult<Self> {
        let device: DeviceKind = device
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("device: {e}")))?;
        let mut c = EngineConfig::new(std::path::PathBuf::new());
        c.device = device;
        c.max_model_len = max_model_len;
        c.cache.block_size = block_size;
        c.cache.enable_prefix_caching = enable_prefix_caching;
        c.cache.num_blocks = num_gpu_blocks_override;
        c.cache.gpu_memory_utilization = gpu_memory_utilization;
        if let Some(g) = kv_cache_memory_gb {
            c.cache.kv_cache_memory_bytes = Some(gib("kv_cache_memory_gb", g)? as usize);
        }
        c.scheduler.max_num_seqs = max_num_seqs;
        if let Some(t) = max_num_batched_tokens {
            c.scheduler.max_num_batched_tokens = t;
        }
        // An offline batch queues all its prompts at once, as vLLM's LLM does: no bound.
        c.scheduler.max_waiting_requests = None;
        c.enforce_eager = enforce_eager;
        c.kv_tiers.host_bytes =
            gib("kv_offloading_size", kv_offloading_size.unwrap_or(0.0))? as usize;
        c.kv_tiers.disk_path = kv_disk_path;
        c.kv_tiers.disk_bytes = gib("kv_disk_gb", kv_disk_gb.unwrap_or(10.0))? as u64;
        c.kv_tiers.remote_url = kv_remote_url;
        c.num_threads = num_threads;
        if let Some(f) = fault_injection {
            c.fault_injection = Some(
                f.parse()
                    .map_err(|e: String| PyValueError::new_err(format!("fault_injection: {e}")))?,
            );
        }
        let engine = py
            .detach(|| {
                c.model = llmd::model::hub::resolve_model(model)?;
                llmd::Engine::new(c)
            })
            .map_err(to_py)?;
        Ok(Self {
            engine: Arc::new(engine),
            next_id: AtomicU64::new(0),
        })
    }

    /// Runs every prompt to completion; one `RequestOutput` per prompt, in order. `params`
    /// holds one `SamplingParams` for all prompts or one per prompt; `progress(1)` is called
    /// as each prompt finishes.
    #[pyo3(signature = (prompts, params, chat = false, add_generation_prompt = true, progress = None))]
    fn generate(
        &self,
        py: Python<'_>,
        prompts: Vec<Bound<'_, PyAny>>,
        params: Vec<PyRef<'_, PySamplingParams>>,
        chat: bool,
        add_generation_prompt: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<Py<PyRequestOutput>>> {
        let (inputs, params) = self.prepare(&prompts, &params, chat)?;
        let subs = py.detach(|| self.submit(inputs, &params, add_generation_prompt))?;
        let infos: Vec<PromptInfo> = subs.iter().map(|s| s.info.clone()).collect();
        let choices =
            py.detach(|| runtime().block_on(wait_all(subs, progress.as_ref(), true, None)))?;
        self.outputs(py, &infos, &choices)
    }

    /// `generate` for asyncio: submits now, then `loop.call_soon_threadsafe(deliver, fut,
    /// ok, value)` with the outputs (or the exception) once all are done. The returned
    /// handle's `cancel()` aborts the batch.
    #[pyo3(signature = (prompts, params, chat, add_generation_prompt, event_loop, fut, deliver))]
    #[allow(clippy::too_many_arguments)]
    fn generate_async(
        slf: Py<Self>,
        py: Python<'_>,
        prompts: Vec<Bound<'_, PyAny>>,
        params: Vec<PyRef<'_, PySamplingParams>>,
        chat: bool,
        add_generation_prompt: bool,
        event_loop: Py<PyAny>,
        fut: Py<PyAny>,
        deliver: Py<PyAny>,
    ) -> PyResult<PyCancel> {
        let me = slf.get();
        let (inputs, params) = me.prepare(&prompts, &params, chat)?;
        let subs = py.detach(|| me.submit(inputs, &params, add_generation_prompt))?;
        let infos: Vec<PromptInfo> = subs.iter().map(|s| s.info.clone()).collect();
        let (tx, rx) = oneshot::channel();
        runtime().spawn(async move {
            let result = wait_all(subs, None, false, Some(rx)).await;
            Python::attach(|py| {
                let out = result.and_then(|c| {
                    let list = slf.get().outputs(py, &infos, &c)?;
                    Ok(PyList::new(py, list)?.into_any().unbind())
                });
                deliver_to(py, &event_loop, deliver, fut, out);
            });
        });
        Ok(PyCancel {
            tx: Mutex::new(Some(tx)),
        })
    }

    /// A stream of one prompt's deltas (`RequestOutput`s whose `outputs` hold what each
    /// choice gained since the last one).
    #[pyo3(signature = (prompt, params, chat = false, add_generation_prompt = true))]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: Bound<'_, PyAny>,
        params: PyRef<'_, PySamplingParams>,
        chat: bool,
        add_generation_prompt: bool,
    ) -> PyResult<PyRequestStream> {
        let (inputs, params) = self.prepare(&[prompt], &[params], chat)?;
        let mut subs = py.detach(|| self.submit(inputs, &params, add_generation_prompt))?;
        let sub = subs
            .pop()
            .ok_or_else(|| PyRuntimeError::new_err("no request was submitted"))?;
        Ok(PyRequestStream::new(self.engine.clone(), sub))
    }

    /// KV blocks free in the pool (cached-but-evictable included).
    fn num_free_blocks(&self) -> usize {
        self.engine.stats().num_free_blocks
    }

    /// A snapshot of the engine's state, refreshed after every step.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.engine.stats();
        let d = PyDict::new(py);
        d.set_item("num_running", s.num_running)?;
        d.set_item("num_waiting", s.num_waiting)?;
        d.set_item("num_free_blocks", s.num_free_blocks)?;
        d.set_item("num_total_blocks", s.num_total_blocks)?;
        d.set_item("kv_usage", s.kv_usage)?;
        d.set_item("num_preemptions", s.num_preemptions)?;
        d.set_item("prefix_cache_queries", s.prefix_cache.queries)?;
        d.set_item("prefix_cache_hits", s.prefix_cache.hits)?;
        d.set_item("prompt_tokens", s.counters.prompt_tokens)?;
        d.set_item("generation_tokens", s.counters.generation_tokens)?;
        d.set_item("finished_requests", s.counters.finished_requests)?;
        Ok(d)
    }

    /// Token ids of `text` (with the model's special tokens, as prompts are tokenized).
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<TokenId>> {
        let tok = self.engine.tokenizer();
        py.detach(|| tok.encode(text, true))
            .map_err(|e| to_py(e.into()))
    }

    #[pyo3(signature = (token_ids, skip_special_tokens = true))]
    fn decode(
        &self,
        py: Python<'_>,
        token_ids: Vec<TokenId>,
        skip_special_tokens: bool,
    ) -> PyResult<String> {
        let tok = self.engine.tokenizer();
        py.detach(|| tok.decode(&token_ids, skip_special_tokens))
            .map_err(|e| to_py(e.into()))
    }

    /// The longest sequence (prompt + output) the engine takes.
    #[getter]
    fn max_model_len(&self) -> usize {
        self.engine.limits().max_model_len
    }

    /// Seconds the Rust API (`llmd::Engine::generate`) takes for `prompts` with `params`,
    /// on this same engine: the baseline of the bindings' overhead bench.
    fn rust_generate_seconds(
        &self,
        py: Python<'_>,
        prompts: Vec<String>,
        params: PyRef<'_, PySamplingParams>,
    ) -> PyResult<f64> {
        let (p, _) = params.to_engine()?;
        py.detach(|| {
            let t = std::time::Instant::now();
            let prompts = prompts.into_iter().map(Prompt::Text).collect();
            self.engine.generate(prompts, &p)?;
            Ok(t.elapsed().as_secs_f64())
        })
        .map_err(to_py)
    }
}

impl PyEngine {
    /// Converts the prompts and parameters while the GIL is held.
    fn prepare(
        &self,
        prompts: &[Bound<'_, PyAny>],
        params: &[PyRef<'_, PySamplingParams>],
        chat: bool,
    ) -> PyResult<(Vec<Input>, Vec<Choices>)> {
        if params.len() != 1 && params.len() != prompts.len() {
            return Err(PyValueError::new_err(format!(
                "sampling_params: {} given for {} prompts (give one, or one per prompt)",
                params.len(),
                prompts.len()
            )));
        }
        let inputs = prompts
            .iter()
            .map(|p| Input::from_py(p, chat))
            .collect::<PyResult<Vec<_>>>()?;
        let params = params
            .iter()
            .map(|p| p.to_engine())
            .collect::<PyResult<Vec<_>>>()?;
        Ok((inputs, params))
    }

    /// Tokenizes each prompt and queues its choices (without the GIL). On any error the
    /// requests queued so far are dropped, which aborts them.
    fn submit(
        &self,
        inputs: Vec<Input>,
        params: &[Choices],
        add_generation_prompt: bool,
    ) -> PyResult<Vec<Submitted>> {
        let tok = self.engine.tokenizer();
        let vocab = self.engine.limits().vocab_size;
        let mut out = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            let (p, n) = &params[if params.len() == 1 { 0 } else { i }];
            let (text, ids) = match input {
                Input::Text(t) => {
                    let ids = tokenize(tok, &Prompt::Text(t.clone()), vocab).map_err(to_py)?;
                    (Some(t), ids)
                }
                Input::Tokens(ids) => (None, ids),
                Input::Chat(msgs) => {
                    let (t, ids) = render_chat(tok, &msgs, add_generation_prompt).map_err(to_py)?;
                    (Some(t), ids)
                }
            };
            let request_id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
            let mut handles = Vec::with_capacity(*n);
            for j in 0..*n {
                // As the HTTP server does: choice j of a seeded request uses seed + j, so
                // choices differ yet each is reproducible.
                let params = llmd::SamplingParams {
                    seed: p.seed.map(|s| s.wrapping_add(j as u64)),
                    ..p.clone()
                };
                let id = if *n == 1 {
                    request_id.clone()
                } else {
                    format!("{request_id}-{j}")
                };
                let h = self
                    .engine
                    .add_request_with_id(RequestId(id), Prompt::Tokens(ids.clone()), params, 0)
                    .map_err(to_py)?;
                handles.push(h);
            }
            out.push(Submitted {
                info: PromptInfo {
                    request_id,
                    text,
                    token_ids: ids,
                    want_logprobs: p.logprobs.is_some(),
                },
                handles,
            });
        }
        Ok(out)
    }

    fn outputs(
        &self,
        py: Python<'_>,
        infos: &[PromptInfo],
        choices: &[Vec<Choice>],
    ) -> PyResult<Vec<Py<PyRequestOutput>>> {
        let tok = self.engine.tokenizer();
        infos
            .iter()
            .zip(choices)
            .map(|(info, c)| request_output(py, tok, info, c, true))
            .collect()
    }
}

/// Waits for every request of `subs` to finish: per prompt, its choices in order. Calls
/// `progress(1)` as each prompt completes; with `check_signals`, runs Python's signal handlers
/// every [`SIGNAL_POLL`] (a `KeyboardInterrupt` ends the wait); `cancel` ends it too. Ending
/// early drops every handle, which aborts the requests.
pub async fn wait_all(
    subs: Vec<Submitted>,
    progress: Option<&Py<PyAny>>,
    check_signals: bool,
    cancel: Option<oneshot::Receiver<()>>,
) -> PyResult<Vec<Vec<Choice>>> {
    let mut results: Vec<Vec<Choice>> = subs
        .iter()
        .map(|s| (0..s.handles.len()).map(Choice::new).collect())
        .collect();
    let mut remaining: Vec<usize> = subs.iter().map(|s| s.handles.len()).collect();
    let mut pending = FuturesUnordered::new();
    for (i, s) in subs.into_iter().enumerate() {
        for (j, mut h) in s.handles.into_iter().enumerate() {
            pending.push(async move {
                let mut c = Choice::new(j);
                while let Some(item) = h.next().await {
                    c.push(item?);
                }
                Ok::<_, llmd::Error>((i, c))
            });
        }
    }
    let cancelled = async {
        match cancel {
            // A dropped sender (the caller went away) cancels as well.
            Some(rx) => {
                let _ = rx.await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(cancelled);
    let mut tick = tokio::time::interval(SIGNAL_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            next = pending.next() => match next {
                None => return Ok(results),
                Some(Err(e)) => return Err(to_py(e)),
                Some(Ok((i, c))) => {
                    let j = c.index;
                    results[i][j] = c;
                    remaining[i] -= 1;
                    if let (0, Some(cb)) = (remaining[i], progress) {
                        Python::attach(|py| cb.call1(py, (1,)))?;
                    }
                }
            },
            _ = tick.tick(), if check_signals => Python::attach(|py| py.check_signals())?,
            _ = &mut cancelled => {
                return Err(pyo3::exceptions::PyInterruptedError::new_err("cancelled"))
            }
        }
    }
}

/// Hands `out` to an asyncio future from any thread: `deliver(fut, ok, value)` runs on the
/// event loop, which owns the future. A closed loop has nobody waiting: nothing to do.
pub fn deliver_to(
    py: Python<'_>,
    event_loop: &Py<PyAny>,
    deliver: Py<PyAny>,
    fut: Py<PyAny>,
    out: PyResult<Py<PyAny>>,
) {
    let (ok, value) = match out {
        Ok(v) => (true, v),
        Err(e) => (false, e.into_value(py).into_any()),
    };
    let _ = event_loop.call_method1(py, "call_soon_threadsafe", (deliver, fut, ok, value));
}

/// Cancels an asyncio batch (`generate_async`): its requests are aborted.
#[pyclass(module = "llmd._llmd", name = "CancelHandle", frozen)]
pub struct PyCancel {
    tx: Mutex<Option<oneshot::Sender<()>>>,
}

#[pymethods]
impl PyCancel {
    fn cancel(&self) {
        if let Some(tx) = self.tx.lock().ok().and_then(|mut t| t.take()) {
            let _ = tx.send(());
        }
    }
}
