//! `e4m3 eval`: the precision table of the ModelOpt FP8 model card — cosine similarity of the logits and of
//! the last hidden state against a baseline, and the perplexity of both, for batch x sequence configs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use e4m3_core::backend::{Backend, CacheConfig, Runner};
use e4m3_core::eval::{
    compare, runs_by_default, CompareOptions, ConfigResult, EvalConfig, CARD_CONFIGS,
    CPU_DEFAULT_TOKEN_LAYERS, PASS_COSINE,
};
use e4m3_core::model::Model;
use e4m3_core::tokenizer::Tokenizer;

use crate::{load_model, open_backend, BackendKind};

/// Where `scripts/fetch-model.sh` puts the default eval text: Alice's Adventures in Wonderland (39.7k
/// tokens) then As You Like It, public domain, from the Canterbury corpus in the `brotli` sdist on PyPI.
pub const DEFAULT_TEXT: &str = "models/.cache/eval/canterbury-en.txt";

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The checkpoint under test (e.g. an FP8 one).
    #[arg(long)]
    model: PathBuf,
    /// The reference checkpoint (e.g. the BF16 original).
    #[arg(long)]
    baseline: PathBuf,
    /// Plain-text file to evaluate on (default: the text `scripts/fetch-model.sh` fetches).
    #[arg(long, default_value = DEFAULT_TEXT)]
    text: PathBuf,
    /// Comma-separated BATCHxSEQ configs, e.g. 1x128,2x512. Default: the model card's set
    /// (1x128,2x512,4x1024,8x2048,8x100,8x500,8x4000); on the CPU only those with
    /// batch x seq x layers <= 20000.
    #[arg(long)]
    configs: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Tap every node and name the first one (layer, op, tensor) whose value holds NaN or Inf.
    #[arg(long)]
    check_finite: bool,
    /// Most rows (tokens of all sequences together) in one step; bounds the memory of the logits.
    #[arg(long, default_value_t = 512)]
    max_rows: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn fmt_num(x: f64, prec: usize) -> String {
    if x.is_nan() {
        "NaN".into()
    } else {
        format!("{x:.prec$}")
    }
}

fn read_text(path: &Path) -> Result<String> {
    if !path.is_file() {
        if path == Path::new(DEFAULT_TEXT) {
            bail!(
                "eval text {} not found: run scripts/fetch-model.sh (it fetches it) or pass --text FILE",
                path.display()
            );
        }
        bail!("eval text {} not found", path.display());
    }
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("reading eval text {}", path.display()))?;
    Ok(s.replace("\r\n", "\n"))
}

/// The tokenizer of the baseline, else of the model.
fn tokenizer(model: &Path, baseline: &Path) -> Result<Tokenizer> {
    for dir in [baseline, model] {
        if dir.join("tokenizer.json").is_file() {
            return Ok(Tokenizer::from_dir(dir)?);
        }
    }
    bail!(
        "neither {} nor {} has a tokenizer.json",
        baseline.display(),
        model.display()
    )
}

fn runner(backend: &dyn Backend, model: &Model, c: EvalConfig) -> Result<Box<dyn Runner>> {
    backend
        .load(
            &model.graph,
            &model.weights,
            // The KV cache follows the checkpoint: FP8 where it declares an FP8 KV cache.
            CacheConfig::new(c.batch, c.seq).with_kv_dtype(if model.kv_cache_fp8 {
                e4m3_core::backend::KvCacheDtype::Fp8
            } else {
                e4m3_core::backend::KvCacheDtype::Auto
            }),
        )
        .with_context(|| {
            format!(
                "loading {} on the {} backend",
                model.dir.display(),
                backend.name()
            )
        })
}

pub fn cmd_eval(a: EvalArgs) -> Result<()> {
    let text = read_text(&a.text)?;
    let tok = tokenizer(&a.model, &a.baseline)?;
    let bos = if tok.add_bos_token() {
        tok.bos_id()
    } else {
        None
    };
    let ids = tok.encode(&text, false)?;
    let model = load_model(&a.model)?;
    let base = load_model(&a.baseline)?;
    if model.config.vocab_size != base.config.vocab_size {
        bail!(
            "the model has a vocabulary of {} and the baseline of {}",
            model.config.vocab_size,
            base.config.vocab_size
        );
    }
    let backend = open_backend(a.backend)?;
    let cpu = backend.name() == "cpu";
    let layers = model.config.num_hidden_layers;
    let configs: Vec<EvalConfig> = match &a.configs {
        Some(s) => {
            let v = EvalConfig::parse_list(s)?;
            if v.is_empty() {
                bail!("--configs is empty");
            }
            v
        }
        None => CARD_CONFIGS
            .iter()
            .copied()
            .filter(|c| runs_by_default(*c, layers, cpu))
            .collect(),
    };
    let skipped: Vec<String> = if a.configs.is_none() {
        CARD_CONFIGS
            .iter()
            .filter(|c| !configs.contains(c))
            .map(|c| c.to_string())
            .collect()
    } else {
        vec![]
    };
    if !skipped.is_empty() && !a.json {
        eprintln!(
            "on the CPU only configs with batch x seq x {layers} layers <= {CPU_DEFAULT_TOKEN_LAYERS} run by default; skipped {} (ask with --configs)",
            skipped.join(",")
        );
    }
    let max_len = model
        .config
        .max_position_embeddings
        .min(base.config.max_position_embeddings);
    for c in &configs {
        let need = c.text_tokens_needed(bos.is_some());
        if ids.len() < need {
            bail!(
                "eval text {} has {} tokens; config {c} needs {need} ({} sequences of {}{} text tokens)",
                a.text.display(),
                ids.len(),
                c.batch,
                c.seq - usize::from(bos.is_some()),
                if bos.is_some() { " + BOS" } else { "" }
            );
        }
        if c.seq > max_len {
            bail!("config {c}: sequences of {} tokens are longer than the models' maximum length {max_len}", c.seq);
        }
    }
    let opts = CompareOptions {
        bos,
        max_rows: a.max_rows.max(1),
        check_finite: a.check_finite.then_some([&model, &base]),
    };
    let t0 = Instant::now();
    let mut results: Vec<ConfigResult> = Vec::new();
    for &c in &configs {
        let mut ra = runner(backend.as_ref(), &model, c)?;
        let mut rb = runner(backend.as_ref(), &base, c)?;
        let r = compare(ra.as_mut(), rb.as_mut(), &ids, c, &opts)?;
        if !a.json {
            eprintln!("{c}: {:.1}s", r.secs);
        }
        results.push(r);
    }
    let failed = results.iter().filter(|r| !r.pass).count();
    if a.json {
        let v = serde_json::json!({
            "model": a.model.display().to_string(),
            "baseline": a.baseline.display().to_string(),
            "text": a.text.display().to_string(),
            "text_tokens": ids.len(),
            "bos": bos,
            "backend": backend.name(),
            "threshold": PASS_COSINE,
            "check_finite": a.check_finite,
            "skipped_configs": skipped,
            "configs": results,
            "pass": failed == 0,
            "secs": t0.elapsed().as_secs_f64(),
        });
        println!("{v}");
    } else {
        println!(
            "model {}  baseline {}  text {} ({} tokens)  backend {}",
            a.model.display(),
            a.baseline.display(),
            a.text.display(),
            ids.len(),
            backend.name()
        );
        println!(
            "{:<8} {:>12} {:>12} {:>12} {:>12} {:>11} {:>11} {:>7} {:>8}",
            "config",
            "cos_logits",
            "min",
            "cos_hidden",
            "min",
            "ppl_model",
            "ppl_base",
            "result",
            "secs"
        );
        for r in &results {
            println!(
                "{:<8} {:>12} {:>12} {:>12} {:>12} {:>11} {:>11} {:>7} {:>8.1}",
                r.config,
                fmt_num(r.cos_logits_mean, 6),
                fmt_num(r.cos_logits_min, 6),
                fmt_num(r.cos_hidden_mean, 6),
                fmt_num(r.cos_hidden_min, 6),
                fmt_num(r.ppl_model, 3),
                fmt_num(r.ppl_baseline, 3),
                if r.pass { "PASS" } else { "FAIL" },
                r.secs
            );
            if let Some(n) = &r.nonfinite_model {
                println!("         model: {n}");
            }
            if let Some(n) = &r.nonfinite_baseline {
                println!("         baseline: {n}");
            }
        }
        println!("PASS = mean logits and mean hidden-state cosine both >= {PASS_COSINE}");
    }
    if failed > 0 {
        bail!("{failed} of {} configs failed", results.len());
    }
    Ok(())
}
