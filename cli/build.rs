//! Embeds the source revision as `E4M3_COMMIT` (for `e4m3 bench` reports): `git rev-parse --short HEAD`,
//! with `-dirty` when `git status --porcelain` lists anything, or `unknown` where git or the repository is
//! not available. Never fails the build.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Rerun this script when `path` changes (only for paths that exist: a missing one would rerun it on
/// every build).
fn watch(path: &str) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if p.exists() {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}

fn main() {
    let commit = match git(&["rev-parse", "--short", "HEAD"]) {
        Some(h) if !h.is_empty() => {
            let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{h}-dirty")
            } else {
                h
            }
        }
        _ => "unknown".to_string(),
    };
    println!("cargo:rustc-env=E4M3_COMMIT={commit}");
    // A new commit moves HEAD or the branch it points to; an edit to any source dirties the tree (and
    // rebuilds this crate anyway).
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(p) = git(&["rev-parse", "--git-path", "HEAD"]) {
        watch(&p);
    }
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-path", &r]) {
            watch(&p);
        }
    }
    for d in [
        "src",
        "tests",
        "Cargo.toml",
        "../Cargo.toml",
        "../core",
        "../backend-cuda",
        "../backend-wgpu",
        "../kernels",
        "../shaders",
        "../tools",
        "../scripts",
        "../README.md",
    ] {
        watch(d);
    }
}
