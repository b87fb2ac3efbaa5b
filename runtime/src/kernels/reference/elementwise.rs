//! Element-wise ops and channel/spatial copies.
//!
//! These loops are already bound by memory bandwidth, so the fast set runs
//! these same functions on disjoint chunks in parallel instead of having
//! its own copy. For that reason every function here works on any aligned
//! chunk: element-wise ops take matching sub-slices, and the copies work on
//! whole images or pixel rows.

/// `y = max(x, 0)`.
pub fn relu(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.max(0.0);
    }
}

/// Gradient of [`relu`]: `dx = dy * [x > 0]` (0 at `x = 0`, as in PyTorch).
pub fn relu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
        *o = if v > 0.0 { d } else { 0.0 };
    }
}

/// Element-wise product of all operands.
pub fn mul(parts: &[&[f32]], y: &mut [f32]) {
    y.fill(1.0);
    for part in parts {
        for (o, &v) in y.iter_mut().zip(*part) {
            *o *= v;
        }
    }
}

/// Element-wise sum of all operands.
pub fn sum(parts: &[&[f32]], y: &mut [f32]) {
    y.fill(0.0);
    for part in parts {
        for (o, &v) in y.iter_mut().zip(*part) {
            *o += v;
        }
    }
}

/// `y = factor * x`.
pub fn scale(x: &[f32], factor: f32, y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = factor * v;
    }
}

/// The SplitMix64 output function (Steele, Lea and Flood, "Fast Splittable
/// Pseudorandom Number Generators", OOPSLA 2014).
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in `[0, 1)` that depends only on `seed` and `index`, so any
/// split of the elements over threads draws the same values.
pub fn uniform(seed: u64, index: u64) -> f32 {
    let bits = splitmix64(seed ^ splitmix64(index));
    // The top 24 bits fill an f32 mantissa exactly.
    (bits >> 40) as f32 / (1u64 << 24) as f32
}

/// Inverted-dropout mask for elements `first .. first + y.len()`: `1 / (1 - p)`
/// where `uniform(seed, index) >= p` (probability `1 - p`) and 0 elsewhere.
/// Requires `0 <= p < 1`.
pub fn dropout_mask(seed: u64, p: f32, first: usize, y: &mut [f32]) {
    let keep = 1.0 / (1.0 - p);
    for (i, o) in y.iter_mut().enumerate() {
        *o = if uniform(seed, (first + i) as u64) >= p {
            keep
        } else {
            0.0
        };
    }
}

/// Concatenates the channels of `parts` (part `i` has `channels[i]`) pixel by
/// pixel into `y`.
pub fn concat(parts: &[&[f32]], channels: &[usize], y: &mut [f32]) {
    let total: usize = channels.iter().sum();
    for (pixel, row) in y.chunks_exact_mut(total.max(1)).enumerate() {
        let mut at = 0;
        for (part, &c) in parts.iter().zip(channels) {
            row[at..at + c].copy_from_slice(&part[pixel * c..(pixel + 1) * c]);
            at += c;
        }
    }
}

/// Channels `start .. start + len` of `x`, which has `c` channels.
pub fn slice(x: &[f32], c: usize, start: usize, len: usize, y: &mut [f32]) {
    for (row, out) in x.chunks_exact(c).zip(y.chunks_exact_mut(len.max(1))) {
        out.copy_from_slice(&row[start..start + len]);
    }
}

/// Top-left `h x w` crop of images of `src_h x src_w x c`.
pub fn crop(
    x: &[f32],
    (src_h, src_w, c): (usize, usize, usize),
    h: usize,
    w: usize,
    y: &mut [f32],
) {
    let images = y.len() / (h * w * c).max(1);
    for img in 0..images {
        for row in 0..h {
            let src = ((img * src_h + row) * src_w) * c;
            let dst = ((img * h + row) * w) * c;
            y[dst..dst + w * c].copy_from_slice(&x[src..src + w * c]);
        }
    }
}

/// Gradient of [`crop`]: `dy` of `h x w x c` images placed at the top left
/// of zero images of `dst_h x dst_w`.
pub fn crop_backward(
    dy: &[f32],
    (h, w, c): (usize, usize, usize),
    dst_h: usize,
    dst_w: usize,
    dx: &mut [f32],
) {
    dx.fill(0.0);
    let images = dy.len() / (h * w * c).max(1);
    for img in 0..images {
        for row in 0..h {
            let src = ((img * h + row) * w) * c;
            let dst = ((img * dst_h + row) * dst_w) * c;
            dx[dst..dst + w * c].copy_from_slice(&dy[src..src + w * c]);
        }
    }
}

/// Sum over the batch dimension: `y[j] = sum_img x[img, j]`.
pub fn sum_batch(x: &[f32], y: &mut [f32]) {
    let mut acc = vec![0f64; y.len()];
    for item in x.chunks_exact(y.len().max(1)) {
        for (a, &v) in acc.iter_mut().zip(item) {
            *a += v as f64;
        }
    }
    for (o, a) in y.iter_mut().zip(&acc) {
        *o = *a as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu_and_backward() {
        let mut y = [0.0; 3];
        relu(&[-1.0, 0.0, 2.0], &mut y);
        assert_eq!(y, [0.0, 0.0, 2.0]);
        relu_backward(&[-1.0, 0.0, 2.0], &[5.0, 5.0, 5.0], &mut y);
        assert_eq!(y, [0.0, 0.0, 5.0]);
    }

    #[test]
    fn nary_mul_sum_scale() {
        let mut y = [0.0; 2];
        mul(&[&[1.0, 2.0], &[3.0, 4.0], &[2.0, 2.0]], &mut y);
        assert_eq!(y, [6.0, 16.0]);
        sum(&[&[1.0, 2.0], &[3.0, 4.0], &[2.0, 2.0]], &mut y);
        assert_eq!(y, [6.0, 8.0]);
        scale(&[1.0, -2.0], 0.5, &mut y);
        assert_eq!(y, [0.5, -1.0]);
    }

    #[test]
    fn dropout_mask_keeps_expected_fraction() {
        let mut y = vec![0.0; 20_000];
        dropout_mask(7, 0.25, 0, &mut y);
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
        assert!((kept - 0.75).abs() < 0.02, "kept fraction {kept}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
    }

    #[test]
    fn dropout_mask_depends_on_seed_and_index_only() {
        let mut whole = vec![0.0; 100];
        dropout_mask(3, 0.5, 0, &mut whole);
        let mut tail = vec![0.0; 40];
        dropout_mask(3, 0.5, 60, &mut tail);
        assert_eq!(&whole[60..], &tail[..]);
        let mut other = vec![0.0; 100];
        dropout_mask(4, 0.5, 0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn concat_and_slice_invert() {
        // Two pixels; part a has 1 channel, part b has 2.
        let mut y = [0.0; 6];
        concat(&[&[1.0, 2.0], &[10.0, 11.0, 20.0, 21.0]], &[1, 2], &mut y);
        assert_eq!(y, [1.0, 10.0, 11.0, 2.0, 20.0, 21.0]);
        let mut b = [0.0; 4];
        slice(&y, 3, 1, 2, &mut b);
        assert_eq!(b, [10.0, 11.0, 20.0, 21.0]);
    }

    #[test]
    fn crop_and_backward() {
        let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let mut y = [0.0; 4];
        crop(&x, (3, 3, 1), 2, 2, &mut y);
        assert_eq!(y, [0.0, 1.0, 3.0, 4.0]);
        let mut dx = [9.0; 9];
        crop_backward(&y, (2, 2, 1), 3, 3, &mut dx);
        assert_eq!(dx, [0.0, 1.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn sum_batch_adds_items() {
        let mut y = [0.0; 2];
        sum_batch(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut y);
        assert_eq!(y, [9.0, 12.0]);
    }
}
