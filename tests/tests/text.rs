//! Text in and out against the `transformers` reference: tokenizer ids, decode, streaming decode
//! and chat template renders. Fixtures are written by `tools/make_text_fixtures.py`.
//!
//! The tokenizer files come from `$E4M3_TOKENIZER_DIR`, else `<repo>/models/gemma-3-270m`; when
//! neither has `tokenizer.json` these tests fail (run `scripts/setup.sh`).

use std::path::{Path, PathBuf};

use e4m3_core::chat::{render_chat, ChatMessage};
use e4m3_core::tokenizer::Tokenizer;
use e4m3_core::Error;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tokenizer_dir() -> PathBuf {
    let mut tried = Vec::new();
    if let Some(dir) = std::env::var_os("E4M3_TOKENIZER_DIR") {
        let dir = PathBuf::from(dir);
        if dir.join("tokenizer.json").is_file() {
            return dir;
        }
        tried.push(dir);
    }
    let dir = repo_root().join("models").join("gemma-3-270m");
    if dir.join("tokenizer.json").is_file() {
        return dir;
    }
    tried.push(dir);
    panic!(
        "no tokenizer.json found (tried {tried:?}): run `scripts/setup.sh` to fetch the Gemma 3 \
         tokenizer into models/gemma-3-270m, or set E4M3_TOKENIZER_DIR to a directory holding \
         tokenizer.json and tokenizer_config.json"
    );
}

/// Loaded once (tokenizer.json is ~33 MB) and shared by the tests.
fn tokenizer() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_dir(&tokenizer_dir()).expect("load tokenizer"))
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().expect("string")
}

fn cases(doc: &Value) -> &Vec<Value> {
    doc["cases"].as_array().expect("cases")
}

#[test]
fn tokenizer_metadata_matches_transformers() {
    let tok = tokenizer();
    let doc = fixture("tokenizer_cases.json");
    assert_eq!(tok.bos_token(), Some(s(&doc["bos_token"])));
    assert_eq!(tok.eos_token(), Some(s(&doc["eos_token"])));
    assert_eq!(
        tok.bos_id(),
        Some(doc["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.eos_id(),
        Some(doc["eos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.vocab_size(),
        doc["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(tok.token_to_id("<start_of_turn>"), Some(105));
    assert_eq!(tok.token_to_id("<end_of_turn>"), Some(106));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<bos>"));
    assert_eq!(tok.token_to_id("definitely not a token"), None);
    assert_eq!(tok.id_to_token(tok.vocab_size() as u32), None);
    assert!(tok.add_bos_token());
    assert!(tok.chat_template().unwrap().contains("raise_exception"));
}

#[test]
fn encode_matches_transformers() {
    let tok = tokenizer();
    let doc = fixture("tokenizer_cases.json");
    assert!(cases(&doc).len() >= 15);
    for c in cases(&doc) {
        let name = s(&c["name"]);
        let text = s(&c["text"]);
        let want = ids(&c["ids"]);
        let want_bos = ids(&c["ids_with_bos"]);
        assert_eq!(
            tok.encode(text, false).unwrap(),
            want,
            "case {name}: encode(add_bos=false)"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            want_bos,
            "case {name}: encode(add_bos=true)"
        );
        assert_eq!(
            tok.encode_prompt(text).unwrap(),
            want_bos,
            "case {name}: encode_prompt"
        );
        let tokens: Vec<String> = want.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        let want_tokens: Vec<&str> = c["tokens"].as_array().unwrap().iter().map(s).collect();
        assert_eq!(tokens, want_tokens, "case {name}: tokens");
    }
}

#[test]
fn decode_matches_transformers() {
    let tok = tokenizer();
    let doc = fixture("tokenizer_cases.json");
    for c in cases(&doc) {
        let name = s(&c["name"]);
        let want = ids(&c["ids"]);
        let want_bos = ids(&c["ids_with_bos"]);
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            s(&c["decoded"]),
            "case {name}: decode"
        );
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            s(&c["decoded_skip_special"]),
            "case {name}: decode(skip_special)"
        );
        assert_eq!(
            tok.decode(&want_bos, false).unwrap(),
            s(&c["decoded_with_bos"]),
            "case {name}: decode with BOS"
        );
        // the Gemma tokenizer is lossless on all these strings
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            s(&c["text"]),
            "case {name}: round trip"
        );
    }
}

/// Push ids one at a time; return the pieces (finish() last).
fn stream_pieces(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Vec<String> {
    let mut st = tok.stream_with(skip_special);
    let mut pieces: Vec<String> = ids.iter().map(|&i| st.push(i).unwrap()).collect();
    pieces.push(st.finish().unwrap());
    pieces
}

#[test]
fn stream_decode_concatenates_to_decode() {
    let tok = tokenizer();
    let doc = fixture("tokenizer_cases.json");
    let mut held_back = 0;
    for c in cases(&doc) {
        let name = s(&c["name"]);
        let all = ids(&c["ids_with_bos"]);
        for skip in [false, true] {
            let pieces = stream_pieces(tok, &all, skip);
            assert_eq!(
                pieces.concat(),
                tok.decode(&all, skip).unwrap(),
                "case {name} (skip_special={skip}): pieces {pieces:?}"
            );
            assert!(
                pieces.iter().all(|p| !p.contains('\u{FFFD}')),
                "case {name}: a piece holds a partial character: {pieces:?}"
            );
            // a non-special token whose piece is empty was held back (incomplete UTF-8)
            held_back += all
                .iter()
                .zip(&pieces)
                .filter(|(&id, p)| p.is_empty() && tok.id_to_token(id).unwrap().starts_with("<0x"))
                .count();
        }
        // the default stream skips special tokens
        let mut st = tok.stream();
        let mut text: String = all.iter().map(|&i| st.push(i).unwrap()).collect();
        text.push_str(&st.finish().unwrap());
        assert_eq!(text, s(&c["decoded_skip_special"]), "case {name}: stream()");
    }
    assert!(
        held_back > 0,
        "the fixtures must exercise byte-fallback tokens"
    );
}

#[test]
fn stream_decode_byte_fallback_emoji() {
    let tok = tokenizer();
    // U+1FAE8 (shaking face) is not in the vocabulary: four byte-fallback tokens.
    let text = "a \u{1FAE8}!";
    let all = tok.encode(text, false).unwrap();
    let byte_tokens: Vec<String> = all.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert!(
        byte_tokens.iter().filter(|t| t.starts_with("<0x")).count() == 4,
        "{byte_tokens:?}"
    );
    let pieces = stream_pieces(tok, &all, false);
    assert_eq!(pieces.concat(), text);
    let emoji_piece = pieces.iter().position(|p| p.contains('\u{1FAE8}')).unwrap();
    // the three tokens before the one completing the emoji emitted nothing
    assert!(
        pieces[emoji_piece - 3..emoji_piece]
            .iter()
            .all(|p| p.is_empty()),
        "{pieces:?}"
    );
    assert_eq!(pieces.last().unwrap(), "", "nothing left for finish()");

    // an incomplete sequence at the end is flushed by finish() as U+FFFD, like decode()
    let truncated = &all[..all.len() - 2]; // drop the last byte token and "!"
    let pieces = stream_pieces(tok, truncated, false);
    assert!(pieces[..pieces.len() - 1].concat() == "a ", "{pieces:?}");
    assert_eq!(pieces.concat(), tok.decode(truncated, false).unwrap());
    assert!(pieces.last().unwrap().contains('\u{FFFD}'));
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).expect("messages")
}

#[test]
fn chat_template_matches_transformers() {
    let tok = tokenizer();
    let template = tok
        .chat_template()
        .expect("tokenizer_config.json has a chat_template");
    let doc = fixture("chat_cases.json");
    let (bos, eos) = (s(&doc["bos_token"]), s(&doc["eos_token"]));
    assert_eq!(Some(bos), tok.bos_token());
    let mut ok_cases = 0;
    let mut err_cases = 0;
    for c in cases(&doc) {
        let name = s(&c["name"]);
        let msgs = messages(&c["messages"]);
        let add_gen = c["add_generation_prompt"].as_bool().unwrap();
        let out = render_chat(template, &msgs, bos, eos, add_gen);
        if c["error"].as_bool().unwrap() {
            let err = out.expect_err(name);
            assert!(matches!(err, Error::Invalid(_)), "case {name}: {err:?}");
            let want = s(&c["error_message"]);
            assert!(
                err.to_string().contains(want),
                "case {name}: error {err} should mention {want:?}"
            );
            err_cases += 1;
        } else {
            let rendered = out.unwrap_or_else(|e| panic!("case {name}: {e}"));
            assert_eq!(rendered, s(&c["rendered"]), "case {name}: render");
            assert!(rendered.starts_with(bos));
            // tokenized without adding BOS again: exactly one BOS
            let got = tok.encode(&rendered, false).unwrap();
            assert_eq!(got, ids(&c["ids"]), "case {name}: ids");
            assert_eq!(got.iter().filter(|&&i| Some(i) == tok.bos_id()).count(), 1);
            ok_cases += 1;
        }
    }
    assert!(
        ok_cases >= 10 && err_cases >= 2,
        "{ok_cases} ok / {err_cases} error cases"
    );
}

#[test]
fn load_and_decode_errors_name_the_problem() {
    let src = tokenizer_dir();
    let empty = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(empty.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");

    // a corrupt tokenizer.json
    std::fs::write(empty.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::from_dir(empty.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");

    // tokenizer.json only: BOS falls back to <bos>, add_bos_token true, no template
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_id(), Some(2));
    assert_eq!(tok.encode_prompt("hi").unwrap()[0], 2);
    assert_eq!(tok.chat_template(), None);
    assert!(tok.decode(&[tok.vocab_size() as u32 + 5], false).is_err());
    assert!(tok.stream().push(u32::MAX).is_err());

    // bad tokenizer_config.json: invalid JSON names the file, a mistyped field names the field
    let cfg = dir.path().join("tokenizer_config.json");
    std::fs::write(&cfg, "{\"add_bos_token\": tru").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
    std::fs::write(&cfg, r#"{"add_bos_token": "yes"}"#).unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Field { field, .. } if field == "add_bos_token"),
        "{err:?}"
    );
    std::fs::write(&cfg, r#"{"bos_token": "<no such token>"}"#).unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Field { field, .. } if field == "bos_token"),
        "{err:?}"
    );

    // add_bos_token false is honoured; AddedToken-object form of bos_token is accepted
    std::fs::write(
        &cfg,
        r#"{"add_bos_token": false, "bos_token": {"content": "<bos>"}}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.encode_prompt("hi").unwrap(),
        tok.encode("hi", false).unwrap()
    );
    assert_eq!(tok.bos_id(), Some(2));
}
