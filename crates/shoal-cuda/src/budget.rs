//! The device's KV budget: how many bytes of GPU memory every model's KV pool on one device
//! may hold together.

use std::sync::Mutex;

use crate::CudaError;

/// The most a KV budget takes by default: half the free memory, at most this.
pub const KV_DEFAULT_MAX: usize = 8 << 30;

/// The budget's limit: `SHOAL_KV_POOL_MB` MiB when given (`env`), else half of `free`, at most
/// [`KV_DEFAULT_MAX`].
pub fn kv_limit(env: Option<&str>, free: usize) -> usize {
    match env.and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(mb) => mb.saturating_mul(1 << 20),
        None => (free / 2).min(KV_DEFAULT_MAX),
    }
}

/// Bytes charged against a limit, shared by every KV pool on one device.
///
/// Pools [`reserve`](KvBudget::reserve) bytes before they map memory and
/// [`release`](KvBudget::release) them after they unmap it, so the sum of what they hold never
/// passes the limit.
#[derive(Debug)]
pub struct KvBudget {
    limit: usize,
    used: Mutex<usize>,
}

impl KvBudget {
    /// A budget of `limit` bytes, none used.
    pub fn new(limit: usize) -> KvBudget {
        KvBudget { limit, used: Mutex::new(0) }
    }

    /// Charges `bytes`, or says how far over the limit that would go (charging nothing).
    pub fn reserve(&self, bytes: usize) -> Result<(), CudaError> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        match used.checked_add(bytes) {
            Some(total) if total <= self.limit => {
                *used = total;
                Ok(())
            }
            _ => Err(CudaError::OverBudget { asked: bytes, used: *used, limit: self.limit }),
        }
    }

    /// Gives back `bytes` charged earlier.
    pub fn release(&self, bytes: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert!(bytes <= *used, "releasing {bytes} bytes of a KV budget that has {} charged", *used);
        *used = used.saturating_sub(bytes);
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes that may still be charged.
    pub fn available(&self) -> usize {
        self.limit.saturating_sub(self.used())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_and_release_keep_the_sum_under_the_limit() {
        let b = KvBudget::new(100);
        assert_eq!((b.used(), b.limit(), b.available()), (0, 100, 100));
        b.reserve(60).unwrap();
        b.reserve(40).unwrap();
        assert_eq!((b.used(), b.available()), (100, 0));
        assert_eq!(b.reserve(1), Err(CudaError::OverBudget { asked: 1, used: 100, limit: 100 }));
        assert_eq!(b.used(), 100, "a refused reservation charges nothing");
        b.release(60);
        assert_eq!(b.used(), 40);
        assert_eq!(b.reserve(61), Err(CudaError::OverBudget { asked: 61, used: 40, limit: 100 }));
        b.reserve(60).unwrap();
        b.release(100);
        assert_eq!(b.used(), 0);
        assert!(matches!(b.reserve(usize::MAX), Err(CudaError::OverBudget { asked: usize::MAX, used: 0, .. })));
    }

    #[test]
    fn the_limit_is_the_environment_or_half_the_free_memory_up_to_8_gib() {
        assert_eq!(kv_limit(Some("64"), 1 << 40), 64 << 20);
        assert_eq!(kv_limit(Some(" 1 "), 0), 1 << 20);
        assert_eq!(kv_limit(None, 6 << 30), 3 << 30);
        assert_eq!(kv_limit(None, 80 << 30), 8 << 30);
        // Not a number: the default.
        assert_eq!(kv_limit(Some("lots"), 2 << 30), 1 << 30);
    }
}
