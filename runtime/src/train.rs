//! The training loop: SGD over shuffled, augmented batches, evaluation after
//! every epoch, metrics as JSON lines, checkpoints, and exact resumption.
//!
//! Everything random is a function of the run seed: initial weights, the order
//! and augmentation of each epoch's batches (seed and epoch), and dropout masks
//! (seed and step). A checkpoint is written at the end of every epoch, so
//! resuming from it replays exactly the steps an uninterrupted run would take.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ldnc_ir::program::CompiledNet;
use ldnc_ir::spec::LrSchedule;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointError, Meta};
use crate::cuda_exec::{CudaExecError, CudaExecutor};
use crate::data::{Augment, BatchConfig, Batcher, Dataset, Split};
use crate::exec::{ExecError, Executor, StepParams};
use crate::kernels::KernelSet;
use crate::metrics::{self, Confusion};
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
    pub images_per_second: f64,
    pub seconds: f64,
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

    fn check_data(&self, data: &Dataset) -> Result<(), TrainError> {
        let input = self.net.spec.input;
        let split = &data.train;
        if (split.height, split.width, split.channels)
            != (input.height, input.width, input.channels)
        {
            return Err(TrainError::InputShape {
                got: format!("{}x{}x{}", split.height, split.width, split.channels),
                expected: format!("{}x{}x{}", input.height, input.width, input.channels),
            });
        }
        if data.classes != self.net.spec.classes {
            return Err(TrainError::Classes {
                got: data.classes,
                expected: self.net.spec.classes,
            });
        }
        Ok(())
    }

    /// Runs one training step and returns the loss and the final-head logits'
    /// correct count.
    pub fn train_step(
        &mut self,
        images: &[f32],
        labels: &[f32],
        n: usize,
        params: StepParams,
    ) -> Result<(f32, usize), TrainError> {
        if let Some(cuda) = self.cuda.as_mut() {
            cuda.run(images, labels, n, params)?;
            let logits = cuda.final_logits()?;
            let correct = metrics::correct(&logits, labels, self.net.spec.classes);
            return Ok((cuda.loss()?, correct));
        }
        self.train.run(&mut self.store, images, labels, n, params)?;
        let loss = self.train.loss(&self.store)?;
        let logits = self.train.final_logits(&self.store)?;
        Ok((
            loss,
            metrics::correct(logits, labels, self.net.spec.classes),
        ))
    }

    /// Evaluates `split` with running statistics; returns mean loss and the
    /// confusion counts of the final head.
    pub fn evaluate(
        &mut self,
        split: &Split,
        data: &Dataset,
        batch: usize,
    ) -> Result<(f64, Confusion), TrainError> {
        let config = BatchConfig::eval(batch);
        let mut loss_sum = 0.0;
        let mut seen = 0usize;
        let classes = self.net.spec.classes;
        let mut confusion = Confusion::new(classes);
        for b in Batcher::new(split, &data.normalization(), &config, 0) {
            let params = StepParams { lr: 0.0, seed: 0 };
            self.eval
                .run(&mut self.store, &b.images, &b.labels, b.len, params)?;
            loss_sum += self.eval.loss(&self.store)? as f64 * b.len as f64;
            seen += b.len;
            confusion.add(
                self.eval.final_logits(&self.store)?,
                &b.labels,
                data.ignore_label,
            );
        }
        Ok((loss_sum / seen.max(1) as f64, confusion))
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

/// Trains `session` on `data` from `start` to `config.epochs`, writing into
/// `files`; returns the metrics of every epoch run.
pub fn train(
    session: &mut Session,
    data: &Dataset,
    config: &TrainConfig,
    files: &RunFiles,
    start: Position,
) -> Result<Vec<EpochMetrics>, TrainError> {
    session.check_data(data)?;
    std::fs::create_dir_all(&files.dir).map_err(|source| TrainError::Output {
        path: files.dir.clone(),
        source,
    })?;
    let steps_per_epoch = data.train.len.div_ceil(config.batch) as u64;
    let total_steps = steps_per_epoch * config.epochs as u64;
    let normalization = data.normalization();
    let augment = Augment::cifar(config.crop_padding, config.flip);
    let mut step = start.step;
    let mut history = Vec::new();

    for epoch in start.epoch..config.epochs {
        let started = Instant::now();
        let batch_config = BatchConfig::train(config.batch, augment.clone(), config.seed);
        let bar = progress_bar(config.show_progress, steps_per_epoch, epoch, config.epochs);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let mut lr = config.lr;
        for batch in Batcher::new(&data.train, &normalization, &batch_config, epoch) {
            if config.max_steps.is_some_and(|max| step >= max) {
                bar.abandon();
                return Ok(history);
            }
            lr = learning_rate(config.lr, config.schedule, step, total_steps);
            let params = StepParams {
                lr: lr as f32,
                seed: config.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step,
            };
            let (loss, ok) = session.train_step(&batch.images, &batch.labels, batch.len, params)?;
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
            correct += ok;
            seen += batch.len;
            let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.4}  acc {:.2}%  {rate:.0} img/s",
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64
            ));
            bar.inc(1);
        }
        let train_seconds = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        session.sync()?;

        let (test_loss, confusion) = session.evaluate(&data.test, data, config.batch)?;
        let row = EpochMetrics {
            epoch: epoch + 1,
            step,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            test_loss,
            test_accuracy: confusion.accuracy(),
            test_error: 1.0 - confusion.accuracy(),
            images_per_second: seen as f64 / train_seconds.max(1e-9),
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            epoch = row.epoch,
            train_loss = row.train_loss,
            test_accuracy = row.test_accuracy,
            images_per_second = row.images_per_second,
            "epoch finished"
        );
        if config.show_progress {
            println!(
                "epoch {:>3}/{}  train loss {:.4}  train acc {:.2}%  test loss {:.4}  test acc {:.2}%  {:.0} img/s",
                row.epoch,
                config.epochs,
                row.train_loss,
                100.0 * row.train_accuracy,
                row.test_loss,
                100.0 * row.test_accuracy,
                row.images_per_second
            );
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
