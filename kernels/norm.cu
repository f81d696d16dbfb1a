// RMSNorm, fused residual-add + RMSNorm, and per-head RMSNorm of q and k. One block per row.
// CPU reference: `rms_norm` / `add_rms_norm` / `qk_norm` in src/backend/cpu/mod.rs.

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w
extern "C" __global__ void rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                         bf16* __restrict__ out, int hidden, float eps) {
    __shared__ float scratch[32];
    const bf16* xr = x + (long)blockIdx.x * hidden;
    bf16* orow = out + (long)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = bf16_to_f32(xr[i]);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        orow[i] = f32_to_bf16(bf16_to_f32(xr[i]) * inv * bf16_to_f32(w[i]));
    }
}

// residual += x (rounded to bf16, as stored); out = rms_norm(residual) * w.
extern "C" __global__ void add_rms_norm_bf16(bf16* __restrict__ residual,
                                             const bf16* __restrict__ x,
                                             const bf16* __restrict__ w, bf16* __restrict__ out,
                                             int hidden, float eps) {
    __shared__ float scratch[32];
    const long base = (long)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const bf16 s = f32_to_bf16(bf16_to_f32(residual[base + i]) + bf16_to_f32(x[base + i]));
        residual[base + i] = s;
        const float v = bf16_to_f32(s);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        out[base + i] = f32_to_bf16(bf16_to_f32(residual[base + i]) * inv * bf16_to_f32(w[i]));
    }
}

// Qwen3's q_norm / k_norm: each query head (weights q_w) and each key head (k_w) of a fused
// qkv row is RMS-normalized over head_dim, in place. One block per token, one warp per head
// (warps stride over the heads), lanes over head_dim.
extern "C" __global__ void qk_norm_bf16(bf16* __restrict__ qkv, const bf16* __restrict__ q_w,
                                        const bf16* __restrict__ k_w, int num_heads,
                                        int num_kv_heads, int head_dim, float eps) {
    const int width = (num_heads + 2 * num_kv_heads) * head_dim;
    bf16* row = qkv + (long)blockIdx.x * width;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int h = warp; h < num_heads + num_kv_heads; h += warps) {
        bf16* head = row + h * head_dim;
        const bf16* w = h < num_heads ? q_w : k_w;
        float ss = 0.0f;
        for (int i = lane; i < head_dim; i += 32) {
            const float v = bf16_to_f32(head[i]);
            ss += v * v;
        }
        const float inv = rsqrtf(warp_sum(ss) / (float)head_dim + eps);
        for (int i = lane; i < head_dim; i += 32) {
            head[i] = f32_to_bf16(bf16_to_f32(head[i]) * inv * bf16_to_f32(w[i]));
        }
    }
}
