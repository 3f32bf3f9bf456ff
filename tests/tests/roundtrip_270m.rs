//! Round trip on the real Gemma 3 270M: quantize it into each FP8 scheme, load it back, run it, and
//! compare with the BF16 model (cosine of logits at every prompt position; greedy tokens shared).

use e4m3_core::backend::{Batch, LogitsFor};
use e4m3_core::eval::cosine;
use e4m3_core::graph::QuantScheme;
use e4m3_core::model::Model;
use e4m3_core::quantize::{quantize, QuantizeOptions, Scheme};
use e4m3_core::sampling::argmax;
use e4m3_core::tokenizer::Tokenizer;
use e4m3_tests::*;

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut r = cpu_runner(model, 1, prompt.len() + n);
    let mut next = argmax(
        r.step(&Batch::single(0, 0, prompt.to_vec(), LogitsFor::Last), &[])
            .unwrap()
            .logits
            .row(0),
    );
    let mut out = vec![next];
    for i in 1..n {
        let l = r
            .step(
                &Batch::single(0, prompt.len() + i - 1, vec![next], LogitsFor::Last),
                &[],
            )
            .unwrap()
            .logits;
        next = argmax(l.row(0));
        out.push(next);
    }
    out
}

#[test]
fn every_fp8_scheme_round_trips_the_real_270m() {
    let dir = real_model_dir();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let bf16 = Model::load(&dir).unwrap();
    let prompt = tok
        .encode_prompt("The history of the printing press begins in the fifteenth century, when movable metal type")
        .unwrap();
    let base = all_logits(&bf16, &prompt);
    let base_greedy = greedy(&bf16, &prompt, 16);
    for scheme in [
        Scheme::Fp8Static,
        Scheme::Fp8Dynamic,
        Scheme::Fp8BlockWo,
        Scheme::Fp8Block,
    ] {
        let out = tempfile::tempdir().unwrap();
        let mut opts = QuantizeOptions::new(scheme);
        opts.samples = 4;
        opts.seq_len = 64;
        opts.kv_cache_fp8 = scheme == Scheme::Fp8Static;
        quantize(&dir, out.path(), &opts).unwrap();
        let m = Model::load(out.path()).unwrap_or_else(|e| panic!("{scheme:?}: {e}"));
        let fp8_linears = m
            .linear_schemes
            .values()
            .filter(|s| **s != QuantScheme::Dense)
            .count();
        assert_eq!(
            fp8_linears,
            18 * 7,
            "{scheme:?}: every q/k/v/o/gate/up/down is FP8"
        );
        assert_eq!(m.kv_cache_fp8, opts.kv_cache_fp8);
        let l = all_logits(&m, &prompt);
        let cos: Vec<f64> = (0..prompt.len())
            .map(|p| cosine(l.row(p), base.row(p)))
            .collect();
        let min = cos.iter().cloned().fold(1.0, f64::min);
        let shared = greedy(&m, &prompt, 16)
            .iter()
            .zip(&base_greedy)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{scheme:?}: min cosine of logits {min:.5}, greedy tokens shared with BF16 {shared}/16"
        );
        assert!(min >= 0.99, "{scheme:?}: cosine {min} < 0.99");
        assert!(
            shared >= 4,
            "{scheme:?}: only {shared} greedy tokens shared"
        );
    }
}
