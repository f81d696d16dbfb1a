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
