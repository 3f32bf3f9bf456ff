//! Models of the real Gemma 3 shapes with random weights, built in memory (no files), so that the speed of
//! a big model can be measured without its checkpoint (`e4m3 bench --synthetic NAME --scheme S`).
//!
//! A synthetic model is assembled exactly as a checkpoint is loaded: a `config.json` value (the text shapes of
//! the released models, gemma-architecture.md section 1.2), the `quantization_config` that `e4m3 quantize`
//! writes for the scheme, and tensors under the names and in the dtypes that `import-gguf` (BF16) and
//! `quantize` (FP8 schemes) write, all passed through [`Model::from_tensors_quant`]. The graph, the weight
//! names and the scale tensors are therefore those of a real checkpoint of the same scheme.
//!
//! Weights are random with a fixed seed (ChaCha8, one stream per 1 MiB chunk of a tensor, filled in
//! parallel): BF16 weights uniform with standard deviation 0.02, norm weights uniform in +-0.05 (Gemma
//! multiplies by `1 + w`), FP8 codes of a uniform value in (-448, 448) (never the NaN codes 0x7F/0xFF)
//! with dequantization scales that give the same 0.02 standard deviation, and static input scales of
//! 16/448. Activations stay finite at every depth; the values mean nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::checkpoint::Weight;
use crate::config::Gemma3Config;
use crate::error::{Error, Result};
use crate::fp8;
use crate::model::Model;
use crate::quant_config::CheckpointQuant;
use crate::quantize::{self, QuantizeOptions, Scheme};
use crate::tensor::DType;

/// The names `--synthetic` accepts (Gemma 3 and Gemma 4 text shapes, plus `tiny` and `gemma-4-tiny` for
/// tests).
pub const NAMES: [&str; 11] = [
    "tiny",
    "gemma-3-270m",
    "gemma-3-1b",
    "gemma-3-4b",
    "gemma-3-12b",
    "gemma-3-27b",
    "gemma-4-tiny",
    "gemma-4-e2b",
    "gemma-4-12b",
    "gemma-4-26b-a4b",
    "gemma-4-31b",
];

/// The default seed of the random weights.
pub const DEFAULT_SEED: u64 = 0xE4_3300;

/// Standard deviation of the linear and embedding weights.
pub const WEIGHT_STD: f32 = 0.02;
/// Half-width of the uniform norm weights (Gemma's RMSNorm multiplies by `1 + w`).
pub const NORM_AMPLITUDE: f32 = 0.05;
/// Static input scale of `fp8-static` linears: inputs up to +-16 are represented.
pub const STATIC_INPUT_SCALE: f32 = 16.0 / fp8::E4M3_MAX;
/// Block edge of the block schemes, `e4m3 quantize`'s default.
pub const BLOCK: usize = 128;

/// How the linear layers of a synthetic model are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticScheme {
    /// Every tensor in BF16, as `e4m3 import-gguf` writes a checkpoint.
    Bf16,
    /// FP8 linears as `e4m3 quantize --scheme` writes them (embedding, norms and lm_head stay BF16).
    Fp8(Scheme),
}

impl SyntheticScheme {
    pub const ALL: [SyntheticScheme; 5] = [
        SyntheticScheme::Bf16,
        SyntheticScheme::Fp8(Scheme::Fp8Static),
        SyntheticScheme::Fp8(Scheme::Fp8Dynamic),
        SyntheticScheme::Fp8(Scheme::Fp8BlockWo),
        SyntheticScheme::Fp8(Scheme::Fp8Block),
    ];

    pub fn name(self) -> &'static str {
        match self {
            SyntheticScheme::Bf16 => "bf16",
            SyntheticScheme::Fp8(s) => s.name(),
        }
    }
}

impl std::str::FromStr for SyntheticScheme {
    type Err = Error;
    fn from_str(s: &str) -> Result<SyntheticScheme> {
        SyntheticScheme::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown scheme `{s}` (expected bf16, fp8-static, fp8-dynamic, fp8-block-wo or fp8-block)"
                ))
            })
    }
}

fn unknown(name: &str) -> Error {
    Error::invalid(format!(
        "unknown synthetic model `{name}` (expected one of {})",
        NAMES.join(", ")
    ))
}

/// The text config of a Gemma 4 model (Gemma4ForCausalLM layout, the hub's keys; gemma-architecture.md
/// section 1.4).
fn gemma4_config_json(name: &str) -> Option<Value> {
    // (layers, hidden, intermediate, heads, kv heads sliding / full, window, full-layer period)
    let base = |layers: usize,
                hidden: usize,
                inter: usize,
                heads: usize,
                kv: usize,
                global_kv: usize,
                window: usize,
                period: usize| {
        json!({
            "architectures": ["Gemma4ForCausalLM"],
            "model_type": "gemma4_text",
            "vocab_size": 262144,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "num_global_key_value_heads": global_kv,
            "head_dim": 256,
            "global_head_dim": 512,
            "attention_k_eq_v": true,
            "sliding_window": window,
            "layer_types": (0..layers).map(|i| if (i + 1) % period == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }).collect::<Vec<_>>(),
            "final_logit_softcapping": 30.0,
            "hidden_size_per_layer_input": 0,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "torch_dtype": "bfloat16",
        })
    };
    Some(match name {
        // Every Gemma 4 feature at once, small enough for tests.
        "gemma-4-tiny" => {
            let mut c = base(6, 64, 96, 4, 2, 1, 8, 3);
            c["vocab_size"] = json!(1000);
            c["head_dim"] = json!(32);
            c["global_head_dim"] = json!(64);
            c["max_position_embeddings"] = json!(4096);
            c["num_kv_shared_layers"] = json!(2);
            c["hidden_size_per_layer_input"] = json!(16);
            c["vocab_size_per_layer_input"] = json!(1000);
            c["use_double_wide_mlp"] = json!(true);
            c["enable_moe_block"] = json!(true);
            c["num_experts"] = json!(4);
            c["top_k_experts"] = json!(2);
            c["moe_intermediate_size"] = json!(40);
            c
        }
        "gemma-4-e2b" => {
            let mut c = base(35, 1536, 6144, 8, 1, 1, 512, 5);
            c["attention_k_eq_v"] = json!(false);
            c["num_kv_shared_layers"] = json!(20);
            c["hidden_size_per_layer_input"] = json!(256);
            c["vocab_size_per_layer_input"] = json!(262144);
            c["use_double_wide_mlp"] = json!(true);
            c["max_position_embeddings"] = json!(131072);
            c
        }
        "gemma-4-12b" => base(48, 3840, 15360, 16, 8, 1, 1024, 6),
        "gemma-4-26b-a4b" => {
            let mut c = base(30, 2816, 2112, 16, 8, 2, 1024, 6);
            c["enable_moe_block"] = json!(true);
            c["num_experts"] = json!(128);
            c["top_k_experts"] = json!(8);
            c["moe_intermediate_size"] = json!(704);
            c
        }
        "gemma-4-31b" => base(60, 5376, 21504, 32, 16, 4, 1024, 6),
        _ => return None,
    })
}

/// The `config.json` of a synthetic model: the released model's text config (Gemma3ForCausalLM layout).
pub fn config_json(name: &str) -> Result<Value> {
    if let Some(c) = gemma4_config_json(name) {
        return Ok(c);
    }
    // (vocab, hidden, intermediate, layers, heads, kv heads, head_dim, query_pre_attn_scalar, window,
    //  linear RoPE factor of the full layers, max positions)
    let base = |vocab: usize,
                hidden: usize,
                inter: usize,
                layers: usize,
                heads: usize,
                kv: usize,
                head_dim: usize,
                qpas: usize,
                window: usize,
                rope_factor: Option<f64>,
                max_pos: usize| {
        json!({
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "attention_bias": false,
            "attn_logit_softcapping": null,
            "final_logit_softcapping": null,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "head_dim": head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "max_position_embeddings": max_pos,
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": kv,
            "query_pre_attn_scalar": qpas,
            "rms_norm_eps": 1e-6,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": rope_factor.map(|f| json!({"rope_type": "linear", "factor": f})),
            "rope_theta": 1000000.0,
            "sliding_window": window,
            "sliding_window_pattern": 6,
            "tie_word_embeddings": true,
            "torch_dtype": "bfloat16",
            "vocab_size": vocab,
        })
    };
    let mut c = match name {
        // Small enough for tests: GQA 2:1, sliding and full layers, a window shorter than test prompts,
        // dimensions that are not multiples of the 128 block.
        "tiny" => {
            let mut c = base(1000, 128, 320, 4, 4, 2, 32, 32, 8, None, 4096);
            c["layer_types"] = json!([
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "full_attention"
            ]);
            c
        }
        "gemma-3-270m" => base(262144, 640, 2048, 18, 4, 1, 256, 256, 512, None, 32768),
        "gemma-3-1b" => base(262144, 1152, 6912, 26, 4, 1, 256, 256, 512, None, 32768),
        "gemma-3-4b" => base(
            262208,
            2560,
            10240,
            34,
            8,
            4,
            256,
            256,
            1024,
            Some(8.0),
            131072,
        ),
        "gemma-3-12b" => base(
            262208,
            3840,
            15360,
            48,
            16,
            8,
            256,
            256,
            1024,
            Some(8.0),
            131072,
        ),
        "gemma-3-27b" => base(
            262208,
            5376,
            21504,
            62,
            32,
            16,
            128,
            168,
            1024,
            Some(8.0),
            131072,
        ),
        other => return Err(unknown(other)),
    };
    if name == "gemma-3-270m" {
        // As the released config lists them (globals at 5, 11, 17).
        c["layer_types"] = json!((0..18)
            .map(|i| if (i + 1) % 6 == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            })
            .collect::<Vec<_>>());
    }
    Ok(c)
}

/// Where errors about a synthetic model point.
fn pseudo_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("<synthetic {name}>"))
}

/// The parsed config of a synthetic model.
pub fn config(name: &str) -> Result<Gemma3Config> {
    let json = config_json(name)?;
    Gemma3Config::from_json(&pseudo_dir(name).join("config.json"), &json)
}

/// Seed of one tensor: the model seed mixed with an FNV-1a hash of the name.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed
}

/// `n` random bytes, filled in parallel (one ChaCha8 stream per 1 MiB chunk, so the result does not depend
/// on the thread count), each chunk then rewritten in place by `map`.
fn random_bytes(seed: u64, n: usize, map: &(dyn Fn(&mut [u8]) + Sync)) -> Vec<u8> {
    const CHUNK: usize = 1 << 20;
    let mut out = vec![0u8; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            rng.fill_bytes(chunk);
            map(chunk);
        });
    out
}

/// BF16 bits of a uniform value in (-amp, amp) for each u16.
fn bf16_table(amp: f32) -> Vec<u16> {
    (0..=u16::MAX)
        .map(|u| {
            let x = ((u as f32 + 0.5) / 65536.0 * 2.0 - 1.0) * amp;
            half::bf16::from_f32(x).to_bits()
        })
        .collect()
}

/// An E4M3 code of a uniform value in (-448, 448) for each byte; never 0x7F/0xFF (NaN).
fn fp8_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    for (b, c) in t.iter_mut().enumerate() {
        let x = ((b as f32 + 0.5) / 256.0 * 2.0 - 1.0) * fp8::E4M3_MAX;
        *c = fp8::encode(x);
    }
    t
}

/// Standard deviation of the decoded values of `fp8_table` (the codes of a uniform byte).
fn fp8_table_std(t: &[u8; 256]) -> f32 {
    let ms: f64 = t
        .iter()
        .map(|&c| (fp8::decode(c) as f64).powi(2))
        .sum::<f64>()
        / 256.0;
    ms.sqrt() as f32
}

struct Gen {
    seed: u64,
    /// Uniform with the weight standard deviation.
    weight: Vec<u16>,
    norm: Vec<u16>,
    fp8: [u8; 256],
}

impl Gen {
    fn bf16(&self, name: &str, shape: Vec<usize>, table: &[u16]) -> Result<Weight> {
        let n = shape.iter().product::<usize>() * 2;
        let bytes = random_bytes(tensor_seed(self.seed, name), n, &|c: &mut [u8]| {
            for p in c.chunks_exact_mut(2) {
                let v = table[u16::from_le_bytes([p[0], p[1]]) as usize].to_le_bytes();
                p.copy_from_slice(&v);
            }
        });
        Weight::from_bytes(name, DType::BF16, shape, bytes)
    }

    fn codes(&self, name: &str, shape: Vec<usize>) -> Result<Weight> {
        let n = shape.iter().product::<usize>();
        let t = self.fp8;
        let bytes = random_bytes(tensor_seed(self.seed, name), n, &move |c: &mut [u8]| {
            for b in c.iter_mut() {
                *b = t[*b as usize];
            }
        });
        Weight::from_bytes(name, DType::F8E4M3, shape, bytes)
    }
}

/// A tensor of `dtype` (F32 or BF16) holding `value` everywhere.
fn constant(name: &str, dtype: DType, shape: Vec<usize>, value: f32) -> Result<Weight> {
    let n: usize = shape.iter().product();
    let one: Vec<u8> = match dtype {
        DType::BF16 => half::bf16::from_f32(value).to_le_bytes().to_vec(),
        _ => value.to_le_bytes().to_vec(),
    };
    Weight::from_bytes(name, dtype, shape, one.repeat(n))
}

/// A lower bound of the bytes a synthetic model's weights take: the embedding in BF16 plus every layer's
/// attention and MLP projections at one byte a parameter (FP8; BF16 takes two), experts and norms left
/// out. Enough to refuse a model that cannot fit before any weight is made.
pub fn min_weight_bytes(name: &str, scheme: SyntheticScheme) -> Result<u64> {
    let c = config(name)?;
    let (h, d) = (c.hidden_size as u64, c.head_dim as u64);
    let q = c.num_attention_heads as u64 * d;
    let kv = c.num_key_value_heads as u64 * d;
    let per_layer = h * (2 * q + 2 * kv) + 3 * h * c.intermediate_size as u64;
    let bytes = match scheme {
        SyntheticScheme::Bf16 => 2,
        SyntheticScheme::Fp8(_) => 1,
    };
    Ok(2 * c.vocab_size as u64 * h + bytes * per_layer * c.num_hidden_layers as u64)
}

/// A synthetic model with the default seed.
pub fn build(name: &str, scheme: SyntheticScheme) -> Result<Model> {
    build_seeded(name, scheme, DEFAULT_SEED)
}

/// The tensors of a synthetic model under their checkpoint names (`model.layers.0.mlp.up_proj.weight`,
/// its scales, ...), with the `config.json` value they belong to (quantization_config included).
pub fn tensors(
    name: &str,
    scheme: SyntheticScheme,
    seed: u64,
) -> Result<(Value, BTreeMap<String, Weight>)> {
    let mut json = config_json(name)?;
    let c = config(name)?;
    let gen = Gen {
        seed,
        weight: bf16_table(WEIGHT_STD * 3f32.sqrt()),
        norm: bf16_table(NORM_AMPLITUDE),
        fp8: fp8_table(),
    };
    if c.is_gemma4() {
        return gemma4_tensors(json, &c, scheme, &gen);
    }
    let (h, d, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let mut t: BTreeMap<String, Weight> = BTreeMap::new();
    let mut put = |w: Weight| {
        t.insert(w.name.clone(), w);
    };
    put(gen.bf16(
        "model.embed_tokens.weight",
        vec![c.vocab_size, h],
        &gen.weight,
    )?);
    put(gen.bf16("model.norm.weight", vec![h], &gen.norm)?);
    // Dequantized weights have the BF16 weights' standard deviation.
    let scale = WEIGHT_STD / fp8_table_std(&gen.fp8);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        for (n, len) in [
            ("input_layernorm", h),
            ("post_attention_layernorm", h),
            ("pre_feedforward_layernorm", h),
            ("post_feedforward_layernorm", h),
            ("self_attn.q_norm", d),
            ("self_attn.k_norm", d),
        ] {
            put(gen.bf16(&format!("{p}{n}.weight"), vec![len], &gen.norm)?);
        }
        for (n, rows, cols) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ] {
            let m = format!("{p}{n}");
            let w = format!("{m}.weight");
            let s = match scheme {
                SyntheticScheme::Bf16 => {
                    put(gen.bf16(&w, vec![rows, cols], &gen.weight)?);
                    continue;
                }
                SyntheticScheme::Fp8(s) => s,
            };
            put(gen.codes(&w, vec![rows, cols])?);
            // Names, dtypes and shapes as `quantize` writes them.
            let grid = quantize::scheme_grid(s, rows, cols, BLOCK);
            let (gr, gc) = (grid.grid_rows(), grid.grid_cols());
            match s {
                Scheme::Fp8Static => {
                    put(constant(
                        &format!("{m}.weight_scale"),
                        DType::F32,
                        vec![],
                        scale,
                    )?);
                    put(constant(
                        &format!("{m}.input_scale"),
                        DType::F32,
                        vec![],
                        STATIC_INPUT_SCALE,
                    )?);
                }
                Scheme::Fp8Dynamic => put(constant(
                    &format!("{m}.weight_scale"),
                    DType::BF16,
                    vec![rows, 1],
                    scale,
                )?),
                Scheme::Fp8BlockWo => put(constant(
                    &format!("{m}.weight_scale"),
                    DType::F32,
                    vec![gr, 1, gc, 1],
                    scale,
                )?),
                Scheme::Fp8Block => put(constant(
                    &format!("{m}.weight_scale_inv"),
                    DType::F32,
                    vec![gr, gc],
                    scale,
                )?),
            }
        }
    }
    if let SyntheticScheme::Fp8(s) = scheme {
        let mut opts = QuantizeOptions::new(s);
        opts.block = BLOCK;
        json["quantization_config"] = quantize::quantization_config(&opts, "lm_head", &[], &[]);
    }
    Ok((json, t))
}

/// The tensors of a synthetic Gemma 4 model: every tensor the loader expects (model.rs `expected_tensors`,
/// fused experts included). Norm-like vectors (applied as `x * w`) are `1 + U(+-0.05)`, `layer_scalar` and
/// `per_expert_scale` 1; the attention and MLP projections and (block schemes) the experts are FP8 as
/// `quantize` writes them, the router and per-layer-embedding linears stay BF16 and are listed as excluded.
fn gemma4_tensors(
    mut json: Value,
    c: &Gemma3Config,
    scheme: SyntheticScheme,
    gen: &Gen,
) -> Result<(Value, BTreeMap<String, Weight>)> {
    let one_norm: Vec<u16> = gen
        .norm
        .iter()
        .map(|&b| half::bf16::from_f32(1.0 + half::bf16::from_bits(b).to_f32()).to_bits())
        .collect();
    let fp8_scale = WEIGHT_STD / fp8_table_std(&gen.fp8);
    let (shapes, linears) = crate::model::expected_tensors(c);
    let linear_weights: std::collections::BTreeSet<String> =
        linears.iter().map(|(m, _)| format!("{m}.weight")).collect();
    let mut t: BTreeMap<String, Weight> = BTreeMap::new();
    let mut excluded: Vec<String> = Vec::new();
    let fp8 = match scheme {
        SyntheticScheme::Fp8(s) => Some(s),
        SyntheticScheme::Bf16 => None,
    };
    let put_fp8 = |t: &mut BTreeMap<String, Weight>,
                   name: &str,
                   scale_name: String,
                   s: Scheme,
                   shape: Vec<usize>|
     -> Result<()> {
        let (lead, rc) = shape.split_at(shape.len() - 2);
        let grid = quantize::scheme_grid(s, rc[0], rc[1], BLOCK);
        let (gr, gc) = (grid.grid_rows(), grid.grid_cols());
        t.insert(name.to_string(), gen.codes(name, shape.clone())?);
        let (dtype, sshape) = match s {
            Scheme::Fp8Static => (DType::F32, vec![]),
            Scheme::Fp8Dynamic => (DType::BF16, vec![rc[0], 1]),
            Scheme::Fp8BlockWo if lead.is_empty() => (DType::F32, vec![gr, 1, gc, 1]),
            _ => (DType::F32, [lead.to_vec(), vec![gr, gc]].concat()),
        };
        t.insert(
            scale_name.clone(),
            constant(&scale_name, dtype, sshape, fp8_scale)?,
        );
        if s == Scheme::Fp8Static {
            let n = scale_name.replace("weight_scale", "input_scale");
            t.insert(
                n.clone(),
                constant(&n, DType::F32, vec![], STATIC_INPUT_SCALE)?,
            );
        }
        Ok(())
    };
    for (name, shape) in shapes {
        if name == "lm_head.weight" {
            continue;
        }
        let stored = format!("model.{name}");
        let projection = name.contains(".self_attn.") || name.contains(".mlp.");
        if linear_weights.contains(&name) {
            let module = stored.trim_end_matches(".weight").to_string();
            match fp8 {
                Some(s) if projection => {
                    let suffix = if s == Scheme::Fp8Block {
                        "weight_scale_inv"
                    } else {
                        "weight_scale"
                    };
                    put_fp8(&mut t, &stored, format!("{module}.{suffix}"), s, shape)?;
                }
                _ => {
                    if fp8.is_some() {
                        excluded.push(module);
                    }
                    t.insert(stored.clone(), gen.bf16(&stored, shape, &gen.weight)?);
                }
            }
            continue;
        }
        let w = if name.ends_with("layer_scalar") || name.ends_with("per_expert_scale") {
            constant(&stored, DType::BF16, shape, 1.0)?
        } else if name.contains("norm") || name.ends_with("router.scale") {
            gen.bf16(&stored, shape, &one_norm)?
        } else {
            gen.bf16(&stored, shape, &gen.weight)?
        };
        t.insert(stored, w);
    }
    for l in 0..c.num_hidden_layers {
        for (name, shape) in crate::model::expert_tensors(c, l) {
            let stored = format!("model.{name}");
            match fp8 {
                Some(s) if s.is_block() => {
                    let suffix = if s == Scheme::Fp8Block {
                        "scale_inv"
                    } else {
                        "scale"
                    };
                    put_fp8(
                        &mut t,
                        &stored,
                        format!("{stored}_{suffix}"),
                        s,
                        shape.to_vec(),
                    )?;
                }
                _ => {
                    if fp8.is_some() {
                        excluded.push(stored.clone());
                    }
                    t.insert(
                        stored.clone(),
                        gen.bf16(&stored, shape.to_vec(), &gen.weight)?,
                    );
                }
            }
        }
    }
    if let Some(s) = fp8 {
        let mut opts = QuantizeOptions::new(s);
        opts.block = BLOCK;
        json["quantization_config"] =
            quantize::quantization_config(&opts, "lm_head", &excluded, &[]);
    }
    Ok((json, t))
}

/// A synthetic model (see the module docs): the graph, weight names and scale tensors of a real checkpoint
/// of `scheme`, with random weights drawn from `seed`.
pub fn build_seeded(name: &str, scheme: SyntheticScheme, seed: u64) -> Result<Model> {
    let (json, tensors) = tensors(name, scheme, seed)?;
    let dir = pseudo_dir(name);
    let cfg_path = dir.join("config.json");
    let config = Gemma3Config::from_json(&cfg_path, &json)?;
    let quant =
        CheckpointQuant::from_json(&cfg_path, &json, &dir.join("hf_quant_config.json"), None)?;
    Model::from_tensors_quant(&dir, config, quant, tensors)
}

/// Deterministic prompt ids for a synthetic model (no tokenizer): BOS (2) then ids in `[3, vocab)`.
pub fn prompt_ids(vocab: usize, len: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let span = (vocab.max(4) - 3) as u32;
    (0..len)
        .map(|i| if i == 0 { 2 } else { 3 + rng.next_u32() % span })
        .collect()
}

/// Write a synthetic model as a checkpoint directory (`config.json`, `model.safetensors`), for tests that
/// compare it with what the loader and `quantize` make of files.
pub fn write_checkpoint(dir: &Path, name: &str, scheme: SyntheticScheme, seed: u64) -> Result<()> {
    use std::io::Write;
    let (json, tensors) = tensors(name, scheme, seed)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = dir.join("config.json");
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::invalid(format!("serializing config.json: {e}")))?;
    std::fs::write(&cfg, text).map_err(|e| Error::io(&cfg, e))?;
    let mut order: Vec<&Weight> = tensors.values().collect();
    order.sort_by(|a, b| {
        b.dtype
            .size()
            .cmp(&a.dtype.size())
            .then_with(|| a.name.cmp(&b.name))
    });
    let entries: Vec<(String, DType, Vec<usize>)> = order
        .iter()
        .map(|w| (w.name.clone(), w.dtype, w.shape.clone()))
        .collect();
    let path = dir.join("model.safetensors");
    let mut w = crate::checkpoint::begin_safetensors(&path, &entries)?;
    for t in order {
        w.write_all(t.bytes()).map_err(|e| Error::io(&path, e))?;
    }
    w.flush().map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Batch, CacheConfig, KvCacheDtype, LogitsFor, SeqStep};
    use crate::cpu::CpuBackend;
    use crate::quantize::{quantize, CalibSource};

    /// `min_weight_bytes` is a lower bound of what the built model holds, and not a loose one.
    #[test]
    fn min_weight_bytes_bounds_the_built_model() {
        for name in ["tiny", "gemma-4-tiny"] {
            for scheme in [
                SyntheticScheme::Bf16,
                SyntheticScheme::Fp8(Scheme::Fp8Dynamic),
            ] {
                let lower = min_weight_bytes(name, scheme).unwrap();
                let real = build(name, scheme).unwrap().weight_bytes() as u64;
                assert!(
                    lower <= real && lower * 3 >= real,
                    "{name} {}: lower bound {lower}, built {real}",
                    scheme.name()
                );
            }
        }
    }

    /// Names, dtypes and shapes of every weight; the Linear schemes; the graph and its KV layers.
    fn same_structure(a: &Model, b: &Model, what: &str) {
        let sig = |m: &Model| -> Vec<(String, DType, Vec<usize>)> {
            m.weights
                .iter()
                .map(|(n, w)| (n.clone(), w.dtype, w.shape.clone()))
                .collect()
        };
        assert_eq!(sig(a), sig(b), "{what}: weights");
        assert_eq!(a.linear_schemes, b.linear_schemes, "{what}: schemes");
        assert_eq!(a.tied_lm_head, b.tied_lm_head, "{what}: tied lm_head");
        assert_eq!(a.quant.name(), b.quant.name(), "{what}: format");
        assert_eq!(a.kv_cache_fp8, b.kv_cache_fp8, "{what}: kv cache");
        let (ga, gb) = (&a.graph, &b.graph);
        assert_eq!(ga.nodes.len(), gb.nodes.len(), "{what}: graph size");
        for (x, y) in ga.nodes.iter().zip(&gb.nodes) {
            assert_eq!(
                (&x.name, &x.op, &x.inputs, x.cols),
                (&y.name, &y.op, &y.inputs, y.cols),
                "{what}: node"
            );
        }
        assert_eq!(ga.output, gb.output);
        assert_eq!(ga.cache_layers, gb.cache_layers, "{what}: cache layers");
        assert_eq!(ga.vocab_size, gb.vocab_size);
        let mut ca = a.config.clone();
        ca.path = b.config.path.clone();
        assert_eq!(
            format!("{ca:?}"),
            format!("{:?}", b.config),
            "{what}: config"
        );
    }

    #[test]
    fn synthetic_270m_has_the_real_checkpoints_tensors_and_graph() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/gemma-3-270m");
        assert!(
            dir.join("model.safetensors").is_file(),
            "the real model is not at {}: run scripts/setup.sh first",
            dir.display()
        );
        let real = Model::load(&dir).unwrap();
        let syn = build("gemma-3-270m", SyntheticScheme::Bf16).unwrap();
        same_structure(&syn, &real, "gemma-3-270m bf16");
        assert_eq!(syn.weight_bytes(), real.weight_bytes());
        // One decode step of the real shapes gives finite logits.
        let mut r = CpuBackend
            .load(&syn.graph, &syn.weights, CacheConfig::new(1, 8))
            .unwrap();
        let ids = prompt_ids(syn.config.vocab_size, 4, 1);
        let out = r
            .step(&Batch::single(0, 0, ids, LogitsFor::Last), &[])
            .unwrap();
        assert!(out.logits.data.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn fp8_schemes_match_what_quantize_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("bf16");
        write_checkpoint(&src, "tiny", SyntheticScheme::Bf16, 7).unwrap();
        let loaded = Model::load(&src).unwrap();
        same_structure(
            &build_seeded("tiny", SyntheticScheme::Bf16, 7).unwrap(),
            &loaded,
            "tiny bf16",
        );
        for s in Scheme::ALL {
            let out = tmp.path().join(s.name());
            let mut opts = QuantizeOptions::new(s);
            opts.calib = CalibSource::Ids(vec![prompt_ids(1000, 12, 3)]);
            quantize(&src, &out, &opts).unwrap();
            let q = Model::load(&out).unwrap();
            let syn = build("tiny", SyntheticScheme::Fp8(s)).unwrap();
            same_structure(&syn, &q, s.name());
            // The synthetic checkpoint written to disk loads as the same model too.
            let d = tmp.path().join(format!("syn-{}", s.name()));
            write_checkpoint(&d, "tiny", SyntheticScheme::Fp8(s), DEFAULT_SEED).unwrap();
            same_structure(&syn, &Model::load(&d).unwrap(), "written");
        }
    }

    #[test]
    fn tiny_runs_with_finite_logits_in_every_scheme() {
        for scheme in SyntheticScheme::ALL {
            let m = build("tiny", scheme).unwrap();
            assert!(m
                .weights
                .values()
                .filter(|w| w.dtype == DType::F8E4M3)
                .all(|w| w.bytes().iter().all(|&b| b & 0x7f != 0x7f)));
            for kv in [KvCacheDtype::Auto, KvCacheDtype::Fp8] {
                let mut r = CpuBackend
                    .load(
                        &m.graph,
                        &m.weights,
                        CacheConfig::new(2, 24).with_kv_dtype(kv),
                    )
                    .unwrap();
                let prefill = Batch {
                    seqs: (0..2)
                        .map(|s| SeqStep {
                            slot: s,
                            start_pos: 0,
                            tokens: prompt_ids(1000, 16, s as u64),
                            logits: LogitsFor::Last,
                        })
                        .collect(),
                };
                let out = r.step(&prefill, &[]).unwrap();
                assert!(out.logits.data.iter().all(|v| v.is_finite()), "{scheme:?}");
                let spread = out.logits.data.iter().fold(0f32, |a, v| a.max(v.abs()));
                assert!(
                    spread > 1e-3 && spread < 1e3,
                    "{scheme:?}: |logit| max {spread}"
                );
                let mut next: Vec<u32> = vec![5, 6];
                for step in 0..4 {
                    let b = Batch {
                        seqs: (0..2)
                            .map(|s| SeqStep {
                                slot: s,
                                start_pos: 16 + step,
                                tokens: vec![next[s]],
                                logits: LogitsFor::Last,
                            })
                            .collect(),
                    };
                    let top = r.step_top_k(&b, 1).unwrap();
                    assert_eq!(top.len(), 2);
                    for (s, t) in top.iter().enumerate() {
                        assert!(t[0].1.is_finite(), "{scheme:?} {kv:?}");
                        next[s] = t[0].0;
                    }
                }
            }
        }
    }

    #[test]
    fn gemma4_tiny_runs_with_finite_logits_in_every_scheme() {
        use crate::backend::Backend;
        let ids = prompt_ids(1000, 11, 3);
        for scheme in SyntheticScheme::ALL {
            let m = build("gemma-4-tiny", scheme).unwrap_or_else(|e| panic!("{scheme:?}: {e}"));
            let mut r = crate::cpu::CpuBackend
                .load(
                    &m.graph,
                    &m.weights,
                    crate::backend::CacheConfig::new(1, 16),
                )
                .unwrap();
            let out = r
                .step(
                    &crate::backend::Batch::single(
                        0,
                        0,
                        ids.clone(),
                        crate::backend::LogitsFor::All,
                    ),
                    &[],
                )
                .unwrap();
            assert!(out.logits.data.iter().all(|x| x.is_finite()), "{scheme:?}");
            let spread = out
                .logits
                .data
                .iter()
                .cloned()
                .fold(0f32, |a, x| a.max(x.abs()));
            assert!(spread > 1e-3, "{scheme:?}: logits all near zero ({spread})");
            let experts = m
                .graph
                .nodes
                .iter()
                .find_map(|n| match &n.op {
                    crate::graph::Op::MoeExperts { gate_up_scheme, .. } => {
                        Some(gate_up_scheme.clone())
                    }
                    _ => None,
                })
                .unwrap();
            let block = matches!(scheme, SyntheticScheme::Fp8(s) if s.is_block());
            assert_eq!(
                experts != crate::graph::QuantScheme::Dense,
                block,
                "{scheme:?}"
            );
        }
    }

    #[test]
    fn same_seed_same_weights() {
        let a = build_seeded("tiny", SyntheticScheme::Fp8(Scheme::Fp8Block), 1).unwrap();
        let b = build_seeded("tiny", SyntheticScheme::Fp8(Scheme::Fp8Block), 1).unwrap();
        let c = build_seeded("tiny", SyntheticScheme::Fp8(Scheme::Fp8Block), 2).unwrap();
        let w = "layers.1.mlp.up_proj.weight";
        assert_eq!(a.weights[w].bytes(), b.weights[w].bytes());
        assert_ne!(a.weights[w].bytes(), c.weights[w].bytes());
        // Weight statistics: BF16 std ~0.02, norms within +-0.05.
        let e = build("tiny", SyntheticScheme::Bf16).unwrap();
        let v = e.weights["layers.0.mlp.gate_proj.weight"].to_f32();
        let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        assert!((std - WEIGHT_STD).abs() < 0.002, "std {std}");
        let n = e.weights["layers.0.input_layernorm.weight"].to_f32();
        assert!(n.iter().all(|x| x.abs() <= NORM_AMPLITUDE * 1.01));
        // Dequantized FP8 weights have the same spread.
        let t = fp8_table();
        let s = WEIGHT_STD / fp8_table_std(&t);
        let codes = a.weights[w].bytes();
        let ms = codes
            .iter()
            .map(|&c| (fp8::decode(c) * s).powi(2))
            .sum::<f32>()
            / codes.len() as f32;
        assert!((ms.sqrt() - WEIGHT_STD).abs() < 0.002);
    }

    #[test]
    fn names_and_schemes_are_checked() {
        for n in NAMES {
            config(n).unwrap();
        }
        let c = config("gemma-3-27b").unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.head_dim,
                c.query_pre_attn_scalar,
                c.vocab_size
            ),
            (5376, 128, 168.0, 262208)
        );
        assert_eq!(c.rope_full.linear_factor, 8.0);
        assert_eq!(
            c.layer_types
                .iter()
                .filter(|t| **t == crate::config::LayerType::Full)
                .count(),
            10
        );
        let c = config("gemma-4-31b").unwrap();
        let g = c.gemma4.as_ref().unwrap();
        assert_eq!((c.hidden_size, c.num_hidden_layers), (5376, 60));
        assert_eq!((g.layer_head_dim[5], g.layer_kv_heads[5]), (512, 4));
        assert_eq!((g.layer_head_dim[0], g.layer_kv_heads[0]), (256, 16));
        let e2b = config("gemma-4-e2b").unwrap();
        assert_eq!(e2b.kv_donor(15), Some(13));
        assert_eq!(e2b.kv_donor(19), Some(14));
        assert_eq!(e2b.layer_intermediate(15), 12288);
        let e = build("gemma-3-7b", SyntheticScheme::Bf16)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown synthetic model `gemma-3-7b`"), "{e}");
        assert!(e.contains("gemma-3-270m"), "{e}");
        let e = "fp8".parse::<SyntheticScheme>().unwrap_err().to_string();
        assert!(e.contains("unknown scheme `fp8`"), "{e}");
        assert_eq!(
            "fp8-block-wo".parse::<SyntheticScheme>().unwrap(),
            SyntheticScheme::Fp8(Scheme::Fp8BlockWo)
        );
    }
}
