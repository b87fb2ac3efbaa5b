//! The payload of a compiled network executable: a serialised `CompiledNet`
//! appended to a copy of the `ldnc` binary and found again through a
//! fixed-size trailer at the end of the file.
//!
//! File layout, offsets growing to the right:
//!
//! ```text
//! [executable image][PAYLOAD_MAGIC][zlib(JSON of Payload)][trailer, TRAILER_LEN bytes]
//! trailer = payload length (u64 LE) | CRC32 of the payload (u32 LE)
//!         | payload format version (u32 LE) | TRAILER_MAGIC
//! ```
//!
//! "Payload" here means everything between the image and the trailer, magic
//! bytes included; the length and the CRC32 cover exactly those bytes. The
//! version and the magic sit at fixed offsets from the end of the file, so a
//! reader can name the version of a payload whose layout it does not know.
//!
//! Encoding is deterministic: `Payload` holds only structs, vectors and
//! scalars (no hash maps), `serde_json` writes struct fields in declaration
//! order, and zlib at a fixed level always compresses the same bytes the same
//! way. The same inputs therefore give byte-identical executables.
//!
//! The CRC32 detects damage such as truncation or a flipped byte. It does not
//! authenticate the payload, because anyone who can write the file can also
//! rewrite the checksum.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use ldnc_ir::program::{CompiledNet, FORMAT_VERSION};
use serde::{Deserialize, Serialize};

/// Version of the payload layout and encoding; readers reject any other.
pub const PAYLOAD_FORMAT_VERSION: u32 = 1;

/// First bytes of the payload, right after the executable image.
pub const PAYLOAD_MAGIC: [u8; 8] = *b"ldnc-net";

/// Last bytes of a file that carries a payload.
pub const TRAILER_MAGIC: [u8; 8] = *b"ldnc-end";

/// Size of the trailer in bytes: length, CRC32, version and magic.
pub const TRAILER_LEN: usize = 8 + 4 + 4 + TRAILER_MAGIC.len();

/// zlib level of the payload body. Changing it changes the bytes of every
/// executable, so it is fixed rather than left to the library's default.
const ZLIB_LEVEL: u32 = 6;

/// Errors of reading or writing a payload.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} carries an ldnc payload at byte {offset} but its trailer is missing or \
         damaged (the last {TRAILER_LEN} bytes do not end with the trailer magic); the file \
         was probably truncated or appended to, so rebuild it with `ldnc build`"
    )]
    MissingTrailer { path: PathBuf, offset: u64 },
    #[error(
        "{path} carries an ldnc payload of format version {found}, but this executable reads \
         only payload format version {supported}; rebuild it with `ldnc build` from ldnc {}",
        env!("CARGO_PKG_VERSION")
    )]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "the payload trailer of {path} records a payload of {length} bytes, but the file has \
         only {available} bytes before the trailer, and a payload needs at least {minimum}; \
         the file is truncated or damaged, so rebuild it with `ldnc build`"
    )]
    Length {
        path: PathBuf,
        length: u64,
        available: u64,
        minimum: u64,
    },
    #[error(
        "the payload of {path} does not start with the magic bytes `ldnc-net` (found {found:02x?}); \
         the trailer's length is wrong or the file is damaged, so rebuild it with `ldnc build`"
    )]
    Magic { path: PathBuf, found: Vec<u8> },
    #[error(
        "the payload of {path} fails its checksum: the trailer records CRC32 {expected:08x} but \
         the payload's CRC32 is {found:08x}; the file is damaged or was modified, so rebuild it \
         with `ldnc build`"
    )]
    Checksum {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error(
        "cannot decode the compiled network in {path}: {message}; rebuild it with `ldnc build`"
    )]
    Decode { path: PathBuf, message: String },
    #[error(
        "{path} contains programs of format version {found}, but this executable runs only \
         program format version {supported}; rebuild it with `ldnc build`"
    )]
    ProgramVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("cannot encode the compiled network {network}: {message}")]
    Encode { network: String, message: String },
}

pub type Result<T, E = PayloadError> = std::result::Result<T, E>;

/// Backends an executable was built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Cpu,
    Cuda,
    All,
}

impl Target {
    /// Returns whether the target includes the CUDA backend.
    pub fn wants_cuda(self) -> bool {
        matches!(self, Target::Cuda | Target::All)
    }
}

/// Contents of the payload of a compiled network executable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// Version of the ldnc that built the executable.
    pub ldnc_version: String,
    /// Backends requested with `--target`.
    pub target: Target,
    /// Whether CUDA kernels are included; the CPU programs are always present.
    pub cuda_kernels: bool,
    /// CUDA C of the training and evaluation programs' kernels, with PTX where
    /// NVRTC was available at build time.
    #[serde(default)]
    pub cuda_modules: Vec<CudaModule>,
    /// The network's spec and its training and evaluation programs.
    pub net: CompiledNet,
}

/// The CUDA kernels of one program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CudaModule {
    /// `train` or `eval`.
    pub program: String,
    /// Every distinct kernel of the program as one CUDA C translation unit.
    pub source: String,
    /// PTX of `source` for `ptx_arch`, when NVRTC was present at build time.
    pub ptx: Option<String>,
    pub ptx_arch: Option<String>,
}

impl Payload {
    /// Name of the network, from its spec.
    pub fn network(&self) -> &str {
        &self.net.spec.name
    }
}

/// Encodes `payload` as the bytes to append to an executable image: the
/// payload magic, the compressed body and the trailer.
pub fn encode(payload: &Payload) -> Result<Vec<u8>> {
    let encode_error = |message: String| PayloadError::Encode {
        network: payload.network().to_string(),
        message,
    };
    let json = serde_json::to_vec(payload).map_err(|e| encode_error(e.to_string()))?;

    let mut section = PAYLOAD_MAGIC.to_vec();
    let mut encoder = ZlibEncoder::new(&mut section, Compression::new(ZLIB_LEVEL));
    encoder
        .write_all(&json)
        .and_then(|()| encoder.finish().map(|_| ()))
        .map_err(|e| encode_error(format!("zlib compression failed: {e}")))?;

    let checksum = crc32fast::hash(&section);
    let length = section.len() as u64;
    section.extend_from_slice(&length.to_le_bytes());
    section.extend_from_slice(&checksum.to_le_bytes());
    section.extend_from_slice(&PAYLOAD_FORMAT_VERSION.to_le_bytes());
    section.extend_from_slice(&TRAILER_MAGIC);
    Ok(section)
}

/// The fields of a trailer, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Trailer {
    length: u64,
    checksum: u32,
    version: u32,
}

impl Trailer {
    /// Parses the last `TRAILER_LEN` bytes of a file, or returns `None` when they
    /// do not end with the trailer magic.
    fn parse(bytes: &[u8; TRAILER_LEN]) -> Option<Trailer> {
        let (fields, magic) = bytes.split_at(TRAILER_LEN - TRAILER_MAGIC.len());
        if magic != TRAILER_MAGIC {
            return None;
        }
        let u64_at =
            |at: usize| u64::from_le_bytes(fields[at..at + 8].try_into().expect("8 bytes"));
        let u32_at =
            |at: usize| u32::from_le_bytes(fields[at..at + 4].try_into().expect("4 bytes"));
        Some(Trailer {
            length: u64_at(0),
            checksum: u32_at(8),
            version: u32_at(12),
        })
    }
}

/// Reads the payload of the running executable, or returns `None` when it
/// carries none (it is the plain `ldnc`).
///
/// NOTE: an executable that cannot locate or open its own file (no `/proc`, or
/// execute permission without read permission) runs as the plain `ldnc`,
/// because that binary must keep working there. A compiled network in such a
/// place cannot run as itself.
pub fn read_current_exe() -> Result<Option<(PathBuf, Payload)>> {
    let Ok(path) = std::env::current_exe() else {
        return Ok(None);
    };
    let Ok(file) = File::open(&path) else {
        return Ok(None);
    };
    Ok(read_from(file, &path)?.map(|payload| (path, payload)))
}

/// Reads the payload of the executable at `path`, or returns `None` when it
/// carries none.
pub fn read(path: &Path) -> Result<Option<Payload>> {
    let file = File::open(path).map_err(|source| io_error(path, source))?;
    read_from(file, path)
}

fn read_from(mut file: File, path: &Path) -> Result<Option<Payload>> {
    let io = |source| io_error(path, source);
    let file_len = file.metadata().map_err(io)?.len();
    if file_len < TRAILER_LEN as u64 {
        return Ok(None);
    }

    let mut tail = [0u8; TRAILER_LEN];
    file.seek(SeekFrom::End(-(TRAILER_LEN as i64)))
        .map_err(io)?;
    file.read_exact(&mut tail).map_err(io)?;
    let Some(trailer) = Trailer::parse(&tail) else {
        return match orphan_payload_offset(&mut file, file_len).map_err(io)? {
            Some(offset) => Err(PayloadError::MissingTrailer {
                path: path.to_path_buf(),
                offset,
            }),
            None => Ok(None),
        };
    };
    if trailer.version != PAYLOAD_FORMAT_VERSION {
        return Err(PayloadError::Version {
            path: path.to_path_buf(),
            found: trailer.version,
            supported: PAYLOAD_FORMAT_VERSION,
        });
    }

    let section = read_section(&mut file, path, file_len, trailer)?;
    let payload = decode_section(&section, path)?;
    if payload.net.format_version != FORMAT_VERSION {
        return Err(PayloadError::ProgramVersion {
            path: path.to_path_buf(),
            found: payload.net.format_version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(Some(payload))
}

/// Reads the payload that `trailer` describes and checks its length, magic
/// bytes and checksum.
fn read_section(file: &mut File, path: &Path, file_len: u64, trailer: Trailer) -> Result<Vec<u8>> {
    let available = file_len - TRAILER_LEN as u64;
    let minimum = PAYLOAD_MAGIC.len() as u64;
    if trailer.length > available || trailer.length < minimum {
        return Err(PayloadError::Length {
            path: path.to_path_buf(),
            length: trailer.length,
            available,
            minimum,
        });
    }

    let io = |source| io_error(path, source);
    let length = usize::try_from(trailer.length).map_err(|_| PayloadError::Length {
        path: path.to_path_buf(),
        length: trailer.length,
        available,
        minimum,
    })?;
    let mut section = vec![0u8; length];
    file.seek(SeekFrom::Start(available - trailer.length))
        .map_err(io)?;
    file.read_exact(&mut section).map_err(io)?;

    if section[..PAYLOAD_MAGIC.len()] != PAYLOAD_MAGIC {
        return Err(PayloadError::Magic {
            path: path.to_path_buf(),
            found: section[..PAYLOAD_MAGIC.len()].to_vec(),
        });
    }
    let found = crc32fast::hash(&section);
    if found != trailer.checksum {
        return Err(PayloadError::Checksum {
            path: path.to_path_buf(),
            expected: trailer.checksum,
            found,
        });
    }
    Ok(section)
}

/// Decompresses and parses a payload whose magic and checksum were checked.
fn decode_section(section: &[u8], path: &Path) -> Result<Payload> {
    let decode_error = |message: String| PayloadError::Decode {
        path: path.to_path_buf(),
        message,
    };
    let mut json = Vec::new();
    ZlibDecoder::new(&section[PAYLOAD_MAGIC.len()..])
        .read_to_end(&mut json)
        .map_err(|e| decode_error(format!("zlib: {e}")))?;
    serde_json::from_slice(&json).map_err(|e| decode_error(format!("JSON: {e}")))
}

/// Finds a payload whose trailer is gone: on an ELF file, the image ends with
/// the section header table, so payload magic bytes right there mean that a
/// payload was appended and the trailer was cut off or damaged afterwards.
/// Returns the payload's offset, or `None` for a plain file or a non-ELF one.
fn orphan_payload_offset(file: &mut File, file_len: u64) -> std::io::Result<Option<u64>> {
    let Some(image_end) = elf_image_end(file)? else {
        return Ok(None);
    };
    if image_end + PAYLOAD_MAGIC.len() as u64 > file_len {
        return Ok(None);
    }
    let mut magic = [0u8; PAYLOAD_MAGIC.len()];
    file.seek(SeekFrom::Start(image_end))?;
    file.read_exact(&mut magic)?;
    Ok((magic == PAYLOAD_MAGIC).then_some(image_end))
}

/// Computes where the image of a 64-bit little-endian ELF file ends: at the
/// end of its section header table, which the linker of this toolchain writes
/// last (checked on x86-64 Linux). Returns `None` for other files.
///
/// NOTE: where a linker puts the table elsewhere, no payload magic is found
/// there, so a payload without its trailer goes unnoticed and the file runs
/// as the plain `ldnc`.
fn elf_image_end(file: &mut File) -> std::io::Result<Option<u64>> {
    let mut header = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    if file.read_exact(&mut header).is_err() {
        return Ok(None);
    }
    // e_ident: magic, EI_CLASS = 2 (64-bit), EI_DATA = 1 (little-endian).
    if header[..4] != *b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Ok(None);
    }
    let section_headers = u64::from_le_bytes(header[0x28..0x30].try_into().expect("8 bytes"));
    let entry_size = u16::from_le_bytes([header[0x3a], header[0x3b]]) as u64;
    let entries = u16::from_le_bytes([header[0x3c], header[0x3d]]) as u64;
    Ok(section_headers.checked_add(entry_size * entries))
}

fn io_error(path: &Path, source: std::io::Error) -> PayloadError {
    PayloadError::Io {
        path: path.to_path_buf(),
        source,
    }
}
