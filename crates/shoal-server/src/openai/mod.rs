//! OpenAI's endpoints: `POST /v1/chat/completions` and `POST /v1/completions`, answered by
//! chat actors, and `POST /v1/embeddings` ([`embeddings`]). Idle chat actors are kept in a
//! pool (at most `--openai-pool`), each with the request it last answered, and a request
//! goes to the one whose last request shares the most with it (its KV cache already holds
//! that prefix). Pool actors are transient (never checkpointed); they count toward
//! `--max-actors`. An abandoned request (the client went away) kills its actors: their work
//! stops and their caches are freed.
//!
//! Each of a request's `n` choices is one actor's answer (run side by side, so the engine
//! batches them), with its own seed: the request's plus the choice's index. The same
//! request with the same seed gets the same answer (sampling draws are keyed by the seed and
//! the token's position, see docs/abi.md); without a seed each request draws a fresh one.
//!
//! Requests are typed ([`request`]): wrong types and values are 400s naming the field, and
//! fields shoal does not honour (and unknown ones) are refused by name, never dropped.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use shoal_actor::Event;
use shoal_host::InstanceOptions;

use crate::App;
use crate::api::blocking;
use crate::body::read_json;
use crate::error::ApiError;

pub mod embeddings;
pub mod reply;
pub mod request;

use reply::Choice;
use request::Checked;

/// What a pool actor's last request was, to compare a new one with.
#[derive(Clone, Debug, PartialEq)]
pub enum Key {
    /// A conversation, its answer appended.
    Chat(Vec<(String, String)>),
    /// A completion's prompt, its continuation appended.
    Text(String),
}

impl Key {
    /// How much of `self` a request of `other` would find in the actor's cache.
    fn shared(&self, other: &Key) -> usize {
        match (self, other) {
            (Key::Chat(a), Key::Chat(b)) => {
                a.iter().zip(b).take_while(|(x, y)| x == y).map(|(x, _)| x.1.len() + 1).sum()
            }
            (Key::Text(a), Key::Text(b)) => a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count(),
            _ => 0,
        }
    }

    /// The key once `answer` was given.
    fn answered(&self, answer: &str) -> Key {
        match self {
            Key::Chat(c) => {
                let mut c = c.clone();
                c.push(("assistant".into(), answer.into()));
                Key::Chat(c)
            }
            Key::Text(t) => Key::Text(format!("{t}{answer}")),
        }
    }
}

/// An idle chat actor kept for reuse, with the request it last answered.
pub struct Pooled {
    id: u64,
    model: String,
    key: Key,
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

    /// Takes up to `n` idle actors of `model`, those whose last request shares the most with
    /// `key` first.
    fn take(&self, model: &str, key: &Key, n: usize) -> Vec<Pooled> {
        let mut pool = self.lock();
        let mut taken = Vec::new();
        while taken.len() < n {
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, p)| p.model == model)
                .max_by_key(|(_, p)| p.key.shared(key))
                .map(|(i, _)| i);
            match best {
                Some(i) => taken.push(pool.swap_remove(i)),
                None => break,
            }
        }
        taken
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

/// A number no other request of this daemon, nor of another run of it, is likely to get:
/// splitmix64 of the clock, the process id and a count.
fn unique() -> u64 {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_nanos() as u64);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut z = nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seed for a request that gives none (OpenAI's answers vary from request to request).
pub(crate) fn fresh_seed() -> u64 {
    unique() >> 1
}

/// An answer id no other answer of this daemon, nor of another run of it, has: `prefix`,
/// then 12 hex digits drawn when the daemon started and a count of the answers since.
fn answer_id(prefix: &str) -> String {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = *START.get_or_init(|| unique() & 0xffff_ffff_ffff);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{start:012x}{n:08x}")
}

/// The chat actor's message when a request did not fit in its context (it starts with
/// `context_length_exceeded`, see guests/chat).
fn context_overflow(e: &str) -> Option<&str> {
    e.starts_with("context_length_exceeded").then_some(e)
}

fn overflow(message: &str) -> ApiError {
    ApiError::bad(message).code("context_length_exceeded").param("messages")
}

/// The actors a request holds while it is made: a request dropped before it ends (its
/// client went away) kills them, and any it would get later (a spawn still running).
struct Claim {
    app: Arc<App>,
    held: Arc<Mutex<Held>>,
}

#[derive(Default)]
struct Held {
    ids: Vec<u64>,
    /// The request was dropped.
    gone: bool,
}

fn held(h: &Mutex<Held>) -> MutexGuard<'_, Held> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

impl Claim {
    /// Records that the request holds actor `id`; `false` (and the actor killed) when the
    /// request is already gone.
    fn hold(app: &App, h: &Mutex<Held>, id: u64) -> bool {
        let mut g = held(h);
        if g.gone {
            drop(g);
            let _ = app.registry.kill(id);
            return false;
        }
        g.ids.push(id);
        true
    }

    /// The request no longer holds actor `id` (it went back to the pool, or a stream has it);
    /// false when the request is gone (and the actor was killed with it).
    fn release(h: &Mutex<Held>, id: u64) -> bool {
        let mut g = held(h);
        g.ids.retain(|&i| i != id);
        !g.gone
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let ids = {
            let mut g = held(&self.held);
            g.gone = true;
            std::mem::take(&mut g.ids)
        };
        if !ids.is_empty() {
            let reg = self.app.registry.clone();
            // Off the async thread: a kill joins the actor's thread.
            std::thread::spawn(move || {
                for id in ids {
                    let _ = reg.kill(id);
                }
            });
        }
    }
}

/// One choice started: its actor, the key that actor had, and its events.
struct Started {
    id: u64,
    before: Option<Key>,
    first: Event,
    rx: std::sync::mpsc::Receiver<Event>,
}

/// Starts one choice on `taken` (or a new actor) and waits for its first event.
fn start(
    app: &Arc<App>,
    h: &Mutex<Held>,
    model: &str,
    taken: Option<Pooled>,
    msg: String,
) -> Result<Started, ApiError> {
    let (id, before) = match taken {
        Some(p) => (p.id, Some(p.key)),
        None => {
            let opts = InstanceOptions {
                args: vec!["--model".into(), model.to_string()],
                program_name: Some("chat_actor.wasm".into()),
                ..Default::default()
            };
            (app.registry.spawn_transient("chat", app.chat.clone(), opts, "openai")?, None)
        }
    };
    if !Claim::hold(app, h, id) {
        return Err(ApiError::bad("the client went away"));
    }
    let rx = app.registry.send(id, msg.into_bytes()).inspect_err(|_| {
        let _ = app.registry.kill(id);
    })?;
    // Nothing is answered before the actor's first event: a request that does not fit in
    // its context fails before any token, and gets its 400 even when streamed.
    let Ok(first) = rx.recv() else {
        return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the chat actor stopped before answering"));
    };
    Ok(Started { id, before, first, rx })
}

/// Puts a choice's actor back in the pool with the request it answered (or kills it when
/// it failed, or the request is gone).
fn settle(app: &App, h: &Mutex<Held>, id: u64, model: &str, key: Option<Key>) {
    if Claim::release(h, id)
        && let Some(key) = key
    {
        put(app, Pooled { id, model: model.to_string(), key });
    } else {
        let _ = app.registry.kill(id);
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let r = read_json(body, app.body).await?;
    let c = request::chat(r, &app.default_model)?;
    answer(app, c).await
}

/// `POST /v1/completions`.
pub async fn completions(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let r = read_json(body, app.body).await?;
    let c = request::completion(r, &app.default_model)?;
    answer(app, c).await
}

async fn answer(app: Arc<App>, c: Checked) -> Result<Response, ApiError> {
    if let Err(e) = app.models.get(&c.model) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("model_not_found: {e}"))
            .code("model_not_found")
            .param("model"));
    }
    let mut taken = app.pool.take(&c.model, &c.key, c.msgs.len()).into_iter();
    let claim = Claim { app: app.clone(), held: Arc::new(Mutex::new(Held::default())) };
    let mut starts = Vec::new();
    for msg in c.msgs.iter().cloned() {
        let (a, h, model, p) = (app.clone(), claim.held.clone(), c.model.clone(), taken.next());
        starts.push(blocking(move || start(&a, &h, &model, p, msg)));
    }
    let mut started = Vec::new();
    let mut failed = None;
    for s in futures_util::future::join_all(starts).await {
        match s.and_then(|r| r) {
            Ok(s) => started.push(s),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    // A request that did not fit fails whole; the actors keep their caches as they were.
    let overflowed = started.iter().find_map(|s| match &s.first {
        Event::Done(Err(e)) => context_overflow(e).map(str::to_string),
        _ => None,
    });
    if failed.is_some() || overflowed.is_some() {
        for s in started {
            // An actor that refused the request kept its cache as it was: it goes back.
            let refused = matches!(&s.first, Event::Done(Err(e)) if context_overflow(e).is_some());
            settle(&app, &claim.held, s.id, &c.model, s.before.filter(|_| refused));
        }
        return Err(match (overflowed, failed) {
            (Some(why), _) => overflow(&why),
            (None, Some(e)) => e,
            (None, None) => unreachable!("one of them is set"),
        });
    }
    let meta = Meta {
        id: answer_id(if c.chat { "chatcmpl" } else { "cmpl" }),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_secs()),
        model: c.model.clone(),
        chat: c.chat,
        logprobs: c.logprobs.is_some(),
        max_tokens: c.max_tokens,
    };
    let key = c.key.clone();
    if c.stream {
        return Ok(stream_answer(app, claim, meta, key, started, c.include_usage));
    }
    let h = claim.held.clone();
    let a = app.clone();
    let done = blocking(move || {
        let mut choices = Vec::new();
        let mut end: Result<(), String> = Ok(());
        for (i, s) in started.into_iter().enumerate() {
            let mut choice = Choice::new(i);
            let mut r = Err("the chat actor stopped before answering".to_string());
            for ev in std::iter::once(s.first).chain(s.rx) {
                match ev {
                    Event::Chunk(b) => {
                        choice.push(&b, meta.max_tokens);
                    }
                    Event::Done(d) => {
                        r = d;
                        break;
                    }
                }
            }
            choice.finish();
            a.metrics.tokens(choice.usage.map_or(0, |u| u.completion));
            let answered = r.is_ok().then(|| key.answered(&choice.text));
            settle(&a, &h, s.id, &meta.model, answered);
            if let Err(e) = r {
                end = end.and(Err(e));
            }
            choices.push(choice);
        }
        (choices, end, meta)
    });
    let (choices, end, meta) = done.await?;
    if held(&claim.held).gone {
        return Err(ApiError::bad("the client went away"));
    }
    if let Err(e) = end {
        return Err(match context_overflow(&e) {
            Some(why) => overflow(why),
            None => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the chat actor failed: {e}")),
        });
    }
    let tok = app.models.get(&meta.model).ok();
    let body: Vec<Value> = choices.iter().map(|ch| meta.whole_choice(ch, tok.as_ref().map(|l| &l.tokenizer))).collect();
    let object = if meta.chat { "chat.completion" } else { "text_completion" };
    Ok(Json(json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model,
                   "system_fingerprint": Value::Null, "choices": body, "usage": usage(&choices)}))
    .into_response())
}

/// OpenAI's `usage` of a request's choices: the prompt counted once, the completions summed.
fn usage(choices: &[Choice]) -> Value {
    let first = choices.first().and_then(|c| c.usage).unwrap_or_default();
    let completion: u64 = choices.iter().filter_map(|c| c.usage).map(|u| u.completion).sum();
    json!({"prompt_tokens": first.prompt, "completion_tokens": completion,
           "total_tokens": first.prompt + completion,
           "prompt_tokens_details": {"cached_tokens": first.cached}})
}

/// What every piece of an answer says.
struct Meta {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    logprobs: bool,
    /// Bounds what a choice keeps of its log-probabilities.
    max_tokens: u64,
}

impl Meta {
    fn whole_choice(&self, ch: &Choice, tok: Option<&shoal_engine::tokenizer::Tokenizer>) -> Value {
        let logprobs = match tok.filter(|_| self.logprobs) {
            None => Value::Null,
            Some(t) if self.chat => reply::chat_logprobs(t, &ch.logprobs),
            Some(t) => reply::completion_logprobs(t, &ch.logprobs, 0),
        };
        if self.chat {
            json!({"index": ch.index, "message": {"role": "assistant", "content": ch.text, "refusal": null},
                   "logprobs": logprobs, "finish_reason": ch.finish_reason()})
        } else {
            json!({"index": ch.index, "text": ch.text, "logprobs": logprobs, "finish_reason": ch.finish_reason()})
        }
    }

    /// One server-sent event of choice `index`.
    fn event(&self, index: usize, text: Option<&str>, logprobs: Value, finish: Value, usage: Option<Value>) -> Bytes {
        let choice = if self.chat {
            let delta = match text {
                Some(t) => json!({"content": t}),
                None => json!({}),
            };
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        } else {
            json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
        };
        let object = if self.chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
                           "system_fingerprint": Value::Null, "choices": [choice]});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Bytes::from(format!("data: {v}\n\n"))
    }

    fn usage_event(&self, usage: Value) -> Bytes {
        let object = if self.chat { "chat.completion.chunk" } else { "text_completion" };
        let v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
                       "system_fingerprint": Value::Null, "choices": [], "usage": usage});
        Bytes::from(format!("data: {v}\n\n"))
    }
}

/// Streams the choices as server-sent events, merged as they come. From here the stream
/// owns the actors: each choice's end puts its actor back, and an abandoned stream kills
/// them all.
fn stream_answer(
    app: Arc<App>,
    claim: Claim,
    meta: Meta,
    key: Key,
    started: Vec<Started>,
    include_usage: bool,
) -> Response {
    let n = started.len();
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Event)>(crate::stream::LINES * n.max(1));
    let ids: Vec<u64> = started.iter().map(|s| s.id).collect();
    for (i, s) in started.into_iter().enumerate() {
        let tx = tx.clone();
        // One forwarder per choice: its events, tagged with its index, into one queue.
        tokio::task::spawn_blocking(move || {
            for ev in std::iter::once(s.first).chain(s.rx) {
                let end = matches!(ev, Event::Done(_));
                if tx.send((i, ev)).is_err() || end {
                    return;
                }
            }
            let _ = tx.send((i, Event::Done(Err("the chat actor stopped before answering".into()))));
        });
    }
    drop(tx);
    let tok = app.models.get(&meta.model).ok();
    let mut choices: Vec<Choice> = (0..n).map(Choice::new).collect();
    let mut opened = vec![false; n];
    let mut ended = 0;
    let no_usage = move || include_usage.then_some(Value::Null);
    let h = claim.held.clone();
    let a = app.clone();
    // The claim lives as long as the stream: dropping it (the stream abandoned) kills the
    // actors not settled yet.
    let mut claim = Some(claim);
    let body = crate::stream::pump_until(
        rx.into_iter(),
        |_| false,
        move |(i, ev): (usize, Event)| {
            let mut out = Vec::new();
            if ended == n || i >= n {
                return out;
            }
            if !opened[i] {
                opened[i] = true;
                if meta.chat {
                    let delta = json!({"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": null, "finish_reason": null});
                    let v = json!({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                                   "model": meta.model, "system_fingerprint": Value::Null, "choices": [delta]});
                    out.push(Bytes::from(format!("data: {v}\n\n")));
                }
            }
            let lp = |l: Option<reply::Logprobs>, offset: usize| match (l, tok.as_ref()) {
                (Some(l), Some(t)) if meta.chat => reply::chat_logprobs(&t.tokenizer, &[l]),
                (Some(l), Some(t)) => reply::completion_logprobs(&t.tokenizer, &[l], offset),
                _ => Value::Null,
            };
            match ev {
                Event::Chunk(b) => {
                    let offset = choices[i].text.len();
                    let added = choices[i].push(&b, meta.max_tokens);
                    if !added.text.is_empty() || added.logprobs.is_some() {
                        let text = (!added.text.is_empty()).then_some(added.text.as_str());
                        out.push(meta.event(i, text, lp(added.logprobs, offset), Value::Null, no_usage()));
                    }
                }
                Event::Done(r) => {
                    ended += 1;
                    let rest = choices[i].finish();
                    a.metrics.tokens(choices[i].usage.map_or(0, |u| u.completion));
                    if !rest.is_empty() {
                        out.push(meta.event(i, Some(&rest), Value::Null, Value::Null, no_usage()));
                    }
                    settle(&a, &h, ids[i], &meta.model, r.is_ok().then(|| key.answered(&choices[i].text)));
                    match r {
                        Ok(()) => {
                            let finish = json!(choices[i].finish_reason());
                            out.push(meta.event(i, None, Value::Null, finish, no_usage()));
                        }
                        Err(e) => {
                            let v = json!({"error": {"message": e, "type": "server_error", "param": null,
                                                     "code": "actor_failed"}});
                            out.push(Bytes::from(format!("data: {v}\n\n")));
                        }
                    }
                    if ended == n {
                        if include_usage {
                            out.push(meta.usage_event(usage(&choices)));
                        }
                        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                        // Every actor is settled: nothing is left for the claim to kill.
                        claim.take();
                    }
                }
            }
            out
        },
        || {},
    );
    let mut r = Response::new(body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
