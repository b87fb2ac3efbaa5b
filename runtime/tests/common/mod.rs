//! Set-up shared by the kernel tests that run single ops through
//! `KernelSet::compute`: seeded input values and a call that runs one op.

use ldnc_ir::{Op, TensorType};
use ldnc_runtime::kernels::{Ctx, In, KernelSet};

/// Values in `[-1, 1)` from an xorshift generator seeded with `seed`.
pub fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Runs `op` in `set` on `inputs` for a batch of `n` and returns its output.
/// The context seed only feeds dropout masks, so any fixed value serves.
pub fn run(set: KernelSet, op: &Op, inputs: &[(&[f32], &TensorType)], n: usize) -> Vec<f32> {
    let types: Vec<&TensorType> = inputs.iter().map(|x| x.1).collect();
    let out_ty = op.infer(&types).expect("the operands fit the op");
    let operands: Vec<In> = inputs.iter().map(|&(data, ty)| In { data, ty }).collect();
    let mut out = vec![f32::NAN; out_ty.numel(n)];
    set.compute(op, &operands, &mut out, &out_ty, &Ctx { n, seed: 3 })
        .unwrap_or_else(|e| panic!("{} failed: {e}", op.name()));
    out
}
