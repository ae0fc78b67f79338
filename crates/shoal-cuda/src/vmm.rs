//! [`GrowableBuffer`]: device memory at an address that never moves, backed by physical
//! chunks mapped as they are needed and charged to the device's KV budget (CUDA virtual
//! memory management); [`ChunkPlan`]: its arithmetic, pure.

use std::collections::BTreeSet;
use std::sync::Arc;

use cudarc::driver::sys;

use crate::{CudaError, Device, check};

/// How units (KV blocks) of a growable buffer fall into chunks of physical memory.
///
/// Unit `i` lies at `i × unit_bytes`; a unit is usable when every byte of it is mapped, so the
/// first `c` chunks hold [`units_in(c)`](ChunkPlan::units_in) whole units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Bytes of one unit.
    pub unit_bytes: usize,
    /// Bytes of one chunk (a multiple of the allocation granularity).
    pub chunk_bytes: usize,
    /// Chunks the reserved address range holds.
    pub max_chunks: usize,
    /// Units the buffer is for.
    pub max_units: usize,
}

impl ChunkPlan {
    /// A plan for `max_units` units of `unit_bytes` (both at least 1), in chunks of
    /// `chunk_hint` bytes rounded up to `granularity`, no larger than the whole (rounded up).
    pub fn new(unit_bytes: usize, max_units: usize, chunk_hint: usize, granularity: usize) -> ChunkPlan {
        let (unit_bytes, max_units, granularity) = (unit_bytes.max(1), max_units.max(1), granularity.max(1));
        let total = (unit_bytes * max_units).next_multiple_of(granularity);
        let chunk_bytes = chunk_hint.max(1).next_multiple_of(granularity).min(total);
        ChunkPlan { unit_bytes, chunk_bytes, max_chunks: total.div_ceil(chunk_bytes), max_units }
    }

    /// One chunk holding exactly `units` units (an allocation that cannot grow).
    pub fn fixed(unit_bytes: usize, units: usize) -> ChunkPlan {
        let (unit_bytes, units) = (unit_bytes.max(1), units.max(1));
        ChunkPlan { unit_bytes, chunk_bytes: unit_bytes * units, max_chunks: 1, max_units: units }
    }

    /// Bytes of address space the plan covers.
    pub fn reserved_bytes(&self) -> usize {
        self.max_chunks * self.chunk_bytes
    }

    /// Whole units in the first `chunks` chunks (at most [`ChunkPlan::max_units`]).
    pub fn units_in(&self, chunks: usize) -> usize {
        (chunks.min(self.max_chunks) * self.chunk_bytes / self.unit_bytes).min(self.max_units)
    }

    /// Chunks to map so that the first `units` units are usable, or `None` past the plan.
    pub fn chunks_for(&self, units: usize) -> Option<usize> {
        (units <= self.max_units).then(|| (units * self.unit_bytes).div_ceil(self.chunk_bytes))
    }

    /// Chunks to keep mapped when the units in use are the first `mapped_units` less those
    /// in `free`: the chunks up to the highest unit in use; the chunks above it may be
    /// unmapped (and their units dropped from the free list).
    pub fn chunks_to_keep(&self, mapped_units: usize, free: &BTreeSet<u32>) -> usize {
        let highest = (0..mapped_units).rev().find(|&u| !free.contains(&(u as u32)));
        highest.map_or(0, |h| self.chunks_for(h + 1).unwrap_or(self.max_chunks))
    }
}

/// Device memory whose address never moves, mapped chunk by chunk ([`ChunkPlan`]) as the
/// owner asks, each chunk charged to the device's KV budget while mapped. Kernels and
/// recorded graphs may keep using `ptr() + offset` for any offset in the mapped chunks.
/// Whoever queues work on it keeps it alive (and those chunks mapped) until that work is done.
///
/// Where the device has no virtual memory management it is one fixed allocation (as many
/// units as the budget has room for when made, at most the plan's), charged whole.
pub struct GrowableBuffer {
    device: Arc<Device>,
    base: sys::CUdeviceptr,
    plan: ChunkPlan,
    /// The physical allocation of each mapped chunk, from the bottom (VMM only).
    handles: Vec<sys::CUmemGenericAllocationHandle>,
    /// One `cuMemAlloc` allocation, all of it mapped from the start.
    fixed: bool,
}

// SAFETY: the address range and allocation handles are plain values, changed only through
// `&mut self`; every driver call binds the context first.
unsafe impl Send for GrowableBuffer {}
// SAFETY: `&GrowableBuffer` only reads them.
unsafe impl Sync for GrowableBuffer {}

impl std::fmt::Debug for GrowableBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrowableBuffer")
            .field("plan", &self.plan)
            .field("mapped_chunks", &self.mapped_chunks())
            .field("fixed", &self.fixed)
            .finish_non_exhaustive()
    }
}

/// The allocation properties of device memory on `device`.
fn device_prop(device: &Device) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: device.raw_device(),
        },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

impl GrowableBuffer {
    /// Address space for `max_units` units of `unit_bytes` in chunks of about `chunk_hint`
    /// bytes, nothing mapped yet; or, without virtual memory management, one allocation of
    /// as many units as the budget has room for now (at most `max_units`), charged whole.
    pub fn new(
        device: &Arc<Device>,
        unit_bytes: usize,
        max_units: usize,
        chunk_hint: usize,
    ) -> Result<GrowableBuffer, CudaError> {
        let budget = device.kv_budget()?;
        device.bind()?;
        if !device.attributes().virtual_memory {
            let units = max_units.min(budget.available() / unit_bytes.max(1));
            if units == 0 {
                return Err(CudaError::OverBudget { asked: unit_bytes, used: budget.used(), limit: budget.limit() });
            }
            let plan = ChunkPlan::fixed(unit_bytes, units);
            budget.reserve(plan.chunk_bytes)?;
            let mut base = 0;
            // SAFETY: the context is current; freed by Drop.
            let r = unsafe { sys::cuMemAlloc_v2(&mut base, plan.chunk_bytes) };
            if let Err(e) = check(r, &format!("cuMemAlloc(KV pool, {} bytes)", plan.chunk_bytes)) {
                budget.release(plan.chunk_bytes);
                return Err(e);
            }
            log::debug!("no CUDA virtual memory management: a fixed KV pool of {} bytes", plan.chunk_bytes);
            return Ok(GrowableBuffer { device: device.clone(), base, plan, handles: Vec::new(), fixed: true });
        }
        let prop = device_prop(device);
        let mut granularity = 0;
        check(
            // SAFETY: `prop` describes device memory of this device; a plain query.
            unsafe {
                sys::cuMemGetAllocationGranularity(
                    &mut granularity,
                    &prop,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                )
            },
            "cuMemGetAllocationGranularity",
        )?;
        let plan = ChunkPlan::new(unit_bytes, max_units, chunk_hint, granularity);
        let mut base = 0;
        check(
            // SAFETY: reserves address space only (no memory); freed by Drop.
            unsafe { sys::cuMemAddressReserve(&mut base, plan.reserved_bytes(), 0, 0, 0) },
            &format!("cuMemAddressReserve({} bytes)", plan.reserved_bytes()),
        )?;
        Ok(GrowableBuffer { device: device.clone(), base, plan, handles: Vec::new(), fixed: false })
    }

    /// The device address of unit 0 (it never changes).
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.base
    }

    /// How units fall into chunks.
    pub fn plan(&self) -> &ChunkPlan {
        &self.plan
    }

    /// Chunks mapped now.
    pub fn mapped_chunks(&self) -> usize {
        if self.fixed { 1 } else { self.handles.len() }
    }

    /// Units usable now.
    pub fn mapped_units(&self) -> usize {
        self.plan.units_in(self.mapped_chunks())
    }

    /// Bytes charged to the budget now.
    pub fn charged_bytes(&self) -> usize {
        self.mapped_chunks() * self.plan.chunk_bytes
    }

    /// Whether chunks are mapped on demand (false: one fixed allocation).
    pub fn is_growable(&self) -> bool {
        !self.fixed
    }

    /// Maps chunks until `chunks` are mapped, charging each to the budget first. Fails with
    /// [`CudaError::OverBudget`] (mapping nothing) when the budget has no room for them all,
    /// or with the driver's error (keeping what was mapped before the failure).
    pub fn grow_to(&mut self, chunks: usize) -> Result<(), CudaError> {
        let have = self.mapped_chunks();
        if chunks <= have {
            return Ok(());
        }
        if self.fixed || chunks > self.plan.max_chunks {
            let asked = (chunks - have) * self.plan.chunk_bytes;
            let budget = self.device.kv_budget()?;
            return Err(CudaError::OverBudget { asked, used: budget.used(), limit: budget.limit() });
        }
        let device = self.device.clone();
        let budget = device.kv_budget()?;
        let chunk = self.plan.chunk_bytes;
        budget.reserve((chunks - have) * chunk)?;
        let result = self.map_chunks(chunks);
        let mapped = self.handles.len();
        if mapped < chunks {
            budget.release((chunks - mapped) * chunk);
        }
        result
    }

    fn map_chunks(&mut self, chunks: usize) -> Result<(), CudaError> {
        self.device.bind()?;
        let prop = device_prop(&self.device);
        let access = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        let chunk = self.plan.chunk_bytes;
        while self.handles.len() < chunks {
            let at = self.base + (self.handles.len() * chunk) as u64;
            let mut handle = 0;
            // SAFETY: the context is current; `prop` describes this device's memory and
            // `chunk` is a multiple of its granularity; released by `shrink_to` or below.
            check(unsafe { sys::cuMemCreate(&mut handle, chunk, &prop, 0) }, &format!("cuMemCreate({chunk} bytes)"))?;
            // SAFETY: `at..at + chunk` lies in our reserved range and is not mapped (chunks
            // are mapped in order above the mapped ones); `handle` is a fresh allocation of
            // `chunk` bytes.
            let mapped = check(unsafe { sys::cuMemMap(at, chunk, 0, handle, 0) }, "cuMemMap").and_then(|()| {
                // SAFETY: the range was just mapped; read/write for this device only.
                check(unsafe { sys::cuMemSetAccess(at, chunk, &access, 1) }, "cuMemSetAccess").inspect_err(|_| {
                    // SAFETY: mapped just above, used by no one yet.
                    unsafe { sys::cuMemUnmap(at, chunk) };
                })
            });
            if let Err(e) = mapped {
                // SAFETY: our fresh allocation, not mapped.
                unsafe { sys::cuMemRelease(handle) };
                return Err(e);
            }
            self.handles.push(handle);
        }
        Ok(())
    }

    /// Unmaps the chunks above the first `chunks` and gives their bytes back to the budget.
    ///
    /// # Safety
    /// No work queued or running on the device may use those chunks (the owner synchronises
    /// the streams that use the buffer first), and the owner hands out no unit above
    /// [`GrowableBuffer::mapped_units`] after this.
    pub unsafe fn shrink_to(&mut self, chunks: usize) {
        if self.fixed || chunks >= self.handles.len() {
            return;
        }
        if self.device.bind().is_err() {
            return;
        }
        let chunk = self.plan.chunk_bytes;
        let gone = self.handles.len() - chunks;
        for (i, handle) in self.handles.drain(chunks..).enumerate().rev() {
            let at = self.base + ((chunks + i) * chunk) as u64;
            // SAFETY: chunk `chunks + i` is mapped at `at` with `handle`; no work uses it and
            // the owner hands out none of its units any more (the caller's contract).
            unsafe {
                sys::cuMemUnmap(at, chunk);
                sys::cuMemRelease(handle);
            }
        }
        if let Ok(budget) = self.device.kv_budget() {
            budget.release(gone * chunk);
        }
    }
}

impl Drop for GrowableBuffer {
    fn drop(&mut self) {
        if self.fixed {
            if self.device.bind().is_ok() {
                // SAFETY: our allocation; no work uses it any more (the type's contract).
                unsafe { sys::cuMemFree_v2(self.base) };
            }
            if let Ok(budget) = self.device.kv_budget() {
                budget.release(self.plan.chunk_bytes);
            }
            return;
        }
        // SAFETY: no work uses the buffer any more (the type's contract), and nothing can
        // hand out its units after this.
        unsafe { self.shrink_to(0) };
        if self.handles.is_empty() && self.device.bind().is_ok() {
            // SAFETY: our reservation, nothing mapped in it any more.
            unsafe { sys::cuMemAddressFree(self.base, self.plan.reserved_bytes()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn chunks_are_the_hint_rounded_to_the_granularity_and_no_larger_than_the_whole() {
        // 1000 units of 360 KiB in 64 MiB chunks at 2 MiB granularity.
        let p = ChunkPlan::new(360 << 10, 1000, 64 * MIB, 2 * MIB);
        assert_eq!(p.chunk_bytes, 64 * MIB);
        assert_eq!(p.reserved_bytes(), p.max_chunks * 64 * MIB);
        assert!(p.reserved_bytes() >= 1000 * (360 << 10));
        assert_eq!(p.max_chunks, (1000usize * (360 << 10)).div_ceil(64 * MIB));
        // A hint that is not a multiple of the granularity is rounded up.
        assert_eq!(ChunkPlan::new(4096, 10_000, 3 * MIB, 2 * MIB).chunk_bytes, 4 * MIB);
        // A small pool is one chunk of its own size, rounded up to the granularity.
        let small = ChunkPlan::new(368_640, 5, 64 * MIB, 2 * MIB);
        assert_eq!((small.chunk_bytes, small.max_chunks), (2 * MIB, 1));
        assert_eq!(small.units_in(1), 5, "no more than the units asked for");
    }

    #[test]
    fn chunks_to_map_for_a_number_of_units() {
        // Units of 3 bytes in chunks of 8: unit 2 straddles chunks 0 and 1.
        let p = ChunkPlan { unit_bytes: 3, chunk_bytes: 8, max_chunks: 4, max_units: 10 };
        assert_eq!(p.chunks_for(0), Some(0));
        assert_eq!(p.chunks_for(1), Some(1));
        assert_eq!(p.chunks_for(2), Some(1));
        assert_eq!(p.chunks_for(3), Some(2), "the straddling unit needs both chunks");
        assert_eq!(p.chunks_for(10), Some(4));
        assert_eq!(p.chunks_for(11), None, "past the plan");
        assert_eq!([0, 1, 2, 3, 4].map(|c| p.units_in(c)), [0, 2, 5, 8, 10]);
        // Mapping chunks_for(n) always makes at least n units usable.
        for n in 0..=10 {
            assert!(p.units_in(p.chunks_for(n).unwrap()) >= n);
        }
    }

    #[test]
    fn trailing_chunks_whose_units_are_all_free_may_be_unmapped() {
        let p = ChunkPlan { unit_bytes: 3, chunk_bytes: 8, max_chunks: 4, max_units: 10 };
        let free = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        // 4 chunks, 10 units; unit 0 (the sink) is always in use.
        assert_eq!(p.chunks_to_keep(10, &free(&[1, 2, 3, 4, 5, 6, 7, 8, 9])), 1);
        // Unit 2 in use: it straddles into chunk 1, which stays.
        assert_eq!(p.chunks_to_keep(10, &free(&[1, 3, 4, 5, 6, 7, 8, 9])), 2);
        // A hole in the middle does not matter; the highest unit in use does.
        assert_eq!(p.chunks_to_keep(10, &free(&[1, 2, 3, 4, 5, 6, 7, 8])), 4);
        assert_eq!(p.chunks_to_keep(8, &free(&[3, 4, 5, 6, 7])), 2);
        // Nothing in use at all.
        assert_eq!(p.chunks_to_keep(5, &free(&[0, 1, 2, 3, 4])), 0);
        assert_eq!(p.chunks_to_keep(0, &free(&[])), 0);
    }

    #[test]
    fn a_fixed_plan_is_one_chunk_of_exactly_its_units() {
        let p = ChunkPlan::fixed(100, 7);
        assert_eq!((p.chunk_bytes, p.max_chunks, p.units_in(1), p.chunks_for(7)), (700, 1, 7, Some(1)));
        assert_eq!(p.chunks_for(8), None);
    }
}
