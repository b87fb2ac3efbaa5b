//! The backward fusion rewrites. Autodiff differentiates the unfused network,
//! so the gradient of `conv(relu(bn(concat(x_1 .. x_m), s, a)), w)` reads the
//! concatenation `c`, the BN output `b` and the ReLU output `z`. These rules add
//! fused terms that read the layer outputs `x_i` instead and recompute `c`, `b`
//! and `z` while loading. Once every reader has a fused term, extraction stores
//! none of the three.
//!
//! - `bn-relu-conv-filter`: `Conv2dBackwardFilter(z, dy)` becomes
//!   `BnReluConvBackwardFilter(x_1 .. x_m, s, a, dy)`.
//! - `bn-relu-backward`: `BnBackward(c, s, a, ReluBackward(b, dz))` becomes
//!   `BnReluBackward(x_1 .. x_m, s, a, dz)`, so the ReLU mask is applied inside
//!   the BN backward. The slices that autodiff takes of the concatenation's
//!   gradient then read the fused gradient.
//! - `bn-relu-backward-part`: `Slice { start, len }(BnReluBackward(x_1 .. x_m, s, a, dz))`,
//!   where channels `start .. start + len` are exactly those of a run of
//!   consecutive inputs `x_j .. x_k`, becomes
//!   `BnReluBackwardPart { start }(x_j .. x_k, s, a, da, dz)` with
//!   `da = BnReluAffineGrad(x_1 .. x_m, s, a, dz)`. Batch norm is per
//!   channel, so those channels' gradient needs only their inputs, their
//!   columns and the two per-channel sums that `da` contains (and that
//!   `bn-relu-affine-grad` computes anyway). Once every slice takes this form
//!   the gradient of the whole concatenation is neither written nor copied.
//! - `bn-relu-affine-grad`: `BnAffineGrad(c, s, ReluBackward(b, dz))` becomes
//!   `BnReluAffineGrad(x_1 .. x_m, s, a, dz)`.
//!
//! Each rule checks that `b` is `BnApply(c, s, a)` with the same statistics,
//! affine parameters and epsilon as the op it replaces, and that the fused op's
//! shape rule gives the class's type.
//!
//! Two more rules carry the forward `pool-conv` reordering (a 1x1 conv
//! commutes with 2x2 average pooling) into the backward pass, where the
//! gradient of `avgpool(conv1x1(z, w))` is otherwise computed at full
//! resolution. With `dconv = AvgPoolBackward(dy)`:
//!
//! - `pool-conv-filter`: `Conv2dBackwardFilter(z, dconv)` becomes
//!   `Conv2dBackwardFilter(avgpool(z), dy)`, because the pool backward spreads
//!   `dy / 4` over each window, so summing `z * dconv` over a window sums
//!   `avgpool(z) * dy`. Pixels outside every window get no gradient either way.
//! - `pool-conv-data`: `Conv2dBackwardData(dconv, w)` becomes
//!   `AvgPoolBackward(Conv2dBackwardData(dy, w))`, because the 1x1 data
//!   gradient mixes channels per pixel and the pool backward is linear per
//!   channel.

use std::ops::Range;

use egg::Id;
use ldnc_ir::op::Op;
use ldnc_ir::TensorType;

use super::lang::FuseGraph;
use super::rules::{add, fits, nodes, parts, Fusion, Match};

/// Finds `(a, dz)` for every `ReluBackward(BnApply { eps }(c, s, a), dz)` node
/// in `class`, comparing `c` and `s` by e-class. The backward rules use it to
/// check that the ReLU mask comes from the batch norm that they replace.
fn relu_backwards_of_bn(egraph: &FuseGraph, class: Id, c: Id, s: Id, eps: f32) -> Vec<[Id; 2]> {
    let (c, s) = (egraph.find(c), egraph.find(s));
    let mut found = Vec::new();
    for (relu, r) in nodes(egraph, class) {
        if !matches!(relu, Op::ReluBackward) {
            continue;
        }
        for (bn, b) in nodes(egraph, r[0]) {
            let Op::BnApply { eps: e } = *bn else {
                continue;
            };
            if e == eps && egraph.find(b[0]) == c && egraph.find(b[1]) == s {
                found.push([b[2], r[1]]);
            }
        }
    }
    found
}

/// Keeps the first match whose op fits `class`.
fn first_fit(egraph: &FuseGraph, class: Id, candidates: Vec<Match>) -> Vec<Match> {
    candidates
        .into_iter()
        .find(|m| fits(egraph, &m.op, &m.operands, class))
        .into_iter()
        .collect()
}

/// Returns the operands `(x_1 .. x_m, s, a, last)` of a fused BN-ReLU op.
fn fused_operands(egraph: &FuseGraph, c: Id, s: Id, a: Id, last: Id) -> Vec<Id> {
    let mut operands = parts(egraph, c);
    operands.extend([s, a, last]);
    operands
}

pub struct BnReluConvFilter;

impl Fusion for BnReluConvFilter {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        let mut candidates = Vec::new();
        for (op, children) in nodes(egraph, class) {
            let Op::Conv2dBackwardFilter { k, stride, pad } = *op else {
                continue;
            };
            let (z, dy) = (children[0], children[1]);
            for (relu, r) in nodes(egraph, z) {
                if !matches!(relu, Op::Relu) {
                    continue;
                }
                for (bn, b) in nodes(egraph, r[0]) {
                    let Op::BnApply { eps } = *bn else { continue };
                    candidates.push(Match {
                        op: Op::BnReluConvBackwardFilter {
                            k,
                            stride,
                            pad,
                            eps,
                        },
                        operands: fused_operands(egraph, b[0], b[1], b[2], dy),
                        inner: None,
                    });
                }
            }
        }
        first_fit(egraph, class, candidates)
    }
}

pub struct BnReluBackward;

impl Fusion for BnReluBackward {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        let mut candidates = Vec::new();
        for (op, children) in nodes(egraph, class) {
            let Op::BnBackward { eps } = *op else {
                continue;
            };
            let [c, s, a, dr] = [children[0], children[1], children[2], children[3]];
            for [bn_a, dz] in relu_backwards_of_bn(egraph, dr, c, s, eps) {
                if egraph.find(bn_a) == egraph.find(a) {
                    candidates.push(Match {
                        op: Op::BnReluBackward { eps },
                        operands: fused_operands(egraph, c, s, a, dz),
                        inner: None,
                    });
                }
            }
        }
        first_fit(egraph, class, candidates)
    }
}

pub struct BnReluBackwardPart;

impl Fusion for BnReluBackwardPart {
    /// Records each match as the operands `(x_1 .. x_m, s, a, dz)` of the
    /// wide gradient, with the slice it replaces as `inner`, because `build`
    /// also adds the affine gradient over all of them.
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        for (op, children) in nodes(egraph, class) {
            let Op::Slice { start, len } = *op else {
                continue;
            };
            for (wide, operands) in nodes(egraph, children[0]) {
                let Op::BnReluBackward { eps } = *wide else {
                    continue;
                };
                let part = Op::BnReluBackwardPart { eps, start };
                let Some(part_operands) = part_operands(egraph, operands, start, len, None) else {
                    continue;
                };
                // The affine gradient has the type of the statistics, `[2, C]`.
                let stats = part_operands[part_operands.len() - 3];
                let mut types: Vec<&TensorType> =
                    part_operands.iter().map(|&c| &egraph[c].data.ty).collect();
                types.insert(types.len() - 1, &egraph[stats].data.ty);
                if part
                    .infer(&types)
                    .is_ok_and(|ty| ty == egraph[class].data.ty)
                {
                    return vec![Match {
                        op: part,
                        operands: operands.to_vec(),
                        inner: Some(op.clone()),
                    }];
                }
            }
        }
        Vec::new()
    }

    fn build(&self, egraph: &mut FuseGraph, found: &Match) -> Id {
        let (Op::BnReluBackwardPart { eps, start }, Some(Op::Slice { len, .. })) =
            (&found.op, &found.inner)
        else {
            unreachable!("bn-relu-backward-part records the part and its slice")
        };
        let outer = egraph.analysis.next_name.take();
        let affine = found.operands[found.operands.len() - 2];
        let name = format!("{}.grad", egraph[affine].data.name);
        egraph.analysis.next_name = Some((name, None));
        let grad = add(
            egraph,
            &Op::BnReluAffineGrad { eps: *eps },
            found.operands.clone(),
        );
        egraph.analysis.next_name = outer;

        let operands = part_operands(egraph, &found.operands, *start, *len, Some(grad))
            .expect("find checked that the slice covers a run of inputs");
        add(egraph, &found.op, operands)
    }
}

/// Returns the operands `(x_j .. x_k, s, a, [daffine,] dz)` of the part of
/// the wide gradient operands `(x_1 .. x_m, s, a, dz)` whose inputs have
/// channels `start .. start + len`, with `daffine` where it is given.
fn part_operands(
    egraph: &FuseGraph,
    wide: &[Id],
    start: usize,
    len: usize,
    daffine: Option<Id>,
) -> Option<Vec<Id>> {
    let m = wide.len() - 3;
    let run = covering_run(egraph, &wide[..m], start, len)?;
    let mut operands = wide[run].to_vec();
    operands.extend_from_slice(&wide[m..m + 2]);
    operands.extend(daffine);
    operands.push(wide[m + 2]);
    Some(operands)
}

/// Returns the range of `inputs` whose channels are exactly `start .. start + len`
/// of their concatenation, or `None` when that range cuts an input or is
/// empty.
fn covering_run(
    egraph: &FuseGraph,
    inputs: &[Id],
    start: usize,
    len: usize,
) -> Option<Range<usize>> {
    let mut first = None;
    let mut offset = 0;
    for (i, &x) in inputs.iter().enumerate() {
        if offset == start && first.is_none() && len > 0 {
            first = Some(i);
        }
        offset += egraph[x].data.ty.channels();
        if let Some(j) = first {
            if offset == start + len {
                return Some(j..i + 1);
            }
            if offset > start + len {
                return None;
            }
        }
    }
    None
}

pub struct BnReluAffineGrad;

impl Fusion for BnReluAffineGrad {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        let mut candidates = Vec::new();
        for (op, children) in nodes(egraph, class) {
            let Op::BnAffineGrad { eps } = *op else {
                continue;
            };
            let [c, s, dr] = [children[0], children[1], children[2]];
            // The affine parameters are not an operand of the affine
            // gradient, so they come from the BN apply the ReLU reads.
            for [a, dz] in relu_backwards_of_bn(egraph, dr, c, s, eps) {
                candidates.push(Match {
                    op: Op::BnReluAffineGrad { eps },
                    operands: fused_operands(egraph, c, s, a, dz),
                    inner: None,
                });
            }
        }
        first_fit(egraph, class, candidates)
    }
}

/// `(dy, in_h, in_w)` of every 2x2, stride-2 `AvgPoolBackward` node in `class`.
fn pool2_backwards(egraph: &FuseGraph, class: Id) -> Vec<(Id, usize, usize)> {
    nodes(egraph, class)
        .filter_map(|(op, children)| match *op {
            Op::AvgPoolBackward {
                k: 2,
                stride: 2,
                pad: 0,
                in_h,
                in_w,
            } => Some((children[0], in_h, in_w)),
            _ => None,
        })
        .collect()
}

const POOL2: Op = Op::AvgPool {
    k: 2,
    stride: 2,
    pad: 0,
};

pub struct PoolConvFilter;

impl Fusion for PoolConvFilter {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        for (op, children) in nodes(egraph, class) {
            let Op::Conv2dBackwardFilter {
                k: 1,
                stride: 1,
                pad: 0,
            } = *op
            else {
                continue;
            };
            let (z, dconv) = (children[0], children[1]);
            for (dy, _, _) in pool2_backwards(egraph, dconv) {
                let pooled = POOL2.infer(&[&egraph[z].data.ty]);
                let dy_ty = &egraph[dy].data.ty;
                // The rewrite holds only where the pooled input has the
                // spatial size of `dy`.
                if pooled.is_ok_and(|p| p.dims[..2] == dy_ty.dims[..2]) {
                    return vec![Match {
                        op: op.clone(),
                        operands: vec![z, dy],
                        inner: Some(POOL2),
                    }];
                }
            }
        }
        Vec::new()
    }

    fn build(&self, egraph: &mut FuseGraph, found: &Match) -> Id {
        let [z, dy] = [found.operands[0], found.operands[1]];
        let pool = found
            .inner
            .as_ref()
            .expect("pool-conv-filter records the pool");
        let outer = egraph.analysis.next_name.take();
        let name = format!("{}.pool", egraph[z].data.name);
        egraph.analysis.next_name = Some((name, egraph[z].data.layer));
        let pooled = add(egraph, pool, vec![z]);
        egraph.analysis.next_name = outer;
        add(egraph, &found.op, vec![pooled, dy])
    }
}

pub struct PoolConvData;

impl Fusion for PoolConvData {
    fn find(&self, egraph: &FuseGraph, class: Id) -> Vec<Match> {
        for (op, children) in nodes(egraph, class) {
            let Op::Conv2dBackwardData {
                k: 1,
                stride: 1,
                pad: 0,
                ..
            } = *op
            else {
                continue;
            };
            let (dconv, w) = (children[0], children[1]);
            for (dy, in_h, in_w) in pool2_backwards(egraph, dconv) {
                let dims = &egraph[dy].data.ty.dims;
                if dims.len() != 3 {
                    continue;
                }
                let inner = Op::Conv2dBackwardData {
                    k: 1,
                    stride: 1,
                    pad: 0,
                    in_h: dims[0],
                    in_w: dims[1],
                };
                let types = [&egraph[dy].data.ty, &egraph[w].data.ty];
                let Ok(inner_ty) = inner.infer(&types) else {
                    continue;
                };
                let outer = Op::AvgPoolBackward {
                    k: 2,
                    stride: 2,
                    pad: 0,
                    in_h,
                    in_w,
                };
                if outer
                    .infer(&[&inner_ty])
                    .is_ok_and(|ty| ty == egraph[class].data.ty)
                {
                    return vec![Match {
                        op: outer,
                        operands: vec![dy, w],
                        inner: Some(inner),
                    }];
                }
            }
        }
        Vec::new()
    }

    fn build(&self, egraph: &mut FuseGraph, found: &Match) -> Id {
        let inner = found
            .inner
            .as_ref()
            .expect("pool-conv-data records the conv");
        let outer = egraph.analysis.next_name.take();
        let dy = found.operands[0];
        let name = format!("{}.pooled_dx", egraph[dy].data.name);
        egraph.analysis.next_name = Some((name, egraph[dy].data.layer));
        let data = add(egraph, inner, found.operands.clone());
        egraph.analysis.next_name = outer;
        add(egraph, &found.op, vec![data])
    }
}

#[cfg(test)]
mod tests {
    use ldnc_ir::graph::{Graph, TensorType};
    use ldnc_ir::op::{Init, Op};
    use ldnc_ir::spec::NetSpec;
    use ldnc_ir::{expand, Mode};

    use crate::autodiff::{differentiate, TrainingGraph};
    use crate::fuse::fuse_training;

    fn count(graph: &Graph, wanted: fn(&Op) -> bool) -> usize {
        graph.ids().filter(|&id| wanted(&graph.node(id).op)).count()
    }

    #[test]
    fn dense_block_backward_is_fully_fused() {
        let spec = NetSpec::from_ron("(blocks: [4], growth: 4, bottleneck: Some(2))", "t").unwrap();
        let net = expand(&spec, Mode::Train).unwrap();
        let training = differentiate(&net, &spec.train).unwrap();
        let (fused, report) = fuse_training(&training, &Default::default()).unwrap();
        let graph = &fused.graph;

        assert_eq!(count(graph, |op| matches!(op, Op::BnBackward { .. })), 0);
        assert_eq!(count(graph, |op| matches!(op, Op::BnAffineGrad { .. })), 0);
        assert_eq!(count(graph, |op| matches!(op, Op::ReluBackward)), 0);
        // Only the stem conv, which reads the image, keeps a plain filter gradient.
        let plain = count(graph, |op| matches!(op, Op::Conv2dBackwardFilter { .. }));
        assert_eq!(plain, 1);
        let convs = count(graph, |op| matches!(op, Op::BnReluConv { .. }));
        let filters = count(graph, |op| {
            matches!(op, Op::BnReluConvBackwardFilter { .. })
        });
        assert_eq!(convs, 8);
        assert_eq!(filters, convs);
        // Every slice of a layer's input gradient is computed on its own, so
        // the gradient of a whole concatenation remains only where a batch
        // norm reads one input.
        assert_eq!(count(graph, |op| matches!(op, Op::Slice { .. })), 0);
        for id in graph.ids() {
            if matches!(graph.node(id).op, Op::BnReluBackward { .. }) {
                let operands = graph.inputs(id).len();
                assert_eq!(
                    operands,
                    4,
                    "{} reads {operands} operands",
                    graph.node(id).name
                );
            }
        }
        let slices = count(&training.graph, |op| matches!(op, Op::Slice { .. }));
        let parts = count(graph, |op| matches!(op, Op::BnReluBackwardPart { .. }));
        assert!(slices > 0);
        assert_eq!(parts, slices, "one partial gradient per slice");
        for rule in [
            "bn-relu-conv-filter",
            "bn-relu-backward",
            "bn-relu-backward-part",
            "bn-relu-affine-grad",
        ] {
            let fired = report.applied.iter().find(|(r, _)| r == rule);
            assert!(fired.is_some_and(|&(_, n)| n > 0), "{rule} did not fire");
        }
    }

    #[test]
    fn transition_gradients_run_after_pooling() {
        let spec = NetSpec::from_ron(
            "(blocks: [2, 2], growth: 4, transition: Classic(compression: 0.5))",
            "t",
        )
        .unwrap();
        let net = expand(&spec, Mode::Train).unwrap();
        let training = differentiate(&net, &spec.train).unwrap();
        let (fused, report) = fuse_training(&training, &Default::default()).unwrap();
        let graph = &fused.graph;

        for rule in ["pool-conv", "pool-conv-filter", "pool-conv-data"] {
            let fired = report.applied.iter().find(|(r, _)| r == rule);
            assert!(fired.is_some_and(|&(_, n)| n > 0), "{rule} did not fire");
        }
        // No 1x1 conv gradient reads the full-resolution gradient that the
        // pool backward spreads out.
        for id in graph.ids() {
            let node = graph.node(id);
            if !matches!(
                node.op,
                Op::Conv2dBackwardData { k: 1, .. } | Op::Conv2dBackwardFilter { k: 1, .. }
            ) {
                continue;
            }
            for input in graph.inputs(id) {
                let op = &graph.node(input).op;
                assert!(
                    !matches!(op, Op::AvgPoolBackward { .. }),
                    "{} reads {}",
                    node.name,
                    graph.node(input).name
                );
            }
        }
    }

    /// `BnBackward(x, t, a, ReluBackward(BnApply(x, s, a), dz))` with two
    /// different statistics `s` and `t`, or the same statistics when `same`.
    fn mismatched_mask(same: bool) -> TrainingGraph {
        let mut g = Graph::new();
        let image = g.add_typed(Op::Image, &[], "image", TensorType::batched(&[4, 4, 3]));
        let label = g.add_typed(Op::Label, &[], "label", TensorType::batched(&[]));
        let affine = g.add_typed(
            Op::Param {
                init: Init::BnAffine,
            },
            &[],
            "affine",
            TensorType::fixed(&[2, 3]),
        );
        let stats = g.add(Op::BnStats, &[image], "stats").unwrap();
        let scaled = g
            .add(Op::Scale { factor: 2.0 }, &[image], "scaled")
            .unwrap();
        let other = g.add(Op::BnStats, &[scaled], "other").unwrap();
        let eps = 1e-5;
        let bn = g
            .add(Op::BnApply { eps }, &[image, stats, affine], "bn")
            .unwrap();
        let mask = g.add(Op::ReluBackward, &[bn, scaled], "mask").unwrap();
        let used = if same { stats } else { other };
        let dx = g
            .add(Op::BnBackward { eps }, &[image, used, affine, mask], "dx")
            .unwrap();
        g.outputs = vec![dx];
        TrainingGraph {
            graph: g,
            image,
            label,
            loss: dx,
            logits: Vec::new(),
            grads: Vec::new(),
        }
    }

    #[test]
    fn relu_mask_of_another_bn_is_not_fused() {
        for same in [false, true] {
            let (fused, _) = fuse_training(&mismatched_mask(same), &Default::default()).unwrap();
            let merged = count(&fused.graph, |op| matches!(op, Op::BnReluBackward { .. }));
            assert_eq!(merged, usize::from(same), "same statistics: {same}");
        }
    }

    /// Builds the gradient `BnBackward(c, s, a, ReluBackward(BnApply(c, s, a), dz))`
    /// of `c = concat(concat(x1, x2), x3)` with 2, 3 and 1 channels, read by
    /// one slice per `(start, len)` in `slices`.
    fn sliced_gradient(slices: &[(usize, usize)]) -> TrainingGraph {
        let mut g = Graph::new();
        let mut input = |name: &str, c: usize| {
            g.add_typed(Op::Image, &[], name, TensorType::batched(&[4, 4, c]))
        };
        let (x1, x2, x3, dz) = (
            input("x1", 2),
            input("x2", 3),
            input("x3", 1),
            input("dz", 6),
        );
        let label = g.add_typed(Op::Label, &[], "label", TensorType::batched(&[]));
        let affine = g.add_typed(
            Op::Param {
                init: Init::BnAffine,
            },
            &[],
            "affine",
            TensorType::fixed(&[2, 6]),
        );

        let inner = g.add(Op::Concat, &[x1, x2], "inner").unwrap();
        let c = g.add(Op::Concat, &[inner, x3], "c").unwrap();
        let stats = g.add(Op::BnStats, &[c], "stats").unwrap();
        let eps = 1e-5;
        let bn = g
            .add(Op::BnApply { eps }, &[c, stats, affine], "bn")
            .unwrap();
        let mask = g.add(Op::ReluBackward, &[bn, dz], "mask").unwrap();
        let dx = g
            .add(Op::BnBackward { eps }, &[c, stats, affine, mask], "dx")
            .unwrap();

        g.outputs = slices
            .iter()
            .map(|&(start, len)| g.add(Op::Slice { start, len }, &[dx], "d").unwrap())
            .collect();
        // Fusion keeps the loss, so the wide gradient must not be it.
        let loss = g.outputs[0];

        TrainingGraph {
            graph: g,
            image: x1,
            label,
            loss,
            logits: Vec::new(),
            grads: Vec::new(),
        }
    }

    /// Channel count of every input of each `BnReluBackwardPart` with its start.
    fn part_inputs(graph: &Graph) -> Vec<(usize, Vec<usize>)> {
        graph
            .ids()
            .filter_map(|id| match graph.node(id).op {
                Op::BnReluBackwardPart { start, .. } => {
                    let inputs = graph.inputs(id);
                    let xs = &inputs[..inputs.len() - 4];
                    let channels = xs.iter().map(|&x| graph.node(x).ty.channels());
                    Some((start, channels.collect()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn slice_of_nested_concat_reads_its_inputs() {
        let (fused, _) =
            fuse_training(&sliced_gradient(&[(0, 5), (5, 1)]), &Default::default()).unwrap();
        let graph = &fused.graph;
        let mut parts = part_inputs(graph);
        parts.sort();
        assert_eq!(parts, [(0, vec![2, 3]), (5, vec![1])]);
        assert_eq!(count(graph, |op| matches!(op, Op::Slice { .. })), 0);
        assert_eq!(
            count(graph, |op| matches!(op, Op::BnReluBackward { .. })),
            0
        );
    }

    #[test]
    fn cut_slice_keeps_wide_gradient() {
        // Channels 1..4 cut x1 and x2, so only the slice of x3 is computed
        // on its own, and the other still reads the wide gradient.
        let (fused, _) =
            fuse_training(&sliced_gradient(&[(1, 3), (5, 1)]), &Default::default()).unwrap();
        let graph = &fused.graph;
        assert_eq!(part_inputs(graph), [(5, vec![1])]);
        assert_eq!(count(graph, |op| matches!(op, Op::Slice { .. })), 1);
        assert_eq!(
            count(graph, |op| matches!(op, Op::BnReluBackward { .. })),
            1
        );
    }
}
