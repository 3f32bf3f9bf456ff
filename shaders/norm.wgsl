// RmsNorm over groups of `group` values (core/src/cpu/kernels.rs rms_norm) and LayerNorm of rows of `group`
// values (core/src/cpu/vision.rs layer_norm); one workgroup per group.
struct P {
    group: u32,
    n_groups: u32,
    eps: f32,
    add_one: u32,
    has_weight: u32,
}
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<uniform> p: P;

var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(256)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let g = wid.x + wid.y * nwg.x;
    if (g >= p.n_groups) { return; }
    let base = g * p.group;
    var ss = 0.0;
    for (var i = lid; i < p.group; i += 256u) {
        let v = x[base + i];
        ss += v * v;
    }
    part[lid] = ss;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) { part[lid] += part[lid + s]; }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(part[0] / f32(p.group) + p.eps);
    for (var i = lid; i < p.group; i += 256u) {
        var v = x[base + i] * inv;
        if (p.has_weight != 0u) {
            let wi = w[i];
            v = v * select(wi, 1.0 + wi, p.add_one != 0u);
        }
        o[base + i] = v;
    }
}

// `w` holds the weight (`group` values) then the bias (`group` values). Mean, then the biased variance
// around it.
@compute @workgroup_size(256)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let g = wid.x + wid.y * nwg.x;
    if (g >= p.n_groups) { return; }
    let base = g * p.group;
    let n = f32(p.group);
    var s = 0.0;
    for (var i = lid; i < p.group; i += 256u) { s += x[base + i]; }
    part[lid] = s;
    workgroupBarrier();
    for (var st = 128u; st > 0u; st >>= 1u) {
        if (lid < st) { part[lid] += part[lid + st]; }
        workgroupBarrier();
    }
    let mean = part[0] / n;
    workgroupBarrier();
    var ss = 0.0;
    for (var i = lid; i < p.group; i += 256u) {
        let d = x[base + i] - mean;
        ss += d * d;
    }
    part[lid] = ss;
    workgroupBarrier();
    for (var st = 128u; st > 0u; st >>= 1u) {
        if (lid < st) { part[lid] += part[lid + st]; }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(part[0] / n + p.eps);
    for (var i = lid; i < p.group; i += 256u) {
        o[base + i] = (x[base + i] - mean) * inv * w[i] + w[p.group + i];
    }
}
