//! Compiling CUDA C++ with NVRTC, once per process and once per machine (a PTX cache on
//! disk). No GPU is needed to compile.

use std::path::PathBuf;
use std::sync::Mutex;

use crate::CudaError;

/// (source hash, major, minor) of compiled PTX.
type PtxKey = (u64, i32, i32);

/// Compiled PTX by source and compute capability.
static CACHE: Mutex<Vec<(PtxKey, String)>> = Mutex::new(Vec::new());

/// FNV-1a: a hash that is the same in every build, for cache file names and module keys.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The key a source is cached under, in memory, on disk and in a device's loaded modules:
/// the same source gives the same key in every build and process.
pub fn module_key(source: &str) -> u64 {
    fnv1a(source.as_bytes())
}

/// The disk cache file of `name`'s PTX with source key `key` for `major.minor`.
pub fn ptx_file_name(name: &str, key: u64, major: i32, minor: i32) -> String {
    format!("{name}-{key:016x}-sm{major}{minor}.ptx")
}

/// `$XDG_CACHE_HOME/shoal`, or `$HOME/.cache/shoal`.
fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("shoal"))
}

/// PTX of `source` (named `name` in messages and cache files) for compute capability
/// `major.minor`, from memory, the disk cache, or NVRTC.
///
/// Needs the NVRTC library (`libnvrtc.so.13`: the CUDA toolkit, or PyPI's
/// `nvidia-cuda-nvrtc`) only when nothing is cached; no GPU is needed.
pub fn compile_cached(name: &str, source: &str, major: i32, minor: i32) -> Result<String, CudaError> {
    let key = module_key(source);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, ptx)) = cache.iter().find(|(k, _)| *k == (key, major, minor)) {
        return Ok(ptx.clone());
    }
    let file = cache_dir().map(|d| d.join(ptx_file_name(name, key, major, minor)));
    if let Some(ptx) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        cache.push(((key, major, minor), ptx.clone()));
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
    cache.push(((key, major, minor), ptx.clone()));
    Ok(ptx)
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the NVRTC library; nothing is called through it.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles `source` for compute capability `major.minor` with NVRTC, uncached.
pub fn compile_source(name: &str, source: &str, major: i32, minor: i32) -> Result<String, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{major}{minor}"), "-default-device".into()],
        name: Some(format!("shoal_{name}.cu")),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| CudaError::Compile {
        name: name.to_owned(),
        major,
        minor,
        log: format!("{e:?}"),
    })?;
    Ok(ptx.to_src())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_key_is_the_sources_fnv1a_and_stable() {
        // FNV-1a's published test values: the key must not change between builds, or every
        // machine's disk cache would be recompiled.
        assert_eq!(module_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(module_key("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(module_key("foobar"), 0x8594_4171_f739_67e8);
        assert_ne!(module_key("__global__ void f() {}"), module_key("__global__ void g() {}"));
        assert_eq!(ptx_file_name("engine", 0xab, 9, 0), "engine-00000000000000ab-sm90.ptx");
    }
}
