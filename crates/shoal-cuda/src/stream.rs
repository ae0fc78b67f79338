//! [`Stream`]: a non-blocking stream with its own cuBLAS handle; [`Graph`]: work recorded
//! from a stream and replayed.

use std::sync::Arc;

use cudarc::cublas::sys as blas;
use cudarc::driver::sys;

use crate::{CudaError, Device, check, check_blas};

/// A non-blocking stream of a [`Device`] and a cuBLAS handle whose work goes on it. Dropping
/// it waits for the stream, then destroys both.
///
/// It is `Send` but not `Sync`: a cuBLAS handle must not be used by two threads at once, so
/// owners keep a stream under their lock.
pub struct Stream {
    device: Arc<Device>,
    raw: sys::CUstream,
    blas: blas::cublasHandle_t,
}

// SAFETY: the handles may be used from any thread with the context current (methods bind it);
// `Stream` is not `Sync`, so only one thread uses them at a time.
unsafe impl Send for Stream {}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("device", &self.device.ordinal()).finish_non_exhaustive()
    }
}

impl Device {
    /// A new non-blocking stream with its own cuBLAS handle set to it.
    pub fn stream(self: &Arc<Self>) -> Result<Stream, CudaError> {
        self.bind()?;
        let mut raw = std::ptr::null_mut();
        check(
            // SAFETY: the context is current; the stream is destroyed by `Stream`'s Drop.
            unsafe { sys::cuStreamCreate(&mut raw, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
            "cuStreamCreate",
        )?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: cuBLAS is present (checked when the device was opened); the context is
        // current, so the handle belongs to it.
        let made = unsafe { blas::cublasCreate_v2(&mut handle) };
        // SAFETY: both handles were just made; the stream is this context's.
        let set = || check_blas(unsafe { blas::cublasSetStream_v2(handle, raw as _) }, "cublasSetStream");
        match check_blas(made, "cublasCreate").and_then(|()| set()) {
            Ok(()) => Ok(Stream { device: self.clone(), raw, blas: handle }),
            Err(e) => {
                // SAFETY: our handles, unused.
                unsafe {
                    if made == blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                        blas::cublasDestroy_v2(handle);
                    }
                    sys::cuStreamDestroy_v2(raw);
                }
                Err(e)
            }
        }
    }
}

impl Stream {
    /// The device the stream belongs to.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// The raw stream, for launches and copies (owned by `self`: never destroy it).
    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// The raw cuBLAS handle, set to this stream (owned by `self`).
    pub fn blas(&self) -> blas::cublasHandle_t {
        self.blas
    }

    /// Waits for the work queued on the stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: our stream, in the current context.
        check(unsafe { sys::cuStreamSynchronize(self.raw) }, "cuStreamSynchronize")
    }

    /// Runs two small SGEMMs: cuBLAS loads its kernels lazily, so this moves that cost (time
    /// and resident memory) to now. Best effort: a failure only means the first real product
    /// pays it.
    pub fn warm_up(&self) {
        let bytes = 3 * 64 * 64 * 4;
        let Ok(scratch) = crate::DeviceBuffer::new(&self.device, bytes) else { return };
        let d = scratch.ptr();
        let (one, zero) = (1.0f32, 0.0f32);
        let p = |i: u64| (d + i * 64 * 64 * 4) as *mut f32;
        // SAFETY: `scratch` holds three 64×64 f32 matrices (zeroed first); every product reads
        // and writes within them; the stream is synchronised before `scratch` is freed.
        unsafe {
            sys::cuMemsetD8Async(d, 0, bytes, self.raw);
            for n in [8, 64] {
                blas::cublasSgemm_v2(
                    self.blas,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    n,
                    n,
                    n,
                    &one,
                    p(0),
                    n,
                    p(1),
                    n,
                    &zero,
                    p(2),
                    n,
                );
            }
            sys::cuStreamSynchronize(self.raw);
        }
    }

    /// Starts recording the work this thread issues on the stream (until
    /// [`Stream::end_capture`] or [`Stream::discard_capture`]).
    pub fn begin_capture(&self) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: our stream; thread-local mode records only this thread's work on it.
        check(
            unsafe {
                sys::cuStreamBeginCapture_v2(self.raw, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            },
            "cuStreamBeginCapture",
        )
    }

    fn end(&self) -> Result<sys::CUgraph, CudaError> {
        let mut graph = std::ptr::null_mut();
        // SAFETY: ends the capture begun on our stream (the stream is usable again after,
        // whatever the result).
        let r = unsafe { sys::cuStreamEndCapture(self.raw, &mut graph) };
        if let Err(e) = check(r, "cuStreamEndCapture") {
            if !graph.is_null() {
                // SAFETY: a graph captured in vain, used by no one.
                unsafe { sys::cuGraphDestroy(graph) };
            }
            return Err(e);
        }
        Ok(graph)
    }

    /// Ends the capture and makes what was recorded a [`Graph`] to launch (it is not run now).
    pub fn end_capture(&self) -> Result<Graph, CudaError> {
        let graph = self.end()?;
        let mut exec = std::ptr::null_mut();
        // SAFETY: `graph` is the valid graph just captured; it is destroyed once instantiated
        // (the executable graph does not need it).
        let r = unsafe {
            let r = sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0);
            sys::cuGraphDestroy(graph);
            r
        };
        check(r, "cuGraphInstantiate")?;
        Ok(Graph { device: self.device.clone(), exec })
    }

    /// Ends the capture and throws away what was recorded (after a failure while recording).
    pub fn discard_capture(&self) {
        if let Ok(graph) = self.end()
            && !graph.is_null()
        {
            // SAFETY: the graph just captured, used by no one.
            unsafe { sys::cuGraphDestroy(graph) };
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            return;
        }
        // SAFETY: our handles, in the current context, not used after this; the stream is
        // idle before it is destroyed.
        unsafe {
            sys::cuStreamSynchronize(self.raw);
            blas::cublasDestroy_v2(self.blas);
            sys::cuStreamDestroy_v2(self.raw);
        }
    }
}

/// Work recorded from a stream ([`Stream::begin_capture`] … [`Stream::end_capture`]),
/// instantiated, to be launched again and again. It reads and writes the very addresses it
/// recorded: whoever launches it keeps those buffers alive and in place.
pub struct Graph {
    device: Arc<Device>,
    exec: sys::CUgraphExec,
}

// SAFETY: an executable graph may be launched from any thread with the context current; a
// launch only reads the handle.
unsafe impl Send for Graph {}
// SAFETY: as above.
unsafe impl Sync for Graph {}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph").finish_non_exhaustive()
    }
}

impl Graph {
    /// Queues the recorded work on `stream`.
    pub fn launch(&self, stream: &Stream) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: a graph instantiated in this device's context, on one of its streams; the
        // caller keeps what the graph touches alive (see the type's docs).
        check(unsafe { sys::cuGraphLaunch(self.exec, stream.raw) }, "cuGraphLaunch")
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: our executable graph; destroying one still running is allowed (the
            // driver frees it when done).
            unsafe { sys::cuGraphExecDestroy(self.exec) };
        }
    }
}
