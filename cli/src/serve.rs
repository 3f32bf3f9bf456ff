//! `e4m3 serve`: an OpenAI-compatible HTTP server (chat completions, completions, models, health,
//! Prometheus metrics), a thin layer over [`e4m3_core::engine::Engine`].
//!
//! Each generation runs a blocking thread that owns the engine's [`RequestHandle`]: it reads the engine's
//! events, detokenizes them incrementally, looks for stop strings and hands text deltas to the async side
//! through a tokio channel. When the client goes away the channel closes, the thread returns and dropping
//! the handle cancels the engine request.

use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use e4m3_core::backend::{Backend, CacheConfig, KvCacheDtype};
use e4m3_core::chat::{
    render_chat_with, ChatMessage, ChatOptions, MessageContent, ToolCall, RESERVED_TEMPLATE_VARS,
};
use e4m3_core::chat_parse::{
    prompt_opens_thought, Gemma4Parser, ParsedDelta, ParsedToolCall, CHANNEL_END, CHANNEL_START,
    TOOL_CALL_END, TOOL_CALL_START, TOOL_RESPONSE_START,
};
use e4m3_core::engine::{
    Engine, EngineConfig, EngineRequest, Event, FinishReason, Histogram, RequestHandle,
    LATENCY_BUCKETS,
};
use e4m3_core::generation_config::GenerationConfig;
use e4m3_core::kv_pages::{
    activation_bytes, blocks_for, bytes_per_block, system_memory, weight_bytes, KvBudget, KV_BLOCK,
};
use e4m3_core::multimodal::{ImageEncoder, ImagePrompt, ImagePromptError};
use e4m3_core::sampling::SamplingParams;
use e4m3_core::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

use crate::media::MediaPolicy;
use crate::{load_model, open_backend, resolve_kv, spinner, BackendKind, KvDtypeArg};

/// Default `--max-model-len` cap when the model allows more (KV caches of every slot are allocated up front).
const DEFAULT_MAX_MODEL_LEN: usize = 4096;
/// Largest request body.
const BODY_LIMIT: usize = 4 << 20;
/// Most `top_logprobs` a request may ask for.
const MAX_TOP_LOGPROBS: usize = 20;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* requests.
    #[arg(long)]
    api_key: Option<String>,
    /// The model name of the API (default: the --model argument, as vLLM does).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Longest prompt + completion (default: the model's max_position_embeddings, at most 4096).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Sequences generated at once (KV-cache slots).
    #[arg(long, default_value_t = 8)]
    max_num_seqs: usize,
    #[arg(long, value_enum, default_value = "auto")]
    kv_cache_dtype: KvDtypeArg,
    /// KV blocks of 16 positions shared by all sequences (default: from --gpu-memory-utilization).
    #[arg(long)]
    num_kv_blocks: Option<usize>,
    /// Fraction of memory the engine may use (weights, activations and KV cache), in (0, 1]: of the
    /// device's memory on CUDA, of the machine's (MemTotal) on the CPU and wgpu backends. Sizes the KV
    /// cache unless --num-kv-blocks is given; never more blocks than --max-num-seqs full-length sequences.
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Allow `file://` image URLs for files under this directory (as vLLM's flag); paths that leave it
    /// through `..` or symlinks are refused. Without it every `file://` URL is refused.
    #[arg(long)]
    allowed_local_media_path: Option<PathBuf>,
    /// Seconds an `http(s)://` image URL may take to download (the whole exchange).
    #[arg(long, default_value_t = 5.0)]
    media_fetch_timeout: f64,
    /// Largest image, in bytes, from a data URL, a local file or a download.
    #[arg(long, default_value_t = 20 << 20)]
    max_image_bytes: usize,
    #[command(flatten)]
    parsers: ParserArgs,
}

/// Chat output parsers, with vLLM's flags.
#[derive(clap::Args)]
pub struct ParserArgs {
    /// Return the model's thought channel as `reasoning_content` (gemma4: `<|channel>thought ... <channel|>`).
    #[arg(long, value_enum)]
    reasoning_parser: Option<ParserKind>,
    /// Turn the model's tool-call text into OpenAI `tool_calls` (gemma4: `<|tool_call>call:NAME{...}<tool_call|>`).
    #[arg(long, value_enum)]
    tool_call_parser: Option<ParserKind>,
    /// Allow `tool_choice: "auto"` (the default when a request has `tools`); needs --tool-call-parser.
    #[arg(long)]
    enable_auto_tool_choice: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum ParserKind {
    Gemma4,
}

/// Which parsers the server runs on chat output, checked against the tokenizer.
#[derive(Clone, Copy, Debug, Default)]
struct Parsers {
    reasoning: bool,
    tools: bool,
    auto_tools: bool,
    /// `<|tool_response>`: the model ends a tool-calling step with it; a stop token with tools.
    tool_response_id: Option<u32>,
}

impl Parsers {
    fn check(args: &ParserArgs, tok: &Tokenizer) -> Result<Parsers> {
        if args.enable_auto_tool_choice && args.tool_call_parser.is_none() {
            bail!("--enable-auto-tool-choice needs --tool-call-parser");
        }
        let need = |flag: &str, tokens: &[&str]| -> Result<()> {
            for t in tokens {
                if tok.token_to_id(t).is_none() {
                    bail!("{flag} gemma4: the tokenizer has no `{t}` token; is this a Gemma 4 checkpoint?");
                }
            }
            Ok(())
        };
        let reasoning = args.reasoning_parser == Some(ParserKind::Gemma4);
        if reasoning {
            need("--reasoning-parser", &[CHANNEL_START, CHANNEL_END])?;
        }
        let tools = args.tool_call_parser == Some(ParserKind::Gemma4);
        if tools {
            need("--tool-call-parser", &[TOOL_CALL_START, TOOL_CALL_END])?;
        }
        Ok(Parsers {
            reasoning,
            tools,
            auto_tools: args.enable_auto_tool_choice,
            tool_response_id: tok.token_to_id(TOOL_RESPONSE_START),
        })
    }
}

struct AppState {
    engine: Engine,
    tok: Tokenizer,
    gen: GenerationConfig,
    model_name: String,
    api_key: Option<String>,
    /// Ids that end generation (generation_config.json, else config.json, else the tokenizer's EOS).
    eos_ids: Vec<u32>,
    max_model_len: usize,
    next_id: AtomicU64,
    created: u64,
    parsers: Parsers,
    /// The image encoder, or why requests with images are refused.
    images: std::result::Result<ImageEncoder, String>,
    media: MediaPolicy,
}

pub fn cmd_serve(args: ServeArgs) -> Result<()> {
    let dir = &args.model;
    let tok = Tokenizer::from_dir(dir)?;
    let parsers = Parsers::check(&args.parsers, &tok)?;
    let gen = GenerationConfig::from_dir(dir)?;
    let model = load_model(dir)?;
    let limit = model.config.max_position_embeddings;
    let max_model_len = match args.max_model_len {
        Some(0) => bail!("--max-model-len must be at least 1"),
        Some(n) if n > limit => bail!(
            "--max-model-len {n} is over the model's maximum length (max_position_embeddings) of {limit}"
        ),
        Some(n) => n,
        None => limit.min(DEFAULT_MAX_MODEL_LEN),
    };
    if args.max_num_seqs == 0 {
        bail!("--max-num-seqs must be at least 1");
    }
    let f = args.gpu_memory_utilization;
    if !(f > 0.0 && f <= 1.0) {
        bail!("--gpu-memory-utilization must be in (0, 1], not {f}");
    }
    let t = args.media_fetch_timeout;
    if !(t > 0.0 && t.is_finite()) {
        bail!("--media-fetch-timeout must be a positive number of seconds, not {t}");
    }
    let media = MediaPolicy::new(
        args.allowed_local_media_path.as_deref(),
        Duration::from_secs_f64(t),
        args.max_image_bytes,
    )
    .map_err(anyhow::Error::msg)?;
    let per_seq = blocks_for(max_model_len);
    if let Some(n) = args.num_kv_blocks {
        if n < per_seq {
            bail!(
                "--num-kv-blocks {n} cannot hold one sequence of --max-model-len {max_model_len} ({per_seq} blocks of {KV_BLOCK} positions)"
            );
        }
    }
    let mut eos_ids = gen.eos_token_ids.clone();
    if eos_ids.is_empty() {
        eos_ids = model.config.eos_token_ids.clone();
    }
    if eos_ids.is_empty() {
        eos_ids.extend(tok.eos_id());
    }
    let backend = open_backend(args.backend)?;
    let pb = spinner(&format!("preparing the {} backend", backend.name()));
    let kv = resolve_kv(&model, args.kv_cache_dtype);
    let mut cfg = EngineConfig::new(args.max_num_seqs, max_model_len, model.config.vocab_size);
    let blocks = match args.num_kv_blocks {
        Some(n) => n,
        None => budget_blocks(&args, &model, backend.as_ref(), kv, &cfg)?,
    };
    cfg.kv_blocks = Some(blocks);
    let cache = CacheConfig::new(args.max_num_seqs, max_model_len)
        .with_kv_dtype(kv)
        .with_num_blocks(Some(blocks));
    let runner = backend.load(&model.graph, &model.weights, cache)?;
    let images = image_encoder(&model, backend.as_ref(), runner.as_ref())?;
    pb.finish_and_clear();
    println!(
        "# KV blocks: {blocks}, maximum concurrency for {max_model_len} tokens per request: {:.2}x",
        blocks as f64 / per_seq as f64
    );
    let engine = Engine::start(runner, cfg)?;
    drop(model);
    let model_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| dir.display().to_string());
    eprintln!(
        "serving {model_name} on the {} backend: max_model_len {max_model_len}, max_num_seqs {}, {blocks} KV blocks, KV cache {}",
        backend.name(),
        args.max_num_seqs,
        kv.name()
    );
    let state = Arc::new(AppState {
        engine,
        tok,
        gen,
        model_name,
        api_key: args.api_key.clone(),
        eos_ids,
        max_model_len,
        next_id: AtomicU64::new(1),
        created: now_secs(),
        parsers,
        images,
        media,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    rt.block_on(serve(state, &args.host, args.port))?;
    // The engine stops (its thread joins) when the last request thread lets go of the state.
    drop(rt);
    drop(backend);
    Ok(())
}

/// The vision tower of the checkpoint, when it has one and the text runner takes image inputs; else why
/// image requests are refused (printed at start).
fn image_encoder(
    model: &e4m3_core::model::Model,
    backend: &dyn Backend,
    runner: &dyn e4m3_core::backend::Runner,
) -> Result<std::result::Result<ImageEncoder, String>> {
    let c = &model.config;
    let Some(enc) = ImageEncoder::load(&model.dir, c, backend)? else {
        return Ok(Err(format!(
            "the model has no vision tower ({} has no vision_config)",
            model.dir.join("config.json").display()
        )));
    };
    if !runner.supports_step_inputs() {
        let why = format!(
            "the {} backend cannot take image inputs yet (serve with --backend cpu)",
            backend.name()
        );
        eprintln!("images: refused: {why}");
        return Ok(Err(why));
    }
    eprintln!(
        "images: accepted (vision tower on the {} backend)",
        enc.tower_backend()
    );
    Ok(Ok(enc))
}

/// KV blocks from `--gpu-memory-utilization`: that fraction of the memory, less what the backend
/// already holds, the weights and the activations of the largest step, over the bytes of one block;
/// at most `--max-num-seqs` full-length sequences' worth. An error when not even one sequence fits.
fn budget_blocks(
    args: &ServeArgs,
    model: &e4m3_core::model::Model,
    backend: &dyn Backend,
    kv: KvCacheDtype,
    cfg: &EngineConfig,
) -> Result<usize> {
    let f = args.gpu_memory_utilization;
    let (total, used, what) = match backend.memory() {
        Some(m) => (m.total, m.in_use, "device"),
        None => (
            system_memory().context(
                "cannot read the machine's memory size from /proc/meminfo; give --num-kv-blocks",
            )?,
            0,
            "system",
        ),
    };
    let budget = KvBudget {
        total,
        utilization: f,
        used,
        weights: weight_bytes(&model.graph, &model.weights),
        workspace: activation_bytes(&model.graph, cfg.prefill_chunk + cfg.max_num_seqs),
        bytes_per_block: bytes_per_block(&model.graph, backend.kv_bytes_per_element(kv)),
    };
    let per_seq = blocks_for(cfg.max_model_len);
    let n = budget.blocks();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let detail = format!(
        "--gpu-memory-utilization {f} of {:.1} MiB of {what} memory, less {:.1} MiB in use, {:.1} MiB of weights and {:.1} MiB of activations, leaves {:.1} MiB: {n} KV blocks of {} bytes",
        mib(total),
        mib(used),
        mib(budget.weights),
        mib(budget.workspace),
        mib(budget.kv_bytes()),
        budget.bytes_per_block
    );
    if n < per_seq {
        bail!(
            "{detail}, but one sequence of --max-model-len {} needs {per_seq}; raise --gpu-memory-utilization, lower --max-model-len or give --num-kv-blocks",
            cfg.max_model_len
        );
    }
    let most = cfg.max_num_seqs * per_seq;
    if n > most {
        eprintln!(
            "{detail}; using {most}, what --max-num-seqs {} sequences of {} positions can hold",
            cfg.max_num_seqs, cfg.max_model_len
        );
        Ok(most)
    } else {
        eprintln!("{detail}");
        Ok(n)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn serve(state: Arc<AppState>, host: &str, port: u16) -> Result<()> {
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let addr = listener.local_addr()?;
    println!("e4m3 serve: listening on http://{addr}");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the server failed")?;
    eprintln!("e4m3 serve: stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("e4m3 serve: shutting down");
}

// ---------------------------------------------------------------------------------------------------
// Errors

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    fn param(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(field.to_string()),
            ..ApiError::bad(message)
        }
    }
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            413 => "request_too_large",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }
    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.body())
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn not_found(req: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

async fn auth(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        if req.uri().path().starts_with("/v1") {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if given != Some(key.as_str()) {
                let mut e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    if given.is_none() {
                        "missing API key: send `Authorization: Bearer KEY`"
                    } else {
                        "invalid API key"
                    },
                );
                e.code = Some("invalid_api_key");
                return e.into_response();
            }
        }
    }
    next.run(req).await
}

// ---------------------------------------------------------------------------------------------------
// Simple endpoints

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [{
            "id": s.model_name,
            "object": "model",
            "created": s.created,
            "owned_by": "e4m3",
            "root": s.model_name,
            "max_model_len": s.max_model_len,
        }]}),
    )
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
    for (le, n) in LATENCY_BUCKETS.iter().zip(h.buckets.iter()) {
        out.push_str(&format!("{name}_bucket{{le=\"{le}\"}} {n}\n"));
    }
    out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {}\n", h.count));
    out.push_str(&format!("{name}_sum {}\n{name}_count {}\n", h.sum, h.count));
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let m = s.engine.metrics();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(&str, String)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    metric(
        "e4m3_requests_total",
        "counter",
        "Finished requests by finish reason.",
        &[
            ("{finish_reason=\"stop\"}", m.finished_stop.to_string()),
            ("{finish_reason=\"length\"}", m.finished_length.to_string()),
            (
                "{finish_reason=\"cancelled\"}",
                m.finished_cancelled.to_string(),
            ),
        ],
    );
    metric(
        "e4m3_requests_failed_total",
        "counter",
        "Requests that failed in the backend.",
        &[("", m.failed.to_string())],
    );
    metric(
        "e4m3_num_requests_running",
        "gauge",
        "Requests holding a KV-cache slot.",
        &[("", m.running.to_string())],
    );
    metric(
        "e4m3_num_requests_waiting",
        "gauge",
        "Requests waiting for a slot.",
        &[("", m.waiting.to_string())],
    );
    metric(
        "e4m3_kv_blocks_used",
        "gauge",
        "KV blocks in use.",
        &[("", m.kv_blocks_used.to_string())],
    );
    metric(
        "e4m3_kv_blocks_free",
        "gauge",
        "KV blocks free.",
        &[("", m.kv_blocks_free.to_string())],
    );
    metric(
        "e4m3_kv_blocks_total",
        "gauge",
        "KV blocks in the pool.",
        &[("", m.kv_blocks_total.to_string())],
    );
    metric(
        "e4m3_prompt_tokens_total",
        "counter",
        "Prompt tokens processed (recomputed ones after a preemption included).",
        &[("", m.prompt_tokens.to_string())],
    );
    metric(
        "e4m3_generation_tokens_total",
        "counter",
        "Tokens generated.",
        &[("", m.generated_tokens.to_string())],
    );
    metric(
        "e4m3_generation_tokens_per_second",
        "gauge",
        "Tokens generated per second over the last 10 seconds.",
        &[(
            "",
            format!("{:.3}", m.recent.per_second(std::time::Instant::now())),
        )],
    );
    metric(
        "e4m3_preemptions_total",
        "counter",
        "Sequences preempted for lack of KV blocks.",
        &[("", m.preemptions.to_string())],
    );
    histogram(
        &mut out,
        "e4m3_time_to_first_token_seconds",
        "Time from submission to the first generated token.",
        &m.ttft,
    );
    histogram(
        &mut out,
        "e4m3_inter_token_latency_seconds",
        "Time between consecutive tokens of a request.",
        &m.itl,
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------------
// Request parsing

fn parse_body(
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                format!("the request body is over the limit of {BODY_LIMIT} bytes"),
            )
        } else {
            ApiError::new(status, e.body_text())
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad("the request body must be a JSON object")),
    }
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    match obj.get(name) {
        None | Some(Value::Null) => None,
        Some(v) => Some(v),
    }
}

fn opt_bool(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    field(obj, name)
        .map(|v| {
            v.as_bool().ok_or_else(|| {
                ApiError::param(name, format!("`{name}` must be a boolean, got {v}"))
            })
        })
        .transpose()
}

fn opt_f32(obj: &Map<String, Value>, name: &str) -> Result<Option<f32>, ApiError> {
    field(obj, name)
        .map(|v| {
            v.as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| ApiError::param(name, format!("`{name}` must be a number, got {v}")))
        })
        .transpose()
}

fn opt_i64(obj: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    field(obj, name)
        .map(|v| {
            v.as_i64().ok_or_else(|| {
                ApiError::param(name, format!("`{name}` must be an integer, got {v}"))
            })
        })
        .transpose()
}

fn opt_str<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, ApiError> {
    field(obj, name)
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ApiError::param(name, format!("`{name}` must be a string, got {v}")))
        })
        .transpose()
}

fn token_ids(v: &Value, name: &str) -> Result<Vec<u32>, ApiError> {
    let err = || {
        ApiError::param(
            name,
            format!("`{name}` must be a list of token ids, got {v}"),
        )
    };
    v.as_array()
        .ok_or_else(err)?
        .iter()
        .map(|x| {
            x.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(err)
        })
        .collect()
}

/// What chat completions and completions share.
struct Common {
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stop_ids: Vec<u32>,
    stream: bool,
    include_usage: bool,
}

fn parse_common(s: &AppState, obj: &Map<String, Value>, chat: bool) -> Result<Common, ApiError> {
    if let Some(m) = opt_str(obj, "model")? {
        if m != s.model_name {
            let mut e = ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "The model `{m}` does not exist; this server serves `{}`.",
                    s.model_name
                ),
            );
            e.param = Some("model".into());
            e.code = Some("model_not_found");
            return Err(e);
        }
    }
    if let Some(n) = opt_i64(obj, "n")? {
        if n != 1 {
            return Err(ApiError::param(
                "n",
                format!("only `n` = 1 is supported, got {n}"),
            ));
        }
    }
    let mut max_tokens = None;
    let names: &[&str] = if chat {
        &["max_completion_tokens", "max_tokens"]
    } else {
        &["max_tokens"]
    };
    for name in names {
        if let Some(n) = opt_i64(obj, name)? {
            if n < 1 {
                return Err(ApiError::param(
                    name,
                    format!("`{name}` must be at least 1, got {n}"),
                ));
            }
            max_tokens = Some(n as usize);
            break;
        }
    }
    // A negative seed (allowed by the OpenAI API) is used by its two's-complement bits.
    let seed = opt_i64(obj, "seed")?.map(|x| x as u64);
    let mut p = s.gen.sampling_params(seed);
    if let Some(t) = opt_f32(obj, "temperature")? {
        if !(t.is_finite() && t >= 0.0) {
            return Err(ApiError::param(
                "temperature",
                format!("`temperature` must be >= 0 (0 = greedy), got {t}"),
            ));
        }
        p.temperature = t;
    }
    if let Some(x) = opt_f32(obj, "top_p")? {
        if !(x > 0.0 && x <= 1.0) {
            return Err(ApiError::param(
                "top_p",
                format!("`top_p` must be in (0, 1], got {x}"),
            ));
        }
        p.top_p = x;
    }
    if let Some(k) = opt_i64(obj, "top_k")? {
        if k < -1 {
            return Err(ApiError::param(
                "top_k",
                format!("`top_k` must be -1 or 0 (off) or a positive integer, got {k}"),
            ));
        }
        p.top_k = k.max(0) as usize;
    }
    if let Some(x) = opt_f32(obj, "min_p")? {
        if !(0.0..=1.0).contains(&x) {
            return Err(ApiError::param(
                "min_p",
                format!("`min_p` must be in [0, 1], got {x}"),
            ));
        }
        p.min_p = x;
    }
    p.validate().map_err(|e| ApiError::bad(e.to_string()))?;
    let stop = match field(obj, "stop") {
        None => Vec::new(),
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::param(
                        "stop",
                        format!("`stop` must be a string or a list of strings, got {x}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => {
            return Err(ApiError::param(
                "stop",
                format!("`stop` must be a string or a list of strings, got {v}"),
            ))
        }
    }
    .into_iter()
    .filter(|x| !x.is_empty())
    .collect();
    let mut stop_ids = s.eos_ids.clone();
    if let Some(v) = field(obj, "stop_token_ids") {
        stop_ids.extend(token_ids(v, "stop_token_ids")?);
    }
    let stream = opt_bool(obj, "stream")?.unwrap_or(false);
    let include_usage = match field(obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")
            .map_err(|e| ApiError {
                param: Some("stream_options.include_usage".into()),
                ..e
            })?
            .unwrap_or(false),
        Some(v) => {
            return Err(ApiError::param(
                "stream_options",
                format!("`stream_options` must be an object, got {v}"),
            ))
        }
    };
    Ok(Common {
        max_tokens,
        sampling: p,
        stop,
        stop_ids,
        stream,
        include_usage,
    })
}

/// An image of a chat request: where it is in the request (`messages[i].content[j].image_url`) and its
/// URL.
struct ImagePart {
    name: String,
    url: String,
}

/// A message's `content`: a string, or a list of `{type: "text", text}` and `{type: "image_url",
/// image_url: {url}}` parts. Text-only parts are joined with newlines into a string; with images the
/// template gets the parts (`{type: "image"}` for each image, as transformers passes them) and `images`
/// the images in order.
fn message_content(
    v: Option<&Value>,
    i: usize,
    images: &mut Vec<ImagePart>,
) -> Result<MessageContent, ApiError> {
    let name = format!("messages[{i}].content");
    match v {
        None | Some(Value::Null) => Ok(MessageContent::Text(String::new())),
        Some(Value::String(s)) => Ok(MessageContent::Text(s.clone())),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            let mut out = Vec::new();
            let first_image = images.len();
            for (j, part) in parts.iter().enumerate() {
                let ty = part.get("type").and_then(Value::as_str);
                let text = part.get("text").and_then(Value::as_str);
                let pname = format!("{name}[{j}]");
                match (ty, text) {
                    (Some("text"), Some(t)) => {
                        texts.push(t);
                        out.push(json!({"type": "text", "text": t}));
                    }
                    (Some("image_url"), _) => {
                        let iname = format!("{pname}.image_url");
                        let url = part
                            .get("image_url")
                            .and_then(|u| u.get("url"))
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                ApiError::param(
                                    &iname,
                                    format!("`{iname}` must be {{\"url\": STRING}}, got {}", part.get("image_url").unwrap_or(&Value::Null)),
                                )
                            })?;
                        images.push(ImagePart {
                            name: iname,
                            url: url.to_string(),
                        });
                        out.push(json!({"type": "image"}));
                    }
                    (Some(other), _) if other != "text" => {
                        return Err(ApiError::param(
                            &format!("{pname}.type"),
                            format!("content parts of type `{other}` are not supported (only `text` and `image_url`)"),
                        ))
                    }
                    _ => {
                        return Err(ApiError::param(
                            &pname,
                            format!("a content part must be {{\"type\": \"text\", \"text\": STRING}} or {{\"type\": \"image_url\", \"image_url\": {{\"url\": STRING}}}}, got {part}"),
                        ))
                    }
                }
            }
            if images.len() == first_image {
                return Ok(MessageContent::Text(texts.join("\n")));
            }
            Ok(MessageContent::Parts(
                out.into_iter()
                    .filter_map(|v| match v {
                        Value::Object(m) => Some(m),
                        _ => None,
                    })
                    .collect(),
            ))
        }
        Some(v) => Err(ApiError::param(
            &name,
            format!("`{name}` must be a string or a list of content parts, got {v}"),
        )),
    }
}

/// How a chat request's output is parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ChatMode {
    /// Split off the thought channel (`reasoning_content`).
    reasoning: bool,
    /// Parse tool calls (`tool_calls`).
    tools: bool,
    /// The prompt leaves the thought channel open: the output starts as reasoning.
    in_thought: bool,
}

impl ChatMode {
    /// Whether a parser reads the output (it then keeps special tokens in the text).
    fn parsed(&self) -> bool {
        self.reasoning || self.tools
    }
}

/// `tools`: a list of `{"type": "function", "function": {"name": ..., ...}}`; none when absent or empty.
fn parse_tools(obj: &Map<String, Value>) -> Result<Option<Vec<Value>>, ApiError> {
    let list = match field(obj, "tools") {
        None => return Ok(None),
        Some(Value::Array(l)) => l,
        Some(v) => {
            return Err(ApiError::param(
                "tools",
                format!("`tools` must be a list of tools, got {v}"),
            ))
        }
    };
    for (i, t) in list.iter().enumerate() {
        let name = format!("tools[{i}]");
        let ty = t.get("type").and_then(Value::as_str);
        if ty != Some("function") {
            return Err(ApiError::param(
                &format!("{name}.type"),
                format!(
                    "`{name}.type` must be \"function\", got {}",
                    t.get("type").unwrap_or(&Value::Null)
                ),
            ));
        }
        let f = t.get("function").and_then(Value::as_object);
        if f.and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .is_none()
        {
            return Err(ApiError::param(
                &format!("{name}.function"),
                format!(
                    "`{name}.function` must be an object with a string `name`, got {}",
                    t.get("function").unwrap_or(&Value::Null)
                ),
            ));
        }
    }
    Ok((!list.is_empty()).then(|| list.clone()))
}

/// An assistant message's `tool_calls` (OpenAI form; JSON-string arguments become objects).
fn parse_tool_calls(v: &Value, i: usize) -> Result<Vec<ToolCall>, ApiError> {
    let name = format!("messages[{i}].tool_calls");
    let err = |j: usize, what: &str| {
        ApiError::param(&format!("{name}[{j}]"), format!("`{name}[{j}]` {what}"))
    };
    let Some(list) = v.as_array() else {
        return Err(ApiError::param(
            &name,
            format!("`{name}` must be a list of tool calls, got {v}"),
        ));
    };
    let mut calls = Vec::with_capacity(list.len());
    for (j, c) in list.iter().enumerate() {
        let f = c
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| err(j, "must have a `function` object"))?;
        let fname = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| err(j, "must have a string `function.name`"))?;
        let id = match c.get("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(x)) => Some(x.clone()),
            Some(_) => return Err(err(j, "has an `id` that is not a string")),
        };
        let args = f.get("arguments").cloned().unwrap_or(Value::Null);
        calls.push(ToolCall::function(id, fname, args));
    }
    Ok(calls)
}

fn opt_string(o: &Map<String, Value>, key: &str, i: usize) -> Result<Option<String>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(x)) => Ok(Some(x.clone())),
        Some(v) => Err(ApiError::param(
            &format!("messages[{i}].{key}"),
            format!("`messages[{i}].{key}` must be a string, got {v}"),
        )),
    }
}

/// A chat prompt: token ids, or with images the rendered text (one image marker per image) and the
/// images, encoded later off the async executor ([`image_prompt`]).
enum ChatPrompt {
    Ids(Vec<u32>),
    Images {
        text: String,
        images: Vec<ImagePart>,
    },
}

fn chat_prompt(s: &AppState, obj: &Map<String, Value>) -> Result<(ChatPrompt, ChatMode), ApiError> {
    let msgs = match field(obj, "messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => return Err(ApiError::param("messages", "`messages` is empty")),
        Some(v) => {
            return Err(ApiError::param(
                "messages",
                format!("`messages` must be a list of messages, got {v}"),
            ))
        }
        None => return Err(ApiError::param("messages", "`messages` is required")),
    };
    let tools = parse_tools(obj)?;
    let tool_choice = match field(obj, "tool_choice") {
        None => None,
        Some(Value::String(x)) if x == "auto" || x == "none" => Some(x.as_str()),
        Some(v) => {
            return Err(ApiError::param(
                "tool_choice",
                format!("`tool_choice` {v} is not supported: use \"auto\" or \"none\""),
            ))
        }
    };
    if tool_choice == Some("auto") && tools.is_none() {
        return Err(ApiError::param(
            "tool_choice",
            "`tool_choice` \"auto\" needs `tools`",
        ));
    }
    // As in the OpenAI API and vLLM: "auto" when the request has tools.
    let auto = tools.is_some() && tool_choice != Some("none");
    if auto && !(s.parsers.auto_tools && s.parsers.tools) {
        return Err(ApiError::param(
            "tool_choice",
            "\"auto\" tool choice (the default with `tools`) requires the server to run with --enable-auto-tool-choice and --tool-call-parser; or send `tool_choice: \"none\"`",
        ));
    }
    let kwargs = match field(obj, "chat_template_kwargs") {
        None => None,
        Some(Value::Object(m)) => {
            if let Some(k) = m
                .keys()
                .find(|k| RESERVED_TEMPLATE_VARS.contains(&k.as_str()))
            {
                return Err(ApiError::param(
                    "chat_template_kwargs",
                    format!("`chat_template_kwargs.{k}` is set by the server and cannot be given"),
                ));
            }
            Some(m)
        }
        Some(v) => {
            return Err(ApiError::param(
                "chat_template_kwargs",
                format!("`chat_template_kwargs` must be an object, got {v}"),
            ))
        }
    };
    let mut messages = Vec::with_capacity(msgs.len());
    let mut images = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let Some(o) = m.as_object() else {
            return Err(ApiError::param(
                &format!("messages[{i}]"),
                format!("a message must be an object, got {m}"),
            ));
        };
        let role = match o.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r.to_string(),
            Some("developer") => "system".to_string(),
            other => {
                return Err(ApiError::param(
                    &format!("messages[{i}].role"),
                    format!(
                        "`role` must be system, developer, user, assistant or tool, got {}",
                        other.map_or("nothing".to_string(), |r| format!("{r:?}"))
                    ),
                ))
            }
        };
        let mut msg = ChatMessage::new(role.as_str(), "");
        msg.content = Some(message_content(o.get("content"), i, &mut images)?);
        if role == "assistant" {
            if let Some(v) = field(o, "tool_calls") {
                msg.tool_calls = parse_tool_calls(v, i)?;
                if field(o, "content").is_none() {
                    msg.content = None;
                }
            }
            msg.reasoning_content = match opt_string(o, "reasoning_content", i)? {
                Some(r) => Some(r),
                None => opt_string(o, "reasoning", i)?,
            };
        }
        if role == "tool" {
            msg.tool_call_id = opt_string(o, "tool_call_id", i)?;
            msg.name = opt_string(o, "name", i)?;
        }
        messages.push(msg);
    }
    if let (Some(first), Err(why)) = (images.first(), &s.images) {
        return Err(ApiError::param(
            &first.name,
            format!("`{}`: images are not accepted: {why}", first.name),
        ));
    }
    let template = s
        .tok
        .chat_template()
        .ok_or_else(|| ApiError::bad("the model has no chat template (tokenizer_config.json chat_template); use /v1/completions"))?;
    let text = render_chat_with(
        template,
        &messages,
        &ChatOptions {
            bos_token: s.tok.bos_token().unwrap_or(""),
            eos_token: s.tok.eos_token().unwrap_or(""),
            add_generation_prompt: true,
            tools: tools.as_deref(),
            kwargs,
        },
    )
    .map_err(|e| ApiError::param("messages", e.to_string()))?;
    let mode = ChatMode {
        reasoning: s.parsers.reasoning,
        tools: auto && s.parsers.tools,
        in_thought: s.parsers.reasoning && prompt_opens_thought(&text),
    };
    if !images.is_empty() {
        return Ok((ChatPrompt::Images { text, images }, mode));
    }
    let ids = s
        .tok
        .encode(&text, false)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    Ok((ChatPrompt::Ids(ids), mode))
}

/// The prompt of a chat request with images: every image fetched ([`MediaPolicy`]), then decoded and
/// encoded with the prompt expanded ([`ImageEncoder::prompt`]). Blocking. Errors name the image part.
fn image_prompt(s: &AppState, text: &str, images: &[ImagePart]) -> Result<ImagePrompt, ApiError> {
    let enc = s
        .images
        .as_ref()
        .map_err(|why| ApiError::bad(format!("images are not accepted: {why}")))?;
    let part_error =
        |p: &ImagePart, e: String| ApiError::param(&p.name, format!("`{}`: {e}", p.name));
    let bytes = images
        .iter()
        .map(|p| s.media.fetch(&p.url).map_err(|e| part_error(p, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
    enc.prompt(text, &refs, &mut |t: &str| s.tok.encode(t, false))
        .map_err(|e| match e {
            ImagePromptError::Image { index, message } => part_error(&images[index], message),
            ImagePromptError::Prompt(m) => ApiError::param(
                "messages",
                format!("the prompt with its images: {m} (does the chat template write {} for each image part?)", enc.marker()),
            ),
        })
}

fn completion_prompt(s: &AppState, obj: &Map<String, Value>) -> Result<Vec<u32>, ApiError> {
    let bad = |v: &Value| {
        ApiError::param(
            "prompt",
            format!("`prompt` must be a string, a list with one string, or a list of token ids, got {v}"),
        )
    };
    let encode = |t: &str| {
        s.tok
            .encode_prompt(t)
            .map_err(|e| ApiError::bad(e.to_string()))
    };
    match field(obj, "prompt") {
        None => Err(ApiError::param("prompt", "`prompt` is required")),
        Some(Value::String(t)) => encode(t),
        Some(v @ Value::Array(list)) => match list.as_slice() {
            [Value::String(t)] => encode(t),
            [Value::Array(_)] => token_ids(&list[0], "prompt"),
            [] => Err(ApiError::param("prompt", "`prompt` is empty")),
            l if l.iter().all(Value::is_number) => token_ids(v, "prompt"),
            l if l.len() > 1 && l.iter().all(|x| x.is_string() || x.is_array()) => Err(
                ApiError::param("prompt", "only one prompt per request is supported"),
            ),
            _ => Err(bad(v)),
        },
        Some(v) => Err(bad(v)),
    }
}

// ---------------------------------------------------------------------------------------------------
// Generation

struct TokLp {
    token: String,
    logprob: f32,
    top: Vec<(String, f32)>,
}

enum Out {
    Delta {
        text: String,
        logprobs: Vec<TokLp>,
    },
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// Where the first stop string starts in `text`, if any.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// End of the text that can be sent: before the longest tail of `text` that begins a stop string.
fn safe_end(text: &str, stops: &[String]) -> usize {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let from = text.len().saturating_sub(longest);
    text.char_indices()
        .map(|(i, _)| i)
        .filter(|&i| i >= from)
        .find(|&i| stops.iter().any(|s| s.starts_with(&text[i..])))
        .unwrap_or(text.len())
}

struct Job {
    handle: RequestHandle,
    prompt_tokens: usize,
    stop: Vec<String>,
    stop_ids: Vec<u32>,
    logprobs: bool,
    /// Keep special tokens in the text (a chat parser reads the markers).
    keep_special: bool,
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Read the engine's events and hand out text deltas until the request ends, `emit` returns false or
/// `closed()` says the client is gone. Returning drops the handle, which cancels the engine request.
fn drive(s: &AppState, job: Job, emit: &mut dyn FnMut(Out) -> bool, closed: &dyn Fn() -> bool) {
    let Job {
        handle,
        prompt_tokens,
        stop,
        stop_ids,
        logprobs,
        keep_special,
    } = job;
    let mut dec = s.tok.stream_with(!keep_special);
    let mut text = String::new();
    let mut sent = 0usize;
    let mut generated = 0usize;
    let mut lps: Vec<TokLp> = Vec::new();
    loop {
        let ev = match handle.events.recv_timeout(Duration::from_millis(50)) {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout) => {
                if closed() {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                emit(Out::Error(
                    "the engine stopped before the request finished".into(),
                ));
                return;
            }
        };
        match ev {
            Event::Token {
                id,
                logprob,
                top_logprobs,
            } => {
                generated += 1;
                if logprobs {
                    lps.push(TokLp {
                        token: token_text(&s.tok, id),
                        logprob: logprob.unwrap_or(f32::NAN),
                        top: top_logprobs
                            .iter()
                            .map(|&(t, lp)| (token_text(&s.tok, t), lp))
                            .collect(),
                    });
                }
                if !stop_ids.contains(&id) {
                    match dec.push(id) {
                        Ok(piece) => text.push_str(&piece),
                        Err(e) => {
                            emit(Out::Error(e.to_string()));
                            return;
                        }
                    }
                }
                if let Some(pos) = find_stop(&text, &stop) {
                    // The engine finishes it as stopped (not cancelled) and frees its slot now.
                    handle.stop();
                    text.truncate(pos);
                    let delta = text.get(sent..).unwrap_or("").to_string();
                    if emit(Out::Delta {
                        text: delta,
                        logprobs: std::mem::take(&mut lps),
                    }) {
                        emit(Out::Done {
                            finish_reason: "stop",
                            prompt_tokens,
                            completion_tokens: generated,
                        });
                    }
                    return;
                }
                let end = safe_end(&text, &stop);
                if end > sent || !lps.is_empty() {
                    let delta = text[sent..end.max(sent)].to_string();
                    sent = end.max(sent);
                    if !emit(Out::Delta {
                        text: delta,
                        logprobs: std::mem::take(&mut lps),
                    }) {
                        return;
                    }
                }
            }
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                match dec.finish() {
                    Ok(piece) => text.push_str(&piece),
                    Err(e) => {
                        emit(Out::Error(e.to_string()));
                        return;
                    }
                }
                let mut finish_reason = match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                    FinishReason::Cancelled => "abort",
                };
                if let Some(pos) = find_stop(&text, &stop) {
                    // The engine finishes it as stopped (not cancelled) and frees its slot now.
                    handle.stop();
                    text.truncate(pos);
                    finish_reason = "stop";
                }
                let delta = text.get(sent..).unwrap_or("").to_string();
                if (!delta.is_empty() || !lps.is_empty())
                    && !emit(Out::Delta {
                        text: delta,
                        logprobs: std::mem::take(&mut lps),
                    })
                {
                    return;
                }
                emit(Out::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                });
                return;
            }
            Event::Error(e) => {
                emit(Out::Error(e));
                return;
            }
        }
    }
}

/// `drive` on a new thread; a panic there becomes an error event.
fn spawn_drive(
    s: Arc<AppState>,
    job: Job,
    mut emit: impl FnMut(Out) -> bool + Send + 'static,
    closed: impl Fn() -> bool + Send + 'static,
) -> Result<(), ApiError> {
    std::thread::Builder::new()
        .name("e4m3-request".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                drive(&s, job, &mut emit, &closed)
            }));
            if r.is_err() {
                emit(Out::Error(
                    "internal error: the request thread panicked".into(),
                ));
            }
        })
        .map(|_| ())
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot start a request thread: {e}"),
            )
        })
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completion,
}

/// The OpenAI-shaped logprobs of some tokens: chat `{content: [...]}`, completions `{tokens, ...}`.
fn logprobs_json(api: Api, lps: &[TokLp], offset0: usize) -> Value {
    let num = |x: f32| {
        if x.is_finite() {
            json!(x)
        } else {
            json!(-9999.0)
        }
    };
    match api {
        Api::Chat => json!({"content": lps.iter().map(|t| json!({
            "token": t.token,
            "logprob": num(t.logprob),
            "bytes": t.token.as_bytes(),
            "top_logprobs": t.top.iter().map(|(tok, lp)| json!({
                "token": tok, "logprob": num(*lp), "bytes": tok.as_bytes(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()}),
        Api::Completion => {
            let mut off = offset0;
            let mut offsets = Vec::new();
            for t in lps {
                offsets.push(off);
                off += t.token.len();
            }
            json!({
                "tokens": lps.iter().map(|t| &t.token).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|t| num(t.logprob)).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|t| {
                    let mut m = Map::new();
                    for (tok, lp) in &t.top {
                        m.entry(tok.clone()).or_insert(num(*lp));
                    }
                    Value::Object(m)
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    generate(s, body, Api::Chat)
        .await
        .unwrap_or_else(|e| e.into_response())
}

async fn completions(
    State(s): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    generate(s, body, Api::Completion)
        .await
        .unwrap_or_else(|e| e.into_response())
}

async fn generate(
    s: Arc<AppState>,
    body: std::result::Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, ApiError> {
    let obj = parse_body(body)?;
    let mut c = parse_common(&s, &obj, api == Api::Chat)?;
    let top_logprobs: Option<usize> = match api {
        Api::Chat => {
            let on = opt_bool(&obj, "logprobs")?.unwrap_or(false);
            let k = opt_i64(&obj, "top_logprobs")?;
            match k {
                Some(k) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
                    return Err(ApiError::param(
                        "top_logprobs",
                        format!("`top_logprobs` must be in 0..={MAX_TOP_LOGPROBS}, got {k}"),
                    ))
                }
                Some(_) if !on => {
                    return Err(ApiError::param(
                        "top_logprobs",
                        "`top_logprobs` needs `logprobs: true`",
                    ))
                }
                _ => {}
            }
            on.then_some(k.unwrap_or(0) as usize)
        }
        Api::Completion => match opt_i64(&obj, "logprobs")? {
            Some(k) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
                return Err(ApiError::param(
                    "logprobs",
                    format!("`logprobs` must be in 0..={MAX_TOP_LOGPROBS}, got {k}"),
                ))
            }
            k => k.map(|k| k as usize),
        },
    };
    let (prompt_ids, inputs, mode) = match api {
        Api::Chat => match chat_prompt(&s, &obj)? {
            (ChatPrompt::Ids(ids), mode) => (ids, None, mode),
            (ChatPrompt::Images { text, images }, mode) => {
                // Downloads and the vision tower block: run them off the async executor.
                let s2 = s.clone();
                let p = tokio::task::spawn_blocking(move || image_prompt(&s2, &text, &images))
                    .await
                    .map_err(|e| {
                        ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("internal error: preparing the images failed: {e}"),
                        )
                    })??;
                (p.ids, Some(p.inputs), mode)
            }
        },
        Api::Completion => (completion_prompt(&s, &obj)?, None, ChatMode::default()),
    };
    if mode.tools {
        // The model ends a tool-calling step with `<|tool_response>` (the client runs the tool).
        c.stop_ids.extend(s.parsers.tool_response_id);
    }
    let max_tokens = match (c.max_tokens, api) {
        (Some(n), _) => n,
        // vLLM's defaults: completions 16, chat the rest of the model length.
        (None, Api::Completion) => 16,
        (None, Api::Chat) => s.max_model_len.saturating_sub(prompt_ids.len()).max(1),
    };
    let prompt_tokens = prompt_ids.len();
    let handle = s
        .engine
        .submit(EngineRequest {
            prompt_ids,
            max_tokens,
            sampling: c.sampling,
            stop_ids: c.stop_ids.clone(),
            logprobs: top_logprobs,
            inputs,
        })
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let job = Job {
        handle,
        prompt_tokens,
        stop: c.stop,
        stop_ids: c.stop_ids,
        logprobs: top_logprobs.is_some(),
        keep_special: mode.parsed(),
    };
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let (id, object, chunk_object) = match api {
        Api::Chat => (
            format!("chatcmpl-{n}"),
            "chat.completion",
            "chat.completion.chunk",
        ),
        Api::Completion => (format!("cmpl-{n}"), "text_completion", "text_completion"),
    };
    let created = now_secs();
    let model = s.model_name.clone();
    if c.stream {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let include_usage = c.include_usage;
        let base = json!({"id": id, "object": chunk_object, "created": created, "model": model});
        let chunk = move |choices: Value, usage: Option<Value>| -> Bytes {
            let mut v = base.clone();
            v["choices"] = choices;
            if let Some(u) = usage {
                v["usage"] = u;
            }
            Bytes::from(format!("data: {v}\n\n"))
        };
        if api == Api::Chat {
            let _ = tx.send(chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                None,
            ));
        }
        let tx2 = tx.clone();
        let mut offset = 0usize;
        let mut out = ChatOutput::new(mode);
        let emit = move |o: Out| -> bool {
            let bytes = match o {
                Out::Delta { text, logprobs } => {
                    let lp = if top_logprobs.is_some() {
                        logprobs_json(api, &logprobs, offset)
                    } else {
                        Value::Null
                    };
                    offset += text.len();
                    let choice = match api {
                        Api::Chat => {
                            let parsed = out.push(&text);
                            if out.parser.is_some() && parsed.is_empty() && logprobs.is_empty() {
                                return true;
                            }
                            json!({"index": 0, "delta": out.delta_json(&parsed), "logprobs": lp, "finish_reason": null})
                        }
                        Api::Completion => {
                            json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": null})
                        }
                    };
                    vec![chunk(json!([choice]), None)]
                }
                Out::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut v = Vec::new();
                    let choice = match api {
                        Api::Chat => {
                            let tail = out.finish();
                            if !tail.is_empty() {
                                v.push(chunk(
                                    json!([{"index": 0, "delta": out.delta_json(&tail), "logprobs": null, "finish_reason": null}]),
                                    None,
                                ));
                            }
                            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": out.finish_reason(finish_reason)})
                        }
                        Api::Completion => {
                            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason})
                        }
                    };
                    v.push(chunk(json!([choice]), None));
                    if include_usage {
                        v.push(chunk(
                            json!([]),
                            Some(usage(prompt_tokens, completion_tokens)),
                        ));
                    }
                    v.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    v
                }
                Out::Error(e) => {
                    let err = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e).body();
                    vec![
                        Bytes::from(format!("data: {err}\n\n")),
                        Bytes::from_static(b"data: [DONE]\n\n"),
                    ]
                }
            };
            bytes.into_iter().all(|b| tx.send(b).is_ok())
        };
        spawn_drive(s.clone(), job, emit, move || tx2.is_closed())?;
        let resp = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(RxStream(rx)))
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        return Ok(resp);
    }

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Out>();
    let tx2 = tx.clone();
    spawn_drive(
        s.clone(),
        job,
        move |o| tx.send(o).is_ok(),
        move || tx2.is_closed(),
    )?;
    let mut text = String::new();
    let mut lps = Vec::new();
    let mut done = None;
    while let Some(o) = rx.recv().await {
        match o {
            Out::Delta { text: t, logprobs } => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Out::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                done = Some((finish_reason, prompt_tokens, completion_tokens));
                break;
            }
            Out::Error(e) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)),
        }
    }
    let Some((finish_reason, p, c)) = done else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request ended without a result",
        ));
    };
    let lp = if top_logprobs.is_some() {
        logprobs_json(api, &lps, 0)
    } else {
        Value::Null
    };
    let choice = match api {
        Api::Chat => {
            let mut out = ChatOutput::new(mode);
            let mut all = out.push(&text);
            all.extend(out.finish());
            json!({
                "index": 0,
                "message": out.message_json(&all),
                "logprobs": lp,
                "finish_reason": out.finish_reason(finish_reason),
            })
        }
        Api::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": lp,
            "finish_reason": finish_reason,
        }),
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(p, c),
        }),
    ))
}

/// The OpenAI message fields of a chat completion's raw text. Without a parser the text is the
/// `content`; with the Gemma 4 parsers the thought channel becomes `reasoning_content` and tool calls
/// `tool_calls` (given ids here), as vLLM returns them.
struct ChatOutput {
    parser: Option<Gemma4Parser>,
    /// Ids of the tool calls so far, by index.
    call_ids: Vec<String>,
}

impl ChatOutput {
    fn new(mode: ChatMode) -> ChatOutput {
        let parser = mode.parsed().then(|| {
            let p = Gemma4Parser::new(mode.reasoning, mode.tools);
            if mode.in_thought {
                p.in_thought()
            } else {
                p
            }
        });
        ChatOutput {
            parser,
            call_ids: Vec::new(),
        }
    }

    fn track(&mut self, d: ParsedDelta) -> ParsedDelta {
        for c in &d.tool_calls {
            debug_assert_eq!(c.index, self.call_ids.len());
            self.call_ids
                .push(format!("chatcmpl-tool-{:016x}", rand::random::<u64>()));
        }
        d
    }

    fn push(&mut self, text: &str) -> ParsedDelta {
        match &mut self.parser {
            Some(p) => {
                let d = p.push(text);
                self.track(d)
            }
            None => ParsedDelta {
                content: text.to_string(),
                ..Default::default()
            },
        }
    }

    fn finish(&mut self) -> ParsedDelta {
        match &mut self.parser {
            Some(p) => {
                let d = p.finish();
                self.track(d)
            }
            None => ParsedDelta::default(),
        }
    }

    fn tool_call_json(&self, c: &ParsedToolCall, streaming: bool) -> Value {
        let mut v = json!({
            "id": self.call_ids.get(c.index),
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        });
        if streaming {
            v["index"] = json!(c.index);
        }
        v
    }

    /// A streaming `delta`: the fields this piece of text contributed.
    fn delta_json(&self, d: &ParsedDelta) -> Value {
        let mut m = Map::new();
        if !d.reasoning.is_empty() {
            m.insert("reasoning_content".into(), json!(d.reasoning));
        }
        if !d.content.is_empty() || self.parser.is_none() {
            m.insert("content".into(), json!(d.content));
        }
        if !d.tool_calls.is_empty() {
            let calls: Vec<Value> = d
                .tool_calls
                .iter()
                .map(|c| self.tool_call_json(c, true))
                .collect();
            m.insert("tool_calls".into(), json!(calls));
        }
        Value::Object(m)
    }

    /// The non-streaming `message` of the whole output `all`. With tool calls the content is the
    /// text around them, trimmed, or null when there is none (as vLLM).
    fn message_json(&self, all: &ParsedDelta) -> Value {
        if self.parser.is_none() {
            return json!({"role": "assistant", "content": all.content});
        }
        let content = if all.tool_calls.is_empty() {
            json!(all.content)
        } else {
            let t = all.content.trim();
            if t.is_empty() {
                Value::Null
            } else {
                json!(t)
            }
        };
        let reasoning = if all.reasoning.is_empty() {
            Value::Null
        } else {
            json!(all.reasoning)
        };
        let calls: Vec<Value> = all
            .tool_calls
            .iter()
            .map(|c| self.tool_call_json(c, false))
            .collect();
        json!({"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls})
    }

    /// "tool_calls" when the model called tools and stopped by itself.
    fn finish_reason(&self, reason: &'static str) -> &'static str {
        if reason == "stop" && !self.call_ids.is_empty() {
            "tool_calls"
        } else {
            reason
        }
    }
}

/// A tokio receiver as the body stream of a response.
struct RxStream(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl futures_core::Stream for RxStream {
    type Item = std::result::Result<Bytes, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|o| o.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_holdback() {
        let stops = vec!["END".to_string(), "xy".to_string()];
        assert_eq!(safe_end("hello E", &stops), 6);
        assert_eq!(safe_end("hello EN", &stops), 6);
        assert_eq!(safe_end("hello x", &stops), 6);
        assert_eq!(safe_end("hello", &stops), 5);
        assert_eq!(safe_end("héllo", &[]), "héllo".len());
        assert_eq!(find_stop("a xy b END", &stops), Some(2));
        assert_eq!(find_stop("abc", &stops), None);
    }

    /// What a client assembles from streamed deltas: reasoning, content, and tool calls by index.
    fn stream_script(
        mode: ChatMode,
        pieces: &[&str],
    ) -> (String, String, Vec<Value>, &'static str) {
        let mut out = ChatOutput::new(mode);
        let mut deltas: Vec<Value> = Vec::new();
        for p in pieces {
            let d = out.push(p);
            if !d.is_empty() {
                deltas.push(out.delta_json(&d));
            }
        }
        let tail = out.finish();
        if !tail.is_empty() {
            deltas.push(out.delta_json(&tail));
        }
        let (mut reasoning, mut content, mut calls) = (String::new(), String::new(), Vec::new());
        for d in &deltas {
            let keys: Vec<&String> = d.as_object().unwrap().keys().collect();
            assert!(!keys.is_empty(), "empty delta");
            for k in keys {
                assert!(
                    ["reasoning_content", "content", "tool_calls"].contains(&k.as_str()),
                    "{d}"
                );
            }
            reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
            content.push_str(d["content"].as_str().unwrap_or(""));
            if let Some(tc) = d["tool_calls"].as_array() {
                calls.extend(tc.iter().cloned());
            }
        }
        (reasoning, content, calls, out.finish_reason("stop"))
    }

    fn message_script(mode: ChatMode, text: &str, reason: &'static str) -> (Value, &'static str) {
        let mut out = ChatOutput::new(mode);
        let mut all = out.push(text);
        all.extend(out.finish());
        (out.message_json(&all), out.finish_reason(reason))
    }

    const GEMMA4: ChatMode = ChatMode {
        reasoning: true,
        tools: true,
        in_thought: false,
    };

    const SCRIPT: &str = "<|channel>thought\nThe user wants weather.<channel|>Checking.<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:3}<tool_call|><|tool_call>call:get_time{}<tool_call|>";

    #[test]
    fn chat_output_message_with_reasoning_and_tool_calls() {
        let (msg, reason) = message_script(GEMMA4, SCRIPT, "stop");
        assert_eq!(reason, "tool_calls");
        assert_eq!(msg["role"], "assistant");
        assert_eq!(msg["content"], "Checking.");
        assert_eq!(msg["reasoning_content"], "The user wants weather.");
        let calls = msg["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(
            calls[0]["function"]["arguments"],
            r#"{"city": "Paris", "days": 3}"#
        );
        assert_eq!(calls[1]["function"]["name"], "get_time");
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        let ids: Vec<&str> = calls.iter().map(|c| c["id"].as_str().unwrap()).collect();
        assert!(
            ids.iter().all(|i| i.starts_with("chatcmpl-tool-")),
            "{ids:?}"
        );
        assert_ne!(ids[0], ids[1]);
        assert!(calls[0].get("index").is_none());
        // Cut off by the length limit: the reason stays.
        assert_eq!(message_script(GEMMA4, SCRIPT, "length").1, "length");
        // Only tool calls: content is null.
        let (msg, _) = message_script(GEMMA4, "<|tool_call>call:f{}<tool_call|>\n", "stop");
        assert_eq!(msg["content"], Value::Null);
        assert_eq!(msg["reasoning_content"], Value::Null);
    }

    #[test]
    fn chat_output_stream_equals_message_at_every_split() {
        let (msg, _) = message_script(GEMMA4, SCRIPT, "stop");
        for i in (0..=SCRIPT.len()).filter(|&i| SCRIPT.is_char_boundary(i)) {
            for j in (i..=SCRIPT.len()).step_by(7) {
                let pieces = [&SCRIPT[..i], &SCRIPT[i..j], &SCRIPT[j..]];
                let (reasoning, content, calls, reason) = stream_script(GEMMA4, &pieces);
                assert_eq!(reason, "tool_calls");
                assert_eq!(reasoning, msg["reasoning_content"].as_str().unwrap());
                assert_eq!(content, msg["content"].as_str().unwrap());
                assert_eq!(calls.len(), 2, "{pieces:?}");
                for (k, c) in calls.iter().enumerate() {
                    assert_eq!(c["index"], k);
                    assert_eq!(c["type"], "function");
                    assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));
                    assert_eq!(c["function"], msg["tool_calls"][k]["function"]);
                }
            }
        }
    }

    #[test]
    fn chat_output_without_parsers_is_plain_content() {
        let mode = ChatMode::default();
        let (msg, reason) = message_script(mode, SCRIPT, "stop");
        assert_eq!(msg, json!({"role": "assistant", "content": SCRIPT}));
        assert_eq!(reason, "stop");
        let out = ChatOutput::new(mode);
        assert_eq!(
            out.delta_json(&ParsedDelta::default()),
            json!({"content": ""})
        );
    }

    #[test]
    fn chat_output_reasoning_only_keeps_tool_text() {
        let mode = ChatMode {
            reasoning: true,
            tools: false,
            in_thought: false,
        };
        let (msg, reason) = message_script(mode, SCRIPT, "stop");
        assert_eq!(reason, "stop");
        assert_eq!(msg["reasoning_content"], "The user wants weather.");
        assert_eq!(
            msg["content"].as_str().unwrap(),
            &SCRIPT[SCRIPT.find("Checking.").unwrap()..]
        );
        assert_eq!(msg["tool_calls"], json!([]));
        // A prompt that opened the thought channel: output starts as reasoning.
        let mode = ChatMode {
            in_thought: true,
            ..mode
        };
        let (msg, _) = message_script(mode, "hmm<channel|>Yes.", "stop");
        assert_eq!(msg["reasoning_content"], "hmm");
        assert_eq!(msg["content"], "Yes.");
    }

    #[test]
    fn chat_output_malformed_call_is_content() {
        let text = "<|tool_call>call:f{a:<|\"|>x}<tool_call|>";
        let (msg, reason) = message_script(GEMMA4, text, "stop");
        assert_eq!(reason, "stop");
        assert_eq!(msg["content"], text);
        assert_eq!(msg["tool_calls"], json!([]));
        let (_, content, calls, _) =
            stream_script(GEMMA4, &[&text[..5], &text[5..20], &text[20..]]);
        assert_eq!(content, text);
        assert!(calls.is_empty());
    }
}
