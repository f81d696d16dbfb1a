//! Decode-sized matmuls on the GPU: cuBLAS and the skinny kernel (`kernels/gemm.cu`) on the
//! weight shapes of the Llama-3-8B body and SmolLM2-1.7B, at 1, 8 and 16 rows, each as a
//! fraction of the same device's copy bandwidth (bytes read: the weight, the rows and the
//! output; copy bandwidth: 2 × a device-to-device copy of the weight's size over its time,
//! measured in the same run). The weight of every shape is larger than the L2 cache.
//! Without a CUDA device it says so and exits 0. Run: `cargo bench --bench cuda_gemm`.
#[path = "support/gpu.rs"]
mod gpu;

use llmd::backend::cuda::device::{DecodeGemm, KernelChoice};
use llmd::backend::{Backend, HostDType, HostTensor};

/// (name, n, k): output features and reduction of each matmul.
const SHAPES: &[(&str, usize, usize)] = &[
    ("8b qkv", 6144, 4096),
    ("8b o_proj", 4096, 4096),
    ("8b gate_up", 28672, 4096),
    ("8b down", 4096, 14336),
    ("8b lm_head", 128256, 4096),
    ("1.7b gate_up", 16384, 2048),
    ("1.7b down", 2048, 8192),
];

fn main() {
    let Some(g) = gpu::device_or_skip("cuda_gemm") else {
        return;
    };
    let repeat = gpu::repeat(20);
    println!(
        "decode-sized matmuls vs copy bandwidth on {} (best of {repeat})",
        g.arch()
    );
    println!(
        "{:<14} {:>7} {:>6} {:>3} {:>7} {:>9} {:>9} {:>9} {:>6}",
        "shape", "n", "k", "m", "gemm", "GB/s", "copy GB/s", "time us", "ratio"
    );
    for &(name, n, k) in SHAPES {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 2654435761) % 1000) as f32 / 20000.0 - 0.025)
            .collect();
        let shape = [n, k];
        let wt = g
            .load_weight(HostTensor {
                dtype: HostDType::F32,
                shape: &shape,
                data: bytemuck::cast_slice(&w),
            })
            .unwrap();
        drop(w);
        let copy_bw = gpu::copy_bandwidth(&g, n * k, repeat);
        for m in [1, 8, 16] {
            let x = g.upload(&vec![0.5f32; m * k]).unwrap();
            let mut out = g.alloc(m * n).unwrap();
            for &gemm in DecodeGemm::ALL {
                g.set_decode_gemm(gemm);
                let t = gpu::best_secs(&g, repeat, || g.matmul(&x, &wt, None, &mut out, m));
                let bw = ((n * k + m * k + m * n) * 2) as f64 / t;
                println!(
                    "{name:<14} {n:>7} {k:>6} {m:>3} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>5.2}x",
                    gemm.name(),
                    bw / 1e9,
                    copy_bw / 1e9,
                    t * 1e6,
                    bw / copy_bw
                );
            }
        }
    }
}
