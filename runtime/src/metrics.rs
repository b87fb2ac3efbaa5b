//! Prediction metrics: top-1 accuracy and the confusion counts behind per-class
//! IoU for segmentation.

/// Number of rows of `logits` (`n x classes`, or one row per pixel) whose argmax
/// equals the label.
pub fn correct(logits: &[f32], labels: &[f32], classes: usize) -> usize {
    logits
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, &label)| argmax(row) == label as usize)
        .count()
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

    /// Adds every row of `logits` whose label is not `ignore`.
    pub fn add(&mut self, logits: &[f32], labels: &[f32], ignore: Option<u32>) {
        for (row, &label) in logits.chunks_exact(self.classes).zip(labels) {
            let label = label as usize;
            if ignore == Some(label as u32) || label >= self.classes {
                continue;
            }
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

    /// Intersection over union of each class: `tp / (tp + fp + fn)`.
    pub fn iou(&self) -> Vec<f64> {
        let k = self.classes;
        (0..k)
            .map(|c| {
                let tp = self.counts[c * k + c] as f64;
                let row: u64 = (0..k).map(|p| self.counts[c * k + p]).sum();
                let col: u64 = (0..k).map(|l| self.counts[l * k + c]).sum();
                let union = row as f64 + col as f64 - tp;
                if union == 0.0 {
                    0.0
                } else {
                    tp / union
                }
            })
            .collect()
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
}
