//! `llmd._llmd.RequestStream`: one prompt's deltas as they are generated, for `LLM.stream`
//! (a blocking iterator) and `LLM.stream_async` (an async iterator over the same object).
//!
//! Each item is a `RequestOutput` whose `outputs` hold the choices that advanced, each with
//! only its new tokens and text (vLLM's `RequestOutputKind.DELTA`); `finished` turns true with
//! the last one. Closing the stream, dropping it, an error or a `KeyboardInterrupt` while
//! waiting aborts every choice still running, which frees its KV blocks.
use crate::engine::{deliver_to, runtime, Submitted, SIGNAL_POLL};
use crate::errors::to_py;
use crate::outputs::{request_output, Choice, PromptInfo, PyRequestOutput};
use futures_util::future::select_all;
use llmd::{RequestHandle, RequestId};
use pyo3::exceptions::{PyStopAsyncIteration, PyStopIteration};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

struct StreamState {
    /// Per choice: its handle while it runs.
    handles: Vec<Option<RequestHandle>>,
    /// Per choice: what it produced so far (for the running logprob sum).
    choices: Vec<Choice>,
}

struct StreamInner {
    engine: Arc<llmd::Engine>,
    info: PromptInfo,
    ids: Vec<RequestId>,
    state: tokio::sync::Mutex<StreamState>,
    closed: AtomicBool,
}

/// One delta: the choice that advanced, and whether the whole request is done.
type Delta = (Choice, bool);

impl StreamInner {
    /// The next delta of any running choice; None once every choice has finished.
    async fn next_delta(&self) -> llmd::Result<Option<Delta>> {
        let mut st = self.state.lock().await;
        loop {
            if self.closed.load(Ordering::Relaxed) {
                st.handles.clear();
                return Ok(None);
            }
            let live = st.handles.iter_mut().enumerate().filter_map(|(j, h)| {
                h.as_mut()
                    .map(|h| Box::pin(async move { (j, h.next().await) }))
            });
            let live: Vec<_> = live.collect();
            if live.is_empty() {
                return Ok(None);
            }
            let ((j, item), _, _) = select_all(live).await;
            if self.closed.load(Ordering::Relaxed) {
                // Closed while waiting: the abort ended the read, not the request's own end.
                continue;
            }
            match item {
                None => st.handles[j] = None,
                Some(Err(e)) => {
                    // Drop every handle: the other choices are aborted.
                    st.handles.clear();
                    return Err(e);
                }
                Some(Ok(o)) => {
                    if o.finished() {
                        st.handles[j] = None;
                    }
                    let d = st.choices[j].delta(o);
                    let done = st.handles.iter().all(Option::is_none);
                    return Ok(Some((d, done)));
                }
            }
        }
    }

    /// Aborts every choice still running; later reads end the stream.
    fn close(&self) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            for id in &self.ids {
                self.engine.abort(id);
            }
        }
        // When no read holds the state, free the handles now rather than at the next read.
        if let Ok(mut st) = self.state.try_lock() {
            st.handles.clear();
        }
    }

    fn to_py(&self, py: Python<'_>, d: Delta) -> PyResult<Py<PyRequestOutput>> {
        let (choice, done) = d;
        request_output(py, self.engine.tokenizer(), &self.info, &[choice], done)
    }
}

#[pyclass(module = "llmd._llmd", name = "RequestStream", frozen)]
pub struct PyRequestStream {
    inner: Arc<StreamInner>,
}

impl PyRequestStream {
    pub fn new(engine: Arc<llmd::Engine>, sub: Submitted) -> Self {
        let ids = sub.handles.iter().map(|h| h.id().clone()).collect();
        let n = sub.handles.len();
        Self {
            inner: Arc::new(StreamInner {
                engine,
                info: sub.info,
                ids,
                state: tokio::sync::Mutex::new(StreamState {
                    handles: sub.handles.into_iter().map(Some).collect(),
                    choices: (0..n).map(Choice::new).collect(),
                }),
                closed: AtomicBool::new(false),
            }),
        }
    }
}

#[pymethods]
impl PyRequestStream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// The next delta, waiting for it without the GIL; Ctrl-C while waiting aborts the
    /// request and raises `KeyboardInterrupt`.
    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyRequestOutput>> {
        let inner = &self.inner;
        let next = py.detach(|| {
            runtime().block_on(async {
                let read = inner.next_delta();
                tokio::pin!(read);
                let mut tick = tokio::time::interval(SIGNAL_POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        r = &mut read => return r.map_err(to_py),
                        _ = tick.tick() => Python::attach(|py| py.check_signals())?,
                    }
                }
            })
        });
        match next {
            Ok(Some(d)) => inner.to_py(py, d),
            Ok(None) => Err(PyStopIteration::new_err(())),
            Err(e) => {
                inner.close();
                Err(e)
            }
        }
    }

    /// Starts reading the next delta on the bindings' runtime; `deliver(fut, ok, value)` is
    /// then scheduled on `event_loop` with the delta, `StopAsyncIteration` or the error.
    fn next_async(&self, event_loop: Py<PyAny>, fut: Py<PyAny>, deliver: Py<PyAny>) {
        let inner = self.inner.clone();
        runtime().spawn(async move {
            let r = inner.next_delta().await;
            Python::attach(|py| {
                let out = match r {
                    Ok(Some(d)) => inner.to_py(py, d).map(Py::into_any),
                    Ok(None) => Err(PyStopAsyncIteration::new_err(())),
                    Err(e) => {
                        inner.close();
                        Err(to_py(e))
                    }
                };
                deliver_to(py, &event_loop, deliver, fut, out);
            });
        });
    }

    /// Aborts every choice still running (also done when the stream is dropped).
    fn close(&self) {
        self.inner.close();
    }

    /// The prompt's `request_id`.
    #[getter]
    fn request_id(&self) -> &str {
        &self.inner.info.request_id
    }
}
