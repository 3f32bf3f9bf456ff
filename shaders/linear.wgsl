// y = x W^T for every scheme (core/src/cpu/kernels.rs linear, core/src/cpu/fp8_linear.rs), f32 accumulation.
//
// Written for lavapipe (llvmpipe runs 8 invocations in SIMD lanes): a storage-buffer load there is a
// per-lane scalar loop, while a texel fetch is a real vector gather and a uniform-buffer load at a
// uniform index is one scalar load. So the weights live in an Rgba32Uint texture, row-major, each row
// padded to whole 16-byte texels (backend-wgpu upload_tex), TW texels per texture row; the activations
// are read through a 64 KiB uniform window (the XDECL line below is replaced by the host: a uniform array, or a
// storage array when one row of x does not fit 64 KiB). One invocation computes one output row for one
// token row.
//
// Dense and per-tensor/per-row schemes accumulate in 16 lanes like the CPU's dot_lanes (lane j sums the
// elements j, j+16, ...; lanes added pairwise; the tail of k % 16 elements added last), so BF16 results
// match the CPU reference. DT: 0 = F32, 1 = BF16, 2 = F16, 3 = E4M3. SCHEME 0 dense, 1 fp8-static,
// 2 fp8-dynamic, 3 fp8-block-wo, 4 fp8-block; for 1, 2 and 4 `x` holds the E4M3-quantized activations
// (already decoded to f32) and `xs` their scales.
override DT: u32 = 1u;
override SCHEME: u32 = 0u;
const TW_SHIFT: u32 = 12u; // 4096 texels per texture row
struct P {
    n: u32,       // output columns in this weight chunk
    k: u32,
    t: u32,       // token rows in this window
    row0: u32,    // first output column of this chunk
    n_total: u32, // output row stride
    ib: u32,      // blocks along k (fp8-block schemes)
    bo: u32,
    bi: u32,
    sw: f32,
    sx: f32,
    tbase: u32,   // first token row of this window (indexes xs)
    kt: u32,      // texels per weight row
}
@group(0) @binding(0) var w: texture_2d<u32>;
//XDECL
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<uniform> p: P;
@group(0) @binding(4) var<storage, read> ws: array<f32>;
@group(0) @binding(5) var<storage, read> xs: array<f32>;

fn texel(t: u32) -> vec4<u32> {
    return textureLoad(w, vec2<u32>(t & ((1u << TW_SHIFT) - 1u), t >> TW_SHIFT), 0);
}

fn x4(i: u32) -> vec4<f32> {
    return vec4<f32>(xat(i), xat(i + 1u), xat(i + 2u), xat(i + 3u));
}

fn bf2(a: u32, b: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<f32>(a << 16u), bitcast<f32>(a & 0xffff0000u),
                     bitcast<f32>(b << 16u), bitcast<f32>(b & 0xffff0000u));
}

fn hf2(a: u32, b: u32) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(a), unpack2x16float(b));
}

fn fp4(a: u32) -> vec4<f32> {
    return vec4<f32>(fp8_decode(a & 0xffu), fp8_decode((a >> 8u) & 0xffu),
                     fp8_decode((a >> 16u) & 0xffu), fp8_decode(a >> 24u));
}

// Elements per texel.
fn ept() -> u32 {
    if (DT == 0u) { return 4u; }
    if (DT == 3u) { return 16u; }
    return 8u;
}

// Elements 16g .. 16g+15 of the row whose first texel is `tb`, as four columns of 4.
fn group16(tb: u32, g: u32) -> mat4x4<f32> {
    if (DT == 3u) {
        let u = texel(tb + g);
        return mat4x4<f32>(fp4(u.x), fp4(u.y), fp4(u.z), fp4(u.w));
    } else if (DT == 0u) {
        return mat4x4<f32>(bitcast<vec4<f32>>(texel(tb + 4u * g)), bitcast<vec4<f32>>(texel(tb + 4u * g + 1u)),
                           bitcast<vec4<f32>>(texel(tb + 4u * g + 2u)), bitcast<vec4<f32>>(texel(tb + 4u * g + 3u)));
    }
    let u = texel(tb + 2u * g);
    let v = texel(tb + 2u * g + 1u);
    if (DT == 2u) {
        return mat4x4<f32>(hf2(u.x, u.y), hf2(u.z, u.w), hf2(v.x, v.y), hf2(v.z, v.w));
    }
    return mat4x4<f32>(bf2(u.x, u.y), bf2(u.z, u.w), bf2(v.x, v.y), bf2(v.z, v.w));
}

// Element `i` of the row whose first texel is `tb`.
fn elem(tb: u32, i: u32) -> f32 {
    let u = texel(tb + i / ept());
    let e = i % ept();
    if (DT == 0u) {
        return bitcast<f32>(u[e]);
    } else if (DT == 3u) {
        return fp8_decode((u[e / 4u] >> (8u * (e % 4u))) & 0xffu);
    }
    let word = u[e / 2u];
    if (DT == 2u) {
        return unpack2x16float(word)[e % 2u];
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (e % 2u) == 1u));
}

@compute @workgroup_size(64)
fn linear(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = gid.x;
    let tr = wid.y;
    if (c >= p.n || tr >= p.t) { return; }
    let ng = p.row0 + c; // output column
    let tb = c * p.kt;   // first texel of the weight row
    let xb = tr * p.k;   // first element of the activation row
    var acc = 0.0;
    if (SCHEME == 3u || SCHEME == 4u) {
        // Block scales: element by element in k order, the block's scale applied as in the CPU kernels.
        let sb = (ng / p.bo) * p.ib;
        var blk = 0.0;
        for (var i = 0u; i < p.k; i++) {
            let g = i / p.bi;
            if (SCHEME == 3u) {
                acc += (elem(tb, i) * ws[sb + g]) * xat(xb + i);
            } else {
                blk += elem(tb, i) * xat(xb + i);
                if (i + 1u == p.k || (i + 1u) % p.bi == 0u) {
                    acc += blk * xs[(tr + p.tbase) * p.ib + g] * ws[sb + g];
                    blk = 0.0;
                }
            }
        }
    } else {
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
        var a2 = vec4<f32>(0.0);
        var a3 = vec4<f32>(0.0);
        let full = p.k / 16u;
        for (var g = 0u; g < full; g++) {
            let m = group16(tb, g);
            let i = xb + 16u * g;
            a0 += m[0] * x4(i);
            a1 += m[1] * x4(i + 4u);
            a2 += m[2] * x4(i + 8u);
            a3 += m[3] * x4(i + 12u);
        }
        var tail = 0.0;
        for (var i = full * 16u; i < p.k; i++) {
            tail += elem(tb, i) * xat(xb + i);
        }
        a0 += a2;
        a1 += a3;
        a0 += a1;
        let h = a0.xy + a0.zw;
        acc = (h.x + h.y) + tail;
        if (SCHEME == 1u) {
            acc = p.sx * (p.sw * acc);
        } else if (SCHEME == 2u) {
            acc = xs[tr + p.tbase] * (ws[ng] * acc);
        }
    }
    o[tr * p.n_total + ng] = acc;
}
