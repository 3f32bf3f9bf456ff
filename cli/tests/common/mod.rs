//! Helpers shared by the CLI tests: the repository root, running the binary, and checking a clear failure.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use e4m3_tests::{write_tiny, Tiny};
use serde_json::json;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Run the `e4m3` binary with `args`.
pub fn e4m3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_e4m3"))
        .args(args)
        .output()
        .expect("binary runs")
}

/// `e4m3 args` exits with status 1, without a panic, and its stderr names every string of `want`.
pub fn fails_with(args: &[&str], want: &[&str]) {
    let out = e4m3(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} should fail; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for w in want {
        assert!(err.contains(w), "{args:?}: expected `{w}` in: {err}");
    }
}

/// Special tokens of the Gemma-4-like tiny tokenizer, ids 4.. (the words follow).
pub const G4_SPECIALS: [&str; 12] = [
    "<|turn>",
    "<turn|>",
    "<|channel>",
    "<channel|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    "<|\"|>",
    "<|think|>",
    "<|tool>",
    "<tool|>",
];

/// The tiny model with a Gemma-4-like tokenizer (Gemma 4's markers as special tokens) and the real
/// Gemma 4 chat template (tests/fixtures/gemma4-chat).
pub fn tiny_gemma4_chat_model(dir: &Path) {
    let t = Tiny::default();
    write_tiny(dir, &t, 7);
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, tok) in ["<pad>", "<eos>", "<bos>", "<unk>"]
        .iter()
        .chain(G4_SPECIALS.iter())
        .enumerate()
    {
        vocab.insert(tok.to_string(), json!(i));
        if *tok != "<unk>" {
            added.push(
                json!({"id": i, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}),
            );
        }
    }
    for i in 4 + G4_SPECIALS.len()..t.vocab {
        vocab.insert(format!("w{i}"), json!(i));
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let template =
        std::fs::read_to_string(root().join("tests/fixtures/gemma4-chat/chat_template.jinja"))
            .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"add_bos_token": false, "bos_token": "<bos>", "eos_token": "<eos>", "chat_template": template})
            .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [0, 5], "do_sample": false}"#,
    )
    .unwrap();
}
