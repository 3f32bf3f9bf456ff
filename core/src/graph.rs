//! The graph a model is described as, once, for every backend.
//!
//! Every value is a 2-D f32 matrix `[rows, cols]`. Rows are the tokens of one step (all sequences of the
//! batch, concatenated) except after `SelectRows`, where they are the rows whose logits were asked for.
//! Per-head ops read a row as `heads x head_dim`. Weights are referenced by name and carry their
//! quantization scheme, so a backend can pick a kernel per scheme.

use std::collections::BTreeMap;

use crate::checkpoint::Weight;

/// Index of a node (and of the value it produces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ValueId(pub usize);

/// How a linear layer's weight is stored and how its input is treated (../shared/reference/fp8-formats.md).
/// Scale tensors are named like weights and live in the same weight map.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantScheme {
    /// Weight in F32, BF16 or F16, activations in full precision.
    Dense,
    /// A. ModelOpt static per-tensor W8A8: F8 weight times the scalar `weight_scale`; the input is quantized
    /// to E4M3 with the scalar static `input_scale`.
    Fp8Static {
        weight_scale: String,
        input_scale: String,
    },
    /// B. compressed-tensors FP8_DYNAMIC: per-output-channel `weight_scale` `[out, 1]`; the input is quantized
    /// per token with a dynamic scale.
    Fp8Dynamic { weight_scale: String },
    /// C. ModelOpt `fp8_pb_wo`: one scale per `block = [rows, cols]` block of the weight; the input stays in
    /// full precision (W8A16).
    Fp8BlockWeightOnly {
        weight_scale: String,
        block: [usize; 2],
    },
    /// D. transformers FineGrainedFP8: one `weight_scale_inv` per `block` of the weight; the input is quantized
    /// per token and per group of `block[1]` columns with dynamic scales.
    Fp8Block {
        weight_scale_inv: String,
        block: [usize; 2],
    },
}

impl QuantScheme {
    pub fn name(&self) -> &'static str {
        match self {
            QuantScheme::Dense => "dense",
            QuantScheme::Fp8Static { .. } => "fp8-static",
            QuantScheme::Fp8Dynamic { .. } => "fp8-dynamic",
            QuantScheme::Fp8BlockWeightOnly { .. } => "fp8-block-wo",
            QuantScheme::Fp8Block { .. } => "fp8-block",
        }
    }

    /// Names of the scale tensors this scheme reads.
    pub fn scale_tensors(&self) -> Vec<&str> {
        match self {
            QuantScheme::Dense => vec![],
            QuantScheme::Fp8Static {
                weight_scale,
                input_scale,
            } => vec![weight_scale, input_scale],
            QuantScheme::Fp8Dynamic { weight_scale } => vec![weight_scale],
            QuantScheme::Fp8BlockWeightOnly { weight_scale, .. } => vec![weight_scale],
            QuantScheme::Fp8Block {
                weight_scale_inv, ..
            } => vec![weight_scale_inv],
        }
    }
}

/// How attention treats the step's bidirectional groups (contiguous runs of rows of one image,
/// `StepInputs::groups`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageGroups {
    /// Ignored: causal (within the window).
    Off,
    /// A row also sees the later rows of its group: (causal OR same group), then the window, which only
    /// bounds the past (Gemma 3; Gemma 4's sliding layers).
    Windowed,
    /// A row sees every row of its group, the window notwithstanding: (causal AND window) OR same group
    /// (transformers 5.23's `Gemma4UnifiedModel` on sliding layers).
    WholeGroup,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Gather rows of `table` for the step's token ids, times `scale`. No inputs.
    Embed { table: String, scale: f32 },
    /// RMSNorm over each group of `group` values of a row: `x * rsqrt(mean(x^2) + eps) * w'`, where
    /// `w' = 1 + w` when `add_one` (Gemma 3) and `w` otherwise; no weight means `w' = 1`.
    RmsNorm {
        weight: Option<String>,
        group: usize,
        eps: f32,
        add_one: bool,
    },
    /// `y = x W^T`, W stored `[out, in]`.
    Linear { weight: String, scheme: QuantScheme },
    /// Rotate-half (NeoX) RoPE on each head of `head_dim` values, at the step's positions.
    Rope { head_dim: usize, inv_freq: Vec<f32> },
    /// Causal attention of q (`[T, n_heads*head_dim]`) over the KV cache of `cache_layer` after appending
    /// this step's k and v (`[T, n_kv_heads*head_dim]`). `window`: a query sees the `window` most recent keys,
    /// itself included. GQA: query head h reads kv head `h / (n_heads / n_kv_heads)`. `image_groups`: how
    /// the step's bidirectional groups (`StepInputs::groups`, images) widen the causal mask.
    Attention {
        cache_layer: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        scale: f32,
        window: Option<usize>,
        softcap: Option<f32>,
        image_groups: ImageGroups,
    },
    /// `gelu_tanh(gate) * up`; inputs gate, up.
    GeluTanhMul,
    /// Elementwise `a + b`.
    Add,
    /// `x * factor`.
    Scale { factor: f32 },
    /// `cap * tanh(x / cap)`.
    Softcap { cap: f32 },
    /// Keep only the rows the step asked logits for.
    SelectRows,
    /// Columns `[start, start + cols)` of each row (`cols` = the node's width).
    SliceCols { start: usize },
    /// Attention as [`Op::Attention`] over the KV cache of `cache_layer`, which another (earlier) node
    /// owns, without appending to it: inputs q, and the owner's k and v of this step (read for this step's
    /// positions; earlier positions come from the cache). Gemma 4 KV sharing.
    AttentionShared {
        cache_layer: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        scale: f32,
        window: Option<usize>,
        softcap: Option<f32>,
        image_groups: ImageGroups,
    },
    /// MoE routing weights from router logits `[T, E]`: softmax over all E, keep the `top_k` largest
    /// probabilities (ties: lower expert index first), divide them by their sum, multiply each by
    /// `per_expert_scale[e]` (an `[E]` weight); every other entry is 0. Output `[T, E]`.
    RouterTopK {
        top_k: usize,
        per_expert_scale: String,
    },
    /// Routed experts, inputs x `[T, H]` and routing weights `[T, E]` (from [`Op::RouterTopK`]):
    /// `sum_e w[t,e] * down_e(gelu_tanh(gate_e(x)) * up_e(x))` over the experts with `w[t,e] != 0`.
    /// `gate_up` is stored `[E, 2I, H]` (gate = rows `[0, I)`, up = rows `[I, 2I)`), `down` `[E, H, I]`;
    /// each scheme applies to every expert's 2-D slice, its scale tensors having the expert as their
    /// leading dimension.
    MoeExperts {
        gate_up: String,
        down: String,
        n_experts: usize,
        intermediate: usize,
        gate_up_scheme: QuantScheme,
        down_scheme: QuantScheme,
    },
    // Vision encoders (images in; crate::vision). Rows are a sequence's patches or pooled tokens.
    /// The step's given rows (`StepInputs::embeds`, every row given), e.g. an image's flattened patches.
    /// No inputs.
    Input,
    /// `x + b` on every row, `b` a vector of `cols` values (a Linear's bias).
    BiasAdd { bias: String },
    /// LayerNorm of each row: `(x - mean) / sqrt(var + eps) * w + b` (biased variance).
    LayerNorm {
        weight: String,
        bias: String,
        eps: f32,
    },
    /// `gelu_tanh(x)`.
    GeluTanh,
    /// Non-causal attention of each sequence's rows among themselves, no KV cache (an encoder): q, k, v
    /// `[T, n_heads*head_dim]`.
    EncoderAttention {
        n_heads: usize,
        head_dim: usize,
        scale: f32,
    },
    /// Average pool of each sequence's rows read as a row-major `side x side` grid, over `kernel x kernel`
    /// blocks: `(side / kernel)^2` rows per sequence, row-major over the pooled grid. The rows of the
    /// sequence must number `side * side`.
    AvgPool2d { side: usize, kernel: usize },
    // Gemma 4 vision (crate::gemma4_vision, gemma-architecture.md 2.5). Each row's token id is its patch position
    // on a grid of `size` columns: `x = id % size`, `y = id / size`.
    /// `table[x] + table[size + y]` at each row's position (the x and y tables stacked, `[2 * size, cols]`).
    /// No inputs.
    PosEmbed2d { table: String, size: usize },
    /// 2-D rotate-half RoPE on each head of `head_dim` values: the first `head_dim / 2` values as
    /// [`Op::Rope`] at position x, the second half at position y, both with `inv_freq` (`head_dim / 4`
    /// frequencies).
    Rope2d {
        head_dim: usize,
        inv_freq: Vec<f32>,
        size: usize,
    },
    /// Average pool of each sequence's rows by position over `kernel x kernel` blocks: with
    /// `w = (max x + 1) / kernel` pooled columns, row (x, y) adds `1 / kernel^2` of itself to pooled row
    /// `x / kernel + w * (y / kernel)` of its sequence; a sequence of n rows gives `n / kernel^2` rows, each of
    /// which must receive rows (a full grid whose sides are multiples of `kernel`).
    PoolPositions { kernel: usize, size: usize },
    /// `min(max(x, min), max)` elementwise.
    Clamp { min: f32, max: f32 },
    /// `x * w` on every row, `w` a vector of `cols` values.
    ChannelScale { weight: String },
}

impl Op {
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Embed { .. } => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Linear { .. } => "linear",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::GeluTanhMul => "gelu_tanh_mul",
            Op::Add => "add",
            Op::Scale { .. } => "scale",
            Op::Softcap { .. } => "softcap",
            Op::SelectRows => "select_rows",
            Op::SliceCols { .. } => "slice_cols",
            Op::AttentionShared { .. } => "attention_shared",
            Op::RouterTopK { .. } => "router_topk",
            Op::MoeExperts { .. } => "moe_experts",
            Op::Input => "input",
            Op::BiasAdd { .. } => "bias_add",
            Op::LayerNorm { .. } => "layer_norm",
            Op::GeluTanh => "gelu_tanh",
            Op::EncoderAttention { .. } => "encoder_attention",
            Op::AvgPool2d { .. } => "avg_pool2d",
            Op::PosEmbed2d { .. } => "pos_embed2d",
            Op::Rope2d { .. } => "rope2d",
            Op::PoolPositions { .. } => "pool_positions",
            Op::Clamp { .. } => "clamp",
            Op::ChannelScale { .. } => "channel_scale",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    /// Unique name, readable back as a tap (e.g. `layers.3.attn_out`).
    pub name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
    /// Columns of the value this node produces.
    pub cols: usize,
}

/// Shape of one layer's KV cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheLayer {
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window: only this many most recent positions are ever read.
    pub window: Option<usize>,
    /// Per-tensor scales of an FP8 KV cache (scalar weights), when the checkpoint has them; 1.0 otherwise.
    pub k_scale: Option<String>,
    pub v_scale: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Graph {
    pub nodes: Vec<Node>,
    /// The logits value.
    pub output: ValueId,
    pub cache_layers: Vec<CacheLayer>,
    pub vocab_size: usize,
}

impl Graph {
    pub fn new(vocab_size: usize) -> Graph {
        Graph {
            nodes: Vec::new(),
            output: ValueId(0),
            cache_layers: Vec::new(),
            vocab_size,
        }
    }

    pub fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[ValueId],
        cols: usize,
    ) -> ValueId {
        self.nodes.push(Node {
            name: name.into(),
            op,
            inputs: inputs.to_vec(),
            cols,
        });
        ValueId(self.nodes.len() - 1)
    }

    pub fn node(&self, id: ValueId) -> &Node {
        &self.nodes[id.0]
    }

    pub fn find(&self, name: &str) -> Option<ValueId> {
        self.nodes.iter().position(|n| n.name == name).map(ValueId)
    }

    /// For each node, the index of the last node that reads it (itself if none), so executors can free early.
    pub fn last_use(&self) -> Vec<usize> {
        let mut last: Vec<usize> = (0..self.nodes.len()).collect();
        for (i, n) in self.nodes.iter().enumerate() {
            for inp in &n.inputs {
                last[inp.0] = last[inp.0].max(i);
            }
        }
        last[self.output.0] = usize::MAX;
        last
    }

    /// Activation buffers shared by liveness: `(slot_of, slot_cols)`, where node `i` writes buffer
    /// `slot_of[i]` and buffer `s` must hold `slot_cols[s]` columns. A node's output never shares a buffer
    /// with its inputs; the output node's buffer is never reused.
    pub fn buffer_slots(&self) -> (Vec<usize>, Vec<usize>) {
        let last = self.last_use();
        let mut slot_of = vec![0usize; self.nodes.len()];
        let mut slot_cols: Vec<usize> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let pick = free
                .iter()
                .enumerate()
                .filter(|(_, &s)| slot_cols[s] >= n.cols)
                .min_by_key(|(_, &s)| slot_cols[s])
                .or_else(|| free.iter().enumerate().max_by_key(|(_, &s)| slot_cols[s]))
                .map(|(fi, _)| fi);
            let s = match pick {
                Some(fi) => free.swap_remove(fi),
                None => {
                    slot_cols.push(0);
                    slot_cols.len() - 1
                }
            };
            slot_cols[s] = slot_cols[s].max(n.cols);
            slot_of[i] = s;
            let mut ins: Vec<usize> = n.inputs.iter().map(|v| v.0).collect();
            ins.sort();
            ins.dedup();
            for inp in ins {
                if last[inp] == i {
                    free.push(slot_of[inp]);
                }
            }
            if last[i] == i {
                free.push(s);
            }
        }
        (slot_of, slot_cols)
    }

    /// Positions a slot of cache layer `layer` keeps: the sliding window (a ring) when that is less than
    /// `max_seq_len`, else `max_seq_len`. A layer that [`Op::AttentionShared`] nodes read keeps every
    /// position: its owner appends a whole step before the sharers read it, so a ring of the window would
    /// already have overwritten keys that the step's first queries still see.
    /// The node a step's given rows (`StepInputs::embeds`) feed: the `Op::Input` node (an encoder), else
    /// the first `Op::Embed` (the token embedding, whose rows they replace; a later one, such as Gemma 4's
    /// per-layer table, gathers by id).
    pub fn given_rows_node(&self) -> Option<usize> {
        let input = self.nodes.iter().position(|n| matches!(n.op, Op::Input));
        input.or_else(|| {
            self.nodes
                .iter()
                .position(|n| matches!(n.op, Op::Embed { .. }))
        })
    }

    pub fn cache_capacity(&self, layer: usize, max_seq_len: usize) -> usize {
        let shared = self.nodes.iter().any(
            |n| matches!(n.op, Op::AttentionShared { cache_layer, .. } if cache_layer == layer),
        );
        let window = self.cache_layers[layer].window.filter(|_| !shared);
        window.map_or(max_seq_len, |w| w.min(max_seq_len)).max(1)
    }

    /// Names of all weights the graph reads.
    pub fn weight_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for n in &self.nodes {
            match &n.op {
                Op::Embed { table, .. } => names.push(table),
                Op::RmsNorm {
                    weight: Some(w), ..
                } => names.push(w),
                Op::Linear { weight, scheme } => {
                    names.push(weight);
                    names.extend(scheme.scale_tensors());
                }
                Op::RouterTopK {
                    per_expert_scale, ..
                } => names.push(per_expert_scale),
                Op::MoeExperts {
                    gate_up,
                    down,
                    gate_up_scheme,
                    down_scheme,
                    ..
                } => {
                    names.push(gate_up);
                    names.push(down);
                    names.extend(gate_up_scheme.scale_tensors());
                    names.extend(down_scheme.scale_tensors());
                }
                Op::BiasAdd { bias } => names.push(bias),
                Op::PosEmbed2d { table, .. } => names.push(table),
                Op::ChannelScale { weight } => names.push(weight),
                Op::LayerNorm { weight, bias, .. } => {
                    names.push(weight);
                    names.push(bias);
                }
                _ => {}
            }
        }
        for l in &self.cache_layers {
            names.extend(l.k_scale.as_deref());
            names.extend(l.v_scale.as_deref());
        }
        names.sort();
        names.dedup();
        names
    }
}

/// The weights a graph references, by the names the graph uses.
pub type WeightMap = BTreeMap<String, Weight>;
