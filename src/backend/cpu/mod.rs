//! CPU backend.
pub mod gemm;
