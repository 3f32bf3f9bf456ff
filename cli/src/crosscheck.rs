//! `e4m3 crosscheck`: two backends on the same tokens, compared tap by tap (each layer's attn_out,
//! mlp_out, residual, then the logits): NMSE, max|diff|, cosine; the first tap past its threshold and the
//! first NaN/Inf are reported, and the command fails when any tap does. `--plot FILE.png` draws the
//! same numbers as a heatmap (layers x tap kinds, plus the logits; see `plot.rs`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use e4m3_core::backend::{Batch, CacheConfig, LogitsFor};
use e4m3_core::tensor::Mat;

use crate::plot::{Cell, Heatmap};
use crate::{load_model, open_backend, BackendKind};
use e4m3_core::graph::QuantScheme;

#[derive(clap::Args)]
pub struct CrosscheckArgs {
    #[arg(long)]
    model: PathBuf,
    /// Two backends, comma separated: the one under test, then the reference (e.g. wgpu,cpu).
    #[arg(long, default_value = "wgpu,cpu")]
    backends: String,
    /// Prompt text (tokenized with the checkpoint's tokenizer).
    #[arg(long, conflicts_with = "tokens")]
    prompt: Option<String>,
    /// Use N fixed token ids instead of a prompt.
    #[arg(long)]
    tokens: Option<usize>,
    /// NMSE threshold of every tap. Default 1e-3; 2e-2 (about cosine 0.99) when the model quantizes
    /// activations to FP8 (fp8-static/-dynamic/-block): there a last-bit difference between backends moves a
    /// dynamic scale or flips an activation code, and the flip travels through the later layers, so the
    /// end-to-end check is a closeness check and exactness is proven op by op (conformance suite).
    #[arg(long)]
    threshold: Option<f64>,
    #[arg(long)]
    json: bool,
    /// Also draw the per-layer NMSE as a heatmap PNG (rows: layers, columns: attn_out, mlp_out,
    /// residual; the logits as a last row; colour log10(NMSE) from -12 to 0; taps past the threshold
    /// outlined red).
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
}

/// The tap kinds of every layer, in order, with their column labels in the plot.
const TAP_KINDS: [(&str, &str); 3] = [
    ("attn_out", "ATTN"),
    ("mlp_out", "MLP"),
    ("residual", "RES"),
];

fn parse_kind(s: &str) -> Result<BackendKind> {
    Ok(match s.trim() {
        "cpu" => BackendKind::Cpu,
        "wgpu" => BackendKind::Wgpu,
        "cuda" => BackendKind::Cuda,
        "auto" => BackendKind::Auto,
        o => bail!("unknown backend `{o}` (cpu, wgpu, cuda, auto)"),
    })
}

struct Stat {
    nmse: f64,
    max_diff: f64,
    cosine: f64,
    non_finite: Option<String>,
}

fn stats(a: &Mat, b: &Mat) -> Stat {
    let (mut num, mut den, mut dot, mut na, mut nb, mut md) = (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
    let mut non_finite = None;
    for (i, (&x, &y)) in a.data.iter().zip(&b.data).enumerate() {
        if !x.is_finite() || !y.is_finite() {
            if non_finite.is_none() {
                non_finite = Some(format!(
                    "row {} col {}: {x} vs {y}",
                    i / a.cols.max(1),
                    i % a.cols.max(1)
                ));
            }
            continue;
        }
        let (x, y) = (x as f64, y as f64);
        num += (x - y) * (x - y);
        den += y * y;
        dot += x * y;
        na += x * x;
        nb += y * y;
        md = md.max((x - y).abs());
    }
    Stat {
        nmse: if den > 0.0 { num / den } else { num },
        max_diff: md,
        cosine: if na > 0.0 && nb > 0.0 {
            dot / (na.sqrt() * nb.sqrt())
        } else {
            1.0
        },
        non_finite,
    }
}

fn cell(s: Option<&Stat>) -> Cell {
    match s {
        None => Cell::Missing,
        Some(s) => Cell::Value {
            nmse: s.nmse,
            non_finite: s.non_finite.is_some(),
        },
    }
}

/// Rows of (tap name, stats) as a heatmap: one row per layer, one column per tap kind.
fn heatmap(rows: &[(String, Stat)], n_layers: usize, threshold: f64) -> Heatmap {
    let find = |name: &str| rows.iter().find(|(n, _)| n == name).map(|(_, s)| s);
    Heatmap {
        columns: TAP_KINDS.iter().map(|(_, l)| l.to_string()).collect(),
        rows: (0..n_layers)
            .map(|l| {
                let cells = TAP_KINDS
                    .iter()
                    .map(|(t, _)| cell(find(&format!("layers.{l}.{t}"))))
                    .collect();
                (l.to_string(), cells)
            })
            .collect(),
        logits: cell(find("logits")),
        threshold,
    }
}

pub fn cmd_crosscheck(a: CrosscheckArgs) -> Result<()> {
    let kinds: Vec<&str> = a.backends.split(',').collect();
    if kinds.len() != 2 {
        bail!("--backends takes two backends, e.g. wgpu,cpu");
    }
    let model = load_model(&a.model)?;
    let ids: Vec<u32> = match (&a.prompt, a.tokens) {
        (Some(p), _) => {
            let tok = e4m3_core::tokenizer::Tokenizer::from_dir(&a.model)?;
            tok.encode_prompt(p)?
        }
        (None, n) => {
            let n = n.unwrap_or(16).max(1);
            let v = model.graph.vocab_size as u64;
            (0..n as u64).map(|i| ((i * 7919 + 2) % v) as u32).collect()
        }
    };
    let quantizes_activations = model.linear_schemes.values().any(|s| {
        matches!(
            s,
            QuantScheme::Fp8Static { .. }
                | QuantScheme::Fp8Dynamic { .. }
                | QuantScheme::Fp8Block { .. }
        )
    });
    let threshold = a
        .threshold
        .unwrap_or(if quantizes_activations { 2e-2 } else { 1e-3 });
    let n_layers = model.graph.cache_layers.len();
    let mut taps = Vec::new();
    for l in 0..n_layers {
        for (t, _) in TAP_KINDS {
            let name = format!("layers.{l}.{t}");
            if model.graph.find(&name).is_some() {
                taps.push(name);
            }
        }
    }
    let mut outs = Vec::new();
    for k in &kinds {
        let backend = open_backend(parse_kind(k)?)?;
        let mut runner =
            backend.load(&model.graph, &model.weights, CacheConfig::new(1, ids.len()))?;
        let out = runner.step(&Batch::single(0, 0, ids.clone(), LogitsFor::All), &taps)?;
        outs.push((backend.name(), out));
    }
    let (ta, tb) = (&outs[0].1, &outs[1].1);
    let mut rows = Vec::new();
    for name in taps.iter().map(String::as_str).chain(["logits"]) {
        let (x, y) = if name == "logits" {
            (&ta.logits, &tb.logits)
        } else {
            (&ta.taps[name], &tb.taps[name])
        };
        rows.push((name.to_string(), stats(x, y)));
    }
    let first_bad = rows
        .iter()
        .position(|(_, s)| s.nmse.is_nan() || s.nmse > threshold);
    let first_nan = rows.iter().position(|(_, s)| s.non_finite.is_some());
    if let Some(path) = &a.plot {
        let m = heatmap(&rows, n_layers, threshold);
        crate::plot::write_png(path, &crate::plot::render(&m))?;
        eprintln!("heatmap written to {}", path.display());
    }
    if a.json {
        let v = serde_json::json!({
            "backends": [outs[0].0, outs[1].0],
            "tokens": ids.len(),
            "threshold": threshold,
            "taps": rows.iter().map(|(n, s)| serde_json::json!({
                "tap": n, "nmse": s.nmse, "max_abs_diff": s.max_diff, "cosine": s.cosine,
                "non_finite": s.non_finite,
            })).collect::<Vec<_>>(),
            "first_over_threshold": first_bad.map(|i| rows[i].0.clone()),
            "first_non_finite": first_nan.map(|i| rows[i].0.clone()),
        });
        println!("{v}");
    } else {
        println!(
            "crosscheck {} vs {} on {} tokens (threshold NMSE {:.0e})",
            outs[0].0,
            outs[1].0,
            ids.len(),
            threshold
        );
        println!(
            "{:<22} {:>11} {:>11} {:>12}",
            "tap", "nmse", "max|diff|", "cosine"
        );
        for (i, (n, s)) in rows.iter().enumerate() {
            let mark = if Some(i) == first_bad {
                "  <- first over threshold"
            } else {
                ""
            };
            println!(
                "{n:<22} {:>11.3e} {:>11.3e} {:>12.9}{mark}",
                s.nmse, s.max_diff, s.cosine
            );
        }
        match first_nan {
            Some(i) => println!(
                "first NaN/Inf: {} ({})",
                rows[i].0,
                rows[i].1.non_finite.as_deref().unwrap_or("")
            ),
            None => println!("no NaN/Inf"),
        }
    }
    if let Some(i) = first_bad {
        bail!(
            "tap `{}` differs: NMSE {:.3e} > {:.0e}",
            rows[i].0,
            rows[i].1.nmse,
            threshold
        );
    }
    if let Some(i) = first_nan {
        bail!("tap `{}` holds NaN/Inf", rows[i].0);
    }
    Ok(())
}

/// `e4m3 devices`: every backend and adapter with its key limits.
pub fn cmd_devices() -> Result<()> {
    println!(
        "cpu: available ({} threads)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    match e4m3_backend_cuda::devices() {
        Ok(list) if !list.is_empty() => {
            for d in list {
                println!(
                    "cuda[{}]: {} (compute {}.{}, {}), {} MiB, {} SMs",
                    d.ordinal,
                    d.name,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.arch,
                    d.memory_bytes >> 20,
                    d.multiprocessors
                );
            }
            match e4m3_backend_cuda::open_cuda(0) {
                Ok(b) => println!("cuda: available: {}", b.describe()),
                Err(e) => println!("cuda: {e}"),
            }
        }
        Ok(_) => println!("cuda: no CUDA device found"),
        Err(e) => println!("cuda: {e}"),
    }
    let list = e4m3_backend_wgpu::adapters();
    if list.is_empty() {
        println!("wgpu: no adapter found");
    }
    for (i, a) in list.iter().enumerate() {
        println!(
            "wgpu[{i}]: {} ({}, {}{}) driver {}: max storage binding {} MiB, max buffer {} MiB, {} invocations/workgroup, {} KiB workgroup memory, shader-f16 {}, subgroups {}",
            a.name,
            a.backend,
            a.device_type,
            if a.is_cpu { ", software: not chosen by --backend auto" } else { "" },
            a.driver,
            a.max_storage_buffer_binding_size >> 20,
            a.max_buffer_size >> 20,
            a.max_compute_invocations_per_workgroup,
            a.max_compute_workgroup_storage_size >> 10,
            if a.shader_f16 { "yes" } else { "no" },
            if a.subgroups { "yes" } else { "no" },
        );
    }
    Ok(())
}
