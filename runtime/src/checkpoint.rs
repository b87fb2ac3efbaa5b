//! Checkpoints in the safetensors format: every persistent tensor of the store
//! (parameters, running statistics, SGD velocities) plus metadata that says which
//! network and training position the checkpoint belongs to.
//!
//! Writes go to a temporary file in the destination folder, are flushed to disk,
//! then renamed over the destination, so a crash leaves either the old or the
//! new checkpoint and never a torn one.
//!
//! The metadata key `crc32` stores a CRC32 of the other metadata and of every
//! tensor's name, shape and data, so a checkpoint damaged on disk or in a copy
//! fails to load instead of restoring wrong weights. Checkpoints written before
//! that key existed still load, with a warning that they are unverified.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorView};

use crate::store::Store;

/// Version of the checkpoint layout; loading another version is an error.
pub const CHECKPOINT_VERSION: u32 = 1;

/// Metadata key of the checksum, stored as 8 lowercase hex digits.
const CHECKSUM_KEY: &str = "crc32";

/// The two kinds of safetensors file that ldnc writes, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A training checkpoint that `ldnc train` writes.
    Checkpoint,
    /// An evaluation-only export that `ldnc export` writes.
    Export,
}

impl FileKind {
    /// Returns the indefinite article of this kind's noun.
    fn article(self) -> &'static str {
        match self {
            FileKind::Checkpoint => "a",
            FileKind::Export => "an",
        }
    }

    /// Returns what to do about a file of this kind that does not parse.
    fn remedy(self) -> &'static str {
        match self {
            FileKind::Checkpoint => {
                "pass the checkpoint.safetensors that `ldnc train` wrote (or its run folder)"
            }
            FileKind::Export => "export the checkpoint again with `ldnc export`",
        }
    }

    /// Returns what to do about a file of this kind whose checksum fails.
    fn damage_remedy(self) -> &'static str {
        match self {
            FileKind::Checkpoint => "restore an earlier copy of the checkpoint or retrain",
            FileKind::Export => "export the checkpoint again with `ldnc export`",
        }
    }
}

impl std::fmt::Display for FileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileKind::Checkpoint => "checkpoint",
            FileKind::Export => "export",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write {kind} {path}")]
    Write {
        kind: FileKind,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {kind} {path}")]
    Read {
        kind: FileKind,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that does not parse as safetensors, such as another kind of file
    /// or a file cut short.
    #[error("{path} is not {} {kind} or is truncated: {reason}; {}", kind.article(), kind.remedy())]
    NotCheckpoint {
        kind: FileKind,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} is not a valid ldnc {kind}: {message}")]
    Format {
        kind: FileKind,
        path: PathBuf,
        message: String,
    },
    #[error(
        "{path} is damaged: the CRC32 of its contents is {computed:08x}, but it was written \
         with {stored:08x}; {}",
        kind.damage_remedy()
    )]
    Damaged {
        kind: FileKind,
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
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
    write_file(FileKind::Checkpoint, path, store, info)
}

/// Writes every tensor of `store` with the metadata `info` and its checksum to
/// `path` atomically, as a safetensors file.
pub(crate) fn write_file(
    kind: FileKind,
    path: &Path,
    store: &Store,
    mut info: HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let write_err = |source| CheckpointError::Write {
        kind,
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
    let tensors = bytes
        .iter()
        .map(|(name, dims, raw)| (name.as_str(), dims.as_slice(), raw.as_slice()));
    let crc = checksum(&info, tensors);
    info.insert(CHECKSUM_KEY.to_string(), format!("{crc:08x}"));
    let encoded = safetensors::tensor::serialize(views, &Some(info))
        .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
    let encoded = sort_header(&encoded).map_err(|e| write_err(std::io::Error::other(e)))?;

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

/// Rewrites the JSON header of the safetensors bytes `encoded` with its keys
/// and metadata keys in sorted order, so the same tensors and metadata give
/// the same bytes. safetensors takes the metadata as a `HashMap`, whose order
/// changes from run to run. The header keeps the format's layout: an 8-byte
/// little-endian length, then JSON padded with spaces to a multiple of 8
/// bytes, then the tensor data, whose offsets count from the data's start.
fn sort_header(encoded: &[u8]) -> Result<Vec<u8>, String> {
    let length = encoded
        .get(..8)
        .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
        .map(u64::from_le_bytes)
        .ok_or("the serialised file is shorter than its header length")?;
    let end = usize::try_from(length)
        .ok()
        .and_then(|length| length.checked_add(8))
        .filter(|&end| end <= encoded.len())
        .ok_or("the serialised header length exceeds the file")?;
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&encoded[8..end]).map_err(|e| e.to_string())?;
    if let Some(metadata) = header.remove("__metadata__") {
        let sorted: BTreeMap<String, String> =
            serde_json::from_value(metadata).map_err(|e| e.to_string())?;
        let sorted = serde_json::to_value(sorted).map_err(|e| e.to_string())?;
        header.insert("__metadata__".into(), sorted);
    }
    let mut text = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len() + encoded.len() - end);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&encoded[end..]);
    Ok(out)
}

/// Checkpoint tensors by name: shape and data.
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads the whole file `path`.
pub(crate) fn read_bytes(kind: FileKind, path: &Path) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(|source| CheckpointError::Read {
        kind,
        path: path.to_path_buf(),
        source,
    })
}

/// Parses the metadata of `bytes`, the contents of the safetensors file `path`.
pub(crate) fn parse_info(
    kind: FileKind,
    path: &Path,
    bytes: &[u8],
) -> Result<HashMap<String, String>, CheckpointError> {
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|error| CheckpointError::NotCheckpoint {
            kind,
            path: path.to_path_buf(),
            reason: describe(&error),
        })?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Parses the tensors of `bytes`, the contents of the safetensors file `path`
/// with metadata `info`, and checks them against the stored checksum.
pub(crate) fn parse_tensors(
    kind: FileKind,
    path: &Path,
    bytes: &[u8],
    info: &HashMap<String, String>,
) -> Result<Tensors, CheckpointError> {
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|error| CheckpointError::NotCheckpoint {
            kind,
            path: path.to_path_buf(),
            reason: describe(&error),
        })?;
    let mut views = tensors.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    verify(kind, path, info, &views)?;

    let mut out = HashMap::new();
    for (name, view) in views {
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Format {
                kind,
                path: path.to_path_buf(),
                message: format!("tensor {name} is {:?}, expected F32", view.dtype()),
            });
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(out)
}

/// Reads a checkpoint's tensors and metadata.
pub fn load(path: &Path) -> Result<(Tensors, Meta), CheckpointError> {
    let kind = FileKind::Checkpoint;
    let format = |message: String| CheckpointError::Format {
        kind,
        path: path.to_path_buf(),
        message,
    };
    let bytes = read_bytes(kind, path)?;
    let info = parse_info(kind, path, &bytes)?;
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
    let tensors = parse_tensors(kind, path, &bytes, &info)?;
    Ok((tensors, meta))
}

/// Computes the checksum stored under [`CHECKSUM_KEY`]: a CRC32 over every
/// metadata key and value other than the checksum, in key order, then over
/// every tensor's name, shape and little-endian data, in the order given.
/// Strings and shapes are prefixed with their length, so that moving bytes
/// from one field to the next changes the sum.
fn checksum<'a>(
    info: &HashMap<String, String>,
    tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [u8])>,
) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    let mut add = |bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    let sorted: BTreeMap<&String, &String> = info
        .iter()
        .filter(|(key, _)| key.as_str() != CHECKSUM_KEY)
        .collect();
    for (key, value) in sorted {
        add(key.as_bytes());
        add(value.as_bytes());
    }
    for (name, dims, data) in tensors {
        add(name.as_bytes());
        let dims: Vec<u8> = dims
            .iter()
            .flat_map(|&d| (d as u64).to_le_bytes())
            .collect();
        add(&dims);
        add(data);
    }
    hasher.finalize()
}

/// Checks the stored checksum against the loaded metadata and tensors, which
/// must be in name order as [`save`] wrote them. A checkpoint without a
/// checksum was written by an older ldnc and loads with a warning. Every
/// export has one, so an export without it is rejected.
fn verify(
    kind: FileKind,
    path: &Path,
    info: &HashMap<String, String>,
    views: &[(String, TensorView<'_>)],
) -> Result<(), CheckpointError> {
    let Some(text) = info.get(CHECKSUM_KEY) else {
        if kind == FileKind::Export {
            return Err(CheckpointError::Format {
                kind,
                path: path.to_path_buf(),
                message: format!(
                    "it has no `{CHECKSUM_KEY}` checksum, which every export has, so it was \
                     altered after `ldnc export` wrote it; {}",
                    kind.remedy()
                ),
            });
        }
        tracing::warn!(
            "{} has no `{CHECKSUM_KEY}` checksum because an older ldnc wrote it, so its \
             tensors load unverified; the next checkpoint that training writes will have one",
            path.display()
        );
        return Ok(());
    };
    let stored = u32::from_str_radix(text, 16).map_err(|_| CheckpointError::Format {
        kind,
        path: path.to_path_buf(),
        message: format!("metadata key `{CHECKSUM_KEY}` is `{text}`, not 8 hex digits"),
    })?;
    let tensors = views
        .iter()
        .map(|(name, view)| (name.as_str(), view.shape(), view.data()));
    let computed = checksum(info, tensors);
    if computed != stored {
        return Err(CheckpointError::Damaged {
            kind,
            path: path.to_path_buf(),
            stored,
            computed,
        });
    }
    Ok(())
}

/// Describes why a file is not a readable safetensors file, in words.
fn describe(error: &SafeTensorError) -> String {
    match error {
        SafeTensorError::HeaderTooSmall => {
            "it is shorter than the 8-byte length that starts a safetensors file".into()
        }
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => {
            "its first 8 bytes do not give a header length that fits in the file".into()
        }
        SafeTensorError::InvalidHeader
        | SafeTensorError::InvalidHeaderStart
        | SafeTensorError::InvalidHeaderDeserialization
        | SafeTensorError::JsonError(_) => "its header is not safetensors JSON".into(),
        SafeTensorError::MetadataIncompleteBuffer => {
            "its tensor data is shorter or longer than its header declares".into()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("its header gives invalid data offsets for tensor `{name}`")
        }
        SafeTensorError::TensorInvalidInfo
        | SafeTensorError::ValidationOverflow
        | SafeTensorError::InvalidTensorView(..) => {
            "its header gives tensor shapes that do not match their data offsets".into()
        }
        other => format!("safetensors reports {other:?}"),
    }
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

#[cfg(test)]
mod tests {
    use ldnc_ir::op::Role;
    use ldnc_ir::TensorType;

    use super::*;
    use crate::store::Entry;

    fn store() -> Store {
        let mut store = Store::default();
        for (name, len) in [("b.weight", 300), ("a.bias", 7)] {
            let data = (0..len).map(|i| i as f32 * 0.25 - 3.0).collect();
            let entry = Entry {
                ty: TensorType::fixed(&[len]),
                role: Role::Param,
                data,
            };
            store.entries.insert(name.to_string(), entry);
        }
        store
    }

    fn meta() -> Meta {
        Meta {
            network: "net".into(),
            spec_json: "{}".into(),
            epoch: 2,
            step: 40,
            seed: 1,
            config_json: "{}".into(),
        }
    }

    fn saved() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("checkpoint.safetensors");
        save(&path, &store(), &meta()).expect("save");
        (dir, path)
    }

    #[test]
    fn round_trip_verifies_checksum() {
        let (_dir, path) = saved();
        let (tensors, loaded) = load(&path).expect("load");
        assert_eq!(loaded, meta());
        let mut restored = store();
        restored.entries.values_mut().for_each(|e| e.data.fill(0.0));
        restore(&path, &mut restored, tensors).expect("restore");
        assert_eq!(restored, store());
    }

    #[test]
    fn same_contents_give_same_bytes() {
        let (dir, path) = saved();
        let again = dir.path().join("again.safetensors");
        save(&again, &store(), &meta()).expect("second save");
        let first = std::fs::read(&path).expect("first file");
        let second = std::fs::read(&again).expect("second file");
        assert_eq!(first, second);
        load(&again).expect("a file with a rewritten header loads");
    }

    #[test]
    fn flipped_data_bytes_are_damage() {
        let (_dir, path) = saved();
        let mut bytes = std::fs::read(&path).unwrap();
        // The tensor data is at the end of the file, after the JSON header.
        let end = bytes.len();
        for byte in &mut bytes[end - 100..] {
            *byte ^= 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();

        let err = load(&path).unwrap_err();
        assert!(matches!(err, CheckpointError::Damaged { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("checkpoint.safetensors is damaged"), "{text}");
        assert!(text.contains("retrain"), "{text}");
    }

    #[test]
    fn changed_metadata_is_damage() {
        let (_dir, path) = saved();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let at = text.find("\"epoch\":\"2\"").expect("epoch in the header");
        let mut bytes = bytes;
        bytes[at + "\"epoch\":\"".len()] = b'7';
        std::fs::write(&path, &bytes).unwrap();

        let err = load(&path).unwrap_err();
        assert!(matches!(err, CheckpointError::Damaged { .. }), "{err:?}");
    }

    #[test]
    fn checkpoint_without_checksum_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.safetensors");
        let store = store();
        let raw: Vec<(String, Vec<usize>, Vec<u8>)> = store
            .entries
            .iter()
            .map(|(name, e)| {
                let bytes = e.data.iter().flat_map(|x| x.to_le_bytes()).collect();
                (name.clone(), e.ty.dims.clone(), bytes)
            })
            .collect();
        let views = raw
            .iter()
            .map(|(name, dims, bytes)| {
                (
                    name.clone(),
                    TensorView::new(Dtype::F32, dims.clone(), bytes).unwrap(),
                )
            })
            .collect::<Vec<_>>();
        let meta = meta();
        let info: HashMap<String, String> = [
            ("ldnc_checkpoint", CHECKPOINT_VERSION.to_string()),
            ("network", meta.network.clone()),
            ("spec", meta.spec_json.clone()),
            ("epoch", meta.epoch.to_string()),
            ("step", meta.step.to_string()),
            ("seed", meta.seed.to_string()),
            ("config", meta.config_json.clone()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect();
        let bytes = safetensors::tensor::serialize(views, &Some(info)).unwrap();
        std::fs::write(&path, bytes).unwrap();

        let (tensors, loaded) = load(&path).expect("a checkpoint without checksum loads");
        assert_eq!(loaded, meta);
        assert_eq!(tensors["a.bias"].1, store.entries["a.bias"].data);
    }

    #[test]
    fn other_files_are_not_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8], &str); 3] = [
            ("short", b"{}", "shorter than the 8-byte length"),
            (
                "metrics.jsonl",
                b"{\"epoch\":1,\"loss\":0.5}\n",
                "header length",
            ),
            (
                "garbage",
                b"\x10\x00\x00\x00\x00\x00\x00\x00not json here!!!",
                "not safetensors JSON",
            ),
        ];
        for (name, bytes, reason) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let text = load(&path).unwrap_err().to_string();
            assert!(
                text.contains("is not a checkpoint or is truncated"),
                "{text}"
            );
            assert!(text.contains(reason), "{name}: {text}");
            assert!(text.contains(name), "{text}");
        }
    }

    #[test]
    fn truncated_checkpoint_is_explained() {
        let (_dir, path) = saved();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let text = load(&path).unwrap_err().to_string();
        assert!(
            text.contains("is not a checkpoint or is truncated"),
            "{text}"
        );
        assert!(text.contains("shorter or longer"), "{text}");
    }
}
