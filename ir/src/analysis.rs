//! The figures `ldnc inspect` prints: connections, MBD, parameters,
//! multiply-accumulates and activation memory of a training step.
//!
//! Naive activation memory is what a framework without buffer sharing keeps for
//! the backward pass of a training step: every batched value of the forward graph
//! (each concatenation, batch-norm and ReLU output, conv output, pool output).

use serde::Serialize;

use crate::expand::Network;
use crate::features::Mbd;
use crate::op::Role;
use crate::spec::NetSpec;
use crate::{Error, Result};

/// Activation memory of one training step at `batch` images, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub batch: usize,
    /// Bytes of every batched computed value of the forward graph, each in its
    /// own buffer. `ldnc build --explain` reports a larger naive figure, one
    /// buffer per value of the whole training graph, gradients included.
    pub naive_bytes: u64,
    pub planned_bytes: u64,
    /// Where `planned_bytes` comes from: `"naive"` until a memory plan is supplied.
    pub planned_source: String,
}

/// Per-block summary.
#[derive(Debug, Clone, Serialize)]
pub struct BlockSummary {
    pub layers: usize,
    pub first_layer: usize,
    /// Spatial size of the block's feature maps.
    pub height: usize,
    pub width: usize,
}

/// Everything `ldnc inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub name: String,
    pub feature_layers: usize,
    pub connections: usize,
    pub mbd: usize,
    pub mbd_pair: [usize; 2],
    pub params: usize,
    pub macs_per_image: u64,
    pub memory: Memory,
    pub blocks: Vec<BlockSummary>,
    pub graph_nodes: usize,
}

impl Report {
    /// Computes the report of an expanded training network at batch size `batch`.
    pub fn new(spec: &NetSpec, net: &Network, batch: usize) -> Result<Report> {
        let features = &net.features;
        let Mbd { mbd, from, to } = features
            .mbd()
            .map_err(|(from, to)| Error::Disconnected { from, to })?;
        let naive = naive_activation_bytes(net, batch);

        let mut blocks = Vec::new();
        for (b, &n) in spec.blocks.iter().enumerate() {
            let first = features.block_starts[b];
            let name = format!("layer{first}.bn1");
            let (height, width) = net
                .graph
                .find(&name)
                .map(|id| {
                    let dims = &net.graph.node(id).ty.dims;
                    (dims[0], dims[1])
                })
                .unwrap_or((0, 0));
            blocks.push(BlockSummary {
                layers: n,
                first_layer: first,
                height,
                width,
            });
        }

        Ok(Report {
            name: spec.name.clone(),
            feature_layers: features.depth(),
            connections: features.connections(),
            mbd,
            mbd_pair: [from, to],
            params: net.graph.param_count(),
            macs_per_image: net.graph.macs_per_image(),
            memory: Memory {
                batch,
                naive_bytes: naive,
                planned_bytes: naive,
                planned_source: "naive".into(),
            },
            blocks,
            graph_nodes: net.graph.len(),
        })
    }
}

/// Bytes of every batched computed value of the forward graph at batch `batch`.
pub fn naive_activation_bytes(net: &Network, batch: usize) -> u64 {
    net.graph
        .ids()
        .map(|id| net.graph.node(id))
        .filter(|n| n.op.role() == Role::Compute && n.ty.batched)
        .map(|n| 4 * n.ty.numel(batch) as u64)
        .sum()
}
