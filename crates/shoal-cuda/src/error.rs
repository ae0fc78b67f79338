//! What can go wrong with the device, with the values and what to do about it.

use cudarc::cublas::sys::cublasStatus_t;
use cudarc::driver::sys::{self, CUresult};

/// Why the CUDA device layer could not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// The driver library cannot be loaded.
    #[error(
        "no NVIDIA driver (libcuda.so) found on this machine; install the NVIDIA driver, or use \
         another backend (--backend cpu)"
    )]
    NoDriver,
    /// The driver is here, cuBLAS is not.
    #[error(
        "the NVIDIA driver is here but cuBLAS (libcublas.so.13) is not; install the CUDA 13 \
         cuBLAS library (the CUDA toolkit, or PyPI's `nvidia-cublas`) and add its lib folder to \
         LD_LIBRARY_PATH"
    )]
    NoCublas,
    /// The ordinal asked for is not on this machine.
    #[error("no CUDA device {ordinal}: this machine has {count}; set SHOAL_CUDA_DEVICE to one of 0..{count}")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: i32,
        /// Devices the driver sees.
        count: i32,
    },
    /// NVRTC is needed (nothing cached) and cannot be loaded.
    #[error(
        "NVRTC (libnvrtc.so.13) is not installed: install the CUDA toolkit or `pip install \
         nvidia-cuda-nvrtc` and add its lib folder to LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    /// NVRTC refused a source.
    #[error("NVRTC could not compile shoal's {name} kernels for compute_{major}{minor}: {log}")]
    Compile {
        /// The source's name (`kernels`, `engine`).
        name: String,
        /// Compute capability, major.
        major: i32,
        /// Compute capability, minor.
        minor: i32,
        /// NVRTC's log (or its error).
        log: String,
    },
    /// A driver call failed.
    #[error("{call} failed: {code:?}{}", hint(*.code))]
    Driver {
        /// The call, and what it was for.
        call: String,
        /// What the driver said.
        code: CUresult,
    },
    /// A cuBLAS call failed.
    #[error("{call} failed: {status:?}")]
    Cublas {
        /// The call.
        call: &'static str,
        /// What cuBLAS said.
        status: cublasStatus_t,
    },
    /// The device's KV budget has no room for `asked` more bytes.
    #[error(
        "the GPU's KV budget is spent: {asked} more bytes asked, {used} of {limit} in use; end idle \
         sessions, or raise the budget (SHOAL_KV_POOL_MB)"
    )]
    OverBudget {
        /// Bytes asked for.
        asked: usize,
        /// Bytes charged already.
        used: usize,
        /// The budget.
        limit: usize,
    },
}

/// What to do about a few driver codes people meet.
fn hint(code: CUresult) -> &'static str {
    match code {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => " (the GPU is out of memory: free some, or ask for less)",
        CUresult::CUDA_ERROR_NO_DEVICE => " (the driver sees no GPU)",
        CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH => {
            " (the driver and its kernel module differ: reboot, or reinstall the driver)"
        }
        CUresult::CUDA_ERROR_NOT_SUPPORTED => " (this GPU or driver does not support it)",
        _ => "",
    }
}

/// `Ok` for `CUDA_SUCCESS`, otherwise a [`CudaError::Driver`] naming `call`.
pub fn check(code: CUresult, call: &str) -> Result<(), CudaError> {
    if code == sys::CUresult::CUDA_SUCCESS { Ok(()) } else { Err(CudaError::Driver { call: call.to_owned(), code }) }
}

/// `Ok` for `CUBLAS_STATUS_SUCCESS`, otherwise a [`CudaError::Cublas`] naming `call`.
pub fn check_blas(status: cublasStatus_t, call: &'static str) -> Result<(), CudaError> {
    if status == cublasStatus_t::CUBLAS_STATUS_SUCCESS { Ok(()) } else { Err(CudaError::Cublas { call, status }) }
}

impl CudaError {
    /// A driver error from cudarc's safe layer.
    pub(crate) fn driver(call: &str, e: cudarc::driver::DriverError) -> CudaError {
        CudaError::Driver { call: call.to_owned(), code: e.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_the_values_and_what_to_do() {
        let e = CudaError::NoDevice { ordinal: 3, count: 2 };
        assert_eq!(e.to_string(), "no CUDA device 3: this machine has 2; set SHOAL_CUDA_DEVICE to one of 0..2");
        let e = check(CUresult::CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc(4096 bytes)").unwrap_err();
        assert!(e.to_string().starts_with("cuMemAlloc(4096 bytes) failed: CUDA_ERROR_OUT_OF_MEMORY (the GPU"), "{e}");
        assert!(check(CUresult::CUDA_SUCCESS, "x").is_ok());
        let e = CudaError::OverBudget { asked: 10, used: 5, limit: 12 };
        assert!(e.to_string().contains("10 more bytes asked, 5 of 12 in use"), "{e}");
    }
}
