//! The compiler pipeline as the CLI runs it: expand, differentiate, plan, lower.

use anyhow::{Context, Result};
use ldnc_codegen::cpu::{lower, Roots};
use ldnc_ir::program::{CompiledNet, Program, FORMAT_VERSION};
use ldnc_ir::spec::NetSpec;
use ldnc_ir::{expand, Mode};
use ldnc_passes::fuse::{fuse, FuseOptions, FuseReport};
use ldnc_passes::{autodiff, memory};

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

/// Compiles the training and evaluation programs of `spec`.
pub fn compile(spec: &NetSpec, options: CompileOptions) -> Result<CompiledNet> {
    Ok(compile_with_report(spec, options)?.0)
}

/// Compiles and also returns the fusion reports of the training and evaluation
/// networks (empty when fusion is off).
pub fn compile_with_report(
    spec: &NetSpec,
    options: CompileOptions,
) -> Result<(CompiledNet, Vec<FuseReport>)> {
    let started = std::time::Instant::now();
    let mut reports = Vec::new();
    let mut net = expand(spec, Mode::Train).context("expanding the training network")?;
    if options.fuse {
        let (fused, report) =
            fuse(&net, &FuseOptions::default()).context("fusing the training network")?;
        net = fused;
        reports.push(report);
    }
    let tg = autodiff::differentiate(&net, &spec.train).context("differentiating the network")?;
    let schedule = if options.plan_memory {
        memory::plan(&tg.graph)
    } else {
        memory::plan_naive(&tg.graph)
    };
    let roots = Roots {
        image: tg.image,
        label: tg.label,
        loss: tg.loss,
        logits: tg.logits.clone(),
    };
    let train = lower(&tg.graph, &schedule, &roots);
    tracing::info!(
        nodes = tg.graph.len(),
        steps = train.steps.len(),
        buffers = train.buffers.len(),
        "compiled the training program"
    );

    let mut eval_net = expand(spec, Mode::Eval).context("expanding the evaluation network")?;
    if options.fuse {
        let (fused, report) =
            fuse(&eval_net, &FuseOptions::default()).context("fusing the evaluation network")?;
        eval_net = fused;
        reports.push(report);
    }
    let eval = lower_forward(&eval_net, options);
    tracing::info!(
        steps = eval.steps.len(),
        seconds = started.elapsed().as_secs_f64(),
        "compiled the evaluation program"
    );
    let compiled = CompiledNet {
        format_version: FORMAT_VERSION,
        spec: spec.clone(),
        train,
        eval,
    };
    Ok((compiled, reports))
}

fn lower_forward(net: &ldnc_ir::Network, options: CompileOptions) -> Program {
    let schedule = if options.plan_memory {
        memory::plan(&net.graph)
    } else {
        memory::plan_naive(&net.graph)
    };
    let roots = Roots {
        image: net.image,
        label: net.label,
        loss: net.loss,
        logits: net.heads.iter().map(|h| h.logits).collect(),
    };
    lower(&net.graph, &schedule, &roots)
}
