//! Element types and the host-side f32 matrix that activations travel in.

use crate::error::{Error, Result};

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// FP8 E4M3 (the "fn" variant: no infinities, 0x7F/0xFF are NaN, max 448).
    F8E4M3,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 => 1,
        }
    }
    /// The name safetensors uses in its header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
        }
    }
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F8_E4M3 => Some(DType::F8E4M3),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// Round an f32 to the nearest bf16 value (round-to-nearest-even), returned as f32.
pub fn round_to_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Round an f32 to the nearest f16 value, returned as f32.
pub fn round_to_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// A row-major f32 matrix: the form every activation takes between ops on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::invalid(format!(
                "matrix of {rows}x{cols} needs {} values, got {}",
                rows * cols,
                data.len()
            )));
        }
        Ok(Mat { rows, cols, data })
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Convert raw little-endian bytes of `dtype` to f32 values.
pub fn bytes_to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0; bytes.len() / dtype.size()];
    decode_into(dtype, bytes, &mut out);
    out
}

/// Decode little-endian values of `dtype` into `out` (as many as `out` holds).
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::F8E4M3 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = crate::fp8::decode(b);
            }
        }
    }
}

/// Decode one FP8 E4M3 (fn) code (the codec lives in `crate::fp8`).
pub fn f8e4m3_to_f32(code: u8) -> f32 {
    crate::fp8::decode(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_of_gemma_embed_scales() {
        // The scales the Gemma reference computes for BF16 checkpoints (gemma-architecture.md 3.1).
        assert_eq!(round_to_bf16((640f32).sqrt()), 25.25);
        assert_eq!(round_to_bf16((1152f32).sqrt()), 34.0);
        assert_eq!(round_to_bf16((2560f32).sqrt()), 50.5);
        assert_eq!(round_to_bf16((3840f32).sqrt()), 62.0);
        assert_eq!(round_to_bf16((5376f32).sqrt()), 73.5);
    }

    #[test]
    fn bytes_decode_each_dtype() {
        let v = [1.5f32, -2.25];
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(bytes_to_f32(DType::F32, &b), v);
        let b: Vec<u8> = v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        assert_eq!(bytes_to_f32(DType::BF16, &b), v);
        let b: Vec<u8> = v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        assert_eq!(bytes_to_f32(DType::F16, &b), v);
        assert_eq!(f8e4m3_to_f32(0x7E), 448.0);
        assert!(f8e4m3_to_f32(0x7F).is_nan());
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
    }
}
