//! A multi-threaded prefetching loader for datasets streamed from image files.
//!
//! Worker threads claim batch numbers in order, decode and augment their
//! images, and send the finished batch back. The iterator hands batches out
//! in epoch order. A worker may claim batch `b` only while `b` is less than
//! `depth` batches ahead of the consumer, so at most `depth` batches wait in
//! memory. Samples use the same per-sample RNG as [`super::Batcher`], so the
//! batches do not depend on the number of threads.
//!
//! An image that fails to decode is left out of its batch, which trains on
//! the rest. A batch whose images all fail is left out of the epoch. The
//! iterator counts these images and names the first few in the log. Any other
//! error, such as a file that can no longer be read, is returned in place of
//! its batch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::augment::{apply, sample_rng, Shape};
use super::batch::{batch_indices, epoch_order, write_sample, Batch, BatchConfig, Normalization};
use super::error::{DataError, Result};
use super::imagenet::decode_image_file;

/// At most this many undecodable files are named in the log per epoch and
/// split; the rest are only counted.
const NAMED_SKIPS: u64 = 10;

/// An image file left out of its batch because it failed to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedImage {
    pub path: PathBuf,
    pub reason: String,
}

/// A worker's result for one batch: the images that decoded, `None` when
/// none did, and the ones that did not.
struct Decoded {
    batch: Option<Batch>,
    skipped: Vec<SkippedImage>,
}

/// The claim window shared by the workers and the consumer.
struct Window {
    next_claim: usize,
    consumed: usize,
}

struct Shared {
    files: Arc<Vec<(PathBuf, u32)>>,
    batches: Vec<Vec<usize>>,
    norm: Normalization,
    config: BatchConfig,
    epoch: usize,
    depth: usize,
    window: Mutex<Window>,
    wake: Condvar,
    stop: AtomicBool,
}

/// Iterates over one epoch of `(path, label)` files as decoded, augmented,
/// normalized RGB batches, leaving out the images that fail to decode.
pub struct Prefetcher {
    shared: Arc<Shared>,
    receiver: Receiver<(usize, Result<Decoded>)>,
    workers: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, Result<Decoded>>,
    next: usize,
    /// Images left out so far, in the order the iterator reached them.
    skipped: Vec<SkippedImage>,
}

impl Prefetcher {
    /// Starts `threads` workers on epoch `epoch`, keeping at most `depth`
    /// batches decoded ahead of the consumer.
    pub fn new(
        files: Arc<Vec<(PathBuf, u32)>>,
        norm: &Normalization,
        config: &BatchConfig,
        epoch: usize,
        threads: usize,
        depth: usize,
    ) -> Self {
        let order = epoch_order(files.len(), config.seed, epoch, config.shuffle);
        let shared = Arc::new(Shared {
            batches: batch_indices(&order, config),
            files,
            norm: norm.clone(),
            config: config.clone(),
            epoch,
            depth: depth.max(1),
            window: Mutex::new(Window {
                next_claim: 0,
                consumed: 0,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });

        let (sender, receiver) = channel();
        let workers = (0..threads.max(1))
            .map(|_| {
                let shared = Arc::clone(&shared);
                let sender = sender.clone();
                std::thread::spawn(move || run_worker(&shared, &sender))
            })
            .collect();
        Prefetcher {
            shared,
            receiver,
            workers,
            pending: BTreeMap::new(),
            next: 0,
            skipped: Vec::new(),
        }
    }

    /// The number of batches in the epoch, counting those that may turn out
    /// to have no decodable image.
    pub fn batch_count(&self) -> usize {
        self.shared.batches.len()
    }

    /// Images left out so far in this epoch because they failed to decode.
    pub fn skipped(&self) -> &[SkippedImage] {
        &self.skipped
    }

    /// Records the images a batch left out, naming the first [`NAMED_SKIPS`]
    /// of the epoch in the log.
    fn record_skips(&mut self, skipped: Vec<SkippedImage>) {
        for image in skipped {
            if (self.skipped.len() as u64) < NAMED_SKIPS {
                tracing::warn!(
                    path = %image.path.display(),
                    reason = %image.reason,
                    "skipping an undecodable image"
                );
            }
            self.skipped.push(image);
        }
    }
}

fn run_worker(shared: &Shared, sender: &Sender<(usize, Result<Decoded>)>) {
    loop {
        let claimed = {
            let mut window = shared
                .window
                .lock()
                .expect("no thread panics holding the window");
            loop {
                if shared.stop.load(Ordering::Relaxed) || window.next_claim >= shared.batches.len()
                {
                    return;
                }
                if window.next_claim < window.consumed + shared.depth {
                    break;
                }
                window = shared
                    .wake
                    .wait(window)
                    .expect("no thread panics holding the window");
            }
            window.next_claim += 1;
            window.next_claim - 1
        };
        let batch = build_batch(shared, &shared.batches[claimed]);
        if sender.send((claimed, batch)).is_err() {
            return;
        }
    }
}

/// Decodes and augments the images at `indices` into one batch, leaving out
/// those that fail to decode. Each image keeps its own RNG, so the others
/// come out as they would in a batch without the failures.
fn build_batch(shared: &Shared, indices: &[usize]) -> Result<Decoded> {
    let channels = shared.norm.mean.len();
    let fill_label = shared.config.ignore_label.map_or(-1.0, |l| l as f32);
    let mut images = Vec::new();
    let mut labels = Vec::with_capacity(indices.len());
    let mut decoded = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut size = None;

    for &index in indices {
        let (path, label) = &shared.files[index];
        let image = match decode_image_file(path) {
            Ok(image) => image.to_rgb8(),
            Err(DataError::Decode { path, reason }) => {
                skipped.push(SkippedImage { path, reason });
                continue;
            }
            Err(error) => return Err(error),
        };
        let shape = Shape {
            height: image.height() as usize,
            width: image.width() as usize,
            channels,
        };
        let mut rng = sample_rng(shared.config.seed, shared.epoch as u64, index as u64);
        let sample = apply(
            &shared.config.augment,
            image.as_raw(),
            None,
            shape,
            &mut rng,
        );

        let (height, width) = *size.get_or_insert((sample.height, sample.width));
        if (sample.height, sample.width) != (height, width) {
            return Err(DataError::Mismatch {
                path: path.clone(),
                reason: format!(
                    "augmented to {}x{} but the batch is {height}x{width}; use an augmentation \
                     with a fixed output size (random-resized or center crop)",
                    sample.height, sample.width
                ),
            });
        }
        let slot = decoded.len();
        let image_len = height * width * channels;
        images.resize((slot + 1) * image_len, 0.0);
        labels.push(0.0);
        write_sample(
            &sample,
            Some(*label),
            &shared.norm,
            fill_label,
            &mut images[slot * image_len..],
            &mut labels[slot..slot + 1],
        );
        decoded.push(index);
    }

    let batch = size.map(|(height, width)| Batch {
        images,
        labels,
        len: decoded.len(),
        height,
        width,
        channels,
        indices: decoded,
    });
    Ok(Decoded { batch, skipped })
}

impl Iterator for Prefetcher {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        loop {
            if self.next >= self.shared.batches.len() {
                return None;
            }
            if let Some(result) = self.pending.remove(&self.next) {
                self.next += 1;
                {
                    let mut window = self
                        .shared
                        .window
                        .lock()
                        .expect("no thread panics holding the window");
                    window.consumed = self.next;
                    self.shared.wake.notify_all();
                }
                match result {
                    Ok(Decoded { batch, skipped }) => {
                        self.record_skips(skipped);
                        match batch {
                            Some(batch) => return Some(Ok(batch)),
                            None => continue,
                        }
                    }
                    Err(error) => return Some(Err(error)),
                }
            }
            match self.receiver.recv() {
                Ok((index, batch)) => {
                    self.pending.insert(index, batch);
                }
                Err(_) => {
                    self.next = self.shared.batches.len();
                    return Some(Err(DataError::Loader(
                        "every worker thread exited before the epoch ended".into(),
                    )));
                }
            }
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        {
            let _window = self.shared.window.lock();
            self.shared.wake.notify_all();
        }
        // Workers blocked on nothing else exit at their next claim or send.
        while self.receiver.try_recv().is_ok() {}
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
