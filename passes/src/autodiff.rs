//! Reverse-mode autodiff: turns a forward training network into the training
//! graph (forward, backward and SGD updates in one graph).
//!
//! The loss is a weighted sum of softmax cross-entropies, so its gradient with
//! respect to each head's logits is `weight * d(CE)/d(logits)`: the scalar part of
//! the chain is folded into the `SoftmaxCrossEntropyBackward` weights instead of
//! being carried as `[1]` tensors. From the logits backwards, each op's
//! vector-Jacobian product is emitted by `vjp`, one arm per op family. A value
//! read by several ops accumulates its gradient eagerly: each new contribution is
//! added to the running sum right after it is produced, so a DenseNet layer read
//! by every later layer holds one gradient buffer instead of one per reader
//! (which would make backward memory quadratic in depth). Every
//! parameter then gets its optimizer state and update (a velocity and an
//! `SgdUpdate`, or a mean square and an `RmsPropUpdate`), appended after the
//! whole backward pass so no update runs before the last read of its parameter.

use std::collections::HashMap;

use ldnc_ir::expand::Network;
use ldnc_ir::graph::{Graph, TensorType, ValueId};
use ldnc_ir::op::{Op, Role};
use ldnc_ir::spec::{Optimizer, TrainSpec};

use crate::{Error, Result};

/// The training graph and where its parts are.
#[derive(Debug, Clone)]
pub struct TrainingGraph {
    pub graph: Graph,
    pub image: ValueId,
    pub label: ValueId,
    pub loss: ValueId,
    pub logits: Vec<ValueId>,
    /// Gradient of each parameter, by parameter node.
    pub grads: Vec<(ValueId, ValueId)>,
}

/// Builds the training graph of a network expanded in `Mode::Train`.
pub fn differentiate(net: &Network, train: &TrainSpec) -> Result<TrainingGraph> {
    let mut g = net.graph.clone();
    let forward_len = g.len();
    let needs_grad = needs_gradient(&g);
    let loss_weights = loss_weights(&g, net.loss)?;

    // Running gradient sum of every value that has received a contribution.
    let mut grads: HashMap<ValueId, ValueId> = HashMap::new();
    // Sorted so the graph, and so a built executable, is the same on every run.
    let mut loss_weights: Vec<(ValueId, f32)> = loss_weights.into_iter().collect();
    loss_weights.sort_by_key(|&(ce, _)| ce.index());
    for &(ce, weight) in &loss_weights {
        let inputs = g.inputs(ce);
        let Op::SoftmaxCrossEntropy { ignore, weighted } = g.node(ce).op.clone() else {
            unreachable!("loss_weights only returns cross-entropy nodes")
        };
        let name = format!("{}.grad", g.node(inputs[0]).name);
        let grad = g.add(
            Op::SoftmaxCrossEntropyBackward {
                weight,
                ignore,
                weighted,
            },
            &inputs,
            name,
        )?;
        accumulate(&mut g, &mut grads, inputs[0], grad)?;
    }

    let mut param_grads = Vec::new();
    for index in (0..forward_len).rev() {
        let id = ValueId::new(index);
        let Some(grad) = grads.remove(&id) else {
            continue;
        };
        if g.node(id).op.role() == Role::Param {
            param_grads.push((id, grad));
            continue;
        }
        for (input, input_grad) in vjp(&mut g, id, grad)? {
            if needs_grad[input.index()] {
                accumulate(&mut g, &mut grads, input, input_grad)?;
            }
        }
    }
    param_grads.reverse();
    let mut sinks = Vec::new();
    for &(param, grad) in &param_grads {
        let ty: TensorType = g.node(param).ty.clone();
        let name = g.node(param).name.clone();
        let weight_decay = train.weight_decay as f32;
        let update = match train.optimizer {
            Optimizer::Sgd => {
                let velocity = g.add_typed(Op::Velocity, &[], format!("{name}.velocity"), ty);
                let sgd = Op::SgdUpdate {
                    momentum: train.momentum as f32,
                    weight_decay,
                    nesterov: train.nesterov,
                };
                g.add(sgd, &[param, grad, velocity], format!("{name}.sgd"))?
            }
            Optimizer::RmsProp { decay, eps } => {
                let mean_square =
                    g.add_typed(Op::MeanSquare, &[], format!("{name}.mean_square"), ty);
                let rmsprop = Op::RmsPropUpdate {
                    decay: decay as f32,
                    eps: eps as f32,
                    weight_decay,
                };
                g.add(
                    rmsprop,
                    &[param, grad, mean_square],
                    format!("{name}.rmsprop"),
                )?
            }
        };
        sinks.push(update);
    }
    let trained: Vec<ValueId> = param_grads.iter().map(|&(p, _)| p).collect();
    if let Some(&missing) = g.params().iter().find(|p| !trained.contains(p)) {
        return Err(Error::NoGradient {
            param: g.node(missing).name.clone(),
        });
    }
    let logits: Vec<ValueId> = net.heads.iter().map(|h| h.logits).collect();
    g.outputs.extend(sinks);
    Ok(TrainingGraph {
        graph: g,
        image: net.image,
        label: net.label,
        loss: net.loss,
        logits,
        grads: param_grads,
    })
}

/// Adds `part` to the running gradient of `value`.
fn accumulate(
    g: &mut Graph,
    grads: &mut HashMap<ValueId, ValueId>,
    value: ValueId,
    part: ValueId,
) -> Result<()> {
    let total = match grads.get(&value) {
        None => part,
        Some(&sum) => {
            let name = format!("{}.grad_sum", g.node(value).name);
            g.add(Op::Sum, &[sum, part], name)?
        }
    };
    grads.insert(value, total);
    Ok(())
}

/// Values that depend on a parameter (through differentiable ops).
fn needs_gradient(g: &Graph) -> Vec<bool> {
    let mut needs = vec![false; g.len()];
    for id in g.ids() {
        let op = &g.node(id).op;
        needs[id.index()] = match op {
            Op::Param { .. } => true,
            Op::DropoutMask { .. } | Op::BnStats => false,
            _ if op.role() != Role::Compute => false,
            _ => g.inputs(id).iter().any(|v| needs[v.index()]),
        };
    }
    needs
}

/// Loss weight of every cross-entropy node reachable from `loss` through `Sum` and
/// `Scale`.
fn loss_weights(g: &Graph, loss: ValueId) -> Result<HashMap<ValueId, f32>> {
    let mut weights = HashMap::new();
    let mut stack = vec![(loss, 1.0f32)];
    while let Some((id, w)) = stack.pop() {
        match &g.node(id).op {
            Op::SoftmaxCrossEntropy { .. } => *weights.entry(id).or_insert(0.0) += w,
            Op::Sum => stack.extend(g.inputs(id).into_iter().map(|v| (v, w))),
            Op::Scale { factor } => stack.push((g.inputs(id)[0], w * factor)),
            other => {
                return Err(Error::Autodiff {
                    node: g.node(id).name.clone(),
                    message: format!(
                        "the loss must be a weighted sum of cross-entropies, found {}",
                        other.name()
                    ),
                })
            }
        }
    }
    Ok(weights)
}

/// Emits the vector-Jacobian product of node `id` for upstream gradient `dy` and
/// returns `(operand, gradient)` pairs.
fn vjp(g: &mut Graph, id: ValueId, dy: ValueId) -> Result<Vec<(ValueId, ValueId)>> {
    let node = g.node(id).clone();
    let ins = g.inputs(id);
    let name = node.name.clone();
    let in_hw = |g: &Graph, v: ValueId| {
        let d = &g.node(v).ty.dims;
        (d[0], d[1])
    };
    let add = |g: &mut Graph, op: Op, operands: &[ValueId], suffix: &str| {
        g.add(op, operands, format!("{name}.{suffix}"))
    };
    let pairs = match node.op {
        // y = conv(x, w): dx = conv^T(dy, w), dw = x (*) dy.
        Op::Conv2d { k, stride, pad } => {
            let (in_h, in_w) = in_hw(g, ins[0]);
            let dx = add(
                g,
                Op::Conv2dBackwardData {
                    k,
                    stride,
                    pad,
                    in_h,
                    in_w,
                },
                &[dy, ins[1]],
                "dx",
            )?;
            let dw = add(
                g,
                Op::Conv2dBackwardFilter { k, stride, pad },
                &[ins[0], dy],
                "dw",
            )?;
            vec![(ins[0], dx), (ins[1], dw)]
        }
        Op::ConvTranspose2d { k, stride, pad, .. } => {
            let dx = add(
                g,
                Op::ConvTranspose2dBackwardData { k, stride, pad },
                &[dy, ins[1]],
                "dx",
            )?;
            let dw = add(
                g,
                Op::ConvTranspose2dBackwardFilter { k, stride, pad },
                &[ins[0], dy],
                "dw",
            )?;
            vec![(ins[0], dx), (ins[1], dw)]
        }
        // y = gamma * (x - mean) / sqrt(var + eps) + beta with batch statistics:
        // BnBackward differentiates through the statistics, so they get no gradient.
        Op::BnApply { eps } => {
            if !matches!(g.node(ins[1]).op, Op::BnStats | Op::ConcatStats) {
                return Err(Error::Autodiff {
                    node: name,
                    message: "batch norm with fixed statistics cannot be trained".into(),
                });
            }
            let dx = add(
                g,
                Op::BnBackward { eps },
                &[ins[0], ins[1], ins[2], dy],
                "dx",
            )?;
            let da = add(
                g,
                Op::BnAffineGrad { eps },
                &[ins[0], ins[1], dy],
                "daffine",
            )?;
            vec![(ins[0], dx), (ins[2], da)]
        }
        // dx = dy * [x > 0].
        Op::Relu => vec![(ins[0], add(g, Op::ReluBackward, &[ins[0], dy], "dx")?)],
        // Each operand receives its channel slice of dy.
        Op::Concat => {
            let mut start = 0;
            let mut pairs = Vec::new();
            for (pos, &x) in ins.iter().enumerate() {
                let len = g.node(x).ty.channels();
                let dx = add(g, Op::Slice { start, len }, &[dy], &format!("d{pos}"))?;
                pairs.push((x, dx));
                start += len;
            }
            pairs
        }
        Op::AvgPool { k, stride, pad } => {
            let (in_h, in_w) = in_hw(g, ins[0]);
            let op = Op::AvgPoolBackward {
                k,
                stride,
                pad,
                in_h,
                in_w,
            };
            vec![(ins[0], add(g, op, &[dy], "dx")?)]
        }
        Op::MaxPool { k, stride, pad } => {
            let op = Op::MaxPoolBackward { k, stride, pad };
            vec![(ins[0], add(g, op, &[ins[0], dy], "dx")?)]
        }
        // y = mean over pixels: dx = dy / (h w) at every pixel.
        Op::GlobalAvgPool => {
            let (h, w) = in_hw(g, ins[0]);
            let op = Op::GlobalAvgPoolBackward { h, w };
            vec![(ins[0], add(g, op, &[dy], "dx")?)]
        }
        // y = x w + b: dx = dy w^T, dw = x^T dy, db = sum over the batch of dy.
        Op::Linear => {
            let dx = add(g, Op::LinearBackwardData, &[dy, ins[1]], "dx")?;
            let dw = add(g, Op::LinearBackwardWeight, &[ins[0], dy], "dw")?;
            let db = add(g, Op::SumBatch, &[dy], "db")?;
            vec![(ins[0], dx), (ins[1], dw), (ins[2], db)]
        }
        // y = a * b: da = dy * b, db = dy * a.
        Op::Mul => {
            let da = add(g, Op::Mul, &[dy, ins[1]], "da")?;
            let db = add(g, Op::Mul, &[dy, ins[0]], "db")?;
            vec![(ins[0], da), (ins[1], db)]
        }
        Op::Sum => ins.iter().map(|&x| (x, dy)).collect(),
        Op::Scale { factor } => vec![(ins[0], add(g, Op::Scale { factor }, &[dy], "dx")?)],
        Op::Crop { .. } => {
            let (h, w) = in_hw(g, ins[0]);
            vec![(ins[0], add(g, Op::CropBackward { h, w }, &[dy], "dx")?)]
        }
        other => {
            return Err(Error::Autodiff {
                node: name,
                message: format!("no gradient rule for {}", other.name()),
            })
        }
    };
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldnc_ir::spec::NetSpec;
    use ldnc_ir::{expand, Mode};

    #[test]
    fn every_parameter_gets_one_update() {
        let spec = NetSpec::from_ron(
            "(blocks: [3, 3], growth: 4, deep_supervision: true, dropout: 0.1)",
            "t",
        )
        .unwrap();
        let net = expand(&spec, Mode::Train).unwrap();
        let tg = differentiate(&net, &spec.train).unwrap();
        let params = tg.graph.params();
        let updates: Vec<_> = tg
            .graph
            .ids()
            .filter(|&id| matches!(tg.graph.node(id).op, Op::SgdUpdate { .. }))
            .collect();
        assert_eq!(params.len(), updates.len());
        assert_eq!(tg.grads.len(), params.len());
        for (p, grad) in tg.grads {
            assert_eq!(tg.graph.node(p).ty, tg.graph.node(grad).ty);
        }
    }

    #[test]
    fn rmsprop_replaces_sgd_updates() {
        let spec = NetSpec::from_ron(
            "(blocks: [2], growth: 4, train: (optimizer: RmsProp(decay: 0.95)))",
            "t",
        )
        .unwrap();
        let net = expand(&spec, Mode::Train).unwrap();
        let tg = differentiate(&net, &spec.train).unwrap();
        let count = |matches: fn(&Op) -> bool| {
            tg.graph
                .ids()
                .filter(|&id| matches(&tg.graph.node(id).op))
                .count()
        };
        let params = tg.graph.params().len();
        assert_eq!(count(|op| matches!(op, Op::SgdUpdate { .. })), 0);
        assert_eq!(count(|op| matches!(op, Op::Velocity)), 0);
        assert_eq!(count(|op| matches!(op, Op::MeanSquare)), params);
        let rmsprop = |op: &Op| {
            matches!(op, Op::RmsPropUpdate { decay, eps, weight_decay }
                if *decay == 0.95 && *eps == 1e-6 && *weight_decay == 1e-4)
        };
        assert_eq!(
            count(rmsprop),
            params,
            "decay set, eps and weight decay by default"
        );
    }
}
