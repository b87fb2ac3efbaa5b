//! The CPU executor: runs a `Program` step by step over its planned buffers.
//!
//! Temporary buffers are allocated once for the largest batch the executor was
//! built for; a step at a smaller batch uses a prefix of each buffer. Persistent
//! values live in a `Store` shared by the training and evaluation programs of a
//! network. Update steps write into the store in place.

use ldnc_ir::op::Op;
use ldnc_ir::program::{Program, Storage};
use ldnc_ir::TensorType;

use crate::kernels::{Ctx, In, KernelError, KernelSet};
use crate::optim;
use crate::store::Store;

/// Errors of program execution.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("step {step} ({op}, value {value}) failed")]
    Kernel {
        step: usize,
        op: &'static str,
        value: String,
        #[source]
        source: KernelError,
    },
    #[error("the parameter store has no tensor `{0}`; the checkpoint belongs to another network")]
    MissingTensor(String),
    #[error("batch of {got} images exceeds the executor's maximum batch {max}")]
    BatchTooLarge { got: usize, max: usize },
    #[error("{what} has {got} values, expected {expected} for a batch of {n}")]
    FeedSize {
        what: &'static str,
        got: usize,
        expected: usize,
        n: usize,
    },
    #[error(transparent)]
    Program(#[from] ldnc_ir::Error),
}

/// Per-step inputs that are not tensors.
#[derive(Debug, Clone, Copy)]
pub struct StepParams {
    pub lr: f32,
    /// Seed for this step's random ops.
    pub seed: u64,
}

pub struct Executor {
    program: Program,
    buffers: Vec<Vec<f32>>,
    max_batch: usize,
    kernels: KernelSet,
    image: Vec<f32>,
    label: Vec<f32>,
    n: usize,
    /// Seconds spent per op name, when profiling is on.
    profile: Option<std::collections::BTreeMap<&'static str, (usize, f64)>>,
}

impl Executor {
    /// Checks `program` and allocates its buffers for batches up to `max_batch`.
    pub fn new(
        program: Program,
        max_batch: usize,
        kernels: KernelSet,
    ) -> Result<Executor, ExecError> {
        program.check()?;
        let buffers = program
            .buffers
            .iter()
            .map(|b| vec![0.0; b.numel(max_batch)])
            .collect();
        Ok(Executor {
            program,
            buffers,
            max_batch,
            kernels,
            image: Vec::new(),
            label: Vec::new(),
            n: 0,
            profile: None,
        })
    }

    /// Starts recording time per op name; `profile` returns the totals.
    pub fn enable_profile(&mut self) {
        self.profile = Some(Default::default());
    }

    /// Calls and seconds per op name since `enable_profile`, slowest first.
    pub fn profile(&self) -> Vec<(&'static str, usize, f64)> {
        let mut rows: Vec<_> = self
            .profile
            .iter()
            .flatten()
            .map(|(&op, &(calls, seconds))| (op, calls, seconds))
            .collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        rows
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Bytes held by temporary buffers (what the memory planner decided).
    pub fn buffer_bytes(&self) -> u64 {
        self.buffers.iter().map(|b| 4 * b.len() as u64).sum()
    }

    /// Runs every step on a batch of `n` images.
    pub fn run(
        &mut self,
        store: &mut Store,
        image: &[f32],
        label: &[f32],
        n: usize,
        params: StepParams,
    ) -> Result<(), ExecError> {
        if n > self.max_batch {
            return Err(ExecError::BatchTooLarge {
                got: n,
                max: self.max_batch,
            });
        }
        let image_len = self.program.values[self.program.image].ty.numel(n);
        let label_len = self.program.values[self.program.label].ty.numel(n);
        if image.len() != image_len {
            return Err(ExecError::FeedSize {
                what: "image batch",
                got: image.len(),
                expected: image_len,
                n,
            });
        }
        if label.len() != label_len {
            return Err(ExecError::FeedSize {
                what: "label batch",
                got: label.len(),
                expected: label_len,
                n,
            });
        }
        self.image.clear();
        self.image.extend_from_slice(image);
        self.label.clear();
        self.label.extend_from_slice(label);
        self.n = n;

        for s in 0..self.program.steps.len() {
            let started = self.profile.is_some().then(std::time::Instant::now);
            self.run_step(store, s, params)?;
            if let (Some(started), Some(profile)) = (started, self.profile.as_mut()) {
                let entry = profile.entry(self.program.steps[s].op.name()).or_default();
                entry.0 += 1;
                entry.1 += started.elapsed().as_secs_f64();
            }
        }
        Ok(())
    }

    /// Runs steps `steps`, in the order given, at batch size 1 without feeding
    /// a batch. The steps must be computed ops (no updates, which change the
    /// store) that read neither the image nor the labels.
    pub fn run_compute_steps(&mut self, store: &Store, steps: &[usize]) -> Result<(), ExecError> {
        self.n = 1;
        let params = StepParams { lr: 0.0, seed: 0 };
        for &s in steps {
            self.compute_step(store, s, params)?;
        }
        Ok(())
    }

    fn run_step(
        &mut self,
        store: &mut Store,
        s: usize,
        params: StepParams,
    ) -> Result<(), ExecError> {
        let n = self.n;
        let step = &self.program.steps[s];
        match &step.op {
            Op::SgdUpdate {
                momentum,
                weight_decay,
                nesterov,
            } => {
                let param = &self.program.values[step.inputs[0]];
                let velocity = &self.program.values[step.inputs[2]];
                let grad = self.slice(store, step.inputs[1], n)?.to_vec();
                let mut v = store
                    .take(&velocity.name)
                    .ok_or_else(|| ExecError::MissingTensor(velocity.name.clone()))?;
                let p = store
                    .get_mut(&param.name)
                    .ok_or_else(|| ExecError::MissingTensor(param.name.clone()))?;
                optim::sgd(
                    p,
                    &grad,
                    &mut v,
                    params.lr,
                    *momentum,
                    *weight_decay,
                    *nesterov,
                );
                store.put(&velocity.name, v);
            }
            Op::RmsPropUpdate {
                decay,
                eps,
                weight_decay,
            } => {
                let param = &self.program.values[step.inputs[0]];
                let mean_square = &self.program.values[step.inputs[2]];
                let grad = self.slice(store, step.inputs[1], n)?.to_vec();
                let mut s = store
                    .take(&mean_square.name)
                    .ok_or_else(|| ExecError::MissingTensor(mean_square.name.clone()))?;
                let p = store
                    .get_mut(&param.name)
                    .ok_or_else(|| ExecError::MissingTensor(param.name.clone()))?;
                let update = match self.kernels {
                    KernelSet::Reference => optim::rmsprop,
                    KernelSet::Fast => optim::rmsprop_parallel,
                };
                update(p, &grad, &mut s, params.lr, *decay, *eps, *weight_decay);
                store.put(&mean_square.name, s);
            }
            Op::BnRunningUpdate { momentum, per_item } => {
                let state = &self.program.values[step.inputs[0]];
                let stats = self.slice(store, step.inputs[1], n)?.to_vec();
                let running = store
                    .get_mut(&state.name)
                    .ok_or_else(|| ExecError::MissingTensor(state.name.clone()))?;
                optim::bn_running_update(running, &stats, *momentum, n * per_item);
            }
            _ => self.compute_step(store, s, params)?,
        }
        Ok(())
    }

    /// Runs step `s`, an op that writes a temporary buffer and changes no
    /// persistent tensor.
    fn compute_step(
        &mut self,
        store: &Store,
        s: usize,
        params: StepParams,
    ) -> Result<(), ExecError> {
        let n = self.n;
        let step = &self.program.steps[s];
        let out = &self.program.values[step.output];
        let Storage::Buffer(b) = out.storage else {
            return Err(ExecError::Program(ldnc_ir::Error::Program(format!(
                "computed value {} is not in a buffer",
                out.name
            ))));
        };
        let out_ty: TensorType = out.ty.clone();
        let len = out_ty.numel(n);
        let mut target = std::mem::take(&mut self.buffers[b]);
        let result = {
            let mut inputs = Vec::with_capacity(step.inputs.len());
            for &i in &step.inputs {
                let v = &self.program.values[i];
                let data = self.slice(store, i, n)?;
                inputs.push(In { data, ty: &v.ty });
            }
            let ctx = Ctx {
                n,
                seed: params.seed ^ (s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            };
            self.kernels
                .compute(&step.op, &inputs, &mut target[..len], &out_ty, &ctx)
        };
        self.buffers[b] = target;
        result.map_err(|source| ExecError::Kernel {
            step: s,
            op: step.op.name(),
            value: out.name.clone(),
            source,
        })
    }

    /// Returns the data of value `id` at batch `n`.
    fn slice<'a>(&'a self, store: &'a Store, id: usize, n: usize) -> Result<&'a [f32], ExecError> {
        let v = &self.program.values[id];
        let len = v.ty.numel(n);
        match v.storage {
            Storage::Persistent => store
                .get(&v.name)
                .ok_or_else(|| ExecError::MissingTensor(v.name.clone())),
            Storage::Feed if id == self.program.image => Ok(&self.image[..len]),
            Storage::Feed => Ok(&self.label[..len]),
            Storage::Buffer(b) => Ok(&self.buffers[b][..len]),
        }
    }

    /// Returns the data of value `id` after the last `run`.
    pub fn value<'a>(&'a self, store: &'a Store, id: usize) -> Result<&'a [f32], ExecError> {
        self.slice(store, id, self.n)
    }

    /// Returns the total loss of the last `run`.
    pub fn loss(&self, store: &Store) -> Result<f32, ExecError> {
        Ok(self.value(store, self.program.loss)?[0])
    }

    /// Final-head logits of the last `run`, `n x classes` (or per pixel).
    pub fn final_logits<'a>(&'a self, store: &'a Store) -> Result<&'a [f32], ExecError> {
        let id = *self
            .program
            .logits
            .last()
            .expect("a program has a final head");
        self.value(store, id)
    }
}
