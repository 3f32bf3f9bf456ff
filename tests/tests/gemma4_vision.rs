//! Gemma 4 images in, text out: preprocessing against transformers' Gemma4ImageProcessor
//! (tests/fixtures/images/gemma4_pixels.json) and a tiny random Gemma4ForConditionalGeneration with a vision
//! tower (tests/fixtures/tiny-gemma4-vision, tools/make_tiny_gemma4_vision.py).

use e4m3_core::image::{gemma4_target_size, load_gemma4_pixels, GEMMA4_SOFT_TOKENS};
use e4m3_tests::*;

#[test]
fn preprocessing_matches_transformers() {
    let dir = fixture("images");
    let summary = read_json(&dir.join("gemma4_pixels.json"));
    assert_eq!(summary["processor"], "Gemma4ImageProcessor");
    let stride = summary["stride"].as_u64().unwrap() as usize;
    let images = summary["images"].as_array().unwrap();
    assert_eq!(images.len(), 6);
    for img in images {
        let file = img["file"].as_str().unwrap();
        let (w, h) = (
            img["width"].as_u64().unwrap() as usize,
            img["height"].as_u64().unwrap() as usize,
        );
        for budget in GEMMA4_SOFT_TOKENS {
            let want = json_u32s(&img["sizes"][budget.to_string()]);
            let got = gemma4_target_size(h, w, 16, budget * 9, 3).unwrap();
            assert_eq!(
                [got.0 as u32, got.1 as u32],
                [want[0], want[1]],
                "{file} at {budget}"
            );
        }
        let px = load_gemma4_pixels(&dir.join(file), 16, 280, 3).unwrap();
        let resized = json_u32s(&img["resized"]);
        assert_eq!(
            [px.grid_h as u32 * 16, px.grid_w as u32 * 16],
            [resized[0], resized[1]],
            "{file}"
        );
        assert_eq!(
            px.num_patches() / 9,
            img["soft_tokens"].as_u64().unwrap() as usize
        );
        // Back from patches (y, x, c) to CHW.
        let (iw, ih) = (px.grid_w * 16, px.grid_h * 16);
        let at = |c: usize, y: usize, x: usize| {
            let patch = (y / 16) * px.grid_w + x / 16;
            px.patches[patch * 768 + ((y % 16) * 16 + x % 16) * 3 + c]
        };
        // Every format decodes as PIL does (JPEG with libjpeg-turbo's code), so the bicubic resize must be exact.
        let (levels_tol, mean_tol) = (0.0, 1e-6);
        let sub = img["subsample"].as_array().unwrap();
        let mut worst = 0f32;
        for c in 0..3 {
            for (ri, row) in sub[c].as_array().unwrap().iter().enumerate() {
                for (ci, level) in row.as_array().unwrap().iter().enumerate() {
                    let want = level.as_f64().unwrap() as f32 / 255.0;
                    worst = worst.max((at(c, ri * stride, ci * stride) - want).abs());
                }
            }
            let mut sum = 0f64;
            for y in 0..ih {
                for x in 0..iw {
                    sum += at(c, y, x) as f64;
                }
            }
            let mean = sum / (iw * ih) as f64;
            let want_mean = img["mean"][c].as_f64().unwrap();
            assert!(
                (mean - want_mean).abs() <= mean_tol,
                "{file} channel {c}: mean {mean} vs transformers {want_mean}"
            );
        }
        eprintln!("{file}: {iw}x{ih}, max |diff| on the subsample {worst:.2e}");
        assert!(
            worst <= levels_tol / 255.0 + 1e-6,
            "{file}: max |diff| {worst} ({levels_tol} uint8 levels allowed)"
        );
    }
}

#[test]
fn unsupported_or_broken_images_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.webp");
    std::fs::write(&bad, b"RIFF\x00\x00\x00\x00WEBPVP8 junk").unwrap();
    let err = load_gemma4_pixels(&bad, 16, 280, 3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.webp"), "{err}");
    let missing = dir.path().join("nope.png");
    let err = load_gemma4_pixels(&missing, 16, 280, 3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.png"), "{err}");
}

mod tiny {
    use e4m3_core::backend::{Batch, LogitsFor};
    use e4m3_core::cpu::CpuBackend;
    use e4m3_core::gemma4_vision::Gemma4Vision;
    use e4m3_core::generate::{generate_with_inputs, GenerateRequest};
    use e4m3_core::image::{gemma4_pixels, load_rgb8, Gemma4Pixels};
    use e4m3_core::model::{Gemma4Options, Model};
    use e4m3_core::sampling::SamplingParams;
    use e4m3_core::tensor::Mat;
    use e4m3_core::vision::ImageModel;
    use e4m3_tests::*;
    use serde_json::Value;

    struct Fixture {
        reference: Value,
        model: Model,
        vision: ImageModel,
    }

    fn load(variant: &str) -> Fixture {
        let dir = fixture("tiny-gemma4-vision").join(variant);
        let model = Model::load(&dir).unwrap();
        let vision = ImageModel::load(&dir, &model.config)
            .unwrap()
            .expect("the config has a vision_config");
        Fixture {
            reference: read_json(&dir.join("reference.json")),
            model,
            vision,
        }
    }

    fn tower(f: &Fixture) -> &Gemma4Vision {
        match &f.vision {
            ImageModel::Gemma4(v) => v,
            ImageModel::Gemma3(_) => panic!("a Gemma 4 checkpoint loads a Gemma 4 tower"),
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

    /// The processor's pixel values of the fixture's images (pixels.json), as our preprocessing gives them.
    fn pixels(f: &Fixture) -> Vec<Gemma4Pixels> {
        let px = read_json(&fixture("tiny-gemma4-vision").join("pixels.json"));
        let n = f.reference["images"].as_array().unwrap().len();
        let c = &tower(f).config;
        (0..n)
            .map(|i| {
                let img = &px["images"][i];
                let file = img["file"].as_str().unwrap();
                assert_eq!(f.reference["images"][i], file);
                let rgb = load_rgb8(&fixture("images").join(file)).unwrap();
                // processor_config.json: max_soft_tokens 70.
                assert_eq!(c.max_soft_tokens, 70);
                let ours =
                    gemma4_pixels(&rgb, c.patch_size, c.max_soft_tokens, c.pooling_kernel_size)
                        .unwrap();
                assert_eq!(
                    [ours.grid_h * 2, ours.grid_w * 2],
                    [
                        img["height"].as_u64().unwrap() as usize,
                        img["width"].as_u64().unwrap() as usize
                    ]
                );
                let want: Vec<f32> = json_f32s(&img["levels"])
                    .iter()
                    .map(|l| l / 255.0)
                    .collect();
                assert!(
                    max_abs_diff(&ours.patches, &want) < 1e-6,
                    "{file}: preprocessing at the tiny patch size"
                );
                ours
            })
            .collect()
    }

    fn features(f: &Fixture) -> Mat {
        let v = tower(f);
        let mut r = v.runner(&CpuBackend, 2).unwrap();
        v.encode(r.as_mut(), &pixels(f), &[]).unwrap().0
    }

    fn prompt_logits(f: &Fixture, model: &Model) -> Mat {
        let ids = json_u32s(&f.reference["input_ids"]);
        let (ids, inputs) = f
            .vision
            .prompt_inputs(ids, &features(f), &model.config)
            .unwrap();
        let mut runner = cpu_runner(model, 1, 256);
        runner
            .step_with_inputs(&Batch::single(0, 0, ids, LogitsFor::All), &inputs, &[])
            .unwrap()
            .logits
    }

    #[test]
    fn tower_and_embedder_match_transformers() {
        for variant in ["bidir", "e2b"] {
            let f = load(variant);
            let v = tower(&f);
            assert_eq!(
                v.config.use_clipped_linears && v.config.standardize,
                variant == "bidir"
            );
            let mut r = v.runner(&CpuBackend, 2).unwrap();
            let (feats, taps) = v
                .encode(r.as_mut(), &pixels(&f), &["vision_hidden".into()])
                .unwrap();
            let tokens: usize = json_u32s(&f.reference["soft_tokens"])
                .iter()
                .map(|&t| t as usize)
                .sum();
            assert_eq!((feats.rows, feats.cols), (tokens, 32));
            let e = rel_err(&feats.data, &json_f32s(&f.reference["image_features"]));
            eprintln!("{variant}: image features max |diff| / range {e:.2e}");
            assert!(e < 1e-3, "{variant} image features: {e}");
            let e = rel_err(
                &taps["vision_hidden"].data,
                &json_f32s(&f.reference["vision_hidden"]),
            );
            eprintln!("{variant}: tower output max |diff| / range {e:.2e}");
            assert!(e < 1e-3, "{variant} tower output: {e}");
        }
    }

    #[test]
    fn images_one_at_a_time_give_the_same_rows() {
        let f = load("bidir");
        let v = tower(&f);
        let px = pixels(&f);
        let mut r = v.runner(&CpuBackend, 2).unwrap();
        let both = v.encode(r.as_mut(), &px, &[]).unwrap().0;
        let second = v.encode(r.as_mut(), &px[1..], &[]).unwrap().0;
        let first_rows = px[0].num_patches() / 9;
        assert!(max_abs_diff(&second.data, &both.data[first_rows * 32..]) < 1e-5);
    }

    #[test]
    fn image_prompt_logits_match_and_need_the_image_mask() {
        let f = load("bidir");
        let want = json_f32s(&f.reference["logits"]);
        let got = prompt_logits(&f, &f.model);
        let e = rel_err(&got.data, &want);
        eprintln!("bidir logits: max |diff| / range {e:.2e}");
        assert!(e < 1e-3, "logits: {e}");
        // Without the image mask the logits are transformers' causal ones, not the reference.
        let mut causal = Model::load(&fixture("tiny-gemma4-vision").join("bidir")).unwrap();
        causal
            .rebuild_gemma4_graph(&Gemma4Options {
                image_mask: false,
                ..Default::default()
            })
            .unwrap();
        let off = prompt_logits(&f, &causal);
        let e_off = rel_err(&off.data, &want);
        eprintln!("bidir logits with the image mask off: max |diff| / range {e_off:.2e}");
        assert!(e_off > 1e-2, "turning the mask off must fail: {e_off}");
        let e_causal = rel_err(&off.data, &json_f32s(&f.reference["logits_causal"]));
        assert!(e_causal < 1e-3, "causal logits: {e_causal}");
    }

    #[test]
    fn e2b_image_prompt_logits_match() {
        // Causal (no use_bidirectional_attention), per-layer embeddings: image rows gather the pad row.
        let f = load("e2b");
        let want = json_f32s(&f.reference["logits"]);
        let got = prompt_logits(&f, &f.model);
        let e = rel_err(&got.data, &want);
        eprintln!("e2b logits: max |diff| / range {e:.2e}");
        assert!(e < 1e-3, "logits: {e}");
        // With the image token's own id left at the image rows, the per-layer table gathers its row instead
        // of the pad row, and the logits miss.
        let ids = json_u32s(&f.reference["input_ids"]);
        let (_, inputs) = f
            .vision
            .prompt_inputs(ids.clone(), &features(&f), &f.model.config)
            .unwrap();
        let mut runner = cpu_runner(&f.model, 1, 256);
        let unmapped = runner
            .step_with_inputs(&Batch::single(0, 0, ids, LogitsFor::All), &inputs, &[])
            .unwrap()
            .logits;
        let e_off = rel_err(&unmapped.data, &want);
        eprintln!("e2b logits with image ids for the per-layer embeddings: {e_off:.2e}");
        assert!(e_off > 1e-2, "the pad ids must matter: {e_off}");
    }

    #[test]
    fn greedy_generation_with_images_matches() {
        for variant in ["bidir", "e2b"] {
            let f = load(variant);
            let ids = json_u32s(&f.reference["input_ids"]);
            let (ids, inputs) = f
                .vision
                .prompt_inputs(ids, &features(&f), &f.model.config)
                .unwrap();
            let mut runner = cpu_runner(&f.model, 1, 256);
            let req = GenerateRequest {
                prompt_ids: ids,
                max_new_tokens: 8,
                sampling: SamplingParams::greedy(),
                stop_ids: vec![],
                top_logits: 0,
            };
            let out =
                generate_with_inputs(runner.as_mut(), 0, &req, Some(&inputs), |_| true).unwrap();
            assert_eq!(
                out.generated,
                json_u32s(&f.reference["greedy"]),
                "{variant}"
            );
        }
    }

    /// The one interface: images and text with markers in, the ids of the expanded prompt out.
    #[test]
    fn image_prompt_expands_markers_per_image() {
        let f = load("bidir");
        let images: Vec<_> = f.reference["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| load_rgb8(&fixture("images").join(n.as_str().unwrap())).unwrap())
            .collect();
        let mut seen = String::new();
        let mut tokenize = |t: &str| {
            seen = t.to_string();
            Ok(json_u32s(&f.reference["input_ids"]))
        };
        let mut runner = f.vision.runner(&CpuBackend).unwrap();
        let p = f
            .vision
            .prompt(
                runner.as_mut(),
                &f.model.config,
                &images,
                "a<|image|>b<|image|>c",
                &mut tokenize,
            )
            .unwrap();
        let n = json_u32s(&f.reference["soft_tokens"]);
        assert_eq!(p.tokens_per_image, vec![n[0] as usize, n[1] as usize]);
        let img = |k: u32| format!("<|image>{}<image|>", "<|image|>".repeat(k as usize));
        assert_eq!(seen, format!("a{}b{}c", img(n[0]), img(n[1])));
        assert_eq!(p.inputs.embed_rows.len(), (n[0] + n[1]) as usize);
        // Image rows embed as padding (id 0) before their features replace them.
        assert!(p.inputs.embed_rows.iter().all(|&r| p.ids[r] == 0));
        let err = f
            .vision
            .prompt(
                runner.as_mut(),
                &f.model.config,
                &images,
                "one <|image|> only",
                &mut |_| Ok(vec![]),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 <|image|> markers but 2 images"), "{err}");
    }
}

/// The Gemma 4 vision conformance cases run on the CPU reference (wgpu: tests/tests/conformance_wgpu.rs).
#[test]
fn gemma4_vision_conformance_cases_run_on_the_cpu() {
    use e4m3_core::conformance::run_suite;
    use e4m3_core::cpu::CpuBackend;
    let mut total = 0;
    for filter in [
        "pos_embed2d(",
        "rope2d(",
        "pool_positions(",
        "clamp(",
        "channel_scale(",
        "image_groups=Off",
        "image_groups=WholeGroup",
    ] {
        let report = run_suite(&CpuBackend, Some(filter));
        assert_eq!(report.failed() + report.unsupported(), 0, "{filter}");
        assert!(report.passed() > 0, "{filter}: no case");
        total += report.passed();
    }
    assert_eq!(total, 2 * 5 + 2);
}

/// Quantizing a Gemma 4 checkpoint with a vision tower (or the 12B's encoder-free embedder) keeps the image
/// parts as they are, names them in each format's exclusion list (so that every reader leaves them BF16), and
/// images still encode to the same features.
#[test]
fn fp8_quantized_checkpoints_keep_the_vision_tower_bf16() {
    use e4m3_core::cpu::CpuBackend;
    use e4m3_core::image::{gemma4_merged_pixels, gemma4_pixels, load_rgb8};
    use e4m3_core::model::Model;
    use e4m3_core::quantize::{quantize, CalibSource, QuantizeOptions, Scheme};
    use e4m3_core::vision::ImageModel;
    let features = |dir: &std::path::Path| {
        let m = Model::load(dir).unwrap();
        let Some(ImageModel::Gemma4(v)) = ImageModel::load(dir, &m.config).unwrap() else {
            panic!("a Gemma 4 vision model");
        };
        let rgb = load_rgb8(&fixture("images").join("grad_160x120.png")).unwrap();
        let cut = if v.config.unified {
            gemma4_merged_pixels
        } else {
            gemma4_pixels
        };
        let px = cut(&rgb, 2, 70, 3).unwrap();
        let mut r = v.runner(&CpuBackend, 1).unwrap();
        (m, v.encode(r.as_mut(), &[px], &[]).unwrap().0)
    };
    for (variant, modules) in [
        (
            "bidir",
            &[
                "model.vision_tower.encoder.layers.1.self_attn.q_proj.linear",
                "model.vision_tower.encoder.layers.0.mlp.down_proj.linear",
                "model.vision_tower.patch_embedder.input_proj",
                "model.embed_vision.embedding_projection",
            ][..],
        ),
        (
            "unified",
            &[
                "model.vision_embedder.patch_dense",
                "model.embed_vision.embedding_projection",
            ][..],
        ),
    ] {
        let src = fixture("tiny-gemma4-vision").join(variant);
        let (_, want) = features(&src);
        for scheme in [
            Scheme::Fp8Static,
            Scheme::Fp8Dynamic,
            Scheme::Fp8BlockWo,
            Scheme::Fp8Block,
        ] {
            let out = tempfile::tempdir().unwrap();
            // The default block, 128 (ModelOpt's fp8_pb_wo block is fixed: its config cannot say another).
            let mut o = QuantizeOptions::new(scheme);
            o.calib = CalibSource::Ids(vec![vec![2, 5, 9, 33, 17, 40, 4, 4, 12]]);
            quantize(&src, out.path(), &o).unwrap();
            let (m, got) = features(out.path());
            assert_eq!(got.data, want.data, "{variant} {scheme:?}: features");
            for module in modules {
                assert!(
                    m.quant.excluded_by(module).is_some(),
                    "{variant} {scheme:?}: {module} is not excluded by {:?}",
                    m.quant.exclusions()
                );
            }
            assert!(m
                .quant
                .excluded_by("model.language_model.layers.0.mlp.up_proj")
                .is_none());
        }
    }
}

/// The 12B encoder-free embedder (`Gemma4UnifiedForConditionalGeneration`, tests/fixtures/tiny-gemma4-vision/
/// unified): merged patches equal the processor's, features and logits match, the mask matters, greedy equal.
mod unified {
    use e4m3_core::backend::{Batch, LogitsFor};
    use e4m3_core::cpu::CpuBackend;
    use e4m3_core::generate::{generate_with_inputs, GenerateRequest};
    use e4m3_core::image::{gemma4_merged_pixels, load_rgb8};
    use e4m3_core::model::{Gemma4Options, Model};
    use e4m3_core::sampling::SamplingParams;
    use e4m3_core::vision::ImageModel;
    use e4m3_tests::*;

    fn rel_err(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let (lo, hi) = want
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        max_abs_diff(got, want) / (hi - lo)
    }

    #[test]
    fn unified_embedder_and_logits_match_transformers() {
        let dir = fixture("tiny-gemma4-vision").join("unified");
        let reference = read_json(&dir.join("reference.json"));
        let model = Model::load(&dir).unwrap();
        let g4 = model.config.gemma4.as_ref().unwrap();
        assert!(g4.bidirectional_vision && g4.hidden_size_per_layer_input == 0);
        let Some(ImageModel::Gemma4(v)) = ImageModel::load(&dir, &model.config).unwrap() else {
            panic!("a Gemma 4 vision model");
        };
        assert!(v.config.unified);
        // The merged patches are the 6x6 blocks of the tower models' resized image (pixels.json levels,
        // (y, x, c) per 2x2 patch), as the script checked against Gemma4UnifiedImageProcessor.
        let px = read_json(&fixture("tiny-gemma4-vision").join("pixels.json"));
        let mut images = Vec::new();
        for (i, file) in ["grad_160x120.png", "alpha_96x64.png"].iter().enumerate() {
            let m = gemma4_merged_pixels(
                &load_rgb8(&fixture("images").join(file)).unwrap(),
                2,
                v.config.max_soft_tokens,
                3,
            )
            .unwrap();
            let small = json_f32s(&px["images"][i]["levels"]);
            let (gw, n) = (m.grid_w * 3, m.num_patches());
            let mut worst = 0f32;
            for t in 0..n {
                let (mx, my) = (t % m.grid_w, t / m.grid_w);
                for y in 0..6 {
                    for x in 0..6 {
                        for c in 0..3 {
                            let (sx, sy) = (mx * 3 + x / 2, my * 3 + y / 2);
                            let want =
                                small[(sy * gw + sx) * 12 + ((y % 2) * 2 + x % 2) * 3 + c] / 255.0;
                            let got = m.patches[t * 108 + (y * 6 + x) * 3 + c];
                            worst = worst.max((got - want).abs());
                        }
                    }
                }
            }
            assert!(worst < 1e-6, "{file}: {worst}");
            assert_eq!(n as u64, reference["soft_tokens"][i].as_u64().unwrap());
            images.push(m);
        }
        let mut r = v.runner(&CpuBackend, 2).unwrap();
        let feats = v.encode(r.as_mut(), &images, &[]).unwrap().0;
        let e = rel_err(&feats.data, &json_f32s(&reference["image_features"]));
        eprintln!("unified: image features max |diff| / range {e:.2e}");
        assert!(e < 1e-3, "features: {e}");

        let image = ImageModel::Gemma4(v);
        let logits = |m: &Model| {
            let ids = json_u32s(&reference["input_ids"]);
            let (ids, inputs) = image.prompt_inputs(ids, &feats, &m.config).unwrap();
            let mut runner = cpu_runner(m, 1, 256);
            runner
                .step_with_inputs(&Batch::single(0, 0, ids, LogitsFor::All), &inputs, &[])
                .unwrap()
                .logits
        };
        let want = json_f32s(&reference["logits"]);
        let e = rel_err(&logits(&model).data, &want);
        eprintln!("unified logits: max |diff| / range {e:.2e}");
        assert!(e < 1e-3, "logits: {e}");
        let mut causal = Model::load(&dir).unwrap();
        causal
            .rebuild_gemma4_graph(&Gemma4Options {
                image_mask: false,
                ..Default::default()
            })
            .unwrap();
        let off = logits(&causal);
        let e_off = rel_err(&off.data, &want);
        eprintln!("unified logits with the image mask off: {e_off:.2e}");
        assert!(e_off > 1e-2, "the mask must matter: {e_off}");

        let ids = json_u32s(&reference["input_ids"]);
        let (ids, inputs) = image.prompt_inputs(ids, &feats, &model.config).unwrap();
        let mut runner = cpu_runner(&model, 1, 256);
        let req = GenerateRequest {
            prompt_ids: ids,
            max_new_tokens: 8,
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            top_logits: 0,
        };
        let out = generate_with_inputs(runner.as_mut(), 0, &req, Some(&inputs), |_| true).unwrap();
        assert_eq!(out.generated, json_u32s(&reference["greedy"]));
    }
}

/// Bad Gemma 4 vision configs and tensors are errors naming the field, file or tensor.
#[test]
fn bad_vision_configs_are_errors_naming_the_field_or_tensor() {
    use e4m3_core::model::Model;
    use e4m3_core::vision::ImageModel;
    let src = fixture("tiny-gemma4-vision").join("bidir");
    let model = Model::load(&src).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value), processor: Option<&str>| -> String {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            src.join("model.safetensors"),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        let mut cfg = read_json(&src.join("config.json"));
        edit(&mut cfg);
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        if let Some(p) = processor {
            std::fs::write(dir.path().join("processor_config.json"), p).unwrap();
        }
        match ImageModel::load(dir.path(), &model.config) {
            Ok(_) => panic!("must fail"),
            Err(e) => e.to_string(),
        }
    };
    let e = with(
        &|c| c["vision_config"]["num_key_value_heads"] = 2.into(),
        None,
    );
    assert!(e.contains("vision_config.num_key_value_heads"), "{e}");
    let e = with(&|c| c["vision_config"]["head_dim"] = 6.into(), None);
    assert!(e.contains("vision_config.head_dim"), "{e}");
    let e = with(&|c| c["vision_config"]["hidden_size"] = 48.into(), None);
    assert!(
        e.contains("tensor `model.") && e.contains("expected shape"),
        "{e}"
    );
    let e = with(
        &|c| c["vision_config"]["rope_parameters"]["rope_type"] = "default".into(),
        None,
    );
    assert!(e.contains("rope_type"), "{e}");
    let e = with(
        &|_| {},
        Some(r#"{"image_processor": {"max_soft_tokens": 100}}"#),
    );
    assert!(
        e.contains("processor_config.json") && e.contains("image_processor.max_soft_tokens"),
        "{e}"
    );
    let e = with(&|_| {}, Some("{ not json"));
    assert!(
        e.contains("processor_config.json") && e.contains("invalid JSON"),
        "{e}"
    );
    // No vision_config: a text-only model, not an error.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = read_json(&src.join("config.json"));
    cfg["vision_config"] = serde_json::Value::Null;
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    assert!(ImageModel::load(dir.path(), &model.config)
        .unwrap()
        .is_none());
}
