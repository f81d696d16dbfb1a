// Skinny GEMM for decode steps: out[m, n] = Σ_k x[m, k] · w[n, k] for the few rows m < M of a
// decode batch (M ≤ 8 · MT), bf16 in, f32 accumulate, bf16 out. At such M a matmul is bound by
// reading the weight, so the kernel's job is to stream every weight byte once at the device's
// bandwidth: 16-byte loads, several in flight per lane, many warps per SM.
// CPU reference: `matmul_nt` in src/backend/cpu/gemm.rs (the `Backend::matmul` contract).
//
// Tensor cores, with the weight as the mma's A operand (16 output rows n) and x as its B (8 rows
// m per group): D[n][m] = Σ_k W[n][k] · x[m][k]. Per 64-wide chunk of k a lane (g = lane / 4,
// t = lane % 4) loads 32 contiguous bytes, k = 16t .. 16t + 16 of the chunk, of weight rows g and
// g + 8 and of x row g of each m group. Its four mma k-steps s take 32-bit words 2s and 2s + 1 of
// those 32 bytes as the k slots (2t, 2t + 1) and (2t + 8, 2t + 9): the same assignment for W and
// x, so every product pairs equal k, and the four lanes of a quad cover the chunk once.
//
// A block of SK_WARPS warps computes 16 rows n for every m: warp i sums its own contiguous slice
// of the chunks (split-K), and the slices are added in shared memory in warp order. The order
// of a row's sums depends on K alone, so its result depends neither on M nor on the other rows.
// Needs K % 8 == 0 and 16-byte aligned rows (the launcher checks; cuBLAS runs the rest).

#define SK_WARPS 8
#define SK_CHUNK 64

__device__ __forceinline__ uint4 sk_load(const bf16* p, bool ok) {
    return ok ? __ldg((const uint4*)p) : make_uint4(0u, 0u, 0u, 0u);
}

// Word i (0..7) of the 32 bytes held in lo (words 0..3) and hi (4..7).
__device__ __forceinline__ unsigned int sk_word(const uint4& lo, const uint4& hi, int i) {
    const uint4& v = i < 4 ? lo : hi;
    switch (i & 3) {
        case 0: return v.x;
        case 1: return v.y;
        case 2: return v.z;
        default: return v.w;
    }
}

template <int MT>
__device__ __forceinline__ void gemm_skinny(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                            bf16* __restrict__ out, int M, int N, int K) {
    __shared__ float red[SK_WARPS][16][8 * MT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * 16;
    const int chunks = (K + SK_CHUNK - 1) / SK_CHUNK;
    const int per = (chunks + SK_WARPS - 1) / SK_WARPS;
    const int c_begin = warp * per, c_end = min(chunks, c_begin + per);

    const bool ok_a = n0 + g < N, ok_b = n0 + g + 8 < N;
    const bf16* wa = w + (long)(ok_a ? n0 + g : 0) * K;
    const bf16* wb = w + (long)(ok_b ? n0 + g + 8 : 0) * K;

    float acc[MT][4];
#pragma unroll
    for (int j = 0; j < MT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

#pragma unroll 2
    for (int c = c_begin; c < c_end; c++) {
        const int k = c * SK_CHUNK + t * 16;
        // K % 8 == 0: each 8-element vector is wholly inside K or wholly past it.
        const bool in0 = k < K, in1 = k + 8 < K;
        const uint4 a0 = sk_load(wa + k, ok_a && in0), a1 = sk_load(wa + k + 8, ok_a && in1);
        const uint4 b0 = sk_load(wb + k, ok_b && in0), b1 = sk_load(wb + k + 8, ok_b && in1);
        uint4 x0[MT], x1[MT];
#pragma unroll
        for (int j = 0; j < MT; j++) {
            const int m = j * 8 + g;
            const bf16* xr = x + (long)(m < M ? m : 0) * K;
            x0[j] = sk_load(xr + k, m < M && in0);
            x1[j] = sk_load(xr + k + 8, m < M && in1);
        }
#pragma unroll
        for (int s = 0; s < 4; s++) {
            unsigned int af[4];
            af[0] = sk_word(a0, a1, 2 * s);      // row g,     k slots 2t, 2t+1
            af[1] = sk_word(b0, b1, 2 * s);      // row g + 8, k slots 2t, 2t+1
            af[2] = sk_word(a0, a1, 2 * s + 1);  // row g,     k slots 2t+8, 2t+9
            af[3] = sk_word(b0, b1, 2 * s + 1);  // row g + 8, k slots 2t+8, 2t+9
#pragma unroll
            for (int j = 0; j < MT; j++) {
                unsigned int bf[2];
                bf[0] = sk_word(x0[j], x1[j], 2 * s);
                bf[1] = sk_word(x0[j], x1[j], 2 * s + 1);
                mma_bf16_16816(acc[j], af, bf);
            }
        }
    }

    // D[n][m]: this lane holds rows g and g + 8, columns 2t and 2t + 1 of each m group.
#pragma unroll
    for (int j = 0; j < MT; j++) {
        red[warp][g][j * 8 + 2 * t] = acc[j][0];
        red[warp][g][j * 8 + 2 * t + 1] = acc[j][1];
        red[warp][g + 8][j * 8 + 2 * t] = acc[j][2];
        red[warp][g + 8][j * 8 + 2 * t + 1] = acc[j][3];
    }
    __syncthreads();
    // One output per thread, consecutive threads along n (contiguous in `out`).
    for (int i = threadIdx.x; i < 16 * 8 * MT; i += blockDim.x) {
        const int r = i & 15, m = i >> 4;
        if (m >= M || n0 + r >= N) continue;
        float v = 0.0f;
#pragma unroll
        for (int q = 0; q < SK_WARPS; q++) v += red[q][r][m];
        out[(long)m * N + n0 + r] = f32_to_bf16(v);
    }
}

// Grid: ceil(N / 16) blocks of SK_WARPS * 32 threads.
#define SKINNY_INSTANCE(MAXM, MT)                                                              \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32)                                \
        gemm_skinny_m##MAXM##_bf16(const bf16* x, const bf16* w, bf16* out, int M, int N,     \
                                   int K) {                                                    \
        gemm_skinny<MT>(x, w, out, M, N, K);                                                   \
    }

SKINNY_INSTANCE(8, 1)
SKINNY_INSTANCE(16, 2)
