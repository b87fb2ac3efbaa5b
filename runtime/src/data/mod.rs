//! Datasets: readers for the official files, augmentation and batching.
//!
//! A `--data` value such as `cifar10:/data/cifar` parses into a [`DataSpec`].
//! [`load`] reads a dataset that fits in memory into a [`Dataset`] of `u8`
//! pixels in HWC order; ImageNet does not fit, so [`open`] returns it as a
//! [`FileDataset`] of `(path, label)` lists that a [`Prefetcher`] decodes on
//! demand. Both feed the trainer the same [`Batch`]: normalized `f32` NHWC
//! images and `f32` labels, shuffled and augmented from `(seed, epoch)` alone,
//! so a run is reproducible whatever the thread count.
//!
//! ```no_run
//! use ldnc_runtime::data::{self, Augment, BatchConfig, Batcher, DataSpec};
//!
//! let dataset = data::load(&DataSpec::parse("fashion-mnist")?)?;
//! let config = BatchConfig::train(128, Augment::cifar(2, false), 7);
//! for batch in Batcher::new(&dataset.train, &dataset.normalization(), &config, 0) {
//!     assert_eq!(batch.images.len(), batch.len * 28 * 28);
//! }
//! # Ok::<(), data::DataError>(())
//! ```

mod augment;
mod batch;
mod camvid;
mod cifar;
mod error;
mod idx;
mod imagenet;
pub mod mat;
pub mod pickle;
mod prefetch;
mod sheet;
mod spec;
mod svhn;

use std::path::{Path, PathBuf};

use rayon::prelude::*;

pub use augment::{augment_image, sample_rng, Augment, AugmentedSample};
pub use batch::{epoch_order, Batch, BatchConfig, Batcher, Normalization};
pub use camvid::{load_camvid, median_frequency_weights, CAMVID_CLASSES, CAMVID_VOID};
pub use cifar::{load_cifar10, load_cifar100, CIFAR10_CLASSES};
pub use error::{DataError, Result};
pub use idx::{encode_idx, load_fashion_mnist, read_idx, IdxArray, FASHION_MNIST_CLASSES};
pub use imagenet::{decode_image_file, open_imagenet, IMAGENET_MEAN, IMAGENET_STD};
pub use prefetch::{Prefetcher, SkippedImage};
pub use sheet::{contact_sheet, draw_number, DIGIT_HEIGHT, DIGIT_WIDTH};
pub use spec::{
    bundled_fashion_mnist_candidates, DataSpec, DatasetKind, BUNDLED_FASHION_MNIST,
    DEBIAN_FASHION_MNIST,
};
pub use svhn::load_svhn;
pub use svhn::read_svhn_file;

/// One split of an in-memory dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// `len * height * width * channels` pixels, image after image, each in HWC order.
    pub images: Vec<u8>,
    /// One class per image, or one class per pixel (`len * height * width`) for
    /// segmentation.
    pub labels: Vec<u32>,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub len: usize,
}

impl Split {
    /// Bytes of one image.
    pub fn image_size(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// The pixels of image `index`.
    pub fn image(&self, index: usize) -> &[u8] {
        let size = self.image_size();
        &self.images[index * size..(index + 1) * size]
    }

    /// True when labels are per pixel.
    pub fn is_segmentation(&self) -> bool {
        self.labels.len() != self.len
    }

    /// The label map of image `index` (segmentation) or its one class.
    pub fn label(&self, index: usize) -> &[u32] {
        let size = self.labels.len() / self.len.max(1);
        &self.labels[index * size..(index + 1) * size]
    }

    /// Counts the labels of each class, skipping `ignore` and labels `>= classes`.
    pub fn class_counts(&self, classes: usize, ignore: Option<u32>) -> Vec<u64> {
        let mut counts = vec![0u64; classes];
        for &label in &self.labels {
            if Some(label) != ignore && (label as usize) < classes {
                counts[label as usize] += 1;
            }
        }
        counts
    }

    /// Appends `other`, which must have the same image shape.
    pub fn extend(&mut self, other: Split) {
        assert_eq!(
            (self.height, self.width, self.channels),
            (other.height, other.width, other.channels),
            "splits with different image shapes cannot be joined"
        );
        self.images.extend_from_slice(&other.images);
        self.labels.extend_from_slice(&other.labels);
        self.len += other.len;
    }
}

/// A dataset held in memory, with the statistics the trainer normalizes by.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub train: Split,
    /// A validation split where the official release has one (CamVid).
    pub val: Option<Split>,
    pub test: Split,
    pub classes: usize,
    pub class_names: Vec<String>,
    /// Per-channel mean of the train split, in `[0, 1]` pixel units.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of the train split, in `[0, 1]` pixel units.
    pub std: Vec<f32>,
    /// A label that the loss and metrics skip (CamVid's void class).
    pub ignore_label: Option<u32>,
    /// Per-class loss weights (median-frequency balancing for CamVid).
    pub class_weights: Option<Vec<f32>>,
}

impl Dataset {
    /// Builds a dataset and computes its train-split statistics.
    pub fn new(name: &str, train: Split, test: Split, class_names: Vec<String>) -> Self {
        let (mean, std) = channel_stats(&train);
        Dataset {
            name: name.to_string(),
            classes: class_names.len(),
            train,
            val: None,
            test,
            class_names,
            mean,
            std,
            ignore_label: None,
            class_weights: None,
        }
    }

    /// The normalization that the batchers apply: `(x / 255 - mean) / std`.
    pub fn normalization(&self) -> Normalization {
        Normalization {
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }
}

/// A dataset kept on disk as `(path, label)` lists and decoded on demand.
#[derive(Debug, Clone, PartialEq)]
pub struct FileDataset {
    pub name: String,
    pub train: Vec<(PathBuf, u32)>,
    pub test: Vec<(PathBuf, u32)>,
    pub classes: usize,
    /// Class names, here the WordNet ids in sorted order.
    pub class_names: Vec<String>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl FileDataset {
    /// The normalization that the prefetcher applies.
    pub fn normalization(&self) -> Normalization {
        Normalization {
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }
}

/// A dataset opened by [`open`]: in memory or streamed from files.
// One value exists per run, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Memory(Dataset),
    Files(FileDataset),
}

/// Reads a dataset that fits in memory. ImageNet returns
/// [`DataError::StreamingOnly`]; open it with [`open`].
pub fn load(spec: &DataSpec) -> Result<Dataset> {
    let dir = spec.resolve_dir()?;
    match spec.kind {
        DatasetKind::FashionMnist => load_fashion_mnist(&dir),
        DatasetKind::Cifar10 => load_cifar10(&dir),
        DatasetKind::Cifar100 => load_cifar100(&dir, false),
        DatasetKind::Cifar100Coarse => load_cifar100(&dir, true),
        DatasetKind::Svhn => load_svhn(&dir, false),
        DatasetKind::SvhnExtra => load_svhn(&dir, true),
        DatasetKind::CamVid => load_camvid(&dir),
        DatasetKind::ImageNet => Err(DataError::StreamingOnly {
            dataset: spec.to_string(),
        }),
    }
}

/// Opens any dataset: ImageNet as a file list, everything else in memory.
pub fn open(spec: &DataSpec) -> Result<Source> {
    match spec.kind {
        DatasetKind::ImageNet => Ok(Source::Files(open_imagenet(&spec.resolve_dir()?)?)),
        _ => Ok(Source::Memory(load(spec)?)),
    }
}

/// Computes the per-channel mean and standard deviation of a split in `[0, 1]` units.
pub fn channel_stats(split: &Split) -> (Vec<f32>, Vec<f32>) {
    let channels = split.channels.max(1);

    // Integer sums are exact: 255^2 times the 1.6e9 bytes of SVHN extra still fits in u64.
    let (sums, squares) = split
        .images
        .par_chunks(channels * 4096)
        .map(|chunk| {
            let mut sums = vec![0u64; channels];
            let mut squares = vec![0u64; channels];
            for pixel in chunk.chunks_exact(channels) {
                for (c, &value) in pixel.iter().enumerate() {
                    sums[c] += value as u64;
                    squares[c] += (value as u64) * (value as u64);
                }
            }
            (sums, squares)
        })
        .reduce(
            || (vec![0u64; channels], vec![0u64; channels]),
            |(mut sa, mut qa), (sb, qb)| {
                for c in 0..channels {
                    sa[c] += sb[c];
                    qa[c] += qb[c];
                }
                (sa, qa)
            },
        );

    let count = (split.images.len() / channels).max(1) as f64;
    let mean: Vec<f64> = sums.iter().map(|&s| s as f64 / count / 255.0).collect();
    let std = squares
        .iter()
        .zip(&mean)
        .map(|(&q, &m)| ((q as f64 / count / (255.0 * 255.0) - m * m).max(0.0)).sqrt() as f32)
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), std)
}

/// Checks that `dir` contains every file in `expected`, listing what it has otherwise.
pub(crate) fn require_files(dataset: &str, dir: &Path, expected: &[&str]) -> Result<()> {
    if expected.iter().all(|name| dir.join(name).exists()) {
        return Ok(());
    }
    Err(DataError::MissingFiles {
        dataset: dataset.to_string(),
        dir: dir.to_path_buf(),
        expected: expected.iter().map(|name| name.to_string()).collect(),
        found: list_dir(dir),
    })
}

/// Lists the names in `dir`, sorted, or nothing when it cannot be read.
pub(crate) fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Reads a whole file, naming it on failure.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| DataError::io(path, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_stats_of_two_pixels() {
        let split = Split {
            images: vec![0, 255, 255, 255],
            labels: vec![0, 1],
            height: 1,
            width: 1,
            channels: 2,
            len: 2,
        };
        let (mean, std) = channel_stats(&split);
        assert_eq!(mean, vec![0.5, 1.0]);
        assert!((std[0] - 0.5).abs() < 1e-6, "{std:?}");
        assert!(std[1].abs() < 1e-6, "{std:?}");
    }

    #[test]
    fn missing_files_lists_both_sides() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("other.bin"), b"x").expect("write");
        let error =
            require_files("cifar10", dir.path(), &["data_batch_1.bin"]).expect_err("missing");
        let message = error.to_string();
        assert!(message.contains("data_batch_1.bin"), "{message}");
        assert!(message.contains("other.bin"), "{message}");
    }
}
