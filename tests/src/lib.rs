//! Shared helpers for the integration tests: tiny random Gemma 3 checkpoints written on the fly,
//! and the location of the real model and fixtures.

pub use e4m3_core::conformance;

use std::path::{Path, PathBuf};

use e4m3_core::backend::{Backend, Batch, CacheConfig, LogitsFor, Runner};
use e4m3_core::cpu::CpuBackend;
use e4m3_core::model::Model;
use e4m3_core::tensor::Mat;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// The real Gemma 3 270M, imported by `scripts/setup.sh`. Panics with the fix when it is absent, so a
/// missing model is a failure, never a silent pass.
pub fn real_model_dir() -> PathBuf {
    let dir = std::env::var_os("E4M3_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/gemma-3-270m"));
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file(),
        "the real model is not at {} — run `scripts/setup.sh` first (it fetches and imports Gemma 3 270M)",
        dir.display()
    );
    dir
}

/// Shape of a tiny Gemma 3.
#[derive(Clone, Debug)]
pub struct Tiny {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: usize,
    /// true = full attention
    pub full: Vec<bool>,
    pub rope_linear: Option<f32>,
    pub qpas: f32,
    pub bf16: bool,
}

impl Default for Tiny {
    fn default() -> Self {
        Tiny {
            vocab: 64,
            hidden: 32,
            inter: 48,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            window: 4,
            full: vec![false, false, true],
            rope_linear: Some(4.0),
            qpas: 12.0,
            bf16: false,
        }
    }
}

/// Named tensors with their shapes, in HF naming without prefix.
pub fn tiny_tensors(t: &Tiny, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut mk = |name: String, shape: Vec<usize>, std: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std * 1.7)
            .collect();
        (name, shape, v)
    };
    let (h, d, i) = (t.hidden, t.head_dim, t.inter);
    let mut out = vec![
        mk("embed_tokens.weight".into(), vec![t.vocab, h], 1.0),
        mk("norm.weight".into(), vec![h], 0.5),
    ];
    for l in 0..t.full.len() {
        let p = format!("layers.{l}.");
        let ws = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        out.push(mk(format!("{p}input_layernorm.weight"), vec![h], 0.5));
        out.push(mk(
            format!("{p}self_attn.q_proj.weight"),
            vec![t.heads * d, h],
            ws(h),
        ));
        out.push(mk(
            format!("{p}self_attn.k_proj.weight"),
            vec![t.kv_heads * d, h],
            ws(h),
        ));
        out.push(mk(
            format!("{p}self_attn.v_proj.weight"),
            vec![t.kv_heads * d, h],
            ws(h),
        ));
        out.push(mk(
            format!("{p}self_attn.o_proj.weight"),
            vec![h, t.heads * d],
            ws(t.heads * d),
        ));
        out.push(mk(format!("{p}self_attn.q_norm.weight"), vec![d], 0.5));
        out.push(mk(format!("{p}self_attn.k_norm.weight"), vec![d], 0.5));
        out.push(mk(
            format!("{p}post_attention_layernorm.weight"),
            vec![h],
            0.5,
        ));
        out.push(mk(
            format!("{p}pre_feedforward_layernorm.weight"),
            vec![h],
            0.5,
        ));
        out.push(mk(format!("{p}mlp.gate_proj.weight"), vec![i, h], ws(h)));
        out.push(mk(format!("{p}mlp.up_proj.weight"), vec![i, h], ws(h)));
        out.push(mk(format!("{p}mlp.down_proj.weight"), vec![h, i], ws(i)));
        out.push(mk(
            format!("{p}post_feedforward_layernorm.weight"),
            vec![h],
            0.5,
        ));
    }
    out
}

/// The text config of a tiny model, in the transformers 5.x style (explicit layer_types, rope_parameters).
pub fn tiny_text_config(t: &Tiny) -> Value {
    let full_rope = match t.rope_linear {
        Some(f) => json!({"rope_type": "linear", "factor": f, "rope_theta": 1e6}),
        None => json!({"rope_type": "default", "rope_theta": 1e6}),
    };
    json!({
        "model_type": "gemma3_text",
        "vocab_size": t.vocab, "hidden_size": t.hidden, "intermediate_size": t.inter,
        "num_hidden_layers": t.full.len(), "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads, "head_dim": t.head_dim,
        "query_pre_attn_scalar": t.qpas, "sliding_window": t.window, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256,
        "layer_types": t.full.iter().map(|&f| if f { "full_attention" } else { "sliding_attention" }).collect::<Vec<_>>(),
        "rope_parameters": {"full_attention": full_rope, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        "hidden_activation": "gelu_pytorch_tanh",
    })
}

/// Write `config` and the tensors (names prefixed by `prefix`) as a checkpoint in `dir`.
pub fn write_checkpoint(
    dir: &Path,
    config: &Value,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    prefix: &str,
    bf16: bool,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            let b: Vec<u8> = if bf16 {
                v.iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect()
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            };
            (format!("{prefix}{n}"), s.clone(), b)
        })
        .collect();
    let dtype = if bf16 {
        safetensors::Dtype::BF16
    } else {
        safetensors::Dtype::F32
    };
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Write a tiny Gemma3ForCausalLM with prefix `model.`.
pub fn write_tiny(dir: &Path, t: &Tiny, seed: u64) {
    write_checkpoint(
        dir,
        &tiny_text_config(t),
        &tiny_tensors(t, seed),
        "model.",
        t.bf16,
    );
}

pub fn cpu_runner(model: &Model, slots: usize, max_seq_len: usize) -> Box<dyn Runner> {
    CpuBackend
        .load(
            &model.graph,
            &model.weights,
            CacheConfig::new(slots, max_seq_len),
        )
        .expect("CPU backend loads")
}

/// Teacher-forced logits at every position, in one prefill step.
pub fn all_logits(model: &Model, ids: &[u32]) -> Mat {
    let mut r = cpu_runner(model, 1, ids.len().max(1));
    r.step(&Batch::single(0, 0, ids.to_vec(), LogitsFor::All), &[])
        .unwrap()
        .logits
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

// ---------------------------------------------------------------------------------------------------
// FP8 checkpoints (fp8-formats.md): tensors of any stored dtype, and the four FP8 formats' quantizers.

/// Stored values of one tensor.
#[derive(Clone, Debug)]
pub enum Stored {
    F32(Vec<f32>),
    Bf16(Vec<f32>),
    /// E4M3 codes (from `e4m3_core::fp8::encode`).
    F8(Vec<u8>),
}

/// One tensor under its full checkpoint name.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Stored,
}

impl RawTensor {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Stored) -> RawTensor {
        RawTensor {
            name: name.into(),
            shape,
            data,
        }
    }
}

/// Write `config.json` and `model.safetensors` with tensors of mixed dtypes.
pub fn write_raw_checkpoint(dir: &Path, config: &Value, tensors: &[RawTensor]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    let bytes: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let (dt, b) = match &t.data {
                Stored::F32(v) => (
                    safetensors::Dtype::F32,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
                Stored::Bf16(v) => (
                    safetensors::Dtype::BF16,
                    v.iter()
                        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                        .collect(),
                ),
                Stored::F8(c) => (safetensors::Dtype::F8_E4M3, c.clone()),
            };
            (t.name.clone(), t.shape.clone(), dt, b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, dt, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Write `value` as `dir/name` (e.g. `hf_quant_config.json`).
pub fn write_json(dir: &Path, name: &str, value: &Value) {
    std::fs::write(dir.join(name), serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// Quantize a `[rows, cols]` matrix to E4M3 with one dequantization scale (amax/448) per
/// `block = [br, bc]` block; returns the codes and the scales, row-major `[ceil(rows/br), ceil(cols/bc)]`.
/// Per-tensor is `block = [rows, cols]`, per-channel `[1, cols]`.
pub fn fp8_quantize(v: &[f32], rows: usize, cols: usize, block: [usize; 2]) -> (Vec<u8>, Vec<f32>) {
    let (ob, ib) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
    let mut scales = vec![0f32; ob * ib];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / block[0]) * ib + c / block[1]];
            *s = s.max(v[r * cols + c].abs());
        }
    }
    for s in &mut scales {
        *s = if *s == 0.0 {
            1.0
        } else {
            *s / e4m3_core::fp8::E4M3_MAX
        };
    }
    let codes = (0..rows * cols)
        .map(|i| {
            let s = scales[(i / cols / block[0]) * ib + (i % cols) / block[1]];
            e4m3_core::fp8::encode(v[i] / s)
        })
        .collect();
    (codes, scales)
}

/// The four FP8 checkpoint formats, as the tiny writer produces them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fp8Format {
    /// A: F32 scalar `weight_scale` and `input_scale`.
    ModelOpt,
    /// B: `weight_scale` `[out, 1]` in BF16.
    CompressedTensors,
    /// C: F32 `weight_scale` `[ceil(out/128), 1, ceil(in/128), 1]`.
    ModelOptPbWo,
    /// D: F32 `weight_scale_inv` `[ceil(out/b0), ceil(in/b1)]`.
    FineGrained { block: [usize; 2] },
}

/// The tiny model's tensors (names without prefix, as `tiny_tensors`) in `format`: every `*_proj.weight`
/// for which `dense(name)` is false becomes F8_E4M3 with its scales; everything else is stored BF16.
/// A: the input_scale of a module is `0.01 * (1 + index)`, so per-shard scales differ.
pub fn tiny_fp8_tensors(
    t: &Tiny,
    seed: u64,
    format: Fp8Format,
    dense: &dyn Fn(&str) -> bool,
) -> Vec<RawTensor> {
    let mut out = Vec::new();
    for (idx, (name, shape, v)) in tiny_tensors(t, seed).into_iter().enumerate() {
        let module = name.strip_suffix(".weight").unwrap_or(&name).to_string();
        if !module.ends_with("_proj") || dense(&name) {
            out.push(RawTensor::new(name, shape, Stored::Bf16(v)));
            continue;
        }
        let (rows, cols) = (shape[0], shape[1]);
        let sc = |s: &str| format!("{module}.{s}");
        match format {
            Fp8Format::ModelOpt => {
                let (codes, s) = fp8_quantize(&v, rows, cols, [rows, cols]);
                out.push(RawTensor::new(name, shape, Stored::F8(codes)));
                out.push(RawTensor::new(sc("weight_scale"), vec![], Stored::F32(s)));
                out.push(RawTensor::new(
                    sc("input_scale"),
                    vec![],
                    Stored::F32(vec![0.01 * (1 + idx) as f32]),
                ));
            }
            Fp8Format::CompressedTensors => {
                let (codes, s) = fp8_quantize(&v, rows, cols, [1, cols]);
                out.push(RawTensor::new(name, shape, Stored::F8(codes)));
                out.push(RawTensor::new(
                    sc("weight_scale"),
                    vec![rows, 1],
                    Stored::Bf16(s),
                ));
            }
            Fp8Format::ModelOptPbWo => {
                let (codes, s) = fp8_quantize(&v, rows, cols, [128, 128]);
                out.push(RawTensor::new(name, shape, Stored::F8(codes)));
                out.push(RawTensor::new(
                    sc("weight_scale"),
                    vec![rows.div_ceil(128), 1, cols.div_ceil(128), 1],
                    Stored::F32(s),
                ));
            }
            Fp8Format::FineGrained { block } => {
                let (codes, s) = fp8_quantize(&v, rows, cols, block);
                out.push(RawTensor::new(name, shape, Stored::F8(codes)));
                out.push(RawTensor::new(
                    sc("weight_scale_inv"),
                    vec![rows.div_ceil(block[0]), cols.div_ceil(block[1])],
                    Stored::F32(s),
                ));
            }
        }
    }
    out
}

/// Prefix every tensor name (`model.`, `model.language_model.`, ...).
pub fn prefixed(tensors: Vec<RawTensor>, prefix: &str) -> Vec<RawTensor> {
    tensors
        .into_iter()
        .map(|mut t| {
            t.name = format!("{prefix}{}", t.name);
            t
        })
        .collect()
}

/// A tiny WordLevel `tokenizer.json` (whitespace split) over `<pad> <eos> <bos> <unk>` and the words `w4` ..
/// `w{vocab-1}`, plus a `tokenizer_config.json` with `<bos>` as BOS; for tests that tokenize text.
pub fn write_word_tokenizer(dir: &Path, vocab: usize) {
    let mut v = serde_json::Map::new();
    for (i, t) in ["<pad>", "<eos>", "<bos>", "<unk>"].iter().enumerate() {
        v.insert(t.to_string(), json!(i));
    }
    for i in 4..vocab {
        v.insert(format!("w{i}"), json!(i));
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<pad>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "<bos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": v, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": true, "bos_token": "<bos>", "eos_token": "<eos>"}"#,
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------------
// Fixture readers shared by the tests.

/// The seven linear modules of every Gemma 3 layer.
pub const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

pub fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn json_u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn json_f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn json_f32_matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(json_f32s).collect()
}

/// The wgpu backend (its binding limit lowered to `binding_limit` bytes when given). A missing adapter
/// fails the test, never skips it: scripts/setup.sh installs lavapipe.
pub fn wgpu_backend(binding_limit: Option<u64>) -> Box<dyn e4m3_core::backend::Backend> {
    let opened = match binding_limit {
        None => e4m3_backend_wgpu::open(None),
        Some(l) => e4m3_backend_wgpu::open_with_binding_limit(None, l),
    };
    opened.unwrap_or_else(|e| {
        panic!("no wgpu adapter: {e} (scripts/setup.sh installs mesa-vulkan-drivers for lavapipe)")
    })
}
