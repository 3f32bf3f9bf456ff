// The k largest logits of each row (largest first, ties by lower id, NaN never picked), so sampling copies
// back k pairs per row instead of the whole vocabulary. Two stages: top_k_partial takes the k best of each
// chunk of a row (one block per chunk), top_k_merge the k best of those candidates (one block per row).
// Each stage runs k rounds of a block argmax over the values ordered below the previous pick.
#define TOPK_THREADS 1024
#define NONE 0xffffffffu
__device__ __forceinline__ bool better(float v, u32 i, float bv, u32 bi) {
    return bi == NONE || v > bv || (v == bv && i < bi);
}

// k best of n candidates: value vals[i], id ids ? ids[i] : base + i. Writes k (value, id) pairs,
// id NONE where fewer than k candidates exist.
__device__ void select_top_k(const float* vals, const u32* ids, u32 base, u32 n, u32 k, float* out_v, u32* out_i) {
    __shared__ float sv[TOPK_THREADS / 32];
    __shared__ u32 si[TOPK_THREADS / 32];
    float pv = 0.0f;
    u32 pi = NONE;
    for (u32 round = 0; round < k; round++) {
        float bv = 0.0f;
        u32 bi = NONE;
#pragma unroll 4
        for (u32 i = threadIdx.x; i < n; i += TOPK_THREADS) {
            float v = vals[i];
            u32 id = ids ? ids[i] : base + i;
            if (v != v || id == NONE) continue;
            bool below = pi == NONE || v < pv || (v == pv && id > pi);
            if (below && better(v, id, bv, bi)) {
                bv = v;
                bi = id;
            }
        }
        for (int off = 16; off > 0; off >>= 1) {
            float v2 = __shfl_xor_sync(0xffffffffu, bv, off);
            u32 i2 = __shfl_xor_sync(0xffffffffu, bi, off);
            if (i2 != NONE && better(v2, i2, bv, bi)) {
                bv = v2;
                bi = i2;
            }
        }
        __syncthreads();
        if ((threadIdx.x & 31) == 0) {
            sv[threadIdx.x >> 5] = bv;
            si[threadIdx.x >> 5] = bi;
        }
        __syncthreads();
        bv = sv[0];
        bi = si[0];
        for (int w = 1; w < TOPK_THREADS / 32; w++)
            if (si[w] != NONE && better(sv[w], si[w], bv, bi)) {
                bv = sv[w];
                bi = si[w];
            }
        if (threadIdx.x == 0) {
            out_v[round] = bv;
            out_i[round] = bi;
        }
        if (bi == NONE) {
            // Nothing left: the remaining rounds answer NONE too.
            for (u32 r = round + 1 + threadIdx.x; r < k; r += TOPK_THREADS) out_i[r] = NONE;
            return;
        }
        pv = bv;
        pi = bi;
    }
}

// grid (chunks, rows): candidates [(row * chunks + c) * k ..][k].
extern "C" __global__ void __launch_bounds__(TOPK_THREADS) top_k_partial(const float* __restrict__ logits, u32 vocab,
                                                                      u32 k, u32 chunk, float* pv, u32* pi) {
    u32 c = blockIdx.x, row = blockIdx.y, chunks = gridDim.x;
    u32 lo = c * chunk;
    u32 n = lo < vocab ? min(chunk, vocab - lo) : 0;
    u64 at = ((u64)row * chunks + c) * k;
    select_top_k(logits + (u64)row * vocab + lo, 0, lo, n, k, pv + at, pi + at);
}

// grid (rows): the k best of each row's chunks * k candidates.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS) top_k_merge(const float* pv, const u32* pi, u32 ncand, u32 k,
                                                                    float* vals, u32* ids) {
    u64 row = blockIdx.x;
    select_top_k(pv + row * ncand, pi + row * ncand, 0, ncand, k, vals + row * k, ids + row * k);
}
