// Shared helpers, prepended to every shader module: weight decoding (bit-exact with core/src/tensor.rs
// and core/src/fp8.rs), E4M3 encoding (clamp, round to nearest even, like fp8::encode), BF16 rounding.

// Element `e` of a packed weight: DT 0 = F32, 1 = BF16 (2 per u32), 2 = F16 (2 per u32), 3 = E4M3 (4 per u32).
fn is_nan_bits(b: u32) -> bool {
    return (b & 0x7fffffffu) > 0x7f800000u;
}

fn fp8_decode(code: u32) -> f32 {
    let sign = select(1.0, -1.0, (code & 0x80u) != 0u);
    let ex = (code >> 3u) & 0x0fu;
    let man = code & 0x07u;
    if (ex == 0x0fu && man == 0x07u) {
        return bitcast<f32>(0x7fc00000u);
    }
    if (ex == 0u) {
        return sign * f32(man) * (1.0 / 512.0);
    }
    return sign * (1.0 + f32(man) / 8.0) * bitcast<f32>((ex - 7u + 127u) << 23u);
}

fn fp8_encode(x: f32) -> u32 {
    let bits = bitcast<u32>(x);
    if (is_nan_bits(bits)) {
        return 0x7fu;
    }
    let sign = select(0u, 0x80u, (bits & 0x80000000u) != 0u);
    let a = min(abs(x), 448.0);
    if (a < 1.0 / 64.0) {
        return sign | u32(round(a * 512.0));
    }
    var e = i32(bitcast<u32>(a) >> 23u) - 127;
    let mant = a / bitcast<f32>(u32(e + 127) << 23u);
    var q = i32(round((mant - 1.0) * 8.0));
    if (q == 8) {
        q = 0;
        e = e + 1;
    }
    return sign | (u32(e + 7) << 3u) | u32(q);
}

fn fp8_round(x: f32) -> f32 {
    return fp8_decode(fp8_encode(x));
}

fn bf16_round(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    if (is_nan_bits(b)) {
        return bitcast<f32>(b | 0x00400000u);
    }
    let r = b + 0x7fffu + ((b >> 16u) & 1u);
    return bitcast<f32>(r & 0xffff0000u);
}

fn tanh_safe(x: f32) -> f32 {
    return tanh(clamp(x, -15.0, 15.0));
}

fn gelu_tanh(x: f32) -> f32 {
    return 0.5 * x * (1.0 + tanh_safe(0.7978846 * (x + 0.044715 * x * x * x)));
}

// Linear index of a thread in a 2-D grid of 1-D workgroups of size `wg`.
fn flat_id(gid: vec3<u32>, nwg: vec3<u32>, wg: u32) -> u32 {
    return gid.x + gid.y * nwg.x * wg;
}
