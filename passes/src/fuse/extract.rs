//! Extraction: the cost model that picks one e-node per class, and the
//! conversion of the picked terms back into a graph.
//!
//! The rebuilt graph keeps the node order of the source graph: a class is
//! emitted where its first source node stood, after any operand class that has
//! not been emitted yet. Node order is the schedule the memory planner uses, so
//! this keeps autodiff's order (the forward pass, then the backward pass layer
//! by layer with gradients summed as they arrive) and with it the liveness of
//! every value.

use std::collections::{HashMap, HashSet};

use egg::{CostFunction, Extractor, Id};
use ldnc_ir::graph::{Graph, TensorType, ValueId};
use ldnc_ir::op::{Op, Role};

use super::lang::{ENode, FuseGraph};
use crate::{Error, Result};

/// FLOPs plus weighted bytes written by a node and by the terms it alone reads.
///
/// A term cost summed over a DAG counts shared operands once per reader, which
/// grows exponentially with depth in a densely connected network and overflows.
/// So a class read by more than one e-node contributes nothing to its readers'
/// cost, because it is computed once whatever the readers choose. The exception
/// is a class of element-wise chain values (concatenation, BN apply, ReLU and
/// ReLU backward outputs): a fused op recomputes those from its own operands,
/// so each reader that does not recompute them pays for writing them.
///
/// A shared class that only `Slice` e-nodes read is the other exception. Each
/// slice pays the class cost divided by the number of readers, because a
/// term that computes the slice directly makes the whole class unnecessary
/// once every slice takes it.
///
/// NOTE: the cost ignores how long a value stays live. A shared class also
/// hides the chain values it reads, so the pooled transition input that the
/// `pool-conv` and `pool-conv-filter` terms share looks free to both. The
/// pipeline's rematerialisation pass then recomputes it in the backward pass
/// instead of storing it, but no other long-lived value gets that treatment.
pub struct Cost<'a> {
    egraph: &'a FuseGraph,
    byte_weight: f64,
    shared: HashSet<Id>,
    chain: HashSet<Id>,
    /// Shared classes that only slices read, with their number of readers.
    sliced: HashMap<Id, usize>,
}

impl<'a> Cost<'a> {
    pub fn new(egraph: &'a FuseGraph, byte_weight: f64) -> Cost<'a> {
        let readers = count_readers(egraph);
        let shared = readers
            .iter()
            .filter(|(_, r)| r.nodes > 1)
            .map(|(&c, _)| c)
            .collect();
        let sliced = readers
            .iter()
            .filter(|(_, r)| r.nodes > 1 && r.slices == r.nodes)
            .map(|(&c, r)| (c, r.nodes))
            .collect();
        Cost {
            egraph,
            byte_weight,
            shared,
            chain: chain_classes(egraph),
            sliced,
        }
    }
}

/// The e-nodes that read one class.
#[derive(Default)]
struct Readers {
    nodes: usize,
    /// How many of them are `Slice` nodes.
    slices: usize,
}

/// Counts the e-nodes that read each class.
fn count_readers(egraph: &FuseGraph) -> HashMap<Id, Readers> {
    let mut readers: HashMap<Id, Readers> = HashMap::new();
    for class in egraph.classes() {
        for node in &class.nodes {
            if super::fold::is_folded_away(egraph, class.id, node) {
                continue;
            }
            let slice = matches!(egraph.analysis.op(node), Some(Op::Slice { .. }));
            for &child in &node.children {
                let entry = readers.entry(egraph.find(child)).or_default();
                entry.nodes += 1;
                entry.slices += usize::from(slice);
            }
        }
    }
    readers
}

/// Reports whether a fused op can compute `op`'s output while loading its
/// operands, so the output need not be stored.
fn is_chain(op: &Op) -> bool {
    matches!(
        op,
        Op::Concat | Op::BnApply { .. } | Op::Relu | Op::ReluBackward
    )
}

/// Classes whose every e-node is an element-wise chain op, or a chain op and
/// the folded conv that `fold` adds beside it, because folding a batch norm
/// into a conv must not turn its BN or ReLU output into a shared value that
/// looks free.
fn chain_classes(egraph: &FuseGraph) -> HashSet<Id> {
    egraph
        .classes()
        .filter(|class| {
            let op = |n: &ENode| egraph.analysis.op(n);
            let any_chain = class.nodes.iter().any(|n| op(n).is_some_and(is_chain));
            any_chain
                && class.nodes.iter().all(|n| {
                    op(n).is_some_and(|op| is_chain(op) || super::fold::is_folded_conv(op))
                })
        })
        .map(|class| class.id)
        .collect()
}

impl CostFunction<ENode> for Cost<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &ENode, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        let mut children = 0.0;
        for &child in &enode.children {
            let class = self.egraph.find(child);
            if self.chain.contains(&class) || !self.shared.contains(&class) {
                children += costs(child);
            } else if let Some(&readers) = self.sliced.get(&class) {
                children += costs(child) / readers as f64;
            }
        }
        let Some(op) = self.egraph.analysis.op(enode) else {
            return children;
        };
        let inputs: Vec<&TensorType> = enode
            .children
            .iter()
            .map(|&c| &self.egraph[c].data.ty)
            .collect();
        // The class type is the op's output type for every node of the class.
        let out = class_type(self.egraph, enode);
        let flops =
            2.0 * op.macs(&inputs, out) as f64 + super::fold::elementwise_flops(op, &inputs, out);
        let bytes = if super::fold::is_weight_transform(op) {
            0.0
        } else if matches!(op.role(), Role::Compute) {
            4.0 * out.per_item() as f64
        } else {
            0.0
        };
        children + flops + self.byte_weight * bytes
    }
}

fn class_type<'a>(egraph: &'a FuseGraph, enode: &ENode) -> &'a TensorType {
    let class = egraph
        .lookup(enode.clone())
        .expect("extraction only costs nodes in the e-graph");
    &egraph[class].data.ty
}

/// Builds the graph of the terms `extractor` picks for the operands of `root`
/// and for the classes of `keep`. Returns the graph, with the operands of
/// `root` as its outputs, and the new id of every value in `keep`. `class_of`
/// is the class of every source node, in source order.
pub fn rebuild<'a>(
    egraph: &'a FuseGraph,
    extractor: &Extractor<'a, Cost<'a>, ENode, super::lang::Ops>,
    class_of: &[Id],
    root: Id,
    keep: &[ValueId],
) -> Result<(Graph, Vec<ValueId>)> {
    let outputs: Vec<Id> = extractor.find_best_node(root).children.clone();
    let kept: Vec<Id> = keep.iter().map(|v| class_of[v.index()]).collect();
    let needed = reachable(egraph, extractor, outputs.iter().chain(&kept).copied());

    let mut builder = Rebuild {
        egraph,
        extractor,
        graph: Graph::new(),
        done: HashMap::new(),
    };
    for &class in class_of {
        let class = egraph.find(class);
        if needed.contains(&class) {
            builder.build(class)?;
        }
    }
    let mut graph_outputs = Vec::with_capacity(outputs.len());
    for class in outputs {
        graph_outputs.push(builder.build(class)?);
    }
    let mut mapped = Vec::with_capacity(kept.len());
    for class in kept {
        mapped.push(builder.build(class)?);
    }
    let mut graph = builder.graph;
    graph.outputs = graph_outputs;
    Ok((graph, mapped))
}

/// Classes that the picked terms of `start` read, directly or not.
fn reachable(
    egraph: &FuseGraph,
    extractor: &Extractor<'_, Cost<'_>, ENode, super::lang::Ops>,
    start: impl Iterator<Item = Id>,
) -> HashSet<Id> {
    let mut seen = HashSet::new();
    let mut stack: Vec<Id> = start.map(|c| egraph.find(c)).collect();
    while let Some(class) = stack.pop() {
        if !seen.insert(class) {
            continue;
        }
        for &child in &extractor.find_best_node(class).children {
            let child = egraph.find(child);
            if !seen.contains(&child) {
                stack.push(child);
            }
        }
    }
    seen
}

/// Turns extracted classes back into graph nodes, operands first.
struct Rebuild<'a, 'b> {
    egraph: &'a FuseGraph,
    extractor: &'b Extractor<'a, Cost<'a>, ENode, super::lang::Ops>,
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
