//! Checkpoints in the safetensors format: every persistent tensor of the store
//! (parameters, running statistics, SGD velocities) plus metadata that says which
//! network and training position the checkpoint belongs to.
//!
//! Writes go to a temporary file in the destination folder, are flushed to disk,
//! then renamed over the destination, so a crash leaves either the old or the
//! new checkpoint and never a torn one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::store::Store;

/// Version of the checkpoint layout; loading another version is an error.
pub const CHECKPOINT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors checkpoint: {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "{path} was written by checkpoint format {found}, this ldnc reads format {expected}; \
         retrain or use the ldnc version that wrote it"
    )]
    Version {
        path: PathBuf,
        found: String,
        expected: u32,
    },
    #[error(
        "{path} belongs to another network: {message}; pass the network file it was trained \
         with"
    )]
    Mismatch { path: PathBuf, message: String },
}

/// Training position and provenance stored with the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    /// Network name from the spec.
    pub network: String,
    /// The full spec as JSON, so `ldnc eval` can rebuild the network.
    pub spec_json: String,
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps completed.
    pub step: u64,
    pub seed: u64,
    /// The training configuration as JSON, for exact resumption.
    pub config_json: String,
}

/// Writes `store` and `meta` to `path` atomically.
pub fn save(path: &Path, store: &Store, meta: &Meta) -> Result<(), CheckpointError> {
    let write_err = |source| CheckpointError::Write {
        path: path.to_path_buf(),
        source,
    };
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = store
        .entries
        .iter()
        .map(|(name, e)| {
            let raw: Vec<u8> = e.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (name.clone(), e.ty.dims.clone(), raw)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, dims, raw)| {
            TensorView::new(Dtype::F32, dims.clone(), raw).map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
    let mut info = HashMap::new();
    info.insert(
        "ldnc_checkpoint".to_string(),
        CHECKPOINT_VERSION.to_string(),
    );
    info.insert("network".to_string(), meta.network.clone());
    info.insert("spec".to_string(), meta.spec_json.clone());
    info.insert("epoch".to_string(), meta.epoch.to_string());
    info.insert("step".to_string(), meta.step.to_string());
    info.insert("seed".to_string(), meta.seed.to_string());
    info.insert("config".to_string(), meta.config_json.clone());
    let encoded = safetensors::tensor::serialize(views, &Some(info))
        .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;

    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encoded)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

/// Checkpoint tensors by name: shape and data.
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads a checkpoint's tensors and metadata.
pub fn load(path: &Path) -> Result<(Tensors, Meta), CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let format = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| format(e.to_string()))?;
    let info = header.metadata().clone().unwrap_or_default();
    let version = info
        .get("ldnc_checkpoint")
        .cloned()
        .unwrap_or_else(|| "none".into());
    if version != CHECKPOINT_VERSION.to_string() {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            found: version,
            expected: CHECKPOINT_VERSION,
        });
    }
    let field = |key: &str| {
        info.get(key)
            .cloned()
            .ok_or_else(|| format(format!("metadata key `{key}` is missing")))
    };
    let number = |key: &str| -> Result<u64, CheckpointError> {
        field(key)?
            .parse()
            .map_err(|_| format(format!("metadata key `{key}` is not a number")))
    };
    let meta = Meta {
        network: field("network")?,
        spec_json: field("spec")?,
        epoch: number("epoch")? as usize,
        step: number("step")?,
        seed: number("seed")?,
        config_json: field("config")?,
    };
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| format(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in tensors.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(format(format!(
                "tensor {name} is {:?}, expected F32",
                view.dtype()
            )));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok((out, meta))
}

/// Copies checkpoint tensors into `store`, which must have exactly the same
/// tensor names and shapes.
pub fn restore(path: &Path, store: &mut Store, tensors: Tensors) -> Result<(), CheckpointError> {
    let mismatch = |message: String| CheckpointError::Mismatch {
        path: path.to_path_buf(),
        message,
    };
    if let Some(name) = tensors.keys().find(|k| !store.entries.contains_key(*k)) {
        return Err(mismatch(format!(
            "it has tensor `{name}`, which this network lacks"
        )));
    }
    for (name, entry) in store.entries.iter_mut() {
        let Some((dims, data)) = tensors.get(name) else {
            return Err(mismatch(format!("tensor `{name}` is missing")));
        };
        if *dims != entry.ty.dims {
            return Err(mismatch(format!(
                "tensor `{name}` has shape {dims:?}, this network expects {:?}",
                entry.ty.dims
            )));
        }
        entry.data.clone_from(data);
    }
    Ok(())
}
