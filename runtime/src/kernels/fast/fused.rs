//! Fast fused BN-ReLU kernels that never materialise the concatenation
//! `x = concat(x_1 .. x_m)`, its batch-norm output `u = bn(x)` or the
//! rectified input `z = relu(u)` of the convolution for the whole layer.
//!
//! The convolution and its filter gradient pack one GEMM operand per block
//! of `BLOCK_PIXELS` output pixels, as the unfused convolutions do, but fill
//! it with `z` computed while loading. Each tap of an im2col row reads the
//! pixel from every input's own slice, then normalises and rectifies it. For a 1x1
//! stride-1 convolution without padding the packed rows are the rectified
//! pixels themselves. A rayon task therefore holds one `rows x k*k*C` block,
//! never a layer-sized buffer. The batch-norm gradients recompute `u` per
//! element for the ReLU mask, in two passes over blocks of pixels: per-channel
//! sums, then the element-wise gradient.
//!
//! The normalisation is `u = x * scale + shift` in f32, with
//! `scale = gamma / sqrt(var + eps)` and `shift = beta - mean * scale`, as in
//! the fast `bn_apply`, so the fused and the unfused fast kernels agree on the
//! ReLU mask. Sums of the gradients run in f64, one partial per block, added
//! in block order, so the rounding does not depend on the thread schedule.

use super::matmul::{matmul, Mat};
use crate::kernels::dispatch::BnRelu;
use crate::kernels::layout::{ConvShape, Window};
use rayon::prelude::*;

/// Output pixels per packed GEMM block. A block of `k * k * C` columns then
/// takes `256 * 9 * C * 4` bytes, under 3 MiB for C up to 256 at k = 3.
const BLOCK_PIXELS: usize = 256;

/// Pixels per rayon task in the batch-norm gradient passes.
const BLOCK_ROWS: usize = 512;

/// Reads `z = relu(bn(concat(x)))` and `u = bn(concat(x))` from the separate
/// inputs of a fused op.
struct Loader<'a> {
    input: &'a BnRelu<'a>,
    /// Channels of the concatenation.
    width: usize,
    /// First channel of each input within the concatenation.
    offsets: Vec<usize>,
    /// Per-channel `1 / sqrt(var + eps)`.
    inv: Vec<f32>,
    /// Per-channel `gamma / sqrt(var + eps)`.
    scale: Vec<f32>,
    /// Per-channel `beta - mean * scale`.
    shift: Vec<f32>,
}

impl<'a> Loader<'a> {
    fn new(input: &'a BnRelu<'a>) -> Loader<'a> {
        let width = input.width();
        let offsets = input
            .channels
            .iter()
            .scan(0, |start, &c| {
                let first = *start;
                *start += c;
                Some(first)
            })
            .collect();
        let (stats, affine) = (input.stats, input.affine);
        let inv: Vec<f32> = stats[width..2 * width]
            .iter()
            .map(|&var| 1.0 / (var + input.eps).sqrt())
            .collect();
        let scale: Vec<f32> = (0..width).map(|ch| affine[ch] * inv[ch]).collect();
        let shift = (0..width)
            .map(|ch| affine[width + ch] - stats[ch] * scale[ch])
            .collect();
        Loader {
            input,
            width,
            offsets,
            inv,
            scale,
            shift,
        }
    }

    /// Iterates over the inputs as `(first channel, channels, pixel values)`
    /// for pixel `pixel` of the batch.
    fn parts_at(&self, pixel: usize) -> impl Iterator<Item = (usize, usize, &'a [f32])> + '_ {
        let input = self.input;
        input
            .parts
            .iter()
            .zip(&input.channels)
            .zip(&self.offsets)
            .map(move |((part, &c), &first)| (first, c, &part[pixel * c..(pixel + 1) * c]))
    }

    /// Writes the `C` values of `z` at pixel `pixel` of the batch into `dst`.
    #[inline]
    fn load(&self, pixel: usize, dst: &mut [f32]) {
        for (first, c, x) in self.parts_at(pixel) {
            let scale = &self.scale[first..first + c];
            let shift = &self.shift[first..first + c];
            for (((z, &xv), &a), &b) in dst[first..first + c]
                .iter_mut()
                .zip(x)
                .zip(scale)
                .zip(shift)
            {
                *z = (xv * a + b).max(0.0);
            }
        }
    }
}

/// Fills `col` (`rows x k*k*C`) with the im2col rows of `z` for output
/// pixels `first .. first + rows`, with zeros for taps in the padding
/// (the convolution pads `z`, so padded taps are 0 after the ReLU too).
///
/// NOTE: with a `k x k` window every input pixel is normalised once per tap
/// that reads it, up to `k * k` times. Normalising each image once into a
/// buffer of one image would avoid that repeated work.
fn pack(win: &Window, loader: &Loader, first: usize, rows: usize, col: &mut [f32]) {
    let c = loader.width;
    let width = win.k * win.k * c;
    if width == 0 {
        return;
    }
    let pointwise = win.k == 1 && win.stride == 1 && win.pad == 0;
    let per_image = win.small_h * win.small_w;
    for (r, row) in col[..rows * width].chunks_exact_mut(width).enumerate() {
        let pixel = first + r;
        if pointwise {
            loader.load(pixel, row);
            continue;
        }
        let (img, sy, sx) = (
            pixel / per_image,
            pixel % per_image / win.small_w,
            pixel % win.small_w,
        );
        for ky in 0..win.k {
            let by = win.big_coord(sy, ky, win.big_h);
            for kx in 0..win.k {
                let tap = ky * win.k + kx;
                let dst = &mut row[tap * c..(tap + 1) * c];
                match (by, win.big_coord(sx, kx, win.big_w)) {
                    (Some(by), Some(bx)) => {
                        loader.load((img * win.big_h + by) * win.big_w + bx, dst);
                    }
                    _ => dst.fill(0.0),
                }
            }
        }
    }
}

/// `y = im2col(z) * W` with `W = w` as `[k*k*C, cout]`, one packed block of
/// output pixels per rayon task.
pub fn bn_relu_conv(shape: &ConvShape, input: &BnRelu, w: &[f32], y: &mut [f32]) {
    let loader = Loader::new(input);
    let cout = shape.cout;
    let width = shape.taps() * shape.cin;
    let wmat = Mat::new(w, width, cout);
    y.par_chunks_mut((BLOCK_PIXELS * cout).max(1))
        .enumerate()
        .for_each_init(Vec::new, |col, (block, out)| {
            let rows = out.len() / cout.max(1);
            col.resize(rows * width, 0.0);
            pack(&shape.win, &loader, block * BLOCK_PIXELS, rows, col);
            matmul(out, Mat::new(col, rows, width), wmat, false, false);
        });
}

/// `dw = im2col(z)^T * dy`, a `[k*k*C, cout]` matrix. Each rayon task sums an
/// equal share of the pixel blocks into one partial, as the unfused filter
/// gradient does, so the partials cost one weight-sized buffer per task.
pub fn bn_relu_conv_backward_filter(shape: &ConvShape, input: &BnRelu, dy: &[f32], dw: &mut [f32]) {
    let loader = Loader::new(input);
    let cout = shape.cout;
    let width = shape.taps() * shape.cin;
    let pixels = shape.win.small_pixels();
    let blocks = pixels.div_ceil(BLOCK_PIXELS);
    let shares = rayon::current_num_threads().min(blocks).max(1);
    let partials: Vec<Vec<f32>> = (0..shares)
        .into_par_iter()
        .map(|share| {
            let mut acc = vec![0f32; dw.len()];
            let mut col = Vec::new();
            for block in share * blocks / shares..(share + 1) * blocks / shares {
                let first = block * BLOCK_PIXELS;
                let rows = BLOCK_PIXELS.min(pixels - first);
                col.resize(rows * width, 0.0);
                pack(&shape.win, &loader, first, rows, &mut col);
                let lhs = Mat::new(&col, rows, width).t();
                let rhs = Mat::new(&dy[first * cout..(first + rows) * cout], rows, cout);
                matmul(&mut acc, lhs, rhs, true, false);
            }
            acc
        })
        .collect();

    dw.fill(0.0);
    for partial in partials {
        for (g, p) in dw.iter_mut().zip(&partial) {
            *g += p;
        }
    }
}

/// Calls `f(channel, xhat, du)` for every channel of pixel `pixel`, with
/// `xhat = (x - mean) * inv` and `du = dz * [u > 0]` the gradient of the
/// batch-norm output. `dz_row` is the pixel's row of `dz`.
#[inline]
fn for_each_masked(
    loader: &Loader,
    pixel: usize,
    dz_row: &[f32],
    mut f: impl FnMut(usize, f32, f32),
) {
    let mean = loader.input.stats;
    for (first, _, x) in loader.parts_at(pixel) {
        for (j, &xv) in x.iter().enumerate() {
            let ch = first + j;
            let u = xv * loader.scale[ch] + loader.shift[ch];
            let du = if u > 0.0 { dz_row[ch] } else { 0.0 };
            f(ch, (xv - mean[ch]) * loader.inv[ch], du);
        }
    }
}

/// Per-channel `[sum du; sum du * xhat]` over the batch, as `2 * C` values.
fn masked_sums(loader: &Loader, dz: &[f32]) -> Vec<f64> {
    let (c, pixels) = (loader.width, loader.input.pixels);
    let partials: Vec<Vec<f64>> = (0..pixels.div_ceil(BLOCK_ROWS))
        .into_par_iter()
        .map(|block| {
            let mut acc = vec![0f64; 2 * c];
            for pixel in block * BLOCK_ROWS..((block + 1) * BLOCK_ROWS).min(pixels) {
                let dz_row = &dz[pixel * c..(pixel + 1) * c];
                for_each_masked(loader, pixel, dz_row, |ch, xhat, du| {
                    acc[ch] += du as f64;
                    acc[c + ch] += du as f64 * xhat as f64;
                });
            }
            acc
        })
        .collect();

    let mut sums = vec![0f64; 2 * c];
    for partial in partials {
        for (s, p) in sums.iter_mut().zip(&partial) {
            *s += p;
        }
    }
    sums
}

/// Gradient of `z = relu(bn(x))` with respect to the concatenation `x`, with
/// batch statistics: `dx = gamma * inv / m * (m * du - sum du - xhat * sum(du * xhat))`
/// over the `m` pixels of the batch, where `du = dz * [u > 0]`.
pub fn bn_relu_backward(input: &BnRelu, dz: &[f32], dx: &mut [f32]) {
    let loader = Loader::new(input);
    let c = loader.width;
    if c == 0 {
        return;
    }
    let m = input.pixels as f64;
    let sums = masked_sums(&loader, dz);
    let mean_du: Vec<f32> = sums[..c].iter().map(|s| (s / m) as f32).collect();
    let mean_du_xhat: Vec<f32> = sums[c..].iter().map(|s| (s / m) as f32).collect();

    dx.par_chunks_mut(BLOCK_ROWS * c)
        .enumerate()
        .for_each(|(block, out)| {
            for (r, row) in out.chunks_exact_mut(c).enumerate() {
                let pixel = block * BLOCK_ROWS + r;
                let dz_row = &dz[pixel * c..(pixel + 1) * c];
                for_each_masked(&loader, pixel, dz_row, |ch, xhat, du| {
                    row[ch] = loader.scale[ch] * (du - mean_du[ch] - xhat * mean_du_xhat[ch]);
                });
            }
        });
}

/// Gradient of `z = relu(bn(x))` with respect to the affine parameters:
/// `dgamma = sum du * xhat` (row 0) and `dbeta = sum du` (row 1), where
/// `du = dz * [u > 0]`.
pub fn bn_relu_affine_grad(input: &BnRelu, dz: &[f32], grad: &mut [f32]) {
    let loader = Loader::new(input);
    let c = loader.width;
    let sums = masked_sums(&loader, dz);
    for ch in 0..c {
        grad[ch] = sums[c + ch] as f32;
        grad[c + ch] = sums[ch] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_reads_each_input_slice() {
        // Two inputs of 1 and 2 channels over 2 pixels. Channel 1 has gamma 2
        // and beta -1, and the others are the identity (eps 0, variance 1).
        let input = BnRelu {
            parts: vec![&[-1.0, 3.0], &[1.0, 2.0, 4.0, 5.0]],
            channels: vec![1, 2],
            pixels: 2,
            stats: &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            affine: &[1.0, 2.0, 1.0, 0.0, -1.0, 0.0],
            eps: 0.0,
        };
        let loader = Loader::new(&input);
        let mut z = [9.0; 3];
        loader.load(0, &mut z);
        assert_eq!(z, [0.0, 1.0, 2.0]);
        loader.load(1, &mut z);
        assert_eq!(z, [3.0, 7.0, 5.0]);
    }
}
