//! Expansion of a validated `NetSpec` into the forward tensor graph.
//!
//! The expander walks the feature graph layer by layer and emits the ops of each
//! layer, transition and prediction head. It builds the training form (batch
//! statistics, running-statistics updates, dropout) or the evaluation form
//! (running statistics, no dropout); both name every parameter identically, so
//! one checkpoint serves both. Classification networks live in `classify`,
//! fully convolutional ones in `segment`.

mod classify;
mod segment;

use serde::Serialize;

use crate::features::FeatureGraph;
use crate::graph::{Graph, TensorType, ValueId};
use crate::op::{Init, Op};
use crate::spec::{NetSpec, Task};
use crate::Result;

/// Name of the `[classes]` state tensor that weighs each class in the loss
/// of a segmentation network.
pub const CLASS_WEIGHTS: &str = "loss.class_weights";

/// Form of the network to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    Train,
    Eval,
}

/// One prediction head and its share of the loss.
#[derive(Debug, Clone, Serialize)]
pub struct Head {
    pub name: String,
    pub logits: ValueId,
    pub loss: ValueId,
    pub weight: f32,
}

/// The expanded forward network.
#[derive(Debug, Clone)]
pub struct Network {
    pub graph: Graph,
    pub image: ValueId,
    pub label: ValueId,
    /// Prediction heads; the last one is the final prediction.
    pub heads: Vec<Head>,
    /// The weighted sum of the head losses.
    pub loss: ValueId,
    pub features: FeatureGraph,
    pub mode: Mode,
}

impl Network {
    /// Logits of the final prediction.
    pub fn final_logits(&self) -> ValueId {
        self.heads
            .last()
            .expect("a network has a final head")
            .logits
    }
}

/// Expands `spec` into its forward graph in the given mode.
pub fn expand(spec: &NetSpec, mode: Mode) -> Result<Network> {
    let features = FeatureGraph::from_spec(spec);
    let mut b = Builder::new(spec, mode);
    let image = b.graph.add_typed(
        Op::Image,
        &[],
        "image",
        TensorType::batched(&[spec.input.height, spec.input.width, spec.input.channels]),
    );
    let (heads_logits, label) = match spec.task {
        Task::Classification => {
            let label = b
                .graph
                .add_typed(Op::Label, &[], "label", TensorType::batched(&[]));
            (classify::build(&mut b, &features, image)?, label)
        }
        Task::Segmentation { .. } => {
            let label = b.graph.add_typed(
                Op::Label,
                &[],
                "label",
                TensorType::batched(&[spec.input.height, spec.input.width]),
            );
            (segment::build(&mut b, &features, image)?, label)
        }
    };
    b.finish(heads_logits, image, label, features)
}

/// Emits the ops shared by every network kind and keeps the side-effect sinks.
pub(crate) struct Builder<'a> {
    pub spec: &'a NetSpec,
    pub mode: Mode,
    pub graph: Graph,
    sinks: Vec<ValueId>,
    current_layer: Option<usize>,
}

impl<'a> Builder<'a> {
    fn new(spec: &'a NetSpec, mode: Mode) -> Builder<'a> {
        Builder {
            spec,
            mode,
            graph: Graph::new(),
            sinks: Vec::new(),
            current_layer: None,
        }
    }

    /// Tags the nodes added from now on with feature layer `layer`.
    pub fn set_layer(&mut self, layer: Option<usize>) {
        self.current_layer = layer;
    }

    /// Adds a node and tags it with the current feature layer.
    pub fn op(&mut self, op: Op, inputs: &[ValueId], name: &str) -> Result<ValueId> {
        let id = self.graph.add(op, inputs, name)?;
        self.graph.node_mut(id).layer = self.current_layer;
        Ok(id)
    }

    pub fn param(&mut self, name: &str, dims: &[usize], init: Init) -> ValueId {
        self.graph
            .add_typed(Op::Param { init }, &[], name, TensorType::fixed(dims))
    }

    pub fn channels(&self, v: ValueId) -> usize {
        self.graph.node(v).ty.channels()
    }

    /// Concatenates along channels, or passes a single input through.
    pub fn concat(&mut self, inputs: &[ValueId], name: &str) -> Result<ValueId> {
        if inputs.len() == 1 {
            return Ok(inputs[0]);
        }
        self.op(Op::Concat, inputs, &format!("{name}.concat"))
    }

    /// Batch norm in the builder's mode; in training it also schedules the
    /// running-statistics update.
    pub fn batch_norm(&mut self, x: ValueId, name: &str) -> Result<ValueId> {
        let c = self.channels(x);
        let affine = self.param(&format!("{name}.affine"), &[2, c], Init::BnAffine);
        let running = self.graph.add_typed(
            Op::State {
                init: Init::RunningStats,
            },
            &[],
            format!("{name}.running"),
            TensorType::fixed(&[2, c]),
        );
        let eps = self.spec.bn_eps as f32;
        match self.mode {
            Mode::Train => {
                let stats = self.op(Op::BnStats, &[x], &format!("{name}.stats"))?;
                let per_item = self.graph.node(x).ty.per_item() / c;
                let update = self.op(
                    Op::BnRunningUpdate {
                        momentum: self.spec.bn_momentum as f32,
                        per_item,
                    },
                    &[running, stats],
                    &format!("{name}.update"),
                )?;
                self.sinks.push(update);
                self.op(Op::BnApply { eps }, &[x, stats, affine], name)
            }
            Mode::Eval => self.op(Op::BnApply { eps }, &[x, running, affine], name),
        }
    }

    pub fn relu(&mut self, x: ValueId, name: &str) -> Result<ValueId> {
        self.op(Op::Relu, &[x], &format!("{name}.relu"))
    }

    pub fn bn_relu(&mut self, x: ValueId, name: &str) -> Result<ValueId> {
        let y = self.batch_norm(x, name)?;
        self.relu(y, name)
    }

    /// Adds a bias-free convolution with He-normal initialisation (fan-in).
    pub fn conv(
        &mut self,
        x: ValueId,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        name: &str,
    ) -> Result<ValueId> {
        let cin = self.channels(x);
        let w = self.param(
            &format!("{name}.weight"),
            &[k, k, cin, cout],
            Init::HeNormal { fan: k * k * cin },
        );
        self.op(Op::Conv2d { k, stride, pad }, &[x, w], name)
    }

    pub fn avg_pool2(&mut self, x: ValueId, name: &str) -> Result<ValueId> {
        self.op(
            Op::AvgPool {
                k: 2,
                stride: 2,
                pad: 0,
            },
            &[x],
            &format!("{name}.pool"),
        )
    }

    /// Dropout in training mode; identity in evaluation or when `p == 0`.
    pub fn dropout(&mut self, x: ValueId, name: &str) -> Result<ValueId> {
        let p = self.spec.dropout as f32;
        if p == 0.0 || self.mode == Mode::Eval {
            return Ok(x);
        }
        let mask = self.op(Op::DropoutMask { p }, &[x], &format!("{name}.dropout_mask"))?;
        self.op(Op::Mul, &[x, mask], &format!("{name}.dropout"))
    }

    /// Adds the body of a feature layer: concat, then BN-ReLU-1x1 conv(width * g)-BN-ReLU
    /// -3x3 conv(channels) with a bottleneck, or BN-ReLU-3x3 conv without one.
    pub fn dense_layer(
        &mut self,
        inputs: &[ValueId],
        channels: usize,
        name: &str,
    ) -> Result<ValueId> {
        let x = self.concat(inputs, name)?;
        let mut h = self.bn_relu(x, &format!("{name}.bn1"))?;
        let last_bn = if let Some(width) = self.spec.bottleneck {
            let wide = width * self.spec.growth;
            h = self.conv(h, wide, 1, 1, 0, &format!("{name}.conv1"))?;
            h = self.dropout(h, &format!("{name}.conv1"))?;
            h = self.bn_relu(h, &format!("{name}.bn2"))?;
            "conv2"
        } else {
            "conv1"
        };
        let y = self.conv(h, channels, 3, 1, 1, &format!("{name}.{last_bn}"))?;
        self.dropout(y, &format!("{name}.{last_bn}"))
    }

    /// Adds a linear classifier over features `[N, C]`: weight uniform in
    /// `±1/sqrt(C)`, bias zero.
    pub fn linear(&mut self, x: ValueId, classes: usize, name: &str) -> Result<ValueId> {
        let c = self.channels(x);
        let bound = 1.0 / (c as f32).sqrt();
        let w = self.param(
            &format!("{name}.weight"),
            &[c, classes],
            Init::Uniform { bound },
        );
        let bias = self.param(&format!("{name}.bias"), &[classes], Init::Zeros);
        self.op(Op::Linear, &[x, w, bias], name)
    }

    /// Adds the losses of every head and the weighted total.
    fn finish(
        mut self,
        heads_logits: Vec<(String, ValueId, f32)>,
        image: ValueId,
        label: ValueId,
        features: FeatureGraph,
    ) -> Result<Network> {
        self.set_layer(None);
        // Segmentation losses weigh each class by a state tensor that the
        // trainer fills from the training labels (median-frequency balancing
        // for CamVid) and checkpoints keep; it is all ones until then.
        let (ignore, class_weights) = match self.spec.task {
            Task::Segmentation { ignore_label, .. } => {
                let weights = self.graph.add_typed(
                    Op::State { init: Init::Ones },
                    &[],
                    CLASS_WEIGHTS.to_string(),
                    TensorType::fixed(&[self.spec.classes]),
                );
                (ignore_label, Some(weights))
            }
            Task::Classification => (None, None),
        };
        let mut heads = Vec::new();
        let mut weighted = Vec::new();
        for (name, logits, weight) in heads_logits {
            let operands: Vec<ValueId> = [logits, label].into_iter().chain(class_weights).collect();
            let loss = self.op(
                Op::SoftmaxCrossEntropy {
                    ignore,
                    weighted: class_weights.is_some(),
                },
                &operands,
                &format!("{name}.loss"),
            )?;
            weighted.push(if weight == 1.0 {
                loss
            } else {
                self.op(
                    Op::Scale { factor: weight },
                    &[loss],
                    &format!("{name}.weighted"),
                )?
            });
            heads.push(Head {
                name,
                logits,
                loss,
                weight,
            });
        }
        let loss = if weighted.len() == 1 {
            weighted[0]
        } else {
            self.op(Op::Sum, &weighted, "loss")?
        };
        let mut outputs = vec![loss];
        outputs.extend(heads.iter().map(|h| h.logits));
        outputs.extend(self.sinks.iter().copied());
        self.graph.outputs = outputs;
        Ok(Network {
            graph: self.graph,
            image,
            label,
            heads,
            loss,
            features,
            mode: self.mode,
        })
    }
}

/// Loss weights of `n` heads (the last is final): all weight on a single head,
/// otherwise half on the final one and half spread evenly over the others.
pub fn head_weights(n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![1.0];
    }
    let aux = 0.5 / (n - 1) as f32;
    let mut w = vec![aux; n - 1];
    w.push(0.5);
    w
}
