//! `e4m3 conformance`: the op-by-op conformance suite (`e4m3_core::conformance`) on one backend against
//! the CPU reference, from the release binary. Exit status: 0 when no case failed (unsupported cases are
//! reported apart and are not failures), 1 when one did, 2 when the backend is not available here.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use e4m3_core::conformance::{run_cases, Outcome};

use crate::{open_backend, BackendKind};

#[derive(clap::Args)]
pub struct ConformanceArgs {
    /// The backend under test (auto: CUDA, then a hardware wgpu adapter, then the CPU).
    #[arg(long, value_enum)]
    backend: BackendKind,
    /// With --backend wgpu: the adapter whose name contains NAME (case-insensitive).
    #[arg(long)]
    adapter: Option<String>,
    /// Run only the cases whose name contains SUBSTRING (e.g. `rms_norm` or a full printed case name).
    #[arg(long)]
    filter: Option<String>,
    /// Write a JSON report: per case name, status, nmse, threshold, reason.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Exit status for a backend that cannot be opened on this machine.
pub const EXIT_UNAVAILABLE: i32 = 2;

/// Run the suite; returns the exit status (0, 1 when a case failed, 2 when the backend is unavailable).
pub fn cmd_conformance(a: ConformanceArgs) -> Result<i32> {
    let opened = match (&a.adapter, a.backend) {
        (None, kind) => open_backend(kind),
        (Some(name), BackendKind::Wgpu) => {
            e4m3_backend_wgpu::open(Some(name)).map_err(anyhow::Error::from)
        }
        (Some(_), other) => bail!(
            "--adapter picks a wgpu adapter; it needs --backend wgpu, not {}",
            format!("{other:?}").to_lowercase()
        ),
    };
    let backend = match opened {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(EXIT_UNAVAILABLE);
        }
    };
    let name = backend.name();
    println!("conformance: {name} against the cpu reference");
    let mut stdout = std::io::stdout();
    let report = run_cases(backend.as_ref(), a.filter.as_deref(), |r| {
        let line = match &r.outcome {
            Outcome::Passed { nmse } => format!(
                "  passed       {} (nmse {nmse:.2e}, threshold {})",
                r.name,
                threshold_text(r.threshold)
            ),
            Outcome::Failed(e) => format!("  FAILED       {}: {e}", r.name),
            Outcome::Unsupported(e) => format!("  unsupported  {}: {e}", r.name),
        };
        // Lines appear as cases finish (some take seconds on a software adapter).
        let _ = writeln!(stdout, "{line}").and_then(|_| stdout.flush());
    });
    if report.results.is_empty() {
        bail!(
            "no case name contains `{}`",
            a.filter.as_deref().unwrap_or("")
        );
    }
    println!(
        "{name}: {} cases: {} passed, {} failed, {} unsupported{}",
        report.results.len(),
        report.passed(),
        report.failed(),
        report.unsupported(),
        if report.failed() > 0 {
            " (rerun one case: --filter '<case>')"
        } else {
            ""
        }
    );
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.failed() > 0 { 1 } else { 0 })
}

fn threshold_text(t: f64) -> String {
    if t == 0.0 {
        "bit-exact".to_string()
    } else {
        format!("{t:.0e}")
    }
}
