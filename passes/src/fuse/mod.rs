//! Operator fusion with equality saturation (egg).
//!
//! The forward network goes into an e-graph whose root ties every output
//! (losses, logits, running-statistics updates) together. The rules in `rules`
//! add fused and reordered terms to the classes they match; a runner with
//! iteration, node and time limits saturates the e-graph; extraction picks, per
//! class, the term with the lowest cost (FLOPs plus weighted bytes written), and
//! the result is turned back into a graph. Autodiff runs on the fused forward
//! graph, so the backward of a fused op is the recomputing backward its VJP rule
//! emits, and forward and backward are fused alike.
//!
//! ```
//! use ldnc_ir::{expand, spec::NetSpec, Mode};
//! let spec = NetSpec::from_ron("(blocks: [3, 3], growth: 4)", "inline").unwrap();
//! let net = expand(&spec, Mode::Train).unwrap();
//! let (fused, report) = ldnc_passes::fuse::fuse(&net, &Default::default()).unwrap();
//! assert!(report.applied.iter().any(|(rule, n)| rule == "bn-relu-conv" && *n > 0));
//! assert!(fused.graph.len() < net.graph.len());
//! ```

pub mod lang;
pub mod rules;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use egg::{CostFunction, Extractor, Id, Rewrite, Runner};
use ldnc_ir::expand::{Head, Network};
use ldnc_ir::graph::{Graph, ValueId};
use ldnc_ir::op::Op;
use serde::Serialize;

use crate::{Error, Result};
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
    ]
}

/// Fuses a forward network and returns it with a report.
pub fn fuse(net: &Network, options: &FuseOptions) -> Result<(Network, FuseReport)> {
    let started = Instant::now();
    let (egraph, class_of, root) = to_egraph(&net.graph);
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
    let cost = Cost {
        egraph,
        byte_weight: options.byte_weight,
        shared: shared_classes(egraph),
    };
    let extractor = Extractor::new(egraph, cost);
    let mut builder = Rebuild {
        egraph,
        extractor: &extractor,
        graph: Graph::new(),
        done: HashMap::new(),
    };
    let root_node = extractor.find_best_node(root).clone();
    let mut outputs = Vec::new();
    for &child in &root_node.children {
        outputs.push(builder.build(child)?);
    }
    let map = |builder: &mut Rebuild, old: ValueId| builder.build(class_of[old.index()]);
    let image = map(&mut builder, net.image)?;
    let label = map(&mut builder, net.label)?;
    let loss = map(&mut builder, net.loss)?;
    let mut heads = Vec::new();
    for h in &net.heads {
        heads.push(Head {
            name: h.name.clone(),
            logits: map(&mut builder, h.logits)?,
            loss: map(&mut builder, h.loss)?,
            weight: h.weight,
        });
    }
    let mut graph = builder.graph;
    graph.outputs = outputs;

    let report = FuseReport {
        nodes_before: net.graph.len(),
        nodes_after: graph.len(),
        eclasses: egraph.number_of_classes(),
        enodes: egraph.total_number_of_nodes(),
        iterations: runner.iterations.len(),
        stop_reason,
        applied,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        before = report.nodes_before,
        after = report.nodes_after,
        iterations = report.iterations,
        stop = %report.stop_reason,
        seconds = report.seconds,
        "fused the forward graph"
    );
    let fused = Network {
        graph,
        image,
        label,
        heads,
        loss,
        features: net.features.clone(),
        mode: net.mode,
    };
    Ok((fused, report))
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

/// FLOPs plus weighted bytes written by a node and by the terms only it reads.
///
/// A term cost summed over a DAG counts shared operands once per reader, which
/// grows exponentially with depth in a densely connected network and overflows.
/// So a class read by more than one e-node contributes nothing to its readers'
/// cost: it is computed once whatever the readers choose, and the comparison
/// between alternatives only depends on what each alternative adds.
struct Cost<'a> {
    egraph: &'a FuseGraph,
    byte_weight: f64,
    shared: std::collections::HashSet<Id>,
}

/// Classes that more than one e-node reads.
fn shared_classes(egraph: &FuseGraph) -> std::collections::HashSet<Id> {
    let mut readers: HashMap<Id, usize> = HashMap::new();
    for class in egraph.classes() {
        for node in &class.nodes {
            for &child in &node.children {
                *readers.entry(egraph.find(child)).or_default() += 1;
            }
        }
    }
    readers
        .into_iter()
        .filter(|&(_, n)| n > 1)
        .map(|(c, _)| c)
        .collect()
}

impl CostFunction<ENode> for Cost<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &ENode, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        let children: f64 = enode
            .children
            .iter()
            .filter(|&&c| !self.shared.contains(&self.egraph.find(c)))
            .map(|&c| costs(c))
            .sum();
        let Some(op) = self.egraph.analysis.op(enode) else {
            return children;
        };
        let inputs: Vec<&ldnc_ir::TensorType> = enode
            .children
            .iter()
            .map(|&c| &self.egraph[c].data.ty)
            .collect();
        // The class type is the op's output type for every node of the class.
        let out = inputs_output(self.egraph, enode);
        let flops = 2.0 * op.macs(&inputs, out) as f64;
        let bytes = if matches!(op.role(), ldnc_ir::Role::Compute) {
            4.0 * out.per_item() as f64
        } else {
            0.0
        };
        children + flops + self.byte_weight * bytes
    }
}

fn inputs_output<'a>(egraph: &'a FuseGraph, enode: &ENode) -> &'a ldnc_ir::TensorType {
    let class = egraph
        .lookup(enode.clone())
        .expect("extraction only costs nodes in the e-graph");
    &egraph[class].data.ty
}

/// Turns extracted classes back into graph nodes, operands first.
struct Rebuild<'a, 'b> {
    egraph: &'a FuseGraph,
    extractor: &'b Extractor<'a, Cost<'a>, ENode, Ops>,
    graph: Graph,
    done: HashMap<Id, ValueId>,
}

impl Rebuild<'_, '_> {
    fn build(&mut self, class: Id) -> Result<ValueId> {
        let class = self.egraph.find(class);
        if let Some(&v) = self.done.get(&class) {
            return Ok(v);
        }
        // Iterative post-order, so deep networks do not overflow the stack.
        let mut stack = vec![(class, false)];
        while let Some((c, expanded)) = stack.pop() {
            if self.done.contains_key(&c) {
                continue;
            }
            let node = self.extractor.find_best_node(c);
            if !expanded {
                stack.push((c, true));
                for &child in node.children.iter().rev() {
                    let child = self.egraph.find(child);
                    if !self.done.contains_key(&child) {
                        stack.push((child, false));
                    }
                }
                continue;
            }
            let inputs: Vec<ValueId> = node
                .children
                .iter()
                .map(|&ch| self.done[&self.egraph.find(ch)])
                .collect();
            let data = &self.egraph[c].data;
            let entry = &self.egraph.analysis.table[node.op as usize];
            let op: Op = entry.op.clone().ok_or_else(|| Error::Autodiff {
                node: data.name.clone(),
                message: "the fusion root was extracted below the root".into(),
            })?;
            let id = if inputs.is_empty() {
                self.graph
                    .add_typed(op, &[], data.name.clone(), data.ty.clone())
            } else {
                self.graph.add(op, &inputs, data.name.clone())?
            };
            self.graph.node_mut(id).layer = data.layer;
            self.done.insert(c, id);
        }
        Ok(self.done[&class])
    }
}
