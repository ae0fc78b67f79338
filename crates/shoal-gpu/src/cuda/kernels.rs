//! shoal-gpu's own kernels, compiled with NVRTC through shoal-cuda's PTX cache.

use shoal_cuda::{CudaError, compile_cached, compile_source};

/// The CUDA C++ source of every kernel.
pub const KERNELS_SOURCE: &str = include_str!("kernels.cu");

/// PTX of the kernels for compute capability `major.minor`, from memory, the disk cache, or
/// NVRTC (see [`shoal_cuda::compile_cached`]).
pub fn compile_kernels(major: i32, minor: i32) -> Result<String, CudaError> {
    compile_cached("kernels", KERNELS_SOURCE, major, minor)
}

/// Compiles the kernels for compute capability `major.minor` with NVRTC, uncached.
pub fn compile_ptx(major: i32, minor: i32) -> Result<String, CudaError> {
    compile_source("kernels", KERNELS_SOURCE, major, minor)
}
