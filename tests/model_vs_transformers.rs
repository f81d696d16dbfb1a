//! Model correctness against Hugging Face transformers (PyTorch, f32, CPU; `tests/hf_reference.py`)
//! where candle-transformers cannot be the reference: Phi-3's LongRoPE (candle's phi3 multiplies
//! the frequencies by the factors where transformers divides, and drops the attention factor).
//! Logits at every prompt position within 1e-3 and 64 greedy tokens identical, as against candle.
//!
//! And the config layout transformers 5 writes: every architecture's generated checkpoint, its
//! `config.json` re-saved by transformers (`rope_parameters`, per layer type for Gemma 3), gives
//! bit-identical logits.
//!
//! Needs `python3` with torch and transformers (`.ci/run` installs them); without them a test
//! skips on a developer's machine and fails under `CI`.
mod common;

use common::{Arch, TinyModelSpec};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};

fn python_has_transformers() -> bool {
    common::python_imports(
        &["torch", "transformers"],
        "python3 -m pip install torch transformers",
    )
}

/// One request to `tests/hf_reference.py` and its answer.
fn hf(req: serde_json::Value) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf_reference.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    serde_json::to_writer(child.stdin.take().unwrap(), &req).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "hf_reference.py failed on {req}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// transformers' logits at every position of `prompt` and its `n` greedy tokens.
fn transformers_reference(dir: &Path, prompt: &[u32], n: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let v = hf(json!({"model": dir, "prompt": prompt, "new_tokens": n}));
    let logits = serde_json::from_value(v["logits"].clone()).unwrap();
    let greedy = serde_json::from_value(v["greedy"].clone()).unwrap();
    (logits, greedy)
}

/// A generated Phi-3 model with LongRoPE over `original` pretraining positions grown to 512
/// (`common::set_longrope`), optionally with a partial rotary factor.
fn phi3_longrope(dir: &Path, original: usize, partial: Option<f64>) -> TinyModelSpec {
    let spec = TinyModelSpec::new(Arch::Phi3);
    assert_eq!(spec.max_pos, 512);
    common::write_tiny_model(dir, &spec);
    common::set_longrope(dir, &spec, original, partial);
    spec
}

/// Compares logits at every prompt position and 64 greedy tokens, with the engine's context
/// at `max_model_len` (which picks LongRoPE's factors).
fn check(dir: &Path, prompt: &[u32], max_model_len: usize, label: &str) {
    let n = 64;
    let (theirs, their_tokens) = transformers_reference(dir, prompt, n);
    let ours = common::llmd_logits_all_positions(dir, prompt, max_model_len);
    common::assert_logits_match(&ours, &theirs, label);
    let ours = common::llmd_greedy(dir, prompt, n, max_model_len);
    assert_eq!(ours, their_tokens, "{label}: greedy continuation differs");
}

/// Within the original context: the short factors, and transformers' attention factor.
#[test]
fn phi3_longrope_short_factors_match_transformers() {
    if !python_has_transformers() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = phi3_longrope(dir.path(), 160, None);
    let prompt = common::random_prompt(spec.vocab, 70, spec.seed);
    // 70 + 64 tokens stay inside the 160 original positions, as does the engine's context.
    check(dir.path(), &prompt, 160, "phi3 longrope short");
}

/// Past the original context (a 70-token prompt over 48 original positions, and an engine
/// whose context exceeds them): the long factors for every position, with partial rotary
/// (Phi-4-mini's 0.75).
#[test]
fn phi4_longrope_long_factors_partial_rotary_match_transformers() {
    if !python_has_transformers() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = phi3_longrope(dir.path(), 48, Some(0.75));
    let prompt = common::random_prompt(spec.vocab, 70, spec.seed + 1);
    check(
        dir.path(),
        &prompt,
        256,
        "phi4 longrope long, partial rotary",
    );
}

/// transformers 5 re-saves each architecture's config in its own layout (RoPE settings under
/// `rope_parameters`, Gemma 3's per layer type); llmd reads it to bit-identical logits.
#[test]
fn configs_resaved_by_transformers_5_give_identical_logits() {
    if !python_has_transformers() {
        return;
    }
    for arch in Arch::ALL {
        let old = tempfile::tempdir().unwrap();
        let mut spec = TinyModelSpec::new(arch);
        if arch == Arch::Gemma3 {
            // Gemma 3's long-context checkpoints scale the global layers' RoPE.
            spec.layers = 6;
        }
        common::write_tiny_model(old.path(), &spec);
        let new = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(old.path()).unwrap() {
            let p = entry.unwrap().path();
            if p.file_name().unwrap() != "config.json" {
                std::fs::copy(&p, new.path().join(p.file_name().unwrap())).unwrap();
            }
        }
        let v = hf(json!({"resave_config": old.path(), "to": new.path()}));
        let cfg = &v["config"];
        assert!(
            cfg.get("rope_parameters").is_some() && cfg.get("rope_theta").is_none(),
            "{arch:?}: transformers wrote {cfg}"
        );
        let prompt = common::random_prompt(spec.vocab, 40, spec.seed);
        let a = common::llmd_logits_all_positions(old.path(), &prompt, 64);
        let b = common::llmd_logits_all_positions(new.path(), &prompt, 64);
        assert!(
            a == b,
            "{arch:?}: logits differ after transformers re-saved {cfg}"
        );
    }
}

/// Sliding windows shorter than the prompt, where candle cannot be the reference (its Mistral
/// and Gemma 2 apply the window only inside one forward): Mistral and Mixtral (every layer),
/// Gemma 2 and Gemma 3 (alternating with global layers), against transformers' logits over the
/// prompt and its greedy decoding past the window.
#[test]
fn sliding_windows_shorter_than_the_prompt_match_transformers() {
    if !python_has_transformers() {
        return;
    }
    for (arch, window) in [
        (Arch::Mistral, 24),
        (Arch::Mixtral, 40),
        (Arch::Gemma2, 16),
        (Arch::Gemma3, 20),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyModelSpec::new(arch);
        common::write_tiny_model(dir.path(), &spec);
        common::edit_config(dir.path(), |cfg| cfg["sliding_window"] = json!(window));
        let prompt = common::random_prompt(spec.vocab, 70, spec.seed + 2);
        check(
            dir.path(),
            &prompt,
            prompt.len() + 64,
            &format!("{arch:?} window {window}"),
        );
    }
}
