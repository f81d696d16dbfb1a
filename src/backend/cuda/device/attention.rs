//! Paged attention launches: the decode kernels (per-lane, and tensor cores for GQA groups),
//! their split-K partitions and scratch, and the tensor-core prefill kernel.
use super::{driver_err, CudaBackend, CudaBuffer, CudaKvCache, CudaStep, KernelChoice, Queries};
use crate::backend::{AttnDims, BackendResult};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use std::sync::atomic::Ordering;

/// Most query heads per KV head the decode kernel serves (its largest `G`).
pub(super) const MAX_GROUP: usize = 8;

/// Smallest GQA group (query heads per KV head) whose decode attention runs on tensor cores
/// (`paged_decode_mma_d*`, head dims 64 and 128) rather than per-lane dot products, which
/// become arithmetic-bound as the group grows. Measured on an H200 (`cuda_attention`, batch
/// 64, context 4096): groups of 3, 4, 7 and 8 are 1.3–2.2× faster on tensor cores; without
/// GQA the per-lane kernel is (1.05× vs 0.80× copy bandwidth); groups of 2 were not measured.
pub const DEFAULT_DECODE_MMA_MIN_GROUP: usize = 3;

/// The tensor-core prefill attention kernels (`kernels/attention_prefill.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// `paged_prefill_d*`: 64×64 tiles loaded synchronously, V fragments read element by
    /// element. Measured on an H200 at 0.36–0.44× torch's flash SDPA; the default until the
    /// pipelined kernel has run on hardware.
    Tiled = 0,
    /// `paged_prefill_pipe_d*`: 128-query tiles (8 warps), two cp.async stages, ldmatrix
    /// fragments, masks only on edge tiles, heaviest tiles first. Written without a GPU: not
    /// yet run on hardware.
    Pipelined = 1,
}

impl KernelChoice for PrefillKernel {
    const ALL: &'static [Self] = &[PrefillKernel::Tiled, PrefillKernel::Pipelined];
    const ENV: &'static str = "LLMD_PREFILL_KERNEL";

    fn name(self) -> &'static str {
        match self {
            PrefillKernel::Tiled => "tiled",
            PrefillKernel::Pipelined => "pipelined",
        }
    }
}

impl PrefillKernel {
    /// Query rows per block and threads per block.
    fn geometry(self) -> (usize, u32) {
        match self {
            PrefillKernel::Tiled => (64, 128),
            PrefillKernel::Pipelined => (128, 256),
        }
    }

    fn entry(self, head_dim: usize) -> Option<&'static str> {
        Some(match (self, head_dim) {
            (PrefillKernel::Tiled, 64) => "paged_prefill_d64",
            (PrefillKernel::Tiled, 128) => "paged_prefill_d128",
            (PrefillKernel::Pipelined, 64) => "paged_prefill_pipe_d64",
            (PrefillKernel::Pipelined, 128) => "paged_prefill_pipe_d128",
            _ => return None,
        })
    }
}

/// The decode kernel and its reduce for a head size and a group size (rounded up to the `G`
/// the kernel is built for).
fn decode_kernels(head_dim: usize, group: usize) -> Option<(&'static str, &'static str)> {
    macro_rules! by_group {
        ($d:literal) => {
            match group.next_power_of_two() {
                1 => (
                    concat!("paged_decode_d", $d, "_g1"),
                    concat!("paged_decode_reduce_d", $d),
                ),
                2 => (
                    concat!("paged_decode_d", $d, "_g2"),
                    concat!("paged_decode_reduce_d", $d),
                ),
                4 => (
                    concat!("paged_decode_d", $d, "_g4"),
                    concat!("paged_decode_reduce_d", $d),
                ),
                8 => (
                    concat!("paged_decode_d", $d, "_g8"),
                    concat!("paged_decode_reduce_d", $d),
                ),
                _ => return None,
            }
        };
    }
    Some(match head_dim {
        8 => by_group!(8),
        16 => by_group!(16),
        32 => by_group!(32),
        64 => by_group!(64),
        128 => by_group!(128),
        256 => by_group!(256),
        _ => return None,
    })
}

/// Context tokens per block of the decode kernel (its `part_len`) for `queries` queries of
/// `kv_heads` KV heads over contexts of up to `span` tokens on a GPU of `sms` multiprocessors:
/// 512, halved (down to 64) while the blocks would not fill the GPU four times over, so that
/// a single long sequence is split along its context across every SM. It depends only on the
/// batch's shape and the longest possible span, so a captured graph keeps it. (Measured on an
/// H200: capping the blocks of a big batch at a few per SM, each reading a longer stretch,
/// was slower — more blocks in flight win.)
pub fn decode_partition(queries: usize, kv_heads: usize, span: usize, sms: usize) -> usize {
    let target = 4 * sms.max(1);
    let mut p = 512;
    while p > 64 && queries * kv_heads * span.max(1).div_ceil(p) < target {
        p /= 2;
    }
    p
}

/// Partial results of split attention, grown as needed.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) part_out: Option<CudaSlice<f32>>,
    pub(super) part_max: Option<CudaSlice<f32>>,
    pub(super) part_sum: Option<CudaSlice<f32>>,
}

impl CudaBackend {
    /// Partition entries (queries × heads × partitions) any decode of up to `queries` queries
    /// may need, whatever its context (up to `max_context`): [`decode_partition`] keeps
    /// `queries × kv_heads × partitions` under twice its target unless partitions are already
    /// the longest (512).
    pub(super) fn scratch_bound(&self, queries: usize, dims: AttnDims) -> usize {
        let max_context = self.limits.map_or(0, |l| l.max_context);
        let spread = 2 * 4 * self.sm_count / dims.num_kv_heads.max(1);
        dims.num_heads * spread.max(queries * max_context.div_ceil(512)).max(queries)
    }

    /// The graph steps' partition entries: the bound for the largest captured batch.
    pub(super) fn graph_scratch_need(&self, dims: AttnDims) -> usize {
        self.scratch_bound(self.graph_batch_limit(), dims)
    }

    /// Makes `scratch` hold at least `need` partition entries of `head_dim` values.
    pub(super) fn grow_scratch(
        &self,
        scratch: &mut Scratch,
        need: usize,
        head_dim: usize,
    ) -> BackendResult<()> {
        let short = |b: &Option<CudaSlice<f32>>, n: usize| b.as_ref().is_none_or(|b| b.len() < n);
        if !short(&scratch.part_max, need) && !short(&scratch.part_out, need * head_dim) {
            return Ok(());
        }
        let alloc = |n: usize| {
            self.stream
                .alloc_zeros::<f32>(n.max(1))
                .map_err(|e| driver_err("allocating attention scratch", e))
        };
        // Drop the old buffers first: their memory is what the new ones will reuse.
        *scratch = Scratch::default();
        scratch.part_out = Some(alloc(need * head_dim)?);
        scratch.part_max = Some(alloc(need)?);
        scratch.part_sum = Some(alloc(need)?);
        Ok(())
    }

    /// Single-query paged attention for `q` (decode, or prefill token by token).
    pub(super) fn attend(
        &self,
        qkv: &CudaBuffer,
        cache: &CudaKvCache,
        step: &CudaStep,
        q: &Queries,
        dims: AttnDims,
        out: &mut CudaBuffer,
    ) {
        if q.n == 0 {
            return;
        }
        let group = dims.num_heads / dims.num_kv_heads;
        if group > MAX_GROUP {
            self.record(
                "attention",
                format!("{group} query heads per KV head (at most {MAX_GROUP})"),
            );
            return;
        }
        let Some((scalar, reduce)) = decode_kernels(dims.head_dim, group) else {
            self.record(
                "attention",
                format!(
                    "head_dim {} (8, 16, 32, 64, 128, 256 are built)",
                    dims.head_dim
                ),
            );
            return;
        };
        let main = match dims.head_dim {
            64 | 128 if group >= self.decode_mma_min_group.load(Ordering::Relaxed) => {
                if dims.head_dim == 64 {
                    "paged_decode_mma_d64"
                } else {
                    "paged_decode_mma_d128"
                }
            }
            _ => scalar,
        };
        let window = dims.sliding_window.unwrap_or(0);
        let span = if window > 0 {
            q.max_context.min(window)
        } else {
            q.max_context
        };
        let part_len = decode_partition(q.n, dims.num_kv_heads, span, self.sm_count);
        let parts = span.div_ceil(part_len).max(1);
        // A graph step is replayed with other batches: its scratch is sized for the largest
        // need of any graph shape up front and never moves.
        let (lock, need) = match step.graph {
            Some(_) => (&self.graph_scratch, self.graph_scratch_need(dims)),
            None => (&self.scratch, q.n * dims.num_heads * parts),
        };
        let Ok(mut scratch) = lock.lock() else {
            self.record("attention", "scratch lock poisoned");
            return;
        };
        if let Err(e) = self.grow_scratch(&mut scratch, need, dims.head_dim) {
            self.record("attention scratch", e);
            return;
        }
        let Scratch {
            part_out: Some(po),
            part_max: Some(pm),
            part_sum: Some(ps),
        } = &mut *scratch
        else {
            return;
        };
        let (nh, nkv) = (dims.num_heads as i32, dims.num_kv_heads as i32);
        let bs = cache.dims.block_size as i32;
        let mbps = step.plan.max_blocks_per_seq as i32;
        let (window, scale, parts_i) = (window as i32, dims.scale, parts as i32);
        // 0: no cap (the kernels' one uniform branch).
        let softcap = dims.softcap.unwrap_or(0.0);
        let part_len_i = part_len as i32;
        let f = self.func(main);
        let mut b = self.stream.launch_builder(f);
        b.arg(qkv)
            .arg(&cache.k)
            .arg(&cache.v)
            .arg(&step.block_tables)
            .arg(&q.rows)
            .arg(&q.tables)
            .arg(&q.context_lens)
            .arg(&mut *out)
            .arg(&mut *po)
            .arg(&mut *pm)
            .arg(&mut *ps)
            .arg(&nh)
            .arg(&nkv)
            .arg(&bs)
            .arg(&mbps)
            .arg(&window)
            .arg(&scale)
            .arg(&softcap)
            .arg(&parts_i)
            .arg(&part_len_i);
        let cfg = LaunchConfig {
            grid_dim: (dims.num_kv_heads as u32, q.n as u32, parts as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match `paged_decode_d*`; every pointer covers the
        // extents the plan implies (checked by the engine when it built the plan).
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.record(main, e);
            return;
        }
        if parts > 1 {
            let f = self.func(reduce);
            let mut b = self.stream.launch_builder(f);
            b.arg(&*po)
                .arg(&*pm)
                .arg(&*ps)
                .arg(&q.rows)
                .arg(&q.context_lens)
                .arg(&mut *out)
                .arg(&nh)
                .arg(&window)
                .arg(&parts_i)
                .arg(&part_len_i);
            let cfg = LaunchConfig {
                grid_dim: (dims.num_heads as u32, q.n as u32, 1),
                block_dim: (dims.head_dim as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above, for `paged_decode_reduce_d*`.
            if let Err(e) = unsafe { b.launch(cfg) } {
                self.record(reduce, e);
            }
        }
    }

    /// Paged prefill attention on tensor cores (head dims 64 and 128; others token by token
    /// through [`Self::attend`]).
    pub(super) fn prefill_attention(
        &self,
        qkv: &CudaBuffer,
        cache: &CudaKvCache,
        step: &CudaStep,
        dims: AttnDims,
        out: &mut CudaBuffer,
    ) {
        let choice = self.prefill_kernel();
        let Some(kernel) = choice.entry(dims.head_dim) else {
            // Other heads (test models, Gemma's 256): token by token through split-K decode.
            return self.attend(qkv, cache, step, &step.prefill, dims, out);
        };
        let p = &step.prefill_seqs;
        if p.n == 0 {
            return;
        }
        let (nh, nkv) = (dims.num_heads as i32, dims.num_kv_heads as i32);
        let bs = cache.dims.block_size as i32;
        let mbps = step.plan.max_blocks_per_seq as i32;
        let window = dims.sliding_window.unwrap_or(0) as i32;
        let (scale, softcap) = (dims.scale, dims.softcap.unwrap_or(0.0));
        let mut b = self.stream.launch_builder(self.func(kernel));
        b.arg(qkv)
            .arg(&cache.k)
            .arg(&cache.v)
            .arg(&step.block_tables)
            .arg(&p.rows)
            .arg(&p.query_lens)
            .arg(&p.context_lens)
            .arg(&p.tables)
            .arg(&mut *out)
            .arg(&nh)
            .arg(&nkv)
            .arg(&bs)
            .arg(&mbps)
            .arg(&window)
            .arg(&scale)
            .arg(&softcap);
        let (rows_per_block, threads) = choice.geometry();
        let cfg = LaunchConfig {
            grid_dim: (
                p.max_query_len.div_ceil(rows_per_block) as u32,
                dims.num_heads as u32,
                p.n as u32,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `paged_prefill_d*` and `paged_prefill_pipe_d*` (the same arguments,
        // their block sizes, static shared memory); rows, lengths and tables come from the
        // plan.
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.record(kernel, e);
        }
    }
}
