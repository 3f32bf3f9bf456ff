// Causal attention over the GPU KV cache (core/src/cpu/kernels.rs attention_grouped) and the cache write.
// Keys of positions before the step's start come from the ring buffer (row p % cap of the slot), the
// step's own keys from `k`/`v`, rounded like the cache stores them (round_kv). A row sees positions
// `[min(window start, spans[row].x), spans[row].y]` (core backend.rs attention_spans: its image group by the
// node's ImageGroups mode).
// encoder_attention is EncoderAttention (core/src/cpu/vision.rs encoder_attention) over one sequence.
struct P {
    n_heads: u32,
    n_kv_heads: u32,
    d: u32,
    q_cols: u32,
    kv_cols: u32,
    cap: u32,
    window: u32,     // 0: none
    has_softcap: u32,
    scale: f32,
    softcap: f32,
    round_mode: u32, // 0 exact, 1 bf16, 2 fp8
    k_scale: f32,
    v_scale: f32,
    slot_stride: u32,
    rows: u32,
    row0: u32, // encoder_attention: the sequence's first row in the step (`rows` its rows)
}
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> o: array<f32>;
@group(0) @binding(4) var<uniform> p: P;
@group(0) @binding(5) var<storage, read_write> kc: array<f32>;
@group(0) @binding(6) var<storage, read_write> vc: array<f32>;
// Per row: slot, start position of its sequence, tokens of the sequence in this step, first row of it.
@group(0) @binding(7) var<storage, read> info: array<vec4<u32>>;
// Per row: the first and last positions it sees besides the window.
@group(0) @binding(8) var<storage, read> spans: array<vec2<u32>>;

fn rnd(x: f32, s: f32) -> f32 {
    if (p.round_mode == 1u) { return bf16_round(x); }
    if (p.round_mode == 2u) { return fp8_round(x / s) * s; }
    return x;
}

var<workgroup> qs: array<f32, 512>;
var<workgroup> red_m: array<f32, 64>;
var<workgroup> red_l: array<f32, 64>;
var<workgroup> pt: array<f32, 64>;

const NEG: f32 = -3.0e38;

fn key_at(j: u32, c: u32, slot: u32, start: u32, row0: u32, kvo: u32) -> f32 {
    if (j >= start) {
        return rnd(k[(row0 + j - start) * p.kv_cols + kvo + c], p.k_scale);
    }
    return kc[slot * p.slot_stride + (j % p.cap) * p.kv_cols + kvo + c];
}

fn val_at(j: u32, c: u32, slot: u32, start: u32, row0: u32, kvo: u32) -> f32 {
    if (j >= start) {
        return rnd(v[(row0 + j - start) * p.kv_cols + kvo + c], p.v_scale);
    }
    return vc[slot * p.slot_stride + (j % p.cap) * p.kv_cols + kvo + c];
}

fn score(j: u32, slot: u32, start: u32, row0: u32, kvo: u32) -> f32 {
    var s = 0.0;
    if (j >= start) {
        let base = (row0 + j - start) * p.kv_cols + kvo;
        for (var c = 0u; c < p.d; c++) { s += qs[c] * rnd(k[base + c], p.k_scale); }
    } else {
        let base = slot * p.slot_stride + (j % p.cap) * p.kv_cols + kvo;
        for (var c = 0u; c < p.d; c++) { s += qs[c] * kc[base + c]; }
    }
    s = s * p.scale;
    if (p.has_softcap != 0u) { s = p.softcap * tanh_safe(s / p.softcap); }
    return s;
}

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x;
    let h = wid.y;
    let inf = info[r];
    let slot = inf.x;
    let start = inf.y;
    let hi = spans[r].y;
    let row0 = inf.w;
    let pos = start + (r - row0);
    var lo = 0u;
    if (p.window != 0u && pos + 1u > p.window) { lo = pos + 1u - p.window; }
    lo = min(lo, spans[r].x);
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let kvo = kvh * p.d;
    for (var c = lid; c < p.d; c += 64u) { qs[c] = q[r * p.q_cols + h * p.d + c]; }
    workgroupBarrier();
    // Pass 1: max and sum of exponentials (online, per thread, then combined).
    var m = NEG;
    var l = 0.0;
    for (var j = lo + lid; j <= hi; j += 64u) {
        let s = score(j, slot, start, row0, kvo);
        if (s > m) {
            l = l * exp(m - s) + 1.0;
            m = s;
        } else {
            l += exp(s - m);
        }
    }
    red_m[lid] = m;
    red_l[lid] = l;
    workgroupBarrier();
    for (var st = 32u; st > 0u; st >>= 1u) {
        if (lid < st) {
            let m1 = red_m[lid];
            let m2 = red_m[lid + st];
            let mm = max(m1, m2);
            red_l[lid] = red_l[lid] * exp(m1 - mm) + red_l[lid + st] * exp(m2 - mm);
            red_m[lid] = mm;
        }
        workgroupBarrier();
    }
    let gm = red_m[0];
    let gl = red_l[0];
    // Pass 2: weights of 64 keys at a time, accumulated in key order per output value.
    var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (var jt = lo; jt <= hi; jt += 64u) {
        let j = jt + lid;
        if (j <= hi) {
            pt[lid] = exp(score(j, slot, start, row0, kvo) - gm) / gl;
        }
        workgroupBarrier();
        let nj = min(64u, hi + 1u - jt);
        for (var ci = 0u; ci < 8u; ci++) {
            let c = lid + ci * 64u;
            if (c < p.d) {
                var a = acc[ci];
                for (var jj = 0u; jj < nj; jj++) {
                    a += pt[jj] * val_at(jt + jj, c, slot, start, row0, kvo);
                }
                acc[ci] = a;
            }
        }
        workgroupBarrier();
    }
    for (var ci = 0u; ci < 8u; ci++) {
        let c = lid + ci * 64u;
        if (c < p.d) { o[r * p.q_cols + h * p.d + c] = acc[ci]; }
    }
}

// Write the last `cap` of this step's keys and values of each sequence into its ring buffer.
@compute @workgroup_size(256)
fn kv_write(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_id(gid, nwg, 256u);
    if (t >= p.rows * p.kv_cols) { return; }
    let r = t / p.kv_cols;
    let c = t % p.kv_cols;
    let inf = info[r];
    let pos = inf.y + (r - inf.w);
    if (pos + p.cap < inf.y + inf.z) { return; }
    let dst = inf.x * p.slot_stride + (pos % p.cap) * p.kv_cols + c;
    kc[dst] = rnd(k[t], p.k_scale);
    vc[dst] = rnd(v[t], p.v_scale);
}

// EncoderAttention over the `rows` rows of one sequence from step row `row0`, every row seeing every row:
// a workgroup takes ER query rows of one head and reads each tile of 64 keys and values once for all of
// them (storage loads are the cost on lavapipe), with an online softmax (running max and sum per row,
// accumulators rescaled when the max grows). No cache, no rounding; `kv_cols` = `q_cols`.
const ER: u32 = 4u;
var<workgroup> eq: array<f32, 2048>; // ER x d queries
var<workgroup> ep: array<f32, 256>;  // ER x 64: the tile's scores, then their exponentials
var<workgroup> em: array<f32, 4>;    // per row: running max
var<workgroup> el: array<f32, 4>;    // per row: running sum of exponentials
var<workgroup> es: array<f32, 4>;    // per row: rescale of this tile

@compute @workgroup_size(64)
fn encoder_attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let n = p.rows;
    let qb = wid.x * ER;
    let d = p.d;
    let cols = p.q_cols;
    for (var i = lid; i < ER * d; i += 64u) {
        let rr = i / d;
        var x = 0.0;
        if (qb + rr < n) { x = q[(p.row0 + qb + rr) * cols + h * d + i % d]; }
        eq[i] = x;
    }
    if (lid < ER) {
        em[lid] = NEG;
        el[lid] = 0.0;
    }
    var acc: array<f32, 32>; // ER x 8 output values
    for (var i = 0u; i < 32u; i++) { acc[i] = 0.0; }
    workgroupBarrier();
    for (var jt = 0u; jt < n; jt += 64u) {
        let j = jt + lid;
        var s = array<f32, 4>(NEG, NEG, NEG, NEG);
        if (j < n) {
            s = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
            let kb = (p.row0 + j) * cols + h * d;
            for (var c = 0u; c < d; c++) {
                let kv = k[kb + c];
                for (var rr = 0u; rr < ER; rr++) { s[rr] += eq[rr * d + c] * kv; }
            }
            for (var rr = 0u; rr < ER; rr++) { s[rr] *= p.scale; }
        }
        for (var rr = 0u; rr < ER; rr++) { ep[rr * 64u + lid] = s[rr]; }
        workgroupBarrier();
        let nj = min(64u, n - jt);
        if (lid < ER) {
            var mt = em[lid];
            for (var jj = 0u; jj < nj; jj++) { mt = max(mt, ep[lid * 64u + jj]); }
            var sum = 0.0;
            for (var jj = 0u; jj < nj; jj++) {
                let e = exp(ep[lid * 64u + jj] - mt);
                ep[lid * 64u + jj] = e;
                sum += e;
            }
            es[lid] = exp(em[lid] - mt);
            el[lid] = el[lid] * es[lid] + sum;
            em[lid] = mt;
        }
        workgroupBarrier();
        for (var ci = 0u; ci < 8u; ci++) {
            let c = lid + ci * 64u;
            if (c < d) {
                for (var rr = 0u; rr < ER; rr++) { acc[rr * 8u + ci] *= es[rr]; }
                for (var jj = 0u; jj < nj; jj++) {
                    let vv = v[(p.row0 + jt + jj) * cols + h * d + c];
                    for (var rr = 0u; rr < ER; rr++) { acc[rr * 8u + ci] += ep[rr * 64u + jj] * vv; }
                }
            }
        }
        workgroupBarrier();
    }
    for (var ci = 0u; ci < 8u; ci++) {
        let c = lid + ci * 64u;
        for (var rr = 0u; rr < ER; rr++) {
            if (c < d && qb + rr < n) { o[(p.row0 + qb + rr) * cols + h * d + c] = acc[rr * 8u + ci] / el[rr]; }
        }
    }
}
