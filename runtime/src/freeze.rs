//! Freezing: an evaluation program whose parameter-only steps have run once.
//!
//! Some steps of an evaluation program read persistent tensors alone, such as
//! folding a batch norm's running statistics into the weight and bias of the
//! conv before it. Their outputs are the same for every batch. [`freeze`] runs
//! them once and returns a program without them, in which their outputs are
//! persistent tensors, with a store that contains exactly the persistent
//! tensors the frozen program reads. Evaluation runs the frozen program, and
//! `ldnc export` writes it with its store.

use std::collections::HashMap;

use ldnc_ir::op::Role;
use ldnc_ir::program::{Program, Storage, Value};

use crate::exec::{ExecError, Executor};
use crate::kernels::KernelSet;
use crate::store::{Entry, Store};

/// A program without parameter-only steps and the tensors it reads.
#[derive(Debug, Clone)]
pub struct Frozen {
    pub program: Program,
    pub store: Store,
    /// Names of the values computed once from persistent tensors, now stored.
    pub precomputed: Vec<String>,
}

/// Marks the steps that read only persistent tensors or the outputs of other
/// such steps, and whose output is unbatched, so it is the same for every
/// batch. Update steps never qualify, because they change the store.
fn parameter_only_steps(program: &Program) -> Vec<bool> {
    let mut constant: Vec<bool> = program
        .values
        .iter()
        .map(|v| v.storage == Storage::Persistent)
        .collect();
    program
        .steps
        .iter()
        .map(|step| {
            let qualifies = step.op.role() == Role::Compute
                && !program.values[step.output].ty.batched
                && step.inputs.iter().all(|&i| constant[i]);
            if qualifies {
                constant[step.output] = true;
            }
            qualifies
        })
        .collect()
}

/// Runs the parameter-only steps of `program` on `store` and returns the
/// frozen program with the tensors it reads. `store` must contain every
/// persistent tensor of `program`.
pub fn freeze(program: &Program, store: &Store, kernels: KernelSet) -> Result<Frozen, ExecError> {
    let once = parameter_only_steps(program);
    let mut executor = Executor::new(program.clone(), 1, kernels)?;
    // Each output is copied right after its step, because the memory plan may
    // give a later parameter-only value the same buffer.
    let mut outputs = HashMap::new();
    for (s, step) in program.steps.iter().enumerate().filter(|&(s, _)| once[s]) {
        executor.run_compute_steps(store, &[s])?;
        let data = executor.value(store, step.output)?.to_vec();
        outputs.insert(step.output, data);
    }

    // Values the remaining steps and the program's roots read or write, in
    // their old order.
    let mut referenced = vec![false; program.values.len()];
    for (step, _) in program.steps.iter().zip(&once).filter(|(_, &o)| !o) {
        for &i in step.inputs.iter().chain([&step.output]) {
            referenced[i] = true;
        }
    }
    for &root in [program.image, program.label, program.loss]
        .iter()
        .chain(&program.logits)
    {
        referenced[root] = true;
    }

    let mut index = vec![usize::MAX; program.values.len()];
    let mut buffer_index = vec![usize::MAX; program.buffers.len()];
    let mut values = Vec::new();
    let mut buffers = Vec::new();
    let mut frozen_store = Store::default();
    let mut names = Vec::new();
    for (old, value) in program.values.iter().enumerate() {
        if !referenced[old] {
            continue;
        }
        index[old] = values.len();
        let mut value: Value = value.clone();
        let precomputed = outputs.remove(&old);
        if precomputed.is_some() {
            value.role = Role::Param;
            value.storage = Storage::Persistent;
            value.init = None;
            names.push(value.name.clone());
        }
        match value.storage {
            Storage::Persistent => {
                let data = match precomputed {
                    Some(data) => data,
                    None => store
                        .get(&value.name)
                        .ok_or_else(|| ExecError::MissingTensor(value.name.clone()))?
                        .to_vec(),
                };
                let entry = Entry {
                    ty: value.ty.clone(),
                    role: value.role,
                    data,
                };
                frozen_store.entries.insert(value.name.clone(), entry);
            }
            Storage::Buffer(b) => {
                if buffer_index[b] == usize::MAX {
                    buffer_index[b] = buffers.len();
                    buffers.push(program.buffers[b]);
                }
                value.storage = Storage::Buffer(buffer_index[b]);
            }
            Storage::Feed => {}
        }
        values.push(value);
    }
    let steps = program
        .steps
        .iter()
        .zip(&once)
        .filter(|(_, &o)| !o)
        .map(|(step, _)| {
            let mut step = step.clone();
            step.inputs.iter_mut().for_each(|i| *i = index[*i]);
            step.output = index[step.output];
            step
        })
        .collect();
    let frozen = Program {
        format_version: program.format_version,
        values,
        buffers,
        steps,
        image: index[program.image],
        label: index[program.label],
        loss: index[program.loss],
        logits: program.logits.iter().map(|&l| index[l]).collect(),
    };
    frozen.check()?;
    Ok(Frozen {
        program: frozen,
        store: frozen_store,
        precomputed: names,
    })
}
