//! Reading and writing the calling guest's memory, for every ABI.
//!
//! Each helper checks the view against the memory's size at the time of the call and copies
//! what it reads into host memory once (memory contract, rule 3): the guest cannot change
//! what the host validated. Failures are [`GuestError`]s of kind `OutOfBounds` or
//! `NoMemory`; each ABI maps them to its own codes (see [`crate::error`]).

use shoal_gpu::GuestSpan;
use wasmtime::{AsContext, AsContextMut, Caller, Extern, Memory};

use crate::error::{GuestError, Kind, err};

/// The calling instance's memory (its export `memory`).
pub(crate) fn memory<T>(caller: &mut Caller<'_, T>) -> Result<Memory, GuestError> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| err(Kind::NoMemory, "the module exports no memory named `memory`"))
}

/// The guest's memory as a span the device layer can check views against.
pub(crate) fn span(cx: impl AsContext, mem: &Memory) -> GuestSpan {
    let cx = cx.as_context();
    // SAFETY: the memory was created by shoal-memory (the engine's only memory creator): it
    // never moves and stays mapped until the store is dropped, and its release waits for
    // every device operation on it. The guest is blocked in this host call, so synchronous
    // operations have it to themselves; asynchronous ones are lent the ranges they name until
    // their fence is waited on (contract rule 4).
    unsafe { GuestSpan::new(mem.data_ptr(&cx), mem.data_size(&cx)) }
}

fn out_of_bounds(at: u32, len: u64, size: usize) -> GuestError {
    err(Kind::OutOfBounds, format!("{len} bytes at {at:#x} end past the memory's {size} bytes"))
}

/// Copies `len` guest bytes at `at` into host memory.
pub(crate) fn read_vec(cx: impl AsContext, mem: &Memory, at: u32, len: u32) -> Result<Vec<u8>, GuestError> {
    let cx = cx.as_context();
    let size = mem.data_size(&cx);
    let range =
        shoal_memory::check_view(size, at.into(), len.into(), 1).map_err(|_| out_of_bounds(at, len.into(), size))?;
    Ok(mem.data(&cx)[range].to_vec())
}

/// Copies `len` guest bytes at `at` into host memory as UTF-8 text.
pub(crate) fn read_str(cx: impl AsContext, mem: &Memory, at: u32, len: u32) -> Result<String, GuestError> {
    String::from_utf8(read_vec(cx, mem, at, len)?)
        .map_err(|e| err(Kind::InvalidArgument, format!("the text at {at:#x} is not UTF-8: {e}")))
}

/// Copies `n` little-endian `u32`s at `at`.
pub(crate) fn read_u32s(cx: impl AsContext, mem: &Memory, at: u32, n: u32) -> Result<Vec<u32>, GuestError> {
    let len = n.checked_mul(4).ok_or_else(|| err(Kind::TooLarge, format!("an array of {n} u32s overflows")))?;
    let bytes = read_vec(cx, mem, at, len)?;
    Ok(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Copies `N` guest bytes at `at`.
pub(crate) fn read_array<const N: usize>(cx: impl AsContext, mem: &Memory, at: u32) -> Result<[u8; N], GuestError> {
    let cx = cx.as_context();
    let mut buf = [0u8; N];
    mem.read(&cx, at as usize, &mut buf).map_err(|_| out_of_bounds(at, N as u64, mem.data_size(&cx)))?;
    Ok(buf)
}

/// Checks that `len` bytes at `at` can be written, before any work is done.
pub(crate) fn check_writable(cx: impl AsContext, mem: &Memory, at: u32, len: usize) -> Result<(), GuestError> {
    let size = mem.data_size(cx.as_context());
    shoal_memory::check_view(size, at.into(), len as u64, 1).map(drop).map_err(|_| out_of_bounds(at, len as u64, size))
}

/// Writes `bytes` at `at`.
pub(crate) fn write(mut cx: impl AsContextMut, mem: &Memory, at: u32, bytes: &[u8]) -> Result<(), GuestError> {
    let mut cx = cx.as_context_mut();
    let size = mem.data_size(&cx);
    mem.write(&mut cx, at as usize, bytes).map_err(|_| out_of_bounds(at, bytes.len() as u64, size))
}
