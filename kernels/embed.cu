// Embedding gather: out[r, c] = decode(table[ids[r], c]) * scale.
template <int DT>
__device__ void embed_impl(float* out, const u8* table, const u32* ids, u32 t, u32 cols, float scale) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t * cols) return;
    u32 r = (u32)(i / cols), c = (u32)(i % cols);
    out[i] = wload<DT>(table, (u64)ids[r] * cols + c) * scale;
}
extern "C" __global__ void embed_f32(float* o, const u8* w, const u32* ids, u32 t, u32 c, float s) { embed_impl<0>(o, w, ids, t, c, s); }
extern "C" __global__ void embed_bf16(float* o, const u8* w, const u32* ids, u32 t, u32 c, float s) { embed_impl<1>(o, w, ids, t, c, s); }
extern "C" __global__ void embed_f16(float* o, const u8* w, const u32* ids, u32 t, u32 c, float s) { embed_impl<2>(o, w, ids, t, c, s); }
extern "C" __global__ void embed_e4m3(float* o, const u8* w, const u32* ids, u32 t, u32 c, float s) { embed_impl<3>(o, w, ids, t, c, s); }
