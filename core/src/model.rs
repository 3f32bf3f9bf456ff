//! Gemma 3 text models: checkpoint tensors checked against the config, and the graph built once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, Weight};
use crate::config::{Gemma3Config, LayerType};
use crate::error::{Error, Result};
use crate::graph::{CacheLayer, Graph, Op, QuantScheme, ValueId, WeightMap};
use crate::quant_config::{CheckpointQuant, LinearQuant};
use crate::tensor::{round_to_bf16, round_to_f16, DType};

/// Prefixes under which checkpoints store the text model, most specific first.
const TEXT_PREFIXES: [&str; 3] = ["model.language_model.", "language_model.model.", "model."];
/// Tensors of the multimodal parts, present in Gemma3ForConditionalGeneration checkpoints; the text model
/// does not read them.
const NON_TEXT_PREFIXES: [&str; 4] = [
    "vision_tower.",
    "model.vision_tower.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
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
        let stored = |canonical: &str| -> String {
            stored_name
                .get(canonical)
                .cloned()
                .unwrap_or_else(|| canonical.to_string())
        };

        // Every tensor a Gemma 3 text model has, then the quantization of each Linear.
        let mut expected: BTreeMap<String, Expect> = expected_tensors(&config)
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
        let mut modules: Vec<(String, [usize; 2])> = Vec::new();
        for l in 0..config.num_hidden_layers {
            for m in LAYER_LINEARS {
                let name = format!("layers.{l}.{m}");
                let s = expected[&format!("{name}.weight")].shapes[0].clone();
                modules.push((name, [s[0], s[1]]));
            }
        }
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
        let mut graph = build_gemma3_graph_quant(&config, embed_dtype, &linear_schemes);
        // An FP8 KV cache uses the checkpoint's per-tensor k/v scales where it has them.
        for (l, layer) in graph.cache_layers.iter_mut().enumerate() {
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
            } else if n.contains(".mlp.") {
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
                if n.ends_with(".weight") {
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

/// Every tensor a Gemma 3 text model has, with its shape.
fn expected_tensors(c: &Gemma3Config) -> BTreeMap<String, Vec<usize>> {
    let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let mut m = BTreeMap::new();
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
            m.insert(format!("{p}{n}.weight"), s);
        }
    }
    m
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
