//! The CUDA kernels compile with NVRTC, without a GPU, wherever the NVRTC library
//! is installed (`make test` installs PyPI's `nvidia-cuda-nvrtc` for this).

#![cfg(feature = "cuda")]

use shoal_gpu::cuda::{compile_ptx, nvrtc_available};

#[test]
fn kernels_compile_for_hopper_with_nvrtc() {
    if !nvrtc_available() {
        eprintln!("skipping: NVRTC (libnvrtc.so.13) is not installed; `make test` installs it from PyPI");
        return;
    }
    let ptx = compile_ptx(9, 0).expect("the kernels compile for sm_90");
    assert!(ptx.contains(".entry shoal_scal_f32"), "no scal entry point in:\n{ptx}");
    assert!(ptx.contains(".target sm_90"), "PTX not for sm_90");
}

#[test]
fn nvrtc_errors_are_reported_not_panicked() {
    if !nvrtc_available() {
        eprintln!("skipping: NVRTC is not installed");
        return;
    }
    // An architecture NVRTC does not know is an error message, not a crash.
    let err = compile_ptx(1, 0).expect_err("compute_10 does not exist");
    assert!(err.to_string().contains("NVRTC"), "{err}");
}
