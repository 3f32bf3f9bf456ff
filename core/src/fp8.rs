//! The FP8 E4M3 codec ("e4m3fn": no infinities, 0x7F/0xFF are NaN, largest finite 448, subnormals down to
//! 2^-9). One definition, used by every loader, kernel and quantizer.

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// Decode one E4M3 code.
pub fn decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((code >> 3) & 0x0F) as i32;
    let man = (code & 0x07) as f32;
    if exp == 0x0F && code & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man * (1.0 / 512.0) // man/8 * 2^-6
    } else {
        sign * (1.0 + man / 8.0) * f32::from_bits(((exp - 7 + 127) as u32) << 23)
    }
}

/// Encode an f32 as E4M3 the way CUDA's `satfinite` conversion does: clamp to +-448, then round to nearest,
/// ties to even. NaN becomes 0x7F (never an overflow to NaN).
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    if a < 1.0 / 64.0 {
        // Subnormal range: steps of 2^-9. A result of 8 is the smallest normal, code 0x08.
        let m = (a * 512.0).round_ties_even() as u8;
        return sign | m;
    }
    let e = ((a.to_bits() >> 23) as i32) - 127; // floor(log2 a), exact for normal f32
    let mant = a / f32::from_bits(((e + 127) as u32) << 23); // in [1, 2), exact
    let mut q = ((mant - 1.0) * 8.0).round_ties_even() as i32;
    let mut e = e;
    if q == 8 {
        q = 0;
        e += 1;
    }
    sign | (((e + 7) as u8) << 3) | q as u8
}

/// Round an f32 to the nearest E4M3 value (saturating), returned as f32.
pub fn round(x: f32) -> f32 {
    decode(encode(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_all_codes() {
        assert_eq!(decode(0x00), 0.0);
        assert!(decode(0x80) == 0.0 && decode(0x80).is_sign_negative());
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert_eq!(decode(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(decode(0x08), 2f32.powi(-6));
        assert_eq!(decode(0x38), 1.0);
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0xFE), -448.0);
        assert!(decode(0x7F).is_nan() && decode(0xFF).is_nan());
        let finite: Vec<f32> = (0u8..=0x7E).map(decode).collect();
        assert!(
            finite.windows(2).all(|w| w[0] < w[1]),
            "positive codes are increasing"
        );
        for c in 0u8..=0x7E {
            assert_eq!(decode(c | 0x80), -decode(c));
            assert!(decode(c).is_finite());
        }
    }

    #[test]
    fn encode_inverts_decode_on_every_code() {
        for c in 0u16..256 {
            let c = c as u8;
            if c & 0x7F == 0x7F {
                continue;
            }
            assert_eq!(encode(decode(c)), c, "code {c:#04x}");
        }
    }

    /// Against a brute-force nearest search over all finite codes, ties to the even code, at every
    /// midpoint, just above and just below it.
    #[test]
    fn encode_rounds_to_nearest_even_at_every_boundary() {
        let pos: Vec<(u8, f32)> = (0u8..=0x7E).map(|c| (c, decode(c))).collect();
        let brute = |x: f32| -> u8 {
            let a = x.abs().min(448.0);
            let mut best = pos[0];
            for &(c, v) in &pos {
                let (d, bd) = ((v - a).abs(), (best.1 - a).abs());
                if d < bd || (d == bd && c % 2 == 0) {
                    best = (c, v);
                }
            }
            best.0 | if x.is_sign_negative() { 0x80 } else { 0 }
        };
        for w in pos.windows(2) {
            let mid = (w[0].1 + w[1].1) / 2.0; // exact in f32
            for x in [
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits() - 1),
                -mid,
            ] {
                assert_eq!(encode(x), brute(x), "x = {x:e}");
            }
            let even = if w[0].0 % 2 == 0 { w[0].0 } else { w[1].0 };
            assert_eq!(encode(mid), even, "tie at {mid:e} goes to the even code");
        }
    }

    #[test]
    fn encode_saturates_and_never_makes_nan_from_numbers() {
        assert_eq!(encode(448.0), 0x7E);
        assert_eq!(encode(460.0), 0x7E);
        assert_eq!(encode(1e30), 0x7E);
        assert_eq!(encode(f32::INFINITY), 0x7E);
        assert_eq!(encode(f32::NEG_INFINITY), 0xFE);
        assert_eq!(encode(f32::NAN), 0x7F);
        assert_eq!(encode(2f32.powi(-11)), 0x00); // below half the smallest subnormal
        assert_eq!(encode(3.0 * 2f32.powi(-11)), 0x01); // 0.75 of a subnormal step rounds up
        assert_eq!(encode(-0.0), 0x80);
        assert_eq!(round(0.3), 0.3125);
    }
}
