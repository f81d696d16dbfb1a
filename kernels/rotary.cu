// Rotary position embedding, neox / Hugging Face "rotate_half" layout, applied in place to the
// query and key heads of the fused qkv rows. `cos_sin` is `[max_positions, rotary_dim]` f32 with
// cos in the first half of a row and sin in the second, precomputed on the host with any
// scaling (llama3, linear, longrope) already folded in. The first `rotary_dim` dimensions of
// each head rotate (all of them but with a partial rotary embedding); the rest pass through.
// CPU reference: `rope` in src/backend/cpu/mod.rs.

// grid: one block per token; threads stride over (head, pair) of the q and k heads.
extern "C" __global__ void rope_bf16(bf16* __restrict__ qkv, const float* __restrict__ cos_sin,
                                     const unsigned int* __restrict__ positions, int num_heads,
                                     int num_kv_heads, int head_dim, int rotary_dim) {
    const int half = rotary_dim / 2;
    const int width = (num_heads + 2 * num_kv_heads) * head_dim;
    bf16* row = qkv + (long)blockIdx.x * width;
    const float* cs = cos_sin + (long)positions[blockIdx.x] * rotary_dim;
    const int pairs = (num_heads + num_kv_heads) * half;  // q heads then k heads
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int h = p / half, i = p - h * half;
        bf16* head = row + h * head_dim;
        const float c = cs[i], s = cs[half + i];
        const float x1 = bf16_to_f32(head[i]), x2 = bf16_to_f32(head[half + i]);
        head[i] = f32_to_bf16(x1 * c - x2 * s);
        head[half + i] = f32_to_bf16(x2 * c + x1 * s);
    }
}
