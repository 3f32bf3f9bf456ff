//! The backend conformance suite (`e4m3_core::conformance`) on the wgpu backend, against the CPU
//! reference. Without a wgpu adapter this test fails (it never skips; CI installs lavapipe).

use e4m3_core::conformance::run_suite;

#[test]
fn wgpu_matches_cpu_reference_on_every_op() {
    let backend = e4m3_tests::wgpu_backend(None);
    let report = run_suite(backend.as_ref(), None);
    assert_eq!(report.failed(), 0, "{} cases failed", report.failed());
    assert!(report.passed() > 0, "no case ran");
}

/// Weights split across several buffers (binding limit lowered to 64 KiB): linear and embed cases.
#[test]
fn wgpu_splits_tensors_larger_than_one_binding() {
    let backend = e4m3_tests::wgpu_backend(Some(64 << 10));
    for filter in ["linear(dense", "linear(fp8", "embed("] {
        let report = run_suite(backend.as_ref(), Some(filter));
        // Cases whose input rows are longer than the lowered limit must fail with that reason, not
        // compute anything; every other case must pass.
        for r in &report.results {
            if let Some(reason) = r.reason() {
                assert!(
                    r.name.contains("k=16411")
                        && reason.contains("exceeds the adapter's storage binding limit"),
                    "{}: {reason}",
                    r.name
                );
            }
        }
        assert!(report.passed() > 0, "no case ran");
        assert_eq!(report.unsupported(), 0);
    }
}

/// The Gemma 4 ops (issue #8) have wgpu kernels: every one of their cases runs and passes.
#[test]
fn wgpu_runs_every_gemma4_case() {
    let backend = e4m3_tests::wgpu_backend(None);
    for filter in [
        "slice_cols(",
        "attention_shared(",
        "router_topk(",
        "moe_experts(",
    ] {
        let report = run_suite(backend.as_ref(), Some(filter));
        for r in &report.results {
            assert!(r.reason().is_none(), "{}: {:?}", r.name, r.reason());
        }
        assert!(
            report.results.len() >= 6,
            "{filter}: {} cases",
            report.results.len()
        );
        assert_eq!(report.passed(), report.results.len(), "{filter}");
    }
}

/// The vision-encoder ops and the image inputs of a text step (issue #9) have wgpu kernels: every one of
/// their cases runs and passes; the encoder ops also with the binding limit lowered to 24 KiB, so that the
/// elementwise ops (BiasAdd, GeluTanh: the wide MLP's) run in windows (`bias_add(cols=1000,rows=7)` holds
/// 28000 bytes: a second window starts at column 144) and the input tables are split (the text-step
/// cases' KV cache would not fit such a limit).
#[test]
fn wgpu_runs_every_vision_case() {
    for limit in [None, Some(24 << 10)] {
        let backend = e4m3_tests::wgpu_backend(limit);
        let mut total = 0;
        let filters = [
            "bias_add(",
            "gelu_tanh(cols",
            "layer_norm(",
            "encoder_attention(",
            "avg_pool2d(",
            "input(",
            "attention_image_groups(",
        ];
        let n = if limit.is_some() { 6 } else { 7 };
        for filter in &filters[..n] {
            let report = run_suite(backend.as_ref(), Some(filter));
            for r in &report.results {
                assert!(
                    r.reason().is_none(),
                    "{limit:?} {}: {:?}",
                    r.name,
                    r.reason()
                );
            }
            assert!(report.passed() > 0, "{filter}: no case");
            total += report.passed();
        }
        let image_groups = if limit.is_some() { 0 } else { 4 };
        assert_eq!(total, 3 * 3 + 3 + 2 + 1 + image_groups, "{limit:?}");
    }
}

/// The Gemma 4 vision-tower ops and the image-groups modes of attention (issue #9) have wgpu kernels:
/// every one of their cases runs and passes; Clamp and ChannelScale also with the binding limit lowered
/// to 24 KiB (`channel_scale(cols=1000,rows=7)` runs in two windows, the second from column 144).
#[test]
fn wgpu_runs_every_gemma4_vision_case() {
    for limit in [None, Some(24 << 10)] {
        let backend = e4m3_tests::wgpu_backend(limit);
        let filters = [
            "clamp(",
            "channel_scale(",
            "pos_embed2d(",
            "rope2d(",
            "pool_positions(",
            "image_groups=Off",
            "image_groups=WholeGroup",
        ];
        let n = if limit.is_some() { 2 } else { filters.len() };
        let mut total = 0;
        for filter in &filters[..n] {
            let report = run_suite(backend.as_ref(), Some(filter));
            for r in &report.results {
                assert!(
                    r.reason().is_none(),
                    "{limit:?} {}: {:?}",
                    r.name,
                    r.reason()
                );
            }
            assert!(report.passed() > 0, "{filter}: no case");
            total += report.passed();
        }
        assert_eq!(total, if limit.is_some() { 4 } else { 12 }, "{limit:?}");
    }
}
