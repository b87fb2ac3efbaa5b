//! Operand checks and index geometry shared by both kernel sets.
//!
//! Every kernel call first passes [`check_operands`], so the kernels themselves
//! may index their slices without further length checks. The geometry types
//! describe a square sliding window between a "big" image (a convolution's
//! input, a transposed convolution's output, a pooling input) and the "small"
//! image of window positions, so that a convolution, its transpose and both of
//! their gradients all walk the same taps.

use super::{Ctx, In, KernelError};
use ldnc_ir::{Op, Role, TensorType};

/// Builds the `Invalid` error of `op`.
pub(crate) fn invalid(op: &Op, message: impl Into<String>) -> KernelError {
    KernelError::Invalid {
        op: op.name(),
        message: message.into(),
    }
}

/// Checks that `op` is a compute op, that the operand types produce `out_ty`
/// under the op's shape rule, and that every slice has the length its type
/// has at batch size `ctx.n`.
pub(crate) fn check_operands(
    op: &Op,
    inputs: &[In],
    out: &[f32],
    out_ty: &TensorType,
    ctx: &Ctx,
    set: &'static str,
) -> Result<(), KernelError> {
    if op.role() != Role::Compute {
        return Err(KernelError::Unsupported { op: op.name(), set });
    }
    let types: Vec<&TensorType> = inputs.iter().map(|x| x.ty).collect();
    let expected = op
        .infer(&types)
        .map_err(|message| invalid(op, format!("operand types do not fit: {message}")))?;
    if expected != *out_ty {
        return Err(invalid(
            op,
            format!("output type is {out_ty}, but the operands produce {expected}"),
        ));
    }
    for (i, x) in inputs.iter().enumerate() {
        let want = x.ty.numel(ctx.n);
        if x.data.len() != want {
            return Err(invalid(
                op,
                format!(
                    "operand {i} of type {} at batch size {} has {} elements, expected {want}",
                    x.ty,
                    ctx.n,
                    x.data.len()
                ),
            ));
        }
    }
    let want = out_ty.numel(ctx.n);
    if out.len() != want {
        return Err(invalid(
            op,
            format!(
                "output of type {out_ty} at batch size {} has {} elements, expected {want}",
                ctx.n,
                out.len()
            ),
        ));
    }
    Ok(())
}

/// Spatial size of a `k x k` window sweep with `stride` and `pad` over `size`.
fn window_count(size: usize, k: usize, stride: usize, pad: usize) -> Option<usize> {
    (size + 2 * pad)
        .checked_sub(k)
        .filter(|_| stride > 0)
        .map(|span| span / stride + 1)
}

/// Height, width and channels of a batched `[h, w, c]` type.
pub(crate) fn hwc(op: &Op, ty: &TensorType) -> Result<(usize, usize, usize), KernelError> {
    match ty.dims[..] {
        [h, w, c] if ty.batched => Ok((h, w, c)),
        _ => Err(invalid(
            op,
            format!("expected a batched [h, w, c] image, found {ty}"),
        )),
    }
}

/// A `k x k` window with `stride` and `pad` swept over a batch of `n` big
/// images of `big_h x big_w`, giving `small_h x small_w` positions per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub n: usize,
    pub big_h: usize,
    pub big_w: usize,
    pub small_h: usize,
    pub small_w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Window {
    /// Checks that the sweep over `big` yields exactly `small` positions.
    pub(crate) fn new(
        op: &Op,
        n: usize,
        big: (usize, usize),
        small: (usize, usize),
        (k, stride, pad): (usize, usize, usize),
    ) -> Result<Window, KernelError> {
        let swept = window_count(big.0, k, stride, pad).zip(window_count(big.1, k, stride, pad));
        if swept != Some(small) {
            return Err(invalid(
                op,
                format!(
                    "a {k}x{k} window with stride {stride} and padding {pad} over {}x{} gives \
                     {swept:?} positions, but the small side is {}x{}",
                    big.0, big.1, small.0, small.1
                ),
            ));
        }
        Ok(Window {
            n,
            big_h: big.0,
            big_w: big.1,
            small_h: small.0,
            small_w: small.1,
            k,
            stride,
            pad,
        })
    }

    /// Number of small-side pixels over the whole batch.
    pub fn small_pixels(&self) -> usize {
        self.n * self.small_h * self.small_w
    }

    /// Number of big-side pixels over the whole batch.
    pub fn big_pixels(&self) -> usize {
        self.n * self.big_h * self.big_w
    }

    /// Big-side coordinate reached from small coordinate `s` by tap offset `t`
    /// along an axis of length `limit`, or `None` where it falls in the padding.
    #[inline]
    pub fn big_coord(&self, s: usize, t: usize, limit: usize) -> Option<usize> {
        (s * self.stride + t)
            .checked_sub(self.pad)
            .filter(|&b| b < limit)
    }

    /// Calls `f(small_pixel, big_pixel, tap)` for every in-bounds tap, where
    /// pixels are flat indices over the batch (`(img * h + y) * w + x`) and
    /// `tap = ky * k + kx`.
    pub fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        for img in 0..self.n {
            for sy in 0..self.small_h {
                for sx in 0..self.small_w {
                    let small = (img * self.small_h + sy) * self.small_w + sx;
                    for ky in 0..self.k {
                        let Some(by) = self.big_coord(sy, ky, self.big_h) else {
                            continue;
                        };
                        for kx in 0..self.k {
                            let Some(bx) = self.big_coord(sx, kx, self.big_w) else {
                                continue;
                            };
                            let big = (img * self.big_h + by) * self.big_w + bx;
                            f(small, big, ky * self.k + kx);
                        }
                    }
                }
            }
        }
    }
}

/// A convolution or transposed convolution with weight `[k, k, cin, cout]`.
///
/// For a convolution the big side is the input (`cin` channels) and the small
/// side the output (`cout`); for a transposed convolution the small side is the
/// input (`cin`) and the big side the output (`cout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub win: Window,
    pub cin: usize,
    pub cout: usize,
}

impl ConvShape {
    /// A convolution from image `x` to image `y`.
    pub(crate) fn conv(
        op: &Op,
        x: &TensorType,
        y: &TensorType,
        window: (usize, usize, usize),
        n: usize,
    ) -> Result<ConvShape, KernelError> {
        let (xh, xw, cin) = hwc(op, x)?;
        let (yh, yw, cout) = hwc(op, y)?;
        let win = Window::new(op, n, (xh, xw), (yh, yw), window)?;
        Ok(ConvShape { win, cin, cout })
    }

    /// A transposed convolution from image `x` to image `y`.
    ///
    /// NOTE: the check `Window::new` makes rejects `out_pad >= stride`, as
    /// PyTorch's `ConvTranspose2d` does, because such rows would receive no
    /// tap and have no matching convolution.
    pub(crate) fn transposed(
        op: &Op,
        x: &TensorType,
        y: &TensorType,
        window: (usize, usize, usize),
        n: usize,
    ) -> Result<ConvShape, KernelError> {
        let (xh, xw, cin) = hwc(op, x)?;
        let (yh, yw, cout) = hwc(op, y)?;
        let win = Window::new(op, n, (yh, yw), (xh, xw), window)?;
        Ok(ConvShape { win, cin, cout })
    }

    /// Rows of the `[k * k * c_big, c_small]` weight matrix.
    pub fn taps(&self) -> usize {
        self.win.k * self.win.k
    }
}

/// A pooling window over images of `c` channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    pub win: Window,
    pub c: usize,
}

impl PoolShape {
    /// A pooling from image `x` to image `y`. Padding must be smaller than the
    /// window, so that every window holds at least one in-bounds element.
    pub(crate) fn new(
        op: &Op,
        x: &TensorType,
        y: &TensorType,
        window: (usize, usize, usize),
        n: usize,
    ) -> Result<PoolShape, KernelError> {
        let (k, _, pad) = window;
        if pad >= k {
            return Err(invalid(
                op,
                format!("padding {pad} must be smaller than the {k}x{k} window"),
            ));
        }
        let (xh, xw, c) = hwc(op, x)?;
        let (yh, yw, cy) = hwc(op, y)?;
        if c != cy {
            return Err(invalid(op, format!("channels differ: {x} and {y}")));
        }
        let win = Window::new(op, n, (xh, xw), (yh, yw), window)?;
        Ok(PoolShape { win, c })
    }
}

/// Reads a class index stored as f32, or `None` for the ignore label.
///
/// Labels must be whole numbers in `0..classes`; anything else is an error
/// that names the position and the value.
pub(crate) fn class_index(
    op: &Op,
    label: f32,
    position: usize,
    classes: usize,
    ignore: Option<u32>,
) -> Result<Option<usize>, KernelError> {
    let whole = label >= 0.0 && label.fract() == 0.0;
    if whole && ignore.is_some_and(|i| label == i as f32) {
        return Ok(None);
    }
    if !whole || label as usize >= classes {
        return Err(invalid(
            op,
            format!(
                "label {label} at position {position} is not a class index in 0..{classes} \
                 or the ignore label {ignore:?}"
            ),
        ));
    }
    Ok(Some(label as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_taps_skip_padding() {
        let op = Op::Conv2d {
            k: 3,
            stride: 2,
            pad: 1,
        };
        let win = Window::new(&op, 1, (3, 3), (2, 2), (3, 2, 1)).expect("3x3 stride 2 fits");
        let mut taps = Vec::new();
        win.for_each_tap(|s, b, t| taps.push((s, b, t)));
        // Position (0, 0) reaches big rows/cols -1..=1, so 4 taps are in bounds;
        // position (1, 1) reaches rows/cols 1..=3, so again 4 are in bounds.
        assert_eq!(taps.len(), 16);
        assert_eq!(taps[0], (0, 0, 4));
        assert_eq!(taps[15], (3, 8, 4));
    }

    #[test]
    fn window_rejects_mismatched_small_side() {
        let op = Op::MaxPool {
            k: 2,
            stride: 2,
            pad: 0,
        };
        assert!(Window::new(&op, 1, (4, 4), (3, 2), (2, 2, 0)).is_err());
    }

    #[test]
    fn class_index_reads_labels() {
        let op = Op::SoftmaxCrossEntropy {
            ignore: Some(11),
            weighted: false,
        };
        assert_eq!(class_index(&op, 3.0, 0, 11, Some(11)).ok(), Some(Some(3)));
        assert_eq!(class_index(&op, 11.0, 0, 11, Some(11)).ok(), Some(None));
        assert!(class_index(&op, 11.0, 0, 11, None).is_err());
        assert!(class_index(&op, 1.5, 0, 11, None).is_err());
        assert!(class_index(&op, -1.0, 0, 11, None).is_err());
    }
}
