//! The `e4m3` binary as a user runs it: real outputs on the real Gemma 3 270M, and clear errors
//! (exit status 1, message naming the file or parameter) for bad input.

mod common;

use common::{e4m3, fails_with, root};
use std::path::PathBuf;

use serde_json::Value;

fn real_model() -> PathBuf {
    let dir = root().join("models/gemma-3-270m");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the real model is not at {} — run `scripts/setup.sh` first",
        dir.display()
    );
    dir
}

fn golden_case(name: &str) -> Value {
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/golden-270m.json")).unwrap(),
    )
    .unwrap();
    g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

#[test]
fn run_json_greedy_equals_transformers() {
    let m = real_model();
    let case = golden_case("fact");
    let out = e4m3(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--json",
        "--top-logits",
        "3",
        "--backend",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_ids"], case["prompt_ids"]);
    let want: Vec<u64> = case["greedy_ids"].as_array().unwrap()[..12]
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let got: Vec<u64> = v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    // Generation may stop early on an end-of-turn id; what was generated must be transformers' prefix.
    assert!(
        !got.is_empty() && want.starts_with(&got),
        "got {got:?}, transformers {want:?}"
    );
    let tops = v["top_logits"].as_array().unwrap();
    assert_eq!(tops.len(), got.len());
    assert_eq!(tops[0][0][0].as_u64().unwrap(), got[0]);
    assert!(
        v["text"].as_str().unwrap().contains("Berlin"),
        "{}",
        v["text"]
    );
}

#[test]
fn run_streams_text_and_chat_uses_the_template() {
    let m = real_model();
    let case = golden_case("fact");
    let out = e4m3(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--backend",
        "cpu",
    ]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Berlin"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = e4m3(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--chat",
        "Hi",
        "--max-tokens",
        "2",
        "--json",
        "--seed",
        "7",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // <bos> <start_of_turn> user \n Hi <end_of_turn> \n <start_of_turn> model \n
    let ids: Vec<u64> = v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(&ids[..2], &[2, 105]);
    assert_eq!(
        ids.iter().filter(|&&i| i == 2).count(),
        1,
        "exactly one BOS"
    );
    assert_eq!(ids.iter().filter(|&&i| i == 105).count(), 2);
    assert_eq!(ids.iter().filter(|&&i| i == 106).count(), 1);
}

#[test]
fn logits_json_top_ids_match_transformers() {
    let m = real_model();
    let case = golden_case("question");
    let out = e4m3(&[
        "logits",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--top",
        "3",
        "--json",
        "--backend",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let positions = v["positions"].as_array().unwrap();
    assert_eq!(
        positions.len(),
        case["prompt_ids"].as_array().unwrap().len()
    );
    for (p, pos) in positions.iter().enumerate() {
        let top = pos["top"].as_array().unwrap();
        let want_id = case["top_ids"][p][0].as_u64().unwrap();
        let want_logit = case["top_logits"][p][0].as_f64().unwrap();
        assert_eq!(top[0][0].as_u64().unwrap(), want_id, "position {p}");
        assert!(
            (top[0][1].as_f64().unwrap() - want_logit).abs() < 0.05,
            "position {p}"
        );
    }
}

#[test]
fn info_describes_the_model() {
    let m = real_model();
    let out = e4m3(&["info", "--model", m.to_str().unwrap()]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("SSSSSFSSSSSFSSSSSF"), "{s}");
    assert!(s.contains("4 query, 1 kv"), "{s}");
    assert!(s.contains("tied"), "{s}");
}

#[test]
fn bad_input_is_a_clear_error() {
    fails_with(
        &["run", "--model", "/nonexistent/model", "--prompt", "x"],
        &["/nonexistent/model"],
    );
    fails_with(
        &["info", "--model", "/nonexistent/model"],
        &["/nonexistent/model"],
    );
    fails_with(
        &[
            "import-gguf",
            "/nonexistent/x.gguf",
            "--tokenizer",
            real_model().to_str().unwrap(),
            "--out",
            "/tmp/e4m3-never",
        ],
        &["x.gguf"],
    );
    let m = real_model();
    let ms = m.to_str().unwrap();
    fails_with(
        &["run", "--model", ms, "--prompt", "x", "--top-p", "0"],
        &["top_p"],
    );
    fails_with(
        &["run", "--model", ms, "--prompt", "x", "--temperature=-1"],
        &["temperature"],
    );
    fails_with(
        &["run", "--model", ms, "--prompt", "x", "--backend", "cuda"],
        &["backend `cuda` is not available"],
    );
    // A prompt longer than max_position_embeddings (32768) names both numbers.
    let long = "7".repeat(33000); // Gemma splits digits: one token each
    fails_with(
        &["run", "--model", ms, "--prompt", &long, "--max-tokens", "1"],
        &["32768", "tokens"],
    );
    // A model directory without a tokenizer, and one with a broken config.json.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(m.join("config.json"), dir.path().join("config.json")).unwrap();
    fails_with(
        &[
            "run",
            "--model",
            dir.path().to_str().unwrap(),
            "--prompt",
            "x",
        ],
        &["tokenizer.json"],
    );
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    fails_with(
        &["info", "--model", dir.path().to_str().unwrap()],
        &["config.json", "invalid JSON"],
    );
}

/// `crosscheck --backends wgpu,cpu` on the real model in BF16 and two FP8 schemes quantized on the fly.
/// Without a wgpu adapter this fails (scripts/setup.sh installs lavapipe).
#[test]
fn crosscheck_wgpu_against_cpu_on_the_real_model() {
    let m = real_model();
    let probe = e4m3(&[
        "crosscheck",
        "--model",
        m.to_str().unwrap(),
        "--backends",
        "wgpu,cpu",
        "--tokens",
        "6",
    ]);
    let err = String::from_utf8_lossy(&probe.stderr).to_string();
    assert!(
        probe.status.success(),
        "BF16 crosscheck failed: {err}\n{}",
        String::from_utf8_lossy(&probe.stdout)
    );
    let out = String::from_utf8_lossy(&probe.stdout);
    assert!(
        out.contains("layers.17.residual") && out.contains("no NaN/Inf"),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    for scheme in ["fp8-dynamic", "fp8-block-wo", "fp8-block"] {
        let q = dir.path().join(scheme);
        let o = e4m3(&[
            "quantize",
            "--from",
            m.to_str().unwrap(),
            "--to",
            q.to_str().unwrap(),
            "--scheme",
            scheme,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = e4m3(&[
            "crosscheck",
            "--model",
            q.to_str().unwrap(),
            "--backends",
            "wgpu,cpu",
            "--tokens",
            "6",
            "--json",
        ]);
        assert!(
            o.status.success(),
            "{scheme}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        eprintln!("{scheme}: {v}");
        assert!(v.to_string().contains("logits"), "{scheme}: {v}");
    }
}

/// `conformance --backend cpu` runs the suite's cases on the CPU against the CPU reference: every case
/// passes with NMSE exactly 0, the JSON report holds one entry per case with its threshold.
#[test]
fn conformance_cpu_against_itself() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = e4m3(&[
        "conformance",
        "--backend",
        "cpu",
        "--filter",
        "rms_norm(cols=15",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains("rms_norm")).collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for l in &lines {
        assert!(
            l.trim_start().starts_with("passed") && l.contains("nmse 0.00e0"),
            "{l}"
        );
    }
    assert!(
        stdout.contains("3 cases: 3 passed, 0 failed, 0 unsupported"),
        "{stdout}"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["passed"], 3);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["unsupported"], 0);
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        assert!(
            c["name"]
                .as_str()
                .unwrap()
                .starts_with("rms_norm(cols=15,group=5,"),
            "{c}"
        );
        assert_eq!(c["status"], "passed", "{c}");
        assert_eq!(c["nmse"].as_f64(), Some(0.0), "{c}");
        assert_eq!(c["threshold"].as_f64(), Some(1e-6), "{c}");
        assert!(c["reason"].is_null(), "{c}");
    }
    // A filter that matches nothing is an error, not an empty pass.
    fails_with(
        &["conformance", "--backend", "cpu", "--filter", "no-such-op"],
        &["no-such-op"],
    );
    // --adapter is for wgpu only.
    fails_with(
        &["conformance", "--backend", "cpu", "--adapter", "x"],
        &["--backend wgpu"],
    );
}

/// A backend that is not available here exits with status 2 and says why.
#[test]
fn conformance_unavailable_backend_exits_2() {
    let out = e4m3(&[
        "conformance",
        "--backend",
        "wgpu",
        "--adapter",
        "no-such-adapter-e4m3",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains("backend `wgpu` is not available") && err.contains("no-such-adapter-e4m3"),
        "{err}"
    );
}

/// `crosscheck --plot` on a tiny random Gemma 3 (3 layers), CPU against CPU: the PNG decodes, has the
/// size of 3 tap columns x 3 layers plus the logits row, and is drawn (NMSE 0 everywhere: every cell in
/// the scale's bottom colour, no cell outlined, only the legend's threshold line in red).
#[test]
fn crosscheck_plot_writes_a_heatmap_png() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let t = e4m3_tests::Tiny::default();
    assert_eq!(t.full.len(), 3);
    e4m3_tests::write_tiny(&model, &t, 5);
    let plot = dir.path().join("heat.png");
    let out = e4m3(&[
        "crosscheck",
        "--model",
        model.to_str().unwrap(),
        "--backends",
        "cpu,cpu",
        "--tokens",
        "5",
        "--json",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("heatmap written to"), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let taps = v["taps"].as_array().unwrap();
    assert_eq!(taps.len(), 3 * 3 + 1, "{v}");
    assert!(taps.iter().all(|t| t["nmse"] == 0.0), "{v}");

    let file = std::io::BufReader::new(std::fs::File::open(&plot).unwrap());
    let mut r = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    // Width: margin 10 + labels 78 + 3 columns x 56 + gap 16 + bar 16 + tick labels 42 + margin 10.
    // Height: margin 10 + header 22 + max(3 layers x 18 + gap 6 + logits 18, 100) + margin 10.
    assert_eq!((info.width, info.height), (340, 142));
    let px: Vec<[u8; 3]> = buf[..info.buffer_size()]
        .chunks(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    let mut colours = px.clone();
    colours.sort();
    colours.dedup();
    assert!(colours.len() > 20, "{} colours", colours.len());
    // The scale's bottom colour (NMSE 0) fills the 10 cells: each 54 x 16 inside its grid lines.
    let bottom = px.iter().filter(|&&c| c == [68, 1, 84]).count();
    assert!(bottom >= 9 * 54 * 16 + 166 * 16, "{bottom}");
    // Red: only the threshold mark across the legend bar (24 x 3), no cell outlined.
    let red = px.iter().filter(|&&c| c == [230, 0, 0]).count();
    assert_eq!(red, 24 * 3);
}

/// `run --chat --enable-thinking` on a Gemma-4-like tiny checkpoint: the prompt is the Gemma 4 template
/// with `enable_thinking`, and `--json` reports the thought channel apart (`reasoning_content`).
#[test]
fn run_chat_gemma4_thinking() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_gemma4_chat_model(dir.path());
    let model = dir.path().to_str().unwrap();
    let run = |extra: &[&str]| -> Value {
        let mut args = vec![
            "run",
            "--model",
            model,
            "--backend",
            "cpu",
            "--chat",
            "w20 w21",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = e4m3(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let tok = e4m3_core::tokenizer::Tokenizer::from_dir(dir.path()).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let on = run(&["--enable-thinking"]);
    let off = run(&[]);
    // Thinking on: a system turn with <|think|>, and no empty thought channel after <|turn>model.
    let on_ids = ids(&on);
    let off_ids = ids(&off);
    let unk = tok.token_to_id("<unk>").unwrap();
    assert_eq!(
        on_ids[..4],
        [id("<bos>"), id("<|turn>"), unk, id("<|think|>")]
    );
    assert!(!off_ids.contains(&id("<|think|>")));
    // ... `<|channel>thought\n<channel|>` ("thought" is not a word of the tiny vocabulary).
    assert_eq!(
        off_ids[off_ids.len() - 3..],
        [id("<|channel>"), unk, id("<channel|>")]
    );
    assert_ne!(on_ids.last(), Some(&id("<channel|>")));
    for v in [&on, &off] {
        assert!(v["reasoning_content"].is_string(), "{v}");
        assert!(v["text"].is_string(), "{v}");
    }
}

/// `run --image` on the tiny Gemma 4 checkpoints (tests/fixtures/tiny-gemma4-vision/{bidir,unified})
/// and a word tokenizer whose `<|image|>`, `<|image>`, `<image|>` are the fixture's ids 60, 61, 62: the
/// prompt ids and the greedy tokens are transformers', on the CPU and on wgpu (without a wgpu adapter the
/// wgpu run fails).
#[test]
fn run_image_on_gemma4_matches_transformers() {
    // The tower model, and the 12B-like encoder-free one: the same prompt and images.
    for variant in ["bidir", "unified"] {
        for backend in ["cpu", "wgpu"] {
            run_image_on_gemma4(variant, backend);
        }
    }
}

fn run_image_on_gemma4(variant: &str, backend: &str) {
    let src = root()
        .join("tests/fixtures/tiny-gemma4-vision")
        .join(variant);
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("reference.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "processor_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    let names: Vec<String> = (0..64)
        .map(|i| match i {
            0 => "<pad>".into(),
            1 => "<eos>".into(),
            2 => "<bos>".into(),
            3 => "<unk>".into(),
            60 => "<|image|>".into(),
            61 => "<|image>".into(),
            62 => "<image|>".into(),
            i => format!("w{i}"),
        })
        .collect();
    for (i, t) in names.iter().enumerate() {
        vocab.insert(t.clone(), serde_json::json!(i));
        if t.starts_with('<') && t != "<unk>" {
            added.push(
                serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}),
            );
        }
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"add_bos_token": true, "bos_token": "<bos>", "eos_token": "<eos>"}"#,
    )
    .unwrap();
    // The reference prompt as text: words, and one <|image|> per image block.
    let ids: Vec<u64> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let mut words = Vec::new();
    for (i, &t) in ids.iter().enumerate().skip(1) {
        match t {
            61 => words.push("<|image|>".to_string()),
            60 | 62 => {}
            t => words.push(names[t as usize].clone()),
        }
        assert!(t != 60 || ids[i - 1] == 60 || ids[i - 1] == 61);
    }
    let prompt = words.join(" ");
    let img = |f: &str| root().join("tests/fixtures/images").join(f);
    let (a, b) = (img("grad_160x120.png"), img("alpha_96x64.png"));
    let args = |prompt: &str| {
        vec![
            "run".to_string(),
            "--model".into(),
            dir.path().to_str().unwrap().into(),
            "--prompt".into(),
            prompt.into(),
            "--image".into(),
            a.to_str().unwrap().into(),
            "--image".into(),
            b.to_str().unwrap().into(),
            "--max-tokens".into(),
            "8".into(),
            "--temperature".into(),
            "0".into(),
            "--json".into(),
            "--backend".into(),
            backend.into(),
        ]
    };
    let a1 = args(&prompt);
    let out = e4m3(&a1.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Image tokens are embedded as padding (0) before the features replace them.
    let want_ids: Vec<u64> = ids.iter().map(|&t| if t == 60 { 0 } else { t }).collect();
    let got_ids: Vec<u64> = v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(got_ids, want_ids);
    assert_eq!(
        v["generated_ids"], reference["greedy"],
        "{variant} on {backend}"
    );
    // One marker for two images is an error naming the marker.
    let one = prompt.replacen("<|image|>", "", 1);
    let a2 = args(&one);
    fails_with(
        &a2.iter().map(String::as_str).collect::<Vec<_>>(),
        &["1 <|image|> markers but 2 images"],
    );
}
