//! The tiny Gemma 4 vision checkpoints (tests/fixtures/tiny-gemma4-vision: `bidir`, `e2b`, `unified`) on
//! the wgpu backend against the CPU reference and transformers: image features, image-prompt logits and
//! greedy tokens. Without a wgpu adapter this test fails (it never skips; CI installs
//! lavapipe).

use e4m3_core::backend::{Backend, Batch, CacheConfig, LogitsFor};
use e4m3_core::conformance::{nmse, NMSE_ATTENTION, NMSE_MATMUL};
use e4m3_core::cpu::CpuBackend;
use e4m3_core::generate::{generate_with_inputs, GenerateRequest};
use e4m3_core::image::{gemma4_merged_pixels, gemma4_pixels, load_rgb8, Gemma4Pixels};
use e4m3_core::model::{Gemma4Options, Model};
use e4m3_core::sampling::SamplingParams;
use e4m3_core::tensor::Mat;
use e4m3_core::vision::ImageModel;
use e4m3_tests::*;

/// max |a - b| relative to the range (max - min) of `want`.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let (lo, hi) = want
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    max_abs_diff(got, want) / (hi - lo)
}

#[test]
fn wgpu_runs_gemma4_images_like_the_cpu() {
    let backend = e4m3_tests::wgpu_backend(None);
    for variant in ["bidir", "e2b", "unified"] {
        let dir = fixture("tiny-gemma4-vision").join(variant);
        let reference = read_json(&dir.join("reference.json"));
        let model = Model::load(&dir).unwrap();
        let Some(image) = ImageModel::load(&dir, &model.config).unwrap() else {
            panic!("{variant}: the config has a vision_config");
        };
        let ImageModel::Gemma4(v) = &image else {
            panic!("{variant}: a Gemma 4 vision model");
        };
        let c = &v.config;
        // The processor's cut, as `ImageModel::prompt` does it (gemma4_vision.rs checks it against
        // transformers).
        let px: Vec<Gemma4Pixels> = reference["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|file| {
                let rgb = load_rgb8(&fixture("images").join(file.as_str().unwrap())).unwrap();
                let cut = if c.unified {
                    gemma4_merged_pixels
                } else {
                    gemma4_pixels
                };
                cut(&rgb, c.patch_size, c.max_soft_tokens, c.pooling_kernel_size).unwrap()
            })
            .collect();
        let features = |b: &dyn Backend| {
            let mut r = v.runner(b, 2).unwrap();
            v.encode(r.as_mut(), &px, &[]).unwrap().0
        };
        let feats = features(backend.as_ref());
        let want = features(&CpuBackend);
        assert_eq!(
            (feats.rows, feats.cols),
            (want.rows, want.cols),
            "{variant}"
        );
        let n = nmse(&feats, &want);
        eprintln!("{variant}: wgpu vs CPU image features NMSE {n:.2e}");
        assert!(n < NMSE_MATMUL, "{variant}: image features NMSE {n}");
        let e = rel_err(&feats.data, &json_f32s(&reference["image_features"]));
        assert!(
            e < 1e-3,
            "{variant}: wgpu image features vs transformers: {e}"
        );

        let ids = json_u32s(&reference["input_ids"]);
        let logits = |b: &dyn Backend, m: &Model, f: &Mat| {
            let (ids, inputs) = image.prompt_inputs(ids.clone(), f, &m.config).unwrap();
            let mut r = b
                .load(&m.graph, &m.weights, CacheConfig::new(1, 256))
                .unwrap();
            r.step_with_inputs(&Batch::single(0, 0, ids, LogitsFor::All), &inputs, &[])
                .unwrap()
                .logits
        };
        let got = logits(backend.as_ref(), &model, &feats);
        let n = nmse(&got, &logits(&CpuBackend, &model, &want));
        eprintln!("{variant}: wgpu vs CPU image prompt logits NMSE {n:.2e}");
        assert!(n < NMSE_ATTENTION, "{variant}: logits NMSE {n}");
        let want_logits = json_f32s(&reference["logits"]);
        let e = rel_err(&got.data, &want_logits);
        eprintln!("{variant}: wgpu logits vs transformers max |diff| / range {e:.2e}");
        assert!(e < 1e-3, "{variant}: wgpu logits vs transformers: {e}");
        if variant != "e2b" {
            // The image mask (Windowed, and WholeGroup for unified) matters on wgpu too.
            let mut causal = Model::load(&dir).unwrap();
            causal
                .rebuild_gemma4_graph(&Gemma4Options {
                    image_mask: false,
                    ..Default::default()
                })
                .unwrap();
            let off = logits(backend.as_ref(), &causal, &feats);
            let e_off = rel_err(&off.data, &want_logits);
            assert!(
                e_off > 1e-2,
                "{variant}: the image mask must matter: {e_off}"
            );
        }

        let (ids, inputs) = image
            .prompt_inputs(ids.clone(), &feats, &model.config)
            .unwrap();
        let mut r = backend
            .load(&model.graph, &model.weights, CacheConfig::new(1, 256))
            .unwrap();
        let req = GenerateRequest {
            prompt_ids: ids,
            max_new_tokens: 8,
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            top_logits: 0,
        };
        let out = generate_with_inputs(r.as_mut(), 0, &req, Some(&inputs), |_| true).unwrap();
        assert_eq!(
            out.generated,
            json_u32s(&reference["greedy"]),
            "{variant}: wgpu greedy tokens"
        );
    }
}

/// Patches that are not a full grid of pooling blocks are an error naming the pooling node on wgpu, as on
/// the CPU (both check with `pool_cells`).
#[test]
fn wgpu_refuses_patches_that_do_not_pool() {
    use e4m3_core::backend::StepInputs;
    let backend = e4m3_tests::wgpu_backend(None);
    let dir = fixture("tiny-gemma4-vision").join("bidir");
    let model = Model::load(&dir).unwrap();
    let Some(ImageModel::Gemma4(v)) = ImageModel::load(&dir, &model.config).unwrap() else {
        panic!("a Gemma 4 vision model");
    };
    // One row of 9 patches: 3 pooled columns for 1 pooled row.
    let batch = Batch::single(0, 0, (0..9).collect(), LogitsFor::None);
    let inputs = StepInputs {
        embed_rows: (0..9).collect(),
        embeds: Mat::zeros(9, v.config.patch_dim()),
        groups: vec![],
    };
    for b in [backend.as_ref(), &CpuBackend as &dyn Backend] {
        let mut r = v.runner(b, 1).unwrap();
        let err = r
            .step_with_inputs(&batch, &inputs, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vision.pool") && err.contains("patch (3, 0) is outside a grid of 9"),
            "{}: {err}",
            b.name()
        );
    }
}
