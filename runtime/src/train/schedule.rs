//! Learning-rate schedules over the iterations of a run.

use ldnc_ir::spec::LrSchedule;

/// Learning rate at `step` of `total`, in epoch `epoch` (counted from 0):
/// step decay divides by 10 after 1/2 and 3/4 of the iterations, cosine
/// decays to zero, and exponential decay multiplies by its `decay` once per
/// finished epoch.
pub fn learning_rate(base: f64, schedule: LrSchedule, step: u64, total: u64, epoch: usize) -> f64 {
    let t = step as f64 / total.max(1) as f64;
    match schedule {
        LrSchedule::Step if t >= 0.75 => base / 100.0,
        LrSchedule::Step if t >= 0.5 => base / 10.0,
        LrSchedule::Step | LrSchedule::Constant => base,
        LrSchedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        LrSchedule::Exponential { decay } => base * decay.powf(epoch as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_decays_once_per_epoch() {
        let schedule = LrSchedule::Exponential { decay: 0.995 };
        // 10 steps per epoch.
        let rate = |step| learning_rate(1e-3, schedule, step, 700 * 10, (step / 10) as usize);
        assert_eq!(rate(0), 1e-3);
        assert_eq!(rate(9), 1e-3, "constant within the first epoch");
        assert!((rate(10) - 0.995e-3).abs() < 1e-15);
        assert!((rate(25) - 1e-3 * 0.995f64.powi(2)).abs() < 1e-15);
        assert!((rate(6999) - 1e-3 * 0.995f64.powi(699)).abs() < 1e-15);
    }

    #[test]
    fn step_divides_at_half_and_three_quarters() {
        let rate = |step| learning_rate(0.1, LrSchedule::Step, step, 100, 0);
        assert_eq!(rate(49), 0.1);
        assert!((rate(50) - 0.01).abs() < 1e-12);
        assert!((rate(75) - 0.001).abs() < 1e-12);
    }
}
