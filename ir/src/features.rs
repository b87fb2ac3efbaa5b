//! The feature-layer graph `x0 .. xL` and the analyses the Log-DenseNet paper
//! defines on it: connections, backpropagation distance (BD) and its maximum (MBD).
//!
//! An edge `a -> b` means "`a` takes input from `b`", so BD(i, j) for `i > j` is
//! the length of the shortest directed path from `x_i` to `x_j`. Independent (V1)
//! transitions count as part of the layer they transform, so they add no node.
//! Block compression (V2) and the classic DenseNet-BC transition add one node per
//! block boundary: the compressed features that every layer of the next block
//! reads, which in turn read the finished block and the older compressed node.

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use crate::spec::{NetSpec, Task, Template, Transition};
use crate::templates;

/// What a node of the feature graph stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FeatureKind {
    /// Feature layer `x_index`.
    Layer,
    /// Compressed features after block `index` (V2 and DenseNet-BC transitions).
    Compressed,
}

#[derive(Debug, Clone, Serialize)]
pub struct FeatureNode {
    pub kind: FeatureKind,
    pub index: usize,
    /// Block the layer belongs to (`x0` is in block 0); for a compressed node, the
    /// block whose layers read it.
    pub block: usize,
    /// Channels this layer produces (`x0`: the stem's channels).
    pub channels: usize,
    /// Whether this is a LogLog-DenseNet hub with a channel multiplier.
    pub hub: bool,
}

/// The feature-layer graph of a network.
#[derive(Debug, Clone)]
pub struct FeatureGraph {
    pub graph: DiGraph<FeatureNode, ()>,
    /// Node of layer `i`, for `i = 0 ..= L`.
    pub layers: Vec<NodeIndex>,
    /// Compressed node read by the layers of block `b` (`None` for block 0, whose
    /// layers read `x0` directly, and for V1 transitions).
    pub compressed: Vec<Option<NodeIndex>>,
    /// Global index of the first layer of each block.
    pub block_starts: Vec<usize>,
    /// Direct layer inputs of each layer (nearest first), excluding compressed nodes.
    pub layer_inputs: Vec<Vec<usize>>,
}

/// Maximum backpropagation distance and a pair `(i, j)`, `i > j`, that attains it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mbd {
    pub mbd: usize,
    pub from: usize,
    pub to: usize,
}

impl FeatureGraph {
    /// Builds the feature graph of `spec` (which must have passed validation).
    pub fn from_spec(spec: &NetSpec) -> FeatureGraph {
        let depth = spec.depth();
        let mut block_starts = Vec::with_capacity(spec.blocks.len());
        let mut block_ends = Vec::with_capacity(spec.blocks.len());
        let mut end = 0;
        for &n in &spec.blocks {
            block_starts.push(end + 1);
            end += n;
            block_ends.push(end);
        }
        let block_of = |i: usize| {
            block_starts
                .iter()
                .rposition(|&s| s <= i)
                .unwrap_or_default()
        };

        let mut layer_inputs = match (&spec.task, &spec.template) {
            (Task::Segmentation { .. }, Template::DenseNet) => {
                templates::fc_densenet_connections(&spec.blocks)
            }
            _ => templates::connections(&spec.template, depth, &block_ends),
        };
        let hubs = templates::hubs(&spec.template, depth, &block_ends);
        if let Task::Segmentation {
            first_block_skip: true,
            ..
        } = spec.task
        {
            let skip = block_ends[0];
            for (i, inputs) in layer_inputs.iter_mut().enumerate().skip(skip + 1) {
                if !inputs.contains(&skip) {
                    inputs.push(skip);
                    inputs.sort_unstable_by(|a, b| b.cmp(a));
                }
                debug_assert!(i > skip);
            }
        }
        let block_local = spec.is_block_local();
        if block_local {
            // A layer reads the compressed features plus its template inputs inside
            // its own block; x0 is the compressed features of block 0.
            for (i, inputs) in layer_inputs.iter_mut().enumerate().skip(1) {
                let start = block_starts[block_of(i)];
                inputs.retain(|&j| j >= start);
            }
        }

        let mut graph = DiGraph::new();
        let multiplier = match spec.template {
            Template::LogLogDenseNet { hub_multiplier, .. } => hub_multiplier,
            _ => 1,
        };
        let layers: Vec<NodeIndex> = (0..=depth)
            .map(|i| {
                let hub = i > 0 && hubs.contains(&i) && multiplier > 1;
                let channels = if i == 0 {
                    spec.x0_channels()
                } else if hub {
                    spec.growth * multiplier
                } else {
                    spec.growth
                };
                graph.add_node(FeatureNode {
                    kind: FeatureKind::Layer,
                    index: i,
                    block: block_of(i),
                    channels,
                    hub,
                })
            })
            .collect();

        let mut compressed = vec![None; spec.blocks.len()];
        if block_local {
            for b in 1..spec.blocks.len() {
                let node = graph.add_node(FeatureNode {
                    kind: FeatureKind::Compressed,
                    index: b - 1,
                    block: b,
                    channels: 0,
                    hub: false,
                });
                let older = compressed[b - 1].unwrap_or(layers[0]);
                graph.add_edge(node, older, ());
                for &layer in &layers[block_starts[b - 1]..=block_ends[b - 1]] {
                    graph.add_edge(node, layer, ());
                }
                compressed[b] = Some(node);
            }
        }
        for i in 1..=depth {
            if block_local {
                let b = block_of(i);
                let source = compressed[b].unwrap_or(layers[0]);
                graph.add_edge(layers[i], source, ());
            }
            for &j in &layer_inputs[i] {
                graph.add_edge(layers[i], layers[j], ());
            }
        }
        FeatureGraph {
            graph,
            layers,
            compressed,
            block_starts,
            layer_inputs,
        }
    }

    /// Number of feature layers `L` (x0 not counted).
    pub fn depth(&self) -> usize {
        self.layers.len() - 1
    }

    /// Number of input connections of all layers `x1 .. xL`; reading a compressed
    /// node counts as one connection.
    pub fn connections(&self) -> usize {
        self.layers[1..]
            .iter()
            .map(|&n| self.graph.neighbors(n).count())
            .sum()
    }

    /// BD from layer `i` to every layer `0 ..= L` (`None` where no path exists).
    pub fn distances_from(&self, i: usize) -> Vec<Option<usize>> {
        let mut dist = vec![None; self.graph.node_count()];
        let mut queue = std::collections::VecDeque::new();
        dist[self.layers[i].index()] = Some(0);
        queue.push_back(self.layers[i]);
        while let Some(n) = queue.pop_front() {
            let d = dist[n.index()].expect("queued nodes have a distance");
            for m in self.graph.neighbors(n) {
                if dist[m.index()].is_none() {
                    dist[m.index()] = Some(d + 1);
                    queue.push_back(m);
                }
            }
        }
        self.layers.iter().map(|n| dist[n.index()]).collect()
    }

    /// BD(i, j) for `i > j`.
    pub fn distance(&self, i: usize, j: usize) -> Option<usize> {
        self.distances_from(i)[j]
    }

    /// MBD over all pairs `i > j`, or the first unreachable pair as an error.
    pub fn mbd(&self) -> Result<Mbd, (usize, usize)> {
        let mut best = Mbd {
            mbd: 0,
            from: 0,
            to: 0,
        };
        for i in 1..self.layers.len() {
            let dist = self.distances_from(i);
            for (j, d) in dist.iter().enumerate().take(i) {
                match d {
                    None => return Err((i, j)),
                    Some(d) if *d > best.mbd => {
                        best = Mbd {
                            mbd: *d,
                            from: i,
                            to: j,
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(best)
    }

    /// Block of layer `i`.
    pub fn block_of(&self, i: usize) -> usize {
        self.graph[self.layers[i]].block
    }

    /// Channels produced by layer `i`.
    pub fn channels(&self, i: usize) -> usize {
        self.graph[self.layers[i]].channels
    }

    /// Layer `(i, j)` pairs where `x_i` reads `x_j` directly, for the connection
    /// matrix plot.
    pub fn matrix_entries(&self) -> Vec<(usize, usize)> {
        let mut entries = Vec::new();
        for (i, inputs) in self.layer_inputs.iter().enumerate() {
            for &j in inputs {
                entries.push((i, j));
            }
        }
        entries
    }
}

impl NetSpec {
    /// Whether layers read a per-block compressed node instead of pooled copies of
    /// older layers (V2 block compression and DenseNet-BC transitions).
    pub fn is_block_local(&self) -> bool {
        matches!(self.task, Task::Classification)
            && matches!(
                self.transition,
                Transition::BlockCompression | Transition::Classic { .. }
            )
    }
}
