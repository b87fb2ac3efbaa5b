//! A reader (and a small writer) for MATLAB level 5 MAT-files, as used by
//! SVHN's `*_32x32.mat` and the ILSVRC2012 devkit's `meta.mat`.
//!
//! The layout follows MathWorks' "MAT-File Format" (version 7 document,
//! chapter 1): a 128-byte header ending in the version `0x0100` and the
//! endian indicator `IM`/`MI`, then data elements of an 8-byte tag (type,
//! byte count; or the 4-byte "small element" form with the count in the upper
//! 16 bits) and their data padded to 8 bytes. A `miCOMPRESSED` element holds
//! one zlib-compressed `miMATRIX`, which is decompressed as a stream, so a
//! large array is read once into its final buffer. Version 7.3 files are
//! HDF5 and are rejected with a message saying so.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

use super::error::{DataError, Result};

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;

/// MATLAB array classes (the low byte of the array flags).
pub const MX_CELL: u8 = 1;
pub const MX_STRUCT: u8 = 2;
pub const MX_CHAR: u8 = 4;
pub const MX_DOUBLE: u8 = 6;
pub const MX_UINT8: u8 = 9;

/// One MATLAB array.
#[derive(Debug, Clone, PartialEq)]
pub struct MatArray {
    pub name: String,
    /// The MATLAB class, such as [`MX_UINT8`] or [`MX_DOUBLE`].
    pub class: u8,
    /// Dimensions; the data is in column-major (Fortran) order.
    pub dims: Vec<usize>,
    pub data: MatData,
}

/// The values of a [`MatArray`].
#[derive(Debug, Clone, PartialEq)]
pub enum MatData {
    /// Numeric data stored as `miUINT8`, kept as bytes (SVHN's images).
    U8(Vec<u8>),
    /// Any other numeric data, widened to `f64`.
    Numeric(Vec<f64>),
    Text(String),
    /// Struct arrays: `values[element * fields.len() + field]`.
    Struct {
        fields: Vec<String>,
        values: Vec<MatArray>,
    },
    Cell(Vec<MatArray>),
}

impl MatArray {
    /// The number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The numeric values as `f64`, whatever their storage type.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        match &self.data {
            MatData::U8(bytes) => Some(bytes.iter().map(|&b| b as f64).collect()),
            MatData::Numeric(values) => Some(values.clone()),
            _ => None,
        }
    }

    /// The text of a char array.
    pub fn text(&self) -> Option<&str> {
        match &self.data {
            MatData::Text(text) => Some(text),
            _ => None,
        }
    }

    /// Field `field` of struct element `element`.
    pub fn field(&self, element: usize, field: &str) -> Option<&MatArray> {
        let MatData::Struct { fields, values } = &self.data else {
            return None;
        };
        let index = fields.iter().position(|f| f == field)?;
        values.get(element * fields.len() + index)
    }
}

/// Reads every variable of a level 5 MAT-file.
pub fn read_mat(path: &Path) -> Result<Vec<MatArray>> {
    let file = File::open(path).map_err(|source| DataError::io(path, source))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut context = Context {
        path: path.to_path_buf(),
        big_endian: false,
    };

    let mut header = [0u8; 128];
    reader
        .read_exact(&mut header)
        .map_err(|error| context.read_error(error, "the 128-byte header"))?;
    if header.starts_with(b"MATLAB 7.3") || &header[0..4] == b"\x89HDF" {
        return Err(context.invalid(
            "this is a MATLAB 7.3 (HDF5) file; save it with `save -v7` or `-v6` to get a \
             level 5 MAT-file",
        ));
    }
    context.big_endian = match &header[126..128] {
        b"IM" => false,
        b"MI" => true,
        other => {
            return Err(context.invalid(format!(
                "endian indicator {other:?} at byte 126, expected \"IM\" or \"MI\"; this is \
                 not a level 5 MAT-file"
            )))
        }
    };

    let mut arrays = Vec::new();
    loop {
        let mut first = [0u8; 4];
        match reader.read(&mut first[..1]) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => return Err(DataError::io(path, error)),
        }
        reader
            .read_exact(&mut first[1..])
            .map_err(|error| context.read_error(error, "an element tag"))?;
        let kind = context.u32(first);
        let size = context.read_u32(&mut reader, "an element tag")? as u64;

        match kind {
            MI_COMPRESSED => {
                let mut compressed = (&mut reader).take(size);
                let mut inflated = flate2::read::ZlibDecoder::new(&mut compressed);
                let (inner_kind, inner_size) = context.read_tag(&mut inflated)?;
                if inner_kind != MI_MATRIX {
                    return Err(context.invalid(format!(
                        "compressed element of type {inner_kind}, expected miMATRIX (14)"
                    )));
                }
                arrays.push(context.read_matrix(&mut (&mut inflated).take(inner_size as u64))?);
                drop(inflated);
                let rest = compressed.limit() as usize;
                context.skip(&mut reader, rest)?;
            }
            MI_MATRIX => {
                let mut body = (&mut reader).take(size);
                arrays.push(context.read_matrix(&mut body)?);
                let rest = body.limit() as usize;
                context.skip(&mut reader, rest + padding(size as usize))?;
            }
            _ => context.skip(&mut reader, size as usize + padding(size as usize))?,
        }
    }
    Ok(arrays)
}

/// Finds variable `name`, or returns an error that lists the variables the file has.
pub fn find_variable<'a>(arrays: &'a [MatArray], name: &str, path: &Path) -> Result<&'a MatArray> {
    arrays
        .iter()
        .find(|array| array.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = arrays.iter().map(|a| a.name.as_str()).collect();
            DataError::format(
                path,
                "MAT",
                format!("no variable `{name}`; the file has {names:?}"),
            )
        })
}

fn padding(size: usize) -> usize {
    (8 - size % 8) % 8
}

struct Context {
    path: PathBuf,
    big_endian: bool,
}

impl Context {
    fn invalid(&self, reason: impl Into<String>) -> DataError {
        DataError::format(&self.path, "MAT", reason)
    }

    fn read_error(&self, error: std::io::Error, what: &str) -> DataError {
        if error.kind() == ErrorKind::UnexpectedEof {
            DataError::format(
                &self.path,
                "MAT",
                format!("truncated: the file ends inside {what}; download it again"),
            )
        } else {
            DataError::format(&self.path, "MAT", format!("failed reading {what}: {error}"))
        }
    }

    fn u32(&self, bytes: [u8; 4]) -> u32 {
        if self.big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        }
    }

    fn read_u32(&self, reader: &mut dyn Read, what: &str) -> Result<u32> {
        let mut bytes = [0u8; 4];
        reader
            .read_exact(&mut bytes)
            .map_err(|error| self.read_error(error, what))?;
        Ok(self.u32(bytes))
    }

    fn skip(&self, reader: &mut dyn Read, count: usize) -> Result<()> {
        let copied = std::io::copy(&mut (&mut *reader).take(count as u64), &mut std::io::sink())
            .map_err(|error| self.read_error(error, "element padding"))?;
        if copied as usize != count {
            return Err(self.read_error(ErrorKind::UnexpectedEof.into(), "element padding"));
        }
        Ok(())
    }

    /// Reads a tag, returning (type, byte count) and leaving the reader at the data.
    /// For a small element the 4 data bytes are not consumed.
    fn read_tag(&self, reader: &mut dyn Read) -> Result<(u32, usize)> {
        let word = self.read_u32(reader, "an element tag")?;
        if word >> 16 != 0 {
            // Small element: the 4 data bytes follow the first word directly.
            return Ok((SMALL_FLAG | (word & 0xffff), (word >> 16) as usize));
        }
        let size = self.read_u32(reader, "an element tag")? as usize;
        Ok((word, size))
    }

    /// Reads one sub-element's type and raw bytes, consuming its padding.
    fn read_element(&self, reader: &mut dyn Read, what: &str) -> Result<(u32, Vec<u8>)> {
        let (kind, size) = self.read_tag(reader)?;
        if kind & SMALL_FLAG != 0 {
            let mut data = [0u8; 4];
            reader
                .read_exact(&mut data)
                .map_err(|error| self.read_error(error, what))?;
            return Ok((kind & !SMALL_FLAG, data[..size.min(4)].to_vec()));
        }
        let data = self.read_bytes(reader, size, what)?;
        self.skip(reader, padding(size))?;
        Ok((kind, data))
    }

    fn read_bytes(&self, reader: &mut dyn Read, size: usize, what: &str) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        data.try_reserve_exact(size).map_err(|_| {
            self.invalid(format!(
                "{what} claims {size} bytes, more than memory allows"
            ))
        })?;
        let read = reader
            .take(size as u64)
            .read_to_end(&mut data)
            .map_err(|error| self.read_error(error, what))?;
        if read != size {
            return Err(DataError::Truncated {
                path: self.path.clone(),
                what: what.to_string(),
                expected: size as u64,
                found: read as u64,
            });
        }
        Ok(data)
    }

    fn read_matrix(&self, reader: &mut dyn Read) -> Result<MatArray> {
        let (_, flags) = self.read_element(reader, "array flags")?;
        if flags.len() < 4 {
            // An empty miMATRIX element has no sub-elements at all.
            return Ok(MatArray {
                name: String::new(),
                class: 0,
                dims: vec![0, 0],
                data: MatData::Numeric(Vec::new()),
            });
        }
        let flags_word = self.u32([flags[0], flags[1], flags[2], flags[3]]);
        let class = (flags_word & 0xff) as u8;
        if flags_word & 0x0800 != 0 {
            return Err(self.invalid("complex arrays are not supported"));
        }

        let (kind, dims) = self.read_element(reader, "array dimensions")?;
        let dims = self.decode_numbers(kind, &dims)?;
        let dims: Vec<usize> = dims.into_iter().map(|d| d as usize).collect();
        let (_, name) = self.read_element(reader, "array name")?;
        let name = String::from_utf8_lossy(&name).into_owned();
        let count: usize = dims.iter().product();

        let data = match class {
            MX_CELL => {
                let cells = (0..count)
                    .map(|_| self.read_nested(reader))
                    .collect::<Result<_>>()?;
                MatData::Cell(cells)
            }
            MX_STRUCT => self.read_struct(reader, count)?,
            MX_CHAR => {
                let (kind, bytes) = self.read_element(reader, "char data")?;
                MatData::Text(self.decode_text(kind, &bytes)?)
            }
            6..=15 => {
                let (kind, size) = self.read_tag(reader)?;
                if kind == MI_UINT8 {
                    let bytes = self.read_bytes(reader, size, &format!("the data of `{name}`"))?;
                    self.skip(reader, padding(size))?;
                    MatData::U8(bytes)
                } else if kind & SMALL_FLAG != 0 {
                    let mut data = [0u8; 4];
                    reader
                        .read_exact(&mut data)
                        .map_err(|error| self.read_error(error, "array data"))?;
                    let kind = kind & !SMALL_FLAG;
                    if kind == MI_UINT8 {
                        MatData::U8(data[..size].to_vec())
                    } else {
                        MatData::Numeric(self.decode_numbers(kind, &data[..size])?)
                    }
                } else {
                    let bytes = self.read_bytes(reader, size, &format!("the data of `{name}`"))?;
                    self.skip(reader, padding(size))?;
                    MatData::Numeric(self.decode_numbers(kind, &bytes)?)
                }
            }
            other => {
                return Err(self.invalid(format!(
                    "variable `{name}` has MATLAB class {other}, which is not supported \
                     (numeric, char, cell and struct are)"
                )))
            }
        };
        Ok(MatArray {
            name,
            class,
            dims,
            data,
        })
    }

    fn read_nested(&self, reader: &mut dyn Read) -> Result<MatArray> {
        let (kind, size) = self.read_tag(reader)?;
        if kind != MI_MATRIX {
            return Err(self.invalid(format!("nested element of type {kind}, expected miMATRIX")));
        }
        let mut limited = (&mut *reader).take(size as u64);
        let array = self.read_matrix(&mut limited)?;
        let rest = limited.limit() as usize;
        self.skip(reader, rest + padding(size))?;
        Ok(array)
    }

    fn read_struct(&self, reader: &mut dyn Read, count: usize) -> Result<MatData> {
        let (kind, length) = self.read_element(reader, "field name length")?;
        let length = self
            .decode_numbers(kind, &length)?
            .first()
            .copied()
            .unwrap_or(0.0) as usize;
        let (_, names) = self.read_element(reader, "field names")?;
        let fields: Vec<String> = names
            .chunks(length.max(1))
            .map(|chunk| {
                let end = chunk.iter().position(|&b| b == 0).unwrap_or(chunk.len());
                String::from_utf8_lossy(&chunk[..end]).into_owned()
            })
            .collect();
        let values = (0..count * fields.len())
            .map(|_| self.read_nested(reader))
            .collect::<Result<_>>()?;
        Ok(MatData::Struct { fields, values })
    }

    fn decode_text(&self, kind: u32, bytes: &[u8]) -> Result<String> {
        match kind {
            MI_UTF8 | MI_UINT8 | MI_INT8 => Ok(String::from_utf8_lossy(bytes).into_owned()),
            MI_UINT16 | MI_UTF16 => {
                let units: Vec<u16> = bytes
                    .chunks_exact(2)
                    .map(|b| {
                        if self.big_endian {
                            u16::from_be_bytes([b[0], b[1]])
                        } else {
                            u16::from_le_bytes([b[0], b[1]])
                        }
                    })
                    .collect();
                Ok(String::from_utf16_lossy(&units))
            }
            other => Err(self.invalid(format!(
                "char data of type {other}, expected miUINT16 or miUTF8"
            ))),
        }
    }

    fn decode_numbers(&self, kind: u32, bytes: &[u8]) -> Result<Vec<f64>> {
        macro_rules! decode {
            ($ty:ty, $n:expr) => {
                bytes
                    .chunks_exact($n)
                    .map(|b| {
                        let b: [u8; $n] = b.try_into().expect("chunk has the element size");
                        if self.big_endian {
                            <$ty>::from_be_bytes(b) as f64
                        } else {
                            <$ty>::from_le_bytes(b) as f64
                        }
                    })
                    .collect()
            };
        }
        Ok(match kind {
            MI_INT8 => bytes.iter().map(|&b| b as i8 as f64).collect(),
            MI_UINT8 => bytes.iter().map(|&b| b as f64).collect(),
            MI_INT16 => decode!(i16, 2),
            MI_UINT16 => decode!(u16, 2),
            MI_INT32 => decode!(i32, 4),
            MI_UINT32 => decode!(u32, 4),
            MI_SINGLE => decode!(f32, 4),
            MI_DOUBLE => decode!(f64, 8),
            MI_INT64 => decode!(i64, 8),
            MI_UINT64 => decode!(u64, 8),
            other => return Err(self.invalid(format!("numeric data of unknown type {other}"))),
        })
    }
}

/// Marks a small element in [`Context::read_tag`]'s result; real types are below 32.
const SMALL_FLAG: u32 = 1 << 31;

/// Writes little-endian level 5 MAT-files. Tests use it to build SVHN and
/// ILSVRC devkit fixtures.
pub mod write {
    use std::io::Write;

    use super::{MatArray, MatData, MI_COMPRESSED, MI_DOUBLE, MI_INT32, MI_INT8, MI_MATRIX};
    use super::{MI_UINT16, MI_UINT32, MI_UINT8};

    fn element(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        out.resize(out.len() + super::padding(data.len()), 0);
    }

    /// Encodes one array as a full `miMATRIX` element.
    pub fn matrix(array: &MatArray) -> Vec<u8> {
        let mut body = Vec::new();
        let mut flags = (array.class as u32).to_le_bytes().to_vec();
        flags.extend_from_slice(&[0; 4]);
        element(&mut body, MI_UINT32, &flags);
        let dims: Vec<u8> = array
            .dims
            .iter()
            .flat_map(|&d| (d as i32).to_le_bytes())
            .collect();
        element(&mut body, MI_INT32, &dims);
        element(&mut body, MI_INT8, array.name.as_bytes());

        match &array.data {
            MatData::U8(bytes) => element(&mut body, MI_UINT8, bytes),
            MatData::Numeric(values) => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                element(&mut body, MI_DOUBLE, &bytes);
            }
            MatData::Text(text) => {
                let units: Vec<u8> = text.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
                element(&mut body, MI_UINT16, &units);
            }
            MatData::Cell(cells) => {
                for cell in cells {
                    body.extend_from_slice(&matrix(cell));
                }
            }
            MatData::Struct { fields, values } => {
                let length = fields.iter().map(|f| f.len() + 1).max().unwrap_or(1);
                element(&mut body, MI_INT32, &(length as i32).to_le_bytes());
                let mut names = Vec::new();
                for field in fields {
                    let mut name = field.as_bytes().to_vec();
                    name.resize(length, 0);
                    names.extend_from_slice(&name);
                }
                element(&mut body, MI_INT8, &names);
                for value in values {
                    body.extend_from_slice(&matrix(value));
                }
            }
        }

        let mut out = Vec::new();
        element(&mut out, MI_MATRIX, &body);
        out
    }

    /// Encodes a whole file, each variable zlib-compressed when `compress` is set.
    pub fn file(arrays: &[MatArray], compress: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut text = b"MATLAB 5.0 MAT-file, written by ldnc tests".to_vec();
        text.resize(116, b' ');
        out.extend_from_slice(&text);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&0x0100u16.to_le_bytes());
        out.extend_from_slice(b"IM");

        for array in arrays {
            let encoded = matrix(array);
            if compress {
                let mut encoder =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder
                    .write_all(&encoded)
                    .expect("writing to a Vec cannot fail");
                let compressed = encoder.finish().expect("writing to a Vec cannot fail");
                out.extend_from_slice(&MI_COMPRESSED.to_le_bytes());
                out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
                out.extend_from_slice(&compressed);
            } else {
                out.extend_from_slice(&encoded);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_arrays() -> Vec<MatArray> {
        let synset = |id: f64, wnid: &str| {
            vec![
                MatArray {
                    name: String::new(),
                    class: MX_DOUBLE,
                    dims: vec![1, 1],
                    data: MatData::Numeric(vec![id]),
                },
                MatArray {
                    name: String::new(),
                    class: MX_CHAR,
                    dims: vec![1, wnid.len()],
                    data: MatData::Text(wnid.to_string()),
                },
            ]
        };
        vec![
            MatArray {
                name: "X".into(),
                class: MX_UINT8,
                dims: vec![2, 3],
                data: MatData::U8(vec![1, 2, 3, 4, 5, 6]),
            },
            MatArray {
                name: "y".into(),
                class: MX_DOUBLE,
                dims: vec![2, 1],
                data: MatData::Numeric(vec![10.0, 3.0]),
            },
            MatArray {
                name: "synsets".into(),
                class: MX_STRUCT,
                dims: vec![2, 1],
                data: MatData::Struct {
                    fields: vec!["ILSVRC2012_ID".into(), "WNID".into()],
                    values: [synset(1.0, "n01"), synset(2.0, "n0000002")].concat(),
                },
            },
        ]
    }

    #[test]
    fn round_trip_both_encodings() {
        for compress in [false, true] {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("sample.mat");
            std::fs::write(&path, write::file(&sample_arrays(), compress)).expect("write");
            let arrays = read_mat(&path).expect("valid MAT-file");
            assert_eq!(arrays, sample_arrays(), "compress = {compress}");
            let synsets = find_variable(&arrays, "synsets", &path).expect("synsets");
            assert_eq!(
                synsets.field(1, "WNID").and_then(MatArray::text),
                Some("n0000002")
            );
        }
    }

    #[test]
    fn truncated_compressed_file_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cut.mat");
        let bytes = write::file(&sample_arrays(), true);
        std::fs::write(&path, &bytes[..bytes.len() - 40]).expect("write");
        let error = read_mat(&path).expect_err("truncated");
        assert!(error.to_string().contains("cut.mat"), "{error}");
    }

    #[test]
    fn missing_variable_lists_names() {
        let arrays = sample_arrays();
        let error = find_variable(&arrays, "Z", Path::new("f.mat")).expect_err("absent");
        assert!(error.to_string().contains("\"X\""), "{error}");
    }
}
