//! Shuffled, augmented, normalized batches of an in-memory split.
//!
//! The epoch's order is a Fisher-Yates shuffle seeded from `(seed, epoch)`,
//! and each sample is augmented with its own RNG from `(seed, epoch, index)`,
//! so the batches of an epoch are the same for any rayon thread count.

use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::augment::{apply, sample_rng, splitmix, Augment, AugmentedSample, Shape};
use super::Split;

/// Per-channel normalization, `(x / 255 - mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// The identity after scaling to `[0, 1]`.
    pub fn unit(channels: usize) -> Self {
        Normalization {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }
}

/// Settings that cut an epoch into batches.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    pub batch_size: usize,
    pub augment: Augment,
    pub shuffle: bool,
    /// Drop the last batch when it is smaller than `batch_size`.
    pub drop_last: bool,
    pub seed: u64,
    /// The label given to pixels that augmentation moved in from outside the
    /// image (segmentation only); -1 when `None`.
    pub ignore_label: Option<u32>,
}

impl BatchConfig {
    /// Training batches: shuffled, augmented, the last partial batch dropped.
    pub fn train(batch_size: usize, augment: Augment, seed: u64) -> Self {
        BatchConfig {
            batch_size,
            augment,
            shuffle: true,
            drop_last: true,
            seed,
            ignore_label: None,
        }
    }

    /// Evaluation batches: in order, every sample once, not augmented. Set
    /// `augment` for a fixed evaluation transform such as a center crop.
    pub fn eval(batch_size: usize) -> Self {
        BatchConfig {
            batch_size,
            augment: Augment::None,
            shuffle: false,
            drop_last: false,
            seed: 0,
            ignore_label: None,
        }
    }
}

/// A batch ready for the network.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `len * height * width * channels` normalized values, NHWC.
    pub images: Vec<f32>,
    /// One class per image, or `len * height * width` per-pixel classes.
    pub labels: Vec<f32>,
    pub len: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// The dataset index of each image.
    pub indices: Vec<usize>,
}

/// Returns the order in which an epoch visits `len` samples.
pub fn epoch_order(len: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        // A stream distinct from every per-sample RNG, which use the sample index.
        let mut rng = sample_rng(seed, epoch as u64, splitmix(u64::MAX));
        order.shuffle(&mut rng);
    }
    order
}

/// Cuts `order` into the index lists of the epoch's batches.
pub(crate) fn batch_indices(order: &[usize], config: &BatchConfig) -> Vec<Vec<usize>> {
    let size = config.batch_size.max(1);
    order
        .chunks(size)
        .filter(|chunk| !config.drop_last || chunk.len() == size)
        .map(<[usize]>::to_vec)
        .collect()
}

/// Writes one augmented sample into its slots of a batch.
pub(crate) fn write_sample(
    sample: &AugmentedSample,
    class: Option<u32>,
    norm: &Normalization,
    fill_label: f32,
    image_out: &mut [f32],
    labels_out: &mut [f32],
) {
    let channels = norm.mean.len();
    for (pixel_out, pixel) in image_out
        .chunks_exact_mut(channels)
        .zip(sample.pixels.chunks_exact(channels))
    {
        for c in 0..channels {
            let scale = 1.0 / norm.std[c].max(1e-6);
            pixel_out[c] = (pixel[c] as f32 / 255.0 - norm.mean[c]) * scale;
        }
    }
    match (&sample.labels, class) {
        (Some(map), _) => {
            for (out, &label) in labels_out.iter_mut().zip(map) {
                *out = if label == u32::MAX {
                    fill_label
                } else {
                    label as f32
                };
            }
        }
        (None, Some(class)) => labels_out[0] = class as f32,
        (None, None) => unreachable!("a sample has a class or a label map"),
    }
}

/// Iterates over the batches of one epoch of an in-memory split.
pub struct Batcher<'a> {
    split: &'a Split,
    norm: Normalization,
    config: BatchConfig,
    epoch: usize,
    batches: std::vec::IntoIter<Vec<usize>>,
}

impl<'a> Batcher<'a> {
    /// Prepares epoch `epoch` of `split`.
    pub fn new(split: &'a Split, norm: &Normalization, config: &BatchConfig, epoch: usize) -> Self {
        assert_eq!(
            norm.mean.len(),
            split.channels,
            "normalization has {} channels but the split has {}",
            norm.mean.len(),
            split.channels
        );
        let order = epoch_order(split.len, config.seed, epoch, config.shuffle);
        Batcher {
            split,
            norm: norm.clone(),
            config: config.clone(),
            epoch,
            batches: batch_indices(&order, config).into_iter(),
        }
    }

    /// The number of batches left in the epoch.
    pub fn remaining(&self) -> usize {
        self.batches.len()
    }

    fn build(&self, indices: Vec<usize>) -> Batch {
        let split = self.split;
        let shape = Shape {
            height: split.height,
            width: split.width,
            channels: split.channels,
        };
        let (height, width) = self.config.augment.output_size(split.height, split.width);
        let image_len = height * width * split.channels;
        let label_len = if split.is_segmentation() {
            height * width
        } else {
            1
        };
        let fill_label = self.config.ignore_label.map_or(-1.0, |l| l as f32);

        let mut images = vec![0f32; indices.len() * image_len];
        let mut labels = vec![0f32; indices.len() * label_len];
        images
            .par_chunks_mut(image_len)
            .zip(labels.par_chunks_mut(label_len))
            .zip(indices.par_iter())
            .for_each(|((image_out, labels_out), &index)| {
                let mut rng = sample_rng(self.config.seed, self.epoch as u64, index as u64);
                let label_map = split.is_segmentation().then(|| split.label(index));
                let sample = apply(
                    &self.config.augment,
                    split.image(index),
                    label_map,
                    shape,
                    &mut rng,
                );
                let class = (!split.is_segmentation()).then(|| split.labels[index]);
                write_sample(
                    &sample, class, &self.norm, fill_label, image_out, labels_out,
                );
            });

        Batch {
            images,
            labels,
            len: indices.len(),
            height,
            width,
            channels: split.channels,
            indices,
        }
    }
}

impl Iterator for Batcher<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let indices = self.batches.next()?;
        Some(self.build(indices))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.batches.len(), Some(self.batches.len()))
    }
}

impl ExactSizeIterator for Batcher<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn split() -> Split {
        Split {
            images: (0..10 * 4).map(|v| v as u8).collect(),
            labels: (0..10).collect(),
            height: 2,
            width: 2,
            channels: 1,
            len: 10,
        }
    }

    #[test]
    fn eval_batches_in_order() {
        let split = split();
        let config = BatchConfig::eval(4);
        let batches: Vec<Batch> =
            Batcher::new(&split, &Normalization::unit(1), &config, 0).collect();
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[2].len, 2);
        assert_eq!(batches[0].labels, vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(batches[0].images[4], 4.0 / 255.0);
    }

    #[test]
    fn train_shuffle_covers_each_once() {
        let split = split();
        let config = BatchConfig::train(3, Augment::None, 5);
        let mut seen: Vec<usize> = Batcher::new(&split, &Normalization::unit(1), &config, 1)
            .flat_map(|batch| batch.indices)
            .collect();
        assert_eq!(seen.len(), 9, "the last partial batch is dropped");
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9);
    }

    #[test]
    fn epochs_shuffle_differently() {
        assert_ne!(epoch_order(100, 1, 0, true), epoch_order(100, 1, 1, true));
        assert_eq!(epoch_order(100, 1, 0, true), epoch_order(100, 1, 0, true));
    }
}
