//! Cancelling long work: a deadline, or a kill, checked between the pieces of a forward
//! pass.
//!
//! A host runs untrusted guests' work on its own threads; a prompt of thousands of tokens or
//! a long matrix product must not outlive the guest's deadline or a `kill`. An
//! [`Interrupt`] is a shared flag plus an optional deadline. The thread doing the work
//! [`enter`](Interrupt::enter)s it; long loops in the engine call [`check`] between pieces (a
//! prompt's chunks, on the CPU each layer of a chunk) and stop with [`Interrupted`]. Another
//! thread may [`kill`](Interrupt::kill) it at any time.
//!
//! The current interrupt is per thread, like a tracing span, so that every layer between the
//! host call and the engine's loops need not carry it. With none entered, [`check`] always
//! succeeds.
//!
//! ```
//! use shoal_engine::interrupt::{self, Interrupt, Interrupted};
//! let i = Interrupt::new();
//! let _in = i.enter();
//! assert!(interrupt::check().is_ok());
//! i.kill();
//! assert_eq!(interrupt::check(), Err(Interrupted::Killed));
//! ```

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why work stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted {
    /// The deadline passed.
    #[error("the deadline passed")]
    Deadline,
    /// The owner was killed.
    #[error("it was killed")]
    Killed,
}

#[derive(Debug)]
struct Inner {
    killed: AtomicBool,
    /// Nanoseconds after [`base`] at which the deadline passes; 0: none.
    deadline_ns: AtomicU64,
}

/// A kill switch and an optional deadline, shared by the worker and whoever may stop it.
#[derive(Debug, Clone)]
pub struct Interrupt(Arc<Inner>);

impl Default for Interrupt {
    fn default() -> Self {
        Interrupt::new()
    }
}

/// The instant deadlines are counted from (the first use in this process).
fn base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl Interrupt {
    /// Not killed, no deadline.
    pub fn new() -> Interrupt {
        Interrupt(Arc::new(Inner { killed: AtomicBool::new(false), deadline_ns: AtomicU64::new(0) }))
    }

    /// Stops the work for good: every later [`Interrupt::check`] fails.
    pub fn kill(&self) {
        self.0.killed.store(true, Ordering::Release);
    }

    /// Whether [`Interrupt::kill`] was called.
    pub fn is_killed(&self) -> bool {
        self.0.killed.load(Ordering::Acquire)
    }

    /// Sets the deadline `after` from now (`None`: no deadline).
    pub fn set_deadline(&self, after: Option<Duration>) {
        let ns = match after {
            // At least 1 ns after the base, so that 0 keeps meaning "none".
            Some(d) => (Instant::now() + d).duration_since(base()).as_nanos().clamp(1, u64::MAX as u128) as u64,
            None => 0,
        };
        self.0.deadline_ns.store(ns, Ordering::Release);
    }

    /// The time left before the deadline (`None`: no deadline; zero once it passed).
    pub fn remaining(&self) -> Option<Duration> {
        match self.0.deadline_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(Duration::from_nanos(ns).saturating_sub(base().elapsed())),
        }
    }

    /// Fails once killed or past the deadline.
    pub fn check(&self) -> Result<(), Interrupted> {
        if self.is_killed() {
            return Err(Interrupted::Killed);
        }
        match self.remaining() {
            Some(left) if left.is_zero() => Err(Interrupted::Deadline),
            _ => Ok(()),
        }
    }

    /// Makes this the current thread's interrupt until the guard drops (the previous one
    /// comes back then).
    pub fn enter(&self) -> Entered {
        let prev = CURRENT.with(|c| c.replace(Some(self.clone())));
        Entered { prev }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Interrupt>> = const { RefCell::new(None) };
}

/// While it lives, an [`Interrupt`] is the current thread's (see [`Interrupt::enter`]).
#[derive(Debug)]
#[must_use = "the interrupt is current only while the guard lives"]
pub struct Entered {
    prev: Option<Interrupt>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let prev = self.prev.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

/// Checks the current thread's interrupt (always `Ok` with none entered).
pub fn check() -> Result<(), Interrupted> {
    CURRENT.with(|c| c.borrow().as_ref().map_or(Ok(()), Interrupt::check))
}

/// The current thread's interrupt, if one is entered.
pub fn current() -> Option<Interrupt> {
    CURRENT.with(|c| c.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_passes_and_a_kill_stays() {
        let i = Interrupt::new();
        assert_eq!(i.check(), Ok(()));
        i.set_deadline(Some(Duration::ZERO));
        assert_eq!(i.check(), Err(Interrupted::Deadline));
        i.set_deadline(Some(Duration::from_secs(3600)));
        assert_eq!(i.check(), Ok(()));
        i.set_deadline(None);
        i.kill();
        assert_eq!(i.check(), Err(Interrupted::Killed));
    }

    #[test]
    fn entering_nests_and_restores() {
        let (a, b) = (Interrupt::new(), Interrupt::new());
        b.kill();
        assert_eq!(check(), Ok(()));
        {
            let _a = a.enter();
            assert_eq!(check(), Ok(()));
            {
                let _b = b.enter();
                assert_eq!(check(), Err(Interrupted::Killed));
            }
            assert_eq!(check(), Ok(()));
        }
        assert!(current().is_none());
    }
}
