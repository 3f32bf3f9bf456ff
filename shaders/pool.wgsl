// AvgPool2d (core/src/cpu/vision.rs avg_pool2d): sequence s's rows are a row-major `side x side` grid
// starting at row `s * side * side`; output row `s * ps * ps + py * ps + px` is the mean of its
// `kernel x kernel` block, summed row by row then scaled by 1 / kernel^2 like the CPU.
struct P {
    n: u32, // output rows x cols
    cols: u32,
    side: u32,
    kernel: u32,
}
@group(0) @binding(0) var<storage, read> x: array<f32>;
// pool_positions: the input rows of each pooled row (`side` = kernel^2 of them, ascending); avg_pool2d: unused.
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<uniform> p: P;

@compute @workgroup_size(256)
fn avg_pool2d(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_id(gid, nwg, 256u);
    if (t >= p.n) { return; }
    let c = t % p.cols;
    let orow = t / p.cols;
    let ps = p.side / p.kernel;
    let s = orow / (ps * ps);
    let py = (orow % (ps * ps)) / ps;
    let px = orow % ps;
    let row0 = s * p.side * p.side;
    var acc = 0.0;
    for (var ky = 0u; ky < p.kernel; ky++) {
        for (var kx = 0u; kx < p.kernel; kx++) {
            let r = row0 + (py * p.kernel + ky) * p.side + px * p.kernel + kx;
            acc += x[r * p.cols + c];
        }
    }
    o[t] = acc * (1.0 / f32(p.kernel * p.kernel));
}

// PoolPositions (core/src/cpu/vision.rs pool_positions): pooled row `orow` adds `x / kernel^2` of each of its
// `side` (= kernel^2) input rows `src[orow * side ..]`, in row order like the CPU.
@compute @workgroup_size(256)
fn pool_positions(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_id(gid, nwg, 256u);
    if (t >= p.n) { return; }
    let c = t % p.cols;
    let orow = t / p.cols;
    let inv = 1.0 / f32(p.side);
    var acc = 0.0;
    for (var j = 0u; j < p.side; j++) {
        acc += x[src[orow * p.side + j] * p.cols + c] * inv;
    }
    o[t] = acc;
}
