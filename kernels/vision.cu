// Vision-encoder ops (core/src/cpu/vision.rs): BiasAdd, GeluTanh, LayerNorm, AvgPool2d, EncoderAttention.
// Plain kernels, GPU-unverified (compile-checked with NVRTC only).
__device__ __forceinline__ u64 vgid() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }

// o = x + b[col] over rows of `cols` values.
extern "C" __global__ void bias_add(const float* x, const float* b, float* o, u64 n, u32 cols) {
    u64 i = vgid();
    if (i < n) o[i] = x[i] + b[i % cols];
}

// PyTorch gelu(approximate="tanh").
extern "C" __global__ void gelu_tanh(const float* x, float* o, u64 n) {
    u64 i = vgid();
    if (i >= n) return;
    float v = x[i];
    const float k = 0.7978846f;
    o[i] = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
}

// One block per row: (x - mean) / sqrt(var + eps) * w + b, biased variance around the mean.
extern "C" __global__ void layer_norm(const float* __restrict__ x, const float* __restrict__ w,
                                      const float* __restrict__ b, float* __restrict__ o, u32 cols, u32 rows,
                                      float eps) {
    __shared__ float scratch[32];
    u32 r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (u64)r * cols;
    float* orow = o + (u64)r * cols;
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) s += xr[i];
    float mean = block_sum(s, scratch) / (float)cols;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) {
        float d = xr[i] - mean;
        ss += d * d;
    }
    float inv = 1.0f / sqrtf(block_sum(ss, scratch) / (float)cols + eps);
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) orow[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

// Sequence s's rows are a row-major side x side grid from row s * side * side; output row
// s * ps * ps + py * ps + px is the mean of its kernel x kernel block.
extern "C" __global__ void avg_pool2d(const float* x, float* o, u64 n, u32 cols, u32 side, u32 kernel) {
    u64 t = vgid();
    if (t >= n) return;
    u32 c = (u32)(t % cols);
    u32 orow = (u32)(t / cols);
    u32 ps = side / kernel;
    u32 s = orow / (ps * ps), py = (orow % (ps * ps)) / ps, px = orow % ps;
    u64 row0 = (u64)s * side * side;
    float acc = 0.0f;
    for (u32 ky = 0; ky < kernel; ky++)
        for (u32 kx = 0; kx < kernel; kx++)
            acc += x[(row0 + (u64)(py * kernel + ky) * side + px * kernel + kx) * cols + c];
    o[t] = acc * (1.0f / (float)(kernel * kernel));
}

// Non-causal attention of each sequence's rows among themselves: one block of ENC_THREADS per (row, head),
// keys in tiles of ENC_THREADS with an online softmax (running max, rescaled sum and accumulators).
// `info` per row: slot, start position, rows of its sequence, first row of it (as attention.cu).
#define ENC_THREADS 128
#define ENC_MAX_D 512
extern "C" __global__ void __launch_bounds__(ENC_THREADS)
    encoder_attention(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                      float* __restrict__ o, const uint4* info, u32 n_heads, u32 d, float scale) {
    __shared__ float qs[ENC_MAX_D];
    __shared__ float pt[ENC_THREADS];
    __shared__ float scratch[32];
    u32 r = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    u32 cols = n_heads * d;
    uint4 inf = info[r];
    u32 n = inf.z, row0 = inf.w;
    for (u32 c = tid; c < d; c += ENC_THREADS) qs[c] = q[(u64)r * cols + h * d + c];
    __syncthreads();
    float m = -3.0e38f, l = 0.0f;
    float acc[ENC_MAX_D / ENC_THREADS];
#pragma unroll
    for (int i = 0; i < ENC_MAX_D / ENC_THREADS; i++) acc[i] = 0.0f;
    for (u32 jt = 0; jt < n; jt += ENC_THREADS) {
        u32 j = jt + tid;
        float s = -3.0e38f;
        if (j < n) {
            const float* kj = k + (u64)(row0 + j) * cols + h * d;
            s = 0.0f;
            for (u32 c = 0; c < d; c++) s += qs[c] * kj[c];
            s *= scale;
        }
        float mt = fmaxf(m, block_max(s, scratch));
        float e = j < n ? expf(s - mt) : 0.0f;
        float resc = expf(m - mt);
        l = l * resc + block_sum(e, scratch);
        m = mt;
        pt[tid] = e;
        __syncthreads();
        u32 nj = min((u32)ENC_THREADS, n - jt);
#pragma unroll
        for (int ci = 0; ci < ENC_MAX_D / ENC_THREADS; ci++) {
            u32 c = tid + ci * ENC_THREADS;
            if (c < d) {
                float a = acc[ci] * resc;
                for (u32 jj = 0; jj < nj; jj++) a += pt[jj] * v[(u64)(row0 + jt + jj) * cols + h * d + c];
                acc[ci] = a;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int ci = 0; ci < ENC_MAX_D / ENC_THREADS; ci++) {
        u32 c = tid + ci * ENC_THREADS;
        if (c < d) o[(u64)r * cols + h * d + c] = acc[ci] / l;
    }
}
