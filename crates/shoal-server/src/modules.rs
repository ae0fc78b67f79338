//! What may be spawned: the built-in `chat`, or a module **by name** from the directories
//! given with `--modules DIR`. A client never names a path: `NAME` is letters, digits,
//! `-`, `_` and `.` (not leading), looked up as `DIR/NAME.wasm`, `DIR/NAME.wat` (or
//! `DIR/NAME` when it already ends so), first directory first. The file must be a regular
//! file (symlinks, FIFOs and devices are refused without being read: it is opened with
//! `O_NOFOLLOW | O_NONBLOCK` and checked on the open descriptor), at most `--max-module-bytes`,
//! and read once. Errors name the module, never quote the file: text modules are turned into
//! binary here and only the first line of a parse error is kept (the rest quotes the source).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use axum::http::StatusCode;

use crate::error::ApiError;

/// The longest module name.
pub const MAX_NAME: usize = 128;

/// The module directories.
#[derive(Clone, Debug)]
pub struct ModuleDirs {
    dirs: Vec<PathBuf>,
    max_bytes: u64,
}

/// A module read from a directory.
#[derive(Debug)]
pub struct Found {
    /// Where it was.
    pub path: PathBuf,
    /// Its bytes, as a binary module.
    pub wasm: Vec<u8>,
}

/// Whether `name` is a module name (see the module docs).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn shown(s: &str) -> String {
    crate::error::shown(s, MAX_NAME)
}

impl ModuleDirs {
    /// Modules from `dirs`, each at most `max_bytes`.
    pub fn new(dirs: Vec<PathBuf>, max_bytes: u64) -> ModuleDirs {
        ModuleDirs { dirs, max_bytes }
    }

    /// The names of the modules the directories hold (valid names of regular files ending in
    /// `.wasm` or `.wat`), sorted, without duplicates.
    pub fn names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for d in &self.dirs {
            let Ok(entries) = std::fs::read_dir(d) else { continue };
            for e in entries.flatten().take(10_000) {
                let name = e.file_name().to_string_lossy().into_owned();
                let stem = name.strip_suffix(".wasm").or_else(|| name.strip_suffix(".wat"));
                if let Some(stem) = stem
                    && valid_name(stem)
                    && e.file_type().is_ok_and(|t| t.is_file())
                {
                    v.push(stem.to_string());
                }
            }
        }
        v.sort();
        v.dedup();
        v
    }

    fn candidates(&self, name: &str) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for d in &self.dirs {
            if name.ends_with(".wasm") || name.ends_with(".wat") {
                v.push(d.join(name));
            } else {
                v.push(d.join(format!("{name}.wasm")));
                v.push(d.join(format!("{name}.wat")));
            }
        }
        v
    }

    /// The module `name` (see the module docs).
    pub fn find(&self, name: &str) -> Result<Found, ApiError> {
        if !valid_name(name) {
            return Err(ApiError::bad(format!(
                "`{}` is not a module name: give `chat` or the name of a module in the daemon's --modules \
                 directories (letters, digits, - _ .; never a path)",
                shown(name)
            ))
            .param("module"));
        }
        if self.dirs.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no module `{}`: this daemon spawns only `chat` (start it with --modules DIR to serve modules)",
                    shown(name)
                ),
            ));
        }
        for path in self.candidates(name) {
            match self.read(&path) {
                Ok(Some(wasm)) => return Ok(Found { path, wasm }),
                Ok(None) => continue,
                Err(why) => {
                    return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("module `{name}`: {why}")));
                }
            }
        }
        let have = self.names();
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no module `{}` in the --modules directories (they hold: {})",
                shown(name),
                if have.is_empty() { "nothing".to_string() } else { have.join(", ") }
            ),
        ))
    }

    /// The module at `path`: `None` when there is none, `Err` when it may not be used.
    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, String> {
        let opened =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path);
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // O_NOFOLLOW on a symlink.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err("the file is a symbolic link; modules are regular files".into());
            }
            Err(e) => return Err(format!("cannot open it: {e}")),
        };
        let meta = file.metadata().map_err(|e| format!("cannot read it: {e}"))?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        if meta.len() > self.max_bytes {
            return Err(format!("{} bytes, past the limit of {} (--max-module-bytes)", meta.len(), self.max_bytes));
        }
        let bytes = read_capped(file, self.max_bytes)?;
        to_binary(&bytes).map(Some)
    }
}

fn read_capped(file: File, max: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("it grew past the limit of {max} bytes (--max-module-bytes) while being read"));
    }
    Ok(bytes)
}

/// A binary module as is; a text one parsed, with only the first line of an error kept (the
/// rest of `wat`'s message quotes the source).
pub fn to_binary(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if bytes.starts_with(b"\0asm") {
        return Ok(bytes.to_vec());
    }
    wat::parse_bytes(bytes).map(|b| b.into_owned()).map_err(|e| {
        let msg = e.to_string();
        let first = msg.lines().next().unwrap_or("").trim();
        let first = crate::error::shown(first, 120);
        format!("not a WebAssembly module (neither binary nor valid text: {first})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-modules-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn names_never_paths_and_contents_never_quoted() {
        let d = tmp("names");
        std::fs::write(d.join("echo.wat"), "(module)").unwrap();
        std::fs::write(d.join("bad.wat"), "SECRET-LINE-1234 not wat").unwrap();
        std::fs::write(d.join("big.wasm"), vec![0u8; 2000]).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.join("link.wasm")).unwrap();
        std::fs::create_dir(d.join("dir.wasm")).unwrap();
        let m = ModuleDirs::new(vec![d.clone()], 1000);
        assert!(m.find("echo").unwrap().wasm.starts_with(b"\0asm"));
        assert!(m.find("echo.wat").is_ok());
        for bad in ["../etc/passwd", "/etc/passwd", "a/b", ".hidden", "", &"x".repeat(200)] {
            assert_eq!(m.find(bad).unwrap_err().status, StatusCode::BAD_REQUEST, "{bad}");
        }
        let e = m.find("bad").unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(!e.message.contains("SECRET"), "{}", e.message);
        assert!(m.find("big").unwrap_err().message.contains("--max-module-bytes"));
        assert!(m.find("link").unwrap_err().message.contains("symbolic link"));
        assert!(m.find("dir").unwrap_err().message.contains("regular file"));
        assert_eq!(m.find("nothing").unwrap_err().status, StatusCode::NOT_FOUND);
        assert_eq!(m.names(), vec!["bad", "big", "echo"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
