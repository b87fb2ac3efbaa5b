//! Fast fused BN-ReLU kernels that never materialise the concatenation
//! `x = concat(x_1 .. x_m)`, its batch-norm output `u = bn(x)` or the
//! rectified input `z = relu(u)` of the convolution for the whole batch.
//!
//! The convolution and its filter gradient hand the fast convolution kernels
//! a [`BigSide`] that computes `z` block by block. Each block of output
//! pixels writes the rows of `z` its taps read into a scratch buffer of its
//! rayon task. These are its own rows plus a halo of up to `k - 1` image
//! rows, as an NHWC matrix with the channels of all inputs side by side. The
//! buffer stays in cache for im2col and the GEMM. The batch-norm gradients
//! read the inputs where they lie, in two passes over blocks of pixels:
//! per-channel sums, then the element-wise gradient. The gradient of some of
//! the inputs (`BnReluBackwardPart`) takes its sums from the affine gradient
//! and is the second pass alone.
//!
//! The element-wise loops run pixel by pixel, then input by input, then over
//! that input's contiguous channels. The inner loop thus has no branch on
//! which input a channel belongs to and vectorises, and the rows of `dz`,
//! `dx` and `z`, which hold all channels, are read or written in order.
//!
//! The normalisation is `u = x * scale + shift` in f32, with
//! `scale = gamma / sqrt(var + eps)` and `shift = beta - mean * scale`, as in
//! the fast `bn_apply`, so the fused and the unfused fast kernels agree on the
//! ReLU mask. The gradient sums run in f32 over runs of `RUN_PIXELS` pixels
//! and in f64 across runs and blocks, added in block order, so they do not
//! depend on the thread count. The convolution kernels split their work by
//! thread count, as `conv.rs` states, so every result is deterministic for a
//! given thread count.

use super::conv::{self, BigSide};
use crate::kernels::dispatch::{BnRelu, Columns};
use crate::kernels::layout::{ConvShape, PoolShape};
use rayon::prelude::*;
use std::ops::Range;

/// Pixels per rayon task in normalisation and batch-norm gradient passes.
const BLOCK_ROWS: usize = 512;

/// Pixels per run of f32 sums in the batch-norm gradients. The rounding
/// error of a run's sum is at most about `RUN_PIXELS` f32 epsilons of the sum
/// of its magnitudes, and the runs add up in f64.
const RUN_PIXELS: usize = 32;

/// The per-channel affine form of `bn` and the place of each input within the
/// concatenation.
struct Normaliser<'a> {
    input: &'a BnRelu<'a>,
    /// Channels of the concatenation.
    width: usize,
    /// First channel of each input within the concatenation.
    offsets: Vec<usize>,
    /// Per-channel `1 / sqrt(var + eps)`.
    inv: Vec<f32>,
    /// Per-channel `gamma / sqrt(var + eps)`.
    scale: Vec<f32>,
    /// Per-channel `beta - mean * scale`.
    shift: Vec<f32>,
}

impl<'a> Normaliser<'a> {
    fn new(input: &'a BnRelu<'a>) -> Normaliser<'a> {
        let width = input.width();
        let offsets = input
            .channels
            .iter()
            .scan(0, |start, &c| {
                let first = *start;
                *start += c;
                Some(first)
            })
            .collect();
        let (stats, affine) = (input.stats, input.affine);
        let inv: Vec<f32> = stats[width..2 * width]
            .iter()
            .map(|&var| 1.0 / (var + input.eps).sqrt())
            .collect();
        let scale: Vec<f32> = (0..width).map(|ch| affine[ch] * inv[ch]).collect();
        let shift = (0..width)
            .map(|ch| affine[width + ch] - stats[ch] * scale[ch])
            .collect();
        Normaliser {
            input,
            width,
            offsets,
            inv,
            scale,
            shift,
        }
    }

    /// Lists the inputs with at least one channel, restricted to pixels
    /// `first .. first + rows` of the batch.
    fn parts(&self, first: usize, rows: usize) -> Vec<Part<'_>> {
        let input = self.input;
        input
            .parts
            .iter()
            .zip(&input.channels)
            .zip(&self.offsets)
            .filter(|((_, &c), _)| c > 0)
            .map(|((part, &c), &offset)| {
                let range = offset..offset + c;
                Part {
                    rows: &part[first * c..(first + rows) * c],
                    coef: Coefficients {
                        scale: &self.scale[range.clone()],
                        shift: &self.shift[range.clone()],
                        mean: &input.stats[range.clone()],
                        inv: &self.inv[range.clone()],
                    },
                    range,
                }
            })
            .collect()
    }

    /// Writes `z = relu(bn(x))` for pixels `first .. first + rows` of the
    /// batch into `z`, a `[rows, C]` matrix, serially.
    fn rectify_block(&self, first: usize, z: &mut [f32]) {
        if self.width == 0 {
            return;
        }
        let parts = self.parts(first, z.len() / self.width);
        for (r, z_row) in z.chunks_exact_mut(self.width).enumerate() {
            for part in &parts {
                part.coef
                    .rectify(part.row(r), &mut z_row[part.range.clone()]);
            }
        }
    }
}

impl BigSide for Normaliser<'_> {
    fn channels(&self) -> usize {
        self.width
    }

    fn stored(&self) -> Option<&[f32]> {
        None
    }

    fn rows<'s>(&'s self, span: Range<usize>, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        // `rectify_block` writes every channel of every row, so the stale
        // values `resize` keeps are all overwritten.
        scratch.resize(span.len() * self.width, 0.0);
        let z = &mut scratch[..span.len() * self.width];
        self.rectify_block(span.start, z);
        z
    }
}

/// One input over a block of pixels.
struct Part<'a> {
    /// The input's rows for the block's pixels.
    rows: &'a [f32],
    /// The input's channels within the concatenation.
    range: Range<usize>,
    coef: Coefficients<'a>,
}

impl Part<'_> {
    /// Returns the input's values at pixel `r` of the block.
    #[inline]
    fn row(&self, r: usize) -> &[f32] {
        let c = self.range.len();
        &self.rows[r * c..(r + 1) * c]
    }
}

/// Returns `dz` where `u > 0` and 0 elsewhere. A bit mask selects the value,
/// because rustc 1.95 compiled the equivalent `if` to an unpredictable branch
/// on the default x86-64 target and left the loops around it scalar.
#[inline]
fn relu_gradient(u: f32, dz: f32) -> f32 {
    let keep = u32::from(u > 0.0).wrapping_neg();
    f32::from_bits(dz.to_bits() & keep)
}

/// The batch-norm coefficients of one input's channels, all of one length.
struct Coefficients<'a> {
    scale: &'a [f32],
    shift: &'a [f32],
    mean: &'a [f32],
    inv: &'a [f32],
}

impl Coefficients<'_> {
    /// Writes `z = relu(x * scale + shift)` for one pixel.
    #[inline]
    fn rectify(&self, x: &[f32], z: &mut [f32]) {
        // Slicing every operand to one length lets the compiler drop the
        // bounds checks and vectorise the loop.
        let len = x.len();
        let (z, scale, shift) = (&mut z[..len], &self.scale[..len], &self.shift[..len]);
        for j in 0..len {
            z[j] = (x[j] * scale[j] + shift[j]).max(0.0);
        }
    }

    /// Adds `du` to `sum_du` and `du * xhat` to `sum_du_xhat` for one pixel,
    /// where `xhat = (x - mean) * inv` and `du = dz * [u > 0]`.
    #[inline]
    fn add_sums(&self, x: &[f32], dz: &[f32], sum_du: &mut [f32], sum_du_xhat: &mut [f32]) {
        let len = x.len();
        let (dz, sum_du, sum_du_xhat) = (&dz[..len], &mut sum_du[..len], &mut sum_du_xhat[..len]);
        let (scale, shift) = (&self.scale[..len], &self.shift[..len]);
        let (mean, inv) = (&self.mean[..len], &self.inv[..len]);
        for j in 0..len {
            let u = x[j] * scale[j] + shift[j];
            let du = relu_gradient(u, dz[j]);
            let xhat = (x[j] - mean[j]) * inv[j];
            sum_du[j] += du;
            sum_du_xhat[j] += du * xhat;
        }
    }

    /// Writes `dx = scale * (du - mean_du - xhat * mean_du_xhat)` for one
    /// pixel, where `xhat = (x - mean) * inv` and `du = dz * [u > 0]`.
    #[inline]
    fn backward(&self, x: &[f32], dz: &[f32], means: (&[f32], &[f32]), dx: &mut [f32]) {
        let len = x.len();
        let (dz, dx) = (&dz[..len], &mut dx[..len]);
        let (mean_du, mean_du_xhat) = (&means.0[..len], &means.1[..len]);
        let (scale, shift) = (&self.scale[..len], &self.shift[..len]);
        let (mean, inv) = (&self.mean[..len], &self.inv[..len]);
        for j in 0..len {
            let u = x[j] * scale[j] + shift[j];
            let du = relu_gradient(u, dz[j]);
            let xhat = (x[j] - mean[j]) * inv[j];
            dx[j] = scale[j] * (du - mean_du[j] - xhat * mean_du_xhat[j]);
        }
    }
}

/// `y = conv(relu(bn(concat(x))), w)`, computing `z` block by block.
pub fn bn_relu_conv(shape: &ConvShape, input: &BnRelu, w: &[f32], y: &mut [f32]) {
    conv::conv2d_over(shape, &Normaliser::new(input), w, y);
}

/// `dw = im2col(z)^T * dy`, a `[k*k*C, cout]` matrix, computing `z` block by
/// block.
///
/// NOTE: this recomputes `z`, which the unfused `conv2d_backward_filter` reads
/// from the forward pass. The fused batch-norm gradients save more than that.
pub fn bn_relu_conv_backward_filter(shape: &ConvShape, input: &BnRelu, dy: &[f32], dw: &mut [f32]) {
    conv::conv2d_backward_filter_over(shape, &Normaliser::new(input), dy, dw);
}

/// Adds, for every channel of pixels `first .. first + rows`, `du` to
/// `sums[ch]` and `du * xhat` to `sums[C + ch]`. `dz` contains the
/// block's `[rows, C]` rows. Each run of `RUN_PIXELS` pixels is summed in f32 and
/// then added to the f64 sums.
fn add_masked_sums(norm: &Normaliser, first: usize, dz: &[f32], sums: &mut [f64]) {
    let c = norm.width;
    let parts = norm.parts(first, dz.len() / c);
    let mut run = vec![0f32; 2 * c];
    for (index, dz_run) in dz.chunks(RUN_PIXELS * c).enumerate() {
        run.fill(0.0);
        let (run_du, run_du_xhat) = run.split_at_mut(c);
        for (r, dz_row) in dz_run.chunks_exact(c).enumerate() {
            let r = index * RUN_PIXELS + r;
            for part in &parts {
                let range = part.range.clone();
                part.coef.add_sums(
                    part.row(r),
                    &dz_row[range.clone()],
                    &mut run_du[range.clone()],
                    &mut run_du_xhat[range],
                );
            }
        }
        for (s, r) in sums.iter_mut().zip(&run) {
            *s += *r as f64;
        }
    }
}

/// Per-channel `[sum du; sum du * xhat]` over the batch, as `2 * C` values.
fn masked_sums(norm: &Normaliser, dz: &[f32]) -> Vec<f64> {
    let c = norm.width;
    if c == 0 {
        return Vec::new();
    }
    let partials: Vec<Vec<f64>> = dz
        .par_chunks(BLOCK_ROWS * c)
        .enumerate()
        .map(|(block, dz)| {
            let mut acc = vec![0f64; 2 * c];
            add_masked_sums(norm, block * BLOCK_ROWS, dz, &mut acc);
            acc
        })
        .collect();

    let mut sums = vec![0f64; 2 * c];
    for partial in partials {
        for (s, p) in sums.iter_mut().zip(&partial) {
            *s += p;
        }
    }
    sums
}

/// Views all columns of a `[pixels, c]` gradient.
fn all_columns(dz: &[f32], c: usize) -> Columns<'_> {
    Columns {
        data: dz,
        width: c,
        start: 0,
    }
}

/// `y[img, ch] = mean over the pixels of relu(bn(x))`, one rayon task per
/// image. Each task rectifies `BLOCK_ROWS` pixels at a time into a small
/// scratch buffer and adds them up in f64, so the result does not depend on
/// the thread count.
pub fn bn_relu_global_avg_pool(input: &BnRelu, y: &mut [f32]) {
    let norm = Normaliser::new(input);
    let c = norm.width;
    if c == 0 || y.is_empty() {
        return;
    }
    let pixels = input.pixels / (y.len() / c);
    y.par_chunks_mut(c).enumerate().for_each(|(img, out)| {
        let mut acc = vec![0f64; c];
        let mut z = vec![0f32; BLOCK_ROWS.min(pixels) * c];
        let mut done = 0;
        while done < pixels {
            let rows = BLOCK_ROWS.min(pixels - done);
            let block = &mut z[..rows * c];
            norm.rectify_block(img * pixels + done, block);
            for row in block.chunks_exact(c) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += *v as f64;
                }
            }
            done += rows;
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = (a / pixels as f64) as f32;
        }
    });
}

/// `y = avg_pool(relu(bn(x)))`, one rayon task per image: each rectifies its
/// image into a scratch buffer and pools it with the fast average pool, so
/// each scratch buffer contains one image, never the batch.
pub fn bn_relu_avg_pool(shape: &PoolShape, input: &BnRelu, y: &mut [f32]) {
    let norm = Normaliser::new(input);
    let c = norm.width;
    let win = &shape.win;
    let (big, small) = (win.big_h * win.big_w, win.small_h * win.small_w);
    if c == 0 || small == 0 {
        return;
    }
    let mut one = *shape;
    one.win.n = 1;
    y.par_chunks_mut(small * c)
        .enumerate()
        .for_each(|(img, out)| {
            let mut z = vec![0f32; big * c];
            norm.rectify_block(img * big, &mut z);
            super::pool::avg_pool(&one, &z, out);
        });
}

/// Gradient of `z = relu(bn(x))` with respect to the concatenation `x`, with
/// batch statistics: `dx = gamma * inv / m * (m * du - sum du - xhat * sum(du * xhat))`
/// over the `m` pixels of the batch, where `du = dz * [u > 0]`.
pub fn bn_relu_backward(input: &BnRelu, dz: &[f32], dx: &mut [f32]) {
    let norm = Normaliser::new(input);
    let c = norm.width;
    if c == 0 {
        return;
    }
    let m = input.pixels as f64;
    let sums = masked_sums(&norm, dz);
    let mean_du: Vec<f32> = sums[..c].iter().map(|s| (s / m) as f32).collect();
    let mean_du_xhat: Vec<f32> = sums[c..].iter().map(|s| (s / m) as f32).collect();
    write_backward(&norm, (&mean_du, &mean_du_xhat), all_columns(dz, c), dx);
}

/// [`bn_relu_backward`] with `dz` read from columns `dz.start ..` of a wider
/// matrix and the sums taken from `daffine = [sum du * xhat; sum du]`, the
/// affine gradient of `input`'s channels, as `BnReluBackwardPart` needs. It
/// is one pass over the inputs and those columns of `dz`, so the gradient of
/// the whole concatenation is never written.
pub fn bn_relu_backward_part(input: &BnRelu, daffine: &[f32], dz: Columns, dx: &mut [f32]) {
    let norm = Normaliser::new(input);
    let c = norm.width;
    if c == 0 {
        return;
    }
    let m = input.pixels as f64;
    let mean = |sum: &[f32]| -> Vec<f32> { sum.iter().map(|&s| (s as f64 / m) as f32).collect() };
    let (mean_du_xhat, mean_du) = (mean(&daffine[..c]), mean(&daffine[c..2 * c]));
    write_backward(&norm, (&mean_du, &mean_du_xhat), dz, dx);
}

/// Writes `dx = scale * (du - mean_du - xhat * mean_du_xhat)` for every
/// pixel, one rayon task per `BLOCK_ROWS` pixels, reading columns
/// `dz.start ..` of `dz`.
fn write_backward(norm: &Normaliser, means: (&[f32], &[f32]), dz: Columns, dx: &mut [f32]) {
    let c = norm.width;
    dx.par_chunks_mut(BLOCK_ROWS * c)
        .zip(dz.data.par_chunks(BLOCK_ROWS * dz.width))
        .enumerate()
        .for_each(|(block, (dx, dz_block))| {
            let parts: Vec<_> = norm
                .parts(block * BLOCK_ROWS, dx.len() / c)
                .into_iter()
                .map(|part| {
                    let range = part.range.clone();
                    let means = (&means.0[range.clone()], &means.1[range]);
                    (part, means)
                })
                .collect();
            let rows = dx.chunks_exact_mut(c).zip(dz_block.chunks_exact(dz.width));
            for (r, (dx_row, dz_row)) in rows.enumerate() {
                let dz_row = &dz_row[dz.start..dz.start + c];
                for (part, means) in &parts {
                    let range = part.range.clone();
                    let (dz, dx) = (&dz_row[range.clone()], &mut dx_row[range]);
                    part.coef.backward(part.row(r), dz, *means, dx);
                }
            }
        });
}

/// Gradient of `z = relu(bn(x))` with respect to the affine parameters:
/// `dgamma = sum du * xhat` (row 0) and `dbeta = sum du` (row 1), where
/// `du = dz * [u > 0]`.
pub fn bn_relu_affine_grad(input: &BnRelu, dz: &[f32], grad: &mut [f32]) {
    let norm = Normaliser::new(input);
    let c = norm.width;
    let sums = masked_sums(&norm, dz);
    for ch in 0..c {
        grad[ch] = sums[c + ch] as f32;
        grad[c + ch] = sums[ch] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two inputs of 1 and 2 channels over 2 pixels. Channel 1 has gamma 2
    /// and beta -1, and the others are the identity (eps 0, variance 1).
    fn two_inputs() -> BnRelu<'static> {
        BnRelu {
            parts: vec![&[-1.0, 3.0], &[1.0, 2.0, 4.0, 5.0]],
            channels: vec![1, 2],
            pixels: 2,
            stats: &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            affine: &[1.0, 2.0, 1.0, 0.0, -1.0, 0.0],
            eps: 0.0,
        }
    }

    #[test]
    fn rectify_reads_each_input_slice() {
        let input = two_inputs();
        let norm = Normaliser::new(&input);
        let mut z = [9.0; 6];
        norm.rectify_block(0, &mut z);
        assert_eq!(z, [0.0, 1.0, 2.0, 3.0, 7.0, 5.0]);
        let mut z = [9.0; 3];
        norm.rectify_block(1, &mut z);
        assert_eq!(z, [3.0, 7.0, 5.0]);
    }

    #[test]
    fn affine_grad_masks_negative_outputs() {
        // u = [[-1, 1, 2], [3, 7, 5]], so only pixel 0 of channel 0 is masked.
        let input = two_inputs();
        let mut grad = [0.0; 6];
        bn_relu_affine_grad(&input, &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0], &mut grad);
        assert_eq!(grad, [6.0, 9.0, 12.0, 2.0, 3.0, 3.0]);
    }
}
