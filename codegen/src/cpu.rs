//! Lowering of a scheduled graph to a CPU `Program`: one step per non-leaf node
//! in schedule order, values named after their nodes, storage taken from the
//! schedule. The CPU executor runs every op of the IR directly, so lowering is a
//! renumbering; the CUDA lowering shares the `Program` and adds kernels.

use std::collections::HashMap;

use ldnc_ir::graph::{Graph, ValueId};
use ldnc_ir::op::{Op, Role};
pub use ldnc_ir::program::Roots;
use ldnc_ir::program::{Program, Schedule, Step, Storage, Value, FORMAT_VERSION};

/// Lowers `graph` in the order and storage of `schedule`.
pub fn lower(graph: &Graph, schedule: &Schedule, roots: &Roots) -> Program {
    let mut index: HashMap<ValueId, usize> = HashMap::new();
    let mut values = Vec::with_capacity(graph.len());
    let mut steps = Vec::new();
    for &id in &schedule.order {
        let node = graph.node(id);
        let storage = schedule.storage[id.index()];
        let init = match node.op {
            Op::Param { init } | Op::State { init } => Some(init),
            Op::Velocity | Op::MeanSquare => Some(ldnc_ir::Init::Zeros),
            _ => None,
        };
        // An update writes its first operand, so its value carries that name.
        let name = if node.op.role() == Role::Update {
            graph.node(graph.inputs(id)[0]).name.clone()
        } else {
            node.name.clone()
        };
        index.insert(id, values.len());
        values.push(Value {
            name,
            ty: node.ty.clone(),
            role: node.op.role(),
            storage,
            init,
        });
        let is_leaf = matches!(storage, Storage::Feed)
            || (storage == Storage::Persistent && node.op.role() != Role::Update);
        if !is_leaf {
            steps.push(Step {
                op: node.op.clone(),
                inputs: graph.inputs(id).iter().map(|v| index[v]).collect(),
                output: index[&id],
            });
        }
    }
    Program {
        format_version: FORMAT_VERSION,
        values,
        buffers: schedule.buffers.clone(),
        steps,
        image: index[&roots.image],
        label: index[&roots.label],
        loss: index[&roots.loss],
        logits: roots.logits.iter().map(|v| index[v]).collect(),
    }
}
