//! Writes tiny random-weight checkpoints in Hugging Face layout: config.json,
//! generation_config.json, tokenizer files, and weights as one `model.safetensors` or as shards
//! with `model.safetensors.index.json`.
//!
//! Weight scales (tuned by measuring greedy runs, see the constants) make the models behave like
//! small trained ones for testing purposes: logits spread with a standard deviation of about 4
//! (greedy top-1 margins are usually 1e-2 or more, far above f32 noise), attention scores of
//! order 1, norm weights 1 ± 0.1, varied greedy continuations. Special tokens' output rows are
//! damped so greedy decoding practically never emits BOS/EOS, which would end an engine's
//! generation early.

use super::{
    tiny_tokenizer, Arch, DType, TinyModelSpec, BOS_ID, EOS_ID, EOT_ID, FIRST_ORDINARY_ID,
};
use safetensors::tensor::TensorView;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Standard deviation of each logit (before the final norm's weight) on a unit-RMS hidden
/// state: output rows are N(0, LOGIT_GAIN² / hidden). Sets the typical greedy top-1 margin.
const LOGIT_GAIN: f32 = 4.0;
/// q and k projection gain; with it the scaled attention scores have a std of about 1.4, so
/// attention mixes several positions and RoPE visibly matters.
const QK_GAIN: f32 = 1.2;
/// Gain of the v, gate and up projections.
const PROJ_GAIN: f32 = 1.0;
/// Gain of the projections writing into the residual stream (o, down). Large on purpose: with
/// tied embeddings a residual stream dominated by the input token's own embedding makes the
/// model repeat that token forever; layer outputs that dominate it give varied continuations.
const OUT_GAIN: f32 = 6.0;
/// Std of the Qwen2 q/k/v biases: large enough that a loader dropping them changes logits by
/// far more than the comparison tolerance, small enough not to collapse attention onto fixed
/// offsets (bias terms rotated by RoPE act as a position-only score).
const BIAS_STD: f32 = 0.15;
/// Router gain of MoE layers: logits of std ~1.5 over the experts.
const ROUTER_GAIN: f32 = 1.5;
/// Factor on the output rows of special tokens (ids below `FIRST_ORDINARY_ID`).
const SPECIAL_ROW_DAMPING: f32 = 0.05;
/// Shards written when `spec.sharded`.
const SHARD_COUNT: usize = 3;

/// One tensor as written, with its values as stored (after the dtype's rounding) widened to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub name: String,
    pub shape: Vec<usize>,
    /// Row-major, `shape.iter().product()` values.
    pub values: Vec<f32>,
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// N(0, gain² / fan_in), fan_in = last dim.
    Matrix { gain: f32 },
    /// Embedding or output projection `[vocab, hidden]`: N(0, LOGIT_GAIN² / hidden), special
    /// rows damped.
    TokenRows,
    /// N(0, BIAS_STD²).
    Bias,
    /// 1 + N(0, 0.1²).
    Norm,
    /// `mean` + N(0, 0.1²): Gemma stores RMSNorm weights as offsets from 1 (the model
    /// multiplies by `1 + w`).
    NormOffset { mean: f32 },
}

/// What a writer changes relative to the faithful checkpoint, for bad-input tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Damage<'a> {
    None,
    DropTensor(&'a str),
    /// First dimension one larger than it should be.
    GrowTensor(&'a str),
}

struct TensorDef {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// Tensors in the order transformers' state dict lists them.
fn tensor_defs(spec: &TinyModelSpec) -> Vec<TensorDef> {
    spec.validate();
    let (h, hd, i) = (spec.hidden, spec.head_dim(), spec.intermediate);
    let (q_out, kv_out) = (spec.heads * hd, spec.kv_heads * hd);
    let def = |name: String, shape: Vec<usize>, init: Init| TensorDef { name, shape, init };
    let qk = Init::Matrix { gain: QK_GAIN };
    let proj = Init::Matrix { gain: PROJ_GAIN };
    let out = Init::Matrix { gain: OUT_GAIN };
    // Router logits of order 1-2: routing varies from token to token, with clear winners.
    let router = Init::Matrix { gain: ROUTER_GAIN };
    // Gemma multiplies by 1 + w: weights near 0 give unit norms; its sandwich norms scale the
    // attention and MLP outputs up so that they are not drowned by the √hidden-scaled embedding.
    let gemma = spec.arch.sandwich_norms();
    let norm = if gemma {
        Init::NormOffset { mean: 0.0 }
    } else {
        Init::Norm
    };
    let loud_norm = if gemma {
        Init::NormOffset { mean: 12.0 }
    } else {
        Init::Norm
    };

    let mut defs = vec![def(
        "model.embed_tokens.weight".into(),
        vec![spec.vocab, h],
        Init::TokenRows,
    )];
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        let attn = [("q", q_out, qk), ("k", kv_out, qk), ("v", kv_out, proj)];
        if spec.arch.fused_projections() {
            defs.push(def(
                format!("{p}.self_attn.qkv_proj.weight"),
                vec![q_out + 2 * kv_out, h],
                qk,
            ));
        }
        for (which, out, init) in attn.into_iter().filter(|_| !spec.arch.fused_projections()) {
            defs.push(def(
                format!("{p}.self_attn.{which}_proj.weight"),
                vec![out, h],
                init,
            ));
            if spec.arch.qkv_bias() {
                defs.push(def(
                    format!("{p}.self_attn.{which}_proj.bias"),
                    vec![out],
                    Init::Bias,
                ));
            }
        }
        if spec.arch.qk_norm() {
            for which in ["q", "k"] {
                defs.push(def(
                    format!("{p}.self_attn.{which}_norm.weight"),
                    vec![spec.head_dim()],
                    norm,
                ));
            }
        }
        defs.push(def(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q_out],
            out,
        ));
        if spec.arch == Arch::Mixtral {
            let m = format!("{p}.block_sparse_moe");
            defs.push(def(
                format!("{m}.gate.weight"),
                vec![spec.experts, h],
                router,
            ));
            for e in 0..spec.experts {
                let x = format!("{m}.experts.{e}");
                defs.push(def(format!("{x}.w1.weight"), vec![i, h], proj));
                defs.push(def(format!("{x}.w2.weight"), vec![h, i], out));
                defs.push(def(format!("{x}.w3.weight"), vec![i, h], proj));
            }
        } else if spec.arch.moe_layer(l) {
            let mi = spec.moe_intermediate;
            defs.push(def(
                format!("{p}.mlp.gate.weight"),
                vec![spec.experts, h],
                router,
            ));
            for e in 0..spec.experts {
                let x = format!("{p}.mlp.experts.{e}");
                defs.push(def(format!("{x}.gate_proj.weight"), vec![mi, h], proj));
                defs.push(def(format!("{x}.up_proj.weight"), vec![mi, h], proj));
                defs.push(def(format!("{x}.down_proj.weight"), vec![h, mi], out));
            }
        } else if spec.arch.fused_projections() {
            defs.push(def(
                format!("{p}.mlp.gate_up_proj.weight"),
                vec![2 * i, h],
                proj,
            ));
        } else {
            defs.push(def(format!("{p}.mlp.gate_proj.weight"), vec![i, h], proj));
            defs.push(def(format!("{p}.mlp.up_proj.weight"), vec![i, h], proj));
        }
        if !spec.arch.moe_layer(l) && spec.arch != Arch::Mixtral {
            defs.push(def(format!("{p}.mlp.down_proj.weight"), vec![h, i], out));
        }
        defs.push(def(format!("{p}.input_layernorm.weight"), vec![h], norm));
        defs.push(def(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            loud_norm,
        ));
        if gemma {
            defs.push(def(
                format!("{p}.pre_feedforward_layernorm.weight"),
                vec![h],
                norm,
            ));
            defs.push(def(
                format!("{p}.post_feedforward_layernorm.weight"),
                vec![h],
                loud_norm,
            ));
        }
    }
    defs.push(def("model.norm.weight".into(), vec![h], norm));
    if !spec.arch.tie_word_embeddings() {
        defs.push(def(
            "lm_head.weight".into(),
            vec![spec.vocab, h],
            Init::TokenRows,
        ));
    }
    defs
}

/// Names of every tensor a faithful checkpoint for `spec` holds, in state-dict order.
pub fn tensor_names(spec: &TinyModelSpec) -> Vec<String> {
    tensor_defs(spec).into_iter().map(|d| d.name).collect()
}

/// SplitMix64: tiny, fast and fully specified, so weights never change with a crate upgrade.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal by Box–Muller (one of the pair is discarded: simplicity over speed).
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.next_unit(), self.next_unit());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// Per-tensor stream: FNV-1a of the name mixed with the spec seed, so a tensor's values do not
/// depend on which other tensors exist or in what order they are drawn.
fn rng_for(seed: u64, name: &str) -> SplitMix64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    SplitMix64(h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn draw(seed: u64, def: &TensorDef, shape: &[usize]) -> Vec<f32> {
    let mut rng = rng_for(seed, &def.name);
    let n: usize = shape.iter().product();
    let fan_in = *shape.last().unwrap_or(&1) as f32;
    match def.init {
        Init::Matrix { gain } => {
            let std = gain / fan_in.sqrt();
            (0..n).map(|_| rng.normal() * std).collect()
        }
        Init::TokenRows => {
            let std = LOGIT_GAIN / fan_in.sqrt();
            let row_len = shape.last().copied().unwrap_or(1);
            (0..n)
                .map(|k| {
                    let special = k / row_len < FIRST_ORDINARY_ID as usize;
                    let damp = if special { SPECIAL_ROW_DAMPING } else { 1.0 };
                    rng.normal() * std * damp
                })
                .collect()
        }
        Init::Bias => (0..n).map(|_| rng.normal() * BIAS_STD).collect(),
        Init::Norm => (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect(),
        Init::NormOffset { mean } => (0..n).map(|_| mean + 0.1 * rng.normal()).collect(),
    }
}

/// Rounds to the storage dtype; returns (little-endian bytes, stored values widened to f32).
fn encode(values: &[f32], dtype: DType) -> (Vec<u8>, Vec<f32>) {
    match dtype {
        DType::F32 => (
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            values.to_vec(),
        ),
        DType::BF16 => {
            let h: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        }
        DType::F16 => {
            let h: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        }
    }
}

fn st_dtype(dtype: DType) -> safetensors::Dtype {
    match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
    }
}

/// Every tensor of the faithful checkpoint with the values as stored on disk in `spec.dtype`,
/// so weight-loading tests can compare exactly.
pub fn tiny_model_weights(spec: &TinyModelSpec) -> Vec<TensorData> {
    tensor_defs(spec)
        .into_iter()
        .map(|def| {
            let values = encode(&draw(spec.seed, &def, &def.shape), spec.dtype).1;
            TensorData {
                name: def.name,
                shape: def.shape,
                values,
            }
        })
        .collect()
}

/// Writes a complete checkpoint directory for `spec` into `dir` (created if needed).
pub fn write_tiny_model(dir: &Path, spec: &TinyModelSpec) {
    write_with_damage(dir, spec, Damage::None);
}

/// Gives the Phi-3 checkpoint written in `dir` for `spec` LongRoPE over `original` pretraining
/// positions (its `max_position_embeddings` stays `spec.max_pos`), with distinct short and long
/// factors large enough to change every logit, and optionally a partial rotary factor
/// (Phi-4-mini). Its pad id moves inside the tiny vocabulary: transformers refuses Phi3Config's
/// default (32000) there.
pub fn set_longrope(dir: &Path, spec: &TinyModelSpec, original: usize, partial: Option<f64>) {
    let pairs = (spec.head_dim() as f64 * partial.unwrap_or(1.0)) as usize / 2;
    let (short, long): (Vec<f64>, Vec<f64>) = (0..pairs)
        .map(|i| (1.0 + 0.5 * i as f64, 2.0 + 3.0 * i as f64))
        .unzip();
    edit_config(dir, |cfg| {
        cfg["pad_token_id"] = serde_json::json!(0);
        cfg["original_max_position_embeddings"] = serde_json::json!(original);
        cfg["rope_scaling"] =
            serde_json::json!({"type": "longrope", "short_factor": short, "long_factor": long});
        if let Some(f) = partial {
            cfg["partial_rotary_factor"] = serde_json::json!(f);
        }
    });
}

/// Rewrites the `config.json` in `dir` after `edit` changes it (a variant of a written model:
/// a sliding window, RoPE scaling, ...).
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
}

/// A fresh temporary directory holding the checkpoint for `spec`; deleted on drop.
pub fn tiny_model_dir(spec: &TinyModelSpec) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("create temp dir for tiny model");
    write_tiny_model(dir.path(), spec);
    dir
}

/// `len` token ids: BOS, then ordinary (non-special) ids drawn from `seed`.
pub fn random_prompt(vocab: usize, len: usize, seed: u64) -> Vec<u32> {
    assert!(
        vocab > FIRST_ORDINARY_ID as usize,
        "vocab {vocab} has no ordinary ids"
    );
    let mut rng = rng_for(seed, "prompt");
    let ordinary = vocab as u64 - u64::from(FIRST_ORDINARY_ID);
    std::iter::once(BOS_ID)
        .chain((1..len).map(|_| FIRST_ORDINARY_ID + (rng.next_u64() % ordinary) as u32))
        .take(len)
        .collect()
}

pub(super) fn write_with_damage(dir: &Path, spec: &TinyModelSpec, damage: Damage) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut found = false;
    for def in tensor_defs(spec) {
        let mut shape = def.shape.clone();
        match damage {
            Damage::DropTensor(n) if n == def.name => {
                found = true;
                continue;
            }
            Damage::GrowTensor(n) if n == def.name => {
                found = true;
                shape[0] += 1;
            }
            _ => {}
        }
        let bytes = encode(&draw(spec.seed, &def, &shape), spec.dtype).0;
        tensors.push((def.name, shape, bytes));
    }
    if let Damage::DropTensor(n) | Damage::GrowTensor(n) = damage {
        assert!(found, "no tensor named {n:?} in a {:?} model", spec.arch);
    }
    write_weights(dir, spec.dtype, &tensors, spec.sharded);
    write_json(&dir.join("config.json"), &config_json(spec));
    write_json(
        &dir.join("generation_config.json"),
        &generation_config_json(spec),
    );
    tiny_tokenizer::write_tokenizer_files(dir, spec);
}

fn write_weights(
    dir: &Path,
    dtype: DType,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    sharded: bool,
) {
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let serialize_to = |file: &str, part: &[(String, Vec<usize>, Vec<u8>)]| {
        let views = part.iter().map(|(name, shape, bytes)| {
            let view = TensorView::new(st_dtype(dtype), shape.clone(), bytes)
                .unwrap_or_else(|e| panic!("tensor view {name}: {e}"));
            (name.clone(), view)
        });
        let buf = safetensors::serialize(views, metadata.clone())
            .unwrap_or_else(|e| panic!("serialize {file}: {e}"));
        std::fs::write(dir.join(file), buf).unwrap_or_else(|e| panic!("write {file}: {e}"));
    };
    if !sharded {
        serialize_to("model.safetensors", tensors);
        return;
    }
    // Contiguous runs in state-dict order, as transformers' size-based splitting produces;
    // with small layer counts a layer's tensors straddle two shards, which loaders must handle.
    let per_shard = tensors.len().div_ceil(SHARD_COUNT);
    let chunks: Vec<_> = tensors.chunks(per_shard).collect();
    let mut weight_map = BTreeMap::new();
    for (k, chunk) in chunks.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, chunks.len());
        serialize_to(&file, chunk);
        for (name, _, _) in chunk.iter() {
            weight_map.insert(name.clone(), json!(file));
        }
    }
    let total_size: usize = tensors.iter().map(|(_, _, b)| b.len()).sum();
    let index = json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
    write_json(&dir.join("model.safetensors.index.json"), &index);
}

pub(super) fn write_json(path: &Path, value: &serde_json::Value) {
    let text = serde_json::to_string_pretty(value).expect("serialize JSON");
    std::fs::write(path, text + "\n").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn eos_json(arch: Arch) -> serde_json::Value {
    match arch {
        Arch::Llama3 => json!([EOS_ID, EOT_ID]),
        _ => json!(EOS_ID),
    }
}

/// config.json with the keys transformers' `to_json_file` writes for the architecture
/// (serde_json sorts keys, as transformers does).
fn config_json(spec: &TinyModelSpec) -> serde_json::Value {
    let arch = spec.arch;
    let mut c = json!({
        "architectures": [arch.hf_architecture()],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": eos_json(arch),
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": spec.max_pos,
        "model_type": arch.model_type(),
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": spec.rms_norm_eps(),
        "rope_theta": spec.rope_theta(),
        "tie_word_embeddings": arch.tie_word_embeddings(),
        "torch_dtype": spec.dtype.torch_name(),
        "transformers_version": "4.46.2",
        "use_cache": true,
        "vocab_size": spec.vocab,
    });
    let extra = match arch {
        Arch::Llama | Arch::Llama3 | Arch::SmolLm => json!({
            "attention_bias": false,
            "head_dim": spec.head_dim(),
            "mlp_bias": false,
            "pretraining_tp": 1,
            "rope_scaling": if arch == Arch::Llama3 {
                // original_max_position_embeddings 64 puts the scaling's three bands (kept,
                // smoothed, divided by `factor`) all inside head_dim 16's frequencies.
                json!({
                    "factor": 8.0,
                    "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 64,
                    "rope_type": "llama3"
                })
            } else {
                serde_json::Value::Null
            },
        }),
        Arch::Mistral => json!({ "head_dim": spec.head_dim(), "sliding_window": null }),
        Arch::Gemma3 => json!({
            "attention_bias": false,
            "attn_logit_softcapping": null,
            "final_logit_softcapping": null,
            "head_dim": spec.head_dim(),
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": spec.head_dim(),
            "rope_local_base_freq": 10_000.0,
            "rope_scaling": null,
            // Longer than the test prompts: the sliding layers differ by their RoPE base here.
            "sliding_window": 512,
            "sliding_window_pattern": 2,
        }),
        Arch::Gemma2 => json!({
            "attention_bias": false,
            // Caps that bite: the tiny model's scores (std ~1.4) and logits (std ~4) reach them.
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 5.0,
            "head_dim": spec.head_dim(),
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": spec.head_dim(),
            // Longer than the test prompts (candle's Gemma 2 has no window on cached positions).
            "sliding_window": 512,
        }),
        Arch::Phi3 => json!({
            "attention_bias": false,
            "embd_pdrop": 0.0,
            "original_max_position_embeddings": spec.max_pos,
            "resid_pdrop": 0.0,
            "rope_scaling": null,
            "sliding_window": null,
        }),
        Arch::Qwen3 => json!({
            "attention_bias": false,
            "head_dim": spec.head_dim(),
            "max_window_layers": spec.layers,
            "rope_scaling": null,
            "sliding_window": null,
            "use_sliding_window": false,
        }),
        Arch::Mixtral => json!({
            "head_dim": spec.head_dim(),
            "num_experts_per_tok": spec.top_k,
            "num_local_experts": spec.experts,
            "output_router_logits": false,
            "router_aux_loss_coef": 0.02,
            "router_jitter_noise": 0.0,
            // Longer than the test prompts (candle's Mixtral needs a number here).
            "sliding_window": 4096,
            "use_flash_attn": false,
        }),
        Arch::Qwen3Moe => json!({
            "attention_bias": false,
            "decoder_sparse_step": 2,
            "head_dim": spec.head_dim(),
            "max_window_layers": spec.layers,
            "mlp_only_layers": [],
            "moe_intermediate_size": spec.moe_intermediate,
            "norm_topk_prob": true,
            "num_experts": spec.experts,
            "num_experts_per_tok": spec.top_k,
            "output_router_logits": false,
            "rope_scaling": null,
            "router_aux_loss_coef": 0.001,
            "sliding_window": null,
            "use_sliding_window": false,
        }),
        Arch::Qwen2 => json!({
            "max_window_layers": spec.layers,
            "rope_scaling": null,
            "sliding_window": 4096,
            "use_sliding_window": false,
        }),
    };
    if arch == Arch::SmolLm {
        c["is_llama_config"] = json!(true);
        c["pad_token_id"] = json!(EOS_ID);
        c["rope_interleaved"] = json!(false);
    }
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

fn generation_config_json(spec: &TinyModelSpec) -> serde_json::Value {
    json!({
        "_from_model_config": true,
        "bos_token_id": BOS_ID,
        "eos_token_id": eos_json(spec.arch),
        "transformers_version": "4.46.2",
    })
}
