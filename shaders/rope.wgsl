// Rotate-half RoPE (core/src/cpu/kernels.rs rope). cos/sin come per row from the host (`cs`: [rows, 2*half],
// cos then sin), computed there in f32 exactly as the CPU does.
struct P {
    rows: u32,
    cols: u32,
    head_dim: u32,
    half_dim: u32,
}
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> cs: array<f32>;
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<uniform> p: P;

@compute @workgroup_size(256)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_id(gid, nwg, 256u);
    let heads = p.cols / p.head_dim;
    let per_row = heads * p.half_dim;
    if (t >= p.rows * per_row) { return; }
    let r = t / per_row;
    let rem = t % per_row;
    let h = rem / p.half_dim;
    let i = rem % p.half_dim;
    let base = r * p.cols + h * p.head_dim;
    let a = x[base + i];
    let b = x[base + i + p.half_dim];
    let c = cs[r * 2u * p.half_dim + i];
    let s = cs[r * 2u * p.half_dim + p.half_dim + i];
    o[base + i] = a * c - b * s;
    o[base + i + p.half_dim] = b * c + a * s;
}
