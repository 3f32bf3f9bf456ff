// RMSNorm over groups of `group` values, one block per group: x * rsqrt(mean(x^2) + eps) * w'.
// w' = 1 + w (Gemma 3, add_one) or w; no weight (has_w = 0) means w' = 1.
// Fused forms, used when the norm's only consumer follows it: `res` != 0 adds a residual (the Add op:
// out = res + norm(x)); `tab` != 0 applies RoPE to each group as one head (the Rope op, `tab` as in
// rope.cu, `groups_per_row` heads a row, group <= MAX_ROPE_GROUP).
#define MAX_ROPE_GROUP 512
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
                                    u32 group, u32 ngroups, float eps, u32 add_one, u32 has_w,
                                    const float* __restrict__ res, const float* __restrict__ tab, u32 groups_per_row) {
    __shared__ float scratch[32];
    __shared__ float normed[MAX_ROPE_GROUP];
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
        float y = (xg[i] * inv) * wf;
        if (tab) normed[i] = y;
        else og[i] = res ? res[(u64)g * group + i] + y : y;
    }
    if (tab) {
        __syncthreads();
        u32 half = group / 2;
        const float* t = tab + (u64)(g / groups_per_row) * group;
        for (u32 j = threadIdx.x; j < half; j += blockDim.x) {
            float c = t[j], s = t[half + j];
            float a = normed[j], b = normed[j + half];
            og[j] = a * c - b * s;
            og[j + half] = b * c + a * s;
        }
    }
}
