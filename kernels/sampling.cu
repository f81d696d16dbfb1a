// On-device sampling, so only token ids leave the GPU: the argmax of each logits row (greedy;
// ties to the lowest id), and random sampling with temperature, top-k, top-p and min-p from one
// uniform number per row that the host drew from the request's RNG. The rules are those of the
// CPU reference, src/backend/cpu/sampling.rs (see its module docs); `sample_*` follows them
// exactly: logits are ordered by an order-preserving u32 key (NaN as -inf), weights count in
// 2^40 fixed point so every sum is exact and independent of the order threads add in, cuts
// keep the tokens tied with them, and the draw walks the kept tokens in id order.

template <typename T>
__device__ __forceinline__ float load_logit(const T* p);
template <>
__device__ __forceinline__ float load_logit<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_logit<bf16>(const bf16* p) { return bf16_to_f32(*p); }

// grid: one block per row; blockDim.x a multiple of 32.
template <typename T>
__device__ __forceinline__ void argmax_row(const T* __restrict__ logits,
                                           unsigned int* __restrict__ out, int vocab) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const T* row = logits + (long)blockIdx.x * vocab;
    const float NEG_INF = -__int_as_float(0x7f800000);
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = load_logit<T>(row + i);
        if (v > bv) { bv = v; bi = i; }  // strided ascending: the first max per thread wins
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = blockDim.x >> 5;
        bv = lane < nwarps ? best_v[lane] : NEG_INF;
        bi = lane < nwarps ? best_i[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) out[blockIdx.x] = (unsigned int)(bi == 0x7fffffff ? 0 : bi);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    argmax_f32(const float* logits, unsigned int* out, int vocab) {
    argmax_row<float>(logits, out, vocab);
}

extern "C" __global__ void __launch_bounds__(1024)
    argmax_bf16(const bf16* logits, unsigned int* out, int vocab) {
    argmax_row<bf16>(logits, out, vocab);
}

// ---- random sampling ----

#define SAMPLE_WORDS 6  // per row: temperature, top_k, top_p, min_p (f32 bits), u (f64 lo, hi)

__device__ __forceinline__ float sample_clean(float v) {
    return v != v ? -__int_as_float(0x7f800000) : v;
}

// Unsigned order of the keys = float order.
__device__ __forceinline__ unsigned int order_key(float v) {
    const unsigned int b = __float_as_uint(sample_clean(v));
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ float sample_weight(float l, float maxv, float inv_t) {
    return l == maxv ? 1.0f : expf((l - maxv) * inv_t);
}

__device__ __forceinline__ unsigned long long fixed_weight(float w) {
    return (unsigned long long)(w * 1099511627776.0f);  // 2^40
}

__device__ __forceinline__ unsigned int block_max_u32(unsigned int v, unsigned int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Exclusive prefix sum over the threads in thread order. `scratch`: 32 shared words.
__device__ __forceinline__ unsigned long long block_excl_scan_u64(unsigned long long v,
                                                                  unsigned long long* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    unsigned long long incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        unsigned long long t = lane < nwarps ? scratch[lane] : 0ull;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long n = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += n;
        }
        if (lane < nwarps) scratch[lane] = t;  // inclusive totals of warps 0..lane
    }
    __syncthreads();
    return incl - v + (warp > 0 ? scratch[warp - 1] : 0ull);
}

// The largest key v >= floor_key such that the tokens with key >= v (and >= floor_key) hold at
// least `target` of the mass (a count of 1 per token, or its fixed-point weight); floor_key
// when all of them together hold less. Radix select, 8 bits a pass from the top; each warp
// adds one aggregated amount per distinct bin, so equal keys do not serialise on one counter.
template <typename T>
__device__ unsigned int radix_select(const T* __restrict__ row, int vocab, unsigned int floor_key,
                                     unsigned long long target, bool by_weight, float maxv,
                                     float inv_t, unsigned long long* hist, int* sel_out) {
    const int lane = threadIdx.x & 31;
    unsigned int prefix = 0u, mask = 0u;
    unsigned long long above = 0ull;  // thread 0's running mass of the bins above
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0ull;
        __syncthreads();
        for (int base = 0; base < vocab; base += blockDim.x) {
            const int i = base + threadIdx.x;
            unsigned int bin = 256u;
            unsigned long long m = 0ull;
            if (i < vocab) {
                const float l = sample_clean(load_logit<T>(row + i));
                const unsigned int key = order_key(l);
                if (key >= floor_key && (key & mask) == prefix) {
                    bin = (key >> shift) & 255u;
                    m = by_weight ? fixed_weight(sample_weight(l, maxv, inv_t)) : 1ull;
                }
            }
            unsigned int pending = __ballot_sync(0xffffffffu, bin < 256u);
            while (pending) {
                const int src = __ffs(pending) - 1;
                const unsigned int b = __shfl_sync(0xffffffffu, bin, src);
                const unsigned long long s = warp_sum(bin == b ? m : 0ull);
                if (lane == src && s) atomicAdd(&hist[b], s);
                pending &= ~__ballot_sync(0xffffffffu, bin == b);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int sel = -1;
            for (int b = 255; b >= 0; --b) {
                if (above + hist[b] >= target) {
                    sel = b;
                    break;
                }
                above += hist[b];
            }
            *sel_out = sel;
        }
        __syncthreads();
        const int sel = *sel_out;
        if (sel < 0) return floor_key;  // only on the first pass: the whole set is short
        prefix |= (unsigned int)sel << shift;
        mask |= 255u << shift;
    }
    return prefix;
}

// grid: one block per row; blockDim.x a multiple of 32, at most 1024.
template <typename T>
__device__ __forceinline__ void sample_row(const T* __restrict__ logits,
                                           const unsigned int* __restrict__ params,
                                           unsigned int* __restrict__ out, int vocab) {
    const unsigned int* p = params + (long)blockIdx.x * SAMPLE_WORDS;
    const float temperature = __uint_as_float(p[0]);
    const unsigned int top_k = p[1];
    const float top_p = __uint_as_float(p[2]);
    const float min_p = __uint_as_float(p[3]);
    const double u = __hiloint2double((int)p[5], (int)p[4]);
    if (temperature == 0.0f || top_k == 1u) {
        argmax_row<T>(logits, out, vocab);
        return;
    }
    __shared__ unsigned long long hist[256];
    __shared__ unsigned long long scratch[32];
    __shared__ unsigned int scratch_u[32];
    __shared__ int sel;
    const T* row = logits + (long)blockIdx.x * vocab;
    const unsigned int floor_key = order_key(-__int_as_float(0x7f800000)) + 1u;

    unsigned int mk = 0u;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        mk = max(mk, order_key(load_logit<T>(row + i)));
    }
    mk = block_max_u32(mk, scratch_u);
    if (mk < floor_key) {  // every logit is -inf or NaN
        if (threadIdx.x == 0) out[blockIdx.x] = 0u;
        return;
    }
    const float maxv = key_value(mk);
    const float inv_t = 1.0f / temperature;

    unsigned int cut = floor_key;
    if (top_k > 0u && top_k < (unsigned int)vocab) {
        cut = radix_select<T>(row, vocab, cut, top_k, false, maxv, inv_t, hist, &sel);
    }
    if (top_p < 1.0f) {
        unsigned long long w = 0ull;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float l = sample_clean(load_logit<T>(row + i));
            if (order_key(l) >= cut) w += fixed_weight(sample_weight(l, maxv, inv_t));
        }
        const unsigned long long total = block_sum(w, scratch);
        unsigned long long target = (unsigned long long)ceil((double)top_p * (double)total);
        target = target < 1ull ? 1ull : (target > total ? total : target);
        cut = radix_select<T>(row, vocab, cut, target, true, maxv, inv_t, hist, &sel);
    }

    // The draw: each thread owns a contiguous run of ids, so thread order is id order.
    const int chunk = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    const int begin = min((int)threadIdx.x * chunk, vocab);
    const int end = min(begin + chunk, vocab);
    unsigned long long local = 0ull;
    for (int i = begin; i < end; ++i) {
        const float l = sample_clean(load_logit<T>(row + i));
        if (order_key(l) >= cut) {
            const float w = sample_weight(l, maxv, inv_t);
            if (w >= min_p) local += fixed_weight(w);
        }
    }
    const unsigned long long total = block_sum(local, scratch);
    unsigned long long target = (unsigned long long)(u * (double)total);
    if (target > total - 1ull) target = total - 1ull;  // total >= 2^40: the best token stays
    const unsigned long long before = block_excl_scan_u64(local, scratch);
    if (before <= target && target < before + local) {
        unsigned long long acc = before;
        for (int i = begin; i < end; ++i) {
            const float l = sample_clean(load_logit<T>(row + i));
            if (order_key(l) >= cut) {
                const float w = sample_weight(l, maxv, inv_t);
                if (w >= min_p) {
                    acc += fixed_weight(w);
                    if (target < acc) {
                        out[blockIdx.x] = (unsigned int)i;
                        return;
                    }
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    sample_f32(const float* logits, const unsigned int* params, unsigned int* out, int vocab) {
    sample_row<float>(logits, params, out, vocab);
}

extern "C" __global__ void __launch_bounds__(1024)
    sample_bf16(const bf16* logits, const unsigned int* params, unsigned int* out, int vocab) {
    sample_row<bf16>(logits, params, out, vocab);
}
