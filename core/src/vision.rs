//! Gemma 3 images in (gemma-architecture.md 2.3, 3.6): the SigLIP vision tower and the multimodal projector
//! as a graph, run by a backend's runner (the CPU reference for now), and the prompt assembly that places
//! the image embeddings at the `<image_soft_token>` rows with Gemma 3's bidirectional image mask.
//! [`ImageModel`] puts it and Gemma 4's (crate::gemma4_vision) behind one interface.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::backend::{Backend, Batch, CacheConfig, LogitsFor, Runner, SeqStep, StepInputs};
use crate::checkpoint::{Checkpoint, Weight};
use crate::config::Gemma3Config;
use crate::error::{Error, Result};
use crate::gemma4_vision::{expand_gemma4_placeholders, Gemma4Vision};
use crate::graph::{Graph, Op, QuantScheme, ValueId, WeightMap};
use crate::image::{gemma3_pixels, gemma4_merged_pixels, gemma4_pixels, Rgb8};
use crate::tensor::{DType, Mat};

/// Prefixes of the vision tower and projector tensors, most specific first: the hub checkpoints'
/// `vision_tower.vision_model.`, the 5.x module tree's `model.vision_tower.vision_model.`, and the
/// `vision_tower.` that transformers 5.23 `save_pretrained` writes.
const TOWER_PREFIXES: [&str; 4] = [
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
];
const PROJECTOR_PREFIXES: [&str; 2] = ["model.multi_modal_projector.", "multi_modal_projector."];

/// The multimodal fields of a Gemma 3 `config.json` (`vision_config` is a SiglipVisionConfig; absent fields
/// take SiglipVisionConfig's defaults, the top-level ones Gemma3Config's).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f32,
    pub mm_tokens_per_image: usize,
    pub image_token_id: u32,
    pub boi_token_id: u32,
    pub eoi_token_id: u32,
    /// The text model's hidden size (the projector's output).
    pub text_hidden_size: usize,
}

impl VisionConfig {
    /// The vision fields of `config.json`; None when it has no `vision_config` (a text-only model).
    pub fn from_json(
        path: &Path,
        top: &Value,
        text_hidden_size: usize,
    ) -> Result<Option<VisionConfig>> {
        let Some(v) = top.get("vision_config") else {
            return Ok(None);
        };
        if v.is_null() {
            return Ok(None);
        }
        let field = |obj: &Value, prefix: &str, name: &str, default: f64| -> Result<f64> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_f64().filter(|f| *f >= 0.0).ok_or_else(|| {
                    Error::field(
                        path,
                        format!("{prefix}{name}"),
                        "expected a non-negative number",
                    )
                }),
            }
        };
        let int = |obj: &Value, prefix: &str, name: &str, default: usize| -> Result<usize> {
            let f = field(obj, prefix, name, default as f64)?;
            if f.fract() != 0.0 {
                return Err(Error::field(
                    path,
                    format!("{prefix}{name}"),
                    "expected an integer",
                ));
            }
            Ok(f as usize)
        };
        let vp = "vision_config.";
        let c = VisionConfig {
            hidden_size: int(v, vp, "hidden_size", 768)?,
            intermediate_size: int(v, vp, "intermediate_size", 3072)?,
            num_hidden_layers: int(v, vp, "num_hidden_layers", 12)?,
            num_attention_heads: int(v, vp, "num_attention_heads", 12)?,
            num_channels: int(v, vp, "num_channels", 3)?,
            image_size: int(v, vp, "image_size", 224)?,
            patch_size: int(v, vp, "patch_size", 16)?,
            layer_norm_eps: field(v, vp, "layer_norm_eps", 1e-6)? as f32,
            mm_tokens_per_image: int(top, "", "mm_tokens_per_image", 256)?,
            image_token_id: int(top, "", "image_token_index", 262_144)? as u32,
            boi_token_id: int(top, "", "boi_token_index", 255_999)? as u32,
            eoi_token_id: int(top, "", "eoi_token_index", 256_000)? as u32,
            text_hidden_size,
        };
        let bad = |name: &str, msg: String| Err(Error::field(path, name, msg));
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            return bad(
                "vision_config.patch_size",
                format!(
                    "{} does not divide image_size {}",
                    c.patch_size, c.image_size
                ),
            );
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return bad(
                "vision_config.num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    c.num_attention_heads, c.hidden_size
                ),
            );
        }
        let side = c.patches_per_side();
        let pooled = (c.mm_tokens_per_image as f64).sqrt() as usize;
        if pooled == 0 || pooled * pooled != c.mm_tokens_per_image || !side.is_multiple_of(pooled) {
            return bad(
                "mm_tokens_per_image",
                format!(
                    "{} is not a square whose side divides the {side} patches per side",
                    c.mm_tokens_per_image
                ),
            );
        }
        if c.num_channels != 3 {
            return bad(
                "vision_config.num_channels",
                format!("{} (only RGB images, 3)", c.num_channels),
            );
        }
        Ok(Some(c))
    }

    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
    pub fn patch_dim(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Every tensor of the tower and projector with its shape, by graph name (checkpoint name without the
/// `model.` prefix).
fn expected_tensors(c: &VisionConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let t = "vision_tower.vision_model.";
    let mut m = BTreeMap::new();
    let p = c.patch_size;
    m.insert(
        format!("{t}embeddings.patch_embedding.weight"),
        vec![h, c.num_channels, p, p],
    );
    m.insert(format!("{t}embeddings.patch_embedding.bias"), vec![h]);
    m.insert(
        format!("{t}embeddings.position_embedding.weight"),
        vec![c.num_patches(), h],
    );
    for l in 0..c.num_hidden_layers {
        let e = format!("{t}encoder.layers.{l}.");
        for n in ["layer_norm1", "layer_norm2"] {
            m.insert(format!("{e}{n}.weight"), vec![h]);
            m.insert(format!("{e}{n}.bias"), vec![h]);
        }
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            m.insert(format!("{e}self_attn.{n}.weight"), vec![h, h]);
            m.insert(format!("{e}self_attn.{n}.bias"), vec![h]);
        }
        m.insert(format!("{e}mlp.fc1.weight"), vec![i, h]);
        m.insert(format!("{e}mlp.fc1.bias"), vec![i]);
        m.insert(format!("{e}mlp.fc2.weight"), vec![h, i]);
        m.insert(format!("{e}mlp.fc2.bias"), vec![h]);
    }
    m.insert(format!("{t}post_layernorm.weight"), vec![h]);
    m.insert(format!("{t}post_layernorm.bias"), vec![h]);
    m.insert(
        "multi_modal_projector.mm_soft_emb_norm.weight".into(),
        vec![h],
    );
    m.insert(
        "multi_modal_projector.mm_input_projection_weight".into(),
        vec![h, c.text_hidden_size],
    );
    m
}

/// The graph name of a checkpoint tensor of the tower or projector; None for other tensors.
fn canonical_name(name: &str) -> Option<String> {
    if let Some(r) = TOWER_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) {
        return Some(format!("vision_tower.vision_model.{r}"));
    }
    PROJECTOR_PREFIXES
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .map(|r| format!("multi_modal_projector.{r}"))
}

/// The projection weight as the graph's Linear reads it (`[out, in]`).
pub const PROJECTION: &str = "multi_modal_projector.mm_input_projection_weight.T";
/// The patch embedding reshaped to `[hidden, channels * patch * patch]`.
pub const PATCH_EMBEDDING: &str = "vision_tower.vision_model.embeddings.patch_embedding.weight";

/// The vision tower and projector of a Gemma 3 multimodal checkpoint.
pub struct VisionModel {
    pub config: VisionConfig,
    pub graph: Graph,
    pub weights: WeightMap,
}

impl VisionModel {
    /// The vision tower of the checkpoint in `dir`, or None when its config has no `vision_config`.
    pub fn load(dir: &Path, text_hidden_size: usize) -> Result<Option<VisionModel>> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let top: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
        let Some(config) = VisionConfig::from_json(&path, &top, text_hidden_size)? else {
            return Ok(None);
        };
        let ck = Checkpoint::open(dir)?;
        VisionModel::from_tensors(config, ck.tensors).map(Some)
    }

    /// Check the tower's tensors among `tensors` (others are ignored) and build the graph.
    pub fn from_tensors(
        config: VisionConfig,
        tensors: BTreeMap<String, Weight>,
    ) -> Result<VisionModel> {
        let expected = expected_tensors(&config);
        let mut weights = WeightMap::new();
        for (name, w) in tensors {
            let Some(c) = canonical_name(&name) else {
                continue;
            };
            let Some(shape) = expected.get(&c) else {
                return Err(Error::tensor(
                    &name,
                    format!(
                        "unexpected tensor: not part of a SigLIP tower of this config (in {})",
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
        // Conv2d weights [h, c, p, p] are the rows of a Linear over patches flattened as (c, y, x).
        let pe = weights.get_mut(PATCH_EMBEDDING).expect("checked above");
        pe.shape = vec![config.hidden_size, config.patch_dim()];
        // The projection is stored [in, out] and used as x @ W; the Linear reads [out, in].
        let proj = &weights["multi_modal_projector.mm_input_projection_weight"];
        let (vin, tout) = (config.hidden_size, config.text_hidden_size);
        let v = proj.to_f32();
        let mut t = vec![0f32; v.len()];
        for r in 0..vin {
            for c in 0..tout {
                t[c * vin + r] = v[r * tout + c];
            }
        }
        weights.insert(
            PROJECTION.into(),
            Weight::from_f32(PROJECTION, vec![tout, vin], &t),
        );
        weights.remove("multi_modal_projector.mm_input_projection_weight");
        let graph = build_gemma3_vision_graph(&config);
        Ok(VisionModel {
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
            CacheConfig::new(max_images.max(1), self.config.num_patches()),
        )
    }

    /// Image embeddings `[images * mm_tokens_per_image, text hidden]` of CHW pixel values (each
    /// `3 * image_size^2`), in order; `taps` as [`Runner::step`].
    pub fn encode(
        &self,
        runner: &mut dyn Runner,
        pixels: &[Vec<f32>],
        taps: &[String],
    ) -> Result<(Mat, BTreeMap<String, Mat>)> {
        let c = &self.config;
        let n = c.num_patches();
        let mut patches = Mat::zeros(pixels.len() * n, c.patch_dim());
        for (i, px) in pixels.iter().enumerate() {
            if px.len() != 3 * c.image_size * c.image_size {
                return Err(Error::invalid(format!(
                    "image {i}: {} pixel values, the tower takes 3x{s}x{s}",
                    px.len(),
                    s = c.image_size
                )));
            }
            self.patchify(px, &mut patches, i * n);
        }
        let batch = Batch {
            seqs: (0..pixels.len())
                .map(|slot| SeqStep {
                    slot,
                    start_pos: 0,
                    tokens: (0..n as u32).collect(),
                    logits: LogitsFor::None,
                })
                .collect(),
        };
        let inputs = StepInputs {
            embed_rows: (0..pixels.len() * n).collect(),
            embeds: patches,
            groups: vec![],
        };
        let out = runner.step_with_inputs(&batch, &inputs, taps)?;
        Ok((out.logits, out.taps))
    }

    /// Write the patches of one CHW image as rows `row0..row0 + num_patches` (row-major over the patch
    /// grid, each patch flattened as (channel, y, x), the order of the Conv2d weight).
    fn patchify(&self, px: &[f32], out: &mut Mat, row0: usize) {
        let (s, p, side) = (
            self.config.image_size,
            self.config.patch_size,
            self.config.patches_per_side(),
        );
        for py in 0..side {
            for pxi in 0..side {
                let row = out.row_mut(row0 + py * side + pxi);
                let mut k = 0;
                for ch in 0..3 {
                    for y in 0..p {
                        let base = ch * s * s + (py * p + y) * s + pxi * p;
                        row[k..k + p].copy_from_slice(&px[base..base + p]);
                        k += p;
                    }
                }
            }
        }
    }
}

/// The SigLIP tower (pre-LN encoder, biases everywhere, non-causal attention, post LayerNorm) and the
/// Gemma 3 projector (average pool to `mm_tokens_per_image`, (1+w) RMSNorm, projection) as a graph. Its
/// input rows are the flattened patches (`Op::Input`) and its token ids the patch indices (for the
/// position table). Taps: `vision_last_hidden` (the tower's output), `image_features` (the output).
pub fn build_gemma3_vision_graph(c: &VisionConfig) -> Graph {
    let mut g = Graph::new(c.num_patches());
    let (h, eps) = (c.hidden_size, c.layer_norm_eps);
    let t = "vision_tower.vision_model.";
    let linear = |g: &mut Graph, name: String, module: String, x: ValueId, out: usize| {
        let y = g.add(
            format!("{name}.matmul"),
            Op::Linear {
                weight: format!("{module}.weight"),
                scheme: QuantScheme::Dense,
            },
            &[x],
            out,
        );
        g.add(
            name,
            Op::BiasAdd {
                bias: format!("{module}.bias"),
            },
            &[y],
            out,
        )
    };
    let ln = |g: &mut Graph, name: String, module: String, x: ValueId| {
        g.add(
            name,
            Op::LayerNorm {
                weight: format!("{module}.weight"),
                bias: format!("{module}.bias"),
                eps,
            },
            &[x],
            h,
        )
    };
    let patches = g.add("vision.patches", Op::Input, &[], c.patch_dim());
    let x = linear(
        &mut g,
        "vision.patch_embed".into(),
        format!("{t}embeddings.patch_embedding"),
        patches,
        h,
    );
    let pos = g.add(
        "vision.positions",
        Op::Embed {
            table: format!("{t}embeddings.position_embedding.weight"),
            scale: 1.0,
        },
        &[],
        h,
    );
    let mut x = g.add("vision.embeddings", Op::Add, &[x, pos], h);
    for l in 0..c.num_hidden_layers {
        let p = format!("vision.layers.{l}.");
        let m = format!("{t}encoder.layers.{l}.");
        let hn = ln(&mut g, format!("{p}ln1"), format!("{m}layer_norm1"), x);
        let q = linear(
            &mut g,
            format!("{p}q_proj"),
            format!("{m}self_attn.q_proj"),
            hn,
            h,
        );
        let k = linear(
            &mut g,
            format!("{p}k_proj"),
            format!("{m}self_attn.k_proj"),
            hn,
            h,
        );
        let v = linear(
            &mut g,
            format!("{p}v_proj"),
            format!("{m}self_attn.v_proj"),
            hn,
            h,
        );
        let a = g.add(
            format!("{p}attn"),
            Op::EncoderAttention {
                n_heads: c.num_attention_heads,
                head_dim: c.head_dim(),
                scale: (c.head_dim() as f32).powf(-0.5),
            },
            &[q, k, v],
            h,
        );
        let o = linear(
            &mut g,
            format!("{p}out_proj"),
            format!("{m}self_attn.out_proj"),
            a,
            h,
        );
        x = g.add(format!("{p}attn_residual"), Op::Add, &[x, o], h);
        let hn = ln(&mut g, format!("{p}ln2"), format!("{m}layer_norm2"), x);
        let f = linear(
            &mut g,
            format!("{p}fc1"),
            format!("{m}mlp.fc1"),
            hn,
            c.intermediate_size,
        );
        let f = g.add(format!("{p}gelu"), Op::GeluTanh, &[f], c.intermediate_size);
        let f = linear(&mut g, format!("{p}fc2"), format!("{m}mlp.fc2"), f, h);
        x = g.add(format!("{p}residual"), Op::Add, &[x, f], h);
    }
    let x = ln(
        &mut g,
        "vision_last_hidden".into(),
        format!("{t}post_layernorm"),
        x,
    );
    let side = c.patches_per_side();
    let pooled_side = (c.mm_tokens_per_image as f64).sqrt() as usize;
    let x = g.add(
        "projector.pool",
        Op::AvgPool2d {
            side,
            kernel: side / pooled_side,
        },
        &[x],
        h,
    );
    let x = g.add(
        "projector.norm",
        Op::RmsNorm {
            weight: Some("multi_modal_projector.mm_soft_emb_norm.weight".into()),
            group: h,
            eps,
            add_one: true,
        },
        &[x],
        h,
    );
    g.output = g.add(
        "image_features",
        Op::Linear {
            weight: PROJECTION.into(),
            scheme: QuantScheme::Dense,
        },
        &[x],
        c.text_hidden_size,
    );
    g
}

/// The text the Gemma 3 processor makes of a prompt: every `<start_of_image>` becomes
/// `"\n\n<start_of_image>" + "<image_soft_token>" * tokens + "<end_of_image>\n\n"`. Tokenizing the result
/// merges the newlines with their neighbours exactly as the processor's tokenizer does. Returns the text and
/// the number of images it holds.
pub fn expand_image_placeholders(prompt: &str, tokens_per_image: usize) -> (String, usize) {
    const BOI: &str = "<start_of_image>";
    let full = format!(
        "\n\n{BOI}{}<end_of_image>\n\n",
        "<image_soft_token>".repeat(tokens_per_image)
    );
    (prompt.replace(BOI, &full), prompt.matches(BOI).count())
}

/// Step inputs for a prompt whose image-token rows take `features` (`[images * tokens, hidden]`, in order):
/// the embedding rows and the bidirectional groups (one per contiguous run of image tokens, as transformers'
/// `token_type_ids`). `bidirectional: false` leaves the mask causal (for tests).
pub fn prompt_inputs(
    ids: &[u32],
    image_token: u32,
    features: &Mat,
    bidirectional: bool,
) -> Result<StepInputs> {
    let rows: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == image_token).collect();
    if rows.len() != features.rows {
        return Err(Error::invalid(format!(
            "the prompt has {} image tokens but the images give {} embeddings (is there one <start_of_image> \
             per image?)",
            rows.len(),
            features.rows
        )));
    }
    let mut groups = vec![None; ids.len()];
    if bidirectional {
        let mut gid = 0u32;
        for i in 0..ids.len() {
            if ids[i] == image_token {
                if i > 0 && ids[i - 1] == image_token {
                    groups[i] = groups[i - 1];
                } else {
                    groups[i] = Some(gid);
                    gid += 1;
                }
            }
        }
    }
    Ok(StepInputs {
        embed_rows: rows,
        embeds: features.clone(),
        groups,
    })
}

/// The image side of a multimodal checkpoint, Gemma 3 or Gemma 4, behind one interface: images and a prompt
/// text in, the prompt's token ids and step inputs out (`e4m3 run --image`, `serve`).
pub enum ImageModel {
    Gemma3(VisionModel),
    Gemma4(Gemma4Vision),
}

/// Why [`ImageModel::prompt`] failed: one image (its index among the images), or the prompt as a whole.
#[derive(Debug, Clone, PartialEq)]
pub enum ImagePromptError {
    Image { index: usize, message: String },
    Prompt(String),
}

impl std::fmt::Display for ImagePromptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImagePromptError::Image { index, message } => write!(f, "image {index}: {message}"),
            ImagePromptError::Prompt(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ImagePromptError {}

/// A prompt with its images, ready for `generate_with_inputs`.
#[derive(Debug, Clone)]
pub struct ImagePrompt {
    /// The prompt's token ids as the text model embeds them (image rows: their features replace them).
    pub ids: Vec<u32>,
    pub inputs: StepInputs,
    /// Soft tokens of each image, in order.
    pub tokens_per_image: Vec<usize>,
    /// Seconds spent preprocessing and encoding the images.
    pub preprocess_s: f64,
    pub encode_s: f64,
}

impl ImageModel {
    /// The vision tower of the checkpoint in `dir` whose text config is `config`; None when its
    /// config.json has no `vision_config`.
    pub fn load(dir: &Path, config: &Gemma3Config) -> Result<Option<ImageModel>> {
        if config.gemma4.is_none() {
            return Ok(VisionModel::load(dir, config.hidden_size)?.map(ImageModel::Gemma3));
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let top: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
        Ok(Gemma4Vision::load(dir, &top, config.hidden_size)?.map(ImageModel::Gemma4))
    }

    /// The text that stands for one image in a prompt (the processor expands each).
    pub fn marker(&self) -> &'static str {
        match self {
            ImageModel::Gemma3(_) => "<start_of_image>",
            ImageModel::Gemma4(_) => "<|image|>",
        }
    }

    /// A runner for the tower on `backend` that encodes one image at a time (as [`ImageModel::prompt`] does).
    pub fn runner(&self, backend: &dyn Backend) -> Result<Box<dyn Runner>> {
        match self {
            ImageModel::Gemma3(v) => v.runner(backend, 1),
            ImageModel::Gemma4(v) => v.runner(backend, 1),
        }
    }

    /// The tower's graph (to ask a backend whether it has every op).
    pub fn graph(&self) -> &Graph {
        match self {
            ImageModel::Gemma3(v) => &v.graph,
            ImageModel::Gemma4(v) => &v.graph,
        }
    }

    /// The prompt of `text`, whose [`ImageModel::marker`]s stand for `images` in order: every image
    /// preprocessed as the family's processor does and encoded on `runner` (from [`ImageModel::runner`]),
    /// the markers expanded as the processor does, the result tokenized with `tokenize`, and the image
    /// embeddings placed at the soft-token rows with the family's attention groups. `text_config` is the
    /// text model's config. The one entry point of `e4m3 run --image` and `e4m3 serve`.
    pub fn prompt(
        &self,
        runner: &mut dyn Runner,
        text_config: &Gemma3Config,
        images: &[Rgb8],
        text: &str,
        tokenize: &mut dyn FnMut(&str) -> Result<Vec<u32>>,
    ) -> std::result::Result<ImagePrompt, ImagePromptError> {
        let markers = text.matches(self.marker()).count();
        if markers != images.len() {
            return Err(ImagePromptError::Prompt(format!(
                "the prompt has {markers} {} markers but {} images were given",
                self.marker(),
                images.len()
            )));
        }
        let image_err = |index: usize| {
            move |e: Error| ImagePromptError::Image {
                index,
                message: e.to_string(),
            }
        };
        let (mut preprocess_s, mut encode_s) = (0.0, 0.0);
        let mut features: Option<Mat> = None;
        let mut tokens_per_image = Vec::with_capacity(images.len());
        for (index, img) in images.iter().enumerate() {
            let t = std::time::Instant::now();
            let (f, tokens) = match self {
                ImageModel::Gemma3(v) => {
                    let px = gemma3_pixels(img, v.config.image_size);
                    preprocess_s += t.elapsed().as_secs_f64();
                    let (f, _) = v.encode(runner, &[px], &[]).map_err(image_err(index))?;
                    (f, v.config.mm_tokens_per_image)
                }
                ImageModel::Gemma4(v) => {
                    let c = &v.config;
                    let cut = if c.unified {
                        gemma4_merged_pixels
                    } else {
                        gemma4_pixels
                    };
                    let px = cut(img, c.patch_size, c.max_soft_tokens, c.pooling_kernel_size)
                        .map_err(|message| ImagePromptError::Image { index, message })?;
                    preprocess_s += t.elapsed().as_secs_f64();
                    let tokens = px.num_patches() / c.rows_per_token();
                    let (f, _) = v.encode(runner, &[px], &[]).map_err(image_err(index))?;
                    (f, tokens)
                }
            };
            encode_s += t.elapsed().as_secs_f64();
            tokens_per_image.push(tokens);
            match &mut features {
                None => features = Some(f),
                Some(all) => {
                    all.data.extend_from_slice(&f.data);
                    all.rows += f.rows;
                }
            }
        }
        encode_s -= preprocess_s;
        let features = features.unwrap_or_else(|| Mat::zeros(0, text_config.hidden_size));
        let expanded = match self {
            ImageModel::Gemma3(v) => {
                expand_image_placeholders(text, v.config.mm_tokens_per_image).0
            }
            ImageModel::Gemma4(_) => expand_gemma4_placeholders(text, &tokens_per_image).0,
        };
        let prompt_err = |e: Error| ImagePromptError::Prompt(e.to_string());
        let ids = tokenize(&expanded).map_err(prompt_err)?;
        let (ids, inputs) = self
            .prompt_inputs(ids, &features, text_config)
            .map_err(prompt_err)?;
        Ok(ImagePrompt {
            ids,
            inputs,
            tokens_per_image,
            preprocess_s,
            encode_s,
        })
    }

    /// The step ids and inputs of a tokenized prompt whose image rows take `features` (in order). Gemma 3:
    /// bidirectional groups on every layer (the graph's attention reads them), an image token outside the
    /// text vocabulary embedded as padding (0); Gemma 4: image tokens become `pad_token_id` (transformers'
    /// `llm_input_ids`, which the per-layer embeddings gather), groups for the layers whose attention reads
    /// them (sliding layers of `use_bidirectional_attention == "vision"` models).
    pub fn prompt_inputs(
        &self,
        ids: Vec<u32>,
        features: &Mat,
        text_config: &Gemma3Config,
    ) -> Result<(Vec<u32>, StepInputs)> {
        let (image_token, pad) = match (self, &text_config.gemma4) {
            (ImageModel::Gemma3(v), _) => {
                let t = v.config.image_token_id;
                (t, (t as usize >= text_config.vocab_size).then_some(0))
            }
            (ImageModel::Gemma4(v), Some(g4)) => (v.config.image_token_id, Some(g4.pad_token_id)),
            (ImageModel::Gemma4(_), None) => {
                return Err(Error::invalid(
                    "a Gemma 4 vision tower needs a Gemma 4 text model",
                ))
            }
        };
        let inputs = prompt_inputs(&ids, image_token, features, true)?;
        let ids = ids
            .into_iter()
            .map(|t| match pad {
                Some(p) if t == image_token => p,
                _ => t,
            })
            .collect();
        Ok((ids, inputs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_expand_as_the_processor() {
        let (t, n) = expand_image_placeholders("a<start_of_image>b<start_of_image>", 2);
        assert_eq!(n, 2);
        let img = "\n\n<start_of_image><image_soft_token><image_soft_token><end_of_image>\n\n";
        assert_eq!(t, format!("a{img}b{img}"));
    }

    #[test]
    fn groups_follow_contiguous_image_runs() {
        let f = Mat::zeros(4, 2);
        let s = prompt_inputs(&[1, 9, 9, 2, 9, 9, 3], 9, &f, true).unwrap();
        assert_eq!(s.embed_rows, vec![1, 2, 4, 5]);
        assert_eq!(
            s.groups,
            vec![None, Some(0), Some(0), None, Some(1), Some(1), None]
        );
        assert!(prompt_inputs(&[1, 9, 2], 9, &f, true).is_err());
    }
}
