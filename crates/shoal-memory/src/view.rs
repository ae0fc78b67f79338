//! Bounds checks for the views a guest names.

use std::ops::Range;

/// Why a view a guest named was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// The view ends past the memory's current size.
    #[error("view {offset:#x}+{len} ends past the guest memory's {size} bytes")]
    OutOfBounds {
        /// Byte offset the guest gave.
        offset: u64,
        /// Byte length the guest gave.
        len: u64,
        /// The memory's size at the time of the call.
        size: u64,
    },
    /// `offset + len` does not fit in 64 bits.
    #[error("view {offset:#x}+{len} overflows")]
    Overflow {
        /// Byte offset the guest gave.
        offset: u64,
        /// Byte length the guest gave.
        len: u64,
    },
    /// The offset is not a multiple of the element alignment.
    #[error("view offset {offset:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// Byte offset the guest gave.
        offset: u64,
        /// Required alignment.
        align: u64,
    },
}

/// Checks that `offset..offset+len` lies inside a memory of `size` bytes and that
/// `offset` is a multiple of `align` (a power of two, at least 1).
///
/// Returns the byte range as `usize`s. The check is done in 64-bit arithmetic
/// with overflow detection, so no input can wrap around.
pub fn check_view(size: usize, offset: u64, len: u64, align: u64) -> Result<Range<usize>, ViewError> {
    debug_assert!(align.is_power_of_two());
    if !offset.is_multiple_of(align) {
        return Err(ViewError::Misaligned { offset, align });
    }
    let end = offset.checked_add(len).ok_or(ViewError::Overflow { offset, len })?;
    if end > size as u64 {
        return Err(ViewError::OutOfBounds { offset, len, size: size as u64 });
    }
    // Both fit in usize because end <= size.
    Ok(offset as usize..end as usize)
}

/// Whether two byte ranges share at least one byte (empty ranges overlap nothing).
pub fn ranges_overlap(a: &Range<usize>, b: &Range<usize>) -> bool {
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_inside_pass_and_outside_fail() {
        assert_eq!(check_view(65536, 0, 65536, 4), Ok(0..65536));
        assert_eq!(check_view(65536, 65536, 0, 4), Ok(65536..65536));
        assert!(matches!(check_view(65536, 65532, 8, 4), Err(ViewError::OutOfBounds { .. })));
        assert!(matches!(check_view(65536, 2, 4, 4), Err(ViewError::Misaligned { .. })));
        assert!(matches!(check_view(65536, u64::MAX - 3, 8, 4), Err(ViewError::Overflow { .. })));
    }

    #[test]
    fn overlap_ignores_empty_ranges() {
        assert!(ranges_overlap(&(0..8), &(4..12)));
        assert!(!ranges_overlap(&(0..8), &(8..12)));
        assert!(!ranges_overlap(&(4..4), &(0..8)));
    }
}
