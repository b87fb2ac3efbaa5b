//! Reference pooling over the taps of [`Window::for_each_tap`].
//!
//! Average pooling divides by the number of in-bounds taps (PyTorch's
//! `count_include_pad=False`), and max pooling never picks a padded tap. Ties
//! in max pooling go to the first tap in row-major window order, in both
//! kernel sets, so the backward pass routes each gradient to one element.
//!
//! [`Window::for_each_tap`]: crate::kernels::layout::Window::for_each_tap

use crate::kernels::layout::PoolShape;

/// Number of in-bounds taps of every window position.
fn tap_counts(shape: &PoolShape) -> Vec<usize> {
    let mut counts = vec![0usize; shape.win.small_pixels()];
    shape.win.for_each_tap(|s, _, _| counts[s] += 1);
    counts
}

/// `y[s, ch] = sum_{in-bounds taps} x[b, ch] / count(s)`.
pub fn avg_pool(shape: &PoolShape, x: &[f32], y: &mut [f32]) {
    let c = shape.c;
    let counts = tap_counts(shape);
    let mut acc = vec![0f64; y.len()];
    shape.win.for_each_tap(|s, b, _| {
        for ch in 0..c {
            acc[s * c + ch] += x[b * c + ch] as f64;
        }
    });
    for (i, (o, a)) in y.iter_mut().zip(&acc).enumerate() {
        *o = (*a / counts[i / c] as f64) as f32;
    }
}

/// Gradient of [`avg_pool`]: `dx[b, ch] = sum over windows s containing b of
/// dy[s, ch] / count(s)`.
pub fn avg_pool_backward(shape: &PoolShape, dy: &[f32], dx: &mut [f32]) {
    let c = shape.c;
    let counts = tap_counts(shape);
    let mut acc = vec![0f64; dx.len()];
    shape.win.for_each_tap(|s, b, _| {
        for ch in 0..c {
            acc[b * c + ch] += dy[s * c + ch] as f64 / counts[s] as f64;
        }
    });
    for (o, a) in dx.iter_mut().zip(&acc) {
        *o = *a as f32;
    }
}

/// Big-side pixel of the maximum of every window position and channel, with
/// ties going to the first tap.
fn argmax(shape: &PoolShape, x: &[f32]) -> Vec<usize> {
    let c = shape.c;
    let mut best = vec![usize::MAX; shape.win.small_pixels() * c];
    shape.win.for_each_tap(|s, b, _| {
        for ch in 0..c {
            let slot = &mut best[s * c + ch];
            if *slot == usize::MAX || x[b * c + ch] > x[*slot * c + ch] {
                *slot = b;
            }
        }
    });
    best
}

/// `y[s, ch] = max_{in-bounds taps} x[b, ch]`.
pub fn max_pool(shape: &PoolShape, x: &[f32], y: &mut [f32]) {
    let c = shape.c;
    for (i, b) in argmax(shape, x).into_iter().enumerate() {
        y[i] = x[b * c + i % c];
    }
}

/// Gradient of [`max_pool`]: each `dy[s, ch]` goes to the element that won
/// window `s` in the forward pass (the derivative of max is the indicator of
/// the winner).
pub fn max_pool_backward(shape: &PoolShape, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let c = shape.c;
    let mut acc = vec![0f64; dx.len()];
    for (i, b) in argmax(shape, x).into_iter().enumerate() {
        acc[b * c + i % c] += dy[i] as f64;
    }
    for (o, a) in dx.iter_mut().zip(&acc) {
        *o = *a as f32;
    }
}

/// `y[img, ch] = mean over the h * w pixels of x[img, pixel, ch]`, with `x`
/// holding `y.len() / c` images.
pub fn global_avg_pool(x: &[f32], c: usize, y: &mut [f32]) {
    let images = y.len() / c;
    let pixels = x.len() / y.len().max(1);
    for img in 0..images {
        let mut acc = vec![0f64; c];
        for row in x[img * pixels * c..(img + 1) * pixels * c].chunks_exact(c) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += *v as f64;
            }
        }
        for ch in 0..c {
            y[img * c + ch] = (acc[ch] / pixels as f64) as f32;
        }
    }
}

/// Gradient of [`global_avg_pool`]: `dx[img, pixel, ch] = dy[img, ch] / pixels`.
pub fn global_avg_pool_backward(dy: &[f32], c: usize, dx: &mut [f32]) {
    let pixels = dx.len() / dy.len().max(1);
    for (i, row) in dx.chunks_exact_mut(c).enumerate() {
        let img = i / pixels;
        for ch in 0..c {
            row[ch] = dy[img * c + ch] / pixels as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::Window;

    fn shape(
        big: (usize, usize),
        small: (usize, usize),
        window: (usize, usize, usize),
    ) -> PoolShape {
        let op = ldnc_ir::Op::AvgPool {
            k: window.0,
            stride: window.1,
            pad: window.2,
        };
        let win = Window::new(&op, 1, big, small, window).expect("test window fits");
        PoolShape { win, c: 1 }
    }

    #[test]
    fn avg_pool_excludes_padding() {
        // A 3x3 window with padding 1 over 2x2 contains all 4 pixels at every position.
        let s = shape((2, 2), (2, 2), (3, 1, 1));
        let mut y = [0.0; 4];
        avg_pool(&s, &[1.0, 2.0, 3.0, 6.0], &mut y);
        assert_eq!(y, [3.0; 4]);
        // 2x2 window, stride 1, padding 1 over 1x1: one in-bounds tap each.
        let s = shape((1, 1), (2, 2), (2, 1, 1));
        avg_pool(&s, &[5.0], &mut y);
        assert_eq!(y, [5.0; 4]);
    }

    #[test]
    fn avg_pool_backward_spreads_by_count() {
        let s = shape((2, 2), (1, 1), (2, 2, 0));
        let mut dx = [0.0; 4];
        avg_pool_backward(&s, &[8.0], &mut dx);
        assert_eq!(dx, [2.0; 4]);
    }

    #[test]
    fn max_pool_ignores_padding_and_picks_first_tie() {
        let s = shape((2, 2), (1, 1), (2, 2, 0));
        let mut y = [0.0];
        max_pool(&s, &[-4.0, -1.0, -3.0, -2.0], &mut y);
        assert_eq!(y, [-1.0]);
        // All inputs are negative, so a padded zero must not win a window.
        let s = shape((2, 2), (2, 2), (3, 1, 1));
        let mut y = [0.0; 4];
        max_pool(&s, &[-4.0, -1.0, -3.0, -2.0], &mut y);
        assert_eq!(y, [-1.0; 4]);
        let mut dx = [0.0; 4];
        max_pool_backward(&s, &[2.0, 2.0, 0.0, 0.0], &[1.0; 4], &mut dx);
        assert_eq!(dx, [4.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn global_avg_pool_round_trip() {
        let mut y = [0.0; 2];
        global_avg_pool(&[1.0, 10.0, 3.0, 20.0], 2, &mut y);
        assert_eq!(y, [2.0, 15.0]);
        let mut dx = [0.0; 4];
        global_avg_pool_backward(&[2.0, 4.0], 2, &mut dx);
        assert_eq!(dx, [1.0, 2.0, 1.0, 2.0]);
    }
}
