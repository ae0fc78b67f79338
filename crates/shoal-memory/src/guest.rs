//! The Wasmtime `MemoryCreator`: reservations that never move.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use wasmtime::{Config, InstanceAllocationStrategy, LinearMemory, MemoryCreator, MemoryType};

use crate::observer::{CommittedRange, MemoryId, MemoryObserver};
use crate::page_size;

/// The largest reservation made for one memory (memory64 guests with no maximum get this).
pub const MAX_RESERVATION: usize = 8 << 30;

/// The reservation for a 32-bit memory: its whole 4 GiB index space.
const RESERVATION_32: u64 = 4 << 30;
/// Guard after the reservation, so compiled code can elide bounds checks.
const GUARD: u64 = 32 << 20;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What the pool of released memories keeps by default, in all (`SHOAL_MEMORY_POOL_MB`).
const POOL_BYTES: usize = 256 << 20;

/// Creates every linear memory of an engine, announcing committed ranges and
/// releases to one [`MemoryObserver`].
pub struct GuestMemoryCreator {
    observer: Arc<dyn MemoryObserver>,
    pool: Arc<Pool>,
}

/// Released memories kept mapped, their pages resident and zeroed, for the next memory of
/// the same reservation: that memory then takes no page faults (a restored snapshot is
/// written into pages that are already there), as Wasmtime's pooling allocator keeps
/// memories resident. A kept memory is inaccessible (`PROT_NONE`) and released to the
/// observer like any other; it is announced again, as new, when reused.
struct Pool {
    kept: Mutex<Vec<Kept>>,
    /// The most resident bytes kept, in all; a memory larger than a quarter of it is unmapped.
    most_bytes: usize,
}

/// One kept memory: a reservation of `mapped` bytes at `base`, whose first `resident`
/// bytes are backed by zeroed pages.
struct Kept {
    base: usize,
    mapped: usize,
    resident: usize,
}

impl Pool {
    fn new() -> Pool {
        let most_bytes = std::env::var("SHOAL_MEMORY_POOL_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(POOL_BYTES, |mb| mb << 20);
        Pool { kept: Mutex::new(Vec::new()), most_bytes }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently kept memory of `mapped` bytes, if any.
    fn take(&self, mapped: usize) -> Option<Kept> {
        let mut kept = self.lock();
        let i = kept.iter().rposition(|k| k.mapped == mapped)?;
        Some(kept.remove(i))
    }

    /// Whether a memory of `resident` bytes would be kept now.
    fn has_room(&self, resident: usize) -> bool {
        resident > 0
            && resident <= self.most_bytes / 4
            && self.lock().iter().map(|k| k.resident).sum::<usize>() + resident <= self.most_bytes
    }

    /// Keeps `k`, or gives it back when the pool filled meanwhile.
    fn offer(&self, k: Kept) -> Result<(), Kept> {
        let mut kept = self.lock();
        if kept.iter().map(|k| k.resident).sum::<usize>() + k.resident > self.most_bytes {
            return Err(k);
        }
        kept.push(k);
        Ok(())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for k in self.kept.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            // SAFETY: a kept reservation is owned by the pool alone, inaccessible, and was
            // released to the observer before it was kept.
            unsafe { sys::release(k.base, k.mapped) };
        }
    }
}

impl std::fmt::Debug for GuestMemoryCreator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemoryCreator").finish_non_exhaustive()
    }
}

impl GuestMemoryCreator {
    /// A creator that announces to `observer`.
    pub fn new(observer: Arc<dyn MemoryObserver>) -> Self {
        Self { observer, pool: Arc::new(Pool::new()) }
    }

    /// Configures `config` so that every memory comes from a `GuestMemoryCreator`
    /// announcing to `observer`, with the settings the memory contract needs:
    /// copy-on-write initialisation off (Wasmtime issue #10740), memories that may
    /// not move, on-demand allocation (the pooling allocator bypasses the creator),
    /// a 4 GiB reservation plus a guard for 32-bit memories. Released memories are kept,
    /// zeroed and resident, for the next ones (up to 256 MiB in all; `SHOAL_MEMORY_POOL_MB`
    /// sets it, 0 turns it off).
    pub fn configure(config: &mut Config, observer: Arc<dyn MemoryObserver>) {
        config.with_host_memory(Arc::new(Self::new(observer)));
        config.memory_init_cow(false);
        config.memory_may_move(false);
        config.memory_reservation(RESERVATION_32);
        config.memory_reservation_for_growth(0);
        config.memory_guard_size(GUARD);
        config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    }
}

// SAFETY: every memory returned keeps its base for its whole life, maps exactly
// `byte_size()` accessible bytes followed by `PROT_NONE` pages up to the reservation
// plus `guard_size_in_bytes` (as Wasmtime's compiled code assumes), and is owned by
// the Wasmtime instance that asked for it.
unsafe impl MemoryCreator for GuestMemoryCreator {
    fn new_memory(
        &self,
        ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        if ty.is_shared() {
            return Err("shoal does not support shared memories yet".into());
        }
        let reservation = match reserved_size_in_bytes {
            Some(r) => r,
            None => maximum.unwrap_or(MAX_RESERVATION).min(MAX_RESERVATION),
        };
        if minimum > reservation {
            return Err(format!("memory needs {minimum} bytes at start but at most {reservation} can be reserved"));
        }
        let reservation = round_up(reservation, page_size());
        let capacity = match maximum {
            Some(max) => max.min(reservation),
            None => reservation,
        };
        let mapped = reservation
            .checked_add(guard_size_in_bytes)
            .ok_or_else(|| "reservation plus guard overflows".to_string())?;
        let (base, resident) = match self.pool.take(mapped) {
            Some(k) => (k.base, k.resident),
            None => (sys::reserve(mapped).map_err(|e| format!("cannot reserve {mapped} bytes: {e}"))?, 0),
        };

        let mut memory = GuestMemory {
            id: MemoryId(NEXT_ID.fetch_add(1, Ordering::Relaxed)),
            base,
            size: 0,
            capacity,
            mapped,
            resident,
            observer: self.observer.clone(),
            pool: self.pool.clone(),
        };
        memory.grow_to(minimum).map_err(|e| format!("{e:#}"))?;
        log::debug!("{:?}: {mapped} bytes at {base:#x} ({resident} resident), {minimum} committed", memory.id);
        Ok(Box::new(memory))
    }
}

/// One guest memory: a fixed reservation, committed from the start up to `size`.
struct GuestMemory {
    id: MemoryId,
    /// Base address of the reservation; never changes.
    base: usize,
    /// Bytes accessible to the guest.
    size: usize,
    /// The most it may grow to without moving.
    capacity: usize,
    /// Bytes mapped (reservation plus guard), all `PROT_NONE` past `size`.
    mapped: usize,
    /// Bytes from the base backed by pages when it was made (reused from the pool), zeroed.
    resident: usize,
    observer: Arc<dyn MemoryObserver>,
    pool: Arc<Pool>,
}

// SAFETY: `as_ptr` is the same for the memory's whole life, `byte_size` bytes from it
// are readable and writable, and `grow_to` never moves the base (the reservation is
// made once with room for `capacity`).
unsafe impl LinearMemory for GuestMemory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size <= self.size {
            return Ok(());
        }
        if new_size > self.capacity {
            wasmtime::bail!("cannot grow {:?} to {new_size} bytes: its reservation holds {}", self.id, self.capacity);
        }
        let page = page_size();
        let from = round_up(self.size, page);
        let to = round_up(new_size, page);
        if to > from {
            // SAFETY: `from..to` lies inside our reservation (to <= capacity rounded
            // up to a page <= reservation) and is not accessible yet, so nothing holds
            // references into it.
            unsafe { sys::commit(self.base + from, to - from) }
                .map_err(|e| wasmtime::format_err!("cannot commit {} bytes: {e}", to - from))?;
            let range = CommittedRange { memory: self.id, base: self.base, offset: from, len: to - from };
            if let Err(e) = self.observer.committed(range) {
                // SAFETY: the range was committed just above and the guest has not
                // seen it yet (size is unchanged).
                unsafe { sys::decommit(self.base + from, to - from) };
                wasmtime::bail!("backend refused {} new bytes of {:?}: {e}", to - from, self.id);
            }
        }
        self.size = new_size;
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        let used = round_up(self.size, page_size());
        // Contract 6: unregister from every backend before the pages go (or are reused).
        self.observer.released(self.id, self.base, used);
        // Past `used` the pages were never accessible in this memory's life: still zero.
        let resident = self.resident.max(used);
        if self.pool.has_room(resident) {
            // SAFETY: `base..base+used` is this memory's committed, writable range; Wasmtime
            // has dropped its instance and the observer has finished every device operation
            // on it, so nothing else touches it. Zeroed, then made inaccessible again, it is
            // as a fresh reservation whose pages are already there.
            unsafe {
                std::ptr::write_bytes(self.base as *mut u8, 0, used);
                sys::protect(self.base, used);
            }
            match self.pool.offer(Kept { base: self.base, mapped: self.mapped, resident }) {
                Ok(()) => return,
                // SAFETY: as below; the pool did not take it.
                Err(k) => unsafe { sys::release(k.base, k.mapped) },
            }
            return;
        }
        // SAFETY: `base..base+mapped` is exactly the mapping made in `new_memory`,
        // owned by this memory; Wasmtime has dropped its instance, and the observer
        // has finished every device operation on it.
        unsafe { sys::release(self.base, self.mapped) };
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

mod sys {
    use std::io;

    /// Huge pages' size: reservations start on such a boundary.
    const HUGE: usize = 2 << 20;

    /// Reserves `len` bytes of address space with no access, starting on a 2 MiB boundary
    /// and advised for transparent huge pages (where the kernel has them), so that a memory
    /// filled at once (a restored snapshot) takes few page faults.
    pub fn reserve(len: usize) -> io::Result<usize> {
        let over = len + HUGE;
        // SAFETY: an anonymous, private, PROT_NONE mapping at an address the kernel
        // chooses cannot alias any existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                over,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let p = p as usize;
        let base = p.next_multiple_of(HUGE);
        // SAFETY: both trimmed ranges lie inside the mapping just made and hold nothing;
        // what remains is exactly `base..base+len`. The advice only affects that range.
        unsafe {
            if base > p {
                libc::munmap(p as *mut _, base - p);
            }
            if p + over > base + len {
                libc::munmap((base + len) as *mut _, p + over - (base + len));
            }
            libc::madvise(base as *mut _, len, libc::MADV_HUGEPAGE);
        }
        Ok(base)
    }

    /// Makes `addr..addr+len` readable and writable.
    ///
    /// # Safety
    /// The range must lie inside a reservation made by [`reserve`].
    pub unsafe fn commit(addr: usize, len: usize) -> io::Result<()> {
        // SAFETY: the caller guarantees the range is ours.
        let r = unsafe { libc::mprotect(addr as *mut _, len, libc::PROT_READ | libc::PROT_WRITE) };
        if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// Makes `addr..addr+len` inaccessible again and drops its pages.
    ///
    /// # Safety
    /// The range must lie inside a reservation made by [`reserve`] and nothing may
    /// refer to it.
    pub unsafe fn decommit(addr: usize, len: usize) {
        // SAFETY: the caller guarantees the range is ours and unused.
        unsafe {
            libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED);
            libc::mprotect(addr as *mut _, len, libc::PROT_NONE);
        }
    }

    /// Makes `addr..addr+len` inaccessible, keeping its pages.
    ///
    /// # Safety
    /// The range must lie inside a reservation made by [`reserve`] and nothing may
    /// refer to it.
    pub unsafe fn protect(addr: usize, len: usize) {
        // SAFETY: the caller guarantees the range is ours and unused.
        unsafe { libc::mprotect(addr as *mut _, len, libc::PROT_NONE) };
    }

    /// Unmaps a whole reservation.
    ///
    /// # Safety
    /// `addr..addr+len` must be a mapping made by [`reserve`] that nothing uses.
    pub unsafe fn release(addr: usize, len: usize) {
        // SAFETY: the caller guarantees the mapping is ours and unused.
        unsafe { libc::munmap(addr as *mut _, len) };
    }
}
