//! Learning-rate schedules over the iterations of a run.

use ldnc_ir::spec::LrSchedule;

/// Learning rate at `step` of `total`: step decay divides by 10 after 1/2 and
/// 3/4 of the iterations, cosine decays to zero.
pub fn learning_rate(base: f64, schedule: LrSchedule, step: u64, total: u64) -> f64 {
    let t = step as f64 / total.max(1) as f64;
    match schedule {
        LrSchedule::Step if t >= 0.75 => base / 100.0,
        LrSchedule::Step if t >= 0.5 => base / 10.0,
        LrSchedule::Step | LrSchedule::Constant => base,
        LrSchedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
    }
}
