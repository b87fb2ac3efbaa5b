//! Tiled evaluation of segmentation: square tiles of the network's input size
//! that cover each test image, with each pixel scored once.

use crate::data::{Batch, Normalization, Split};

use super::data::normalize_into;

/// The tiles of [`EvalView::Tiles`](super::EvalView::Tiles) over a split whose images share one size.
pub(super) struct TileGrid {
    size: usize,
    /// `(image, top, left)` of every tile, image by image, rows of tiles in order.
    pub(super) tiles: Vec<(usize, usize, usize)>,
    /// For each image row, the top of the first tile that contains it.
    row_owner: Vec<usize>,
    /// For each image column, the left edge of the first tile that contains it.
    column_owner: Vec<usize>,
}

impl TileGrid {
    pub(super) fn new(split: &Split, size: usize) -> TileGrid {
        let tops = tile_starts(split.height, size);
        let lefts = tile_starts(split.width, size);
        let tiles = (0..split.len)
            .flat_map(|image| {
                let lefts = &lefts;
                tops.iter()
                    .flat_map(move |&top| lefts.iter().map(move |&left| (image, top, left)))
            })
            .collect();
        TileGrid {
            size,
            tiles,
            row_owner: first_owner(&tops, split.height, size),
            column_owner: first_owner(&lefts, split.width, size),
        }
    }

    /// Cuts `tiles` out of `split` into one batch. A pixel that an earlier
    /// tile already covers gets label `ignore`, so it is scored once. With no
    /// ignore label, it is scored in every tile that contains it.
    pub(super) fn batch(
        &self,
        split: &Split,
        norm: &Normalization,
        ignore: Option<u32>,
        tiles: &[(usize, usize, usize)],
    ) -> Batch {
        let size = self.size;
        let channels = split.channels;
        let mut images = Vec::with_capacity(tiles.len() * size * size * channels);
        let mut labels = Vec::with_capacity(tiles.len() * size * size);
        for &(image, top, left) in tiles {
            let pixels = split.image(image);
            let label_map = split.label(image);
            for y in top..top + size {
                let row = y * split.width;
                let start = (row + left) * channels;
                normalize_into(&pixels[start..start + size * channels], norm, &mut images);
                for x in left..left + size {
                    let owned = self.row_owner[y] == top && self.column_owner[x] == left;
                    let label = match ignore {
                        Some(ignore) if !owned => ignore,
                        _ => label_map[row + x],
                    };
                    labels.push(label as f32);
                }
            }
        }
        Batch {
            images,
            labels,
            len: tiles.len(),
            height: size,
            width: size,
            channels,
            indices: tiles.iter().map(|&(image, _, _)| image).collect(),
        }
    }
}

/// Starts of `size`-long windows that cover `0..length`: every `size`
/// pixels, and the last flush with the end. `length` must be at least `size`.
fn tile_starts(length: usize, size: usize) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut start = 0;
    while start + size < length {
        starts.push(start);
        start += size;
    }
    starts.push(length - size);
    starts
}

/// For each coordinate in `0..length`, the first of `starts` whose window contains it.
fn first_owner(starts: &[usize], length: usize, size: usize) -> Vec<usize> {
    (0..length)
        .map(|position| {
            *starts
                .iter()
                .find(|&&start| position >= start && position < start + size)
                .expect("the windows cover every position")
        })
        .collect()
}
