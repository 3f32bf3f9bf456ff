// Activation quantization of the W8A8 schemes (core/src/cpu/fp8_linear.rs): codes decoded back to f32.
struct P {
    n: u32,      // elements (static) or rows x groups (grouped)
    k: u32,
    group: u32,
    ng: u32,     // groups per row
    mode: u32,   // 0 per-token (scheme B), 1 per-token-group (scheme D)
    inv_sx: f32,
}
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> xq: array<f32>;
@group(0) @binding(2) var<uniform> p: P;
@group(0) @binding(3) var<storage, read_write> xs: array<f32>;

var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(256)
fn quant_static(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < p.n) { xq[i] = fp8_round(x[i] * p.inv_sx); }
}

@compute @workgroup_size(64)
fn quant_group(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let id = wid.x + wid.y * nwg.x;
    if (id >= p.n) { return; }
    let row = id / p.ng;
    let g = id % p.ng;
    let i0 = row * p.k + g * p.group;
    let len = min(p.group, p.k - g * p.group);
    var m = 0.0;
    for (var i = lid; i < len; i += 64u) {
        m = max(m, abs(x[i0 + i]));
    }
    part[lid] = m;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) { part[lid] = max(part[lid], part[lid + s]); }
        workgroupBarrier();
    }
    let amax = part[0];
    var sc: f32;
    if (p.mode == 0u) {
        sc = max(amax / 448.0, 1.0 / (448.0 * 512.0));
    } else {
        sc = max(amax, 1e-10) / 448.0;
    }
    if (lid == 0u) { xs[id] = sc; }
    for (var i = lid; i < len; i += 64u) {
        xq[i0 + i] = fp8_round(x[i0 + i] / sc);
    }
}
