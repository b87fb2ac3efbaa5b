//! ILSVRC2012 (Russakovsky et al., 2015) as `(path, label)` lists: the train
//! split as one folder of JPEGs per WordNet id, the validation split either
//! the same way or flat with a ground-truth file. Class indices follow the
//! sorted WordNet ids of the train folders, the order most ImageNet code uses.
//!
//! A flat validation folder takes its labels from, in this order: the
//! devkit's `ILSVRC2012_validation_ground_truth.txt` (1-based ILSVRC2012_ID
//! per image) mapped to WordNet ids through the devkit's `meta.mat`; the
//! Kaggle `LOC_val_solution.csv`; or a `val.txt` of `FILE LABEL` lines with
//! labels already in sorted-WordNet-id order.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::error::{DataError, Result};
use super::mat::{find_variable, read_mat};
use super::{list_dir, read_file, FileDataset};

/// Per-channel mean of ImageNet train images in `[0, 1]` units, the values
/// torchvision's ImageNet reference scripts normalize by.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel standard deviation matching [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

const DEVKIT_DATA: &str = "ILSVRC2012_devkit_t12/data";
const GROUND_TRUTH: &str = "ILSVRC2012_validation_ground_truth.txt";

/// Decodes an image file by its content, not its extension, so PNG data
/// named `.JPEG` (one such file is in the ILSVRC2012 train set) and CMYK or
/// grayscale JPEGs all decode.
///
/// Each call decodes on the calling thread only, because `image` 0.25 decodes
/// JPEGs with zune-jpeg, which starts no threads. A loader with N workers
/// therefore uses N cores.
pub fn decode_image_file(path: &Path) -> Result<image::DynamicImage> {
    let bytes = read_file(path)?;
    let decode_error = |reason: String| DataError::Decode {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.starts_with(&JPEG_START_OF_IMAGE) && !jpeg_has_end_of_image(&bytes) {
        return Err(decode_error(
            "the JPEG data is truncated: no end-of-image marker follows its last scan".into(),
        ));
    }

    image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|error| decode_error(error.to_string()))?
        .decode()
        .map_err(|error| decode_error(error.to_string()))
}

const JPEG_START_OF_IMAGE: [u8; 2] = [0xFF, 0xD8];
const JPEG_START_OF_SCAN: [u8; 2] = [0xFF, 0xDA];
const JPEG_END_OF_IMAGE: [u8; 2] = [0xFF, 0xD9];

/// Checks that an end-of-image marker follows the last start-of-scan marker.
///
/// zune-jpeg, in the non-strict mode that `image` 0.25 sets, decodes a
/// truncated file without an error, so this check keeps truncated files
/// reported as undecodable. Entropy-coded data escapes every 0xFF byte,
/// so neither marker occurs inside a scan. An EXIF thumbnail ends before the
/// main image's first scan, so its end-of-image marker does not count.
fn jpeg_has_end_of_image(bytes: &[u8]) -> bool {
    let last_scan = bytes
        .windows(2)
        .rposition(|pair| pair == JPEG_START_OF_SCAN)
        .unwrap_or(0);
    bytes[last_scan..]
        .windows(2)
        .any(|pair| pair == JPEG_END_OF_IMAGE)
}

fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".jpeg", ".jpg", ".png"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

fn subfolders(dir: &Path) -> Vec<String> {
    list_dir(dir)
        .into_iter()
        .filter(|name| dir.join(name).is_dir())
        .collect()
}

/// Lists `(path, class)` for every image in class folders under `dir`.
fn list_class_folders(dir: &Path, classes: &HashMap<String, u32>) -> Result<Vec<(PathBuf, u32)>> {
    let folders = subfolders(dir);
    let lists: Vec<Vec<(PathBuf, u32)>> = folders
        .par_iter()
        .map(|folder| {
            let label = *classes.get(folder).ok_or_else(|| DataError::Mismatch {
                path: dir.join(folder),
                reason: format!("class folder `{folder}` has no counterpart in train/"),
            })?;
            let path = dir.join(folder);
            Ok(list_dir(&path)
                .into_iter()
                .filter(|name| is_image_name(name))
                .map(|name| (path.join(name), label))
                .collect())
        })
        .collect::<Result<_>>()?;
    Ok(lists.into_iter().flatten().collect())
}

/// Opens ILSVRC2012 under `dir` (which contains `train/` and `val/`).
pub fn open_imagenet(dir: &Path) -> Result<FileDataset> {
    let train_dir = dir.join("train");
    let val_dir = dir.join("val");
    let class_names = subfolders(&train_dir);
    if class_names.is_empty() || !val_dir.is_dir() {
        return Err(DataError::MissingFiles {
            dataset: "imagenet".into(),
            dir: dir.to_path_buf(),
            expected: vec![
                "train/<wnid>/*.JPEG".into(),
                "val/<wnid>/*.JPEG or val/*.JPEG with a ground-truth file".into(),
            ],
            found: list_dir(dir),
        });
    }
    let classes: HashMap<String, u32> = class_names
        .iter()
        .enumerate()
        .map(|(index, name)| (name.clone(), index as u32))
        .collect();

    let train = list_class_folders(&train_dir, &classes)?;
    let test = if subfolders(&val_dir).is_empty() {
        list_flat_val(dir, &val_dir, &classes)?
    } else {
        list_class_folders(&val_dir, &classes)?
    };
    Ok(FileDataset {
        name: "imagenet".into(),
        train,
        test,
        classes: class_names.len(),
        class_names,
        mean: IMAGENET_MEAN.to_vec(),
        std: IMAGENET_STD.to_vec(),
    })
}

fn list_flat_val(
    dir: &Path,
    val_dir: &Path,
    classes: &HashMap<String, u32>,
) -> Result<Vec<(PathBuf, u32)>> {
    let files: Vec<String> = list_dir(val_dir)
        .into_iter()
        .filter(|n| is_image_name(n))
        .collect();
    let labels = read_val_labels(dir, val_dir, classes)?;

    let mut out = Vec::with_capacity(files.len());
    for file in files {
        let stem = file.split('.').next().unwrap_or(&file).to_string();
        let label = labels
            .get(&stem)
            .copied()
            .ok_or_else(|| DataError::Mismatch {
                path: val_dir.join(&file),
                reason: "the ground-truth file has no label for this image".into(),
            })?;
        out.push((val_dir.join(file), label));
    }
    Ok(out)
}

/// Reads validation labels keyed by file stem from the first ground-truth source found.
fn read_val_labels(
    dir: &Path,
    val_dir: &Path,
    classes: &HashMap<String, u32>,
) -> Result<HashMap<String, u32>> {
    let devkit = [dir.join(DEVKIT_DATA), dir.to_path_buf()]
        .into_iter()
        .find(|d| d.join(GROUND_TRUTH).is_file() && d.join("meta.mat").is_file());
    if let Some(devkit) = devkit {
        return read_devkit_labels(&devkit, classes);
    }
    let csv = dir.join("LOC_val_solution.csv");
    if csv.is_file() {
        return read_kaggle_labels(&csv, classes);
    }
    for text in [dir.join("val.txt"), val_dir.join("val.txt")] {
        if text.is_file() {
            return read_val_txt(&text, classes.len());
        }
    }
    Err(DataError::MissingFiles {
        dataset: "imagenet".into(),
        dir: dir.to_path_buf(),
        expected: vec![
            format!("{DEVKIT_DATA}/{GROUND_TRUTH} with {DEVKIT_DATA}/meta.mat"),
            "LOC_val_solution.csv".into(),
            "val.txt".into(),
        ],
        found: list_dir(dir),
    })
}

fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_file(path)?)
        .map_err(|_| DataError::format(path, "text", "the file is not UTF-8"))
}

fn read_devkit_labels(
    devkit: &Path,
    classes: &HashMap<String, u32>,
) -> Result<HashMap<String, u32>> {
    let meta_path = devkit.join("meta.mat");
    let arrays = read_mat(&meta_path)?;
    let synsets = find_variable(&arrays, "synsets", &meta_path)?;

    // ILSVRC2012_ID -> class index, through the WordNet id.
    let mut by_id = HashMap::new();
    for element in 0..synsets.len() {
        let id = synsets
            .field(element, "ILSVRC2012_ID")
            .and_then(|a| a.to_f64())
            .and_then(|v| v.first().copied());
        let wnid = synsets.field(element, "WNID").and_then(|a| a.text());
        let (Some(id), Some(wnid)) = (id, wnid) else {
            return Err(DataError::format(
                &meta_path,
                "ILSVRC devkit meta",
                format!("synset {element} lacks ILSVRC2012_ID or WNID"),
            ));
        };
        if let Some(&label) = classes.get(wnid) {
            by_id.insert(id as i64, label);
        }
    }

    let truth_path = devkit.join(GROUND_TRUTH);
    let mut labels = HashMap::new();
    for (line_index, line) in read_text(&truth_path)?.lines().enumerate() {
        let id: i64 = line.trim().parse().map_err(|_| {
            DataError::format(
                &truth_path,
                "ground truth",
                format!("line {}: `{line}` is not an ILSVRC2012_ID", line_index + 1),
            )
        })?;
        let label = *by_id.get(&id).ok_or_else(|| DataError::LabelOutOfRange {
            path: truth_path.clone(),
            index: line_index,
            label: id,
            classes: classes.len(),
        })?;
        labels.insert(format!("ILSVRC2012_val_{:08}", line_index + 1), label);
    }
    Ok(labels)
}

fn read_kaggle_labels(csv: &Path, classes: &HashMap<String, u32>) -> Result<HashMap<String, u32>> {
    let mut labels = HashMap::new();
    for (line_index, line) in read_text(csv)?.lines().enumerate().skip(1) {
        let invalid = |reason: &str| {
            DataError::format(
                csv,
                "LOC_val_solution.csv",
                format!("line {}: {reason}", line_index + 1),
            )
        };
        let (image_id, prediction) = line.split_once(',').ok_or_else(|| invalid("no comma"))?;
        let wnid = prediction
            .split_whitespace()
            .next()
            .ok_or_else(|| invalid("no WordNet id"))?;
        let label = *classes
            .get(wnid)
            .ok_or_else(|| invalid(&format!("WordNet id `{wnid}` is not a train/ class folder")))?;
        labels.insert(image_id.to_string(), label);
    }
    Ok(labels)
}

fn read_val_txt(path: &Path, classes: usize) -> Result<HashMap<String, u32>> {
    let mut labels = HashMap::new();
    for (line_index, line) in read_text(path)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(file), Some(label)) = (fields.next(), fields.next()) else {
            return Err(DataError::format(
                path,
                "val.txt",
                format!("line {}: `{line}` is not `FILE LABEL`", line_index + 1),
            ));
        };
        let label: i64 = label.parse().unwrap_or(-1);
        if label < 0 || label as usize >= classes {
            return Err(DataError::LabelOutOfRange {
                path: path.to_path_buf(),
                index: line_index,
                label,
                classes,
            });
        }
        let stem = file.split('.').next().unwrap_or(file);
        labels.insert(stem.to_string(), label as u32);
    }
    Ok(labels)
}
