//! The tensor-graph IR: a petgraph `DiGraph` whose nodes are ops producing one
//! tensor each and whose edges carry the operand position.
//!
//! Tensors are NHWC and f32. A tensor type records whether it carries the batch
//! dimension, so one graph serves every batch size: `[h, w, c]` with
//! `batched: true` is an `N x h x w x c` activation, `[kh, kw, cin, cout]` with
//! `batched: false` a conv weight. Nodes are added in topological order, so node
//! index order is a valid schedule; `Graph::add` checks the operand shapes
//! against the op's shape rule and names the node in any error.

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Serialize};

use crate::op::{Op, Role};
use crate::{Error, Result};

/// Index of a node, which is also the index of the value it produces.
pub type ValueId = NodeIndex<u32>;

/// Shape of a tensor, with or without the leading batch dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub batched: bool,
    pub dims: Vec<usize>,
}

impl TensorType {
    pub fn batched(dims: &[usize]) -> TensorType {
        TensorType {
            batched: true,
            dims: dims.to_vec(),
        }
    }

    pub fn fixed(dims: &[usize]) -> TensorType {
        TensorType {
            batched: false,
            dims: dims.to_vec(),
        }
    }

    /// Number of elements for one image (or of the whole tensor when unbatched).
    pub fn per_item(&self) -> usize {
        self.dims.iter().product()
    }

    /// Number of elements at batch size `n`.
    pub fn numel(&self, n: usize) -> usize {
        if self.batched {
            n * self.per_item()
        } else {
            self.per_item()
        }
    }

    /// The last dimension: channels of an activation, classes of logits.
    pub fn channels(&self) -> usize {
        *self.dims.last().unwrap_or(&1)
    }
}

impl std::fmt::Display for TensorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self.dims.iter().map(|d| d.to_string()).collect();
        if self.batched {
            write!(f, "[N, {}]", dims.join(", "))
        } else {
            write!(f, "[{}]", dims.join(", "))
        }
    }
}

/// One op of the graph and the tensor it produces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    /// Hierarchical name such as `layer7.conv1` (parameters are saved under it).
    pub name: String,
    /// Feature layer this node belongs to, if any (`Some(0)` for the stem).
    pub layer: Option<usize>,
}

/// A directed acyclic graph of ops. Edge weights are operand positions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Graph {
    pub g: DiGraph<Node, u32>,
    /// Values the graph exports (losses, logits, gradients, side-effect sinks).
    pub outputs: Vec<ValueId>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Adds a node after checking its operands against the op's shape rule.
    pub fn add(&mut self, op: Op, inputs: &[ValueId], name: impl Into<String>) -> Result<ValueId> {
        let name = name.into();
        let types: Vec<&TensorType> = inputs.iter().map(|&v| &self.g[v].ty).collect();
        let ty = op.infer(&types).map_err(|message| Error::Shape {
            node: name.clone(),
            op: op.name().to_string(),
            message,
        })?;
        Ok(self.add_typed(op, inputs, name, ty))
    }

    /// Adds a node whose type the caller already knows (parameters, inputs, or a
    /// rewrite that preserves the type of the node it replaces).
    pub fn add_typed(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        name: impl Into<String>,
        ty: TensorType,
    ) -> ValueId {
        let id = self.g.add_node(Node {
            op,
            ty,
            name: name.into(),
            layer: None,
        });
        for (pos, &input) in inputs.iter().enumerate() {
            self.g.add_edge(input, id, pos as u32);
        }
        id
    }

    /// Operands of `id`, in operand order.
    pub fn inputs(&self, id: ValueId) -> Vec<ValueId> {
        let mut edges: Vec<(u32, ValueId)> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        edges.sort_unstable();
        edges.into_iter().map(|(_, v)| v).collect()
    }

    /// Nodes that read `id`.
    pub fn users(&self, id: ValueId) -> Vec<ValueId> {
        let mut users: Vec<ValueId> = self
            .g
            .edges_directed(id, Direction::Outgoing)
            .map(|e| e.target())
            .collect();
        users.sort_unstable();
        users.dedup();
        users
    }

    pub fn node(&self, id: ValueId) -> &Node {
        &self.g[id]
    }

    pub fn node_mut(&mut self, id: ValueId) -> &mut Node {
        &mut self.g[id]
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// Node ids in insertion order, which is topological.
    pub fn ids(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.g.node_indices()
    }

    /// Parameters (trainable tensors) in insertion order.
    pub fn params(&self) -> Vec<ValueId> {
        self.ids()
            .filter(|&id| matches!(self.g[id].op.role(), Role::Param))
            .collect()
    }

    /// Non-trainable state (batch-norm running statistics) in insertion order.
    pub fn states(&self) -> Vec<ValueId> {
        self.ids()
            .filter(|&id| matches!(self.g[id].op.role(), Role::State))
            .collect()
    }

    /// The first node whose name is `name`.
    pub fn find(&self, name: &str) -> Option<ValueId> {
        self.ids().find(|&id| self.g[id].name == name)
    }

    /// Total trainable parameter count.
    pub fn param_count(&self) -> usize {
        self.params()
            .iter()
            .map(|&id| self.g[id].ty.per_item())
            .sum()
    }

    /// Multiply-accumulates per image of every node (convs and linear layers only).
    pub fn macs_per_image(&self) -> u64 {
        self.ids()
            .map(|id| {
                let inputs: Vec<&TensorType> =
                    self.inputs(id).iter().map(|&v| &self.g[v].ty).collect();
                self.g[id].op.macs(&inputs, &self.g[id].ty)
            })
            .sum()
    }
}
