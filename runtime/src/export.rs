//! Inference exports: a frozen evaluation program and the tensors it reads, in
//! one safetensors file.
//!
//! The tensors are those of the frozen program's store (see
//! [`crate::freeze`]). With fusion on, every conv that a batch norm follows is
//! stored with the batch norm folded in, as `NAME.folded` weights and
//! `NAME.folded_bias` biases. The folded batch norms' statistics and affine
//! parameters are left out, and so are optimizer states. The metadata keys
//! are `ldnc_export` (the format version), `network`, `spec` (the network spec
//! as JSON), `program` (the frozen program as JSON), `epoch` (epochs the source
//! checkpoint had completed) and the `crc32` checksum that checkpoints carry.

use std::collections::HashMap;
use std::path::Path;

use ldnc_ir::program::Program;
use ldnc_ir::spec::NetSpec;

use crate::checkpoint::{self, CheckpointError};
use crate::freeze::Frozen;
use crate::store::{Entry, Store};

/// Version of the export layout; loading another version is an error.
pub const EXPORT_VERSION: u32 = 1;

/// Metadata key whose presence marks an export.
const VERSION_KEY: &str = "ldnc_export";

/// A loaded export.
#[derive(Debug, Clone)]
pub struct Export {
    pub spec: NetSpec,
    pub frozen: Frozen,
    /// Epochs the source checkpoint had completed.
    pub epoch: usize,
}

/// Writes `frozen`, the frozen evaluation program of `spec` after `epoch`
/// epochs, to `path` atomically.
pub fn save(
    path: &Path,
    spec: &NetSpec,
    frozen: &Frozen,
    epoch: usize,
) -> Result<(), CheckpointError> {
    let json = |value: serde_json::Result<String>| {
        value.map_err(|error| CheckpointError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::other(error),
        })
    };
    let mut info = HashMap::new();
    info.insert(VERSION_KEY.to_string(), EXPORT_VERSION.to_string());
    info.insert("network".to_string(), spec.name.clone());
    info.insert("spec".to_string(), json(serde_json::to_string(spec))?);
    info.insert(
        "program".to_string(),
        json(serde_json::to_string(&frozen.program))?,
    );
    info.insert("epoch".to_string(), epoch.to_string());
    checkpoint::write_file(path, &frozen.store, info)
}

/// Checks whether `path` is an export rather than a training checkpoint. A file
/// that cannot be read or parsed is not an export, and loading it as a
/// checkpoint reports why.
pub fn is_export(path: &Path) -> bool {
    read_header(path).is_some_and(|header| header["__metadata__"].get(VERSION_KEY).is_some())
}

/// Reads the JSON header of the safetensors file `path` alone: an 8-byte
/// little-endian length, then that many bytes of JSON, as the safetensors
/// format defines it.
fn read_header(path: &Path) -> Option<serde_json::Value> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).ok()?;
    let length = u64::from_le_bytes(length);
    let size = file.metadata().ok()?.len();
    if length > size.saturating_sub(8) {
        return None;
    }
    let mut header = vec![0u8; usize::try_from(length).ok()?];
    file.read_exact(&mut header).ok()?;
    serde_json::from_slice(&header).ok()
}

/// Reads an export written by [`save`].
pub fn load(path: &Path) -> Result<Export, CheckpointError> {
    let format = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    let bytes = checkpoint::read_bytes(path)?;
    let info = checkpoint::parse_info(path, &bytes)?;
    let version = info.get(VERSION_KEY).map(String::as_str).unwrap_or("none");
    if version != EXPORT_VERSION.to_string() {
        return Err(format(format!(
            "it is export format {version}, and this ldnc reads format {EXPORT_VERSION}; \
             export the checkpoint again with this ldnc"
        )));
    }
    let field = |key: &str| {
        info.get(key)
            .ok_or_else(|| format(format!("metadata key `{key}` is missing")))
    };
    let spec: NetSpec = serde_json::from_str(field("spec")?)
        .map_err(|error| format(format!("metadata key `spec` is unreadable: {error}")))?;
    let program: Program = serde_json::from_str(field("program")?)
        .map_err(|error| format(format!("metadata key `program` is unreadable: {error}")))?;
    program
        .check()
        .map_err(|error| format(format!("its program is invalid: {error}")))?;
    let epoch = field("epoch")?
        .parse()
        .map_err(|_| format("metadata key `epoch` is not a number".into()))?;
    let mut tensors = checkpoint::parse_tensors(path, &bytes, &info)?;

    let mut store = Store::default();
    for value in program.persistent() {
        let Some((dims, data)) = tensors.remove(&value.name) else {
            return Err(format(format!(
                "its program reads tensor `{}`, which the file lacks",
                value.name
            )));
        };
        if data.len() != value.ty.per_item() {
            return Err(format(format!(
                "tensor `{}` has shape {dims:?}, and the program expects {}",
                value.name, value.ty
            )));
        }
        let entry = Entry {
            ty: value.ty.clone(),
            role: value.role,
            data,
        };
        store.entries.insert(value.name.clone(), entry);
    }
    if let Some(name) = tensors.keys().next() {
        return Err(format(format!(
            "it has tensor `{name}`, which its program never reads"
        )));
    }
    Ok(Export {
        spec,
        frozen: Frozen {
            program,
            store,
            precomputed: Vec::new(),
        },
        epoch,
    })
}
