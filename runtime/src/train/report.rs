//! The figures of each epoch: the JSON row of `metrics.jsonl`, the line
//! printed after the epoch, and the progress bar during it.

use serde::{Deserialize, Serialize};

use crate::metrics::Hits;

use super::session::Evaluation;

/// One epoch's figures, written as one JSON line to `metrics.jsonl`.
///
/// For segmentation the accuracies are pixel accuracies over pixels whose
/// label is not the ignore label.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: u64,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub test_error: f64,
    /// Fraction of test images whose label is not among the 5 highest logits
    /// (classification only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_top5_error: Option<f64>,
    /// Mean over classes of the test split's intersection over union
    /// (segmentation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_mean_iou: Option<f64>,
    /// Train and test images left out because they could not be decoded.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_images: u64,
    pub images_per_second: f64,
    pub seconds: f64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// The training side of one epoch, before evaluation.
pub(super) struct EpochFigures {
    pub(super) epoch: usize,
    pub(super) step: u64,
    pub(super) lr: f64,
    pub(super) train_loss: f64,
    pub(super) train_hits: Hits,
    pub(super) skipped: u64,
    pub(super) images: usize,
    pub(super) train_seconds: f64,
    pub(super) seconds: f64,
}

pub(super) fn epoch_metrics(
    train: EpochFigures,
    test: &Evaluation,
    segmentation: bool,
) -> EpochMetrics {
    let accuracy = test.confusion.accuracy();
    EpochMetrics {
        epoch: train.epoch,
        step: train.step,
        lr: train.lr,
        train_loss: train.train_loss,
        train_accuracy: train.train_hits.correct as f64 / train.train_hits.scored.max(1) as f64,
        test_loss: test.loss,
        test_accuracy: accuracy,
        test_error: 1.0 - accuracy,
        test_top5_error: (!segmentation).then(|| 1.0 - test.confusion.top5_accuracy()),
        test_mean_iou: segmentation.then(|| test.confusion.mean_iou()),
        skipped_images: train.skipped + test.skipped,
        images_per_second: train.images as f64 / train.train_seconds.max(1e-9),
        seconds: train.seconds,
    }
}

/// The line printed after each epoch.
pub(super) fn epoch_line(row: &EpochMetrics, epochs: usize) -> String {
    let mut line = format!(
        "epoch {:>3}/{}  train loss {:.4}  train acc {:.2}%  test loss {:.4}  test acc {:.2}%",
        row.epoch,
        epochs,
        row.train_loss,
        100.0 * row.train_accuracy,
        row.test_loss,
        100.0 * row.test_accuracy,
    );
    if let Some(top5) = row.test_top5_error {
        line.push_str(&format!("  top-5 err {:.2}%", 100.0 * top5));
    }
    if let Some(iou) = row.test_mean_iou {
        line.push_str(&format!("  mean IoU {:.2}%", 100.0 * iou));
    }
    line.push_str(&format!("  {:.0} img/s", row.images_per_second));
    if row.skipped_images > 0 {
        line.push_str(&format!(
            "  (undecodable images skipped: {})",
            row.skipped_images
        ));
    }
    line
}

pub(super) fn progress_bar(
    show: bool,
    steps: u64,
    epoch: usize,
    epochs: usize,
) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} {msg} (ETA {eta})",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    bar
}
