//! A multi-threaded prefetching loader for datasets streamed from image files.
//!
//! Worker threads claim batch numbers in order, decode and augment their
//! images, and send the finished batch back. The iterator hands batches out
//! in epoch order. A worker may claim batch `b` only while `b` is less than
//! `depth` batches ahead of the consumer, so at most `depth` batches wait in
//! memory. Samples use the same per-sample RNG as [`super::Batcher`], so the
//! batches do not depend on the number of threads.

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
/// normalized RGB batches.
pub struct Prefetcher {
    shared: Arc<Shared>,
    receiver: Receiver<(usize, Result<Batch>)>,
    workers: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, Result<Batch>>,
    next: usize,
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
        }
    }

    /// The number of batches in the epoch.
    pub fn batch_count(&self) -> usize {
        self.shared.batches.len()
    }
}

fn run_worker(shared: &Shared, sender: &Sender<(usize, Result<Batch>)>) {
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

fn build_batch(shared: &Shared, indices: &[usize]) -> Result<Batch> {
    let channels = shared.norm.mean.len();
    let fill_label = shared.config.ignore_label.map_or(-1.0, |l| l as f32);
    let mut images = Vec::new();
    let mut labels = vec![0f32; indices.len()];
    let mut size = None;

    for (slot, &index) in indices.iter().enumerate() {
        let (path, label) = &shared.files[index];
        let image = decode_image_file(path)?.to_rgb8();
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
        let image_len = height * width * channels;
        images.resize((slot + 1) * image_len, 0.0);
        write_sample(
            &sample,
            Some(*label),
            &shared.norm,
            fill_label,
            &mut images[slot * image_len..],
            &mut labels[slot..slot + 1],
        );
    }

    let (height, width) = size.unwrap_or((0, 0));
    Ok(Batch {
        images,
        labels,
        len: indices.len(),
        height,
        width,
        channels,
        indices: indices.to_vec(),
    })
}

impl Iterator for Prefetcher {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.shared.batches.len() {
            return None;
        }
        loop {
            if let Some(batch) = self.pending.remove(&self.next) {
                self.next += 1;
                let mut window = self
                    .shared
                    .window
                    .lock()
                    .expect("no thread panics holding the window");
                window.consumed = self.next;
                self.shared.wake.notify_all();
                return Some(batch);
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
