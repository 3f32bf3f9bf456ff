//! Import a llama.cpp Gemma 3 GGUF into a Hugging Face-layout text checkpoint
//! (`config.json`, `model.safetensors`, `generation_config.json`, tokenizer files).
//!
//! What llama.cpp's `convert_hf_to_gguf.py` (Gemma3Model) did, undone here:
//! - every `*norm.weight` got `+1.0` (Gemma3RMSNorm scales by `1 + w`): we subtract 1.0 in f32;
//! - tensor names were mapped to GGUF names: mapped back (see [`hf_tensor_name`]);
//! - no q/k permutation is applied for Gemma, so none is undone;
//! - `token_embd` was trimmed to the real vocabulary: `vocab_size` is its row count.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufTensorInfo, MetaValue};
use crate::tensor::DType;

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Output dtype: `DType::BF16` or `DType::F32`.
    pub dtype: DType,
    /// Show a progress bar over tensors.
    pub progress: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            dtype: DType::BF16,
            progress: false,
        }
    }
}

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub out_dir: PathBuf,
    pub safetensors_path: PathBuf,
    /// Number of tensors written.
    pub tensors: usize,
    /// Bytes of `model.safetensors`.
    pub bytes_written: u64,
    /// Count of source tensors per ggml type name ("Q4_K" -> 27).
    pub source_types: std::collections::BTreeMap<String, usize>,
    /// The config.json written.
    pub config: Value,
    /// Files copied from the tokenizer directory.
    pub copied_files: Vec<String>,
}

/// The HF name of a GGUF Gemma 3 tensor, or `None` if the name is not one Gemma 3 uses.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let suffix = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "post_attention_norm.weight" => "post_attention_layernorm.weight",
        "ffn_norm.weight" => "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight" => "post_feedforward_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{suffix}"))
}

/// Whether llama.cpp's converter added 1.0 to this (GGUF-named) tensor.
fn has_norm_shift(gguf_name: &str) -> bool {
    gguf_name.ends_with("norm.weight")
}

/// An f32 as the f64 with the shortest decimal form that rounds back to it (1e-6, not
/// 9.999999974752427e-7), so config.json shows the value the HF config had.
fn f32_json(x: f32) -> Value {
    let f: f64 = format!("{x}").parse().unwrap_or(x as f64);
    json!(f)
}

fn opt_u32(g: &GgufFile, key: &str) -> Result<Option<u32>> {
    if g.metadata.contains_key(key) {
        g.meta_u32(key).map(Some)
    } else {
        Ok(None)
    }
}

fn opt_f32(g: &GgufFile, key: &str) -> Result<Option<f32>> {
    if g.metadata.contains_key(key) {
        g.meta_f32(key).map(Some)
    } else {
        Ok(None)
    }
}

/// Build config.json from the GGUF metadata.
fn build_config(g: &GgufFile, vocab_size: usize, tied: bool, dtype: DType) -> Result<Value> {
    let arch = g.meta_str("general.architecture")?;
    if arch != "gemma3" {
        return Err(Error::field(
            &g.path,
            "general.architecture",
            format!("only `gemma3` GGUFs can be imported, this one is `{arch}`"),
        ));
    }
    let hidden = g.meta_u32("gemma3.embedding_length")?;
    let layers = g.meta_u32("gemma3.block_count")?;
    let heads = g.meta_u32("gemma3.attention.head_count")?;
    let kv_heads = g.meta_u32("gemma3.attention.head_count_kv")?;
    let head_dim = g.meta_u32("gemma3.attention.key_length")?;
    let ffn = g.meta_u32("gemma3.feed_forward_length")?;
    let eps = g.meta_f32("gemma3.attention.layer_norm_rms_epsilon")?;
    let ctx = g.meta_u32("gemma3.context_length")?;
    let rope_theta = opt_f32(g, "gemma3.rope.freq_base")?.unwrap_or(1_000_000.0);
    let sliding_window = opt_u32(g, "gemma3.attention.sliding_window")?.filter(|&w| w > 0);
    if heads == 0 || layers == 0 || head_dim == 0 {
        return Err(Error::file(
            &g.path,
            "head_count, block_count and key_length must be positive",
        ));
    }

    // llama.cpp (LLM_ARCH_GEMMA3): with a sliding window, set_swa_pattern(6): layer il slides
    // iff il % 6 < 5, so every 6th layer ((il + 1) % 6 == 0) is global; without, none slides.
    let layer_types: Vec<&str> = (0..layers)
        .map(|i| {
            if sliding_window.is_some() && (i + 1) % 6 != 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();

    // llama.cpp: f_attention_scale = 1/sqrt(n_embd / n_head) for the 27B (62 layers),
    // 1/sqrt(n_embd_head_k) otherwise. HF scales by query_pre_attn_scalar**-0.5.
    let query_pre_attn_scalar = if layers == 62 {
        hidden / heads
    } else {
        head_dim
    };

    let rope_scaling = match g.metadata.get("gemma3.rope.scaling.type") {
        Some(MetaValue::String(t)) if t == "linear" => {
            let factor = g.meta_f32("gemma3.rope.scaling.factor")?;
            json!({"rope_type": "linear", "factor": f32_json(factor)})
        }
        _ => Value::Null,
    };
    let final_softcap = opt_f32(g, "gemma3.final_logit_softcapping")?
        .filter(|&x| x != 0.0)
        .map(f32_json)
        .unwrap_or(Value::Null);

    let bos = opt_u32(g, "tokenizer.ggml.bos_token_id")?.unwrap_or(2);
    let eos = opt_u32(g, "tokenizer.ggml.eos_token_id")?.unwrap_or(1);
    let pad = opt_u32(g, "tokenizer.ggml.padding_token_id")?.unwrap_or(0);
    let dtype_name = match dtype {
        DType::BF16 => "bfloat16",
        DType::F32 => "float32",
        other => return Err(Error::invalid(format!("cannot import to {other}"))),
    };

    Ok(json!({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": f32_json(eps),
        "rope_theta": f32_json(rope_theta),
        "rope_local_base_freq": 10000.0,
        "rope_scaling": rope_scaling,
        "sliding_window": sliding_window,
        "sliding_window_pattern": 6,
        "layer_types": layer_types,
        "max_position_embeddings": ctx,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": null,
        "final_logit_softcapping": final_softcap,
        "initializer_range": 0.02,
        "use_cache": true,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }))
}

/// Id of `<end_of_turn>`: from the GGUF token list, else tokenizer.json's added tokens.
fn end_of_turn_id(g: &GgufFile, tokenizer_json: &Path) -> Option<u64> {
    if let Some(MetaValue::Array(toks)) = g.metadata.get("tokenizer.ggml.tokens") {
        if let Some(i) = toks
            .iter()
            .position(|t| t.as_str() == Some("<end_of_turn>"))
        {
            return Some(i as u64);
        }
    }
    #[derive(serde::Deserialize)]
    struct Added {
        id: u64,
        content: String,
    }
    #[derive(serde::Deserialize)]
    struct Tok {
        #[serde(default)]
        added_tokens: Vec<Added>,
    }
    let f = fs::File::open(tokenizer_json).ok()?;
    let tok: Tok = serde_json::from_reader(std::io::BufReader::new(f)).ok()?;
    tok.added_tokens
        .into_iter()
        .find(|a| a.content == "<end_of_turn>")
        .map(|a| a.id)
}

struct Planned<'a> {
    info: &'a GgufTensorInfo,
    hf_name: String,
    shape: Vec<usize>,
}

/// Import `gguf` (+ tokenizer files from `tokenizer_dir`) into `out_dir`.
pub fn import_gguf(
    gguf: &Path,
    tokenizer_dir: &Path,
    out_dir: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport> {
    if !matches!(opts.dtype, DType::BF16 | DType::F32) {
        return Err(Error::invalid(format!(
            "GGUF import writes BF16 or F32, not {}",
            opts.dtype
        )));
    }
    // Check the tokenizer files first: failing late after minutes of work is unkind.
    let required = ["tokenizer.json", "tokenizer_config.json"];
    for f in required {
        let p = tokenizer_dir.join(f);
        if !p.is_file() {
            return Err(Error::file(
                p,
                "required tokenizer file is missing from the tokenizer directory",
            ));
        }
    }

    let g = GgufFile::open(gguf)?;

    // Plan: map every name, check types, derive shapes.
    let mut plan = Vec::with_capacity(g.tensors.len());
    let mut source_types = std::collections::BTreeMap::new();
    for info in &g.tensors {
        let hf_name = hf_tensor_name(&info.name).ok_or_else(|| {
            Error::tensor(
                &info.name,
                format!(
                    "not a Gemma 3 text tensor; cannot map it to a Hugging Face name (in {})",
                    g.path.display()
                ),
            )
        })?;
        if !info.ggml_type.can_dequantize() {
            return Err(Error::tensor(
                &info.name,
                format!(
                    "ggml type {} is not supported (in {})",
                    info.ggml_type,
                    g.path.display()
                ),
            ));
        }
        *source_types.entry(info.ggml_type.name()).or_insert(0) += 1;
        plan.push(Planned {
            info,
            hf_name,
            shape: info.shape(),
        });
    }
    let embd = g.tensor("token_embd.weight").ok_or_else(|| {
        Error::tensor(
            "token_embd.weight",
            format!("missing from {}", g.path.display()),
        )
    })?;
    if embd.dims.len() != 2 {
        return Err(Error::tensor(
            "token_embd.weight",
            format!("expected 2 dimensions, got {:?}", embd.dims),
        ));
    }
    let vocab_size = embd.dims[1] as usize;
    let tied = g.tensor("output.weight").is_none();
    let config = build_config(&g, vocab_size, tied, opts.dtype)?;
    let hidden = config["hidden_size"].as_u64().unwrap_or(0);
    if embd.dims[0] != hidden {
        return Err(Error::tensor(
            "token_embd.weight",
            format!(
                "row length {} differs from gemma3.embedding_length {hidden}",
                embd.dims[0]
            ),
        ));
    }
    plan.sort_by(|a, b| a.hf_name.cmp(&b.hf_name));

    fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;

    // Stream model.safetensors: header first (all shapes are known), then every tensor's bytes,
    // so only one dequantized tensor is in memory at a time.
    let st_path = out_dir.join("model.safetensors");
    let esize = opts.dtype.size();
    let entries: Vec<(String, DType, Vec<usize>)> = plan
        .iter()
        .map(|p| (p.hf_name.clone(), opts.dtype, p.shape.clone()))
        .collect();
    let mut w = crate::checkpoint::begin_safetensors(&st_path, &entries)?;
    let werr = |e: std::io::Error| Error::io(&st_path, e);

    let pb = if opts.progress {
        let pb = indicatif::ProgressBar::new(plan.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} importing [{bar:40}] {pos}/{len} tensors {elapsed} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut buf: Vec<u8> = Vec::new();
    for p in &plan {
        pb.set_message(p.hf_name.clone());
        let mut vals = g.dequantize(p.info)?;
        if has_norm_shift(&p.info.name) {
            for v in vals.iter_mut() {
                *v -= 1.0;
            }
        }
        buf.clear();
        buf.reserve(vals.len() * esize);
        match opts.dtype {
            DType::BF16 => {
                for v in &vals {
                    buf.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            _ => {
                for v in &vals {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        w.write_all(&buf).map_err(werr)?;
        pb.inc(1);
    }
    w.flush().map_err(werr)?;
    drop(w);
    pb.finish_and_clear();
    let bytes_written = fs::metadata(&st_path)
        .map_err(|e| Error::io(&st_path, e))?
        .len();

    // config.json
    let cfg_path = out_dir.join("config.json");
    write_json(&cfg_path, &config)?;

    // generation_config.json
    let bos = config["bos_token_id"].clone();
    let eos = config["eos_token_id"].as_u64().unwrap_or(1);
    let mut eos_ids = vec![eos];
    if let Some(eot) = end_of_turn_id(&g, &tokenizer_dir.join("tokenizer.json")) {
        if eot != eos {
            eos_ids.push(eot);
        }
    }
    let gen = json!({
        "bos_token_id": bos,
        "eos_token_id": eos_ids,
        "pad_token_id": config["pad_token_id"].clone(),
        "do_sample": true,
        "top_k": 64,
        "top_p": 0.95,
        "cache_implementation": "hybrid",
    });
    write_json(&out_dir.join("generation_config.json"), &gen)?;

    // Tokenizer files.
    let mut copied_files = Vec::new();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ] {
        let src = tokenizer_dir.join(f);
        if !src.is_file() {
            continue; // the required ones were checked above
        }
        let dst = out_dir.join(f);
        fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        copied_files.push(f.to_string());
    }

    Ok(ImportReport {
        out_dir: out_dir.to_path_buf(),
        safetensors_path: st_path,
        tensors: plan.len(),
        bytes_written,
        source_types,
        config,
        copied_files,
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| Error::invalid(format!("serializing {}: {e}", path.display())))?;
    s.push('\n');
    fs::write(path, s).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::test_util::*;
    use crate::gguf::GgmlType;

    fn tiny() -> PathBuf {
        fixture_dir().join("tiny_gemma3.gguf")
    }

    /// A fake tokenizer dir: tokenizer.json (with `<end_of_turn>` as added token 106),
    /// tokenizer_config.json, special_tokens_map.json.
    fn fake_tokenizer(dir: &Path) -> PathBuf {
        let t = dir.join("tok");
        fs::create_dir_all(&t).unwrap();
        fs::write(
            t.join("tokenizer.json"),
            r#"{"version":"1.0","added_tokens":[{"id":106,"content":"<end_of_turn>"}],"model":{"vocab":{}}}"#,
        )
        .unwrap();
        fs::write(t.join("tokenizer_config.json"), r#"{"add_bos_token":true}"#).unwrap();
        fs::write(
            t.join("special_tokens_map.json"),
            r#"{"bos_token":"<bos>"}"#,
        )
        .unwrap();
        t
    }

    fn read_json(p: &Path) -> Value {
        serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
    }

    fn st_f32(view: &safetensors::tensor::TensorView) -> Vec<f32> {
        match view.dtype() {
            safetensors::Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            d => panic!("unexpected dtype {d:?}"),
        }
    }

    #[test]
    fn gguf_hf_tensor_names() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.17.attn_k.weight",
                "model.layers.17.self_attn.k_proj.weight",
            ),
            (
                "blk.3.attn_v.weight",
                "model.layers.3.self_attn.v_proj.weight",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.3.attn_q_norm.weight",
                "model.layers.3.self_attn.q_norm.weight",
            ),
            (
                "blk.3.attn_k_norm.weight",
                "model.layers.3.self_attn.k_norm.weight",
            ),
            (
                "blk.3.attn_norm.weight",
                "model.layers.3.input_layernorm.weight",
            ),
            (
                "blk.3.post_attention_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.pre_feedforward_layernorm.weight",
            ),
            (
                "blk.3.post_ffw_norm.weight",
                "model.layers.3.post_feedforward_layernorm.weight",
            ),
            (
                "blk.3.ffn_gate.weight",
                "model.layers.3.mlp.gate_proj.weight",
            ),
            ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
            (
                "blk.3.ffn_down.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(hf_tensor_name(g).as_deref(), Some(h), "{g}");
        }
        for bad in [
            "blk.x.attn_q.weight",
            "blk..attn_q.weight",
            "blk.0.attn_q.bias",
            "rope_freqs.weight",
            "v.blk.0.attn_q.weight",
        ] {
            assert_eq!(hf_tensor_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn gguf_import_tiny_end_to_end_f32() {
        let dir = tempfile::tempdir().unwrap();
        let tok = fake_tokenizer(dir.path());
        let out = dir.path().join("out/nested");
        let opts = ImportOptions {
            dtype: DType::F32,
            progress: false,
        };
        let rep = import_gguf(&tiny(), &tok, &out, &opts).unwrap();
        assert_eq!(rep.tensors, 28);
        assert_eq!(rep.source_types["Q8_0"], 8);
        assert_eq!(rep.source_types["Q5_0"], 2);
        assert_eq!(rep.source_types["F16"], 4);
        assert_eq!(rep.source_types["F32"], 14);
        let st_bytes = fs::read(out.join("model.safetensors")).unwrap();
        assert_eq!(rep.bytes_written, st_bytes.len() as u64);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&st_bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        assert_eq!(st.len(), 28);
        assert!(st.names().iter().all(|n| !n.starts_with("lm_head")));

        let g = GgufFile::open(tiny()).unwrap();
        let expected: Value = read_json(&fixture_dir().join("tiny_gemma3.expected.json"));
        for t in &g.tensors {
            let hf = hf_tensor_name(&t.name).unwrap();
            let v = st.tensor(&hf).unwrap();
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            assert_eq!(v.shape(), t.shape().as_slice(), "{hf}");
            let got = st_f32(&v);
            let src = g.dequantize(t).unwrap();
            let norm = t.name.ends_with("norm.weight");
            for (i, (a, b)) in got.iter().zip(&src).enumerate() {
                let want = if norm { b - 1.0 } else { *b };
                assert_eq!(a.to_bits(), want.to_bits(), "{hf}[{i}]");
            }
            // And against gguf-py's values directly.
            let first = expected[&t.name]["first"].as_array().unwrap();
            for (i, w) in first.iter().enumerate() {
                let w = w.as_f64().unwrap() as f32;
                assert_eq!(got[i], if norm { w - 1.0 } else { w }, "{hf}[{i}]");
            }
        }
        // Norms really had +1 undone: the fixture's norms are ~1 + N(0, 0.125).
        let n = st_f32(&st.tensor("model.layers.1.input_layernorm.weight").unwrap());
        let mean = n.iter().sum::<f32>() / n.len() as f32;
        assert!(mean.abs() < 0.1, "norm mean {mean}");
        assert_eq!(
            st.tensor("model.layers.0.self_attn.q_proj.weight")
                .unwrap()
                .shape(),
            &[32, 32]
        );
        assert_eq!(
            st.tensor("model.layers.0.self_attn.k_proj.weight")
                .unwrap()
                .shape(),
            &[16, 32]
        );
        assert_eq!(
            st.tensor("model.layers.0.mlp.down_proj.weight")
                .unwrap()
                .shape(),
            &[32, 64]
        );
        assert_eq!(
            st.tensor("model.embed_tokens.weight").unwrap().shape(),
            &[64, 32]
        );
        assert_eq!(
            st.tensor("model.layers.1.self_attn.q_norm.weight")
                .unwrap()
                .shape(),
            &[16]
        );

        let c = read_json(&out.join("config.json"));
        assert_eq!(c, rep.config);
        assert_eq!(c["architectures"], json!(["Gemma3ForCausalLM"]));
        assert_eq!(c["model_type"], "gemma3_text");
        assert_eq!(c["vocab_size"], 64);
        assert_eq!(c["hidden_size"], 32);
        assert_eq!(c["intermediate_size"], 64);
        assert_eq!(c["num_hidden_layers"], 2);
        assert_eq!(c["num_attention_heads"], 2);
        assert_eq!(c["num_key_value_heads"], 1);
        assert_eq!(c["head_dim"], 16);
        assert_eq!(c["rms_norm_eps"], 1e-6);
        assert_eq!(c["rope_theta"], 1e6);
        assert_eq!(c["rope_local_base_freq"], 10000.0);
        assert_eq!(c["rope_scaling"], Value::Null);
        assert_eq!(c["sliding_window"], 8);
        assert_eq!(
            c["layer_types"],
            json!(["sliding_attention", "sliding_attention"])
        );
        assert_eq!(c["max_position_embeddings"], 1024);
        assert_eq!(c["query_pre_attn_scalar"], 16);
        assert_eq!(c["hidden_activation"], "gelu_pytorch_tanh");
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(
            (
                c["bos_token_id"].clone(),
                c["eos_token_id"].clone(),
                c["pad_token_id"].clone()
            ),
            (json!(2), json!(1), json!(0))
        );
        assert_eq!(c["torch_dtype"], "float32");
        assert_eq!(c["dtype"], "float32");

        let gc = read_json(&out.join("generation_config.json"));
        // `<end_of_turn>` is token 50 in the GGUF's own token list (it wins over tokenizer.json).
        assert_eq!(
            gc,
            json!({"bos_token_id": 2, "eos_token_id": [1, 50], "pad_token_id": 0, "do_sample": true,
                   "top_k": 64, "top_p": 0.95, "cache_implementation": "hybrid"})
        );
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            assert_eq!(
                fs::read(out.join(f)).unwrap(),
                fs::read(tok.join(f)).unwrap(),
                "{f}"
            );
        }
        assert!(!out.join("tokenizer.model").exists());
        assert_eq!(
            rep.copied_files,
            vec![
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json"
            ]
        );
    }

    #[test]
    fn gguf_import_tiny_bf16_rounds_after_norm_shift() {
        let dir = tempfile::tempdir().unwrap();
        let tok = fake_tokenizer(dir.path());
        let out = dir.path().join("out");
        let rep = import_gguf(&tiny(), &tok, &out, &ImportOptions::default()).unwrap();
        assert_eq!(rep.config["torch_dtype"], "bfloat16");
        let st_bytes = fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        let g = GgufFile::open(tiny()).unwrap();
        for t in &g.tensors {
            let v = st.tensor(&hf_tensor_name(&t.name).unwrap()).unwrap();
            assert_eq!(v.dtype(), safetensors::Dtype::BF16);
            let got: Vec<u16> = v
                .data()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let norm = t.name.ends_with("norm.weight");
            for (i, (a, b)) in got.iter().zip(g.dequantize(t).unwrap()).enumerate() {
                let want = half::bf16::from_f32(if norm { b - 1.0 } else { b }).to_bits();
                assert_eq!(*a, want, "{}[{i}]", t.name);
            }
        }
        // 2 bytes per element.
        let n: u64 = g.tensors.iter().map(|t| t.n_elements).sum();
        assert!(rep.bytes_written > 2 * n && rep.bytes_written < 2 * n + 8192);
    }

    #[test]
    fn gguf_import_missing_tokenizer_files() {
        let dir = tempfile::tempdir().unwrap();
        let tok = fake_tokenizer(dir.path());
        let opts = ImportOptions::default();
        fs::remove_file(tok.join("tokenizer_config.json")).unwrap();
        let e = import_gguf(&tiny(), &tok, &dir.path().join("o1"), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer_config.json"), "{e}");
        fs::remove_file(tok.join("tokenizer.json")).unwrap();
        let e = import_gguf(&tiny(), &tok, &dir.path().join("o2"), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        // A missing GGUF names the GGUF.
        let tok = fake_tokenizer(&dir.path().join("again"));
        let e = import_gguf(
            &dir.path().join("absent.gguf"),
            &tok,
            &dir.path().join("o3"),
            &opts,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("absent.gguf"), "{e}");
    }

    fn gemma3_kvs(layers: u32, hidden: u32, heads: u32) -> Vec<(&'static str, MetaValue)> {
        vec![
            ("general.architecture", MetaValue::String("gemma3".into())),
            ("gemma3.context_length", MetaValue::U32(4096)),
            ("gemma3.embedding_length", MetaValue::U32(hidden)),
            ("gemma3.block_count", MetaValue::U32(layers)),
            ("gemma3.feed_forward_length", MetaValue::U32(64)),
            ("gemma3.attention.head_count", MetaValue::U32(heads)),
            ("gemma3.attention.head_count_kv", MetaValue::U32(1)),
            ("gemma3.attention.key_length", MetaValue::U32(16)),
            (
                "gemma3.attention.layer_norm_rms_epsilon",
                MetaValue::F32(1e-6),
            ),
            ("gemma3.attention.sliding_window", MetaValue::U32(1024)),
            (
                "gemma3.rope.scaling.type",
                MetaValue::String("linear".into()),
            ),
            ("gemma3.rope.scaling.factor", MetaValue::F32(8.0)),
        ]
    }

    fn embd(hidden: u64) -> T<'static> {
        T(
            "token_embd.weight",
            vec![hidden, 2],
            0,
            vec![0; hidden as usize * 8],
        )
    }

    #[test]
    fn gguf_import_config_layer_types_27b_scalar_untied_and_unknown_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let tok = fake_tokenizer(dir.path());
        let opts = ImportOptions::default();
        // 12 layers: layers 5 and 11 are global. Untied (output.weight present).
        let b = build_gguf(
            3,
            &gemma3_kvs(12, 32, 2),
            &[embd(32), T("output.weight", vec![32, 2], 1, vec![0; 128])],
        );
        let p = write_tmp(dir.path(), "twelve.gguf", &b);
        let rep = import_gguf(&p, &tok, &dir.path().join("o12"), &opts).unwrap();
        let lt: Vec<String> = serde_json::from_value(rep.config["layer_types"].clone()).unwrap();
        let globals: Vec<usize> = lt
            .iter()
            .enumerate()
            .filter(|(_, t)| *t == "full_attention")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(globals, vec![5, 11]);
        assert_eq!(lt.len(), 12);
        assert_eq!(rep.config["query_pre_attn_scalar"], 16);
        assert_eq!(rep.config["tie_word_embeddings"], false);
        assert_eq!(
            rep.config["rope_scaling"],
            json!({"rope_type": "linear", "factor": 8.0})
        );
        assert_eq!(rep.config["rope_theta"], 1e6); // default when absent
        assert_eq!(rep.config["vocab_size"], 2);
        let st_bytes = fs::read(dir.path().join("o12/model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        assert_eq!(st.tensor("lm_head.weight").unwrap().shape(), &[2, 32]);
        // `<end_of_turn>` from tokenizer.json's added tokens when the GGUF has no token list.
        let gc = read_json(&dir.path().join("o12/generation_config.json"));
        assert_eq!(gc["eos_token_id"], json!([1, 106]));

        // 62 layers (the 27B): query_pre_attn_scalar = hidden / heads = 5376 / 32 = 168.
        let b = build_gguf(3, &gemma3_kvs(62, 5376, 32), &[embd(5376)]);
        let p = write_tmp(dir.path(), "big.gguf", &b);
        let rep = import_gguf(&p, &tok, &dir.path().join("o62"), &opts).unwrap();
        assert_eq!(rep.config["query_pre_attn_scalar"], 168);

        // An unknown tensor name is an error naming it.
        let b = build_gguf(
            3,
            &gemma3_kvs(1, 32, 2),
            &[
                embd(32),
                T("blk.0.attn_qkv.weight", vec![32], 0, vec![0; 128]),
            ],
        );
        let p = write_tmp(dir.path(), "unk.gguf", &b);
        let e = import_gguf(&p, &tok, &dir.path().join("ou"), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.attn_qkv.weight") && e.contains("unk.gguf"),
            "{e}"
        );

        // An unsupported quant type is an error naming the tensor and the type.
        let b = build_gguf(
            3,
            &gemma3_kvs(1, 32, 2),
            &[
                embd(32),
                T(
                    "blk.0.attn_q.weight",
                    vec![32, 1],
                    GgmlType::Q4_0.0,
                    vec![0; 18],
                ),
            ],
        );
        let p = write_tmp(dir.path(), "q40.gguf", &b);
        let e = import_gguf(&p, &tok, &dir.path().join("oq"), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("Q4_0"),
            "{e}"
        );

        // Another architecture is refused, naming the key.
        let mut kvs = gemma3_kvs(1, 32, 2);
        kvs[0].1 = MetaValue::String("llama".into());
        let p = write_tmp(dir.path(), "llama.gguf", &build_gguf(3, &kvs, &[embd(32)]));
        let e = import_gguf(&p, &tok, &dir.path().join("ol"), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("general.architecture") && e.contains("llama"),
            "{e}"
        );

        // A missing required key names it.
        let kvs: Vec<_> = gemma3_kvs(1, 32, 2)
            .into_iter()
            .filter(|(k, _)| *k != "gemma3.feed_forward_length")
            .collect();
        let p = write_tmp(dir.path(), "nokey.gguf", &build_gguf(3, &kvs, &[embd(32)]));
        let e = import_gguf(&p, &tok, &dir.path().join("ok"), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gemma3.feed_forward_length") && e.contains("nokey.gguf"),
            "{e}"
        );

        // F8 output is refused.
        let e = import_gguf(
            &tiny(),
            &tok,
            &dir.path().join("of8"),
            &ImportOptions {
                dtype: DType::F8E4M3,
                progress: false,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("F8_E4M3"), "{e}");
    }
}
