//! Reference kernels: plain loops with f64 accumulation and no threads,
//! written to be obviously correct. They are the oracle that the fast set
//! and the finite-difference gradient tests are checked against.

pub(crate) mod conv;
pub(crate) mod dense;
pub(crate) mod elementwise;
pub(crate) mod fold;
pub(crate) mod fused;
pub(crate) mod norm;
pub(crate) mod pool;

pub use dense::LossSpec;

use super::dispatch::{self, BnRelu, Columns, Kernels};
use super::layout::{ConvShape, PoolShape};
use super::{Ctx, In, KernelError};
use ldnc_ir::{Op, TensorType};

/// Computes `op` with the reference kernels; see [`super::KernelSet::compute`].
pub fn compute(
    op: &Op,
    inputs: &[In],
    out: &mut [f32],
    out_ty: &TensorType,
    ctx: &Ctx,
) -> Result<(), KernelError> {
    dispatch::compute(&Reference, op, inputs, out, out_ty, ctx)
}

/// The reference set.
pub(crate) struct Reference;

impl Kernels for Reference {
    const NAME: &'static str = "reference";

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
        elementwise::relu(x, y)
    }
    fn relu_backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        elementwise::relu_backward(x, dy, dx)
    }
    fn mul(&self, parts: &[&[f32]], y: &mut [f32]) {
        elementwise::mul(parts, y)
    }
    fn sum(&self, parts: &[&[f32]], y: &mut [f32]) {
        elementwise::sum(parts, y)
    }
    fn scale(&self, x: &[f32], factor: f32, y: &mut [f32]) {
        elementwise::scale(x, factor, y)
    }
    fn dropout_mask(&self, seed: u64, p: f32, y: &mut [f32]) {
        elementwise::dropout_mask(seed, p, 0, y)
    }
    fn concat(&self, parts: &[&[f32]], channels: &[usize], y: &mut [f32]) {
        elementwise::concat(parts, channels, y)
    }
    fn slice(&self, x: &[f32], c: usize, start: usize, len: usize, y: &mut [f32]) {
        elementwise::slice(x, c, start, len, y)
    }
    fn crop(&self, x: &[f32], src: (usize, usize, usize), h: usize, w: usize, y: &mut [f32]) {
        elementwise::crop(x, src, h, w, y)
    }
    fn crop_backward(
        &self,
        dy: &[f32],
        src: (usize, usize, usize),
        h: usize,
        w: usize,
        dx: &mut [f32],
    ) {
        elementwise::crop_backward(dy, src, h, w, dx)
    }
    fn sum_batch(&self, x: &[f32], y: &mut [f32]) {
        elementwise::sum_batch(x, y)
    }

    fn concat_stats(&self, parts: &[&[f32]], channels: &[usize], stats: &mut [f32]) {
        fused::concat_stats(parts, channels, stats)
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
        fold::bn_fold_weight(w, running, affine, eps, out)
    }
    fn bn_fold_bias(&self, running: &[f32], affine: &[f32], eps: f32, bias: &mut [f32]) {
        fold::bn_fold_bias(running, affine, eps, bias)
    }
    fn bias_relu(&self, y: &mut [f32], bias: &[f32], relu: bool) {
        fold::bias_relu(y, bias, relu)
    }
}
