//! The compute level's records: the GEMM descriptor and its buffer handles, `device_info`
//! and `last_op`.

use core::mem::{offset_of, size_of};

use crate::le;
use crate::{ABI_VERSION, DEVICE_IN_PLACE, DType, GEMM_BUFFERS, GEMM_FLAGS, GEMM_TRANS_A, GEMM_TRANS_B};

/// One operand's view in a [`GemmDesc`]: a byte offset into guest memory (or into the
/// operand's device buffer, with [`GEMM_BUFFERS`](crate::GEMM_BUFFERS)) and a byte length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct View {
    /// Byte offset of the view's first byte.
    pub offset: u64,
    /// Byte length of the view.
    pub len: u64,
}

impl From<View> for (u64, u64) {
    fn from(v: View) -> (u64, u64) {
        (v.offset, v.len)
    }
}

impl From<(u64, u64)> for View {
    fn from((offset, len): (u64, u64)) -> View {
        View { offset, len }
    }
}

/// The GEMM descriptor (88 bytes) that `gemm` and `gemm_submit` read:
/// `C ← alpha·op(A)·op(B) + beta·C`, row-major, `op(A)` `m×k`, `op(B)` `k×n`, C `m×n`.
///
/// With [`GEMM_BUFFERS`](crate::GEMM_BUFFERS) in `flags`, the 12 bytes of a [`GemmHandles`]
/// follow it in guest memory (100 bytes in all).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct GemmDesc {
    /// Element type: a [`DType`] code (any other value is `InvalidArgument`).
    pub dtype: u32,
    /// [`GEMM_TRANS_A`](crate::GEMM_TRANS_A), [`GEMM_TRANS_B`](crate::GEMM_TRANS_B),
    /// [`GEMM_BUFFERS`](crate::GEMM_BUFFERS) (any other bit is `InvalidArgument`).
    pub flags: u32,
    /// Rows of `op(A)` and C.
    pub m: u32,
    /// Columns of `op(B)` and C.
    pub n: u32,
    /// Columns of `op(A)`, rows of `op(B)`.
    pub k: u32,
    /// Row stride of the stored A, in elements.
    pub lda: u32,
    /// Row stride of the stored B, in elements.
    pub ldb: u32,
    /// Row stride of C, in elements.
    pub ldc: u32,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of C's old value (C is not read when it is 0).
    pub beta: f32,
    /// A's view.
    pub a: View,
    /// B's view.
    pub b: View,
    /// C's view.
    pub c: View,
}

const _: () = assert!(size_of::<GemmDesc>() == GemmDesc::SIZE);

impl GemmDesc {
    /// Bytes of the descriptor in guest memory.
    pub const SIZE: usize = 88;
    /// Bytes of the descriptor followed by its [`GemmHandles`] (flag
    /// [`GEMM_BUFFERS`](crate::GEMM_BUFFERS)).
    pub const SIZE_WITH_HANDLES: usize = Self::SIZE + GemmHandles::SIZE;

    /// The descriptor's bytes, as the host reads them.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        let words = [
            (offset_of!(Self, dtype), self.dtype),
            (offset_of!(Self, flags), self.flags),
            (offset_of!(Self, m), self.m),
            (offset_of!(Self, n), self.n),
            (offset_of!(Self, k), self.k),
            (offset_of!(Self, lda), self.lda),
            (offset_of!(Self, ldb), self.ldb),
            (offset_of!(Self, ldc), self.ldc),
            (offset_of!(Self, alpha), self.alpha.to_bits()),
            (offset_of!(Self, beta), self.beta.to_bits()),
        ];
        for (at, w) in words {
            le::put_u32(&mut b, at, w);
        }
        for (at, v) in [(offset_of!(Self, a), self.a), (offset_of!(Self, b), self.b), (offset_of!(Self, c), self.c)] {
            le::put_u64(&mut b, at + offset_of!(View, offset), v.offset);
            le::put_u64(&mut b, at + offset_of!(View, len), v.len);
        }
        b
    }

    /// Decodes a descriptor the host has copied out of guest memory. Nothing is checked.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let view = |at: usize| View {
            offset: le::u64(b, at + offset_of!(View, offset)),
            len: le::u64(b, at + offset_of!(View, len)),
        };
        GemmDesc {
            dtype: le::u32(b, offset_of!(Self, dtype)),
            flags: le::u32(b, offset_of!(Self, flags)),
            m: le::u32(b, offset_of!(Self, m)),
            n: le::u32(b, offset_of!(Self, n)),
            k: le::u32(b, offset_of!(Self, k)),
            lda: le::u32(b, offset_of!(Self, lda)),
            ldb: le::u32(b, offset_of!(Self, ldb)),
            ldc: le::u32(b, offset_of!(Self, ldc)),
            alpha: le::f32(b, offset_of!(Self, alpha)),
            beta: le::f32(b, offset_of!(Self, beta)),
            a: view(offset_of!(Self, a)),
            b: view(offset_of!(Self, b)),
            c: view(offset_of!(Self, c)),
        }
    }

    /// The descriptor followed by `handles`: the 100 bytes a guest passes with
    /// [`GEMM_BUFFERS`](crate::GEMM_BUFFERS) (the flag is not set here: `flags` is written
    /// as it is, and without the flag the host does not read the handles).
    pub fn to_bytes_with_handles(&self, handles: &GemmHandles) -> [u8; Self::SIZE_WITH_HANDLES] {
        let mut b = [0u8; Self::SIZE_WITH_HANDLES];
        le::put(&mut b, 0, &self.to_bytes());
        le::put(&mut b, Self::SIZE, &handles.to_bytes());
        b
    }

    /// The element type, or `None` for an unknown `dtype` code.
    pub fn dtype(&self) -> Option<DType> {
        DType::from_u32(self.dtype)
    }
    /// Flag bit 0: `op(A) = Aᵀ`.
    pub fn trans_a(&self) -> bool {
        self.flags & GEMM_TRANS_A != 0
    }
    /// Flag bit 1: `op(B) = Bᵀ`.
    pub fn trans_b(&self) -> bool {
        self.flags & GEMM_TRANS_B != 0
    }
    /// Flag bit 2: the [`GemmHandles`] follow the descriptor.
    pub fn buffers(&self) -> bool {
        self.flags & GEMM_BUFFERS != 0
    }
    /// The flag bits the ABI does not define (non-zero is `InvalidArgument`).
    pub fn unknown_flags(&self) -> u32 {
        self.flags & !GEMM_FLAGS
    }
}

/// The three device buffer handles (12 bytes) after a [`GemmDesc`] whose flags have
/// [`GEMM_BUFFERS`](crate::GEMM_BUFFERS): `0` puts that operand in guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct GemmHandles {
    /// A's buffer handle, or 0.
    pub a: u32,
    /// B's buffer handle, or 0.
    pub b: u32,
    /// C's buffer handle, or 0.
    pub c: u32,
}

const _: () = assert!(size_of::<GemmHandles>() == GemmHandles::SIZE);

impl GemmHandles {
    /// Bytes of the record.
    pub const SIZE: usize = 12;

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        le::put_u32(&mut b, offset_of!(Self, a), self.a);
        le::put_u32(&mut b, offset_of!(Self, b), self.b);
        le::put_u32(&mut b, offset_of!(Self, c), self.c);
        b
    }
    /// Decodes the record.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        GemmHandles {
            a: le::u32(b, offset_of!(Self, a)),
            b: le::u32(b, offset_of!(Self, b)),
            c: le::u32(b, offset_of!(Self, c)),
        }
    }
    /// The handles as an array, in the order A, B, C.
    pub fn as_array(&self) -> [u32; 3] {
        [self.a, self.b, self.c]
    }
    /// Whether any operand is in a device buffer.
    pub fn any(&self) -> bool {
        self.as_array().iter().any(|&h| h != 0)
    }
}

/// The `device_info` record (64 bytes): what the host computes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct DeviceInfo {
    /// The ABI version ([`ABI_VERSION`]).
    pub abi_version: u32,
    /// A [`Backend`](crate::Backend) code.
    pub backend: u32,
    /// [`DEVICE_IN_PLACE`](crate::DEVICE_IN_PLACE), [`DEVICE_F16`](crate::DEVICE_F16),
    /// [`DEVICE_BF16`](crate::DEVICE_BF16); other bits 0.
    pub flags: u32,
    /// Bytes of `name` used, at most [`DeviceInfo::NAME_CAP`].
    pub name_len: u32,
    /// The adapter's name, UTF-8, zero-padded.
    pub name: [u8; DeviceInfo::NAME_CAP],
}

const _: () = assert!(size_of::<DeviceInfo>() == DeviceInfo::SIZE);

impl Default for DeviceInfo {
    fn default() -> Self {
        DeviceInfo { abi_version: ABI_VERSION, backend: 0, flags: 0, name_len: 0, name: [0; Self::NAME_CAP] }
    }
}

impl DeviceInfo {
    /// Bytes of the record.
    pub const SIZE: usize = 64;
    /// Room for the adapter's name.
    pub const NAME_CAP: usize = 48;

    /// The record of this ABI version for a backend code, flags and an adapter name; the
    /// name is cut at a character boundary to fit [`DeviceInfo::NAME_CAP`] bytes.
    pub fn new(backend: u32, flags: u32, name: &str) -> Self {
        let mut cut = name.len().min(Self::NAME_CAP);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut info = DeviceInfo { backend, flags, name_len: cut as u32, ..DeviceInfo::default() };
        info.name[..cut].copy_from_slice(&name.as_bytes()[..cut]);
        info
    }

    /// The name's bytes (`name_len` of them, at most [`DeviceInfo::NAME_CAP`]).
    pub fn name(&self) -> &[u8] {
        &self.name[..(self.name_len as usize).min(Self::NAME_CAP)]
    }
    /// Flag bit 0: the device imports guest memory (works in place).
    pub fn in_place(&self) -> bool {
        self.flags & DEVICE_IN_PLACE != 0
    }

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        le::put_u32(&mut b, offset_of!(Self, abi_version), self.abi_version);
        le::put_u32(&mut b, offset_of!(Self, backend), self.backend);
        le::put_u32(&mut b, offset_of!(Self, flags), self.flags);
        le::put_u32(&mut b, offset_of!(Self, name_len), self.name_len);
        le::put(&mut b, offset_of!(Self, name), &self.name);
        b
    }
    /// Decodes the record. `name_len` is kept as it is (see [`DeviceInfo::name`]).
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        DeviceInfo {
            abi_version: le::u32(b, offset_of!(Self, abi_version)),
            backend: le::u32(b, offset_of!(Self, backend)),
            flags: le::u32(b, offset_of!(Self, flags)),
            name_len: le::u32(b, offset_of!(Self, name_len)),
            name: le::get(b, offset_of!(Self, name)),
        }
    }
}

/// The `last_op` record (24 bytes): what the last successful operation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct LastOp {
    /// A [`Path`](crate::Path) code.
    pub path: u32,
    /// Kernel dispatches (tiles).
    pub dispatches: u32,
    /// Bytes copied between host and device, DMA included.
    pub bytes_copied: u64,
    /// Growth of the host's resident memory across the call, in bytes (0 when not measured).
    pub rss_delta_bytes: i64,
}

const _: () = assert!(size_of::<LastOp>() == LastOp::SIZE);

impl LastOp {
    /// Bytes of the record.
    pub const SIZE: usize = 24;

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        le::put_u32(&mut b, offset_of!(Self, path), self.path);
        le::put_u32(&mut b, offset_of!(Self, dispatches), self.dispatches);
        le::put_u64(&mut b, offset_of!(Self, bytes_copied), self.bytes_copied);
        le::put(&mut b, offset_of!(Self, rss_delta_bytes), &self.rss_delta_bytes.to_le_bytes());
        b
    }
    /// Decodes the record.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        LastOp {
            path: le::u32(b, offset_of!(Self, path)),
            dispatches: le::u32(b, offset_of!(Self, dispatches)),
            bytes_copied: le::u64(b, offset_of!(Self, bytes_copied)),
            rss_delta_bytes: i64::from_le_bytes(le::get(b, offset_of!(Self, rss_delta_bytes))),
        }
    }
}
