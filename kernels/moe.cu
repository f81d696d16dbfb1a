// Mixture-of-experts MLP (Mixtral, Qwen3-MoE): routing, the permutation of (row, expert) pairs
// by expert, two grouped GEMMs over every expert in one launch each, and the weighted combine.
// CPU reference: `route` and `moe` in src/backend/cpu/moe.rs.
//
// Everything is on the device and sized by the step's row count alone (no host reads of the
// routing), so a decode step with MoE layers is graph-capturable. A "pair" is one (row, k) of
// the top-k choices, numbered `p = row * top_k + k`.
//
// Buffers (rows = the step's rows, pairs = rows * top_k, E = experts):
// - router logits f32 `[rows, E]` (cuBLAS, f32 out so that near ties route as on the CPU);
// - topk_ids int `[pairs]`, topk_w f32 `[pairs]`: each row's experts, most probable first;
// - expert_offsets int `[E + 1]`: expert e's pairs are sorted positions
//   `expert_offsets[e] .. expert_offsets[e + 1]`; tile_offsets int `[E + 1]`: its MOE_BM-row
//   tiles are `tile_offsets[e] .. tile_offsets[e + 1]` of the GEMM grid's y;
// - sorted_pairs int `[pairs]`: the pair at each sorted position (by expert, then by pair);
// - act bf16 `[pairs, inter]`, in sorted order: silu(gate) * up of the pair's row;
// - y bf16 `[pairs, hidden]`, in pair order: the expert's output times the routing weight;
// - out bf16 `[rows, hidden]`: the sum of a row's top_k `y`, k = 0.. in order.
// No float atomics anywhere: each output value is summed in a fixed order from its own row's
// data, so a row's result does not depend on the other rows of the batch.

#define MOE_MAX_EXPERTS 256
// Grouped GEMM tile: MOE_BM gathered rows × MOE_BN output columns, MOE_BK of the reduction per
// step, 4 warps of 16 rows each.
#define MOE_BM 64
#define MOE_BN 64
#define MOE_BK 32
#define MOE_SK (MOE_BK + 8)  // padded shared row: conflict-free fragment reads
#define MOE_WARPS 4

// ---- Routing ----
// Softmax of each row's router logits (f32), then the top_k experts by iterative argmax with
// ties to the lower expert id (the CPU's stable sort), optionally renormalized. One warp per
// row, 4 rows per block.
#define ROUTE_WARPS 4
extern "C" __global__ void __launch_bounds__(ROUTE_WARPS * 32)
    moe_route(const float* __restrict__ logits, int rows, int n_exp, int top_k,
              int renormalize, int* __restrict__ topk_ids, float* __restrict__ topk_w) {
    __shared__ float ex[ROUTE_WARPS][MOE_MAX_EXPERTS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row = blockIdx.x * ROUTE_WARPS + warp;
    if (row >= rows) return;  // whole warps leave; no block-wide barrier below
    const float* l = logits + (long)row * n_exp;
    float mx = -__int_as_float(0x7f800000);
    for (int e = lane; e < n_exp; e += 32) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int e = lane; e < n_exp; e += 32) {
        const float v = expf(l[e] - mx);
        ex[warp][e] = v;
        sum += v;
    }
    sum = warp_sum(sum);
    __syncwarp();
    int* ids = topk_ids + (long)row * top_k;
    float* ws = topk_w + (long)row * top_k;
    float total = 0.0f;
    for (int j = 0; j < top_k; j++) {
        // Chosen experts are marked -1 (every exp is >= 0).
        float bv = -2.0f;
        int be = n_exp;
        for (int e = lane; e < n_exp; e += 32) {
            const float v = ex[warp][e];
            if (v > bv) {  // ascending e: a tie keeps the lower id
                bv = v;
                be = e;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (ov > bv || (ov == bv && oe < be)) {
                bv = ov;
                be = oe;
            }
        }
        if (be >= n_exp) be = 0;  // only NaN logits get here; keep the id in range
        const float p = bv / sum;
        total += p;  // in choice order, as the CPU sums
        if (lane == 0) {
            ids[j] = be;
            ws[j] = p;
            ex[warp][be] = -1.0f;
        }
        __syncwarp();
    }
    if (renormalize && lane == 0) {
        for (int j = 0; j < top_k; j++) ws[j] = ws[j] / total;
    }
}

// ---- Permutation ----
// One block: counts per expert (shared-memory integer atomics: the counts do not depend on
// their order), the offsets and tile offsets (serial prefix over the experts), then a stable
// placement of the pairs, in chunks of the block: a pair's rank among the chunk's pairs of
// its expert comes from the warp's peers (`__match_any_sync`) and the earlier warps' counts,
// so each expert's segment lists its pairs in ascending order, run after run.
#define PERM_THREADS 512
#define PERM_WARPS (PERM_THREADS / 32)
extern "C" __global__ void __launch_bounds__(PERM_THREADS)
    moe_permute(const int* __restrict__ topk_ids, int pairs, int n_exp,
                int* __restrict__ expert_offsets, int* __restrict__ tile_offsets,
                int* __restrict__ sorted_pairs) {
    __shared__ int next[MOE_MAX_EXPERTS];  // counts, then each expert's next sorted position
    __shared__ int warp_count[PERM_WARPS][MOE_MAX_EXPERTS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int e = tid; e < n_exp; e += PERM_THREADS) next[e] = 0;
    __syncthreads();
    for (int p = tid; p < pairs; p += PERM_THREADS) atomicAdd(&next[topk_ids[p]], 1);
    __syncthreads();
    if (tid == 0) {
        int off = 0, tiles = 0;
        for (int e = 0; e < n_exp; e++) {
            const int c = next[e];
            expert_offsets[e] = off;
            tile_offsets[e] = tiles;
            next[e] = off;
            off += c;
            tiles += (c + MOE_BM - 1) / MOE_BM;
        }
        expert_offsets[n_exp] = off;
        tile_offsets[n_exp] = tiles;
    }
    __syncthreads();
    for (int p0 = 0; p0 < pairs; p0 += PERM_THREADS) {
        for (int i = tid; i < PERM_WARPS * n_exp; i += PERM_THREADS)
            warp_count[i / n_exp][i % n_exp] = 0;
        __syncthreads();
        const int p = p0 + tid;
        const int e = p < pairs ? topk_ids[p] : -1;
        const unsigned int peers = __match_any_sync(0xffffffffu, e);
        const int rank = __popc(peers & ((1u << lane) - 1u));
        if (e >= 0 && rank == 0) warp_count[warp][e] = __popc(peers);
        __syncthreads();
        if (e >= 0) {
            int before = 0;
            for (int w = 0; w < warp; w++) before += warp_count[w][e];
            sorted_pairs[next[e] + before + rank] = p;
        }
        __syncthreads();
        for (int x = tid; x < n_exp; x += PERM_THREADS) {
            int s = 0;
            for (int w = 0; w < PERM_WARPS; w++) s += warp_count[w][x];
            next[x] += s;
        }
        __syncthreads();
    }
}

// ---- Grouped GEMM ----
// Grid (column tiles, tiles of every expert together): block y finds its expert by binary
// search over tile_offsets (blocks past the last tile leave: the grid is sized for the worst
// case). A block computes C[r, n] = A[r, :] · W[n, :]ᵀ for MOE_BM rows of its expert's segment
// and MOE_BN weight rows, on `mma.sync.m16n8k16` (bf16 in, f32 accumulate); each warp owns 16
// rows. Tiles are copied to shared memory with cp.async (16 bytes) when rows are 16-byte
// aligned (K a multiple of 8), element by element otherwise; past K, past the segment and past
// the weight's rows they read as zero. A value's reduction runs over K in the same order
// whichever rows share its tile, so results are batch invariant.
// Single-stage (no copy/compute overlap): correct and simple, not tuned.

// Copies columns k0 .. k0 + MOE_BK of `rows` rows (row r starts at src + off[r], -1: none)
// into tile[rows][MOE_SK].
template <int ROWS>
__device__ __forceinline__ void moe_load_tile(bf16 (*tile)[MOE_SK], const bf16* __restrict__ src,
                                              const long* off, int k0, int K, bool vec) {
    constexpr int CHUNKS = MOE_BK / 8;
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += MOE_WARPS * 32) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        const int k = k0 + c;
        const long o = off[r];
        if (vec) {
            const bool ok = o >= 0 && k < K;  // K % 8 == 0: a chunk is all in or all out
            cp_async16(&tile[r][c], ok ? (const void*)(src + o + k) : (const void*)src,
                           ok ? 16 : 0);
        } else {
#pragma unroll
            for (int x = 0; x < 8; x++)
                tile[r][c + x] = (o >= 0 && k + x < K) ? src[o + k + x] : (bf16)0;
        }
    }
}

// The block's expert, its first sorted position and its valid rows; false past the last tile.
__device__ __forceinline__ bool moe_tile(const int* __restrict__ expert_offsets,
                                         const int* __restrict__ tile_offsets, int n_exp,
                                         int* e_out, int* m0_out, int* valid_out) {
    const int tile = blockIdx.y;
    if (tile >= tile_offsets[n_exp]) return false;
    // Largest e < n_exp with tile_offsets[e] <= tile (empty experts share their successor's
    // offset, and the larger id is the one whose range holds the tile).
    int lo = 0, hi = n_exp - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (tile_offsets[mid] <= tile) lo = mid;
        else hi = mid - 1;
    }
    const int m0 = expert_offsets[lo] + (tile - tile_offsets[lo]) * MOE_BM;
    *e_out = lo;
    *m0_out = m0;
    *valid_out = min(MOE_BM, expert_offsets[lo + 1] - m0);
    return true;
}

// acc[j] for the warp's 16 rows and 8-column group j of the block's MOE_BN columns, over K.
__device__ __forceinline__ void moe_mma_loop(float (*acc)[4], bf16 (*as)[MOE_SK],
                                             bf16 (*bs)[MOE_SK], const bf16* __restrict__ a,
                                             const long* a_off, const bf16* __restrict__ w,
                                             const long* b_off, int K, int valid) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const bool vec = (K & 7) == 0;
    const bool active = warp * 16 < valid;  // warps past the segment skip the math
#pragma unroll
    for (int j = 0; j < MOE_BN / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += MOE_BK) {
        __syncthreads();  // the previous tile is no longer read
        moe_load_tile<MOE_BM>(as, a, a_off, k0, K, vec);
        moe_load_tile<MOE_BN>(bs, w, b_off, k0, K, vec);
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group 0;\n" ::);
        __syncthreads();
        if (!active) continue;
#pragma unroll
        for (int kk = 0; kk < MOE_BK / 16; kk++) {
            const int c = kk * 16 + t * 2;
            const int r = warp * 16 + g;
            unsigned int af[4];
            af[0] = *(const unsigned int*)&as[r][c];
            af[1] = *(const unsigned int*)&as[r + 8][c];
            af[2] = *(const unsigned int*)&as[r][c + 8];
            af[3] = *(const unsigned int*)&as[r + 8][c + 8];
#pragma unroll
            for (int j = 0; j < MOE_BN / 8; j++) {
                unsigned int bf[2];
                bf[0] = *(const unsigned int*)&bs[j * 8 + g][c];
                bf[1] = *(const unsigned int*)&bs[j * 8 + g][c + 8];
                mma_bf16_16816(acc[j], af, bf);
            }
        }
    }
}

// act[s, i] = silu(x[row] · gate_e[i]) * (x[row] · up_e[i]) for sorted position s (pair
// sorted_pairs[s], row = pair / top_k) of expert e, whose `gate_up` weight `[2 * inter,
// hidden]` is at gate_up_ptrs[e]. Grid (ceil(inter / 32), max tiles): a block's 64 weight
// rows are 32 gate rows and the 32 matching up rows, so one thread holds both halves of its
// outputs (column groups j and j + 4) and applies the SiLU gate in f32 before rounding.
extern "C" __global__ void __launch_bounds__(MOE_WARPS * 32)
    moe_gate_up_bf16(const bf16* __restrict__ x, const unsigned long long* __restrict__ gate_up_ptrs,
                     const int* __restrict__ sorted_pairs, const int* __restrict__ expert_offsets,
                     const int* __restrict__ tile_offsets, bf16* __restrict__ act, int n_exp,
                     int top_k, int hidden, int inter) {
    __shared__ __align__(16) bf16 as[MOE_BM][MOE_SK];
    __shared__ __align__(16) bf16 bs[MOE_BN][MOE_SK];
    __shared__ long a_off[MOE_BM];
    __shared__ long b_off[MOE_BN];
    int e, m0, valid;
    if (!moe_tile(expert_offsets, tile_offsets, n_exp, &e, &m0, &valid)) return;
    const int n0 = blockIdx.x * (MOE_BN / 2);  // first gate (and up) row of the block
    for (int r = threadIdx.x; r < MOE_BM; r += blockDim.x)
        a_off[r] = r < valid ? (long)(sorted_pairs[m0 + r] / top_k) * hidden : -1;
    for (int r = threadIdx.x; r < MOE_BN; r += blockDim.x) {
        const int i = n0 + r % (MOE_BN / 2);
        b_off[r] = i < inter ? ((long)(r / (MOE_BN / 2)) * inter + i) * hidden : -1;
    }
    const bf16* w = (const bf16*)gate_up_ptrs[e];
    float acc[MOE_BN / 8][4];
    moe_mma_loop(acc, as, bs, x, a_off, w, b_off, hidden, valid);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < MOE_BN / 16; j++) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int r = warp * 16 + g + (q >= 2 ? 8 : 0);
            const int i = n0 + j * 8 + t * 2 + (q & 1);
            if (r < valid && i < inter) {
                const float gv = acc[j][q], uv = acc[j + MOE_BN / 16][q];
                act[(long)(m0 + r) * inter + i] = f32_to_bf16(gv / (1.0f + __expf(-gv)) * uv);
            }
        }
    }
}

// y[pair, n] = topk_w[pair] * (act[s] · down_e[n]) for sorted position s of expert e (pair
// sorted_pairs[s]), `down` `[hidden, inter]` at down_ptrs[e]. Grid (ceil(hidden / 64), max
// tiles).
extern "C" __global__ void __launch_bounds__(MOE_WARPS * 32)
    moe_down_bf16(const bf16* __restrict__ act, const unsigned long long* __restrict__ down_ptrs,
                  const int* __restrict__ sorted_pairs, const int* __restrict__ expert_offsets,
                  const int* __restrict__ tile_offsets, const float* __restrict__ topk_w,
                  bf16* __restrict__ y, int n_exp, int hidden, int inter) {
    __shared__ __align__(16) bf16 as[MOE_BM][MOE_SK];
    __shared__ __align__(16) bf16 bs[MOE_BN][MOE_SK];
    __shared__ long a_off[MOE_BM];
    __shared__ long b_off[MOE_BN];
    int e, m0, valid;
    if (!moe_tile(expert_offsets, tile_offsets, n_exp, &e, &m0, &valid)) return;
    const int n0 = blockIdx.x * MOE_BN;
    for (int r = threadIdx.x; r < MOE_BM; r += blockDim.x)
        a_off[r] = r < valid ? (long)(m0 + r) * inter : -1;
    for (int r = threadIdx.x; r < MOE_BN; r += blockDim.x)
        b_off[r] = n0 + r < hidden ? (long)(n0 + r) * inter : -1;
    const bf16* w = (const bf16*)down_ptrs[e];
    float acc[MOE_BN / 8][4];
    moe_mma_loop(acc, as, bs, act, a_off, w, b_off, inter, valid);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int r = warp * 16 + g + half * 8;
        if (r >= valid) continue;
        const int pair = sorted_pairs[m0 + r];
        const float wt = topk_w[pair];
        bf16* yr = y + (long)pair * hidden;
#pragma unroll
        for (int j = 0; j < MOE_BN / 8; j++) {
#pragma unroll
            for (int q = 0; q < 2; q++) {
                const int n = n0 + j * 8 + t * 2 + q;
                if (n < hidden) yr[n] = f32_to_bf16(acc[j][half * 2 + q] * wt);
            }
        }
    }
}

// ---- Combine ----
// out[row, n] = Σ_k y[row * top_k + k, n], k = 0.. in order (f32). Grid rows, 256 threads.
extern "C" __global__ void moe_combine_bf16(const bf16* __restrict__ y, bf16* __restrict__ out,
                                            int top_k, int hidden) {
    const long row = blockIdx.x;
    for (int n = threadIdx.x; n < hidden; n += blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < top_k; k++) s += bf16_to_f32(y[(row * top_k + k) * hidden + n]);
        out[row * hidden + n] = f32_to_bf16(s);
    }
}
