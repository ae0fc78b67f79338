//! The records of `wasi_ephemeral_nn` (wasm32, little-endian), the ABI of WasmEdge's
//! llama.cpp plugin that the host also serves (`docs/abi.md`, "wasi-nn"). Guests call it
//! through the `wasmedge-wasi-nn` crate, not through the shoal SDK; the host decodes these.

use core::mem::{offset_of, size_of};

use crate::le;

/// The import module name.
pub const MODULE: &str = "wasi_ephemeral_nn";

/// Graph encoding: auto-detect (accepted as GGML).
pub const ENCODING_AUTODETECT: u32 = 5;
/// Graph encoding: GGML (GGUF files).
pub const ENCODING_GGML: u32 = 6;

/// Element types of a tensor: the [`Tensor`] record's `ty` byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TensorType {
    /// IEEE binary16.
    F16 = 0,
    /// IEEE binary32.
    F32 = 1,
    /// IEEE binary64.
    F64 = 2,
    /// Bytes (prompts and metadata JSON are `U8`).
    U8 = 3,
    /// 32-bit integers.
    I32 = 4,
    /// 64-bit integers.
    I64 = 5,
}

impl TensorType {
    /// The type of a code, or `None` for one the ABI does not define.
    pub const fn from_u8(code: u8) -> Option<TensorType> {
        match code {
            0 => Some(TensorType::F16),
            1 => Some(TensorType::F32),
            2 => Some(TensorType::F64),
            3 => Some(TensorType::U8),
            4 => Some(TensorType::I32),
            5 => Some(TensorType::I64),
            _ => None,
        }
    }
    /// The type's code.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

/// The tensor record (20 bytes) that `set_input` reads: `{dims_ptr, dims_len, type (u8,
/// padded to 4), data_ptr, data_len}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Tensor {
    /// Byte offset of the dimensions (`dims_len` u32s).
    pub dims_ptr: u32,
    /// Number of dimensions.
    pub dims_len: u32,
    /// A [`TensorType`] code.
    pub ty: u8,
    /// Padding: written as 0, not read.
    pad: [u8; 3],
    /// Byte offset of the data.
    pub data_ptr: u32,
    /// Bytes of data.
    pub data_len: u32,
}

const _: () = assert!(size_of::<Tensor>() == Tensor::SIZE);

impl Tensor {
    /// Bytes of the record.
    pub const SIZE: usize = 20;

    /// A tensor record (the padding is zero).
    pub const fn new(dims_ptr: u32, dims_len: u32, ty: u8, data_ptr: u32, data_len: u32) -> Self {
        Tensor { dims_ptr, dims_len, ty, pad: [0; 3], data_ptr, data_len }
    }

    /// The element type, or `None` for an unknown code.
    pub fn tensor_type(&self) -> Option<TensorType> {
        TensorType::from_u8(self.ty)
    }

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        le::put_u32(&mut b, offset_of!(Self, dims_ptr), self.dims_ptr);
        le::put_u32(&mut b, offset_of!(Self, dims_len), self.dims_len);
        b[offset_of!(Self, ty)] = self.ty;
        le::put_u32(&mut b, offset_of!(Self, data_ptr), self.data_ptr);
        le::put_u32(&mut b, offset_of!(Self, data_len), self.data_len);
        b
    }
    /// Decodes the record; the three padding bytes are ignored (an app that writes the type
    /// as a u32 is read the same).
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        Tensor::new(
            le::u32(b, offset_of!(Self, dims_ptr)),
            le::u32(b, offset_of!(Self, dims_len)),
            b[offset_of!(Self, ty)],
            le::u32(b, offset_of!(Self, data_ptr)),
            le::u32(b, offset_of!(Self, data_len)),
        )
    }
}

/// One entry (8 bytes) of the graph-builder array that `load` reads: a byte offset and a
/// length (the GGUF file's bytes, then optionally metadata JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct GraphBuilder {
    /// Byte offset of the bytes.
    pub ptr: u32,
    /// Their length.
    pub len: u32,
}

const _: () = assert!(size_of::<GraphBuilder>() == GraphBuilder::SIZE);

impl GraphBuilder {
    /// Bytes of the record.
    pub const SIZE: usize = 8;

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        le::put_u32(&mut b, offset_of!(Self, ptr), self.ptr);
        le::put_u32(&mut b, offset_of!(Self, len), self.len);
        b
    }
    /// Decodes the record.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        GraphBuilder { ptr: le::u32(b, offset_of!(Self, ptr)), len: le::u32(b, offset_of!(Self, len)) }
    }
}
