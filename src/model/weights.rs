//! Memory-mapped safetensors checkpoints: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.
//!
//! Every file's header is validated when opened (size, JSON, offsets covering exactly the file),
//! so a truncated or corrupt file is an error before any weight is used. Tensors are looked up by
//! name with an expected shape; a missing tensor, a wrong shape or an unsupported dtype is a typed
//! error naming the tensor.
use super::ModelError;
use crate::backend::{HostDType, HostTensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Bytes before the data section: the 8-byte length and the JSON header.
    data_start: usize,
}

struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: (usize, usize),
}

pub struct WeightFiles {
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
}

impl WeightFiles {
    /// Opens and validates every safetensors file of the checkpoint in `dir`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::Io {
                path: index.clone(),
                source: e,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::CorruptWeights {
                    path: index.clone(),
                    reason: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::CorruptWeights {
                    path: index.clone(),
                    reason: "no weight_map object".into(),
                })?;
            let mut names = Vec::with_capacity(map.len());
            for f in map.values() {
                // Shards are files of this directory, as the hub fetcher also requires: a name
                // such as `../x` or `/x` would read a file outside the checkpoint.
                let plain = f.as_str().filter(|n| {
                    let mut parts = Path::new(n).components();
                    matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none()
                });
                let Some(name) = plain else {
                    return Err(ModelError::CorruptWeights {
                        path: index.clone(),
                        reason: format!(
                            "weight_map value {f} is not a file name in {}",
                            dir.display()
                        ),
                    });
                };
                names.push(name.to_string());
            }
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            return Err(ModelError::MissingWeights {
                dir: dir.to_path_buf(),
            });
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for path in files {
            let file = File::open(&path).map_err(|e| ModelError::Io {
                path: path.clone(),
                source: e,
            })?;
            // SAFETY: the file is opened read-only and never written through this mapping; a
            // concurrent truncation by another process is outside what we can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io {
                path: path.clone(),
                source: e,
            })?;
            let corrupt = |reason: String| ModelError::CorruptWeights {
                path: path.clone(),
                reason,
            };
            offsets_within(&mmap).map_err(corrupt)?;
            let (header, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| corrupt(e.to_string()))?;
            for (name, info) in meta.tensors() {
                tensors.insert(
                    name,
                    Entry {
                        shard: shards.len(),
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: info.data_offsets,
                    },
                );
            }
            shards.push(Shard {
                path,
                mmap,
                data_start: 8 + header,
            });
        }
        Ok(Self { shards, tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Total bytes of tensor data across shards (for progress reporting).
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|e| e.range.1 - e.range.0).sum()
    }

    /// Elements across all tensors (parameters, for bandwidth rooflines).
    pub fn total_elements(&self) -> usize {
        self.tensors
            .values()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// Drops the file pages wholly inside tensor `name` from this process's resident memory,
    /// once a backend holds its own copy: without it, loading holds every weight twice (the
    /// mapped file and the backend's copy) until the files close. The mapping is read-only and
    /// private, so a later `get` faults the pages back in from the file: nothing is lost.
    pub fn release(&self, name: &str) {
        let Some(e) = self.tensors.get(name) else {
            return;
        };
        let shard = &self.shards[e.shard];
        let page = page_size();
        let start = (shard.data_start + e.range.0).next_multiple_of(page);
        let end = (shard.data_start + e.range.1) / page * page;
        if end > start {
            // SAFETY: DONTNEED on a read-only private file mapping only drops clean pages,
            // which the kernel re-reads from the file on the next access; no reference into the
            // mapping is invalidated.
            let _ = unsafe {
                shard.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    /// The tensor `name`, which must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor<'_>, ModelError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        if e.shape != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: e.shape.clone(),
            });
        }
        let dtype = match e.dtype {
            Dtype::F32 => HostDType::F32,
            Dtype::F16 => HostDType::F16,
            Dtype::BF16 => HostDType::BF16,
            other => {
                return Err(ModelError::TensorDType {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let shard = &self.shards[e.shard];
        let data = &shard.mmap[shard.data_start + e.range.0..shard.data_start + e.range.1];
        Ok(HostTensor {
            dtype,
            shape: &e.shape,
            data,
        })
    }

    /// Like [`get`](Self::get), also rejecting NaN/Inf values: a bit-flipped weight file is
    /// reported instead of producing wrong tokens.
    pub fn get_checked(&self, name: &str, shape: &[usize]) -> Result<HostTensor<'_>, ModelError> {
        let t = self.get(name, shape)?;
        let finite = match t.dtype {
            HostDType::F32 => t
                .data
                .chunks_exact(4)
                .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
            // An f16/bf16 is non-finite when its exponent bits are all ones.
            HostDType::F16 => t
                .data
                .chunks_exact(2)
                .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 != 0x7c00),
            HostDType::BF16 => t
                .data
                .chunks_exact(2)
                .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 != 0x7f80),
        };
        if !finite {
            let shard = &self.shards[self.tensors[name].shard];
            return Err(ModelError::CorruptWeights {
                path: shard.path.clone(),
                reason: format!("tensor {name} contains NaN or infinite values"),
            });
        }
        Ok(t)
    }
}

/// Refuses a header whose `data_offsets` point past the end of the file. safetensors 0.8 checks
/// that too, but only after adding the data section's end to the header size unchecked: offsets
/// near `usize::MAX` overflow there, a panic in debug builds (found by tests/fuzz.rs). Anything
/// this cannot parse is left for safetensors to report.
fn offsets_within(file: &[u8]) -> Result<(), String> {
    let Some(len) = file
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
    else {
        return Ok(());
    };
    let header = usize::try_from(len)
        .ok()
        .and_then(|len| len.checked_add(8))
        .and_then(|end| file.get(8..end));
    let Some(Ok(serde_json::Value::Object(entries))) = header.map(serde_json::from_slice) else {
        return Ok(());
    };
    for (name, entry) in &entries {
        let offsets = entry.get("data_offsets").and_then(|o| o.as_array());
        let past_end = offsets
            .into_iter()
            .flatten()
            .filter_map(|o| o.as_u64())
            .any(|o| o > file.len() as u64);
        if past_end {
            return Err(format!(
                "tensor {name}: data_offsets {} run past the end of the file ({} bytes)",
                entry["data_offsets"],
                file.len()
            ));
        }
    }
    Ok(())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Released pages come back from the file: the bytes read after `release` are the same.
    #[test]
    fn a_released_tensor_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        // Two tensors of several pages each, with distinct contents.
        let a: Vec<f32> = (0..5000).map(|i| i as f32 * 0.25).collect();
        let b: Vec<f32> = (0..3000).map(|i| -(i as f32)).collect();
        let views = [
            (
                "a",
                safetensors::tensor::TensorView::new(
                    Dtype::F32,
                    vec![5000],
                    bytemuck::cast_slice(&a),
                )
                .unwrap(),
            ),
            (
                "b",
                safetensors::tensor::TensorView::new(
                    Dtype::F32,
                    vec![3000],
                    bytemuck::cast_slice(&b),
                )
                .unwrap(),
            ),
        ];
        safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
        let files = WeightFiles::open(dir.path()).unwrap();
        let before = files.get("a", &[5000]).unwrap().data.to_vec();
        files.release("a");
        files.release("missing");
        assert_eq!(files.get("a", &[5000]).unwrap().data, &before[..]);
        assert_eq!(
            files.get("b", &[3000]).unwrap().data,
            bytemuck::cast_slice::<f32, u8>(&b)
        );
    }
}
