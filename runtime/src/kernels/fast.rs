//! Fast kernels: NHWC data, GEMMs from the `gemm` crate for convolutions and
//! linear layers, and rayon over images, pixel blocks or row blocks for the
//! rest. Every kernel computes the formula of its reference counterpart, up to
//! f32 rounding and summation order.
//!
//! Element-wise ops and channel or spatial copies run the reference loops on
//! disjoint chunks in parallel, because those loops are already bound by
//! memory bandwidth.

mod conv;
mod dense;
mod fused;
mod matmul;
mod norm;
mod pool;

use super::dispatch::{self, BnRelu, Columns, Kernels};
use super::layout::{ConvShape, PoolShape};
use super::reference::elementwise as ew;
use super::reference::fold as reference_fold;
use super::reference::fused as reference_fused;
use super::reference::LossSpec;
use super::{Ctx, In, KernelError};
use ldnc_ir::{Op, TensorType};
use rayon::prelude::*;

/// Elements per rayon task in element-wise ops.
const CHUNK: usize = 1 << 14;

/// Computes `op` with the fast kernels; see [`super::KernelSet::compute`].
pub fn compute(
    op: &Op,
    inputs: &[In],
    out: &mut [f32],
    out_ty: &TensorType,
    ctx: &Ctx,
) -> Result<(), KernelError> {
    dispatch::compute(&Fast, op, inputs, out, out_ty, ctx)
}

/// Runs `f(chunk_index, parts_chunks, out_chunk)` over aligned chunks of
/// `chunk` elements of every operand and the output, in parallel.
fn par_zip(
    parts: &[&[f32]],
    y: &mut [f32],
    chunk: usize,
    f: impl Fn(&[&[f32]], &mut [f32]) + Sync,
) {
    y.par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, out)| {
            let start = i * chunk;
            let sub: Vec<&[f32]> = parts.iter().map(|p| &p[start..start + out.len()]).collect();
            f(&sub, out);
        });
}

/// The fast set.
pub(crate) struct Fast;

impl Kernels for Fast {
    const NAME: &'static str = "fast";

    fn conv2d(&self, shape: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
        conv::conv2d(shape, x, w, y)
    }
    fn conv2d_backward_data(&self, shape: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
        conv::conv2d_backward_data(shape, dy, w, dx)
    }
    fn conv2d_backward_filter(&self, shape: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
        conv::conv2d_backward_filter(shape, x, dy, dw)
    }
    fn conv_transpose2d(&self, shape: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
        conv::conv_transpose2d(shape, x, w, y)
    }
    fn conv_transpose2d_backward_data(
        &self,
        shape: &ConvShape,
        dy: &[f32],
        w: &[f32],
        dx: &mut [f32],
    ) {
        conv::conv_transpose2d_backward_data(shape, dy, w, dx)
    }
    fn conv_transpose2d_backward_filter(
        &self,
        shape: &ConvShape,
        x: &[f32],
        dy: &[f32],
        dw: &mut [f32],
    ) {
        conv::conv_transpose2d_backward_filter(shape, x, dy, dw)
    }

    fn bn_stats(&self, x: &[f32], c: usize, stats: &mut [f32]) {
        norm::bn_stats(x, c, stats)
    }
    fn bn_apply(&self, x: &[f32], stats: &[f32], affine: &[f32], eps: f32, y: &mut [f32]) {
        norm::bn_apply(x, stats, affine, eps, y)
    }
    fn bn_backward(
        &self,
        x: &[f32],
        stats: &[f32],
        affine: &[f32],
        dy: &[f32],
        eps: f32,
        dx: &mut [f32],
    ) {
        norm::bn_backward(x, stats, affine, dy, eps, dx)
    }
    fn bn_affine_grad(&self, x: &[f32], stats: &[f32], dy: &[f32], eps: f32, grad: &mut [f32]) {
        norm::bn_affine_grad(x, stats, dy, eps, grad)
    }

    fn avg_pool(&self, shape: &PoolShape, x: &[f32], y: &mut [f32]) {
        pool::avg_pool(shape, x, y)
    }
    fn avg_pool_backward(&self, shape: &PoolShape, dy: &[f32], dx: &mut [f32]) {
        pool::avg_pool_backward(shape, dy, dx)
    }
    fn max_pool(&self, shape: &PoolShape, x: &[f32], y: &mut [f32]) {
        pool::max_pool(shape, x, y)
    }
    fn max_pool_backward(&self, shape: &PoolShape, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        pool::max_pool_backward(shape, x, dy, dx)
    }
    fn global_avg_pool(&self, x: &[f32], c: usize, y: &mut [f32]) {
        pool::global_avg_pool(x, c, y)
    }
    fn global_avg_pool_backward(&self, dy: &[f32], c: usize, dx: &mut [f32]) {
        pool::global_avg_pool_backward(dy, c, dx)
    }

    fn linear(&self, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
        dense::linear(x, w, b, y)
    }
    fn linear_backward_data(&self, dy: &[f32], w: &[f32], k: usize, dx: &mut [f32]) {
        dense::linear_backward_data(dy, w, k, dx)
    }
    fn linear_backward_weight(&self, x: &[f32], dy: &[f32], c: usize, k: usize, dw: &mut [f32]) {
        dense::linear_backward_weight(x, dy, c, k, dw)
    }
    fn softmax_cross_entropy(
        &self,
        op: &Op,
        logits: &[f32],
        labels: &[f32],
        spec: LossSpec,
    ) -> Result<f32, KernelError> {
        dense::softmax_cross_entropy(op, logits, labels, spec)
    }
    fn softmax_cross_entropy_backward(
        &self,
        op: &Op,
        logits: &[f32],
        labels: &[f32],
        spec: LossSpec,
        weight: f32,
        grad: &mut [f32],
    ) -> Result<(), KernelError> {
        dense::softmax_cross_entropy_backward(op, logits, labels, spec, weight, grad)
    }

    fn relu(&self, x: &[f32], y: &mut [f32]) {
        par_zip(&[x], y, CHUNK, |p, out| ew::relu(p[0], out))
    }
    fn relu_backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        par_zip(&[x, dy], dx, CHUNK, |p, out| {
            ew::relu_backward(p[0], p[1], out)
        })
    }
    fn mul(&self, parts: &[&[f32]], y: &mut [f32]) {
        par_zip(parts, y, CHUNK, ew::mul)
    }
    fn sum(&self, parts: &[&[f32]], y: &mut [f32]) {
        par_zip(parts, y, CHUNK, ew::sum)
    }
    fn scale(&self, x: &[f32], factor: f32, y: &mut [f32]) {
        par_zip(&[x], y, CHUNK, |p, out| ew::scale(p[0], factor, out))
    }
    fn dropout_mask(&self, seed: u64, p: f32, y: &mut [f32]) {
        y.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, out)| ew::dropout_mask(seed, p, i * CHUNK, out));
    }
    fn concat(&self, parts: &[&[f32]], channels: &[usize], y: &mut [f32]) {
        let total: usize = channels.iter().sum();
        let pixels = CHUNK / total.max(1) + 1;
        y.par_chunks_mut(pixels * total.max(1))
            .enumerate()
            .for_each(|(i, out)| {
                let rows = out.len() / total.max(1);
                let sub: Vec<&[f32]> = parts
                    .iter()
                    .zip(channels)
                    .map(|(p, &c)| &p[i * pixels * c..(i * pixels + rows) * c])
                    .collect();
                ew::concat(&sub, channels, out);
            });
    }
    fn slice(&self, x: &[f32], c: usize, start: usize, len: usize, y: &mut [f32]) {
        let pixels = CHUNK / c.max(1) + 1;
        y.par_chunks_mut(pixels * len.max(1))
            .zip(x.par_chunks(pixels * c.max(1)))
            .for_each(|(out, part)| ew::slice(part, c, start, len, out));
    }
    fn crop(&self, x: &[f32], src: (usize, usize, usize), h: usize, w: usize, y: &mut [f32]) {
        let (sh, sw, c) = src;
        y.par_chunks_mut((h * w * c).max(1))
            .zip(x.par_chunks((sh * sw * c).max(1)))
            .for_each(|(out, image)| ew::crop(image, src, h, w, out));
    }
    fn crop_backward(
        &self,
        dy: &[f32],
        src: (usize, usize, usize),
        h: usize,
        w: usize,
        dx: &mut [f32],
    ) {
        let (sh, sw, c) = src;
        dx.par_chunks_mut((h * w * c).max(1))
            .zip(dy.par_chunks((sh * sw * c).max(1)))
            .for_each(|(out, image)| ew::crop_backward(image, src, h, w, out));
    }
    fn sum_batch(&self, x: &[f32], y: &mut [f32]) {
        // Bias gradients are small (batch x units), so the serial loop is enough.
        ew::sum_batch(x, y)
    }

    fn concat_stats(&self, parts: &[&[f32]], channels: &[usize], stats: &mut [f32]) {
        // A copy of 2 * C values, too small to split.
        reference_fused::concat_stats(parts, channels, stats)
    }
    fn bn_relu_conv(&self, shape: &ConvShape, input: &BnRelu, w: &[f32], y: &mut [f32]) {
        fused::bn_relu_conv(shape, input, w, y)
    }
    fn bn_relu_conv_backward_filter(
        &self,
        shape: &ConvShape,
        input: &BnRelu,
        dy: &[f32],
        dw: &mut [f32],
    ) {
        fused::bn_relu_conv_backward_filter(shape, input, dy, dw)
    }
    fn bn_relu_backward(&self, input: &BnRelu, dz: &[f32], dx: &mut [f32]) {
        fused::bn_relu_backward(input, dz, dx)
    }
    fn bn_relu_backward_part(&self, input: &BnRelu, daffine: &[f32], dz: Columns, dx: &mut [f32]) {
        fused::bn_relu_backward_part(input, daffine, dz, dx)
    }
    fn bn_relu_affine_grad(&self, input: &BnRelu, dz: &[f32], grad: &mut [f32]) {
        fused::bn_relu_affine_grad(input, dz, grad)
    }

    fn bn_relu_global_avg_pool(&self, input: &BnRelu, y: &mut [f32]) {
        fused::bn_relu_global_avg_pool(input, y)
    }

    fn bn_relu_avg_pool(&self, shape: &PoolShape, input: &BnRelu, y: &mut [f32]) {
        fused::bn_relu_avg_pool(shape, input, y)
    }

    fn bn_fold_weight(
        &self,
        w: &[f32],
        running: &[f32],
        affine: &[f32],
        eps: f32,
        out: &mut [f32],
    ) {
        // One pass over a weight tensor, once per evaluation pass because
        // evaluation freezes the program, so it is too small to split.
        reference_fold::bn_fold_weight(w, running, affine, eps, out)
    }
    fn bn_fold_bias(&self, running: &[f32], affine: &[f32], eps: f32, bias: &mut [f32]) {
        reference_fold::bn_fold_bias(running, affine, eps, bias)
    }
    fn bias_relu(&self, y: &mut [f32], bias: &[f32], relu: bool) {
        // Chunks of whole rows, so every chunk starts at channel 0.
        let c = bias.len().max(1);
        y.par_chunks_mut((CHUNK / c + 1) * c)
            .for_each(|rows| reference_fold::bias_relu(rows, bias, relu));
    }
}
