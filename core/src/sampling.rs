//! (temporary stub until the sampling module lands; replaced by the real one)
use crate::error::Result;
#[derive(Clone, Debug)]
pub struct SamplingParams { pub temperature: f32, pub top_k: usize, pub top_p: f32, pub min_p: f32, pub seed: Option<u64> }
impl SamplingParams { pub fn greedy() -> Self { SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: None } } pub fn validate(&self) -> Result<()> { Ok(()) } }
pub struct Sampler { _p: SamplingParams }
impl Sampler { pub fn new(p: SamplingParams) -> Result<Self> { Ok(Sampler { _p: p }) } pub fn sample(&mut self, logits: &[f32]) -> u32 { argmax(logits) } }
pub fn argmax(l: &[f32]) -> u32 { let mut b = 0; for (i, &v) in l.iter().enumerate() { if v > l[b] { b = i; } } b as u32 }
