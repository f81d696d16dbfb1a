//! The `Backend` trait: the small set of device operations the model forward needs.
//!
//! The model is written once over this trait; a device (CPU now, CUDA next) only adds an
//! implementation. Work is split the way FlashInfer splits attention: once per step the engine
//! builds a host-side [`BatchPlan`] (token ids, positions, slot mapping, block tables) and the
//! backend turns it into a [`Backend::Step`] (uploading it where needed); every per-layer op then
//! takes that step object, so per-layer calls carry no host data and can be graph-captured.
//!
//! Layout conventions (row-major everywhere):
//! - activations `[num_tokens, width]`;
//! - a fused `qkv` row is `[num_heads + 2 * num_kv_heads, head_dim]`: query heads, then keys,
//!   then values;
//! - the K and V caches of one layer are each `[num_blocks, block_size, num_kv_heads, head_dim]`;
//!   token `t` of a sequence lives at slot `block_table[t / block_size] * block_size +
//!   t % block_size`.
//! - In a batch, the decode sequences (one query token each) come first, then the prefill
//!   (chunk) sequences.
pub mod cpu;
pub mod cuda;

use crate::request::TokenId;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("out of {device} memory allocating {bytes} bytes for {what}")]
    OutOfMemory {
        device: &'static str,
        what: &'static str,
        bytes: usize,
    },
    #[error("device {requested} is not available: {reason}")]
    DeviceUnavailable { requested: String, reason: String },
    #[error("compiling kernel {kernel} for {arch}: {reason}")]
    KernelCompile {
        kernel: String,
        arch: String,
        reason: String,
    },
    #[error("{op}: expected {expected}, got {got}")]
    Shape {
        op: &'static str,
        expected: String,
        got: String,
    },
}

pub type BackendResult<T> = std::result::Result<T, BackendError>;

/// The shape of `parts` stacked along their first dimension (fused qkv / gate_up weights); an
/// error when their row widths differ.
pub fn stacked_rows_shape(parts: &[HostTensor<'_>]) -> BackendResult<Vec<usize>> {
    let Some(first) = parts.first() else {
        return Ok(vec![0]);
    };
    let width = &first.shape[1..];
    let mut rows = 0;
    for p in parts {
        if &p.shape[1..] != width {
            return Err(BackendError::Shape {
                op: "load_weight_rows",
                expected: format!("rows of shape {width:?}"),
                got: format!("{:?}", p.shape),
            });
        }
        rows += p.shape[0];
    }
    let mut shape = vec![rows];
    shape.extend_from_slice(width);
    Ok(shape)
}

/// Element type of a host tensor handed to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostDType {
    F32,
    F16,
    BF16,
}

impl HostDType {
    pub fn size(self) -> usize {
        match self {
            HostDType::F32 => 4,
            HostDType::F16 | HostDType::BF16 => 2,
        }
    }
}

/// A tensor in host memory (often a view into a memory-mapped safetensors file), little endian.
#[derive(Clone, Copy, Debug)]
pub struct HostTensor<'a> {
    pub dtype: HostDType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl HostTensor<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Decodes the elements to f32 (exact for f16/bf16).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            HostDType::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            HostDType::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            HostDType::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

/// Head geometry of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDims {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Softmax scale, normally `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Attend only to the last `window` positions (Mistral-style sliding window).
    pub sliding_window: Option<usize>,
    /// Scores soft-capped to `c · tanh(s / c)` after scaling (Gemma 2).
    pub softcap: Option<f32>,
}

impl AttnDims {
    /// Width of a fused qkv row.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }
    /// Width of the attention output row.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// One mixture-of-experts MLP as a backend holds it (SiLU-gated experts).
pub struct MoeWeights<W> {
    /// `[num_experts, hidden]`
    pub router: W,
    /// Per expert `[2 * intermediate, hidden]`: gate rows, then up rows.
    pub gate_up: Vec<W>,
    /// Per expert `[hidden, intermediate]`.
    pub down: Vec<W>,
    pub top_k: usize,
    /// Rescale the chosen experts' probabilities to sum to 1 (Mixtral; Qwen3-MoE's
    /// `norm_topk_prob`).
    pub renormalize: bool,
    pub hidden: usize,
    pub intermediate: usize,
}

/// Geometry of the paged KV cache of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheDims {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheDims {
    /// Elements in one of K or V: `num_blocks * block_size * num_kv_heads * head_dim`.
    pub fn numel(&self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Elements of one block in one of K or V: `block_size * num_kv_heads * head_dim`.
    pub fn block_numel(&self) -> usize {
        self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Checks a block index and a host buffer of one block's K and V at `element_bytes`.
    pub fn check_block(
        &self,
        op: &'static str,
        block: usize,
        bytes: usize,
        element_bytes: usize,
    ) -> BackendResult<()> {
        let want = 2 * self.block_numel() * element_bytes;
        if block >= self.num_blocks || bytes != want {
            return Err(BackendError::Shape {
                op,
                expected: format!("block < {} and {want} bytes", self.num_blocks),
                got: format!("block {block} and {bytes} bytes"),
            });
        }
        Ok(())
    }
}

/// A batched KV read in flight ([`Backend::read_kv_blocks_async`]).
pub trait PendingKvRead: Send {
    /// Waits for the copy and gives its bytes, laid out as [`Backend::read_kv_blocks`]' `out`.
    fn wait(self: Box<Self>) -> BackendResult<Vec<u8>>;
}

/// A read that was done when it was asked for.
pub struct ReadyKvRead(pub Vec<u8>);

impl PendingKvRead for ReadyKvRead {
    fn wait(self: Box<Self>) -> BackendResult<Vec<u8>> {
        Ok(self.0)
    }
}

/// The bytes of one layer's piece of one block in a buffer of `bytes` holding `blocks` ×
/// `layers` pieces ([`Backend::read_kv_blocks`]' layout); `None` when there is nothing to copy,
/// an error when the buffer does not split evenly (each piece's own size is checked where it
/// is copied).
pub fn kv_piece_bytes(
    op: &'static str,
    layers: usize,
    blocks: &[usize],
    bytes: usize,
) -> BackendResult<Option<usize>> {
    let pieces = layers * blocks.len();
    if pieces == 0 && bytes == 0 {
        return Ok(None);
    }
    if pieces == 0 || bytes == 0 || !bytes.is_multiple_of(pieces) {
        return Err(BackendError::Shape {
            op,
            expected: format!("{} blocks × {layers} layers of equal pieces", blocks.len()),
            got: format!("{bytes} bytes"),
        });
    }
    Ok(Some(bytes / pieces))
}

/// One sequence's slice of the step's token batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqPlan {
    /// First row of this sequence in the token batch.
    pub query_start: usize,
    /// Tokens computed this step (1 for decode).
    pub query_len: usize,
    /// Tokens in the context once this step is done (cached prefix + this step's tokens);
    /// the query tokens are positions `context_len - query_len .. context_len`.
    pub context_len: usize,
}

/// Host-side description of one forward step, built by the engine.
#[derive(Clone, Debug, Default)]
pub struct BatchPlan {
    /// `[num_tokens]`
    pub token_ids: Vec<TokenId>,
    /// `[num_tokens]` absolute position of each token.
    pub positions: Vec<u32>,
    /// `[num_tokens]` cache slot (block * block_size + offset) the token's K/V is written to.
    pub slot_mapping: Vec<u32>,
    /// `[num_seqs]`, decodes first.
    pub seqs: Vec<SeqPlan>,
    /// How many of `seqs` (from the front) are decodes with `query_len == 1`.
    pub num_decode_seqs: usize,
    /// `[num_seqs, max_blocks_per_seq]` padded with 0.
    pub block_tables: Vec<u32>,
    pub max_blocks_per_seq: usize,
    /// Rows of the batch whose logits are wanted (the last token of each sequence that samples).
    pub logits_indices: Vec<u32>,
}

impl BatchPlan {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
    /// Rows belonging to decode sequences (they are the first rows of the batch).
    pub fn num_decode_tokens(&self) -> usize {
        self.num_decode_seqs
    }
    pub fn block_table(&self, seq: usize) -> &[u32] {
        let w = self.max_blocks_per_seq;
        &self.block_tables[seq * w..(seq + 1) * w]
    }
}

/// The largest step a model will run, told to the backend before any weight is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLimits {
    /// Most tokens in one step.
    pub max_tokens: usize,
    /// Most sequences in one step.
    pub max_seqs: usize,
    /// Longest context (`max_model_len`).
    pub max_context: usize,
    /// The model's widest attention (query heads and head size), so that the backend can
    /// allocate its attention scratch before the KV cache is sized from what is left.
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The model's mixture-of-experts layers (None: dense), so that the backend can allocate
    /// their routing and expert scratch for `max_tokens` before the KV cache is sized too.
    pub moe: Option<MoeLimits>,
}

/// The shape of a model's mixture-of-experts layers, as [`StepLimits`] tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeLimits {
    pub num_experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub intermediate: usize,
}

/// The operations of one device. Buffers are allocated once with a capacity and reused every
/// step; ops take the number of rows they work on.
pub trait Backend: Send + Sync + 'static {
    /// Activations in the device's compute dtype.
    type Buffer: Send;
    /// A parameter tensor resident on the device.
    type Weight: Send + Sync;
    /// One layer's K and V block storage.
    type KvCache: Send;
    /// A [`BatchPlan`] made ready for the device.
    type Step;
    /// Bytes of one element of the paged KV cache (the dtype `alloc_kv_cache` stores). The
    /// engine sizes the pool with it and never assumes one.
    const KV_ELEMENT_BYTES: usize;

    fn name(&self) -> &'static str;

    // ---- set-up and step shape (defaults: nothing to do) ----
    /// Sizes what the backend keeps across steps.
    fn reserve(&mut self, _limits: StepLimits) -> BackendResult<()> {
        Ok(())
    }
    /// `(free, total)` bytes of the device's memory, where the device has its own (the CPU
    /// backend shares the host's and says None).
    fn memory_info(&self) -> Option<(usize, usize)> {
        None
    }
    /// Nanoseconds the device spent running steps so far (the span from each step's first
    /// kernel to its last, on the device's clock); 0 where the backend cannot tell.
    fn device_time_ns(&self) -> u64 {
        0
    }
    /// The plan as the device runs it. A device that replays captured steps pads a decode batch
    /// to a captured size; rows past the original plan's are padding whose results are ignored.
    fn pad_plan<'a>(&self, plan: &'a BatchPlan) -> std::borrow::Cow<'a, BatchPlan> {
        std::borrow::Cow::Borrowed(plan)
    }
    /// Runs `forward`, the ops of one step (up to the logits). A device with graphs captures a
    /// decode step of a padded shape once and replays it after.
    fn run_step(&self, _step: &Self::Step, forward: &mut dyn FnMut()) -> BackendResult<()> {
        forward();
        Ok(())
    }

    // ---- memory ----
    /// A buffer of `len` elements.
    fn alloc(&self, len: usize) -> BackendResult<Self::Buffer>;
    /// Uploads a parameter, converting to the device's weight dtype.
    fn load_weight(&self, t: HostTensor<'_>) -> BackendResult<Self::Weight>;
    /// Uploads a lookup table that must keep f32 precision whatever the weight dtype (the
    /// rotary cos/sin table).
    fn load_table(&self, t: HostTensor<'_>) -> BackendResult<Self::Weight>;
    /// Concatenates tensors of equal row width along rows (fused qkv / gate_up projections).
    fn load_weight_rows(&self, parts: &[HostTensor<'_>]) -> BackendResult<Self::Weight>;
    fn alloc_kv_cache(&self, dims: KvCacheDims) -> BackendResult<Self::KvCache>;
    /// Copies block `block` of one layer's cache to the host: its K bytes then its V bytes
    /// (`2 * block_size * num_kv_heads * head_dim * KV_ELEMENT_BYTES` in `out`), as stored.
    fn read_kv_block(
        &self,
        cache: &Self::KvCache,
        block: usize,
        out: &mut [u8],
    ) -> BackendResult<()>;
    /// Overwrites block `block` of one layer's cache with bytes laid out as
    /// [`Backend::read_kv_block`] gives them.
    fn write_kv_block(
        &self,
        cache: &mut Self::KvCache,
        block: usize,
        data: &[u8],
    ) -> BackendResult<()>;
    /// Copies `blocks` of every layer of `caches` to the host in one go: block after block,
    /// each block's layers in order, each layer as [`Backend::read_kv_block`] lays it out (so
    /// `out` holds one tier payload per block, back to back). Devices with their own memory
    /// gather on the device and copy once; this default reads block by block and layer by layer.
    fn read_kv_blocks(
        &self,
        caches: &[Self::KvCache],
        blocks: &[usize],
        out: &mut [u8],
    ) -> BackendResult<()> {
        let Some(per_layer) = kv_piece_bytes("read_kv_blocks", caches.len(), blocks, out.len())?
        else {
            return Ok(());
        };
        for (&b, chunk) in blocks
            .iter()
            .zip(out.chunks_exact_mut(per_layer * caches.len()))
        {
            for (c, piece) in caches.iter().zip(chunk.chunks_exact_mut(per_layer)) {
                self.read_kv_block(c, b, piece)?;
            }
        }
        Ok(())
    }
    /// [`Backend::read_kv_blocks`] (of `bytes` in all) without waiting for the copy where the
    /// device copies asynchronously: the bytes come from the handle's
    /// [`PendingKvRead::wait`], which another thread may call (the tiers' offload: the engine
    /// thread only starts the copy). This default reads at once.
    fn read_kv_blocks_async(
        &self,
        caches: &[Self::KvCache],
        blocks: &[usize],
        bytes: usize,
    ) -> BackendResult<Box<dyn PendingKvRead>> {
        let mut out = vec![0u8; bytes];
        self.read_kv_blocks(caches, blocks, &mut out)?;
        Ok(Box::new(ReadyKvRead(out)))
    }
    /// Overwrites `blocks` of every layer of `caches` from bytes laid out as
    /// [`Backend::read_kv_blocks`] gives them.
    fn write_kv_blocks(
        &self,
        caches: &mut [Self::KvCache],
        blocks: &[usize],
        data: &[u8],
    ) -> BackendResult<()> {
        let Some(per_layer) = kv_piece_bytes("write_kv_blocks", caches.len(), blocks, data.len())?
        else {
            return Ok(());
        };
        for (&b, chunk) in blocks
            .iter()
            .zip(data.chunks_exact(per_layer * caches.len()))
        {
            for (c, piece) in caches.iter_mut().zip(chunk.chunks_exact(per_layer)) {
                self.write_kv_block(c, b, piece)?;
            }
        }
        Ok(())
    }
    /// Copies the first `out.len()` elements of `buf` to the host as f32.
    fn to_host(&self, buf: &Self::Buffer, out: &mut [f32]) -> BackendResult<()>;
    /// Prepares the step's metadata (uploads it on devices with their own memory).
    fn prepare_step(&self, plan: &BatchPlan) -> BackendResult<Self::Step>;

    // ---- ops ----
    /// `out[t] = table[token_ids[t]]`, table `[vocab, hidden]`.
    fn embedding(&self, table: &Self::Weight, step: &Self::Step, out: &mut Self::Buffer);
    /// `out[m, n] = x[m, k] · w[n, k]ᵀ (+ bias[n])`. Must be batch invariant: row `i` of the
    /// result does not depend on `m` or on the other rows.
    fn matmul(
        &self,
        x: &Self::Buffer,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        out: &mut Self::Buffer,
        m: usize,
    );
    /// `out[r] = x[r] / rms(x[r]) * weight` for `rows` rows.
    fn rms_norm(
        &self,
        x: &Self::Buffer,
        weight: &Self::Weight,
        eps: f32,
        out: &mut Self::Buffer,
        rows: usize,
    );
    /// Fused `residual += x; out = rms_norm(residual)`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Buffer,
        x: &Self::Buffer,
        weight: &Self::Weight,
        eps: f32,
        out: &mut Self::Buffer,
        rows: usize,
    );
    /// Rotates the query and key heads of `qkv` in place (neox/HF "rotate_half" layout) using
    /// `cos_sin`: `[max_positions, rotary_dim]` with cos in the first half of a row and sin in
    /// the second. The first `rotary_dim` dimensions of each head rotate (all of them unless
    /// the model's rotary embedding is partial); the others are left as they are.
    fn rope(
        &self,
        qkv: &mut Self::Buffer,
        cos_sin: &Self::Weight,
        step: &Self::Step,
        dims: AttnDims,
    );
    /// RMS-normalizes each query head of `qkv`'s first `rows` rows with `q_weight` and each key
    /// head with `k_weight` (both `[head_dim]`), in place (Qwen3's `q_norm`/`k_norm`).
    fn qk_norm(
        &self,
        qkv: &mut Self::Buffer,
        q_weight: &Self::Weight,
        k_weight: &Self::Weight,
        eps: f32,
        rows: usize,
        dims: AttnDims,
    );
    /// `out[t, i] = gelu_tanh(gate_up[t, i]) * gate_up[t, inter + i]` (GeGLU: Gemma).
    fn gelu_tanh_mul(
        &self,
        gate_up: &Self::Buffer,
        out: &mut Self::Buffer,
        rows: usize,
        inter: usize,
    );
    /// `x[i] *= factor` for the first `n` elements (Gemma's embedding scale).
    fn scale(&self, x: &mut Self::Buffer, n: usize, factor: f32);
    /// `out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]`.
    fn silu_mul(&self, gate_up: &Self::Buffer, out: &mut Self::Buffer, rows: usize, inter: usize);
    /// Whether soft-capping (of attention scores, [`AttnDims::softcap`], and of logits,
    /// [`Backend::softcap`]) runs on this backend.
    fn supports_softcap(&self) -> bool {
        false
    }
    /// `x[i] = cap · tanh(x[i] / cap)` for the first `n` values (Gemma 2's final logits).
    fn softcap(&self, x: &mut Self::Buffer, n: usize, cap: f32);
    /// Whether [`Backend::moe`] runs on this backend.
    fn supports_moe(&self) -> bool {
        false
    }
    /// The mixture-of-experts MLP of `rows` rows of `x` (`[rows, hidden]`) into `out`
    /// (`[rows, hidden]`): router logits, each row's experts and weights by
    /// [`cpu::moe::route`], each expert's SiLU-gated MLP over the rows routed to it (one GEMM
    /// per projection and expert), the outputs summed with the routing weights.
    fn moe(
        &self,
        x: &Self::Buffer,
        moe: &MoeWeights<Self::Weight>,
        rows: usize,
        out: &mut Self::Buffer,
    );
    /// Writes each token's K and V (from `qkv`) into its cache slot.
    fn write_kv(
        &self,
        qkv: &Self::Buffer,
        cache: &mut Self::KvCache,
        step: &Self::Step,
        dims: AttnDims,
    );
    /// Attention of the decode sequences' single query token over their cached context.
    /// Writes rows `0..num_decode_tokens` of `out` (`[num_tokens, num_heads * head_dim]`).
    fn paged_attention_decode(
        &self,
        qkv: &Self::Buffer,
        cache: &Self::KvCache,
        step: &Self::Step,
        dims: AttnDims,
        out: &mut Self::Buffer,
    );
    /// Causal attention of the prefill chunks over cached prefix + chunk. Writes the rows of
    /// the prefill sequences.
    fn paged_attention_prefill(
        &self,
        qkv: &Self::Buffer,
        cache: &Self::KvCache,
        step: &Self::Step,
        dims: AttnDims,
        out: &mut Self::Buffer,
    );
    /// The argmax of each of the first `rows` rows of `logits` (`[rows, vocab]`), lowest id on
    /// ties: greedy sampling where only token ids need to leave the device.
    fn argmax_rows(
        &self,
        logits: &Self::Buffer,
        rows: usize,
        vocab: usize,
        out: &mut Vec<u32>,
    ) -> BackendResult<()> {
        let mut host = vec![0f32; rows * vocab];
        self.to_host(logits, &mut host)?;
        out.clear();
        out.extend(host.chunks_exact(vocab.max(1)).map(cpu::sampling::argmax));
        Ok(())
    }
    /// True when [`Backend::sample_rows`] runs on the device (the default reads the logits
    /// back, which gains nothing over the host sampler).
    fn samples_on_device(&self) -> bool {
        false
    }
    /// One token per row of `logits` (`[rows, vocab]`) by `params[row]`, under the rules of
    /// [`cpu::sampling`] (its reference is this default).
    fn sample_rows(
        &self,
        logits: &Self::Buffer,
        vocab: usize,
        params: &[cpu::sampling::RowSampling],
        out: &mut Vec<u32>,
    ) -> BackendResult<()> {
        let mut host = vec![0f32; params.len() * vocab];
        self.to_host(logits, &mut host)?;
        out.clear();
        out.extend(
            host.chunks_exact(vocab.max(1))
                .zip(params)
                .map(|(row, p)| cpu::sampling::sample_row(row, p)),
        );
        Ok(())
    }
    /// `out[i] = x[step.logits_indices[i]]` (row width `width`).
    fn gather_rows(
        &self,
        x: &Self::Buffer,
        step: &Self::Step,
        width: usize,
        out: &mut Self::Buffer,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(shape: &'a [usize], data: &'a [u8]) -> HostTensor<'a> {
        HostTensor {
            dtype: HostDType::F32,
            shape,
            data,
        }
    }

    #[test]
    fn stacked_rows_need_equal_widths() {
        let (a, b, c) = ([2usize, 3], [4usize, 3], [1usize, 4]);
        assert_eq!(
            stacked_rows_shape(&[t(&a, &[]), t(&b, &[])]).unwrap(),
            vec![6, 3]
        );
        let e = stacked_rows_shape(&[t(&a, &[]), t(&c, &[])]).unwrap_err();
        assert!(e.to_string().contains("[1, 4]"), "{e}");
    }
}
