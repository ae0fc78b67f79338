//! How a memory tells backends about the pages it commits and releases.

use std::fmt;

/// Identifies one guest memory for its whole life (never reused in a process).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemoryId(pub u64);

impl fmt::Debug for MemoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mem#{}", self.0)
    }
}

/// A range of a guest memory that has just become accessible.
///
/// `base` is the memory's base address (it never changes); the range is
/// `base + offset .. base + offset + len`. `offset` and `len` are multiples of the
/// system page size (in practice of the 64 KiB Wasm page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommittedRange {
    /// The memory the range belongs to.
    pub memory: MemoryId,
    /// The memory's base address, as an integer.
    pub base: usize,
    /// Offset of the range from the base, in bytes.
    pub offset: usize,
    /// Length of the range, in bytes.
    pub len: usize,
}

impl CommittedRange {
    /// The first address of the range.
    pub fn start_addr(&self) -> usize {
        self.base + self.offset
    }
}

/// Receives every committed range of every guest memory, and each memory's release.
///
/// A GPU backend implements this to register guest pages with the device
/// (`cuMemHostRegister`, `VK_EXT_external_memory_host`, `newBufferWithBytesNoCopy`).
///
/// # Contract
/// - [`committed`](Self::committed) is called once the range is readable and
///   writable, before the guest can use it (instantiation, `memory.grow`). The pages
///   stay mapped at the same address until [`released`](Self::released) returns.
///   An `Err` makes the instantiation or the `memory.grow` fail (the guest sees
///   `-1` from `memory.grow`); the range is then released again.
/// - [`released`](Self::released) is called once per memory, before any of its
///   pages are unmapped. It must not return while a device operation can still
///   touch the memory: a backend waits for its in-flight work on that memory and
///   unregisters every range of it.
pub trait MemoryObserver: Send + Sync {
    /// A range of `range.memory` became accessible.
    fn committed(&self, range: CommittedRange) -> Result<(), String>;
    /// The memory `memory` at `base` (of `len` committed bytes) is about to be unmapped.
    fn released(&self, memory: MemoryId, base: usize, len: usize);
}

/// An observer that registers nothing (plain CPU execution).
#[derive(Clone, Copy, Debug, Default)]
pub struct NullObserver;

impl MemoryObserver for NullObserver {
    fn committed(&self, _range: CommittedRange) -> Result<(), String> {
        Ok(())
    }
    fn released(&self, _memory: MemoryId, _base: usize, _len: usize) {}
}
