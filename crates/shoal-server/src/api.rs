//! The actor and snapshot endpoints (docs/abi.md, "The daemon's HTTP API"). Requests are
//! typed (unknown fields and wrong types are 400s naming the field); the registry's work,
//! which blocks, runs on tokio's blocking threads.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use shoal_actor::Labels;
use shoal_host::InstanceOptions;

use crate::App;
use crate::body::{read, read_json};
use crate::error::ApiError;
use crate::stream;

/// The most arguments of a spawn, and the longest one.
const MAX_ARGS: usize = 256;
const MAX_ARG_BYTES: usize = 4096;
/// The longest tag.
const MAX_TAG: usize = 64;

/// The tag of the OpenAI endpoint's actors (reserved: a client cannot spawn with it).
pub const POOL_TAG: &str = "openai";

/// Runs `f` on a blocking thread, in the request's span.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the daemon's worker failed: {e}")))
}

/// The actor an id or a name from the path names, for a client: one of the OpenAI
/// endpoint's actors is refused (403), whatever is asked of it.
fn id(app: &App, n: &str) -> Result<u64, ApiError> {
    let id = app.registry.resolve(n)?;
    crate::requests::actor(id);
    if is_pool(app, id) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "actor {id} is the OpenAI endpoint's (it answers /v1/chat/completions); it is not managed through \
                 the actor API"
            ),
        ));
    }
    Ok(id)
}

/// Whether actor `id` is one of the OpenAI endpoint's (transient, tagged `openai`).
fn is_pool(app: &App, id: u64) -> bool {
    app.registry.owner(id).is_ok_and(|(tag, persistent)| tag == POOL_TAG && !persistent)
}

pub async fn health() -> Json<Value> {
    Json(json!({"ok": true, "status": "ready"}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The OpenAI endpoint's actors too.
    #[serde(default)]
    all: bool,
}

pub async fn list(State(app): State<Arc<App>>, Query(q): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let reg = app.registry.clone();
    let actors = blocking(move || reg.list()).await?;
    let actors: Vec<Value> = actors
        .into_iter()
        .filter_map(|a| {
            let pool = a.tag == POOL_TAG && !a.persistent;
            let mut v = serde_json::to_value(&a).ok()?;
            v["pool"] = json!(pool);
            (q.all || !pool).then_some(v)
        })
        .collect();
    Ok(Json(json!({"actors": actors})))
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let reg = app.registry.clone();
    let (actors, gpus) = blocking(move || (reg.list(), shoal_engine::gpu::memory())).await?;
    let mut g = crate::metrics::Gauges { ready: true, gpus, ..Default::default() };
    for a in &actors {
        let state = match a.state.as_str() {
            "idle" => "idle",
            "busy" => "busy",
            "paused" => "paused",
            _ => "stopped",
        };
        *g.actors.entry(state).or_default() += 1;
        g.pool_actors += u64::from(a.tag == POOL_TAG && !a.persistent);
        g.memory_bytes += a.memory_bytes as u64;
        g.kv_bytes += a.kv_bytes;
    }
    Ok(crate::metrics::answer(app.metrics.render(&g)))
}

fn default_module() -> String {
    "chat".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnRequest {
    /// `chat`, or a module's name in the --modules directories.
    #[serde(default = "default_module")]
    module: String,
    #[serde(default)]
    args: Vec<String>,
    tag: Option<String>,
    /// A unique name (1 to 64 characters of `A-Z a-z 0-9 . _ -`, not all digits).
    name: Option<String>,
}

pub async fn spawn(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let r: SpawnRequest = read_json(body, app.body).await?;
    if r.args.len() > MAX_ARGS || r.args.iter().any(|a| a.len() > MAX_ARG_BYTES) {
        return Err(
            ApiError::bad(format!("at most {MAX_ARGS} args of at most {MAX_ARG_BYTES} bytes each")).param("args")
        );
    }
    let tag = r.tag.unwrap_or_else(|| "api".into());
    if tag.is_empty() || tag.len() > MAX_TAG || tag.chars().any(char::is_control) {
        return Err(ApiError::bad(format!("a tag is 1 to {MAX_TAG} printable characters")).param("tag"));
    }
    if tag == POOL_TAG {
        return Err(ApiError::bad(format!("the tag `{POOL_TAG}` is the OpenAI endpoint's")).param("tag"));
    }
    if let Some(n) = &r.name {
        shoal_actor::check_name(n).map_err(|e| ApiError::from(e).param("name"))?;
    }
    let mut model = None;
    if r.module == "chat" {
        model =
            Some(crate::chatargs::check(&r.args, &app.models.names())?.unwrap_or_else(|| app.default_model.clone()));
    }
    let app2 = app.clone();
    let id = blocking(move || -> Result<u64, ApiError> {
        let app = app2;
        let mut args = r.args;
        let module = if r.module == "chat" {
            if !args.iter().any(|a| a == "--model") {
                args.splice(0..0, ["--model".to_string(), app.default_model.clone()]);
            }
            app.chat.clone()
        } else {
            let found = app.modules.find(&r.module)?;
            app.registry.module(&r.module, &found.wasm)?
        };
        let opts = InstanceOptions { args, program_name: Some(format!("{}.wasm", r.module)), ..Default::default() };
        let labels = Labels { name: r.name.clone(), model };
        Ok(app.registry.spawn_labelled(&r.module, module, opts, &tag, labels)?)
    })
    .await??;
    crate::requests::actor(id);
    tracing::info!("spawned actor {id}");
    Ok((StatusCode::CREATED, Json(json!({"id": id}))).into_response())
}

pub async fn message(State(app): State<Arc<App>>, Path(n): Path<String>, body: Body) -> Result<Response, ApiError> {
    let id = id(&app, &n)?;
    let msg = read(body, app.body).await?;
    let reg = app.registry.clone();
    let rx = blocking(move || reg.send(id, msg.to_vec())).await??;
    let mut r = Response::new(stream::ndjson(rx, || {}));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}

pub async fn pause(State(app): State<Arc<App>>, Path(n): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = id(&app, &n)?;
    let reg = app.registry.clone();
    Ok(Json(json!(blocking(move || reg.pause(id)).await??)))
}

pub async fn resume(State(app): State<Arc<App>>, Path(n): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = id(&app, &n)?;
    let reg = app.registry.clone();
    Ok(Json(json!(blocking(move || reg.resume(id)).await??)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    /// A name for the new actor (a snapshot holds none).
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    key: Option<String>,
}

pub async fn snapshot(State(app): State<Arc<App>>, Path(n): Path<String>, body: Body) -> Result<Json<Value>, ApiError> {
    let id = id(&app, &n)?;
    let r: SnapshotRequest = read_json(body, app.body).await?;
    let key = r.key.unwrap_or_else(|| format!("actor-{id}"));
    let reg = app.registry.clone();
    let k = key.clone();
    let (w, ms) = blocking(move || reg.snapshot(id, &k)).await??;
    Ok(Json(json!({"id": id, "key": key, "bytes": w.bytes, "memory_bytes": w.memory_bytes,
                   "kv_bytes": w.kv_bytes, "ms": ms})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveRequest {
    backend: String,
}

pub async fn move_to(State(app): State<Arc<App>>, Path(n): Path<String>, body: Body) -> Result<Json<Value>, ApiError> {
    let id = id(&app, &n)?;
    let r: MoveRequest = read_json(body, app.body)
        .await
        .map_err(|e| ApiError { message: format!("{} (give {{\"backend\": \"cpu\"}})", e.message), ..e })?;
    let reg = app.registry.clone();
    Ok(Json(json!(blocking(move || reg.move_to(id, &r.backend)).await??)))
}

pub async fn kill(State(app): State<Arc<App>>, Path(n): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = id(&app, &n)?;
    crate::openai::forget(&app, id);
    let reg = app.registry.clone();
    blocking(move || reg.kill(id)).await??;
    Ok(Json(json!({"killed": id})))
}

pub async fn snapshots(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let store = app.store.clone();
    let keys = blocking(move || store.list()).await??;
    Ok(Json(json!({"snapshots": keys})))
}

pub async fn restore(
    State(app): State<Arc<App>>,
    Path(key): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let r: RestoreRequest = read_json(body, app.body).await?;
    let reg = app.registry.clone();
    let k = key.clone();
    let labels = Labels { name: r.name, model: None };
    let (id, ms) = blocking(move || reg.restore_labelled(&k, "api", labels)).await??;
    Ok(Json(json!({"id": id, "key": key, "ms": ms})))
}

pub async fn delete_snapshot(State(app): State<Arc<App>>, Path(key): Path<String>) -> Result<Json<Value>, ApiError> {
    let store = app.store.clone();
    let k = key.clone();
    blocking(move || store.remove(&k)).await??;
    Ok(Json(json!({"deleted": key})))
}

pub async fn modules(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let dirs = app.modules.clone();
    let mut names = blocking(move || dirs.names()).await?;
    names.insert(0, "chat".into());
    Ok(Json(json!({"modules": names})))
}

fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "shoal"})
}

pub async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app.models.names().iter().map(|n| model_object(n)).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: one model, as OpenAI's API describes it, or a 404.
pub async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if app.models.names().contains(&id) {
        return Ok(Json(model_object(&id)));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no model named `{}` (GET /v1/models lists them)", crate::error::shown(&id, 64)),
    )
    .code("model_not_found")
    .param("model"))
}
