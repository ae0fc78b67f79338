//! The inference level of `shoal_v1`: models opened by name (shared by every
//! instance), sessions with their own KV cache, tokenize / detokenize, chat rendering,
//! and evaluation with sampling. Token ids and logits live in the guest's memory.
//!
//! What a call makes the host hold is bounded by what the guest passed: text calls take at
//! most [`MAX_TEXT`] bytes, a chat rendering at most the guest's memory in all its messages,
//! and a session's KV cache is charged to the instance's budget before it is made, its
//! context capped by the model's and by `--max-context`.
//!
//! Layouts are in `docs/abi.md` ("Inference").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use shoal_abi::{ChatMessage, ModelInfo, SamplerParams, TokenLogprob};
use shoal_engine::models::{Cache, EngineError};
use shoal_engine::sampler::Sampler;
use shoal_engine::template::Message;
use wasmtime::{Caller, Linker};

use crate::budget::{Charge, Quota};
use crate::error::{GuestError, Kind, err};
use crate::guest::{check_writable, memory, read_array, read_str, read_vec, write};
use crate::models::{LoadedModel, Models};
use crate::v1::{MODULE, V1Host, finish};

/// Sessions one instance may hold.
const MAX_SESSIONS: usize = 256;
/// The most tokens one call takes.
const MAX_TOKENS_PER_CALL: u32 = 1 << 20;
/// The most bytes of text one call takes (a prompt of millions of tokens, far past any
/// context).
pub const MAX_TEXT: u32 = 16 << 20;

struct Session {
    model: Arc<LoadedModel>,
    cache: Cache,
    /// The cache's bytes, charged to the instance.
    _charge: Charge,
    /// Every token evaluated, for the repetition penalty.
    history: Vec<u32>,
    /// Tokens sampled so far (kept in snapshots; draws are keyed by position, see
    /// [`draw_key`]).
    step: u64,
}

/// Per-instance inference state.
pub(crate) struct InferCtx {
    models: Arc<Models>,
    quota: Quota,
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
    pub(crate) fn new(models: Arc<Models>, quota: Quota) -> InferCtx {
        InferCtx {
            models,
            quota,
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

/// A store whose guests call the inference level of `shoal_v1`.
pub(crate) trait InferHost: V1Host {
    /// The instance's inference state.
    fn infer(&mut self) -> &mut InferCtx;
}

fn ctx<'a, T: InferHost>(caller: &'a mut Caller<'_, T>) -> &'a mut InferCtx {
    caller.data_mut().infer()
}

fn model<T: InferHost>(caller: &mut Caller<'_, T>, handle: u32) -> Result<Arc<LoadedModel>, GuestError> {
    ctx(caller)
        .opened
        .get(&handle)
        .cloned()
        .ok_or_else(|| err(Kind::BadHandle, format!("no open model with handle {handle}")))
}

fn session_mut<'a, T: InferHost>(caller: &'a mut Caller<'_, T>, handle: u32) -> Result<&'a mut Session, GuestError> {
    ctx(caller)
        .sessions
        .get_mut(&handle)
        .ok_or_else(|| err(Kind::BadHandle, format!("this instance has no session {handle}")))
}

/// Text of at most [`MAX_TEXT`] bytes.
fn read_text<T: InferHost>(
    caller: &mut Caller<'_, T>,
    mem: &wasmtime::Memory,
    ptr: u32,
    len: u32,
) -> Result<String, GuestError> {
    if len > MAX_TEXT {
        return Err(err(Kind::TooLarge, format!("{len} bytes of text in one call (at most {MAX_TEXT})")));
    }
    read_str(&*caller, mem, ptr, len)
}

fn read_tokens<T: InferHost>(
    caller: &mut Caller<'_, T>,
    mem: &wasmtime::Memory,
    ptr: u32,
    n: u32,
    vocab: usize,
) -> Result<Vec<u32>, GuestError> {
    if n > MAX_TOKENS_PER_CALL {
        return Err(err(Kind::TooLarge, format!("{n} tokens in one call (at most {MAX_TOKENS_PER_CALL})")));
    }
    let ids = crate::guest::read_u32s(&*caller, mem, ptr, n)?;
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(err(Kind::InvalidArgument, format!("token {bad} is not in the vocabulary of {vocab}")));
    }
    Ok(ids)
}

/// Writes `bytes` if they fit in `cap`, and their length to `len_out` either way.
fn write_sized<T: InferHost>(
    caller: &mut Caller<'_, T>,
    mem: &wasmtime::Memory,
    bytes: &[u8],
    out: u32,
    cap: u32,
    len_out: u32,
) -> Result<(), GuestError> {
    write(&mut *caller, mem, len_out, &(bytes.len() as u32).to_le_bytes())?;
    if bytes.len() > cap as usize {
        return Err(err(Kind::TooSmall, format!("{} bytes do not fit the {cap}-byte buffer", bytes.len())));
    }
    write(caller, mem, out, bytes)
}

fn model_open<T: InferHost>(caller: &mut Caller<'_, T>, name: u32, len: u32, out: u32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    if len > 4096 {
        return Err(err(Kind::TooLarge, format!("a model name of {len} bytes (at most 4096)")));
    }
    let name = read_str(&*caller, &mem, name, len)?;
    check_writable(&*caller, &mem, out, 4)?;
    let models = ctx(caller).models.clone();
    let m = models.get(&name).map_err(|e| err(Kind::ModelNotFound, e))?;
    let ctx = ctx(caller);
    if ctx.opened.len() >= MAX_SESSIONS {
        return Err(err(Kind::Busy, format!("this instance already has {MAX_SESSIONS} open models")));
    }
    let h = ctx.handle();
    ctx.opened.insert(h, m);
    write(caller, &mem, out, &h.to_le_bytes())
}

fn model_info<T: InferHost>(caller: &mut Caller<'_, T>, handle: u32, out: u32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let m = model(caller, handle)?;
    let c = m.llama.config();
    let record = ModelInfo::new(
        c.vocab_size as u32,
        c.context_length.min(u32::MAX as usize) as u32,
        m.tokenizer.bos(),
        m.tokenizer.eos(),
        &m.stop,
    );
    write(caller, &mem, out, &record.to_bytes())
}

#[allow(clippy::too_many_arguments)]
fn chat_render<T: InferHost>(
    caller: &mut Caller<'_, T>,
    handle: u32,
    msgs: u32,
    n: u32,
    add_gen: u32,
    out: u32,
    cap: u32,
    len_out: u32,
) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let m = model(caller, handle)?;
    if n > 4096 {
        return Err(err(Kind::TooLarge, format!("{n} messages (at most 4096)")));
    }
    let table = read_vec(&*caller, &mem, msgs, n * ChatMessage::SIZE as u32)?;
    let records: Vec<ChatMessage> = table
        .chunks_exact(ChatMessage::SIZE)
        .map(|r| ChatMessage::from_bytes(r.try_into().expect("a whole record")))
        .collect();
    // Records may all point at one long string: the host copies no more text than the
    // guest's memory holds (nor than one call's text), whatever the records say.
    let total: u64 = records.iter().map(|r| u64::from(r.role_len) + u64::from(r.content_len)).sum();
    let most = (mem.data_size(&*caller) as u64).min(u64::from(MAX_TEXT));
    if total > most {
        return Err(err(
            Kind::TooLarge,
            format!("{n} messages of {total} bytes in all; a call takes at most {most} bytes of text"),
        ));
    }
    let mut messages = Vec::with_capacity(records.len());
    for r in &records {
        let role = read_str(&*caller, &mem, r.role_ptr, r.role_len)?;
        let content = read_str(&*caller, &mem, r.content_ptr, r.content_len)?;
        messages.push(Message::new(role, content));
    }
    let text = m.template.render(&messages, add_gen != 0).map_err(|e| err(Kind::InvalidArgument, e.to_string()))?;
    write_sized(caller, &mem, text.as_bytes(), out, cap, len_out)
}

#[allow(clippy::too_many_arguments)]
fn tokenize<T: InferHost>(
    caller: &mut Caller<'_, T>,
    handle: u32,
    text: u32,
    len: u32,
    special: u32,
    out: u32,
    cap: u32,
    n_out: u32,
) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let m = model(caller, handle)?;
    let text = read_text(caller, &mem, text, len)?;
    let ids = m.tokenizer.encode(&text, special != 0);
    write(&mut *caller, &mem, n_out, &(ids.len() as u32).to_le_bytes())?;
    if ids.len() > cap as usize {
        return Err(err(Kind::TooSmall, format!("{} tokens do not fit the room for {cap}", ids.len())));
    }
    let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    write(caller, &mem, out, &bytes)
}

fn token_piece<T: InferHost>(
    caller: &mut Caller<'_, T>,
    handle: u32,
    id: u32,
    out: u32,
    cap: u32,
    len_out: u32,
) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let m = model(caller, handle)?;
    if id as usize >= m.tokenizer.vocab_size() {
        return Err(err(Kind::InvalidArgument, format!("token {id} is not in the vocabulary")));
    }
    let piece = m.tokenizer.token_piece(id).to_vec();
    write_sized(caller, &mem, &piece, out, cap, len_out)
}

fn session_create<T: InferHost>(
    caller: &mut Caller<'_, T>,
    handle: u32,
    context: u32,
    out: u32,
) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let m = model(caller, handle)?;
    check_writable(&*caller, &mem, out, 4)?;
    let ctx = ctx(caller);
    if ctx.sessions.len() >= MAX_SESSIONS {
        return Err(err(Kind::Busy, format!("this instance already has {MAX_SESSIONS} sessions")));
    }
    // The model file's own context length is not trusted for a default: 4,096 at most.
    let ctx_len = if context == 0 { ctx.quota.most_positions(&m).min(4096) } else { context as usize };
    let charge = ctx.quota.kv_cache(&m, ctx_len)?;
    let cache = m.llama.new_cache(ctx_len)?;
    let h = ctx.handle();
    ctx.sessions.insert(h, Session { model: m, cache, _charge: charge, history: Vec::new(), step: 0 });
    write(caller, &mem, out, &h.to_le_bytes())
}

fn session_free<T: InferHost>(caller: &mut Caller<'_, T>, handle: u32) -> Result<(), GuestError> {
    ctx(caller)
        .sessions
        .remove(&handle)
        .map(drop)
        .ok_or_else(|| err(Kind::BadHandle, format!("this instance has no session {handle}")))
}

/// Fails, naming the numbers, when `adding` tokens do not fit in the session's context.
fn check_room(s: &Session, adding: usize) -> Result<(), GuestError> {
    if adding > s.cache.remaining() {
        return Err(err(
            Kind::ContextFull,
            format!(
                "context_length_exceeded: {adding} tokens do not fit: the session holds {} of its {} positions",
                s.cache.len(),
                s.cache.capacity()
            ),
        ));
    }
    Ok(())
}

/// Runs `ids` through the session's model; returns the last logits.
fn eval<T: InferHost>(caller: &mut Caller<'_, T>, handle: u32, ids: &[u32]) -> Result<Vec<f32>, GuestError> {
    let t0 = Instant::now();
    let s = session_mut(caller, handle)?;
    check_room(s, ids.len())?;
    let logits = s.model.llama.forward(ids, &mut s.cache)?;
    s.history.extend_from_slice(ids);
    record(caller, ids.len(), t0);
    Ok(logits)
}

/// Counts a forward pass of `n` tokens that began at `t0` (for tokens/s reports).
fn record<T: InferHost>(caller: &mut Caller<'_, T>, n: usize, t0: Instant) {
    let dt = t0.elapsed().as_secs_f64();
    let ctx = ctx(caller);
    if n == 1 {
        ctx.decode_steps += 1;
        ctx.decode_seconds += dt;
    } else {
        ctx.prefill_tokens += n as u64;
        ctx.prefill_seconds += dt;
    }
}

fn session_eval<T: InferHost>(
    caller: &mut Caller<'_, T>,
    handle: u32,
    ids: u32,
    n: u32,
    logits_out: u32,
    logits_cap: u32,
) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let vocab = session_mut(caller, handle)?.model.llama.config().vocab_size;
    let tokens = read_tokens(caller, &mem, ids, n, vocab)?;
    if logits_out != 0 {
        if (logits_cap as usize) < vocab {
            return Err(err(Kind::TooSmall, format!("room for {logits_cap} logits; the vocabulary has {vocab}")));
        }
        check_writable(&*caller, &mem, logits_out, vocab * 4)?;
    }
    let logits = eval(caller, handle, &tokens)?;
    if logits_out != 0 {
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        write(caller, &mem, logits_out, &bytes)?;
    }
    Ok(())
}

/// The sampler a guest's record asks for.
fn sampler_of(p: &SamplerParams) -> Sampler {
    Sampler {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        repetition_penalty: p.repetition_penalty,
        seed: p.seed,
    }
}

/// The last 64 tokens of the session's history followed by `tokens`: the window the
/// repetition penalty looks at.
fn penalty_window(s: &Session, tokens: &[u32]) -> Vec<u32> {
    let mut window: Vec<u32> = s.history[s.history.len().saturating_sub(63)..].to_vec();
    window.extend_from_slice(&tokens[tokens.len().saturating_sub(64)..]);
    let start = window.len().saturating_sub(64);
    window.drain(..start);
    window
}

/// The key of the random draw for the token that follows `tokens`: its position in the
/// sequence. The same conversation (the same tokens before it) and the same seed draw the
/// same, whatever the session evaluated before (a pool actor reused, a cache truncated).
fn draw_key(s: &Session, tokens: &[u32]) -> u64 {
    (s.cache.len() + tokens.len()) as u64
}

fn session_decode<T: InferHost>(
    caller: &mut Caller<'_, T>,
    handle: u32,
    ids: u32,
    n: u32,
    params: u32,
    token_out: u32,
) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let vocab = session_mut(caller, handle)?.model.llama.config().vocab_size;
    let tokens = read_tokens(caller, &mem, ids, n, vocab)?;
    let p = SamplerParams::from_bytes(&read_array::<{ SamplerParams::SIZE }>(&*caller, &mem, params)?);
    let sampler = sampler_of(&p);
    check_writable(&*caller, &mem, token_out, 4)?;
    let t0 = Instant::now();
    let s = session_mut(caller, handle)?;
    check_room(s, tokens.len())?;
    let window = penalty_window(s, &tokens);
    let key = draw_key(s, &tokens);
    let next = s.model.llama.forward_sample(&tokens, &mut s.cache, &sampler, &window, key)?;
    s.history.extend_from_slice(&tokens);
    s.step += 1;
    record(caller, tokens.len(), t0);
    write(caller, &mem, token_out, &next.to_le_bytes())
}

/// `session_decode` that also reports log-probabilities: writes `1 + top` [`TokenLogprob`]
/// records, the chosen token's then the `top` most likely tokens', most likely first. The
/// log-probabilities are the model's own (a log-softmax of the logits, before temperature,
/// penalty or truncation); the choice is the sampler's, drawn as `session_decode` draws.
fn session_decode_top<T: InferHost>(
    caller: &mut Caller<'_, T>,
    handle: u32,
    ids: u32,
    n: u32,
    params: u32,
    top: u32,
    out: u32,
) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let vocab = session_mut(caller, handle)?.model.llama.config().vocab_size;
    let tokens = read_tokens(caller, &mem, ids, n, vocab)?;
    let p = SamplerParams::from_bytes(&read_array::<{ SamplerParams::SIZE }>(&*caller, &mem, params)?);
    let sampler = sampler_of(&p);
    if top as usize > TokenLogprob::MAX_TOP {
        return Err(err(
            Kind::InvalidArgument,
            format!("{top} alternatives asked for; at most {}", TokenLogprob::MAX_TOP),
        ));
    }
    let records = 1 + top as usize;
    check_writable(&*caller, &mem, out, records * TokenLogprob::SIZE)?;
    let (window, key) = {
        let s = session_mut(caller, handle)?;
        check_room(s, tokens.len())?;
        (penalty_window(s, &tokens), draw_key(s, &tokens))
    };
    let logits = eval(caller, handle, &tokens)?;
    session_mut(caller, handle)?.step += 1;
    let next = sampler.sample(&logits, &window, key).unwrap_or(0);
    let lp = log_softmax(&logits);
    let mut order: Vec<u32> = (0..lp.len() as u32).collect();
    let k = (top as usize).min(order.len());
    let desc = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, desc);
    }
    order.truncate(k);
    order.sort_unstable_by(desc);
    let mut bytes = Vec::with_capacity(records * TokenLogprob::SIZE);
    for id in std::iter::once(next).chain(order) {
        bytes.extend_from_slice(
            &TokenLogprob { id, logprob: lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY) }.to_bytes(),
        );
    }
    bytes.resize(records * TokenLogprob::SIZE, 0);
    write(caller, &mem, out, &bytes)
}

/// Natural-log probabilities of `logits` (NaN counts as impossible).
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let sum: f64 = logits.iter().filter(|v| !v.is_nan()).map(|&v| ((v - max) as f64).exp()).sum();
    let log_sum = sum.ln() as f32;
    logits.iter().map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v - max - log_sum }).collect()
}

fn session_len<T: InferHost>(caller: &mut Caller<'_, T>, handle: u32, out: u32) -> Result<(), GuestError> {
    let mem = memory(caller)?;
    let len = session_mut(caller, handle)?.cache.len() as u32;
    write(caller, &mem, out, &len.to_le_bytes())
}

fn session_truncate<T: InferHost>(caller: &mut Caller<'_, T>, handle: u32, n: u32) -> Result<(), GuestError> {
    let s = session_mut(caller, handle)?;
    if n as usize > s.cache.len() {
        return Err(err(Kind::InvalidArgument, format!("cannot truncate {} tokens to {n}", s.cache.len())));
    }
    s.cache.truncate(n as usize);
    s.history.truncate(n as usize);
    Ok(())
}

/// Adds the inference functions to `linker`.
pub(crate) fn add_to_linker<T: InferHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, "model_open", |mut c: Caller<'_, T>, name: u32, len: u32, out: u32| {
        let r = model_open(&mut c, name, len, out);
        finish(&mut c, "model_open", r)
    })?;
    linker.func_wrap(MODULE, "model_info", |mut c: Caller<'_, T>, m: u32, out: u32| {
        let r = model_info(&mut c, m, out);
        finish(&mut c, "model_info", r)
    })?;
    linker.func_wrap(
        MODULE,
        "chat_render",
        |mut c: Caller<'_, T>, m: u32, msgs: u32, n: u32, add_gen: u32, out: u32, cap: u32, len_out: u32| {
            let r = chat_render(&mut c, m, msgs, n, add_gen, out, cap, len_out);
            finish(&mut c, "chat_render", r)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "tokenize",
        |mut c: Caller<'_, T>, m: u32, text: u32, len: u32, special: u32, out: u32, cap: u32, n_out: u32| {
            let r = tokenize(&mut c, m, text, len, special, out, cap, n_out);
            finish(&mut c, "tokenize", r)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "token_piece",
        |mut c: Caller<'_, T>, m: u32, id: u32, out: u32, cap: u32, len_out: u32| {
            let r = token_piece(&mut c, m, id, out, cap, len_out);
            finish(&mut c, "token_piece", r)
        },
    )?;
    linker.func_wrap(MODULE, "session_create", |mut c: Caller<'_, T>, m: u32, ctx: u32, out: u32| {
        let r = session_create(&mut c, m, ctx, out);
        finish(&mut c, "session_create", r)
    })?;
    linker.func_wrap(MODULE, "session_free", |mut c: Caller<'_, T>, s: u32| {
        let r = session_free(&mut c, s);
        finish(&mut c, "session_free", r)
    })?;
    linker.func_wrap(
        MODULE,
        "session_eval",
        |mut c: Caller<'_, T>, s: u32, ids: u32, n: u32, logits: u32, cap: u32| {
            let r = session_eval(&mut c, s, ids, n, logits, cap);
            finish(&mut c, "session_eval", r)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "session_decode",
        |mut c: Caller<'_, T>, s: u32, ids: u32, n: u32, params: u32, out: u32| {
            let r = session_decode(&mut c, s, ids, n, params, out);
            finish(&mut c, "session_decode", r)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "session_decode_top",
        |mut c: Caller<'_, T>, s: u32, ids: u32, n: u32, params: u32, top: u32, out: u32| {
            let r = session_decode_top(&mut c, s, ids, n, params, top, out);
            finish(&mut c, "session_decode_top", r)
        },
    )?;
    linker.func_wrap(MODULE, "session_len", |mut c: Caller<'_, T>, s: u32, out: u32| {
        let r = session_len(&mut c, s, out);
        finish(&mut c, "session_len", r)
    })?;
    linker.func_wrap(MODULE, "session_truncate", |mut c: Caller<'_, T>, s: u32, n: u32| {
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
    /// Positions its sessions' KV caches hold, and can hold, in all.
    pub(crate) fn context_use(&self) -> (usize, usize) {
        self.sessions.values().fold((0, 0), |(u, c), s| (u + s.cache.len(), c + s.cache.capacity()))
    }

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
            let what = |e: &dyn std::fmt::Display| format!("session {} on model `{}`: {e}", s.handle, s.model);
            // A snapshot's sessions are held to the same limits as new ones.
            let charge = self.quota.kv_cache(&model, s.context).map_err(|e| what(&e))?;
            let cache = model.llama.import_image(&s.kv, s.context).map_err(|e| what(&e))?;
            self.sessions
                .insert(s.handle, Session { model, cache, _charge: charge, history: s.history.clone(), step: s.step });
        }
        self.next = st.next.max(1);
        Ok(())
    }
}
