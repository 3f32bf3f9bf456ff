//! Image preprocessing for Gemma 3 (gemma-architecture.md 3.6), equal to the image processor
//! `AutoImageProcessor` picks in transformers 5.23 with torchvision installed: `Gemma3ImageProcessor`, the
//! torchvision backend. It decodes to RGB (transparency composited onto white, as transformers'
//! `convert_to_rgb`), resizes the uint8 image to `size x size` with torchvision's antialiased bilinear filter on
//! uint8 (PIL's separable triangle filter with int16 fixed-point weights: horizontal pass, then vertical, each
//! rounded to uint8), then rescales and normalizes in f32 as `(x - 127.5) / 127.5` (mean = std = 0.5 fused with
//! 1/255). The PIL backend (`Gemma3ImageProcessorPil`, picked without torchvision) differs from it by one uint8
//! level on a few pixels (PIL keeps 22-bit weights).
//!
//! Gemma 4 (gemma-architecture.md 2.5): transformers 5.23's `Gemma4ImageProcessor` (torchvision backend)
//! resizes each image, aspect ratio kept, to the largest size whose sides are multiples of
//! `pooling_kernel_size * patch_size` within `max_soft_tokens * pooling_kernel_size^2` patches, with
//! torchvision's antialiased *bicubic* filter on uint8 (ATen's int16 fixed-point kernel, Keys a = -0.5),
//! rescales by 1/255 (no normalization: the tower maps to [-1, 1] itself) and cuts `patch x patch` patches,
//! each flattened as (y, x, channel), row-major over the patch grid.

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
    let mut limits = ::image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    if format == ::image::ImageFormat::Jpeg {
        return decode_jpeg(bytes, limits);
    }
    let mut reader = ::image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| e.to_string())?;
    if img.width() == 0 || img.height() == 0 {
        return Err("the image is empty".into());
    }
    Ok(to_rgb8(&img))
}

/// Decode a JPEG as PIL does: libjpeg-turbo's C code (vendored by the mozjpeg crate), with its defaults, the
/// ISLOW integer IDCT and "fancy" (triangular) chroma upsampling, so pixels equal transformers' processors'.
/// 8-bit greyscale, YCbCr and RGB JPEGs (baseline or progressive) are supported; CMYK/YCCK, 12-bit,
/// arithmetic-coded and truncated files are errors. `limits` bound the size as for the other formats.
fn decode_jpeg(bytes: &[u8], mut limits: ::image::Limits) -> std::result::Result<Rgb8, String> {
    use mozjpeg::ColorSpace;
    // libjpeg reports fatal errors by unwinding (the mozjpeg crate's error handler), caught here.
    let decoded = std::panic::catch_unwind(move || {
        let jpeg =
            mozjpeg::Decompress::new_reader(EndIsAnError(bytes)).map_err(|e| e.to_string())?;
        let (width, height) = jpeg.size();
        match jpeg.color_space() {
            ColorSpace::JCS_GRAYSCALE | ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB => {}
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
                return Err("CMYK JPEGs are not supported (convert it to RGB)".to_string());
            }
            other => return Err(format!("unsupported JPEG colour space {other:?}")),
        }
        if width == 0 || height == 0 {
            return Err("the image is empty".into());
        }
        let too_big = |e: ::image::ImageError| format!("{width}x{height} JPEG: {e}");
        limits
            .check_dimensions(width as u32, height as u32)
            .map_err(too_big)?;
        limits
            .reserve_usize(width.saturating_mul(height).saturating_mul(3))
            .map_err(too_big)?;
        let mut started = jpeg.rgb().map_err(|e| e.to_string())?;
        let data: Vec<u8> = started.read_scanlines().map_err(|e| e.to_string())?;
        started.finish().map_err(|e| e.to_string())?;
        Ok(Rgb8 {
            width,
            height,
            data,
        })
    });
    decoded.unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown error");
        // The reader below fails at the end of the data: libjpeg asked for more, the file is cut short.
        Err(if msg.ends_with("Input file read error") {
            "the JPEG data ends early (truncated file)".to_string()
        } else {
            msg.trim_start_matches("libjpeg fatal error: ").to_string()
        })
    })
}

/// The JPEG bytes as a reader that fails when read past their end: libjpeg would only warn and fill the rest
/// of a truncated image with grey, where PIL refuses it.
struct EndIsAnError<'a>(&'a [u8]);

impl std::io::Read for EndIsAnError<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.len().min(buf.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

impl std::io::BufRead for EndIsAnError<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.0.is_empty() {
            return Err(std::io::Error::other("the JPEG data ends early"));
        }
        Ok(self.0)
    }
    fn consume(&mut self, n: usize) {
        self.0 = &self.0[n..];
    }
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

/// The interpolation filters of torchvision's antialiased resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Bilinear: the triangle filter, support 1.
    Triangle,
    /// Bicubic: Keys' cubic convolution with a = -0.5 (ATen's antialiased `aa_filter`), support 2.
    Cubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Triangle => 1.0,
            Filter::Cubic => 2.0,
        }
    }
    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Triangle if x < 1.0 => 1.0 - x,
            Filter::Cubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }
}

/// torchvision/ATen `_compute_index_ranges_int16_weights` for `filter`, antialiased.
fn taps(input: usize, output: usize, filter: Filter) -> Taps {
    let scale = input as f64 / output as f64;
    let support = filter.support() * if scale >= 1.0 { scale } else { 1.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    // At most this many taps (ATen clamps a rounding overshoot by one).
    let max_taps = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(output);
    let mut float_w = Vec::with_capacity(output);
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        // C++ casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let xmax = xmax.max(xmin).min(xmin + max_taps);
        let mut w: Vec<f64> = (xmin..xmax)
            .map(|j| filter.weight((j as f64 - center + 0.5) * invscale))
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

/// Resize RGB to `out_w x out_h` as torchvision's `resize(uint8, BILINEAR, antialias=True)` does on the CPU.
pub fn resize_bilinear_aa(img: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    resize_aa(img, out_w, out_h, Filter::Triangle)
}

/// Resize RGB to `out_w x out_h` as torchvision's `resize(uint8, filter, antialias=True)` does on the CPU
/// (ATen's uint8 kernel): a horizontal pass to uint8 (clamped), then a vertical pass; a pass whose size is
/// unchanged is skipped.
pub fn resize_aa(img: &Rgb8, out_w: usize, out_h: usize, filter: Filter) -> Rgb8 {
    let mut cur = img.clone();
    if out_w != cur.width {
        let t = taps(cur.width, out_w, filter);
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
        let t = taps(cur.height, out_h, filter);
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

/// The soft-token budgets `Gemma4ImageProcessor` accepts (`max_soft_tokens`).
pub const GEMMA4_SOFT_TOKENS: [usize; 5] = [70, 140, 280, 560, 1120];

/// transformers' `get_aspect_ratio_preserving_size`: the `(height, width)` an image is resized to, the largest
/// with sides multiples of `kernel * patch` within `max_patches` patches of `patch x patch`.
pub fn gemma4_target_size(
    height: usize,
    width: usize,
    patch: usize,
    max_patches: usize,
    kernel: usize,
) -> std::result::Result<(usize, usize), String> {
    let total = (height * width) as f64;
    let target_px = (max_patches * patch * patch) as f64;
    let factor = (target_px / total).sqrt();
    let side = kernel * patch;
    let mut th = ((factor * height as f64) / side as f64).floor() as usize * side;
    let mut tw = ((factor * width as f64) / side as f64).floor() as usize * side;
    if th == 0 && tw == 0 {
        return Err(format!(
            "a {width}x{height} image resizes to 0x0 (sides must be multiples of {side})"
        ));
    }
    let max_side = (max_patches / (kernel * kernel)) * side;
    if th == 0 {
        th = side;
        tw = ((width / height) * side).min(max_side);
    } else if tw == 0 {
        tw = side;
        th = ((height / width) * side).min(max_side);
    }
    if th * tw > max_patches * patch * patch {
        return Err(format!(
            "a {width}x{height} image resizes to {tw}x{th}, more than {max_patches} patches of {patch}"
        ));
    }
    Ok((th, tw))
}

/// One image as the Gemma 4 vision tower takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma4Pixels {
    /// Patches of the patch grid, row-major (x fastest), each `patch * patch * 3` values in [0, 1] ordered
    /// (y, x, channel): transformers' `pixel_values` without its padding.
    pub patches: Vec<f32>,
    /// The patch grid: columns, rows.
    pub grid_w: usize,
    pub grid_h: usize,
}

impl Gemma4Pixels {
    pub fn num_patches(&self) -> usize {
        self.grid_w * self.grid_h
    }
}

/// Gemma 4 pixel values of an RGB image for `max_soft_tokens` (one of [`GEMMA4_SOFT_TOKENS`]): patches of
/// `patch` (the vision tower's input).
pub fn gemma4_pixels(
    img: &Rgb8,
    patch: usize,
    max_soft_tokens: usize,
    kernel: usize,
) -> std::result::Result<Gemma4Pixels, String> {
    Ok(patchify_hwc(
        &gemma4_resize(img, patch, max_soft_tokens, kernel)?,
        patch,
    ))
}

/// The Gemma 4 12B (encoder-free) pixel values: the same resized image cut into merged patches of
/// `kernel * patch` (transformers' `patches_merge` of `kernel x kernel` patches: each merged patch is its
/// block of the image flattened as (y, x, channel), row-major over the merged grid).
pub fn gemma4_merged_pixels(
    img: &Rgb8,
    patch: usize,
    max_soft_tokens: usize,
    kernel: usize,
) -> std::result::Result<Gemma4Pixels, String> {
    Ok(patchify_hwc(
        &gemma4_resize(img, patch, max_soft_tokens, kernel)?,
        patch * kernel,
    ))
}

/// `Gemma4ImageProcessor`'s resize (bicubic, antialiased, on uint8) to [`gemma4_target_size`]; an image of
/// that size already is left alone.
fn gemma4_resize(
    img: &Rgb8,
    patch: usize,
    max_soft_tokens: usize,
    kernel: usize,
) -> std::result::Result<Rgb8, String> {
    let (th, tw) = gemma4_target_size(
        img.height,
        img.width,
        patch,
        max_soft_tokens * kernel * kernel,
        kernel,
    )?;
    Ok(resize_aa(img, tw, th, Filter::Cubic))
}

/// Cut an image (sides multiples of `patch`) into `patch x patch` patches, rescaled by 1/255.
fn patchify_hwc(r: &Rgb8, patch: usize) -> Gemma4Pixels {
    let (tw, th) = (r.width, r.height);
    let (gw, gh) = (tw / patch, th / patch);
    let inv = 1.0f32 / 255.0;
    let mut patches = Vec::with_capacity(th * tw * 3);
    for py in 0..gh {
        for px in 0..gw {
            for y in 0..patch {
                let row = (py * patch + y) * tw + px * patch;
                patches.extend(
                    r.data[row * 3..(row + patch) * 3]
                        .iter()
                        .map(|&v| v as f32 * inv),
                );
            }
        }
    }
    Gemma4Pixels {
        patches,
        grid_w: gw,
        grid_h: gh,
    }
}

/// Load an image file and preprocess it for Gemma 4. Errors name the file.
pub fn load_gemma4_pixels(
    path: &Path,
    patch: usize,
    max_soft_tokens: usize,
    kernel: usize,
) -> Result<Gemma4Pixels> {
    gemma4_pixels(&load_rgb8(path)?, patch, max_soft_tokens, kernel)
        .map_err(|e| Error::file(path, e))
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
    fn cubic_resize_keeps_constant_images() {
        let img = Rgb8 {
            width: 9,
            height: 5,
            data: vec![77; 9 * 5 * 3],
        };
        for (w, h) in [(3, 2), (20, 11)] {
            let r = resize_aa(&img, w, h, Filter::Cubic);
            assert!(r.data.iter().all(|&v| v == 77), "{w}x{h}");
        }
    }

    #[test]
    fn gemma4_sizes_follow_transformers_edge_cases() {
        // 48 = kernel 3 * patch 16; a very wide image keeps one row of 48 and is capped in width.
        assert_eq!(
            gemma4_target_size(10, 4000, 16, 280 * 9, 3),
            Ok((48, 280 * 48))
        );
        assert_eq!(
            gemma4_target_size(4000, 10, 16, 280 * 9, 3),
            Ok((280 * 48, 48))
        );
        assert_eq!(gemma4_target_size(1, 1, 16, 70 * 9, 3), Ok((384, 384)));
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
    fn broken_jpegs_are_errors_not_panics() {
        // libjpeg's fatal errors unwind out of its C code and come back as errors.
        let cases: [(&[u8], &str); 3] = [
            (b"\xff\xd8\xff", "truncated"),
            (b"\xff\xd8\xff\xd9", "no image"),
            (b"\xff\xd8\xff\xc8\x00\x02\xff\xd9", "SOF type 0xc8"),
        ];
        for (bytes, says) in cases {
            let err = decode_rgb8(bytes).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn bad_bytes_are_an_error() {
        assert!(decode_rgb8(b"not an image").is_err());
        let err = load_rgb8(Path::new("/nonexistent/cat.png")).unwrap_err();
        assert!(err.to_string().contains("cat.png"), "{err}");
    }
}
