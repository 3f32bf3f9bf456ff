//! Precision of one model against a baseline on the same tokens: cosine similarity of the logits and of the
//! last hidden state (`final_norm`) at every position, and the perplexity of both models. This is the table
//! of the gemma-3-270m ModelOpt FP8 model card: one row per batch x sequence-length configuration, PASS when
//! both mean cosines are at least [`PASS_COSINE`].
//!
//! A configuration `BxS` takes B sequences of S tokens from the token stream: each sequence is the BOS token
//! (when the tokenizer adds one) followed by the next S-1 (or S without BOS) consecutive text tokens. The B
//! sequences run together as one batch with logits at every position; the batch is split along positions into
//! steps of at most `max_rows` rows in all (each sequence continues in its KV-cache slot), so the logits of
//! a step stay within memory (262144 logits per row for Gemma 3).

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::backend::{Batch, LogitsFor, Runner, SeqStep};
use crate::error::{Error, Result};
use crate::graph::{Graph, Op, QuantScheme};
use crate::model::Model;
use crate::tensor::Mat;

/// A configuration passes when both the mean logits cosine and the mean hidden-state cosine reach this.
pub const PASS_COSINE: f64 = 0.99;

/// Tap name of the last hidden state (after the final norm, for the rows whose logits were asked).
pub const HIDDEN_TAP: &str = "final_norm";

/// B sequences of S tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EvalConfig {
    pub batch: usize,
    pub seq: usize,
}

/// The configurations of the model card's precision table.
pub const CARD_CONFIGS: [EvalConfig; 7] = [
    EvalConfig::new(1, 128),
    EvalConfig::new(2, 512),
    EvalConfig::new(4, 1024),
    EvalConfig::new(8, 2048),
    EvalConfig::new(8, 100),
    EvalConfig::new(8, 500),
    EvalConfig::new(8, 4000),
];

impl EvalConfig {
    pub const fn new(batch: usize, seq: usize) -> EvalConfig {
        EvalConfig { batch, seq }
    }

    /// Parse `BxS` (e.g. `2x512`); B >= 1 and S >= 2 (perplexity needs a next token).
    pub fn parse(s: &str) -> Result<EvalConfig> {
        let bad = || {
            Error::invalid(format!(
                "bad eval config `{s}`: expected BATCHxSEQ like 2x512 (batch >= 1, seq >= 2)"
            ))
        };
        let (b, l) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
        let batch: usize = b.trim().parse().map_err(|_| bad())?;
        let seq: usize = l.trim().parse().map_err(|_| bad())?;
        if batch == 0 || seq < 2 {
            return Err(bad());
        }
        Ok(EvalConfig { batch, seq })
    }

    /// Parse a comma-separated list of configurations.
    pub fn parse_list(s: &str) -> Result<Vec<EvalConfig>> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(EvalConfig::parse)
            .collect()
    }

    /// Tokens the model runs on: B x S.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Text tokens this configuration consumes (S-1 per sequence when each starts with BOS).
    pub fn text_tokens_needed(&self, bos: bool) -> usize {
        self.batch * (self.seq - usize::from(bos))
    }
}

impl fmt::Display for EvalConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.batch, self.seq)
    }
}

/// Token-layers (B x S x layers) a configuration may cost to be run on the CPU by default: 1x128, 2x512 and
/// 8x100 on the 18-layer Gemma 3 270M (each a few minutes at most for both models on two cores); larger ones
/// only when asked with `--configs`.
pub const CPU_DEFAULT_TOKEN_LAYERS: usize = 20_000;

/// Whether `config` runs by default on a backend: every card config on a GPU backend; on the CPU only those
/// with B x S x `num_layers` <= [`CPU_DEFAULT_TOKEN_LAYERS`].
pub fn runs_by_default(config: EvalConfig, num_layers: usize, cpu: bool) -> bool {
    !cpu || config.tokens() * num_layers.max(1) <= CPU_DEFAULT_TOKEN_LAYERS
}

/// Cosine similarity of two vectors, accumulated in f64. Two zero vectors are identical (1); a zero vector
/// against a non-zero one is 0. NaN or Inf anywhere gives NaN.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "cosine of vectors of different lengths");
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if !(dot.is_finite() && na.is_finite() && nb.is_finite()) {
        return f64::NAN;
    }
    if na == 0.0 && nb == 0.0 {
        return 1.0;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0)
}

/// `-log softmax(logits)[target]` in f64 (max-subtracted log-sum-exp). NaN when a logit is NaN or Inf.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let t = target as usize;
    assert!(
        t < logits.len(),
        "target {t} outside {} logits",
        logits.len()
    );
    let mut max = f64::NEG_INFINITY;
    for &x in logits {
        if !x.is_finite() {
            return f64::NAN;
        }
        max = max.max(x as f64);
    }
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - logits[t] as f64
}

/// Perplexity `exp(mean NLL)` of a total NLL over `count` predictions.
pub fn perplexity(total_nll: f64, count: usize) -> f64 {
    if count == 0 {
        return f64::NAN;
    }
    (total_nll / count as f64).exp()
}

/// Mean and minimum of a stream of values; any NaN makes both NaN.
#[derive(Debug, Clone, Copy)]
pub struct MeanMin {
    sum: f64,
    min: f64,
    count: usize,
    nan: bool,
}

impl Default for MeanMin {
    fn default() -> Self {
        MeanMin {
            sum: 0.0,
            min: f64::INFINITY,
            count: 0,
            nan: false,
        }
    }
}

impl MeanMin {
    pub fn push(&mut self, x: f64) {
        if x.is_nan() {
            self.nan = true;
        } else {
            self.sum += x;
            self.min = self.min.min(x);
        }
        self.count += 1;
    }

    pub fn mean(&self) -> f64 {
        if self.nan || self.count == 0 {
            f64::NAN
        } else {
            self.sum / self.count as f64
        }
    }

    pub fn min(&self) -> f64 {
        if self.nan || self.count == 0 {
            f64::NAN
        } else {
            self.min
        }
    }
}

/// The first node whose value holds NaN or Inf.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NonFinite {
    /// Graph node, e.g. `layers.1.down_proj`, or `logits` when only the output was checked.
    pub node: String,
    /// Its op kind (`linear`, `rms_norm`, ...).
    pub op: String,
    /// The layer the node belongs to, when it is inside one.
    pub layer: Option<usize>,
    /// The weight the node reads (and its scale tensors), with `contains NaN/Inf` when that tensor holds one.
    pub tensors: Vec<String>,
    /// The first offending value (`NaN`, `inf` or `-inf` in JSON) and where it is (row within the step,
    /// column).
    #[serde(serialize_with = "value_as_text")]
    pub value: f32,
    pub row: usize,
    pub col: usize,
    /// Sequence positions of the step that held it (first position of the step).
    pub step_start: usize,
    /// Whether the node was located by tapping every node (`--check-finite`) or only the logits were seen.
    pub located: bool,
}

fn value_as_text<S: serde::Serializer>(v: &f32, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

impl fmt::Display for NonFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.located {
            return write!(
                f,
                "non-finite logits ({}); --check-finite locates the first node",
                self.value
            );
        }
        write!(f, "{} ({}) = {}", self.node, self.op, self.value)?;
        if !self.tensors.is_empty() {
            write!(f, " [{}]", self.tensors.join(", "))?;
        }
        Ok(())
    }
}

/// The first non-finite value of a matrix, as (row, col, value).
pub fn first_nonfinite_in(m: &Mat) -> Option<(usize, usize, f32)> {
    let i = m.data.iter().position(|x| !x.is_finite())?;
    Some((i / m.cols.max(1), i % m.cols.max(1), m.data[i]))
}

fn layer_of(node: &str) -> Option<usize> {
    node.strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Tensors a node reads, each marked when it holds NaN or Inf itself.
fn node_tensors(model: &Model, op: &Op) -> Vec<String> {
    let names: Vec<String> = match op {
        Op::Embed { table, .. } => vec![table.clone()],
        Op::RmsNorm {
            weight: Some(w), ..
        } => vec![w.clone()],
        Op::Linear { weight, scheme } => {
            let mut v = vec![weight.clone()];
            if *scheme != QuantScheme::Dense {
                v.extend(scheme.scale_tensors().into_iter().map(String::from));
            }
            v
        }
        _ => vec![],
    };
    names
        .into_iter()
        .map(|n| {
            let bad = model.weights.get(&n).is_some_and(|w| {
                matches!(
                    w.dtype,
                    crate::tensor::DType::F32
                        | crate::tensor::DType::BF16
                        | crate::tensor::DType::F16
                ) && w.to_f32().iter().any(|x| !x.is_finite())
            });
            if bad {
                format!("{n} contains NaN/Inf")
            } else {
                n
            }
        })
        .collect()
}

/// The first node, in graph order, whose tapped value holds NaN or Inf.
pub fn locate_nonfinite(
    model: &Model,
    taps: &std::collections::BTreeMap<String, Mat>,
    step_start: usize,
) -> Option<NonFinite> {
    locate_in_graph(&model.graph, taps).map(|(node, (row, col, value))| NonFinite {
        node: node.name.clone(),
        op: node.op.kind().to_string(),
        layer: layer_of(&node.name),
        tensors: node_tensors(model, &node.op),
        value,
        row,
        col,
        step_start,
        located: true,
    })
}

fn locate_in_graph<'g>(
    graph: &'g Graph,
    taps: &std::collections::BTreeMap<String, Mat>,
) -> Option<(&'g crate::graph::Node, (usize, usize, f32))> {
    graph.nodes.iter().find_map(|n| {
        taps.get(&n.name)
            .and_then(first_nonfinite_in)
            .map(|h| (n, h))
    })
}

/// Options of [`compare`].
#[derive(Clone, Copy)]
pub struct CompareOptions<'m> {
    /// Token that starts every sequence (the tokenizer's BOS), or none.
    pub bos: Option<u32>,
    /// Most rows (tokens of all sequences) in one step; bounds the memory of the logits.
    pub max_rows: usize,
    /// Tap every node of both graphs (model, baseline) and name the first non-finite one.
    pub check_finite: Option<[&'m Model; 2]>,
}

impl Default for CompareOptions<'_> {
    fn default() -> Self {
        CompareOptions {
            bos: None,
            max_rows: 512,
            check_finite: None,
        }
    }
}

/// One row of the precision table.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    pub config: String,
    pub batch: usize,
    pub seq: usize,
    /// Positions compared (B x S).
    pub positions: usize,
    pub cos_logits_mean: f64,
    pub cos_logits_min: f64,
    pub cos_hidden_mean: f64,
    pub cos_hidden_min: f64,
    /// Next-token predictions counted in each perplexity: B x (S-1).
    pub predictions: usize,
    pub ppl_model: f64,
    pub ppl_baseline: f64,
    pub pass: bool,
    /// First non-finite value of the model, and of the baseline.
    pub nonfinite_model: Option<NonFinite>,
    pub nonfinite_baseline: Option<NonFinite>,
    pub secs: f64,
}

/// The B sequences of `config`, consecutive from `text`, each started by `bos` when given.
pub fn make_sequences(text: &[u32], bos: Option<u32>, config: EvalConfig) -> Result<Vec<Vec<u32>>> {
    let per = config.seq - usize::from(bos.is_some());
    let need = config.text_tokens_needed(bos.is_some());
    if text.len() < need {
        return Err(Error::invalid(format!(
            "config {config} needs {need} text tokens but the text has {}",
            text.len()
        )));
    }
    Ok(text[..need]
        .chunks(per)
        .map(|c| bos.into_iter().chain(c.iter().copied()).collect())
        .collect())
}

struct SideState {
    nll: f64,
    nonfinite: Option<NonFinite>,
}

/// Run `config` on both runners (model `a`, baseline `b`) and compare them. Each runner needs B slots of at
/// least S tokens; slots 0..B are restarted.
pub fn compare(
    a: &mut dyn Runner,
    b: &mut dyn Runner,
    text: &[u32],
    config: EvalConfig,
    opts: &CompareOptions,
) -> Result<ConfigResult> {
    let t0 = Instant::now();
    let seqs = make_sequences(text, opts.bos, config)?;
    // Tapping every node keeps every value of the step: a quarter of the rows bounds that memory.
    let rows = match opts.check_finite {
        Some(_) => (opts.max_rows / 4).max(1),
        None => opts.max_rows,
    };
    let chunk = (rows / config.batch).max(1);
    let taps_for = |m: Option<&Model>| -> Vec<String> {
        match m {
            Some(m) => m.graph.nodes.iter().map(|n| n.name.clone()).collect(),
            None => vec![HIDDEN_TAP.to_string()],
        }
    };
    let tap_lists = [
        taps_for(opts.check_finite.map(|m| m[0])),
        taps_for(opts.check_finite.map(|m| m[1])),
    ];
    let (mut cos_l, mut cos_h) = (MeanMin::default(), MeanMin::default());
    let mut sides = [
        SideState {
            nll: 0.0,
            nonfinite: None,
        },
        SideState {
            nll: 0.0,
            nonfinite: None,
        },
    ];
    let mut predictions = 0;
    let mut start = 0;
    while start < config.seq {
        let end = (start + chunk).min(config.seq);
        let batch = Batch {
            seqs: seqs
                .iter()
                .enumerate()
                .map(|(i, s)| SeqStep {
                    slot: i,
                    start_pos: start,
                    tokens: s[start..end].to_vec(),
                    logits: LogitsFor::All,
                })
                .collect(),
        };
        let mut outs = Vec::with_capacity(2);
        for side in 0..2 {
            let out = if side == 0 {
                a.step(&batch, &tap_lists[0])?
            } else {
                b.step(&batch, &tap_lists[1])?
            };
            let st = &mut sides[side];
            if st.nonfinite.is_none() {
                st.nonfinite = match opts.check_finite {
                    Some(models) => locate_nonfinite(models[side], &out.taps, start),
                    None => first_nonfinite_in(&out.logits).map(|(row, col, value)| NonFinite {
                        node: "logits".into(),
                        op: "output".into(),
                        layer: None,
                        tensors: vec![],
                        value,
                        row,
                        col,
                        step_start: start,
                        located: false,
                    }),
                };
            }
            // Next-token NLL at every position but the last of each sequence.
            for (r, &(si, pos)) in out.rows.iter().enumerate() {
                if pos + 1 < config.seq {
                    st.nll += nll(out.logits.row(r), seqs[si][pos + 1]);
                    if side == 0 {
                        predictions += 1;
                    }
                }
            }
            outs.push(out);
        }
        let (oa, ob) = (&outs[0], &outs[1]);
        if oa.rows != ob.rows || oa.logits.cols != ob.logits.cols {
            return Err(Error::invalid(format!(
                "the model and the baseline disagree on the logits shape ({}x{} vs {}x{})",
                oa.logits.rows, oa.logits.cols, ob.logits.rows, ob.logits.cols
            )));
        }
        let hidden = |o: &crate::backend::StepOutput| -> Result<Mat> {
            o.taps
                .get(HIDDEN_TAP)
                .cloned()
                .ok_or_else(|| Error::invalid(format!("the step returned no `{HIDDEN_TAP}` tap")))
        };
        let (ha, hb) = (hidden(oa)?, hidden(ob)?);
        if ha.cols != hb.cols {
            return Err(Error::invalid(format!(
                "the model and the baseline have different hidden sizes ({} vs {})",
                ha.cols, hb.cols
            )));
        }
        for r in 0..oa.rows.len() {
            cos_l.push(cosine(oa.logits.row(r), ob.logits.row(r)));
            cos_h.push(cosine(ha.row(r), hb.row(r)));
        }
        start = end;
    }
    let [sa, sb] = sides;
    let (ppl_model, ppl_baseline) = (
        perplexity(sa.nll, predictions),
        perplexity(sb.nll, predictions),
    );
    let pass = cos_l.mean() >= PASS_COSINE
        && cos_h.mean() >= PASS_COSINE
        && ppl_model.is_finite()
        && sa.nonfinite.is_none();
    Ok(ConfigResult {
        config: config.to_string(),
        batch: config.batch,
        seq: config.seq,
        positions: config.tokens(),
        cos_logits_mean: cos_l.mean(),
        cos_logits_min: cos_l.min(),
        cos_hidden_mean: cos_h.mean(),
        cos_hidden_min: cos_h.min(),
        predictions,
        ppl_model,
        ppl_baseline,
        pass,
        nonfinite_model: sa.nonfinite,
        nonfinite_baseline: sb.nonfinite,
        secs: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn eval_cosine_orthogonal_identical_scaled_and_known_angle() {
        assert_eq!(cosine(&[1.0, 0.0, 0.0], &[0.0, 3.0, 0.0]), 0.0);
        assert!(close(
            cosine(&[0.3, -1.5, 2.0], &[0.3, -1.5, 2.0]),
            1.0,
            1e-12
        ));
        assert!(close(
            cosine(&[0.3, -1.5, 2.0], &[0.9, -4.5, 6.0]),
            1.0,
            1e-12
        ));
        assert!(close(
            cosine(&[0.3, -1.5, 2.0], &[-0.6, 3.0, -4.0]),
            -1.0,
            1e-12
        ));
        // 60 degrees: (1, 0) and (1/2, sqrt(3)/2).
        let c = cosine(&[1.0, 0.0], &[0.5, 3f32.sqrt() / 2.0]);
        assert!(close(c, 0.5, 1e-7), "{c}");
        // 45 degrees: (1, 0) and (1, 1) scaled.
        let c = cosine(&[2.0, 0.0], &[7.0, 7.0]);
        assert!(close(c, std::f64::consts::FRAC_1_SQRT_2, 1e-12), "{c}");
        assert_eq!(cosine(&[0.0, 0.0], &[0.0, 0.0]), 1.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!(cosine(&[f32::NAN, 1.0], &[1.0, 1.0]).is_nan());
        assert!(cosine(&[f32::INFINITY, 1.0], &[1.0, 1.0]).is_nan());
    }

    #[test]
    fn eval_perplexity_of_uniform_logits_is_the_vocab_size() {
        for v in [2usize, 7, 1000, 262_144] {
            for val in [0.0f32, 3.5, -40.0] {
                let logits = vec![val; v];
                let n = nll(&logits, (v / 2) as u32);
                let p = perplexity(n * 5.0, 5);
                assert!(close(p, v as f64, 1e-9 * v as f64), "V={v}: {p}");
            }
        }
    }

    #[test]
    fn eval_nll_and_perplexity_hand_computed() {
        // logits (0, ln 2, ln 3): probabilities 1/6, 2/6, 3/6.
        let l = [0.0f32, 2f32.ln(), 3f32.ln()];
        assert!(close(nll(&l, 0), 6f64.ln(), 1e-6));
        assert!(close(nll(&l, 1), 3f64.ln(), 1e-6));
        assert!(close(nll(&l, 2), 2f64.ln(), 1e-6));
        // Targets 2 then 1: mean NLL (ln 2 + ln 3) / 2, perplexity sqrt(6).
        let total = nll(&l, 2) + nll(&l, 1);
        assert!(close(perplexity(total, 2), 6f64.sqrt(), 1e-6));
        // Shift invariance and huge logits stay finite in f64.
        let big = [1000.0f32, 1000.0 + 2f32.ln(), 1000.0 + 3f32.ln()];
        assert!(close(nll(&big, 0), 6f64.ln(), 1e-4));
        assert!(nll(&[f32::NAN, 0.0], 1).is_nan());
        assert!(perplexity(0.0, 0).is_nan());
    }

    #[test]
    fn eval_mean_min_propagates_nan() {
        let mut s = MeanMin::default();
        for x in [1.0, 0.5, 0.75] {
            s.push(x);
        }
        assert_eq!(s.mean(), 0.75);
        assert_eq!(s.min(), 0.5);
        s.push(f64::NAN);
        assert!(s.mean().is_nan() && s.min().is_nan());
    }

    #[test]
    fn eval_configs_parse_and_default_rule() {
        assert_eq!(EvalConfig::parse("2x512").unwrap(), EvalConfig::new(2, 512));
        assert_eq!(
            EvalConfig::parse_list("1x128, 8X100").unwrap(),
            vec![EvalConfig::new(1, 128), EvalConfig::new(8, 100)]
        );
        for bad in ["", "2", "x5", "0x10", "2x1", "2x-3", "axb"] {
            let e = EvalConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains("BATCHxSEQ"), "{bad}: {e}");
        }
        let cpu: Vec<String> = CARD_CONFIGS
            .iter()
            .filter(|c| runs_by_default(**c, 18, true))
            .map(|c| c.to_string())
            .collect();
        assert_eq!(cpu, ["1x128", "2x512", "8x100"]);
        assert!(CARD_CONFIGS.iter().all(|c| runs_by_default(*c, 18, false)));
    }

    #[test]
    fn eval_sequences_are_consecutive_with_bos() {
        let text: Vec<u32> = (10..30).collect();
        let s = make_sequences(&text, Some(2), EvalConfig::new(3, 4)).unwrap();
        assert_eq!(
            s,
            vec![
                vec![2, 10, 11, 12],
                vec![2, 13, 14, 15],
                vec![2, 16, 17, 18]
            ]
        );
        let s = make_sequences(&text, None, EvalConfig::new(2, 3)).unwrap();
        assert_eq!(s, vec![vec![10, 11, 12], vec![13, 14, 15]]);
        let e = make_sequences(&text, Some(2), EvalConfig::new(8, 4))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 24") && e.contains("has 20"), "{e}");
    }
}
