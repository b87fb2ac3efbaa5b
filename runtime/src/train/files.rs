//! The files of a run: where the checkpoint, metrics and curves go, and the
//! appending and reading of `metrics.jsonl`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::plot;

use super::report::EpochMetrics;
use super::TrainError;

/// Paths of the files a run writes into its folder.
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn curves(&self) -> PathBuf {
        self.dir.join("curves.png")
    }
}

pub(super) fn append_metrics(path: &Path, row: &EpochMetrics) -> Result<(), TrainError> {
    let output = |source| TrainError::Output {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(output)?;
    let line = serde_json::to_string(row).expect("metrics serialise");
    writeln!(f, "{line}").map_err(output)
}

/// Reads `metrics.jsonl` back.
pub fn read_metrics(path: &Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub(super) fn write_curves(files: &RunFiles) -> Result<(), TrainError> {
    let rows: Vec<plot::CurvePoint> = read_metrics(&files.metrics())
        .iter()
        .map(|m| plot::CurvePoint {
            epoch: m.epoch as f64,
            train_loss: m.train_loss,
            train_acc: Some(m.train_accuracy),
            test_loss: Some(m.test_loss),
            test_acc: Some(m.test_accuracy),
        })
        .collect();
    plot::training_curves(&rows, &files.curves()).map_err(|e| TrainError::Output {
        path: files.curves(),
        source: std::io::Error::other(e.to_string()),
    })
}
