//! The inference level of `shoal_v1`: models opened by name (shared by every
//! instance), sessions with their own KV cache, tokenize / detokenize, chat rendering,
//! and evaluation with sampling. Token ids and logits live in the guest's memory.
//!
//! Layouts are in `docs/abi.md` ("Inference").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use shoal_engine::models::{Cache, EngineError};
use shoal_engine::sampler::Sampler;
use shoal_engine::template::Message;
use wasmtime::{Caller, Linker};

use crate::HostState;
use crate::abi::{AbiError, MODULE, Status, err, finish, memory, read_vec, write};
use crate::models::{LoadedModel, Models};

/// Sessions one instance may hold.
const MAX_SESSIONS: usize = 256;
/// The most tokens one call takes.
const MAX_TOKENS_PER_CALL: u32 = 1 << 20;

struct Session {
    model: Arc<LoadedModel>,
    cache: Cache,
    /// Every token evaluated, for the repetition penalty.
    history: Vec<u32>,
    /// Tokens sampled so far (the sampler's step).
    step: u64,
}

/// Per-instance inference state.
pub(crate) struct InferCtx {
    models: Arc<Models>,
    opened: HashMap<u32, Arc<LoadedModel>>,
    sessions: HashMap<u32, Session>,
    next: u32,
    /// Decode steps and their time (for tokens/s reports).
    pub(crate) decode_steps: u64,
    pub(crate) decode_seconds: f64,
    pub(crate) prefill_tokens: u64,
    pub(crate) prefill_seconds: f64,
}

impl InferCtx {
    pub(crate) fn new(models: Arc<Models>) -> InferCtx {
        InferCtx {
            models,
            opened: HashMap::new(),
            sessions: HashMap::new(),
            next: 1,
            decode_steps: 0,
            decode_seconds: 0.0,
            prefill_tokens: 0,
            prefill_seconds: 0.0,
        }
    }

    pub(crate) fn models(&self) -> &Arc<Models> {
        &self.models
    }

    fn handle(&mut self) -> u32 {
        let h = self.next;
        self.next = self.next.wrapping_add(1).max(1);
        h
    }
}

fn engine_err(e: EngineError) -> AbiError {
    let status = match &e {
        EngineError::ContextTooLong { .. } | EngineError::Kv(_) | EngineError::KvPoolFull { .. } => Status::ContextFull,
        EngineError::TokenOutOfRange { .. } | EngineError::EmptyInput => Status::InvalidArgument,
        _ => Status::Device,
    };
    err(status, e.to_string())
}

fn model(caller: &Caller<'_, HostState>, handle: u32) -> Result<Arc<LoadedModel>, AbiError> {
    caller
        .data()
        .shoal
        .infer
        .opened
        .get(&handle)
        .cloned()
        .ok_or_else(|| err(Status::BadHandle, format!("no open model with handle {handle}")))
}

fn session_mut<'a>(caller: &'a mut Caller<'_, HostState>, handle: u32) -> Result<&'a mut Session, AbiError> {
    caller
        .data_mut()
        .shoal
        .infer
        .sessions
        .get_mut(&handle)
        .ok_or_else(|| err(Status::BadHandle, format!("this instance has no session {handle}")))
}

fn read_str(caller: &Caller<'_, HostState>, mem: &wasmtime::Memory, ptr: u32, len: u32) -> Result<String, AbiError> {
    let bytes = read_vec(caller, mem, ptr, len)?;
    String::from_utf8(bytes).map_err(|e| err(Status::InvalidArgument, format!("text is not UTF-8: {e}")))
}

fn read_tokens(
    caller: &Caller<'_, HostState>,
    mem: &wasmtime::Memory,
    ptr: u32,
    n: u32,
    vocab: usize,
) -> Result<Vec<u32>, AbiError> {
    if n > MAX_TOKENS_PER_CALL {
        return Err(err(Status::TooLarge, format!("{n} tokens in one call (at most {MAX_TOKENS_PER_CALL})")));
    }
    let bytes = read_vec(caller, mem, ptr, n.checked_mul(4).ok_or_else(|| err(Status::TooLarge, "overflow"))?)?;
    let ids: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(err(Status::InvalidArgument, format!("token {bad} is not in the vocabulary of {vocab}")));
    }
    Ok(ids)
}

/// Writes `bytes` if they fit in `cap`, and their length to `len_out` either way.
fn write_sized(
    caller: &mut Caller<'_, HostState>,
    mem: &wasmtime::Memory,
    bytes: &[u8],
    out: u32,
    cap: u32,
    len_out: u32,
) -> Result<(), AbiError> {
    write(caller, mem, len_out, &(bytes.len() as u32).to_le_bytes())?;
    if bytes.len() > cap as usize {
        return Err(err(Status::TooSmall, format!("{} bytes do not fit the {cap}-byte buffer", bytes.len())));
    }
    write(caller, mem, out, bytes)
}

fn model_open(caller: &mut Caller<'_, HostState>, name: u32, len: u32, out: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let name = read_str(caller, &mem, name, len)?;
    crate::abi::check_writable(caller, &mem, out, 4)?;
    let models = caller.data().shoal.infer.models.clone();
    let m = models.get(&name).map_err(|e| err(Status::ModelNotFound, e))?;
    let ctx = &mut caller.data_mut().shoal.infer;
    let h = ctx.handle();
    ctx.opened.insert(h, m);
    write(caller, &mem, out, &h.to_le_bytes())
}

fn model_info(caller: &mut Caller<'_, HostState>, handle: u32, out: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let m = model(caller, handle)?;
    let mut b = [0u8; 32];
    let none = u32::MAX;
    let words = [
        m.llama.config().vocab_size as u32,
        m.llama.config().context_length as u32,
        m.tokenizer.bos().unwrap_or(none),
        m.tokenizer.eos().unwrap_or(none),
        m.stop.len().min(4) as u32,
    ];
    for (i, w) in words.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    for (i, s) in m.stop.iter().take(3).enumerate() {
        b[20 + i * 4..24 + i * 4].copy_from_slice(&s.to_le_bytes());
    }
    write(caller, &mem, out, &b)
}

#[allow(clippy::too_many_arguments)]
fn chat_render(
    caller: &mut Caller<'_, HostState>,
    handle: u32,
    msgs: u32,
    n: u32,
    add_gen: u32,
    out: u32,
    cap: u32,
    len_out: u32,
) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let m = model(caller, handle)?;
    if n > 4096 {
        return Err(err(Status::TooLarge, format!("{n} messages (at most 4096)")));
    }
    let table = read_vec(caller, &mem, msgs, n * 16)?;
    let mut messages = Vec::with_capacity(n as usize);
    for rec in table.chunks_exact(16) {
        let w = |i: usize| u32::from_le_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
        let role = read_str(caller, &mem, w(0), w(4))?;
        let content = read_str(caller, &mem, w(8), w(12))?;
        messages.push(Message::new(role, content));
    }
    let text = m.template.render(&messages, add_gen != 0);
    write_sized(caller, &mem, text.as_bytes(), out, cap, len_out)
}

#[allow(clippy::too_many_arguments)]
fn tokenize(
    caller: &mut Caller<'_, HostState>,
    handle: u32,
    text: u32,
    len: u32,
    special: u32,
    out: u32,
    cap: u32,
    n_out: u32,
) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let m = model(caller, handle)?;
    let text = read_str(caller, &mem, text, len)?;
    let ids = m.tokenizer.encode(&text, special != 0);
    write(caller, &mem, n_out, &(ids.len() as u32).to_le_bytes())?;
    if ids.len() > cap as usize {
        return Err(err(Status::TooSmall, format!("{} tokens do not fit the room for {cap}", ids.len())));
    }
    let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    write(caller, &mem, out, &bytes)
}

fn token_piece(
    caller: &mut Caller<'_, HostState>,
    handle: u32,
    id: u32,
    out: u32,
    cap: u32,
    len_out: u32,
) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let m = model(caller, handle)?;
    if id as usize >= m.tokenizer.vocab_size() {
        return Err(err(Status::InvalidArgument, format!("token {id} is not in the vocabulary")));
    }
    let piece = m.tokenizer.token_piece(id).to_vec();
    write_sized(caller, &mem, &piece, out, cap, len_out)
}

fn session_create(caller: &mut Caller<'_, HostState>, handle: u32, context: u32, out: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let m = model(caller, handle)?;
    crate::abi::check_writable(caller, &mem, out, 4)?;
    if caller.data().shoal.infer.sessions.len() >= MAX_SESSIONS {
        return Err(err(Status::Busy, format!("this instance already has {MAX_SESSIONS} sessions")));
    }
    let ctx_len = if context == 0 { m.llama.config().context_length.min(4096) } else { context as usize };
    let cache = m.llama.new_cache(ctx_len).map_err(engine_err)?;
    let ctx = &mut caller.data_mut().shoal.infer;
    let h = ctx.handle();
    ctx.sessions.insert(h, Session { model: m, cache, history: Vec::new(), step: 0 });
    write(caller, &mem, out, &h.to_le_bytes())
}

fn session_free(caller: &mut Caller<'_, HostState>, handle: u32) -> Result<(), AbiError> {
    caller
        .data_mut()
        .shoal
        .infer
        .sessions
        .remove(&handle)
        .map(drop)
        .ok_or_else(|| err(Status::BadHandle, format!("this instance has no session {handle}")))
}

/// Runs `ids` through the session's model; returns the last logits.
fn eval(caller: &mut Caller<'_, HostState>, handle: u32, ids: &[u32]) -> Result<Vec<f32>, AbiError> {
    let t0 = Instant::now();
    let s = session_mut(caller, handle)?;
    let logits = s.model.llama.forward(ids, &mut s.cache).map_err(engine_err)?;
    s.history.extend_from_slice(ids);
    record(caller, ids.len(), t0);
    Ok(logits)
}

/// Counts a forward pass of `n` tokens that began at `t0` (for tokens/s reports).
fn record(caller: &mut Caller<'_, HostState>, n: usize, t0: Instant) {
    let dt = t0.elapsed().as_secs_f64();
    let ctx = &mut caller.data_mut().shoal.infer;
    if n == 1 {
        ctx.decode_steps += 1;
        ctx.decode_seconds += dt;
    } else {
        ctx.prefill_tokens += n as u64;
        ctx.prefill_seconds += dt;
    }
}

fn session_eval(
    caller: &mut Caller<'_, HostState>,
    handle: u32,
    ids: u32,
    n: u32,
    logits_out: u32,
    logits_cap: u32,
) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let vocab = session_mut(caller, handle)?.model.llama.config().vocab_size;
    let tokens = read_tokens(caller, &mem, ids, n, vocab)?;
    if logits_out != 0 {
        if (logits_cap as usize) < vocab {
            return Err(err(Status::TooSmall, format!("room for {logits_cap} logits; the vocabulary has {vocab}")));
        }
        crate::abi::check_writable(caller, &mem, logits_out, vocab * 4)?;
    }
    let logits = eval(caller, handle, &tokens)?;
    if logits_out != 0 {
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        write(caller, &mem, logits_out, &bytes)?;
    }
    Ok(())
}

fn session_decode(
    caller: &mut Caller<'_, HostState>,
    handle: u32,
    ids: u32,
    n: u32,
    params: u32,
    token_out: u32,
) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let vocab = session_mut(caller, handle)?.model.llama.config().vocab_size;
    let tokens = read_tokens(caller, &mem, ids, n, vocab)?;
    let p = crate::abi::read_array::<24>(caller, &mem, params)?;
    let f = |i: usize| f32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let sampler = Sampler {
        temperature: f(0),
        top_k: u32::from_le_bytes([p[4], p[5], p[6], p[7]]) as usize,
        top_p: f(8),
        repetition_penalty: f(12),
        seed: u64::from_le_bytes([p[16], p[17], p[18], p[19], p[20], p[21], p[22], p[23]]),
    };
    crate::abi::check_writable(caller, &mem, token_out, 4)?;
    let t0 = Instant::now();
    let s = session_mut(caller, handle)?;
    let mut window: Vec<u32> = s.history[s.history.len().saturating_sub(63)..].to_vec();
    window.extend_from_slice(&tokens[tokens.len().saturating_sub(64)..]);
    let window = &window[window.len().saturating_sub(64)..];
    let next = s.model.llama.forward_sample(&tokens, &mut s.cache, &sampler, window, s.step).map_err(engine_err)?;
    s.history.extend_from_slice(&tokens);
    s.step += 1;
    record(caller, tokens.len(), t0);
    write(caller, &mem, token_out, &next.to_le_bytes())
}

fn session_len(caller: &mut Caller<'_, HostState>, handle: u32, out: u32) -> Result<(), AbiError> {
    let mem = memory(caller)?;
    let len = session_mut(caller, handle)?.cache.len() as u32;
    write(caller, &mem, out, &len.to_le_bytes())
}

fn session_truncate(caller: &mut Caller<'_, HostState>, handle: u32, n: u32) -> Result<(), AbiError> {
    let s = session_mut(caller, handle)?;
    if n as usize > s.cache.len() {
        return Err(err(Status::InvalidArgument, format!("cannot truncate {} tokens to {n}", s.cache.len())));
    }
    s.cache.truncate(n as usize);
    s.history.truncate(n as usize);
    Ok(())
}

/// Adds the inference functions to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, "model_open", |mut c: Caller<'_, HostState>, name: u32, len: u32, out: u32| {
        let r = model_open(&mut c, name, len, out);
        finish(&mut c, "model_open", r)
    })?;
    linker.func_wrap(MODULE, "model_info", |mut c: Caller<'_, HostState>, m: u32, out: u32| {
        let r = model_info(&mut c, m, out);
        finish(&mut c, "model_info", r)
    })?;
    linker.func_wrap(
        MODULE,
        "chat_render",
        |mut c: Caller<'_, HostState>, m: u32, msgs: u32, n: u32, add_gen: u32, out: u32, cap: u32, len_out: u32| {
            let r = chat_render(&mut c, m, msgs, n, add_gen, out, cap, len_out);
            finish(&mut c, "chat_render", r)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "tokenize",
        |mut c: Caller<'_, HostState>, m: u32, text: u32, len: u32, special: u32, out: u32, cap: u32, n_out: u32| {
            let r = tokenize(&mut c, m, text, len, special, out, cap, n_out);
            finish(&mut c, "tokenize", r)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "token_piece",
        |mut c: Caller<'_, HostState>, m: u32, id: u32, out: u32, cap: u32, len_out: u32| {
            let r = token_piece(&mut c, m, id, out, cap, len_out);
            finish(&mut c, "token_piece", r)
        },
    )?;
    linker.func_wrap(MODULE, "session_create", |mut c: Caller<'_, HostState>, m: u32, ctx: u32, out: u32| {
        let r = session_create(&mut c, m, ctx, out);
        finish(&mut c, "session_create", r)
    })?;
    linker.func_wrap(MODULE, "session_free", |mut c: Caller<'_, HostState>, s: u32| {
        let r = session_free(&mut c, s);
        finish(&mut c, "session_free", r)
    })?;
    linker.func_wrap(
        MODULE,
        "session_eval",
        |mut c: Caller<'_, HostState>, s: u32, ids: u32, n: u32, logits: u32, cap: u32| {
            let r = session_eval(&mut c, s, ids, n, logits, cap);
            finish(&mut c, "session_eval", r)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "session_decode",
        |mut c: Caller<'_, HostState>, s: u32, ids: u32, n: u32, params: u32, out: u32| {
            let r = session_decode(&mut c, s, ids, n, params, out);
            finish(&mut c, "session_decode", r)
        },
    )?;
    linker.func_wrap(MODULE, "session_len", |mut c: Caller<'_, HostState>, s: u32, out: u32| {
        let r = session_len(&mut c, s, out);
        finish(&mut c, "session_len", r)
    })?;
    linker.func_wrap(MODULE, "session_truncate", |mut c: Caller<'_, HostState>, s: u32, n: u32| {
        let r = session_truncate(&mut c, s, n);
        finish(&mut c, "session_truncate", r)
    })?;
    Ok(())
}

/// One session as plain data (a snapshot's part of it).
#[derive(Debug, Clone)]
pub struct SessionState {
    /// The guest's handle for it.
    pub handle: u32,
    /// The model's name (models are named, not devices).
    pub model: String,
    /// The context length the session was created with.
    pub context: usize,
    /// Every token evaluated (the repetition penalty's window).
    pub history: Vec<u32>,
    /// Tokens sampled so far (the sampler's step).
    pub step: u64,
    /// The KV cache.
    pub kv: shoal_engine::kv::KvImage,
}

/// The inference state of an instance as plain data.
#[derive(Debug, Clone, Default)]
pub struct InferState {
    /// Open models: handle → name.
    pub opened: Vec<(u32, String)>,
    /// Sessions, by handle.
    pub sessions: Vec<SessionState>,
    /// The next handle to give out.
    pub next: u32,
}

impl InferCtx {
    /// The models this instance uses, by name.
    pub(crate) fn model_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.opened.values().map(|m| m.name.clone()).collect();
        v.extend(self.sessions.values().map(|s| s.model.name.clone()));
        v.sort();
        v.dedup();
        v
    }

    /// Copies every session's cache out (device caches come back to the host): in the
    /// backend's own fastest form when `parked` (to be restored soon, in this process), else
    /// portable.
    /// Whether any session is open (each holds a KV cache).
    pub(crate) fn has_sessions(&self) -> bool {
        !self.sessions.is_empty()
    }

    pub(crate) fn capture(&self, parked: bool) -> Result<InferState, EngineError> {
        let mut opened: Vec<(u32, String)> = self.opened.iter().map(|(h, m)| (*h, m.name.clone())).collect();
        opened.sort();
        let mut sessions = Vec::with_capacity(self.sessions.len());
        for (&handle, s) in &self.sessions {
            sessions.push(SessionState {
                handle,
                model: s.model.name.clone(),
                context: s.cache.capacity(),
                history: s.history.clone(),
                step: s.step,
                kv: if parked {
                    s.model.llama.park_cache(&s.cache)?
                } else {
                    shoal_engine::kv::KvImage::Portable(s.model.llama.export_cache(&s.cache)?)
                },
            });
        }
        sessions.sort_by_key(|s| s.handle);
        Ok(InferState { opened, sessions, next: self.next })
    }

    /// Rebuilds the state `st` describes on this host's models (loaded by name, on its backend).
    pub(crate) fn restore(&mut self, st: &InferState) -> Result<(), String> {
        for (h, name) in &st.opened {
            self.opened.insert(*h, self.models.get(name)?);
        }
        for s in &st.sessions {
            let model = self.models.get(&s.model)?;
            let cache = model
                .llama
                .import_image(&s.kv, s.context)
                .map_err(|e| format!("session {} on model `{}`: {e}", s.handle, s.model))?;
            self.sessions.insert(s.handle, Session { model, cache, history: s.history.clone(), step: s.step });
        }
        self.next = st.next.max(1);
        Ok(())
    }
}
