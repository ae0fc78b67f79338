//! An actor: one Wasm instance on its own thread, and a mailbox. Messages are handled one
//! at a time, in order; snapshots are taken between them, when the instance is quiescent.
//!
//! An actor can be stopped at any time, even inside a handler that never returns:
//! [`Actor::kill`] (and dropping it) fires the instance's [`Interrupt`], which stops guest
//! code within a tick of the epoch and a host call between two of its pieces.
//!
//! Replies are bounded: a message's reply is a queue of at most [`REPLY_QUEUE`] parts. While
//! it is full, the guest's `reply` waits (the actor slows down to its reader); once the reader
//! has gone, or the actor is killed or past its deadline, `reply` fails at once, so that a
//! client that never reads cannot grow the host, nor hold a kill or a deadline back.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shoal_host::{HostError, Instance, InstanceOptions, Interrupt, Limits, Prepared, Runtime};

use crate::snapshot::{Snapshot, SnapshotError};

/// Errors of actors.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// The instance could not be started or brought back.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The actor has stopped (killed, or its guest trapped or ran past its deadline).
    #[error("the actor has stopped: {0}")]
    Stopped(String),
    /// The module's `_initialize` ran past its deadline at spawn, and was stopped.
    #[error("the module's `_initialize` did not return within {0:.1?} and was stopped (--init-deadline)")]
    InitDeadline(Duration),
    /// The actor's mailbox holds its most messages ([`MAILBOX`]) waiting for it.
    #[error("the actor's mailbox is full: {0} messages wait for it; send more once it has answered some")]
    MailboxFull(usize),
    /// The handler failed on this message (returned an error code); the actor lives on.
    #[error("the actor's handler failed: {0}")]
    Failed(String),
}

/// How a handler says why it failed: a reply part that begins with these bytes (NAK,
/// `error`, the unit separator) is not part of the reply but the error's message, reported
/// in [`Event::Done`] when the handler then returns an error code (and dropped if it returns
/// 0). Without one, the error is "the handler returned CODE".
pub const ERROR_MARK: &[u8] = b"\x15error\x1f";

/// The most messages waiting in one actor's mailbox (the one it handles included): past it,
/// [`Actor::send`] fails with [`ActorError::MailboxFull`], so that a client cannot pile
/// messages (and their bytes) onto a busy actor without bound.
pub const MAILBOX: usize = 64;

/// The most parts of a reply ([`Event`]s) queued for its reader: once that many wait, the
/// actor's next `reply` waits until the reader takes one (or has gone, or the actor is killed
/// or past its deadline). A slow reader slows its actor down; one that never reads holds at
/// most this many parts (each at most the guest's reply, itself bounded by
/// [`Limits::max_reply_bytes`]).
pub const REPLY_QUEUE: usize = 64;

/// Part of a reply.
#[derive(Debug)]
pub enum Event {
    /// Bytes the guest replied, as it replied them.
    Chunk(Vec<u8>),
    /// The handler returned: `Ok` or why not (the message the handler gave with
    /// [`ERROR_MARK`], or what stopped it).
    Done(Result<(), String>),
}

enum Command {
    Message(Vec<u8>, mpsc::SyncSender<Event>),
    /// A snapshot; `true`: device caches kept in the backend's own form (see [`Actor::park`]).
    /// Taken only if still [`ASKED`] (see [`Pending`]).
    Snapshot(bool, mpsc::Sender<Result<Snapshot, ActorError>>, Arc<AtomicU8>),
    Stop,
}

/// How an actor runs.
#[derive(Clone, Debug, Default)]
pub struct ActorConfig {
    /// The longest a handler may run, host calls included; it also bounds `_initialize` at
    /// spawn unless [`ActorConfig::init_deadline`] is given.
    pub deadline: Option<Duration>,
    /// The longest `_initialize` may run at spawn (`None`: [`ActorConfig::deadline`]). Used
    /// when the spawn's own [`InstanceOptions::limits`] has no deadline.
    pub init_deadline: Option<Duration>,
    /// What an instance brought back from a snapshot may use (memory, context, replies; its
    /// `deadline` is not used: see the fields above). A spawn runs under its own
    /// [`InstanceOptions::limits`] ([`crate::Registry`] gives every spawn these).
    pub limits: Limits,
}

impl ActorConfig {
    /// The deadline of a spawn's `_initialize`.
    pub fn init(&self) -> Option<Duration> {
        self.init_deadline.or(self.deadline)
    }
}

/// What an actor is doing, for listings.
#[derive(Clone, Debug)]
pub struct ActorStatus {
    /// `idle`, `busy` or `stopped: why`.
    pub state: String,
    /// Messages handled.
    pub messages: u64,
    /// Bytes of linear memory.
    pub memory_bytes: usize,
    /// Bytes charged to its limit besides its linear memory: its sessions' KV caches and
    /// device buffers.
    pub kv_bytes: u64,
    /// Positions its sessions' KV caches hold, and can hold, in all.
    pub context: (usize, usize),
}

/// A running actor (see the module docs). Dropping it kills it ([`Actor::kill`]); to let it
/// finish the messages in its mailbox first, [`Actor::stop`] it.
pub struct Actor {
    /// The span its thread runs in.
    span: tracing::Span,
    tx: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    status: Arc<Mutex<ActorStatus>>,
    /// Messages in the mailbox or being handled.
    queued: Arc<AtomicUsize>,
    prepared: Arc<Prepared>,
    /// The instance's kill switch, kept here: the instance itself lives on the actor's thread.
    interrupt: Interrupt,
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor").field("status", &self.status()).finish_non_exhaustive()
    }
}

enum Start {
    Fresh(InstanceOptions),
    Restore(Box<Snapshot>),
}

impl Actor {
    /// Starts an actor running `prepared` with `opts` (its arguments and limits). Its
    /// `_initialize` runs here, within `opts.limits.deadline`, or [`ActorConfig::init`] when
    /// that is `None`: one that does not return in time fails the spawn with
    /// [`ActorError::InitDeadline`].
    pub fn spawn(
        runtime: Arc<Runtime>,
        prepared: Arc<Prepared>,
        mut opts: InstanceOptions,
        config: ActorConfig,
    ) -> Result<Actor, ActorError> {
        if opts.limits.deadline.is_none() {
            opts.limits.deadline = config.init();
        }
        Self::start(runtime, prepared, Start::Fresh(opts), config)
    }

    /// Brings an actor back from `snapshot` (taken of the same module, on any backend), under
    /// `config.limits`.
    pub fn restore(
        runtime: Arc<Runtime>,
        prepared: Arc<Prepared>,
        snapshot: Snapshot,
        config: ActorConfig,
    ) -> Result<Actor, ActorError> {
        snapshot.check(&runtime, &prepared)?;
        Self::start(runtime, prepared, Start::Restore(Box::new(snapshot)), config)
    }

    fn start(
        runtime: Arc<Runtime>,
        prepared: Arc<Prepared>,
        how: Start,
        config: ActorConfig,
    ) -> Result<Actor, ActorError> {
        // Deadlines and kills need the epoch ticker (idempotent).
        runtime.start_epoch_ticker();
        // The instance is made here, on the caller's thread (its memory is written where the
        // snapshot was just read), and then handed to the actor's own thread.
        let mut inst = match how {
            Start::Fresh(opts) => {
                runtime.instantiate(&prepared, &opts).map_err(|e| match (e, opts.limits.deadline) {
                    (HostError::Deadline, Some(d)) => ActorError::InitDeadline(d),
                    (e, _) => ActorError::Host(e),
                })?
            }
            // Checked by `Actor::restore`.
            Start::Restore(snap) => {
                let limits = Limits { deadline: None, ..config.limits.clone() };
                runtime.restore_with(&prepared, &snap.state, &limits)?
            }
        };
        let interrupt = inst.interrupt();
        let (tx, rx) = mpsc::channel();
        let status = Arc::new(Mutex::new(ActorStatus {
            state: "idle".into(),
            messages: 0,
            memory_bytes: inst.memory_size(),
            kv_bytes: inst.charged().saturating_sub(inst.memory_size() as u64),
            context: inst.context_use(),
        }));
        let queued = Arc::new(AtomicUsize::new(0));
        let (st, q) = (status.clone(), queued.clone());
        // What the actor's thread logs (its guest's stderr too) is in this span; its id is
        // recorded once the registry has given it one.
        let span = tracing::info_span!("actor", actor = tracing::field::Empty);
        let entered = span.clone();
        let thread = std::thread::Builder::new()
            .name("shoal-actor".into())
            .spawn(move || entered.in_scope(|| run(&runtime, &mut inst, rx, &st, &q, &config)))
            .map_err(|e| ActorError::Stopped(format!("cannot start a thread: {e}")))?;
        Ok(Actor { tx, thread: Some(thread), status, queued, prepared, interrupt, span })
    }

    /// Names the actor in what its thread logs (`actor=ID`).
    pub fn set_id(&self, id: u64) {
        self.span.record("actor", id);
    }

    /// Puts `msg` in the mailbox; the reply streams through the receiver, which holds at most
    /// [`REPLY_QUEUE`] parts not yet read (the actor waits for its reader beyond that).
    /// Dropping the receiver abandons the reply: the guest's next `reply` fails, telling it
    /// to stop the message.
    pub fn send(&self, msg: Vec<u8>) -> Result<mpsc::Receiver<Event>, ActorError> {
        let (tx, rx) = mpsc::sync_channel(REPLY_QUEUE);
        if self.queued.fetch_add(1, Ordering::AcqRel) >= MAILBOX {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(ActorError::MailboxFull(MAILBOX));
        }
        if self.tx.send(Command::Message(msg, tx)).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(self.stopped());
        }
        Ok(rx)
    }

    /// Sends `msg` and waits for the whole reply.
    pub fn ask(&self, msg: impl Into<Vec<u8>>) -> Result<Vec<u8>, ActorError> {
        let rx = self.send(msg.into())?;
        let mut out = Vec::new();
        for ev in rx {
            match ev {
                Event::Chunk(c) => out.extend_from_slice(&c),
                Event::Done(Ok(())) => return Ok(out),
                Event::Done(Err(e)) if lock(&self.status).state.starts_with("stopped") => {
                    return Err(ActorError::Stopped(e));
                }
                Event::Done(Err(e)) => return Err(ActorError::Failed(e)),
            }
        }
        Err(self.stopped())
    }

    /// Takes a snapshot after the messages already in the mailbox (portable: to be written,
    /// or restored anywhere).
    pub fn snapshot(&self) -> Result<Snapshot, ActorError> {
        self.take(false)
    }

    /// Takes a snapshot to be restored soon in this process (a paused actor): device caches
    /// stay in the backend's own form (CUDA: pinned host memory, brought back by DMA alone).
    /// It is still written and restored anywhere like any other (converted on the way).
    pub fn park(&self) -> Result<Snapshot, ActorError> {
        self.take(true)
    }

    fn take(&self, parked: bool) -> Result<Snapshot, ActorError> {
        let pending = self.request(parked)?;
        pending.rx.recv().map_err(|_| self.stopped())?
    }

    /// Asks for a snapshot after the messages already in the mailbox, without waiting for it.
    pub(crate) fn request(&self, parked: bool) -> Result<Pending, ActorError> {
        let (tx, rx) = mpsc::channel();
        let state = Arc::new(AtomicU8::new(ASKED));
        self.tx.send(Command::Snapshot(parked, tx, state.clone())).map_err(|_| self.stopped())?;
        Ok(Pending { rx, state })
    }

    /// Whether no message is in its mailbox or being handled (a snapshot asked for now is
    /// taken at once).
    pub(crate) fn is_idle(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }

    /// The status the actor's thread keeps up to date (read without any other lock).
    pub(crate) fn status_cell(&self) -> Arc<Mutex<ActorStatus>> {
        self.status.clone()
    }

    /// What the actor is doing.
    pub fn status(&self) -> ActorStatus {
        lock(&self.status).clone()
    }

    /// The module it runs.
    pub fn prepared(&self) -> &Arc<Prepared> {
        &self.prepared
    }

    /// Stops the actor after the messages already in its mailbox, and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Stops the actor now, even inside a handler that never returns, and waits for its
    /// thread: the message it is handling, and those still in its mailbox, end with an error;
    /// its state says `stopped: killed`.
    pub fn kill(mut self) {
        self.kill_now();
    }

    /// A switch that kills the actor's instance from any thread, without waiting
    /// ([`Actor::kill`] also joins its thread).
    pub fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    fn kill_now(&mut self) {
        if self.thread.is_none() {
            return;
        }
        self.interrupt.kill();
        self.shutdown();
        lock(&self.status).state = "stopped: killed".into();
    }

    fn shutdown(&mut self) {
        let _ = self.tx.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn stopped(&self) -> ActorError {
        ActorError::Stopped(lock(&self.status).state.clone())
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        // Not stopped yet: kill, so that a handler that loops cannot make the drop hang.
        self.kill_now();
    }
}

/// A snapshot request not yet reached by the actor.
const ASKED: u8 = 0;
/// Being taken by the actor.
const TAKING: u8 = 1;
/// Withdrawn by whoever asked: the actor skips it.
const WITHDRAWN: u8 = 2;

/// A snapshot asked for ([`Actor::request`]) and not yet taken.
pub(crate) struct Pending {
    rx: mpsc::Receiver<Result<Snapshot, ActorError>>,
    /// [`ASKED`], then [`TAKING`] (by the actor) or [`WITHDRAWN`] (by [`Pending::wait`]).
    state: Arc<AtomicU8>,
}

impl Pending {
    /// The snapshot, or `None` when the actor has not begun it within `start` (it is busy
    /// with messages): the request is then withdrawn, and never taken. One begun is waited
    /// for (a capture is bounded work, not the guest's).
    pub(crate) fn wait(self, start: Duration) -> Result<Option<Snapshot>, ActorError> {
        let gone = || ActorError::Stopped("the actor stopped before its snapshot".into());
        match self.rx.recv_timeout(start) {
            Ok(r) => r.map(Some),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if self.state.compare_exchange(ASKED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    return Ok(None);
                }
                self.rx.recv().map_err(|_| gone())?.map(Some)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }
}

/// Hands `ev` to a reply's reader, waiting while its queue is full (1 ms, growing to 10 ms,
/// between tries). False, at once, when the reader has gone; false, without waiting further,
/// once `interrupt` is killed or past its deadline, or `until` has passed.
fn deliver(tx: &mpsc::SyncSender<Event>, ev: Event, interrupt: &Interrupt, until: Option<Instant>) -> bool {
    let mut ev = ev;
    let mut pause = Duration::from_millis(1);
    loop {
        match tx.try_send(ev) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(back)) => {
                if interrupt.check().is_err() || until.is_some_and(|t| Instant::now() >= t) {
                    return false;
                }
                ev = back;
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
        }
    }
}

fn lock(s: &Mutex<ActorStatus>) -> std::sync::MutexGuard<'_, ActorStatus> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(
    runtime: &Runtime,
    inst: &mut Instance,
    rx: mpsc::Receiver<Command>,
    status: &Mutex<ActorStatus>,
    queued: &AtomicUsize,
    config: &ActorConfig,
) {
    let mut dead: Option<String> = None;
    for cmd in rx {
        match cmd {
            Command::Stop => break,
            Command::Message(_, reply) if dead.is_some() => {
                queued.fetch_sub(1, Ordering::AcqRel);
                // A new queue, empty: never blocks.
                let _ =
                    reply.send(Event::Done(Err(format!("the actor has stopped: {}", dead.as_deref().unwrap_or("")))));
            }
            Command::Snapshot(_, reply, _) if dead.is_some() => {
                let _ = reply.send(Err(ActorError::Stopped(dead.clone().unwrap_or_default())));
            }
            Command::Message(msg, reply) => {
                lock(status).state = "busy".into();
                let t0 = Instant::now();
                let interrupt = inst.interrupt();
                let (chunks, stop) = (reply.clone(), interrupt.clone());
                // The error message the handler gave, if any (see `ERROR_MARK`).
                let said = Arc::new(Mutex::new(None::<String>));
                let said_in = said.clone();
                let r = inst.message(
                    &msg,
                    config.deadline,
                    // Within the handler, the instance's interrupt carries its deadline.
                    Box::new(move |b: &[u8]| match b.strip_prefix(ERROR_MARK) {
                        Some(m) => {
                            *said_in.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(String::from_utf8_lossy(m).trim_end().to_string());
                            true
                        }
                        None => deliver(&chunks, Event::Chunk(b.to_vec()), &stop, None),
                    }),
                );
                let said = said.lock().unwrap_or_else(|e| e.into_inner()).take();
                let done = {
                    let mut s = lock(status);
                    s.messages += 1;
                    s.memory_bytes = inst.memory_size();
                    s.kv_bytes = inst.charged().saturating_sub(s.memory_bytes as u64);
                    s.context = inst.context_use();
                    match r {
                        Ok(()) => {
                            s.state = "idle".into();
                            Ok(())
                        }
                        Err(HostError::Handler { message, .. }) => {
                            s.state = "idle".into();
                            Err(said.unwrap_or(message))
                        }
                        Err(HostError::Killed) => {
                            s.state = "stopped: killed".into();
                            let why = format!("the actor was killed {:.1?} into its handler", t0.elapsed());
                            log::info!("{why}");
                            dead = Some("killed".into());
                            Err(why)
                        }
                        Err(e) => {
                            let why = format!("{e} (after {:.1?})", t0.elapsed());
                            log::warn!("actor stopped: {why}");
                            s.state = format!("stopped: {why}");
                            dead = Some(why.clone());
                            Err(why)
                        }
                    }
                };
                // Handled: the actor counts as idle (a snapshot asked for now comes right after
                // the `Done` is handed over), so that its reader, once it has the `Done`, sees
                // it idle.
                queued.fetch_sub(1, Ordering::AcqRel);
                // Not under the status's lock: listings never wait on a slow reader. The
                // handler's deadline (cleared now) still bounds the wait, and a kill ends it.
                let until = config.deadline.map(|d| t0 + d);
                let _ = deliver(&reply, Event::Done(done), &interrupt, until);
            }
            Command::Snapshot(parked, reply, state) => {
                // Withdrawn: whoever asked no longer waits for it.
                if state.compare_exchange(ASKED, TAKING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    let _ = reply.send(Snapshot::capture(runtime, inst, parked).map_err(ActorError::from));
                }
            }
        }
    }
}
