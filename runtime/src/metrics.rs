//! Prediction metrics: top-1 and top-5 accuracy for classification, and the
//! confusion counts behind pixel accuracy and per-class IoU for segmentation.
//!
//! Every function takes logits as rows of `classes` values (one row per image,
//! or one per pixel) and labels as `f32` class indices. A label that is
//! negative, not below `classes` or equal to the ignore label is skipped, so
//! padding and void pixels never count.

/// Number of rows of `logits` (`n x classes`, or one row per pixel) whose argmax
/// equals the label.
pub fn correct(logits: &[f32], labels: &[f32], classes: usize) -> usize {
    hits(logits, labels, classes, None).correct
}

/// Correct and scored rows of one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hits {
    /// Scored rows whose argmax equals the label.
    pub correct: usize,
    /// Rows with a label that counts: not `ignore` and in `0..classes`.
    pub scored: usize,
}

/// Counts the rows whose argmax equals the label among the rows that count,
/// which is pixel accuracy over non-ignored pixels for segmentation.
pub fn hits(logits: &[f32], labels: &[f32], classes: usize, ignore: Option<u32>) -> Hits {
    let mut hits = Hits::default();
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        let Some(label) = scored_label(label, classes, ignore) else {
            continue;
        };
        hits.scored += 1;
        if argmax(row) == label {
            hits.correct += 1;
        }
    }
    hits
}

/// Returns the class of `label`, or `None` when the row does not count.
fn scored_label(label: f32, classes: usize, ignore: Option<u32>) -> Option<usize> {
    // A float cast to usize saturates at 0, so a negative fill label must be
    // rejected before the cast.
    if label.is_nan() || label < 0.0 || ignore == Some(label as u32) || label as usize >= classes {
        return None;
    }
    Some(label as usize)
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// A confusion matrix, `counts[label * classes + predicted]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Confusion {
    pub classes: usize,
    pub counts: Vec<u64>,
    /// Rows whose label is among the `top5` highest logits.
    pub top5: u64,
}

impl Confusion {
    pub fn new(classes: usize) -> Confusion {
        Confusion {
            classes,
            counts: vec![0; classes * classes],
            top5: 0,
        }
    }

    /// Adds every row of `logits` whose label counts (see [`hits`]).
    pub fn add(&mut self, logits: &[f32], labels: &[f32], ignore: Option<u32>) {
        for (row, &label) in logits.chunks_exact(self.classes).zip(labels) {
            let Some(label) = scored_label(label, self.classes, ignore) else {
                continue;
            };
            let predicted = argmax(row);
            self.counts[label * self.classes + predicted] += 1;
            let higher = row.iter().filter(|&&v| v > row[label]).count();
            if higher < 5 {
                self.top5 += 1;
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Top-1 accuracy.
    pub fn accuracy(&self) -> f64 {
        let right: u64 = (0..self.classes)
            .map(|c| self.counts[c * self.classes + c])
            .sum();
        right as f64 / self.total().max(1) as f64
    }

    pub fn top5_accuracy(&self) -> f64 {
        self.top5 as f64 / self.total().max(1) as f64
    }

    /// Intersection over union of each class: `tp / (tp + fp + fn)`, and 0
    /// for a class that is neither labelled nor predicted.
    pub fn iou(&self) -> Vec<f64> {
        self.class_iou()
            .into_iter()
            .map(|iou| iou.unwrap_or(0.0))
            .collect()
    }

    /// Intersection over union of each class, `None` for a class that is
    /// neither labelled nor predicted (its union is empty).
    pub fn class_iou(&self) -> Vec<Option<f64>> {
        let k = self.classes;
        (0..k)
            .map(|c| {
                let tp = self.counts[c * k + c];
                let labelled: u64 = (0..k).map(|p| self.counts[c * k + p]).sum();
                let predicted: u64 = (0..k).map(|l| self.counts[l * k + c]).sum();
                let union = labelled + predicted - tp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean IoU over the classes with a non-empty union; 0 when nothing was scored.
    pub fn mean_iou(&self) -> f64 {
        let present: Vec<f64> = self.class_iou().into_iter().flatten().collect();
        if present.is_empty() {
            0.0
        } else {
            present.iter().sum::<f64>() / present.len() as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_iou() {
        let mut c = Confusion::new(2);
        // Rows predict 0, 1, 1; labels 0, 1, 0.
        c.add(&[1.0, 0.0, 0.0, 1.0, 0.0, 1.0], &[0.0, 1.0, 0.0], None);
        assert!((c.accuracy() - 2.0 / 3.0).abs() < 1e-12);
        let iou = c.iou();
        assert!((iou[0] - 0.5).abs() < 1e-12);
        assert!((iou[1] - 0.5).abs() < 1e-12);
        assert_eq!(correct(&[1.0, 0.0, 0.0, 1.0], &[0.0, 0.0], 2), 1);
    }

    #[test]
    fn ignored_and_negative_labels_skipped() {
        // Rows predict 0, 1, 0; labels 0, void (2), padding (-1).
        let logits = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0];
        let labels = [0.0, 2.0, -1.0];
        let hits = hits(&logits, &labels, 2, Some(2));
        assert_eq!(
            hits,
            Hits {
                correct: 1,
                scored: 1
            }
        );
        let mut c = Confusion::new(2);
        c.add(&logits, &labels, Some(2));
        assert_eq!(c.total(), 1);
        assert_eq!(c.top5, 1);
    }

    #[test]
    fn mean_iou_skips_absent_classes() {
        let mut c = Confusion::new(3);
        // Rows predict 0, 1, 1; labels 0, 1, 0; class 2 never appears.
        c.add(
            &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0],
            &[0.0, 1.0, 0.0],
            None,
        );
        assert_eq!(c.class_iou()[2], None);
        assert_eq!(c.iou()[2], 0.0);
        assert!((c.mean_iou() - 0.5).abs() < 1e-12, "{}", c.mean_iou());
    }
}
