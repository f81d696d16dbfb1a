//! Damaged checkpoints for bad-input tests: truncated or corrupt safetensors files, a missing
//! tensor, a tensor of the wrong shape. Each damages exactly one thing, so a loader's error can
//! be checked for naming it.

use super::tiny_model::{write_with_damage, Damage};
use super::TinyModelSpec;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

/// Cuts `path` to its first `keep_bytes` bytes (e.g. mid-header or mid-data).
pub fn truncate_file(path: &Path, keep_bytes: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    assert!(
        keep_bytes < len,
        "truncate {}: file has only {len} bytes",
        path.display()
    );
    file.set_len(keep_bytes)
        .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
}

/// Overwrites the safetensors header-length prefix (first 8 bytes, little-endian u64) with a
/// value far beyond the file size.
pub fn corrupt_header(path: &Path) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(&(u64::MAX / 2).to_le_bytes()))
        .unwrap_or_else(|e| panic!("corrupt header of {}: {e}", path.display()));
}

/// Writes `spec`'s checkpoint without `tensor_name`, in the weights and (when sharded) in the
/// index, so the directory is self-consistent but incomplete. Panics if no such tensor exists.
pub fn write_model_without_tensor(dir: &Path, spec: &TinyModelSpec, tensor_name: &str) {
    write_with_damage(dir, spec, Damage::DropTensor(tensor_name));
}

/// Writes `spec`'s checkpoint with `tensor_name`'s first dimension one larger than the config
/// implies. Panics if no such tensor exists.
pub fn write_model_with_wrong_shape(dir: &Path, spec: &TinyModelSpec, tensor_name: &str) {
    write_with_damage(dir, spec, Damage::GrowTensor(tensor_name));
}
