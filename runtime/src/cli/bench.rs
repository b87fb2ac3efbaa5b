//! `ldnc bench`: training-step throughput and memory of a network on random
//! data of the network's input shape.
//!
//! Memory figures: the bytes of the executor's planned buffers (activations,
//! gradients and temporaries of one training step), the bytes of the parameter
//! store (parameters, running statistics, velocities), and the process's peak
//! resident set (`VmHWM` in /proc/self/status on Linux), which also counts code,
//! the allocator and kernel scratch space.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ldnc_runtime::exec::StepParams;
use ldnc_runtime::train::Session;
use serde::Serialize;

use super::compile::{compile, CompileOptions};
use super::train::Kernels;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Network file (RON).
    pub net: PathBuf,
    /// Override a field of the network file, e.g. `--set growth=16`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    /// Images per training step.
    #[arg(long, default_value_t = 64, value_parser = super::parse_count)]
    pub batch: usize,
    /// Timed training steps (after one warm-up step).
    #[arg(long, default_value_t = 5, value_parser = super::parse_count)]
    pub steps: usize,
    #[arg(long, value_enum, default_value = "fast")]
    pub kernels: Kernels,
    /// Benchmark the unfused program.
    #[arg(long)]
    pub no_fuse: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also print the time spent per op (CPU only).
    #[arg(long)]
    pub profile: bool,
    /// Device for the training steps: `cpu` or `cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Serialize)]
struct BenchResult {
    network: String,
    device: String,
    fused: bool,
    batch: usize,
    steps: usize,
    seconds_per_step: f64,
    images_per_second: f64,
    buffer_bytes: u64,
    store_bytes: u64,
    peak_rss_bytes: Option<u64>,
    threads: usize,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let spec = super::load_spec(&args.net, &args.set)?;
    let options = CompileOptions {
        fuse: !args.no_fuse,
        ..CompileOptions::default()
    };
    let compiled = compile(&spec, options)?;
    let mut session = Session::new(compiled, args.batch, args.kernels.into(), 0)?;
    match args.device.as_str() {
        "cpu" => {}
        "cuda" | "cuda:0" => session
            .use_cuda(args.batch)
            .with_context(|| format!("cannot benchmark on `{}`", args.device))?,
        other => anyhow::bail!("--device {other} is not a device; use cpu or cuda"),
    }

    let input = spec.input;
    let n = args.batch;
    let image_len = n * input.height * input.width * input.channels;
    let images: Vec<f32> = (0..image_len)
        .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
        .collect();
    let label_len = match spec.task {
        ldnc_ir::spec::Task::Classification => n,
        ldnc_ir::spec::Task::Segmentation { .. } => n * input.height * input.width,
    };
    let labels: Vec<f32> = (0..label_len).map(|i| (i % spec.classes) as f32).collect();
    let params = |step: usize| StepParams {
        lr: 0.01,
        seed: step as u64,
    };

    session
        .train_step(&images, &labels, n, params(0))
        .context("warm-up step failed")?;
    if args.profile {
        session.enable_profile();
    }
    let started = Instant::now();
    for step in 0..args.steps {
        session.train_step(&images, &labels, n, params(step + 1))?;
    }
    let seconds = started.elapsed().as_secs_f64() / args.steps as f64;

    let store_bytes: u64 = session
        .store
        .entries
        .values()
        .map(|e| 4 * e.data.len() as u64)
        .sum();
    let result = BenchResult {
        network: spec.name.clone(),
        device: args.device.clone(),
        fused: options.fuse,
        batch: n,
        steps: args.steps,
        seconds_per_step: seconds,
        images_per_second: n as f64 / seconds,
        buffer_bytes: session.train_buffer_bytes(),
        store_bytes,
        peak_rss_bytes: peak_rss(),
        threads: rayon::current_num_threads(),
    };
    let mut out = io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&result)?)?;
        return Ok(());
    }
    if args.profile {
        writeln!(out, "{:<34} {:>7} {:>10}", "op", "calls", "seconds")?;
        for (op, calls, seconds) in session.profile() {
            writeln!(out, "{op:<34} {calls:>7} {seconds:>10.4}")?;
        }
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    writeln!(
        out,
        "{} ({}, {}), batch {}, {} threads",
        result.network,
        if result.fused { "fused" } else { "unfused" },
        result.device,
        result.batch,
        result.threads
    )?;
    writeln!(
        out,
        "  {:.1} images/s ({:.3} s per step over {})",
        result.images_per_second,
        result.seconds_per_step,
        super::plural(result.steps, "step")
    )?;
    writeln!(
        out,
        "  planned buffers {:.1} MiB, parameter store {:.1} MiB, peak RSS {}",
        mib(result.buffer_bytes),
        mib(result.store_bytes),
        result
            .peak_rss_bytes
            .map(|b| format!("{:.1} MiB", mib(b)))
            .unwrap_or_else(|| "unknown".into())
    )?;
    Ok(())
}

/// Peak resident set size of this process, where the OS reports it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
