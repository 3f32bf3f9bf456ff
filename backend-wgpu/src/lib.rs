//! wgpu backend: the portable cross-check path (WGSL shaders in `shaders/`, FP8 decoded from bits).
//!
//! This build holds only the skeleton: every entry point answers that the backend is not available,
//! so code that names the backend compiles and fails clearly at run time.

use e4m3_core::backend::Backend;
use e4m3_core::error::{Error, Result};

/// Open the wgpu backend on the adapter whose name contains `adapter` (first adapter if None).
pub fn open(adapter: Option<&str>) -> Result<Box<dyn Backend>> {
    let _ = adapter;
    Err(Error::BackendUnavailable {
        backend: "wgpu".into(),
        reason: "this build of e4m3 has no wgpu backend yet (the CPU backend is available: --backend cpu)".into(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn absent_backend_answers_not_available() {
        let e = super::open(None)
            .err()
            .expect("skeleton must refuse")
            .to_string();
        assert!(e.contains("backend `wgpu` is not available"), "{e}");
    }
}
