//! A minimal reader for Python pickles, enough for the CIFAR "python version"
//! batches: dicts of byte strings, integer lists and one NumPy `uint8` array.
//!
//! The opcodes follow CPython's `Lib/pickletools.py` (protocols 0 to 5). No
//! code runs: `GLOBAL` yields a [`Value::Global`] name, `REDUCE` records the
//! callable and its arguments, and `BUILD` attaches the state, which is where
//! NumPy's `_reconstruct` keeps an array's shape, dtype and raw bytes.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use super::error::{DataError, Result};

/// A decoded pickle object.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A Python 2 `str` or Python 3 `bytes`; shared because the memo copies it.
    Bytes(Rc<Vec<u8>>),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)`, with the state that a later `BUILD` set.
    Reduce {
        callable: Box<Value>,
        args: Box<Value>,
        state: Option<Box<Value>>,
    },
}

impl Value {
    /// Looks up a dict entry whose key is the text `key`, as `str` or `bytes`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        let Value::Dict(entries) = self else {
            return None;
        };
        entries
            .iter()
            .find(|(k, _)| k.as_text().as_deref() == Some(key))
            .map(|(_, v)| v)
    }

    /// The text of a `str` or of an ASCII/UTF-8 `bytes` value.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Str(text) => Some(text.clone()),
            Value::Bytes(bytes) => String::from_utf8(bytes.to_vec()).ok(),
            _ => None,
        }
    }

    /// The value as an integer (`bool` counts, as in Python).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(value) => Some(*value),
            Value::Bool(value) => Some(*value as i64),
            _ => None,
        }
    }

    /// The items of a list or tuple.
    pub fn as_items(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) | Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// Reads a NumPy array pickled by `numpy.core.multiarray._reconstruct`,
    /// returning its shape, dtype string (such as `u1`) and raw bytes.
    pub fn as_ndarray(&self) -> Option<(Vec<usize>, String, &[u8])> {
        let Value::Reduce {
            callable, state, ..
        } = self
        else {
            return None;
        };
        let Value::Global { name, .. } = callable.as_ref() else {
            return None;
        };
        if name != "_reconstruct" {
            return None;
        }

        // State: (version, shape, dtype, is_fortran, data).
        let state = state.as_ref()?.as_items()?;
        let [_, shape, dtype, fortran, data] = state else {
            return None;
        };
        if fortran.as_int()? != 0 {
            return None;
        }
        let shape = shape
            .as_items()?
            .iter()
            .map(|dim| dim.as_int().map(|d| d as usize))
            .collect::<Option<Vec<_>>>()?;
        let Value::Reduce { args, .. } = dtype else {
            return None;
        };
        let dtype = args.as_items()?.first()?.as_text()?;
        let Value::Bytes(bytes) = data else {
            return None;
        };
        Some((shape, dtype, bytes.as_slice()))
    }
}

/// Parses one pickle from `bytes`; `path` only names the file in errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Value> {
    Parser {
        bytes,
        pos: 0,
        path,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

impl<'a> Parser<'a> {
    fn error(&self, reason: impl Into<String>) -> DataError {
        DataError::format(
            self.path,
            "pickle",
            format!("at byte {}: {}", self.pos, reason.into()),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() - self.pos < n {
            return Err(DataError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("a pickle operand at byte {}", self.pos),
                expected: (self.pos + n) as u64,
                found: self.bytes.len() as u64,
            });
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(
            b.try_into().expect("8 bytes were taken"),
        ))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.bytes[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.error("line operand without a newline"))?;
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack
            .pop()
            .ok_or_else(|| self.error("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.error("no MARK on the stack"))?;
        if mark > self.stack.len() {
            return Err(self.error("MARK above the stack top"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn top(&mut self) -> Result<&mut Value> {
        let pos = self.pos;
        self.stack.last_mut().ok_or_else(|| {
            DataError::format(self.path, "pickle", format!("at byte {pos}: empty stack"))
        })
    }

    fn push_bytes(&mut self, len: usize) -> Result<()> {
        let bytes = self.take(len)?.to_vec();
        self.stack.push(Value::Bytes(Rc::new(bytes)));
        Ok(())
    }

    fn push_str(&mut self, len: usize) -> Result<()> {
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| self.error("unicode string is not UTF-8"))?
            .to_string();
        self.stack.push(Value::Str(text));
        Ok(())
    }

    fn memoize(&mut self, key: u64) -> Result<()> {
        let value = self
            .stack
            .last()
            .ok_or_else(|| self.error("PUT on an empty stack"))?;
        self.memo.insert(key, value.clone());
        Ok(())
    }

    fn recall(&mut self, key: u64) -> Result<()> {
        let value = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.error(format!("GET of memo key {key} that was never PUT")))?;
        self.stack.push(value);
        Ok(())
    }

    fn add_items(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(list) => {
                list.extend(items);
                Ok(())
            }
            _ => Err(self.error("APPEND to a value that is not a list")),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if items.len() & 1 == 1 {
            return Err(self.error("SETITEMS with an odd number of values"));
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut iter = items.into_iter();
        while let (Some(key), Some(value)) = (iter.next(), iter.next()) {
            pairs.push((key, value));
        }
        match self.top()? {
            Value::Dict(entries) => {
                entries.extend(pairs);
                Ok(())
            }
            _ => Err(self.error("SETITEM on a value that is not a dict")),
        }
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let opcode = self.u8()?;
            match opcode {
                b'.' => return self.pop(),
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.u64()?;
                }
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (opcode - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.error("TUPLE with too few stack values"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let value = self.u8()?;
                    self.stack.push(Value::Int(value as i64));
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack
                        .push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
                }
                b'J' => {
                    let value = self.u32()? as i32;
                    self.stack.push(Value::Int(value as i64));
                }
                b'I' | b'L' => {
                    let line = self.line()?;
                    let value = match line.trim_end_matches('L') {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        digits => Value::Int(
                            digits
                                .parse()
                                .map_err(|_| self.error(format!("invalid integer `{line}`")))?,
                        ),
                    };
                    self.stack.push(value);
                }
                0x8a => {
                    let len = self.u8()? as usize;
                    let bytes = self.take(len)?;
                    if len > 8 {
                        return Err(self.error("LONG1 wider than 64 bits"));
                    }
                    let fill = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
                        0xff
                    } else {
                        0
                    };
                    let mut wide = [fill; 8];
                    wide[..len].copy_from_slice(bytes);
                    self.stack.push(Value::Int(i64::from_le_bytes(wide)));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let value = f64::from_be_bytes(b.try_into().expect("8 bytes were taken"));
                    self.stack.push(Value::Float(value));
                }
                b'U' | b'C' => {
                    let len = self.u8()? as usize;
                    self.push_bytes(len)?;
                }
                b'T' | b'B' => {
                    let len = self.u32()? as usize;
                    self.push_bytes(len)?;
                }
                0x8e => {
                    let len = self.u64()? as usize;
                    self.push_bytes(len)?;
                }
                0x8c => {
                    let len = self.u8()? as usize;
                    self.push_str(len)?;
                }
                b'X' => {
                    let len = self.u32()? as usize;
                    self.push_str(len)?;
                }
                0x8d => {
                    let len = self.u64()? as usize;
                    self.push_str(len)?;
                }
                b'q' => {
                    let key = self.u8()? as u64;
                    self.memoize(key)?;
                }
                b'r' => {
                    let key = self.u32()? as u64;
                    self.memoize(key)?;
                }
                b'p' => {
                    let line = self.line()?;
                    let key = line.parse().map_err(|_| self.error("invalid PUT key"))?;
                    self.memoize(key)?;
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memoize(key)?;
                }
                b'h' => {
                    let key = self.u8()? as u64;
                    self.recall(key)?;
                }
                b'j' => {
                    let key = self.u32()? as u64;
                    self.recall(key)?;
                }
                b'g' => {
                    let line = self.line()?;
                    let key = line.parse().map_err(|_| self.error("invalid GET key"))?;
                    self.recall(key)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global { module, name });
                }
                0x93 => {
                    let name = self
                        .pop()?
                        .as_text()
                        .ok_or_else(|| self.error("bad name"))?;
                    let module = self
                        .pop()?
                        .as_text()
                        .ok_or_else(|| self.error("bad module"))?;
                    self.stack.push(Value::Global { module, name });
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(Value::Reduce {
                        callable: Box::new(callable),
                        args: Box::new(args),
                        state: None,
                    });
                }
                b'b' => {
                    let new_state = self.pop()?;
                    match self.top()? {
                        Value::Reduce { state, .. } => *state = Some(Box::new(new_state)),
                        _ => return Err(self.error("BUILD on a value that no REDUCE made")),
                    }
                }
                b'a' => {
                    let item = self.pop()?;
                    self.add_items(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.add_items(items)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                other => {
                    return Err(self.error(format!(
                        "unsupported opcode 0x{other:02x}; only the opcodes of data pickles \
                         (CIFAR batches) are read"
                    )))
                }
            }
        }
    }
}

/// Writes pickles with the opcodes that Python 2's `cPickle` uses at protocol 2.
/// Tests use it to build CIFAR fixtures.
pub mod write {
    /// Starts a protocol-2 pickle.
    pub fn header(out: &mut Vec<u8>) {
        out.extend_from_slice(&[0x80, 2]);
    }

    /// Pushes a Python 2 `str` (SHORT_BINSTRING or BINSTRING).
    pub fn bytes(out: &mut Vec<u8>, value: &[u8]) {
        if value.len() < 256 {
            out.push(b'U');
            out.push(value.len() as u8);
        } else {
            out.push(b'T');
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(value);
    }

    /// Pushes a small non-negative integer (BININT1, BININT2 or BININT).
    pub fn int(out: &mut Vec<u8>, value: u32) {
        if value < 256 {
            out.extend_from_slice(&[b'K', value as u8]);
        } else if value < 65536 {
            out.push(b'M');
            out.extend_from_slice(&(value as u16).to_le_bytes());
        } else {
            out.push(b'J');
            out.extend_from_slice(&value.to_le_bytes());
        }
    }

    /// Pushes a list of integers, appended in groups of 1,000 as `cPickle` does.
    pub fn int_list(out: &mut Vec<u8>, values: &[u32], memo: &mut u8) {
        out.push(b']');
        put(out, memo);
        for group in values.chunks(1000) {
            out.push(b'(');
            for &value in group {
                int(out, value);
            }
            out.push(b'e');
        }
    }

    /// Pushes a `uint8` NumPy array of `shape` as `ndarray.__reduce__` writes it.
    pub fn ndarray_u8(out: &mut Vec<u8>, shape: &[usize], data: &[u8], memo: &mut u8) {
        out.extend_from_slice(b"cnumpy.core.multiarray\n_reconstruct\n");
        put(out, memo);
        out.extend_from_slice(b"cnumpy\nndarray\n");
        put(out, memo);
        int(out, 0);
        out.push(0x85);
        bytes(out, b"b");
        out.push(0x87);
        out.push(b'R');
        put(out, memo);

        out.push(b'(');
        int(out, 1);
        for &dim in shape {
            int(out, dim as u32);
        }
        out.push(if shape.len() == 2 { 0x86 } else { 0x85 });
        out.extend_from_slice(b"cnumpy\ndtype\n");
        put(out, memo);
        bytes(out, b"u1");
        int(out, 0);
        int(out, 1);
        out.push(0x87);
        out.push(b'R');
        put(out, memo);
        out.push(b'(');
        int(out, 3);
        bytes(out, b"|");
        out.extend_from_slice(b"NNN");
        out.extend_from_slice(b"J\xff\xff\xff\xffJ\xff\xff\xff\xff");
        int(out, 0);
        out.extend_from_slice(b"tb");
        out.extend_from_slice(b"I00\n");
        bytes(out, data);
        out.extend_from_slice(b"tb");
    }

    /// Memoizes the stack top with the next BINPUT key.
    pub fn put(out: &mut Vec<u8>, memo: &mut u8) {
        out.extend_from_slice(&[b'q', *memo]);
        *memo = memo.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dict_of_array_and_list() {
        let mut out = Vec::new();
        let mut memo = 1;
        write::header(&mut out);
        out.extend_from_slice(b"}q\x00(");
        write::bytes(&mut out, b"data");
        write::ndarray_u8(&mut out, &[2, 3], &[1, 2, 3, 4, 5, 6], &mut memo);
        write::bytes(&mut out, b"labels");
        write::int_list(&mut out, &[7, 300, 70000], &mut memo);
        out.extend_from_slice(b"u.");

        let value = parse(&out, Path::new("batch")).expect("valid pickle");
        let (shape, dtype, data) = value
            .get("data")
            .and_then(Value::as_ndarray)
            .expect("array");
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(dtype, "u1");
        assert_eq!(data, &[1, 2, 3, 4, 5, 6]);
        let labels: Vec<i64> = value
            .get("labels")
            .and_then(Value::as_items)
            .expect("list")
            .iter()
            .filter_map(Value::as_int)
            .collect();
        assert_eq!(labels, vec![7, 300, 70000]);
    }

    #[test]
    fn truncated_pickle_names_file() {
        let error = parse(b"\x80\x02}q\x00(U\x04da", Path::new("data_batch_9")).expect_err("cut");
        assert!(error.to_string().contains("data_batch_9"), "{error}");
    }

    #[test]
    fn unknown_opcode_rejected() {
        let error = parse(b"\x80\x02\xff", Path::new("p")).expect_err("bad opcode");
        assert!(error.to_string().contains("0xff"), "{error}");
    }
}
