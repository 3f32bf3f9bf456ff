// y = x W^T for every scheme (core/src/cpu/fp8_linear.rs), W stored [n, k] row-major in its own dtype.
// One warp per output column and TT token rows; lanes stride over k so a warp reads a weight row
// contiguously. Schemes: 0 dense, 1 FP8 static (A), 2 FP8 dynamic per token (B), 3 FP8 block
// weight-only (C), 4 FP8 block with per-token-group activations (D). Schemes 1, 2 and 4 read the
// activations as E4M3 codes `xq` with scales `xs` (quant.cu); 0 and 3 read f32 `x`.
#define TT 4

template <int DT, int SCH>
__device__ void linear_impl(const u8* __restrict__ w, const float* __restrict__ x, const u8* __restrict__ xq,
                            const float* __restrict__ xs, const float* __restrict__ ws, float* __restrict__ out,
                            u32 n, u32 k, u32 t, u32 bo, u32 bi, float sw, float sx) {
    u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    u32 col = blockIdx.x * (blockDim.x >> 5) + warp;
    if (col >= n) return;
    u32 t0 = blockIdx.y * TT;
    u32 nt = min((u32)TT, t - t0);
    u64 wrow = (u64)col * k;
    u32 ib = (k + bi - 1) / bi;
    float res[TT];
    if (SCH == 4) {
#pragma unroll
        for (int r = 0; r < TT; r++) res[r] = 0.0f;
        for (u32 g = 0; g < ib; g++) {
            float part[TT];
#pragma unroll
            for (int r = 0; r < TT; r++) part[r] = 0.0f;
            u32 kend = min(k, (g + 1) * bi);
#pragma unroll 4
            for (u32 kk = g * bi + lane; kk < kend; kk += 32) {
                float wv = wload<DT>(w, wrow + kk);
#pragma unroll
                for (int r = 0; r < TT; r++)
                    if (r < nt) part[r] += wv * fp8_decode(xq[(u64)(t0 + r) * k + kk]);
            }
            float sinv = ws[(u64)(col / bo) * ib + g];
#pragma unroll
            for (int r = 0; r < TT; r++) {
                float p = warp_sum(part[r]);
                if (r < nt) res[r] += p * xs[(u64)(t0 + r) * ib + g] * sinv;
            }
        }
    } else {
        float acc[TT];
#pragma unroll
        for (int r = 0; r < TT; r++) acc[r] = 0.0f;
#pragma unroll 4
        for (u32 kk = lane; kk < k; kk += 32) {
            float wv = wload<DT>(w, wrow + kk);
            if (SCH == 3) wv *= ws[(u64)(col / bo) * ib + kk / bi];
#pragma unroll
            for (int r = 0; r < TT; r++) {
                if (r < nt) {
                    u64 xi = (u64)(t0 + r) * k + kk;
                    float xv = (SCH == 1 || SCH == 2) ? fp8_decode(xq[xi]) : x[xi];
                    acc[r] += wv * xv;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < TT; r++) {
            float a = warp_sum(acc[r]);
            if (SCH == 1) a = sx * (sw * a);
            if (SCH == 2 && r < nt) a = xs[t0 + r] * (ws[col] * a);
            res[r] = a;
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < TT; r++)
            if (r < nt) out[(u64)(t0 + r) * n + col] = res[r];
    }
}

#define LINEAR(name, DT, SCH)                                                                               \
    extern "C" __global__ void name(const u8* w, const float* x, const u8* xq, const float* xs, const float* ws, \
                                    float* out, u32 n, u32 k, u32 t, u32 bo, u32 bi, float sw, float sx) {    \
        linear_impl<DT, SCH>(w, x, xq, xs, ws, out, n, k, t, bo, bi, sw, sx);                              \
    }
LINEAR(linear_dense_f32, 0, 0)
LINEAR(linear_dense_bf16, 1, 0)
LINEAR(linear_dense_f16, 2, 0)
LINEAR(linear_fp8_static, 3, 1)
LINEAR(linear_fp8_dynamic, 3, 2)
LINEAR(linear_fp8_block_wo, 3, 3)
LINEAR(linear_fp8_block, 3, 4)

// The same arithmetic with 16-byte loads: each lane reads 16 bytes of the weight row (4 F32, 8 BF16/F16 or
// 16 E4M3 values) and the matching f32 activations (`x`: for the W8A8 schemes their E4M3 codes already
// decoded by quant.cu), two chunks in flight, so a decode GEMV streams the
// weights instead of waiting on one 2-byte load at a time. Needs k * sizeof(weight) a multiple of 16 (and
// for schemes 3 and 4 a block width that is a multiple of the chunk). Scheme 4 applies its group scales
// per 16-value chunk (the same sum, rounded in another order than the reference's per-group dot).
template <int DT>
__device__ __forceinline__ void decode_chunk(uint4 raw, float* w) {
    const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (DT == 0) {
            w[i] = __uint_as_float(words[i]);
        } else if (DT == 1) {
            w[2 * i] = bf16_bits_to_f32((u16)(words[i] & 0xffffu));
            w[2 * i + 1] = bf16_bits_to_f32((u16)(words[i] >> 16));
        } else if (DT == 2) {
            w[2 * i] = f16_bits_to_f32((u16)(words[i] & 0xffffu));
            w[2 * i + 1] = f16_bits_to_f32((u16)(words[i] >> 16));
        } else {
#if __CUDA_ARCH__ >= 890
            // Two E4M3 codes to two F16 (exact: F16 holds every E4M3 value, NaN stays NaN), then to F32.
#pragma unroll
            for (int b = 0; b < 2; b++) {
                u32 h2;
                u16 pair = (u16)((words[i] >> (16 * b)) & 0xffffu);
                asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(pair));
                w[4 * i + 2 * b] = f16_bits_to_f32((u16)(h2 & 0xffffu));
                w[4 * i + 2 * b + 1] = f16_bits_to_f32((u16)(h2 >> 16));
            }
#else
#pragma unroll
            for (int b = 0; b < 4; b++) w[4 * i + b] = fp8_decode((words[i] >> (8 * b)) & 0xffu);
#endif
        }
    }
}

template <int DT, int SCH>
__device__ void linear_vec_impl(const u8* __restrict__ w, const float* __restrict__ x, const u8* __restrict__ xq,
                                const float* __restrict__ xs, const float* __restrict__ ws, float* __restrict__ out,
                                u32 n, u32 k, u32 t, u32 bo, u32 bi, float sw, float sx) {
    const int V = DT == 0 ? 4 : (DT == 3 ? 16 : 8);
    u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    u32 col = blockIdx.x * (blockDim.x >> 5) + warp;
    if (col >= n) return;
    u32 t0 = blockIdx.y * TT;
    u32 nt = min((u32)TT, t - t0);
    const uint4* wrow = (const uint4*)(w + (u64)col * k * (16 / V));
    u32 nchunks = k / V;
    u32 ib = (k + bi - 1) / bi;
    float acc[TT];
#pragma unroll
    for (int r = 0; r < TT; r++) acc[r] = 0.0f;
#pragma unroll 2
    for (u32 ch = lane; ch < nchunks; ch += 32) {
        float wv[V];
        decode_chunk<DT>(__ldg(wrow + ch), wv);
        if (SCH == 3) {
            float sc = ws[(u64)(col / bo) * ib + (ch * V) / bi];
#pragma unroll
            for (int e = 0; e < V; e++) wv[e] *= sc;
        }
#pragma unroll
        for (int r = 0; r < TT; r++) {
            if (r < nt) {
                u64 xi = (u64)(t0 + r) * k + (u64)ch * V;
                float a = acc[r];
                const float4* xr = (const float4*)(x + xi);
                if (SCH == 4) {
                    // The chunk lies in one activation group g: its dot times that group's two scales.
                    float d = 0.0f;
#pragma unroll
                    for (int i = 0; i < V / 4; i++) {
                        float4 xv = xr[i];
                        d += wv[4 * i] * xv.x;
                        d += wv[4 * i + 1] * xv.y;
                        d += wv[4 * i + 2] * xv.z;
                        d += wv[4 * i + 3] * xv.w;
                    }
                    u32 g = (ch * V) / bi;
                    a += d * (xs[(u64)(t0 + r) * ib + g] * ws[(u64)(col / bo) * ib + g]);
                } else {
#pragma unroll
                    for (int i = 0; i < V / 4; i++) {
                        float4 xv = xr[i];
                        a += wv[4 * i] * xv.x;
                        a += wv[4 * i + 1] * xv.y;
                        a += wv[4 * i + 2] * xv.z;
                        a += wv[4 * i + 3] * xv.w;
                    }
                }
                acc[r] = a;
            }
        }
    }
    float res[TT];
#pragma unroll
    for (int r = 0; r < TT; r++) {
        float a = warp_sum(acc[r]);
        if (SCH == 1) a = sx * (sw * a);
        if (SCH == 2 && r < nt) a = xs[t0 + r] * (ws[col] * a);
        res[r] = a;
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < TT; r++)
            if (r < nt) out[(u64)(t0 + r) * n + col] = res[r];
    }
}

#define LINEAR_VEC(name, DT, SCH)                                                                               \
    extern "C" __global__ void name(const u8* w, const float* x, const u8* xq, const float* xs, const float* ws, \
                                    float* out, u32 n, u32 k, u32 t, u32 bo, u32 bi, float sw, float sx) {    \
        linear_vec_impl<DT, SCH>(w, x, xq, xs, ws, out, n, k, t, bo, bi, sw, sx);                          \
    }
LINEAR_VEC(linear_vec_dense_f32, 0, 0)
LINEAR_VEC(linear_vec_dense_bf16, 1, 0)
LINEAR_VEC(linear_vec_dense_f16, 2, 0)
LINEAR_VEC(linear_vec_fp8_static, 3, 1)
LINEAR_VEC(linear_vec_fp8_dynamic, 3, 2)
LINEAR_VEC(linear_vec_fp8_block_wo, 3, 3)
LINEAR_VEC(linear_vec_fp8_block, 3, 4)

// Scales applied after a cuBLASLt FP8 GEMM that produced the raw f32 accumulators acc = xq . wq:
// mode 1 (scheme A) y = sx * (sw * acc); mode 2 (scheme B) y = xs[t] * (ws[n] * acc).
extern "C" __global__ void fp8_gemm_epilogue(float* y, const float* xs, const float* ws, u32 t, u32 n, float sw,
                                             float sx, u32 mode) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t * n) return;
    u32 r = (u32)(i / n), c = (u32)(i % n);
    float a = y[i];
    y[i] = mode == 1 ? sx * (sw * a) : xs[r] * (ws[c] * a);
}
