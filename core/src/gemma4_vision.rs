//! Gemma 4 images in (gemma-architecture.md 2.5, 4.9, 4.10): the vision tower (patch embedding, 2-D position
//! tables, sandwich-normed encoder with q/k/v norms and 2-D RoPE, pooling by position, sqrt(hidden) scale,
//! optional standardize) and the `embed_vision` projection as a graph, as transformers 5.23's
//! `Gemma4VisionModel` + `Gemma4MultimodalEmbedder`; and the prompt assembly of `Gemma4Processor`.
//!
//! Rows of the tower are one image's real patches (transformers pads to `max_patches` and masks the padding
//! out of attention and pooling, which is the same as leaving it out); each row's token id is its patch
//! position `x + position_embedding_size * y`.
//!
//! The 12B (`Gemma4UnifiedForConditionalGeneration`, gemma-architecture.md 2.6, 4.11) has no tower: an
//! encoder-free embedder (LayerNorm, dense, LayerNorm, factorized positions, LayerNorm) over merged
//! `3 x 3`-patch rasters, then the same `embed_vision`; [`Gemma4VisionConfig::unified`] selects it.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::backend::{Backend, Batch, CacheConfig, LogitsFor, Runner, SeqStep, StepInputs};
use crate::checkpoint::{Checkpoint, Weight};
use crate::error::{Error, Result};
use crate::graph::{Graph, Op, QuantScheme, ValueId, WeightMap};
use crate::image::{Gemma4Pixels, GEMMA4_SOFT_TOKENS};
use crate::tensor::{DType, Mat};

/// The vision fields of a Gemma 4 `config.json` (`vision_config` is a Gemma4VisionConfig; absent fields take
/// its defaults, the top-level ones Gemma4Config's) and the image processor's soft-token budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma4VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub pooling_kernel_size: usize,
    pub patch_size: usize,
    pub position_embedding_size: usize,
    pub use_clipped_linears: bool,
    pub standardize: bool,
    /// The 12B encoder-free embedder (`gemma4_unified_vision`): no layers; `hidden_size` is its
    /// `mm_embed_dim`, `position_embedding_size` its `mm_posemb_size`, one token per merged patch.
    pub unified: bool,
    /// `max_soft_tokens` of the checkpoint's image processor (processor_config.json), 280 by default.
    pub max_soft_tokens: usize,
    pub image_token_id: u32,
    pub boi_token_id: u32,
    pub eoi_token_id: u32,
    /// The text model's hidden size (embed_vision's output).
    pub text_hidden_size: usize,
}

impl Gemma4VisionConfig {
    /// The vision fields of `config.json` (None without a `vision_config`); `dir` holds the processor config.
    pub fn from_json(
        path: &Path,
        top: &Value,
        text_hidden_size: usize,
    ) -> Result<Option<Gemma4VisionConfig>> {
        let v = match top.get("vision_config") {
            None | Some(Value::Null) => return Ok(None),
            Some(v) => v,
        };
        let bad = |name: &str, msg: &str| Error::field(path, name, msg.to_string());
        let num = |obj: &Value, prefix: &str, name: &str, default: f64| -> Result<f64> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_f64().filter(|f| *f >= 0.0).ok_or_else(|| {
                    bad(&format!("{prefix}{name}"), "expected a non-negative number")
                }),
            }
        };
        let int = |obj: &Value, prefix: &str, name: &str, default: usize| -> Result<usize> {
            let f = num(obj, prefix, name, default as f64)?;
            if f.fract() != 0.0 {
                return Err(bad(&format!("{prefix}{name}"), "expected an integer"));
            }
            Ok(f as usize)
        };
        let flag = |name: &str| -> Result<bool> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(bad(
                    &format!("vision_config.{name}"),
                    "expected true or false",
                )),
            }
        };
        let vp = "vision_config.";
        let act = v
            .get("hidden_activation")
            .and_then(Value::as_str)
            .unwrap_or("gelu_pytorch_tanh");
        if act != "gelu_pytorch_tanh" && act != "gelu_tanh" {
            return Err(bad(
                "vision_config.hidden_activation",
                &format!("`{act}` is not supported (Gemma 4 uses gelu_pytorch_tanh)"),
            ));
        }
        let rope = v.get("rope_parameters").filter(|r| !r.is_null());
        if let Some(kind) = rope.and_then(|r| r.get("rope_type")) {
            if kind != "axial" {
                return Err(bad(
                    "vision_config.rope_parameters.rope_type",
                    &format!("{kind} is not supported (axial only, as transformers)"),
                ));
            }
        }
        let rope_theta = match rope {
            Some(r) => num(r, "vision_config.rope_parameters.", "rope_theta", 100.0)?,
            None => 100.0,
        } as f32;
        let heads = int(v, vp, "num_attention_heads", 12)?;
        let unified = v.get("model_type").and_then(Value::as_str) == Some("gemma4_unified_vision")
            || top.get("model_type").and_then(Value::as_str) == Some("gemma4_unified");
        if unified {
            let e = int(v, vp, "mm_embed_dim", 3840)?;
            let out = int(v, vp, "output_proj_dims", 3840)?;
            if out != e {
                return Err(bad(
                    "vision_config.output_proj_dims",
                    &format!("{out}: embed_vision reads the embedder's mm_embed_dim ({e})"),
                ));
            }
            let c = Gemma4VisionConfig {
                hidden_size: e,
                intermediate_size: 0,
                num_hidden_layers: 0,
                num_attention_heads: 0,
                head_dim: 0,
                rms_norm_eps: num(v, vp, "rms_norm_eps", 1e-6)? as f32,
                rope_theta: 0.0,
                pooling_kernel_size: int(v, vp, "pooling_kernel_size", 3)?,
                patch_size: int(v, vp, "patch_size", 16)?,
                position_embedding_size: int(v, vp, "mm_posemb_size", 1120)?,
                use_clipped_linears: false,
                standardize: false,
                unified: true,
                max_soft_tokens: 280,
                image_token_id: int(top, "", "image_token_id", 258_880)? as u32,
                boi_token_id: int(top, "", "boi_token_id", 255_999)? as u32,
                eoi_token_id: int(top, "", "eoi_token_id", 258_882)? as u32,
                text_hidden_size,
            };
            if c.patch_size == 0 || c.pooling_kernel_size == 0 || c.position_embedding_size == 0 {
                return Err(bad(
                    "vision_config",
                    "patch_size, pooling_kernel_size and mm_posemb_size must be positive",
                ));
            }
            return Ok(Some(c));
        }
        let c = Gemma4VisionConfig {
            hidden_size: int(v, vp, "hidden_size", 768)?,
            intermediate_size: int(v, vp, "intermediate_size", 3072)?,
            num_hidden_layers: int(v, vp, "num_hidden_layers", 16)?,
            num_attention_heads: heads,
            head_dim: int(v, vp, "head_dim", 64)?,
            rms_norm_eps: num(v, vp, "rms_norm_eps", 1e-6)? as f32,
            rope_theta,
            pooling_kernel_size: int(v, vp, "pooling_kernel_size", 3)?,
            patch_size: int(v, vp, "patch_size", 16)?,
            position_embedding_size: int(v, vp, "position_embedding_size", 10 * 1024)?,
            use_clipped_linears: flag("use_clipped_linears")?,
            standardize: flag("standardize")?,
            unified: false,
            max_soft_tokens: 280,
            image_token_id: int(top, "", "image_token_id", 258_880)? as u32,
            boi_token_id: int(top, "", "boi_token_id", 255_999)? as u32,
            eoi_token_id: int(top, "", "eoi_token_id", 258_882)? as u32,
            text_hidden_size,
        };
        let kv = int(v, vp, "num_key_value_heads", heads)?;
        if kv != heads {
            return Err(bad(
                "vision_config.num_key_value_heads",
                &format!("{kv}: the vision encoder needs as many KV heads as heads ({heads})"),
            ));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(4) {
            return Err(bad(
                "vision_config.head_dim",
                &format!("{}: 2-D RoPE needs a multiple of 4", c.head_dim),
            ));
        }
        if c.patch_size == 0 || c.pooling_kernel_size == 0 || c.position_embedding_size == 0 {
            return Err(bad(
                "vision_config",
                "patch_size, pooling_kernel_size and position_embedding_size must be positive",
            ));
        }
        Ok(Some(c))
    }

    /// Read `max_soft_tokens` from the processor config in `dir` (`processor_config.json`'s
    /// `image_processor`, else `preprocessor_config.json`), where there is one.
    pub fn read_processor(&mut self, dir: &Path) -> Result<()> {
        for (file, key) in [
            ("processor_config.json", Some("image_processor")),
            ("preprocessor_config.json", None),
        ] {
            let path = dir.join(file);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let doc: Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
            let obj = match key {
                Some(k) => doc.get(k).unwrap_or(&Value::Null),
                None => &doc,
            };
            if let Some(m) = obj.get("max_soft_tokens").filter(|m| !m.is_null()) {
                let name = key.map_or("max_soft_tokens".to_string(), |k| {
                    format!("{k}.max_soft_tokens")
                });
                let n = m
                    .as_u64()
                    .filter(|n| GEMMA4_SOFT_TOKENS.contains(&(*n as usize)))
                    .ok_or_else(|| {
                        Error::field(
                            &path,
                            name,
                            format!("{m}: must be one of {GEMMA4_SOFT_TOKENS:?}"),
                        )
                    })?;
                self.max_soft_tokens = n as usize;
                return Ok(());
            }
        }
        Ok(())
    }

    /// Rows of one image at most: patches (tower) or merged patches (unified).
    pub fn max_patches(&self) -> usize {
        if self.unified {
            self.max_soft_tokens
        } else {
            self.max_soft_tokens * self.pooling_kernel_size * self.pooling_kernel_size
        }
    }
    /// Values of one input row: a patch, or a merged patch of `pooling_kernel_size^2` patches.
    pub fn patch_dim(&self) -> usize {
        let side = if self.unified {
            self.patch_size * self.pooling_kernel_size
        } else {
            self.patch_size
        };
        3 * side * side
    }
    /// Input rows (patches) per soft token.
    pub fn rows_per_token(&self) -> usize {
        if self.unified {
            1
        } else {
            self.pooling_kernel_size * self.pooling_kernel_size
        }
    }
}

const T: &str = "vision_tower.";
/// The position tables `[2, P, H]` as one `[2P, H]` table.
const POS_TABLE: &str = "vision_tower.patch_embedder.position_embedding_table";
/// `-std_bias`, derived at load.
const STD_BIAS_NEG: &str = "vision_tower.std_bias.neg";
const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
const CLIPS: [&str; 4] = ["input_min", "input_max", "output_min", "output_max"];

const U: &str = "vision_embedder.";
/// The unified embedder's `pos_embedding` `[P, 2, E]` as one `[2P, E]` table (x table, then y table).
const UNIFIED_POS: &str = "vision_embedder.pos_embedding.xy";

/// Every tensor of the tower and embedder with its shape, by graph name (checkpoint name without `model.`).
fn expected_tensors(c: &Gemma4VisionConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let mut m = BTreeMap::new();
    if c.unified {
        let dim = c.patch_dim();
        m.insert(format!("{U}patch_ln1.weight"), vec![dim]);
        m.insert(format!("{U}patch_ln1.bias"), vec![dim]);
        m.insert(format!("{U}patch_dense.weight"), vec![h, dim]);
        for n in ["patch_dense.bias", "patch_ln2.weight", "patch_ln2.bias"] {
            m.insert(format!("{U}{n}"), vec![h]);
        }
        m.insert(format!("{U}pos_norm.weight"), vec![h]);
        m.insert(format!("{U}pos_norm.bias"), vec![h]);
        m.insert(
            format!("{U}pos_embedding"),
            vec![c.position_embedding_size, 2, h],
        );
        m.insert(
            "embed_vision.embedding_projection.weight".into(),
            vec![c.text_hidden_size, h],
        );
        return m;
    }
    let qd = c.num_attention_heads * d;
    m.insert(
        format!("{T}patch_embedder.input_proj.weight"),
        vec![h, c.patch_dim()],
    );
    m.insert(POS_TABLE.to_string(), vec![2, c.position_embedding_size, h]);
    for l in 0..c.num_hidden_layers {
        let e = format!("{T}encoder.layers.{l}.");
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ] {
            m.insert(format!("{e}{n}.weight"), vec![h]);
        }
        m.insert(format!("{e}self_attn.q_norm.weight"), vec![d]);
        m.insert(format!("{e}self_attn.k_norm.weight"), vec![d]);
        let shapes = [[qd, h], [qd, h], [qd, h], [h, qd], [i, h], [i, h], [h, i]];
        for (n, s) in LINEARS.iter().zip(shapes) {
            m.insert(format!("{e}{n}.linear.weight"), s.to_vec());
            if c.use_clipped_linears {
                for b in CLIPS {
                    m.insert(format!("{e}{n}.{b}"), vec![]);
                }
            }
        }
    }
    if c.standardize {
        m.insert(format!("{T}std_bias"), vec![h]);
        m.insert(format!("{T}std_scale"), vec![h]);
    }
    m.insert(
        "embed_vision.embedding_projection.weight".into(),
        vec![c.text_hidden_size, h],
    );
    m
}

/// The graph name of a checkpoint tensor of the tower or embedder; None for other tensors. The unified
/// embedder's hub names (`vision_embedder.*`, `embed_vision.embedding_projection`) are the graph names;
/// transformers 5.23's module names (`embed_vision.patch_ln1`, `embed_vision.multimodal_embedder.*`) map to them.
fn canonical_name(name: &str) -> Option<String> {
    let n = name.strip_prefix("model.").unwrap_or(name);
    if let Some(r) = n.strip_prefix("embed_vision.multimodal_embedder.") {
        return Some(format!("embed_vision.{r}"));
    }
    for part in [
        "patch_ln1.",
        "patch_dense.",
        "patch_ln2.",
        "pos_embedding",
        "pos_norm.",
    ] {
        if let Some(r) = n
            .strip_prefix("embed_vision.")
            .filter(|r| r.starts_with(part))
        {
            return Some(format!("{U}{r}"));
        }
    }
    (n.starts_with(T) || n.starts_with(U) || n.starts_with("embed_vision.")).then(|| n.to_string())
}

/// The vision tower and embedder of a Gemma 4 checkpoint.
pub struct Gemma4Vision {
    pub config: Gemma4VisionConfig,
    pub graph: Graph,
    pub weights: WeightMap,
}

impl Gemma4Vision {
    /// The tower of the checkpoint in `dir` (config.json parsed as `top`), or None without a vision_config.
    pub fn load(dir: &Path, top: &Value, text_hidden_size: usize) -> Result<Option<Gemma4Vision>> {
        let path = dir.join("config.json");
        let Some(mut config) = Gemma4VisionConfig::from_json(&path, top, text_hidden_size)? else {
            return Ok(None);
        };
        config.read_processor(dir)?;
        let ck = Checkpoint::open(dir)?;
        Gemma4Vision::from_tensors(config, ck.tensors).map(Some)
    }

    /// Check the tower's tensors among `tensors` (others are ignored) and build the graph.
    pub fn from_tensors(
        config: Gemma4VisionConfig,
        tensors: BTreeMap<String, Weight>,
    ) -> Result<Gemma4Vision> {
        let expected = expected_tensors(&config);
        let mut weights = WeightMap::new();
        for (name, w) in tensors {
            let Some(c) = canonical_name(&name) else {
                continue;
            };
            let Some(shape) = expected.get(&c) else {
                // Clip bounds of a config without use_clipped_linears are unused, as in transformers.
                if !config.use_clipped_linears && CLIPS.iter().any(|b| c.ends_with(b)) {
                    continue;
                }
                return Err(Error::tensor(
                    &name,
                    format!(
                        "unexpected tensor: not part of a Gemma 4 vision tower of this config (in {})",
                        w.file.display()
                    ),
                ));
            };
            w.expect(shape, &[DType::F32, DType::BF16, DType::F16])?;
            weights.insert(c.clone(), w.renamed(&c));
        }
        if let Some(missing) = expected.keys().find(|k| !weights.contains_key(*k)) {
            return Err(Error::tensor(
                format!("model.{missing}"),
                "missing from the checkpoint: the config has a vision_config",
            ));
        }
        let c = &config;
        if c.unified {
            // [P, 2, E] -> [2P, E]: row a * P + i is pos_embedding[i, a].
            let (p, e) = (c.position_embedding_size, c.hidden_size);
            let v = weights[&format!("{U}pos_embedding")].to_f32();
            let mut t = vec![0f32; v.len()];
            for i in 0..p {
                for a in 0..2 {
                    t[(a * p + i) * e..(a * p + i + 1) * e]
                        .copy_from_slice(&v[(i * 2 + a) * e..(i * 2 + a + 1) * e]);
                }
            }
            weights.insert(
                UNIFIED_POS.into(),
                Weight::from_f32(UNIFIED_POS, vec![2 * p, e], &t),
            );
            weights.remove(&format!("{U}pos_embedding"));
            let graph = build_gemma4_unified_graph(c);
            return Ok(Gemma4Vision {
                config,
                graph,
                weights,
            });
        }
        weights.get_mut(POS_TABLE).expect("checked").shape =
            vec![2 * c.position_embedding_size, c.hidden_size];
        if c.standardize {
            let b: Vec<f32> = weights[&format!("{T}std_bias")]
                .to_f32()
                .iter()
                .map(|v| -v)
                .collect();
            weights.insert(
                STD_BIAS_NEG.into(),
                Weight::from_f32(STD_BIAS_NEG, vec![c.hidden_size], &b),
            );
        }
        let mut clips = BTreeMap::new();
        for (name, w) in &weights {
            if CLIPS.iter().any(|b| name.ends_with(b)) {
                let v = w.to_f32();
                if v.len() != 1 || v[0].is_nan() {
                    return Err(Error::tensor(
                        format!("model.{name}"),
                        format!("expected one clip bound, found {v:?}"),
                    ));
                }
                clips.insert(name.clone(), v[0]);
            }
        }
        let graph = build_gemma4_vision_graph(c, &clips);
        Ok(Gemma4Vision {
            config,
            graph,
            weights,
        })
    }

    /// A runner of the tower for up to `max_images` images per call.
    pub fn runner(&self, backend: &dyn Backend, max_images: usize) -> Result<Box<dyn Runner>> {
        backend.load(
            &self.graph,
            &self.weights,
            CacheConfig::new(max_images.max(1), self.config.max_patches()),
        )
    }

    /// Image embeddings `[sum of soft tokens, text hidden]` of preprocessed images, in order; `taps` as
    /// [`Runner::step`] (`vision_hidden`: the tower's output before `embed_vision`).
    pub fn encode(
        &self,
        runner: &mut dyn Runner,
        images: &[Gemma4Pixels],
        taps: &[String],
    ) -> Result<(Mat, BTreeMap<String, Mat>)> {
        let c = &self.config;
        let total: usize = images.iter().map(Gemma4Pixels::num_patches).sum();
        let mut rows = Mat::zeros(total, c.patch_dim());
        let mut seqs = Vec::with_capacity(images.len());
        let mut r = 0;
        for (i, img) in images.iter().enumerate() {
            let n = img.num_patches();
            // The tower pools kernel x kernel patches; the unified embedder's patches are merged already.
            let k = if c.unified { 1 } else { c.pooling_kernel_size };
            let side = (c.patch_dim() / 3).isqrt();
            if img.patches.len() != n * c.patch_dim()
                || n > c.max_patches()
                || !img.grid_w.is_multiple_of(k)
                || !img.grid_h.is_multiple_of(k)
                || img.grid_w.max(img.grid_h) > c.position_embedding_size
            {
                return Err(Error::invalid(format!(
                    "image {i}: {} values on a {}x{} patch grid do not fit the tower (patches of {}x{}x3, at most \
                     {} patches, sides multiples of {k}, at most {} per side)",
                    img.patches.len(),
                    img.grid_w,
                    img.grid_h,
                    side,
                    side,
                    c.max_patches(),
                    c.position_embedding_size
                )));
            }
            // Gemma4VisionPatchEmbedder: 2 * (pixel - 0.5); the unified embedder takes the pixels as they are.
            let (a, b) = if c.unified { (1.0, 0.0) } else { (2.0, -1.0) };
            for (dst, src) in rows.data[r * c.patch_dim()..(r + n) * c.patch_dim()]
                .iter_mut()
                .zip(&img.patches)
            {
                *dst = a * src + b;
            }
            let p = c.position_embedding_size;
            seqs.push(SeqStep {
                slot: i,
                start_pos: 0,
                tokens: (0..img.grid_h)
                    .flat_map(|y| (0..img.grid_w).map(move |x| (x + p * y) as u32))
                    .collect(),
                logits: LogitsFor::None,
            });
            r += n;
        }
        let inputs = StepInputs {
            embed_rows: (0..total).collect(),
            embeds: rows,
            groups: vec![],
        };
        let out = runner.step_with_inputs(&Batch { seqs }, &inputs, taps)?;
        Ok((out.logits, out.taps))
    }
}

/// The Gemma 4 vision tower and `embed_vision` as a graph (see the module doc). `clips`: the clip bounds by
/// graph name (`...q_proj.input_min` ...), used when the config has `use_clipped_linears`; an infinite bound
/// clamps nothing and is left out. Taps: `vision_hidden` (the tower's output), `image_features` (the output).
pub fn build_gemma4_vision_graph(c: &Gemma4VisionConfig, clips: &BTreeMap<String, f32>) -> Graph {
    let p = c.position_embedding_size;
    let mut g = Graph::new(p * p);
    let (h, d, nh, eps) = (
        c.hidden_size,
        c.head_dim,
        c.num_attention_heads,
        c.rms_norm_eps,
    );
    let norm = |g: &mut Graph, name: String, w: Option<String>, x: ValueId, group: usize| {
        let cols = g.node(x).cols;
        g.add(
            name,
            Op::RmsNorm {
                weight: w,
                group,
                eps,
                add_one: false,
            },
            &[x],
            cols,
        )
    };
    // Gemma4ClippableLinear: clamp the input, linear, clamp the output.
    let linear = |g: &mut Graph, name: String, module: String, x: ValueId, out: usize| {
        let bound = |b: &str| clips.get(&format!("{module}.{b}")).copied();
        let clamp = |g: &mut Graph, name: String, x: ValueId, lo: Option<f32>, hi: Option<f32>| {
            let (lo, hi) = (lo.unwrap_or(f32::NEG_INFINITY), hi.unwrap_or(f32::INFINITY));
            if !c.use_clipped_linears || (lo == f32::NEG_INFINITY && hi == f32::INFINITY) {
                return x;
            }
            let cols = g.node(x).cols;
            g.add(name, Op::Clamp { min: lo, max: hi }, &[x], cols)
        };
        let x = clamp(
            g,
            format!("{name}.clip_in"),
            x,
            bound("input_min"),
            bound("input_max"),
        );
        let y = g.add(
            format!("{name}.matmul"),
            Op::Linear {
                weight: format!("{module}.linear.weight"),
                scheme: QuantScheme::Dense,
            },
            &[x],
            out,
        );
        clamp(g, name, y, bound("output_min"), bound("output_max"))
    };
    let inv_freq: Vec<f32> = (0..d / 4)
        .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / (d / 2) as f32))
        .collect();
    let rope = |g: &mut Graph, name: String, x: ValueId| {
        g.add(
            name,
            Op::Rope2d {
                head_dim: d,
                inv_freq: inv_freq.clone(),
                size: p,
            },
            &[x],
            nh * d,
        )
    };

    let patches = g.add("vision.patches", Op::Input, &[], c.patch_dim());
    let x = g.add(
        "vision.patch_embed",
        Op::Linear {
            weight: format!("{T}patch_embedder.input_proj.weight"),
            scheme: QuantScheme::Dense,
        },
        &[patches],
        h,
    );
    let pos = g.add(
        "vision.positions",
        Op::PosEmbed2d {
            table: POS_TABLE.into(),
            size: p,
        },
        &[],
        h,
    );
    let mut x = g.add("vision.embeddings", Op::Add, &[x, pos], h);
    for l in 0..c.num_hidden_layers {
        let n = |s: &str| format!("vision.layers.{l}.{s}");
        let m = |s: &str| format!("{T}encoder.layers.{l}.{s}");
        let w = |s: &str| Some(format!("{T}encoder.layers.{l}.{s}.weight"));
        let hn = norm(&mut g, n("input_norm"), w("input_layernorm"), x, h);
        let q = linear(&mut g, n("q_proj"), m("self_attn.q_proj"), hn, nh * d);
        let q = norm(&mut g, n("q_norm"), w("self_attn.q_norm"), q, d);
        let q = rope(&mut g, n("q_rope"), q);
        let k = linear(&mut g, n("k_proj"), m("self_attn.k_proj"), hn, nh * d);
        let k = norm(&mut g, n("k_norm"), w("self_attn.k_norm"), k, d);
        let k = rope(&mut g, n("k_rope"), k);
        let v = linear(&mut g, n("v_proj"), m("self_attn.v_proj"), hn, nh * d);
        let v = norm(&mut g, n("v_norm"), None, v, d);
        let a = g.add(
            n("attn"),
            Op::EncoderAttention {
                n_heads: nh,
                head_dim: d,
                scale: 1.0,
            },
            &[q, k, v],
            nh * d,
        );
        let o = linear(&mut g, n("o_proj"), m("self_attn.o_proj"), a, h);
        let o = norm(&mut g, n("attn_out"), w("post_attention_layernorm"), o, h);
        x = g.add(n("attn_residual"), Op::Add, &[x, o], h);
        let hn = norm(&mut g, n("ffn_norm"), w("pre_feedforward_layernorm"), x, h);
        let i = c.intermediate_size;
        let gate = linear(&mut g, n("gate_proj"), m("mlp.gate_proj"), hn, i);
        let up = linear(&mut g, n("up_proj"), m("mlp.up_proj"), hn, i);
        let f = g.add(n("gelu_mul"), Op::GeluTanhMul, &[gate, up], i);
        let f = linear(&mut g, n("down_proj"), m("mlp.down_proj"), f, h);
        let f = norm(&mut g, n("ffn_out"), w("post_feedforward_layernorm"), f, h);
        x = g.add(n("residual"), Op::Add, &[x, f], h);
    }
    let x = g.add(
        "vision.pool",
        Op::PoolPositions {
            kernel: c.pooling_kernel_size,
            size: p,
        },
        &[x],
        h,
    );
    let mut x = g.add(
        if c.standardize {
            "vision.pool_scaled"
        } else {
            "vision_hidden"
        },
        Op::Scale {
            factor: (h as f64).sqrt() as f32,
        },
        &[x],
        h,
    );
    if c.standardize {
        let y = g.add(
            "vision.std_bias",
            Op::BiasAdd {
                bias: STD_BIAS_NEG.into(),
            },
            &[x],
            h,
        );
        x = g.add(
            "vision_hidden",
            Op::ChannelScale {
                weight: format!("{T}std_scale"),
            },
            &[y],
            h,
        );
    }
    let x = norm(&mut g, "embed_vision.norm".into(), None, x, h);
    g.output = g.add(
        "image_features",
        Op::Linear {
            weight: "embed_vision.embedding_projection.weight".into(),
            scheme: QuantScheme::Dense,
        },
        &[x],
        c.text_hidden_size,
    );
    g
}

/// The 12B encoder-free embedder (`Gemma4UnifiedVisionEmbedder`) and `embed_vision` as a graph: LayerNorm
/// (eps 1e-5, torch's default), dense with bias, LayerNorm, `+ pos[x, 0] + pos[y, 1]`, LayerNorm (tap
/// `vision_hidden`), weightless RMSNorm, projection (`image_features`).
pub fn build_gemma4_unified_graph(c: &Gemma4VisionConfig) -> Graph {
    let p = c.position_embedding_size;
    let mut g = Graph::new(p * p);
    let h = c.hidden_size;
    let ln = |g: &mut Graph, name: &str, module: &str, x: ValueId| {
        let cols = g.node(x).cols;
        g.add(
            name,
            Op::LayerNorm {
                weight: format!("{U}{module}.weight"),
                bias: format!("{U}{module}.bias"),
                eps: 1e-5,
            },
            &[x],
            cols,
        )
    };
    let x = g.add("vision.patches", Op::Input, &[], c.patch_dim());
    let x = ln(&mut g, "vision.patch_ln1", "patch_ln1", x);
    let x = g.add(
        "vision.patch_dense.matmul",
        Op::Linear {
            weight: format!("{U}patch_dense.weight"),
            scheme: QuantScheme::Dense,
        },
        &[x],
        h,
    );
    let x = g.add(
        "vision.patch_dense",
        Op::BiasAdd {
            bias: format!("{U}patch_dense.bias"),
        },
        &[x],
        h,
    );
    let x = ln(&mut g, "vision.patch_ln2", "patch_ln2", x);
    let pos = g.add(
        "vision.positions",
        Op::PosEmbed2d {
            table: UNIFIED_POS.into(),
            size: p,
        },
        &[],
        h,
    );
    let x = g.add("vision.embeddings", Op::Add, &[x, pos], h);
    let x = ln(&mut g, "vision_hidden", "pos_norm", x);
    let x = g.add(
        "embed_vision.norm",
        Op::RmsNorm {
            weight: None,
            group: h,
            eps: c.rms_norm_eps,
            add_one: false,
        },
        &[x],
        h,
    );
    g.output = g.add(
        "image_features",
        Op::Linear {
            weight: "embed_vision.embedding_projection.weight".into(),
            scheme: QuantScheme::Dense,
        },
        &[x],
        c.text_hidden_size,
    );
    g
}

/// The text `Gemma4Processor` makes of a prompt: the i-th `<|image|>` becomes
/// `"<|image>" + "<|image|>" * tokens[i] + "<image|>"`. Returns the text and the number of markers found
/// (the caller checks it against the images).
pub fn expand_gemma4_placeholders(prompt: &str, tokens: &[usize]) -> (String, usize) {
    const IMG: &str = "<|image|>";
    let parts: Vec<&str> = prompt.split(IMG).collect();
    let markers = parts.len() - 1;
    let mut out = String::from(parts[0]);
    for (i, part) in parts[1..].iter().enumerate() {
        match tokens.get(i) {
            Some(&n) => {
                out.push_str("<|image>");
                out.push_str(&IMG.repeat(n));
                out.push_str("<image|>");
            }
            None => out.push_str(IMG),
        }
        out.push_str(part);
    }
    (out, markers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_expand_per_image() {
        let (t, n) = expand_gemma4_placeholders("a<|image|>b<|image|>", &[2, 1]);
        assert_eq!(n, 2);
        assert_eq!(
            t,
            "a<|image><|image|><|image|><image|>b<|image><|image|><image|>"
        );
    }
}
