//! Rewrites that fold an evaluation-mode batch norm into the conv before it.
//!
//! With running statistics, batch norm is a fixed per-channel affine map
//! `bn(y) = s * y + t` with `s = gamma / sqrt(var + eps)` and
//! `t = beta - mean * s`. A conv is linear in each output channel's filter, so
//! `bn(conv(x, w)) = conv(x, w * s) + t`:
//!
//! - `fold-bn`: `BnApply(Conv2d(x, w), running, affine)` becomes
//!   `Conv2dBias(x, BnFoldWeight(w, running, affine), BnFoldBias(running, affine))`,
//!   and `BnApply(BnReluConv(x.., stats, affine0, w), ..)` becomes the
//!   `BnReluConvBias` with the same folded weight and bias. The rule needs
//!   the statistics operand to be a `State` leaf (running statistics), so it
//!   never fires in a training network, where batch norm reads `BnStats`. It
//!   also needs every reader of the conv output to apply this same batch
//!   norm, alone or inside a `BnReluConv`, so the folded conv replaces the
//!   original instead of running beside it.
//! - `bias-relu`: `Relu(Conv2dBias(..))` becomes `Conv2dBias { relu: true }`,
//!   and likewise for `BnReluConvBias`, so the conv writes the rectified
//!   output and the next conv reads it as a plain `Conv2d` instead of
//!   normalising every element it loads.
//!
//! The fold ops read parameters and state only, so an evaluation program
//! computes them once per batch. Extraction counts them as free, and
//! [`elementwise_flops`] adds the per-element work of normalising, rectifying
//! and adding a bias, which is what makes the folded form the cheaper one.

use egg::Id;
use ldnc_ir::op::Op;
use ldnc_ir::TensorType;

use super::lang::{ENode, FuseGraph};
use super::rules::{add, nodes, Fusion, Match};

pub struct FoldBn;

impl Fusion for FoldBn {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        let mut found = Vec::new();
        for (op, children) in nodes(egraph, class) {
            let Op::BnApply { eps } = *op else { continue };
            let (y, running, affine) = (children[0], children[1], children[2]);
            if !is_state(egraph, running) || !only_normalised(egraph, y, eps, running, affine) {
                continue;
            }
            for (conv, operands) in nodes(egraph, y) {
                let folded = match *conv {
                    Op::Conv2d { k, stride, pad } => Op::Conv2dBias {
                        k,
                        stride,
                        pad,
                        relu: false,
                    },
                    Op::BnReluConv {
                        k,
                        stride,
                        pad,
                        eps: inner_eps,
                    } => Op::BnReluConvBias {
                        k,
                        stride,
                        pad,
                        eps: inner_eps,
                        relu: false,
                    },
                    _ => continue,
                };
                let mut operands = operands.to_vec();
                operands.extend([running, affine]);
                found.push(Match {
                    op: folded,
                    operands,
                    inner: Some(Op::BnFoldWeight { eps }),
                });
            }
        }
        found
    }

    /// Builds the folded conv from operands `(conv operands .., w, running, affine)`.
    fn build(&self, egraph: &mut FuseGraph, found: &Match) -> Id {
        let Some(Op::BnFoldWeight { eps }) = found.inner else {
            unreachable!("fold-bn records the folded weight op")
        };
        let mut operands = found.operands.clone();
        let affine = operands
            .pop()
            .expect("fold-bn records the affine parameters");
        let running = operands
            .pop()
            .expect("fold-bn records the running statistics");
        let w = operands.pop().expect("a conv reads a weight");

        let outer = egraph.analysis.next_name.take();
        let name = format!("{}.folded", egraph[w].data.name);
        egraph.analysis.next_name = Some((name, None));
        let weight = add(egraph, &Op::BnFoldWeight { eps }, vec![w, running, affine]);
        let name = format!("{}.folded_bias", egraph[affine].data.name);
        egraph.analysis.next_name = Some((name, None));
        let bias = add(egraph, &Op::BnFoldBias { eps }, vec![running, affine]);
        egraph.analysis.next_name = outer;

        operands.extend([weight, bias]);
        add(egraph, &found.op, operands)
    }
}

/// Reports whether `class` is a `State` leaf (running statistics).
fn is_state(egraph: &FuseGraph, class: Id) -> bool {
    nodes(egraph, class).any(|(op, _)| matches!(op, Op::State { .. }))
}

/// Reports whether every e-node that reads `y` applies the batch norm
/// `(eps, running, affine)` to it, alone or as the input of a `BnReluConv`.
/// A graph output, or any other reader, keeps the unfolded conv alive.
fn only_normalised(egraph: &FuseGraph, y: Id, eps: f32, running: Id, affine: Id) -> bool {
    let y = egraph.find(y);
    let expected = [y, egraph.find(running), egraph.find(affine)];
    egraph[y].parents().all(|parent| {
        let node = egraph.id_to_node(parent);
        let children: Vec<Id> = node.children.iter().map(|&c| egraph.find(c)).collect();
        match egraph.analysis.op(node) {
            Some(Op::BnApply { eps: e }) => *e == eps && children == expected,
            Some(Op::BnReluConv { eps: e, .. }) => *e == eps && children[..3] == expected,
            _ => false,
        }
    })
}

pub struct BiasRelu;

impl Fusion for BiasRelu {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        let mut found = Vec::new();
        for (op, children) in nodes(egraph, class) {
            if !matches!(op, Op::Relu) {
                continue;
            }
            for (conv, operands) in nodes(egraph, children[0]) {
                let rectified = match *conv {
                    Op::Conv2dBias {
                        k,
                        stride,
                        pad,
                        relu: false,
                    } => Op::Conv2dBias {
                        k,
                        stride,
                        pad,
                        relu: true,
                    },
                    Op::BnReluConvBias {
                        k,
                        stride,
                        pad,
                        eps,
                        relu: false,
                    } => Op::BnReluConvBias {
                        k,
                        stride,
                        pad,
                        eps,
                        relu: true,
                    },
                    _ => continue,
                };
                found.push(Match {
                    op: rectified,
                    operands: operands.to_vec(),
                    inner: None,
                });
            }
        }
        found
    }
}

/// Reports whether extraction should not count `node`, an e-node of `class`,
/// as a reader of its operands: a folded conv, or a `BnApply` whose class
/// also contains its folded conv.
///
/// A class with several readers counts as shared, and a shared class costs
/// its readers nothing. A folded conv reads the operands of the conv it
/// replaces, and the `BnApply` it replaces reads the conv output, so counting
/// them would make the unfolded conv and its input look shared, and so free,
/// whichever form extraction picks.
pub fn is_folded_away(egraph: &FuseGraph, class: Id, node: &ENode) -> bool {
    match egraph.analysis.op(node) {
        Some(op) if is_folded_conv(op) => true,
        Some(Op::BnApply { .. }) => nodes(egraph, class).any(|(op, _)| is_folded_conv(op)),
        _ => false,
    }
}

/// Reports whether `op` is a conv with a folded batch norm.
pub fn is_folded_conv(op: &Op) -> bool {
    matches!(op, Op::Conv2dBias { .. } | Op::BnReluConvBias { .. })
}

/// Reports whether `op` only transforms parameters and state, so it runs once
/// per batch, not once per image, and extraction counts it as free.
pub fn is_weight_transform(op: &Op) -> bool {
    matches!(op, Op::BnFoldWeight { .. } | Op::BnFoldBias { .. })
}

/// FLOPs per image of the element-wise work that [`Op::macs`] leaves out:
/// 2 per normalised element (a multiply and an add), 1 per rectified,
/// biased or pooled element. A fused conv normalises and rectifies every element of
/// its implicit im2col matrix, `macs / C_out` of them, because it recomputes
/// `relu(bn(x))` at each filter tap instead of storing it.
pub fn elementwise_flops(op: &Op, inputs: &[&TensorType], out: &TensorType) -> f64 {
    let elements = |t: &TensorType| t.per_item() as f64;
    let im2col = || op.macs(inputs, out) as f64 / out.channels().max(1) as f64;
    match op {
        Op::BnApply { .. } => 2.0 * elements(out),
        Op::Relu => elements(out),
        Op::BnReluConv { .. } => 3.0 * im2col(),
        Op::Conv2dBias { relu, .. } => (1.0 + f64::from(u8::from(*relu))) * elements(out),
        Op::BnReluConvBias { relu, .. } => {
            3.0 * im2col() + (1.0 + f64::from(u8::from(*relu))) * elements(out)
        }
        Op::GlobalAvgPool | Op::AvgPool { .. } => elements(inputs[0]),
        Op::BnReluGlobalAvgPool { .. } | Op::BnReluAvgPool { .. } => {
            let xs = &inputs[..inputs.len() - 2];
            4.0 * xs.iter().map(|&x| elements(x)).sum::<f64>()
        }
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use ldnc_ir::expand::Network;
    use ldnc_ir::spec::NetSpec;
    use ldnc_ir::{expand, Mode, Op};

    use crate::fuse::{fuse, FuseReport};

    fn fused(text: &str, mode: Mode) -> (Network, Network, FuseReport) {
        let spec = NetSpec::from_ron(text, "inline").expect("the test spec parses");
        let net = expand(&spec, mode).expect("the test spec expands");
        let (fused, report) = fuse(&net, &Default::default()).expect("fusion succeeds");
        (net, fused, report)
    }

    fn applied(report: &FuseReport, rule: &str) -> usize {
        report
            .applied
            .iter()
            .filter(|(name, _)| name == rule)
            .map(|&(_, n)| n)
            .sum()
    }

    fn count(net: &Network, keep: impl Fn(&Op) -> bool) -> usize {
        net.graph
            .ids()
            .filter(|&id| keep(&net.graph.node(id).op))
            .count()
    }

    fn is_conv(op: &Op) -> bool {
        matches!(
            op,
            Op::Conv2d { .. }
                | Op::Conv2dBias { .. }
                | Op::BnReluConv { .. }
                | Op::BnReluConvBias { .. }
        )
    }

    #[test]
    fn bottleneck_bn_folds_in_eval() {
        let (net, fused, report) = fused("(blocks: [3, 3], growth: 4)", Mode::Eval);
        assert!(applied(&report, "fold-bn") > 0, "{:?}", report.applied);
        assert!(applied(&report, "bias-relu") > 0, "{:?}", report.applied);
        let folded = count(&fused, |op| {
            matches!(op, Op::BnReluConvBias { relu: true, .. })
        });
        assert_eq!(folded, 6, "one folded bottleneck conv per layer");
        assert_eq!(
            count(&fused, is_conv),
            count(&net, is_conv),
            "no conv runs twice"
        );
        let mut readers = vec![0; fused.graph.len()];
        for id in fused.graph.ids() {
            for x in fused.graph.inputs(id) {
                readers[x.index()] += 1;
            }
        }
        for id in fused.graph.ids() {
            if matches!(fused.graph.node(id).op, Op::BnApply { .. }) {
                let x = fused.graph.inputs(id)[0];
                let private = is_conv(&fused.graph.node(x).op) && readers[x.index()] == 1;
                let name = &fused.graph.node(id).name;
                assert!(
                    !private,
                    "{name} normalises a conv output that only it reads"
                );
            }
        }
    }

    #[test]
    fn plain_stem_folds_into_conv_bias() {
        let (_, fused, report) = fused(
            "(blocks: [2], growth: 4, stem: Plain, bottleneck: None)",
            Mode::Eval,
        );
        assert!(applied(&report, "fold-bn") > 0, "{:?}", report.applied);
        let stem = count(&fused, |op| matches!(op, Op::Conv2dBias { relu: true, .. }));
        assert_eq!(stem, 1, "the stem conv absorbs its BN and ReLU");
        assert_eq!(count(&fused, |op| matches!(op, Op::BnFoldBias { .. })), 1);
    }

    #[test]
    fn training_keeps_batch_norm() {
        let (_, fused, report) = fused("(blocks: [3, 3], growth: 4, stem: Plain)", Mode::Train);
        assert_eq!(applied(&report, "fold-bn"), 0);
        let folds = count(&fused, |op| {
            is_weight_transform(op) || matches!(op, Op::Conv2dBias { .. })
        });
        assert_eq!(folds, 0);
    }

    use super::is_weight_transform;
}
