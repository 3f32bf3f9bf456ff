//! Image preprocessing for Gemma 3 (gemma-architecture.md 3.6), equal to the image processor
//! `AutoImageProcessor` picks in transformers 5.23 with torchvision installed: `Gemma3ImageProcessor`, the
//! torchvision backend. It decodes to RGB (transparency composited onto white, as transformers'
//! `convert_to_rgb`), resizes the uint8 image to `size x size` with torchvision's antialiased bilinear filter on
//! uint8 (PIL's separable triangle filter with int16 fixed-point weights: horizontal pass, then vertical, each
//! rounded to uint8), then rescales and normalizes in f32 as `(x - 127.5) / 127.5` (mean = std = 0.5 fused with
//! 1/255). The PIL backend (`Gemma3ImageProcessorPil`, picked without torchvision) differs from it by one uint8
//! level on a few pixels (PIL keeps 22-bit weights).

use std::path::Path;

use ::image::DynamicImage;

use crate::error::{Error, Result};

/// An image as 8-bit RGB, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decode a PNG, JPEG or WebP file to RGB. Errors name the file.
pub fn load_rgb8(path: &Path) -> Result<Rgb8> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb8(&bytes).map_err(|e| Error::file(path, e))
}

/// Widest and tallest image decoded (larger ones are refused before their pixels are allocated).
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// Decode image bytes (PNG, JPEG or WebP, detected from their content) to RGB. The error says why and
/// which formats are supported.
pub fn decode_rgb8(bytes: &[u8]) -> std::result::Result<Rgb8, String> {
    decode(bytes).map_err(|e| format!("cannot read the image: {e} (supported: PNG, JPEG, WebP)"))
}

fn decode(bytes: &[u8]) -> std::result::Result<Rgb8, String> {
    let format = ::image::guess_format(bytes).map_err(|e| e.to_string())?;
    if !matches!(
        format,
        ::image::ImageFormat::Png | ::image::ImageFormat::Jpeg | ::image::ImageFormat::WebP
    ) {
        return Err(format!("unsupported image format {format:?}"));
    }
    let mut reader = ::image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = ::image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| e.to_string())?;
    if img.width() == 0 || img.height() == 0 {
        return Err("the image is empty".into());
    }
    Ok(to_rgb8(&img))
}

/// RGB as transformers' `convert_to_rgb` makes it: images with an alpha channel are composited onto opaque
/// white with PIL's integer `alpha_composite`; others convert channel by channel (grey replicated).
fn to_rgb8(img: &DynamicImage) -> Rgb8 {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        rgba.pixels()
            .flat_map(|p| {
                let a = p[3] as u32;
                [0, 1, 2].map(|c| composite_on_white(p[c] as u32, a))
            })
            .collect()
    } else {
        img.to_rgb8().into_raw()
    };
    Rgb8 {
        width,
        height,
        data,
    }
}

/// PIL `ImagingAlphaComposite` of `(v, a)` over opaque white (7-bit precision, divide by 255 by shifts).
fn composite_on_white(v: u32, a: u32) -> u8 {
    const PREC: u32 = 7;
    // With an opaque background, coef1 = a * 2^7 and coef2 = (255 - a) * 2^7 exactly.
    let tmp = v * (a << PREC) + 255 * ((255 - a) << PREC) + (0x80 << PREC);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PREC) as u8
}

/// Per output index: the first input index, and the int16 weights of the inputs from there.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
    precision: u32,
}

/// torchvision/ATen `_compute_indices_int16_weights_aa` for the bilinear (triangle) filter, antialiased.
fn taps(input: usize, output: usize) -> Taps {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut start = Vec::with_capacity(output);
    let mut float_w = Vec::with_capacity(output);
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        // C++ casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let mut w: Vec<f64> = (xmin..xmax)
            .map(|j| {
                let x = ((j as f64 - center + 0.5) * invscale).abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            })
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            w.iter_mut().for_each(|v| *v /= total);
        }
        start.push(xmin);
        float_w.push(w);
    }
    let w_max = float_w
        .iter()
        .flatten()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max);
    let mut precision = 0;
    while precision < 22 {
        if (0.5 + w_max * (1i64 << (precision + 1)) as f64) as i64 >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let weights = float_w
        .iter()
        .map(|w| {
            w.iter()
                .map(|&v| {
                    let s = v * (1i64 << precision) as f64;
                    if v < 0.0 {
                        (-0.5 + s) as i32
                    } else {
                        (0.5 + s) as i32
                    }
                })
                .collect()
        })
        .collect();
    Taps {
        start,
        weights,
        precision,
    }
}

/// `sum(pixel(start + j) * w[j])` in fixed point, rounded and clamped to uint8.
fn convolve(pixel: impl Fn(usize) -> u8, start: usize, w: &[i32], precision: u32) -> u8 {
    let mut acc: i32 = 1 << (precision - 1);
    for (j, &k) in w.iter().enumerate() {
        acc += pixel(start + j) as i32 * k;
    }
    (acc >> precision).clamp(0, 255) as u8
}

/// Resize RGB to `out_w x out_h` as torchvision's `resize(uint8, BILINEAR, antialias=True)` does on the CPU
/// (ATen's uint8 kernel): a horizontal pass to uint8, then a vertical pass; a pass whose size is unchanged
/// is skipped.
pub fn resize_bilinear_aa(img: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    let mut cur = img.clone();
    if out_w != cur.width {
        let t = taps(cur.width, out_w);
        let mut data = vec![0u8; cur.height * out_w * 3];
        for y in 0..cur.height {
            let row = &cur.data[y * cur.width * 3..(y + 1) * cur.width * 3];
            for x in 0..out_w {
                for c in 0..3 {
                    data[(y * out_w + x) * 3 + c] =
                        convolve(|j| row[j * 3 + c], t.start[x], &t.weights[x], t.precision);
                }
            }
        }
        cur = Rgb8 {
            width: out_w,
            height: cur.height,
            data,
        };
    }
    if out_h != cur.height {
        let t = taps(cur.height, out_h);
        let w = cur.width;
        let mut data = vec![0u8; out_h * w * 3];
        for y in 0..out_h {
            for i in 0..w * 3 {
                data[y * w * 3 + i] = convolve(
                    |j| cur.data[j * w * 3 + i],
                    t.start[y],
                    &t.weights[y],
                    t.precision,
                );
            }
        }
        cur = Rgb8 {
            width: w,
            height: out_h,
            data,
        };
    }
    cur
}

/// Gemma 3 pixel values of an RGB image: `[3, size, size]` (CHW) f32 in [-1, 1].
pub fn gemma3_pixels(img: &Rgb8, size: usize) -> Vec<f32> {
    let r = resize_bilinear_aa(img, size, size);
    let mut out = vec![0f32; 3 * size * size];
    for (i, px) in r.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * size * size + i] = (px[c] as f32 - 127.5) / 127.5;
        }
    }
    out
}

/// Load an image file and preprocess it for Gemma 3 (`size` = the vision tower's `image_size`, 896).
pub fn load_gemma3_pixels(path: &Path, size: usize) -> Result<Vec<f32>> {
    Ok(gemma3_pixels(&load_rgb8(path)?, size))
}

/// Decode image bytes and preprocess them for Gemma 3 (as [`load_gemma3_pixels`] does a file's).
pub fn gemma3_pixels_from_bytes(
    bytes: &[u8],
    size: usize,
) -> std::result::Result<Vec<f32>, String> {
    decode_rgb8(bytes).map(|img| gemma3_pixels(&img, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_matches_pil_endpoints() {
        assert_eq!(composite_on_white(10, 255), 10);
        assert_eq!(composite_on_white(10, 0), 255);
        // 0 at alpha 128 over 255: 255 * 127 / 255 = 127.
        assert_eq!(composite_on_white(0, 128), 127);
    }

    #[test]
    fn resize_keeps_constant_images_and_same_size() {
        let img = Rgb8 {
            width: 7,
            height: 5,
            data: vec![200; 7 * 5 * 3],
        };
        for (w, h) in [(3, 2), (16, 9), (7, 12)] {
            let r = resize_bilinear_aa(&img, w, h);
            assert_eq!((r.width, r.height), (w, h));
            assert!(r.data.iter().all(|&v| v == 200), "{w}x{h}");
        }
        assert_eq!(resize_bilinear_aa(&img, 7, 5), img);
    }

    #[test]
    fn images_wider_than_the_limit_are_refused() {
        let png = |w: u32| {
            let mut out = std::io::Cursor::new(Vec::new());
            ::image::GrayImage::new(w, 1)
                .write_to(&mut out, ::image::ImageFormat::Png)
                .unwrap();
            out.into_inner()
        };
        let ok = decode_rgb8(&png(MAX_IMAGE_SIDE)).unwrap();
        assert_eq!((ok.width, ok.height), (MAX_IMAGE_SIDE as usize, 1));
        let err = decode_rgb8(&png(MAX_IMAGE_SIDE + 1)).unwrap_err();
        assert!(err.contains("limit"), "{err}");
    }

    #[test]
    fn bad_bytes_are_an_error() {
        assert!(decode_rgb8(b"not an image").is_err());
        let err = load_rgb8(Path::new("/nonexistent/cat.png")).unwrap_err();
        assert!(err.to_string().contains("cat.png"), "{err}");
    }
}
