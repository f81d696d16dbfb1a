// Paged attention of single query tokens over block tables (decode; and prefill of the small
// head sizes the tensor-core kernel does not take, one query per prompt token), GQA-aware and
// split along the context (flash-decoding), with a reduce step.
// CPU reference: `paged_attention_decode` / `_prefill` in src/backend/cpu/attention.rs.
//
// Layouts: q rows are the fused qkv rows `[num_heads + 2 * num_kv_heads, D]`; query i reads qkv
// row `q_rows[i]`, block-table row `table_rows[i]`, attends to `context_lens[i]` positions and
// writes out row `q_rows[i]` (`[num_heads, D]`). Caches `[num_blocks, block_size,
// num_kv_heads, D]`; block tables `[num_seqs, max_blocks_per_seq]`.
//
// Built for bandwidth: decode reads every cached K/V byte once and does little arithmetic per
// byte, so what counts is the number of bytes in flight.
// - Grid (num_kv_heads, num_queries, num_partitions), 128 threads (4 warps). A block takes one
//   KV head of one query and `part_len` context tokens (chosen by the host from the SM count,
//   so that one long sequence still fills the GPU), and serves all G query heads of the KV
//   head's group from one read of each K/V row.
// - A thread holds 8 dimensions (one 16-byte load) of a row: TL = D / 8 lanes share a row and
//   a warp covers 32 / TL rows at once. Each thread issues UNROLL rows' K and V loads before
//   using any of them (2 × UNROLL × 16 bytes in flight per thread).
// (Measured on an H200: 16 dimensions per lane with 2 rows in flight, and fewer, longer
// partitions for big batches, were both slower.)
// - Softmax is online (running max and sum per head), so a partition of any length needs no
//   score buffer; the lanes' states are merged by shuffles inside the warp, then across warps
//   in shared memory.
// A query attends to positions `lo..context_len` with `lo = max(0, context_len - window)`
// (window 0: no window). With one partition the block writes the normalized bf16 output;
// otherwise its unnormalized output, running max and exp-sum, which `paged_decode_reduce_*`
// combines.

#define NWARPS 4
#define UNROLL 4

__device__ __forceinline__ void bf16x8_to_f32(const uint4 r, float* f) {
    const unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// exp(a - b) with exp(-inf - x) = 0 also when x is -inf (a state that has seen no token).
__device__ __forceinline__ float rescale(float a, float b) {
    return a == neg_inf() ? 0.0f : __expf(a - b);
}

template <int D, int G>
__device__ __forceinline__ void paged_decode(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const unsigned int* __restrict__ block_tables,
    const unsigned int* __restrict__ q_rows, const unsigned int* __restrict__ table_rows,
    const unsigned int* __restrict__ context_lens, bf16* __restrict__ out,
    float* __restrict__ part_out, float* __restrict__ part_max, float* __restrict__ part_sum,
    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq, int window,
    float scale, int max_partitions, int part_len) {
    constexpr int VEC = 8;       // dimensions per lane: one 16-byte load
    constexpr int NV = VEC / 8;  // 16-byte loads per row and lane
    constexpr int TL = D / VEC;  // lanes per K/V row
    constexpr int ROWS = 32 / TL;                       // rows a warp reads at once
    constexpr int STEP = NWARPS * ROWS;
    const int kvh = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
    const long row = q_rows[seq];
    const int group = num_heads / num_kv_heads;  // <= G (the host picks G)
    const int ctx = (int)context_lens[seq];
    const int lo_ctx = window > 0 && ctx > window ? ctx - window : 0;
    const int start = lo_ctx + part * part_len;
    if (start >= ctx) return;  // partitions past the context do nothing
    const int end = min(start + part_len, ctx);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / TL, dl = lane % TL;

    // This thread's VEC dimensions of each query head of the group, pre-scaled.
    float q[G][VEC];
    const int qkv_w = (num_heads + 2 * num_kv_heads) * D;
    const bf16* qbase = qkv + row * qkv_w + (long)kvh * group * D + dl * VEC;
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (g < group) {
#pragma unroll
            for (int v = 0; v < NV; v++)
                bf16x8_to_f32(*reinterpret_cast<const uint4*>(qbase + g * D + v * 8),
                              &q[g][v * 8]);
#pragma unroll
            for (int j = 0; j < VEC; j++) q[g][j] *= scale;
        } else {
#pragma unroll
            for (int j = 0; j < VEC; j++) q[g][j] = 0.0f;
        }
    }

    float m[G], l[G], acc[G][VEC];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = neg_inf();
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < VEC; j++) acc[g][j] = 0.0f;
    }

    const unsigned int* table = block_tables + (long)table_rows[seq] * max_blocks_per_seq;
    const long kv_w = (long)num_kv_heads * D;
    const long head_off = (long)kvh * D + dl * VEC;
    // The loop bound is the same for the whole warp (shuffles below need every lane).
    for (int base = start + warp * ROWS; base < end; base += UNROLL * STEP) {
        uint4 kr[UNROLL][NV], vr[UNROLL][NV];
        bool ok[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int t = base + u * STEP + sub;
            ok[u] = t < end;
            if (ok[u]) {
                const long slot = (long)table[t / block_size] * block_size + t % block_size;
                const uint4* kp = reinterpret_cast<const uint4*>(k_cache + slot * kv_w + head_off);
                const uint4* vp = reinterpret_cast<const uint4*>(v_cache + slot * kv_w + head_off);
#pragma unroll
                for (int v = 0; v < NV; v++) {
                    kr[u][v] = kp[v];
                    vr[u][v] = vp[v];
                }
            } else {
#pragma unroll
                for (int v = 0; v < NV; v++) {
                    kr[u][v] = make_uint4(0, 0, 0, 0);
                    vr[u][v] = make_uint4(0, 0, 0, 0);
                }
            }
        }
        float s[UNROLL][G];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            float kf[VEC];
#pragma unroll
            for (int v = 0; v < NV; v++) bf16x8_to_f32(kr[u][v], &kf[v * 8]);
#pragma unroll
            for (int g = 0; g < G; g++) {
                float d = 0.0f;
#pragma unroll
                for (int j = 0; j < VEC; j++) d += q[g][j] * kf[j];
#pragma unroll
                for (int o = TL / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                s[u][g] = ok[u] ? d : neg_inf();
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) mx = fmaxf(mx, s[u][g]);
            const float c = rescale(m[g], mx);
            l[g] *= c;
#pragma unroll
            for (int j = 0; j < VEC; j++) acc[g][j] *= c;
            m[g] = mx;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            float vf[VEC];
#pragma unroll
            for (int v = 0; v < NV; v++) bf16x8_to_f32(vr[u][v], &vf[v * 8]);
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float p = ok[u] ? __expf(s[u][g] - m[g]) : 0.0f;
                l[g] += p;
#pragma unroll
                for (int j = 0; j < VEC; j++) acc[g][j] += p * vf[j];
            }
        }
    }

    // Merge the warp's row slots (lanes with the same dimensions, other rows).
#pragma unroll
    for (int o = 16; o >= TL; o >>= 1) {  // none when a row takes the whole warp
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float lo = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float mx = fmaxf(m[g], mo);
            const float c1 = rescale(m[g], mx), c2 = rescale(mo, mx);
            l[g] = l[g] * c1 + lo * c2;
#pragma unroll
            for (int j = 0; j < VEC; j++) {
                const float ao = __shfl_xor_sync(0xffffffffu, acc[g][j], o);
                acc[g][j] = acc[g][j] * c1 + ao * c2;
            }
            m[g] = mx;
        }
    }

    // Across warps: each warp's lanes of row slot 0 hold its state.
    __shared__ float acc_s[NWARPS][G][D];
    __shared__ float ml_s[NWARPS][G][2];
    if (sub == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
#pragma unroll
            for (int j = 0; j < VEC; j++) acc_s[warp][g][dl * VEC + j] = acc[g][j];
            if (dl == 0) {
                ml_s[warp][g][0] = m[g];
                ml_s[warp][g][1] = l[g];
            }
        }
    }
    __syncthreads();

    const int num_parts = (ctx - lo_ctx + part_len - 1) / part_len;
    for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
        const int g = i / D, d = i % D;
        float mx = neg_inf();
#pragma unroll
        for (int w = 0; w < NWARPS; w++) mx = fmaxf(mx, ml_s[w][g][0]);
        float sum = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < NWARPS; w++) {
            const float c = rescale(ml_s[w][g][0], mx);
            sum += ml_s[w][g][1] * c;
            o += acc_s[w][g][d] * c;
        }
        const int head = kvh * group + g;
        if (num_parts == 1) {
            out[(row * num_heads + head) * D + d] = f32_to_bf16(o / sum);
        } else {
            const long pi = ((long)seq * num_heads + head) * max_partitions + part;
            part_out[pi * D + d] = o;
            if (d == 0) {
                part_max[pi] = mx;
                part_sum[pi] = sum;
            }
        }
    }
}

// Combines the partitions of queries whose context spans more than one. Grid (num_heads,
// num_queries), D threads, one per output dimension.
template <int D>
__device__ __forceinline__ void paged_decode_reduce(
    const float* __restrict__ part_out, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, const unsigned int* __restrict__ q_rows,
    const unsigned int* __restrict__ context_lens, bf16* __restrict__ out, int num_heads,
    int window, int max_partitions, int part_len) {
    const int head = blockIdx.x, seq = blockIdx.y;
    const int ctx = (int)context_lens[seq];
    const int lo_ctx = window > 0 && ctx > window ? ctx - window : 0;
    const int num_parts = (ctx - lo_ctx + part_len - 1) / part_len;
    if (num_parts <= 1) return;  // written by the main kernel
    const int d = threadIdx.x;
    if (d >= D) return;
    const long base = ((long)seq * num_heads + head) * max_partitions;
    float m = neg_inf();
    for (int p = 0; p < num_parts; p++) m = fmaxf(m, part_max[base + p]);
    float total = 0.0f, o = 0.0f;
    for (int p = 0; p < num_parts; p++) {
        const float w = __expf(part_max[base + p] - m);
        total += part_sum[base + p] * w;
        o += part_out[(base + p) * D + d] * w;
    }
    out[((long)q_rows[seq] * num_heads + head) * D + d] = f32_to_bf16(o / total);
}

#define DECODE_MAIN(D, G)                                                                      \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) paged_decode_d##D##_g##G(        \
        const bf16* qkv, const bf16* k_cache, const bf16* v_cache,                             \
        const unsigned int* block_tables, const unsigned int* q_rows,                          \
        const unsigned int* table_rows, const unsigned int* context_lens, bf16* out,           \
        float* part_out, float* part_max, float* part_sum, int num_heads, int num_kv_heads,    \
        int block_size, int max_blocks_per_seq, int window, float scale, int max_partitions,   \
        int part_len) {                                                                        \
        paged_decode<D, G>(qkv, k_cache, v_cache, block_tables, q_rows, table_rows,            \
                           context_lens, out, part_out, part_max, part_sum, num_heads,         \
                           num_kv_heads, block_size, max_blocks_per_seq, window, scale,        \
                           max_partitions, part_len);                                          \
    }

#define DECODE_INSTANCE(D)                                                                     \
    DECODE_MAIN(D, 1)                                                                          \
    DECODE_MAIN(D, 2)                                                                          \
    DECODE_MAIN(D, 4)                                                                          \
    DECODE_MAIN(D, 8)                                                                          \
    extern "C" __global__ void paged_decode_reduce_d##D(                                       \
        const float* part_out, const float* part_max, const float* part_sum,                   \
        const unsigned int* q_rows, const unsigned int* context_lens, bf16* out,               \
        int num_heads, int window, int max_partitions, int part_len) {                         \
        paged_decode_reduce<D>(part_out, part_max, part_sum, q_rows, context_lens, out,        \
                               num_heads, window, max_partitions, part_len);                   \
    }

// Head dims of the supported models: 64 (SmolLM2, Qwen2-0.5B), 128 (Llama, Mistral, Qwen2/3),
// 256 (Gemma 3), and the small ones of test models (stories260K: 8). G is the group size
// rounded up to a power of two (the host picks it; larger groups are refused).
DECODE_INSTANCE(8)
DECODE_INSTANCE(16)
DECODE_INSTANCE(32)
DECODE_INSTANCE(64)
DECODE_INSTANCE(128)
DECODE_INSTANCE(256)
