//! Images in, text out (Gemma 3): preprocessing against transformers' Gemma3ImageProcessor
//! (tests/fixtures/images, tools/make_image_fixtures.py).

use e4m3_core::image::{load_gemma3_pixels, load_rgb8};
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
        // Every format decodes as PIL does (JPEG with libjpeg-turbo's code, as PIL), so the resize is checked bit
        // for bit (one uint8 level is 2/255 after normalization).
        let (levels_tol, mean_tol) = (0.0, 1e-6);
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
        eprintln!(
            "{file}: max |diff| on the subsample {:.2} levels",
            worst * 127.5
        );
        assert!(
            worst <= levels_tol * 2.0 / 255.0 + 1e-5,
            "{file}: max |diff| {worst} on the subsample ({} uint8 levels allowed)",
            levels_tol
        );
    }
}

/// JPEG decoding equals PIL's (libjpeg-turbo), which transformers' processors use, value for value:
/// tests/fixtures/jpeg (4:2:0, 4:2:2, 4:4:4, progressive and grey, odd sizes), tools/make_jpeg_fixtures.py.
#[test]
fn jpeg_decodes_to_pil_pixels() {
    let dir = fixture("jpeg");
    let summary = read_json(&dir.join("decoded.json"));
    let images = summary["images"].as_array().unwrap();
    assert_eq!(images.len(), 5);
    for img in images {
        let file = img["file"].as_str().unwrap();
        let got = load_rgb8(&dir.join(file)).unwrap();
        let want = std::fs::read(dir.join(img["rgb"].as_str().unwrap())).unwrap();
        let size = [&img["width"], &img["height"]].map(|v| v.as_u64().unwrap() as usize);
        assert_eq!([got.width, got.height], size, "{file}");
        assert_eq!(got.data.len(), want.len(), "{file}");
        let differing = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "{file}: {differing} of {} values differ from PIL's",
            want.len()
        );
    }
}

#[test]
fn unsupported_or_broken_jpegs_are_errors_naming_the_file() {
    let dir = fixture("jpeg");
    let err = |path: &std::path::Path| load_rgb8(path).unwrap_err().to_string();
    let cmyk = err(&dir.join("cmyk_16x16.jpg"));
    assert!(
        cmyk.contains("cmyk_16x16.jpg") && cmyk.contains("CMYK"),
        "{cmyk}"
    );

    let good = std::fs::read(dir.join("yuv420_45x37.jpg")).unwrap();
    // The baseline frame header: FF C0, length (2 bytes), precision, height (2), width (2).
    let sof = good.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
    assert_eq!(good[sof + 4..sof + 9], [8, 0, 37, 0, 45]);
    let mut twelve_bit = good.clone();
    twelve_bit[sof + 4] = 12;
    // 60000x60000: past the decoder's memory limit (512 MiB).
    let mut huge = good.clone();
    huge[sof + 5..sof + 9].copy_from_slice(&[0xea, 0x60, 0xea, 0x60]);
    // The same frame as arithmetic-coded (SOF9): libjpeg's arithmetic decoder is not built in.
    let mut arithmetic = good.clone();
    arithmetic[sof + 1] = 0xc9;
    let tmp = tempfile::tempdir().unwrap();
    for (name, bytes, says) in [
        (
            "arithmetic.jpg",
            arithmetic,
            "arithmetic coding is not implemented",
        ),
        ("twelve_bit.jpg", twelve_bit, "precision 12"),
        ("huge.jpg", huge, "60000x60000"),
        (
            "truncated.jpg",
            good[..good.len() / 2].to_vec(),
            "truncated",
        ),
        ("header_only.jpg", good[..4].to_vec(), "truncated"),
        (
            "bad_marker.jpg",
            b"\xff\xd8\xff\xc0\x00\x02\x08\x00\x10\x00\x10\x01\x01\x11\x00\xff\xd9".to_vec(),
            "Bogus marker length",
        ),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = err(&path);
        assert!(e.contains(name) && e.contains(says), "{e}");
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

mod tiny {
    use e4m3_core::backend::{Batch, LogitsFor};
    use e4m3_core::cpu::CpuBackend;
    use e4m3_core::generate::{generate_with_inputs, GenerateRequest};
    use e4m3_core::image::{gemma3_pixels, load_rgb8};
    use e4m3_core::model::Model;
    use e4m3_core::sampling::SamplingParams;
    use e4m3_core::tensor::Mat;
    use e4m3_core::vision::{prompt_inputs, VisionModel};
    use e4m3_tests::*;
    use serde_json::Value;

    struct Fixture {
        reference: Value,
        model: Model,
        vision: VisionModel,
    }

    fn load() -> Fixture {
        let dir = fixture("tiny-gemma3-vision");
        let model = Model::load(&dir).unwrap();
        let vision = VisionModel::load(&dir, model.config.hidden_size)
            .unwrap()
            .expect("the config has a vision_config");
        Fixture {
            reference: read_json(&dir.join("reference.json")),
            model,
            vision,
        }
    }

    /// max |a - b| relative to the range (max - min) of `want`.
    fn rel_err(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let (lo, hi) = want
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        max_abs_diff(got, want) / (hi - lo)
    }

    fn pixels(f: &Fixture) -> Vec<Vec<f32>> {
        let all = json_f32s(&f.reference["pixel_values"]);
        all.chunks(3 * 32 * 32).map(|c| c.to_vec()).collect()
    }

    fn features(f: &Fixture) -> Mat {
        let mut r = f.vision.runner(&CpuBackend, 2).unwrap();
        f.vision.encode(r.as_mut(), &pixels(f), &[]).unwrap().0
    }

    fn prompt_logits(f: &Fixture, bidirectional: bool) -> Mat {
        let ids = json_u32s(&f.reference["input_ids"]);
        let inputs = prompt_inputs(&ids, 60, &features(f), bidirectional).unwrap();
        let mut runner = cpu_runner(&f.model, 1, 64);
        runner
            .step_with_inputs(&Batch::single(0, 0, ids, LogitsFor::All), &inputs, &[])
            .unwrap()
            .logits
    }

    #[test]
    fn preprocessing_at_the_tiny_image_size_matches() {
        let f = load();
        let px = pixels(&f);
        for (i, file) in ["grad_160x120.png", "alpha_96x64.png"].iter().enumerate() {
            let ours = gemma3_pixels(&load_rgb8(&fixture("images").join(file)).unwrap(), 32);
            assert!(max_abs_diff(&ours, &px[i]) < 1e-5, "{file}");
        }
    }

    #[test]
    fn tower_and_projector_match_transformers() {
        let f = load();
        let mut r = f.vision.runner(&CpuBackend, 2).unwrap();
        let (feats, taps) = f
            .vision
            .encode(r.as_mut(), &pixels(&f), &["vision_last_hidden".into()])
            .unwrap();
        assert_eq!((feats.rows, feats.cols), (8, 32));
        let e = rel_err(&feats.data, &json_f32s(&f.reference["image_features"]));
        eprintln!("image features: max |diff| / range {e:.2e}");
        assert!(e < 1e-3, "image features: {e}");
        let last = &taps["vision_last_hidden"];
        assert_eq!((last.rows, last.cols), (32, 16));
        let e = rel_err(&last.data, &json_f32s(&f.reference["vision_last_hidden"]));
        eprintln!("tower output: max |diff| / range {e:.2e}");
        assert!(e < 1e-3, "tower output: {e}");
        // One image at a time gives the same rows as both together.
        let one = f
            .vision
            .encode(r.as_mut(), &pixels(&f)[1..], &[])
            .unwrap()
            .0;
        assert!(max_abs_diff(&one.data, &feats.data[4 * 32..]) < 1e-5);
    }

    #[test]
    fn image_prompt_logits_match_and_need_the_bidirectional_mask() {
        let f = load();
        let want = json_f32s(&f.reference["logits"]);
        let got = prompt_logits(&f, true);
        let e = rel_err(&got.data, &want);
        eprintln!("logits: max |diff| / range {e:.2e}");
        assert!(e < 1e-3, "logits: {e}");
        // Without the image mask the logits are transformers' causal ones, not the reference.
        let causal = prompt_logits(&f, false);
        let e_off = rel_err(&causal.data, &want);
        eprintln!("logits with the image mask off: max |diff| / range {e_off:.2e}");
        assert!(
            e_off > 1e-2,
            "turning the mask off must fail the comparison: {e_off}"
        );
        let e_causal = rel_err(&causal.data, &json_f32s(&f.reference["logits_causal"]));
        assert!(e_causal < 1e-3, "causal logits: {e_causal}");
    }

    /// The tower, the projector and an image prompt on wgpu (lavapipe in CI) against the CPU reference:
    /// image features of both images in one step, the prompt's logits at every position with given rows
    /// and the bidirectional image groups (and, with the mask off, not the reference), greedy tokens.
    #[test]
    fn wgpu_runs_images_like_the_cpu() {
        use e4m3_core::backend::CacheConfig;
        use e4m3_core::conformance::{nmse, NMSE_ATTENTION, NMSE_MATMUL};
        let backend = e4m3_tests::wgpu_backend(None);
        let f = load();
        let mut vr = f.vision.runner(backend.as_ref(), 2).unwrap();
        let taps = ["vision_last_hidden".to_string()];
        let (feats, vt) = f.vision.encode(vr.as_mut(), &pixels(&f), &taps).unwrap();
        let mut cr = f.vision.runner(&CpuBackend, 2).unwrap();
        let (want, ct) = f.vision.encode(cr.as_mut(), &pixels(&f), &taps).unwrap();
        assert_eq!((feats.rows, feats.cols), (want.rows, want.cols));
        let n = nmse(&vt["vision_last_hidden"], &ct["vision_last_hidden"]);
        eprintln!("wgpu vs CPU tower output NMSE {n:.2e}");
        assert!(n < NMSE_MATMUL, "tower output NMSE {n}");
        let n = nmse(&feats, &want);
        eprintln!("wgpu vs CPU image features NMSE {n:.2e}");
        assert!(n < NMSE_MATMUL, "image features NMSE {n}");
        let e = rel_err(&feats.data, &json_f32s(&f.reference["image_features"]));
        assert!(e < 1e-3, "wgpu image features vs transformers: {e}");
        // Bad inputs are errors naming what is wrong: no rows given to the tower, rows of the wrong width.
        let patches = Batch::single(0, 0, (0..16).collect(), LogitsFor::None);
        let err = vr.step(&patches, &[]).unwrap_err().to_string();
        assert!(err.contains("`vision.patches`"), "{err}");
        let narrow = e4m3_core::backend::StepInputs {
            embed_rows: (0..16).collect(),
            embeds: Mat::zeros(16, 5),
            groups: vec![],
        };
        let err = vr
            .step_with_inputs(&patches, &narrow, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("embeddings of 5 columns"), "{err}");

        let ids = json_u32s(&f.reference["input_ids"]);
        let load_text = || {
            backend
                .load(&f.model.graph, &f.model.weights, CacheConfig::new(1, 64))
                .unwrap()
        };
        let logits = |bidirectional: bool| {
            let inputs = prompt_inputs(&ids, 60, &feats, bidirectional).unwrap();
            load_text()
                .step_with_inputs(
                    &Batch::single(0, 0, ids.clone(), LogitsFor::All),
                    &inputs,
                    &[],
                )
                .unwrap()
                .logits
        };
        let got = logits(true);
        let n = nmse(&got, &prompt_logits(&f, true));
        eprintln!("wgpu vs CPU image prompt logits NMSE {n:.2e}");
        assert!(n < NMSE_ATTENTION, "logits NMSE {n}");
        let e = rel_err(&got.data, &json_f32s(&f.reference["logits"]));
        assert!(e < 1e-3, "wgpu logits vs transformers: {e}");
        let causal = logits(false);
        let e_off = rel_err(&causal.data, &json_f32s(&f.reference["logits"]));
        assert!(e_off > 1e-2, "the image mask must matter on wgpu: {e_off}");

        let inputs = prompt_inputs(&ids, 60, &feats, true).unwrap();
        let req = GenerateRequest {
            prompt_ids: ids.clone(),
            max_new_tokens: 8,
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            top_logits: 0,
        };
        let mut r = load_text();
        let out = generate_with_inputs(r.as_mut(), 0, &req, Some(&inputs), |_| true).unwrap();
        assert_eq!(out.generated, json_u32s(&f.reference["greedy"]));
    }

    #[test]
    fn greedy_generation_with_images_matches() {
        let f = load();
        let ids = json_u32s(&f.reference["input_ids"]);
        let inputs = prompt_inputs(&ids, 60, &features(&f), true).unwrap();
        let mut runner = cpu_runner(&f.model, 1, 64);
        let req = GenerateRequest {
            prompt_ids: ids,
            max_new_tokens: 8,
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            top_logits: 0,
        };
        let out = generate_with_inputs(runner.as_mut(), 0, &req, Some(&inputs), |_| true).unwrap();
        assert_eq!(out.generated, json_u32s(&f.reference["greedy"]));
    }
}

/// The vision conformance cases run on the CPU reference (wgpu: tests/tests/conformance_wgpu.rs).
#[test]
fn vision_conformance_cases_run_on_the_cpu() {
    use e4m3_core::conformance::run_suite;
    use e4m3_core::cpu::CpuBackend;
    let mut total = 0;
    for filter in [
        "bias_add(",
        "gelu_tanh(cols",
        "layer_norm(",
        "encoder_attention(",
        "avg_pool2d(",
        "input(",
        "attention_image_groups(",
    ] {
        let report = run_suite(&CpuBackend, Some(filter));
        assert_eq!(report.failed() + report.unsupported(), 0, "{filter}");
        assert!(report.passed() > 0, "{filter}: no case");
        total += report.passed();
    }
    assert_eq!(total, 3 * 3 + 3 + 2 + 1 + 4);
}

/// `<start_of_image>` expanded as Gemma3Processor does, tokenized with the real Gemma 3 tokenizer: the same
/// ids as transformers (newlines merged into `\n\n\n` etc.), and the groups of its token_type_ids.
#[test]
fn image_prompts_tokenize_as_the_processor() {
    use e4m3_core::tensor::Mat;
    use e4m3_core::tokenizer::Tokenizer;
    use e4m3_core::vision::{expand_image_placeholders, prompt_inputs};
    let tok = Tokenizer::from_dir(&real_model_dir()).unwrap();
    let fx = read_json(&fixture("images").join("prompt_ids.json"));
    for case in fx["cases"].as_array().unwrap() {
        let (text, n) = expand_image_placeholders(case["text"].as_str().unwrap(), 256);
        assert_eq!(n, 2);
        let ids = tok.encode_prompt(&text).unwrap();
        assert_eq!(ids, json_u32s(&case["ids"]), "{}", case["text"]);
        let inputs = prompt_inputs(&ids, 262_144, &Mat::zeros(512, 1), true).unwrap();
        let types = json_u32s(&case["token_type_ids"]);
        let firsts: Vec<usize> = (0..ids.len())
            .filter(|&i| types[i] == 1 && (i == 0 || types[i - 1] == 0))
            .collect();
        assert_eq!(firsts.len(), 2);
        for (i, t) in types.iter().enumerate() {
            assert_eq!(inputs.groups[i].is_some(), *t == 1, "row {i}");
        }
        assert_ne!(inputs.groups[firsts[0]], inputs.groups[firsts[1]]);
    }
}

/// The real Gemma 3 chat template given image parts as `e4m3 serve` passes them (`{"type": "image"}` for
/// each `image_url` part) writes one `<start_of_image>` per image: the rendered prompt is the processor's
/// chat case of `prompt_ids.json`, so its ids are transformers' too.
#[test]
fn the_chat_template_places_image_parts_as_the_processor() {
    use e4m3_core::chat::{render_chat, ChatMessage, MessageContent};
    use e4m3_core::tokenizer::Tokenizer;
    use e4m3_core::vision::expand_image_placeholders;
    let tok = Tokenizer::from_dir(&real_model_dir()).unwrap();
    let fx = read_json(&fixture("images").join("prompt_ids.json"));
    let case = &fx["cases"][0];
    let parts = serde_json::json!([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Describe both."}]);
    let mut msg = ChatMessage::new("user", "");
    msg.content = Some(MessageContent::Parts(
        serde_json::from_value(parts).unwrap(),
    ));
    let text = render_chat(tok.chat_template().unwrap(), &[msg], "<bos>", "<eos>", true).unwrap();
    assert_eq!(text, format!("<bos>{}", case["text"].as_str().unwrap()));
    let (text, n) = expand_image_placeholders(&text, 256);
    assert_eq!(n, 2);
    assert_eq!(tok.encode(&text, false).unwrap(), json_u32s(&case["ids"]));
}
