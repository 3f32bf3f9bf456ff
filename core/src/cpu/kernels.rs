//! Reference kernels, one per op. f32 arithmetic; reductions of norms in f64.

use rayon::prelude::*;

use crate::checkpoint::Weight;
use crate::tensor::{DType, Mat};

/// Gather embedding rows for `ids` and multiply by `scale`.
pub fn embed(table: &Weight, ids: &[u32], scale: f32) -> Mat {
    let cols = table.shape[1];
    let mut out = Mat::zeros(ids.len(), cols);
    let bytes = table.bytes();
    let esz = table.dtype.size();
    for (r, &id) in ids.iter().enumerate() {
        let row = &bytes[id as usize * cols * esz..(id as usize + 1) * cols * esz];
        decode_row(table.dtype, row, out.row_mut(r));
        for v in out.row_mut(r) {
            *v *= scale;
        }
    }
    out
}

/// Decode one row of a stored tensor into f32.
pub fn decode_row(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    crate::tensor::decode_into(dtype, bytes, out)
}

/// RMSNorm over groups of `group` values: `x / sqrt(mean(x^2) + eps) * (add_one ? 1 + w : w)`.
pub fn rms_norm(x: &Mat, weight: Option<&[f32]>, group: usize, eps: f32, add_one: bool) -> Mat {
    let mut out = x.clone();
    out.data.par_chunks_mut(group).for_each(|g| {
        let ss: f64 = g.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let inv = 1.0 / ((ss / group as f64) as f32 + eps).sqrt();
        match weight {
            Some(w) => {
                for (v, &wi) in g.iter_mut().zip(w) {
                    let wf = if add_one { 1.0 + wi } else { wi };
                    *v = (*v * inv) * wf;
                }
            }
            None => g.iter_mut().for_each(|v| *v *= inv),
        }
    });
    out
}

/// Lanes of every f32 dot product: lane j accumulates the elements j, j+LANES, ..., then the lanes are added
/// pairwise and the tail last. Every product in `linear` goes through `dot_lanes`, so a result never depends
/// on how many rows were computed together (batching does not change logits).
const LANES: usize = 16;

#[inline(always)]
fn reduce_lanes(mut acc: [f32; LANES], tail: f32) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0] + tail
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n - n % LANES;
    let mut acc = [0f32; LANES];
    for (x, y) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for j in 0..LANES {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = 0f32;
    for (x, y) in a[full..n].iter().zip(&b[full..n]) {
        tail += x * y;
    }
    reduce_lanes(acc, tail)
}

/// `out_t[r * t + ti] = dot(rows[r], x[ti])` for the decoded weight rows (each of length k).
#[inline(always)]
fn gemm_block(rows: &[f32], k: usize, x: &Mat, out_t: &mut [f32]) {
    let t = x.rows;
    for (r, row) in rows.chunks_exact(k).enumerate() {
        for ti in 0..t {
            out_t[r * t + ti] = dot_lanes(row, x.row(ti));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gemm_block_avx2(rows: &[f32], k: usize, x: &Mat, out_t: &mut [f32]) {
    gemm_block(rows, k, x, out_t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 dot product in 8 independent lanes (vectorized with AVX2 where the CPU has it; same result either way).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

/// `out_t[r * t + ti] = dot(rows[r], x[ti])`, dispatched to the AVX2 build where available.
pub fn gemm_rows(rows: &[f32], k: usize, x: &Mat, out_t: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { gemm_block_avx2(rows, k, x, out_t) };
    }
    gemm_block(rows, k, x, out_t)
}

/// Transpose `[n, t]` to a `[t, n]` matrix.
pub fn transpose_to_mat(out_t: Vec<f32>, n: usize, t: usize) -> Mat {
    if t == 1 {
        return Mat {
            rows: 1,
            cols: n,
            data: out_t,
        };
    }
    let mut out = Mat::zeros(t, n);
    for r in 0..n {
        for ti in 0..t {
            out.data[ti * n + r] = out_t[r * t + ti];
        }
    }
    out
}

/// `y = x W^T` with W `[n, k]` stored as F32/BF16/F16; each weight row is decoded once per call.
pub fn linear(x: &Mat, w: &Weight) -> Mat {
    let (n, k) = (w.shape[0], w.shape[1]);
    assert_eq!(
        x.cols, k,
        "linear `{}`: input has {} columns, weight {:?}",
        w.name, x.cols, w.shape
    );
    let t = x.rows;
    if t == 0 {
        return Mat::zeros(0, n);
    }
    let esz = w.dtype.size();
    let bytes = w.bytes();
    const CHUNK: usize = 16;
    // Output transposed ([n, t]) so each task owns whole rows, then transposed back.
    let mut out_t = vec![0f32; n * t];
    out_t
        .par_chunks_mut(CHUNK * t)
        .enumerate()
        .for_each(|(c, chunk)| {
            let nr = chunk.len() / t;
            let r0 = c * CHUNK;
            let mut rows = vec![0f32; nr * k];
            decode_row(
                w.dtype,
                &bytes[r0 * k * esz..(r0 + nr) * k * esz],
                &mut rows,
            );
            gemm_rows(&rows, k, x, chunk);
        });
    transpose_to_mat(out_t, n, t)
}

/// Rotate-half RoPE on every head of every row, at `positions[row]`.
pub fn rope(x: &Mat, positions: &[usize], head_dim: usize, inv_freq: &[f32]) -> Mat {
    let half = head_dim / 2;
    let mut out = x.clone();
    out.data
        .par_chunks_mut(x.cols)
        .zip(positions.par_iter())
        .for_each(|(row, &p)| {
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = p as f32 * f;
                    (a.cos(), a.sin())
                })
                .unzip();
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        });
    out
}

/// One layer's KV cache for one sequence: a ring of `cap` positions (position p lives in row p % cap).
pub struct KvLayer {
    pub cap: usize,
    pub width: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvLayer {
    pub fn new(cap: usize, width: usize) -> KvLayer {
        KvLayer {
            cap,
            width,
            k: Vec::new(),
            v: Vec::new(),
        }
    }
    fn row(&self, p: usize) -> std::ops::Range<usize> {
        let r = p % self.cap;
        r * self.width..(r + 1) * self.width
    }
    fn write(&mut self, p: usize, k: &[f32], v: &[f32]) {
        let range = self.row(p);
        if self.k.len() < range.end {
            self.k.resize(range.end, 0.0);
            self.v.resize(range.end, 0.0);
        }
        self.k[range.clone()].copy_from_slice(k);
        self.v[range].copy_from_slice(v);
    }
}

pub struct AttnGeom {
    /// Write this step's k/v into the cache (false: the cache belongs to another node, KV sharing).
    pub append: bool,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
    pub softcap: Option<f32>,
    /// With groups: a row sees its whole group even past the window (`ImageGroups::WholeGroup`).
    pub whole_group: bool,
}

/// Attention for one sequence whose `n` new rows start at step row `row0` and position `start`.
/// Earlier positions come from `cache`; this step's k/v are then written into it.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    g: &AttnGeom,
    q: &Mat,
    k: &Mat,
    v: &Mat,
    row0: usize,
    n: usize,
    start: usize,
    cache: &mut KvLayer,
    out: &mut Mat,
) {
    attention_grouped(g, q, k, v, row0, n, start, cache, out, &[])
}

/// [`attention`] where `groups[i]` (one per new row, or empty) is the bidirectional group of row i: a row
/// of a group also sees the later rows of the same contiguous group in this step (Gemma 3's image mask:
/// causal OR same image, then the sliding window, which only bounds the past).
#[allow(clippy::too_many_arguments)]
pub fn attention_grouped(
    g: &AttnGeom,
    q: &Mat,
    k: &Mat,
    v: &Mat,
    row0: usize,
    n: usize,
    start: usize,
    cache: &mut KvLayer,
    out: &mut Mat,
    groups: &[Option<u32>],
) {
    // Last row (within the step) each row sees: itself, or the end of its group; and the first row of its
    // group.
    let last = crate::backend::group_ends(groups, n);
    let first = crate::backend::group_firsts(groups, n);
    let d = g.head_dim;
    let group = g.n_heads / g.n_kv_heads;
    let cache_ref = &*cache;
    let key = |j: usize, kvh: usize| -> &[f32] {
        if j >= start {
            &k.row(row0 + j - start)[kvh * d..(kvh + 1) * d]
        } else {
            &cache_ref.k[cache_ref.row(j)][kvh * d..(kvh + 1) * d]
        }
    };
    let value = |j: usize, kvh: usize| -> &[f32] {
        if j >= start {
            &v.row(row0 + j - start)[kvh * d..(kvh + 1) * d]
        } else {
            &cache_ref.v[cache_ref.row(j)][kvh * d..(kvh + 1) * d]
        }
    };
    let out_rows = &mut out.data[row0 * g.n_heads * d..(row0 + n) * g.n_heads * d];
    out_rows
        .par_chunks_mut(g.n_heads * d)
        .enumerate()
        .for_each(|(i, orow)| {
            let p = start + i;
            let mut lo = g.window.map_or(0, |w| (p + 1).saturating_sub(w));
            if g.whole_group {
                lo = lo.min(start + first[i]);
            }
            let hi = start + last[i];
            let mut scores = vec![0f32; hi + 1 - lo];
            for h in 0..g.n_heads {
                let kvh = h / group;
                let qh = &q.row(row0 + i)[h * d..(h + 1) * d];
                let mut max = f32::NEG_INFINITY;
                for (s, j) in scores.iter_mut().zip(lo..=hi) {
                    let mut x = dot(qh, key(j, kvh)) * g.scale;
                    if let Some(c) = g.softcap {
                        x = c * (x / c).tanh();
                    }
                    *s = x;
                    max = max.max(x);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut orow[h * d..(h + 1) * d];
                o.fill(0.0);
                for (s, j) in scores.iter().zip(lo..=hi) {
                    let pw = s / sum;
                    for (oi, vi) in o.iter_mut().zip(value(j, kvh)) {
                        *oi += pw * vi;
                    }
                }
            }
        });
    if !g.append {
        return;
    }
    for p in (start + n).saturating_sub(cache.cap).max(start)..start + n {
        let r = row0 + p - start;
        cache.write(p, k.row(r), v.row(r));
    }
}

/// Keys and values as an FP8 or BF16 KV cache stores them: FP8 keeps `encode(x / scale)` and reads back
/// `decode(code) * scale`.
pub fn round_kv(k: &Mat, v: &Mat, r: super::KvRounding) -> (Mat, Mat) {
    let apply = |m: &Mat, f: &dyn Fn(f32) -> f32| {
        let mut out = m.clone();
        out.data.iter_mut().for_each(|x| *x = f(*x));
        out
    };
    match r {
        super::KvRounding::Exact => (k.clone(), v.clone()),
        super::KvRounding::Bf16 => (
            apply(k, &crate::tensor::round_to_bf16),
            apply(v, &crate::tensor::round_to_bf16),
        ),
        super::KvRounding::Fp8 { k_scale, v_scale } => (
            apply(k, &|x| crate::fp8::round(x / k_scale) * k_scale),
            apply(v, &|x| crate::fp8::round(x / v_scale) * v_scale),
        ),
    }
}

/// `gelu_tanh(gate) * up`, GELU with the tanh approximation (PyTorch `gelu(approximate="tanh")`).
pub fn gelu_tanh_mul(gate: &Mat, up: &Mat) -> Mat {
    let mut out = gate.clone();
    out.data
        .par_iter_mut()
        .zip(up.data.par_iter())
        .for_each(|(g, &u)| {
            *g = gelu_tanh(*g) * u;
        });
    out
}

pub fn gelu_tanh(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (K * (x + 0.044715 * x * x * x)).tanh())
}

pub fn add(a: &Mat, b: &Mat) -> Mat {
    let mut out = a.clone();
    out.data.iter_mut().zip(&b.data).for_each(|(x, y)| *x += y);
    out
}

pub fn scale(a: &Mat, factor: f32) -> Mat {
    let mut out = a.clone();
    out.data.iter_mut().for_each(|x| *x *= factor);
    out
}

pub fn softcap(a: &Mat, cap: f32) -> Mat {
    let mut out = a.clone();
    out.data
        .iter_mut()
        .for_each(|x| *x = cap * (*x / cap).tanh());
    out
}

/// Columns `[start, start + cols)` of every row.
pub fn slice_cols(a: &Mat, start: usize, cols: usize) -> Mat {
    let mut out = Mat::zeros(a.rows, cols);
    for r in 0..a.rows {
        out.row_mut(r)
            .copy_from_slice(&a.row(r)[start..start + cols]);
    }
    out
}

/// MoE routing weights (see `Op::RouterTopK`): softmax over every expert in f32, the `top_k` largest
/// probabilities renormalised to sum 1, times `per_expert_scale`; 0 for the other experts.
pub fn router_topk(logits: &Mat, top_k: usize, per_expert_scale: &[f32]) -> Mat {
    let mut out = Mat::zeros(logits.rows, logits.cols);
    for r in 0..logits.rows {
        let l = logits.row(r);
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = l.iter().map(|x| (x - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        let p: Vec<f32> = e.iter().map(|x| x / sum).collect();
        let mut order: Vec<usize> = (0..p.len()).collect();
        // Stable sort: equal probabilities keep the lower expert first.
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let top = &order[..top_k.min(order.len())];
        let kept: f32 = top.iter().map(|&i| p[i]).sum();
        let o = out.row_mut(r);
        for &i in top {
            o[i] = p[i] / kept * per_expert_scale[i];
        }
    }
    out
}

pub fn select_rows(a: &Mat, rows: &[usize]) -> Mat {
    let mut out = Mat::zeros(rows.len(), a.cols);
    for (i, &r) in rows.iter().enumerate() {
        out.row_mut(i).copy_from_slice(a.row(r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(rows: usize, cols: usize, f: impl Fn(usize) -> f32) -> Mat {
        Mat::from_vec(rows, cols, (0..rows * cols).map(f).collect()).unwrap()
    }

    #[test]
    fn linear_matches_f64_for_each_dtype() {
        let x = mat(3, 37, |i| ((i * 7 % 11) as f32 - 5.0) * 0.1);
        let wv: Vec<f32> = (0..19 * 37)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.05)
            .collect();
        let w = Weight::from_f32("w", vec![19, 37], &wv);
        let y = linear(&x, &w);
        for t in 0..3 {
            for n in 0..19 {
                let r: f64 = (0..37)
                    .map(|kk| x.row(t)[kk] as f64 * wv[n * 37 + kk] as f64)
                    .sum();
                assert!((y.row(t)[n] as f64 - r).abs() < 1e-5, "{t},{n}");
            }
        }
    }

    /// Blocked and single-row products add in the same order: batching never changes a result.
    #[test]
    fn linear_is_batch_invariant_bit_for_bit() {
        let x = mat(7, 45, |i| ((i * 29 % 31) as f32 - 15.0) * 0.037);
        let wv: Vec<f32> = (0..9 * 45)
            .map(|i| ((i * 11 % 23) as f32 - 11.0) * 0.021)
            .collect();
        let w = Weight::from_f32("w", vec![9, 45], &wv);
        let all = linear(&x, &w);
        for t in 0..7 {
            let one = linear(&select_rows(&x, &[t]), &w);
            assert_eq!(one.row(0), all.row(t), "row {t}");
            for n in 0..9 {
                assert_eq!(dot(x.row(t), &wv[n * 45..(n + 1) * 45]), all.row(t)[n]);
            }
        }
    }

    #[test]
    fn rms_norm_gemma_and_plain() {
        let x = mat(1, 4, |i| i as f32 + 1.0); // 1 2 3 4: mean square 7.5
        let w = [0.5f32, 0.0, -1.0, 2.0];
        let y = rms_norm(&x, Some(&w), 4, 0.0, true);
        let inv = 1.0 / 7.5f32.sqrt();
        let expect = [1.0 * inv * 1.5, 2.0 * inv, 0.0, 4.0 * inv * 3.0];
        for (a, b) in y.data.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6);
        }
        // Per-head norm: two groups [1,2] and [3,4] share one weight of the group's length.
        let y = rms_norm(&x, Some(&[0.5, 2.0]), 2, 0.0, false);
        let (i1, i2) = (1.0 / 2.5f32.sqrt(), 1.0 / 12.5f32.sqrt());
        let expect = [
            1.0 * i1 * 0.5,
            2.0 * i1 * 2.0,
            3.0 * i2 * 0.5,
            4.0 * i2 * 2.0,
        ];
        for (a, b) in y.data.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} {b}");
        }
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let x = mat(1, 4, |i| [1.0, 2.0, 3.0, 4.0][i]);
        let y = rope(&x, &[3], 4, &[0.5, 0.25]);
        let (a0, a1) = (1.5f32, 0.75f32);
        let expect = [
            1.0 * a0.cos() - 3.0 * a0.sin(),
            2.0 * a1.cos() - 4.0 * a1.sin(),
            3.0 * a0.cos() + 1.0 * a0.sin(),
            4.0 * a1.cos() + 2.0 * a1.sin(),
        ];
        for (a, b) in y.data.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn router_topk_renormalises_the_kept_experts() {
        let logits = mat(1, 4, |i| [0.0, 2.0, 1.0, 2.0][i]);
        let out = router_topk(&logits, 2, &[1.0, 0.5, 1.0, 3.0]);
        // Softmax then top-2 (experts 1 and 3, equal): each 1/2 of the kept mass, times its scale.
        assert_eq!(out.data, vec![0.0, 0.25, 0.0, 1.5]);
        let out = router_topk(&logits, 3, &[1.0; 4]);
        let e2 = 1f32.exp();
        let want = e2 / (2.0 * e2 + 1.0);
        assert!(
            (out.data[1] - want).abs() < 1e-6 && out.data[0] == 0.0,
            "{:?}",
            out.data
        );
    }

    #[test]
    fn slice_cols_takes_a_column_range() {
        let x = mat(2, 5, |i| i as f32);
        assert_eq!(
            slice_cols(&x, 1, 3).data,
            vec![1.0, 2.0, 3.0, 6.0, 7.0, 8.0]
        );
    }

    #[test]
    fn gelu_tanh_known_values() {
        assert_eq!(gelu_tanh(0.0), 0.0);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_tanh(-2.0) - -0.045_402_3).abs() < 1e-5);
    }

    /// Attention computed in one step must equal the same tokens fed one at a time through the cache,
    /// including a sliding window smaller than the sequence (the ring buffer wraps).
    #[test]
    fn attention_incremental_equals_full_with_window_and_gqa() {
        for window in [None, Some(3)] {
            let g = AttnGeom {
                append: true,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 4,
                scale: 0.5,
                window,
                softcap: None,
                whole_group: false,
            };
            let t = 7;
            let q = mat(t, 16, |i| ((i * 31 % 23) as f32 - 11.0) * 0.1);
            let k = mat(t, 8, |i| ((i * 17 % 19) as f32 - 9.0) * 0.1);
            let v = mat(t, 8, |i| ((i * 7 % 13) as f32 - 6.0) * 0.1);
            let cap = window.unwrap_or(16);
            let mut full_cache = KvLayer::new(cap, 8);
            let mut full = Mat::zeros(t, 16);
            attention(&g, &q, &k, &v, 0, t, 0, &mut full_cache, &mut full);
            let mut inc_cache = KvLayer::new(cap, 8);
            for i in 0..t {
                let pick = |m: &Mat| select_rows(m, &[i]);
                let mut o = Mat::zeros(1, 16);
                attention(
                    &g,
                    &pick(&q),
                    &pick(&k),
                    &pick(&v),
                    0,
                    1,
                    i,
                    &mut inc_cache,
                    &mut o,
                );
                for (a, b) in o.data.iter().zip(full.row(i)) {
                    assert!((a - b).abs() < 1e-6, "window {window:?} row {i}");
                }
            }
            // Query 6 with window 3 must ignore keys 0..=3: compare with a direct computation.
            if window == Some(3) {
                let h = 1; // kv head 0
                let qh = &q.row(6)[4..8];
                let s: Vec<f32> = (4..=6).map(|j| dot(qh, &k.row(j)[0..4]) * 0.5).collect();
                let m = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for dd in 0..4 {
                    let o: f32 = (4..=6).map(|j| e[j - 4] / z * v.row(j)[dd]).sum();
                    assert!((full.row(6)[h * 4 + dd] - o).abs() < 1e-6);
                }
            }
        }
    }
}

#[cfg(test)]
mod grouped_tests {
    use super::*;

    /// Rows of an image group see the later rows of their group (and the sliding window bounds only the
    /// past); other rows stay causal.
    #[test]
    fn grouped_attention_sees_the_rest_of_its_group() {
        let t = 5;
        let q = Mat::from_vec(
            t,
            2,
            vec![0.3, -0.4, 1.0, 0.2, -0.5, 0.8, 0.1, 0.1, 0.7, -0.9],
        )
        .unwrap();
        let k = Mat::from_vec(
            t,
            2,
            vec![0.2, 0.9, -0.3, 0.4, 0.6, -0.2, 1.1, 0.5, -0.7, 0.3],
        )
        .unwrap();
        let v = Mat::from_vec(
            t,
            2,
            vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.25, -2.0, 4.0, 1.5, 0.0],
        )
        .unwrap();
        let groups = [None, Some(0), Some(0), Some(0), None];
        for (window, whole_group) in [(None, false), (Some(2), false), (Some(2), true)] {
            let g = AttnGeom {
                append: true,
                n_heads: 1,
                n_kv_heads: 1,
                head_dim: 2,
                scale: 0.7,
                window,
                softcap: None,
                whole_group,
            };
            let mut cache = KvLayer::new(8, 2);
            let mut out = Mat::zeros(t, 2);
            attention_grouped(&g, &q, &k, &v, 0, t, 0, &mut cache, &mut out, &groups);
            for (i, group) in groups.iter().enumerate() {
                let hi = if group.is_some() { 3 } else { i };
                let mut lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
                if whole_group && group.is_some() {
                    // Row 3 of the group (rows 1..=3) also sees row 1, past its window of 2.
                    lo = lo.min(1);
                }
                let s: Vec<f32> = (lo..=hi).map(|j| dot(q.row(i), k.row(j)) * 0.7).collect();
                let m = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..2 {
                    let o: f32 = (lo..=hi).map(|j| e[j - lo] / z * v.row(j)[d]).sum();
                    assert!(
                        (out.row(i)[d] - o).abs() < 1e-6,
                        "window {window:?} row {i}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod kv_tests {
    use super::*;
    use crate::cpu::KvRounding;

    #[test]
    fn round_kv_stores_fp8_codes_of_the_scaled_values() {
        let k = Mat::from_vec(1, 4, vec![0.3, -1000.0, 1e-6, 2.5]).unwrap();
        let v = Mat::from_vec(1, 4, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let (rk, rv) = round_kv(
            &k,
            &v,
            KvRounding::Fp8 {
                k_scale: 0.5,
                v_scale: 2.0,
            },
        );
        // 0.3/0.5 = 0.6 -> 0.625 -> 0.3125; -2000 saturates at -448 -> -224; 2e-6 -> 0; 5 -> 5.
        assert_eq!(rk.data, vec![0.3125, -224.0, 0.0, 2.5]);
        assert_eq!(rv.data, vec![1.0, 2.0, 3.0, 4.0]);
        let (bk, _) = round_kv(&k, &v, KvRounding::Bf16);
        assert_eq!(bk.data[0], half::bf16::from_f32(0.3).to_f32());
    }
}
