//! `e4m3 bench` on the CPU backend: synthetic models in every scheme, the real 270M checkpoint, the JSON
//! report's fields and values, and the errors for bad model sources and sizes.

mod common;

use common::{e4m3, fails_with, root};

use serde_json::Value;

fn bench_json(args: &[&str]) -> Value {
    let mut all = vec!["bench", "--backend", "cpu", "--json"];
    all.extend_from_slice(args);
    let out = e4m3(&all);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{all:?} failed: {err}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

/// The fields every report has, with real values.
fn check_report(r: &Value, prompt_lens: &[u64], batches: &[u64], steps: u64) {
    assert_eq!(r["tool"], "e4m3");
    let commit = r["commit"].as_str().unwrap();
    assert!(!commit.is_empty(), "commit");
    let date = r["date"].as_str().unwrap();
    assert!(
        date.len() == 20 && date.ends_with('Z') && date.as_bytes()[10] == b'T',
        "{date}"
    );
    assert!(!r["host"].as_str().unwrap().is_empty());
    assert_eq!(r["backend"], "cpu");
    assert!(!r["device"].as_str().unwrap().is_empty());
    assert_eq!(r["nonfinite_rows"], 0, "every greedy row finite");
    assert_eq!(r["decode_steps"], steps);
    let prefill = r["prefill"].as_array().unwrap();
    assert_eq!(
        prefill
            .iter()
            .map(|p| p["prompt_len"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        prompt_lens
    );
    for p in prefill {
        let ttft = positive(&p["ttft_ms"], "ttft_ms");
        assert!(positive(&p["ttft_ms_min"], "ttft_ms_min") <= ttft);
        positive(&p["tok_per_s"], "prefill tok/s");
    }
    let decode = r["decode"].as_array().unwrap();
    assert_eq!(
        decode
            .iter()
            .map(|d| d["batch"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        batches
    );
    for d in decode {
        let p50 = positive(&d["itl_ms_p50"], "itl p50");
        assert!(positive(&d["itl_ms_p90"], "itl p90") >= p50);
        positive(&d["itl_ms_mean"], "itl mean");
        let tps = positive(&d["tok_per_s"], "decode tok/s");
        // B tokens per step: throughput is about B / ITL (the median run against the mean step).
        let b = d["batch"].as_f64().unwrap();
        let from_itl = b / (d["itl_ms_mean"].as_f64().unwrap() / 1e3);
        assert!(
            (0.5..2.0).contains(&(tps / from_itl)),
            "tok/s {tps} vs {from_itl}"
        );
        assert_eq!(d["steps"], steps);
    }
    positive(&r["memory"]["peak_rss_bytes"], "peak RSS");
    assert!(
        r["memory"]["device"].is_null(),
        "the CPU has no device memory"
    );
    let bw = &r["bandwidth"];
    assert!(
        bw["copy_bytes_per_s"].is_null(),
        "no copy bandwidth on the CPU"
    );
    assert!(bw["floor_itl_ms"].is_null());
    assert!(bw["itl_over_floor"].is_null());
    let b = &bw["decode_step_bytes"];
    let sum: u64 = ["linears", "embed_row", "norms", "kv_cache"]
        .iter()
        .map(|k| b[*k].as_u64().unwrap())
        .sum();
    assert_eq!(b["total"].as_u64().unwrap(), sum);
    assert!(b["kv_cache"].as_u64().unwrap() > 0);
    if batches.contains(&1) {
        positive(&bw["achieved_bytes_per_s"], "achieved bandwidth");
    }
}

#[test]
fn bench_synthetic_tiny_in_every_scheme() {
    let tmp = tempfile::tempdir().unwrap();
    for scheme in [
        "bf16",
        "fp8-static",
        "fp8-dynamic",
        "fp8-block-wo",
        "fp8-block",
    ] {
        let out = tmp.path().join(format!("{scheme}.json"));
        let r = bench_json(&[
            "--synthetic",
            "tiny",
            "--scheme",
            scheme,
            "--prompt-lens",
            "8,16",
            "--batches",
            "1,2",
            "--decode",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]);
        check_report(&r, &[8, 16], &[1, 2], 3);
        assert_eq!(r["model"], "tiny");
        assert_eq!(r["source"], "synthetic");
        assert_eq!(r["scheme"], scheme);
        assert_eq!(r["prompt_source"], "random ids");
        assert_eq!(r["kv_cache_dtype"], "auto");
        assert_eq!(r["kv_bytes_per_value"], 4);
        assert_eq!(r["decode_context"], 8, "the shortest prompt by default");
        assert_eq!(r["layers"], 4);
        let file: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(file, r, "--out writes the same report");
        if scheme != "bf16" {
            assert_ne!(r["quantization"], "none");
        }
    }
}

#[test]
fn bench_synthetic_human_table_and_options() {
    let out = e4m3(&[
        "bench",
        "--synthetic",
        "tiny",
        "--backend",
        "cpu",
        "--prompt-lens",
        "12",
        "--batches",
        "3",
        "--decode",
        "2",
        "--decode-context",
        "5",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--kv-cache-dtype",
        "fp8",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "model      tiny (synthetic, bf16)",
        "prefill",
        "TTFT ms",
        "decode",
        "(context 5, 2 steps)",
        "memory     peak RSS",
        "bandwidth  batch-1 step reads",
        "KV cache fp8",
    ] {
        assert!(text.contains(want), "expected `{want}` in:\n{text}");
    }
    assert!(text.lines().count() <= 10, "short:\n{text}");
    // `--prompt-len` (scripts/gpu-check.sh) is an alias of `--prompt-lens`.
    let r = bench_json(&[
        "--synthetic",
        "tiny",
        "--prompt-len",
        "12",
        "--batches",
        "3",
        "--decode",
        "2",
        "--decode-context",
        "5",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--kv-cache-dtype",
        "fp8",
    ]);
    check_report(&r, &[12], &[3], 2);
    assert_eq!(
        (r["runs"].as_u64(), r["warmup"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(r["kv_cache_dtype"], "fp8");
    assert_eq!(r["kv_bytes_per_value"], 1);
    assert!(
        r["bandwidth"]["achieved_bytes_per_s"].is_null(),
        "no batch 1"
    );
}

#[test]
fn bench_the_real_270m_checkpoint() {
    let dir = root().join("models/gemma-3-270m");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the real model is not at {}: run scripts/setup.sh first",
        dir.display()
    );
    let r = bench_json(&[
        "--model",
        dir.to_str().unwrap(),
        "--prompt-lens",
        "16",
        "--batches",
        "1",
        "--decode",
        "2",
    ]);
    check_report(&r, &[16], &[1], 2);
    assert_eq!(r["source"], "checkpoint");
    assert_eq!(r["scheme"], "bf16");
    assert_eq!(r["quantization"], "none");
    assert_eq!(r["prompt_source"], "text");
    assert_eq!(r["layers"], 18);
    // performance-anchors.md section 8: 100,270,080 layer parameters and the tied 262,144 x 640 head,
    // all BF16; one 640-wide BF16 embedding row.
    let b = &r["bandwidth"]["decode_step_bytes"];
    assert_eq!(b["linears"], 2 * (100_270_080u64 + 167_772_160));
    assert_eq!(b["embed_row"], 1280);
    // 18 layers x 1 kv head x 256 x (k, v) x 4 bytes at 17 cached positions (16 + 2/2).
    assert_eq!(b["kv_context"], 17);
    assert_eq!(b["kv_cache"], 18 * 17 * 256 * 2 * 4);
}

#[test]
fn bench_errors_are_clear() {
    let m = root().join("models/gemma-3-270m");
    let m = m.to_str().unwrap();
    fails_with(
        &["bench", "--synthetic", "gemma-3-7b", "--backend", "cpu"],
        &["unknown synthetic model `gemma-3-7b`", "gemma-3-27b"],
    );
    // 31B parameters do not fit the memory of a test machine: refused before any weight is made (not
    // killed for lack of memory).
    if e4m3_core::kv_pages::system_memory().is_some_and(|m| m < 60 << 30) {
        fails_with(
            &["bench", "--synthetic", "gemma-4-31b", "--backend", "cpu"],
            &[
                "--synthetic gemma-4-31b (bf16) needs at least",
                "GiB of memory",
            ],
        );
    }
    fails_with(
        &["bench", "--model", m, "--synthetic", "tiny"],
        &["either --model DIR or --synthetic NAME, not both"],
    );
    fails_with(
        &["bench", "--backend", "cpu"],
        &["give --model DIR", "--synthetic NAME"],
    );
    fails_with(
        &["bench", "--synthetic", "tiny", "--scheme", "fp4"],
        &["unknown scheme `fp4`", "fp8-block-wo"],
    );
    fails_with(
        &["bench", "--model", m, "--scheme", "bf16"],
        &["--scheme applies to --synthetic"],
    );
    fails_with(
        &["bench", "--synthetic", "tiny", "--prompt-lens", "8,5000"],
        &["--prompt-lens 5000", "max_position_embeddings", "4096"],
    );
    fails_with(
        &[
            "bench",
            "--synthetic",
            "tiny",
            "--prompt-lens",
            "8",
            "--decode",
            "4095",
        ],
        &["--decode 4095", "max_position_embeddings"],
    );
    fails_with(
        &["bench", "--synthetic", "tiny", "--batches", "1,1000"],
        &["--batches 1000", "at most 256"],
    );
    fails_with(
        &["bench", "--synthetic", "tiny", "--batches", "0"],
        &["--batches", "at least 1"],
    );
}
