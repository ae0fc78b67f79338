//! `shoal serve`: flags become a `shoal_server::Config` and the daemon's parts (models,
//! runtimes, the registry with its journal and the actors it brings back), then
//! `shoal_server::serve` runs until SIGTERM or SIGINT. The API is in docs/abi.md ("The
//! daemon's HTTP API"); what it holds against is in docs/security.md ("The daemon").

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shoal_actor::{ActorConfig, Journal, LocalStore, Registry, SnapshotStore};
use shoal_host::Runtime;

use super::{BackendChoice, LimitArgs, models, open_device, parse_secs, parse_size};

/// The daemon's default address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7433";

/// The journal's directory in the store: a name no snapshot key can take.
pub const JOURNAL_DIR: &str = ".daemon";

/// Flags of `shoal serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to listen. Loopback by default; any other address needs --api-key.
    #[arg(long, default_value = DEFAULT_ADDR, env = "SHOAL_ADDR")]
    addr: String,
    /// The API key every request must send as `Authorization: Bearer KEY` (all but
    /// GET /health); without it, 401.
    #[arg(long, env = "SHOAL_API_KEY", hide_env_values = true, value_name = "KEY")]
    api_key: Option<String>,
    /// A host name the daemon also answers to (besides localhost, 127.0.0.1, [::1] and the
    /// address it listens on); requests naming any other Host are refused (DNS rebinding).
    #[arg(long, value_name = "NAME")]
    allow_host: Vec<String>,
    /// A web origin allowed to call the API (`http://localhost:3000`); requests from any
    /// other web page (with an Origin header) are refused.
    #[arg(long, value_name = "ORIGIN")]
    allow_origin: Vec<String>,
    /// A directory of actor modules (NAME.wasm or NAME.wat), spawned by name; repeat for
    /// several. Without one, only the built-in `chat` is spawned.
    #[arg(long, value_name = "DIR")]
    modules: Vec<PathBuf>,
    /// The largest module file read (binary units).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    max_module_bytes: u64,
    /// A model to serve: a name the host knows (default `smollm2`), a GGUF path, or
    /// NAME=PATH; repeat for several. Loaded once, shared by every actor.
    #[arg(long)]
    model: Vec<String>,
    /// The backend models run on (CUDA's engine on an NVIDIA GPU, else the CPU engine).
    #[arg(long, value_enum, default_value_t)]
    backend: BackendChoice,
    /// Where snapshots are kept (default: $XDG_DATA_HOME/shoal/snapshots, or
    /// ~/.local/share/shoal/snapshots). Its `.daemon` directory holds the actors' checkpoints
    /// and their ids; one daemon uses a store at a time.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// The longest one message may take, in seconds, host calls included; a guest that runs
    /// longer is stopped, and its actor with it.
    #[arg(long, value_name = "SECS", default_value_t = 600.0, value_parser = parse_secs)]
    deadline: f64,
    /// The longest an actor's `_initialize` may take when it is spawned, in seconds: a module
    /// whose start never returns fails its spawn instead of holding a core forever.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = parse_secs)]
    init_deadline: f64,
    /// What each actor may use, whether spawned or restored from a snapshot.
    #[command(flatten)]
    limits: LimitArgs,
    /// The most actors at once (spawned, restored and the OpenAI endpoint's); past it a
    /// spawn is refused with 429.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_actors: usize,
    /// The most actors the OpenAI endpoint keeps idle for reuse (each holds a conversation's
    /// KV cache).
    #[arg(long, value_name = "N", default_value_t = 16)]
    openai_pool: usize,
    /// The most connections open at once; past it a connection gets 503 and is closed.
    #[arg(long, value_name = "N", default_value_t = 128)]
    max_connections: usize,
    /// The largest request body (binary units).
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = parse_size)]
    max_body: u64,
    /// The longest a request's head, and then its body, may take to arrive, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = parse_secs)]
    request_timeout: f64,
    /// How often actors that handled messages are checkpointed into the store, in seconds
    /// (0: only at shutdown). A crash loses at most this much of each actor's work.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    checkpoint: f64,
    /// At shutdown (SIGTERM, SIGINT): how long requests in flight may finish, and a busy
    /// actor's checkpoint may wait, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_secs)]
    shutdown_wait: f64,
}

fn default_store() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("shoal/snapshots")
}

fn address(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("--addr {addr}: not an address (give HOST:PORT, e.g. {DEFAULT_ADDR})"))?
        .next()
        .with_context(|| format!("--addr {addr}: names no address"))
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let addr = address(&a.addr)?;
    if !(a.checkpoint.is_finite() && a.checkpoint >= 0.0) {
        anyhow::bail!("--checkpoint {}: give a number of seconds, or 0 for only at shutdown", a.checkpoint);
    }
    let api_key = a.api_key.filter(|k| !k.is_empty());
    if !addr.ip().is_loopback() && api_key.is_none() {
        return Err(shoal_server::ServerError::NoKey(addr).into());
    }
    let deadline = Duration::from_secs_f64(a.deadline);
    let mut config = shoal_server::Config::new(addr);
    config.guard = shoal_server::Guard { api_key, hosts: a.allow_host, origins: a.allow_origin };
    config.module_dirs = a.modules;
    config.max_module_bytes = a.max_module_bytes;
    config.max_connections = a.max_connections.max(1);
    config.max_body = usize::try_from(a.max_body).unwrap_or(usize::MAX);
    config.request_timeout = Duration::from_secs_f64(a.request_timeout);
    config.connection_lifetime = deadline + config.request_timeout + Duration::from_secs(60);
    config.openai_pool = a.openai_pool;
    config.checkpoint_every = (a.checkpoint > 0.0).then(|| Duration::from_secs_f64(a.checkpoint));
    config.shutdown_wait = Duration::from_secs_f64(a.shutdown_wait);
    for d in &config.module_dirs {
        anyhow::ensure!(d.is_dir(), "--modules {}: not a directory", d.display());
    }

    let store_dir = a.store.unwrap_or_else(default_store);
    std::fs::create_dir_all(&store_dir).with_context(|| format!("creating the store {}", store_dir.display()))?;
    let keyed = if config.guard.api_key.is_some() { "API key required" } else { "no API key: loopback only" };
    let load = Loader {
        backend: a.backend,
        models: a.model,
        actor_config: ActorConfig {
            deadline: Some(deadline),
            init_deadline: Some(Duration::from_secs_f64(a.init_deadline)),
            limits: a.limits.limits(None),
        },
        store_dir: store_dir.clone(),
        max_actors: a.max_actors,
    };
    let shown_store = store_dir.display().to_string();
    shoal_server::serve(
        config,
        Box::new(move || load.load().map_err(|e| format!("{e:#}"))),
        |at| eprintln!("shoal serve: bound http://{at}; loading models (GET /health answers 503 until ready)"),
        |at, app| {
            eprintln!(
                "shoal serve: listening on http://{at} (models: {}; engine: {}; snapshots in {shown_store}; {keyed})",
                app.model_names().join(", "),
                app.engine()
            );
        },
    )?;
    Ok(0)
}

/// Test-only: milliseconds `shoal serve` waits before loading its models, so that tests can
/// watch the daemon answer while it loads. Not for production use.
pub const TEST_LOAD_DELAY_ENV: &str = "SHOAL_TEST_LOAD_DELAY_MS";

/// What `shoal serve` loads once it listens.
struct Loader {
    backend: BackendChoice,
    models: Vec<String>,
    actor_config: ActorConfig,
    store_dir: PathBuf,
    max_actors: usize,
}

impl Loader {
    fn load(self) -> anyhow::Result<shoal_server::Parts> {
        if let Some(ms) = std::env::var(TEST_LOAD_DELAY_ENV).ok().and_then(|v| v.parse::<u64>().ok()) {
            std::thread::sleep(Duration::from_millis(ms.min(60_000)));
        }
        let t0 = std::time::Instant::now();
        let _spinner = Spinner::start();
        let journal = Journal::open(self.store_dir.join(JOURNAL_DIR))?;
        let device = open_device(self.backend)?;
        let (models, default_model) = models(self.models.as_slice(), super::engine_for(&device))?;
        for name in models.names() {
            // The host logs each model once loaded, with its time.
            log::info!("loading model {name}…");
            models.get(&name).map_err(anyhow::Error::msg)?;
        }
        let mut runtime = Runtime::with_models(device.clone(), models.clone())?;
        // Guests' stderr as log lines naming their actor.
        runtime.log_guest_stderr(true);
        let runtime = Arc::new(runtime);
        let store: Arc<dyn SnapshotStore> = Arc::new(LocalStore::new(&self.store_dir));
        let mut registry = Registry::new(runtime, store.clone(), self.actor_config);
        registry.set_max_actors(self.max_actors);
        registry.set_journal(journal);
        if models.engine() != shoal_engine::models::EngineKind::Cpu {
            // Actors can be moved to the CPU engine (its models load there on first use).
            let (cpu_models, _) = super::models(self.models.as_slice(), shoal_engine::models::EngineKind::Cpu)?;
            let cpu = Arc::new(shoal_gpu::Device::open(shoal_gpu::BackendKind::Cpu)?);
            let mut cpu = Runtime::with_models(cpu, cpu_models)?;
            cpu.log_guest_stderr(true);
            registry.add_runtime(Arc::new(cpu));
        }
        let chat = registry.module("chat", shoal_guests::CHAT_ACTOR)?;
        let recovered = registry.recover();
        if !recovered.is_empty() {
            let ok: Vec<String> =
                recovered.iter().filter(|r| r.result.is_ok()).map(|r| format!("{} ({})", r.id, r.module)).collect();
            eprintln!("shoal serve: brought back {} actors from the store: {}", ok.len(), ok.join(", "));
            for r in &recovered {
                if let Err(e) = &r.result {
                    eprintln!("shoal serve: actor {} ({}) not brought back: {e}", r.id, r.module);
                }
            }
        }
        log::info!("loaded in {:.1?}", t0.elapsed());
        Ok(shoal_server::Parts { registry: Arc::new(registry), store, models, chat, default_model })
    }
}

/// A spinner on stderr while the models load (indicatif draws only when stderr is a
/// terminal; otherwise the log lines say it); it clears its line when dropped.
struct Spinner(indicatif::ProgressBar);

impl Spinner {
    fn start() -> Spinner {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} loading models… {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Spinner(bar)
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
