//! Fault injection: a [`ModelRunner`] wrapper that makes chosen steps fail or panic, so tests
//! can prove what a failure leaves behind (no published KV that was never written, every
//! in-flight request told, a dead engine reported as dead).
//!
//! A [`FaultInjector`] is a shared handle: faults are armed by step number at start-up
//! (`llmd serve --fault-injection error@3,panic@10`, for tests of the real process) or on demand
//! from a test while the engine runs ([`FaultInjector::fail_next`]). Steps count the model calls
//! since start, from 1. Nothing is injected unless a fault was armed.
use crate::backend::cpu::sampling::RowSampling;
use crate::backend::BatchPlan;
use crate::model::{ModelConfig, ModelError, ModelRunner};
use crate::request::TokenId;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// What an injected fault does to the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The step returns an error before the model runs (no KV written): the engine aborts the
    /// step's requests and carries on.
    Error,
    /// The engine thread panics inside the step: the engine is dead.
    Panic,
    /// The step sleeps this long, then runs normally (a slow device: tests of backpressure).
    Stall(std::time::Duration),
}

#[derive(Debug, Default)]
struct State {
    /// Model calls so far.
    calls: u64,
    at_step: BTreeMap<u64, Fault>,
    next: VecDeque<Fault>,
    /// Armed for every call with none of its own (`stall@*:MS`: a slower device).
    every: Option<Fault>,
    injected: u64,
}

/// Shared handle arming faults; clones arm the same runner.
#[derive(Clone, Debug, Default)]
pub struct FaultInjector(Arc<Mutex<State>>);

impl FaultInjector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms `fault` for the `step`-th model call (1-based).
    pub fn at_step(self, step: u64, fault: Fault) -> Self {
        self.lock().at_step.insert(step, fault);
        self
    }

    /// Arms `fault` for the next model call.
    pub fn fail_next(&self, fault: Fault) {
        self.lock().next.push_back(fault);
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Model calls so far.
    pub fn steps(&self) -> u64 {
        self.lock().calls
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic injected while the lock was not held cannot poison it; recover anyway.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a model call and returns the fault armed for it.
    fn take(&self) -> Option<Fault> {
        let mut s = self.lock();
        s.calls += 1;
        let calls = s.calls;
        let f = s
            .at_step
            .remove(&calls)
            .or_else(|| s.next.pop_front())
            .or(s.every);
        if f.is_some() {
            s.injected += 1;
        }
        f
    }

    /// Wraps `inner` so that armed faults hit its calls.
    pub(crate) fn wrap(&self, inner: Box<dyn ModelRunner>) -> Box<dyn ModelRunner> {
        Box::new(FaultyRunner {
            inner,
            faults: self.clone(),
        })
    }
}

impl std::str::FromStr for FaultInjector {
    type Err = String;

    /// A comma-separated list of `error@STEP`, `panic@STEP`, `stall@STEP:MILLISECONDS`;
    /// `stall@*:MILLISECONDS` stalls every step (a device that slow: a known capacity per
    /// worker whatever the host's cores, for tests of scaling).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut f = FaultInjector::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let usage =
                || format!("fault {item:?}: expected error@STEP, panic@STEP or stall@STEP:MS");
            let (kind, at) = item.split_once('@').ok_or_else(usage)?;
            let (step, ms) = match at.split_once(':') {
                Some((step, ms)) => (step, Some(ms.parse::<u64>().map_err(|_| usage())?)),
                None => (at, None),
            };
            let fault = match (kind, ms) {
                ("error", None) => Fault::Error,
                ("panic", None) => Fault::Panic,
                ("stall", Some(ms)) => Fault::Stall(std::time::Duration::from_millis(ms)),
                _ => return Err(usage()),
            };
            if step == "*" {
                if !matches!(fault, Fault::Stall(_)) {
                    return Err(format!(
                        "fault {item:?}: only a stall may hit every step (*)"
                    ));
                }
                f.lock().every = Some(fault);
                continue;
            }
            let step: u64 = step
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("fault {item:?}: the step must be a number from 1"))?;
            f = f.at_step(step, fault);
        }
        Ok(f)
    }
}

struct FaultyRunner {
    inner: Box<dyn ModelRunner>,
    faults: FaultInjector,
}

impl FaultyRunner {
    fn inject(&self) -> Result<(), ModelError> {
        match self.faults.take() {
            None => Ok(()),
            Some(Fault::Error) => Err(ModelError::Injected {
                step: self.faults.steps(),
            }),
            Some(Fault::Panic) => panic!("injected panic at step {}", self.faults.steps()),
            Some(Fault::Stall(d)) => {
                std::thread::sleep(d);
                Ok(())
            }
        }
    }
}

impl ModelRunner for FaultyRunner {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn execute(&mut self, plan: &BatchPlan, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        self.inject()?;
        self.inner.execute(plan, logits)
    }

    fn samples_on_device(&self) -> bool {
        self.inner.samples_on_device()
    }

    fn execute_sampled(
        &mut self,
        plan: &BatchPlan,
        params: &[Option<RowSampling>],
        tokens: &mut Vec<TokenId>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.inject()?;
        self.inner.execute_sampled(plan, params, tokens, logits)
    }

    fn kv_dtype(&self) -> &'static str {
        self.inner.kv_dtype()
    }

    fn device_time_ns(&self) -> u64 {
        self.inner.device_time_ns()
    }

    fn read_kv_blocks(&self, blocks: &[usize], out: &mut [u8]) -> Result<(), ModelError> {
        self.inner.read_kv_blocks(blocks, out)
    }

    fn write_kv_blocks(&mut self, blocks: &[usize], data: &[u8]) -> Result<(), ModelError> {
        self.inner.write_kv_blocks(blocks, data)
    }

    fn read_kv_blocks_async(
        &self,
        blocks: &[usize],
        bytes: usize,
    ) -> Result<Box<dyn crate::backend::PendingKvRead>, ModelError> {
        self.inner.read_kv_blocks_async(blocks, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_fires_in_order() {
        let f: FaultInjector = "error@2, panic@4,stall@6:15".parse().unwrap();
        assert_eq!(f.take(), None);
        assert_eq!(f.take(), Some(Fault::Error));
        f.fail_next(Fault::Error);
        assert_eq!(f.take(), Some(Fault::Error), "on demand");
        assert_eq!(f.take(), Some(Fault::Panic));
        assert_eq!(f.take(), None);
        assert_eq!(
            f.take(),
            Some(Fault::Stall(std::time::Duration::from_millis(15)))
        );
        assert_eq!((f.steps(), f.injected()), (6, 4));
        for bad in [
            "boom@1",
            "error",
            "error@0",
            "error@x",
            "stall@1",
            "panic@1:5",
            "error@*",
            "stall@*",
        ] {
            assert!(bad.parse::<FaultInjector>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_stall_on_every_step_leaves_the_numbered_faults_first() {
        let f: FaultInjector = "stall@*:7, error@2".parse().unwrap();
        let stall = Some(Fault::Stall(std::time::Duration::from_millis(7)));
        assert_eq!(f.take(), stall);
        assert_eq!(f.take(), Some(Fault::Error));
        assert_eq!(f.take(), stall);
        assert_eq!(f.take(), stall);
    }
}
