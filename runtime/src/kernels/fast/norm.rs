//! Fast batch norm: per-channel sums as a rayon map-reduce over blocks of
//! rows (f64 partial sums, as in the reference), then element-wise passes
//! over the same blocks with per-channel scale and shift precomputed in f32.
//! The formulas are those of the reference set.

use rayon::prelude::*;

/// Rows (positions of all channels) per rayon task.
const BLOCK_ROWS: usize = 512;

/// Sums of `term(row, acc)` over `rows` rows into `width` f64 accumulators.
fn channel_sums<F>(rows: usize, width: usize, term: F) -> Vec<f64>
where
    F: Fn(usize, &mut [f64]) + Sync,
{
    (0..rows.div_ceil(BLOCK_ROWS))
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0f64; width];
            for r in b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(rows) {
                term(r, &mut acc);
            }
            acc
        })
        .reduce(
            || vec![0f64; width],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// `[mean; biased variance]`, two passes as in the reference.
pub fn bn_stats(x: &[f32], c: usize, stats: &mut [f32]) {
    let rows = (x.len() / c) as f64;
    let sums = channel_sums(x.len() / c, c, |r, acc| {
        for (a, v) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]) {
            *a += *v as f64;
        }
    });
    let mean: Vec<f64> = sums.iter().map(|s| s / rows).collect();
    let squares = channel_sums(x.len() / c, c, |r, acc| {
        for ((a, v), m) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]).zip(&mean) {
            let d = *v as f64 - m;
            *a += d * d;
        }
    });
    for ch in 0..c {
        stats[ch] = mean[ch] as f32;
        stats[c + ch] = (squares[ch] / rows) as f32;
    }
}

/// Per-channel `1 / sqrt(var + eps)` from `[2, c]` statistics.
fn inv_std(stats: &[f32], eps: f32) -> Vec<f32> {
    let c = stats.len() / 2;
    stats[c..].iter().map(|&v| 1.0 / (v + eps).sqrt()).collect()
}

/// `y = x * scale + shift` with `scale = gamma * inv_std` and
/// `shift = beta - mean * scale`.
pub fn bn_apply(x: &[f32], stats: &[f32], affine: &[f32], eps: f32, y: &mut [f32]) {
    let c = stats.len() / 2;
    let inv = inv_std(stats, eps);
    let scale: Vec<f32> = (0..c).map(|ch| affine[ch] * inv[ch]).collect();
    let shift: Vec<f32> = (0..c)
        .map(|ch| affine[c + ch] - stats[ch] * scale[ch])
        .collect();
    y.par_chunks_mut(BLOCK_ROWS * c)
        .zip(x.par_chunks(BLOCK_ROWS * c))
        .for_each(|(yb, xb)| {
            for (yr, xr) in yb.chunks_exact_mut(c).zip(xb.chunks_exact(c)) {
                for ch in 0..c {
                    yr[ch] = xr[ch] * scale[ch] + shift[ch];
                }
            }
        });
}

/// Per-channel `(sum dy, sum dy * xhat)`.
fn dy_sums(x: &[f32], stats: &[f32], dy: &[f32], inv: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let c = inv.len();
    let both = channel_sums(x.len() / c, 2 * c, |r, acc| {
        for ch in 0..c {
            let xhat = (x[r * c + ch] - stats[ch]) * inv[ch];
            let d = dy[r * c + ch] as f64;
            acc[ch] += d;
            acc[c + ch] += d * xhat as f64;
        }
    });
    (both[..c].to_vec(), both[c..].to_vec())
}

/// `dx = gamma * inv / m * (m * dy - sum dy - xhat * sum(dy * xhat))`.
pub fn bn_backward(x: &[f32], stats: &[f32], affine: &[f32], dy: &[f32], eps: f32, dx: &mut [f32]) {
    let c = stats.len() / 2;
    let rows = (x.len() / c) as f64;
    let inv = inv_std(stats, eps);
    let (sum_dy, sum_dy_xhat) = dy_sums(x, stats, dy, &inv);
    let mean_dy: Vec<f32> = sum_dy.iter().map(|s| (s / rows) as f32).collect();
    let mean_dy_xhat: Vec<f32> = sum_dy_xhat.iter().map(|s| (s / rows) as f32).collect();
    let gain: Vec<f32> = (0..c).map(|ch| affine[ch] * inv[ch]).collect();
    dx.par_chunks_mut(BLOCK_ROWS * c)
        .enumerate()
        .for_each(|(b, out)| {
            let base = b * BLOCK_ROWS * c;
            for (r, row) in out.chunks_exact_mut(c).enumerate() {
                for ch in 0..c {
                    let i = base + r * c + ch;
                    let xhat = (x[i] - stats[ch]) * inv[ch];
                    row[ch] = gain[ch] * (dy[i] - mean_dy[ch] - xhat * mean_dy_xhat[ch]);
                }
            }
        });
}

/// `[sum dy * xhat; sum dy]`.
pub fn bn_affine_grad(x: &[f32], stats: &[f32], dy: &[f32], eps: f32, grad: &mut [f32]) {
    let c = stats.len() / 2;
    let inv = inv_std(stats, eps);
    let (sum_dy, sum_dy_xhat) = dy_sums(x, stats, dy, &inv);
    for ch in 0..c {
        grad[ch] = sum_dy_xhat[ch] as f32;
        grad[c + ch] = sum_dy[ch] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bn_stats_over_many_blocks() {
        // 1500 rows span three blocks; channel 0 alternates 1 and 3.
        let x: Vec<f32> = (0..3000)
            .map(|i| {
                if i % 2 == 1 {
                    7.0
                } else if i % 4 == 0 {
                    1.0
                } else {
                    3.0
                }
            })
            .collect();
        let mut stats = [0.0; 4];
        bn_stats(&x, 2, &mut stats);
        assert_eq!(stats, [2.0, 7.0, 1.0, 0.0]);
    }

    #[test]
    fn bn_apply_and_affine_grad() {
        let mut y = [0.0; 2];
        bn_apply(&[1.0, 3.0], &[2.0, 1.0], &[3.0, 0.5], 0.0, &mut y);
        assert_eq!(y, [-2.5, 3.5]);
        let mut grad = [0.0; 2];
        bn_affine_grad(&[1.0, 3.0], &[2.0, 1.0], &[2.0, 5.0], 0.0, &mut grad);
        assert_eq!(grad, [3.0, 7.0]);
    }
}
