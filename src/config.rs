//! Validated engine configuration. Every knob has the name vLLM gives it where vLLM has one.
use crate::error::{Error, Result};
use crate::kv::BlockHashAlgo;
use std::path::PathBuf;

/// How the waiting queue is ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SchedulingPolicy {
    /// First come, first served.
    #[default]
    Fcfs,
    /// Lower `priority` value first, then arrival order; preemption picks the lowest priority.
    Priority,
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences in one step's batch.
    pub max_num_seqs: usize,
    /// Token budget of one step (prefill chunks + decodes).
    pub max_num_batched_tokens: usize,
    /// Split long prompts into chunks that fit the token budget, mixed with decodes.
    pub enable_chunked_prefill: bool,
    pub policy: SchedulingPolicy,
    /// Most requests waiting before `add_request` refuses with `QueueFull` (None: unbounded).
    /// Defaults to [`DEFAULT_MAX_WAITING_REQUESTS`], so queued prompts hold bounded memory.
    pub max_waiting_requests: Option<usize>,
}

/// Default bound of the waiting queue: four full batches at the default `max_num_seqs`, so
/// the device never starves while memory stays bounded (at most this many prompts of up to
/// `max_model_len` tokens). A router in front (llm-d's endpoint picker) queues the rest.
pub const DEFAULT_MAX_WAITING_REQUESTS: usize = 1024;

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            enable_chunked_prefill: true,
            policy: SchedulingPolicy::Fcfs,
            max_waiting_requests: Some(DEFAULT_MAX_WAITING_REQUESTS),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Number of KV blocks; None sizes the pool from memory (below).
    pub num_blocks: Option<usize>,
    /// Memory given to the KV cache when `num_blocks` is None (vLLM's `--kv-cache-memory`).
    /// None: on a GPU, what `gpu_memory_utilization` leaves once the weights and step buffers
    /// are allocated; on the CPU, [`CPU_KV_CACHE_BYTES`].
    pub kv_cache_memory_bytes: Option<usize>,
    /// Fraction of the GPU's total memory this engine may use (weights, step buffers and KV
    /// cache together) when the KV size is not given (vLLM's `--gpu-memory-utilization`).
    pub gpu_memory_utilization: f64,
    pub enable_prefix_caching: bool,
    pub block_hash_algo: BlockHashAlgo,
    /// Root of the block-hash chain (vLLM's `PYTHONHASHSEED`): workers and routers that share
    /// cached blocks must agree on it.
    pub block_hash_seed: String,
}

/// KV cache memory on the CPU backend when none is given (the host has no allocator to ask
/// what is free, and other processes share it).
pub const CPU_KV_CACHE_BYTES: usize = 2 << 30;

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: None,
            kv_cache_memory_bytes: None,
            gpu_memory_utilization: 0.9,
            enable_prefix_caching: true,
            block_hash_algo: BlockHashAlgo::default(),
            block_hash_seed: std::env::var("PYTHONHASHSEED").unwrap_or_else(|_| "0".into()),
        }
    }
}

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// The CUDA device of this ordinal.
    Cuda(usize),
}

impl DeviceKind {
    /// CUDA device 0 when this machine has a CUDA driver and a device, else the CPU.
    pub fn auto() -> Self {
        match crate::backend::cuda::device_count() {
            Ok(n) if n > 0 => DeviceKind::Cuda(0),
            _ => DeviceKind::Cpu,
        }
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = String;

    /// `cpu`, `cuda` (device 0), `cuda:N`, or `auto` ([`DeviceKind::auto`]).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceKind::auto()),
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceKind::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

/// Weight quantization at load (vLLM's `--quantization`; here a CPU-backend feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// Q8_0: int8 weights in blocks of 32 along the input dimension, one f16 scale per block;
    /// activations quantized the same way per product ([`crate::backend::cpu::q8`]).
    Int8,
}

impl std::str::FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "int8" => Ok(Quantization::Int8),
            _ => Err(format!(
                "unknown quantization {s:?}: the accepted value is int8 (Q8_0 weights, CPU only)"
            )),
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Quantization::Int8 => f.write_str("int8"),
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceKind::Cpu => write!(f, "cpu"),
            DeviceKind::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// A local Hugging Face model directory.
    pub model: PathBuf,
    /// Longest sequence (prompt + output); None takes the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    pub device: DeviceKind,
    /// Run every GPU step eagerly instead of replaying captured CUDA graphs for decode steps
    /// (vLLM's `--enforce-eager`).
    pub enforce_eager: bool,
    pub scheduler: SchedulerConfig,
    pub cache: CacheConfig,
    /// Worker threads for the CPU backend (None: rayon's default, one per core).
    pub num_threads: Option<usize>,
    /// CPU backend: round an f32 checkpoint's matrix weights to bf16 at load (half the weight
    /// memory and decode bandwidth, at bf16's rounding error). bf16 and f16 checkpoints keep
    /// their precision on the CPU whatever this says.
    pub cpu_bf16_weights: bool,
    /// Quantize the weights at load (CPU backend only; None: unquantized).
    pub quantization: Option<Quantization>,
    /// Let the backend pick random (non-greedy) tokens too, under the rules of
    /// [`crate::backend::cpu::sampling`], so logits stay on the device. None: where the
    /// backend samples on the device itself (CUDA). Greedy rows always go to the backend.
    pub device_sampling: Option<bool>,
    /// Faults to inject into model steps (tests of failure handling; None in production).
    pub fault_injection: Option<crate::engine::FaultInjector>,
    /// The KV tiers below the device pool (host, disk, remote); all off by default. They need
    /// prefix caching (blocks are found by hash).
    pub kv_tiers: crate::kv::tiers::TierConfig,
    /// Where each step's KV events go (None: not collected).
    pub kv_events: Option<KvEventsHandle>,
}

/// The engine's KV event sink (a ZMQ publisher in the server).
#[derive(Clone)]
pub struct KvEventsHandle(pub std::sync::Arc<dyn crate::kv::KvEventSink>);

impl std::fmt::Debug for KvEventsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvEventsHandle")
    }
}

impl EngineConfig {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            max_model_len: None,
            device: DeviceKind::Cpu,
            enforce_eager: false,
            scheduler: SchedulerConfig::default(),
            cache: CacheConfig::default(),
            num_threads: None,
            cpu_bf16_weights: false,
            quantization: None,
            device_sampling: None,
            fault_injection: None,
            kv_tiers: Default::default(),
            kv_events: None,
        }
    }

    /// Checks every field that can be checked without the model.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| {
            Err(Error::Config {
                field,
                reason: reason.to_string(),
            })
        };
        if self.cache.block_size == 0 || !self.cache.block_size.is_power_of_two() {
            return bad("block_size", "must be a power of two");
        }
        if self.cache.num_blocks == Some(0) {
            return bad("num_blocks", "must be at least 1");
        }
        let u = self.cache.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return bad(
                "gpu_memory_utilization",
                "must be a fraction of the GPU's memory in (0, 1]",
            );
        }
        if self.scheduler.max_num_seqs == 0 {
            return bad("max_num_seqs", "must be at least 1");
        }
        if self.scheduler.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens", "must be at least 1");
        }
        if let (Some(q), DeviceKind::Cuda(_)) = (self.quantization, self.device) {
            return bad(
                "quantization",
                &format!("{q} weights are implemented on the CPU backend only (use --device cpu)"),
            );
        }
        if self.max_model_len == Some(0) {
            return bad("max_model_len", "must be at least 1");
        }
        if self.kv_tiers.is_enabled() && !self.cache.enable_prefix_caching {
            return bad(
                "kv_offloading",
                "the KV tiers find blocks by prefix hash: enable prefix caching",
            );
        }
        if self.kv_tiers.disk_path.is_some() && self.kv_tiers.disk_bytes == 0 {
            return bad("kv_disk_gb", "a disk tier needs a capacity above 0");
        }
        if let Some(len) = self.max_model_len {
            if !self.scheduler.enable_chunked_prefill && self.scheduler.max_num_batched_tokens < len
            {
                return bad(
                    "max_num_batched_tokens",
                    "must be >= max_model_len when chunked prefill is off",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_queue_is_bounded_by_default() {
        let c = SchedulerConfig::default();
        assert_eq!(c.max_waiting_requests, Some(DEFAULT_MAX_WAITING_REQUESTS));
        assert!(DEFAULT_MAX_WAITING_REQUESTS >= 4 * c.max_num_seqs);
    }

    #[test]
    fn devices_parse_and_print() {
        for (s, d) in [
            ("cpu", DeviceKind::Cpu),
            ("cuda", DeviceKind::Cuda(0)),
            ("cuda:3", DeviceKind::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceKind>().unwrap(), d);
        }
        assert_eq!(DeviceKind::Cuda(3).to_string(), "cuda:3");
        let cuda = crate::backend::cuda::device_count().is_ok_and(|n| n > 0);
        let want = if cuda {
            DeviceKind::Cuda(0)
        } else {
            DeviceKind::Cpu
        };
        assert_eq!("auto".parse::<DeviceKind>().unwrap(), want);
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", ""] {
            assert!(bad.parse::<DeviceKind>().is_err(), "{bad}");
        }
    }

    #[test]
    fn quantization_parses_and_is_cpu_only() {
        assert_eq!("int8".parse::<Quantization>().unwrap(), Quantization::Int8);
        assert_eq!(Quantization::Int8.to_string(), "int8");
        for bad in ["int4", "INT8", "q8_0", ""] {
            let e = bad.parse::<Quantization>().unwrap_err();
            assert!(e.contains("int8"), "{bad}: {e}");
        }
        let mut c = EngineConfig::new("m");
        c.quantization = Some(Quantization::Int8);
        assert!(c.validate().is_ok());
        c.device = DeviceKind::Cuda(0);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("quantization") && e.contains("CPU"), "{e}");
    }

    #[test]
    fn gpu_memory_utilization_must_be_a_fraction() {
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let mut c = EngineConfig::new("m");
            c.cache.gpu_memory_utilization = bad;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("gpu_memory_utilization"), "{bad}: {e}");
        }
        let mut c = EngineConfig::new("m");
        c.cache.gpu_memory_utilization = 1.0;
        assert!(c.validate().is_ok());
    }
}
