//! Next-token selection with the semantics of `transformers`' `generate` sampling warpers, applied
//! in the same order (`GenerationMixin._get_logits_processor`, `generation/logits_process.py`):
//!
//! 1. temperature: `logits / temperature` (temperature 0 here means greedy, no sampling at all);
//! 2. top-k (`TopKLogitsWarper`): drop tokens whose score is `<` the k-th largest score (ties with
//!    the k-th are kept); `top_k == 0` disables it;
//! 3. top-p (`TopPLogitsWarper`, only when `top_p < 1`): sort ascending, cumulative softmax; drop
//!    tokens whose cumulative probability is `<= 1 - top_p`; the most likely token is always kept;
//! 4. min-p (`MinPLogitsWarper`, when `min_p > 0`): softmax over the survivors, drop tokens with
//!    probability `< min_p * max_probability`; the most likely token is always kept;
//! 5. softmax over the survivors and one categorical draw (ChaCha20 RNG seeded from `seed`).
//!
//! NaN logits are treated as `-inf` (never chosen). Ties in the sort order are broken by the lower
//! token id being ranked higher.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 => greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 => off.
    pub top_k: usize,
    /// Nucleus sampling mass in (0, 1]; 1 => off.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in [0, 1]; 0 => off.
    pub min_p: f32,
    /// RNG seed; `None` => a random seed.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Error (`Error::Invalid`, naming the parameter) unless temperature is finite and >= 0,
    /// top_p in (0, 1] and min_p in [0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(format!(
                "sampling parameter `temperature` must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "sampling parameter `top_p` must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(Error::invalid(format!(
                "sampling parameter `min_p` must be in [0, 1], got {}",
                self.min_p
            )));
        }
        Ok(())
    }
}

/// Index of the largest value; the first one on ties. NaN never wins. Returns 0 for an empty
/// slice or one with only NaN.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if x <= b => {}
            _ => best = Some((i, x)),
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// Largest top-k that [`Sampler::candidates_needed`] serves from a backend's top-k candidates.
pub const MAX_DEVICE_TOP_K: usize = 1024;

/// A stateful sampler: parameters plus the RNG stream.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: ChaCha20Rng,
    /// scratch: surviving (token, scaled logit)
    cand: Vec<(u32, f32)>,
    /// scratch: probabilities of `cand`
    probs: Vec<f64>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("seed", &self.seed)
            .finish()
    }
}

/// Descending by score, then ascending by token id.
fn desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Softmax of the scores of `cand` into `probs` (f64).
fn softmax_into(cand: &[(u32, f32)], probs: &mut Vec<f64>) {
    probs.clear();
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut sum = 0.0f64;
    for c in cand {
        let e = (c.1 as f64 - max).exp();
        probs.push(e);
        sum += e;
    }
    for p in probs.iter_mut() {
        *p /= sum;
    }
}

impl Sampler {
    /// Validates the parameters; seeds the RNG from `params.seed` or a random seed.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Ok(Sampler {
            params,
            seed,
            rng: ChaCha20Rng::seed_from_u64(seed),
            cand: Vec::new(),
            probs: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use (the drawn one when `params.seed` was `None`), to reproduce a run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// How many of a row's largest logits suffice to sample exactly as from the whole row: top-k
    /// sampling needs the k largest plus the ties of the k-th (8 spare candidates are fetched for them).
    /// `None` for greedy (the argmax suffices) and for sampling without top-k (the whole row is needed).
    pub fn candidates_needed(&self) -> Option<usize> {
        let p = &self.params;
        (!p.is_greedy() && p.top_k > 0 && p.top_k <= MAX_DEVICE_TOP_K).then_some(p.top_k + 8)
    }

    /// Sample from a row given only by its largest `(id, logit)` pairs (every other logit counts as
    /// `-inf`), exactly as [`Sampler::sample`] would from the whole row when `cands` holds at least
    /// [`Sampler::candidates_needed`] of them.
    pub fn sample_candidates(&mut self, cands: &[(u32, f32)]) -> u32 {
        let mut by_id: Vec<(u32, f32)> = cands.to_vec();
        by_id.sort_by_key(|c| c.0);
        let row: Vec<f32> = by_id.iter().map(|c| c.1).collect();
        let i = self.sample(&row) as usize;
        by_id.get(i).map_or(0, |c| c.0)
    }

    /// Pick the next token from one row of logits. Greedy parameters => [`argmax`]. Returns 0 for
    /// empty logits; all `-inf`/NaN logits fall back to [`argmax`].
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.is_greedy() || logits.is_empty() {
            return argmax(logits);
        }
        let temp = p.temperature;

        // 1. temperature (NaN -> dropped, -inf -> dropped). +inf logits: only they survive, equally likely.
        self.cand.clear();
        if logits.contains(&f32::INFINITY) {
            self.cand.extend(
                logits
                    .iter()
                    .enumerate()
                    .filter(|(_, &x)| x == f32::INFINITY)
                    .map(|(i, _)| (i as u32, 0.0)),
            );
        } else {
            self.cand.extend(
                logits
                    .iter()
                    .enumerate()
                    .filter(|(_, &x)| x > f32::NEG_INFINITY) // false for NaN
                    .map(|(i, &x)| (i as u32, x / temp))
                    .filter(|c| c.1 > f32::NEG_INFINITY),
            );
        }
        if self.cand.is_empty() {
            return argmax(logits);
        }

        // 2. top-k: keep scores >= the k-th largest, sorted, so the draw does not depend on the order the
        // selection left them in (and sampling from a backend's top-k candidates draws the same token).
        let mut need_sort = p.top_p < 1.0 || p.min_p > 0.0;
        if p.top_k > 0 && p.top_k < self.cand.len() {
            let k = p.top_k;
            let (_, kth, _) = self.cand.select_nth_unstable_by(k - 1, desc);
            let threshold = kth.1;
            self.cand.retain(|c| c.1 >= threshold);
            need_sort = true;
        }

        if need_sort {
            self.cand.sort_unstable_by(desc);
        }

        // 3. top-p: in descending order, the ascending cumulative probability of token j is the
        // sum of probabilities from j to the end. Drop j when it is <= 1 - top_p; keep the first.
        if p.top_p < 1.0 {
            softmax_into(&self.cand, &mut self.probs);
            let limit = 1.0 - p.top_p as f64;
            let mut suffix = 0.0f64;
            let mut keep = self.cand.len();
            for j in (0..self.cand.len()).rev() {
                suffix += self.probs[j];
                if suffix <= limit {
                    keep = j;
                } else {
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }

        // 4. min-p relative to the top probability; keep at least the first.
        if p.min_p > 0.0 {
            softmax_into(&self.cand, &mut self.probs);
            let threshold = p.min_p as f64 * self.probs[0];
            let keep = self.probs.iter().take_while(|&&q| q >= threshold).count();
            self.cand.truncate(keep.max(1));
        }

        // 5. draw.
        softmax_into(&self.cand, &mut self.probs);
        let u: f64 = self.rng.random();
        let mut acc = 0.0f64;
        for (c, &q) in self.cand.iter().zip(self.probs.iter()) {
            acc += q;
            if u < acc {
                return c.0;
            }
        }
        // rounding: u beyond the accumulated mass -> last token with non-zero probability
        self.cand
            .iter()
            .zip(self.probs.iter())
            .rev()
            .find(|(_, &q)| q > 0.0)
            .map_or(self.cand[0].0, |(c, _)| c.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: Some(seed),
        }
    }

    /// Logits whose softmax is exactly `probs` (up to rounding).
    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    fn frequencies(params: SamplingParams, logits: &[f32], n: usize) -> Vec<f64> {
        let mut s = Sampler::new(params).unwrap();
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "token {i}: frequency {g} vs expected {w} (all: {got:?} vs {want:?})"
            );
        }
    }

    #[test]
    fn sampling_from_top_candidates_equals_sampling_from_the_row() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        // Values on a coarse grid so ties at the k-th place happen.
        let row: Vec<f32> = (0..3000)
            .map(|_| (rng.random::<f32>() * 4000.0).round() / 400.0)
            .collect();
        for (top_k, top_p, min_p) in [
            (1, 1.0, 0.0),
            (5, 1.0, 0.0),
            (40, 0.9, 0.0),
            (64, 0.95, 0.05),
        ] {
            for seed in 0..50 {
                let p = params(0.8, top_k, top_p, min_p, seed);
                let mut full = Sampler::new(p.clone()).unwrap();
                let mut sparse = Sampler::new(p).unwrap();
                let n = sparse.candidates_needed().unwrap();
                let cands = crate::generate::top_k(&row, n);
                assert_eq!(
                    full.sample(&row),
                    sparse.sample_candidates(&cands),
                    "top_k {top_k} top_p {top_p} min_p {min_p} seed {seed}"
                );
            }
        }
        assert_eq!(
            Sampler::new(SamplingParams::greedy())
                .unwrap()
                .candidates_needed(),
            None
        );
        assert_eq!(
            Sampler::new(params(1.0, 0, 0.9, 0.0, 1))
                .unwrap()
                .candidates_needed(),
            None
        );
    }

    #[test]
    fn argmax_basics() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 2.0]), 1);
        assert_eq!(argmax(&[1.0, 5.0, 5.0, 2.0]), 1, "first index on ties");
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 0.5]), 1, "NaN never wins");
        assert_eq!(argmax(&[-1.0, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -3.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_equals_argmax() {
        let logits = [0.3, -2.0, 4.5, 4.49, f32::NAN, 1.0];
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        for _ in 0..10 {
            assert_eq!(s.sample(&logits), 2);
        }
        assert_eq!(s.sample(&logits), argmax(&logits));
    }

    #[test]
    fn top_k_one_is_greedy_for_any_temperature() {
        let logits = [0.3, -2.0, 4.5, 4.49, 1.0, 4.4];
        for &t in &[0.1f32, 0.7, 1.0, 2.0, 100.0] {
            let mut s = Sampler::new(params(t, 1, 1.0, 0.0, 7)).unwrap();
            for _ in 0..200 {
                assert_eq!(s.sample(&logits), 2, "temperature {t}");
            }
        }
    }

    #[test]
    fn tiny_top_p_is_argmax() {
        let logits = [0.3, -2.0, 4.5, 4.49, 1.0, 4.4];
        let mut s = Sampler::new(params(1.5, 0, 1e-6, 0.0, 3)).unwrap();
        for _ in 0..500 {
            assert_eq!(s.sample(&logits), 2);
        }
    }

    #[test]
    fn top_p_boundary_rule() {
        // probs 0.5, 0.3, 0.2. Ascending cumulative: 0.2 (tok2), 0.5 (tok1), 1.0 (tok0).
        // top_p = 0.7 -> drop cumulative <= 0.3 -> only tok2 dropped; tok0/tok1 renormalised 5:3.
        let logits = logits_of(&[0.5, 0.3, 0.2]);
        let f = frequencies(params(1.0, 0, 0.7, 0.0, 11), &logits, 20_000);
        assert_eq!(f[2], 0.0);
        assert_close(&f, &[0.625, 0.375, 0.0], 0.02);
        // Exact boundary: four equal logits have probabilities exactly 0.25. top_p = 0.5 -> the
        // ascending cumulative 0.25 and 0.5 are <= 0.5 and dropped (ties: higher id ranks lower),
        // 0.75 and 1.0 kept.
        let f = frequencies(params(1.0, 0, 0.5, 0.0, 12), &[0.0; 4], 20_000);
        assert_eq!(f[2] + f[3], 0.0);
        assert_close(&f, &[0.5, 0.5, 0.0, 0.0], 0.02);
    }

    #[test]
    fn min_p_filter_is_exact() {
        // probs 0.21, 0.4, 0.195, 0.195 ; min_p 0.5 -> threshold 0.2: keeps 0.4 and 0.21, drops 0.195.
        let probs = [0.21, 0.4, 0.195, 0.195];
        let logits = logits_of(&probs);
        let f = frequencies(params(1.0, 0, 1.0, 0.5, 5), &logits, 20_000);
        assert_eq!(f[2] + f[3], 0.0, "0.195 < 0.5 * 0.4 must be dropped");
        let kept = 0.21 + 0.4;
        assert_close(&f, &[0.21 / kept, 0.4 / kept, 0.0, 0.0], 0.02);
        // min_p = 1 keeps only the top token ...
        let f = frequencies(params(1.0, 0, 1.0, 1.0, 6), &logits, 1_000);
        assert_eq!(f, vec![0.0, 1.0, 0.0, 0.0]);
        // ... and every token tied with it (probability == threshold is kept: the rule is `<`).
        let f = frequencies(params(1.0, 0, 1.0, 1.0, 6), &[0.0, 0.0, -1.0], 4_000);
        assert_eq!(f[2], 0.0);
        assert_close(&f, &[0.5, 0.5, 0.0], 0.03);
        // min_p is applied after temperature: at temperature 0.5, p ∝ q^2 -> 0.157, 0.571, 0.136,
        // 0.136; threshold 0.5 * 0.571 = 0.286 now drops token 0 as well.
        let f = frequencies(params(0.5, 0, 1.0, 0.5, 7), &logits, 1_000);
        assert_eq!(f, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn seeds_are_reproducible_and_distinct() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, seed)).unwrap();
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        // no seed: the drawn seed reproduces the run
        let mut a = Sampler::new(SamplingParams {
            seed: None,
            ..params(1.0, 0, 1.0, 0.0, 0)
        })
        .unwrap();
        let seq_a: Vec<u32> = (0..64).map(|_| a.sample(&logits)).collect();
        assert_eq!(seq_a, run(a.seed()));
    }

    #[test]
    fn empirical_frequencies_plain() {
        let probs = [0.1, 0.2, 0.3, 0.4];
        let f = frequencies(params(1.0, 0, 1.0, 0.0, 1), &logits_of(&probs), 20_000);
        assert_close(&f, &probs, 0.02);
    }

    #[test]
    fn empirical_frequencies_temperature() {
        // temperature 2: p_i ∝ sqrt(q_i)
        let q: [f64; 4] = [0.1, 0.2, 0.3, 0.4];
        let s: f64 = q.iter().map(|x| x.sqrt()).sum();
        let want: Vec<f64> = q.iter().map(|x| x.sqrt() / s).collect();
        let f = frequencies(params(2.0, 0, 1.0, 0.0, 2), &logits_of(&q), 20_000);
        assert_close(&f, &want, 0.02);
        // temperature 0.5: p_i ∝ q_i^2
        let s: f64 = q.iter().map(|x| x * x).sum();
        let want: Vec<f64> = q.iter().map(|x| x * x / s).collect();
        let f = frequencies(params(0.5, 0, 1.0, 0.0, 3), &logits_of(&q), 20_000);
        assert_close(&f, &want, 0.02);
    }

    #[test]
    fn empirical_frequencies_top_k_and_top_p() {
        let q = [0.1, 0.2, 0.3, 0.4];
        // top_k = 2 -> 0.3 : 0.4
        let f = frequencies(params(1.0, 2, 1.0, 0.0, 4), &logits_of(&q), 20_000);
        assert_close(&f, &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0], 0.02);
        assert_eq!(f[0] + f[1], 0.0);
        // top_p = 0.8: ascending cumulative 0.1, 0.3, 0.6, 1.0; drop <= 0.2 -> token 0 only
        let f = frequencies(params(1.0, 0, 0.8, 0.0, 5), &logits_of(&q), 20_000);
        assert_eq!(f[0], 0.0);
        assert_close(&f, &[0.0, 2.0 / 9.0, 3.0 / 9.0, 4.0 / 9.0], 0.02);
        // temperature 2 then top-k 3 then top-p 0.7:
        // after temperature p ∝ sqrt(q); top-k drops token 0; of the rest (renormalised)
        // ascending cumulative: a, a+b, 1 with a = sqrt(.2)/S' ... computed below.
        let sq: Vec<f64> = q.iter().map(|x: &f64| x.sqrt()).collect();
        let s3 = sq[1] + sq[2] + sq[3];
        let (a, b) = (sq[1] / s3, sq[2] / s3);
        assert!(
            a <= 0.3 && a + b > 0.3,
            "test setup: only token 1 falls under 1 - top_p"
        );
        let s2 = sq[2] + sq[3];
        let f = frequencies(params(2.0, 3, 0.7, 0.0, 6), &logits_of(&q), 20_000);
        assert_eq!(f[0] + f[1], 0.0);
        assert_close(&f, &[0.0, 0.0, sq[2] / s2, sq[3] / s2], 0.02);
    }

    #[test]
    fn top_k_keeps_ties() {
        // two tokens tie for 2nd place: top_k = 2 keeps all three (transformers keeps scores >= k-th)
        let logits = [3.0f32, 1.0, 1.0, -5.0];
        let f = frequencies(params(1.0, 2, 1.0, 0.0, 8), &logits, 5_000);
        assert!(f[1] > 0.0 && f[2] > 0.0, "{f:?}");
        assert_eq!(f[3], 0.0);
    }

    #[test]
    fn nan_and_neg_inf_never_sampled() {
        let logits = [f32::NAN, 0.0, f32::NEG_INFINITY, 0.0];
        let f = frequencies(params(1.0, 0, 1.0, 0.0, 9), &logits, 4_000);
        assert_eq!(f[0] + f[2], 0.0);
        assert_close(&f, &[0.0, 0.5, 0.0, 0.5], 0.03);
    }

    #[test]
    fn invalid_params_name_the_parameter() {
        let bad = [
            (params(-0.5, 0, 1.0, 0.0, 0), "temperature"),
            (params(f32::NAN, 0, 1.0, 0.0, 0), "temperature"),
            (params(f32::INFINITY, 0, 1.0, 0.0, 0), "temperature"),
            (params(1.0, 0, 0.0, 0.0, 0), "top_p"),
            (params(1.0, 0, 1.5, 0.0, 0), "top_p"),
            (params(1.0, 0, -0.1, 0.0, 0), "top_p"),
            (params(1.0, 0, f32::NAN, 0.0, 0), "top_p"),
            (params(1.0, 0, 1.0, -0.1, 0), "min_p"),
            (params(1.0, 0, 1.0, 1.01, 0), "min_p"),
            (params(1.0, 0, 1.0, f32::NAN, 0), "min_p"),
        ];
        for (p, name) in bad {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{name}`")), "{p:?}: {err}");
            assert!(Sampler::new(p).is_err());
        }
        assert!(params(0.0, 0, 1.0, 0.0, 0).validate().is_ok());
        assert!(params(1.0, 5, 1.0, 1.0, 0).validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
    }
}
