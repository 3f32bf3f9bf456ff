//! The interface every backend implements: it takes a whole graph (so a GPU backend can fuse and capture
//! it) and executes one step for a batch of sequences.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::graph::{Graph, ImageGroups, Op, WeightMap};
use crate::tensor::Mat;

/// Which positions of a sequence's step produce logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
}

/// One sequence's share of a step: its new tokens, appended to its KV-cache slot at `start_pos`.
#[derive(Debug, Clone)]
pub struct SeqStep {
    pub slot: usize,
    /// Must equal the slot's current length, or 0 to restart the slot.
    pub start_pos: usize,
    pub tokens: Vec<u32>,
    pub logits: LogitsFor,
}

#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub seqs: Vec<SeqStep>,
}

impl Batch {
    pub fn single(slot: usize, start_pos: usize, tokens: Vec<u32>, logits: LogitsFor) -> Batch {
        Batch {
            seqs: vec![SeqStep {
                slot,
                start_pos,
                tokens,
                logits,
            }],
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    /// Flat row index (within the step) of every row that produces logits, with (sequence index, position).
    pub fn logit_rows(&self) -> Vec<(usize, usize, usize)> {
        let mut rows = Vec::new();
        let mut base = 0;
        for (si, s) in self.seqs.iter().enumerate() {
            let n = s.tokens.len();
            match s.logits {
                LogitsFor::None => {}
                LogitsFor::Last if n > 0 => rows.push((base + n - 1, si, s.start_pos + n - 1)),
                LogitsFor::Last => {}
                LogitsFor::All => rows.extend((0..n).map(|i| (base + i, si, s.start_pos + i))),
            }
            base += n;
        }
        rows
    }

    /// Token ids and positions of every row of the step.
    pub fn flat_tokens(&self) -> (Vec<u32>, Vec<usize>) {
        let mut ids = Vec::with_capacity(self.num_tokens());
        let mut pos = Vec::with_capacity(self.num_tokens());
        for s in &self.seqs {
            ids.extend_from_slice(&s.tokens);
            pos.extend((0..s.tokens.len()).map(|i| s.start_pos + i));
        }
        (ids, pos)
    }

    /// (first flat row, rows) of each sequence.
    pub fn seq_spans(&self) -> Vec<(usize, usize)> {
        let mut b = 0;
        self.seqs
            .iter()
            .map(|s| {
                b += s.tokens.len();
                (b - s.tokens.len(), s.tokens.len())
            })
            .collect()
    }
}

/// Inputs of a step beyond its token ids (images): see [`Runner::step_with_inputs`].
#[derive(Debug, Clone)]
pub struct StepInputs {
    /// Flat rows of the step (as in `Batch::flat_tokens`) whose embedding is given: row `embed_rows[i]`
    /// takes `embeds.row(i)` instead of the first Embed op's gather, unscaled (later Embed ops gather by id). `Op::Input` reads `embeds`, which
    /// then must give every row of the step in order.
    pub embed_rows: Vec<usize>,
    pub embeds: Mat,
    /// Per flat row: its bidirectional attention group (an image), or None; empty means all causal.
    /// A row of a group also attends to the later rows of the same contiguous group within the step.
    pub groups: Vec<Option<u32>>,
}

/// Check a step's inputs (None: a plain step) against its `rows` rows of `graph`: one row index per given
/// embedding, each within the step, embeddings as wide as the graph's input (its `Op::Input`, else its
/// first `Op::Embed`), one group per row (or none); and an `Op::Input` needs every row given, in order.
pub fn check_step_inputs(inputs: Option<&StepInputs>, graph: &Graph, rows: usize) -> Result<()> {
    let input = graph.nodes.iter().find(|n| matches!(n.op, Op::Input));
    let Some(inp) = inputs else {
        return match input {
            Some(n) => Err(Error::invalid(format!(
                "node `{}` reads the step's input rows: every row must be given",
                n.name
            ))),
            None => Ok(()),
        };
    };
    inp.check(input, graph, rows)
}

impl StepInputs {
    /// The given rows as runs of consecutive rows: (first row of the step, first given row, rows), for a
    /// GPU backend to copy each run at once.
    pub fn given_runs(&self) -> Vec<(usize, usize, usize)> {
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (i, &r) in self.embed_rows.iter().enumerate() {
            match runs.last_mut() {
                Some((r0, i0, n)) if *r0 + *n == r && *i0 + *n == i => *n += 1,
                _ => runs.push((r, i, 1)),
            }
        }
        runs
    }

    fn check(&self, input: Option<&crate::graph::Node>, graph: &Graph, rows: usize) -> Result<()> {
        let cols = input
            .or_else(|| {
                graph
                    .nodes
                    .iter()
                    .find(|n| matches!(n.op, Op::Embed { .. }))
            })
            .map_or(0, |n| n.cols);
        if self.embed_rows.len() != self.embeds.rows {
            return Err(Error::invalid(format!(
                "{} embedding rows given for {} row indices",
                self.embeds.rows,
                self.embed_rows.len()
            )));
        }
        if let Some(&r) = self.embed_rows.iter().find(|&&r| r >= rows) {
            return Err(Error::invalid(format!(
                "embedding for row {r} of a step of {rows} rows"
            )));
        }
        if !self.embed_rows.is_empty() && self.embeds.cols != cols {
            return Err(Error::invalid(format!(
                "embeddings of {} columns for a graph input of {cols}",
                self.embeds.cols
            )));
        }
        if !self.groups.is_empty() && self.groups.len() != rows {
            return Err(Error::invalid(format!(
                "{} attention groups for a step of {rows} rows",
                self.groups.len()
            )));
        }
        if let Some(n) = input {
            let every = self.embed_rows.len() == rows
                && self.embed_rows.iter().enumerate().all(|(i, &r)| i == r);
            if !every {
                return Err(Error::invalid(format!(
                    "node `{}` reads the step's input rows: every row must be given",
                    n.name
                )));
            }
        }
        Ok(())
    }
}

/// Per flat row of `batch`, the (first, last) positions its attention sees besides the window, under
/// `mode` (graph.rs [`ImageGroups`]), as GPU kernels take it: a row sees `[min(window start, first), last]`.
/// Off: (itself, itself); Windowed: (itself, its group's end); WholeGroup: (its group's start, its end).
pub fn attention_spans(batch: &Batch, groups: &[Option<u32>], mode: ImageGroups) -> Vec<[u32; 2]> {
    let groups = if mode == ImageGroups::Off {
        &[][..]
    } else {
        groups
    };
    let mut spans: Vec<[u32; 2]> = Vec::with_capacity(batch.num_tokens());
    for s in &batch.seqs {
        let (row0, n) = (spans.len(), s.tokens.len());
        let g = if groups.is_empty() {
            groups
        } else {
            &groups[row0..row0 + n]
        };
        let first = if mode == ImageGroups::WholeGroup {
            group_firsts(g, n)
        } else {
            (0..n).collect()
        };
        let last = group_ends(g, n);
        spans.extend((0..n).map(|i| {
            [
                (s.start_pos + first[i]) as u32,
                (s.start_pos + last[i]) as u32,
            ]
        }));
    }
    spans
}

/// For each of a sequence's `n` rows in a step, the first row (within the sequence's rows) of its
/// contiguous image group (`groups` as in [`group_ends`]), itself outside a group.
pub fn group_firsts(groups: &[Option<u32>], n: usize) -> Vec<usize> {
    let mut first: Vec<usize> = (0..n).collect();
    for i in 1..groups.len().min(n) {
        if groups[i].is_some() && groups[i] == groups[i - 1] {
            first[i] = first[i - 1];
        }
    }
    first
}

/// For each of a sequence's `n` rows in a step, with `groups` its rows' image groups (or empty), the last
/// row (within the sequence's rows) its attention sees: itself, or the end of its contiguous group (Gemma
/// 3's image mask: causal OR same image).
pub fn group_ends(groups: &[Option<u32>], n: usize) -> Vec<usize> {
    let mut last: Vec<usize> = (0..n).collect();
    if !groups.is_empty() {
        for i in (0..n.saturating_sub(1)).rev() {
            if groups[i].is_some() && groups[i] == groups[i + 1] {
                last[i] = last[i + 1];
            }
        }
    }
    last
}

/// What a step returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// One row per requested position, in the order of `Batch::logit_rows`.
    pub logits: Mat,
    /// (sequence index in the batch, position) of each logits row.
    pub rows: Vec<(usize, usize)>,
    /// The values of the nodes named in the step's tap list.
    pub taps: BTreeMap<String, Mat>,
}

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// The backend's activation precision (f32 on the CPU reference).
    #[default]
    Auto,
    /// Keys and values rounded to BF16.
    Bf16,
    /// Keys and values stored as E4M3 codes of `k / k_scale`, `v / v_scale` (per-tensor scales from the
    /// checkpoint, 1.0 when it has none), as vLLM's `--kv-cache-dtype fp8` does.
    Fp8,
}

impl KvCacheDtype {
    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::Bf16 => "bf16",
            KvCacheDtype::Fp8 => "fp8",
        }
    }
}

/// Size of the KV cache a runner allocates.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Number of sequences that can be live at once.
    pub slots: usize,
    /// Longest sequence (prompt + generated) a slot can hold.
    pub max_seq_len: usize,
    pub kv_dtype: KvCacheDtype,
    /// Blocks of [`crate::kv_pages::KV_BLOCK`] positions in a paged cache's pool (the serving engine's
    /// budget). `None`: enough for every slot at full length. Backends with slot-contiguous caches
    /// (CPU, wgpu) ignore it.
    pub num_blocks: Option<usize>,
}

impl CacheConfig {
    pub fn new(slots: usize, max_seq_len: usize) -> CacheConfig {
        CacheConfig {
            slots,
            max_seq_len,
            kv_dtype: KvCacheDtype::Auto,
            num_blocks: None,
        }
    }
    pub fn with_kv_dtype(self, kv_dtype: KvCacheDtype) -> CacheConfig {
        CacheConfig { kv_dtype, ..self }
    }
    pub fn with_num_blocks(self, num_blocks: Option<usize>) -> CacheConfig {
        CacheConfig { num_blocks, ..self }
    }
}

/// Device memory as a backend accounts for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes the backend holds now (weights, caches, activations, workspaces).
    pub in_use: u64,
    /// Most bytes it held at once since it was opened.
    pub peak: u64,
    /// The device's total memory.
    pub total: u64,
}

pub trait Backend {
    fn name(&self) -> String;
    fn supports(&self, op: &Op) -> bool;
    /// One line on the device (name, architecture, notable kernel choices), for reports.
    fn describe(&self) -> String {
        self.name()
    }
    /// Device memory accounting, where the backend has a device of its own (`None` on the CPU).
    fn memory(&self) -> Option<DeviceMemory> {
        None
    }
    /// Bytes one key or value element of the KV cache takes for `dtype`. The default is f32 storage
    /// whatever the dtype (values rounded on the way in), as the CPU and wgpu backends keep it.
    fn kv_bytes_per_element(&self, dtype: KvCacheDtype) -> usize {
        let _ = dtype;
        4
    }
    /// Device-to-device copy bandwidth in bytes per second (bytes read plus bytes written), measured now
    /// over `bytes` bytes, the bandwidth floor of a memory-bound kernel. `None` where it does not apply.
    fn copy_bandwidth(&self, bytes: usize) -> Option<f64> {
        let _ = bytes;
        None
    }
    /// Upload weights, allocate caches and prepare to execute `graph`.
    fn load(
        &self,
        graph: &Graph,
        weights: &WeightMap,
        cache: CacheConfig,
    ) -> Result<Box<dyn Runner>>;
}

pub trait Runner: Send {
    /// Execute one step; `taps` names nodes whose values are returned too.
    fn step(&mut self, batch: &Batch, taps: &[String]) -> Result<StepOutput>;
    /// The `k` largest (id, value) pairs of each logits row (rows as in `Batch::logit_rows`), largest first,
    /// ties by lower id, NaN never picked. A GPU backend selects them on the device so the full logits are
    /// not copied back; this default computes them from [`Runner::step`].
    fn step_top_k(&mut self, batch: &Batch, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let out = self.step(batch, &[])?;
        Ok((0..out.logits.rows)
            .map(|r| crate::generate::top_k(out.logits.row(r), k))
            .collect())
    }
    /// Surround the runner's device buffers (activations and scratch) with guard regions filled with
    /// [`GUARD_WORD`] from now on, for the conformance suite, so that a write past a buffer's data is
    /// caught by [`Runner::check_guards`]. Returns false where the runner has no guards (the CPU reference,
    /// whose slices are bounds-checked).
    fn enable_guards(&mut self) -> bool {
        false
    }
    /// Check that every guard region still holds its sentinel; the error names the buffer and the byte
    /// offset of the first overwritten word.
    fn check_guards(&mut self) -> Result<()> {
        Ok(())
    }
    /// Whether [`Runner::step_with_inputs`] runs (false: it reports itself unsupported).
    fn supports_step_inputs(&self) -> bool {
        false
    }
    /// [`Runner::step`] with given embeddings for some rows and bidirectional groups (images). Backends
    /// that cannot run it report it unsupported.
    fn step_with_inputs(
        &mut self,
        batch: &Batch,
        inputs: &StepInputs,
        taps: &[String],
    ) -> Result<StepOutput> {
        let _ = (batch, inputs, taps);
        Err(Error::Unsupported {
            backend: "this backend".into(),
            op: "step inputs (image embeddings, bidirectional groups)".into(),
            node: "embed".into(),
        })
    }
    /// Forget a slot's cached tokens.
    fn release(&mut self, slot: usize) -> Result<()>;
    /// Tokens currently cached in a slot.
    fn seq_len(&self, slot: usize) -> usize;
}

/// The sentinel of guard regions (a quiet NaN, so a guard word read as data shows up as NaN too).
pub const GUARD_WORD: u32 = 0x7fc0_dead;

/// `bytes` bytes of guard words (`bytes` a multiple of 4).
pub fn guard_fill(bytes: usize) -> Vec<u8> {
    GUARD_WORD.to_le_bytes().repeat(bytes / 4)
}

/// Byte offset (within `guard`) and value of the first word of a guard region that is not
/// [`GUARD_WORD`]; None when the region is intact.
pub fn guard_damage(guard: &[u8]) -> Option<(usize, u32)> {
    guard
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .enumerate()
        .find(|(_, w)| *w != GUARD_WORD)
        .map(|(i, w)| (i * 4, w))
}

/// The first op of `graph` that `backend` does not support, as an error.
pub fn check_supported(backend: &dyn Backend, graph: &Graph) -> Result<()> {
    for n in &graph.nodes {
        if !backend.supports(&n.op) {
            return Err(Error::Unsupported {
                backend: backend.name(),
                op: n.op.kind().to_string(),
                node: n.name.clone(),
            });
        }
    }
    Ok(())
}

/// Validate a batch against the slots' state before running it. `len(slot)` is the cached length.
pub fn validate_batch(
    batch: &Batch,
    cache: &CacheConfig,
    vocab: usize,
    len: impl Fn(usize) -> usize,
) -> Result<()> {
    let mut seen = Vec::new();
    for s in &batch.seqs {
        if s.slot >= cache.slots {
            return Err(Error::invalid(format!(
                "slot {} does not exist (the cache has {} slots)",
                s.slot, cache.slots
            )));
        }
        if seen.contains(&s.slot) {
            return Err(Error::invalid(format!(
                "slot {} appears twice in one step",
                s.slot
            )));
        }
        seen.push(s.slot);
        let cur = len(s.slot);
        if s.start_pos != cur && s.start_pos != 0 {
            return Err(Error::invalid(format!(
                "slot {} holds {cur} tokens; a step must start at {cur} or at 0, not {}",
                s.slot, s.start_pos
            )));
        }
        let end = s.start_pos + s.tokens.len();
        if end > cache.max_seq_len {
            return Err(Error::invalid(format!(
                "sequence of {end} tokens is longer than the maximum length {} of the cache",
                cache.max_seq_len
            )));
        }
        if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_groups_end_at_their_last_row_and_given_rows_run() {
        // Sequence 0: rows 0..5 at positions 3.., rows 1-2 one image, row 4 alone in another; sequence 1:
        // rows 5..8 from position 0, rows 5-7 one image.
        let seq = |slot, start_pos, n| SeqStep {
            slot,
            start_pos,
            tokens: vec![0; n],
            logits: LogitsFor::None,
        };
        let batch = Batch {
            seqs: vec![seq(0, 3, 5), seq(1, 0, 3)],
        };
        let g = [
            None,
            Some(0),
            Some(0),
            None,
            Some(1),
            Some(2),
            Some(2),
            Some(2),
        ];
        let spans = |m| attention_spans(&batch, &g, m);
        let firsts = |m| spans(m).iter().map(|s| s[0]).collect::<Vec<u32>>();
        let lasts = |m| spans(m).iter().map(|s| s[1]).collect::<Vec<u32>>();
        assert_eq!(lasts(ImageGroups::Off), vec![3, 4, 5, 6, 7, 0, 1, 2]);
        assert_eq!(firsts(ImageGroups::Off), vec![3, 4, 5, 6, 7, 0, 1, 2]);
        assert_eq!(lasts(ImageGroups::Windowed), vec![3, 5, 5, 6, 7, 2, 2, 2]);
        let no_groups = attention_spans(&batch, &[], ImageGroups::WholeGroup);
        let own: Vec<[u32; 2]> = [3, 4, 5, 6, 7, 0, 1, 2].iter().map(|&p| [p, p]).collect();
        assert_eq!(no_groups, own);
        assert_eq!(firsts(ImageGroups::Windowed), vec![3, 4, 5, 6, 7, 0, 1, 2]);
        assert_eq!(lasts(ImageGroups::WholeGroup), vec![3, 5, 5, 6, 7, 2, 2, 2]);
        assert_eq!(
            firsts(ImageGroups::WholeGroup),
            vec![3, 4, 4, 6, 7, 0, 0, 0]
        );
        let inputs = StepInputs {
            embed_rows: vec![1, 2, 4, 5, 6, 7],
            embeds: Mat::zeros(6, 1),
            groups: g.to_vec(),
        };
        assert_eq!(inputs.given_runs(), vec![(1, 0, 2), (4, 2, 4)]);
    }

    #[test]
    fn guard_damage_finds_the_first_overwritten_word() {
        let mut g = guard_fill(64);
        assert_eq!(g.len(), 64);
        assert_eq!(guard_damage(&g), None);
        g[41] = 0; // inside word 10
        g[60..64].copy_from_slice(&1.5f32.to_le_bytes());
        assert_eq!(guard_damage(&g), Some((40, GUARD_WORD & 0xffff00ff)));
        assert_eq!(guard_damage(&g[44..]), Some((16, 1.5f32.to_bits())));
        assert!(f32::from_bits(GUARD_WORD).is_nan());
    }
}
