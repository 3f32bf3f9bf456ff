//! `e4m3 quantize`: BF16/F32 Gemma 3 checkpoint -> one of the four FP8 (E4M3) checkpoint formats, written
//! exactly as the upstream tools write them (../shared/reference/fp8-formats.md sections 2-5 and 8.1):
//!
//! | scheme | tool | weight scale | activations | config |
//! |---|---|---|---|---|
//! | `fp8-static` (A) | ModelOpt `FP8_DEFAULT_CFG` | `weight_scale` F32 `[]` | `input_scale` F32 `[]` (calibrated) | `hf_quant_config.json` + `quantization_config` (modelopt) |
//! | `fp8-dynamic` (B) | llm-compressor `FP8_DYNAMIC` | `weight_scale` model dtype `[out, 1]` | dynamic per token | compressed-tensors `quantization_config` |
//! | `fp8-block-wo` (C) | ModelOpt `fp8_pb_wo` | `weight_scale` F32 `[ceil(out/b), 1, ceil(in/b), 1]` | none | `hf_quant_config.json` + `quantization_config` (modelopt) |
//! | `fp8-block` (D) | transformers `FineGrainedFP8Config` | `weight_scale_inv` F32 `[ceil(out/b), ceil(in/b)]` | dynamic 1 x b groups | `quant_method: fp8` |
//!
//! Every scale is a dequantization multiplier (`W ~ decode(code) * scale`) and every code is
//! `fp8::encode(W / scale)` (f32 division, clamp to +-448, RNE) with the scale as stored (for B: after rounding
//! to the model dtype). `max` weight calibration gives `scale = amax / 448` (f32 division); `mse` searches
//! `amax / 448 * f` for 65 factors `f` in `[0.5, 1]` and keeps the one with the smallest squared error
//! (ties keep the larger scale, so the `mse` error is never above the `max` error).
//!
//! All-zero groups (no information in the weight): A and C get scale 1.0 (ModelOpt's `export_amax` maps an
//! amax of 0 to 448), B gets `max(0, f32::EPSILON)` as compressed-tensors clamps scales to f32 eps (rounded to
//! the model dtype), D gets 1.0 (transformers' `safe_max_abs`). Codes of zeros are 0 in every case.
//!
//! Only the Linear layers of the text model are quantized (`q/k/v/o_proj`, `gate/up/down_proj` of every
//! layer); embeddings, norms, lm_head and any vision tensors are copied byte for byte.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::backend::{Backend, Batch, CacheConfig, LogitsFor, SeqStep};
use crate::checkpoint::{Checkpoint, Weight};
use crate::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::fp8::{decode, encode, E4M3_MAX};
use crate::model::Model;
use crate::tensor::DType;
use crate::tokenizer::Tokenizer;

/// The calibration text shipped with the project (original English prose and a few short mixed samples).
pub const DEFAULT_CALIB_TEXT: &str = include_str!("../../tools/calib.txt");

/// The ModelOpt release whose export format (hf_quant_config.json, config.json `quantization_config`,
/// tensor names) this writer reproduces; written as `producer.version`.
pub const MODELOPT_FORMAT_VERSION: &str = "0.39.0";
/// The compressed-tensors release whose `quantization_config` layout this writer reproduces (`version`).
pub const COMPRESSED_TENSORS_FORMAT_VERSION: &str = "0.12.2";

/// Number of candidate scales of the MSE search (factors 0.5, ..., 1.0 of amax/448).
pub const MSE_CANDIDATES: usize = 65;

/// Text-model tensor prefixes, most specific first (as `model.rs` reads them).
const TEXT_PREFIXES: [&str; 3] = ["model.language_model.", "language_model.model.", "model."];
/// The image parts (Gemma 3's tower and projector, Gemma 4's tower or the 12B's encoder-free embedder, and
/// `embed_vision`): copied as they are and named in each format's exclusion list.
const VISION_PREFIXES: [(&str, &str); 8] = [
    ("model.vision_tower.", "model.vision_tower"),
    (
        "model.multi_modal_projector.",
        "model.multi_modal_projector",
    ),
    ("model.embed_vision.", "model.embed_vision"),
    ("model.vision_embedder.", "model.vision_embedder"),
    ("vision_tower.", "vision_tower"),
    ("multi_modal_projector.", "multi_modal_projector"),
    ("embed_vision.", "embed_vision"),
    ("vision_embedder.", "vision_embedder"),
];
/// The Linear layers of one Gemma 3 decoder layer, with the graph node that feeds each.
pub const LINEARS: [(&str, &str); 7] = [
    ("self_attn.q_proj", "input_norm"),
    ("self_attn.k_proj", "input_norm"),
    ("self_attn.v_proj", "input_norm"),
    ("self_attn.o_proj", "attn"),
    ("mlp.gate_proj", "ffn_norm"),
    ("mlp.up_proj", "ffn_norm"),
    ("mlp.down_proj", "gelu_mul"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// A: ModelOpt FP8 per-tensor W8A8 with static input scales.
    Fp8Static,
    /// B: compressed-tensors FP8_DYNAMIC (per-channel weights, dynamic per-token activations).
    Fp8Dynamic,
    /// C: ModelOpt fp8_pb_wo (block weights, no activation quantization).
    Fp8BlockWo,
    /// D: transformers FineGrainedFP8 (block weights, dynamic 1 x block activations).
    Fp8Block,
}

impl Scheme {
    pub const ALL: [Scheme; 4] = [
        Scheme::Fp8Static,
        Scheme::Fp8Dynamic,
        Scheme::Fp8BlockWo,
        Scheme::Fp8Block,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Fp8Static => "fp8-static",
            Scheme::Fp8Dynamic => "fp8-dynamic",
            Scheme::Fp8BlockWo => "fp8-block-wo",
            Scheme::Fp8Block => "fp8-block",
        }
    }
    pub fn is_block(self) -> bool {
        matches!(self, Scheme::Fp8BlockWo | Scheme::Fp8Block)
    }
    fn is_modelopt(self) -> bool {
        matches!(self, Scheme::Fp8Static | Scheme::Fp8BlockWo)
    }
}

impl std::str::FromStr for Scheme {
    type Err = Error;
    fn from_str(s: &str) -> Result<Scheme> {
        Scheme::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown scheme `{s}` (expected fp8-static, fp8-dynamic, fp8-block-wo or fp8-block)"
                ))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightCalib {
    /// scale = amax / 448
    Max,
    /// scale searched in [0.5, 1] x amax / 448 for the smallest squared error of the group.
    Mse,
}

/// Where the calibration sequences come from.
#[derive(Debug, Clone)]
pub enum CalibSource {
    /// The text shipped with the project (`DEFAULT_CALIB_TEXT`).
    Default,
    /// A text file, tokenized with the source checkpoint's tokenizer.
    File(PathBuf),
    /// Text, tokenized with the source checkpoint's tokenizer.
    Text(String),
    /// Token ids, used as they are (no BOS added, no cutting); `samples`/`seq_len` are ignored.
    Ids(Vec<Vec<u32>>),
}

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub scheme: Scheme,
    /// Block edge for the block schemes (C, D): blocks are `block x block`.
    pub block: usize,
    pub weight_calib: WeightCalib,
    /// Also write FP8 KV-cache scales (calibrated amax of the roped keys and of the values / 448).
    pub kv_cache_fp8: bool,
    /// Glob patterns (`*`, `?`) of modules to leave unquantized, matched against the stored module name
    /// (`model.layers.3.mlp.down_proj`) and against the name without the text prefix (`layers.3.mlp.down_proj`).
    pub ignore: Vec<String>,
    pub calib: CalibSource,
    /// Number of calibration sequences.
    pub samples: usize,
    /// Tokens per calibration sequence (BOS included).
    pub seq_len: usize,
    /// Sequences per calibration step.
    pub calib_batch: usize,
    /// Show progress bars on stderr.
    pub progress: bool,
}

impl QuantizeOptions {
    pub fn new(scheme: Scheme) -> QuantizeOptions {
        QuantizeOptions {
            scheme,
            block: 128,
            weight_calib: WeightCalib::Max,
            kv_cache_fp8: false,
            ignore: Vec::new(),
            calib: CalibSource::Default,
            samples: 64,
            seq_len: 256,
            calib_batch: 4,
            progress: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub out_dir: PathBuf,
    /// Stored module names that were quantized / left unquantized by `--ignore`.
    pub quantized: Vec<String>,
    pub ignored: Vec<String>,
    /// Tensors written to model.safetensors.
    pub tensors: usize,
    pub bytes_written: u64,
    /// Calibration: sequences and tokens run (0 when no calibration was needed), seconds spent.
    pub calib_sequences: usize,
    pub calib_tokens: usize,
    pub calib_seconds: f64,
    /// Calibrated amax per tapped node (`layers.0.input_norm`, `layers.0.k_rope`, ...).
    pub amax: BTreeMap<String, f32>,
    pub copied_files: Vec<String>,
    pub quantization_config: Value,
}

/// How scales tile a weight `[rows, cols]`: one scale per `[group_rows, group_cols]` block (the last block of
/// a row or column of blocks may be partial). Per tensor: the whole matrix; per channel: `[1, cols]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub rows: usize,
    pub cols: usize,
    pub group_rows: usize,
    pub group_cols: usize,
}

impl Grid {
    pub fn new(rows: usize, cols: usize, group_rows: usize, group_cols: usize) -> Grid {
        Grid {
            rows,
            cols,
            group_rows: group_rows.min(rows).max(1),
            group_cols: group_cols.min(cols).max(1),
        }
    }
    pub fn grid_rows(&self) -> usize {
        self.rows.div_ceil(self.group_rows)
    }
    pub fn grid_cols(&self) -> usize {
        self.cols.div_ceil(self.group_cols)
    }
    pub fn groups(&self) -> usize {
        self.grid_rows() * self.grid_cols()
    }
    /// Index of the scale of element (r, c).
    pub fn group_of(&self, r: usize, c: usize) -> usize {
        (r / self.group_rows) * self.grid_cols() + c / self.group_cols
    }
    /// The elements of group `g`, row by row.
    pub fn gather(&self, w: &[f32], g: usize) -> Vec<f32> {
        let (gr, gc) = (g / self.grid_cols(), g % self.grid_cols());
        let (r0, c0) = (gr * self.group_rows, gc * self.group_cols);
        let (r1, c1) = (
            (r0 + self.group_rows).min(self.rows),
            (c0 + self.group_cols).min(self.cols),
        );
        let mut out = Vec::with_capacity((r1 - r0) * (c1 - c0));
        for r in r0..r1 {
            out.extend_from_slice(&w[r * self.cols + c0..r * self.cols + c1]);
        }
        out
    }
}

/// The scale grid of a `[rows, cols]` weight under `scheme`.
pub fn scheme_grid(scheme: Scheme, rows: usize, cols: usize, block: usize) -> Grid {
    match scheme {
        Scheme::Fp8Static => Grid::new(rows, cols, rows, cols),
        Scheme::Fp8Dynamic => Grid::new(rows, cols, 1, cols),
        Scheme::Fp8BlockWo | Scheme::Fp8Block => Grid::new(rows, cols, block, block),
    }
}

/// Round a scale to the dtype it is stored in.
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Squared error of quantizing `values` with `scale`: `sum (w - decode(encode(w / s)) * s)^2`.
pub fn quant_error(values: &[f32], scale: f32) -> f64 {
    values
        .iter()
        .map(|&w| {
            let d = (w - decode(encode(w / scale)) * scale) as f64;
            d * d
        })
        .sum()
}

/// The stored scale of one group, per the scheme's zero rule and dtype (see the module docs).
fn group_scale(values: &[f32], scheme: Scheme, calib: WeightCalib, dtype: DType) -> f32 {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let base = amax / E4M3_MAX;
    if amax == 0.0 || base == 0.0 || !base.is_finite() {
        return match scheme {
            Scheme::Fp8Dynamic => round_to(dtype, f32::EPSILON),
            _ => 1.0,
        };
    }
    let max_scale = round_to(dtype, base);
    match calib {
        WeightCalib::Max => max_scale,
        WeightCalib::Mse => {
            let mut best = (max_scale, quant_error(values, max_scale));
            for k in (0..MSE_CANDIDATES - 1).rev() {
                let f = 0.5 + 0.5 * k as f32 / (MSE_CANDIDATES - 1) as f32;
                let s = round_to(dtype, base * f);
                if s <= 0.0 || s == best.0 {
                    continue;
                }
                let e = quant_error(values, s);
                if e < best.1 {
                    best = (s, e);
                }
            }
            best.0
        }
    }
}

/// Scales of a weight (row-major values `[rows, cols]`) for `scheme`, one per group of `scheme_grid`, as stored
/// (`dtype` is the scale's dtype: the model dtype for B, F32 otherwise).
pub fn weight_scales(
    w: &[f32],
    grid: &Grid,
    scheme: Scheme,
    calib: WeightCalib,
    dtype: DType,
) -> Vec<f32> {
    (0..grid.groups())
        .into_par_iter()
        .map(|g| group_scale(&grid.gather(w, g), scheme, calib, dtype))
        .collect()
}

/// E4M3 codes of a weight given its scales: `encode(w / scale_of_group)`.
pub fn weight_codes(w: &[f32], grid: &Grid, scales: &[f32]) -> Vec<u8> {
    let cols = grid.cols;
    let mut out = vec![0u8; w.len()];
    out.par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (o, row))| {
            for (c, (o, &x)) in o.iter_mut().zip(row).enumerate() {
                *o = encode(x / scales[grid.group_of(r, c)]);
            }
        });
    out
}

/// Glob match with `*` (any run) and `?` (one char).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Calibration token sequences from text: cut into sequences of `seq_len` tokens (a BOS first when the
/// tokenizer has one), at most `samples` of them; the last one may be shorter.
pub fn calib_sequences(
    tok: &Tokenizer,
    text: &str,
    samples: usize,
    seq_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let ids = tok.encode(text, false)?;
    if ids.is_empty() {
        return Err(Error::invalid(
            "calibration text tokenizes to no tokens".to_string(),
        ));
    }
    let bos = tok.bos_id();
    let chunk = seq_len - usize::from(bos.is_some() && seq_len > 1);
    Ok(ids
        .chunks(chunk.max(1))
        .take(samples)
        .map(|c| {
            bos.filter(|_| seq_len > 1)
                .into_iter()
                .chain(c.iter().copied())
                .collect()
        })
        .collect())
}

/// The nodes whose amax the calibration keeps, for each layer.
pub fn calib_taps(layers: usize) -> Vec<String> {
    let mut taps = Vec::new();
    for l in 0..layers {
        for n in [
            "input_norm",
            "attn",
            "ffn_norm",
            "gelu_mul",
            "k_rope",
            "v_proj",
        ] {
            taps.push(format!("layers.{l}.{n}"));
        }
    }
    taps
}

/// Run the model on the CPU backend over `sequences` (`batch` per step) and return the amax of every node of
/// `calib_taps` over all tokens.
pub fn calibrate(
    model: &Model,
    sequences: &[Vec<u32>],
    batch: usize,
    progress: bool,
) -> Result<BTreeMap<String, f32>> {
    let batch = batch.max(1);
    let max_len = sequences.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
    let mut runner = CpuBackend.load(
        &model.graph,
        &model.weights,
        CacheConfig::new(batch, max_len),
    )?;
    // Gemma 4 layers without k/v projections (KV sharing, k_eq_v) lack some of the tapped nodes.
    let taps: Vec<String> = calib_taps(model.config.num_hidden_layers)
        .into_iter()
        .filter(|t| model.graph.find(t).is_some())
        .collect();
    let mut amax: BTreeMap<String, f32> = taps.iter().map(|t| (t.clone(), 0.0)).collect();
    let steps = sequences.len().div_ceil(batch);
    let pb = bar(progress, steps as u64, "calibrating", "batches");
    for group in sequences.chunks(batch) {
        let b = Batch {
            seqs: group
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .map(|(slot, s)| SeqStep {
                    slot,
                    start_pos: 0,
                    tokens: s.clone(),
                    // Not `None`: the CPU kernels reject a step that selects zero rows (rayon chunk size 0).
                    logits: LogitsFor::Last,
                })
                .collect(),
        };
        let out = runner.step(&b, &taps)?;
        for (name, m) in &out.taps {
            let a = m.data.iter().fold(0f32, |a, v| a.max(v.abs()));
            if m.data.iter().any(|v| v.is_nan()) {
                return Err(Error::invalid(format!(
                    "calibration: node `{name}` produced NaN"
                )));
            }
            let e = amax.entry(name.clone()).or_insert(0.0);
            *e = e.max(a);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(amax)
}

fn bar(show: bool, len: u64, what: &str, unit: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:40}}] {{pos}}/{{len}} {unit} {{elapsed}} {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb
}

/// One quantized Linear.
struct QModule {
    /// Stored module name (`model.layers.0.self_attn.q_proj`).
    stored: String,
    /// Canonical weight name (`layers.0.self_attn.q_proj.weight`).
    canonical: String,
    /// Node feeding it (`layers.0.input_norm`).
    input_node: String,
    rows: usize,
    cols: usize,
    /// Fused experts (Gemma 4 MoE): the weight is `[experts, rows, cols]`, each expert quantized on its
    /// own grid and the scales stacked `[experts, ...]`; 0 for a 2-D Linear.
    experts: usize,
    grid: Grid,
    scales: Vec<f32>,
}

/// What one output tensor is made of.
enum Source {
    Copy(Weight),
    Codes(usize),
    Scales(usize),
    Bytes(Vec<u8>),
}

struct Out {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    src: Source,
}

fn to_bytes(dtype: DType, vals: &[f32]) -> Vec<u8> {
    match dtype {
        DType::BF16 => vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::F16 => vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| Error::invalid(format!("serializing {}: {e}", path.display())))?;
    s.push('\n');
    fs::write(path, s).map_err(|e| Error::io(path, e))
}

fn strip_text_prefix(name: &str) -> Option<(&'static str, &str)> {
    TEXT_PREFIXES
        .iter()
        .find_map(|p| name.strip_prefix(p).map(|rest| (*p, rest)))
}

/// Quantize the checkpoint in `from` into `to` (see the module docs).
pub fn quantize(from: &Path, to: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    if opts.scheme.is_block() && opts.block == 0 {
        return Err(Error::invalid("--block must be at least 1, got 0"));
    }
    let cfg_path = from.join("config.json");
    if !from.is_dir() {
        return Err(Error::file(from, "source model directory not found"));
    }
    if !cfg_path.is_file() {
        return Err(Error::file(
            &cfg_path,
            "not found (the source checkpoint needs a config.json)",
        ));
    }
    let same_dir = match (fs::canonicalize(from), fs::canonicalize(to)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same_dir {
        return Err(Error::file(
            to,
            "the output directory must differ from the source directory",
        ));
    }
    let mut config = read_json(&cfg_path)?;
    for (field, q) in [
        ("quantization_config", config.get("quantization_config")),
        (
            "text_config.quantization_config",
            config
                .get("text_config")
                .and_then(|t| t.get("quantization_config")),
        ),
    ] {
        if let Some(q) = q {
            let method = q
                .get("quant_method")
                .and_then(|m| m.as_str())
                .unwrap_or("?");
            return Err(Error::field(
                &cfg_path,
                field,
                format!("the source is already quantized (quant_method `{method}`); quantize a BF16 or F32 checkpoint"),
            ));
        }
    }
    if from.join("hf_quant_config.json").is_file() {
        return Err(Error::file(
            from.join("hf_quant_config.json"),
            "the source is already a ModelOpt quantized checkpoint; quantize a BF16 or F32 checkpoint",
        ));
    }
    let ck = Checkpoint::open(from)?;
    if let Some(w) = ck.tensors.values().find(|w| w.dtype == DType::F8E4M3) {
        return Err(Error::tensor(
            &w.name,
            format!(
                "is already FP8 (F8_E4M3, in {}); quantize a BF16 or F32 checkpoint",
                w.file.display()
            ),
        ));
    }
    let model = Model::load(from)?;
    let c = &model.config;
    if c.is_gemma4() && opts.kv_cache_fp8 {
        return Err(Error::invalid(
            "--kv-cache-fp8 is not supported for Gemma 4 checkpoints yet (KV scales are calibrated on \
             Gemma 3's k/v nodes)",
        ));
    }

    // Stored names of the text model's tensors.
    let mut stored_of: BTreeMap<String, String> = BTreeMap::new();
    for name in ck.tensors.keys() {
        if let Some((_, rest)) = strip_text_prefix(name) {
            stored_of.insert(rest.to_string(), name.clone());
        }
    }
    let text_prefix = stored_of
        .get("embed_tokens.weight")
        .and_then(|s| strip_text_prefix(s))
        .map(|(p, _)| p)
        .unwrap_or("model.");

    // Which Linears are quantized.
    let mut modules: Vec<QModule> = Vec::new();
    let mut ignored = Vec::new();
    for l in 0..c.num_hidden_layers {
        for (lin, input) in LINEARS {
            let canonical = format!("layers.{l}.{lin}.weight");
            // Gemma 4: KV-shared layers have no k/v, k_eq_v full layers no v.
            if c.is_gemma4()
                && !model
                    .linear_schemes
                    .contains_key(&format!("layers.{l}.{lin}"))
            {
                continue;
            }
            let stored_w = stored_of.get(&canonical).ok_or_else(|| {
                Error::tensor(&canonical, format!("missing from {}", from.display()))
            })?;
            let stored = stored_w.trim_end_matches(".weight").to_string();
            let short = format!("layers.{l}.{lin}");
            if opts
                .ignore
                .iter()
                .any(|p| glob_match(p, &stored) || glob_match(p, &short))
            {
                ignored.push(stored);
                continue;
            }
            let w = &model.weights[&canonical];
            let (rows, cols) = (w.shape[0], w.shape[1]);
            modules.push(QModule {
                stored,
                canonical,
                input_node: format!("layers.{l}.{input}"),
                rows,
                cols,
                experts: 0,
                grid: scheme_grid(opts.scheme, rows, cols, opts.block),
                scales: Vec::new(),
            });
        }
    }
    let unmatched: Vec<&String> = opts
        .ignore
        .iter()
        .filter(|p| {
            !ignored.iter().any(|s| {
                glob_match(p, s) || strip_text_prefix(s).is_some_and(|(_, r)| glob_match(p, r))
            })
        })
        .collect();
    if let Some(p) = unmatched.first() {
        return Err(Error::invalid(format!(
            "--ignore `{p}` matches no quantizable module (names look like `{}layers.0.mlp.down_proj` or `layers.0.mlp.down_proj`)",
            text_prefix
        )));
    }

    // Gemma 4: fused experts take the block schemes per expert; every other Linear that is not one of the
    // attention/MLP projections (router, per-layer-embedding projections) stays in the source dtype and
    // is listed with the ignored modules so that loaders keep it dense.
    if c.is_gemma4() {
        let quantized: std::collections::BTreeSet<String> =
            modules.iter().map(|m| m.canonical.clone()).collect();
        for (module, scheme) in &model.linear_schemes {
            let canonical = format!("{module}.weight");
            if module == "lm_head" || quantized.contains(&canonical) {
                continue;
            }
            if let Some(w) = model.weights.get(module).filter(|w| w.shape.len() == 3) {
                // A fused expert tensor (named without `.weight`).
                let stored = stored_of
                    .get(module)
                    .cloned()
                    .unwrap_or_else(|| module.clone());
                if opts.scheme.is_block() && *scheme == crate::graph::QuantScheme::Dense {
                    let (e, rows, cols) = (w.shape[0], w.shape[1], w.shape[2]);
                    modules.push(QModule {
                        stored,
                        canonical: module.clone(),
                        input_node: String::new(),
                        rows,
                        cols,
                        experts: e,
                        grid: scheme_grid(opts.scheme, rows, cols, opts.block),
                        scales: Vec::new(),
                    });
                } else {
                    ignored.push(stored);
                }
                continue;
            }
            if let Some(stored_w) = stored_of.get(&canonical) {
                ignored.push(stored_w.trim_end_matches(".weight").to_string());
            }
        }
    }

    // Calibration.
    let need_calib = opts.scheme == Scheme::Fp8Static || opts.kv_cache_fp8;
    let (mut calib_sequences_n, mut calib_tokens, mut calib_seconds) = (0, 0, 0.0);
    let mut amax = BTreeMap::new();
    if need_calib {
        let t0 = Instant::now();
        let seqs = match &opts.calib {
            CalibSource::Ids(ids) => {
                if ids.iter().all(|s| s.is_empty()) {
                    return Err(Error::invalid("calibration: no token ids given"));
                }
                ids.clone()
            }
            src => {
                if opts.samples == 0 || opts.seq_len == 0 {
                    return Err(Error::invalid(format!(
                        "--samples and --seq-len must be at least 1 (got {} and {})",
                        opts.samples, opts.seq_len
                    )));
                }
                let text = match src {
                    CalibSource::File(p) => {
                        let t = fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                        if t.trim().is_empty() {
                            return Err(Error::file(p, "calibration text file is empty"));
                        }
                        t
                    }
                    CalibSource::Text(t) => {
                        if t.trim().is_empty() {
                            return Err(Error::invalid("calibration text is empty"));
                        }
                        t.clone()
                    }
                    _ => DEFAULT_CALIB_TEXT.to_string(),
                };
                let tok = Tokenizer::from_dir(from)?;
                calib_sequences(&tok, &text, opts.samples, opts.seq_len)?
            }
        };
        calib_sequences_n = seqs.len();
        calib_tokens = seqs.iter().map(|s| s.len()).sum();
        amax = calibrate(&model, &seqs, opts.calib_batch, opts.progress)?;
        calib_seconds = t0.elapsed().as_secs_f64();
    }

    // Weight scales.
    let model_dtype = model.weights["embed_tokens.weight"].dtype;
    let scale_dtype = match opts.scheme {
        Scheme::Fp8Dynamic => modules
            .first()
            .map(|m| model.weights[&m.canonical].dtype)
            .unwrap_or(model_dtype),
        _ => DType::F32,
    };
    let pb = bar(opts.progress, modules.len() as u64, "scales", "modules");
    for m in modules.iter_mut() {
        pb.set_message(m.stored.clone());
        let w = model.weights[&m.canonical].to_f32();
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::tensor(
                format!("{}.weight", m.stored),
                format!("element {i} is not finite ({})", w[i]),
            ));
        }
        m.scales = w
            .chunks(m.rows * m.cols)
            .flat_map(|we| weight_scales(we, &m.grid, opts.scheme, opts.weight_calib, scale_dtype))
            .collect();
        pb.inc(1);
    }
    pb.finish_and_clear();

    // The output tensors.
    let mut outs: Vec<Out> = Vec::new();
    let quantized_weights: BTreeMap<&str, usize> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| (m.canonical.as_str(), i))
        .collect();
    for (stored, w) in &ck.tensors {
        let canonical = strip_text_prefix(stored).map(|(_, r)| r);
        match canonical.and_then(|c| quantized_weights.get(c)) {
            Some(&i) => {
                let m = &modules[i];
                let lead: Vec<usize> = if m.experts > 0 {
                    vec![m.experts]
                } else {
                    vec![]
                };
                outs.push(Out {
                    name: stored.clone(),
                    dtype: DType::F8E4M3,
                    shape: [lead.clone(), vec![m.rows, m.cols]].concat(),
                    src: Source::Codes(i),
                });
                if m.experts > 0 {
                    // Fused experts: `{name}_scale` (C) / `{name}_scale_inv` (D), `[E, row blocks, col blocks]`.
                    let suffix = if opts.scheme == Scheme::Fp8Block {
                        "scale_inv"
                    } else {
                        "scale"
                    };
                    outs.push(Out {
                        name: format!("{}_{suffix}", m.stored),
                        dtype: scale_dtype,
                        shape: vec![m.experts, m.grid.grid_rows(), m.grid.grid_cols()],
                        src: Source::Scales(i),
                    });
                    continue;
                }
                let (name, shape) = match opts.scheme {
                    Scheme::Fp8Static => ("weight_scale", vec![]),
                    Scheme::Fp8Dynamic => ("weight_scale", vec![m.rows, 1]),
                    Scheme::Fp8BlockWo => (
                        "weight_scale",
                        vec![m.grid.grid_rows(), 1, m.grid.grid_cols(), 1],
                    ),
                    Scheme::Fp8Block => (
                        "weight_scale_inv",
                        vec![m.grid.grid_rows(), m.grid.grid_cols()],
                    ),
                };
                outs.push(Out {
                    name: format!("{}.{name}", m.stored),
                    dtype: scale_dtype,
                    shape,
                    src: Source::Scales(i),
                });
                if opts.scheme == Scheme::Fp8Static {
                    let a = amax[&m.input_node];
                    let s = if a > 0.0 { a / E4M3_MAX } else { 1.0 };
                    outs.push(Out {
                        name: format!("{}.input_scale", m.stored),
                        dtype: DType::F32,
                        shape: vec![],
                        src: Source::Bytes(s.to_le_bytes().to_vec()),
                    });
                }
            }
            None => outs.push(Out {
                name: stored.clone(),
                dtype: w.dtype,
                shape: w.shape.clone(),
                src: Source::Copy(w.clone()),
            }),
        }
    }
    if opts.kv_cache_fp8 {
        for l in 0..c.num_hidden_layers {
            let attn = format!("{text_prefix}layers.{l}.self_attn");
            for (kv, node) in [("k", "k_rope"), ("v", "v_proj")] {
                let a = amax[&format!("layers.{l}.{node}")];
                let s = a / E4M3_MAX;
                let (name, dtype, shape, value) = match opts.scheme {
                    // ModelOpt: `...self_attn.k_proj.k_scale`, F32 scalar, clamped to at least 1.0.
                    Scheme::Fp8Static | Scheme::Fp8BlockWo => (
                        format!("{attn}.{kv}_proj.{kv}_scale"),
                        DType::F32,
                        vec![],
                        s.max(1.0),
                    ),
                    // compressed-tensors: attribute of the attention module, shape (1,), model dtype.
                    Scheme::Fp8Dynamic => (
                        format!("{attn}.{kv}_scale"),
                        scale_dtype,
                        vec![1],
                        round_to(scale_dtype, s.max(f32::EPSILON)),
                    ),
                    // vLLM-style `...self_attn.k_scale` F32 scalar.
                    Scheme::Fp8Block => (
                        format!("{attn}.{kv}_scale"),
                        DType::F32,
                        vec![],
                        if s > 0.0 { s } else { 1.0 },
                    ),
                };
                outs.push(Out {
                    name,
                    dtype,
                    shape,
                    src: Source::Bytes(to_bytes(dtype, &[value])),
                });
            }
        }
    }
    // As the safetensors crate orders them: by alignment (dtype size) descending, then name, so every tensor
    // starts at a multiple of its element size.
    outs.sort_by(|a, b| {
        b.dtype
            .size()
            .cmp(&a.dtype.size())
            .then_with(|| a.name.cmp(&b.name))
    });

    fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    let st_path = to.join("model.safetensors");
    let entries: Vec<(String, DType, Vec<usize>)> = outs
        .iter()
        .map(|o| (o.name.clone(), o.dtype, o.shape.clone()))
        .collect();
    let mut wr = crate::checkpoint::begin_safetensors(&st_path, &entries)?;
    let werr = |e: std::io::Error| Error::io(&st_path, e);
    let pb = bar(opts.progress, outs.len() as u64, "writing", "tensors");
    for o in &outs {
        pb.set_message(o.name.clone());
        match &o.src {
            Source::Copy(w) => wr.write_all(w.bytes()).map_err(werr)?,
            Source::Bytes(b) => wr.write_all(b).map_err(werr)?,
            Source::Scales(i) => wr
                .write_all(&to_bytes(o.dtype, &modules[*i].scales))
                .map_err(werr)?,
            Source::Codes(i) => {
                let m = &modules[*i];
                let w = model.weights[&m.canonical].to_f32();
                let per = m.grid.groups();
                for (e, we) in w.chunks(m.rows * m.cols).enumerate() {
                    wr.write_all(&weight_codes(
                        we,
                        &m.grid,
                        &m.scales[e * per..(e + 1) * per],
                    ))
                    .map_err(werr)?
                }
            }
        }
        pb.inc(1);
    }
    wr.flush().map_err(werr)?;
    drop(wr);
    pb.finish_and_clear();
    let bytes_written = fs::metadata(&st_path)
        .map_err(|e| Error::io(&st_path, e))?
        .len();

    // Config files.
    let vision: Vec<&str> = VISION_PREFIXES
        .iter()
        .filter(|(p, _)| ck.tensors.keys().any(|n| n.starts_with(p)))
        .map(|(_, m)| *m)
        .collect();
    let lm_head = if text_prefix == "language_model.model." {
        "language_model.lm_head"
    } else {
        "lm_head"
    };
    let qc = quantization_config(opts, lm_head, &ignored, &vision);
    if opts.scheme.is_modelopt() {
        let mut exclude: Vec<String> = std::iter::once(lm_head.to_string())
            .chain(ignored.iter().cloned())
            .chain(vision.iter().map(|v| format!("{v}*")))
            .collect();
        exclude.sort();
        let hf = json!({
            "producer": {"name": "modelopt", "version": MODELOPT_FORMAT_VERSION},
            "quantization": {
                "quant_algo": modelopt_algo(opts.scheme),
                "kv_cache_quant_algo": if opts.kv_cache_fp8 { json!("FP8") } else { Value::Null },
                "exclude_modules": exclude,
            }
        });
        write_json(&to.join("hf_quant_config.json"), &hf)?;
    }
    config
        .as_object_mut()
        .ok_or_else(|| Error::file(&cfg_path, "not a JSON object"))?
        .insert("quantization_config".into(), qc.clone());
    write_json(&to.join("config.json"), &config)?;

    let mut copied_files = Vec::new();
    let skip = |n: &str| {
        n == "config.json"
            || n == "hf_quant_config.json"
            || n.ends_with(".safetensors")
            || n == "model.safetensors.index.json"
    };
    let mut entries: Vec<PathBuf> = fs::read_dir(from)
        .map_err(|e| Error::io(from, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    for src in entries {
        let Some(name) = src.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if skip(&name) {
            continue;
        }
        fs::copy(&src, to.join(&name)).map_err(|e| Error::io(&src, e))?;
        copied_files.push(name);
    }

    Ok(QuantizeReport {
        out_dir: to.to_path_buf(),
        quantized: modules.iter().map(|m| m.stored.clone()).collect(),
        ignored,
        tensors: outs.len(),
        bytes_written,
        calib_sequences: calib_sequences_n,
        calib_tokens,
        calib_seconds,
        amax,
        copied_files,
        quantization_config: qc,
    })
}

fn modelopt_algo(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Fp8Static => "FP8",
        // ModelOpt writes the format string as is (lowercase); vLLM upper-cases it.
        _ => "fp8_pb_wo",
    }
}

/// compressed-tensors `QuantizationArgs` as `model_dump` writes them.
fn ct_args(strategy: &str, dynamic: bool, observer: Option<&str>) -> Value {
    json!({
        "actorder": null, "block_structure": null, "dynamic": dynamic, "group_size": null,
        "num_bits": 8, "observer": observer, "observer_kwargs": {}, "strategy": strategy,
        "symmetric": true, "type": "float",
    })
}

/// The `quantization_config` of config.json for `opts.scheme`.
pub(crate) fn quantization_config(
    opts: &QuantizeOptions,
    lm_head: &str,
    ignored: &[String],
    vision: &[&str],
) -> Value {
    match opts.scheme {
        // ModelOpt convert_hf_quant_config_format (modelopt/torch/export/convert_hf_config.py).
        Scheme::Fp8Static | Scheme::Fp8BlockWo => {
            let mut exclude: Vec<String> = std::iter::once(lm_head.to_string())
                .chain(ignored.iter().cloned())
                .chain(vision.iter().map(|v| format!("{v}*")))
                .collect();
            exclude.sort();
            let mut q = serde_json::Map::new();
            if opts.scheme == Scheme::Fp8Static {
                q.insert(
                    "config_groups".into(),
                    json!({"group_0": {
                        "input_activations": {"dynamic": false, "num_bits": 8, "type": "float"},
                        "weights": {"dynamic": false, "num_bits": 8, "type": "float"},
                        "targets": ["Linear"],
                    }}),
                );
            }
            q.insert("ignore".into(), json!(exclude));
            q.insert("quant_algo".into(), json!(modelopt_algo(opts.scheme)));
            if opts.kv_cache_fp8 {
                q.insert(
                    "kv_cache_scheme".into(),
                    json!({"dynamic": false, "num_bits": 8, "type": "float"}),
                );
            }
            q.insert(
                "producer".into(),
                json!({"name": "modelopt", "version": MODELOPT_FORMAT_VERSION}),
            );
            q.insert("quant_method".into(), json!("modelopt"));
            Value::Object(q)
        }
        // compressed-tensors ModelCompressor.update_config with llm-compressor's FP8_DYNAMIC preset.
        Scheme::Fp8Dynamic => {
            let mut ignore: Vec<String> = vec![lm_head.to_string()];
            ignore.extend(ignored.iter().cloned());
            ignore.extend(
                vision
                    .iter()
                    .map(|v| format!("re:{}.*", v.replace('.', "\\."))),
            );
            json!({
                "config_groups": {"group_0": {
                    "format": "float-quantized",
                    "input_activations": ct_args("token", true, None),
                    "output_activations": null,
                    "targets": ["Linear"],
                    "weights": ct_args("channel", false, Some("minmax")),
                }},
                "format": "float-quantized",
                "global_compression_ratio": null,
                "ignore": ignore,
                "kv_cache_scheme": if opts.kv_cache_fp8 { ct_args("tensor", false, Some("minmax")) } else { Value::Null },
                "quant_method": "compressed-tensors",
                "quantization_status": "compressed",
                "sparsity_config": {},
                "transform_config": {},
                "version": COMPRESSED_TENSORS_FORMAT_VERSION,
            })
        }
        // transformers FineGrainedFP8Config.to_dict (lm_head always left unconverted).
        Scheme::Fp8Block => {
            let mut skip: Vec<String> = vec![lm_head.to_string()];
            skip.extend(ignored.iter().cloned());
            skip.extend(vision.iter().map(|v| v.to_string()));
            json!({
                "activation_scheme": "dynamic",
                "modules_to_not_convert": skip,
                "quant_method": "fp8",
                "weight_block_size": [opts.block, opts.block],
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("*down_proj", "model.layers.3.mlp.down_proj"));
        assert!(glob_match("layers.1.*", "layers.1.self_attn.q_proj"));
        assert!(!glob_match("layers.1.*", "layers.11.self_attn.q_proj"));
        assert!(glob_match("layers.?.mlp.up_proj", "layers.7.mlp.up_proj"));
        assert!(!glob_match("up_proj", "layers.7.mlp.up_proj"));
    }

    #[test]
    fn grid_partial_blocks() {
        let g = Grid::new(40, 72, 32, 32);
        assert_eq!((g.grid_rows(), g.grid_cols(), g.groups()), (2, 3, 6));
        assert_eq!(g.group_of(39, 71), 5);
        assert_eq!(g.group_of(31, 64), 2);
        let w: Vec<f32> = (0..40 * 72).map(|i| i as f32).collect();
        let last = g.gather(&w, 5);
        assert_eq!(last.len(), 8 * 8);
        assert_eq!(last[0], (32 * 72 + 64) as f32);
    }

    #[test]
    fn scales_and_zero_groups() {
        let g = Grid::new(2, 4, 1, 4);
        let w = [0.0, 0.0, 0.0, 0.0, 1.0, -896.0, 3.0, 0.5];
        let s = weight_scales(&w, &g, Scheme::Fp8Dynamic, WeightCalib::Max, DType::BF16);
        assert_eq!(s, vec![round_to(DType::BF16, f32::EPSILON), 2.0]);
        let s = weight_scales(&w, &g, Scheme::Fp8Block, WeightCalib::Max, DType::F32);
        assert_eq!(s, vec![1.0, 2.0]);
        let codes = weight_codes(&w, &g, &s);
        assert_eq!(&codes[..4], &[0, 0, 0, 0]);
        assert_eq!(codes[5], 0xFE); // -448
        let m = weight_scales(&w, &g, Scheme::Fp8Block, WeightCalib::Mse, DType::F32);
        assert!(quant_error(&w[4..], m[1]) <= quant_error(&w[4..], s[1]));
    }
}
