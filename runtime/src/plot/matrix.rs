//! The connection matrix of a feature-layer graph, drawn like figure 1 of Hu et
//! al., "Log-DenseNet" (ICLR 2018). Cell (i, j) is black when `x_j` takes input
//! from `x_i`, so row `i` is the layer read and column `j` the layer reading it.
//!
//! A layer that reads compressed features (Log-DenseNet V2 and DenseNet-BC
//! transitions) reads every layer before its block through them; those cells are
//! grey. Thin blue lines mark the block boundaries.

use std::path::Path;

use ldnc_ir::features::{FeatureGraph, FeatureKind};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{draw_error, render, Figure, PlotError, FONT};

/// Kind of access of a reading layer to an input layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Read {
    /// Through the compressed features of the reader's block.
    Compressed,
    /// As one of its own inputs.
    Direct,
}

/// One non-white cell: `input` is the row, `reader` the column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cell {
    pub input: usize,
    pub reader: usize,
    pub read: Read,
}

/// Draws the connection matrix of `features` to `path` (`.png` or `.svg`).
pub fn connection_matrix(features: &FeatureGraph, path: &Path) -> Result<(), PlotError> {
    let cells = cells(features);
    if features.depth() == 0 {
        return Err(PlotError::Empty {
            what: "a connection matrix without feature layers".into(),
        });
    }
    let figure = Matrix {
        layers: features.depth() + 1,
        block_starts: features.block_starts.clone(),
        cells,
    };
    render(path, &figure)
}

/// Lists every non-white cell of the matrix. A direct read wins over a
/// compressed one.
pub(crate) fn cells(features: &FeatureGraph) -> Vec<Cell> {
    let depth = features.depth();
    let mut reads: Vec<Vec<Option<Read>>> = vec![vec![None; depth + 1]; depth + 1];
    for (reader, row) in reads.iter_mut().enumerate().skip(1) {
        for target in features.graph.neighbors(features.layers[reader]) {
            let node = &features.graph[target];
            match node.kind {
                FeatureKind::Layer => row[node.index] = Some(Read::Direct),
                FeatureKind::Compressed => {
                    // The compressed node read by block `b` summarises every layer
                    // before that block's first layer.
                    let first = features.block_starts[node.block];
                    for slot in &mut row[..first] {
                        *slot = (*slot).max(Some(Read::Compressed));
                    }
                }
            }
        }
    }

    let mut cells = Vec::new();
    for (reader, row) in reads.iter().enumerate() {
        for (input, read) in row.iter().enumerate() {
            if let Some(read) = *read {
                cells.push(Cell {
                    input,
                    reader,
                    read,
                });
            }
        }
    }
    cells
}

struct Matrix {
    layers: usize,
    block_starts: Vec<usize>,
    cells: Vec<Cell>,
}

const COMPRESSED_GREY: RGBColor = RGBColor(170, 170, 170);
const BOUNDARY_BLUE: RGBColor = RGBColor(70, 110, 200);

impl Figure for Matrix {
    fn size(&self) -> (u32, u32) {
        // About 6 pixels per cell, between 360 and 1400 pixels of plot area.
        let side = (6 * self.layers).clamp(360, 1400) as u32;
        (side + 120, side + 170)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        path: &Path,
    ) -> Result<(), PlotError> {
        let n = self.layers as f64;
        // Row i of the matrix is drawn at height n - 1 - i so that row 0 is on top.
        let flip = |row: usize| n - 1.0 - row as f64;
        let step = label_step(self.layers);
        // Ticks fall on every integer; only multiples of `step` get a label.
        let label = move |index: f64| {
            let rounded = index.round();
            let whole = rounded as usize;
            let on_step = rounded >= 0.0 && whole / step * step == whole;
            if (index - rounded).abs() < 1e-6 && on_step {
                format!("{rounded:.0}")
            } else {
                String::new()
            }
        };

        let (title, body) = root.split_vertically(56);
        let caption = "(i, j) is black when x_j takes input from x_i";
        title
            .draw(&Text::new(caption, (60, 8), (FONT, 18).into_font()))
            .map_err(|e| draw_error(path, e))?;
        if self.cells.iter().any(|c| c.read == Read::Compressed) {
            let note = "grey: x_j reads x_i through its block's compressed features";
            title
                .draw(&Text::new(note, (60, 32), (FONT, 14).into_font()))
                .map_err(|e| draw_error(path, e))?;
        }

        let mut chart = ChartBuilder::on(&body)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5..n - 0.5, -0.5..n - 0.5)
            .map_err(|e| draw_error(path, e))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(self.layers)
            .y_labels(self.layers)
            .x_desc("j (reading layer)")
            .y_desc("i (input layer)")
            .label_style((FONT, 13))
            .x_label_formatter(&|v| label(*v))
            .y_label_formatter(&|v| label(n - 1.0 - v))
            .draw()
            .map_err(|e| draw_error(path, e))?;

        let cells = self.cells.iter().map(|cell| {
            let color = match cell.read {
                Read::Direct => BLACK,
                Read::Compressed => COMPRESSED_GREY,
            };
            let (x, y) = (cell.reader as f64, flip(cell.input));
            Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], color.filled())
        });
        chart.draw_series(cells).map_err(|e| draw_error(path, e))?;

        let boundaries = self.block_starts.iter().skip(1).flat_map(|&start| {
            let at = start as f64 - 0.5;
            let style = BOUNDARY_BLUE.stroke_width(1);
            [
                PathElement::new(vec![(at, -0.5), (at, n - 0.5)], style),
                PathElement::new(vec![(-0.5, n - at - 1.0), (n - 0.5, n - at - 1.0)], style),
            ]
        });
        chart
            .draw_series(boundaries)
            .map_err(|e| draw_error(path, e))?;
        Ok(())
    }
}

/// Picks the smallest of 1, 2, 5, 10, 20, 50, ... that labels at most 12 layers.
fn label_step(layers: usize) -> usize {
    let mut magnitude = 1;
    loop {
        for step in [magnitude, 2 * magnitude, 5 * magnitude] {
            if layers.div_ceil(step) <= 12 {
                return step;
            }
        }
        magnitude *= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::tests::{check_png, check_svg};
    use ldnc_ir::spec::NetSpec;

    fn features(text: &str) -> FeatureGraph {
        let spec = NetSpec::from_ron(text, "matrix.rs").expect("the literal parses");
        spec.validate().expect("the literal is valid");
        FeatureGraph::from_spec(&spec)
    }

    #[test]
    fn log_densenet_cells_are_direct() {
        let graph = features("(template: LogDenseNet, blocks: [8], growth: 4)");
        let cells = cells(&graph);
        // x8 reads x7, x6, x4 and x0.
        let read_by_8: Vec<usize> = cells
            .iter()
            .filter(|c| c.reader == 8)
            .map(|c| c.input)
            .collect();
        assert_eq!(read_by_8, vec![0, 4, 6, 7]);
        assert!(cells.iter().all(|c| c.read == Read::Direct));
        assert_eq!(cells.len(), graph.connections());
    }

    #[test]
    fn compressed_reads_are_grey() {
        let text =
            "(template: LogDenseNet, transition: BlockCompression, blocks: [3, 3], growth: 4)";
        let cells = cells(&features(text));
        let read_by_4: Vec<(usize, Read)> = cells
            .iter()
            .filter(|c| c.reader == 4)
            .map(|c| (c.input, c.read))
            .collect();
        // x4 starts block 1: it reads x0..x3 through the compressed features only.
        let expected: Vec<(usize, Read)> = (0..4).map(|i| (i, Read::Compressed)).collect();
        assert_eq!(read_by_4, expected);
        let read_by_6: Vec<(usize, Read)> = cells
            .iter()
            .filter(|c| c.reader == 6)
            .map(|c| (c.input, c.read))
            .collect();
        let mut expected: Vec<(usize, Read)> = (0..4).map(|i| (i, Read::Compressed)).collect();
        expected.extend([(4, Read::Direct), (5, Read::Direct)]);
        assert_eq!(read_by_6, expected);
    }

    #[test]
    fn label_steps() {
        assert_eq!(label_step(9), 1);
        assert_eq!(label_step(25), 5);
        assert_eq!(label_step(97), 10);
        assert_eq!(label_step(185), 20);
        assert_eq!(label_step(1000), 100);
    }

    #[test]
    fn matrix_png_and_svg() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let text =
            "(template: LogDenseNet, transition: BlockCompression, blocks: [12, 12], growth: 4)";
        let graph = features(text);
        let png = dir.path().join("matrix.png");
        connection_matrix(&graph, &png).expect("the PNG is written");
        let (width, height) = check_png(&png);
        assert_eq!((width, height), (480, 530));
        let svg = dir.path().join("matrix.svg");
        connection_matrix(&graph, &svg).expect("the SVG is written");
        let text = check_svg(&svg);
        assert!(
            text.contains("compressed features"),
            "the note on grey cells"
        );
    }
}
