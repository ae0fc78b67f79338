//! The compute level of `shoal_v1`: device information, matrix products and scaling on the
//! guest's own memory or on its device buffers, fences for asynchronous products, and the
//! actor's `reply`.
//!
//! Every function takes offsets and lengths into the calling instance's own memory and
//! returns a status. Control data (descriptors) is copied into host memory once, then
//! validated, then acted upon (memory contract, rule 3). The layouts are those of
//! `shoal-abi`, shared with the guest SDK, and documented in `docs/abi.md`.
//!
//! Device buffers are charged to the instance's budget before they are made. A product
//! run while the thread has an [`shoal_engine::interrupt::Interrupt`] (an actor's message,
//! a run with a deadline) is cut into pieces of rows that check it in between.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use shoal_abi::{DeviceInfo, GemmDesc, LastOp};
use shoal_gpu::{BackendKind, BufferId, DType, DataPath, Device, GemmSpec, OpReport, Pending, Scal, Space};
use wasmtime::{Caller, Linker, Memory};

use crate::budget::{Budget, Charge};
use crate::error::{GuestError, Kind, err};
use crate::guest::{check_writable, memory, read_array, read_vec, span, write};
use crate::v1::{GuestStats, MODULE, V1Host, finish};

/// The ABI version `abi_version` returns.
pub const ABI_VERSION: u32 = shoal_abi::ABI_VERSION;
use shoal_abi::{MAX_BUFFERS, MAX_FENCES};

/// Per-instance state of the compute level.
pub(crate) struct ComputeCtx {
    device: Arc<Device>,
    budget: Arc<Budget>,
    fences: HashMap<u32, (Pending, Instant)>,
    next_fence: u32,
    stats: GuestStats,
    last_rss_delta: i64,
    measure_rss: bool,
    /// The instance's device buffers: handle → buffer and its charge (freed with the
    /// instance).
    buffers: HashMap<u32, (BufferId, Charge)>,
    next_buffer: u32,
}

impl Drop for ComputeCtx {
    fn drop(&mut self) {
        for (_, (p, _)) in self.fences.drain() {
            let _ = p.wait();
        }
        for (_, (id, _)) in self.buffers.drain() {
            let _ = self.device.free_buffer(id);
        }
    }
}

impl ComputeCtx {
    pub(crate) fn new(device: Arc<Device>, budget: Arc<Budget>, measure_rss: bool) -> ComputeCtx {
        ComputeCtx {
            device,
            budget,
            fences: HashMap::new(),
            next_fence: 1,
            stats: GuestStats::default(),
            last_rss_delta: 0,
            measure_rss,
            buffers: HashMap::new(),
            next_buffer: 1,
        }
    }

    /// Fails when the instance holds state a snapshot cannot keep (device buffers, work in
    /// flight).
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

    /// Waits for anything still in flight and returns the operation statistics.
    pub(crate) fn finish(&mut self) -> GuestStats {
        for (_, (p, _)) in self.fences.drain() {
            let _ = p.wait();
        }
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

/// A store whose guests call the compute level of `shoal_v1`.
pub(crate) trait ComputeHost: V1Host {
    /// The instance's compute state.
    fn compute(&mut self) -> &mut ComputeCtx;
    /// Hands an actor's reply to the current message's sink.
    fn reply(&mut self, bytes: &[u8]) -> Result<(), GuestError>;
}

fn ctx<'a, T: ComputeHost>(caller: &'a mut Caller<'_, T>) -> &'a mut ComputeCtx {
    caller.data_mut().compute()
}

/// Decodes a GEMM descriptor (already copied into host memory).
fn decode_gemm(d: &[u8; GemmDesc::SIZE]) -> Result<(GemmSpec, bool), GuestError> {
    let g = GemmDesc::from_bytes(d);
    let dtype =
        DType::from_abi(g.dtype).ok_or_else(|| err(Kind::InvalidArgument, format!("unknown dtype {}", g.dtype)))?;
    if g.flags & !shoal_abi::GEMM_FLAGS != 0 {
        return Err(err(Kind::InvalidArgument, format!("unknown GEMM flags {:#x}", g.flags)));
    }
    let spec = GemmSpec {
        dtype,
        trans_a: g.flags & shoal_abi::GEMM_TRANS_A != 0,
        trans_b: g.flags & shoal_abi::GEMM_TRANS_B != 0,
        m: g.m.into(),
        n: g.n.into(),
        k: g.k.into(),
        lda: g.lda.into(),
        ldb: g.ldb.into(),
        ldc: g.ldc.into(),
        alpha: g.alpha,
        beta: g.beta,
        a: g.a.into(),
        b: g.b.into(),
        c: g.c.into(),
    };
    Ok((spec, g.flags & shoal_abi::GEMM_BUFFERS != 0))
}

/// Resident bytes, when this instance measures them (else 0).
fn rss<T: ComputeHost>(caller: &mut Caller<'_, T>) -> i64 {
    if ctx(caller).measure_rss { shoal_memory::resident_bytes().unwrap_or(0) as i64 } else { 0 }
}

fn device_info<T: ComputeHost>(caller: &mut Caller<'_, T>, out: u32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let info = ctx(caller).device.info().clone();
    let mut flags = if info.imports_guest_memory { shoal_abi::DEVICE_IN_PLACE } else { 0 };
    if info.gemm_dtypes.contains(&DType::F16) {
        flags |= shoal_abi::DEVICE_F16;
    }
    if info.gemm_dtypes.contains(&DType::Bf16) {
        flags |= shoal_abi::DEVICE_BF16;
    }
    let record = DeviceInfo::new(info.backend.abi_code(), flags, &info.name);
    write(caller, &mem, out, &record.to_bytes())
}

/// Where A, B and C live: the guest's memory, or the instance's device buffers named by the
/// three handles after the descriptor.
fn spaces<T: ComputeHost>(
    caller: &mut Caller<'_, T>,
    mem: &Memory,
    desc: u32,
    buffers: bool,
) -> Result<[Space; 3], GuestError> {
    if !buffers {
        return Ok([Space::Guest; 3]);
    }
    let at = desc
        .checked_add(GemmDesc::SIZE as u32)
        .ok_or_else(|| err(Kind::OutOfBounds, "the buffer handles after the descriptor overflow"))?;
    let h = read_array::<12>(&*caller, mem, at)?;
    let ctx = ctx(caller);
    let mut out = [Space::Guest; 3];
    for (i, sp) in out.iter_mut().enumerate() {
        let handle = u32::from_le_bytes([h[i * 4], h[i * 4 + 1], h[i * 4 + 2], h[i * 4 + 3]]);
        if handle != 0 {
            let (id, _) = ctx
                .buffers
                .get(&handle)
                .ok_or_else(|| err(Kind::BadHandle, format!("no device buffer with handle {handle}")))?;
            *sp = Space::Buffer { id: *id, size: ctx.device.buffer_size(*id)? };
        }
    }
    Ok(out)
}

/// Multiply-adds in one piece of a product that checks the thread's interrupt between
/// pieces: about 0.1 s of work on a CPU, a few ms on a GPU.
fn piece_flops(backend: BackendKind) -> u64 {
    match backend {
        BackendKind::Cpu => 1 << 31,
        _ => 1 << 38,
    }
}

/// `spec` cut into pieces of whole rows of C of at most `flops` each (one piece when a row
/// alone is larger, or the product is small).
fn pieces(spec: &GemmSpec, flops: u64) -> Vec<GemmSpec> {
    let per_row = 2u64.saturating_mul(spec.n).saturating_mul(spec.k).max(1);
    let rows = (flops / per_row).max(1);
    if rows >= spec.m {
        return vec![*spec];
    }
    let es = spec.dtype.size() as u64;
    let mut out = Vec::with_capacity(spec.m.div_ceil(rows) as usize);
    let mut i = 0;
    while i < spec.m {
        let m = rows.min(spec.m - i);
        // Row i of op(A) starts i rows into A, or i elements into it when A is transposed.
        let a_skip = if spec.trans_a { i * es } else { i * spec.lda * es };
        let c_skip = i * spec.ldc * es;
        let mut p = *spec;
        p.m = m;
        p.a = (spec.a.0 + a_skip, spec.a.1.saturating_sub(a_skip));
        p.c = (spec.c.0 + c_skip, spec.c.1.saturating_sub(c_skip));
        out.push(p);
        i += m;
    }
    out
}

fn gemm<T: ComputeHost>(caller: &mut Caller<'_, T>, desc: u32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let d = read_array::<{ GemmDesc::SIZE }>(&*caller, &mem, desc)?;
    let (spec, buffers) = decode_gemm(&d)?;
    let spaces = spaces(caller, &mem, desc, buffers)?;
    let span = span(&*caller, &mem);
    // The whole product is checked before any piece runs.
    let op = spec.check_in(span.size(), spaces)?;
    let device = ctx(caller).device.clone();
    let (r0, t0) = (rss(caller), Instant::now());
    let report = if shoal_engine::interrupt::current().is_some() {
        let mut last = None;
        for p in pieces(&spec, piece_flops(device.info().backend)) {
            shoal_engine::interrupt::check()?;
            let op = p.check_in(span.size(), spaces)?;
            let r = device.gemm(&span, &op)?;
            last = Some(match last {
                None => r,
                Some(mut acc) => {
                    let acc_ref: &mut OpReport = &mut acc;
                    acc_ref.bytes_copied += r.bytes_copied;
                    acc_ref.dispatches += r.dispatches;
                    acc
                }
            });
        }
        last.ok_or_else(|| err(Kind::InvalidArgument, "an empty product"))?
    } else {
        device.gemm(&span, &op)?
    };
    let (dt, drss) = (t0.elapsed().as_secs_f64(), rss(caller) - r0);
    ctx(caller).record(report, dt, drss);
    Ok(())
}

fn gemm_submit<T: ComputeHost>(caller: &mut Caller<'_, T>, desc: u32, fence_out: u32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let d = read_array::<{ GemmDesc::SIZE }>(&*caller, &mem, desc)?;
    // Check the out-pointer before lending anything to the device.
    check_writable(&*caller, &mem, fence_out, 4)?;
    let (spec, buffers) = decode_gemm(&d)?;
    let spaces = spaces(caller, &mem, desc, buffers)?;
    let span = span(&*caller, &mem);
    let op = spec.check_in(span.size(), spaces)?;
    if ctx(caller).fences.len() >= MAX_FENCES {
        return Err(err(Kind::Busy, format!("{MAX_FENCES} operations are already in flight; wait on one first")));
    }
    let device = ctx(caller).device.clone();
    let pending = device.submit_gemm(&span, &op)?;
    let ctx = ctx(caller);
    let id = ctx.next_fence;
    ctx.next_fence = ctx.next_fence.checked_add(1).unwrap_or(1);
    ctx.fences.insert(id, (pending, Instant::now()));
    write(caller, &mem, fence_out, &id.to_le_bytes())
}

fn fence_wait<T: ComputeHost>(caller: &mut Caller<'_, T>, fence: u32) -> Result<(), GuestError> {
    let (pending, t0) = ctx(caller)
        .fences
        .remove(&fence)
        .ok_or_else(|| err(Kind::BadHandle, format!("no operation in flight has fence {fence}")))?;
    let report = pending.wait()?;
    ctx(caller).record(report, t0.elapsed().as_secs_f64(), 0);
    Ok(())
}

fn scal<T: ComputeHost>(caller: &mut Caller<'_, T>, x: u32, len: u32, alpha: f32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let span = span(&*caller, &mem);
    let op = Scal::check(&span, x.into(), len.into(), alpha)?;
    let device = ctx(caller).device.clone();
    let (r0, t0) = (rss(caller), Instant::now());
    let report = device.scal(&span, &op)?;
    let (dt, drss) = (t0.elapsed().as_secs_f64(), rss(caller) - r0);
    ctx(caller).record(report, dt, drss);
    Ok(())
}

fn buffer_create<T: ComputeHost>(caller: &mut Caller<'_, T>, len: u64, handle_out: u32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    check_writable(&*caller, &mem, handle_out, 4)?;
    let ctx = ctx(caller);
    if ctx.buffers.len() >= MAX_BUFFERS {
        return Err(err(
            Kind::Busy,
            format!("the instance already holds {MAX_BUFFERS} device buffers; free one first"),
        ));
    }
    if len == 0 || len > shoal_gpu::MAX_BUFFER_BYTES {
        let most = shoal_gpu::MAX_BUFFER_BYTES;
        return Err(err(Kind::TooLarge, format!("a device buffer of {len} bytes (1 ..= {most})")));
    }
    // Charged before it is made: a guest cannot make the host hold more than its limit.
    let charge = ctx.budget.charge(&format!("a device buffer of {len} bytes"), len)?;
    let id = ctx.device.create_buffer(len)?;
    let mut handle = ctx.next_buffer;
    while handle == 0 || ctx.buffers.contains_key(&handle) {
        handle = handle.wrapping_add(1);
    }
    ctx.next_buffer = handle.wrapping_add(1);
    ctx.buffers.insert(handle, (id, charge));
    write(caller, &mem, handle_out, &handle.to_le_bytes())
}

fn buffer_id<T: ComputeHost>(caller: &mut Caller<'_, T>, handle: u32) -> Result<BufferId, GuestError> {
    ctx(caller)
        .buffers
        .get(&handle)
        .map(|(id, _)| *id)
        .ok_or_else(|| err(Kind::BadHandle, format!("no device buffer with handle {handle}")))
}

fn buffer_free<T: ComputeHost>(caller: &mut Caller<'_, T>, handle: u32) -> Result<(), GuestError> {
    let id = buffer_id(caller, handle)?;
    let ctx = ctx(caller);
    ctx.device.free_buffer(id)?;
    // The charge goes with the entry.
    ctx.buffers.remove(&handle);
    Ok(())
}

fn buffer_transfer<T: ComputeHost>(
    caller: &mut Caller<'_, T>,
    handle: u32,
    offset: u64,
    guest: u32,
    len: u32,
    to_buffer: bool,
) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let id = buffer_id(caller, handle)?;
    let span = span(&*caller, &mem);
    let range = shoal_memory::check_view(span.size(), guest.into(), len.into(), 1)
        .map_err(|e| err(Kind::OutOfBounds, e.to_string()))?;
    let device = ctx(caller).device.clone();
    if to_buffer {
        device.write_buffer(id, offset, &span, range)?;
    } else {
        device.read_buffer(id, offset, &span, range)?;
    }
    Ok(())
}

fn last_op<T: ComputeHost>(caller: &mut Caller<'_, T>, out: u32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let ctx = ctx(caller);
    let report = ctx.stats.last_report.clone().ok_or_else(|| err(Kind::BadHandle, "no operation has run yet"))?;
    let path: DataPath = report.path();
    let record = LastOp {
        path: path.abi_code(),
        dispatches: report.dispatches,
        bytes_copied: report.bytes_copied,
        rss_delta_bytes: ctx.last_rss_delta,
    };
    write(caller, &mem, out, &record.to_bytes())
}

fn last_error<T: ComputeHost>(caller: &mut Caller<'_, T>, buf: u32, cap: u32, len_out: u32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let msg = caller.data_mut().v1_log().last_error.clone().unwrap_or_default();
    let n = msg.len().min(cap as usize);
    write(&mut *caller, &mem, len_out, &(msg.len() as u32).to_le_bytes())?;
    write(caller, &mem, buf, &msg.as_bytes()[..n])
}

/// An actor's reply (or a part of it): hands the bytes to the message's sink.
fn reply<T: ComputeHost>(caller: &mut Caller<'_, T>, ptr: u32, len: u32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let bytes = read_vec(&*caller, &mem, ptr, len)?;
    caller.data_mut().reply(&bytes)
}

/// Adds the compute functions of `shoal_v1` (and `reply`, `last_error`) to `linker`.
pub(crate) fn add_to_linker<T: ComputeHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, "abi_version", || ABI_VERSION as i32)?;
    linker.func_wrap(MODULE, "reply", |mut c: Caller<'_, T>, ptr: u32, len: u32| {
        let r = reply(&mut c, ptr, len);
        finish(&mut c, "reply", r)
    })?;
    linker.func_wrap(MODULE, "device_info", |mut c: Caller<'_, T>, out: u32| {
        let r = device_info(&mut c, out);
        finish(&mut c, "device_info", r)
    })?;
    linker.func_wrap(MODULE, "gemm", |mut c: Caller<'_, T>, desc: u32| {
        let r = gemm(&mut c, desc);
        finish(&mut c, "gemm", r)
    })?;
    linker.func_wrap(MODULE, "gemm_submit", |mut c: Caller<'_, T>, desc: u32, fence_out: u32| {
        let r = gemm_submit(&mut c, desc, fence_out);
        finish(&mut c, "gemm_submit", r)
    })?;
    linker.func_wrap(MODULE, "fence_wait", |mut c: Caller<'_, T>, fence: u32| {
        let r = fence_wait(&mut c, fence);
        finish(&mut c, "fence_wait", r)
    })?;
    linker.func_wrap(MODULE, "scal", |mut c: Caller<'_, T>, x: u32, len: u32, alpha: f32| {
        let r = scal(&mut c, x, len, alpha);
        finish(&mut c, "scal", r)
    })?;
    linker.func_wrap(MODULE, "last_op", |mut c: Caller<'_, T>, out: u32| {
        let r = last_op(&mut c, out);
        finish(&mut c, "last_op", r)
    })?;
    linker.func_wrap(MODULE, "buffer_create", |mut c: Caller<'_, T>, len: u64, handle_out: u32| {
        let r = buffer_create(&mut c, len, handle_out);
        finish(&mut c, "buffer_create", r)
    })?;
    linker.func_wrap(MODULE, "buffer_free", |mut c: Caller<'_, T>, handle: u32| {
        let r = buffer_free(&mut c, handle);
        finish(&mut c, "buffer_free", r)
    })?;
    linker.func_wrap(
        MODULE,
        "buffer_write",
        |mut c: Caller<'_, T>, handle: u32, offset: u64, src: u32, len: u32| {
            let r = buffer_transfer(&mut c, handle, offset, src, len, true);
            finish(&mut c, "buffer_write", r)
        },
    )?;
    linker.func_wrap(MODULE, "buffer_read", |mut c: Caller<'_, T>, handle: u32, offset: u64, dst: u32, len: u32| {
        let r = buffer_transfer(&mut c, handle, offset, dst, len, false);
        finish(&mut c, "buffer_read", r)
    })?;
    // last_error does not overwrite the message it reports.
    linker.func_wrap(
        MODULE,
        "last_error",
        |mut c: Caller<'_, T>, buf: u32, cap: u32, len_out: u32| match last_error(&mut c, buf, cap, len_out) {
            Ok(()) => shoal_abi::Status::Ok as i32,
            Err(e) => e.status() as i32,
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(m: u64, trans_a: bool) -> GemmSpec {
        GemmSpec {
            dtype: DType::F32,
            trans_a,
            trans_b: false,
            m,
            n: 8,
            k: 4,
            lda: if trans_a { m } else { 4 },
            ldb: 8,
            ldc: 8,
            alpha: 1.0,
            beta: 0.0,
            a: (0, m * 4 * 4),
            b: (4096, 4 * 8 * 4),
            c: (8192, m * 8 * 4),
        }
    }

    #[test]
    fn a_product_is_cut_into_whole_rows_that_cover_it() {
        let s = spec(10, false);
        let ps = pieces(&s, 2 * 8 * 4 * 3);
        assert_eq!(ps.iter().map(|p| p.m).collect::<Vec<_>>(), [3, 3, 3, 1]);
        assert_eq!(ps[1].a.0, 3 * 4 * 4);
        assert_eq!(ps[1].c.0, 8192 + 3 * 8 * 4);
        assert_eq!(ps[3].c, (8192 + 9 * 8 * 4, 8 * 4));
        let t = pieces(&spec(10, true), 2 * 8 * 4 * 5);
        assert_eq!(t[1].a.0, 5 * 4, "a transposed A's rows are its columns");
        assert_eq!(pieces(&s, u64::MAX).len(), 1);
    }
}
