//! Reference convolutions: every output is a sum over the in-bounds taps of
//! [`Window::for_each_tap`], accumulated in f64 and rounded once.
//!
//! Indices: an image pixel `p` with `c` channels holds element `p * c + ch`,
//! and the weight `[k, k, cin, cout]` holds element `(tap * cin + ci) * cout + co`.

use crate::kernels::layout::ConvShape;

/// Writes the f64 accumulator into the f32 output.
fn store(acc: &[f64], out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acc) {
        *o = *a as f32;
    }
}

/// Convolution: `y[s, co] = sum_{tap, ci} x[b(s, tap), ci] * w[tap, ci, co]`,
/// where `b(s, tap)` is the input pixel that tap `tap` of output pixel `s`
/// reads (taps in the zero padding contribute nothing).
pub fn conv2d(shape: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let mut acc = vec![0f64; y.len()];
    shape.win.for_each_tap(|s, b, tap| {
        for ci in 0..cin {
            let xv = x[b * cin + ci] as f64;
            for co in 0..cout {
                acc[s * cout + co] += xv * w[(tap * cin + ci) * cout + co] as f64;
            }
        }
    });
    store(&acc, y);
}

/// Gradient of [`conv2d`] with respect to `x`:
/// `dx[b, ci] = sum over (s, tap) with b(s, tap) = b of dy[s, co] * w[tap, ci, co]`.
pub fn conv2d_backward_data(shape: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let mut acc = vec![0f64; dx.len()];
    shape.win.for_each_tap(|s, b, tap| {
        for ci in 0..cin {
            for co in 0..cout {
                acc[b * cin + ci] +=
                    dy[s * cout + co] as f64 * w[(tap * cin + ci) * cout + co] as f64;
            }
        }
    });
    store(&acc, dx);
}

/// Gradient of [`conv2d`] with respect to `w`:
/// `dw[tap, ci, co] = sum_s x[b(s, tap), ci] * dy[s, co]`.
pub fn conv2d_backward_filter(shape: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let mut acc = vec![0f64; dw.len()];
    shape.win.for_each_tap(|s, b, tap| {
        for ci in 0..cin {
            let xv = x[b * cin + ci] as f64;
            for co in 0..cout {
                acc[(tap * cin + ci) * cout + co] += xv * dy[s * cout + co] as f64;
            }
        }
    });
    store(&acc, dw);
}

/// Transposed convolution (PyTorch's `ConvTranspose2d`): every input pixel `s`
/// scatters `x[s, ci] * w[tap, ci, co]` to output pixel `b(s, tap)`, so
/// `y[b, co] = sum over (s, tap) with b(s, tap) = b of x[s, ci] * w[tap, ci, co]`.
pub fn conv_transpose2d(shape: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let mut acc = vec![0f64; y.len()];
    shape.win.for_each_tap(|s, b, tap| {
        for ci in 0..cin {
            let xv = x[s * cin + ci] as f64;
            for co in 0..cout {
                acc[b * cout + co] += xv * w[(tap * cin + ci) * cout + co] as f64;
            }
        }
    });
    store(&acc, y);
}

/// Gradient of [`conv_transpose2d`] with respect to `x`:
/// `dx[s, ci] = sum_{tap, co} dy[b(s, tap), co] * w[tap, ci, co]`.
pub fn conv_transpose2d_backward_data(shape: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let mut acc = vec![0f64; dx.len()];
    shape.win.for_each_tap(|s, b, tap| {
        for ci in 0..cin {
            for co in 0..cout {
                acc[s * cin + ci] +=
                    dy[b * cout + co] as f64 * w[(tap * cin + ci) * cout + co] as f64;
            }
        }
    });
    store(&acc, dx);
}

/// Gradient of [`conv_transpose2d`] with respect to `w`:
/// `dw[tap, ci, co] = sum_s x[s, ci] * dy[b(s, tap), co]`.
pub fn conv_transpose2d_backward_filter(shape: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (cin, cout) = (shape.cin, shape.cout);
    let mut acc = vec![0f64; dw.len()];
    shape.win.for_each_tap(|s, b, tap| {
        for ci in 0..cin {
            let xv = x[s * cin + ci] as f64;
            for co in 0..cout {
                acc[(tap * cin + ci) * cout + co] += xv * dy[b * cout + co] as f64;
            }
        }
    });
    store(&acc, dw);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::layout::Window;

    fn shape(
        big: (usize, usize),
        small: (usize, usize),
        kpad: (usize, usize, usize),
        c: (usize, usize),
    ) -> ConvShape {
        let op = ldnc_ir::Op::Conv2d {
            k: kpad.0,
            stride: kpad.1,
            pad: kpad.2,
        };
        let win = Window::new(&op, 1, big, small, kpad).expect("test window fits");
        ConvShape {
            win,
            cin: c.0,
            cout: c.1,
        }
    }

    #[test]
    fn conv2d_3x3_pad1_sums_neighbours() {
        // A 3x3 all-ones kernel over a 2x2 image with padding 1 sums the whole
        // image at every position, because every pixel is a neighbour of every other.
        let s = shape((2, 2), (2, 2), (3, 1, 1), (1, 1));
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut y = [0.0; 4];
        conv2d(&s, &x, &[1.0; 9], &mut y);
        assert_eq!(y, [10.0; 4]);
    }

    #[test]
    fn conv2d_1x1_mixes_channels() {
        let s = shape((1, 1), (1, 1), (1, 1, 0), (2, 3));
        // w[ci, co]: row 0 = [1, 2, 3], row 1 = [4, 5, 6].
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut y = [0.0; 3];
        conv2d(&s, &[1.0, 10.0], &w, &mut y);
        assert_eq!(y, [41.0, 52.0, 63.0]);
    }

    #[test]
    fn conv2d_stride2_picks_corners() {
        // A 1x1 stride-2 conv over 3x3 reads pixels (0,0), (0,2), (2,0), (2,2).
        let s = shape((3, 3), (2, 2), (1, 2, 0), (1, 1));
        let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let mut y = [0.0; 4];
        conv2d(&s, &x, &[2.0], &mut y);
        assert_eq!(y, [0.0, 4.0, 12.0, 16.0]);
    }

    #[test]
    fn conv_transpose2d_stride2_spreads_pixels() {
        // k 2, stride 2: every input pixel becomes a 2x2 block scaled by the kernel.
        let s = shape((4, 4), (2, 2), (2, 2, 0), (1, 1));
        let mut y = [0.0; 16];
        conv_transpose2d(
            &s,
            &[1.0, 2.0, 3.0, 4.0],
            &[1.0, 10.0, 100.0, 1000.0],
            &mut y,
        );
        assert_eq!(&y[..4], &[1.0, 10.0, 2.0, 20.0]);
        assert_eq!(&y[4..8], &[100.0, 1000.0, 200.0, 2000.0]);
        assert_eq!(&y[8..12], &[3.0, 30.0, 4.0, 40.0]);
    }

    #[test]
    fn conv2d_backward_data_is_transpose() {
        // dx of a 1x1 conv is dy times the transposed channel matrix.
        let s = shape((1, 1), (1, 1), (1, 1, 0), (2, 3));
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut dx = [0.0; 2];
        conv2d_backward_data(&s, &[1.0, 0.0, 1.0], &w, &mut dx);
        assert_eq!(dx, [4.0, 10.0]);
    }

    #[test]
    fn conv2d_backward_filter_correlates() {
        // 2x1 image, 1x1 kernel: dw = sum_s x[s] * dy[s].
        let s = shape((2, 1), (2, 1), (1, 1, 0), (1, 1));
        let mut dw = [0.0];
        conv2d_backward_filter(&s, &[2.0, 3.0], &[5.0, 7.0], &mut dw);
        assert_eq!(dw, [31.0]);
    }

    #[test]
    fn conv_transpose2d_backward_ops_gather() {
        let s = shape((4, 4), (2, 2), (2, 2, 0), (1, 1));
        let dy: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let mut dx = [0.0; 4];
        conv_transpose2d_backward_data(&s, &dy, &[1.0; 4], &mut dx);
        // Input pixel 0 spread to output pixels 0, 1, 4, 5.
        assert_eq!(dx[0], 10.0);
        let mut dw = [0.0; 4];
        conv_transpose2d_backward_filter(&s, &[1.0, 0.0, 0.0, 0.0], &dy, &mut dw);
        assert_eq!(dw, [0.0, 1.0, 4.0, 5.0]);
    }
}
