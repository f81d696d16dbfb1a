// Paged attention of single query tokens over block tables, GQA-aware and split along the
// context for long sequences (flash-decoding), with a reduce step. Decode runs it with one
// query per sequence; prefill (until the tensor-core kernel exists) with one query per prompt
// token, each with its own causal context length.
// CPU reference: `paged_attention_decode` / `_prefill` in src/backend/cpu/attention.rs.
//
// Layouts: q rows are the fused qkv rows `[num_heads + 2 * num_kv_heads, D]`; query i reads qkv
// row `q_rows[i]`, block-table row `table_rows[i]`, attends to `context_lens[i]` positions and
// writes out row `q_rows[i]` (`[num_heads, D]`). Caches `[num_blocks, block_size,
// num_kv_heads, D]`; block tables `[num_seqs, max_blocks_per_seq]`.
//
// Grid (num_kv_heads, num_queries, num_partitions), 128 threads (4 warps). A block takes one KV
// head of one query and one partition of PARTITION context tokens, and serves every query head
// of that KV head's group from one load of each K/V row (GQA). Each warp takes every 4th
// token; a lane holds D/32 dimensions of K and V. A query token attends to positions
// `lo..context_len` with `lo = max(0, context_len - window)` (window 0: no window).
//
// With one partition the block writes the normalized bf16 output itself; otherwise it writes
// its partial (unnormalized) output, running max and exp-sum, and `paged_decode_reduce_*`
// combines the partitions.

#define PARTITION 512
#define NWARPS 4
#define MAXG 8  // most query heads per KV head (the host refuses larger groups)

template <int D>
__device__ __forceinline__ void paged_decode(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const unsigned int* __restrict__ block_tables,
    const unsigned int* __restrict__ q_rows, const unsigned int* __restrict__ table_rows,
    const unsigned int* __restrict__ context_lens, bf16* __restrict__ out,
    float* __restrict__ part_out, float* __restrict__ part_max, float* __restrict__ part_sum,
    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq, int window,
    float scale, int max_partitions) {
    // Lanes split the head dimension; below 32 dimensions only the first D lanes hold one each.
    constexpr int PER_LANE = D >= 32 ? D / 32 : 1;
    const int kvh = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
    const long row = q_rows[seq];
    const int group = num_heads / num_kv_heads;
    const int ctx = (int)context_lens[seq];
    const int lo_ctx = window > 0 && ctx > window ? ctx - window : 0;
    const int start = lo_ctx + part * PARTITION;
    if (start >= ctx) return;  // partitions past the context do nothing
    const int end = min(start + PARTITION, ctx);
    const int n = end - start;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool active = lane * PER_LANE < D;

    __shared__ float q_s[MAXG][D];
    __shared__ float scores[MAXG][PARTITION];
    __shared__ float red[MAXG][NWARPS];
    __shared__ float acc_s[NWARPS][MAXG][D];

    const int qkv_w = (num_heads + 2 * num_kv_heads) * D;
    const bf16* qrow = qkv + row * qkv_w + (long)kvh * group * D;
    for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
        q_s[i / D][i % D] = bf16_to_f32(qrow[i]) * scale;
    }
    __syncthreads();

    const unsigned int* table = block_tables + (long)table_rows[seq] * max_blocks_per_seq;
    const long kv_w = (long)num_kv_heads * D;
    // Scores: a warp per token, lanes split the head dimension.
    for (int t = warp; t < n; t += NWARPS) {
        const int pos = start + t;
        const long slot = (long)table[pos / block_size] * block_size + pos % block_size;
        const bf16* k = k_cache + slot * kv_w + (long)kvh * D + lane * PER_LANE;
        float kf[PER_LANE];
#pragma unroll
        for (int j = 0; j < PER_LANE; j++) kf[j] = active ? bf16_to_f32(k[j]) : 0.0f;
        for (int g = 0; g < group; g++) {
            float s = 0.0f;
            if (active) {
#pragma unroll
                for (int j = 0; j < PER_LANE; j++) s += q_s[g][lane * PER_LANE + j] * kf[j];
            }
            s = warp_sum(s);
            if (lane == 0) scores[g][t] = s;
        }
    }
    __syncthreads();

    // Softmax statistics per query head of the group: a warp per head.
    for (int g = warp; g < group; g += NWARPS) {
        float m = -__int_as_float(0x7f800000);
        for (int t = lane; t < n; t += 32) m = fmaxf(m, scores[g][t]);
        m = warp_max(m);
        float sum = 0.0f;
        for (int t = lane; t < n; t += 32) {
            const float e = __expf(scores[g][t] - m);
            scores[g][t] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            red[g][0] = m;
            red[g][1] = sum;
        }
    }
    __syncthreads();

    // P·V: each warp its tokens, then the warps' partial sums are added.
    float acc[MAXG][PER_LANE];
#pragma unroll
    for (int g = 0; g < MAXG; g++)
#pragma unroll
        for (int j = 0; j < PER_LANE; j++) acc[g][j] = 0.0f;
    for (int t = warp; t < n; t += NWARPS) {
        const int pos = start + t;
        const long slot = (long)table[pos / block_size] * block_size + pos % block_size;
        const bf16* v = v_cache + slot * kv_w + (long)kvh * D + lane * PER_LANE;
        float vf[PER_LANE];
#pragma unroll
        for (int j = 0; j < PER_LANE; j++) vf[j] = active ? bf16_to_f32(v[j]) : 0.0f;
#pragma unroll
        for (int g = 0; g < MAXG; g++) {
            if (g < group) {
                const float p = scores[g][t];
#pragma unroll
                for (int j = 0; j < PER_LANE; j++) acc[g][j] += p * vf[j];
            }
        }
    }
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        if (g < group && active) {
#pragma unroll
            for (int j = 0; j < PER_LANE; j++) acc_s[warp][g][lane * PER_LANE + j] = acc[g][j];
        }
    }
    __syncthreads();

    const int num_parts = (ctx - lo_ctx + PARTITION - 1) / PARTITION;
    for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
        const int g = i / D, d = i % D;
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < NWARPS; w++) o += acc_s[w][g][d];
        const int head = kvh * group + g;
        if (num_parts == 1) {
            out[(row * num_heads + head) * D + d] = f32_to_bf16(o / red[g][1]);
        } else {
            const long pi = ((long)seq * num_heads + head) * max_partitions + part;
            part_out[pi * D + d] = o;
            if (d == 0) {
                part_max[pi] = red[g][0];
                part_sum[pi] = red[g][1];
            }
        }
    }
}

// Combines the partitions of sequences longer than one partition. Grid (num_heads, num_seqs),
// D threads, one per output dimension.
template <int D>
__device__ __forceinline__ void paged_decode_reduce(
    const float* __restrict__ part_out, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, const unsigned int* __restrict__ q_rows,
    const unsigned int* __restrict__ context_lens, bf16* __restrict__ out, int num_heads,
    int window, int max_partitions) {
    const int head = blockIdx.x, seq = blockIdx.y;
    const int ctx = (int)context_lens[seq];
    const int lo_ctx = window > 0 && ctx > window ? ctx - window : 0;
    const int num_parts = (ctx - lo_ctx + PARTITION - 1) / PARTITION;
    if (num_parts <= 1) return;  // written by the main kernel
    const int d = threadIdx.x;
    if (d >= D) return;
    const long base = ((long)seq * num_heads + head) * max_partitions;
    float m = -__int_as_float(0x7f800000);
    for (int p = 0; p < num_parts; p++) m = fmaxf(m, part_max[base + p]);
    float total = 0.0f, o = 0.0f;
    for (int p = 0; p < num_parts; p++) {
        const float w = __expf(part_max[base + p] - m);
        total += part_sum[base + p] * w;
        o += part_out[(base + p) * D + d] * w;
    }
    out[((long)q_rows[seq] * num_heads + head) * D + d] = f32_to_bf16(o / total);
}

#define DECODE_INSTANCE(D)                                                                     \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) paged_decode_d##D(               \
        const bf16* qkv, const bf16* k_cache, const bf16* v_cache,                             \
        const unsigned int* block_tables, const unsigned int* q_rows,                          \
        const unsigned int* table_rows, const unsigned int* context_lens, bf16* out,           \
        float* part_out, float* part_max, float* part_sum, int num_heads, int num_kv_heads,    \
        int block_size, int max_blocks_per_seq, int window, float scale, int max_partitions) { \
        paged_decode<D>(qkv, k_cache, v_cache, block_tables, q_rows, table_rows, context_lens, \
                        out, part_out,                                                         \
                        part_max, part_sum, num_heads, num_kv_heads, block_size,               \
                        max_blocks_per_seq, window, scale, max_partitions);                    \
    }                                                                                          \
    extern "C" __global__ void paged_decode_reduce_d##D(                                       \
        const float* part_out, const float* part_max, const float* part_sum,                   \
        const unsigned int* q_rows, const unsigned int* context_lens, bf16* out,               \
        int num_heads, int window,                                                             \
        int max_partitions) {                                                                  \
        paged_decode_reduce<D>(part_out, part_max, part_sum, q_rows, context_lens, out,        \
                               num_heads,                                                      \
                               window, max_partitions);                                        \
    }

// Head dims of the supported models: 64 (SmolLM2, Qwen2-0.5B), 128 (Llama, Mistral, Qwen2),
// and the small ones of test models (stories260K: 8).
DECODE_INSTANCE(8)
DECODE_INSTANCE(16)
DECODE_INSTANCE(32)
DECODE_INSTANCE(64)
DECODE_INSTANCE(128)
