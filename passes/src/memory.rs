//! Liveness-based buffer assignment.
//!
//! Every computed value is live from the step that writes it to the last step that
//! reads it (graph outputs stay live to the end). Buffers are assigned greedily by
//! size: values are taken from the largest down, and each goes into the first
//! existing buffer that no value with an overlapping live range occupies, else
//! into a new buffer of its own size. Because larger values are placed first, a
//! buffer's size is that of its first value. A value written by a step is live
//! at that step together with the step's operands, so no step ever writes into
//! a buffer it reads.

use ldnc_ir::graph::{Graph, ValueId};
use ldnc_ir::op::Role;
use ldnc_ir::program::{Buffer, Schedule, Storage};

/// Live range `[first, last]` of every node in node-index order.
fn live_ranges(graph: &Graph) -> Vec<(usize, usize)> {
    let end = graph.len();
    let mut ranges: Vec<(usize, usize)> = (0..end).map(|i| (i, i)).collect();
    for id in graph.ids() {
        for input in graph.inputs(id) {
            let r = &mut ranges[input.index()];
            r.1 = r.1.max(id.index());
        }
    }
    for &out in &graph.outputs {
        ranges[out.index()].1 = end;
    }
    ranges
}

/// Plans storage for `graph` in node-index order.
pub fn plan(graph: &Graph) -> Schedule {
    let order: Vec<ValueId> = graph.ids().collect();
    let ranges = live_ranges(graph);
    let mut storage = vec![Storage::Feed; graph.len()];
    for &id in &order {
        storage[id.index()] = match graph.node(id).op.role() {
            Role::Image | Role::Label => Storage::Feed,
            Role::Param | Role::State | Role::OptState => Storage::Persistent,
            Role::Update => storage[graph.inputs(id)[0].index()],
            Role::Compute => Storage::Buffer(usize::MAX),
        };
    }

    let mut computed: Vec<ValueId> = order
        .iter()
        .copied()
        .filter(|&id| graph.node(id).op.role() == Role::Compute)
        .collect();
    let size = |id: ValueId| graph.node(id).ty.per_item();
    computed.sort_by_key(|&id| (std::cmp::Reverse(size(id)), id.index()));

    let mut buffers: Vec<Buffer> = Vec::new();
    // Occupied live ranges of each buffer, sorted by start.
    let mut occupied: Vec<Vec<(usize, usize)>> = Vec::new();
    for id in computed {
        let range = ranges[id.index()];
        let batched = graph.node(id).ty.batched;
        let found = (0..buffers.len())
            .find(|&b| buffers[b].batched == batched && is_free(&occupied[b], range));
        let b = match found {
            Some(b) => b,
            None => {
                buffers.push(Buffer {
                    per_item: size(id),
                    batched,
                });
                occupied.push(Vec::new());
                buffers.len() - 1
            }
        };
        let at = occupied[b].partition_point(|r| r.0 < range.0);
        occupied[b].insert(at, range);
        storage[id.index()] = Storage::Buffer(b);
    }
    Schedule {
        order,
        storage,
        buffers,
    }
}

/// Checks that `range` overlaps none of the sorted, disjoint `occupied` ranges.
fn is_free(occupied: &[(usize, usize)], range: (usize, usize)) -> bool {
    let at = occupied.partition_point(|r| r.0 < range.0);
    let before_ok = at == 0 || occupied[at - 1].1 < range.0;
    let after_ok = at == occupied.len() || occupied[at].0 > range.1;
    before_ok && after_ok
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
            return Err(format!(
                "computed value {} has no buffer",
                graph.node(id).name
            ));
        };
        if schedule.buffers[b].per_item < graph.node(id).ty.per_item() {
            return Err(format!(
                "buffer {b} is too small for {}",
                graph.node(id).name
            ));
        }
        by_buffer[b].push(id);
    }
    for (b, values) in by_buffer.iter().enumerate() {
        for (x, &u) in values.iter().enumerate() {
            for &v in &values[x + 1..] {
                // Live ranges are [first, last]; a value written at step s may reuse a
                // buffer whose previous value was last read at an earlier step only.
                let overlap =
                    first[u.index()] <= last[v.index()] && first[v.index()] <= last[u.index()];
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

/// Computes the largest total size, in elements per image of batched values plus
/// unbatched elements, of computed values live at one time: the lower bound any
/// buffer assignment in this order can reach. Returns `(batched, unbatched)`.
pub fn peak_live(graph: &Graph) -> (usize, usize) {
    let order: Vec<ValueId> = graph.ids().collect();
    let end = order.len();
    let mut last_use: Vec<usize> = (0..graph.len()).collect();
    for (step, &id) in order.iter().enumerate() {
        for input in graph.inputs(id) {
            last_use[input.index()] = last_use[input.index()].max(step);
        }
    }
    for &out in &graph.outputs {
        last_use[out.index()] = end;
    }
    let mut releases: Vec<Vec<ValueId>> = vec![Vec::new(); end + 1];
    for &id in &order {
        releases[last_use[id.index()]].push(id);
    }
    let (mut live_b, mut live_u, mut peak_b, mut peak_u) = (0, 0, 0, 0);
    for (step, &id) in order.iter().enumerate() {
        let node = graph.node(id);
        if node.op.role() == Role::Compute {
            if node.ty.batched {
                live_b += node.ty.per_item();
            } else {
                live_u += node.ty.per_item();
            }
        }
        peak_b = peak_b.max(live_b);
        peak_u = peak_u.max(live_u);
        for &dead in &releases[step] {
            let n = graph.node(dead);
            if n.op.role() == Role::Compute {
                if n.ty.batched {
                    live_b -= n.ty.per_item();
                } else {
                    live_u -= n.ty.per_item();
                }
            }
        }
    }
    (peak_b, peak_u)
}
