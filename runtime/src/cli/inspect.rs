//! `ldnc inspect`: the analyses of a network as a table or JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ldnc_ir::analysis::Report;
use ldnc_ir::{expand, Mode};

use super::compile::{compile, CompileOptions};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Network file (RON).
    pub net: PathBuf,
    /// Override a field of the network file, e.g. `--set growth=16`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    /// Batch size for the activation-memory figures.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Draw the connection matrix (PNG or SVG, by extension).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let spec = super::load_spec(&args.net, &args.set)?;
    let net = expand(&spec, Mode::Train)
        .with_context(|| format!("cannot expand network {}", args.net.display()))?;
    let mut report = Report::new(&spec, &net, args.batch)?;
    match compile(&spec, CompileOptions::default()) {
        Ok(compiled) => {
            report.memory.planned_bytes = compiled.train.buffer_bytes(args.batch);
            report.memory.planned_source = "memory plan of the training program".into();
        }
        Err(e) => tracing::warn!("no memory plan: {e:#}"),
    }
    if let Some(path) = &args.plot {
        ldnc_runtime::plot::connection_matrix(&net.features, path)
            .with_context(|| format!("cannot draw {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_table(&report);
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print_table(r: &Report) {
    println!("network          {}", r.name);
    println!("feature layers   {}", r.feature_layers);
    println!("connections      {}", r.connections);
    println!(
        "MBD              {} (from x{} to x{})",
        r.mbd, r.mbd_pair[0], r.mbd_pair[1]
    );
    println!("parameters       {}", r.params);
    println!("MACs per image   {:.3} G", r.macs_per_image as f64 / 1e9);
    println!(
        "activations      naive {}  planned {}  (training step, batch {})",
        mib(r.memory.naive_bytes),
        mib(r.memory.planned_bytes),
        r.memory.batch
    );
    println!("graph nodes      {}", r.graph_nodes);
    println!("blocks");
    for (b, block) in r.blocks.iter().enumerate() {
        println!(
            "  {b}: {:>3} layers from x{:<4} at {}x{}",
            block.layers, block.first_layer, block.height, block.width
        );
    }
}
