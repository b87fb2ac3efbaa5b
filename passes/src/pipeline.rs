//! The pass half of the compiler, in one place: expand a spec, differentiate
//! the unfused network, fuse the whole training graph, recompute cheap forward
//! values in the backward pass and plan memory.
//! Lowering to a program is codegen's part and takes the `Planned` graph this
//! module returns.
//!
//! ```
//! use ldnc_ir::spec::NetSpec;
//! let spec = NetSpec::from_ron("(blocks: [2], growth: 4)", "inline").unwrap();
//! let stages = ldnc_passes::pipeline::training(&spec, &Default::default()).unwrap();
//! ldnc_passes::memory::verify(&stages.planned.graph, &stages.planned.schedule).unwrap();
//! ```

use ldnc_ir::graph::Graph;
use ldnc_ir::program::{Roots, Schedule};
use ldnc_ir::spec::NetSpec;
use ldnc_ir::{expand, Mode};

use crate::fuse::{fuse, fuse_training, FuseOptions, FuseReport};
use crate::{autodiff, memory, remat, Result};

/// Choices that change the compiled program but not the network.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run the egg fusion pass.
    pub fuse: bool,
    /// Share buffers between values whose lifetimes do not overlap.
    pub plan_memory: bool,
    /// Limits and cost weights of the fusion pass.
    pub fuse_options: FuseOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fuse: true,
            plan_memory: true,
            fuse_options: FuseOptions::default(),
        }
    }
}

/// A graph with its memory plan and the values a program exposes, ready for
/// `ldnc_codegen::cpu::lower`.
#[derive(Debug, Clone)]
pub struct Planned {
    pub graph: Graph,
    pub schedule: Schedule,
    pub roots: Roots,
    /// Report of the fusion pass, or `None` when fusion is off.
    pub fusion: Option<FuseReport>,
}

/// The graphs the training pipeline passes through, for reports and dumps.
#[derive(Debug, Clone)]
pub struct TrainingStages {
    /// The forward graph as expanded.
    pub expanded: Graph,
    /// The training graph as autodiff built it from the unfused network.
    pub differentiated: Graph,
    /// The final training graph and its plan.
    pub planned: Planned,
}

/// Runs the training pipeline of `spec`.
pub fn training(spec: &NetSpec, options: &Options) -> Result<TrainingStages> {
    let expanded = expand(spec, Mode::Train)?;
    let differentiated = autodiff::differentiate(&expanded, &spec.train)?;
    let (tg, fusion) = if options.fuse {
        let (fused, mut report) = fuse_training(&differentiated, &options.fuse_options)?;
        let remat = remat::rematerialise(&fused);
        report.recomputed = remat.recomputed;
        (remat.training, Some(report))
    } else {
        (differentiated.clone(), None)
    };
    let schedule = plan(&tg.graph, options);
    let planned = Planned {
        schedule,
        roots: Roots {
            image: tg.image,
            label: tg.label,
            loss: tg.loss,
            logits: tg.logits.clone(),
        },
        fusion,
        graph: tg.graph,
    };
    Ok(TrainingStages {
        expanded: expanded.graph,
        differentiated: differentiated.graph,
        planned,
    })
}

/// Runs the evaluation pipeline of `spec`: expand, fuse, plan.
pub fn evaluation(spec: &NetSpec, options: &Options) -> Result<Planned> {
    let expanded = expand(spec, Mode::Eval)?;
    let (net, fusion) = if options.fuse {
        let (fused, report) = fuse(&expanded, &options.fuse_options)?;
        (fused, Some(report))
    } else {
        (expanded, None)
    };
    Ok(Planned {
        schedule: plan(&net.graph, options),
        roots: Roots {
            image: net.image,
            label: net.label,
            loss: net.loss,
            logits: net.heads.iter().map(|h| h.logits).collect(),
        },
        fusion,
        graph: net.graph,
    })
}

fn plan(graph: &Graph, options: &Options) -> Schedule {
    if options.plan_memory {
        memory::plan(graph)
    } else {
        memory::plan_naive(graph)
    }
}
