//! What each node of a graph reads from the weights, checked once for every GPU backend: shapes against the
//! graph, dtypes, and the FP8 scales decoded ([`fp8_linear::prepare`]). A backend then only uploads.

use crate::checkpoint::Weight;
use crate::cpu::fp8_linear::{self, Fp8Scales};
use crate::error::{Error, Result};
use crate::graph::{Graph, Node, Op, QuantScheme, WeightMap};
use crate::tensor::DType;

pub enum NodeWeights<'a> {
    /// The node reads no weight.
    None,
    /// The embedding table, `[>= vocab, cols]`.
    Embed(&'a Weight),
    /// The norm weight as f32 (one value per column of a group), if the norm has one.
    Norm(Option<Vec<f32>>),
    /// The weight `[n, k]` and, for an FP8 scheme, its scales.
    Linear {
        weight: &'a Weight,
        k: usize,
        n: usize,
        scales: Option<Fp8Scales>,
    },
    /// RouterTopK: the per-expert scales as f32, one per expert.
    Router(Vec<f32>),
    /// MoeExperts: per expert, gate_up `[2I, H]` and down `[H, I]` as ordinary linears.
    Experts(Vec<[ExpertLinear; 2]>),
    /// BiasAdd (the bias) and LayerNorm (the weight, then the bias) as f32, each one value per column.
    Vectors(Vec<Vec<f32>>),
}

/// One expert's linear: a 2-D view of the fused tensor, its scheme and, for an FP8 scheme, its scales.
pub struct ExpertLinear {
    pub weight: Weight,
    pub scheme: QuantScheme,
    pub scales: Option<Fp8Scales>,
}

fn dense_ok(w: &Weight) -> Result<()> {
    if matches!(w.dtype, DType::F32 | DType::BF16 | DType::F16) {
        Ok(())
    } else {
        Err(Error::tensor(
            &w.name,
            format!(
                "dtype {} needs an FP8 scheme; as a plain weight only F32, BF16 and F16 are supported",
                w.dtype
            ),
        ))
    }
}

/// The weights node `n` of `graph` reads, checked.
pub fn node_weights<'a>(
    graph: &Graph,
    n: &Node,
    weights: &'a WeightMap,
) -> Result<NodeWeights<'a>> {
    let get = |name: &str| {
        weights
            .get(name)
            .ok_or_else(|| Error::tensor(name, "referenced by the graph but not loaded"))
    };
    Ok(match &n.op {
        Op::Embed { table, .. } => {
            let w = get(table)?;
            if w.shape.len() != 2 || w.shape[1] != n.cols {
                return Err(Error::tensor(
                    table,
                    format!("shape {:?} does not fit node `{}`", w.shape, n.name),
                ));
            }
            if w.shape[0] < graph.vocab_size {
                return Err(Error::tensor(
                    table,
                    format!(
                        "has {} rows for a vocabulary of {}",
                        w.shape[0], graph.vocab_size
                    ),
                ));
            }
            NodeWeights::Embed(w)
        }
        Op::RmsNorm { weight, group, .. } => {
            if *group == 0 || !n.cols.is_multiple_of(*group) {
                return Err(Error::invalid(format!(
                    "node `{}`: {} columns are not groups of {group}",
                    n.name, n.cols
                )));
            }
            NodeWeights::Norm(match weight {
                Some(name) => {
                    let w = get(name)?;
                    dense_ok(w)?;
                    let v = w.to_f32();
                    if v.len() != *group {
                        return Err(Error::tensor(
                            name,
                            format!("has {} values for groups of {group}", v.len()),
                        ));
                    }
                    Some(v)
                }
                None => None,
            })
        }
        Op::Linear { weight, scheme } => {
            let w = get(weight)?;
            let k = n.inputs.first().map(|&i| graph.node(i).cols);
            if w.shape.len() != 2 || k != Some(w.shape[1]) || n.cols != w.shape[0] {
                return Err(Error::tensor(
                    weight,
                    format!(
                        "shape {:?} does not fit node `{}` ({k:?} -> {} columns)",
                        w.shape, n.name, n.cols
                    ),
                ));
            }
            let scales = if *scheme == QuantScheme::Dense {
                dense_ok(w)?;
                None
            } else {
                Some(fp8_linear::prepare(w, scheme, weights)?)
            };
            NodeWeights::Linear {
                weight: w,
                k: w.shape[1],
                n: w.shape[0],
                scales,
            }
        }
        Op::RouterTopK {
            per_expert_scale, ..
        } => {
            let v = get(per_expert_scale)?.to_f32();
            if v.len() != n.cols {
                return Err(Error::tensor(
                    per_expert_scale,
                    format!("has {} values for {} experts", v.len(), n.cols),
                ));
            }
            NodeWeights::Router(v)
        }
        Op::MoeExperts { .. } => {
            let ex = crate::cpu::split_experts(n, weights)?.expect("a MoeExperts node");
            let lin = |(w, scheme): &(Weight, QuantScheme)| -> Result<ExpertLinear> {
                Ok(ExpertLinear {
                    weight: w.clone(),
                    scheme: scheme.clone(),
                    scales: match scheme {
                        QuantScheme::Dense => None,
                        s => Some(fp8_linear::prepare(w, s, &ex.scales)?),
                    },
                })
            };
            NodeWeights::Experts(
                ex.experts
                    .iter()
                    .map(|[gu, d]| Ok([lin(gu)?, lin(d)?]))
                    .collect::<Result<_>>()?,
            )
        }
        Op::BiasAdd { bias } => NodeWeights::Vectors(vec![vector(get(bias)?, n)?]),
        Op::ChannelScale { weight } => NodeWeights::Vectors(vec![vector(get(weight)?, n)?]),
        Op::PosEmbed2d { table, size } => {
            let w = get(table)?;
            if w.shape != [2 * size, n.cols] {
                return Err(Error::tensor(
                    table,
                    format!(
                        "shape {:?} does not fit node `{}` (x and y tables of {size} positions, [{}, {}])",
                        w.shape,
                        n.name,
                        2 * size,
                        n.cols
                    ),
                ));
            }
            NodeWeights::Embed(w)
        }
        Op::LayerNorm { weight, bias, .. } => {
            NodeWeights::Vectors(vec![vector(get(weight)?, n)?, vector(get(bias)?, n)?])
        }
        _ => NodeWeights::None,
    })
}

/// A per-column vector weight of node `n` as f32, checked: a plain dtype and one value per column.
fn vector(w: &Weight, n: &Node) -> Result<Vec<f32>> {
    dense_ok(w)?;
    let v = w.to_f32();
    if v.len() != n.cols {
        return Err(Error::tensor(
            &w.name,
            format!(
                "has {} values, node `{}` has {} columns",
                v.len(),
                n.name,
                n.cols
            ),
        ));
    }
    Ok(v)
}

/// The ops a GPU backend runs, with attention limited to `max_head_dim` and whole GQA groups; the Gemma 4
/// ops (`SliceCols`, `AttentionShared`, `RouterTopK`, `MoeExperts`) only where `gemma4` says the backend has
/// kernels for them, and the vision-encoder ops (`Input`, `BiasAdd`, `LayerNorm`, `GeluTanh`,
/// `EncoderAttention`, `AvgPool2d`, which come with `Runner::step_with_inputs`) only where `vision` does,
/// and the Gemma 4 vision-tower ops (`PosEmbed2d`, `Rope2d`, `PoolPositions`, `Clamp`, `ChannelScale`)
/// only where `vision4` does.
pub fn gpu_supports(
    op: &Op,
    max_head_dim: usize,
    gemma4: bool,
    vision: bool,
    vision4: bool,
) -> bool {
    match op {
        Op::Attention {
            head_dim,
            n_heads,
            n_kv_heads,
            ..
        }
        | Op::AttentionShared {
            head_dim,
            n_heads,
            n_kv_heads,
            ..
        } => {
            (gemma4 || matches!(op, Op::Attention { .. }))
                && *head_dim <= max_head_dim
                && *n_kv_heads > 0
                && n_heads % n_kv_heads == 0
        }
        Op::Rope { head_dim, inv_freq } => head_dim % 2 == 0 && inv_freq.len() == head_dim / 2,
        Op::Embed { .. }
        | Op::RmsNorm { .. }
        | Op::Linear { .. }
        | Op::GeluTanhMul
        | Op::Add
        | Op::Scale { .. }
        | Op::Softcap { .. }
        | Op::SelectRows => true,
        Op::SliceCols { .. } | Op::RouterTopK { .. } | Op::MoeExperts { .. } => gemma4,
        Op::EncoderAttention { head_dim, .. } => vision && *head_dim <= max_head_dim,
        Op::AvgPool2d { kernel, .. } => vision && *kernel > 0,
        Op::Input | Op::BiasAdd { .. } | Op::LayerNorm { .. } | Op::GeluTanh => vision,
        Op::PosEmbed2d { .. } | Op::Clamp { .. } | Op::ChannelScale { .. } => vision4,
        Op::Rope2d {
            head_dim, inv_freq, ..
        } => vision4 && head_dim % 4 == 0 && inv_freq.len() == head_dim / 4,
        Op::PoolPositions { kernel, .. } => vision4 && *kernel > 0,
    }
}

/// The weight dtype as GPU kernels number it: 0 F32, 1 BF16, 2 F16, 3 E4M3.
pub fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        DType::F8E4M3 => 3,
    }
}

/// The scheme as GPU kernels number it: 0 dense, 1 FP8 static, 2 dynamic, 3 block weight-only, 4 block.
pub fn scheme_code(s: &QuantScheme) -> u32 {
    match s {
        QuantScheme::Dense => 0,
        QuantScheme::Fp8Static { .. } => 1,
        QuantScheme::Fp8Dynamic { .. } => 2,
        QuantScheme::Fp8BlockWeightOnly { .. } => 3,
        QuantScheme::Fp8Block { .. } => 4,
    }
}

/// A linear's FP8 scales as GPU kernels take them: a scale array (per output row for scheme 2, per block
/// row-major for 3 and 4), the scalar weight and input scales (scheme 1; 1 otherwise) and the block shape
/// (`[1, 1]` without blocks).
#[derive(Debug, Clone, PartialEq)]
pub struct KernelScales {
    pub array: Option<Vec<f32>>,
    pub sw: f32,
    pub sx: f32,
    pub block: [usize; 2],
}

impl KernelScales {
    pub fn new(scales: Option<Fp8Scales>) -> KernelScales {
        let mut k = KernelScales {
            array: None,
            sw: 1.0,
            sx: 1.0,
            block: [1, 1],
        };
        match scales {
            None => {}
            Some(Fp8Scales::Static { sw, sx }) => {
                k.sw = sw;
                k.sx = sx;
            }
            Some(Fp8Scales::Dynamic { sw }) => k.array = Some(sw),
            Some(Fp8Scales::BlockWeightOnly { s, block })
            | Some(Fp8Scales::Block { sinv: s, block }) => {
                k.array = Some(s);
                k.block = block;
            }
        }
        k
    }

    /// Activation groups per row of `k` columns (1 without blocks).
    pub fn groups(&self, k: usize) -> usize {
        k.div_ceil(self.block[1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_scales_of_every_scheme() {
        assert_eq!(
            KernelScales::new(None),
            KernelScales {
                array: None,
                sw: 1.0,
                sx: 1.0,
                block: [1, 1]
            }
        );
        let s = KernelScales::new(Some(Fp8Scales::Static { sw: 0.5, sx: 2.0 }));
        assert_eq!((s.array, s.sw, s.sx, s.block), (None, 0.5, 2.0, [1, 1]));
        let d = KernelScales::new(Some(Fp8Scales::Dynamic { sw: vec![1.0, 3.0] }));
        assert_eq!(
            (d.array, d.sw, d.block),
            (Some(vec![1.0, 3.0]), 1.0, [1, 1])
        );
        let b = KernelScales::new(Some(Fp8Scales::Block {
            sinv: vec![4.0],
            block: [128, 64],
        }));
        assert_eq!(
            (b.array.clone(), b.block, b.groups(130)),
            (Some(vec![4.0]), [128, 64], 3)
        );
        let w = KernelScales::new(Some(Fp8Scales::BlockWeightOnly {
            s: vec![5.0],
            block: [3, 5],
        }));
        assert_eq!(
            (w.array.clone(), w.block, w.groups(5)),
            (Some(vec![5.0]), [3, 5], 1)
        );
        assert_eq!(dtype_code(DType::F8E4M3), 3);
        assert_eq!(scheme_code(&QuantScheme::Dense), 0);
    }
}
