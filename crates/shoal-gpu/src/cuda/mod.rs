//! The CUDA backend. It is the subject of its own piece of work (cudarc, registered
//! guest memory, cuBLAS, NVRTC); until it lands, opening it says so.

use crate::{BackendKind, OpenError};

/// Why CUDA cannot be opened in this build.
pub fn open_error() -> OpenError {
    OpenError::NotCompiled(BackendKind::Cuda, "the CUDA backend is not implemented in this version")
}
