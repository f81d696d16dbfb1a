// RMSNorm and fused residual-add + RMSNorm. One block per row.
// CPU reference: `rms_norm` / `add_rms_norm` in src/backend/cpu/mod.rs.

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
