//! Safetensors files in the Hugging Face layout: one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, next to a `config.json`.
//!
//! A file is an 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}` and the data,
//! offsets relative to the end of the header. Files are memory-mapped; every length and
//! offset is checked against the file before a byte is read, and tensors of F32, F16 and
//! BF16 are converted to f32.
//!
//! The reader is written by hand over `serde_json`, with every check in sight, because
//! model files come from anywhere and must be treated as hostile: the header length must
//! fit in the file and in [`MAX_HEADER`]; before the JSON is parsed, one pass over its bytes
//! bounds what the parsed tree would take ([`MAX_HEADER_MEMORY`]: a 100 MB header of `[0,0,…`
//! or `{"":0},…` would otherwise become gigabytes of `serde_json::Value`); then shapes must
//! not overflow, offsets must match the dtype's size and lie in the data. Errors describe
//! what they found and never quote it whole: names and dtypes are escaped and cut.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::mapped::{Storage, dims, quote};

/// The largest JSON header read, in bytes (the reference implementation's limit is 100 MB).
/// `model.safetensors.index.json` has the same limit.
pub const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// The most memory the parsed JSON of a header (or of an index) may take, estimated from its
/// bytes before it is parsed (256 MiB). A tensor's entry is estimated at about 1.8 KB (it
/// takes about 1 KB), so this allows some 140,000 tensors, where the largest files have a
/// few thousand; tests/fuzz_parsers.rs checks that the estimate bounds what `serde_json`
/// allocates.
pub const MAX_HEADER_MEMORY: u64 = 256 << 20;

/// Errors from reading safetensors files and their `config.json`.
///
/// Text that comes from a file (tensor names, dtypes, file names in an index) is escaped
/// and cut to about 64 characters in every field and message.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// A file could not be opened, mapped or read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file ends before something it declares.
    #[error(
        "safetensors file {} truncated: {what} needs {needed} bytes at offset {offset}, but the file has \
         {len}; it may be an incomplete download",
        .path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// Where in the file.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// The file's length.
        len: u64,
    },
    /// The file's header is inconsistent or not valid JSON.
    #[error("corrupt safetensors file {}: {reason}", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor has a dtype this crate does not convert.
    #[error("tensor `{tensor}` has dtype {dtype}; shoal reads F32, F16 and BF16 safetensors")]
    UnsupportedDtype {
        /// The tensor's name (escaped and cut).
        tensor: String,
        /// Its dtype as written in the header (escaped and cut).
        dtype: String,
    },
    /// A tensor asked for is in none of the files.
    #[error("tensor `{0}` not found in the safetensors files")]
    MissingTensor(String),
}

/// The element type of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dtype {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Any other dtype (`I64`, `F8_E4M3`, …), kept by name; its element size is known when
    /// the name is.
    Other(String),
}

impl Dtype {
    fn parse(s: &str) -> Dtype {
        match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            other => Dtype::Other(other.to_string()),
        }
    }

    /// Bytes per element, when known.
    pub fn size(&self) -> Option<u64> {
        Some(match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::Other(s) => match s.as_str() {
                "F64" | "I64" | "U64" => 8,
                "I32" | "U32" => 4,
                "I16" | "U16" => 2,
                "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
                _ => return None,
            },
        })
    }

    /// The name used in safetensors headers.
    pub fn name(&self) -> &str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::Other(s) => s,
        }
    }
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape, outermost first (row-major, as in PyTorch).
    pub shape: Vec<u64>,
    /// Byte range of its data within the file (absolute, checked against the file length).
    pub range: std::ops::Range<usize>,
}

/// One parsed safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    storage: Storage,
    tensors: HashMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata)
            .finish_non_exhaustive()
    }
}

impl SafetensorsFile {
    /// Maps the file at `path` and parses its header.
    ///
    /// The file must not be modified while the returned value lives.
    pub fn open(path: &Path) -> Result<SafetensorsFile, SafetensorsError> {
        let storage = Storage::map(path).map_err(|source| SafetensorsError::Io { path: path.to_path_buf(), source })?;
        Self::parse(path.to_path_buf(), storage)
    }

    /// Parses a safetensors file held in memory (the same checks as [`SafetensorsFile::open`];
    /// `name` is used in error messages).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<SafetensorsFile, SafetensorsError> {
        Self::parse(PathBuf::from(name), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<SafetensorsFile, SafetensorsError> {
        let (tensors, metadata) = parse_header(&path, storage.bytes())?;
        Ok(SafetensorsFile { path, storage, tensors, metadata })
    }

    /// The whole file's bytes (header included).
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` strings of the header.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The tensors, by name.
    pub fn tensors(&self) -> &HashMap<String, TensorInfo> {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The raw bytes of `name`.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], SafetensorsError> {
        let info = self.tensor(name).ok_or_else(|| SafetensorsError::MissingTensor(quote(name.as_bytes())))?;
        // The range was checked against the file length when the header was parsed.
        Ok(&self.storage.bytes()[info.range.clone()])
    }

    /// The values of `name` converted to f32 (F32, F16 and BF16).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, SafetensorsError> {
        let info = self.tensor(name).ok_or_else(|| SafetensorsError::MissingTensor(quote(name.as_bytes())))?;
        let bytes = self.tensor_bytes(name)?;
        Ok(match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::Other(ref d) => {
                return Err(SafetensorsError::UnsupportedDtype {
                    tensor: quote(name.as_bytes()),
                    dtype: quote(d.as_bytes()),
                });
            }
        })
    }
}

type Header = (HashMap<String, TensorInfo>, HashMap<String, String>);

/// What parsing a JSON text into a `serde_json::Value` would allocate, bounded from above
/// in one pass over its bytes, without parsing it.
///
/// A `Value` is 32 bytes and sits in a `Vec` that may be twice too large (64 a value); a
/// non-empty array's `Vec` starts at 4 values (128); an object is a B-tree whose leaf node
/// takes about 640 bytes however few its members; a string's heap block is at least 32;
/// the characters themselves are at most the text's length. Values are counted from the
/// structure: the root, one per `:` (an object member), one per `,` (an array element, or
/// a member already counted, which only overestimates) and one per `[` (a first element).
#[derive(Debug, Default)]
struct JsonCost {
    values: u64,
    arrays: u64,
    objects: u64,
    strings: u64,
    /// Members of the outermost object (tensors, and `__metadata__`).
    top_members: u64,
    /// The estimate, in bytes.
    bytes: u64,
}

fn json_cost(text: &[u8]) -> JsonCost {
    let mut cost = JsonCost { values: 1, ..JsonCost::default() };
    let (mut in_string, mut escaped, mut depth) = (false, false, 0u64);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                cost.strings += 1;
            }
            b'{' => {
                cost.objects += 1;
                depth += 1;
            }
            b'[' => {
                cost.arrays += 1;
                cost.values += 1;
                depth += 1;
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b':' => {
                cost.values += 1;
                cost.top_members += u64::from(depth == 1);
            }
            b',' => cost.values += 1,
            _ => {}
        }
    }
    cost.bytes = 64 * cost.values + 128 * cost.arrays + 640 * cost.objects + 32 * cost.strings + text.len() as u64;
    cost
}

/// Refuses a JSON text whose parsed tree would take more than [`MAX_HEADER_MEMORY`], before
/// it is parsed; `what` names it in the message (`"the header"`).
fn check_json_cost(text: &[u8], what: &str) -> Result<(), String> {
    let cost = json_cost(text);
    if cost.bytes > MAX_HEADER_MEMORY {
        return Err(format!(
            "{what} ({} bytes of JSON: {} values, {} arrays, {} objects, {} strings; {} entries at the top) would \
             take about {} bytes once parsed, more than the {MAX_HEADER_MEMORY} shoal allows; the file is damaged or \
             made to exhaust memory",
            text.len(),
            cost.values,
            cost.arrays,
            cost.objects,
            cost.strings,
            cost.top_members,
            cost.bytes
        ));
    }
    Ok(())
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header, SafetensorsError> {
    let file_len = bytes.len() as u64;
    let truncated = |what: &str, offset: u64, needed: u64| SafetensorsError::Truncated {
        path: path.to_path_buf(),
        what: what.to_string(),
        offset,
        needed,
        len: file_len,
    };
    let corrupt = |reason: String| SafetensorsError::Corrupt { path: path.to_path_buf(), reason };
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(truncated("the header length", 0, 8));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if header_len > MAX_HEADER {
        return Err(corrupt(format!(
            "the header claims {header_len} bytes, more than the {MAX_HEADER} a safetensors header may have"
        )));
    }
    if header_len > file_len - 8 {
        return Err(truncated("the JSON header", 8, header_len));
    }
    let data_start = 8 + header_len as usize;
    let text = &bytes[8..data_start];
    if text.trim_ascii_start().first() != Some(&b'{') {
        return Err(corrupt("the header is not a JSON object".into()));
    }
    check_json_cost(text, "the header").map_err(corrupt)?;
    let header: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| corrupt(format!("the header is not valid JSON: {e}")))?;
    let serde_json::Value::Object(entries) = header else {
        return Err(corrupt("the header is not a JSON object".into()));
    };
    let data_len = (bytes.len() - data_start) as u64;
    let mut tensors = HashMap::with_capacity(entries.len());
    let mut metadata = HashMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            let serde_json::Value::Object(m) = entry else {
                return Err(corrupt("`__metadata__` is not an object".into()));
            };
            for (k, v) in m {
                let serde_json::Value::String(v) = v else {
                    return Err(corrupt(format!("`__metadata__.{}` is not a string", quote(k.as_bytes()))));
                };
                metadata.insert(k, v);
            }
            continue;
        }
        let shown = quote(name.as_bytes());
        let bad = |what: &str| corrupt(format!("tensor `{shown}`: {what}"));
        let dtype = entry.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no string `dtype`"))?;
        let dtype = Dtype::parse(dtype);
        let shape: Vec<u64> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no `shape` array"))?
            .iter()
            .map(|d| d.as_u64().ok_or_else(|| bad("a dimension of `shape` is not a non-negative integer")))
            .collect::<Result<_, _>>()?;
        let offsets = entry
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("no two-element `data_offsets`"))?;
        let (Some(begin), Some(end)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
            return Err(bad("`data_offsets` are not non-negative integers"));
        };
        if begin > end {
            return Err(bad(&format!("`data_offsets` [{begin}, {end}] end before they begin")));
        }
        let elem = dtype.size().ok_or_else(|| bad(&format!("unknown dtype `{}`", quote(dtype.name().as_bytes()))))?;
        let expected = shape
            .iter()
            .try_fold(elem, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(&format!("shape {} overflows a 64-bit size", dims(&shape))))?;
        if end - begin != expected {
            return Err(bad(&format!(
                "`data_offsets` [{begin}, {end}] span {} bytes, but {} of shape {} needs {expected}",
                end - begin,
                dtype.name(),
                dims(&shape)
            )));
        }
        if end > data_len {
            return Err(truncated(
                &format!("tensor `{shown}`"),
                (data_start as u64).saturating_add(begin),
                end - begin,
            ));
        }
        let range = data_start + begin as usize..data_start + end as usize;
        tensors.insert(name, TensorInfo { dtype, shape, range });
    }
    Ok((tensors, metadata))
}

/// The weights of a Hugging Face model directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists.
#[derive(Debug)]
pub struct SafetensorsModel {
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsModel {
    /// Opens the weights of the model in `dir`.
    pub fn open_dir(dir: &Path) -> Result<SafetensorsModel, SafetensorsError> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if !index_path.exists() {
            return Self::from_files(vec![SafetensorsFile::open(&single)?]);
        }
        let io = |source| SafetensorsError::Io { path: index_path.clone(), source };
        let corrupt = |reason: String| SafetensorsError::Corrupt { path: index_path.clone(), reason };
        // The index is JSON from anywhere too: its size and its parsed size are bounded first.
        let size = std::fs::metadata(&index_path).map_err(io)?.len();
        if size > MAX_HEADER {
            return Err(corrupt(format!("the index is {size} bytes, more than the {MAX_HEADER} shoal reads")));
        }
        let text = std::fs::read(&index_path).map_err(io)?;
        check_json_cost(&text, "the index").map_err(corrupt)?;
        let json: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| corrupt("no `weight_map` object".into()))?;
        let mut names: BTreeSet<&str> = BTreeSet::new();
        for (tensor, file) in map {
            let tensor = quote(tensor.as_bytes());
            let file = file.as_str().ok_or_else(|| corrupt(format!("`weight_map.{tensor}` is not a string")))?;
            let plain = Path::new(file).file_name().is_some_and(|f| f == std::ffi::OsStr::new(file));
            if !plain {
                return Err(corrupt(format!(
                    "`weight_map.{tensor}` names `{}`, which is not a plain file name",
                    quote(file.as_bytes())
                )));
            }
            names.insert(file);
        }
        let files = names.iter().map(|f| SafetensorsFile::open(&dir.join(f))).collect::<Result<Vec<_>, _>>()?;
        let model = Self::from_files(files)?;
        for (tensor, file) in map {
            let found = model.index.get(tensor).map(|&i| model.files[i].path());
            let file = file.as_str().unwrap_or_default();
            if found != Some(dir.join(file).as_path()) {
                return Err(corrupt(format!(
                    "`{}` is not in `{}` as `weight_map` says",
                    quote(tensor.as_bytes()),
                    quote(file.as_bytes())
                )));
            }
        }
        Ok(model)
    }

    /// Gathers already-open files (a tensor may be in only one of them).
    pub fn from_files(files: Vec<SafetensorsFile>) -> Result<SafetensorsModel, SafetensorsError> {
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.tensors.keys() {
                if let Some(j) = index.insert(name.clone(), i) {
                    return Err(SafetensorsError::Corrupt {
                        path: f.path.clone(),
                        reason: format!("tensor `{}` is also in {}", quote(name.as_bytes()), files[j].path.display()),
                    });
                }
            }
        }
        Ok(SafetensorsModel { files, index })
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).and_then(|&i| self.files[i].tensor(name))
    }

    /// The values of `name` converted to f32.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, SafetensorsError> {
        let &i = self.index.get(name).ok_or_else(|| SafetensorsError::MissingTensor(quote(name.as_bytes())))?;
        self.files[i].tensor_f32(name)
    }

    /// The names of every tensor.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }
}
