//! Reference fused BN-ReLU kernels, built from the unfused reference kernels.
//!
//! Each kernel materialises the concatenation `x = concat(x_1 .. x_m)`, the
//! batch-norm output `u = bn(x)` and, where it needs it, the rectified input
//! `z = relu(u)`, then calls the reference kernel of the unfused op. That is
//! the definition the fast set must match, so these kernels copy on purpose.

use super::{conv, elementwise, norm, pool};
use crate::kernels::dispatch::{BnRelu, Columns};
use crate::kernels::layout::{ConvShape, PoolShape};

/// Concatenates `[2, c_i]` statistics along channels: row 0 (means) of the
/// result is the concatenation of the parts' row 0, and row 1 (variances)
/// that of their row 1. Both are per-channel quantities, so the statistics
/// of a concatenation are the concatenated statistics of its parts.
pub fn concat_stats(parts: &[&[f32]], channels: &[usize], stats: &mut [f32]) {
    let total: usize = channels.iter().sum();
    let mut offset = 0;
    for (part, &c) in parts.iter().zip(channels) {
        stats[offset..offset + c].copy_from_slice(&part[..c]);
        stats[total + offset..total + offset + c].copy_from_slice(&part[c..2 * c]);
        offset += c;
    }
}

/// Concatenates the inputs into `x`, a `[pixels, C]` matrix.
fn concat(input: &BnRelu) -> Vec<f32> {
    let mut x = vec![0f32; input.pixels * input.width()];
    elementwise::concat(&input.parts, &input.channels, &mut x);
    x
}

/// Computes the batch-norm output `u = bn(x)`.
fn normalised(input: &BnRelu, x: &[f32]) -> Vec<f32> {
    let mut u = vec![0f32; x.len()];
    norm::bn_apply(x, input.stats, input.affine, input.eps, &mut u);
    u
}

/// Computes the rectified input `z = relu(bn(x))` of the convolution.
fn rectified(input: &BnRelu) -> Vec<f32> {
    let u = normalised(input, &concat(input));
    let mut z = vec![0f32; u.len()];
    elementwise::relu(&u, &mut z);
    z
}

/// Computes the concatenation `x` and the gradient of the batch-norm
/// output, `du = dz * [u > 0]`.
fn masked_grad(input: &BnRelu, dz: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let x = concat(input);
    let u = normalised(input, &x);
    let mut du = vec![0f32; u.len()];
    elementwise::relu_backward(&u, dz, &mut du);
    (x, du)
}

/// `y = conv2d(relu(bn(concat(x_1 .. x_m))), w)`.
pub fn bn_relu_conv(shape: &ConvShape, input: &BnRelu, w: &[f32], y: &mut [f32]) {
    conv::conv2d(shape, &rectified(input), w, y)
}

/// Weight gradient of [`bn_relu_conv`]: `dw = conv2d_backward_filter(z, dy)`
/// with `z = relu(bn(concat(x)))` recomputed.
pub fn bn_relu_conv_backward_filter(shape: &ConvShape, input: &BnRelu, dy: &[f32], dw: &mut [f32]) {
    conv::conv2d_backward_filter(shape, &rectified(input), dy, dw)
}

/// Gradient of `z = relu(bn(x))` with respect to the concatenation `x`, with
/// batch statistics: `dx = bn_backward(x, du)` where `du = dz * [bn(x) > 0]`.
pub fn bn_relu_backward(input: &BnRelu, dz: &[f32], dx: &mut [f32]) {
    let (x, du) = masked_grad(input, dz);
    norm::bn_backward(&x, input.stats, input.affine, &du, input.eps, dx)
}

/// Columns `dz.start ..` of [`bn_relu_backward`] over a wider concatenation,
/// given the statistics, affine parameters and affine gradient
/// `daffine = [sum du * xhat; sum du]` of `input`'s channels only:
/// `dx = gamma * inv * (du - sum du / m - xhat * sum(du * xhat) / m)`, with
/// the sums read from `daffine` instead of recomputed.
pub fn bn_relu_backward_part(input: &BnRelu, daffine: &[f32], dz: Columns, dx: &mut [f32]) {
    let c = input.width();
    if c == 0 {
        return;
    }
    let mut own = vec![0f32; input.pixels * c];
    elementwise::slice(dz.data, dz.width, dz.start, c, &mut own);
    let (x, du) = masked_grad(input, &own);

    let rows = input.pixels as f64;
    let (stats, gamma) = (input.stats, input.affine);
    let inv = norm::inv_std(stats, c, input.eps);
    for ((xr, dr), out) in x
        .chunks_exact(c)
        .zip(du.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
    {
        for ch in 0..c {
            let xhat = (xr[ch] as f64 - stats[ch] as f64) * inv[ch];
            let (sum_du_xhat, sum_du) = (daffine[ch] as f64, daffine[c + ch] as f64);
            let centred = dr[ch] as f64 - sum_du / rows - xhat * sum_du_xhat / rows;
            out[ch] = (gamma[ch] as f64 * inv[ch] * centred) as f32;
        }
    }
}

/// Gradient of `z = relu(bn(x))` with respect to gamma (row 0) and beta
/// (row 1): `bn_affine_grad(x, du)` where `du = dz * [bn(x) > 0]`.
pub fn bn_relu_affine_grad(input: &BnRelu, dz: &[f32], grad: &mut [f32]) {
    let (x, du) = masked_grad(input, dz);
    norm::bn_affine_grad(&x, input.stats, &du, input.eps, grad)
}

/// `y = global_avg_pool(relu(bn(concat(x_1 .. x_m))))`, a `[N, C]` matrix.
pub fn bn_relu_global_avg_pool(input: &BnRelu, y: &mut [f32]) {
    pool::global_avg_pool(&rectified(input), input.width(), y)
}

/// `y = avg_pool(relu(bn(concat(x_1 .. x_m))))`.
pub fn bn_relu_avg_pool(shape: &PoolShape, input: &BnRelu, y: &mut [f32]) {
    pool::avg_pool(shape, &rectified(input), y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_stats_interleaves_rows() {
        // Part 0 has one channel (mean 1, variance 2), and part 1 has two.
        let mut stats = [0.0; 6];
        concat_stats(&[&[1.0, 2.0], &[3.0, 4.0, 5.0, 6.0]], &[1, 2], &mut stats);
        assert_eq!(stats, [1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
    }

    #[test]
    fn bn_relu_backward_masks_rectified_outputs() {
        // One channel over x = [-1, -1, 1, 1]: mean 0, variance 1, so xhat = x.
        // With gamma -1 and beta 0, u = -xhat, so the last two outputs are
        // rectified away and du = dz * [1, 1, 0, 0] = [1, 2, 0, 0], with
        // sum du = 3 and sum du * xhat = -3. Then
        // dx = gamma * (du - sum du / 4 - xhat * sum(du * xhat) / 4)
        //    = -(du - 0.75 + 0.75 * xhat) = [0.5, -0.5, 0, 0].
        let input = BnRelu {
            parts: vec![&[-1.0, -1.0, 1.0, 1.0]],
            channels: vec![1],
            pixels: 4,
            stats: &[0.0, 1.0],
            affine: &[-1.0, 0.0],
            eps: 0.0,
        };
        let dz = [1.0, 2.0, 3.0, 6.0];
        let mut dx = [9.0; 4];
        bn_relu_backward(&input, &dz, &mut dx);
        assert_eq!(dx, [0.5, -0.5, 0.0, 0.0]);

        let mut grad = [9.0; 2];
        bn_relu_affine_grad(&input, &dz, &mut grad);
        assert_eq!(grad, [-3.0, 3.0]);
    }
}
