// On-device greedy sampling: the argmax of each logits row, so only token ids leave the GPU.
// Ties go to the lowest id, as in the CPU sampler. CPU reference: `argmax_rows` (the default
// in src/backend/mod.rs) and the sampler's argmax in src/sampling/sampler.rs.

template <typename T>
__device__ __forceinline__ float load_logit(const T* p);
template <>
__device__ __forceinline__ float load_logit<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_logit<bf16>(const bf16* p) { return bf16_to_f32(*p); }

// grid: one block per row; blockDim.x a multiple of 32.
template <typename T>
__device__ __forceinline__ void argmax_row(const T* __restrict__ logits,
                                           unsigned int* __restrict__ out, int vocab) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const T* row = logits + (long)blockIdx.x * vocab;
    const float NEG_INF = -__int_as_float(0x7f800000);
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = load_logit<T>(row + i);
        if (v > bv) { bv = v; bi = i; }  // strided ascending: the first max per thread wins
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = blockDim.x >> 5;
        bv = lane < nwarps ? best_v[lane] : NEG_INF;
        bi = lane < nwarps ? best_i[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) out[blockIdx.x] = (unsigned int)(bi == 0x7fffffff ? 0 : bi);
    }
}

extern "C" __global__ void argmax_f32(const float* logits, unsigned int* out, int vocab) {
    argmax_row<float>(logits, out, vocab);
}

extern "C" __global__ void argmax_bf16(const bf16* logits, unsigned int* out, int vocab) {
    argmax_row<bf16>(logits, out, vocab);
}
