// The k largest logits of each row (largest first, ties by lower id, NaN never picked), so sampling
// copies back k pairs per row instead of the whole vocabulary. One block per row, k rounds of a block
// argmax over the values ordered below the previous pick.
#define TOPK_THREADS 1024
__device__ __forceinline__ bool better(float v, u32 i, float bv, u32 bi) { return v > bv || (v == bv && i < bi); }

extern "C" __global__ void __launch_bounds__(TOPK_THREADS) top_k_rows(const float* __restrict__ logits, u32 vocab, u32 k,
                                                                   float* __restrict__ vals, u32* __restrict__ ids) {
    __shared__ float sv[TOPK_THREADS / 32];
    __shared__ u32 si[TOPK_THREADS / 32];
    const float* row = logits + (u64)blockIdx.x * vocab;
    float pv = 3.4e38f;
    u32 pi = 0;
    bool first = true;
    for (u32 round = 0; round < k; round++) {
        float bv = -3.4e38f;
        u32 bi = 0xffffffffu;
#pragma unroll 8
        for (u32 i = threadIdx.x; i < vocab; i += TOPK_THREADS) {
            float v = row[i];
            if (v != v) continue;
            bool below = first || v < pv || (v == pv && i > pi);
            if (below && (bi == 0xffffffffu || better(v, i, bv, bi))) {
                bv = v;
                bi = i;
            }
        }
        for (int off = 16; off > 0; off >>= 1) {
            float v2 = __shfl_xor_sync(0xffffffffu, bv, off);
            u32 i2 = __shfl_xor_sync(0xffffffffu, bi, off);
            if (i2 != 0xffffffffu && (bi == 0xffffffffu || better(v2, i2, bv, bi))) {
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
            if (si[w] != 0xffffffffu && (bi == 0xffffffffu || better(sv[w], si[w], bv, bi))) {
                bv = sv[w];
                bi = si[w];
            }
        if (threadIdx.x == 0) {
            vals[(u64)blockIdx.x * k + round] = bv;
            ids[(u64)blockIdx.x * k + round] = bi;
        }
        pv = bv;
        pi = bi;
        first = false;
    }
}
