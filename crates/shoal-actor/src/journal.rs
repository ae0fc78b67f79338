//! The daemon's journal: actor ids that never repeat, and the last checkpoint of every
//! persistent actor, so that actors outlive the daemon ([`crate::Registry::set_journal`],
//! [`crate::Registry::checkpoint`], [`crate::Registry::recover`]).
//!
//! It lives in a directory the daemon gives (`STORE/.daemon`, a name no snapshot key can
//! take):
//!
//! ```text
//! lock                     held (flock) while a Journal lives; holds its process's id
//! next-id                  the next actor id never handed out (decimal)
//! modules/<sha256>.wasm    the bytes of every module a checkpointed actor runs
//! actors/<id>/             the actor's last checkpoint (a snapshot directory)
//! actors/<id>.json         {"id", "module_name", "module_sha256", "tag", "paused"}
//! ```
//!
//! Ids: `next-id` is written durably (a temporary file, fsync, rename, fsync of the
//! directory) before any id below it is handed out, a block of [`ID_BLOCK`] at a time. After
//! a crash ids may skip, but never repeat.
//!
//! Every file is written the same way (a temporary file, fsync, rename, fsync of the
//! directory; a checkpoint through [`crate::write_dir`]), so a crash mid-write leaves the
//! previous version whole. Everything read is capped in size before it is read, and checked
//! (modules against their SHA-256, records strictly typed, checkpoints by
//! [`crate::read_dir`]); errors name the file, never quote it.
//!
//! # Crash policy
//!
//! A crash of the daemon (SIGKILL, power loss, an abort) loses, per actor, what it did since
//! its last checkpoint: it comes back as it was then (its messages since are forgotten by
//! it, though their replies were sent), and an actor never checkpointed does not come back
//! (its id is not handed out again). The daemon checkpoints every persistent actor at
//! shutdown and (its choice) periodically, with `changed_only`, so that only actors that
//! handled a message, or were paused, resumed or moved, since their last checkpoint are
//! written. A busy actor is not waited for past the checkpoint's bound: its previous
//! checkpoint is kept. Killing an actor deletes its checkpoint (the record first, so that a
//! crash halfway never brings it back). Transient actors (the OpenAI endpoint's pool) are
//! never checkpointed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::snapshot::{Snapshot, SnapshotError};

/// Ids written to `next-id` at a time: spawns do not fsync each time; a crash skips at most
/// this many.
pub const ID_BLOCK: u64 = 64;
/// The most bytes of `next-id` and `lock` read.
const MAX_SMALL: u64 = 64;
/// The most bytes of an actor's record read.
const MAX_RECORD: u64 = 64 << 10;
/// The most bytes of a module read.
pub const MAX_MODULE: u64 = 256 << 20;

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Another process holds the journal.
    #[error("{}", in_use(dir, *pid))]
    InUse {
        /// The journal's directory.
        dir: PathBuf,
        /// The process that holds it, when it could be read.
        pid: Option<u32>,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not what the journal writes.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong (never its contents).
        reason: String,
    },
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

fn in_use(dir: &Path, pid: Option<u32>) -> String {
    let who = pid.map_or_else(|| "another shoal serve".to_string(), |p| format!("another shoal serve (pid {p})"));
    format!("{who} uses the store {}; stop it or give --store another directory", dir.display())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> JournalError {
    JournalError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
}

/// What [`crate::Registry::recover`] did for one actor.
#[derive(Clone, Debug, Serialize)]
pub struct Recovered {
    /// The actor's id (as before the restart). 0 (never an actor's) when the journal's
    /// directory itself could not be read.
    pub id: u64,
    /// Its module's name (empty when its record could not be read).
    pub module: String,
    /// `Ok`, or why it did not come back (its checkpoint is left on disk as it was).
    pub result: Result<(), String>,
}

/// What [`crate::Registry::checkpoint`] did for one actor.
#[derive(Clone, Debug, Serialize)]
pub struct Checkpointed {
    /// The actor.
    pub id: u64,
    /// Bytes written, or why not (its previous checkpoint is kept).
    pub result: Result<usize, String>,
}

/// An actor's record, `actors/<id>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Record {
    pub(crate) id: u64,
    pub(crate) module_name: String,
    pub(crate) module_sha256: String,
    pub(crate) tag: String,
    pub(crate) paused: bool,
    /// The actor's name (records of older daemons have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    /// The model it was spawned with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) model: Option<String>,
    /// When it was first spawned (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) created: Option<u64>,
}

/// What the journal's `actors/` directory holds.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// Ids with a record, ascending.
    pub(crate) records: Vec<u64>,
    /// Ids with a checkpoint directory and no record (a crash during a first checkpoint or
    /// a kill).
    pub(crate) orphans: Vec<u64>,
    /// Leftovers of interrupted writes.
    pub(crate) leftovers: Vec<PathBuf>,
}

/// Ids handed out from memory: `next` up to `limit` (what `next-id` says).
#[derive(Debug)]
struct Ids {
    next: u64,
    limit: u64,
}

/// The daemon's journal (see the module docs). Holds its directory's lock while it lives.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// Locked (exclusively) while the journal lives; unlocked when it is closed.
    _lock: File,
    ids: Mutex<Ids>,
}

/// Opens `path` for reading without following a link or blocking on a pipe, and checks
/// that it is a regular file of at most `cap` bytes.
fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, JournalError> {
    let file =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(io(path))?;
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(corrupt(path, "not a regular file"));
    }
    if meta.len() > cap {
        return Err(corrupt(path, format!("{} bytes; the journal writes at most {cap} here", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut bytes).map_err(io(path))?;
    if bytes.len() as u64 > cap {
        return Err(corrupt(path, format!("more than {cap} bytes; the journal writes at most {cap} here")));
    }
    Ok(bytes)
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Writes `bytes` to `path` atomically and durably: a temporary file beside it, fsync,
/// rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let r = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    sync_dir(dir)
}

/// An id as the journal names files: decimal, no sign, no leading zero.
fn parse_id(s: &str) -> Option<u64> {
    let plain = !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    if plain { s.parse().ok() } else { None }
}

/// A module's name in `modules/`: 64 lowercase hex digits.
fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Journal {
    /// Opens (creating it if needed) the journal in `dir` and locks it for this process:
    /// [`JournalError::InUse`] when another journal (another daemon) holds it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Journal, JournalError> {
        let dir = dir.as_ref().to_path_buf();
        for d in [dir.clone(), dir.join("actors"), dir.join("modules")] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let path = dir.join("lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(io(&path))?;
        if !lock.metadata().map_err(io(&path))?.is_file() {
            return Err(corrupt(&path, "not a regular file"));
        }
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let pid = read_capped(&path, MAX_SMALL)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| s.trim().parse().ok());
                return Err(JournalError::InUse { dir, pid });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
        lock.set_len(0).map_err(io(&path))?;
        lock.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io(&path))?;
        let next = Self::read_next(&dir.join("next-id"))?;
        Ok(Journal { dir, _lock: lock, ids: Mutex::new(Ids { next, limit: next }) })
    }

    /// Reads `next-id` (1 when there is none yet).
    fn read_next(path: &Path) -> Result<u64, JournalError> {
        let bytes = match read_capped(path, MAX_SMALL) {
            Ok(b) => b,
            Err(JournalError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(1),
            Err(e) => return Err(e),
        };
        let text = std::str::from_utf8(&bytes).ok();
        text.and_then(|t| parse_id(t.strip_suffix('\n').unwrap_or(t))).ok_or_else(|| {
            corrupt(path, "not the next actor id (a decimal number): ids could repeat, so the journal is not used")
        })
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, Ids> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `next-id` durably.
    fn persist(&self, limit: u64) -> Result<(), JournalError> {
        write_atomic(&self.dir.join("next-id"), format!("{limit}\n").as_bytes())
    }

    /// A new actor id, never handed out before by a journal in this directory.
    pub(crate) fn next_id(&self) -> Result<u64, JournalError> {
        let mut ids = self.ids();
        if ids.next >= ids.limit {
            let limit =
                ids.next.checked_add(ID_BLOCK).ok_or_else(|| corrupt(&self.dir.join("next-id"), "ids ran out"))?;
            self.persist(limit)?;
            ids.limit = limit;
        }
        let id = ids.next;
        ids.next += 1;
        Ok(id)
    }

    /// Makes every id handed out from now on larger than `id`.
    pub(crate) fn keep_above(&self, id: u64) -> Result<(), JournalError> {
        let mut ids = self.ids();
        if ids.next > id {
            return Ok(());
        }
        let next = id.checked_add(1).ok_or_else(|| corrupt(&self.dir.join("next-id"), "ids ran out"))?;
        if next > ids.limit {
            self.persist(next)?;
            ids.limit = next;
        }
        ids.next = next;
        Ok(())
    }

    fn actors(&self) -> PathBuf {
        self.dir.join("actors")
    }

    fn record_path(&self, id: u64) -> PathBuf {
        self.actors().join(format!("{id}.json"))
    }

    fn checkpoint_dir(&self, id: u64) -> PathBuf {
        self.actors().join(id.to_string())
    }

    fn module_path(&self, sha256: &str) -> Result<PathBuf, JournalError> {
        if !is_sha256(sha256) {
            return Err(corrupt(
                &self.dir.join("modules"),
                "a module's name is not a SHA-256 (64 lowercase hex digits)",
            ));
        }
        Ok(self.dir.join("modules").join(format!("{sha256}.wasm")))
    }

    /// What `actors/` holds.
    pub(crate) fn list(&self) -> Result<Listing, JournalError> {
        let dir = self.actors();
        let mut out = Listing::default();
        let mut dirs = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json").and_then(parse_id) {
                out.records.push(id);
            } else if let Some(id) = parse_id(&name) {
                dirs.push(id);
            } else if name.starts_with('.') && name.contains(".json.tmp") {
                out.leftovers.push(e.path());
            }
        }
        out.records.sort_unstable();
        out.orphans = dirs.into_iter().filter(|d| out.records.binary_search(d).is_err()).collect();
        out.orphans.sort_unstable();
        Ok(out)
    }

    /// Removes what [`Journal::list`] found left over (orphan checkpoints, temporary files).
    pub(crate) fn remove_orphan(&self, id: u64) {
        let d = self.checkpoint_dir(id);
        match std::fs::remove_dir_all(&d) {
            Ok(()) => log::info!("journal: removed {}, a checkpoint without a record", d.display()),
            Err(e) => log::warn!("journal: cannot remove {}: {e}", d.display()),
        }
    }

    /// Actor `id`'s record.
    pub(crate) fn read_record(&self, id: u64) -> Result<Record, JournalError> {
        let path = self.record_path(id);
        let bytes = read_capped(&path, MAX_RECORD)?;
        let rec: Record = serde_json::from_slice(&bytes).map_err(|e| {
            // serde's message may quote the file: only its category and place are given.
            corrupt(
                &path,
                format!("not an actor's record ({:?} error at line {}, column {})", e.classify(), e.line(), e.column()),
            )
        })?;
        if rec.id != id {
            return Err(corrupt(&path, format!("the record is of actor {}, not {id}", rec.id)));
        }
        if !is_sha256(&rec.module_sha256) {
            return Err(corrupt(&path, "its module_sha256 is not a SHA-256 (64 lowercase hex digits)"));
        }
        Ok(rec)
    }

    /// The module whose SHA-256 is `sha256`, checked.
    pub(crate) fn read_module(&self, sha256: &str) -> Result<Vec<u8>, JournalError> {
        let path = self.module_path(sha256)?;
        let bytes = read_capped(&path, MAX_MODULE)?;
        if shoal_host::instance::sha256_hex(&bytes) != sha256 {
            return Err(corrupt(&path, "its bytes do not have the SHA-256 it is named by"));
        }
        Ok(bytes)
    }

    /// Keeps `bytes` (whose SHA-256 is `sha256`) in `modules/`, once.
    pub(crate) fn write_module(&self, sha256: &str, bytes: &[u8]) -> Result<(), JournalError> {
        let path = self.module_path(sha256)?;
        // Written atomically: a file of the right size there is this module.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64) {
            return Ok(());
        }
        write_atomic(&path, bytes)
    }

    /// Actor `id`'s checkpoint.
    pub(crate) fn read_checkpoint(&self, id: u64) -> Result<Snapshot, JournalError> {
        Ok(crate::snapshot::read_dir(&self.checkpoint_dir(id))?)
    }

    /// Writes actor `rec.id`'s checkpoint, then its record; returns the bytes written.
    pub(crate) fn write_checkpoint(&self, rec: &Record, snap: &Snapshot) -> Result<usize, JournalError> {
        let report = crate::snapshot::write_dir(&self.checkpoint_dir(rec.id), snap)?;
        let json = serde_json::to_vec_pretty(rec).expect("a record serializes");
        write_atomic(&self.record_path(rec.id), &json)?;
        Ok((report.bytes as usize).saturating_add(json.len()))
    }

    /// Deletes actor `id`'s checkpoint: its record first (durably), then its directory.
    pub(crate) fn remove_checkpoint(&self, id: u64) -> Result<(), JournalError> {
        let rec = self.record_path(id);
        match std::fs::remove_file(&rec) {
            Ok(()) => sync_dir(&self.actors())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&rec)(e)),
        }
        let d = self.checkpoint_dir(id);
        match std::fs::remove_dir_all(&d) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&d)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_repeat_across_opens() {
        let dir = std::env::temp_dir().join(format!("shoal-journal-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let j = Journal::open(&dir).unwrap();
        let a: Vec<u64> = (0..3).map(|_| j.next_id().unwrap()).collect();
        assert_eq!(a, [1, 2, 3]);
        assert!(matches!(Journal::open(&dir), Err(JournalError::InUse { pid: Some(_), .. })));
        drop(j);
        let j = Journal::open(&dir).unwrap();
        let b = j.next_id().unwrap();
        assert!(b > 3, "{b}");
        j.keep_above(1000).unwrap();
        assert_eq!(j.next_id().unwrap(), 1001);
        drop(j);
        assert!(Journal::open(&dir).unwrap().next_id().unwrap() > 1001);
        std::fs::write(dir.join("next-id"), "12x\n").unwrap();
        let e = Journal::open(&dir).unwrap_err();
        assert!(matches!(e, JournalError::Corrupt { .. }) && e.to_string().contains("next-id"), "{e}");
        assert!(!e.to_string().contains("12x"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ids_are_strict() {
        assert_eq!(parse_id("17"), Some(17));
        for bad in ["", "0", "017", "+1", "1 ", "99999999999999999999999", "1e3"] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }
}
