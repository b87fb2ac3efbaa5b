//! Lowering of IR ops to CUDA kernels.
//!
//! Every op of a program step becomes a [`LoweredStep`]: one or more kernel
//! launches, each with the binding of every kernel parameter to a step
//! operand, the step output, a scratch buffer, a constant table, or a scalar
//! (batch size, random seed, learning rate). Shapes other than the batch
//! size are compiled into the kernels as constants; the batch size is the
//! `int n` parameter, so one compiled kernel serves every batch.
//!
//! Covered ops, with the module that lowers them:
//!
//! - [`elementwise`]: `Relu`, `ReluBackward`, `Scale`, `Mul`, `Sum`,
//!   `DropoutMask`, `Concat` (one channel copy per operand), `Slice`, `Crop`,
//!   `CropBackward`, `SumBatch`, `GlobalAvgPoolBackward`;
//! - [`norm`]: `BnStats`, `BnApply`, `BnBackward`, `BnAffineGrad`, with a
//!   block per channel and a deterministic shared-memory and warp-shuffle
//!   tree reduction;
//! - [`pool`]: `AvgPool`, `MaxPool`, their backward ops (gathers, no
//!   atomics) and `GlobalAvgPool`;
//! - [`dense`]: `Linear`, `LinearBackwardData`, `LinearBackwardWeight`,
//!   `SoftmaxCrossEntropy` and its backward, `SgdUpdate`, `RmsPropUpdate`,
//!   `BnRunningUpdate`;
//! - [`conv`]: `Conv2d`, `Conv2dBackwardData`, `Conv2dBackwardFilter`,
//!   `ConvTranspose2d` and its two backward ops, all as one implicit-GEMM
//!   kernel template tiled through shared memory;
//! - [`fused`]: the fused ops of the fusion pass, `ConcatStats`,
//!   `BnReluConv`, `BnReluConvBackwardFilter` (the conv template with an A
//!   loader that normalises and rectifies), `BnReluGlobalAvgPool`,
//!   `BnReluAvgPool`, `BnReluBackward`, `BnReluBackwardPart` and
//!   `BnReluAffineGrad` (the batch-norm gradients with a recomputed ReLU
//!   mask). Each reads every input of the concatenation from its own buffer
//!   and never writes the concatenation. `BnReluConvBias` is `BnReluConv`
//!   with the bias epilogue of a folded batch norm;
//! - [`fold`]: `BnFoldWeight` and `BnFoldBias`, the folded weight and bias of
//!   a conv followed by an evaluation-mode batch norm. `Conv2dBias`, the
//!   folded conv, is the [`conv`] template with a bias epilogue.
//!
//! Every reduction has a fixed order that does not depend on timing, and no
//! lowering uses `atomicAdd`, so a kernel gives the same bits on every run.
//! Leaf ops (`Image`, `Label`, `Param`, `State`, `Velocity`, `MeanSquare`) have
//! no kernel.

pub mod conv;
pub mod dense;
pub mod elementwise;
pub mod fold;
pub mod fused;
pub mod norm;
pub mod pool;

use std::ops::{Deref, DerefMut};

use ldnc_ir::op::{Op, Role};
use ldnc_ir::program::Program;
use ldnc_ir::TensorType;

use super::builder::{Buffer, KernelBuilder};
use super::kernel::{ceil_div, int, Expr, Kernel};
use super::{Error, Result};

/// Threads per block of the one-dimensional kernels: a multiple of the warp
/// size that keeps several blocks resident per multiprocessor.
pub const THREADS: u32 = 256;

/// Source of a kernel argument at launch.
#[derive(Debug, Clone, PartialEq)]
pub enum Binding {
    /// Operand `i` of the step.
    Input(usize),
    /// The step's output value.
    Output,
    /// Scratch buffer `j` of the step, with undefined contents on entry.
    Scratch(usize),
    /// The batch size, as `int`.
    Batch,
    /// The step's random seed, as `unsigned long long`.
    Seed,
    /// The learning rate of this step, as `float`.
    LearningRate,
}

/// One kernel and the binding of each of its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub kernel: Kernel,
    pub args: Vec<Binding>,
}

/// The launches of one step, run in order.
#[derive(Debug, Clone, PartialEq)]
pub struct LoweredStep {
    /// Lengths in f32 elements of the step's scratch buffers.
    pub scratch: Vec<usize>,
    pub launches: Vec<Launch>,
}

impl LoweredStep {
    fn single(launch: Launch) -> LoweredStep {
        LoweredStep {
            scratch: Vec::new(),
            launches: vec![launch],
        }
    }
}

/// A kernel under construction together with its parameter bindings.
pub(crate) struct Lowering {
    b: KernelBuilder,
    args: Vec<Binding>,
}

impl Deref for Lowering {
    type Target = KernelBuilder;
    fn deref(&self) -> &KernelBuilder {
        &self.b
    }
}

impl DerefMut for Lowering {
    fn deref_mut(&mut self) -> &mut KernelBuilder {
        &mut self.b
    }
}

impl Lowering {
    pub(crate) fn new(name: &str, threads: u32) -> Lowering {
        Lowering {
            b: KernelBuilder::new(name, [threads, 1, 1]),
            args: Vec::new(),
        }
    }

    /// Operand `i` of the step, read-only.
    pub(crate) fn operand(&mut self, name: &str, i: usize) -> Buffer {
        self.args.push(Binding::Input(i));
        self.b.input(name)
    }

    /// Operand `i` of the step, updated in place.
    pub(crate) fn operand_mut(&mut self, name: &str, i: usize) -> Buffer {
        self.args.push(Binding::Input(i));
        self.b.output(name)
    }

    pub(crate) fn result(&mut self, name: &str) -> Buffer {
        self.args.push(Binding::Output);
        self.b.output(name)
    }

    pub(crate) fn scratch(&mut self, name: &str, j: usize, writes: bool) -> Buffer {
        self.args.push(Binding::Scratch(j));
        if writes {
            self.b.output(name)
        } else {
            self.b.input(name)
        }
    }

    pub(crate) fn batch(&mut self) -> Expr {
        self.args.push(Binding::Batch);
        self.b.int_param("n")
    }

    pub(crate) fn seed(&mut self) -> Expr {
        self.args.push(Binding::Seed);
        self.b.u64_param("seed")
    }

    pub(crate) fn learning_rate(&mut self) -> Expr {
        self.args.push(Binding::LearningRate);
        self.b.f32_param("lr")
    }

    /// Sizes the grid for one thread per element of `0..total` and runs
    /// `body(i)` for the threads with `i < total`.
    pub(crate) fn per_element(&mut self, total: Expr, body: impl FnOnce(&mut KernelBuilder, Expr)) {
        self.b.grid(ceil_div(total.clone(), THREADS as usize), 1, 1);
        let i = self.b.global_thread_x();
        self.b.if_(i.lt(total), |b| body(b, i.clone()));
    }

    pub(crate) fn finish(self) -> Result<Launch> {
        Ok(Launch {
            kernel: self.b.finish()?,
            args: self.args,
        })
    }
}

/// Number of elements of `ty` at batch size `n`.
pub(crate) fn numel(ty: &TensorType, n: &Expr) -> Expr {
    if ty.batched {
        n * int(ty.per_item())
    } else {
        int(ty.per_item())
    }
}

/// The `Lower` error of `op`.
pub(crate) fn unsupported(op: &Op, message: impl Into<String>) -> Error {
    Error::Lower {
        op: op.name(),
        message: message.into(),
    }
}

/// Height, width and channels of a batched `[h, w, c]` type.
pub(crate) fn hwc(op: &Op, ty: &TensorType) -> Result<(usize, usize, usize)> {
    match ty.dims[..] {
        [h, w, c] if ty.batched => Ok((h, w, c)),
        _ => Err(unsupported(
            op,
            format!("expected a batched [h, w, c] image, found {ty}"),
        )),
    }
}

/// Checks the operand and output types against the op's shape rule and that
/// every per-image size fits in an `int`.
fn check_types(op: &Op, inputs: &[&TensorType], out: &TensorType) -> Result<()> {
    let expected = op
        .infer(inputs)
        .map_err(|m| unsupported(op, format!("operand types do not fit: {m}")))?;
    if expected != *out {
        return Err(unsupported(
            op,
            format!("output type is {out}, but the operands produce {expected}"),
        ));
    }
    for ty in inputs.iter().copied().chain([out]) {
        if ty.per_item() > i32::MAX as usize {
            return Err(unsupported(
                op,
                format!("{ty} has more elements than an int can index"),
            ));
        }
    }
    Ok(())
}

/// Lowers one op, given its operand and output types.
pub fn lower_step(op: &Op, inputs: &[&TensorType], out: &TensorType) -> Result<LoweredStep> {
    if matches!(op.role(), Role::Compute | Role::Update) {
        check_types(op, inputs, out)?;
    }
    match op {
        Op::Image
        | Op::Label
        | Op::Param { .. }
        | Op::State { .. }
        | Op::Velocity
        | Op::MeanSquare => Err(unsupported(
            op,
            "leaf values are fed or stored, not computed",
        )),
        Op::Relu
        | Op::ReluBackward
        | Op::Scale { .. }
        | Op::Mul
        | Op::Sum
        | Op::DropoutMask { .. }
        | Op::Concat
        | Op::Slice { .. }
        | Op::Crop { .. }
        | Op::CropBackward { .. }
        | Op::SumBatch
        | Op::GlobalAvgPoolBackward { .. } => elementwise::lower(op, inputs, out),
        Op::BnStats | Op::BnApply { .. } | Op::BnBackward { .. } | Op::BnAffineGrad { .. } => {
            norm::lower(op, inputs, out)
        }
        Op::AvgPool { .. }
        | Op::MaxPool { .. }
        | Op::AvgPoolBackward { .. }
        | Op::MaxPoolBackward { .. }
        | Op::GlobalAvgPool => pool::lower(op, inputs, out),
        Op::Linear
        | Op::LinearBackwardData
        | Op::LinearBackwardWeight
        | Op::SoftmaxCrossEntropy { .. }
        | Op::SoftmaxCrossEntropyBackward { .. }
        | Op::SgdUpdate { .. }
        | Op::RmsPropUpdate { .. }
        | Op::BnRunningUpdate { .. } => dense::lower(op, inputs, out),
        Op::Conv2d { .. }
        | Op::Conv2dBias { .. }
        | Op::Conv2dBackwardData { .. }
        | Op::Conv2dBackwardFilter { .. }
        | Op::ConvTranspose2d { .. }
        | Op::ConvTranspose2dBackwardData { .. }
        | Op::ConvTranspose2dBackwardFilter { .. } => conv::lower(op, inputs, out),
        Op::ConcatStats
        | Op::BnReluConv { .. }
        | Op::BnReluConvBias { .. }
        | Op::BnReluGlobalAvgPool { .. }
        | Op::BnReluAvgPool { .. }
        | Op::BnReluConvBackwardFilter { .. }
        | Op::BnReluBackward { .. }
        | Op::BnReluBackwardPart { .. }
        | Op::BnReluAffineGrad { .. } => fused::lower(op, inputs, out),
        Op::BnFoldWeight { .. } | Op::BnFoldBias { .. } => fold::lower(op, inputs, out),
    }
}

/// Lowers every step of `program`, in order; an error names the step.
pub fn lower_program(program: &Program) -> Result<Vec<LoweredStep>> {
    program
        .steps
        .iter()
        .enumerate()
        .map(|(s, step)| {
            let inputs: Vec<&TensorType> =
                step.inputs.iter().map(|&i| &program.values[i].ty).collect();
            let out = &program.values[step.output].ty;
            lower_step(&step.op, &inputs, out).map_err(|e| Error::Lower {
                op: step.op.name(),
                message: format!("step {s} (value {}): {e}", program.values[step.output].name),
            })
        })
        .collect()
}
