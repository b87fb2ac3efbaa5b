//! SVHN's cropped-digit format (Netzer et al., "Reading Digits in Natural
//! Images with Unsupervised Feature Learning", 2011): `train_32x32.mat`,
//! `test_32x32.mat` and `extra_32x32.mat`, each with a variable `X` of shape
//! `[32, 32, 3, N]` (uint8, column-major) and `y` of shape `[N, 1]` holding
//! 1 to 10, where 10 means the digit 0.

use std::path::Path;

use super::error::{DataError, Result};
use super::mat::{find_variable, read_mat, MatArray, MatData};
use super::{require_files, Dataset, Split};

const SIDE: usize = 32;
const IMAGE_BYTES: usize = SIDE * SIDE * 3;

/// Reads SVHN from `dir`: train (plus extra when `extra` is set) and test.
pub fn load_svhn(dir: &Path, extra: bool) -> Result<Dataset> {
    let mut expected = vec!["train_32x32.mat", "test_32x32.mat"];
    if extra {
        expected.push("extra_32x32.mat");
    }
    let name = if extra { "svhn+extra" } else { "svhn" };
    require_files(name, dir, &expected)?;

    let mut train = read_svhn_file(&dir.join("train_32x32.mat"))?;
    if extra {
        train.extend(read_svhn_file(&dir.join("extra_32x32.mat"))?);
    }
    let test = read_svhn_file(&dir.join("test_32x32.mat"))?;
    let names = (0..10).map(|digit| digit.to_string()).collect();
    Ok(Dataset::new(name, train, test, names))
}

/// Reads one SVHN `.mat` file into a split with HWC images and labels 0 to 9.
pub fn read_svhn_file(path: &Path) -> Result<Split> {
    let mut arrays = read_mat(path)?;
    let labels = read_labels(find_variable(&arrays, "y", path)?, path)?;
    let index = arrays
        .iter()
        .position(|array| array.name == "X")
        .ok_or_else(|| find_variable(&arrays, "X", path).expect_err("X is absent"))?;
    let images = arrays.swap_remove(index);

    if images.dims.len() != 4 || images.dims[..3] != [SIDE, SIDE, 3] {
        return Err(DataError::format(
            path,
            "SVHN",
            format!("`X` has shape {:?}, expected [32, 32, 3, N]", images.dims),
        ));
    }
    let count = images.dims[3];
    if count != labels.len() {
        return Err(DataError::Mismatch {
            path: path.to_path_buf(),
            reason: format!("`X` has {count} images but `y` has {} labels", labels.len()),
        });
    }

    let mut pixels = match images.data {
        MatData::U8(bytes) => bytes,
        MatData::Numeric(values) => values
            .into_iter()
            .map(|v| v.clamp(0.0, 255.0) as u8)
            .collect(),
        _ => {
            return Err(DataError::format(
                path,
                "SVHN",
                "`X` is not a numeric array",
            ));
        }
    };
    column_major_to_hwc(&mut pixels);
    Ok(Split {
        images: pixels,
        labels,
        height: SIDE,
        width: SIDE,
        channels: 3,
        len: count,
    })
}

fn read_labels(y: &MatArray, path: &Path) -> Result<Vec<u32>> {
    let values = y
        .to_f64()
        .ok_or_else(|| DataError::format(path, "SVHN", "`y` is not a numeric array"))?;
    values
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            if value.fract() != 0.0 || !(1.0..=10.0).contains(&value) {
                return Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    index,
                    label: value as i64,
                    classes: 11,
                });
            }
            // SVHN stores the digit 0 as class 10.
            Ok(value as u32 % 10)
        })
        .collect()
}

/// Reorders each image from column-major `[h, w, c]` (h fastest) to HWC, in place.
fn column_major_to_hwc(pixels: &mut [u8]) {
    let mut scratch = [0u8; IMAGE_BYTES];
    for image in pixels.chunks_exact_mut(IMAGE_BYTES) {
        for c in 0..3 {
            for w in 0..SIDE {
                for h in 0..SIDE {
                    scratch[(h * SIDE + w) * 3 + c] = image[h + SIDE * w + SIDE * SIDE * c];
                }
            }
        }
        image.copy_from_slice(&scratch);
    }
}
