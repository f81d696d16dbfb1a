//! Every kernel in `kernels/` compiles with NVRTC for sm_80 and sm_90 — on machines without a
//! GPU too (CI): NVRTC comes from the `nvidia-cuda-nvrtc` pip wheel, which `.ci/run` installs.
//!
//! The loader only reads `LD_LIBRARY_PATH` at process start, so when NVRTC is not already
//! loadable the test finds the wheel's library directory and runs itself again in a child
//! process with that directory on the path.
use llmd::backend::cuda::{compile_ptx, nvrtc_available, CI_ARCHS, KERNEL_ENTRIES};
use std::path::PathBuf;
use std::process::Command;

const TEST: &str = "every_kernel_compiles_for_sm80_and_sm90";

/// `site-packages/nvidia/cu13/lib` of the Python on PATH, or `$LLMD_NVRTC_LIB_DIR`.
fn wheel_lib_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LLMD_NVRTC_LIB_DIR") {
        return Some(PathBuf::from(d));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u; s = u.find_spec('nvidia'); \
             print(next(iter(s.submodule_search_locations)) if s else '')",
        ])
        .output()
        .ok()?;
    let root = String::from_utf8(out.stdout).ok()?.trim().to_string();
    let lib = PathBuf::from(root).join("cu13/lib");
    lib.join("libnvrtc.so.13").exists().then_some(lib)
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_available() {
        assert!(
            std::env::var_os("LLMD_NVRTC_CHILD").is_none(),
            "NVRTC still not loadable with LD_LIBRARY_PATH={:?}",
            std::env::var_os("LD_LIBRARY_PATH")
        );
        let dir = wheel_lib_dir().unwrap_or_else(|| {
            panic!(
                "NVRTC not found: run `python3 -m pip install 'nvidia-cuda-nvrtc==13.0.*'` \
                 (or set LLMD_NVRTC_LIB_DIR to a directory holding libnvrtc.so.13)"
            )
        });
        let mut path = dir.into_os_string();
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
            path.push(":");
            path.push(old);
        }
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
            .env("LD_LIBRARY_PATH", path)
            .env("LLMD_NVRTC_CHILD", "1")
            .status()
            .expect("re-running the test");
        assert!(status.success(), "kernel compilation failed (see above)");
        return;
    }
    // A fresh cache: every kernel really compiles here, then is found in the cache.
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("LLMD_KERNEL_CACHE", cache.path());
    let mut failures = Vec::new();
    for &(file, entries) in KERNEL_ENTRIES {
        for &arch in CI_ARCHS {
            match compile_ptx(file, arch) {
                Ok(ptx) => {
                    assert!(ptx.contains(&format!(".target {arch}")), "{file} {arch}");
                    let found: Vec<&str> = ptx
                        .lines()
                        .filter_map(|l| l.split(".entry ").nth(1))
                        .map(|n| n.trim_end_matches('(').trim())
                        .collect();
                    let mut want: Vec<&str> = entries.to_vec();
                    let mut got = found.clone();
                    want.sort();
                    got.sort();
                    assert_eq!(got, want, "{file} {arch}: entry points");
                    if file == "attention_prefill.cu" {
                        // Prefill runs on tensor cores.
                        assert!(ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
                        // The pipelined kernel's fragments come from ldmatrix (V transposed)
                        // and its tiles from cp.async.
                        assert!(ptx.contains("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"));
                        assert!(ptx.contains("cp.async.wait_group"));
                    }
                    println!(
                        "{file} {arch}: {} entry points, {} bytes of PTX",
                        found.len(),
                        ptx.len()
                    );
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let cached = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(
        cached,
        KERNEL_ENTRIES.len() * CI_ARCHS.len(),
        "one cache entry per kernel and arch"
    );
    // Second compile: from the cache, byte for byte the same.
    let again = compile_ptx("norm.cu", "sm_90").unwrap();
    assert!(again.contains("rms_norm_bf16"));
}
