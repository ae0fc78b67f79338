//! Many actors on one host, by id: what `shoal serve` manages. Actors share the runtime's
//! models (one copy of the weights); each can be paused (snapshotted in memory and its
//! instance dropped), resumed, snapshotted to the store, restored from it, or killed (at
//! once, even inside a handler that never returns).
//!
//! Every actor runs under the registry's [`ActorConfig`]: its limits for every instance,
//! spawned or restored, its deadline for each message, its `_initialize` deadline at spawn.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Instant;

use shoal_host::{InstanceOptions, Interrupt, Prepared, Runtime};

use crate::{Actor, ActorConfig, ActorError, Event, Snapshot, SnapshotStore, WriteReport};

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
    /// The daemon has no runtime on that backend.
    #[error("no runtime on backend {0}")]
    NoBackend(String),
    /// No module with that hash was loaded here.
    #[error("the snapshot is of module {0}, which this daemon has not loaded; spawn an actor of it first")]
    UnknownModule(String),
    /// The actor or its snapshot failed.
    #[error(transparent)]
    Actor(#[from] ActorError),
}

impl From<crate::SnapshotError> for RegistryError {
    fn from(e: crate::SnapshotError) -> Self {
        RegistryError::Actor(ActorError::Snapshot(e))
    }
}

enum Slot {
    Running(Actor),
    Paused(Box<Snapshot>),
    /// Killed while someone else still held the entry.
    Killed,
}

struct Entry {
    module_name: String,
    module: Arc<Prepared>,
    tag: String,
    slot: Mutex<Slot>,
    /// The running instance's kill switch, reachable without the slot's lock (which a pause
    /// or snapshot waiting on a busy actor holds).
    interrupt: Mutex<Option<Interrupt>>,
    /// The runtime (and so the backend) it runs on: an index into `Registry::runtimes`.
    runtime: Mutex<usize>,
}

/// One actor in a listing.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ActorInfo {
    /// Its id.
    pub id: u64,
    /// The module's name (`chat`, or the file it was read from).
    pub module: String,
    /// The module's SHA-256.
    pub module_sha256: String,
    /// `idle`, `busy`, `paused` or `stopped: why`.
    pub state: String,
    /// Messages handled.
    pub messages: u64,
    /// Bytes of linear memory (of the snapshot, when paused).
    pub memory_bytes: usize,
    /// Who made it (`api`, `openai`…).
    pub tag: String,
    /// The backend its models run on (`cuda`, `cpu`).
    pub backend: String,
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
    next: AtomicU64,
}

/// A module the registry has loaded.
struct Known {
    name: String,
    /// Its bytes, to compile it for another runtime.
    source: Arc<Vec<u8>>,
    /// Compiled, by runtime index.
    compiled: HashMap<usize, Arc<Prepared>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn snapshot_bytes(s: &Snapshot) -> usize {
    s.memory_bytes()
        + s.state.infer.sessions.iter().map(|x| x.kv.bytes()).sum::<usize>()
        + s.state.nn.contexts.iter().filter_map(|c| c.cache.as_ref()).map(|c| c.2.bytes()).sum::<usize>()
}

impl Registry {
    /// A registry running actors on `runtime`, snapshots kept in `store`.
    pub fn new(runtime: Arc<Runtime>, store: Arc<dyn SnapshotStore>, config: ActorConfig) -> Registry {
        Registry {
            runtimes: vec![runtime],
            store,
            config,
            actors: Mutex::new(BTreeMap::new()),
            modules: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
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

    fn backend_of(&self, i: usize) -> String {
        self.runtimes[i].models().engine().name().to_string()
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

    /// Compiles `wasm` for actors once per content (a binary's hash is its key; text is
    /// compiled again each time), naming it `name`.
    pub fn module(&self, name: &str, wasm: &[u8]) -> Result<Arc<Prepared>, RegistryError> {
        let sha = shoal_host::instance::sha256_hex(wasm);
        if let Some(p) = lock(&self.modules).get(&sha).and_then(|k| k.compiled.get(&0).cloned()) {
            return Ok(p);
        }
        let p = self.runtimes[0].prepare(wasm).map_err(ActorError::from)?;
        let known = Known {
            name: name.to_string(),
            source: Arc::new(wasm.to_vec()),
            compiled: HashMap::from([(0, p.clone())]),
        };
        lock(&self.modules).insert(p.sha256.clone(), known);
        Ok(p)
    }

    fn entry(&self, id: u64) -> Result<Arc<Entry>, RegistryError> {
        lock(&self.actors).get(&id).cloned().ok_or(RegistryError::NoSuchActor(id))
    }

    fn add(&self, module_name: &str, module: Arc<Prepared>, tag: &str, actor: Actor) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let e = Entry {
            module_name: module_name.to_string(),
            module,
            tag: tag.to_string(),
            interrupt: Mutex::new(Some(actor.interrupt())),
            slot: Mutex::new(Slot::Running(actor)),
            runtime: Mutex::new(0),
        };
        lock(&self.actors).insert(id, Arc::new(e));
        id
    }

    /// Starts an actor of `module` with `opts` (their limits replaced by the registry's);
    /// returns its id. An `_initialize` that runs past the registry's init deadline fails it.
    pub fn spawn(
        &self,
        module_name: &str,
        module: Arc<Prepared>,
        mut opts: InstanceOptions,
        tag: &str,
    ) -> Result<u64, RegistryError> {
        opts.limits = shoal_host::Limits { deadline: self.config.init(), ..self.config.limits.clone() };
        let actor = Actor::spawn(self.runtimes[0].clone(), module.clone(), opts, self.config.clone())?;
        Ok(self.add(module_name, module, tag, actor))
    }

    /// Every actor, by id.
    pub fn list(&self) -> Vec<ActorInfo> {
        let entries: Vec<(u64, Arc<Entry>)> = lock(&self.actors).iter().map(|(k, v)| (*k, v.clone())).collect();
        entries
            .into_iter()
            .map(|(id, e)| {
                let (state, messages, memory_bytes) = match &*lock(&e.slot) {
                    Slot::Running(a) => {
                        let s = a.status();
                        (s.state, s.messages, s.memory_bytes)
                    }
                    Slot::Paused(s) => ("paused".to_string(), 0, s.state.memory_pages as usize * 65536),
                    Slot::Killed => ("stopped: killed".to_string(), 0, 0),
                };
                ActorInfo {
                    id,
                    module: e.module_name.clone(),
                    module_sha256: e.module.sha256.clone(),
                    state,
                    messages,
                    memory_bytes,
                    tag: e.tag.clone(),
                    backend: self.backend_of(*lock(&e.runtime)),
                }
            })
            .collect()
    }

    /// Puts `msg` in actor `id`'s mailbox; the reply streams through the receiver.
    pub fn send(&self, id: u64, msg: Vec<u8>) -> Result<mpsc::Receiver<Event>, RegistryError> {
        let e = self.entry(id)?;
        let slot = lock(&e.slot);
        match &*slot {
            Slot::Running(a) => Ok(a.send(msg)?),
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
        *lock(&e.interrupt) = None;
        if let Slot::Running(a) = std::mem::replace(&mut *slot, Slot::Paused(Box::new(snap))) {
            a.stop();
        }
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
        *lock(&e.interrupt) = Some(actor.interrupt());
        *slot = Slot::Running(actor);
        Ok(Timing { id, ms: t0.elapsed().as_secs_f64() * 1e3, bytes })
    }

    /// Writes actor `id`'s snapshot to the store under `key` (a running actor is snapshotted
    /// between messages and goes on).
    pub fn snapshot(&self, id: u64, key: &str) -> Result<(WriteReport, f64), RegistryError> {
        let e = self.entry(id)?;
        let t0 = Instant::now();
        // Parked: device caches come off by DMA and are converted as they are written.
        let snap = match &*lock(&e.slot) {
            Slot::Running(a) => a.park()?,
            Slot::Paused(s) => (**s).clone(),
            Slot::Killed => return Err(RegistryError::WrongState { id, state: "killed" }),
        };
        let r = self.store.put(key, &snap)?;
        Ok((r, t0.elapsed().as_secs_f64() * 1e3))
    }

    /// Starts a new actor from the store's snapshot `key`; returns its id.
    pub fn restore(&self, key: &str, tag: &str) -> Result<(u64, f64), RegistryError> {
        let t0 = Instant::now();
        let snap = self.store.get(key)?;
        let (name, module) = lock(&self.modules)
            .get(&snap.module_sha256)
            .and_then(|k| Some((k.name.clone(), k.compiled.get(&0)?.clone())))
            .ok_or_else(|| RegistryError::UnknownModule(snap.module_sha256.clone()))?;
        let actor = Actor::restore(self.runtimes[0].clone(), module.clone(), snap, self.config.clone())?;
        let id = self.add(&name, module, tag, actor);
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
                *lock(&e.interrupt) = Some(moved.interrupt());
                if let Slot::Running(old) = std::mem::replace(&mut *slot, Slot::Running(moved)) {
                    old.stop();
                }
                bytes
            }
        };
        *lock(&e.runtime) = to;
        Ok(Timing { id, ms: t0.elapsed().as_secs_f64() * 1e3, bytes })
    }

    /// Stops actor `id` now, even inside a handler that never returns, and forgets it.
    pub fn kill(&self, id: u64) -> Result<(), RegistryError> {
        let e = lock(&self.actors).remove(&id).ok_or(RegistryError::NoSuchActor(id))?;
        // First the switch: a pause or a snapshot waiting on this actor's busy handler holds
        // the slot's lock, and lets it go once the handler is stopped.
        if let Some(i) = lock(&e.interrupt).take() {
            i.kill();
        }
        let running = match std::mem::replace(&mut *lock(&e.slot), Slot::Killed) {
            Slot::Running(a) => Some(a),
            Slot::Paused(_) | Slot::Killed => None,
        };
        if let Some(a) = running {
            a.kill();
        }
        Ok(())
    }

    /// The snapshot keys in the store.
    pub fn snapshots(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self.store.list()?)
    }
}
