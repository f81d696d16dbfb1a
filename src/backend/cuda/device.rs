//! [`CudaBackend`]: the [`Backend`] trait on one NVIDIA GPU. Activations, weights and the KV
//! cache are bf16 on the device (f32 math inside the kernels); GEMMs are cuBLAS (bf16 in, f32
//! accumulate; or, opt-in, the skinny kernel for decode-sized ones); everything else is the kernels of `kernels/`, compiled by NVRTC for the
//! device's architecture at start-up.
//!
//! Ops return nothing (the trait is shaped for the CPU): a failed launch is recorded and
//! reported by the next [`Backend::to_host`], which ends the step, so a device error surfaces
//! as a failed step rather than wrong tokens.
//!
//! Split by concern: `attention` (decode and prefill attention launches and their scratch),
//! `gemm` (the GEMM of decode-sized matmuls), `graphs` (CUDA graphs of decode steps, step
//! timing), `moe` (mixture-of-experts MLPs and their scratch), `step` (a step's arrays on the
//! device).
use super::{check_device, compile_ptx, KERNEL_ENTRIES};
use crate::backend::cpu::sampling::RowSampling;
use crate::backend::{
    stacked_rows_shape, AttnDims, Backend, BackendError, BackendResult, BatchPlan, HostDType,
    HostTensor, KvCacheDims, StepLimits,
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

mod attention;
mod gemm;
mod graphs;
mod kv;
mod moe;
mod step;

use attention::Scratch;
pub use attention::{decode_partition, PrefillKernel, DEFAULT_DECODE_MMA_MIN_GROUP};

/// A kernel chosen at start-up by an environment variable, so that a GPU machine with the
/// built binaries but no Rust toolchain can compare kernels (the backend keeps a choice as its
/// index in [`KernelChoice::ALL`]).
pub trait KernelChoice: Copy + 'static {
    /// Every choice, the default first.
    const ALL: &'static [Self];
    /// The variable naming the choice.
    const ENV: &'static str;
    fn name(self) -> &'static str;

    /// [`Self::ENV`]'s choice, the default when unset; any other value is an error naming the
    /// variable and the choices.
    fn from_env() -> BackendResult<Self> {
        match std::env::var(Self::ENV) {
            Err(_) => Ok(Self::ALL[0]),
            Ok(v) => Self::ALL
                .iter()
                .copied()
                .find(|k| k.name() == v)
                .ok_or_else(|| {
                    let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
                    BackendError::DeviceUnavailable {
                        requested: "cuda".into(),
                        reason: format!("{}={v:?}: expected {}", Self::ENV, names.join(" or ")),
                    }
                }),
        }
    }
}
use gemm::SKINNY_THREADS;
pub use gemm::{DecodeGemm, SKINNY_MAX_ROWS};
use graphs::{Graphs, StepTiming};
use kv::{HostBytes, KvStaging};
pub use kv::{KV_PINNED_SLOTS, KV_STAGING_BYTES};
use moe::MoeState;
use step::{is_pure_decode, Queries};
pub use step::{CudaStep, StepBufs};

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
    /// The prefill attention kernel ([`PrefillKernel`] as u8).
    prefill_kernel: std::sync::atomic::AtomicU8,
    /// The GEMM of decode-sized matmuls ([`DecodeGemm`] as u8).
    decode_gemm: std::sync::atomic::AtomicU8,
    /// The device-clock span of each step (events around its kernels), summed.
    timing: Mutex<StepTiming>,
    /// Mixture-of-experts scratch (sized at `reserve`) and expert address tables.
    moe: Mutex<MoeState>,
    /// Staging buffers of batched KV block copies (tiers, P/D).
    kv_staging: Mutex<KvStaging>,
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
            prefill_kernel: std::sync::atomic::AtomicU8::new(PrefillKernel::from_env()? as u8),
            decode_gemm: std::sync::atomic::AtomicU8::new(DecodeGemm::from_env()? as u8),
            timing: Mutex::new(timing),
            moe: Mutex::new(MoeState::default()),
            kv_staging: Mutex::new(KvStaging::default()),
        })
    }

    /// Runs decode attention of groups of at least `group` query heads per KV head on tensor
    /// cores (`usize::MAX`: never), for benches and tests that compare the two kernels.
    pub fn set_decode_mma_min_group(&self, group: usize) {
        self.decode_mma_min_group.store(group, Ordering::Relaxed);
    }

    /// Runs prefill attention (head dims 64 and 128) with `kernel`, for benches and tests
    /// that compare the kernels.
    pub fn set_prefill_kernel(&self, kernel: PrefillKernel) {
        self.prefill_kernel.store(kernel as u8, Ordering::Relaxed);
    }

    pub fn prefill_kernel(&self) -> PrefillKernel {
        PrefillKernel::ALL[self.prefill_kernel.load(Ordering::Relaxed) as usize]
    }

    /// Runs matmuls of at most [`SKINNY_MAX_ROWS`] rows with `gemm`, for benches and tests
    /// that compare it with cuBLAS.
    pub fn set_decode_gemm(&self, gemm: DecodeGemm) {
        self.decode_gemm.store(gemm as u8, Ordering::Relaxed);
    }

    pub fn decode_gemm(&self) -> DecodeGemm {
        DecodeGemm::ALL[self.decode_gemm.load(Ordering::Relaxed) as usize]
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

    /// `out[m, n] = x[m, k] · w[n, k]ᵀ` (`w` of shape `(n, k)`) on cuBLAS, bf16 in, f32
    /// accumulate, `out` of `out_type` (bf16 activations; f32 router logits).
    ///
    /// # Safety
    /// `x` must point at `m·k` bf16 values and `out` at room for `m·n` values of `out_type`,
    /// both on this backend's device.
    unsafe fn gemm_nt(
        &self,
        w: &CudaSlice<u16>,
        (n, k): (usize, usize),
        x: cudarc::driver::sys::CUdeviceptr,
        out: cudarc::driver::sys::CUdeviceptr,
        out_type: blas_sys::cudaDataType,
        m: usize,
    ) -> Result<(), cudarc::cublas::result::CublasError> {
        let (n, k) = (n as i32, k as i32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a, _ga) = w.device_ptr(&self.stream);
        // Row-major out[m, n] = x[m, k] · w[n, k]ᵀ is column-major out(n×m) = wᵀ(n×k) · x(k×m):
        // A = w read transposed (ld k), B = x (ld k), C ld n.
        // SAFETY: w holds n·k bf16 values; x and out as the caller promises; the scalars are
        // f32 as the 32F compute type requires.
        unsafe {
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
                x as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k,
                &beta as *const f32 as *const _,
                out as *mut _,
                out_type,
                n,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
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

    fn read_kv_blocks(
        &self,
        caches: &[CudaKvCache],
        blocks: &[usize],
        out: &mut [u8],
    ) -> BackendResult<()> {
        self.copy_kv_blocks(caches, blocks, HostBytes::Out(out))
    }

    fn write_kv_blocks(
        &self,
        caches: &mut [CudaKvCache],
        blocks: &[usize],
        data: &[u8],
    ) -> BackendResult<()> {
        self.copy_kv_blocks(caches, blocks, HostBytes::In(data))
    }

    fn read_kv_blocks_async(
        &self,
        caches: &[CudaKvCache],
        blocks: &[usize],
        bytes: usize,
    ) -> BackendResult<Box<dyn crate::backend::PendingKvRead>> {
        self.read_kv_blocks_started(caches, blocks, bytes)
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
        self.prepare(plan)
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
            softcap: None,
        };
        let graph = self.graph_scratch_need(dims);
        let eager = self.scratch_bound(limits.max_seqs, dims);
        for (lock, need) in [(&self.graph_scratch, graph), (&self.scratch, eager)] {
            let mut s = lock
                .lock()
                .map_err(|_| driver_err("attention scratch", "lock poisoned"))?;
            self.grow_scratch(&mut s, need, limits.head_dim)?;
        }
        // MoE scratch for the largest step, also before the KV cache takes what is left.
        if let Some(shape) = limits.moe {
            let mut state = self
                .moe
                .lock()
                .map_err(|_| driver_err("MoE scratch", "lock poisoned"))?;
            self.grow_moe_scratch(&mut state, limits.max_tokens, shape)?;
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
        self.padded_plan(plan)
    }

    fn run_step(&self, step: &CudaStep, forward: &mut dyn FnMut()) -> BackendResult<()> {
        self.run_timed(step, forward)
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
        let (n, k) = (w.shape[0], w.shape[1]);
        if let Some(kernel) = self.skinny_kernel(m, k) {
            let (m_i, n_i, k_i) = (m as i32, n as i32, k as i32);
            let mut b = self.stream.launch_builder(self.func(kernel));
            b.arg(x)
                .arg(wd)
                .arg(&mut *out)
                .arg(&m_i)
                .arg(&n_i)
                .arg(&k_i);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(16) as u32, 1, 1),
                block_dim: (SKINNY_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `gemm_skinny_m*_bf16`; x holds m·k and out m·n bf16 values, w
            // n·k; k % 8 == 0 and every buffer starts 16-byte aligned (its own allocation).
            if let Err(e) = unsafe { b.launch(cfg) } {
                self.record(kernel, e);
                return;
            }
        } else {
            let (bp, _gb) = x.device_ptr(&self.stream);
            let (c, _gc) = out.device_ptr_mut(&self.stream);
            // SAFETY: x holds m·k and out m·n bf16 elements (the op's contract).
            let r =
                unsafe { self.gemm_nt(wd, (n, k), bp, c, blas_sys::cudaDataType::CUDA_R_16BF, m) };
            if let Err(e) = r {
                self.record("matmul", e);
                return;
            }
        }
        if let Some(bias) = bias {
            let Some(bd) = self.bf16_weight(bias, "bias") else {
                return;
            };
            let (rows, n_i) = (m as i32, n as i32);
            let mut b = self.stream.launch_builder(self.func("add_bias_bf16"));
            b.arg(&mut *out).arg(bd).arg(&rows).arg(&n_i);
            // SAFETY: matches `add_bias_bf16`; out holds m·n elements, bias n.
            if let Err(e) = unsafe { b.launch(Self::elementwise(m * n)) } {
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
        // The table's width: the rotated dimensions of each head (partial rotary: fewer).
        let rot = cos_sin.shape.get(1).map_or(hd, |&w| (w as i32).min(hd));
        let mut b = self.stream.launch_builder(self.func("rope_bf16"));
        b.arg(&mut *qkv)
            .arg(table)
            .arg(&step.positions)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd)
            .arg(&rot);
        // SAFETY: matches `rope_bf16`; positions are below the table's rows (max_model_len),
        // and the table rows are `rot` wide.
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

    fn supports_softcap(&self) -> bool {
        true
    }

    fn softcap(&self, x: &mut CudaBuffer, n: usize, cap: f32) {
        if n == 0 {
            return;
        }
        let len = n as i64;
        let mut b = self.stream.launch_builder(self.func("softcap_bf16"));
        b.arg(&mut *x).arg(&len).arg(&cap);
        // SAFETY: matches `softcap_bf16`; n is within the buffer (the step's logits rows).
        if let Err(e) = unsafe { b.launch(Self::elementwise(n)) } {
            self.record("softcap", e);
        }
    }

    fn supports_moe(&self) -> bool {
        true
    }

    fn moe(
        &self,
        x: &CudaBuffer,
        moe: &crate::backend::MoeWeights<CudaWeight>,
        rows: usize,
        out: &mut CudaBuffer,
    ) {
        self.moe_forward(x, moe, rows, out);
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
        self.prefill_attention(qkv, cache, step, dims, out);
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
