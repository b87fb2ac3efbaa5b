//! A network with its parameters and executors: checks a dataset against the
//! network, runs training steps on the CPU or CUDA, and evaluates test splits.

use std::sync::Arc;

use ldnc_ir::program::CompiledNet;
use ldnc_ir::spec::{NetSpec, Task};
use ldnc_ir::CLASS_WEIGHTS;

use crate::cuda_exec::CudaExecutor;
use crate::data::{Augment, Batch, BatchConfig, Batcher};
use crate::exec::{ExecError, Executor, StepParams};
use crate::freeze::{freeze, Frozen};
use crate::kernels::KernelSet;
use crate::metrics::{self, Confusion, Hits};
use crate::store::Store;

use super::data::Data;
use super::file_batches::{loader_threads, FileBatches};
use super::pipeline::{EvalView, Pipeline};
use super::tiles::TileGrid;
use super::TrainError;

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
    kernels: KernelSet,
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
        // Evaluation freezes the program afresh for each pass, so only check it
        // here.
        net.eval.check().map_err(ExecError::from)?;
        Ok(Session {
            net,
            store,
            train,
            kernels,
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

    /// Sets the class weights of the network's loss (segmentation only) and
    /// copies them to the GPU when training runs there. Checkpoints keep them,
    /// so a resumed run and `ldnc eval` use the weights it trained with.
    pub fn set_class_weights(&mut self, weights: &[f32]) -> Result<(), TrainError> {
        let network = self.net.spec.name.clone();
        let Some(slot) = self.store.get_mut(CLASS_WEIGHTS) else {
            return Err(TrainError::Incompatible {
                dataset: format!("a list of {} class weights", weights.len()),
                network,
                reason: "its loss has no class weights, because it is not a segmentation \
                         network"
                    .into(),
            });
        };
        if slot.len() != weights.len() {
            return Err(TrainError::Incompatible {
                dataset: format!("a list of {} class weights", weights.len()),
                network,
                reason: format!(
                    "{} weights were given for {} classes",
                    weights.len(),
                    slot.len()
                ),
            });
        }
        slot.copy_from_slice(weights);
        if let Some(cuda) = self.cuda.as_mut() {
            cuda.upload(&self.store)?;
        }
        Ok(())
    }

    /// Returns the label that the network's loss skips (segmentation only).
    pub fn ignore_label(&self) -> Option<u32> {
        ignore_label(&self.net.spec)
    }

    /// Checks that `data` seen through `pipeline` produces the batches the
    /// network takes: image size and channels, classes, task and ignore label.
    pub fn check_data(&self, data: Data, pipeline: &Pipeline) -> Result<(), TrainError> {
        check_data(&self.net.spec, data, pipeline)
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
    /// batch-norm statistics, in batches of up to `batch`. The evaluation
    /// program is frozen first, so steps that read only parameters (batch-norm
    /// folding) run once per pass, not once per batch.
    pub fn evaluate(
        &mut self,
        data: Data,
        view: &EvalView,
        batch: usize,
    ) -> Result<Evaluation, TrainError> {
        let frozen = freeze(&self.net.eval, &self.store, self.kernels)?;
        evaluate(&self.net.spec, frozen, self.kernels, data, view, batch)
    }
}

/// Evaluates `frozen`, the frozen evaluation program of the network of
/// `spec`, on the test split of `data` as `view` defines, in batches of up to
/// `batch`.
pub fn evaluate(
    spec: &NetSpec,
    frozen: Frozen,
    kernels: KernelSet,
    data: Data,
    view: &EvalView,
    batch: usize,
) -> Result<Evaluation, TrainError> {
    let mut pass = EvalPass {
        executor: Executor::new(frozen.program, batch, kernels)?,
        store: frozen.store,
        ignore: ignore_label(spec),
    };
    let mut config = BatchConfig::eval(batch);
    config.ignore_label = data.ignore_label();
    let norm = data.normalization();
    let mut tally = EvalTally::new(spec.classes);
    let mut skipped = 0;
    match (data, view) {
        (Data::Memory(dataset), EvalView::Whole(augment)) => {
            config.augment = augment.clone();
            for b in Batcher::new(&dataset.test, &norm, &config, 0) {
                pass.score(&b, &mut tally)?;
            }
        }
        (Data::Memory(dataset), EvalView::Tiles { size }) => {
            let tiles = TileGrid::new(&dataset.test, *size);
            for chunk in tiles.tiles.chunks(batch.max(1)) {
                let b = tiles.batch(&dataset.test, &norm, pass.ignore, chunk);
                pass.score(&b, &mut tally)?;
            }
        }
        (Data::Files(files), EvalView::Whole(augment)) => {
            config.augment = augment.clone();
            let list = Arc::new(files.test.clone());
            let mut batches = FileBatches::new(list, &norm, &config, 0, loader_threads());
            for b in batches.by_ref() {
                pass.score(&b?, &mut tally)?;
            }
            skipped = batches.skipped();
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
                network: spec.name.clone(),
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

/// A frozen evaluation program with its tensors.
struct EvalPass {
    executor: Executor,
    store: Store,
    ignore: Option<u32>,
}

impl EvalPass {
    /// Runs the program on one batch and adds its figures to `tally`.
    fn score(&mut self, batch: &Batch, tally: &mut EvalTally) -> Result<(), TrainError> {
        let params = StepParams { lr: 0.0, seed: 0 };
        let (executor, store) = (&mut self.executor, &mut self.store);
        executor.run(store, &batch.images, &batch.labels, batch.len, params)?;
        tally.loss_sum += executor.loss(store)? as f64 * batch.len as f64;
        tally.rows += batch.len;
        tally
            .confusion
            .add(executor.final_logits(store)?, &batch.labels, self.ignore);
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

/// Returns the label that `spec`'s loss skips (segmentation only).
pub fn ignore_label(spec: &NetSpec) -> Option<u32> {
    match spec.task {
        Task::Segmentation { ignore_label, .. } => ignore_label,
        Task::Classification => None,
    }
}

/// Checks that `data` seen through `pipeline` produces the batches that the
/// network of `spec` takes: image size and channels, classes, task and ignore
/// label.
pub fn check_data(spec: &NetSpec, data: Data, pipeline: &Pipeline) -> Result<(), TrainError> {
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
    if segmentation && data.ignore_label() != ignore_label(spec) {
        return Err(incompatible(format!(
            "the dataset's ignore label is {:?} but the network's `task` has ignore_label: \
             {:?}; set ignore_label: {:?} in the network file's `task`",
            data.ignore_label(),
            ignore_label(spec),
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
