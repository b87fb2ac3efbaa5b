//! The `ldnc` command-line tool: inspect, train and evaluate networks written as
//! RON files.

mod cli;
mod cli_data;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ldnc", version, about = "Compile DenseNet-family networks from RON files and train them")]
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
    /// Evaluate a checkpoint on a dataset's test split.
    Eval(cli::train::EvalArgs),
    /// Look at a dataset: split sizes, classes, statistics, undecodable files.
    Data(cli_data::DataArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LDNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        Command::Inspect(args) => cli::inspect::run(&args),
        Command::Train(args) => cli::train::run_train(&args, cli.quiet),
        Command::Eval(args) => cli::train::run_eval(&args),
        Command::Data(args) => cli_data::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
