//! `POST /v1/chat/completions`: OpenAI's chat endpoint, answered by chat actors. Idle actors
//! are kept in a pool (at most `--openai-pool`), each with the conversation it last answered,
//! and a request goes to the one whose conversation shares the most messages with it (its KV
//! cache already holds them). Pool actors are transient (never checkpointed); they count
//! toward `--max-actors`. An abandoned request (the client went away) kills its actor: its
//! work stops and its cache is freed.
//!
//! Requests are typed: wrong types and values are 400s naming the field; fields shoal does
//! not use are ignored, as OpenAI's clients send many.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use shoal_actor::Event;
use shoal_host::InstanceOptions;

use crate::App;
use crate::api::blocking;
use crate::body::read_json;
use crate::error::ApiError;
use crate::stream::{self, Part, Utf8Carry};

/// An idle chat actor kept for reuse, with the conversation it last answered.
pub struct Pooled {
    id: u64,
    model: String,
    conversation: Vec<(String, String)>,
}

/// The idle actors.
#[derive(Default)]
pub struct Pool(Mutex<Vec<Pooled>>);

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<Pooled>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ids of the idle actors.
    pub fn ids(&self) -> Vec<u64> {
        self.lock().iter().map(|p| p.id).collect()
    }
}

/// Drops actor `id` from the pool (it was killed).
pub fn forget(app: &App, id: u64) {
    app.pool.lock().retain(|p| p.id != id);
}

/// Keeps an idle chat actor; the oldest goes when the pool is full.
fn put(app: &App, p: Pooled) {
    let old = {
        let mut pool = app.pool.lock();
        pool.push(p);
        (pool.len() > app.pool_max).then(|| pool.remove(0))
    };
    if let Some(old) = old {
        let _ = app.registry.kill(old.id);
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    n: Option<i64>,
    /// Accepted and ignored: they change nothing in the answer.
    #[serde(default, rename = "user")]
    _user: Option<Value>,
    #[serde(default, rename = "store")]
    _store: Option<Value>,
    #[serde(default, rename = "metadata")]
    _metadata: Option<Value>,
    /// Fields shoal does not honour yet: refused (a 400 naming the field) unless absent or
    /// set to what changes nothing, rather than dropped silently.
    #[serde(flatten)]
    unsupported: std::collections::BTreeMap<String, Value>,
}

/// The most tokens one answer may ask for.
const MAX_TOKENS: i64 = 1 << 20;

/// A completion id no other answer of this daemon, nor of another run of it, has:
/// `chatcmpl-` then 12 hex digits drawn when the daemon started (its clock and process id)
/// and a count of the answers since.
fn completion_id() -> String {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = *START.get_or_init(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_nanos() as u64);
        // A splitmix64 step, so that close start times give unrelated prefixes.
        let mut z = nanos ^ (u64::from(std::process::id()) << 32);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) & 0xffff_ffff_ffff
    });
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("chatcmpl-{start:012x}{n:08x}")
}

/// The most messages of one request.
const MAX_MESSAGES: usize = 4096;

fn clean(s: &str) -> String {
    s.chars().filter(|c| *c != '\u{1e}' && *c != '\u{1f}').collect()
}

/// The conversation and the settings line of the chat actor's message (guests/chat).
struct Checked {
    model: String,
    conversation: Vec<(String, String)>,
    max_tokens: u64,
    stream: bool,
    msg: String,
}

/// Whether a field's value asks for nothing shoal would leave out.
type Inert = fn(&Value) -> bool;

fn empty(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|o| o.is_empty())
}

/// The fields of OpenAI's request that shoal knows and does not honour yet, each with the
/// values that ask for nothing shoal would leave out (null always does).
const NOT_YET: [(&str, Inert); 13] = [
    ("stop", empty),
    ("logprobs", |v| *v == Value::Bool(false)),
    ("top_logprobs", |v| v.as_u64() == Some(0)),
    ("tools", empty),
    ("tool_choice", |v| matches!(v.as_str(), Some("none" | "auto"))),
    ("parallel_tool_calls", Value::is_boolean),
    ("functions", empty),
    ("function_call", |v| matches!(v.as_str(), Some("none" | "auto"))),
    ("response_format", |v| v.get("type").and_then(Value::as_str) == Some("text")),
    ("stream_options", |v| v.get("include_usage").is_none_or(|u| *u == Value::Bool(false))),
    ("presence_penalty", |v| v.as_f64() == Some(0.0)),
    ("frequency_penalty", |v| v.as_f64() == Some(0.0)),
    ("logit_bias", empty),
];

fn check(r: ChatRequest, default_model: &str) -> Result<Checked, ApiError> {
    let bad = |m: String, p: &'static str| ApiError::bad(m).param(p);
    for (name, v) in r.unsupported.iter().filter(|(_, v)| !v.is_null()) {
        let (message, param) = match NOT_YET.iter().find(|(n, _)| n == name) {
            Some((_, inert)) if inert(v) => continue,
            Some((n, _)) => (format!("`{n}` is not supported by shoal yet; leave it out (or null) and ask again"), *n),
            None => {
                (format!("`{}` is not a field of a chat completion request", crate::error::shown(name, 48)), "body")
            }
        };
        return Err(ApiError::bad(message).code("unsupported_parameter").param(param));
    }
    if let Some(n) = r.n
        && n != 1
    {
        return Err(bad(format!("`n` is {n}; shoal answers one choice (n = 1)"), "n"));
    }
    let max_tokens = r.max_completion_tokens.or(r.max_tokens).unwrap_or(256);
    if !(1..=MAX_TOKENS).contains(&max_tokens) {
        return Err(bad(format!("`max_tokens` is {max_tokens}; give 1 to {MAX_TOKENS}"), "max_tokens"));
    }
    let temperature = r.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(format!("`temperature` is {temperature}; give 0 to 2"), "temperature"));
    }
    if let Some(p) = r.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(bad(format!("`top_p` is {p}; give a number in (0, 1]"), "top_p"));
    }
    if let Some(s) = r.seed
        && s < 0
    {
        return Err(bad(format!("`seed` is {s}; give a number from 0"), "seed"));
    }
    if r.messages.is_empty() || r.messages.len() > MAX_MESSAGES {
        return Err(bad(format!("give 1 to {MAX_MESSAGES} messages"), "messages"));
    }
    let mut conversation = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            let role = crate::error::shown(&m.role, 32);
            return Err(bad(
                format!("`messages[{i}].role` is `{role}`; give system, developer, user, assistant or tool"),
                "messages",
            ));
        }
        let text = match m.content {
            None => String::new(),
            Some(Content::Text(s)) => s,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s += &t,
                        (k, _) => {
                            let k = crate::error::shown(k, 32);
                            return Err(bad(
                                format!("`messages[{i}].content`: parts of type `{k}` are not supported (only text)"),
                                "messages",
                            ));
                        }
                    }
                }
                s
            }
        };
        conversation.push((clean(&m.role), clean(&text)));
    }
    if conversation.last().is_none_or(|(r, _)| r != "user") {
        return Err(bad("the last message must be the user's".into(), "messages"));
    }
    let mut settings = format!("max_tokens={max_tokens}\ntemperature={temperature}\n");
    if let Some(p) = r.top_p {
        settings += &format!("top_p={p}\n");
    }
    if let Some(s) = r.seed {
        settings += &format!("seed={s}\n");
    }
    let mut msg = format!("\u{1}chat/1\n{settings}\n");
    for (r, c) in &conversation {
        msg += &format!("{r}\u{1f}{c}\u{1e}");
    }
    Ok(Checked {
        model: r.model.unwrap_or_else(|| default_model.to_string()),
        conversation,
        max_tokens: max_tokens as u64,
        stream: r.stream,
        msg,
    })
}

/// The chat actor's message when a conversation did not fit in its context (it starts with
/// `context_length_exceeded`, see guests/chat).
fn context_overflow(e: &str) -> Option<&str> {
    e.starts_with("context_length_exceeded").then_some(e)
}

fn overflow(message: &str) -> ApiError {
    ApiError::bad(message).code("context_length_exceeded").param("messages")
}

/// Who owns a request's actor while the request is made: the request, until a stream or the
/// pool takes it over. A request dropped before it ends (its client went away) kills the
/// actor it holds, and one it would get later (its spawn was still running).
enum Owner {
    None,
    Request(u64),
    /// The request was dropped.
    Gone,
}

struct Claim {
    app: Arc<App>,
    owner: Arc<Mutex<Owner>>,
}

fn owner(o: &Mutex<Owner>) -> MutexGuard<'_, Owner> {
    o.lock().unwrap_or_else(|e| e.into_inner())
}

impl Claim {
    /// Records that the request holds actor `id`; `false` (and the actor killed) when the
    /// request is already gone.
    fn hold(app: &App, o: &Mutex<Owner>, id: u64) -> bool {
        let mut g = owner(o);
        if matches!(*g, Owner::Gone) {
            drop(g);
            let _ = app.registry.kill(id);
            return false;
        }
        *g = Owner::Request(id);
        true
    }

    /// The request no longer owns an actor (it went back to the pool, or a stream has it).
    fn release(&self) {
        *owner(&self.owner) = Owner::None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let was = std::mem::replace(&mut *owner(&self.owner), Owner::Gone);
        if let Owner::Request(id) = was {
            let reg = self.app.registry.clone();
            // Off the async thread: a kill joins the actor's thread.
            std::thread::spawn(move || {
                let _ = reg.kill(id);
            });
        }
    }
}

pub async fn completions(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let r: ChatRequest = read_json(body, app.body).await?;
    let c = check(r, &app.default_model)?;
    if let Err(e) = app.models.get(&c.model) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("model_not_found: {e}"))
            .code("model_not_found")
            .param("model"));
    }
    // The idle actor whose last conversation shares the most messages with this one.
    let taken = {
        let mut pool = app.pool.lock();
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, p)| p.model == c.model)
            .max_by_key(|(_, p)| p.conversation.iter().zip(&c.conversation).take_while(|(a, b)| a == b).count())
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i))
    };
    let a = app.clone();
    let model = c.model.clone();
    let msg = c.msg.clone();
    let claim = Claim { app: app.clone(), owner: Arc::new(Mutex::new(Owner::None)) };
    let o = claim.owner.clone();
    let (id, before, rx) = blocking(move || -> Result<_, ApiError> {
        let (id, before) = match taken {
            Some(p) => (p.id, p.conversation),
            None => {
                let opts = InstanceOptions {
                    args: vec!["--model".into(), model.clone()],
                    program_name: Some("chat_actor.wasm".into()),
                    ..Default::default()
                };
                (a.registry.spawn_transient("chat", a.chat.clone(), opts, "openai")?, Vec::new())
            }
        };
        if !Claim::hold(&a, &o, id) {
            return Err(ApiError::bad("the client went away"));
        }
        let rx = a.registry.send(id, msg.into_bytes()).inspect_err(|_| {
            let _ = a.registry.kill(id);
        })?;
        // Nothing is answered before the actor's first event: a conversation that does not
        // fit in its context fails before any token, and gets its 400 even when streamed.
        let first = rx.recv().ok();
        Ok((id, before, first.map(|f| (f, rx))))
    })
    .await??;
    let Some((first, rx)) = rx else {
        return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the chat actor stopped before answering"));
    };
    if let Event::Done(Err(e)) = &first
        && let Some(why) = context_overflow(e)
    {
        // The actor kept its conversation and cache as they were before this request.
        claim.release();
        put(&app, Pooled { id, model: c.model.clone(), conversation: before });
        return Err(overflow(why));
    }
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_secs());
    let answer = Answer {
        app: app.clone(),
        id,
        cid: completion_id(),
        created,
        model: c.model.clone(),
        conversation: c.conversation,
        max_tokens: c.max_tokens,
        text: String::new(),
        held: String::new(),
        carry: Utf8Carry::default(),
    };
    if c.stream {
        // From here the stream owns the actor: its end puts it back or kills it, and an
        // abandoned stream kills it.
        claim.release();
        let reg = app.registry.clone();
        let rx = prepend(first, rx);
        let mut answer = Some(answer);
        let mut opening = Some(());
        let body = stream::pump(
            rx,
            move |ev| {
                let mut out = Vec::new();
                let Some(a) = answer.as_mut() else { return out };
                if opening.take().is_some() {
                    out.push(a.sse(json!({"role": "assistant", "content": ""}), Value::Null));
                }
                match ev {
                    Event::Chunk(b) => {
                        let piece = a.push(&b);
                        if !piece.is_empty() {
                            out.push(a.sse(json!({"content": piece}), Value::Null));
                        }
                    }
                    Event::Done(r) => {
                        let a = answer.take().expect("answered once");
                        out.extend(a.end_stream(r));
                    }
                }
                out
            },
            move || {
                let _ = reg.kill(id);
            },
        );
        let mut r = Response::new(body);
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(r);
    }
    let mut answer = answer;
    let o = claim.owner.clone();
    let done = blocking(move || {
        let mut end = Err("the chat actor stopped before answering".to_string());
        for ev in prepend(first, rx) {
            match ev {
                Event::Chunk(b) => {
                    answer.push(&b);
                }
                Event::Done(r) => {
                    end = r;
                    break;
                }
            }
        }
        // Settled here, off the async threads (it counts tokens, and may kill an actor),
        // and only while the request still owns the actor.
        let mut g = owner(&o);
        if matches!(*g, Owner::Gone) {
            return None;
        }
        *g = Owner::None;
        drop(g);
        let (usage, finish) = answer.settle(end.is_err());
        Some((answer, end, usage, finish))
    })
    .await?;
    let Some((answer, end, usage, finish)) = done else {
        return Err(ApiError::bad("the client went away"));
    };
    answer.end_whole(end, usage, finish)
}

/// `first` and then what `rx` brings.
fn prepend(first: Event, rx: std::sync::mpsc::Receiver<Event>) -> impl Iterator<Item = Event> + Send + 'static {
    std::iter::once(first).chain(rx)
}

/// An answer being made.
struct Answer {
    app: Arc<App>,
    id: u64,
    cid: String,
    created: u64,
    model: String,
    conversation: Vec<(String, String)>,
    max_tokens: u64,
    text: String,
    /// A trailing newline held back: the guest ends its answer with one, which is not part
    /// of the answer.
    held: String,
    carry: Utf8Carry,
}

impl Answer {
    /// Adds the guest's bytes; returns the text to send now.
    fn push(&mut self, b: &[u8]) -> String {
        let mut s = String::new();
        for p in self.carry.push(b) {
            match p {
                Part::Text(t) => s += &t,
                Part::Bytes(b) => s += &String::from_utf8_lossy(&b),
            }
        }
        let mut piece = std::mem::take(&mut self.held) + &s;
        if piece.ends_with('\n') {
            piece.pop();
            self.held.push('\n');
        }
        self.text += &piece;
        piece
    }

    fn sse(&self, delta: Value, finish: Value) -> Bytes {
        let v = json!({"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        Bytes::from(format!("data: {v}\n\n"))
    }

    /// Counts the tokens, and puts the actor back in the pool (or kills it when it failed).
    fn settle(&self, failed: bool) -> (Value, &'static str) {
        let loaded = self.app.models.get(&self.model).ok();
        let completion = loaded.as_ref().map_or(0, |l| l.tokenizer.encode(&self.text, false).len());
        let prompt = loaded.as_ref().map_or(0, |l| {
            let msgs: Vec<_> = self
                .conversation
                .iter()
                .map(|(r, c)| shoal_engine::template::Message::new(r.clone(), c.clone()))
                .collect();
            l.tokenizer.encode(&l.template.render(&msgs, true), true).len()
        });
        if failed {
            let _ = self.app.registry.kill(self.id);
        } else {
            let mut conversation = self.conversation.clone();
            conversation.push(("assistant".into(), self.text.clone()));
            put(&self.app, Pooled { id: self.id, model: self.model.clone(), conversation });
        }
        self.app.metrics.tokens(completion as u64);
        let finish = if completion as u64 >= self.max_tokens { "length" } else { "stop" };
        (json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}), finish)
    }

    fn end_stream(self, r: Result<(), String>) -> Vec<Bytes> {
        let (_, finish) = self.settle(r.is_err());
        match r {
            Ok(()) => vec![self.sse(json!({}), json!(finish)), Bytes::from_static(b"data: [DONE]\n\n")],
            Err(e) => vec![Bytes::from(format!("data: {}\n\n", json!({"error": {"message": e}})))],
        }
    }

    fn end_whole(self, r: Result<(), String>, usage: Value, finish: &str) -> Result<Response, ApiError> {
        match r {
            Err(e) => Err(match context_overflow(&e) {
                Some(why) => overflow(why),
                None => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the chat actor failed: {e}")),
            }),
            Ok(()) => Ok(Json(json!({"id": self.cid, "object": "chat.completion", "created": self.created,
                    "model": self.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                                 "finish_reason": finish}],
                    "usage": usage}))
            .into_response()),
        }
    }
}
