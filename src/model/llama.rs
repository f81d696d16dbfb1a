//! The decoder forward shared by Llama, Mistral, Qwen2, Qwen3 and SmolLM, written once over
//! [`Backend`].
//!
//! Per layer: `x = rms_norm(h)`, fused `qkv = x·Wqkvᵀ (+b)`, per-head RMSNorm of q and k
//! where the model has it (Qwen3), rotary on q and k, K/V written to
//! the paged cache, paged attention (decode rows, then prefill rows), `h += attn·Woᵀ`,
//! `x = rms_norm(h)`, `h += down(silu(gate(x)) * up(x))`. The residual add is fused into the
//! next norm. Only the rows in `plan.logits_indices` go through the final norm's output to the
//! LM head.
//!
//! q/k/v and gate/up weights are concatenated at load time so each is one matmul (Phi-3
//! stores them fused already: `qkv_proj`, `gate_up_proj` with gate rows first).
use super::{ModelConfig, ModelError, ModelRunner, WeightFiles};
use crate::backend::cpu::sampling::{sample_row, RowSampling};
use crate::backend::{AttnDims, Backend, BatchPlan, KvCacheDims};
use crate::request::TokenId;
use std::path::Path;

/// Sizes the engine commits to, which fix the workspace and cache allocations.
#[derive(Clone, Copy, Debug)]
pub struct ModelLimits {
    /// Most tokens in one step (`max_num_batched_tokens`).
    pub max_tokens: usize,
    /// Most rows needing logits in one step (`max_num_seqs`).
    pub max_logit_rows: usize,
    /// Longest position + 1 (`max_model_len`), the size of the rotary table.
    pub max_positions: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

struct Layer<B: Backend> {
    input_norm: B::Weight,
    /// `[(heads + 2 * kv_heads) * head_dim, hidden]`
    qkv: B::Weight,
    qkv_bias: Option<B::Weight>,
    /// Per-head RMSNorm weights of q and k, `[head_dim]` each (Qwen3).
    qk_norm: Option<(B::Weight, B::Weight)>,
    /// `[hidden, heads * head_dim]`
    o: B::Weight,
    o_bias: Option<B::Weight>,
    /// The norm before the MLP (`post_attention_layernorm`; Gemma: `pre_feedforward_layernorm`).
    post_norm: B::Weight,
    /// Gemma's norms of the attention and MLP outputs before their residual adds
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`).
    sandwich: Option<(B::Weight, B::Weight)>,
    /// This layer's attention (its sliding window) and whether it uses the local rotary table.
    dims: AttnDims,
    local_rope: bool,
    mlp: Mlp<B>,
}

/// A layer's MLP: dense, or a mixture of experts.
enum Mlp<B: Backend> {
    Dense {
        /// `[2 * intermediate, hidden]`: gate rows then up rows.
        gate_up: B::Weight,
        /// `[hidden, intermediate]`
        down: B::Weight,
    },
    Moe(crate::backend::MoeWeights<B::Weight>),
}

/// Buffers reused every step, sized for `ModelLimits`.
struct Workspace<B: Backend> {
    /// `[max_tokens, hidden]`
    residual: B::Buffer,
    /// `[max_tokens, hidden]`
    normed: B::Buffer,
    /// `[max_tokens, qkv_width]`
    qkv: B::Buffer,
    /// `[max_tokens, heads * head_dim]`
    attn: B::Buffer,
    /// `[max_tokens, hidden]` output of o_proj and down_proj
    proj: B::Buffer,
    /// `[max_tokens, hidden]`: a normed attention/MLP output (sandwich norms only).
    tmp: Option<B::Buffer>,
    /// `[max_tokens, 2 * intermediate]`
    gate_up: B::Buffer,
    /// `[max_tokens, intermediate]`
    act: B::Buffer,
    /// `[max_logit_rows, hidden]`
    gathered: B::Buffer,
    /// `[max_logit_rows, vocab]`
    logits: B::Buffer,
}

pub struct Model<B: Backend> {
    backend: B,
    config: ModelConfig,
    limits: ModelLimits,
    /// `[vocab, hidden]`
    embed: B::Weight,
    /// `[vocab, hidden]`; None when tied to `embed`.
    lm_head: Option<B::Weight>,
    final_norm: B::Weight,
    /// `[max_positions, head_dim]` cos | sin
    cos_sin: B::Weight,
    /// The same for the sliding-window layers when their RoPE base differs (Gemma 3).
    cos_sin_local: Option<B::Weight>,
    layers: Vec<Layer<B>>,
    /// Each layer's K/V blocks, allocated last (their number is decided once the weights and
    /// the workspace are in memory).
    kv: Vec<B::KvCache>,
    ws: Workspace<B>,
    /// Scratch: the step's per-row sampling parameters.
    row_params: Vec<RowSampling>,
}

impl<B: Backend> Model<B> {
    /// Loads the checkpoint in `dir` onto `backend`. `progress(done_bytes, total_bytes)` is
    /// called as tensors are loaded.
    pub fn load(
        backend: B,
        dir: &Path,
        config: ModelConfig,
        limits: ModelLimits,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let n = limits.num_blocks;
        Self::load_sized(backend, dir, config, limits, |_| Ok(n), progress)
    }

    /// As [`Model::load`], with the number of KV blocks (`limits.num_blocks` is ignored) given
    /// by `kv_blocks`, called with the backend once the weights, the rotary tables and the
    /// step workspace are allocated and before any KV block is: what the device has left then
    /// is what the KV cache may take.
    pub fn load_sized<E: From<ModelError>>(
        backend: B,
        dir: &Path,
        config: ModelConfig,
        limits: ModelLimits,
        kv_blocks: impl FnOnce(&B) -> Result<usize, E>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, E> {
        let mut model = Self::load_weights(backend, dir, config, limits, progress)?;
        let num_blocks = kv_blocks(&model.backend)?;
        model.limits.num_blocks = num_blocks;
        let dims = KvCacheDims {
            num_blocks,
            block_size: model.limits.block_size,
            num_kv_heads: model.config.num_key_value_heads,
            head_dim: model.config.head_dim,
        };
        for _ in 0..model.layers.len() {
            let cache = model
                .backend
                .alloc_kv_cache(dims)
                .map_err(ModelError::from)?;
            model.kv.push(cache);
        }
        Ok(model)
    }

    /// Everything but the KV cache.
    fn load_weights(
        mut backend: B,
        dir: &Path,
        config: ModelConfig,
        limits: ModelLimits,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        backend.reserve(crate::backend::StepLimits {
            max_tokens: limits.max_tokens,
            max_seqs: limits.max_logit_rows,
            max_context: limits.max_positions,
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            moe: config.moe.as_ref().map(|m| crate::backend::MoeLimits {
                num_experts: m.num_experts,
                top_k: m.top_k,
                hidden: config.hidden_size,
                intermediate: m.intermediate_size,
            }),
        })?;
        if (config.attn_softcap.is_some() || config.final_softcap.is_some())
            && !backend.supports_softcap()
        {
            return Err(ModelError::Unsupported {
                what: format!(
                    "soft-capping (Gemma 2) on the {} backend: not implemented yet, run with --device cpu",
                    backend.name()
                ),
            });
        }
        if let Some(m) = &config.moe {
            if !backend.supports_moe() {
                return Err(ModelError::Unsupported {
                    what: format!(
                        "mixture-of-experts layers ({} experts) on the {} backend: not implemented yet, run with --device cpu",
                        m.num_experts,
                        backend.name()
                    ),
                });
            }
            if config.activation != super::config::Activation::Silu {
                return Err(ModelError::ConfigField {
                    field: "hidden_act",
                    reason: "experts are SiLU-gated (Mixtral, Qwen3-MoE)".into(),
                });
            }
        }
        let files = WeightFiles::open(dir)?;
        let c = &config;
        let (h, hd, nh, nkv, inter, vocab) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
            c.vocab_size,
        );
        let mut ld = Loader {
            total: files.total_bytes(),
            files: &files,
            backend: &backend,
            done: 0,
            progress,
        };
        let embed = ld.one("model.embed_tokens.weight", &[vocab, h])?;
        let lm_head = if c.tie_word_embeddings && !files.contains("lm_head.weight") {
            None
        } else {
            Some(ld.one("lm_head.weight", &[vocab, h])?)
        };
        let final_norm = ld.norm("model.norm.weight", h, c.norm_offset)?;
        // Not `with_capacity(num_hidden_layers)`: that count comes from config.json and is only
        // vouched for once every layer's weights are found; an absurd one would abort the
        // process on the allocation.
        let mut layers = Vec::new();
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let attn = format!("{p}.self_attn");
            let qkv_bias = if c.qkv_bias {
                Some(ld.rows(&[
                    (format!("{attn}.q_proj.bias"), vec![nh * hd]),
                    (format!("{attn}.k_proj.bias"), vec![nkv * hd]),
                    (format!("{attn}.v_proj.bias"), vec![nkv * hd]),
                ])?)
            } else {
                None
            };
            layers.push(Layer {
                input_norm: ld.norm(&format!("{p}.input_layernorm.weight"), h, c.norm_offset)?,
                qkv: if c.fused_projections() {
                    ld.rows(&[(
                        format!("{attn}.qkv_proj.weight"),
                        vec![(nh + 2 * nkv) * hd, h],
                    )])?
                } else {
                    ld.rows(&[
                        (format!("{attn}.q_proj.weight"), vec![nh * hd, h]),
                        (format!("{attn}.k_proj.weight"), vec![nkv * hd, h]),
                        (format!("{attn}.v_proj.weight"), vec![nkv * hd, h]),
                    ])?
                },
                qkv_bias,
                qk_norm: if c.qk_norm {
                    Some((
                        ld.norm(&format!("{attn}.q_norm.weight"), hd, c.norm_offset)?,
                        ld.norm(&format!("{attn}.k_norm.weight"), hd, c.norm_offset)?,
                    ))
                } else {
                    None
                },
                o: ld.one(&format!("{attn}.o_proj.weight"), &[h, nh * hd])?,
                o_bias: if c.o_bias {
                    Some(ld.one(&format!("{attn}.o_proj.bias"), &[h])?)
                } else {
                    None
                },
                post_norm: if c.sandwich_norms {
                    ld.norm(
                        &format!("{p}.pre_feedforward_layernorm.weight"),
                        h,
                        c.norm_offset,
                    )?
                } else {
                    ld.norm(
                        &format!("{p}.post_attention_layernorm.weight"),
                        h,
                        c.norm_offset,
                    )?
                },
                sandwich: if c.sandwich_norms {
                    Some((
                        ld.norm(
                            &format!("{p}.post_attention_layernorm.weight"),
                            h,
                            c.norm_offset,
                        )?,
                        ld.norm(
                            &format!("{p}.post_feedforward_layernorm.weight"),
                            h,
                            c.norm_offset,
                        )?,
                    ))
                } else {
                    None
                },
                dims: AttnDims {
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                    scale: c.attn_scale.unwrap_or(1.0 / (hd as f32).sqrt()),
                    sliding_window: c.layer_window(l),
                    softcap: c.attn_softcap,
                },
                local_rope: c.local_rope_theta.is_some() && c.layer_window(l).is_some(),
                mlp: match &c.moe {
                    Some(m) if m.layers[l] => Mlp::Moe(ld.experts(&p, c, m)?),
                    _ => Mlp::Dense {
                        gate_up: if c.fused_projections() {
                            ld.rows(&[(
                                format!("{p}.mlp.gate_up_proj.weight"),
                                vec![2 * inter, h],
                            )])?
                        } else {
                            ld.rows(&[
                                (format!("{p}.mlp.gate_proj.weight"), vec![inter, h]),
                                (format!("{p}.mlp.up_proj.weight"), vec![inter, h]),
                            ])?
                        },
                        down: ld.one(&format!("{p}.mlp.down_proj.weight"), &[h, inter])?,
                    },
                },
            });
        }
        let table = config.rope_table(limits.max_positions);
        let table_shape = [limits.max_positions, c.rotary_dim];
        let cos_sin = backend.load_table(crate::backend::HostTensor {
            dtype: crate::backend::HostDType::F32,
            shape: &table_shape,
            data: bytemuck::cast_slice(&table),
        })?;
        let cos_sin_local = match config.local_rope_table(limits.max_positions) {
            Some(t) => Some(backend.load_table(crate::backend::HostTensor {
                dtype: crate::backend::HostDType::F32,
                shape: &table_shape,
                data: bytemuck::cast_slice(&t),
            })?),
            None => None,
        };
        let dims = AttnDims {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            scale: c.attn_scale.unwrap_or(1.0 / (hd as f32).sqrt()),
            sliding_window: c.sliding_window,
            softcap: c.attn_softcap,
        };
        let t = limits.max_tokens;
        let r = limits.max_logit_rows;
        let ws = Workspace {
            residual: backend.alloc(t * h)?,
            normed: backend.alloc(t * h)?,
            qkv: backend.alloc(t * dims.qkv_width())?,
            attn: backend.alloc(t * dims.q_width())?,
            proj: backend.alloc(t * h)?,
            tmp: if c.sandwich_norms {
                Some(backend.alloc(t * h)?)
            } else {
                None
            },
            gate_up: backend.alloc(t * 2 * inter)?,
            act: backend.alloc(t * inter)?,
            gathered: backend.alloc(r * h)?,
            logits: backend.alloc(r * vocab)?,
        };
        Ok(Self {
            backend,
            config,
            limits,
            embed,
            lm_head,
            final_norm,
            cos_sin,
            cos_sin_local,
            layers,
            kv: Vec::new(),
            ws,
            row_params: Vec::new(),
        })
    }

    pub fn limits(&self) -> ModelLimits {
        self.limits
    }

    /// One forward step; fills `logits` with `[plan.logits_indices.len(), vocab]`.
    pub fn forward(&mut self, plan: &BatchPlan, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        let rows = self.run(plan)?;
        logits.resize(rows * self.config.vocab_size, 0.0);
        self.backend.to_host(&self.ws.logits, logits)?;
        Ok(())
    }

    /// One forward step where the rows with `Some` parameters get their token picked by the
    /// backend (`tokens[row]`, without the logits leaving the device) and, when any row is
    /// `None`, `logits` receives every row (`[rows, vocab]`) for the host sampler.
    pub fn forward_sampled(
        &mut self,
        plan: &BatchPlan,
        params: &[Option<RowSampling>],
        tokens: &mut Vec<TokenId>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let rows = self.run(plan)?;
        if params.len() != rows {
            return Err(ModelError::Backend(crate::backend::BackendError::Shape {
                op: "forward_sampled",
                expected: format!("{rows} sampling rows"),
                got: params.len().to_string(),
            }));
        }
        let vocab = self.config.vocab_size;
        let on_host = params.iter().any(Option::is_none);
        if on_host {
            logits.resize(rows * vocab, 0.0);
            self.backend.to_host(&self.ws.logits, logits)?;
        }
        self.row_params.clear();
        self.row_params
            .extend(params.iter().map(|p| p.unwrap_or(RowSampling::GREEDY)));
        if on_host && !self.backend.samples_on_device() {
            // The logits are on the host already: pick the other rows there too.
            tokens.clear();
            tokens.extend(
                logits
                    .chunks_exact(vocab.max(1))
                    .zip(&self.row_params)
                    .map(|(row, p)| sample_row(row, p)),
            );
        } else if self.row_params.iter().all(RowSampling::is_greedy) {
            self.backend
                .argmax_rows(&self.ws.logits, rows, vocab, tokens)?;
        } else {
            self.backend
                .sample_rows(&self.ws.logits, vocab, &self.row_params, tokens)?;
        }
        Ok(())
    }

    /// Runs the step's ops up to the logits (left in the workspace); returns the number of
    /// logits rows of the plan.
    fn run(&mut self, plan: &BatchPlan) -> Result<usize, ModelError> {
        let n = plan.num_tokens();
        let rows = plan.logits_indices.len();
        if n == 0 || n > self.limits.max_tokens || rows > self.limits.max_logit_rows {
            return Err(ModelError::Backend(crate::backend::BackendError::Shape {
                op: "forward",
                expected: format!(
                    "1..={} tokens and <= {} logit rows",
                    self.limits.max_tokens, self.limits.max_logit_rows
                ),
                got: format!("{n} tokens, {rows} logit rows"),
            }));
        }
        let b = &self.backend;
        let c = &self.config;
        let eps = c.rms_norm_eps;
        let ws = &mut self.ws;
        // The device may pad a decode batch to a shape it replays; only the first `rows` logit
        // rows are read back.
        let padded = b.pad_plan(plan);
        let plan = padded.as_ref();
        let (n, padded_rows) = (plan.num_tokens(), plan.logits_indices.len());
        let step = b.prepare_step(plan)?;
        let (layers, embed, final_norm) = (&self.layers, &self.embed, &self.final_norm);
        let kv = &mut self.kv;
        let (cos_sin, lm_head) = (&self.cos_sin, &self.lm_head);
        let cos_sin_local = self.cos_sin_local.as_ref();
        b.run_step(&step, &mut || {
            b.embedding(embed, &step, &mut ws.residual);
            if let Some(s) = c.embed_scale {
                b.scale(&mut ws.residual, n * c.hidden_size, s);
            }
            if let Some(first) = layers.first() {
                b.rms_norm(&ws.residual, &first.input_norm, eps, &mut ws.normed, n);
            }
            for i in 0..layers.len() {
                let (layer, rest) = (&layers[i], &layers[i + 1..]);
                let cache = &mut kv[i];
                let dims = layer.dims;
                // The residual add after the MLP is fused with the next layer's input norm.
                let next_norm = rest.first().map_or(final_norm, |l| &l.input_norm);
                b.matmul(
                    &ws.normed,
                    &layer.qkv,
                    layer.qkv_bias.as_ref(),
                    &mut ws.qkv,
                    n,
                );
                if let Some((qn, kn)) = &layer.qk_norm {
                    b.qk_norm(&mut ws.qkv, qn, kn, eps, n, dims);
                }
                let table = match (layer.local_rope, cos_sin_local) {
                    (true, Some(t)) => t,
                    _ => cos_sin,
                };
                b.rope(&mut ws.qkv, table, &step, dims);
                b.write_kv(&ws.qkv, cache, &step, dims);
                b.paged_attention_decode(&ws.qkv, cache, &step, dims, &mut ws.attn);
                b.paged_attention_prefill(&ws.qkv, cache, &step, dims, &mut ws.attn);
                b.matmul(&ws.attn, &layer.o, layer.o_bias.as_ref(), &mut ws.proj, n);
                // residual += attention (normed first with sandwich norms); normed = the MLP's
                // input norm of the residual.
                match (&layer.sandwich, ws.tmp.as_mut()) {
                    (Some((post_attn, _)), Some(tmp)) => {
                        b.rms_norm(&ws.proj, post_attn, eps, tmp, n);
                        b.add_rms_norm(
                            &mut ws.residual,
                            tmp,
                            &layer.post_norm,
                            eps,
                            &mut ws.normed,
                            n,
                        );
                    }
                    _ => b.add_rms_norm(
                        &mut ws.residual,
                        &ws.proj,
                        &layer.post_norm,
                        eps,
                        &mut ws.normed,
                        n,
                    ),
                }
                match &layer.mlp {
                    Mlp::Dense { gate_up, down } => {
                        b.matmul(&ws.normed, gate_up, None, &mut ws.gate_up, n);
                        match c.activation {
                            super::config::Activation::Silu => {
                                b.silu_mul(&ws.gate_up, &mut ws.act, n, c.intermediate_size)
                            }
                            super::config::Activation::GeluTanh => {
                                b.gelu_tanh_mul(&ws.gate_up, &mut ws.act, n, c.intermediate_size)
                            }
                        }
                        b.matmul(&ws.act, down, None, &mut ws.proj, n);
                    }
                    Mlp::Moe(experts) => b.moe(&ws.normed, experts, n, &mut ws.proj),
                }
                match (&layer.sandwich, ws.tmp.as_mut()) {
                    (Some((_, post_ff)), Some(tmp)) => {
                        b.rms_norm(&ws.proj, post_ff, eps, tmp, n);
                        b.add_rms_norm(&mut ws.residual, tmp, next_norm, eps, &mut ws.normed, n);
                    }
                    _ => b.add_rms_norm(
                        &mut ws.residual,
                        &ws.proj,
                        next_norm,
                        eps,
                        &mut ws.normed,
                        n,
                    ),
                }
            }
            b.gather_rows(&ws.normed, &step, c.hidden_size, &mut ws.gathered);
            let head = lm_head.as_ref().unwrap_or(embed);
            b.matmul(&ws.gathered, head, None, &mut ws.logits, padded_rows);
            if let Some(cap) = c.final_softcap {
                b.softcap(&mut ws.logits, padded_rows * c.vocab_size, cap);
            }
        })?;
        Ok(rows)
    }
}

/// The weight names of one expert's gate, up and down projections.
fn expert_names(c: &ModelConfig, layer: &str, e: usize) -> [String; 3] {
    match c.architecture {
        super::config::Architecture::Mixtral => {
            let x = format!("{layer}.block_sparse_moe.experts.{e}");
            [
                format!("{x}.w1.weight"),
                format!("{x}.w3.weight"),
                format!("{x}.w2.weight"),
            ]
        }
        _ => {
            let x = format!("{layer}.mlp.experts.{e}");
            [
                format!("{x}.gate_proj.weight"),
                format!("{x}.up_proj.weight"),
                format!("{x}.down_proj.weight"),
            ]
        }
    }
}

/// Loads tensors by name onto the backend, reporting progress in bytes.
struct Loader<'a, B: Backend> {
    files: &'a WeightFiles,
    backend: &'a B,
    done: usize,
    total: usize,
    progress: &'a mut dyn FnMut(usize, usize),
}

impl<B: Backend> Loader<'_, B> {
    /// The router and experts of MoE layer `layer` (its weight-name prefix).
    fn experts(
        &mut self,
        layer: &str,
        c: &ModelConfig,
        m: &super::config::MoeConfig,
    ) -> Result<crate::backend::MoeWeights<B::Weight>, ModelError> {
        let (h, inter) = (c.hidden_size, m.intermediate_size);
        let router = match c.architecture {
            super::config::Architecture::Mixtral => format!("{layer}.block_sparse_moe.gate.weight"),
            _ => format!("{layer}.mlp.gate.weight"),
        };
        let router = self.one(&router, &[m.num_experts, h])?;
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..m.num_experts {
            let [g, u, d] = expert_names(c, layer, e);
            gate_up.push(self.rows(&[(g, vec![inter, h]), (u, vec![inter, h])])?);
            down.push(self.one(&d, &[h, inter])?);
        }
        Ok(crate::backend::MoeWeights {
            router,
            gate_up,
            down,
            top_k: m.top_k,
            renormalize: m.renormalize,
            hidden: h,
            intermediate: inter,
        })
    }

    fn one(&mut self, name: &str, shape: &[usize]) -> Result<B::Weight, ModelError> {
        let t = self.files.get_checked(name, shape)?;
        self.tick(t.data.len());
        let w = self.backend.load_weight(t)?;
        self.files.release(name);
        Ok(w)
    }

    /// A norm weight `[dim]`; with `offset`, stored as `1 + w` (Gemma's RMSNorm), so every
    /// backend's plain RMSNorm applies it.
    fn norm(&mut self, name: &str, dim: usize, offset: bool) -> Result<B::Weight, ModelError> {
        if !offset {
            return self.one(name, &[dim]);
        }
        let t = self.files.get_checked(name, &[dim])?;
        self.tick(t.data.len());
        let w: Vec<f32> = t.to_f32().iter().map(|v| 1.0 + v).collect();
        Ok(self.backend.load_weight(crate::backend::HostTensor {
            dtype: crate::backend::HostDType::F32,
            shape: &[dim],
            data: bytemuck::cast_slice(&w),
        })?)
    }

    /// Several tensors concatenated along rows into one weight.
    fn rows(&mut self, parts: &[(String, Vec<usize>)]) -> Result<B::Weight, ModelError> {
        let ts = parts
            .iter()
            .map(|(n, s)| self.files.get_checked(n, s))
            .collect::<Result<Vec<_>, _>>()?;
        self.tick(ts.iter().map(|t| t.data.len()).sum());
        let w = self.backend.load_weight_rows(&ts)?;
        for (n, _) in parts {
            self.files.release(n);
        }
        Ok(w)
    }

    fn tick(&mut self, bytes: usize) {
        self.done += bytes;
        (self.progress)(self.done.min(self.total), self.total);
    }
}

impl<B: Backend> ModelRunner for Model<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn backend_name(&self) -> &'static str {
        self.backend.name()
    }
    fn execute(&mut self, plan: &BatchPlan, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        self.forward(plan, logits)
    }

    fn samples_on_device(&self) -> bool {
        self.backend.samples_on_device()
    }

    fn execute_sampled(
        &mut self,
        plan: &BatchPlan,
        params: &[Option<RowSampling>],
        tokens: &mut Vec<TokenId>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.forward_sampled(plan, params, tokens, logits)
    }

    fn device_time_ns(&self) -> u64 {
        self.backend.device_time_ns()
    }

    fn kv_dtype(&self) -> &'static str {
        match B::KV_ELEMENT_BYTES {
            4 => "f32",
            _ => "bf16",
        }
    }

    fn read_kv_blocks(&self, blocks: &[usize], out: &mut [u8]) -> Result<(), ModelError> {
        Ok(self.backend.read_kv_blocks(&self.kv, blocks, out)?)
    }

    fn write_kv_blocks(&mut self, blocks: &[usize], data: &[u8]) -> Result<(), ModelError> {
        Ok(self.backend.write_kv_blocks(&mut self.kv, blocks, data)?)
    }

    fn read_kv_blocks_async(
        &self,
        blocks: &[usize],
        bytes: usize,
    ) -> Result<Box<dyn crate::backend::PendingKvRead>, ModelError> {
        Ok(self.backend.read_kv_blocks_async(&self.kv, blocks, bytes)?)
    }
}
