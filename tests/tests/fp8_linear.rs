//! The FP8 linear arithmetic of the CPU backend against an independent torch reference
//! (tools/make_fp8_linear_fixtures.py: torch float8_e4m3fn casts, float64 matmuls), for every scheme:
//! activation scales and codes equal, outputs within 1e-6 of the sum of |terms|, zero groups exact zeros,
//! the same results through `CpuBackend`, and bad scale tensors rejected by name.

use e4m3_core::backend::{Backend, Batch, CacheConfig, LogitsFor};
use e4m3_core::checkpoint::Checkpoint;
use e4m3_core::cpu::fp8_linear::{
    linear_fp8, quantize_per_token, quantize_per_token_group, quantize_static,
};
use e4m3_core::cpu::CpuBackend;
use e4m3_core::fp8::decode;
use e4m3_core::graph::{Graph, Op, QuantScheme, WeightMap};
use e4m3_core::tensor::Mat;
use serde_json::Value;

struct Case {
    name: String,
    scheme: String,
    block: [usize; 2],
    t: usize,
    n: usize,
    k: usize,
    x: Vec<f32>,
    w: Vec<u8>,
    json: Value,
    y: Vec<f64>,
    yabs: Vec<f64>,
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn cases() -> Vec<Case> {
    let path = e4m3_tests::fixture("fp8-linear/cases.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let u = |k: &str| c[k].as_u64().unwrap() as usize;
            let xs = c["x"].as_str().unwrap();
            let x = (0..xs.len())
                .step_by(4)
                .map(|i| {
                    f32::from_bits((u16::from_str_radix(&xs[i..i + 4], 16).unwrap() as u32) << 16)
                })
                .collect();
            let block = c
                .get("block")
                .map(|b| {
                    [
                        b[0].as_u64().unwrap() as usize,
                        b[1].as_u64().unwrap() as usize,
                    ]
                })
                .unwrap_or([0, 0]);
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                scheme: c["scheme"].as_str().unwrap().to_string(),
                block,
                t: u("t"),
                n: u("n"),
                k: u("k"),
                x,
                w: hex_bytes(c["w"].as_str().unwrap()),
                y: f64s(&c["y"]),
                yabs: f64s(&c["yabs"]),
                json: c.clone(),
            }
        })
        .collect()
}

/// Named tensors written to a safetensors file and opened as a checkpoint (the way real F8 weights load).
fn weight_map(tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) -> WeightMap {
    let dir = tempfile::tempdir().unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    Checkpoint::open(dir.path()).unwrap().tensors
}

fn scale_tensor(name: &str, j: &Value) -> (String, safetensors::Dtype, Vec<usize>, Vec<u8>) {
    let shape: Vec<usize> = j["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let vals: Vec<f32> = f64s(&j["values"]).iter().map(|&v| v as f32).collect();
    let (dt, bytes): (_, Vec<u8>) = match j["dtype"].as_str().unwrap() {
        "F32" => (
            safetensors::Dtype::F32,
            vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        "BF16" => (
            safetensors::Dtype::BF16,
            vals.iter()
                .flat_map(|v| {
                    let b = half::bf16::from_f32(*v);
                    assert_eq!(b.to_f32(), *v, "fixture bf16 scale is exact");
                    b.to_le_bytes()
                })
                .collect(),
        ),
        d => panic!("dtype {d}"),
    };
    (name.to_string(), dt, shape, bytes)
}

/// The weight map and scheme of a case: weight `w`, scales `w_scale` / `x_scale`.
fn setup(c: &Case) -> (WeightMap, QuantScheme) {
    let mut t = vec![(
        "w".to_string(),
        safetensors::Dtype::F8_E4M3,
        vec![c.n, c.k],
        c.w.clone(),
    )];
    t.push(scale_tensor("w_scale", &c.json["weight_scale"]));
    let scheme = match c.scheme.as_str() {
        "static" => {
            t.push(scale_tensor("x_scale", &c.json["input_scale"]));
            QuantScheme::Fp8Static {
                weight_scale: "w_scale".into(),
                input_scale: "x_scale".into(),
            }
        }
        "dynamic" => QuantScheme::Fp8Dynamic {
            weight_scale: "w_scale".into(),
        },
        "block_wo" => QuantScheme::Fp8BlockWeightOnly {
            weight_scale: "w_scale".into(),
            block: c.block,
        },
        "block" => QuantScheme::Fp8Block {
            weight_scale_inv: "w_scale".into(),
            block: c.block,
        },
        s => panic!("scheme {s}"),
    };
    (weight_map(&t), scheme)
}

/// Is `v` exactly halfway between two adjacent E4M3 values (where only the tie rule decides)?
fn is_tie(v: f32) -> bool {
    let a = v.abs();
    if a.is_nan() || a >= 448.0 {
        return false;
    }
    (0u8..0x7E).any(|c| (decode(c) + decode(c + 1)) / 2.0 == a)
}

/// The pre-rounding value x/s (or x*(1/s)) of every activation, as the kernels compute it.
fn prerounded(c: &Case, scales: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(c.x.len());
    for (i, &x) in c.x.iter().enumerate() {
        let (t, col) = (i / c.k, i % c.k);
        out.push(match c.scheme.as_str() {
            "static" => x * (1.0 / scales[0]),
            "dynamic" => x / scales[t],
            _ => x / scales[t * c.k.div_ceil(c.block[1]) + col / c.block[1]],
        });
    }
    out
}

#[test]
fn activation_scales_and_codes_match_torch() {
    let mut total_ties = 0;
    let mut checked = 0;
    for c in cases() {
        let Some(want_scales) = c.json.get("act_scales") else {
            assert_eq!(
                c.scheme, "block_wo",
                "only W8A16 has no activation quantization"
            );
            continue;
        };
        let want_scales: Vec<f32> = f64s(want_scales).iter().map(|&v| v as f32).collect();
        let want_codes = hex_bytes(c.json["act_codes"].as_str().unwrap());
        let (codes, scales) = match c.scheme.as_str() {
            "static" => (quantize_static(&c.x, want_scales[0]), want_scales.clone()),
            "dynamic" => quantize_per_token(&c.x, c.k),
            "block" => quantize_per_token_group(&c.x, c.k, c.block[1]),
            s => panic!("{s}"),
        };
        assert_eq!(scales, want_scales, "{}: activation scales", c.name);
        let pre = prerounded(&c, &scales);
        let ties = pre.iter().filter(|v| is_tie(**v)).count();
        let clamped = pre.iter().filter(|v| v.abs() > 448.0).count();
        let differ: Vec<usize> = (0..codes.len())
            .filter(|&i| codes[i] != want_codes[i])
            .collect();
        // Both sides round to nearest even, so even ties must agree; report them anyway.
        assert!(
            differ.is_empty(),
            "{}: {} activation codes differ (first at {}: ours {:#04x}, torch {:#04x}, x/s = {:e}, tie: {})",
            c.name,
            differ.len(),
            differ[0],
            codes[differ[0]],
            want_codes[differ[0]],
            pre[differ[0]],
            is_tie(pre[differ[0]])
        );
        assert!(
            codes.iter().all(|&c| c & 0x7F != 0x7F),
            "{}: NaN code",
            c.name
        );
        eprintln!(
            "{}: {} codes equal, {} exact RNE ties, {} clamped to ±448",
            c.name,
            codes.len(),
            ties,
            clamped
        );
        total_ties += ties;
        checked += 1;
    }
    assert_eq!(checked, 7);
    eprintln!("total ties: {total_ties}");
}

/// max over outputs of |y - y64| / Σ|terms|; asserts each is within 1e-6 of Σ|terms|, and exact zeros
/// where Σ|terms| = 0.
fn check_outputs(name: &str, y: &[f32], want: &[f64], yabs: &[f64]) -> f64 {
    assert_eq!(y.len(), want.len(), "{name}");
    let mut worst = 0f64;
    for i in 0..y.len() {
        assert!(y[i].is_finite(), "{name}: y[{i}] = {}", y[i]);
        let err = (y[i] as f64 - want[i]).abs();
        if yabs[i] == 0.0 {
            assert_eq!(y[i], 0.0, "{name}: y[{i}] of an all-zero sum");
            continue;
        }
        let rel = err / yabs[i];
        assert!(
            rel <= 1e-6,
            "{name}: y[{i}] = {} vs {} (err {err:e}, Σ|terms| {:e})",
            y[i],
            want[i],
            yabs[i]
        );
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn outputs_match_float64_reference_for_every_scheme() {
    let mut seen = std::collections::BTreeSet::new();
    for c in cases() {
        let (m, scheme) = setup(&c);
        let x = Mat::from_vec(c.t, c.k, c.x.clone()).unwrap();
        let y = linear_fp8(&x, &m["w"], &scheme, &m).unwrap();
        assert_eq!((y.rows, y.cols), (c.t, c.n));
        let worst = check_outputs(&c.name, &y.data, &c.y, &c.yabs);
        let max_rel = (0..c.y.len())
            .filter(|&i| c.y[i].abs() > 1e-3 * c.yabs[i])
            .map(|i| ((y.data[i] as f64 - c.y[i]) / c.y[i]).abs())
            .fold(0f64, f64::max);
        eprintln!(
            "{}: max |err|/Σ|terms| = {worst:.2e}, max relative error = {max_rel:.2e}",
            c.name
        );
        seen.insert(c.scheme.clone());
    }
    assert_eq!(seen.len(), 4, "every scheme has cases");
}

#[test]
fn zero_rows_and_groups_give_exact_zeros_never_nan() {
    let cs = cases();
    // Scheme B: row 1 is all zeros (scale at the 1/(448*512) floor).
    let c = cs
        .iter()
        .find(|c| c.name == "dynamic_k13_n7_bf16_zero_tiny_huge")
        .unwrap();
    let (m, scheme) = setup(c);
    let y = linear_fp8(
        &Mat::from_vec(c.t, c.k, c.x.clone()).unwrap(),
        &m["w"],
        &scheme,
        &m,
    )
    .unwrap();
    assert!(y.row(1).iter().all(|&v| v == 0.0), "{:?}", y.row(1));
    assert!(
        y.row(2).iter().all(|&v| v != 0.0),
        "the tiny row still contributes"
    );
    // Scheme D: row 3 all zeros, row 1 has a zero group (1e-10/448 scale, codes 0).
    let c = cs.iter().find(|c| c.name == "block_k200_n7_b128").unwrap();
    let (m, scheme) = setup(c);
    let x = Mat::from_vec(c.t, c.k, c.x.clone()).unwrap();
    let y = linear_fp8(&x, &m["w"], &scheme, &m).unwrap();
    assert!(y.row(3).iter().all(|&v| v == 0.0), "{:?}", y.row(3));
    assert!(y.data.iter().all(|v| v.is_finite()));
    let (codes, scales) = quantize_per_token_group(&c.x, c.k, 128);
    assert_eq!(scales[2 + 1], 1e-10f32 / 448.0);
    assert!(codes[c.k + 128..2 * c.k].iter().all(|&q| q == 0));
    // The zero group adds exactly nothing: row 1 equals the same row with the K range cut to group 0.
    let k0 = 128;
    let (ms, _) = {
        let mut cut = Case {
            name: "cut".into(),
            scheme: "block".into(),
            block: c.block,
            t: 1,
            n: c.n,
            k: k0,
            x: x.row(1)[..k0].to_vec(),
            w: (0..c.n)
                .flat_map(|r| c.w[r * c.k..r * c.k + k0].to_vec())
                .collect(),
            json: c.json.clone(),
            y: vec![],
            yabs: vec![],
        };
        // Sinv column 0 only.
        let sinv = f64s(&c.json["weight_scale"]["values"]);
        cut.json["weight_scale"] =
            serde_json::json!({"dtype": "F32", "shape": [1, 1], "values": [sinv[0]]});
        setup(&cut)
    };
    let y0 = linear_fp8(
        &Mat::from_vec(1, k0, x.row(1)[..k0].to_vec()).unwrap(),
        &ms["w"],
        &scheme,
        &ms,
    )
    .unwrap();
    assert!(y0.data.iter().all(|&v| v != 0.0));
    assert_eq!(y0.row(0), y.row(1));
}

/// The same numbers through `CpuBackend`: Embed (the x rows as a table) then the FP8 Linear.
fn graph_for(c: &Case, scheme: QuantScheme) -> Graph {
    let mut g = Graph::new(c.t);
    let e = g.add(
        "embed",
        Op::Embed {
            table: "x".into(),
            scale: 1.0,
        },
        &[],
        c.k,
    );
    g.output = g.add(
        "linear",
        Op::Linear {
            weight: "w".into(),
            scheme,
        },
        &[e],
        c.n,
    );
    g
}

fn with_x(c: &Case, m: &WeightMap) -> WeightMap {
    let mut m = m.clone();
    m.insert(
        "x".into(),
        e4m3_core::checkpoint::Weight::from_f32("x", vec![c.t, c.k], &c.x),
    );
    m
}

#[test]
fn cpu_backend_runs_every_fp8_scheme() {
    for c in cases() {
        let (m, scheme) = setup(&c);
        let g = graph_for(&c, scheme.clone());
        assert!(CpuBackend.supports(&g.node(g.output).op));
        let mut r = CpuBackend
            .load(&g, &with_x(&c, &m), CacheConfig::new(1, c.t))
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let ids: Vec<u32> = (0..c.t as u32).collect();
        let out = r
            .step(&Batch::single(0, 0, ids, LogitsFor::All), &[])
            .unwrap();
        let direct = linear_fp8(
            &Mat::from_vec(c.t, c.k, c.x.clone()).unwrap(),
            &m["w"],
            &scheme,
            &m,
        )
        .unwrap();
        assert_eq!(out.logits, direct, "{}", c.name);
        check_outputs(&c.name, &out.logits.data, &c.y, &c.yabs);
    }
}

#[test]
fn bad_scale_tensors_are_load_errors_naming_the_tensor() {
    let cs = cases();
    let load = |c: &Case, m: &WeightMap, scheme: QuantScheme| -> String {
        let g = graph_for(c, scheme);
        match CpuBackend.load(&g, &with_x(c, m), CacheConfig::new(1, 4)) {
            Ok(_) => panic!("{}: loaded", c.name),
            Err(e) => e.to_string(),
        }
    };
    let f32t = |name: &str, shape: Vec<usize>| {
        let n: usize = shape.iter().product::<usize>().max(1);
        (
            name.to_string(),
            safetensors::Dtype::F32,
            shape,
            vec![0x3F800000u32.to_le_bytes(); n].concat(),
        )
    };
    // D, K = 200, N = 7, block 128: Sinv must be [1, 2]; [1, 1] (floor instead of ceil) is refused.
    let c = cs.iter().find(|c| c.name == "block_k200_n7_b128").unwrap();
    let w = (
        "w".to_string(),
        safetensors::Dtype::F8_E4M3,
        vec![c.n, c.k],
        c.w.clone(),
    );
    let m = weight_map(&[
        w.clone(),
        f32t("bad_sinv", vec![1, 1]),
        f32t("ok4d", vec![1, 1, 2, 1]),
    ]);
    let e = load(
        c,
        &m,
        QuantScheme::Fp8Block {
            weight_scale_inv: "bad_sinv".into(),
            block: [128, 128],
        },
    );
    assert!(e.contains("`bad_sinv`") && e.contains("[1, 2]"), "{e}");
    // The 4-D ModelOpt layout is for C only.
    let e = load(
        c,
        &m,
        QuantScheme::Fp8Block {
            weight_scale_inv: "ok4d".into(),
            block: [128, 128],
        },
    );
    assert!(e.contains("`ok4d`"), "{e}");
    // C: [1, 1, 1, 1] for a [7, 200] weight.
    let m2 = weight_map(&[w.clone(), f32t("s", vec![1, 1, 1, 1])]);
    let e = load(
        c,
        &m2,
        QuantScheme::Fp8BlockWeightOnly {
            weight_scale: "s".into(),
            block: [128, 128],
        },
    );
    assert!(e.contains("`s`") && e.contains("[1, 1, 2, 1]"), "{e}");
    // B: [N] is accepted as [N, 1]; [N + 1, 1] and [1, N] are not.
    let m3 = weight_map(&[w.clone(), f32t("s8", vec![8, 1]), f32t("s1n", vec![1, 7])]);
    for s in ["s8", "s1n"] {
        let e = load(
            c,
            &m3,
            QuantScheme::Fp8Dynamic {
                weight_scale: s.into(),
            },
        );
        assert!(e.contains(&format!("`{s}`")) && e.contains("[7, 1]"), "{e}");
    }
    // A: a per-channel scale where a scalar is expected; a missing input scale.
    let m4 = weight_map(&[w.clone(), f32t("sw", vec![7]), f32t("sx", vec![])]);
    let e = load(
        c,
        &m4,
        QuantScheme::Fp8Static {
            weight_scale: "sw".into(),
            input_scale: "sx".into(),
        },
    );
    assert!(e.contains("`sw`"), "{e}");
    let e = load(
        c,
        &m4,
        QuantScheme::Fp8Static {
            weight_scale: "sx".into(),
            input_scale: "nope".into(),
        },
    );
    assert!(e.contains("`nope`"), "{e}");
    // An F8 weight under the Dense scheme, and an F32 weight under an FP8 scheme.
    let e = load(c, &m4, QuantScheme::Dense);
    assert!(e.contains("`w`") && e.contains("F8_E4M3"), "{e}");
    let mut m5 = m4.clone();
    m5.insert(
        "w".into(),
        e4m3_core::checkpoint::Weight::from_f32("w", vec![c.n, c.k], &vec![0.0; c.n * c.k]),
    );
    let e = load(
        c,
        &m5,
        QuantScheme::Fp8Static {
            weight_scale: "sx".into(),
            input_scale: "sx".into(),
        },
    );
    assert!(e.contains("`w`") && e.contains("F8_E4M3"), "{e}");
}
