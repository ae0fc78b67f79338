//! What a guest's call can fail with, and the one place where that becomes a guest's code.
//!
//! Every host function of every ABI (`shoal_v1`, `wasi_ephemeral_nn`, the WIT `wasi:nn`)
//! fails with a [`GuestError`]: a [`Kind`] and a message for the host's log and the guest's
//! `last_error`. [`GuestError::status`] maps it to a `shoal_v1` [`Status`],
//! [`GuestError::nn_errno`] to a `wasi_ephemeral_nn` [`NnErrno`]; engine and device errors
//! become kinds in [`From`] impls here, so a full KV pool is "the context is full" to every
//! guest, whatever ABI it speaks.

use shoal_engine::interrupt::Interrupted;
use shoal_engine::models::EngineError;
use shoal_gpu::OpError;

pub use shoal_abi::Status;

/// `wasi_ephemeral_nn` error codes, including the LLM ones of WasmEdge's GGML backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum NnErrno {
    /// Success.
    Success = 0,
    /// A bad argument (handle, index, pointer, JSON).
    InvalidArgument = 1,
    /// Not the GGML encoding.
    InvalidEncoding = 2,
    /// The module exports no memory.
    MissingMemory = 3,
    /// Too many graphs or contexts.
    Busy = 4,
    /// The engine failed.
    RuntimeError = 5,
    /// Not supported (e.g. embedding mode).
    UnsupportedOperation = 6,
    /// Too large: an output larger than the guest's buffer, or a limit of the instance.
    TooLarge = 7,
    /// Nothing there (no input set).
    NotFound = 8,
    /// Generation ended (`compute_single`).
    EndOfSequence = 100,
    /// The context is full.
    ContextFull = 101,
    /// The prompt does not fit in the context.
    PromptTooLong = 102,
    /// No model by that name.
    ModelNotFound = 103,
}

/// What went wrong, independent of the ABI that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An argument is wrong.
    InvalidArgument,
    /// A view ends past the guest's memory.
    OutOfBounds,
    /// A view is not aligned to its element size.
    Misaligned,
    /// An output view overlaps an input.
    Overlap,
    /// A size is absurd or overflows.
    TooLarge,
    /// An unknown handle.
    BadHandle,
    /// Not supported here.
    Unsupported,
    /// The device or the engine failed.
    Device,
    /// Too many of something in flight or open.
    Busy,
    /// The module exports no memory.
    NoMemory,
    /// No model of that name.
    ModelNotFound,
    /// The guest's output buffer is too small.
    TooSmall,
    /// The session's context is full, or the input is longer than it.
    ContextFull,
    /// The prompt does not fit in the context (wasi-nn's own code).
    PromptTooLong,
    /// A limit of the instance (`--max-memory`, ...) would be exceeded.
    LimitExceeded,
    /// Not the model encoding shoal reads.
    InvalidEncoding,
    /// Nothing there yet.
    NotFound,
    /// The generation has ended (`compute_single`).
    EndOfSequence,
    /// The call was stopped: its deadline passed or the instance was killed. Not a status:
    /// the guest is stopped with a trap.
    Interrupted(Interrupted),
}

/// A failed guest call: its kind and what exactly was wrong (with the values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GuestError {
    /// What kind of failure.
    pub kind: Kind,
    /// For the log and `last_error`.
    pub message: String,
}

impl GuestError {
    /// A failure of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> GuestError {
        GuestError { kind, message: message.into() }
    }

    /// The `shoal_v1` status of this failure.
    pub fn status(&self) -> Status {
        match self.kind {
            Kind::InvalidArgument | Kind::InvalidEncoding | Kind::EndOfSequence => Status::InvalidArgument,
            Kind::OutOfBounds => Status::OutOfBounds,
            Kind::Misaligned => Status::Misaligned,
            Kind::Overlap => Status::Overlap,
            Kind::TooLarge => Status::TooLarge,
            Kind::BadHandle | Kind::NotFound => Status::BadHandle,
            Kind::Unsupported => Status::Unsupported,
            Kind::Device | Kind::Interrupted(_) => Status::Device,
            Kind::Busy => Status::Busy,
            Kind::NoMemory => Status::NoMemory,
            Kind::ModelNotFound => Status::ModelNotFound,
            Kind::TooSmall => Status::TooSmall,
            Kind::ContextFull | Kind::PromptTooLong => Status::ContextFull,
            Kind::LimitExceeded => Status::LimitExceeded,
        }
    }

    /// The `wasi_ephemeral_nn` code of this failure.
    pub fn nn_errno(&self) -> NnErrno {
        match self.kind {
            Kind::InvalidArgument | Kind::OutOfBounds | Kind::Misaligned | Kind::Overlap | Kind::BadHandle => {
                NnErrno::InvalidArgument
            }
            Kind::TooLarge | Kind::TooSmall | Kind::LimitExceeded => NnErrno::TooLarge,
            Kind::Unsupported => NnErrno::UnsupportedOperation,
            Kind::Device | Kind::Interrupted(_) => NnErrno::RuntimeError,
            Kind::Busy => NnErrno::Busy,
            Kind::NoMemory => NnErrno::MissingMemory,
            Kind::ModelNotFound => NnErrno::ModelNotFound,
            Kind::ContextFull => NnErrno::ContextFull,
            Kind::PromptTooLong => NnErrno::PromptTooLong,
            Kind::InvalidEncoding => NnErrno::InvalidEncoding,
            Kind::NotFound => NnErrno::NotFound,
            Kind::EndOfSequence => NnErrno::EndOfSequence,
        }
    }

    /// Whether the call was stopped (the guest must be trapped, not answered).
    pub fn interrupted(&self) -> Option<Interrupted> {
        match self.kind {
            Kind::Interrupted(i) => Some(i),
            _ => None,
        }
    }
}

/// A failure of `kind` (shorthand).
pub(crate) fn err(kind: Kind, message: impl Into<String>) -> GuestError {
    GuestError::new(kind, message)
}

impl From<OpError> for GuestError {
    fn from(e: OpError) -> GuestError {
        let kind = match &e {
            OpError::InvalidArgument(_) => Kind::InvalidArgument,
            OpError::OutOfBounds(_) => Kind::OutOfBounds,
            OpError::Misaligned(_) => Kind::Misaligned,
            OpError::Overlap(_) => Kind::Overlap,
            OpError::TooLarge(_) => Kind::TooLarge,
            OpError::Unsupported(_) => Kind::Unsupported,
            OpError::Device(_) => Kind::Device,
            OpError::BadHandle(_) => Kind::BadHandle,
        };
        GuestError::new(kind, e.to_string())
    }
}

impl From<EngineError> for GuestError {
    fn from(e: EngineError) -> GuestError {
        let kind = match &e {
            EngineError::ContextTooLong { .. } | EngineError::Kv(_) | EngineError::KvPoolFull { .. } => {
                Kind::ContextFull
            }
            EngineError::TokenOutOfRange { .. } | EngineError::EmptyInput => Kind::InvalidArgument,
            EngineError::Interrupted(i) => Kind::Interrupted(*i),
            _ => Kind::Device,
        };
        GuestError::new(kind, e.to_string())
    }
}

impl From<Interrupted> for GuestError {
    fn from(i: Interrupted) -> GuestError {
        GuestError::new(Kind::Interrupted(i), format!("the call was stopped: {i}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_kv_pool_is_a_full_context_to_every_abi() {
        let e = GuestError::from(EngineError::KvPoolFull { backend: "cuda", needed: 4, free: 0, device_budget: None });
        assert_eq!(e.status(), Status::ContextFull);
        assert_eq!(e.nn_errno(), NnErrno::ContextFull);
    }

    #[test]
    fn a_limit_is_its_own_status_and_too_large_to_wasi_nn() {
        let e = err(Kind::LimitExceeded, "x");
        assert_eq!(e.status(), Status::LimitExceeded);
        assert_eq!(e.nn_errno(), NnErrno::TooLarge);
    }
}
