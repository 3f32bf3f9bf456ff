// Embed (gather rows of a packed table, times scale), SelectRows and PosEmbed2d.
override DT: u32 = 1u;
struct P {
    rows: u32,
    cols: u32,
    row0: u32,
    nrows: u32,
    scale: f32,
    size: u32, // pos_embed2d: positions per axis
    phase: u32, // pos_embed2d: 0 writes the x rows, 1 adds the y rows
}
@group(0) @binding(0) var<storage, read> table: array<u32>;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<uniform> p: P;

fn load_w(e: u32) -> f32 {
    if (DT == 0u) {
        return bitcast<f32>(table[e]);
    } else if (DT == 1u) {
        return bitcast<f32>(((table[e >> 1u] >> ((e & 1u) * 16u)) & 0xffffu) << 16u);
    } else if (DT == 2u) {
        return unpack2x16float(table[e >> 1u])[e & 1u];
    }
    return fp8_decode((table[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu);
}

@compute @workgroup_size(256)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_id(gid, nwg, 256u);
    if (t >= p.rows * p.cols) { return; }
    let r = t / p.cols;
    let c = t % p.cols;
    let id = ids[r];
    if (id >= p.row0 && id < p.row0 + p.nrows) {
        o[t] = load_w((id - p.row0) * p.cols + c) * p.scale;
    }
}

// `table` holds the f32 input (as bits), `ids` the rows to keep.
@compute @workgroup_size(256)
fn select_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_id(gid, nwg, 256u);
    if (t >= p.rows * p.cols) { return; }
    let r = t / p.cols;
    let c = t % p.cols;
    o[t] = bitcast<f32>(table[ids[r] * p.cols + c]);
}

// PosEmbed2d (core/src/cpu/vision.rs pos_embed2d): `table[x] + table[size + y]` for each id `x + size * y`,
// in two passes over the table's chunks (pass 0 writes the x row, pass 1 adds the y row, the CPU's order).
@compute @workgroup_size(256)
fn pos_embed2d(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_id(gid, nwg, 256u);
    if (t >= p.rows * p.cols) { return; }
    let r = t / p.cols;
    let c = t % p.cols;
    let id = ids[r];
    var e = id % p.size;
    if (p.phase == 1u) { e = p.size + id / p.size; }
    if (e >= p.row0 && e < p.row0 + p.nrows) {
        let w = load_w((e - p.row0) * p.cols + c);
        if (p.phase == 0u) { o[t] = w; } else { o[t] = o[t] + w; }
    }
}
