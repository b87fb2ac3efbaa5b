//! The IDX format of MNIST and Fashion-MNIST, gzip-compressed or not.
//!
//! An IDX file (LeCun et al., "The MNIST database", format notes) starts with
//! a big-endian magic number `0x0000TTDD`: two zero bytes, the element type
//! (`0x08` for unsigned bytes, the only type these datasets use) and the
//! number of dimensions. Each dimension follows as a big-endian `u32`, then
//! the elements in row-major order.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::error::{DataError, Result};
use super::{read_file, require_files, Dataset, Split};

/// Fashion-MNIST's class names, in label order (Xiao et al., 2017).
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// An unsigned-byte IDX array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes, unzipping it first when it starts
/// with the gzip magic bytes.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let raw = read_file(path)?;
    let bytes = if raw.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|error| DataError::format(path, "gzip", error.to_string()))?;
        out
    } else {
        raw
    };
    parse_idx(path, &bytes)
}

fn parse_idx(path: &Path, bytes: &[u8]) -> Result<IdxArray> {
    let truncated = |what: &str, expected: usize| DataError::Truncated {
        path: path.to_path_buf(),
        what: what.to_string(),
        expected: expected as u64,
        found: bytes.len() as u64,
    };
    if bytes.len() < 4 {
        return Err(truncated("the magic number", 4));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::format(
            path,
            "IDX",
            format!(
                "magic number starts with {:02x} {:02x}, expected 00 00",
                bytes[0], bytes[1]
            ),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::format(
            path,
            "IDX",
            format!(
                "element type 0x{:02x}, expected 0x08 (unsigned byte)",
                bytes[2]
            ),
        ));
    }

    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(truncated("the header", header));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let count: usize = dims.iter().product();
    if bytes.len() < header + count {
        return Err(truncated(&format!("{dims:?} elements"), header + count));
    }
    if bytes.len() > header + count {
        return Err(DataError::format(
            path,
            "IDX",
            format!(
                "{} bytes after the {dims:?} elements",
                bytes.len() - header - count
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Picks `NAME.gz` or `NAME`, whichever exists, preferring the compressed one.
fn idx_path(dir: &Path, name: &str) -> Option<PathBuf> {
    [format!("{name}.gz"), name.to_string()]
        .into_iter()
        .map(|file| dir.join(file))
        .find(|path| path.is_file())
}

fn read_pair(dir: &Path, images: &str, labels: &str) -> Result<Split> {
    let missing = || {
        require_files(
            "fashion-mnist",
            dir,
            &[
                "train-images-idx3-ubyte.gz",
                "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
            ],
        )
        .expect_err("a file is missing")
    };
    let images_path = idx_path(dir, images).ok_or_else(missing)?;
    let labels_path = idx_path(dir, labels).ok_or_else(missing)?;
    let images = read_idx(&images_path)?;
    let labels = read_idx(&labels_path)?;

    if images.dims.len() != 3 {
        return Err(DataError::format(
            &images_path,
            "IDX",
            format!(
                "{} dimensions, expected 3 (count, rows, columns)",
                images.dims.len()
            ),
        ));
    }
    if labels.dims.len() != 1 || labels.dims[0] != images.dims[0] {
        return Err(DataError::Mismatch {
            path: labels_path,
            reason: format!(
                "label dimensions {:?} do not match the {} images of {}",
                labels.dims,
                images.dims[0],
                images_path.display()
            ),
        });
    }
    if let Some(index) = labels.data.iter().position(|&label| label >= 10) {
        return Err(DataError::LabelOutOfRange {
            path: labels_path,
            index,
            label: labels.data[index] as i64,
            classes: 10,
        });
    }

    Ok(Split {
        len: images.dims[0],
        height: images.dims[1],
        width: images.dims[2],
        channels: 1,
        images: images.data,
        labels: labels.data.into_iter().map(u32::from).collect(),
    })
}

/// Reads Fashion-MNIST's four IDX files from `dir`.
pub fn load_fashion_mnist(dir: &Path) -> Result<Dataset> {
    let train = read_pair(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let test = read_pair(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    let names = FASHION_MNIST_CLASSES
        .iter()
        .map(|name| name.to_string())
        .collect();
    Ok(Dataset::new("fashion-mnist", train, test, names))
}

/// Encodes an unsigned-byte IDX file. The bundling example and the tests use it.
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &dim in dims {
        out.extend_from_slice(&(dim as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_round_trip() {
        let bytes = encode_idx(&[2, 1, 3], &[1, 2, 3, 4, 5, 6]);
        let array = parse_idx(Path::new("x"), &bytes).expect("valid IDX");
        assert_eq!(array.dims, vec![2, 1, 3]);
        assert_eq!(array.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn idx_truncated_names_file() {
        let bytes = encode_idx(&[2, 2], &[1, 2, 3]);
        let error = parse_idx(Path::new("labels.idx"), &bytes).expect_err("truncated");
        let message = error.to_string();
        assert!(message.contains("labels.idx"), "{message}");
        assert!(message.contains("truncated"), "{message}");
    }

    #[test]
    fn idx_bad_magic() {
        let error = parse_idx(Path::new("x"), &[0, 1, 8, 1, 0, 0, 0, 0]).expect_err("bad magic");
        assert!(error.to_string().contains("expected 00 00"), "{error}");
        let error = parse_idx(Path::new("x"), &[0, 0, 0x0d, 1, 0, 0, 0, 0]).expect_err("float");
        assert!(error.to_string().contains("0x0d"), "{error}");
    }
}
