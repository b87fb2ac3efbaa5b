//! The `Program`: an ordered list of steps over values, and the buffer each value
//! lives in. Codegen produces it; the runtime executes it without linking the
//! compiler passes.
//!
//! Values with a persistent role (parameters, running statistics, velocities) are
//! named and live in the executor's parameter store; every other value lives in
//! one of the program's temporary buffers, which several values may share when
//! their lifetimes do not overlap. An update step writes into the buffer of its
//! first operand.

use serde::{Deserialize, Serialize};

use crate::graph::TensorType;
use crate::op::{Init, Op, Role};
use crate::spec::NetSpec;
use crate::{Error, Result};

/// Version of the serialised program format; readers reject any other.
pub const FORMAT_VERSION: u32 = 1;

/// Where a value is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Storage {
    /// In the parameter store under the value's name.
    Persistent,
    /// In temporary buffer `n`.
    Buffer(usize),
    /// Fed by the data loader.
    Feed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Value {
    pub name: String,
    pub ty: TensorType,
    pub role: Role,
    pub storage: Storage,
    /// Initialiser of a persistent value.
    pub init: Option<Init>,
}

/// A temporary buffer, sized for the largest value assigned to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buffer {
    /// Elements per image of a batched buffer, or total elements of an unbatched one.
    pub per_item: usize,
    pub batched: bool,
}

impl Buffer {
    pub fn numel(&self, batch: usize) -> usize {
        if self.batched {
            self.per_item * batch
        } else {
            self.per_item
        }
    }
}

/// One op applied to values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub op: Op,
    pub inputs: Vec<usize>,
    pub output: usize,
}

/// A scheduled, buffer-assigned program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub format_version: u32,
    pub values: Vec<Value>,
    pub buffers: Vec<Buffer>,
    pub steps: Vec<Step>,
    pub image: usize,
    pub label: usize,
    /// Value of the total loss.
    pub loss: usize,
    /// Logits of each head; the last is the final prediction.
    pub logits: Vec<usize>,
}

/// The training and evaluation programs of one network, with its spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompiledNet {
    pub format_version: u32,
    pub spec: NetSpec,
    pub train: Program,
    pub eval: Program,
}

impl Program {
    /// Bytes of all temporary buffers at batch size `batch`.
    pub fn buffer_bytes(&self, batch: usize) -> u64 {
        self.buffers.iter().map(|b| 4 * b.numel(batch) as u64).sum()
    }

    /// Persistent values, in program order.
    pub fn persistent(&self) -> impl Iterator<Item = &Value> {
        self.values
            .iter()
            .filter(|v| v.storage == Storage::Persistent)
    }

    /// Checks internal consistency: value ids in range, every temporary value is
    /// written before it is read, buffers large enough, no value written twice.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Program(m));
        if self.format_version != FORMAT_VERSION {
            return bad(format!(
                "format version {} is not the supported version {FORMAT_VERSION}",
                self.format_version
            ));
        }
        let mut written = vec![false; self.values.len()];
        for (i, v) in self.values.iter().enumerate() {
            match v.storage {
                Storage::Persistent | Storage::Feed => written[i] = true,
                Storage::Buffer(b) => {
                    let Some(buf) = self.buffers.get(b) else {
                        return bad(format!("value {} uses missing buffer {b}", v.name));
                    };
                    if buf.per_item < v.ty.per_item() || buf.batched != v.ty.batched {
                        return bad(format!("buffer {b} is too small for value {}", v.name));
                    }
                }
            }
        }
        for (s, step) in self.steps.iter().enumerate() {
            for &i in &step.inputs {
                if i >= self.values.len() || !written[i] {
                    return bad(format!(
                        "step {s} ({}) reads value {i} before it is written",
                        step.op.name()
                    ));
                }
            }
            if step.output >= self.values.len() {
                return bad(format!("step {s} writes missing value {}", step.output));
            }
            if step.op.role() != Role::Update && written[step.output] {
                return bad(format!(
                    "step {s} overwrites value {}",
                    self.values[step.output].name
                ));
            }
            written[step.output] = true;
        }
        Ok(())
    }
}

/// The order of a graph's nodes and where each value is stored: what the scheduler
/// and memory planner hand to codegen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Nodes in execution order (leaves included; they generate no step).
    pub order: Vec<crate::graph::ValueId>,
    /// Storage of every node, indexed by node index.
    pub storage: Vec<Storage>,
    pub buffers: Vec<Buffer>,
}

/// Entry points of a graph that lowering exposes in the program: the fed image
/// and label, the loss and the logits of every head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roots {
    pub image: crate::graph::ValueId,
    pub label: crate::graph::ValueId,
    pub loss: crate::graph::ValueId,
    pub logits: Vec<crate::graph::ValueId>,
}
