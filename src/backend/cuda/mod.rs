//! The CUDA side: device discovery and the kernels of `kernels/`, compiled by NVRTC at first use
//! for the device's architecture and cached on disk.
//!
//! CUDA is loaded at run time (cudarc's dynamic loading): the crate builds and runs on machines
//! without CUDA, and asking for a CUDA device there is a clear [`BackendError`], never a panic
//! (cudarc panics when a library is missing, so presence is checked first).
//!
//! Kernels include no system headers: each file is compiled as [`PRELUDE`] (bf16 conversion,
//! warp and block reductions) followed by its own source, so they compile wherever NVRTC is,
//! with or without the CUDA headers installed.
pub mod device;

pub use device::CudaBackend;

use super::BackendError;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Helpers prepended to every kernel file.
pub const PRELUDE: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel file: `(file name, source)`.
pub const KERNEL_FILES: &[(&str, &str)] = &[
    (
        "activation.cu",
        include_str!("../../../kernels/activation.cu"),
    ),
    (
        "attention_decode.cu",
        include_str!("../../../kernels/attention_decode.cu"),
    ),
    (
        "attention_prefill.cu",
        include_str!("../../../kernels/attention_prefill.cu"),
    ),
    (
        "embedding.cu",
        include_str!("../../../kernels/embedding.cu"),
    ),
    ("gemm.cu", include_str!("../../../kernels/gemm.cu")),
    ("kv_cache.cu", include_str!("../../../kernels/kv_cache.cu")),
    ("moe.cu", include_str!("../../../kernels/moe.cu")),
    ("norm.cu", include_str!("../../../kernels/norm.cu")),
    ("rotary.cu", include_str!("../../../kernels/rotary.cu")),
    ("sampling.cu", include_str!("../../../kernels/sampling.cu")),
];

/// The entry points of each kernel file, as the backend loads them.
pub const KERNEL_ENTRIES: &[(&str, &[&str])] = &[
    (
        "activation.cu",
        &[
            "silu_mul_bf16",
            "add_bias_bf16",
            "gelu_tanh_mul_bf16",
            "scale_bf16",
            "softcap_bf16",
        ],
    ),
    (
        "attention_decode.cu",
        &[
            "paged_decode_d8_g1",
            "paged_decode_d8_g2",
            "paged_decode_d8_g4",
            "paged_decode_d8_g8",
            "paged_decode_reduce_d8",
            "paged_decode_d16_g1",
            "paged_decode_d16_g2",
            "paged_decode_d16_g4",
            "paged_decode_d16_g8",
            "paged_decode_reduce_d16",
            "paged_decode_d32_g1",
            "paged_decode_d32_g2",
            "paged_decode_d32_g4",
            "paged_decode_d32_g8",
            "paged_decode_reduce_d32",
            "paged_decode_d64_g1",
            "paged_decode_d64_g2",
            "paged_decode_d64_g4",
            "paged_decode_d64_g8",
            "paged_decode_reduce_d64",
            "paged_decode_d128_g1",
            "paged_decode_d128_g2",
            "paged_decode_d128_g4",
            "paged_decode_d128_g8",
            "paged_decode_reduce_d128",
            "paged_decode_d256_g1",
            "paged_decode_d256_g2",
            "paged_decode_d256_g4",
            "paged_decode_d256_g8",
            "paged_decode_reduce_d256",
            "paged_decode_mma_d64",
            "paged_decode_mma_d128",
        ],
    ),
    (
        "attention_prefill.cu",
        &[
            "paged_prefill_d64",
            "paged_prefill_d128",
            "paged_prefill_pipe_d64",
            "paged_prefill_pipe_d128",
        ],
    ),
    ("embedding.cu", &["embedding_bf16", "gather_rows_bf16"]),
    ("gemm.cu", &["gemm_skinny_m8_bf16", "gemm_skinny_m16_bf16"]),
    (
        "kv_cache.cu",
        &[
            "write_kv_bf16",
            "gather_kv_blocks_bf16",
            "scatter_kv_blocks_bf16",
        ],
    ),
    (
        "moe.cu",
        &[
            "moe_route",
            "moe_permute",
            "moe_gate_up_bf16",
            "moe_down_bf16",
            "moe_combine_bf16",
        ],
    ),
    (
        "norm.cu",
        &["rms_norm_bf16", "add_rms_norm_bf16", "qk_norm_bf16"],
    ),
    ("rotary.cu", &["rope_bf16"]),
    (
        "sampling.cu",
        &["argmax_f32", "argmax_bf16", "sample_f32", "sample_bf16"],
    ),
];

/// GPU architectures CI compiles every kernel for (A100, H100).
pub const CI_ARCHS: &[&str] = &["sm_80", "sm_90"];

/// The full NVRTC input of a kernel file: the prelude, then the file (with `#line` so errors
/// point into the file).
pub fn kernel_source(file: &str) -> Option<String> {
    let (_, src) = KERNEL_FILES.iter().find(|(f, _)| *f == file)?;
    Some(format!(
        "#line 1 \"common.cuh\"\n{PRELUDE}\n#line 1 \"{file}\"\n{src}"
    ))
}

/// True when the NVRTC library can be loaded (it is found through the loader's search path,
/// e.g. `LD_LIBRARY_PATH`).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// True when the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices; an error saying why when there is no usable driver.
pub fn device_count() -> Result<usize, BackendError> {
    let unavailable = |reason: String| BackendError::DeviceUnavailable {
        requested: "cuda".into(),
        reason,
    };
    if !driver_available() {
        return Err(unavailable(
            "no CUDA driver (libcuda.so) on this machine; use --device cpu".into(),
        ));
    }
    let n = cudarc::driver::CudaContext::device_count()
        .map_err(|e| unavailable(format!("the CUDA driver reports no devices: {e:?}")))?;
    Ok(n.max(0) as usize)
}

/// Checks that CUDA device `ordinal` exists.
pub fn check_device(ordinal: usize) -> Result<(), BackendError> {
    let n = device_count()?;
    if ordinal >= n {
        return Err(BackendError::DeviceUnavailable {
            requested: format!("cuda:{ordinal}"),
            reason: format!("this machine has {n} CUDA device(s)"),
        });
    }
    Ok(())
}

/// Where compiled kernels are kept: `$LLMD_KERNEL_CACHE`, else `$XDG_CACHE_HOME/llmd/kernels`,
/// else `~/.cache/llmd/kernels`.
pub fn kernel_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LLMD_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("llmd").join("kernels"))
}

/// NVRTC's version, part of the cache key (a new compiler may emit different PTX).
fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked by the caller); the out-pointers are valid ints.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        format!("{major}.{minor}")
    } else {
        "unknown".into()
    }
}

/// Compiles `file` for `arch` (e.g. `sm_90`) to PTX with NVRTC, reusing the disk cache (key:
/// SHA-256 of the full source, the architecture and the NVRTC version). A cache entry that cannot
/// be read or written is ignored: the kernel is compiled again.
pub fn compile_ptx(file: &str, arch: &'static str) -> Result<String, BackendError> {
    let err = |reason: String| BackendError::KernelCompile {
        kernel: file.to_string(),
        arch: arch.to_string(),
        reason,
    };
    let src = kernel_source(file).ok_or_else(|| err("no such kernel file".into()))?;
    if !nvrtc_available() {
        return Err(err(
            "the NVRTC library (libnvrtc.so) cannot be loaded: install the CUDA toolkit or the \
             nvidia-cuda-nvrtc wheel and put its lib directory on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let key = {
        let mut h = Sha256::new();
        h.update(src.as_bytes());
        h.update([0]);
        h.update(arch.as_bytes());
        h.update([0]);
        h.update(nvrtc_version().as_bytes());
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let cached = kernel_cache_dir().map(|d| {
        d.join(format!(
            "{}-{arch}-{}.ptx",
            file.trim_end_matches(".cu"),
            &key[..16]
        ))
    });
    if let Some(p) = &cached {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            return Ok(ptx);
        }
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(file.to_string()),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&src, opts)
        .map_err(|e| match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                err(log.to_string_lossy().into_owned())
            }
            other => err(format!("{other:?}")),
        })?
        .to_src();
    if let Some(p) = &cached {
        // Write-then-rename, so a concurrent reader never sees half a file.
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let written = p
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(&tmp, &ptx))
            .and_then(|_| std::fs::rename(&tmp, p));
        if let Err(e) = written {
            tracing::debug!(error = %e, path = %p.display(), "kernel cache not written");
        }
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_is_registered() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let registered: Vec<String> = KERNEL_FILES.iter().map(|(f, _)| f.to_string()).collect();
        assert_eq!(on_disk, registered, "kernels/*.cu and KERNEL_FILES differ");
        let with_entries: Vec<String> = KERNEL_ENTRIES.iter().map(|(f, _)| f.to_string()).collect();
        assert_eq!(with_entries, registered, "KERNEL_ENTRIES misses a file");
        let src = kernel_source("norm.cu").unwrap();
        assert!(src.starts_with("#line 1 \"common.cuh\""));
        assert!(src.contains("#line 1 \"norm.cu\"") && src.contains("rms_norm_bf16"));
        assert!(kernel_source("nope.cu").is_none());
    }

    #[test]
    fn no_driver_is_a_clear_error() {
        if driver_available() {
            return; // a CUDA machine: covered by the GPU tests
        }
        let e = device_count().unwrap_err().to_string();
        assert!(e.contains("libcuda") && e.contains("--device cpu"), "{e}");
    }

    #[test]
    fn decode_partitions_fill_the_gpu_and_stay_within_the_scratch_bound() {
        use super::device::decode_partition;
        // One sequence of 4096 tokens, 8 KV heads, an H100/H200's 132 SMs: split into 64-token
        // partitions, 512 blocks, every SM busy; a batch of 64 keeps 512-token partitions.
        assert_eq!(decode_partition(1, 8, 4096, 132), 64);
        assert_eq!(decode_partition(64, 8, 4096, 132), 512);
        assert_eq!(decode_partition(16, 8, 32768, 132), 512);
        assert_eq!(
            decode_partition(1, 8, 1, 132),
            64,
            "a short context: the shortest"
        );
        // The bound the backend sizes its scratch by holds for every shape.
        for sms in [1, 80, 132] {
            for kv in [1, 2, 8, 32] {
                for b in [1, 2, 3, 4, 8, 64, 256] {
                    for s in [1, 15, 64, 100, 511, 512, 513, 4096, 8191, 32768, 131072] {
                        let p = decode_partition(b, kv, s, sms);
                        assert!(p.is_power_of_two() && (64..=512).contains(&p));
                        let entries = b * s.div_ceil(p);
                        let bound = (8 * sms / kv).max(b * s.div_ceil(512)).max(b);
                        assert!(
                            entries <= bound,
                            "b {b} s {s} kv {kv} sms {sms}: {entries} > {bound}"
                        );
                    }
                }
            }
        }
    }
}
