//! Training and evaluation batches of image files, decoded by a prefetcher,
//! with undecodable images left out and counted.

use std::path::PathBuf;
use std::sync::Arc;

use crate::data::{
    augment_image, decode_image_file, epoch_order, sample_rng, Batch, BatchConfig, DataError,
    Normalization, Prefetcher,
};

use super::data::normalize_into;
use super::TrainError;

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
pub(super) struct FileBatches {
    prefetcher: Prefetcher,
    files: Arc<Vec<(PathBuf, u32)>>,
    /// The dataset indices of each batch, cut as the prefetcher cuts them.
    batches: Vec<Vec<usize>>,
    next: usize,
    norm: Normalization,
    config: BatchConfig,
    epoch: usize,
    /// Images left out so far in this epoch.
    pub(super) skipped: u64,
}

impl FileBatches {
    pub(super) fn new(
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
