//! Build script: registers every CUDA source under `kernels/` so edits rebuild the crate.
//! Kernels are compiled at run time by NVRTC (see the CUDA backend), so nothing is compiled here.
use std::path::Path;

fn walk(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path);
        } else if path.extension().is_some_and(|e| e == "cu" || e == "cuh") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    walk(Path::new("kernels"));
}
