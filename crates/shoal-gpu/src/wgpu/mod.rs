//! The wgpu backend: Vulkan (Linux, Windows) and Metal (Apple).
//!
//! Guest memory is imported into the device when it is committed: on Vulkan with
//! `VK_EXT_external_memory_host` ([`vulkan`]), on Metal with
//! `newBufferWithBytesNoCopy` ([`metal`]). Each committed range becomes one or more
//! wgpu buffers ("chunks", no larger than one allocation may be) that alias the
//! guest's pages. An operation binds windows of those chunks, split so that no
//! binding exceeds the device's limit (lavapipe: 128 MiB); kernels then read and
//! write the guest's bytes directly. Where an import is impossible (no extension, or
//! a view straddling two chunks) the operand goes through one explicit copy, and the
//! report says so.

mod plan;

#[cfg(target_vendor = "apple")]
mod metal;
#[cfg(not(target_vendor = "apple"))]
mod vulkan;

use std::collections::HashMap;
use std::sync::Mutex;

use shoal_memory::{CommittedRange, MemoryId};
use wgpu::util::DeviceExt;

use std::ops::Range;

use crate::{
    BackendKind, BufferId, BufferTable, DType, DeviceInfo, Gemm, GuestSpan, OpError, OpReport, OpenError,
    OperandMapping, Scal,
};

/// The largest chunk of guest memory imported as one buffer.
const MAX_CHUNK: u64 = 1 << 30;

/// One imported range of guest memory.
struct Chunk {
    memory: MemoryId,
    /// Host address of the first byte (the pointer given to the import).
    addr: usize,
    len: usize,
    buffer: wgpu::Buffer,
}

/// The Vulkan / Metal backend.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: DeviceInfo,
    importer: Option<Importer>,
    chunks: Mutex<Vec<Chunk>>,
    gemm: Kernel,
    scal: Kernel,
    offset_align: u64,
    max_binding: u64,
    pub(crate) buffers: BufferTable<wgpu::Buffer>,
    /// Live memories (base → committed bytes): copies back skip released ones.
    live: std::sync::Arc<Mutex<HashMap<usize, usize>>>,
}

struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// How guest ranges become device buffers on this adapter.
enum Importer {
    #[cfg(not(target_vendor = "apple"))]
    Vulkan(vulkan::Importer),
    #[cfg(target_vendor = "apple")]
    Metal(metal::Importer),
}

impl Importer {
    fn alignment(&self) -> usize {
        match self {
            #[cfg(not(target_vendor = "apple"))]
            Importer::Vulkan(i) => i.alignment,
            #[cfg(target_vendor = "apple")]
            Importer::Metal(_) => metal::ALIGNMENT,
        }
    }

    /// # Safety
    /// `addr..addr+len` must be mapped, readable and writable memory that stays mapped
    /// until the returned buffer is destroyed and the device has finished with it.
    unsafe fn import(&self, device: &wgpu::Device, addr: usize, len: usize) -> Result<wgpu::Buffer, String> {
        match self {
            // SAFETY: forwarded contract.
            #[cfg(not(target_vendor = "apple"))]
            Importer::Vulkan(i) => unsafe { i.import(device, addr, len) },
            // SAFETY: forwarded contract.
            #[cfg(target_vendor = "apple")]
            Importer::Metal(i) => unsafe { i.import(device, addr, len) },
        }
    }
}

/// Where one operand window lives for a dispatch.
struct Binding {
    buffer: wgpu::Buffer,
    /// Byte offset of the binding in `buffer`.
    offset: u64,
    size: u64,
    /// Element index of the window's first element within the binding.
    elem_off: u32,
    mapping: OperandMapping,
    /// For a copied output: where to write the result back.
    readback: Option<Readback>,
    /// A device buffer, not guest memory (not part of the in-place report).
    device_resident: bool,
}

struct Readback {
    staging: wgpu::Buffer,
    guest_addr: usize,
    len: usize,
}

impl WgpuBackend {
    /// Opens the best adapter of `kind` (Vulkan or Metal).
    pub fn open(kind: BackendKind) -> Result<WgpuBackend, OpenError> {
        let backends = match kind {
            BackendKind::Vulkan => wgpu::Backends::VULKAN,
            BackendKind::Metal => wgpu::Backends::METAL,
            _ => return Err(OpenError::Unavailable(kind, "not a wgpu backend".into())),
        };
        #[cfg(target_vendor = "apple")]
        if kind == BackendKind::Vulkan {
            return Err(OpenError::NotCompiled(kind, "Apple platforms use the metal backend"));
        }
        #[cfg(not(target_vendor = "apple"))]
        if kind == BackendKind::Metal {
            return Err(OpenError::NotCompiled(kind, "Metal exists only on Apple platforms"));
        }
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = backends;
        let instance = wgpu::Instance::new(desc);
        let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
        if adapters.is_empty() {
            let hint = if kind == BackendKind::Vulkan {
                "no Vulkan driver found; install one (Debian: `apt-get install mesa-vulkan-drivers libvulkan1`) or use --backend cpu"
            } else {
                "no Metal device found"
            };
            return Err(OpenError::Unavailable(kind, hint.into()));
        }
        // Prefer a real GPU; a CPU implementation (lavapipe) comes last. SHOAL_ADAPTER
        // picks by a substring of the name.
        let wanted = std::env::var("SHOAL_ADAPTER").ok();
        adapters.sort_by_key(|a| {
            let info = a.get_info();
            let named = wanted.as_deref().is_some_and(|w| info.name.contains(w));
            let rank = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => 0,
                wgpu::DeviceType::IntegratedGpu => 1,
                wgpu::DeviceType::VirtualGpu => 2,
                wgpu::DeviceType::Other => 3,
                wgpu::DeviceType::Cpu => 4,
            };
            (!named, rank)
        });
        let adapter = adapters.swap_remove(0);
        let ainfo = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue, importer, note) = open_device(&adapter, &limits, kind)?;
        let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let offset_align = u64::from(limits.min_storage_buffer_offset_alignment).max(4);
        let gemm = Kernel::new(&device, include_str!("gemm.wgsl"), "gemm", 3);
        let scal = Kernel::new(&device, include_str!("scal.wgsl"), "scal", 1);
        device.on_uncaptured_error(std::sync::Arc::new(|e: wgpu::Error| log::error!("wgpu: {e}")));
        warm_up(&device, &queue, &gemm, &scal);
        let name =
            if ainfo.driver.is_empty() { ainfo.name.clone() } else { format!("{} ({})", ainfo.name, ainfo.driver) };
        Ok(WgpuBackend {
            info: DeviceInfo {
                backend: kind,
                name,
                imports_guest_memory: importer.is_some(),
                import_note: note,
                max_binding_bytes: max_binding,
                gemm_dtypes: vec![DType::F32],
            },
            device,
            queue,
            importer,
            chunks: Mutex::new(Vec::new()),
            gemm,
            scal,
            offset_align,
            max_binding,
            live: Default::default(),
            buffers: BufferTable::default(),
        })
    }

    /// What this backend is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Imports a memory's committed pages after they grew (a no-op where import is
    /// unavailable: operations then copy).
    ///
    /// The whole committed range `base..base+offset+len` is imported again, in
    /// chunks of at most 1 GiB, replacing the memory's earlier chunks: a guest's heap
    /// grows in small steps, and views that straddle two growth steps must still fall
    /// inside one buffer. Growth is rare and importing is cheap next to a copy, but
    /// it is paid once per `memory.grow`; see docs/architecture.md.
    pub fn import(&self, range: CommittedRange) -> Result<(), String> {
        let committed = range.offset + range.len;
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(range.base, committed);
        let Some(importer) = &self.importer else { return Ok(()) };
        let align = importer.alignment();
        let (start, len) = (range.base, committed);
        if start % align != 0 || len % align != 0 {
            log::warn!("{:?}: range {start:#x}+{len} is not {align}-byte aligned; it will be copied", range.memory);
            return Ok(());
        }
        // The device must be done with the old chunks before the pages are imported again.
        self.forget_chunks(range.memory);
        let chunk_max = (MAX_CHUNK.min(self.device.limits().max_buffer_size) as usize) / align * align;
        let mut new = Vec::new();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(chunk_max);
            // SAFETY: the range is committed guest memory (shoal-memory) and stays
            // mapped until `release` for this memory returns, which destroys these
            // buffers after waiting for the device.
            let buffer = unsafe { importer.import(&self.device, start + at, n) }
                .map_err(|e| format!("importing {n} bytes at {:#x}: {e}", start + at))?;
            new.push(Chunk { memory: range.memory, addr: start + at, len: n, buffer });
            at += n;
        }
        let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        chunks.extend(new);
        chunks.sort_by_key(|c| c.addr);
        Ok(())
    }

    /// Forgets every chunk of a memory, after the device has finished with it.
    pub fn release(&self, memory: MemoryId, base: usize, _len: usize) {
        self.forget_chunks(memory);
        // Pending copies back into this memory are skipped from now on.
        self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&base);
    }

    fn forget_chunks(&self, memory: MemoryId) {
        let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
        let gone: Vec<Chunk> = {
            let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
            let (gone, keep) = chunks.drain(..).partition(|c| c.memory == memory);
            *chunks = keep;
            gone
        };
        if gone.is_empty() {
            return;
        }
        for c in &gone {
            c.buffer.destroy();
        }
        drop(gone);
        // Let wgpu free the imported allocations before the pages are reused or unmapped.
        let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
    }

    /// Binds bytes `start..start+len` of a device buffer.
    fn bind_buffer(&self, buf: &wgpu::Buffer, start: usize, len: usize) -> Binding {
        let rel = start as u64;
        let offset = rel / self.offset_align * self.offset_align;
        let size = (rel + len.max(4) as u64 - offset).div_ceil(4) * 4;
        Binding {
            buffer: buf.clone(),
            offset,
            size: size.min(buf.size() - offset),
            elem_off: ((rel - offset) / 4) as u32,
            mapping: OperandMapping { guest_addr: 0, device_host_addr: None },
            readback: None,
            device_resident: true,
        }
    }

    /// A zeroed buffer in device memory.
    pub fn create_buffer(&self, len: usize) -> Result<BufferId, OpError> {
        let size = (len as u64).div_ceil(4) * 4;
        let max = self.device.limits().max_buffer_size;
        if size > max {
            return Err(OpError::TooLarge(format!("a buffer of {size} bytes; this device allows {max}")));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("shoal device buffer"),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(OpError::Device(format!("cannot allocate {size} bytes: {e}")));
        }
        Ok(self.buffers.insert(buffer))
    }

    /// Copies guest bytes into a buffer (checked by `Device`).
    pub fn write_buffer(&self, id: BufferId, offset: u64, span: &GuestSpan, src: Range<usize>) -> Result<(), OpError> {
        let buf = self.buffers.get(id)?;
        // SAFETY: `src` was checked against the span, which is ours for this call.
        let bytes = unsafe { std::slice::from_raw_parts(span.ptr(src.start), src.len()) };
        // The bytes are copied into wgpu's staging now; the write lands before any later submission.
        self.queue.write_buffer(&buf, offset, bytes);
        self.queue.submit([]);
        Ok(())
    }

    /// Copies buffer bytes into the guest (checked by `Device`).
    pub fn read_buffer(&self, id: BufferId, offset: u64, span: &GuestSpan, dst: Range<usize>) -> Result<(), OpError> {
        let buf = self.buffers.get(id)?;
        if dst.is_empty() {
            return Ok(());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("shoal readback"),
            size: dst.len() as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&buf, offset, &staging, 0, dst.len() as u64);
        let index = self.queue.submit([encoder.finish()]);
        let rb = Readback { staging, guest_addr: span.base() + dst.start, len: dst.len() };
        self.pending(span, index, vec![rb], OpReport::default()).wait().map(drop)
    }

    /// Binds the guest bytes `addr..addr+len` (element-aligned) for a kernel.
    fn bind(&self, span: &GuestSpan, addr: usize, len: usize, output: bool) -> Result<Binding, OpError> {
        let len = len.max(4);
        {
            let chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
            let i = chunks.partition_point(|c| c.addr <= addr);
            if i > 0 {
                let c = &chunks[i - 1];
                if addr + len <= c.addr + c.len {
                    let rel = (addr - c.addr) as u64;
                    let offset = rel / self.offset_align * self.offset_align;
                    let size = (rel + len as u64 - offset).div_ceil(4) * 4;
                    return Ok(Binding {
                        buffer: c.buffer.clone(),
                        offset,
                        size,
                        elem_off: ((rel - offset) / 4) as u32,
                        mapping: OperandMapping { guest_addr: addr, device_host_addr: Some(c.addr + rel as usize) },
                        readback: None,
                        device_resident: false,
                    });
                }
            }
        }
        // The explicit copy: device memory holding the window.
        let size = (len as u64).div_ceil(4) * 4;
        // SAFETY: the window lies inside the span (the op was checked), which the
        // GuestSpan contract keeps mapped and unshared during this call.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
        debug_assert!(addr >= span.base() && addr + len <= span.base() + span.size());
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("shoal copy"),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&buffer, 0, bytes);
        let readback = output.then(|| Readback {
            staging: self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("shoal readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            guest_addr: addr,
            len,
        });
        Ok(Binding {
            buffer,
            offset: 0,
            size,
            elem_off: 0,
            mapping: OperandMapping { guest_addr: addr, device_host_addr: None },
            readback,
            device_resident: false,
        })
    }

    /// Records and submits a GEMM; the result is complete once the pending op is waited
    /// for. (A GEMM whose copied output needs several tiles runs them one by one
    /// before this returns.)
    pub fn submit_gemm(&self, span: &GuestSpan, op: &Gemm) -> Result<WgpuPending, OpError> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let max_elems = ((self.max_binding - self.offset_align) / 4) as usize;
        let tiles = plan::plan(op, max_elems);
        let mut encoder = self.device.create_command_encoder(&Default::default());
        let mut report = OpReport::default();
        let mut readbacks = Vec::new();
        let bufs: Vec<Option<wgpu::Buffer>> = op
            .spaces
            .iter()
            .map(|sp| sp.map(|id| self.buffers.get(id).map(|b| (*b).clone())).transpose())
            .collect::<Result<_, _>>()?;
        let ranges = [&op.a, &op.b, &op.c];
        let operand = |i: usize, w: plan::Window, output: bool| -> Result<Binding, OpError> {
            let start = ranges[i].start + w.start * 4;
            match &bufs[i] {
                Some(buf) => Ok(self.bind_buffer(buf, start, w.len * 4)),
                None => self.bind(span, span.base() + start, w.len * 4, output),
            }
        };
        for t in &tiles {
            let [wa, wb, wc] = t.windows(op);
            let c = operand(2, wc, true)?;
            let has_k = t.p1 > t.p0;
            let (a, b) =
                if has_k { (operand(0, wa, false)?, operand(1, wb, false)?) } else { (self.alias(&c), self.alias(&c)) };
            let first = t.first_k();
            let beta = if first { op.beta } else { 1.0 };
            let flags = u32::from(op.trans_a) | (u32::from(op.trans_b) << 1) | (u32::from(beta != 0.0) << 2);
            let (m, n) = ((t.i1 - t.i0) as u32, (t.j1 - t.j0) as u32);
            let params: [u32; 16] = [
                m,
                n,
                (t.p1 - t.p0) as u32,
                flags,
                op.lda as u32,
                op.ldb as u32,
                op.ldc as u32,
                0,
                a.elem_off,
                b.elem_off,
                c.elem_off,
                0,
                op.alpha.to_bits(),
                beta.to_bits(),
                0,
                0,
            ];
            let bind_group = self.gemm.bind(&self.device, &[&a, &b, &c], &params);
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&self.gemm.pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(n.div_ceil(64), m.div_ceil(64), 1);
            }
            report.dispatches += 1;
            for (bnd, used) in [(&a, has_k), (&b, has_k), (&c, true)] {
                if used && bnd.device_resident {
                    report.device_operands += 1;
                }
                if used && !bnd.device_resident {
                    report.operands.push(bnd.mapping);
                    if bnd.mapping.device_host_addr.is_none() {
                        report.bytes_copied += bnd.size;
                    }
                }
            }
            if let Some(rb) = c.readback {
                encoder.copy_buffer_to_buffer(&c.buffer, 0, &rb.staging, 0, c.size);
                report.bytes_copied += c.size;
                readbacks.push(rb);
                if tiles.len() > 1 {
                    // A copied C must be back in the guest before the next tile copies its
                    // window in (tiles along k accumulate; windows along n interleave).
                    let index = self.queue.submit([encoder.finish()]);
                    let done = self.pending(span, index, std::mem::take(&mut readbacks), OpReport::default());
                    done.wait()?;
                    encoder = self.device.create_command_encoder(&Default::default());
                }
            }
        }
        let index = self.queue.submit([encoder.finish()]);
        check_scope(scope)?;
        Ok(self.pending(span, index, readbacks, report))
    }

    /// `x = alpha·x`, in chunks that fit one binding.
    pub fn scal(&self, span: &GuestSpan, op: &Scal) -> Result<OpReport, OpError> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let max = ((self.max_binding - self.offset_align) / 4 * 4) as usize;
        let mut encoder = self.device.create_command_encoder(&Default::default());
        let mut report = OpReport::default();
        let mut readbacks = Vec::new();
        let mut at = op.x.start;
        while at < op.x.end {
            let len = (op.x.end - at).min(max);
            let x = self.bind(span, span.base() + at, len, true)?;
            let n = (len / 4) as u32;
            let params = [n, x.elem_off, op.alpha.to_bits(), 0];
            let bind_group = self.scal.bind(&self.device, &[&x], &params);
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&self.scal.pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(n.div_ceil(256).clamp(1, 65535), 1, 1);
            }
            report.dispatches += 1;
            report.operands.push(x.mapping);
            if let Some(rb) = x.readback {
                encoder.copy_buffer_to_buffer(&x.buffer, 0, &rb.staging, 0, x.size);
                report.bytes_copied += 2 * x.size;
                readbacks.push(rb);
            }
            at += len;
        }
        let index = self.queue.submit([encoder.finish()]);
        check_scope(scope)?;
        self.pending(span, index, readbacks, report).wait()
    }

    fn pending(
        &self,
        span: &GuestSpan,
        index: wgpu::SubmissionIndex,
        readbacks: Vec<Readback>,
        report: OpReport,
    ) -> WgpuPending {
        let announced = self.live.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&span.base());
        WgpuPending {
            device: self.device.clone(),
            index,
            readbacks,
            report,
            base: span.base(),
            size: span.size(),
            announced,
            live: self.live.clone(),
        }
    }

    fn alias(&self, b: &Binding) -> Binding {
        Binding {
            buffer: b.buffer.clone(),
            offset: b.offset,
            size: b.size,
            elem_off: b.elem_off,
            mapping: b.mapping,
            readback: None,
            device_resident: b.device_resident,
        }
    }
}

impl Kernel {
    fn new(device: &wgpu::Device, source: &str, entry: &str, storage: u32) -> Kernel {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(entry),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let mut entries: Vec<wgpu::BindGroupLayoutEntry> = (0..storage)
            .map(|i| wgpu::BindGroupLayoutEntry {
                binding: i,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: false },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: storage,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
        let layout =
            device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(entry), entries: &entries });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(entry),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        Kernel { pipeline, layout }
    }

    fn bind(&self, device: &wgpu::Device, storage: &[&Binding], params: &[u32]) -> wgpu::BindGroup {
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("shoal params"),
            contents: bytemuck::cast_slice(params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries: Vec<wgpu::BindGroupEntry> = storage
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &b.buffer,
                    offset: b.offset,
                    size: wgpu::BufferSize::new(b.size),
                }),
            })
            .collect();
        entries.push(wgpu::BindGroupEntry { binding: storage.len() as u32, resource: uniform.as_entire_binding() });
        device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &self.layout, entries: &entries })
    }
}

/// Work submitted to the queue; copies back into guest memory on `wait`.
pub struct WgpuPending {
    device: wgpu::Device,
    index: wgpu::SubmissionIndex,
    readbacks: Vec<Readback>,
    report: OpReport,
    /// The guest memory the copies go back to, and the live-memory table to check it in.
    base: usize,
    /// The span's size when submitted.
    size: usize,
    /// Whether the memory was announced (then its release is announced too).
    announced: bool,
    live: std::sync::Arc<Mutex<HashMap<usize, usize>>>,
}

impl WgpuPending {
    /// Waits for the submission, then writes copied outputs back into the guest.
    pub fn wait(self) -> Result<OpReport, OpError> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: Some(self.index.clone()), timeout: None })
            .map_err(|e| OpError::Device(format!("waiting for the GPU: {e}")))?;
        for rb in &self.readbacks {
            rb.staging.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        }
        if !self.readbacks.is_empty() {
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| OpError::Device(format!("mapping results: {e}")))?;
        }
        if self.readbacks.is_empty() {
            return Ok(self.report);
        }
        // Holding the lock keeps the memory from being released (and unmapped) while
        // we write into it; a memory already released gets nothing.
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // Memory never announced to this device is the caller's to keep mapped until
        // this wait (GuestSpan's contract); an announced one may have been released.
        let committed = match (live.get(&self.base), self.announced) {
            (Some(&committed), _) => committed,
            (None, false) => self.size,
            (None, true) => {
                return Err(OpError::Device("the guest memory was released before the result was read back".into()));
            }
        };
        for rb in &self.readbacks {
            let data = rb
                .staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| OpError::Device(format!("reading results back: {e}")))?;
            if rb.guest_addr < self.base || rb.guest_addr + rb.len > self.base + committed {
                return Err(OpError::Device(format!(
                    "internal: a result window {:#x}+{} lies outside its memory",
                    rb.guest_addr, rb.len
                )));
            }
            // SAFETY: `guest_addr..+len` is the checked output window, inside the
            // memory's committed pages (asserted above); the memory is live and cannot
            // be released while we hold `live`.
            let dst = unsafe { std::slice::from_raw_parts_mut(rb.guest_addr as *mut u8, rb.len) };
            dst.copy_from_slice(&data[..rb.len]);
            drop(data);
            rb.staging.unmap();
        }
        Ok(self.report)
    }
}

/// Turns a validation error wgpu caught into an operation error (instead of a panic).
fn check_scope(scope: wgpu::ErrorScopeGuard) -> Result<(), OpError> {
    match pollster::block_on(scope.pop()) {
        Some(e) => Err(OpError::Device(format!("wgpu rejected the work: {e}"))),
        None => Ok(()),
    }
}

/// Runs each kernel once on a scratch buffer, so that drivers that compile shaders
/// at first dispatch (lavapipe's JIT) do it at open, not inside a guest's first call.
fn warm_up(device: &wgpu::Device, queue: &wgpu::Queue, gemm: &Kernel, scal: &Kernel) {
    let scratch = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("shoal warm-up"),
        size: 256,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let bind = |size| Binding {
        buffer: scratch.clone(),
        offset: 0,
        size,
        elem_off: 0,
        mapping: OperandMapping { guest_addr: 0, device_host_addr: None },
        readback: None,
        device_resident: true,
    };
    let b = bind(64);
    let mut encoder = device.create_command_encoder(&Default::default());
    let g = gemm.bind(device, &[&b, &b, &b], &[1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1f32.to_bits(), 0, 0, 0]);
    let x = scal.bind(device, &[&b], &[1, 0, 1f32.to_bits(), 0]);
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&gemm.pipeline);
        pass.set_bind_group(0, &g, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        pass.set_pipeline(&scal.pipeline);
        pass.set_bind_group(0, &x, &[]);
        pass.dispatch_workgroups(1, 1, 1);
    }
    queue.submit([encoder.finish()]);
    let _ = device.poll(wgpu::PollType::wait_indefinitely());
}

/// Opens the wgpu device, enabling host-memory import where the adapter has it.
#[cfg(not(target_vendor = "apple"))]
fn open_device(
    adapter: &wgpu::Adapter,
    limits: &wgpu::Limits,
    kind: BackendKind,
) -> Result<(wgpu::Device, wgpu::Queue, Option<Importer>, Option<String>), OpenError> {
    match vulkan::open(adapter, limits) {
        Ok((device, queue, Some(importer))) => Ok((device, queue, Some(Importer::Vulkan(importer)), None)),
        Ok((device, queue, None)) => {
            Ok((device, queue, None, Some("the driver lacks VK_EXT_external_memory_host: operands are copied".into())))
        }
        Err(e) => Err(OpenError::Unavailable(kind, e)),
    }
}

#[cfg(target_vendor = "apple")]
fn open_device(
    adapter: &wgpu::Adapter,
    limits: &wgpu::Limits,
    kind: BackendKind,
) -> Result<(wgpu::Device, wgpu::Queue, Option<Importer>, Option<String>), OpenError> {
    let desc = wgpu::DeviceDescriptor { required_limits: limits.clone(), ..Default::default() };
    let (device, queue) =
        pollster::block_on(adapter.request_device(&desc)).map_err(|e| OpenError::Unavailable(kind, e.to_string()))?;
    Ok((device, queue, Some(Importer::Metal(metal::Importer)), None))
}
