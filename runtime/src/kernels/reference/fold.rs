//! Reference kernels of the batch-norm fold: the folded weight and bias of a
//! conv followed by an evaluation-mode batch norm, and the bias (and ReLU)
//! epilogue of the folded conv.
//!
//! With running statistics, `bn(y) = s * y + t` per channel, where
//! `s = gamma / sqrt(var + eps)` and `t = beta - mean * s`, so
//! `bn(conv(x, w)) = conv(x, w * s) + t`. Arithmetic runs in f64.

/// Per-channel scale `s = gamma / sqrt(var + eps)` from `[2, c]` running
/// statistics and affine parameters.
fn scale(running: &[f32], affine: &[f32], eps: f32) -> Vec<f64> {
    let c = running.len() / 2;
    (0..c)
        .map(|ch| affine[ch] as f64 / (running[c + ch] as f64 + eps as f64).sqrt())
        .collect()
}

/// `w'[.., co] = w[.., co] * s[co]` for a `[k, k, cin, cout]` weight, whose
/// output channel is the fastest axis.
pub fn bn_fold_weight(w: &[f32], running: &[f32], affine: &[f32], eps: f32, folded: &mut [f32]) {
    let s = scale(running, affine, eps);
    let cout = s.len();
    for (row, out) in w.chunks_exact(cout).zip(folded.chunks_exact_mut(cout)) {
        for co in 0..cout {
            out[co] = (row[co] as f64 * s[co]) as f32;
        }
    }
}

/// `b[co] = beta[co] - mean[co] * s[co]`.
pub fn bn_fold_bias(running: &[f32], affine: &[f32], eps: f32, bias: &mut [f32]) {
    let s = scale(running, affine, eps);
    let c = s.len();
    for ch in 0..c {
        bias[ch] = (affine[c + ch] as f64 - running[ch] as f64 * s[ch]) as f32;
    }
}

/// Adds `bias[ch]` to channel `ch` of every row of `y` in place, then
/// rectifies when `relu`.
pub fn bias_relu(y: &mut [f32], bias: &[f32], relu: bool) {
    for row in y.chunks_exact_mut(bias.len().max(1)) {
        for (v, b) in row.iter_mut().zip(bias) {
            let sum = *v + b;
            *v = if relu { sum.max(0.0) } else { sum };
        }
    }
}
