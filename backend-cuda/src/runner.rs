//! The CUDA runner: weights uploaded once, activations in f32 buffers shared by liveness, a paged KV
//! cache (pages of `PAGE` positions handed out to slots on demand), one kernel launch sequence per step.

use std::collections::{BTreeMap, HashMap, HashSet};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;
use std::sync::Arc;

use e4m3_core::backend::{
    attention_spans, check_step_inputs, validate_batch, Batch, CacheConfig, Runner, StepInputs,
    StepOutput,
};
use e4m3_core::cpu::{kv_rounding, KvRounding};
use e4m3_core::error::{Error, Result};
use e4m3_core::graph::{Graph, ImageGroups, Op, WeightMap};
use e4m3_core::prepare::{
    dtype_code, node_weights, scheme_code, ExpertLinear, KernelScales, NodeWeights,
};
use e4m3_core::tensor::Mat;

use crate::{Dev, Mem, A};
use e4m3_core::kv_pages::{PageTable, KV_BLOCK as PAGE};

/// Rows from which fp8-static/fp8-dynamic linears go through cuBLASLt (tensor cores) instead of the GEMV.
const LT_MIN_ROWS: usize = 16;
/// Token rows per warp of the linear kernel (kernels/linear.cu `TT`).
const LINEAR_TT: usize = 4;
const LINEAR_WARPS: usize = 4;

struct LinearPlan {
    w: Mem,
    dt: u32,
    scheme: u32,
    k: usize,
    n: usize,
    ws: Option<Mem>,
    sw: f32,
    sx: f32,
    block: [usize; 2],
    /// cuBLASLt may be tried for this linear (cleared after a failure).
    lt: bool,
}

enum Plan {
    None,
    Embed {
        table: Mem,
        dt: u32,
        cols: usize,
    },
    Norm {
        w: Option<Mem>,
    },
    Linear(LinearPlan),
    Rope(usize),
    /// RouterTopK: the per-expert scales.
    Router(Mem),
    /// MoeExperts: per expert, gate_up `[2I, H]` and down `[H, I]` (the e4m3 kernels, no cuBLASLt).
    Moe(Vec<[LinearPlan; 2]>),
    /// BiasAdd: the bias; LayerNorm: the weight and the bias.
    Vectors(Vec<Mem>),
}

/// The page table shared by all layers whose ring buffers have the same capacity, and its device copy.
struct PageClass {
    pages: PageTable,
    dev: Mem,
    dirty: bool,
}

struct KvLayer {
    k: Mem,
    v: Mem,
    /// 0 f32, 1 BF16, 2 E4M3.
    kt: u32,
    width: usize,
    class: usize,
    k_scale: f32,
    v_scale: f32,
}

pub struct CudaRunner {
    dev: Arc<Dev>,
    graph: Graph,
    cache: CacheConfig,
    plans: Vec<Plan>,
    slot_of: Vec<usize>,
    slot_cols: Vec<usize>,
    pool: Vec<Mem>,
    cap_rows: usize,
    ids: Option<Mem>,
    info: Option<Mem>,
    sel: Option<Mem>,
    rope: Vec<(Vec<f32>, usize, Option<Mem>)>,
    max_k: usize,
    max_groups: usize,
    xq: Option<Mem>,
    /// The activation codes of `xq` decoded to f32.
    xf: Option<Mem>,
    xs: Option<Mem>,
    /// MoE scratch (gate_up output, hidden activation, one expert's output) and their columns.
    moe: [Option<Mem>; 3],
    moe_cols: [usize; 3],
    /// Top-k outputs (values, ids, capacity) and the per-chunk candidates of the first stage.
    topk: Option<(Mem, Mem, usize, Mem, Mem)>,
    classes: Vec<PageClass>,
    kv: Vec<KvLayer>,
    lens: Vec<Option<usize>>,
    /// Kernel choices changed while running (a cuBLASLt refusal and its fallback).
    pub notes: Vec<String>,
    graphs_enabled: bool,
    /// Captured steps by (rows, logits rows), and the shapes seen once (captured when seen again).
    graphs: HashMap<(usize, usize), SendGraph>,
    seen: HashSet<(usize, usize)>,
    profile: Option<Profile>,
    /// RMSNorm nodes computed together with their consumer.
    fused: Vec<Option<Fused>>,
    /// Partial results of split attention: SPLIT_MAX_ROWS x heads x splits x (head_dim + 2).
    attn_part: Option<Mem>,
    /// Per row: the (first, last) positions its attention sees besides the window (a step with image
    /// groups; core `attention_spans`), for `ImageGroups::Windowed` and `WholeGroup`.
    spans: [Option<Mem>; 2],
    /// This step's given rows (`Runner::step_with_inputs`), and whether `spans` hold image groups.
    given: Option<Given>,
    groups: bool,
}

/// A step's given rows on the device, their runs of consecutive rows (`StepInputs::given_runs`) and
/// columns.
struct Given {
    rows: Mem,
    runs: Vec<(usize, usize, usize)>,
    cols: usize,
}

impl Drop for CudaRunner {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            if p.steps > 0 {
                let n = p.steps as f64;
                eprintln!(
                    "e4m3 cuda profile: {} steps of <= {GRAPH_MAX_ROWS} rows: host prep {:.1} us, launch {:.1} us, GPU {:.1} us, step total {:.1} us (means)",
                    p.steps,
                    p.prep / n * 1e6,
                    p.launch / n * 1e6,
                    p.gpu / n * 1e3,
                    p.total / n * 1e6
                );
            }
        }
    }
}

/// An RMSNorm computed together with its only consumer, the node right after it (or later, where no node
/// in between touches the consumer's buffer): a residual Add, or a RoPE over groups of one head each.
#[derive(Clone, Copy)]
enum Fused {
    Add { add: usize, other: usize },
    Rope { rope: usize, table: usize },
}

/// Which RMSNorm nodes can be fused with their consumer (kernels/norm.cu).
fn find_fusions(
    graph: &Graph,
    slot_of: &[usize],
    rope: &[(Vec<f32>, usize, Option<Mem>)],
) -> Vec<Option<Fused>> {
    let n = graph.nodes.len();
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (j, node) in graph.nodes.iter().enumerate() {
        for v in &node.inputs {
            if !consumers[v.0].contains(&j) {
                consumers[v.0].push(j);
            }
        }
    }
    let mut out = vec![None; n];
    for (i, node) in graph.nodes.iter().enumerate() {
        let Op::RmsNorm { group, .. } = node.op else {
            continue;
        };
        if graph.output.0 == i || consumers[i].len() != 1 {
            continue;
        }
        let j = consumers[i][0];
        // The consumer's buffer is written early (at i): nothing between may read or write it.
        let clash = (i + 1..j).any(|m| {
            slot_of[m] == slot_of[j]
                || graph.nodes[m]
                    .inputs
                    .iter()
                    .any(|v| slot_of[v.0] == slot_of[j])
        });
        if j <= i || clash {
            continue;
        }
        let c = &graph.nodes[j];
        out[i] = match &c.op {
            Op::Add if c.inputs.len() == 2 => {
                let other = if c.inputs[0].0 == i {
                    c.inputs[1].0
                } else {
                    c.inputs[0].0
                };
                (other < i && other != i).then_some(Fused::Add { add: j, other })
            }
            Op::Rope { head_dim, inv_freq } if *head_dim == group && group <= 512 => rope
                .iter()
                .position(|(f, d, _)| f == inv_freq && d == head_dim)
                .map(|table| Fused::Rope { rope: j, table }),
            _ => None,
        };
    }
    out
}

/// Where a decode step's time goes (E4M3_CUDA_PROFILE=1; printed when the runner is dropped).
#[derive(Default)]
struct Profile {
    steps: u64,
    prep: f64,
    launch: f64,
    gpu: f64,
    total: f64,
    events: Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
    pending: Option<(std::time::Instant, f64, f64)>,
}

unsafe impl Send for Profile {}

/// A captured CUDA graph; the runner that owns it is used by one thread at a time.
struct SendGraph(CudaGraph);
unsafe impl Send for SendGraph {}

/// Steps of at most this many rows split each row's keys over blocks (kernels/attention.cu
/// attention_split_*), `SPLIT_KEYS` keys a block.
const SPLIT_MAX_ROWS: usize = 8;
const SPLIT_KEYS: usize = 32;

/// Logits per block in the first top-k stage (kernels/topk.cu).
const TOPK_CHUNK: usize = 8192;

/// Steps of at most this many rows are captured as CUDA graphs.
const GRAPH_MAX_ROWS: usize = 64;

fn grid1(n: usize, block: usize) -> (u32, u32, u32) {
    (n.div_ceil(block).max(1) as u32, 1, 1)
}

impl CudaRunner {
    pub fn new(
        dev: Arc<Dev>,
        graph: &Graph,
        weights: &WeightMap,
        cache: CacheConfig,
    ) -> Result<CudaRunner> {
        let mut plans = Vec::with_capacity(graph.nodes.len());
        let mut rope: Vec<(Vec<f32>, usize, Option<Mem>)> = Vec::new();
        let (mut max_k, mut max_groups) = (1usize, 1usize);
        // Widest MoE scratch rows: gate_up output, hidden activation, one expert's output.
        let mut moe_cols = [0usize; 3];
        for n in &graph.nodes {
            let plan = match (&n.op, node_weights(graph, n, weights)?) {
                (Op::Embed { .. }, NodeWeights::Embed(w)) => Plan::Embed {
                    table: dev.upload(w.bytes())?,
                    dt: dtype_code(w.dtype),
                    cols: n.cols,
                },
                (Op::RmsNorm { .. }, NodeWeights::Norm(w)) => Plan::Norm {
                    w: w.map(|v| dev.upload(&v)).transpose()?,
                },
                (
                    Op::Linear { scheme, .. },
                    NodeWeights::Linear {
                        weight: w,
                        k: kk,
                        n: nn,
                        scales,
                    },
                ) => {
                    max_k = max_k.max(kk);
                    let ks = KernelScales::new(scales);
                    if ks.block != [1, 1] {
                        max_groups = max_groups.max(ks.groups(kk));
                    }
                    let code = scheme_code(scheme);
                    Plan::Linear(LinearPlan {
                        w: dev.upload(w.bytes())?,
                        dt: dtype_code(w.dtype),
                        scheme: code,
                        k: kk,
                        n: nn,
                        ws: ks.array.as_deref().map(|a| dev.upload(a)).transpose()?,
                        sw: ks.sw,
                        sx: ks.sx,
                        block: ks.block,
                        lt: dev.lt.is_some()
                            && (code == 1 || code == 2)
                            && kk % 16 == 0
                            && nn % 16 == 0,
                    })
                }
                (Op::RouterTopK { .. }, NodeWeights::Router(v)) => Plan::Router(dev.upload(&v)?),
                (Op::MoeExperts { intermediate, .. }, NodeWeights::Experts(ex)) => {
                    let mut per = Vec::with_capacity(ex.len());
                    for pair in ex {
                        let mut lin = |e: ExpertLinear| -> Result<LinearPlan> {
                            let (nn, kk) = (e.weight.shape[0], e.weight.shape[1]);
                            max_k = max_k.max(kk);
                            let ks = KernelScales::new(e.scales);
                            if ks.block != [1, 1] {
                                max_groups = max_groups.max(ks.groups(kk));
                            }
                            Ok(LinearPlan {
                                w: dev.upload(e.weight.bytes())?,
                                dt: dtype_code(e.weight.dtype),
                                scheme: scheme_code(&e.scheme),
                                k: kk,
                                n: nn,
                                ws: ks.array.as_deref().map(|a| dev.upload(a)).transpose()?,
                                sw: ks.sw,
                                sx: ks.sx,
                                block: ks.block,
                                lt: false,
                            })
                        };
                        let [gu, d] = pair;
                        per.push([lin(gu)?, lin(d)?]);
                    }
                    moe_cols[0] = moe_cols[0].max(2 * intermediate);
                    moe_cols[1] = moe_cols[1].max(*intermediate);
                    moe_cols[2] = moe_cols[2].max(n.cols);
                    Plan::Moe(per)
                }
                (_, NodeWeights::Vectors(v)) => Plan::Vectors(
                    v.iter()
                        .map(|x| dev.upload(x))
                        .collect::<Result<Vec<_>>>()?,
                ),
                (Op::Rope { head_dim, inv_freq }, _) => {
                    let idx = match rope
                        .iter()
                        .position(|(f, d, _)| f == inv_freq && d == head_dim)
                    {
                        Some(i) => i,
                        None => {
                            rope.push((inv_freq.clone(), *head_dim, None));
                            rope.len() - 1
                        }
                    };
                    Plan::Rope(idx)
                }
                _ => Plan::None,
            };
            plans.push(plan);
        }
        // Paged KV cache: one page table per ring capacity, one page pool per layer.
        let mut classes: Vec<PageClass> = Vec::new();
        let mut kv = Vec::new();
        for (i, l) in graph.cache_layers.iter().enumerate() {
            let cap = graph.cache_capacity(i, cache.max_seq_len);
            let class = match classes.iter().position(|c| c.pages.cap == cap) {
                Some(c) => c,
                None => {
                    // Every slot can reach its full length: the pool holds slots x pages per slot, or
                    // the engine's budget `num_blocks` where that is less (a window's ring never takes
                    // more pages than the full-length table of the same positions).
                    let pps = cap.div_ceil(PAGE);
                    let pool = cache
                        .num_blocks
                        .map_or(cache.slots * pps, |n| n.min(cache.slots * pps));
                    let pages = PageTable::new(cache.slots, cap, pool);
                    classes.push(PageClass {
                        dev: dev.upload(&pages.table)?,
                        pages,
                        dirty: false,
                    });
                    classes.len() - 1
                }
            };
            let pages = classes[class].pages.total_pages();
            let width = l.n_kv_heads * l.head_dim;
            let (kt, esize, k_scale, v_scale) = match kv_rounding(cache.kv_dtype, l, weights)? {
                KvRounding::Exact => (0, 4, 1.0, 1.0),
                KvRounding::Bf16 => (1, 2, 1.0, 1.0),
                KvRounding::Fp8 { k_scale, v_scale } => (2, 1, k_scale, v_scale),
            };
            let bytes = pages * PAGE * width * esize;
            kv.push(KvLayer {
                k: dev.alloc(bytes)?,
                v: dev.alloc(bytes)?,
                kt,
                width,
                class,
                k_scale,
                v_scale,
            });
        }
        let (slot_of, slot_cols) = graph.buffer_slots();
        let fused = if std::env::var("E4M3_CUDA_FUSE").as_deref() == Ok("0") {
            vec![None; graph.nodes.len()]
        } else {
            find_fusions(graph, &slot_of, &rope)
        };
        let mut part_floats = 0;
        for n in &graph.nodes {
            if let Op::Attention {
                cache_layer,
                n_heads,
                head_dim,
                ..
            }
            | Op::AttentionShared {
                cache_layer,
                n_heads,
                head_dim,
                ..
            } = &n.op
            {
                let cap = classes[kv[*cache_layer].class].pages.cap;
                part_floats = part_floats.max(n_heads * cap.div_ceil(SPLIT_KEYS) * (head_dim + 2));
            }
        }
        let attn_part = if part_floats > 0 {
            Some(dev.alloc(SPLIT_MAX_ROWS * part_floats * 4)?)
        } else {
            None
        };
        let mut r = CudaRunner {
            dev,
            graph: graph.clone(),
            cache,
            plans,
            slot_of,
            slot_cols,
            pool: Vec::new(),
            cap_rows: 0,
            ids: None,
            info: None,
            sel: None,
            rope,
            max_k,
            max_groups,
            xq: None,
            xf: None,
            xs: None,
            moe: [None, None, None],
            moe_cols,
            topk: None,
            classes,
            kv,
            lens: vec![None; cache.slots],
            notes: Vec::new(),
            graphs_enabled: std::env::var("E4M3_CUDA_GRAPHS").as_deref() != Ok("0"),
            graphs: HashMap::new(),
            seen: HashSet::new(),
            fused,
            attn_part,
            spans: [None, None],
            given: None,
            groups: false,
            profile: (std::env::var("E4M3_CUDA_PROFILE").as_deref() == Ok("1"))
                .then(Profile::default),
        };
        r.ensure_rows(cache.max_seq_len.clamp(1, 16))?;
        Ok(r)
    }

    fn ensure_rows(&mut self, rows: usize) -> Result<()> {
        if rows <= self.cap_rows {
            return Ok(());
        }
        let limit = (self.cache.slots * self.cache.max_seq_len).max(1);
        let cap = rows.next_power_of_two().min(limit).max(rows);
        // Captured graphs point at the buffers about to be replaced.
        self.graphs.clear();
        self.seen.clear();
        self.pool.clear();
        for &c in &self.slot_cols {
            self.pool.push(self.dev.alloc(cap * c * 4)?);
        }
        self.ids = Some(self.dev.alloc(cap * 4)?);
        self.sel = Some(self.dev.alloc(cap * 4)?);
        self.info = Some(self.dev.alloc(cap * 16)?);
        for s in &mut self.spans {
            *s = Some(self.dev.alloc(cap * 8)?);
        }
        for t in &mut self.rope {
            t.2 = Some(self.dev.alloc(cap * t.1 * 4)?);
        }
        self.xq = Some(self.dev.alloc(cap * self.max_k)?);
        self.xf = Some(self.dev.alloc(cap * self.max_k * 4)?);
        self.xs = Some(self.dev.alloc(cap * self.max_groups * 4)?);
        if self.moe_cols[0] > 0 {
            for i in 0..3 {
                self.moe[i] = Some(self.dev.alloc(cap * self.moe_cols[i] * 4)?);
            }
        }
        self.cap_rows = cap;
        Ok(())
    }

    fn act(&self, node: usize) -> u64 {
        self.pool[self.slot_of[node]].ptr
    }

    /// Give each sequence of the batch the pages its new positions are written to.
    fn allocate_pages(&mut self, batch: &Batch) -> Result<()> {
        for s in &batch.seqs {
            let end = s.start_pos + s.tokens.len();
            for c in &mut self.classes {
                c.dirty |= c
                    .pages
                    .map(s.slot, s.start_pos, end)
                    .map_err(Error::invalid)?;
            }
        }
        for c in &mut self.classes {
            if c.dirty {
                self.dev.write(&c.dev, &c.pages.table)?;
                c.dirty = false;
            }
        }
        Ok(())
    }

    /// Run the step's kernels; logits stay on the device in the output node's buffer.
    /// Returns (rows of every node, tapped values).
    fn run(
        &mut self,
        batch: &Batch,
        inputs: Option<&StepInputs>,
        taps: &[String],
    ) -> Result<(Vec<usize>, BTreeMap<String, Mat>)> {
        let t_start = std::time::Instant::now();
        validate_batch(batch, &self.cache, self.graph.vocab_size, |s| {
            self.lens[s].unwrap_or(0)
        })?;
        for t in taps {
            if self.graph.find(t).is_none() {
                return Err(Error::invalid(format!("no node named `{t}` to tap")));
            }
        }
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| Error::invalid(format!("CUDA bind: {e}")))?;
        let (ids, positions) = batch.flat_tokens();
        let logit_rows = batch.logit_rows();
        let t = ids.len();
        check_step_inputs(inputs, &self.graph, t)?;
        let nsel = logit_rows.len();
        self.ensure_rows(t.max(1))?;
        self.allocate_pages(batch)?;

        let mut rows = vec![0usize; self.graph.nodes.len()];
        for (i, n) in self.graph.nodes.iter().enumerate() {
            rows[i] = match n.op {
                Op::Embed { .. } | Op::Input => t,
                Op::SelectRows => nsel,
                Op::AvgPool2d { side, kernel } => {
                    if let Some(s) = batch.seqs.iter().find(|s| s.tokens.len() != side * side) {
                        return Err(Error::invalid(format!(
                            "node `{}` pools a {side}x{side} grid; a sequence has {} rows",
                            n.name,
                            s.tokens.len()
                        )));
                    }
                    batch.seqs.len() * (side / kernel) * (side / kernel)
                }
                _ => n.inputs.first().map_or(t, |v| rows[v.0]),
            };
        }
        let dev = self.dev.clone();
        if t > 0 {
            dev.write(self.ids.as_ref().expect("allocated"), &ids)?;
            let mut info = Vec::with_capacity(t * 4);
            let mut base = 0u32;
            for s in &batch.seqs {
                for _ in 0..s.tokens.len() {
                    info.extend_from_slice(&[
                        s.slot as u32,
                        s.start_pos as u32,
                        s.tokens.len() as u32,
                        base,
                    ]);
                }
                base += s.tokens.len() as u32;
            }
            dev.write(self.info.as_ref().expect("allocated"), &info)?;
            for (inv_freq, hd, buf) in &self.rope {
                let half = hd / 2;
                let mut tab = vec![0f32; t * hd];
                for (r, &pos) in positions.iter().enumerate() {
                    for (i, &fr) in inv_freq.iter().enumerate() {
                        let a = pos as f32 * fr;
                        tab[r * hd + i] = a.cos();
                        tab[r * hd + half + i] = a.sin();
                    }
                }
                dev.write(buf.as_ref().expect("allocated"), &tab)?;
            }
        }
        if nsel > 0 {
            let sel: Vec<u32> = logit_rows.iter().map(|r| r.0 as u32).collect();
            dev.write(self.sel.as_ref().expect("allocated"), &sel)?;
        }
        // Image inputs: the given rows on the device, and the positions each row attends to.
        self.given = None;
        self.groups = inputs.is_some_and(|i| !i.groups.is_empty());
        if let Some(inp) = inputs {
            if self.groups {
                for (buf, mode) in self
                    .spans
                    .iter()
                    .zip([ImageGroups::Windowed, ImageGroups::WholeGroup])
                {
                    let spans = attention_spans(batch, &inp.groups, mode);
                    dev.write(buf.as_ref().expect("allocated"), &spans)?;
                }
            }
            if !inp.embed_rows.is_empty() {
                self.given = Some(Given {
                    rows: dev.upload(&inp.embeds.data)?,
                    runs: inp.given_runs(),
                    cols: inp.embeds.cols,
                });
            }
        }
        // Steps of few rows (decode) replay a CUDA graph captured the second time their shape is seen:
        // every per-step value lives in device buffers written above, so the launches are the same.
        let key = (t, nsel);
        let graphable =
            taps.is_empty() && inputs.is_none() && t <= GRAPH_MAX_ROWS && self.graphs_enabled;
        let t_prep = t_start.elapsed().as_secs_f64();
        if t <= GRAPH_MAX_ROWS {
            if let Some(p) = &mut self.profile {
                if p.events.is_none() {
                    let e = |d: &Dev| {
                        d.ctx
                            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                            .map_err(|e| Error::invalid(format!("CUDA event: {e}")))
                    };
                    p.events = Some((e(&dev)?, e(&dev)?));
                }
                let ev = p.events.as_ref().expect("created");
                ev.0.record(&dev.stream)
                    .map_err(|e| Error::invalid(format!("CUDA event: {e}")))?;
            }
        }
        let tapped = if graphable && self.graphs.contains_key(&key) {
            self.graphs[&key]
                .0
                .launch()
                .map_err(|e| Error::invalid(format!("CUDA graph launch: {e}")))?;
            BTreeMap::new()
        } else if graphable && self.seen.contains(&key) {
            let stream = dev.stream.clone();
            stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(|e| Error::invalid(format!("CUDA graph capture: {e}")))?;
            let launched = self.launch_nodes(&rows, t, taps);
            let graph = stream.end_capture(CUgraphInstantiate_flags(0));
            launched?;
            let graph = graph
                .map_err(|e| Error::invalid(format!("CUDA graph capture: {e}")))?
                .ok_or_else(|| Error::invalid("CUDA graph capture produced no graph"))?;
            graph
                .launch()
                .map_err(|e| Error::invalid(format!("CUDA graph launch: {e}")))?;
            self.graphs.insert(key, SendGraph(graph));
            BTreeMap::new()
        } else {
            if graphable {
                self.seen.insert(key);
            }
            self.launch_nodes(&rows, t, taps)?
        };
        if t <= GRAPH_MAX_ROWS {
            if let Some(p) = &mut self.profile {
                let ev = p.events.as_ref().expect("created");
                ev.1.record(&dev.stream)
                    .map_err(|e| Error::invalid(format!("CUDA event: {e}")))?;
                p.pending = Some((t_start, t_prep, t_start.elapsed().as_secs_f64() - t_prep));
            }
        }
        for s in &batch.seqs {
            self.lens[s.slot] = Some(s.start_pos + s.tokens.len());
        }
        Ok((rows, tapped))
    }

    /// Launch every node's kernels for a step of `t` rows (`rows`: each node's rows); read back the taps.
    fn launch_nodes(
        &mut self,
        rows: &[usize],
        t: usize,
        taps: &[String],
    ) -> Result<BTreeMap<String, Mat>> {
        let dev = self.dev.clone();
        let ptr = |m: &Option<Mem>| m.as_ref().map_or(0, |m| m.ptr);
        let xf_p = ptr(&self.xf);
        let (ids_p, info_p, sel_p, xq_p, xs_p) = (
            ptr(&self.ids),
            ptr(&self.info),
            ptr(&self.sel),
            ptr(&self.xq),
            ptr(&self.xs),
        );
        let spans_p = if self.groups {
            [ptr(&self.spans[0]), ptr(&self.spans[1])]
        } else {
            [0, 0]
        };
        let given_node = self.graph.given_rows_node();
        let mut tapped = BTreeMap::new();
        #[allow(clippy::needless_range_loop)] // the loop body mutates self.plans[i]
        // Fusions need every fused-away value unread: none when taps are asked for.
        let fuse = taps.is_empty();
        let mut skip = vec![false; self.graph.nodes.len()];
        for i in 0..self.graph.nodes.len() {
            if skip[i] {
                continue;
            }
            let node = &self.graph.nodes[i];
            let r = rows[i];
            let out = self.act(i);
            let inp = |k: usize| self.act(node.inputs[k].0);
            let ne = r * node.cols;
            if r > 0 {
                match (&node.op, &self.plans[i]) {
                    (Op::Embed { scale, .. }, Plan::Embed { table, dt, cols }) => {
                        let name =
                            ["embed_f32", "embed_bf16", "embed_f16", "embed_e4m3"][*dt as usize];
                        dev.launch(
                            name,
                            grid1(t * cols, 256),
                            256,
                            &[
                                A::P(out),
                                A::P(table.ptr),
                                A::P(ids_p),
                                A::U(t as u32),
                                A::U(*cols as u32),
                                A::F(*scale),
                            ],
                        )?;
                        if given_node == Some(i) {
                            self.copy_given(*cols, out)?;
                        }
                    }
                    (Op::Input, _) => self.copy_given(node.cols, out)?,
                    (
                        Op::RmsNorm {
                            group,
                            eps,
                            add_one,
                            ..
                        },
                        Plan::Norm { w },
                    ) => {
                        let ng = ne / group;
                        // Fused with its only consumer: write that node's output instead.
                        let (out, res, tab) = match self.fused[i] {
                            Some(Fused::Add { add, other }) if fuse => {
                                skip[add] = true;
                                (self.act(add), self.act(other), 0)
                            }
                            Some(Fused::Rope { rope, table }) if fuse => {
                                skip[rope] = true;
                                (self.act(rope), 0, ptr(&self.rope[table].2))
                            }
                            _ => (out, 0, 0),
                        };
                        dev.launch(
                            "rms_norm",
                            (ng as u32, 1, 1),
                            if *group > 2048 { 1024 } else { 256 },
                            &[
                                A::P(inp(0)),
                                A::P(ptr(w)),
                                A::P(out),
                                A::U(*group as u32),
                                A::U(ng as u32),
                                A::F(*eps),
                                A::U(*add_one as u32),
                                A::U(w.is_some() as u32),
                                A::P(res),
                                A::P(tab),
                                A::U((node.cols / group) as u32),
                            ],
                        )?;
                    }
                    (Op::Linear { .. }, Plan::Linear(lp)) => {
                        let failed = Self::linear(&dev, lp, inp(0), out, r, (xq_p, xs_p, xf_p))?;
                        if let Some(note) = failed {
                            if let Plan::Linear(lp) = &mut self.plans[i] {
                                lp.lt = false;
                            }
                            let msg = format!("{}: {note}", self.graph.nodes[i].name);
                            eprintln!("e4m3 cuda: {msg}");
                            self.notes.push(msg);
                            // Redo this linear with the e4m3 kernel.
                            if let Plan::Linear(lp) = &self.plans[i] {
                                Self::linear(
                                    &dev,
                                    lp,
                                    self.act(self.graph.nodes[i].inputs[0].0),
                                    out,
                                    r,
                                    (xq_p, xs_p, xf_p),
                                )?;
                            }
                        }
                    }
                    (Op::Rope { head_dim, .. }, Plan::Rope(ti)) => {
                        let half = head_dim / 2;
                        let heads = node.cols / head_dim;
                        dev.launch(
                            "rope",
                            grid1(r * heads * half, 256),
                            256,
                            &[
                                A::P(inp(0)),
                                A::P(ptr(&self.rope[*ti].2)),
                                A::P(out),
                                A::U(r as u32),
                                A::U(node.cols as u32),
                                A::U(*head_dim as u32),
                            ],
                        )?;
                    }
                    (
                        Op::Attention {
                            cache_layer,
                            n_heads,
                            n_kv_heads,
                            head_dim,
                            scale,
                            window,
                            softcap,
                            image_groups,
                        }
                        | Op::AttentionShared {
                            cache_layer,
                            n_heads,
                            n_kv_heads,
                            head_dim,
                            scale,
                            window,
                            softcap,
                            image_groups,
                        },
                        _,
                    ) => {
                        // Each row's (first, last) positions by the node's mode; Off is plain causal.
                        let ends_p = match image_groups {
                            ImageGroups::Off => 0,
                            ImageGroups::Windowed => spans_p[0],
                            ImageGroups::WholeGroup => spans_p[1],
                        };
                        let l = &self.kv[*cache_layer];
                        let c = &self.classes[l.class];
                        let mut p: Vec<u8> = Vec::with_capacity(56);
                        for v in [
                            *n_heads as u32,
                            *n_kv_heads as u32,
                            *head_dim as u32,
                            node.cols as u32,
                            l.width as u32,
                            c.pages.cap as u32,
                            window.unwrap_or(0) as u32,
                            softcap.is_some() as u32,
                        ] {
                            p.extend_from_slice(&v.to_le_bytes());
                        }
                        for v in [*scale, softcap.unwrap_or(1.0), l.k_scale, l.v_scale] {
                            p.extend_from_slice(&v.to_le_bytes());
                        }
                        for v in [c.pages.pages_per_slot as u32, r as u32] {
                            p.extend_from_slice(&v.to_le_bytes());
                        }
                        let sfx = ["f32", "bf16", "fp8"][l.kt as usize];
                        let args = [
                            A::P(inp(0)),
                            A::P(inp(1)),
                            A::P(inp(2)),
                            A::P(out),
                            A::P(l.k.ptr),
                            A::P(l.v.ptr),
                            A::P(c.dev.ptr),
                            A::P(info_p),
                            A::S(p.clone()),
                            A::P(ends_p),
                        ];
                        // Image groups (spans) take the one-block-per-row kernel: a group may see past the
                        // keys a split grid sized for the ring capacity covers.
                        if r <= SPLIT_MAX_ROWS && ends_p == 0 {
                            // Decode: keys split over blocks sized for the ring capacity, then merged.
                            let splits = c.pages.cap.div_ceil(SPLIT_KEYS);
                            let part = self.attn_part.as_ref().expect("allocated at load").ptr;
                            let sargs = [
                                A::P(inp(0)),
                                A::P(inp(1)),
                                A::P(inp(2)),
                                A::P(l.k.ptr),
                                A::P(l.v.ptr),
                                A::P(c.dev.ptr),
                                A::P(info_p),
                                A::S(p.clone()),
                                A::P(part),
                            ];
                            dev.launch(
                                &format!("attention_split_{sfx}"),
                                (r as u32, *n_heads as u32, splits as u32),
                                128,
                                &sargs,
                            )?;
                            dev.launch(
                                "attention_combine",
                                (r as u32, *n_heads as u32, 1),
                                128,
                                &[
                                    A::P(part),
                                    A::P(out),
                                    A::U(*n_heads as u32),
                                    A::U(*head_dim as u32),
                                    A::U(node.cols as u32),
                                    A::U(splits as u32),
                                    A::P(info_p),
                                    A::U(window.unwrap_or(0) as u32),
                                ],
                            )?;
                        } else {
                            dev.launch(
                                &format!("attention_{sfx}"),
                                (r as u32, *n_heads as u32, 1),
                                128,
                                &args,
                            )?;
                        }
                        // AttentionShared reads the owner's cache and leaves it alone.
                        if matches!(node.op, Op::Attention { .. }) {
                            let wargs = [
                                A::P(inp(1)),
                                A::P(inp(2)),
                                A::P(l.k.ptr),
                                A::P(l.v.ptr),
                                A::P(c.dev.ptr),
                                A::P(info_p),
                                A::S(p),
                            ];
                            dev.launch(
                                &format!("kv_write_{sfx}"),
                                grid1(r * l.width, 256),
                                256,
                                &wargs,
                            )?;
                        }
                    }
                    (Op::SliceCols { start }, _) => {
                        let src = self.graph.nodes[node.inputs[0].0].cols;
                        dev.launch(
                            "slice_cols",
                            grid1(ne, 256),
                            256,
                            &[
                                A::P(inp(0)),
                                A::P(out),
                                A::L(ne as u64),
                                A::U(src as u32),
                                A::U(*start as u32),
                                A::U(node.cols as u32),
                            ],
                        )?;
                    }
                    (Op::RouterTopK { top_k, .. }, Plan::Router(pes)) => dev.launch(
                        "router_topk",
                        grid1(r, 64),
                        64,
                        &[
                            A::P(inp(0)),
                            A::P(pes.ptr),
                            A::P(out),
                            A::U(r as u32),
                            A::U(node.cols as u32),
                            A::U(*top_k as u32),
                        ],
                    )?,
                    (Op::MoeExperts { intermediate, .. }, Plan::Moe(experts)) => {
                        // Per expert over every row (rows routed elsewhere get weight 0 below):
                        // gate_up, gelu(gate) * up, down, then weighted into the output.
                        let (x, route) = (inp(0), inp(1));
                        let im = *intermediate;
                        let [gu, h, y] = [0, 1, 2].map(|j| ptr(&self.moe[j]));
                        for (e, [gate_up, down]) in experts.iter().enumerate() {
                            let scratch = (xq_p, xs_p, xf_p);
                            Self::linear(&dev, gate_up, x, gu, r, scratch)?;
                            dev.launch(
                                "gelu_split",
                                grid1(r * im, 256),
                                256,
                                &[A::P(gu), A::P(h), A::L((r * im) as u64), A::U(im as u32)],
                            )?;
                            Self::linear(&dev, down, h, y, r, scratch)?;
                            dev.launch(
                                "moe_acc",
                                grid1(ne, 256),
                                256,
                                &[
                                    A::P(y),
                                    A::P(route),
                                    A::P(out),
                                    A::L(ne as u64),
                                    A::U(node.cols as u32),
                                    A::U(experts.len() as u32),
                                    A::U(e as u32),
                                    A::U((e == 0) as u32),
                                ],
                            )?;
                        }
                    }
                    (Op::GeluTanhMul, _) => dev.launch(
                        "gelu_tanh_mul",
                        grid1(ne, 256),
                        256,
                        &[A::P(inp(0)), A::P(inp(1)), A::P(out), A::L(ne as u64)],
                    )?,
                    (Op::Add, _) => dev.launch(
                        "add",
                        grid1(ne, 256),
                        256,
                        &[A::P(inp(0)), A::P(inp(1)), A::P(out), A::L(ne as u64)],
                    )?,
                    (Op::Scale { factor }, _) => dev.launch(
                        "scale",
                        grid1(ne, 256),
                        256,
                        &[A::P(inp(0)), A::P(out), A::L(ne as u64), A::F(*factor)],
                    )?,
                    (Op::Softcap { cap }, _) => dev.launch(
                        "softcap",
                        grid1(ne, 256),
                        256,
                        &[A::P(inp(0)), A::P(out), A::L(ne as u64), A::F(*cap)],
                    )?,
                    (Op::BiasAdd { .. }, Plan::Vectors(b)) => dev.launch(
                        "bias_add",
                        grid1(ne, 256),
                        256,
                        &[
                            A::P(inp(0)),
                            A::P(b[0].ptr),
                            A::P(out),
                            A::L(ne as u64),
                            A::U(node.cols as u32),
                        ],
                    )?,
                    (Op::GeluTanh, _) => dev.launch(
                        "gelu_tanh",
                        grid1(ne, 256),
                        256,
                        &[A::P(inp(0)), A::P(out), A::L(ne as u64)],
                    )?,
                    (Op::LayerNorm { eps, .. }, Plan::Vectors(wb)) => dev.launch(
                        "layer_norm",
                        (r as u32, 1, 1),
                        256,
                        &[
                            A::P(inp(0)),
                            A::P(wb[0].ptr),
                            A::P(wb[1].ptr),
                            A::P(out),
                            A::U(node.cols as u32),
                            A::U(r as u32),
                            A::F(*eps),
                        ],
                    )?,
                    (Op::AvgPool2d { side, kernel }, _) => dev.launch(
                        "avg_pool2d",
                        grid1(ne, 256),
                        256,
                        &[
                            A::P(inp(0)),
                            A::P(out),
                            A::L(ne as u64),
                            A::U(node.cols as u32),
                            A::U(*side as u32),
                            A::U(*kernel as u32),
                        ],
                    )?,
                    (
                        Op::EncoderAttention {
                            n_heads,
                            head_dim,
                            scale,
                        },
                        _,
                    ) => {
                        if r != t {
                            return Err(Error::invalid(format!(
                                "node `{}` attends among a step's {t} rows, its input has {r}",
                                node.name
                            )));
                        }
                        dev.launch(
                            "encoder_attention",
                            (r as u32, *n_heads as u32, 1),
                            128,
                            &[
                                A::P(inp(0)),
                                A::P(inp(1)),
                                A::P(inp(2)),
                                A::P(out),
                                A::P(info_p),
                                A::U(*n_heads as u32),
                                A::U(*head_dim as u32),
                                A::F(*scale),
                            ],
                        )?
                    }
                    (Op::SelectRows, _) => {
                        let src = self.graph.nodes[node.inputs[0].0].cols;
                        dev.launch(
                            "select_rows",
                            grid1(r * src, 256),
                            256,
                            &[
                                A::P(inp(0)),
                                A::P(sel_p),
                                A::P(out),
                                A::U(r as u32),
                                A::U(src as u32),
                            ],
                        )?;
                    }
                    _ => {
                        return Err(Error::Unsupported {
                            backend: "cuda".into(),
                            op: node.op.kind().into(),
                            node: node.name.clone(),
                        })
                    }
                }
            }
            let node = &self.graph.nodes[i];
            if taps.contains(&node.name) {
                let data = dev.read::<f32>(self.act(i), r * node.cols)?;
                tapped.insert(node.name.clone(), Mat::from_vec(r, node.cols, data)?);
            }
        }
        Ok(tapped)
    }

    /// Copy this step's given rows into the `cols`-wide buffer at `out` (nothing without given rows of
    /// that width).
    fn copy_given(&self, cols: usize, out: u64) -> Result<()> {
        if let Some(g) = self.given.as_ref().filter(|g| g.cols == cols) {
            for &(r0, i0, n) in &g.runs {
                self.dev.copy(
                    out + (r0 * cols * 4) as u64,
                    g.rows.ptr + (i0 * cols * 4) as u64,
                    n * cols * 4,
                )?;
            }
        }
        Ok(())
    }

    /// Account a profiled step once its results are back on the host.
    fn finish_profile(&mut self) {
        if let Some(p) = &mut self.profile {
            if let (Some((t0, prep, launch)), Some(ev)) = (p.pending.take(), &p.events) {
                let gpu = ev.0.elapsed_ms(&ev.1).unwrap_or(0.0) as f64;
                p.steps += 1;
                p.prep += prep;
                p.launch += launch;
                p.gpu += gpu;
                p.total += t0.elapsed().as_secs_f64();
            }
        }
    }

    /// Launch one linear. Returns `Some(reason)` when cuBLASLt refused it (nothing was written then).
    fn linear(
        dev: &Dev,
        lp: &LinearPlan,
        x: u64,
        out: u64,
        r: usize,
        (xq, xs, xf): (u64, u64, u64),
    ) -> Result<Option<String>> {
        let (k, n) = (lp.k, lp.n);
        let ib = k.div_ceil(lp.block[1]);
        match lp.scheme {
            1 => dev.launch(
                "quant_static",
                grid1(r * k, 256),
                256,
                &[
                    A::P(x),
                    A::P(xq),
                    A::L((r * k) as u64),
                    A::F(1.0 / lp.sx),
                    A::P(xf),
                ],
            )?,
            2 | 4 => {
                let (group, ng, mode) = if lp.scheme == 2 {
                    (k, 1, 0)
                } else {
                    (lp.block[1], ib, 1)
                };
                dev.launch(
                    "quant_group",
                    ((r * ng) as u32, 1, 1),
                    if group > 2048 { 1024 } else { 256 },
                    &[
                        A::P(x),
                        A::P(xq),
                        A::P(xs),
                        A::U((r * ng) as u32),
                        A::U(k as u32),
                        A::U(group as u32),
                        A::U(ng as u32),
                        A::U(mode),
                        A::P(xf),
                    ],
                )?
            }
            _ => {}
        }
        if lp.lt && r >= LT_MIN_ROWS {
            let lt = dev.lt.as_ref().expect("lt checked at load");
            if let Err(e) = lt.fp8_gemm(dev.stream.cu_stream() as u64, lp.w.ptr, xq, out, n, k, r) {
                return Ok(Some(format!(
                    "cuBLASLt refused ({e}); using the e4m3 kernel"
                )));
            }
            dev.launch(
                "fp8_gemm_epilogue",
                grid1(r * n, 256),
                256,
                &[
                    A::P(out),
                    A::P(xs),
                    A::P(lp.ws.as_ref().map_or(0, |m| m.ptr)),
                    A::U(r as u32),
                    A::U(n as u32),
                    A::F(lp.sw),
                    A::F(lp.sx),
                    A::U(lp.scheme),
                ],
            )?;
            return Ok(None);
        }
        // 16-byte loads where the rows allow them (kernels/linear.cu linear_vec_*).
        let per_chunk = [4, 8, 8, 16][lp.dt as usize];
        let vec =
            k.is_multiple_of(per_chunk) && (lp.scheme < 3 || lp.block[1].is_multiple_of(per_chunk));
        let name = match (vec, lp.scheme, lp.dt) {
            (true, 0, 0) => "linear_vec_dense_f32",
            (true, 0, 1) => "linear_vec_dense_bf16",
            (true, 0, _) => "linear_vec_dense_f16",
            (true, 1, _) => "linear_vec_fp8_static",
            (true, 2, _) => "linear_vec_fp8_dynamic",
            (true, 3, _) => "linear_vec_fp8_block_wo",
            (true, _, _) => "linear_vec_fp8_block",
            (_, 0, 0) => "linear_dense_f32",
            (_, 0, 1) => "linear_dense_bf16",
            (_, 0, _) => "linear_dense_f16",
            (_, 1, _) => "linear_fp8_static",
            (_, 2, _) => "linear_fp8_dynamic",
            (_, 3, _) => "linear_fp8_block_wo",
            _ => "linear_fp8_block",
        };
        dev.launch(
            name,
            (
                n.div_ceil(LINEAR_WARPS) as u32,
                r.div_ceil(LINEAR_TT) as u32,
                1,
            ),
            (32 * LINEAR_WARPS) as u32,
            &[
                A::P(lp.w.ptr),
                // The 16-byte kernels read W8A8 activations decoded (xf), the scalar ones their codes (xq).
                A::P(if vec && matches!(lp.scheme, 1 | 2 | 4) {
                    xf
                } else {
                    x
                }),
                A::P(xq),
                A::P(xs),
                A::P(lp.ws.as_ref().map_or(0, |m| m.ptr)),
                A::P(out),
                A::U(n as u32),
                A::U(k as u32),
                A::U(r as u32),
                A::U(lp.block[0] as u32),
                A::U(lp.block[1] as u32),
                A::F(lp.sw),
                A::F(lp.sx),
            ],
        )?;
        Ok(None)
    }
}

impl CudaRunner {
    /// One step; `inputs`: given embedding rows and image groups ([`Runner::step_with_inputs`]).
    fn run_step(
        &mut self,
        batch: &Batch,
        inputs: Option<&StepInputs>,
        taps: &[String],
    ) -> Result<StepOutput> {
        let (rows, tapped) = self.run(batch, inputs, taps)?;
        let out_id = self.graph.output.0;
        let (orows, ocols) = (rows[out_id], self.graph.nodes[out_id].cols);
        let data = self.dev.read::<f32>(self.act(out_id), orows * ocols)?;
        self.finish_profile();
        Ok(StepOutput {
            logits: Mat::from_vec(orows, ocols, data)?,
            rows: batch.logit_rows().iter().map(|r| (r.1, r.2)).collect(),
            taps: tapped,
        })
    }
}

impl Runner for CudaRunner {
    fn step(&mut self, batch: &Batch, taps: &[String]) -> Result<StepOutput> {
        self.run_step(batch, None, taps)
    }

    fn supports_step_inputs(&self) -> bool {
        true
    }

    fn step_with_inputs(
        &mut self,
        batch: &Batch,
        inputs: &StepInputs,
        taps: &[String],
    ) -> Result<StepOutput> {
        self.run_step(batch, Some(inputs), taps)
    }

    fn step_top_k(&mut self, batch: &Batch, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let (rows, _) = self.run(batch, None, &[])?;
        let out_id = self.graph.output.0;
        let (orows, vocab) = (rows[out_id], self.graph.nodes[out_id].cols);
        if orows == 0 || k == 0 {
            return Ok(vec![Vec::new(); orows]);
        }
        let k = k.min(vocab);
        let need = orows * k;
        let chunks = vocab.div_ceil(TOPK_CHUNK);
        let cand = orows * chunks * k;
        if self
            .topk
            .as_ref()
            .is_none_or(|t| t.2 < need || t.3.bytes < cand * 4)
        {
            self.topk = Some((
                self.dev.alloc(need * 4)?,
                self.dev.alloc(need * 4)?,
                need,
                self.dev.alloc(cand * 4)?,
                self.dev.alloc(cand * 4)?,
            ));
        }
        let (vals, ids, _, pv, pi) = self.topk.as_ref().expect("allocated");
        self.dev.launch(
            "top_k_partial",
            (chunks as u32, orows as u32, 1),
            1024,
            &[
                A::P(self.act(out_id)),
                A::U(vocab as u32),
                A::U(k as u32),
                A::U(TOPK_CHUNK as u32),
                A::P(pv.ptr),
                A::P(pi.ptr),
            ],
        )?;
        self.dev.launch(
            "top_k_merge",
            (orows as u32, 1, 1),
            1024,
            &[
                A::P(pv.ptr),
                A::P(pi.ptr),
                A::U((chunks * k) as u32),
                A::U(k as u32),
                A::P(vals.ptr),
                A::P(ids.ptr),
            ],
        )?;
        let v = self.dev.read::<f32>(vals.ptr, need)?;
        let i = self.dev.read::<u32>(ids.ptr, need)?;
        self.finish_profile();
        Ok((0..orows)
            .map(|r| {
                (0..k)
                    .filter(|&j| i[r * k + j] != u32::MAX)
                    .map(|j| (i[r * k + j], v[r * k + j]))
                    .collect()
            })
            .collect())
    }

    fn release(&mut self, slot: usize) -> Result<()> {
        let s = self
            .lens
            .get_mut(slot)
            .ok_or_else(|| Error::invalid(format!("slot {slot} does not exist")))?;
        *s = None;
        for c in &mut self.classes {
            c.dirty |= c.pages.release(slot);
        }
        Ok(())
    }

    fn seq_len(&self, slot: usize) -> usize {
        self.lens.get(slot).copied().flatten().unwrap_or(0)
    }
}
