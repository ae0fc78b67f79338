//! Guest linear memories that never move and that GPU backends use in place.
//!
//! shoal creates every Wasm linear memory itself (through Wasmtime's
//! [`MemoryCreator`](wasmtime::MemoryCreator)): one virtual reservation per memory
//! whose base never moves, `PROT_NONE` past the current size, and growth that
//! commits only the new range. Every committed range and the final release are
//! announced to a [`MemoryObserver`] (a compute backend), which registers the pages
//! with the GPU so that kernels read and write the guest's own bytes.
//!
//! Host functions check every `(offset, len, align)` a guest names with
//! [`check_view`] before touching anything.
//!
//! ```no_run
//! # #[cfg(feature = "wasmtime")] {
//! use std::sync::Arc;
//! use shoal_memory::{GuestMemoryCreator, NullObserver};
//! let mut config = wasmtime::Config::new();
//! GuestMemoryCreator::configure(&mut config, Arc::new(NullObserver));
//! let engine = wasmtime::Engine::new(&config).unwrap();
//! # }
//! ```
//!
//! # Cargo features
//! - `wasmtime` (default): the Wasmtime `MemoryCreator`. Without it the crate only
//!   offers the observer interface and the view checks, which build on any target.
//!
//! # The memory contract
//! See `docs/memory.md`. In short:
//! 1. a memory is reserved once and never moves; growth commits and announces only
//!    the new range;
//! 2. a guest can name only its own memory, and every view is checked against the
//!    size at the time of the call;
//! 3. control data is read once, into host memory, before it is acted upon;
//! 4. synchronous calls finish with the memory before they return;
//! 5. nothing a guest does makes a kernel touch memory outside its registered pages;
//! 6. a memory is unregistered from every backend before its pages are unmapped.

#![cfg_attr(not(unix), allow(dead_code))]

mod observer;
mod view;

#[cfg(all(feature = "wasmtime", unix))]
mod guest;
#[cfg(all(feature = "wasmtime", unix))]
pub use guest::{GuestMemoryCreator, MAX_RESERVATION};

pub use observer::{CommittedRange, MemoryId, MemoryObserver, NullObserver};
pub use view::{ViewError, check_view, ranges_overlap};

/// Resident memory of this process, in bytes (Linux: `/proc/self/statm`).
///
/// Returns `None` where the platform does not expose it.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(resident_pages * page_size() as u64)
}

/// Asks the kernel to back `ptr..ptr+len` with writable pages now, in one call, rather than
/// one fault per page as they are first written (Linux 5.14+ `MADV_POPULATE_WRITE`; a no-op
/// elsewhere or where the kernel refuses). Restoring a snapshot into a fresh memory uses it.
///
/// # Safety
/// The range must be committed, writable memory of this process that nothing else is using in
/// a way the kernel's population could disturb (it only maps pages; contents are unchanged).
pub unsafe fn prefault(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the caller guarantees the range is committed and writable; the advice
        // changes no contents.
        unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// The system page size.
pub fn page_size() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions; it returns -1 on error, handled below.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 { n as usize } else { 4096 }
    }
    #[cfg(not(unix))]
    {
        4096
    }
}
