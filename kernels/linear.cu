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
