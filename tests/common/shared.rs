//! Finding the shared real models (`../shared/models`). Included by the integration tests
//! (through `common`) and by the library's unit tests (`#[path]`), so every test looks in the
//! same place.
//!
//! A test without its model skips with a message on a developer's machine, but **fails** where
//! `CI` is set: CI always has `../shared/models`, so a missing model there is a broken set-up,
//! never a reason for a green run.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The directory of shared real models: `$LLMD_SHARED_MODELS` when set, else `shared/models` in
/// the nearest ancestor of the repository's parent that has one — `../shared/models` for the
/// main checkout and for CI (which clones shared/ beside the repository), and the same folder
/// for git worktrees nested one level deeper.
pub fn shared_models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LLMD_SHARED_MODELS") {
        return PathBuf::from(dir);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let default = manifest.join("../shared/models");
    manifest
        .ancestors()
        .skip(1)
        .map(|a| a.join("shared/models"))
        .find(|d| d.is_dir())
        .unwrap_or(default)
}

/// `shared/models/NAME` if it is complete (`config.json` present and either
/// `model.safetensors` or every shard named in `model.safetensors.index.json`), else why not.
pub fn find_shared_model(name: &str) -> Result<PathBuf, String> {
    let dir = shared_models_dir().join(name);
    match missing_parts(&dir) {
        None => Ok(dir),
        Some(why) => Err(format!(
            "model {name} incomplete/absent ({why}) at {}",
            dir.display()
        )),
    }
}

/// Every model `name` in `$LLMD_GPU_MODELS` (comma-separated; default: all shared models),
/// each required: a GPU test never drops a model or falls back to a smaller one silently —
/// a run without SmolLM2 says so by setting `LLMD_GPU_MODELS=stories260K`.
pub fn gpu_models() -> Vec<(String, PathBuf)> {
    let list = std::env::var("LLMD_GPU_MODELS")
        .unwrap_or_else(|_| "stories260K,smollm2-135m-instruct".to_string());
    list.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|name| match find_shared_model(name) {
            Ok(dir) => (name.to_string(), dir),
            Err(why) => panic!("{why}: required by LLMD_GPU_MODELS={list}"),
        })
        .collect()
}

/// The complete shared model `name`; `None` (the caller skips) when it is not there, which is
/// a failure under `CI`. Tests never download.
pub fn shared_model(name: &str) -> Option<PathBuf> {
    shared_model_or_fail(name, std::env::var_os("CI").is_some())
}

/// [`shared_model`] with the CI switch given: `in_ci` turns a missing model into a panic.
pub fn shared_model_or_fail(name: &str, in_ci: bool) -> Option<PathBuf> {
    match find_shared_model(name) {
        Ok(dir) => Some(dir),
        Err(why) if in_ci => {
            panic!("{why}: CI must have every shared model, so this test cannot skip")
        }
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// Why `dir` is not a complete checkpoint, or `None` when it is.
fn missing_parts(dir: &Path) -> Option<String> {
    if !dir.join("config.json").is_file() {
        return Some("no config.json".to_string());
    }
    if dir.join("model.safetensors").is_file() {
        return None;
    }
    let index_path = dir.join("model.safetensors.index.json");
    let Ok(text) = std::fs::read_to_string(&index_path) else {
        return Some("neither model.safetensors nor model.safetensors.index.json".to_string());
    };
    let Ok(index) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Some("model.safetensors.index.json is not JSON".to_string());
    };
    let Some(map) = index["weight_map"].as_object() else {
        return Some("index has no weight_map".to_string());
    };
    let mut absent: Vec<&str> = map
        .values()
        .filter_map(|f| f.as_str())
        .filter(|f| !dir.join(f).is_file())
        .collect();
    absent.sort_unstable();
    absent.dedup();
    if absent.is_empty() {
        None
    } else {
        Some(format!("missing shard(s) {}", absent.join(", ")))
    }
}
