// The Gemma 4 ops (core/src/cpu/kernels.rs slice_cols, router_topk; cpu/mod.rs Experts::run), bound like
// elementwise.wgsl.
struct Q {
    n: u32,
    a: u32,
    b: u32,
    c: u32,
    d: u32,
}
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<uniform> q: Q;

// SliceCols: n = rows * width, a = source cols, b = start, c = width.
@compute @workgroup_size(256)
fn slice_cols(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < q.n) { o[i] = a[(i / q.c) * q.a + q.b + i % q.c]; }
}

// gelu_tanh(gate) * up of fused [T, 2I] rows (gate = columns [0, I)): n = rows * I, a = I.
@compute @workgroup_size(256)
fn gelu_split(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < q.n) {
        let base = (i / q.a) * 2u * q.a + i % q.a;
        o[i] = gelu_tanh(a[base]) * a[base + q.a];
    }
}

// One expert's output y (a) weighted by its routing column `c` of b ([T, E], E = b words per row) into o
// ([T, H], a = H): expert 0 (d = 1) assigns, later ones add, each only where the weight is not 0.
@compute @workgroup_size(256)
fn moe_acc(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < q.n) {
        let w = b[(i / q.a) * q.b + q.c];
        var acc = 0.0;
        if (q.d == 0u) { acc = o[i]; }
        if (w != 0.0) { acc += w * a[i]; }
        o[i] = acc;
    }
}

// RouterTopK, one thread per row: n = rows, a = experts, b = top_k; b (binding 1) the per-expert scales.
// Softmax over all experts; the top_k are picked largest first (ties: lower expert first) as the CPU's
// stable sort orders them, each pick the largest below the previous one in that order.
@compute @workgroup_size(64)
fn router_topk(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = flat_id(gid, nwg, 64u);
    if (r >= q.n) { return; }
    let e = q.a;
    let base = r * e;
    var m = -3.0e38;
    for (var j = 0u; j < e; j++) { m = max(m, a[base + j]); }
    var s = 0.0;
    for (var j = 0u; j < e; j++) { s += exp(a[base + j] - m); }
    for (var j = 0u; j < e; j++) { o[base + j] = 0.0; }
    let k = min(q.b, e);
    // Pass 1: the sum of the kept probabilities, in pick order; pass 2: the weights.
    var kept = 0.0;
    for (var step = 0u; step < 2u; step++) {
        var prev_p = 3.0e38;
        var prev_i = 0u;
        for (var t = 0u; t < k; t++) {
            var best = 0u;
            var bp = -1.0;
            for (var j = 0u; j < e; j++) {
                let pj = exp(a[base + j] - m) / s;
                let below = pj < prev_p || (pj == prev_p && j > prev_i && t > 0u);
                if (below && pj > bp) {
                    bp = pj;
                    best = j;
                }
            }
            if (step == 0u) {
                kept += bp;
            } else {
                o[base + best] = bp / kept * b[best];
            }
            prev_p = bp;
            prev_i = best;
        }
    }
}
