// Writing each token's K and V into its paged-cache slot. Caches are
// `[num_blocks, block_size, num_kv_heads, head_dim]`, so slot `s` (= block * block_size +
// offset) starts at `s * num_kv_heads * head_dim`. Negative slots (padding) are skipped.
// CPU reference: `write_kv` in src/backend/cpu/mod.rs.

// grid: one block per token.
extern "C" __global__ void write_kv_bf16(const bf16* __restrict__ qkv,
                                         const int* __restrict__ slot_mapping,
                                         bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                         int num_heads, int num_kv_heads, int head_dim) {
    const int slot = slot_mapping[blockIdx.x];
    if (slot < 0) return;
    const int kv = num_kv_heads * head_dim;
    const bf16* row = qkv + (long)blockIdx.x * (num_heads * head_dim + 2 * kv);
    const bf16* k = row + num_heads * head_dim;
    const bf16* v = k + kv;
    bf16* kd = k_cache + (long)slot * kv;
    bf16* vd = v_cache + (long)slot * kv;
    for (int i = threadIdx.x; i < kv; i += blockDim.x) {
        kd[i] = k[i];
        vd[i] = v[i];
    }
}

// Whole KV blocks of every layer between the caches and one contiguous buffer, for the tiers
// and P/D transfers: piece p = (i * layers + l) * 2 + kv is block blocks[i] of layer l's K
// (kv = 0) or V (kv = 1), `n` elements, at `packed + p * n` — block after block, each block's
// layers in order, K before V, as `Backend::read_kv_blocks` lays out its bytes. `caches` holds
// each layer's K and V base addresses, `[layers][2]`. CPU reference: the default
// `read_kv_blocks` / `write_kv_blocks` of the `Backend` trait (src/backend/mod.rs).

__device__ __forceinline__ void copy_piece(const bf16* __restrict__ src, bf16* __restrict__ dst,
                                           long n) {
    if ((n & 7) == 0 && ((reinterpret_cast<unsigned long long>(src) |
                          reinterpret_cast<unsigned long long>(dst)) & 15) == 0) {
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
        for (long i = threadIdx.x; i < n / 8; i += blockDim.x) d[i] = s[i];
    } else {
        for (long i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    }
}

// grid: one block per piece (blocks × layers × 2).
extern "C" __global__ void gather_kv_blocks_bf16(const unsigned long long* __restrict__ caches,
                                                 const int* __restrict__ blocks, int layers,
                                                 long n, bf16* __restrict__ packed) {
    const long p = blockIdx.x;
    const int i = (int)(p / (2 * layers));
    const int lk = (int)(p % (2 * layers));
    const bf16* src = reinterpret_cast<const bf16*>(caches[lk]) + (long)blocks[i] * n;
    copy_piece(src, packed + p * n, n);
}

// The inverse of gather_kv_blocks_bf16 (the same arguments): pieces of `packed` into their
// blocks.
extern "C" __global__ void scatter_kv_blocks_bf16(const unsigned long long* __restrict__ caches,
                                                  const int* __restrict__ blocks, int layers,
                                                  long n, const bf16* __restrict__ packed) {
    const long p = blockIdx.x;
    const int i = (int)(p / (2 * layers));
    const int lk = (int)(p % (2 * layers));
    bf16* dst = reinterpret_cast<bf16*>(caches[lk]) + (long)blocks[i] * n;
    copy_piece(packed + p * n, dst, n);
}
