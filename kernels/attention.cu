// Causal attention with GQA, sliding window and softcap over a paged KV cache, and the cache write
// (core/src/cpu/kernels.rs attention_grouped). Keys of positions before the step's start come from the cache
// (logical position p of a slot sits at ring index p % cap, in page table[slot][(p % cap) / PAGE]);
// the step's own keys come from `k`/`v`, rounded as the cache stores them. Cache element types:
// 0 f32, 1 BF16, 2 E4M3 codes of x / scale.
#define PAGE 16
#define ATT_THREADS 128
#define MAX_D 512

template <int KT>
__device__ __forceinline__ float kv_load(const u8* c, u64 i, float s) {
    if (KT == 0) return ((const float*)c)[i];
    if (KT == 1) return bf16_bits_to_f32(((const u16*)c)[i]);
    return fp8_decode(c[i]) * s;
}

template <int KT>
__device__ __forceinline__ float kv_round(float x, float s) {
    if (KT == 0) return x;
    if (KT == 1) return bf16_bits_to_f32(f32_to_bf16_bits(x));
    return fp8_round(x / s) * s;
}

template <int KT>
__device__ __forceinline__ void kv_store(u8* c, u64 i, float x, float s) {
    if (KT == 0) ((float*)c)[i] = x;
    else if (KT == 1) ((u16*)c)[i] = f32_to_bf16_bits(x);
    else c[i] = (u8)fp8_encode(x / s);
}

struct AttnP {
    u32 n_heads, n_kv_heads, d, q_cols, kv_cols, cap, window, has_softcap;
    float scale, softcap, k_scale, v_scale;
    u32 max_pages, rows;
};

__device__ __forceinline__ u64 cache_index(const u32* table, const AttnP& p, u32 slot, u32 j, u32 col) {
    u32 lj = j % p.cap;
    u32 page = table[(u64)slot * p.max_pages + lj / PAGE];
    return ((u64)page * PAGE + lj % PAGE) * p.kv_cols + col;
}

// Score of key j, computed by a whole warp (lanes over the head dimension); every lane gets it.
template <int KT>
__device__ __forceinline__ float score_warp(const float* qs, const float* k, const u8* kc, const u32* table,
                                            const AttnP& p, u32 j, u32 slot, u32 start, u32 row0, u32 kvo,
                                            u32 lane) {
    float s = 0.0f;
    if (j >= start) {
        u64 base = (u64)(row0 + j - start) * p.kv_cols + kvo;
        for (u32 c = lane; c < p.d; c += 32) s += qs[c] * kv_round<KT>(k[base + c], p.k_scale);
    } else {
        u64 base = cache_index(table, p, slot, j, kvo);
        for (u32 c = lane; c < p.d; c += 32) s += qs[c] * kv_load<KT>(kc, base + c, p.k_scale);
    }
    s = warp_sum(s);
    s *= p.scale;
    if (p.has_softcap) s = p.softcap * tanhf(s / p.softcap);
    return s;
}

template <int KT>
__device__ void attention_impl(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                               float* __restrict__ o, const u8* kc, const u8* vc, const u32* table,
                               const uint4* info, AttnP p, const uint2* spans) {
    __shared__ float qs[MAX_D];
    __shared__ float pt[ATT_THREADS];
    __shared__ float red_m[ATT_THREADS / 32], red_l[ATT_THREADS / 32];
    u32 r = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    uint4 inf = info[r];
    u32 slot = inf.x, start = inf.y, row0 = inf.w;
    u32 pos = start + (r - row0);
    // The row sees [min(window start, first), last], (first, last) from `spans` when given (its image
    // group by the node's ImageGroups mode, core attention_spans), else itself.
    u32 hi = spans ? spans[r].y : pos;
    u32 lo = (p.window != 0 && pos + 1 > p.window) ? pos + 1 - p.window : 0;
    if (spans) lo = min(lo, spans[r].x);
    u32 kvh = h / (p.n_heads / p.n_kv_heads);
    u32 kvo = kvh * p.d;
    for (u32 c = tid; c < p.d; c += ATT_THREADS) qs[c] = q[(u64)r * p.q_cols + h * p.d + c];
    __syncthreads();
    // Pass 1: running max and sum of exponentials per warp (a key per warp at a time), then combined.
    const u32 NW = ATT_THREADS / 32;
    u32 warp = tid >> 5, lane = tid & 31;
    float m = -3.0e38f, l = 0.0f;
    for (u32 j = lo + warp; j <= hi; j += NW) {
        float s = score_warp<KT>(qs, k, kc, table, p, j, slot, start, row0, kvo, lane);
        if (s > m) {
            l = l * expf(m - s) + 1.0f;
            m = s;
        } else {
            l += expf(s - m);
        }
    }
    if (lane == 0) {
        red_m[warp] = m;
        red_l[warp] = l;
    }
    __syncthreads();
    float gm = red_m[0], gl = 0.0f;
    for (int i = 1; i < ATT_THREADS / 32; i++) gm = fmaxf(gm, red_m[i]);
    for (int i = 0; i < ATT_THREADS / 32; i++) gl += red_l[i] * expf(red_m[i] - gm);
    // Pass 2: probabilities of ATT_THREADS keys at a time, accumulated in key order per output value.
    float acc[MAX_D / ATT_THREADS];
#pragma unroll
    for (int i = 0; i < MAX_D / ATT_THREADS; i++) acc[i] = 0.0f;
    for (u32 jt = lo; jt <= hi; jt += ATT_THREADS) {
        // Each warp scores 32 of the tile's keys.
        for (u32 i = 0; i < 32; i++) {
            u32 idx = warp * 32 + i, j = jt + idx;
            if (j > hi) break;
            float s = score_warp<KT>(qs, k, kc, table, p, j, slot, start, row0, kvo, lane);
            if (lane == 0) pt[idx] = expf(s - gm) / gl;
        }
        __syncthreads();
        u32 nj = min((u32)ATT_THREADS, hi + 1 - jt);
#pragma unroll
        for (int ci = 0; ci < MAX_D / ATT_THREADS; ci++) {
            u32 c = tid + ci * ATT_THREADS;
            if (c < p.d) {
                float a = acc[ci];
#pragma unroll 4
                for (u32 jj = 0; jj < nj; jj++) {
                    u32 jk = jt + jj;
                    float val;
                    if (jk >= start) val = kv_round<KT>(v[(u64)(row0 + jk - start) * p.kv_cols + kvo + c], p.v_scale);
                    else val = kv_load<KT>(vc, cache_index(table, p, slot, jk, kvo + c), p.v_scale);
                    a += pt[jj] * val;
                }
                acc[ci] = a;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int ci = 0; ci < MAX_D / ATT_THREADS; ci++) {
        u32 c = tid + ci * ATT_THREADS;
        if (c < p.d) o[(u64)r * p.q_cols + h * p.d + c] = acc[ci];
    }
}

// Write the last `cap` of this step's keys and values of each sequence into the cache.
template <int KT>
__device__ void kv_write_impl(const float* k, const float* v, u8* kc, u8* vc, const u32* table, const uint4* info,
                              AttnP p) {
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (u64)p.rows * p.kv_cols) return;
    u32 r = (u32)(t / p.kv_cols), c = (u32)(t % p.kv_cols);
    uint4 inf = info[r];
    u32 pos = inf.y + (r - inf.w);
    if (pos + p.cap < inf.y + inf.z) return;
    u64 dst = cache_index(table, p, inf.x, pos, c);
    kv_store<KT>(kc, dst, k[t], p.k_scale);
    kv_store<KT>(vc, dst, v[t], p.v_scale);
}

// Split attention for steps of few rows (decode), where one block per (row, head) would leave the GPU
// idle: block z of (row, head) takes keys [lo + z*SPLIT_KEYS, +SPLIT_KEYS) and writes its partial max,
// sum of exponentials and weighted values to part[((row * n_heads + head) * splits + z) * (d + 2)];
// attention_combine merges the splits. Blocks past the row's last key write an empty partial, so the grid
// can be sized for the cache capacity and a captured graph stays valid as sequences grow.
#define SPLIT_KEYS 32
template <int KT>
__device__ void attention_split_impl(const float* __restrict__ q, const float* __restrict__ k,
                                     const float* __restrict__ v, const u8* kc, const u8* vc, const u32* table,
                                     const uint4* info, AttnP p, float* __restrict__ part) {
    __shared__ float qs[MAX_D];
    __shared__ float sc[SPLIT_KEYS];
    __shared__ float scratch[32];
    u32 r = blockIdx.x, h = blockIdx.y, z = blockIdx.z, tid = threadIdx.x;
    u32 warp = tid >> 5, lane = tid & 31;
    uint4 inf = info[r];
    u32 slot = inf.x, start = inf.y, row0 = inf.w;
    u32 pos = start + (r - row0);
    u32 lo = (p.window != 0 && pos + 1 > p.window) ? pos + 1 - p.window : 0;
    u32 cs = lo + z * SPLIT_KEYS;
    float* out = part + (((u64)r * p.n_heads + h) * gridDim.z + z) * (p.d + 2);
    if (cs > pos) {
        if (tid == 0) {
            out[0] = -3.0e38f;
            out[1] = 0.0f;
        }
        return;
    }
    u32 n = min((u32)SPLIT_KEYS, pos + 1 - cs);
    u32 kvh = h / (p.n_heads / p.n_kv_heads);
    u32 kvo = kvh * p.d;
    for (u32 c = tid; c < p.d; c += ATT_THREADS) qs[c] = q[(u64)r * p.q_cols + h * p.d + c];
    __syncthreads();
    // The warps score the split's keys in turn.
    for (u32 idx = warp; idx < n; idx += ATT_THREADS / 32) {
        float s = score_warp<KT>(qs, k, kc, table, p, cs + idx, slot, start, row0, kvo, lane);
        if (lane == 0) sc[idx] = s;
    }
    __syncthreads();
    float m = block_max(tid < n ? sc[tid] : -3.0e38f, scratch);
    float e = tid < n ? expf(sc[tid] - m) : 0.0f;
    float l = block_sum(e, scratch);
    __syncthreads();
    if (tid < n) sc[tid] = e;
    __syncthreads();
    for (u32 c = tid; c < p.d; c += ATT_THREADS) {
        float a = 0.0f;
#pragma unroll 4
        for (u32 jj = 0; jj < n; jj++) {
            u32 jk = cs + jj;
            float val;
            if (jk >= start) val = kv_round<KT>(v[(u64)(row0 + jk - start) * p.kv_cols + kvo + c], p.v_scale);
            else val = kv_load<KT>(vc, cache_index(table, p, slot, jk, kvo + c), p.v_scale);
            a += sc[jj] * val;
        }
        out[2 + c] = a;
    }
    if (tid == 0) {
        out[0] = m;
        out[1] = l;
    }
}

// o[r, h*d + c] = sum_z acc_z[c] e^(m_z - M) / sum_z l_z e^(m_z - M), M = max_z m_z, over the splits that
// hold keys of the row (the others are empty).
extern "C" __global__ void attention_combine(const float* __restrict__ part, float* __restrict__ o, u32 n_heads, u32 d,
                                             u32 q_cols, u32 splits, const uint4* info, u32 window) {
    __shared__ float scratch[32];
    u32 r = blockIdx.x, h = blockIdx.y;
    uint4 inf = info[r];
    u32 pos = inf.y + (r - inf.w);
    u32 lo = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
    u32 used = min(splits, (pos + 1 - lo + SPLIT_KEYS - 1) / SPLIT_KEYS);
    const float* base = part + ((u64)r * n_heads + h) * splits * (d + 2);
    float mx = -3.0e38f;
    for (u32 z = threadIdx.x; z < used; z += blockDim.x) mx = fmaxf(mx, base[(u64)z * (d + 2)]);
    mx = block_max(mx, scratch);
    float l = 0.0f;
    for (u32 z = threadIdx.x; z < used; z += blockDim.x) {
        const float* pz = base + (u64)z * (d + 2);
        l += pz[1] * expf(pz[0] - mx);
    }
    l = block_sum(l, scratch);
    for (u32 c = threadIdx.x; c < d; c += blockDim.x) {
        float a = 0.0f;
        for (u32 z = 0; z < used; z++) {
            const float* pz = base + (u64)z * (d + 2);
            a += pz[2 + c] * expf(pz[0] - mx);
        }
        o[(u64)r * q_cols + h * d + c] = a / l;
    }
}

#define ATTN(sfx, KT)                                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_##sfx(                                 \
        const float* q, const float* k, const float* v, float* o, const u8* kc, const u8* vc, const u32* table, \
        const uint4* info, AttnP p, const uint2* spans) {                                                       \
        attention_impl<KT>(q, k, v, o, kc, vc, table, info, p, spans);                                          \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_split_##sfx(                           \
        const float* q, const float* k, const float* v, const u8* kc, const u8* vc, const u32* table,           \
        const uint4* info, AttnP p, float* part) {                                                              \
        attention_split_impl<KT>(q, k, v, kc, vc, table, info, p, part);                                        \
    }                                                                                                           \
    extern "C" __global__ void kv_write_##sfx(const float* k, const float* v, u8* kc, u8* vc, const u32* table, \
                                              const uint4* info, AttnP p) {                                     \
        kv_write_impl<KT>(k, v, kc, vc, table, info, p);                                                        \
    }
ATTN(f32, 0)
ATTN(bf16, 1)
ATTN(fp8, 2)
