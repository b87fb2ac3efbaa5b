//! The training loop: SGD or RMSprop over shuffled, augmented batches,
//! evaluation after every epoch, metrics as JSON lines, checkpoints, and exact
//! resumption.
//!
//! Batches come from an in-memory [`Dataset`](crate::data::Dataset) through a
//! [`Batcher`](crate::data::Batcher), or from image files (ImageNet) through a
//! [`Prefetcher`](crate::data::Prefetcher) that decodes on worker
//! threads. A [`Pipeline`] picks the augmentation from the dataset kind and
//! the network's input size: pad-crop for CIFAR-style data, random-resized
//! crops for ImageNet, random crops for CamVid. A fixed-size program cannot
//! take a whole CamVid frame, so segmentation is evaluated on tiles of the
//! input size that cover each test image, with each pixel scored once.
//!
//! Everything random is a function of the run seed: initial weights, the order
//! and augmentation of each epoch's batches (seed and epoch), and dropout masks
//! (seed and step). A checkpoint is written at the end of every epoch, so
//! resuming from it replays exactly the steps an uninterrupted run would take.

mod data;
mod file_batches;
mod files;
mod pipeline;
mod report;
mod run;
mod schedule;
mod session;
mod tiles;

use std::path::PathBuf;

use ldnc_ir::spec::LrSchedule;
use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointError;
use crate::cuda_exec::CudaExecError;
use crate::data::DataError;
use crate::exec::ExecError;

pub use data::Data;
pub use file_batches::{loader_threads, FileBatches};
pub use files::{read_metrics, RunFiles};
pub use pipeline::{describe_augment, EvalView, Pipeline};
pub use report::EpochMetrics;
pub use run::{train, train_with, Position};
pub use schedule::learning_rate;
pub use session::{check_data, evaluate, ignore_label, Evaluation, Session};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Cuda(#[from] CudaExecError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(
        "the loss became {value} at step {step} (epoch {epoch}); training stopped. The last \
         good checkpoint is {checkpoint}. Lower the learning rate (--set train.lr=...) or check \
         the data"
    )]
    NonFinite {
        value: f32,
        step: u64,
        epoch: usize,
        checkpoint: String,
    },
    #[error(
        "the training configuration has batch size {batch} and {epochs} epochs; both must be \
         at least 1 (set --batch and --epochs, or train.batch and train.epochs)"
    )]
    EmptyConfig { batch: usize, epochs: usize },
    #[error("cannot write {path}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the dataset's images are {got}, but the network expects {expected}; set `input` in \
         the network file to match the data"
    )]
    InputShape { got: String, expected: String },
    #[error("the dataset has {got} classes but the network predicts {expected}; set `classes`")]
    Classes { got: usize, expected: usize },
    #[error(
        "none of the train images of {dataset} decoded in epoch {epoch} ({skipped} failed); \
         check the files with `ldnc data inspect SPEC --verify`"
    )]
    NothingDecoded {
        dataset: String,
        epoch: usize,
        skipped: u64,
    },
    /// The dataset and the network disagree in a way other than image shape
    /// or class count; `reason` states the mismatch and the fix.
    #[error("{dataset} does not fit network `{network}`: {reason}")]
    Incompatible {
        dataset: String,
        network: String,
        reason: String,
    },
}

/// Settings of one training run (the network's `train` section plus flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub schedule: LrSchedule,
    pub seed: u64,
    pub crop_padding: usize,
    pub flip: bool,
    /// Stop after this many optimizer steps in total (for tests that simulate a
    /// crash); `None` trains all epochs.
    pub max_steps: Option<u64>,
    pub show_progress: bool,
}
