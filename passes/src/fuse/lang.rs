//! The e-graph language of the fusion pass: one e-node per IR op, with the op
//! interned in a table so e-nodes stay small, hashable and ordered.
//!
//! Leaves (parameters, running statistics, images, labels) and ops with
//! identity (dropout masks, updates) are interned with their node name, so two
//! different parameters never merge; every other op is interned by value, so
//! hash-consing merges identical computations (for example the batch statistics
//! of one layer output read by several later layers).

use std::collections::HashMap;

use egg::{DidMerge, EGraph, Id, Language};
use ldnc_ir::graph::TensorType;
use ldnc_ir::op::{Op, Role};

/// An e-node: an interned op and its operand classes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ENode {
    pub op: u32,
    pub children: Vec<Id>,
}

impl Language for ENode {
    type Discriminant = u32;

    fn discriminant(&self) -> u32 {
        self.op
    }

    fn matches(&self, other: &Self) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

/// An interned op; `None` is the root that ties all graph outputs together.
#[derive(Debug, Clone)]
pub struct Interned {
    pub op: Option<Op>,
    /// Type and name of a leaf, which its shape rule cannot infer.
    pub leaf: Option<(TensorType, String)>,
}

/// Per-class facts: the tensor type (equal for every node of a class, which is
/// what makes a rewrite shape-correct), and a name and feature layer for the
/// nodes extraction creates.
#[derive(Debug, Clone)]
pub struct ClassData {
    pub ty: TensorType,
    pub name: String,
    pub layer: Option<usize>,
}

/// The analysis: the op table plus the name given to the next new class.
#[derive(Debug, Default)]
pub struct Ops {
    pub table: Vec<Interned>,
    keys: HashMap<String, u32>,
    /// Name and layer for classes created by the next `add`.
    pub next_name: Option<(String, Option<usize>)>,
}

impl Ops {
    /// Interns `op`; `identity` distinguishes ops that must never merge.
    pub fn intern(
        &mut self,
        op: Option<&Op>,
        identity: Option<&str>,
        leaf: Option<TensorType>,
    ) -> u32 {
        let mut key = match op {
            Some(op) => serde_json::to_string(op).expect("ops serialise"),
            None => "root".to_string(),
        };
        if let Some(id) = identity {
            key.push('#');
            key.push_str(id);
        }
        if let Some(&index) = self.keys.get(&key) {
            return index;
        }
        let index = self.table.len() as u32;
        self.table.push(Interned {
            op: op.cloned(),
            leaf: leaf.map(|ty| (ty, identity.unwrap_or_default().to_string())),
        });
        self.keys.insert(key, index);
        index
    }

    pub fn op(&self, node: &ENode) -> Option<&Op> {
        self.table[node.op as usize].op.as_ref()
    }
}

/// Reports whether an op keeps its own identity in the e-graph.
pub fn has_identity(op: &Op) -> bool {
    matches!(
        op.role(),
        Role::Image | Role::Label | Role::Param | Role::State | Role::OptState | Role::Update
    ) || matches!(op, Op::DropoutMask { .. })
}

pub type FuseGraph = EGraph<ENode, Ops>;

impl egg::Analysis<ENode> for Ops {
    type Data = ClassData;

    fn make(egraph: &mut FuseGraph, enode: &ENode, _id: Id) -> ClassData {
        let (name, layer) = egraph
            .analysis
            .next_name
            .clone()
            .unwrap_or_else(|| ("fused".to_string(), None));
        let entry = &egraph.analysis.table[enode.op as usize];
        if let Some((ty, leaf_name)) = &entry.leaf {
            return ClassData {
                ty: ty.clone(),
                name: leaf_name.clone(),
                layer: None,
            };
        }
        let ty = match &entry.op {
            None => TensorType::fixed(&[]),
            Some(op) => {
                let types: Vec<&TensorType> =
                    enode.children.iter().map(|&c| &egraph[c].data.ty).collect();
                // Rewrites only build nodes whose shape rule holds; a failure here is a
                // bug in a rule, so the message names the op and operands.
                op.infer(&types).unwrap_or_else(|message| {
                    panic!("fusion built an ill-typed {} node: {message}", op.name())
                })
            }
        };
        ClassData { ty, name, layer }
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        debug_assert_eq!(a.ty, b.ty, "a rewrite merged classes of different types");
        // Keep the older class's name, which is the one from the source graph.
        DidMerge(false, a.name != b.name)
    }
}
