//! The Wasmtime embedding of shoal: engine configuration, the linker, and the
//! `shoal_v1` host functions (the ABI, documented in `docs/abi.md`).
//!
//! A [`Runtime`] owns one Wasmtime engine whose memories are created by
//! `shoal-memory` and announced to one compute [`Device`]; it runs `wasm32-wasip1`
//! guests that import WASI and `shoal_v1`.
//!
//! Guests are not trusted: every instance runs under [`Limits`] (memory in all, context
//! length, replies, a deadline), charged before anything is allocated (see [`budget`]), and
//! can be stopped from another thread through its [`Interrupt`].
//!
//! Modules: [`error`] and [`guest`] are the leaves every ABI uses (errors and their codes;
//! reading guest memory); [`budget`] the limits; `compute`, `infer` and [`nn`] the ABIs, each
//! with its own state; `state` the instance's state that aggregates them; [`instance`] the
//! long-lived instances of actors.
//!
//! ```no_run
//! use std::sync::Arc;
//! use shoal_gpu::{BackendKind, Device};
//! use shoal_host::{RunOptions, Runtime};
//! let device = Arc::new(Device::open(BackendKind::Cpu).unwrap());
//! let runtime = Runtime::new(device).unwrap();
//! let wasm = std::fs::read("guest.wasm").unwrap();
//! let outcome = runtime.run(&wasm, &RunOptions::default()).unwrap();
//! println!("exit code {}", outcome.exit_code);
//! ```

pub mod budget;
mod compute;
pub mod digest;
pub mod embed;
pub mod error;
mod guest;
pub mod guest_log;
mod infer;
pub mod instance;
pub mod models;
pub mod nn;
pub mod nn_wit;
pub mod rewrite;
mod state;
mod v1;

use std::sync::{Arc, OnceLock};

pub use budget::{Interrupt, Limits};
pub use compute::ABI_VERSION;
pub use error::{GuestError, Status};
pub use infer::{InferState, SessionState};
pub use instance::{GlobalValue, Instance, InstanceOptions, InstanceState, Prepared};
pub use models::{
    DEFAULT_MODEL, DEFAULT_MODEL_FILE, LoadedModel, Models, default_model_path, engine_for, model_dirs, user_models_dir,
};
pub use nn::{ContextState, GraphState, NnState};
use shoal_gpu::Device;
use shoal_memory::GuestMemoryCreator;
pub use state::{HostState, ReplySink};
pub use v1::{GuestStats, MODULE};
use wasmtime::{Config, Engine, Linker, Module};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

/// Errors of the runtime itself (guest errors are status codes, not these).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The module could not be compiled.
    #[error("cannot compile the module: {0:#}")]
    Compile(wasmtime::Error),
    /// The module could not be instantiated (a missing import, a memory too large…).
    #[error("cannot instantiate the module: {0:#}")]
    Instantiate(wasmtime::Error),
    /// The guest trapped.
    #[error("the guest trapped: {0:#}")]
    Trap(wasmtime::Error),
    /// The module has no `_start` (not a WASI command).
    #[error("the module exports no `_start` function; shoal runs WASI commands (wasm32-wasip1 binaries)")]
    NoStart,
    /// Setting up the engine failed.
    #[error("cannot set up the engine: {0:#}")]
    Engine(wasmtime::Error),
    /// The module is not an actor (it lacks the handler exports).
    #[error("not an actor: {0}")]
    NotAnActor(String),
    /// The message handler returned an error code (the instance is still usable).
    #[error("the guest's handler failed ({code}): {message}")]
    Handler {
        /// What the handler returned (-1: the host could not deliver the message).
        code: i32,
        /// Details.
        message: String,
    },
    /// The handler (or the run, or `_initialize`) ran past its deadline and was stopped,
    /// host calls included.
    #[error("the guest ran past its deadline and was stopped (--deadline)")]
    Deadline,
    /// The instance was killed while it ran.
    #[error("the guest was killed")]
    Killed,
    /// The guest called `proc_exit` inside a handler.
    #[error("the guest exited with code {0} inside its handler")]
    Exited(i32),
    /// The instance cannot be captured now.
    #[error("cannot snapshot the instance: {0}")]
    Snapshot(String),
    /// A captured state cannot be restored here.
    #[error("cannot restore the instance: {0}")]
    Restore(String),
}

/// How to run a guest.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Capture the guest's stdout instead of passing it through.
    pub capture_stdout: bool,
    /// The program name the guest sees as `argv[0]`.
    pub program_name: Option<String>,
    /// Measure the growth of resident memory across each operation (reads
    /// `/proc/self/statm` twice per call: a few microseconds; off for benchmarks).
    pub measure_rss: bool,
    /// What the guest may use (memory, context, a deadline over the whole run).
    pub limits: Limits,
    /// Host directories the guest may open, read-write, as (host path, guest path): WasmEdge's
    /// `--dir HOST:GUEST`. None by default.
    pub dirs: Vec<(std::path::PathBuf, String)>,
    /// The guest's environment variables (none by default).
    pub env: Vec<(String, String)>,
}

/// The error a wasi-nn call last returned to a guest that then trapped (a guest that
/// unwraps it, say): the context of [`HostError::Trap`]'s error, so that a caller can say
/// what went wrong instead of printing the guest's backtrace.
#[derive(Clone, Debug)]
pub struct NnFailure(pub String);

impl std::fmt::Display for NnFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "after the wasi-nn error `{}`", self.0)
    }
}

/// What a run ended with.
#[derive(Debug)]
pub struct RunOutcome {
    /// The guest's exit code (0 when `_start` returned).
    pub exit_code: i32,
    /// What the guest did through the shoal ABI.
    pub stats: GuestStats,
    /// The guest's stdout, when captured.
    pub stdout: Option<Vec<u8>>,
}

/// Per-instance state of a component guest: WASI (preview 2) and `wasi:nn`.
struct ComponentState {
    wasi: wasmtime_wasi::WasiCtx,
    table: wasmtime::component::ResourceTable,
    nn: nn_wit::NnWit,
    limiter: budget::MemoryLimiter,
    interrupt: Interrupt,
}

impl state::Bounded for ComponentState {
    fn limiter(&mut self) -> &mut budget::MemoryLimiter {
        &mut self.limiter
    }
    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
}

impl wasmtime_wasi::WasiView for ComponentState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// WASI for a command run with `opts`: its arguments, environment and directories, stdin
/// and stderr inherited, stdout inherited or captured (the pipe returned). A directory that
/// cannot be opened is an error.
fn wasi_for(opts: &RunOptions) -> Result<(WasiCtxBuilder, Option<MemoryOutputPipe>), HostError> {
    use wasmtime_wasi::FsPerms;
    let mut wasi = WasiCtxBuilder::new();
    let mut argv = vec![opts.program_name.clone().unwrap_or_else(|| "guest.wasm".into())];
    argv.extend(opts.args.iter().cloned());
    wasi.args(&argv).inherit_stderr().inherit_stdin();
    wasi.envs(&opts.env);
    for (host, guest) in &opts.dirs {
        wasi.preopened_dir(host, guest, FsPerms::ReadWrite).map_err(|e| {
            HostError::Instantiate(e.context(format!("cannot open the directory {} for the guest", host.display())))
        })?;
    }
    let pipe = opts.capture_stdout.then(|| MemoryOutputPipe::new(64 << 20));
    match &pipe {
        Some(p) => {
            wasi.stdout(p.clone());
        }
        None => {
            wasi.inherit_stdout();
        }
    }
    Ok((wasi, pipe))
}

/// Whether `wasm` is a component (rather than a core module).
pub fn is_component(wasm: &[u8]) -> bool {
    wasmparser::Parser::is_component(wasm)
}

/// One engine, one device, the linker with WASI and `shoal_v1`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    device: Arc<Device>,
    models: Arc<Models>,
    /// The epoch thread (deadlines and kills), started with the runtime.
    ticker: OnceLock<()>,
    /// The linker of component guests (WASI preview 2 and `wasi:nn`), made on first use.
    components: OnceLock<Result<wasmtime::component::Linker<ComponentState>, String>>,
    /// Instances' stderr goes to the log ([`guest_log`]) instead of the process's stderr.
    log_stderr: bool,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("device", &self.device).finish_non_exhaustive()
    }
}

impl Runtime {
    /// A runtime whose guest memories are registered with `device`, with no models.
    pub fn new(device: Arc<Device>) -> Result<Runtime, HostError> {
        Self::with_models(device, Arc::new(Models::new()))
    }

    /// A runtime whose guests can open the models of `models` by name.
    pub fn with_models(device: Arc<Device>, models: Arc<Models>) -> Result<Runtime, HostError> {
        let mut config = Config::new();
        GuestMemoryCreator::configure(&mut config, device.clone());
        // Deadlines and kills: every store checks its interrupt at each tick of the epoch.
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(HostError::Engine)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut HostState| &mut s.wasi)
            .map_err(HostError::Engine)?;
        compute::add_to_linker(&mut linker).map_err(HostError::Engine)?;
        infer::add_to_linker(&mut linker).map_err(HostError::Engine)?;
        nn::add_to_linker(&mut linker).map_err(HostError::Engine)?;
        let runtime = Runtime {
            engine,
            linker,
            device,
            models,
            ticker: OnceLock::new(),
            components: OnceLock::new(),
            log_stderr: false,
        };
        runtime.start_epoch_ticker();
        Ok(runtime)
    }

    /// From now on, the stderr of instances made by [`Runtime::instantiate`] and restores
    /// is logged line by line (target `shoal_host::guest`, at info, in the writing thread's
    /// span) instead of written to the process's stderr (see [`guest_log`]).
    pub fn log_guest_stderr(&mut self, on: bool) {
        self.log_stderr = on;
    }

    /// The models guests open by name.
    pub fn models(&self) -> &Arc<Models> {
        &self.models
    }

    /// The device guests compute on.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Compiles a module (binary or text).
    pub fn compile(&self, wasm: &[u8]) -> Result<Module, HostError> {
        Module::new(&self.engine, wasm).map_err(HostError::Compile)
    }

    /// Compiles and runs a WASI command to completion: a core module (`wasm32-wasip1`,
    /// with `shoal_v1` and `wasi_ephemeral_nn`) or a component (`wasm32-wasip2`, with
    /// `wasi:cli/run` and `wasi:nn`).
    pub fn run(&self, wasm: &[u8], opts: &RunOptions) -> Result<RunOutcome, HostError> {
        if is_component(wasm) {
            return self.run_component(wasm, opts);
        }
        let module = self.compile(wasm)?;
        self.run_module(&module, opts)
    }

    /// Runs a compiled WASI command to completion.
    pub fn run_module(&self, module: &Module, opts: &RunOptions) -> Result<RunOutcome, HostError> {
        let (mut wasi, pipe) = wasi_for(opts)?;
        let state =
            HostState::new(wasi.build_p1(), self.device.clone(), self.models.clone(), &opts.limits, opts.measure_rss);
        let mut store = state::bounded_store(&self.engine, state);
        let interrupt = store.data().interrupt.clone();
        // The deadline covers the whole run: instantiation, `_start`, every host call. Without
        // one nothing can stop a command's host calls, so they run unchecked and whole (a
        // GEMM in one piece).
        interrupt.set_deadline(opts.limits.deadline);
        let _current = opts.limits.deadline.is_some().then(|| interrupt.enter());
        let instance = self
            .linker
            .instantiate(&mut store, module)
            .map_err(|e| instance::stopped(&interrupt, e, HostError::Instantiate))?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start").map_err(|_| HostError::NoStart)?;
        let exit_code = match start.call(&mut store, ()) {
            Ok(()) => 0,
            Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => exit.0,
                None => {
                    let e = match store.data_mut().nn.last_error.take() {
                        Some(nn) => e.context(NnFailure(nn)),
                        None => e,
                    };
                    return Err(instance::stopped(&interrupt, e, HostError::Trap));
                }
            },
        };
        let stats = store.data_mut().stats();
        drop(store);
        Ok(RunOutcome { exit_code, stats, stdout: pipe.map(|p| p.contents().to_vec()) })
    }

    /// Runs a component command (`wasi:cli/run`) to completion; it can import `wasi:nn`.
    pub fn run_component(&self, wasm: &[u8], opts: &RunOptions) -> Result<RunOutcome, HostError> {
        use wasmtime::component::{Component, Linker as ComponentLinker, ResourceTable};
        let component = Component::new(&self.engine, wasm).map_err(HostError::Compile)?;
        let linker = self
            .components
            .get_or_init(|| {
                let mut l = ComponentLinker::<ComponentState>::new(&self.engine);
                wasmtime_wasi::p2::add_to_linker_sync(&mut l).map_err(|e| format!("{e:#}"))?;
                nn_wit::add_to_linker(&mut l, |s| nn_wit::NnView::new(&mut s.nn, &mut s.table))
                    .map_err(|e| format!("{e:#}"))?;
                Ok(l)
            })
            .as_ref()
            .map_err(|e| HostError::Engine(wasmtime::Error::msg(e.clone())))?;
        let (mut wasi, pipe) = wasi_for(opts)?;
        let quota = budget::Quota::new(&opts.limits);
        let state = ComponentState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            nn: nn_wit::NnWit::new(self.models.clone(), quota.clone()),
            limiter: budget::MemoryLimiter::new(quota.budget.clone()),
            interrupt: Interrupt::new(),
        };
        let mut store = state::bounded_store(&self.engine, state);
        let interrupt = store.data().interrupt.clone();
        interrupt.set_deadline(opts.limits.deadline);
        let _current = opts.limits.deadline.is_some().then(|| interrupt.enter());
        let command = wasmtime_wasi::p2::bindings::sync::Command::instantiate(&mut store, &component, linker)
            .map_err(|e| instance::stopped(&interrupt, e, HostError::Instantiate))?;
        let exit_code = match command.wasi_cli_run().call_run(&mut store) {
            Ok(Ok(())) => 0,
            Ok(Err(())) => 1,
            Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => exit.0,
                None => return Err(instance::stopped(&interrupt, e, HostError::Trap)),
            },
        };
        drop(store);
        let stats = GuestStats { peak_charged_bytes: quota.budget.peak(), ..GuestStats::default() };
        Ok(RunOutcome { exit_code, stats, stdout: pipe.map(|p| p.contents().to_vec()) })
    }

    /// Instantiates a module and calls one export `() -> ()` (tests, reactors).
    pub fn call_export(&self, wasm: &[u8], name: &str) -> Result<GuestStats, HostError> {
        let module = self.compile(wasm)?;
        let state = HostState::new(
            WasiCtxBuilder::new().build_p1(),
            self.device.clone(),
            self.models.clone(),
            &Limits::default(),
            true,
        );
        let mut store = state::bounded_store(&self.engine, state);
        let instance = self.linker.instantiate(&mut store, &module).map_err(HostError::Instantiate)?;
        let f = instance.get_typed_func::<(), ()>(&mut store, name).map_err(HostError::Instantiate)?;
        f.call(&mut store, ()).map_err(HostError::Trap)?;
        Ok(store.data_mut().stats())
    }
}
