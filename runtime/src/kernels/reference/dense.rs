//! Reference linear layer and softmax cross-entropy, as plain loops with f64
//! accumulation.
//!
//! Matrices are row-major: `x` is `[rows, c]`, `w` is `[c, k]`, `b` is `[k]`.
//! The loss reads logits `[rows, k]` and labels `[rows]` (class indices as f32).

use crate::kernels::layout::class_index;
use crate::kernels::KernelError;
use ldnc_ir::Op;

/// `y = x w + b`.
pub fn linear(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    let k = b.len();
    let c = w.len() / k.max(1);
    for (xr, yr) in x.chunks_exact(c.max(1)).zip(y.chunks_exact_mut(k)) {
        for j in 0..k {
            let mut acc = b[j] as f64;
            for i in 0..c {
                acc += xr[i] as f64 * w[i * k + j] as f64;
            }
            yr[j] = acc as f32;
        }
    }
}

/// Gradient of [`linear`] with respect to `x`: `dx = dy w^T`.
pub fn linear_backward_data(dy: &[f32], w: &[f32], k: usize, dx: &mut [f32]) {
    let c = w.len() / k;
    for (dr, xr) in dy.chunks_exact(k).zip(dx.chunks_exact_mut(c)) {
        for i in 0..c {
            let mut acc = 0f64;
            for j in 0..k {
                acc += dr[j] as f64 * w[i * k + j] as f64;
            }
            xr[i] = acc as f32;
        }
    }
}

/// Gradient of [`linear`] with respect to `w`: `dw = x^T dy`, a `[c, k]` matrix.
pub fn linear_backward_weight(x: &[f32], dy: &[f32], c: usize, k: usize, dw: &mut [f32]) {
    let mut acc = vec![0f64; c * k];
    for (xr, dr) in x.chunks_exact(c).zip(dy.chunks_exact(k)) {
        for i in 0..c {
            for j in 0..k {
                acc[i * k + j] += xr[i] as f64 * dr[j] as f64;
            }
        }
    }
    for (o, a) in dw.iter_mut().zip(&acc) {
        *o = *a as f32;
    }
}

/// Class count, class weighting and ignore label of a softmax cross-entropy.
#[derive(Debug, Clone, Copy)]
pub struct LossSpec<'a> {
    pub classes: usize,
    pub ignore: Option<u32>,
    pub class_weights: Option<&'a [f32]>,
}

impl LossSpec<'_> {
    /// Weight of `class`: `class_weights[class]`, or 1 without class weights.
    pub fn weight(&self, class: usize) -> f64 {
        self.class_weights.map_or(1.0, |w| w[class] as f64)
    }
}

/// Softmax probabilities of one row of logits and `log(sum exp)`, computed
/// after subtracting the row maximum so that no exponential overflows.
pub fn softmax_row(logits: &[f32], probs: &mut [f64]) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let mut total = 0f64;
    for (p, &v) in probs.iter_mut().zip(logits) {
        *p = (v as f64 - max).exp();
        total += *p;
    }
    probs.iter_mut().for_each(|p| *p /= total);
    max + total.ln()
}

/// `(sum_i cw[y_i] * nll_i, sum_i cw[y_i])` over the labelled rows of a chunk
/// whose first row is row `first` of the batch (for error messages), with
/// `nll_i = logsumexp(z_i) - z_i[y_i]`.
pub fn weighted_nll(
    op: &Op,
    logits: &[f32],
    labels: &[f32],
    spec: LossSpec,
    first: usize,
) -> Result<(f64, f64), KernelError> {
    let k = spec.classes;
    let mut probs = vec![0f64; k];
    let (mut nll, mut total_weight) = (0f64, 0f64);
    for (row, &label) in labels.iter().enumerate() {
        let Some(class) = class_index(op, label, first + row, k, spec.ignore)? else {
            continue;
        };
        let z = &logits[row * k..(row + 1) * k];
        let lse = softmax_row(z, &mut probs);
        nll += spec.weight(class) * (lse - z[class] as f64);
        total_weight += spec.weight(class);
    }
    Ok((nll, total_weight))
}

/// Turns the sums of [`weighted_nll`] into the loss, which is 0 when no
/// labelled row has weight.
pub fn loss_from_sums((nll, total_weight): (f64, f64)) -> f32 {
    if total_weight == 0.0 {
        0.0
    } else {
        (nll / total_weight) as f32
    }
}

/// `loss = sum_i cw[y_i] * (logsumexp(z_i) - z_i[y_i]) / sum_i cw[y_i]` over
/// the rows whose label is not the ignore label, and 0 when no row counts.
pub fn softmax_cross_entropy(
    op: &Op,
    logits: &[f32],
    labels: &[f32],
    spec: LossSpec,
) -> Result<f32, KernelError> {
    weighted_nll(op, logits, labels, spec, 0).map(loss_from_sums)
}

/// `sum_i cw[y_i]` over the labelled rows of a chunk starting at row `first`.
pub fn label_weight(
    op: &Op,
    labels: &[f32],
    spec: LossSpec,
    first: usize,
) -> Result<f64, KernelError> {
    let mut total = 0f64;
    for (row, &label) in labels.iter().enumerate() {
        if let Some(class) = class_index(op, label, first + row, spec.classes, spec.ignore)? {
            total += spec.weight(class);
        }
    }
    Ok(total)
}

/// Writes `scale * cw[y_i] * (softmax(z_i) - onehot(y_i))` for every row of a
/// chunk, and 0 for ignored rows. The labels must have passed [`label_weight`].
pub fn fill_loss_grad(
    logits: &[f32],
    labels: &[f32],
    spec: LossSpec,
    scale: f64,
    grad: &mut [f32],
) {
    let k = spec.classes;
    let mut probs = vec![0f64; k];
    for (row, &label) in labels.iter().enumerate() {
        let g = &mut grad[row * k..(row + 1) * k];
        let ignored = spec.ignore.is_some_and(|i| label == i as f32);
        if ignored || scale == 0.0 {
            g.fill(0.0);
            continue;
        }
        let class = label as usize;
        softmax_row(&logits[row * k..(row + 1) * k], &mut probs);
        let row_scale = scale * spec.weight(class);
        for (j, (gj, p)) in g.iter_mut().zip(&probs).enumerate() {
            let onehot = if j == class { 1.0 } else { 0.0 };
            *gj = (row_scale * (p - onehot)) as f32;
        }
    }
}

/// `weight * d(loss)/d(logits)` for [`softmax_cross_entropy`]: row `i` gets
/// `weight * cw[y_i] * (softmax(z_i) - onehot(y_i)) / sum_j cw[y_j]`, and
/// ignored rows get 0 (all rows get 0 when the weights sum to 0).
pub fn softmax_cross_entropy_backward(
    op: &Op,
    logits: &[f32],
    labels: &[f32],
    spec: LossSpec,
    weight: f32,
    grad: &mut [f32],
) -> Result<(), KernelError> {
    let total_weight = label_weight(op, labels, spec, 0)?;
    let scale = if total_weight == 0.0 {
        0.0
    } else {
        weight as f64 / total_weight
    };
    fill_loss_grad(logits, labels, spec, scale, grad);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOSS: Op = Op::SoftmaxCrossEntropy {
        ignore: None,
        weighted: false,
    };

    #[test]
    fn linear_adds_bias() {
        // x = [1, 2], w = [[1, 0, 1], [0, 1, 1]], b = [10, 20, 30].
        let mut y = [0.0; 3];
        linear(
            &[1.0, 2.0],
            &[1.0, 0.0, 1.0, 0.0, 1.0, 1.0],
            &[10.0, 20.0, 30.0],
            &mut y,
        );
        assert_eq!(y, [11.0, 22.0, 33.0]);
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
    fn cross_entropy_uniform_logits() {
        // Equal logits over 4 classes give log 4 whatever the label.
        let spec = LossSpec {
            classes: 4,
            ignore: None,
            class_weights: None,
        };
        let loss =
            softmax_cross_entropy(&LOSS, &[7.0; 8], &[0.0, 3.0], spec).expect("valid labels");
        assert!((loss - 4f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn cross_entropy_stable_for_large_logits() {
        let spec = LossSpec {
            classes: 2,
            ignore: None,
            class_weights: None,
        };
        let loss =
            softmax_cross_entropy(&LOSS, &[1000.0, 0.0], &[1.0], spec).expect("valid labels");
        assert!((loss - 1000.0).abs() < 1e-3);
    }

    #[test]
    fn cross_entropy_weights_and_ignore() {
        // Row 0: label 0 with weight 3; row 1 ignored; row 2: label 1 with weight 1.
        let spec = LossSpec {
            classes: 2,
            ignore: Some(9),
            class_weights: Some(&[3.0, 1.0]),
        };
        let logits = [0.0, 0.0, 5.0, -5.0, 0.0, 0.0];
        let loss =
            softmax_cross_entropy(&LOSS, &logits, &[0.0, 9.0, 1.0], spec).expect("valid labels");
        assert!((loss - 2f32.ln()).abs() < 1e-6);
        let mut grad = [1.0; 6];
        softmax_cross_entropy_backward(&LOSS, &logits, &[0.0, 9.0, 1.0], spec, 2.0, &mut grad)
            .expect("valid labels");
        // Row 0: 2 * 3 / 4 * (0.5 - 1, 0.5); row 2: 2 * 1 / 4 * (0.5, 0.5 - 1).
        assert_eq!(grad, [-0.75, 0.75, 0.0, 0.0, 0.25, -0.25]);
    }

    #[test]
    fn cross_entropy_all_ignored_is_zero() {
        let spec = LossSpec {
            classes: 2,
            ignore: Some(0),
            class_weights: None,
        };
        let loss = softmax_cross_entropy(&LOSS, &[1.0, 2.0], &[0.0], spec).expect("valid labels");
        assert_eq!(loss, 0.0);
        let mut grad = [1.0; 2];
        softmax_cross_entropy_backward(&LOSS, &[1.0, 2.0], &[0.0], spec, 1.0, &mut grad)
            .expect("valid labels");
        assert_eq!(grad, [0.0, 0.0]);
    }

    #[test]
    fn cross_entropy_rejects_bad_label() {
        let spec = LossSpec {
            classes: 2,
            ignore: None,
            class_weights: None,
        };
        assert!(softmax_cross_entropy(&LOSS, &[1.0, 2.0], &[2.0], spec).is_err());
    }
}
