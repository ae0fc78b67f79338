//! The key/value cache of one session.
//!
//! A decoder attends over every earlier position; the keys and values of those positions are
//! kept here so that each new token costs one position of work, not the whole prefix again.
//! The cache belongs to a session (DESIGN §4): the model is shared and holds no per-session
//! state, and every forward pass is given the cache to read and extend.
//!
//! Layout: for each layer, K and V are row-major `[max_seq, kv_dim]` f32 matrices, where
//! `kv_dim = n_kv_heads * head_dim`; row `p` holds position `p`, heads side by side.

/// What went wrong with a [`KvCache`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The tokens do not fit in the context the cache was sized for.
    #[error(
        "context is full: {len} positions are in use and {adding} more were given, but the \
         cache holds {capacity}; start a new session, truncate the cache, or ask for a larger \
         context"
    )]
    ContextFull {
        /// Positions already in the cache.
        len: usize,
        /// Positions that were to be added.
        adding: usize,
        /// The most positions the cache holds.
        capacity: usize,
    },
    /// A snapshot made for another model (or whose data has other sizes than it says).
    #[error("a KV cache snapshot of {found} does not fit this model's {expected}")]
    Mismatch {
        /// What the model needs.
        expected: String,
        /// What the snapshot holds.
        found: String,
    },
    /// A cache of zero positions was asked for.
    #[error("a KV cache needs a context of at least one position")]
    EmptyContext,
    /// The cache would not fit in memory (its size overflows `usize`).
    #[error("a KV cache of {layers} layers × {context} positions × {kv_dim} values is too large")]
    TooLarge {
        /// Layers asked for.
        layers: usize,
        /// Positions asked for.
        context: usize,
        /// Values per position and layer.
        kv_dim: usize,
    },
}

/// Per-layer buffers of dropped caches, kept for the next caches of the same shape. A fresh
/// buffer costs a page fault per 4 KiB on its first write, which is most of the time of
/// importing a cache (restoring a snapshot) on machines with slow faults (VMs); a kept one is
/// warm. At most [`RECYCLE_BYTES`] in all; buffers under [`RECYCLE_MIN`] are left to the
/// allocator.
static RECYCLED: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());
const RECYCLE_BYTES: usize = 512 << 20;
const RECYCLE_MIN: usize = 64 << 10;

fn recycled() -> std::sync::MutexGuard<'static, Vec<Vec<f32>>> {
    RECYCLED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `floats` values, zero from `keep` on (the caller writes `..keep` itself).
fn layer_buffer(floats: usize, keep: usize) -> Vec<f32> {
    let kept = if floats * 4 >= RECYCLE_MIN {
        let mut r = recycled();
        r.iter().rposition(|b| b.len() == floats).map(|i| r.swap_remove(i))
    } else {
        None
    };
    match kept {
        Some(mut b) => {
            b[keep.min(floats)..].fill(0.0);
            b
        }
        None => vec![0.0; floats],
    }
}

/// Keys and values of every layer for the positions a session has processed so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer, `[capacity, kv_dim]` keys.
    k: Vec<Vec<f32>>,
    /// Per layer, `[capacity, kv_dim]` values.
    v: Vec<Vec<f32>>,
    kv_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `kv_dim` values per position, holding at most
    /// `context` positions.
    ///
    /// The memory is reserved zeroed; on most systems untouched pages cost nothing until used.
    /// Models offer a checked constructor that sizes it for themselves
    /// ([`crate::models::llama::Llama::new_cache`]).
    pub fn new(n_layers: usize, kv_dim: usize, context: usize) -> Result<Self, KvError> {
        Self::check_size(n_layers, kv_dim, context)?;
        Ok(Self::with_buffers(n_layers, kv_dim, context, 0))
    }

    /// Refuses an empty context, or one whose buffers could not be addressed.
    fn check_size(n_layers: usize, kv_dim: usize, context: usize) -> Result<(), KvError> {
        if context == 0 {
            return Err(KvError::EmptyContext);
        }
        let too_large = KvError::TooLarge { layers: n_layers, context, kv_dim };
        let per_layer = context.checked_mul(kv_dim).ok_or(too_large.clone())?;
        // Both K and V, in bytes, must be addressable.
        per_layer
            .checked_mul(n_layers)
            .and_then(|n| n.checked_mul(2 * std::mem::size_of::<f32>()))
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .ok_or(too_large)?;
        Ok(())
    }

    /// A cache whose layer buffers are zero from `keep` values on (`..keep` to be written by
    /// the caller); sizes checked by [`KvCache::new`].
    fn with_buffers(n_layers: usize, kv_dim: usize, context: usize, keep: usize) -> Self {
        let per_layer = context * kv_dim;
        Self {
            k: (0..n_layers).map(|_| layer_buffer(per_layer, keep)).collect(),
            v: (0..n_layers).map(|_| layer_buffer(per_layer, keep)).collect(),
            kv_dim,
            capacity: context,
            len: 0,
        }
    }

    /// Positions processed so far (the position the next token will take).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position has been processed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.k.len()
    }

    /// Values per position and layer (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Forgets every position; the memory is kept for the next conversation.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the first `n` positions and forgets the rest (for example to rewind a turn).
    /// Does nothing when `n >= len()`.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Checks that `adding` more positions fit.
    pub fn check_room(&self, adding: usize) -> Result<(), KvError> {
        if adding > self.remaining() {
            return Err(KvError::ContextFull { len: self.len, adding, capacity: self.capacity });
        }
        Ok(())
    }

    /// Keys of `layer` for the positions in use, `[len, kv_dim]` row-major, or `None` when
    /// there is no such layer.
    pub fn keys(&self, layer: usize) -> Option<&[f32]> {
        self.k.get(layer).map(|k| &k[..self.len * self.kv_dim])
    }

    /// Values of `layer` for the positions in use, `[len, kv_dim]` row-major, or `None` when
    /// there is no such layer.
    pub fn values(&self, layer: usize) -> Option<&[f32]> {
        self.v.get(layer).map(|v| &v[..self.len * self.kv_dim])
    }

    /// The whole K and V storage of `layer` (`[capacity, kv_dim]` each), for a forward pass
    /// that writes positions `len()..` and reads `..len() + n`. Panics if `layer` is out of
    /// range; models check the cache's shape first.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.k[layer], &mut self.v[layer])
    }

    /// Marks `n` more positions as in use once every layer has written them.
    pub(crate) fn advance(&mut self, n: usize) -> Result<(), KvError> {
        self.check_room(n)?;
        self.len += n;
        Ok(())
    }
}

/// A KV cache as plain data (what a snapshot stores): `k` and `v` are `[layer][position][kv_dim]`
/// f32 for the `len` positions in use. Backends export their caches to it and import it
/// ([`crate::models::Model::export_cache`], [`crate::models::Model::import_cache`]), so a
/// session can move between backends and processes.
#[derive(Debug, Clone, PartialEq)]
pub struct KvSnapshot {
    /// Layers.
    pub n_layers: usize,
    /// Values per position and layer.
    pub kv_dim: usize,
    /// Positions.
    pub len: usize,
    /// Keys, `n_layers * len * kv_dim`.
    pub k: Vec<f32>,
    /// Values, the same shape.
    pub v: Vec<f32>,
}

impl KvSnapshot {
    /// `__metadata__.format` of the safetensors form.
    pub const FORMAT: &'static str = "shoal-kv-cache";
    /// `__metadata__.version` written (and the only one read).
    pub const VERSION: &'static str = "1";

    /// The safetensors bytes: tensors `k` and `v` of shape `[n_layers, len, kv_dim]`, F32,
    /// and metadata `format`, `version`.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.k.len() * 8 + 512);
        self.write_safetensors(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Writes the safetensors form to `w` without building it in memory first.
    pub fn write_safetensors(&self, w: &mut (impl std::io::Write + ?Sized)) -> std::io::Result<()> {
        Self::write_header(w, self.n_layers, self.len, self.kv_dim)?;
        for t in [&self.k, &self.v] {
            if cfg!(target_endian = "little") {
                w.write_all(bytemuck::cast_slice(t))?;
            } else {
                for x in t.iter() {
                    w.write_all(&x.to_le_bytes())?;
                }
            }
        }
        Ok(())
    }

    /// Writes the safetensors header of a cache of `n_layers` × `len` × `kv_dim` (`k` then
    /// `v`, each `[layers, len, kv_dim]` of little-endian f32, follow it).
    pub fn write_header(
        w: &mut (impl std::io::Write + ?Sized),
        n_layers: usize,
        len: usize,
        kv_dim: usize,
    ) -> std::io::Result<()> {
        let bytes = n_layers * len * kv_dim * 4;
        let shape = [n_layers, len, kv_dim];
        let header = format!(
            "{{\"__metadata__\":{{\"format\":\"{}\",\"version\":\"{}\"}},\"k\":{{\"dtype\":\"F32\",\"shape\":{shape:?},\"data_offsets\":[0,{bytes}]}},\"v\":{{\"dtype\":\"F32\",\"shape\":{shape:?},\"data_offsets\":[{bytes},{}]}}}}",
            Self::FORMAT,
            Self::VERSION,
            2 * bytes
        );
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(header.as_bytes())
    }

    /// Writes the safetensors form to `path` atomically and durably (a temporary file in
    /// the same folder, synced, then renamed over `path`).
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&self.to_safetensors())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself is durable once the folder is synced.
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The largest safetensors header a KV cache file may have. The header shoal writes is
    /// under 300 bytes; a larger one is refused before it is parsed, so a crafted file cannot
    /// make the JSON parser build a large tree.
    pub const MAX_HEADER: u64 = 64 << 10;

    /// Reads a file [`KvSnapshot::write`] wrote, refusing other formats and versions,
    /// inconsistent shapes, truncated or corrupt files with a clear error.
    pub fn read(path: &std::path::Path) -> Result<KvSnapshot, crate::safetensors::SafetensorsError> {
        Self::parse(Self::open(path)?)
    }

    /// Maps the file at `path` and parses its header, refusing a header larger than
    /// [`KvSnapshot::MAX_HEADER`] (or longer than the file) before it is parsed; then check
    /// the bytes as you wish and decode it with [`KvSnapshot::from_file`].
    pub fn open(
        path: &std::path::Path,
    ) -> Result<crate::safetensors::SafetensorsFile, crate::safetensors::SafetensorsError> {
        use std::io::Read;
        let io = |source| crate::safetensors::SafetensorsError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut prefix = Vec::with_capacity(8);
        file.take(8).read_to_end(&mut prefix).map_err(io)?;
        check_prefix(path, &prefix, len)?;
        crate::safetensors::SafetensorsFile::open(path).map_err(tidy)
    }

    /// [`KvSnapshot::read`] of bytes already in memory (`name` is used in errors).
    pub fn from_safetensors(name: &str, bytes: Vec<u8>) -> Result<KvSnapshot, crate::safetensors::SafetensorsError> {
        let path = std::path::Path::new(name);
        check_prefix(path, &bytes, bytes.len() as u64)?;
        Self::parse(crate::safetensors::SafetensorsFile::from_bytes(name, bytes).map_err(tidy)?)
    }

    /// [`KvSnapshot::read`] of a file already opened (e.g. by [`KvSnapshot::open`], after
    /// checking its bytes).
    pub fn from_file(
        f: crate::safetensors::SafetensorsFile,
    ) -> Result<KvSnapshot, crate::safetensors::SafetensorsError> {
        Self::parse(f)
    }

    /// Checks the format, the version, and that `k` and `v` are F32 tensors of one
    /// `[layers, len, kv_dim]` shape whose size is their bytes' length, before any buffer is
    /// made for them (each is then one buffer of its bytes' length).
    fn parse(f: crate::safetensors::SafetensorsFile) -> Result<KvSnapshot, crate::safetensors::SafetensorsError> {
        use crate::safetensors::{Dtype, SafetensorsError};
        let path = f.path().to_path_buf();
        let corrupt = |reason: String| SafetensorsError::Corrupt { path: path.clone(), reason };
        let meta = f.metadata();
        match (meta.get("format").map(String::as_str), meta.get("version").map(String::as_str)) {
            (Some(Self::FORMAT), Some(Self::VERSION)) => {}
            (Some(Self::FORMAT), v) => {
                return Err(corrupt(format!(
                    "a KV cache of format version {}; this shoal reads version {}",
                    v.map_or("(none)".into(), |v| format!("\"{}\"", shown(v, 64))),
                    Self::VERSION
                )));
            }
            (other, _) => {
                return Err(corrupt(format!(
                    "not a shoal KV cache (format {})",
                    other.map_or("(none)".into(), |v| format!("\"{}\"", shown(v, 64)))
                )));
            }
        }
        let tensor = |name: &str| f.tensor(name).ok_or_else(|| corrupt(format!("no tensor `{name}`")));
        let (k, v) = (tensor("k")?, tensor("v")?);
        if k.shape.len() != 3 || k.shape != v.shape {
            return Err(corrupt(format!(
                "k has shape {} and v {}; both must be [layers, len, kv_dim]",
                shown(&format!("{:?}", k.shape), 64),
                shown(&format!("{:?}", v.shape), 64)
            )));
        }
        for (name, t) in [("k", k), ("v", v)] {
            if t.dtype != Dtype::F32 {
                return Err(corrupt(format!("`{name}` is {}; a shoal KV cache holds F32", shown(t.dtype.name(), 16))));
            }
        }
        let dims: Vec<usize> = k.shape.iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect();
        let bytes = dims.iter().try_fold(4usize, |acc, &d| acc.checked_mul(d));
        for name in ["k", "v"] {
            let have = f.tensor_bytes(name).map_err(tidy)?.len();
            if bytes != Some(have) {
                return Err(corrupt(format!(
                    "`{name}` of shape {:?} needs {} bytes; it has {have}",
                    dims,
                    bytes.map_or("more than a usize of".into(), |b| b.to_string())
                )));
            }
        }
        let k = f.tensor_f32("k").map_err(tidy)?;
        let v = f.tensor_f32("v").map_err(tidy)?;
        Ok(KvSnapshot { n_layers: dims[0], len: dims[1], kv_dim: dims[2], k, v })
    }
}

/// Checks a KV cache file's first bytes, of a file of `len` bytes: a header length no larger
/// than [`KvSnapshot::MAX_HEADER`], inside the file.
fn check_prefix(path: &std::path::Path, prefix: &[u8], len: u64) -> Result<(), crate::safetensors::SafetensorsError> {
    use crate::safetensors::SafetensorsError;
    let Some(head) = prefix.get(..8) else {
        return Err(SafetensorsError::Truncated {
            path: path.to_path_buf(),
            what: "the header length".into(),
            offset: 0,
            needed: 8,
            len,
        });
    };
    let header = u64::from_le_bytes(head.try_into().expect("8 bytes"));
    if header > KvSnapshot::MAX_HEADER {
        return Err(SafetensorsError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "the header claims {header} bytes; a KV cache's header has at most {}",
                KvSnapshot::MAX_HEADER
            ),
        });
    }
    if header > len.saturating_sub(8) {
        return Err(SafetensorsError::Truncated {
            path: path.to_path_buf(),
            what: "the JSON header".into(),
            offset: 8,
            needed: header,
            len,
        });
    }
    Ok(())
}

/// `s` as it may appear in an error: control and bidirectional-override characters
/// escaped, and cut in the middle (keeping both ends, e.g. a parser's "at line L column C")
/// to about `max` bytes (errors describe, they do not quote). The snapshot reader uses it too.
pub fn shown(s: &str, max: usize) -> String {
    let odd = |c: char| {
        c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    let width = |c: char| if odd(c) { c.escape_unicode().count() } else { c.len_utf8() };
    let push = |out: &mut String, c: char| {
        if odd(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    };
    let mut out = String::new();
    if s.chars().map(width).sum::<usize>() <= max {
        s.chars().for_each(|c| push(&mut out, c));
        return out;
    }
    let (head, tail) = (max * 2 / 3, max / 3);
    let mut n = 0;
    for c in s.chars() {
        n += width(c);
        if n > head {
            break;
        }
        push(&mut out, c);
    }
    out.push('…');
    let (mut n, mut from) = (0, s.len());
    for (i, c) in s.char_indices().rev() {
        n += width(c);
        if n > tail {
            break;
        }
        from = i;
    }
    s[from..].chars().for_each(|c| push(&mut out, c));
    out
}

/// The same error with every string taken from the file shown by [`shown`] (the
/// safetensors reader quotes tensor names and dtypes as they are).
fn tidy(e: crate::safetensors::SafetensorsError) -> crate::safetensors::SafetensorsError {
    use crate::safetensors::SafetensorsError as E;
    match e {
        E::Corrupt { path, reason } => E::Corrupt { path, reason: shown(&reason, 192) },
        E::Truncated { path, what, offset, needed, len } => {
            E::Truncated { path, what: shown(&what, 96), offset, needed, len }
        }
        E::UnsupportedDtype { tensor, dtype } => {
            E::UnsupportedDtype { tensor: shown(&tensor, 64), dtype: shown(&dtype, 16) }
        }
        E::MissingTensor(name) => E::MissingTensor(shown(&name, 64)),
        other => other,
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if self.capacity * self.kv_dim * 4 < RECYCLE_MIN {
            return;
        }
        let mut r = recycled();
        let mut total: usize = r.iter().map(|b| b.len() * 4).sum();
        for b in self.k.drain(..).chain(self.v.drain(..)) {
            if total + b.len() * 4 > RECYCLE_BYTES {
                break;
            }
            total += b.len() * 4;
            r.push(b);
        }
    }
}

impl KvCache {
    /// The positions in use as plain data.
    pub fn export(&self) -> KvSnapshot {
        let used = self.len * self.kv_dim;
        KvSnapshot {
            n_layers: self.n_layers(),
            kv_dim: self.kv_dim,
            len: self.len,
            k: self.k.iter().fold(Vec::with_capacity(used * self.k.len()), |mut v, l| {
                v.extend_from_slice(&l[..used]);
                v
            }),
            v: self.v.iter().fold(Vec::with_capacity(used * self.v.len()), |mut v, l| {
                v.extend_from_slice(&l[..used]);
                v
            }),
        }
    }

    /// A cache of `context` positions holding `snap` (checked against `n_layers` and
    /// `kv_dim`, the model's).
    pub fn import(snap: &KvSnapshot, n_layers: usize, kv_dim: usize, context: usize) -> Result<KvCache, KvError> {
        snap.check(n_layers, kv_dim, context)?;
        KvCache::check_size(n_layers, kv_dim, context)?;
        let used = snap.len * kv_dim;
        let mut c = KvCache::with_buffers(n_layers, kv_dim, context, used);
        for l in 0..n_layers {
            c.k[l][..used].copy_from_slice(&snap.k[l * used..][..used]);
            c.v[l][..used].copy_from_slice(&snap.v[l * used..][..used]);
        }
        c.len = snap.len;
        Ok(c)
    }
}

impl KvSnapshot {
    /// Checks that this snapshot fits a model of `n_layers` × `kv_dim` and a context of
    /// `context` positions, and that its data has the sizes it declares.
    pub fn check(&self, n_layers: usize, kv_dim: usize, context: usize) -> Result<(), KvError> {
        let want = self.n_layers.checked_mul(self.len).and_then(|x| x.checked_mul(self.kv_dim));
        if (self.n_layers, self.kv_dim) != (n_layers, kv_dim)
            || want != Some(self.k.len())
            || want != Some(self.v.len())
        {
            return Err(KvError::Mismatch {
                expected: format!("{n_layers} layers × {kv_dim} values"),
                found: format!(
                    "{} layers × {} values × {} positions ({} and {} values of data)",
                    self.n_layers,
                    self.kv_dim,
                    self.len,
                    self.k.len(),
                    self.v.len()
                ),
            });
        }
        if self.len > context {
            return Err(KvError::ContextFull { len: 0, adding: self.len, capacity: context });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_caches_buffers_come_back_zeroed() {
        // An odd shape (1 MiB and 12 bytes per layer buffer, above RECYCLE_MIN) no other test uses, so that the
        // buffers taken are the ones dropped here.
        let (layers, kv_dim, context) = (2, 3, (1 << 20) / 12 + 1);
        let floats = context * kv_dim;
        let mut a = KvCache::new(layers, kv_dim, context).unwrap();
        for l in 0..layers {
            let (k, v) = a.layer_mut(l);
            k.fill(7.0);
            v.fill(-7.0);
        }
        let ptrs: Vec<usize> = a.k.iter().chain(&a.v).map(|b| b.as_ptr() as usize).collect();
        drop(a);
        let b = KvCache::new(layers, kv_dim, context).unwrap();
        assert!(b.k.iter().chain(&b.v).any(|k| ptrs.contains(&(k.as_ptr() as usize))), "a kept buffer is reused");
        assert!(b.k.iter().chain(&b.v).all(|x| x.len() == floats && x.iter().all(|&f| f == 0.0)));
        drop(b);
        // Importing writes its positions and zeroes the rest.
        let len = 5;
        let snap = KvSnapshot {
            n_layers: layers,
            kv_dim,
            len,
            k: vec![1.5; layers * len * kv_dim],
            v: vec![2.5; layers * len * kv_dim],
        };
        let mut c = KvCache::import(&snap, layers, kv_dim, context).unwrap();
        for l in 0..layers {
            c.layer_mut(l).0[len * kv_dim..].fill(9.0);
        }
        drop(c);
        let c = KvCache::import(&snap, layers, kv_dim, context).unwrap();
        for l in 0..layers {
            assert!(c.k[l][..len * kv_dim].iter().all(|&f| f == 1.5));
            assert!(c.v[l][..len * kv_dim].iter().all(|&f| f == 2.5));
            assert!(c.k[l][len * kv_dim..].iter().chain(&c.v[l][len * kv_dim..]).all(|&f| f == 0.0));
        }
    }

    #[test]
    fn overflow_is_an_error() {
        let mut c = KvCache::new(2, 4, 3).unwrap();
        c.advance(2).unwrap();
        assert_eq!(c.check_room(2), Err(KvError::ContextFull { len: 2, adding: 2, capacity: 3 }));
        c.advance(1).unwrap();
        assert!(c.advance(1).is_err());
        c.truncate(1);
        assert_eq!(c.len(), 1);
        assert_eq!(c.keys(0).unwrap().len(), 4);
        assert!(c.keys(2).is_none());
        c.clear();
        assert!(c.is_empty());
        assert_eq!(KvCache::new(1, 1, 0).unwrap_err(), KvError::EmptyContext);
        assert!(matches!(KvCache::new(1 << 20, 1 << 20, 1 << 30), Err(KvError::TooLarge { .. })));
    }
}

/// A backend's own copy of a KV cache, kept off the device in the form fastest to bring back
/// to the same backend (CUDA: the pool's blocks in pinned host memory, moved by DMA alone).
pub trait NativeKv: Send + Sync + std::fmt::Debug {
    /// Positions held.
    fn len(&self) -> usize;
    /// Whether it holds no position.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of host memory it takes.
    fn bytes(&self) -> usize;
    /// The portable form (to write to disk, or to restore on another backend).
    fn to_snapshot(&self) -> KvSnapshot;
    /// Writes the portable form's safetensors bytes ([`KvSnapshot::write_safetensors`]);
    /// an image may stream them without building the portable form in memory.
    fn write_safetensors(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        self.to_snapshot().write_safetensors(w)
    }
    /// For the backend that made it to recognise it.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A KV cache taken out of a session: portable ([`KvSnapshot`]) or a backend's own image.
#[derive(Debug, Clone)]
pub enum KvImage {
    /// The portable form, any backend imports it.
    Portable(KvSnapshot),
    /// A backend's own image (see [`NativeKv`]).
    Native(std::sync::Arc<dyn NativeKv>),
}

impl KvImage {
    /// Positions held.
    pub fn len(&self) -> usize {
        match self {
            KvImage::Portable(s) => s.len,
            KvImage::Native(n) => n.len(),
        }
    }

    /// Whether it holds no position.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of host memory it takes.
    pub fn bytes(&self) -> usize {
        match self {
            KvImage::Portable(s) => 4 * (s.k.len() + s.v.len()),
            KvImage::Native(n) => n.bytes(),
        }
    }

    /// Writes the portable form's safetensors bytes (streamed from a native image).
    pub fn write_safetensors(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        match self {
            KvImage::Portable(s) => s.write_safetensors(w),
            KvImage::Native(n) => n.write_safetensors(w),
        }
    }

    /// The portable form (converted on the host for a native image).
    pub fn snapshot(&self) -> std::borrow::Cow<'_, KvSnapshot> {
        match self {
            KvImage::Portable(s) => std::borrow::Cow::Borrowed(s),
            KvImage::Native(n) => std::borrow::Cow::Owned(n.to_snapshot()),
        }
    }
}
