//! Importing guest memory into Vulkan with `VK_EXT_external_memory_host`.

use ash::vk;
use wgpu_hal::api::Vulkan;

const HOST_ALLOCATION: vk::ExternalMemoryHandleTypeFlags = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;

/// Imports host ranges as wgpu buffers on one Vulkan device.
pub struct Importer {
    /// `minImportedHostPointerAlignment`: pointer and size must be multiples of it.
    pub alignment: usize,
    memory_types: Vec<vk::MemoryPropertyFlags>,
}

/// Opens a wgpu device on a Vulkan adapter with `VK_EXT_external_memory_host`
/// enabled when the adapter offers it.
pub fn open(
    adapter: &wgpu::Adapter,
    limits: &wgpu::Limits,
) -> Result<(wgpu::Device, wgpu::Queue, Option<Importer>), String> {
    let features = wgpu::Features::empty();
    let memory_hints = wgpu::MemoryHints::Performance;
    // SAFETY: we only read from the hal adapter, and it outlives this function.
    let hal_adapter = unsafe { adapter.as_hal::<Vulkan>() }.ok_or("the adapter is not a Vulkan adapter")?;
    let ext = ash::ext::external_memory_host::NAME;
    let has_ext = hal_adapter.physical_device_capabilities().supports_extension(ext);
    let importer = if has_ext {
        let shared = hal_adapter.shared_instance();
        let instance = shared.raw_instance();
        let phd = hal_adapter.raw_physical_device();
        let mut host_props = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let mut props2 = vk::PhysicalDeviceProperties2::default().push_next(&mut host_props);
        // SAFETY: `phd` is a valid physical device of `instance`, and the chained
        // struct is of the extension the device supports.
        unsafe { instance.get_physical_device_properties2(phd, &mut props2) };
        // SAFETY: as above.
        let mem = unsafe { instance.get_physical_device_memory_properties(phd) };
        let memory_types =
            mem.memory_types[..mem.memory_type_count as usize].iter().map(|t| t.property_flags).collect();
        Some(Importer { alignment: (host_props.min_imported_host_pointer_alignment as usize).max(1), memory_types })
    } else {
        None
    };
    let callback: Option<Box<wgpu_hal::vulkan::CreateDeviceCallback>> = if has_ext {
        Some(Box::new(move |args: wgpu_hal::vulkan::CreateDeviceCallbackArgs| args.extensions.push(ext)))
    } else {
        None
    };
    // SAFETY: we add one extension the adapter reports, and remove nothing.
    let open = unsafe { hal_adapter.open_with_callback(features, limits, &memory_hints, callback) }
        .map_err(|e| format!("cannot open the Vulkan device: {e}"))?;
    drop(hal_adapter);
    let desc = wgpu::DeviceDescriptor {
        label: Some("shoal"),
        required_features: features,
        required_limits: limits.clone(),
        memory_hints,
        ..Default::default()
    };
    // SAFETY: `open` was created from this adapter's hal adapter with these features.
    let (device, queue) = unsafe { adapter.create_device_from_hal::<Vulkan>(open, &desc) }
        .map_err(|e| format!("cannot create the device: {e}"))?;
    Ok((device, queue, importer))
}

impl Importer {
    /// Imports `addr..addr+len` as a storage buffer aliasing those host pages.
    ///
    /// # Safety
    /// The range must be mapped, readable and writable, aligned to `alignment`, and
    /// stay mapped until the buffer is destroyed and the device is done with it.
    pub unsafe fn import(&self, device: &wgpu::Device, addr: usize, len: usize) -> Result<wgpu::Buffer, String> {
        // SAFETY: only used to create objects on this device, which outlives them.
        let hal = unsafe { device.as_hal::<Vulkan>() }.ok_or("not a Vulkan device")?;
        let raw = hal.raw_device();
        let instance = hal.shared_instance().raw_instance();
        let ext = ash::ext::external_memory_host::Device::new(instance, raw);
        let mut ptr_props = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: `addr` is a host allocation that stays valid (caller's contract) and
        // the extension is enabled on this device.
        let r = unsafe {
            (ext.fp().get_memory_host_pointer_properties_ext)(
                raw.handle(),
                HOST_ALLOCATION,
                addr as *const _,
                &mut ptr_props,
            )
        };
        if r != vk::Result::SUCCESS {
            return Err(format!("vkGetMemoryHostPointerPropertiesEXT: {r}"));
        }
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(HOST_ALLOCATION);
        let info = vk::BufferCreateInfo::default()
            .size(len as u64)
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut external);
        // SAFETY: a valid create info on a live device.
        let buffer = unsafe { raw.create_buffer(&info, None) }.map_err(|e| format!("vkCreateBuffer: {e}"))?;
        // SAFETY: `buffer` was just created on `raw`.
        let req = unsafe { raw.get_buffer_memory_requirements(buffer) };
        let bits = req.memory_type_bits & ptr_props.memory_type_bits;
        // Prefer a host-coherent type: the CPU sees GPU writes without flushes.
        let pick = (0..self.memory_types.len() as u32)
            .filter(|i| bits & (1 << i) != 0)
            .max_by_key(|&i| self.memory_types[i as usize].contains(vk::MemoryPropertyFlags::HOST_COHERENT));
        let fail = |msg: String| {
            // SAFETY: the buffer is ours and unused.
            unsafe { raw.destroy_buffer(buffer, None) };
            Err(msg)
        };
        let Some(type_index) = pick else {
            return fail(format!(
                "no memory type fits (buffer {:#x}, host pointer {:#x})",
                req.memory_type_bits, ptr_props.memory_type_bits
            ));
        };
        if req.size > len as u64 {
            return fail(format!("the buffer needs {} bytes of memory, more than the {len} imported", req.size));
        }
        let mut import =
            vk::ImportMemoryHostPointerInfoEXT::default().handle_type(HOST_ALLOCATION).host_pointer(addr as *mut _);
        let alloc = vk::MemoryAllocateInfo::default()
            .allocation_size(len as u64)
            .memory_type_index(type_index)
            .push_next(&mut import);
        // SAFETY: importing a host range that the caller keeps valid; aligned per contract.
        let memory = match unsafe { raw.allocate_memory(&alloc, None) } {
            Ok(m) => m,
            Err(e) => return fail(format!("vkAllocateMemory (import): {e}")),
        };
        // SAFETY: both objects are fresh, on this device; offset 0 meets any alignment.
        if let Err(e) = unsafe { raw.bind_buffer_memory(buffer, memory, 0) } {
            // SAFETY: the memory is ours and bound to nothing.
            unsafe { raw.free_memory(memory, None) };
            return fail(format!("vkBindBufferMemory: {e}"));
        }
        drop(hal);
        // SAFETY: wgpu-hal takes ownership of the buffer and its memory, frees both when
        // the wgpu buffer is destroyed; the buffer is never mapped by wgpu (no MAP usage).
        let hal_buffer = unsafe { wgpu_hal::vulkan::Buffer::from_raw_managed(buffer, memory, 0, len as u64) };
        let desc = wgpu::BufferDescriptor {
            label: Some("shoal guest memory"),
            size: len as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        };
        // SAFETY: the hal buffer was created on this device, matches `desc`, is
        // initialised (it holds the guest's bytes) and is not empty.
        Ok(unsafe { device.create_buffer_from_hal::<Vulkan>(hal_buffer, &desc) })
    }
}
