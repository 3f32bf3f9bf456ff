// Rotate-half (NeoX) RoPE on each head of `head_dim` values. `tab` holds per row cos[half] | sin[half],
// computed on the host in f32 exactly as the CPU reference does.
extern "C" __global__ void rope(const float* __restrict__ x, const float* __restrict__ tab, float* __restrict__ out,
                                u32 rows, u32 cols, u32 head_dim) {
    u32 half = head_dim / 2;
    u32 heads = cols / head_dim;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * heads * half) return;
    u32 r = (u32)(i / ((u64)heads * half));
    u32 rem = (u32)(i % ((u64)heads * half));
    u32 h = rem / half, j = rem % half;
    u64 base = (u64)r * cols + (u64)h * head_dim;
    float c = tab[(u64)r * head_dim + j], s = tab[(u64)r * head_dim + half + j];
    float a = x[base + j], b = x[base + j + half];
    out[base + j] = a * c - b * s;
    out[base + j + half] = b * c + a * s;
}
