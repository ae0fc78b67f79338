//! The `shoal_v1` ABI as data: the byte layouts of its records, its status codes and the
//! numbers (flags, dtypes, backends, paths) that travel in them.
//!
//! Both sides of the ABI use this crate: the host (`shoal-host`), which reads a guest's bytes
//! into a host array and decodes them, and the guest SDK (`shoal-guest`), which encodes the
//! records it passes to the host. `docs/abi.md` documents the same layouts in tables; the
//! unit tests of this crate check the two against each other.
//!
//! Every record is a `#[repr(C)]` struct whose fields are those of the documented layout, in
//! order, with a `SIZE` checked at compile time against `size_of`. The conversion to and
//! from bytes is explicit and little-endian (`to_bytes`, `from_bytes`): a record is never
//! read by casting a pointer into guest memory, so alignment and the host's endianness do not
//! matter. Decoding accepts any bytes; checking the values (an unknown dtype, a flag bit
//! outside [`GEMM_FLAGS`]) is the host's job.
//!
//! The crate is `no_std`, has no dependencies and no `unsafe`.
//!
//! ```
//! use shoal_abi::{DType, GEMM_TRANS_A, GemmDesc, View};
//!
//! // What a guest writes: C (2×3) = Aᵀ·B, A stored 4×2 at byte 64, B at 128, C at 256.
//! let desc = GemmDesc {
//!     dtype: DType::F32.code(),
//!     flags: GEMM_TRANS_A,
//!     m: 2,
//!     n: 3,
//!     k: 4,
//!     lda: 2,
//!     ldb: 3,
//!     ldc: 3,
//!     alpha: 1.0,
//!     beta: 0.0,
//!     a: View { offset: 64, len: 32 },
//!     b: View { offset: 128, len: 48 },
//!     c: View { offset: 256, len: 24 },
//! };
//! let bytes: [u8; GemmDesc::SIZE] = desc.to_bytes();
//! assert_eq!(bytes[8..12], 2u32.to_le_bytes()); // m, at byte 8
//!
//! // What the host does with the 88 bytes it copied out of the guest's memory.
//! let read = GemmDesc::from_bytes(&bytes);
//! assert_eq!(read, desc);
//! assert!(read.trans_a() && !read.trans_b() && !read.buffers());
//! assert_eq!(read.dtype(), Some(DType::F32));
//! assert_eq!(read.unknown_flags(), 0);
//! ```

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod compute;
mod infer;
pub mod wasi_nn;

#[cfg(test)]
mod tests;

pub use compute::{DeviceInfo, GemmDesc, GemmHandles, LastOp, View};
pub use infer::{ChatMessage, ModelInfo, SamplerParams, TokenLogprob};

/// The sampling temperature every front end of shoal uses when none is given: `shoal chat`,
/// the chat actor, the daemon's OpenAI endpoints and wasi-nn's default options. Greedy: the
/// same question gets the same answer, and small models answer plain questions correctly
/// (SmolLM2-135M's first token for "What is the capital of France?" is "The" at -1.88 and
/// "L" at -1.96, and "L" leads to French nonsense: at 0.7 it answers "Paris" 12 times in
/// 20, greedy always). Give a temperature for variety.
pub const DEFAULT_TEMPERATURE: f32 = 0.0;

/// The import module name of this ABI version.
pub const MODULE: &str = "shoal_v1";
/// The ABI version `abi_version` returns (and the `device_info` record's first field).
pub const ABI_VERSION: u32 = 1;

/// GEMM descriptor flag bit 0: use `op(A) = Aᵀ` (A stored `k×m`).
pub const GEMM_TRANS_A: u32 = 1;
/// GEMM descriptor flag bit 1: use `op(B) = Bᵀ` (B stored `n×k`).
pub const GEMM_TRANS_B: u32 = 2;
/// GEMM descriptor flag bit 2: three u32 buffer handles ([`GemmHandles`]) follow the
/// descriptor; an operand whose handle is non-zero lives in that device buffer.
pub const GEMM_BUFFERS: u32 = 4;
/// Every GEMM flag bit the ABI knows; any other bit is `InvalidArgument`.
pub const GEMM_FLAGS: u32 = GEMM_TRANS_A | GEMM_TRANS_B | GEMM_BUFFERS;

/// `device_info` flag bit 0: the device imports guest memory (works in place).
pub const DEVICE_IN_PLACE: u32 = 1;
/// `device_info` flag bit 1: the device runs f16 GEMMs.
pub const DEVICE_F16: u32 = 2;
/// `device_info` flag bit 2: the device runs bf16 GEMMs.
pub const DEVICE_BF16: u32 = 4;

/// Asynchronous operations (`gemm_submit` fences) one instance may have outstanding; the
/// next submit returns [`Status::Busy`].
pub const MAX_FENCES: usize = 64;
/// Device buffers one instance may hold at once; the next `buffer_create` returns
/// [`Status::Busy`].
pub const MAX_BUFFERS: usize = 4096;

/// Status codes: stable, part of the ABI. Every function except `abi_version` returns one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// The session's context (KV cache) is full, or the input is longer than it
    /// (`context_length_exceeded`).
    ContextFull = 13,
    /// A limit of the instance would be exceeded (`--max-memory`, `--max-context`, the
    /// replies of one message); `last_error` names the limit and how to raise it.
    LimitExceeded = 14,
}

impl Status {
    /// Every status, in the order of their codes.
    pub const ALL: [Status; 15] = [
        Status::Ok,
        Status::InvalidArgument,
        Status::OutOfBounds,
        Status::Misaligned,
        Status::Overlap,
        Status::TooLarge,
        Status::BadHandle,
        Status::Unsupported,
        Status::Device,
        Status::Busy,
        Status::NoMemory,
        Status::ModelNotFound,
        Status::TooSmall,
        Status::ContextFull,
        Status::LimitExceeded,
    ];

    /// The status of a code, or `None` for a code the ABI does not define.
    pub const fn from_i32(code: i32) -> Option<Status> {
        if code >= 0 && (code as usize) < Status::ALL.len() { Some(Status::ALL[code as usize]) } else { None }
    }

    /// The status's code, as a host function returns it.
    pub const fn code(self) -> i32 {
        self as i32
    }

    /// Whether this is [`Status::Ok`].
    pub const fn is_ok(self) -> bool {
        matches!(self, Status::Ok)
    }

    /// A short name (`docs/abi.md`'s "SDK name": `"invalid argument"`, `"device error"`; `"ok"`
    /// for success).
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::InvalidArgument => "invalid argument",
            Status::OutOfBounds => "out of bounds",
            Status::Misaligned => "misaligned",
            Status::Overlap => "overlap",
            Status::TooLarge => "too large",
            Status::BadHandle => "bad handle",
            Status::Unsupported => "unsupported",
            Status::Device => "device error",
            Status::Busy => "busy",
            Status::NoMemory => "no memory export",
            Status::ModelNotFound => "model not found",
            Status::TooSmall => "buffer too small",
            Status::ContextFull => "context full",
            Status::LimitExceeded => "limit exceeded",
        }
    }
}

impl From<Status> for i32 {
    fn from(s: Status) -> i32 {
        s.code()
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Element types of GEMM operands: the descriptor's `dtype` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DType {
    /// IEEE binary32.
    F32 = 0,
    /// IEEE binary16 (CUDA only).
    F16 = 1,
    /// bfloat16 (CUDA only).
    Bf16 = 2,
}

impl DType {
    /// The type of a code, or `None` for one the ABI does not define (`InvalidArgument`).
    pub const fn from_u32(code: u32) -> Option<DType> {
        match code {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::Bf16),
            _ => None,
        }
    }
    /// The type's code.
    pub const fn code(self) -> u32 {
        self as u32
    }
    /// Bytes per element (and the alignment a view of this type needs).
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

/// The backend the host computes on: the `device_info` record's `backend` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Backend {
    /// The CPU.
    Cpu = 0,
    /// Vulkan.
    Vulkan = 1,
    /// CUDA.
    Cuda = 2,
    /// Metal.
    Metal = 3,
}

impl Backend {
    /// The backend of a code, or `None` for one this version does not define.
    pub const fn from_u32(code: u32) -> Option<Backend> {
        match code {
            0 => Some(Backend::Cpu),
            1 => Some(Backend::Vulkan),
            2 => Some(Backend::Cuda),
            3 => Some(Backend::Metal),
            _ => None,
        }
    }
    /// The backend's code.
    pub const fn code(self) -> u32 {
        self as u32
    }
}

/// How an operation reached its data: the `last_op` record's `path` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Path {
    /// Every binding of guest memory was the guest's own pages (device buffers may be mixed in).
    InPlace = 0,
    /// At least one operand went through an explicit copy.
    Copy = 1,
    /// The operands went by DMA between registered guest pages and device memory.
    Dma = 2,
    /// Every operand was in a device buffer; no guest memory was touched.
    Device = 3,
}

impl Path {
    /// The path of a code, or `None` for one this version does not define.
    pub const fn from_u32(code: u32) -> Option<Path> {
        match code {
            0 => Some(Path::InPlace),
            1 => Some(Path::Copy),
            2 => Some(Path::Dma),
            3 => Some(Path::Device),
            _ => None,
        }
    }
    /// The path's code.
    pub const fn code(self) -> u32 {
        self as u32
    }
}

/// Little-endian reads and writes at byte offsets of a record (the offsets come from
/// `offset_of!` on the `#[repr(C)]` structs, so they are in bounds by construction).
mod le {
    pub(crate) fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
        b[at..at + bytes.len()].copy_from_slice(bytes);
    }
    pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
        put(b, at, &v.to_le_bytes());
    }
    pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
        put(b, at, &v.to_le_bytes());
    }
    pub(crate) fn get<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
        let mut w = [0u8; N];
        w.copy_from_slice(&b[at..at + N]);
        w
    }
    pub(crate) fn u32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(get(b, at))
    }
    pub(crate) fn u64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(get(b, at))
    }
    pub(crate) fn f32(b: &[u8], at: usize) -> f32 {
        f32::from_bits(u32(b, at))
    }
}
