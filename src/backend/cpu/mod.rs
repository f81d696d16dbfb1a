//! The CPU backend: f32 compute over rayon. Matrix weights keep their checkpoint's precision
//! (bf16, f16 or f32), packed for `gemm` and widened in registers, so a bf16 model's weights take
//! half the memory and half the bandwidth of f32; vectors (norms, biases) and tables (rotary
//! cos/sin) are f32.
//!
//! Why our own kernels rather than candle-core tensors: the engine needs batch-invariant results
//! (a request's tokens must not depend on what it was batched with — see `gemm`), ops that write
//! into buffers reused across steps (no allocation per op), and attention that reads K/V through
//! block tables in place. These functions are also the reference the CUDA kernels are tested
//! against, so each is written to be plainly readable.
pub mod attention;
pub mod gemm;
pub mod moe;
pub mod q8;
pub mod sampling;

use super::{
    stacked_rows_shape, AttnDims, Backend, BackendError, BackendResult, BatchPlan, HostDType,
    HostTensor, KvCacheDims,
};
use rayon::prelude::*;

/// Rows handed to one rayon task by the row-wise ops.
const ROWS_PER_TASK: usize = 8;

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    /// Matrix weights of f32 checkpoints rounded to bf16 at load (half the memory and decode
    /// bandwidth; bf16 and f16 checkpoints keep their own precision either way).
    pub f32_matrices_to_bf16: bool,
    /// Every matrix quantized to Q8_0 at load (`--quantization int8`, see `q8`): ~1.06 byte per
    /// weight, whatever the checkpoint's precision. Overrides `f32_matrices_to_bf16`.
    pub int8_weights: bool,
}

/// One layer's K and V, each `[num_blocks, block_size, num_kv_heads, head_dim]`.
pub struct CpuKvCache {
    pub dims: KvCacheDims,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// A parameter and its shape.
pub struct CpuWeight {
    pub shape: Vec<usize>,
    pub data: CpuData,
}

/// How a [`CpuWeight`] holds its elements.
pub enum CpuData {
    /// Row-major f32: vectors (norms, biases) and tables.
    F32(Vec<f32>),
    /// A matrix `[shape[0], rest]` in `gemm`'s panel layout, in the checkpoint's precision.
    Packed(gemm::PackedMatrix),
}

impl CpuWeight {
    /// A row-major f32 weight.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            shape,
            data: CpuData::F32(data),
        }
    }

    /// The elements of a vector or table. Panics on a packed matrix: the model hands only
    /// vectors and tables to the ops that read them so.
    pub fn values(&self) -> &[f32] {
        match &self.data {
            CpuData::F32(v) => v,
            CpuData::Packed(_) => panic!(
                "a {:?} matrix weight was used as a vector or table (load it with load_table)",
                self.shape
            ),
        }
    }

    /// The matrix for `gemm`. Panics on a vector or table (row-major f32).
    pub fn matrix(&self) -> &gemm::PackedMatrix {
        match &self.data {
            CpuData::Packed(p) => p,
            CpuData::F32(_) => panic!("a {:?} vector was used as a matrix", self.shape),
        }
    }

    /// Bytes of weight memory held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            CpuData::F32(v) => v.len() * 4,
            CpuData::Packed(p) => p.bytes(),
        }
    }
}

/// Packs row-major parts stacked along rows (`n` rows of `k` in all) in the parts' precision (f32
/// when they disagree), or quantized to Q8_0.
fn pack_rows(
    parts: &[HostTensor<'_>],
    n: usize,
    k: usize,
    f32_to_bf16: bool,
    int8: bool,
) -> BackendResult<gemm::PackedMatrix> {
    use gemm::{PackedMatrix, WeightDType};
    let dtype = parts.first().map_or(HostDType::F32, |p| p.dtype);
    let same = parts.iter().all(|p| p.dtype == dtype);
    let packed = match dtype {
        _ if int8 => {
            // Row j's part and its row there (parts are whole rows of `k`).
            let mut starts = Vec::with_capacity(parts.len());
            let mut rows = 0;
            for p in parts {
                starts.push(rows);
                rows += p.numel() / k.max(1);
            }
            PackedMatrix::q8_with(n, k, |j, out| {
                let i = starts.partition_point(|&s| s <= j) - 1;
                let (p, r) = (&parts[i], j - starts[i]);
                let es = p.dtype.size();
                let bytes = &p.data[r * k * es..(r + 1) * k * es];
                let row = HostTensor {
                    dtype: p.dtype,
                    shape: &[k],
                    data: bytes,
                };
                out.copy_from_slice(&row.to_f32());
            })
        }
        HostDType::BF16 | HostDType::F16 if same => {
            let bits: Vec<u16> = parts
                .iter()
                .flat_map(|p| p.data.chunks_exact(2))
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            let d = if dtype == HostDType::BF16 {
                WeightDType::Bf16
            } else {
                WeightDType::F16
            };
            PackedMatrix::from_half_bits(&bits, n, k, d)
        }
        _ if f32_to_bf16 => {
            let bits: Vec<u16> = parts
                .iter()
                .flat_map(|p| p.to_f32())
                .map(|v| half::bf16::from_f32(v).to_bits())
                .collect();
            PackedMatrix::from_half_bits(&bits, n, k, WeightDType::Bf16)
        }
        _ => {
            let rows: Vec<f32> = parts.iter().flat_map(|p| p.to_f32()).collect();
            PackedMatrix::from_f32(&rows, n, k)
        }
    };
    packed.ok_or(BackendError::OutOfMemory {
        device: "cpu",
        what: "weight",
        bytes: n * k * dtype.size(),
    })
}

fn try_vec(len: usize, what: &'static str) -> BackendResult<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| BackendError::OutOfMemory {
            device: "cpu",
            what,
            bytes: len * 4,
        })?;
    v.resize(len, 0.0);
    Ok(v)
}

impl Backend for CpuBackend {
    type Buffer = Vec<f32>;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;
    type Step = BatchPlan;
    /// f32 K and V (`CpuKvCache`'s vectors).
    const KV_ELEMENT_BYTES: usize = std::mem::size_of::<f32>();

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn alloc(&self, len: usize) -> BackendResult<Vec<f32>> {
        try_vec(len, "activation buffer")
    }

    fn load_weight(&self, t: HostTensor<'_>) -> BackendResult<CpuWeight> {
        if t.shape.len() < 2 {
            return self.load_table(t);
        }
        let (n, k) = (t.shape[0], t.shape[1..].iter().product());
        Ok(CpuWeight {
            shape: t.shape.to_vec(),
            data: CpuData::Packed(pack_rows(
                &[t],
                n,
                k,
                self.f32_matrices_to_bf16,
                self.int8_weights,
            )?),
        })
    }

    fn load_table(&self, t: HostTensor<'_>) -> BackendResult<CpuWeight> {
        Ok(CpuWeight::f32(t.shape.to_vec(), t.to_f32()))
    }

    fn load_weight_rows(&self, parts: &[HostTensor<'_>]) -> BackendResult<CpuWeight> {
        let shape = stacked_rows_shape(parts)?;
        if shape.len() < 2 {
            // Stacked biases.
            let v = parts.iter().flat_map(|p| p.to_f32()).collect();
            return Ok(CpuWeight::f32(shape, v));
        }
        let (n, k) = (shape[0], shape[1..].iter().product());
        Ok(CpuWeight {
            data: CpuData::Packed(pack_rows(
                parts,
                n,
                k,
                self.f32_matrices_to_bf16,
                self.int8_weights,
            )?),
            shape,
        })
    }

    fn alloc_kv_cache(&self, dims: KvCacheDims) -> BackendResult<CpuKvCache> {
        Ok(CpuKvCache {
            dims,
            k: try_vec(dims.numel(), "K cache")?,
            v: try_vec(dims.numel(), "V cache")?,
        })
    }

    fn read_kv_block(&self, cache: &CpuKvCache, block: usize, out: &mut [u8]) -> BackendResult<()> {
        cache
            .dims
            .check_block("read_kv_block", block, out.len(), 4)?;
        let n = cache.dims.block_numel();
        let (k, v) = out.split_at_mut(n * 4);
        k.copy_from_slice(bytemuck::cast_slice(&cache.k[block * n..(block + 1) * n]));
        v.copy_from_slice(bytemuck::cast_slice(&cache.v[block * n..(block + 1) * n]));
        Ok(())
    }

    fn write_kv_block(
        &self,
        cache: &mut CpuKvCache,
        block: usize,
        data: &[u8],
    ) -> BackendResult<()> {
        cache
            .dims
            .check_block("write_kv_block", block, data.len(), 4)?;
        let n = cache.dims.block_numel();
        let (k, v) = data.split_at(n * 4);
        // Byte-wise: `data` need not be 4-aligned.
        for (dst, src) in [(&mut cache.k, k), (&mut cache.v, v)] {
            bytemuck::cast_slice_mut::<f32, u8>(&mut dst[block * n..(block + 1) * n])
                .copy_from_slice(src);
        }
        Ok(())
    }

    fn to_host(&self, buf: &Vec<f32>, out: &mut [f32]) -> BackendResult<()> {
        let n = out.len();
        out.copy_from_slice(&buf[..n]);
        Ok(())
    }

    fn prepare_step(&self, plan: &BatchPlan) -> BackendResult<BatchPlan> {
        Ok(plan.clone())
    }

    fn embedding(&self, table: &CpuWeight, step: &BatchPlan, out: &mut Vec<f32>) {
        let hidden = table.shape[1];
        out[..step.num_tokens() * hidden]
            .par_chunks_mut(hidden)
            .zip(step.token_ids.par_iter())
            .for_each(|(row, &id)| {
                let id = id as usize;
                match &table.data {
                    CpuData::F32(t) => row.copy_from_slice(&t[id * hidden..(id + 1) * hidden]),
                    CpuData::Packed(p) => p.row_into(id, row),
                }
            });
    }

    fn matmul(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        bias: Option<&CpuWeight>,
        out: &mut Vec<f32>,
        m: usize,
    ) {
        let w = w.matrix();
        let (n, k) = (w.n, w.k);
        let out = &mut out[..m * n];
        gemm::matmul(&x[..m * k], w, out, m);
        if let Some(b) = bias {
            let b = b.values();
            out.par_chunks_mut(n).for_each(|row| {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            });
        }
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        weight: &CpuWeight,
        eps: f32,
        out: &mut Vec<f32>,
        rows: usize,
    ) {
        let (weight, d) = (weight.values(), weight.values().len());
        out[..rows * d]
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x[..rows * d].par_chunks(d * ROWS_PER_TASK))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                    rms_norm_row(x, weight, eps, o);
                }
            });
    }

    fn add_rms_norm(
        &self,
        residual: &mut Vec<f32>,
        x: &Vec<f32>,
        weight: &CpuWeight,
        eps: f32,
        out: &mut Vec<f32>,
        rows: usize,
    ) {
        let (weight, d) = (weight.values(), weight.values().len());
        out[..rows * d]
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(residual[..rows * d].par_chunks_mut(d * ROWS_PER_TASK))
            .zip(x[..rows * d].par_chunks(d * ROWS_PER_TASK))
            .for_each(|((o, r), x)| {
                for ((o, r), x) in o.chunks_mut(d).zip(r.chunks_mut(d)).zip(x.chunks(d)) {
                    for (r, x) in r.iter_mut().zip(x) {
                        *r += x;
                    }
                    rms_norm_row(r, weight, eps, o);
                }
            });
    }

    fn rope(&self, qkv: &mut Vec<f32>, cos_sin: &CpuWeight, step: &BatchPlan, dims: AttnDims) {
        let width = dims.qkv_width();
        let hd = dims.head_dim;
        let rot = cos_sin.shape.get(1).copied().unwrap_or(hd).min(hd);
        let rotated_heads = dims.num_heads + dims.num_kv_heads;
        qkv[..step.num_tokens() * width]
            .par_chunks_mut(width)
            .zip(step.positions.par_iter())
            .for_each(|(row, &pos)| {
                let table = &cos_sin.values()[pos as usize * rot..(pos as usize + 1) * rot];
                let (cos, sin) = table.split_at(rot / 2);
                for head in row[..rotated_heads * hd].chunks_mut(hd) {
                    rope_head(&mut head[..rot], cos, sin);
                }
            });
    }

    fn qk_norm(
        &self,
        qkv: &mut Vec<f32>,
        q_weight: &CpuWeight,
        k_weight: &CpuWeight,
        eps: f32,
        rows: usize,
        dims: AttnDims,
    ) {
        let width = dims.qkv_width();
        let hd = dims.head_dim;
        qkv[..rows * width].par_chunks_mut(width).for_each(|row| {
            let mut tmp = vec![0f32; hd];
            for (h, head) in row[..(dims.num_heads + dims.num_kv_heads) * hd]
                .chunks_mut(hd)
                .enumerate()
            {
                let w = if h < dims.num_heads {
                    q_weight.values()
                } else {
                    k_weight.values()
                };
                tmp.copy_from_slice(head);
                rms_norm_row(&tmp, w, eps, head);
            }
        });
    }

    fn gelu_tanh_mul(&self, gate_up: &Vec<f32>, out: &mut Vec<f32>, rows: usize, inter: usize) {
        gated_mul(gate_up, out, rows, inter, gelu_tanh);
    }

    fn scale(&self, x: &mut Vec<f32>, n: usize, factor: f32) {
        x[..n].par_iter_mut().for_each(|v| *v *= factor);
    }

    fn silu_mul(&self, gate_up: &Vec<f32>, out: &mut Vec<f32>, rows: usize, inter: usize) {
        gated_mul(gate_up, out, rows, inter, silu);
    }

    fn supports_moe(&self) -> bool {
        true
    }

    fn supports_softcap(&self) -> bool {
        true
    }

    fn softcap(&self, x: &mut Vec<f32>, n: usize, cap: f32) {
        x[..n]
            .par_iter_mut()
            .for_each(|v| *v = cap * (*v / cap).tanh());
    }

    fn moe(
        &self,
        x: &Vec<f32>,
        moe: &crate::backend::MoeWeights<CpuWeight>,
        rows: usize,
        out: &mut Vec<f32>,
    ) {
        moe::moe(self, x, moe, rows, out);
    }

    fn write_kv(&self, qkv: &Vec<f32>, cache: &mut CpuKvCache, step: &BatchPlan, dims: AttnDims) {
        attention::write_kv(qkv, cache, &step.slot_mapping, dims);
    }

    fn paged_attention_decode(
        &self,
        qkv: &Vec<f32>,
        cache: &CpuKvCache,
        step: &BatchPlan,
        dims: AttnDims,
        out: &mut Vec<f32>,
    ) {
        attention::paged_attention(qkv, cache, step, 0..step.num_decode_seqs, dims, out);
    }

    fn paged_attention_prefill(
        &self,
        qkv: &Vec<f32>,
        cache: &CpuKvCache,
        step: &BatchPlan,
        dims: AttnDims,
        out: &mut Vec<f32>,
    ) {
        let seqs = step.num_decode_seqs..step.seqs.len();
        attention::paged_attention(qkv, cache, step, seqs, dims, out);
    }

    fn gather_rows(&self, x: &Vec<f32>, step: &BatchPlan, width: usize, out: &mut Vec<f32>) {
        for (i, &r) in step.logits_indices.iter().enumerate() {
            let r = r as usize;
            out[i * width..(i + 1) * width].copy_from_slice(&x[r * width..(r + 1) * width]);
        }
    }
}

/// RMSNorm of one row, accumulated in f64 for a reference-grade result.
pub fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let inv = 1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt();
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = x * inv * w;
    }
}

/// HF "rotate_half" rotary embedding of one head: pairs are (i, i + head_dim/2).
pub fn rope_head(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// `out[t, i] = act(gate_up[t, i]) * gate_up[t, inter + i]` for `rows` rows (the gated MLPs:
/// SwiGLU, GeGLU).
fn gated_mul(gate_up: &[f32], out: &mut [f32], rows: usize, inter: usize, act: fn(f32) -> f32) {
    out[..rows * inter]
        .par_chunks_mut(inter)
        .zip(gate_up[..rows * 2 * inter].par_chunks(2 * inter))
        .for_each(|(o, gu)| {
            let (g, u) = gu.split_at(inter);
            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                *o = act(*g) * u;
            }
        });
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU with the tanh approximation (PyTorch's `gelu(approximate="tanh")`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_block_copies_roundtrip_and_check_their_arguments() {
        let dims = KvCacheDims {
            num_blocks: 3,
            block_size: 2,
            num_kv_heads: 1,
            head_dim: 2,
        };
        let n = dims.numel();
        let mut cache = CpuKvCache {
            dims,
            k: (0..n).map(|i| i as f32).collect(),
            v: (0..n).map(|i| -(i as f32)).collect(),
        };
        let mut out = vec![0u8; 2 * 4 * 4];
        CpuBackend::default()
            .read_kv_block(&cache, 1, &mut out)
            .unwrap();
        let vals: Vec<f32> = out
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // Block 1 is elements 4..8 of K, then of V.
        assert_eq!(vals, [4.0, 5.0, 6.0, 7.0, -4.0, -5.0, -6.0, -7.0]);
        CpuBackend::default()
            .write_kv_block(&mut cache, 2, &out)
            .unwrap();
        assert_eq!(cache.k[8..12], [4.0, 5.0, 6.0, 7.0]);
        assert_eq!(cache.v[8..12], [-4.0, -5.0, -6.0, -7.0]);
        assert_eq!(cache.k[..4], [0.0, 1.0, 2.0, 3.0], "block 0 untouched");
        assert!(CpuBackend::default()
            .read_kv_block(&cache, 3, &mut out)
            .is_err());
        assert!(CpuBackend::default()
            .write_kv_block(&mut cache, 0, &out[1..])
            .is_err());
    }

    /// Many blocks of many layers in one call: block after block, each block's layers in order,
    /// each as `read_kv_block` gives it; the write puts them back where they came from; a
    /// buffer that does not split into the blocks' pieces, a wrong piece size or a block out
    /// of range is an error.
    #[test]
    fn batched_kv_block_copies_lay_out_blocks_then_layers() {
        let dims = KvCacheDims {
            num_blocks: 4,
            block_size: 2,
            num_kv_heads: 1,
            head_dim: 2,
        };
        let n = dims.numel();
        let layer = |l: usize| CpuKvCache {
            dims,
            k: (0..n).map(|i| (100 * l + i) as f32).collect(),
            v: (0..n).map(|i| -((100 * l + i) as f32)).collect(),
        };
        let caches = [layer(0), layer(1), layer(2)];
        let cpu = CpuBackend::default();
        let piece = 2 * dims.block_numel() * 4;
        let blocks = [3, 0, 2];
        let mut packed = vec![0u8; blocks.len() * caches.len() * piece];
        cpu.read_kv_blocks(&caches, &blocks, &mut packed).unwrap();
        let mut want = Vec::new();
        for &b in &blocks {
            for c in &caches {
                let mut one = vec![0u8; piece];
                cpu.read_kv_block(c, b, &mut one).unwrap();
                want.extend(one);
            }
        }
        assert_eq!(packed, want);
        // Back into blocks 1, 2 and 3 of fresh caches: each lands in its own block and layer.
        let zero = || CpuKvCache {
            dims,
            k: vec![0.0; n],
            v: vec![0.0; n],
        };
        let mut fresh = [zero(), zero(), zero()];
        cpu.write_kv_blocks(&mut fresh, &[1, 2, 3], &packed)
            .unwrap();
        let bn = dims.block_numel();
        for (l, c) in fresh.iter().enumerate() {
            for (to, from) in [(1, 3), (2, 0), (3, 2)] {
                assert_eq!(
                    c.k[to * bn..(to + 1) * bn],
                    caches[l].k[from * bn..(from + 1) * bn]
                );
                assert_eq!(
                    c.v[to * bn..(to + 1) * bn],
                    caches[l].v[from * bn..(from + 1) * bn]
                );
            }
            assert!(c.k[..bn].iter().all(|&x| x == 0.0), "block 0 untouched");
        }
        let mut none: [u8; 0] = [];
        cpu.read_kv_blocks(&caches, &[], &mut none).unwrap();
        assert!(cpu
            .read_kv_blocks(&caches, &blocks, &mut packed[1..])
            .is_err());
        let mut short = vec![0u8; blocks.len() * caches.len() * (piece - 4)];
        assert!(cpu.read_kv_blocks(&caches, &blocks, &mut short).is_err());
        assert!(cpu
            .read_kv_blocks(&caches, &[0, 4, 1], &mut packed)
            .is_err());
        assert!(cpu.write_kv_blocks(&mut fresh, &[0], &packed).is_err());
    }

    /// bf16/f16 matrices stay half precision (half the bytes of f32), vectors stay f32, and the
    /// load flag rounds an f32 checkpoint's matrices to bf16; every element reads back as the
    /// value it holds, through the embedding lookup too.
    #[test]
    fn weights_keep_the_checkpoint_precision() {
        use super::gemm::WeightDType;
        let vals: Vec<f32> = (0..40 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
        let shape = [40, 3];
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let f32b: &[u8] = bytemuck::cast_slice(&vals);
        let t = |dtype, data| HostTensor {
            dtype,
            shape: &shape,
            data,
        };
        let plain = CpuBackend::default();
        let convert = CpuBackend {
            f32_matrices_to_bf16: true,
            ..Default::default()
        };
        let round_bf = |v: f32| half::bf16::from_f32(v).to_f32();
        let round_f16 = |v: f32| half::f16::from_f32(v).to_f32();
        let ident = |v: f32| v;
        type Case<'a> = (CpuWeight, WeightDType, &'a dyn Fn(f32) -> f32);
        let cases: [Case; 4] = [
            (
                plain.load_weight(t(HostDType::BF16, &bf)).unwrap(),
                WeightDType::Bf16,
                &round_bf,
            ),
            (
                plain.load_weight(t(HostDType::F16, &f16)).unwrap(),
                WeightDType::F16,
                &round_f16,
            ),
            (
                plain.load_weight(t(HostDType::F32, f32b)).unwrap(),
                WeightDType::F32,
                &ident,
            ),
            (
                convert.load_weight(t(HostDType::F32, f32b)).unwrap(),
                WeightDType::Bf16,
                &round_bf,
            ),
        ];
        for (w, dtype, round) in cases {
            let m = w.matrix();
            assert_eq!((m.n, m.k, m.dtype), (40, 3, dtype));
            // 40 rows pad to 48 (three 16-row panels).
            assert_eq!(w.bytes(), 48 * 3 * dtype.size());
            for j in 0..40 {
                for c in 0..3 {
                    assert_eq!(m.get(j, c), round(vals[j * 3 + c]), "{dtype:?} ({j}, {c})");
                }
            }
            let p = BatchPlan {
                token_ids: vec![39, 0],
                ..Default::default()
            };
            let mut out = vec![0f32; 6];
            plain.embedding(&w, &p, &mut out);
            let want: Vec<f32> = [117, 118, 119, 0, 1, 2]
                .iter()
                .map(|&i| round(vals[i]))
                .collect();
            assert_eq!(out, want, "{dtype:?} embedding");
        }
        // Vectors stay f32, whatever the flag.
        let v = convert
            .load_weight(HostTensor {
                dtype: HostDType::F32,
                shape: &[3],
                data: &f32b[..12],
            })
            .unwrap();
        assert_eq!(v.values(), &vals[..3]);
    }

    #[test]
    fn rms_norm_matches_hand_computed() {
        // x = [3, 4]: mean square 12.5, rms = 3.5355; weights [1, 2].
        let mut out = [0.0; 2];
        rms_norm_row(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        assert!((out[0] - 0.848_528_1).abs() < 1e-6);
        assert!((out[1] - 2.262_741_7).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        // head_dim 4: pairs (0,2) and (1,3); rotate the first pair by 90° and leave the second.
        let mut h = [1.0, 5.0, 0.0, 7.0];
        rope_head(&mut h, &[0.0, 1.0], &[1.0, 0.0]);
        assert_eq!(h, [0.0, 5.0, 1.0, 7.0]);
    }

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((silu(-2.0) + 0.238_405_8).abs() < 1e-6);
    }

    #[test]
    fn add_rms_norm_updates_residual_then_normalizes() {
        let b = CpuBackend::default();
        let w = CpuWeight::f32(vec![2], vec![1.0, 1.0]);
        let mut residual = vec![1.0, 2.0, 0.5, 0.5];
        let x = vec![2.0, 2.0, -0.5, 1.5];
        let mut out = vec![0.0; 4];
        b.add_rms_norm(&mut residual, &x, &w, 0.0, &mut out, 2);
        assert_eq!(residual, vec![3.0, 4.0, 0.0, 2.0]);
        let mut expect = [0.0; 2];
        rms_norm_row(&[3.0, 4.0], &[1.0, 1.0], 0.0, &mut expect);
        assert_eq!(&out[..2], &expect);
        assert!((out[2] - 0.0).abs() < 1e-7 && (out[3] - 2.0f32.sqrt()).abs() < 1e-6);
    }
}
