//! The CPU backend: the reference every other backend is compared with, and the
//! fallback. Multi-threaded (rayon); GEMM through the `gemm` crate's packed kernels.
//! It works on guest memory in place by construction: it is the same memory.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rayon::prelude::*;

use std::ops::Range;
use std::ptr::NonNull;

use crate::{
    BackendKind, BufferId, BufferTable, DType, DeviceInfo, Gemm, GuestSpan, OpError, OpReport, OperandMapping, Scal,
};

/// A "device" buffer of the CPU backend: an anonymous private mapping, page-aligned and
/// committed lazily (a page costs memory once it is first touched, so a buffer a guest makes
/// and never fills holds next to nothing).
pub struct HostBuffer {
    ptr: NonNull<u8>,
    /// Size in bytes.
    pub len: usize,
}

// SAFETY: the buffer owns its allocation; concurrent access goes through raw
// pointers under the same rules as guest memory (one operation writes a range at a time).
unsafe impl Send for HostBuffer {}
// SAFETY: as above.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    fn new(len: usize) -> Result<HostBuffer, OpError> {
        // SAFETY: a fresh anonymous private mapping of a non-zero size (Device::create_buffer
        // refuses 0); it aliases nothing, and reads as zero until written.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(OpError::Device(format!("cannot map {len} bytes: {}", std::io::Error::last_os_error())));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| OpError::Device(format!("cannot map {len} bytes")))?;
        Ok(HostBuffer { ptr, len })
    }
    fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; no operation holds it (they hold an Arc).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The CPU backend.
pub struct CpuBackend {
    info: DeviceInfo,
    inflight: Arc<InFlight>,
    pub(crate) buffers: BufferTable<HostBuffer>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// A CPU backend using every core rayon sees.
    pub fn new() -> Self {
        let threads = rayon::current_num_threads();
        CpuBackend {
            info: DeviceInfo {
                backend: BackendKind::Cpu,
                name: format!("CPU ({threads} threads)"),
                imports_guest_memory: true,
                import_note: Some("the CPU works on guest memory directly".into()),
                max_binding_bytes: u64::MAX,
                gemm_dtypes: vec![DType::F32],
            },
            inflight: Arc::new(InFlight::default()),
            buffers: BufferTable::default(),
        }
    }

    /// A zeroed host buffer standing in for device memory.
    pub fn create_buffer(&self, len: usize) -> Result<BufferId, OpError> {
        Ok(self.buffers.insert(HostBuffer::new(len)?))
    }

    /// Copies between guest bytes `guest` and the buffer at `offset` (checked by `Device`).
    pub fn transfer(
        &self,
        id: BufferId,
        offset: usize,
        span: &GuestSpan,
        guest: Range<usize>,
        to_buffer: bool,
    ) -> Result<(), OpError> {
        let buf = self.buffers.get(id)?;
        let (g, b) = (span.ptr(guest.start), (buf.addr() + offset) as *mut u8);
        // SAFETY: both ranges were checked (Device::check_transfer); guest memory and
        // a buffer never overlap.
        unsafe {
            if to_buffer {
                std::ptr::copy_nonoverlapping(g, b, guest.len());
            } else {
                std::ptr::copy_nonoverlapping(b, g, guest.len());
            }
        }
        Ok(())
    }

    /// The base address of each operand's space, and the buffers to keep alive.
    fn bases(&self, span: &GuestSpan, op: &Gemm) -> Result<([usize; 3], Vec<Arc<HostBuffer>>), OpError> {
        let mut keep = Vec::new();
        let mut bases = [span.base(); 3];
        for (i, sp) in op.spaces.iter().enumerate() {
            if let Some(id) = sp {
                let b = self.buffers.get(*id)?;
                bases[i] = b.addr();
                keep.push(b);
            }
        }
        Ok((bases, keep))
    }

    /// What this backend is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Runs a GEMM on the calling thread (and rayon's pool).
    pub fn gemm(&self, span: &GuestSpan, op: &Gemm) -> Result<OpReport, OpError> {
        let (bases, _keep) = self.bases(span, op)?;
        // SAFETY: `op` was checked against `span` and its buffers (Gemm can only come
        // from GemmSpec::check), GuestSpan::new's contract keeps the memory mapped and
        // unshared while this synchronous call runs, and `_keep` the buffers alive.
        unsafe { gemm_f32(bases, op) };
        Ok(report(span, op))
    }

    /// Runs a GEMM on a worker thread; the memory is lent until the result is waited for.
    pub fn submit_gemm(&self, span: &GuestSpan, op: &Gemm) -> Result<CpuPending, OpError> {
        let (bases, keep) = self.bases(span, op)?;
        let op2 = op.clone();
        let guard = self.inflight.begin(span.base());
        let rep = report(span, op);
        let handle = std::thread::spawn(move || {
            // SAFETY: as in `gemm`; the memory stays mapped until this job ends,
            // because `release` (called before the memory is unmapped) waits for every
            // job counted in `inflight` for this base, and `guard` is dropped last;
            // `keep` holds the buffers.
            unsafe { gemm_f32(bases, &op2) };
            drop(keep);
            drop(guard);
        });
        Ok(CpuPending { handle, report: rep })
    }

    /// `x = alpha·x`.
    pub fn scal(&self, span: &GuestSpan, op: &Scal) -> OpReport {
        // SAFETY: `op.x` was checked against the span (Scal::check), is f32-aligned,
        // and the span is ours for the duration of the call.
        let x = unsafe { std::slice::from_raw_parts_mut(span.ptr(op.x.start) as *mut f32, op.x.len() / 4) };
        x.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v *= op.alpha));
        OpReport {
            operands: vec![OperandMapping {
                guest_addr: span.base() + op.x.start,
                device_host_addr: Some(span.base() + op.x.start),
            }],
            bytes_copied: 0,
            dispatches: 1,
            dma: false,
            device_operands: 0,
        }
    }

    /// Waits for every job still running on the memory at `base`.
    pub fn release(&self, base: usize) {
        self.inflight.wait_idle(base);
    }
}

fn report(span: &GuestSpan, op: &Gemm) -> OpReport {
    let operands = [&op.a, &op.b, &op.c]
        .into_iter()
        .zip(op.spaces)
        .filter(|(r, sp)| !r.is_empty() && sp.is_none())
        .map(|(r, _)| r)
        .map(|r| OperandMapping { guest_addr: span.base() + r.start, device_host_addr: Some(span.base() + r.start) })
        .collect();
    let device_operands = op.spaces.iter().filter(|s| s.is_some()).count() as u32;
    OpReport { operands, bytes_copied: 0, dispatches: 1, dma: false, device_operands }
}

/// A GEMM running on a worker thread.
pub struct CpuPending {
    handle: JoinHandle<()>,
    report: OpReport,
}

impl CpuPending {
    /// Joins the worker.
    pub fn wait(self) -> Result<OpReport, OpError> {
        self.handle.join().map_err(|_| OpError::Device("the CPU GEMM worker panicked".into()))?;
        Ok(self.report)
    }
}

/// Counts jobs in flight per memory base, so a release can wait for them.
#[derive(Default)]
pub(crate) struct InFlight {
    counts: Mutex<HashMap<usize, usize>>,
    idle: Condvar,
}

pub(crate) struct InFlightGuard {
    owner: Arc<InFlight>,
    base: usize,
}

impl InFlight {
    pub(crate) fn begin(self: &Arc<Self>, base: usize) -> InFlightGuard {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner()).entry(base).or_default() += 1;
        InFlightGuard { owner: self.clone(), base }
    }

    pub(crate) fn wait_idle(&self, base: usize) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        while counts.get(&base).copied().unwrap_or(0) > 0 {
            counts = self.idle.wait(counts).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = counts.get_mut(&self.base) {
            *c -= 1;
            if *c == 0 {
                counts.remove(&self.base);
            }
        }
        self.owner.idle.notify_all();
    }
}

/// The f32 GEMM on raw guest memory.
///
/// # Safety
/// `op` must have been checked (`GemmSpec::check_in`) against live spaces at `bases`
/// (A's, B's, C's) that nothing else writes while this runs.
unsafe fn gemm_f32(bases: [usize; 3], op: &Gemm) {
    let c = (bases[2] + op.c.start) as *mut f32;
    let (m, n, k) = (op.m, op.n, op.k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || op.alpha == 0.0 {
        // No product: C = beta·C, and C is not read when beta is 0 (BLAS semantics).
        for i in 0..m {
            // SAFETY: row i of C lies inside op.c, which was checked.
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * op.ldc), n) };
            if op.beta == 0.0 {
                row.fill(0.0);
            } else {
                row.iter_mut().for_each(|v| *v *= op.beta);
            }
        }
        return;
    }
    let a = (bases[0] + op.a.start) as *const f32;
    let b = (bases[1] + op.b.start) as *const f32;
    // Strides (column stride, row stride) in elements for op(A) and op(B).
    let (a_cs, a_rs) = if op.trans_a { (op.lda as isize, 1) } else { (1, op.lda as isize) };
    let (b_cs, b_rs) = if op.trans_b { (op.ldb as isize, 1) } else { (1, op.ldb as isize) };
    let threads = rayon::current_num_threads();
    let par = if m * n * k < 64 * 64 * 64 || threads <= 1 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    };
    // SAFETY: every index gemm computes from these strides lies inside the checked
    // extents of A, B and C; C overlaps neither A nor B (checked).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            op.ldc as isize,
            op.beta != 0.0,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            op.beta,
            op.alpha,
            false,
            false,
            false,
            par,
        )
    };
}
