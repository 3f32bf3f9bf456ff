//! The serving engine: continuous batching over one [`Runner`], usable from Rust without HTTP.
//!
//! Requests are submitted as token ids and come back as a stream of [`Event`]s. A loop thread runs one step
//! at a time: waiting requests join as slots free up, every running sequence contributes either its next
//! prompt chunk (chunked prefill, at most `prefill_chunk` prompt tokens a step in total) or its last token,
//! and finished or cancelled sequences leave at once. KV memory is accounted in blocks of [`KV_BLOCK`]
//! positions by core's paged-cache allocator ([`PageTable`], the one the CUDA backend maps its cache
//! with): each slot's block table gets a physical block as its sequence reaches it, and gives them all
//! back when the sequence leaves. When a step needs more blocks than are free, the newest running
//! sequence is preempted (its slot released) and later recomputed from its prompt plus what it already
//! generated.
//!
//! A request may carry image inputs for its prompt ([`EngineRequest::inputs`]): the embeddings of its
//! image-token rows and their bidirectional groups. Chunked prefill never splits a group across two
//! steps (the image mask needs the whole image in one step): a chunk that would end inside an image ends
//! before it, or, when it starts at the image, takes the whole image even past `prefill_chunk`. A
//! preempted request is recomputed with the same inputs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::backend::{Batch, LogitsFor, Runner, SeqStep, StepInputs};
use crate::error::{Error, Result};
use crate::generate::top_k;
pub use crate::kv_pages::KV_BLOCK;
use crate::kv_pages::{blocks_for, PageTable};
use crate::sampling::{Sampler, SamplingParams};
use crate::tensor::Mat;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences running at once (the runner must have this many KV-cache slots).
    pub max_num_seqs: usize,
    /// Longest prompt + completion (the runner's maximum sequence length).
    pub max_model_len: usize,
    /// Prompt tokens processed per step, over all sequences (chunked prefill).
    pub prefill_chunk: usize,
    /// KV blocks available; `None`: enough for every slot at full length.
    pub kv_blocks: Option<usize>,
    /// Token ids must be below this.
    pub vocab_size: usize,
}

impl EngineConfig {
    pub fn new(max_num_seqs: usize, max_model_len: usize, vocab_size: usize) -> EngineConfig {
        EngineConfig {
            max_num_seqs,
            max_model_len,
            prefill_chunk: 512,
            kv_blocks: None,
            vocab_size,
        }
    }

    pub fn total_blocks(&self) -> usize {
        self.kv_blocks
            .unwrap_or(self.max_num_seqs * blocks_for(self.max_model_len))
    }
}

#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt_ids: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after any of these tokens (it is included in the output).
    pub stop_ids: Vec<u32>,
    /// Log-probabilities: `Some(n)` returns the chosen token's and the `n` most likely ones'.
    pub logprobs: Option<usize>,
    /// Image inputs of the prompt, as [`crate::multimodal::ImageEncoder::prompt`] makes them: `embed_rows`
    /// are positions in `prompt_ids` (increasing), `groups` has one entry per prompt token (or none). The
    /// runner must support [`Runner::step_with_inputs`].
    pub inputs: Option<StepInputs>,
}

/// Contiguous runs `[start, end)` of equal bidirectional groups.
fn group_runs(groups: &[Option<u32>]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        if g.is_none() {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.1 == i && groups[i - 1] == *g => r.1 = i + 1,
            _ => runs.push((i, i + 1)),
        }
    }
    runs
}

/// The end of a chunk `start..end` moved so that it splits no group run: to the start of a run it would
/// cut, or past the whole run when the chunk starts at it.
fn chunk_end(runs: &[(usize, usize)], start: usize, end: usize) -> usize {
    match runs.iter().find(|&&(a, b)| a < end && end < b) {
        Some(&(a, _)) if a > start => a,
        Some(&(_, b)) => b,
        None => end,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token, or [`RequestHandle::stop`].
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The handle was cancelled or dropped.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        id: u32,
        /// log-softmax of the chosen token (when logprobs were asked for).
        logprob: Option<f32>,
        /// The most likely tokens with their log-probabilities.
        top_logprobs: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed; no more events follow.
    Error(String),
}

/// A submitted request: its events, and a way to end it early. Dropping the handle cancels the request.
pub struct RequestHandle {
    pub id: u64,
    pub events: Receiver<Event>,
    end: Arc<AtomicU8>,
}

/// `RequestHandle::end` states: still wanted, cancelled, stopped by the caller (e.g. a stop string).
const RUNNING: u8 = 0;
const CANCELLED: u8 = 1;
const STOPPED: u8 = 2;

impl RequestHandle {
    /// Abandon the request: it finishes as [`FinishReason::Cancelled`].
    pub fn cancel(&self) {
        let _ = self
            .end
            .compare_exchange(RUNNING, CANCELLED, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// End the request because the caller found what stops it (a stop string in the decoded text): it
    /// finishes as [`FinishReason::Stop`] and frees its slot at once.
    pub fn stop(&self) {
        let _ = self
            .end
            .compare_exchange(RUNNING, STOPPED, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Wait for every event; the generated ids and how it finished.
    pub fn collect(self) -> Result<(Vec<u32>, FinishReason)> {
        let mut ids = Vec::new();
        for ev in self.events.iter() {
            match ev {
                Event::Token { id, .. } => ids.push(id),
                Event::Finished { reason, .. } => return Ok((ids, reason)),
                Event::Error(e) => return Err(Error::invalid(e)),
            }
        }
        Err(Error::invalid(
            "the engine stopped before the request finished",
        ))
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Counts and latency histograms, as `GET /metrics` reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_free: usize,
    /// Blocks in the pool (used + free).
    pub kv_blocks_total: usize,
    pub finished_stop: u64,
    pub finished_length: u64,
    pub finished_cancelled: u64,
    pub failed: u64,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Cumulative counts per upper bound in seconds ([`LATENCY_BUCKETS`]), then the count and sum.
    pub ttft: Histogram,
    pub itl: Histogram,
    /// Tokens generated per second over the last [`THROUGHPUT_WINDOW_SECS`] seconds.
    pub recent: Throughput,
}

/// Seconds over which [`Throughput`] averages.
pub const THROUGHPUT_WINDOW_SECS: f64 = 10.0;

/// Tokens generated by recent steps, for a tokens-per-second gauge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Throughput {
    steps: VecDeque<(Instant, u64)>,
}

impl Throughput {
    fn record(&mut self, now: Instant, tokens: u64) {
        self.steps.push_back((now, tokens));
        while self
            .steps
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t).as_secs_f64() > THROUGHPUT_WINDOW_SECS)
        {
            self.steps.pop_front();
        }
    }

    /// Tokens per second over the window ending at `now`: the tokens of the steps within it divided by
    /// the window's length (0 when nothing was generated in it).
    pub fn per_second(&self, now: Instant) -> f64 {
        let tokens: u64 = self
            .steps
            .iter()
            .filter(|(t, _)| now.duration_since(*t).as_secs_f64() <= THROUGHPUT_WINDOW_SECS)
            .map(|(_, n)| n)
            .sum();
        tokens as f64 / THROUGHPUT_WINDOW_SECS
    }
}

/// Upper bounds (seconds) of the latency histograms.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: [u64; 12],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (b, &le) in self.buckets.iter_mut().zip(LATENCY_BUCKETS.iter()) {
            if secs <= le {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

struct Pending {
    req: EngineRequest,
    /// The prompt, plus what was generated before a preemption.
    tokens: Vec<u32>,
    sampler: Sampler,
    tx: Sender<Event>,
    end: Arc<AtomicU8>,
    submitted: Instant,
    /// The image groups of the prompt ([`group_runs`] of its inputs).
    runs: Vec<(usize, usize)>,
}

/// A request with a KV-cache slot.
struct Seq {
    p: Pending,
    slot: usize,
    /// Prompt and generated tokens: what the cache must hold.
    tokens: Vec<u32>,
    /// Tokens already in the cache.
    computed: usize,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.p.req.prompt_ids.len()
    }
}

enum Command {
    Submit(Box<Pending>),
    Shutdown,
}

/// The engine: a loop thread that owns the runner.
pub struct Engine {
    tx: Sender<Command>,
    metrics: Arc<Mutex<MetricsSnapshot>>,
    next_id: AtomicU64,
    config: EngineConfig,
    /// The runner takes image inputs.
    step_inputs: bool,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Start the loop thread. `runner` must have `max_num_seqs` slots of `max_model_len` positions.
    pub fn start(runner: Box<dyn Runner>, config: EngineConfig) -> Result<Engine> {
        if config.max_num_seqs == 0 || config.max_model_len == 0 || config.prefill_chunk == 0 {
            return Err(Error::invalid(
                "max_num_seqs, max_model_len and prefill_chunk must be at least 1",
            ));
        }
        let step_inputs = runner.supports_step_inputs();
        let (tx, rx) = mpsc::channel();
        let metrics = Arc::new(Mutex::new(MetricsSnapshot {
            kv_blocks_free: config.total_blocks(),
            kv_blocks_total: config.total_blocks(),
            ..Default::default()
        }));
        let mut core = Core {
            runner,
            config: config.clone(),
            rx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            free_slots: (0..config.max_num_seqs).rev().collect(),
            blocks: PageTable::new(
                config.max_num_seqs,
                config.max_model_len,
                config.total_blocks(),
            ),
            metrics: metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("e4m3-engine".into())
            .spawn(move || core.run())
            .map_err(|e| Error::invalid(format!("could not start the engine thread: {e}")))?;
        Ok(Engine {
            tx,
            metrics,
            next_id: AtomicU64::new(1),
            config,
            step_inputs,
            thread: Some(thread),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Whether requests may carry image inputs (the runner supports [`Runner::step_with_inputs`]).
    pub fn supports_inputs(&self) -> bool {
        self.step_inputs
    }

    /// Check and queue a request. Errors name the offending numbers; nothing is queued then.
    pub fn submit(&self, req: EngineRequest) -> Result<RequestHandle> {
        let c = &self.config;
        if req.prompt_ids.is_empty() {
            return Err(Error::invalid("the prompt is empty"));
        }
        if req.max_tokens == 0 {
            return Err(Error::invalid("max_tokens must be at least 1"));
        }
        if req.prompt_ids.len() + req.max_tokens > c.max_model_len {
            return Err(Error::invalid(format!(
                "the prompt has {} tokens and {} more were asked for ({} in all), over the maximum model length of {}",
                req.prompt_ids.len(),
                req.max_tokens,
                req.prompt_ids.len() + req.max_tokens,
                c.max_model_len
            )));
        }
        if let Some(&bad) = req.prompt_ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let need = blocks_for(req.prompt_ids.len() + req.max_tokens);
        if need > c.total_blocks() {
            return Err(Error::invalid(format!(
                "the request needs {need} KV blocks of {KV_BLOCK} positions; the cache has {}",
                c.total_blocks()
            )));
        }
        let runs = match &req.inputs {
            None => Vec::new(),
            Some(inp) => {
                if !self.step_inputs {
                    return Err(Error::invalid(
                        "the backend cannot take image inputs (its runner has no step inputs)",
                    ));
                }
                let n = req.prompt_ids.len();
                if inp.embeds.rows != inp.embed_rows.len() {
                    return Err(Error::invalid(format!(
                        "inputs: {} embeddings for {} embedding rows",
                        inp.embeds.rows,
                        inp.embed_rows.len()
                    )));
                }
                let increasing = inp.embed_rows.windows(2).all(|w| w[0] < w[1]);
                if !increasing || inp.embed_rows.last().is_some_and(|&r| r >= n) {
                    return Err(Error::invalid(format!(
                        "inputs: embedding rows must be increasing positions of the prompt of {n} tokens"
                    )));
                }
                if !inp.groups.is_empty() && inp.groups.len() != n {
                    return Err(Error::invalid(format!(
                        "inputs: {} attention groups for a prompt of {n} tokens",
                        inp.groups.len()
                    )));
                }
                group_runs(&inp.groups)
            }
        };
        let sampler = Sampler::new(req.sampling.clone())?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, events) = mpsc::channel();
        let end = Arc::new(AtomicU8::new(RUNNING));
        let pending = Pending {
            tokens: req.prompt_ids.clone(),
            req,
            sampler,
            tx,
            end: end.clone(),
            submitted: Instant::now(),
            runs,
        };
        self.tx
            .send(Command::Submit(Box::new(pending)))
            .map_err(|_| Error::invalid("the engine has stopped"))?;
        Ok(RequestHandle { id, events, end })
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Core {
    runner: Box<dyn Runner>,
    config: EngineConfig,
    rx: Receiver<Command>,
    waiting: VecDeque<Pending>,
    running: Vec<Seq>,
    free_slots: Vec<usize>,
    /// Block tables of the slots, `max_model_len` positions each (no ring: every position is kept).
    blocks: PageTable,
    metrics: Arc<Mutex<MetricsSnapshot>>,
}

/// log-softmax of one logit of a row.
fn log_softmax_at(row: &[f32], max: f32, log_sum: f32, id: u32) -> f32 {
    row.get(id as usize)
        .map_or(f32::NEG_INFINITY, |&x| x - max - log_sum)
}

impl Core {
    fn run(&mut self) {
        loop {
            // Take new requests; block only when there is nothing to do.
            let idle = self.running.is_empty() && self.waiting.is_empty();
            let first = if idle {
                match self.rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                None
            };
            for cmd in first
                .into_iter()
                .chain(std::iter::from_fn(|| self.rx.try_recv().ok()))
            {
                match cmd {
                    Command::Submit(p) => self.waiting.push_back(*p),
                    Command::Shutdown => {
                        self.fail_all("the engine is shutting down");
                        return;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish();
        }
    }

    fn fail_all(&mut self, why: &str) {
        for p in self.waiting.drain(..) {
            let _ = p.tx.send(Event::Error(why.to_string()));
        }
        for s in std::mem::take(&mut self.running) {
            let _ = s.p.tx.send(Event::Error(why.to_string()));
        }
    }

    fn finish(&mut self, idx: usize, reason: FinishReason) {
        let s = self.running.remove(idx);
        let _ = self.runner.release(s.slot);
        self.free_slots.push(s.slot);
        self.blocks.release(s.slot);
        if let Ok(mut m) = self.metrics.lock() {
            match reason {
                FinishReason::Stop => m.finished_stop += 1,
                FinishReason::Length => m.finished_length += 1,
                FinishReason::Cancelled => m.finished_cancelled += 1,
            }
        }
        // The metrics count it finished before its caller hears it.
        self.publish();
        let _ = s.p.tx.send(Event::Finished {
            reason,
            prompt_tokens: s.p.req.prompt_ids.len(),
            completion_tokens: s.generated(),
        });
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            let end = self.waiting[i].end.load(Ordering::Relaxed);
            if end != RUNNING {
                let p = self.waiting.remove(i).expect("index checked");
                let reason = if end == STOPPED {
                    FinishReason::Stop
                } else {
                    FinishReason::Cancelled
                };
                let _ = p.tx.send(Event::Finished {
                    reason,
                    prompt_tokens: p.req.prompt_ids.len(),
                    completion_tokens: p.tokens.len() - p.req.prompt_ids.len(),
                });
                if let Ok(mut m) = self.metrics.lock() {
                    match reason {
                        FinishReason::Stop => m.finished_stop += 1,
                        _ => m.finished_cancelled += 1,
                    }
                }
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            let end = self.running[i].p.end.load(Ordering::Relaxed);
            if end != RUNNING {
                let reason = if end == STOPPED {
                    FinishReason::Stop
                } else {
                    FinishReason::Cancelled
                };
                self.finish(i, reason);
            } else {
                i += 1;
            }
        }
    }

    /// Waiting requests take free slots, oldest first.
    fn admit(&mut self) {
        while !self.waiting.is_empty() {
            let Some(slot) = self.free_slots.pop() else {
                break;
            };
            let mut p = self.waiting.pop_front().expect("not empty");
            let tokens = std::mem::take(&mut p.tokens);
            self.running.push(Seq {
                p,
                slot,
                tokens,
                computed: 0,
                first_token: None,
                last_token: None,
            });
        }
    }

    /// Release the newest running sequence's slot and blocks; it waits (first in line) to be recomputed.
    fn preempt_newest(&mut self) -> bool {
        let Some(mut s) = self.running.pop() else {
            return false;
        };
        let _ = self.runner.release(s.slot);
        self.free_slots.push(s.slot);
        self.blocks.release(s.slot);
        s.p.tokens = s.tokens;
        self.waiting.push_front(s.p);
        if let Ok(mut m) = self.metrics.lock() {
            m.preemptions += 1;
        }
        true
    }

    fn step(&mut self) {
        // Plan: each sequence's next tokens, within the prefill budget and the KV blocks.
        let mut budget = self.config.prefill_chunk;
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (index in running, tokens this step)
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let left = s.tokens.len() - s.computed;
            let n = if left <= 1 { left } else { left.min(budget) };
            // Never split an image: its rows must all be in one step.
            let n = chunk_end(&s.p.runs, s.computed, s.computed + n) - s.computed;
            if n == 0 {
                i += 1;
                continue;
            }
            if self.blocks.map(s.slot, s.computed, s.computed + n).is_err() {
                // Out of blocks: preempt the newest sequence (maybe this one) and plan again.
                // Blocks taken so far stay with their sequences; planning starts over.
                plan.clear();
                if !self.preempt_newest() {
                    return;
                }
                budget = self.config.prefill_chunk;
                i = 0;
                continue;
            }
            if left > 1 {
                budget = budget.saturating_sub(n);
            }
            plan.push((i, n));
            i += 1;
        }
        if plan.is_empty() {
            return;
        }
        let batch = Batch {
            seqs: plan
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    SeqStep {
                        slot: s.slot,
                        start_pos: s.computed,
                        tokens: s.tokens[s.computed..s.computed + n].to_vec(),
                        logits: if s.computed + n == s.tokens.len() {
                            LogitsFor::Last
                        } else {
                            LogitsFor::None
                        },
                    }
                })
                .collect(),
        };
        let inputs = self.step_inputs(&plan);
        let prompt_tokens: usize = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                n.min(s.p.req.prompt_ids.len().saturating_sub(s.computed))
            })
            .sum();
        // Greedy sequences without log-probabilities need only the best id: the backend selects it.
        let top_only = plan.iter().all(|&(i, _)| {
            let p = &self.running[i].p;
            p.req.sampling.is_greedy() && p.req.logprobs.is_none()
        });
        let rows: Result<Vec<Vec<f32>>> = if let Some(inputs) = &inputs {
            self.runner.step_with_inputs(&batch, inputs, &[]).map(|o| {
                (0..o.logits.rows)
                    .map(|r| {
                        let row = o.logits.row(r);
                        if top_only {
                            vec![top_k(row, 1).first().map_or(0.0, |c| c.0 as f32)]
                        } else {
                            row.to_vec()
                        }
                    })
                    .collect()
            })
        } else if top_only {
            self.runner.step_top_k(&batch, 1).map(|tops| {
                tops.into_iter()
                    .map(|t| vec![t.first().map_or(0.0, |c| c.0 as f32)])
                    .collect()
            })
        } else {
            self.runner.step(&batch, &[]).map(|o| {
                (0..o.logits.rows)
                    .map(|r| o.logits.row(r).to_vec())
                    .collect()
            })
        };
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                // The step failed: its sequences fail, the engine goes on.
                let msg = format!("the backend failed: {e}");
                let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let s = self.running.remove(i);
                    let _ = self.runner.release(s.slot);
                    self.free_slots.push(s.slot);
                    self.blocks.release(s.slot);
                    let _ = s.p.tx.send(Event::Error(msg.clone()));
                    if let Ok(mut m) = self.metrics.lock() {
                        m.failed += 1;
                    }
                }
                return;
            }
        };
        let now = Instant::now();
        let mut next_row = 0;
        let mut finished: Vec<(usize, FinishReason)> = Vec::new();
        let mut generated = 0u64;
        for &(i, n) in &plan {
            let s = &mut self.running[i];
            s.computed += n;
            if s.computed < s.tokens.len() {
                continue;
            }
            let row = &rows[next_row];
            next_row += 1;
            let (id, logprob, tops) = if top_only {
                (row[0] as u32, None, Vec::new())
            } else {
                let id = s.p.sampler.sample(row);
                match s.p.req.logprobs {
                    Some(nlp) => {
                        let max = row
                            .iter()
                            .cloned()
                            .filter(|x| !x.is_nan())
                            .fold(f32::NEG_INFINITY, f32::max);
                        let log_sum = row
                            .iter()
                            .filter(|x| !x.is_nan())
                            .map(|&x| ((x - max) as f64).exp())
                            .sum::<f64>()
                            .ln() as f32;
                        let tops = top_k(row, nlp)
                            .into_iter()
                            .map(|(t, x)| (t, x - max - log_sum))
                            .collect();
                        (id, Some(log_softmax_at(row, max, log_sum, id)), tops)
                    }
                    None => (id, None, Vec::new()),
                }
            };
            s.tokens.push(id);
            generated += 1;
            match s.last_token {
                None => {
                    if s.first_token.is_none() {
                        s.first_token = Some(now);
                        if let Ok(mut m) = self.metrics.lock() {
                            m.ttft
                                .observe(now.duration_since(s.p.submitted).as_secs_f64());
                        }
                    }
                }
                Some(t) => {
                    if let Ok(mut m) = self.metrics.lock() {
                        m.itl.observe(now.duration_since(t).as_secs_f64());
                    }
                }
            }
            s.last_token = Some(now);
            let sent =
                s.p.tx
                    .send(Event::Token {
                        id,
                        logprob,
                        top_logprobs: tops,
                    })
                    .is_ok();
            if !sent {
                finished.push((i, FinishReason::Cancelled));
            } else if s.p.req.stop_ids.contains(&id) {
                finished.push((i, FinishReason::Stop));
            } else if s.generated() >= s.p.req.max_tokens
                || s.tokens.len() >= self.config.max_model_len
            {
                finished.push((i, FinishReason::Length));
            }
        }
        if let Ok(mut m) = self.metrics.lock() {
            m.prompt_tokens += prompt_tokens as u64;
            m.generated_tokens += generated;
            m.recent.record(now, generated);
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            self.finish(i, reason);
        }
    }

    /// The image inputs of a planned step (flat rows as in `Batch::flat_tokens`), None when no row of
    /// it has any.
    fn step_inputs(&self, plan: &[(usize, usize)]) -> Option<StepInputs> {
        let mut embed_rows = Vec::new();
        let mut embeds: Option<Mat> = None;
        let mut groups = Vec::new();
        let mut base = 0;
        for &(i, n) in plan {
            let s = &self.running[i];
            let (lo, hi) = (s.computed, s.computed + n);
            match &s.p.req.inputs {
                Some(inp) => {
                    for (k, &r) in inp.embed_rows.iter().enumerate() {
                        if (lo..hi).contains(&r) {
                            embed_rows.push(base + r - lo);
                            let e = embeds.get_or_insert_with(|| Mat::zeros(0, inp.embeds.cols));
                            e.data.extend_from_slice(inp.embeds.row(k));
                            e.rows += 1;
                        }
                    }
                    groups.extend((lo..hi).map(|r| inp.groups.get(r).copied().flatten()));
                }
                None => groups.extend(std::iter::repeat_n(None, n)),
            }
            base += n;
        }
        let any_group = groups.iter().any(Option::is_some);
        if embed_rows.is_empty() && !any_group {
            return None;
        }
        Some(StepInputs {
            embed_rows,
            embeds: embeds.unwrap_or_else(|| Mat::zeros(0, 0)),
            groups: if any_group { groups } else { Vec::new() },
        })
    }

    fn publish(&self) {
        if let Ok(mut m) = self.metrics.lock() {
            m.running = self.running.len();
            m.waiting = self.waiting.len();
            m.kv_blocks_used = self.blocks.used_pages();
            m.kv_blocks_free = self.blocks.free_pages();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn chunks_never_split_an_image() {
        let groups = [
            None,
            Some(0),
            Some(0),
            Some(0),
            None,
            Some(1),
            Some(2),
            Some(2),
        ];
        let runs = group_runs(&groups);
        assert_eq!(runs, vec![(1, 4), (5, 6), (6, 8)]);
        // Ends inside an image go back to its start, or past its end when the chunk starts at it.
        assert_eq!(chunk_end(&runs, 0, 2), 1);
        assert_eq!(chunk_end(&runs, 1, 2), 4);
        assert_eq!(chunk_end(&runs, 0, 4), 4);
        assert_eq!(chunk_end(&runs, 4, 7), 6);
        assert_eq!(chunk_end(&runs, 6, 7), 8);
        assert_eq!(chunk_end(&runs, 0, 1), 1);
        assert_eq!(chunk_end(&[], 3, 5), 5);
    }

    #[test]
    fn throughput_averages_the_window() {
        let t0 = Instant::now();
        let mut t = Throughput::default();
        t.record(t0, 30);
        t.record(t0 + Duration::from_secs(4), 20);
        // Both steps in the window: 50 tokens over 10 s.
        assert_eq!(t.per_second(t0 + Duration::from_secs(5)), 5.0);
        // The first has left the window.
        assert_eq!(t.per_second(t0 + Duration::from_secs(12)), 2.0);
        // A step 20 s later drops both from the queue.
        t.record(t0 + Duration::from_secs(20), 10);
        assert_eq!(t.steps.len(), 1);
        assert_eq!(t.per_second(t0 + Duration::from_secs(20)), 1.0);
    }
}
