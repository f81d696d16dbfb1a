//! Shared support for llmd's integration tests: tiny random-weight Hugging Face checkpoints,
//! a candle-transformers oracle, access to the real models in `shared/models`, and helpers that
//! damage checkpoints for bad-input tests.
//!
//! Used as `mod common;` from each file under `tests/`; every test file uses a subset, hence the
//! blanket `dead_code` allowance below.
//!
//! Invariants the tests rely on:
//! - A [`TinyModelSpec`] fully determines the bytes written: weights come from a fixed RNG seeded
//!   by `(spec.seed, tensor name)`, so the same spec gives identical weights whether written as
//!   one file or as shards, in any dtype (up to that dtype's rounding), and with one tensor
//!   dropped or misshapen the others are unchanged.
//! - Written checkpoints follow the layout transformers writes for the architecture: tensor
//!   names, `config.json` keys, `model.safetensors.index.json`.
//! - The oracle always runs candle on CPU in f32, whatever dtype is on disk.
#![allow(dead_code, unused_imports)]

mod corrupt;
mod oracle;
mod ours;
mod process;
mod python;
mod redis;
mod secret;
mod shared;
mod tiny_model;
mod tiny_tokenizer;

pub use corrupt::{
    corrupt_header, truncate_file, write_model_with_wrong_shape, write_model_without_tensor,
};
pub use oracle::{
    argmax, assert_logits_match, candle_greedy, candle_greedy_with_margins,
    candle_logits_all_positions, candle_logits_last, clear_margin_prompt, max_abs_diff,
    top1_margin,
};
pub use ours::{
    llmd_greedy, llmd_greedy_with, llmd_logits_all_positions, llmd_logits_all_positions_on,
};
pub use process::{args, free_port, metric, stories, LlmdProcess};
pub use python::{python_has_zmq, python_imports};
pub use redis::{RedisOptions, RedisServer};
pub use secret::{hop_token, secret_file};
pub use shared::{
    find_shared_model, gpu_models, shared_model, shared_model_or_fail, shared_models_dir,
};
pub use tiny_model::{
    edit_config, random_prompt, set_longrope, tensor_names, tiny_model_dir, tiny_model_weights,
    write_tiny_model, TensorData,
};
pub use tiny_tokenizer::load_tokenizer;

use std::path::{Path, PathBuf};

/// The model families the engine must support, as they appear on the Hugging Face hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Llama 2 style: `LlamaForCausalLM`, rope_theta 1e4, untied `lm_head`.
    Llama,
    /// Llama 3.1 style: rope_theta 5e5 and `rope_scaling` of type "llama3"; eos is a list.
    Llama3,
    /// `MistralForCausalLM` with `sliding_window: null`.
    Mistral,
    /// `Qwen2ForCausalLM`: biases on q/k/v projections, tied embeddings, no BOS added.
    Qwen2,
    /// SmolLM/SmolLM2: a `LlamaForCausalLM` with tied embeddings.
    SmolLm,
    /// `Qwen3ForCausalLM`: no q/k/v bias, per-head RMSNorm of q and k (`q_norm`, `k_norm`),
    /// an explicit `head_dim`, tied embeddings.
    Qwen3,
    /// `Phi3ForCausalLM` (Phi-3, Phi-4): fused `qkv_proj` and `gate_up_proj`, untied.
    Phi3,
    /// `Gemma3ForCausalLM`: (1 + w) norms, sandwich norms, GeGLU, scaled embedding, q/k norm,
    /// sliding and global layers with their own RoPE bases, tied embeddings.
    Gemma3,
    /// `Gemma2ForCausalLM`: Gemma 3's layout without q/k norm, attention and final-logit
    /// soft-capping (caps small enough to bite in a tiny model), even layers sliding.
    Gemma2,
    /// `MixtralForCausalLM`: Mistral's attention, every MLP a mixture of `experts` experts
    /// (`block_sparse_moe`, `w1`/`w3`/`w2`), top-`top_k` routing renormalized, untied.
    Mixtral,
    /// `Qwen3MoeForCausalLM`: Qwen3's attention; with `decoder_sparse_step` 2 the first layer's
    /// MLP is dense and the second a mixture of experts (`mlp.experts`), routing weights
    /// renormalized (`norm_topk_prob`), untied.
    Qwen3Moe,
}

impl Arch {
    pub const ALL: [Arch; 11] = [
        Arch::Llama,
        Arch::Llama3,
        Arch::Mistral,
        Arch::Qwen2,
        Arch::SmolLm,
        Arch::Qwen3,
        Arch::Phi3,
        Arch::Gemma3,
        Arch::Gemma2,
        Arch::Mixtral,
        Arch::Qwen3Moe,
    ];

    /// The single entry of `architectures` in config.json.
    pub fn hf_architecture(self) -> &'static str {
        match self {
            Arch::Llama | Arch::Llama3 | Arch::SmolLm => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Gemma2 => "Gemma2ForCausalLM",
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// `model_type` in config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama | Arch::Llama3 | Arch::SmolLm => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma3 => "gemma3_text",
            Arch::Gemma2 => "gemma2",
            Arch::Mixtral => "mixtral",
            Arch::Qwen3Moe => "qwen3_moe",
        }
    }

    /// Whether `lm_head.weight` is absent and the output projection reuses the embedding.
    pub fn tie_word_embeddings(self) -> bool {
        matches!(
            self,
            Arch::Qwen2 | Arch::SmolLm | Arch::Qwen3 | Arch::Gemma3 | Arch::Gemma2
        )
    }

    /// Whether q/k/v projections carry a bias (`*.bias` tensors).
    pub fn qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2)
    }

    /// Whether the tokenizer prepends BOS on `encode(text, add_special_tokens = true)`.
    pub fn adds_bos(self) -> bool {
        !matches!(self, Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe)
    }

    /// Whether q/k/v and gate/up are stored fused (`qkv_proj`, `gate_up_proj`).
    pub fn fused_projections(self) -> bool {
        matches!(self, Arch::Phi3)
    }

    /// Whether each query and key head is RMS-normalized (`q_norm`/`k_norm` tensors).
    pub fn qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3)
    }

    /// Whether (some) MLPs are mixtures of experts.
    pub fn moe(self) -> bool {
        matches!(self, Arch::Mixtral | Arch::Qwen3Moe)
    }

    /// Whether layer `l`'s MLP is a mixture of experts (Qwen3-MoE's `decoder_sparse_step` 2).
    pub fn moe_layer(self, l: usize) -> bool {
        match self {
            Arch::Mixtral => true,
            Arch::Qwen3Moe => (l + 1).is_multiple_of(2),
            _ => false,
        }
    }

    /// Whether the layer has Gemma's sandwich norms (`pre_feedforward_layernorm`,
    /// `post_feedforward_layernorm`, and `post_attention_layernorm` on the attention output).
    pub fn sandwich_norms(self) -> bool {
        matches!(self, Arch::Gemma3 | Arch::Gemma2)
    }
}

/// Storage dtype of the weights on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub const ALL: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    /// `torch_dtype` in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// Token ids shared by every tiny model's tokenizer and config.
pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
/// Second end-of-sequence id; only Llama3 models list it in `eos_token_id`.
pub const EOT_ID: u32 = 3;
/// Ids below this are special tokens; random prompts avoid them.
pub const FIRST_ORDINARY_ID: u32 = 4;

/// Shape and seed of a generated test model. `head_dim = hidden / heads`.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyModelSpec {
    pub arch: Arch,
    pub dtype: DType,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    /// Rows of the embedding and of the tokenizer; at least 260 (4 specials + 256 bytes).
    pub vocab: usize,
    pub max_pos: usize,
    /// Write 3 shards plus `model.safetensors.index.json` instead of one `model.safetensors`.
    pub sharded: bool,
    pub seed: u64,
    /// Mixture-of-experts shape (MoE architectures only): experts, experts per token, and
    /// each expert's intermediate size (Mixtral's experts use `intermediate`).
    pub experts: usize,
    pub top_k: usize,
    pub moe_intermediate: usize,
}

impl TinyModelSpec {
    /// Small defaults: hidden 64, 2 layers, 4 query heads over 2 KV heads (GQA), head_dim 16,
    /// intermediate 128, vocab 384, 512 positions, f32, single file.
    pub fn new(arch: Arch) -> Self {
        TinyModelSpec {
            arch,
            dtype: DType::F32,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            vocab: 384,
            max_pos: 512,
            sharded: false,
            seed: 0x11_4d,
            experts: 4,
            top_k: 2,
            moe_intermediate: 48,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn rope_theta(&self) -> f64 {
        match self.arch {
            Arch::Llama | Arch::Phi3 => 10_000.0,
            Arch::Llama3 => 500_000.0,
            Arch::SmolLm => 100_000.0,
            Arch::Mistral
            | Arch::Qwen2
            | Arch::Qwen3
            | Arch::Gemma3
            | Arch::Gemma2
            | Arch::Mixtral
            | Arch::Qwen3Moe => 1_000_000.0,
        }
    }

    pub fn rms_norm_eps(&self) -> f64 {
        match self.arch {
            Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3 | Arch::Gemma2 => 1e-6,
            _ => 1e-5,
        }
    }

    /// Panics with a readable message when the spec cannot describe a valid model.
    pub fn validate(&self) {
        assert!(
            self.heads > 0 && self.hidden.is_multiple_of(self.heads),
            "hidden {} must be a multiple of heads {}",
            self.hidden,
            self.heads
        );
        assert!(
            self.head_dim().is_multiple_of(2),
            "head_dim {} must be even for RoPE",
            self.head_dim()
        );
        assert!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "heads {} must be a multiple of kv_heads {}",
            self.heads,
            self.kv_heads
        );
        assert!(
            self.layers > 0 && self.intermediate > 0,
            "need layers and intermediate"
        );
        assert!(
            self.vocab >= tiny_tokenizer::MIN_VOCAB,
            "vocab {} below the tokenizer's minimum {}",
            self.vocab,
            tiny_tokenizer::MIN_VOCAB
        );
    }
}
