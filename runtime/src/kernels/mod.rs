//! CPU kernels for every op of the IR, in two sets with one interface: a
//! reference set of plain loops written to be obviously correct, and a fast set
//! (NHWC, a tuned GEMM, rayon) that tests compare against the reference.
//!
//! Layout: a batched value of type `[h, w, c]` at batch `n` is `n * h * w * c`
//! contiguous f32 in NHWC order; conv weights are `[k, k, cin, cout]`; labels are
//! class indices stored as f32.

mod dispatch;
pub mod fast;
mod layout;
pub mod reference;

use ldnc_ir::{Op, TensorType};

/// An operand: its data and type.
#[derive(Clone, Copy)]
pub struct In<'a> {
    pub data: &'a [f32],
    pub ty: &'a TensorType,
}

/// Per-step context shared by all kernels of one step.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    /// Batch size of this step.
    pub n: usize,
    /// Seed for random ops (dropout masks); the executor derives it from the run
    /// seed, the step number and the node.
    pub seed: u64,
}

/// Errors a kernel reports instead of panicking.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("op {op} has no CPU kernel in the {set} set")]
    Unsupported { op: &'static str, set: &'static str },
    #[error("op {op}: {message}")]
    Invalid { op: &'static str, message: String },
}

/// Which kernel set runs the compute steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelSet {
    Reference,
    #[default]
    Fast,
}

impl KernelSet {
    /// Computes the output of a `Role::Compute` op into `out` (length
    /// `out_ty.numel(ctx.n)`); `out` holds stale data on entry.
    pub fn compute(
        self,
        op: &Op,
        inputs: &[In],
        out: &mut [f32],
        out_ty: &TensorType,
        ctx: &Ctx,
    ) -> Result<(), KernelError> {
        match self {
            KernelSet::Reference => reference::compute(op, inputs, out, out_ty, ctx),
            KernelSet::Fast => fast::compute(op, inputs, out, out_ty, ctx),
        }
    }
}
