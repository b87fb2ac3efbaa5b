//! The CUDA executor: runs a `Program` on a GPU through cudarc.
//!
//! At construction it lowers every step to kernels and compiles each
//! distinct kernel source once with NVRTC for the device's own compute
//! capability. It then loads the PTX and allocates the planned temporary
//! buffers, the persistent values and the feeds for the largest batch. A run copies the
//! image and label batch in, launches the steps in order on one stream, and
//! leaves the results on the device until the loss or logits are read.
//! Persistent values move between the host `Store` and the device with
//! [`CudaExecutor::upload`] and [`CudaExecutor::download`].
//!
//! The driver and NVRTC are loaded at run time, so this module builds
//! anywhere; without a driver, [`CudaExecutor::new`] returns
//! [`CudaExecError::NoDriver`] and the caller can fall back to the CPU.
//!
//! Every kernel takes its buffers as `__restrict__` pointers, so a step
//! whose output shares a buffer with one of its operands is rejected.

use std::collections::HashMap;
use std::sync::Arc;

use ldnc_codegen::cuda::cudarc::driver::{
    self, CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig,
    PushKernelArg,
};
use ldnc_codegen::cuda::cudarc::nvrtc::Ptx;
use ldnc_codegen::cuda::interp::{self, Arg};
use ldnc_codegen::cuda::lower::{self, Binding, Launch};
use ldnc_codegen::cuda::nvrtc::{self, Arch};
use ldnc_codegen::cuda::print::print_kernel;
use ldnc_ir::op::Role;
use ldnc_ir::program::{Program, Storage};

use crate::exec::StepParams;
use crate::store::Store;

/// Errors of the CUDA executor.
#[derive(Debug, thiserror::Error)]
pub enum CudaExecError {
    #[error("no CUDA driver found: {0}; use --device cpu")]
    NoDriver(String),
    #[error("no usable CUDA device: {0}; use --device cpu")]
    NoDevice(DriverError),
    #[error("CUDA call failed while {action}")]
    Driver {
        action: String,
        #[source]
        source: DriverError,
    },
    #[error(transparent)]
    Codegen(#[from] ldnc_codegen::cuda::Error),
    #[error(transparent)]
    Program(#[from] ldnc_ir::Error),
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
    #[error(
        "step {step} ({op}) writes buffer {buffer}, which also holds one of its operands; \
         the CUDA kernels need distinct buffers"
    )]
    AliasedBuffer {
        step: usize,
        op: &'static str,
        buffer: usize,
    },
    #[error(
        "value `{value}` has {elements} elements at batch {batch}, more than an int index \
         reaches; use a smaller batch"
    )]
    TooLarge {
        value: String,
        elements: usize,
        batch: usize,
    },
}

type Result<T> = std::result::Result<T, CudaExecError>;

/// Wraps a driver error with what the executor was doing.
fn driver(action: impl Into<String>) -> impl FnOnce(DriverError) -> CudaExecError {
    let action = action.into();
    move |source| CudaExecError::Driver { action, source }
}

/// One launch with its loaded function.
struct LoadedLaunch {
    launch: Launch,
    function: CudaFunction,
}

struct LoadedStep {
    launches: Vec<LoadedLaunch>,
    scratch: Vec<CudaSlice<f32>>,
}

pub struct CudaExecutor {
    stream: Arc<CudaStream>,
    program: Program,
    steps: Vec<LoadedStep>,
    buffers: Vec<CudaSlice<f32>>,
    persistent: HashMap<String, CudaSlice<f32>>,
    image: CudaSlice<f32>,
    label: CudaSlice<f32>,
    max_batch: usize,
    n: usize,
    arch: Arch,
}

/// Opens device 0, or explains why there is none.
fn open_device() -> Result<Arc<CudaContext>> {
    // SAFETY: `is_culib_present` only tries to open the driver library with
    // `dlopen` and closes what it opened; it calls no driver function.
    let present = unsafe { driver::sys::is_culib_present() };
    if !present {
        return Err(CudaExecError::NoDriver(
            "libcuda.so could not be loaded (is the NVIDIA driver installed?)".into(),
        ));
    }
    CudaContext::new(0).map_err(CudaExecError::NoDevice)
}

/// Checks that every value fits an `int` index at `max_batch` and that no
/// compute step writes a buffer it reads.
fn check_program(program: &Program, max_batch: usize) -> Result<()> {
    program.check()?;
    for v in &program.values {
        let elements = v.ty.numel(max_batch);
        if elements > i32::MAX as usize {
            return Err(CudaExecError::TooLarge {
                value: v.name.clone(),
                elements,
                batch: max_batch,
            });
        }
    }
    for (s, step) in program.steps.iter().enumerate() {
        let Storage::Buffer(out) = program.values[step.output].storage else {
            continue;
        };
        let aliased = step
            .inputs
            .iter()
            .any(|&i| program.values[i].storage == Storage::Buffer(out));
        if aliased && step.op.role() != Role::Update {
            return Err(CudaExecError::AliasedBuffer {
                step: s,
                op: step.op.name(),
                buffer: out,
            });
        }
    }
    Ok(())
}

impl CudaExecutor {
    /// Compiles `program` for device 0 and allocates its buffers for batches
    /// up to `max_batch`. Persistent values start at zero; call
    /// [`CudaExecutor::upload`] before the first run.
    pub fn new(program: Program, max_batch: usize) -> Result<CudaExecutor> {
        let ctx = open_device()?;
        check_program(&program, max_batch)?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let arch = Arch::from_capability(major as u32, minor as u32);
        let stream = ctx.default_stream();
        tracing::info!(
            "CUDA device 0 ({arch}), {} steps, batch up to {max_batch}",
            program.steps.len()
        );

        let lowered = lower::lower_program(&program)?;
        let mut functions: HashMap<String, CudaFunction> = HashMap::new();
        let mut steps = Vec::with_capacity(lowered.len());
        for step in lowered {
            let mut launches = Vec::with_capacity(step.launches.len());
            for launch in step.launches {
                let source = print_kernel(&launch.kernel);
                let function = match functions.get(&source) {
                    Some(f) => f.clone(),
                    None => {
                        let name = &launch.kernel.name;
                        let ptx = nvrtc::compile_source(name, &source, arch)?;
                        let module = ctx
                            .load_module(Ptx::from_src(ptx))
                            .map_err(driver(format!("loading the PTX of kernel `{name}`")))?;
                        let f = module
                            .load_function(name)
                            .map_err(driver(format!("finding kernel `{name}` in its module")))?;
                        functions.insert(source, f.clone());
                        f
                    }
                };
                launches.push(LoadedLaunch { launch, function });
            }
            let scratch = step
                .scratch
                .iter()
                .map(|&len| stream.alloc_zeros::<f32>(len.max(1)))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(driver("allocating scratch buffers"))?;
            steps.push(LoadedStep { launches, scratch });
        }
        tracing::debug!("compiled {} distinct kernels", functions.len());

        let alloc = |len: usize, what: &str| {
            stream
                .alloc_zeros::<f32>(len.max(1))
                .map_err(driver(format!("allocating {what}")))
        };
        let buffers = program
            .buffers
            .iter()
            .enumerate()
            .map(|(b, buf)| alloc(buf.numel(max_batch), &format!("buffer {b}")))
            .collect::<Result<Vec<_>>>()?;
        let mut persistent = HashMap::new();
        for v in program.persistent() {
            persistent.insert(v.name.clone(), alloc(v.ty.numel(max_batch), &v.name)?);
        }
        let image = alloc(
            program.values[program.image].ty.numel(max_batch),
            "the image feed",
        )?;
        let label = alloc(
            program.values[program.label].ty.numel(max_batch),
            "the label feed",
        )?;

        Ok(CudaExecutor {
            stream,
            program,
            steps,
            buffers,
            persistent,
            image,
            label,
            max_batch,
            n: 0,
            arch,
        })
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The architecture the kernels were compiled for.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Copies every persistent value of the program from `store` to the device.
    pub fn upload(&mut self, store: &Store) -> Result<()> {
        for (name, slice) in self.persistent.iter_mut() {
            let data = store
                .get(name)
                .ok_or_else(|| CudaExecError::MissingTensor(name.clone()))?;
            if data.len() > slice.len() {
                return Err(CudaExecError::FeedSize {
                    what: "a stored tensor",
                    got: data.len(),
                    expected: slice.len(),
                    n: self.max_batch,
                });
            }
            self.stream
                .memcpy_htod(data, &mut slice.slice_mut(..data.len()))
                .map_err(driver(format!("uploading `{name}`")))?;
        }
        Ok(())
    }

    /// Copies every persistent value from the device into `store`.
    pub fn download(&self, store: &mut Store) -> Result<()> {
        for (name, slice) in &self.persistent {
            let target = store
                .get_mut(name)
                .ok_or_else(|| CudaExecError::MissingTensor(name.clone()))?;
            let len = target.len();
            let data = self
                .stream
                .clone_dtoh(&slice.slice(..len))
                .map_err(driver(format!("downloading `{name}`")))?;
            target.copy_from_slice(&data);
        }
        Ok(())
    }

    /// Runs every step on a batch of `n` images.
    pub fn run(
        &mut self,
        image: &[f32],
        label: &[f32],
        n: usize,
        params: StepParams,
    ) -> Result<()> {
        if n > self.max_batch {
            return Err(CudaExecError::BatchTooLarge {
                got: n,
                max: self.max_batch,
            });
        }
        let feeds = [
            ("image batch", self.program.image, image),
            ("label batch", self.program.label, label),
        ];
        for (what, id, data) in feeds {
            let expected = self.program.values[id].ty.numel(n);
            if data.len() != expected {
                return Err(CudaExecError::FeedSize {
                    what,
                    got: data.len(),
                    expected,
                    n,
                });
            }
        }
        self.stream
            .memcpy_htod(image, &mut self.image.slice_mut(..image.len()))
            .map_err(driver("copying the image batch"))?;
        self.stream
            .memcpy_htod(label, &mut self.label.slice_mut(..label.len()))
            .map_err(driver("copying the label batch"))?;
        self.n = n;

        for s in 0..self.steps.len() {
            // The seed of a step matches the CPU executor's, so dropout masks agree.
            let seed = params.seed ^ (s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for l in 0..self.steps[s].launches.len() {
                self.launch(s, l, seed, params.lr)?;
            }
        }
        Ok(())
    }

    /// The device slice that stores value `id`.
    fn value(&self, id: usize) -> Result<&CudaSlice<f32>> {
        let v = &self.program.values[id];
        match v.storage {
            Storage::Persistent => self
                .persistent
                .get(&v.name)
                .ok_or_else(|| CudaExecError::MissingTensor(v.name.clone())),
            Storage::Feed if id == self.program.image => Ok(&self.image),
            Storage::Feed => Ok(&self.label),
            Storage::Buffer(b) => Ok(&self.buffers[b]),
        }
    }

    fn launch(&self, s: usize, l: usize, seed: u64, lr: f32) -> Result<()> {
        let step = &self.program.steps[s];
        let loaded = &self.steps[s].launches[l];
        let kernel = &loaded.launch.kernel;
        let n = self.n as i32;

        // The grid depends on the scalar arguments only.
        let mut shape_args: Vec<Arg> = loaded
            .launch
            .args
            .iter()
            .map(|b| match b {
                Binding::Batch => Arg::I32(n),
                Binding::Seed => Arg::U64(seed),
                Binding::LearningRate => Arg::F32(lr),
                _ => Arg::Buffer(Vec::new()),
            })
            .collect();
        let [gx, gy, gz] = interp::launch_grid(kernel, &mut shape_args)?;
        let [bx, by, bz] = kernel.block;
        let config = LaunchConfig {
            grid_dim: (gx, gy, gz),
            block_dim: (bx, by, bz),
            shared_mem_bytes: 0,
        };

        let mut builder = self.stream.launch_builder(&loaded.function);
        for binding in &loaded.launch.args {
            match binding {
                Binding::Input(i) => builder.arg(self.value(step.inputs[*i])?),
                Binding::Output => builder.arg(self.value(step.output)?),
                Binding::Scratch(j) => builder.arg(&self.steps[s].scratch[*j]),
                Binding::Batch => builder.arg(&n),
                Binding::Seed => builder.arg(&seed),
                Binding::LearningRate => builder.arg(&lr),
            };
        }
        // SAFETY: the arguments follow the kernel's parameter list in order and
        // type (`float*` for every buffer, `int`, `unsigned long long` and
        // `float` scalars), as the lowering's bindings and the printer
        // guarantee. Every buffer contains at least the elements of its value at
        // the maximum batch, and `check_program` rejected values an `int`
        // cannot index and outputs that alias an operand.
        unsafe { builder.launch(config) }
            .map_err(driver(format!("launching `{}` for step {s}", kernel.name)))?;
        Ok(())
    }

    /// Waits for the device and returns the total loss of the last run.
    pub fn loss(&self) -> Result<f32> {
        let slice = self.value(self.program.loss)?;
        let data = self
            .stream
            .clone_dtoh(&slice.slice(..1))
            .map_err(driver("reading the loss"))?;
        Ok(data[0])
    }

    /// Final-head logits of the last run, `n x classes` (or per pixel).
    pub fn final_logits(&self) -> Result<Vec<f32>> {
        let id = *self
            .program
            .logits
            .last()
            .expect("a program has a final head");
        let len = self.program.values[id].ty.numel(self.n);
        self.stream
            .clone_dtoh(&self.value(id)?.slice(..len))
            .map_err(driver("reading the logits"))
    }
}
