//! Element-wise ops and copies: one thread per output element, 256 threads
//! per block and as many blocks as the output needs. These kernels are bound
//! by memory bandwidth, and consecutive threads touch consecutive elements so
//! that every warp's loads and stores coalesce.
//!
//! `DropoutMask` draws with a counter-based hash: element `i` is kept when
//! `uniform(seed, i) >= p`, with `uniform` built from the SplitMix64 output
//! function (Steele, Lea and Flood, "Fast Splittable Pseudorandom Number
//! Generators", OOPSLA 2014) exactly as the CPU reference kernels draw it, so
//! both back ends produce the same mask for the same seed.

use ldnc_ir::{Op, TensorType};

use super::{hwc, numel, unsupported, LoweredStep, Lowering};
use crate::cuda::builder::KernelBuilder;
use crate::cuda::kernel::{float, int, Expr, Ty};
use crate::cuda::Result;

/// Lowers the ops listed for this module in [`super`].
pub fn lower(op: &Op, inputs: &[&TensorType], out: &TensorType) -> Result<LoweredStep> {
    let launch = match op {
        Op::Relu => unary(op, out, "y = max(x, 0).", |_, x| x.max(0.0f32))?,
        Op::Scale { factor } => unary(op, out, "y = factor * x.", |_, x| float(*factor) * x)?,
        Op::ReluBackward => relu_backward(out)?,
        Op::Mul => nary(op, inputs.len(), out)?,
        Op::Sum => nary(op, inputs.len(), out)?,
        Op::DropoutMask { p } => dropout_mask(op, *p, out)?,
        Op::Concat => return concat(op, inputs, out),
        Op::Slice { start, len } => slice(inputs[0].channels(), *start, *len, out)?,
        Op::Crop { h, w } => crop(op, inputs[0], *h, *w, out)?,
        Op::CropBackward { h, w } => crop_backward(op, inputs[0], *h, *w, out)?,
        Op::SumBatch => sum_batch(inputs[0])?,
        Op::GlobalAvgPoolBackward { h, w } => global_avg_pool_backward(h * w, out)?,
        _ => return Err(unsupported(op, "not an element-wise op")),
    };
    Ok(LoweredStep::single(launch))
}

/// `y[i] = f(x[i])`.
fn unary(
    op: &Op,
    out: &TensorType,
    doc: &str,
    f: impl FnOnce(&mut KernelBuilder, Expr) -> Expr,
) -> Result<super::Launch> {
    let mut l = Lowering::new(op.name(), super::THREADS);
    l.doc(format!("{doc} One thread per element."));
    let x = l.operand("x", 0);
    let y = l.result("y");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let value = f(b, x.load(&i));
        b.store(y.mem(), &i, value);
    });
    l.finish()
}

/// `dx = x > 0 ? dy : 0`, the gradient of ReLU with 0 at `x = 0`.
fn relu_backward(out: &TensorType) -> Result<super::Launch> {
    let mut l = Lowering::new("relu_backward", super::THREADS);
    l.doc("dx = dy where x > 0 and 0 elsewhere. One thread per element.");
    let x = l.operand("x", 0);
    let dy = l.operand("dy", 1);
    let dx = l.result("dx");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        b.store(
            dx.mem(),
            &i,
            x.load(&i).gt(0.0f32).select(dy.load(&i), 0.0f32),
        );
    });
    l.finish()
}

/// Product or sum of any number of operands, folded left to right from the
/// first operand as the reference does.
fn nary(op: &Op, parts: usize, out: &TensorType) -> Result<super::Launch> {
    let mut l = Lowering::new(&format!("{}{parts}", op.name()), super::THREADS);
    let product = matches!(op, Op::Mul);
    l.doc(format!(
        "Element-wise {} of {parts} operands. One thread per element.",
        if product { "product" } else { "sum" }
    ));
    let xs: Vec<_> = (0..parts).map(|k| l.operand(&format!("x{k}"), k)).collect();
    let y = l.result("y");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let mut acc = xs[0].load(&i);
        for x in &xs[1..] {
            acc = if product {
                acc * x.load(&i)
            } else {
                acc + x.load(&i)
            };
        }
        b.store(y.mem(), &i, acc);
    });
    l.finish()
}

/// The SplitMix64 output function on a `U64` expression.
fn splitmix64(b: &mut KernelBuilder, name: &str, z: Expr) -> Expr {
    let z = b.let_(name, z + 0x9E37_79B9_7F4A_7C15u64);
    b.assign(&z, z.xor(z.shr(30)) * 0xBF58_476D_1CE4_E5B9u64);
    b.assign(&z, z.xor(z.shr(27)) * 0x94D0_49BB_1331_11EBu64);
    z.xor(z.shr(31))
}

fn dropout_mask(op: &Op, p: f32, out: &TensorType) -> Result<super::Launch> {
    if !(0.0..1.0).contains(&p) {
        return Err(unsupported(
            op,
            format!("drop probability {p} is not in [0, 1)"),
        ));
    }
    let keep = 1.0 / (1.0 - p);
    let mut l = Lowering::new("dropout_mask", super::THREADS);
    l.doc(format!(
        "Inverted-dropout mask with drop probability {p}: {keep} where the counter-based draw \
         uniform(seed, i) >= p, else 0. One thread per element."
    ));
    let y = l.result("mask");
    let n = l.batch();
    let seed = l.seed();
    l.per_element(numel(out, &n), |b, i| {
        let inner = splitmix64(b, "h", i.cast(Ty::U64));
        let bits = splitmix64(b, "z", seed.xor(inner));
        // The top 24 bits fill an f32 mantissa exactly.
        let u = b.let_("u", bits.shr(40).to_f32() / 16_777_216.0f32);
        b.store(y.mem(), &i, u.ge(p).select(keep, 0.0f32));
    });
    l.finish()
}

/// One launch per operand, each copying its channels into its slice of
/// every output pixel.
fn concat(op: &Op, inputs: &[&TensorType], out: &TensorType) -> Result<LoweredStep> {
    let total = out.channels();
    let mut at = 0;
    let mut launches = Vec::with_capacity(inputs.len());
    for (k, ty) in inputs.iter().enumerate() {
        let c = ty.channels();
        let mut l = Lowering::new(&format!("concat_part{k}"), super::THREADS);
        l.doc(format!(
            "Copies the {c} channels of operand {k} to channels {at}..{} of the {total}-channel \
             output. One thread per copied element.",
            at + c
        ));
        let x = l.operand("x", k);
        let y = l.result("y");
        let n = l.batch();
        l.per_element(numel(ty, &n), |b, i| {
            let pixel = b.let_("pixel", &i / int(c.max(1)));
            let ch = b.let_("ch", &i % int(c.max(1)));
            b.store(y.mem(), pixel * int(total) + int(at) + ch, x.load(&i));
        });
        launches.push(l.finish()?);
        at += c;
    }
    if launches.is_empty() {
        return Err(unsupported(op, "concat of no operands"));
    }
    Ok(LoweredStep {
        scratch: Vec::new(),
        launches,
    })
}

fn slice(c: usize, start: usize, len: usize, out: &TensorType) -> Result<super::Launch> {
    let mut l = Lowering::new("slice", super::THREADS);
    l.doc(format!(
        "Channels {start}..{} of a {c}-channel input. One thread per output element.",
        start + len
    ));
    let x = l.operand("x", 0);
    let y = l.result("y");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let pixel = b.let_("pixel", &i / int(len));
        let ch = b.let_("ch", &i % int(len));
        b.store(y.mem(), &i, x.load(pixel * int(c) + int(start) + ch));
    });
    l.finish()
}

/// Splits a flat NHWC index over images of `h x w x c` into registers
/// `(img, y, x, ch)`.
fn split_nhwc(b: &mut KernelBuilder, i: &Expr, h: usize, w: usize, c: usize) -> [Expr; 4] {
    let ch = b.let_("ch", i % int(c));
    let pixel = b.let_("pixel", i / int(c));
    let x = b.let_("px", &pixel % int(w));
    let y = b.let_("py", (&pixel / int(w)) % int(h));
    let img = b.let_("img", &pixel / int(h * w));
    [img, y, x, ch]
}

fn crop(
    op: &Op,
    input: &TensorType,
    h: usize,
    w: usize,
    out: &TensorType,
) -> Result<super::Launch> {
    let (sh, sw, c) = hwc(op, input)?;
    let mut l = Lowering::new("crop", super::THREADS);
    l.doc(format!(
        "Top-left {h}x{w} crop of {sh}x{sw} images. One thread per output element."
    ));
    let x = l.operand("x", 0);
    let y = l.result("y");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let [img, py, px, ch] = split_nhwc(b, &i, h, w, c);
        let src = ((img * int(sh) + py) * int(sw) + px) * int(c) + ch;
        b.store(y.mem(), &i, x.load(src));
    });
    l.finish()
}

/// Gradient of a crop: the `dy` image at the top left of a zero image.
fn crop_backward(
    op: &Op,
    grad: &TensorType,
    h: usize,
    w: usize,
    out: &TensorType,
) -> Result<super::Launch> {
    let (gh, gw, c) = hwc(op, grad)?;
    let mut l = Lowering::new("crop_backward", super::THREADS);
    l.doc(format!(
        "Places {gh}x{gw} gradients at the top left of zero {h}x{w} images. One thread per \
         output element, so every element is written."
    ));
    let dy = l.operand("dy", 0);
    let dx = l.result("dx");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let [img, py, px, ch] = split_nhwc(b, &i, h, w, c);
        let inside = py.lt(int(gh)).and(px.lt(int(gw)));
        let src = ((img * int(gh) + &py) * int(gw) + &px) * int(c) + ch;
        b.store(dx.mem(), &i, inside.select(dy.load(src), 0.0f32));
    });
    l.finish()
}

/// Sum over the batch: one thread per element of an image, adding the batch
/// in order, which makes the sum deterministic.
fn sum_batch(input: &TensorType) -> Result<super::Launch> {
    let per = input.per_item();
    let mut l = Lowering::new("sum_batch", super::THREADS);
    l.doc("y[j] = sum over images of x[img, j]. One thread per j, adding images in order.");
    let x = l.operand("x", 0);
    let y = l.result("y");
    let n = l.batch();
    l.per_element(int(per), |b, j| {
        let acc = b.let_("acc", 0.0f32);
        b.for_("img", 0, &n, 1, |b, img| {
            b.assign(&acc, &acc + x.load(img * int(per) + &j))
        });
        b.store(y.mem(), &j, acc);
    });
    l.finish()
}

/// `dx[img, pixel, ch] = dy[img, ch] / pixels`.
fn global_avg_pool_backward(pixels: usize, out: &TensorType) -> Result<super::Launch> {
    let c = out.channels();
    let mut l = Lowering::new("global_avg_pool_backward", super::THREADS);
    l.doc(format!(
        "Spreads dy[img, ch] evenly over the {pixels} pixels of image img. One thread per \
         output element."
    ));
    let dy = l.operand("dy", 0);
    let dx = l.result("dx");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let img = b.let_("img", &i / int(pixels * c));
        let ch = b.let_("ch", &i % int(c));
        b.store(dx.mem(), &i, dy.load(img * int(c) + ch) / (pixels as f32));
    });
    l.finish()
}
