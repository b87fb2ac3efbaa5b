//! Inference exports: a frozen evaluation program and the tensors it reads, in
//! one safetensors file.
//!
//! The tensors are those of the frozen program's store (see
//! [`crate::freeze`]). With fusion on, every conv that a batch norm follows is
//! stored with the batch norm folded in, as `NAME.folded` weights and
//! `NAME.folded_bias` biases. The folded batch norms' statistics and affine
//! parameters are left out, and so are optimizer states.
//!
//! The metadata keys are:
//! - `ldnc_export`: the format version;
//! - `network`, and `spec`: the network spec as JSON;
//! - `program`: the frozen program as JSON;
//! - `epoch`: epochs the source checkpoint had completed;
//! - `fused`: `true` unless exported with `--no-fuse`;
//! - `crc32`: the checksum that checkpoints carry too.

use std::collections::HashMap;
use std::path::Path;

use ldnc_ir::program::Program;
use ldnc_ir::spec::NetSpec;

use crate::checkpoint::{self, CheckpointError, FileKind};
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
    /// Whether the exported program is the fused one, with batch norms folded.
    pub fused: bool,
}

const KIND: FileKind = FileKind::Export;

/// Writes `frozen`, the frozen evaluation program of `spec` after `epoch`
/// epochs, to `path` atomically. `fused` is true for the fused program.
pub fn save(
    path: &Path,
    spec: &NetSpec,
    frozen: &Frozen,
    epoch: usize,
    fused: bool,
) -> Result<(), CheckpointError> {
    let json = |value: serde_json::Result<String>| {
        value.map_err(|error| CheckpointError::Write {
            kind: KIND,
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
    info.insert("fused".to_string(), fused.to_string());
    checkpoint::write_file(KIND, path, &frozen.store, info)
}

/// Checks whether `path` is an export rather than a training checkpoint. A file
/// whose header names the export format version is one, also when the file is
/// cut short inside its header. A file that cannot be read is not, and loading
/// it as a checkpoint reports why.
pub fn is_export(path: &Path) -> bool {
    let Some(header) = read_header(path) else {
        return false;
    };
    match serde_json::from_slice::<serde_json::Value>(&header) {
        Ok(header) => header["__metadata__"].get(VERSION_KEY).is_some(),
        Err(_) => {
            let key = format!("\"{VERSION_KEY}\"");
            header.windows(key.len()).any(|w| w == key.as_bytes())
        }
    }
}

/// Reads the JSON header of the safetensors file `path`, or as much of it as
/// the file holds: the format starts with an 8-byte little-endian length and
/// then that many bytes of JSON.
fn read_header(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut reader = std::io::BufReader::new(file);
    let mut length = [0u8; 8];
    reader.read_exact(&mut length).ok()?;
    let mut header = Vec::new();
    reader
        .take(u64::from_le_bytes(length))
        .read_to_end(&mut header)
        .ok()?;
    Some(header)
}

/// Reads an export written by [`save`]. The checksum is verified before the
/// program is parsed, so a damaged file is reported as damaged.
pub fn load(path: &Path) -> Result<Export, CheckpointError> {
    let format = |message: String| CheckpointError::Format {
        kind: KIND,
        path: path.to_path_buf(),
        message,
    };
    let bytes = checkpoint::read_bytes(KIND, path)?;
    let info = checkpoint::parse_info(KIND, path, &bytes)?;
    let version = info.get(VERSION_KEY).map(String::as_str).unwrap_or("none");
    if version != EXPORT_VERSION.to_string() {
        return Err(format(format!(
            "it is export format {version}, and this ldnc reads format {EXPORT_VERSION}; \
             export the checkpoint again with this ldnc"
        )));
    }
    let mut tensors = checkpoint::parse_tensors(KIND, path, &bytes, &info)?;
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
    let fused = field("fused")?
        .parse()
        .map_err(|_| format("metadata key `fused` is not `true` or `false`".into()))?;

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
        fused,
    })
}
