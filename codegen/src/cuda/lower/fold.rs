//! The batch-norm fold of evaluation programs: the folded weight and bias of
//! a conv followed by a batch norm with running statistics, one thread per
//! output element.
//!
//! With `s = gamma * rsqrt(var + eps)`, `BnFoldWeight` writes
//! `w'[i] = w[i] * s[i % C]` (the output channel is the fastest axis of a
//! `[k, k, C_in, C]` weight) and `BnFoldBias` writes
//! `b[ch] = beta[ch] - mean[ch] * s[ch]`. The folded conv itself is the conv
//! template with a bias epilogue, in [`super::conv`] and [`super::fused`].

use ldnc_ir::{Op, TensorType};

use super::{unsupported, Launch, LoweredStep, Lowering, THREADS};
use crate::cuda::builder::{Buffer, KernelBuilder};
use crate::cuda::kernel::{int, Expr};
use crate::cuda::Result;

/// Lowers `BnFoldWeight` and `BnFoldBias`.
pub fn lower(op: &Op, inputs: &[&TensorType], out: &TensorType) -> Result<LoweredStep> {
    let launch = match *op {
        Op::BnFoldWeight { eps } => fold_weight(out, eps)?,
        Op::BnFoldBias { eps } => fold_bias(inputs[0].dims[1], eps)?,
        _ => return Err(unsupported(op, "not a batch-norm fold")),
    };
    Ok(LoweredStep::single(launch))
}

/// `s = gamma[ch] * rsqrt(var[ch] + eps)` for `[2, c]` running statistics
/// and affine parameters.
fn scale(
    b: &mut KernelBuilder,
    (running, affine): (Buffer, Buffer),
    c: usize,
    eps: f32,
    ch: &Expr,
) -> Expr {
    b.let_(
        "s",
        affine.load(ch) * (running.load(ch + int(c)) + eps).rsqrt(),
    )
}

fn fold_weight(out: &TensorType, eps: f32) -> Result<Launch> {
    let mut l = Lowering::new("bn_fold_weight", THREADS);
    let c = out.channels();
    let total = out.per_item();
    l.doc(format!(
        "Folds a batch norm with running statistics into a conv weight of {total} elements and \
         {c} output channels: w'[i] = w[i] * gamma[ch] * rsqrt(var[ch] + {eps}) with ch = i % {c}. \
         One thread per element."
    ));
    let w = l.operand("w", 0);
    let norm = (l.operand("running", 1), l.operand("affine", 2));
    let y = l.result("folded");
    l.per_element(int(total), |b, i| {
        let ch = b.let_("ch", &i % int(c));
        let s = scale(b, norm, c, eps, &ch);
        b.store(y.mem(), &i, w.load(&i) * s);
    });
    l.finish()
}

fn fold_bias(c: usize, eps: f32) -> Result<Launch> {
    let mut l = Lowering::new("bn_fold_bias", THREADS);
    l.doc(format!(
        "Bias of a conv with a batch norm of {c} channels folded in: \
         b[ch] = beta[ch] - mean[ch] * gamma[ch] * rsqrt(var[ch] + {eps}). One thread per channel."
    ));
    let norm = (l.operand("running", 0), l.operand("affine", 1));
    let y = l.result("bias");
    l.per_element(int(c), |b, ch| {
        let s = scale(b, norm, c, eps, &ch);
        let (running, affine) = norm;
        b.store(
            y.mem(),
            &ch,
            affine.load(&ch + int(c)) - running.load(&ch) * s,
        );
    });
    l.finish()
}
