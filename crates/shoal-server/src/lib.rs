//! shoal's daemon: many actors on one host, managed over HTTP (docs/abi.md, "The daemon's
//! HTTP API"), with OpenAI's chat endpoint answered by chat actors. It is built to face
//! hostile clients (docs/security.md, "The daemon"):
//!
//! - **HTTP on hyper** (axum's router, tokio): request heads capped ([`Config::max_header_bytes`])
//!   and due within [`Config::request_timeout`], bodies capped ([`Config::max_body`]) and read
//!   whole before anything is done, connections capped ([`Config::max_connections`]; past
//!   the cap a connection gets a 503 and is closed), and every connection's whole life bounded
//!   ([`Config::connection_lifetime`]). One request per connection.
//! - **Who may talk to it** ([`guard`]): Host and Origin checked on every request, and an API
//!   key when one is set; [`serve`] refuses to listen beyond loopback without one.
//! - **What may be spawned** ([`modules`]): `chat`, or modules by name from configured
//!   directories; clients never name a path.
//! - **Streams with backpressure** ([`stream`]): a slow reader slows its actor, never grows the
//!   daemon; an abandoned stream cancels its work.
//! - **Actors outlive the daemon**: on SIGTERM or SIGINT every persistent actor is checkpointed
//!   into the store's journal (`shoal_actor::journal`) and a daemon started on the same store
//!   brings them back with their ids; between, checkpoints are taken every
//!   [`Config::checkpoint_every`] of actors that changed.
//!
//! Memory a client can make the daemon hold (without the actors, whose memory is each
//! actor's `--max-memory`): at most [`Config::max_connections`] requests, each its body
//! ([`Config::max_body`]) and head ([`Config::max_header_bytes`]), and per streamed reply
//! the actor's reply queue and a few lines.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use shoal_actor::{Registry, SnapshotStore};
use shoal_host::{Models, Prepared};

pub mod api;
pub mod body;
mod chatargs;
pub mod error;
pub mod guard;
mod listen;
pub mod metrics;
pub mod modules;
pub mod openai;
pub mod requests;
pub mod stream;

pub use error::ApiError;
pub use guard::Guard;
pub use modules::ModuleDirs;

/// How the daemon serves.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Who may talk to it.
    pub guard: Guard,
    /// The directories modules are spawned from, by name.
    pub module_dirs: Vec<PathBuf>,
    /// The largest module file read.
    pub max_module_bytes: u64,
    /// The most connections open at once.
    pub max_connections: usize,
    /// The largest request body.
    pub max_body: usize,
    /// The largest request head (request line and headers); at least 8 KiB.
    pub max_header_bytes: usize,
    /// The longest a request's head, and then its body, may take to arrive.
    pub request_timeout: Duration,
    /// The longest a connection lives, reply included (a client that stops reading is cut
    /// off then): longer than the longest message an actor may handle.
    pub connection_lifetime: Duration,
    /// The most idle chat actors the OpenAI endpoint keeps.
    pub openai_pool: usize,
    /// How often actors that changed are checkpointed (`None`: only at shutdown).
    pub checkpoint_every: Option<Duration>,
    /// At shutdown, how long requests in flight may go on, and then how long a busy actor's
    /// checkpoint may wait for its handler.
    pub shutdown_wait: Duration,
}

impl Config {
    /// The defaults, listening on `addr`.
    pub fn new(addr: SocketAddr) -> Config {
        Config {
            addr,
            guard: Guard::default(),
            module_dirs: Vec::new(),
            max_module_bytes: 64 << 20,
            max_connections: 128,
            max_body: 8 << 20,
            max_header_bytes: 16 << 10,
            request_timeout: Duration::from_secs(30),
            connection_lifetime: Duration::from_secs(660),
            openai_pool: 16,
            checkpoint_every: Some(Duration::from_secs(60)),
            shutdown_wait: Duration::from_secs(10),
        }
    }
}

/// What the daemon serves: a registry (with its journal and recovered actors, if any) and the
/// loaded models.
pub struct Parts {
    /// The actors.
    pub registry: Arc<Registry>,
    /// The store snapshots are kept in (the registry's).
    pub store: Arc<dyn SnapshotStore>,
    /// The models actors share.
    pub models: Arc<Models>,
    /// The built-in chat actor, compiled.
    pub chat: Arc<Prepared>,
    /// The model a request that names none gets.
    pub default_model: String,
}

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Listening beyond loopback needs an API key.
    #[error(
        "refusing to listen on {0} without an API key: anyone who can reach it could run code and read \
         snapshots; give --api-key KEY (or SHOAL_API_KEY), or listen on 127.0.0.1"
    )]
    NoKey(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The runtime or the signals could not be set up.
    #[error("cannot start the server: {0}")]
    Io(#[from] std::io::Error),
    /// The models or the registry could not be loaded (the daemon stops).
    #[error("{0}")]
    Load(String),
}

/// What loads the daemon's parts (models, runtimes, registry) while it already listens.
pub type Loader = Box<dyn FnOnce() -> Result<Parts, String> + Send>;

/// The daemon's state, shared by the handlers.
pub struct App {
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: Arc<dyn SnapshotStore>,
    pub(crate) models: Arc<Models>,
    pub(crate) chat: Arc<Prepared>,
    pub(crate) default_model: String,
    pub(crate) modules: ModuleDirs,
    pub(crate) pool: openai::Pool,
    pub(crate) pool_max: usize,
    pub(crate) body: body::BodyLimits,
    pub(crate) metrics: Arc<metrics::Metrics>,
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    let path = error::shown(uri.path(), 128);
    ApiError::new(StatusCode::NOT_FOUND, format!("no such endpoint: {path} (see docs/abi.md, the daemon's HTTP API)"))
}

async fn not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    let path = error::shown(uri.path(), 128);
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{method} {path} is not part of the API"))
}

/// What every request but `GET /health` and `GET /metrics` gets while the models load.
async fn loading() -> axum::response::Response {
    use axum::response::IntoResponse;
    let e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the daemon is loading its models and answers nothing else yet; retry in a moment (GET /health says \
         when it is ready)",
    )
    .code("loading");
    let mut r = e.into_response();
    r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
    r
}

async fn loading_health() -> (StatusCode, axum::Json<serde_json::Value>) {
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"ok": false, "status": "loading"})))
}

async fn loading_metrics(
    axum::extract::State(m): axum::extract::State<Arc<metrics::Metrics>>,
) -> axum::response::Response {
    metrics::answer(m.render(&metrics::Gauges::default()))
}

/// The routes while the models load: `/health` says so (503), `/metrics` has the counters,
/// everything else is a 503.
fn loading_router(guard: Arc<Guard>, m: Arc<metrics::Metrics>) -> Router {
    Router::new()
        .route("/health", get(loading_health))
        .route("/metrics", get(loading_metrics))
        .fallback(loading)
        .with_state(m.clone())
        .layer(axum::middleware::from_fn_with_state(guard, guard::layer))
        .layer(axum::middleware::from_fn_with_state(m, requests::layer))
}

/// The routes.
fn router(app: Arc<App>, guard: Arc<Guard>) -> Router {
    let m = app.metrics.clone();
    Router::new()
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/v1/actors", get(api::list).post(api::spawn))
        .route("/v1/actors/{id}", delete(api::kill))
        .route("/v1/actors/{id}/messages", post(api::message))
        .route("/v1/actors/{id}/pause", post(api::pause))
        .route("/v1/actors/{id}/resume", post(api::resume))
        .route("/v1/actors/{id}/snapshot", post(api::snapshot))
        .route("/v1/actors/{id}/move", post(api::move_to))
        .route("/v1/snapshots", get(api::snapshots))
        .route("/v1/snapshots/{key}", delete(api::delete_snapshot))
        .route("/v1/snapshots/{key}/restore", post(api::restore))
        .route("/v1/modules", get(api::modules))
        .route("/v1/models", get(api::models))
        .route("/v1/models/{id}", get(api::model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings::embeddings))
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(guard, guard::layer))
        .layer(axum::middleware::from_fn_with_state(m, requests::layer))
}

/// Listens on the configured address at once (a busy port fails here, before anything is
/// loaded), calls `bound` with the address, then runs `load` on a worker thread while
/// `GET /health` answers 503 `{"status": "loading"}` and every other request a 503; once
/// loaded, serves the API and calls `ready`. Serves until SIGTERM or SIGINT, then
/// checkpoints every persistent actor (see the module docs). A failed load stops it.
pub fn serve(
    config: Config,
    load: Loader,
    bound: impl FnOnce(SocketAddr),
    ready: impl FnOnce(SocketAddr, &App),
) -> Result<(), ServerError> {
    let mut guard = config.guard.clone();
    if !config.addr.ip().is_loopback() {
        if guard.api_key.is_none() {
            return Err(ServerError::NoKey(config.addr));
        }
        match config.addr.ip() {
            ip if ip.is_unspecified() => {}
            std::net::IpAddr::V4(ip) => guard.hosts.push(ip.to_string()),
            std::net::IpAddr::V6(ip) => guard.hosts.push(format!("[{ip}]")),
        }
    }
    guard.hosts.iter_mut().for_each(|h| *h = h.to_ascii_lowercase());
    guard.origins.iter_mut().for_each(|o| *o = o.to_ascii_lowercase());
    let guard = Arc::new(guard);
    let m = Arc::new(metrics::Metrics::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shoal-serve")
        // Requests wait on actors on blocking threads: one per connection, and spare.
        .max_blocking_threads(config.max_connections * 2 + 16)
        .build()?;
    let loading = loading_router(guard.clone(), m.clone());
    let make = {
        let config = config.clone();
        move |parts: Parts| {
            let app = Arc::new(App {
                registry: parts.registry,
                store: parts.store,
                models: parts.models,
                chat: parts.chat,
                default_model: parts.default_model,
                modules: ModuleDirs::new(config.module_dirs.clone(), config.max_module_bytes),
                pool: openai::Pool::default(),
                pool_max: config.openai_pool,
                body: body::BodyLimits { max: config.max_body, timeout: config.request_timeout },
                metrics: m,
            });
            let routes = router(app.clone(), guard);
            (app, routes)
        }
    };
    rt.block_on(listen::run(config, loading, load, make, bound, ready))
}

impl App {
    /// The names of the models served.
    pub fn model_names(&self) -> Vec<String> {
        self.models.names()
    }

    /// The name of the engine the models run on.
    pub fn engine(&self) -> String {
        self.models.engine().name().to_string()
    }
}
