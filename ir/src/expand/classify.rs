//! Classification networks: stem, dense blocks, transitions and prediction heads.
//!
//! Reading of the transitions implemented here:
//! - V1 (independent): at every block boundary each earlier layer that a later
//!   layer or head reads gets BN-ReLU, a channel-preserving 1x1 conv and 2x2
//!   average pooling, applied once to its latest version.
//! - V2 (block compression): BN-ReLU-1x1 conv of the finished block's
//!   concatenation to `min(g * (floor(log2(L + 1)) + 1), n * g)` channels (the
//!   authors' code), BN-ReLU-channel-preserving 1x1 conv of the older compressed
//!   features, 2x2 average pooling of both, concatenated. `x0` is the compressed
//!   features of block 0.
//! - DenseNet-BC: BN-ReLU-1x1 conv of the concatenation of the block input and the
//!   block's layers to `floor(compression * channels)`, then 2x2 average pooling.
//!
//! A head reads the layer it sits on plus that layer's inputs; for DenseNet-BC that
//! is the block input and every layer of the block, as in the original network.

use super::{head_weights, Builder};
use crate::features::FeatureGraph;
use crate::graph::ValueId;
use crate::op::Op;
use crate::spec::{Stem, Transition};
use crate::templates::floor_log2;
use crate::Result;

/// Builds stem, blocks and heads; returns `(name, logits, loss weight)` per head.
pub(super) fn build(
    b: &mut Builder,
    features: &FeatureGraph,
    image: ValueId,
) -> Result<Vec<(String, ValueId, f32)>> {
    let spec = b.spec;
    let depth = features.depth();
    let nblocks = spec.blocks.len();

    b.set_layer(Some(0));
    let x0 = stem(b, image, spec.x0_channels())?;

    // Latest version (at the current resolution) of every layer output.
    let mut latest: Vec<Option<ValueId>> = vec![None; depth + 1];
    latest[0] = Some(x0);
    // Compressed features the current block reads (block-local transitions).
    let mut compressed = x0;
    let last_reader = last_readers(features, spec.deep_supervision);

    let mut head_points = Vec::new();
    for block in 0..nblocks {
        let start = features.block_starts[block];
        let end = start + spec.blocks[block] - 1;
        for i in start..=end {
            b.set_layer(Some(i));
            let inputs = layer_operands(b, features, &latest, compressed, i);
            let name = format!("layer{i}");
            let y = b.dense_layer(&inputs, features.channels(i), &name)?;
            latest[i] = Some(y);
        }
        let is_last = block + 1 == nblocks;
        if is_last || spec.deep_supervision {
            b.set_layer(Some(end));
            let mut operands = vec![latest[end].expect("layer was just built")];
            operands.extend(layer_operands(b, features, &latest, compressed, end));
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
        match spec.transition {
            Transition::Independent => {
                for (j, slot) in latest.iter_mut().enumerate().take(end + 1) {
                    if last_reader[j] > end {
                        b.set_layer(Some(j));
                        let x = slot.expect("every earlier layer exists");
                        let name = format!("transition{block}.x{j}");
                        let h = b.bn_relu(x, &name)?;
                        let c = b.channels(x);
                        let h = b.conv(h, c, 1, 1, 0, &format!("{name}.conv"))?;
                        *slot = Some(b.avg_pool2(h, &name)?);
                    } else {
                        *slot = None;
                    }
                }
            }
            Transition::BlockCompression => {
                b.set_layer(None);
                let block_layers: Vec<ValueId> = (start..=end)
                    .map(|j| latest[j].expect("block layers exist"))
                    .collect();
                let name = format!("transition{block}");
                let joined = b.concat(&block_layers, &format!("{name}.compress"))?;
                let h = b.bn_relu(joined, &format!("{name}.compress"))?;
                let width = (spec.growth * (floor_log2(depth + 1) + 1))
                    .min(spec.blocks[block] * spec.growth);
                let h = b.conv(h, width, 1, 1, 0, &format!("{name}.compress.conv"))?;
                let new = b.avg_pool2(h, &format!("{name}.compress"))?;
                let h = b.bn_relu(compressed, &format!("{name}.carry"))?;
                let c = b.channels(compressed);
                let h = b.conv(h, c, 1, 1, 0, &format!("{name}.carry.conv"))?;
                let old = b.avg_pool2(h, &format!("{name}.carry"))?;
                compressed = b.op(Op::Concat, &[old, new], &format!("{name}.concat"))?;
                latest.iter_mut().for_each(|slot| *slot = None);
            }
            Transition::Classic { compression } => {
                b.set_layer(None);
                let mut all = vec![compressed];
                all.extend((start..=end).map(|j| latest[j].expect("block layers exist")));
                let name = format!("transition{block}");
                let joined = b.concat(&all, &name)?;
                let h = b.bn_relu(joined, &name)?;
                let width = ((b.channels(joined) as f64) * compression).floor() as usize;
                let h = b.conv(h, width.max(1), 1, 1, 0, &format!("{name}.conv"))?;
                compressed = b.avg_pool2(h, &name)?;
                latest.iter_mut().for_each(|slot| *slot = None);
            }
        }
    }

    let weights = head_weights(head_points.len());
    let mut heads = Vec::new();
    for ((name, operands), weight) in head_points.into_iter().zip(weights) {
        b.set_layer(None);
        let joined = b.concat(&operands, &name)?;
        let h = b.bn_relu(joined, &name)?;
        let pooled = b.op(Op::GlobalAvgPool, &[h], &format!("{name}.gap"))?;
        let logits = b.linear(pooled, spec.classes, &format!("{name}.fc"))?;
        heads.push((name, logits, weight));
    }
    Ok(heads)
}

fn stem(b: &mut Builder, image: ValueId, channels: usize) -> Result<ValueId> {
    match b.spec.stem {
        Stem::Cifar => b.conv(image, channels, 3, 1, 1, "stem.conv"),
        Stem::Plain => {
            let x = b.conv(image, channels, 3, 1, 1, "stem.conv")?;
            b.bn_relu(x, "stem.bn")
        }
        Stem::ImageNet => {
            let x = b.conv(image, channels, 7, 2, 3, "stem.conv")?;
            let x = b.bn_relu(x, "stem.bn")?;
            b.op(
                Op::MaxPool {
                    k: 3,
                    stride: 2,
                    pad: 1,
                },
                &[x],
                "stem.pool",
            )
        }
    }
}

/// Operand values of layer `i`: the compressed features (block-local transitions)
/// followed by its direct layer inputs, nearest first.
fn layer_operands(
    b: &Builder,
    features: &FeatureGraph,
    latest: &[Option<ValueId>],
    compressed: ValueId,
    i: usize,
) -> Vec<ValueId> {
    let mut operands = Vec::new();
    if b.spec.is_block_local() {
        operands.push(compressed);
    }
    for &j in &features.layer_inputs[i] {
        let v = latest[j].expect("inputs of a layer exist at its resolution");
        if !operands.contains(&v) {
            operands.push(v);
        }
    }
    operands
}

/// For every layer, the largest index of a layer (or head at a block end) that
/// reads it; V1 transitions only pool layers that something later still reads.
fn last_readers(features: &FeatureGraph, deep_supervision: bool) -> Vec<usize> {
    let depth = features.depth();
    let mut last = vec![0; depth + 1];
    for i in 1..=depth {
        for &j in &features.layer_inputs[i] {
            last[j] = last[j].max(i);
        }
    }
    // Heads read their layer and its inputs; the final head sits after layer L.
    let ends: Vec<usize> = features
        .block_starts
        .iter()
        .skip(1)
        .map(|s| s - 1)
        .chain(std::iter::once(depth))
        .collect();
    for (k, &end) in ends.iter().enumerate() {
        let is_final = k + 1 == ends.len();
        if !is_final && !deep_supervision {
            continue;
        }
        let reader = if is_final { depth + 1 } else { end };
        last[end] = last[end].max(reader);
        for &j in &features.layer_inputs[end] {
            last[j] = last[j].max(reader);
        }
    }
    last
}
