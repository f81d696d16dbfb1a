//! Routing in front of the workers.
//!
//! - [`sidecar`] is llm-d's routing sidecar for disaggregated prefill/decode: it runs beside a
//!   decode worker and, when the scheduler names a prefiller, has it compute the prompt first;
//!   [`sidecar_flags`] takes llm-d's own sidecar's flags, as llm-d's chart passes them.
//! - [`route`] is the router (`llmd route`), llm-d's endpoint picker as one process: a global
//!   prefix index fed by the workers' KV events ([`index`], [`events`]), weighted scorers and
//!   the P/D decision ([`scorers`]), workers from a static list or Kubernetes ([`workers`]):
//!   pods by label, or an `InferencePool`'s pods ([`pool`]), watched through [`k8s`]; flow
//!   control (priorities, fairness, queueing while the workers are saturated: [`flow`]).
//! - [`epp`] serves the same decisions to a gateway as a Gateway API Endpoint Picker (Envoy's
//!   ext_proc).
pub mod bands;
pub mod epp;
pub mod events;
pub mod flow;
pub mod index;
pub mod k8s;
pub mod pool;
pub mod route;
pub mod scorers;
pub mod sidecar;
pub mod sidecar_flags;
pub mod workers;
