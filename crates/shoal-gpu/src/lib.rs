//! Compute backends that work on guest memory in place.
//!
//! A [`Device`] is a closed enum over the backends: [`cpu`] (the reference, always
//! there), [`wgpu`](mod@crate::wgpu) (Vulkan on Linux and Windows, Metal on Apple,
//! importing guest pages with `VK_EXT_external_memory_host` /
//! `newBufferWithBytesNoCopy`) and [`cuda`](mod@crate::cuda) (guest memory
//! registered with `cuMemHostRegister`, cuBLAS, NVRTC kernels; CUDA is loaded at run
//! time, so it builds everywhere and says why it is unavailable where it is). Every backend receives operations already checked against the guest
//! memory ([`GemmSpec::check`]) and a [`GuestSpan`] naming that memory; it reports the
//! path it took ([`OpReport`]): on the guest's own pages, or through one explicit copy.
//!
//! A `Device` is also the [`MemoryObserver`](shoal_memory::MemoryObserver) of the
//! memories it works on: it imports (registers) every committed range, and forgets it
//! when the memory is released.
//!
//! ```no_run
//! use shoal_gpu::{BackendKind, Device};
//! let device = Device::open(BackendKind::Cpu).unwrap();
//! println!("{}", device.info().name);
//! ```
//!
//! # Cargo features
//! - `wgpu` (default): the Vulkan / Metal backend.
//! - `cuda` (default): the CUDA backend (dynamically loaded; no toolkit needed to build).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
mod cuda {
    //! Built without the `cuda` feature.
    use crate::{BackendKind, OpenError};
    pub fn open_error() -> OpenError {
        OpenError::NotCompiled(BackendKind::Cuda, "built without the `cuda` feature")
    }
}
mod op;
#[cfg(feature = "wgpu")]
pub mod wgpu;

use std::fmt;
use std::ops::Range;

pub use op::{BufferId, DType, Gemm, GemmSpec, MAX_DIM, Scal, Space, extent};
use shoal_memory::{CommittedRange, MemoryId, MemoryObserver};

/// The backends shoal knows, available in this build or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Multi-threaded CPU, the reference.
    Cpu,
    /// Vulkan through wgpu.
    Vulkan,
    /// Metal through wgpu (Apple).
    Metal,
    /// NVIDIA CUDA.
    Cuda,
}

impl BackendKind {
    /// Every kind, best first (the order `auto` tries them in).
    pub const ALL: [BackendKind; 4] = [BackendKind::Cuda, BackendKind::Metal, BackendKind::Vulkan, BackendKind::Cpu];

    /// The lowercase name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Vulkan => "vulkan",
            BackendKind::Metal => "metal",
            BackendKind::Cuda => "cuda",
        }
    }

    /// The ABI's number for this kind (`device_info`).
    pub fn abi_code(self) -> u32 {
        match self {
            BackendKind::Cpu => 0,
            BackendKind::Vulkan => 1,
            BackendKind::Cuda => 2,
            BackendKind::Metal => 3,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        BackendKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown backend `{s}`; expected one of cpu, vulkan, metal, cuda"))
    }
}

/// What a backend is and can do.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    /// Which backend.
    pub backend: BackendKind,
    /// The adapter's name (GPU model, driver, or the CPU).
    pub name: String,
    /// Whether guest memory is used in place (imported / registered), not copied.
    pub imports_guest_memory: bool,
    /// Why not, when it is not.
    pub import_note: Option<String>,
    /// The largest range one kernel argument may cover, in bytes.
    pub max_binding_bytes: u64,
    /// Element types GEMM accepts.
    pub gemm_dtypes: Vec<DType>,
}

/// Why a backend cannot be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// The backend is not part of this build.
    #[error("the {0} backend is not compiled into this build of shoal ({1})")]
    NotCompiled(BackendKind, &'static str),
    /// The backend is built but no usable device was found.
    #[error("no {0} device: {1}")]
    Unavailable(BackendKind, String),
}

/// Why an operation was refused or failed. Each variant has a stable ABI code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// An argument is wrong (a stride shorter than a row, a view too small…).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A view ends past the guest memory.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    /// A view is not aligned to its element size.
    #[error("misaligned: {0}")]
    Misaligned(String),
    /// The output overlaps an input.
    #[error("overlapping views: {0}")]
    Overlap(String),
    /// A size is absurd or its arithmetic overflows.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The backend does not do this (a dtype, an op).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The device failed.
    #[error("device error: {0}")]
    Device(String),
    /// An unknown buffer.
    #[error("bad handle: {0}")]
    BadHandle(String),
}

/// The largest device buffer one call may create (1 TiB: larger is refused as absurd).
pub const MAX_BUFFER_BYTES: u64 = 1 << 40;

/// Device buffers of one backend: id → storage, shared with operations in flight (an
/// operation holds its buffers until it completes, so freeing one never pulls memory
/// from under the device).
pub(crate) struct BufferTable<T> {
    next: std::sync::atomic::AtomicU64,
    map: std::sync::Mutex<std::collections::HashMap<BufferId, std::sync::Arc<T>>>,
}

impl<T> Default for BufferTable<T> {
    fn default() -> Self {
        BufferTable { next: std::sync::atomic::AtomicU64::new(1), map: Default::default() }
    }
}

impl<T> BufferTable<T> {
    pub(crate) fn insert(&self, t: T) -> BufferId {
        let id = BufferId(self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(id, std::sync::Arc::new(t));
        id
    }
    pub(crate) fn get(&self, id: BufferId) -> Result<std::sync::Arc<T>, OpError> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| OpError::BadHandle(format!("no device buffer {}", id.0)))
    }
    pub(crate) fn remove(&self, id: BufferId) -> Result<(), OpError> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
            .map(drop)
            .ok_or_else(|| OpError::BadHandle(format!("no device buffer {}", id.0)))
    }
}

/// A guest memory as an operation sees it: its base and its size at the time of the call.
#[derive(Clone, Copy, Debug)]
pub struct GuestSpan {
    base: usize,
    size: usize,
}

impl GuestSpan {
    /// Names `size` bytes at `base`.
    ///
    /// # Safety
    /// `base..base+size` must be readable and writable memory that stays mapped, and
    /// that nothing else accesses in a way that conflicts with the operations given
    /// this span, until every operation using it has completed (a synchronous call
    /// has returned; an asynchronous one has been waited for, or the memory's
    /// [`MemoryObserver::released`] has returned). Guest memories from
    /// `shoal-memory`, with the guest blocked in a host call, satisfy this.
    pub unsafe fn new(base: *mut u8, size: usize) -> Self {
        GuestSpan { base: base as usize, size }
    }
    /// Base address.
    pub fn base(&self) -> usize {
        self.base
    }
    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
    /// The bytes `range` of the span as a pointer; `range` must lie inside the span.
    pub(crate) fn ptr(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset <= self.size);
        (self.base + offset) as *mut u8
    }
}

/// How an operation reached the guest's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataPath {
    /// The device worked on the guest's own pages (imported / registered / CPU).
    InPlace,
    /// One explicit copy to device memory and back (import unavailable for a view).
    Copy,
    /// One DMA from registered guest pages to device memory and back (no CPU copy).
    Dma,
    /// Every operand was in device buffers: no guest memory was touched.
    Device,
}

impl DataPath {
    /// The ABI's number for the path (`last_op`).
    pub fn abi_code(self) -> u32 {
        match self {
            DataPath::InPlace => 0,
            DataPath::Copy => 1,
            DataPath::Dma => 2,
            DataPath::Device => 3,
        }
    }
}

/// Where one operand's data was when the device used it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OperandMapping {
    /// The guest address of the first byte the device bound for this operand.
    pub guest_addr: usize,
    /// The host address the device buffer maps at that byte, if it maps host memory
    /// (an imported guest range); `None` for device memory that holds a copy.
    pub device_host_addr: Option<usize>,
}

/// What an operation did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpReport {
    /// Each binding of each operand, as the device saw it.
    pub operands: Vec<OperandMapping>,
    /// Bytes copied between host and device.
    pub bytes_copied: u64,
    /// Kernel dispatches (tiles) it took.
    pub dispatches: u32,
    /// The operands went by DMA from registered guest pages to device memory and back.
    pub dma: bool,
    /// Operands that were in device buffers (not in `operands`).
    pub device_operands: u32,
}

impl OpReport {
    /// True only when every binding mapped exactly the guest's own bytes (pointer identity).
    pub fn in_place(&self) -> bool {
        self.operands.iter().all(|o| o.device_host_addr == Some(o.guest_addr))
    }
    /// The path taken, from the pointer identities.
    pub fn path(&self) -> DataPath {
        if self.operands.is_empty() && self.device_operands > 0 {
            DataPath::Device
        } else if self.in_place() {
            DataPath::InPlace
        } else if self.dma {
            DataPath::Dma
        } else {
            DataPath::Copy
        }
    }
}

/// An operation submitted and not yet waited for.
pub struct Pending {
    inner: PendingInner,
}

enum PendingInner {
    Done(Result<OpReport, OpError>),
    Cpu(cpu::CpuPending),
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaPending),
    #[cfg(feature = "wgpu")]
    Wgpu(wgpu::WgpuPending),
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pending")
    }
}

impl Pending {
    /// Blocks until the device is done with the guest's memory, then reports.
    pub fn wait(self) -> Result<OpReport, OpError> {
        match self.inner {
            PendingInner::Done(r) => r,
            PendingInner::Cpu(p) => p.wait(),
            #[cfg(feature = "cuda")]
            PendingInner::Cuda(p) => p.wait(),
            #[cfg(feature = "wgpu")]
            PendingInner::Wgpu(p) => p.wait(),
        }
    }
}

/// One compute device: a closed enum over the backends.
pub enum Device {
    /// The CPU reference.
    Cpu(cpu::CpuBackend),
    /// Vulkan or Metal through wgpu.
    #[cfg(feature = "wgpu")]
    Wgpu(wgpu::WgpuBackend),
    /// NVIDIA CUDA.
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaBackend),
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.info().name)
    }
}

impl Device {
    /// Opens the backend `kind`.
    pub fn open(kind: BackendKind) -> Result<Device, OpenError> {
        match kind {
            BackendKind::Cpu => Ok(Device::Cpu(cpu::CpuBackend::new())),
            #[cfg(feature = "wgpu")]
            BackendKind::Vulkan | BackendKind::Metal => Ok(Device::Wgpu(wgpu::WgpuBackend::open(kind)?)),
            #[cfg(not(feature = "wgpu"))]
            BackendKind::Vulkan | BackendKind::Metal => {
                Err(OpenError::NotCompiled(kind, "built without the `wgpu` feature"))
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Ok(Device::Cuda(cuda::CudaBackend::open()?)),
            #[cfg(not(feature = "cuda"))]
            BackendKind::Cuda => Err(cuda::open_error()),
        }
    }

    /// Opens the best available backend (CUDA, Metal, Vulkan, then CPU), with the
    /// reasons the better ones were skipped.
    pub fn open_best() -> (Device, Vec<OpenError>) {
        let mut skipped = Vec::new();
        for kind in BackendKind::ALL {
            match Device::open(kind) {
                Ok(d) => return (d, skipped),
                Err(e) => skipped.push(e),
            }
        }
        unreachable!("the CPU backend always opens")
    }

    /// What this device is.
    pub fn info(&self) -> &DeviceInfo {
        match self {
            Device::Cpu(b) => b.info(),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.info(),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.info(),
        }
    }

    /// `C = alpha·op(A)·op(B) + beta·C` on the guest memory `span`, synchronously.
    pub fn gemm(&self, span: &GuestSpan, op: &Gemm) -> Result<OpReport, OpError> {
        self.check_dtype(op.dtype)?;
        if op.m == 0 || op.n == 0 {
            return Ok(OpReport::default());
        }
        match self {
            Device::Cpu(b) => b.gemm(span, op),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.submit_gemm(span, op)?.wait(),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.submit_gemm(span, op)?.wait(),
        }
    }

    /// Submits a GEMM; the guest memory it names is lent to the device until
    /// [`Pending::wait`] returns.
    pub fn submit_gemm(&self, span: &GuestSpan, op: &Gemm) -> Result<Pending, OpError> {
        self.check_dtype(op.dtype)?;
        if op.m == 0 || op.n == 0 {
            return Ok(Device::ready(Ok(OpReport::default())));
        }
        let inner = match self {
            Device::Cpu(b) => PendingInner::Cpu(b.submit_gemm(span, op)?),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => PendingInner::Wgpu(b.submit_gemm(span, op)?),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => PendingInner::Cuda(b.submit_gemm(span, op)?),
        };
        Ok(Pending { inner })
    }

    /// `x = alpha·x` on the guest memory, synchronously.
    pub fn scal(&self, span: &GuestSpan, op: &Scal) -> Result<OpReport, OpError> {
        if op.x.is_empty() {
            return Ok(OpReport::default());
        }
        match self {
            Device::Cpu(b) => Ok(b.scal(span, op)),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.scal(span, op),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.scal(span, op),
        }
    }

    /// Creates a device-resident buffer of `len` bytes (zeroed), for data that must
    /// stay on the device between operations.
    pub fn create_buffer(&self, len: u64) -> Result<BufferId, OpError> {
        if len == 0 || len > MAX_BUFFER_BYTES {
            return Err(OpError::TooLarge(format!("a device buffer of {len} bytes (1 ..= {MAX_BUFFER_BYTES})")));
        }
        let len = usize::try_from(len).map_err(|_| OpError::TooLarge(format!("{len} bytes")))?;
        match self {
            Device::Cpu(b) => b.create_buffer(len),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.create_buffer(len),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.create_buffer(len),
        }
    }

    /// Frees a buffer (operations still using it keep it until they complete).
    pub fn free_buffer(&self, id: BufferId) -> Result<(), OpError> {
        match self {
            Device::Cpu(b) => b.buffers.remove(id),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.buffers.remove(id),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.buffers.remove(id),
        }
    }

    /// The size of a buffer in bytes.
    pub fn buffer_size(&self, id: BufferId) -> Result<u64, OpError> {
        Ok(match self {
            Device::Cpu(b) => b.buffers.get(id)?.len as u64,
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.buffers.get(id)?.size(),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.buffers.get(id)?.len as u64,
        })
    }

    /// Copies guest bytes `src` into the buffer at `offset`, synchronously.
    pub fn write_buffer(&self, id: BufferId, offset: u64, span: &GuestSpan, src: Range<usize>) -> Result<(), OpError> {
        self.check_transfer(id, offset, span, &src)?;
        match self {
            Device::Cpu(b) => b.transfer(id, offset as usize, span, src, true),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.write_buffer(id, offset, span, src),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.transfer(id, offset as usize, span, src, true),
        }
    }

    /// Copies `dst.len()` bytes of the buffer at `offset` into guest bytes `dst`, synchronously.
    pub fn read_buffer(&self, id: BufferId, offset: u64, span: &GuestSpan, dst: Range<usize>) -> Result<(), OpError> {
        self.check_transfer(id, offset, span, &dst)?;
        match self {
            Device::Cpu(b) => b.transfer(id, offset as usize, span, dst, false),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.read_buffer(id, offset, span, dst),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.transfer(id, offset as usize, span, dst, false),
        }
    }

    fn check_transfer(&self, id: BufferId, offset: u64, span: &GuestSpan, guest: &Range<usize>) -> Result<(), OpError> {
        let size = self.buffer_size(id)?;
        if guest.end > span.size() || guest.start > guest.end {
            return Err(OpError::OutOfBounds(format!(
                "guest bytes {:#x}..{:#x} end past the memory's {} bytes",
                guest.start,
                guest.end,
                span.size()
            )));
        }
        let len = guest.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(OpError::OutOfBounds(format!(
                "{len} bytes at offset {offset} end past buffer {}'s {size} bytes",
                id.0
            )));
        }
        if !offset.is_multiple_of(4) || !len.is_multiple_of(4) {
            return Err(OpError::Misaligned(format!(
                "buffer transfers move whole 4-byte words (offset {offset}, {len} bytes)"
            )));
        }
        Ok(())
    }

    /// A result that is already known, as a [`Pending`].
    pub fn ready(result: Result<OpReport, OpError>) -> Pending {
        Pending { inner: PendingInner::Done(result) }
    }

    fn check_dtype(&self, dtype: DType) -> Result<(), OpError> {
        if self.info().gemm_dtypes.contains(&dtype) {
            Ok(())
        } else {
            Err(OpError::Unsupported(format!("the {} backend has no {dtype:?} GEMM", self.info().backend)))
        }
    }
}

impl MemoryObserver for Device {
    fn committed(&self, range: CommittedRange) -> Result<(), String> {
        match self {
            Device::Cpu(_) => Ok(()),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.import(range),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.register(range),
        }
    }

    fn released(&self, memory: MemoryId, base: usize, len: usize) {
        match self {
            Device::Cpu(b) => b.release(base),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.release(memory, base, len),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.release(base),
        }
        let _ = (memory, len);
    }
}

/// What `shoal devices` prints for one backend.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Probe {
    /// The backend.
    pub backend: BackendKind,
    /// Whether it opened.
    pub available: bool,
    /// Its description, when it opened.
    pub info: Option<DeviceInfo>,
    /// Why not, when it did not.
    pub reason: Option<String>,
}

/// Tries to open every backend and says what each is, or why it is not available.
pub fn probe_all() -> Vec<Probe> {
    BackendKind::ALL
        .into_iter()
        .rev()
        .map(|kind| match Device::open(kind) {
            Ok(d) => Probe { backend: kind, available: true, info: Some(d.info().clone()), reason: None },
            Err(e) => Probe { backend: kind, available: false, info: None, reason: Some(e.to_string()) },
        })
        .collect()
}
