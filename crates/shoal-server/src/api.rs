//! The actor and snapshot endpoints (docs/abi.md, "The daemon's HTTP API"). Requests are
//! typed (unknown fields and wrong types are 400s naming the field); the registry's work,
//! which blocks, runs on tokio's blocking threads.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
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

/// Runs `f` on a blocking thread.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the daemon's worker failed: {e}")))
}

/// An actor id from the path.
fn id(n: &str) -> Result<u64, ApiError> {
    n.parse().map_err(|_| {
        let shown = crate::error::shown(n, 32);
        ApiError::new(StatusCode::NOT_FOUND, format!("`{shown}` is not an actor id (see GET /v1/actors)"))
    })
}

pub async fn health() -> Json<Value> {
    Json(json!({"ok": true}))
}

pub async fn list(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let reg = app.registry.clone();
    let actors = blocking(move || reg.list()).await?;
    Ok(Json(json!({"actors": actors})))
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
        Ok(app.registry.spawn(&r.module, module, opts, &tag)?)
    })
    .await??;
    Ok((StatusCode::CREATED, Json(json!({"id": id}))).into_response())
}

pub async fn message(State(app): State<Arc<App>>, Path(n): Path<String>, body: Body) -> Result<Response, ApiError> {
    let id = id(&n)?;
    let msg = read(body, app.body).await?;
    let reg = app.registry.clone();
    let rx = blocking(move || reg.send(id, msg.to_vec())).await??;
    let mut r = Response::new(stream::ndjson(rx, || {}));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}

pub async fn pause(State(app): State<Arc<App>>, Path(n): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = id(&n)?;
    let reg = app.registry.clone();
    Ok(Json(json!(blocking(move || reg.pause(id)).await??)))
}

pub async fn resume(State(app): State<Arc<App>>, Path(n): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = id(&n)?;
    let reg = app.registry.clone();
    Ok(Json(json!(blocking(move || reg.resume(id)).await??)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    key: Option<String>,
}

pub async fn snapshot(State(app): State<Arc<App>>, Path(n): Path<String>, body: Body) -> Result<Json<Value>, ApiError> {
    let id = id(&n)?;
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
    let id = id(&n)?;
    let r: MoveRequest = read_json(body, app.body)
        .await
        .map_err(|e| ApiError { message: format!("{} (give {{\"backend\": \"cpu\"}})", e.message), ..e })?;
    let reg = app.registry.clone();
    Ok(Json(json!(blocking(move || reg.move_to(id, &r.backend)).await??)))
}

pub async fn kill(State(app): State<Arc<App>>, Path(n): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = id(&n)?;
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

pub async fn restore(State(app): State<Arc<App>>, Path(key): Path<String>) -> Result<Json<Value>, ApiError> {
    let reg = app.registry.clone();
    let k = key.clone();
    let (id, ms) = blocking(move || reg.restore(&k, "api")).await??;
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
