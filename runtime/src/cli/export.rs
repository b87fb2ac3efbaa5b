//! `ldnc export`: write a checkpoint's evaluation program, frozen with batch
//! norms folded into convs, and the tensors it reads, to one safetensors file
//! that `ldnc eval` takes in place of the checkpoint.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use ldnc_ir::op::Role;
use ldnc_ir::program::CompiledNet;
use ldnc_runtime::checkpoint;
use ldnc_runtime::export;
use ldnc_runtime::freeze::freeze;
use ldnc_runtime::kernels::KernelSet;
use ldnc_runtime::store::Store;

use super::plural;
use super::train::{checkpoint_file, load_checkpoint};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A checkpoint written by `ldnc train` (a file, or the run folder).
    pub checkpoint: PathBuf,
    /// File to write (safetensors), for example `model.safetensors`, or an
    /// existing folder to write `RUN.safetensors` in, named after the run folder.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Export the unfused evaluation program, whose batch norms are not folded.
    #[arg(long)]
    pub no_fuse: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    export(args, None)
}

/// Exports a checkpoint. A compiled network executable passes its path and
/// programs as `embedded`, and the checkpoint must come from that network.
pub fn export(args: &ExportArgs, embedded: Option<(&Path, &CompiledNet)>) -> Result<()> {
    let path = checkpoint_file(&args.checkpoint)?;
    if export::is_export(&path) {
        bail!(
            "{} is already an export; pass the checkpoint that `ldnc train` wrote",
            path.display()
        );
    }
    let out_path = output_file(&args.out, &path)?;
    let same_file = out_path
        .canonicalize()
        .is_ok_and(|out| path.canonicalize().is_ok_and(|source| source == out));
    if same_file {
        bail!(
            "--out {} is the checkpoint itself; choose another file name",
            out_path.display()
        );
    }
    let loaded = load_checkpoint(&path, embedded, args.no_fuse, "export", "ldnc export")?;
    let (tensors, meta, spec, net) = (loaded.tensors, loaded.meta, loaded.spec, loaded.net);
    let mut store = Store::init(&[&net.train, &net.eval], 0);
    checkpoint::restore(&path, &mut store, tensors)?;
    let frozen = freeze(&net.eval, &store, KernelSet::Fast)
        .with_context(|| format!("cannot freeze the evaluation program of {}", spec.name))?;
    export::save(&out_path, &spec, &frozen, meta.epoch, !args.no_fuse)?;

    let tensors = frozen.store.entries.len();
    let scalars: usize = frozen.store.entries.values().map(|e| e.data.len()).sum();
    let parameters: usize = frozen
        .store
        .entries
        .values()
        .filter(|e| e.role == Role::Param)
        .map(|e| e.data.len())
        .sum();
    let bytes = std::fs::metadata(&out_path)
        .map(|m| m.len())
        .with_context(|| format!("cannot read back {}", out_path.display()))?;
    let mut out = io::stdout().lock();
    if args.json {
        let result = serde_json::json!({
            "checkpoint": path.display().to_string(),
            "export": out_path.display().to_string(),
            "network": spec.name,
            "epoch": meta.epoch,
            "fused": !args.no_fuse,
            "tensors": tensors,
            "scalars": scalars,
            "parameters": parameters,
            "precomputed": frozen.precomputed,
            "steps": frozen.program.steps.len(),
            "bytes": bytes,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&result)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "exported {} (epoch {}) to {}: {}, {} scalars, {:.1} MiB",
        spec.name,
        meta.epoch,
        out_path.display(),
        plural(tensors, "tensor"),
        scalars,
        bytes as f64 / (1024.0 * 1024.0)
    )?;
    writeln!(
        out,
        "  {} computed once from parameters (folded batch norms), {} per batch",
        plural(frozen.precomputed.len(), "tensor"),
        plural(frozen.program.steps.len(), "step"),
    )?;
    Ok(())
}

/// Returns the file that `--out` names: `out` itself or, when `out` is a
/// folder, `RUN.safetensors` in it, named after the checkpoint's run folder.
/// The folder the file goes in must exist.
fn output_file(out: &Path, checkpoint: &Path) -> Result<PathBuf> {
    if out.is_dir() {
        let stem = checkpoint
            .parent()
            .and_then(|run| run.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        return Ok(out.join(format!("{stem}.safetensors")));
    }
    let folder = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !folder.is_dir() {
        bail!(
            "--out {}: the folder {} does not exist; create it or choose another file",
            out.display(),
            folder.display()
        );
    }
    Ok(out.to_path_buf())
}
