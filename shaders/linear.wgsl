// y = x W^T for every scheme (core/src/cpu/kernels.rs linear, core/src/cpu/fp8_linear.rs), f32 accumulation.
// One thread computes one output column `n` for up to 4 token rows. W is packed in u32 words:
// DT 0 = F32, 1 = BF16 (2 per word), 2 = F16 (2 per word), 3 = E4M3 (4 per word).
// SCHEME 0 dense, 1 fp8-static, 2 fp8-dynamic, 3 fp8-block-wo, 4 fp8-block; for 1, 2 and 4 `x` holds the
// E4M3-quantized activations (already decoded to f32) and `xs` their scales.
override DT: u32 = 1u;
override SCHEME: u32 = 0u;
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
}
@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<uniform> p: P;
@group(0) @binding(4) var<storage, read> ws: array<f32>;
@group(0) @binding(5) var<storage, read> xs: array<f32>;

fn load_w(e: u32) -> f32 {
    if (DT == 0u) {
        return bitcast<f32>(w[e]);
    } else if (DT == 1u) {
        return bitcast<f32>(((w[e >> 1u] >> ((e & 1u) * 16u)) & 0xffffu) << 16u);
    } else if (DT == 2u) {
        return unpack2x16float(w[e >> 1u])[e & 1u];
    }
    return fp8_decode((w[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu);
}

fn xv(r: vec4<u32>, i: u32) -> vec4<f32> {
    return vec4<f32>(x[r.x + i], x[r.y + i], x[r.z + i], x[r.w + i]);
}

@compute @workgroup_size(64)
fn linear(@builtin(global_invocation_id) gid: vec3<u32>) {
    let nl = gid.x;
    let t0 = gid.y * 4u;
    if (nl >= p.n || t0 >= p.t) { return; }
    let ng = p.row0 + nl;
    let last = p.t - 1u;
    let r = vec4<u32>(t0, min(t0 + 1u, last), min(t0 + 2u, last), min(t0 + 3u, last)) * p.k;
    let wb = nl * p.k;
    var acc = vec4<f32>(0.0);
    if (SCHEME == 4u) {
        let sb = (ng / p.bo) * p.ib;
        let tr = vec4<u32>(t0, min(t0 + 1u, last), min(t0 + 2u, last), min(t0 + 3u, last)) + p.tbase;
        for (var g = 0u; g < p.ib; g++) {
            let i0 = g * p.bi;
            let i1 = min(i0 + p.bi, p.k);
            var a = vec4<f32>(0.0);
            for (var i = i0; i < i1; i++) {
                a += load_w(wb + i) * xv(r, i);
            }
            let s = vec4<f32>(xs[tr.x * p.ib + g], xs[tr.y * p.ib + g], xs[tr.z * p.ib + g], xs[tr.w * p.ib + g]);
            acc += a * s * ws[sb + g];
        }
    } else if (SCHEME == 3u) {
        let sb = (ng / p.bo) * p.ib;
        for (var i = 0u; i < p.k; i++) {
            acc += (load_w(wb + i) * ws[sb + i / p.bi]) * xv(r, i);
        }
    } else if (DT == 1u && (p.k & 1u) == 0u && p.t == 1u) {
        // Decode (one token row): no redundant activation loads.
        let wb2 = wb >> 1u;
        var a0 = 0.0;
        var a1 = 0.0;
        for (var i = 0u; i < p.k; i += 2u) {
            let word = w[wb2 + (i >> 1u)];
            a0 += bitcast<f32>(word << 16u) * x[i];
            a1 += bitcast<f32>(word & 0xffff0000u) * x[i + 1u];
        }
        acc = vec4<f32>(a0 + a1);
    } else if (DT == 1u && (p.k & 1u) == 0u) {
        // BF16 rows start on a word: two values per load.
        let wb2 = wb >> 1u;
        for (var i = 0u; i < p.k; i += 2u) {
            let word = w[wb2 + (i >> 1u)];
            acc += bitcast<f32>(word << 16u) * xv(r, i);
            acc += bitcast<f32>(word & 0xffff0000u) * xv(r, i + 1u);
        }
    } else if (DT == 3u && (p.k & 3u) == 0u) {
        let wb4 = wb >> 2u;
        for (var i = 0u; i < p.k; i += 4u) {
            let word = w[wb4 + (i >> 2u)];
            acc += fp8_decode(word & 0xffu) * xv(r, i);
            acc += fp8_decode((word >> 8u) & 0xffu) * xv(r, i + 1u);
            acc += fp8_decode((word >> 16u) & 0xffu) * xv(r, i + 2u);
            acc += fp8_decode(word >> 24u) * xv(r, i + 3u);
        }
    } else {
        for (var i = 0u; i < p.k; i++) {
            acc += load_w(wb + i) * xv(r, i);
        }
    }
    if (SCHEME == 1u) {
        acc = p.sx * (p.sw * acc);
    } else if (SCHEME == 2u) {
        let tr = vec4<u32>(t0, min(t0 + 1u, last), min(t0 + 2u, last), min(t0 + 3u, last)) + p.tbase;
        acc = vec4<f32>(xs[tr.x], xs[tr.y], xs[tr.z], xs[tr.w]) * (ws[ng] * acc);
    }
    let nt = min(4u, p.t - t0);
    for (var j = 0u; j < nt; j++) {
        o[(t0 + j) * p.n_total + ng] = acc[j];
    }
}
