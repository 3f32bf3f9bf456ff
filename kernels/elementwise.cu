// Elementwise ops and row selection.
__device__ __forceinline__ u64 gid() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }

extern "C" __global__ void add(const float* a, const float* b, float* o, u64 n) {
    u64 i = gid();
    if (i < n) o[i] = a[i] + b[i];
}
extern "C" __global__ void scale(const float* a, float* o, u64 n, float f) {
    u64 i = gid();
    if (i < n) o[i] = a[i] * f;
}
extern "C" __global__ void softcap(const float* a, float* o, u64 n, float cap) {
    u64 i = gid();
    if (i < n) o[i] = cap * tanhf(a[i] / cap);
}
// gelu_tanh(gate) * up, PyTorch gelu(approximate="tanh").
extern "C" __global__ void gelu_tanh_mul(const float* gate, const float* up, float* o, u64 n) {
    u64 i = gid();
    if (i >= n) return;
    float x = gate[i];
    const float k = 0.7978846f;
    o[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x))) * up[i];
}
// out[r, :] = in[sel[r], :]
extern "C" __global__ void select_rows(const float* in, const u32* sel, float* o, u32 rows, u32 cols) {
    u64 i = gid();
    if (i >= (u64)rows * cols) return;
    u32 r = (u32)(i / cols), c = (u32)(i % cols);
    o[i] = in[(u64)sel[r] * cols + c];
}
