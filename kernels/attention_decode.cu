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
// (window 0: no window). Scores are soft-capped to softcap · tanh(s / softcap) after scaling
// when softcap > 0 (Gemma 2; 0: no cap). With one partition the block writes the normalized
// bf16 output; otherwise its unnormalized output, running max and exp-sum, which
// `paged_decode_reduce_*` combines.

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

// The end of both decode kernels: merges the NWARPS warps' states of each of the group's
// heads (acc_s: unnormalized outputs, ml_s: running max and exp-sum, in shared memory) and
// writes the block's result — the normalized bf16 output when the context is one partition,
// else this partition's unnormalized output, max and sum for `paged_decode_reduce_*`. Every
// thread of the block calls it, after the barrier that publishes the states.
template <int D, int R>
__device__ __forceinline__ void decode_merge_write(
    float (*acc_s)[R][D], float (*ml_s)[R][2], int group, int num_parts, int kvh,
    long row, int seq, int part, int num_heads, int max_partitions, bf16* __restrict__ out,
    float* __restrict__ part_out, float* __restrict__ part_max, float* __restrict__ part_sum) {
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

template <int D, int G>
__device__ __forceinline__ void paged_decode(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const unsigned int* __restrict__ block_tables,
    const unsigned int* __restrict__ q_rows, const unsigned int* __restrict__ table_rows,
    const unsigned int* __restrict__ context_lens, bf16* __restrict__ out,
    float* __restrict__ part_out, float* __restrict__ part_max, float* __restrict__ part_sum,
    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq, int window,
    float scale, float softcap, int max_partitions, int part_len) {
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
                s[u][g] = ok[u] ? soft_cap(d, softcap) : neg_inf();
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

    decode_merge_write<D>(acc_s, ml_s, group, (ctx - lo_ctx + part_len - 1) / part_len, kvh, row,
                          seq, part, num_heads, max_partitions, out, part_out, part_max,
                          part_sum);
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

// ---- Tensor-core variant for GQA groups ----
// The group's query heads are the rows of the mma's A operand (16 rows, those past the group
// zero), a tile's tokens its columns: S = Q·Kᵀ and O += P·V run on `mma.sync.m16n8k16` instead
// of per-lane dot products and shuffles, which is what bounds the kernel above once a KV head
// serves 4 or more query heads. Same grid, partitions and partial-result format (the reduce
// above serves both). A tile of MMA_BN tokens is copied into shared memory with cp.async (no
// register staging, every copy of the tile in flight at once); each of the 4 warps takes 16
// of its tokens and keeps its own online-softmax state; the warps merge at the end.
#define MMA_BN 64

template <int D>
__device__ __forceinline__ void paged_decode_mma(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const unsigned int* __restrict__ block_tables,
    const unsigned int* __restrict__ q_rows, const unsigned int* __restrict__ table_rows,
    const unsigned int* __restrict__ context_lens, bf16* __restrict__ out,
    float* __restrict__ part_out, float* __restrict__ part_max, float* __restrict__ part_sum,
    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq, int window,
    float scale, float softcap, int max_partitions, int part_len) {
    constexpr int SD = D + 8;  // padded shared row (bank conflicts)
    constexpr int KSTEPS = D / 16;
    constexpr int DSUB = D / 8;
    constexpr int CHUNKS = D / 8;  // 16-byte copies per row
    __shared__ __align__(16) bf16 ks[MMA_BN][SD];
    __shared__ __align__(16) bf16 vs[MMA_BN][SD];

    const int kvh = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
    const long row = q_rows[seq];
    const int group = num_heads / num_kv_heads;  // <= 8: rows g + 8 are always padding
    const int ctx = (int)context_lens[seq];
    const int lo_ctx = window > 0 && ctx > window ? ctx - window : 0;
    const int start = lo_ctx + part * part_len;
    if (start >= ctx) return;
    const int end = min(start + part_len, ctx);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;

    // Q as A fragments: row g is query head kvh * group + g.
    unsigned int qf[KSTEPS][4];
    {
        const int qkv_w = (num_heads + 2 * num_kv_heads) * D;
        const bool has = g < group;
        const bf16* q = qkv + row * qkv_w + ((long)kvh * group + (has ? g : 0)) * D;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk++) {
            const int c = kk * 16 + t * 2;
            qf[kk][0] = has ? *(const unsigned int*)(q + c) : 0u;
            qf[kk][1] = 0u;
            qf[kk][2] = has ? *(const unsigned int*)(q + c + 8) : 0u;
            qf[kk][3] = 0u;
        }
    }
    float o[DSUB][4];
#pragma unroll
    for (int j = 0; j < DSUB; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m = neg_inf(), l = 0.0f;  // of row g, the same in the 4 lanes of a quad

    const unsigned int* table = block_tables + (long)table_rows[seq] * max_blocks_per_seq;
    const long kv_w = (long)num_kv_heads * D;
    const int w0 = warp * 16;  // this warp's first token of a tile
    for (int n0 = start; n0 < end; n0 += MMA_BN) {
        __syncthreads();  // the previous tile is no longer read
        for (int i = threadIdx.x; i < MMA_BN * CHUNKS; i += blockDim.x) {
            const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
            const int pos = n0 + r;
            long off = 0;
            int bytes = 0;  // past the partition: zero-filled
            if (pos < end) {
                const long slot = (long)table[pos / block_size] * block_size + pos % block_size;
                off = slot * kv_w + (long)kvh * D + c;
                bytes = 16;
            }
            cp_async16(&ks[r][c], k_cache + off, bytes);
            cp_async16(&vs[r][c], v_cache + off, bytes);
        }
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group 0;\n" ::);
        __syncthreads();

        // S for this warp's 16 tokens (two 8-token subtiles).
        float s[2][4];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk++) {
                unsigned int b[2];
                const bf16* krow = &ks[w0 + j * 8 + g][kk * 16 + t * 2];
                b[0] = *(const unsigned int*)krow;
                b[1] = *(const unsigned int*)(krow + 8);
                mma_bf16_16816(s[j], qf[kk], b);
            }
        }
        float mx = neg_inf();
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int pos = n0 + w0 + j * 8 + t * 2 + e;
                s[j][e] = pos < end ? soft_cap(s[j][e] * scale, softcap) : neg_inf();
                mx = fmaxf(mx, s[j][e]);
            }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m, mx);
        // Nothing seen yet: exponentiate against 0 so that everything stays 0, not NaN.
        const float base = mn == neg_inf() ? 0.0f : mn;
        const float corr = __expf(m - base);
        m = mn;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < 2; j++) {
            s[j][0] = __expf(s[j][0] - base);
            s[j][1] = __expf(s[j][1] - base);
            sum += s[j][0] + s[j][1];
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        l = l * corr + sum;
#pragma unroll
        for (int j = 0; j < DSUB; j++) {
            o[j][0] *= corr;
            o[j][1] *= corr;
        }
        // O += P·V over the warp's 16 tokens (rows g + 8 of P are zero).
        unsigned int a[4];
        a[0] = pack_bf16(s[0][0], s[0][1]);
        a[1] = 0u;
        a[2] = pack_bf16(s[1][0], s[1][1]);
        a[3] = 0u;
        const int k_lo = w0 + t * 2;
#pragma unroll
        for (int j = 0; j < DSUB; j++) {
            const int n = j * 8 + g;
            unsigned int b[2];
            b[0] = (unsigned int)vs[k_lo][n] | ((unsigned int)vs[k_lo + 1][n] << 16);
            b[1] = (unsigned int)vs[k_lo + 8][n] | ((unsigned int)vs[k_lo + 9][n] << 16);
            mma_bf16_16816(o[j], a, b);
        }
    }

    // Merge the warps (the tiles' shared memory is free now): row g of each warp's state.
    __syncthreads();
    float(*acc_s)[8][D] = reinterpret_cast<float(*)[8][D]>(&ks[0][0]);
    float(*ml_s)[8][2] = reinterpret_cast<float(*)[8][2]>(&vs[0][0]);
    if (g < group) {
#pragma unroll
        for (int j = 0; j < DSUB; j++) {
            acc_s[warp][g][j * 8 + t * 2] = o[j][0];
            acc_s[warp][g][j * 8 + t * 2 + 1] = o[j][1];
        }
        if (t == 0) {
            ml_s[warp][g][0] = m;
            ml_s[warp][g][1] = l;
        }
    }
    __syncthreads();
    decode_merge_write<D>(acc_s, ml_s, group, (ctx - lo_ctx + part_len - 1) / part_len, kvh, row,
                          seq, part, num_heads, max_partitions, out, part_out, part_max,
                          part_sum);
}

#define DECODE_MMA(D)                                                                          \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) paged_decode_mma_d##D(           \
        const bf16* qkv, const bf16* k_cache, const bf16* v_cache,                             \
        const unsigned int* block_tables, const unsigned int* q_rows,                          \
        const unsigned int* table_rows, const unsigned int* context_lens, bf16* out,           \
        float* part_out, float* part_max, float* part_sum, int num_heads, int num_kv_heads,    \
        int block_size, int max_blocks_per_seq, int window, float scale, float softcap,        \
        int max_partitions, int part_len) {                                                    \
        paged_decode_mma<D>(qkv, k_cache, v_cache, block_tables, q_rows, table_rows,           \
                            context_lens, out, part_out, part_max, part_sum, num_heads,        \
                            num_kv_heads, block_size, max_blocks_per_seq, window, scale,       \
                            softcap, max_partitions, part_len);                                \
    }

DECODE_MMA(64)
DECODE_MMA(128)

#define DECODE_MAIN(D, G)                                                                      \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) paged_decode_d##D##_g##G(        \
        const bf16* qkv, const bf16* k_cache, const bf16* v_cache,                             \
        const unsigned int* block_tables, const unsigned int* q_rows,                          \
        const unsigned int* table_rows, const unsigned int* context_lens, bf16* out,           \
        float* part_out, float* part_max, float* part_sum, int num_heads, int num_kv_heads,    \
        int block_size, int max_blocks_per_seq, int window, float scale, float softcap,        \
        int max_partitions, int part_len) {                                                    \
        paged_decode<D, G>(qkv, k_cache, v_cache, block_tables, q_rows, table_rows,            \
                           context_lens, out, part_out, part_max, part_sum, num_heads,         \
                           num_kv_heads, block_size, max_blocks_per_seq, window, scale,        \
                           softcap, max_partitions, part_len);                                 \
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
