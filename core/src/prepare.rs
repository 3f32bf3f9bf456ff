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
            if *group == 0 || n.cols % group != 0 {
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
        _ => NodeWeights::None,
    })
}

/// The ops a GPU backend runs (all of them), with attention limited to `max_head_dim` and whole GQA groups.
pub fn gpu_supports(op: &Op, max_head_dim: usize) -> bool {
    match op {
        Op::Attention {
            head_dim,
            n_heads,
            n_kv_heads,
            ..
        } => *head_dim <= max_head_dim && *n_kv_heads > 0 && n_heads % n_kv_heads == 0,
        Op::Rope { head_dim, inv_freq } => head_dim % 2 == 0 && inv_freq.len() == head_dim / 2,
        Op::Embed { .. }
        | Op::RmsNorm { .. }
        | Op::Linear { .. }
        | Op::GeluTanhMul
        | Op::Add
        | Op::Scale { .. }
        | Op::Softcap { .. }
        | Op::SelectRows => true,
    }
}
