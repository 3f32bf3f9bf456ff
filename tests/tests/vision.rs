//! Images in, text out (Gemma 3): preprocessing against transformers' Gemma3ImageProcessor
//! (tests/fixtures/images, tools/make_image_fixtures.py).

use e4m3_core::image::load_gemma3_pixels;
use e4m3_tests::*;

const SIZE: usize = 896;

#[test]
fn preprocessing_matches_transformers() {
    let dir = fixture("images");
    let summary = read_json(&dir.join("pixels.json"));
    assert_eq!(summary["processor"], "Gemma3ImageProcessor");
    let stride = summary["stride"].as_u64().unwrap() as usize;
    let images = summary["images"].as_array().unwrap();
    assert_eq!(images.len(), 6);
    for img in images {
        let file = img["file"].as_str().unwrap();
        let px = load_gemma3_pixels(&dir.join(file), SIZE).unwrap();
        // PNG and WebP decode identically, so the resize is checked bit for bit (one uint8 level is 2/255
        // after normalization). JPEG decoders differ: the image crate's (zune-jpeg) IDCT differs from
        // libjpeg-turbo's (PIL) by a level on some pixels, and its 4:2:0 chroma upsampling by up to two.
        let (levels_tol, mean_tol) = if file.ends_with("_444.jpg") {
            (1.0, 1e-4)
        } else if file.ends_with(".jpg") {
            (2.0, 2e-3)
        } else {
            (0.0, 1e-6)
        };
        assert_eq!(px.len(), 3 * SIZE * SIZE, "{file}");
        let sub = img["subsample"].as_array().unwrap();
        let mut worst = 0f32;
        for c in 0..3 {
            let rows = sub[c].as_array().unwrap();
            for (ri, row) in rows.iter().enumerate() {
                for (ci, level) in row.as_array().unwrap().iter().enumerate() {
                    let want = level.as_f64().unwrap() as f32 / 127.5 - 1.0;
                    let got = px[c * SIZE * SIZE + ri * stride * SIZE + ci * stride];
                    worst = worst.max((got - want).abs());
                }
            }
            let mean: f64 = px[c * SIZE * SIZE..(c + 1) * SIZE * SIZE]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>()
                / (SIZE * SIZE) as f64;
            let want_mean = img["mean"][c].as_f64().unwrap();
            assert!(
                (mean - want_mean).abs() <= mean_tol,
                "{file} channel {c}: mean {mean} vs transformers {want_mean}"
            );
        }
        assert!(
            worst <= levels_tol * 2.0 / 255.0 + 1e-5,
            "{file}: max |diff| {worst} on the subsample ({} uint8 levels allowed)",
            levels_tol
        );
    }
}

#[test]
fn bad_image_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let err = load_gemma3_pixels(&bad, SIZE).unwrap_err().to_string();
    assert!(err.contains("broken.png"), "{err}");
    let gif = dir.path().join("anim.gif");
    std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    let err = load_gemma3_pixels(&gif, SIZE).unwrap_err().to_string();
    assert!(err.contains("anim.gif") && err.contains("Gif"), "{err}");
    let missing = dir.path().join("missing.jpg");
    let err = load_gemma3_pixels(&missing, SIZE).unwrap_err().to_string();
    assert!(err.contains("missing.jpg"), "{err}");
}
