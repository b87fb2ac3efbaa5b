//! Rematerialisation: recompute cheap forward values in the backward pass
//! instead of keeping them live from the forward pass to the backward pass.
//!
//! The `pool-conv` rules make a transition read its pooled, rectified input
//! `avgpool(relu(bn(x)))` twice: once in the forward pass for the conv, and once
//! in the backward pass for the conv's filter gradient. Stored, that value is
//! live across the whole rest of the forward pass and most of the backward pass.
//! Its operands, the layer outputs `x`, are live until their own batch-norm
//! gradients run, next to the filter gradient. So a second copy of the pooling
//! step, placed just before the first backward reader, costs one pooling pass and
//! lets the planner free the forward copy after its forward readers.
//!
//! A value is recomputed only where that never extends an operand's life: every
//! batched operand must already be live at the new step. The step must not read
//! a persistent tensor that an update step writes before the new step, so both
//! copies see the same parameters.

use std::collections::HashMap;

use ldnc_ir::graph::{Graph, ValueId};
use ldnc_ir::op::{Op, Role};

use crate::autodiff::TrainingGraph;

/// Reports whether recomputing `op` costs about one pass over its operands, so
/// that recomputing it is cheaper than keeping its output live.
fn is_cheap(op: &Op) -> bool {
    matches!(op, Op::BnReluAvgPool { .. } | Op::AvgPool { .. })
}

/// The result of [`rematerialise`].
#[derive(Debug, Clone)]
pub struct Rematerialised {
    pub training: TrainingGraph,
    /// Names of the values that the backward pass now recomputes.
    pub recomputed: Vec<String>,
}

/// Returns the position of the step before which `id` is recomputed, if it
/// should be: its first reader after the loss, when every condition in the
/// module documentation holds.
fn recompute_point(graph: &Graph, id: ValueId, loss: usize, last_use: &[usize]) -> Option<usize> {
    let node = graph.node(id);
    if !is_cheap(&node.op) || !node.ty.batched || id.index() >= loss {
        return None;
    }
    let point = graph
        .users(id)
        .into_iter()
        .map(|u| u.index())
        .filter(|&u| u > loss)
        .min()?;
    for input in graph.inputs(id) {
        let operand = graph.node(input);
        match operand.op.role() {
            Role::Param | Role::State | Role::OptState => {
                let updated_before = graph.users(input).into_iter().any(|u| {
                    graph.node(u).op.role() == Role::Update
                        && graph.inputs(u).first() == Some(&input)
                        && u.index() < point
                });
                if updated_before {
                    return None;
                }
            }
            _ if operand.ty.batched && last_use[input.index()] < point => return None,
            _ => {}
        }
    }
    Some(point)
}

/// Returns the last reader of every node, by position. Graph outputs count as
/// read at the end.
fn last_uses(graph: &Graph) -> Vec<usize> {
    let end = graph.len();
    let mut last: Vec<usize> = (0..end).collect();
    for id in graph.ids() {
        for input in graph.inputs(id) {
            last[input.index()] = last[input.index()].max(id.index());
        }
    }
    for &out in &graph.outputs {
        last[out.index()] = end;
    }
    last
}

/// Rebuilds `training` with a second copy of each cheap forward value that the
/// backward pass reads, placed just before its first backward reader. Backward
/// readers use the copy, forward readers the original, and an original that
/// only backward steps read is dropped.
pub fn rematerialise(training: &TrainingGraph) -> Rematerialised {
    let graph = &training.graph;
    let loss = training.loss.index();
    let last_use = last_uses(graph);
    // Recompute point -> values recomputed before it, in node order.
    let mut before: HashMap<usize, Vec<ValueId>> = HashMap::new();
    let mut point_of: HashMap<ValueId, usize> = HashMap::new();
    for id in graph.ids() {
        if let Some(point) = recompute_point(graph, id, loss, &last_use) {
            before.entry(point).or_default().push(id);
            point_of.insert(id, point);
        }
    }

    let mut out = Graph::new();
    let mut mapped: Vec<Option<ValueId>> = vec![None; graph.len()];
    let mut copies: HashMap<ValueId, ValueId> = HashMap::new();
    let mut recomputed = Vec::new();
    let copy_node = |out: &mut Graph, id: ValueId, inputs: Vec<ValueId>, name: String| {
        let node = graph.node(id);
        let new = out.add_typed(node.op.clone(), &inputs, name, node.ty.clone());
        out.node_mut(new).layer = node.layer;
        new
    };
    for id in graph.ids() {
        for &value in before.get(&id.index()).into_iter().flatten() {
            let inputs = graph
                .inputs(value)
                .iter()
                .map(|i| mapped[i.index()].expect("operands come first in node order"))
                .collect();
            let name = format!("{}.recomputed", graph.node(value).name);
            recomputed.push(graph.node(value).name.clone());
            let copy = copy_node(&mut out, value, inputs, name);
            copies.insert(value, copy);
        }
        let dropped = point_of.contains_key(&id)
            && !graph.outputs.contains(&id)
            && graph.users(id).iter().all(|u| u.index() > loss);
        if dropped {
            continue;
        }
        let inputs = graph
            .inputs(id)
            .iter()
            .map(|&i| match copies.get(&i) {
                Some(&copy) if id.index() > loss => copy,
                _ => mapped[i.index()].expect("operands come first in node order"),
            })
            .collect();
        mapped[id.index()] = Some(copy_node(&mut out, id, inputs, graph.node(id).name.clone()));
    }
    let map = |id: ValueId| mapped[id.index()].expect("roots are kept");
    out.outputs = graph.outputs.iter().map(|&o| map(o)).collect();
    let training = TrainingGraph {
        graph: out,
        image: map(training.image),
        label: map(training.label),
        loss: map(training.loss),
        logits: training.logits.iter().map(|&l| map(l)).collect(),
        grads: training
            .grads
            .iter()
            .map(|&(param, grad)| (map(param), map(grad)))
            .collect(),
    };
    Rematerialised {
        training,
        recomputed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{training, Options};
    use ldnc_ir::spec::NetSpec;

    /// Returns a Log-DenseNet V1 with independent transitions, whose
    /// per-layer transitions pool each layer output on its own.
    fn spec() -> NetSpec {
        let text = "(template: LogDenseNet, transition: Independent, blocks: [3, 3], \
                    growth: 4, input: (height: 8, width: 8, channels: 2), classes: 3)";
        NetSpec::from_ron(text, "remat test").expect("test spec parses")
    }

    fn pooled_forward_values(graph: &Graph, loss: usize) -> Vec<ValueId> {
        graph
            .ids()
            .filter(|&id| id.index() < loss && is_cheap(&graph.node(id).op))
            .collect()
    }

    #[test]
    fn backward_reads_no_forward_pool() {
        let planned = training(&spec(), &Options::default())
            .expect("pipeline runs")
            .planned;
        let graph = &planned.graph;
        let loss = planned.roots.loss.index();
        let report = planned.fusion.expect("fusion is on");
        assert!(!report.recomputed.is_empty(), "nothing was recomputed");
        for id in pooled_forward_values(graph, loss) {
            let late: Vec<_> = graph
                .users(id)
                .into_iter()
                .filter(|u| u.index() > loss)
                .collect();
            assert!(
                late.is_empty(),
                "backward steps {late:?} read the forward value {}",
                graph.node(id).name
            );
        }
        crate::memory::verify(graph, &planned.schedule).expect("plan is valid");
    }

    #[test]
    fn recomputing_lowers_planned_bytes() {
        let options = Options::default();
        let fused = crate::autodiff::differentiate(
            &ldnc_ir::expand(&spec(), ldnc_ir::Mode::Train).expect("spec expands"),
            &spec().train,
        )
        .and_then(|tg| crate::fuse::fuse_training(&tg, &options.fuse_options))
        .expect("fusion runs")
        .0;
        let remat = rematerialise(&fused);
        let bytes = |graph: &Graph| {
            let schedule = crate::memory::plan(graph);
            schedule.buffers.iter().map(|b| b.numel(8)).sum::<usize>()
        };
        let (before, after) = (bytes(&fused.graph), bytes(&remat.training.graph));
        assert!(
            after < before,
            "planned {after} elements, {before} without recomputing"
        );
        let copies = remat
            .training
            .graph
            .ids()
            .filter(|&id| remat.training.graph.node(id).name.ends_with(".recomputed"))
            .count();
        assert_eq!(copies, remat.recomputed.len());
    }
}
