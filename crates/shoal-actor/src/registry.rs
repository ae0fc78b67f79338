//! Many actors on one host, by id: what `shoal serve` manages. Actors share the runtime's
//! models (one copy of the weights); each can be paused (snapshotted in memory and its
//! instance dropped), resumed, snapshotted to the store, restored from it, or killed (at
//! once, even inside a handler that never returns).
//!
//! Every actor runs under the registry's [`ActorConfig`]: its limits for every instance,
//! spawned or restored, its deadline for each message, its `_initialize` deadline at spawn.
//!
//! A registry holds against hostile clients: it holds at most [`Registry::set_max_actors`]
//! actors; a reply nobody reads holds at most [`crate::REPLY_QUEUE`] parts (see
//! [`Registry::send`]); listings and kills never wait on a busy actor. With a [`Journal`]
//! ([`Registry::set_journal`]), ids never repeat within the store, and persistent actors
//! outlive the daemon ([`Registry::checkpoint`], [`Registry::recover`]; the crash policy is
//! in [`crate::journal`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, mpsc};
use std::time::{Duration, Instant};

use shoal_host::{InstanceOptions, Interrupt, Prepared, Runtime};

use crate::journal::{Checkpointed, Journal, JournalError, Record, Recovered};
use crate::{Actor, ActorConfig, ActorError, ActorStatus, Event, Snapshot, SnapshotStore, WriteReport};

/// The longest actor name.
pub const MAX_NAME: usize = 64;

/// Whether `name` may name an actor: 1 to [`MAX_NAME`] characters of `A-Z a-z 0-9 . _ -`,
/// not all digits (those are ids). The error shows the name escaped and cut.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadName(name.chars().take(80).flat_map(char::escape_default).collect()))
    }
}

/// What people know an actor by, besides its id: kept with it across pauses, resumes, moves
/// and the journal's checkpoints (a snapshot in the store holds none).
#[derive(Clone, Debug, Default)]
pub struct Labels {
    /// Its unique name ([`check_name`]).
    pub name: Option<String>,
    /// The model it was spawned with, when the spawner knows it.
    pub model: Option<String>,
}

/// The most actors a registry holds unless told otherwise ([`Registry::set_max_actors`]).
pub const DEFAULT_MAX_ACTORS: usize = 1024;

/// Checkpoints written at once by [`Registry::checkpoint`].
const CHECKPOINT_WORKERS: usize = 4;
/// How long a checkpoint waits, whatever its bound, for an idle actor to begin its snapshot,
/// and for a slot held a moment (by a send).
const IDLE_GRACE: Duration = Duration::from_secs(1);
const SLOT_GRACE: Duration = Duration::from_millis(20);

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No actor has that id.
    #[error("no actor {0} (see `shoal ps`)")]
    NoSuchActor(u64),
    /// The actor is paused (resume it first) or already running.
    #[error("actor {id} is {state}")]
    WrongState {
        /// The actor.
        id: u64,
        /// What it is.
        state: &'static str,
    },
    /// The registry holds its most actors.
    #[error("the daemon holds its most actors ({max}, --max-actors); kill one first")]
    TooManyActors {
        /// The cap ([`Registry::set_max_actors`]).
        max: usize,
    },
    /// No actor has that name.
    #[error("no actor named `{0}` (see `shoal ps`)")]
    NoSuchName(String),
    /// A name that is not one (see [`check_name`]).
    #[error("bad actor name `{0}`: a name is 1 to {MAX_NAME} characters of A-Z a-z 0-9 . _ -, not all digits")]
    BadName(String),
    /// A live actor already has that name.
    #[error("an actor named `{0}` already exists; pick another name or kill it first")]
    NameTaken(String),
    /// The daemon has no runtime on that backend.
    #[error("no runtime on backend {0}")]
    NoBackend(String),
    /// No module with that hash was loaded here.
    #[error("the snapshot is of module {0}, which this daemon has not loaded; spawn an actor of it first")]
    UnknownModule(String),
    /// The actor or its snapshot failed.
    #[error(transparent)]
    Actor(#[from] ActorError),
    /// The journal failed (an id could not be handed out, a checkpoint not deleted).
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl From<crate::SnapshotError> for RegistryError {
    fn from(e: crate::SnapshotError) -> Self {
        RegistryError::Actor(ActorError::Snapshot(e))
    }
}

enum Slot {
    Running(Actor),
    /// Shared with a checkpoint being written, which does not hold the slot.
    Paused(Arc<Snapshot>),
    /// Killed while someone else still held the entry.
    Killed,
}

/// What the running instance offers without the slot's lock (which a pause or snapshot
/// waiting on a busy actor holds).
#[derive(Clone)]
struct Live {
    interrupt: Interrupt,
    status: Arc<Mutex<ActorStatus>>,
}

impl Live {
    fn of(a: &Actor) -> Live {
        Live { interrupt: a.interrupt(), status: a.status_cell() }
    }
}

struct Entry {
    id: u64,
    module_name: String,
    module: Arc<Prepared>,
    tag: String,
    labels: Labels,
    /// When it was first spawned (seconds since the Unix epoch).
    created: u64,
    /// Checkpointed by the journal (not transient).
    persistent: bool,
    slot: Mutex<Slot>,
    /// The running instance's kill switch and status (`None` while paused or killed).
    live: Mutex<Option<Live>>,
    /// The runtime (and so the backend) it runs on: an index into `Registry::runtimes`.
    runtime: Mutex<usize>,
    /// Messages handled by its earlier instances (a pause or a move starts a new one).
    messages_before: AtomicU64,
    /// Bumped, under the slot's lock, by everything that may change the actor's state: a
    /// message (once it is in the mailbox), a pause, a resume, a move.
    changes: AtomicU64,
    /// The `changes` its checkpoint on disk holds (`None`: none yet). Locked while the
    /// checkpoint is written or deleted.
    checkpoint: Mutex<Option<u64>>,
    /// Killed: no checkpoint of it is written any more.
    gone: AtomicBool,
}

impl Entry {
    #[allow(clippy::too_many_arguments)]
    fn labelled(
        id: u64,
        module_name: &str,
        module: Arc<Prepared>,
        tag: &str,
        labels: Labels,
        created: u64,
        persistent: bool,
        slot: Slot,
    ) -> Entry {
        let live = match &slot {
            Slot::Running(a) => Some(Live::of(a)),
            Slot::Paused(_) | Slot::Killed => None,
        };
        Entry {
            id,
            module_name: module_name.to_string(),
            module,
            tag: tag.to_string(),
            labels,
            created,
            persistent,
            slot: Mutex::new(slot),
            live: Mutex::new(live),
            runtime: Mutex::new(0),
            messages_before: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            checkpoint: Mutex::new(None),
            gone: AtomicBool::new(false),
        }
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether its state may differ from its checkpoint.
    fn dirty(&self) -> bool {
        *lock(&self.checkpoint) != Some(self.changes.load(Ordering::Acquire))
    }

    /// Its running instance is replaced or dropped: counts its messages.
    fn retire(&self, a: &Actor) {
        self.messages_before.fetch_add(a.status().messages, Ordering::Relaxed);
    }
}

/// One actor in a listing.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ActorInfo {
    /// Its id.
    pub id: u64,
    /// Its name, if it was given one.
    pub name: Option<String>,
    /// The model it was spawned with, when known.
    pub model: Option<String>,
    /// Seconds since it was first spawned (for a recovered actor of an old journal: since
    /// it was recovered).
    pub age_s: u64,
    /// The module's name (`chat`, or the file it was read from).
    pub module: String,
    /// The module's SHA-256.
    pub module_sha256: String,
    /// `idle`, `busy`, `paused` or `stopped: why` (`busy` also while a pause, a resume or
    /// a snapshot of it is under way).
    pub state: String,
    /// Messages handled (by all its instances: before pauses and moves too).
    pub messages: u64,
    /// Bytes of linear memory (of the snapshot, when paused).
    pub memory_bytes: usize,
    /// Bytes of its sessions' KV caches (and device buffers) charged to its limit; when
    /// paused, its snapshot's KV caches.
    pub kv_bytes: u64,
    /// Positions its sessions' KV caches hold (when paused: the tokens its snapshot's
    /// sessions evaluated), in all.
    pub context_used: usize,
    /// Positions its sessions' KV caches can hold, in all.
    pub context_size: usize,
    /// Who made it (`api`, `openai`…).
    pub tag: String,
    /// The backend its models run on (`cuda`, `cpu`).
    pub backend: String,
    /// Checkpointed by the daemon's journal (false: a transient actor).
    pub persistent: bool,
}

/// What a pause or resume did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Timing {
    /// The actor.
    pub id: u64,
    /// Milliseconds it took.
    pub ms: f64,
    /// Bytes of memory pages and KV cache kept (pause) or brought back (resume).
    pub bytes: usize,
}

/// The actors of a host (see the module docs).
pub struct Registry {
    /// The first is the default; others are backends actors can be moved to.
    runtimes: Vec<Arc<Runtime>>,
    store: Arc<dyn SnapshotStore>,
    config: ActorConfig,
    actors: Mutex<BTreeMap<u64, Arc<Entry>>>,
    /// Modules by the hash snapshots name them by.
    modules: Mutex<HashMap<String, Known>>,
    /// Ids without a journal.
    next: AtomicU64,
    journal: Option<Journal>,
    max_actors: usize,
    /// Actors held, and spawns or restores under way (each holds its seat).
    seats: AtomicUsize,
}

/// A module the registry has loaded.
struct Known {
    name: String,
    /// Its bytes (the binary a text module compiles to), to compile it for another runtime
    /// and to keep it in the journal.
    source: Arc<Vec<u8>>,
    /// Compiled, by runtime index.
    compiled: HashMap<usize, Arc<Prepared>>,
}

/// A place under the cap, taken before an actor is made; given back when dropped unless
/// the actor is added.
struct Seat<'a>(Option<&'a AtomicUsize>);

impl Seat<'_> {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The lock, if nobody holds it now.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

fn snapshot_bytes(s: &Snapshot) -> usize {
    s.memory_bytes()
        + s.state.infer.sessions.iter().map(|x| x.kv.bytes()).sum::<usize>()
        + s.state.nn.contexts.iter().filter_map(|c| c.cache.as_ref()).map(|c| c.2.bytes()).sum::<usize>()
}

fn busy(wait: Duration) -> String {
    format!("busy for more than {wait:.1?}; its previous checkpoint is kept")
}

impl Registry {
    /// A registry running actors on `runtime`, snapshots kept in `store`; at most
    /// [`DEFAULT_MAX_ACTORS`] actors, ids from 1 in memory (until [`Registry::set_journal`]).
    pub fn new(runtime: Arc<Runtime>, store: Arc<dyn SnapshotStore>, config: ActorConfig) -> Registry {
        Registry {
            runtimes: vec![runtime],
            store,
            config,
            actors: Mutex::new(BTreeMap::new()),
            modules: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            journal: None,
            max_actors: DEFAULT_MAX_ACTORS,
            seats: AtomicUsize::new(0),
        }
    }

    /// The runtime actors start on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtimes[0]
    }

    /// Adds a runtime whose models run on another backend, which actors can be moved to
    /// ([`Registry::move_to`]); modules are compiled for it as they are for the first.
    pub fn add_runtime(&mut self, runtime: Arc<Runtime>) {
        self.runtimes.push(runtime);
    }

    /// The most actors held at once (paused ones included): a spawn or restore past it
    /// fails with [`RegistryError::TooManyActors`] before any instance is made.
    pub fn set_max_actors(&mut self, max: usize) {
        self.max_actors = max;
    }

    /// From now on, ids come from `journal` (never repeating within its store, across
    /// restarts), and persistent actors can be checkpointed to it and recovered from it.
    /// Give it before spawning.
    pub fn set_journal(&mut self, journal: Journal) {
        let top = lock(&self.actors).keys().next_back().copied();
        if let Some(top) = top
            && let Err(e) = journal.keep_above(top)
        {
            log::warn!("journal: {e}");
        }
        self.journal = Some(journal);
    }

    /// The journal, if one was given.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    fn backend_of(&self, i: usize) -> String {
        self.runtimes[i].models().engine().name().to_string()
    }

    /// A seat under the cap, or [`RegistryError::TooManyActors`].
    fn seat(&self) -> Result<Seat<'_>, RegistryError> {
        let max = self.max_actors;
        self.seats
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| RegistryError::TooManyActors { max })?;
        Ok(Seat(Some(&self.seats)))
    }

    /// The module `module` compiled for runtime `i` (compiled there on first use).
    fn module_for(&self, module: &Arc<Prepared>, i: usize) -> Result<Arc<Prepared>, RegistryError> {
        let unknown = || RegistryError::UnknownModule(module.sha256.clone());
        let source = {
            let modules = lock(&self.modules);
            let known = modules.get(&module.sha256).ok_or_else(unknown)?;
            if let Some(p) = known.compiled.get(&i) {
                return Ok(p.clone());
            }
            known.source.clone()
        };
        let p = self.runtimes[i].prepare(&source).map_err(ActorError::from)?;
        lock(&self.modules).get_mut(&module.sha256).ok_or_else(unknown)?.compiled.insert(i, p.clone());
        Ok(p)
    }

    /// Compiles `wasm` (a binary, or text) for actors once per content (the binary's hash
    /// is its key), naming it `name`.
    pub fn module(&self, name: &str, wasm: &[u8]) -> Result<Arc<Prepared>, RegistryError> {
        // Text is kept as the binary it compiles to (what snapshots name by its hash); text
        // that does not parse fails in `prepare`, with its error.
        let binary = wat::parse_bytes(wasm).map_or_else(|_| wasm.to_vec(), |b| b.into_owned());
        let sha = shoal_host::instance::sha256_hex(&binary);
        if let Some(p) = lock(&self.modules).get(&sha).and_then(|k| k.compiled.get(&0).cloned()) {
            return Ok(p);
        }
        let p = self.runtimes[0].prepare(&binary).map_err(ActorError::from)?;
        let known =
            Known { name: name.to_string(), source: Arc::new(binary), compiled: HashMap::from([(0, p.clone())]) };
        lock(&self.modules).entry(p.sha256.clone()).or_insert(known);
        Ok(p)
    }

    fn entry(&self, id: u64) -> Result<Arc<Entry>, RegistryError> {
        lock(&self.actors).get(&id).cloned().ok_or(RegistryError::NoSuchActor(id))
    }

    fn new_id(&self) -> Result<u64, RegistryError> {
        match &self.journal {
            Some(j) => Ok(j.next_id()?),
            None => Ok(self.next.fetch_add(1, Ordering::Relaxed)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        seat: Seat<'_>,
        module_name: &str,
        module: Arc<Prepared>,
        tag: &str,
        actor: Actor,
        persistent: bool,
        labels: Labels,
    ) -> Result<u64, RegistryError> {
        // On failure the actor is dropped (killed) and the seat given back.
        let id = self.new_id()?;
        actor.set_id(id);
        let created = now_secs();
        let e = Entry::labelled(id, module_name, module, tag, labels, created, persistent, Slot::Running(actor));
        let mut actors = lock(&self.actors);
        if let Some(n) = &e.labels.name
            && actors.values().any(|x| x.labels.name.as_ref() == Some(n))
        {
            return Err(RegistryError::NameTaken(n.clone()));
        }
        actors.insert(id, Arc::new(e));
        seat.keep();
        Ok(id)
    }

    /// Fails when `labels` names an actor wrongly, or with a name a live actor has.
    fn check_labels(&self, labels: &Labels) -> Result<(), RegistryError> {
        if let Some(n) = &labels.name {
            check_name(n)?;
            if lock(&self.actors).values().any(|x| x.labels.name.as_ref() == Some(n)) {
                return Err(RegistryError::NameTaken(n.clone()));
            }
        }
        Ok(())
    }

    /// The id of the actor `id_or_name` names: an id (digits) or a name.
    pub fn resolve(&self, id_or_name: &str) -> Result<u64, RegistryError> {
        if !id_or_name.is_empty() && id_or_name.bytes().all(|b| b.is_ascii_digit()) {
            return id_or_name.parse().map_err(|_| RegistryError::NoSuchName(id_or_name.chars().take(32).collect()));
        }
        let actors = lock(&self.actors);
        actors.values().find(|e| e.labels.name.as_deref() == Some(id_or_name)).map(|e| e.id).ok_or_else(|| {
            RegistryError::NoSuchName(id_or_name.chars().take(80).flat_map(char::escape_default).collect())
        })
    }

    /// Who made actor `id` (its tag) and whether it is persistent.
    pub fn owner(&self, id: u64) -> Result<(String, bool), RegistryError> {
        let e = self.entry(id)?;
        Ok((e.tag.clone(), e.persistent))
    }

    /// Starts an actor of `module` with `opts` (their limits replaced by the registry's);
    /// returns its id. An `_initialize` that runs past the registry's init deadline fails
    /// it. The actor is persistent: checkpointed by the journal, if there is one.
    pub fn spawn(
        &self,
        module_name: &str,
        module: Arc<Prepared>,
        opts: InstanceOptions,
        tag: &str,
    ) -> Result<u64, RegistryError> {
        self.spawn_as(module_name, module, opts, tag, true, Labels::default())
    }

    /// Like [`Registry::spawn`], with a name and a model to show: a bad name, or one a live
    /// actor has, fails before any instance is made.
    pub fn spawn_labelled(
        &self,
        module_name: &str,
        module: Arc<Prepared>,
        opts: InstanceOptions,
        tag: &str,
        labels: Labels,
    ) -> Result<u64, RegistryError> {
        self.check_labels(&labels)?;
        self.spawn_as(module_name, module, opts, tag, true, labels)
    }

    /// Like [`Registry::spawn`], but the actor is transient: never checkpointed, so never
    /// recovered after a restart (the OpenAI endpoint's pool).
    pub fn spawn_transient(
        &self,
        module_name: &str,
        module: Arc<Prepared>,
        opts: InstanceOptions,
        tag: &str,
    ) -> Result<u64, RegistryError> {
        self.spawn_as(module_name, module, opts, tag, false, Labels::default())
    }

    fn spawn_as(
        &self,
        module_name: &str,
        module: Arc<Prepared>,
        mut opts: InstanceOptions,
        tag: &str,
        persistent: bool,
        labels: Labels,
    ) -> Result<u64, RegistryError> {
        let seat = self.seat()?;
        opts.limits = shoal_host::Limits { deadline: self.config.init(), ..self.config.limits.clone() };
        let actor = Actor::spawn(self.runtimes[0].clone(), module.clone(), opts, self.config.clone())?;
        self.add(seat, module_name, module, tag, actor, persistent, labels)
    }

    /// Every actor, by id. Never waits on a busy actor: an actor whose pause, resume or
    /// snapshot is under way is shown from its running instance's status, as `busy`.
    pub fn list(&self) -> Vec<ActorInfo> {
        let entries: Vec<(u64, Arc<Entry>)> = lock(&self.actors).iter().map(|(k, v)| (*k, v.clone())).collect();
        let now = now_secs();
        entries
            .into_iter()
            .map(|(id, e)| {
                let before = e.messages_before.load(Ordering::Relaxed);
                let (state, messages, memory_bytes, kv_bytes, context) = match try_lock(&e.slot) {
                    Some(slot) => match &*slot {
                        Slot::Running(a) => {
                            let s = a.status();
                            (s.state, before + s.messages, s.memory_bytes, s.kv_bytes, s.context)
                        }
                        Slot::Paused(s) => {
                            let memory = s.state.memory_pages as usize * 65536;
                            let kv = snapshot_bytes(s).saturating_sub(s.memory_bytes()) as u64;
                            let sessions = &s.state.infer.sessions;
                            let used = sessions.iter().map(|x| x.history.len().min(x.context)).sum();
                            let size = sessions.iter().map(|x| x.context).sum();
                            ("paused".to_string(), before, memory, kv, (used, size))
                        }
                        Slot::Killed => ("stopped: killed".to_string(), before, 0, 0, (0, 0)),
                    },
                    None => match lock(&e.live).clone() {
                        Some(live) => {
                            let s = lock(&live.status).clone();
                            let state = if s.state == "idle" { "busy".to_string() } else { s.state };
                            (state, before + s.messages, s.memory_bytes, s.kv_bytes, s.context)
                        }
                        None => ("busy".to_string(), before, 0, 0, (0, 0)),
                    },
                };
                ActorInfo {
                    id,
                    name: e.labels.name.clone(),
                    model: e.labels.model.clone(),
                    age_s: now.saturating_sub(e.created),
                    module: e.module_name.clone(),
                    module_sha256: e.module.sha256.clone(),
                    state,
                    messages,
                    memory_bytes,
                    kv_bytes,
                    context_used: context.0,
                    context_size: context.1,
                    tag: e.tag.clone(),
                    backend: self.backend_of(*lock(&e.runtime)),
                    persistent: e.persistent,
                }
            })
            .collect()
    }

    /// Puts `msg` in actor `id`'s mailbox; the reply streams through the receiver, which
    /// holds at most [`crate::REPLY_QUEUE`] parts not yet read: the actor waits for its
    /// reader beyond that (until its deadline or a kill). Dropping the receiver abandons the
    /// reply: the guest's next `reply` fails, telling it to stop.
    pub fn send(&self, id: u64, msg: Vec<u8>) -> Result<mpsc::Receiver<Event>, RegistryError> {
        let e = self.entry(id)?;
        let slot = lock(&e.slot);
        match &*slot {
            Slot::Running(a) => {
                let rx = a.send(msg)?;
                e.changed();
                Ok(rx)
            }
            Slot::Paused(_) => Err(RegistryError::WrongState { id, state: "paused; resume it first" }),
            Slot::Killed => Err(RegistryError::WrongState { id, state: "killed" }),
        }
    }

    /// Snapshots actor `id` in memory and drops its instance (its memory and KV caches are
    /// freed; the weights stay loaded for the others).
    pub fn pause(&self, id: u64) -> Result<Timing, RegistryError> {
        let e = self.entry(id)?;
        let mut slot = lock(&e.slot);
        let t0 = Instant::now();
        let snap = match &*slot {
            Slot::Running(a) => a.park()?,
            Slot::Paused(_) => return Err(RegistryError::WrongState { id, state: "already paused" }),
            Slot::Killed => return Err(RegistryError::WrongState { id, state: "killed" }),
        };
        let bytes = snapshot_bytes(&snap);
        *lock(&e.live) = None;
        if let Slot::Running(a) = std::mem::replace(&mut *slot, Slot::Paused(Arc::new(snap))) {
            e.retire(&a);
            a.stop();
        }
        e.changed();
        Ok(Timing { id, ms: t0.elapsed().as_secs_f64() * 1e3, bytes })
    }

    /// Brings a paused actor back.
    pub fn resume(&self, id: u64) -> Result<Timing, RegistryError> {
        let e = self.entry(id)?;
        let mut slot = lock(&e.slot);
        let t0 = Instant::now();
        let Slot::Paused(snap) = &*slot else {
            return Err(RegistryError::WrongState { id, state: "not paused" });
        };
        let bytes = snapshot_bytes(snap);
        let i = *lock(&e.runtime);
        let module = self.module_for(&e.module, i)?;
        let actor = Actor::restore(self.runtimes[i].clone(), module, (**snap).clone(), self.config.clone())?;
        actor.set_id(id);
        *lock(&e.live) = Some(Live::of(&actor));
        *slot = Slot::Running(actor);
        e.changed();
        Ok(Timing { id, ms: t0.elapsed().as_secs_f64() * 1e3, bytes })
    }

    /// Writes actor `id`'s snapshot to the store under `key` (a running actor is snapshotted
    /// between messages and goes on).
    pub fn snapshot(&self, id: u64, key: &str) -> Result<(WriteReport, f64), RegistryError> {
        let e = self.entry(id)?;
        let t0 = Instant::now();
        // Parked: device caches come off by DMA and are converted as they are written.
        let snap = match &*lock(&e.slot) {
            Slot::Running(a) => Arc::new(a.park()?),
            Slot::Paused(s) => s.clone(),
            Slot::Killed => return Err(RegistryError::WrongState { id, state: "killed" }),
        };
        let r = self.store.put(key, &snap)?;
        Ok((r, t0.elapsed().as_secs_f64() * 1e3))
    }

    /// Starts a new (persistent) actor from the store's snapshot `key`; returns its id.
    pub fn restore(&self, key: &str, tag: &str) -> Result<(u64, f64), RegistryError> {
        self.restore_labelled(key, tag, Labels::default())
    }

    /// Like [`Registry::restore`], the new actor labelled (a snapshot holds no name).
    pub fn restore_labelled(&self, key: &str, tag: &str, labels: Labels) -> Result<(u64, f64), RegistryError> {
        self.check_labels(&labels)?;
        let t0 = Instant::now();
        let seat = self.seat()?;
        let snap = self.store.get(key)?;
        let (name, module) = lock(&self.modules)
            .get(&snap.module_sha256)
            .and_then(|k| Some((k.name.clone(), k.compiled.get(&0)?.clone())))
            .ok_or_else(|| RegistryError::UnknownModule(snap.module_sha256.clone()))?;
        let actor = Actor::restore(self.runtimes[0].clone(), module.clone(), snap, self.config.clone())?;
        let id = self.add(seat, &name, module, tag, actor, true, labels)?;
        Ok((id, t0.elapsed().as_secs_f64() * 1e3))
    }

    /// Moves actor `id` to the runtime whose models run on `backend` (`cpu`, `cuda`):
    /// snapshot, restore there (its models loaded there by name), stop the old instance.
    /// Its conversation goes on exactly; a paused actor just resumes there later.
    pub fn move_to(&self, id: u64, backend: &str) -> Result<Timing, RegistryError> {
        let to = (0..self.runtimes.len()).find(|&i| self.backend_of(i) == backend).ok_or_else(|| {
            let have: Vec<String> = (0..self.runtimes.len()).map(|i| self.backend_of(i)).collect();
            RegistryError::NoBackend(format!("{backend} (this daemon has {})", have.join(", ")))
        })?;
        let e = self.entry(id)?;
        let mut slot = lock(&e.slot);
        let t0 = Instant::now();
        let module = self.module_for(&e.module, to)?;
        let bytes = match &*slot {
            Slot::Paused(s) => snapshot_bytes(s),
            Slot::Killed => return Err(RegistryError::WrongState { id, state: "killed" }),
            Slot::Running(a) => {
                let snap = a.snapshot()?;
                let bytes = snapshot_bytes(&snap);
                let moved = Actor::restore(self.runtimes[to].clone(), module, snap, self.config.clone())?;
                moved.set_id(id);
                *lock(&e.live) = Some(Live::of(&moved));
                if let Slot::Running(old) = std::mem::replace(&mut *slot, Slot::Running(moved)) {
                    e.retire(&old);
                    old.stop();
                }
                bytes
            }
        };
        *lock(&e.runtime) = to;
        e.changed();
        Ok(Timing { id, ms: t0.elapsed().as_secs_f64() * 1e3, bytes })
    }

    /// Stops actor `id` now, even inside a handler that never returns (or one waiting on a
    /// reader), and forgets it: its checkpoint in the journal, if any, is deleted (an error
    /// here is that deletion's: the actor is gone from the registry all the same).
    pub fn kill(&self, id: u64) -> Result<(), RegistryError> {
        let e = lock(&self.actors).remove(&id).ok_or(RegistryError::NoSuchActor(id))?;
        self.seats.fetch_sub(1, Ordering::AcqRel);
        e.gone.store(true, Ordering::Release);
        // First the switch: a pause or a snapshot waiting on this actor's busy handler holds
        // the slot's lock, and lets it go once the handler is stopped.
        if let Some(l) = lock(&e.live).take() {
            l.interrupt.kill();
        }
        let running = match std::mem::replace(&mut *lock(&e.slot), Slot::Killed) {
            Slot::Running(a) => Some(a),
            Slot::Paused(_) | Slot::Killed => None,
        };
        if let Some(a) = running {
            a.kill();
        }
        if let (true, Some(j)) = (e.persistent, &self.journal) {
            // After a checkpoint of it being written, if any; none is written after this.
            let mut done = lock(&e.checkpoint);
            j.remove_checkpoint(id)?;
            *done = None;
        }
        Ok(())
    }

    /// The snapshot keys in the store.
    pub fn snapshots(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self.store.list()?)
    }

    /// Writes every persistent actor's checkpoint to the journal (nothing without one);
    /// with `changed_only`, only those that handled a message, or were paused, resumed or
    /// moved, since their last checkpoint (the others are left out of the result). A
    /// running actor is snapshotted between messages: one still busy with messages after
    /// `wait` is not waited for further, and keeps its previous checkpoint (an error in its
    /// result); an idle one is snapshotted even when `wait` is zero. A few actors are
    /// written at once; the result is by id.
    pub fn checkpoint(&self, changed_only: bool, wait: Duration) -> Vec<Checkpointed> {
        let Some(j) = &self.journal else { return Vec::new() };
        let todo: Vec<Arc<Entry>> =
            lock(&self.actors).values().filter(|e| e.persistent && (!changed_only || e.dirty())).cloned().collect();
        let next = AtomicUsize::new(0);
        let out = Mutex::new(Vec::with_capacity(todo.len()));
        std::thread::scope(|s| {
            for _ in 0..CHECKPOINT_WORKERS.min(todo.len()) {
                s.spawn(|| {
                    while let Some(e) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let result = self.checkpoint_one(j, e, wait);
                        if let Err(why) = &result {
                            log::debug!("checkpoint of actor {}: {why}", e.id);
                        }
                        lock(&out).push(Checkpointed { id: e.id, result });
                    }
                });
            }
        });
        let mut out = out.into_inner().unwrap_or_else(|e| e.into_inner());
        out.sort_by_key(|c| c.id);
        out
    }

    fn checkpoint_one(&self, j: &Journal, e: &Entry, wait: Duration) -> Result<usize, String> {
        let t0 = Instant::now();
        let until = t0 + wait;
        // The slot, briefly: a pause or resume under way holds it no longer than `wait`.
        let (changes, paused, snap) = {
            let slot = loop {
                if let Some(s) = try_lock(&e.slot) {
                    break s;
                }
                if t0.elapsed() >= wait.max(SLOT_GRACE) {
                    return Err(busy(wait));
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            // Every change counted so far is in the state captured (a message is counted
            // once in the mailbox, before this request).
            let changes = e.changes.load(Ordering::Acquire);
            match &*slot {
                Slot::Running(a) => {
                    // An idle actor begins it at once, whatever `wait`; a busy one within it.
                    let left = until.saturating_duration_since(Instant::now());
                    let start = if a.is_idle() { left.max(IDLE_GRACE) } else { left };
                    (changes, false, Err((a.request(true).map_err(|x| x.to_string())?, start)))
                }
                Slot::Paused(s) => (changes, true, Ok(s.clone())),
                Slot::Killed => return Err("killed".into()),
            }
        };
        let snap = match snap {
            Ok(s) => s,
            // Waited for without the slot's lock: sends, listings and kills go on.
            Err((pending, start)) => match pending.wait(start) {
                Ok(Some(s)) => Arc::new(s),
                Ok(None) => return Err(busy(wait)),
                Err(x) => return Err(format!("{x}; its previous checkpoint is kept")),
            },
        };
        let source = lock(&self.modules).get(&e.module.sha256).map(|k| k.source.clone()).ok_or_else(|| {
            format!("its module {} was not loaded through the registry; it cannot be checkpointed", e.module.sha256)
        })?;
        let mut done = lock(&e.checkpoint);
        if e.gone.load(Ordering::Acquire) {
            return Err("killed while its checkpoint was taken; nothing written".into());
        }
        if done.is_some_and(|d| d > changes) {
            // A newer checkpoint was written meanwhile.
            return Ok(0);
        }
        let record = Record {
            id: e.id,
            module_name: e.module_name.clone(),
            module_sha256: e.module.sha256.clone(),
            tag: e.tag.clone(),
            paused,
            name: e.labels.name.clone(),
            model: e.labels.model.clone(),
            created: Some(e.created),
        };
        let write = || -> Result<usize, JournalError> {
            j.write_module(&record.module_sha256, &source)?;
            j.write_checkpoint(&record, &snap)
        };
        let bytes = write().map_err(|x| format!("{x}; its previous checkpoint is kept"))?;
        *done = Some(changes);
        Ok(bytes)
    }

    /// Brings back every actor checkpointed in the journal (nothing without one), with its
    /// id and tag: running ones running, paused ones paused; their modules are compiled from
    /// the journal and registered by name (so snapshots of them can be restored). One whose
    /// checkpoint cannot be read or restored is reported, and left on disk as it is; the
    /// others come back still. Recovered actors count toward the cap.
    pub fn recover(&self) -> Vec<Recovered> {
        let Some(j) = &self.journal else { return Vec::new() };
        let listing = match j.list() {
            Ok(l) => l,
            Err(e) => return vec![Recovered { id: 0, module: String::new(), result: Err(e.to_string()) }],
        };
        for p in &listing.leftovers {
            let _ = std::fs::remove_file(p);
        }
        for id in listing.orphans {
            if !lock(&self.actors).contains_key(&id) {
                j.remove_orphan(id);
            }
        }
        let mut out = Vec::with_capacity(listing.records.len());
        for id in listing.records {
            let mut module = String::new();
            let result = self.recover_one(j, id, &mut module).map_err(|e| {
                log::warn!("actor {id} was not recovered: {e}");
                e.to_string()
            });
            out.push(Recovered { id, module, result });
        }
        out
    }

    fn recover_one(&self, j: &Journal, id: u64, name: &mut String) -> Result<(), RegistryError> {
        if lock(&self.actors).contains_key(&id) {
            return Err(RegistryError::WrongState { id, state: "already in the registry" });
        }
        let rec = j.read_record(id)?;
        name.clone_from(&rec.module_name);
        let seat = self.seat()?;
        let wasm = j.read_module(&rec.module_sha256)?;
        let module = self.module(&rec.module_name, &wasm)?;
        let snap = j.read_checkpoint(id)?;
        snap.check(&self.runtimes[0], &module)?;
        let slot = if rec.paused {
            Slot::Paused(Arc::new(snap))
        } else {
            let a = Actor::restore(self.runtimes[0].clone(), module.clone(), snap, self.config.clone())?;
            a.set_id(id);
            Slot::Running(a)
        };
        j.keep_above(id)?;
        let labels = Labels { name: rec.name.clone().filter(|n| check_name(n).is_ok()), model: rec.model.clone() };
        let created = rec.created.unwrap_or_else(now_secs);
        let e = Entry::labelled(id, &rec.module_name, module, &rec.tag, labels, created, true, slot);
        // As on disk: clean until it changes.
        *lock(&e.checkpoint) = Some(0);
        let mut actors = lock(&self.actors);
        if actors.contains_key(&id) {
            return Err(RegistryError::WrongState { id, state: "already in the registry" });
        }
        if let Some(n) = &e.labels.name
            && actors.values().any(|x| x.labels.name.as_ref() == Some(n))
        {
            return Err(RegistryError::NameTaken(n.clone()));
        }
        actors.insert(id, Arc::new(e));
        seat.keep();
        Ok(())
    }
}
