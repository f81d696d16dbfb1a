//! The reference implementation: candle-transformers 0.11 on CPU in f32, over the same
//! checkpoint directory the engine reads.
//!
//! candle's models return only the last position's logits, so per-position logits come from
//! feeding the prompt one token at a time through candle's KV cache; the self-check tests show
//! that this agrees with a single full-prompt forward. Dispatch is on config.json's
//! `architectures`: Llama (incl. SmolLM and Llama 3 rope scaling) → `models::llama`, Mistral →
//! `models::mistral`, Qwen2 → `models::qwen2::ModelForCausalLM`, Qwen3 →
//! `models::qwen3::ModelForCausalLM`, Phi-3 → `models::phi3::Model`, Gemma 3 →
//! `models::gemma3::Model`, Gemma 2 → `models::gemma2::Model`, Mixtral → `models::mixtral::Model`, Qwen3-MoE →
//! `models::qwen3_moe::ModelForCausalLM`.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{
    gemma2, gemma3, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe,
};
use std::fmt::Display;
use std::path::{Path, PathBuf};

fn ok<T, E: Display>(r: Result<T, E>, what: impl Display) -> T {
    r.unwrap_or_else(|e| panic!("candle oracle: {what}: {e}"))
}

enum Oracle {
    Llama {
        model: llama::Llama,
        config: llama::Config,
        cache: llama::Cache,
    },
    Mistral(mistral::Model),
    Qwen2(qwen2::ModelForCausalLM),
    Qwen3(qwen3::ModelForCausalLM),
    Phi3(phi3::Model),
    Gemma3(gemma3::Model),
    Gemma2(gemma2::Model),
    Mixtral(mixtral::Model),
    Qwen3Moe(qwen3_moe::ModelForCausalLM),
}

/// The safetensors files of a checkpoint: the index's shards, or `model.safetensors`.
fn weight_files(dir: &Path) -> Vec<PathBuf> {
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return vec![dir.join("model.safetensors")];
    }
    let text = ok(std::fs::read_to_string(&index_path), index_path.display());
    let index: serde_json::Value = ok(serde_json::from_str(&text), index_path.display());
    let map = index["weight_map"]
        .as_object()
        .unwrap_or_else(|| panic!("{}: no weight_map", index_path.display()));
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    files
}

impl Oracle {
    fn load(dir: &Path) -> Self {
        let config_path = dir.join("config.json");
        let text = ok(std::fs::read_to_string(&config_path), config_path.display());
        let config: serde_json::Value = ok(serde_json::from_str(&text), config_path.display());
        let arch = config["architectures"][0].as_str().unwrap_or("<missing>");
        let files = weight_files(dir);
        let device = Device::Cpu;
        // SAFETY: the checkpoint files are written by the test (or are read-only shared models)
        // and nothing modifies them while this VarBuilder maps them.
        let vb = ok(
            unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &device) },
            format!("mmap weights of {}", dir.display()),
        );
        match arch {
            "LlamaForCausalLM" => {
                let raw: llama::LlamaConfig = ok(serde_json::from_value(config), "llama config");
                let config = raw.into_config(false);
                let model = ok(llama::Llama::load(vb, &config), "load llama");
                let cache = ok(
                    llama::Cache::new(true, DType::F32, &config, &device),
                    "llama cache",
                );
                Oracle::Llama {
                    model,
                    config,
                    cache,
                }
            }
            "MistralForCausalLM" => {
                let config: mistral::Config = ok(serde_json::from_value(config), "mistral config");
                Oracle::Mistral(ok(mistral::Model::new(&config, vb), "load mistral"))
            }
            "Qwen2ForCausalLM" => {
                let config: qwen2::Config = ok(serde_json::from_value(config), "qwen2 config");
                Oracle::Qwen2(ok(qwen2::ModelForCausalLM::new(&config, vb), "load qwen2"))
            }
            "Qwen3ForCausalLM" => {
                let config: qwen3::Config = ok(serde_json::from_value(config), "qwen3 config");
                Oracle::Qwen3(ok(qwen3::ModelForCausalLM::new(&config, vb), "load qwen3"))
            }
            "Phi3ForCausalLM" => {
                let config: phi3::Config = ok(serde_json::from_value(config), "phi3 config");
                Oracle::Phi3(ok(phi3::Model::new(&config, vb), "load phi3"))
            }
            "Gemma3ForCausalLM" => {
                let config: gemma3::Config = ok(serde_json::from_value(config), "gemma3 config");
                Oracle::Gemma3(ok(gemma3::Model::new(false, &config, vb), "load gemma3"))
            }
            "Gemma2ForCausalLM" => {
                let config: gemma2::Config = ok(serde_json::from_value(config), "gemma2 config");
                Oracle::Gemma2(ok(gemma2::Model::new(false, &config, vb), "load gemma2"))
            }
            "MixtralForCausalLM" => {
                let config: mixtral::Config = ok(serde_json::from_value(config), "mixtral config");
                Oracle::Mixtral(ok(mixtral::Model::new(&config, vb), "load mixtral"))
            }
            "Qwen3MoeForCausalLM" => {
                let config: qwen3_moe::Config =
                    ok(serde_json::from_value(config), "qwen3_moe config");
                Oracle::Qwen3Moe(ok(
                    qwen3_moe::ModelForCausalLM::new(&config, vb),
                    "load qwen3_moe",
                ))
            }
            other => panic!("candle oracle: unsupported architecture {other:?}"),
        }
    }

    /// Runs `tokens` at positions `pos..pos + tokens.len()` after whatever is cached, and
    /// returns the last position's logits `[vocab]`.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
        let input = ok(Tensor::new(tokens, &Device::Cpu), "input tensor");
        let input = ok(input.unsqueeze(0), "input batch dim");
        let logits = match self {
            Oracle::Llama { model, cache, .. } => model.forward(&input, pos, cache),
            Oracle::Mistral(model) => model.forward(&input, pos),
            Oracle::Qwen2(model) => model.forward(&input, pos),
            Oracle::Qwen3(model) => model.forward(&input, pos),
            Oracle::Phi3(model) => model.forward(&input, pos),
            Oracle::Gemma3(model) => model.forward(&input, pos),
            Oracle::Gemma2(model) => model.forward(&input, pos),
            Oracle::Mixtral(model) => model.forward(&input, pos),
            Oracle::Qwen3Moe(model) => model.forward(&input, pos),
        };
        let logits = ok(logits, "forward");
        let flat = ok(logits.flatten_all(), "flatten logits");
        ok(flat.to_vec1::<f32>(), "logits to vec")
    }

    fn clear_cache(&mut self) {
        match self {
            Oracle::Llama { config, cache, .. } => {
                *cache = ok(
                    llama::Cache::new(true, DType::F32, config, &Device::Cpu),
                    "llama cache",
                );
            }
            Oracle::Mistral(model) => model.clear_kv_cache(),
            Oracle::Qwen2(model) => model.clear_kv_cache(),
            Oracle::Qwen3(model) => model.clear_kv_cache(),
            Oracle::Phi3(model) => model.clear_kv_cache(),
            Oracle::Gemma3(model) => model.clear_kv_cache(),
            Oracle::Gemma2(model) => model.clear_kv_cache(),
            Oracle::Qwen3Moe(model) => model.clear_kv_cache(),
            // No cache-clearing call in candle's Mixtral; callers clear only a fresh model.
            Oracle::Mixtral(_) => {}
        }
    }
}

/// Logits `[tokens.len()][vocab]`: row `i` is the next-token distribution after `tokens[..=i]`.
pub fn candle_logits_all_positions(dir: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut oracle = Oracle::load(dir);
    tokens
        .iter()
        .enumerate()
        .map(|(pos, &t)| oracle.forward(&[t], pos))
        .collect()
}

/// Logits `[vocab]` after the whole of `tokens`, from one full-prompt forward (causal mask).
pub fn candle_logits_last(dir: &Path, tokens: &[u32]) -> Vec<f32> {
    assert!(!tokens.is_empty(), "candle_logits_last needs a token");
    let mut oracle = Oracle::load(dir);
    oracle.clear_cache();
    oracle.forward(tokens, 0)
}

/// Greedy continuation of `prompt` by `n` tokens (ties → lowest id). Does not stop at EOS:
/// callers compare fixed-length continuations.
pub fn candle_greedy(dir: &Path, prompt: &[u32], n: usize) -> Vec<u32> {
    candle_greedy_with_margins(dir, prompt, n).0
}

/// As [`candle_greedy`], also returning each step's top-1 minus top-2 logit: where that margin is
/// below a tolerance, two correct implementations may legitimately pick different tokens.
pub fn candle_greedy_with_margins(dir: &Path, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    assert!(!prompt.is_empty(), "candle_greedy needs a non-empty prompt");
    let mut oracle = Oracle::load(dir);
    let mut logits = if matches!(oracle, Oracle::Gemma3(_)) {
        // candle 0.11's gemma3 cannot append a multi-token prompt to its KV cache (its keys
        // are not contiguous after the rotary embedding): feed it one token at a time.
        let mut last = Vec::new();
        for (pos, &t) in prompt.iter().enumerate() {
            last = oracle.forward(&[t], pos);
        }
        last
    } else {
        oracle.forward(prompt, 0)
    };
    let (mut out, mut margins) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for step in 0..n {
        let next = argmax(&logits);
        out.push(next);
        margins.push(top1_margin(&logits));
        if step + 1 < n {
            logits = oracle.forward(&[next], prompt.len() + step);
        }
    }
    (out, margins)
}

/// A prompt of `len` tokens (BOS, then ordinary ids, as [`random_prompt`] draws them from
/// seeds 0, 1, 2, ...) whose `n`-token candle greedy continuation has every top-1 margin at least
/// `min_margin`, so an engine agreeing with candle to within `min_margin / 2` must reproduce it
/// exactly. Panics after 32 seeds.
///
/// [`random_prompt`]: super::random_prompt
pub fn clear_margin_prompt(dir: &Path, len: usize, n: usize, min_margin: f32) -> Vec<u32> {
    let vocab = config_vocab(dir);
    for seed in 0..32 {
        let prompt = super::random_prompt(vocab, len, seed);
        let (_, margins) = candle_greedy_with_margins(dir, &prompt, n);
        if margins.iter().all(|&m| m >= min_margin) {
            return prompt;
        }
    }
    panic!(
        "no prompt among 32 seeds keeps every greedy margin >= {min_margin} in {}",
        dir.display()
    )
}

fn config_vocab(dir: &Path) -> usize {
    let path = dir.join("config.json");
    let text = ok(std::fs::read_to_string(&path), path.display());
    let config: serde_json::Value = ok(serde_json::from_str(&text), path.display());
    config["vocab_size"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: no vocab_size", path.display())) as usize
}

/// Index of the largest value; the lowest index among equals. NaN wins only if all are NaN.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Largest value minus the second largest (0 when fewer than two values).
pub fn top1_margin(logits: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in logits {
        if v > first {
            second = first;
            first = v;
        } else if v > second {
            second = v;
        }
    }
    if second.is_finite() {
        first - second
    } else {
        0.0
    }
}

/// max |a[i] - b[i]|; panics on length mismatch, and NaN anywhere gives NaN (so `<= tol` fails).
/// Asserts that two sets of per-position logits agree within 1e-3 everywhere (naming the
/// first position that does not) and prints the largest difference.
pub fn assert_logits_match(ours: &[Vec<f32>], theirs: &[Vec<f32>], label: &str) {
    assert_eq!(ours.len(), theirs.len(), "{label}: positions");
    let mut worst = 0f32;
    for (p, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d <= 1e-3, "{label}: position {p}: max |diff| {d}");
        worst = worst.max(d);
    }
    eprintln!(
        "{label}: max |logit diff| over {} positions: {worst:e}",
        ours.len()
    );
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "max_abs_diff: lengths differ");
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(d)
        }
    })
}
