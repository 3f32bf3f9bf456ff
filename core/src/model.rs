//! Gemma 3 text models: checkpoint tensors checked against the config, and the graph built once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, Weight};
use crate::config::{Gemma3Config, LayerType};
use crate::error::{Error, Result};
use crate::graph::{CacheLayer, Graph, ImageGroups, Op, QuantScheme, ValueId, WeightMap};
use crate::quant_config::{CheckpointQuant, LinearQuant};
use crate::tensor::{round_to_bf16, round_to_f16, DType};

/// Prefixes under which checkpoints store the text model, most specific first.
const TEXT_PREFIXES: [&str; 3] = ["model.language_model.", "language_model.model.", "model."];
/// Tensors of the multimodal parts, present in Gemma3ForConditionalGeneration checkpoints; the text model
/// does not read them.
const NON_TEXT_PREFIXES: [&str; 9] = [
    "vision_tower.",
    "model.vision_tower.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
    "model.embed_vision.",
    "model.audio_tower.",
    "model.embed_audio.",
    "model.vision_embedder.",
    "model.vision_model.",
];
/// Prefixes under which checkpoints store lm_head (and its scales).
const LM_HEAD_PREFIXES: [&str; 2] = ["lm_head.", "language_model.lm_head."];
const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
/// The Linear modules of one layer, with their [out, in] from the config.
const LAYER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
/// Suffixes of the scale tensors a quantized Linear can carry.
const SCALE_SUFFIXES: [&str; 3] = ["weight_scale", "input_scale", "weight_scale_inv"];

pub struct Model {
    pub dir: PathBuf,
    pub config: Gemma3Config,
    pub graph: Graph,
    /// Weights by graph name (`layers.0.self_attn.q_proj.weight`, scales such as
    /// `layers.0.self_attn.q_proj.weight_scale`, KV-cache scales `layers.0.self_attn.k_scale`, ...).
    pub weights: WeightMap,
    /// Whether lm_head is the embedding table.
    pub tied_lm_head: bool,
    /// The checkpoint's quantization format, as detected from its config files.
    pub quant: CheckpointQuant,
    /// Whether the checkpoint declares an FP8 KV cache (`kv_cache_quant_algo: FP8` / `kv_cache_scheme`).
    pub kv_cache_fp8: bool,
    /// The scheme of every Linear, by graph module name (`layers.0.self_attn.q_proj`, ..., `lm_head`).
    pub linear_schemes: BTreeMap<String, QuantScheme>,
}

/// What `info` prints for one module group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSummary {
    /// `embed`, `attention`, `mlp`, `norms` or `lm_head`.
    pub group: &'static str,
    /// Scheme name (`dense`, `fp8-static`, ...) and how many Linear modules of the group use it.
    pub schemes: Vec<(String, usize)>,
    /// Stored dtypes of the group's tensors (scales included).
    pub dtypes: Vec<DType>,
    pub tensors: usize,
    /// Bytes as stored, scales included.
    pub bytes: usize,
    /// Bytes the same weights take in BF16 (scales not counted).
    pub bf16_bytes: usize,
}

/// Map a checkpoint tensor name to its graph name; None for tensors of other models (vision tower).
/// KV-cache scales get one name whatever their producer (fp8-formats.md 8.1):
/// `self_attn.k_proj.k_scale` (ModelOpt), `self_attn.k_scale` (compressed-tensors) and
/// `self_attn.k_proj.output_scale` (legacy) all become `layers.N.self_attn.k_scale`.
fn canonical_name(name: &str) -> Option<String> {
    let rest = if let Some(r) = LM_HEAD_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) {
        format!("lm_head.{r}")
    } else {
        TEXT_PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))?
            .to_string()
    };
    // Early Gemma 4 exports name the experts `moe.*` (vLLM's remap).
    for (from, to) in [
        (".moe.gate_up_proj", ".experts.gate_up_proj"),
        (".moe.down_proj", ".experts.down_proj"),
        (".moe.per_expert_scale", ".router.per_expert_scale"),
    ] {
        if let Some(i) = rest.find(from) {
            return Some(format!("{}{to}{}", &rest[..i], &rest[i + from.len()..]));
        }
    }
    for (from, to) in [
        (".self_attn.k_proj.k_scale", ".self_attn.k_scale"),
        (".self_attn.v_proj.v_scale", ".self_attn.v_scale"),
        (".self_attn.q_proj.output_scale", ".self_attn.q_scale"),
        (".self_attn.k_proj.output_scale", ".self_attn.k_scale"),
        (".self_attn.v_proj.output_scale", ".self_attn.v_scale"),
    ] {
        if let Some(stem) = rest.strip_suffix(from) {
            return Some(format!("{stem}{to}"));
        }
    }
    Some(rest)
}

/// What one tensor must look like.
struct Expect {
    shapes: Vec<Vec<usize>>,
    dtypes: Vec<DType>,
    /// Why (for quantization-dependent tensors): which scheme, which exclusion entry.
    why: Option<String>,
}

impl Expect {
    fn new(shape: Vec<usize>, dtypes: &[DType]) -> Expect {
        Expect {
            shapes: vec![shape],
            dtypes: dtypes.to_vec(),
            why: None,
        }
    }

    /// Check `w` (reported under its checkpoint name `stored`).
    fn check(&self, w: &Weight, stored: &str) -> Result<()> {
        let why = match &self.why {
            Some(y) => format!("; {y}"),
            None => String::new(),
        };
        if !self.shapes.contains(&w.shape) {
            let want: Vec<String> = self.shapes.iter().map(|s| format!("{s:?}")).collect();
            return Err(Error::tensor(
                stored,
                format!(
                    "expected shape {}, found {:?} (in {}{why})",
                    want.join(" or "),
                    w.shape,
                    w.file.display()
                ),
            ));
        }
        if !self.dtypes.contains(&w.dtype) {
            let want: Vec<String> = self.dtypes.iter().map(|d| d.to_string()).collect();
            return Err(Error::tensor(
                stored,
                format!(
                    "expected dtype {}, found {} (in {}{why})",
                    want.join(" or "),
                    w.dtype,
                    w.file.display()
                ),
            ));
        }
        Ok(())
    }
}

impl Model {
    /// Load `config.json` (and `hf_quant_config.json` when present) and the safetensors of `dir`.
    pub fn load(dir: &Path) -> Result<Model> {
        let config = Gemma3Config::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        Model::from_tensors(dir, config, ck.tensors)
    }

    /// Check every tensor against the config and build the graph; the quantization format is detected
    /// from the config files of `dir` (none when they are absent).
    pub fn from_tensors(
        dir: &Path,
        config: Gemma3Config,
        tensors: BTreeMap<String, Weight>,
    ) -> Result<Model> {
        let quant = CheckpointQuant::detect(dir)?;
        Model::from_tensors_quant(dir, config, quant, tensors)
    }

    /// Check every tensor against the config and the quantization format, and build the graph.
    pub fn from_tensors_quant(
        dir: &Path,
        config: Gemma3Config,
        quant: CheckpointQuant,
        tensors: BTreeMap<String, Weight>,
    ) -> Result<Model> {
        let mut weights = WeightMap::new();
        let mut stored_name = BTreeMap::new();
        for (name, w) in tensors {
            if NON_TEXT_PREFIXES.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let Some(canonical) = canonical_name(&name) else {
                return Err(Error::tensor(
                    &name,
                    format!("unexpected tensor in {}", w.file.display()),
                ));
            };
            // The deprecated single `kv_scale` stands for both k and v (vLLM maybe_remap_kv_scale_name).
            let names = match canonical.strip_suffix(".self_attn.kv_scale") {
                Some(stem) => vec![
                    format!("{stem}.self_attn.k_scale"),
                    format!("{stem}.self_attn.v_scale"),
                ],
                None => vec![canonical],
            };
            for canonical in names {
                stored_name.insert(canonical.clone(), name.clone());
                if let Some(prev) = weights.insert(canonical.clone(), w.renamed(&canonical)) {
                    return Err(Error::tensor(
                        &name,
                        format!("duplicates `{}` under another prefix", prev.name),
                    ));
                }
            }
        }
        // KV-shared Gemma 4 layers have no k/v projections; transformers ignores them if a file has them.
        weights.retain(|name, _| {
            let Some(rest) = name.strip_prefix("layers.") else {
                return true;
            };
            let Some((l, rest)) = rest.split_once('.') else {
                return true;
            };
            let shared = l
                .parse::<usize>()
                .is_ok_and(|l| l < config.num_hidden_layers && !config.has_kv_proj(l));
            !(shared
                && [
                    "self_attn.k_proj.",
                    "self_attn.v_proj.",
                    "self_attn.k_norm.",
                    "self_attn.v_norm.",
                ]
                .iter()
                .any(|p| rest.starts_with(p)))
        });
        let stored = |canonical: &str| -> String {
            stored_name
                .get(canonical)
                .cloned()
                .unwrap_or_else(|| canonical.to_string())
        };

        // Every tensor the text model has, then the quantization of each Linear.
        let (tensor_shapes, linears) = expected_tensors(&config);
        let mut expected: BTreeMap<String, Expect> = tensor_shapes
            .into_iter()
            .map(|(n, s)| (n, Expect::new(s, &FLOAT_DTYPES)))
            .collect();
        if let Some(name) = expected
            .keys()
            .find(|n| !weights.contains_key(*n) && *n != "lm_head.weight")
        {
            return Err(Error::tensor(
                name,
                format!("missing from the checkpoint in {}", dir.display()),
            ));
        }
        let mut linear_schemes = BTreeMap::new();
        // Reported after every present tensor is checked (a BF16 weight where FP8 belongs is that error).
        let mut missing_scale = None;
        let mut modules: Vec<(String, [usize; 2])> = linears;
        if weights.contains_key("lm_head.weight") {
            modules.push((
                "lm_head".to_string(),
                [config.vocab_size, config.hidden_size],
            ));
        }
        for (m, [out, inp]) in &modules {
            let weight = format!("{m}.weight");
            let stored_module = stored(&weight)
                .strip_suffix(".weight")
                .map(str::to_string)
                .unwrap_or_else(|| m.clone());
            let why = Some(quant.explain(&stored_module));
            let q = quant.linear(&stored_module);
            let scale = |suffix: &str| format!("{m}.{suffix}");
            let mut add = |name: String, shapes: Vec<Vec<usize>>, dtypes: &[DType]| {
                expected.insert(
                    name,
                    Expect {
                        shapes,
                        dtypes: dtypes.to_vec(),
                        why: why.clone(),
                    },
                );
            };
            let fp8 = [DType::F8E4M3];
            let scheme = match q {
                LinearQuant::Dense => {
                    add(weight.clone(), vec![vec![*out, *inp]], &FLOAT_DTYPES);
                    QuantScheme::Dense
                }
                LinearQuant::Fp8Static => {
                    add(weight.clone(), vec![vec![*out, *inp]], &fp8);
                    add(scale("weight_scale"), vec![vec![], vec![1]], &[DType::F32]);
                    add(scale("input_scale"), vec![vec![], vec![1]], &[DType::F32]);
                    QuantScheme::Fp8Static {
                        weight_scale: scale("weight_scale"),
                        input_scale: scale("input_scale"),
                    }
                }
                LinearQuant::Fp8Dynamic => {
                    add(weight.clone(), vec![vec![*out, *inp]], &fp8);
                    add(scale("weight_scale"), vec![vec![*out, 1]], &FLOAT_DTYPES);
                    QuantScheme::Fp8Dynamic {
                        weight_scale: scale("weight_scale"),
                    }
                }
                LinearQuant::Fp8BlockWeightOnly { block } => {
                    let (ob, ib) = (out.div_ceil(block[0]), inp.div_ceil(block[1]));
                    add(weight.clone(), vec![vec![*out, *inp]], &fp8);
                    add(
                        scale("weight_scale"),
                        vec![vec![ob, 1, ib, 1], vec![ob, ib]],
                        &[DType::F32],
                    );
                    QuantScheme::Fp8BlockWeightOnly {
                        weight_scale: scale("weight_scale"),
                        block,
                    }
                }
                LinearQuant::Fp8Block { block } => {
                    let (ob, ib) = (out.div_ceil(block[0]), inp.div_ceil(block[1]));
                    add(weight.clone(), vec![vec![*out, *inp]], &fp8);
                    add(
                        scale("weight_scale_inv"),
                        vec![vec![ob, ib]],
                        &[DType::F32, DType::BF16],
                    );
                    QuantScheme::Fp8Block {
                        weight_scale_inv: scale("weight_scale_inv"),
                        block,
                    }
                }
            };
            for s in scheme.scale_tensors() {
                if !weights.contains_key(s) && missing_scale.is_none() {
                    missing_scale = Some(Error::tensor(
                        format!("{stored_module}.{}", &s[m.len() + 1..]),
                        format!(
                            "missing: the FP8 weight `{}` needs it ({})",
                            stored(&weight),
                            why.as_deref().unwrap_or("")
                        ),
                    ));
                }
            }
            linear_schemes.insert(m.clone(), scheme);
        }
        // Fused expert tensors (Gemma 4 MoE): dense, or a block scheme over each expert's 2-D slice with
        // the expert as the scale's leading dimension (`{name}_scale` for C, `{name}_scale_inv` for D, as
        // transformers' FineGrainedFP8 experts name it).
        for l in 0..config.num_hidden_layers {
            for (name, shape) in expert_tensors(&config, l) {
                let stored_p = stored(&name);
                let why = Some(quant.explain(&stored_p));
                let [e, o, i] = shape;
                let mut add = |n: String, shapes: Vec<Vec<usize>>, dtypes: &[DType]| {
                    expected.insert(
                        n,
                        Expect {
                            shapes,
                            dtypes: dtypes.to_vec(),
                            why: why.clone(),
                        },
                    );
                };
                let scheme = match quant.linear(&stored_p) {
                    LinearQuant::Dense => {
                        add(name.clone(), vec![shape.to_vec()], &FLOAT_DTYPES);
                        QuantScheme::Dense
                    }
                    LinearQuant::Fp8BlockWeightOnly { block } => {
                        add(name.clone(), vec![shape.to_vec()], &[DType::F8E4M3]);
                        let sn = format!("{name}_scale");
                        let grid = vec![e, o.div_ceil(block[0]), i.div_ceil(block[1])];
                        add(sn.clone(), vec![grid], &[DType::F32]);
                        QuantScheme::Fp8BlockWeightOnly {
                            weight_scale: sn,
                            block,
                        }
                    }
                    LinearQuant::Fp8Block { block } => {
                        add(name.clone(), vec![shape.to_vec()], &[DType::F8E4M3]);
                        let sn = format!("{name}_scale_inv");
                        let grid = vec![e, o.div_ceil(block[0]), i.div_ceil(block[1])];
                        add(sn.clone(), vec![grid], &[DType::F32, DType::BF16]);
                        QuantScheme::Fp8Block {
                            weight_scale_inv: sn,
                            block,
                        }
                    }
                    _ => {
                        return Err(Error::tensor(
                            &stored_p,
                            format!(
                            "{}: fused expert tensors are supported dense or in the block schemes \
                                 (fp8-block-wo, fp8-block) only",
                            quant.name()
                        ),
                        ))
                    }
                };
                for sc in scheme.scale_tensors() {
                    if !weights.contains_key(sc) && missing_scale.is_none() {
                        missing_scale = Some(Error::tensor(
                            stored(sc),
                            format!(
                                "missing: the FP8 expert tensor `{stored_p}` needs it ({})",
                                why.as_deref().unwrap_or("")
                            ),
                        ));
                    }
                }
                if !weights.contains_key(&name) {
                    return Err(Error::tensor(
                        &stored_p,
                        format!("missing from the checkpoint in {}", dir.display()),
                    ));
                }
                linear_schemes.insert(name, scheme);
            }
        }
        // KV-cache scales: per-tensor (one value), as stored.
        let kv_declared = weights
            .keys()
            .any(|k| k.ends_with(".self_attn.k_scale") || k.ends_with(".self_attn.v_scale"));
        for l in 0..config.num_hidden_layers {
            for s in ["q_scale", "k_scale", "v_scale"] {
                expected.insert(
                    format!("layers.{l}.self_attn.{s}"),
                    Expect {
                        shapes: vec![vec![], vec![1]],
                        dtypes: FLOAT_DTYPES.to_vec(),
                        why: Some("a KV-cache scale is one value per layer".into()),
                    },
                );
            }
        }
        for (name, e) in &expected {
            if let Some(w) = weights.get(name) {
                e.check(w, &stored(name))?;
            }
        }
        if let Some(e) = missing_scale {
            return Err(e);
        }
        if let Some(extra) = weights.keys().find(|k| !expected.contains_key(*k)) {
            let mut msg =
                "unexpected tensor: not part of a Gemma 3 text model with this config".to_string();
            if let Some((module, _)) = extra.rsplit_once('.') {
                if linear_schemes.get(module) == Some(&QuantScheme::Dense)
                    && SCALE_SUFFIXES
                        .iter()
                        .any(|s| extra.ends_with(&format!(".{s}")))
                {
                    let sm = stored(&format!("{module}.weight"));
                    let sm = sm.strip_suffix(".weight").unwrap_or(&sm);
                    msg = format!(
                        "unexpected tensor: a scale for a module that stays dense ({})",
                        quant.explain(sm)
                    );
                } else if let Some(
                    QuantScheme::Fp8Static { .. }
                    | QuantScheme::Fp8Dynamic { .. }
                    | QuantScheme::Fp8BlockWeightOnly { .. }
                    | QuantScheme::Fp8Block { .. },
                ) = linear_schemes.get(module)
                {
                    msg = format!(
                        "unexpected tensor: {} expects only {:?} next to the weight",
                        quant.name(),
                        linear_schemes[module].scale_tensors()
                    );
                }
            }
            return Err(Error::tensor(stored(extra), msg));
        }
        // ModelOpt block scales [ob, 1, ib, 1] are viewed as [ob, ib] (same bytes), the layout of D.
        for scheme in linear_schemes.values() {
            if let QuantScheme::Fp8BlockWeightOnly { weight_scale, .. } = scheme {
                let w = weights.get_mut(weight_scale).expect("checked above");
                if w.shape.len() == 4 {
                    w.shape = vec![w.shape[0], w.shape[2]];
                }
            }
        }
        // KV-cache scales default to 1.0; one of k/v alone stands for both (vLLM BaseKVCacheMethod).
        if !matches!(quant, CheckpointQuant::None) || kv_declared {
            for l in 0..config.num_hidden_layers {
                let (k, v) = (
                    format!("layers.{l}.self_attn.k_scale"),
                    format!("layers.{l}.self_attn.v_scale"),
                );
                match (weights.get(&k).cloned(), weights.get(&v).cloned()) {
                    (Some(_), Some(_)) => {}
                    (Some(kw), None) => {
                        weights.insert(v.clone(), kw.renamed(&v));
                    }
                    (None, Some(vw)) => {
                        weights.insert(k.clone(), vw.renamed(&k));
                    }
                    (None, None) => {
                        weights.insert(k.clone(), Weight::from_f32(&k, vec![], &[1.0]));
                        weights.insert(v.clone(), Weight::from_f32(&v, vec![], &[1.0]));
                    }
                }
            }
        }
        let tied_lm_head = !weights.contains_key("lm_head.weight");
        if tied_lm_head {
            if !config.tie_word_embeddings {
                return Err(Error::tensor(
                    "lm_head.weight",
                    "missing, and tie_word_embeddings is false",
                ));
            }
            let embed = weights["embed_tokens.weight"].renamed("lm_head.weight");
            weights.insert("lm_head.weight".to_string(), embed);
            linear_schemes.insert("lm_head".to_string(), QuantScheme::Dense);
        }
        let embed_dtype = weights["embed_tokens.weight"].dtype;
        let mut graph = if config.is_gemma4() {
            build_gemma4_graph(
                &config,
                &weights,
                &linear_schemes,
                &Gemma4Options::default(),
            )?
        } else {
            build_gemma3_graph_quant(&config, embed_dtype, &linear_schemes)
        };
        // An FP8 KV cache uses the checkpoint's per-tensor k/v scales where it has them.
        let owners: Vec<usize> = (0..config.num_hidden_layers)
            .filter(|&l| config.has_kv_proj(l))
            .collect();
        for (layer, &l) in graph.cache_layers.iter_mut().zip(&owners) {
            let k = format!("layers.{l}.self_attn.k_scale");
            let v = format!("layers.{l}.self_attn.v_scale");
            layer.k_scale = weights.contains_key(&k).then_some(k);
            layer.v_scale = weights.contains_key(&v).then_some(v);
        }
        let kv_cache_fp8 = quant.kv_cache_fp8();
        Ok(Model {
            dir: dir.to_path_buf(),
            config,
            graph,
            weights,
            tied_lm_head,
            quant,
            kv_cache_fp8,
            linear_schemes,
        })
    }

    /// Bytes of weights the model reads (the tied lm_head counted once).
    pub fn weight_bytes(&self) -> usize {
        self.weights
            .iter()
            .filter(|(n, _)| !(self.tied_lm_head && n.as_str() == "lm_head.weight"))
            .map(|(_, w)| w.bytes().len())
            .sum()
    }

    /// Per module group (embed, attention, mlp, norms, lm_head): schemes, dtypes, bytes as stored and
    /// in BF16. A tied lm_head is left out (it is the embedding).
    pub fn group_summary(&self) -> Vec<GroupSummary> {
        let group_of = |n: &str| -> &'static str {
            if n.starts_with("embed_tokens.") {
                "embed"
            } else if n.starts_with("lm_head.") {
                "lm_head"
            } else if n.contains("norm") {
                "norms"
            } else if n.contains(".self_attn.") {
                "attention"
            } else if n.contains(".mlp.") || n.contains(".experts.") || n.contains(".router.") {
                "mlp"
            } else {
                "other"
            }
        };
        let mut out = Vec::new();
        for group in ["embed", "attention", "mlp", "norms", "lm_head"] {
            if group == "lm_head" && self.tied_lm_head {
                continue;
            }
            let mut s = GroupSummary {
                group,
                schemes: vec![],
                dtypes: vec![],
                tensors: 0,
                bytes: 0,
                bf16_bytes: 0,
            };
            for (n, w) in &self.weights {
                if group_of(n) != group {
                    continue;
                }
                s.tensors += 1;
                s.bytes += w.bytes().len();
                let expert =
                    n.contains(".experts.") && !n.ends_with("scale") && !n.ends_with("_inv");
                if n.ends_with(".weight") || expert {
                    s.bf16_bytes += w.numel() * 2;
                }
                if !s.dtypes.contains(&w.dtype) {
                    s.dtypes.push(w.dtype);
                }
            }
            if group == "embed" {
                s.schemes.push(("dense".to_string(), 1));
            }
            for (m, scheme) in &self.linear_schemes {
                if group_of(&format!("{m}.weight")) == group {
                    match s.schemes.iter_mut().find(|(n, _)| n == scheme.name()) {
                        Some((_, c)) => *c += 1,
                        None => s.schemes.push((scheme.name().to_string(), 1)),
                    }
                }
            }
            out.push(s);
        }
        out
    }
}

/// Tensor shapes by graph name, and the Linear modules with their `[out, in]`.
pub type ExpectedTensors = (BTreeMap<String, Vec<usize>>, Vec<(String, [usize; 2])>);

/// Every tensor the text model has (Linear weights included), with its shape, and the Linear modules
/// with their `[out, in]`. `lm_head.weight` is listed; it may be absent (tied).
pub fn expected_tensors(c: &Gemma3Config) -> ExpectedTensors {
    if c.is_gemma4() {
        return expected_tensors_gemma4(c);
    }
    let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let mut m = BTreeMap::new();
    let mut linears = Vec::new();
    m.insert("embed_tokens.weight".to_string(), vec![c.vocab_size, h]);
    m.insert("norm.weight".to_string(), vec![h]);
    m.insert("lm_head.weight".to_string(), vec![c.vocab_size, h]);
    for l in 0..c.num_hidden_layers {
        let p = format!("layers.{l}.");
        for (n, s) in [
            ("input_layernorm", vec![h]),
            ("self_attn.q_proj", vec![q, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, q]),
            ("self_attn.q_norm", vec![d]),
            ("self_attn.k_norm", vec![d]),
            ("post_attention_layernorm", vec![h]),
            ("pre_feedforward_layernorm", vec![h]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
            ("post_feedforward_layernorm", vec![h]),
        ] {
            if LAYER_LINEARS.contains(&n) {
                linears.push((format!("{p}{n}"), [s[0], s[1]]));
            }
            m.insert(format!("{p}{n}.weight"), s);
        }
    }
    (m, linears)
}

/// The Gemma 4 tensors (gemma-architecture.md section 2.4). Expert tensors (`experts.gate_up_proj`,
/// `experts.down_proj`) are not in the Linear list: they are 3-D.
fn expected_tensors_gemma4(c: &Gemma3Config) -> ExpectedTensors {
    let g = c.gemma4.as_ref().expect("a Gemma 4 config");
    let (h, nl, nh) = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads);
    let p_dim = g.hidden_size_per_layer_input;
    let mut m = BTreeMap::new();
    let mut linears: Vec<(String, [usize; 2])> = Vec::new();
    m.insert("embed_tokens.weight".to_string(), vec![c.vocab_size, h]);
    m.insert("norm.weight".to_string(), vec![h]);
    m.insert("lm_head.weight".to_string(), vec![c.vocab_size, h]);
    if p_dim > 0 {
        m.insert(
            "embed_tokens_per_layer.weight".to_string(),
            vec![g.vocab_size_per_layer_input, nl * p_dim],
        );
        linears.push(("per_layer_model_projection".into(), [nl * p_dim, h]));
        m.insert("per_layer_projection_norm.weight".to_string(), vec![p_dim]);
    }
    for l in 0..nl {
        let p = format!("layers.{l}.");
        let (d, kv, i) = (
            c.layer_head_dim(l),
            c.layer_kv_heads(l),
            c.layer_intermediate(l),
        );
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ] {
            m.insert(format!("{p}{n}.weight"), vec![h]);
        }
        m.insert(format!("{p}layer_scalar"), vec![1]);
        m.insert(format!("{p}self_attn.q_norm.weight"), vec![d]);
        linears.push((format!("{p}self_attn.q_proj"), [nh * d, h]));
        if c.has_kv_proj(l) {
            linears.push((format!("{p}self_attn.k_proj"), [kv * d, h]));
            m.insert(format!("{p}self_attn.k_norm.weight"), vec![d]);
        }
        if c.has_v_proj(l) {
            linears.push((format!("{p}self_attn.v_proj"), [kv * d, h]));
        }
        linears.push((format!("{p}self_attn.o_proj"), [h, nh * d]));
        linears.push((format!("{p}mlp.gate_proj"), [i, h]));
        linears.push((format!("{p}mlp.up_proj"), [i, h]));
        linears.push((format!("{p}mlp.down_proj"), [h, i]));
        if p_dim > 0 {
            linears.push((format!("{p}per_layer_input_gate"), [p_dim, h]));
            linears.push((format!("{p}per_layer_projection"), [h, p_dim]));
            m.insert(format!("{p}post_per_layer_input_norm.weight"), vec![h]);
        }
        if let Some(moe) = &g.moe {
            let e = moe.num_experts;
            linears.push((format!("{p}router.proj"), [e, h]));
            m.insert(format!("{p}router.scale"), vec![h]);
            m.insert(format!("{p}router.per_expert_scale"), vec![e]);
            for n in [
                "pre_feedforward_layernorm_2",
                "post_feedforward_layernorm_1",
                "post_feedforward_layernorm_2",
            ] {
                m.insert(format!("{p}{n}.weight"), vec![h]);
            }
        }
    }
    for (name, [o, i]) in &linears {
        m.insert(format!("{name}.weight"), vec![*o, *i]);
    }
    (m, linears)
}

/// The fused expert tensors of MoE layer `l`: (name, shape) of gate_up `[E, 2I, H]` and down `[E, H, I]`.
pub fn expert_tensors(c: &Gemma3Config, l: usize) -> Vec<(String, [usize; 3])> {
    let Some(moe) = c.gemma4.as_ref().and_then(|g| g.moe.as_ref()) else {
        return vec![];
    };
    let (e, im, h) = (moe.num_experts, moe.intermediate_size, c.hidden_size);
    vec![
        (format!("layers.{l}.experts.gate_up_proj"), [e, 2 * im, h]),
        (format!("layers.{l}.experts.down_proj"), [e, h, im]),
    ]
}

/// The embedding scale sqrt(hidden), rounded to the table's dtype as transformers does
/// (`embed_scale.to(weight.dtype)`): 25.25 for 640 in BF16.
pub fn embed_scale(hidden: usize, table: DType) -> f32 {
    let s = (hidden as f32).sqrt();
    match table {
        DType::BF16 => round_to_bf16(s),
        DType::F16 => round_to_f16(s),
        _ => s,
    }
}

/// The Gemma 3 forward pass (gemma-architecture.md section 3) as a graph.
pub fn build_gemma3_graph(c: &Gemma3Config, embed_dtype: DType) -> Graph {
    build_gemma3_graph_quant(c, embed_dtype, &BTreeMap::new())
}

/// The Gemma 3 graph with a scheme per Linear, by module name (`layers.0.mlp.up_proj`, `lm_head`);
/// modules not in `schemes` are dense.
pub fn build_gemma3_graph_quant(
    c: &Gemma3Config,
    embed_dtype: DType,
    schemes: &BTreeMap<String, QuantScheme>,
) -> Graph {
    let mut g = Graph::new(c.vocab_size);
    let (h, d) = (c.hidden_size, c.head_dim);
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    let eps = c.rms_norm_eps;
    let norm = |g: &mut Graph, name: String, w: String, x: ValueId, group: usize| {
        g.add(
            name,
            Op::RmsNorm {
                weight: Some(w),
                group,
                eps,
                add_one: true,
            },
            &[x],
            g.node(x).cols,
        )
    };
    let linear = |g: &mut Graph, name: String, w: String, x: ValueId, out: usize| {
        g.add(
            name,
            Op::Linear {
                scheme: w
                    .strip_suffix(".weight")
                    .and_then(|m| schemes.get(m))
                    .cloned()
                    .unwrap_or(QuantScheme::Dense),
                weight: w,
            },
            &[x],
            out,
        )
    };
    let scale = embed_scale(h, embed_dtype);
    let mut x = g.add(
        "embed",
        Op::Embed {
            table: "embed_tokens.weight".into(),
            scale,
        },
        &[],
        h,
    );
    for (l, &lt) in c.layer_types.iter().enumerate() {
        let p = format!("layers.{l}.");
        let w = |n: &str| format!("{p}{n}.weight");
        let window = match lt {
            LayerType::Sliding => Some(c.sliding_window),
            LayerType::Full => None,
        };
        g.cache_layers.push(CacheLayer {
            n_kv_heads: nkv,
            head_dim: d,
            window,
            k_scale: None,
            v_scale: None,
        });
        let inv_freq = c.rope(lt).inv_freq(d);

        let hn = norm(&mut g, format!("{p}input_norm"), w("input_layernorm"), x, h);
        let q = linear(
            &mut g,
            format!("{p}q_proj"),
            w("self_attn.q_proj"),
            hn,
            nh * d,
        );
        let k = linear(
            &mut g,
            format!("{p}k_proj"),
            w("self_attn.k_proj"),
            hn,
            nkv * d,
        );
        let v = linear(
            &mut g,
            format!("{p}v_proj"),
            w("self_attn.v_proj"),
            hn,
            nkv * d,
        );
        let q = norm(&mut g, format!("{p}q_norm"), w("self_attn.q_norm"), q, d);
        let k = norm(&mut g, format!("{p}k_norm"), w("self_attn.k_norm"), k, d);
        let q = g.add(
            format!("{p}q_rope"),
            Op::Rope {
                head_dim: d,
                inv_freq: inv_freq.clone(),
            },
            &[q],
            nh * d,
        );
        let k = g.add(
            format!("{p}k_rope"),
            Op::Rope {
                head_dim: d,
                inv_freq,
            },
            &[k],
            nkv * d,
        );
        let attn = Op::Attention {
            cache_layer: l,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
            scale: c.query_pre_attn_scalar.powf(-0.5),
            window,
            softcap: c.attn_logit_softcapping,
            // Gemma 3: every layer attends within an image both ways (gemma-architecture.md 3.6).
            image_groups: ImageGroups::Windowed,
        };
        let a = g.add(format!("{p}attn"), attn, &[q, k, v], nh * d);
        let o = linear(&mut g, format!("{p}o_proj"), w("self_attn.o_proj"), a, h);
        let o = norm(
            &mut g,
            format!("{p}attn_out"),
            w("post_attention_layernorm"),
            o,
            h,
        );
        x = g.add(format!("{p}attn_residual"), Op::Add, &[x, o], h);

        let hn = norm(
            &mut g,
            format!("{p}ffn_norm"),
            w("pre_feedforward_layernorm"),
            x,
            h,
        );
        let gate = linear(
            &mut g,
            format!("{p}gate_proj"),
            w("mlp.gate_proj"),
            hn,
            c.intermediate_size,
        );
        let up = linear(
            &mut g,
            format!("{p}up_proj"),
            w("mlp.up_proj"),
            hn,
            c.intermediate_size,
        );
        let m = g.add(
            format!("{p}gelu_mul"),
            Op::GeluTanhMul,
            &[gate, up],
            c.intermediate_size,
        );
        let m = linear(&mut g, format!("{p}down_proj"), w("mlp.down_proj"), m, h);
        let m = norm(
            &mut g,
            format!("{p}mlp_out"),
            w("post_feedforward_layernorm"),
            m,
            h,
        );
        x = g.add(format!("{p}residual"), Op::Add, &[x, m], h);
    }
    let x = g.add("output_rows", Op::SelectRows, &[x], h);
    let x = norm(&mut g, "final_norm".into(), "norm.weight".into(), x, h);
    let mut logits = linear(
        &mut g,
        "logits".into(),
        "lm_head.weight".into(),
        x,
        c.vocab_size,
    );
    if let Some(cap) = c.final_logit_softcapping {
        logits = g.add(
            "logits_softcap",
            Op::Softcap { cap },
            &[logits],
            c.vocab_size,
        );
    }
    g.output = logits;
    g
}

/// Which Gemma 4 features the graph applies. All on is the model; tests turn one off at a time to show
/// that it matters (each switch replaces the feature by the plain or classic-mistake alternative).
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma4Options {
    /// Multiply each layer's output by its `layer_scalar` (off: skip).
    pub layer_scalar: bool,
    /// Weightless RMSNorm on V (off: skip).
    pub v_norm: bool,
    /// `attention_k_eq_v`: V is the raw k_proj output (off: V is the normed, rotated K).
    pub k_eq_v: bool,
    /// Proportional partial RoPE on full layers (off: every dim rotated).
    pub partial_rope: bool,
    /// KV-shared layers read their donor's cache (off: the first layer of their type).
    pub kv_sharing: bool,
    /// Per-layer embeddings (off: skip the per-layer block).
    pub ple: bool,
    /// The routed experts beside the dense MLP (off: dense MLP only).
    pub moe: bool,
    /// `final_logit_softcapping` (off: raw logits).
    pub final_softcap: bool,
    /// Attention scale 1.0 (off: 1/sqrt(head_dim)).
    pub unit_attention_scale: bool,
    /// The image mask of `use_bidirectional_attention == "vision"` models (section 4.9; the 12B's as
    /// transformers 5.23 has it) (off: causal).
    pub image_mask: bool,
}

impl Default for Gemma4Options {
    fn default() -> Gemma4Options {
        Gemma4Options {
            layer_scalar: true,
            v_norm: true,
            k_eq_v: true,
            partial_rope: true,
            kv_sharing: true,
            ple: true,
            moe: true,
            final_softcap: true,
            unit_attention_scale: true,
            image_mask: true,
        }
    }
}

impl Model {
    /// Rebuild a Gemma 4 model's graph with `opts` (tests: one feature off at a time).
    pub fn rebuild_gemma4_graph(&mut self, opts: &Gemma4Options) -> Result<()> {
        let cache = std::mem::take(&mut self.graph.cache_layers);
        self.graph = build_gemma4_graph(&self.config, &self.weights, &self.linear_schemes, opts)?;
        for (new, old) in self.graph.cache_layers.iter_mut().zip(cache) {
            new.k_scale = old.k_scale;
            new.v_scale = old.v_scale;
        }
        Ok(())
    }
}

/// One value of a `[1]` tensor (Gemma 4 `layer_scalar`).
fn scalar_weight(weights: &WeightMap, name: &str) -> Result<f32> {
    let w = weights
        .get(name)
        .ok_or_else(|| Error::tensor(name, "missing from the checkpoint"))?;
    match w.to_f32().as_slice() {
        [v] if v.is_finite() => Ok(*v),
        v => Err(Error::tensor(
            name,
            format!("expected one finite value, found {v:?}"),
        )),
    }
}

/// The Gemma 4 forward pass (gemma-architecture.md section 4) as a graph. `weights` supplies the dtypes
/// of the embedding tables and the per-layer `layer_scalar` values, which become `Scale` factors.
pub fn build_gemma4_graph(
    c: &Gemma3Config,
    weights: &WeightMap,
    schemes: &BTreeMap<String, QuantScheme>,
    o: &Gemma4Options,
) -> Result<Graph> {
    let g4 = c
        .gemma4
        .as_ref()
        .ok_or_else(|| Error::invalid("build_gemma4_graph needs a Gemma 4 config"))?;
    let mut g = Graph::new(c.vocab_size);
    let (h, nh, nl) = (c.hidden_size, c.num_attention_heads, c.num_hidden_layers);
    let eps = c.rms_norm_eps;
    let norm = |g: &mut Graph, name: String, w: Option<String>, x: ValueId, group: usize| {
        g.add(
            name,
            Op::RmsNorm {
                weight: w,
                group,
                eps,
                add_one: false,
            },
            &[x],
            g.node(x).cols,
        )
    };
    let linear = |g: &mut Graph, name: String, module: String, x: ValueId, out: usize| {
        g.add(
            name,
            Op::Linear {
                scheme: schemes.get(&module).cloned().unwrap_or(QuantScheme::Dense),
                weight: format!("{module}.weight"),
            },
            &[x],
            out,
        )
    };
    let dtype_of = |name: &str| -> Result<DType> {
        weights
            .get(name)
            .map(|w| w.dtype)
            .ok_or_else(|| Error::tensor(name, "missing from the checkpoint"))
    };
    let f32_of = |x: f64| x as f32;
    let mut x = g.add(
        "embed",
        Op::Embed {
            table: "embed_tokens.weight".into(),
            scale: embed_scale(h, dtype_of("embed_tokens.weight")?),
        },
        &[],
        h,
    );
    // Per-layer embeddings: (token table row * sqrt(P) + norm(projection of the embedding)) / sqrt(2).
    let p_dim = g4.hidden_size_per_layer_input;
    let ple = if p_dim > 0 && o.ple {
        let tok = g.add(
            "ple_embed",
            Op::Embed {
                table: "embed_tokens_per_layer.weight".into(),
                scale: embed_scale(p_dim, dtype_of("embed_tokens_per_layer.weight")?),
            },
            &[],
            nl * p_dim,
        );
        let proj = linear(
            &mut g,
            "ple_proj".into(),
            "per_layer_model_projection".into(),
            x,
            nl * p_dim,
        );
        let proj = g.add(
            "ple_proj_scaled",
            Op::Scale {
                factor: f32_of((h as f64).powf(-0.5)),
            },
            &[proj],
            nl * p_dim,
        );
        let proj = norm(
            &mut g,
            "ple_proj_norm".into(),
            Some("per_layer_projection_norm.weight".into()),
            proj,
            p_dim,
        );
        let sum = g.add("ple_sum", Op::Add, &[proj, tok], nl * p_dim);
        Some(g.add(
            "ple",
            Op::Scale {
                factor: f32_of(0.5f64.sqrt()),
            },
            &[sum],
            nl * p_dim,
        ))
    } else {
        None
    };
    // (k, v, cache layer) of each layer that owns a cache.
    let mut own_kv: Vec<Option<(ValueId, ValueId, usize)>> = vec![None; nl];
    for l in 0..nl {
        let lt = c.layer_types[l];
        let p = format!("layers.{l}.");
        let w = |n: &str| format!("{p}{n}.weight");
        let m = |n: &str| format!("{p}{n}");
        let (d, kv) = (c.layer_head_dim(l), c.layer_kv_heads(l));
        let window = match lt {
            LayerType::Sliding => Some(c.sliding_window),
            LayerType::Full => None,
        };
        // gemma-architecture.md 4.9: sliding layers causal OR same image (within the window), full layers
        // causal, and only where `use_bidirectional_attention == "vision"`.
        // transformers 5.23's Gemma4UnifiedModel (the 12B) still masks as Gemma 3 does on every layer, the
        // whole image visible on sliding layers ((causal AND window) OR same image).
        let image_groups = match (g4.bidirectional_vision && o.image_mask, g4.unified, lt) {
            (false, _, _) => ImageGroups::Off,
            (true, false, LayerType::Sliding) => ImageGroups::Windowed,
            (true, false, LayerType::Full) => ImageGroups::Off,
            (true, true, LayerType::Sliding) => ImageGroups::WholeGroup,
            (true, true, LayerType::Full) => ImageGroups::Windowed,
        };
        let mut rope = c.rope(lt).clone();
        if !o.partial_rope {
            rope.partial_rotary_factor = None;
        }
        let inv_freq = rope.inv_freq(d);

        let hn = norm(&mut g, m("input_norm"), Some(w("input_layernorm")), x, h);
        let q = linear(&mut g, m("q_proj"), m("self_attn.q_proj"), hn, nh * d);
        let q = norm(&mut g, m("q_norm"), Some(w("self_attn.q_norm")), q, d);
        let q = g.add(
            m("q_rope"),
            Op::Rope {
                head_dim: d,
                inv_freq: inv_freq.clone(),
            },
            &[q],
            nh * d,
        );
        let scale = if o.unit_attention_scale {
            1.0
        } else {
            (d as f32).powf(-0.5)
        };
        let a = if c.has_kv_proj(l) {
            let kraw = linear(&mut g, m("k_proj"), m("self_attn.k_proj"), hn, kv * d);
            let vraw = if c.has_v_proj(l) {
                Some(linear(
                    &mut g,
                    m("v_proj"),
                    m("self_attn.v_proj"),
                    hn,
                    kv * d,
                ))
            } else {
                None
            };
            let k = norm(&mut g, m("k_norm"), Some(w("self_attn.k_norm")), kraw, d);
            let k = g.add(
                m("k_rope"),
                Op::Rope {
                    head_dim: d,
                    inv_freq,
                },
                &[k],
                kv * d,
            );
            let v = match vraw {
                Some(v) => v,
                None if o.k_eq_v => kraw,
                None => k,
            };
            let v = if o.v_norm {
                norm(&mut g, m("v_norm"), None, v, d)
            } else {
                v
            };
            let ci = g.cache_layers.len();
            g.cache_layers.push(CacheLayer {
                n_kv_heads: kv,
                head_dim: d,
                window,
                k_scale: None,
                v_scale: None,
            });
            own_kv[l] = Some((k, v, ci));
            let attn = Op::Attention {
                cache_layer: ci,
                n_heads: nh,
                n_kv_heads: kv,
                head_dim: d,
                scale,
                window,
                softcap: None,
                image_groups,
            };
            g.add(m("attn"), attn, &[q, k, v], nh * d)
        } else {
            let donor = if o.kv_sharing {
                c.kv_donor(l)
            } else {
                (0..l).find(|&j| c.layer_types[j] == lt)
            };
            let (k, v, ci) = donor.and_then(|j| own_kv[j]).ok_or_else(|| {
                Error::invalid(format!(
                    "KV-shared layer {l} has no earlier layer of its type to read"
                ))
            })?;
            let attn = Op::AttentionShared {
                cache_layer: ci,
                n_heads: nh,
                n_kv_heads: kv,
                head_dim: d,
                scale,
                window,
                softcap: None,
                image_groups,
            };
            g.add(m("attn"), attn, &[q, k, v], nh * d)
        };
        let a = linear(&mut g, m("o_proj"), m("self_attn.o_proj"), a, h);
        let a = norm(
            &mut g,
            m("attn_out"),
            Some(w("post_attention_layernorm")),
            a,
            h,
        );
        x = g.add(m("attn_residual"), Op::Add, &[x, a], h);

        let inter = c.layer_intermediate(l);
        let hn = norm(
            &mut g,
            m("ffn_norm"),
            Some(w("pre_feedforward_layernorm")),
            x,
            h,
        );
        let gate = linear(&mut g, m("gate_proj"), m("mlp.gate_proj"), hn, inter);
        let up = linear(&mut g, m("up_proj"), m("mlp.up_proj"), hn, inter);
        let gm = g.add(m("gelu_mul"), Op::GeluTanhMul, &[gate, up], inter);
        let mut f = linear(&mut g, m("down_proj"), m("mlp.down_proj"), gm, h);
        if let Some(moe) = &g4.moe {
            f = norm(
                &mut g,
                m("dense_out"),
                Some(w("post_feedforward_layernorm_1")),
                f,
                h,
            );
            if o.moe {
                // The router and the experts read the residual stream, not the pre-FFN norm.
                let z = norm(
                    &mut g,
                    m("router_norm"),
                    Some(format!("{p}router.scale")),
                    x,
                    h,
                );
                let z = g.add(
                    m("router_in"),
                    Op::Scale {
                        factor: f32_of((h as f64).powf(-0.5)),
                    },
                    &[z],
                    h,
                );
                let logits = linear(&mut g, m("router"), m("router.proj"), z, moe.num_experts);
                let route = g.add(
                    m("route"),
                    Op::RouterTopK {
                        top_k: moe.top_k,
                        per_expert_scale: format!("{p}router.per_expert_scale"),
                    },
                    &[logits],
                    moe.num_experts,
                );
                let e_in = norm(
                    &mut g,
                    m("experts_norm"),
                    Some(w("pre_feedforward_layernorm_2")),
                    x,
                    h,
                );
                let (gu, dn) = (m("experts.gate_up_proj"), m("experts.down_proj"));
                let scheme = |n: &str| schemes.get(n).cloned().unwrap_or(QuantScheme::Dense);
                let e = g.add(
                    m("experts"),
                    Op::MoeExperts {
                        gate_up_scheme: scheme(&gu),
                        down_scheme: scheme(&dn),
                        gate_up: gu,
                        down: dn,
                        n_experts: moe.num_experts,
                        intermediate: moe.intermediate_size,
                    },
                    &[e_in, route],
                    h,
                );
                let e = norm(
                    &mut g,
                    m("experts_out"),
                    Some(w("post_feedforward_layernorm_2")),
                    e,
                    h,
                );
                f = g.add(m("ffn_sum"), Op::Add, &[f, e], h);
            }
        }
        let f = norm(
            &mut g,
            m("mlp_out"),
            Some(w("post_feedforward_layernorm")),
            f,
            h,
        );
        x = g.add(m("residual"), Op::Add, &[x, f], h);
        if let Some(ple) = ple {
            let pi = g.add(
                m("ple_in"),
                Op::SliceCols { start: l * p_dim },
                &[ple],
                p_dim,
            );
            let gt = linear(&mut g, m("ple_gate"), m("per_layer_input_gate"), x, p_dim);
            let gm = g.add(m("ple_gelu_mul"), Op::GeluTanhMul, &[gt, pi], p_dim);
            let pr = linear(&mut g, m("ple_proj"), m("per_layer_projection"), gm, h);
            let pr = norm(
                &mut g,
                m("ple_out"),
                Some(w("post_per_layer_input_norm")),
                pr,
                h,
            );
            x = g.add(m("ple_residual"), Op::Add, &[x, pr], h);
        }
        if o.layer_scalar {
            let factor = scalar_weight(weights, &format!("{p}layer_scalar"))?;
            x = g.add(m("scaled"), Op::Scale { factor }, &[x], h);
        }
    }
    let x = g.add("output_rows", Op::SelectRows, &[x], h);
    let x = norm(
        &mut g,
        "final_norm".into(),
        Some("norm.weight".into()),
        x,
        h,
    );
    let mut logits = linear(&mut g, "logits".into(), "lm_head".into(), x, c.vocab_size);
    if let (Some(cap), true) = (c.final_logit_softcapping, o.final_softcap) {
        logits = g.add(
            "logits_softcap",
            Op::Softcap { cap },
            &[logits],
            c.vocab_size,
        );
    }
    g.output = logits;
    Ok(g)
}
