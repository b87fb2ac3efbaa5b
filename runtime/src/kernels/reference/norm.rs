//! Reference batch norm over `rows` positions (N times the spatial size) of `c`
//! channels, split into statistics, normalisation and the two gradients.
//!
//! With `m = rows`, `mean_c = sum x / m`, `var_c = sum (x - mean_c)^2 / m` (the
//! biased variance), `inv_c = 1 / sqrt(var_c + eps)` and
//! `xhat = (x - mean_c) * inv_c`, the forward op is `y = gamma_c * xhat + beta_c`
//! (Ioffe and Szegedy, "Batch Normalization", 2015). Sums run in f64.

/// Per-channel `[mean; biased variance]` of `x` as a `[2, c]` tensor, in two
/// passes so that large means do not cancel the variance. `x` must be non-empty.
pub fn bn_stats(x: &[f32], c: usize, stats: &mut [f32]) {
    let rows = (x.len() / c) as f64;
    let mut mean = vec![0f64; c];
    for row in x.chunks_exact(c) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += *v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows);

    let mut var = vec![0f64; c];
    for row in x.chunks_exact(c) {
        for ch in 0..c {
            let d = row[ch] as f64 - mean[ch];
            var[ch] += d * d;
        }
    }
    for ch in 0..c {
        stats[ch] = mean[ch] as f32;
        stats[c + ch] = (var[ch] / rows) as f32;
    }
}

/// `1 / sqrt(var + eps)` per channel, from a `[2, c]` statistics tensor.
pub(super) fn inv_std(stats: &[f32], c: usize, eps: f32) -> Vec<f64> {
    stats[c..2 * c]
        .iter()
        .map(|&v| 1.0 / (v as f64 + eps as f64).sqrt())
        .collect()
}

/// `y = gamma * (x - mean) / sqrt(var + eps) + beta`, with `stats` and `affine`
/// both `[2, c]` (mean and variance; gamma and beta).
pub fn bn_apply(x: &[f32], stats: &[f32], affine: &[f32], eps: f32, y: &mut [f32]) {
    let c = stats.len() / 2;
    let inv = inv_std(stats, c, eps);
    for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        for ch in 0..c {
            let xhat = (xr[ch] as f64 - stats[ch] as f64) * inv[ch];
            yr[ch] = (affine[ch] as f64 * xhat + affine[c + ch] as f64) as f32;
        }
    }
}

/// Per-channel `(sum dy, sum dy * xhat)`.
fn dy_sums(x: &[f32], stats: &[f32], dy: &[f32], eps: f32) -> (Vec<f64>, Vec<f64>) {
    let c = stats.len() / 2;
    let inv = inv_std(stats, c, eps);
    let mut sum_dy = vec![0f64; c];
    let mut sum_dy_xhat = vec![0f64; c];
    for (xr, dr) in x.chunks_exact(c).zip(dy.chunks_exact(c)) {
        for ch in 0..c {
            let xhat = (xr[ch] as f64 - stats[ch] as f64) * inv[ch];
            sum_dy[ch] += dr[ch] as f64;
            sum_dy_xhat[ch] += dr[ch] as f64 * xhat;
        }
    }
    (sum_dy, sum_dy_xhat)
}

/// Gradient of `bn_apply(x, bn_stats(x), affine)` with respect to `x`, with the
/// mean and variance depending on `x`:
/// `dx = gamma * inv / m * (m * dy - sum dy - xhat * sum(dy * xhat))`.
pub fn bn_backward(x: &[f32], stats: &[f32], affine: &[f32], dy: &[f32], eps: f32, dx: &mut [f32]) {
    let c = stats.len() / 2;
    let rows = (x.len() / c) as f64;
    let inv = inv_std(stats, c, eps);
    let (sum_dy, sum_dy_xhat) = dy_sums(x, stats, dy, eps);
    for ((xr, dr), out) in x
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
    {
        for ch in 0..c {
            let xhat = (xr[ch] as f64 - stats[ch] as f64) * inv[ch];
            let centred = dr[ch] as f64 - sum_dy[ch] / rows - xhat * sum_dy_xhat[ch] / rows;
            out[ch] = (affine[ch] as f64 * inv[ch] * centred) as f32;
        }
    }
}

/// Gradient with respect to the affine parameters as `[2, c]`:
/// `dgamma = sum dy * xhat` (row 0) and `dbeta = sum dy` (row 1).
pub fn bn_affine_grad(x: &[f32], stats: &[f32], dy: &[f32], eps: f32, grad: &mut [f32]) {
    let c = stats.len() / 2;
    let (sum_dy, sum_dy_xhat) = dy_sums(x, stats, dy, eps);
    for ch in 0..c {
        grad[ch] = sum_dy_xhat[ch] as f32;
        grad[c + ch] = sum_dy[ch] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bn_stats_biased_variance() {
        // Channel 0 contains 1 and 3 (mean 2, variance 1), channel 1 contains 10 twice.
        let mut stats = [0.0; 4];
        bn_stats(&[1.0, 10.0, 3.0, 10.0], 2, &mut stats);
        assert_eq!(stats, [2.0, 10.0, 1.0, 0.0]);
    }

    #[test]
    fn bn_apply_normalises_and_shifts() {
        let stats = [2.0, 1.0];
        let affine = [3.0, 0.5];
        let mut y = [0.0; 2];
        bn_apply(&[1.0, 3.0], &stats, &affine, 0.0, &mut y);
        assert_eq!(y, [-2.5, 3.5]);
    }

    #[test]
    fn bn_backward_removes_mean_and_projection() {
        // x = [1, 3]: xhat = [-1, 1]. dy = [1, 1] is removed by the mean term,
        // and dy = [-1, 1] (parallel to xhat) by the variance term.
        let stats = [2.0, 1.0];
        let affine = [1.0, 0.0];
        let mut dx = [9.0; 2];
        bn_backward(&[1.0, 3.0], &stats, &affine, &[1.0, 1.0], 0.0, &mut dx);
        assert_eq!(dx, [0.0, 0.0]);
        bn_backward(&[1.0, 3.0], &stats, &affine, &[-1.0, 1.0], 0.0, &mut dx);
        assert_eq!(dx, [0.0, 0.0]);
        bn_backward(&[1.0, 3.0], &stats, &affine, &[1.0, 0.0], 0.0, &mut dx);
        assert_eq!(dx, [0.0, 0.0]);
    }

    #[test]
    fn bn_affine_grad_rows() {
        let mut grad = [0.0; 2];
        bn_affine_grad(&[1.0, 3.0], &[2.0, 1.0], &[2.0, 5.0], 0.0, &mut grad);
        assert_eq!(grad, [3.0, 7.0]);
    }
}
