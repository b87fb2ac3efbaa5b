//! `ldnc build`: compiles a network into a standalone training executable, and
//! the command line that such an executable offers when it runs.
//!
//! The executable is a byte copy of the running `ldnc` with the compiled
//! network appended as a payload (see `payload.rs` for the layout). At startup,
//! `main` looks for that payload. When it finds one, the program runs as the
//! network's executable. It offers `train`, `eval` and `inspect` with `ldnc`'s
//! flags minus the network file and `--set`, because the network is fixed.
//!
//! Builds are reproducible: the output depends only on the `ldnc` binary, the
//! network file, the `--set` flags and `--target`, never on time, paths or
//! hash-map order. The file is written to a temporary name in the destination
//! folder, checked by reading its payload back, and renamed into place, so a
//! failed build leaves any earlier file untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use ldnc_ir::program::{CompiledNet, Program, Storage};
use ldnc_ir::spec::NetSpec;
use ldnc_ir::{Graph, Role};
use ldnc_passes::fuse::FuseReport;
use ldnc_passes::{memory, pipeline};

use super::compile::{compile_with_report, CompileOptions};
use super::export::{self, ExportArgs};
use super::inspect::{self, InspectOptions};
use super::train::{self, EvalArgs, NetSource, TrainOptions};
use crate::payload::{self, CudaModule, Payload, Target, PAYLOAD_FORMAT_VERSION};

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Network file (RON).
    pub net: PathBuf,
    /// Override a field of the network file, e.g. `--set growth=16`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    /// Output executable, or a folder to write it into (default: the
    /// network's name in the current folder).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Backends to compile for. The CPU programs are always included.
    #[arg(long, value_enum, default_value = "cpu")]
    pub target: TargetArg,
    /// Also write, next to the output: `graph` (the expanded forward graph and
    /// the fused training graph as Graphviz DOT), `program` (the scheduled training program as text),
    /// `cuda` (the CUDA C of the training and evaluation kernels).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "WHAT")]
    pub emit: Vec<Emit>,
    /// Print what each pipeline stage produced: node counts, steps, buffers and
    /// planned against naive activation memory.
    #[arg(long)]
    pub explain: bool,
    /// Compile the unfused programs.
    #[arg(long)]
    pub no_fuse: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    /// CPU programs only.
    Cpu,
    /// CUDA kernels (CUDA C, and PTX for sm_80 when NVRTC can be loaded).
    Cuda,
    /// CPU programs and CUDA kernels.
    All,
}

impl From<TargetArg> for Target {
    fn from(target: TargetArg) -> Target {
        match target {
            TargetArg::Cpu => Target::Cpu,
            TargetArg::Cuda => Target::Cuda,
            TargetArg::All => Target::All,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Emit {
    /// `NAME.forward.dot` and `NAME.train.dot`.
    Graph,
    /// `NAME.program.txt`.
    Program,
    /// `NAME.train.cu` and `NAME.eval.cu`.
    Cuda,
}

pub fn run_build(args: &BuildArgs, quiet: bool) -> Result<()> {
    let spec = super::load_spec(&args.net, &args.set)?;
    let output = output_path(args.output.as_deref(), &spec.name)?;
    let running = std::env::current_exe().context("cannot locate the running ldnc executable")?;
    for (protected, what) in [
        (&running, "the running ldnc"),
        (&args.net, "the network file"),
    ] {
        if same_file(&output, protected) {
            bail!(
                "output {} is {what}; choose another path with -o",
                output.display()
            );
        }
    }

    let options = CompileOptions {
        fuse: !args.no_fuse,
        ..CompileOptions::default()
    };
    let (compiled, fusion) = compile_with_report(&spec, options)
        .with_context(|| format!("cannot compile network {}", args.net.display()))?;
    let target = Target::from(args.target);
    let mut cuda_modules = Vec::new();
    if target.wants_cuda() || args.emit.contains(&Emit::Cuda) {
        match cuda_modules_of(&compiled, target.wants_cuda()) {
            Ok(modules) => cuda_modules = modules,
            Err(e) if target.wants_cuda() => {
                eprintln!(
                    "note: {} contains CPU programs only, because CUDA lowering failed: {e:#}",
                    output.display()
                );
            }
            Err(e) => return Err(e.context("cannot emit CUDA kernels")),
        }
    }
    let payload = Payload {
        ldnc_version: env!("CARGO_PKG_VERSION").to_string(),
        target,
        cuda_kernels: target.wants_cuda() && !cuda_modules.is_empty(),
        cuda_modules: if target.wants_cuda() {
            cuda_modules.clone()
        } else {
            Vec::new()
        },
        net: compiled,
    };
    let section = payload::encode(&payload)?;

    write_atomic(&output, true, |file| {
        let mut image = File::open(&running)?;
        io::copy(&mut image, file)?;
        file.write_all(&section)
    })
    .and_then(|()| check_written(&output, &payload))?;
    let mut out = io::stdout().lock();
    if !quiet {
        writeln!(
            out,
            "built {}: network {}, {} training steps, payload {:.1} KiB",
            output.display(),
            spec.name,
            payload.net.train.steps.len(),
            section.len() as f64 / 1024.0
        )?;
    }

    if args.explain || args.emit.contains(&Emit::Graph) {
        let stages = Stages::run(&spec, options)?;
        if args.explain {
            print_explanation(
                &mut out,
                &spec,
                &stages,
                &fusion,
                &payload.net,
                section.len(),
            )?;
        }
        if args.emit.contains(&Emit::Graph) {
            let title = &spec.name;
            let forward = dot(
                &stages.pipeline.expanded,
                &format!("{title} forward (as expanded)"),
            );
            let training = dot(&stages.pipeline.planned.graph, &format!("{title} training"));
            emit_file(&output, "forward.dot", &forward, quiet)?;
            emit_file(&output, "train.dot", &training, quiet)?;
        }
    }
    if args.emit.contains(&Emit::Cuda) {
        for module in &cuda_modules {
            emit_file(
                &output,
                &format!("{}.cu", module.program),
                &module.source,
                quiet,
            )?;
        }
    }
    if args.emit.contains(&Emit::Program) {
        let text = program_text(
            &payload.net.train,
            &format!("{} training program", spec.name),
        );
        emit_file(&output, "program.txt", &text, quiet)?;
    }
    Ok(())
}

/// Resolves the output file: `-o` as given, the network's name inside `-o`
/// when that is a folder, or the network's name in the current folder.
fn output_path(requested: Option<&Path>, network: &str) -> Result<PathBuf> {
    if let Some(path) = requested {
        if !path.is_dir() {
            return Ok(path.to_path_buf());
        }
    }
    let invalid = network.is_empty()
        || network == "."
        || network == ".."
        || network.contains(['/', '\\', '\0']);
    if invalid {
        bail!(
            "the network name `{network}` is not a valid file name for the executable; \
             choose the output with -o FILE"
        );
    }
    let name = format!("{network}{}", std::env::consts::EXE_SUFFIX);
    Ok(match requested {
        Some(folder) => folder.join(name),
        None => PathBuf::from(name),
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Writes `path` through a temporary file in its folder, which `fill` writes
/// and a rename then moves over `path`, so readers never see a partial file.
/// On failure the temporary file is removed and `path` is left as it was.
fn write_atomic(
    path: &Path,
    executable: bool,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<()> {
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .with_context(|| format!("output {} has no file name; pass -o FILE", path.display()))?;
    let temporary = folder.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let mut file = File::create(&temporary).with_context(|| {
        format!(
            "cannot write {}: cannot create a file in {}; check that the folder exists and is \
             writable, or choose another output with -o",
            path.display(),
            folder.display()
        )
    })?;

    let written = fill(&mut file)
        .and_then(|()| file.sync_all())
        .and_then(|()| set_mode(&temporary, executable))
        .and_then(|()| fs::rename(&temporary, path));
    if let Err(error) = written {
        // The write already failed; a leftover temporary file is the lesser problem.
        let _ = fs::remove_file(&temporary);
        return Err(error).with_context(|| {
            format!(
                "cannot write {} (through {}); check free space and permissions there",
                path.display(),
                temporary.display()
            )
        });
    }
    Ok(())
}

#[cfg(unix)]
fn set_mode(path: &Path, executable: bool) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if executable { 0o755 } else { 0o644 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _executable: bool) -> io::Result<()> {
    Ok(())
}

/// Reads the payload back from the finished executable and compares it with
/// what was encoded, which catches a serialisation that does not round-trip
/// (for example a float that JSON cannot represent exactly).
fn check_written(path: &Path, expected: &Payload) -> Result<()> {
    let found = payload::read(path)
        .with_context(|| format!("cannot read back the executable {}", path.display()))?;
    if found.as_ref() != Some(expected) {
        bail!(
            "the payload read back from {} differs from the compiled network, so the \
             serialisation is lossy; this is a bug in ldnc, please report it with the network file",
            path.display()
        );
    }
    Ok(())
}

/// Writes `OUTPUT.suffix` next to the executable (the executable suffix, if
/// any, dropped from the name).
/// Lowers the training and evaluation programs to CUDA kernels and prints each
/// program's distinct kernels as one translation unit; with `ptx`, also compiles
/// it for sm_80 when NVRTC can be loaded.
fn cuda_modules_of(compiled: &CompiledNet, ptx: bool) -> Result<Vec<CudaModule>> {
    use ldnc_codegen::cuda::{lower, nvrtc, print};
    let mut modules = Vec::new();
    for (name, program) in [("train", &compiled.train), ("eval", &compiled.eval)] {
        let steps = lower::lower_program(program)
            .with_context(|| format!("lowering the {name} program to CUDA"))?;
        // Kernels are keyed by their text, so a kernel shared by several steps is
        // printed once; a name used by two different kernels gets a suffix.
        let mut seen = std::collections::BTreeSet::new();
        let mut names: std::collections::BTreeMap<String, usize> = Default::default();
        let mut kernels = Vec::new();
        for launch in steps.iter().flat_map(|s| s.launches.iter()) {
            if !seen.insert(print::print_kernel(&launch.kernel)) {
                continue;
            }
            let mut kernel = launch.kernel.clone();
            let uses = names.entry(kernel.name.clone()).or_default();
            if *uses > 0 {
                kernel.name = format!("{}_{uses}", kernel.name);
            }
            *uses += 1;
            kernels.push(kernel);
        }
        let refs: Vec<&ldnc_codegen::cuda::kernel::Kernel> = kernels.iter().collect();
        let source = print::print_module(&refs);
        let (ptx, ptx_arch) = if ptx && nvrtc::available().is_ok() {
            let arch = nvrtc::Arch::Sm80;
            let text = nvrtc::compile_source(name, &source, arch)
                .with_context(|| format!("compiling the {name} kernels with NVRTC"))?;
            (Some(text), Some(arch.to_string()))
        } else {
            (None, None)
        };
        modules.push(CudaModule {
            program: name.to_string(),
            source,
            ptx,
            ptx_arch,
        });
    }
    Ok(modules)
}

fn emit_file(output: &Path, suffix: &str, text: &str, quiet: bool) -> Result<()> {
    let name = output
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(std::env::consts::EXE_SUFFIX)
        .filter(|stem| !stem.is_empty())
        .unwrap_or(&name);
    let path = output.with_file_name(format!("{stem}.{suffix}"));
    write_atomic(&path, false, |file| file.write_all(text.as_bytes()))?;
    if !quiet {
        writeln!(io::stdout(), "wrote {}", path.display())?;
    }
    Ok(())
}

/// The graphs between the spec and the training program that `--emit graph`
/// and `--explain` show, with the naive plan of the training graph.
struct Stages {
    pipeline: pipeline::TrainingStages,
    naive_buffers: Vec<ldnc_ir::program::Buffer>,
}

impl Stages {
    fn run(spec: &NetSpec, options: CompileOptions) -> Result<Stages> {
        let pipeline =
            pipeline::training(spec, &options.into()).context("compiling the training program")?;
        let naive_buffers = memory::plan_naive(&pipeline.planned.graph).buffers;
        Ok(Stages {
            pipeline,
            naive_buffers,
        })
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print_explanation(
    out: &mut impl io::Write,
    spec: &NetSpec,
    stages: &Stages,
    fusion: &[FuseReport],
    net: &CompiledNet,
    payload_bytes: usize,
) -> io::Result<()> {
    let batch = spec.train.batch;
    let count = |graph: &Graph, role: Role| {
        graph
            .ids()
            .filter(|&id| graph.node(id).op.role() == role)
            .count()
    };
    let expanded = &stages.pipeline.expanded;
    let differentiated = &stages.pipeline.differentiated;

    writeln!(out, "pipeline of {}", spec.name)?;
    writeln!(
        out,
        "  expand      forward graph: {} nodes ({} parameters, {} state tensors)",
        expanded.len(),
        count(expanded, Role::Param),
        count(expanded, Role::State)
    )?;
    writeln!(
        out,
        "  autodiff    training graph: {} nodes ({} added for gradients and updates, {} of them \
         optimizer and running-statistics updates)",
        differentiated.len(),
        differentiated.len().saturating_sub(expanded.len()),
        count(differentiated, Role::Update)
    )?;
    print_fusion(out, fusion)?;
    print_fused_ops(out, stages, net)?;
    for (stage, program) in [("training", &net.train), ("evaluation", &net.eval)] {
        writeln!(
            out,
            "  schedule    {stage} program: {} steps over {} values in {} buffers",
            program.steps.len(),
            program.values.len(),
            program.buffers.len()
        )?;
    }

    let naive: u64 = stages
        .naive_buffers
        .iter()
        .map(|buffer| 4 * buffer.numel(batch) as u64)
        .sum();
    let planned = net.train.buffer_bytes(batch);
    writeln!(
        out,
        "  memory      training activations at batch {batch}: naive {} (one buffer per value of the training graph), \
         planned {} ({:.1}% of naive)",
        mib(naive),
        mib(planned),
        100.0 * planned as f64 / naive.max(1) as f64
    )?;

    writeln!(
        out,
        "  payload     {:.1} KiB (zlib-compressed JSON), payload format {PAYLOAD_FORMAT_VERSION}",
        payload_bytes as f64 / 1024.0
    )?;
    Ok(())
}

/// Prints one line per fusion report: node counts, why saturation stopped and
/// how often each rule matched. The counts are applications that changed the
/// e-graph, summed over iterations, and extraction need not pick their
/// results, so they can exceed the fused steps that [`print_fused_ops`] reports.
fn print_fusion(out: &mut impl io::Write, fusion: &[FuseReport]) -> io::Result<()> {
    for (graph, report) in ["training", "evaluation"].iter().zip(fusion) {
        let applied: Vec<String> = report
            .applied
            .iter()
            .map(|(rule, times)| format!("{rule} x{times}"))
            .collect();
        writeln!(
            out,
            "  fuse        {graph} graph: {} -> {} nodes after {} ({}); rule matches: {}",
            report.nodes_before,
            report.nodes_after,
            super::plural(report.iterations, "iteration"),
            report.stop_reason,
            if applied.is_empty() {
                "no rewrites applied".to_string()
            } else {
                applied.join(", ")
            }
        )?;
        if !report.recomputed.is_empty() {
            writeln!(
                out,
                "  remat       {graph} graph: the backward pass recomputes {} instead of storing them",
                super::plural(report.recomputed.len(), "forward value")
            )?;
        }
    }
    Ok(())
}

/// Prints, for each program, the steps of ops that neither unfused graph
/// contains, which are the fused ops that extraction chose, counted by op.
fn print_fused_ops(out: &mut impl io::Write, stages: &Stages, net: &CompiledNet) -> io::Result<()> {
    let unfused: BTreeSet<&str> = [&stages.pipeline.expanded, &stages.pipeline.differentiated]
        .into_iter()
        .flat_map(|graph| graph.ids().map(|id| graph.node(id).op.name()))
        .collect();
    for (stage, program) in [("training", &net.train), ("evaluation", &net.eval)] {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for step in &program.steps {
            let name = step.op.name();
            if !unfused.contains(name) {
                *counts.entry(name).or_default() += 1;
            }
        }
        let listed: Vec<String> = counts
            .iter()
            .map(|(name, steps)| format!("{name} x{steps}"))
            .collect();
        writeln!(
            out,
            "  extract     {stage} program: fused steps: {}",
            if listed.is_empty() {
                "none".to_string()
            } else {
                listed.join(", ")
            }
        )?;
    }
    Ok(())
}

/// Renders a graph as Graphviz DOT: one box per node with its name, op and
/// type, and one edge per operand, labelled with the operand position when a
/// node has several.
fn dot(graph: &Graph, title: &str) -> String {
    let mut out = String::new();
    writeln!(out, "digraph \"{}\" {{", escape_dot(title)).expect("writing to a String");
    out.push_str("  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
    for id in graph.ids() {
        let node = graph.node(id);
        let style = match node.op.role() {
            Role::Param | Role::State | Role::OptState => ", style=filled, fillcolor=\"#e8e8e8\"",
            Role::Image | Role::Label => ", shape=ellipse",
            Role::Update => ", style=dashed",
            Role::Compute => "",
        };
        writeln!(
            out,
            "  n{} [label=\"{}\\n{} {}\"{style}];",
            id.index(),
            escape_dot(&node.name),
            node.op.name(),
            node.ty
        )
        .expect("writing to a String");
    }
    for id in graph.ids() {
        let inputs = graph.inputs(id);
        for (position, input) in inputs.iter().enumerate() {
            let label = if inputs.len() > 1 {
                format!(" [label=\"{position}\"]")
            } else {
                String::new()
            };
            writeln!(out, "  n{} -> n{}{label};", input.index(), id.index())
                .expect("writing to a String");
        }
    }
    out.push_str("}\n");
    out
}

fn escape_dot(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Renders a program as text: a header with its buffers, then one line per step with
/// the op, its operands, the output value and where that value is stored.
fn program_text(program: &Program, title: &str) -> String {
    let mut out = String::new();
    let value = |index: usize| {
        let value = &program.values[index];
        format!("%{index} {}", value.name)
    };
    let storage = |index: usize| match program.values[index].storage {
        Storage::Buffer(buffer) => format!("b{buffer}"),
        Storage::Persistent => "store".to_string(),
        Storage::Feed => "feed".to_string(),
    };

    writeln!(out, "# {title}, program format {}", program.format_version).expect("String");
    writeln!(
        out,
        "# {} steps, {} values, {} buffers; `store` is the parameter store, `feed` the data loader",
        program.steps.len(),
        program.values.len(),
        program.buffers.len()
    )
    .expect("String");
    for (index, buffer) in program.buffers.iter().enumerate() {
        let unit = if buffer.batched { " per image" } else { "" };
        let floats = super::plural(buffer.per_item, "float");
        writeln!(out, "# b{index}: {floats}{unit}").expect("String");
    }
    for (index, step) in program.steps.iter().enumerate() {
        let operands: Vec<String> = step.inputs.iter().map(|&input| value(input)).collect();
        writeln!(
            out,
            "{index:>5}  {:?}  ({})  -> {} {}  in {}",
            step.op,
            operands.join(", "),
            value(step.output),
            program.values[step.output].ty,
            storage(step.output)
        )
        .expect("String");
    }
    out
}

/// Command line of a compiled network executable.
#[derive(Debug, Parser)]
#[command(about = "Train, evaluate, export and inspect the network compiled into this executable")]
pub struct CompiledCli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// No progress bars or per-epoch lines.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    command: CompiledCommand,
}

#[derive(Debug, Subcommand)]
enum CompiledCommand {
    /// Print connections, MBD, parameters, MACs and activation memory of the network.
    Inspect(InspectOptions),
    /// Train the network on a dataset.
    Train(TrainOptions),
    /// Evaluate a checkpoint of the network, or an export, on a dataset's test split.
    Eval(EvalArgs),
    /// Write a checkpoint's evaluation program, with batch norms folded into convs, and its tensors to one file.
    Export(ExportArgs),
}

impl CompiledCli {
    /// Parses the process's arguments; help and `--version` name the network,
    /// the ldnc that built it and the payload format.
    pub fn parse_for(payload: &Payload) -> CompiledCli {
        // clap takes names and versions as `&'static str` unless its `string`
        // feature is on; these two strings live for the whole process anyway.
        let name: &'static str = Box::leak(payload.network().to_string().into_boxed_str());
        let version: &'static str = Box::leak(
            format!(
                "(built by ldnc {}, payload format {PAYLOAD_FORMAT_VERSION}, {})",
                payload.ldnc_version,
                if payload.cuda_kernels {
                    "CPU programs and CUDA kernels"
                } else {
                    "CPU programs, no CUDA kernels"
                }
            )
            .into_boxed_str(),
        );
        let matches = CompiledCli::command()
            .name(name)
            .version(version)
            .get_matches();
        CompiledCli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
    }
}

/// Runs a compiled network executable's subcommand on its embedded network.
pub fn run_compiled(cli: CompiledCli, exe: &Path, payload: &Payload) -> Result<()> {
    let net = &payload.net;
    match cli.command {
        CompiledCommand::Inspect(options) => {
            inspect::inspect_network(&net.spec, exe, Some(net), &options)
        }
        CompiledCommand::Train(options) => {
            let source = NetSource {
                spec: net.spec.clone(),
                origin: exe,
                compiled: Some(net),
                carries_cuda: payload.cuda_kernels,
            };
            train::train_network(&source, &options, cli.quiet)
        }
        CompiledCommand::Eval(args) => train::evaluate(&args, Some((exe, net))),
        CompiledCommand::Export(args) => export::export(&args, Some((exe, net))),
    }
}
