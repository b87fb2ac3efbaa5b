//! The `--data` syntax: `NAME[:DIR]` parsed into a [`DataSpec`], and the search
//! for the Fashion-MNIST subset bundled with the repository.

use std::path::{Path, PathBuf};

use super::error::{DataError, Result};

/// Where Debian's `dataset-fashion-mnist` package installs the full dataset.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// The bundled subset's folder, relative to the repository root.
pub const BUNDLED_FASHION_MNIST: &str = "data/fashion-mnist";

/// A dataset known to the loaders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    FashionMnist,
    Cifar10,
    /// CIFAR-100 with its 100 fine labels.
    Cifar100,
    /// CIFAR-100 with its 20 coarse (superclass) labels.
    Cifar100Coarse,
    Svhn,
    /// SVHN train plus the 531,131 extra images, as most SVHN results use.
    SvhnExtra,
    ImageNet,
    CamVid,
}

impl DatasetKind {
    /// The name used in `--data` values.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Cifar100Coarse => "cifar100-coarse",
            DatasetKind::Svhn => "svhn",
            DatasetKind::SvhnExtra => "svhn+extra",
            DatasetKind::ImageNet => "imagenet",
            DatasetKind::CamVid => "camvid",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        let kinds = [
            DatasetKind::FashionMnist,
            DatasetKind::Cifar10,
            DatasetKind::Cifar100,
            DatasetKind::Cifar100Coarse,
            DatasetKind::Svhn,
            DatasetKind::SvhnExtra,
            DatasetKind::ImageNet,
            DatasetKind::CamVid,
        ];
        kinds.into_iter().find(|kind| kind.name() == name)
    }
}

/// A parsed `--data` value: the dataset and the folder (or archive) to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSpec {
    pub kind: DatasetKind,
    /// `None` only for bare `fashion-mnist`, which means the bundled subset.
    pub path: Option<PathBuf>,
}

impl DataSpec {
    /// Parses `NAME[:DIR]`. Only `fashion-mnist` may omit the folder, and
    /// `fashion-mnist:full` names the Debian package's copy of the full dataset.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |reason: &str| DataError::InvalidSpec {
            spec: text.to_string(),
            reason: reason.to_string(),
        };
        let (name, dir) = match text.split_once(':') {
            Some((name, dir)) => (name, Some(dir)),
            None => (text, None),
        };
        let kind = DatasetKind::from_name(name).ok_or_else(|| invalid("unknown dataset name"))?;

        let path = match (kind, dir) {
            (_, Some("")) => return Err(invalid("the folder after `:` is empty")),
            (DatasetKind::FashionMnist, Some("full")) => Some(PathBuf::from(DEBIAN_FASHION_MNIST)),
            (_, Some(dir)) => Some(PathBuf::from(dir)),
            (DatasetKind::FashionMnist, None) => None,
            (_, None) => return Err(invalid("this dataset needs a folder: NAME:DIR")),
        };
        Ok(DataSpec { kind, path })
    }

    /// Returns the folder to read, finding the bundled subset when no folder was
    /// given; rejects a folder that does not exist.
    pub fn resolve_dir(&self) -> Result<PathBuf> {
        match &self.path {
            Some(path) if !path.exists() => Err(DataError::FolderNotFound {
                dataset: self.kind.name().to_string(),
                dir: path.clone(),
            }),
            Some(path) => Ok(path.clone()),
            None => find_bundled_fashion_mnist(),
        }
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some(path) => write!(f, "{}:{}", self.kind.name(), path.display()),
            None => f.write_str(self.kind.name()),
        }
    }
}

/// The folders searched for the bundled subset, in order: the current
/// directory, every ancestor of the running executable, then the source tree
/// this crate was compiled from.
pub fn bundled_fashion_mnist_candidates() -> Vec<PathBuf> {
    let mut candidates = vec![PathBuf::from(BUNDLED_FASHION_MNIST)];
    if let Ok(exe) = std::env::current_exe() {
        for ancestor in exe.ancestors().skip(1) {
            candidates.push(ancestor.join(BUNDLED_FASHION_MNIST));
        }
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(BUNDLED_FASHION_MNIST),
    );
    candidates
}

fn find_bundled_fashion_mnist() -> Result<PathBuf> {
    let candidates = bundled_fashion_mnist_candidates();
    let found = candidates
        .iter()
        .find(|dir| dir.join("train-images-idx3-ubyte.gz").is_file());
    match found {
        Some(dir) => Ok(dir.clone()),
        None => Err(DataError::BundleNotFound {
            searched: candidates,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_every_name() {
        let cases = [
            ("cifar10:/d", DatasetKind::Cifar10),
            ("cifar100:/d", DatasetKind::Cifar100),
            ("cifar100-coarse:/d", DatasetKind::Cifar100Coarse),
            ("svhn:/d", DatasetKind::Svhn),
            ("svhn+extra:/d", DatasetKind::SvhnExtra),
            ("imagenet:/d", DatasetKind::ImageNet),
            ("camvid:/d", DatasetKind::CamVid),
            ("fashion-mnist:/d", DatasetKind::FashionMnist),
        ];
        for (text, kind) in cases {
            let spec = DataSpec::parse(text).expect(text);
            assert_eq!(spec.kind, kind, "{text}");
            assert_eq!(spec.path, Some(PathBuf::from("/d")), "{text}");
            assert_eq!(spec.to_string(), text);
        }
    }

    #[test]
    fn parse_fashion_defaults() {
        let bare = DataSpec::parse("fashion-mnist").expect("bare name");
        assert_eq!(bare.path, None);
        let full = DataSpec::parse("fashion-mnist:full").expect("full");
        assert_eq!(full.path, Some(PathBuf::from(DEBIAN_FASHION_MNIST)));
    }

    #[test]
    fn parse_rejects_bad_specs() {
        for text in ["cifar10", "mnist:/d", "svhn:", ""] {
            let error = DataSpec::parse(text).expect_err(text);
            assert!(error.to_string().contains("expected one of"), "{error}");
        }
    }

    #[test]
    fn windows_style_path_keeps_drive() {
        let spec = DataSpec::parse("cifar10:C:/data").expect("drive letter");
        assert_eq!(spec.path, Some(PathBuf::from("C:/data")));
    }
}
