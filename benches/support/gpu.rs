//! Set-up shared by the GPU benches. Each bench uses a subset, hence the `dead_code` allowance.
#![allow(dead_code)]
use llmd::backend::cuda::{driver_available, CudaBackend};
use llmd::backend::Backend;
use std::time::Instant;

/// Device 0, or `None` after saying why there is nothing to measure (no driver, no device), so
/// the bench exits 0 on machines without a GPU.
pub fn device_or_skip(bench: &str) -> Option<CudaBackend> {
    if !driver_available() {
        println!("{bench}: no CUDA driver on this machine; nothing to measure");
        return None;
    }
    match CudaBackend::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("{bench}: no usable CUDA device: {e}");
            None
        }
    }
}

/// Timed runs per measurement: `LLMD_BENCH_REPEAT`, else `default`.
pub fn repeat(default: usize) -> usize {
    std::env::var("LLMD_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seconds of the fastest of `repeat` runs of `f`, each waited for on the device, after one
/// warm-up run.
pub fn best_secs(g: &CudaBackend, repeat: usize, mut f: impl FnMut()) -> f64 {
    f();
    g.synchronize().unwrap();
    (0..repeat)
        .map(|_| {
            let t = Instant::now();
            f();
            g.synchronize().unwrap();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The device's copy bandwidth in bytes per second: 2 × the bytes of a device-to-device copy of
/// `elements` bf16 values (read and written) over its best time of `repeat`.
pub fn copy_bandwidth(g: &CudaBackend, elements: usize, repeat: usize) -> f64 {
    let src = g.alloc(elements).unwrap();
    let mut dst = g.alloc(elements).unwrap();
    let t = best_secs(g, repeat, || {
        g.stream().memcpy_dtod(&src, &mut dst).unwrap()
    });
    2.0 * (elements * 2) as f64 / t
}
