//! The `ldnc` command-line tool: inspect, train, evaluate, export and build
//! networks written as RON files.
//!
//! The same binary also runs as a compiled network executable: when its own
//! file ends with a payload written by `ldnc build`, it offers that network's
//! `train`, `eval`, `export` and `inspect` instead of `ldnc`'s commands.

mod cli;
mod cli_data;
use ldnc_runtime::payload;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ldnc",
    version,
    about = "Compile DenseNet-family networks from RON files and train them"
)]
struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// No progress bars or per-epoch lines.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print connections, MBD, parameters, MACs and activation memory of a network.
    Inspect(cli::inspect::InspectArgs),
    /// Train a network on a dataset.
    Train(cli::train::TrainArgs),
    /// Evaluate a checkpoint or an export on a dataset's test split.
    Eval(cli::train::EvalArgs),
    /// Write a checkpoint's evaluation program, with batch norms folded into convs, and its tensors to one file.
    Export(cli::export::ExportArgs),
    /// Compile a network into a standalone executable that trains, evaluates, exports and
    /// inspects it.
    Build(cli::build::BuildArgs),
    /// Look at a dataset: split sizes, classes, statistics, undecodable files.
    Data(cli_data::DataArgs),
    /// Time training steps and report memory of a network on random data.
    Bench(cli::bench::BenchArgs),
}

fn main() -> ExitCode {
    let result = match payload::read_current_exe() {
        Ok(Some((exe, payload))) => {
            let cli = cli::build::CompiledCli::parse_for(&payload);
            init_logging(cli.verbose);
            cli::build::run_compiled(cli, &exe, &payload)
        }
        Ok(None) => {
            let cli = Cli::parse();
            init_logging(cli.verbose);
            run(cli)
        }
        Err(error) => Err(error.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that closed stdout early, as `ldnc inspect NET | head -1` does,
        // took all the output it wanted, so the exit is quiet and successful.
        // The shell's status for a process killed by SIGPIPE (141) would fail
        // such pipelines under `set -o pipefail`.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Checks whether `error` comes from writing to a closed pipe.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(args) => cli::inspect::run(&args),
        Command::Train(args) => cli::train::run_train(&args, cli.quiet),
        Command::Eval(args) => cli::train::run_eval(&args),
        Command::Export(args) => cli::export::run(&args),
        Command::Build(args) => cli::build::run_build(&args, cli.quiet),
        Command::Data(args) => cli_data::run(args, cli.quiet),
        Command::Bench(args) => cli::bench::run(&args),
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LDNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour codes only go to a terminal, so logs redirected to a file stay plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
