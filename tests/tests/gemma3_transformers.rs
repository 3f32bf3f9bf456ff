//! The CPU reference against transformers' own Gemma3ForCausalLM on a tiny random checkpoint
//! (tests/fixtures/tiny-gemma3, made by tools/make_tiny_gemma3.py): every logit at every position,
//! and greedy continuations.

use e4m3_core::backend::{Batch, LogitsFor};
use e4m3_core::model::Model;
use e4m3_core::sampling::argmax;
use e4m3_tests::*;
use serde_json::Value;

struct Case {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture("tiny-gemma3/logits.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            ids: json_u32s(&c["input_ids"]),
            logits: json_f32_matrix(&c["logits"]),
            greedy: json_u32s(&c["greedy_ids"]),
        })
        .collect()
}

fn check_model(model: &Model) {
    for (ci, case) in cases().iter().enumerate() {
        let got = all_logits(model, &case.ids);
        assert_eq!(got.rows, case.ids.len());
        let mut worst = 0f32;
        for (p, want) in case.logits.iter().enumerate() {
            let range = want.iter().cloned().fold(f32::MIN, f32::max)
                - want.iter().cloned().fold(f32::MAX, f32::min);
            let d = max_abs_diff(got.row(p), want);
            assert!(
                d <= 1e-4 * range.max(1.0),
                "case {ci} position {p}: max |dlogit| {d} (range {range})"
            );
            worst = worst.max(d);
        }
        eprintln!("case {ci}: max |dlogit| = {worst:e}");
        // Greedy continuation through the KV cache.
        let mut r = cpu_runner(model, 1, case.ids.len() + case.greedy.len());
        let out = r
            .step(&Batch::single(0, 0, case.ids.clone(), LogitsFor::Last), &[])
            .unwrap();
        let mut next = argmax(out.logits.row(0));
        let mut gen = vec![next];
        for i in 1..case.greedy.len() {
            let out = r
                .step(
                    &Batch::single(0, case.ids.len() + i - 1, vec![next], LogitsFor::Last),
                    &[],
                )
                .unwrap();
            next = argmax(out.logits.row(0));
            gen.push(next);
        }
        assert_eq!(gen, case.greedy, "case {ci} greedy tokens");
    }
}

#[test]
fn tiny_gemma3_matches_transformers_v5_config() {
    let model = Model::load(&fixture("tiny-gemma3")).unwrap();
    assert_eq!(model.config.layer_types.len(), 6);
    assert_eq!(model.config.rope_full.linear_factor, 8.0);
    check_model(&model);
}

#[test]
fn tiny_gemma3_matches_transformers_v4_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-gemma3/config.v4.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::copy(
        fixture("tiny-gemma3/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    check_model(&Model::load(dir.path()).unwrap());
}

/// Each architecture feature matters: turning it off moves the logits away from transformers'.
#[test]
fn dropping_a_feature_breaks_the_match() {
    let model = Model::load(&fixture("tiny-gemma3")).unwrap();
    let case = &cases()[0];
    let far = |m: &Model| {
        let got = all_logits(m, &case.ids);
        (0..case.ids.len())
            .map(|p| max_abs_diff(got.row(p), &case.logits[p]))
            .fold(0.0, f32::max)
    };
    assert!(far(&model) < 1e-3);
    type Edit = Box<dyn Fn(&mut e4m3_core::config::Gemma3Config)>;
    let variants: Vec<(&str, Edit)> = vec![
        (
            "no rope scaling",
            Box::new(|c| c.rope_full.linear_factor = 1.0),
        ),
        ("window off by one", Box::new(|c| c.sliding_window += 1)),
        (
            "attention scale 1/sqrt(head_dim)",
            Box::new(|c| c.query_pre_attn_scalar = c.head_dim as f32),
        ),
        (
            "local rope base",
            Box::new(|c| c.rope_sliding.theta = c.rope_full.theta),
        ),
    ];
    for (what, change) in variants {
        let mut cfg = model.config.clone();
        change(&mut cfg);
        let ck = e4m3_core::checkpoint::Checkpoint::open(&fixture("tiny-gemma3")).unwrap();
        let m = Model::from_tensors(&fixture("tiny-gemma3"), cfg, ck.tensors).unwrap();
        let d = far(&m);
        assert!(d > 1e-2, "{what}: logits still within {d} of transformers");
    }
}
