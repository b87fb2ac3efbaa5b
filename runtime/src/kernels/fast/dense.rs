//! Fast linear layer as GEMMs, and softmax cross-entropy as a rayon
//! map-reduce over blocks of rows that runs the reference per-row code, which
//! is already a single pass over the logits.

use super::matmul::{matmul, Mat};
use crate::kernels::reference::dense::{self as reference, LossSpec};
use crate::kernels::KernelError;
use ldnc_ir::Op;
use rayon::prelude::*;

/// Rows of logits per rayon task.
const BLOCK_ROWS: usize = 1024;

/// `y = b + x w`: the bias is broadcast into `y` and the GEMM accumulates.
pub fn linear(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    let k = b.len();
    let c = w.len() / k.max(1);
    let rows = y.len() / k.max(1);
    for row in y.chunks_exact_mut(k.max(1)) {
        row.copy_from_slice(b);
    }
    matmul(y, Mat::new(x, rows, c), Mat::new(w, c, k), true, true);
}

/// `dx = dy w^T`.
pub fn linear_backward_data(dy: &[f32], w: &[f32], k: usize, dx: &mut [f32]) {
    let c = w.len() / k.max(1);
    let rows = dy.len() / k.max(1);
    matmul(
        dx,
        Mat::new(dy, rows, k),
        Mat::new(w, c, k).t(),
        false,
        true,
    );
}

/// `dw = x^T dy`.
pub fn linear_backward_weight(x: &[f32], dy: &[f32], c: usize, k: usize, dw: &mut [f32]) {
    let rows = x.len() / c.max(1);
    matmul(
        dw,
        Mat::new(x, rows, c).t(),
        Mat::new(dy, rows, k),
        false,
        true,
    );
}

/// Computes the loss of the reference set, with the per-block sums in parallel.
pub fn softmax_cross_entropy(
    op: &Op,
    logits: &[f32],
    labels: &[f32],
    spec: LossSpec,
) -> Result<f32, KernelError> {
    let k = spec.classes;
    let sums = labels
        .par_chunks(BLOCK_ROWS)
        .enumerate()
        .map(|(b, block)| {
            let first = b * BLOCK_ROWS;
            let z = &logits[first * k..(first + block.len()) * k];
            reference::weighted_nll(op, z, block, spec, first)
        })
        .try_reduce(|| (0.0, 0.0), |a, b| Ok((a.0 + b.0, a.1 + b.1)))?;
    Ok(reference::loss_from_sums(sums))
}

/// Computes the loss gradient of the reference set, with the label weights
/// summed and the gradient rows written in parallel.
pub fn softmax_cross_entropy_backward(
    op: &Op,
    logits: &[f32],
    labels: &[f32],
    spec: LossSpec,
    weight: f32,
    grad: &mut [f32],
) -> Result<(), KernelError> {
    let k = spec.classes;
    let total_weight = labels
        .par_chunks(BLOCK_ROWS)
        .enumerate()
        .map(|(b, block)| reference::label_weight(op, block, spec, b * BLOCK_ROWS))
        .try_reduce(|| 0.0, |a, b| Ok(a + b))?;
    let scale = if total_weight == 0.0 {
        0.0
    } else {
        weight as f64 / total_weight
    };
    grad.par_chunks_mut((BLOCK_ROWS * k).max(1))
        .zip(labels.par_chunks(BLOCK_ROWS))
        .enumerate()
        .for_each(|(b, (g, block))| {
            let first = b * BLOCK_ROWS;
            let z = &logits[first * k..(first + block.len()) * k];
            reference::fill_loss_grad(z, block, spec, scale, g);
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_adds_bias_over_rows() {
        let mut y = [0.0; 6];
        let w = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0];
        linear(&[1.0, 2.0, 0.0, 1.0], &w, &[10.0, 20.0, 30.0], &mut y);
        assert_eq!(y, [11.0, 22.0, 33.0, 10.0, 21.0, 31.0]);
    }

    #[test]
    fn linear_backward_matrices() {
        let w = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0];
        let mut dx = [0.0; 2];
        linear_backward_data(&[1.0, 2.0, 3.0], &w, 3, &mut dx);
        assert_eq!(dx, [4.0, 5.0]);
        let mut dw = [0.0; 6];
        linear_backward_weight(&[1.0, 2.0], &[1.0, 2.0, 3.0], 2, 3, &mut dw);
        assert_eq!(dw, [1.0, 2.0, 3.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn cross_entropy_error_names_row() {
        let op = Op::SoftmaxCrossEntropy {
            ignore: None,
            weighted: false,
        };
        let spec = LossSpec {
            classes: 2,
            ignore: None,
            class_weights: None,
        };
        let mut labels = vec![0.0; 3000];
        labels[2500] = 5.0;
        let logits = vec![0.0; 6000];
        let err =
            softmax_cross_entropy(&op, &logits, &labels, spec).expect_err("label 5 of 2 classes");
        assert!(err.to_string().contains("position 2500"), "{err}");
    }
}
