// The Gemma 4 ops (core/src/cpu/kernels.rs slice_cols, router_topk; core/src/cpu/mod.rs Experts::run).
// Simple kernels, one thread per output value (or per row for the router).
__device__ __forceinline__ u64 g4_gid() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }

// Columns [start, start + width) of each row of `src_cols` columns; n = rows * width.
extern "C" __global__ void slice_cols(const float* x, float* o, u64 n, u32 src_cols, u32 start, u32 width) {
    u64 i = g4_gid();
    if (i < n) o[i] = x[(i / width) * src_cols + start + i % width];
}

// gelu_tanh(gate) * up of fused [T, 2I] rows (gate = columns [0, I)); n = rows * I.
extern "C" __global__ void gelu_split(const float* gu, float* h, u64 n, u32 inter) {
    u64 i = g4_gid();
    if (i >= n) return;
    u64 base = (i / inter) * 2 * inter + i % inter;
    float x = gu[base];
    const float k = 0.7978846f;
    h[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x))) * gu[base + inter];
}

// One expert's output y ([T, H]) weighted by its column `e` of the routing weights ([T, E]) into o: the
// first expert assigns, later ones add, each only where the weight is not 0; n = rows * H.
extern "C" __global__ void moe_acc(const float* y, const float* route, float* o, u64 n, u32 hidden, u32 experts,
                                   u32 e, u32 first) {
    u64 i = g4_gid();
    if (i >= n) return;
    float w = route[(i / hidden) * experts + e];
    float acc = first ? 0.0f : o[i];
    if (w != 0.0f) acc += w * y[i];
    o[i] = acc;
}

// RouterTopK, one thread per row: softmax over all experts; the top_k picked largest first (ties: lower
// expert first, the CPU's stable sort order), each pick the largest below the previous one in that order;
// the picks renormalised to sum 1 and times the per-expert scale, every other entry 0.
extern "C" __global__ void router_topk(const float* logits, const float* pes, float* o, u32 rows, u32 experts,
                                       u32 top_k) {
    u64 r = g4_gid();
    if (r >= rows) return;
    const float* l = logits + r * experts;
    float* out = o + r * experts;
    float m = -3.0e38f;
    for (u32 j = 0; j < experts; j++) m = fmaxf(m, l[j]);
    float s = 0.0f;
    for (u32 j = 0; j < experts; j++) s += expf(l[j] - m);
    for (u32 j = 0; j < experts; j++) out[j] = 0.0f;
    u32 k = top_k < experts ? top_k : experts;
    float kept = 0.0f;
    for (u32 step = 0; step < 2; step++) {
        float prev_p = 3.0e38f;
        u32 prev_i = 0;
        for (u32 t = 0; t < k; t++) {
            u32 best = 0;
            float bp = -1.0f;
            for (u32 j = 0; j < experts; j++) {
                float pj = expf(l[j] - m) / s;
                bool below = pj < prev_p || (pj == prev_p && j > prev_i && t > 0);
                if (below && pj > bp) {
                    bp = pj;
                    best = j;
                }
            }
            if (step == 0) kept += bp;
            else out[best] = bp / kept * pes[best];
            prev_p = bp;
            prev_i = best;
        }
    }
}
