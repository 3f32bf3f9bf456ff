// Add, Scale, Softcap, GeluTanhMul (core/src/cpu/kernels.rs), GeluTanh, BiasAdd, Clamp and ChannelScale
// (core/src/cpu/vision.rs).
struct P {
    n: u32,
    factor: f32,
    cols: u32, // bias_add: the bias's length (the row width)
    c0: u32,   // bias_add: the column of element 0 of this window
    hi: f32,   // clamp: the upper bound (`factor` the lower)
}
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<uniform> p: P;

@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < p.n) { o[i] = a[i] + b[i]; }
}

@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < p.n) { o[i] = a[i] * p.factor; }
}

@compute @workgroup_size(256)
fn softcap(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < p.n) { o[i] = p.factor * tanh_safe(a[i] / p.factor); }
}

@compute @workgroup_size(256)
fn gelu_tanh_mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < p.n) {
        o[i] = gelu_tanh(a[i]) * b[i];
    }
}

@compute @workgroup_size(256)
fn gelu_tanh_only(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < p.n) { o[i] = gelu_tanh(a[i]); }
}

// `b` is the bias (one value per column), bound whole.
@compute @workgroup_size(256)
fn bias_add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < p.n) { o[i] = a[i] + b[(p.c0 + i) % p.cols]; }
}

@compute @workgroup_size(256)
fn clamp_op(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < p.n) { o[i] = min(max(a[i], p.factor), p.hi); }
}

// `b` is the scale (one value per column), bound whole.
@compute @workgroup_size(256)
fn channel_scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_id(gid, nwg, 256u);
    if (i < p.n) { o[i] = a[i] * b[(p.c0 + i) % p.cols]; }
}
