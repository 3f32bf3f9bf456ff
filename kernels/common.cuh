// Shared helpers, prepended to every kernel file before NVRTC compiles it. No CUDA headers are needed.
// Decoding and encoding are bit-exact with core/src/tensor.rs and core/src/fp8.rs.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define E4M3_MAX 448.0f

// Weight dtypes, as the backend numbers them: 0 F32, 1 BF16, 2 F16, 3 E4M3.
__device__ __forceinline__ float bf16_bits_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float fp8_decode(u32 c) {
    u32 e = (c >> 3) & 15u, m = c & 7u;
    if (e == 15u && m == 7u) return __uint_as_float(0x7fc00000u);
    float v = (e == 0u) ? (float)m * (1.0f / 512.0f) : __uint_as_float(((e + 120u) << 23) | (m << 20));
    return (c & 0x80u) ? -v : v;
}

// f32 -> E4M3 like fp8::encode: NaN -> 0x7f, clamp to +-448, round to nearest even.
__device__ __forceinline__ u32 fp8_encode(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fu;
    u32 sign = (bits >> 24) & 0x80u;
    float a = fminf(fabsf(x), E4M3_MAX);
    if (a < 1.0f / 64.0f) return sign | (u32)rintf(a * 512.0f);
    int e = (int)(__float_as_uint(a) >> 23) - 127;
    float mant = a / __uint_as_float((u32)(e + 127) << 23);
    int q = (int)rintf((mant - 1.0f) * 8.0f);
    if (q == 8) { q = 0; e += 1; }
    return sign | ((u32)(e + 7) << 3) | (u32)q;
}

__device__ __forceinline__ float fp8_round(float x) { return fp8_decode(fp8_encode(x)); }

// f32 -> bf16 bits, round to nearest even; NaN stays NaN (quiet).
__device__ __forceinline__ u16 f32_to_bf16_bits(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b | 0x00400000u) >> 16);
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

template <int DT>
__device__ __forceinline__ float wload(const u8* __restrict__ w, u64 i) {
    if (DT == 0) return ((const float*)w)[i];
    if (DT == 1) return bf16_bits_to_f32(((const u16*)w)[i]);
    if (DT == 2) return f16_bits_to_f32(((const u16*)w)[i]);
    return fp8_decode(w[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    float r = 0.0f;
    for (int i = 0; i < nw; i++) r += scratch[i];
    return r;
}

__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    float r = scratch[0];
    for (int i = 1; i < nw; i++) r = fmaxf(r, scratch[i]);
    return r;
}
