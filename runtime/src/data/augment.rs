//! Data augmentation on `u8` HWC images, driven by a per-sample RNG.
//!
//! Each sample's random numbers come from [`sample_rng`]`(seed, epoch, index)`,
//! so an augmented sample depends on nothing else: not on the batch it lands
//! in, the thread that builds it, or the samples built before it.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// An augmentation policy.
#[derive(Debug, Clone, PartialEq)]
pub enum Augment {
    /// The image as it is.
    None,
    /// Zero-pad by `pad` pixels on each side, take a random crop of the
    /// original size and, when `flip` is set, mirror it with probability 1/2:
    /// the CIFAR augmentation of He et al. (2016) and Huang et al. (2017).
    /// With `blur_sigma`, half the samples are also blurred by a Gaussian
    /// whose sigma is drawn uniformly from `(0, blur_sigma]`.
    PadCrop {
        pad: usize,
        flip: bool,
        blur_sigma: Option<f32>,
    },
    /// Crop a random region of 8% to 100% of the area with aspect ratio 3/4
    /// to 4/3, resize it to `size` x `size` and mirror with probability 1/2
    /// (Szegedy et al., "Going Deeper with Convolutions", 2015).
    RandomResizedCrop { size: usize },
    /// Resize the shorter side to `resize`, then take the central `crop` x
    /// `crop` region: the usual ImageNet evaluation.
    ResizeCenterCrop { resize: usize, crop: usize },
    /// A random `size` x `size` crop (the whole side where the image is
    /// smaller) and a mirror with probability 1/2, applied to the image and
    /// its label map alike (the CamVid training of Jégou et al., 2017).
    RandomCrop { size: usize },
}

impl Augment {
    /// CIFAR-style pad-and-crop with zero padding `pad` (4 in the papers).
    pub fn cifar(pad: usize, flip: bool) -> Self {
        Augment::PadCrop {
            pad,
            flip,
            blur_sigma: None,
        }
    }

    /// SVHN pad-and-crop without mirroring (digits are not mirror-symmetric),
    /// with an optional Gaussian blur.
    pub fn svhn(pad: usize, blur_sigma: Option<f32>) -> Self {
        Augment::PadCrop {
            pad,
            flip: false,
            blur_sigma,
        }
    }

    /// ImageNet training: random-resized 224 crop and mirror.
    pub fn imagenet_train() -> Self {
        Augment::RandomResizedCrop { size: 224 }
    }

    /// ImageNet evaluation: shorter side 256, central 224 crop.
    pub fn imagenet_eval() -> Self {
        Augment::ResizeCenterCrop {
            resize: 256,
            crop: 224,
        }
    }

    /// CamVid training: random 224 crops and mirror.
    pub fn camvid() -> Self {
        Augment::RandomCrop { size: 224 }
    }

    /// The output height and width for an input of `height` x `width`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        match *self {
            Augment::None | Augment::PadCrop { .. } => (height, width),
            Augment::RandomResizedCrop { size } => (size, size),
            Augment::ResizeCenterCrop { crop, .. } => (crop, crop),
            Augment::RandomCrop { size } => (size.min(height), size.min(width)),
        }
    }
}

/// An augmented image with its label map, if it had one.
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentedSample {
    pub pixels: Vec<u8>,
    pub labels: Option<Vec<u32>>,
    pub height: usize,
    pub width: usize,
}

/// The RNG of one sample, derived from `(seed, epoch, index)` by SplitMix64 mixing.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> SmallRng {
    let mixed = splitmix(splitmix(splitmix(seed) ^ epoch) ^ index);
    SmallRng::seed_from_u64(mixed)
}

/// SplitMix64's finalizer (Steele et al., "Fast Splittable Pseudorandom
/// Number Generators", 2014).
pub(crate) fn splitmix(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Applies `augment` to one HWC image without labels, drawing from `rng`.
pub fn augment_image(
    augment: &Augment,
    image: &[u8],
    height: usize,
    width: usize,
    channels: usize,
    rng: &mut SmallRng,
) -> AugmentedSample {
    let shape = Shape {
        height,
        width,
        channels,
    };
    apply(augment, image, None, shape, rng)
}

/// The geometry of one image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

/// Applies `augment` to one image (and its label map), drawing from `rng`.
pub(crate) fn apply(
    augment: &Augment,
    image: &[u8],
    labels: Option<&[u32]>,
    shape: Shape,
    rng: &mut SmallRng,
) -> AugmentedSample {
    let Shape { height, width, .. } = shape;
    match *augment {
        Augment::None => AugmentedSample {
            pixels: image.to_vec(),
            labels: labels.map(<[u32]>::to_vec),
            height,
            width,
        },
        Augment::PadCrop {
            pad,
            flip,
            blur_sigma,
        } => {
            let dy = rng.gen_range(0..=2 * pad) as isize - pad as isize;
            let dx = rng.gen_range(0..=2 * pad) as isize - pad as isize;
            let mirror = flip && rng.gen_bool(0.5);
            let mut pixels = shift_crop(image, shape, dy, dx, mirror);
            if let Some(max_sigma) = blur_sigma {
                if rng.gen_bool(0.5) {
                    let sigma = rng.gen_range(f32::EPSILON..=max_sigma.max(f32::EPSILON));
                    pixels = gaussian_blur(&pixels, shape, sigma);
                }
            }
            let labels = labels.map(|l| crop_labels(l, shape, dy, dx, mirror, height, width));
            AugmentedSample {
                pixels,
                labels,
                height,
                width,
            }
        }
        Augment::RandomCrop { .. } => {
            let (out_h, out_w) = augment.output_size(height, width);
            let top = rng.gen_range(0..=height - out_h);
            let left = rng.gen_range(0..=width - out_w);
            let mirror = rng.gen_bool(0.5);
            let window = Shape {
                height: out_h,
                width: out_w,
                ..shape
            };
            AugmentedSample {
                pixels: window_crop(image, shape, window, top, left, mirror),
                labels: labels.map(|l| {
                    crop_labels(l, shape, top as isize, left as isize, mirror, out_h, out_w)
                }),
                height: out_h,
                width: out_w,
            }
        }
        Augment::RandomResizedCrop { size } => {
            let (top, left, crop_h, crop_w) = random_resized_region(height, width, rng);
            let mirror = rng.gen_bool(0.5);
            let region = [top, left, crop_h, crop_w];
            AugmentedSample {
                pixels: resample(image, shape, region, size, size, mirror),
                labels: None,
                height: size,
                width: size,
            }
        }
        Augment::ResizeCenterCrop { resize, crop } => {
            // Crop the region of the source that maps onto the central crop after resizing.
            let scale = resize as f32 / height.min(width) as f32;
            let side = crop as f32 / scale;
            let top = (height as f32 - side) / 2.0;
            let left = (width as f32 - side) / 2.0;
            AugmentedSample {
                pixels: resample(image, shape, [top, left, side, side], crop, crop, false),
                labels: None,
                height: crop,
                width: crop,
            }
        }
    }
}

/// Draws a crop region `(top, left, height, width)` with 8% to 100% of the
/// area and aspect ratio in [3/4, 4/3], trying 10 times before falling back
/// to the central square-ish crop of the whole image.
fn random_resized_region(height: usize, width: usize, rng: &mut SmallRng) -> (f32, f32, f32, f32) {
    let area = (height * width) as f32;
    let (log_low, log_high) = ((3.0f32 / 4.0).ln(), (4.0f32 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(0.08f32..=1.0);
        let ratio = rng.gen_range(log_low..=log_high).exp();
        let crop_w = (target * ratio).sqrt().round();
        let crop_h = (target / ratio).sqrt().round();
        if crop_w >= 1.0 && crop_h >= 1.0 && crop_w <= width as f32 && crop_h <= height as f32 {
            let top = rng.gen_range(0..=(height - crop_h as usize)) as f32;
            let left = rng.gen_range(0..=(width - crop_w as usize)) as f32;
            return (top, left, crop_h, crop_w);
        }
    }
    let side = height.min(width) as f32;
    (
        (height as f32 - side) / 2.0,
        (width as f32 - side) / 2.0,
        side,
        side,
    )
}

/// Copies the image shifted by (`dy`, `dx`) with zeros where the source is
/// outside, optionally mirrored: output `(y, x)` reads source `(y + dy, x + dx)`.
fn shift_crop(image: &[u8], shape: Shape, dy: isize, dx: isize, mirror: bool) -> Vec<u8> {
    let Shape {
        height,
        width,
        channels,
    } = shape;
    let mut out = vec![0u8; image.len()];
    for y in 0..height {
        let sy = y as isize + dy;
        if sy < 0 || sy >= height as isize {
            continue;
        }
        for x in 0..width {
            let column = if mirror { width - 1 - x } else { x };
            let sx = column as isize + dx;
            if sx < 0 || sx >= width as isize {
                continue;
            }
            let src = (sy as usize * width + sx as usize) * channels;
            let dst = (y * width + x) * channels;
            out[dst..dst + channels].copy_from_slice(&image[src..src + channels]);
        }
    }
    out
}

/// Copies the `window` at (`top`, `left`), optionally mirrored.
fn window_crop(
    image: &[u8],
    shape: Shape,
    window: Shape,
    top: usize,
    left: usize,
    mirror: bool,
) -> Vec<u8> {
    let channels = shape.channels;
    let mut out = Vec::with_capacity(window.height * window.width * channels);
    for y in 0..window.height {
        for x in 0..window.width {
            let column = if mirror { window.width - 1 - x } else { x };
            let src = ((top + y) * shape.width + left + column) * channels;
            out.extend_from_slice(&image[src..src + channels]);
        }
    }
    out
}

/// Moves a label map like [`shift_crop`] into an `out_h` x `out_w` window;
/// outside pixels get label `u32::MAX`, which no class uses.
fn crop_labels(
    labels: &[u32],
    shape: Shape,
    dy: isize,
    dx: isize,
    mirror: bool,
    out_h: usize,
    out_w: usize,
) -> Vec<u32> {
    let (height, width) = (shape.height as isize, shape.width as isize);
    let mut out = vec![u32::MAX; out_h * out_w];
    for y in 0..out_h {
        for x in 0..out_w {
            let column = if mirror { out_w - 1 - x } else { x };
            let (sy, sx) = (y as isize + dy, column as isize + dx);
            if (0..height).contains(&sy) && (0..width).contains(&sx) {
                out[y * out_w + x] = labels[(sy * width + sx) as usize];
            }
        }
    }
    out
}

/// Bilinearly resamples the source `region` = `[top, left, height, width]`
/// (in source pixels) to `out_h` x `out_w`, with pixel centres at half
/// integers and edge pixels repeated.
///
/// NOTE: there is no low-pass filter before downscaling, so shrinking by more
/// than 2x aliases slightly, unlike area or antialiased resizing.
fn resample(
    image: &[u8],
    shape: Shape,
    region: [f32; 4],
    out_h: usize,
    out_w: usize,
    mirror: bool,
) -> Vec<u8> {
    let Shape {
        height,
        width,
        channels,
    } = shape;
    let [top, left, region_h, region_w] = region;
    let mut out = Vec::with_capacity(out_h * out_w * channels);
    for y in 0..out_h {
        let sy = (top + (y as f32 + 0.5) * region_h / out_h as f32 - 0.5)
            .clamp(0.0, (height - 1) as f32);
        let y0 = sy.floor() as usize;
        let y1 = (y0 + 1).min(height - 1);
        let fy = sy - y0 as f32;
        for x in 0..out_w {
            let column = if mirror { out_w - 1 - x } else { x };
            let sx = (left + (column as f32 + 0.5) * region_w / out_w as f32 - 0.5)
                .clamp(0.0, (width - 1) as f32);
            let x0 = sx.floor() as usize;
            let x1 = (x0 + 1).min(width - 1);
            let fx = sx - x0 as f32;
            for c in 0..channels {
                let at = |yy: usize, xx: usize| image[(yy * width + xx) * channels + c] as f32;
                let value = (at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx) * (1.0 - fy)
                    + (at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx) * fy;
                out.push(value.round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

/// Blurs with a separable Gaussian of `sigma` pixels, truncated at 3 sigma,
/// repeating edge pixels.
fn gaussian_blur(image: &[u8], shape: Shape, sigma: f32) -> Vec<u8> {
    let Shape {
        height,
        width,
        channels,
    } = shape;
    let radius = (3.0 * sigma).ceil() as isize;
    let mut kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-((i * i) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);

    let pass = |input: &[f32], horizontal: bool| -> Vec<f32> {
        let mut out = vec![0f32; input.len()];
        for y in 0..height {
            for x in 0..width {
                for c in 0..channels {
                    let mut sum = 0.0;
                    for (k, weight) in kernel.iter().enumerate() {
                        let offset = k as isize - radius;
                        let (yy, xx) = if horizontal {
                            (
                                y,
                                (x as isize + offset).clamp(0, width as isize - 1) as usize,
                            )
                        } else {
                            (
                                (y as isize + offset).clamp(0, height as isize - 1) as usize,
                                x,
                            )
                        };
                        sum += weight * input[(yy * width + xx) * channels + c];
                    }
                    out[(y * width + x) * channels + c] = sum;
                }
            }
        }
        out
    };
    let values: Vec<f32> = image.iter().map(|&v| v as f32).collect();
    let blurred = pass(&pass(&values, true), false);
    blurred
        .iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(height: usize, width: usize) -> (Vec<u8>, Shape) {
        let image = (0..height * width).map(|i| i as u8).collect();
        let shape = Shape {
            height,
            width,
            channels: 1,
        };
        (image, shape)
    }

    #[test]
    fn shift_crop_pads_with_zeros() {
        let (image, shape) = ramp(3, 3);
        // Output (y, x) reads source (y - 1, x + 1).
        let out = shift_crop(&image, shape, -1, 1, false);
        assert_eq!(out, vec![0, 0, 0, 1, 2, 0, 4, 5, 0]);
        let mirrored = shift_crop(&image, shape, 0, 0, true);
        assert_eq!(mirrored, vec![2, 1, 0, 5, 4, 3, 8, 7, 6]);
    }

    #[test]
    fn resample_identity_region() {
        let (image, shape) = ramp(4, 5);
        let out = resample(&image, shape, [0.0, 0.0, 4.0, 5.0], 4, 5, false);
        assert_eq!(out, image);
    }

    #[test]
    fn center_crop_of_resized() {
        // A 4x8 image resized to shorter side 2 becomes 2x4; its central 2x2 crop
        // covers source columns 2..6.
        let (image, shape) = ramp(4, 8);
        let augment = Augment::ResizeCenterCrop { resize: 2, crop: 2 };
        let sample = apply(&augment, &image, None, shape, &mut sample_rng(0, 0, 0));
        assert_eq!((sample.height, sample.width), (2, 2));
        // Output (0, 0) samples source (0.5, 2.5): the mean of 2, 3, 10 and 11 is 6.5.
        assert_eq!(sample.pixels[0], 7, "{:?}", sample.pixels);
    }

    #[test]
    fn blur_keeps_constant_image() {
        let image = vec![77u8; 5 * 5 * 3];
        let shape = Shape {
            height: 5,
            width: 5,
            channels: 3,
        };
        assert_eq!(gaussian_blur(&image, shape, 1.5), image);
    }

    #[test]
    fn svhn_blur_is_seeded_and_applied() {
        let shape = Shape {
            height: 8,
            width: 8,
            channels: 3,
        };
        let image: Vec<u8> = (0..8 * 8 * 3).map(|i| (i * 37 % 256) as u8).collect();
        let blurred = Augment::svhn(2, Some(1.0));
        let sharp = Augment::svhn(2, None);
        let draw = |augment: &Augment, index| {
            apply(augment, &image, None, shape, &mut sample_rng(7, 0, index)).pixels
        };

        // Both policies draw the same crop offsets first, so a sample differs
        // from its sharp twin only where the blur was applied.
        let mut changed = 0;
        for index in 0..64 {
            let first = draw(&blurred, index);
            assert_eq!(first, draw(&blurred, index), "sample {index} is seeded");
            if first != draw(&sharp, index) {
                changed += 1;
            }
        }
        assert!(
            (16..=48).contains(&changed),
            "{changed} of 64 samples blurred"
        );
    }

    #[test]
    fn random_resized_region_fits() {
        let mut rng = sample_rng(1, 2, 3);
        for _ in 0..200 {
            let (top, left, h, w) = random_resized_region(30, 50, &mut rng);
            assert!(top >= 0.0 && left >= 0.0, "{top} {left}");
            assert!(top + h <= 30.0 && left + w <= 50.0, "{top} {left} {h} {w}");
        }
    }

    #[test]
    fn sample_rng_depends_on_each_input() {
        let draw = |s, e, i| sample_rng(s, e, i).gen::<u64>();
        assert_eq!(draw(1, 2, 3), draw(1, 2, 3));
        assert_ne!(draw(1, 2, 3), draw(2, 2, 3));
        assert_ne!(draw(1, 2, 3), draw(1, 3, 3));
        assert_ne!(draw(1, 2, 3), draw(1, 2, 4));
    }
}
