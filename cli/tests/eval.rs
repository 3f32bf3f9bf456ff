//! `e4m3 eval` as a user runs it, on the real Gemma 3 270M against itself (small configs, CPU).

mod common;

use common::{e4m3, root};

use serde_json::Value;

fn real_model() -> String {
    let dir = root().join("models/gemma-3-270m");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the real model is not at {} — run `scripts/setup.sh` first",
        dir.display()
    );
    dir.display().to_string()
}

const TEXT: &str = "It was a bright cold day in April, and the clocks were striking thirteen. The old \
lighthouse keeper climbed the narrow stairs once more, counting each step as he had done for forty years, \
and at the top he wiped the salt from the great lens and looked out over the grey water.";

#[test]
fn eval_json_of_the_model_against_itself() {
    let m = real_model();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT).unwrap();
    let args = [
        "eval",
        "--model",
        &m,
        "--baseline",
        &m,
        "--text",
        text.to_str().unwrap(),
        "--configs",
        "1x12,2x8",
        "--backend",
        "cpu",
        "--max-rows",
        "6",
        "--json",
    ];
    let out = e4m3(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["pass"], true);
    assert_eq!(v["backend"], "cpu");
    assert_eq!(v["threshold"], 0.99);
    assert_eq!(v["bos"], 2);
    assert!(v["text_tokens"].as_u64().unwrap() >= 14);
    let configs = v["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 2);
    for (c, (name, preds)) in configs.iter().zip([("1x12", 11), ("2x8", 14)]) {
        assert_eq!(c["config"], name);
        assert_eq!(c["predictions"], preds);
        assert_eq!(c["pass"], true);
        for k in [
            "cos_logits_mean",
            "cos_logits_min",
            "cos_hidden_mean",
            "cos_hidden_min",
        ] {
            let x = c[k].as_f64().unwrap();
            assert!((x - 1.0).abs() < 1e-6, "{name} {k} = {x}");
        }
        let (pm, pb) = (
            c["ppl_model"].as_f64().unwrap(),
            c["ppl_baseline"].as_f64().unwrap(),
        );
        assert_eq!(pm, pb);
        assert!(pm > 1.0 && pm < 1000.0, "{name} perplexity {pm}");
        assert!(c["nonfinite_model"].is_null());
    }
}

#[test]
fn eval_errors_name_the_text_file_and_token_counts() {
    let m = real_model();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("short.txt");
    std::fs::write(&text, "Hello there, world.").unwrap();
    let t = text.to_str().unwrap();
    let out = e4m3(&[
        "eval",
        "--model",
        &m,
        "--baseline",
        &m,
        "--text",
        t,
        "--configs",
        "2x64",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(t) && err.contains("has 5 tokens") && err.contains("needs 126"),
        "{err}"
    );

    let missing = dir.path().join("nope.txt");
    let out = e4m3(&[
        "eval",
        "--model",
        &m,
        "--baseline",
        &m,
        "--text",
        missing.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("nope.txt") && err.contains("not found"),
        "{err}"
    );

    let out = e4m3(&[
        "eval",
        "--model",
        &m,
        "--baseline",
        &m,
        "--text",
        t,
        "--configs",
        "2x1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("2x1") && err.contains("BATCHxSEQ"), "{err}");
}
