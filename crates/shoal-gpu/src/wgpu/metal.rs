//! Importing guest memory into Metal with `newBufferWithBytesNoCopy`.
//!
//! Compiled and type-checked for `aarch64-apple-darwin` (`cargo check`), never run
//! on this project's machines: nothing here has Apple hardware.

use std::ptr::NonNull;

use objc2_metal::{MTLDevice, MTLResourceOptions};
use wgpu_hal::api::Metal;

/// Apple Silicon needs page-aligned (16 KiB) pointers and lengths.
pub const ALIGNMENT: usize = 16 * 1024;

/// Imports host ranges as wgpu buffers on one Metal device.
pub struct Importer;

impl Importer {
    /// Wraps `addr..addr+len` in a shared-storage Metal buffer without copying.
    ///
    /// # Safety
    /// The range must be mapped, readable and writable, 16 KiB aligned, and stay
    /// mapped until the buffer is destroyed and the device is done with it.
    pub unsafe fn import(&self, device: &wgpu::Device, addr: usize, len: usize) -> Result<wgpu::Buffer, String> {
        if addr % ALIGNMENT != 0 || len % ALIGNMENT != 0 {
            return Err(format!("{addr:#x}+{len} is not {ALIGNMENT}-byte aligned"));
        }
        let ptr = NonNull::new(addr as *mut std::ffi::c_void).ok_or("null pointer")?;
        // SAFETY: only used to create a buffer on this device.
        let hal = unsafe { device.as_hal::<Metal>() }.ok_or("not a Metal device")?;
        // SAFETY: the pages stay valid for the buffer's life (caller's contract); no
        // deallocator: shoal-memory owns and unmaps the pages itself.
        let raw = unsafe {
            hal.raw_device().newBufferWithBytesNoCopy_length_options_deallocator(
                ptr,
                len,
                MTLResourceOptions::StorageModeShared,
                None,
            )
        }
        .ok_or("newBufferWithBytesNoCopy returned nil")?;
        drop(hal);
        // SAFETY: `raw` is a buffer of this device of exactly `len` bytes.
        let hal_buffer = unsafe { wgpu_hal::metal::Device::buffer_from_raw(raw, len as u64) };
        let desc = wgpu::BufferDescriptor {
            label: Some("shoal guest memory"),
            size: len as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        };
        // SAFETY: created on this device, matches `desc`, initialised, not empty.
        Ok(unsafe { device.create_buffer_from_hal::<Metal>(hal_buffer, &desc) })
    }
}
