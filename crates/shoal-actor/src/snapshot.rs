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
//! A write builds a new generation in a temporary directory, syncs every file and the
//! directory, renames it into place, then replaces `CURRENT` the same way; only then is the
//! previous generation removed. A process killed at any point leaves the previous snapshot
//! intact and readable. A read checks the manifest against `CURRENT`'s checksum, the format
//! and version, and every file's length and CRC-32 before using it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_engine::kv::{KvImage, KvSnapshot};
use shoal_engine::safetensors::{SafetensorsError, SafetensorsFile};
use shoal_host::{
    ContextState, GlobalValue, GraphState, InferState, InstanceState, NnState, Prepared, Runtime, SessionState,
};

/// `format` of every manifest.
pub const FORMAT: &str = "shoal-actor-snapshot";
/// The manifest version written, and the only one read.
pub const VERSION: u32 = 1;

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
    /// There is no snapshot there.
    #[error("no snapshot in {} (no CURRENT file); write one with --save or `shoal snapshot`", dir.display())]
    NotFound {
        /// Where one was looked for.
        dir: PathBuf,
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
    /// Capturing or restoring the instance failed.
    #[error(transparent)]
    Host(#[from] shoal_host::HostError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
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
    history: Vec<u32>,
    kv: FileRef,
}

#[derive(Serialize, Deserialize)]
struct InferRef {
    next: u32,
    opened: Vec<(u32, String)>,
    sessions: Vec<SessionRef>,
}

#[derive(Serialize, Deserialize)]
struct CacheRef {
    context: usize,
    tokens: Vec<u32>,
    kv: FileRef,
}

#[derive(Serialize, Deserialize)]
struct ContextRef {
    handle: u32,
    model: String,
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
    options: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct NnRef {
    next: u32,
    graphs: Vec<GraphRef>,
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
    args: Vec<String>,
    program_name: Option<String>,
    models: Vec<ModelRef>,
    memory: MemoryRef,
    globals: Vec<GlobalRef>,
    infer: InferRef,
    nn: NnRef,
}

fn hex(bytes: &[u8]) -> String {
    shoal_host::instance::hex(bytes)
}

fn unhex(path: &Path, s: &str) -> Result<Vec<u8>, SnapshotError> {
    if !s.len().is_multiple_of(2) {
        return Err(corrupt(path, "odd-length hex string"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| corrupt(path, format!("bad hex `{}`", &s[i..i + 2]))))
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

/// Writes what `fill` writes to `path`, syncs it, and describes it.
fn put_with(path: &Path, fill: impl FnOnce(&mut Summing) -> std::io::Result<()>) -> Result<FileRef, SnapshotError> {
    let f = std::fs::File::create(path).map_err(io(path))?;
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

/// Reads a file the manifest lists, checking its length and checksum.
fn get(dir: &Path, f: &FileRef) -> Result<Vec<u8>, SnapshotError> {
    let path = checked_name(dir, &f.name)?;
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    check_bytes(&path, &bytes, f)?;
    Ok(bytes)
}

fn kv(dir: &Path, f: &FileRef) -> Result<KvSnapshot, SnapshotError> {
    let path = checked_name(dir, &f.name)?;
    // Mapped, checked, then decoded: the bytes are copied once.
    let file = SafetensorsFile::open(&path).map_err(|e| match e {
        SafetensorsError::Io { source, .. } => SnapshotError::Io { path: path.clone(), source },
        other => corrupt(&path, format!("{other} (truncated?)")),
    })?;
    check_bytes(&path, file.bytes(), f)?;
    KvSnapshot::from_file(file).map_err(|e| corrupt(&path, e.to_string()))
}

fn checked_name(dir: &Path, name: &str) -> Result<PathBuf, SnapshotError> {
    if name.contains('/') || name.contains('\\') || name.starts_with('.') {
        return Err(corrupt(dir, format!("file name `{name}` leaves the snapshot")));
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

fn current(dir: &Path) -> Result<Option<(String, u32, u64)>, SnapshotError> {
    let path = dir.join("CURRENT");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let mut w = text.split_whitespace();
    let parsed = (|| {
        let gen_name = w.next()?.to_string();
        let crc = u32::from_str_radix(w.next()?, 16).ok()?;
        let len = w.next()?.parse().ok()?;
        (gen_name.starts_with("gen-") && !gen_name.contains('/')).then_some((gen_name, crc, len))
    })();
    parsed.map(Some).ok_or_else(|| corrupt(&path, format!("`{}` is not `gen-N CRC LEN`", text.trim())))
}

fn generation(name: &str) -> Option<u64> {
    name.strip_prefix("gen-")?.parse().ok()
}

/// Writes `snap` into `dir` atomically and durably (see the module docs).
pub fn write_dir(dir: &Path, snap: &Snapshot) -> Result<WriteReport, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut last = current(dir).ok().flatten().and_then(|(g, _, _)| generation(&g)).unwrap_or(0);
    for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        last = last.max(generation(&e.file_name().to_string_lossy()).unwrap_or(0));
    }
    let gen_name = format!("gen-{:06}", last + 1);
    let tmp = dir.join(format!(".{gen_name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
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
    sync_dir(&tmp)?;
    let dest = dir.join(&gen_name);
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    sync_dir(dir)?;
    // The switch: CURRENT names the new generation and its manifest's checksum.
    let cur_tmp = dir.join(format!(".CURRENT.tmp{}", std::process::id()));
    put(&cur_tmp, format!("{gen_name} {:08x} {}\n", m.crc32, m.bytes).as_bytes())?;
    let cur = dir.join("CURRENT");
    std::fs::rename(&cur_tmp, &cur).map_err(io(&cur))?;
    sync_dir(dir)?;
    // Older generations and leftovers of interrupted writes.
    for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = generation(&name).is_some_and(|g| g <= last) || (name.starts_with(".gen-") && name.contains(".tmp"));
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    report.dir = dest;
    Ok(report)
}

/// Reads the snapshot in `dir`, checking everything (see the module docs).
pub fn read_dir(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let (gen_name, crc, len) = current(dir)?.ok_or_else(|| SnapshotError::NotFound { dir: dir.to_path_buf() })?;
    let g = dir.join(&gen_name);
    let mpath = g.join("manifest.json");
    let json = get(&g, &FileRef { name: "manifest.json".into(), bytes: len, crc32: crc })?;
    let v: serde_json::Value = serde_json::from_slice(&json).map_err(|e| corrupt(&mpath, e.to_string()))?;
    if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(corrupt(&mpath, format!("not a shoal actor snapshot (format {:?})", v.get("format"))));
    }
    let version = v.get("version").and_then(|x| x.as_u64()).unwrap_or(0) as u32;
    if version != VERSION {
        return Err(SnapshotError::Version { path: mpath, found: version });
    }
    let m: Manifest = serde_json::from_value(v).map_err(|e| corrupt(&mpath, e.to_string()))?;
    let page_data = get(&g, &m.memory.file)?;
    let mut pages = Vec::new();
    for [first, count] in &m.memory.nonzero {
        let end = first.checked_add(*count).filter(|&e| u64::from(e) <= m.memory.pages);
        let end = end.ok_or_else(|| corrupt(&mpath, format!("pages {first}+{count} lie past the memory")))?;
        if pages.last().is_some_and(|&l| l >= *first) {
            return Err(corrupt(&mpath, "page runs out of order"));
        }
        pages.extend(*first..end);
    }
    if page_data.len() != pages.len() * shoal_host::instance::PAGE {
        return Err(corrupt(&mpath, format!("{} pages listed, {} bytes of pages", pages.len(), page_data.len())));
    }
    let mut globals = Vec::new();
    for x in &m.globals {
        let bits = u128::from_str_radix(&x.bits, 16).map_err(|_| corrupt(&mpath, format!("global {}", x.index)))?;
        globals.push(GlobalValue { index: x.index, ty: x.ty.clone(), bits });
    }
    let mut sessions = Vec::new();
    for x in &m.infer.sessions {
        let kv = kv(&g, &x.kv)?;
        if kv.len != x.len || x.history.len() < kv.len {
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
    let mut contexts = Vec::new();
    for c in &m.nn.contexts {
        let cache = match &c.cache {
            Some(r) => Some((r.context, r.tokens.clone(), KvImage::Portable(kv(&g, &r.kv)?))),
            None => None,
        };
        contexts.push(ContextState {
            handle: c.handle,
            model: c.model.clone(),
            options: c.options.clone(),
            prompt: c.prompt.as_deref().map(|p| unhex(&mpath, p)).transpose()?,
            output: unhex(&mpath, &c.output)?,
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

/// Where snapshots are kept, by key. A local directory now ([`LocalStore`]); an object store
/// can implement the same.
pub trait SnapshotStore: Send + Sync {
    /// Writes `snap` under `key`, replacing what was there only once it is complete.
    fn put(&self, key: &str, snap: &Snapshot) -> Result<WriteReport, SnapshotError>;
    /// Reads the snapshot under `key`.
    fn get(&self, key: &str) -> Result<Snapshot, SnapshotError>;
    /// The keys held, sorted.
    fn list(&self) -> Result<Vec<String>, SnapshotError>;
    /// Removes `key`'s snapshot.
    fn remove(&self, key: &str) -> Result<(), SnapshotError>;
}

/// Snapshots in directories under a root: key `k` is the snapshot directory `ROOT/k`.
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store under `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore { root: root.into() }
    }

    fn dir(&self, key: &str) -> Result<PathBuf, SnapshotError> {
        let ok = !key.is_empty()
            && !key.starts_with('.')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(corrupt(&self.root, format!("`{key}` is not a snapshot key (letters, digits, - _ .)")));
        }
        Ok(self.root.join(key))
    }
}

impl SnapshotStore for LocalStore {
    fn put(&self, key: &str, snap: &Snapshot) -> Result<WriteReport, SnapshotError> {
        write_dir(&self.dir(key)?, snap)
    }

    fn get(&self, key: &str) -> Result<Snapshot, SnapshotError> {
        read_dir(&self.dir(key)?)
    }

    fn list(&self) -> Result<Vec<String>, SnapshotError> {
        let mut v = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
            Err(e) => return Err(io(&self.root)(e)),
        };
        for e in entries.flatten() {
            if e.path().join("CURRENT").is_file() {
                v.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        v.sort();
        Ok(v)
    }

    fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let d = self.dir(key)?;
        std::fs::remove_dir_all(&d).map_err(io(&d))
    }
}
