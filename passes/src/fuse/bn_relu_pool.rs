//! Rewrites that pool a BN-ReLU output without writing it.
//!
//! - `bn-relu-gap`: a classification head,
//!   `GlobalAvgPool(Relu(BnApply(concat(x_1 .. x_m), s, a)))` or the same
//!   without a concatenation, becomes `BnReluGlobalAvgPool(x_1 .. x_m, s, a)`.
//! - `bn-relu-pool`: `AvgPool(Relu(BnApply(..)))` becomes `BnReluAvgPool`. This
//!   is the transition `BN-ReLU-conv1x1-pool` once `pool-conv` has moved the
//!   pooling before the conv, so the conv reads the pooled, rectified input.
//!
//! Both fused ops read each input from its own buffer and normalise and
//! rectify while they pool, so neither the concatenation nor the BN and ReLU
//! outputs are written. They apply in training and evaluation networks alike.
//! In a training graph the rules in `backward` turn the gradient terms below
//! the pool (ReLU backward, then batch-norm backward) into the recomputing
//! `BnReluBackward` and `BnReluAffineGrad`, so the backward pass does not read
//! those outputs either.

use egg::Id;
use ldnc_ir::op::Op;

use super::lang::FuseGraph;
use super::rules::{nodes, parts, Fusion, Match};

/// Pools `relu(bn(x))` with the pooling of `pool`, a `GlobalAvgPool`
/// (`bn-relu-gap`) or an `AvgPool` (`bn-relu-pool`).
pub struct BnReluPool {
    pub global: bool,
}

impl BnReluPool {
    /// The fused op that replaces `pool`, or `None` when the rule does not
    /// handle that op.
    fn fused(&self, pool: &Op, eps: f32) -> Option<Op> {
        match *pool {
            Op::GlobalAvgPool if self.global => Some(Op::BnReluGlobalAvgPool { eps }),
            Op::AvgPool { k, stride, pad } if !self.global => Some(Op::BnReluAvgPool {
                k,
                stride,
                pad,
                eps,
            }),
            _ => None,
        }
    }
}

impl Fusion for BnReluPool {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        for (op, children) in nodes(egraph, class) {
            if self.fused(op, 0.0).is_none() {
                continue;
            }
            for (relu, r) in nodes(egraph, children[0]) {
                if !matches!(relu, Op::Relu) {
                    continue;
                }
                for (bn, b) in nodes(egraph, r[0]) {
                    let Op::BnApply { eps } = *bn else { continue };
                    let mut operands = parts(egraph, b[0]);
                    operands.extend([b[1], b[2]]);
                    return vec![Match {
                        op: self.fused(op, eps).expect("checked above"),
                        operands,
                        inner: None,
                    }];
                }
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use ldnc_ir::spec::NetSpec;
    use ldnc_ir::{expand, Mode, Op};

    use crate::fuse::fuse;

    fn applied(report: &crate::fuse::FuseReport, rule: &str) -> usize {
        report
            .applied
            .iter()
            .filter(|(name, _)| name == rule)
            .map(|&(_, n)| n)
            .sum()
    }

    #[test]
    fn every_head_pools_without_writing_bn_relu() {
        let spec = NetSpec::from_ron("(blocks: [2, 2], growth: 4, deep_supervision: true)", "t")
            .expect("the test spec parses");
        for mode in [Mode::Train, Mode::Eval] {
            let net = expand(&spec, mode).expect("the test spec expands");
            let (fused, report) = fuse(&net, &Default::default()).expect("fusion succeeds");
            let rule = report
                .applied
                .iter()
                .find(|(name, _)| name == "bn-relu-gap");
            assert!(
                rule.is_some_and(|&(_, n)| n > 0),
                "{mode:?}: {:?}",
                report.applied
            );
            let ops = || fused.graph.ids().map(|id| &fused.graph.node(id).op);
            let heads = ops()
                .filter(|op| matches!(op, Op::BnReluGlobalAvgPool { .. }))
                .count();
            assert_eq!(heads, net.heads.len(), "{mode:?}");
            let gap = ops().filter(|op| matches!(op, Op::GlobalAvgPool)).count();
            assert_eq!(gap, 0, "{mode:?}: a head still pools a written tensor");
        }
    }

    #[test]
    fn transitions_pool_without_writing_bn_relu() {
        for transition in ["Independent", "Classic(compression: 0.5)"] {
            let text = format!("(blocks: [2, 2], growth: 4, transition: {transition})");
            let spec = NetSpec::from_ron(&text, "t").expect("the test spec parses");
            for mode in [Mode::Train, Mode::Eval] {
                let net = expand(&spec, mode).expect("the test spec expands");
                let (fused, report) = fuse(&net, &Default::default()).expect("fusion succeeds");
                assert!(
                    applied(&report, "bn-relu-pool") > 0,
                    "{transition} {mode:?}"
                );
                let ops = || fused.graph.ids().map(|id| &fused.graph.node(id).op);
                let pools = ops()
                    .filter(|op| matches!(op, Op::BnReluAvgPool { .. }))
                    .count();
                assert!(
                    pools > 0,
                    "{transition} {mode:?}: no transition pools in place"
                );
                let names: Vec<&str> = fused
                    .graph
                    .ids()
                    .filter(|&id| matches!(fused.graph.node(id).op, Op::BnApply { .. }))
                    .map(|id| fused.graph.node(id).name.as_str())
                    .collect();
                assert!(
                    names.is_empty(),
                    "{transition} {mode:?}: {names:?} still written"
                );
            }
        }
    }
}
