//! Loading the four FP8 checkpoint formats (fp8-formats.md): detection from the config files, the scheme
//! of every Linear in the graph, scale tensors and their names and shapes, exclusions kept dense in BF16,
//! KV-cache scales, and the errors for bad FP8 checkpoints.

use e4m3_core::graph::{Op, QuantScheme};
use e4m3_core::model::Model;
use e4m3_core::quant_config::CheckpointQuant;
use e4m3_core::tensor::DType;
use e4m3_tests::*;
use serde_json::{json, Value};

const NODES: [(&str, &str); 7] = [
    ("q_proj", "self_attn.q_proj"),
    ("k_proj", "self_attn.k_proj"),
    ("v_proj", "self_attn.v_proj"),
    ("o_proj", "self_attn.o_proj"),
    ("gate_proj", "mlp.gate_proj"),
    ("up_proj", "mlp.up_proj"),
    ("down_proj", "mlp.down_proj"),
];

/// The Linear op of graph node `node`: (weight name, scheme).
fn linear(m: &Model, node: &str) -> (String, QuantScheme) {
    let id = m
        .graph
        .find(node)
        .unwrap_or_else(|| panic!("no node {node}"));
    match &m.graph.node(id).op {
        Op::Linear { weight, scheme } => (weight.clone(), scheme.clone()),
        op => panic!("{node} is {op:?}"),
    }
}

/// Every layer Linear with its graph node, module name and [out, in].
fn layer_linears(t: &Tiny) -> Vec<(String, String, [usize; 2])> {
    let (h, i, q, kv) = (
        t.hidden,
        t.inter,
        t.heads * t.head_dim,
        t.kv_heads * t.head_dim,
    );
    let mut out = Vec::new();
    for l in 0..t.full.len() {
        for ((node, module), shape) in
            NODES
                .iter()
                .zip([[q, h], [kv, h], [kv, h], [h, q], [i, h], [i, h], [h, i]])
        {
            out.push((
                format!("layers.{l}.{node}"),
                format!("layers.{l}.{module}"),
                shape,
            ));
        }
    }
    out
}

/// A dense module: scheme Dense, weight stored BF16, no scale tensor in the map.
fn assert_dense(m: &Model, node: &str, module: &str) {
    let (w, s) = linear(m, node);
    assert_eq!(s, QuantScheme::Dense, "{node}");
    assert_eq!(w, format!("{module}.weight"));
    assert_eq!(m.weights[&w].dtype, DType::BF16, "{w}");
    for suffix in ["weight_scale", "input_scale", "weight_scale_inv"] {
        assert!(
            !m.weights.contains_key(&format!("{module}.{suffix}")),
            "{module}.{suffix}"
        );
    }
}

fn lm_head(t: &Tiny, seed: u64) -> RawTensor {
    let v = tiny_tensors(t, seed + 100)[0].2.clone();
    RawTensor::new("lm_head.weight", vec![t.vocab, t.hidden], Stored::Bf16(v))
}

fn load_err(dir: &std::path::Path) -> String {
    Model::load(dir).err().expect("must fail").to_string()
}

/// A: ModelOpt FP8 in the transformers >= 4.52 multimodal naming (`model.language_model.`), an explicit
/// BF16 lm_head and layer 1's MLP excluded by `exclude_modules` wildcards, KV scales for layer 0 only.
#[test]
fn modelopt_fp8_static_per_tensor_scales_and_exclusions() {
    let t = Tiny {
        bf16: true,
        ..Tiny::default()
    };
    let excluded = |n: &str| n.starts_with("layers.1.mlp.");
    let mut tensors = prefixed(
        tiny_fp8_tensors(&t, 1, Fp8Format::ModelOpt, &excluded),
        "model.language_model.",
    );
    let stored_input_scales: Vec<(String, f32)> = tensors
        .iter()
        .filter_map(|r| match (&r.data, r.name.strip_suffix(".input_scale")) {
            (Stored::F32(v), Some(m)) => Some((
                format!(
                    "{}.input_scale",
                    m.strip_prefix("model.language_model.").unwrap()
                ),
                v[0],
            )),
            _ => None,
        })
        .collect();
    assert_eq!(stored_input_scales.len(), 3 * 7 - 3);
    tensors.push(lm_head(&t, 1));
    tensors.push(RawTensor::new(
        "model.language_model.layers.0.self_attn.k_proj.k_scale",
        vec![],
        Stored::F32(vec![1.5]),
    ));
    tensors.push(RawTensor::new(
        "model.language_model.layers.0.self_attn.v_proj.v_scale",
        vec![],
        Stored::F32(vec![2.0]),
    ));
    tensors.push(RawTensor::new(
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        vec![4, 4],
        Stored::Bf16(vec![0.5; 16]),
    ));
    let mut text = tiny_text_config(&t);
    text["tie_word_embeddings"] = json!(false);
    let exclude = json!([
        "lm_head",
        "model.language_model.layers.1.mlp*",
        "model.vision_tower*"
    ]);
    let config = json!({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text,
        "quantization_config": {
            "config_groups": {"group_0": {
                "input_activations": {"dynamic": false, "num_bits": 8, "type": "float"},
                "weights": {"dynamic": false, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}},
            "ignore": exclude, "quant_algo": "FP8",
            "kv_cache_scheme": {"dynamic": false, "num_bits": 8, "type": "float"},
            "producer": {"name": "modelopt", "version": "0.39.0"}, "quant_method": "modelopt"}
    });
    let dir = tempfile::tempdir().unwrap();
    write_raw_checkpoint(dir.path(), &config, &tensors);
    write_json(
        dir.path(),
        "hf_quant_config.json",
        &json!({"producer": {"name": "modelopt", "version": "0.39.0"},
                "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": exclude}}),
    );
    let m = Model::load(dir.path()).unwrap();
    assert!(matches!(m.quant, CheckpointQuant::ModelOptFp8 { .. }));
    assert!(m.kv_cache_fp8);
    for (node, module, _) in layer_linears(&t) {
        if module.starts_with("layers.1.mlp.") {
            assert_dense(&m, &node, &module);
            continue;
        }
        let (w, s) = linear(&m, &node);
        assert_eq!(
            s,
            QuantScheme::Fp8Static {
                weight_scale: format!("{module}.weight_scale"),
                input_scale: format!("{module}.input_scale"),
            },
            "{node}"
        );
        assert_eq!(m.weights[&w].dtype, DType::F8E4M3);
        for s in ["weight_scale", "input_scale"] {
            let sw = &m.weights[&format!("{module}.{s}")];
            assert_eq!(
                (sw.dtype, sw.shape.clone()),
                (DType::F32, vec![]),
                "{module}.{s}"
            );
        }
    }
    // Per-shard q/k/v input scales exactly as stored (no requantization to a shared max).
    for (name, v) in &stored_input_scales {
        assert_eq!(m.weights[name].to_f32(), vec![*v], "{name}");
    }
    let q0 = m.weights["layers.0.self_attn.q_proj.input_scale"].to_f32()[0];
    let k0 = m.weights["layers.0.self_attn.k_proj.input_scale"].to_f32()[0];
    assert_ne!(q0, k0);
    // lm_head kept dense in BF16; the vision tower is not read.
    assert!(!m.tied_lm_head);
    assert_dense(&m, "logits", "lm_head");
    assert_eq!(m.linear_schemes["lm_head"], QuantScheme::Dense);
    assert!(!m.weights.keys().any(|k| k.contains("vision")));
    // Dequantized weights are the originals within E4M3's relative step.
    let orig = tiny_tensors(&t, 1);
    let (_, _, wv) = orig
        .iter()
        .find(|(n, _, _)| n == "layers.2.mlp.up_proj.weight")
        .unwrap();
    let codes = m.weights["layers.2.mlp.up_proj.weight"].to_f32();
    let s = m.weights["layers.2.mlp.up_proj.weight_scale"].to_f32()[0];
    let amax = wv.iter().fold(0f32, |a, x| a.max(x.abs()));
    for (c, o) in codes.iter().zip(wv) {
        assert!(
            (c * s - o).abs() <= o.abs() / 16.0 + amax / 448.0 / 512.0,
            "{c} {o}"
        );
    }
    // KV scales: stored for layer 0 under canonical names, 1.0 elsewhere.
    let kv = |l: usize, s: &str| m.weights[&format!("layers.{l}.self_attn.{s}")].to_f32();
    assert_eq!((kv(0, "k_scale"), kv(0, "v_scale")), (vec![1.5], vec![2.0]));
    for l in 1..3 {
        assert_eq!((kv(l, "k_scale"), kv(l, "v_scale")), (vec![1.0], vec![1.0]));
    }
    // info: per-group schemes and bytes.
    let g = m.group_summary();
    let by = |n: &str| g.iter().find(|s| s.group == n).unwrap().clone();
    assert_eq!(
        by("attention").schemes,
        vec![("fp8-static".to_string(), 12)]
    );
    let mut mlp = by("mlp").schemes;
    mlp.sort();
    assert_eq!(
        mlp,
        vec![("dense".to_string(), 3), ("fp8-static".to_string(), 6)]
    );
    assert_eq!(by("lm_head").schemes, vec![("dense".to_string(), 1)]);
    assert_eq!(by("embed").dtypes, vec![DType::BF16]);
    assert!(by("attention").bytes < by("attention").bf16_bytes);
    assert_eq!(by("lm_head").bytes, by("lm_head").bf16_bytes);
}

/// B: compressed-tensors FP8_DYNAMIC with `ignore` = plain names and anchored `re:` regexes, BF16
/// per-channel scales, compressed-tensors KV scales (`self_attn.k_scale`, shape [1], BF16).
#[test]
fn compressed_tensors_fp8_dynamic_channel_scales_and_ignore() {
    let t = Tiny {
        bf16: true,
        ..Tiny::default()
    };
    let ignore = json!([
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "re:.*layers\\.2\\.self_attn\\.[qk]_proj$",
        "re:vision_tower.*",
        "re:model\\.vision_tower.*"
    ]);
    let dense = |n: &str| {
        n == "layers.0.mlp.down_proj.weight"
            || n == "layers.2.self_attn.q_proj.weight"
            || n == "layers.2.self_attn.k_proj.weight"
    };
    let mut tensors = prefixed(
        tiny_fp8_tensors(&t, 2, Fp8Format::CompressedTensors, &dense),
        "model.",
    );
    tensors.push(lm_head(&t, 2));
    tensors.push(RawTensor::new(
        "model.layers.1.self_attn.k_scale",
        vec![1],
        Stored::Bf16(vec![0.25]),
    ));
    tensors.push(RawTensor::new(
        "model.layers.1.self_attn.v_scale",
        vec![1],
        Stored::Bf16(vec![0.5]),
    ));
    let mut config = tiny_text_config(&t);
    config["tie_word_embeddings"] = json!(false);
    config["quantization_config"] = ct_config(ignore, "channel", true);
    let dir = tempfile::tempdir().unwrap();
    write_raw_checkpoint(dir.path(), &config, &tensors);
    let m = Model::load(dir.path()).unwrap();
    assert!(matches!(
        m.quant,
        CheckpointQuant::CompressedTensorsFp8Dynamic { .. }
    ));
    assert!(m.kv_cache_fp8);
    for (node, module, [out, _]) in layer_linears(&t) {
        if dense(&format!("{module}.weight")) {
            assert_dense(&m, &node, &module);
            continue;
        }
        let (w, s) = linear(&m, &node);
        assert_eq!(
            s,
            QuantScheme::Fp8Dynamic {
                weight_scale: format!("{module}.weight_scale")
            },
            "{node}"
        );
        assert_eq!(m.weights[&w].dtype, DType::F8E4M3);
        let sw = &m.weights[&format!("{module}.weight_scale")];
        assert_eq!((sw.dtype, sw.shape.clone()), (DType::BF16, vec![out, 1]));
    }
    assert_dense(&m, "logits", "lm_head");
    let kv = &m.weights["layers.1.self_attn.k_scale"];
    assert_eq!(
        (kv.dtype, kv.shape.clone(), kv.to_f32()),
        (DType::BF16, vec![1], vec![0.25])
    );
    assert_eq!(m.weights["layers.1.self_attn.v_scale"].to_f32(), vec![0.5]);
    assert_eq!(m.weights["layers.0.self_attn.k_scale"].to_f32(), vec![1.0]);
    assert_eq!(m.weights["layers.2.self_attn.v_scale"].to_f32(), vec![1.0]);
}

fn ct_config(ignore: Value, weight_strategy: &str, act_dynamic: bool) -> Value {
    json!({
        "config_groups": {"group_0": {
            "format": "float-quantized",
            "input_activations": {"actorder": null, "block_structure": null, "dynamic": act_dynamic,
                "group_size": null, "num_bits": 8, "observer": null, "observer_kwargs": {},
                "strategy": "token", "symmetric": true, "type": "float"},
            "output_activations": null, "targets": ["Linear"],
            "weights": {"actorder": null, "block_structure": null, "dynamic": false, "group_size": null,
                "num_bits": 8, "observer": "minmax", "observer_kwargs": {}, "strategy": weight_strategy,
                "symmetric": true, "type": "float"}}},
        "format": "float-quantized", "global_compression_ratio": null, "ignore": ignore,
        "kv_cache_scheme": {"dynamic": false, "num_bits": 8, "strategy": "tensor", "symmetric": true, "type": "float"},
        "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.12.2"
    })
}

/// C: ModelOpt FP8_PB_WO (lowercase `fp8_pb_wo`, config.json only) on a model wider than one 128 block:
/// 4-D `[ob,1,ib,1]` and 2-D `[ob,ib]` scales both accepted, seen as `[ob, ib]` in the weight map.
#[test]
fn modelopt_fp8_pb_wo_block_scales() {
    let t = Tiny {
        hidden: 160,
        inter: 272,
        bf16: true,
        ..Tiny::default()
    };
    let mut tensors = prefixed(
        tiny_fp8_tensors(&t, 3, Fp8Format::ModelOptPbWo, &|_| false),
        "model.",
    );
    // One scale stored already squeezed to [ob, ib].
    let i = tensors
        .iter()
        .position(|r| r.name == "model.layers.0.mlp.gate_proj.weight_scale")
        .unwrap();
    tensors[i].shape = vec![3, 2];
    let mut config = tiny_text_config(&t);
    config["quantization_config"] = json!({"quant_method": "modelopt", "quant_algo": "fp8_pb_wo",
        "ignore": ["lm_head"], "kv_cache_scheme": null, "producer": {"name": "modelopt", "version": "0.39.0"}});
    let dir = tempfile::tempdir().unwrap();
    write_raw_checkpoint(dir.path(), &config, &tensors);
    let m = Model::load(dir.path()).unwrap();
    assert!(matches!(
        m.quant,
        CheckpointQuant::ModelOptFp8PbWo {
            block: [128, 128],
            ..
        }
    ));
    assert!(!m.kv_cache_fp8);
    for (node, module, [out, inp]) in layer_linears(&t) {
        let (w, s) = linear(&m, &node);
        assert_eq!(
            s,
            QuantScheme::Fp8BlockWeightOnly {
                weight_scale: format!("{module}.weight_scale"),
                block: [128, 128]
            },
            "{node}"
        );
        assert_eq!(m.weights[&w].dtype, DType::F8E4M3);
        let sw = &m.weights[&format!("{module}.weight_scale")];
        assert_eq!(
            (sw.dtype, sw.shape.clone()),
            (DType::F32, vec![out.div_ceil(128), inp.div_ceil(128)]),
            "{module}"
        );
    }
    assert_eq!(
        m.weights["layers.1.mlp.down_proj.weight_scale"].shape,
        vec![2, 3]
    );
    // Tied lm_head: the BF16 embedding, dense. KV scales default to 1.0.
    assert!(m.tied_lm_head);
    assert_eq!(linear(&m, "logits").1, QuantScheme::Dense);
    assert_eq!(m.weights["layers.2.self_attn.k_scale"].to_f32(), vec![1.0]);
}

/// D: FineGrainedFP8 with a non-square, non-dividing block, `modules_to_not_convert` by substring, and
/// lm_head always dense.
#[test]
fn fine_grained_fp8_block_scales_and_not_convert() {
    let t = Tiny {
        bf16: true,
        ..Tiny::default()
    };
    let block = [16, 24];
    let dense = |n: &str| n.starts_with("layers.1.self_attn.o_proj");
    let mut tensors = prefixed(
        tiny_fp8_tensors(&t, 4, Fp8Format::FineGrained { block }, &dense),
        "model.",
    );
    tensors.push(lm_head(&t, 4));
    // One scale in BF16 (accepted next to F32).
    let i = tensors
        .iter()
        .position(|r| r.name == "model.layers.2.mlp.up_proj.weight_scale_inv")
        .unwrap();
    if let Stored::F32(v) = tensors[i].data.clone() {
        tensors[i].data = Stored::Bf16(v);
    }
    let mut config = tiny_text_config(&t);
    config["tie_word_embeddings"] = json!(false);
    config["quantization_config"] = json!({"activation_scheme": "dynamic", "fmt": "e4m3",
        "quant_method": "fp8", "weight_block_size": block, "modules_to_not_convert": ["layers.1.self_attn.o_proj"]});
    let dir = tempfile::tempdir().unwrap();
    write_raw_checkpoint(dir.path(), &config, &tensors);
    let m = Model::load(dir.path()).unwrap();
    assert!(matches!(
        m.quant,
        CheckpointQuant::FineGrainedFp8 {
            block: [16, 24],
            ..
        }
    ));
    for (node, module, [out, inp]) in layer_linears(&t) {
        if dense(&module) {
            assert_dense(&m, &node, &module);
            continue;
        }
        let (w, s) = linear(&m, &node);
        assert_eq!(
            s,
            QuantScheme::Fp8Block {
                weight_scale_inv: format!("{module}.weight_scale_inv"),
                block
            },
            "{node}"
        );
        assert_eq!(m.weights[&w].dtype, DType::F8E4M3);
        let sw = &m.weights[&format!("{module}.weight_scale_inv")];
        assert_eq!(
            sw.shape,
            vec![out.div_ceil(16), inp.div_ceil(24)],
            "{module}"
        );
    }
    // k_proj [16, 32] -> [1, 2]; down_proj [32, 48] -> [2, 2].
    assert_eq!(
        m.weights["layers.0.self_attn.k_proj.weight_scale_inv"].shape,
        vec![1, 2]
    );
    assert_eq!(
        m.weights["layers.0.mlp.down_proj.weight_scale_inv"].shape,
        vec![2, 2]
    );
    assert_eq!(
        m.weights["layers.2.mlp.up_proj.weight_scale_inv"].dtype,
        DType::BF16
    );
    assert_dense(&m, "logits", "lm_head");
    assert!(!m.kv_cache_fp8);
    assert_eq!(m.weights["layers.0.self_attn.v_scale"].to_f32(), vec![1.0]);
}

/// A plain BF16 checkpoint: no quantization detected, every Linear dense, no KV scales added.
#[test]
fn unquantized_checkpoint_is_all_dense() {
    let t = Tiny::default();
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), &t, 5);
    let m = Model::load(dir.path()).unwrap();
    assert!(matches!(m.quant, CheckpointQuant::None));
    assert!(m.linear_schemes.values().all(|s| *s == QuantScheme::Dense));
    assert_eq!(m.linear_schemes.len(), 3 * 7 + 1);
    assert!(!m.weights.keys().any(|k| k.ends_with("_scale")));
}

#[test]
fn bad_fp8_checkpoints_are_errors_naming_the_file_tensor_or_field() {
    let t = Tiny {
        bf16: true,
        ..Tiny::default()
    };
    let write = |config: &Value, tensors: &[RawTensor]| {
        let dir = tempfile::tempdir().unwrap();
        write_raw_checkpoint(dir.path(), config, tensors);
        dir
    };
    let expect = |dir: &tempfile::TempDir, want: &[&str]| {
        let e = load_err(dir.path());
        for w in want {
            assert!(e.contains(w), "expected `{w}` in: {e}");
        }
    };
    let ct = prefixed(
        tiny_fp8_tensors(&t, 6, Fp8Format::CompressedTensors, &|_| false),
        "model.",
    );
    let mo = prefixed(
        tiny_fp8_tensors(&t, 6, Fp8Format::ModelOpt, &|_| false),
        "model.",
    );
    let with_qc = |qc: Value| {
        let mut c = tiny_text_config(&t);
        c["quantization_config"] = qc;
        c
    };

    // Unknown quant_method.
    let d = write(&with_qc(json!({"quant_method": "gptq", "bits": 4})), &ct);
    expect(
        &d,
        &["config.json", "quantization_config.quant_method", "gptq"],
    );
    // Unknown ModelOpt quant_algo in hf_quant_config.json.
    let d = write(&tiny_text_config(&t), &mo);
    write_json(
        d.path(),
        "hf_quant_config.json",
        &json!({"quantization": {"quant_algo": "NVFP4"}}),
    );
    expect(
        &d,
        &["hf_quant_config.json", "quantization.quant_algo", "NVFP4"],
    );

    // Scale of the wrong shape: [out] where [out, 1] belongs.
    let mut bad = ct.clone();
    let i = bad
        .iter()
        .position(|r| r.name == "model.layers.0.mlp.up_proj.weight_scale")
        .unwrap();
    bad[i].shape = vec![t.inter];
    let d = write(&with_qc(ct_config(json!([]), "channel", true)), &bad);
    expect(
        &d,
        &[
            "model.layers.0.mlp.up_proj.weight_scale",
            "expected shape [48, 1]",
            "found [48]",
        ],
    );

    // FP8 weight with no scale (ModelOpt without the input_scale of one shard).
    let missing: Vec<RawTensor> = mo
        .iter()
        .filter(|r| r.name != "model.layers.1.self_attn.v_proj.input_scale")
        .cloned()
        .collect();
    let mo_hq = json!({"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": null, "exclude_modules": ["lm_head"]}});
    let d = write(&tiny_text_config(&t), &missing);
    write_json(d.path(), "hf_quant_config.json", &mo_hq);
    expect(
        &d,
        &[
            "model.layers.1.self_attn.v_proj.input_scale",
            "missing",
            "model.layers.1.self_attn.v_proj.weight",
        ],
    );

    // A module that is excluded but stored in FP8, and a quantized one stored in BF16.
    let d = write(&tiny_text_config(&t), &mo);
    write_json(
        d.path(),
        "hf_quant_config.json",
        &json!({"quantization": {"quant_algo": "FP8", "exclude_modules": ["model.layers.2.mlp*"]}}),
    );
    expect(
        &d,
        &[
            "model.layers.2.mlp.down_proj.weight",
            "found F8_E4M3",
            "excluded by `model.layers.2.mlp*`",
        ],
    );
    let half_dense = prefixed(
        tiny_fp8_tensors(&t, 6, Fp8Format::ModelOpt, &|n| n.starts_with("layers.0.")),
        "model.",
    );
    let d = write(&tiny_text_config(&t), &half_dense);
    write_json(d.path(), "hf_quant_config.json", &mo_hq);
    expect(
        &d,
        &[
            "model.layers.0.mlp.down_proj.weight",
            "expected dtype F8_E4M3",
            "found BF16",
        ],
    );

    // An unexpected tensor next to an FP8 weight.
    let mut extra = ct.clone();
    extra.push(RawTensor::new(
        "model.layers.0.mlp.up_proj.weight_zero_point",
        vec![t.inter, 1],
        Stored::Bf16(vec![0.0; t.inter]),
    ));
    let d = write(&with_qc(ct_config(json!([]), "channel", true)), &extra);
    expect(
        &d,
        &["model.layers.0.mlp.up_proj.weight_zero_point", "unexpected"],
    );

    // Malformed `re:` regex (the old Gemma 3 llm-compressor example's `re:*.lm_head`).
    let d = write(
        &with_qc(ct_config(
            json!(["lm_head", "re:*.lm_head"]),
            "channel",
            true,
        )),
        &ct,
    );
    expect(
        &d,
        &[
            "config.json",
            "quantization_config.ignore[1]",
            "re:*.lm_head",
            "malformed regex",
        ],
    );

    // Unsupported compressed-tensors schemes.
    let d = write(&with_qc(ct_config(json!([]), "tensor", true)), &ct);
    expect(
        &d,
        &[
            "config.json",
            "quantization_config.config_groups.group_0.weights.strategy",
            "unsupported compressed-tensors scheme",
            "tensor",
        ],
    );
    let d = write(&with_qc(ct_config(json!([]), "channel", false)), &ct);
    expect(
        &d,
        &[
            "config_groups.group_0.input_activations.dynamic",
            "unsupported compressed-tensors scheme",
        ],
    );

    // FineGrained scale of the wrong shape, and a block size missing.
    let fg = prefixed(
        tiny_fp8_tensors(&t, 6, Fp8Format::FineGrained { block: [16, 16] }, &|_| {
            false
        }),
        "model.",
    );
    let qc = json!({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 32]});
    let d = write(&with_qc(qc), &fg);
    expect(
        &d,
        &[
            "model.layers.0.mlp.down_proj.weight_scale_inv",
            "expected shape [2, 2]",
            "found [2, 3]",
        ],
    );
    let d = write(
        &with_qc(json!({"quant_method": "fp8", "activation_scheme": "dynamic"})),
        &fg,
    );
    expect(
        &d,
        &["config.json", "quantization_config.weight_block_size"],
    );

    // A KV scale that is not one value.
    let mut kv = ct.clone();
    kv.push(RawTensor::new(
        "model.layers.0.self_attn.k_scale",
        vec![2],
        Stored::Bf16(vec![1.0, 1.0]),
    ));
    let d = write(&with_qc(ct_config(json!([]), "channel", true)), &kv);
    expect(&d, &["model.layers.0.self_attn.k_scale", "found [2]"]);
}
