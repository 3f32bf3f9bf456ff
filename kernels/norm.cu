// RMSNorm over groups of `group` values, one block per group: x * rsqrt(mean(x^2) + eps) * w'.
// w' = 1 + w (Gemma 3, add_one) or w; no weight (has_w = 0) means w' = 1.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
                                    u32 group, u32 ngroups, float eps, u32 add_one, u32 has_w) {
    __shared__ float scratch[32];
    u32 g = blockIdx.x;
    if (g >= ngroups) return;
    const float* xg = x + (u64)g * group;
    float* og = out + (u64)g * group;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < group; i += blockDim.x) ss += xg[i] * xg[i];
    ss = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(ss / (float)group + eps);
    for (u32 i = threadIdx.x; i < group; i += blockDim.x) {
        float wf = has_w ? (add_one ? 1.0f + w[i] : w[i]) : 1.0f;
        og[i] = (xg[i] * inv) * wf;
    }
}
