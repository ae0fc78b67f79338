//! Operations as the backends receive them: checked against the guest memory once,
//! by the safe layer, before any backend sees them.

use std::ops::Range;

use shoal_memory::{ViewError, check_view, ranges_overlap};

use crate::{GuestSpan, OpError};

/// Element types of matrix operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
    /// The ABI's number for this type.
    pub fn from_abi(v: u32) -> Option<Self> {
        match v {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::Bf16),
            _ => None,
        }
    }
}

/// The largest matrix dimension accepted (2^24): larger ones are refused as absurd
/// before any arithmetic on them.
pub const MAX_DIM: u64 = 1 << 24;

/// `C = alpha * op(A) * op(B) + beta * C`, row-major, as a guest asks for it.
///
/// `op(A)` is `m×k`, `op(B)` is `k×n`, `C` is `m×n`. A matrix is stored row by row;
/// `ld*` is the distance in elements between the starts of two stored rows. With
/// `trans_a`, A is stored `k×m` (so `lda >= m`), otherwise `m×k` (`lda >= k`); the
/// same for B. When `beta == 0`, C is not read (it may hold NaN). Offsets are byte
/// offsets into the guest memory; `*_len` the bytes the guest says each view has.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmSpec {
    /// Element type of A, B and C.
    pub dtype: DType,
    /// Use the transpose of the stored A.
    pub trans_a: bool,
    /// Use the transpose of the stored B.
    pub trans_b: bool,
    /// Rows of `op(A)` and C.
    pub m: u64,
    /// Columns of `op(B)` and C.
    pub n: u64,
    /// Columns of `op(A)`, rows of `op(B)`.
    pub k: u64,
    /// Row stride of the stored A, in elements.
    pub lda: u64,
    /// Row stride of the stored B, in elements.
    pub ldb: u64,
    /// Row stride of C, in elements.
    pub ldc: u64,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old C.
    pub beta: f32,
    /// View of A: byte offset and byte length.
    pub a: (u64, u64),
    /// View of B.
    pub b: (u64, u64),
    /// View of C.
    pub c: (u64, u64),
}

/// A [`GemmSpec`] whose views were checked against one guest memory.
///
/// Only [`GemmSpec::check`] makes one, so a backend that receives it may rely on:
/// every element it indexes by the formulas below lies inside the guest memory;
/// C's touched bytes overlap neither A's nor B's; offsets are element-aligned.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Gemm {
    /// The spec as given (dimensions as `usize` below).
    pub dtype: DType,
    /// See [`GemmSpec::trans_a`].
    pub trans_a: bool,
    /// See [`GemmSpec::trans_b`].
    pub trans_b: bool,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Row strides in elements.
    pub lda: usize,
    /// Row strides in elements.
    pub ldb: usize,
    /// Row strides in elements.
    pub ldc: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old C.
    pub beta: f32,
    /// Bytes of A's space that its elements occupy (first to last touched).
    pub a: Range<usize>,
    /// Bytes that B's elements occupy.
    pub b: Range<usize>,
    /// Bytes that C's elements occupy.
    pub c: Range<usize>,
    /// The buffer each of A, B, C lives in (`None`: the guest's memory; the ranges
    /// above are then guest offsets, else offsets in the buffer).
    pub spaces: [Option<BufferId>; 3],
}

/// Elements from the first to the last of a `rows×cols` matrix with row stride `ld`.
pub fn extent(rows: u64, cols: u64, ld: u64) -> Option<u64> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1).checked_mul(ld)?.checked_add(cols)
}

/// A device-resident buffer (see [`Device::create_buffer`](crate::Device::create_buffer)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BufferId(pub u64);

/// Where a GEMM operand lives: the guest's memory, or a device-resident buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// The guest's linear memory (the view is checked against its current size).
    Guest,
    /// A device buffer of `size` bytes (the view is checked against that).
    Buffer {
        /// The buffer.
        id: BufferId,
        /// Its size in bytes.
        size: u64,
    },
}

impl GemmSpec {
    /// Checks every dimension, stride and view against a memory of `mem_size` bytes.
    pub fn check(&self, mem_size: usize) -> Result<Gemm, OpError> {
        self.check_in(mem_size, [Space::Guest; 3])
    }

    /// Like [`check`](Self::check), with A, B and C each in the space given: views in
    /// a device buffer are checked against the buffer's size.
    pub fn check_in(&self, mem_size: usize, spaces: [Space; 3]) -> Result<Gemm, OpError> {
        let limit = |s: Space| match s {
            Space::Guest => mem_size,
            Space::Buffer { size, .. } => usize::try_from(size).unwrap_or(usize::MAX),
        };
        let id = |s: Space| match s {
            Space::Guest => None,
            Space::Buffer { id, .. } => Some(id),
        };
        for (name, v) in [("m", self.m), ("n", self.n), ("k", self.k)] {
            if v > MAX_DIM {
                return Err(OpError::TooLarge(format!("{name} = {v} is larger than the limit {MAX_DIM}")));
            }
        }
        let es = self.dtype.size() as u64;
        let (ar, ac) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        let c = self.view("C", (self.m, self.n), self.ldc, self.c, es, limit(spaces[2]))?;
        // With k == 0 or alpha == 0 the product is not read: only C matters.
        let reads = self.k > 0 && self.m > 0 && self.n > 0;
        let (a, b) = if reads {
            let a = self.view("A", (ar, ac), self.lda, self.a, es, limit(spaces[0]))?;
            let b = self.view("B", (br, bc), self.ldb, self.b, es, limit(spaces[1]))?;
            for (name, r, sp) in [("A", &a, spaces[0]), ("B", &b, spaces[1])] {
                // Only views in the same space (the guest, or one buffer) can overlap.
                if id(sp) == id(spaces[2]) && ranges_overlap(&c, r) {
                    return Err(OpError::Overlap(format!(
                        "C (bytes {:#x}..{:#x}) overlaps {name} (bytes {:#x}..{:#x}); the product would read what it writes",
                        c.start, c.end, r.start, r.end
                    )));
                }
            }
            (a, b)
        } else {
            (0..0, 0..0)
        };
        Ok(Gemm {
            dtype: self.dtype,
            trans_a: self.trans_a,
            trans_b: self.trans_b,
            m: self.m as usize,
            n: self.n as usize,
            k: self.k as usize,
            lda: self.lda as usize,
            ldb: self.ldb as usize,
            ldc: self.ldc as usize,
            alpha: self.alpha,
            beta: self.beta,
            a,
            b,
            c,
            spaces: if reads { spaces.map(id) } else { [None, None, id(spaces[2])] },
        })
    }

    fn view(
        &self,
        name: &str,
        (rows, cols): (u64, u64),
        ld: u64,
        (offset, len): (u64, u64),
        es: u64,
        mem_size: usize,
    ) -> Result<Range<usize>, OpError> {
        if rows > 0 && cols > 0 && ld < cols {
            return Err(OpError::InvalidArgument(format!(
                "{name} is {rows}×{cols} stored, so its row stride must be at least {cols}, not {ld}"
            )));
        }
        let elems = extent(rows, cols, ld)
            .ok_or_else(|| OpError::TooLarge(format!("{name}: {rows}×{cols} with stride {ld} overflows")))?;
        let bytes =
            elems.checked_mul(es).ok_or_else(|| OpError::TooLarge(format!("{name}: {elems} elements overflow")))?;
        if bytes > len {
            return Err(OpError::InvalidArgument(format!(
                "{name} ({rows}×{cols}, stride {ld}) needs {bytes} bytes but its view has {len}"
            )));
        }
        check_view(mem_size, offset, len, es).map_err(|e| OpError::view(name, e))?;
        Ok(offset as usize..(offset + bytes) as usize)
    }
}

/// `x = alpha * x` over `n` f32 elements at byte offset `x`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Scal {
    /// The scale.
    pub alpha: f32,
    /// Bytes of x.
    pub x: Range<usize>,
}

impl Scal {
    /// Checks an f32 view `offset..offset+len` against `span`.
    pub fn check(span: &GuestSpan, offset: u64, len: u64, alpha: f32) -> Result<Scal, OpError> {
        if !len.is_multiple_of(4) {
            return Err(OpError::InvalidArgument(format!("x has {len} bytes, not a whole number of f32")));
        }
        let x = check_view(span.size(), offset, len, 4).map_err(|e| OpError::view("x", e))?;
        Ok(Scal { alpha, x })
    }
}

impl OpError {
    fn view(name: &str, e: ViewError) -> OpError {
        match e {
            ViewError::OutOfBounds { .. } => OpError::OutOfBounds(format!("{name}: {e}")),
            ViewError::Overflow { .. } => OpError::TooLarge(format!("{name}: {e}")),
            ViewError::Misaligned { .. } => OpError::Misaligned(format!("{name}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(m: u64, n: u64, k: u64) -> GemmSpec {
        GemmSpec {
            dtype: DType::F32,
            trans_a: false,
            trans_b: false,
            m,
            n,
            k,
            lda: k,
            ldb: n,
            ldc: n,
            alpha: 1.0,
            beta: 0.0,
            a: (0, m * k * 4),
            b: (m * k * 4, k * n * 4),
            c: (m * k * 4 + k * n * 4, m * n * 4),
        }
    }

    #[test]
    fn a_fitting_gemm_passes() {
        let g = spec(4, 5, 6).check(1 << 16).unwrap();
        assert_eq!(g.a, 0..96);
        assert_eq!(g.c.len(), 80);
    }

    #[test]
    fn refuses_each_kind_of_bad_view() {
        let mut s = spec(4, 5, 6);
        s.c.0 = 65536 - 40;
        assert!(matches!(s.check(65536), Err(OpError::OutOfBounds(_))));
        let mut s = spec(4, 5, 6);
        s.c.0 = 2;
        assert!(matches!(s.check(65536), Err(OpError::Misaligned(_))));
        let mut s = spec(4, 5, 6);
        s.c.0 = 8;
        assert!(matches!(s.check(65536), Err(OpError::Overlap(_))));
        let mut s = spec(4, 5, 6);
        s.lda = 3;
        assert!(matches!(s.check(65536), Err(OpError::InvalidArgument(_))));
        let mut s = spec(4, 5, 6);
        s.m = u32::MAX as u64;
        assert!(matches!(s.check(65536), Err(OpError::TooLarge(_))));
        let mut s = spec(4, 5, 6);
        s.a.1 = 10;
        assert!(matches!(s.check(65536), Err(OpError::InvalidArgument(_))));
        let mut s = spec(1, 1, 1);
        s.ldc = u64::MAX;
        s.m = 3;
        assert!(s.check(65536).is_err());
    }
}
