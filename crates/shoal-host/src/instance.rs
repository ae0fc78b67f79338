//! Long-lived instances, the body of an actor: instantiated once, called once per message
//! (between calls the instance is quiescent: its call stack is empty), and captured as plain
//! data (its linear memory, its mutable globals, its sessions and KV caches) to be restored
//! later, in another process or on another backend.
//!
//! The handler ABI (`docs/abi.md`, "Actors"): the guest is a WASI reactor (its `_initialize`
//! runs once at spawn) exporting
//! - `shoal_actor_alloc(len: u32) -> u32`: room for a message of `len` bytes (0: none);
//! - `shoal_actor_message(ptr: u32, len: u32) -> i32`: handles the message the host wrote
//!   there (the guest owns and frees that room); 0 is success, anything else an error code.
//!
//! It answers with `shoal_v1.reply(ptr, len)`, as many times as it likes (a streamed reply).

use std::sync::Arc;
use std::time::Duration;

use shoal_engine::models::EngineKind;
use wasmtime::{Module, Store, TypedFunc, Val};
use wasmtime_wasi::WasiCtxBuilder;

use crate::budget::{Interrupt, Limits};
pub use crate::digest::{hex, sha256_hex};
use crate::infer::{InferCtx, InferState};
use crate::nn::{NnCtx, NnState};
use crate::rewrite::{GlobalSlot, Rewritten, expose_globals, global_export_name};
pub use crate::state::ReplySink;
use crate::{HostError, HostState, Runtime};

/// Bytes in a page of linear memory.
pub const PAGE: usize = 65536;

/// Milliseconds per tick of the runtime's epoch (the deadline's resolution).
pub const EPOCH_TICK_MS: u64 = 10;

/// A module compiled for actors: rewritten to expose its globals (see [`crate::rewrite`]).
pub struct Prepared {
    module: Module,
    rewritten: Rewritten,
    /// Hex SHA-256 of the module's original bytes (what a snapshot is tied to).
    pub sha256: String,
    /// Size of the original bytes.
    pub size: usize,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("sha256", &self.sha256).field("size", &self.size).finish_non_exhaustive()
    }
}

/// How to start an instance.
#[derive(Clone, Debug, Default)]
pub struct InstanceOptions {
    /// Arguments after the program name (the guest's configuration).
    pub args: Vec<String>,
    /// `argv[0]`.
    pub program_name: Option<String>,
    /// What the instance may use; its deadline also bounds `_initialize`.
    pub limits: Limits,
}

/// A mutable global's value: its type and its bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalValue {
    /// Its index in the module.
    pub index: u32,
    /// `i32`, `i64`, `f32`, `f64` or `v128`.
    pub ty: String,
    /// Its bits (the low 32 for `i32`/`f32`).
    pub bits: u128,
}

/// Everything an instance holds, as plain data.
#[derive(Clone, Debug)]
pub struct InstanceState {
    /// The arguments it was started with.
    pub args: Vec<String>,
    /// `argv[0]`.
    pub program_name: Option<String>,
    /// Pages of linear memory (its size).
    pub memory_pages: u64,
    /// Indices of the pages that are not all zero, ascending.
    pub pages: Vec<u32>,
    /// Those pages, one after another.
    pub page_data: Vec<u8>,
    /// Every mutable global the module defines.
    pub globals: Vec<GlobalValue>,
    /// Inference sessions and open models.
    pub infer: InferState,
    /// wasi-nn graphs and contexts.
    pub nn: NnState,
    /// The engine the caches were on when captured (`cpu`, `cuda`).
    pub backend: String,
}

impl InstanceState {
    /// Whether it holds any KV cache (a session's or a wasi-nn context's).
    pub fn has_caches(&self) -> bool {
        !self.infer.sessions.is_empty() || self.nn.contexts.iter().any(|c| c.cache.is_some())
    }

    /// The names of the models the state refers to.
    pub fn model_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.infer.opened.iter().map(|(_, n)| n.clone()).collect();
        v.extend(self.infer.sessions.iter().map(|s| s.model.clone()));
        v.extend(self.nn.graphs.iter().map(|g| g.model.clone()));
        v.extend(self.nn.contexts.iter().map(|c| c.model.clone()));
        v.sort();
        v.dedup();
        v
    }
}

/// A live instance (see the module docs).
pub struct Instance {
    store: Store<HostState>,
    instance: wasmtime::Instance,
    prepared: Arc<Prepared>,
    opts: InstanceOptions,
    /// The handler exports, looked up once.
    alloc: TypedFunc<u32, u32>,
    handle: TypedFunc<(u32, u32), i32>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").field("module", &self.prepared.sha256).finish_non_exhaustive()
    }
}

fn zero(page: &[u8]) -> bool {
    page.chunks_exact(16).all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

impl Runtime {
    /// Compiles `wasm` (binary or text) for actors.
    pub fn prepare(&self, wasm: &[u8]) -> Result<Arc<Prepared>, HostError> {
        let wasm = wat::parse_bytes(wasm).map_err(|e| HostError::Compile(e.into()))?;
        let rewritten = expose_globals(&wasm).map_err(|e| HostError::Compile(e.into()))?;
        if rewritten.imports_mutable_global {
            return Err(HostError::Compile(wasmtime::Error::msg(
                "the module imports a mutable global, whose value a snapshot could not keep",
            )));
        }
        if rewritten.memories != (1, 0) {
            return Err(HostError::NotAnActor(format!(
                "an actor defines exactly one memory and imports none (this module defines {} and imports {}): a snapshot keeps that one memory",
                rewritten.memories.0, rewritten.memories.1
            )));
        }
        let module = Module::new(&self.engine, &rewritten.wasm).map_err(HostError::Compile)?;
        for name in ["shoal_actor_alloc", "shoal_actor_message"] {
            if module.get_export(name).is_none() {
                return Err(HostError::NotAnActor(format!(
                    "the module exports no `{name}`; an actor exports `shoal_actor_alloc` and `shoal_actor_message` (the guest SDK's `export_actor!`)"
                )));
            }
        }
        Ok(Arc::new(Prepared { module, sha256: sha256_hex(&wasm), size: wasm.len(), rewritten }))
    }

    fn store(&self, opts: &InstanceOptions) -> Store<HostState> {
        let mut wasi = WasiCtxBuilder::new();
        let mut argv = vec![opts.program_name.clone().unwrap_or_else(|| "actor.wasm".into())];
        argv.extend(opts.args.iter().cloned());
        wasi.args(&argv);
        if self.log_stderr {
            wasi.stderr(crate::guest_log::GuestStderr::default());
        } else {
            wasi.inherit_stderr();
        }
        let state = HostState::new(wasi.build_p1(), self.device.clone(), self.models.clone(), &opts.limits, false);
        crate::state::bounded_store(&self.engine, state)
    }

    /// Instantiates `prepared` and runs its `_initialize`, if any, within the deadline of
    /// `opts.limits` (an `_initialize` that never returns is stopped like a handler).
    pub fn instantiate(&self, prepared: &Arc<Prepared>, opts: &InstanceOptions) -> Result<Instance, HostError> {
        let mut store = self.store(opts);
        let interrupt = store.data().interrupt.clone();
        interrupt.set_deadline(opts.limits.deadline);
        let _current = interrupt.enter();
        let instance = self
            .linker
            .instantiate(&mut store, &prepared.module)
            .map_err(|e| stopped(&interrupt, e, HostError::Instantiate))?;
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            init.call(&mut store, ()).map_err(|e| stopped(&interrupt, e, HostError::Trap))?;
        }
        interrupt.set_deadline(None);
        Instance::new(store, instance, prepared, opts.clone())
    }

    /// Brings back an instance from `state` (its `_initialize` does not run again: its
    /// effects are in the memory). Sessions are rebuilt on this runtime's models by name,
    /// whatever backend they were captured on.
    pub fn restore(&self, prepared: &Arc<Prepared>, state: &InstanceState) -> Result<Instance, HostError> {
        self.restore_with(prepared, state, &Limits::default())
    }

    /// [`Runtime::restore`] under `limits` (the snapshot's memory and caches are charged to
    /// them as a new instance's are).
    pub fn restore_with(
        &self,
        prepared: &Arc<Prepared>,
        state: &InstanceState,
        limits: &Limits,
    ) -> Result<Instance, HostError> {
        let restore = |m: String| HostError::Restore(m);
        let opts = InstanceOptions {
            args: state.args.clone(),
            program_name: state.program_name.clone(),
            limits: limits.clone(),
        };
        let mut store = self.store(&opts);
        let quota = store.data().quota.clone();
        // The KV caches (a DMA to the device on CUDA, a copy on the CPU) are rebuilt on a
        // second thread while this one instantiates the module and writes its memory: the two
        // share nothing, and a resume then costs the longer of them, not their sum.
        let t0 = std::time::Instant::now();
        let rebuild = || -> Result<((InferCtx, NnCtx), Duration), String> {
            let t = std::time::Instant::now();
            let mut infer = InferCtx::new(self.models.clone(), quota.clone());
            infer.restore(&state.infer)?;
            let mut nn = NnCtx::new(self.models.clone(), quota.clone());
            nn.restore(&state.nn)?;
            Ok(((infer, nn), t.elapsed()))
        };
        let (instance, t_instance, caches) = std::thread::scope(|s| {
            let caches = (state.has_caches() && overlap_caches(self.models.engine())).then(|| s.spawn(rebuild));
            let instance = self.restore_instance(&mut store, prepared, state);
            let t_instance = t0.elapsed();
            let caches = match caches {
                Some(h) => h.join().unwrap_or_else(|_| Err("rebuilding the KV caches panicked".into())),
                None => rebuild(),
            };
            (instance, t_instance, caches)
        });
        let instance = instance?;
        let ((infer, nn), t_caches) = caches.map_err(restore)?;
        log::debug!(
            "restore: {:.3} ms in all; instance and {} pages {:.3} ms, caches {:.3} ms",
            t0.elapsed().as_secs_f64() * 1e3,
            state.pages.len(),
            t_instance.as_secs_f64() * 1e3,
            t_caches.as_secs_f64() * 1e3
        );
        let data = store.data_mut();
        data.infer = infer;
        data.nn = nn;
        Instance::new(store, instance, prepared, opts)
    }

    /// Instantiates `prepared` in `store` and writes `state`'s memory pages and globals.
    fn restore_instance(
        &self,
        store: &mut Store<HostState>,
        prepared: &Arc<Prepared>,
        state: &InstanceState,
    ) -> Result<wasmtime::Instance, HostError> {
        let restore = |m: String| HostError::Restore(m);
        let instance = self.linker.instantiate(&mut *store, &prepared.module).map_err(HostError::Instantiate)?;
        let mem = instance
            .get_memory(&mut *store, "memory")
            .ok_or_else(|| restore("the module exports no memory named `memory`".into()))?;
        let have = mem.size(&*store);
        if state.memory_pages > have {
            mem.grow(&mut *store, state.memory_pages - have).map_err(|e| {
                restore(format!("cannot grow the memory from {have} to {} pages: {e:#}", state.memory_pages))
            })?;
        } else if state.memory_pages < have {
            return Err(restore(format!(
                "the snapshot's memory has {} pages, fewer than the module's minimum of {have}",
                state.memory_pages
            )));
        }
        if state.page_data.len() != state.pages.len() * PAGE {
            return Err(restore(format!(
                "{} pages listed but {} bytes of page data",
                state.pages.len(),
                state.page_data.len()
            )));
        }
        let data = mem.data_mut(&mut *store);
        // Pages the data segments wrote at instantiation and the snapshot holds as zero.
        let written: Box<dyn Iterator<Item = u32>> = match &prepared.rewritten.data_pages {
            Some(p) => Box::new(p.iter().copied()),
            None => Box::new(0..(data.len() / PAGE) as u32),
        };
        for p in written {
            if state.pages.binary_search(&p).is_err() {
                let at = p as usize * PAGE;
                if let Some(page) = data.get_mut(at..at + PAGE) {
                    page.fill(0);
                }
            }
        }
        // Back the pages about to be written in few calls rather than a fault per 4 KiB.
        let mut i = 0;
        while i < state.pages.len() {
            let mut n = 1;
            while i + n < state.pages.len() && state.pages[i + n] == state.pages[i] + n as u32 {
                n += 1;
            }
            let at = state.pages[i] as usize * PAGE;
            if at + n * PAGE <= data.len() {
                // SAFETY: the range lies inside the instance's committed memory (checked just
                // above), which nothing else uses during the restore.
                unsafe { shoal_memory::prefault(data[at..].as_mut_ptr(), n * PAGE) };
            }
            i += n;
        }
        for (i, &p) in state.pages.iter().enumerate() {
            let at = p as usize * PAGE;
            let page = data
                .get_mut(at..at + PAGE)
                .ok_or_else(|| restore(format!("page {p} lies past the memory's {} pages", state.memory_pages)))?;
            page.copy_from_slice(&state.page_data[i * PAGE..(i + 1) * PAGE]);
        }
        let slots = &prepared.rewritten.globals;
        if state.globals.len() != slots.len() {
            return Err(restore(format!(
                "the snapshot has {} mutable globals; the module defines {}",
                state.globals.len(),
                slots.len()
            )));
        }
        for (slot, g) in slots.iter().zip(&state.globals) {
            if slot.index != g.index || slot.ty != g.ty {
                return Err(restore(format!(
                    "global {} ({}) in the snapshot; the module's is {} ({})",
                    g.index, g.ty, slot.index, slot.ty
                )));
            }
            let global = instance
                .get_global(&mut *store, &global_export_name(g.index))
                .ok_or_else(|| restore(format!("global {} is not exported", g.index)))?;
            global.set(&mut *store, to_val(slot, g.bits)).map_err(|e| restore(format!("global {}: {e:#}", g.index)))?;
        }
        Ok(instance)
    }

    /// Starts a thread that advances the engine's epoch every [`EPOCH_TICK_MS`], so that
    /// [`Instance::message`] deadlines take effect (once per runtime; idempotent).
    pub fn start_epoch_ticker(&self) {
        self.ticker.get_or_init(|| {
            let engine = self.engine.weak();
            std::thread::Builder::new()
                .name("shoal-epoch".into())
                .spawn(move || {
                    while let Some(e) = engine.upgrade() {
                        e.increment_epoch();
                        drop(e);
                        std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
                    }
                })
                .expect("cannot start the epoch thread");
        });
    }
}

/// Whether KV caches are copied on a second thread, beside the memory (capture and restore):
/// where they go to or come from a device (the thread waits on DMA); on the CPU engine both
/// are memory copies that would only contend (and a second thread's allocator arena cannot
/// reuse the first's freed caches).
fn overlap_caches(engine: EngineKind) -> bool {
    engine != EngineKind::Cpu
}

/// What a failed entry into the guest means: a trap raised by the instance's interrupt is
/// its deadline or its kill; anything else is `other`.
pub(crate) fn stopped(interrupt: &Interrupt, e: wasmtime::Error, other: fn(wasmtime::Error) -> HostError) -> HostError {
    if matches!(e.downcast_ref::<wasmtime::Trap>(), Some(wasmtime::Trap::Interrupt)) {
        return if interrupt.is_killed() { HostError::Killed } else { HostError::Deadline };
    }
    other(e)
}

fn to_val(slot: &GlobalSlot, bits: u128) -> Val {
    match slot.ty {
        "i32" => Val::I32(bits as u32 as i32),
        "i64" => Val::I64(bits as u64 as i64),
        "f32" => Val::F32(bits as u32),
        "f64" => Val::F64(bits as u64),
        _ => Val::V128(bits.into()),
    }
}

fn bits(v: &Val) -> u128 {
    match v {
        Val::I32(x) => *x as u32 as u128,
        Val::I64(x) => *x as u64 as u128,
        Val::F32(x) => *x as u128,
        Val::F64(x) => *x as u128,
        Val::V128(x) => x.as_u128(),
        _ => 0,
    }
}

impl Instance {
    fn new(
        mut store: Store<HostState>,
        instance: wasmtime::Instance,
        prepared: &Arc<Prepared>,
        opts: InstanceOptions,
    ) -> Result<Instance, HostError> {
        let alloc = instance
            .get_typed_func::<u32, u32>(&mut store, "shoal_actor_alloc")
            .map_err(|e| HostError::NotAnActor(format!("shoal_actor_alloc: {e:#}")))?;
        let handle = instance
            .get_typed_func::<(u32, u32), i32>(&mut store, "shoal_actor_message")
            .map_err(|e| HostError::NotAnActor(format!("shoal_actor_message: {e:#}")))?;
        Ok(Instance { store, instance, prepared: prepared.clone(), opts, alloc, handle })
    }

    /// The module this instance runs.
    pub fn prepared(&self) -> &Arc<Prepared> {
        &self.prepared
    }

    /// Bytes of linear memory.
    pub fn memory_size(&mut self) -> usize {
        self.instance.get_memory(&mut self.store, "memory").map_or(0, |m| m.data_size(&self.store))
    }

    /// The switch that stops this instance from another thread ([`Interrupt::kill`]): the
    /// guest's code within a tick of the epoch, a host call between two of its pieces; the
    /// call in progress then fails with [`HostError::Killed`].
    pub fn interrupt(&self) -> Interrupt {
        self.store.data().interrupt.clone()
    }

    /// Positions its inference sessions' KV caches hold, and can hold, in all.
    pub fn context_use(&self) -> (usize, usize) {
        self.store.data().infer.context_use()
    }

    /// The bytes charged to the instance's limit now: its linear memory, device buffers,
    /// sessions' KV caches and models loaded from bytes.
    pub fn charged(&self) -> u64 {
        self.store.data().quota.budget.used()
    }

    /// The most bytes the instance held at once against its limit, and its limit.
    pub fn peak_charged(&self) -> (u64, u64) {
        let b = &self.store.data().quota.budget;
        (b.peak(), b.limit())
    }

    /// Delivers one message; every `shoal_v1.reply` of the guest goes to `sink` as it is
    /// made. With a `deadline`, a handler that runs longer, host calls included, is stopped
    /// ([`HostError::Deadline`]). After any error but [`HostError::Handler`] the instance must
    /// not be used again.
    pub fn message(&mut self, msg: &[u8], deadline: Option<Duration>, sink: ReplySink) -> Result<(), HostError> {
        let len = u32::try_from(msg.len()).map_err(|_| HostError::Handler {
            code: -1,
            message: format!("a message of {} bytes (at most 4 GiB)", msg.len()),
        })?;
        let (alloc, handle) = (self.alloc.clone(), self.handle.clone());
        let interrupt = self.interrupt();
        interrupt.set_deadline(deadline);
        let _current = interrupt.enter();
        let r = (|| {
            let ptr = alloc.call(&mut self.store, len).map_err(trap)?;
            if ptr == 0 && len > 0 {
                return Err(HostError::Handler { code: -1, message: format!("the guest has no room for {len} bytes") });
            }
            let mem = self
                .instance
                .get_memory(&mut self.store, "memory")
                .ok_or_else(|| HostError::NotAnActor("the module exports no memory named `memory`".into()))?;
            mem.write(&mut self.store, ptr as usize, msg).map_err(|_| HostError::Handler {
                code: -1,
                message: format!("shoal_actor_alloc returned {ptr:#x}, where {len} bytes do not fit"),
            })?;
            self.store.data_mut().set_reply(Some(sink));
            let code = handle.call(&mut self.store, (ptr, len)).map_err(trap)?;
            if code != 0 {
                return Err(HostError::Handler { code, message: format!("the handler returned {code}") });
            }
            Ok(())
        })();
        self.store.data_mut().set_reply(None);
        interrupt.set_deadline(None);
        r.map_err(|e| match e {
            HostError::Deadline if interrupt.is_killed() => HostError::Killed,
            e => e,
        })
    }

    /// Captures the instance (between messages). Device caches are copied to the host: in
    /// the backend's own fastest form when `parked` (a snapshot kept in this process to be
    /// restored soon, e.g. a paused actor), else in the portable form.
    pub fn capture(&mut self, parked: bool) -> Result<InstanceState, HostError> {
        let snap = |m: String| HostError::Snapshot(m);
        self.store.data().compute.check_quiescent().map_err(snap)?;
        let mem = self
            .instance
            .get_memory(&mut self.store, "memory")
            .ok_or_else(|| snap("the module exports no memory named `memory`".into()))?;
        let memory_pages = mem.size(&self.store);
        let data = self.store.data();
        let engine = data.infer.models().engine();
        let (backend, overlap) = (engine.name().to_string(), overlap_caches(engine));
        let (infer, nn) = (&data.infer, &data.nn);
        let caches = || -> Result<(InferState, NnState), HostError> {
            Ok((infer.capture(parked).map_err(|e| snap(e.to_string()))?, nn.capture(parked).map_err(snap)?))
        };
        // The caches come off the device on a second thread while this one copies the memory.
        let t0 = std::time::Instant::now();
        let ((pages, page_data), caches) = std::thread::scope(|s| {
            let cached = (data.has_caches() && overlap).then(|| s.spawn(caches));
            let (mut pages, mut page_data) = (Vec::new(), Vec::new());
            for (i, page) in mem.data(&self.store).chunks(PAGE).enumerate() {
                if !zero(page) {
                    pages.push(i as u32);
                    page_data.extend_from_slice(page);
                }
            }
            let t_memory = t0.elapsed();
            let caches = match cached {
                Some(h) => h.join().unwrap_or_else(|_| Err(snap("copying the KV caches out panicked".into()))),
                None => caches(),
            };
            log::debug!(
                "capture: {:.3} ms in all; {} of {} pages kept {:.3} ms",
                t0.elapsed().as_secs_f64() * 1e3,
                pages.len(),
                memory_pages,
                t_memory.as_secs_f64() * 1e3
            );
            ((pages, page_data), caches)
        });
        let (infer, nn) = caches?;
        let mut globals = Vec::with_capacity(self.prepared.rewritten.globals.len());
        for slot in &self.prepared.rewritten.globals {
            let g = self
                .instance
                .get_global(&mut self.store, &global_export_name(slot.index))
                .ok_or_else(|| snap(format!("global {} is not exported", slot.index)))?;
            globals.push(GlobalValue {
                index: slot.index,
                ty: slot.ty.to_string(),
                bits: bits(&g.get(&mut self.store)),
            });
        }
        Ok(InstanceState {
            args: self.opts.args.clone(),
            program_name: self.opts.program_name.clone(),
            memory_pages,
            pages,
            page_data,
            globals,
            infer,
            nn,
            backend,
        })
    }

    /// The names of the models this instance has open.
    pub fn model_names(&self) -> Vec<String> {
        let s = self.store.data();
        let mut v = s.infer.model_names();
        v.extend(s.nn.model_names());
        v.sort();
        v.dedup();
        v
    }
}

fn trap(e: wasmtime::Error) -> HostError {
    if matches!(e.downcast_ref::<wasmtime::Trap>(), Some(wasmtime::Trap::Interrupt)) {
        return HostError::Deadline;
    }
    match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        Some(exit) => HostError::Exited(exit.0),
        None => HostError::Trap(e),
    }
}
