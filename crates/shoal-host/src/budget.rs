//! The limits of one instance, and the budget every host resource it causes is charged to.
//!
//! A guest is not trusted with the host's memory or time. Everything it can make the host
//! hold is charged, before it is allocated, to its instance's [`Budget`]: its linear memory
//! (through Wasmtime's [`wasmtime::ResourceLimiter`]), its device buffers, its sessions' KV
//! caches, the models it loads from its own bytes. A charge that would pass
//! [`Limits::max_memory`] is refused with an error that names the limit and how to raise it;
//! a [`Charge`] gives its bytes back when the resource it pays for is dropped.
//!
//! Time is bounded by [`Limits::deadline`] through an [`Interrupt`] (see
//! [`shoal_engine::interrupt`]): guest code is stopped by epoch interruption, host calls
//! (prompts, matrix products) between their pieces.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use shoal_engine::interrupt::Interrupt;

use crate::error::{GuestError, Kind, err};

/// A GiB.
const GIB: u64 = 1 << 30;

/// What one instance may use. [`Limits::default`] fits a 32-bit guest: 4 GiB in all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes the instance may hold in all: its linear memory, its device buffers, its KV
    /// caches and the models it loads from bytes (`--max-memory`).
    pub max_memory: u64,
    /// Positions one session's KV cache may hold (also at most the model's own context
    /// length; `--max-context`).
    pub max_context: usize,
    /// Bytes one message's replies may add up to (`shoal_v1.reply`).
    pub max_reply_bytes: u64,
    /// The longest a message (or a command's whole run, or `_initialize`) may take, host
    /// calls included (`--deadline`).
    pub deadline: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_memory: 4 * GIB, max_context: 32_768, max_reply_bytes: 64 << 20, deadline: None }
    }
}

/// `n` bytes for people: `1.5 GiB`, `12.0 MiB`, `512 bytes`.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= GIB => format!("{:.1} GiB", n as f64 / GIB as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} bytes"),
    }
}

/// Parses a size: `4096`, `512K`, `256M`, `4G` (binary units; `KiB`, `MB`, ... accepted).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 512M, 4G)"))?;
    let mult = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 1u64,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use K, M, G or T)")),
    };
    let v = n * mult as f64;
    if !(0.0..=u64::MAX as f64).contains(&v) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(v as u64)
}

/// The bytes one instance holds, against its limit.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl Budget {
    /// A budget of `limit` bytes, none used.
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget { limit, used: AtomicU64::new(0), peak: AtomicU64::new(0) })
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The most bytes charged at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// Takes `bytes` for `what`, or says which limit refuses them.
    fn take(&self, what: &str, bytes: u64) -> Result<(), GuestError> {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let new = used.checked_add(bytes).filter(|&n| n <= self.limit).ok_or_else(|| {
                err(
                    Kind::LimitExceeded,
                    format!(
                        "{what} needs {}, but the instance already holds {} of its {} (--max-memory); raise --max-memory or free something first",
                        human_bytes(bytes),
                        human_bytes(used),
                        human_bytes(self.limit)
                    ),
                )
            })?;
            match self.used.compare_exchange_weak(used, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.peak.fetch_max(new, Ordering::AcqRel);
                    return Ok(());
                }
                Err(now) => used = now,
            }
        }
    }

    fn give(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Charges `bytes` for `what`; they come back when the [`Charge`] drops.
    pub fn charge(self: &Arc<Budget>, what: &str, bytes: u64) -> Result<Charge, GuestError> {
        self.take(what, bytes)?;
        Ok(Charge { budget: self.clone(), bytes })
    }
}

/// Bytes charged to a [`Budget`], given back on drop.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Charge {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

/// What the ABIs of one instance charge their caches and models to.
#[derive(Clone, Debug)]
pub struct Quota {
    /// The instance's budget.
    pub budget: Arc<Budget>,
    /// Positions one KV cache may hold (`--max-context`).
    pub max_context: usize,
}

impl Quota {
    /// A fresh budget for `limits`.
    pub fn new(limits: &Limits) -> Quota {
        Quota { budget: Budget::new(limits.max_memory), max_context: limits.max_context }
    }

    /// The positions a cache on `m` may hold: the model's own context length (from its file)
    /// and `--max-context`, whichever is smaller.
    pub(crate) fn most_positions(&self, m: &crate::models::LoadedModel) -> usize {
        m.llama.config().context_length.min(self.max_context)
    }

    /// Charges a KV cache of `context` positions on `m`, once the context is checked against
    /// the model and `--max-context`.
    pub(crate) fn kv_cache(&self, m: &crate::models::LoadedModel, context: usize) -> Result<Charge, GuestError> {
        let c = m.llama.config();
        if context > self.most_positions(m) {
            let (limit, hint) = if context > c.context_length {
                (c.context_length, format!("model `{}` supports at most {} positions", m.name, c.context_length))
            } else {
                (self.max_context, format!("raise --max-context (now {})", self.max_context))
            };
            return Err(err(Kind::LimitExceeded, format!("a context of {context} positions; at most {limit}: {hint}")));
        }
        let bytes = (c.n_layers as u64)
            .saturating_mul(c.kv_dim() as u64)
            .saturating_mul(2 * m.llama.kv_bytes_per_value() as u64)
            .saturating_mul(context as u64);
        self.budget
            .charge(&format!("a KV cache of {context} positions on model `{}` ({})", m.name, human_bytes(bytes)), bytes)
    }
}

/// Charges an instance's linear memory to its budget as it grows (Wasmtime calls it before
/// each growth, and at instantiation for the initial size).
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    budget: Arc<Budget>,
    /// Bytes of linear memory charged so far.
    charged: u64,
}

impl MemoryLimiter {
    pub(crate) fn new(budget: Arc<Budget>) -> MemoryLimiter {
        MemoryLimiter { budget, charged: 0 }
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.budget.give(self.charged);
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current) as u64;
        match self.budget.take("growing the linear memory", more) {
            Ok(()) => {
                self.charged += more;
                Ok(true)
            }
            Err(e) => {
                log::info!("memory.grow from {current} to {desired} bytes refused: {}", e.message);
                Ok(false)
            }
        }
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        // Tables hold 8-byte references; a million entries is plenty for any guest.
        Ok(desired <= 1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_refused_past_the_limit_and_given_back_on_drop() {
        let b = Budget::new(100);
        let a = b.charge("a", 60).unwrap();
        let e = b.charge("b", 41).unwrap_err();
        assert_eq!(e.kind, Kind::LimitExceeded);
        assert!(e.message.contains("--max-memory"), "{}", e.message);
        drop(a);
        let _c = b.charge("c", 100).unwrap();
        assert_eq!(b.used(), 100);
        assert_eq!(b.peak(), 100);
        assert!(b.charge("d", u64::MAX).is_err());
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("512M").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("1.5g").unwrap(), 3 << 29);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5X").is_err());
    }
}
