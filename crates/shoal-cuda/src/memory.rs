//! Device memory and pinned host memory, freed on drop.

use std::sync::Arc;

use cudarc::driver::sys;

use crate::{CudaError, Device, check};

/// Device memory (`cuMemAlloc`), freed on drop.
///
/// Whoever queues work on it keeps it alive until that work is done (the owners in shoal
/// synchronise their stream before they drop their buffers).
pub struct DeviceBuffer {
    device: Arc<Device>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

// SAFETY: a device address is plain data; it is freed once, on drop, with the context bound.
unsafe impl Send for DeviceBuffer {}
// SAFETY: as above; `&DeviceBuffer` only reads the address.
unsafe impl Sync for DeviceBuffer {}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer").field("ptr", &format_args!("{:#x}", self.ptr)).field("len", &self.len).finish()
    }
}

impl DeviceBuffer {
    /// `len` bytes of device memory (at least one), not initialised.
    pub fn new(device: &Arc<Device>, len: usize) -> Result<DeviceBuffer, CudaError> {
        device.bind()?;
        let mut ptr = 0;
        // SAFETY: the context is current; freed by Drop.
        check(unsafe { sys::cuMemAlloc_v2(&mut ptr, len.max(1)) }, &format!("cuMemAlloc({len} bytes)"))?;
        Ok(DeviceBuffer { device: device.clone(), ptr, len })
    }

    /// The device address.
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (asked for 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device it lives on.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: allocated by `new` in this context; no work uses it any more (the type's
            // contract).
            unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}

/// Pinned (page-locked) host memory from the device's kept buffers ([`Device::take_pinned`]),
/// given back to them on drop. Copies between it and the device run at the link's speed and
/// may be asynchronous.
pub struct PinnedBuffer {
    device: Arc<Device>,
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

// SAFETY: the buffer is owned by this value alone.
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above; shared access only reads the address.
unsafe impl Sync for PinnedBuffer {}

impl std::fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBuffer").field("len", &self.len).field("cap", &self.cap).finish_non_exhaustive()
    }
}

impl PinnedBuffer {
    /// At least `len` bytes of pinned host memory (contents unspecified: a reused buffer holds
    /// what its last user left).
    pub fn new(device: &Arc<Device>, len: usize) -> Result<PinnedBuffer, CudaError> {
        let (ptr, cap) = device.take_pinned(len)?;
        Ok(PinnedBuffer { device: device.clone(), ptr: ptr as *mut u8, len, cap })
    }

    /// The host address (page-aligned).
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The bytes asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether 0 bytes were asked for.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's real size (≥ [`PinnedBuffer::len`]: buffers are reused).
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: taken from this device by `new`, given back once; the owner's copies have
        // finished (the type's users synchronise before dropping it).
        unsafe { self.device.give_pinned(self.ptr as usize, self.cap) };
    }
}

/// Fills `len` bytes at `ptr` with zero on `stream` (asynchronously).
///
/// # Safety
/// `ptr..ptr + len` must be device memory of the stream's context that stays allocated until
/// the stream has run the fill.
pub unsafe fn memset_zero_async(ptr: sys::CUdeviceptr, len: usize, stream: sys::CUstream) -> Result<(), CudaError> {
    // SAFETY: the caller's contract.
    check(unsafe { sys::cuMemsetD8Async(ptr, 0, len, stream) }, "cuMemsetD8Async")
}
