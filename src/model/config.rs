//! `config.json` of a Hugging Face checkpoint, parsed into a validated [`ModelConfig`].
//!
//! Supported: `LlamaForCausalLM` (Llama 2, Llama 3.x with `rope_scaling` type `llama3`,
//! SmolLM/SmolLM2), `MistralForCausalLM` (optional sliding window), `Qwen2ForCausalLM`
//! (q/k/v bias), `Qwen3ForCausalLM` (per-head RMSNorm of q and k before the rotary
//! embedding) and `Phi3ForCausalLM` (Phi-3/Phi-4: fused q/k/v and gate/up weights, LongRoPE,
//! partial rotary). All are the same decoder with pre-RMSNorm, rotary embeddings (HF
//! "rotate_half" layout), grouped-query attention and a SiLU-gated MLP.
use super::ModelError;
use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Phi-3 and Phi-4: fused `qkv_proj` and `gate_up_proj` weights.
    Phi3,
    /// Gemma 3 (text): (1 + w) RMSNorm, sandwich norms, GeGLU, embedding scaling, per-head q/k
    /// norm, sliding-window layers with their own RoPE base between global ones.
    Gemma3,
    /// Gemma 2: Gemma 3 without q/k norm and local RoPE base, with soft-capping of attention
    /// scores and final logits (`c · tanh(x / c)`), sliding-window layers alternating with
    /// global ones (the even layers slide).
    Gemma2,
    /// Mixtral: Mistral's attention, every MLP a mixture of experts (`block_sparse_moe`).
    Mixtral,
    /// Qwen3-MoE: Qwen3's attention, mixture-of-experts MLPs (`mlp.experts`) in the layers
    /// `decoder_sparse_step` and `mlp_only_layers` pick, dense MLPs in the others.
    Qwen3Moe,
}

/// A mixture-of-experts MLP: a linear router over the experts, softmax, the top `top_k`
/// experts per token (their probabilities renormalized to sum to 1 when `renormalize`), each a
/// gated MLP of `intermediate_size`, their outputs summed with those weights.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub intermediate_size: usize,
    /// Mixtral always; Qwen3-MoE when `norm_topk_prob`.
    pub renormalize: bool,
    /// Which layers are MoE (the others dense, of the model's `intermediate_size`).
    pub layers: Vec<bool>,
}

/// The MLP's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Architecture {
    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "Qwen3ForCausalLM" => Some(Self::Qwen3),
            "Phi3ForCausalLM" => Some(Self::Phi3),
            "Gemma3ForCausalLM" => Some(Self::Gemma3),
            "Gemma2ForCausalLM" => Some(Self::Gemma2),
            "MixtralForCausalLM" => Some(Self::Mixtral),
            "Qwen3MoeForCausalLM" => Some(Self::Qwen3Moe),
            _ => None,
        }
    }
}

/// Rotary frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's piecewise scaling of the inverse frequencies.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Phi-3's LongRoPE: each frequency divided by its own factor, `long_factor` when the
    /// engine's context (`max_model_len`) exceeds `original_max_position_embeddings`, else
    /// `short_factor`, for every position (vLLM's rule: one table, so KV written early stays
    /// valid as a sequence grows; transformers switches per forward by its length); cos and
    /// sin multiplied by `attention_factor`.
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max_position_embeddings: usize,
        attention_factor: f32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    /// Leading dimensions of each head that rotate (`head_dim` unless a
    /// `partial_rotary_factor` below 1 says fewer: Phi-4-mini); the rest pass through.
    pub rotary_dim: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Each query and key head is RMS-normalized (`q_norm`, `k_norm`, `[head_dim]` weights)
    /// before the rotary embedding (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm multiplies by `1 + w` rather than `w` (Gemma).
    pub norm_offset: bool,
    /// The attention and MLP outputs are normalized before the residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`), and the MLP input has its own
    /// norm (`pre_feedforward_layernorm`) (Gemma 2/3).
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// The token embedding is multiplied by this (Gemma: √hidden).
    pub embed_scale: Option<f32>,
    /// Attention's softmax scale when not `1/√head_dim` (Gemma's `query_pre_attn_scalar`).
    pub attn_scale: Option<f32>,
    /// Which layers attend within `sliding_window` only (all of them when None and a window is
    /// set, as Mistral).
    pub sliding_layers: Option<Vec<bool>>,
    /// The RoPE base of the sliding-window layers, when theirs differs (Gemma 3's
    /// `rope_local_base_freq`; no scaling applies to them).
    pub local_rope_theta: Option<f32>,
    pub sliding_window: Option<usize>,
    /// The mixture-of-experts MLPs (Mixtral, Qwen3-MoE).
    pub moe: Option<MoeConfig>,
    /// Attention scores soft-capped to `c · tanh(s / c)` after scaling (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Final logits soft-capped the same way (Gemma 2).
    pub final_softcap: Option<f32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct RawRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
    short_factor: Option<Vec<f32>>,
    long_factor: Option<Vec<f32>>,
    attention_factor: Option<f32>,
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<RawRopeScaling>,
    /// transformers 5 writes RoPE settings here (`rope_type`, `rope_theta`, `factor`, …)
    /// instead of `rope_theta` and `rope_scaling`.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    /// Phi-3's pretraining context (LongRoPE), beside `rope_scaling`.
    original_max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    /// Phi-4-mini's partial rotary embedding.
    partial_rotary_factor: Option<f64>,
    hidden_act: Option<String>,
    /// Gemma's name for the activation.
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f32>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    /// Mixtral's expert count.
    num_local_experts: Option<usize>,
    /// Qwen3-MoE's expert count.
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    /// Qwen2-MoE's shared expert (refused: not an architecture llmd runs).
    shared_expert_intermediate_size: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

/// RoPE settings as read from either layout.
struct RopeSettings {
    theta: Option<f32>,
    scaling: Option<RawRopeScaling>,
    partial: Option<f64>,
    /// The sliding-window layers' own base (transformers 5's `sliding_attention` entry).
    local_theta: Option<f32>,
}

/// The RoPE base and scaling from either layout: transformers 4's top-level `rope_theta` and
/// `rope_scaling`, or transformers 5's `rope_parameters` (one object, or one per layer type:
/// `full_attention`, and `sliding_attention` with a base of its own and no scaling, as Gemma 3
/// writes it). Both layouts in one file must agree.
fn rope_settings(
    theta: Option<f32>,
    scaling: Option<RawRopeScaling>,
    partial: Option<f64>,
    params: Option<serde_json::Value>,
) -> Result<RopeSettings, ModelError> {
    let bad = |field: &'static str, reason: String| ModelError::ConfigField { field, reason };
    // The number under `key` of a `rope_parameters` object, if any (`field` names it).
    let number = |m: &serde_json::Map<String, serde_json::Value>,
                  key: &str,
                  field: &'static str|
     -> Result<Option<f64>, ModelError> {
        m.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| bad(field, format!("{v} is not a number")))
            })
            .transpose()
    };
    let params = match params {
        None | Some(serde_json::Value::Null) => {
            return Ok(RopeSettings {
                theta,
                scaling,
                partial,
                local_theta: None,
            })
        }
        Some(serde_json::Value::Object(m)) => m,
        Some(other) => return Err(bad("rope_parameters", format!("{other} is not an object"))),
    };
    // Per layer type ({"full_attention": {...}, "sliding_attention": {...}}).
    let (mut params, local_theta) =
        if params.values().all(serde_json::Value::is_object) && !params.is_empty() {
            let types: Vec<&String> = params.keys().collect();
            let full = match params.get("full_attention") {
                Some(serde_json::Value::Object(m))
                    if types
                        .iter()
                        .all(|t| *t == "full_attention" || *t == "sliding_attention") =>
                {
                    m.clone()
                }
                _ => {
                    return Err(bad(
                        "rope_parameters",
                        format!(
                            "per-layer-type RoPE settings for {types:?}: llmd reads \
                             full_attention and sliding_attention"
                        ),
                    ))
                }
            };
            let local = match params.get("sliding_attention") {
                Some(serde_json::Value::Object(m)) => {
                    let field = "rope_parameters.sliding_attention";
                    for (k, v) in m {
                        let ok = match k.as_str() {
                            "rope_type" | "type" => v.as_str() == Some("default"),
                            "rope_theta" => true,
                            _ => false,
                        };
                        if !ok {
                            return Err(bad(
                                field,
                                format!(
                                    "{k:?}: {v} is not supported (sliding layers take a \
                                     rope_theta of their own and no scaling)"
                                ),
                            ));
                        }
                    }
                    number(
                        m,
                        "rope_theta",
                        "rope_parameters.sliding_attention.rope_theta",
                    )?
                    .map(|t| t as f32)
                }
                _ => None,
            };
            (full, local)
        } else {
            (params, None)
        };
    // transformers 5 keeps Phi-3's `type` beside `rope_type`: they must agree.
    if let (Some(a), Some(b)) = (params.get("rope_type"), params.get("type")) {
        if a != b {
            return Err(bad(
                "rope_parameters.type",
                format!("{b} disagrees with rope_type {a}"),
            ));
        }
        params.remove("type");
    }
    let field = "rope_parameters.rope_theta";
    let new_theta = number(&params, "rope_theta", field)?.map(|t| t as f32);
    let theta = agreeing(theta, new_theta, field, "rope_theta")?;
    let known = [
        "rope_type",
        "type",
        "rope_theta",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
        "partial_rotary_factor",
        "short_factor",
        "long_factor",
        "attention_factor",
    ];
    if let Some(k) = params.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(bad(
            "rope_parameters",
            format!("unknown key {k:?} (llmd reads {known:?})"),
        ));
    }
    let field = "rope_parameters.partial_rotary_factor";
    let new_partial = number(&params, "partial_rotary_factor", field)?;
    let partial = agreeing(partial, new_partial, field, "partial_rotary_factor")?;
    let parsed: RawRopeScaling = serde_json::from_value(serde_json::Value::Object(params.clone()))
        .map_err(|e| bad("rope_parameters", e.to_string()))?;
    if scaling.is_some() {
        return Err(bad(
            "rope_scaling",
            "given beside rope_parameters: a config uses one layout or the other".into(),
        ));
    }
    let scaling = match parsed.rope_type.as_deref() {
        None | Some("default") => None,
        Some("llama3" | "linear" | "longrope") => Some(parsed),
        Some(other) => {
            return Err(bad(
                "rope_parameters.rope_type",
                format!("{other:?} is not supported (default, llama3, linear, longrope)"),
            ))
        }
    };
    Ok(RopeSettings {
        theta,
        scaling,
        partial,
        local_theta,
    })
}

/// A setting given under `rope_parameters` (`inner`, named `field` there) or else at the top
/// level (`top`, named `name`); when both are, they must agree.
fn agreeing<T: PartialEq + std::fmt::Display + Copy>(
    top: Option<T>,
    inner: Option<T>,
    field: &'static str,
    name: &str,
) -> Result<Option<T>, ModelError> {
    if let (Some(a), Some(b)) = (top, inner) {
        if a != b {
            return Err(ModelError::ConfigField {
                field,
                reason: format!("{b} disagrees with the top-level {name} {a}"),
            });
        }
    }
    Ok(inner.or(top))
}

/// The MoE settings of a Mixtral or Qwen3-MoE config (None for dense architectures, which
/// must not carry expert keys).
fn moe_config(
    architecture: Architecture,
    raw: &RawConfig,
) -> Result<Option<MoeConfig>, ModelError> {
    if raw.shared_expert_intermediate_size.is_some_and(|n| n > 0) {
        return Err(ModelError::ConfigField {
            field: "shared_expert_intermediate_size",
            reason: "shared experts (Qwen2-MoE) are not supported".into(),
        });
    }
    let layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
    let (num_experts, intermediate_size, renormalize, moe_layers) = match architecture {
        Architecture::Mixtral => (
            need(raw.num_local_experts, "num_local_experts")?,
            need(raw.intermediate_size, "intermediate_size")?,
            true,
            vec![true; layers],
        ),
        Architecture::Qwen3Moe => {
            let step = raw.decoder_sparse_step.unwrap_or(1);
            if step == 0 {
                return Err(ModelError::ConfigField {
                    field: "decoder_sparse_step",
                    reason: "must be at least 1".into(),
                });
            }
            let dense = raw.mlp_only_layers.clone().unwrap_or_default();
            if let Some(&l) = dense.iter().find(|&&l| l >= layers) {
                return Err(ModelError::ConfigField {
                    field: "mlp_only_layers",
                    reason: format!("layer {l} of {layers}"),
                });
            }
            // transformers 5 writes Qwen3-MoE's expert count as `num_local_experts`.
            let experts = match (raw.num_experts, raw.num_local_experts) {
                (Some(a), Some(b)) if a != b => {
                    return Err(ModelError::ConfigField {
                        field: "num_local_experts",
                        reason: format!("{b} disagrees with num_experts {a}"),
                    })
                }
                (a, b) => need(a.or(b), "num_experts")?,
            };
            (
                experts,
                need(raw.moe_intermediate_size, "moe_intermediate_size")?,
                raw.norm_topk_prob.unwrap_or(false),
                (0..layers)
                    .map(|l| experts > 0 && !dense.contains(&l) && (l + 1) % step == 0)
                    .collect(),
            )
        }
        _ => {
            for (field, present) in [
                (
                    "num_local_experts",
                    raw.num_local_experts.is_some_and(|n| n > 0),
                ),
                ("num_experts", raw.num_experts.is_some_and(|n| n > 0)),
            ] {
                if present {
                    return Err(ModelError::ConfigField {
                        field,
                        reason: "experts in a dense architecture's config".into(),
                    });
                }
            }
            return Ok(None);
        }
    };
    let top_k = need(raw.num_experts_per_tok, "num_experts_per_tok")?;
    if num_experts == 0 || top_k == 0 || top_k > num_experts {
        return Err(ModelError::ConfigField {
            field: "num_experts_per_tok",
            reason: format!("{top_k} of {num_experts} experts"),
        });
    }
    if intermediate_size == 0 {
        return Err(ModelError::ConfigField {
            field: "moe_intermediate_size",
            reason: "must be at least 1".into(),
        });
    }
    Ok(Some(MoeConfig {
        num_experts,
        top_k,
        intermediate_size,
        renormalize,
        layers: moe_layers,
    }))
}

fn need<T>(v: Option<T>, field: &'static str) -> Result<T, ModelError> {
    v.ok_or(ModelError::ConfigField {
        field,
        reason: "missing".into(),
    })
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
            path: path.clone(),
            source: e,
        })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ModelError::ConfigParse {
            reason: e.to_string(),
        })?;
        let names = raw.architectures.clone().unwrap_or_default();
        let architecture = names
            .iter()
            .find_map(|n| Architecture::from_hf(n))
            .ok_or_else(|| ModelError::UnknownArchitecture {
                architectures: names.clone(),
                model_type: raw.model_type.clone(),
            })?;
        let gemma2 = architecture == Architecture::Gemma2;
        let gemma = gemma2 || architecture == Architecture::Gemma3;
        let (act_field, act_name) = match (&raw.hidden_activation, &raw.hidden_act) {
            (Some(a), _) => ("hidden_activation", Some(a.as_str())),
            (None, a) => ("hidden_act", a.as_deref()),
        };
        let activation = match act_name {
            None if gemma => Activation::GeluTanh,
            None | Some("silu") => Activation::Silu,
            Some("gelu_pytorch_tanh" | "gelu_tanh") => Activation::GeluTanh,
            Some(act) => {
                return Err(ModelError::ConfigField {
                    field: act_field,
                    reason: format!("{act:?} is not supported (silu, gelu_pytorch_tanh)"),
                })
            }
        };
        // Soft-capping is Gemma 2's; a cap must be a positive number.
        let softcap = |field: &'static str, v: Option<f64>| match v {
            Some(v) if !gemma2 => Err(ModelError::ConfigField {
                field,
                reason: format!("{v} is not supported here (Gemma 2's soft-capping)"),
            }),
            Some(v) if !(v.is_finite() && v > 0.0) => Err(ModelError::ConfigField {
                field,
                reason: format!("{v} is not a positive cap"),
            }),
            v => Ok(v.map(|v| v as f32)),
        };
        let attn_softcap = softcap("attn_logit_softcapping", raw.attn_logit_softcapping)?;
        let final_softcap = softcap("final_logit_softcapping", raw.final_logit_softcapping)?;
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        let head_dim = raw
            .head_dim
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let moe = moe_config(architecture, &raw)?;
        let RopeSettings {
            theta: rope_theta,
            scaling: rope_scaling,
            partial,
            local_theta,
        } = rope_settings(
            raw.rope_theta,
            raw.rope_scaling,
            raw.partial_rotary_factor,
            raw.rope_parameters,
        )?;
        // The sliding layers' base: Gemma 3's own (either layout; both must agree); any other
        // architecture rotates every layer alike, so a different one cannot be honoured.
        let local_rope_theta = match (local_theta, raw.rope_local_base_freq) {
            (Some(a), Some(b)) if a != b => {
                return Err(ModelError::ConfigField {
                    field: "rope_parameters.sliding_attention.rope_theta",
                    reason: format!("{a} disagrees with rope_local_base_freq {b}"),
                })
            }
            (a, b) if gemma && !gemma2 => Some(a.or(b).unwrap_or(10_000.0)),
            (Some(a), _) if Some(a) != rope_theta => {
                return Err(ModelError::ConfigField {
                    field: "rope_parameters.sliding_attention.rope_theta",
                    reason: format!(
                        "{a} differs from the full-attention layers' base, which {architecture:?} \
                         does not support"
                    ),
                })
            }
            _ => None,
        };
        // transformers rotates int(head_dim * factor) dimensions, in pairs.
        let rotary_dim = match partial {
            None => head_dim,
            Some(f)
                if f > 0.0 && f <= 1.0 && ((head_dim as f64 * f) as usize).is_multiple_of(2) =>
            {
                (head_dim as f64 * f) as usize
            }
            Some(f) => {
                return Err(ModelError::ConfigField {
                    field: "partial_rotary_factor",
                    reason: format!(
                        "{f} must be in (0, 1] and rotate an even, non-zero number of the \
                         {head_dim} head dimensions"
                    ),
                })
            }
        };
        if rotary_dim == 0 {
            return Err(ModelError::ConfigField {
                field: "partial_rotary_factor",
                reason: format!("{partial:?} rotates none of the {head_dim} head dimensions"),
            });
        }
        let rope_scaling = match rope_scaling {
            None => None,
            Some(r) => match r.rope_type.as_deref() {
                Some("llama3") => Some(RopeScaling::Llama3 {
                    factor: need(r.factor, "rope_scaling.factor")?,
                    low_freq_factor: need(r.low_freq_factor, "rope_scaling.low_freq_factor")?,
                    high_freq_factor: need(r.high_freq_factor, "rope_scaling.high_freq_factor")?,
                    original_max_position_embeddings: need(
                        r.original_max_position_embeddings,
                        "rope_scaling.original_max_position_embeddings",
                    )?,
                }),
                Some("linear") => Some(RopeScaling::Linear {
                    factor: need(r.factor, "rope_scaling.factor")?,
                }),
                // Phi-3 keeps the pretraining context beside rope_scaling; transformers 5
                // moves it inside.
                Some("longrope" | "su") => {
                    let original = need(
                        raw.original_max_position_embeddings
                            .or(r.original_max_position_embeddings),
                        "original_max_position_embeddings",
                    )?;
                    let max_pos = need(raw.max_position_embeddings, "max_position_embeddings")?;
                    // transformers: `factor` if given, else the context's growth.
                    let factor = r.factor.unwrap_or(max_pos as f32 / original as f32);
                    Some(RopeScaling::LongRope {
                        short_factor: need(r.short_factor, "rope_scaling.short_factor")?,
                        long_factor: need(r.long_factor, "rope_scaling.long_factor")?,
                        original_max_position_embeddings: original,
                        attention_factor: match r.attention_factor {
                            Some(a) => a,
                            None if factor <= 1.0 => 1.0,
                            None => {
                                (1.0 + (factor as f64).ln() / (original as f64).ln()).sqrt() as f32
                            }
                        },
                    })
                }
                Some("default") => None,
                other => {
                    return Err(ModelError::ConfigField {
                        field: "rope_scaling",
                        reason: format!(
                            "type {other:?} is not supported (llama3, linear, longrope)"
                        ),
                    })
                }
            },
        };
        let sliding_window = match architecture {
            Architecture::Mistral | Architecture::Mixtral => raw.sliding_window,
            Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe
                if raw.use_sliding_window == Some(true) =>
            {
                raw.sliding_window
            }
            Architecture::Phi3 | Architecture::Gemma2 | Architecture::Gemma3 => raw.sliding_window,
            _ => None,
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            // transformers' default for Llama-family configs that name none.
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rotary_dim,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture == Architecture::Llama && attention_bias,
            qk_norm: matches!(
                architecture,
                Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3
            ),
            norm_offset: gemma,
            sandwich_norms: gemma,
            activation,
            embed_scale: gemma.then(|| (hidden_size as f32).sqrt()),
            attn_scale: match raw.query_pre_attn_scalar {
                Some(q) if gemma => Some(1.0 / (q as f32).sqrt()),
                _ => None,
            },
            sliding_layers: if gemma {
                let layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
                Some(match (&raw.layer_types, raw.sliding_window_pattern) {
                    (Some(types), _) => {
                        if types.len() != layers {
                            return Err(ModelError::ConfigField {
                                field: "layer_types",
                                reason: format!("{} entries for {layers} layers", types.len()),
                            });
                        }
                        types
                            .iter()
                            .map(|t| match t.as_str() {
                                "sliding_attention" => Ok(true),
                                "full_attention" => Ok(false),
                                other => Err(ModelError::ConfigField {
                                    field: "layer_types",
                                    reason: format!("unknown layer type {other:?}"),
                                }),
                            })
                            .collect::<Result<Vec<_>, _>>()?
                    }
                    // Gemma 2: the even layers slide.
                    (None, _) if gemma2 => (0..layers).map(|l| l % 2 == 0).collect(),
                    // Gemma 3's default: five sliding layers, then a global one.
                    (None, p) => {
                        let p = p.unwrap_or(6).max(1);
                        (0..layers).map(|l| (l + 1) % p != 0).collect()
                    }
                })
            } else {
                None
            },
            local_rope_theta,
            sliding_window,
            moe,
            attn_softcap,
            final_softcap,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |field, reason: String| Err(ModelError::ConfigField { field, reason });
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(field, "must be positive".into());
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} is odd; rotary needs pairs", self.head_dim),
            );
        }
        // The loader and the engine multiply these before any weight is checked against them:
        // sizes whose f32 bytes overflow are refused here rather than overflowing there (a
        // panic in debug builds, a wrong size in release ones).
        let (h, hd) = (self.hidden_size, self.head_dim);
        let qkv_rows = self
            .num_key_value_heads
            .checked_mul(2)
            .and_then(|kv| kv.checked_add(self.num_attention_heads));
        for (field, factors) in [
            ("vocab_size", [Some(self.vocab_size), Some(h), Some(1)]),
            ("num_attention_heads", [qkv_rows, Some(hd), Some(h)]),
            (
                "intermediate_size",
                [Some(self.intermediate_size), Some(h), Some(2)],
            ),
            (
                "num_hidden_layers",
                [
                    Some(self.num_hidden_layers),
                    self.num_key_value_heads.checked_mul(hd),
                    Some(2),
                ],
            ),
        ] {
            let bytes = factors
                .iter()
                .try_fold(4usize, |acc, f| f.and_then(|f| acc.checked_mul(f)))
                .filter(|&b| b <= isize::MAX as usize);
            if bytes.is_none() {
                return bad(field, "the model's sizes overflow when multiplied".into());
            }
        }
        // Rotary tables and norms must stay finite: a theta or scaling factor below 1 is no
        // real model's, and a small enough one makes frequencies infinite (zero or negative:
        // NaN); a negative epsilon makes NaN norms.
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(
                "rms_norm_eps",
                format!("{} is not a finite value >= 0", self.rms_norm_eps),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta >= 1.0) {
            return bad(
                "rope_theta",
                format!("{} is not a finite value >= 1", self.rope_theta),
            );
        }
        let factor = match &self.rope_scaling {
            None => 1.0,
            Some(RopeScaling::Linear { factor }) => *factor,
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                attention_factor,
                ..
            }) => {
                let pairs = self.rotary_dim / 2;
                for (field, f) in [
                    ("rope_scaling.short_factor", short_factor),
                    ("rope_scaling.long_factor", long_factor),
                ] {
                    if f.len() != pairs {
                        return bad(
                            field,
                            format!("{} factors for {pairs} rotary pairs", f.len()),
                        );
                    }
                    if let Some(x) = f.iter().find(|x| !(x.is_finite() && **x >= 1e-3)) {
                        return bad(field, format!("{x} is not a finite factor >= 0.001"));
                    }
                }
                if !(attention_factor.is_finite() && *attention_factor > 0.0) {
                    return bad(
                        "rope_scaling.attention_factor",
                        format!("{attention_factor} is not a finite positive value"),
                    );
                }
                // Each factor divides a frequency: the largest bounds the underflow check.
                short_factor
                    .iter()
                    .chain(long_factor)
                    .fold(1.0f32, |m, &x| m.max(x))
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                ..
            }) => {
                if !(low.is_finite() && *low > 0.0 && high.is_finite() && high > low) {
                    return bad(
                        "rope_scaling",
                        format!("need 0 < low_freq_factor ({low}) < high_freq_factor ({high})"),
                    );
                }
                *factor
            }
        };
        if !(factor.is_finite() && factor >= 1.0) {
            return bad(
                "rope_scaling.factor",
                format!("{factor} is not a finite value >= 1"),
            );
        }
        // The smallest inverse frequency is above 1 / (theta * factor): keep it a normal f32,
        // or the slowest rotary pairs underflow to zero (no real model comes near: theta is at
        // most ~1e9, factor at most ~100).
        if (1.0 / self.rope_theta) / factor < f32::MIN_POSITIVE {
            return bad(
                "rope_theta",
                format!(
                    "{} with rope_scaling.factor {factor} makes rotary frequencies underflow",
                    self.rope_theta
                ),
            );
        }
        Ok(())
    }

    /// The sliding window of layer `l` (None: it attends to the whole context).
    /// The widest attention window when every layer has one (KV before it is never read
    /// again), None when some layer attends to the whole context.
    pub fn kv_window(&self) -> Option<usize> {
        (0..self.num_hidden_layers)
            .map(|l| self.layer_window(l))
            .try_fold(0, |m, w| w.map(|w| m.max(w)))
            .filter(|&w| w > 0)
    }

    pub fn layer_window(&self, l: usize) -> Option<usize> {
        match &self.sliding_layers {
            Some(s) if !s.get(l).copied().unwrap_or(false) => None,
            _ => self.sliding_window,
        }
    }

    /// The rotary table of the sliding-window layers when it differs from the global one.
    pub fn local_rope_table(&self, max_positions: usize) -> Option<Vec<f32>> {
        let theta = self.local_rope_theta?;
        let local = ModelConfig {
            rope_theta: theta,
            rope_scaling: None,
            ..self.clone()
        };
        Some(local.rope_table(max_positions))
    }

    /// Whether q/k/v and gate/up are stored as single `qkv_proj` and `gate_up_proj` tensors.
    pub fn fused_projections(&self) -> bool {
        self.architecture == Architecture::Phi3
    }

    /// Inverse rotary frequencies `[rotary_dim / 2]`, with `rope_scaling` applied for an
    /// engine whose positions run to `max_positions` (LongRoPE picks its factors by it).
    pub fn rope_inv_freq(&self, max_positions: usize) -> Vec<f32> {
        let d = self.rotary_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                ..
            }) => {
                let ext = if max_positions > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                // transformers: 1 / (ext * theta^(2i/d)).
                base.iter().zip(ext).map(|(f, e)| f / e).collect()
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low_freq_factor, high_freq_factor) =
                    (*factor, *low_freq_factor, *high_freq_factor);
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// What an engine's context adds to the model's identity for the KV it computes: LongRoPE's
    /// factor set (`longrope-short`, `longrope-long`), chosen by `max_positions` (the same
    /// tokens give other K under the other set). None for every other RoPE.
    pub fn rope_variant(&self, max_positions: usize) -> Option<&'static str> {
        match &self.rope_scaling {
            Some(RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            }) => Some(if max_positions > *original_max_position_embeddings {
                "longrope-long"
            } else {
                "longrope-short"
            }),
            _ => None,
        }
    }

    /// Rotary table `[max_positions, rotary_dim]`: cos of each frequency in the first half of
    /// a row, sin in the second (both times LongRoPE's attention factor).
    pub fn rope_table(&self, max_positions: usize) -> Vec<f32> {
        let inv = self.rope_inv_freq(max_positions);
        let mscale = match &self.rope_scaling {
            Some(RopeScaling::LongRope {
                attention_factor, ..
            }) => *attention_factor as f64,
            _ => 1.0,
        };
        let half = inv.len();
        let mut t = vec![0f32; max_positions * 2 * half];
        for p in 0..max_positions {
            let row = &mut t[p * 2 * half..(p + 1) * 2 * half];
            for (i, f) in inv.iter().enumerate() {
                // Angles in f64 so long positions keep precision; stored as f32 like HF's.
                let a = p as f64 * *f as f64;
                row[i] = (a.cos() * mscale) as f32;
                row[half + i] = (a.sin() * mscale) as f32;
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,
      "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
      "num_key_value_heads":3,"head_dim":64,"vocab_size":49152,"rms_norm_eps":1e-05,
      "rope_theta":100000.0,"rope_scaling":null,"max_position_embeddings":8192,
      "tie_word_embeddings":true,"hidden_act":"silu","bos_token_id":1,"eos_token_id":2}"#;

    #[test]
    fn parses_smollm2() {
        let c = ModelConfig::from_json(SMOLLM2).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (9, 3, 64)
        );
        assert!(c.tie_word_embeddings && !c.qkv_bias);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn transformers_5_rope_parameters_read_like_the_old_layout() {
        const LLAMA31_OLD: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
          "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
          "num_key_value_heads":2,"vocab_size":300,"rms_norm_eps":1e-05,"torch_dtype":"bfloat16",
          "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
          "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},
          "max_position_embeddings":131072}"#;
        const LLAMA31_NEW: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
          "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
          "num_key_value_heads":2,"vocab_size":300,"rms_norm_eps":1e-05,"dtype":"bfloat16",
          "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
          "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},
          "max_position_embeddings":131072}"#;
        let old = ModelConfig::from_json(LLAMA31_OLD).unwrap();
        let new = ModelConfig::from_json(LLAMA31_NEW).unwrap();
        assert_eq!(old, new);
        assert_eq!(new.rope_theta, 500000.0);
        assert!(matches!(new.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        // SmolLM2 in the new layout: default RoPE with its own theta (not 10000).
        let smol = SMOLLM2.replace(
            "\"rope_theta\":100000.0,\"rope_scaling\":null",
            "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":100000.0}",
        );
        assert_eq!(
            ModelConfig::from_json(&smol).unwrap(),
            ModelConfig::from_json(SMOLLM2).unwrap()
        );
        // Per layer type, with only full attention.
        let per_type = SMOLLM2.replace(
            "\"rope_theta\":100000.0,\"rope_scaling\":null",
            "\"rope_parameters\":{\"full_attention\":{\"rope_type\":\"default\",\"rope_theta\":100000.0}}",
        );
        assert_eq!(
            ModelConfig::from_json(&per_type).unwrap().rope_theta,
            100000.0
        );
    }

    #[test]
    fn rope_parameters_llmd_does_not_understand_are_errors_naming_the_key() {
        let with = |params: &str| {
            SMOLLM2.replace(
                "\"rope_theta\":100000.0,\"rope_scaling\":null",
                &format!("\"rope_parameters\":{params}"),
            )
        };
        let field_of = |j: &str| match ModelConfig::from_json(j) {
            Err(ModelError::ConfigField { field, reason }) => (field, reason),
            other => panic!("{other:?}"),
        };
        let (f, r) = field_of(&with(
            r#"{"rope_type":"yarn","rope_theta":1e5,"factor":4.0}"#,
        ));
        assert_eq!(f, "rope_parameters.rope_type", "{r}");
        assert!(r.contains("yarn"), "{r}");
        let (f, r) = field_of(&with(
            r#"{"rope_type":"default","rope_theta":1e5,"beta_fast":32}"#,
        ));
        assert_eq!(f, "rope_parameters");
        assert!(r.contains("beta_fast"), "{r}");
        let (f, _) = field_of(&with(r#"{"rope_theta":"big"}"#));
        assert_eq!(f, "rope_parameters.rope_theta");
        let (f, _) = field_of(&with(
            r#"{"rope_type":"default","rope_theta":1e5,"partial_rotary_factor":"half"}"#,
        ));
        assert_eq!(f, "rope_parameters.partial_rotary_factor");
        let half = ModelConfig::from_json(&with(
            r#"{"rope_type":"default","rope_theta":1e5,"partial_rotary_factor":0.5}"#,
        ))
        .unwrap();
        assert_eq!((half.rotary_dim, half.head_dim), (32, 64));
        // Per layer type: a sliding-attention base of its own only where the architecture has
        // one (Gemma 3), and no layer types llmd does not know.
        let (f, r) = field_of(&with(
            r#"{"full_attention":{"rope_theta":1e6},"sliding_attention":{"rope_theta":1e4}}"#,
        ));
        assert_eq!(f, "rope_parameters.sliding_attention.rope_theta");
        assert!(r.contains("Llama"), "{r}");
        let (f, r) = field_of(&with(
            r#"{"full_attention":{"rope_theta":1e6},"chunked_attention":{"rope_theta":1e4}}"#,
        ));
        assert_eq!(f, "rope_parameters");
        assert!(r.contains("chunked_attention"), "{r}");
        let (f, _) = field_of(&with(
            r#"{"full_attention":{"rope_theta":1e6},"sliding_attention":{"rope_type":"linear","factor":2.0}}"#,
        ));
        assert_eq!(f, "rope_parameters.sliding_attention");
        // Both layouts at once must agree.
        let both = SMOLLM2.replace(
            "\"rope_scaling\":null",
            "\"rope_scaling\":null,\"rope_parameters\":{\"rope_theta\":500000.0}",
        );
        let (f, r) = field_of(&both);
        assert_eq!(f, "rope_parameters.rope_theta");
        assert!(r.contains("100000"), "{r}");
    }

    #[test]
    fn phi3_reads_fused_longrope_and_partial_rotary() {
        let phi = SMOLLM2
            .replace("LlamaForCausalLM", "Phi3ForCausalLM")
            .replace(
                "\"tie_word_embeddings\":true",
                "\"tie_word_embeddings\":false,\"sliding_window\":2047",
            );
        let c = ModelConfig::from_json(&phi).unwrap();
        assert_eq!(c.architecture, Architecture::Phi3);
        assert!(c.fused_projections());
        assert_eq!(c.sliding_window, Some(2047));
        assert_eq!(c.rotary_dim, 64);
        // LongRoPE, Phi-3-mini-128k style: 32 pairs, 8192 positions grown from 1024.
        let (short, long): (Vec<f32>, Vec<f32>) = (0..32)
            .map(|i| (1.0 + i as f32 / 64.0, 1.0 + i as f32))
            .unzip();
        let longrope = phi.replace(
            "\"rope_scaling\":null",
            &format!(
                "\"rope_scaling\":{{\"type\":\"longrope\",\"short_factor\":{short:?},\
                 \"long_factor\":{long:?}}},\"original_max_position_embeddings\":1024"
            ),
        );
        let c = ModelConfig::from_json(&longrope).unwrap();
        let want_mscale = (1.0 + (8.0f64).ln() / (1024f64).ln()).sqrt() as f32;
        match &c.rope_scaling {
            Some(RopeScaling::LongRope {
                original_max_position_embeddings: 1024,
                attention_factor,
                ..
            }) => assert!((attention_factor - want_mscale).abs() < 1e-7),
            other => panic!("{other:?}"),
        }
        // Up to the original context the short factors divide the frequencies, past it the
        // long ones; cos and sin carry the attention factor.
        let base = |i: usize| 1.0 / 100000f32.powf((2 * i) as f32 / 64.0);
        for (max_pos, ext) in [(1024, &short), (1025, &long)] {
            let f = c.rope_inv_freq(max_pos);
            for i in [0, 7, 31] {
                assert!(
                    (f[i] - base(i) / ext[i]).abs() <= 1e-6 * f[i],
                    "{max_pos} {i}"
                );
            }
        }
        let t = c.rope_table(2);
        assert!(
            (t[0] - want_mscale).abs() < 1e-6 && t[32].abs() < 1e-9,
            "position 0"
        );
        // A transformers-5 layout of the same settings gives the same table.
        let v5 = phi.replace(
            "\"rope_theta\":100000.0,\"rope_scaling\":null",
            &format!(
                "\"rope_parameters\":{{\"rope_type\":\"longrope\",\"rope_theta\":100000.0,\
                 \"short_factor\":{short:?},\"long_factor\":{long:?},\
                 \"original_max_position_embeddings\":1024}}"
            ),
        );
        let c5 = ModelConfig::from_json(&v5).unwrap();
        assert_eq!(c5.rope_table(2048), c.rope_table(2048));
        // Factors that do not cover the rotary pairs are refused, naming the field.
        let short_list = longrope.replacen(&format!("{short:?}"), "[1.0, 1.0]", 1);
        match ModelConfig::from_json(&short_list) {
            Err(ModelError::ConfigField { field, reason }) => {
                assert_eq!(field, "rope_scaling.short_factor");
                assert!(reason.contains("32 rotary pairs"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let no_orig = longrope.replace(",\"original_max_position_embeddings\":1024", "");
        assert!(matches!(
            ModelConfig::from_json(&no_orig),
            Err(ModelError::ConfigField {
                field: "original_max_position_embeddings",
                ..
            })
        ));
        // Partial rotary (Phi-4-mini): 0.75 of 64 dimensions rotate; odd or empty is refused.
        let partial = |f: &str| {
            ModelConfig::from_json(&phi.replace(
                "\"rope_scaling\":null",
                &format!("\"rope_scaling\":null,\"partial_rotary_factor\":{f}"),
            ))
        };
        let c = partial("0.75").unwrap();
        assert_eq!(c.rotary_dim, 48);
        assert_eq!(c.rope_table(3).len(), 3 * 48);
        for bad in ["0.0", "1.5", "0.015625"] {
            assert!(
                matches!(
                    partial(bad),
                    Err(ModelError::ConfigField {
                        field: "partial_rotary_factor",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn gemma3_layers_activation_and_scales_are_read() {
        let gemma = r#"{"architectures":["Gemma3ForCausalLM"],"hidden_size":1152,
          "intermediate_size":6912,"num_hidden_layers":6,"num_attention_heads":4,
          "num_key_value_heads":1,"head_dim":256,"vocab_size":262144,"rms_norm_eps":1e-06,
          "rope_theta":1000000.0,"rope_local_base_freq":10000.0,"rope_scaling":null,
          "sliding_window":512,"sliding_window_pattern":6,"query_pre_attn_scalar":256,
          "hidden_activation":"gelu_pytorch_tanh","final_logit_softcapping":null,
          "attn_logit_softcapping":null,"max_position_embeddings":32768}"#;
        let c = ModelConfig::from_json(gemma).unwrap();
        assert_eq!(c.architecture, Architecture::Gemma3);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert!(c.norm_offset && c.sandwich_norms && c.qk_norm);
        assert_eq!(c.embed_scale, Some(1152f32.sqrt()));
        assert_eq!(c.attn_scale, Some(1.0 / 16.0));
        let windows: Vec<_> = (0..6).map(|l| c.layer_window(l)).collect();
        assert_eq!(
            windows,
            [Some(512), Some(512), Some(512), Some(512), Some(512), None]
        );
        assert!(c.local_rope_table(8).is_some());
        // transformers 5 lists the layer types instead.
        let typed = gemma.replace(
            "\"sliding_window_pattern\":6",
            "\"layer_types\":[\"full_attention\",\"sliding_attention\",\"full_attention\",\"sliding_attention\",\"sliding_attention\",\"full_attention\"]",
        );
        let c = ModelConfig::from_json(&typed).unwrap();
        let windows: Vec<_> = (0..6).map(|l| c.layer_window(l).is_some()).collect();
        assert_eq!(windows, [false, true, false, true, true, false]);
        // ... and the RoPE settings per layer type: the same tables as the old layout.
        let v4 = ModelConfig::from_json(gemma).unwrap();
        let v5 = ModelConfig::from_json(&gemma.replace(
            "\"rope_theta\":1000000.0,\"rope_local_base_freq\":10000.0,\"rope_scaling\":null,",
            "\"rope_parameters\":{\"sliding_attention\":{\"rope_type\":\"default\",\
             \"rope_theta\":10000.0},\"full_attention\":{\"rope_type\":\"default\",\
             \"rope_theta\":1000000.0}},",
        ))
        .unwrap();
        assert_eq!(v5, v4);
        assert_eq!(v5.local_rope_theta, Some(10_000.0));
        // Soft-capping is Gemma 2's: in another architecture's config it is refused by name.
        let capped = gemma.replace(
            "\"final_logit_softcapping\":null",
            "\"final_logit_softcapping\":30.0",
        );
        assert!(matches!(
            ModelConfig::from_json(&capped),
            Err(ModelError::ConfigField {
                field: "final_logit_softcapping",
                ..
            })
        ));
        // Gemma 2: caps read, even layers slide, one RoPE base, no q/k norm.
        let gemma2 = gemma
            .replace("Gemma3ForCausalLM", "Gemma2ForCausalLM")
            .replace(
                "\"final_logit_softcapping\":null",
                "\"final_logit_softcapping\":30.0",
            )
            .replace(
                "\"attn_logit_softcapping\":null",
                "\"attn_logit_softcapping\":50.0",
            )
            .replace("\"sliding_window_pattern\":6,", "");
        let c = ModelConfig::from_json(&gemma2).unwrap();
        assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
        let windows: Vec<_> = (0..6).map(|l| c.layer_window(l).is_some()).collect();
        assert_eq!(windows, [true, false, true, false, true, false]);
        assert!(!c.qk_norm && c.local_rope_theta.is_none() && c.sandwich_norms);
        let bad = gemma2.replace("50.0", "-1.0");
        assert!(ModelConfig::from_json(&bad).is_err());
        // Llama keeps one window for every layer (or none).
        let llama = ModelConfig::from_json(SMOLLM2).unwrap();
        assert_eq!(llama.layer_window(3), None);
        assert_eq!(llama.activation, Activation::Silu);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let j = SMOLLM2.replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
        match ModelConfig::from_json(&j) {
            Err(ModelError::UnknownArchitecture { architectures, .. }) => {
                assert_eq!(architectures, vec!["GPTNeoXForCausalLM".to_string()])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let j = SMOLLM2.replace("\"num_key_value_heads\":3", "\"num_key_value_heads\":4");
        assert!(matches!(
            ModelConfig::from_json(&j),
            Err(ModelError::ConfigField {
                field: "num_key_value_heads",
                ..
            })
        ));
        let j = SMOLLM2.replace("\"hidden_size\":576,", "");
        assert!(matches!(
            ModelConfig::from_json(&j),
            Err(ModelError::ConfigField {
                field: "hidden_size",
                ..
            })
        ));
        let j = SMOLLM2.replace(
            "\"rope_scaling\":null",
            "\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4.0}",
        );
        assert!(matches!(
            ModelConfig::from_json(&j),
            Err(ModelError::ConfigField {
                field: "rope_scaling",
                ..
            })
        ));
        assert!(matches!(
            ModelConfig::from_json("{not json"),
            Err(ModelError::ConfigParse { .. })
        ));
    }

    /// Regression (found by tests/fuzz.rs): each of these parsed, then gave NaN or infinite
    /// rotary tables and norms, or sizes whose products overflow in the loader and the engine.
    #[test]
    fn values_that_break_the_forward_are_named() {
        for (from, to, field) in [
            (
                "\"rms_norm_eps\":1e-05",
                "\"rms_norm_eps\":-1",
                "rms_norm_eps",
            ),
            ("\"rope_theta\":100000.0", "\"rope_theta\":0", "rope_theta"),
            (
                "\"rope_theta\":100000.0",
                "\"rope_theta\":1e39",
                "rope_theta",
            ),
            (
                "\"rope_scaling\":null",
                "\"rope_scaling\":{\"type\":\"linear\",\"factor\":0}",
                "rope_scaling.factor",
            ),
            (
                "\"rope_scaling\":null",
                r#""rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":4,"high_freq_factor":4,"original_max_position_embeddings":8192}"#,
                "rope_scaling",
            ),
            (
                "\"rope_theta\":100000.0,\"rope_scaling\":null",
                r#""rope_theta":1e30,"rope_scaling":{"type":"linear","factor":1e30}"#,
                "rope_theta",
            ),
            (
                "\"num_attention_heads\":9",
                "\"num_attention_heads\":6917529027641081856",
                "num_attention_heads",
            ),
            (
                "\"num_hidden_layers\":30",
                "\"num_hidden_layers\":9223372036854775807",
                "num_hidden_layers",
            ),
            (
                "\"vocab_size\":49152",
                "\"vocab_size\":18446744073709551615",
                "vocab_size",
            ),
        ] {
            let j = SMOLLM2.replace(from, to);
            assert_ne!(j, SMOLLM2, "{from}");
            match ModelConfig::from_json(&j) {
                Err(ModelError::ConfigField { field: f, .. }) => assert_eq!(f, field, "{to}"),
                other => panic!("{to}: {other:?}"),
            }
        }
    }

    #[test]
    fn llama3_scaling_matches_reference_formula() {
        // Llama 3.1 8B values: theta 500000, head_dim 128, factor 8, low 1, high 4, orig 8192.
        let j = SMOLLM2
            .replace("\"head_dim\":64", "\"head_dim\":128")
            .replace("\"rope_theta\":100000.0", "\"rope_theta\":500000.0")
            .replace(
                "\"rope_scaling\":null",
                r#""rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
            );
        let c = ModelConfig::from_json(&j).unwrap();
        let f = c.rope_inv_freq(8192);
        // High frequencies (short wavelengths) unchanged, the lowest divided by the factor.
        assert_eq!(f[0], 1.0);
        let base_last = 1.0 / 500000f32.powf(126.0 / 128.0);
        assert!((f[63] - base_last / 8.0).abs() < 1e-12);
        // A middle frequency in the smooth band: wavelen between 2048 and 8192.
        let i = 32;
        let base = 1.0 / 500000f32.powf((2 * i) as f32 / 128.0);
        let wl = 2.0 * std::f32::consts::PI / base;
        assert!(wl > 2048.0 && wl < 8192.0, "pick a band index: {wl}");
        let s = (8192.0 / wl - 1.0) / 3.0;
        assert!((f[i] - ((1.0 - s) * base / 8.0 + s * base)).abs() < 1e-9);
    }

    #[test]
    fn rope_table_layout() {
        let c = ModelConfig::from_json(SMOLLM2).unwrap();
        let t = c.rope_table(3);
        assert_eq!(t.len(), 3 * 64);
        assert_eq!(t[0], 1.0); // cos(0)
        assert_eq!(t[32], 0.0); // sin(0)
        assert!((t[64] - 1f32.cos()).abs() < 1e-7 && (t[64 + 32] - 1f32.sin()).abs() < 1e-7);
    }

    #[test]
    fn mixture_of_experts_configs() {
        let base = r#""hidden_size":64,"intermediate_size":96,"num_hidden_layers":4,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100"#;
        let mixtral = format!(
            r#"{{"architectures":["MixtralForCausalLM"],{base},"num_local_experts":8,
            "num_experts_per_tok":2,"sliding_window":4096}}"#
        );
        let c = ModelConfig::from_json(&mixtral).unwrap();
        assert_eq!(c.architecture, Architecture::Mixtral);
        assert_eq!(
            c.moe,
            Some(MoeConfig {
                num_experts: 8,
                top_k: 2,
                intermediate_size: 96,
                renormalize: true,
                layers: vec![true; 4],
            })
        );
        assert_eq!(c.sliding_window, Some(4096));
        // Qwen3-MoE: every second layer sparse, layer 3 forced dense, no renormalization by
        // default; q/k norms as Qwen3.
        let qwen = format!(
            r#"{{"architectures":["Qwen3MoeForCausalLM"],{base},"num_experts":16,
            "num_experts_per_tok":4,"moe_intermediate_size":32,"decoder_sparse_step":2,
            "mlp_only_layers":[3]}}"#
        );
        let c = ModelConfig::from_json(&qwen).unwrap();
        let m = c.moe.unwrap();
        assert_eq!(m.layers, vec![false, true, false, false]);
        assert_eq!((m.num_experts, m.top_k, m.intermediate_size), (16, 4, 32));
        assert!(!m.renormalize && c.qk_norm);
        let err = |json: String, field: &str| {
            let e = ModelConfig::from_json(&json).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        };
        err(
            mixtral.replace(r#""num_experts_per_tok":2"#, r#""num_experts_per_tok":9"#),
            "num_experts_per_tok",
        );
        err(
            mixtral.replace(r#""num_local_experts":8,"#, ""),
            "num_local_experts",
        );
        err(
            qwen.replace(r#""mlp_only_layers":[3]"#, r#""mlp_only_layers":[4]"#),
            "mlp_only_layers",
        );
        err(
            qwen.replace(r#""decoder_sparse_step":2"#, r#""decoder_sparse_step":0"#),
            "decoder_sparse_step",
        );
        err(
            qwen.replace(
                r#""num_experts":16"#,
                r#""num_experts":16,"shared_expert_intermediate_size":64"#,
            ),
            "shared_expert_intermediate_size",
        );
        // Experts in a dense architecture's config are not silently ignored.
        err(
            mixtral.replace("MixtralForCausalLM", "MistralForCausalLM"),
            "num_local_experts",
        );
    }
}
