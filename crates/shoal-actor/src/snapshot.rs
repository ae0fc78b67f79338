//! Snapshots as plain, versioned data (docs/snapshot.md).
//!
//! A snapshot lives in a directory:
//!
//! ```text
//! DIR/CURRENT                   "gen-000007 <crc32 of the manifest> <its length>"
//! DIR/gen-000007/manifest.json  format, version, module hash, backend, models, sizes, checksums,
//!                               the mutable globals, the sessions' token histories
//! DIR/gen-000007/memory.bin     the non-zero 64 KiB pages of linear memory, in order
//! DIR/gen-000007/kv-*.safetensors  each session's KV cache (format shoal-kv-cache v1)
//! ```
//!
//! A write builds a new generation in a temporary directory of its own, syncs every file and
//! the directory, renames it into place, then replaces `CURRENT` the same way; only then is
//! the previous generation removed. A process killed at any point leaves the previous
//! snapshot intact and readable. Writers of one directory take turns (a lock per directory in
//! the process, and `DIR/.lock` across processes), and a write refuses a directory holding
//! anything it did not write there ([`SnapshotError::NotASnapshotDir`]): it deletes only
//! what shoal wrote. A read takes no lock; it checks the manifest against `CURRENT`'s
//! checksum, the format and version, and every file's length and CRC-32 before using it. A
//! snapshot is input from outside: every size it declares is checked against the limits
//! ([`MAX_MANIFEST_BYTES`], [`MAX_MEMORY_PAGES`], [`MAX_CONTEXT`], [`MAX_ENTRIES`],
//! [`MAX_NAME`]) and against the files' real lengths before anything is allocated for it, and
//! errors never quote the files (`tests/fuzz_snapshot.rs` fuzzes the reader).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use shoal_engine::kv::{KvImage, KvSnapshot, shown};
use shoal_engine::safetensors::SafetensorsError;
use shoal_host::{
    ContextState, GlobalValue, GraphState, InferState, InstanceState, NnState, Prepared, Runtime, SessionState,
};

use crate::store::{DirLock, remove_ours, scan, unique};
pub use crate::store::{LocalStore, MAX_KEY, SnapshotStore, is_snapshot_dir};

/// `format` of every manifest.
pub const FORMAT: &str = "shoal-actor-snapshot";
/// The manifest version written, and the only one read.
pub const VERSION: u32 = 1;

// Limits: a snapshot is input from outside, and every size it declares is checked against
// these and against the files' real lengths before anything is allocated for it
// (docs/snapshot.md, "Limits"). `write_dir` refuses a state beyond them, so that every
// snapshot written can be read back.

/// The largest `manifest.json` read (its length is checked before a byte is read). The
/// manifest holds the token histories, under 8 bytes a token: 64 MiB is dozens of sessions
/// of the longest context.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The largest linear memory, in 64 KiB pages: 65,536 pages are 4 GiB, all a 32-bit
/// memory can address.
pub const MAX_MEMORY_PAGES: u64 = 65_536;
/// The longest context of a session or a wasi-nn context, in positions, and so the longest
/// token history (a history is never longer than its context). 1,048,576 is 8 times the
/// longest context of the models shoal runs (128 Ki positions).
pub const MAX_CONTEXT: usize = 1 << 20;
/// The most entries of every other list of a manifest: arguments, models, open models,
/// globals, sessions, graphs, contexts, and each array or object of a wasi-nn options
/// value. An instance holds at most 256 sessions and 64 graphs and contexts.
pub const MAX_ENTRIES: usize = 65_536;
/// The longest name a manifest gives a file, a model, a fingerprint or a backend.
pub const MAX_NAME: usize = 255;
/// `CURRENT` is `gen-N CRC LEN` and a newline: a few dozen bytes.
const MAX_CURRENT_BYTES: u64 = 256;

/// Errors of snapshots and their stores.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// There is no snapshot there: no `CURRENT` file (a missing key of a store, a directory
    /// that does not exist).
    #[error("no snapshot in {} (no CURRENT file); write one with --save or `shoal snapshot`", dir.display())]
    NotFound {
        /// Where one was looked for.
        dir: PathBuf,
    },
    /// The directory holds something the store does not write there (a user's file, a
    /// `gen-N` folder of other files, a symbolic link): a snapshot is neither written into
    /// it nor is it removed, and nothing in it is touched.
    #[error(
        "{} is not a shoal snapshot directory: `{found}` was not written by shoal (nothing was written or deleted); choose an empty or new directory",
        dir.display()
    )]
    NotASnapshotDir {
        /// The directory.
        dir: PathBuf,
        /// The first entry (by name) the store did not write, relative to `dir`, escaped and
        /// cut to 64 bytes a name.
        found: String,
    },
    /// Not a key of a [`LocalStore`]: keys are 1 to [`MAX_KEY`] ASCII letters, digits, `-`,
    /// `_` and `.`, not starting with `.`.
    #[error(
        "`{key}` is not a snapshot key: {why} (a key is 1 to {MAX_KEY} ASCII letters, digits, `-`, `_` and `.`, not starting with `.`)"
    )]
    BadKey {
        /// The key, escaped and cut to 64 bytes.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// The bytes are not what the snapshot says they are.
    #[error("corrupt snapshot: {}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another format version.
    #[error("{}: snapshot format version {found}; this shoal reads version {VERSION}", path.display())]
    Version {
        /// The manifest.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The snapshot is of another module.
    #[error(
        "the snapshot is of module {expected}, not of this one ({found}); resume it with the module it was taken from"
    )]
    OtherModule {
        /// The snapshot's module hash.
        expected: String,
        /// The module given.
        found: String,
    },
    /// A model the snapshot needs is missing or has other weights.
    #[error("model `{name}`: {reason}")]
    Model {
        /// The model's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The state is beyond what a snapshot holds (see the limits, [`MAX_CONTEXT`] and the
    /// others); written, it could not be read back.
    #[error("cannot write the snapshot to {}: {reason}", path.display())]
    TooLarge {
        /// Where it was to be written.
        path: PathBuf,
        /// What is too large.
        reason: String,
    },
    /// Capturing or restoring the instance failed.
    #[error(transparent)]
    Host(#[from] shoal_host::HostError),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

/// A `Corrupt` error. `reason` may hold file-derived text (a parser's message quoting the
/// JSON): it is escaped and cut to at most 512 bytes, and names from the files are cut to
/// 64 bytes where they are formatted ([`shown`]).
fn corrupt(path: &Path, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt { path: path.to_path_buf(), reason: shown(&reason.into(), 512) }
}

/// A JSON parser's message with the manifest's string it quotes (`invalid type: string
/// "…", expected u32`) cut to 64 bytes; the rest of it (what was expected, the line and
/// column) is the parser's own.
fn json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let Some(at) = msg.find("string \"").map(|i| i + "string \"".len()) else { return msg };
    // The string is written as Rust's `{:?}` writes it: it ends at the first unescaped quote.
    let mut escaped = false;
    let end = msg[at..].char_indices().find(|&(_, c)| {
        let quote = c == '"' && !escaped;
        escaped = c == '\\' && !escaped;
        quote
    });
    match end {
        Some((n, _)) => format!("{}{}{}", &msg[..at], shown(&msg[at..at + n], 64), &msg[at + n..]),
        None => msg,
    }
}

/// Whether `c` may not be printed as it is: a control character, or one that reorders
/// the text around it (bidirectional marks, embeddings, overrides and isolates).
fn odd(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A model a snapshot refers to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Its name (models are named, not devices).
    pub name: String,
    /// [`shoal_host::LoadedModel::fingerprint`] of the weights it was taken with.
    pub fingerprint: String,
}

/// An actor's whole state, in memory.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Hex SHA-256 of the module.
    pub module_sha256: String,
    /// The module's size.
    pub module_size: usize,
    /// The models it uses.
    pub models: Vec<ModelRef>,
    /// When it was taken (milliseconds since the Unix epoch).
    pub created_unix_ms: u64,
    /// The instance.
    pub state: InstanceState,
}

/// What a write did.
#[derive(Clone, Debug, Default)]
pub struct WriteReport {
    /// Bytes written (all files).
    pub bytes: u64,
    /// Bytes of KV caches among them.
    pub kv_bytes: u64,
    /// Bytes of memory pages among them.
    pub memory_bytes: u64,
    /// The generation's directory.
    pub dir: PathBuf,
}

impl Snapshot {
    /// Captures `instance` (quiescent: between messages), naming the weights of every model
    /// it uses. `parked` keeps device caches in the backend's own form (fast to restore on
    /// the same model in this process; converted when written).
    pub fn capture(
        runtime: &Runtime,
        instance: &mut shoal_host::Instance,
        parked: bool,
    ) -> Result<Snapshot, SnapshotError> {
        let state = instance.capture(parked)?;
        let mut models = Vec::new();
        for name in state.model_names() {
            let m =
                runtime.models().get(&name).map_err(|reason| SnapshotError::Model { name: name.clone(), reason })?;
            models.push(ModelRef { name, fingerprint: m.fingerprint().to_string() });
        }
        let created_unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Ok(Snapshot {
            module_sha256: instance.prepared().sha256.clone(),
            module_size: instance.prepared().size,
            models,
            created_unix_ms,
            state,
        })
    }

    /// Checks that this snapshot can be restored as `prepared` on `runtime`'s models.
    pub fn check(&self, runtime: &Runtime, prepared: &Prepared) -> Result<(), SnapshotError> {
        if self.module_sha256 != prepared.sha256 {
            return Err(SnapshotError::OtherModule {
                expected: self.module_sha256.clone(),
                found: prepared.sha256.clone(),
            });
        }
        for m in &self.models {
            let loaded = runtime.models().get(&m.name).map_err(|reason| SnapshotError::Model {
                name: m.name.clone(),
                reason: format!("the snapshot needs it: {reason}"),
            })?;
            if loaded.fingerprint() != m.fingerprint {
                return Err(SnapshotError::Model {
                    name: m.name.clone(),
                    reason: format!(
                        "{} holds other weights than the snapshot was taken with (fingerprint {} vs {})",
                        loaded.path.display(),
                        loaded.fingerprint(),
                        m.fingerprint
                    ),
                });
            }
        }
        Ok(())
    }

    /// Restores the instance on `runtime` (any backend), after [`Snapshot::check`].
    pub fn restore(&self, runtime: &Runtime, prepared: &Arc<Prepared>) -> Result<shoal_host::Instance, SnapshotError> {
        self.check(runtime, prepared)?;
        Ok(runtime.restore(prepared, &self.state)?)
    }

    /// Bytes of linear memory kept (the non-zero pages).
    pub fn memory_bytes(&self) -> usize {
        self.state.page_data.len()
    }

    /// Positions held in KV caches, over all sessions and contexts.
    pub fn kv_positions(&self) -> usize {
        self.state.infer.sessions.iter().map(|s| s.kv.len()).sum::<usize>()
            + self.state.nn.contexts.iter().filter_map(|c| c.cache.as_ref()).map(|c| c.2.len()).sum::<usize>()
    }
}

// ---- the manifest ----
//
// Every list is read by a visitor that refuses it past its limit (`MAX_CONTEXT` tokens,
// `MAX_MEMORY_PAGES` runs, `MAX_ENTRIES` others), so that no list of the manifest grows
// past a few MiB, however long the manifest.

#[derive(Serialize, Deserialize)]
struct FileRef {
    name: String,
    bytes: u64,
    crc32: u32,
}

#[derive(Serialize, Deserialize)]
struct ModuleRef {
    sha256: String,
    size: usize,
}

#[derive(Serialize, Deserialize)]
struct MemoryRef {
    /// The memory's size in pages.
    pages: u64,
    /// Runs of non-zero pages: `[first, count]`.
    #[serde(deserialize_with = "page_runs")]
    nonzero: Vec<[u32; 2]>,
    file: FileRef,
}

#[derive(Serialize, Deserialize)]
struct GlobalRef {
    index: u32,
    #[serde(rename = "type")]
    ty: String,
    /// Hex bits.
    bits: String,
}

#[derive(Serialize, Deserialize)]
struct SessionRef {
    handle: u32,
    model: String,
    context: usize,
    step: u64,
    /// Positions in the cache.
    len: usize,
    #[serde(deserialize_with = "tokens")]
    history: Vec<u32>,
    kv: FileRef,
}

#[derive(Serialize, Deserialize)]
struct InferRef {
    next: u32,
    #[serde(deserialize_with = "entries")]
    opened: Vec<(u32, String)>,
    #[serde(deserialize_with = "entries")]
    sessions: Vec<SessionRef>,
}

#[derive(Serialize, Deserialize)]
struct CacheRef {
    context: usize,
    #[serde(deserialize_with = "tokens")]
    tokens: Vec<u32>,
    kv: FileRef,
}

#[derive(Serialize, Deserialize)]
struct ContextRef {
    handle: u32,
    model: String,
    #[serde(deserialize_with = "options")]
    options: serde_json::Value,
    /// Hex bytes.
    prompt: Option<String>,
    /// Hex bytes.
    output: String,
    counts: [usize; 3],
    cache: Option<CacheRef>,
}

#[derive(Serialize, Deserialize)]
struct GraphRef {
    handle: u32,
    model: String,
    #[serde(deserialize_with = "options")]
    options: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct NnRef {
    next: u32,
    #[serde(deserialize_with = "entries")]
    graphs: Vec<GraphRef>,
    #[serde(deserialize_with = "entries")]
    contexts: Vec<ContextRef>,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    created_unix_ms: u64,
    module: ModuleRef,
    /// The engine the caches were on when taken (informative: any backend restores).
    backend: String,
    #[serde(deserialize_with = "entries")]
    args: Vec<String>,
    program_name: Option<String>,
    #[serde(deserialize_with = "entries")]
    models: Vec<ModelRef>,
    memory: MemoryRef,
    #[serde(deserialize_with = "entries")]
    globals: Vec<GlobalRef>,
    infer: InferRef,
    nn: NnRef,
}

/// A JSON array of at most `max` elements, refused at the first one past it.
fn at_most<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error> {
    struct Bounded<T> {
        max: usize,
        what: &'static str,
        t: std::marker::PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an array of at most {} {}", self.max, self.what)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut v = Vec::new();
            while let Some(x) = seq.next_element()? {
                if v.len() == self.max {
                    return Err(A::Error::custom(format!("more than {} {}", self.max, self.what)));
                }
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(Bounded { max, what, t: std::marker::PhantomData })
}

fn tokens<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    at_most(d, MAX_CONTEXT, "tokens (the longest context a snapshot holds)")
}

fn page_runs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u32; 2]>, D::Error> {
    at_most(d, MAX_MEMORY_PAGES as usize, "page runs")
}

fn entries<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    at_most(d, MAX_ENTRIES, "entries")
}

/// A wasi-nn options value: any JSON, each array or object of at most [`MAX_ENTRIES`]
/// entries (a `serde_json::Value` would grow one array of the manifest's length).
fn options<'de, D: Deserializer<'de>>(d: D) -> Result<serde_json::Value, D::Error> {
    struct Json;
    impl<'de> serde::de::DeserializeSeed<'de> for Json {
        type Value = serde_json::Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<serde_json::Value, D::Error> {
            d.deserialize_any(Json)
        }
    }
    impl<'de> Visitor<'de> for Json {
        type Value = serde_json::Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a JSON value whose arrays and objects have at most {MAX_ENTRIES} entries")
        }
        fn visit_bool<E>(self, v: bool) -> Result<serde_json::Value, E> {
            Ok(v.into())
        }
        fn visit_i64<E>(self, v: i64) -> Result<serde_json::Value, E> {
            Ok(v.into())
        }
        fn visit_u64<E>(self, v: u64) -> Result<serde_json::Value, E> {
            Ok(v.into())
        }
        fn visit_f64<E>(self, v: f64) -> Result<serde_json::Value, E> {
            Ok(v.into())
        }
        fn visit_str<E>(self, v: &str) -> Result<serde_json::Value, E> {
            Ok(v.into())
        }
        fn visit_string<E>(self, v: String) -> Result<serde_json::Value, E> {
            Ok(v.into())
        }
        fn visit_unit<E>(self) -> Result<serde_json::Value, E> {
            Ok(serde_json::Value::Null)
        }
        fn visit_none<E>(self) -> Result<serde_json::Value, E> {
            Ok(serde_json::Value::Null)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<serde_json::Value, D::Error> {
            d.deserialize_any(Json)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<serde_json::Value, A::Error> {
            let mut v = Vec::new();
            while let Some(x) = seq.next_element_seed(Json)? {
                if v.len() == MAX_ENTRIES {
                    return Err(A::Error::custom(format!("an options array of more than {MAX_ENTRIES} entries")));
                }
                v.push(x);
            }
            Ok(serde_json::Value::Array(v))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<serde_json::Value, A::Error> {
            let mut m = serde_json::Map::new();
            while let Some(k) = map.next_key::<String>()? {
                if m.len() == MAX_ENTRIES {
                    return Err(A::Error::custom(format!("an options object of more than {MAX_ENTRIES} entries")));
                }
                let v = map.next_value_seed(Json)?;
                m.insert(k, v);
            }
            Ok(serde_json::Value::Object(m))
        }
    }
    d.deserialize_any(Json)
}

/// The two fields of a manifest read first, so that another format or version is named as
/// such (and not as whatever else of it this version would not understand).
#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    format: Option<Seen>,
    #[serde(default)]
    version: Option<Seen>,
}

/// A JSON value read only to be compared and described: a short string, a number, or what
/// kind of value it was (its contents skipped, not kept).
enum Seen {
    /// A string of at most 64 bytes.
    Str(String),
    /// A longer string, of this many bytes.
    Long(usize),
    /// A non-negative integer.
    Num(u64),
    /// Anything else.
    Other(&'static str),
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Str(s) => write!(f, "\"{}\"", shown(s, 64)),
            Seen::Long(n) => write!(f, "a string of {n} bytes"),
            Seen::Num(n) => write!(f, "{n}"),
            Seen::Other(what) => f.write_str(what),
        }
    }
}

impl<'de> Deserialize<'de> for Seen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Seen, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Seen;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Seen, E> {
                Ok(Seen::Other("a boolean"))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Seen, E> {
                Ok(u64::try_from(v).map_or(Seen::Other("a negative number"), Seen::Num))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Seen, E> {
                Ok(Seen::Num(v))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Seen, E> {
                Ok(Seen::Other("a fraction"))
            }
            fn visit_str<E>(self, v: &str) -> Result<Seen, E> {
                Ok(if v.len() <= 64 { Seen::Str(v.to_string()) } else { Seen::Long(v.len()) })
            }
            fn visit_unit<E>(self) -> Result<Seen, E> {
                Ok(Seen::Other("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Seen, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Seen::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Seen, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Seen::Other("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

fn hex(bytes: &[u8]) -> String {
    shoal_host::instance::hex(bytes)
}

/// Hex to bytes (`what` names the field in errors; the text itself is not quoted).
fn unhex(path: &Path, what: &str, s: &str) -> Result<Vec<u8>, SnapshotError> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return Err(corrupt(path, format!("{what}: odd-length hex string")));
    }
    let digit = |c: u8| char::from(c).to_digit(16);
    s.chunks_exact(2)
        .enumerate()
        .map(|(i, p)| match (digit(p[0]), digit(p[1])) {
            (Some(h), Some(l)) => Ok((h * 16 + l) as u8),
            _ => Err(corrupt(path, format!("{what}: not hex at offset {}", 2 * i))),
        })
        .collect()
}

fn runs(pages: &[u32]) -> Vec<[u32; 2]> {
    let mut out: Vec<[u32; 2]> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some(r) if r[0] + r[1] == p => r[1] += 1,
            _ => out.push([p, 1]),
        }
    }
    out
}

/// Writes `bytes` to `path` and syncs it.
fn put(path: &Path, bytes: &[u8]) -> Result<FileRef, SnapshotError> {
    put_with(path, |w| w.write_all(bytes))
}

/// A writer that counts and checksums what passes through it, and starts the disk's
/// writeback of every [`WRITEBACK`] bytes as they are written (Linux `sync_file_range`), so
/// that the final `fsync` waits for little more than the last of them.
struct Summing {
    inner: std::fs::File,
    crc: crc32fast::Hasher,
    bytes: u64,
    /// Bytes whose writeback has been started.
    kicked: u64,
}

const WRITEBACK: u64 = 8 << 20;

impl Write for Summing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.bytes += n as u64;
        if self.bytes - self.kicked >= WRITEBACK {
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                // SAFETY: a plain system call on a file descriptor this writer owns; it only
                // starts writeback of pages already written (an error changes nothing).
                unsafe {
                    libc::sync_file_range(
                        self.inner.as_raw_fd(),
                        self.kicked as i64,
                        (self.bytes - self.kicked) as i64,
                        libc::SYNC_FILE_RANGE_WRITE,
                    )
                };
            }
            self.kicked = self.bytes;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes what `fill` writes to `path`, a new file (never one that exists: a write only
/// makes files of its own), syncs it, and describes it.
fn put_with(path: &Path, fill: impl FnOnce(&mut Summing) -> std::io::Result<()>) -> Result<FileRef, SnapshotError> {
    let f = std::fs::File::create_new(path).map_err(io(path))?;
    let mut w = Summing { inner: f, crc: crc32fast::Hasher::new(), bytes: 0, kicked: 0 };
    fill(&mut w).map_err(io(path))?;
    w.inner.sync_all().map_err(io(path))?;
    Ok(FileRef {
        name: path.file_name().expect("a file name").to_string_lossy().into_owned(),
        bytes: w.bytes,
        crc32: w.crc.finalize(),
    })
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Opens a file a snapshot lists and checks, before a byte is read, that it is a regular
/// file (a pipe or a device could block or never end) of `bytes` bytes.
fn open_sized(path: &Path, bytes: u64) -> Result<std::fs::File, SnapshotError> {
    let file = open_regular(path).map_err(io(path))?.map_err(|reason| corrupt(path, reason))?;
    let len = file.metadata().map_err(io(path))?.len();
    if len != bytes {
        return Err(corrupt(path, format!("{len} bytes; the snapshot lists {bytes} (truncated?)")));
    }
    Ok(file)
}

/// Opens `path` for reading if it is a regular file (without blocking on a FIFO).
fn open_regular(path: &Path) -> std::io::Result<Result<std::fs::File, &'static str>> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO for reading blocks until a writer comes; non-blocking, it does not.
        // Reads of a regular file ignore the flag.
        o.custom_flags(libc::O_NONBLOCK);
    }
    let file = o.open(path)?;
    Ok(if file.metadata()?.is_file() { Ok(file) } else { Err("not a regular file") })
}

/// Reads a file the manifest lists, checking its length before reading it and its checksum
/// after.
fn get(dir: &Path, f: &FileRef) -> Result<Vec<u8>, SnapshotError> {
    let path = checked_name(dir, &f.name)?;
    let file = open_sized(&path, f.bytes)?;
    // The length is the file's (checked above), so the buffer is made once, at its size.
    let mut bytes = Vec::with_capacity(usize::try_from(f.bytes).unwrap_or(0));
    file.take(f.bytes).read_to_end(&mut bytes).map_err(io(&path))?;
    check_bytes(&path, &bytes, f)?;
    Ok(bytes)
}

fn kv(dir: &Path, f: &FileRef) -> Result<KvSnapshot, SnapshotError> {
    let path = checked_name(dir, &f.name)?;
    drop(open_sized(&path, f.bytes)?);
    let err = |e: SafetensorsError, open: bool| match e {
        SafetensorsError::Io { source, .. } => SnapshotError::Io { path: path.clone(), source },
        other if open => corrupt(&path, format!("{other} (truncated?)")),
        other => corrupt(&path, other.to_string()),
    };
    // Mapped (its header checked and parsed, no larger than KvSnapshot::MAX_HEADER), its
    // bytes checked, then decoded, each tensor into one buffer of its length in the file.
    let file = KvSnapshot::open(&path).map_err(|e| err(e, true))?;
    check_bytes(&path, file.bytes(), f)?;
    KvSnapshot::from_file(file).map_err(|e| err(e, false))
}

/// `dir/name` for a plain file name of a snapshot: letters, digits, `-`, `_` and `.`, not
/// first, at most [`MAX_NAME`] bytes (what `write_dir` writes: `memory.bin`,
/// `kv-session-H.safetensors`, `kv-nn-H.safetensors`).
fn checked_name(dir: &Path, name: &str) -> Result<PathBuf, SnapshotError> {
    let plain = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !plain {
        return Err(corrupt(dir, format!("file name `{}` is not a plain file name of the snapshot", shown(name, 64))));
    }
    Ok(dir.join(name))
}

fn check_bytes(path: &Path, bytes: &[u8], f: &FileRef) -> Result<(), SnapshotError> {
    if bytes.len() as u64 != f.bytes {
        return Err(corrupt(path, format!("{} bytes; the manifest says {} (truncated?)", bytes.len(), f.bytes)));
    }
    let crc = crc32fast::hash(bytes);
    if crc != f.crc32 {
        return Err(corrupt(path, format!("CRC-32 {crc:08x}; the manifest says {:08x}", f.crc32)));
    }
    Ok(())
}

/// `CURRENT`: the generation's name, its manifest's CRC-32 and length; `None` without one.
pub(crate) fn current(dir: &Path) -> Result<Option<(String, u32, u64)>, SnapshotError> {
    let path = dir.join("CURRENT");
    let file = match open_regular(&path) {
        Ok(f) => f.map_err(|reason| corrupt(&path, reason))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_CURRENT_BYTES + 1).read_to_end(&mut bytes).map_err(io(&path))?;
    if bytes.len() as u64 > MAX_CURRENT_BYTES {
        return Err(corrupt(&path, format!("longer than {MAX_CURRENT_BYTES} bytes; it is `gen-N CRC LEN`")));
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut w = text.split_whitespace();
    let parsed = (|| {
        let gen_name = w.next()?.to_string();
        let crc = u32::from_str_radix(w.next()?, 16).ok()?;
        let len = w.next()?.parse().ok()?;
        let plain = gen_name.len() <= 24 && generation(&gen_name).is_some() && !gen_name[4..].starts_with('+');
        (plain && w.next().is_none()).then_some((gen_name, crc, len))
    })();
    parsed.map(Some).ok_or_else(|| corrupt(&path, format!("`{}` is not `gen-N CRC LEN`", shown(text.trim(), 64))))
}

/// `N` of a generation's name `gen-N`: 1 to 20 decimal digits (no sign).
pub(crate) fn generation(name: &str) -> Option<u64> {
    let n = name.strip_prefix("gen-")?;
    if n.is_empty() || n.len() > 20 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Writes `snap` into `dir` atomically and durably (see the module docs). `dir` is created if
/// it does not exist; one that exists must be empty or a shoal snapshot directory (it holds
/// nothing but `CURRENT` reading `gen-N CRC LEN`, `.lock`, `gen-N` directories of snapshot
/// files and leftovers of interrupted writes), otherwise the write is refused with
/// [`SnapshotError::NotASnapshotDir`] before anything is written or deleted.
///
/// Writers of one directory take turns: a write holds the directory's lock (within the
/// process, by its canonical path; across processes, an exclusive lock of `DIR/.lock`) from
/// its first look at the directory until its last deletion. The new generation is built in a
/// temporary directory of its own (`.gen-N.tmpPID-C`, made with `create_dir`), renamed to
/// the first `gen-N` past every generation there, never onto one; `CURRENT` is switched to
/// it, and only then are the older generations and leftovers removed.
pub fn write_dir(dir: &Path, snap: &Snapshot) -> Result<WriteReport, SnapshotError> {
    check_limits(dir, &snap.state)?;
    // Refused before anything is written (the lock file included).
    scan(dir)?.refuse(dir)?;
    let _lock = DirLock::write(dir)?;
    // Again, holding the lock: what is seen now stays so (but for another program's doing).
    let found = scan(dir)?;
    found.refuse(dir)?;
    let named = current(dir).ok().flatten().and_then(|(g, _, _)| generation(&g)).unwrap_or(0);
    let last = found.generations.iter().map(|&(n, _)| n).max().unwrap_or(0).max(named);

    // The new generation, in a temporary directory no one else has.
    let mut tmp = dir.join(format!(".gen-{:06}.tmp{}", last + 1, unique()));
    loop {
        match std::fs::create_dir(&tmp) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                tmp = dir.join(format!(".gen-{:06}.tmp{}", last + 1, unique()));
            }
            Err(e) => return Err(io(&tmp)(e)),
        }
    }
    let written = write_generation(&tmp, snap).and_then(|w| {
        sync_dir(&tmp)?;
        Ok(w)
    });
    let (m, mut report) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = remove_ours(&tmp, true);
            return Err(e);
        }
    };
    // Renamed to the first free `gen-N` past the others (a rename onto an empty directory
    // would replace it: each name is looked at first).
    let mut n = last + 1;
    let (gen_name, dest) = loop {
        let gen_name = format!("gen-{n:06}");
        let dest = dir.join(&gen_name);
        let taken = match std::fs::symlink_metadata(&dest) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                let _ = remove_ours(&tmp, true);
                return Err(io(&dest)(e));
            }
        };
        if !taken {
            match std::fs::rename(&tmp, &dest) {
                Ok(()) => break (gen_name, dest),
                Err(e)
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::AlreadyExists
                            | std::io::ErrorKind::DirectoryNotEmpty
                            | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    let _ = remove_ours(&tmp, true);
                    return Err(io(&dest)(e));
                }
                Err(_) => {}
            }
        }
        n += 1;
    };
    // The switch: CURRENT names the new generation and its manifest's checksum. Until the
    // rename, a failure leaves the previous snapshot as it was (the new generation goes).
    let cur_tmp = dir.join(format!(".CURRENT.tmp{}", unique()));
    let cur = dir.join("CURRENT");
    let switched = sync_dir(dir)
        .and_then(|()| put(&cur_tmp, format!("{gen_name} {:08x} {}\n", m.crc32, m.bytes).as_bytes()))
        .and_then(|_| std::fs::rename(&cur_tmp, &cur).map_err(io(&cur)));
    if let Err(e) = switched {
        let _ = remove_ours(&cur_tmp, false);
        let _ = remove_ours(&dest, true);
        return Err(e);
    }
    sync_dir(dir)?;
    // Older generations and leftovers of interrupted writes: only what the store wrote (a
    // generation holding anything else stays, and so does anything else).
    match scan(dir) {
        Ok(now) => {
            let older = now.generations.iter().filter(|&&(g, _)| g < n).map(|(_, name)| (name, true));
            let leftovers = now.leftovers.iter().map(|name| (name, name.starts_with(".gen-")));
            for (name, is_dir) in older.chain(leftovers) {
                if let Err(e) = remove_ours(&dir.join(name), is_dir) {
                    log::warn!("the snapshot is written, but an older one was not removed: {e}");
                }
            }
        }
        Err(e) => log::warn!("the snapshot is written, but older ones were not removed: {e}"),
    }
    report.dir = dest;
    Ok(report)
}

/// Writes the files of a generation into `tmp` (made empty by the caller) and syncs each;
/// returns the manifest's description and what was written.
fn write_generation(tmp: &Path, snap: &Snapshot) -> Result<(FileRef, WriteReport), SnapshotError> {
    let mut report = WriteReport::default();

    let s = &snap.state;
    let memory = put(&tmp.join("memory.bin"), &s.page_data)?;
    report.memory_bytes = memory.bytes;
    let mut kv_file = |name: String, kv: &KvImage| -> Result<FileRef, SnapshotError> {
        let f = put_with(&tmp.join(name), |w| kv.write_safetensors(w))?;
        report.kv_bytes += f.bytes;
        Ok(f)
    };
    let mut sessions = Vec::new();
    for x in &s.infer.sessions {
        sessions.push(SessionRef {
            handle: x.handle,
            model: x.model.clone(),
            context: x.context,
            step: x.step,
            len: x.kv.len(),
            history: x.history.clone(),
            kv: kv_file(format!("kv-session-{}.safetensors", x.handle), &x.kv)?,
        });
    }
    let mut contexts = Vec::new();
    for c in &s.nn.contexts {
        let cache = match &c.cache {
            Some((context, tokens, kv)) => Some(CacheRef {
                context: *context,
                tokens: tokens.clone(),
                kv: kv_file(format!("kv-nn-{}.safetensors", c.handle), kv)?,
            }),
            None => None,
        };
        contexts.push(ContextRef {
            handle: c.handle,
            model: c.model.clone(),
            options: c.options.clone(),
            prompt: c.prompt.as_deref().map(hex),
            output: hex(&c.output),
            counts: c.counts,
            cache,
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        created_unix_ms: snap.created_unix_ms,
        module: ModuleRef { sha256: snap.module_sha256.clone(), size: snap.module_size },
        backend: s.backend.clone(),
        args: s.args.clone(),
        program_name: s.program_name.clone(),
        models: snap.models.clone(),
        memory: MemoryRef { pages: s.memory_pages, nonzero: runs(&s.pages), file: memory },
        globals: s
            .globals
            .iter()
            .map(|g| GlobalRef { index: g.index, ty: g.ty.clone(), bits: format!("{:x}", g.bits) })
            .collect(),
        infer: InferRef { next: s.infer.next, opened: s.infer.opened.clone(), sessions },
        nn: NnRef {
            next: s.nn.next,
            graphs: s
                .nn
                .graphs
                .iter()
                .map(|g| GraphRef { handle: g.handle, model: g.model.clone(), options: g.options.clone() })
                .collect(),
            contexts,
        },
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    let m = put(&tmp.join("manifest.json"), &json)?;
    report.bytes = report.kv_bytes + report.memory_bytes + m.bytes;
    Ok((m, report))
}

/// Reads the snapshot in `dir`, checking everything (see the module docs): every size the
/// manifest declares is checked against the limits (`MAX_*`) and against the files' real
/// lengths before anything is allocated for it, and errors never quote the files.
///
/// It takes no lock: a write switches `CURRENT` by a rename, so a read sees one whole
/// generation or another. Should a write remove the generation being read (it had been
/// replaced), its files go missing: the read starts again on the generation `CURRENT` names
/// now.
pub fn read_dir(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let mut tries = 0;
    loop {
        let cur = current(dir)?.ok_or_else(|| SnapshotError::NotFound { dir: dir.to_path_buf() })?;
        match read_generation(dir, &cur) {
            Err(SnapshotError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound
                    && tries < 64
                    && current(dir).ok().flatten().is_some_and(|now| now != cur) =>
            {
                tries += 1;
            }
            r => return r,
        }
    }
}

/// Reads the generation `CURRENT` names (its name, its manifest's CRC-32 and length).
fn read_generation(dir: &Path, (gen_name, crc, len): &(String, u32, u64)) -> Result<Snapshot, SnapshotError> {
    let (crc, len) = (*crc, *len);
    let g = dir.join(gen_name);
    let mpath = g.join("manifest.json");
    if len > MAX_MANIFEST_BYTES {
        return Err(corrupt(
            &dir.join("CURRENT"),
            format!("names a manifest of {len} bytes; a manifest has at most {MAX_MANIFEST_BYTES}"),
        ));
    }
    let json = get(&g, &FileRef { name: "manifest.json".into(), bytes: len, crc32: crc })?;
    let bad_json = |e: serde_json::Error| corrupt(&mpath, json_error(&e));
    let probe: Probe = serde_json::from_slice(&json).map_err(bad_json)?;
    match &probe.format {
        Some(Seen::Str(f)) if f == FORMAT => {}
        other => {
            let found = other.as_ref().map_or("none".to_string(), Seen::to_string);
            return Err(corrupt(&mpath, format!("not a shoal actor snapshot (format {found})")));
        }
    }
    match probe.version {
        Some(Seen::Num(n)) if n == u64::from(VERSION) => {}
        Some(Seen::Num(n)) => {
            return Err(SnapshotError::Version { path: mpath, found: u32::try_from(n).unwrap_or(u32::MAX) });
        }
        _ => return Err(SnapshotError::Version { path: mpath, found: 0 }),
    }
    let m: Manifest = serde_json::from_slice(&json).map_err(bad_json)?;
    drop(json);
    // Everything the manifest declares is checked before another file is opened.
    let pages = check_manifest(&mpath, &m)?;
    let page_data = get(&g, &m.memory.file)?;
    let mut globals = Vec::with_capacity(m.globals.len());
    for x in &m.globals {
        let bits = u128::from_str_radix(&x.bits, 16)
            .ok()
            .filter(|_| !x.bits.starts_with('+'))
            .ok_or_else(|| corrupt(&mpath, format!("global {}: its bits are not hex", x.index)))?;
        globals.push(GlobalValue { index: x.index, ty: x.ty.clone(), bits });
    }
    let mut sessions = Vec::with_capacity(m.infer.sessions.len());
    for x in &m.infer.sessions {
        let kv = kv(&g, &x.kv)?;
        if kv.len != x.len {
            return Err(corrupt(
                &mpath,
                format!("session {}: {} positions cached, {} listed", x.handle, kv.len, x.len),
            ));
        }
        sessions.push(SessionState {
            handle: x.handle,
            model: x.model.clone(),
            context: x.context,
            history: x.history.clone(),
            step: x.step,
            kv: KvImage::Portable(kv),
        });
    }
    let mut contexts = Vec::with_capacity(m.nn.contexts.len());
    for c in &m.nn.contexts {
        let cache = match &c.cache {
            Some(r) => {
                let kv = kv(&g, &r.kv)?;
                if kv.len > r.context {
                    return Err(corrupt(
                        &mpath,
                        format!(
                            "wasi-nn context {}: {} positions cached in a context of {}",
                            c.handle, kv.len, r.context
                        ),
                    ));
                }
                Some((r.context, r.tokens.clone(), KvImage::Portable(kv)))
            }
            None => None,
        };
        let what = format!("wasi-nn context {}", c.handle);
        contexts.push(ContextState {
            handle: c.handle,
            model: c.model.clone(),
            options: c.options.clone(),
            prompt: c.prompt.as_deref().map(|p| unhex(&mpath, &format!("{what}: prompt"), p)).transpose()?,
            output: unhex(&mpath, &format!("{what}: output"), &c.output)?,
            counts: c.counts,
            cache,
        });
    }
    let graphs =
        m.nn.graphs
            .iter()
            .map(|x| GraphState { handle: x.handle, model: x.model.clone(), options: x.options.clone() })
            .collect();
    Ok(Snapshot {
        module_sha256: m.module.sha256,
        module_size: m.module.size,
        models: m.models,
        created_unix_ms: m.created_unix_ms,
        state: InstanceState {
            args: m.args,
            program_name: m.program_name,
            memory_pages: m.memory.pages,
            pages,
            page_data,
            globals,
            infer: InferState { opened: m.infer.opened, sessions, next: m.infer.next },
            nn: NnState { graphs, contexts, next: m.nn.next },
            backend: m.backend,
        },
    })
}

/// Checks every size and name the manifest declares, against the limits and against each
/// other, before any file it lists is read; returns the non-zero pages' indices.
fn check_manifest(path: &Path, m: &Manifest) -> Result<Vec<u32>, SnapshotError> {
    let bad = |reason: String| corrupt(path, reason);
    // Names that later errors (restore's) quote: short, no control characters.
    let name = |what: &str, s: &str| {
        if s.is_empty() || s.len() > MAX_NAME || s.chars().any(odd) {
            return Err(bad(format!("{what} `{}` is not a name of 1 to {MAX_NAME} printable bytes", shown(s, 64))));
        }
        Ok(())
    };
    let sha = &m.module.sha256;
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("the module's SHA-256 `{}` is not 64 hex digits", shown(sha, 64))));
    }
    name("the backend", &m.backend)?;
    for x in &m.models {
        name("a model", &x.name)?;
        name("a model's fingerprint", &x.fingerprint)?;
    }
    for x in &m.globals {
        if !matches!(x.ty.as_str(), "i32" | "i64" | "f32" | "f64" | "v128") {
            return Err(bad(format!("global {}: type `{}` is not a Wasm value type", x.index, shown(&x.ty, 16))));
        }
    }
    for (_, model) in &m.infer.opened {
        name("an open model", model)?;
    }
    for x in &m.infer.sessions {
        let h = x.handle;
        name("a session's model", &x.model)?;
        if x.context == 0 || x.context > MAX_CONTEXT {
            return Err(bad(format!(
                "session {h}: a context of {} positions; a snapshot holds 1 to {MAX_CONTEXT}",
                x.context
            )));
        }
        if x.len > x.context || x.history.len() > x.context || x.history.len() < x.len {
            return Err(bad(format!(
                "session {h}: {} positions cached and {} tokens of history in a context of {}",
                x.len,
                x.history.len(),
                x.context
            )));
        }
    }
    for x in &m.nn.graphs {
        name("a wasi-nn graph's model", &x.model)?;
    }
    for c in &m.nn.contexts {
        name("a wasi-nn context's model", &c.model)?;
        if let Some(r) = &c.cache
            && (r.context == 0 || r.context > MAX_CONTEXT || r.tokens.len() > r.context)
        {
            return Err(bad(format!(
                "wasi-nn context {}: {} tokens in a context of {} positions; a snapshot holds 1 to {MAX_CONTEXT}",
                c.handle,
                r.tokens.len(),
                r.context
            )));
        }
    }
    // The memory: its size, then the runs, in order and inside it, counted before the list of
    // pages is made; the page file's declared length must be that count of pages.
    let mem = &m.memory;
    if mem.pages > MAX_MEMORY_PAGES {
        return Err(bad(format!(
            "a memory of {} pages; a snapshot holds at most {MAX_MEMORY_PAGES} (4 GiB)",
            mem.pages
        )));
    }
    let (mut total, mut next) = (0u64, 0u64);
    for &[first, count] in &mem.nonzero {
        let end = u64::from(first) + u64::from(count);
        if count == 0 || u64::from(first) < next {
            return Err(bad(format!("page runs out of order (pages {first}+{count})")));
        }
        if end > mem.pages {
            return Err(bad(format!("pages {first}+{count} lie past the memory ({} pages)", mem.pages)));
        }
        total += u64::from(count);
        next = end;
    }
    if total * shoal_host::instance::PAGE as u64 != mem.file.bytes {
        return Err(bad(format!("{total} pages listed, {} bytes of pages", mem.file.bytes)));
    }
    let mut pages = Vec::with_capacity(total as usize);
    for &[first, count] in &mem.nonzero {
        pages.extend(first..first + count);
    }
    Ok(pages)
}

/// Refuses to write a state that [`read_dir`] would refuse for its size.
fn check_limits(path: &Path, s: &InstanceState) -> Result<(), SnapshotError> {
    let too_large = |reason: String| Err(SnapshotError::TooLarge { path: path.to_path_buf(), reason });
    if s.memory_pages > MAX_MEMORY_PAGES {
        return too_large(format!("a memory of {} pages; a snapshot holds at most {MAX_MEMORY_PAGES}", s.memory_pages));
    }
    let lists = [
        ("arguments", s.args.len()),
        ("globals", s.globals.len()),
        ("open models", s.infer.opened.len()),
        ("sessions", s.infer.sessions.len()),
        ("wasi-nn graphs", s.nn.graphs.len()),
        ("wasi-nn contexts", s.nn.contexts.len()),
    ];
    for (what, n) in lists {
        if n > MAX_ENTRIES {
            return too_large(format!("{n} {what}; a snapshot holds at most {MAX_ENTRIES}"));
        }
    }
    let contexts = s.infer.sessions.iter().map(|x| (x.handle, x.context, x.history.len()));
    let caches = s.nn.contexts.iter().filter_map(|c| c.cache.as_ref().map(|(n, t, _)| (c.handle, *n, t.len())));
    for (handle, context, tokens) in contexts.chain(caches) {
        if context > MAX_CONTEXT || tokens > MAX_CONTEXT {
            return too_large(format!(
                "handle {handle}: a context of {context} positions and {tokens} tokens; a snapshot holds at most {MAX_CONTEXT}"
            ));
        }
    }
    Ok(())
}
