//! The datasets a run reads, and the training batches of each epoch: a split
//! in memory cut by a [`Batcher`], or image files decoded by a prefetcher.

use std::path::PathBuf;
use std::sync::Arc;

use crate::data::{
    Batch, BatchConfig, Batcher, Dataset, FileDataset, Normalization, Source, Split,
};

use super::file_batches::{loader_threads, FileBatches};
use super::TrainError;

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

    /// Returns the per-class loss weights of the train split, if the dataset
    /// has them (median-frequency balancing for CamVid).
    pub fn class_weights(&self) -> Option<&[f32]> {
        match self {
            Data::Memory(d) => d.class_weights.as_deref(),
            Data::Files(_) => None,
        }
    }

    pub(super) fn normalization(&self) -> Normalization {
        match self {
            Data::Memory(d) => d.normalization(),
            Data::Files(f) => f.normalization(),
        }
    }
}

/// The source of training batches: a split in memory, or image files listed
/// once per run and shared with the prefetch threads.
pub(super) enum TrainSource<'a> {
    Memory(&'a Split),
    Files(Arc<Vec<(PathBuf, u32)>>),
}

impl<'a> TrainSource<'a> {
    pub(super) fn new(data: Data<'a>) -> TrainSource<'a> {
        match data {
            Data::Memory(dataset) => TrainSource::Memory(&dataset.train),
            Data::Files(files) => TrainSource::Files(Arc::new(files.train.clone())),
        }
    }

    pub(super) fn epoch(
        &self,
        norm: &Normalization,
        config: &BatchConfig,
        epoch: usize,
    ) -> EpochBatches<'a> {
        match self {
            TrainSource::Memory(split) => {
                EpochBatches::Memory(Batcher::new(split, norm, config, epoch))
            }
            TrainSource::Files(list) => EpochBatches::Files(FileBatches::new(
                Arc::clone(list),
                norm,
                config,
                epoch,
                loader_threads(),
            )),
        }
    }
}

/// The training batches of one epoch.
pub(super) enum EpochBatches<'a> {
    Memory(Batcher<'a>),
    Files(FileBatches),
}

impl EpochBatches<'_> {
    pub(super) fn skipped(&self) -> u64 {
        match self {
            EpochBatches::Memory(_) => 0,
            EpochBatches::Files(files) => files.skipped(),
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

/// Appends `pixels` normalized as the batchers do: `(x / 255 - mean) / std`.
pub(super) fn normalize_into(pixels: &[u8], norm: &Normalization, out: &mut Vec<f32>) {
    let channels = norm.mean.len();
    for pixel in pixels.chunks_exact(channels) {
        for (c, &value) in pixel.iter().enumerate() {
            let scale = 1.0 / norm.std[c].max(1e-6);
            out.push((value as f32 / 255.0 - norm.mean[c]) * scale);
        }
    }
}
