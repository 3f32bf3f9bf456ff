//! FP8 checkpoints written by the upstream tools themselves (tests/fixtures/upstream-fp8, made by
//! tools/make_upstream_fp8.py), against a Python emulation of each scheme's inference arithmetic on the
//! tensors exactly as the tool saved them:
//!
//! - `ct-fp8-dynamic/`: scheme B, llm-compressor `oneshot(QuantizationModifier(scheme="FP8_DYNAMIC"))`,
//!   `save_pretrained(save_compressed=True)`; reference = vLLM dynamic per-token quant + channel-scaled GEMM.
//! - `fg-fp8-block/`: scheme D, transformers `FineGrainedFP8Config(weight_block_size=[16, 16])`;
//!   reference = per-token-group quant (group 16) + block-scaled GEMM.
//!
//! Checked: the detected scheme of every Linear, that the FP8 codes and scales the runtime holds are the
//! file's bytes and decode (independently, here) to the tool's own dequantization, and the logits at every
//! position.

use std::collections::BTreeMap;
use std::path::Path;

use e4m3_core::graph::QuantScheme;
use e4m3_core::model::Model;
use e4m3_core::quant_config::CheckpointQuant;
use e4m3_core::tensor::DType;
use e4m3_tests::*;

const LAYERS: usize = 6;
const BLOCK: [usize; 2] = [16, 16];

/// Largest |dlogit| allowed against the f64 emulation, as a fraction of the row's logit range (~21-25 here,
/// so about 2.5e-4 absolute).
///
/// Measured (CPU backend, f32): max |dlogit| 2.9e-6 for both checkpoints (1.6e-7 / 2.0e-7 of the range), the
/// size of the f32-vs-f64 difference the script measures for its own f32 emulation (2.2e-6..3.0e-6), which
/// flips none of the 41,472 activation codes per checkpoint. Activation quantization is a step function: one
/// code flipped by one step (30 random trials per scheme, in the script's emulation) moves the logits by a
/// median 0.25 (min 3e-7, max 1.0), and dropping activation quantization altogether by 0.53..1.02. The bound
/// leaves ~80x margin over the measured f32 error and would catch almost any flipped code.
const MAX_DLOGIT_REL: f32 = 1e-5;
const MIN_COSINE: f64 = 0.9999;

/// E4M3 (fn) decode from the bit layout (fp8-formats.md 1.1), independent of the runtime's codec.
fn decode_e4m3(b: u8) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 15) as i32;
    let m = (b & 7) as f64;
    if e == 15 && m == 7.0 {
        return f64::NAN;
    }
    if e == 0 {
        sign * m * 2f64.powi(-9)
    } else {
        sign * (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// The raw file tensors: name -> (dtype, shape, bytes).
fn file_tensors(dir: &Path) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect()
}

fn values_of(dtype: safetensors::Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        safetensors::Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        d => panic!("scale dtype {d:?}"),
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Scheme {
    B,
    D,
}

/// Every q/k/v/o/gate/up/down is FP8 in the expected scheme, with the file's own codes and scales; lm_head
/// (tied) and the embedding stay dense BF16.
fn check_schemes(m: &Model, dir: &Path, scheme: Scheme) {
    let file = file_tensors(dir);
    match (&m.quant, scheme) {
        (CheckpointQuant::CompressedTensorsFp8Dynamic { .. }, Scheme::B) => {}
        (CheckpointQuant::FineGrainedFp8 { block, .. }, Scheme::D) => assert_eq!(*block, BLOCK),
        (q, s) => panic!("detected {} for scheme {s:?}", q.name()),
    }
    assert_eq!(m.linear_schemes.len(), LAYERS * LINEARS.len() + 1);
    assert_eq!(m.linear_schemes["lm_head"], QuantScheme::Dense);
    assert!(m.tied_lm_head);
    assert_eq!(m.weights["embed_tokens.weight"].dtype, DType::BF16);
    for l in 0..LAYERS {
        for lin in LINEARS {
            let module = format!("layers.{l}.{lin}");
            let got = &m.linear_schemes[&module];
            let (scale_name, file_scale_suffix) = match scheme {
                Scheme::B => (format!("{module}.weight_scale"), "weight_scale"),
                Scheme::D => (format!("{module}.weight_scale_inv"), "weight_scale_inv"),
            };
            let want = match scheme {
                Scheme::B => QuantScheme::Fp8Dynamic {
                    weight_scale: scale_name.clone(),
                },
                Scheme::D => QuantScheme::Fp8Block {
                    weight_scale_inv: scale_name.clone(),
                    block: BLOCK,
                },
            };
            assert_eq!(*got, want, "{module}");
            let w = &m.weights[&format!("{module}.weight")];
            assert_eq!(w.dtype, DType::F8E4M3, "{module}");
            let (fd, fshape, fbytes) = &file[&format!("model.{module}.weight")];
            assert_eq!(*fd, safetensors::Dtype::F8_E4M3);
            assert_eq!(&w.shape, fshape);
            assert_eq!(
                w.bytes(),
                &fbytes[..],
                "{module}: codes differ from the file"
            );
            let s = &m.weights[&scale_name];
            let (sd, sshape, sbytes) = &file[&format!("model.{module}.{file_scale_suffix}")];
            let [out, inp] = [fshape[0], fshape[1]];
            match scheme {
                // llm-compressor writes the channel scales in the model dtype, [out, 1].
                Scheme::B => {
                    assert_eq!(*sd, safetensors::Dtype::BF16);
                    assert_eq!(sshape, &vec![out, 1]);
                }
                Scheme::D => {
                    assert_eq!(*sd, safetensors::Dtype::F32);
                    assert_eq!(
                        sshape,
                        &vec![out.div_ceil(BLOCK[0]), inp.div_ceil(BLOCK[1])]
                    );
                }
            }
            assert_eq!(s.to_f32(), values_of(*sd, sbytes), "{scale_name}");
        }
    }
}

/// decode(code) x scale, recomputed here from the file, equals the tool's own dequantization (compressed-tensors
/// `dequantize` for B, which returns bf16(code * scale); transformers `Fp8Dequantize` in f32 for D), sampled
/// entries exactly and the sums to rounding.
fn check_dequant(m: &Model, dir: &Path, scheme: Scheme) {
    for code in 0..=255u8 {
        let ours = decode_e4m3(code);
        let theirs = e4m3_core::tensor::f8e4m3_to_f32(code) as f64;
        assert!(
            ours == theirs || (ours.is_nan() && theirs.is_nan()),
            "code {code:#04x}"
        );
    }
    let producer = read_json(&dir.join("producer.json"));
    let file = file_tensors(dir);
    let samples = producer["tool_dequant"].as_object().unwrap();
    assert_eq!(samples.len(), 3);
    for (p, fp) in samples {
        let (_, shape, codes) = &file[&format!("{p}.weight")];
        let scale_suffix = if scheme == Scheme::B {
            "weight_scale"
        } else {
            "weight_scale_inv"
        };
        let (sd, sshape, sbytes) = &file[&format!("{p}.{scale_suffix}")];
        let scale = values_of(*sd, sbytes);
        // The runtime holds the same bytes (checked in check_schemes) under the graph name.
        let name = p.strip_prefix("model.").unwrap();
        assert_eq!(m.weights[&format!("{name}.weight")].bytes(), &codes[..]);
        let (out, inp) = (shape[0], shape[1]);
        let deq = |r: usize, c: usize| -> f32 {
            let s = match scheme {
                Scheme::B => scale[r],
                Scheme::D => scale[(r / BLOCK[0]) * sshape[1] + c / BLOCK[1]],
            };
            // An e4m3 value has 4 significant bits, the scale 8 (bf16, B) or 24 (f32, D): the product is exact
            // in f64 and rounded once to f32, as a torch f32 multiply does (D). For B the f32 product is exact
            // (<= 12 bits), so the bf16 rounding below is the single rounding of compressed-tensors' bf16 multiply.
            let v = (decode_e4m3(codes[r * inp + c]) * s as f64) as f32;
            match scheme {
                Scheme::B => bf16_round(v),
                Scheme::D => v,
            }
        };
        assert_eq!(fp["shape"], serde_json::json!([out, inp]), "{p}");
        let idx = fp["index"].as_array().unwrap();
        let vals = fp["values"].as_array().unwrap();
        for (ix, v) in idx.iter().zip(vals) {
            let (r, c) = (
                ix[0].as_u64().unwrap() as usize,
                ix[1].as_u64().unwrap() as usize,
            );
            assert_eq!(deq(r, c) as f64, v.as_f64().unwrap(), "{p}[{r},{c}]");
        }
        let (mut sum, mut sum_abs) = (0f64, 0f64);
        for r in 0..out {
            for c in 0..inp {
                let v = deq(r, c) as f64;
                sum += v;
                sum_abs += v.abs();
            }
        }
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
        assert!(close(sum, fp["sum"].as_f64().unwrap()), "{p}: sum {sum}");
        assert!(
            close(sum_abs, fp["sum_abs"].as_f64().unwrap()),
            "{p}: sum_abs {sum_abs}"
        );
    }
}

struct Agreement {
    max_abs: f32,
    max_rel: f32,
    cosine: f64,
    max_abs_vs_weight_only: f32,
    positions_over_1e5: usize,
    positions: usize,
}

fn compare_logits(m: &Model, dir: &Path) -> Agreement {
    let reference = read_json(&dir.join("reference.json"));
    let mut a = Agreement {
        max_abs: 0.0,
        max_rel: 0.0,
        cosine: 1.0,
        max_abs_vs_weight_only: 0.0,
        positions_over_1e5: 0,
        positions: 0,
    };
    for (ci, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids[0], 2, "BOS first");
        let want = json_f32_matrix(&case["logits"]);
        let weight_only = json_f32_matrix(&case["logits_weight_only"]);
        let got = all_logits(m, &ids);
        assert_eq!(got.rows, ids.len());
        let (mut dot, mut ng, mut nw) = (0f64, 0f64, 0f64);
        for (p, w) in want.iter().enumerate() {
            let g = got.row(p);
            let range = w.iter().cloned().fold(f32::MIN, f32::max)
                - w.iter().cloned().fold(f32::MAX, f32::min);
            let d = max_abs_diff(g, w);
            a.max_abs = a.max_abs.max(d);
            a.max_rel = a.max_rel.max(d / range);
            a.positions += 1;
            if d > 1e-5 {
                a.positions_over_1e5 += 1;
            }
            a.max_abs_vs_weight_only = a
                .max_abs_vs_weight_only
                .max(max_abs_diff(g, &weight_only[p]));
            for (x, y) in g.iter().zip(w) {
                dot += *x as f64 * *y as f64;
                ng += (*x as f64).powi(2);
                nw += (*y as f64).powi(2);
            }
        }
        let cos = dot / (ng.sqrt() * nw.sqrt());
        a.cosine = a.cosine.min(cos);
        eprintln!(
            "{} case {ci}: max |dlogit| {:e} so far, cosine {cos:.9}",
            dir.file_name().unwrap().to_string_lossy(),
            a.max_abs
        );
    }
    a
}

fn check(dir_name: &str, scheme: Scheme) {
    let dir = fixture(&format!("upstream-fp8/{dir_name}"));
    let m = Model::load(&dir).unwrap_or_else(|e| panic!("{dir_name}: {e}"));
    check_schemes(&m, &dir, scheme);
    check_dequant(&m, &dir, scheme);
    let a = compare_logits(&m, &dir);
    eprintln!(
        "{dir_name}: max |dlogit| {:e} (max {:e} of the row's logit range), min cosine {:.10}, \
         {} of {} positions over 1e-5; vs weight-only (no activation quantization) max |dlogit| {:.4}",
        a.max_abs, a.max_rel, a.cosine, a.positions_over_1e5, a.positions, a.max_abs_vs_weight_only
    );
    assert!(
        a.max_rel <= MAX_DLOGIT_REL,
        "{dir_name}: max |dlogit| {} ({} of the range)",
        a.max_abs,
        a.max_rel
    );
    assert!(a.cosine >= MIN_COSINE, "{dir_name}: cosine {}", a.cosine);
    // The reference is sensitive to the activation quantization: the same weights without it are far away.
    assert!(
        a.max_abs_vs_weight_only > 1000.0 * a.max_abs.max(1e-6),
        "{dir_name}: the weight-only logits are as close ({}) as the emulated ones",
        a.max_abs_vs_weight_only
    );
}

#[test]
fn llm_compressor_fp8_dynamic_matches_emulated_vllm() {
    check("ct-fp8-dynamic", Scheme::B);
}

#[test]
fn transformers_finegrained_fp8_matches_emulated_block_gemm() {
    check("fg-fp8-block", Scheme::D);
}
