//! The error type of the dataset readers and loaders.
//!
//! Every variant names the file or value at fault, what was expected and what
//! was found, so a message alone is enough to fix the input.

use std::path::PathBuf;

/// Result alias for the dataset module.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// A failure to parse a `--data` value, find a dataset's files or decode them.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "invalid dataset spec `{spec}`: {reason}; expected one of fashion-mnist[:DIR|:full], \
         cifar10:DIR, cifar100:DIR, cifar100-coarse:DIR, svhn:DIR, svhn+extra:DIR, \
         imagenet:DIR, camvid:DIR"
    )]
    InvalidSpec { spec: String, reason: String },

    #[error(
        "{dataset}: the folder {} does not exist; point the spec at the folder that contains \
         the official files",
        dir.display()
    )]
    FolderNotFound { dataset: String, dir: PathBuf },

    #[error(
        "{dataset}: files missing in {}: expected {}; found {}. Point the spec at the \
         folder that contains the official files",
        dir.display(),
        expected.join(", "),
        if found.is_empty() { "nothing".to_string() } else { found.join(", ") }
    )]
    MissingFiles {
        dataset: String,
        dir: PathBuf,
        expected: Vec<String>,
        found: Vec<String>,
    },

    #[error(
        "bundled Fashion-MNIST subset not found; looked in {}. Run from the repository \
         root, pass fashion-mnist:DIR, or use fashion-mnist:full for the Debian \
         dataset-fashion-mnist package",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    BundleNotFound { searched: Vec<PathBuf> },

    #[error("failed to read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: invalid {format} file: {reason}", path.display())]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },

    #[error(
        "{}: truncated: expected {expected} bytes for {what}, found {found}. The file is \
         incomplete; download it again",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        what: String,
        expected: u64,
        found: u64,
    },

    #[error(
        "{}: label {label} of item {index} is out of range; expected 0..{classes}",
        path.display()
    )]
    LabelOutOfRange {
        path: PathBuf,
        index: usize,
        label: i64,
        classes: usize,
    },

    #[error("{}: failed to decode image: {reason}", path.display())]
    Decode { path: PathBuf, reason: String },

    #[error("{}: {reason}", path.display())]
    Mismatch { path: PathBuf, reason: String },

    #[error("{dataset} does not fit in memory; open it with `data::open` to stream it")]
    StreamingOnly { dataset: String },

    #[error("the data loader stopped: {0}")]
    Loader(String),
}

impl DataError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds a format error for `path`.
    pub fn format(
        path: impl Into<PathBuf>,
        format: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        DataError::Format {
            path: path.into(),
            format,
            reason: reason.into(),
        }
    }
}
