//! The CPU reference backend: f32 math, the executable definition of every op.

pub mod fp8_linear;
pub mod kernels;
pub mod vision;

use std::collections::BTreeMap;

use crate::backend::{
    check_step_inputs, check_supported, validate_batch, Backend, Batch, CacheConfig, KvCacheDtype,
    Runner, StepInputs, StepOutput,
};
use crate::checkpoint::Weight;
use crate::error::{Error, Result};
use crate::graph::{Graph, ImageGroups, Node, Op, QuantScheme, WeightMap};
use crate::tensor::{DType, Mat};

pub use kernels::KvLayer;

pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".to_string()
    }

    fn supports(&self, op: &Op) -> bool {
        match op {
            Op::Embed { .. }
            | Op::RmsNorm { .. }
            | Op::Rope { .. }
            | Op::Attention { .. }
            | Op::GeluTanhMul
            | Op::Add
            | Op::Scale { .. }
            | Op::Softcap { .. }
            | Op::SelectRows
            | Op::SliceCols { .. }
            | Op::AttentionShared { .. }
            | Op::RouterTopK { .. }
            | Op::MoeExperts { .. } => true,
            Op::Input
            | Op::BiasAdd { .. }
            | Op::LayerNorm { .. }
            | Op::GeluTanh
            | Op::EncoderAttention { .. }
            | Op::AvgPool2d { .. }
            | Op::PosEmbed2d { .. }
            | Op::Rope2d { .. }
            | Op::PoolPositions { .. }
            | Op::Clamp { .. }
            | Op::ChannelScale { .. } => true,
            // Dense, Fp8Static, Fp8Dynamic, Fp8BlockWeightOnly, Fp8Block (fp8_linear.rs).
            Op::Linear { .. } => true,
        }
    }

    fn load(
        &self,
        graph: &Graph,
        weights: &WeightMap,
        cache: CacheConfig,
    ) -> Result<Box<dyn Runner>> {
        check_supported(self, graph)?;
        // FP8 linears: F8E4M3 weight, scale tensors present with F32/BF16/F16 dtype and the shapes the
        // scheme and the weight's shape call for, and the node's widths matching the weight.
        let mut fp8_tensors = std::collections::BTreeSet::new();
        for n in &graph.nodes {
            if let Op::Linear { weight, scheme } = &n.op {
                if *scheme == QuantScheme::Dense {
                    continue;
                }
                let w = weights.get(weight).ok_or_else(|| {
                    Error::tensor(weight, "referenced by the graph but not loaded")
                })?;
                fp8_linear::prepare(w, scheme, weights)?;
                let in_cols = n.inputs.first().map(|&i| graph.node(i).cols);
                if in_cols != Some(w.shape[1]) || n.cols != w.shape[0] {
                    return Err(Error::tensor(
                        weight,
                        format!(
                            "shape {:?} does not fit node `{}` ({:?} -> {} columns)",
                            w.shape, n.name, in_cols, n.cols
                        ),
                    ));
                }
                fp8_tensors.insert(weight.as_str());
                fp8_tensors.extend(scheme.scale_tensors());
            }
        }
        let experts = load_experts(graph, weights)?;
        for e in experts.values() {
            fp8_tensors.extend(e.fp8_tensors.iter().map(String::as_str));
        }
        for name in graph.weight_names() {
            if fp8_tensors.contains(name) {
                continue;
            }
            let w = weights
                .get(name)
                .ok_or_else(|| Error::tensor(name, "referenced by the graph but not loaded"))?;
            if !matches!(w.dtype, DType::F32 | DType::BF16 | DType::F16) {
                return Err(Error::tensor(
                    name,
                    format!("dtype {} is not supported by the CPU backend", w.dtype),
                ));
            }
        }
        // Small per-channel vectors are decoded to f32 once; big matrices stay in the (mapped) checkpoint.
        let mut norms = BTreeMap::new();
        for n in &graph.nodes {
            if let Op::RmsNorm {
                weight: Some(w), ..
            } = &n.op
            {
                norms.insert(w.clone(), weights[w].to_f32());
            }
            if let Op::RouterTopK {
                per_expert_scale, ..
            } = &n.op
            {
                let v = weights[per_expert_scale].to_f32();
                if v.len() != graph.node(n.inputs[0]).cols {
                    return Err(Error::tensor(
                        per_expert_scale,
                        format!(
                            "has {} values for {} experts",
                            v.len(),
                            graph.node(n.inputs[0]).cols
                        ),
                    ));
                }
                norms.insert(per_expert_scale.clone(), v);
            }
            let vectors: Vec<&String> = match &n.op {
                Op::BiasAdd { bias } => vec![bias],
                Op::ChannelScale { weight } => vec![weight],
                Op::LayerNorm { weight, bias, .. } => vec![weight, bias],
                _ => vec![],
            };
            for name in vectors {
                let v = weights[name].to_f32();
                if v.len() != n.cols {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "has {} values, node `{}` has {} columns",
                            v.len(),
                            n.name,
                            n.cols
                        ),
                    ));
                }
                norms.insert(name.clone(), v);
            }
        }
        let kv_round = graph
            .cache_layers
            .iter()
            .map(|l| kv_rounding(cache.kv_dtype, l, weights))
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(CpuRunner {
            experts,
            kv_round,
            graph: graph.clone(),
            weights: weights.clone(),
            norms,
            cache,
            slots: (0..cache.slots).map(|_| None).collect(),
            last_use: graph.last_use(),
        }))
    }
}

/// The KV cache of one sequence: one ring buffer per layer.
struct SlotCache {
    len: usize,
    layers: Vec<KvLayer>,
}

/// How keys and values are rounded on their way into the cache (and so as attention reads them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvRounding {
    Exact,
    Bf16,
    Fp8 { k_scale: f32, v_scale: f32 },
}

fn scalar_scale(weights: &WeightMap, name: &Option<String>) -> Result<f32> {
    let Some(name) = name else { return Ok(1.0) };
    let w = weights.get(name).ok_or_else(|| {
        Error::tensor(
            name,
            "KV-cache scale referenced by the graph but not loaded",
        )
    })?;
    let v = w.to_f32();
    match v.as_slice() {
        [s] if s.is_finite() && *s > 0.0 => Ok(*s),
        _ => Err(Error::tensor(
            name,
            format!("expected one positive finite scale, found {v:?}"),
        )),
    }
}

pub fn kv_rounding(
    dtype: KvCacheDtype,
    layer: &crate::graph::CacheLayer,
    weights: &WeightMap,
) -> Result<KvRounding> {
    Ok(match dtype {
        KvCacheDtype::Auto => KvRounding::Exact,
        KvCacheDtype::Bf16 => KvRounding::Bf16,
        KvCacheDtype::Fp8 => KvRounding::Fp8 {
            k_scale: scalar_scale(weights, &layer.k_scale)?,
            v_scale: scalar_scale(weights, &layer.v_scale)?,
        },
    })
}

struct CpuRunner {
    /// The experts of each `MoeExperts` node, by node index.
    experts: BTreeMap<usize, Experts>,
    kv_round: Vec<KvRounding>,
    graph: Graph,
    weights: WeightMap,
    norms: BTreeMap<String, Vec<f32>>,
    cache: CacheConfig,
    slots: Vec<Option<SlotCache>>,
    last_use: Vec<usize>,
}

impl CpuRunner {
    fn new_slot(&self) -> SlotCache {
        SlotCache {
            len: 0,
            layers: self
                .graph
                .cache_layers
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let cap = self.graph.cache_capacity(i, self.cache.max_seq_len);
                    KvLayer::new(cap, l.n_kv_heads * l.head_dim)
                })
                .collect(),
        }
    }
}

impl Runner for CpuRunner {
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

    fn release(&mut self, slot: usize) -> Result<()> {
        let s = self
            .slots
            .get_mut(slot)
            .ok_or_else(|| Error::invalid(format!("slot {slot} does not exist")))?;
        *s = None;
        Ok(())
    }

    fn seq_len(&self, slot: usize) -> usize {
        self.slots
            .get(slot)
            .and_then(|s| s.as_ref())
            .map_or(0, |c| c.len)
    }
}

impl CpuRunner {
    fn run_step(
        &mut self,
        batch: &Batch,
        inputs: Option<&StepInputs>,
        taps: &[String],
    ) -> Result<StepOutput> {
        validate_batch(batch, &self.cache, self.graph.vocab_size, |s| {
            self.slots[s].as_ref().map_or(0, |c| c.len)
        })?;
        for t in taps {
            if self.graph.find(t).is_none() {
                return Err(Error::invalid(format!("no node named `{t}` to tap")));
            }
        }
        for s in &batch.seqs {
            let restart = s.start_pos == 0 || self.slots[s.slot].is_none();
            if restart {
                self.slots[s.slot] = Some(self.new_slot());
            }
        }
        let (ids, positions) = batch.flat_tokens();
        // Given rows feed `Op::Input` where the graph has one (an encoder), else replace embeddings.
        check_step_inputs(inputs, &self.graph, ids.len())?;
        let given_node = self.graph.given_rows_node();
        let no_groups: Vec<Option<u32>> = Vec::new();
        let groups = inputs.map_or(&no_groups, |i| &i.groups);
        let seq_spans = batch.seq_spans();
        let logit_rows = batch.logit_rows();
        let select: Vec<usize> = logit_rows.iter().map(|r| r.0).collect();
        // (first row in the step, tokens, start position, slot) of each sequence.
        let mut spans = Vec::with_capacity(batch.seqs.len());
        let mut base = 0;
        for s in &batch.seqs {
            spans.push((base, s.tokens.len(), s.start_pos, s.slot));
            base += s.tokens.len();
        }

        let mut values: Vec<Option<Mat>> = vec![None; self.graph.nodes.len()];
        let mut tapped = BTreeMap::new();
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let input =
                |k: usize| -> &Mat { values[node.inputs[k].0].as_ref().expect("input computed") };
            let out = match &node.op {
                Op::Embed { table, scale } => {
                    let mut e = kernels::embed(&self.weights[table], &ids, *scale);
                    if let Some(inp) = inputs.filter(|_| given_node == Some(i)) {
                        for (i, &r) in inp.embed_rows.iter().enumerate() {
                            e.row_mut(r).copy_from_slice(inp.embeds.row(i));
                        }
                    }
                    e
                }
                Op::RmsNorm {
                    weight,
                    group,
                    eps,
                    add_one,
                } => {
                    let w = weight.as_ref().map(|w| self.norms[w].as_slice());
                    kernels::rms_norm(input(0), w, *group, *eps, *add_one)
                }
                Op::Linear {
                    weight,
                    scheme: QuantScheme::Dense,
                } => kernels::linear(input(0), &self.weights[weight]),
                Op::Linear { weight, scheme } => {
                    fp8_linear::linear_fp8(input(0), &self.weights[weight], scheme, &self.weights)?
                }
                Op::Rope { head_dim, inv_freq } => {
                    kernels::rope(input(0), &positions, *head_dim, inv_freq)
                }
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
                } => {
                    // A shared layer reads its owner's cache without appending (KV sharing).
                    let append = matches!(node.op, Op::Attention { .. });
                    let q = input(0);
                    let rounded;
                    let (k, v) = match self.kv_round[*cache_layer] {
                        KvRounding::Exact => (input(1), input(2)),
                        r => {
                            rounded = kernels::round_kv(input(1), input(2), r);
                            (&rounded.0, &rounded.1)
                        }
                    };
                    let mut out = Mat::zeros(q.rows, n_heads * head_dim);
                    for &(row0, n, start, slot) in &spans {
                        let layer = &mut self.slots[slot].as_mut().expect("slot allocated").layers
                            [*cache_layer];
                        let geom = kernels::AttnGeom {
                            append,
                            n_heads: *n_heads,
                            n_kv_heads: *n_kv_heads,
                            head_dim: *head_dim,
                            scale: *scale,
                            window: *window,
                            softcap: *softcap,
                            whole_group: *image_groups == ImageGroups::WholeGroup,
                        };
                        let g = if groups.is_empty() || *image_groups == ImageGroups::Off {
                            &[][..]
                        } else {
                            &groups[row0..row0 + n]
                        };
                        kernels::attention_grouped(
                            &geom, q, k, v, row0, n, start, layer, &mut out, g,
                        );
                    }
                    out
                }
                Op::SliceCols { start } => kernels::slice_cols(input(0), *start, node.cols),
                Op::RouterTopK {
                    top_k,
                    per_expert_scale,
                } => kernels::router_topk(input(0), *top_k, &self.norms[per_expert_scale]),
                Op::MoeExperts { intermediate, .. } => {
                    self.experts[&i].run(input(0), input(1), *intermediate)?
                }
                Op::GeluTanhMul => kernels::gelu_tanh_mul(input(0), input(1)),
                Op::Add => kernels::add(input(0), input(1)),
                Op::Scale { factor } => kernels::scale(input(0), *factor),
                Op::Softcap { cap } => kernels::softcap(input(0), *cap),
                Op::SelectRows => kernels::select_rows(input(0), &select),
                Op::Input => match inputs {
                    Some(inp)
                        if inp.embed_rows.len() == ids.len()
                            && inp.embed_rows.iter().enumerate().all(|(i, &r)| i == r) =>
                    {
                        inp.embeds.clone()
                    }
                    _ => {
                        return Err(Error::invalid(format!(
                            "node `{}` reads the step's input rows: every row must be given",
                            node.name
                        )))
                    }
                },
                Op::BiasAdd { bias } => vision::bias_add(input(0), &self.norms[bias]),
                Op::LayerNorm { weight, bias, eps } => {
                    vision::layer_norm(input(0), &self.norms[weight], &self.norms[bias], *eps)
                }
                Op::GeluTanh => vision::gelu(input(0)),
                Op::EncoderAttention {
                    n_heads,
                    head_dim,
                    scale,
                } => vision::encoder_attention(
                    input(0),
                    input(1),
                    input(2),
                    &seq_spans,
                    *n_heads,
                    *head_dim,
                    *scale,
                ),
                Op::AvgPool2d { side, kernel } => {
                    if let Some(s) = batch.seqs.iter().find(|s| s.tokens.len() != side * side) {
                        return Err(Error::invalid(format!(
                            "node `{}` pools a {side}x{side} grid; a sequence has {} rows",
                            node.name,
                            s.tokens.len()
                        )));
                    }
                    vision::avg_pool2d(input(0), &seq_spans, *side, *kernel)
                }
                Op::PosEmbed2d { table, size } => {
                    vision::pos_embed2d(&self.weights[table], &ids, *size)
                }
                Op::Rope2d {
                    head_dim,
                    inv_freq,
                    size,
                } => vision::rope2d(input(0), &ids, *head_dim, inv_freq, *size),
                Op::PoolPositions { kernel, size } => {
                    vision::pool_positions(input(0), &ids, &seq_spans, *kernel, *size)
                        .map_err(|e| Error::invalid(format!("node `{}`: {e}", node.name)))?
                }
                Op::Clamp { min, max } => vision::clamp(input(0), *min, *max),
                Op::ChannelScale { weight } => vision::channel_scale(input(0), &self.norms[weight]),
            };
            if taps.contains(&node.name) {
                tapped.insert(node.name.clone(), out.clone());
            }
            values[i] = Some(out);
            for inp in &node.inputs {
                if self.last_use[inp.0] == i {
                    values[inp.0] = None;
                }
            }
        }
        for &(_, n, start, slot) in &spans {
            self.slots[slot].as_mut().expect("slot allocated").len = start + n;
        }
        let logits = values[self.graph.output.0].take().expect("output computed");
        Ok(StepOutput {
            logits,
            rows: logit_rows.iter().map(|r| (r.1, r.2)).collect(),
            taps: tapped,
        })
    }
}

/// The experts of one `MoeExperts` node, split into 2-D weights (views of the fused tensors) with their
/// scale slices, so each runs as an ordinary linear.
pub(crate) struct Experts {
    /// Per expert: (gate_up `[2I, H]`, its scheme), (down `[H, I]`, its scheme).
    pub experts: Vec<[(Weight, QuantScheme); 2]>,
    /// The scale slices the per-expert schemes name.
    pub scales: WeightMap,
    /// The fused FP8 tensors and scales (checked here, not as dense weights).
    fp8_tensors: Vec<String>,
}

impl Experts {
    fn linear(&self, x: &Mat, w: &(Weight, QuantScheme)) -> Result<Mat> {
        match &w.1 {
            QuantScheme::Dense => Ok(kernels::linear(x, &w.0)),
            scheme => fp8_linear::linear_fp8(x, &w.0, scheme, &self.scales),
        }
    }

    fn run(&self, x: &Mat, route: &Mat, inter: usize) -> Result<Mat> {
        let mut out = Mat::zeros(x.rows, x.cols);
        for (e, [gate_up, down]) in self.experts.iter().enumerate() {
            let rows: Vec<usize> = (0..x.rows).filter(|&t| route.row(t)[e] != 0.0).collect();
            if rows.is_empty() {
                continue;
            }
            let xe = kernels::select_rows(x, &rows);
            let gu = self.linear(&xe, gate_up)?;
            let h = kernels::gelu_tanh_mul(
                &kernels::slice_cols(&gu, 0, inter),
                &kernels::slice_cols(&gu, inter, inter),
            );
            let y = self.linear(&h, down)?;
            for (i, &t) in rows.iter().enumerate() {
                let w = route.row(t)[e];
                for (o, v) in out.row_mut(t).iter_mut().zip(y.row(i)) {
                    *o += w * v;
                }
            }
        }
        Ok(out)
    }
}

/// Split the fused expert tensors of every `MoeExperts` node and check their shapes and dtypes.
fn load_experts(graph: &Graph, weights: &WeightMap) -> Result<BTreeMap<usize, Experts>> {
    let mut out = BTreeMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        if let Some(ex) = split_experts(n, weights)? {
            out.insert(i, ex);
        }
    }
    Ok(out)
}

/// The experts of a `MoeExperts` node (None for any other op), checked: each expert's 2-D weights with
/// their schemes renamed to per-expert scale slices, which `Experts::scales` holds (also the GPU
/// backends' expert linears, through `prepare::node_weights`).
pub(crate) fn split_experts(n: &Node, weights: &WeightMap) -> Result<Option<Experts>> {
    let Op::MoeExperts {
        gate_up,
        down,
        n_experts,
        intermediate,
        gate_up_scheme,
        down_scheme,
    } = &n.op
    else {
        return Ok(None);
    };
    let hidden = n.cols;
    let mut ex = Experts {
        experts: Vec::with_capacity(*n_experts),
        scales: WeightMap::new(),
        fp8_tensors: Vec::new(),
    };
    let split = |name: &str,
                 scheme: &QuantScheme,
                 shape: [usize; 3],
                 ex: &mut Experts|
     -> Result<Vec<(Weight, QuantScheme)>> {
        let w = weights
            .get(name)
            .ok_or_else(|| Error::tensor(name, "referenced by the graph but not loaded"))?;
        if w.shape != shape {
            return Err(Error::tensor(
                name,
                format!(
                    "expected shape {shape:?} for node `{}`, found {:?}",
                    n.name, w.shape
                ),
            ));
        }
        let dense = *scheme == QuantScheme::Dense;
        if dense != matches!(w.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::tensor(
                name,
                format!("dtype {} does not fit scheme {}", w.dtype, scheme.name()),
            ));
        }
        if !dense {
            ex.fp8_tensors.push(name.to_string());
            ex.fp8_tensors
                .extend(scheme.scale_tensors().iter().map(|s| s.to_string()));
        }
        let mut per = Vec::with_capacity(shape[0]);
        for e in 0..shape[0] {
            let we = w.slice_outer(e, &format!("{name}[{e}]"))?;
            let mut se = scheme.clone();
            let rename = |s: &mut String, ex: &mut Experts| -> Result<()> {
                let full = weights.get(s.as_str()).ok_or_else(|| {
                    Error::tensor(s.as_str(), "referenced by the graph but not loaded")
                })?;
                if full.shape.first() != Some(&shape[0]) {
                    return Err(Error::tensor(
                        s.as_str(),
                        format!(
                            "expected one scale slice per expert ({}), found shape {:?}",
                            shape[0], full.shape
                        ),
                    ));
                }
                let sn = format!("{s}[{e}]");
                ex.scales.insert(sn.clone(), full.slice_outer(e, &sn)?);
                *s = sn;
                Ok(())
            };
            match &mut se {
                QuantScheme::Dense => {}
                QuantScheme::Fp8Static {
                    weight_scale,
                    input_scale,
                } => {
                    rename(weight_scale, ex)?;
                    rename(input_scale, ex)?;
                }
                QuantScheme::Fp8Dynamic { weight_scale }
                | QuantScheme::Fp8BlockWeightOnly { weight_scale, .. } => rename(weight_scale, ex)?,
                QuantScheme::Fp8Block {
                    weight_scale_inv, ..
                } => rename(weight_scale_inv, ex)?,
            }
            if !dense {
                fp8_linear::prepare(&we, &se, &ex.scales)?;
            }
            per.push((we, se));
        }
        Ok(per)
    };
    let gu = split(
        gate_up,
        gate_up_scheme,
        [*n_experts, 2 * intermediate, hidden],
        &mut ex,
    )?;
    let dn = split(
        down,
        down_scheme,
        [*n_experts, hidden, *intermediate],
        &mut ex,
    )?;
    ex.experts = gu.into_iter().zip(dn).map(|(a, b)| [a, b]).collect();
    Ok(Some(ex))
}
