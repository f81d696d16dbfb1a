// Paged prefill attention on tensor cores: tiled, online softmax (FlashAttention-2 style),
// causal, and chunked-prefill aware (the queries of a sequence are its last `query_len`
// positions; keys are every cached position before them plus the chunk itself).
// CPU reference: `paged_attention_prefill` in src/backend/cpu/attention.rs.
//
// Grid (ceil(max query_len / BM), num_heads, num_prefill_seqs), 128 threads. A block takes BM=64
// query rows of one head of one sequence; each of its 4 warps owns 16 rows. Key/value tiles of
// BN=64 positions are gathered through the block table into shared memory; S = Q·Kᵀ and O += P·V
// run on `mma.sync.m16n8k16` (bf16 in, f32 accumulate), P staying in registers between the two.
//
// Per-sequence arrays (prefill sequences only): first qkv/out row, query_len, context_len,
// block-table row. `softcap` > 0 caps the scaled scores to softcap · tanh(s / softcap) before
// masking and softmax (Gemma 2); 0: no cap.

#define BM 64
#define BN 64
#define PF_WARPS 4

// ---- Shared by both prefill kernels ----
// A warp owns 16 query rows; a thread holds rows g ("lo") and g + 8 ("hi") of them, as the
// mma's A and C fragments lay them out.

// Q of the thread's two rows (q_lo, q_hi: head_dim D each) as A fragments, zero for a row
// past the queries.
template <int D>
__device__ __forceinline__ void pf_load_q(unsigned int (*qf)[4], const bf16* q_lo,
                                          const bf16* q_hi, bool ok_lo, bool ok_hi, int t) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const int c = kk * 16 + t * 2;
        qf[kk][0] = ok_lo ? *(const unsigned int*)(q_lo + c) : 0u;
        qf[kk][1] = ok_hi ? *(const unsigned int*)(q_hi + c) : 0u;
        qf[kk][2] = ok_lo ? *(const unsigned int*)(q_lo + c + 8) : 0u;
        qf[kk][3] = ok_hi ? *(const unsigned int*)(q_hi + c + 8) : 0u;
    }
}

// One key tile of the online softmax. `s` holds the tile's scaled, capped and masked scores
// (NSUB 8-key groups); updates the running maxima `m` and sums `l` of the two rows, rescales
// the output accumulators `o` (DSUB 8-dimension groups), and leaves P = exp(s - max) in `s`.
template <int NSUB, int DSUB>
__device__ __forceinline__ void pf_softmax_tile(float (*s)[4], float (*o)[4], float& m_lo,
                                                float& m_hi, float& l_lo, float& l_hi) {
    const float NEG_INF = -__int_as_float(0x7f800000);
    float tmax_lo = NEG_INF, tmax_hi = NEG_INF;
#pragma unroll
    for (int j = 0; j < NSUB; j++) {
        tmax_lo = fmaxf(tmax_lo, fmaxf(s[j][0], s[j][1]));
        tmax_hi = fmaxf(tmax_hi, fmaxf(s[j][2], s[j][3]));
    }
    // A row lives in the 4 threads of a quad.
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
        tmax_lo = fmaxf(tmax_lo, __shfl_xor_sync(0xffffffffu, tmax_lo, x));
        tmax_hi = fmaxf(tmax_hi, __shfl_xor_sync(0xffffffffu, tmax_hi, x));
    }
    const float mn_lo = fmaxf(m_lo, tmax_lo), mn_hi = fmaxf(m_hi, tmax_hi);
    // Fully masked so far: exponentiate against 0 so that everything stays 0, not NaN.
    const float base_lo = mn_lo == NEG_INF ? 0.0f : mn_lo;
    const float base_hi = mn_hi == NEG_INF ? 0.0f : mn_hi;
    const float corr_lo = __expf(m_lo - base_lo), corr_hi = __expf(m_hi - base_hi);
    m_lo = mn_lo;
    m_hi = mn_hi;
    float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
    for (int j = 0; j < NSUB; j++) {
        s[j][0] = __expf(s[j][0] - base_lo);
        s[j][1] = __expf(s[j][1] - base_lo);
        s[j][2] = __expf(s[j][2] - base_hi);
        s[j][3] = __expf(s[j][3] - base_hi);
        sum_lo += s[j][0] + s[j][1];
        sum_hi += s[j][2] + s[j][3];
    }
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
        sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, x);
        sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, x);
    }
    l_lo = l_lo * corr_lo + sum_lo;
    l_hi = l_hi * corr_hi + sum_hi;
#pragma unroll
    for (int j = 0; j < DSUB; j++) {
        o[j][0] *= corr_lo;
        o[j][1] *= corr_lo;
        o[j][2] *= corr_hi;
        o[j][3] *= corr_hi;
    }
}

// P's accumulators of keys 16·kk .. 16·kk + 16 as an A fragment, in place.
__device__ __forceinline__ void pf_p_fragment(unsigned int* a, const float (*s)[4], int kk) {
    a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Normalizes the thread's two rows of `o` by their sums and writes those inside the queries.
template <int DSUB>
__device__ __forceinline__ void pf_store_rows(const float (*o)[4], float l_lo, float l_hi,
                                              bf16* out_lo, bf16* out_hi, bool ok_lo, bool ok_hi,
                                              int t) {
    const float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f;
    const float inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
#pragma unroll
    for (int j = 0; j < DSUB; j++) {
        const int c = j * 8 + t * 2;
        if (ok_lo) *(unsigned int*)(out_lo + c) = pack_bf16(o[j][0] * inv_lo, o[j][1] * inv_lo);
        if (ok_hi) *(unsigned int*)(out_hi + c) = pack_bf16(o[j][2] * inv_hi, o[j][3] * inv_hi);
    }
}

template <int D>
__device__ __forceinline__ void paged_prefill(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const unsigned int* __restrict__ block_tables,
    const unsigned int* __restrict__ seq_rows, const unsigned int* __restrict__ seq_qlens,
    const unsigned int* __restrict__ seq_ctxs, const unsigned int* __restrict__ seq_tables,
    bf16* __restrict__ out, int num_heads, int num_kv_heads, int block_size,
    int max_blocks_per_seq, int window, float scale, float softcap) {
    constexpr int SD = D + 8;  // padded smem row (bank conflicts)
    constexpr int KSTEPS = D / 16;
    constexpr int NSUB = BN / 8;  // 8-wide key subtiles per tile
    constexpr int DSUB = D / 8;   // 8-wide output subtiles
    __shared__ __align__(16) bf16 ks[BN][SD];
    __shared__ __align__(16) bf16 vs[BN][SD];

    const int seq = blockIdx.z, head = blockIdx.y;
    const int qlen = (int)seq_qlens[seq];
    const int m0 = blockIdx.x * BM;
    if (m0 >= qlen) return;
    const int ctx = (int)seq_ctxs[seq];
    const int first_pos = ctx - qlen;
    const long row0 = seq_rows[seq];
    const int group = num_heads / num_kv_heads;
    const int kvh = head / group;
    const unsigned int* table = block_tables + (long)seq_tables[seq] * max_blocks_per_seq;
    const int qkv_w = (num_heads + 2 * num_kv_heads) * D;
    const long kv_w = (long)num_kv_heads * D;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // This thread's two query rows (within the sequence's queries) and their positions.
    const int r_lo = m0 + warp * 16 + g, r_hi = r_lo + 8;
    const int pos_lo = first_pos + r_lo, pos_hi = first_pos + r_hi;

    // Q as A fragments, straight from global memory (rows past qlen read as zero).
    unsigned int qf[KSTEPS][4];
    pf_load_q<D>(qf, qkv + (row0 + r_lo) * qkv_w + (long)head * D,
                 qkv + (row0 + r_hi) * qkv_w + (long)head * D, r_lo < qlen, r_hi < qlen, t);

    float o[DSUB][4];
#pragma unroll
    for (int j = 0; j < DSUB; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    const float NEG_INF = -__int_as_float(0x7f800000);
    float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.0f, l_hi = 0.0f;

    // Keys this block needs: from the window start of its first row to its last row.
    const int last_pos = min(first_pos + m0 + BM, ctx) - 1;
    int k_begin = 0;
    if (window > 0) k_begin = max(0, first_pos + m0 + 1 - window);
    k_begin = (k_begin / BN) * BN;

    for (int n0 = k_begin; n0 <= last_pos; n0 += BN) {
        __syncthreads();  // the previous tile is no longer read
        // Gather K and V rows of positions n0 .. n0+BN through the block table, 16 bytes a copy.
        constexpr int CHUNKS = D / 8;  // uint4 per row
        for (int i = threadIdx.x; i < BN * CHUNKS; i += blockDim.x) {
            const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
            const int pos = n0 + r;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (pos < ctx) {
                const long slot = (long)table[pos / block_size] * block_size + pos % block_size;
                kv = *(const uint4*)(k_cache + slot * kv_w + (long)kvh * D + c);
                vv = *(const uint4*)(v_cache + slot * kv_w + (long)kvh * D + c);
            }
            *(uint4*)(&ks[r][c]) = kv;
            *(uint4*)(&vs[r][c]) = vv;
        }
        __syncthreads();

        // S = Q·Kᵀ for this warp's 16 rows and the tile's 64 keys.
        float s[NSUB][4];
#pragma unroll
        for (int j = 0; j < NSUB; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk++) {
                unsigned int b[2];
                const bf16* krow = &ks[j * 8 + g][kk * 16 + t * 2];
                b[0] = *(const unsigned int*)krow;
                b[1] = *(const unsigned int*)(krow + 8);
                mma_bf16_16816(s[j], qf[kk], b);
            }
        }
        // Scale, cap and mask (causal, window, past the context).
#pragma unroll
        for (int j = 0; j < NSUB; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int kpos = n0 + j * 8 + t * 2 + (e & 1);
                const int qpos = e < 2 ? pos_lo : pos_hi;
                const bool masked = kpos > qpos || kpos >= ctx ||
                                    (window > 0 && kpos <= qpos - window);
                s[j][e] = masked ? NEG_INF : soft_cap(s[j][e] * scale, softcap);
            }
        }
        pf_softmax_tile<NSUB, DSUB>(s, o, m_lo, m_hi, l_lo, l_hi);
        // O += P·V: P's accumulators become A fragments in place (16 keys per k-step).
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            unsigned int a[4];
            pf_p_fragment(a, s, kk);
            const int k_lo = kk * 16 + t * 2;
#pragma unroll
            for (int j = 0; j < DSUB; j++) {
                const int n = j * 8 + g;
                unsigned int b[2];
                b[0] = (unsigned int)vs[k_lo][n] | ((unsigned int)vs[k_lo + 1][n] << 16);
                b[1] = (unsigned int)vs[k_lo + 8][n] | ((unsigned int)vs[k_lo + 9][n] << 16);
                mma_bf16_16816(o[j], a, b);
            }
        }
    }

    // Normalize and write this thread's two rows.
    pf_store_rows<DSUB>(o, l_lo, l_hi, out + ((row0 + r_lo) * num_heads + head) * D,
                        out + ((row0 + r_hi) * num_heads + head) * D, r_lo < qlen, r_hi < qlen,
                        t);
}

#define PREFILL_INSTANCE(D)                                                                    \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32) paged_prefill_d##D(            \
        const bf16* qkv, const bf16* k_cache, const bf16* v_cache,                             \
        const unsigned int* block_tables, const unsigned int* seq_rows,                        \
        const unsigned int* seq_qlens, const unsigned int* seq_ctxs,                           \
        const unsigned int* seq_tables, bf16* out, int num_heads, int num_kv_heads,            \
        int block_size, int max_blocks_per_seq, int window, float scale, float softcap) {      \
        paged_prefill<D>(qkv, k_cache, v_cache, block_tables, seq_rows, seq_qlens, seq_ctxs,   \
                         seq_tables, out, num_heads, num_kv_heads, block_size,                 \
                         max_blocks_per_seq, window, scale, softcap);                          \
    }

PREFILL_INSTANCE(64)
PREFILL_INSTANCE(128)

// ---- Pipelined variant (`paged_prefill_pipe_d*`) ----
// The same attention with the shared-memory traffic of FlashAttention-2: K/V tiles gathered with
// cp.async into two stages (the next tile's copy runs under this tile's math), fragments read
// with ldmatrix (K as is, V transposed: one instruction per four 8×8 fragments where the tiled
// kernel above reads V element by element), masks evaluated only on the tiles that cross the
// diagonal, the window's edge or the context's end, and the grid's heaviest (last) query tiles
// started first. Tiles: PIPE_BM = 128 queries (8 warps × 16 rows: each K/V tile copied serves
// twice the queries of the tiled kernel's), TBN keys (32 for d128 and 64 for d64, so two stages
// of K and V fit the 48 KiB of static shared memory). Chosen at run time by
// `CudaBackend::set_prefill_kernel`; same arguments as `paged_prefill_d*`, PIPE_WARPS * 32
// threads and a grid of ceil(max query_len / PIPE_BM) query tiles.

#define PIPE_BM 128
#define PIPE_WARPS 8

// Four 8×8 b16 matrices; lane i gives the address of row i % 8 of matrix i / 8.
__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, const void* smem) {
    const unsigned int s = (unsigned int)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int* r, const void* smem) {
    const unsigned int s = (unsigned int)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

template <int D, int TBN>
__device__ __forceinline__ void paged_prefill_pipe(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const unsigned int* __restrict__ block_tables,
    const unsigned int* __restrict__ seq_rows, const unsigned int* __restrict__ seq_qlens,
    const unsigned int* __restrict__ seq_ctxs, const unsigned int* __restrict__ seq_tables,
    bf16* __restrict__ out, int num_heads, int num_kv_heads, int block_size,
    int max_blocks_per_seq, int window, float scale, float softcap) {
    constexpr int SD = D + 8;  // padded row: ldmatrix's 8 row addresses hit 8 distinct bank groups
    constexpr int KSTEPS = D / 16;
    constexpr int NSUB = TBN / 8;
    constexpr int DSUB = D / 8;
    constexpr int CHUNKS = D / 8;  // 16-byte copies per row
    __shared__ __align__(16) bf16 ks[2][TBN][SD];
    __shared__ __align__(16) bf16 vs[2][TBN][SD];

    const int seq = blockIdx.z, head = blockIdx.y;
    const int qlen = (int)seq_qlens[seq];
    // Heaviest tiles first: with causal masking the last query tile reads the most keys.
    const int m0 = (gridDim.x - 1 - blockIdx.x) * PIPE_BM;
    if (m0 >= qlen) return;
    const int ctx = (int)seq_ctxs[seq];
    const int first_pos = ctx - qlen;
    const long row0 = seq_rows[seq];
    const int kvh = head / (num_heads / num_kv_heads);
    const unsigned int* table = block_tables + (long)seq_tables[seq] * max_blocks_per_seq;
    const int qkv_w = (num_heads + 2 * num_kv_heads) * D;
    const long kv_w = (long)num_kv_heads * D;
    const bf16* k_head = k_cache + (long)kvh * D;
    const bf16* v_head = v_cache + (long)kvh * D;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int r_lo = m0 + warp * 16 + g, r_hi = r_lo + 8;
    const int pos_lo = first_pos + r_lo, pos_hi = first_pos + r_hi;

    // Keys of the block: from the window start of its first row to its last row.
    const int last_pos = min(first_pos + m0 + PIPE_BM, ctx) - 1;
    int k_begin = 0;
    if (window > 0) k_begin = max(0, first_pos + m0 + 1 - window);
    k_begin = (k_begin / TBN) * TBN;
    const int num_tiles = (last_pos - k_begin) / TBN + 1;

    // Gathers K and V of positions n0 .. n0 + TBN into `stage` (zeros past the context).
    auto load = [&](int stage, int n0) {
        for (int i = threadIdx.x; i < TBN * CHUNKS; i += PIPE_WARPS * 32) {
            const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
            const int pos = n0 + r;
            const bool ok = pos < ctx;
            const long slot =
                ok ? (long)table[pos / block_size] * block_size + pos % block_size : 0;
            cp_async16(&ks[stage][r][c], k_head + slot * kv_w + c, ok ? 16 : 0);
            cp_async16(&vs[stage][r][c], v_head + slot * kv_w + c, ok ? 16 : 0);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    load(0, k_begin);

    // Q as A fragments, straight from global memory (rows past qlen read as zero), while the
    // first tile is in flight.
    unsigned int qf[KSTEPS][4];
    pf_load_q<D>(qf, qkv + (row0 + r_lo) * qkv_w + (long)head * D,
                 qkv + (row0 + r_hi) * qkv_w + (long)head * D, r_lo < qlen, r_hi < qlen, t);

    float o[DSUB][4];
#pragma unroll
    for (int j = 0; j < DSUB; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    const float NEG_INF = -__int_as_float(0x7f800000);
    float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.0f, l_hi = 0.0f;
    // ldmatrix row of this lane: row lane % 8 of matrix lane / 8.
    const int lm_row = lane & 7, lm_mat = lane >> 3;

    for (int it = 0; it < num_tiles; it++) {
        const int n0 = k_begin + it * TBN;
        const int st = it & 1;
        if (it + 1 < num_tiles) {
            load(st ^ 1, n0 + TBN);  // that stage was last read before the previous barrier
            asm volatile("cp.async.wait_group 1;\n" ::);
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncthreads();

        // S = Q·Kᵀ: per k-step, one ldmatrix.x4 gives the B fragments of two 8-key groups.
        float s[NSUB][4];
#pragma unroll
        for (int j = 0; j < NSUB; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk++) {
#pragma unroll
            for (int j = 0; j < NSUB; j += 2) {
                // Matrices: (keys j, dims lo), (keys j, dims hi), (keys j+1, lo), (j+1, hi).
                unsigned int b[4];
                ldmatrix_x4(b, &ks[st][(j + (lm_mat >> 1)) * 8 + lm_row]
                                  [kk * 16 + (lm_mat & 1) * 8]);
                mma_bf16_16816(s[j], qf[kk], b);
                mma_bf16_16816(s[j + 1], qf[kk], b + 2);
            }
        }
        // Scale and cap; mask only where the tile crosses the diagonal, the window's edge or
        // the context's end (a block-uniform test).
        const bool edge = n0 + TBN - 1 > first_pos + m0 || n0 + TBN > ctx ||
                          (window > 0 && n0 <= first_pos + m0 + PIPE_BM - 1 - window);
#pragma unroll
        for (int j = 0; j < NSUB; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float v = soft_cap(s[j][e] * scale, softcap);
                if (edge) {
                    const int kpos = n0 + j * 8 + t * 2 + (e & 1);
                    const int qpos = e < 2 ? pos_lo : pos_hi;
                    if (kpos > qpos || kpos >= ctx || (window > 0 && kpos <= qpos - window))
                        v = NEG_INF;
                }
                s[j][e] = v;
            }
        }
        pf_softmax_tile<NSUB, DSUB>(s, o, m_lo, m_hi, l_lo, l_hi);
        // O += P·V: P's accumulators are the A fragments; one ldmatrix.x4.trans gives the B
        // fragments of two 8-dimension groups for 16 keys.
#pragma unroll
        for (int kk = 0; kk < TBN / 16; kk++) {
            unsigned int a[4];
            pf_p_fragment(a, s, kk);
#pragma unroll
            for (int j = 0; j < DSUB; j += 2) {
                // Matrices: (keys lo, dims j), (keys hi, dims j), (lo, j+1), (hi, j+1).
                unsigned int b[4];
                ldmatrix_x4_trans(b, &vs[st][kk * 16 + (lm_mat & 1) * 8 + lm_row]
                                        [(j + (lm_mat >> 1)) * 8]);
                mma_bf16_16816(o[j], a, b);
                mma_bf16_16816(o[j + 1], a, b + 2);
            }
        }
        __syncthreads();  // this stage is refilled two tiles from now
    }

    pf_store_rows<DSUB>(o, l_lo, l_hi, out + ((row0 + r_lo) * num_heads + head) * D,
                        out + ((row0 + r_hi) * num_heads + head) * D, r_lo < qlen, r_hi < qlen,
                        t);
}

#define PREFILL_PIPE_INSTANCE(D, TBN)                                                          \
    extern "C" __global__ void __launch_bounds__(PIPE_WARPS * 32) paged_prefill_pipe_d##D(     \
        const bf16* qkv, const bf16* k_cache, const bf16* v_cache,                             \
        const unsigned int* block_tables, const unsigned int* seq_rows,                        \
        const unsigned int* seq_qlens, const unsigned int* seq_ctxs,                           \
        const unsigned int* seq_tables, bf16* out, int num_heads, int num_kv_heads,            \
        int block_size, int max_blocks_per_seq, int window, float scale, float softcap) {      \
        paged_prefill_pipe<D, TBN>(qkv, k_cache, v_cache, block_tables, seq_rows, seq_qlens,   \
                                   seq_ctxs, seq_tables, out, num_heads, num_kv_heads,         \
                                   block_size, max_blocks_per_seq, window, scale, softcap);    \
    }

PREFILL_PIPE_INSTANCE(64, 64)
PREFILL_PIPE_INSTANCE(128, 32)
