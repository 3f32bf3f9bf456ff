//! Reference kernels of the vision-encoder ops (graph.rs `Op::BiasAdd` ... `Op::ChannelScale`).

use rayon::prelude::*;

use super::kernels::{dot, embed, gelu_tanh, rope};
use crate::checkpoint::Weight;
use crate::tensor::Mat;

/// `x + b` on every row.
pub fn bias_add(x: &Mat, b: &[f32]) -> Mat {
    let mut out = x.clone();
    out.data
        .par_chunks_mut(x.cols)
        .for_each(|row| row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi));
    out
}

/// LayerNorm of each row, statistics in f64: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &Mat, w: &[f32], b: &[f32], eps: f32) -> Mat {
    let mut out = x.clone();
    let n = x.cols as f64;
    out.data.par_chunks_mut(x.cols).for_each(|row| {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var as f32 + eps).sqrt();
        let mean = mean as f32;
        for ((v, wi), bi) in row.iter_mut().zip(w).zip(b) {
            *v = (*v - mean) * inv * wi + bi;
        }
    });
    out
}

pub fn gelu(x: &Mat) -> Mat {
    let mut out = x.clone();
    out.data.par_iter_mut().for_each(|v| *v = gelu_tanh(*v));
    out
}

/// Non-causal multi-head attention within each `(first row, rows)` span.
pub fn encoder_attention(
    q: &Mat,
    k: &Mat,
    v: &Mat,
    spans: &[(usize, usize)],
    n_heads: usize,
    d: usize,
    scale: f32,
) -> Mat {
    let mut out = Mat::zeros(q.rows, n_heads * d);
    for &(row0, n) in spans {
        out.data[row0 * n_heads * d..(row0 + n) * n_heads * d]
            .par_chunks_mut(n_heads * d)
            .enumerate()
            .for_each(|(i, orow)| {
                let mut scores = vec![0f32; n];
                for h in 0..n_heads {
                    let qh = &q.row(row0 + i)[h * d..(h + 1) * d];
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        *s = dot(qh, &k.row(row0 + j)[h * d..(h + 1) * d]) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let o = &mut orow[h * d..(h + 1) * d];
                    o.fill(0.0);
                    for (j, s) in scores.iter().enumerate() {
                        let p = s / sum;
                        for (oi, vi) in o.iter_mut().zip(&v.row(row0 + j)[h * d..(h + 1) * d]) {
                            *oi += p * vi;
                        }
                    }
                }
            });
    }
    out
}

/// Average pool of each span (a row-major `side x side` grid) over `kernel x kernel` blocks.
pub fn avg_pool2d(x: &Mat, spans: &[(usize, usize)], side: usize, kernel: usize) -> Mat {
    let ps = side / kernel;
    let mut out = Mat::zeros(spans.len() * ps * ps, x.cols);
    let inv = 1.0 / (kernel * kernel) as f32;
    for (si, &(row0, _)) in spans.iter().enumerate() {
        for py in 0..ps {
            for px in 0..ps {
                let o = out.row_mut(si * ps * ps + py * ps + px);
                for ky in 0..kernel {
                    for kx in 0..kernel {
                        let r = row0 + (py * kernel + ky) * side + px * kernel + kx;
                        o.iter_mut().zip(x.row(r)).for_each(|(a, b)| *a += b);
                    }
                }
                o.iter_mut().for_each(|a| *a *= inv);
            }
        }
    }
    out
}

/// `table[x] + table[size + y]` for each id `x + size * y` (`table` is `[2 * size, cols]`).
pub fn pos_embed2d(table: &Weight, ids: &[u32], size: usize) -> Mat {
    let s = size as u32;
    let xs: Vec<u32> = ids.iter().map(|&t| t % s).collect();
    let ys: Vec<u32> = ids.iter().map(|&t| s + t / s).collect();
    let mut out = embed(table, &xs, 1.0);
    let y = embed(table, &ys, 1.0);
    out.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
    out
}

/// [`rope`] on the first half of each head at x and on the second half at y (id `x + size * y`): the
/// halves are the heads of `head_dim / 2` values of the same data read as twice as many heads.
pub fn rope2d(x: &Mat, ids: &[u32], head_dim: usize, inv_freq: &[f32], size: usize) -> Mat {
    let halves = x.cols / (head_dim / 2);
    let mut positions = Vec::with_capacity(x.rows * halves);
    for &t in ids {
        let (px, py) = ((t as usize) % size, (t as usize) / size);
        positions.extend((0..halves).map(|i| if i % 2 == 0 { px } else { py }));
    }
    let split = Mat::from_vec(x.rows * halves, head_dim / 2, x.data.clone()).expect("same data");
    let r = rope(&split, &positions, head_dim / 2, inv_freq);
    Mat::from_vec(x.rows, x.cols, r.data).expect("same data")
}

/// Average pool by position (graph.rs `Op::PoolPositions`) of each `(first row, rows)` span.
pub fn pool_positions(
    x: &Mat,
    ids: &[u32],
    spans: &[(usize, usize)],
    kernel: usize,
    size: usize,
) -> Result<Mat, String> {
    let (cells, total) = pool_cells(ids, spans, kernel, size)?;
    let mut out = Mat::zeros(total, x.cols);
    let inv = 1.0 / (kernel * kernel) as f32;
    for &(row0, n) in spans {
        for (r, &c) in cells.iter().enumerate().skip(row0).take(n) {
            let o = out.row_mut(c);
            o.iter_mut().zip(x.row(r)).for_each(|(a, b)| *a += b * inv);
        }
    }
    Ok(out)
}

/// The pooled row (over all spans) each row of each `(first row, rows)` span adds to under
/// `Op::PoolPositions`, indexed by row, and the number of pooled rows; checked: every pooled cell of a
/// span gets exactly `kernel^2` of its rows.
pub fn pool_cells(
    ids: &[u32],
    spans: &[(usize, usize)],
    kernel: usize,
    size: usize,
) -> Result<(Vec<usize>, usize), String> {
    let k2 = kernel * kernel;
    let total: usize = spans.iter().map(|s| s.1 / k2).sum();
    let mut cells = vec![0usize; spans.iter().map(|s| s.0 + s.1).max().unwrap_or(0)];
    let mut hits = vec![0usize; total];
    let mut base = 0;
    for &(row0, n) in spans {
        if n % k2 != 0 {
            return Err(format!("{n} rows do not pool by {kernel}x{kernel}"));
        }
        let pos = |r: usize| ((ids[r] as usize) % size, (ids[r] as usize) / size);
        let w = ((row0..row0 + n).map(|r| pos(r).0).max().unwrap_or(0) + 1) / kernel;
        for (r, slot) in cells.iter_mut().enumerate().skip(row0).take(n) {
            let (px, py) = pos(r);
            let cell = px / kernel + w * (py / kernel);
            if px / kernel >= w || cell >= n / k2 {
                return Err(format!(
                    "patch ({px}, {py}) is outside a grid of {n} patches pooled by {kernel}"
                ));
            }
            hits[base + cell] += 1;
            *slot = base + cell;
        }
        base += n / k2;
    }
    if let Some(cell) = hits.iter().position(|&h| h != k2) {
        return Err(format!(
            "pooled cell {cell} gets {} patches, not {k2}: the patches are not a full grid",
            hits[cell]
        ));
    }
    Ok((cells, total))
}

/// `min(max(x, lo), hi)`.
pub fn clamp(x: &Mat, lo: f32, hi: f32) -> Mat {
    let mut out = x.clone();
    out.data.par_iter_mut().for_each(|v| *v = v.max(lo).min(hi));
    out
}

/// `x * w` on every row.
pub fn channel_scale(x: &Mat, w: &[f32]) -> Mat {
    let mut out = x.clone();
    out.data
        .par_chunks_mut(x.cols)
        .for_each(|row| row.iter_mut().zip(w).for_each(|(v, wi)| *v *= wi));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_and_pool_known_values() {
        let x = Mat::from_vec(1, 4, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let y = layer_norm(&x, &[1.0, 2.0, 1.0, 1.0], &[0.0, 0.0, 0.0, 0.5], 0.0);
        let s = 1.25f32.sqrt();
        let want = [-1.5 / s, 2.0 * -0.5 / s, 0.5 / s, 1.5 / s + 0.5];
        for (a, b) in y.data.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} {b}");
        }
        // A 4x4 grid of values 0..16 pooled 2x2: means of each quadrant.
        let g = Mat::from_vec(16, 1, (0..16).map(|v| v as f32).collect()).unwrap();
        let p = avg_pool2d(&g, &[(0, 16)], 4, 2);
        assert_eq!(p.data, vec![2.5, 4.5, 10.5, 12.5]);
    }

    #[test]
    fn encoder_attention_sees_every_row_of_its_span_only() {
        // Two spans; values of a span are constant, so each output equals its span's value whatever the
        // weights, and one span never leaks into the other.
        let q = Mat::from_vec(
            5,
            2,
            vec![0.3, -1.0, 2.0, 0.1, 0.5, 0.5, -0.2, 0.9, 1.0, 1.0],
        )
        .unwrap();
        let k = q.clone();
        let v =
            Mat::from_vec(5, 2, vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 7.0, 7.0, 7.0, 7.0]).unwrap();
        let o = encoder_attention(&q, &k, &v, &[(0, 3), (3, 2)], 1, 2, 1.0);
        for r in 0..5 {
            let want = if r < 3 { 1.0 } else { 7.0 };
            assert!(o.row(r).iter().all(|&x| (x - want).abs() < 1e-6));
        }
        // Row 0 sees the later rows 1, 2: its output is a mix of their values.
        let v2 = Mat::from_vec(3, 1, vec![0.0, 1.0, 2.0]).unwrap();
        let q2 = Mat::from_vec(3, 1, vec![1.0, 1.0, 1.0]).unwrap();
        let k2 = Mat::from_vec(3, 1, vec![0.0, 1.0, 2.0]).unwrap();
        let o = encoder_attention(&q2, &k2, &v2, &[(0, 3)], 1, 1, 1.0);
        let e: Vec<f32> = (0..3).map(|j| (j as f32).exp()).collect();
        let want = (e[1] + 2.0 * e[2]) / (e[0] + e[1] + e[2]);
        assert!((o.row(0)[0] - want).abs() < 1e-6);
    }
}
