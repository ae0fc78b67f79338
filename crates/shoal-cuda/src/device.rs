//! [`Device`]: one per GPU per process, found through a registry.

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};

use cudarc::driver::CudaContext;
use cudarc::driver::sys;

use crate::budget::{KvBudget, kv_limit};
use crate::{CudaError, check, compile_cached};

/// The most pinned host memory a device keeps for reuse once its users give it back.
pub const PINNED_KEEP: usize = 4 << 30;

/// Every device opened in this process, by ordinal; a device lives while someone holds it.
static DEVICES: LazyLock<Mutex<HashMap<i32, Weak<Device>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// What a device is, read once when it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAttributes {
    /// The CUDA ordinal.
    pub ordinal: i32,
    /// The GPU's name ("NVIDIA H100 80GB HBM3").
    pub name: String,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Device memory, in bytes.
    pub total_memory: usize,
    /// Host and device share one address space.
    pub unified_addressing: bool,
    /// Host memory can be mapped into the device's address space.
    pub can_map_host_memory: bool,
    /// Virtual memory management (`cuMemCreate`, `cuMemMap`) is supported.
    pub virtual_memory: bool,
}

/// One GPU, shared by everyone in the process who uses it: its primary context, what it is,
/// the modules loaded on it, the pinned host buffers kept for reuse and the KV budget.
///
/// Open it with [`Device::open`]; every opener of one ordinal gets the same `Arc`.
pub struct Device {
    ctx: Arc<CudaContext>,
    attrs: DeviceAttributes,
    /// Loaded modules by source key ([`crate::module_key`]).
    modules: Mutex<HashMap<u64, Arc<Module>>>,
    /// Pinned host buffers given back, kept for the next user: (address, bytes).
    pinned: Mutex<Vec<(usize, usize)>>,
    kv: OnceLock<KvBudget>,
}

// SAFETY: the context is cudarc's thread-safe `CudaContext`; the kept pinned buffers are
// plain addresses behind a mutex, owned by the device until handed out.
unsafe impl Send for Device {}
// SAFETY: as above; every field is immutable or behind a mutex.
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("attrs", &self.attrs).finish_non_exhaustive()
    }
}

impl Device {
    /// Whether the CUDA driver and cuBLAS can be loaded on this machine.
    pub fn available() -> bool {
        // SAFETY: only tries to dlopen the libraries; nothing is called through them.
        unsafe { sys::is_culib_present() && cudarc::cublas::sys::is_culib_present() }
    }

    /// The ordinal `SHOAL_CUDA_DEVICE` names (0 when unset).
    pub fn default_ordinal() -> i32 {
        std::env::var("SHOAL_CUDA_DEVICE").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Opens the device `SHOAL_CUDA_DEVICE` names (0 when unset).
    pub fn open_default() -> Result<Arc<Device>, CudaError> {
        Self::open(Self::default_ordinal())
    }

    /// The device `ordinal`: the one already open in this process, or a new one (retaining
    /// its primary context), or why CUDA cannot be used here.
    pub fn open(ordinal: i32) -> Result<Arc<Device>, CudaError> {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        // SAFETY: as above, for cuBLAS.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::NoCublas);
        }
        // Held while opening, so two threads opening one GPU get one device.
        let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = devices.get(&ordinal).and_then(Weak::upgrade) {
            return Ok(d);
        }
        // SAFETY: the driver library is present (checked above); cuInit may be called any
        // number of times.
        check(unsafe { sys::cuInit(0) }, "cuInit")?;
        let count = CudaContext::device_count().map_err(|e| CudaError::driver("cuDeviceGetCount", e))?;
        if ordinal < 0 || ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal as usize).map_err(|e| CudaError::driver("cuDevicePrimaryCtxRetain", e))?;
        let attr = |a| ctx.attribute(a).map_err(|e| CudaError::driver("cuDeviceGetAttribute", e));
        use sys::CUdevice_attribute as A;
        let attrs = DeviceAttributes {
            ordinal,
            name: ctx.name().map_err(|e| CudaError::driver("cuDeviceGetName", e))?,
            sms: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32,
            compute_capability: (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            total_memory: ctx.total_mem().map_err(|e| CudaError::driver("cuDeviceTotalMem", e))?,
            unified_addressing: attr(A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)? != 0,
            can_map_host_memory: attr(A::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)? != 0,
            // The header's CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED (102).
            virtual_memory: attr(A::CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED)? != 0,
        };
        log::debug!("CUDA device {ordinal}: {attrs:?}");
        let device = Arc::new(Device {
            ctx,
            attrs,
            modules: Mutex::new(HashMap::new()),
            pinned: Mutex::new(Vec::new()),
            kv: OnceLock::new(),
        });
        devices.retain(|_, w| w.strong_count() > 0);
        devices.insert(ordinal, Arc::downgrade(&device));
        Ok(device)
    }

    /// What the device is.
    pub fn attributes(&self) -> &DeviceAttributes {
        &self.attrs
    }

    /// The CUDA ordinal.
    pub fn ordinal(&self) -> i32 {
        self.attrs.ordinal
    }

    /// Makes the device's context current on the calling thread (cheap when it already is).
    /// Every driver call on the device's memory, streams and modules needs it.
    pub fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(|e| CudaError::driver("cuCtxSetCurrent", e))
    }

    /// The raw context, for driver calls of the layers above (owned by the device: never
    /// release it).
    pub fn raw_context(&self) -> sys::CUcontext {
        self.ctx.cu_ctx()
    }

    /// The raw device handle (owned by the device).
    pub fn raw_device(&self) -> sys::CUdevice {
        self.ctx.cu_device()
    }

    /// Waits until every stream of the device is idle.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: the context is current (bound above) and retained by `self`.
        check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")
    }

    /// The devices this process has open now (none is opened by asking).
    pub fn opened() -> Vec<Arc<Device>> {
        let devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Arc<Device>> = devices.values().filter_map(Weak::upgrade).collect();
        v.sort_by_key(|d| d.attrs.ordinal);
        v
    }

    /// The KV budget, if a model has asked for it yet (see [`Device::kv_budget`]).
    pub fn kv_budget_made(&self) -> Option<&KvBudget> {
        self.kv.get()
    }

    /// (free, total) device memory now, in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        self.bind()?;
        self.ctx.mem_get_info().map_err(|e| CudaError::driver("cuMemGetInfo", e))
    }

    /// The KV budget shared by every model's KV pool on this device: `SHOAL_KV_POOL_MB` MiB,
    /// or half the memory free when first asked, at most 8 GiB.
    pub fn kv_budget(&self) -> Result<&KvBudget, CudaError> {
        if let Some(b) = self.kv.get() {
            return Ok(b);
        }
        let (free, _) = self.memory_info()?;
        let limit = kv_limit(std::env::var("SHOAL_KV_POOL_MB").ok().as_deref(), free);
        Ok(self.kv.get_or_init(|| {
            log::debug!("CUDA device {}: KV budget {limit} bytes ({free} free)", self.attrs.ordinal);
            KvBudget::new(limit)
        }))
    }

    /// `source` compiled for this device (NVRTC, through the disk cache) and loaded, once per
    /// device per process: later calls with the same source return the same module.
    pub fn module(&self, name: &str, source: &str) -> Result<Arc<Module>, CudaError> {
        let key = crate::module_key(source);
        // Held while compiling, so that two users of one source compile and load it once.
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&key) {
            return Ok(m.clone());
        }
        let (major, minor) = self.attrs.compute_capability;
        let ptx = compile_cached(name, source, major, minor)?;
        let ptx = CString::new(ptx).map_err(|_| CudaError::Compile {
            name: name.to_owned(),
            major,
            minor,
            log: "the PTX holds a NUL byte".into(),
        })?;
        self.bind()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the context is current; `ptx` is NUL-terminated PTX text that outlives the
        // call; the module is unloaded by `Module`'s Drop.
        check(unsafe { sys::cuModuleLoadData(&mut raw, ptx.as_ptr() as *const c_void) }, "cuModuleLoadData")?;
        let module = Arc::new(Module { ctx: self.ctx.clone(), raw, name: name.to_owned() });
        modules.insert(key, module.clone());
        Ok(module)
    }

    /// A pinned (page-locked) host buffer of at least `bytes`: a kept one that fits (not more
    /// than twice as large), or a new one. Returns (address, its size); give it back with
    /// [`Device::give_pinned`]. [`crate::PinnedBuffer`] does both.
    pub fn take_pinned(&self, bytes: usize) -> Result<(usize, usize), CudaError> {
        {
            let mut kept = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
            let best = kept
                .iter()
                .enumerate()
                .filter(|(_, (_, cap))| *cap >= bytes && *cap <= bytes.saturating_mul(2).max(1 << 20))
                .min_by_key(|(_, (_, cap))| *cap)
                .map(|(i, _)| i);
            if let Some(i) = best {
                return Ok(kept.swap_remove(i));
            }
        }
        self.bind()?;
        let cap = bytes.max(1).next_multiple_of(1 << 20);
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: the context is current; allocates `cap` bytes of pinned host memory into
        // `ptr`, given back through `give_pinned` and freed there or when the device drops.
        check(unsafe { sys::cuMemAllocHost_v2(&mut ptr, cap) }, &format!("cuMemAllocHost({cap} bytes)"))?;
        Ok((ptr as usize, cap))
    }

    /// Keeps a pinned buffer from [`Device::take_pinned`] for reuse, or frees it when the kept
    /// ones already hold [`PINNED_KEEP`].
    ///
    /// # Safety
    /// `(ptr, cap)` must come from this device's `take_pinned`, be given back once, and no one
    /// (host or GPU) may use it after this.
    pub unsafe fn give_pinned(&self, ptr: usize, cap: usize) {
        let mut kept = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if kept.iter().map(|k| k.1).sum::<usize>() + cap <= PINNED_KEEP {
            kept.push((ptr, cap));
            return;
        }
        drop(kept);
        if self.bind().is_ok() {
            // SAFETY: allocated by `take_pinned` in this context, no longer used (the caller's
            // contract).
            unsafe { sys::cuMemFreeHost(ptr as *mut c_void) };
        }
    }

    /// Pinned host bytes kept for reuse now.
    pub fn pinned_kept(&self) -> usize {
        self.pinned.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|k| k.1).sum()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Nothing else holds the device: every buffer, stream and pool held an Arc to it.
        let kept = self.pinned.get_mut().map(std::mem::take).unwrap_or_default();
        if !kept.is_empty() && self.bind().is_ok() {
            for (ptr, _) in kept {
                // SAFETY: kept buffers from `take_pinned`, used by no one.
                unsafe { sys::cuMemFreeHost(ptr as *mut c_void) };
            }
        }
        // The modules unload (each holds the context), then the context is released.
    }
}

/// A module loaded on a device (see [`Device::module`]).
pub struct Module {
    ctx: Arc<CudaContext>,
    raw: sys::CUmodule,
    name: String,
}

// SAFETY: a loaded module is immutable; its functions may be launched from any thread with
// the context current.
unsafe impl Send for Module {}
// SAFETY: as above.
unsafe impl Sync for Module {}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Module {
    /// The kernel `name` (an `extern "C" __global__` function of the source). The handle is
    /// valid while the module lives.
    pub fn function(&self, name: &str) -> Result<sys::CUfunction, CudaError> {
        let c = CString::new(name).map_err(|_| CudaError::Driver {
            call: format!("cuModuleGetFunction({name:?})"),
            code: sys::CUresult::CUDA_ERROR_INVALID_VALUE,
        })?;
        let mut f = std::ptr::null_mut();
        check(
            // SAFETY: `raw` is a loaded module (unloaded only on drop); `c` outlives the call.
            unsafe { sys::cuModuleGetFunction(&mut f, self.raw, c.as_ptr()) },
            &format!("cuModuleGetFunction({name} in {})", self.name),
        )?;
        Ok(f)
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: loaded by `Device::module`; no user holds it any more (they held Arcs).
            unsafe { sys::cuModuleUnload(self.raw) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_without_a_driver_says_what_is_missing() {
        if Device::available() {
            eprintln!("skipped: this machine has a CUDA driver and cuBLAS");
            return;
        }
        let e = Device::open(0).unwrap_err();
        assert!(matches!(e, CudaError::NoDriver | CudaError::NoCublas), "{e}");
        assert!(e.to_string().contains("lib"), "{e}");
    }
}
