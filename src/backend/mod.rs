//! STUB (being written).
pub mod cpu;
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend: {0}")]
    Other(String),
}
