//! Liveness-based buffer assignment.
//!
//! Every computed value is live from the step that writes it to the last step that
//! reads it (graph outputs stay live to the end). Walking the schedule, a value
//! takes the smallest free buffer that fits, else grows the largest free buffer,
//! else opens a new one; after a step, the buffers of values read for the last
//! time return to the free list. A step's output is assigned before its operands
//! are released, so no step ever writes into a buffer it reads.

use ldnc_ir::graph::{Graph, ValueId};
use ldnc_ir::op::Role;
use ldnc_ir::program::{Buffer, Schedule, Storage};

/// Plans storage for `graph` in node-index order.
pub fn plan(graph: &Graph) -> Schedule {
    let order: Vec<ValueId> = graph.ids().collect();
    let position: Vec<usize> = {
        let mut pos = vec![0; graph.len()];
        for (step, id) in order.iter().enumerate() {
            pos[id.index()] = step;
        }
        pos
    };
    let end = order.len();
    let mut last_use: Vec<usize> = (0..graph.len()).map(|i| position[i]).collect();
    for &id in &order {
        for input in graph.inputs(id) {
            last_use[input.index()] = last_use[input.index()].max(position[id.index()]);
        }
    }
    for &out in &graph.outputs {
        last_use[out.index()] = end;
    }
    // Values released after each step.
    let mut releases: Vec<Vec<ValueId>> = vec![Vec::new(); end + 1];
    for &id in &order {
        releases[last_use[id.index()]].push(id);
    }

    let mut storage = vec![Storage::Feed; graph.len()];
    let mut buffers: Vec<Buffer> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    for (step, &id) in order.iter().enumerate() {
        let node = graph.node(id);
        storage[id.index()] = match node.op.role() {
            Role::Image | Role::Label => Storage::Feed,
            Role::Param | Role::State | Role::OptState => Storage::Persistent,
            Role::Update => storage[graph.inputs(id)[0].index()],
            Role::Compute => {
                let need = node.ty.per_item();
                let b = take_buffer(&mut buffers, &mut free, need, node.ty.batched);
                Storage::Buffer(b)
            }
        };
        for &dead in &releases[step] {
            if graph.node(dead).op.role() == Role::Compute {
                if let Storage::Buffer(b) = storage[dead.index()] {
                    free.push(b);
                }
            }
        }
    }
    Schedule {
        order,
        storage,
        buffers,
    }
}

/// Plans storage without sharing: every computed value gets its own buffer.
pub fn plan_naive(graph: &Graph) -> Schedule {
    let order: Vec<ValueId> = graph.ids().collect();
    let mut storage = vec![Storage::Feed; graph.len()];
    let mut buffers = Vec::new();
    for &id in &order {
        let node = graph.node(id);
        storage[id.index()] = match node.op.role() {
            Role::Image | Role::Label => Storage::Feed,
            Role::Param | Role::State | Role::OptState => Storage::Persistent,
            Role::Update => storage[graph.inputs(id)[0].index()],
            Role::Compute => {
                buffers.push(Buffer {
                    per_item: node.ty.per_item(),
                    batched: node.ty.batched,
                });
                Storage::Buffer(buffers.len() - 1)
            }
        };
    }
    Schedule {
        order,
        storage,
        buffers,
    }
}

fn take_buffer(buffers: &mut Vec<Buffer>, free: &mut Vec<usize>, need: usize, batched: bool) -> usize {
    let candidates = free.iter().enumerate().filter(|(_, &b)| buffers[b].batched == batched);
    let fitting = candidates
        .clone()
        .filter(|(_, &b)| buffers[b].per_item >= need)
        .min_by_key(|(_, &b)| buffers[b].per_item);
    let chosen = fitting.or_else(|| candidates.max_by_key(|(_, &b)| buffers[b].per_item));
    if let Some((slot, &b)) = chosen {
        free.swap_remove(slot);
        buffers[b].per_item = buffers[b].per_item.max(need);
        return b;
    }
    buffers.push(Buffer {
        per_item: need,
        batched,
    });
    buffers.len() - 1
}

/// Checks a schedule independently of the planner: no two values that are live
/// at the same time share a buffer, and every buffer fits its values.
pub fn verify(graph: &Graph, schedule: &Schedule) -> Result<(), String> {
    let n = schedule.order.len();
    let mut first = vec![usize::MAX; graph.len()];
    let mut last = vec![0usize; graph.len()];
    for (step, &id) in schedule.order.iter().enumerate() {
        first[id.index()] = step;
        last[id.index()] = last[id.index()].max(step);
        for input in graph.inputs(id) {
            last[input.index()] = last[input.index()].max(step);
        }
    }
    for &out in &graph.outputs {
        last[out.index()] = n;
    }
    let mut by_buffer: Vec<Vec<ValueId>> = vec![Vec::new(); schedule.buffers.len()];
    for id in graph.ids() {
        if graph.node(id).op.role() != Role::Compute {
            continue;
        }
        let Storage::Buffer(b) = schedule.storage[id.index()] else {
            return Err(format!("computed value {} has no buffer", graph.node(id).name));
        };
        if schedule.buffers[b].per_item < graph.node(id).ty.per_item() {
            return Err(format!("buffer {b} is too small for {}", graph.node(id).name));
        }
        by_buffer[b].push(id);
    }
    for (b, values) in by_buffer.iter().enumerate() {
        for (x, &u) in values.iter().enumerate() {
            for &v in &values[x + 1..] {
                // Live ranges are [first, last]; a value written at step s may reuse a
                // buffer whose previous value was last read at an earlier step only.
                let overlap = first[u.index()] <= last[v.index()] && first[v.index()] <= last[u.index()];
                if overlap {
                    return Err(format!(
                        "buffer {b} holds {} and {} while both are live",
                        graph.node(u).name,
                        graph.node(v).name
                    ));
                }
            }
        }
    }
    Ok(())
}
