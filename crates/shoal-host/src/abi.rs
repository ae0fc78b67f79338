//! The `shoal_v1` host functions.
//!
//! Every function takes offsets and lengths into the calling instance's own memory
//! and returns a [`Status`]. Control data (descriptors) is copied into host memory
//! once, then validated, then acted upon (memory contract, rule 3). The layouts are
//! documented in `docs/abi.md`; the guest SDK (`shoal-guest`) mirrors them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use shoal_gpu::{BufferId, DType, DataPath, Device, GemmSpec, GuestSpan, OpError, OpReport, Pending, Scal, Space};
use wasmtime::{Caller, Extern, Linker, Memory};

use crate::HostState;

/// The import module name of this ABI version.
pub const MODULE: &str = "shoal_v1";
/// The ABI version `abi_version` returns.
pub const ABI_VERSION: u32 = 1;
/// Asynchronous operations one instance may have in flight.
const MAX_FENCES: usize = 64;
/// Size of the GEMM descriptor in guest memory.
const GEMM_DESC_SIZE: usize = 88;
/// GEMM flag: three u32 buffer handles follow the descriptor (0: guest memory).
const GEMM_FLAG_BUFFERS: u32 = 4;
/// Device buffers one instance may hold.
const MAX_BUFFERS: usize = 4096;

/// Status codes: stable, part of the ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// An argument is wrong (unknown dtype or flag, stride shorter than a row, view too small).
    InvalidArgument = 1,
    /// A pointer or view ends past the guest memory's current size.
    OutOfBounds = 2,
    /// A view is not aligned to its element size.
    Misaligned = 3,
    /// The output view overlaps an input view.
    Overlap = 4,
    /// A size is absurd (a dimension over 2^24) or its arithmetic overflows.
    TooLarge = 5,
    /// An unknown handle (fence).
    BadHandle = 6,
    /// The device does not support this (a dtype on this backend).
    Unsupported = 7,
    /// The device failed; details in `last_error`.
    Device = 8,
    /// Too many asynchronous operations in flight (64 per instance).
    Busy = 9,
    /// The module exports no memory named `memory`.
    NoMemory = 10,
    /// No model of that name is known to the host.
    ModelNotFound = 11,
    /// The output buffer is too small; the length needed was written.
    TooSmall = 12,
    /// The session's context (KV cache) is full, or the input is longer than it.
    ContextFull = 13,
}

impl From<&OpError> for Status {
    fn from(e: &OpError) -> Status {
        match e {
            OpError::InvalidArgument(_) => Status::InvalidArgument,
            OpError::OutOfBounds(_) => Status::OutOfBounds,
            OpError::Misaligned(_) => Status::Misaligned,
            OpError::Overlap(_) => Status::Overlap,
            OpError::TooLarge(_) => Status::TooLarge,
            OpError::Unsupported(_) => Status::Unsupported,
            OpError::Device(_) => Status::Device,
            OpError::BadHandle(_) => Status::BadHandle,
        }
    }
}

pub(crate) struct AbiError {
    status: Status,
    message: String,
}

impl From<OpError> for AbiError {
    fn from(e: OpError) -> AbiError {
        AbiError { status: Status::from(&e), message: e.to_string() }
    }
}

pub(crate) fn err(status: Status, message: impl Into<String>) -> AbiError {
    AbiError { status, message: message.into() }
}

/// What one instance did through the ABI (the CLI reports it).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GuestStats {
    /// Calls to `shoal_v1` functions.
    pub calls: u64,
    /// Calls that returned an error status.
    pub errors: u64,
    /// Operations that ran on the device (GEMM, scal).
    pub ops: u64,
    /// Operations that worked on the guest's own pages (pointer identity).
    pub in_place_ops: u64,
    /// Bytes copied between host and device over all operations.
    pub bytes_copied: u64,
    /// Largest growth of resident memory across one operation, in bytes.
    pub max_rss_delta_bytes: i64,
    /// Seconds spent in operations (submit to completion).
    pub op_seconds: f64,
    /// The last operation's report.
    pub last_report: Option<OpReport>,
    /// The last error message.
    pub last_error: Option<String>,
    /// Prompt tokens evaluated (several per call) and the seconds they took.
    pub prefill_tokens: u64,
    /// Seconds of prompt evaluation.
    pub prefill_seconds: f64,
    /// One-token evaluations (decode steps) and their seconds.
    pub decode_steps: u64,
    /// Seconds of decode steps.
    pub decode_seconds: f64,
}

pub(crate) struct ShoalCtx {
    device: Arc<Device>,
    fences: HashMap<u32, (Pending, Instant)>,
    next_fence: u32,
    stats: GuestStats,
    last_rss_delta: i64,
    measure_rss: bool,
    /// The instance's device buffers: handle → buffer (freed with the instance).
    buffers: HashMap<u32, BufferId>,
    next_buffer: u32,
    pub(crate) infer: crate::infer::InferCtx,
    pub(crate) nn: crate::nn::NnCtx,
    pub(crate) nn_last_error: Option<String>,
}

impl Drop for ShoalCtx {
    fn drop(&mut self) {
        for (_, (p, _)) in self.fences.drain() {
            let _ = p.wait();
        }
        for (_, id) in self.buffers.drain() {
            let _ = self.device.free_buffer(id);
        }
    }
}

impl ShoalCtx {
    pub(crate) fn new(device: Arc<Device>, models: Arc<crate::models::Models>, measure_rss: bool) -> ShoalCtx {
        ShoalCtx {
            device,
            fences: HashMap::new(),
            next_fence: 1,
            stats: GuestStats::default(),
            last_rss_delta: 0,
            measure_rss,
            buffers: HashMap::new(),
            next_buffer: 1,
            infer: crate::infer::InferCtx::new(models.clone()),
            nn: crate::nn::NnCtx::new(models),
            nn_last_error: None,
        }
    }

    /// Waits for anything still in flight and returns the statistics.
    /// The models this instance opens by name.
    pub(crate) fn models(&self) -> &Arc<crate::models::Models> {
        self.infer.models()
    }

    /// Fails when the instance holds state a snapshot cannot keep (device buffers, work in
    /// flight).
    /// Whether any session or wasi-nn context holds a KV cache.
    pub(crate) fn has_caches(&self) -> bool {
        self.infer.has_sessions() || self.nn.has_caches()
    }

    pub(crate) fn check_quiescent(&self) -> Result<(), String> {
        if !self.fences.is_empty() {
            return Err(format!("{} GEMMs are still in flight", self.fences.len()));
        }
        if !self.buffers.is_empty() {
            return Err(format!(
                "the instance holds {} device buffers (buffer_create), which snapshots do not keep; free them first",
                self.buffers.len()
            ));
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self) -> GuestStats {
        for (_, (p, _)) in self.fences.drain() {
            let _ = p.wait();
        }
        self.stats.prefill_tokens = self.infer.prefill_tokens;
        self.stats.prefill_seconds = self.infer.prefill_seconds;
        self.stats.decode_steps = self.infer.decode_steps;
        self.stats.decode_seconds = self.infer.decode_seconds;
        self.stats.clone()
    }

    fn record(&mut self, report: OpReport, seconds: f64, rss_delta: i64) {
        self.stats.ops += 1;
        if report.in_place() {
            self.stats.in_place_ops += 1;
        }
        self.stats.bytes_copied += report.bytes_copied;
        self.stats.max_rss_delta_bytes = self.stats.max_rss_delta_bytes.max(rss_delta);
        self.stats.op_seconds += seconds;
        self.last_rss_delta = rss_delta;
        self.stats.last_report = Some(report);
    }
}

/// Turns a result into a status, remembering the message for `last_error`.
pub(crate) fn finish(caller: &mut Caller<'_, HostState>, name: &str, r: Result<(), AbiError>) -> i32 {
    let st = &mut caller.data_mut().shoal.stats;
    st.calls += 1;
    match r {
        Ok(()) => Status::Ok as i32,
        Err(e) => {
            st.errors += 1;
            log::debug!("guest call {MODULE}::{name} failed ({:?}): {}", e.status, e.message);
            st.last_error = Some(format!("{name}: {}", e.message));
            e.status as i32
        }
    }
}

pub(crate) fn memory(caller: &mut Caller<'_, HostState>) -> Result<Memory, AbiError> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| err(Status::NoMemory, "the module exports no memory named `memory`"))
}

fn span(caller: &Caller<'_, HostState>, mem: &Memory) -> GuestSpan {
    // SAFETY: the memory was created by shoal-memory (the engine's only memory
    // creator): it never moves and stays mapped until the store is dropped, and its
    // release waits for every device operation on it. The guest is blocked in this
    // host call, so synchronous operations have it to themselves; asynchronous ones
    // are lent the ranges they name until their fence is waited on (contract rule 4).
    unsafe { GuestSpan::new(mem.data_ptr(caller), mem.data_size(caller)) }
}

/// Copies `len` guest bytes at `at` into host memory (read once: contract rule 3).
pub(crate) fn read_vec(caller: &Caller<'_, HostState>, mem: &Memory, at: u32, len: u32) -> Result<Vec<u8>, AbiError> {
    let size = mem.data_size(caller);
    let range = shoal_memory::check_view(size, at.into(), len.into(), 1)
        .map_err(|e| err(Status::OutOfBounds, e.to_string()))?;
    Ok(mem.data(caller)[range].to_vec())
}

/// Checks that `len` bytes at `at` can be written, before any work is done.
pub(crate) fn check_writable(
    caller: &Caller<'_, HostState>,
    mem: &Memory,
    at: u32,
    len: usize,
) -> Result<(), AbiError> {
    shoal_memory::check_view(mem.data_size(caller), at.into(), len as u64, 1)
        .map(drop)
        .map_err(|e| err(Status::OutOfBounds, e.to_string()))
}

pub(crate) fn read_array<const N: usize>(
    caller: &Caller<'_, HostState>,
    mem: &Memory,
    at: u32,
) -> Result<[u8; N], AbiError> {
    read::<N>(caller, mem, at)
}

fn read<const N: usize>(caller: &Caller<'_, HostState>, mem: &Memory, at: u32) -> Result<[u8; N], AbiError> {
    let mut buf = [0u8; N];
    mem.read(caller, at as usize, &mut buf).map_err(|_| {
        err(Status::OutOfBounds, format!("{N} bytes at {at:#x} end past the memory's {} bytes", mem.data_size(caller)))
    })?;
    Ok(buf)
}

pub(crate) fn write(caller: &mut Caller<'_, HostState>, mem: &Memory, at: u32, bytes: &[u8]) -> Result<(), AbiError> {
    let size = mem.data_size(&*caller);
    mem.write(caller, at as usize, bytes).map_err(|_| {
        err(Status::OutOfBounds, format!("{} bytes at {at:#x} end past the memory's {size} bytes", bytes.len()))
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes a GEMM descriptor (already copied into host memory).
fn decode_gemm(d: &[u8; GEMM_DESC_SIZE]) -> Result<GemmSpec, AbiError> {
    let dtype = DType::from_abi(u32_at(d, 0))
        .ok_or_else(|| err(Status::InvalidArgument, format!("unknown dtype {}", u32_at(d, 0))))?;
    let flags = u32_at(d, 4);
    if flags & !(3 | GEMM_FLAG_BUFFERS) != 0 {
        return Err(err(Status::InvalidArgument, format!("unknown GEMM flags {flags:#x}")));
    }
    Ok(GemmSpec {
        dtype,
        trans_a: flags & 1 != 0,
        trans_b: flags & 2 != 0,
        m: u32_at(d, 8).into(),
        n: u32_at(d, 12).into(),
        k: u32_at(d, 16).into(),
        lda: u32_at(d, 20).into(),
        ldb: u32_at(d, 24).into(),
        ldc: u32_at(d, 28).into(),
        alpha: f32::from_bits(u32_at(d, 32)),
        beta: f32::from_bits(u32_at(d, 36)),
        a: (u64_at(d, 40), u64_at(d, 48)),
        b: (u64_at(d, 56), u64_at(d, 64)),
        c: (u64_at(d, 72), u64_at(d, 80)),
    })
}

/// Resident bytes, when this instance measures them (else 0).
fn rss(caller: &Caller<'_, HostState>) -> i64 {
    if caller.data().shoal.measure_rss { shoal_memory::resident_bytes().unwrap_or(0) as i64 } else { 0 }
}

fn device_info(caller: &mut Caller<'_, HostState>, out: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let info = caller.data().shoal.device.info().clone();
    let mut b = [0u8; 64];
    b[0..4].copy_from_slice(&ABI_VERSION.to_le_bytes());
    b[4..8].copy_from_slice(&info.backend.abi_code().to_le_bytes());
    let mut flags = u32::from(info.imports_guest_memory);
    if info.gemm_dtypes.contains(&DType::F16) {
        flags |= 2;
    }
    if info.gemm_dtypes.contains(&DType::Bf16) {
        flags |= 4;
    }
    b[8..12].copy_from_slice(&flags.to_le_bytes());
    let mut name = info.name.as_str();
    while name.len() > 48 {
        let mut cut = 48;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name = &name[..cut];
    }
    b[12..16].copy_from_slice(&(name.len() as u32).to_le_bytes());
    b[16..16 + name.len()].copy_from_slice(name.as_bytes());
    write(caller, &mem, out, &b)
}

/// Where A, B and C live: the guest's memory, or the instance's device buffers named
/// by the three handles after the descriptor (flag 4).
fn spaces(caller: &Caller<'_, HostState>, mem: &Memory, desc: u32, d: &[u8]) -> Result<[Space; 3], AbiError> {
    if u32_at(d, 4) & GEMM_FLAG_BUFFERS == 0 {
        return Ok([Space::Guest; 3]);
    }
    let at = desc
        .checked_add(GEMM_DESC_SIZE as u32)
        .ok_or_else(|| err(Status::OutOfBounds, "the buffer handles after the descriptor overflow"))?;
    let h = read::<12>(caller, mem, at)?;
    let ctx = &caller.data().shoal;
    let mut out = [Space::Guest; 3];
    for (i, sp) in out.iter_mut().enumerate() {
        let handle = u32_at(&h, i * 4);
        if handle != 0 {
            let id = *ctx
                .buffers
                .get(&handle)
                .ok_or_else(|| err(Status::BadHandle, format!("no device buffer with handle {handle}")))?;
            *sp = Space::Buffer { id, size: ctx.device.buffer_size(id)? };
        }
    }
    Ok(out)
}

fn gemm(caller: &mut Caller<'_, HostState>, desc: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let d = read::<GEMM_DESC_SIZE>(caller, &mem, desc)?;
    let spec = decode_gemm(&d)?;
    let spaces = spaces(caller, &mem, desc, &d)?;
    let span = span(caller, &mem);
    let op = spec.check_in(span.size(), spaces)?;
    let device = caller.data().shoal.device.clone();
    let (r0, t0) = (rss(caller), Instant::now());
    let report = device.gemm(&span, &op)?;
    let (dt, drss) = (t0.elapsed().as_secs_f64(), rss(caller) - r0);
    caller.data_mut().shoal.record(report, dt, drss);
    Ok(())
}

fn gemm_submit(caller: &mut Caller<'_, HostState>, desc: u32, fence_out: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let d = read::<GEMM_DESC_SIZE>(caller, &mem, desc)?;
    // Check the out-pointer before lending anything to the device.
    read::<4>(caller, &mem, fence_out)?;
    let spec = decode_gemm(&d)?;
    let spaces = spaces(caller, &mem, desc, &d)?;
    let span = span(caller, &mem);
    let op = spec.check_in(span.size(), spaces)?;
    if caller.data().shoal.fences.len() >= MAX_FENCES {
        return Err(err(Status::Busy, format!("{MAX_FENCES} operations are already in flight; wait on one first")));
    }
    let device = caller.data().shoal.device.clone();
    let pending = device.submit_gemm(&span, &op)?;
    let ctx = &mut caller.data_mut().shoal;
    let id = ctx.next_fence;
    ctx.next_fence = ctx.next_fence.checked_add(1).unwrap_or(1);
    ctx.fences.insert(id, (pending, Instant::now()));
    write(caller, &mem, fence_out, &id.to_le_bytes())
}

fn fence_wait(caller: &mut Caller<'_, HostState>, fence: u32) -> Result<(), AbiError> {
    let (pending, t0) = caller
        .data_mut()
        .shoal
        .fences
        .remove(&fence)
        .ok_or_else(|| err(Status::BadHandle, format!("no operation in flight has fence {fence}")))?;
    let report = pending.wait()?;
    caller.data_mut().shoal.record(report, t0.elapsed().as_secs_f64(), 0);
    Ok(())
}

fn scal(caller: &mut Caller<'_, HostState>, x: u32, len: u32, alpha: f32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let span = span(caller, &mem);
    let op = Scal::check(&span, x.into(), len.into(), alpha)?;
    let device = caller.data().shoal.device.clone();
    let (r0, t0) = (rss(caller), Instant::now());
    let report = device.scal(&span, &op)?;
    let (dt, drss) = (t0.elapsed().as_secs_f64(), rss(caller) - r0);
    caller.data_mut().shoal.record(report, dt, drss);
    Ok(())
}

fn buffer_create(caller: &mut Caller<'_, HostState>, len: u64, handle_out: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    read::<4>(caller, &mem, handle_out)?;
    let ctx = &caller.data().shoal;
    if ctx.buffers.len() >= MAX_BUFFERS {
        return Err(err(
            Status::Busy,
            format!("the instance already holds {MAX_BUFFERS} device buffers; free one first"),
        ));
    }
    let id = ctx.device.create_buffer(len)?;
    let ctx = &mut caller.data_mut().shoal;
    let mut handle = ctx.next_buffer;
    while handle == 0 || ctx.buffers.contains_key(&handle) {
        handle = handle.wrapping_add(1);
    }
    ctx.next_buffer = handle.wrapping_add(1);
    ctx.buffers.insert(handle, id);
    write(caller, &mem, handle_out, &handle.to_le_bytes())
}

fn buffer_id(caller: &Caller<'_, HostState>, handle: u32) -> Result<BufferId, AbiError> {
    caller
        .data()
        .shoal
        .buffers
        .get(&handle)
        .copied()
        .ok_or_else(|| err(Status::BadHandle, format!("no device buffer with handle {handle}")))
}

fn buffer_free(caller: &mut Caller<'_, HostState>, handle: u32) -> Result<(), AbiError> {
    let id = buffer_id(caller, handle)?;
    let ctx = &mut caller.data_mut().shoal;
    ctx.buffers.remove(&handle);
    ctx.device.free_buffer(id)?;
    Ok(())
}

fn buffer_transfer(
    caller: &mut Caller<'_, HostState>,
    handle: u32,
    offset: u64,
    guest: u32,
    len: u32,
    to_buffer: bool,
) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let id = buffer_id(caller, handle)?;
    let span = span(caller, &mem);
    let range = shoal_memory::check_view(span.size(), guest.into(), len.into(), 1)
        .map_err(|e| err(Status::OutOfBounds, e.to_string()))?;
    let device = caller.data().shoal.device.clone();
    if to_buffer {
        device.write_buffer(id, offset, &span, range)?;
    } else {
        device.read_buffer(id, offset, &span, range)?;
    }
    Ok(())
}

fn last_op(caller: &mut Caller<'_, HostState>, out: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let ctx = &caller.data().shoal;
    let report = ctx.stats.last_report.clone().ok_or_else(|| err(Status::BadHandle, "no operation has run yet"))?;
    let mut b = [0u8; 24];
    let path: DataPath = report.path();
    b[0..4].copy_from_slice(&path.abi_code().to_le_bytes());
    b[4..8].copy_from_slice(&report.dispatches.to_le_bytes());
    b[8..16].copy_from_slice(&report.bytes_copied.to_le_bytes());
    b[16..24].copy_from_slice(&ctx.last_rss_delta.to_le_bytes());
    write(caller, &mem, out, &b)
}

fn last_error(caller: &mut Caller<'_, HostState>, buf: u32, cap: u32, len_out: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let msg = caller.data().shoal.stats.last_error.clone().unwrap_or_default();
    let n = msg.len().min(cap as usize);
    write(caller, &mem, len_out, &(msg.len() as u32).to_le_bytes())?;
    write(caller, &mem, buf, &msg.as_bytes()[..n])
}

/// Adds every `shoal_v1` function to `linker`.
/// An actor's reply (or a part of it): hands the bytes to the message's sink.
fn reply(caller: &mut Caller<'_, HostState>, ptr: u32, len: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let bytes = read_vec(caller, &mem, ptr, len)?;
    match caller.data_mut().reply.as_mut() {
        Some(sink) => {
            sink(&bytes);
            Ok(())
        }
        None => Err(err(Status::InvalidArgument, "reply outside a message handler (the instance is not an actor)")),
    }
}

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, "abi_version", || ABI_VERSION as i32)?;
    linker.func_wrap(MODULE, "reply", |mut c: Caller<'_, HostState>, ptr: u32, len: u32| {
        let r = reply(&mut c, ptr, len);
        finish(&mut c, "reply", r)
    })?;
    linker.func_wrap(MODULE, "device_info", |mut c: Caller<'_, HostState>, out: u32| {
        let r = device_info(&mut c, out);
        finish(&mut c, "device_info", r)
    })?;
    linker.func_wrap(MODULE, "gemm", |mut c: Caller<'_, HostState>, desc: u32| {
        let r = gemm(&mut c, desc);
        finish(&mut c, "gemm", r)
    })?;
    linker.func_wrap(MODULE, "gemm_submit", |mut c: Caller<'_, HostState>, desc: u32, fence_out: u32| {
        let r = gemm_submit(&mut c, desc, fence_out);
        finish(&mut c, "gemm_submit", r)
    })?;
    linker.func_wrap(MODULE, "fence_wait", |mut c: Caller<'_, HostState>, fence: u32| {
        let r = fence_wait(&mut c, fence);
        finish(&mut c, "fence_wait", r)
    })?;
    linker.func_wrap(MODULE, "scal", |mut c: Caller<'_, HostState>, x: u32, len: u32, alpha: f32| {
        let r = scal(&mut c, x, len, alpha);
        finish(&mut c, "scal", r)
    })?;
    linker.func_wrap(MODULE, "last_op", |mut c: Caller<'_, HostState>, out: u32| {
        let r = last_op(&mut c, out);
        finish(&mut c, "last_op", r)
    })?;
    linker.func_wrap(MODULE, "buffer_create", |mut c: Caller<'_, HostState>, len: u64, handle_out: u32| {
        let r = buffer_create(&mut c, len, handle_out);
        finish(&mut c, "buffer_create", r)
    })?;
    linker.func_wrap(MODULE, "buffer_free", |mut c: Caller<'_, HostState>, handle: u32| {
        let r = buffer_free(&mut c, handle);
        finish(&mut c, "buffer_free", r)
    })?;
    linker.func_wrap(
        MODULE,
        "buffer_write",
        |mut c: Caller<'_, HostState>, handle: u32, offset: u64, src: u32, len: u32| {
            let r = buffer_transfer(&mut c, handle, offset, src, len, true);
            finish(&mut c, "buffer_write", r)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "buffer_read",
        |mut c: Caller<'_, HostState>, handle: u32, offset: u64, dst: u32, len: u32| {
            let r = buffer_transfer(&mut c, handle, offset, dst, len, false);
            finish(&mut c, "buffer_read", r)
        },
    )?;
    crate::infer::add_to_linker(linker)?;
    // last_error does not overwrite the message it reports.
    linker.func_wrap(MODULE, "last_error", |mut c: Caller<'_, HostState>, buf: u32, cap: u32, len_out: u32| {
        match last_error(&mut c, buf, cap, len_out) {
            Ok(()) => Status::Ok as i32,
            Err(e) => e.status as i32,
        }
    })?;
    Ok(())
}
