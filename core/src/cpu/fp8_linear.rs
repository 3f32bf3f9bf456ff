//! CPU reference arithmetic of the FP8 linear schemes (../shared/reference/fp8-formats.md §2–§5, §10).
//!
//! Every scheme computes `y = x W^T` with W stored as F8E4M3 `[N, K]`, emulating what the GPU kernels do:
//! activations are quantized exactly as the real kernels quantize them (f32 arithmetic, clamp to ±448,
//! round to nearest even through [`crate::fp8::encode`]), products of E4M3 values are summed in f32 and the
//! scales are applied in f32 where the kernels apply them.
//!
//! | scheme | activation | accumulation and scales |
//! |---|---|---|
//! | A `Fp8Static` | `encode(x * (1/sx))` (vLLM `scaled_fp8_quant_kernel`: inverted scale) | `sx * (sw * acc)` |
//! | B `Fp8Dynamic` | `s_t = max(amax_t/448, 1/(448*512))`, `encode(x / s_t)` (vLLM dynamic per-token kernel) | `s_t * (sw[n] * acc)` |
//! | C `Fp8BlockWeightOnly` | none (W8A16) | `x · (decode(w) * S[o/bo, i/bi])^T` in f32 |
//! | D `Fp8Block` | per group of `block[1]`: `s = max(amax, 1e-10)/448`, `encode(x / s)` (vLLM `_per_token_group_quant_fp8`) | `acc += (acc_g * s[t,g]) * Sinv[n/bo, g]` per K-block |

use rayon::prelude::*;

use crate::checkpoint::Weight;
use crate::cpu::kernels::dot;
use crate::error::{Error, Result};
use crate::fp8::{decode, encode, E4M3_MAX};
use crate::graph::{QuantScheme, WeightMap};
use crate::tensor::{DType, Mat};

/// Lower bound of a dynamic per-token scale: vLLM `min_scaling_factor<c10::Float8_e4m3fn>` =
/// `1 / (448 * 512)` (csrc/quantization/utils.cuh), also the torch-native `_FP8_MIN_SCALING_FACTOR`.
pub const MIN_PER_TOKEN_SCALE: f32 = 1.0 / (E4M3_MAX * 512.0);

/// Lower bound of a group's absolute maximum before it is divided by 448: vLLM
/// `per_token_group_quant_fp8(..., eps=1e-10)`. On CUDA the executing kernel is
/// csrc/quantization/w8a8/fp8/per_token_group_quant.cu (`local_absmax = eps` seeds the max reduction,
/// `y_s = local_absmax / max_8bit`, `q = clamp(x / y_s)`: two IEEE divisions, as here); the Triton
/// fallback `_per_token_group_quant_fp8` has the same formula but Triton's fp32 `/` is `div.full.f32`
/// (<= 2 ulp), so it can differ from this reference by one code when x/s is within 2 ulp of a midpoint.
/// An all-zero group gets scale `1e-10/448` and codes 0, so it contributes exact zeros (HF/DeepSeek
/// `act_quant` has no epsilon and would give 0/0 = NaN there).
pub const GROUP_AMAX_EPS: f32 = 1e-10;

/// Scale of one token for scheme B: `max(amax/448, 1/(448*512))` (vLLM
/// `dynamic_per_token_scaled_fp8_quant_kernel`, `scale_ub` unset as for compressed-tensors).
pub fn per_token_scale(amax: f32) -> f32 {
    (amax / E4M3_MAX).max(MIN_PER_TOKEN_SCALE)
}

/// Scale of one token group for scheme D: `max(amax, 1e-10) / 448` (vLLM `_per_token_group_quant_fp8`).
pub fn per_group_scale(amax: f32) -> f32 {
    amax.max(GROUP_AMAX_EPS) / E4M3_MAX
}

fn amax(v: &[f32]) -> f32 {
    // Like CUDA fmaxf / torch amax over finite data; a NaN input does not become the maximum.
    v.iter().fold(0f32, |m, &x| m.max(x.abs()))
}

/// Scheme A activation quantization: `encode(x * (1/sx))`. vLLM's static kernel inverts the scale once
/// and multiplies ("Invert the scale so that we can use multiplications", csrc/quantization/fp8/common.cu).
pub fn quantize_static(x: &[f32], sx: f32) -> Vec<u8> {
    let inv = 1.0 / sx;
    x.iter().map(|&v| encode(v * inv)).collect()
}

/// Scheme B activation quantization of `x` (`[T, k]`, row-major): one scale per row,
/// [`per_token_scale`], and codes `encode(x / s)` (vLLM divides here: "we don't use inverted scales so we
/// can match FBGemm impl"). Returns (codes `[T, k]`, scales `[T]`).
pub fn quantize_per_token(x: &[f32], k: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(
        k > 0 && x.len().is_multiple_of(k),
        "{} values are not rows of {k}",
        x.len()
    );
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / k);
    for row in x.chunks_exact(k) {
        let s = per_token_scale(amax(row));
        codes.extend(row.iter().map(|&v| encode(v / s)));
        scales.push(s);
    }
    (codes, scales)
}

/// Scheme D activation quantization of `x` (`[T, k]`): one scale per row and per group of `group`
/// consecutive columns ([`per_group_scale`]); a last partial group (`k % group != 0`) uses the amax of
/// the columns it has (vLLM's native path zero-pads, which leaves the amax unchanged). Codes are
/// `encode(x / s)`. Returns (codes `[T, k]`, scales `[T, ceil(k/group)]`).
pub fn quantize_per_token_group(x: &[f32], k: usize, group: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(k > 0 && group > 0 && x.len().is_multiple_of(k));
    let groups = k.div_ceil(group);
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / k * groups);
    for row in x.chunks_exact(k) {
        for g in row.chunks(group) {
            let s = per_group_scale(amax(g));
            codes.extend(g.iter().map(|&v| encode(v / s)));
            scales.push(s);
        }
    }
    (codes, scales)
}

/// The 256 E4M3 values, by code.
pub fn decode_lut() -> [f32; 256] {
    let mut lut = [0f32; 256];
    for (c, v) in lut.iter_mut().enumerate() {
        *v = decode(c as u8);
    }
    lut
}

/// The scale tensors of one FP8 linear, decoded to f32 and checked against the weight's shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Fp8Scales {
    /// A: scalar weight and input scales.
    Static { sw: f32, sx: f32 },
    /// B: one weight scale per output row.
    Dynamic { sw: Vec<f32> },
    /// C: `s[ob * ib]` row-major, one per `block = [rows, cols]` block of the weight.
    BlockWeightOnly { s: Vec<f32>, block: [usize; 2] },
    /// D: `sinv[ob * ib]` row-major; activations grouped by `block[1]` columns.
    Block { sinv: Vec<f32>, block: [usize; 2] },
}

fn scale_tensor<'a>(weights: &'a WeightMap, name: &str, of: &str) -> Result<&'a Weight> {
    let s = weights
        .get(name)
        .ok_or_else(|| Error::tensor(name, format!("scale of FP8 weight `{of}` is not loaded")))?;
    if !matches!(s.dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::tensor(
            name,
            format!(
                "scale of FP8 weight `{of}` must be F32, BF16 or F16, found {}",
                s.dtype
            ),
        ));
    }
    if s.bytes().len() != s.numel() * s.dtype.size() {
        return Err(Error::tensor(
            name,
            format!("holds {} bytes for shape {:?}", s.bytes().len(), s.shape),
        ));
    }
    Ok(s)
}

fn finite_values(s: &Weight, positive: bool) -> Result<Vec<f32>> {
    let v = s.to_f32();
    if let Some((i, x)) = v
        .iter()
        .enumerate()
        .find(|(_, x)| !x.is_finite() || (positive && **x <= 0.0))
    {
        let want = if positive { "finite and > 0" } else { "finite" };
        return Err(Error::tensor(
            &s.name,
            format!("scale value {x} at index {i} is not {want}"),
        ));
    }
    Ok(v)
}

fn scalar_scale(weights: &WeightMap, name: &str, of: &str, positive: bool) -> Result<f32> {
    let s = scale_tensor(weights, name, of)?;
    if !(s.shape.is_empty() || s.shape == [1]) {
        return Err(Error::tensor(
            name,
            format!(
                "per-tensor scale of `{of}` must have shape [] or [1], found {:?}",
                s.shape
            ),
        ));
    }
    Ok(finite_values(s, positive)?[0])
}

/// Check a block scale tensor: shape `[ob, ib]` or (ModelOpt) `[ob, 1, ib, 1]` with `ob = ceil(n/bo)`,
/// `ib = ceil(k/bi)`.
fn block_scale(
    weights: &WeightMap,
    name: &str,
    of: &str,
    n: usize,
    k: usize,
    block: [usize; 2],
    allow_4d: bool,
) -> Result<Vec<f32>> {
    if block[0] == 0 || block[1] == 0 {
        return Err(Error::tensor(
            of,
            format!("block size {block:?} must be positive"),
        ));
    }
    let s = scale_tensor(weights, name, of)?;
    let (ob, ib) = (n.div_ceil(block[0]), k.div_ceil(block[1]));
    let ok = s.shape == [ob, ib] || (allow_4d && s.shape == [ob, 1, ib, 1]);
    if !ok {
        let want = if allow_4d {
            format!("[{ob}, {ib}] or [{ob}, 1, {ib}, 1]")
        } else {
            format!("[{ob}, {ib}]")
        };
        return Err(Error::tensor(
            name,
            format!(
                "block scale of `{of}` {:?} with block {block:?} must have shape {want}, found {:?}",
                [n, k],
                s.shape
            ),
        ));
    }
    finite_values(s, false)
}

/// Check an FP8 linear's weight and scale tensors (dtype, shape, values) and decode the scales.
/// Errors name the offending tensor.
pub fn prepare(w: &Weight, scheme: &QuantScheme, weights: &WeightMap) -> Result<Fp8Scales> {
    if w.dtype != DType::F8E4M3 {
        return Err(Error::tensor(
            &w.name,
            format!(
                "scheme {} needs an F8_E4M3 weight, found {}",
                scheme.name(),
                w.dtype
            ),
        ));
    }
    if w.shape.len() != 2 || w.bytes().len() != w.numel() {
        return Err(Error::tensor(
            &w.name,
            format!(
                "FP8 linear weight must be [out, in] with one byte per value, found shape {:?} and {} bytes",
                w.shape,
                w.bytes().len()
            ),
        ));
    }
    let (n, k) = (w.shape[0], w.shape[1]);
    let of = w.name.as_str();
    Ok(match scheme {
        QuantScheme::Dense => {
            return Err(Error::tensor(
                of,
                "an F8_E4M3 weight needs an FP8 quantization scheme",
            ))
        }
        QuantScheme::Fp8Static {
            weight_scale,
            input_scale,
        } => Fp8Scales::Static {
            sw: scalar_scale(weights, weight_scale, of, false)?,
            sx: scalar_scale(weights, input_scale, of, true)?,
        },
        QuantScheme::Fp8Dynamic { weight_scale } => {
            let s = scale_tensor(weights, weight_scale, of)?;
            if !(s.shape == [n, 1] || s.shape == [n]) {
                return Err(Error::tensor(
                    weight_scale,
                    format!(
                        "per-channel scale of `{of}` {:?} must have shape [{n}, 1], found {:?}",
                        w.shape, s.shape
                    ),
                ));
            }
            Fp8Scales::Dynamic {
                sw: finite_values(s, false)?,
            }
        }
        QuantScheme::Fp8BlockWeightOnly {
            weight_scale,
            block,
        } => Fp8Scales::BlockWeightOnly {
            s: block_scale(weights, weight_scale, of, n, k, *block, true)?,
            block: *block,
        },
        QuantScheme::Fp8Block {
            weight_scale_inv,
            block,
        } => Fp8Scales::Block {
            sinv: block_scale(weights, weight_scale_inv, of, n, k, *block, false)?,
            block: *block,
        },
    })
}

/// `y = x W^T` for an F8E4M3 weight `[N, K]` under an FP8 scheme, with the scale tensors from `weights`.
/// Errors (naming the tensor) when the scheme's scales are missing or misshaped, or x has the wrong width.
pub fn linear_fp8(x: &Mat, w: &Weight, scheme: &QuantScheme, weights: &WeightMap) -> Result<Mat> {
    let scales = prepare(w, scheme, weights)?;
    linear_fp8_prepared(x, w, &scales)
}

/// Rows of W per parallel task.
const CHUNK: usize = 16;

/// `linear_fp8` with already checked scales (see [`prepare`]).
pub fn linear_fp8_prepared(x: &Mat, w: &Weight, scales: &Fp8Scales) -> Result<Mat> {
    let (n, k) = (w.shape[0], w.shape[1]);
    if x.cols != k {
        return Err(Error::tensor(
            &w.name,
            format!(
                "FP8 linear input has {} columns, weight is {:?}",
                x.cols, w.shape
            ),
        ));
    }
    let t = x.rows;
    let lut = decode_lut();
    let codes = w.bytes();
    // Activations as the GPU sees them: E4M3 values (exact in f32) with their scales, or x itself (C).
    let (xa, xs): (Vec<f32>, Vec<f32>) = match scales {
        Fp8Scales::Static { sx, .. } => (
            quantize_static(&x.data, *sx)
                .iter()
                .map(|&c| lut[c as usize])
                .collect(),
            vec![],
        ),
        Fp8Scales::Dynamic { .. } => {
            let (c, s) = quantize_per_token(&x.data, k);
            (c.iter().map(|&c| lut[c as usize]).collect(), s)
        }
        Fp8Scales::Block { block, .. } => {
            let (c, s) = quantize_per_token_group(&x.data, k, block[1]);
            (c.iter().map(|&c| lut[c as usize]).collect(), s)
        }
        Fp8Scales::BlockWeightOnly { .. } => (x.data.clone(), vec![]),
    };
    let xrow = |ti: usize| &xa[ti * k..(ti + 1) * k];

    // Output transposed ([n, t]) so each task owns whole weight rows, decoded once; transposed back.
    let mut out_t = vec![0f32; n * t];
    out_t
        .par_chunks_mut(CHUNK * t.max(1))
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut row = vec![0f32; k];
            for (j, out_row) in chunk.chunks_mut(t.max(1)).enumerate() {
                let r = c * CHUNK + j;
                for (o, &b) in row.iter_mut().zip(&codes[r * k..(r + 1) * k]) {
                    *o = lut[b as usize];
                }
                match scales {
                    Fp8Scales::Static { sw, sx } => {
                        for (ti, o) in out_row.iter_mut().enumerate() {
                            // CUTLASS ScaledEpilogue: D = a_scale * (b_scale * acc).
                            *o = sx * (sw * dot(&row, xrow(ti)));
                        }
                    }
                    Fp8Scales::Dynamic { sw } => {
                        for (ti, o) in out_row.iter_mut().enumerate() {
                            *o = xs[ti] * (sw[r] * dot(&row, xrow(ti)));
                        }
                    }
                    Fp8Scales::BlockWeightOnly { s, block } => {
                        let ib = k.div_ceil(block[1]);
                        let srow = &s[(r / block[0]) * ib..(r / block[0] + 1) * ib];
                        for (g, wg) in row.chunks_mut(block[1]).enumerate() {
                            wg.iter_mut().for_each(|v| *v *= srow[g]);
                        }
                        for (ti, o) in out_row.iter_mut().enumerate() {
                            *o = dot(&row, xrow(ti));
                        }
                    }
                    Fp8Scales::Block { sinv, block } => {
                        let ib = k.div_ceil(block[1]);
                        let srow = &sinv[(r / block[0]) * ib..(r / block[0] + 1) * ib];
                        for (ti, o) in out_row.iter_mut().enumerate() {
                            let xr = xrow(ti);
                            let xsr = &xs[ti * ib..(ti + 1) * ib];
                            let mut acc = 0f32;
                            for (g, (wg, xg)) in
                                row.chunks(block[1]).zip(xr.chunks(block[1])).enumerate()
                            {
                                // Triton _w8a8_block_fp8_matmul: acc += dot * a_s[:, None] * b_s[None, :].
                                acc += dot(wg, xg) * xsr[g] * srow[g];
                            }
                            *o = acc;
                        }
                    }
                }
            }
        });
    if t == 1 {
        return Mat::from_vec(1, n, out_t);
    }
    let mut out = Mat::zeros(t, n);
    for r in 0..n {
        for ti in 0..t {
            out.data[ti * n + r] = out_t[r * t + ti];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tensors of any dtype, held in memory.
    pub(crate) fn weights(tensors: &[(&str, DType, Vec<usize>, Vec<u8>)]) -> WeightMap {
        tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    Weight::from_bytes(n, *d, s.clone(), b.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn f32b(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn per_token_scale_formula_and_floor() {
        assert_eq!(per_token_scale(448.0), 1.0);
        assert_eq!(per_token_scale(0.0), 1.0 / 229376.0);
        assert_eq!(per_token_scale(1e-9), MIN_PER_TOKEN_SCALE);
        assert_eq!(per_token_scale(3.5), 3.5 / 448.0);
        assert_eq!(per_group_scale(0.0), 1e-10f32 / 448.0);
        assert_eq!(per_group_scale(7.0), 7.0 / 448.0);
    }

    #[test]
    fn static_quantization_multiplies_by_the_reciprocal_and_saturates() {
        let x = [1.0, -2.0, 1000.0, -1e9, 0.0, 0.3];
        let c = quantize_static(&x, 0.5);
        assert_eq!(
            c,
            vec![
                encode(2.0),
                encode(-4.0),
                0x7E,
                0xFE,
                0x00,
                encode(0.3 * 2.0)
            ]
        );
        // 1/3 is not exact in f32: for this x (just below 3x an E4M3 midpoint) x * (1/3) rounds up to
        // code 0x2A while x / 3 rounds down to 0x29. vLLM's static kernel multiplies.
        let x = 0.890_624_94_f32;
        assert_eq!(encode(x / 3.0), 0x29);
        assert_eq!(quantize_static(&[x], 3.0), vec![0x2A]);
    }

    #[test]
    fn per_token_quantization_reaches_448_and_handles_zero_rows() {
        let x = [0.0, 0.0, 0.0, 1.0, -3.0, 0.5, 1e-7, 0.0, 0.0];
        let (c, s) = quantize_per_token(&x, 3);
        assert_eq!(
            s,
            vec![MIN_PER_TOKEN_SCALE, 3.0 / 448.0, MIN_PER_TOKEN_SCALE]
        );
        assert_eq!(&c[0..3], &[0, 0, 0]);
        assert_eq!(c[4], 0xFE, "the amax element maps to -448");
        assert_eq!(c[3], encode(1.0 / (3.0 / 448.0)));
        assert_eq!(c[6], encode(1e-7 / MIN_PER_TOKEN_SCALE));
        assert!(decode(c[6]) > 0.0);
    }

    #[test]
    fn per_group_quantization_partial_last_group_and_zero_group() {
        // k = 5, group = 2: groups [0,1], [2,3], [4].
        let x = [0.0, 0.0, 2.0, -1.0, 0.25, 8.0, 1.0, 0.0, 0.0, -0.5];
        let (c, s) = quantize_per_token_group(&x, 5, 2);
        assert_eq!(s.len(), 6);
        assert_eq!(
            s,
            vec![
                1e-10 / 448.0,
                2.0 / 448.0,
                0.25 / 448.0,
                8.0 / 448.0,
                1e-10 / 448.0,
                0.5 / 448.0
            ]
        );
        assert_eq!(&c[0..2], &[0, 0]);
        assert_eq!(c[2], 0x7E);
        assert_eq!(c[4], 0x7E);
        assert_eq!(c[9], 0xFE);
        assert!(c.iter().all(|&c| c & 0x7F != 0x7F), "never NaN");
    }

    /// A 2x3 weight under each scheme, computed by hand.
    #[test]
    fn linear_fp8_small_by_hand() {
        // W = [[1, 2, -0.5], [4, 0, 0.25]] (exact E4M3 values).
        let wv = [1.0f32, 2.0, -0.5, 4.0, 0.0, 0.25];
        let wc: Vec<u8> = wv.iter().map(|&v| encode(v)).collect();
        let m = weights(&[
            ("w", DType::F8E4M3, vec![2, 3], wc),
            ("sw", DType::F32, vec![], f32b(&[0.5])),
            ("sx", DType::F32, vec![1], f32b(&[2.0])),
            ("swc", DType::BF16, vec![2, 1], vec![0x80, 0x3F, 0x00, 0x40]), // [1, 2]
            ("sb", DType::F32, vec![1, 1, 2, 1], f32b(&[1.0, 10.0])),
            ("sinv", DType::F32, vec![1, 2], f32b(&[1.0, 10.0])),
        ]);
        let w = &m["w"];
        let x = Mat::from_vec(1, 3, vec![2.0, 4.0, 8.0]).unwrap();
        // A: x/2 = [1, 2, 4]; acc = [1+4-2, 4+0+1] = [3, 5]; times 2*0.5.
        let s = QuantScheme::Fp8Static {
            weight_scale: "sw".into(),
            input_scale: "sx".into(),
        };
        assert_eq!(linear_fp8(&x, w, &s, &m).unwrap().data, vec![3.0, 5.0]);
        // B: s_t = 8/448; x/s = [112, 224, 448]; acc = [112+448-224, 448+0+112] = [336, 560].
        let s = QuantScheme::Fp8Dynamic {
            weight_scale: "swc".into(),
        };
        let y = linear_fp8(&x, w, &s, &m).unwrap().data;
        let st = 8.0f32 / 448.0;
        assert_eq!(y, vec![st * 336.0, st * (2.0 * 560.0)]);
        // C with block [2, 2]: columns 0-1 scale 1, column 2 scale 10; x unquantized.
        let s = QuantScheme::Fp8BlockWeightOnly {
            weight_scale: "sb".into(),
            block: [2, 2],
        };
        let y = linear_fp8(&x, w, &s, &m).unwrap().data;
        assert_eq!(y, vec![2.0 + 8.0 - 40.0, 8.0 + 0.0 + 20.0]);
        // D with block [2, 2]: groups [2, 4] (s = 4/448) and [8] (s = 8/448).
        let s = QuantScheme::Fp8Block {
            weight_scale_inv: "sinv".into(),
            block: [2, 2],
        };
        let y = linear_fp8(&x, w, &s, &m).unwrap().data;
        let (s0, s1) = (4.0f32 / 448.0, 8.0f32 / 448.0);
        // group 0 codes [224, 448], group 1 codes [448].
        let r0 = (224.0 + 896.0) * s0 * 1.0 + (-224.0) * s1 * 10.0;
        let r1 = (896.0f32) * s0 * 1.0 + (112.0) * s1 * 10.0;
        assert_eq!(y, vec![r0, r1]);
    }

    #[test]
    fn bad_scales_are_errors_naming_the_tensor() {
        let m = weights(&[
            ("w", DType::F8E4M3, vec![2, 3], vec![0x38; 6]),
            ("wf", DType::F32, vec![2, 3], f32b(&[1.0; 6])),
            ("s2", DType::F32, vec![2], f32b(&[1.0, 1.0])),
            ("s0", DType::F32, vec![], f32b(&[0.0])),
            ("sn", DType::F32, vec![2, 1], f32b(&[1.0, f32::NAN])),
            ("s8", DType::F8E4M3, vec![], vec![0x38]),
            ("sb", DType::F32, vec![2, 2], f32b(&[1.0; 4])),
        ]);
        let err = |s: QuantScheme, w: &str| prepare(&m[w], &s, &m).unwrap_err().to_string();
        let st = |ws: &str, is: &str| QuantScheme::Fp8Static {
            weight_scale: ws.into(),
            input_scale: is.into(),
        };
        assert!(err(st("s2", "s0"), "w").contains("`s2`"));
        assert!(
            err(st("s0", "s0"), "w").contains("`s0`"),
            "zero input scale"
        );
        assert!(err(st("missing", "s0"), "w").contains("`missing`"));
        assert!(err(st("s8", "s0"), "w").contains("`s8`"));
        assert!(err(st("s0", "s0"), "wf").contains("`wf`"), "F32 weight");
        let e = err(
            QuantScheme::Fp8Dynamic {
                weight_scale: "sn".into(),
            },
            "w",
        );
        assert!(e.contains("`sn`") && e.contains("NaN"), "{e}");
        let e = err(
            QuantScheme::Fp8Dynamic {
                weight_scale: "sb".into(),
            },
            "w",
        );
        assert!(e.contains("`sb`") && e.contains("[2, 1]"), "{e}");
        // [2, 3] with block [2, 2] needs [1, 2].
        let e = err(
            QuantScheme::Fp8Block {
                weight_scale_inv: "sb".into(),
                block: [2, 2],
            },
            "w",
        );
        assert!(e.contains("`sb`") && e.contains("[1, 2]"), "{e}");
        let e = err(
            QuantScheme::Fp8BlockWeightOnly {
                weight_scale: "sb".into(),
                block: [2, 2],
            },
            "w",
        );
        assert!(e.contains("`sb`") && e.contains("[1, 1, 2, 1]"), "{e}");
        // Block [1, 3] fits sb = [2, 1]? No: sb is [2, 2]; block [1, 2] gives [2, 2] and is accepted.
        assert!(prepare(
            &m["w"],
            &QuantScheme::Fp8Block {
                weight_scale_inv: "sb".into(),
                block: [1, 2]
            },
            &m
        )
        .is_ok());
        // Wrong input width.
        let x = Mat::zeros(1, 4);
        let s = QuantScheme::Fp8Block {
            weight_scale_inv: "sb".into(),
            block: [1, 2],
        };
        assert!(linear_fp8(&x, &m["w"], &s, &m).is_err());
    }
}
