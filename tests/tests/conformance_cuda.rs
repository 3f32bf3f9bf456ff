//! The backend conformance suite (`e4m3_core::conformance`) on the CUDA backend, against the CPU
//! reference. It needs an NVIDIA GPU, so cargo reports it as ignored on machines without one; on a GPU
//! machine without Rust the release binary runs the same suite: `e4m3 conformance --backend cuda`
//! (scripts/gpu-check.sh).

use e4m3_core::conformance::run_suite;

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -- --ignored, or e4m3 conformance --backend cuda"]
fn cuda_matches_cpu_reference_on_every_op() {
    let backend = e4m3_backend_cuda::open(0).unwrap_or_else(|e| panic!("{e}"));
    let report = run_suite(backend.as_ref(), None);
    assert_eq!(report.failed(), 0, "{} cases failed", report.failed());
    assert!(report.passed() > 0, "no case ran");
}
