//! The fused BN-ReLU ops of the fusion pass, which read a channel
//! concatenation `x = concat(x_1 .. x_m)` without ever writing it.
//!
//! Every kernel takes one buffer parameter per input `x_i`, a `[pixels, c_i]`
//! matrix, and reads channel `ch` of the concatenation from the input that
//! contains it: with the channel offsets `o_i = c_1 + .. + c_(i-1)` compiled
//! in as constants, `concat_load` builds the chain
//! `ch < o_2 ? x_1[p * c_1 + ch] : ch < o_3 ? x_2[p * c_2 + ch - o_2] : ..`,
//! whose lazy `?:` reads one buffer only.
//!
//! With `inv = rsqrt(var + eps)`, `xhat = (x - mean) * inv`,
//! `u = gamma * xhat + beta` and `z = max(u, 0)`:
//!
//! - `ConcatStats` copies the `[2, c_i]` statistics into one `[2, C]` tensor,
//!   one thread per element;
//! - `BnReluConv` is `conv2d(z, w)` and `BnReluConvBackwardFilter` is
//!   `conv2d_backward_filter(z, dy)`, both the implicit-GEMM template of
//!   [`super::conv`] with an A loader that computes `z` from `x` while it
//!   stages the tile in shared memory. Padding taps load 0, the padding of
//!   `z`, not `bn(0)`;
//! - `BnReluGlobalAvgPool` averages `z` over the pixels of each image, one
//!   thread per image and channel, and `BnReluAvgPool` is the average pool
//!   of [`super::pool`] over `z`;
//! - `BnReluBackward` and `BnReluAffineGrad` are the batch-norm gradients of
//!   [`super::norm`] applied to `du = dz * [u > 0]`, with the mask
//!   recomputed from `x`. They run one block of 256 threads per channel with
//!   the same deterministic block reduction. `BnReluBackwardPart` is
//!   `BnReluBackward` for the channels of some of the inputs, one thread per
//!   element, with the two sums read from the affine gradient.

use ldnc_ir::{Op, TensorType};

use super::conv::{bias_epilogue, describe, emit, emit_with, Gemm, Geometry, GEMM_THREADS};
use super::norm::block_sum;
use super::pool::emit_avg_pool;
use super::{hwc, numel, unsupported, Launch, LoweredStep, Lowering, THREADS};
use crate::cuda::builder::{Buffer, KernelBuilder};
use crate::cuda::kernel::{block_idx, int, thread_idx, Axis, Expr};
use crate::cuda::Result;

/// Lowers the ops listed for this module in [`super`].
pub fn lower(op: &Op, inputs: &[&TensorType], out: &TensorType) -> Result<LoweredStep> {
    if let Op::ConcatStats = op {
        let channels: Vec<usize> = inputs.iter().map(|t| t.channels()).collect();
        check_width(op, &channels)?;
        return Ok(LoweredStep::single(concat_stats(&channels)?));
    }

    if let Op::BnReluAvgPool {
        k,
        stride,
        pad,
        eps,
    } = *op
    {
        let m = inputs.len() - 2;
        let parts: Vec<usize> = inputs[..m].iter().map(|t| t.channels()).collect();
        check_width(op, &parts)?;
        let (h, w, _) = hwc(op, inputs[0])?;
        let concat = TensorType::batched(&[h, w, parts.iter().sum()]);
        let launch = bn_relu_avg_pool(op, (&concat, out), (k, stride, pad), &parts, eps)?;
        return Ok(LoweredStep::single(launch));
    }
    if let Op::BnReluGlobalAvgPool { eps } = *op {
        let m = inputs.len() - 2;
        let parts: Vec<usize> = inputs[..m].iter().map(|t| t.channels()).collect();
        check_width(op, &parts)?;
        let (h, w, _) = hwc(op, inputs[0])?;
        return Ok(LoweredStep::single(bn_relu_global_avg_pool(
            h * w,
            &parts,
            eps,
        )?));
    }

    if let Op::BnReluBackwardPart { eps, start } = *op {
        let m = inputs.len() - 4;
        let parts: Vec<usize> = inputs[..m].iter().map(|t| t.channels()).collect();
        check_width(op, &parts)?;
        let (_, _, width) = hwc(op, inputs[m + 3])?;
        let launch = backward_part(out, &parts, eps, (start, width))?;
        return Ok(LoweredStep::single(launch));
    }

    // Every other fused op has operands (x_1 .. x_m, stats, affine, last),
    // with m >= 1, as the shape rule checked before lowering.
    let m = inputs.len() - 3 - usize::from(matches!(op, Op::BnReluConvBias { .. }));
    let parts: Vec<usize> = inputs[..m].iter().map(|t| t.channels()).collect();
    check_width(op, &parts)?;
    let (h, w, _) = hwc(op, inputs[0])?;
    let concat = TensorType::batched(&[h, w, parts.iter().sum()]);
    let last = inputs[m + 2];
    let launch = match *op {
        Op::BnReluConv {
            k,
            stride,
            pad,
            eps,
        } => {
            let g = Geometry::new(op, &concat, out, (k, stride, pad))?;
            bn_relu_conv(g, &parts, out.channels(), eps, None)?
        }
        Op::BnReluConvBias {
            k,
            stride,
            pad,
            eps,
            relu,
        } => {
            let g = Geometry::new(op, &concat, out, (k, stride, pad))?;
            bn_relu_conv(g, &parts, out.channels(), eps, Some(relu))?
        }
        Op::BnReluConvBackwardFilter {
            k,
            stride,
            pad,
            eps,
        } => {
            let g = Geometry::new(op, &concat, last, (k, stride, pad))?;
            bn_relu_conv_backward_filter(g, &parts, last.channels(), eps)?
        }
        Op::BnReluBackward { eps } => backward(&concat, &parts, eps, false)?,
        Op::BnReluAffineGrad { eps } => backward(&concat, &parts, eps, true)?,
        _ => return Err(unsupported(op, "not a fused BN-ReLU op")),
    };
    Ok(LoweredStep::single(launch))
}

/// Rejects a concatenation without channels, which would launch an empty
/// grid.
fn check_width(op: &Op, parts: &[usize]) -> Result<()> {
    if parts.iter().sum::<usize>() == 0 {
        return Err(unsupported(
            op,
            format!(
                "the concatenation of {} operand(s) has no channels",
                parts.len()
            ),
        ));
    }
    Ok(())
}

/// The inputs of a concatenation: each buffer with its channel count.
struct Concat {
    parts: Vec<(Buffer, usize)>,
}

impl Concat {
    /// Binds step operands `0 .. parts.len()` as `x1, x2, ..`.
    fn bind(l: &mut Lowering, parts: &[usize]) -> Concat {
        let parts = parts
            .iter()
            .enumerate()
            .map(|(i, &c)| (l.operand(&format!("x{}", i + 1), i), c))
            .collect();
        Concat { parts }
    }

    /// Channels of the concatenation.
    fn width(&self) -> usize {
        self.parts.iter().map(|&(_, c)| c).sum()
    }

    fn summary(&self) -> String {
        let counts: Vec<String> = self.parts.iter().map(|(_, c)| c.to_string()).collect();
        format!(
            "{} input(s) of [{}] channels",
            self.parts.len(),
            counts.join(", ")
        )
    }
}

/// Channel `ch` (`0 <= ch < C`) of pixel `pixel` of the concatenation,
/// read from the input that contains it.
fn concat_load(x: &Concat, pixel: &Expr, ch: &Expr) -> Expr {
    let mut ends = Vec::with_capacity(x.parts.len());
    let mut end = 0;
    for &(_, c) in &x.parts {
        end += c;
        ends.push(end);
    }
    let load = |i: usize| {
        let (buf, c) = x.parts[i];
        let offset = ends[i] - c;
        buf.load(pixel * int(c) + ch - int(offset))
    };
    // Built from the last input outward, so the first test is `ch < o_2`.
    let last = x.parts.len() - 1;
    let mut value = load(last);
    for i in (0..last).rev() {
        value = ch.lt(int(ends[i])).select(load(i), value);
    }
    value
}

/// Batch-norm constants of one channel, held in registers.
struct Norm {
    mean: Expr,
    inv: Expr,
    gamma: Expr,
    beta: Expr,
}

impl Norm {
    /// Loads mean, `inv = rsqrt(var + eps)`, gamma and beta of channel `ch`
    /// into registers, given `[2, C]` statistics and affine parameters.
    fn load(
        b: &mut KernelBuilder,
        (stats, affine): (Buffer, Buffer),
        c: usize,
        eps: f32,
        ch: &Expr,
    ) -> Norm {
        Norm {
            mean: b.let_("mean", stats.load(ch)),
            inv: b.let_("inv", (stats.load(ch + int(c)) + eps).rsqrt()),
            gamma: b.let_("gamma", affine.load(ch)),
            beta: b.let_("beta", affine.load(ch + int(c))),
        }
    }

    /// `u = gamma * (x - mean) * inv + beta`, before the ReLU.
    fn affine(&self, x: Expr) -> Expr {
        &self.gamma * ((x - &self.mean) * &self.inv) + &self.beta
    }
}

fn concat_stats(channels: &[usize]) -> Result<Launch> {
    let mut l = Lowering::new("concat_stats", THREADS);
    let parts: Vec<(Buffer, usize)> = channels
        .iter()
        .enumerate()
        .map(|(i, &c)| (l.operand(&format!("stats{}", i + 1), i), c))
        .collect();
    let stats = Concat { parts };
    let c = stats.width();
    l.doc(format!(
        "Concatenates the [2, c_i] statistics of {} along channels into [2, {c}]: element \
         (row, ch) is element (row, ch - o_i) of the part containing ch. One thread per element.",
        stats.summary()
    ));
    let y = l.result("stats");
    l.per_element(int(2 * c), |b, i| {
        let row = b.let_("row", &i / int(c));
        let ch = b.let_("ch", &i % int(c));
        // Part i is the [2, c_i] matrix; viewing row `row` of it as "pixel"
        // `row` of a [2, c_i] image makes `concat_load` index it directly.
        let value = concat_load(&stats, &row, &ch);
        b.store(y.mem(), &i, value);
    });
    l.finish()
}

/// Binds the statistics and affine operands that follow the inputs.
fn bind_norm(l: &mut Lowering, m: usize) -> (Buffer, Buffer) {
    (l.operand("stats", m), l.operand("affine", m + 1))
}

/// `y = conv2d(relu(bn(concat(x))), w)`: the `Conv2d` GEMM with
/// `A[s, tap * C + ci] = z` at tap `tap` of small pixel `s`, channel `ci`.
/// With `bias = Some(relu)` it is `BnReluConvBias`, which adds `b[co]` to
/// every output and rectifies when `relu`.
fn bn_relu_conv(
    g: Geometry,
    parts: &[usize],
    cout: usize,
    eps: f32,
    bias: Option<bool>,
) -> Result<Launch> {
    let name = if bias.is_some() {
        "bn_relu_conv_bias"
    } else {
        "bn_relu_conv"
    };
    let mut l = Lowering::new(name, GEMM_THREADS as u32);
    let x = Concat::bind(&mut l, parts);
    let cin = x.width();
    let epilogue = match bias {
        None => "",
        Some(false) => " The epilogue adds the bias b[co].",
        Some(true) => " The epilogue adds the bias b[co] and rectifies.",
    };
    l.doc(format!(
        "{} The A loader reads {} and applies z = max((x - mean) * rsqrt(var + {eps}) * gamma \
         + beta, 0) while staging the tile.{epilogue}",
        describe("Convolution of relu(bn(concat(x)))", &g, cin, cout),
        x.summary()
    ));
    let norm = bind_norm(&mut l, parts.len());
    let w = l.operand("w", parts.len() + 2);
    let epilogue = bias.map(|relu| bias_epilogue(l.operand("b", parts.len() + 3), relu));
    let y = l.result("y");
    let n = l.batch();

    let a = |b: &mut KernelBuilder, s: &Expr, kk: &Expr, _: &Expr| {
        let tap = b.let_("tap", kk / int(cin));
        let ci = b.let_("ci", kk % int(cin));
        let bn = Norm::load(b, norm, cin, eps, &ci);
        g.big_at_small_with(b, s, &tap, |pixel| {
            bn.affine(concat_load(&x, pixel, &ci)).max(0.0f32)
        })
    };
    let bl = |_: &mut KernelBuilder, kk: &Expr, co: &Expr, _: &Expr| w.load(kk * int(cout) + co);
    let out = |row: &Expr, col: &Expr, _: &Expr| row * int(cout) + col;
    let gemm = Gemm {
        m: n * int(g.small_pixels()),
        n: int(cout),
        k: int(g.taps() * cin),
        layers: 1,
        a: &a,
        b: &bl,
        y,
        out: &out,
    };
    match &epilogue {
        Some(epilogue) => emit_with(&mut l, gemm, epilogue),
        None => emit(&mut l, gemm),
    }
    l.finish()
}

/// `dw[tap] = z_tap^T dy`: the `Conv2dBackwardFilter` GEMM, one grid layer
/// per tap, with `A[ci, s] = z` at tap `blockIdx.z` of small pixel `s`.
fn bn_relu_conv_backward_filter(
    g: Geometry,
    parts: &[usize],
    cout: usize,
    eps: f32,
) -> Result<Launch> {
    let mut l = Lowering::new("bn_relu_conv_backward_filter", GEMM_THREADS as u32);
    let x = Concat::bind(&mut l, parts);
    let cin = x.width();
    l.doc(format!(
        "{} The A loader reads {} and recomputes z = max((x - mean) * rsqrt(var + {eps}) * \
         gamma + beta, 0) while staging the tile.",
        describe(
            "Weight gradient dw[tap] = z_tap^T dy of relu(bn(concat(x)))",
            &g,
            cin,
            cout
        ),
        x.summary()
    ));
    let norm = bind_norm(&mut l, parts.len());
    let dy = l.operand("dy", parts.len() + 2);
    let y = l.result("dw");
    let n = l.batch();

    let a = |b: &mut KernelBuilder, ci: &Expr, s: &Expr, tap: &Expr| {
        let bn = Norm::load(b, norm, cin, eps, ci);
        g.big_at_small_with(b, s, tap, |pixel| {
            bn.affine(concat_load(&x, pixel, ci)).max(0.0f32)
        })
    };
    let bl = |_: &mut KernelBuilder, s: &Expr, co: &Expr, _: &Expr| dy.load(s * int(cout) + co);
    let out = |row: &Expr, col: &Expr, z: &Expr| (z * int(cin) + row) * int(cout) + col;
    let gemm = Gemm {
        m: int(cin),
        n: int(cout),
        k: n * int(g.small_pixels()),
        layers: g.taps(),
        a: &a,
        b: &bl,
        y,
        out: &out,
    };
    emit(&mut l, gemm);
    l.finish()
}

/// `y[img, ch] = mean over the pixels of z`: one thread per output element,
/// with consecutive threads on consecutive channels so that the loads of a
/// warp coalesce within each input, and the pixels summed in order.
fn bn_relu_global_avg_pool(pixels: usize, parts: &[usize], eps: f32) -> Result<Launch> {
    let mut l = Lowering::new("bn_relu_global_avg_pool", THREADS);
    let x = Concat::bind(&mut l, parts);
    let c = x.width();
    l.doc(format!(
        "Global average pool over {pixels} pixels of z = max((x - mean) * rsqrt(var + {eps}) * \
         gamma + beta, 0) for {}: y[img, ch] = sum over pixels of z / {pixels}. One thread per \
         output element sums its pixels in order.",
        x.summary()
    ));
    let norm = bind_norm(&mut l, parts.len());
    let y = l.result("y");
    let n = l.batch();
    l.per_element(n * int(c), |b, i| {
        let img = b.let_("img", &i / int(c));
        let ch = b.let_("ch", &i % int(c));
        let bn = Norm::load(b, norm, c, eps, &ch);
        let acc = b.let_("acc", 0.0f32);
        b.for_("p", 0, int(pixels), 1, |b, p| {
            let pixel = &img * int(pixels) + p;
            let z = bn.affine(concat_load(&x, &pixel, &ch)).max(0.0f32);
            b.assign(&acc, &acc + z);
        });
        b.store(y.mem(), &i, &acc * (1.0 / pixels as f32));
    });
    l.finish()
}

/// `y = avg_pool(z)`: the average pool of [`super::pool`] with taps that
/// normalise and rectify the input they read.
fn bn_relu_avg_pool(
    op: &Op,
    types: (&TensorType, &TensorType),
    window: (usize, usize, usize),
    parts: &[usize],
    eps: f32,
) -> Result<Launch> {
    let mut l = Lowering::new("bn_relu_avg_pool", THREADS);
    let x = Concat::bind(&mut l, parts);
    let c = x.width();
    let (k, stride, pad) = window;
    l.doc(format!(
        "{k}x{k} average pooling, stride {stride}, padding {pad}, dividing by the in-bounds \
         taps, of z = max((x - mean) * rsqrt(var + {eps}) * gamma + beta, 0) for {}. One thread \
         per output element.",
        x.summary()
    ));
    let norm = bind_norm(&mut l, parts.len());
    let tap = |b: &mut KernelBuilder, pixel: &Expr, ch: &Expr| {
        let bn = Norm::load(b, norm, c, eps, ch);
        bn.affine(concat_load(&x, pixel, ch)).max(0.0f32)
    };
    emit_avg_pool(&mut l, op, types, window, &tap)?;
    l.finish()
}

/// Gradients of `z = relu(bn(x))` through the batch statistics, with
/// `du = dz * [u > 0]` and `m = N * h * w` rows per channel.
///
/// `BnReluBackward` (`affine_grad == false`) writes
/// `dx = gamma * inv / m * (m * du - sum du - xhat * sum(du * xhat))` into
/// the concatenation layout; `BnReluAffineGrad` writes
/// `[sum du * xhat; sum du]`. Both reduce the same two sums per channel.
fn backward(concat: &TensorType, parts: &[usize], eps: f32, affine_grad: bool) -> Result<Launch> {
    let name = if affine_grad {
        "bn_relu_affine_grad"
    } else {
        "bn_relu_backward"
    };
    let mut l = Lowering::new(name, THREADS);
    let x = Concat::bind(&mut l, parts);
    let c = x.width();
    let what = if affine_grad {
        "Gradients of gamma and beta as [sum du * xhat; sum du]"
    } else {
        "Input gradient of batch norm through the batch statistics"
    };
    l.doc(format!(
        "{what} inside relu(bn(concat(x))) for {c} channels, with du = dz * [u > 0] and the mask \
         recomputed from x, which is read as {}. One block of {THREADS} threads per channel \
         reduces sum(du) and sum(du * xhat) deterministically{}.",
        x.summary(),
        if affine_grad {
            ""
        } else {
            ", then writes dx for its channel"
        }
    ));
    let norm = bind_norm(&mut l, parts.len());
    let dz = l.operand("dz", parts.len() + 2);
    let out = l.result(if affine_grad { "grad" } else { "dx" });
    let n = l.batch();
    let scratch = l.shared("partial", THREADS as usize);
    l.grid(int(c), 1, 1);

    let b = &mut *l;
    let ch = b.let_("ch", block_idx(Axis::X));
    let tid = b.let_("tid", thread_idx(Axis::X));
    let rows = b.let_("rows", numel(concat, &n) / int(c));
    let bn = Norm::load(b, norm, c, eps, &ch);
    // The masked gradient `du` and `xhat` of row `r`, as registers.
    let masked = |b: &mut KernelBuilder, r: &Expr| {
        let xhat = b.let_("xhat", (concat_load(&x, r, &ch) - &bn.mean) * &bn.inv);
        let u = &bn.gamma * &xhat + &bn.beta;
        let du = b.let_("du", u.gt(0.0f32).select(dz.load(r * int(c) + &ch), 0.0f32));
        (xhat, du)
    };

    let acc_du = b.let_("acc_du", 0.0f32);
    let acc_du_xhat = b.let_("acc_du_xhat", 0.0f32);
    b.for_("r", &tid, &rows, THREADS as i32, |b, r| {
        let (xhat, du) = masked(b, &r);
        b.assign(&acc_du, &acc_du + &du);
        b.assign(&acc_du_xhat, &acc_du_xhat + du * xhat);
    });
    let sum_du = block_sum(b, scratch, &tid, acc_du.clone());
    let sum_du_xhat = block_sum(b, scratch, &tid, acc_du_xhat.clone());

    if affine_grad {
        b.if_(tid.equals(0), |b| {
            b.store(out.mem(), &ch, &sum_du_xhat);
            b.store(out.mem(), &ch + int(c), &sum_du);
        });
    } else {
        let mf = b.let_("m", rows.to_f32());
        let scale = b.let_("scale", &bn.gamma * &bn.inv);
        b.for_("r", &tid, &rows, THREADS as i32, |b, r| {
            let (xhat, du) = masked(b, &r);
            let centred = du - &sum_du / &mf - xhat * (&sum_du_xhat / &mf);
            b.store(out.mem(), r * int(c) + &ch, &scale * centred);
        });
    }
    l.finish()
}

/// `BnReluBackwardPart`: the `BnReluBackward` formula
/// `dx = gamma * inv * (du - sum du / m - xhat * sum(du * xhat) / m)` for
/// the `c` channels of `parts`, which are channels `start ..` of the `width`
/// channels of `dz`, `stats`, `affine` and `daffine`. The sums come from
/// `daffine = [sum du * xhat; sum du]`, so one thread per output element
/// computes it with no reduction.
fn backward_part(
    out: &TensorType,
    parts: &[usize],
    eps: f32,
    (start, width): (usize, usize),
) -> Result<Launch> {
    let mut l = Lowering::new("bn_relu_backward_part", THREADS);
    let x = Concat::bind(&mut l, parts);
    let c = x.width();
    l.doc(format!(
        "Input gradient of batch norm through the batch statistics inside \
         relu(bn(concat(x))) for channels {start}..{} of the {width} of dz, stats, affine and \
         daffine, with du = dz * [u > 0] and the mask recomputed from x, which is read as {}. \
         The sums come from daffine = [sum du * xhat; sum du]. One thread per element.",
        start + c,
        x.summary()
    ));
    let norm = bind_norm(&mut l, parts.len());
    let daffine = l.operand("daffine", parts.len() + 2);
    let dz = l.operand("dz", parts.len() + 3);
    let dx = l.result("dx");
    let n = l.batch();
    let total = numel(out, &n);
    let rows = total.clone() / int(c);

    l.per_element(total, |b, i| {
        let r = b.let_("r", &i / int(c));
        let ch = b.let_("ch", &i % int(c));
        let col = b.let_("col", &ch + int(start));
        let bn = Norm::load(b, norm, width, eps, &col);
        let mf = b.let_("m", rows.to_f32());
        let sum_du_xhat = b.let_("sum_du_xhat", daffine.load(&col));
        let sum_du = b.let_("sum_du", daffine.load(&col + int(width)));

        let xhat = b.let_("xhat", (concat_load(&x, &r, &ch) - &bn.mean) * &bn.inv);
        let u = &bn.gamma * &xhat + &bn.beta;
        let grad = dz.load(&r * int(width) + &col);
        let du = b.let_("du", u.gt(0.0f32).select(grad, 0.0f32));
        let centred = du - &sum_du / &mf - xhat * (&sum_du_xhat / &mf);
        b.store(dx.mem(), &i, &bn.gamma * &bn.inv * centred);
    });
    l.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernel::ParamKind;

    fn lower_fused(op: &Op, inputs: &[TensorType]) -> LoweredStep {
        let types: Vec<&TensorType> = inputs.iter().collect();
        let out = op.infer(&types).expect("the sample operands fit the op");
        crate::cuda::lower::lower_step(op, &types, &out).expect("the fused op lowers")
    }

    /// Names of the buffer parameters a kernel writes.
    fn written(step: &LoweredStep) -> Vec<String> {
        step.launches[0]
            .kernel
            .params
            .iter()
            .filter(|p| p.kind == ParamKind::Buffer { writes: true })
            .map(|p| p.name.clone())
            .collect()
    }

    #[test]
    fn conv_reads_each_input_and_writes_only_y() {
        let x = |c| TensorType::batched(&[5, 5, c]);
        let op = Op::BnReluConv {
            k: 3,
            stride: 1,
            pad: 1,
            eps: 1e-5,
        };
        let inputs = [
            x(2),
            x(3),
            x(4),
            TensorType::fixed(&[2, 9]),
            TensorType::fixed(&[2, 9]),
            TensorType::fixed(&[3, 3, 9, 4]),
        ];
        let step = lower_fused(&op, &inputs);
        assert_eq!(step.launches.len(), 1);
        assert!(step.scratch.is_empty(), "no concatenation is staged");
        let names: Vec<&str> = step.launches[0]
            .kernel
            .params
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["x1", "x2", "x3", "stats", "affine", "w", "y", "n"]);
        assert_eq!(written(&step), ["y"]);
    }

    #[test]
    fn backward_writes_one_block_per_channel() {
        let op = Op::BnReluBackward { eps: 1e-5 };
        let inputs = [
            TensorType::batched(&[3, 3, 1]),
            TensorType::batched(&[3, 3, 4]),
            TensorType::fixed(&[2, 5]),
            TensorType::fixed(&[2, 5]),
            TensorType::batched(&[3, 3, 5]),
        ];
        let step = lower_fused(&op, &inputs);
        let kernel = &step.launches[0].kernel;
        assert_eq!(kernel.grid[0], int(5));
        assert_eq!(written(&step), ["dx"]);
    }

    #[test]
    fn backward_part_reads_one_input_and_its_columns() {
        let op = Op::BnReluBackwardPart {
            eps: 1e-5,
            start: 1,
        };
        let inputs = [
            TensorType::batched(&[3, 3, 4]),
            TensorType::fixed(&[2, 5]),
            TensorType::fixed(&[2, 5]),
            TensorType::fixed(&[2, 5]),
            TensorType::batched(&[3, 3, 5]),
        ];
        let step = lower_fused(&op, &inputs);
        let kernel = &step.launches[0].kernel;
        assert_eq!(kernel.name, "bn_relu_backward_part");
        let names: Vec<&str> = kernel.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["x1", "stats", "affine", "daffine", "dz", "dx", "n"]);
        assert_eq!(written(&step), ["dx"]);
    }

    #[test]
    fn concat_stats_rejects_no_channels() {
        let err =
            crate::cuda::lower::lower_step(&Op::ConcatStats, &[], &TensorType::fixed(&[2, 0]))
                .expect_err("no statistics to concatenate");
        assert!(err.to_string().contains("has no channels"), "{err}");
    }

    #[test]
    fn concat_load_selects_by_offset() {
        let mut b = KernelBuilder::new("probe", [1, 1, 1]);
        let x = Concat {
            parts: vec![(b.input("x1"), 2), (b.input("x2"), 3)],
        };
        let value = concat_load(&x, &int(1), &Expr::Param(9));
        // ch < 2 ? x1[1 * 2 + ch] : x2[1 * 3 + ch - 2]
        let Expr::Select(cond, first, second) = value else {
            panic!("two inputs give one select, found {value:?}");
        };
        assert_eq!(*cond, Expr::Param(9).lt(int(2)));
        assert_eq!(*first, Buffer(0).load(int(2) + Expr::Param(9)));
        assert_eq!(*second, Buffer(1).load(int(3) + Expr::Param(9) - int(2)));
    }
}
