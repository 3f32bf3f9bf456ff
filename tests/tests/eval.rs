//! `e4m3_core::eval::compare` on tiny random checkpoints the tests write: a model against itself, against a
//! copy with one weight perturbed, and against a copy whose weights hold a NaN.

use e4m3_core::eval::{compare, CompareOptions, ConfigResult, EvalConfig};
use e4m3_core::model::Model;
use e4m3_tests::*;

/// Pseudo-random "text" tokens (never 0..3, the special ids of the tiny vocabulary).
fn text(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| (3 + (i * 7919 + i * i * 31) % (vocab - 3)) as u32)
        .collect()
}

fn write(tensors: &[(String, Vec<usize>, Vec<f32>)], t: &Tiny) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &tiny_text_config(t), tensors, "model.", false);
    let m = Model::load(dir.path()).unwrap();
    (dir, m)
}

fn run(a: &Model, b: &Model, config: EvalConfig, opts: &CompareOptions) -> ConfigResult {
    let mut ra = cpu_runner(a, config.batch, config.seq);
    let mut rb = cpu_runner(b, config.batch, config.seq);
    let tokens = text(400, a.config.vocab_size);
    compare(ra.as_mut(), rb.as_mut(), &tokens, config, opts).unwrap()
}

fn opts(max_rows: usize) -> CompareOptions<'static> {
    CompareOptions {
        bos: Some(2),
        max_rows,
        check_finite: None,
    }
}

#[test]
fn model_against_itself_has_cosine_one_and_equal_perplexity() {
    let t = Tiny::default();
    let (_d, m) = write(&tiny_tensors(&t, 7), &t);
    // 3 sequences of 10 tokens; 8 rows per step: 2 positions of each sequence per step, 5 steps, so the
    // sliding window (4) and the KV cache across steps are exercised.
    let c = EvalConfig::new(3, 10);
    let r = run(&m, &m, c, &opts(8));
    assert!((r.cos_logits_mean - 1.0).abs() < 1e-6, "{r:?}");
    assert!((r.cos_logits_min - 1.0).abs() < 1e-6, "{r:?}");
    assert!((r.cos_hidden_mean - 1.0).abs() < 1e-6, "{r:?}");
    assert!((r.cos_hidden_min - 1.0).abs() < 1e-6, "{r:?}");
    assert_eq!(r.ppl_model, r.ppl_baseline);
    assert!(r.ppl_model.is_finite() && r.ppl_model > 1.0, "{r:?}");
    assert_eq!((r.positions, r.predictions), (30, 27));
    assert!(r.pass && r.nonfinite_model.is_none() && r.nonfinite_baseline.is_none());
    assert_eq!(r.config, "3x10");

    // Chunking along positions changes nothing: one step of all 30 rows gives the same perplexity.
    let whole = run(&m, &m, c, &opts(1000));
    assert!(
        (whole.ppl_model - r.ppl_model).abs() < 1e-4 * r.ppl_model,
        "chunked {} vs one step {}",
        r.ppl_model,
        whole.ppl_model
    );
}

#[test]
fn perturbed_weight_lowers_cosine_and_changes_perplexity() {
    let t = Tiny::default();
    let tensors = tiny_tensors(&t, 8);
    let mut perturbed = tensors.clone();
    let w = perturbed
        .iter_mut()
        .find(|(n, _, _)| n == "layers.1.mlp.down_proj.weight")
        .unwrap();
    for (i, x) in w.2.iter_mut().enumerate() {
        *x += if i % 2 == 0 { 0.3 } else { -0.2 };
    }
    let (_d1, base) = write(&tensors, &t);
    let (_d2, model) = write(&perturbed, &t);
    let r = run(&model, &base, EvalConfig::new(2, 12), &opts(64));
    assert!(r.cos_logits_mean < 1.0 - 1e-4, "{r:?}");
    assert!(r.cos_logits_min <= r.cos_logits_mean, "{r:?}");
    assert!(r.cos_hidden_mean < 1.0 - 1e-4, "{r:?}");
    assert!(r.cos_logits_mean > -1.0 && r.cos_hidden_min > -1.0, "{r:?}");
    assert!(
        (r.ppl_model - r.ppl_baseline).abs() > 1e-3 * r.ppl_baseline,
        "{r:?}"
    );
    assert!(r.ppl_model.is_finite() && r.ppl_baseline.is_finite());
    // The baseline against itself is still perfect, and against the model symmetric in cosine.
    let back = run(&base, &model, EvalConfig::new(2, 12), &opts(64));
    assert!((back.cos_logits_mean - r.cos_logits_mean).abs() < 1e-9);
    assert_eq!(back.ppl_model, r.ppl_baseline);
}

#[test]
fn check_finite_names_the_layer_and_node_of_a_nan_weight() {
    let t = Tiny::default();
    let tensors = tiny_tensors(&t, 9);
    let mut bad = tensors.clone();
    let w = bad
        .iter_mut()
        .find(|(n, _, _)| n == "layers.1.mlp.down_proj.weight")
        .unwrap();
    w.2[5] = f32::NAN;
    let (_d1, base) = write(&tensors, &t);
    let (_d2, model) = write(&bad, &t);
    let c = EvalConfig::new(2, 6);

    // Without --check-finite: no crash; the logits are reported non-finite, the config fails.
    let r = run(&model, &base, c, &opts(64));
    assert!(!r.pass);
    assert!(r.cos_logits_mean.is_nan() && r.ppl_model.is_nan(), "{r:?}");
    assert!(r.ppl_baseline.is_finite());
    let nf = r.nonfinite_model.expect("non-finite logits reported");
    assert_eq!((nf.node.as_str(), nf.located), ("logits", false));
    assert!(r.nonfinite_baseline.is_none());

    // With --check-finite: the first node holding NaN is layers.1.down_proj, reading the bad tensor.
    let o = CompareOptions {
        check_finite: Some([&model, &base]),
        ..opts(64)
    };
    let r = run(&model, &base, c, &o);
    assert!(!r.pass);
    let nf = r.nonfinite_model.expect("located");
    assert_eq!(nf.node, "layers.1.down_proj");
    assert_eq!(
        (nf.op.as_str(), nf.layer, nf.located),
        ("linear", Some(1), true)
    );
    assert!(nf.value.is_nan());
    let json = serde_json::to_value(&nf).unwrap();
    assert_eq!(json["value"], "NaN");
    assert_eq!(json["node"], "layers.1.down_proj");
    assert_eq!(
        nf.tensors,
        vec!["layers.1.mlp.down_proj.weight contains NaN/Inf".to_string()]
    );
    let shown = nf.to_string();
    assert!(
        shown.contains("layers.1.down_proj (linear)") && shown.contains("contains NaN/Inf"),
        "{shown}"
    );
    assert!(r.nonfinite_baseline.is_none(), "{:?}", r.nonfinite_baseline);

    // The same when the NaN model is the baseline.
    let r = run(&base, &model, c, &o);
    assert!(r.nonfinite_model.is_none());
    assert_eq!(r.nonfinite_baseline.unwrap().node, "layers.1.down_proj");
}

#[test]
fn too_short_text_is_an_error_with_both_counts() {
    let t = Tiny::default();
    let (_d, m) = write(&tiny_tensors(&t, 10), &t);
    let c = EvalConfig::new(4, 50);
    let mut ra = cpu_runner(&m, 4, 50);
    let mut rb = cpu_runner(&m, 4, 50);
    let e = compare(ra.as_mut(), rb.as_mut(), &text(100, t.vocab), c, &opts(64))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("4x50") && e.contains("196") && e.contains("100"),
        "{e}"
    );
}
