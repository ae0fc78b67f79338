//! The CUDA backend: guest memory registered with the GPU, cuBLAS for GEMM, NVRTC
//! kernels compiled at run time.
//!
//! CUDA is loaded dynamically (cudarc): a machine without a driver builds and runs
//! shoal on the other backends, and opening CUDA there says why it cannot. Every
//! committed range of guest memory is registered (`cuMemHostRegister` with
//! `DEVICEMAP`) once, when it is committed; with unified addressing the device
//! pointer of a guest byte is its host address. An operation then takes one of two
//! paths, and reports which:
//!
//! - **in place**: kernels (and small GEMMs) read and write the mapped guest pages
//!   directly — right for streaming, single-pass or small data;
//! - **DMA**: one copy engine transfer from the registered guest pages to device
//!   memory and back (`cuMemcpy2DAsync`), for data read many times (GEMM operands).
//!
//! Either way there is no CPU copy and no staging buffer.

use std::collections::HashMap;
use std::ffi::c_void;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use shoal_cuda::sys::{self, blas};
use shoal_cuda::{CudaError, Device, DeviceBuffer, Module, Stream, check as cu};
use shoal_memory::{CommittedRange, MemoryId};

use crate::{
    BackendKind, BufferId, BufferTable, DType, DeviceInfo, Gemm, GuestSpan, OpError, OpReport, OpenError,
    OperandMapping, Scal,
};

mod kernels;

pub use kernels::{KERNELS_SOURCE, compile_kernels, compile_ptx};
pub use shoal_cuda::{compile_cached, compile_source, nvrtc_available};

/// GEMMs whose operands add up to at most this many bytes run in place on mapped
/// guest memory; larger ones are DMA'd to device memory, since a GEMM reads its
/// operands many times. Measured on an H200 (docs/benchmarks.md): at 128×128 the DMA
/// path already wins (28 µs vs 35 µs), so only tiny products stay in place.
const INPLACE_GEMM_MAX_BYTES: usize = 48 << 10;

/// Which GEMM path to take (`SHOAL_CUDA_GEMM_PATH=inplace|dma|auto` overrides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GemmPath {
    Auto,
    InPlace,
    Dma,
}

/// The ranges of one memory registered with the GPU.
struct Registered {
    _memory: MemoryId,
    ranges: Vec<(usize, usize)>,
}

/// A buffer in device memory.
pub struct CudaBuffer {
    mem: DeviceBuffer,
    /// Size in bytes.
    pub len: usize,
}

impl CudaBuffer {
    fn dptr(&self) -> sys::CUdeviceptr {
        self.mem.ptr()
    }
}

/// The stream (with its cuBLAS handle) and the DMA scratch, used under the backend's lock.
struct Lane {
    stream: Stream,
    /// Device scratch for DMA'd operands, reused by every operation. All work is on
    /// this one stream, so a later operation's copies wait for the earlier ones.
    scratch: sys::CUdeviceptr,
    scratch_len: usize,
}

impl Lane {
    /// At least `len` bytes of device scratch, grown (stream-ordered) when needed.
    fn scratch(&mut self, len: usize) -> Result<sys::CUdeviceptr, OpError> {
        if len > self.scratch_len {
            let want = len.next_power_of_two().max(1 << 20);
            let stream = self.stream.raw();
            // SAFETY: our allocation, freed in stream order after the work that used it.
            unsafe {
                if self.scratch != 0 {
                    sys::cuMemFreeAsync(self.scratch, stream);
                    self.scratch = 0;
                    self.scratch_len = 0;
                }
                let mut d = 0;
                cu(sys::cuMemAllocAsync(&mut d, want, stream), "cuMemAllocAsync").map_err(|e| {
                    OpError::Device(format!("{e}: cannot get {want} bytes of GPU memory for the operands"))
                })?;
                self.scratch = d;
                self.scratch_len = want;
            }
        }
        Ok(self.scratch)
    }
}

/// The CUDA backend.
pub struct CudaBackend {
    info: DeviceInfo,
    /// The process's device layer for this GPU (shared with the inference engine).
    device: Arc<Device>,
    _module: Arc<Module>,
    scal_fn: sys::CUfunction,
    sms: u32,
    stream: Mutex<Lane>,
    /// Registered ranges `(addr, len)` per memory, by base address.
    registered: Mutex<HashMap<usize, Registered>>,
    path: GemmPath,
    pub(crate) buffers: BufferTable<CudaBuffer>,
}

// SAFETY: the stream and cuBLAS handle are only used under `stream`'s mutex, the context is
// made current on each calling thread before use (`Device::bind`), and the module/function
// handles are immutable after load.
unsafe impl Send for CudaBackend {}
// SAFETY: as above.
unsafe impl Sync for CudaBackend {}

/// A device layer error as an operation's error (the one place they are mapped).
fn op_err(e: CudaError) -> OpError {
    OpError::Device(e.to_string())
}

/// A device layer error as a reason CUDA cannot be opened (the one place they are mapped).
fn open_err(e: CudaError) -> OpenError {
    OpenError::Unavailable(BackendKind::Cuda, e.to_string())
}

impl CudaBackend {
    /// Opens GPU 0 (or `SHOAL_CUDA_DEVICE`), or says why CUDA is unavailable.
    pub fn open() -> Result<CudaBackend, OpenError> {
        let path = match std::env::var("SHOAL_CUDA_GEMM_PATH").as_deref() {
            Ok("inplace") => GemmPath::InPlace,
            Ok("dma") => GemmPath::Dma,
            _ => GemmPath::Auto,
        };
        let device = Device::open_default().map_err(open_err)?;
        let a = device.attributes().clone();
        if !a.unified_addressing || !a.can_map_host_memory {
            return Err(OpenError::Unavailable(
                BackendKind::Cuda,
                "the GPU cannot map host memory with unified addressing".into(),
            ));
        }
        let module = device.module("kernels", KERNELS_SOURCE).map_err(open_err)?;
        let scal_fn = module.function("shoal_scal_f32").map_err(open_err)?;
        let stream = device.stream().map_err(open_err)?;
        // Full f32 (no TF32) unless asked: GEMM results match the CPU reference.
        let math = if std::env::var("SHOAL_CUDA_TF32").is_ok_and(|v| v == "1") {
            blas::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            blas::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the stream's own cuBLAS handle, not yet used by anyone else.
        shoal_cuda::check_blas(unsafe { blas::cublasSetMathMode(stream.blas(), math) }, "cublasSetMathMode")
            .map_err(open_err)?;
        // Warm up: cuBLAS loads its kernels lazily; do it at open, not inside a guest's first
        // call (where it shows as time and resident memory).
        stream.warm_up();
        let (major, minor) = a.compute_capability;
        Ok(CudaBackend {
            info: DeviceInfo {
                backend: BackendKind::Cuda,
                name: format!("{} (sm_{major}{minor}, {} GiB)", a.name, a.total_memory >> 30),
                imports_guest_memory: true,
                import_note: Some("guest memory is registered (cuMemHostRegister, mapped)".into()),
                max_binding_bytes: u64::MAX,
                gemm_dtypes: vec![DType::F32, DType::F16, DType::Bf16],
            },
            device,
            _module: module,
            scal_fn,
            sms: a.sms,
            stream: Mutex::new(Lane { stream, scratch: 0, scratch_len: 0 }),
            registered: Mutex::new(HashMap::new()),
            path,
            buffers: BufferTable::default(),
        })
    }

    /// What this backend is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn current(&self) -> Result<(), OpError> {
        self.device.bind().map_err(op_err)
    }

    /// Registers a memory's committed pages with the GPU (pinned and mapped) after
    /// they grew.
    ///
    /// The whole committed range `base..base+offset+len` becomes one registration,
    /// replacing the earlier one: the copy engine refuses a transfer that spans two
    /// registrations (`CUDA_ERROR_INVALID_VALUE`), and a guest's allocations straddle
    /// growth steps all the time. Registering costs about 40 µs per MiB on an H200
    /// (docs/benchmarks.md), paid once per `memory.grow`.
    pub fn register(&self, range: CommittedRange) -> Result<(), String> {
        self.current().map_err(|e| e.to_string())?;
        let (base, len) = (range.base, range.offset + range.len);
        let old = self.registered.lock().unwrap_or_else(|e| e.into_inner()).remove(&base);
        if let Some(old) = &old {
            self.sync();
            for &(addr, _) in &old.ranges {
                // SAFETY: registered by us; the GPU is idle on it (synchronized above).
                unsafe { sys::cuMemHostUnregister(addr as *mut c_void) };
            }
        }
        // SAFETY: the range is committed guest memory that stays mapped until this
        // memory's release, which unregisters it first.
        if let Err(e) = unsafe { register_range(base, len) } {
            // The grow fails; keep the memory usable at its old size.
            if let Some(old) = old {
                // SAFETY: as above, for the old (still committed) range.
                if old.ranges.iter().all(|&(a, l)| unsafe { register_range(a, l) }.is_ok()) {
                    self.registered.lock().unwrap_or_else(|e| e.into_inner()).insert(base, old);
                }
            }
            return Err(e);
        }
        self.registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(base, Registered { _memory: range.memory, ranges: vec![(base, len)] });
        Ok(())
    }

    fn sync(&self) {
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: a stream of this backend.
        unsafe { sys::cuStreamSynchronize(s.stream.raw()) };
    }

    /// Waits for the GPU, then unregisters every range of a memory.
    pub fn release(&self, base: usize) {
        let _ = self.current();
        self.sync();
        let ranges = self.registered.lock().unwrap_or_else(|e| e.into_inner()).remove(&base);
        for (addr, _) in ranges.map(|r| r.ranges).unwrap_or_default() {
            // SAFETY: registered by `register`; the GPU is idle on it (synchronized above).
            unsafe { sys::cuMemHostUnregister(addr as *mut c_void) };
        }
    }

    /// Whether `addr..addr+len` lies in registered pages of the memory at `base`.
    fn is_registered(&self, base: usize, addr: usize, len: usize) -> bool {
        let reg = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = reg.get(&base) else { return false };
        // Ranges are contiguous from the base: committed = their total.
        let committed: usize = r.ranges.iter().map(|r| r.1).sum();
        addr >= base && addr + len <= base + committed
    }

    /// `x = alpha·x`, in place on the mapped guest pages.
    pub fn scal(&self, span: &GuestSpan, op: &Scal) -> Result<OpReport, OpError> {
        // Synchronous: launch and wait on the stream itself (no event to create).
        self.launch_scal(span, op, true)
    }

    fn launch_scal(&self, span: &GuestSpan, op: &Scal, wait: bool) -> Result<OpReport, OpError> {
        self.current()?;
        let addr = span.base() + op.x.start;
        let n = (op.x.len() / 4) as u64;
        let in_place = self.is_registered(span.base(), addr, op.x.len());
        if !in_place {
            return Err(OpError::Device(format!(
                "guest range {addr:#x}+{} is not registered with the GPU",
                op.x.len()
            )));
        }
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let threads = 256u32;
        // One block of 256 threads per multiprocessor: the fastest launch for mapped
        // memory measured on an H200 (docs/benchmarks.md, the launch sweep).
        let blocks = (n.div_ceil(4 * threads as u64) as u32).clamp(1, self.sms);
        let mut ptr = addr as u64;
        let mut n_arg = n;
        let mut alpha = op.alpha;
        let mut params = [
            &mut ptr as *mut u64 as *mut c_void,
            &mut n_arg as *mut u64 as *mut c_void,
            &mut alpha as *mut f32 as *mut c_void,
        ];
        // SAFETY: the kernel touches exactly x[0..n] at `addr`, checked and registered
        // (mapped) guest memory; the params match the kernel's signature.
        unsafe {
            cu(
                sys::cuLaunchKernel(
                    self.scal_fn,
                    blocks,
                    1,
                    1,
                    threads,
                    1,
                    1,
                    0,
                    s.stream.raw(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
                "cuLaunchKernel(scal)",
            )
            .map_err(op_err)?;
        }
        let report = OpReport {
            operands: vec![OperandMapping { guest_addr: addr, device_host_addr: Some(addr) }],
            bytes_copied: 0,
            dispatches: 1,
            dma: false,
            device_operands: 0,
        };
        if wait {
            // SAFETY: our stream.
            cu(unsafe { sys::cuStreamSynchronize(s.stream.raw()) }, "the GPU failed while running scal")
                .map_err(op_err)?;
        }
        Ok(report)
    }

    /// A zeroed buffer in device memory.
    pub fn create_buffer(&self, len: usize) -> Result<BufferId, OpError> {
        let mem = DeviceBuffer::new(&self.device, len)
            .map_err(|e| OpError::Device(format!("{e}: no room for {len} bytes on the GPU")))?;
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `mem` holds `len` bytes of this device's memory and outlives the fill (the
        // stream is synchronised before it is handed out).
        unsafe { shoal_cuda::memset_zero_async(mem.ptr(), len, s.stream.raw()).map_err(op_err)? };
        s.stream.synchronize().map_err(op_err)?;
        Ok(self.buffers.insert(CudaBuffer { mem, len }))
    }

    /// Copies between guest bytes `guest` and the buffer at `offset` (checked by
    /// `Device`): one DMA from or to the registered guest pages, on the backend's
    /// stream (ordered after the operations already submitted), waited for.
    pub fn transfer(
        &self,
        id: BufferId,
        offset: usize,
        span: &GuestSpan,
        guest: Range<usize>,
        to_buffer: bool,
    ) -> Result<(), OpError> {
        self.current()?;
        let buf = self.buffers.get(id)?;
        let host = span.base() + guest.start;
        if !self.is_registered(span.base(), host, guest.len()) {
            return Err(OpError::Device("the guest range is not registered with the GPU".into()));
        }
        let dev = buf.dptr() + offset as u64;
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: both ranges were checked; the host side is registered guest memory
        // that the guest cannot touch while this synchronous call runs.
        unsafe {
            let r = if to_buffer {
                sys::cuMemcpyHtoDAsync_v2(dev, host as *const c_void, guest.len(), s.stream.raw())
            } else {
                sys::cuMemcpyDtoHAsync_v2(host as *mut c_void, dev, guest.len(), s.stream.raw())
            };
            cu(r, "cuMemcpyAsync").map_err(op_err)?;
            cu(sys::cuStreamSynchronize(s.stream.raw()), "the GPU failed during a buffer transfer").map_err(op_err)?;
        }
        Ok(())
    }

    /// Enqueues a GEMM on the stream; complete once the pending op is waited for.
    ///
    /// Operands in device buffers are used where they are. Guest operands are used
    /// in place (tiny products) or DMA'd to device scratch and back.
    pub fn submit_gemm(&self, span: &GuestSpan, op: &Gemm) -> Result<CudaPending, OpError> {
        self.current()?;
        let es = op.dtype.size();
        let base = span.base();
        let bufs: Vec<Option<Arc<CudaBuffer>>> =
            op.spaces.iter().map(|sp| sp.map(|id| self.buffers.get(id)).transpose()).collect::<Result<_, _>>()?;
        let ranges = [&op.a, &op.b, &op.c];
        let guest = |i: usize| bufs[i].is_none() && !ranges[i].is_empty();
        let bytes: usize = (0..3).filter(|&i| guest(i)).map(|i| ranges[i].len()).sum();
        if (0..3).any(|i| guest(i) && !self.is_registered(base, base + ranges[i].start, ranges[i].len())) {
            return Err(OpError::Device("a GEMM operand is not in registered guest memory".into()));
        }
        let in_place = match self.path {
            GemmPath::InPlace => true,
            GemmPath::Dma => false,
            GemmPath::Auto => bytes <= INPLACE_GEMM_MAX_BYTES,
        };
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let k = if op.alpha == 0.0 { 0 } else { op.k };
        let mut report = OpReport { dispatches: 1, dma: !in_place && bytes > 0, ..Default::default() };
        let (ar, ac) = if op.trans_a { (op.k, op.m) } else { (op.m, op.k) };
        let (br, bc) = if op.trans_b { (op.n, op.k) } else { (op.k, op.n) };
        let shapes = [(ar, ac, op.lda), (br, bc, op.ldb), (op.m, op.n, op.ldc)];
        // Each operand's device pointer and leading dimension.
        let mut ptr = [0u64; 3];
        let mut ld = [op.lda, op.ldb, op.ldc];
        for i in 0..3 {
            ptr[i] = match &bufs[i] {
                Some(b) => b.dptr() + ranges[i].start as u64,
                None => (base + ranges[i].start) as u64,
            };
        }
        let used = |i: usize| i == 2 || k > 0;
        let dma = |i: usize| !in_place && bufs[i].is_none() && used(i);
        let mut copy_back = None;
        if (0..3).any(dma) {
            // Guest operands to device scratch, packed (leading dimension = columns).
            let align = |n: usize| n.div_ceil(256) * 256;
            let mut offs = [0usize; 3];
            let mut total = 0;
            for i in (0..3).filter(|&i| dma(i)) {
                offs[i] = total;
                total = align(total + shapes[i].0 * shapes[i].1 * es);
            }
            let scratch = s.scratch(total.max(256))?;
            for i in (0..3).filter(|&i| dma(i)) {
                let (rows, cols, ldh) = shapes[i];
                let dev = scratch + offs[i] as u64;
                // C is read only when beta != 0.
                if i < 2 || op.beta != 0.0 {
                    // SAFETY: the source is a checked, registered guest matrix; the
                    // destination lies in the scratch sized above.
                    unsafe { copy_matrix(ptr[i], ldh * es, Dir::ToDevice, dev, cols * es, rows, s.stream.raw())? };
                    report.bytes_copied += (rows * cols * es) as u64;
                }
                if i == 2 {
                    copy_back = Some((ptr[2], dev));
                }
                (ptr[i], ld[i]) = (dev, cols);
            }
        }
        self.blas_gemm(&s, op, k, ptr[0], ld[0], ptr[1], ld[1], ptr[2], ld[2])?;
        if let Some((host_c, dev_c)) = copy_back {
            // SAFETY: the destination is the checked, registered guest C.
            unsafe { copy_matrix(host_c, op.ldc * es, Dir::ToHost, dev_c, op.n * es, op.m, s.stream.raw())? };
            report.bytes_copied += (op.m * op.n * es) as u64;
        }
        report.operands = (0..3)
            .filter(|&i| guest(i))
            .map(|i| OperandMapping {
                guest_addr: base + ranges[i].start,
                device_host_addr: in_place.then_some(base + ranges[i].start),
            })
            .collect();
        report.device_operands = bufs.iter().filter(|b| b.is_some()).count() as u32;
        let mut pending = CudaPending::record(&self.device, s.stream.raw(), report)?;
        pending.buffers = bufs.into_iter().flatten().collect();
        Ok(pending)
    }

    /// Row-major C = alpha·op(A)·op(B) + beta·C through column-major cuBLAS: it
    /// computes Cᵀ = op(B)ᵀ·op(A)ᵀ, so B comes first.
    #[allow(clippy::too_many_arguments)]
    fn blas_gemm(
        &self,
        s: &Lane,
        op: &Gemm,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        c: u64,
        ldc: usize,
    ) -> Result<(), OpError> {
        let t = |x: bool| if x { blas::cublasOperation_t::CUBLAS_OP_T } else { blas::cublasOperation_t::CUBLAS_OP_N };
        let dt = match op.dtype {
            DType::F32 => blas::cudaDataType_t::CUDA_R_32F,
            DType::F16 => blas::cudaDataType_t::CUDA_R_16F,
            DType::Bf16 => blas::cudaDataType_t::CUDA_R_16BF,
        };
        let int = |v: usize, what: &str| {
            i32::try_from(v.max(1)).map_err(|_| OpError::TooLarge(format!("{what} = {v} does not fit cuBLAS's int")))
        };
        let (alpha, beta) = (op.alpha, op.beta);
        // With k == 0 cuBLAS scales C by beta (and leaves it when beta is 1).
        // SAFETY: every pointer names checked memory (registered guest pages or our
        // device scratch) with the strides given; alpha/beta are f32 as
        // CUBLAS_COMPUTE_32F expects.
        let st = unsafe {
            blas::cublasGemmEx(
                s.stream.blas(),
                t(op.trans_b),
                t(op.trans_a),
                int(op.n, "n")?,
                int(op.m, "m")?,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                dt,
                int(ldb, "ldb")?,
                a as *const c_void,
                dt,
                int(lda, "lda")?,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                dt,
                int(ldc, "ldc")?,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        };
        if st != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(OpError::Device(format!("cublasGemmEx: {st:?}")));
        }
        Ok(())
    }
}

/// Registers `base..base+len` (pinned, mapped) and checks that its device pointer is
/// its host address (unified addressing), unregistering it again if not.
///
/// # Safety
/// The range must be mapped memory that stays mapped until it is unregistered.
unsafe fn register_range(base: usize, len: usize) -> Result<(), String> {
    let cu = |r, what| cu(r, what).map_err(|e| e.to_string());
    // SAFETY: the caller's contract.
    unsafe {
        cu(
            sys::cuMemHostRegister_v2(
                base as *mut c_void,
                len,
                sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE,
            ),
            "cuMemHostRegister",
        )?;
        let mut dptr: sys::CUdeviceptr = 0;
        let r = cu(sys::cuMemHostGetDevicePointer_v2(&mut dptr, base as *mut c_void, 0), "cuMemHostGetDevicePointer");
        if r.is_err() || dptr as usize != base {
            sys::cuMemHostUnregister(base as *mut c_void);
            r?;
            return Err(format!("device pointer {dptr:#x} differs from the host address {base:#x}"));
        }
    }
    Ok(())
}

enum Dir {
    ToDevice,
    ToHost,
}

/// One DMA of a `rows`-row matrix (rows of `width` bytes, `host_pitch` apart in guest
/// memory) to or from packed device memory: a plain copy when the rows are
/// contiguous, a 2D copy otherwise.
///
/// # Safety
/// As [`copy_2d`].
unsafe fn copy_matrix(
    host: u64,
    host_pitch: usize,
    dir: Dir,
    dev: sys::CUdeviceptr,
    width: usize,
    rows: usize,
    stream: sys::CUstream,
) -> Result<(), OpError> {
    if width == 0 || rows == 0 {
        return Ok(());
    }
    if host_pitch == width || rows == 1 {
        let bytes = width * rows;
        // SAFETY: the caller's contract (contiguous rows: one range of `bytes`).
        let r = unsafe {
            match dir {
                Dir::ToDevice => sys::cuMemcpyHtoDAsync_v2(dev, host as *const c_void, bytes, stream),
                Dir::ToHost => sys::cuMemcpyDtoHAsync_v2(host as *mut c_void, dev, bytes, stream),
            }
        };
        return cu(r, "cuMemcpyAsync").map_err(op_err);
    }
    // SAFETY: the caller's contract.
    unsafe { copy_2d(host, host_pitch, dir, dev, width, width, rows, stream) }
}

/// One 2D DMA between registered host memory and device memory, on `stream`.
///
/// # Safety
/// The host side must be `height` rows of `width` bytes with `host_pitch`, inside
/// registered memory that stays mapped until the stream has run the copy; the device
/// side an allocation of at least `height * dev_pitch` bytes.
#[allow(clippy::too_many_arguments)]
unsafe fn copy_2d(
    host: u64,
    host_pitch: usize,
    dir: Dir,
    dev: sys::CUdeviceptr,
    dev_pitch: usize,
    width: usize,
    height: usize,
    stream: sys::CUstream,
) -> Result<(), OpError> {
    use sys::CUmemorytype::{CU_MEMORYTYPE_DEVICE as DEVICE, CU_MEMORYTYPE_HOST as HOST};
    // Built field by field: the memory-type enums have no zero value.
    let mut m = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: HOST,
        srcHost: std::ptr::null(),
        srcDevice: 0,
        srcArray: std::ptr::null_mut(),
        srcPitch: 0,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: 0,
        dstArray: std::ptr::null_mut(),
        dstPitch: 0,
        WidthInBytes: width,
        Height: height,
    };
    match dir {
        Dir::ToDevice => {
            m.srcHost = host as *const c_void;
            m.srcPitch = host_pitch;
            m.dstDevice = dev;
            m.dstPitch = dev_pitch;
        }
        Dir::ToHost => {
            m.srcMemoryType = DEVICE;
            m.srcDevice = dev;
            m.srcPitch = dev_pitch;
            m.dstMemoryType = HOST;
            m.dstHost = host as *mut c_void;
            m.dstPitch = host_pitch;
        }
    }
    // SAFETY: the caller's contract.
    cu(unsafe { sys::cuMemcpy2DAsync_v2(&m, stream) }, "cuMemcpy2DAsync").map_err(op_err)
}

/// Work enqueued on the stream, with an event to wait on.
pub struct CudaPending {
    device: Arc<Device>,
    event: sys::CUevent,
    report: OpReport,
    /// Device buffers the operation uses, kept until it is waited for.
    buffers: Vec<Arc<CudaBuffer>>,
}

// SAFETY: a CUDA event may be waited on from any thread with the context current.
unsafe impl Send for CudaPending {}

impl CudaPending {
    fn record(device: &Arc<Device>, stream: sys::CUstream, report: OpReport) -> Result<CudaPending, OpError> {
        let mut event = std::ptr::null_mut();
        // SAFETY: plain driver calls on live handles.
        unsafe {
            cu(sys::cuEventCreate(&mut event, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32), "cuEventCreate")
                .map_err(op_err)?;
            if let Err(e) = cu(sys::cuEventRecord(event, stream), "cuEventRecord") {
                sys::cuEventDestroy_v2(event);
                return Err(op_err(e));
            }
        }
        Ok(CudaPending { device: device.clone(), event, report, buffers: Vec::new() })
    }

    /// Blocks until the GPU has finished the operation.
    pub fn wait(mut self) -> Result<OpReport, OpError> {
        self.device.bind().map_err(op_err)?;
        // SAFETY: the event was recorded on our stream; the context is current.
        let r = unsafe { sys::cuEventSynchronize(self.event) };
        cu(r, "the GPU failed while running the operation").map_err(op_err)?;
        self.buffers.clear();
        Ok(self.report.clone())
    }
}

impl Drop for CudaPending {
    fn drop(&mut self) {
        if !self.buffers.is_empty() {
            // Not waited for: the buffers must outlive the GPU's use of them.
            if self.device.bind().is_ok() {
                // SAFETY: our event, in the current context.
                unsafe { sys::cuEventSynchronize(self.event) };
            }
        }
        if self.device.bind().is_ok() {
            // SAFETY: our event; destroying a pending event is allowed (it is freed when done).
            unsafe { sys::cuEventDestroy_v2(self.event) };
        }
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let s = self.stream.get_mut().unwrap_or_else(|e| e.into_inner());
        if s.scratch != 0 && self.device.bind().is_ok() {
            // SAFETY: our scratch, freed in stream order after the work that used it; the
            // stream (and its cuBLAS handle) is synchronised and destroyed when `s` drops.
            unsafe { sys::cuMemFreeAsync(s.scratch, s.stream.raw()) };
        }
    }
}
