// y = x W^T for every scheme (core/src/cpu/kernels.rs linear, core/src/cpu/fp8_linear.rs), f32 accumulation.
// W is stored column-major per chunk (backend-wgpu upload_rows_t): word `i * nw + c` holds element `i` of
// chunk rows c*E .. c*E+E-1, E = 1 (DT 0 = F32), 2 (1 = BF16, 2 = F16) or 4 (3 = E4M3), rows padded with 0.
// One thread computes those E output columns for up to 4 token rows; neighbouring threads read
// neighbouring words (contiguous loads on lavapipe, which vectorizes across invocations; coalesced on GPUs)
// and the activations are uniform. Per column the accumulation order over `i` matches the CPU kernels.
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

fn epw() -> u32 {
    if (DT == 0u) { return 1u; }
    if (DT == 3u) { return 4u; }
    return 2u;
}

// One word: element i of the thread's E rows (lanes past E are 0).
fn wword(j: u32) -> vec4<f32> {
    let word = w[j];
    if (DT == 0u) {
        return vec4<f32>(bitcast<f32>(word), 0.0, 0.0, 0.0);
    } else if (DT == 1u) {
        return vec4<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u), 0.0, 0.0);
    } else if (DT == 2u) {
        let h = unpack2x16float(word);
        return vec4<f32>(h.x, h.y, 0.0, 0.0);
    }
    return vec4<f32>(fp8_decode(word & 0xffu), fp8_decode((word >> 8u) & 0xffu),
                     fp8_decode((word >> 16u) & 0xffu), fp8_decode(word >> 24u));
}

fn xv(r: vec4<u32>, i: u32) -> vec4<f32> {
    return vec4<f32>(x[r.x + i], x[r.y + i], x[r.z + i], x[r.w + i]);
}

@compute @workgroup_size(64)
fn linear(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = epw();
    let c = gid.x;
    let nw = (p.n + e - 1u) / e;
    let t0 = gid.y * 4u;
    if (c >= nw || t0 >= p.t) { return; }
    let n0 = c * e;                 // first chunk row of this thread
    let g0 = p.row0 + n0;           // its output column
    let last = p.t - 1u;
    let trow = vec4<u32>(t0, min(t0 + 1u, last), min(t0 + 2u, last), min(t0 + 3u, last));
    let r = trow * p.k;
    // Accumulators: a0..a3 = output columns g0..g0+3, each over the 4 token rows.
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    if (SCHEME == 4u) {
        // Clamp padding columns to a valid scale row; their results are never written.
        let gl = p.row0 + p.n - 1u;
        let sb = vec4<u32>(min(g0, gl) / p.bo, min(g0 + 1u, gl) / p.bo, min(g0 + 2u, gl) / p.bo,
                           min(g0 + 3u, gl) / p.bo) * p.ib;
        let tr = trow + p.tbase;
        for (var g = 0u; g < p.ib; g++) {
            let i0 = g * p.bi;
            let i1 = min(i0 + p.bi, p.k);
            var b0 = vec4<f32>(0.0);
            var b1 = vec4<f32>(0.0);
            var b2 = vec4<f32>(0.0);
            var b3 = vec4<f32>(0.0);
            for (var i = i0; i < i1; i++) {
                let wv = wword(i * nw + c);
                let xr = xv(r, i);
                b0 += wv.x * xr;
                if (e > 1u) { b1 += wv.y * xr; }
                if (e > 2u) { b2 += wv.z * xr; b3 += wv.w * xr; }
            }
            let s = vec4<f32>(xs[tr.x * p.ib + g], xs[tr.y * p.ib + g], xs[tr.z * p.ib + g], xs[tr.w * p.ib + g]);
            a0 += b0 * s * ws[sb.x + g];
            if (e > 1u) { a1 += b1 * s * ws[sb.y + g]; }
            if (e > 2u) { a2 += b2 * s * ws[sb.z + g]; a3 += b3 * s * ws[sb.w + g]; }
        }
    } else if (SCHEME == 3u) {
        let gl = p.row0 + p.n - 1u;
        let sb = vec4<u32>(min(g0, gl) / p.bo, min(g0 + 1u, gl) / p.bo, min(g0 + 2u, gl) / p.bo,
                           min(g0 + 3u, gl) / p.bo) * p.ib;
        for (var i = 0u; i < p.k; i++) {
            let gi = i / p.bi;
            let wv = wword(i * nw + c) * vec4<f32>(ws[sb.x + gi], ws[sb.y + gi], ws[sb.z + gi], ws[sb.w + gi]);
            let xr = xv(r, i);
            a0 += wv.x * xr;
            if (e > 1u) { a1 += wv.y * xr; }
            if (e > 2u) { a2 += wv.z * xr; a3 += wv.w * xr; }
        }
    } else if (p.t == 1u) {
        // Decode (one token row): one activation load per element, all columns in one vector.
        var acc = vec4<f32>(0.0);
        for (var i = 0u; i < p.k; i++) {
            acc += wword(i * nw + c) * x[i];
        }
        a0 = vec4<f32>(acc.x);
        a1 = vec4<f32>(acc.y);
        a2 = vec4<f32>(acc.z);
        a3 = vec4<f32>(acc.w);
    } else {
        for (var i = 0u; i < p.k; i++) {
            let wv = wword(i * nw + c);
            let xr = xv(r, i);
            a0 += wv.x * xr;
            if (e > 1u) { a1 += wv.y * xr; }
            if (e > 2u) { a2 += wv.z * xr; a3 += wv.w * xr; }
        }
    }
    let nt = min(4u, p.t - t0);
    for (var q = 0u; q < e; q++) {
        if (n0 + q >= p.n) { break; }
        let ng = g0 + q;
        var acc = a0;
        if (q == 1u) { acc = a1; } else if (q == 2u) { acc = a2; } else if (q == 3u) { acc = a3; }
        if (SCHEME == 1u) {
            acc = p.sx * (p.sw * acc);
        } else if (SCHEME == 2u) {
            let tr = trow + p.tbase;
            acc = vec4<f32>(xs[tr.x], xs[tr.y], xs[tr.z], xs[tr.w]) * (ws[ng] * acc);
        }
        for (var j = 0u; j < nt; j++) {
            o[(t0 + j) * p.n_total + ng] = acc[j];
        }
    }
}
