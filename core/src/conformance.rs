//! Backend conformance suite in the shape of ggml's test-backend-ops: one case type per op, odd shapes,
//! every scheme. Each case builds a one-op graph (inputs come from F32 embedding tables, which every
//! backend gathers exactly), runs it on the backend under test and on the CPU reference, and checks NaN
//! positions first, then infinities by sign, then NMSE against a per-op threshold. "unsupported" is
//! reported apart from "failed" and never counted as passed. Runners that have guard regions
//! (`Runner::enable_guards`, ggml-style sentinel words around device buffers) are checked after every
//! step: an overwritten guard fails the case with the buffer and offset.
//!
//! It lives in the core crate so that the release binary can run it (`e4m3 conformance --backend ...`);
//! the integration tests run it through [`run_suite`]. The printed case name reruns one case:
//! `E4M3_CONFORMANCE_FILTER=<substring>` in the tests, `--filter <substring>` on the command line.

use crate::backend::{Backend, Batch, CacheConfig, KvCacheDtype, LogitsFor, SeqStep, StepInputs};
use crate::checkpoint::Weight;
use crate::cpu::CpuBackend;
use crate::error::Error;
use crate::fp8;
use crate::graph::{CacheLayer, Graph, ImageGroups, Op, QuantScheme, ValueId, WeightMap};
use crate::tensor::{DType, Mat};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Per-op NMSE thresholds (issue #4).
pub const NMSE_ELEMENTWISE: f64 = 1e-7;
pub const NMSE_NORM: f64 = 1e-6;
pub const NMSE_ROPE: f64 = 1e-3;
pub const NMSE_MATMUL: f64 = 5e-4;
pub const NMSE_ATTENTION: f64 = 5e-4;

pub struct Case {
    pub name: String,
    graph: Graph,
    weights: WeightMap,
    steps: Vec<Batch>,
    kv: KvCacheDtype,
    /// NMSE threshold; 0 means bit-exact.
    threshold: f64,
    /// Compare `Runner::step_top_k(batch, k)` (ids and values, as a `[rows, 2k]` matrix) instead of the
    /// logits.
    top_k: Option<usize>,
    /// Inputs of every step (image embeddings, bidirectional groups): run with `Runner::step_with_inputs`.
    inputs: Option<StepInputs>,
}

impl Case {
    /// The NMSE threshold of the case; 0 means bit-exact.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Passed { nmse: f64 },
    Failed(String),
    Unsupported(String),
}

impl Outcome {
    /// "passed", "failed" or "unsupported".
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Passed { .. } => "passed",
            Outcome::Failed(_) => "failed",
            Outcome::Unsupported(_) => "unsupported",
        }
    }
}

/// One case's result with what it was measured against.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    pub name: String,
    /// The case's NMSE threshold; 0 means bit-exact.
    pub threshold: f64,
    /// The worst NMSE over the case's steps, where one was measured (a failed case whose outputs had the
    /// reference's shape has the NMSE of the step that failed).
    pub nmse: Option<f64>,
    pub outcome: Outcome,
}

impl CaseResult {
    /// The reason of a failed or unsupported case.
    pub fn reason(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Passed { .. } => None,
            Outcome::Failed(r) | Outcome::Unsupported(r) => Some(r),
        }
    }

    /// `{"name", "status", "nmse", "threshold", "reason"}`; NMSE and reason are null where absent.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "status": self.outcome.status(),
            "nmse": self.nmse.filter(|n| n.is_finite()),
            "threshold": self.threshold,
            "reason": self.reason(),
        })
    }
}

#[derive(Debug, Default)]
pub struct Report {
    /// Name of the backend under test.
    pub backend: String,
    pub results: Vec<CaseResult>,
}

impl Report {
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Passed { .. }))
    }
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }
    pub fn unsupported(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Unsupported(_)))
    }

    /// `{"backend", "reference": "cpu", "passed", "failed", "unsupported", "cases": [...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": self.backend,
            "reference": "cpu",
            "passed": self.passed(),
            "failed": self.failed(),
            "unsupported": self.unsupported(),
            "cases": self.results.iter().map(CaseResult::to_json).collect::<Vec<_>>(),
        })
    }
}

/// Tensors of any dtype, held in memory.
pub fn weight_map(tensors: &[(String, DType, Vec<usize>, Vec<u8>)]) -> WeightMap {
    tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                Weight::from_bytes(n, *d, s.clone(), b.clone()).unwrap(),
            )
        })
        .collect()
}

fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::F8E4M3 => v.iter().map(|x| fp8::encode(*x)).collect(),
    }
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

/// A graph under construction with its weights; inputs are F32 embedding tables of `vocab` rows.
struct Builder {
    g: Graph,
    tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)>,
    rng: ChaCha8Rng,
}

impl Builder {
    fn new(vocab: usize, seed: u64) -> Builder {
        Builder {
            g: Graph::new(vocab),
            tensors: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
    fn tensor(&mut self, name: &str, dtype: DType, shape: Vec<usize>, v: &[f32]) {
        self.tensors
            .push((name.to_string(), dtype, shape, encode(dtype, v)));
    }
    fn input(&mut self, name: &str, cols: usize, amp: f32) -> ValueId {
        let v = self.g.vocab_size;
        let data = rand_vec(&mut self.rng, v * cols, amp);
        self.tensor(name, DType::F32, vec![v, cols], &data);
        self.g.add(
            name,
            Op::Embed {
                table: name.to_string(),
                scale: 1.0,
            },
            &[],
            cols,
        )
    }
    fn finish(
        mut self,
        name: String,
        out: ValueId,
        steps: Vec<Batch>,
        kv: KvCacheDtype,
        threshold: f64,
    ) -> Case {
        self.g.output = out;
        Case {
            name,
            weights: weight_map(&self.tensors),
            graph: self.g,
            steps,
            kv,
            threshold,
            top_k: None,
            inputs: None,
        }
    }
}

const VOCAB: usize = 16;

fn ids(n: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + salt) % VOCAB) as u32).collect()
}

fn elementwise_cases(out: &mut Vec<Case>) {
    for &cols in &[5usize, 13, 1000] {
        for &t in &[1usize, 7] {
            for kind in ["add", "scale", "softcap", "gelu_tanh_mul"] {
                let mut b = Builder::new(VOCAB, cols as u64 * 31 + t as u64);
                let x = b.input("a", cols, 8.0);
                let (op, inputs) = match kind {
                    "add" => (Op::Add, vec![x, b.input("b", cols, 8.0)]),
                    "scale" => (Op::Scale { factor: 0.37 }, vec![x]),
                    "softcap" => (Op::Softcap { cap: 5.0 }, vec![x]),
                    _ => (Op::GeluTanhMul, vec![x, b.input("b", cols, 3.0)]),
                };
                let y = b.g.add("y", op, &inputs, cols);
                let steps = vec![Batch::single(0, 0, ids(t, 1), LogitsFor::All)];
                out.push(b.finish(
                    format!("{kind}(cols={cols},rows={t})"),
                    y,
                    steps,
                    KvCacheDtype::Auto,
                    NMSE_ELEMENTWISE,
                ));
            }
        }
    }
}

fn embed_cases(out: &mut Vec<Case>) {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &cols in &[5usize, 13, 64] {
            let mut b = Builder::new(VOCAB, 7 + cols as u64);
            let data = rand_vec(&mut b.rng, VOCAB * cols, 4.0);
            b.tensor("table", dtype, vec![VOCAB, cols], &data);
            let y = b.g.add(
                "embed",
                Op::Embed {
                    table: "table".into(),
                    scale: 2.5,
                },
                &[],
                cols,
            );
            out.push(b.finish(
                format!("embed(dtype={dtype},cols={cols},rows=7)"),
                y,
                vec![Batch::single(0, 0, ids(7, 3), LogitsFor::All)],
                KvCacheDtype::Auto,
                0.0,
            ));
        }
    }
    // Every finite E4M3 code, decoded bit-exactly: one-hot rows through an FP8 weight-only linear
    // with unit scales give y[t][n] = decode(w[n][t]).
    let mut b = Builder::new(2, 1);
    b.tensor("x", DType::F32, vec![2, 2], &[1.0, 0.0, 0.0, 1.0]);
    let x = b.g.add(
        "x",
        Op::Embed {
            table: "x".into(),
            scale: 1.0,
        },
        &[],
        2,
    );
    let codes: Vec<u8> = (0u8..=0x7E).flat_map(|c| [c, c | 0x80]).collect();
    b.tensors
        .push(("w".into(), DType::F8E4M3, vec![127, 2], codes));
    b.tensor("ws", DType::F32, vec![1, 1], &[1.0]);
    let y = b.g.add(
        "y",
        Op::Linear {
            weight: "w".into(),
            scheme: QuantScheme::Fp8BlockWeightOnly {
                weight_scale: "ws".into(),
                block: [128, 128],
            },
        },
        &[x],
        127,
    );
    out.push(b.finish(
        "fp8_decode(all finite codes)".into(),
        y,
        vec![Batch::single(0, 0, vec![0, 1], LogitsFor::All)],
        KvCacheDtype::Auto,
        0.0,
    ));
}

fn norm_cases(out: &mut Vec<Case>) {
    for &(cols, group) in &[(7usize, 7usize), (13, 13), (15, 5), (640, 640), (1024, 256)] {
        for add_one in [true, false] {
            for with_w in [true, false] {
                if !with_w && add_one {
                    continue;
                }
                let mut b = Builder::new(VOCAB, cols as u64);
                let x = b.input("x", cols, 3.0);
                let weight = with_w.then(|| {
                    let w = rand_vec(&mut b.rng, group, 1.0);
                    b.tensor("w", DType::BF16, vec![group], &w);
                    "w".to_string()
                });
                let y = b.g.add(
                    "y",
                    Op::RmsNorm {
                        weight,
                        group,
                        eps: 1e-6,
                        add_one,
                    },
                    &[x],
                    cols,
                );
                out.push(b.finish(
                    format!(
                        "rms_norm(cols={cols},group={group},add_one={add_one},weight={with_w})"
                    ),
                    y,
                    vec![Batch::single(0, 0, ids(5, 2), LogitsFor::All)],
                    KvCacheDtype::Auto,
                    NMSE_NORM,
                ));
            }
        }
    }
}

/// An RMSNorm followed by its only consumer, a residual add or a RoPE: the shapes GPU backends fuse.
fn fused_norm_cases(out: &mut Vec<Case>) {
    for &(cols, group, then_rope) in &[
        (640usize, 640usize, false),
        (1000, 1000, false),
        (128, 64, true),
        (512, 256, true),
    ] {
        let mut b = Builder::new(VOCAB, (cols + group) as u64);
        let res = b.input("res", cols, 2.0);
        let x = b.input("x", cols, 3.0);
        let w = rand_vec(&mut b.rng, group, 1.0);
        b.tensor("w", DType::BF16, vec![group], &w);
        let n = b.g.add(
            "n",
            Op::RmsNorm {
                weight: Some("w".into()),
                group,
                eps: 1e-6,
                add_one: true,
            },
            &[x],
            cols,
        );
        let (y, name) = if then_rope {
            let inv_freq: Vec<f32> = (0..group / 2)
                .map(|i| 10000f32.powf(-2.0 * i as f32 / group as f32))
                .collect();
            let y = b.g.add(
                "y",
                Op::Rope {
                    head_dim: group,
                    inv_freq,
                },
                &[n],
                cols,
            );
            (y, format!("rms_norm+rope(cols={cols},head_dim={group})"))
        } else {
            let y = b.g.add("y", Op::Add, &[res, n], cols);
            (y, format!("rms_norm+add(cols={cols})"))
        };
        let steps = vec![
            Batch::single(0, 0, ids(5, 2), LogitsFor::All),
            Batch::single(0, 5, ids(1, 3), LogitsFor::All),
        ];
        out.push(b.finish(name, y, steps, KvCacheDtype::Auto, NMSE_ROPE.min(NMSE_NORM)));
    }
}

fn rope_cases(out: &mut Vec<Case>) {
    for &(head_dim, heads) in &[(4usize, 1usize), (8, 3), (64, 2), (256, 1)] {
        let mut b = Builder::new(VOCAB, head_dim as u64);
        let x = b.input("x", head_dim * heads, 2.0);
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 10000f32.powf(-2.0 * i as f32 / head_dim as f32))
            .collect();
        let y =
            b.g.add("y", Op::Rope { head_dim, inv_freq }, &[x], head_dim * heads);
        // Positions 0..5, then 5..8, then 300: the cache slot is only used for its length.
        let steps = vec![
            Batch::single(0, 0, ids(5, 0), LogitsFor::All),
            Batch::single(0, 5, ids(3, 1), LogitsFor::All),
            Batch::single(0, 8, ids(1, 2), LogitsFor::All),
        ];
        out.push(b.finish(
            format!("rope(head_dim={head_dim},heads={heads})"),
            y,
            steps,
            KvCacheDtype::Auto,
            NMSE_ROPE,
        ));
    }
}

fn select_cases(out: &mut Vec<Case>) {
    let mut b = Builder::new(VOCAB, 5);
    let x = b.input("x", 13, 2.0);
    let y = b.g.add("y", Op::SelectRows, &[x], 13);
    let steps = vec![Batch {
        seqs: vec![
            SeqStep {
                slot: 0,
                start_pos: 0,
                tokens: ids(4, 0),
                logits: LogitsFor::Last,
            },
            SeqStep {
                slot: 1,
                start_pos: 0,
                tokens: ids(3, 1),
                logits: LogitsFor::All,
            },
            SeqStep {
                slot: 2,
                start_pos: 0,
                tokens: ids(2, 2),
                logits: LogitsFor::None,
            },
        ],
    }];
    out.push(b.finish(
        "select_rows(cols=13,seqs=3)".into(),
        y,
        steps,
        KvCacheDtype::Auto,
        0.0,
    ));
}

/// `step_top_k` against the CPU's: ids and values bit-exact, rows wider than one GPU top-k chunk, k of 1,
/// 8 and 72 (top-k 64 sampling fetches 72), and k over the row width (fewer candidates than asked).
fn top_k_cases(out: &mut Vec<Case>) {
    for &(cols, k) in &[(20000usize, 1usize), (20000, 8), (20000, 72), (13, 20)] {
        let mut b = Builder::new(VOCAB, (cols + k) as u64);
        let x = b.input("x", cols, 3.0);
        let y = b.g.add("y", Op::SelectRows, &[x], cols);
        let steps = vec![Batch {
            seqs: vec![
                SeqStep {
                    slot: 0,
                    start_pos: 0,
                    tokens: ids(3, 0),
                    logits: LogitsFor::All,
                },
                SeqStep {
                    slot: 1,
                    start_pos: 0,
                    tokens: ids(2, 5),
                    logits: LogitsFor::Last,
                },
            ],
        }];
        let mut case = b.finish(
            format!("top_k(cols={cols},k={k})"),
            y,
            steps,
            KvCacheDtype::Auto,
            0.0,
        );
        case.top_k = Some(k);
        out.push(case);
    }
}

fn linear_cases(out: &mut Vec<Case>) {
    let shapes = [
        (5usize, 7usize),
        (13, 11),
        (64, 33),
        (640, 129),
        (257, 300),
        (640, 256),
        // One activation row over 64 KiB (wgpu reads it from a storage buffer, not its uniform window).
        (16411, 3),
    ];
    for &(k, n) in &shapes {
        // 40 rows: prefill-sized, where GPU backends switch to tensor-core GEMMs (k, n multiples of 16).
        let rows: &[usize] = if (k, n) == (640, 256) {
            &[1, 5, 40]
        } else {
            &[1, 5]
        };
        for &t in rows {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let mut b = Builder::new(VOCAB, (k * n + t) as u64);
                let x = b.input("x", k, 2.0);
                let w = rand_vec(&mut b.rng, n * k, 0.5);
                b.tensor("w", dtype, vec![n, k], &w);
                let y = b.g.add(
                    "y",
                    Op::Linear {
                        weight: "w".into(),
                        scheme: QuantScheme::Dense,
                    },
                    &[x],
                    n,
                );
                out.push(b.finish(
                    format!("linear(dense,dtype={dtype},k={k},n={n},rows={t})"),
                    y,
                    vec![Batch::single(0, 0, ids(t, 5), LogitsFor::All)],
                    KvCacheDtype::Auto,
                    NMSE_MATMUL,
                ));
            }
            for scheme in ["fp8-static", "fp8-dynamic", "fp8-block-wo", "fp8-block"] {
                let blocks: &[[usize; 2]] = match scheme {
                    "fp8-block-wo" | "fp8-block" => &[[128, 128], [4, 8], [3, 5]],
                    _ => &[[0, 0]],
                };
                for &block in blocks {
                    let mut b = Builder::new(VOCAB, (k * n * 3 + t) as u64);
                    let x = b.input("x", k, 2.0);
                    let w = rand_vec(&mut b.rng, n * k, 300.0);
                    b.tensor("w", DType::F8E4M3, vec![n, k], &w);
                    let (ob, ib) = if block[0] > 0 {
                        (n.div_ceil(block[0]), k.div_ceil(block[1]))
                    } else {
                        (0, 0)
                    };
                    let sc = rand_vec(&mut b.rng, (ob * ib).max(n), 0.01)
                        .iter()
                        .map(|v| v.abs() + 1e-3)
                        .collect::<Vec<f32>>();
                    let qs = match scheme {
                        "fp8-static" => {
                            b.tensor("ws", DType::F32, vec![], &[0.0021]);
                            b.tensor("xs", DType::F32, vec![], &[0.0137]);
                            QuantScheme::Fp8Static {
                                weight_scale: "ws".into(),
                                input_scale: "xs".into(),
                            }
                        }
                        "fp8-dynamic" => {
                            b.tensor("ws", DType::BF16, vec![n, 1], &sc[..n]);
                            QuantScheme::Fp8Dynamic {
                                weight_scale: "ws".into(),
                            }
                        }
                        "fp8-block-wo" => {
                            b.tensor("ws", DType::F32, vec![ob, ib], &sc[..ob * ib]);
                            QuantScheme::Fp8BlockWeightOnly {
                                weight_scale: "ws".into(),
                                block,
                            }
                        }
                        _ => {
                            b.tensor("ws", DType::F32, vec![ob, ib], &sc[..ob * ib]);
                            QuantScheme::Fp8Block {
                                weight_scale_inv: "ws".into(),
                                block,
                            }
                        }
                    };
                    let y = b.g.add(
                        "y",
                        Op::Linear {
                            weight: "w".into(),
                            scheme: qs,
                        },
                        &[x],
                        n,
                    );
                    let bs = if block[0] > 0 {
                        format!(",block={}x{}", block[0], block[1])
                    } else {
                        String::new()
                    };
                    out.push(b.finish(
                        format!("linear({scheme}{bs},k={k},n={n},rows={t})"),
                        y,
                        vec![Batch::single(0, 0, ids(t, 5), LogitsFor::All)],
                        KvCacheDtype::Auto,
                        NMSE_MATMUL,
                    ));
                }
            }
        }
    }
}

fn attention_cases(out: &mut Vec<Case>) {
    let geoms = [
        (4usize, 2usize, 8usize),
        (2, 1, 13),
        (3, 3, 64),
        (4, 1, 256),
        (2, 1, 512),
    ];
    for &(nh, nkv, d) in &geoms {
        for window in [None, Some(3usize)] {
            for softcap in [None, Some(5.0f32)] {
                for kv in [KvCacheDtype::Auto, KvCacheDtype::Bf16, KvCacheDtype::Fp8] {
                    if softcap.is_some() && (kv != KvCacheDtype::Auto || d > 64) {
                        continue;
                    }
                    let mut b = Builder::new(VOCAB, (nh * 100 + d) as u64);
                    let q = b.input("q", nh * d, 1.5);
                    let k = b.input("k", nkv * d, 1.5);
                    let v = b.input("v", nkv * d, 2.0);
                    let mut layer = CacheLayer {
                        n_kv_heads: nkv,
                        head_dim: d,
                        window,
                        k_scale: None,
                        v_scale: None,
                    };
                    if kv == KvCacheDtype::Fp8 {
                        b.tensor("k_scale", DType::F32, vec![], &[0.01]);
                        b.tensor("v_scale", DType::F32, vec![], &[0.02]);
                        layer.k_scale = Some("k_scale".into());
                        layer.v_scale = Some("v_scale".into());
                    }
                    b.g.cache_layers.push(layer);
                    let y = b.g.add(
                        "attn",
                        Op::Attention {
                            cache_layer: 0,
                            n_heads: nh,
                            n_kv_heads: nkv,
                            head_dim: d,
                            scale: 1.0 / (d as f32).sqrt(),
                            window,
                            softcap,
                            image_groups: ImageGroups::Off,
                        },
                        &[q, k, v],
                        nh * d,
                    );
                    // Prefill of two sequences in one step, then decode steps for both, then a restart.
                    let seq = |slot, start, tokens: Vec<u32>| SeqStep {
                        slot,
                        start_pos: start,
                        tokens,
                        logits: LogitsFor::All,
                    };
                    let steps = vec![
                        Batch {
                            seqs: vec![seq(0, 0, ids(7, 0)), seq(1, 0, ids(5, 3))],
                        },
                        Batch {
                            seqs: vec![seq(1, 5, ids(1, 4)), seq(0, 7, ids(1, 2))],
                        },
                        Batch {
                            seqs: vec![seq(0, 8, ids(2, 6))],
                        },
                        Batch {
                            seqs: vec![seq(1, 0, ids(4, 9))],
                        },
                    ];
                    out.push(b.finish(
                        format!(
                            "attention(heads={nh},kv_heads={nkv},head_dim={d},window={window:?},softcap={softcap:?},kv={})",
                            kv.name()
                        ),
                        y,
                        steps,
                        kv,
                        NMSE_ATTENTION,
                    ));
                }
            }
        }
    }
}

/// Sequences longer than a KV-cache page and a ring that wraps within one step: prefill of 37 and 20
/// tokens, decode steps, a chunk of 18, with and without a 20-token window.
fn long_attention_cases(out: &mut Vec<Case>) {
    let (nh, nkv, d) = (4usize, 2usize, 64usize);
    for window in [None, Some(20usize)] {
        for kv in [KvCacheDtype::Auto, KvCacheDtype::Bf16, KvCacheDtype::Fp8] {
            let mut b = Builder::new(VOCAB, 7 + d as u64);
            let q = b.input("q", nh * d, 1.5);
            let k = b.input("k", nkv * d, 1.5);
            let v = b.input("v", nkv * d, 2.0);
            b.g.cache_layers.push(CacheLayer {
                n_kv_heads: nkv,
                head_dim: d,
                window,
                k_scale: None,
                v_scale: None,
            });
            let y = b.g.add(
                "attn",
                Op::Attention {
                    cache_layer: 0,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: d,
                    scale: 1.0 / (d as f32).sqrt(),
                    window,
                    softcap: None,
                    image_groups: ImageGroups::Off,
                },
                &[q, k, v],
                nh * d,
            );
            let seq = |slot, start, tokens: Vec<u32>| SeqStep {
                slot,
                start_pos: start,
                tokens,
                logits: LogitsFor::All,
            };
            let steps = vec![
                Batch {
                    seqs: vec![seq(0, 0, ids(37, 0)), seq(1, 0, ids(20, 3))],
                },
                Batch {
                    seqs: vec![seq(1, 20, ids(1, 4)), seq(0, 37, ids(1, 2))],
                },
                Batch {
                    seqs: vec![seq(0, 38, ids(18, 6))],
                },
                Batch {
                    seqs: vec![seq(0, 56, ids(1, 8)), seq(1, 21, ids(1, 9))],
                },
            ];
            out.push(b.finish(
                format!(
                    "attention(heads={nh},kv_heads={nkv},head_dim={d},window={window:?},kv={},long)",
                    kv.name()
                ),
                y,
                steps,
                kv,
                NMSE_ATTENTION,
            ));
        }
    }
}

/// Every case of the suite.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    embed_cases(&mut out);
    elementwise_cases(&mut out);
    norm_cases(&mut out);
    fused_norm_cases(&mut out);
    rope_cases(&mut out);
    select_cases(&mut out);
    top_k_cases(&mut out);
    linear_cases(&mut out);
    attention_cases(&mut out);
    long_attention_cases(&mut out);
    gemma4_cases(&mut out);
    vision_cases(&mut out);
    gemma4_vision_cases(&mut out);
    out
}

/// The Gemma 4 ops (issue #8): column slices (per-layer embeddings), attention over another layer's cache
/// (KV sharing), MoE routing and fused-expert MLPs, dense and in the block FP8 schemes.
fn gemma4_cases(out: &mut Vec<Case>) {
    for &(cols, start, width) in &[(12usize, 4usize, 4usize), (40, 0, 8), (1000, 744, 256)] {
        for &t in &[1usize, 7] {
            let mut b = Builder::new(VOCAB, (cols + start + t) as u64);
            let x = b.input("x", cols, 4.0);
            let y = b.g.add("y", Op::SliceCols { start }, &[x], width);
            out.push(b.finish(
                format!("slice_cols(cols={cols},start={start},width={width},rows={t})"),
                y,
                vec![Batch::single(0, 0, ids(t, 2), LogitsFor::All)],
                KvCacheDtype::Auto,
                0.0,
            ));
        }
    }
    for &(nh, nkv, d) in &[(4usize, 2usize, 8usize), (2, 1, 64), (2, 1, 512)] {
        for window in [None, Some(3usize)] {
            let mut b = Builder::new(VOCAB, (nh * 31 + d) as u64);
            let q = b.input("q", nh * d, 1.5);
            let q2 = b.input("q2", nh * d, 1.5);
            let k = b.input("k", nkv * d, 1.5);
            let v = b.input("v", nkv * d, 2.0);
            b.g.cache_layers.push(CacheLayer {
                n_kv_heads: nkv,
                head_dim: d,
                window,
                k_scale: None,
                v_scale: None,
            });
            let geom = (0, nh, nkv, d, 1.0f32, window);
            let owner = b.g.add(
                "owner",
                Op::Attention {
                    cache_layer: geom.0,
                    n_heads: geom.1,
                    n_kv_heads: geom.2,
                    head_dim: geom.3,
                    scale: geom.4,
                    window: geom.5,
                    softcap: None,
                    image_groups: ImageGroups::Off,
                },
                &[q, k, v],
                nh * d,
            );
            let shared = b.g.add(
                "shared",
                Op::AttentionShared {
                    cache_layer: geom.0,
                    n_heads: geom.1,
                    n_kv_heads: geom.2,
                    head_dim: geom.3,
                    scale: geom.4,
                    window: geom.5,
                    softcap: None,
                    image_groups: ImageGroups::Off,
                },
                &[q2, k, v],
                nh * d,
            );
            let y = b.g.add("y", Op::Add, &[owner, shared], nh * d);
            let seq = |slot, start, tokens: Vec<u32>| SeqStep {
                slot,
                start_pos: start,
                tokens,
                logits: LogitsFor::All,
            };
            let steps = vec![
                Batch {
                    seqs: vec![seq(0, 0, ids(7, 0)), seq(1, 0, ids(5, 3))],
                },
                Batch {
                    seqs: vec![seq(1, 5, ids(1, 4)), seq(0, 7, ids(1, 2))],
                },
                Batch {
                    seqs: vec![seq(0, 8, ids(2, 6))],
                },
            ];
            out.push(b.finish(
                format!(
                    "attention_shared(heads={nh},kv_heads={nkv},head_dim={d},window={window:?})"
                ),
                y,
                steps,
                KvCacheDtype::Auto,
                NMSE_ATTENTION,
            ));
        }
    }
    for &(e, k) in &[(4usize, 2usize), (128, 8), (5, 5)] {
        for &t in &[1usize, 7] {
            let mut b = Builder::new(VOCAB, (e * 7 + k + t) as u64);
            let logits = b.input("logits", e, 3.0);
            let scale = rand_vec(&mut b.rng, e, 0.5)
                .iter()
                .map(|v| v + 1.0)
                .collect::<Vec<f32>>();
            b.tensor("per_expert_scale", DType::F32, vec![e], &scale);
            let y = b.g.add(
                "y",
                Op::RouterTopK {
                    top_k: k,
                    per_expert_scale: "per_expert_scale".into(),
                },
                &[logits],
                e,
            );
            out.push(b.finish(
                format!("router_topk(experts={e},top_k={k},rows={t})"),
                y,
                vec![Batch::single(0, 0, ids(t, 1), LogitsFor::All)],
                KvCacheDtype::Auto,
                NMSE_ELEMENTWISE,
            ));
        }
    }
    for &(e, top, h, im) in &[(4usize, 2usize, 16usize, 8usize), (8, 3, 64, 40)] {
        for scheme in ["dense-f32", "dense-bf16", "fp8-block-wo", "fp8-block"] {
            let mut b = Builder::new(VOCAB, (e * h + im) as u64);
            let x = b.input("x", h, 2.0);
            let logits = b.input("logits", e, 3.0);
            b.tensor("pes", DType::F32, vec![e], &vec![1.0; e]);
            let route = b.g.add(
                "route",
                Op::RouterTopK {
                    top_k: top,
                    per_expert_scale: "pes".into(),
                },
                &[logits],
                e,
            );
            let block = [16usize, 32usize];
            let make = |b: &mut Builder, name: &str, rows: usize, cols: usize| -> QuantScheme {
                let (dtype, amp) = match scheme {
                    "dense-f32" => (DType::F32, 0.3),
                    "dense-bf16" => (DType::BF16, 0.3),
                    _ => (DType::F8E4M3, 300.0),
                };
                let w = rand_vec(&mut b.rng, e * rows * cols, amp);
                b.tensor(name, dtype, vec![e, rows, cols], &w);
                let (ob, ib) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
                let sc = rand_vec(&mut b.rng, e * ob * ib, 0.001)
                    .iter()
                    .map(|v| v.abs() + 5e-4)
                    .collect::<Vec<f32>>();
                let sn = format!("{name}_scale");
                match scheme {
                    "fp8-block-wo" => {
                        b.tensor(&sn, DType::F32, vec![e, ob, ib], &sc);
                        QuantScheme::Fp8BlockWeightOnly {
                            weight_scale: sn,
                            block,
                        }
                    }
                    "fp8-block" => {
                        b.tensor(&sn, DType::F32, vec![e, ob, ib], &sc);
                        QuantScheme::Fp8Block {
                            weight_scale_inv: sn,
                            block,
                        }
                    }
                    _ => QuantScheme::Dense,
                }
            };
            let gate_up_scheme = make(&mut b, "gate_up", 2 * im, h);
            let down_scheme = make(&mut b, "down", h, im);
            let y = b.g.add(
                "y",
                Op::MoeExperts {
                    gate_up: "gate_up".into(),
                    down: "down".into(),
                    n_experts: e,
                    intermediate: im,
                    gate_up_scheme,
                    down_scheme,
                },
                &[x, route],
                h,
            );
            for &t in &[1usize, 9] {
                let mut c = Builder {
                    g: b.g.clone(),
                    tensors: b.tensors.clone(),
                    rng: b.rng.clone(),
                };
                c.g.output = y;
                out.push(c.finish(
                    format!("moe_experts({scheme},experts={e},top_k={top},hidden={h},inter={im},rows={t})"),
                    y,
                    vec![Batch::single(0, 0, ids(t, 3), LogitsFor::All)],
                    KvCacheDtype::Auto,
                    NMSE_MATMUL,
                ));
            }
        }
    }
}

/// The vision-encoder ops (issue #9) and the image inputs of a text step: rows given as embeddings, and
/// causal attention made bidirectional within an image group.
fn vision_cases(out: &mut Vec<Case>) {
    let seq = |slot, tokens: Vec<u32>| SeqStep {
        slot,
        start_pos: 0,
        tokens,
        logits: LogitsFor::All,
    };
    for &cols in &[5usize, 13, 1000] {
        for kind in ["bias_add", "gelu_tanh", "layer_norm"] {
            let mut b = Builder::new(VOCAB, cols as u64 * 17 + 3);
            let x = b.input("x", cols, 4.0);
            let w = rand_vec(&mut b.rng, cols, 1.0);
            b.tensor("w", DType::BF16, vec![cols], &w);
            let bias = rand_vec(&mut b.rng, cols, 1.0);
            b.tensor("b", DType::F32, vec![cols], &bias);
            let (op, threshold) = match kind {
                "bias_add" => (Op::BiasAdd { bias: "b".into() }, NMSE_ELEMENTWISE),
                "gelu_tanh" => (Op::GeluTanh, NMSE_ELEMENTWISE),
                _ => (
                    Op::LayerNorm {
                        weight: "w".into(),
                        bias: "b".into(),
                        eps: 1e-6,
                    },
                    NMSE_NORM,
                ),
            };
            let y = b.g.add("y", op, &[x], cols);
            out.push(b.finish(
                format!("{kind}(cols={cols},rows=7)"),
                y,
                vec![Batch::single(0, 0, ids(7, 2), LogitsFor::All)],
                KvCacheDtype::Auto,
                threshold,
            ));
        }
    }
    // Two images (sequences) of different lengths in one step; SigLIP's 16 heads of 72; sequences longer
    // than a GPU kernel's tile of keys (64) and not multiples of its query rows, with distinct keys (a
    // table of 256 rows) so that later tiles hold larger scores.
    for &(nh, d, lens, vocab) in &[
        (2usize, 8usize, [5usize, 9usize], VOCAB),
        (16, 72, [16, 3], VOCAB),
        (2, 16, [130, 67], 256),
    ] {
        let mut b = Builder::new(vocab, (nh * 10 + d) as u64);
        let q = b.input("q", nh * d, 1.5);
        let k = b.input("k", nh * d, 1.5);
        let v = b.input("v", nh * d, 2.0);
        let y = b.g.add(
            "attn",
            Op::EncoderAttention {
                n_heads: nh,
                head_dim: d,
                scale: 1.0 / (d as f32).sqrt(),
            },
            &[q, k, v],
            nh * d,
        );
        let toks =
            |n: usize, salt: usize| (0..n).map(|i| ((i * 7 + salt) % vocab) as u32).collect();
        let steps = vec![Batch {
            seqs: vec![seq(0, toks(lens[0], 1)), seq(1, toks(lens[1], 5))],
        }];
        out.push(b.finish(
            format!("encoder_attention(heads={nh},head_dim={d},rows={lens:?})"),
            y,
            steps,
            KvCacheDtype::Auto,
            NMSE_ATTENTION,
        ));
    }
    for &(side, kernel, cols) in &[(4usize, 2usize, 5usize), (8, 4, 24)] {
        let mut b = Builder::new(VOCAB, (side * 7 + cols) as u64);
        let x = b.input("x", cols, 3.0);
        let y = b.g.add("y", Op::AvgPool2d { side, kernel }, &[x], cols);
        let n = side * side;
        let steps = vec![Batch {
            seqs: vec![seq(0, ids(n, 0)), seq(1, ids(n, 3))],
        }];
        out.push(b.finish(
            format!("avg_pool2d(side={side},kernel={kernel},cols={cols},images=2)"),
            y,
            steps,
            KvCacheDtype::Auto,
            NMSE_ELEMENTWISE,
        ));
    }
    // A step whose rows are all given (an encoder's patches).
    let mut b = Builder::new(VOCAB, 99);
    let y = b.g.add("patches", Op::Input, &[], 11);
    let given = rand_vec(&mut b.rng, 6 * 11, 2.0);
    let mut case = b.finish(
        "input(rows=6,cols=11)".into(),
        y,
        vec![Batch::single(0, 0, ids(6, 0), LogitsFor::All)],
        KvCacheDtype::Auto,
        0.0,
    );
    case.inputs = Some(StepInputs {
        embed_rows: (0..6).collect(),
        embeds: Mat::from_vec(6, 11, given).expect("6x11"),
        groups: vec![],
    });
    out.push(case);
    // A text step with an image: given embedding rows, and attention causal except within each image
    // (window 3 smaller than an image on the sliding variant), two sequences in one step.
    // Off (Gemma 4's full layers): the groups are ignored, plain causal; WholeGroup: the image past the window.
    for (window, image_groups) in [
        (None, ImageGroups::Windowed),
        (Some(3usize), ImageGroups::Windowed),
        (Some(3), ImageGroups::Off),
        (Some(3), ImageGroups::WholeGroup),
    ] {
        let (nh, nkv, d) = (4usize, 2usize, 8usize);
        let mut b = Builder::new(VOCAB, 77 + window.unwrap_or(0) as u64);
        let table = rand_vec(&mut b.rng, VOCAB * nh * d, 1.0);
        b.tensor("table", DType::F32, vec![VOCAB, nh * d], &table);
        let x = b.g.add(
            "embed",
            Op::Embed {
                table: "table".into(),
                scale: 1.0,
            },
            &[],
            nh * d,
        );
        let wk = rand_vec(&mut b.rng, nkv * d * nh * d, 0.3);
        b.tensor("wk", DType::F32, vec![nkv * d, nh * d], &wk);
        let wv = rand_vec(&mut b.rng, nkv * d * nh * d, 0.3);
        b.tensor("wv", DType::F32, vec![nkv * d, nh * d], &wv);
        let lin = |b: &mut Builder, name: &str, w: &str| {
            b.g.add(
                name,
                Op::Linear {
                    weight: w.into(),
                    scheme: QuantScheme::Dense,
                },
                &[x],
                nkv * d,
            )
        };
        let k = lin(&mut b, "k", "wk");
        let v = lin(&mut b, "v", "wv");
        b.g.cache_layers.push(CacheLayer {
            n_kv_heads: nkv,
            head_dim: d,
            window,
            k_scale: None,
            v_scale: None,
        });
        let y = b.g.add(
            "attn",
            Op::Attention {
                cache_layer: 0,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: d,
                scale: 1.0 / (d as f32).sqrt(),
                window,
                softcap: None,
                image_groups,
            },
            &[x, k, v],
            nh * d,
        );
        let steps = vec![Batch {
            seqs: vec![seq(0, ids(10, 1)), seq(1, ids(6, 4))],
        }];
        // Rows 2..6 of sequence 0 are one image, 7..9 another; rows 1..4 of sequence 1 (10..14) a third.
        let img = |g| Some(g);
        let mut groups = vec![None; 16];
        (2..6).for_each(|r| groups[r] = img(0));
        (7..9).for_each(|r| groups[r] = img(1));
        (11..14).for_each(|r| groups[r] = img(2));
        let rows: Vec<usize> = (0..16).filter(|&r| groups[r].is_some()).collect();
        let given = rand_vec(&mut b.rng, rows.len() * nh * d, 1.0);
        let mut case = b.finish(
            format!("attention_image_groups(window={window:?},image_groups={image_groups:?})"),
            y,
            steps,
            KvCacheDtype::Auto,
            NMSE_ATTENTION,
        );
        case.inputs = Some(StepInputs {
            embeds: Mat::from_vec(rows.len(), nh * d, given).expect("rows x cols"),
            embed_rows: rows,
            groups,
        });
        out.push(case);
    }
}

/// The Gemma 4 vision-tower ops: rows' token ids are patch positions `x + size * y` (graph.rs).
fn gemma4_vision_cases(out: &mut Vec<Case>) {
    const SIZE: usize = 8;
    let seq = |slot, tokens: Vec<u32>| SeqStep {
        slot,
        start_pos: 0,
        tokens,
        logits: LogitsFor::All,
    };
    // Two images in one step: a 6x3 and a 3x3 patch grid, row-major (x fastest).
    let grid = |w: usize, h: usize| -> Vec<u32> {
        (0..h)
            .flat_map(|y| (0..w).map(move |x| (x + SIZE * y) as u32))
            .collect()
    };
    let images = || Batch {
        seqs: vec![seq(0, grid(6, 3)), seq(1, grid(3, 3))],
    };
    for &cols in &[5usize, 24] {
        let mut b = Builder::new(SIZE * SIZE, 500 + cols as u64);
        let t = rand_vec(&mut b.rng, 2 * SIZE * cols, 2.0);
        b.tensor("pos", DType::BF16, vec![2 * SIZE, cols], &t);
        let y = b.g.add(
            "y",
            Op::PosEmbed2d {
                table: "pos".into(),
                size: SIZE,
            },
            &[],
            cols,
        );
        out.push(b.finish(
            format!("pos_embed2d(size={SIZE},cols={cols})"),
            y,
            vec![images()],
            KvCacheDtype::Auto,
            NMSE_ELEMENTWISE,
        ));
    }
    for &(heads, d) in &[(1usize, 8usize), (3, 16)] {
        let mut b = Builder::new(SIZE * SIZE, 510 + d as u64);
        let x = b.input("x", heads * d, 2.0);
        let inv_freq: Vec<f32> = (0..d / 4)
            .map(|i| 100f32.powf(-(4.0 * i as f32) / d as f32))
            .collect();
        let y = b.g.add(
            "y",
            Op::Rope2d {
                head_dim: d,
                inv_freq,
                size: SIZE,
            },
            &[x],
            heads * d,
        );
        out.push(b.finish(
            format!("rope2d(heads={heads},head_dim={d})"),
            y,
            vec![images()],
            KvCacheDtype::Auto,
            NMSE_ROPE,
        ));
    }
    for &cols in &[4usize, 33] {
        let mut b = Builder::new(SIZE * SIZE, 520 + cols as u64);
        let x = b.input("x", cols, 3.0);
        let y = b.g.add(
            "y",
            Op::PoolPositions {
                kernel: 3,
                size: SIZE,
            },
            &[x],
            cols,
        );
        out.push(b.finish(
            format!("pool_positions(kernel=3,cols={cols},images=2)"),
            y,
            vec![images()],
            KvCacheDtype::Auto,
            NMSE_ELEMENTWISE,
        ));
    }
    for &cols in &[5usize, 1000] {
        let mut b = Builder::new(VOCAB, 530 + cols as u64);
        let x = b.input("x", cols, 4.0);
        let w = rand_vec(&mut b.rng, cols, 2.0);
        b.tensor("w", DType::BF16, vec![cols], &w);
        for (kind, op) in [
            (
                "clamp",
                Op::Clamp {
                    min: -1.5,
                    max: 0.75,
                },
            ),
            ("channel_scale", Op::ChannelScale { weight: "w".into() }),
        ] {
            let mut c = Builder::new(VOCAB, 0);
            c.g = b.g.clone();
            c.tensors = b.tensors.clone();
            let y = c.g.add("y", op, &[x], cols);
            out.push(c.finish(
                format!("{kind}(cols={cols},rows=7)"),
                y,
                vec![Batch::single(0, 0, ids(7, 3), LogitsFor::All)],
                KvCacheDtype::Auto,
                NMSE_ELEMENTWISE,
            ));
        }
    }
}

/// NMSE of `got` against the reference `want` over the positions where both are finite: sum of squared
/// differences over the reference's sum of squares (the plain sum where the reference is all zeros).
pub fn nmse(got: &Mat, want: &Mat) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in got.data.iter().zip(&want.data) {
        if a.is_finite() && b.is_finite() {
            num += (*a as f64 - *b as f64).powi(2);
            den += (*b as f64).powi(2);
        }
    }
    if den > 0.0 {
        num / den
    } else {
        num
    }
}

/// Compare `got` with the reference `want`: NaN positions, then infinities by sign, then NMSE.
pub fn compare(got: &Mat, want: &Mat, threshold: f64) -> Result<f64, String> {
    if got.rows != want.rows || got.cols != want.cols {
        return Err(format!(
            "shape {}x{} != reference {}x{}",
            got.rows, got.cols, want.rows, want.cols
        ));
    }
    for (i, (a, b)) in got.data.iter().zip(&want.data).enumerate() {
        if a.is_nan() != b.is_nan() {
            return Err(format!("NaN mismatch at {i}: got {a}, reference {b}"));
        }
    }
    for (i, (a, b)) in got.data.iter().zip(&want.data).enumerate() {
        if (a.is_infinite() || b.is_infinite()) && a != b {
            return Err(format!("infinity mismatch at {i}: got {a}, reference {b}"));
        }
    }
    let nmse = nmse(got, want);
    if threshold == 0.0 {
        if let Some((i, (a, b))) = got
            .data
            .iter()
            .zip(&want.data)
            .enumerate()
            .find(|(_, (a, b))| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()))
        {
            return Err(format!("not bit-exact at {i}: got {a:e}, reference {b:e}"));
        }
        return Ok(nmse);
    }
    if nmse.is_nan() || nmse > threshold {
        return Err(format!("NMSE {nmse:.3e} > {threshold:.0e}"));
    }
    Ok(nmse)
}

fn run_on(backend: &dyn Backend, case: &Case) -> Result<Vec<Mat>, Error> {
    // 64 positions a slot, or as many as the case's longest sequence.
    let longest = (case.steps.iter().flat_map(|b| &b.seqs))
        .map(|s| s.start_pos + s.tokens.len())
        .max()
        .unwrap_or(0);
    let mut runner = backend.load(
        &case.graph,
        &case.weights,
        CacheConfig::new(4, longest.max(64)).with_kv_dtype(case.kv),
    )?;
    let guarded = runner.enable_guards();
    case.steps
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let out = step_once(runner.as_mut(), b, case.top_k, case.inputs.as_ref())?;
            if guarded {
                runner
                    .check_guards()
                    .map_err(|e| Error::invalid(format!("step {i}: {e}")))?;
            }
            Ok(out)
        })
        .collect()
}

/// One step's logits, or its top-k as a `[rows, 2k]` matrix of (id, value) pairs.
fn step_once(
    runner: &mut dyn crate::backend::Runner,
    b: &Batch,
    top_k: Option<usize>,
    inputs: Option<&StepInputs>,
) -> Result<Mat, Error> {
    match (top_k, inputs) {
        (_, Some(inputs)) => runner.step_with_inputs(b, inputs, &[]).map(|o| o.logits),
        (None, None) => runner.step(b, &[]).map(|o| o.logits),
        (Some(k), None) => {
            let rows = runner.step_top_k(b, k)?;
            let mut m = Mat::zeros(rows.len(), 2 * k);
            for (r, cands) in rows.iter().enumerate() {
                // Missing candidates (fewer than k values) stay (-1, -1).
                for j in 0..k {
                    let (id, v) = cands.get(j).map_or((-1.0, -1.0), |c| (c.0 as f32, c.1));
                    m.data[r * 2 * k + 2 * j] = id;
                    m.data[r * 2 * k + 2 * j + 1] = v;
                }
            }
            Ok(m)
        }
    }
}

/// Run one case on `backend` against the CPU reference.
pub fn run_case(backend: &dyn Backend, case: &Case) -> Outcome {
    evaluate(backend, case).outcome
}

/// Run one case on `backend` against the CPU reference, with the NMSE and threshold.
pub fn evaluate(backend: &dyn Backend, case: &Case) -> CaseResult {
    let result = |nmse, outcome| CaseResult {
        name: case.name.clone(),
        threshold: case.threshold,
        nmse,
        outcome,
    };
    if let Some(n) = case.graph.nodes.iter().find(|n| !backend.supports(&n.op)) {
        return result(
            None,
            Outcome::Unsupported(format!("op `{}` (node `{}`)", n.op.kind(), n.name)),
        );
    }
    let want = match run_on(&CpuBackend, case) {
        Ok(w) => w,
        Err(e) => return result(None, Outcome::Failed(format!("CPU reference failed: {e}"))),
    };
    let got = match run_on(backend, case) {
        Ok(g) => g,
        Err(e @ Error::Unsupported { .. }) => {
            return result(None, Outcome::Unsupported(e.to_string()))
        }
        Err(e) => return result(None, Outcome::Failed(e.to_string())),
    };
    if got.len() != want.len() {
        return result(
            None,
            Outcome::Failed(format!("{} outputs, reference {}", got.len(), want.len())),
        );
    }
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        match compare(g, w, case.threshold) {
            Ok(n) => worst = worst.max(n),
            Err(e) => {
                let n = (g.rows == w.rows && g.cols == w.cols).then(|| nmse(g, w));
                return result(n, Outcome::Failed(format!("step {i}: {e}")));
            }
        }
    }
    result(Some(worst), Outcome::Passed { nmse: worst })
}

/// Run every case whose name contains `filter` (all when None), calling `each` after every case as it
/// finishes. Nothing is printed, and the environment is not read.
pub fn run_cases(
    backend: &dyn Backend,
    filter: Option<&str>,
    mut each: impl FnMut(&CaseResult),
) -> Report {
    let mut report = Report {
        backend: backend.name(),
        results: Vec::new(),
    };
    for case in cases() {
        if filter.is_some_and(|f| !case.name.contains(f)) {
            continue;
        }
        let r = evaluate(backend, &case);
        each(&r);
        report.results.push(r);
    }
    report
}

/// Run every case whose name contains `filter` (all when None; `E4M3_CONFORMANCE_FILTER` otherwise),
/// printing one line per case.
pub fn run_suite(backend: &dyn Backend, filter: Option<&str>) -> Report {
    let env = std::env::var("E4M3_CONFORMANCE_FILTER").ok();
    let filter = filter.or(env.as_deref());
    let name = backend.name();
    let report = run_cases(backend, filter, |r| match &r.outcome {
        Outcome::Passed { nmse } => println!("  {} [{name}]: OK (nmse {nmse:.2e})", r.name),
        Outcome::Failed(e) => println!("  {} [{name}]: FAIL: {e}", r.name),
        Outcome::Unsupported(e) => println!("  {} [{name}]: not supported: {e}", r.name),
    });
    println!(
        "{name}: {} passed, {} failed, {} unsupported (rerun one case: E4M3_CONFORMANCE_FILTER='<case>')",
        report.passed(),
        report.failed(),
        report.unsupported()
    );
    report
}

/// The random generator is part of the suite's definition; keep it reachable for callers' own cases.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A Weight from f32 values in `dtype` (for callers' own cases).
pub fn weight(name: &str, dtype: DType, shape: Vec<usize>, v: &[f32]) -> Weight {
    weight_map(&[(name.to_string(), dtype, shape, encode(dtype, v))])[name].clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma4_cases_run_on_cpu_and_gpu_support_follows_the_backend() {
        let names = [
            "slice_cols(",
            "attention_shared(",
            "router_topk(",
            "moe_experts(",
        ];
        for n in names {
            let report = run_cases(&CpuBackend, Some(n), |_| {});
            assert!(report.results.len() >= 4, "{n}");
            assert_eq!(report.passed(), report.results.len(), "{n}");
        }
        // A GPU backend without Gemma 4 kernels (prepare::gpu_supports with `gemma4` false) refuses exactly
        // these cases, one without vision kernels exactly the cases with a vision-encoder op, one without
        // Gemma 4 vision kernels exactly those with a Gemma 4 vision-tower op; one with all runs every case.
        const VISION: [&str; 6] = [
            "input",
            "bias_add",
            "layer_norm",
            "gelu_tanh",
            "encoder_attention",
            "avg_pool2d",
        ];
        const VISION4: [&str; 5] = [
            "pos_embed2d",
            "rope2d",
            "pool_positions",
            "clamp",
            "channel_scale",
        ];
        let mut seen = [0usize; 3];
        for c in cases() {
            let ok = |gemma4, vision, vision4| {
                c.graph
                    .nodes
                    .iter()
                    .all(|n| crate::prepare::gpu_supports(&n.op, 512, gemma4, vision, vision4))
            };
            let has = |kinds: &[&str]| c.graph.nodes.iter().any(|n| kinds.contains(&n.op.kind()));
            let gemma4 = names.iter().any(|n| c.name.starts_with(n));
            let (vision, vision4) = (has(&VISION), has(&VISION4));
            for (k, on) in [gemma4, vision, vision4].into_iter().enumerate() {
                seen[k] += on as usize;
            }
            assert_eq!(ok(false, true, true), !gemma4, "{}", c.name);
            assert_eq!(ok(true, false, true), !vision, "{}", c.name);
            assert_eq!(ok(true, true, false), !vision4, "{}", c.name);
            assert!(ok(true, true, true), "{}", c.name);
        }
        assert!(seen.iter().all(|&n| n >= 4), "{seen:?}");
    }

    #[test]
    fn cpu_against_itself_is_exact() {
        let report = run_cases(&CpuBackend, Some("rms_norm(cols=15"), |_| {});
        assert_eq!(report.backend, CpuBackend.name());
        assert_eq!(report.results.len(), 3);
        for r in &report.results {
            assert_eq!(r.outcome, Outcome::Passed { nmse: 0.0 }, "{}", r.name);
            assert_eq!(r.nmse, Some(0.0));
            assert_eq!(r.threshold, NMSE_NORM);
        }
        let v = report.to_json();
        assert_eq!(v["passed"], 3);
        assert_eq!(v["cases"][0]["status"], "passed");
        assert_eq!(v["cases"][0]["nmse"], 0.0);
        assert!(v["cases"][0]["reason"].is_null());
    }

    /// The CPU backend with every output scaled by 1.01 and without RoPE: a backend that fails and one
    /// that lacks an op.
    struct Skewed;
    struct SkewedRunner(Box<dyn crate::backend::Runner>);

    impl Backend for Skewed {
        fn name(&self) -> String {
            "skewed".into()
        }
        fn supports(&self, op: &Op) -> bool {
            !matches!(op, Op::Rope { .. })
        }
        fn load(
            &self,
            graph: &Graph,
            weights: &WeightMap,
            cache: CacheConfig,
        ) -> crate::Result<Box<dyn crate::backend::Runner>> {
            Ok(Box::new(SkewedRunner(
                CpuBackend.load(graph, weights, cache)?,
            )))
        }
    }

    impl crate::backend::Runner for SkewedRunner {
        fn step(
            &mut self,
            batch: &Batch,
            taps: &[String],
        ) -> crate::Result<crate::backend::StepOutput> {
            let mut out = self.0.step(batch, taps)?;
            out.logits.data.iter_mut().for_each(|x| *x *= 1.01);
            Ok(out)
        }
        fn release(&mut self, slot: usize) -> crate::Result<()> {
            self.0.release(slot)
        }
        fn seq_len(&self, slot: usize) -> usize {
            self.0.seq_len(slot)
        }
    }

    #[test]
    fn failures_carry_the_nmse_and_unsupported_is_apart() {
        let report = run_cases(&Skewed, Some("(head_dim=8,heads=3)"), |_| {});
        assert_eq!(report.results.len(), 1);
        assert_eq!(report.unsupported(), 1);
        assert_eq!(report.failed(), 0);
        assert!(report.results[0].reason().unwrap().contains("rope"));
        let report = run_cases(&Skewed, Some("scale(cols=13,rows=7)"), |_| {});
        let r = &report.results[0];
        assert!(
            matches!(&r.outcome, Outcome::Failed(e) if e.contains("NMSE")),
            "{r:?}"
        );
        let n = r.nmse.unwrap();
        assert!((n - 1e-4).abs() < 1e-6, "{n}");
        let v = report.to_json();
        assert_eq!(v["failed"], 1);
        assert_eq!(v["cases"][0]["status"], "failed");
        assert_eq!(v["cases"][0]["threshold"], NMSE_ELEMENTWISE);
        assert!(v["cases"][0]["reason"].as_str().unwrap().contains("step 0"));
    }

    /// The CPU backend whose runner also copies each step's logits into a host buffer between guard
    /// regions, one value too many: a backend with an out-of-bounds write.
    struct Overflowing;
    struct OverflowingRunner {
        inner: Box<dyn crate::backend::Runner>,
        guarded: bool,
        buf: Vec<u8>,
    }
    const G: usize = 64;

    impl Backend for Overflowing {
        fn name(&self) -> String {
            "overflowing".into()
        }
        fn supports(&self, _: &Op) -> bool {
            true
        }
        fn load(
            &self,
            graph: &Graph,
            weights: &WeightMap,
            cache: CacheConfig,
        ) -> crate::Result<Box<dyn crate::backend::Runner>> {
            Ok(Box::new(OverflowingRunner {
                inner: CpuBackend.load(graph, weights, cache)?,
                guarded: false,
                buf: Vec::new(),
            }))
        }
    }

    impl crate::backend::Runner for OverflowingRunner {
        fn step(
            &mut self,
            batch: &Batch,
            taps: &[String],
        ) -> crate::Result<crate::backend::StepOutput> {
            let out = self.inner.step(batch, taps)?;
            let n = out.logits.data.len() * 4;
            self.buf = crate::backend::guard_fill(G + n + G);
            for (i, v) in out.logits.data.iter().chain([&1.0]).enumerate() {
                self.buf[G + 4 * i..G + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
            Ok(out)
        }
        fn enable_guards(&mut self) -> bool {
            self.guarded = true;
            true
        }
        fn check_guards(&mut self) -> crate::Result<()> {
            let n = self.buf.len();
            for (side, base) in [("front", 0), ("back", n - G)] {
                if let Some((off, w)) = crate::backend::guard_damage(&self.buf[base..base + G]) {
                    return Err(Error::invalid(format!(
                        "{side} guard of the logits buffer overwritten at byte {} (0x{w:08x})",
                        base + off
                    )));
                }
            }
            Ok(())
        }
        fn release(&mut self, slot: usize) -> crate::Result<()> {
            self.inner.release(slot)
        }
        fn seq_len(&self, slot: usize) -> usize {
            self.inner.seq_len(slot)
        }
    }

    #[test]
    fn an_overwritten_guard_fails_the_case() {
        let report = run_cases(&Overflowing, Some("scale(cols=13,rows=7)"), |_| {});
        assert_eq!(report.results.len(), 1);
        let r = &report.results[0];
        assert_eq!(report.failed(), 1, "{r:?}");
        let reason = r.reason().unwrap();
        // 7 rows x 13 columns: the extra value lands right after the data, at byte 64 + 7 * 13 * 4.
        assert!(
            reason.contains("step 0")
                && reason.contains("back guard of the logits buffer overwritten at byte 428")
                && reason.contains("0x3f800000"),
            "{reason}"
        );
        // The same case without the overflow passes (the CPU reference has no guards to check).
        let report = run_cases(&CpuBackend, Some("scale(cols=13,rows=7)"), |_| {});
        assert_eq!(report.passed(), 1);
    }

    #[test]
    fn compare_checks_nan_then_infinities_then_nmse() {
        let m = |d: Vec<f32>| Mat::from_vec(1, d.len(), d).unwrap();
        let want = m(vec![1.0, 2.0, f32::INFINITY]);
        assert!(compare(&m(vec![f32::NAN, 2.0, f32::INFINITY]), &want, 1e-3)
            .unwrap_err()
            .contains("NaN"));
        assert!(compare(&m(vec![1.0, 2.0, f32::NEG_INFINITY]), &want, 1e-3)
            .unwrap_err()
            .contains("infinity"));
        let n = compare(&m(vec![1.0, 2.1, f32::INFINITY]), &want, 1e-2).unwrap();
        assert!((n - 0.01 / 5.0).abs() < 1e-7, "{n}"); // 2.1f32 is not 2.1
        assert!(compare(&m(vec![1.0, 2.1, f32::INFINITY]), &want, 1e-3).is_err());
        assert!(compare(&m(vec![1.0, 2.0, f32::INFINITY]), &want, 0.0).is_ok());
        assert!(compare(&m(vec![1.0, 2.0000002, f32::INFINITY]), &want, 0.0)
            .unwrap_err()
            .contains("bit-exact"));
    }
}
