//! GEMM on the CUDA backend, called natively, beside raw cuBLAS (on an NVIDIA GPU).
//!
//! For each n (n×n·n×n, f32): shoal's engine (`Device::gemm` on registered,
//! mmap'ed "guest" memory — what a guest's `gemm` call runs), raw cuBLAS on the same
//! registered host data with the same DMA in and out, and raw cuBLAS on device-resident
//! data (no transfer: the ceiling). Then bf16 cuBLAS on device data, as the GPU's
//! matrix peak. Prints one JSON object per line. Skips with a message without a GPU.
//!
//! `cargo bench -p shoal-gpu --bench cuda_gemm -- [--sizes 128,1024,...] [--repeat R]`

#[cfg(feature = "cuda")]
fn main() {
    imp::main()
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cuda_gemm: built without the `cuda` feature");
}

#[cfg(feature = "cuda")]
mod imp {
    use std::ffi::c_void;
    use std::time::Instant;

    use cudarc::cublas::sys as blas;
    use cudarc::driver::sys;
    use shoal_gpu::{BackendKind, DType, Device, GemmSpec, GuestSpan};
    use shoal_memory::{CommittedRange, MemoryId, MemoryObserver};

    fn ck(r: sys::CUresult, what: &str) {
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{what}");
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    /// Median milliseconds of `f` over `reps` runs after two warm-ups.
    fn time(reps: usize, mut f: impl FnMut()) -> f64 {
        f();
        f();
        median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    }

    pub fn main() {
        let mut sizes = vec![128usize, 256, 512, 1024, 2048, 4096, 8192];
        let mut repeat = 10usize;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--sizes" => {
                    sizes = args.next().expect("--sizes LIST").split(',').map(|s| s.parse().unwrap()).collect()
                }
                "--repeat" => repeat = args.next().expect("--repeat R").parse().unwrap(),
                "--bench" => {}
                _ => {}
            }
        }
        let device = match Device::open(BackendKind::Cuda) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("cuda_gemm: skipping: {e}");
                return;
            }
        };
        println!("{{\"device\":{:?}}}", device.info().name);
        let max = *sizes.iter().max().unwrap();
        let bytes = (3 * max * max * 4).div_ceil(65536) * 65536;
        // SAFETY: a fresh private anonymous mapping; unmapped at the end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        assert_ne!(base as *mut c_void, libc::MAP_FAILED);
        let id = MemoryId(u64::MAX - 7);
        device.committed(CommittedRange { memory: id, base, offset: 0, len: bytes }).expect("register");
        // SAFETY: the mapping above, alive until munmap at the end, used by nothing else.
        let span = unsafe { GuestSpan::new(base as *mut u8, bytes) };
        // Raw cuBLAS on the same context (the backend made the primary context current).
        let handle = cudarc::cublas::result::create_handle().expect("cublas");
        let mut stream = std::ptr::null_mut();
        // SAFETY: plain driver calls.
        unsafe { ck(sys::cuStreamCreate(&mut stream, 1), "stream") };
        // SAFETY: our handle and stream.
        unsafe { cudarc::cublas::result::set_stream(handle, stream as _).unwrap() };
        for &n in &sizes {
            let reps = if n >= 4096 { repeat.min(5) } else { repeat };
            let elems = n * n;
            // SAFETY: three n×n f32 matrices fit in the mapping (sized for the largest n).
            let all = unsafe { std::slice::from_raw_parts_mut(base as *mut f32, 3 * elems) };
            for (i, v) in all.iter_mut().enumerate() {
                *v = ((i * 7 + 3) % 9) as f32 - 4.0;
            }
            let (a, b, c) = (0u64, (elems * 4) as u64, (2 * elems * 4) as u64);
            let nb = (elems * 4) as u64;
            let spec = GemmSpec {
                dtype: DType::F32,
                trans_a: false,
                trans_b: false,
                m: n as u64,
                n: n as u64,
                k: n as u64,
                lda: n as u64,
                ldb: n as u64,
                ldc: n as u64,
                alpha: 1.0,
                beta: 0.0,
                a: (a, nb),
                b: (b, nb),
                c: (c, nb),
            };
            let op = spec.check(bytes).unwrap();
            let mut path = String::new();
            let shoal_ms = time(reps, || {
                let r = device.gemm(&span, &op).expect("gemm");
                path = format!("{:?}", r.path());
            });
            // Raw cuBLAS, same data, same DMA: pinned guest pages → device → sgemm → back.
            let (mut da, mut db, mut dc) = (0, 0, 0);
            // SAFETY: allocations and copies of the sizes named; the host side is the
            // registered mapping.
            unsafe {
                ck(sys::cuMemAlloc_v2(&mut da, elems * 4), "alloc");
                ck(sys::cuMemAlloc_v2(&mut db, elems * 4), "alloc");
                ck(sys::cuMemAlloc_v2(&mut dc, elems * 4), "alloc");
            }
            let sgemm = |x: u64, y: u64, z: u64| {
                let (alpha, beta) = (1.0f32, 0.0f32);
                // SAFETY: device buffers of n×n f32 each.
                unsafe {
                    cudarc::cublas::result::sgemm(
                        handle,
                        blas::cublasOperation_t::CUBLAS_OP_N,
                        blas::cublasOperation_t::CUBLAS_OP_N,
                        n as i32,
                        n as i32,
                        n as i32,
                        &alpha,
                        y as *const f32,
                        n as i32,
                        x as *const f32,
                        n as i32,
                        &beta,
                        z as *mut f32,
                        n as i32,
                    )
                    .unwrap()
                };
            };
            let raw_dma_ms = time(reps, || {
                // SAFETY: registered host ranges of the right sizes; device buffers above.
                unsafe {
                    ck(sys::cuMemcpyHtoDAsync_v2(da, (base + a as usize) as *const c_void, elems * 4, stream), "htod");
                    ck(sys::cuMemcpyHtoDAsync_v2(db, (base + b as usize) as *const c_void, elems * 4, stream), "htod");
                }
                sgemm(da, db, dc);
                // SAFETY: as above.
                unsafe {
                    ck(sys::cuMemcpyDtoHAsync_v2((base + c as usize) as *mut c_void, dc, elems * 4, stream), "dtoh");
                    ck(sys::cuStreamSynchronize(stream), "sync");
                }
            });
            let raw_dev_ms = time(reps, || {
                sgemm(da, db, dc);
                // SAFETY: our stream.
                unsafe { ck(sys::cuStreamSynchronize(stream), "sync") };
            });
            // bf16 on device data: the matrix units' peak for reference.
            let bf16_ms = time(reps, || {
                let (alpha, beta) = (1.0f32, 0.0f32);
                // SAFETY: the f32 buffers are at least as large as n×n bf16 matrices.
                unsafe {
                    blas::cublasGemmEx(
                        handle,
                        blas::cublasOperation_t::CUBLAS_OP_N,
                        blas::cublasOperation_t::CUBLAS_OP_N,
                        n as i32,
                        n as i32,
                        n as i32,
                        &alpha as *const f32 as *const c_void,
                        db as *const c_void,
                        blas::cudaDataType_t::CUDA_R_16BF,
                        n as i32,
                        da as *const c_void,
                        blas::cudaDataType_t::CUDA_R_16BF,
                        n as i32,
                        &beta as *const f32 as *const c_void,
                        dc as *mut c_void,
                        blas::cudaDataType_t::CUDA_R_16BF,
                        n as i32,
                        blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                    );
                    ck(sys::cuStreamSynchronize(stream), "sync");
                }
            });
            // SAFETY: our allocations, idle after the synchronizations above.
            unsafe {
                sys::cuMemFree_v2(da);
                sys::cuMemFree_v2(db);
                sys::cuMemFree_v2(dc);
            }
            let tf = |ms: f64| 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12;
            println!(
                "{{\"size\":{n},\"shoal_native_ms\":{shoal_ms:.4},\"shoal_path\":\"{path}\",\"raw_cublas_dma_ms\":{raw_dma_ms:.4},\"raw_cublas_device_ms\":{raw_dev_ms:.4},\"bf16_device_ms\":{bf16_ms:.4},\"shoal_tflops\":{:.2},\"raw_dma_tflops\":{:.2},\"raw_device_tflops\":{:.2},\"bf16_tflops\":{:.1},\"shoal_over_raw_dma\":{:.4}}}",
                tf(shoal_ms),
                tf(raw_dma_ms),
                tf(raw_dev_ms),
                tf(bf16_ms),
                shoal_ms / raw_dma_ms
            );
        }
        device.released(id, base, bytes);
        // SAFETY: the mapping made above; the device released it.
        unsafe { libc::munmap(base as *mut c_void, bytes) };
    }
}
