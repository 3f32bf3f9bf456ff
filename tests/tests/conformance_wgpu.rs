//! The backend conformance suite (`e4m3_core::conformance`) on the wgpu backend, against the CPU
//! reference. Without a wgpu adapter this test fails unless `E4M3_ALLOW_NO_GPU=1` (CI installs lavapipe).

use e4m3_core::conformance::run_suite;

#[test]
fn wgpu_matches_cpu_reference_on_every_op() {
    let backend = match e4m3_backend_wgpu::open(None) {
        Ok(b) => b,
        Err(e) => {
            println!("skipped: no wgpu adapter ({e})");
            if std::env::var("E4M3_ALLOW_NO_GPU").as_deref() == Ok("1") {
                return;
            }
            panic!(
                "no wgpu adapter: {e} (set E4M3_ALLOW_NO_GPU=1 to skip on machines without one)"
            );
        }
    };
    let report = run_suite(backend.as_ref(), None);
    assert_eq!(report.failed(), 0, "{} cases failed", report.failed());
    assert!(report.passed() > 0, "no case ran");
}

/// Weights split across several buffers (binding limit lowered to 64 KiB): linear and embed cases.
#[test]
fn wgpu_splits_tensors_larger_than_one_binding() {
    let backend = match e4m3_backend_wgpu::open_with_binding_limit(None, 64 << 10) {
        Ok(b) => b,
        Err(e) => {
            println!("skipped: no wgpu adapter ({e})");
            if std::env::var("E4M3_ALLOW_NO_GPU").as_deref() == Ok("1") {
                return;
            }
            panic!(
                "no wgpu adapter: {e} (set E4M3_ALLOW_NO_GPU=1 to skip on machines without one)"
            );
        }
    };
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
    let backend = match e4m3_backend_wgpu::open(None) {
        Ok(b) => b,
        Err(e) => {
            println!("skipped: no wgpu adapter ({e})");
            if std::env::var("E4M3_ALLOW_NO_GPU").as_deref() == Ok("1") {
                return;
            }
            panic!(
                "no wgpu adapter: {e} (set E4M3_ALLOW_NO_GPU=1 to skip on machines without one)"
            );
        }
    };
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
