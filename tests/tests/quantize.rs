//! `e4m3 quantize` on tiny random Gemma 3 checkpoints: every scheme's tensors (names, dtypes, shapes), codes
//! and scales recomputed independently here, config files, calibration (input and KV scales against taps
//! recomputed here), MSE weight calibration, --ignore, non-dividing block shapes and errors.

use std::collections::BTreeMap;
use std::path::Path;

use e4m3_core::backend::{Batch, LogitsFor};
use e4m3_core::fp8::{decode, encode};
use e4m3_core::model::Model;
use e4m3_core::quantize::{quantize, CalibSource, QuantizeOptions, Scheme, WeightCalib};
use e4m3_tests::{
    cpu_runner, read_json, tiny_tensors, write_tiny, write_word_tokenizer, Tiny, LINEARS,
};
use serde_json::{json, Value};

/// hidden 40, intermediate 72, q 40, kv 8: nothing divides 32, 64 or 128.
fn odd_tiny() -> Tiny {
    Tiny {
        vocab: 64,
        hidden: 40,
        inter: 72,
        heads: 5,
        kv_heads: 1,
        head_dim: 8,
        bf16: true,
        ..Tiny::default()
    }
}

struct Tensor {
    dtype: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Tensor {
    fn f32s(&self) -> Vec<f32> {
        match self.dtype.as_str() {
            "F32" => self
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "BF16" => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            d => panic!("f32s of {d}"),
        }
    }
}

fn read_out(dir: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                Tensor {
                    dtype: format!("{:?}", v.dtype()),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                },
            )
        })
        .collect()
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Source weights as stored (bf16-rounded), by canonical name.
fn source(t: &Tiny, seed: u64) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    tiny_tensors(t, seed)
        .into_iter()
        .map(|(n, s, v)| {
            let v = if t.bf16 {
                v.into_iter().map(bf16).collect()
            } else {
                v
            };
            (n, (s, v))
        })
        .collect()
}

/// Group edges (rows, cols) of a scheme's scales for a [rows, cols] weight.
fn group_shape(scheme: Scheme, rows: usize, cols: usize, block: usize) -> (usize, usize) {
    match scheme {
        Scheme::Fp8Static => (rows, cols),
        Scheme::Fp8Dynamic => (1, cols),
        _ => (block.min(rows), block.min(cols)),
    }
}

/// Elements of every group, row-major over the grid, recomputed here.
fn groups(w: &[f32], rows: usize, cols: usize, g: (usize, usize)) -> Vec<Vec<f32>> {
    let (gr, gc) = (rows.div_ceil(g.0), cols.div_ceil(g.1));
    let mut out = vec![Vec::new(); gr * gc];
    for r in 0..rows {
        for c in 0..cols {
            out[(r / g.0) * gc + c / g.1].push(w[r * cols + c]);
        }
    }
    out
}

fn sq_err(vals: &[f32], s: f32) -> f64 {
    vals.iter()
        .map(|&w| ((w - decode(encode(w / s)) * s) as f64).powi(2))
        .sum()
}

/// The expected scale name, dtype and shape of a quantized module's weight scale.
fn scale_tensor(
    scheme: Scheme,
    rows: usize,
    cols: usize,
    block: usize,
) -> (&'static str, &'static str, Vec<usize>) {
    let (ob, ib) = (rows.div_ceil(block.max(1)), cols.div_ceil(block.max(1)));
    match scheme {
        Scheme::Fp8Static => ("weight_scale", "F32", vec![]),
        Scheme::Fp8Dynamic => ("weight_scale", "BF16", vec![rows, 1]),
        Scheme::Fp8BlockWo => ("weight_scale", "F32", vec![ob, 1, ib, 1]),
        Scheme::Fp8Block => ("weight_scale_inv", "F32", vec![ob, ib]),
    }
}

/// Checks every Linear of the output against the source: quantized ones (F8 codes = encode(W / s) for the
/// group's stored scale; `max`: s = amax/448, zero group rule; `mse`: error <= the max-scale error), ignored
/// ones byte-identical BF16; every other tensor byte-identical. Returns (groups, groups strictly better than max).
fn check_weights(
    out: &BTreeMap<String, Tensor>,
    src: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    layers: usize,
    scheme: Scheme,
    block: usize,
    calib: WeightCalib,
    ignored: &[&str],
) -> (usize, usize) {
    let (mut n_groups, mut better) = (0, 0);
    for l in 0..layers {
        for lin in LINEARS {
            let canon = format!("layers.{l}.{lin}");
            let p = format!("model.{canon}");
            let (shape, w) = &src[&format!("{canon}.weight")];
            let (rows, cols) = (shape[0], shape[1]);
            let wt = &out[&format!("{p}.weight")];
            if ignored.contains(&canon.as_str()) {
                assert_eq!(wt.dtype, "BF16", "{p} ignored stays BF16");
                assert_eq!(&wt.f32s(), w);
                for s in ["weight_scale", "weight_scale_inv", "input_scale"] {
                    assert!(!out.contains_key(&format!("{p}.{s}")), "{p}.{s}");
                }
                continue;
            }
            assert_eq!(
                (wt.dtype.as_str(), &wt.shape),
                ("F8_E4M3", &vec![rows, cols]),
                "{p}"
            );
            let (sname, sdtype, sshape) = scale_tensor(scheme, rows, cols, block);
            let st = &out[&format!("{p}.{sname}")];
            assert_eq!(
                (st.dtype.as_str(), &st.shape),
                (sdtype, &sshape),
                "{p}.{sname}"
            );
            let other = if sname == "weight_scale" {
                "weight_scale_inv"
            } else {
                "weight_scale"
            };
            assert!(!out.contains_key(&format!("{p}.{other}")));
            assert_eq!(
                out.contains_key(&format!("{p}.input_scale")),
                scheme == Scheme::Fp8Static,
                "{p}.input_scale"
            );
            let scales = st.f32s();
            let g = group_shape(scheme, rows, cols, block);
            let gs = groups(w, rows, cols, g);
            assert_eq!(scales.len(), gs.len(), "{p}: one scale per group");
            for (gi, vals) in gs.iter().enumerate() {
                let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                let round = |x: f32| if sdtype == "BF16" { bf16(x) } else { x };
                let max_scale = if amax == 0.0 {
                    if scheme == Scheme::Fp8Dynamic {
                        bf16(f32::EPSILON)
                    } else {
                        1.0
                    }
                } else {
                    round(amax / 448.0)
                };
                let s = scales[gi];
                match calib {
                    WeightCalib::Max => assert_eq!(s, max_scale, "{p} group {gi}: amax {amax}"),
                    WeightCalib::Mse => {
                        assert!(
                            s >= round(max_scale * 0.5) && s <= max_scale,
                            "{p} {gi}: {s}"
                        );
                        let (e, em) = (sq_err(vals, s), sq_err(vals, max_scale));
                        assert!(e <= em, "{p} group {gi}: mse {e} > max {em}");
                        better += usize::from(e < em);
                    }
                }
                n_groups += 1;
            }
            // Codes, element by element.
            let gc = cols.div_ceil(g.1);
            for r in 0..rows {
                for c in 0..cols {
                    let s = scales[(r / g.0) * gc + c / g.1];
                    let x = w[r * cols + c];
                    assert_eq!(
                        wt.bytes[r * cols + c],
                        encode(x / s),
                        "{p}[{r},{c}] = {x} / {s}"
                    );
                }
            }
        }
    }
    // Every non-Linear tensor is unchanged.
    for (name, (shape, v)) in src {
        if LINEARS.iter().any(|l| name.contains(l)) {
            continue;
        }
        let t = &out[&format!("model.{name}")];
        assert_eq!((t.dtype.as_str(), &t.shape), ("BF16", shape), "{name}");
        assert_eq!(&t.f32s(), v, "{name}");
    }
    (n_groups, better)
}

/// Amax of every tap over the calibration sequences, recomputed with the source model.
fn taps_amax(dir: &Path, seqs: &[Vec<u32>], layers: usize) -> BTreeMap<String, f32> {
    let model = Model::load(dir).unwrap();
    let mut taps = Vec::new();
    for l in 0..layers {
        for n in [
            "input_norm",
            "attn",
            "ffn_norm",
            "gelu_mul",
            "k_rope",
            "v_proj",
        ] {
            taps.push(format!("layers.{l}.{n}"));
        }
    }
    let mut amax = BTreeMap::new();
    for s in seqs {
        let mut r = cpu_runner(&model, 1, s.len());
        let o = r
            .step(&Batch::single(0, 0, s.clone(), LogitsFor::Last), &taps)
            .unwrap();
        for (n, m) in o.taps {
            let a = m.data.iter().fold(0f32, |a, v| a.max(v.abs()));
            let e = amax.entry(n).or_insert(0f32);
            *e = e.max(a);
        }
    }
    amax
}

fn calib_ids() -> Vec<Vec<u32>> {
    vec![
        vec![2, 5, 9, 33, 17, 60, 4, 4, 12],
        vec![2, 41, 7, 7, 63, 20],
        vec![2, 11, 30, 8, 19, 52, 3, 1, 27, 45, 6],
    ]
}

fn opts(scheme: Scheme) -> QuantizeOptions {
    let mut o = QuantizeOptions::new(scheme);
    o.calib = CalibSource::Ids(calib_ids());
    o.calib_batch = 2;
    o
}

fn scalar(out: &BTreeMap<String, Tensor>, name: &str, dtype: &str, shape: &[usize]) -> f32 {
    let t = out
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing; have {:?}", out.keys().collect::<Vec<_>>()));
    assert_eq!(
        (t.dtype.as_str(), t.shape.as_slice()),
        (dtype, shape),
        "{name}"
    );
    t.f32s()[0]
}

#[test]
fn fp8_static_modelopt_tensors_input_and_kv_scales_and_config() {
    let t = odd_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let (src_dir, out_dir) = (tmp.path().join("src"), tmp.path().join("out"));
    write_tiny(&src_dir, &t, 11);
    std::fs::write(
        src_dir.join("generation_config.json"),
        r#"{"eos_token_id": [1, 106]}"#,
    )
    .unwrap();
    write_word_tokenizer(&src_dir, t.vocab);
    let mut o = opts(Scheme::Fp8Static);
    o.kv_cache_fp8 = true;
    let rep = quantize(&src_dir, &out_dir, &o).unwrap();
    assert_eq!(rep.quantized.len(), 7 * t.full.len());
    assert_eq!((rep.calib_sequences, rep.calib_tokens), (3, 26));
    let out = read_out(&out_dir);
    let src = source(&t, 11);
    let layers = t.full.len();
    check_weights(
        &out,
        &src,
        layers,
        Scheme::Fp8Static,
        0,
        WeightCalib::Max,
        &[],
    );

    // Input scales: amax of the tapped Linear inputs / 448; q/k/v share the input_norm amax.
    let amax = taps_amax(&src_dir, &calib_ids(), layers);
    for l in 0..layers {
        for (lin, node) in [
            ("self_attn.q_proj", "input_norm"),
            ("self_attn.k_proj", "input_norm"),
            ("self_attn.v_proj", "input_norm"),
            ("self_attn.o_proj", "attn"),
            ("mlp.gate_proj", "ffn_norm"),
            ("mlp.up_proj", "ffn_norm"),
            ("mlp.down_proj", "gelu_mul"),
        ] {
            let a = amax[&format!("layers.{l}.{node}")];
            assert!(a > 0.0);
            let s = scalar(
                &out,
                &format!("model.layers.{l}.{lin}.input_scale"),
                "F32",
                &[],
            );
            assert_eq!(s, a / 448.0, "layer {l} {lin}");
        }
        // KV: ModelOpt names and its clamp to >= 1.0.
        for (kv, node) in [("k", "k_rope"), ("v", "v_proj")] {
            let s = scalar(
                &out,
                &format!("model.layers.{l}.self_attn.{kv}_proj.{kv}_scale"),
                "F32",
                &[],
            );
            assert_eq!(s, (amax[&format!("layers.{l}.{node}")] / 448.0).max(1.0));
        }
    }
    // Exactly the expected tensor set: source tensors + weight_scale + input_scale per Linear + 2 KV per layer.
    assert_eq!(out.len(), src.len() + 7 * layers * 2 + 2 * layers);

    let hf = read_json(&out_dir.join("hf_quant_config.json"));
    assert_eq!(hf["producer"]["name"], "modelopt");
    assert!(hf["producer"]["version"].is_string());
    assert_eq!(
        hf["quantization"],
        json!({"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]})
    );
    let cfg = read_json(&out_dir.join("config.json"));
    let q = &cfg["quantization_config"];
    assert_eq!(q["quant_method"], "modelopt");
    assert_eq!(q["quant_algo"], "FP8");
    assert_eq!(q["ignore"], json!(["lm_head"]));
    assert_eq!(
        q["kv_cache_scheme"],
        json!({"dynamic": false, "num_bits": 8, "type": "float"})
    );
    assert_eq!(
        q["config_groups"],
        json!({"group_0": {
            "input_activations": {"dynamic": false, "num_bits": 8, "type": "float"},
            "weights": {"dynamic": false, "num_bits": 8, "type": "float"},
            "targets": ["Linear"]}})
    );
    assert_eq!(q["producer"], hf["producer"]);
    // The rest of config.json is the source's.
    assert_eq!(cfg["hidden_size"], 40);
    assert_eq!(
        cfg["layer_types"],
        read_json(&src_dir.join("config.json"))["layer_types"]
    );
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out_dir.join(f)).unwrap(),
            std::fs::read(src_dir.join(f)).unwrap(),
            "{f} copied"
        );
    }
    // Without --kv-cache: no KV tensors, kv_cache_quant_algo null and no kv_cache_scheme.
    let out2 = tmp.path().join("out2");
    quantize(&src_dir, &out2, &opts(Scheme::Fp8Static)).unwrap();
    assert!(read_out(&out2)
        .keys()
        .all(|k| !k.ends_with("k_scale") && !k.ends_with("v_scale")));
    assert_eq!(
        read_json(&out2.join("hf_quant_config.json"))["quantization"]["kv_cache_quant_algo"],
        Value::Null
    );
    assert!(read_json(&out2.join("config.json"))["quantization_config"]
        .get("kv_cache_scheme")
        .is_none());
}

#[test]
fn fp8_dynamic_compressed_tensors_channel_scales_ignore_and_kv() {
    let t = odd_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let (src_dir, out_dir) = (tmp.path().join("src"), tmp.path().join("out"));
    write_tiny(&src_dir, &t, 12);
    let mut o = opts(Scheme::Fp8Dynamic);
    o.kv_cache_fp8 = true;
    o.ignore = vec![
        "*down_proj".into(),
        "model.layers.1.self_attn.q_proj".into(),
    ];
    let rep = quantize(&src_dir, &out_dir, &o).unwrap();
    let layers = t.full.len();
    let mut ignored: Vec<String> = (0..layers)
        .map(|l| format!("layers.{l}.mlp.down_proj"))
        .collect();
    ignored.push("layers.1.self_attn.q_proj".into());
    let ign: Vec<&str> = ignored.iter().map(|s| s.as_str()).collect();
    assert_eq!(rep.ignored.len(), ign.len());
    let out = read_out(&out_dir);
    check_weights(
        &out,
        &source(&t, 12),
        layers,
        Scheme::Fp8Dynamic,
        0,
        WeightCalib::Max,
        &ign,
    );

    let amax = taps_amax(&src_dir, &calib_ids(), layers);
    for l in 0..layers {
        for (kv, node) in [("k", "k_rope"), ("v", "v_proj")] {
            let s = scalar(
                &out,
                &format!("model.layers.{l}.self_attn.{kv}_scale"),
                "BF16",
                &[1],
            );
            assert_eq!(s, bf16(amax[&format!("layers.{l}.{node}")] / 448.0));
        }
    }
    assert!(!out.keys().any(|k| k.ends_with("input_scale")));
    assert!(!out_dir.join("hf_quant_config.json").exists());

    let q = &read_json(&out_dir.join("config.json"))["quantization_config"];
    let args = |strategy: &str, dynamic: bool, observer: Value| {
        json!({"actorder": null, "block_structure": null, "dynamic": dynamic, "group_size": null,
               "num_bits": 8, "observer": observer, "observer_kwargs": {}, "strategy": strategy,
               "symmetric": true, "type": "float"})
    };
    let mut expected_ignore = vec!["lm_head".to_string()];
    expected_ignore.extend((0..layers).map(|l| format!("model.layers.{l}.mlp.down_proj")));
    expected_ignore.push("model.layers.1.self_attn.q_proj".into());
    let mut got_ignore: Vec<String> = serde_json::from_value(q["ignore"].clone()).unwrap();
    got_ignore.sort();
    expected_ignore.sort();
    assert_eq!(got_ignore, expected_ignore);
    let mut q = q.clone();
    q.as_object_mut().unwrap().remove("ignore");
    assert!(q["version"].is_string());
    q.as_object_mut().unwrap().remove("version");
    assert_eq!(
        q,
        json!({
            "config_groups": {"group_0": {
                "format": "float-quantized",
                "input_activations": args("token", true, Value::Null),
                "output_activations": null,
                "targets": ["Linear"],
                "weights": args("channel", false, json!("minmax")),
            }},
            "format": "float-quantized",
            "global_compression_ratio": null,
            "kv_cache_scheme": args("tensor", false, json!("minmax")),
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
        })
    );
}

#[test]
fn fp8_block_wo_modelopt_4d_scales_on_non_dividing_shapes() {
    let t = odd_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let src_dir = tmp.path().join("src");
    write_tiny(&src_dir, &t, 13);
    let src = source(&t, 13);
    for block in [32, 64, 128] {
        let out_dir = tmp.path().join(format!("out{block}"));
        let mut o = opts(Scheme::Fp8BlockWo);
        o.block = block;
        o.ignore = vec!["layers.0.mlp.*".into()];
        quantize(&src_dir, &out_dir, &o).unwrap();
        let out = read_out(&out_dir);
        let ign = [
            "layers.0.mlp.gate_proj",
            "layers.0.mlp.up_proj",
            "layers.0.mlp.down_proj",
        ];
        check_weights(
            &out,
            &src,
            t.full.len(),
            Scheme::Fp8BlockWo,
            block,
            WeightCalib::Max,
            &ign,
        );
        if block == 32 {
            // gate_proj [72, 40] with 32x32 blocks: 3 x 2 scales, 4-D.
            assert_eq!(
                out["model.layers.1.mlp.gate_proj.weight_scale"].shape,
                vec![3, 1, 2, 1]
            );
        }
        assert!(!out.keys().any(|k| k.ends_with("input_scale")));
        let hf = read_json(&out_dir.join("hf_quant_config.json"));
        assert_eq!(hf["quantization"]["quant_algo"], "fp8_pb_wo");
        assert_eq!(hf["quantization"]["kv_cache_quant_algo"], Value::Null);
        assert_eq!(
            hf["quantization"]["exclude_modules"],
            json!([
                "lm_head",
                "model.layers.0.mlp.down_proj",
                "model.layers.0.mlp.gate_proj",
                "model.layers.0.mlp.up_proj"
            ])
        );
        let q = &read_json(&out_dir.join("config.json"))["quantization_config"];
        assert_eq!(q["quant_method"], "modelopt");
        assert_eq!(q["quant_algo"], "fp8_pb_wo");
        assert_eq!(q["ignore"], hf["quantization"]["exclude_modules"]);
        assert!(q.get("config_groups").is_none() && q.get("kv_cache_scheme").is_none());
    }
}

#[test]
fn fp8_block_finegrained_scale_inv_partial_blocks_and_kv() {
    let t = odd_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let src_dir = tmp.path().join("src");
    write_tiny(&src_dir, &t, 14);
    let src = source(&t, 14);
    for block in [32, 64, 128] {
        let out_dir = tmp.path().join(format!("out{block}"));
        let mut o = opts(Scheme::Fp8Block);
        o.block = block;
        o.kv_cache_fp8 = true;
        o.ignore = vec!["model.layers.2.self_attn.o_proj".into()];
        quantize(&src_dir, &out_dir, &o).unwrap();
        let out = read_out(&out_dir);
        check_weights(
            &out,
            &src,
            t.full.len(),
            Scheme::Fp8Block,
            block,
            WeightCalib::Max,
            &["layers.2.self_attn.o_proj"],
        );
        if block == 32 {
            assert_eq!(
                out["model.layers.0.mlp.down_proj.weight_scale_inv"].shape,
                vec![2, 3]
            );
            assert_eq!(
                out["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape,
                vec![1, 2]
            );
        }
        let amax = taps_amax(&src_dir, &calib_ids(), t.full.len());
        for l in 0..t.full.len() {
            let s = scalar(
                &out,
                &format!("model.layers.{l}.self_attn.k_scale"),
                "F32",
                &[],
            );
            assert_eq!(s, amax[&format!("layers.{l}.k_rope")] / 448.0);
            let s = scalar(
                &out,
                &format!("model.layers.{l}.self_attn.v_scale"),
                "F32",
                &[],
            );
            assert_eq!(s, amax[&format!("layers.{l}.v_proj")] / 448.0);
        }
        assert!(!out_dir.join("hf_quant_config.json").exists());
        assert_eq!(
            read_json(&out_dir.join("config.json"))["quantization_config"],
            json!({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [block, block],
                   "modules_to_not_convert": ["lm_head", "model.layers.2.self_attn.o_proj"]})
        );
    }
}

#[test]
fn mse_weight_calibration_never_worse_than_max_and_better_somewhere() {
    let t = Tiny {
        bf16: true,
        ..Tiny::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let src_dir = tmp.path().join("src");
    write_tiny(&src_dir, &t, 15);
    let src = source(&t, 15);
    for scheme in [
        Scheme::Fp8Static,
        Scheme::Fp8Dynamic,
        Scheme::Fp8BlockWo,
        Scheme::Fp8Block,
    ] {
        let out_dir = tmp.path().join(scheme.name());
        let mut o = opts(scheme);
        o.block = 16;
        o.weight_calib = WeightCalib::Mse;
        quantize(&src_dir, &out_dir, &o).unwrap();
        let (n, better) = check_weights(
            &read_out(&out_dir),
            &src,
            t.full.len(),
            scheme,
            16,
            WeightCalib::Mse,
            &[],
        );
        assert!(
            n > 0 && better > 0,
            "{}: {better} of {n} groups better than max",
            scheme.name()
        );
    }
}

#[test]
fn zero_weight_groups_get_finite_scales_and_zero_codes() {
    let t = Tiny {
        bf16: true,
        ..Tiny::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let src_dir = tmp.path().join("src");
    let mut tensors = tiny_tensors(&t, 16);
    for (n, _, v) in tensors.iter_mut() {
        if n == "layers.0.self_attn.k_proj.weight" {
            v.iter_mut().for_each(|x| *x = 0.0);
        }
    }
    e4m3_tests::write_checkpoint(
        &src_dir,
        &e4m3_tests::tiny_text_config(&t),
        &tensors,
        "model.",
        true,
    );
    for scheme in [
        Scheme::Fp8Static,
        Scheme::Fp8Dynamic,
        Scheme::Fp8BlockWo,
        Scheme::Fp8Block,
    ] {
        let out_dir = tmp.path().join(scheme.name());
        let mut o = opts(scheme);
        o.block = 8;
        quantize(&src_dir, &out_dir, &o).unwrap();
        let out = read_out(&out_dir);
        let p = "model.layers.0.self_attn.k_proj";
        assert!(out[&format!("{p}.weight")].bytes.iter().all(|&b| b == 0));
        let name = if scheme == Scheme::Fp8Block {
            "weight_scale_inv"
        } else {
            "weight_scale"
        };
        let s = out[&format!("{p}.{name}")].f32s();
        let want = if scheme == Scheme::Fp8Dynamic {
            bf16(f32::EPSILON)
        } else {
            1.0
        };
        assert!(s.iter().all(|&x| x == want), "{}: {s:?}", scheme.name());
    }
}

#[test]
fn calibration_text_is_tokenized_with_the_source_tokenizer() {
    let t = Tiny {
        bf16: true,
        ..Tiny::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let src_dir = tmp.path().join("src");
    write_tiny(&src_dir, &t, 17);
    write_word_tokenizer(&src_dir, t.vocab);
    let words: Vec<String> = (0..23).map(|i| format!("w{}", 4 + (i * 7) % 60)).collect();
    let calib = tmp.path().join("calib.txt");
    std::fs::write(&calib, words.join(" ")).unwrap();
    let mut o = QuantizeOptions::new(Scheme::Fp8Static);
    o.calib = CalibSource::File(calib.clone());
    o.samples = 3;
    o.seq_len = 8;
    let out_dir = tmp.path().join("out");
    let rep = quantize(&src_dir, &out_dir, &o).unwrap();
    // 23 words cut into 7-token chunks, each after a BOS: 3 sequences of 8 (the 4th chunk is over --samples).
    let ids: Vec<u32> = words.iter().map(|w| w[1..].parse().unwrap()).collect();
    let seqs: Vec<Vec<u32>> = ids
        .chunks(7)
        .take(3)
        .map(|c| [&[2u32][..], c].concat())
        .collect();
    assert_eq!((rep.calib_sequences, rep.calib_tokens), (3, 24));
    let amax = taps_amax(&src_dir, &seqs, t.full.len());
    let out = read_out(&out_dir);
    for l in 0..t.full.len() {
        let s = scalar(
            &out,
            &format!("model.layers.{l}.mlp.down_proj.input_scale"),
            "F32",
            &[],
        );
        assert_eq!(s, amax[&format!("layers.{l}.gelu_mul")] / 448.0);
    }
    // The default calibration text works too (shipped with the project).
    let mut o = QuantizeOptions::new(Scheme::Fp8Static);
    o.samples = 2;
    o.seq_len = 16;
    let rep = quantize(&src_dir, &tmp.path().join("out-default"), &o).unwrap();
    assert_eq!((rep.calib_sequences, rep.calib_tokens), (2, 32));
}

#[test]
fn errors_name_the_file_tensor_or_field() {
    let t = Tiny {
        bf16: true,
        ..Tiny::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let src_dir = tmp.path().join("src");
    write_tiny(&src_dir, &t, 18);
    write_word_tokenizer(&src_dir, t.vocab);
    let err = |from: &Path, o: &QuantizeOptions| {
        quantize(from, &tmp.path().join("bad"), o)
            .unwrap_err()
            .to_string()
    };
    let e = err(&tmp.path().join("nope"), &opts(Scheme::Fp8Dynamic));
    assert!(e.contains("nope") && e.contains("not found"), "{e}");
    assert!("fp8-int4"
        .parse::<Scheme>()
        .unwrap_err()
        .to_string()
        .contains("unknown scheme `fp8-int4`"));
    let mut o = opts(Scheme::Fp8Block);
    o.block = 0;
    assert!(err(&src_dir, &o).contains("--block"));
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let mut o = opts(Scheme::Fp8Static);
    o.calib = CalibSource::File(empty.clone());
    let e = err(&src_dir, &o);
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    o.calib = CalibSource::File(tmp.path().join("missing.txt"));
    assert!(err(&src_dir, &o).contains("missing.txt"));
    let mut o = opts(Scheme::Fp8Dynamic);
    o.ignore = vec!["*no_such_proj".into()];
    assert!(err(&src_dir, &o).contains("*no_such_proj"));
    // An FP8 source is refused: by its quantization_config, and by its F8 tensors when the config lacks one.
    let q = tmp.path().join("q");
    quantize(&src_dir, &q, &opts(Scheme::Fp8Dynamic)).unwrap();
    let e = err(&q, &opts(Scheme::Fp8Block));
    assert!(
        e.contains("quantization_config") && e.contains("compressed-tensors"),
        "{e}"
    );
    std::fs::copy(src_dir.join("config.json"), q.join("config.json")).unwrap();
    let e = err(&q, &opts(Scheme::Fp8Block));
    assert!(e.contains("F8_E4M3") && e.contains("model.layers.0"), "{e}");
    // Same directory in and out.
    let e = quantize(&src_dir, &src_dir, &opts(Scheme::Fp8Block))
        .unwrap_err()
        .to_string();
    assert!(e.contains("differ"), "{e}");
}
