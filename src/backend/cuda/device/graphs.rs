//! CUDA graphs of decode steps: the captured batch sizes, padding a batch to one, capture and
//! replay, and the device-clock timing of each step.
use super::{driver_err, is_pure_decode, CudaBackend, CudaStep};
use crate::backend::{BackendResult, BatchPlan, SeqPlan};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// Captured decode graphs by batch size, and the sizes run once eagerly (the warm-up that
/// makes every allocation before a capture).
#[derive(Default)]
pub(super) struct Graphs {
    warmed: std::collections::HashSet<usize>,
    captured: HashMap<usize, Graph>,
}

/// A captured graph. cudarc's graph is not `Send`; it is only touched under the backend's
/// mutex, from one thread at a time, as CUDA requires.
struct Graph(cudarc::driver::CudaGraph);
// SAFETY: every access goes through `CudaBackend::graphs`' mutex (see above).
unsafe impl Send for Graph {}

/// Decode batch sizes captured as graphs (vLLM's choice): 1, 2, 4, then multiples of 8.
pub(super) fn graph_buckets(max: usize) -> Vec<usize> {
    [1, 2, 4]
        .into_iter()
        .chain((8..=max).step_by(8))
        .filter(|&b| b <= max)
        .collect()
}

/// Most sequences a captured decode step holds.
pub(super) const MAX_GRAPH_BATCH: usize = 256;

/// Events around the kernels of the step in flight, and the device time of the steps before.
pub(super) struct StepTiming {
    pub(super) start: cudarc::driver::CudaEvent,
    pub(super) end: cudarc::driver::CudaEvent,
    /// An un-read pair was recorded (read at the next step or when asked).
    pub(super) pending: bool,
    pub(super) total_ns: u64,
}

impl StepTiming {
    /// Adds the pending step's span (it has finished: every step ends in a synchronizing copy,
    /// and `elapsed_ms` waits for it otherwise).
    pub(super) fn settle(&mut self) {
        if std::mem::take(&mut self.pending) {
            if let Ok(ms) = self.start.elapsed_ms(&self.end) {
                self.total_ns += (ms as f64 * 1e6) as u64;
            }
        }
    }
}

impl CudaBackend {
    /// The largest decode batch captured as a graph.
    pub(super) fn graph_batch_limit(&self) -> usize {
        self.limits
            .map_or(0, |l| l.max_seqs.min(l.max_tokens))
            .min(MAX_GRAPH_BATCH)
    }

    /// The graph size of a plan `pad_plan` produced, if it is one.
    pub(super) fn graph_key(&self, plan: &BatchPlan) -> Option<usize> {
        let n = plan.seqs.len();
        let (limits, bs) = (self.limits?, self.block_size.load(Ordering::Relaxed));
        let graph_shaped = self.use_graphs.load(Ordering::Relaxed)
            && bs > 0
            && is_pure_decode(plan)
            && plan.logits_indices.len() == n
            && plan.max_blocks_per_seq == limits.max_context.div_ceil(bs)
            && graph_buckets(self.graph_batch_limit()).contains(&n);
        graph_shaped.then_some(n)
    }

    /// A pure decode batch padded to its captured graph size, its block tables re-laid at the
    /// fixed stride of `max_context` (the plan itself when it is not graph-shaped).
    pub(super) fn padded_plan<'a>(&self, plan: &'a BatchPlan) -> Cow<'a, BatchPlan> {
        let n = plan.seqs.len();
        let (Some(limits), bs) = (self.limits, self.block_size.load(Ordering::Relaxed)) else {
            return Cow::Borrowed(plan);
        };
        if !self.use_graphs.load(Ordering::Relaxed) || bs == 0 || !is_pure_decode(plan) {
            return Cow::Borrowed(plan);
        }
        let Some(&bucket) = graph_buckets(self.graph_batch_limit())
            .iter()
            .find(|&&b| b >= n)
        else {
            return Cow::Borrowed(plan);
        };
        let stride = limits.max_context.div_ceil(bs);
        if plan.max_blocks_per_seq > stride {
            return Cow::Borrowed(plan);
        }
        // Re-lay the block tables at the fixed stride and add padding sequences: one token at
        // position 0, no cache write (slot -1), context 1 over block 0 of a zero table row.
        let mut p = BatchPlan {
            max_blocks_per_seq: stride,
            num_decode_seqs: bucket,
            ..Default::default()
        };
        for i in 0..bucket {
            let real = i < n;
            p.seqs.push(SeqPlan {
                query_start: i,
                query_len: 1,
                context_len: if real { plan.seqs[i].context_len } else { 1 },
            });
            p.token_ids.push(if real { plan.token_ids[i] } else { 0 });
            p.positions.push(if real { plan.positions[i] } else { 0 });
            p.slot_mapping
                .push(if real { plan.slot_mapping[i] } else { u32::MAX });
            let mut row = if real {
                plan.block_table(i).to_vec()
            } else {
                Vec::new()
            };
            row.resize(stride, 0);
            p.block_tables.extend(row);
            p.logits_indices.push(i as u32);
        }
        Cow::Owned(p)
    }

    /// Runs a step between two timing events.
    pub(super) fn run_timed(
        &self,
        step: &CudaStep,
        forward: &mut dyn FnMut(),
    ) -> BackendResult<()> {
        // The step's span on the device's clock: events around its kernels (outside any
        // capture), read once the step has finished.
        let mut timing = self
            .timing
            .lock()
            .map_err(|_| driver_err("step timing", "lock poisoned"))?;
        timing.settle();
        let started = timing.start.record(&self.stream).is_ok();
        let result = self.launch_step(step, forward);
        if started && timing.end.record(&self.stream).is_ok() {
            timing.pending = true;
        }
        result
    }

    /// Runs a step: eagerly, or through its captured graph (capturing it the second time its
    /// shape is seen).
    fn launch_step(&self, step: &CudaStep, forward: &mut dyn FnMut()) -> BackendResult<()> {
        let Some(key) = step.graph else {
            forward();
            return Ok(());
        };
        let mut graphs = self
            .graphs
            .lock()
            .map_err(|_| driver_err("graphs", "lock poisoned"))?;
        if let Some(g) = graphs.captured.get(&key) {
            return g
                .0
                .launch()
                .map_err(|e| driver_err("launching a decode graph", e));
        }
        if graphs.warmed.insert(key) {
            // First time at this size: run eagerly, which makes every lazy allocation.
            forward();
            return Ok(());
        }
        self.take_error()?;
        let captured = self
            .stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .and_then(|()| {
                forward();
                self.stream
                    .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            });
        let failed_ops = self.take_error();
        match (captured, failed_ops) {
            (Ok(Some(g)), Ok(())) => {
                g.launch()
                    .map_err(|e| driver_err("launching a decode graph", e))?;
                tracing::debug!(batch = key, "captured a decode graph");
                graphs.captured.insert(key, Graph(g));
                Ok(())
            }
            (r, ops) => {
                // Capture is an optimization: say why it failed and run eagerly from now on.
                let why = match (&r, &ops) {
                    (Err(e), _) => format!("{e:?}"),
                    (_, Err(e)) => e.to_string(),
                    _ => "empty graph".to_string(),
                };
                tracing::warn!(batch = key, reason = %why, "CUDA graph capture failed; running eagerly");
                self.use_graphs.store(false, Ordering::Relaxed);
                graphs.captured.clear();
                forward();
                Ok(())
            }
        }
    }
}
