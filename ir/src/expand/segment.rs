//! Fully convolutional networks for per-pixel labelling: FC-DenseNet and
//! FC-Log-DenseNet.
//!
//! The blocks form a down path of `blocks.len() / 2` blocks, one bottleneck block
//! and an up path of the same length. Block `b` works at resolution level
//! `min(b, blocks.len() - 1 - b)`, where level `d` has the stem's size halved `d`
//! times (rounded down). Every head returns logits `[H, W, classes]` at the input
//! size, which the loss compares with labels `[H, W]`.
//!
//! Two network families are built here:
//! - The DenseNet template gives FC-DenseNet (Jégou et al., "The One Hundred
//!   Layers Tiramisu", 2017, and the authors' Lasagne code, SimJeg/FC-DenseNet on
//!   GitHub). A down block outputs the concatenation of its input and its layers.
//!   A down transition is BN-ReLU, a 1x1 conv keeping the channels, dropout and
//!   2x2 max pooling, as in that code. A `Classic` transition scales the conv to
//!   `floor(compression * channels)`. The Log-DenseNet paper describes average
//!   pooling instead. An up transition is a 3x3 transposed conv of stride 2
//!   without padding over the previous block's new layers only, keeping their
//!   channels, cropped to the skip connection and concatenated with it. The final
//!   1x1 conv reads the last block's input and layers.
//! - Any other template gives the per-layer design of FC-Log-DenseNet (Hu et al.,
//!   "Log-DenseNet", ICLR 2018, section 4.2). Each layer reads its template inputs
//!   at its own level. After each down block, every layer that a later reader needs
//!   at a coarser level gets BN-ReLU, a channel-preserving 1x1 conv and 2x2 average
//!   pooling. After each up block, every layer that a later reader needs at a finer
//!   level than any copy it has gets BN-ReLU and a channel-preserving 3x3
//!   transposed conv of stride 2, cropped to the finer size. A layer created on the
//!   way down keeps its pooled copies, so the up path reuses them. The authors'
//!   TensorFlow code (EchoWho/AnytimeNeuralNetwork_public, `anytime_fcn.py`)
//!   makes the same choice of layers, but resizes the transposed-conv output
//!   bilinearly where this IR crops it.
//!
//! Heads are BN-ReLU-1x1 conv to the classes (the FC-DenseNet final head has no
//! BN-ReLU, as in the Tiramisu code). A head reads the block's last layer and that
//! layer's inputs, as classification heads do. With deep supervision an auxiliary
//! head sits at the end of each block whose resolution is the input's, which for
//! the usual 11-block network means the first block only. The authors' code puts
//! a head at every block end and compares coarse logits with average-pooled
//! one-hot labels, which the IR's integer-label loss cannot express.
//!
//! NOTE: the IR has no bias for convolutions, so the transposed convs and the final
//! 1x1 conv are bias-free here, whereas the Tiramisu code gives them biases.

use super::{head_weights, Builder};
use crate::features::FeatureGraph;
use crate::graph::ValueId;
use crate::op::{Init, Op};
use crate::spec::{Stem, Template, Transition};
use crate::{Error, Result};

/// A head's name, logits and share of the loss.
type HeadLogits = (String, ValueId, f32);

/// Builds the down path, bottleneck block, up path and per-pixel heads.
pub(super) fn build(
    b: &mut Builder,
    features: &FeatureGraph,
    image: ValueId,
) -> Result<Vec<HeadLogits>> {
    let spec = b.spec;
    b.set_layer(Some(0));
    let x0 = match spec.stem {
        Stem::Cifar => b.conv(image, spec.x0_channels(), 3, 1, 1, "stem.conv")?,
        Stem::Plain => {
            let x = b.conv(image, spec.x0_channels(), 3, 1, 1, "stem.conv")?;
            b.bn_relu(x, "stem.bn")?
        }
        Stem::ImageNet => {
            return Err(Error::InvalidSpec {
                field: "stem".into(),
                message: "a segmentation network needs a stride-1 stem (Cifar or Plain); \
                          the ImageNet stem downsamples by 4 and the up path cannot undo it"
                    .into(),
            })
        }
    };

    let layout = Layout::new(b, features, x0);
    match (&spec.template, &spec.transition) {
        (Template::DenseNet, Transition::Classic { compression }) => {
            build_fc_densenet(b, &layout, x0, *compression)
        }
        (Template::DenseNet, _) => build_fc_densenet(b, &layout, x0, 1.0),
        (_, Transition::Independent) => build_per_layer(b, features, &layout, x0),
        (template, transition) => Err(Error::InvalidSpec {
            field: "transition".into(),
            message: format!(
                "a segmentation network with template {template:?} needs the per-layer \
                 transition `Independent`, got {transition:?}"
            ),
        }),
    }
}

/// Block boundaries and the spatial size of every resolution level.
struct Layout {
    starts: Vec<usize>,
    ends: Vec<usize>,
    down: usize,
    sizes: Vec<(usize, usize)>,
}

impl Layout {
    fn new(b: &Builder, features: &FeatureGraph, x0: ValueId) -> Layout {
        let blocks = &b.spec.blocks;
        let starts = features.block_starts.clone();
        let ends: Vec<usize> = starts.iter().zip(blocks).map(|(s, n)| s + n - 1).collect();
        let down = blocks.len() / 2;
        let dims = &b.graph.node(x0).ty.dims;
        let mut sizes = vec![(dims[0], dims[1])];
        for d in 0..down {
            let (h, w) = sizes[d];
            sizes.push((h / 2, w / 2));
        }
        Layout {
            starts,
            ends,
            down,
            sizes,
        }
    }

    /// Resolution level of block `block`.
    fn level(&self, block: usize) -> usize {
        block.min(self.starts.len() - 1 - block)
    }

    fn blocks(&self) -> usize {
        self.starts.len()
    }

    /// Returns whether an auxiliary head goes at the end of `block`. Only
    /// full-resolution blocks get one, because the IR has no op that resizes
    /// logits or labels.
    fn has_aux_head(&self, b: &Builder, block: usize) -> bool {
        // TODO: heads at coarser blocks need pooled soft labels or a resize op.
        b.spec.deep_supervision && block + 1 < self.blocks() && self.level(block) == 0
    }
}

/// FC-DenseNet: concatenated down blocks, Tiramisu transitions, skip connections.
fn build_fc_densenet(
    b: &mut Builder,
    layout: &Layout,
    x0: ValueId,
    compression: f64,
) -> Result<Vec<HeadLogits>> {
    let g = b.spec.growth;
    let mut head_points: Vec<(String, Vec<ValueId>)> = Vec::new();
    let mut skips = Vec::new();
    let mut block_input = vec![x0];
    let mut previous_new: Vec<ValueId> = Vec::new();

    for block in 0..layout.blocks() {
        let (start, end) = (layout.starts[block], layout.ends[block]);
        let level = layout.level(block);
        if block > layout.down {
            b.set_layer(None);
            let skip = skips[level];
            let name = format!("up{block}");
            let joined = b.concat(&previous_new, &name)?;
            let up = transposed_conv(b, joined, layout.sizes[level], &name)?;
            block_input = vec![up, skip];
        }

        let mut pieces = block_input.clone();
        let mut new = Vec::new();
        for i in start..=end {
            b.set_layer(Some(i));
            let y = b.dense_layer(&pieces, g, &format!("layer{i}"))?;
            pieces.push(y);
            new.push(y);
        }
        b.set_layer(None);

        let is_last = block + 1 == layout.blocks();
        if is_last || layout.has_aux_head(b, block) {
            let name = if is_last {
                "head".to_string()
            } else {
                format!("aux{block}")
            };
            head_points.push((name, pieces.clone()));
        }
        if block < layout.down {
            let name = format!("down{block}");
            let out = b.concat(&pieces, &format!("block{block}"))?;
            skips.push(out);
            let h = b.bn_relu(out, &name)?;
            let width = ((b.channels(out) as f64) * compression).floor() as usize;
            let h = b.conv(h, width.max(1), 1, 1, 0, &format!("{name}.conv"))?;
            let h = b.dropout(h, &format!("{name}.conv"))?;
            let pooled = b.op(
                Op::MaxPool {
                    k: 2,
                    stride: 2,
                    pad: 0,
                },
                &[h],
                &format!("{name}.pool"),
            )?;
            block_input = vec![pooled];
        }
        previous_new = new;
    }

    let weights = head_weights(head_points.len());
    let mut heads = Vec::new();
    for ((name, operands), weight) in head_points.into_iter().zip(weights) {
        let preact = name != "head";
        let logits = pixel_head(b, &operands, &name, preact)?;
        heads.push((name, logits, weight));
    }
    Ok(heads)
}

/// FC-Log-DenseNet and the other sparse templates: per-layer transitions.
fn build_per_layer(
    b: &mut Builder,
    features: &FeatureGraph,
    layout: &Layout,
    x0: ValueId,
) -> Result<Vec<HeadLogits>> {
    let depth = features.depth();
    let creation: Vec<usize> = (0..=depth)
        .map(|i| layout.level(features.block_of(i)))
        .collect();
    let reads = read_events(b, features, layout);
    let levels = layout.down + 1;

    // copies[j][d]: layer j at resolution level d, once some op produced it.
    let mut copies: Vec<Vec<Option<ValueId>>> = vec![vec![None; levels]; depth + 1];
    copies[0][0] = Some(x0);
    let mut head_points: Vec<(String, Vec<ValueId>)> = Vec::new();

    for block in 0..layout.blocks() {
        let (start, end) = (layout.starts[block], layout.ends[block]);
        let level = layout.level(block);
        for i in start..=end {
            b.set_layer(Some(i));
            let operands = operands_at(&copies, &features.layer_inputs[i], level, i)?;
            let y = b.dense_layer(&operands, features.channels(i), &format!("layer{i}"))?;
            copies[i][level] = Some(y);
        }

        let is_last = block + 1 == layout.blocks();
        if is_last || layout.has_aux_head(b, block) {
            let mut at_end = vec![end];
            at_end.extend(&features.layer_inputs[end]);
            let operands = operands_at(&copies, &at_end, level, end)?;
            let name = if is_last {
                "head".to_string()
            } else {
                format!("aux{block}")
            };
            head_points.push((name, operands));
        }
        if is_last {
            break;
        }

        for j in 0..=end {
            let later = reads[j]
                .iter()
                .filter(|&&(at, _)| at > end)
                .map(|&(_, d)| d);
            b.set_layer(Some(j));
            if block < layout.down {
                let needed = later.max().is_some_and(|d| d > level);
                if creation[j] <= level && needed {
                    let x = copy_of(&copies, j, level)?;
                    let name = format!("down{block}.x{j}");
                    let h = b.bn_relu(x, &name)?;
                    let h = b.conv(h, b.channels(x), 1, 1, 0, &format!("{name}.conv"))?;
                    copies[j][level + 1] = Some(b.avg_pool2(h, &name)?);
                }
            } else {
                let finer = level - 1;
                let needed = later.min().is_some_and(|d| d <= finer);
                if creation[j] > finer && needed {
                    let x = copy_of(&copies, j, level)?;
                    let name = format!("up{block}.x{j}");
                    let h = b.bn_relu(x, &name)?;
                    let up = transposed_conv(b, h, layout.sizes[finer], &name)?;
                    copies[j][finer] = Some(up);
                }
            }
        }
    }

    b.set_layer(None);
    let weights = head_weights(head_points.len());
    let mut heads = Vec::new();
    for ((name, operands), weight) in head_points.into_iter().zip(weights) {
        let logits = pixel_head(b, &operands, &name, true)?;
        heads.push((name, logits, weight));
    }
    Ok(heads)
}

/// For every layer `j`, the `(position, level)` of each read of `j`: layer `i`
/// reads at position `i`, a head at the end of a block reads at that block's last
/// layer (before the following transition), the final head at `L + 1`.
fn read_events(b: &Builder, features: &FeatureGraph, layout: &Layout) -> Vec<Vec<(usize, usize)>> {
    let depth = features.depth();
    let mut reads = vec![Vec::new(); depth + 1];
    for i in 1..=depth {
        let level = layout.level(features.block_of(i));
        for &j in &features.layer_inputs[i] {
            reads[j].push((i, level));
        }
    }
    for block in 0..layout.blocks() {
        let is_last = block + 1 == layout.blocks();
        if !is_last && !layout.has_aux_head(b, block) {
            continue;
        }
        let end = layout.ends[block];
        let at = if is_last { depth + 1 } else { end };
        let level = layout.level(block);
        reads[end].push((at, level));
        for &j in &features.layer_inputs[end] {
            reads[j].push((at, level));
        }
    }
    reads
}

/// Collects the copies at `level` of `layers`, which the transitions create
/// before any reader needs them.
fn operands_at(
    copies: &[Vec<Option<ValueId>>],
    layers: &[usize],
    level: usize,
    reader: usize,
) -> Result<Vec<ValueId>> {
    let mut operands = Vec::with_capacity(layers.len());
    for &j in layers {
        let v = copies[j][level].ok_or_else(|| Error::Shape {
            node: format!("layer{reader}"),
            op: "concat".into(),
            message: format!("input layer {j} has no copy at resolution level {level}"),
        })?;
        if !operands.contains(&v) {
            operands.push(v);
        }
    }
    Ok(operands)
}

fn copy_of(copies: &[Vec<Option<ValueId>>], j: usize, level: usize) -> Result<ValueId> {
    copies[j][level].ok_or_else(|| Error::Shape {
        node: format!("x{j}"),
        op: "transition".into(),
        message: format!("layer {j} has no copy at resolution level {level} to transform"),
    })
}

/// Upsamples by a channel-preserving 3x3 transposed conv of stride 2 without
/// padding (output `2h + 1`), cropped to `size` from the top-left corner.
///
/// NOTE: the Tiramisu code crops the centre, but `Op::Crop` keeps the top-left corner,
/// which moves the kept window by at most one pixel.
fn transposed_conv(
    b: &mut Builder,
    x: ValueId,
    size: (usize, usize),
    name: &str,
) -> Result<ValueId> {
    let c = b.channels(x);
    let w = b.param(
        &format!("{name}.convt.weight"),
        &[3, 3, c, c],
        Init::HeNormal { fan: 9 * c },
    );
    let op = Op::ConvTranspose2d {
        k: 3,
        stride: 2,
        pad: 0,
        out_pad: 0,
    };
    let up = b.op(op, &[x, w], &format!("{name}.convt"))?;
    let dims = &b.graph.node(up).ty.dims;
    if (dims[0], dims[1]) == size {
        return Ok(up);
    }
    let (h, w) = size;
    b.op(Op::Crop { h, w }, &[up], &format!("{name}.crop"))
}

/// Per-pixel logits: concatenation, optional BN-ReLU, then a 1x1 conv to classes.
fn pixel_head(b: &mut Builder, operands: &[ValueId], name: &str, preact: bool) -> Result<ValueId> {
    let joined = b.concat(operands, name)?;
    let h = if preact {
        b.bn_relu(joined, name)?
    } else {
        joined
    };
    b.conv(h, b.spec.classes, 1, 1, 0, &format!("{name}.conv"))
}
