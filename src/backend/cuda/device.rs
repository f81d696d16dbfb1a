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
use crate::backend::{
    stacked_rows_shape, AttnDims, Backend, BackendError, BackendResult, BatchPlan, HostDType,
    HostTensor, KvCacheDims,
};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Context tokens one block of the decode kernel covers (`PARTITION` in attention_decode.cu).
const PARTITION: usize = 512;
/// Most query heads per KV head the decode kernel serves (`MAXG`).
const MAX_GROUP: usize = 8;

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

/// A step's metadata on the device, with the host plan for launch geometry.
pub struct CudaStep {
    plan: BatchPlan,
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
        check_device(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("creating the context", e))?;
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
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| driver_err("creating cuBLAS", e))?;
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
        tracing::info!(ordinal, arch, "CUDA backend ready");
        Ok(Self {
            ordinal,
            arch,
            _ctx: ctx,
            stream,
            blas,
            functions,
            error: Mutex::new(None),
            scratch: Mutex::new(Scratch::default()),
        })
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

    /// Never-empty device copy (a zero-length allocation is not a valid pointer to pass).
    fn htod_nonempty(&self, v: &[u32]) -> BackendResult<CudaSlice<u32>> {
        if v.is_empty() {
            self.htod(&[0u32])
        } else {
            self.htod(v)
        }
    }

    fn func(&self, name: &str) -> &CudaFunction {
        // Every name used below is in KERNEL_ENTRIES, all of which `new` loaded.
        &self.functions[name]
    }

    fn queries(&self, rows: &[u32], tables: &[u32], ctx: &[u32]) -> BackendResult<Queries> {
        Ok(Queries {
            n: rows.len(),
            max_context: ctx.iter().copied().max().unwrap_or(0) as usize,
            rows: self.htod_nonempty(rows)?,
            tables: self.htod_nonempty(tables)?,
            context_lens: self.htod_nonempty(ctx)?,
        })
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
        let (main, reduce) = match dims.head_dim {
            8 => ("paged_decode_d8", "paged_decode_reduce_d8"),
            16 => ("paged_decode_d16", "paged_decode_reduce_d16"),
            32 => ("paged_decode_d32", "paged_decode_reduce_d32"),
            64 => ("paged_decode_d64", "paged_decode_reduce_d64"),
            128 => ("paged_decode_d128", "paged_decode_reduce_d128"),
            d => {
                self.record(
                    "attention",
                    format!("head_dim {d} (8, 16, 32, 64, 128 are built)"),
                );
                return;
            }
        };
        if group > MAX_GROUP {
            self.record(
                "attention",
                format!("{group} query heads per KV head (at most {MAX_GROUP})"),
            );
            return;
        }
        let window = dims.sliding_window.unwrap_or(0);
        let span = if window > 0 {
            q.max_context.min(window)
        } else {
            q.max_context
        };
        let parts = span.div_ceil(PARTITION).max(1);
        let need = q.n * dims.num_heads * parts;
        let Ok(mut scratch) = self.scratch.lock() else {
            self.record("attention", "scratch lock poisoned");
            return;
        };
        if scratch.part_max.as_ref().is_none_or(|b| b.len() < need) {
            let alloc = |n| self.stream.alloc_zeros::<f32>(n);
            match (alloc(need * dims.head_dim), alloc(need), alloc(need)) {
                (Ok(o), Ok(m), Ok(s)) => {
                    scratch.part_out = Some(o);
                    scratch.part_max = Some(m);
                    scratch.part_sum = Some(s);
                }
                (r1, r2, r3) => {
                    let e = r1.err().or(r2.err()).or(r3.err());
                    self.record("attention scratch", e);
                    return;
                }
            }
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
            .arg(&parts_i);
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
                .arg(&parts_i);
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
        Ok(CudaWeight {
            shape: t.shape.to_vec(),
            data: WeightData::Bf16(self.htod(&to_bf16_bits(&t))?),
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
        let oom = |what| BackendError::OutOfMemory {
            device: "cuda",
            what,
            bytes: dims.numel() * 2,
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
        let slots: Vec<i32> = plan.slot_mapping.iter().map(|&s| s as i32).collect();
        let mut tables = plan.block_tables.clone();
        if tables.is_empty() {
            tables.push(0);
        }
        let (mut d_rows, mut d_tab, mut d_ctx) = (Vec::new(), Vec::new(), Vec::new());
        let (mut p_rows, mut p_tab, mut p_ctx) = (Vec::new(), Vec::new(), Vec::new());
        let mut ps: [Vec<u32>; 4] = Default::default();
        for (i, s) in plan.seqs.iter().enumerate().skip(plan.num_decode_seqs) {
            ps[0].push(s.query_start as u32);
            ps[1].push(s.query_len as u32);
            ps[2].push(s.context_len as u32);
            ps[3].push(i as u32);
        }
        for (i, s) in plan.seqs.iter().enumerate() {
            let first_pos = s.context_len - s.query_len;
            for j in 0..s.query_len {
                let (rows, tab, ctx) = if i < plan.num_decode_seqs {
                    (&mut d_rows, &mut d_tab, &mut d_ctx)
                } else {
                    (&mut p_rows, &mut p_tab, &mut p_ctx)
                };
                rows.push((s.query_start + j) as u32);
                tab.push(i as u32);
                ctx.push((first_pos + j + 1) as u32);
            }
        }
        Ok(CudaStep {
            token_ids: self.htod_nonempty(&plan.token_ids)?,
            positions: self.htod_nonempty(&plan.positions)?,
            slot_mapping: if slots.is_empty() {
                self.htod(&[-1i32])?
            } else {
                self.htod(&slots)?
            },
            block_tables: self.htod(&tables)?,
            logits_indices: self.htod_nonempty(&plan.logits_indices)?,
            decode: self.queries(&d_rows, &d_tab, &d_ctx)?,
            prefill: self.queries(&p_rows, &p_tab, &p_ctx)?,
            prefill_seqs: PrefillSeqs {
                n: ps[0].len(),
                max_query_len: ps[1].iter().copied().max().unwrap_or(0) as usize,
                rows: self.htod_nonempty(&ps[0])?,
                query_lens: self.htod_nonempty(&ps[1])?,
                context_lens: self.htod_nonempty(&ps[2])?,
                tables: self.htod_nonempty(&ps[3])?,
            },
            plan: plan.clone(),
        })
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
