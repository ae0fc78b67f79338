//! Reading GGUF files (llama.cpp's model format, versions 2 and 3).
//!
//! A GGUF file is, all little-endian:
//!
//! 1. a header: the magic `GGUF`, a `u32` version, a `u64` tensor count and a `u64`
//!    metadata count;
//! 2. the metadata: key/value pairs, each a string key (`u64` length, UTF-8 bytes), a
//!    `u32` value type and the value (arrays carry an element type and a `u64` count);
//! 3. the tensor infos: name, `u32` number of dimensions, that many `u64` dimensions
//!    (innermost first), the `u32` ggml type and a `u64` offset into the data section;
//! 4. padding up to a multiple of `general.alignment` (32 by default), then the data
//!    section, where every tensor starts at an aligned offset.
//!
//! [`GgufFile::open`] maps the file and parses everything but the tensor data up front.
//! Every length, count and offset is checked against the bytes that are actually there
//! before anything is read or allocated, so that a truncated or corrupt file gives a
//! [`GgufError`] rather than a panic or an attempt to allocate an absurd amount of
//! memory.
//!
//! The reader is written by hand, with every check in sight, because model files come
//! from anywhere (downloads, a guest's `--model`, a snapshot) and must be treated as
//! hostile: a count must fit in the bytes left (an array of N elements of s bytes needs
//! N·s), and what the parsed header takes in memory is charged before each allocation
//! against a fixed budget ([`MAX_PARSED_MEMORY`]), since an element of one byte in the file
//! becomes a [`Value`] of 32. Errors describe what they found and never quote it whole:
//! keys, names and strings from the file are escaped and cut.
//!
//! Tensor data stays in the mapping: [`GgufFile::tensor_bytes`] borrows it and
//! [`GgufFile::tensor_f32`] dequantizes it (see [`crate::quant`]).
//!
//! Dimensions are listed innermost first, as ggml does: a matrix that PyTorch calls
//! `[out, in]` is `dims == [in, out]` here, and its data is `out` rows of `in` values.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::mapped::{Storage, quote};
use crate::quant;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Data-section alignment when the file has no `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most dimensions a ggml tensor has.
const MAX_DIMS: u32 = 4;

/// How deep arrays may nest inside arrays (llama.cpp writes none).
const MAX_ARRAY_DEPTH: usize = 8;

/// The most memory the parsed metadata and tensor infos of one file may take (256 MiB),
/// estimated and charged before each allocation. The largest vocabularies (Gemma's 262,144
/// tokens with their scores and types) take about 30 MiB, a whole embedded
/// `tokenizer.huggingface.json` a few tens more.
pub const MAX_PARSED_MEMORY: u64 = 256 << 20;

/// The most metadata keys a file may declare (llama.cpp writes a few dozen). The count is
/// also checked against the bytes left, 13 bytes a pair at least.
pub const MAX_METADATA_KEYS: u64 = 1 << 16;

/// The longest metadata key, in bytes (the GGUF specification's limit, 2^16 - 1).
const MAX_KEY_LEN: u64 = u16::MAX as u64;

/// The most tensors a file may declare (the largest models have a few thousand per file).
/// The count is also checked against the bytes left, 24 bytes a tensor info at least.
pub const MAX_TENSORS: u64 = 1 << 20;

/// The longest tensor name, in bytes (llama.cpp refuses names of 64 bytes and more).
const MAX_TENSOR_NAME: u64 = 256;

/// Value type ids on the wire.
mod wire {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `UINT8` (type 0).
    U8(u8),
    /// `INT8` (type 1).
    I8(i8),
    /// `UINT16` (type 2).
    U16(u16),
    /// `INT16` (type 3).
    I16(i16),
    /// `UINT32` (type 4).
    U32(u32),
    /// `INT32` (type 5).
    I32(i32),
    /// `FLOAT32` (type 6).
    F32(f32),
    /// `BOOL` (type 7): one byte, 0 or 1.
    Bool(bool),
    /// `STRING` (type 8). Bytes that are not UTF-8 are replaced with U+FFFD.
    String(String),
    /// `ARRAY` (type 9): elements all of one type.
    Array(Vec<Value>),
    /// `UINT64` (type 10).
    U64(u64),
    /// `INT64` (type 11).
    I64(i64),
    /// `FLOAT64` (type 12).
    F64(f64),
}

impl Value {
    /// The value as a `u64`: any unsigned integer, or a signed one that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `i64`: any integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as an `f32`: a float (an `F64` rounded), or an integer converted.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => self.as_i64().map(|v| v as f32).or_else(|| self.as_u64().map(|v| v as f32)),
        }
    }

    /// The value as a `bool` (only for `Bool`).
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string slice (only for `String`).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of an `Array`.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type (`"uint32"`, `"string"`, `"array"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }

    /// A short description for error messages: the type and the value, shortened.
    fn describe(&self) -> String {
        match self {
            Value::String(s) => format!("string \"{}\"", quote(s.as_bytes())),
            Value::Array(a) => match a.first() {
                Some(first) => format!("array of {} {} values", a.len(), first.type_name()),
                None => "empty array".to_string(),
            },
            Value::Bool(b) => format!("bool {b}"),
            Value::F32(v) => format!("float32 {v}"),
            Value::F64(v) => format!("float64 {v}"),
            Value::U64(v) => format!("uint64 {v}"),
            other => format!("{} {}", other.type_name(), other.as_i64().unwrap_or_default()),
        }
    }
}

/// A ggml tensor type, with ggml's numeric ids (`GgmlType::Q4_0` is 2).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float (0).
    F32,
    /// IEEE half (1).
    F16,
    /// 4-bit, 32-element blocks with a scale (2).
    Q4_0,
    /// 4-bit, 32-element blocks with a scale and a min (3).
    Q4_1,
    /// 5-bit, 32-element blocks with a scale (6).
    Q5_0,
    /// 5-bit, 32-element blocks with a scale and a min (7).
    Q5_1,
    /// 8-bit, 32-element blocks with a scale (8).
    Q8_0,
    /// 8-bit, 32-element blocks with a scale and a sum (9).
    Q8_1,
    /// 2-bit K-quant (10).
    Q2K,
    /// 3-bit K-quant (11).
    Q3K,
    /// 4-bit K-quant (12).
    Q4K,
    /// 5-bit K-quant (13).
    Q5K,
    /// 6-bit K-quant (14).
    Q6K,
    /// 8-bit K-quant (15).
    Q8K,
    /// bfloat16 (30).
    BF16,
    /// Any other ggml type id (IQ quants, integers, ...), kept as is.
    Other(u32),
}

impl GgmlType {
    /// The type for a ggml type id.
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// ggml's name for the type (`"Q4_K"`), if known.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.id() {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            _ => return None,
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name(), self) {
            (Some(name), GgmlType::Other(id)) => write!(f, "{name} (ggml type {id})"),
            (Some(name), _) => f.write_str(name),
            (None, _) => write!(f, "unknown ggml type {}", self.id()),
        }
    }
}

/// Where a tensor is and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost first (`[in, out]` for a linear layer's weight).
    pub dims: Vec<u64>,
    /// The ggml type of the data.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The number of elements (the product of the dimensions; 1 for no dimensions).
    /// Saturates at `u64::MAX`; [`GgufFile`] refuses tensors where it would.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).unwrap_or(u64::MAX)
    }

    /// The size of the tensor's data in bytes.
    ///
    /// An error if the type's layout is unknown, the innermost dimension is not a whole
    /// number of blocks, or the size overflows.
    pub fn n_bytes(&self) -> Result<u64, GgufError> {
        let (block_elems, block_bytes) = quant::type_size(self.ggml_type)
            .ok_or_else(|| GgufError::UnsupportedType { tensor: quote(self.name.as_bytes()), ty: self.ggml_type })?;
        let (block_elems, block_bytes) = (block_elems as u64, block_bytes as u64);
        let inner = self.dims.first().copied().unwrap_or(1);
        if !inner.is_multiple_of(block_elems) {
            return Err(GgufError::Corrupt(format!(
                "tensor `{}`: innermost dimension {inner} is not a multiple of the {}-element blocks of {}",
                quote(self.name.as_bytes()),
                block_elems,
                self.ggml_type
            )));
        }
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| (n / block_elems).checked_mul(block_bytes))
            .ok_or_else(|| {
                GgufError::Corrupt(format!(
                    "tensor `{}`: dimensions {} overflow a 64-bit size",
                    quote(self.name.as_bytes()),
                    crate::mapped::dims(&self.dims)
                ))
            })
    }
}

/// Errors from reading a GGUF file.
///
/// Text that comes from a file (keys, tensor names, string values) is escaped and cut to
/// about 64 characters in every field and message, so that an error stays short and
/// printable whatever the file holds.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read GGUF file {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file: it starts with \"{}\" instead of \"GGUF\"{}", .found.escape_ascii(), magic_hint(.found))]
    NotGguf {
        /// The first bytes of the file (fewer than four if the file is that short).
        found: Vec<u8>,
    },
    /// A GGUF version other than 2 or 3.
    #[error("unsupported GGUF version {version}: shoal reads versions 2 and 3{}", version_hint(.version))]
    Version {
        /// The version in the header.
        version: u32,
    },
    /// The file ends before something it declares.
    #[error(
        "GGUF file truncated or corrupt: {what} needs {needed} bytes at offset {offset}, but only {available} \
         remain; the file may be an incomplete download (fetch it again, e.g. with `shoal pull NAME`)"
    )]
    Truncated {
        /// What was being read (file-derived names in it escaped and cut).
        what: String,
        /// Where in the file.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left from `offset` to the end of the file.
        available: u64,
    },
    /// The file's structure is inconsistent.
    #[error("corrupt GGUF file: {0}")]
    Corrupt(String),
    /// A metadata key the caller needs is absent.
    #[error(
        "metadata key `{0}` not found in the GGUF file; the model may be of another architecture or converted by an old tool"
    )]
    MissingKey(String),
    /// A metadata value has another type than the caller needs.
    #[error("metadata key `{key}` is {found}, expected {expected}")]
    WrongType {
        /// The key (escaped and cut).
        key: String,
        /// What the caller wanted (`"an unsigned integer"`).
        expected: &'static str,
        /// What the file holds.
        found: String,
    },
    /// A tensor the caller needs is absent.
    #[error("tensor `{0}` not found in the GGUF file; the model may be of another architecture or variant")]
    MissingTensor(String),
    /// A tensor's type cannot be read.
    #[error(
        "tensor `{tensor}` has type {ty}, which shoal cannot read (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, \
         Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); use a model quantized to one of those"
    )]
    UnsupportedType {
        /// The tensor's name (escaped and cut).
        tensor: String,
        /// Its type.
        ty: GgmlType,
    },
}

fn magic_hint(found: &[u8]) -> &'static str {
    if found.starts_with(b"vers") {
        " (it looks like a Git LFS pointer: fetch the real file)"
    } else if found.starts_with(b"{") || found.starts_with(b"<") {
        " (it looks like text, perhaps an error page saved instead of the model)"
    } else if found.len() == 4 && found[2..] == [0, 0] {
        " (it may be a safetensors file, which starts with its header length)"
    } else {
        ""
    }
}

fn version_hint(version: &u32) -> &'static str {
    match *version {
        1 => "; version 1 files come from 2023 builds of llama.cpp: convert the model again with a current one",
        v if matches!(v.swap_bytes(), 2 | 3) => "; this looks like a big-endian GGUF file, which shoal does not read",
        _ => "; the file may be corrupt or written by a newer llama.cpp",
    }
}

/// A parsed GGUF file: its metadata and tensor infos, with the tensor data left in place.
pub struct GgufFile {
    /// The format version (2 or 3).
    pub version: u32,
    /// Every metadata key/value pair.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor infos, in file order.
    pub tensors: Vec<TensorInfo>,
    storage: Storage,
    data_offset: u64,
    alignment: u64,
    index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.storage.bytes().len())
            .finish()
    }
}

impl GgufFile {
    /// Maps the file at `path` and parses its header, metadata and tensor infos.
    ///
    /// The file must not be modified while the returned value lives (see the mapping's
    /// safety note); a file that is truncated or inconsistent is an error.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let storage = Storage::map(path).map_err(|source| GgufError::Io { path: path.to_path_buf(), source })?;
        GgufFile::parse(storage)
    }

    /// Parses a GGUF file held in memory (the same checks as [`GgufFile::open`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<GgufFile, GgufError> {
        let header = parse_header(storage.bytes())?;
        Ok(GgufFile {
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            storage,
            data_offset: header.data_offset,
            alignment: header.alignment,
            index: header.index,
        })
    }

    /// The metadata value for `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn get_as<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<T, GgufError> {
        let value = self.get(key).ok_or_else(|| GgufError::MissingKey(quote(key.as_bytes())))?;
        convert(value).ok_or_else(|| GgufError::WrongType {
            key: quote(key.as_bytes()),
            expected,
            found: value.describe(),
        })
    }

    /// The metadata value for `key` as an unsigned integer (see [`Value::as_u64`]).
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_as(key, "a non-negative integer", Value::as_u64)
    }

    /// The metadata value for `key` as an `f32` (see [`Value::as_f32`]).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.get_as(key, "a number", Value::as_f32)
    }

    /// The metadata value for `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get_as(key, "a string", Value::as_str)
    }

    /// The model's architecture (`general.architecture`, e.g. `"llama"`), which prefixes
    /// its hyperparameter keys (`llama.block_count`).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// The data-section alignment (`general.alignment`, or 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Offset of the data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The info of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor's data, borrowed from the file.
    ///
    /// `info` is checked against the file, so an info that does not come from this file
    /// gives an error rather than a panic.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8], GgufError> {
        let bytes = self.storage.bytes();
        let size = info.n_bytes()?;
        let start = self.data_offset.checked_add(info.offset);
        let truncated = || GgufError::Truncated {
            what: format!("the data of tensor `{}`", quote(info.name.as_bytes())),
            offset: start.unwrap_or(u64::MAX),
            needed: size,
            available: start.map_or(0, |s| (bytes.len() as u64).saturating_sub(s)),
        };
        let start = start.ok_or_else(truncated)?;
        let end = start.checked_add(size).ok_or_else(truncated)?;
        if end > bytes.len() as u64 {
            return Err(truncated());
        }
        // Both fit in the slice's length, hence in usize.
        Ok(&bytes[start as usize..end as usize])
    }

    /// The tensor called `name`, dequantized to `f32`.
    ///
    /// The values are in storage order: with `dims == [in, out]` that is `out` rows of
    /// `in` values each (row-major, innermost dimension first).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let shown = || quote(name.as_bytes());
        let info = self.tensor(name).ok_or_else(|| GgufError::MissingTensor(shown()))?;
        if !quant::is_supported(info.ggml_type) {
            return Err(GgufError::UnsupportedType { tensor: shown(), ty: info.ggml_type });
        }
        // The data is in the file (checked here), so the values take at most about seven
        // times its size (4-bit quants).
        let bytes = self.tensor_bytes(info)?;
        let n = usize::try_from(info.n_elements())
            .map_err(|_| GgufError::Corrupt(format!("tensor `{}` has too many elements for this machine", shown())))?;
        let mut out = vec![0f32; n];
        quant::dequantize(info.ggml_type, bytes, n, &mut out)
            .map_err(|e| GgufError::Corrupt(format!("tensor `{}`: {e}", shown())))?;
        Ok(out)
    }
}

/// Everything before the data section.
struct Header {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// The GGUF name of a wire value type, for messages.
fn wire_name(ty: u32) -> &'static str {
    match ty {
        wire::U8 => "uint8",
        wire::I8 => "int8",
        wire::U16 => "uint16",
        wire::I16 => "int16",
        wire::U32 => "uint32",
        wire::I32 => "int32",
        wire::F32 => "float32",
        wire::BOOL => "bool",
        wire::STRING => "string",
        wire::ARRAY => "array",
        wire::U64 => "uint64",
        wire::I64 => "int64",
        wire::F64 => "float64",
        _ => "unknown",
    }
}

/// The length of `String::from_utf8_lossy(bytes)`, computed without allocating: every
/// invalid sequence becomes U+FFFD, three bytes.
fn lossy_len(bytes: &[u8]) -> u64 {
    bytes.utf8_chunks().map(|c| c.valid().len() as u64 + if c.invalid().is_empty() { 0 } else { 3 }).sum()
}

/// Reads little-endian fields, checking each against the bytes that remain and every
/// allocation against what the parsed header may take.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Bytes of memory the parsed metadata and tensor infos may still take (it starts at
    /// [`MAX_PARSED_MEMORY`]).
    budget: u64,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: &str, needed: u64) -> GgufError {
        GgufError::Truncated {
            what: what.to_string(),
            offset: self.pos as u64,
            needed,
            available: self.remaining() as u64,
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => {
                let s = &self.buf[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(self.truncated(what, n)),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        Ok(s.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Takes `bytes` from the memory budget before they are allocated; `what` says what
    /// they are for (`"an array of 67108864 uint8 values"`).
    fn charge(&mut self, bytes: u64, what: impl FnOnce() -> String) -> Result<(), GgufError> {
        if bytes > self.budget {
            return Err(GgufError::Corrupt(format!(
                "{} would take {bytes} bytes of memory once parsed, but only {} of the {MAX_PARSED_MEMORY} bytes \
                 shoal allows for a file's metadata and tensor infos are left; the file is damaged or made to \
                 exhaust memory",
                what(),
                self.budget
            )));
        }
        self.budget -= bytes;
        Ok(())
    }

    /// A string that must be UTF-8 and at most `max_len` bytes (keys and tensor names),
    /// charged to the budget.
    fn name(&mut self, what: &str, max_len: u64) -> Result<String, GgufError> {
        let start = self.pos;
        let len = self.u64(what)?;
        if len > max_len {
            return Err(GgufError::Corrupt(format!(
                "{what} at offset {start} is {len} bytes long; shoal reads at most {max_len}"
            )));
        }
        let bytes = self.take(len, what)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|_| GgufError::Corrupt(format!("{what} at offset {start} is not UTF-8: `{}`", quote(bytes))))?;
        self.charge(len, || format!("{what} at offset {start}"))?;
        Ok(s.to_string())
    }

    /// Fails early if `count` items of at least `min_size` bytes each cannot fit in
    /// what is left, so that absurd counts never reach an allocation.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<usize, GgufError> {
        let needed = count.saturating_mul(min_size);
        if needed > self.remaining() as u64 {
            return Err(self.truncated(&format!("{what} ({count} declared)"), needed));
        }
        Ok(count as usize)
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value, GgufError> {
        Ok(match ty {
            wire::U8 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            wire::I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            wire::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            wire::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            wire::U32 => Value::U32(self.u32(what)?),
            wire::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            wire::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            wire::U64 => Value::U64(self.u64(what)?),
            wire::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            wire::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            wire::BOOL => {
                let offset = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(GgufError::Corrupt(format!("{what}: bool byte {b} at offset {offset}"))),
                }
            }
            wire::STRING => {
                let start = self.pos;
                let len = self.u64(what)?;
                let bytes = self.take(len, what)?;
                // Bytes that are not UTF-8 grow by up to three times when replaced.
                self.charge(lossy_len(bytes), || format!("{what}: the string of {len} bytes at offset {start}"))?;
                Value::String(String::from_utf8_lossy(bytes).into_owned())
            }
            wire::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Corrupt(format!(
                        "{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep at offset {}",
                        self.pos
                    )));
                }
                let start = self.pos;
                let elem_ty = self.u32(what)?;
                let count = self.u64(what)?;
                let min_size = match elem_ty {
                    wire::U8 | wire::I8 | wire::BOOL => 1,
                    wire::U16 | wire::I16 => 2,
                    wire::U32 | wire::I32 | wire::F32 => 4,
                    wire::U64 | wire::I64 | wire::F64 | wire::STRING => 8,
                    wire::ARRAY => 12,
                    other => return Err(self.bad_type(other, what)),
                };
                let count = self.check_count(count, min_size, &format!("{what}: array"))?;
                // Every element becomes a `Value` of 32 bytes, whatever its size in the file:
                // an array of 64 Mi bytes would take 2 GiB.
                self.charge((count as u64).saturating_mul(VALUE_SIZE), || {
                    format!("{what}: the array of {count} {} values at offset {start}", wire_name(elem_ty))
                })?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem_ty, what, depth + 1)?);
                }
                Value::Array(items)
            }
            other => return Err(self.bad_type(other, what)),
        })
    }

    fn bad_type(&self, ty: u32, what: &str) -> GgufError {
        GgufError::Corrupt(format!(
            "{what}: unknown value type {ty} before offset {} (GGUF types are 0 to 12)",
            self.pos
        ))
    }
}

/// What one `Value` takes in memory (an array element, or a metadata entry's value).
const VALUE_SIZE: u64 = std::mem::size_of::<Value>() as u64;

/// What one metadata entry takes besides its key's bytes and its value's contents: the
/// key's `String`, the `Value`, and a share of the B-tree node.
const ENTRY_SIZE: u64 = std::mem::size_of::<String>() as u64 + VALUE_SIZE + 16;

/// What one tensor info takes besides its name's bytes (counted twice, for the index) and
/// its dimensions: the `TensorInfo`, and the index's `String` and `usize` with a hash
/// table's slack.
const TENSOR_SIZE: u64 = std::mem::size_of::<TensorInfo>() as u64 + 2 * (std::mem::size_of::<String>() as u64 + 8);

fn parse_header(buf: &[u8]) -> Result<Header, GgufError> {
    if buf.len() < 4 || buf[..4] != GGUF_MAGIC {
        let found = buf[..buf.len().min(4)].to_vec();
        if GGUF_MAGIC.starts_with(&found) {
            // A prefix of the magic: a cut-off GGUF file.
            return Err(GgufError::Truncated {
                what: "the magic".into(),
                offset: 0,
                needed: 4,
                available: found.len() as u64,
            });
        }
        return Err(GgufError::NotGguf { found });
    }
    let mut c = Cursor { buf, pos: 4, budget: MAX_PARSED_MEMORY };
    let version = c.u32("the version")?;
    if !matches!(version, 2 | 3) {
        return Err(GgufError::Version { version });
    }
    let tensor_count = c.u64("the tensor count")?;
    let kv_count = c.u64("the metadata count")?;

    if kv_count > MAX_METADATA_KEYS {
        return Err(GgufError::Corrupt(format!(
            "the header declares {kv_count} metadata keys; shoal reads at most {MAX_METADATA_KEYS} (models have \
             a few dozen)"
        )));
    }
    // A key/value pair is at least an 8-byte key length, a 4-byte type and a 1-byte value.
    let kv_count = c.check_count(kv_count, 13, "metadata key/value pairs")?;
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = c.name(&format!("metadata key {i}"), MAX_KEY_LEN)?;
        let shown = quote(key.as_bytes());
        let what = format!("metadata value `{shown}`");
        c.charge(ENTRY_SIZE, || what.clone())?;
        let ty = c.u32(&what)?;
        let value = c.value(ty, &what, 0)?;
        if metadata.insert(key, value).is_some() {
            return Err(GgufError::Corrupt(format!("metadata key `{shown}` appears twice")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(GgufError::Corrupt(format!(
                    "general.alignment is {}, expected a power of two",
                    v.describe()
                )));
            }
        },
    };

    if tensor_count > MAX_TENSORS {
        return Err(GgufError::Corrupt(format!(
            "the header declares {tensor_count} tensors; shoal reads at most {MAX_TENSORS} (models have a few \
             thousand at most)"
        )));
    }
    // A tensor info is at least an 8-byte name length, a 4-byte dimension count, a
    // 4-byte type and an 8-byte offset.
    let tensor_count = c.check_count(tensor_count, 24, "tensor infos")?;
    c.charge(tensor_count as u64 * TENSOR_SIZE, || format!("the infos of {tensor_count} tensors"))?;
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut index = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let name = c.name(&format!("the name of tensor {i}"), MAX_TENSOR_NAME)?;
        let shown = quote(name.as_bytes());
        let what = format!("the info of tensor `{shown}`");
        let n_dims = c.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::Corrupt(format!("tensor `{shown}` has {n_dims} dimensions (at most {MAX_DIMS})")));
        }
        // The name again for the index, and the dimensions.
        c.charge(name.len() as u64 + 8 * u64::from(n_dims), || what.clone())?;
        let dims = (0..n_dims).map(|_| c.u64(&what)).collect::<Result<Vec<_>, _>>()?;
        let ggml_type = GgmlType::from_id(c.u32(&what)?);
        let offset = c.u64(&what)?;
        let info = TensorInfo { name, dims, ggml_type, offset };
        if info.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).is_none() {
            return Err(GgufError::Corrupt(format!("tensor `{shown}`: dimensions {:?} overflow", info.dims)));
        }
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::Corrupt(format!(
                "tensor `{shown}`: data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if index.insert(info.name.clone(), i).is_some() {
            return Err(GgufError::Corrupt(format!("tensor `{shown}` appears twice")));
        }
        tensors.push(info);
    }

    let data_offset = (c.pos as u64)
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or_else(|| GgufError::Corrupt(format!("alignment {alignment} puts the data section past any file")))?;
    let file_len = buf.len() as u64;
    for info in &tensors {
        let start = data_offset.checked_add(info.offset);
        // Unknown types are kept (their data cannot be sized, only located).
        let size = match info.n_bytes() {
            Ok(size) => size,
            Err(GgufError::UnsupportedType { .. }) => 0,
            Err(e) => return Err(e),
        };
        match start.and_then(|s| s.checked_add(size)) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(GgufError::Truncated {
                    what: format!(
                        "the data of tensor `{}` ({} {:?})",
                        quote(info.name.as_bytes()),
                        info.ggml_type,
                        info.dims
                    ),
                    offset: start.unwrap_or(u64::MAX),
                    needed: size,
                    available: start.map_or(0, |s| file_len.saturating_sub(s)),
                });
            }
        }
    }
    Ok(Header { version, metadata, tensors, index, alignment, data_offset })
}
