//! The engine's errors as Python exceptions, as vLLM raises them: what the caller passed
//! (parameters, prompts, configuration) is a `ValueError`; a model directory that cannot be
//! read is an `OSError`; a dead engine is `EngineDeadError` (a `RuntimeError`, vLLM's name);
//! any other engine failure is a `RuntimeError`.
use llmd::model::ModelError;
use llmd::Error;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

pyo3::create_exception!(
    llmd,
    EngineDeadError,
    PyRuntimeError,
    "The engine died (a panic, or a device error); create a new LLM."
);

pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Sampling(_)
        | Error::Config { .. }
        | Error::PromptTooLong { .. }
        | Error::EmptyPrompt
        | Error::TokenOutOfVocab { .. }
        | Error::Tokenizer(_)
        | Error::DuplicateRequest(_) => PyValueError::new_err(msg),
        Error::Model(
            ModelError::Io { .. } | ModelError::MissingWeights { .. } | ModelError::Hub { .. },
        ) => PyOSError::new_err(msg),
        Error::Model(
            ModelError::ConfigParse { .. }
            | ModelError::ConfigField { .. }
            | ModelError::UnknownArchitecture { .. },
        ) => PyValueError::new_err(msg),
        Error::EngineDead { .. } => EngineDeadError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}
