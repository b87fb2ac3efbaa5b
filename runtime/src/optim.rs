//! In-place updates: SGD with momentum and batch-norm running statistics.

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
    fn running_variance_is_unbiased() {
        let mut r = vec![0.0, 1.0];
        bn_running_update(&mut r, &[2.0, 3.0], 0.1, 4);
        assert!((r[0] - 0.2).abs() < 1e-6);
        assert!((r[1] - (0.9 + 0.1 * 4.0)).abs() < 1e-6);
    }
}
