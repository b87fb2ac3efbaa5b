//! Training and evaluation batches of image files, decoded by a prefetcher
//! on a given number of threads, with undecodable images left out and
//! counted. `ldnc data bench` times this loader.

use std::path::PathBuf;
use std::sync::Arc;

use crate::data::{Batch, BatchConfig, Normalization, Prefetcher};

use super::TrainError;

/// Decoded batches of up to this many bytes wait in the prefetch queue, so
/// ImageNet batches of 256 224x224 images (154 MB each) queue 6 deep.
const PREFETCH_BYTES: usize = 1 << 30;

/// Returns the number of decoding threads that training and evaluation use:
/// one per available core.
pub fn loader_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// One epoch of image files decoded by a [`Prefetcher`]. The prefetcher
/// leaves out images that fail to decode, and the other images of their
/// batch train as they would have without them.
pub struct FileBatches {
    prefetcher: Prefetcher,
}

impl FileBatches {
    /// Starts decoding epoch `epoch` of `files` on `threads` worker threads.
    pub fn new(
        files: Arc<Vec<(PathBuf, u32)>>,
        norm: &Normalization,
        config: &BatchConfig,
        epoch: usize,
        threads: usize,
    ) -> FileBatches {
        let threads = threads.max(1);
        // Image files are only batched with fixed-size augmentations, whose
        // output size does not depend on the input size given here.
        let (height, width) = config.augment.output_size(224, 224);
        let batch_bytes = config.batch_size * height * width * norm.mean.len() * 4;
        let depth = (PREFETCH_BYTES / batch_bytes.max(1)).clamp(2, threads + 1);
        tracing::debug!(threads, depth, "prefetching image files");

        let prefetcher = Prefetcher::new(files, norm, config, epoch, threads, depth);
        FileBatches { prefetcher }
    }

    /// Returns the number of batches in the epoch, before any is left out
    /// because none of its images decoded.
    pub fn batch_count(&self) -> usize {
        self.prefetcher.batch_count()
    }

    /// Returns the number of images left out so far in this epoch because
    /// they failed to decode.
    pub fn skipped(&self) -> u64 {
        self.prefetcher.skipped().len() as u64
    }
}

impl Iterator for FileBatches {
    type Item = Result<Batch, TrainError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.prefetcher
            .next()
            .map(|result| result.map_err(TrainError::from))
    }
}
