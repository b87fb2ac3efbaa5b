//! Operator fusion with equality saturation (egg).
//!
//! The training graph (forward pass, backward pass, running-statistics and SGD
//! updates, as autodiff builds them from the unfused network) goes into one
//! e-graph whose root ties every output together. The rules in `rules`,
//! `fold` and `bn_relu_pool` add fused and reordered forward terms to the
//! classes they match. Those in
//! `backward` add fused backward ops for the plain gradient terms of a
//! BN-ReLU-conv chain, which recompute the normalised input from the layer
//! outputs. A runner with iteration, node and time limits saturates the e-graph,
//! extraction picks per class the term with the lowest cost (FLOPs plus
//! weighted bytes written), and `extract` turns the result back into a graph.
//! The evaluation network, which has no backward pass, goes through the same
//! steps with `fuse`.
//!
//! ```
//! use ldnc_ir::{expand, spec::NetSpec, Mode};
//! let spec = NetSpec::from_ron("(blocks: [3, 3], growth: 4)", "inline").unwrap();
//! let net = expand(&spec, Mode::Train).unwrap();
//! let training = ldnc_passes::autodiff::differentiate(&net, &spec.train).unwrap();
//! let (fused, report) = ldnc_passes::fuse::fuse_training(&training, &Default::default()).unwrap();
//! for rule in ["bn-relu-conv", "bn-relu-conv-filter", "bn-relu-backward"] {
//!     assert!(report.applied.iter().any(|(r, n)| r == rule && *n > 0));
//! }
//! assert!(fused.graph.len() < training.graph.len());
//! ```

pub mod backward;
pub mod bn_relu_pool;
pub mod extract;
pub mod fold;
pub mod lang;
pub mod rules;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use egg::{Extractor, Id, Rewrite, Runner};
use ldnc_ir::expand::{Head, Network};
use ldnc_ir::graph::{Graph, ValueId};
use serde::Serialize;

use crate::autodiff::TrainingGraph;
use crate::Result;
use extract::Cost;
use lang::{has_identity, ENode, FuseGraph, Ops};

/// Limits of one saturation run.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    pub iter_limit: usize,
    pub node_limit: usize,
    pub time_limit: Duration,
    /// Cost of writing one byte, relative to one FLOP.
    pub byte_weight: f64,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            iter_limit: 8,
            node_limit: 500_000,
            time_limit: Duration::from_secs(10),
            byte_weight: 4.0,
        }
    }
}

/// Summary of one fusion run.
#[derive(Debug, Clone, Serialize)]
pub struct FuseReport {
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub eclasses: usize,
    pub enodes: usize,
    pub iterations: usize,
    /// Why saturation stopped: saturated, or the limit that was hit.
    pub stop_reason: String,
    /// Times each rule added something, summed over iterations.
    pub applied: Vec<(String, usize)>,
    pub seconds: f64,
    /// Values that the backward pass recomputes instead of reading a stored
    /// copy (filled in by the pipeline's rematerialisation, training only).
    pub recomputed: Vec<String>,
}

fn rewrites() -> Vec<Rewrite<ENode, Ops>> {
    vec![
        Rewrite::new(
            "bn-relu-conv",
            rules::Rule(rules::BnReluConv),
            rules::Rule(rules::BnReluConv),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "flatten-concat",
            rules::Rule(rules::FlattenConcat),
            rules::Rule(rules::FlattenConcat),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "stats-of-concat",
            rules::Rule(rules::StatsOfConcat),
            rules::Rule(rules::StatsOfConcat),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "pool-conv",
            rules::Rule(rules::PoolConv),
            rules::Rule(rules::PoolConv),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "bn-relu-conv-filter",
            rules::Rule(backward::BnReluConvFilter),
            rules::Rule(backward::BnReluConvFilter),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "bn-relu-backward",
            rules::Rule(backward::BnReluBackward),
            rules::Rule(backward::BnReluBackward),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "bn-relu-backward-part",
            rules::Rule(backward::BnReluBackwardPart),
            rules::Rule(backward::BnReluBackwardPart),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "bn-relu-affine-grad",
            rules::Rule(backward::BnReluAffineGrad),
            rules::Rule(backward::BnReluAffineGrad),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "pool-conv-filter",
            rules::Rule(backward::PoolConvFilter),
            rules::Rule(backward::PoolConvFilter),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "pool-conv-data",
            rules::Rule(backward::PoolConvData),
            rules::Rule(backward::PoolConvData),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "bn-relu-gap",
            rules::Rule(bn_relu_pool::BnReluPool { global: true }),
            rules::Rule(bn_relu_pool::BnReluPool { global: true }),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "bn-relu-pool",
            rules::Rule(bn_relu_pool::BnReluPool { global: false }),
            rules::Rule(bn_relu_pool::BnReluPool { global: false }),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "fold-bn",
            rules::Rule(fold::FoldBn),
            rules::Rule(fold::FoldBn),
        )
        .expect("rule names are unique"),
        Rewrite::new(
            "bias-relu",
            rules::Rule(fold::BiasRelu),
            rules::Rule(fold::BiasRelu),
        )
        .expect("rule names are unique"),
    ]
}

/// Fuses a forward network (the evaluation program) and returns it with a
/// report.
pub fn fuse(net: &Network, options: &FuseOptions) -> Result<(Network, FuseReport)> {
    let mut keep = vec![net.image, net.label, net.loss];
    for head in &net.heads {
        keep.extend([head.logits, head.loss]);
    }
    let (graph, mapped, report) = fuse_graph(&net.graph, &keep, options)?;
    let heads = net
        .heads
        .iter()
        .enumerate()
        .map(|(i, head)| Head {
            name: head.name.clone(),
            logits: mapped[3 + 2 * i],
            loss: mapped[4 + 2 * i],
            weight: head.weight,
        })
        .collect();
    let fused = Network {
        graph,
        image: mapped[0],
        label: mapped[1],
        loss: mapped[2],
        heads,
        features: net.features.clone(),
        mode: net.mode,
    };
    Ok((fused, report))
}

/// Fuses a training graph, forward and backward in one e-graph, and returns it
/// with a report.
pub fn fuse_training(
    training: &TrainingGraph,
    options: &FuseOptions,
) -> Result<(TrainingGraph, FuseReport)> {
    let mut keep = vec![training.image, training.label, training.loss];
    keep.extend(&training.logits);
    for &(param, grad) in &training.grads {
        keep.extend([param, grad]);
    }
    let (graph, mapped, report) = fuse_graph(&training.graph, &keep, options)?;
    let heads = training.logits.len();
    let grads = mapped[3 + heads..]
        .chunks(2)
        .map(|pair| (pair[0], pair[1]))
        .collect();
    let fused = TrainingGraph {
        graph,
        image: mapped[0],
        label: mapped[1],
        loss: mapped[2],
        logits: mapped[3..3 + heads].to_vec(),
        grads,
    };
    Ok((fused, report))
}

/// Saturates the e-graph of `graph` and extracts it; returns the new graph,
/// the new id of every value of `keep`, and the report.
fn fuse_graph(
    graph: &Graph,
    keep: &[ValueId],
    options: &FuseOptions,
) -> Result<(Graph, Vec<ValueId>, FuseReport)> {
    let started = Instant::now();
    let (egraph, class_of, root) = to_egraph(graph);
    // Every rule matches once per layer, so egg's default backoff scheduler would
    // ban them on deep networks; the simple scheduler applies every match.
    let runner = Runner::default()
        .with_scheduler(egg::SimpleScheduler)
        .with_egraph(egraph)
        .with_iter_limit(options.iter_limit)
        .with_node_limit(options.node_limit)
        .with_time_limit(options.time_limit)
        .run(&rewrites());

    let mut applied: HashMap<String, usize> = HashMap::new();
    for iteration in &runner.iterations {
        for (rule, count) in &iteration.applied {
            *applied.entry(rule.to_string()).or_default() += count;
        }
    }
    let mut applied: Vec<(String, usize)> = applied.into_iter().collect();
    applied.sort();
    let stop_reason = match &runner.stop_reason {
        Some(egg::StopReason::Saturated) => "saturated".to_string(),
        Some(egg::StopReason::IterationLimit(n)) => format!("iteration limit {n}"),
        Some(egg::StopReason::NodeLimit(n)) => format!("node limit {n}"),
        Some(egg::StopReason::TimeLimit(t)) => format!("time limit {t:.1}s"),
        Some(egg::StopReason::Other(s)) => s.clone(),
        None => "not run".to_string(),
    };
    for (rule, count) in &applied {
        tracing::debug!(rule, count, "fusion rule applied");
    }

    let egraph = &runner.egraph;
    let extractor = Extractor::new(egraph, Cost::new(egraph, options.byte_weight));
    let (fused, mapped) = extract::rebuild(egraph, &extractor, &class_of, root, keep)?;
    let report = FuseReport {
        nodes_before: graph.len(),
        nodes_after: fused.len(),
        eclasses: egraph.number_of_classes(),
        enodes: egraph.total_number_of_nodes(),
        iterations: runner.iterations.len(),
        stop_reason,
        applied,
        seconds: started.elapsed().as_secs_f64(),
        recomputed: Vec::new(),
    };
    tracing::info!(
        before = report.nodes_before,
        after = report.nodes_after,
        iterations = report.iterations,
        stop = %report.stop_reason,
        seconds = report.seconds,
        "fused the graph"
    );
    Ok((fused, mapped, report))
}

/// Adds every node of `graph` to a new e-graph; returns it, the class of each
/// node, and the root class.
fn to_egraph(graph: &Graph) -> (FuseGraph, Vec<Id>, Id) {
    let mut egraph = FuseGraph::new(Ops::default());
    let mut class_of = Vec::with_capacity(graph.len());
    for id in graph.ids() {
        let node = graph.node(id);
        let children: Vec<Id> = graph
            .inputs(id)
            .iter()
            .map(|v| class_of[v.index()])
            .collect();
        let identity = has_identity(&node.op).then_some(node.name.as_str());
        let leaf = children.is_empty().then(|| node.ty.clone());
        let op = egraph.analysis.intern(Some(&node.op), identity, leaf);
        egraph.analysis.next_name = Some((node.name.clone(), node.layer));
        class_of.push(egraph.add(ENode { op, children }));
    }
    egraph.analysis.next_name = None;
    let root_op = egraph.analysis.intern(None, None, None);
    let outputs = graph.outputs.iter().map(|v| class_of[v.index()]).collect();
    let root = egraph.add(ENode {
        op: root_op,
        children: outputs,
    });
    (egraph, class_of, root)
}
