//! An actor: one Wasm instance on its own thread, and a mailbox. Messages are handled one
//! at a time, in order; snapshots are taken between them, when the instance is quiescent.
//!
//! An actor can be stopped at any time, even inside a handler that never returns:
//! [`Actor::kill`] (and dropping it) fires the instance's [`Interrupt`], which stops guest
//! code within a tick of the epoch and a host call between two of its pieces.

use std::sync::mpsc;
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
    /// The handler failed on this message (returned an error code); the actor lives on.
    #[error("the actor's handler failed: {0}")]
    Failed(String),
}

/// How a handler says why it failed: a reply part that begins with these bytes (NAK,
/// `error`, the unit separator) is not part of the reply but the error's message, reported
/// in [`Event::Done`] when the handler then returns an error code (and dropped if it returns
/// 0). Without one, the error is "the handler returned CODE".
pub const ERROR_MARK: &[u8] = b"\x15error\x1f";

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
    Message(Vec<u8>, mpsc::Sender<Event>),
    /// A snapshot; `true`: device caches kept in the backend's own form (see [`Actor::park`]).
    Snapshot(bool, mpsc::Sender<Result<Snapshot, ActorError>>),
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
}

/// A running actor (see the module docs). Dropping it kills it ([`Actor::kill`]); to let it
/// finish the messages in its mailbox first, [`Actor::stop`] it.
pub struct Actor {
    tx: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    status: Arc<Mutex<ActorStatus>>,
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
        let status =
            Arc::new(Mutex::new(ActorStatus { state: "idle".into(), messages: 0, memory_bytes: inst.memory_size() }));
        let st = status.clone();
        let thread = std::thread::Builder::new()
            .name("shoal-actor".into())
            .spawn(move || run(&runtime, &mut inst, rx, &st, &config))
            .map_err(|e| ActorError::Stopped(format!("cannot start a thread: {e}")))?;
        Ok(Actor { tx, thread: Some(thread), status, prepared, interrupt })
    }

    /// Puts `msg` in the mailbox; the reply streams through the receiver.
    pub fn send(&self, msg: Vec<u8>) -> Result<mpsc::Receiver<Event>, ActorError> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Command::Message(msg, tx)).map_err(|_| self.stopped())?;
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
        let (tx, rx) = mpsc::channel();
        self.tx.send(Command::Snapshot(parked, tx)).map_err(|_| self.stopped())?;
        rx.recv().map_err(|_| self.stopped())?
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

fn lock(s: &Mutex<ActorStatus>) -> std::sync::MutexGuard<'_, ActorStatus> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(
    runtime: &Runtime,
    inst: &mut Instance,
    rx: mpsc::Receiver<Command>,
    status: &Mutex<ActorStatus>,
    config: &ActorConfig,
) {
    let mut dead: Option<String> = None;
    for cmd in rx {
        match cmd {
            Command::Stop => break,
            Command::Message(_, reply) if dead.is_some() => {
                let _ =
                    reply.send(Event::Done(Err(format!("the actor has stopped: {}", dead.as_deref().unwrap_or("")))));
            }
            Command::Snapshot(_, reply) if dead.is_some() => {
                let _ = reply.send(Err(ActorError::Stopped(dead.clone().unwrap_or_default())));
            }
            Command::Message(msg, reply) => {
                lock(status).state = "busy".into();
                let t0 = Instant::now();
                let chunks = reply.clone();
                // The error message the handler gave, if any (see `ERROR_MARK`).
                let said = Arc::new(Mutex::new(None::<String>));
                let said_in = said.clone();
                let r = inst.message(
                    &msg,
                    config.deadline,
                    Box::new(move |b: &[u8]| match b.strip_prefix(ERROR_MARK) {
                        Some(m) => {
                            *said_in.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(String::from_utf8_lossy(m).trim_end().to_string());
                        }
                        None => {
                            let _ = chunks.send(Event::Chunk(b.to_vec()));
                        }
                    }),
                );
                let said = said.lock().unwrap_or_else(|e| e.into_inner()).take();
                let mut s = lock(status);
                s.messages += 1;
                s.memory_bytes = inst.memory_size();
                match r {
                    Ok(()) => {
                        s.state = "idle".into();
                        let _ = reply.send(Event::Done(Ok(())));
                    }
                    Err(HostError::Handler { message, .. }) => {
                        s.state = "idle".into();
                        let _ = reply.send(Event::Done(Err(said.unwrap_or(message))));
                    }
                    Err(HostError::Killed) => {
                        s.state = "stopped: killed".into();
                        let why = format!("the actor was killed {:.1?} into its handler", t0.elapsed());
                        log::info!("{why}");
                        let _ = reply.send(Event::Done(Err(why)));
                        dead = Some("killed".into());
                    }
                    Err(e) => {
                        let why = format!("{e} (after {:.1?})", t0.elapsed());
                        log::warn!("actor stopped: {why}");
                        s.state = format!("stopped: {why}");
                        let _ = reply.send(Event::Done(Err(why.clone())));
                        dead = Some(why);
                    }
                }
            }
            Command::Snapshot(parked, reply) => {
                let _ = reply.send(Snapshot::capture(runtime, inst, parked).map_err(ActorError::from));
            }
        }
    }
}
