//! `ldnc inspect`: the analyses of a network as a table or JSON.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ldnc_ir::analysis::Report;
use ldnc_ir::program::CompiledNet;
use ldnc_ir::spec::NetSpec;
use ldnc_ir::{expand, Mode};
use ldnc_passes::fuse::FuseReport;

use super::compile::{compile_with_report, CompileOptions};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Network file (RON).
    pub net: PathBuf,
    /// Override a field of the network file, e.g. `--set growth=16`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub options: InspectOptions,
}

/// Flags of `inspect` other than the network: `ldnc inspect` and the `inspect`
/// subcommand of a compiled network executable share them.
#[derive(Debug, Args)]
pub struct InspectOptions {
    /// Batch size for the activation-memory figures.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Draw the connection matrix (PNG or SVG, by extension).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Also report the fusion rules matched per graph and the values that
    /// rematerialisation recomputes.
    #[arg(long)]
    pub passes: bool,
    /// Report memory of the unfused program.
    #[arg(long)]
    pub no_fuse: bool,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let spec = super::load_spec(&args.net, &args.set)?;
    inspect_network(&spec, &args.net, None, &args.options)
}

/// Prints the report of `spec`. `origin` names the network file or executable
/// in messages; `compiled` supplies the memory plan when the programs exist
/// already, else the network is compiled here.
pub fn inspect_network(
    spec: &NetSpec,
    origin: &Path,
    compiled: Option<&CompiledNet>,
    args: &InspectOptions,
) -> Result<()> {
    let net = expand(spec, Mode::Train)
        .with_context(|| format!("cannot expand network {}", origin.display()))?;
    let mut report = Report::new(spec, &net, args.batch)?;
    let options = CompileOptions {
        fuse: !args.no_fuse,
        ..CompileOptions::default()
    };
    let mut passes = Vec::new();
    // Precompiled programs are fused and carry no fusion reports, so
    // `--no-fuse` and `--passes` compile afresh.
    let planned_bytes = match compiled {
        Some(compiled) if !args.no_fuse && !args.passes => {
            Ok(compiled.train.buffer_bytes(args.batch))
        }
        _ => compile_with_report(spec, options).map(|(compiled, reports)| {
            passes = reports;
            compiled.train.buffer_bytes(args.batch)
        }),
    };
    match planned_bytes {
        Ok(bytes) => {
            report.memory.planned_bytes = bytes;
            report.memory.planned_source = if options.fuse {
                "memory plan of the fused training program".into()
            } else {
                "memory plan of the unfused training program".into()
            };
        }
        Err(e) => tracing::warn!("no memory plan: {e:#}"),
    }
    if let Some(path) = &args.plot {
        ldnc_runtime::plot::connection_matrix(&net.features, path)
            .context("cannot draw the --plot file")?;
    }
    let mut out = io::stdout().lock();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        if args.passes {
            value["passes"] = serde_json::to_value(&passes)?;
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    print_table(&mut out, &report)?;
    if args.passes {
        print_passes(&mut out, &passes)?;
    }
    Ok(())
}

/// Prints what the fusion and rematerialisation passes did to each graph.
/// Rule matches count rewrites added to the e-graph over all iterations, and
/// extraction need not keep their results, so they are not fused steps.
fn print_passes(out: &mut impl Write, passes: &[FuseReport]) -> io::Result<()> {
    for (name, p) in ["training", "evaluation"].iter().zip(passes) {
        let fired: Vec<String> = p.applied.iter().map(|(r, n)| format!("{r} x{n}")).collect();
        let fired = if fired.is_empty() {
            "none".to_string()
        } else {
            fired.join(", ")
        };
        writeln!(
            out,
            "fusion ({name}): {} -> {} nodes, {} ({}), {:.2}s; rule matches, not fused steps \
             kept (`ldnc build --explain` lists those): {fired}",
            p.nodes_before,
            p.nodes_after,
            super::plural(p.iterations, "iteration"),
            p.stop_reason,
            p.seconds,
        )?;
        if !p.recomputed.is_empty() {
            writeln!(
                out,
                "rematerialisation ({name}): {} recomputed in the backward pass instead of \
                 stored",
                super::plural(p.recomputed.len(), "pooled transition input")
            )?;
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print_table(out: &mut impl Write, r: &Report) -> io::Result<()> {
    writeln!(out, "network          {}", r.name)?;
    writeln!(out, "feature layers   {}", r.feature_layers)?;
    writeln!(out, "connections      {}", r.connections)?;
    writeln!(
        out,
        "MBD              {} (from x{} to x{})",
        r.mbd, r.mbd_pair[0], r.mbd_pair[1]
    )?;
    writeln!(out, "parameters       {}", r.params)?;
    writeln!(
        out,
        "MACs per image   {:.3} G",
        r.macs_per_image as f64 / 1e9
    )?;
    writeln!(
        out,
        "activations      forward values {}  planned training step {}  (batch {})",
        mib(r.memory.naive_bytes),
        mib(r.memory.planned_bytes),
        r.memory.batch
    )?;
    writeln!(out, "graph nodes      {}", r.graph_nodes)?;
    writeln!(out, "blocks")?;
    for (b, block) in r.blocks.iter().enumerate() {
        writeln!(
            out,
            "  {b}: {:>3} layers from x{:<4} at {}x{}",
            block.layers, block.first_layer, block.height, block.width
        )?;
    }
    Ok(())
}
