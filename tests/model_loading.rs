//! Loading checkpoints: every on-disk dtype and layout loads; every kind of broken checkpoint is
//! a typed error naming what is wrong, never a panic.
mod common;

use common::{Arch, DType, TinyModelSpec};
use llmd::model::ModelError;
use llmd::{EngineConfig, EngineCore, Error};
use std::path::Path;

fn load(dir: &Path) -> Result<EngineCore, Error> {
    let mut c = EngineConfig::new(dir);
    c.cache.num_blocks = Some(64);
    EngineCore::new(c)
}

fn model_err(dir: &Path) -> ModelError {
    match load(dir) {
        Err(Error::Model(e)) => e,
        Err(other) => panic!("expected a model error, got {other}"),
        Ok(_) => panic!("a broken checkpoint loaded"),
    }
}

fn tiny(dir: &Path) -> TinyModelSpec {
    let spec = TinyModelSpec::new(Arch::Llama);
    common::write_tiny_model(dir, &spec);
    spec
}

#[test]
fn every_dtype_and_layout_loads() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for sharded in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut spec = TinyModelSpec::new(Arch::Llama);
            spec.dtype = dtype;
            spec.sharded = sharded;
            common::write_tiny_model(dir.path(), &spec);
            assert!(load(dir.path()).is_ok(), "{dtype:?} sharded={sharded}");
        }
    }
}

#[test]
fn truncated_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let file = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    common::truncate_file(&file, len - 100);
    match model_err(dir.path()) {
        ModelError::CorruptWeights { path, .. } => assert_eq!(path, file),
        e => panic!("{e}"),
    }
}

#[test]
fn corrupt_header_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    common::corrupt_header(&dir.path().join("model.safetensors"));
    assert!(matches!(
        model_err(dir.path()),
        ModelError::CorruptWeights { .. }
    ));
}

#[test]
fn nan_weights_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    // Overwrite the last 4 bytes (part of some tensor's f32 data) with a NaN.
    let file = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&file, bytes).unwrap();
    match model_err(dir.path()) {
        ModelError::CorruptWeights { reason, .. } => assert!(reason.contains("NaN"), "{reason}"),
        e => panic!("{e}"),
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyModelSpec::new(Arch::Llama);
    let name = "model.layers.1.mlp.up_proj.weight";
    common::write_model_without_tensor(dir.path(), &spec, name);
    match model_err(dir.path()) {
        ModelError::MissingTensor { name: n } => assert_eq!(n, name),
        e => panic!("{e}"),
    }
}

#[test]
fn wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyModelSpec::new(Arch::Llama);
    let name = "model.layers.0.self_attn.k_proj.weight";
    common::write_model_with_wrong_shape(dir.path(), &spec, name);
    match model_err(dir.path()) {
        ModelError::TensorShape { name: n, .. } => assert_eq!(n, name),
        e => panic!("{e}"),
    }
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("LlamaForCausalLM", "FalconForCausalLM")).unwrap();
    match model_err(dir.path()) {
        ModelError::UnknownArchitecture { architectures, .. } => {
            assert_eq!(architectures, vec!["FalconForCausalLM".to_string()])
        }
        e => panic!("{e}"),
    }
}

#[test]
fn missing_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(matches!(
        model_err(dir.path()),
        ModelError::MissingWeights { .. }
    ));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(matches!(model_err(dir.path()), ModelError::Io { .. }));
}

#[test]
fn missing_shard_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = TinyModelSpec::new(Arch::Llama);
    spec.sharded = true;
    common::write_tiny_model(dir.path(), &spec);
    let shard = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".safetensors"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    match model_err(dir.path()) {
        ModelError::Io { path, .. } => assert_eq!(path, shard),
        e => panic!("{e}"),
    }
}

#[test]
fn max_model_len_beyond_the_model_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let spec = tiny(dir.path());
    let mut c = EngineConfig::new(dir.path());
    c.max_model_len = Some(spec.max_pos + 1);
    assert!(matches!(
        EngineCore::new(c),
        Err(Error::Config {
            field: "max_model_len",
            ..
        })
    ));
}
