//! In-place updates: SGD with momentum, RMSprop and batch-norm running
//! statistics.
//!
//! RMSprop has a plain loop, the reference, and a version that splits the
//! tensor into chunks over rayon's threads for the fast kernel set. Each
//! element's update reads only that element, so both give the same bits.

use rayon::prelude::*;

/// SGD with momentum and weight decay as PyTorch's `torch.optim.SGD` defines it:
/// `g = grad + wd * p`, `v = mu * v + g`, then `p -= lr * (g + mu * v)` with
/// Nesterov momentum or `p -= lr * v` without.
pub fn sgd(
    param: &mut [f32],
    grad: &[f32],
    velocity: &mut [f32],
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
) {
    for ((p, &g), v) in param.iter_mut().zip(grad).zip(velocity.iter_mut()) {
        let g = g + weight_decay * *p;
        *v = momentum * *v + g;
        let step = if nesterov { g + momentum * *v } else { *v };
        *p -= lr * step;
    }
}

/// Elements per rayon task of [`rmsprop_parallel`]: large enough that a task
/// costs more than scheduling it.
const RMSPROP_CHUNK: usize = 1 << 14;

/// RMSprop with weight decay: `g = grad + wd * p`,
/// `s = decay * s + (1 - decay) * g^2`, then `p -= lr * g / (sqrt(s) + eps)`,
/// with `eps` added outside the root as PyTorch's `torch.optim.RMSprop` does.
pub fn rmsprop(
    param: &mut [f32],
    grad: &[f32],
    mean_square: &mut [f32],
    lr: f32,
    decay: f32,
    eps: f32,
    weight_decay: f32,
) {
    for ((p, &g), s) in param.iter_mut().zip(grad).zip(mean_square.iter_mut()) {
        let g = g + weight_decay * *p;
        *s = decay * *s + (1.0 - decay) * g * g;
        *p -= lr * g / (s.sqrt() + eps);
    }
}

/// [`rmsprop`] over chunks of the tensor on rayon's threads.
pub fn rmsprop_parallel(
    param: &mut [f32],
    grad: &[f32],
    mean_square: &mut [f32],
    lr: f32,
    decay: f32,
    eps: f32,
    weight_decay: f32,
) {
    param
        .par_chunks_mut(RMSPROP_CHUNK)
        .zip(grad.par_chunks(RMSPROP_CHUNK))
        .zip(mean_square.par_chunks_mut(RMSPROP_CHUNK))
        .for_each(|((p, g), s)| rmsprop(p, g, s, lr, decay, eps, weight_decay));
}

/// `running = (1 - m) * running + m * batch` for the mean (row 0) and variance
/// (row 1) of a `[2, C]` tensor. The batch variance in `stats` is biased; the
/// running estimate uses the unbiased one, `var * count / (count - 1)`, as
/// PyTorch's and TensorFlow's batch norm do.
pub fn bn_running_update(running: &mut [f32], stats: &[f32], momentum: f32, count: usize) {
    let c = running.len() / 2;
    let correction = if count > 1 {
        count as f32 / (count - 1) as f32
    } else {
        1.0
    };
    for i in 0..c {
        running[i] = (1.0 - momentum) * running[i] + momentum * stats[i];
        running[c + i] = (1.0 - momentum) * running[c + i] + momentum * stats[c + i] * correction;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_matches_hand_computation() {
        let mut p = vec![1.0];
        let mut v = vec![0.5];
        sgd(&mut p, &[2.0], &mut v, 0.1, 0.9, 0.01, false);
        // g = 2 + 0.01 = 2.01; v = 0.45 + 2.01 = 2.46; p = 1 - 0.246.
        assert!((v[0] - 2.46).abs() < 1e-6);
        assert!((p[0] - 0.754).abs() < 1e-6);
    }

    #[test]
    fn rmsprop_matches_hand_computation() {
        let mut p = vec![1.0];
        let mut s = vec![0.5];
        rmsprop(&mut p, &[2.0], &mut s, 0.1, 0.9, 1e-6, 0.01);
        // g = 2.01; s = 0.45 + 0.1 * 4.0401 = 0.85401; p = 1 - 0.1 * 2.01 / sqrt(s).
        assert!((s[0] - 0.85401).abs() < 1e-6, "{}", s[0]);
        let expected = 1.0 - 0.1 * 2.01 / (0.85401f32.sqrt() + 1e-6);
        assert!((p[0] - expected).abs() < 1e-6, "{}", p[0]);
    }

    #[test]
    fn rmsprop_parallel_matches_reference() {
        let len = 3 * RMSPROP_CHUNK + 17;
        let grad: Vec<f32> = (0..len)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let start: Vec<f32> = (0..len)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let (mut p1, mut s1) = (start.clone(), vec![0.25; len]);
        let (mut p2, mut s2) = (start, vec![0.25; len]);
        rmsprop(&mut p1, &grad, &mut s1, 0.01, 0.9, 1e-6, 1e-4);
        rmsprop_parallel(&mut p2, &grad, &mut s2, 0.01, 0.9, 1e-6, 1e-4);
        assert_eq!(p1, p2);
        assert_eq!(s1, s2);
    }

    #[test]
    fn running_variance_is_unbiased() {
        let mut r = vec![0.0, 1.0];
        bn_running_update(&mut r, &[2.0, 3.0], 0.1, 4);
        assert!((r[0] - 0.2).abs() < 1e-6);
        assert!((r[1] - (0.9 + 0.1 * 4.0)).abs() < 1e-6);
    }
}
