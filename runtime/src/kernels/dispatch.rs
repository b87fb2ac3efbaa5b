//! Maps an op and its operands to one kernel call, for either kernel set.
//!
//! Both sets implement [`Kernels`], one method per kernel on plain slices, so
//! the operand checks and the geometry are written once here and the sets
//! differ only in how they compute.

use super::layout::{check_operands, hwc, invalid, ConvShape, PoolShape};
use super::reference::LossSpec;
use super::{Ctx, In, KernelError};
use ldnc_ir::{Op, TensorType};

/// One method per kernel; the doc comments of the reference set state each
/// formula.
pub(crate) trait Kernels {
    /// Name of the set in error messages.
    const NAME: &'static str;

    fn conv2d(&self, shape: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]);
    fn conv2d_backward_data(&self, shape: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]);
    fn conv2d_backward_filter(&self, shape: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]);
    fn conv_transpose2d(&self, shape: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]);
    fn conv_transpose2d_backward_data(
        &self,
        shape: &ConvShape,
        dy: &[f32],
        w: &[f32],
        dx: &mut [f32],
    );
    fn conv_transpose2d_backward_filter(
        &self,
        shape: &ConvShape,
        x: &[f32],
        dy: &[f32],
        dw: &mut [f32],
    );

    fn bn_stats(&self, x: &[f32], c: usize, stats: &mut [f32]);
    fn bn_apply(&self, x: &[f32], stats: &[f32], affine: &[f32], eps: f32, y: &mut [f32]);
    fn bn_backward(
        &self,
        x: &[f32],
        stats: &[f32],
        affine: &[f32],
        dy: &[f32],
        eps: f32,
        dx: &mut [f32],
    );
    fn bn_affine_grad(&self, x: &[f32], stats: &[f32], dy: &[f32], eps: f32, grad: &mut [f32]);

    fn avg_pool(&self, shape: &PoolShape, x: &[f32], y: &mut [f32]);
    fn avg_pool_backward(&self, shape: &PoolShape, dy: &[f32], dx: &mut [f32]);
    fn max_pool(&self, shape: &PoolShape, x: &[f32], y: &mut [f32]);
    fn max_pool_backward(&self, shape: &PoolShape, x: &[f32], dy: &[f32], dx: &mut [f32]);
    fn global_avg_pool(&self, x: &[f32], c: usize, y: &mut [f32]);
    fn global_avg_pool_backward(&self, dy: &[f32], c: usize, dx: &mut [f32]);

    fn linear(&self, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]);
    fn linear_backward_data(&self, dy: &[f32], w: &[f32], k: usize, dx: &mut [f32]);
    fn linear_backward_weight(&self, x: &[f32], dy: &[f32], c: usize, k: usize, dw: &mut [f32]);
    fn softmax_cross_entropy(
        &self,
        op: &Op,
        logits: &[f32],
        labels: &[f32],
        spec: LossSpec,
    ) -> Result<f32, KernelError>;
    fn softmax_cross_entropy_backward(
        &self,
        op: &Op,
        logits: &[f32],
        labels: &[f32],
        spec: LossSpec,
        weight: f32,
        grad: &mut [f32],
    ) -> Result<(), KernelError>;

    fn relu(&self, x: &[f32], y: &mut [f32]);
    fn relu_backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]);
    fn mul(&self, parts: &[&[f32]], y: &mut [f32]);
    fn sum(&self, parts: &[&[f32]], y: &mut [f32]);
    fn scale(&self, x: &[f32], factor: f32, y: &mut [f32]);
    fn dropout_mask(&self, seed: u64, p: f32, y: &mut [f32]);
    fn concat(&self, parts: &[&[f32]], channels: &[usize], y: &mut [f32]);
    fn slice(&self, x: &[f32], c: usize, start: usize, len: usize, y: &mut [f32]);
    fn crop(&self, x: &[f32], src: (usize, usize, usize), h: usize, w: usize, y: &mut [f32]);
    fn crop_backward(
        &self,
        dy: &[f32],
        src: (usize, usize, usize),
        h: usize,
        w: usize,
        dx: &mut [f32],
    );
    fn sum_batch(&self, x: &[f32], y: &mut [f32]);

    fn concat_stats(&self, parts: &[&[f32]], channels: &[usize], stats: &mut [f32]);
    fn bn_relu_conv(&self, shape: &ConvShape, input: &BnRelu, w: &[f32], y: &mut [f32]);
    fn bn_relu_conv_backward_filter(
        &self,
        shape: &ConvShape,
        input: &BnRelu,
        dy: &[f32],
        dw: &mut [f32],
    );
    fn bn_relu_backward(&self, input: &BnRelu, dz: &[f32], dx: &mut [f32]);
    fn bn_relu_backward_part(&self, input: &BnRelu, daffine: &[f32], dz: Columns, dx: &mut [f32]);
    fn bn_relu_affine_grad(&self, input: &BnRelu, dz: &[f32], grad: &mut [f32]);
    fn bn_relu_global_avg_pool(&self, input: &BnRelu, y: &mut [f32]);
    fn bn_relu_avg_pool(&self, shape: &PoolShape, input: &BnRelu, y: &mut [f32]);

    fn bn_fold_weight(&self, w: &[f32], running: &[f32], affine: &[f32], eps: f32, out: &mut [f32]);
    fn bn_fold_bias(&self, running: &[f32], affine: &[f32], eps: f32, bias: &mut [f32]);
    fn bias_relu(&self, y: &mut [f32], bias: &[f32], relu: bool);
}

/// The operands every fused BN-ReLU kernel reads: the inputs of a channel
/// concatenation, each in its own buffer, and the batch norm of the whole
/// concatenation. The kernels compute `z = relu(bn(concat(parts)))` where
/// they need it.
pub(crate) struct BnRelu<'a> {
    /// Input `i` as a `[pixels, channels[i]]` matrix.
    pub parts: Vec<&'a [f32]>,
    pub channels: Vec<usize>,
    /// Pixels over the whole batch (`n * h * w`), the rows of every part.
    pub pixels: usize,
    /// `[2, C]` mean and biased variance of the concatenation per channel.
    pub stats: &'a [f32],
    /// `[2, C]` gamma and beta.
    pub affine: &'a [f32],
    pub eps: f32,
}

impl BnRelu<'_> {
    /// Channels of the concatenation.
    pub fn width(&self) -> usize {
        self.channels.iter().sum()
    }
}

/// Columns `start .. start + input.width()` of a `[pixels, width]` matrix:
/// the part of a concatenation's gradient that belongs to the inputs of a
/// `BnRelu`.
#[derive(Clone, Copy)]
pub(crate) struct Columns<'a> {
    pub data: &'a [f32],
    pub width: usize,
    pub start: usize,
}

/// Returns `Invalid` with `message` unless `ok`.
fn require(op: &Op, ok: bool, message: impl FnOnce() -> String) -> Result<(), KernelError> {
    if ok {
        Ok(())
    } else {
        Err(invalid(op, message()))
    }
}

/// Checks that a conv weight is `[k, k, cin, cout]` for `shape`.
fn check_weight(op: &Op, w: &TensorType, shape: &ConvShape) -> Result<(), KernelError> {
    let k = shape.win.k;
    let want = [k, k, shape.cin, shape.cout];
    require(op, !w.batched && w.dims == want, || {
        format!("weight is {w}, expected {want:?}")
    })
}

/// Checks that a conv bias is `[cout]`.
fn check_bias(op: &Op, b: &TensorType, cout: usize) -> Result<(), KernelError> {
    require(op, !b.batched && b.dims == [cout], || {
        format!("bias is {b}, expected [{cout}]")
    })
}

/// Checks that batch-norm statistics or affine parameters are `[2, c]`.
fn check_rows(op: &Op, t: &TensorType, c: usize, what: &str) -> Result<(), KernelError> {
    require(op, !t.batched && t.dims == [2, c], || {
        format!("{what} is {t}, expected [2, {c}]")
    })
}

/// Checks that `t` is a batched vector (`[N, len]`), the operand form of a
/// linear layer, and returns its length.
fn check_vector(op: &Op, t: &TensorType, what: &str) -> Result<usize, KernelError> {
    require(op, t.batched && t.dims.len() == 1, || {
        format!("{what} is {t}, expected [N, C]")
    })?;
    Ok(t.dims[0])
}

/// Checks the operands of a softmax cross-entropy, `(logits, labels)` plus
/// the class weights when `weighted`, and returns its class spec.
fn loss_spec<'a>(
    op: &Op,
    inputs: &[In<'a>],
    ignore: Option<u32>,
    weighted: bool,
) -> Result<LossSpec<'a>, KernelError> {
    let expected = if weighted { 3 } else { 2 };
    require(op, inputs.len() == expected, || {
        format!("{} operands, expected {expected}", inputs.len())
    })?;
    let (logits, labels) = (inputs[0].ty, inputs[1].ty);
    let k = logits.channels();
    require(
        op,
        labels.dims[..] == logits.dims[..logits.dims.len().saturating_sub(1)],
        || format!("labels {labels} do not match logits {logits}"),
    )?;
    let class_weights = weighted.then(|| inputs[2].data);
    if let Some(w) = class_weights {
        require(op, w.len() == k, || {
            format!("{} class weights for {k} classes", w.len())
        })?;
    }
    Ok(LossSpec {
        classes: k,
        ignore,
        class_weights,
    })
}

/// Checks the operands and runs the kernel of `op` from set `K`.
pub(crate) fn compute<K: Kernels>(
    set: &K,
    op: &Op,
    inputs: &[In],
    out: &mut [f32],
    out_ty: &TensorType,
    ctx: &Ctx,
) -> Result<(), KernelError> {
    check_operands(op, inputs, out, out_ty, ctx, K::NAME)?;
    let n = ctx.n;
    let data = |i: usize| inputs[i].data;
    let ty = |i: usize| inputs[i].ty;
    let parts = || inputs.iter().map(|x| x.data).collect::<Vec<_>>();

    match op {
        Op::Conv2d { k, stride, pad } => {
            let shape = ConvShape::conv(op, ty(0), out_ty, (*k, *stride, *pad), n)?;
            check_weight(op, ty(1), &shape)?;
            set.conv2d(&shape, data(0), data(1), out);
        }
        Op::Conv2dBackwardData { k, stride, pad, .. } => {
            let shape = ConvShape::conv(op, out_ty, ty(0), (*k, *stride, *pad), n)?;
            check_weight(op, ty(1), &shape)?;
            set.conv2d_backward_data(&shape, data(0), data(1), out);
        }
        Op::Conv2dBackwardFilter { k, stride, pad } => {
            let shape = ConvShape::conv(op, ty(0), ty(1), (*k, *stride, *pad), n)?;
            set.conv2d_backward_filter(&shape, data(0), data(1), out);
        }
        Op::ConvTranspose2d { k, stride, pad, .. } => {
            let shape = ConvShape::transposed(op, ty(0), out_ty, (*k, *stride, *pad), n)?;
            check_weight(op, ty(1), &shape)?;
            set.conv_transpose2d(&shape, data(0), data(1), out);
        }
        Op::ConvTranspose2dBackwardData { k, stride, pad } => {
            let shape = ConvShape::transposed(op, out_ty, ty(0), (*k, *stride, *pad), n)?;
            check_weight(op, ty(1), &shape)?;
            set.conv_transpose2d_backward_data(&shape, data(0), data(1), out);
        }
        Op::ConvTranspose2dBackwardFilter { k, stride, pad } => {
            let shape = ConvShape::transposed(op, ty(0), ty(1), (*k, *stride, *pad), n)?;
            set.conv_transpose2d_backward_filter(&shape, data(0), data(1), out);
        }

        Op::BnStats => {
            require(op, !data(0).is_empty(), || {
                format!("no elements to average in {}", ty(0))
            })?;
            set.bn_stats(data(0), ty(0).channels(), out);
        }
        Op::BnApply { eps } => set.bn_apply(data(0), data(1), data(2), *eps, out),
        Op::BnBackward { eps } => {
            let c = ty(0).channels();
            check_rows(op, ty(1), c, "statistics")?;
            check_rows(op, ty(2), c, "affine")?;
            require(op, ty(3) == ty(0), || {
                format!("gradient {} differs from input {}", ty(3), ty(0))
            })?;
            set.bn_backward(data(0), data(1), data(2), data(3), *eps, out);
        }
        Op::BnAffineGrad { eps } => {
            check_rows(op, ty(1), ty(0).channels(), "statistics")?;
            require(op, ty(2) == ty(0), || {
                format!("gradient {} differs from input {}", ty(2), ty(0))
            })?;
            set.bn_affine_grad(data(0), data(1), data(2), *eps, out);
        }

        Op::AvgPool { k, stride, pad } => {
            let shape = PoolShape::new(op, ty(0), out_ty, (*k, *stride, *pad), n)?;
            set.avg_pool(&shape, data(0), out);
        }
        Op::AvgPoolBackward { k, stride, pad, .. } => {
            let shape = PoolShape::new(op, out_ty, ty(0), (*k, *stride, *pad), n)?;
            set.avg_pool_backward(&shape, data(0), out);
        }
        Op::MaxPool { k, stride, pad } => {
            let shape = PoolShape::new(op, ty(0), out_ty, (*k, *stride, *pad), n)?;
            set.max_pool(&shape, data(0), out);
        }
        Op::MaxPoolBackward { k, stride, pad } => {
            let shape = PoolShape::new(op, ty(0), ty(1), (*k, *stride, *pad), n)?;
            set.max_pool_backward(&shape, data(0), data(1), out);
        }
        Op::GlobalAvgPool => set.global_avg_pool(data(0), ty(0).channels(), out),
        Op::GlobalAvgPoolBackward { .. } => {
            check_vector(op, ty(0), "gradient")?;
            set.global_avg_pool_backward(data(0), ty(0).channels(), out);
        }

        Op::Linear => set.linear(data(0), data(1), data(2), out),
        Op::LinearBackwardData => {
            let k = check_vector(op, ty(0), "gradient")?;
            let w = ty(1);
            require(
                op,
                !w.batched && w.dims.len() == 2 && w.dims[1] == k,
                || format!("weight is {w}, expected [C, {k}]"),
            )?;
            set.linear_backward_data(data(0), data(1), k, out);
        }
        Op::LinearBackwardWeight => {
            let c = check_vector(op, ty(0), "input")?;
            let k = check_vector(op, ty(1), "gradient")?;
            set.linear_backward_weight(data(0), data(1), c, k, out);
        }
        Op::SoftmaxCrossEntropy { ignore, weighted } => {
            let spec = loss_spec(op, inputs, *ignore, *weighted)?;
            out[0] = set.softmax_cross_entropy(op, data(0), data(1), spec)?;
        }
        Op::SoftmaxCrossEntropyBackward {
            weight,
            ignore,
            weighted,
        } => {
            let spec = loss_spec(op, inputs, *ignore, *weighted)?;
            set.softmax_cross_entropy_backward(op, data(0), data(1), spec, *weight, out)?;
        }

        Op::Relu => set.relu(data(0), out),
        Op::ReluBackward => set.relu_backward(data(0), data(1), out),
        Op::Mul => set.mul(&parts(), out),
        Op::Sum => set.sum(&parts(), out),
        Op::Scale { factor } => set.scale(data(0), *factor, out),
        Op::DropoutMask { p } => {
            require(op, (0.0..1.0).contains(p), || {
                format!("drop probability {p} is not in [0, 1)")
            })?;
            set.dropout_mask(ctx.seed, *p, out);
        }
        Op::Concat => {
            let channels: Vec<usize> = inputs.iter().map(|x| x.ty.channels()).collect();
            set.concat(&parts(), &channels, out);
        }
        Op::Slice { start, len } => set.slice(data(0), ty(0).channels(), *start, *len, out),
        Op::Crop { h, w } => set.crop(data(0), hwc(op, ty(0))?, *h, *w, out),
        Op::CropBackward { h, w } => {
            let src = hwc(op, ty(0))?;
            require(op, src.0 <= *h && src.1 <= *w, || {
                format!("gradient {} is larger than the {h}x{w} input", ty(0))
            })?;
            set.crop_backward(data(0), src, *h, *w, out);
        }
        Op::SumBatch => {
            require(op, ty(0).batched, || {
                format!("operand {} has no batch dimension", ty(0))
            })?;
            set.sum_batch(data(0), out);
        }

        Op::BnFoldWeight { eps } => {
            let c = ty(0).channels();
            check_rows(op, ty(1), c, "running statistics")?;
            check_rows(op, ty(2), c, "affine")?;
            set.bn_fold_weight(data(0), data(1), data(2), *eps, out);
        }
        Op::BnFoldBias { eps } => {
            let c = out_ty.channels();
            check_rows(op, ty(0), c, "running statistics")?;
            check_rows(op, ty(1), c, "affine")?;
            set.bn_fold_bias(data(0), data(1), *eps, out);
        }
        Op::Conv2dBias {
            k,
            stride,
            pad,
            relu,
        } => {
            let shape = ConvShape::conv(op, ty(0), out_ty, (*k, *stride, *pad), n)?;
            check_weight(op, ty(1), &shape)?;
            check_bias(op, ty(2), shape.cout)?;
            set.conv2d(&shape, data(0), data(1), out);
            set.bias_relu(out, data(2), *relu);
        }

        Op::ConcatStats
        | Op::BnReluGlobalAvgPool { .. }
        | Op::BnReluAvgPool { .. }
        | Op::BnReluConvBias { .. }
        | Op::BnReluConv { .. }
        | Op::BnReluConvBackwardFilter { .. }
        | Op::BnReluBackward { .. }
        | Op::BnReluBackwardPart { .. }
        | Op::BnReluAffineGrad { .. } => compute_fused(set, op, inputs, out, out_ty, n)?,

        // Leaves and updates are executed by the executor itself.
        _ => {
            return Err(KernelError::Unsupported {
                op: op.name(),
                set: K::NAME,
            })
        }
    }
    Ok(())
}

/// Checks the operands `(x_1, .., x_m, stats, affine)` of a fused BN-ReLU
/// op, without the operands that follow them. Returns them with the
/// `[h, w, C]` type of the concatenation.
fn bn_relu_operands<'a>(
    op: &Op,
    inputs: &[In<'a>],
    eps: f32,
    n: usize,
) -> Result<(BnRelu<'a>, TensorType), KernelError> {
    // `check_operands` ran the shape rule, which requires m >= 1 batched
    // inputs of one spatial size.
    let m = inputs.len() - 2;
    let (h, w, _) = hwc(op, inputs[0].ty)?;
    let channels: Vec<usize> = inputs[..m].iter().map(|x| x.ty.channels()).collect();
    let c: usize = channels.iter().sum();
    check_rows(op, inputs[m].ty, c, "statistics")?;
    check_rows(op, inputs[m + 1].ty, c, "affine")?;

    let input = BnRelu {
        parts: inputs[..m].iter().map(|x| x.data).collect(),
        channels,
        pixels: n * h * w,
        stats: inputs[m].data,
        affine: inputs[m + 1].data,
        eps,
    };
    Ok((input, TensorType::batched(&[h, w, c])))
}

/// Checks the operands and runs the fused op `op` from set `K`.
fn compute_fused<K: Kernels>(
    set: &K,
    op: &Op,
    inputs: &[In],
    out: &mut [f32],
    out_ty: &TensorType,
    n: usize,
) -> Result<(), KernelError> {
    let last = inputs.last().expect("the shape rule requires operands");
    match op {
        Op::ConcatStats => {
            let parts: Vec<&[f32]> = inputs.iter().map(|x| x.data).collect();
            let channels: Vec<usize> = inputs.iter().map(|x| x.ty.channels()).collect();
            set.concat_stats(&parts, &channels, out);
        }
        Op::BnReluConv {
            k,
            stride,
            pad,
            eps,
        } => {
            let (input, concat) = bn_relu_operands(op, &inputs[..inputs.len() - 1], *eps, n)?;
            let shape = ConvShape::conv(op, &concat, out_ty, (*k, *stride, *pad), n)?;
            check_weight(op, last.ty, &shape)?;
            set.bn_relu_conv(&shape, &input, last.data, out);
        }
        Op::BnReluGlobalAvgPool { eps } => {
            let (input, _) = bn_relu_operands(op, inputs, *eps, n)?;
            set.bn_relu_global_avg_pool(&input, out);
        }
        Op::BnReluAvgPool {
            k,
            stride,
            pad,
            eps,
        } => {
            let (input, concat) = bn_relu_operands(op, inputs, *eps, n)?;
            let shape = PoolShape::new(op, &concat, out_ty, (*k, *stride, *pad), n)?;
            set.bn_relu_avg_pool(&shape, &input, out);
        }
        Op::BnReluConvBias {
            k,
            stride,
            pad,
            eps,
            relu,
        } => {
            // The operands are those of `BnReluConv` followed by the bias.
            let conv = &inputs[..inputs.len() - 1];
            let w = conv.last().expect("the shape rule requires a weight");
            let (input, concat) = bn_relu_operands(op, &conv[..conv.len() - 1], *eps, n)?;
            let shape = ConvShape::conv(op, &concat, out_ty, (*k, *stride, *pad), n)?;
            check_weight(op, w.ty, &shape)?;
            check_bias(op, last.ty, shape.cout)?;
            set.bn_relu_conv(&shape, &input, w.data, out);
            set.bias_relu(out, last.data, *relu);
        }
        Op::BnReluConvBackwardFilter {
            k,
            stride,
            pad,
            eps,
        } => {
            let (input, concat) = bn_relu_operands(op, &inputs[..inputs.len() - 1], *eps, n)?;
            let shape = ConvShape::conv(op, &concat, last.ty, (*k, *stride, *pad), n)?;
            set.bn_relu_conv_backward_filter(&shape, &input, last.data, out);
        }
        Op::BnReluBackward { eps } | Op::BnReluAffineGrad { eps } => {
            let (input, concat) = bn_relu_operands(op, &inputs[..inputs.len() - 1], *eps, n)?;
            require(op, *last.ty == concat, || {
                format!(
                    "gradient {} differs from the concatenation {concat}",
                    last.ty
                )
            })?;
            if matches!(op, Op::BnReluBackward { .. }) {
                set.bn_relu_backward(&input, last.data, out);
            } else {
                set.bn_relu_affine_grad(&input, last.data, out);
            }
        }
        Op::BnReluBackwardPart { eps, start } => {
            backward_part(set, op, inputs, out, (*eps, *start), n)?
        }
        _ => {
            return Err(KernelError::Unsupported {
                op: op.name(),
                set: K::NAME,
            })
        }
    }
    Ok(())
}

/// Checks the operands `(x_j, .., x_k, stats, affine, daffine, dz)` of
/// `BnReluBackwardPart { eps, start }` and runs its kernel. The kernels get
/// the statistics, affine parameters and affine gradient of the inputs'
/// channels as `[2, c]` copies, because the two rows of a channel range are
/// not contiguous in the `[2, C]` operands.
fn backward_part<K: Kernels>(
    set: &K,
    op: &Op,
    inputs: &[In],
    out: &mut [f32],
    (eps, start): (f32, usize),
    n: usize,
) -> Result<(), KernelError> {
    // `check_operands` ran the shape rule, which requires m >= 1 inputs of
    // the gradient's spatial size and channels that fit within it.
    let m = inputs.len() - 4;
    let dz = &inputs[m + 3];
    let (h, w, width) = hwc(op, dz.ty)?;
    let channels: Vec<usize> = inputs[..m].iter().map(|x| x.ty.channels()).collect();
    let c: usize = channels.iter().sum();
    require(op, start + c <= width, || {
        format!("channels {start}..{} out of range for {}", start + c, dz.ty)
    })?;
    check_rows(op, inputs[m].ty, width, "statistics")?;
    check_rows(op, inputs[m + 1].ty, width, "affine")?;
    check_rows(op, inputs[m + 2].ty, width, "affine gradient")?;

    let window = |rows: &[f32]| -> Vec<f32> {
        let first = &rows[start..start + c];
        let second = &rows[width + start..width + start + c];
        [first, second].concat()
    };
    let (stats, affine) = (window(inputs[m].data), window(inputs[m + 1].data));
    let daffine = window(inputs[m + 2].data);
    let input = BnRelu {
        parts: inputs[..m].iter().map(|x| x.data).collect(),
        channels,
        pixels: n * h * w,
        stats: &stats,
        affine: &affine,
        eps,
    };
    let dz = Columns {
        data: dz.data,
        width,
        start,
    };
    set.bn_relu_backward_part(&input, &daffine, dz, out);
    Ok(())
}
