// Row gathers: the token embedding lookup and the selection of the rows whose logits are
// wanted. CPU reference: `embedding` / `gather_rows` in src/backend/cpu/mod.rs.

// out[t] = table[ids[t]]; one block per token. Ids are checked against the vocabulary by the
// engine before a step is built.
extern "C" __global__ void embedding_bf16(const bf16* __restrict__ table,
                                          const unsigned int* __restrict__ ids,
                                          bf16* __restrict__ out, int hidden) {
    const bf16* src = table + (long)ids[blockIdx.x] * hidden;
    bf16* dst = out + (long)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
}

// out[i] = x[idx[i]] (row width `width`); one block per output row.
extern "C" __global__ void gather_rows_bf16(const bf16* __restrict__ x,
                                            const unsigned int* __restrict__ idx,
                                            bf16* __restrict__ out, int width) {
    const bf16* src = x + (long)idx[blockIdx.x] * width;
    bf16* dst = out + (long)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}
