// Elementwise epilogues: SiLU-and-multiply of the fused gate/up projection, bias add.
// CPU reference: `silu_mul` in src/backend/cpu/mod.rs.

// out[t, i] = silu(gu[t, i]) * gu[t, inter + i]; grid-stride over rows * inter.
extern "C" __global__ void silu_mul_bf16(const bf16* __restrict__ gu, bf16* __restrict__ out,
                                         int rows, int inter) {
    const long n = (long)rows * inter;
    for (long k = (long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long)gridDim.x * blockDim.x) {
        const long t = k / inter, i = k - t * inter;
        const float g = bf16_to_f32(gu[t * 2 * inter + i]);
        const float u = bf16_to_f32(gu[t * 2 * inter + inter + i]);
        out[k] = f32_to_bf16(g / (1.0f + __expf(-g)) * u);
    }
}

// x[t, j] += bias[j] (the q/k/v biases of Qwen2); grid-stride over rows * n.
// CPU reference: the bias term of `matmul` in src/backend/cpu/mod.rs.
extern "C" __global__ void add_bias_bf16(bf16* __restrict__ x, const bf16* __restrict__ bias,
                                         int rows, int n) {
    const long total = (long)rows * n;
    for (long k = (long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long)gridDim.x * blockDim.x) {
        x[k] = f32_to_bf16(bf16_to_f32(x[k]) + bf16_to_f32(bias[k % n]));
    }
}

// out[t, i] = gelu_tanh(gu[t, i]) * gu[t, inter + i] (GeGLU, Gemma); grid-stride.
// CPU reference: `gelu_tanh_mul` in src/backend/cpu/mod.rs.
extern "C" __global__ void gelu_tanh_mul_bf16(const bf16* __restrict__ gu,
                                              bf16* __restrict__ out, int rows, int inter) {
    const long n = (long)rows * inter;
    for (long k = (long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long)gridDim.x * blockDim.x) {
        const long t = k / inter, i = k - t * inter;
        const float g = bf16_to_f32(gu[t * 2 * inter + i]);
        const float u = bf16_to_f32(gu[t * 2 * inter + inter + i]);
        const float a = 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)));
        out[k] = f32_to_bf16(a * u);
    }
}

// x[k] = cap · tanh(x[k] / cap) for k < n (Gemma 2's final logits); grid-stride.
// CPU reference: `softcap` in src/backend/cpu/mod.rs.
extern "C" __global__ void softcap_bf16(bf16* __restrict__ x, long n, float cap) {
    for (long k = (long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long)gridDim.x * blockDim.x) {
        x[k] = f32_to_bf16(soft_cap(bf16_to_f32(x[k]), cap));
    }
}

// x[k] *= factor for k < n (Gemma's embedding scale); grid-stride.
// CPU reference: `scale` in src/backend/cpu/mod.rs.
extern "C" __global__ void scale_bf16(bf16* __restrict__ x, long n, float factor) {
    for (long k = (long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long)gridDim.x * blockDim.x) {
        x[k] = f32_to_bf16(bf16_to_f32(x[k]) * factor);
    }
}
