//! Which FP8 format a checkpoint is in, detected from `config.json` `quantization_config` and ModelOpt's
//! `hf_quant_config.json` (../shared/reference/fp8-formats.md section 6), and which of its Linear modules
//! are left unquantized (exclude / ignore / not-convert lists, matched against the checkpoint's own module
//! names, e.g. `model.layers.0.self_attn.q_proj` or `language_model.lm_head`).

use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One entry of an exclusion (or target) list, with the matching rule of the tool that wrote it.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// ModelOpt `exclude_modules`: a Python `fnmatch` wildcard (`*` any run, `?` one character, `[..]` a
    /// class), matched against the whole module name (vLLM `fnmatch(prefix, pattern)`). It also matches
    /// the children of a module it matches (`model.layers.1.mlp` excludes `model.layers.1.mlp.up_proj`).
    Glob { source: String, re: Regex },
    /// compressed-tensors `re:<pattern>`: Python `re.match`, i.e. anchored at the start only.
    Regex { source: String, re: Regex },
    /// compressed-tensors plain entry: the exact module name, or the class name `Linear` (every linear).
    Name(String),
    /// transformers FineGrainedFP8 `modules_to_not_convert`: the entry is a substring of the module name
    /// (transformers 4.5x `key in current_key_name_str`), or regex-matches it at the start (newer
    /// `should_convert_module`: `re.match(key, name)`).
    NotConvert { source: String, re: Option<Regex> },
}

impl Pattern {
    /// A ModelOpt wildcard.
    pub fn glob(pattern: &str) -> Pattern {
        Pattern::Glob {
            source: pattern.to_string(),
            re: Regex::new(&glob_to_regex(pattern)).expect("an escaped glob is a valid regex"),
        }
    }

    /// A compressed-tensors entry: `re:` prefix for a regex, otherwise a name. `field` names the entry in
    /// errors.
    pub fn compressed_tensors(entry: &str, path: &Path, field: &str) -> Result<Pattern> {
        match entry.strip_prefix("re:") {
            Some(pat) => {
                let re = Regex::new(&format!("^(?:{pat})")).map_err(|e| {
                    Error::field(
                        path,
                        field,
                        format!("malformed regex `{entry}`: {}", one_line(&e.to_string())),
                    )
                })?;
                Ok(Pattern::Regex {
                    source: entry.to_string(),
                    re,
                })
            }
            None => Ok(Pattern::Name(entry.to_string())),
        }
    }

    /// A FineGrainedFP8 `modules_to_not_convert` entry.
    pub fn not_convert(entry: &str) -> Pattern {
        Pattern::NotConvert {
            source: entry.to_string(),
            re: Regex::new(&format!("^(?:{entry})")).ok(),
        }
    }

    /// The entry as written in the config.
    pub fn source(&self) -> &str {
        match self {
            Pattern::Glob { source, .. }
            | Pattern::Regex { source, .. }
            | Pattern::NotConvert { source, .. } => source,
            Pattern::Name(s) => s,
        }
    }

    /// Whether this entry matches the Linear module `module` (checkpoint naming, no `.weight`).
    pub fn matches(&self, module: &str) -> bool {
        match self {
            Pattern::Glob { re, .. } => {
                re.is_match(module)
                    || module
                        .match_indices('.')
                        .any(|(i, _)| re.is_match(&module[..i]))
            }
            Pattern::Regex { re, .. } => re.is_match(module),
            Pattern::Name(n) => n == module || n == "Linear",
            Pattern::NotConvert { source, re } => {
                module.contains(source.as_str()) || re.as_ref().is_some_and(|r| r.is_match(module))
            }
        }
    }
}

/// Python `fnmatch.translate`, anchored at both ends.
fn glob_to_regex(p: &str) -> String {
    let mut out = String::from("^(?s:");
    let chars: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '[' => {
                // A class runs to the next `]` (a `]` right after `[` or `[!` belongs to the class).
                let mut j = i + 1;
                if j < chars.len() && chars[j] == '!' {
                    j += 1;
                }
                if j < chars.len() && chars[j] == ']' {
                    j += 1;
                }
                while j < chars.len() && chars[j] != ']' {
                    j += 1;
                }
                if j >= chars.len() {
                    out.push_str("\\[");
                } else {
                    let inner: String = chars[i + 1..j].iter().collect();
                    let inner = inner.replace('\\', "\\\\");
                    let inner = match inner.strip_prefix('!') {
                        Some(rest) => format!("^{rest}"),
                        None => inner,
                    };
                    out.push('[');
                    out.push_str(&inner);
                    out.push(']');
                    i = j;
                }
            }
            c => out.push_str(&regex::escape(&c.to_string())),
        }
        i += 1;
    }
    out.push_str(")$");
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The linear-layer scheme a module gets (names of scale tensors are attached by the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearQuant {
    Dense,
    /// A: ModelOpt FP8, scalar `weight_scale` and static scalar `input_scale`.
    Fp8Static,
    /// B: compressed-tensors FP8_DYNAMIC, `weight_scale` `[out, 1]`.
    Fp8Dynamic,
    /// C: ModelOpt FP8_PB_WO, `weight_scale` per `block` (`[rows, cols]`), weight-only.
    Fp8BlockWeightOnly {
        block: [usize; 2],
    },
    /// D: FineGrainedFP8, `weight_scale_inv` per `block`.
    Fp8Block {
        block: [usize; 2],
    },
}

/// The quantization format of a checkpoint as a whole.
#[derive(Debug, Clone)]
pub enum CheckpointQuant {
    /// No `quantization_config` and no `hf_quant_config.json`: every tensor in F32/BF16/F16.
    None,
    /// A. ModelOpt `quant_algo: FP8` (static per-tensor W8A8).
    ModelOptFp8 {
        exclude: Vec<Pattern>,
        kv_cache_fp8: bool,
        /// The file the quant_algo was read from.
        source: PathBuf,
    },
    /// B. compressed-tensors `float-quantized` FP8_DYNAMIC (channel weights, dynamic per-token inputs).
    CompressedTensorsFp8Dynamic {
        /// Union of the `targets` of every config group.
        targets: Vec<Pattern>,
        ignore: Vec<Pattern>,
        kv_cache_fp8: bool,
    },
    /// C. ModelOpt `quant_algo: fp8_pb_wo` (block weight-only, 128x128).
    ModelOptFp8PbWo {
        block: [usize; 2],
        exclude: Vec<Pattern>,
        kv_cache_fp8: bool,
        source: PathBuf,
    },
    /// D. transformers FineGrainedFP8 / DeepSeek block FP8 (`quant_method: fp8`, `weight_block_size`).
    FineGrainedFp8 {
        block: [usize; 2],
        /// `modules_to_not_convert` (or `ignored_layers`), with `lm_head` always added as transformers does.
        not_convert: Vec<Pattern>,
    },
}

/// ModelOpt's block for FP8_PB_WO (`block_sizes: {-1: 128, -2: 128}`), not written in any config.
pub const MODELOPT_PB_WO_BLOCK: [usize; 2] = [128, 128];

impl CheckpointQuant {
    /// Read `dir/config.json` and `dir/hf_quant_config.json` (either may be absent).
    pub fn detect(dir: &Path) -> Result<CheckpointQuant> {
        let config_path = dir.join("config.json");
        let config = read_json_if_present(&config_path)?;
        let hq_path = dir.join("hf_quant_config.json");
        let hq = read_json_if_present(&hq_path)?;
        Self::from_json(
            &config_path,
            config.as_ref().unwrap_or(&Value::Null),
            &hq_path,
            hq.as_ref(),
        )
    }

    /// Decide the format from the parsed `config.json` and, when present, `hf_quant_config.json`.
    pub fn from_json(
        config_path: &Path,
        config: &Value,
        hq_path: &Path,
        hq: Option<&Value>,
    ) -> Result<CheckpointQuant> {
        let (qc, qc_field) = match config.get("quantization_config") {
            Some(Value::Null) | None => match config
                .get("text_config")
                .and_then(|t| t.get("quantization_config"))
            {
                Some(Value::Null) | None => (None, ""),
                Some(v) => (Some(v), "text_config.quantization_config"),
            },
            Some(v) => (Some(v), "quantization_config"),
        };
        let qc = match qc {
            None => None,
            Some(Value::Object(o)) => Some(o),
            Some(_) => {
                return Err(Error::field(config_path, qc_field, "expected an object"));
            }
        };
        let hq_quant = match hq {
            None => None,
            Some(v) => match v.get("quantization") {
                Some(Value::Object(o)) => Some(o),
                _ => {
                    return Err(Error::field(
                        hq_path,
                        "quantization",
                        "missing or not an object",
                    ))
                }
            },
        };
        let Some(qc) = qc else {
            return match hq_quant {
                None => Ok(CheckpointQuant::None),
                Some(h) => modelopt(None, config_path, "", Some(h), hq_path),
            };
        };
        let f = |k: &str| format!("{qc_field}.{k}");
        let method = match qc.get("quant_method") {
            Some(Value::String(s)) => s.to_ascii_lowercase(),
            Some(_) => {
                return Err(Error::field(
                    config_path,
                    f("quant_method"),
                    "expected a string",
                ))
            }
            None if hq_quant.is_some() => "modelopt".to_string(),
            None => return Err(Error::field(config_path, f("quant_method"), "missing")),
        };
        match method.as_str() {
            "modelopt" => modelopt(Some(qc), config_path, qc_field, hq_quant, hq_path),
            "compressed-tensors" => compressed_tensors(qc, config_path, qc_field),
            "fp8" => fine_grained(qc, config_path, qc_field),
            other => Err(Error::field(
                config_path,
                f("quant_method"),
                format!(
                    "unknown quantization method `{other}` (supported: modelopt, compressed-tensors, fp8)"
                ),
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            CheckpointQuant::None => "none",
            CheckpointQuant::ModelOptFp8 { .. } => "ModelOpt FP8 (static per-tensor W8A8)",
            CheckpointQuant::CompressedTensorsFp8Dynamic { .. } => {
                "compressed-tensors FP8_DYNAMIC (per-channel weights, dynamic per-token inputs)"
            }
            CheckpointQuant::ModelOptFp8PbWo { .. } => "ModelOpt FP8_PB_WO (block weight-only)",
            CheckpointQuant::FineGrainedFp8 { .. } => {
                "FineGrainedFP8 (block weights, dynamic per-token-group inputs)"
            }
        }
    }

    /// Whether the checkpoint declares an FP8 KV cache (ModelOpt `kv_cache_quant_algo: FP8`,
    /// `kv_cache_scheme` with 8-bit float).
    pub fn kv_cache_fp8(&self) -> bool {
        match self {
            CheckpointQuant::ModelOptFp8 { kv_cache_fp8, .. }
            | CheckpointQuant::CompressedTensorsFp8Dynamic { kv_cache_fp8, .. }
            | CheckpointQuant::ModelOptFp8PbWo { kv_cache_fp8, .. } => *kv_cache_fp8,
            _ => false,
        }
    }

    /// The exclusion entries (exclude_modules / ignore / modules_to_not_convert).
    pub fn exclusions(&self) -> &[Pattern] {
        match self {
            CheckpointQuant::None => &[],
            CheckpointQuant::ModelOptFp8 { exclude, .. }
            | CheckpointQuant::ModelOptFp8PbWo { exclude, .. } => exclude,
            CheckpointQuant::CompressedTensorsFp8Dynamic { ignore, .. } => ignore,
            CheckpointQuant::FineGrainedFp8 { not_convert, .. } => not_convert,
        }
    }

    /// The exclusion entry that keeps `module` (checkpoint naming) unquantized, if any.
    pub fn excluded_by(&self, module: &str) -> Option<&Pattern> {
        self.exclusions().iter().find(|p| p.matches(module))
    }

    /// The scheme of the Linear module `module` (checkpoint naming, e.g. `model.layers.0.mlp.up_proj`).
    pub fn linear(&self, module: &str) -> LinearQuant {
        if self.excluded_by(module).is_some() {
            return LinearQuant::Dense;
        }
        match self {
            CheckpointQuant::None => LinearQuant::Dense,
            CheckpointQuant::ModelOptFp8 { .. } => LinearQuant::Fp8Static,
            CheckpointQuant::CompressedTensorsFp8Dynamic { targets, .. } => {
                if targets.iter().any(|t| t.matches(module)) {
                    LinearQuant::Fp8Dynamic
                } else {
                    LinearQuant::Dense
                }
            }
            CheckpointQuant::ModelOptFp8PbWo { block, .. } => {
                LinearQuant::Fp8BlockWeightOnly { block: *block }
            }
            CheckpointQuant::FineGrainedFp8 { block, .. } => {
                LinearQuant::Fp8Block { block: *block }
            }
        }
    }

    /// Why `module` gets the scheme it gets, for error messages.
    pub fn explain(&self, module: &str) -> String {
        match (self, self.excluded_by(module)) {
            (CheckpointQuant::None, _) => "the checkpoint declares no quantization".to_string(),
            (_, Some(p)) => format!(
                "{}: module `{module}` is excluded by `{}`",
                self.name(),
                p.source()
            ),
            (CheckpointQuant::CompressedTensorsFp8Dynamic { .. }, None)
                if self.linear(module) == LinearQuant::Dense =>
            {
                format!(
                    "{}: module `{module}` matches no config_groups target",
                    self.name()
                )
            }
            (_, None) => format!(
                "{}: module `{module}` matches no exclusion entry",
                self.name()
            ),
        }
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

/// A list of strings at `obj[key]` (absent or null: empty).
fn string_list(
    obj: &Map<String, Value>,
    key: &str,
    path: &Path,
    field: &str,
) -> Result<Vec<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Error::field(path, format!("{field}[{i}]"), "expected a string"))
            })
            .collect(),
        Some(_) => Err(Error::field(path, field, "expected a list of strings")),
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Whether a `kv_cache_scheme` object declares 8-bit float (null: no).
fn kv_scheme_is_fp8(v: Option<&Value>, path: &Path, field: &str) -> Result<bool> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Object(o)) => {
            let bits = o.get("num_bits").and_then(|b| b.as_u64());
            let ty = o.get("type").and_then(|t| t.as_str());
            if bits == Some(8) && ty == Some("float") {
                Ok(true)
            } else {
                Err(Error::field(
                    path,
                    field,
                    format!(
                        "unsupported KV-cache scheme (num_bits {bits:?}, type {ty:?}); only 8-bit float (FP8) is supported"
                    ),
                ))
            }
        }
        Some(_) => Err(Error::field(path, field, "expected an object or null")),
    }
}

fn modelopt(
    qc: Option<&Map<String, Value>>,
    config_path: &Path,
    qc_field: &str,
    hq: Option<&Map<String, Value>>,
    hq_path: &Path,
) -> Result<CheckpointQuant> {
    // quant_algo: config.json first, then hf_quant_config.json (spec section 6).
    let algo = qc
        .and_then(|q| q.get("quant_algo"))
        .filter(|v| !v.is_null())
        .map(|v| (v, config_path.to_path_buf(), join(qc_field, "quant_algo")))
        .or_else(|| {
            hq.and_then(|h| h.get("quant_algo"))
                .filter(|v| !v.is_null())
                .map(|v| {
                    (
                        v,
                        hq_path.to_path_buf(),
                        "quantization.quant_algo".to_string(),
                    )
                })
        });
    let Some((algo, source, algo_field)) = algo else {
        return Err(match hq {
            Some(_) => Error::field(hq_path, "quantization.quant_algo", "missing or null"),
            None => Error::field(
                config_path,
                join(qc_field, "quant_algo"),
                "missing, and there is no hf_quant_config.json",
            ),
        });
    };
    let algo = algo
        .as_str()
        .ok_or_else(|| Error::field(&source, &algo_field, "expected a string"))?
        .to_ascii_uppercase();
    // Exclusions: hf_quant_config.json `exclude_modules` and config.json `ignore` / `exclude_modules`
    // (the same list, written by the same exporter); their union.
    let mut entries = Vec::new();
    if let Some(h) = hq {
        entries.extend(string_list(
            h,
            "exclude_modules",
            hq_path,
            "quantization.exclude_modules",
        )?);
    }
    if let Some(q) = qc {
        for key in ["ignore", "exclude_modules"] {
            entries.extend(string_list(q, key, config_path, &join(qc_field, key))?);
        }
    }
    entries.sort();
    entries.dedup();
    let exclude: Vec<Pattern> = entries.iter().map(|e| Pattern::glob(e)).collect();
    // FP8 KV cache: `kv_cache_quant_algo` (either file) or config.json `kv_cache_scheme`.
    let mut kv_cache_fp8 = false;
    for (obj, path, field) in [
        (hq, hq_path, "quantization.kv_cache_quant_algo".to_string()),
        (qc, config_path, join(qc_field, "kv_cache_quant_algo")),
    ] {
        match obj.and_then(|o| o.get("kv_cache_quant_algo")) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.eq_ignore_ascii_case("FP8") => kv_cache_fp8 = true,
            Some(v) => {
                return Err(Error::field(
                    path,
                    field,
                    format!("unsupported KV-cache quantization {v} (only FP8 or null)"),
                ))
            }
        }
    }
    if let Some(q) = qc {
        kv_cache_fp8 |= kv_scheme_is_fp8(
            q.get("kv_cache_scheme"),
            config_path,
            &join(qc_field, "kv_cache_scheme"),
        )?;
    }
    match algo.as_str() {
        "FP8" => Ok(CheckpointQuant::ModelOptFp8 {
            exclude,
            kv_cache_fp8,
            source,
        }),
        "FP8_PB_WO" => Ok(CheckpointQuant::ModelOptFp8PbWo {
            block: MODELOPT_PB_WO_BLOCK,
            exclude,
            kv_cache_fp8,
            source,
        }),
        other => Err(Error::field(
            &source,
            algo_field,
            format!("unsupported ModelOpt quant_algo `{other}` (supported: FP8, FP8_PB_WO)"),
        )),
    }
}

fn compressed_tensors(
    qc: &Map<String, Value>,
    path: &Path,
    qc_field: &str,
) -> Result<CheckpointQuant> {
    let f = |k: &str| join(qc_field, k);
    let unsupported = |field: String, what: String| {
        Error::field(
            path,
            field,
            format!(
                "unsupported compressed-tensors scheme: {what} (supported: FP8_DYNAMIC, i.e. 8-bit float weights with strategy `channel` and dynamic 8-bit float input activations with strategy `token`)"
            ),
        )
    };
    match qc.get("quantization_status") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "compressed" => {}
        Some(v) => {
            return Err(Error::field(
                path,
                f("quantization_status"),
                format!("{v}: only compressed checkpoints (weights stored in FP8) are supported"),
            ))
        }
    }
    match qc.get("sparsity_config") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) if o.is_empty() => {}
        Some(_) => {
            return Err(unsupported(
                f("sparsity_config"),
                "sparse compression".to_string(),
            ))
        }
    }
    let top_format = qc.get("format").and_then(|v| v.as_str());
    let groups = match qc.get("config_groups") {
        Some(Value::Object(g)) if !g.is_empty() => g,
        _ => {
            return Err(Error::field(
                path,
                f("config_groups"),
                "missing, empty or not an object",
            ))
        }
    };
    let mut targets = Vec::new();
    for (name, g) in groups {
        let gf = |k: &str| f(&format!("config_groups.{name}.{k}"));
        let g = g
            .as_object()
            .ok_or_else(|| Error::field(path, gf(""), "expected an object"))?;
        let (format, format_field) = match g.get("format").and_then(|v| v.as_str()) {
            Some(s) => (Some(s), gf("format")),
            None => (top_format, f("format")),
        };
        if format != Some("float-quantized") {
            return Err(unsupported(
                format_field,
                format!("format {:?} (expected `float-quantized`)", format),
            ));
        }
        let args = |key: &str| -> Result<&Map<String, Value>> {
            match g.get(key) {
                Some(Value::Object(o)) => Ok(o),
                _ => Err(unsupported(gf(key), format!("`{key}` missing or null"))),
            }
        };
        let check = |o: &Map<String, Value>, key: &str, k: &str, want: Value| -> Result<()> {
            let got = o.get(k).cloned().unwrap_or(Value::Null);
            if got != want {
                return Err(unsupported(
                    gf(&format!("{key}.{k}")),
                    format!("{k} = {got} (expected {want})"),
                ));
            }
            Ok(())
        };
        let w = args("weights")?;
        check(w, "weights", "num_bits", 8.into())?;
        check(w, "weights", "type", "float".into())?;
        check(w, "weights", "strategy", "channel".into())?;
        if w.get("dynamic").is_some_and(|d| d != &Value::Bool(false)) {
            check(w, "weights", "dynamic", false.into())?;
        }
        if w.get("symmetric").is_some_and(|d| d != &Value::Bool(true)) {
            check(w, "weights", "symmetric", true.into())?;
        }
        let a = args("input_activations")?;
        check(a, "input_activations", "num_bits", 8.into())?;
        check(a, "input_activations", "type", "float".into())?;
        check(a, "input_activations", "dynamic", true.into())?;
        check(a, "input_activations", "strategy", "token".into())?;
        if !g.get("output_activations").is_none_or(|v| v.is_null()) {
            return Err(unsupported(
                gf("output_activations"),
                "output activation quantization".to_string(),
            ));
        }
        let t = string_list(g, "targets", path, &gf("targets"))?;
        for (i, entry) in t.iter().enumerate() {
            targets.push(Pattern::compressed_tensors(
                entry,
                path,
                &gf(&format!("targets[{i}]")),
            )?);
        }
    }
    let ignore = string_list(qc, "ignore", path, &f("ignore"))?
        .iter()
        .enumerate()
        .map(|(i, e)| Pattern::compressed_tensors(e, path, &f(&format!("ignore[{i}]"))))
        .collect::<Result<Vec<_>>>()?;
    let kv_cache_fp8 = kv_scheme_is_fp8(qc.get("kv_cache_scheme"), path, &f("kv_cache_scheme"))?;
    Ok(CheckpointQuant::CompressedTensorsFp8Dynamic {
        targets,
        ignore,
        kv_cache_fp8,
    })
}

fn fine_grained(qc: &Map<String, Value>, path: &Path, qc_field: &str) -> Result<CheckpointQuant> {
    let f = |k: &str| join(qc_field, k);
    let block = match qc.get("weight_block_size") {
        None | Some(Value::Null) => {
            return Err(Error::field(
                path,
                f("weight_block_size"),
                "missing: quant_method `fp8` without a block size (per-tensor AutoFP8 style) is not supported",
            ))
        }
        Some(Value::Array(a)) if a.len() == 2 => {
            let dims: Vec<usize> = a
                .iter()
                .filter_map(|v| v.as_u64().filter(|&n| n > 0).map(|n| n as usize))
                .collect();
            if dims.len() != 2 {
                return Err(Error::field(
                    path,
                    f("weight_block_size"),
                    "expected two positive integers",
                ));
            }
            [dims[0], dims[1]]
        }
        Some(_) => {
            return Err(Error::field(
                path,
                f("weight_block_size"),
                "expected two positive integers",
            ))
        }
    };
    match qc.get("activation_scheme") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "dynamic" => {}
        Some(v) => {
            return Err(Error::field(
                path,
                f("activation_scheme"),
                format!("{v}: block FP8 supports only `dynamic` activations"),
            ))
        }
    }
    match qc.get("fmt") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "e4m3" => {}
        Some(v) => {
            return Err(Error::field(
                path,
                f("fmt"),
                format!("{v}: only `e4m3` is supported"),
            ))
        }
    }
    if let Some(v) = qc.get("scale_fmt").filter(|v| !v.is_null()) {
        if v != "float" {
            return Err(Error::field(
                path,
                f("scale_fmt"),
                format!("{v}: only `float` scales are supported"),
            ));
        }
    }
    let mut entries = string_list(
        qc,
        "modules_to_not_convert",
        path,
        &f("modules_to_not_convert"),
    )?;
    entries.extend(string_list(
        qc,
        "ignored_layers",
        path,
        &f("ignored_layers"),
    )?);
    // transformers always adds lm_head (replace_with_fp8_linear).
    entries.push("lm_head".to_string());
    entries.sort();
    entries.dedup();
    Ok(CheckpointQuant::FineGrainedFp8 {
        block,
        not_convert: entries.iter().map(|e| Pattern::not_convert(e)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn detect(config: Value, hq: Option<Value>) -> Result<CheckpointQuant> {
        CheckpointQuant::from_json(
            Path::new("dir/config.json"),
            &config,
            Path::new("dir/hf_quant_config.json"),
            hq.as_ref(),
        )
    }

    #[test]
    fn glob_is_fnmatch_over_the_whole_name_and_its_parents() {
        let p = Pattern::glob("model.vision_tower*");
        assert!(p.matches("model.vision_tower.encoder.layers.0.mlp.fc1"));
        assert!(!p.matches("model.language_model.layers.0.mlp.up_proj"));
        let p = Pattern::glob("lm_head");
        assert!(p.matches("lm_head") && !p.matches("language_model.lm_head_x"));
        let p = Pattern::glob("model.layers.1.mlp");
        assert!(p.matches("model.layers.1.mlp.up_proj"));
        assert!(!p.matches("model.layers.11.mlp.up_proj"));
        let p = Pattern::glob("*layers.[02].self_attn*");
        assert!(p.matches("model.layers.2.self_attn.q_proj"));
        assert!(!p.matches("model.layers.1.self_attn.q_proj"));
        let p = Pattern::glob("model.layers.?.mlp*");
        assert!(p.matches("model.layers.3.mlp.down_proj"));
        assert!(!p.matches("model.layers.13.mlp.down_proj"));
    }

    #[test]
    fn compressed_tensors_regex_is_anchored_at_the_start_only() {
        let p =
            Pattern::compressed_tensors("re:vision_tower.*", Path::new("c"), "ignore[0]").unwrap();
        assert!(p.matches("vision_tower.x"));
        assert!(!p.matches("model.vision_tower.x"));
        let p = Pattern::compressed_tensors("re:.*mlp", Path::new("c"), "ignore[0]").unwrap();
        assert!(p.matches("model.layers.0.mlp.down_proj"), "not a fullmatch");
        let p = Pattern::compressed_tensors("lm_head", Path::new("c"), "ignore[0]").unwrap();
        assert!(p.matches("lm_head") && !p.matches("language_model.lm_head"));
        let e = Pattern::compressed_tensors("re:*.lm_head", Path::new("c"), "ignore[1]")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ignore[1]") && e.contains("re:*.lm_head") && e.contains("malformed"),
            "{e}"
        );
    }

    /// The entries FP8 checkpoints of multimodal Gemma use to keep the image parts BF16, against Gemma 4's
    /// module names (the tower's `...q_proj.linear`, `embed_vision`) and Gemma 3's.
    #[test]
    fn vision_exclusions_of_every_format_cover_gemma4_modules() {
        let c = Path::new("c");
        let g4 = [
            "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear",
            "model.vision_tower.encoder.layers.15.mlp.down_proj.linear",
            "model.vision_tower.patch_embedder.input_proj",
        ];
        let ct = |e: &str| Pattern::compressed_tensors(e, c, "ignore[0]").unwrap();
        for p in [
            Pattern::glob("model.vision_tower*"),
            ct(r"re:model\.vision_tower.*"),
            ct("re:.*vision_tower.*"),
            Pattern::not_convert("vision_tower"),
            Pattern::not_convert("model.vision_tower"),
        ] {
            for m in g4 {
                assert!(p.matches(m), "{} must match {m}", p.source());
            }
            assert!(!p.matches("model.language_model.layers.0.self_attn.q_proj"));
            assert!(p.matches("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1"));
        }
        for p in [
            Pattern::glob("model.embed_vision*"),
            ct(r"re:model\.embed_vision.*"),
            Pattern::not_convert("embed_vision"),
        ] {
            assert!(p.matches("model.embed_vision.embedding_projection"));
        }
        // Anchored at the start: an unprefixed regex misses the `model.` names.
        assert!(!ct("re:vision_tower.*").matches(g4[0]));
    }

    #[test]
    fn not_convert_is_a_substring_or_a_start_regex() {
        let p = Pattern::not_convert("layers.1.mlp");
        assert!(p.matches("model.layers.1.mlp.up_proj"));
        let p = Pattern::not_convert("down_proj");
        assert!(p.matches("model.layers.0.mlp.down_proj"));
        let p = Pattern::not_convert("model.layers.*.self_attn");
        assert!(p.matches("model.layers.3.self_attn.q_proj"));
        assert!(!p.matches("model.layers.3.mlp.up_proj"));
    }

    #[test]
    fn detection_rules() {
        assert!(matches!(
            detect(json!({}), None).unwrap(),
            CheckpointQuant::None
        ));
        let hq = json!({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}});
        let q = detect(json!({}), Some(hq)).unwrap();
        assert!(matches!(
            q,
            CheckpointQuant::ModelOptFp8 {
                kv_cache_fp8: true,
                ..
            }
        ));
        assert_eq!(q.linear("lm_head"), LinearQuant::Dense);
        assert_eq!(
            q.linear("model.layers.0.mlp.up_proj"),
            LinearQuant::Fp8Static
        );
        let q = detect(
            json!({"quantization_config": {"quant_method": "modelopt", "quant_algo": "fp8_pb_wo", "ignore": ["lm_head"]}}),
            None,
        )
        .unwrap();
        assert!(matches!(
            q,
            CheckpointQuant::ModelOptFp8PbWo {
                block: [128, 128],
                kv_cache_fp8: false,
                ..
            }
        ));
        let q = detect(
            json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32], "modules_to_not_convert": ["layers.0.mlp"]}}),
            None,
        )
        .unwrap();
        assert_eq!(
            q.linear("model.layers.1.mlp.up_proj"),
            LinearQuant::Fp8Block { block: [64, 32] }
        );
        assert_eq!(q.linear("model.layers.0.mlp.up_proj"), LinearQuant::Dense);
        assert_eq!(q.linear("lm_head"), LinearQuant::Dense);
        let e = detect(
            json!({"quantization_config": {"quant_method": "awq"}}),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("dir/config.json")
                && e.contains("quantization_config.quant_method")
                && e.contains("awq"),
            "{e}"
        );
        let e = detect(
            json!({}),
            Some(json!({"quantization": {"quant_algo": "NVFP4"}})),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("hf_quant_config.json")
                && e.contains("quantization.quant_algo")
                && e.contains("NVFP4"),
            "{e}"
        );
        let e = detect(
            json!({"quantization_config": {"quant_method": "fp8"}}),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("weight_block_size"), "{e}");
    }
}
