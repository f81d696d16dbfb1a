//! A step's metadata on the device: the plan's arrays (token ids, positions, slots, block
//! tables, attention work items), uploaded fresh or, for a graph shape, overwritten in the
//! pooled buffers whose addresses the captured graph holds.
use super::{driver_err, CudaBackend};
use crate::backend::{BackendResult, BatchPlan};
use cudarc::driver::CudaSlice;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A step's metadata on the device, with the host plan for launch geometry. A decode step of a
/// graph shape borrows its buffers from the backend's pool (their addresses are baked into the
/// captured graph) and gives them back when dropped.
pub struct CudaStep {
    pub(super) plan: BatchPlan,
    /// The decode batch size this step replays as a graph.
    pub(super) graph: Option<usize>,
    pub(super) bufs: Option<StepBufs>,
    pub(super) home: Option<Arc<Mutex<HashMap<usize, StepBufs>>>>,
}

impl std::ops::Deref for CudaStep {
    type Target = StepBufs;

    fn deref(&self) -> &StepBufs {
        match &self.bufs {
            Some(b) => b,
            None => unreachable!("step buffers are taken back only when the step is dropped"),
        }
    }
}

impl Drop for CudaStep {
    fn drop(&mut self) {
        if let (Some(home), Some(key), Some(bufs)) =
            (self.home.take(), self.graph, self.bufs.take())
        {
            if let Ok(mut pool) = home.lock() {
                pool.insert(key, bufs);
            }
        }
    }
}

/// The device copies of a plan's arrays.
pub struct StepBufs {
    pub(super) token_ids: CudaSlice<u32>,
    pub(super) positions: CudaSlice<u32>,
    pub(super) slot_mapping: CudaSlice<i32>,
    pub(super) block_tables: CudaSlice<u32>,
    pub(super) logits_indices: CudaSlice<u32>,
    pub(super) decode: Queries,
    pub(super) prefill: Queries,
    pub(super) prefill_seqs: PrefillSeqs,
}

/// The prefill sequences for the tensor-core kernel: first row, query_len, context_len and
/// block-table row of each.
pub(super) struct PrefillSeqs {
    pub(super) n: usize,
    pub(super) max_query_len: usize,
    pub(super) rows: CudaSlice<u32>,
    pub(super) query_lens: CudaSlice<u32>,
    pub(super) context_lens: CudaSlice<u32>,
    pub(super) tables: CudaSlice<u32>,
}

/// Single-query attention work items: qkv/out row, block-table row, causal context length.
pub(super) struct Queries {
    pub(super) n: usize,
    pub(super) max_context: usize,
    pub(super) rows: CudaSlice<u32>,
    pub(super) tables: CudaSlice<u32>,
    pub(super) context_lens: CudaSlice<u32>,
}

/// Only single-token decodes, each sampling.
pub(super) fn is_pure_decode(plan: &BatchPlan) -> bool {
    plan.num_decode_seqs == plan.seqs.len()
        && plan.token_ids.len() == plan.seqs.len()
        && !plan.seqs.is_empty()
}

/// A plan's arrays as the kernels read them; never empty (a zero-length allocation is not a
/// pointer a kernel may receive), so absent parts hold one unused entry.
pub(super) struct HostArrays {
    pub(super) token_ids: Vec<u32>,
    pub(super) positions: Vec<u32>,
    pub(super) slots: Vec<i32>,
    pub(super) tables: Vec<u32>,
    pub(super) logits: Vec<u32>,
    /// Single-query attention work: [rows, table rows, context lens] of decodes and of prefill
    /// tokens.
    pub(super) decode: [Vec<u32>; 3],
    pub(super) prefill: [Vec<u32>; 3],
    /// Prefill sequences: [first row, query_len, context_len, table row].
    pub(super) seqs: [Vec<u32>; 4],
    pub(super) n_decode: usize,
    pub(super) n_prefill: usize,
    pub(super) n_seqs: usize,
    pub(super) max_decode_ctx: usize,
    pub(super) max_prefill_ctx: usize,
    pub(super) max_query_len: usize,
}

impl HostArrays {
    pub(super) fn new(plan: &BatchPlan) -> Self {
        let mut decode: [Vec<u32>; 3] = Default::default();
        let mut prefill: [Vec<u32>; 3] = Default::default();
        let mut seqs: [Vec<u32>; 4] = Default::default();
        for (i, s) in plan.seqs.iter().enumerate() {
            let first_pos = s.context_len - s.query_len;
            let q = if i < plan.num_decode_seqs {
                &mut decode
            } else {
                seqs[0].push(s.query_start as u32);
                seqs[1].push(s.query_len as u32);
                seqs[2].push(s.context_len as u32);
                seqs[3].push(i as u32);
                &mut prefill
            };
            for j in 0..s.query_len {
                q[0].push((s.query_start + j) as u32);
                q[1].push(i as u32);
                q[2].push((first_pos + j + 1) as u32);
            }
        }
        let max = |v: &[u32]| v.iter().copied().max().unwrap_or(0) as usize;
        let mut h = HostArrays {
            n_decode: decode[0].len(),
            n_prefill: prefill[0].len(),
            n_seqs: seqs[0].len(),
            max_decode_ctx: max(&decode[2]),
            max_prefill_ctx: max(&prefill[2]),
            max_query_len: max(&seqs[1]),
            token_ids: plan.token_ids.clone(),
            positions: plan.positions.clone(),
            slots: plan.slot_mapping.iter().map(|&s| s as i32).collect(),
            tables: plan.block_tables.clone(),
            logits: plan.logits_indices.clone(),
            decode,
            prefill,
            seqs,
        };
        for v in [
            &mut h.token_ids,
            &mut h.positions,
            &mut h.tables,
            &mut h.logits,
        ]
        .into_iter()
        .chain(h.decode.iter_mut())
        .chain(h.prefill.iter_mut())
        .chain(h.seqs.iter_mut())
        {
            if v.is_empty() {
                v.push(0);
            }
        }
        if h.slots.is_empty() {
            h.slots.push(-1);
        }
        h
    }
}

impl StepBufs {
    /// Fresh device copies; `fixed_context` (graph steps) sizes decode attention for the longest
    /// context rather than this batch's, so one capture serves every later batch.
    pub(super) fn upload(
        be: &CudaBackend,
        h: &HostArrays,
        fixed_context: Option<usize>,
    ) -> BackendResult<Self> {
        Ok(StepBufs {
            token_ids: be.htod(&h.token_ids)?,
            positions: be.htod(&h.positions)?,
            slot_mapping: be.htod(&h.slots)?,
            block_tables: be.htod(&h.tables)?,
            logits_indices: be.htod(&h.logits)?,
            decode: Queries {
                n: h.n_decode,
                max_context: fixed_context.unwrap_or(h.max_decode_ctx),
                rows: be.htod(&h.decode[0])?,
                tables: be.htod(&h.decode[1])?,
                context_lens: be.htod(&h.decode[2])?,
            },
            prefill: Queries {
                n: h.n_prefill,
                max_context: h.max_prefill_ctx,
                rows: be.htod(&h.prefill[0])?,
                tables: be.htod(&h.prefill[1])?,
                context_lens: be.htod(&h.prefill[2])?,
            },
            prefill_seqs: PrefillSeqs {
                n: h.n_seqs,
                max_query_len: h.max_query_len,
                rows: be.htod(&h.seqs[0])?,
                query_lens: be.htod(&h.seqs[1])?,
                context_lens: be.htod(&h.seqs[2])?,
                tables: be.htod(&h.seqs[3])?,
            },
        })
    }

    /// Copies a plan of the same graph shape into these buffers (their addresses are in the
    /// captured graph).
    pub(super) fn overwrite(&mut self, be: &CudaBackend, h: &HostArrays) -> BackendResult<()> {
        let s = &be.stream;
        let e = |e| driver_err("copying step metadata", e);
        s.memcpy_htod(&h.token_ids, &mut self.token_ids)
            .map_err(e)?;
        s.memcpy_htod(&h.positions, &mut self.positions)
            .map_err(e)?;
        s.memcpy_htod(&h.slots, &mut self.slot_mapping).map_err(e)?;
        s.memcpy_htod(&h.tables, &mut self.block_tables)
            .map_err(e)?;
        s.memcpy_htod(&h.logits, &mut self.logits_indices)
            .map_err(e)?;
        s.memcpy_htod(&h.decode[0], &mut self.decode.rows)
            .map_err(e)?;
        s.memcpy_htod(&h.decode[1], &mut self.decode.tables)
            .map_err(e)?;
        s.memcpy_htod(&h.decode[2], &mut self.decode.context_lens)
            .map_err(e)?;
        self.decode.n = h.n_decode;
        Ok(())
    }
}

impl CudaBackend {
    /// The plan's arrays on the device: fresh copies, or a graph shape's pooled buffers
    /// overwritten in place.
    pub(super) fn prepare(&self, plan: &BatchPlan) -> BackendResult<CudaStep> {
        let h = HostArrays::new(plan);
        let graph = self.graph_key(plan);
        let Some(key) = graph else {
            return Ok(CudaStep {
                bufs: Some(StepBufs::upload(self, &h, None)?),
                graph: None,
                home: None,
                plan: plan.clone(),
            });
        };
        // A graph shape: the same device buffers every time, overwritten in place.
        let max_context = self.limits.map_or(0, |l| l.max_context);
        let pooled = self.step_pool.lock().ok().and_then(|mut p| p.remove(&key));
        let bufs = match pooled {
            Some(mut b) => {
                b.overwrite(self, &h)?;
                b
            }
            None => StepBufs::upload(self, &h, Some(max_context))?,
        };
        Ok(CudaStep {
            bufs: Some(bufs),
            graph,
            home: Some(self.step_pool.clone()),
            plan: plan.clone(),
        })
    }
}
