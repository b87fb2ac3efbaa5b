//! CamVid road scenes (Brostow et al., 2008) in the 11-class layout of the
//! SegNet tutorial: `train/`, `val/` and `test/` hold RGB PNGs, and
//! `trainannot/`, `valannot/` and `testannot/` hold same-named grayscale PNGs
//! whose values are class indices 0 to 10, with 11 for void (ignored).
//!
//! Class weights use median-frequency balancing (Eigen and Fergus, 2015):
//! `freq(c)` is the pixel count of class c divided by the pixel count of the
//! train images where c appears, and `weight(c) = median(freq) / freq(c)`.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::error::{DataError, Result};
use super::imagenet::decode_image_file;
use super::{list_dir, require_files, Dataset, Split};

/// The 11 CamVid classes, in label order.
pub const CAMVID_CLASSES: [&str; 11] = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
];

/// The void label, which losses and metrics ignore.
pub const CAMVID_VOID: u32 = 11;

/// Reads the CamVid train, val and test splits from the SegNet layout in `dir`.
pub fn load_camvid(dir: &Path) -> Result<Dataset> {
    require_files(
        "camvid",
        dir,
        &[
            "train",
            "trainannot",
            "val",
            "valannot",
            "test",
            "testannot",
        ],
    )?;
    let train = read_split(dir, "train")?;
    let val = read_split(dir, "val")?;
    let test = read_split(dir, "test")?;

    let names = CAMVID_CLASSES.iter().map(|name| name.to_string()).collect();
    let mut dataset = Dataset::new("camvid", train, test, names);
    dataset.class_weights = Some(median_frequency_weights(
        &dataset.train,
        CAMVID_CLASSES.len(),
    ));
    dataset.val = Some(val);
    dataset.ignore_label = Some(CAMVID_VOID);
    Ok(dataset)
}

fn image_files(dir: &Path) -> Vec<PathBuf> {
    list_dir(dir)
        .into_iter()
        .filter(|name| {
            let lower = name.to_ascii_lowercase();
            lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg")
        })
        .map(|name| dir.join(name))
        .collect()
}

fn read_split(dir: &Path, split: &str) -> Result<Split> {
    let image_dir = dir.join(split);
    let label_dir = dir.join(format!("{split}annot"));
    let files = image_files(&image_dir);
    if files.is_empty() {
        return Err(DataError::MissingFiles {
            dataset: "camvid".into(),
            dir: image_dir.clone(),
            expected: vec!["*.png images".into()],
            found: list_dir(&image_dir),
        });
    }

    let items: Vec<(image::RgbImage, Vec<u32>, PathBuf)> = files
        .par_iter()
        .map(|image_path| {
            let label_path =
                label_dir.join(image_path.file_name().expect("listed files have names"));
            if !label_path.is_file() {
                return Err(DataError::MissingFiles {
                    dataset: "camvid".into(),
                    dir: label_dir.clone(),
                    expected: vec![label_path.display().to_string()],
                    found: vec![],
                });
            }
            let image = decode_image_file(image_path)?.to_rgb8();
            let labels = decode_image_file(&label_path)?.to_luma8();
            if labels.dimensions() != image.dimensions() {
                return Err(DataError::Mismatch {
                    path: label_path,
                    reason: format!(
                        "label image is {:?} but {} is {:?}",
                        labels.dimensions(),
                        image_path.display(),
                        image.dimensions()
                    ),
                });
            }
            if let Some(index) = labels.as_raw().iter().position(|&l| l as u32 > CAMVID_VOID) {
                return Err(DataError::LabelOutOfRange {
                    label: labels.as_raw()[index] as i64,
                    path: label_path,
                    index,
                    classes: CAMVID_VOID as usize + 1,
                });
            }
            let labels = labels.into_raw().into_iter().map(u32::from).collect();
            Ok((image, labels, image_path.clone()))
        })
        .collect::<Result<_>>()?;

    let (width, height) = items[0].0.dimensions();
    let mut out = Split {
        images: Vec::with_capacity(items.len() * (width * height * 3) as usize),
        labels: Vec::with_capacity(items.len() * (width * height) as usize),
        height: height as usize,
        width: width as usize,
        channels: 3,
        len: items.len(),
    };
    for (image, labels, path) in items {
        if image.dimensions() != (width, height) {
            return Err(DataError::Mismatch {
                path,
                reason: format!(
                    "image is {:?} but the first image of {split}/ is {:?}; all images of a \
                     split must have one size",
                    image.dimensions(),
                    (width, height)
                ),
            });
        }
        out.images.extend_from_slice(image.as_raw());
        out.labels.extend_from_slice(&labels);
    }
    Ok(out)
}

/// Computes median-frequency class weights from the per-pixel labels of `split`;
/// a class absent from every image gets weight 0.
pub fn median_frequency_weights(split: &Split, classes: usize) -> Vec<f32> {
    let pixels_per_image = split.height * split.width;
    let mut class_pixels = vec![0u64; classes];
    let mut image_pixels = vec![0u64; classes];
    for labels in split.labels.chunks(pixels_per_image.max(1)) {
        let mut counts = vec![0u64; classes];
        for &label in labels {
            if (label as usize) < classes {
                counts[label as usize] += 1;
            }
        }
        for (c, &count) in counts.iter().enumerate() {
            if count > 0 {
                class_pixels[c] += count;
                image_pixels[c] += pixels_per_image as u64;
            }
        }
    }

    let frequencies: Vec<f64> = (0..classes)
        .map(|c| match image_pixels[c] {
            0 => 0.0,
            total => class_pixels[c] as f64 / total as f64,
        })
        .collect();
    let mut present: Vec<f64> = frequencies.iter().copied().filter(|&f| f > 0.0).collect();
    if present.is_empty() {
        return vec![0.0; classes];
    }
    present.sort_by(f64::total_cmp);
    let middle = present.len() / 2;
    let median = if present.len() & 1 == 0 {
        (present[middle - 1] + present[middle]) / 2.0
    } else {
        present[middle]
    };
    frequencies
        .iter()
        .map(|&f| if f > 0.0 { (median / f) as f32 } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_frequency_of_two_images() {
        // Image 1: class 0 on 3 pixels, class 1 on 1. Image 2: class 1 on 2, void on 2.
        let split = Split {
            images: vec![0; 8 * 3],
            labels: vec![0, 0, 0, 1, 1, 1, 11, 11],
            height: 2,
            width: 2,
            channels: 3,
            len: 2,
        };
        let weights = median_frequency_weights(&split, 3);
        // freq(0) = 3/4, freq(1) = 3/8, class 2 absent; median of {3/4, 3/8} = 9/16.
        assert!((weights[0] - 0.75).abs() < 1e-6, "{weights:?}");
        assert!((weights[1] - 1.5).abs() < 1e-6, "{weights:?}");
        assert_eq!(weights[2], 0.0);
    }
}
