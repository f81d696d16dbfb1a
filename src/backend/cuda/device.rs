//! [`CudaBackend`]: the [`Backend`] trait on one NVIDIA GPU. Activations, weights and the KV
//! cache are bf16 on the device (f32 math inside the kernels); GEMMs are cuBLAS (bf16 in, f32
//! accumulate); everything else is the kernels of `kernels/`, compiled by NVRTC for the
//! device's architecture at start-up.
//!
//! Ops return nothing (the trait is shaped for the CPU): a failed launch is recorded and
//! reported by the next [`Backend::to_host`], which ends the step, so a device error surfaces
//! as a failed step rather than wrong tokens.
//!
//! Not verified on a GPU yet (none lent so far): see STATUS.md.
use super::{check_device, compile_ptx, KERNEL_ENTRIES};
use crate::backend::cpu::sampling::RowSampling;
use crate::backend::{
    stacked_rows_shape, AttnDims, Backend, BackendError, BackendResult, BatchPlan, HostDType,
    HostTensor, KvCacheDims, SeqPlan, StepLimits,
};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Most query heads per KV head the decode kernel serves (its largest `G`).
const MAX_GROUP: usize = 8;

/// Smallest GQA group (query heads per KV head) whose decode attention runs on tensor cores
/// (`paged_decode_mma_d*`, head dims 64 and 128) rather than per-lane dot products, which
/// become arithmetic-bound as the group grows. Measured on an H200 (`cuda_attention`, batch
/// 64, context 4096): groups of 3, 4, 7 and 8 are 1.3–2.2× faster on tensor cores; without
/// GQA the per-lane kernel is (1.05× vs 0.80× copy bandwidth); groups of 2 were not measured.
pub const DEFAULT_DECODE_MMA_MIN_GROUP: usize = 3;

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

/// A bf16 activation buffer.
pub type CudaBuffer = CudaSlice<u16>;

/// A parameter on the device: bf16 weights, or an f32 table.
pub struct CudaWeight {
    pub shape: Vec<usize>,
    pub data: WeightData,
}

pub enum WeightData {
    Bf16(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

/// One layer's K and V blocks, bf16 `[num_blocks, block_size, num_kv_heads, head_dim]` each.
pub struct CudaKvCache {
    pub dims: KvCacheDims,
    pub k: CudaSlice<u16>,
    pub v: CudaSlice<u16>,
}

/// A step's metadata on the device, with the host plan for launch geometry. A decode step of a
/// graph shape borrows its buffers from the backend's pool (their addresses are baked into the
/// captured graph) and gives them back when dropped.
pub struct CudaStep {
    plan: BatchPlan,
    /// The decode batch size this step replays as a graph.
    graph: Option<usize>,
    bufs: Option<StepBufs>,
    home: Option<Arc<Mutex<HashMap<usize, StepBufs>>>>,
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
    token_ids: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    slot_mapping: CudaSlice<i32>,
    block_tables: CudaSlice<u32>,
    logits_indices: CudaSlice<u32>,
    decode: Queries,
    prefill: Queries,
    prefill_seqs: PrefillSeqs,
}

/// The prefill sequences for the tensor-core kernel: first row, query_len, context_len and
/// block-table row of each.
struct PrefillSeqs {
    n: usize,
    max_query_len: usize,
    rows: CudaSlice<u32>,
    query_lens: CudaSlice<u32>,
    context_lens: CudaSlice<u32>,
    tables: CudaSlice<u32>,
}

/// Single-query attention work items: qkv/out row, block-table row, causal context length.
struct Queries {
    n: usize,
    max_context: usize,
    rows: CudaSlice<u32>,
    tables: CudaSlice<u32>,
    context_lens: CudaSlice<u32>,
}

/// Captured decode graphs by batch size, and the sizes run once eagerly (the warm-up that
/// makes every allocation before a capture).
#[derive(Default)]
struct Graphs {
    warmed: std::collections::HashSet<usize>,
    captured: HashMap<usize, Graph>,
}

/// A captured graph. cudarc's graph is not `Send`; it is only touched under the backend's
/// mutex, from one thread at a time, as CUDA requires.
struct Graph(cudarc::driver::CudaGraph);
// SAFETY: every access goes through `CudaBackend::graphs`' mutex (see above).
unsafe impl Send for Graph {}

/// Decode batch sizes captured as graphs (vLLM's choice): 1, 2, 4, then multiples of 8.
fn graph_buckets(max: usize) -> Vec<usize> {
    [1, 2, 4]
        .into_iter()
        .chain((8..=max).step_by(8))
        .filter(|&b| b <= max)
        .collect()
}

/// Most sequences a captured decode step holds.
const MAX_GRAPH_BATCH: usize = 256;

/// Partial results of split attention, grown as needed.
#[derive(Default)]
struct Scratch {
    part_out: Option<CudaSlice<f32>>,
    part_max: Option<CudaSlice<f32>>,
    part_sum: Option<CudaSlice<f32>>,
}

pub struct CudaBackend {
    ordinal: usize,
    arch: &'static str,
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    error: Mutex<Option<String>>,
    scratch: Mutex<Scratch>,
    /// Partition buffers of graph decode steps: allocated once at the largest size, so the
    /// addresses captured in graphs stay valid.
    graph_scratch: Mutex<Scratch>,
    /// cuBLAS's workspace, set explicitly so that no GEMM allocates during a capture.
    _blas_workspace: CudaSlice<u8>,
    use_graphs: std::sync::atomic::AtomicBool,
    limits: Option<StepLimits>,
    block_size: std::sync::atomic::AtomicUsize,
    graphs: Mutex<Graphs>,
    step_pool: Arc<Mutex<HashMap<usize, StepBufs>>>,
    /// Multiprocessors of the device (how finely decode attention splits a long context).
    sm_count: usize,
    /// Smallest group decoded on tensor cores ([`DEFAULT_DECODE_MMA_MIN_GROUP`]).
    decode_mma_min_group: std::sync::atomic::AtomicUsize,
    /// The device-clock span of each step (events around its kernels), summed.
    timing: Mutex<StepTiming>,
}

/// Events around the kernels of the step in flight, and the device time of the steps before.
struct StepTiming {
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
    /// An un-read pair was recorded (read at the next step or when asked).
    pending: bool,
    total_ns: u64,
}

impl StepTiming {
    /// Adds the pending step's span (it has finished: every step ends in a synchronizing copy,
    /// and `elapsed_ms` waits for it otherwise).
    fn settle(&mut self) {
        if std::mem::take(&mut self.pending) {
            if let Ok(ms) = self.start.elapsed_ms(&self.end) {
                self.total_ns += (ms as f64 * 1e6) as u64;
            }
        }
    }
}

fn driver_err(what: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::DeviceUnavailable {
        requested: "cuda".into(),
        reason: format!("{what}: {e:?}"),
    }
}

/// `sm_XY` for a compute capability, as the `'static` NVRTC wants (one leak per process).
fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        _ => Box::leak(format!("sm_{major}{minor}").into_boxed_str()),
    }
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`, compiles (or loads from the disk cache) every kernel for its
    /// architecture, and creates the cuBLAS handle.
    pub fn new(ordinal: usize) -> BackendResult<Self> {
        Self::with_graphs(ordinal, true)
    }

    /// As [`CudaBackend::new`]; `graphs: false` runs every step eagerly (`--enforce-eager`).
    pub fn with_graphs(ordinal: usize, graphs: bool) -> BackendResult<Self> {
        check_device(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("creating the context", e))?;
        // One stream, ordered by itself: no cross-stream events (which a capture would reject).
        // SAFETY: called before any slice exists.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_err("reading the compute capability", e))?;
        if major < 8 {
            return Err(BackendError::DeviceUnavailable {
                requested: format!("cuda:{ordinal}"),
                reason: format!(
                    "compute capability {major}.{minor}: bf16 kernels need 8.0 (Ampere) or newer"
                ),
            });
        }
        let arch = arch_name(major, minor);
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| driver_err("reading the multiprocessor count", e))?
            .max(1) as usize;
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = || {
            ctx.new_event(timed)
                .map_err(|e| driver_err("creating a timing event", e))
        };
        let timing = StepTiming {
            start: event()?,
            end: event()?,
            pending: false,
            total_ns: 0,
        };
        // Not the legacy default stream: it cannot be captured.
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_err("creating a stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| driver_err("creating cuBLAS", e))?;
        let workspace_bytes = 32 << 20;
        let mut blas_workspace = stream
            .alloc_zeros::<u8>(workspace_bytes)
            .map_err(|e| driver_err("allocating the cuBLAS workspace", e))?;
        {
            let (ptr, _g) = blas_workspace.device_ptr_mut(&stream);
            // SAFETY: the workspace outlives the handle (both live in the backend).
            let status = unsafe {
                blas_sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, workspace_bytes)
            };
            if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(driver_err("setting the cuBLAS workspace", status));
            }
        }
        let mut functions = HashMap::new();
        for &(file, entries) in KERNEL_ENTRIES {
            let ptx = compile_ptx(file, arch)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| driver_err(&format!("loading {file}"), e))?;
            for &name in entries {
                let f = module
                    .load_function(name)
                    .map_err(|e| driver_err(&format!("finding {name}"), e))?;
                functions.insert(name, f);
            }
        }
        tracing::info!(ordinal, arch, sm_count, "CUDA backend ready");
        Ok(Self {
            ordinal,
            arch,
            _ctx: ctx,
            stream,
            blas,
            functions,
            error: Mutex::new(None),
            scratch: Mutex::new(Scratch::default()),
            graph_scratch: Mutex::new(Scratch::default()),
            _blas_workspace: blas_workspace,
            use_graphs: std::sync::atomic::AtomicBool::new(graphs),
            limits: None,
            block_size: std::sync::atomic::AtomicUsize::new(0),
            graphs: Mutex::new(Graphs::default()),
            step_pool: Arc::new(Mutex::new(HashMap::new())),
            sm_count,
            decode_mma_min_group: std::sync::atomic::AtomicUsize::new(DEFAULT_DECODE_MMA_MIN_GROUP),
            timing: Mutex::new(timing),
        })
    }

    /// Runs decode attention of groups of at least `group` query heads per KV head on tensor
    /// cores (`usize::MAX`: never), for benches and tests that compare the two kernels.
    pub fn set_decode_mma_min_group(&self, group: usize) {
        self.decode_mma_min_group.store(group, Ordering::Relaxed);
    }

    pub fn arch(&self) -> &'static str {
        self.arch
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Uploads host f32 values as a bf16 buffer (tests and benches fill inputs with it).
    pub fn upload(&self, values: &[f32]) -> BackendResult<CudaBuffer> {
        let bits: Vec<u16> = values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        self.htod(&bits)
    }

    /// Downloads a bf16 buffer as f32.
    pub fn download(&self, buf: &CudaBuffer, len: usize) -> BackendResult<Vec<f32>> {
        let mut out = vec![0f32; len];
        self.to_host(buf, &mut out)?;
        Ok(out)
    }

    /// Waits for the stream, reporting the first recorded op failure.
    pub fn synchronize(&self) -> BackendResult<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("synchronizing", e))?;
        self.take_error()
    }

    fn take_error(&self) -> BackendResult<()> {
        match self.error.lock().ok().and_then(|mut e| e.take()) {
            Some(reason) => Err(BackendError::DeviceUnavailable {
                requested: format!("cuda:{}", self.ordinal),
                reason,
            }),
            None => Ok(()),
        }
    }

    fn record(&self, op: &str, e: impl std::fmt::Debug) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert_with(|| format!("{op} failed: {e:?}"));
        }
    }

    fn htod<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> BackendResult<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .map_err(|e| driver_err("copying to the device", e))
    }

    /// The largest decode batch captured as a graph.
    fn graph_batch_limit(&self) -> usize {
        self.limits
            .map_or(0, |l| l.max_seqs.min(l.max_tokens))
            .min(MAX_GRAPH_BATCH)
    }

    /// The graph size of a plan `pad_plan` produced, if it is one.
    fn graph_key(&self, plan: &BatchPlan) -> Option<usize> {
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

    /// Room for one token id per row, written by a sampling kernel.
    fn token_ids(&self, rows: usize) -> BackendResult<CudaSlice<u32>> {
        self.stream
            .alloc_zeros::<u32>(rows)
            .map_err(|e| driver_err("allocating token ids", e))
    }

    /// Waits for the sampling kernel and copies its token ids into `out`.
    fn ids_to_host(&self, ids: &CudaSlice<u32>, out: &mut Vec<u32>) -> BackendResult<()> {
        out.resize(ids.len(), 0);
        self.stream
            .memcpy_dtoh(ids, out.as_mut_slice())
            .map_err(|e| driver_err("copying token ids", e))?;
        self.synchronize()
    }

    fn func(&self, name: &str) -> &CudaFunction {
        // Every name used below is in KERNEL_ENTRIES, all of which `new` loaded.
        &self.functions[name]
    }

    /// Grid-stride launch geometry for `n` elements.
    fn elementwise(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 65535) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn rows(n: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Partition entries (queries × heads × partitions) any decode of up to `queries` queries
    /// may need, whatever its context (up to `max_context`): [`decode_partition`] keeps
    /// `queries × kv_heads × partitions` under twice its target unless partitions are already
    /// the longest (512).
    fn scratch_bound(&self, queries: usize, dims: AttnDims) -> usize {
        let max_context = self.limits.map_or(0, |l| l.max_context);
        let spread = 2 * 4 * self.sm_count / dims.num_kv_heads.max(1);
        dims.num_heads * spread.max(queries * max_context.div_ceil(512)).max(queries)
    }

    /// The graph steps' partition entries: the bound for the largest captured batch.
    fn graph_scratch_need(&self, dims: AttnDims) -> usize {
        self.scratch_bound(self.graph_batch_limit(), dims)
    }

    /// Makes `scratch` hold at least `need` partition entries of `head_dim` values.
    fn grow_scratch(
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

    /// Single-query paged attention for `q` (decode, or prefill token by token).
    fn attend(
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

    fn bf16_weight<'a>(&self, w: &'a CudaWeight, op: &str) -> Option<&'a CudaSlice<u16>> {
        match &w.data {
            WeightData::Bf16(d) => Some(d),
            WeightData::F32(_) => {
                self.record(op, "expected a bf16 weight, got an f32 table");
                None
            }
        }
    }
}

/// Only single-token decodes, each sampling.
fn is_pure_decode(plan: &BatchPlan) -> bool {
    plan.num_decode_seqs == plan.seqs.len()
        && plan.token_ids.len() == plan.seqs.len()
        && !plan.seqs.is_empty()
}

/// A plan's arrays as the kernels read them; never empty (a zero-length allocation is not a
/// pointer a kernel may receive), so absent parts hold one unused entry.
struct HostArrays {
    token_ids: Vec<u32>,
    positions: Vec<u32>,
    slots: Vec<i32>,
    tables: Vec<u32>,
    logits: Vec<u32>,
    /// Single-query attention work: [rows, table rows, context lens] of decodes and of prefill
    /// tokens.
    decode: [Vec<u32>; 3],
    prefill: [Vec<u32>; 3],
    /// Prefill sequences: [first row, query_len, context_len, table row].
    seqs: [Vec<u32>; 4],
    n_decode: usize,
    n_prefill: usize,
    n_seqs: usize,
    max_decode_ctx: usize,
    max_prefill_ctx: usize,
    max_query_len: usize,
}

impl HostArrays {
    fn new(plan: &BatchPlan) -> Self {
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
    fn upload(
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
    fn overwrite(&mut self, be: &CudaBackend, h: &HostArrays) -> BackendResult<()> {
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

/// Host tensor to bf16 bits (bf16 on disk is copied as it is).
fn to_bf16_bits(t: &HostTensor<'_>) -> Vec<u16> {
    match t.dtype {
        HostDType::BF16 => t
            .data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect(),
        _ => t
            .to_f32()
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_bits())
            .collect(),
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;
    type Step = CudaStep;
    /// bf16 K and V (`CudaKvCache`'s `u16` slices).
    const KV_ELEMENT_BYTES: usize = std::mem::size_of::<u16>();

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc(&self, len: usize) -> BackendResult<CudaBuffer> {
        self.stream
            .alloc_zeros::<u16>(len.max(1))
            .map_err(|_| BackendError::OutOfMemory {
                device: "cuda",
                what: "activation buffer",
                bytes: len * 2,
            })
    }

    fn load_weight(&self, t: HostTensor<'_>) -> BackendResult<CudaWeight> {
        // bf16 on disk goes straight from the memory-mapped file to the device (little-endian
        // host, 2-byte aligned data); anything else is converted on the host first.
        let direct = match t.dtype {
            HostDType::BF16 if cfg!(target_endian = "little") => {
                bytemuck::try_cast_slice::<u8, u16>(t.data).ok()
            }
            _ => None,
        };
        let data = match direct {
            Some(bits) => self.htod(bits)?,
            None => self.htod(&to_bf16_bits(&t))?,
        };
        Ok(CudaWeight {
            shape: t.shape.to_vec(),
            data: WeightData::Bf16(data),
        })
    }

    fn load_table(&self, t: HostTensor<'_>) -> BackendResult<CudaWeight> {
        Ok(CudaWeight {
            shape: t.shape.to_vec(),
            data: WeightData::F32(self.htod(&t.to_f32())?),
        })
    }

    fn load_weight_rows(&self, parts: &[HostTensor<'_>]) -> BackendResult<CudaWeight> {
        let shape = stacked_rows_shape(parts)?;
        let bits: Vec<u16> = parts.iter().flat_map(to_bf16_bits).collect();
        Ok(CudaWeight {
            shape,
            data: WeightData::Bf16(self.htod(&bits)?),
        })
    }

    fn alloc_kv_cache(&self, dims: KvCacheDims) -> BackendResult<CudaKvCache> {
        self.block_size.store(dims.block_size, Ordering::Relaxed);
        let oom = |what| BackendError::OutOfMemory {
            device: "cuda",
            what,
            bytes: dims.numel() * Self::KV_ELEMENT_BYTES,
        };
        Ok(CudaKvCache {
            dims,
            k: self
                .stream
                .alloc_zeros(dims.numel())
                .map_err(|_| oom("K cache"))?,
            v: self
                .stream
                .alloc_zeros(dims.numel())
                .map_err(|_| oom("V cache"))?,
        })
    }

    fn read_kv_block(
        &self,
        cache: &CudaKvCache,
        block: usize,
        out: &mut [u8],
    ) -> BackendResult<()> {
        cache
            .dims
            .check_block("read_kv_block", block, out.len(), Self::KV_ELEMENT_BYTES)?;
        self.take_error()?;
        let n = cache.dims.block_numel();
        let (k, v) = out.split_at_mut(n * 2);
        let mut bits = vec![0u16; n];
        for (src, dst) in [(&cache.k, k), (&cache.v, v)] {
            self.stream
                .memcpy_dtoh(&src.slice(block * n..(block + 1) * n), &mut bits)
                .map_err(|e| driver_err("copying a KV block to the host", e))?;
            dst.copy_from_slice(bytemuck::cast_slice(&bits));
        }
        Ok(())
    }

    fn write_kv_block(
        &self,
        cache: &mut CudaKvCache,
        block: usize,
        data: &[u8],
    ) -> BackendResult<()> {
        cache
            .dims
            .check_block("write_kv_block", block, data.len(), Self::KV_ELEMENT_BYTES)?;
        self.take_error()?;
        let n = cache.dims.block_numel();
        let (k, v) = data.split_at(n * 2);
        for (dst, src) in [(&mut cache.k, k), (&mut cache.v, v)] {
            let bits: Vec<u16> = src
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            self.stream
                .memcpy_htod(&bits, &mut dst.slice_mut(block * n..(block + 1) * n))
                .map_err(|e| driver_err("copying a KV block to the device", e))?;
        }
        Ok(())
    }

    fn to_host(&self, buf: &CudaBuffer, out: &mut [f32]) -> BackendResult<()> {
        self.take_error()?;
        let mut bits = vec![0u16; out.len()];
        self.stream
            .memcpy_dtoh(&buf.slice(..out.len()), &mut bits)
            .map_err(|e| driver_err("copying to the host", e))?;
        self.synchronize()?;
        for (o, b) in out.iter_mut().zip(bits) {
            *o = half::bf16::from_bits(b).to_f32();
        }
        Ok(())
    }

    fn prepare_step(&self, plan: &BatchPlan) -> BackendResult<CudaStep> {
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

    fn reserve(&mut self, limits: StepLimits) -> BackendResult<()> {
        self.limits = Some(limits);
        // Attention scratch now, so that the KV cache is sized from what is left: the graph
        // steps' (which may never move) and the eager decodes' of up to max_seqs queries.
        let dims = AttnDims {
            num_heads: limits.num_heads,
            num_kv_heads: limits.num_kv_heads.max(1),
            head_dim: limits.head_dim,
            scale: 1.0,
            sliding_window: None,
        };
        let graph = self.graph_scratch_need(dims);
        let eager = self.scratch_bound(limits.max_seqs, dims);
        for (lock, need) in [(&self.graph_scratch, graph), (&self.scratch, eager)] {
            let mut s = lock
                .lock()
                .map_err(|_| driver_err("attention scratch", "lock poisoned"))?;
            self.grow_scratch(&mut s, need, limits.head_dim)?;
        }
        Ok(())
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        self._ctx.mem_get_info().ok()
    }

    fn device_time_ns(&self) -> u64 {
        self.timing.lock().map_or(0, |mut t| {
            t.settle();
            t.total_ns
        })
    }

    fn pad_plan<'a>(&self, plan: &'a BatchPlan) -> Cow<'a, BatchPlan> {
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

    fn run_step(&self, step: &CudaStep, forward: &mut dyn FnMut()) -> BackendResult<()> {
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

    fn embedding(&self, table: &CudaWeight, step: &CudaStep, out: &mut CudaBuffer) {
        let Some(t) = self.bf16_weight(table, "embedding") else {
            return;
        };
        let n = step.plan.num_tokens();
        if n == 0 {
            return;
        }
        let hidden = table.shape[1] as i32;
        let mut b = self.stream.launch_builder(self.func("embedding_bf16"));
        b.arg(t).arg(&step.token_ids).arg(&mut *out).arg(&hidden);
        // SAFETY: matches `embedding_bf16`; ids were checked against the vocabulary.
        if let Err(e) = unsafe { b.launch(Self::rows(n, 256)) } {
            self.record("embedding", e);
        }
    }

    fn matmul(
        &self,
        x: &CudaBuffer,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        out: &mut CudaBuffer,
        m: usize,
    ) {
        let Some(wd) = self.bf16_weight(w, "matmul") else {
            return;
        };
        if m == 0 {
            return;
        }
        let (n, k) = (w.shape[0] as i32, w.shape[1] as i32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        {
            let (a, _ga) = wd.device_ptr(&self.stream);
            let (bp, _gb) = x.device_ptr(&self.stream);
            let (c, _gc) = out.device_ptr_mut(&self.stream);
            // Row-major out[m, n] = x[m, k] · w[n, k]ᵀ is column-major out(n×m) = wᵀ(n×k) ·
            // x(k×m): A = w read transposed (ld k), B = x (ld k), C ld n.
            // SAFETY: the pointers cover w (n·k), x (m·k) and out (m·n) bf16 elements; the
            // scalars are f32 as the 32F compute type requires.
            let r = unsafe {
                blas::gemm_ex(
                    *self.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    n,
                    m as i32,
                    k,
                    &alpha as *const f32 as *const _,
                    a as *const _,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    k,
                    bp as *const _,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    k,
                    &beta as *const f32 as *const _,
                    c as *mut _,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    n,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            };
            if let Err(e) = r {
                self.record("matmul", e);
                return;
            }
        }
        if let Some(bias) = bias {
            let Some(bd) = self.bf16_weight(bias, "bias") else {
                return;
            };
            let (rows, n) = (m as i32, n);
            let mut b = self.stream.launch_builder(self.func("add_bias_bf16"));
            b.arg(&mut *out).arg(bd).arg(&rows).arg(&n);
            // SAFETY: matches `add_bias_bf16`; out holds m·n elements, bias n.
            if let Err(e) = unsafe { b.launch(Self::elementwise(m * n as usize)) } {
                self.record("bias", e);
            }
        }
    }

    fn rms_norm(
        &self,
        x: &CudaBuffer,
        weight: &CudaWeight,
        eps: f32,
        out: &mut CudaBuffer,
        rows: usize,
    ) {
        let Some(wd) = self.bf16_weight(weight, "rms_norm") else {
            return;
        };
        if rows == 0 {
            return;
        }
        let hidden = weight.shape[0] as i32;
        let mut b = self.stream.launch_builder(self.func("rms_norm_bf16"));
        b.arg(x).arg(wd).arg(&mut *out).arg(&hidden).arg(&eps);
        // SAFETY: matches `rms_norm_bf16`.
        if let Err(e) = unsafe { b.launch(Self::rows(rows, 256)) } {
            self.record("rms_norm", e);
        }
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaBuffer,
        x: &CudaBuffer,
        weight: &CudaWeight,
        eps: f32,
        out: &mut CudaBuffer,
        rows: usize,
    ) {
        let Some(wd) = self.bf16_weight(weight, "add_rms_norm") else {
            return;
        };
        if rows == 0 {
            return;
        }
        let hidden = weight.shape[0] as i32;
        let mut b = self.stream.launch_builder(self.func("add_rms_norm_bf16"));
        b.arg(&mut *residual)
            .arg(x)
            .arg(wd)
            .arg(&mut *out)
            .arg(&hidden)
            .arg(&eps);
        // SAFETY: matches `add_rms_norm_bf16`.
        if let Err(e) = unsafe { b.launch(Self::rows(rows, 256)) } {
            self.record("add_rms_norm", e);
        }
    }

    fn rope(&self, qkv: &mut CudaBuffer, cos_sin: &CudaWeight, step: &CudaStep, dims: AttnDims) {
        let WeightData::F32(table) = &cos_sin.data else {
            self.record("rope", "the cos/sin table must be f32 (load_table)");
            return;
        };
        let n = step.plan.num_tokens();
        if n == 0 {
            return;
        }
        let (nh, nkv, hd) = (
            dims.num_heads as i32,
            dims.num_kv_heads as i32,
            dims.head_dim as i32,
        );
        let mut b = self.stream.launch_builder(self.func("rope_bf16"));
        b.arg(&mut *qkv)
            .arg(table)
            .arg(&step.positions)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd);
        // SAFETY: matches `rope_bf16`; positions are below the table's rows (max_model_len).
        if let Err(e) = unsafe { b.launch(Self::rows(n, 128)) } {
            self.record("rope", e);
        }
    }

    fn qk_norm(
        &self,
        qkv: &mut CudaBuffer,
        q_weight: &CudaWeight,
        k_weight: &CudaWeight,
        eps: f32,
        rows: usize,
        dims: AttnDims,
    ) {
        let (Some(qw), Some(kw)) = (
            self.bf16_weight(q_weight, "qk_norm"),
            self.bf16_weight(k_weight, "qk_norm"),
        ) else {
            return;
        };
        if rows == 0 {
            return;
        }
        let (nh, nkv, hd) = (
            dims.num_heads as i32,
            dims.num_kv_heads as i32,
            dims.head_dim as i32,
        );
        let mut b = self.stream.launch_builder(self.func("qk_norm_bf16"));
        b.arg(&mut *qkv)
            .arg(qw)
            .arg(kw)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd)
            .arg(&eps);
        // SAFETY: matches `qk_norm_bf16`; the weights are `[head_dim]` (checked at load).
        if let Err(e) = unsafe { b.launch(Self::rows(rows, 128)) } {
            self.record("qk_norm", e);
        }
    }

    fn gelu_tanh_mul(&self, gate_up: &CudaBuffer, out: &mut CudaBuffer, rows: usize, inter: usize) {
        if rows == 0 {
            return;
        }
        let (r, i) = (rows as i32, inter as i32);
        let mut b = self.stream.launch_builder(self.func("gelu_tanh_mul_bf16"));
        b.arg(gate_up).arg(&mut *out).arg(&r).arg(&i);
        // SAFETY: matches `gelu_tanh_mul_bf16`.
        if let Err(e) = unsafe { b.launch(Self::elementwise(rows * inter)) } {
            self.record("gelu_tanh_mul", e);
        }
    }

    fn scale(&self, x: &mut CudaBuffer, n: usize, factor: f32) {
        if n == 0 {
            return;
        }
        let len = n as i64;
        let mut b = self.stream.launch_builder(self.func("scale_bf16"));
        b.arg(&mut *x).arg(&len).arg(&factor);
        // SAFETY: matches `scale_bf16`; n is within the buffer (the step's rows × hidden).
        if let Err(e) = unsafe { b.launch(Self::elementwise(n)) } {
            self.record("scale", e);
        }
    }

    fn silu_mul(&self, gate_up: &CudaBuffer, out: &mut CudaBuffer, rows: usize, inter: usize) {
        if rows == 0 {
            return;
        }
        let (r, i) = (rows as i32, inter as i32);
        let mut b = self.stream.launch_builder(self.func("silu_mul_bf16"));
        b.arg(gate_up).arg(&mut *out).arg(&r).arg(&i);
        // SAFETY: matches `silu_mul_bf16`.
        if let Err(e) = unsafe { b.launch(Self::elementwise(rows * inter)) } {
            self.record("silu_mul", e);
        }
    }

    fn write_kv(&self, qkv: &CudaBuffer, cache: &mut CudaKvCache, step: &CudaStep, dims: AttnDims) {
        let n = step.plan.num_tokens();
        if n == 0 {
            return;
        }
        let (nh, nkv, hd) = (
            dims.num_heads as i32,
            dims.num_kv_heads as i32,
            dims.head_dim as i32,
        );
        let CudaKvCache { k, v, .. } = cache;
        let mut b = self.stream.launch_builder(self.func("write_kv_bf16"));
        b.arg(qkv)
            .arg(&step.slot_mapping)
            .arg(k)
            .arg(v)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd);
        // SAFETY: matches `write_kv_bf16`; slots are inside the cache (block tables come from
        // the pool of this size).
        if let Err(e) = unsafe { b.launch(Self::rows(n, 128)) } {
            self.record("write_kv", e);
        }
    }

    fn paged_attention_decode(
        &self,
        qkv: &CudaBuffer,
        cache: &CudaKvCache,
        step: &CudaStep,
        dims: AttnDims,
        out: &mut CudaBuffer,
    ) {
        self.attend(qkv, cache, step, &step.decode, dims, out);
    }

    fn paged_attention_prefill(
        &self,
        qkv: &CudaBuffer,
        cache: &CudaKvCache,
        step: &CudaStep,
        dims: AttnDims,
        out: &mut CudaBuffer,
    ) {
        let kernel = match dims.head_dim {
            64 => "paged_prefill_d64",
            128 => "paged_prefill_d128",
            // Small test-model heads: token by token through the split-K kernel.
            _ => return self.attend(qkv, cache, step, &step.prefill, dims, out),
        };
        let p = &step.prefill_seqs;
        if p.n == 0 {
            return;
        }
        let (nh, nkv) = (dims.num_heads as i32, dims.num_kv_heads as i32);
        let bs = cache.dims.block_size as i32;
        let mbps = step.plan.max_blocks_per_seq as i32;
        let window = dims.sliding_window.unwrap_or(0) as i32;
        let scale = dims.scale;
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
            .arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (
                p.max_query_len.div_ceil(64) as u32,
                dims.num_heads as u32,
                p.n as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `paged_prefill_d*`; rows, lengths and tables come from the plan.
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.record(kernel, e);
        }
    }

    fn argmax_rows(
        &self,
        logits: &CudaBuffer,
        rows: usize,
        vocab: usize,
        out: &mut Vec<u32>,
    ) -> BackendResult<()> {
        out.clear();
        if rows == 0 {
            return self.take_error();
        }
        let mut ids = self.token_ids(rows)?;
        let v = vocab as i32;
        let mut b = self.stream.launch_builder(self.func("argmax_bf16"));
        b.arg(logits).arg(&mut ids).arg(&v);
        // SAFETY: matches `argmax_bf16`; logits hold rows·vocab elements.
        unsafe { b.launch(Self::rows(rows, 1024)) }.map_err(|e| driver_err("argmax", e))?;
        self.ids_to_host(&ids, out)
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn sample_rows(
        &self,
        logits: &CudaBuffer,
        vocab: usize,
        params: &[RowSampling],
        out: &mut Vec<u32>,
    ) -> BackendResult<()> {
        out.clear();
        let rows = params.len();
        if rows == 0 {
            return self.take_error();
        }
        let words: Vec<u32> = params.iter().flat_map(RowSampling::words).collect();
        let words = self.htod(&words)?;
        let mut ids = self.token_ids(rows)?;
        let v = vocab as i32;
        let mut b = self.stream.launch_builder(self.func("sample_bf16"));
        b.arg(logits).arg(&words).arg(&mut ids).arg(&v);
        // SAFETY: matches `sample_bf16`; logits hold rows·vocab elements, `words` ROW_WORDS
        // per row.
        unsafe { b.launch(Self::rows(rows, 1024)) }.map_err(|e| driver_err("sample", e))?;
        self.ids_to_host(&ids, out)
    }

    fn gather_rows(&self, x: &CudaBuffer, step: &CudaStep, width: usize, out: &mut CudaBuffer) {
        let n = step.plan.logits_indices.len();
        if n == 0 {
            return;
        }
        let w = width as i32;
        let mut b = self.stream.launch_builder(self.func("gather_rows_bf16"));
        b.arg(x).arg(&step.logits_indices).arg(&mut *out).arg(&w);
        // SAFETY: matches `gather_rows_bf16`; indices are rows of this step.
        if let Err(e) = unsafe { b.launch(Self::rows(n, 256)) } {
            self.record("gather_rows", e);
        }
    }
}
