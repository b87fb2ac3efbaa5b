//! Fast convolutions as GEMMs over im2col matrices of NHWC images.
//!
//! Every small-side pixel (a convolution's output pixel) owns one row of the
//! im2col matrix: the `k * k * c` big-side values its taps read, in
//! `[tap, channel]` order, with zeros for taps in the padding. With the weight
//! as a `[k * k * cin, cout]` matrix, which is its memory layout, the
//! convolution is `im2col(x) * W`, its data gradient scatters `dy * W^T` back
//! through the taps (col2im), and its filter gradient is `im2col(x)^T * dy`. A
//! transposed convolution swaps the roles of the two sides. A 1x1 stride-1
//! convolution without padding skips im2col, because the image already is
//! that matrix.
//!
//! Work is split over rayon tasks by blocks of small-side pixels (gather) or
//! by images (scatter, so that one task writes each image). Filter gradients
//! give each thread an equal share of the blocks and one partial sum, so
//! their rounding depends on the thread count but not on scheduling.
//!
//! The gathering kernels read the big side through [`BigSide`], block by
//! block: a stored tensor lends its rows, and a computed one (the fused
//! BN-ReLU input) writes only the rows one block reads into a scratch buffer
//! of its task, where im2col and the GEMM find them still in cache.

use super::matmul::{matmul, Mat};
use crate::kernels::layout::{ConvShape, Window};
use rayon::prelude::*;
use std::ops::Range;

/// Small-side pixels per im2col block: a block of `k * k * c` columns stays
/// within a few MiB for the channel counts of DenseNets.
const BLOCK_PIXELS: usize = 256;

fn is_pointwise(win: &Window) -> bool {
    win.k == 1 && win.stride == 1 && win.pad == 0
}

/// The big side of a convolution as the gathering kernels read it: `[pixels,
/// channels]` rows over the batch, either stored or computed on demand.
pub(crate) trait BigSide: Sync {
    /// Channels per big pixel.
    fn channels(&self) -> usize;

    /// Returns the whole batch as one stored matrix, if there is one.
    fn stored(&self) -> Option<&[f32]>;

    /// Returns the rows of big pixels `span`, written into `scratch` unless
    /// they are stored.
    fn rows<'s>(&'s self, span: Range<usize>, scratch: &'s mut Vec<f32>) -> &'s [f32];
}

/// A big side held in memory, `[pixels, c]`.
struct Stored<'a> {
    data: &'a [f32],
    c: usize,
}

impl BigSide for Stored<'_> {
    fn channels(&self) -> usize {
        self.c
    }

    fn stored(&self) -> Option<&[f32]> {
        Some(self.data)
    }

    fn rows<'s>(&'s self, span: Range<usize>, _scratch: &'s mut Vec<f32>) -> &'s [f32] {
        &self.data[span.start * self.c..span.end * self.c]
    }
}

/// Returns the big pixels that the taps of small pixels `first .. first +
/// rows` can read: from the first image's top tap row to the last image's
/// bottom tap row, whole rows, and every image in between.
fn big_span(win: &Window, first: usize, rows: usize) -> Range<usize> {
    if is_pointwise(win) {
        return first..first + rows;
    }
    let per_image = win.small_h * win.small_w;
    let last = first + rows - 1;
    let (img0, sy0) = (first / per_image, first % per_image / win.small_w);
    let (img1, sy1) = (last / per_image, last % per_image / win.small_w);
    // `big_coord` grows with the small coordinate and with the tap, so the
    // first in-bounds tap of the first row and the last of the last row bound
    // every tap of the block. A row without one falls back to the image edge.
    let top = (0..win.k)
        .find_map(|ky| win.big_coord(sy0, ky, win.big_h))
        .unwrap_or(0);
    let bottom = (0..win.k)
        .rev()
        .find_map(|ky| win.big_coord(sy1, ky, win.big_h))
        .unwrap_or(win.big_h - 1);
    (img0 * win.big_h + top) * win.big_w..(img1 * win.big_h + bottom + 1) * win.big_w
}

/// Fills `col` (`rows x k*k*cb`) with the taps of small pixels
/// `first .. first + rows` over `big`, the rows of `cb` channels of big
/// pixels from `base` on.
fn im2col(
    win: &Window,
    (big, base): (&[f32], usize),
    cb: usize,
    first: usize,
    rows: usize,
    col: &mut [f32],
) {
    let width = win.k * win.k * cb;
    let per_image = win.small_h * win.small_w;
    for (r, row) in col[..rows * width].chunks_exact_mut(width).enumerate() {
        let pixel = first + r;
        let (img, sy, sx) = (
            pixel / per_image,
            pixel % per_image / win.small_w,
            pixel % win.small_w,
        );
        for ky in 0..win.k {
            let by = win.big_coord(sy, ky, win.big_h);
            for kx in 0..win.k {
                let dst = &mut row[(ky * win.k + kx) * cb..(ky * win.k + kx + 1) * cb];
                match (by, win.big_coord(sx, kx, win.big_w)) {
                    (Some(by), Some(bx)) => {
                        let src = ((img * win.big_h + by) * win.big_w + bx - base) * cb;
                        dst.copy_from_slice(&big[src..src + cb]);
                    }
                    _ => dst.fill(0.0),
                }
            }
        }
    }
}

/// Adds the `rows x k*k*cb` tap values in `col`, which belong to the small
/// pixels `first .. first + rows` of one image, into that image's big-side
/// slice `image` (`big_h * big_w * cb` values). `first` counts from the
/// image's first pixel.
fn col2im_add(win: &Window, col: &[f32], cb: usize, first: usize, rows: usize, image: &mut [f32]) {
    let width = win.k * win.k * cb;
    for (r, row) in col[..rows * width].chunks_exact(width).enumerate() {
        let (sy, sx) = ((first + r) / win.small_w, (first + r) % win.small_w);
        for ky in 0..win.k {
            let Some(by) = win.big_coord(sy, ky, win.big_h) else {
                continue;
            };
            for kx in 0..win.k {
                let Some(bx) = win.big_coord(sx, kx, win.big_w) else {
                    continue;
                };
                let dst = (by * win.big_w + bx) * cb;
                let src = &row[(ky * win.k + kx) * cb..(ky * win.k + kx + 1) * cb];
                for (d, s) in image[dst..dst + cb].iter_mut().zip(src) {
                    *d += s;
                }
            }
        }
    }
}

/// `small = im2col(big) * wmat`, with `wmat` a `[k*k*cb, cs]` view.
fn gather(win: &Window, big: &impl BigSide, wmat: Mat, small: &mut [f32], cs: usize) {
    let cb = big.channels();
    if let (true, Some(stored)) = (is_pointwise(win), big.stored()) {
        matmul(
            small,
            Mat::new(stored, win.big_pixels(), cb),
            wmat,
            false,
            true,
        );
        return;
    }
    let width = win.k * win.k * cb;
    small
        .par_chunks_mut((BLOCK_PIXELS * cs).max(1))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(col, scratch), (block, out)| {
                let rows = out.len() / cs.max(1);
                let first = block * BLOCK_PIXELS;
                let span = big_span(win, first, rows);
                let base = span.start;
                let taps = big.rows(span, scratch);
                if is_pointwise(win) {
                    matmul(out, Mat::new(taps, rows, cb), wmat, false, false);
                    return;
                }
                col.resize(rows * width, 0.0);
                im2col(win, (taps, base), cb, first, rows, col);
                matmul(out, Mat::new(col, rows, width), wmat, false, false);
            },
        );
}

/// `big = col2im(small * wmat)`, with `wmat` a `[cs, k*k*cb]` view: each small
/// pixel's product row is added to the big pixels its taps reach.
fn scatter(win: &Window, small: &[f32], cs: usize, wmat: Mat, big: &mut [f32], cb: usize) {
    if is_pointwise(win) {
        matmul(
            big,
            Mat::new(small, win.small_pixels(), cs),
            wmat,
            false,
            true,
        );
        return;
    }
    let width = win.k * win.k * cb;
    let small_per_image = win.small_h * win.small_w;
    // With fewer images than threads, let each GEMM use the pool instead.
    let parallel_gemm = win.n < rayon::current_num_threads();
    big.par_chunks_mut((win.big_h * win.big_w * cb).max(1))
        .enumerate()
        .for_each_init(Vec::new, |col, (img, image)| {
            image.fill(0.0);
            for first in (0..small_per_image).step_by(BLOCK_PIXELS) {
                let rows = BLOCK_PIXELS.min(small_per_image - first);
                let start = (img * small_per_image + first) * cs;
                col.resize(rows * width, 0.0);
                let lhs = Mat::new(&small[start..start + rows * cs], rows, cs);
                matmul(&mut col[..rows * width], lhs, wmat, false, parallel_gemm);
                col2im_add(win, col, cb, first, rows, image);
            }
        });
}

/// `grad = im2col(big)^T * small`, a `[k*k*cb, cs]` matrix, summed over equal
/// shares of the pixel blocks, one partial sum per rayon task.
fn filter_grad(win: &Window, big: &impl BigSide, small: &[f32], cs: usize, grad: &mut [f32]) {
    let cb = big.channels();
    let pixels = win.small_pixels();
    let width = win.k * win.k * cb;
    let blocks = pixels.div_ceil(BLOCK_PIXELS);
    let shares = rayon::current_num_threads().min(blocks).max(1);
    let partials: Vec<Vec<f32>> = (0..shares)
        .into_par_iter()
        .map(|share| {
            let mut acc = vec![0f32; grad.len()];
            let (mut col, mut scratch) = (Vec::new(), Vec::new());
            for block in share * blocks / shares..(share + 1) * blocks / shares {
                let first = block * BLOCK_PIXELS;
                let rows = BLOCK_PIXELS.min(pixels - first);
                let span = big_span(win, first, rows);
                let base = span.start;
                let taps = big.rows(span, &mut scratch);
                let rhs = Mat::new(&small[first * cs..(first + rows) * cs], rows, cs);
                let lhs = if is_pointwise(win) {
                    Mat::new(taps, rows, cb)
                } else {
                    col.resize(rows * width, 0.0);
                    im2col(win, (taps, base), cb, first, rows, &mut col);
                    Mat::new(&col, rows, width)
                };
                matmul(&mut acc, lhs.t(), rhs, true, false);
            }
            acc
        })
        .collect();

    grad.fill(0.0);
    for partial in partials {
        for (g, p) in grad.iter_mut().zip(&partial) {
            *g += p;
        }
    }
}

/// Reorders `[a, b, inner]` into `[b, a, inner]`.
fn swap_outer(src: &[f32], a: usize, b: usize, inner: usize) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    for i in 0..a {
        for j in 0..b {
            let from = (i * b + j) * inner;
            let to = (j * a + i) * inner;
            dst[to..to + inner].copy_from_slice(&src[from..from + inner]);
        }
    }
    dst
}

/// Reorders `[taps, rows, cols]` into `[taps, cols, rows]`.
fn transpose_taps(src: &[f32], taps: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    for t in 0..taps {
        for r in 0..rows {
            for c in 0..cols {
                dst[(t * cols + c) * rows + r] = src[(t * rows + r) * cols + c];
            }
        }
    }
    dst
}

/// Convolution: `y = im2col(x) * W` with `W = w` as `[k*k*cin, cout]`.
pub fn conv2d(shape: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let x = Stored {
        data: x,
        c: shape.cin,
    };
    conv2d_over(shape, &x, w, y);
}

/// [`conv2d`] over a big side that may be computed block by block.
pub(crate) fn conv2d_over(shape: &ConvShape, x: &impl BigSide, w: &[f32], y: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let wmat = Mat::new(w, shape.taps() * cin, cout);
    gather(&shape.win, x, wmat, y, cout);
}

/// Data gradient of a convolution: `dx = col2im(dy * W^T)`.
pub fn conv2d_backward_data(shape: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let wmat = Mat::new(w, shape.taps() * cin, cout).t();
    scatter(&shape.win, dy, cout, wmat, dx, cin);
}

/// Filter gradient of a convolution: `dw = im2col(x)^T * dy`.
pub fn conv2d_backward_filter(shape: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let x = Stored {
        data: x,
        c: shape.cin,
    };
    conv2d_backward_filter_over(shape, &x, dy, dw);
}

/// [`conv2d_backward_filter`] over a big side that may be computed block by
/// block.
pub(crate) fn conv2d_backward_filter_over(
    shape: &ConvShape,
    x: &impl BigSide,
    dy: &[f32],
    dw: &mut [f32],
) {
    filter_grad(&shape.win, x, dy, shape.cout, dw);
}

/// Transposed convolution: `y = col2im(x * W')` with `W'[ci, (tap, co)] =
/// w[tap, ci, co]`.
pub fn conv_transpose2d(shape: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let taps = shape.taps();
    let wp = swap_outer(w, taps, cin, cout);
    scatter(&shape.win, x, cin, Mat::new(&wp, cin, taps * cout), y, cout);
}

/// Data gradient of a transposed convolution: `dx = im2col(dy) * W''` with
/// `W''[(tap, co), ci] = w[tap, ci, co]`.
pub fn conv_transpose2d_backward_data(shape: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let taps = shape.taps();
    let wp = transpose_taps(w, taps, cin, cout);
    let dy = Stored { data: dy, c: cout };
    gather(&shape.win, &dy, Mat::new(&wp, taps * cout, cin), dx, cin);
}

/// Filter gradient of a transposed convolution: `im2col(dy)^T * x` is indexed
/// `[tap, co, ci]`, and is reordered into the weight's `[tap, ci, co]`.
pub fn conv_transpose2d_backward_filter(shape: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let taps = shape.taps();
    let mut grad = vec![0f32; dw.len()];
    let dy = Stored { data: dy, c: cout };
    filter_grad(&shape.win, &dy, x, cin, &mut grad);
    dw.copy_from_slice(&transpose_taps(&grad, taps, cout, cin));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(
        big: (usize, usize),
        small: (usize, usize),
        window: (usize, usize, usize),
        c: (usize, usize),
    ) -> ConvShape {
        let op = ldnc_ir::Op::Conv2d {
            k: window.0,
            stride: window.1,
            pad: window.2,
        };
        let win = Window::new(&op, 1, big, small, window).expect("test window fits");
        ConvShape {
            win,
            cin: c.0,
            cout: c.1,
        }
    }

    #[test]
    fn conv2d_3x3_pad1_sums_neighbours() {
        let s = shape((2, 2), (2, 2), (3, 1, 1), (1, 1));
        let mut y = [0.0; 4];
        conv2d(&s, &[1.0, 2.0, 3.0, 4.0], &[1.0; 9], &mut y);
        assert_eq!(y, [10.0; 4]);
    }

    #[test]
    fn conv2d_pointwise_mixes_channels() {
        let s = shape((1, 1), (1, 1), (1, 1, 0), (2, 3));
        let mut y = [0.0; 3];
        conv2d(&s, &[1.0, 10.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut y);
        assert_eq!(y, [41.0, 52.0, 63.0]);
    }

    #[test]
    fn conv_transpose2d_stride2_spreads_pixels() {
        let s = shape((4, 4), (2, 2), (2, 2, 0), (1, 1));
        let mut y = [0.0; 16];
        conv_transpose2d(
            &s,
            &[1.0, 2.0, 3.0, 4.0],
            &[1.0, 10.0, 100.0, 1000.0],
            &mut y,
        );
        assert_eq!(
            &y[..8],
            &[1.0, 10.0, 2.0, 20.0, 100.0, 1000.0, 200.0, 2000.0]
        );
    }

    #[test]
    fn conv2d_backward_filter_correlates() {
        // 3x3 kernel, padding 1 over a 1x1 image: only the centre tap reads x.
        let s = shape((1, 1), (1, 1), (3, 1, 1), (1, 1));
        let mut dw = [9.0; 9];
        conv2d_backward_filter(&s, &[2.0], &[5.0], &mut dw);
        assert_eq!(dw, [0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn weight_reorders() {
        // [2, 3, 1] -> [3, 2, 1] and per-tap 2x3 -> 3x2 transposes.
        let src = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(
            swap_outer(&src, 2, 3, 1),
            vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
        assert_eq!(
            transpose_taps(&src, 1, 2, 3),
            vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
    }
}
