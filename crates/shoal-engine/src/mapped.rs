//! Model file bytes, memory-mapped or owned: shared by the GGUF and safetensors readers.

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
