//! Where snapshots are kept ([`SnapshotStore`], [`LocalStore`]), and the rules of a snapshot
//! directory that every writer follows (docs/snapshot.md, "Writers and locks"):
//!
//! - **one writer at a time**: a write or a removal holds [`DirLock`] (a lock per canonical
//!   directory within the process, and an exclusive `flock` of `DIR/.lock` across processes)
//!   from its first look at the directory to its last deletion. Readers take no lock:
//!   `CURRENT` is switched by a rename, and a generation appears whole, by a rename too;
//! - **only what shoal wrote is replaced or deleted**: [`scan`] sorts a directory's entries
//!   into those the store writes (`CURRENT` reading `gen-N CRC LEN`, or damaged beside
//!   `.lock`; `.lock`; `gen-N` directories holding only snapshot files; leftovers of
//!   interrupted writes) and the first one it does not write; a directory holding one is
//!   refused ([`SnapshotError::NotASnapshotDir`]), and a removal never follows a symbolic
//!   link.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use shoal_engine::kv::shown;

use crate::snapshot::{Snapshot, SnapshotError, WriteReport, current, generation, io, read_dir, write_dir};

/// The lock file of a snapshot directory.
pub(crate) const LOCK: &str = ".lock";

/// The longest key of a [`LocalStore`].
pub const MAX_KEY: usize = 128;

// ---- what a snapshot directory may hold ----

/// What [`scan`] found in a directory.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Whether the directory exists.
    pub exists: bool,
    /// Whether it holds a `CURRENT` file.
    pub current: bool,
    /// Whether it holds the lock file.
    pub lock: bool,
    /// Its generations: number and name.
    pub generations: Vec<(u64, String)>,
    /// Leftovers of interrupted writes: temporary generations and `CURRENT` files.
    pub leftovers: Vec<String>,
    /// The first entry (by name) the store does not write, as errors show it.
    pub foreign: Option<String>,
}

impl Scan {
    /// The error for a directory holding [`Scan::foreign`], if it does.
    pub fn refuse(&self, dir: &Path) -> Result<(), SnapshotError> {
        match &self.foreign {
            Some(found) => Err(SnapshotError::NotASnapshotDir { dir: dir.to_path_buf(), found: found.clone() }),
            None => Ok(()),
        }
    }
}

/// Sorts the entries of `dir` (see the module docs). A directory that does not exist is an
/// empty scan (`exists` false). Nothing is followed: a symbolic link, whatever its name, is
/// an entry the store does not write.
pub(crate) fn scan(dir: &Path) -> Result<Scan, SnapshotError> {
    let mut scan = Scan::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(io(dir)(e)),
    };
    scan.exists = true;
    let mut names = Vec::new();
    for e in entries {
        names.push(e.map_err(io(dir))?.file_name());
    }
    names.sort();
    let mut garbled = false;
    for name in names {
        let path = dir.join(&name);
        let md = match std::fs::symlink_metadata(&path) {
            Ok(md) => md,
            // Gone since it was listed (a leftover removed by another writer).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        let shown_name = || shown(&name.to_string_lossy(), 64);
        let Some(s) = name.to_str() else {
            scan.foreign.get_or_insert_with(shown_name);
            continue;
        };
        let foreign_inside = || -> Result<Option<String>, SnapshotError> {
            Ok(foreign_file(&path)?.map(|inner| format!("{}/{inner}", shown(s, 64))))
        };
        if s == "CURRENT" && md.is_file() {
            // Ours if it reads as one of ours (`gen-N CRC LEN`), or if damaged beside the lock
            // file (so that a damaged snapshot can be replaced or removed).
            match current(dir) {
                Ok(Some(_)) => scan.current = true,
                Ok(None) => {}
                Err(SnapshotError::Corrupt { .. }) => garbled = true,
                Err(e) => return Err(e),
            }
        } else if s == LOCK && md.is_file() {
            scan.lock = true;
        } else if let Some(n) = generation(s).filter(|_| md.is_dir()) {
            match foreign_inside()? {
                None => scan.generations.push((n, s.to_string())),
                Some(inner) => {
                    scan.foreign.get_or_insert(inner);
                }
            }
        } else if is_tmp_generation(s) && md.is_dir() {
            match foreign_inside()? {
                None => scan.leftovers.push(s.to_string()),
                Some(inner) => {
                    scan.foreign.get_or_insert(inner);
                }
            }
        } else if is_tmp_current(s) && md.is_file() {
            scan.leftovers.push(s.to_string());
        } else {
            scan.foreign.get_or_insert_with(shown_name);
        }
    }
    // A `CURRENT` that does not read as one of ours is the user's, unless the store has
    // written here (the lock file): then it is a damaged snapshot, which a write replaces.
    if garbled {
        if scan.lock {
            scan.current = true;
        } else {
            scan.foreign.get_or_insert_with(|| "CURRENT".into());
        }
    }
    // Generations alone are no proof that shoal wrote them: `CURRENT` or the lock file (made
    // before a first generation is) must be beside them.
    if scan.foreign.is_none()
        && !scan.current
        && !scan.lock
        && let Some((_, g)) = scan.generations.first()
    {
        scan.foreign = Some(g.clone());
    }
    Ok(scan)
}

/// The first entry of a generation (or a temporary one) that is not a snapshot file: a
/// regular file named `manifest.json`, `memory.bin` or `kv-….safetensors`.
fn foreign_file(gen_dir: &Path) -> Result<Option<String>, SnapshotError> {
    let entries = match std::fs::read_dir(gen_dir) {
        Ok(e) => e,
        // Renamed or removed since it was listed (by a writer holding the lock: this look
        // was taken without it).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(gen_dir)(e)),
    };
    let mut names = Vec::new();
    for e in entries {
        names.push(e.map_err(io(gen_dir))?.file_name());
    }
    names.sort();
    for name in names {
        let path = gen_dir.join(&name);
        let regular = match std::fs::symlink_metadata(&path) {
            Ok(md) => md.is_file(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        if !(regular && is_snapshot_file(&name)) {
            return Ok(Some(shown(&name.to_string_lossy(), 64)));
        }
    }
    Ok(None)
}

/// The names of the files of a generation.
fn is_snapshot_file(name: &OsStr) -> bool {
    let Some(s) = name.to_str() else { return false };
    let plain = |m: &str| !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    s == "manifest.json"
        || s == "memory.bin"
        || s.strip_prefix("kv-").and_then(|r| r.strip_suffix(".safetensors")).is_some_and(plain)
}

/// `P` or `P-C`, decimal (what [`unique`] makes, and `P` alone from earlier versions).
fn is_unique(s: &str) -> bool {
    let digits = |d: &str| !d.is_empty() && d.len() <= 20 && d.bytes().all(|b| b.is_ascii_digit());
    match s.split_once('-') {
        Some((p, c)) => digits(p) && digits(c),
        None => digits(s),
    }
}

/// `.gen-N.tmpP-C`: a generation being written (or left by a writer that died).
fn is_tmp_generation(s: &str) -> bool {
    let Some((g, u)) = s.strip_prefix('.').and_then(|r| r.split_once(".tmp")) else { return false };
    generation(g).is_some() && is_unique(u)
}

/// `.CURRENT.tmpP-C`: a `CURRENT` being written.
fn is_tmp_current(s: &str) -> bool {
    s.strip_prefix(".CURRENT.tmp").is_some_and(is_unique)
}

/// `PID-C`: unique to this process and this call (C counts up from 0 in each process).
pub(crate) fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Whether `dir` is a shoal snapshot directory: it holds a `CURRENT` file and nothing but
/// what the store writes there (`CURRENT`, `.lock`, `gen-N` directories of snapshot files,
/// leftovers of interrupted writes). `false` for a directory that does not exist, an empty
/// one, or one holding anything else (which [`write_dir`] refuses to write into).
pub fn is_snapshot_dir(dir: &Path) -> Result<bool, SnapshotError> {
    let scan = scan(dir)?;
    Ok(scan.exists && scan.current && scan.foreign.is_none())
}

/// Removes an entry [`scan`] found to be ours, without following a symbolic link: `dir`
/// (a generation or a temporary one) loses its snapshot files, then is removed; a file is
/// unlinked. An entry that is no longer what it was (replaced since) is left alone, and so is
/// anything but snapshot files inside a generation (its removal then fails, not empty).
pub(crate) fn remove_ours(path: &Path, is_dir: bool) -> Result<(), SnapshotError> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path)(e)),
    };
    if !is_dir {
        if md.is_file() {
            std::fs::remove_file(path).map_err(io(path))?;
        }
        return Ok(());
    }
    if !md.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(path).map_err(io(path))? {
        let e = e.map_err(io(path))?;
        let p = e.path();
        let regular = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file());
        if regular && is_snapshot_file(&e.file_name()) {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&p)(e)),
                _ => {}
            }
        }
    }
    std::fs::remove_dir(path).map_err(io(path))
}

// ---- one writer at a time ----

/// Canonical directories written or removed by a thread of this process now.
static HELD: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
/// Signalled when one of them is let go.
static FREED: Condvar = Condvar::new();

/// The in-process half of [`DirLock`]: the directory's canonical path in [`HELD`].
struct Held(PathBuf);

impl Held {
    fn take(key: PathBuf) -> Held {
        // The set is only held for a lookup or an insertion: it cannot be poisoned in a way
        // that matters.
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        while held.contains(&key) {
            held = FREED.wait(held).unwrap_or_else(PoisonError::into_inner);
        }
        held.insert(key.clone());
        Held(key)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.0);
        FREED.notify_all();
    }
}

/// The right to change a snapshot directory: no other thread of this process (by the
/// directory's canonical path) and no other process (by an exclusive lock of `DIR/.lock`)
/// holds it. Let go when dropped: the file lock first, then the process's.
pub(crate) struct DirLock {
    /// `DIR/.lock`, locked; `None` where the file system has no locks.
    _file: Option<File>,
    _held: Held,
}

impl DirLock {
    /// Locks `dir` to write it, creating it (and again if a removal took it meanwhile).
    pub fn write(dir: &Path) -> Result<DirLock, SnapshotError> {
        let mut tries = 0;
        let key = loop {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            match std::fs::canonicalize(dir) {
                Ok(k) => break k,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 16 => tries += 1,
                Err(e) => return Err(io(dir)(e)),
            }
        };
        let held = Held::take(key);
        Ok(DirLock { _file: lock_file(dir, true)?, _held: held })
    }

    /// Locks `dir`, which exists, to remove it: `NotFound` if it is gone.
    pub fn existing(dir: &Path) -> Result<DirLock, SnapshotError> {
        let key = std::fs::canonicalize(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SnapshotError::NotFound { dir: dir.to_path_buf() },
            _ => io(dir)(e),
        })?;
        let held = Held::take(key);
        Ok(DirLock { _file: lock_file(dir, false)?, _held: held })
    }
}

/// Opens `DIR/.lock` (creating it) and locks it, blocking until no other process holds it.
/// A removal unlinks the file it holds: a lock taken on an unlinked file is given up and
/// taken again on the file now there, so that two processes never both hold "the" lock.
fn lock_file(dir: &Path, create_dir: bool) -> Result<Option<File>, SnapshotError> {
    let path = dir.join(LOCK);
    let mut tries = 0;
    loop {
        tries += 1;
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Not a symbolic link's target: it would be a file shoal does not own.
            o.custom_flags(libc::O_NOFOLLOW);
        }
        let file = match o.open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 16 => {
                if !create_dir {
                    return Err(SnapshotError::NotFound { dir: dir.to_path_buf() });
                }
                std::fs::create_dir_all(dir).map_err(io(dir))?;
                continue;
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let md = file.metadata().map_err(io(&path))?;
        if !md.is_file() {
            return Err(SnapshotError::NotASnapshotDir { dir: dir.to_path_buf(), found: LOCK.into() });
        }
        match file.lock() {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                log::warn!(
                    "{}: the file system does not lock files; only writers of this process are kept apart",
                    path.display()
                );
                return Ok(None);
            }
            Err(e) => return Err(io(&path)(e)),
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let same = std::fs::symlink_metadata(&path).is_ok_and(|now| now.dev() == md.dev() && now.ino() == md.ino());
            if !same && tries < 16 {
                continue;
            }
        }
        return Ok(Some(file));
    }
}

// ---- stores ----

/// Where snapshots are kept, by key. A local directory now ([`LocalStore`]); an object store
/// can implement the same.
pub trait SnapshotStore: Send + Sync {
    /// Writes `snap` under `key`, replacing what was there only once it is complete.
    fn put(&self, key: &str, snap: &Snapshot) -> Result<WriteReport, SnapshotError>;
    /// Reads the snapshot under `key` ([`SnapshotError::NotFound`] if there is none).
    fn get(&self, key: &str) -> Result<Snapshot, SnapshotError>;
    /// The keys held, sorted.
    fn list(&self) -> Result<Vec<String>, SnapshotError>;
    /// Removes `key`'s snapshot ([`SnapshotError::NotFound`] if there is none).
    fn remove(&self, key: &str) -> Result<(), SnapshotError>;
}

/// Snapshots in directories under a root: key `k` is the snapshot directory `ROOT/k`
/// (written by [`write_dir`], read by [`read_dir`]). Keys are 1 to [`MAX_KEY`] ASCII letters,
/// digits, `-`, `_` and `.`, not starting with `.` ([`SnapshotError::BadKey`]).
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
}

/// Why `key` is not a key of a [`LocalStore`], if it is not.
fn bad_key(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("it is empty")
    } else if key.len() > MAX_KEY {
        Some("it is longer than 128 bytes")
    } else if !key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        Some("it holds a character other than ASCII letters, digits, `-`, `_` and `.`")
    } else if key.starts_with('.') {
        Some("it starts with `.`")
    } else {
        None
    }
}

impl LocalStore {
    /// A store under `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore { root: root.into() }
    }

    /// The directory of `key`, once the key is checked.
    fn dir(&self, key: &str) -> Result<PathBuf, SnapshotError> {
        match bad_key(key) {
            Some(why) => Err(SnapshotError::BadKey { key: shown(key, 64), why: why.into() }),
            None => Ok(self.root.join(key)),
        }
    }
}

impl SnapshotStore for LocalStore {
    fn put(&self, key: &str, snap: &Snapshot) -> Result<WriteReport, SnapshotError> {
        write_dir(&self.dir(key)?, snap)
    }

    fn get(&self, key: &str) -> Result<Snapshot, SnapshotError> {
        read_dir(&self.dir(key)?)
    }

    /// The keys whose directory holds a `CURRENT` file (others are not listed: a directory
    /// someone else made under the root, a key whose first write never finished).
    fn list(&self) -> Result<Vec<String>, SnapshotError> {
        let mut v = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
            Err(e) => return Err(io(&self.root)(e)),
        };
        for e in entries {
            let e = e.map_err(io(&self.root))?;
            let Ok(name) = e.file_name().into_string() else { continue };
            if bad_key(&name).is_none() && e.path().join("CURRENT").is_file() {
                v.push(name);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Removes the key's directory, holding its lock (a write of the key waits, or finds it
    /// gone and starts afresh): `CURRENT` first (the key is gone from then on), then its
    /// generations and leftovers, the lock file and the directory. Only a shoal snapshot
    /// directory is removed ([`SnapshotError::NotASnapshotDir`] otherwise, nothing deleted),
    /// and no symbolic link is followed (a key that is one is refused).
    fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let dir = self.dir(key)?;
        let not_found = || SnapshotError::NotFound { dir: dir.clone() };
        match std::fs::symlink_metadata(&dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(SnapshotError::NotASnapshotDir { dir: dir.clone(), found: key.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(io(&dir)(e)),
        }
        let check = || -> Result<(), SnapshotError> {
            let scan = scan(&dir)?;
            scan.refuse(&dir)?;
            if scan.current { Ok(()) } else { Err(not_found()) }
        };
        check()?;
        let _lock = DirLock::existing(&dir)?;
        check()?;
        let scan = scan(&dir)?;
        let current = dir.join("CURRENT");
        std::fs::remove_file(&current).map_err(io(&current))?;
        for (_, g) in &scan.generations {
            remove_ours(&dir.join(g), true)?;
        }
        for l in &scan.leftovers {
            remove_ours(&dir.join(l), !is_tmp_current(l))?;
        }
        remove_ours(&dir.join(LOCK), false)?;
        std::fs::remove_dir(&dir).map_err(io(&dir))
    }
}
