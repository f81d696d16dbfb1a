//! Routing in front of the workers. [`sidecar`] is llm-d's routing sidecar for disaggregated
//! prefill/decode: it runs beside a decode worker and, when the scheduler names a prefiller,
//! has it compute the prompt first.
pub mod sidecar;
