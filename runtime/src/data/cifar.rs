//! CIFAR-10 and CIFAR-100 (Krizhevsky, "Learning Multiple Layers of Features
//! from Tiny Images", 2009), in the binary or the python version, from the
//! extracted folder or straight from the official `.tar.gz`.
//!
//! Binary records are one label byte (CIFAR-10) or a coarse and a fine label
//! byte (CIFAR-100), then 3,072 pixel bytes: the 1,024 red values of the 32x32
//! image in row-major order, then green, then blue. The python version pickles
//! a dict whose `data` is the same rows as a `(N, 3072)` NumPy array. Both are
//! converted here to HWC.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::error::{DataError, Result};
use super::pickle::{self, Value};
use super::{list_dir, Dataset, Split};

/// CIFAR-10's class names, in label order (`batches.meta.txt`).
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

const SIDE: usize = 32;
const PIXELS: usize = SIDE * SIDE;
const IMAGE_BYTES: usize = 3 * PIXELS;

/// One CIFAR release: its file names in both versions and its archives.
struct Release {
    name: &'static str,
    binary_train: &'static [&'static str],
    binary_test: &'static str,
    python_train: &'static [&'static str],
    python_test: &'static str,
    folders: [&'static str; 2],
    archives: [&'static str; 2],
}

const CIFAR10: Release = Release {
    name: "cifar10",
    binary_train: &[
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
    ],
    binary_test: "test_batch.bin",
    python_train: &[
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
    ],
    python_test: "test_batch",
    folders: ["cifar-10-batches-bin", "cifar-10-batches-py"],
    archives: ["cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"],
};

const CIFAR100: Release = Release {
    name: "cifar100",
    binary_train: &["train.bin"],
    binary_test: "test.bin",
    python_train: &["train"],
    python_test: "test",
    folders: ["cifar-100-binary", "cifar-100-python"],
    archives: ["cifar-100-binary.tar.gz", "cifar-100-python.tar.gz"],
};

/// Optional files that carry CIFAR-100's class names.
const CIFAR100_NAME_FILES: [&str; 3] = ["fine_label_names.txt", "coarse_label_names.txt", "meta"];

impl Release {
    fn binary_files(&self) -> Vec<&'static str> {
        let mut files = self.binary_train.to_vec();
        files.push(self.binary_test);
        files
    }

    fn python_files(&self) -> Vec<&'static str> {
        let mut files = self.python_train.to_vec();
        files.push(self.python_test);
        files
    }
}

/// The files of one release, read into memory, keyed by base name.
struct Files {
    /// The folder or archive they came from, to name in errors.
    origin: PathBuf,
    contents: HashMap<String, Vec<u8>>,
    binary: bool,
}

impl Files {
    fn path(&self, name: &str) -> PathBuf {
        self.origin.join(name)
    }
}

/// Finds the release under `path`: a folder with the batch files, a folder
/// with the extracted archive folder in it, an archive, or a folder with an
/// archive in it.
fn find_files(release: &Release, path: &Path) -> Result<Files> {
    if path.is_file() {
        return read_archive(release, path);
    }

    let mut folders = vec![path.to_path_buf()];
    folders.extend(release.folders.iter().map(|folder| path.join(folder)));
    for folder in &folders {
        for (names, binary) in [
            (release.binary_files(), true),
            (release.python_files(), false),
        ] {
            if names.iter().all(|name| folder.join(name).is_file()) {
                return read_folder(folder, &names, binary);
            }
        }
    }
    for archive in release.archives {
        if path.join(archive).is_file() {
            return read_archive(release, &path.join(archive));
        }
    }

    let mut expected: Vec<String> = vec![
        format!("{} (binary version)", release.binary_files().join(", ")),
        format!("{} (python version)", release.python_files().join(", ")),
    ];
    expected.extend(release.folders.iter().map(|f| format!("{f}/")));
    expected.extend(release.archives.iter().map(|a| a.to_string()));
    Err(DataError::MissingFiles {
        dataset: release.name.to_string(),
        dir: path.to_path_buf(),
        expected,
        found: list_dir(path),
    })
}

fn read_folder(folder: &Path, names: &[&str], binary: bool) -> Result<Files> {
    let mut contents = HashMap::new();
    let optional = CIFAR100_NAME_FILES.iter().chain(["batches.meta"].iter());
    for name in names.iter().chain(optional) {
        let path = folder.join(name);
        if path.is_file() {
            let bytes = std::fs::read(&path).map_err(|source| DataError::io(&path, source))?;
            contents.insert(name.to_string(), bytes);
        }
    }
    Ok(Files {
        origin: folder.to_path_buf(),
        contents,
        binary,
    })
}

fn read_archive(release: &Release, archive: &Path) -> Result<Files> {
    let file = std::fs::File::open(archive).map_err(|source| DataError::io(archive, source))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let tar_error = |error: std::io::Error| DataError::format(archive, "tar.gz", error.to_string());

    let mut wanted = release.binary_files();
    wanted.extend(release.python_files());
    wanted.extend(CIFAR100_NAME_FILES);
    let mut contents = HashMap::new();
    for entry in tar.entries().map_err(tar_error)? {
        let mut entry = entry.map_err(tar_error)?;
        let entry_path = entry.path().map_err(tar_error)?.into_owned();
        let Some(name) = entry_path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if !wanted.contains(&name.as_str()) {
            continue;
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(tar_error)?;
        contents.insert(name, bytes);
    }

    for (names, binary) in [
        (release.binary_files(), true),
        (release.python_files(), false),
    ] {
        if names.iter().all(|name| contents.contains_key(*name)) {
            return Ok(Files {
                origin: archive.to_path_buf(),
                contents,
                binary,
            });
        }
    }
    let mut found: Vec<String> = contents.keys().cloned().collect();
    found.sort();
    Err(DataError::MissingFiles {
        dataset: release.name.to_string(),
        dir: archive.to_path_buf(),
        expected: vec![
            release.binary_files().join(", "),
            format!("or {}", release.python_files().join(", ")),
        ],
        found,
    })
}

/// Converts rows of 1,024 red, 1,024 green and 1,024 blue bytes into HWC images.
fn planar_to_hwc(rows: &[u8], out: &mut Vec<u8>) {
    for row in rows.chunks_exact(IMAGE_BYTES) {
        for p in 0..PIXELS {
            out.extend_from_slice(&[row[p], row[PIXELS + p], row[2 * PIXELS + p]]);
        }
    }
}

/// Parsed images and one label list per label kind (fine only, or coarse then fine).
struct Batch {
    images: Vec<u8>,
    labels: Vec<Vec<u32>>,
}

fn parse_binary(path: &Path, bytes: &[u8], label_bytes: usize, classes: &[usize]) -> Result<Batch> {
    let record = label_bytes + IMAGE_BYTES;
    if bytes.is_empty() || bytes.len() / record * record != bytes.len() {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: format!("whole records of {record} bytes"),
            expected: (bytes.len() / record + 1) as u64 * record as u64,
            found: bytes.len() as u64,
        });
    }

    let count = bytes.len() / record;
    let mut images = Vec::with_capacity(count * IMAGE_BYTES);
    let mut labels = vec![Vec::with_capacity(count); label_bytes];
    for (index, rec) in bytes.chunks_exact(record).enumerate() {
        for (kind, &label) in rec[..label_bytes].iter().enumerate() {
            if label as usize >= classes[kind] {
                return Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    index,
                    label: label as i64,
                    classes: classes[kind],
                });
            }
            labels[kind].push(label as u32);
        }
        planar_to_hwc(&rec[label_bytes..], &mut images);
    }
    Ok(Batch { images, labels })
}

fn parse_python(path: &Path, bytes: &[u8], keys: &[&str], classes: &[usize]) -> Result<Batch> {
    let value = pickle::parse(bytes, path)?;
    let invalid = |reason: String| DataError::format(path, "CIFAR python batch", reason);

    let data = value
        .get("data")
        .ok_or_else(|| invalid("no `data` entry in the pickled dict".into()))?;
    let (shape, dtype, raw) = data
        .as_ndarray()
        .ok_or_else(|| invalid("`data` is not a C-ordered NumPy array".into()))?;
    if dtype != "u1" || shape.len() != 2 || shape[1] != IMAGE_BYTES {
        return Err(invalid(format!(
            "`data` is a {dtype} array of shape {shape:?}, expected u1 of shape (N, 3072)"
        )));
    }
    let count = shape[0];
    if raw.len() != count * IMAGE_BYTES {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: format!("the {count}x3072 `data` array"),
            expected: (count * IMAGE_BYTES) as u64,
            found: raw.len() as u64,
        });
    }

    let mut labels = Vec::new();
    for (&key, &limit) in keys.iter().zip(classes) {
        let items = value
            .get(key)
            .and_then(Value::as_items)
            .ok_or_else(|| invalid(format!("no `{key}` list in the pickled dict")))?;
        if items.len() != count {
            return Err(invalid(format!(
                "`{key}` has {} labels for {count} images",
                items.len()
            )));
        }
        let mut list = Vec::with_capacity(count);
        for (index, item) in items.iter().enumerate() {
            let label = item.as_int().unwrap_or(-1);
            if label < 0 || label as usize >= limit {
                return Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    index,
                    label,
                    classes: limit,
                });
            }
            list.push(label as u32);
        }
        labels.push(list);
    }

    let mut images = Vec::with_capacity(count * IMAGE_BYTES);
    planar_to_hwc(raw, &mut images);
    Ok(Batch { images, labels })
}

/// Reads and joins batches into one split, keeping label kind `label_kind`.
fn read_split(files: &Files, names: &[&str], cifar100: bool, label_kind: usize) -> Result<Split> {
    let mut split = Split {
        images: Vec::new(),
        labels: Vec::new(),
        height: SIDE,
        width: SIDE,
        channels: 3,
        len: 0,
    };
    for name in names {
        let path = files.path(name);
        let bytes = &files.contents[*name];
        let batch = match (files.binary, cifar100) {
            (true, false) => parse_binary(&path, bytes, 1, &[10])?,
            (true, true) => parse_binary(&path, bytes, 2, &[20, 100])?,
            (false, false) => parse_python(&path, bytes, &["labels"], &[10])?,
            (false, true) => {
                parse_python(&path, bytes, &["coarse_labels", "fine_labels"], &[20, 100])?
            }
        };
        split.len += batch.labels[label_kind].len();
        split.images.extend_from_slice(&batch.images);
        split.labels.extend_from_slice(&batch.labels[label_kind]);
    }
    Ok(split)
}

/// Reads CIFAR-10 from a folder or archive.
pub fn load_cifar10(path: &Path) -> Result<Dataset> {
    let files = find_files(&CIFAR10, path)?;
    let (train_names, test_name) = if files.binary {
        (CIFAR10.binary_train, CIFAR10.binary_test)
    } else {
        (CIFAR10.python_train, CIFAR10.python_test)
    };
    let train = read_split(&files, train_names, false, 0)?;
    let test = read_split(&files, &[test_name], false, 0)?;
    let names = CIFAR10_CLASSES
        .iter()
        .map(|name| name.to_string())
        .collect();
    Ok(Dataset::new("cifar10", train, test, names))
}

/// Reads CIFAR-100 from a folder or archive, with its 20 coarse labels when
/// `coarse` is set and its 100 fine labels otherwise.
pub fn load_cifar100(path: &Path, coarse: bool) -> Result<Dataset> {
    let files = find_files(&CIFAR100, path)?;
    let (train_names, test_name) = if files.binary {
        (CIFAR100.binary_train, CIFAR100.binary_test)
    } else {
        (CIFAR100.python_train, CIFAR100.python_test)
    };
    let kind = if coarse { 0 } else { 1 };
    let train = read_split(&files, train_names, true, kind)?;
    let test = read_split(&files, &[test_name], true, kind)?;
    let names = cifar100_names(&files, coarse);
    let name = if coarse {
        "cifar100-coarse"
    } else {
        "cifar100"
    };
    Ok(Dataset::new(name, train, test, names))
}

/// Reads CIFAR-100's class names from the release's name files, or numbers
/// the classes when the files are absent or unreadable.
fn cifar100_names(files: &Files, coarse: bool) -> Vec<String> {
    let count = if coarse { 20 } else { 100 };
    let (text_file, key) = if coarse {
        ("coarse_label_names.txt", "coarse_label_names")
    } else {
        ("fine_label_names.txt", "fine_label_names")
    };

    let mut names: Vec<String> = Vec::new();
    if let Some(bytes) = files.contents.get(text_file) {
        names = String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_string)
            .collect();
    } else if let Some(bytes) = files.contents.get("meta") {
        if let Ok(meta) = pickle::parse(bytes, &files.path("meta")) {
            names = meta
                .get(key)
                .and_then(Value::as_items)
                .map(|items| items.iter().filter_map(Value::as_text).collect())
                .unwrap_or_default();
        }
    }
    if names.len() != count {
        names = (0..count).map(|i| format!("class {i}")).collect();
    }
    names
}
