//! `e4m3`: run, inspect and benchmark Gemma checkpoints.

mod bench;
mod conformance;
mod crosscheck;
mod eval;
mod media;
mod plot;
mod quantize;
mod serve;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use e4m3_core::backend::{Backend, CacheConfig, KvCacheDtype, Runner, StepInputs};
use e4m3_core::chat::{render_chat_with, ChatMessage, ChatOptions};
use e4m3_core::chat_parse::{is_gemma4_template, prompt_opens_thought, Gemma4Parser, ParsedDelta};
use e4m3_core::cpu::CpuBackend;
use e4m3_core::generate::{generate_with_inputs, prompt_logits, top_k, GenerateRequest};
use e4m3_core::generation_config::GenerationConfig;
use e4m3_core::import_gguf::{import_gguf, ImportOptions};
use e4m3_core::model::Model;
use e4m3_core::multimodal::{ImageEncoder, ImagePromptError};
use e4m3_core::sampling::SamplingParams;
use e4m3_core::tensor::DType;
use e4m3_core::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "e4m3",
    version,
    about = "Run Gemma models from FP8 and BF16 checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum BackendKind {
    Auto,
    Cpu,
    Wgpu,
    Cuda,
}

/// `--kv-cache-dtype`, as vLLM names it.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum KvDtypeArg {
    Auto,
    Bf16,
    Fp8,
}

impl KvDtypeArg {
    pub fn resolve(self) -> KvCacheDtype {
        match self {
            KvDtypeArg::Auto => KvCacheDtype::Auto,
            KvDtypeArg::Bf16 => KvCacheDtype::Bf16,
            KvDtypeArg::Fp8 => KvCacheDtype::Fp8,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OutDType {
    Bf16,
    F32,
}

#[derive(clap::Args)]
struct SamplingArgs {
    /// Sampling temperature (0 = greedy). Default: generation_config.json.
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep the K most likely tokens (0 = off). Default: generation_config.json.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling mass. Default: generation_config.json.
    #[arg(long)]
    top_p: Option<f32>,
    /// Drop tokens below min_p times the top probability. Default: generation_config.json.
    #[arg(long)]
    min_p: Option<f32>,
    /// Seed of the sampler (random if absent).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt (streamed as it is generated).
    Run {
        #[arg(long)]
        model: PathBuf,
        /// Raw prompt (BOS added as the tokenizer config says).
        #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
        prompt: Option<String>,
        /// A user message, rendered with the checkpoint's chat template.
        #[arg(long)]
        chat: Option<String>,
        /// System message for --chat.
        #[arg(long, requires = "chat")]
        system: Option<String>,
        /// Ask the model to think first (`enable_thinking` for the chat template). With a Gemma 4
        /// template the thought channel is printed apart, dimmed, on stderr.
        #[arg(long, requires = "chat")]
        enable_thinking: bool,
        /// An image (PNG, JPEG, WebP) for a Gemma 3 or Gemma 4 multimodal checkpoint; repeatable. With --chat
        /// the images come before the text; with --prompt each needs a marker in the prompt
        /// (`<start_of_image>` for Gemma 3, `<|image|>` for Gemma 4).
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendKind,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// KV cache element type (auto: the backend's precision; fp8: E4M3 with the checkpoint's k/v scales).
        #[arg(long, value_enum, default_value = "auto")]
        kv_cache_dtype: KvDtypeArg,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print timing figures to stderr.
        #[arg(long)]
        stats: bool,
        /// Print one JSON object (prompt ids, generated ids, text) instead of streaming text.
        #[arg(long)]
        json: bool,
        /// With --json: the top K (id, logit) of every generated step.
        #[arg(long, default_value_t = 0, requires = "json")]
        top_logits: usize,
    },
    /// Top-K raw logits at every prompt position (teacher forcing).
    Logits {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 5)]
        top: usize,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendKind,
        #[arg(long, value_enum, default_value = "auto")]
        kv_cache_dtype: KvDtypeArg,
        #[arg(long)]
        json: bool,
    },
    /// Architecture, layer types, heads, quantization and bytes of a checkpoint.
    Info {
        #[arg(long)]
        model: PathBuf,
    },
    /// Convert a GGUF file to an HF-layout checkpoint (config.json, model.safetensors, tokenizer files).
    ImportGguf {
        gguf: PathBuf,
        /// Directory with tokenizer.json and tokenizer_config.json.
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: OutDType,
    },
    /// Time to first token, decode latency and throughput per batch size, memory and bandwidth, for a
    /// checkpoint or a synthetic model of a real shape.
    Bench(bench::BenchArgs),
    /// Write an FP8 (E4M3) checkpoint (ModelOpt, compressed-tensors or FineGrainedFP8 format).
    Quantize(quantize::QuantizeArgs),
    /// Precision against a baseline: cosine of logits and hidden state, perplexity, per batch x seq config.
    Eval(eval::EvalArgs),
    /// Every backend and adapter with its key limits.
    Devices,
    /// Run two backends on the same tokens and compare every layer's taps and the logits.
    Crosscheck(crosscheck::CrosscheckArgs),
    /// The op-by-op conformance suite on one backend against the CPU reference (exit 1 when a case
    /// fails, 2 when the backend is not available).
    Conformance(conformance::ConformanceArgs),
    /// An OpenAI-compatible HTTP server (chat completions, completions, models, health, metrics).
    Serve(serve::ServeArgs),
}

fn main() {
    // Mesa's Vulkan drivers print "XDG_RUNTIME_DIR is invalid" as an error when it is unset (headless
    // machines); point it at the temp dir before any thread or GPU instance exists.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run {
            model,
            prompt,
            chat,
            system,
            enable_thinking,
            images,
            backend,
            max_tokens,
            kv_cache_dtype,
            sampling,
            stats,
            json,
            top_logits,
        } => {
            let input = match (prompt, chat) {
                (Some(p), _) => PromptInput::Raw(p),
                (None, Some(c)) => PromptInput::Chat {
                    system,
                    user: c,
                    enable_thinking,
                },
                (None, None) => bail!("give --prompt or --chat"),
            };
            let opts = RunOpts {
                backend,
                max_tokens,
                kv: kv_cache_dtype,
                stats,
                json,
                top_logits,
                images,
            };
            cmd_run(&model, input, &sampling, &opts)
        }
        Cmd::Logits {
            model,
            prompt,
            top,
            backend,
            kv_cache_dtype,
            json,
        } => cmd_logits(&model, &prompt, top, backend, kv_cache_dtype, json),
        Cmd::Info { model } => cmd_info(&model),
        Cmd::ImportGguf {
            gguf,
            tokenizer,
            out,
            dtype,
        } => {
            let dtype = match dtype {
                OutDType::Bf16 => DType::BF16,
                OutDType::F32 => DType::F32,
            };
            let t = Instant::now();
            let report = import_gguf(
                &gguf,
                &tokenizer,
                &out,
                &ImportOptions {
                    dtype,
                    progress: true,
                },
            )?;
            let types: Vec<String> = report
                .source_types
                .iter()
                .map(|(t, n)| format!("{n} {t}"))
                .collect();
            eprintln!(
                "imported {} ({} tensors: {}) to {} ({:.0} MB) in {:.1}s",
                gguf.display(),
                report.tensors,
                types.join(", "),
                report.safetensors_path.display(),
                report.bytes_written as f64 / 1e6,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Bench(args) => bench::cmd_bench(args),
        Cmd::Quantize(args) => quantize::cmd_quantize(args),
        Cmd::Eval(args) => eval::cmd_eval(args),
        Cmd::Devices => crosscheck::cmd_devices(),
        Cmd::Crosscheck(args) => crosscheck::cmd_crosscheck(args),
        Cmd::Serve(args) => serve::cmd_serve(args),
        Cmd::Conformance(args) => {
            let code = conformance::cmd_conformance(args)?;
            if code != 0 {
                std::io::stdout().flush()?;
                std::process::exit(code);
            }
            Ok(())
        }
    }
}

/// Pick the backend: `auto` prefers CUDA, then a hardware wgpu adapter (not lavapipe/llvmpipe), then the CPU.
pub fn open_backend(kind: BackendKind) -> Result<Box<dyn Backend>> {
    Ok(match kind {
        BackendKind::Cpu => Box::new(CpuBackend),
        BackendKind::Cuda => e4m3_backend_cuda::open(0)?,
        BackendKind::Wgpu => e4m3_backend_wgpu::open(None)?,
        BackendKind::Auto => match e4m3_backend_cuda::open(0) {
            Ok(b) => b,
            Err(_) => match e4m3_backend_wgpu::open_hardware() {
                Ok(b) => b,
                Err(_) => Box::new(CpuBackend),
            },
        },
    })
}

/// Load a model with a progress spinner.
pub fn load_model(dir: &Path) -> Result<Model> {
    let pb = spinner(&format!("loading {}", dir.display()));
    let t = Instant::now();
    let model = Model::load(dir)?;
    pb.finish_and_clear();
    eprintln!(
        "loaded {} ({} tensors, {:.0} MB) in {:.2}s",
        dir.display(),
        model.weights.len(),
        model.weight_bytes() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(model)
}

pub fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(100));
    pb
}

/// The KV-cache dtype for `--kv-cache-dtype`: `auto` follows the checkpoint, an FP8 KV cache where it
/// declares one (as vLLM does).
pub fn resolve_kv(model: &Model, kv: KvDtypeArg) -> KvCacheDtype {
    match kv {
        KvDtypeArg::Auto if model.kv_cache_fp8 => KvCacheDtype::Fp8,
        other => other.resolve(),
    }
}

/// Load weights into the backend, with room for one sequence of `max_seq_len` tokens.
pub fn load_runner(
    backend: &dyn Backend,
    model: &Model,
    max_seq_len: usize,
    kv: KvDtypeArg,
) -> Result<Box<dyn Runner>> {
    let pb = spinner(&format!("preparing the {} backend", backend.name()));
    let kv = resolve_kv(model, kv);
    if kv != KvCacheDtype::Auto {
        eprintln!("KV cache: {}", kv.name());
    }
    let cache = CacheConfig::new(1, max_seq_len).with_kv_dtype(kv);
    let r = backend.load(&model.graph, &model.weights, cache)?;
    pb.finish_and_clear();
    Ok(r)
}

#[derive(Clone)]
enum PromptInput {
    Raw(String),
    Chat {
        system: Option<String>,
        user: String,
        enable_thinking: bool,
    },
}

/// The prompt ids, and for a Gemma 4 chat template the parser that splits off the thought channel.
fn prompt_ids(tok: &Tokenizer, input: &PromptInput) -> Result<(Vec<u32>, Option<Gemma4Parser>)> {
    Ok(match input {
        PromptInput::Raw(p) => (tok.encode_prompt(p)?, None),
        chat => {
            let text = prompt_text(tok, chat)?;
            let parser = tok
                .chat_template()
                .filter(|t| is_gemma4_template(t))
                .map(|_| {
                    let p = Gemma4Parser::new(true, false);
                    if prompt_opens_thought(&text) {
                        p.in_thought()
                    } else {
                        p
                    }
                });
            // The template emits BOS itself.
            (tok.encode(&text, false)?, parser)
        }
    })
}

/// The text of a --chat prompt rendered with the checkpoint's template (a raw prompt as given).
fn prompt_text(tok: &Tokenizer, input: &PromptInput) -> Result<String> {
    Ok(match input {
        PromptInput::Raw(p) => p.clone(),
        PromptInput::Chat {
            system,
            user,
            enable_thinking,
        } => {
            let template = tok
                .chat_template()
                .context("the checkpoint has no chat_template in tokenizer_config.json")?;
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(ChatMessage::new("system", s.clone()));
            }
            messages.push(ChatMessage::new("user", user.clone()));
            let mut kwargs = serde_json::Map::new();
            if *enable_thinking {
                kwargs.insert("enable_thinking".into(), true.into());
            }
            render_chat_with(
                template,
                &messages,
                &ChatOptions {
                    bos_token: tok.bos_token().unwrap_or(""),
                    eos_token: tok.eos_token().unwrap_or(""),
                    add_generation_prompt: true,
                    tools: None,
                    kwargs: Some(&kwargs),
                },
            )?
        }
    })
}

/// Streamed chat output: the answer on stdout, the thought channel dimmed on stderr.
struct ChatPrinter {
    parser: Option<Gemma4Parser>,
    dim: bool,
}

impl ChatPrinter {
    fn write(&self, d: &ParsedDelta) -> std::io::Result<()> {
        if !d.reasoning.is_empty() {
            let mut err = std::io::stderr();
            if self.dim {
                write!(err, "\x1b[2m{}\x1b[0m", d.reasoning)?;
            } else {
                err.write_all(d.reasoning.as_bytes())?;
            }
            err.flush()?;
        }
        let mut out = std::io::stdout();
        out.write_all(d.content.as_bytes())?;
        out.flush()
    }

    fn piece(&mut self, text: &str) -> std::io::Result<()> {
        let d = match &mut self.parser {
            Some(p) => p.push(text),
            None => ParsedDelta {
                content: text.to_string(),
                ..Default::default()
            },
        };
        self.write(&d)
    }

    fn finish(&mut self) -> std::io::Result<()> {
        if let Some(p) = &mut self.parser {
            let d = p.finish();
            self.write(&d)?;
        }
        Ok(())
    }
}

fn sampling_params(gen: &GenerationConfig, args: &SamplingArgs) -> Result<SamplingParams> {
    let mut p = gen.sampling_params(args.seed);
    if let Some(t) = args.temperature {
        p.temperature = t;
    }
    if let Some(k) = args.top_k {
        p.top_k = k;
    }
    if let Some(x) = args.top_p {
        p.top_p = x;
    }
    if let Some(x) = args.min_p {
        p.min_p = x;
    }
    p.validate()?;
    Ok(p)
}

/// The cache length for a prompt plus `max_new` tokens, or an error naming both numbers.
fn sequence_budget(model: &Model, prompt_len: usize, max_new: usize) -> Result<usize> {
    let limit = model.config.max_position_embeddings;
    if prompt_len >= limit {
        bail!("the prompt has {prompt_len} tokens; the model's maximum length (max_position_embeddings) is {limit}");
    }
    Ok((prompt_len + max_new).min(limit))
}

#[allow(clippy::too_many_arguments)]
struct RunOpts {
    backend: BackendKind,
    max_tokens: usize,
    kv: KvDtypeArg,
    stats: bool,
    json: bool,
    top_logits: usize,
    images: Vec<PathBuf>,
}

/// The prompt of `--image` runs: the family's processor expansion of every image marker (Gemma 3
/// `<start_of_image>`, Gemma 4 `<|image|>`; with --chat, one per image before the user text), then the image
/// embeddings and their attention groups ([`ImageEncoder::prompt`], as `serve` does). The tower runs on
/// `backend`, or on the CPU reference when `backend` lacks one of its ops (`--stats` says which).
fn image_prompt(
    tok: &Tokenizer,
    input: &PromptInput,
    model: &Model,
    images: &[PathBuf],
    backend: &dyn Backend,
    stats: bool,
) -> Result<(Vec<u32>, StepInputs)> {
    let dir = &model.dir;
    let t = Instant::now();
    let enc = ImageEncoder::load(dir, &model.config, backend)?.with_context(|| {
        format!(
            "--image: {} has no vision tower (its config.json has no vision_config)",
            dir.display()
        )
    })?;
    let t_load = t.elapsed().as_secs_f64();
    let bytes = images
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("--image {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let input = match input {
        PromptInput::Chat {
            system,
            user,
            enable_thinking,
        } => PromptInput::Chat {
            system: system.clone(),
            user: format!("{}{user}", enc.marker().repeat(images.len())),
            enable_thinking: *enable_thinking,
        },
        raw => raw.clone(),
    };
    let text = prompt_text(tok, &input)?;
    let raw = matches!(input, PromptInput::Raw(_));
    // A rendered chat template writes BOS itself.
    let mut tokenize = |t: &str| {
        if raw {
            tok.encode_prompt(t)
        } else {
            tok.encode(t, false)
        }
    };
    let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
    let p = enc
        .prompt(&text, &refs, &mut tokenize)
        .map_err(|e| match e {
            ImagePromptError::Image { index, message } => {
                anyhow::anyhow!("{}: {message}", images[index].display())
            }
            ImagePromptError::Prompt(m) => anyhow::anyhow!("--image: {m}"),
        })?;
    if stats {
        eprintln!(
            "images: {} preprocessed in {:.3}s, tower loaded on {} in {:.3}s, encoded (tower + projector) in {:.3}s; \
             soft tokens {:?}",
            images.len(),
            p.preprocess_s,
            enc.tower_backend(),
            t_load,
            p.encode_s,
            p.tokens_per_image
        );
    }
    Ok((p.ids, p.inputs))
}

fn cmd_run(dir: &Path, input: PromptInput, sampling: &SamplingArgs, opts: &RunOpts) -> Result<()> {
    let RunOpts {
        backend,
        max_tokens,
        kv,
        stats,
        json,
        top_logits,
        ref images,
    } = *opts;
    let tok = Tokenizer::from_dir(dir)?;
    let gen = GenerationConfig::from_dir(dir)?;
    let params = sampling_params(&gen, sampling)?;
    let model = load_model(dir)?;
    let backend = open_backend(backend)?;
    let (ids, parser, inputs) = if images.is_empty() {
        let (ids, parser) = prompt_ids(&tok, &input)?;
        (ids, parser, None)
    } else {
        let (ids, inputs) = image_prompt(&tok, &input, &model, images, backend.as_ref(), stats)?;
        (ids, None, Some(inputs))
    };
    let budget = sequence_budget(&model, ids.len(), max_tokens)?;
    let max_new = budget - ids.len();
    let mut runner = load_runner(backend.as_ref(), &model, budget, kv)?;
    let mut stop_ids = gen.eos_token_ids.clone();
    if stop_ids.is_empty() {
        stop_ids = model.config.eos_token_ids.clone();
    }
    let req = GenerateRequest {
        prompt_ids: ids.clone(),
        max_new_tokens: max_new,
        sampling: params,
        stop_ids,
        top_logits,
    };
    // A chat parser reads the special tokens that mark the thought channel.
    let keep_special = parser.is_some();
    let mut stream = tok.stream_with(!keep_special);
    let mut printer = ChatPrinter {
        parser: parser.clone(),
        dim: std::io::stderr().is_terminal(),
    };
    let mut write_err = None;
    let out = generate_with_inputs(runner.as_mut(), 0, &req, inputs.as_ref(), |id| {
        if json || req.stop_ids.contains(&id) {
            return true;
        }
        match stream.push(id) {
            Ok(piece) => {
                if let Err(e) = printer.piece(&piece) {
                    write_err = Some(anyhow::Error::from(e));
                    return false;
                }
                true
            }
            Err(e) => {
                write_err = Some(e.into());
                false
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e);
    }
    if json {
        let text_ids: Vec<u32> = out
            .generated
            .iter()
            .copied()
            .filter(|id| !req.stop_ids.contains(id))
            .collect();
        let (text, reasoning) = match parser {
            Some(mut p) => {
                let mut d = p.push(&tok.decode(&text_ids, false)?);
                d.extend(p.finish());
                (d.content, Some(d.reasoning))
            }
            None => (tok.decode(&text_ids, true)?, None),
        };
        let mut v = serde_json::json!({
            "prompt_ids": ids,
            "generated_ids": out.generated,
            "text": text,
            "stop_reason": out.stop_reason,
            "top_logits": out.top_logits.iter().map(|s| s.iter().map(|&(i, l)| serde_json::json!([i, l])).collect::<Vec<_>>()).collect::<Vec<_>>(),
        });
        if let Some(r) = reasoning {
            v["reasoning_content"] = r.into();
        }
        println!("{v}");
    } else {
        let tail = stream.finish()?;
        printer.piece(&tail)?;
        printer.finish()?;
        println!();
    }
    if stats {
        let n = out.generated.len();
        eprintln!(
            "prompt {} tokens, prefill {:.3}s ({:.1} tok/s); generated {} tokens, decode {:.3}s ({:.2} tok/s); stop: {:?}",
            ids.len(),
            out.prefill_secs,
            ids.len() as f64 / out.prefill_secs,
            n,
            out.decode_secs,
            (n.saturating_sub(1)) as f64 / out.decode_secs.max(1e-9),
            out.stop_reason
        );
    }
    Ok(())
}

fn cmd_logits(
    dir: &Path,
    prompt: &str,
    top: usize,
    backend: BackendKind,
    kv: KvDtypeArg,
    json: bool,
) -> Result<()> {
    let tok = Tokenizer::from_dir(dir)?;
    let ids = tok.encode_prompt(prompt)?;
    let model = load_model(dir)?;
    let budget = sequence_budget(&model, ids.len(), 0)?;
    let backend = open_backend(backend)?;
    let mut runner = load_runner(backend.as_ref(), &model, budget.max(1), kv)?;
    let mut positions = Vec::new();
    prompt_logits(runner.as_mut(), 0, &ids, 256, |start, logits| {
        for r in 0..logits.rows {
            positions.push((start + r, top_k(logits.row(r), top)));
        }
        Ok(())
    })?;
    if json {
        let v = serde_json::json!({
            "prompt_ids": ids,
            "positions": positions.iter().map(|(p, t)| serde_json::json!({
                "position": p,
                "token": ids[*p],
                "top": t.iter().map(|&(i, l)| serde_json::json!([i, l])).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        for (p, t) in &positions {
            let tokstr = tok.id_to_token(ids[*p]).unwrap_or_default();
            let tops: Vec<String> = t
                .iter()
                .map(|&(i, l)| {
                    format!(
                        "{:?} {l:.3}",
                        tok.id_to_token(i).unwrap_or_else(|| i.to_string())
                    )
                })
                .collect();
            println!(
                "{p:>5} {:<16} -> {}",
                format!("{tokstr:?}"),
                tops.join(", ")
            );
        }
    }
    Ok(())
}

fn cmd_info(dir: &Path) -> Result<()> {
    let model = Model::load(dir)?;
    let c = &model.config;
    println!("model          {}", dir.display());
    println!("architecture   {}", c.architecture);
    println!("layers         {}", c.num_hidden_layers);
    let types: Vec<&str> = c
        .layer_types
        .iter()
        .map(|t| match t {
            e4m3_core::config::LayerType::Sliding => "S",
            e4m3_core::config::LayerType::Full => "F",
        })
        .collect();
    println!(
        "layer types    {} (S = sliding window {}, F = full)",
        types.join(""),
        c.sliding_window
    );
    println!(
        "hidden         {}   intermediate {}   vocab {}",
        c.hidden_size, c.intermediate_size, c.vocab_size
    );
    println!(
        "heads          {} query, {} kv (GQA {}:1), head_dim {}, query_pre_attn_scalar {}",
        c.num_attention_heads,
        c.num_key_value_heads,
        c.num_attention_heads / c.num_key_value_heads,
        c.head_dim,
        c.query_pre_attn_scalar
    );
    println!(
        "rope           full theta {} (linear x{}), sliding theta {}",
        c.rope_full.theta, c.rope_full.linear_factor, c.rope_sliding.theta
    );
    if let Some(g) = &c.gemma4 {
        // Full layers' geometry, from the first full layer.
        let full = c
            .layer_types
            .iter()
            .position(|t| *t == e4m3_core::config::LayerType::Full);
        if let Some(l) = full {
            println!(
                "gemma 4        full layers: head_dim {}, {} kv{}; partial rope {:?}; attention scale 1",
                g.layer_head_dim[l],
                g.layer_kv_heads[l],
                if g.attention_k_eq_v { " (k_eq_v)" } else { "" },
                c.rope_full.partial_rotary_factor
            );
        }
        println!(
            "               kv-shared layers {}, per-layer embeddings {}, double-wide mlp {}, moe {}",
            g.num_kv_shared_layers,
            g.hidden_size_per_layer_input,
            g.use_double_wide_mlp,
            g.moe.as_ref().map_or("none".to_string(), |m| format!(
                "{} experts, top {}, inter {}",
                m.num_experts, m.top_k, m.intermediate_size
            ))
        );
    }
    println!("max positions  {}", c.max_position_embeddings);
    println!(
        "lm_head        {}",
        if model.tied_lm_head {
            "tied to embed_tokens"
        } else {
            "separate"
        }
    );
    println!("quantization   {}", model.quant.name());
    if !model.quant.exclusions().is_empty() {
        let ex: Vec<&str> = model
            .quant
            .exclusions()
            .iter()
            .map(|p| p.source())
            .collect();
        println!("  kept dense   {}", ex.join(", "));
    }
    if model.kv_cache_fp8 {
        println!("kv cache       FP8 declared by the checkpoint (k_scale/v_scale per layer)");
    }
    /// Bytes in the largest unit that keeps the number at least 1.
    fn human(b: f64) -> String {
        let (v, u) = match b.abs() {
            x if x >= 1e9 => (b / 1e9, "GB"),
            x if x >= 1e6 => (b / 1e6, "MB"),
            x if x >= 1e3 => (b / 1e3, "kB"),
            _ => (b, "B"),
        };
        format!("{v:.1} {u}")
    }
    println!("per module group:");
    let (mut total, mut total_bf16) = (0usize, 0usize);
    for s in model.group_summary() {
        let schemes: Vec<String> = s.schemes.iter().map(|(n, c)| format!("{n} x{c}")).collect();
        let mut dtypes: Vec<String> = s.dtypes.iter().map(|d| d.to_string()).collect();
        dtypes.sort();
        let label = match s.group {
            "attention" => "attention q/k/v/o",
            "mlp" => "mlp gate/up/down",
            g => g,
        };
        total += s.bytes;
        total_bf16 += s.bf16_bytes;
        println!(
            "  {label:<18} {:<24} {:<18} {:>5} tensors {:>10} (bf16 {}, saved {})",
            if schemes.is_empty() {
                "-".to_string()
            } else {
                schemes.join(", ")
            },
            dtypes.join("+"),
            s.tensors,
            human(s.bytes as f64),
            human(s.bf16_bytes as f64),
            human(s.bf16_bytes as f64 - s.bytes as f64),
        );
    }
    if model.tied_lm_head {
        println!("  {:<18} (tied to embed)", "lm_head");
    }
    println!(
        "saved vs bf16  {} ({} as stored, {} in bf16)",
        human(total_bf16 as f64 - total as f64),
        human(total as f64),
        human(total_bf16 as f64)
    );
    println!("total weights  {}", human(model.weight_bytes() as f64));
    Ok(())
}
