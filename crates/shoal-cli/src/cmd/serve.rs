//! `shoal serve`: a daemon hosting many actors that share the loaded models, managed over
//! HTTP on loopback (JSON), with an OpenAI-compatible chat endpoint backed by chat actors.
//! The API is in docs/abi.md ("The daemon's HTTP API").

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{Value, json};
use shoal_actor::{ActorConfig, ActorError, Event, LocalStore, Registry, RegistryError};
use shoal_host::{InstanceOptions, Models, Prepared, Runtime};

use super::http::{self, Chunked, Request};
use super::{BackendChoice, LimitArgs, models, open_device, parse_secs};

/// The daemon's default address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7433";

/// Flags of `shoal serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to listen (loopback by default: the API has no authentication).
    #[arg(long, default_value = DEFAULT_ADDR, env = "SHOAL_ADDR")]
    addr: String,
    /// A model to serve: a name the host knows (default `smollm2`), a GGUF path, or
    /// NAME=PATH; repeat for several. Loaded once, shared by every actor.
    #[arg(long)]
    model: Vec<String>,
    /// The backend models run on (CUDA's engine on an NVIDIA GPU, else the CPU engine).
    #[arg(long, value_enum, default_value_t)]
    backend: BackendChoice,
    /// Where snapshots are kept (default: $XDG_DATA_HOME/shoal/snapshots, or
    /// ~/.local/share/shoal/snapshots).
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
    /// The most actors the OpenAI endpoint keeps for reuse (each holds a conversation's
    /// KV cache).
    #[arg(long, default_value_t = 16)]
    openai_pool: usize,
}

fn default_store() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("shoal/snapshots")
}

/// An idle chat actor kept by the OpenAI endpoint, with the conversation it last answered.
struct Pooled {
    id: u64,
    model: String,
    conversation: Vec<(String, String)>,
}

struct Daemon {
    registry: Registry,
    models: Arc<Models>,
    chat: Arc<Prepared>,
    default_model: String,
    pool: Mutex<Vec<Pooled>>,
    pool_max: usize,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let device = open_device(a.backend)?;
    let (models, default_model) = models(a.model.as_slice(), super::engine_for(&device))?;
    for name in models.names() {
        models.get(&name).map_err(anyhow::Error::msg)?;
    }
    let runtime = Arc::new(Runtime::with_models(device.clone(), models.clone())?);
    let store_dir = a.store.unwrap_or_else(default_store);
    let config = ActorConfig {
        deadline: Some(Duration::from_secs_f64(a.deadline)),
        init_deadline: Some(Duration::from_secs_f64(a.init_deadline)),
        limits: a.limits.limits(None),
    };
    let mut registry = Registry::new(runtime, Arc::new(LocalStore::new(&store_dir)), config);
    if models.engine() != shoal_engine::models::EngineKind::Cpu {
        // Actors can be moved to the CPU engine (its models load there on first use).
        let (cpu_models, _) = super::models(a.model.as_slice(), shoal_engine::models::EngineKind::Cpu)?;
        let cpu = Arc::new(shoal_gpu::Device::open(shoal_gpu::BackendKind::Cpu)?);
        registry.add_runtime(Arc::new(Runtime::with_models(cpu, cpu_models)?));
    }
    let chat = registry.module("chat", shoal_guests::CHAT_ACTOR).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = TcpListener::bind(&a.addr).with_context(|| format!("cannot listen on {}", a.addr))?;
    let daemon = Arc::new(Daemon {
        registry,
        models: models.clone(),
        chat,
        default_model,
        pool: Mutex::new(Vec::new()),
        pool_max: a.openai_pool,
    });
    eprintln!(
        "shoal serve: listening on http://{} (models: {}; engine: {}; snapshots in {})",
        listener.local_addr()?,
        models.names().join(", "),
        models.engine().name(),
        store_dir.display()
    );
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let d = daemon.clone();
        std::thread::spawn(move || handle(&d, stream));
    }
    Ok(0)
}

fn handle(d: &Daemon, stream: TcpStream) {
    let Ok(write_half) = stream.try_clone() else { return };
    let mut w = std::io::BufWriter::new(write_half);
    let mut r = BufReader::new(stream);
    let req = match http::read_request(&mut r) {
        Ok(req) => req,
        Err((status, why)) => {
            let _ = http::error(&mut w, status, &why);
            return;
        }
    };
    if let Err(e) = route(d, &req, &mut w) {
        log::debug!("{} {}: {e}", req.method, req.path);
    }
}

fn status_of(e: &RegistryError) -> u16 {
    match e {
        RegistryError::NoSuchActor(_) => 404,
        RegistryError::WrongState { .. } => 409,
        RegistryError::UnknownModule(_) | RegistryError::NoBackend(_) => 422,
        // The module's fault, not the daemon's.
        RegistryError::Actor(ActorError::InitDeadline(_)) => 422,
        RegistryError::Actor(_) => 500,
    }
}

fn body_json(req: &Request) -> Result<Value, String> {
    if req.body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&req.body).map_err(|e| format!("the body is not JSON: {e}"))
}

fn done(w: &mut impl Write, r: Result<Value, RegistryError>) -> std::io::Result<()> {
    match r {
        Ok(v) => http::json(w, 200, &v),
        Err(e) => http::error(w, status_of(&e), &e.to_string()),
    }
}

fn route(d: &Daemon, req: &Request, w: &mut impl Write) -> std::io::Result<()> {
    let path = req.path.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let reg = &d.registry;
    let not_id = |w: &mut dyn Write, n: &str| http::error(w, 404, &format!("`{n}` is not an actor id"));
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["health"]) => http::json(w, 200, &json!({"ok": true})),
        ("GET", ["v1", "actors"]) => http::json(w, 200, &json!({"actors": reg.list()})),
        ("POST", ["v1", "actors"]) => match spawn(d, req) {
            Ok(id) => http::json(w, 201, &json!({"id": id})),
            Err((s, m)) => http::error(w, s, &m),
        },
        ("POST", ["v1", "actors", n, "messages"]) => match n.parse() {
            Ok(n) => message(d, n, req.body.clone(), w),
            Err(_) => not_id(w, n),
        },
        ("POST", ["v1", "actors", n, op @ ("pause" | "resume")]) => match n.parse() {
            Ok(n) => {
                let r = if *op == "pause" { reg.pause(n) } else { reg.resume(n) };
                done(w, r.map(|t| json!(t)))
            }
            Err(_) => not_id(w, n),
        },
        ("POST", ["v1", "actors", n, "snapshot"]) => match (n.parse::<u64>(), body_json(req)) {
            (Ok(n), Ok(b)) => {
                let key = b.get("key").and_then(Value::as_str).map_or_else(|| format!("actor-{n}"), str::to_string);
                let r = reg.snapshot(n, &key).map(|(r, ms)| {
                    json!({"id": n, "key": key, "bytes": r.bytes, "memory_bytes": r.memory_bytes,
                           "kv_bytes": r.kv_bytes, "ms": ms})
                });
                done(w, r)
            }
            (Err(_), _) => not_id(w, n),
            (_, Err(e)) => http::error(w, 400, &e),
        },
        ("POST", ["v1", "actors", n, "move"]) => match (n.parse::<u64>(), body_json(req)) {
            (Ok(n), Ok(b)) => match b.get("backend").and_then(Value::as_str) {
                Some(to) => done(w, reg.move_to(n, to).map(|t| json!(t))),
                None => http::error(w, 400, "give {\"backend\": \"cpu\"} (or another backend of this daemon)"),
            },
            (Err(_), _) => not_id(w, n),
            (_, Err(e)) => http::error(w, 400, &e),
        },
        ("DELETE", ["v1", "actors", n]) => match n.parse::<u64>() {
            Ok(n) => {
                d.pool.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p.id != n);
                done(w, reg.kill(n).map(|()| json!({"killed": n})))
            }
            Err(_) => not_id(w, n),
        },
        ("GET", ["v1", "snapshots"]) => done(w, reg.snapshots().map(|k| json!({"snapshots": k}))),
        ("POST", ["v1", "snapshots", key, "restore"]) => {
            done(w, reg.restore(key, "api").map(|(id, ms)| json!({"id": id, "key": key, "ms": ms})))
        }
        ("GET", ["v1", "models"]) => {
            let data: Vec<Value> = d
                .models
                .names()
                .into_iter()
                .map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": "shoal"}))
                .collect();
            http::json(w, 200, &json!({"object": "list", "data": data}))
        }
        ("POST", ["v1", "chat", "completions"]) => completions(d, req, w),
        (_, ["health"] | ["v1", ..]) => http::error(w, 405, &format!("{} {path} is not part of the API", req.method)),
        _ => http::error(w, 404, &format!("no such endpoint: {path} (see docs/abi.md, the daemon's HTTP API)")),
    }
}

fn spawn(d: &Daemon, req: &Request) -> Result<u64, (u16, String)> {
    let b = body_json(req).map_err(|e| (400, e))?;
    let name = b.get("module").and_then(Value::as_str).unwrap_or("chat");
    let args: Vec<String> = match b.get("args") {
        None => Vec::new(),
        Some(Value::Array(a)) => {
            a.iter().map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).collect()
        }
        Some(_) => return Err((400, "`args` must be an array of strings".into())),
    };
    let module = if name == "chat" {
        d.chat.clone()
    } else {
        let wasm = std::fs::read(name).map_err(|e| (400, format!("module `{name}`: {e} (give `chat` or a path)")))?;
        d.registry.module(name, &wasm).map_err(|e| (422, e.to_string()))?
    };
    let mut args = args;
    if name == "chat" && !args.iter().any(|a| a == "--model") {
        args.splice(0..0, ["--model".to_string(), d.default_model.clone()]);
    }
    let opts = InstanceOptions { args, program_name: Some(format!("{name}.wasm")), ..Default::default() };
    let tag = b.get("tag").and_then(Value::as_str).unwrap_or("api");
    d.registry.spawn(name, module, opts, tag).map_err(|e| (status_of(&e), e.to_string()))
}

/// A message's reply as NDJSON: `{"chunk": "..."}` lines as the guest replies, then
/// `{"done": true}` or `{"error": "..."}`.
fn message(d: &Daemon, id: u64, msg: Vec<u8>, w: &mut impl Write) -> std::io::Result<()> {
    let rx = match d.registry.send(id, msg) {
        Ok(rx) => rx,
        Err(e) => return http::error(w, status_of(&e), &e.to_string()),
    };
    let mut out = Chunked::start(w, "application/x-ndjson")?;
    let line = |v: Value| {
        let mut b = serde_json::to_vec(&v).expect("JSON");
        b.push(b'\n');
        b
    };
    for ev in rx {
        match ev {
            Event::Chunk(c) => out.send(&line(json!({"chunk": String::from_utf8_lossy(&c)})))?,
            Event::Done(Ok(())) => {
                out.send(&line(json!({"done": true})))?;
                break;
            }
            Event::Done(Err(e)) => {
                out.send(&line(json!({"error": e})))?;
                break;
            }
        }
    }
    out.end()
}

fn content_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect(),
        _ => String::new(),
    }
}

fn clean(s: &str) -> String {
    s.chars().filter(|c| *c != '\u{1e}' && *c != '\u{1f}').collect()
}

fn completions(d: &Daemon, req: &Request, w: &mut impl Write) -> std::io::Result<()> {
    let b = match body_json(req) {
        Ok(b) => b,
        Err(e) => return http::error(w, 400, &e),
    };
    let model = b.get("model").and_then(Value::as_str).unwrap_or(&d.default_model).to_string();
    let loaded = match d.models.get(&model) {
        Ok(m) => m,
        Err(e) => return http::error(w, 404, &format!("model_not_found: {e}")),
    };
    let Some(msgs) = b.get("messages").and_then(Value::as_array) else {
        return http::error(w, 400, "`messages` (an array of {role, content}) is required");
    };
    let conversation: Vec<(String, String)> = msgs
        .iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            (clean(role), clean(&content_text(m.get("content").unwrap_or(&Value::Null))))
        })
        .collect();
    if conversation.last().is_none_or(|(r, _)| r != "user") {
        return http::error(w, 400, "the last message must be the user's");
    }
    let max_tokens = b
        .get("max_completion_tokens")
        .or_else(|| b.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(256)
        .clamp(1, 1 << 20);
    let mut settings = format!("max_tokens={max_tokens}\n");
    settings += &format!("temperature={}\n", b.get("temperature").and_then(Value::as_f64).unwrap_or(1.0));
    if let Some(p) = b.get("top_p").and_then(Value::as_f64) {
        settings += &format!("top_p={p}\n");
    }
    if let Some(s) = b.get("seed").and_then(Value::as_u64) {
        settings += &format!("seed={s}\n");
    }
    let mut msg = format!("\u{1}chat/1\n{settings}\n");
    for (r, c) in &conversation {
        msg += &format!("{r}\u{1f}{c}\u{1e}");
    }
    let stream = b.get("stream").and_then(Value::as_bool).unwrap_or(false);

    // The idle actor whose last conversation shares the most messages with this one.
    let taken = {
        let mut pool = d.pool.lock().unwrap_or_else(|e| e.into_inner());
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, p)| p.model == model)
            .max_by_key(|(_, p)| p.conversation.iter().zip(&conversation).take_while(|(a, b)| a == b).count())
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i))
    };
    let (id, before) = match taken {
        Some(p) => (p.id, p.conversation),
        None => (
            match d.registry.spawn("chat", d.chat.clone(), chat_opts(&model), "openai") {
                Ok(id) => id,
                Err(e) => return http::error(w, status_of(&e), &e.to_string()),
            },
            Vec::new(),
        ),
    };
    let rx = match d.registry.send(id, msg.into_bytes()) {
        Ok(rx) => rx,
        Err(e) => return http::error(w, status_of(&e), &e.to_string()),
    };
    // Nothing is answered before the actor's first event: a conversation that does not fit
    // in its context fails before any token, and gets its 400 even when streamed.
    let first = rx.recv().ok();
    if let Some(Event::Done(Err(e))) = &first
        && let Some(why) = context_overflow(e)
    {
        // The actor kept its conversation and cache as they were before this request.
        pool_put(d, Pooled { id, model: model.clone(), conversation: before });
        return overflow(w, why);
    }
    let events = first.into_iter().chain(rx);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_secs());
    let cid = format!("chatcmpl-shoal-{id}-{created}");
    let mut text = String::new();
    let mut failed = None;
    let chunk = |delta: Value, finish: Value| {
        let v = json!({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {v}\n\n").into_bytes()
    };
    let mut out = if stream { Some(Chunked::start(w, "text/event-stream")?) } else { None };
    if let Some(o) = out.as_mut() {
        o.send(&chunk(json!({"role": "assistant", "content": ""}), Value::Null))?;
    }
    // The guest ends its answer with a newline, which is not part of the answer: hold back
    // a trailing newline until more text comes.
    let mut held = String::new();
    for ev in events {
        match ev {
            Event::Chunk(c) => {
                let s = String::from_utf8_lossy(&c).into_owned();
                let mut piece = std::mem::take(&mut held) + &s;
                if piece.ends_with('\n') {
                    piece.pop();
                    held.push('\n');
                }
                text += &piece;
                if let (Some(o), false) = (out.as_mut(), piece.is_empty()) {
                    o.send(&chunk(json!({"content": piece}), Value::Null))?;
                }
            }
            Event::Done(Ok(())) => break,
            Event::Done(Err(e)) => {
                failed = Some(e);
                break;
            }
        }
    }
    let completion_tokens = loaded.tokenizer.encode(&text, false).len();
    let prompt_text = loaded.template.render(
        &conversation
            .iter()
            .map(|(r, c)| shoal_engine::template::Message::new(r.clone(), c.clone()))
            .collect::<Vec<_>>(),
        true,
    );
    let prompt_tokens = loaded.tokenizer.encode(&prompt_text, true).len();
    let finish = if completion_tokens as u64 >= max_tokens { "length" } else { "stop" };
    match &failed {
        Some(_) => {
            let _ = d.registry.kill(id);
        }
        None => {
            let mut conv = conversation.clone();
            conv.push(("assistant".into(), text.clone()));
            pool_put(d, Pooled { id, model: model.clone(), conversation: conv });
        }
    }
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens});
    match (out, failed) {
        (Some(mut o), None) => {
            o.send(&chunk(json!({}), json!(finish)))?;
            o.send(b"data: [DONE]\n\n")?;
            o.end()
        }
        (Some(mut o), Some(e)) => {
            o.send(format!("data: {}\n\n", json!({"error": {"message": e}})).as_bytes())?;
            o.end()
        }
        (None, Some(e)) => match context_overflow(&e) {
            Some(why) => overflow(w, why),
            None => http::error(w, 500, &format!("the chat actor failed: {e}")),
        },
        (None, None) => http::json(
            w,
            200,
            &json!({"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish}],
                    "usage": usage}),
        ),
    }
}

/// The chat actor's spawn options for `model`.
fn chat_opts(model: &str) -> InstanceOptions {
    InstanceOptions {
        args: vec!["--model".into(), model.to_string()],
        program_name: Some("chat_actor.wasm".into()),
        ..Default::default()
    }
}

/// Keeps an idle chat actor for reuse; the oldest goes when the pool is full.
fn pool_put(d: &Daemon, p: Pooled) {
    let mut pool = d.pool.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(p);
    if pool.len() > d.pool_max {
        let old = pool.remove(0);
        let _ = d.registry.kill(old.id);
    }
}

/// The chat actor's message when a conversation did not fit in its context (it starts with
/// `context_length_exceeded`, see guests/chat).
fn context_overflow(e: &str) -> Option<&str> {
    e.starts_with("context_length_exceeded").then_some(e)
}

/// OpenAI's answer to a conversation longer than the model's context.
fn overflow(w: &mut impl Write, message: &str) -> std::io::Result<()> {
    http::json(
        w,
        400,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": "messages",
                          "code": "context_length_exceeded"}}),
    )
}
