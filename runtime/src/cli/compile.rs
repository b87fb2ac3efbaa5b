//! The compiler pipeline as the CLI runs it: the passes of
//! `ldnc_passes::pipeline`, then lowering to CPU programs.

use anyhow::{Context, Result};
use ldnc_codegen::cpu::lower;
use ldnc_ir::program::{CompiledNet, Program, FORMAT_VERSION};
use ldnc_ir::spec::NetSpec;
use ldnc_passes::fuse::FuseReport;
use ldnc_passes::pipeline::{self, Planned};

/// Choices that change the compiled program but not the network.
#[derive(Debug, Clone, Copy)]
pub struct CompileOptions {
    /// Share buffers between values whose lifetimes do not overlap.
    pub plan_memory: bool,
    /// Run the egg fusion pass.
    pub fuse: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            plan_memory: true,
            fuse: true,
        }
    }
}

impl From<CompileOptions> for pipeline::Options {
    fn from(options: CompileOptions) -> pipeline::Options {
        pipeline::Options {
            fuse: options.fuse,
            plan_memory: options.plan_memory,
            ..pipeline::Options::default()
        }
    }
}

/// Compiles the training and evaluation programs of `spec`.
pub fn compile(spec: &NetSpec, options: CompileOptions) -> Result<CompiledNet> {
    Ok(compile_with_report(spec, options)?.0)
}

/// Compiles and also returns the fusion reports of the training and evaluation
/// graphs (empty when fusion is off).
pub fn compile_with_report(
    spec: &NetSpec,
    options: CompileOptions,
) -> Result<(CompiledNet, Vec<FuseReport>)> {
    let started = std::time::Instant::now();
    let options = pipeline::Options::from(options);
    let training = pipeline::training(spec, &options).context("compiling the training program")?;
    let train = lower_planned(&training.planned);
    tracing::info!(
        nodes = training.planned.graph.len(),
        steps = train.steps.len(),
        buffers = train.buffers.len(),
        "compiled the training program"
    );

    let evaluation =
        pipeline::evaluation(spec, &options).context("compiling the evaluation program")?;
    let eval = lower_planned(&evaluation);
    tracing::info!(
        steps = eval.steps.len(),
        seconds = started.elapsed().as_secs_f64(),
        "compiled the evaluation program"
    );
    let reports = [training.planned.fusion, evaluation.fusion]
        .into_iter()
        .flatten()
        .collect();
    let compiled = CompiledNet {
        format_version: FORMAT_VERSION,
        spec: spec.clone(),
        train,
        eval,
    };
    Ok((compiled, reports))
}

fn lower_planned(planned: &Planned) -> Program {
    lower(&planned.graph, &planned.schedule, &planned.roots)
}
