//! Batch norm: statistics, normalisation and the two gradients.
//!
//! With `m = N * h * w` rows per channel, `mean = sum x / m`, the biased
//! `var = sum (x - mean)^2 / m`, `inv = 1 / sqrt(var + eps)` and
//! `xhat = (x - mean) * inv`, the forward op is `y = gamma * xhat + beta`
//! (Ioffe and Szegedy, "Batch Normalization", 2015).
//!
//! The reducing kernels run one block of 256 threads per channel. Thread `t`
//! adds rows `t, t + 256, ...` in order, then [`block_sum`] combines the 256
//! partial sums with a fixed tree: halving steps in shared memory down to 32
//! values, then five `__shfl_down_sync` steps inside warp 0. The order of
//! every addition is fixed by the thread index, so the result is the same on
//! every run. Statistics take two passes (mean, then squared deviations), as
//! the reference does, so that a large mean does not cancel the variance.

use ldnc_ir::{Op, TensorType};

use super::{numel, unsupported, LoweredStep, Lowering, THREADS};
use crate::cuda::builder::{KernelBuilder, Shared};
use crate::cuda::kernel::{block_idx, int, thread_idx, Axis, Expr};
use crate::cuda::Result;

/// Lowers the ops listed for this module in [`super`].
pub fn lower(op: &Op, inputs: &[&TensorType], out: &TensorType) -> Result<LoweredStep> {
    let x = inputs[0];
    let c = x.channels();
    let launch = match op {
        Op::BnStats => stats(x, c)?,
        Op::BnApply { eps } => apply(*eps, out, c)?,
        Op::BnBackward { eps } => backward(*eps, x, c, false)?,
        Op::BnAffineGrad { eps } => backward(*eps, x, c, true)?,
        _ => return Err(unsupported(op, "not a batch-norm op")),
    };
    Ok(LoweredStep::single(launch))
}

/// Sums `value` over the block and returns a register that holds the total
/// in every thread. `scratch` must hold one float per thread; the block size
/// must be a power of two of at least 64. Every thread must call it.
pub(crate) fn block_sum(b: &mut KernelBuilder, scratch: Shared, tid: &Expr, value: Expr) -> Expr {
    let threads = b.block_x() as usize;
    debug_assert!(threads.is_power_of_two() && threads >= 64);
    b.store(scratch.mem(), tid, value);
    b.barrier();
    let mut half = threads / 2;
    while half >= 32 {
        b.if_(tid.lt(int(half)), |b| {
            b.store(
                scratch.mem(),
                tid,
                scratch.load(tid) + scratch.load(tid + int(half)),
            );
        });
        b.barrier();
        half /= 2;
    }
    b.if_(tid.lt(32), |b| {
        let v = b.let_("warp_sum", scratch.load(tid));
        let other = b.let_("other", 0.0f32);
        for offset in [16, 8, 4, 2, 1] {
            b.shfl_down(&other, &v, offset);
            b.assign(&v, &v + &other);
        }
        b.if_(tid.equals(0), |b| b.store(scratch.mem(), 0, &v));
    });
    b.barrier();
    let total = b.let_("total", scratch.load(0));
    // The next reduction may overwrite the scratch array only after every
    // thread has read the total.
    b.barrier();
    total
}

/// Rows per channel: `n * h * w`.
fn rows(x: &TensorType, n: &Expr, c: usize) -> Expr {
    numel(x, n) / int(c)
}

fn stats(x_ty: &TensorType, c: usize) -> Result<super::Launch> {
    let mut l = Lowering::new("bn_stats", THREADS);
    l.doc(format!(
        "Per-channel mean and biased variance of {c} channels as a [2, {c}] tensor. One block \
         of {THREADS} threads per channel; two deterministic block reductions."
    ));
    let x = l.operand("x", 0);
    let stats = l.result("stats");
    let n = l.batch();
    let scratch = l.shared("partial", THREADS as usize);
    l.grid(int(c), 1, 1);
    let b = &mut *l;
    let ch = b.let_("ch", block_idx(Axis::X));
    let tid = b.let_("tid", thread_idx(Axis::X));
    let m = b.let_("rows", rows(x_ty, &n, c));

    let acc = b.let_("acc", 0.0f32);
    b.for_("r", &tid, &m, THREADS as i32, |b, r| {
        b.assign(&acc, &acc + x.load(r * int(c) + &ch));
    });
    let sum = block_sum(b, scratch, &tid, acc.clone());
    let mean = b.let_("mean", sum / m.to_f32());

    let sq = b.let_("sq", 0.0f32);
    b.for_("r", &tid, &m, THREADS as i32, |b, r| {
        let d = b.let_("d", x.load(r * int(c) + &ch) - &mean);
        b.assign(&sq, &sq + &d * &d);
    });
    let sum_sq = block_sum(b, scratch, &tid, sq.clone());
    b.if_(tid.equals(0), |b| {
        b.store(stats.mem(), &ch, &mean);
        b.store(stats.mem(), &ch + int(c), sum_sq / m.to_f32());
    });
    l.finish()
}

fn apply(eps: f32, out: &TensorType, c: usize) -> Result<super::Launch> {
    let mut l = Lowering::new("bn_apply", THREADS);
    l.doc(format!(
        "y = gamma * (x - mean) * rsqrt(var + {eps}) + beta over {c} channels. One thread per \
         element."
    ));
    let x = l.operand("x", 0);
    let stats = l.operand("stats", 1);
    let affine = l.operand("affine", 2);
    let y = l.result("y");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let ch = b.let_("ch", &i % int(c));
        let inv = b.let_("inv", (stats.load(&ch + int(c)) + eps).rsqrt());
        let xhat = b.let_("xhat", (x.load(&i) - stats.load(&ch)) * inv);
        b.store(
            y.mem(),
            &i,
            affine.load(&ch) * xhat + affine.load(&ch + int(c)),
        );
    });
    l.finish()
}

/// `BnBackward` (`affine_grad == false`) writes
/// `dx = gamma * inv / m * (m * dy - sum dy - xhat * sum(dy * xhat))`;
/// `BnAffineGrad` writes `[sum dy * xhat; sum dy]`. Both reduce the same two
/// sums with one block per channel.
fn backward(eps: f32, x_ty: &TensorType, c: usize, affine_grad: bool) -> Result<super::Launch> {
    let name = if affine_grad {
        "bn_affine_grad"
    } else {
        "bn_backward"
    };
    let mut l = Lowering::new(name, THREADS);
    l.doc(format!(
        "{} for {c} channels. One block of {THREADS} threads per channel reduces sum(dy) and \
         sum(dy * xhat) deterministically{}.",
        if affine_grad {
            "Gradients of gamma and beta as [sum dy * xhat; sum dy]"
        } else {
            "Input gradient of batch norm through the batch statistics"
        },
        if affine_grad {
            ""
        } else {
            ", then writes dx for its channel"
        }
    ));
    let x = l.operand("x", 0);
    let stats = l.operand("stats", 1);
    let affine = (!affine_grad).then(|| l.operand("affine", 2));
    let dy = l.operand("dy", if affine_grad { 2 } else { 3 });
    let out = l.result(if affine_grad { "grad" } else { "dx" });
    let n = l.batch();
    let scratch = l.shared("partial", THREADS as usize);
    l.grid(int(c), 1, 1);
    let b = &mut *l;
    let ch = b.let_("ch", block_idx(Axis::X));
    let tid = b.let_("tid", thread_idx(Axis::X));
    let m = b.let_("rows", rows(x_ty, &n, c));
    let mean = b.let_("mean", stats.load(&ch));
    let inv = b.let_("inv", (stats.load(&ch + int(c)) + eps).sqrt());
    b.assign(&inv, 1.0f32 / &inv);

    let acc_dy = b.let_("acc_dy", 0.0f32);
    let acc_dy_xhat = b.let_("acc_dy_xhat", 0.0f32);
    b.for_("r", &tid, &m, THREADS as i32, |b, r| {
        let at = b.let_("at", r * int(c) + &ch);
        let g = b.let_("g", dy.load(&at));
        b.assign(&acc_dy, &acc_dy + &g);
        b.assign(
            &acc_dy_xhat,
            &acc_dy_xhat + g * ((x.load(&at) - &mean) * &inv),
        );
    });
    let sum_dy = block_sum(b, scratch, &tid, acc_dy.clone());
    let sum_dy_xhat = block_sum(b, scratch, &tid, acc_dy_xhat.clone());

    match affine {
        None => {
            b.if_(tid.equals(0), |b| {
                b.store(out.mem(), &ch, &sum_dy_xhat);
                b.store(out.mem(), &ch + int(c), &sum_dy);
            });
        }
        Some(affine) => {
            let mf = b.let_("m", m.to_f32());
            let scale = b.let_("scale", affine.load(&ch) * &inv);
            b.for_("r", &tid, &m, THREADS as i32, |b, r| {
                let at = b.let_("at", r * int(c) + &ch);
                let xhat = b.let_("xhat", (x.load(&at) - &mean) * &inv);
                let centred = dy.load(&at) - &sum_dy / &mf - xhat * (&sum_dy_xhat / &mf);
                b.store(out.mem(), &at, &scale * centred);
            });
        }
    }
    l.finish()
}
