//! Prefill + incremental decode over a runner's KV cache, with sampling and stop tokens.

use std::time::Instant;

use crate::backend::{Batch, LogitsFor, Runner, StepInputs};
use crate::error::{Error, Result};
use crate::sampling::{Sampler, SamplingParams};
use crate::tensor::Mat;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these ids.
    pub stop_ids: Vec<u32>,
    /// Record the top K (id, logit) of every generated step (0: none).
    pub top_logits: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop id was generated.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub generated: Vec<u32>,
    pub stop_reason: StopReason,
    /// Top-K (id, logit) of each generated step, when asked.
    pub top_logits: Vec<Vec<(u32, f32)>>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// The `k` largest (id, value) pairs, largest first; ties by lower id. NaN is never picked.
pub fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in row.iter().enumerate() {
        if v.is_nan() || k == 0 {
            continue;
        }
        if best.len() == k && v <= best[k - 1].1 {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

/// Generate from `req.prompt_ids` in `slot` (the slot is restarted). `on_token(id)` is called for every
/// generated token; returning false stops generation.
pub fn generate(
    runner: &mut dyn Runner,
    slot: usize,
    req: &GenerateRequest,
    on_token: impl FnMut(u32) -> bool,
) -> Result<GenerateOutput> {
    generate_with_inputs(runner, slot, req, None, on_token)
}

/// [`generate`] whose prefill step takes `inputs` (image embeddings and groups, rows of the prompt).
pub fn generate_with_inputs(
    runner: &mut dyn Runner,
    slot: usize,
    req: &GenerateRequest,
    inputs: Option<&StepInputs>,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<GenerateOutput> {
    if req.prompt_ids.is_empty() {
        return Err(Error::invalid(
            "the prompt is empty: nothing to generate from",
        ));
    }
    let mut sampler = Sampler::new(req.sampling.clone())?;
    // Greedy decoding needs only each step's best ids: the backend selects them (on the device for GPU
    // backends) instead of returning the whole vocabulary row.
    // Top-k sampling needs only the k largest (plus ties): the backend selects those too.
    let greedy = sampler.params().is_greedy();
    let k = req.top_logits.max(1);
    let sparse = sampler.candidates_needed().filter(|&n| req.top_logits <= n);
    let mut run = |batch: Batch, inputs: Option<&StepInputs>| -> Result<Vec<(u32, f32)>> {
        if let Some(inp) = inputs {
            // Steps with inputs return the whole logits row; pick from it as the dense path does.
            let logits = runner.step_with_inputs(&batch, inp, &[])?.logits;
            let mut tops = top_k(logits.row(0), k.max(req.top_logits));
            if !greedy {
                let id = sampler.sample(logits.row(0));
                tops.truncate(req.top_logits);
                tops.insert(0, (id, f32::NAN));
            }
            Ok(tops)
        } else if greedy {
            Ok(runner.step_top_k(&batch, k)?.pop().unwrap_or_default())
        } else if let Some(n) = sparse {
            let cands = runner.step_top_k(&batch, n)?.pop().unwrap_or_default();
            let id = sampler.sample_candidates(&cands);
            let mut tops: Vec<(u32, f32)> = cands.into_iter().take(req.top_logits).collect();
            tops.insert(0, (id, f32::NAN));
            Ok(tops)
        } else {
            let logits = runner.step(&batch, &[])?.logits;
            let id = sampler.sample(logits.row(0));
            let mut tops = top_k(logits.row(0), req.top_logits);
            tops.insert(0, (id, f32::NAN));
            Ok(tops)
        }
    };
    let t0 = Instant::now();
    let mut next = run(
        Batch::single(slot, 0, req.prompt_ids.clone(), LogitsFor::Last),
        inputs,
    )?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let mut generated = Vec::new();
    let mut tops = Vec::new();
    let mut stop_reason = StopReason::Length;
    let t1 = Instant::now();
    let mut pos = req.prompt_ids.len();
    while generated.len() < req.max_new_tokens {
        // Sampled steps carry (id, NaN) first, then the top list; greedy ones are the top list itself,
        // whose first entry is the argmax (0 when every logit is NaN, as `argmax` answers).
        let id = next.first().map_or(0, |c| c.0);
        let list = if greedy { &next[..] } else { &next[1..] };
        if req.top_logits > 0 {
            tops.push(list.iter().take(req.top_logits).copied().collect());
        }
        generated.push(id);
        if !on_token(id) {
            stop_reason = StopReason::Cancelled;
            break;
        }
        if req.stop_ids.contains(&id) {
            stop_reason = StopReason::Stop;
            break;
        }
        if generated.len() == req.max_new_tokens {
            break;
        }
        next = run(Batch::single(slot, pos, vec![id], LogitsFor::Last), None)?;
        pos += 1;
    }
    Ok(GenerateOutput {
        generated,
        stop_reason,
        top_logits: tops,
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}

/// Teacher-forced logits at every position of `ids`, in prefill chunks of `chunk` tokens.
/// `on_rows(first_position, logits_of_the_chunk)` receives them chunk by chunk.
pub fn prompt_logits(
    runner: &mut dyn Runner,
    slot: usize,
    ids: &[u32],
    chunk: usize,
    mut on_rows: impl FnMut(usize, &Mat) -> Result<()>,
) -> Result<()> {
    let chunk = chunk.max(1);
    for (c, piece) in ids.chunks(chunk).enumerate() {
        let start = c * chunk;
        let out = runner.step(
            &Batch::single(slot, start, piece.to_vec(), LogitsFor::All),
            &[],
        )?;
        on_rows(start, &out.logits)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_skips_nan() {
        let row = [0.5, f32::NAN, 3.0, -1.0, 3.0, 2.0];
        assert_eq!(top_k(&row, 3), vec![(2, 3.0), (4, 3.0), (5, 2.0)]);
        assert_eq!(top_k(&row, 0), vec![]);
        assert_eq!(top_k(&row, 10).len(), 5);
    }
}
