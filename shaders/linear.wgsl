// y = x W^T for every scheme (core/src/cpu/kernels.rs linear, core/src/cpu/fp8_linear.rs), f32 accumulation.
//
// Written for lavapipe (llvmpipe runs 8 invocations in SIMD lanes): a storage-buffer load there is a
// per-lane scalar loop, while a texel fetch is a real vector gather and a uniform-buffer load at a
// uniform index is one scalar load. So the weights live in an Rgba32Uint texture, row-major, each row
// padded to whole 16-byte texels (backend-wgpu upload_tex), TW texels per texture row; the activations
// are read through a 64 KiB uniform window (the XDECL line below is replaced by the host: a uniform array, or a
// storage array when one row of x does not fit 64 KiB). One invocation computes two output rows for one
// token row.
//
// Dense and per-tensor/per-row schemes accumulate in 4 lanes (lane j sums the elements j, j+4, ...), then
// the lanes pairwise, then the tail of k past the last whole texel. DT: 0 = F32, 1 = BF16, 2 = F16, 3 = E4M3. SCHEME 0 dense, 1 fp8-static,
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
    rcols: u32,   // MoE experts: routing weights per row (0: not an expert)
    re: u32,      // this expert's column of the routing weights
}
@group(0) @binding(0) var w: texture_2d<u32>;
//XDECL
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<uniform> p: P;
@group(0) @binding(4) var<storage, read> ws: array<f32>;
@group(0) @binding(5) var<storage, read> xs: array<f32>;
// MoE routing weights `[T, rcols]`: token rows whose weight for expert `re` is 0 are skipped (their output
// rows are left as they were; moe_acc never reads them).
@group(0) @binding(6) var<storage, read> route: array<f32>;

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

// Block-scaled schemes (3, 4; E4M3 weights) for one output row: element by element in k order, the
// block's scale applied as in the CPU kernels; each texel (16 elements) is fetched once.
fn dot_block(tb: u32, ng: u32, xb: u32, tr: u32) -> f32 {
    let sb = (ng / p.bo) * p.ib;
    var acc = 0.0;
    var blk = 0.0;
    for (var j = 0u; j < p.kt; j++) {
        let u = texel(tb + j);
        for (var e = 0u; e < 16u; e++) {
            let i = j * 16u + e;
            if (i >= p.k) { break; }
            let wv = fp8_decode((u[e / 4u] >> (8u * (e % 4u))) & 0xffu);
            let g = i / p.bi;
            if (SCHEME == 3u) {
                acc += (wv * ws[sb + g]) * xat(xb + i);
            } else {
                blk += wv * xat(xb + i);
                if (i + 1u == p.k || (i + 1u) % p.bi == 0u) {
                    acc += blk * xs[(tr + p.tbase) * p.ib + g] * ws[sb + g];
                    blk = 0.0;
                }
            }
        }
    }
    return acc;
}

// Per-tensor/per-row output scales of the W8A8 schemes.
fn scaled(acc: f32, ng: u32, tr: u32) -> f32 {
    if (SCHEME == 1u) {
        return p.sx * (p.sw * acc);
    } else if (SCHEME == 2u) {
        return xs[tr + p.tbase] * (ws[ng] * acc);
    }
    return acc;
}

fn hsum(a: vec4<f32>) -> f32 {
    let h = a.xy + a.zw;
    return h.x + h.y;
}

// One invocation: output rows 2c and 2c+1 (sharing the activation loads, which cost as much as the
// weight fetches on lavapipe), for token row `tr`.
@compute @workgroup_size(64)
fn linear(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let c0 = 2u * gid.x;
    let tr = wid.y;
    if (c0 >= p.n || tr >= p.t) { return; }
    if (p.rcols != 0u && route[(tr + p.tbase) * p.rcols + p.re] == 0.0) { return; }
    let two = c0 + 1u < p.n;
    let ng = p.row0 + c0; // output column of the first row
    let ta = c0 * p.kt;   // first texel of each weight row
    let tb = select(ta, ta + p.kt, two);
    let xb = tr * p.k;    // first element of the activation row
    var ra = 0.0;
    var rb = 0.0;
    if (SCHEME == 3u || SCHEME == 4u) {
        ra = dot_block(ta, ng, xb, tr);
        if (two) { rb = dot_block(tb, ng + 1u, xb, tr); }
    } else {
        // Whole texels, then the tail element by element (x past k is never read).
        var a = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        let full = p.k / ept();
        for (var j = 0u; j < full; j++) {
            let i = xb + j * ept();
            let u = texel(ta + j);
            let v = texel(tb + j);
            if (DT == 3u) {
                let x0 = x4(i);
                let x1 = x4(i + 4u);
                let x2 = x4(i + 8u);
                let x3 = x4(i + 12u);
                a += fp4(u.x) * x0; a += fp4(u.y) * x1; a += fp4(u.z) * x2; a += fp4(u.w) * x3;
                b += fp4(v.x) * x0; b += fp4(v.y) * x1; b += fp4(v.z) * x2; b += fp4(v.w) * x3;
            } else if (DT == 0u) {
                let x0 = x4(i);
                a += bitcast<vec4<f32>>(u) * x0;
                b += bitcast<vec4<f32>>(v) * x0;
            } else if (DT == 2u) {
                let x0 = x4(i);
                let x1 = x4(i + 4u);
                a += hf2(u.x, u.y) * x0; a += hf2(u.z, u.w) * x1;
                b += hf2(v.x, v.y) * x0; b += hf2(v.z, v.w) * x1;
            } else {
                let x0 = x4(i);
                let x1 = x4(i + 4u);
                a += bf2(u.x, u.y) * x0; a += bf2(u.z, u.w) * x1;
                b += bf2(v.x, v.y) * x0; b += bf2(v.z, v.w) * x1;
            }
        }
        var sa = 0.0;
        var sb = 0.0;
        for (var i = full * ept(); i < p.k; i++) {
            let xi = xat(xb + i);
            sa += elem(ta, i) * xi;
            sb += elem(tb, i) * xi;
        }
        ra = scaled(hsum(a) + sa, ng, tr);
        if (two) { rb = scaled(hsum(b) + sb, ng + 1u, tr); }
    }
    o[tr * p.n_total + ng] = ra;
    if (two) { o[tr * p.n_total + ng + 1u] = rb; }
}
