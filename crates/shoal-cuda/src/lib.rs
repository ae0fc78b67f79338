//! One CUDA device layer per GPU per process: the ground floor under shoal's CUDA compute
//! backend (`shoal-gpu`) and its CUDA inference engine (`shoal-engine`).
//!
//! Everyone in a process who uses GPU `n` gets the same [`Device`] ([`Device::open`] keeps a
//! registry of weak handles by ordinal), shaped like candle's `CudaDevice` and ggml's
//! per-device backend context:
//!
//! - **context**: the device's primary context, retained once (cudarc's `CudaContext`), made
//!   current on the calling thread with [`Device::bind`]; its [`DeviceAttributes`] are read
//!   once;
//! - **modules**: [`Device::module`] compiles a CUDA C++ source with NVRTC (through a PTX
//!   cache on disk, [`compile_cached`]) and loads it once per device: two models loading the
//!   same kernels share one [`Module`];
//! - **streams**: [`Device::stream`] makes a non-blocking [`Stream`] with its own cuBLAS
//!   handle; a stream records [`Graph`]s ([`Stream::begin_capture`] …
//!   [`Stream::end_capture`]);
//! - **memory**: [`DeviceBuffer`] (device memory), [`PinnedBuffer`] (page-locked host memory
//!   from the device's pool of kept buffers, [`PINNED_KEEP`] at most), and
//!   [`GrowableBuffer`]: device memory at a fixed address whose physical chunks are mapped on
//!   demand (CUDA virtual memory management) and charged to the device's [`KvBudget`];
//! - **the KV budget** ([`Device::kv_budget`]): the bytes every KV pool on the device may
//!   hold together (`SHOAL_KV_POOL_MB`, or half the free memory up to 8 GiB), so that two
//!   models on one GPU share it instead of each taking half.
//!
//! CUDA is loaded at run time (cudarc's `dynamic-loading`): building needs no CUDA toolkit,
//! and on a machine without a driver [`Device::open`] says what is missing
//! ([`CudaError::NoDriver`], [`CudaError::NoCublas`], …). The layer does the minimum and
//! hands out raw handles ([`Stream::raw`], [`Stream::blas`], [`Module::function`]) for the
//! launch code above it, which owns the `unsafe` of its own kernels' arguments.
//!
//! ```no_run
//! use shoal_cuda::{Device, DeviceBuffer};
//!
//! # fn main() -> Result<(), shoal_cuda::CudaError> {
//! let device = Device::open_default()?;
//! assert!(std::sync::Arc::ptr_eq(&device, &Device::open(device.ordinal())?));
//! let stream = device.stream()?;
//! let module = device.module("demo", r#"extern "C" __global__ void nop() {}"#)?;
//! let _nop = module.function("nop")?;
//! let _buf = DeviceBuffer::new(&device, 1 << 20)?;
//! stream.synchronize()?;
//! # Ok(())
//! # }
//! ```
//!
//! The crate has no Cargo features; it is built by `shoal-gpu` and `shoal-engine` when their
//! `cuda` feature is on.

mod budget;
mod device;
mod error;
mod memory;
mod nvrtc;
mod stream;
mod vmm;

pub use budget::{KV_DEFAULT_MAX, KvBudget, kv_limit};
pub use device::{Device, DeviceAttributes, Module, PINNED_KEEP};
pub use error::{CudaError, check, check_blas};
pub use memory::{DeviceBuffer, PinnedBuffer, memset_zero_async};
pub use nvrtc::{compile_cached, compile_source, module_key, nvrtc_available, ptx_file_name};
pub use stream::{Graph, Stream};
pub use vmm::{ChunkPlan, GrowableBuffer};

/// The raw driver and cuBLAS bindings the layers above launch with (cudarc's `sys`).
pub mod sys {
    pub use cudarc::cublas::sys as blas;
    pub use cudarc::driver::sys::*;
}
