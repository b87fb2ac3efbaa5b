//! Fast kernels.

use super::{Ctx, In, KernelError};
use ldnc_ir::{Op, TensorType};

pub fn compute(
    op: &Op,
    _inputs: &[In],
    _out: &mut [f32],
    _out_ty: &TensorType,
    _ctx: &Ctx,
) -> Result<(), KernelError> {
    Err(KernelError::Unsupported { op: op.name(), set: "fast" })
}
