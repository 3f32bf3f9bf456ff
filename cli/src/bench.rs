//! `e4m3 bench`: time to first token per prompt length, decode inter-token latency and throughput per batch
//! size, peak memory, and the bandwidth floor of a batch-1 decode step, for a checkpoint (`--model DIR`) or
//! a synthetic model of a real shape with random weights (`--synthetic NAME --scheme S`).
//!
//! TTFT: one sequence of L prompt tokens prefilled in one step, until its greedy token is known.
//! Decode at batch B: B sequences in B KV-cache slots, each prefilled with `--decode-context` tokens, then
//! `--decode` steps where one batch holds all B sequences (one token each); ITL is the time of one step,
//! throughput B x steps / time. Greedy tokens come from `step_top_k(.., 1)`, so GPU backends copy back
//! only the best id of each row. Each point runs `--warmup` unmeasured then `--runs` measured repetitions;
//! medians are reported.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use e4m3_core::backend::{Backend, Batch, CacheConfig, KvCacheDtype, LogitsFor, Runner, SeqStep};
use e4m3_core::graph::{Op, QuantScheme};
use e4m3_core::model::Model;
use e4m3_core::synthetic::{self, SyntheticScheme};
use e4m3_core::tokenizer::Tokenizer;
use serde_json::{json, Value};

use crate::{load_model, open_backend, resolve_kv, BackendKind, KvDtypeArg};

const TEXT: &str = "The history of the printing press begins in the fifteenth century, when movable metal type \
made it possible to copy books quickly and cheaply. Within a few decades printers worked in most of the large \
cities of Europe, and the number of books in circulation grew from thousands to millions. ";

/// Most sequences one decode step of the benchmark holds.
pub const MAX_BATCH: usize = 256;
/// Most prompt tokens one prefill step of the decode setup holds.
const PREFILL_CHUNK_TOKENS: usize = 4096;
/// Bytes of the device copy that measures bandwidth.
const COPY_BYTES: usize = 1 << 30;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A checkpoint directory (BF16 or FP8).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A model of real shapes with random weights, built in memory: tiny, gemma-3-270m, gemma-3-1b,
    /// gemma-3-4b, gemma-3-12b, gemma-3-27b, gemma-4-tiny, gemma-4-e2b, gemma-4-12b, gemma-4-26b-a4b,
    /// gemma-4-31b.
    #[arg(long)]
    synthetic: Option<String>,
    /// Weights of the synthetic model: bf16, fp8-static, fp8-dynamic, fp8-block-wo, fp8-block.
    #[arg(long)]
    scheme: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Prompt lengths whose time to first token is measured.
    #[arg(
        long = "prompt-lens",
        alias = "prompt-len",
        value_delimiter = ',',
        default_value = "128,1024"
    )]
    prompt_lens: Vec<usize>,
    /// Batch sizes (sequences per decode step) whose decode speed is measured.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    batches: Vec<usize>,
    /// Decode steps per repetition.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Prompt tokens of each decoding sequence (default: the shortest --prompt-lens).
    #[arg(long)]
    decode_context: Option<usize>,
    /// Measured repetitions of every point (the median is reported).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Unmeasured repetitions before the measured ones at every point.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, value_enum, default_value = "auto")]
    kv_cache_dtype: KvDtypeArg,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also write the JSON object to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Peak resident memory of this process (VmHWM), in bytes, where the OS reports it.
fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

/// Nearest-rank percentile `q` in [0, 1].
fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// Bytes in the largest unit that keeps the number at least 1.
fn human(b: f64) -> String {
    let (v, u) = match b.abs() {
        x if x >= 1e12 => (b / 1e12, "TB"),
        x if x >= 1e9 => (b / 1e9, "GB"),
        x if x >= 1e6 => (b / 1e6, "MB"),
        x if x >= 1e3 => (b / 1e3, "kB"),
        _ => (b, "B"),
    };
    format!("{v:.1} {u}")
}

/// Bytes of one KV-cache value as the backend stores it.
fn kv_value_bytes(kv: KvCacheDtype) -> usize {
    match kv {
        // Every backend keeps the cache in f32 at its own precision.
        KvCacheDtype::Auto => 4,
        KvCacheDtype::Bf16 => 2,
        KvCacheDtype::Fp8 => 1,
    }
}

/// What one batch-1 decode step must read from memory, counted from the graph and its weights.
struct StepBytes {
    /// Every Linear's weight and scale tensors (lm_head included, once even when tied).
    linears: usize,
    /// One row of the embedding table.
    embed_row: usize,
    /// RMSNorm weights.
    norms: usize,
    /// Keys and values attended at `context` cached positions (sliding windows honoured).
    kv: usize,
    context: usize,
}

impl StepBytes {
    fn total(&self) -> usize {
        self.linears + self.embed_row + self.norms + self.kv
    }
}

fn step_bytes(model: &Model, kv: KvCacheDtype, context: usize) -> StepBytes {
    let w = &model.weights;
    let size = |n: &str| w.get(n).map_or(0, |t| t.bytes().len());
    let (mut linears, mut embed_row, mut norms) = (0, 0, 0);
    for node in &model.graph.nodes {
        match &node.op {
            Op::Linear { weight, scheme } => {
                linears += size(weight);
                linears += scheme
                    .scale_tensors()
                    .iter()
                    .map(|s| size(s))
                    .sum::<usize>();
            }
            Op::Embed { table, .. } => {
                if let Some(t) = w.get(table) {
                    embed_row += t.bytes().len() / t.shape[0].max(1);
                }
            }
            Op::RmsNorm {
                weight: Some(n), ..
            } => norms += size(n),
            _ => {}
        }
    }
    let per = kv_value_bytes(kv);
    let kv_bytes = model
        .graph
        .cache_layers
        .iter()
        .map(|l| {
            let positions = l.window.map_or(context, |win| win.min(context));
            positions * l.n_kv_heads * l.head_dim * 2 * per
        })
        .sum();
    StepBytes {
        linears,
        embed_row,
        norms,
        kv: kv_bytes,
        context,
    }
}

/// The scheme label of a loaded checkpoint: the dtype of a dense model, the FP8 scheme of its layers.
fn scheme_label(model: &Model) -> String {
    let layer_schemes: Vec<&QuantScheme> = model
        .linear_schemes
        .iter()
        .filter(|(m, _)| m.as_str() != "lm_head")
        .map(|(_, s)| s)
        .collect();
    match layer_schemes.first() {
        Some(first) if layer_schemes.iter().all(|s| s.name() == first.name()) => {
            if **first == QuantScheme::Dense {
                model
                    .weights
                    .get("layers.0.self_attn.q_proj.weight")
                    .map_or("dense".to_string(), |w| w.dtype.to_string().to_lowercase())
            } else {
                first.name().to_string()
            }
        }
        Some(_) => "mixed".to_string(),
        None => "dense".to_string(),
    }
}

/// The prompt token stream: the tokenizer's ids of a fixed English text for a checkpoint that has one,
/// otherwise fixed pseudo-random ids (BOS first).
fn token_stream(
    model: &Model,
    dir: Option<&PathBuf>,
    len: usize,
) -> Result<(Vec<u32>, &'static str)> {
    if let Some(dir) = dir {
        if dir.join("tokenizer.json").is_file() {
            let tok = Tokenizer::from_dir(dir)?;
            let mut ids = tok.encode_prompt(TEXT)?;
            while ids.len() < len {
                ids.extend(tok.encode(TEXT, false)?);
            }
            ids.truncate(len);
            return Ok((ids, "text"));
        }
    }
    let ids = synthetic::prompt_ids(model.config.vocab_size, len, 1);
    Ok((ids, "random ids"))
}

struct Plan {
    prompt_lens: Vec<usize>,
    batches: Vec<usize>,
    context: usize,
}

fn check_args(a: &BenchArgs) -> Result<Plan> {
    match (&a.model, &a.synthetic) {
        (Some(_), Some(_)) => bail!(
            "give either --model DIR or --synthetic NAME, not both (a checkpoint or a model of random weights)"
        ),
        (None, None) => bail!("give --model DIR (a checkpoint) or --synthetic NAME (random weights of a real shape: {})", synthetic::NAMES.join(", ")),
        (Some(_), None) if a.scheme.is_some() => bail!(
            "--scheme applies to --synthetic models; a checkpoint's scheme is read from its config"
        ),
        _ => {}
    }
    let mut prompt_lens = a.prompt_lens.clone();
    let mut batches = a.batches.clone();
    if prompt_lens.is_empty() || prompt_lens.contains(&0) {
        bail!("--prompt-lens: every prompt length must be at least 1");
    }
    if batches.is_empty() || batches.contains(&0) {
        bail!("--batches: every batch size must be at least 1");
    }
    if let Some(&b) = batches.iter().find(|&&b| b > MAX_BATCH) {
        bail!("--batches {b}: at most {MAX_BATCH} sequences per decode step");
    }
    if a.decode == 0 {
        bail!("--decode must be at least 1");
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    prompt_lens.sort();
    prompt_lens.dedup();
    batches.sort();
    batches.dedup();
    let context = a.decode_context.unwrap_or(prompt_lens[0]);
    if context == 0 {
        bail!("--decode-context must be at least 1");
    }
    Ok(Plan {
        prompt_lens,
        batches,
        context,
    })
}

struct Prefill {
    prompt_len: usize,
    ttft: Vec<f64>,
}

struct Decode {
    batch: usize,
    itl: Vec<f64>,
    totals: Vec<f64>,
}

/// Greedy ids of a step's rows; counts rows whose best logit is missing or not finite.
fn greedy(rows: Vec<Vec<(u32, f32)>>, nonfinite: &mut usize) -> Vec<u32> {
    rows.into_iter()
        .map(|r| match r.first() {
            Some(&(id, v)) if v.is_finite() => id,
            Some(&(id, _)) => {
                *nonfinite += 1;
                id
            }
            None => {
                *nonfinite += 1;
                0
            }
        })
        .collect()
}

fn load(
    backend: &dyn Backend,
    model: &Model,
    kv: KvCacheDtype,
    slots: usize,
    max_len: usize,
) -> Result<(Box<dyn Runner>, f64)> {
    let t = Instant::now();
    let cache = CacheConfig::new(slots, max_len).with_kv_dtype(kv);
    let r = backend
        .load(&model.graph, &model.weights, cache)
        .with_context(|| format!("loading the model into the {} backend", backend.name()))?;
    Ok((r, t.elapsed().as_secs_f64()))
}

pub fn cmd_bench(a: BenchArgs) -> Result<()> {
    let plan = check_args(&a)?;
    let scheme = match (&a.synthetic, &a.scheme) {
        (Some(_), Some(s)) => Some(s.parse::<SyntheticScheme>()?),
        (Some(_), None) => Some(SyntheticScheme::Bf16),
        _ => None,
    };
    // Shapes first (cheap), so that bad lengths are reported before any weight is made or read.
    let config = match &a.synthetic {
        Some(name) => synthetic::config(name)?,
        None => {
            let dir = a.model.as_ref().expect("checked");
            e4m3_core::config::Gemma3Config::from_file(&dir.join("config.json"))?
        }
    };
    let limit = config.max_position_embeddings;
    let longest = *plan.prompt_lens.last().expect("non-empty");
    if longest > limit {
        bail!("--prompt-lens {longest}: longer than the model's maximum length (max_position_embeddings) {limit}");
    }
    if plan.context + a.decode > limit {
        bail!(
            "--decode-context {} + --decode {} = {} tokens: longer than the model's maximum length (max_position_embeddings) {limit}",
            plan.context,
            a.decode,
            plan.context + a.decode
        );
    }

    let backend = open_backend(a.backend)?;
    let t = Instant::now();
    let (model, source, name, label) = match (&a.synthetic, scheme) {
        (Some(name), Some(s)) => {
            let need = synthetic::min_weight_bytes(name, s)?;
            if let Some(total) = e4m3_core::kv_pages::system_memory() {
                if need > total {
                    bail!(
                        "--synthetic {name} ({}) needs at least {:.1} GiB for its weights; this machine has {:.1} GiB of memory",
                        s.name(),
                        need as f64 / (1u64 << 30) as f64,
                        total as f64 / (1u64 << 30) as f64
                    );
                }
            }
            eprintln!("building synthetic {name} ({})", s.name());
            let m = synthetic::build(name, s)?;
            (m, "synthetic", name.clone(), s.name().to_string())
        }
        _ => {
            let dir = a.model.as_ref().expect("checked");
            let m = load_model(dir)?;
            let label = scheme_label(&m);
            (m, "checkpoint", dir.display().to_string(), label)
        }
    };
    let model_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "model: {} layers, {} of weights, ready in {:.1}s",
        model.config.num_hidden_layers,
        human(model.weight_bytes() as f64),
        model_secs
    );
    let kv = resolve_kv(&model, a.kv_cache_dtype);
    let max_batch = *plan.batches.last().expect("non-empty");
    let stream_len = longest.max(plan.context + max_batch);
    let (stream, prompt_source) = token_stream(&model, a.model.as_ref(), stream_len)?;
    let reps = a.warmup + a.runs;
    let mut nonfinite = 0usize;

    // TTFT: one slot as long as the longest prompt.
    let (mut runner, load_secs) = load(backend.as_ref(), &model, kv, 1, longest)?;
    let mut prefills = Vec::new();
    for &len in &plan.prompt_lens {
        let mut p = Prefill {
            prompt_len: len,
            ttft: vec![],
        };
        for rep in 0..reps {
            let batch = Batch::single(0, 0, stream[..len].to_vec(), LogitsFor::Last);
            let t = Instant::now();
            let top = runner.step_top_k(&batch, 1)?;
            let secs = t.elapsed().as_secs_f64();
            greedy(top, &mut nonfinite);
            if rep >= a.warmup {
                p.ttft.push(secs);
            }
        }
        eprintln!("prefill {len}: TTFT {:.2} ms", median(&p.ttft) * 1e3);
        prefills.push(p);
    }
    drop(runner);

    // Decode: one slot per sequence of the largest batch, each as long as its context plus the steps.
    let (mut runner, _) = load(
        backend.as_ref(),
        &model,
        kv,
        max_batch,
        plan.context + a.decode,
    )?;
    let mut decodes = Vec::new();
    for &b in &plan.batches {
        let mut d = Decode {
            batch: b,
            itl: vec![],
            totals: vec![],
        };
        for rep in 0..reps {
            // Prefill the B sequences (each its own slice of the stream, BOS first).
            let seqs: Vec<SeqStep> = (0..b)
                .map(|i| {
                    let mut tokens = Vec::with_capacity(plan.context);
                    tokens.push(stream[0]);
                    tokens.extend_from_slice(&stream[1 + i..i + plan.context]);
                    SeqStep {
                        slot: i,
                        start_pos: 0,
                        tokens,
                        logits: LogitsFor::Last,
                    }
                })
                .collect();
            let per_step = (PREFILL_CHUNK_TOKENS / plan.context).max(1);
            let mut next = Vec::with_capacity(b);
            for chunk in seqs.chunks(per_step) {
                let top = runner.step_top_k(
                    &Batch {
                        seqs: chunk.to_vec(),
                    },
                    1,
                )?;
                next.extend(greedy(top, &mut nonfinite));
            }
            let t0 = Instant::now();
            for step in 0..a.decode {
                let batch = Batch {
                    seqs: (0..b)
                        .map(|i| SeqStep {
                            slot: i,
                            start_pos: plan.context + step,
                            tokens: vec![next[i]],
                            logits: LogitsFor::Last,
                        })
                        .collect(),
                };
                let t = Instant::now();
                let top = runner.step_top_k(&batch, 1)?;
                let secs = t.elapsed().as_secs_f64();
                next = greedy(top, &mut nonfinite);
                if rep >= a.warmup {
                    d.itl.push(secs);
                }
            }
            if rep >= a.warmup {
                d.totals.push(t0.elapsed().as_secs_f64());
            }
        }
        eprintln!(
            "decode batch {b}: ITL p50 {:.2} ms, {:.1} tok/s",
            percentile(&d.itl, 0.5) * 1e3,
            (b * a.decode) as f64 / median(&d.totals)
        );
        decodes.push(d);
    }
    let device_memory = backend.memory();
    drop(runner);
    // Measured last, after the memory reading and with the model's buffers freed: the copy's own buffers
    // stay out of the reported peak and find room.
    let copy_bw = backend.copy_bandwidth(COPY_BYTES);
    if nonfinite > 0 {
        eprintln!("warning: {nonfinite} logits rows had no finite maximum (NaN/Inf)");
    }

    // Bandwidth: what a batch-1 step reads, at the mean context of the measured steps.
    let bytes = step_bytes(&model, kv, plan.context + a.decode / 2);
    let itl1 = decodes
        .iter()
        .find(|d| d.batch == 1)
        .map(|d| percentile(&d.itl, 0.5));
    let floor = copy_bw.map(|bw| bytes.total() as f64 / bw);
    let achieved = itl1.map(|t| bytes.total() as f64 / t);
    let ratio = match (itl1, floor) {
        (Some(t), Some(f)) if f > 0.0 => Some(t / f),
        _ => None,
    };
    let peak = peak_rss_bytes();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    let prefill_json: Vec<Value> = prefills
        .iter()
        .map(|p| {
            let m = median(&p.ttft);
            json!({
                "prompt_len": p.prompt_len,
                "ttft_ms": m * 1e3,
                "ttft_ms_min": p.ttft.iter().cloned().fold(f64::INFINITY, f64::min) * 1e3,
                "tok_per_s": p.prompt_len as f64 / m,
            })
        })
        .collect();
    let decode_json: Vec<Value> = decodes
        .iter()
        .map(|d| {
            json!({
                "batch": d.batch,
                "context": plan.context,
                "steps": a.decode,
                "itl_ms_p50": percentile(&d.itl, 0.5) * 1e3,
                "itl_ms_p90": percentile(&d.itl, 0.9) * 1e3,
                "itl_ms_mean": d.itl.iter().sum::<f64>() / d.itl.len() as f64 * 1e3,
                "tok_per_s": (d.batch * a.decode) as f64 / median(&d.totals),
            })
        })
        .collect();
    let report = json!({
        "tool": "e4m3",
        "commit": env!("E4M3_COMMIT"),
        "date": utc_now(),
        "host": host_name(),
        "backend": backend.name(),
        "device": backend.describe(),
        "threads": threads,
        "model": name,
        "source": source,
        "scheme": label,
        "quantization": model.quant.name(),
        "layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "weight_bytes": model.weight_bytes(),
        "kv_cache_dtype": kv.name(),
        "kv_bytes_per_value": kv_value_bytes(kv),
        "prompt_source": prompt_source,
        "runs": a.runs,
        "warmup": a.warmup,
        "decode_steps": a.decode,
        "decode_context": plan.context,
        "model_secs": model_secs,
        "load_secs": load_secs,
        "prefill": prefill_json,
        "decode": decode_json,
        "nonfinite_rows": nonfinite,
        "memory": {
            "peak_rss_bytes": peak,
            "device": device_memory.map(|m| json!({
                "in_use_bytes": m.in_use,
                "peak_bytes": m.peak,
                "total_bytes": m.total,
            })),
        },
        "bandwidth": {
            "copy_bytes_per_s": copy_bw,
            "decode_step_bytes": {
                "linears": bytes.linears,
                "embed_row": bytes.embed_row,
                "norms": bytes.norms,
                "kv_cache": bytes.kv,
                "kv_context": bytes.context,
                "total": bytes.total(),
            },
            "floor_itl_ms": floor.map(|f| f * 1e3),
            "achieved_bytes_per_s": achieved,
            "itl_over_floor": ratio,
        },
    });
    if let Some(path) = &a.out {
        let mut s = serde_json::to_string_pretty(&report)?;
        s.push('\n');
        std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "model      {name} ({source}, {label}), {} layers, {} of weights",
        model.config.num_hidden_layers,
        human(model.weight_bytes() as f64)
    );
    println!(
        "backend    {} ({threads} threads), KV cache {}, commit {}",
        backend.describe(),
        kv.name(),
        env!("E4M3_COMMIT")
    );
    println!(
        "prefill    {:>8} {:>10} {:>10}",
        "prompt", "TTFT ms", "tok/s"
    );
    for p in &prefill_json {
        println!(
            "           {:>8} {:>10.2} {:>10.1}",
            p["prompt_len"].as_u64().unwrap_or(0),
            p["ttft_ms"].as_f64().unwrap_or(f64::NAN),
            p["tok_per_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "decode     {:>8} {:>10} {:>10} {:>10}   (context {}, {} steps)",
        "batch", "ITL p50 ms", "p90 ms", "tok/s", plan.context, a.decode
    );
    for d in &decode_json {
        println!(
            "           {:>8} {:>10.2} {:>10.2} {:>10.1}",
            d["batch"].as_u64().unwrap_or(0),
            d["itl_ms_p50"].as_f64().unwrap_or(f64::NAN),
            d["itl_ms_p90"].as_f64().unwrap_or(f64::NAN),
            d["tok_per_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let mut mem = match peak {
        Some(b) => format!("peak RSS {}", human(b as f64)),
        None => "peak RSS not reported by this OS".to_string(),
    };
    if let Some(m) = device_memory {
        mem += &format!(
            "; device {} in use, {} peak, {} total",
            human(m.in_use as f64),
            human(m.peak as f64),
            human(m.total as f64)
        );
    }
    println!("memory     {mem}");
    let mut bw = format!(
        "batch-1 step reads {} (KV {} at context {})",
        human(bytes.total() as f64),
        human(bytes.kv as f64),
        bytes.context
    );
    match copy_bw {
        Some(c) => bw += &format!("; copy {}/s", human(c)),
        None => bw += "; no device copy bandwidth",
    }
    if let Some(f) = floor {
        bw += &format!("; floor ITL {:.3} ms", f * 1e3);
    }
    if let Some(x) = achieved {
        bw += &format!("; achieved {}/s", human(x));
    }
    if let Some(r) = ratio {
        bw += &format!("; ITL/floor {r:.2}");
    }
    println!("bandwidth  {bw}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.ends_with('Z') && d.as_bytes()[10] == b'T');
        assert!(d.as_str() > "2024-01-01");
    }

    #[test]
    fn step_bytes_of_the_tiny_model() {
        let m = synthetic::build("tiny", SyntheticScheme::Bf16).unwrap();
        let b = step_bytes(&m, KvCacheDtype::Bf16, 20);
        let c = &m.config;
        // Layers: q, k, v, o, gate, up, down in BF16; lm_head is the tied embedding table.
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let per_layer = 2 * (q * h + 2 * kv * h + h * q + 3 * h * i);
        assert_eq!(
            b.linears,
            c.num_hidden_layers * per_layer + 2 * c.vocab_size * h
        );
        assert_eq!(b.embed_row, 2 * h);
        // Two sliding layers see the window (8), two full layers the whole context; k and v, 2 bytes.
        assert_eq!(b.kv, (2 * 8 + 2 * 20) * kv * 2 * 2);
    }
}
