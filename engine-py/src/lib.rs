//! `llmd._llmd`, the native half of the `llmd` Python package: vLLM's offline API
//! (`LLM`, `SamplingParams`, `RequestOutput`) over the Rust engine.
//!
//! The Python half (`python/llmd/__init__.py`) normalizes arguments the way vLLM accepts them
//! and draws the progress bar; everything that waits on the engine is here, with the GIL
//! released.
mod engine;
mod errors;
mod outputs;
mod params;
mod stream;

use pyo3::prelude::*;

#[pymodule]
fn _llmd(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyCancel>()?;
    m.add_class::<stream::PyRequestStream>()?;
    m.add_class::<params::PySamplingParams>()?;
    m.add_class::<outputs::PyRequestOutput>()?;
    m.add_class::<outputs::PyCompletionOutput>()?;
    m.add_class::<outputs::PyLogprob>()?;
    m.add(
        "EngineDeadError",
        m.py().get_type::<errors::EngineDeadError>(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
