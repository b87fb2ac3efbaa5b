//! The op set of the tensor-graph IR: forward ops, the backward ops that autodiff
//! introduces, the optimizer update, and the shape rule of each.
//!
//! Batch norm is split into pure ops so that nothing has two outputs:
//! `BnStats` computes the per-channel batch mean and biased variance as a `[2, C]`
//! tensor, `BnApply` normalises with any such tensor (batch statistics in training,
//! running statistics in evaluation), and `BnRunningUpdate` is the one op that
//! writes the running statistics. The affine parameters of a batch norm are one
//! `[2, C]` tensor: row 0 is the scale (gamma), row 1 the shift (beta).

use serde::{Deserialize, Serialize};

use crate::graph::TensorType;

/// Initialiser of a parameter or state tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Init {
    /// Normal with standard deviation `sqrt(2 / fan)` (He et al., 2015).
    HeNormal {
        fan: usize,
    },
    /// Uniform in `[-bound, bound]`.
    Uniform {
        bound: f32,
    },
    /// Row 0 ones, row 1 zeros: batch-norm affine parameters (gamma = 1, beta = 0).
    BnAffine,
    /// Row 0 zeros (mean), row 1 ones (variance).
    RunningStats,
    Zeros,
    /// All ones: class weights until the trainer sets them from the data.
    Ones,
}

/// Purpose of a node. The executor allocates persistent storage for every role
/// but `Compute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A batch of images, fed by the data loader.
    Image,
    /// A batch of labels (class indices stored as f32), fed by the data loader.
    Label,
    /// A trainable parameter.
    Param,
    /// Non-trainable state saved with the parameters (running statistics).
    State,
    /// Optimizer state saved with checkpoints (SGD velocity, RMSprop mean square).
    OptState,
    /// An ordinary computed value.
    Compute,
    /// A side effect that overwrites its first operand in place.
    Update,
}

/// One op. Spatial sizes are square kernels with equal stride and padding on both
/// axes, which covers every network in the Log-DenseNet paper and its baselines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    // ---- leaves
    Image,
    Label,
    Param {
        init: Init,
    },
    State {
        init: Init,
    },
    /// SGD velocity of the parameter with the same shape.
    Velocity,
    /// RMSprop's running mean of the squared gradient of the parameter with
    /// the same shape.
    MeanSquare,

    // ---- forward
    Conv2d {
        k: usize,
        stride: usize,
        pad: usize,
    },
    ConvTranspose2d {
        k: usize,
        stride: usize,
        pad: usize,
        out_pad: usize,
    },
    BnStats,
    BnApply {
        eps: f32,
    },
    Relu,
    Concat,
    AvgPool {
        k: usize,
        stride: usize,
        pad: usize,
    },
    MaxPool {
        k: usize,
        stride: usize,
        pad: usize,
    },
    GlobalAvgPool,
    /// `y = x w + b` with `x: [N, C]`, `w: [C, K]`, `b: [K]`.
    Linear,
    /// A mask of 0 and `1 / (1 - p)` drawn fresh every step.
    DropoutMask {
        p: f32,
    },
    Mul,
    /// Element-wise sum of any number of operands of one type.
    Sum,
    Scale {
        factor: f32,
    },
    /// Top-left crop to `h x w` (FC-DenseNet up path, where a transposed conv
    /// overshoots an odd-sized skip connection).
    Crop {
        h: usize,
        w: usize,
    },
    /// Mean softmax cross-entropy over labelled positions, with operands
    /// `(logits, labels)`, or `(logits, labels, class_weights)` when
    /// `weighted`. A weighted loss scales the term of each position by
    /// `class_weights[label]` and divides by the sum of those weights. The
    /// weights are a `[K]` state tensor, so the runtime sets them from the
    /// data and checkpoints keep them.
    SoftmaxCrossEntropy {
        ignore: Option<u32>,
        weighted: bool,
    },

    // ---- backward
    Conv2dBackwardData {
        k: usize,
        stride: usize,
        pad: usize,
        in_h: usize,
        in_w: usize,
    },
    Conv2dBackwardFilter {
        k: usize,
        stride: usize,
        pad: usize,
    },
    ConvTranspose2dBackwardData {
        k: usize,
        stride: usize,
        pad: usize,
    },
    ConvTranspose2dBackwardFilter {
        k: usize,
        stride: usize,
        pad: usize,
    },
    BnBackward {
        eps: f32,
    },
    BnAffineGrad {
        eps: f32,
    },
    /// `dx = dy * [x > 0]` with operands `(x, dy)`.
    ReluBackward,
    /// Channels `start .. start + len` of the operand (the VJP of `Concat`).
    Slice {
        start: usize,
        len: usize,
    },
    AvgPoolBackward {
        k: usize,
        stride: usize,
        pad: usize,
        in_h: usize,
        in_w: usize,
    },
    MaxPoolBackward {
        k: usize,
        stride: usize,
        pad: usize,
    },
    GlobalAvgPoolBackward {
        h: usize,
        w: usize,
    },
    LinearBackwardData,
    LinearBackwardWeight,
    /// Sum over the batch dimension (bias gradients).
    SumBatch,
    CropBackward {
        h: usize,
        w: usize,
    },
    /// `weight * d(loss)/d(logits)` with the operands of the forward op.
    SoftmaxCrossEntropyBackward {
        weight: f32,
        ignore: Option<u32>,
        weighted: bool,
    },

    // ---- fused ops (introduced by the fusion pass)
    /// Concatenation of `[2, C_i]` batch statistics along channels: the statistics
    /// of a concatenation are the concatenated statistics of its parts.
    ConcatStats,
    /// `conv(relu(bn(concat(x_1 .. x_m))))` with operands
    /// `(x_1, .., x_m, stats, affine, w)`: reads every input from its own buffer and
    /// normalises and rectifies while loading, so the concatenation and the BN and
    /// ReLU outputs never exist.
    BnReluConv {
        k: usize,
        stride: usize,
        pad: usize,
        eps: f32,
    },
    /// Weight gradient of `BnReluConv`, operands `(x_1, .., x_m, stats, affine, dy)`;
    /// recomputes the normalised, rectified input instead of reading a stored copy.
    BnReluConvBackwardFilter {
        k: usize,
        stride: usize,
        pad: usize,
        eps: f32,
    },
    /// Gradient of `relu(bn(concat(x)))` with respect to the concatenation, operands
    /// `(x_1, .., x_m, stats, affine, dz)` where `dz` is the gradient of the ReLU output.
    BnReluBackward {
        eps: f32,
    },
    /// Channels `start .. start + c` of `BnReluBackward`, operands
    /// `(x_j, .., x_k, stats, affine, daffine, dz)`: the gradient with respect
    /// to a run of consecutive inputs whose `c` channels start at channel
    /// `start` of the concatenation. `stats`, `affine`, `dz` and
    /// `daffine = BnReluAffineGrad(x_1 .. x_m, stats, affine, dz)` cover the
    /// whole concatenation. `daffine` contains the per-channel sums
    /// `[sum du * xhat; sum du]` that the gradient needs, so the op is one
    /// element-wise pass that reads no other input and never writes the
    /// gradient of the whole concatenation.
    BnReluBackwardPart {
        eps: f32,
        start: usize,
    },
    /// Gradient of the batch-norm affine parameters inside `relu(bn(concat(x)))`,
    /// operands `(x_1, .., x_m, stats, affine, dz)`.
    BnReluAffineGrad {
        eps: f32,
    },

    /// `global_avg_pool(relu(bn(concat(x_1 .. x_m))))` with operands
    /// `(x_1, .., x_m, stats, affine)`: a classification head that never
    /// writes the concatenation or the BN and ReLU outputs.
    BnReluGlobalAvgPool {
        eps: f32,
    },
    /// `avg_pool(relu(bn(concat(x_1 .. x_m))))` with operands
    /// `(x_1, .., x_m, stats, affine)`: a transition that pools its BN-ReLU
    /// output before the 1x1 conv and never writes it.
    BnReluAvgPool {
        k: usize,
        stride: usize,
        pad: usize,
        eps: f32,
    },

    // ---- evaluation folds (introduced by the fusion pass in evaluation networks)
    /// Conv weight with the batch norm that follows the conv folded in, operands
    /// `(w, running, affine)` with `w: [k, k, C_in, C]` and `[2, C]` running
    /// statistics and affine parameters:
    /// `w'[.., co] = w[.., co] * gamma[co] / sqrt(var[co] + eps)`.
    BnFoldWeight {
        eps: f32,
    },
    /// Bias of a conv with the following batch norm folded in, operands
    /// `(running, affine)`: `b[co] = beta[co] - mean[co] * gamma[co] / sqrt(var[co] + eps)`,
    /// a `[C]` tensor.
    BnFoldBias {
        eps: f32,
    },
    /// `y = conv(x, w) + b` per output channel, then `max(y, 0)` when `relu`;
    /// operands `(x, w, b)` with `b: [C_out]`.
    Conv2dBias {
        k: usize,
        stride: usize,
        pad: usize,
        relu: bool,
    },
    /// `BnReluConv` followed by the bias and optional ReLU of `Conv2dBias`,
    /// operands `(x_1, .., x_m, stats, affine, w, b)`.
    BnReluConvBias {
        k: usize,
        stride: usize,
        pad: usize,
        eps: f32,
        relu: bool,
    },

    // ---- side effects
    /// `running = (1 - m) * running + m * batch`, with the unbiased variance;
    /// operands `(state, stats)`. `per_item` is the number of elements averaged per
    /// channel for one image (`h * w`), which the unbiased correction needs.
    BnRunningUpdate {
        momentum: f32,
        per_item: usize,
    },
    /// SGD with momentum and weight decay, operands `(param, grad, velocity)`; the
    /// learning rate comes from the executor at every step.
    SgdUpdate {
        momentum: f32,
        weight_decay: f32,
        nesterov: bool,
    },
    /// RMSprop with weight decay, operands `(param, grad, mean_square)`:
    /// `g = grad + wd * p`, `s = decay * s + (1 - decay) * g^2`, then
    /// `p -= lr * g / (sqrt(s) + eps)`. The learning rate comes from the
    /// executor at every step.
    RmsPropUpdate {
        decay: f32,
        eps: f32,
        weight_decay: f32,
    },
}

fn out_size(input: usize, k: usize, stride: usize, pad: usize) -> Option<usize> {
    (input + 2 * pad)
        .checked_sub(k)
        .map(|span| span / stride + 1)
}

fn expect_arity(types: &[&TensorType], n: usize) -> Result<(), String> {
    if types.len() == n {
        Ok(())
    } else {
        Err(format!("expected {n} operands, got {}", types.len()))
    }
}

fn expect_rank(t: &TensorType, rank: usize, what: &str) -> Result<(), String> {
    if t.dims.len() == rank {
        Ok(())
    } else {
        Err(format!("{what} must have rank {rank}, got {t}"))
    }
}

/// Checks the operands of a fused BN-ReLU op: `m >= 1` activations of one spatial
/// size followed by `[2, C]` statistics, `[2, C]` affine parameters and `trailing - 2`
/// more operands. Returns `(h, w, C)` with `C` the total channels.
fn fused_inputs(t: &[&TensorType], trailing: usize) -> Result<(usize, usize, usize), String> {
    if t.len() < trailing + 1 {
        return Err(format!(
            "expected at least {} operands, got {}",
            trailing + 1,
            t.len()
        ));
    }
    let xs = &t[..t.len() - trailing];
    let mut c = 0;
    for x in xs {
        expect_rank(x, 3, "input")?;
        if !x.batched || x.dims[..2] != xs[0].dims[..2] {
            return Err(format!(
                "inputs differ in spatial size: {} and {}",
                xs[0], x
            ));
        }
        c += x.dims[2];
    }
    for (i, what) in [(0, "statistics"), (1, "affine")] {
        let ty = t[xs.len() + i];
        if ty.dims != [2, c] {
            return Err(format!("{what} {ty} must be [2, {c}]"));
        }
    }
    Ok((xs[0].dims[0], xs[0].dims[1], c))
}

/// Checks the operands `(x_j, .., x_k, stats, affine, daffine, dz)` of
/// `BnReluBackwardPart` and returns its output type: the inputs' pixels with
/// their `c` channels, which must fit within the `C` channels of `dz` from
/// channel `start` on.
fn backward_part(t: &[&TensorType], start: usize) -> Result<TensorType, String> {
    if t.len() < 5 {
        return Err(format!("expected at least 5 operands, got {}", t.len()));
    }
    let dz = t[t.len() - 1];
    expect_rank(dz, 3, "gradient")?;
    if !dz.batched {
        return Err(format!("gradient {dz} has no batch dimension"));
    }
    let width = dz.dims[2];
    let mut c = 0;
    for x in &t[..t.len() - 4] {
        expect_rank(x, 3, "input")?;
        if !x.batched || x.dims[..2] != dz.dims[..2] {
            return Err(format!(
                "input {x} differs in spatial size from gradient {dz}"
            ));
        }
        c += x.dims[2];
    }
    if start + c > width {
        return Err(format!(
            "channels {start}..{} out of range for gradient {dz}",
            start + c
        ));
    }
    for (i, what) in [(4, "statistics"), (3, "affine"), (2, "affine gradient")] {
        let ty = t[t.len() - i];
        if ty.batched || ty.dims != [2, width] {
            return Err(format!("{what} {ty} must be [2, {width}]"));
        }
    }
    Ok(TensorType::batched(&[dz.dims[0], dz.dims[1], c]))
}

/// Checks the operands of a softmax cross-entropy or its gradient: logits
/// `[.., K]`, labels of the logits' shape without `K`, and, when `weighted`,
/// unbatched `[K]` class weights.
fn check_loss_operands(t: &[&TensorType], weighted: bool) -> Result<(), String> {
    expect_arity(t, if weighted { 3 } else { 2 })?;
    let logits = &t[0].dims;
    if t[1].dims != logits[..logits.len() - 1] {
        return Err(format!("labels {} do not match logits {}", t[1], t[0]));
    }
    if weighted {
        let classes = t[0].channels();
        if t[2].batched || t[2].dims != [classes] {
            return Err(format!(
                "class weights {} must be [{classes}], one per class",
                t[2]
            ));
        }
    }
    Ok(())
}

/// Checks that every type in `rows` is `[2, c]` (running statistics and affine
/// parameters of a folded batch norm).
fn check_fold_rows(c: usize, rows: &[&TensorType]) -> Result<(), String> {
    for (ty, what) in rows.iter().zip(["running statistics", "affine"]) {
        if ty.batched || ty.dims != [2, c] {
            return Err(format!("{what} {ty} must be [2, {c}]"));
        }
    }
    Ok(())
}

/// Checks that a conv bias is `[c]`.
fn check_bias(b: &TensorType, c: usize) -> Result<(), String> {
    if b.batched || b.dims != [c] {
        return Err(format!("bias {b} must be [{c}]"));
    }
    Ok(())
}

fn spatial(
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<(usize, usize), String> {
    match (out_size(h, k, stride, pad), out_size(w, k, stride, pad)) {
        (Some(ho), Some(wo)) if stride > 0 => Ok((ho, wo)),
        _ => Err(format!(
            "a {k}x{k} window with stride {stride} and padding {pad} does not fit a {h}x{w} input"
        )),
    }
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Image => "image",
            Op::Label => "label",
            Op::Param { .. } => "param",
            Op::State { .. } => "state",
            Op::Velocity => "velocity",
            Op::MeanSquare => "mean_square",
            Op::Conv2d { .. } => "conv2d",
            Op::ConvTranspose2d { .. } => "conv_transpose2d",
            Op::BnStats => "bn_stats",
            Op::BnApply { .. } => "bn_apply",
            Op::Relu => "relu",
            Op::Concat => "concat",
            Op::AvgPool { .. } => "avg_pool",
            Op::MaxPool { .. } => "max_pool",
            Op::GlobalAvgPool => "global_avg_pool",
            Op::Linear => "linear",
            Op::DropoutMask { .. } => "dropout_mask",
            Op::Mul => "mul",
            Op::Sum => "sum",
            Op::Scale { .. } => "scale",
            Op::Crop { .. } => "crop",
            Op::SoftmaxCrossEntropy { .. } => "softmax_cross_entropy",
            Op::Conv2dBackwardData { .. } => "conv2d_backward_data",
            Op::Conv2dBackwardFilter { .. } => "conv2d_backward_filter",
            Op::ConvTranspose2dBackwardData { .. } => "conv_transpose2d_backward_data",
            Op::ConvTranspose2dBackwardFilter { .. } => "conv_transpose2d_backward_filter",
            Op::BnBackward { .. } => "bn_backward",
            Op::BnAffineGrad { .. } => "bn_affine_grad",
            Op::ReluBackward => "relu_backward",
            Op::Slice { .. } => "slice",
            Op::AvgPoolBackward { .. } => "avg_pool_backward",
            Op::MaxPoolBackward { .. } => "max_pool_backward",
            Op::GlobalAvgPoolBackward { .. } => "global_avg_pool_backward",
            Op::LinearBackwardData => "linear_backward_data",
            Op::LinearBackwardWeight => "linear_backward_weight",
            Op::SumBatch => "sum_batch",
            Op::CropBackward { .. } => "crop_backward",
            Op::SoftmaxCrossEntropyBackward { .. } => "softmax_cross_entropy_backward",
            Op::ConcatStats => "concat_stats",
            Op::BnReluConv { .. } => "bn_relu_conv",
            Op::BnReluConvBackwardFilter { .. } => "bn_relu_conv_backward_filter",
            Op::BnReluBackward { .. } => "bn_relu_backward",
            Op::BnReluBackwardPart { .. } => "bn_relu_backward_part",
            Op::BnReluAffineGrad { .. } => "bn_relu_affine_grad",
            Op::BnReluGlobalAvgPool { .. } => "bn_relu_global_avg_pool",
            Op::BnReluAvgPool { .. } => "bn_relu_avg_pool",
            Op::BnFoldWeight { .. } => "bn_fold_weight",
            Op::BnFoldBias { .. } => "bn_fold_bias",
            Op::Conv2dBias { .. } => "conv2d_bias",
            Op::BnReluConvBias { .. } => "bn_relu_conv_bias",
            Op::BnRunningUpdate { .. } => "bn_running_update",
            Op::SgdUpdate { .. } => "sgd_update",
            Op::RmsPropUpdate { .. } => "rmsprop_update",
        }
    }

    pub fn role(&self) -> Role {
        match self {
            Op::Image => Role::Image,
            Op::Label => Role::Label,
            Op::Param { .. } => Role::Param,
            Op::State { .. } => Role::State,
            Op::Velocity | Op::MeanSquare => Role::OptState,
            Op::BnRunningUpdate { .. } | Op::SgdUpdate { .. } | Op::RmsPropUpdate { .. } => {
                Role::Update
            }
            _ => Role::Compute,
        }
    }

    /// Infers the output type from the operand types, or returns why they do not fit.
    pub fn infer(&self, t: &[&TensorType]) -> Result<TensorType, String> {
        match self {
            Op::Image
            | Op::Label
            | Op::Param { .. }
            | Op::State { .. }
            | Op::Velocity
            | Op::MeanSquare => Err("leaf ops are added with an explicit type".into()),
            Op::Conv2d { k, stride, pad } => {
                expect_arity(t, 2)?;
                expect_rank(t[0], 3, "input")?;
                expect_rank(t[1], 4, "weight")?;
                let (h, w, c) = (t[0].dims[0], t[0].dims[1], t[0].dims[2]);
                let wd = &t[1].dims;
                if wd[0] != *k || wd[1] != *k || wd[2] != c {
                    return Err(format!(
                        "weight {} does not match a {k}x{k} conv over {c} input channels",
                        t[1]
                    ));
                }
                let (ho, wo) = spatial(h, w, *k, *stride, *pad)?;
                Ok(TensorType::batched(&[ho, wo, wd[3]]))
            }
            Op::ConvTranspose2d {
                k,
                stride,
                pad,
                out_pad,
            } => {
                expect_arity(t, 2)?;
                expect_rank(t[0], 3, "input")?;
                expect_rank(t[1], 4, "weight")?;
                let (h, w, c) = (t[0].dims[0], t[0].dims[1], t[0].dims[2]);
                let wd = &t[1].dims;
                if wd[0] != *k || wd[1] != *k || wd[2] != c {
                    return Err(format!("weight {} does not match {c} input channels", t[1]));
                }
                let grow = |x: usize| ((x - 1) * stride + k + out_pad).checked_sub(2 * pad);
                match (grow(h), grow(w)) {
                    (Some(ho), Some(wo)) if ho > 0 && wo > 0 => {
                        Ok(TensorType::batched(&[ho, wo, wd[3]]))
                    }
                    _ => Err(format!("padding {pad} is larger than the output")),
                }
            }
            Op::BnStats => {
                expect_arity(t, 1)?;
                Ok(TensorType::fixed(&[2, t[0].channels()]))
            }
            Op::BnApply { .. } => {
                expect_arity(t, 3)?;
                let c = t[0].channels();
                for (i, what) in [(1, "statistics"), (2, "affine")] {
                    if t[i].dims != [2, c] {
                        return Err(format!("{what} {} must be [2, {c}]", t[i]));
                    }
                }
                Ok(t[0].clone())
            }
            Op::Relu | Op::Scale { .. } | Op::DropoutMask { .. } => {
                expect_arity(t, 1)?;
                Ok(t[0].clone())
            }
            Op::Mul | Op::Sum | Op::ReluBackward => {
                if t.is_empty() {
                    return Err("expected at least one operand".into());
                }
                if let Some(bad) = t.iter().find(|x| **x != t[0]) {
                    return Err(format!("operands differ: {} and {}", t[0], bad));
                }
                Ok(t[0].clone())
            }
            Op::Concat => {
                if t.is_empty() {
                    return Err("concat of nothing".into());
                }
                let lead = &t[0].dims[..t[0].dims.len() - 1];
                let mut c = 0;
                for x in t {
                    if !x.batched || &x.dims[..x.dims.len() - 1] != lead {
                        return Err(format!(
                            "operands must agree in all but the channel dimension: {} and {}",
                            t[0], x
                        ));
                    }
                    c += x.channels();
                }
                let mut dims = lead.to_vec();
                dims.push(c);
                Ok(TensorType::batched(&dims))
            }
            Op::AvgPool { k, stride, pad } | Op::MaxPool { k, stride, pad } => {
                expect_arity(t, 1)?;
                expect_rank(t[0], 3, "input")?;
                let (ho, wo) = spatial(t[0].dims[0], t[0].dims[1], *k, *stride, *pad)?;
                Ok(TensorType::batched(&[ho, wo, t[0].dims[2]]))
            }
            Op::GlobalAvgPool => {
                expect_arity(t, 1)?;
                expect_rank(t[0], 3, "input")?;
                Ok(TensorType::batched(&[t[0].dims[2]]))
            }
            Op::Linear => {
                expect_arity(t, 3)?;
                expect_rank(t[0], 1, "input")?;
                let (c, k) = (t[0].dims[0], t[2].per_item());
                if t[1].dims != [c, k] {
                    return Err(format!("weight {} must be [{c}, {k}]", t[1]));
                }
                Ok(TensorType::batched(&[k]))
            }
            Op::Crop { h, w } => {
                expect_arity(t, 1)?;
                expect_rank(t[0], 3, "input")?;
                if t[0].dims[0] < *h || t[0].dims[1] < *w {
                    return Err(format!("cannot crop {} to {h}x{w}", t[0]));
                }
                Ok(TensorType::batched(&[*h, *w, t[0].dims[2]]))
            }
            Op::SoftmaxCrossEntropy { weighted, .. } => {
                check_loss_operands(t, *weighted)?;
                Ok(TensorType::fixed(&[1]))
            }
            Op::Conv2dBackwardData { k, in_h, in_w, .. } => {
                expect_arity(t, 2)?;
                let wd = &t[1].dims;
                if wd.len() != 4 || wd[0] != *k || t[0].channels() != wd[3] {
                    return Err(format!("gradient {} does not match weight {}", t[0], t[1]));
                }
                Ok(TensorType::batched(&[*in_h, *in_w, wd[2]]))
            }
            Op::Conv2dBackwardFilter { k, .. } | Op::ConvTranspose2dBackwardFilter { k, .. } => {
                expect_arity(t, 2)?;
                Ok(TensorType::fixed(&[
                    *k,
                    *k,
                    t[0].channels(),
                    t[1].channels(),
                ]))
            }
            Op::ConvTranspose2dBackwardData { k, stride, pad } => {
                expect_arity(t, 2)?;
                let (ho, wo) = spatial(t[0].dims[0], t[0].dims[1], *k, *stride, *pad)?;
                Ok(TensorType::batched(&[ho, wo, t[1].dims[2]]))
            }
            Op::BnBackward { .. } => {
                expect_arity(t, 4)?;
                Ok(t[0].clone())
            }
            Op::BnAffineGrad { .. } => {
                expect_arity(t, 3)?;
                Ok(TensorType::fixed(&[2, t[0].channels()]))
            }
            Op::Slice { start, len } => {
                expect_arity(t, 1)?;
                if start + len > t[0].channels() {
                    return Err(format!(
                        "channels {start}..{} out of range for {}",
                        start + len,
                        t[0]
                    ));
                }
                let mut dims = t[0].dims.clone();
                *dims.last_mut().expect("rank >= 1") = *len;
                Ok(TensorType::batched(&dims))
            }
            Op::AvgPoolBackward { in_h, in_w, .. } => {
                expect_arity(t, 1)?;
                Ok(TensorType::batched(&[*in_h, *in_w, t[0].channels()]))
            }
            Op::MaxPoolBackward { .. } => {
                expect_arity(t, 2)?;
                Ok(t[0].clone())
            }
            Op::GlobalAvgPoolBackward { h, w } => {
                expect_arity(t, 1)?;
                Ok(TensorType::batched(&[*h, *w, t[0].channels()]))
            }
            Op::LinearBackwardData => {
                expect_arity(t, 2)?;
                Ok(TensorType::batched(&[t[1].dims[0]]))
            }
            Op::LinearBackwardWeight => {
                expect_arity(t, 2)?;
                Ok(TensorType::fixed(&[t[0].channels(), t[1].channels()]))
            }
            Op::SumBatch => {
                expect_arity(t, 1)?;
                Ok(TensorType::fixed(&t[0].dims))
            }
            Op::CropBackward { h, w } => {
                expect_arity(t, 1)?;
                Ok(TensorType::batched(&[*h, *w, t[0].channels()]))
            }
            Op::SoftmaxCrossEntropyBackward { weighted, .. } => {
                check_loss_operands(t, *weighted)?;
                Ok(t[0].clone())
            }
            Op::ConcatStats => {
                let mut c = 0;
                for x in t {
                    if x.batched || x.dims.len() != 2 || x.dims[0] != 2 {
                        return Err(format!("statistics must be [2, C], got {x}"));
                    }
                    c += x.dims[1];
                }
                Ok(TensorType::fixed(&[2, c]))
            }
            Op::BnReluConv { k, stride, pad, .. } => {
                let (h, w, c) = fused_inputs(t, 3)?;
                let wd = &t[t.len() - 1].dims;
                if wd.len() != 4 || wd[0] != *k || wd[1] != *k || wd[2] != c {
                    return Err(format!(
                        "weight {} does not match a {k}x{k} conv over {c} channels",
                        t[t.len() - 1]
                    ));
                }
                let (ho, wo) = spatial(h, w, *k, *stride, *pad)?;
                Ok(TensorType::batched(&[ho, wo, wd[3]]))
            }
            Op::BnReluConvBackwardFilter { k, .. } => {
                let (_, _, c) = fused_inputs(t, 3)?;
                Ok(TensorType::fixed(&[*k, *k, c, t[t.len() - 1].channels()]))
            }
            Op::BnReluBackward { .. } => {
                let (h, w, c) = fused_inputs(t, 3)?;
                Ok(TensorType::batched(&[h, w, c]))
            }
            Op::BnReluBackwardPart { start, .. } => backward_part(t, *start),
            Op::BnReluAffineGrad { .. } => {
                let (_, _, c) = fused_inputs(t, 3)?;
                Ok(TensorType::fixed(&[2, c]))
            }
            Op::BnReluGlobalAvgPool { .. } => {
                let (_, _, c) = fused_inputs(t, 2)?;
                Ok(TensorType::batched(&[c]))
            }
            Op::BnReluAvgPool { k, stride, pad, .. } => {
                let (h, w, c) = fused_inputs(t, 2)?;
                let (ho, wo) = spatial(h, w, *k, *stride, *pad)?;
                Ok(TensorType::batched(&[ho, wo, c]))
            }
            Op::BnFoldWeight { .. } => {
                expect_arity(t, 3)?;
                expect_rank(t[0], 4, "weight")?;
                check_fold_rows(t[0].dims[3], &t[1..])?;
                Ok(t[0].clone())
            }
            Op::BnFoldBias { .. } => {
                expect_arity(t, 2)?;
                let c = t[0].dims.last().copied().unwrap_or(0);
                check_fold_rows(c, t)?;
                Ok(TensorType::fixed(&[c]))
            }
            Op::Conv2dBias { k, stride, pad, .. } => {
                expect_arity(t, 3)?;
                let y = Op::Conv2d {
                    k: *k,
                    stride: *stride,
                    pad: *pad,
                }
                .infer(&t[..2])?;
                check_bias(t[2], y.channels())?;
                Ok(y)
            }
            Op::BnReluConvBias {
                k,
                stride,
                pad,
                eps,
                ..
            } => {
                if t.is_empty() {
                    return Err("expected operands".into());
                }
                let y = Op::BnReluConv {
                    k: *k,
                    stride: *stride,
                    pad: *pad,
                    eps: *eps,
                }
                .infer(&t[..t.len() - 1])?;
                check_bias(t[t.len() - 1], y.channels())?;
                Ok(y)
            }
            Op::BnRunningUpdate { .. } => {
                expect_arity(t, 2)?;
                Ok(t[0].clone())
            }
            Op::SgdUpdate { .. } | Op::RmsPropUpdate { .. } => {
                expect_arity(t, 3)?;
                if t[0] != t[1] || t[0] != t[2] {
                    return Err(format!(
                        "parameter {}, gradient {} and optimizer state {} differ",
                        t[0], t[1], t[2]
                    ));
                }
                Ok(t[0].clone())
            }
        }
    }

    /// Multiply-accumulates per image (convolutions and linear layers; everything
    /// else is memory-bound and counted as zero, as FLOP counters usually do).
    pub fn macs(&self, inputs: &[&TensorType], out: &TensorType) -> u64 {
        let p = |t: &TensorType| t.per_item() as u64;
        match self {
            Op::Conv2d { k, .. } | Op::Conv2dBias { k, .. } => {
                p(out) * (k * k * inputs[0].channels()) as u64
            }
            Op::BnReluConvBias { k, .. } => {
                let wd = &inputs[inputs.len() - 2].dims;
                p(out) * (k * k * wd[2]) as u64
            }
            Op::BnReluConv { k, .. } => {
                let wd = &inputs[inputs.len() - 1].dims;
                p(out) * (k * k * wd[2]) as u64
            }
            Op::BnReluConvBackwardFilter { .. } => {
                p(inputs[inputs.len() - 1]) * (out.dims[0] * out.dims[1] * out.dims[2]) as u64
            }
            Op::ConvTranspose2d { k, .. } => p(inputs[0]) * (k * k * out.channels()) as u64,
            Op::Linear => p(inputs[0]) * out.channels() as u64,
            Op::Conv2dBackwardData { k, .. } => p(inputs[0]) * (k * k * out.channels()) as u64,
            // A weight gradient costs what the forward op whose weight it is costs.
            Op::Conv2dBackwardFilter { k, .. } => p(inputs[1]) * (k * k * out.dims[2]) as u64,
            Op::ConvTranspose2dBackwardFilter { k, .. } => {
                p(inputs[0]) * (k * k * out.dims[3]) as u64
            }
            Op::ConvTranspose2dBackwardData { k, .. } => {
                p(out) * (k * k * inputs[0].channels()) as u64
            }
            Op::LinearBackwardData | Op::LinearBackwardWeight => {
                (inputs[0].per_item() * inputs[1].per_item()) as u64
            }
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operand types of a `BnReluBackwardPart` over `channels` inputs of a
    /// 4x4 concatenation of `width` channels, with a `[2, rows]` affine
    /// gradient.
    fn part_operands(channels: &[usize], width: usize, rows: usize) -> Vec<TensorType> {
        let mut types: Vec<TensorType> = channels
            .iter()
            .map(|&c| TensorType::batched(&[4, 4, c]))
            .collect();
        types.push(TensorType::fixed(&[2, width]));
        types.push(TensorType::fixed(&[2, width]));
        types.push(TensorType::fixed(&[2, rows]));
        types.push(TensorType::batched(&[4, 4, width]));
        types
    }

    fn infer_part(start: usize, types: &[TensorType]) -> Result<TensorType, String> {
        let refs: Vec<&TensorType> = types.iter().collect();
        Op::BnReluBackwardPart { eps: 1e-5, start }.infer(&refs)
    }

    #[test]
    fn backward_part_has_its_inputs_channels() {
        let ty = infer_part(3, &part_operands(&[2, 4], 9, 9)).unwrap();
        assert_eq!(ty, TensorType::batched(&[4, 4, 6]));
    }

    #[test]
    fn backward_part_rejects_channels_past_gradient() {
        let err = infer_part(4, &part_operands(&[2, 4], 9, 9)).unwrap_err();
        assert!(err.contains("channels 4..10 out of range"), "{err}");
    }

    #[test]
    fn backward_part_rejects_narrow_affine_gradient() {
        let err = infer_part(0, &part_operands(&[2], 9, 2)).unwrap_err();
        assert!(err.contains("affine gradient"), "{err}");
    }
}
