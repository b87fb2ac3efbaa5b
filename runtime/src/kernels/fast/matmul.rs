//! A safe matrix product over strided f32 views, computed by the `gemm` crate
//! (version 0.18), whose entry point takes raw pointers and strides.
//!
//! The views check their strides against their slices when built, and
//! [`matmul`] checks that the shapes agree, so the one `unsafe` call below only
//! ever receives in-bounds pointers.

use gemm::Parallelism;

/// A read-only `rows x cols` matrix view: element `(r, c)` is
/// `data[r * row_stride + c * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// Creates a row-major view of the first `rows * cols` elements of `data`.
    ///
    /// # Panics
    ///
    /// Panics if `data` is shorter than `rows * cols`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        assert!(
            data.len() >= rows * cols,
            "a {rows}x{cols} matrix needs {} elements, the slice has {}",
            rows * cols,
            data.len()
        );
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Returns the transposed view of the same data.
    pub fn t(self) -> Mat<'a> {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// Computes `dst = lhs * rhs`, or `dst += lhs * rhs` when `accumulate`, with
/// `dst` a row-major `lhs.rows x rhs.cols` matrix. `parallel` lets the GEMM
/// split the work over the rayon pool; callers that already run one product
/// per rayon task pass `false`.
///
/// # Panics
///
/// Panics if the inner dimensions differ or `dst` has the wrong length.
pub fn matmul(dst: &mut [f32], lhs: Mat, rhs: Mat, accumulate: bool, parallel: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(
        k, rhs.rows,
        "inner dimensions differ: {m}x{k} times {}x{n}",
        rhs.rows
    );
    assert_eq!(
        dst.len(),
        m * n,
        "the destination of a {m}x{n} product has {} elements",
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let parallelism = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };

    // SAFETY: `dst` contains exactly m * n elements at row stride n and column
    // stride 1. `Mat::new` checked that its slice contains `rows * cols` row-major
    // elements, and `t` only swaps the strides, so every (r, c) with r < rows
    // and c < cols of `lhs` and `rhs` is in bounds. `dst` is a unique borrow,
    // so it aliases neither operand. `gemm` reads `dst` only when `read_dst` is
    // true, and computes `dst = alpha * dst + beta * lhs * rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_small_product() {
        // [[1, 2], [3, 4]] * [[5, 6], [7, 8]] = [[19, 22], [43, 50]].
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [5.0, 6.0, 7.0, 8.0];
        let mut c = [0.0; 4];
        matmul(&mut c, Mat::new(&a, 2, 2), Mat::new(&b, 2, 2), false, false);
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
    }

    #[test]
    fn matmul_transposed_views_and_accumulate() {
        // a^T b with a = [[1, 2, 3]] (1x3), b = [[1, 1]] (1x2), added to ones.
        let a = [1.0, 2.0, 3.0];
        let b = [1.0, 10.0];
        let mut c = [1.0; 6];
        matmul(
            &mut c,
            Mat::new(&a, 1, 3).t(),
            Mat::new(&b, 1, 2),
            true,
            true,
        );
        assert_eq!(c, [2.0, 11.0, 3.0, 21.0, 4.0, 31.0]);
    }

    #[test]
    fn matmul_empty_inner_dimension() {
        let mut c = [5.0; 4];
        matmul(
            &mut c,
            Mat::new(&[], 2, 0),
            Mat::new(&[], 0, 2),
            false,
            false,
        );
        assert_eq!(c, [0.0; 4]);
    }
}
