//! The training loop: SGD over shuffled, augmented batches, evaluation after
//! every epoch, metrics as JSON lines, checkpoints, and exact resumption.
//!
//! Batches come from an in-memory [`Dataset`] through a [`Batcher`], or from
//! image files (ImageNet) through a [`Prefetcher`] that decodes on worker
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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ldnc_ir::program::CompiledNet;
use ldnc_ir::spec::{InputSpec, LrSchedule, Task};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointError, Meta};
use crate::cuda_exec::{CudaExecError, CudaExecutor};
use crate::data::{
    augment_image, decode_image_file, epoch_order, sample_rng, Augment, Batch, BatchConfig,
    Batcher, DataError, Dataset, DatasetKind, FileDataset, Normalization, Prefetcher, Source,
    Split,
};
use crate::exec::{ExecError, Executor, StepParams};
use crate::kernels::KernelSet;
use crate::metrics::{self, Confusion, Hits};
use crate::plot;
use crate::store::Store;

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
    #[error("cannot write {path}: {source}")]
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

/// A dataset to train or evaluate on: in memory, or image files decoded on demand.
#[derive(Debug, Clone, Copy)]
pub enum Data<'a> {
    Memory(&'a Dataset),
    Files(&'a FileDataset),
}

impl<'a> From<&'a Source> for Data<'a> {
    fn from(source: &'a Source) -> Data<'a> {
        match source {
            Source::Memory(dataset) => Data::Memory(dataset),
            Source::Files(files) => Data::Files(files),
        }
    }
}

impl Data<'_> {
    pub fn name(&self) -> &str {
        match self {
            Data::Memory(d) => &d.name,
            Data::Files(f) => &f.name,
        }
    }

    pub fn classes(&self) -> usize {
        match self {
            Data::Memory(d) => d.classes,
            Data::Files(f) => f.classes,
        }
    }

    pub fn class_names(&self) -> &[String] {
        match self {
            Data::Memory(d) => &d.class_names,
            Data::Files(f) => &f.class_names,
        }
    }

    /// Images in the train split.
    pub fn train_len(&self) -> usize {
        match self {
            Data::Memory(d) => d.train.len,
            Data::Files(f) => f.train.len(),
        }
    }

    /// Images in the test split.
    pub fn test_len(&self) -> usize {
        match self {
            Data::Memory(d) => d.test.len,
            Data::Files(f) => f.test.len(),
        }
    }

    /// True when labels are per pixel.
    pub fn is_segmentation(&self) -> bool {
        matches!(self, Data::Memory(d) if d.train.is_segmentation())
    }

    /// Returns the label that the loss and metrics skip (CamVid's void class).
    pub fn ignore_label(&self) -> Option<u32> {
        match self {
            Data::Memory(d) => d.ignore_label,
            Data::Files(_) => None,
        }
    }

    fn normalization(&self) -> Normalization {
        match self {
            Data::Memory(d) => d.normalization(),
            Data::Files(f) => f.normalization(),
        }
    }
}

/// The augmentation of training batches and the view of each test image
/// that evaluation scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub train: Augment,
    pub eval: EvalView,
}

/// The input that evaluation feeds the network for each test image.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalView {
    /// The image through one fixed transform: [`Augment::None`] for data
    /// stored at the network's size, a resize and centre crop for ImageNet.
    Whole(Augment),
    /// Square `size` x `size` tiles that together cover the image: tile
    /// corners step by `size`, and the last row and column of tiles sit flush
    /// with the bottom and right edges. Where tiles overlap, a pixel is scored
    /// only in the first tile, in row-major order, that contains it.
    Tiles { size: usize },
}

/// ImageNet evaluation resizes the shorter side to this many pixels per 224
/// of the crop, so a 224 crop keeps the usual resize-256, crop-224 evaluation.
const RESIZE_PER_224: usize = 256;

impl Pipeline {
    /// CIFAR-style pad-and-crop with optional mirroring; test images are
    /// scored as stored.
    pub fn cifar(pad: usize, flip: bool) -> Pipeline {
        Pipeline {
            train: Augment::cifar(pad, flip),
            eval: EvalView::Whole(Augment::None),
        }
    }

    /// Picks the pipeline for a dataset of `kind` and a network whose input
    /// is `input`. `crop_padding` and `flip` come from the network's `train`
    /// section and apply to the datasets stored at the network's size.
    ///
    /// - CIFAR and Fashion-MNIST: pad-crop and flip.
    /// - SVHN: pad-crop without flip (digits are not mirror-symmetric) and
    ///   without blur. A `crop_padding` of 0 trains on the images as they are.
    /// - ImageNet: random-resized crops of the input side with a mirror for
    ///   training. Evaluation resizes the shorter side to 256/224 of the input
    ///   side and takes a centre crop.
    /// - CamVid: random crops of the input side with a mirror for training,
    ///   and [`EvalView::Tiles`] for evaluation.
    pub fn for_dataset(
        kind: DatasetKind,
        input: InputSpec,
        crop_padding: usize,
        flip: bool,
    ) -> Result<Pipeline, TrainError> {
        let pipeline = match kind {
            DatasetKind::FashionMnist
            | DatasetKind::Cifar10
            | DatasetKind::Cifar100
            | DatasetKind::Cifar100Coarse => Pipeline::cifar(crop_padding, flip),
            DatasetKind::Svhn | DatasetKind::SvhnExtra => Pipeline {
                train: Augment::svhn(crop_padding, None),
                eval: EvalView::Whole(Augment::None),
            },
            DatasetKind::ImageNet => {
                let side = square_side(kind, input)?;
                Pipeline {
                    train: Augment::RandomResizedCrop { size: side },
                    eval: EvalView::Whole(Augment::ResizeCenterCrop {
                        resize: (side * RESIZE_PER_224).div_ceil(224),
                        crop: side,
                    }),
                }
            }
            DatasetKind::CamVid => {
                let size = square_side(kind, input)?;
                Pipeline {
                    train: Augment::RandomCrop { size },
                    eval: EvalView::Tiles { size },
                }
            }
        };
        Ok(pipeline)
    }

    /// Describes the pipeline in one line for the user, such as `training: random 224x224 crops with
    /// flips; evaluation: tiled 224x224 crops ...`.
    pub fn describe(&self) -> String {
        format!(
            "training: {}; evaluation: {}",
            describe_augment(&self.train),
            self.eval.describe()
        )
    }
}

impl EvalView {
    /// Describes what evaluation scores, in words.
    pub fn describe(&self) -> String {
        match self {
            EvalView::Whole(Augment::None) => "whole test images".into(),
            EvalView::Whole(augment) => describe_augment(augment),
            EvalView::Tiles { size } => format!(
                "tiled {size}x{size} crops covering each test image, each pixel scored once"
            ),
        }
    }
}

fn describe_augment(augment: &Augment) -> String {
    match *augment {
        Augment::None
        | Augment::PadCrop {
            pad: 0,
            flip: false,
            blur_sigma: None,
        } => "no augmentation".into(),
        Augment::PadCrop {
            pad,
            flip,
            blur_sigma,
        } => {
            let mut text = format!("{pad}-pixel pad and random crop");
            if flip {
                text.push_str(", flips");
            }
            if let Some(sigma) = blur_sigma {
                text.push_str(&format!(", Gaussian blur up to sigma {sigma}"));
            }
            text
        }
        Augment::RandomResizedCrop { size } => {
            format!("random-resized {size}x{size} crops with flips")
        }
        Augment::ResizeCenterCrop { resize, crop } => {
            format!("shorter side resized to {resize}, centre {crop}x{crop} crop")
        }
        Augment::RandomCrop { size } => format!("random {size}x{size} crops with flips"),
    }
}

/// Returns the side of a square network input, which the crop augmentations
/// need, and rejects a non-square one.
fn square_side(kind: DatasetKind, input: InputSpec) -> Result<usize, TrainError> {
    if input.height == input.width {
        return Ok(input.height);
    }
    Err(TrainError::Incompatible {
        dataset: kind.name().into(),
        network: "this network".into(),
        reason: format!(
            "its input is {}x{}, but {} crops are square; set `input` to a square size",
            input.height,
            input.width,
            kind.name()
        ),
    })
}

/// The result of evaluating a network on a test split.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Mean loss per batch row: per image, or per tile for [`EvalView::Tiles`].
    pub loss: f64,
    /// Counts of the final head over images, or over scored pixels for segmentation.
    pub confusion: Confusion,
    /// Test images left out because they could not be decoded.
    pub skipped: u64,
}

/// A network with its parameters and executors.
pub struct Session {
    pub net: CompiledNet,
    pub store: Store,
    train: Executor,
    eval: Executor,
    /// The training program on the GPU, when training runs there; the store is
    /// then brought up to date by `sync` before evaluation and checkpoints.
    cuda: Option<Box<CudaExecutor>>,
}

impl Session {
    /// Builds executors for batches up to `batch` and initialises the parameters
    /// from `seed`.
    pub fn new(
        net: CompiledNet,
        batch: usize,
        kernels: KernelSet,
        seed: u64,
    ) -> Result<Session, TrainError> {
        let store = Store::init(&[&net.train, &net.eval], seed);
        let train = Executor::new(net.train.clone(), batch, kernels)?;
        let eval = Executor::new(net.eval.clone(), batch, kernels)?;
        Ok(Session {
            net,
            store,
            train,
            eval,
            cuda: None,
        })
    }

    /// Moves training steps to CUDA device 0 with the store's current tensors;
    /// evaluation stays on the CPU.
    pub fn use_cuda(&mut self, batch: usize) -> Result<(), TrainError> {
        let mut cuda = CudaExecutor::new(self.net.train.clone(), batch)?;
        cuda.upload(&self.store)?;
        self.cuda = Some(Box::new(cuda));
        Ok(())
    }

    /// Copies the tensors trained on the GPU back into the store.
    pub fn sync(&mut self) -> Result<(), TrainError> {
        if let Some(cuda) = &self.cuda {
            cuda.download(&mut self.store)?;
        }
        Ok(())
    }

    /// Records time per op in the training executor.
    pub fn enable_profile(&mut self) {
        self.train.enable_profile();
    }

    /// Calls and seconds per op name of the training executor, slowest first.
    pub fn profile(&self) -> Vec<(&'static str, usize, f64)> {
        self.train.profile()
    }

    /// Bytes of the training program's temporary buffers at its maximum batch.
    pub fn train_buffer_bytes(&self) -> u64 {
        self.train.buffer_bytes()
    }

    /// Returns the label that the network's loss skips (segmentation only).
    pub fn ignore_label(&self) -> Option<u32> {
        match self.net.spec.task {
            Task::Segmentation { ignore_label, .. } => ignore_label,
            Task::Classification => None,
        }
    }

    /// Checks that `data` seen through `pipeline` produces the batches the
    /// network takes: image size and channels, classes, task and ignore label.
    pub fn check_data(&self, data: Data, pipeline: &Pipeline) -> Result<(), TrainError> {
        let spec = &self.net.spec;
        let input = spec.input;
        let incompatible = |reason: String| TrainError::Incompatible {
            dataset: data.name().to_string(),
            network: spec.name.clone(),
            reason,
        };
        if data.classes() != spec.classes {
            return Err(TrainError::Classes {
                got: data.classes(),
                expected: spec.classes,
            });
        }

        let segmentation = matches!(spec.task, Task::Segmentation { .. });
        if segmentation != data.is_segmentation() {
            let (network, dataset) = if segmentation {
                ("segmentation (one label per pixel)", "one label per image")
            } else {
                (
                    "classification (one label per image)",
                    "one label per pixel",
                )
            };
            return Err(incompatible(format!(
                "the network's task is {network}, but the dataset has {dataset}; use a network \
                 with the matching `task`"
            )));
        }
        if segmentation && data.ignore_label() != self.ignore_label() {
            return Err(incompatible(format!(
                "the dataset's ignore label is {:?} but the network's `task` has ignore_label: \
                 {:?}; set ignore_label: {:?} in the network file's `task`",
                data.ignore_label(),
                self.ignore_label(),
                data.ignore_label()
            )));
        }

        let shape =
            |height: usize, width: usize, channels: usize| format!("{height}x{width}x{channels}");
        let expected = shape(input.height, input.width, input.channels);
        match data {
            Data::Memory(dataset) => {
                for split in [&dataset.train, &dataset.test] {
                    let got = shape(split.height, split.width, split.channels);
                    let fits = match (&pipeline.train, &pipeline.eval) {
                        (Augment::RandomCrop { size }, _) | (_, EvalView::Tiles { size }) => {
                            split.height >= *size && split.width >= *size
                        }
                        (Augment::RandomResizedCrop { .. }, _) => true,
                        _ => split.height == input.height && split.width == input.width,
                    };
                    if !fits || split.channels != input.channels {
                        return Err(TrainError::InputShape { got, expected });
                    }
                }
            }
            // The prefetcher decodes every image to RGB.
            Data::Files(_) if input.channels != 3 => {
                return Err(TrainError::InputShape {
                    got: "RGB images (3 channels)".into(),
                    expected,
                });
            }
            Data::Files(_) => {}
        }
        Ok(())
    }

    /// Runs one training step and returns the loss and the final head's
    /// correct and scored rows (images, or non-ignored pixels).
    pub fn train_step(
        &mut self,
        images: &[f32],
        labels: &[f32],
        n: usize,
        params: StepParams,
    ) -> Result<(f32, Hits), TrainError> {
        let classes = self.net.spec.classes;
        let ignore = self.ignore_label();
        if let Some(cuda) = self.cuda.as_mut() {
            cuda.run(images, labels, n, params)?;
            let logits = cuda.final_logits()?;
            let hits = metrics::hits(&logits, labels, classes, ignore);
            return Ok((cuda.loss()?, hits));
        }
        self.train.run(&mut self.store, images, labels, n, params)?;
        let loss = self.train.loss(&self.store)?;
        let logits = self.train.final_logits(&self.store)?;
        Ok((loss, metrics::hits(logits, labels, classes, ignore)))
    }

    /// Evaluates the test split of `data` as `view` defines, with the running
    /// batch-norm statistics, in batches of up to `batch`.
    pub fn evaluate(
        &mut self,
        data: Data,
        view: &EvalView,
        batch: usize,
    ) -> Result<Evaluation, TrainError> {
        let mut config = BatchConfig::eval(batch);
        config.ignore_label = data.ignore_label();
        let norm = data.normalization();
        let mut tally = EvalTally::new(self.net.spec.classes);
        let mut skipped = 0;
        match (data, view) {
            (Data::Memory(dataset), EvalView::Whole(augment)) => {
                config.augment = augment.clone();
                for b in Batcher::new(&dataset.test, &norm, &config, 0) {
                    self.score(&b, &mut tally)?;
                }
            }
            (Data::Memory(dataset), EvalView::Tiles { size }) => {
                let tiles = TileGrid::new(&dataset.test, *size);
                for chunk in tiles.tiles.chunks(batch.max(1)) {
                    let b = tiles.batch(&dataset.test, &norm, self.ignore_label(), chunk);
                    self.score(&b, &mut tally)?;
                }
            }
            (Data::Files(files), EvalView::Whole(augment)) => {
                config.augment = augment.clone();
                let list = Arc::new(files.test.clone());
                let mut batches = FileBatches::new(list, &norm, &config, 0);
                for b in batches.by_ref() {
                    self.score(&b?, &mut tally)?;
                }
                skipped = batches.skipped;
                if skipped > 0 {
                    tracing::warn!(
                        skipped,
                        "undecodable test images left out of the evaluation"
                    );
                }
            }
            (Data::Files(files), EvalView::Tiles { .. }) => {
                return Err(TrainError::Incompatible {
                    dataset: files.name.clone(),
                    network: self.net.spec.name.clone(),
                    reason: "tiled evaluation needs label maps, and image-file datasets have one \
                             label per image; evaluate with a centre crop"
                        .into(),
                });
            }
        }
        Ok(Evaluation {
            loss: tally.loss_sum / tally.rows.max(1) as f64,
            confusion: tally.confusion,
            skipped,
        })
    }

    /// Runs the evaluation program on one batch and adds its figures to `tally`.
    fn score(&mut self, batch: &Batch, tally: &mut EvalTally) -> Result<(), TrainError> {
        let params = StepParams { lr: 0.0, seed: 0 };
        self.eval.run(
            &mut self.store,
            &batch.images,
            &batch.labels,
            batch.len,
            params,
        )?;
        tally.loss_sum += self.eval.loss(&self.store)? as f64 * batch.len as f64;
        tally.rows += batch.len;
        let ignore = self.ignore_label();
        tally
            .confusion
            .add(self.eval.final_logits(&self.store)?, &batch.labels, ignore);
        Ok(())
    }
}

/// Running sums of an evaluation.
struct EvalTally {
    loss_sum: f64,
    rows: usize,
    confusion: Confusion,
}

impl EvalTally {
    fn new(classes: usize) -> EvalTally {
        EvalTally {
            loss_sum: 0.0,
            rows: 0,
            confusion: Confusion::new(classes),
        }
    }
}

/// The tiles of [`EvalView::Tiles`] over a split whose images share one size.
struct TileGrid {
    size: usize,
    /// `(image, top, left)` of every tile, image by image, rows of tiles in order.
    tiles: Vec<(usize, usize, usize)>,
    /// For each image row, the top of the first tile that contains it.
    row_owner: Vec<usize>,
    /// For each image column, the left edge of the first tile that contains it.
    column_owner: Vec<usize>,
}

impl TileGrid {
    fn new(split: &Split, size: usize) -> TileGrid {
        let tops = tile_starts(split.height, size);
        let lefts = tile_starts(split.width, size);
        let tiles = (0..split.len)
            .flat_map(|image| {
                let lefts = &lefts;
                tops.iter()
                    .flat_map(move |&top| lefts.iter().map(move |&left| (image, top, left)))
            })
            .collect();
        TileGrid {
            size,
            tiles,
            row_owner: first_owner(&tops, split.height, size),
            column_owner: first_owner(&lefts, split.width, size),
        }
    }

    /// Cuts `tiles` out of `split` into one batch. A pixel that an earlier
    /// tile already covers gets label `ignore`, so it is scored once. With no
    /// ignore label, it is scored in every tile that contains it.
    fn batch(
        &self,
        split: &Split,
        norm: &Normalization,
        ignore: Option<u32>,
        tiles: &[(usize, usize, usize)],
    ) -> Batch {
        let size = self.size;
        let channels = split.channels;
        let mut images = Vec::with_capacity(tiles.len() * size * size * channels);
        let mut labels = Vec::with_capacity(tiles.len() * size * size);
        for &(image, top, left) in tiles {
            let pixels = split.image(image);
            let label_map = split.label(image);
            for y in top..top + size {
                let row = y * split.width;
                let start = (row + left) * channels;
                normalize_into(&pixels[start..start + size * channels], norm, &mut images);
                for x in left..left + size {
                    let owned = self.row_owner[y] == top && self.column_owner[x] == left;
                    let label = match ignore {
                        Some(ignore) if !owned => ignore,
                        _ => label_map[row + x],
                    };
                    labels.push(label as f32);
                }
            }
        }
        Batch {
            images,
            labels,
            len: tiles.len(),
            height: size,
            width: size,
            channels,
            indices: tiles.iter().map(|&(image, _, _)| image).collect(),
        }
    }
}

/// Starts of `size`-long windows that cover `0..length`: every `size`
/// pixels, and the last flush with the end. `length` must be at least `size`.
fn tile_starts(length: usize, size: usize) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut start = 0;
    while start + size < length {
        starts.push(start);
        start += size;
    }
    starts.push(length - size);
    starts
}

/// For each coordinate in `0..length`, the first of `starts` whose window contains it.
fn first_owner(starts: &[usize], length: usize, size: usize) -> Vec<usize> {
    (0..length)
        .map(|position| {
            *starts
                .iter()
                .find(|&&start| position >= start && position < start + size)
                .expect("the windows cover every position")
        })
        .collect()
}

/// Appends `pixels` normalized as the batchers do: `(x / 255 - mean) / std`.
fn normalize_into(pixels: &[u8], norm: &Normalization, out: &mut Vec<f32>) {
    let channels = norm.mean.len();
    for pixel in pixels.chunks_exact(channels) {
        for (c, &value) in pixel.iter().enumerate() {
            let scale = 1.0 / norm.std[c].max(1e-6);
            out.push((value as f32 / 255.0 - norm.mean[c]) * scale);
        }
    }
}

/// Decoded batches of up to this many bytes wait in the prefetch queue, so
/// ImageNet batches of 256 224x224 images (154 MB each) queue 6 deep.
const PREFETCH_BYTES: usize = 1 << 30;

/// At most this many undecodable files are named in the log per epoch and
/// split; the rest are only counted.
const NAMED_SKIPS: u64 = 10;

/// One epoch of image files decoded by a [`Prefetcher`], with undecodable
/// images left out.
///
/// The prefetcher fails a whole batch when one of its images does not decode.
/// Such a batch is rebuilt here on the calling thread from the same indices
/// and per-sample RNGs, without the images that fail, so the other images of
/// the batch still train exactly as they would have.
struct FileBatches {
    prefetcher: Prefetcher,
    files: Arc<Vec<(PathBuf, u32)>>,
    /// The dataset indices of each batch, cut as the prefetcher cuts them.
    batches: Vec<Vec<usize>>,
    next: usize,
    norm: Normalization,
    config: BatchConfig,
    epoch: usize,
    /// Images left out so far in this epoch.
    skipped: u64,
}

impl FileBatches {
    fn new(
        files: Arc<Vec<(PathBuf, u32)>>,
        norm: &Normalization,
        config: &BatchConfig,
        epoch: usize,
    ) -> FileBatches {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        // Image files are only batched with fixed-size augmentations, whose
        // output size does not depend on the input size given here.
        let (height, width) = config.augment.output_size(224, 224);
        let batch_bytes = config.batch_size * height * width * norm.mean.len() * 4;
        let depth = (PREFETCH_BYTES / batch_bytes.max(1)).clamp(2, threads + 1);
        tracing::debug!(threads, depth, "prefetching image files");

        let order = epoch_order(files.len(), config.seed, epoch, config.shuffle);
        let size = config.batch_size.max(1);
        let batches = order
            .chunks(size)
            .filter(|chunk| !config.drop_last || chunk.len() == size)
            .map(<[usize]>::to_vec)
            .collect();
        let prefetcher = Prefetcher::new(Arc::clone(&files), norm, config, epoch, threads, depth);
        FileBatches {
            prefetcher,
            files,
            batches,
            next: 0,
            norm: norm.clone(),
            config: config.clone(),
            epoch,
            skipped: 0,
        }
    }

    /// Builds batch `number` from the images that decode; `None` when none does.
    fn rebuild(&mut self, number: usize) -> Result<Option<Batch>, TrainError> {
        let channels = self.norm.mean.len();
        let mut images = Vec::new();
        let mut labels = Vec::new();
        let mut indices = Vec::new();
        let mut size = None;
        for &index in &self.batches[number] {
            let (path, label) = &self.files[index];
            let image = match decode_image_file(path) {
                Ok(image) => image.to_rgb8(),
                Err(DataError::Decode { path, reason }) => {
                    self.skipped += 1;
                    if self.skipped <= NAMED_SKIPS {
                        tracing::warn!(path = %path.display(), %reason, "skipping an undecodable image");
                    }
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let (height, width) = (image.height() as usize, image.width() as usize);
            let mut rng = sample_rng(self.config.seed, self.epoch as u64, index as u64);
            let sample = augment_image(
                &self.config.augment,
                image.as_raw(),
                height,
                width,
                channels,
                &mut rng,
            );
            if *size.get_or_insert((sample.height, sample.width)) != (sample.height, sample.width) {
                return Err(DataError::Mismatch {
                    path: path.clone(),
                    reason: "augmented to a different size than the rest of its batch; use a \
                             fixed-size augmentation"
                        .into(),
                }
                .into());
            }
            normalize_into(&sample.pixels, &self.norm, &mut images);
            labels.push(*label as f32);
            indices.push(index);
        }
        let Some((height, width)) = size else {
            return Ok(None);
        };
        Ok(Some(Batch {
            images,
            labels,
            len: indices.len(),
            height,
            width,
            channels,
            indices,
        }))
    }
}

impl Iterator for FileBatches {
    type Item = Result<Batch, TrainError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let result = self.prefetcher.next()?;
            let number = self.next;
            self.next += 1;
            match result {
                Ok(batch) => return Some(Ok(batch)),
                Err(DataError::Decode { .. }) => match self.rebuild(number) {
                    Ok(Some(batch)) => return Some(Ok(batch)),
                    Ok(None) => continue,
                    Err(error) => return Some(Err(error)),
                },
                Err(error) => return Some(Err(error.into())),
            }
        }
    }
}

/// The source of training batches: a split in memory, or image files listed
/// once per run and shared with the prefetch threads.
enum TrainSource<'a> {
    Memory(&'a Split),
    Files(Arc<Vec<(PathBuf, u32)>>),
}

impl<'a> TrainSource<'a> {
    fn new(data: Data<'a>) -> TrainSource<'a> {
        match data {
            Data::Memory(dataset) => TrainSource::Memory(&dataset.train),
            Data::Files(files) => TrainSource::Files(Arc::new(files.train.clone())),
        }
    }

    fn epoch(&self, norm: &Normalization, config: &BatchConfig, epoch: usize) -> EpochBatches<'a> {
        match self {
            TrainSource::Memory(split) => {
                EpochBatches::Memory(Batcher::new(split, norm, config, epoch))
            }
            TrainSource::Files(list) => {
                EpochBatches::Files(FileBatches::new(Arc::clone(list), norm, config, epoch))
            }
        }
    }
}

/// The training batches of one epoch.
enum EpochBatches<'a> {
    Memory(Batcher<'a>),
    Files(FileBatches),
}

impl EpochBatches<'_> {
    fn skipped(&self) -> u64 {
        match self {
            EpochBatches::Memory(_) => 0,
            EpochBatches::Files(files) => files.skipped,
        }
    }
}

impl Iterator for EpochBatches<'_> {
    type Item = Result<Batch, TrainError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            EpochBatches::Memory(batcher) => batcher.next().map(Ok),
            EpochBatches::Files(files) => files.next(),
        }
    }
}

/// Where a run keeps its files.
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

/// Position to continue from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Position {
    pub epoch: usize,
    pub step: u64,
}

/// Trains `session` on the in-memory `data` with CIFAR-style pad-and-crop
/// (`config.crop_padding`, `config.flip`), from `start` to `config.epochs`,
/// writing into `files`; returns the metrics of every epoch run.
pub fn train(
    session: &mut Session,
    data: &Dataset,
    config: &TrainConfig,
    files: &RunFiles,
    start: Position,
) -> Result<Vec<EpochMetrics>, TrainError> {
    let pipeline = Pipeline::cifar(config.crop_padding, config.flip);
    train_with(session, Data::Memory(data), &pipeline, config, files, start)
}

/// Trains `session` on `data` seen through `pipeline`, from `start` to
/// `config.epochs`, writing into `files`; returns the metrics of every epoch
/// run. Every check of the data against the network runs before the first step.
pub fn train_with(
    session: &mut Session,
    data: Data,
    pipeline: &Pipeline,
    config: &TrainConfig,
    files: &RunFiles,
    start: Position,
) -> Result<Vec<EpochMetrics>, TrainError> {
    session.check_data(data, pipeline)?;
    check_split_sizes(data, &session.net.spec.name, config.batch)?;
    std::fs::create_dir_all(&files.dir).map_err(|source| TrainError::Output {
        path: files.dir.clone(),
        source,
    })?;
    // The last partial batch is dropped, so an epoch has this many whole batches.
    let steps_per_epoch = (data.train_len() / config.batch) as u64;
    let total_steps = steps_per_epoch * config.epochs as u64;
    let normalization = data.normalization();
    let source = TrainSource::new(data);
    let mut step = start.step;
    let mut history = Vec::new();

    for epoch in start.epoch..config.epochs {
        let started = Instant::now();
        let mut batch_config =
            BatchConfig::train(config.batch, pipeline.train.clone(), config.seed);
        batch_config.ignore_label = data.ignore_label();
        let bar = progress_bar(config.show_progress, steps_per_epoch, epoch, config.epochs);
        let (mut loss_sum, mut hits, mut seen) = (0.0f64, Hits::default(), 0usize);
        let mut lr = config.lr;
        let mut batches = source.epoch(&normalization, &batch_config, epoch);
        for batch in batches.by_ref() {
            let batch = batch?;
            if config.max_steps.is_some_and(|max| step >= max) {
                bar.abandon();
                return Ok(history);
            }
            lr = learning_rate(config.lr, config.schedule, step, total_steps);
            let params = StepParams {
                lr: lr as f32,
                seed: config.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step,
            };
            let (loss, batch_hits) =
                session.train_step(&batch.images, &batch.labels, batch.len, params)?;
            step += 1;
            if !loss.is_finite() {
                bar.abandon();
                return Err(TrainError::NonFinite {
                    value: loss,
                    step,
                    epoch: epoch + 1,
                    checkpoint: if epoch > 0 {
                        files.checkpoint().display().to_string()
                    } else {
                        "not written yet (the first epoch did not finish)".into()
                    },
                });
            }
            loss_sum += loss as f64 * batch.len as f64;
            hits.correct += batch_hits.correct;
            hits.scored += batch_hits.scored;
            seen += batch.len;
            let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.4}  acc {:.2}%  {rate:.0} img/s",
                loss_sum / seen as f64,
                100.0 * hits.correct as f64 / hits.scored.max(1) as f64
            ));
            bar.inc(1);
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let train_skipped = batches.skipped();
        drop(batches);
        bar.finish_and_clear();
        if train_skipped > 0 {
            tracing::warn!(
                epoch = epoch + 1,
                skipped = train_skipped,
                "undecodable train images left out of the epoch"
            );
        }
        session.sync()?;

        let evaluation = session.evaluate(data, &pipeline.eval, config.batch)?;
        let row = epoch_metrics(
            EpochFigures {
                epoch: epoch + 1,
                step,
                lr,
                train_loss: loss_sum / seen.max(1) as f64,
                train_hits: hits,
                skipped: train_skipped,
                images: seen,
                train_seconds,
                seconds: started.elapsed().as_secs_f64(),
            },
            &evaluation,
            data.is_segmentation(),
        );
        tracing::info!(
            epoch = row.epoch,
            train_loss = row.train_loss,
            test_accuracy = row.test_accuracy,
            images_per_second = row.images_per_second,
            "epoch finished"
        );
        if config.show_progress {
            println!("{}", epoch_line(&row, config.epochs));
        }
        append_metrics(&files.metrics(), &row)?;
        let meta = Meta {
            network: session.net.spec.name.clone(),
            spec_json: serde_json::to_string(&session.net.spec).expect("spec serialises"),
            epoch: epoch + 1,
            step,
            seed: config.seed,
            config_json: serde_json::to_string(config).expect("config serialises"),
        };
        checkpoint::save(&files.checkpoint(), &session.store, &meta)?;
        history.push(row);
        write_curves(files)?;
    }
    Ok(history)
}

/// Rejects a train split with fewer images than one batch (the last partial
/// batch is dropped, so it would never train) and an empty test split.
fn check_split_sizes(data: Data, network: &str, batch: usize) -> Result<(), TrainError> {
    let incompatible = |reason: String| TrainError::Incompatible {
        dataset: data.name().to_string(),
        network: network.to_string(),
        reason,
    };
    if data.train_len() < batch.max(1) {
        return Err(incompatible(format!(
            "the train split has {} images, fewer than one batch of {batch}; lower --batch or \
             check the dataset folder",
            data.train_len()
        )));
    }
    if data.test_len() == 0 {
        return Err(incompatible(
            "the test split has no images; check the dataset folder".into(),
        ));
    }
    Ok(())
}

/// The training side of one epoch, before evaluation.
struct EpochFigures {
    epoch: usize,
    step: u64,
    lr: f64,
    train_loss: f64,
    train_hits: Hits,
    skipped: u64,
    images: usize,
    train_seconds: f64,
    seconds: f64,
}

fn epoch_metrics(train: EpochFigures, test: &Evaluation, segmentation: bool) -> EpochMetrics {
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
fn epoch_line(row: &EpochMetrics, epochs: usize) -> String {
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

fn progress_bar(show: bool, steps: u64, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
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

fn append_metrics(path: &Path, row: &EpochMetrics) -> Result<(), TrainError> {
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

fn write_curves(files: &RunFiles) -> Result<(), TrainError> {
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
