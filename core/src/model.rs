//! Gemma 3 text models: checkpoint tensors checked against the config, and the graph built once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, Weight};
use crate::config::{Gemma3Config, LayerType};
use crate::error::{Error, Result};
use crate::graph::{CacheLayer, Graph, Op, QuantScheme, ValueId, WeightMap};
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
const LM_HEAD_NAMES: [&str; 2] = ["lm_head.weight", "language_model.lm_head.weight"];
const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

pub struct Model {
    pub dir: PathBuf,
    pub config: Gemma3Config,
    pub graph: Graph,
    /// Weights by graph name (`layers.0.self_attn.q_proj.weight`, ...).
    pub weights: WeightMap,
    /// Whether lm_head is the embedding table.
    pub tied_lm_head: bool,
}

impl Model {
    /// Load `config.json` and the safetensors of `dir`.
    pub fn load(dir: &Path) -> Result<Model> {
        let config = Gemma3Config::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        Model::from_tensors(dir, config, ck.tensors)
    }

    /// Check every tensor against the config and build the graph.
    pub fn from_tensors(
        dir: &Path,
        config: Gemma3Config,
        tensors: BTreeMap<String, Weight>,
    ) -> Result<Model> {
        let mut weights = WeightMap::new();
        let mut stored_name = BTreeMap::new();
        for (name, w) in tensors {
            if NON_TEXT_PREFIXES.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let canonical = if LM_HEAD_NAMES.contains(&name.as_str()) {
                "lm_head.weight".to_string()
            } else if let Some(rest) = TEXT_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) {
                rest.to_string()
            } else {
                return Err(Error::tensor(
                    &name,
                    format!("unexpected tensor in {}", w.file.display()),
                ));
            };
            stored_name.insert(canonical.clone(), name.clone());
            if let Some(prev) = weights.insert(canonical.clone(), w.renamed(&canonical)) {
                return Err(Error::tensor(
                    &name,
                    format!("duplicates `{}` under another prefix", prev.name),
                ));
            }
        }
        let expected = expected_tensors(&config);
        for (name, shape) in &expected {
            match weights.get(name) {
                Some(w) => w.expect(shape, &FLOAT_DTYPES)?,
                None if name == "lm_head.weight" => {}
                None => {
                    return Err(Error::tensor(
                        name,
                        format!("missing from the checkpoint in {}", dir.display()),
                    ))
                }
            }
        }
        if let Some(extra) = weights.keys().find(|k| !expected.contains_key(*k)) {
            return Err(Error::tensor(
                &stored_name[extra],
                "unexpected tensor: not part of a Gemma 3 text model with this config",
            ));
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
        }
        let embed_dtype = weights["embed_tokens.weight"].dtype;
        let graph = build_gemma3_graph(&config, embed_dtype);
        Ok(Model {
            dir: dir.to_path_buf(),
            config,
            graph,
            weights,
            tied_lm_head,
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
                weight: w,
                scheme: QuantScheme::Dense,
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
