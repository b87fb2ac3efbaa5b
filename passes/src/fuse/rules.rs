//! The fusion rewrites. Each rule finds its pattern in one e-class and adds an
//! equivalent term to that class; extraction later picks the cheaper term.
//!
//! - `bn-relu-conv`: `conv(relu(bn(concat(x_1 .. x_m), s, a)), w)` (or the same
//!   without a concatenation) becomes `BnReluConv(x_1 .. x_m, s, a, w)`, which
//!   reads each input from its own buffer; its gradient recomputes the
//!   normalised, rectified input instead of storing it.
//! - `flatten-concat`: a concatenation with a concatenation among its operands
//!   becomes one concatenation of all their parts, so the inner one need not
//!   be stored.
//! - `stats-of-concat`: `BnStats(concat(x_1 .. x_m))` becomes
//!   `ConcatStats(BnStats(x_1) .. BnStats(x_m))`, because per-channel statistics of
//!   a concatenation are the statistics of its parts; hash-consing then computes
//!   the statistics of each layer output once for all its readers.
//! - `pool-conv`: `avgpool2x2(conv1x1(z, w))` becomes `conv1x1(avgpool2x2(z), w)`:
//!   both are linear and act on different axes, so they commute, and the conv
//!   then runs on a quarter of the pixels.

use egg::{Applier, Id, PatternAst, SearchMatches, Searcher, Subst, Symbol, Var};
use ldnc_ir::graph::TensorType;
use ldnc_ir::op::Op;

use super::lang::{ENode, FuseGraph};

/// A rewrite found by `find` and built by `build`.
pub trait Fusion: Send + Sync {
    /// Operand lists of every match in `class`.
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match>;
    /// Adds the replacement of one match and returns its class. By default it
    /// adds `found.op` over `found.operands`.
    fn build(&self, egraph: &mut FuseGraph, found: &Match) -> Id {
        add(egraph, &found.op, found.operands.clone())
    }
}

/// One match: the op to build and the operands it reads.
#[derive(Debug, Clone)]
pub struct Match {
    pub op: Op,
    pub operands: Vec<Id>,
    /// Extra ops for multi-node replacements (interpreted by the rule).
    pub inner: Option<Op>,
}

/// Adapts a `Fusion` to egg's `Searcher` and `Applier`: the search reports the
/// classes that match, and the applier finds the matches again on the current
/// e-graph and builds them.
pub struct Rule<F>(pub F);

impl<F: Fusion> Searcher<ENode, super::lang::Ops> for Rule<F> {
    fn search_eclass_with_limit(
        &self,
        egraph: &FuseGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, ENode>> {
        if limit == 0 || self.0.find(egraph, eclass).is_empty() {
            return None;
        }
        Some(SearchMatches {
            eclass,
            substs: vec![Subst::with_capacity(0)],
            ast: None,
        })
    }

    fn vars(&self) -> Vec<Var> {
        Vec::new()
    }
}

impl<F: Fusion> Applier<ENode, super::lang::Ops> for Rule<F> {
    fn apply_one(
        &self,
        egraph: &mut FuseGraph,
        eclass: Id,
        _subst: &Subst,
        _ast: Option<&PatternAst<ENode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let mut changed = Vec::new();
        for found in self.0.find(egraph, eclass) {
            let (name, layer) = (egraph[eclass].data.name.clone(), egraph[eclass].data.layer);
            egraph.analysis.next_name = Some((name, layer));
            let new = self.0.build(egraph, &found);
            egraph.analysis.next_name = None;
            if egraph.union(eclass, new) {
                changed.push(new);
            }
        }
        changed
    }
}

/// Adds `op(children)` to the e-graph.
pub fn add(egraph: &mut FuseGraph, op: &Op, children: Vec<Id>) -> Id {
    let index = egraph.analysis.intern(Some(op), None, None);
    egraph.add(ENode {
        op: index,
        children,
    })
}

/// Nodes of `class` with their ops.
pub(super) fn nodes<'a>(
    egraph: &'a FuseGraph,
    class: Id,
) -> impl Iterator<Item = (&'a Op, &'a [Id])> + 'a {
    egraph[class]
        .nodes
        .iter()
        .filter_map(move |n| egraph.analysis.op(n).map(|op| (op, n.children.as_slice())))
}

/// Returns the operands of a concatenation in `class`, with nested
/// concatenations flattened (a concatenation of concatenations is the
/// concatenation of their parts), or the class itself.
pub(super) fn parts(egraph: &FuseGraph, class: Id) -> Vec<Id> {
    let Some((_, children)) = nodes(egraph, class).find(|(op, _)| matches!(op, Op::Concat)) else {
        return vec![class];
    };
    children.iter().flat_map(|&c| parts(egraph, c)).collect()
}

/// Reports whether `op(operands)` passes the op's shape rule and has the type
/// of `class`, which a term must have to join the class.
pub(super) fn fits(egraph: &FuseGraph, op: &Op, operands: &[Id], class: Id) -> bool {
    let types: Vec<&TensorType> = operands.iter().map(|&c| &egraph[c].data.ty).collect();
    match op.infer(&types) {
        Ok(ty) => ty == egraph[class].data.ty,
        Err(message) => {
            tracing::debug!(
                op = op.name(),
                message,
                "a fusion match does not fit its operands"
            );
            false
        }
    }
}

pub struct BnReluConv;

impl Fusion for BnReluConv {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        let mut found = Vec::new();
        for (op, children) in nodes(egraph, class) {
            let Op::Conv2d { k, stride, pad } = *op else {
                continue;
            };
            let (z, w) = (children[0], children[1]);
            for (relu, r) in nodes(egraph, z) {
                if !matches!(relu, Op::Relu) {
                    continue;
                }
                for (bn, b) in nodes(egraph, r[0]) {
                    let Op::BnApply { eps } = *bn else { continue };
                    let mut operands = parts(egraph, b[0]);
                    operands.extend([b[1], b[2], w]);
                    let op = Op::BnReluConv {
                        k,
                        stride,
                        pad,
                        eps,
                    };
                    if fits(egraph, &op, &operands, class) {
                        found.push(Match {
                            op,
                            operands,
                            inner: None,
                        });
                    }
                }
            }
        }
        found.truncate(1);
        found
    }
}

pub struct FlattenConcat;

impl Fusion for FlattenConcat {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        for (op, children) in nodes(egraph, class) {
            if !matches!(op, Op::Concat) {
                continue;
            }
            let flat = parts(egraph, class);
            if flat.len() > children.len() && fits(egraph, &Op::Concat, &flat, class) {
                return vec![Match {
                    op: Op::Concat,
                    operands: flat,
                    inner: None,
                }];
            }
        }
        Vec::new()
    }
}

pub struct StatsOfConcat;

impl Fusion for StatsOfConcat {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        for (op, children) in nodes(egraph, class) {
            if !matches!(op, Op::BnStats) {
                continue;
            }
            let xs = parts(egraph, children[0]);
            // The parts' channels add up to the concatenation's by its shape
            // rule, so the concatenated statistics have the class's type.
            if xs.len() > 1 {
                return vec![Match {
                    op: Op::ConcatStats,
                    operands: xs,
                    inner: Some(Op::BnStats),
                }];
            }
        }
        Vec::new()
    }

    fn build(&self, egraph: &mut FuseGraph, found: &Match) -> Id {
        let stats: Vec<Id> = found
            .operands
            .iter()
            .map(|&x| {
                let name = format!("{}.stats", egraph[x].data.name);
                egraph.analysis.next_name = Some((name, egraph[x].data.layer));
                add(egraph, &Op::BnStats, vec![x])
            })
            .collect();
        add(egraph, &found.op, stats)
    }
}

pub struct PoolConv;

const POOL2: Op = Op::AvgPool {
    k: 2,
    stride: 2,
    pad: 0,
};
const CONV1: Op = Op::Conv2d {
    k: 1,
    stride: 1,
    pad: 0,
};

impl Fusion for PoolConv {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        for (op, children) in nodes(egraph, class) {
            if *op != POOL2 {
                continue;
            }
            for (inner, c) in nodes(egraph, children[0]) {
                // A 1x1 conv keeps the spatial size, so pooling its input
                // gives the shape of the pooled output.
                if *inner == CONV1 {
                    return vec![Match {
                        op: CONV1,
                        operands: c.to_vec(),
                        inner: Some(POOL2),
                    }];
                }
            }
        }
        Vec::new()
    }

    fn build(&self, egraph: &mut FuseGraph, found: &Match) -> Id {
        let z = found.operands[0];
        let pool = found.inner.as_ref().expect("pool-conv records the pool");
        let outer = egraph.analysis.next_name.take();
        let name = format!("{}.pool", egraph[z].data.name);
        egraph.analysis.next_name = Some((name, egraph[z].data.layer));
        let pooled = add(egraph, pool, vec![z]);
        egraph.analysis.next_name = outer;
        add(egraph, &found.op, vec![pooled, found.operands[1]])
    }
}
