//! Continuous batching: the sessions of one model that are ready at the same moment share a
//! forward pass, so the weights are read once for all of them.
//!
//! Callers do not change: an actor's thread in a host call, a wasi-nn context or the CLI
//! keeps calling [`Llama::forward`](crate::models::Llama::forward) (or `forward_sample`) on
//! its own thread. The call becomes a job in the model's [`Batcher`]. When no pass is running,
//! the calling thread leads: it takes the waiting jobs (decode steps first, in arrival order,
//! then chunks of prompts under a token budget, at most [`Backend::max_seqs`] sequences), runs
//! one pass over them, hands each job its result and wakes its owner alone (each job has its
//! own slot, so a pass of 64 does not wake a herd onto one lock); then the owner of the oldest
//! unfinished job is woken to lead the next pass. This is flat combining, chosen over a scheduler
//! thread per device: a caller alone runs at once on its own thread, as before batching (no
//! hand-off between threads on every step), and there is no thread to start, stop or lose.
//!
//! - **Gathering**: the callers of a pass come back one by one, each after its own work
//!   between steps (a guest writes its token out); a leader waits for them, up to half the last
//!   pass's time (at most 5 ms), so that passes do not split into halves that alternate.
//! - **Chunked prefill**: a prompt advances by at most the budget per pass
//!   (`SHOAL_BATCH_TOKENS`, default 512, at most the backend's chunk), sharing the pass with
//!   every decode step ready then, so a long prompt never stalls the others' decoding.
//! - **Each sequence its own sampling**: a job carries its sampler, seed, step and penalty
//!   window; backends sample each row alone, so a token never depends on its neighbours.
//! - **Interrupts**: a pass is never cut (its work belongs to many callers); a job whose
//!   caller's deadline passed or who was killed is dropped before its next pass and its cache
//!   is left as it was found. A pass is bounded by the budget, so a caller waits at most one
//!   pass past its interrupt.
//! - **Failures**: a pass that fails fails each of its jobs (their caches as found); one that
//!   panics reports its jobs failed on the way out, so no caller waits forever.
//!
//! Jobs borrow the caller's tokens, cache and sampler: the caller does not return before its
//! job is reported (finished, failed or dropped), and a leader touches a job only between
//! taking it and reporting it, so the borrows stay valid (as with scoped threads).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::backend::{Backend, KvStore, Output, Seq, Want};
use crate::interrupt::Interrupt;
use crate::models::{EngineError, Llama};

/// The default token budget of one pass.
pub const DEFAULT_BUDGET: usize = 512;

/// The longest a leader waits for the callers of the last pass to come back.
const MAX_GATHER: Duration = Duration::from_millis(5);

/// What a batcher has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Passes run.
    pub passes: u64,
    /// Sequences in them, summed (divide by `passes` for the mean batch).
    pub seqs: u64,
    /// Tokens in them, summed.
    pub tokens: u64,
    /// Time spent in them, summed, in microseconds (the rest of a caller's wait is
    /// gathering: other callers coming back).
    pub busy_us: u64,
}

/// One caller's work, borrowed from the caller (see the module docs).
struct Job<C> {
    id: u64,
    /// The caller's tokens (lifetime erased: valid until the job is reported).
    tokens: &'static [u32],
    /// Tokens already run.
    done: usize,
    /// The caller's cache (valid, and touched by no one else, until the job is reported).
    cache: *mut C,
    /// The cache's length when the job came in (restored on failure).
    start: usize,
    /// What the caller wants for its last token (lifetime erased like `tokens`).
    want: Want<'static>,
    interrupt: Option<Interrupt>,
    /// Where the result goes, and who waits for it.
    slot: Arc<Slot>,
    owner: Thread,
}

/// One job's result, handed to its owner alone (no herd of waiters on one lock).
#[derive(Default)]
struct Slot {
    done: AtomicBool,
    result: Mutex<Option<Result<Output, EngineError>>>,
}

impl<C> Job<C> {
    /// Hands the job's result to its owner and wakes it.
    fn report(self, r: Result<Output, EngineError>) {
        *self.slot.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.slot.done.store(true, Ordering::Release);
        self.owner.unpark();
    }
}

struct State<C> {
    pending: VecDeque<Job<C>>,
    leading: bool,
    next: u64,
    /// Callers whose job the last pass finished and who have not submitted since: most
    /// come back within microseconds with their next token.
    returning: usize,
    /// How long the last pass took.
    last_pass: Duration,
}

/// The queue of one model's pending work (see the module docs).
pub struct Batcher<B: Backend> {
    state: Mutex<State<B::Cache>>,
    /// A leader waiting for callers to come back.
    arrive: Condvar,
    budget: usize,
    passes: AtomicU64,
    seqs: AtomicU64,
    tokens: AtomicU64,
    busy_us: AtomicU64,
}

// SAFETY: the raw pointers in queued jobs point at callers' caches, used by one leader at a
// time while their owners wait (see the module docs); caches are `Send`.
unsafe impl<B: Backend> Send for Batcher<B> {}
// SAFETY: as above; all shared state is behind the mutex.
unsafe impl<B: Backend> Sync for Batcher<B> {}

impl<B: Backend> std::fmt::Debug for Batcher<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("budget", &self.budget).field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl<B: Backend> Default for Batcher<B> {
    fn default() -> Self {
        Self::new()
    }
}

/// Reports the jobs of a pass as failed if the leader unwinds before reporting them.
struct Lead<'a, B: Backend> {
    batcher: &'a Batcher<B>,
    /// The slots and owners of the pass's jobs, until they are reported.
    jobs: Vec<(Arc<Slot>, Thread)>,
    backend: &'static str,
}

impl<B: Backend> Drop for Lead<'_, B> {
    fn drop(&mut self) {
        if self.jobs.is_empty() {
            return;
        }
        for (slot, owner) in self.jobs.drain(..) {
            *slot.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(EngineError::Backend {
                backend: self.backend,
                message: "a forward pass panicked; this session's cache may be lost".into(),
            }));
            slot.done.store(true, Ordering::Release);
            owner.unpark();
        }
        let mut st = self.batcher.lock();
        st.leading = false;
        self.batcher.hand_over(&st);
    }
}

impl<B: Backend> Batcher<B> {
    /// An empty queue with the budget of `SHOAL_BATCH_TOKENS` (default [`DEFAULT_BUDGET`]).
    pub fn new() -> Self {
        let budget =
            std::env::var("SHOAL_BATCH_TOKENS").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(DEFAULT_BUDGET);
        Self::with_budget(budget)
    }

    /// An empty queue whose passes take at most `budget` tokens (at least 1).
    pub fn with_budget(budget: usize) -> Self {
        Batcher {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                leading: false,
                next: 1,
                returning: 0,
                last_pass: Duration::ZERO,
            }),
            arrive: Condvar::new(),
            budget: budget.max(1),
            passes: AtomicU64::new(0),
            seqs: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            busy_us: AtomicU64::new(0),
        }
    }

    /// Passes, sequences and tokens so far.
    pub fn stats(&self) -> BatchStats {
        BatchStats {
            passes: self.passes.load(Ordering::Relaxed),
            seqs: self.seqs.load(Ordering::Relaxed),
            tokens: self.tokens.load(Ordering::Relaxed),
            busy_us: self.busy_us.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<B::Cache>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `tokens` (checked, room reserved) at `cache`'s positions in passes shared with
    /// the other callers, and hands back what `want` asks for.
    pub(crate) fn submit(
        &self,
        model: &Llama<B>,
        tokens: &[u32],
        cache: &mut B::Cache,
        want: Want<'_>,
    ) -> Result<Output, EngineError> {
        let start = cache.len();
        let slot = Arc::new(Slot::default());
        let mut st = self.lock();
        let id = st.next;
        st.next += 1;
        // Lifetimes erased: this function does not return before the job is reported (the
        // loop below returns only with its result), and nothing touches the job after
        // reporting it; so `tokens`, `want`'s borrows and `cache` outlive every use.
        // SAFETY: as just said; the transmutes change lifetimes only.
        let job = unsafe {
            Job {
                id,
                tokens: std::mem::transmute::<&[u32], &'static [u32]>(tokens),
                done: 0,
                cache: cache as *mut B::Cache,
                start,
                want: std::mem::transmute::<Want<'_>, Want<'static>>(want),
                interrupt: crate::interrupt::current(),
                slot: slot.clone(),
                owner: std::thread::current(),
            }
        };
        st.pending.push_back(job);
        st.returning = st.returning.saturating_sub(1);
        self.arrive.notify_one();
        loop {
            if slot.done.load(Ordering::Acquire) {
                drop(st);
                let r = slot.result.lock().unwrap_or_else(|e| e.into_inner()).take();
                return r.unwrap_or_else(|| unreachable!("a job is reported with its result"));
            }
            if !st.leading {
                st.leading = true;
                st = self.lead(st, model);
                continue;
            }
            drop(st);
            // Woken by the leader that reports this job, or that hands leadership over; the
            // timeout is a safety net only.
            std::thread::park_timeout(Duration::from_millis(100));
            st = self.lock();
        }
    }

    /// After a pass: wakes the owner of the oldest pending job to lead the next one.
    fn hand_over(&self, st: &State<B::Cache>) {
        if !st.leading
            && let Some(job) = st.pending.front()
        {
            job.owner.unpark();
        }
    }

    /// Takes the jobs of one pass from the queue, runs it without the lock, reports.
    fn lead<'s>(
        &'s self,
        mut st: MutexGuard<'s, State<B::Cache>>,
        model: &Llama<B>,
    ) -> MutexGuard<'s, State<B::Cache>> {
        let backend = model.backend();
        let budget = self.budget.min(backend.max_chunk()).max(1);
        let most_seqs = backend.max_seqs().max(1);
        // The callers of the last pass come back one by one as they finish their own work
        // between steps: wait for them (at most half a pass), or passes would split in two.
        let deadline = Instant::now() + (st.last_pass / 2).min(MAX_GATHER);
        while st.returning > 0 && st.pending.len() < most_seqs {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self.arrive.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        st.returning = 0;
        // Dropped jobs first; then decode steps in arrival order, then prompt chunks (a stable
        // sort on "more than one token left" keeps each kind in arrival order).
        let mut live: Vec<Job<B::Cache>> = Vec::with_capacity(st.pending.len());
        for job in st.pending.drain(..) {
            match job.interrupt.as_ref().map(Interrupt::check) {
                Some(Err(why)) => {
                    // SAFETY: a pending job's cache is used by no one (its owner waits).
                    unsafe { (*job.cache).truncate(job.start) };
                    job.report(Err(why.into()));
                }
                _ => live.push(job),
            }
        }
        live.sort_by_key(|j| j.tokens.len() - j.done > 1);
        let mut take: Vec<(Job<B::Cache>, usize)> = Vec::new();
        let mut rest: Vec<Job<B::Cache>> = Vec::new();
        let mut used = 0;
        for job in live {
            let n = (job.tokens.len() - job.done).min(budget - used);
            if n == 0 || take.len() == most_seqs {
                rest.push(job);
                continue;
            }
            used += n;
            take.push((job, n));
        }
        st.pending.extend(rest);
        if take.is_empty() {
            st.leading = false;
            self.hand_over(&st);
            return st;
        }
        drop(st);

        let mut guard = Lead {
            batcher: self,
            jobs: take.iter().map(|(j, _)| (j.slot.clone(), j.owner.clone())).collect(),
            backend: backend.name(),
        };
        let mut seqs: Vec<Seq<'_, B::Cache>> = take
            .iter()
            .map(|(job, n)| {
                let end = job.done + n;
                Seq {
                    tokens: &job.tokens[job.done..end],
                    // SAFETY: each job's borrows are valid until it is reported (module
                    // docs); the jobs are distinct callers, so their caches are distinct.
                    cache: unsafe { &mut *job.cache },
                    want: if end == job.tokens.len() { job.want } else { Want::Nothing },
                }
            })
            .collect();
        let t0 = Instant::now();
        let result = model.pass(&mut seqs, false);
        let took = t0.elapsed();
        drop(seqs);
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.seqs.fetch_add(take.len() as u64, Ordering::Relaxed);
        self.tokens.fetch_add(used as u64, Ordering::Relaxed);
        self.busy_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);

        let mut st = self.lock();
        st.last_pass = took;
        match result {
            Ok(outputs) => {
                for ((mut job, n), out) in take.into_iter().zip(outputs) {
                    job.done += n;
                    if job.done == job.tokens.len() {
                        job.report(Ok(out));
                        st.returning += 1;
                    } else {
                        st.pending.push_back(job);
                    }
                }
                // Older jobs first.
                st.pending.make_contiguous().sort_by_key(|j| j.id);
            }
            Err(e) => {
                let message = e.to_string();
                let mut first = Some(e);
                for (job, _) in take {
                    // SAFETY: the pass is over; the job is not reported yet, so its cache is
                    // still borrowed for it.
                    unsafe { (*job.cache).truncate(job.start) };
                    let e = first.take().unwrap_or_else(|| EngineError::Backend {
                        backend: backend.name(),
                        message: format!("the pass this step shared failed: {message}"),
                    });
                    job.report(Err(e));
                }
            }
        }
        guard.jobs.clear();
        st.leading = false;
        self.hand_over(&st);
        st
    }
}
