//! config.json for Gemma 3 and Gemma 4 text models, filled with transformers' defaults where the hub file is
//! sparse. Gemma 3: the 4.x keys (`rope_theta`, `rope_local_base_freq`, `rope_scaling`,
//! `sliding_window_pattern`) and the 5.x keys (`rope_parameters` per layer type, `layer_types`), flat or
//! nested in `text_config`. Gemma 4 (`gemma4` / `gemma4_text`): the hub's `global_head_dim` /
//! `num_global_key_value_heads` or transformers 5.23's `per_layer_config`, which mean the same model.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Sliding,
    Full,
}

impl LayerType {
    pub fn name(self) -> &'static str {
        match self {
            LayerType::Sliding => "sliding_attention",
            LayerType::Full => "full_attention",
        }
    }
}

/// RoPE parameters of one layer type.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f32,
    /// Linear position scaling: inverse frequencies are divided by this (1.0 = none).
    pub linear_factor: f32,
    /// Gemma 4 "proportional" RoPE: only the first `int(factor * head_dim // 2)` frequencies rotate (their
    /// exponent still over the whole head_dim); the others are 0, so those dims pass unchanged.
    pub partial_rotary_factor: Option<f32>,
}

impl RopeSpec {
    /// Inverse frequencies `1 / theta^(2i/d)` in f32, as transformers computes them, divided by the linear factor.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let rotated = match self.partial_rotary_factor {
            Some(p) => ((p as f64 * head_dim as f64) / 2.0).floor() as usize,
            None => head_dim / 2,
        };
        (0..head_dim / 2)
            .map(|i| {
                if i >= rotated {
                    return 0.0;
                }
                let exponent = (2 * i) as f32 / head_dim as f32;
                1.0 / self.theta.powf(exponent) / self.linear_factor
            })
            .collect()
    }

    /// Plain RoPE of `theta` (no scaling, every dim rotated).
    pub fn plain(theta: f32) -> RopeSpec {
        RopeSpec {
            theta,
            linear_factor: 1.0,
            partial_rotary_factor: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Gemma3Config {
    pub path: PathBuf,
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub query_pre_attn_scalar: f32,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub rope_full: RopeSpec,
    pub rope_sliding: RopeSpec,
    pub final_logit_softcapping: Option<f32>,
    pub attn_logit_softcapping: Option<f32>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// What Gemma 4 adds (None for Gemma 3). For Gemma 4, `head_dim` / `num_key_value_heads` are the
    /// sliding layers' and `query_pre_attn_scalar` is unused (the attention scale is 1.0).
    pub gemma4: Option<Gemma4Spec>,
}

/// The MoE block of Gemma 4 (26B-A4B): routed experts beside the dense MLP.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub num_experts: usize,
    pub top_k: usize,
    /// Intermediate size of one expert.
    pub intermediate_size: usize,
}

/// Gemma 4's per-layer geometry and optional blocks (gemma-architecture.md sections 1.3, 4).
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma4Spec {
    /// Head dim of each layer (`global_head_dim` on full layers).
    pub layer_head_dim: Vec<usize>,
    /// KV heads of each layer (`num_global_key_value_heads` on full layers when `attention_k_eq_v`).
    pub layer_kv_heads: Vec<usize>,
    /// Full layers have no v_proj: V is the raw k_proj output.
    pub attention_k_eq_v: bool,
    /// The last this many layers read the KV cache of an earlier layer of their type.
    pub num_kv_shared_layers: usize,
    /// Per-layer embedding width (0: no per-layer embeddings).
    pub hidden_size_per_layer_input: usize,
    pub vocab_size_per_layer_input: usize,
    /// KV-shared layers have a 2x wide MLP.
    pub use_double_wide_mlp: bool,
    pub moe: Option<MoeSpec>,
    /// `use_bidirectional_attention == "vision"` (26B, 31B): image tokens attend both ways within their
    /// image on sliding layers (gemma-architecture.md 4.9); E2B/E4B (unset) stay causal.
    pub bidirectional_vision: bool,
    /// The 12B encoder-free model (`gemma4_unified`): transformers 5.23 gives it Gemma 3's image mask on every
    /// layer (the whole image on sliding layers) instead of section 4.9's.
    pub unified: bool,
    /// `pad_token_id`: the id image rows take for the per-layer embedding gather (transformers replaces
    /// multimodal tokens by it before embedding).
    pub pad_token_id: u32,
}

impl Gemma3Config {
    pub fn is_gemma4(&self) -> bool {
        self.gemma4.is_some()
    }

    /// Head dim of layer `l`.
    pub fn layer_head_dim(&self, l: usize) -> usize {
        self.gemma4
            .as_ref()
            .map_or(self.head_dim, |g| g.layer_head_dim[l])
    }

    /// KV heads of layer `l`.
    pub fn layer_kv_heads(&self, l: usize) -> usize {
        self.gemma4
            .as_ref()
            .map_or(self.num_key_value_heads, |g| g.layer_kv_heads[l])
    }

    /// The layer whose KV cache layer `l` reads, when `l` is KV-shared (Gemma 4): the last layer of the
    /// same type before the first shared layer.
    pub fn kv_donor(&self, l: usize) -> Option<usize> {
        let g = self.gemma4.as_ref()?;
        let first = self.num_hidden_layers - g.num_kv_shared_layers;
        if l < first {
            return None;
        }
        (0..first)
            .rev()
            .find(|&j| self.layer_types[j] == self.layer_types[l])
    }

    /// Whether layer `l` has its own k/v projections (false on KV-shared layers).
    pub fn has_kv_proj(&self, l: usize) -> bool {
        self.gemma4
            .as_ref()
            .is_none_or(|g| l < self.num_hidden_layers - g.num_kv_shared_layers)
    }

    /// Whether layer `l` has a v_proj (false on KV-shared layers and, with `attention_k_eq_v`, full layers).
    pub fn has_v_proj(&self, l: usize) -> bool {
        self.has_kv_proj(l)
            && !self
                .gemma4
                .as_ref()
                .is_some_and(|g| g.attention_k_eq_v && self.layer_types[l] == LayerType::Full)
    }

    /// MLP intermediate size of layer `l` (2x on KV-shared layers with `use_double_wide_mlp`).
    pub fn layer_intermediate(&self, l: usize) -> usize {
        match &self.gemma4 {
            Some(g) if g.use_double_wide_mlp && !self.has_kv_proj(l) => 2 * self.intermediate_size,
            _ => self.intermediate_size,
        }
    }

    pub fn rope(&self, t: LayerType) -> &RopeSpec {
        match t {
            LayerType::Full => &self.rope_full,
            LayerType::Sliding => &self.rope_sliding,
        }
    }

    pub fn from_file(path: &Path) -> Result<Gemma3Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        Self::from_json(path, &json)
    }

    pub fn from_json(path: &Path, json: &Value) -> Result<Gemma3Config> {
        let top = json
            .as_object()
            .ok_or_else(|| Error::file(path, "config is not a JSON object"))?;
        let architecture = match top.get("architectures") {
            Some(Value::Array(a)) => a
                .first()
                .and_then(|v| v.as_str())
                .unwrap_or("Gemma3ForCausalLM")
                .to_string(),
            _ => "Gemma3ForCausalLM".to_string(),
        };
        let top_type = top.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let (obj, prefix) = match top.get("text_config") {
            Some(Value::Object(t)) => (t, "text_config."),
            Some(Value::Null) | None => (top, ""),
            Some(_) => return Err(Error::field(path, "text_config", "expected an object")),
        };
        let f = Fields { path, obj, prefix };
        let model_type = f.str_or(
            "model_type",
            if prefix.is_empty() {
                top_type
            } else if top_type == "gemma4" {
                "gemma4_text"
            } else if top_type == "gemma4_unified" {
                "gemma4_unified_text"
            } else {
                "gemma3_text"
            },
        )?;
        match (top_type, model_type.as_str()) {
            (_, "gemma3_text") | ("gemma3", _) | ("", "") => {}
            ("gemma4", _) | (_, "gemma4_text") => {
                return Self::from_json_gemma4(path, top, &f, architecture, false)
            }
            // The 12B encoder-free model (gemma-architecture.md 4.11): Gemma 4 dense text whose config has
            // no per-layer-embedding or MoE fields and defaults to use_bidirectional_attention "vision".
            ("gemma4_unified", _) | (_, "gemma4_unified_text") => {
                return Self::from_json_gemma4(path, top, &f, architecture, true)
            }
            (_, m) => {
                return Err(Error::field(
                    path,
                    format!("{prefix}model_type"),
                    format!(
                    "`{m}` is not a Gemma 3 or Gemma 4 text model (expected gemma3_text, gemma3, \
                         gemma4_text, gemma4, gemma4_unified_text or gemma4_unified)"
                ),
                ))
            }
        }

        let num_hidden_layers = f.usize_or("num_hidden_layers", 26)?;
        let act = match obj.get("hidden_activation").or(obj.get("hidden_act")) {
            None | Some(Value::Null) => "gelu_pytorch_tanh".to_string(),
            Some(v) => v.as_str().map(str::to_string).ok_or_else(|| {
                Error::field(
                    path,
                    format!("{prefix}hidden_activation"),
                    "expected a string",
                )
            })?,
        };
        if act != "gelu_pytorch_tanh" && act != "gelu_tanh" {
            return Err(Error::field(
                path,
                format!("{prefix}hidden_activation"),
                format!("`{act}` is not supported (Gemma 3 uses gelu_pytorch_tanh)"),
            ));
        }
        if f.bool_or("use_bidirectional_attention", false)? {
            return Err(Error::field(
                path,
                format!("{prefix}use_bidirectional_attention"),
                "bidirectional (embedding) models are not supported",
            ));
        }

        let layer_types = parse_layer_types(&f, num_hidden_layers, false)?;

        let (rope_full, rope_sliding) = parse_rope(&f)?;

        let eos_token_ids = parse_eos(path, obj, top)?;

        let cfg = Gemma3Config {
            gemma4: None,
            path: path.to_path_buf(),
            architecture,
            vocab_size: f.usize_or("vocab_size", 262208)?,
            hidden_size: f.usize_or("hidden_size", 2304)?,
            intermediate_size: f.usize_or("intermediate_size", 9216)?,
            num_hidden_layers,
            num_attention_heads: f.usize_or("num_attention_heads", 8)?,
            num_key_value_heads: f.usize_or("num_key_value_heads", 4)?,
            head_dim: f.usize_or("head_dim", 256)?,
            max_position_embeddings: f.usize_or("max_position_embeddings", 131072)?,
            rms_norm_eps: f.f32_or("rms_norm_eps", 1e-6)?,
            query_pre_attn_scalar: f.f32_or("query_pre_attn_scalar", 256.0)?,
            sliding_window: f.usize_or("sliding_window", 4096)?,
            layer_types,
            rope_full,
            rope_sliding,
            final_logit_softcapping: f.opt_f32("final_logit_softcapping")?,
            attn_logit_softcapping: f.opt_f32("attn_logit_softcapping")?,
            tie_word_embeddings: parse_tie(&f, top)?,
            bos_token_id: parse_bos(obj, top),
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A Gemma 4 text config (`f` reads the text fields: the top level or `text_config`), with
    /// transformers 5.23's defaults (gemma-architecture.md sections 1.3, 1.5).
    fn from_json_gemma4(
        path: &Path,
        top: &Map<String, Value>,
        f: &Fields,
        architecture: String,
        unified: bool,
    ) -> Result<Gemma3Config> {
        let prefix = f.prefix;
        let num_hidden_layers = f.usize_or("num_hidden_layers", 30)?;
        let act = f.str_or("hidden_activation", "gelu_pytorch_tanh")?;
        if act != "gelu_pytorch_tanh" && act != "gelu_tanh" {
            return Err(f.err(
                "hidden_activation",
                format!("`{act}` is not supported (Gemma 4 uses gelu_pytorch_tanh)"),
            ));
        }
        let bidirectional_vision = match f.get("use_bidirectional_attention") {
            None => unified,
            Some(Value::Null) => false,
            // Only image/video tokens attend both ways; a text-only model is causal.
            Some(Value::String(v)) if v == "vision" => true,
            Some(v) => {
                return Err(f.err(
                    "use_bidirectional_attention",
                    format!("{v} is not supported (causal or \"vision\" only)"),
                ))
            }
        };
        let layer_types = parse_layer_types(f, num_hidden_layers, true)?;

        // RoPE per layer type; a missing entry gets transformers' default for that type.
        let mut rope_full = RopeSpec {
            theta: 1_000_000.0,
            linear_factor: 1.0,
            partial_rotary_factor: Some(0.25),
        };
        let mut rope_sliding = RopeSpec::plain(10_000.0);
        if let Some(params) = f.get("rope_parameters") {
            let o = params
                .as_object()
                .ok_or_else(|| f.err("rope_parameters", "expected an object"))?;
            if let Some(v) = o.get("full_attention") {
                rope_full =
                    parse_rope_object(f, "rope_parameters.full_attention", v, 1_000_000.0, true)?;
            }
            if let Some(v) = o.get("sliding_attention") {
                rope_sliding =
                    parse_rope_object(f, "rope_parameters.sliding_attention", v, 10_000.0, true)?;
            }
        }

        let head_dim = f.usize_or("head_dim", 256)?;
        let num_key_value_heads = f.usize_or("num_key_value_heads", 4)?;
        let attention_k_eq_v = f.bool_or("attention_k_eq_v", false)?;
        let mut layer_head_dim = vec![head_dim; num_hidden_layers];
        let mut layer_kv_heads = vec![num_key_value_heads; num_hidden_layers];
        match f.get("per_layer_config") {
            // transformers 5.23 saves the full-layer overrides per layer index.
            Some(plc) => {
                let o = plc
                    .as_object()
                    .ok_or_else(|| f.err("per_layer_config", "expected an object"))?;
                for (key, v) in o {
                    let field = format!("per_layer_config.{key}");
                    let l = key
                        .parse::<usize>()
                        .ok()
                        .filter(|&l| l < num_hidden_layers)
                        .ok_or_else(|| {
                            f.err(
                                &field,
                                format!("not a layer index below {num_hidden_layers}"),
                            )
                        })?;
                    let o = v
                        .as_object()
                        .ok_or_else(|| f.err(&field, "expected an object"))?;
                    let sub = Fields {
                        path,
                        obj: o,
                        prefix: &format!("{prefix}{field}."),
                    };
                    for k in o.keys() {
                        if k != "head_dim" && k != "num_key_value_heads" {
                            return Err(sub.err(
                                k,
                                "is not supported (only head_dim and num_key_value_heads)",
                            ));
                        }
                    }
                    layer_head_dim[l] = sub.usize_or("head_dim", head_dim)?;
                    layer_kv_heads[l] = sub.usize_or("num_key_value_heads", num_key_value_heads)?;
                }
            }
            // The hub's keys.
            None => {
                let global_head_dim = f.usize_or("global_head_dim", 512)?;
                let global_kv = match f.get("num_global_key_value_heads") {
                    None => None,
                    Some(_) => Some(f.usize_or("num_global_key_value_heads", 0)?),
                };
                for (l, t) in layer_types.iter().enumerate() {
                    if *t == LayerType::Full {
                        layer_head_dim[l] = global_head_dim;
                        if let (true, Some(kv)) = (attention_k_eq_v, global_kv) {
                            layer_kv_heads[l] = kv;
                        }
                    }
                }
            }
        }

        let moe = if f.bool_or("enable_moe_block", false)? {
            let need = |key: &str| -> Result<usize> {
                match f.get(key) {
                    None => Err(f.err(key, "is required when enable_moe_block is true")),
                    Some(_) => f.usize_or(key, 0),
                }
            };
            let intermediate_size = match f.get("moe_intermediate_size") {
                None if f.get("expert_intermediate_size").is_some() => {
                    need("expert_intermediate_size")?
                }
                _ => need("moe_intermediate_size")?,
            };
            Some(MoeSpec {
                num_experts: need("num_experts")?,
                top_k: need("top_k_experts")?,
                intermediate_size,
            })
        } else {
            None
        };
        let vocab_size = f.usize_or("vocab_size", 262_144)?;
        let gemma4 = Gemma4Spec {
            layer_head_dim,
            layer_kv_heads,
            attention_k_eq_v,
            num_kv_shared_layers: f.usize_or("num_kv_shared_layers", 0)?,
            hidden_size_per_layer_input: f
                .usize_or("hidden_size_per_layer_input", if unified { 0 } else { 256 })?,
            vocab_size_per_layer_input: f.usize_or("vocab_size_per_layer_input", 262_144)?,
            use_double_wide_mlp: f.bool_or("use_double_wide_mlp", false)?,
            moe,
            bidirectional_vision,
            unified,
            pad_token_id: f.usize_or("pad_token_id", 0)? as u32,
        };
        let cfg = Gemma3Config {
            path: path.to_path_buf(),
            architecture,
            vocab_size,
            hidden_size: f.usize_or("hidden_size", 2304)?,
            intermediate_size: f.usize_or("intermediate_size", 9216)?,
            num_hidden_layers,
            num_attention_heads: f.usize_or("num_attention_heads", 8)?,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: f.usize_or("max_position_embeddings", 131_072)?,
            rms_norm_eps: f.f32_or("rms_norm_eps", 1e-6)?,
            query_pre_attn_scalar: 1.0,
            sliding_window: f.usize_or("sliding_window", 512)?,
            layer_types,
            rope_full,
            rope_sliding,
            final_logit_softcapping: f.opt_f32("final_logit_softcapping")?,
            attn_logit_softcapping: None,
            tie_word_embeddings: parse_tie(f, top)?,
            bos_token_id: parse_bos(f.obj, top),
            eos_token_ids: parse_eos(path, f.obj, top)?,
            gemma4: Some(gemma4),
        };
        cfg.validate()?;
        cfg.validate_gemma4()?;
        Ok(cfg)
    }

    fn validate_gemma4(&self) -> Result<()> {
        let Some(g) = &self.gemma4 else { return Ok(()) };
        let p = &self.path;
        for l in 0..self.num_hidden_layers {
            let (d, kv) = (g.layer_head_dim[l], g.layer_kv_heads[l]);
            if d == 0 || d % 2 != 0 {
                return Err(Error::field(
                    p,
                    "head_dim",
                    format!("layer {l}: head dim {d} must be positive and even"),
                ));
            }
            if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
                return Err(Error::field(
                    p,
                    "num_key_value_heads",
                    format!(
                        "layer {l}: {kv} kv heads do not divide num_attention_heads {}",
                        self.num_attention_heads
                    ),
                ));
            }
        }
        if g.num_kv_shared_layers >= self.num_hidden_layers && g.num_kv_shared_layers > 0 {
            return Err(Error::field(
                p,
                "num_kv_shared_layers",
                format!(
                    "{} leaves no layer to own a KV cache ({} layers)",
                    g.num_kv_shared_layers, self.num_hidden_layers
                ),
            ));
        }
        for l in 0..self.num_hidden_layers {
            if !self.has_kv_proj(l) {
                let Some(d) = self.kv_donor(l) else {
                    return Err(Error::field(
                        p,
                        "num_kv_shared_layers",
                        format!(
                            "KV-shared layer {l} ({}) has no earlier layer of its type to read",
                            self.layer_types[l].name()
                        ),
                    ));
                };
                if (g.layer_head_dim[d], g.layer_kv_heads[d])
                    != (g.layer_head_dim[l], g.layer_kv_heads[l])
                {
                    return Err(Error::field(
                        p,
                        "per_layer_config",
                        format!("KV-shared layer {l} and its donor {d} differ in head geometry"),
                    ));
                }
            }
        }
        if g.hidden_size_per_layer_input > 0 && g.vocab_size_per_layer_input < self.vocab_size {
            return Err(Error::field(
                p,
                "vocab_size_per_layer_input",
                format!(
                    "{} is smaller than vocab_size {}",
                    g.vocab_size_per_layer_input, self.vocab_size
                ),
            ));
        }
        if let Some(m) = &g.moe {
            if m.num_experts == 0
                || m.intermediate_size == 0
                || m.top_k == 0
                || m.top_k > m.num_experts
            {
                return Err(Error::field(
                    p,
                    "top_k_experts",
                    format!(
                        "MoE needs 0 < top_k_experts ({}) <= num_experts ({}) and a positive \
                         moe_intermediate_size ({})",
                        m.top_k, m.num_experts, m.intermediate_size
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let p = &self.path;
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("sliding_window", self.sliding_window),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::field(p, name, "must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::field(
                p,
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::field(p, "head_dim", "must be even for RoPE"));
        }
        if self.query_pre_attn_scalar.is_nan() || self.query_pre_attn_scalar <= 0.0 {
            return Err(Error::field(p, "query_pre_attn_scalar", "must be positive"));
        }
        Ok(())
    }
}

/// Typed access to the fields of one JSON object, with errors that name the field.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    prefix: &'a str,
}

impl Fields<'_> {
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::field(self.path, format!("{}{key}", self.prefix), msg)
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }
    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        Ok(self.opt_f32(key)?.unwrap_or(default))
    }
    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }
    fn str_or(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }
}

fn parse_eos(path: &Path, obj: &Map<String, Value>, top: &Map<String, Value>) -> Result<Vec<u32>> {
    Ok(match obj.get("eos_token_id").or(top.get("eos_token_id")) {
        None | Some(Value::Null) => vec![1],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|x| x as u32))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| Error::field(path, "eos_token_id", "expected integers"))?,
        Some(v) => vec![v
            .as_u64()
            .ok_or_else(|| Error::field(path, "eos_token_id", "expected an integer or a list"))?
            as u32],
    })
}

fn parse_bos(obj: &Map<String, Value>, top: &Map<String, Value>) -> Option<u32> {
    match obj.get("bos_token_id").or(top.get("bos_token_id")) {
        Some(v) => v.as_u64().map(|x| x as u32),
        None => Some(2),
    }
}

/// `tie_word_embeddings`: the wrapper's value wins over the text config's (transformers ties at the top).
fn parse_tie(f: &Fields, top: &Map<String, Value>) -> Result<bool> {
    match top.get("tie_word_embeddings") {
        Some(_) if f.prefix.is_empty() => f.bool_or("tie_word_embeddings", true),
        Some(Value::Bool(b)) => Ok(*b),
        _ => f.bool_or("tie_word_embeddings", true),
    }
}

/// `layer_types`, or the pattern (`sliding_window_pattern`, default 6: every 6th layer full). Gemma 4 forces
/// the last layer to full attention, as transformers does.
fn parse_layer_types(
    f: &Fields,
    num_hidden_layers: usize,
    last_full: bool,
) -> Result<Vec<LayerType>> {
    let (path, obj, prefix) = (f.path, f.obj, f.prefix);
    let mut types = match obj.get("layer_types") {
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, v) in a.iter().enumerate() {
                out.push(match v.as_str() {
                    Some("sliding_attention") => LayerType::Sliding,
                    Some("full_attention") => LayerType::Full,
                    _ => {
                        return Err(Error::field(
                            path,
                            format!("{prefix}layer_types[{i}]"),
                            format!(
                                "expected \"sliding_attention\" or \"full_attention\", found {v}"
                            ),
                        ))
                    }
                });
            }
            if out.len() != num_hidden_layers {
                return Err(Error::field(
                    path,
                    format!("{prefix}layer_types"),
                    format!(
                        "has {} entries but num_hidden_layers is {num_hidden_layers}",
                        out.len()
                    ),
                ));
            }
            out
        }
        Some(Value::Null) | None => {
            let key = if obj.contains_key("sliding_window_pattern") {
                "sliding_window_pattern"
            } else {
                "_sliding_window_pattern"
            };
            let pattern = f.usize_or(key, 6)?;
            if pattern == 0 {
                return Err(Error::field(
                    path,
                    format!("{prefix}{key}"),
                    "must be at least 1",
                ));
            }
            (0..num_hidden_layers)
                .map(|i| {
                    if (i + 1) % pattern != 0 {
                        LayerType::Sliding
                    } else {
                        LayerType::Full
                    }
                })
                .collect()
        }
        Some(_) => {
            return Err(Error::field(
                path,
                format!("{prefix}layer_types"),
                "expected a list",
            ))
        }
    };
    if last_full {
        if let Some(last) = types.last_mut() {
            *last = LayerType::Full;
        }
    }
    Ok(types)
}

/// One RoPE parameter object (`rope_scaling`, or an entry of `rope_parameters`).
/// `proportional` (Gemma 4) is accepted only when `gemma4`.
fn parse_rope_object(
    f: &Fields,
    field: &str,
    v: &Value,
    theta: f32,
    gemma4: bool,
) -> Result<RopeSpec> {
    let o = v
        .as_object()
        .ok_or_else(|| f.err(field, "expected an object"))?;
    let sub = Fields {
        path: f.path,
        obj: o,
        prefix: &format!("{}{field}.", f.prefix),
    };
    let kind = match sub.get("rope_type").or(sub.get("type")) {
        None => "default".to_string(),
        Some(v) => v
            .as_str()
            .ok_or_else(|| sub.err("rope_type", "expected a string"))?
            .to_string(),
    };
    let theta = sub.f32_or("rope_theta", theta)?;
    let mut partial_rotary_factor = None;
    let linear_factor = match kind.as_str() {
        "default" => 1.0,
        "proportional" if gemma4 => {
            let p = sub.f32_or("partial_rotary_factor", 1.0)?;
            if p.is_nan() || p <= 0.0 || p > 1.0 {
                return Err(sub.err("partial_rotary_factor", "must be in (0, 1]"));
            }
            partial_rotary_factor = Some(p);
            let factor = sub.f32_or("factor", 1.0)?;
            if factor.is_nan() || factor <= 0.0 {
                return Err(sub.err("factor", "must be positive"));
            }
            factor
        }
        "linear" if !gemma4 => {
            let factor = sub.f32_or("factor", 1.0)?;
            if factor.is_nan() || factor <= 0.0 {
                return Err(sub.err("factor", "must be positive"));
            }
            factor
        }
        other => {
            return Err(sub.err(
                "rope_type",
                if gemma4 {
                    format!("`{other}` is not supported (Gemma 4 uses default or proportional)")
                } else {
                    format!("`{other}` is not supported (Gemma 3 uses default or linear)")
                },
            ))
        }
    };
    Ok(RopeSpec {
        theta,
        linear_factor,
        partial_rotary_factor,
    })
}

fn parse_rope(f: &Fields) -> Result<(RopeSpec, RopeSpec)> {
    let theta_full = f.f32_or("rope_theta", 1_000_000.0)?;
    let theta_local = f.f32_or("rope_local_base_freq", 10_000.0)?;
    if let Some(params) = f.get("rope_parameters") {
        let o = params
            .as_object()
            .ok_or_else(|| f.err("rope_parameters", "expected an object"))?;
        if o.contains_key("full_attention") || o.contains_key("sliding_attention") {
            let full = match o.get("full_attention") {
                Some(v) => {
                    parse_rope_object(f, "rope_parameters.full_attention", v, theta_full, false)?
                }
                None => RopeSpec::plain(theta_full),
            };
            let sliding = match o.get("sliding_attention") {
                Some(v) => parse_rope_object(
                    f,
                    "rope_parameters.sliding_attention",
                    v,
                    theta_local,
                    false,
                )?,
                None => RopeSpec::plain(theta_local),
            };
            return Ok((full, sliding));
        }
        // A flat dict applies to the full-attention layers, as `rope_scaling` does.
        let full = parse_rope_object(f, "rope_parameters", params, theta_full, false)?;
        return Ok((full, RopeSpec::plain(theta_local)));
    }
    let full = match f.get("rope_scaling") {
        Some(v) => parse_rope_object(f, "rope_scaling", v, theta_full, false)?,
        None => RopeSpec::plain(theta_full),
    };
    Ok((full, RopeSpec::plain(theta_local)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Gemma3Config> {
        Gemma3Config::from_json(Path::new("config.json"), &v)
    }

    #[test]
    fn sparse_text_config_gets_transformers_defaults() {
        // The shape of the real 4B config: a sparse text_config inside a multimodal wrapper.
        let c = parse(json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "eos_token_id": [1, 106],
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "sliding_window": 1024}
        }))
        .unwrap();
        assert_eq!(c.vocab_size, 262208);
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (8, 4, 256)
        );
        assert_eq!(c.query_pre_attn_scalar, 256.0);
        assert_eq!(
            c.rope_full,
            RopeSpec {
                theta: 1e6,
                linear_factor: 8.0,
                partial_rotary_factor: None
            }
        );
        assert_eq!(c.rope_sliding, RopeSpec::plain(1e4));
        assert_eq!(c.eos_token_ids, vec![1, 106]);
        assert_eq!(c.layer_types.len(), 34);
        let full: Vec<usize> = (0..34)
            .filter(|&i| c.layer_types[i] == LayerType::Full)
            .collect();
        assert_eq!(full, vec![5, 11, 17, 23, 29]);
        assert_eq!(c.architecture, "Gemma3ForConditionalGeneration");
    }

    #[test]
    fn v5_rope_parameters_equal_v4_keys() {
        let v4 = parse(json!({"model_type": "gemma3_text", "num_hidden_layers": 4, "sliding_window_pattern": 2,
            "rope_theta": 5e5, "rope_local_base_freq": 2e4, "rope_scaling": {"type": "linear", "factor": 4.0}}))
        .unwrap();
        let v5 = parse(json!({"model_type": "gemma3_text", "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}}))
        .unwrap();
        assert_eq!(v4.layer_types, v5.layer_types);
        assert_eq!(v4.rope_full, v5.rope_full);
        assert_eq!(v4.rope_sliding, v5.rope_sliding);
        assert_eq!(v4.rope_full.inv_freq(8)[1], 1.0 / 5e5f32.powf(0.25) / 4.0);
    }

    #[test]
    fn bad_fields_are_named() {
        let e = parse(json!({"model_type": "gemma3_text", "hidden_size": "big"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size") && e.contains("\"big\""), "{e}");
        let e = parse(json!({"model_type": "gemma3", "text_config": {"num_attention_heads": 3}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = parse(json!({"model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rope_scaling.rope_type") && e.contains("yarn"),
            "{e}"
        );
        let e = parse(json!({"model_type": "llama"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type") && e.contains("llama"), "{e}");
        let e = parse(json!({"model_type": "gemma3_text", "num_hidden_layers": 2, "layer_types": ["full_attention"]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer_types") && e.contains("1 entries"), "{e}");
        let e = parse(json!({"model_type": "gemma3_text", "layer_types": [1, 2]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer_types[0]"), "{e}");
    }

    #[test]
    fn gemma4_sparse_hub_config_gets_transformers_defaults() {
        // A 31B-shaped sparse text_config in the hub's keys.
        let c = parse(json!({
            "architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
            "text_config": {"hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 60,
                "num_attention_heads": 32, "num_key_value_heads": 16, "num_global_key_value_heads": 4,
                "attention_k_eq_v": true, "sliding_window": 1024, "final_logit_softcapping": 30.0,
                "hidden_size_per_layer_input": 0, "use_bidirectional_attention": "vision"}
        }))
        .unwrap();
        let g = c.gemma4.as_ref().unwrap();
        assert_eq!(c.vocab_size, 262144);
        assert_eq!(c.layer_types[5], LayerType::Full);
        assert_eq!(c.layer_types[59], LayerType::Full);
        assert_eq!((g.layer_head_dim[5], g.layer_kv_heads[5]), (512, 4));
        assert_eq!((g.layer_head_dim[4], g.layer_kv_heads[4]), (256, 16));
        assert_eq!(c.rope_full.partial_rotary_factor, Some(0.25));
        assert_eq!(c.rope_full.theta, 1e6);
        assert_eq!(c.rope_sliding, RopeSpec::plain(1e4));
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        assert!(!c.has_v_proj(5) && c.has_v_proj(4) && c.kv_donor(59).is_none());
        // num_global_key_value_heads only applies with attention_k_eq_v.
        let c = parse(json!({"model_type": "gemma4_text", "num_hidden_layers": 6,
            "num_global_key_value_heads": 1, "hidden_size_per_layer_input": 0}))
        .unwrap();
        assert_eq!(c.gemma4.unwrap().layer_kv_heads[5], 4);
        // The last layer is forced to full attention.
        let c = parse(json!({"model_type": "gemma4_text", "num_hidden_layers": 4,
            "hidden_size_per_layer_input": 0,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention"]}))
        .unwrap();
        assert_eq!(c.layer_types[3], LayerType::Full);
    }

    #[test]
    fn gemma4_bad_fields_are_named() {
        let base = |extra: Value| {
            let mut v = json!({"model_type": "gemma4_text", "num_hidden_layers": 6,
                "hidden_size_per_layer_input": 0});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            parse(v).unwrap_err().to_string()
        };
        let e = base(json!({"per_layer_config": {"9": {"head_dim": 64}}}));
        assert!(
            e.contains("per_layer_config.9") && e.contains("layer index"),
            "{e}"
        );
        let e = base(json!({"per_layer_config": {"5": {"sliding_window": 64}}}));
        assert!(e.contains("per_layer_config.5.sliding_window"), "{e}");
        let e =
            base(json!({"enable_moe_block": true, "num_experts": 4, "moe_intermediate_size": 8}));
        assert!(e.contains("top_k_experts") && e.contains("required"), "{e}");
        let e = base(json!({"use_bidirectional_attention": "all"}));
        assert!(e.contains("use_bidirectional_attention"), "{e}");
        let e = base(json!({"num_kv_shared_layers": 6}));
        assert!(e.contains("num_kv_shared_layers"), "{e}");
        // Layer 5 (full) shared, but the only full layer is itself: no donor.
        let e = base(json!({"num_kv_shared_layers": 1}));
        assert!(
            e.contains("KV-shared layer 5") && e.contains("no earlier layer"),
            "{e}"
        );
        let e = base(json!({"rope_parameters": {"full_attention": {"rope_type": "yarn"}}}));
        assert!(
            e.contains("rope_parameters.full_attention.rope_type") && e.contains("yarn"),
            "{e}"
        );
    }
}
