//! `llmd autoscale`: replica counts per serving *variant* (a role, an accelerator, a cost) from
//! live telemetry, with the SLOs of the priority bands of the router's flow control.
//!
//! One decision core serves two worlds: the live loop scrapes the router's and workers'
//! Prometheus text into [`telemetry::Telemetry`], and the simulator produces the very same
//! [`telemetry::Telemetry`] from its model of the fleet, so every policy runs unchanged in both.
pub mod capacity;
pub mod config;
pub mod plot;
pub mod policy;
pub mod sim;
pub mod simulate;
pub mod telemetry;
