//! Helpers shared by the CLI tests: the repository root, running the binary, and checking a clear failure.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
