//! Compiling shoal's CUDA kernels with NVRTC, once per process and once per machine
//! (a PTX cache on disk).

use std::sync::Mutex;

/// The CUDA C++ source of every kernel.
pub const KERNELS_SOURCE: &str = include_str!("kernels.cu");

/// (source hash, major, minor) of compiled PTX.
type PtxKey = (u64, i32, i32);

/// Compiled PTX by source and compute capability.
static CACHE: Mutex<Vec<(PtxKey, String)>> = Mutex::new(Vec::new());

/// FNV-1a: a hash that is the same in every build, for cache file names.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("shoal"))
}

/// PTX for compute capability `major.minor`, from memory, the disk cache, or NVRTC.
///
/// Needs the NVRTC library (`libnvrtc.so.13`: the CUDA toolkit, or PyPI's
/// `nvidia-cuda-nvrtc`) only when nothing is cached; no GPU is needed.
pub fn compile_kernels(major: i32, minor: i32) -> Result<String, String> {
    compile_cached("kernels", KERNELS_SOURCE, major, minor)
}

/// PTX of `source` (named `name` in messages and cache files) for compute capability
/// `major.minor`, from memory, the disk cache, or NVRTC; see [`compile_kernels`].
pub fn compile_cached(name: &str, source: &str, major: i32, minor: i32) -> Result<String, String> {
    let hash = fnv1a(source.as_bytes());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, ptx)) = cache.iter().find(|(key, _)| *key == (hash, major, minor)) {
        return Ok(ptx.clone());
    }
    let file = cache_dir().map(|d| d.join(format!("{name}-{hash:016x}-sm{major}{minor}.ptx")));
    if let Some(ptx) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        cache.push(((hash, major, minor), ptx.clone()));
        return Ok(ptx);
    }
    let ptx = compile_source(name, source, major, minor)?;
    if let Some(f) = &file {
        // Best effort: write then rename, so a reader never sees half a file.
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }
    cache.push(((hash, major, minor), ptx.clone()));
    Ok(ptx)
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the NVRTC library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles the kernels for compute capability `major.minor` with NVRTC, uncached.
pub fn compile_ptx(major: i32, minor: i32) -> Result<String, String> {
    compile_source("kernels", KERNELS_SOURCE, major, minor)
}

/// Compiles `source` for compute capability `major.minor` with NVRTC, uncached.
pub fn compile_source(name: &str, source: &str, major: i32, minor: i32) -> Result<String, String> {
    if !nvrtc_available() {
        return Err(
            "NVRTC (libnvrtc.so.13) is not installed: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and add its lib folder to LD_LIBRARY_PATH".into(),
        );
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{major}{minor}"), "-default-device".into()],
        name: Some(format!("shoal_{name}.cu")),
        ..Default::default()
    };
    Ok(cudarc::nvrtc::compile_ptx_with_opts(source, opts)
        .map_err(|e| format!("NVRTC could not compile shoal's {name} kernels: {e:?}"))?
        .to_src())
}
