//! Fast pooling: one rayon task per image, with the window bounds computed
//! once per output pixel and the channel loop innermost over contiguous NHWC
//! rows. Averages count only in-bounds elements, and max ties go to the first
//! tap in row-major order, exactly as in the reference set.

use crate::kernels::layout::{PoolShape, Window};
use crate::kernels::reference::pool as reference;
use rayon::prelude::*;

/// In-bounds big-side range `[lo, hi)` of window position `s` along an axis of
/// length `limit`.
fn span(win: &Window, s: usize, limit: usize) -> (usize, usize) {
    let start = s * win.stride;
    let lo = start.saturating_sub(win.pad);
    let hi = (start + win.k).saturating_sub(win.pad).min(limit);
    (lo, hi)
}

/// Calls `f(small_pixel, ys, xs)` for every window position of one image,
/// with its in-bounds big-side row and column ranges.
fn for_each_window(win: &Window, mut f: impl FnMut(usize, (usize, usize), (usize, usize))) {
    for sy in 0..win.small_h {
        let ys = span(win, sy, win.big_h);
        for sx in 0..win.small_w {
            f(sy * win.small_w + sx, ys, span(win, sx, win.big_w));
        }
    }
}

fn image_sizes(shape: &PoolShape) -> (usize, usize) {
    let win = &shape.win;
    (
        win.big_h * win.big_w * shape.c,
        win.small_h * win.small_w * shape.c,
    )
}

/// Averages over the in-bounds taps.
pub fn avg_pool(shape: &PoolShape, x: &[f32], y: &mut [f32]) {
    let (win, c) = (&shape.win, shape.c);
    let (big, small) = image_sizes(shape);
    y.par_chunks_mut(small.max(1))
        .enumerate()
        .for_each(|(img, out)| {
            let image = &x[img * big..(img + 1) * big];
            for_each_window(win, |s, (y0, y1), (x0, x1)| {
                let acc = &mut out[s * c..(s + 1) * c];
                acc.fill(0.0);
                for by in y0..y1 {
                    for bx in x0..x1 {
                        let src = &image[(by * win.big_w + bx) * c..(by * win.big_w + bx + 1) * c];
                        acc.iter_mut().zip(src).for_each(|(a, v)| *a += v);
                    }
                }
                let count = ((y1 - y0) * (x1 - x0)) as f32;
                acc.iter_mut().for_each(|a| *a /= count);
            });
        });
}

/// Spreads `dy / count` over the in-bounds taps of every window.
pub fn avg_pool_backward(shape: &PoolShape, dy: &[f32], dx: &mut [f32]) {
    let (win, c) = (&shape.win, shape.c);
    let (big, small) = image_sizes(shape);
    dx.par_chunks_mut(big.max(1))
        .enumerate()
        .for_each(|(img, image)| {
            image.fill(0.0);
            let grad = &dy[img * small..(img + 1) * small];
            for_each_window(win, |s, (y0, y1), (x0, x1)| {
                let count = ((y1 - y0) * (x1 - x0)) as f32;
                let g = &grad[s * c..(s + 1) * c];
                for by in y0..y1 {
                    for bx in x0..x1 {
                        let dst =
                            &mut image[(by * win.big_w + bx) * c..(by * win.big_w + bx + 1) * c];
                        dst.iter_mut().zip(g).for_each(|(d, v)| *d += v / count);
                    }
                }
            });
        });
}

/// Writes the image-local big pixel of each channel's maximum into `best`.
fn window_argmax(
    win: &Window,
    image: &[f32],
    c: usize,
    ys: (usize, usize),
    xs: (usize, usize),
    best: &mut [usize],
) {
    best.fill(ys.0 * win.big_w + xs.0);
    for by in ys.0..ys.1 {
        for bx in xs.0..xs.1 {
            let pixel = by * win.big_w + bx;
            for ch in 0..c {
                if image[pixel * c + ch] > image[best[ch] * c + ch] {
                    best[ch] = pixel;
                }
            }
        }
    }
}

/// Takes the maximum over the in-bounds taps.
pub fn max_pool(shape: &PoolShape, x: &[f32], y: &mut [f32]) {
    let (win, c) = (&shape.win, shape.c);
    let (big, small) = image_sizes(shape);
    y.par_chunks_mut(small.max(1))
        .enumerate()
        .for_each_init(Vec::new, |best, (img, out)| {
            let image = &x[img * big..(img + 1) * big];
            best.resize(c, 0);
            for_each_window(win, |s, ys, xs| {
                window_argmax(win, image, c, ys, xs, best);
                for ch in 0..c {
                    out[s * c + ch] = image[best[ch] * c + ch];
                }
            });
        });
}

/// Routes each `dy` to its window's maximum.
pub fn max_pool_backward(shape: &PoolShape, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (win, c) = (&shape.win, shape.c);
    let (big, small) = image_sizes(shape);
    dx.par_chunks_mut(big.max(1))
        .enumerate()
        .for_each_init(Vec::new, |best, (img, out)| {
            let image = &x[img * big..(img + 1) * big];
            let grad = &dy[img * small..(img + 1) * small];
            out.fill(0.0);
            best.resize(c, 0);
            for_each_window(win, |s, ys, xs| {
                window_argmax(win, image, c, ys, xs, best);
                for ch in 0..c {
                    out[best[ch] * c + ch] += grad[s * c + ch];
                }
            });
        });
}

/// Averages over pixels, with one rayon task per image running the reference loop.
pub fn global_avg_pool(x: &[f32], c: usize, y: &mut [f32]) {
    let per_image = x.len() / (y.len() / c.max(1)).max(1);
    y.par_chunks_mut(c.max(1))
        .zip(x.par_chunks(per_image.max(1)))
        .for_each(|(out, image)| reference::global_avg_pool(image, c, out));
}

/// Broadcasts `dy / pixels`, with one rayon task per image.
pub fn global_avg_pool_backward(dy: &[f32], c: usize, dx: &mut [f32]) {
    let per_image = dx.len() / (dy.len() / c.max(1)).max(1);
    dx.par_chunks_mut(per_image.max(1))
        .zip(dy.par_chunks(c.max(1)))
        .for_each(|(out, grad)| reference::global_avg_pool_backward(grad, c, out));
}
