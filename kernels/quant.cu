// Activation quantization of the W8A8 schemes (core/src/cpu/fp8_linear.rs), to E4M3 codes `q` (read by
// cuBLASLt and the scalar GEMV) and the same codes decoded to f32 `qf` (read by the 16-byte GEMV, so no
// output column decodes the activations again).
// Static (scheme A): code = encode(x * inv_sx), the inverted scale multiplied as vLLM does.
extern "C" __global__ void quant_static(const float* __restrict__ x, u8* __restrict__ q, u64 n, float inv_sx,
                                        float* __restrict__ qf) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        u32 c = fp8_encode(x[i] * inv_sx);
        q[i] = (u8)c;
        qf[i] = fp8_decode(c);
    }
}

// Dynamic, one block per (row, group) of `group` columns: mode 0 per token (scheme B,
// s = max(amax/448, 1/(448*512))), mode 1 per token group (scheme D, s = max(amax, 1e-10)/448).
// code = encode(x / s); xs[row * ng + g] = s.
extern "C" __global__ void quant_group(const float* __restrict__ x, u8* __restrict__ q, float* __restrict__ xs,
                                       u32 n, u32 k, u32 group, u32 ng, u32 mode, float* __restrict__ qf) {
    __shared__ float scratch[32];
    u32 id = blockIdx.x;
    if (id >= n) return;
    u32 row = id / ng, g = id % ng;
    u64 i0 = (u64)row * k + (u64)g * group;
    u32 len = min(group, k - g * group);
    float m = 0.0f;
    for (u32 i = threadIdx.x; i < len; i += blockDim.x) m = fmaxf(m, fabsf(x[i0 + i]));
    float amax = block_max(m, scratch);
    float s = mode == 0 ? fmaxf(amax / E4M3_MAX, 1.0f / (E4M3_MAX * 512.0f)) : fmaxf(amax, 1e-10f) / E4M3_MAX;
    if (threadIdx.x == 0) xs[id] = s;
    for (u32 i = threadIdx.x; i < len; i += blockDim.x) {
        u32 c = fp8_encode(x[i0 + i] / s);
        q[i0 + i] = (u8)c;
        qf[i0 + i] = fp8_decode(c);
    }
}
