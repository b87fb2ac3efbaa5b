//! Pooling: average and max pooling with square windows, their gradients,
//! and global average pooling.
//!
//! Average pooling divides by the number of in-bounds taps (PyTorch's
//! `count_include_pad=False`), and max pooling never picks a padded tap, with
//! ties going to the first tap in row-major window order. The forward kernels
//! run one thread per output element. The backward kernels run one thread per
//! input element and gather from the windows that contain it, recomputing the
//! tap count or the argmax of each, so no two threads write one element and
//! no atomics are needed.

use ldnc_ir::{Op, TensorType};

use super::{hwc, int, numel, unsupported, LoweredStep, Lowering, THREADS};
use crate::cuda::builder::{Buffer, KernelBuilder};
use crate::cuda::kernel::Expr;
use crate::cuda::Result;

/// A `k x k` window with `stride` and `pad` between a big image (`bh x bw`)
/// and the small image of window positions (`sh x sw`), both with `c` channels.
#[derive(Debug, Clone, Copy)]
struct Window {
    k: usize,
    stride: usize,
    pad: usize,
    bh: usize,
    bw: usize,
    sh: usize,
    sw: usize,
    c: usize,
}

/// Positions of a window sweep along one axis, `None` when it does not fit.
pub(crate) fn window_count(size: usize, k: usize, stride: usize, pad: usize) -> Option<usize> {
    (size + 2 * pad)
        .checked_sub(k)
        .filter(|_| stride > 0)
        .map(|span| span / stride + 1)
}

impl Window {
    fn new(
        op: &Op,
        big: &TensorType,
        small: &TensorType,
        (k, stride, pad): (usize, usize, usize),
    ) -> Result<Window> {
        let (bh, bw, c) = hwc(op, big)?;
        let (sh, sw, cs) = hwc(op, small)?;
        if pad >= k {
            return Err(unsupported(
                op,
                format!("padding {pad} must be smaller than the {k}x{k} window"),
            ));
        }
        let swept = window_count(bh, k, stride, pad).zip(window_count(bw, k, stride, pad));
        if swept != Some((sh, sw)) || c != cs {
            return Err(unsupported(
                op,
                format!("a {k}x{k} window with stride {stride} and padding {pad} does not map {big} to {small}"),
            ));
        }
        Ok(Window {
            k,
            stride,
            pad,
            bh,
            bw,
            sh,
            sw,
            c,
        })
    }

    /// First big-side row (or column) of window position `s`, possibly negative.
    fn origin(&self, s: &Expr) -> Expr {
        s * int(self.stride) - int(self.pad)
    }

    /// Flat index of big-side element `(img, y, x, ch)`.
    fn big_index(&self, img: &Expr, y: &Expr, x: &Expr, ch: &Expr) -> Expr {
        ((img * int(self.bh) + y) * int(self.bw) + x) * int(self.c) + ch
    }

    /// Flat index of small-side element `(img, y, x, ch)`.
    fn small_index(&self, img: &Expr, y: &Expr, x: &Expr, ch: &Expr) -> Expr {
        ((img * int(self.sh) + y) * int(self.sw) + x) * int(self.c) + ch
    }

    /// In-bounds taps of window position `(sy, sx)`, in closed form.
    fn tap_count(&self, sy: &Expr, sx: &Expr) -> Expr {
        let span = |s: &Expr, limit: usize| {
            let o = self.origin(s);
            (&o + int(self.k)).min(int(limit)) - o.max(0)
        };
        span(sy, self.bh) * span(sx, self.bw)
    }

    /// Splits a flat NHWC index of an image of `h x w x c` into registers.
    fn split(&self, b: &mut KernelBuilder, i: &Expr, h: usize, w: usize) -> [Expr; 4] {
        let ch = b.let_("ch", i % int(self.c));
        let pixel = b.let_("pixel", i / int(self.c));
        let x = b.let_("px", &pixel % int(w));
        let y = b.let_("py", (&pixel / int(w)) % int(h));
        let img = b.let_("img", &pixel / int(h * w));
        [img, y, x, ch]
    }

    /// Runs `body(y, x)` over the in-bounds taps of window `(sy, sx)`, rows
    /// first, which is the reference's tap order.
    fn for_taps(
        &self,
        b: &mut KernelBuilder,
        sy: &Expr,
        sx: &Expr,
        body: impl Fn(&mut KernelBuilder, Expr, Expr),
    ) {
        let y0 = b.let_("y0", self.origin(sy));
        let x0 = b.let_("x0", self.origin(sx));
        let (bh, bw, k) = (self.bh, self.bw, self.k);
        b.for_("by", y0.max(0), (&y0 + int(k)).min(int(bh)), 1, |b, by| {
            b.for_("bx", x0.max(0), (&x0 + int(k)).min(int(bw)), 1, |b, bx| {
                body(b, by.clone(), bx)
            });
        });
    }

    /// Runs `body(sy, sx)` over the window positions whose window contains
    /// big-side pixel `(y, x)`.
    fn for_windows(
        &self,
        b: &mut KernelBuilder,
        y: &Expr,
        x: &Expr,
        body: impl Fn(&mut KernelBuilder, Expr, Expr),
    ) {
        let w = *self;
        // Tap t of position s reaches s * stride + t - pad, so the pixel is
        // reached from s = (y + pad - t) / stride when that divides evenly.
        let reaches = |t: &Expr, limit: usize| {
            t.ge(0)
                .and((t % int(w.stride)).equals(0))
                .and((t / int(w.stride)).lt(int(limit)))
        };
        b.for_("ky", 0, int(w.k), 1, |b, ky| {
            let ty = b.let_("ty", y + int(w.pad) - ky);
            b.if_(reaches(&ty, w.sh), |b| {
                let sy = b.let_("sy", &ty / int(w.stride));
                b.for_("kx", 0, int(w.k), 1, |b, kx| {
                    let tx = b.let_("tx", x + int(w.pad) - kx);
                    b.if_(reaches(&tx, w.sw), |b| {
                        let sx = b.let_("sx", &tx / int(w.stride));
                        body(b, sy.clone(), sx);
                    });
                });
            });
        });
    }

    /// Registers holding the maximum of window `(sy, sx)` and the flat
    /// big-side pixel `y * bw + x` where it first occurs.
    fn argmax(
        &self,
        b: &mut KernelBuilder,
        x: Buffer,
        img: &Expr,
        ch: &Expr,
        sy: &Expr,
        sx: &Expr,
    ) -> (Expr, Expr) {
        let best = b.let_("best", f32::NEG_INFINITY);
        let at = b.let_("at", -1);
        let w = *self;
        self.for_taps(b, sy, sx, |b, by, bx| {
            let v = b.let_("v", x.load(w.big_index(img, &by, &bx, ch)));
            b.if_(at.lt(0).or(v.gt(&best)), |b| {
                b.assign(&best, &v);
                b.assign(&at, by * int(w.bw) + bx);
            });
        });
        (best, at)
    }
}

/// Lowers the ops listed for this module in [`super`].
pub fn lower(op: &Op, inputs: &[&TensorType], out: &TensorType) -> Result<LoweredStep> {
    let launch = match *op {
        Op::AvgPool { k, stride, pad } => avg_pool(op, (inputs[0], out), (k, stride, pad))?,
        Op::MaxPool { k, stride, pad } => {
            max_pool(Window::new(op, inputs[0], out, (k, stride, pad))?, out)?
        }
        Op::AvgPoolBackward { k, stride, pad, .. } => {
            avg_pool_backward(Window::new(op, out, inputs[0], (k, stride, pad))?, out)?
        }
        Op::MaxPoolBackward { k, stride, pad } => max_pool_backward(
            Window::new(op, inputs[0], inputs[1], (k, stride, pad))?,
            out,
        )?,
        Op::GlobalAvgPool => {
            let (h, w, c) = hwc(op, inputs[0])?;
            global_avg_pool(h * w, c, out)?
        }
        _ => return Err(unsupported(op, "not a pooling op")),
    };
    Ok(LoweredStep::single(launch))
}

fn avg_pool(
    op: &Op,
    (big, out): (&TensorType, &TensorType),
    window: (usize, usize, usize),
) -> Result<super::Launch> {
    let (k, stride, pad) = window;
    let (_, _, c) = hwc(op, big)?;
    let mut l = Lowering::new("avg_pool", THREADS);
    l.doc(format!(
        "{k}x{k} average pooling, stride {stride}, padding {pad}, dividing by the in-bounds \
         taps. One thread per output element."
    ));
    let x = l.operand("x", 0);
    let tap = |_: &mut KernelBuilder, pixel: &Expr, ch: &Expr| x.load(pixel * int(c) + ch);
    emit_avg_pool(&mut l, op, (big, out), window, &tap)?;
    l.finish()
}

/// Emits an average pool from `big` to `out` into `l`, with the output
/// buffer and batch size as its last parameters: one thread per output
/// element sums `tap(pixel, ch)` over the in-bounds taps and divides by their
/// count, where `pixel` is the flat big-side pixel `(img * h + y) * w + x`.
pub(super) fn emit_avg_pool(
    l: &mut Lowering,
    op: &Op,
    (big, out): (&TensorType, &TensorType),
    window: (usize, usize, usize),
    tap: &dyn Fn(&mut KernelBuilder, &Expr, &Expr) -> Expr,
) -> Result<()> {
    let w = Window::new(op, big, out, window)?;
    let y = l.result("y");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let [img, sy, sx, ch] = w.split(b, &i, w.sh, w.sw);
        let acc = b.let_("acc", 0.0f32);
        w.for_taps(b, &sy, &sx, |b, by, bx| {
            let pixel = (&img * int(w.bh) + by) * int(w.bw) + bx;
            let value = tap(b, &pixel, &ch);
            b.assign(&acc, &acc + value);
        });
        b.store(y.mem(), &i, acc / w.tap_count(&sy, &sx).to_f32());
    });
    Ok(())
}

fn max_pool(w: Window, out: &TensorType) -> Result<super::Launch> {
    let mut l = Lowering::new("max_pool", THREADS);
    l.doc(format!(
        "{k}x{k} max pooling, stride {s}, padding {p}; padded taps never win and ties go to the \
         first tap. One thread per output element.",
        k = w.k,
        s = w.stride,
        p = w.pad
    ));
    let x = l.operand("x", 0);
    let y = l.result("y");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let [img, sy, sx, ch] = w.split(b, &i, w.sh, w.sw);
        let (best, _) = w.argmax(b, x, &img, &ch, &sy, &sx);
        b.store(y.mem(), &i, best);
    });
    l.finish()
}

fn avg_pool_backward(w: Window, out: &TensorType) -> Result<super::Launch> {
    let mut l = Lowering::new("avg_pool_backward", THREADS);
    l.doc(format!(
        "Gradient of {k}x{k} average pooling (stride {s}, padding {p}): each input element \
         gathers dy / count from the windows that contain it. One thread per input element.",
        k = w.k,
        s = w.stride,
        p = w.pad
    ));
    let dy = l.operand("dy", 0);
    let dx = l.result("dx");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let [img, by, bx, ch] = w.split(b, &i, w.bh, w.bw);
        let acc = b.let_("acc", 0.0f32);
        w.for_windows(b, &by, &bx, |b, sy, sx| {
            let g = dy.load(w.small_index(&img, &sy, &sx, &ch));
            b.assign(&acc, &acc + g / w.tap_count(&sy, &sx).to_f32());
        });
        b.store(dx.mem(), &i, acc);
    });
    l.finish()
}

fn max_pool_backward(w: Window, out: &TensorType) -> Result<super::Launch> {
    let mut l = Lowering::new("max_pool_backward", THREADS);
    l.doc(format!(
        "Gradient of {k}x{k} max pooling (stride {s}, padding {p}): each input element gathers \
         dy from the windows whose recomputed argmax it is. One thread per input element.",
        k = w.k,
        s = w.stride,
        p = w.pad
    ));
    let x = l.operand("x", 0);
    let dy = l.operand("dy", 1);
    let dx = l.result("dx");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let [img, by, bx, ch] = w.split(b, &i, w.bh, w.bw);
        let me = b.let_("me", &by * int(w.bw) + &bx);
        let acc = b.let_("acc", 0.0f32);
        w.for_windows(b, &by, &bx, |b, sy, sx| {
            let (_, at) = w.argmax(b, x, &img, &ch, &sy, &sx);
            b.if_(at.equals(&me), |b| {
                b.assign(&acc, &acc + dy.load(w.small_index(&img, &sy, &sx, &ch)));
            });
        });
        b.store(dx.mem(), &i, acc);
    });
    l.finish()
}

fn global_avg_pool(pixels: usize, c: usize, out: &TensorType) -> Result<super::Launch> {
    let mut l = Lowering::new("global_avg_pool", THREADS);
    l.doc(format!(
        "Mean over the {pixels} pixels of every image and channel. One thread per (image, \
         channel), adding pixels in order; neighbouring threads read neighbouring channels."
    ));
    let x = l.operand("x", 0);
    let y = l.result("y");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let img = b.let_("img", &i / int(c));
        let ch = b.let_("ch", &i % int(c));
        let acc = b.let_("acc", 0.0f32);
        b.for_("p", 0, int(pixels), 1, |b, p| {
            b.assign(&acc, &acc + x.load((&img * int(pixels) + p) * int(c) + &ch));
        });
        b.store(y.mem(), &i, acc / (pixels as f32));
    });
    l.finish()
}
