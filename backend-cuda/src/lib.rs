//! CUDA backend for Hopper/Blackwell (kernels compiled with NVRTC from `kernels/`).
//!
//! This build holds only the skeleton: every entry point answers that the backend is not available,
//! so code that names the backend compiles and fails clearly at run time.

use e4m3_core::backend::Backend;
use e4m3_core::error::{Error, Result};

/// Open the CUDA backend on device `ordinal`.
pub fn open(ordinal: usize) -> Result<Box<dyn Backend>> {
    let _ = ordinal;
    Err(Error::BackendUnavailable {
        backend: "cuda".into(),
        reason: "this build of e4m3 has no CUDA backend yet (the CPU backend is available: --backend cpu)".into(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn absent_backend_answers_not_available() {
        let e = super::open(0)
            .err()
            .expect("skeleton must refuse")
            .to_string();
        assert!(e.contains("backend `cuda` is not available"), "{e}");
    }
}
