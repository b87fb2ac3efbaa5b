//! `ldnc train` and `ldnc eval`.
//!
//! Both open any dataset kind with `data::open` (in memory, or ImageNet as a
//! file list streamed by the prefetcher) and pick the augmentation and the
//! evaluation view from the dataset kind through [`Pipeline::for_dataset`].
//! Classification reports top-1 and top-5 accuracy and error. Segmentation
//! reports pixel accuracy over non-ignored pixels, per-class IoU and mean IoU,
//! measured on tiles of the network's input size that cover each test image.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use ldnc_ir::program::CompiledNet;
use ldnc_ir::spec::{LrSchedule, NetSpec};
use ldnc_runtime::checkpoint;
use ldnc_runtime::data::{self, DataSpec, Source};
use ldnc_runtime::export;
use ldnc_runtime::kernels::KernelSet;
use ldnc_runtime::metrics::Confusion;
use ldnc_runtime::train::{
    self, check_data, evaluate as evaluate_frozen, Data, EpochMetrics, Evaluation, Pipeline,
    Position, RunFiles, Session, TrainConfig,
};

use super::compile::{compile, CompileOptions};
use super::plural;
use super::spec_diff::describe_difference;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kernels {
    /// Plain loops (slow; the oracle for the fast set).
    Reference,
    /// GEMM and rayon.
    Fast,
}

impl From<Kernels> for KernelSet {
    fn from(k: Kernels) -> KernelSet {
        match k {
            Kernels::Reference => KernelSet::Reference,
            Kernels::Fast => KernelSet::Fast,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Schedule {
    Step,
    Cosine,
    Constant,
    /// Multiplies the rate by `--lr-decay` after every epoch.
    Exponential,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Network file (RON).
    pub net: PathBuf,
    /// Override a field of the network file, e.g. `--set growth=16`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub options: TrainOptions,
}

/// Flags of `train` other than the network: `ldnc train` and the `train`
/// subcommand of a compiled network executable share them.
#[derive(Debug, Args)]
pub struct TrainOptions {
    /// Dataset, e.g. `fashion-mnist` (the bundled subset), `cifar10:DIR`,
    /// `svhn:DIR`, `imagenet:DIR` or `camvid:DIR`.
    #[arg(long)]
    pub data: String,
    /// Epochs (default: the network file's `train.epochs`). With `--resume`,
    /// the total number of epochs to reach.
    #[arg(long, value_parser = super::parse_count)]
    pub epochs: Option<usize>,
    /// Batch size (default: `train.batch`).
    #[arg(long, value_parser = super::parse_count)]
    pub batch: Option<usize>,
    /// Initial learning rate (default: `train.lr`).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate schedule (default: `train.schedule`).
    #[arg(long, value_enum)]
    pub schedule: Option<Schedule>,
    /// Factor applied to the learning rate after each epoch with
    /// `--schedule exponential`, in (0, 1] (default: the file's decay).
    #[arg(long, value_name = "RATE")]
    pub lr_decay: Option<f64>,
    /// Folder for checkpoints, metrics and plots.
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    /// Continue the run in this folder from its last checkpoint (the folder, or
    /// its checkpoint.safetensors).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Seed for weights, data order, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU kernel set.
    #[arg(long, value_enum, default_value = "fast")]
    pub kernels: Kernels,
    /// Device for training steps: `cpu`, `cuda` / `cuda:0` for the first GPU, or
    /// `auto` for the GPU when one is found and the CPU otherwise (evaluation runs
    /// on the CPU). The default is `cpu` for `ldnc` and `auto` for an executable
    /// built with CUDA kernels.
    #[arg(long)]
    pub device: Option<String>,
    /// Give every value its own buffer instead of sharing buffers by liveness.
    #[arg(long)]
    pub no_plan: bool,
    /// Run the unfused graph (no egg fusion pass), for comparison.
    #[arg(long)]
    pub no_fuse: bool,
    /// Stop after this many optimizer steps in total.
    #[arg(long, hide = true)]
    pub max_steps: Option<u64>,
}

/// The network a command runs: its spec, the file it came from, and its
/// programs when a compiled network executable carries them.
pub struct NetSource<'a> {
    pub spec: NetSpec,
    /// The network file, or the compiled executable; named in messages.
    pub origin: &'a Path,
    pub compiled: Option<&'a CompiledNet>,
    /// Whether the source is an executable built with CUDA kernels, which makes
    /// `auto` the default device.
    pub carries_cuda: bool,
}

impl NetSource<'_> {
    /// Clones the precompiled programs when they are of `spec` and `options`
    /// are the defaults that `ldnc build` uses, and compiles `spec` otherwise.
    fn programs(&self, spec: &NetSpec, options: CompileOptions) -> Result<CompiledNet> {
        let defaults = CompileOptions::default();
        let default_options =
            options.plan_memory == defaults.plan_memory && options.fuse == defaults.fuse;
        match self.compiled {
            Some(compiled) if default_options && compiled.spec == *spec => Ok(compiled.clone()),
            _ => compile(spec, options),
        }
    }
}

pub fn run_train(args: &TrainArgs, quiet: bool) -> Result<()> {
    let source = NetSource {
        spec: super::load_spec(&args.net, &args.set)?,
        origin: &args.net,
        compiled: None,
        carries_cuda: false,
    };
    train_network(&source, &args.options, quiet)
}

/// Trains the network of `source` as `options` ask, from scratch or resuming.
pub fn train_network(source: &NetSource, args: &TrainOptions, quiet: bool) -> Result<()> {
    let device = args.device.clone().unwrap_or_else(|| {
        if source.carries_cuda {
            "auto".to_string()
        } else {
            "cpu".to_string()
        }
    });
    let cuda = parse_device(&device)?;
    let (spec, config, start, out, stored) = match &args.resume {
        Some(given) => {
            let dir = resume_folder(given)?;
            let resumed = resume_settings(source, args, &dir, quiet)?;
            let stored = Some((resumed.checkpoint, resumed.tensors));
            (resumed.spec, resumed.config, resumed.start, dir, stored)
        }
        None => {
            // Checked before the dataset loads, so that a wrong --out fails at once.
            if args.out.is_file() {
                bail!(
                    "--out {} is a file; pass a folder for the run",
                    args.out.display()
                );
            }
            let spec = source.spec.clone();
            let config = config_from(&spec, args, quiet)?;
            (spec, config, Position::default(), args.out.clone(), None)
        }
    };
    let (data_spec, source_data) = open_data(&args.data)?;
    let data = Data::from(&source_data);
    let pipeline =
        Pipeline::for_dataset(data_spec.kind, spec.input, config.crop_padding, config.flip)?;
    let options = CompileOptions {
        plan_memory: !args.no_plan,
        fuse: !args.no_fuse,
    };
    let compiled = source.programs(&spec, options)?;
    let mut session = Session::new(compiled, config.batch, args.kernels.into(), config.seed)?;
    let files = RunFiles { dir: out.clone() };
    if let Some((path, tensors)) = stored {
        checkpoint::restore(&path, &mut session.store, tensors)?;
    } else if files.checkpoint().exists() {
        bail!(
            "{} already holds a run; pass --resume {} to continue it, or choose another --out",
            out.display(),
            out.display()
        );
    }
    match cuda {
        Some(true) => start_cuda(&mut session, &device, config.batch)?,
        Some(false) => {}
        None => {
            if let Err(e) = start_cuda(&mut session, "cuda", config.batch) {
                eprintln!("note: training on the CPU: {e:#}");
            }
        }
    }

    let mut stdout = io::stdout();
    if !quiet {
        writeln!(
            stdout,
            "training {} on {} ({} train / {} test images), {} parameters, output in {}",
            spec.name,
            data.name(),
            data.train_len(),
            data.test_len(),
            session.store.param_count(),
            out.display()
        )?;
        writeln!(stdout, "{}", pipeline.describe())?;
    }
    let history = train::train_with(&mut session, data, &pipeline, &config, &files, start)?;
    if let Some(last) = history.last() {
        writeln!(
            stdout,
            "final test {} after {}; checkpoint {}",
            final_figures(last),
            plural(last.epoch, "epoch"),
            files.checkpoint().display()
        )?;
    }
    Ok(())
}

/// Moves training steps to the GPU.
fn start_cuda(session: &mut Session, device: &str, batch: usize) -> Result<()> {
    session
        .use_cuda(batch)
        .with_context(|| format!("cannot train on `{device}`"))
}

/// Formats the last epoch's test figures: pixel accuracy and mean IoU for
/// segmentation, top-1 and top-5 figures for classification.
fn final_figures(last: &EpochMetrics) -> String {
    match (last.test_mean_iou, last.test_top5_error) {
        (Some(iou), _) => format!(
            "pixel accuracy {:.2}%, mean IoU {:.2}%",
            100.0 * last.test_accuracy,
            100.0 * iou
        ),
        (None, Some(top5)) => format!(
            "accuracy {:.2}% (error {:.2}%, top-5 error {:.2}%)",
            100.0 * last.test_accuracy,
            100.0 * last.test_error,
            100.0 * top5
        ),
        (None, None) => format!(
            "accuracy {:.2}% (error {:.2}%)",
            100.0 * last.test_accuracy,
            100.0 * last.test_error
        ),
    }
}

/// Parses `--data` and opens the dataset it names, naming the value on failure.
fn open_data(text: &str) -> Result<(DataSpec, Source)> {
    let spec = DataSpec::parse(text).context("invalid --data")?;
    let source = data::open(&spec).with_context(|| format!("cannot load dataset `{text}`"))?;
    Ok((spec, source))
}

/// Reads `--device`: `Some(true)` for CUDA, `Some(false)` for the CPU, `None` for
/// `auto`; rejects anything else.
fn parse_device(device: &str) -> Result<Option<bool>> {
    match device {
        "cpu" => Ok(Some(false)),
        "cuda" | "cuda:0" => Ok(Some(true)),
        "auto" => Ok(None),
        other if other.starts_with("cuda:") => bail!(
            "--device {other}: only the first GPU (cuda:0) is supported; \
             choose it with CUDA_VISIBLE_DEVICES"
        ),
        other => bail!("--device {other} is not a device; use cpu, cuda, cuda:0 or auto"),
    }
}

fn config_from(spec: &NetSpec, args: &TrainOptions, quiet: bool) -> Result<TrainConfig> {
    Ok(TrainConfig {
        epochs: args.epochs.unwrap_or(spec.train.epochs),
        batch: args.batch.unwrap_or(spec.train.batch),
        lr: args.lr.unwrap_or(spec.train.lr),
        schedule: schedule_from(spec.train.schedule, args.schedule, args.lr_decay)?,
        seed: args.seed,
        crop_padding: spec.train.crop_padding,
        flip: spec.train.flip,
        max_steps: args.max_steps,
        show_progress: !quiet,
    })
}

/// Rejects `--batch`, `--lr`, `--schedule` and `--lr-decay` values that differ
/// from the settings a resumed run saved in `checkpoint`.
fn check_unchanged(args: &TrainOptions, saved: &TrainConfig, checkpoint: &Path) -> Result<()> {
    let schedule = schedule_from(saved.schedule, args.schedule, args.lr_decay)?;
    let changed = [
        ("--batch", args.batch.is_some_and(|b| b != saved.batch)),
        ("--lr", args.lr.is_some_and(|lr| lr != saved.lr)),
        ("--schedule or --lr-decay", schedule != saved.schedule),
    ];
    match changed.iter().find(|(_, differs)| *differs) {
        Some((flag, _)) => bail!(
            "{flag} differs from the setting saved in {}, and a resumed run continues with \
             its saved settings; drop {flag}, or start a new run with --out",
            checkpoint.display()
        ),
        None => Ok(()),
    }
}

/// Returns the schedule that `--schedule` and `--lr-decay` select, or the file's.
fn schedule_from(
    file: LrSchedule,
    flag: Option<Schedule>,
    decay: Option<f64>,
) -> Result<LrSchedule> {
    let file_decay = match file {
        LrSchedule::Exponential { decay } => Some(decay),
        _ => None,
    };
    let schedule = match flag {
        Some(Schedule::Step) => LrSchedule::Step,
        Some(Schedule::Cosine) => LrSchedule::Cosine,
        Some(Schedule::Constant) => LrSchedule::Constant,
        Some(Schedule::Exponential) => LrSchedule::Exponential {
            decay: decay.or(file_decay).context(
                "--schedule exponential needs --lr-decay RATE, the factor applied to the \
                 learning rate after each epoch, e.g. --lr-decay 0.995",
            )?,
        },
        None => match (file, decay) {
            (LrSchedule::Exponential { .. }, Some(decay)) => LrSchedule::Exponential { decay },
            _ => file,
        },
    };
    match (schedule, decay) {
        (LrSchedule::Exponential { decay }, _) if !(decay > 0.0 && decay <= 1.0) => {
            bail!("invalid --lr-decay {decay}: it must be in (0, 1], e.g. 0.995")
        }
        (LrSchedule::Exponential { .. }, _) | (_, None) => Ok(schedule),
        (_, Some(_)) => bail!(
            "--lr-decay applies only to the exponential schedule; \
             add --schedule exponential or drop --lr-decay"
        ),
    }
}

/// A run folder's checkpoint, read once for resuming: the spec, configuration
/// and position stored with it, and its tensors.
struct Resumed {
    checkpoint: PathBuf,
    spec: NetSpec,
    config: TrainConfig,
    start: Position,
    tensors: checkpoint::Tensors,
}

/// Returns the run folder that `--resume` names: the folder itself, or the
/// parent of a run's `checkpoint.safetensors`. Rejects other files, and
/// exports, which lack the optimizer state and unfolded batch norms that
/// training needs.
fn resume_folder(argument: &Path) -> Result<PathBuf> {
    // `subject` names the export: the file passed, or the run folder's checkpoint.
    let export_error = |subject: String| {
        anyhow::anyhow!(
            "--resume {subject} is an export of evaluation-only tensors, written by \
             `ldnc export`, and cannot be resumed; resume from the run folder that `ldnc train` \
             wrote"
        )
    };
    if argument.is_dir() {
        let checkpoint = RunFiles {
            dir: argument.to_path_buf(),
        }
        .checkpoint();
        if export::is_export(&checkpoint) {
            let subject = format!("{}: its checkpoint.safetensors", argument.display());
            return Err(export_error(subject));
        }
        return Ok(argument.to_path_buf());
    }
    if !argument.exists() {
        bail!(
            "--resume {}: the folder does not exist; pass the --out folder of the run to continue",
            argument.display()
        );
    }
    if export::is_export(argument) {
        return Err(export_error(argument.display().to_string()));
    }
    let parent = argument.parent().unwrap_or(Path::new(""));
    let run = RunFiles {
        dir: parent.to_path_buf(),
    };
    if run.checkpoint() != argument {
        bail!(
            "--resume {} is a file, not a run folder; pass the --out folder of the run to \
             continue, which contains its checkpoint.safetensors",
            argument.display()
        );
    }
    // A bare `checkpoint.safetensors` has an empty parent: the current folder.
    if parent.as_os_str().is_empty() {
        return Ok(PathBuf::from("."));
    }
    Ok(run.dir)
}

/// Reads the checkpoint in the run folder `dir` and applies the flags that may
/// change on resuming: `--epochs`, `--max-steps` and `-q`.
fn resume_settings(
    source: &NetSource,
    args: &TrainOptions,
    dir: &Path,
    quiet: bool,
) -> Result<Resumed> {
    let path = RunFiles {
        dir: dir.to_path_buf(),
    }
    .checkpoint();
    let (tensors, meta) =
        checkpoint::load(&path).with_context(|| format!("cannot resume from {}", dir.display()))?;
    let spec: NetSpec = serde_json::from_str(&meta.spec_json)
        .with_context(|| format!("the spec stored in {} is unreadable", path.display()))?;
    if source.spec.with_overrides(&[])? != spec {
        bail!(
            "{} was trained with a different network than {} ({}); resume with the same \
             network file and --set flags, or the same compiled executable",
            path.display(),
            source.origin.display(),
            describe_difference(&spec, &source.spec)
        );
    }
    let mut config: TrainConfig = serde_json::from_str(&meta.config_json).with_context(|| {
        format!(
            "the configuration stored in {} is unreadable",
            path.display()
        )
    })?;
    check_unchanged(args, &config, &path)?;
    if let Some(epochs) = args.epochs {
        config.epochs = epochs;
    }
    config.max_steps = args.max_steps;
    config.show_progress = !quiet;
    let start = Position {
        epoch: meta.epoch,
        step: meta.step,
    };
    if start.epoch >= config.epochs {
        bail!(
            "the run in {} has already completed {} (the target is {}); to continue it, pass \
             --epochs M with M larger than {}",
            dir.display(),
            plural(start.epoch, "epoch"),
            config.epochs,
            start.epoch
        );
    }
    Ok(Resumed {
        checkpoint: path,
        spec,
        config,
        start,
        tensors,
    })
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A checkpoint written by `ldnc train` (a file, or the run folder), or an
    /// export written by `ldnc export`.
    pub checkpoint: PathBuf,
    /// Dataset to evaluate on (its test split).
    #[arg(long)]
    pub data: String,
    /// Images per evaluation batch.
    #[arg(long, default_value_t = 100, value_parser = super::parse_count)]
    pub batch: usize,
    #[arg(long, value_enum, default_value = "fast")]
    pub kernels: Kernels,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Evaluate with the unfused program, compiled afresh from the network
    /// stored in the checkpoint (batch norms and ReLUs run as separate ops).
    #[arg(long)]
    pub no_fuse: bool,
}

pub fn run_eval(args: &EvalArgs) -> Result<()> {
    evaluate(args, None)
}

/// Evaluates a checkpoint. A compiled network executable passes its path and
/// programs as `embedded`, and the checkpoint must come from that network.
pub fn evaluate(args: &EvalArgs, embedded: Option<(&Path, &CompiledNet)>) -> Result<()> {
    let path = checkpoint_file(&args.checkpoint)?;
    if export::is_export(&path) {
        return evaluate_export(args, &path);
    }
    let loaded = load_checkpoint(&path, embedded, args.no_fuse, "evaluate", "ldnc eval")?;
    let (tensors, spec, compiled) = (loaded.tensors, loaded.spec, loaded.net);
    let (data_spec, source_data) = open_data(&args.data)?;
    let data = Data::from(&source_data);
    let mut session = Session::new(compiled, args.batch, args.kernels.into(), 0)?;
    checkpoint::restore(&path, &mut session.store, tensors)?;
    // The crop padding and flip only shape training batches, never evaluation.
    let pipeline = Pipeline::for_dataset(data_spec.kind, spec.input, 0, false)?;
    session
        .check_data(data, &pipeline)
        .map_err(|error| unfit_data(error, &path, data))?;
    let evaluation = session.evaluate(data, &pipeline.eval, args.batch)?;
    let source = EvalSource {
        path: &path,
        export: false,
        fused: !args.no_fuse,
    };
    report_evaluation(args, &source, &spec, data, &pipeline, &evaluation)
}

/// A checkpoint's tensors, metadata and network, with the programs to run it.
pub struct LoadedCheckpoint {
    pub tensors: checkpoint::Tensors,
    pub meta: checkpoint::Meta,
    pub spec: NetSpec,
    pub net: CompiledNet,
}

/// Loads the checkpoint at `path` and the programs of its network: those of
/// `embedded`, a compiled network executable's path and programs, when fusion
/// is on, and otherwise compiled afresh from the spec in the checkpoint. A
/// checkpoint of another network than the embedded one is rejected, naming
/// the fields that differ, with advice to `verb` it with `command` instead.
pub fn load_checkpoint(
    path: &Path,
    embedded: Option<(&Path, &CompiledNet)>,
    no_fuse: bool,
    verb: &str,
    command: &str,
) -> Result<LoadedCheckpoint> {
    let (tensors, meta) = checkpoint::load(path)?;
    let spec: NetSpec = serde_json::from_str(&meta.spec_json)
        .with_context(|| format!("the spec stored in {} is unreadable", path.display()))?;
    let options = CompileOptions {
        fuse: !no_fuse,
        ..CompileOptions::default()
    };
    let net = match embedded {
        Some((exe, compiled)) if compiled.spec != spec => bail!(
            "{} was trained with a different network than the `{}` compiled into {} ({}); \
             {verb} it with `{command}` or with the executable that trained it",
            path.display(),
            compiled.spec.name,
            exe.display(),
            describe_difference(&spec, &compiled.spec)
        ),
        Some((_, compiled)) if !no_fuse => compiled.clone(),
        _ => compile(&spec, options)?,
    };
    Ok(LoadedCheckpoint {
        tensors,
        meta,
        spec,
        net,
    })
}

/// The file an evaluation ran from and the program it ran.
struct EvalSource<'a> {
    path: &'a Path,
    /// An export that `ldnc export` wrote, rather than a checkpoint.
    export: bool,
    /// Whether the program was the fused one.
    fused: bool,
}

/// Rewords a dataset that does not fit the network for evaluation, where the
/// network is fixed by the file at `path`, so the training advice to change
/// the network file does not apply.
fn unfit_data(error: train::TrainError, path: &Path, data: Data) -> anyhow::Error {
    match error {
        train::TrainError::InputShape { got, expected } => anyhow!(
            "the network in {} takes {expected} images, but {} has {got} images; evaluate it on \
             a dataset of {expected} images",
            path.display(),
            data.name()
        ),
        train::TrainError::Classes { got, expected } => anyhow!(
            "the network in {} predicts {expected} classes, but {} has {got}; evaluate it on a \
             dataset with {expected} classes",
            path.display(),
            data.name()
        ),
        other => other.into(),
    }
}

/// Prints an evaluation as a table, or as one JSON object with `--json`.
fn report_evaluation(
    args: &EvalArgs,
    source: &EvalSource,
    spec: &NetSpec,
    data: Data,
    pipeline: &Pipeline,
    evaluation: &Evaluation,
) -> Result<()> {
    let segmentation = data.is_segmentation();
    let (file_key, program) = match (source.export, source.fused) {
        (true, _) => ("export", "export"),
        (false, true) => ("checkpoint", "fused"),
        (false, false) => ("checkpoint", "unfused"),
    };
    let mut result = serde_json::json!({
        file_key: source.path.display().to_string(),
        "network": spec.name,
        "dataset": data.name(),
        "evaluated_on": pipeline.eval.describe(),
        "loss": evaluation.loss,
        "fused": source.fused,
        "program": program,
    });
    let fields = if segmentation {
        segmentation_json(&evaluation.confusion, data.class_names())
    } else {
        classification_json(evaluation)
    };
    result
        .as_object_mut()
        .expect("the result is a JSON object")
        .extend(fields);
    if evaluation.skipped > 0 {
        result["skipped_images"] = evaluation.skipped.into();
    }

    let mut out = io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&result)?)?;
        return Ok(());
    }
    print_evaluation(&mut out, &spec.name, data, pipeline, evaluation)?;
    Ok(())
}

/// Returns the checkpoint file that `argument` names: the file itself, or the
/// checkpoint of a run folder.
pub fn checkpoint_file(argument: &Path) -> Result<PathBuf> {
    if !argument.exists() {
        bail!(
            "{} does not exist; pass the checkpoint.safetensors that `ldnc train` wrote, or its \
             run folder",
            argument.display()
        );
    }
    if !argument.is_dir() {
        return Ok(argument.to_path_buf());
    }
    let checkpoint = RunFiles {
        dir: argument.to_path_buf(),
    }
    .checkpoint();
    if !checkpoint.exists() {
        bail!(
            "the folder {} has no {}; pass the --out folder of a run that `ldnc train` \
             finished at least one epoch of, or a checkpoint file",
            argument.display(),
            checkpoint
                .file_name()
                .map(|name| name.to_string_lossy())
                .unwrap_or_default()
        );
    }
    Ok(checkpoint)
}

/// Evaluates an export that `ldnc export` wrote: its frozen program runs as
/// stored, so `--no-fuse` does not apply.
fn evaluate_export(args: &EvalArgs, path: &Path) -> Result<()> {
    let loaded = export::load(path)?;
    if args.no_fuse && loaded.fused {
        bail!(
            "{} is an export of the fused program, fixed when it was written, so --no-fuse \
             cannot apply; export the checkpoint with `ldnc export --no-fuse`, or evaluate the \
             checkpoint itself with --no-fuse",
            path.display()
        );
    }
    let spec = loaded.spec;
    let (data_spec, source_data) = open_data(&args.data)?;
    let data = Data::from(&source_data);
    let pipeline = Pipeline::for_dataset(data_spec.kind, spec.input, 0, false)?;
    check_data(&spec, data, &pipeline).map_err(|error| unfit_data(error, path, data))?;
    let evaluation = evaluate_frozen(
        &spec,
        loaded.frozen,
        args.kernels.into(),
        data,
        &pipeline.eval,
        args.batch,
    )?;
    let source = EvalSource {
        path,
        export: true,
        fused: loaded.fused,
    };
    report_evaluation(args, &source, &spec, data, &pipeline, &evaluation)
}

/// Collects the JSON fields of a classification evaluation.
fn classification_json(evaluation: &Evaluation) -> serde_json::Map<String, serde_json::Value> {
    let confusion = &evaluation.confusion;
    let fields = serde_json::json!({
        "images": confusion.total(),
        "top1_accuracy": confusion.accuracy(),
        "top1_error": 1.0 - confusion.accuracy(),
        "top5_accuracy": confusion.top5_accuracy(),
        "top5_error": 1.0 - confusion.top5_accuracy(),
    });
    match fields {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("json! of an object literal is an object"),
    }
}

/// Collects the JSON fields of a segmentation evaluation. `iou` maps each
/// class name to its IoU, or to null for a class neither labelled nor predicted.
fn segmentation_json(
    confusion: &Confusion,
    class_names: &[String],
) -> serde_json::Map<String, serde_json::Value> {
    let iou: serde_json::Map<String, serde_json::Value> = class_names
        .iter()
        .zip(confusion.class_iou())
        .map(|(name, iou)| (name.clone(), iou.into()))
        .collect();
    let fields = serde_json::json!({
        "pixels": confusion.total(),
        "pixel_accuracy": confusion.accuracy(),
        "mean_iou": confusion.mean_iou(),
        "iou": iou,
    });
    match fields {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("json! of an object literal is an object"),
    }
}

/// Prints an evaluation for a reader: one summary line, and for segmentation
/// the IoU of every class.
fn print_evaluation(
    out: &mut impl Write,
    network: &str,
    data: Data,
    pipeline: &Pipeline,
    evaluation: &Evaluation,
) -> io::Result<()> {
    let confusion = &evaluation.confusion;
    writeln!(
        out,
        "{network} on {} test split ({}), loss {:.4}",
        data.name(),
        pipeline.eval.describe(),
        evaluation.loss
    )?;
    if evaluation.skipped > 0 {
        writeln!(out, "undecodable images skipped: {}", evaluation.skipped)?;
    }
    if !data.is_segmentation() {
        writeln!(
            out,
            "{} images: top-1 accuracy {:.2}% (error {:.2}%), top-5 accuracy {:.2}% (error \
             {:.2}%)",
            confusion.total(),
            100.0 * confusion.accuracy(),
            100.0 * (1.0 - confusion.accuracy()),
            100.0 * confusion.top5_accuracy(),
            100.0 * (1.0 - confusion.top5_accuracy())
        )?;
        return Ok(());
    }

    let width = data
        .class_names()
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max("class".len());
    writeln!(out, "{:<width$}  IoU", "class")?;
    for (name, iou) in data.class_names().iter().zip(confusion.class_iou()) {
        match iou {
            Some(iou) => writeln!(out, "{name:<width$}  {:6.2}%", 100.0 * iou)?,
            None => writeln!(
                out,
                "{name:<width$}       - (no pixels labelled or predicted)"
            )?,
        }
    }
    writeln!(
        out,
        "{} pixels: pixel accuracy {:.2}%, mean IoU {:.2}%",
        confusion.total(),
        100.0 * confusion.accuracy(),
        100.0 * confusion.mean_iou()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE_DECAY: LrSchedule = LrSchedule::Exponential { decay: 0.995 };

    #[test]
    fn flag_overrides_file_schedule() {
        let cosine = schedule_from(FILE_DECAY, Some(Schedule::Cosine), None).unwrap();
        assert_eq!(cosine, LrSchedule::Cosine);
        let kept = schedule_from(LrSchedule::Step, None, None).unwrap();
        assert_eq!(kept, LrSchedule::Step);
    }

    #[test]
    fn exponential_decay_flag_then_file() {
        let flag = schedule_from(LrSchedule::Step, Some(Schedule::Exponential), Some(0.9));
        assert_eq!(flag.unwrap(), LrSchedule::Exponential { decay: 0.9 });
        let file = schedule_from(FILE_DECAY, Some(Schedule::Exponential), None);
        assert_eq!(file.unwrap(), FILE_DECAY);
        let decay_only = schedule_from(FILE_DECAY, None, Some(0.5));
        assert_eq!(decay_only.unwrap(), LrSchedule::Exponential { decay: 0.5 });
    }

    #[test]
    fn bad_decay_flags_rejected() {
        let missing = schedule_from(LrSchedule::Step, Some(Schedule::Exponential), None);
        assert!(missing.unwrap_err().to_string().contains("--lr-decay RATE"));
        let range = schedule_from(LrSchedule::Step, Some(Schedule::Exponential), Some(1.5));
        assert!(range.unwrap_err().to_string().contains("(0, 1]"));
        let stray = schedule_from(LrSchedule::Cosine, None, Some(0.9));
        assert!(stray
            .unwrap_err()
            .to_string()
            .contains("--schedule exponential"));
    }
}
