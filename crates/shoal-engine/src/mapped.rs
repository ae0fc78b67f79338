//! Model file bytes, memory-mapped or owned, and the quoting of file-derived text in error
//! messages: shared by the GGUF and safetensors readers.

use std::path::Path;

/// The bytes of a model file.
pub(crate) enum Storage {
    /// A read-only mapping of the file.
    Mapped(memmap2::Mmap),
    /// Bytes held in memory (tests, `from_bytes`, empty files).
    Owned(Vec<u8>),
}

impl Storage {
    /// Maps the file at `path` read-only (an empty file is an empty buffer: there is
    /// nothing to map, and the parser reports it).
    pub(crate) fn map(path: &Path) -> std::io::Result<Storage> {
        let file = std::fs::File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(Storage::Owned(Vec::new()));
        }
        // SAFETY: the mapping is read-only and private to this value, and nothing in this
        // process writes to the file. Like every reader of memory-mapped model files
        // (llama.cpp included) we rely on other processes not truncating or rewriting the
        // file while it is mapped: that would change or unmap bytes under the slices the
        // readers hand out. Every offset is checked against the mapping's length, which is
        // fixed once mapped.
        Ok(Storage::Mapped(unsafe { memmap2::Mmap::map(&file) }?))
    }

    /// All the bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// How many characters of file-derived text [`quote`] shows before it cuts.
const QUOTE_CHARS: usize = 64;

/// File-derived text (a key, a tensor name, a string value) made fit for an error message.
///
/// Errors describe, they do not quote: a crafted file must not be able to print megabytes,
/// binary or terminal escapes through an error. UTF-8 is kept where printable; control,
/// format and other unprintable characters and backslashes are escaped as
/// [`char::escape_debug`] does (`\n`, `\u{202e}`, `\\`), bytes that are not UTF-8 as `\xNN`;
/// after about 64 characters the text is cut and `…(N bytes)` appended, N the whole length.
/// Quotes are left as they are (messages put names between backquotes). The result holds no
/// control character.
pub(crate) fn quote(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut shown = 0;
    // 65 characters of at most 4 bytes each: enough to reach the cut, however long the text.
    let head = &bytes[..bytes.len().min(4 * QUOTE_CHARS + 4)];
    let whole = 'chunks: {
        for chunk in head.utf8_chunks() {
            for c in chunk.valid().chars() {
                let escaped = c.escape_debug();
                let n = if matches!(c, '"' | '\'') { 1 } else { escaped.len() };
                if shown + n > QUOTE_CHARS {
                    break 'chunks false;
                }
                shown += n;
                if n == 1 {
                    out.push(c);
                } else {
                    out.extend(escaped);
                }
            }
            for b in chunk.invalid() {
                if shown + 4 > QUOTE_CHARS {
                    break 'chunks false;
                }
                shown += 4;
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        true
    };
    if !whole {
        out.push_str(&format!("…({} bytes)", bytes.len()));
    }
    out
}

/// A shape or a list of dimensions for an error message: at most 8 of them, then the count.
pub(crate) fn dims(dims: &[u64]) -> String {
    if dims.len() <= 8 {
        return format!("{dims:?}");
    }
    let head: Vec<String> = dims[..8].iter().map(u64::to_string).collect();
    format!("[{}, …({} dimensions)]", head.join(", "), dims.len())
}
