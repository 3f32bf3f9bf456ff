//! `e4m3 bench`: prefill and greedy decode of a fixed prompt, tok/s, inter-token latency, peak memory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use e4m3_core::backend::{Batch, LogitsFor};
use e4m3_core::sampling::argmax;
use e4m3_core::tokenizer::Tokenizer;

use crate::{load_model, load_runner, open_backend, BackendKind, KvDtypeArg};

const TEXT: &str = "The history of the printing press begins in the fifteenth century, when movable metal type \
made it possible to copy books quickly and cheaply. Within a few decades printers worked in most of the large \
cities of Europe, and the number of books in circulation grew from thousands to millions. ";

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Prompt tokens to prefill in one step.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Greedy decode steps after the prefill.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Repetitions; the best prefill and the median decode are reported.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    #[arg(long, value_enum, default_value = "auto")]
    kv_cache_dtype: KvDtypeArg,
    #[arg(long)]
    json: bool,
}

/// Peak resident memory of this process (VmHWM), in bytes, where the OS reports it.
fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn cmd_bench(a: BenchArgs) -> Result<()> {
    if a.prompt_len == 0 {
        anyhow::bail!("--prompt-len must be at least 1");
    }
    let tok = Tokenizer::from_dir(&a.model)?;
    let mut ids = tok.encode_prompt(TEXT)?;
    while ids.len() < a.prompt_len {
        let more = tok.encode(TEXT, false)?;
        ids.extend(more);
    }
    ids.truncate(a.prompt_len);
    let model = load_model(&a.model)?;
    let backend = open_backend(a.backend)?;
    let max_len = a.prompt_len + a.decode + 1;
    if max_len > model.config.max_position_embeddings {
        anyhow::bail!(
            "--prompt-len {} + --decode {} exceeds the model's maximum length {}",
            a.prompt_len,
            a.decode,
            model.config.max_position_embeddings
        );
    }
    let mut runner = load_runner(backend.as_ref(), &model, max_len, a.kv_cache_dtype)?;
    let mut prefill = Vec::new();
    let mut itl: Vec<f64> = Vec::new();
    let mut decode_totals = Vec::new();
    for _ in 0..a.runs.max(1) {
        let t = Instant::now();
        let out = runner.step(&Batch::single(0, 0, ids.clone(), LogitsFor::Last), &[])?;
        let mut next = argmax(out.logits.row(0));
        prefill.push(t.elapsed().as_secs_f64());
        let td = Instant::now();
        for i in 0..a.decode {
            let ts = Instant::now();
            let out = runner.step(
                &Batch::single(0, ids.len() + i, vec![next], LogitsFor::Last),
                &[],
            )?;
            next = argmax(out.logits.row(0));
            itl.push(ts.elapsed().as_secs_f64());
        }
        decode_totals.push(td.elapsed().as_secs_f64());
    }
    let best_prefill = prefill.iter().cloned().fold(f64::MAX, f64::min);
    decode_totals.sort_by(|a, b| a.total_cmp(b));
    let decode_secs = decode_totals[decode_totals.len() / 2];
    itl.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        if itl.is_empty() {
            0.0
        } else {
            itl[((itl.len() - 1) as f64 * q).round() as usize]
        }
    };
    let decode_tps = if decode_secs > 0.0 {
        a.decode as f64 / decode_secs
    } else {
        0.0
    };
    let peak = peak_rss_bytes();
    let threads = rayon_threads();
    if a.json {
        let v = serde_json::json!({
            "model": a.model.display().to_string(),
            "backend": backend.name(),
            "threads": threads,
            "prompt_tokens": a.prompt_len,
            "decode_tokens": a.decode,
            "runs": a.runs.max(1),
            "prefill_secs": best_prefill,
            "prefill_tok_per_s": a.prompt_len as f64 / best_prefill,
            "decode_tok_per_s": decode_tps,
            "itl_ms_p50": pct(0.5) * 1e3,
            "itl_ms_p90": pct(0.9) * 1e3,
            "peak_rss_bytes": peak,
        });
        println!("{v}");
    } else {
        println!("backend        {} ({} threads)", backend.name(), threads);
        println!(
            "prefill        {} tokens in {:.3}s = {:.1} tok/s (TTFT {:.0} ms)",
            a.prompt_len,
            best_prefill,
            a.prompt_len as f64 / best_prefill,
            best_prefill * 1e3
        );
        println!(
            "decode         {} tokens in {:.3}s = {:.2} tok/s (ITL p50 {:.1} ms, p90 {:.1} ms)",
            a.decode,
            decode_secs,
            decode_tps,
            pct(0.5) * 1e3,
            pct(0.9) * 1e3
        );
        match peak {
            Some(b) => println!("peak RSS       {:.0} MB", b as f64 / 1e6),
            None => println!("peak RSS       (not reported by this OS)"),
        }
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
