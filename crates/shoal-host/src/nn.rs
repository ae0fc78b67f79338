//! `wasi_ephemeral_nn` with the GGML encoding: the ABI of WasmEdge's llama.cpp plugin, which
//! the `wasmedge-wasi-nn` crate (and the chat and API-server apps built on it) calls, served
//! by shoal's engine. Models are the host's (`--nn-preload NAME:GGML:TARGET:PATH` names them),
//! loaded once and shared with every instance.
//!
//! Beyond the home runtime: when a context's new prompt extends what its KV cache already
//! holds (a chat app sends the whole conversation every turn), only the new tokens are
//! evaluated (metadata `"prefix-reuse": false` turns that off).
//!
//! Layouts (wasm32, little-endian): a tensor is 20 bytes `{dims_ptr, dims_len, type (u8,
//! padded to 4), data_ptr, data_len}`; a graph-builder array is `n` pairs `{ptr, len}`.
//! Input 0 is the prompt (UTF-8 bytes), input 1 metadata JSON; output 0 is the generated text
//! (`compute`) or the last token's text (`get_output_single`), output 1 JSON token counts.

use std::collections::HashMap;
use std::sync::Arc;

use shoal_engine::models::Cache;
use shoal_engine::sampler::Sampler;
use shoal_engine::tokenizer::StreamDecoder;
use wasmtime::{Caller, Linker};

use crate::budget::{Charge, Quota, human_bytes};
use crate::error::{GuestError, Kind};
use crate::guest::{memory, read_u32s, read_vec, write};
use crate::models::{LoadedModel, Models};

/// The module name guests import.
pub const MODULE: &str = "wasi_ephemeral_nn";
/// Graphs or contexts one instance may hold.
const MAX_HANDLES: usize = 64;
/// The GGML graph encoding (and auto-detect).
const ENCODING_GGML: u32 = 6;
const ENCODING_AUTODETECT: u32 = 5;

pub use crate::error::NnErrno;

/// A failed `wasi_ephemeral_nn` call (its code is [`GuestError::nn_errno`]).
pub(crate) type NnError = GuestError;

pub(crate) fn e(kind: Kind, msg: impl Into<String>) -> NnError {
    GuestError::new(kind, msg)
}

/// The most bytes of a prompt or of metadata one `set_input` takes.
const MAX_INPUT: u32 = 16 << 20;

/// Generation settings from the metadata JSON (WasmEdge's keys).
#[derive(Debug, Clone)]
pub(crate) struct Options {
    ctx_size: usize,
    n_predict: Option<usize>,
    sampler: Sampler,
    reverse_prompt: Option<String>,
    stream_stdout: bool,
    log: bool,
    embedding: bool,
    prefix_reuse: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ctx_size: 4096,
            n_predict: None,
            // The llama.cpp plugin's defaults.
            sampler: Sampler {
                temperature: shoal_abi::DEFAULT_TEMPERATURE,
                top_k: 40,
                top_p: 0.95,
                repetition_penalty: 1.1,
                seed: 42,
            },
            reverse_prompt: None,
            stream_stdout: false,
            log: false,
            embedding: false,
            prefix_reuse: true,
        }
    }
}

impl Options {
    /// Applies the keys of `json`; unknown keys are accepted and logged.
    pub(crate) fn apply(&mut self, json: &[u8]) -> Result<(), NnError> {
        let v: serde_json::Value = serde_json::from_slice(json)
            .map_err(|err| e(Kind::InvalidArgument, format!("metadata is not valid JSON: {err}")))?;
        let obj = v.as_object().ok_or_else(|| e(Kind::InvalidArgument, "metadata must be a JSON object"))?;
        let num = |k: &str, v: &serde_json::Value| {
            v.as_f64().ok_or_else(|| e(Kind::InvalidArgument, format!("metadata `{k}` must be a number, not {v}")))
        };
        let flag = |k: &str, v: &serde_json::Value| {
            v.as_bool()
                .ok_or_else(|| e(Kind::InvalidArgument, format!("metadata `{k}` must be true or false, not {v}")))
        };
        for (k, v) in obj {
            match k.as_str() {
                "ctx-size" => self.ctx_size = (num(k, v)? as usize).max(1),
                "n-predict" => {
                    let n = num(k, v)?;
                    self.n_predict = (n >= 0.0).then_some(n as usize);
                }
                "temp" | "temperature" => self.sampler.temperature = num(k, v)? as f32,
                "top-p" | "top_p" => self.sampler.top_p = num(k, v)? as f32,
                "top-k" | "top_k" => self.sampler.top_k = num(k, v)? as usize,
                "repeat-penalty" | "repeat_penalty" => self.sampler.repetition_penalty = num(k, v)? as f32,
                "seed" => self.sampler.seed = num(k, v)? as u64,
                "reverse-prompt" => {
                    self.reverse_prompt = v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
                }
                "stream-stdout" => self.stream_stdout = flag(k, v)?,
                "enable-log" | "enable-debug-log" => self.log |= flag(k, v)?,
                "embedding" => self.embedding = flag(k, v)?,
                "prefix-reuse" => self.prefix_reuse = flag(k, v)?,
                _ => log::info!("wasi-nn: metadata key `{k}` ({v}) is accepted and ignored"),
            }
        }
        Ok(())
    }
}

/// A graph's model: the host's (by name), or the instance's own (from its bytes), which
/// holds its charge until the last graph or context using it goes.
#[derive(Clone)]
pub(crate) struct GraphModel {
    pub(crate) model: Arc<LoadedModel>,
    pub(crate) private: Option<Arc<Charge>>,
}

impl GraphModel {
    /// The host's model.
    pub(crate) fn shared(model: Arc<LoadedModel>) -> GraphModel {
        GraphModel { model, private: None }
    }
}

struct Graph {
    model: GraphModel,
    options: Options,
}

/// A generation in progress (`compute_single`).
struct Single {
    /// The token the prompt's evaluation sampled, not yet handed out.
    first: Option<u32>,
    /// The last token handed out, not yet evaluated (the next step's input).
    last: Option<u32>,
    decoder: StreamDecoder,
    text: String,
    done: bool,
}

pub(crate) struct Context {
    model: Arc<LoadedModel>,
    /// The charge of a model from the guest's bytes, kept while this context uses it.
    _private: Option<Arc<Charge>>,
    quota: Quota,
    /// The charge of the KV cache.
    cache_charge: Option<Charge>,
    pub(crate) options: Options,
    pub(crate) prompt: Option<Vec<u8>>,
    /// The KV cache and the tokens in it.
    cache: Option<(Cache, Vec<u32>)>,
    pub(crate) output: Vec<u8>,
    last_piece: Vec<u8>,
    single: Option<Single>,
    input_tokens: usize,
    output_tokens: usize,
    /// Tokens reused from the cache at the last prompt (reported in output 1).
    reused_tokens: usize,
}

/// Per-instance `wasi_ephemeral_nn` state.
pub(crate) struct NnCtx {
    models: Arc<Models>,
    quota: Quota,
    graphs: HashMap<u32, Graph>,
    contexts: HashMap<u32, Context>,
    next: u32,
    /// The last failure, for the host's report (wasi-nn has no `last_error`).
    pub(crate) last_error: Option<String>,
}

impl NnCtx {
    pub(crate) fn new(models: Arc<Models>, quota: Quota) -> NnCtx {
        NnCtx { models, quota, graphs: HashMap::new(), contexts: HashMap::new(), next: 1, last_error: None }
    }

    fn handle(&mut self) -> Result<u32, NnError> {
        if self.graphs.len() + self.contexts.len() >= MAX_HANDLES {
            return Err(e(Kind::Busy, format!("this instance already holds {MAX_HANDLES} graphs and contexts")));
        }
        let h = self.next;
        self.next = self.next.wrapping_add(1).max(1);
        Ok(h)
    }
}

/// A store whose guests call `wasi_ephemeral_nn`.
pub(crate) trait NnHost: Send + 'static {
    /// The instance's wasi-nn state.
    fn nn(&mut self) -> &mut NnCtx;
}

type C<'a, T> = Caller<'a, T>;

fn nn<'a, T: NnHost>(c: &'a mut C<'_, T>) -> &'a mut NnCtx {
    c.data_mut().nn()
}

/// The host's model `name` (`--nn-preload`), loaded.
pub(crate) fn open_named(models: &Models, name: &str) -> Result<Arc<LoadedModel>, NnError> {
    if !models.names().iter().any(|n| n == name) {
        return Err(e(
            Kind::ModelNotFound,
            format!(
                "no model named `{name}` (preloaded: {}); name one with --nn-preload NAME:GGML:AUTO:PATH",
                models.names().join(", ")
            ),
        ));
    }
    models.get(name).map_err(|m| e(Kind::Device, m))
}

fn add_graph<T: NnHost>(c: &mut C<'_, T>, model: GraphModel, options: Options, out: u32) -> Result<(), NnError> {
    let m = memory(c)?;
    let h = nn(c).handle()?;
    write(&mut *c, &m, out, &h.to_le_bytes())?;
    nn(c).graphs.insert(h, Graph { model, options });
    Ok(())
}

fn load<T: NnHost>(
    c: &mut C<'_, T>,
    builders: u32,
    n: u32,
    encoding: u32,
    target: u32,
    out: u32,
) -> Result<(), NnError> {
    if encoding != ENCODING_GGML && encoding != ENCODING_AUTODETECT {
        return Err(e(Kind::InvalidEncoding, format!("graph encoding {encoding}: shoal runs GGML (6) models")));
    }
    if target > 3 {
        return Err(e(Kind::InvalidArgument, format!("execution target {target} (0 CPU, 1 GPU, 2 TPU, 3 AUTO)")));
    }
    let m = memory(c)?;
    if n == 0 || n > 2 {
        return Err(e(
            Kind::InvalidArgument,
            format!("{n} graph builders: GGML takes the model bytes and optional metadata"),
        ));
    }
    let pairs = read_u32s(&*c, &m, builders, n * 2)?;
    // The bytes are charged before they are copied out of the guest.
    let quota = nn(c).quota.clone();
    let copy = quota.budget.charge(&format!("a copy of the {} bytes of a model", pairs[1]), pairs[1].into())?;
    let model = read_vec(&*c, &m, pairs[0], pairs[1])?;
    let mut options = Options::default();
    if n == 2 {
        options.apply(&read_input(c, &m, pairs[2], pairs[3])?)?;
    }
    let engine = nn(c).models.engine();
    let model = model_from_bytes(&quota, engine, model, copy, Kind::Device)?;
    add_graph(c, model, options, out)
}

/// A model from a guest's bytes, private to its instance: parsed from memory (no file is
/// written), its weights charged to the instance before they are made, freed with the last
/// graph or context that uses it. `copy` is the charge of the bytes themselves, given back
/// once the weights are loaded. Bytes shoal cannot load are `unloadable`.
pub(crate) fn model_from_bytes(
    quota: &Quota,
    engine: shoal_engine::models::EngineKind,
    bytes: Vec<u8>,
    copy: Charge,
    unloadable: Kind,
) -> Result<GraphModel, NnError> {
    let len = bytes.len();
    let file = shoal_engine::gguf::GgufFile::from_bytes(bytes)
        .map_err(|err| e(unloadable, format!("not a model shoal can load: {err}")))?;
    let weights = crate::models::weights_bytes(&file);
    let charge =
        quota.budget.charge(&format!("the weights of a {len}-byte model ({})", human_bytes(weights)), weights)?;
    let name = format!("guest model of {len} bytes");
    let model = crate::models::from_gguf_bytes(&name, &file, engine)
        .map_err(|err| e(unloadable, format!("not a model shoal can load: {err}")))?;
    drop((file, copy));
    Ok(GraphModel { model: Arc::new(model), private: Some(Arc::new(charge)) })
}

/// A prompt or metadata of at most [`MAX_INPUT`] bytes.
fn read_input<T: NnHost>(c: &mut C<'_, T>, m: &wasmtime::Memory, at: u32, len: u32) -> Result<Vec<u8>, NnError> {
    if len > MAX_INPUT {
        return Err(e(Kind::TooLarge, format!("an input of {len} bytes (at most {MAX_INPUT})")));
    }
    read_vec(&*c, m, at, len)
}

fn load_by_name<T: NnHost>(
    c: &mut C<'_, T>,
    name: u32,
    len: u32,
    config: Option<(u32, u32)>,
    out: u32,
) -> Result<(), NnError> {
    let m = memory(c)?;
    if len > 4096 {
        return Err(e(Kind::InvalidArgument, format!("a model name of {len} bytes (at most 4096)")));
    }
    let name = String::from_utf8(read_vec(&*c, &m, name, len)?)
        .map_err(|_| e(Kind::InvalidArgument, "the model name is not UTF-8"))?;
    let mut options = Options::default();
    if let Some((p, l)) = config {
        options.apply(&read_input(c, &m, p, l)?)?;
    }
    let models = nn(c).models.clone();
    let model = open_named(&models, &name)?;
    add_graph(c, GraphModel::shared(model), options, out)
}

fn init_execution_context<T: NnHost>(c: &mut C<'_, T>, graph: u32, out: u32) -> Result<(), NnError> {
    let m = memory(c)?;
    let g = nn(c).graphs.get(&graph).ok_or_else(|| e(Kind::InvalidArgument, format!("no graph {graph}")))?;
    let (model, options) = (g.model.clone(), g.options.clone());
    let h = nn(c).handle()?;
    write(&mut *c, &m, out, &h.to_le_bytes())?;
    let quota = nn(c).quota.clone();
    nn(c).contexts.insert(h, Context::new(model, options, quota));
    Ok(())
}

impl Context {
    /// A context for `model` with no prompt and no cache yet.
    pub(crate) fn new(model: GraphModel, options: Options, quota: Quota) -> Context {
        Context {
            model: model.model,
            _private: model.private,
            quota,
            cache_charge: None,
            options,
            prompt: None,
            cache: None,
            output: Vec::new(),
            last_piece: Vec::new(),
            single: None,
            input_tokens: 0,
            output_tokens: 0,
            reused_tokens: 0,
        }
    }
}

fn context<'a, T: NnHost>(c: &'a mut C<'_, T>, h: u32) -> Result<&'a mut Context, NnError> {
    nn(c).contexts.get_mut(&h).ok_or_else(|| e(Kind::InvalidArgument, format!("no execution context {h}")))
}

fn set_input<T: NnHost>(c: &mut C<'_, T>, ctx: u32, index: u32, tensor: u32) -> Result<(), NnError> {
    let m = memory(c)?;
    context(c, ctx)?;
    let t = read_u32s(&*c, &m, tensor, 5)?;
    let (dims_ptr, dims_len, ty, data_ptr, data_len) = (t[0], t[1], t[2] & 0xff, t[3], t[4]);
    // Dimensions must be readable; GGML ignores their values (apps pass [1] for a prompt).
    if dims_len > 8 {
        return Err(e(Kind::InvalidArgument, format!("a tensor of {dims_len} dimensions (at most 8)")));
    }
    read_u32s(&*c, &m, dims_ptr, dims_len)?;
    if ty > 5 {
        return Err(e(Kind::InvalidArgument, format!("tensor type {ty} (0 F16 … 5 I64)")));
    }
    let data = read_input(c, &m, data_ptr, data_len)?;
    let cx = context(c, ctx)?;
    match index {
        0 => {
            String::from_utf8(data.clone()).map_err(|_| e(Kind::InvalidArgument, "the prompt is not UTF-8"))?;
            cx.prompt = Some(data);
            cx.single = None;
        }
        1 => cx.options.apply(&data)?,
        _ => return Err(e(Kind::InvalidArgument, format!("input {index}: 0 is the prompt, 1 the metadata"))),
    }
    Ok(())
}

/// The prompt's tokens and the context size, checked: a prompt is set, not empty, and fits.
fn prompt_ids(cx: &Context) -> Result<(Vec<u32>, usize), NnError> {
    let prompt = cx.prompt.as_ref().ok_or_else(|| e(Kind::NotFound, "no prompt: set input 0 first"))?;
    let ids = cx.model.tokenizer.encode(&String::from_utf8_lossy(prompt), true);
    if ids.is_empty() {
        return Err(e(Kind::InvalidArgument, "the prompt is empty"));
    }
    // The context asked for, within the model's and the instance's limits.
    let ctx_size = cx.options.ctx_size.min(cx.quota.most_positions(&cx.model));
    if ids.len() > ctx_size {
        return Err(e(
            Kind::PromptTooLong,
            format!("the prompt has {} tokens; the context holds {ctx_size}", ids.len()),
        ));
    }
    Ok((ids, ctx_size))
}

/// Tokenizes the prompt, reuses the cached prefix, evaluates the rest and samples the first
/// token; returns it.
fn start(cx: &mut Context) -> Result<u32, NnError> {
    let (ids, ctx_size) = prompt_ids(cx)?;
    let model = cx.model.clone();
    let fresh = match &cx.cache {
        Some((cache, _)) => cache.capacity() != ctx_size,
        None => true,
    };
    if fresh {
        // The old cache and its charge go before the new one is charged.
        cx.cache = None;
        cx.cache_charge = None;
        let charge = cx.quota.kv_cache(&model, ctx_size)?;
        let cache = model.llama.new_cache(ctx_size)?;
        cx.cache = Some((cache, Vec::new()));
        cx.cache_charge = Some(charge);
    }
    let (cache, seen) = cx.cache.as_mut().expect("just made");
    let common = if cx.options.prefix_reuse {
        seen.iter().zip(&ids).take_while(|(a, b)| a == b).count().min(ids.len() - 1)
    } else {
        0
    };
    cache.truncate(common);
    seen.truncate(common);
    cx.reused_tokens = common;
    cx.input_tokens = ids.len();
    cx.output_tokens = 0;
    cx.output.clear();
    cx.last_piece.clear();
    let window = &ids[ids.len().saturating_sub(64)..];
    let next = model.llama.forward_sample(&ids[common..], cache, &cx.options.sampler, window, 0)?;
    seen.extend_from_slice(&ids[common..]);
    if cx.options.log {
        log::info!("wasi-nn: prompt of {} tokens, {common} reused from the cache", ids.len());
    }
    Ok(next)
}

/// Whether `token` ends an answer (the template's stop tokens, end of sequence).
fn is_stop(cx: &Context, token: u32) -> bool {
    cx.model.stop.contains(&token) || Some(token) == cx.model.tokenizer.eos()
}

/// Emits a generated token: its text becomes the last piece (streamed to stdout when asked).
/// Returns whether generation ends after it (n-predict, reverse prompt).
fn emit(cx: &mut Context, s: &mut Single, token: u32) -> bool {
    let piece = s.decoder.push(&cx.model.tokenizer, token);
    s.text.push_str(&piece);
    cx.output_tokens += 1;
    if cx.options.stream_stdout {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    }
    cx.last_piece = piece.into_bytes();
    let reverse = cx.options.reverse_prompt.as_ref().is_some_and(|rp| s.text.ends_with(rp.as_str()));
    reverse || cx.options.n_predict.is_some_and(|n| cx.output_tokens >= n)
}

/// One step: evaluates the pending token and samples the next.
fn step(cx: &mut Context, token: u32) -> Result<u32, NnError> {
    let model = cx.model.clone();
    let (cache, seen) = cx.cache.as_mut().ok_or_else(|| e(Kind::Device, "no session"))?;
    if cache.remaining() == 0 {
        return Err(e(Kind::ContextFull, format!("the context of {} tokens is full", cache.capacity())));
    }
    let window = &seen[seen.len().saturating_sub(63)..];
    let mut w = window.to_vec();
    w.push(token);
    let step = cx.output_tokens as u64;
    let next = model.llama.forward_sample(&[token], cache, &cx.options.sampler, &w, step)?;
    seen.push(token);
    Ok(next)
}

/// Embedding mode: output 0 becomes `{"n_embedding": D, "embedding": [...]}`, the prompt's
/// last-token final hidden state, L2-normalised.
fn embed(cx: &mut Context) -> Result<(), NnError> {
    let (ids, _) = prompt_ids(cx)?;
    let model = cx.model.clone();
    // Its own cache: an embedding is of this text alone.
    let _charge = cx.quota.kv_cache(&model, ids.len())?;
    let h = crate::embed::embedding(&model, &ids)?;
    cx.input_tokens = ids.len();
    cx.output_tokens = 0;
    cx.reused_tokens = 0;
    cx.output = serde_json::json!({"n_embedding": h.len(), "embedding": h}).to_string().into_bytes();
    Ok(())
}

/// Output 0 of a finished answer: its text without the reverse prompt that ended it.
fn answer(options: &Options, mut text: String) -> Vec<u8> {
    if let Some(rp) = &options.reverse_prompt
        && text.ends_with(rp.as_str())
    {
        text.truncate(text.len() - rp.len());
    }
    text.into_bytes()
}

fn compute<T: NnHost>(c: &mut C<'_, T>, ctx: u32) -> Result<(), NnError> {
    compute_context(context(c, ctx)?)
}

/// Answers the context's prompt whole (or embeds it): output 0 is set.
pub(crate) fn compute_context(cx: &mut Context) -> Result<(), NnError> {
    cx.single = None;
    if cx.options.embedding {
        return embed(cx);
    }
    let mut s = Single { first: None, last: None, decoder: StreamDecoder::new(), text: String::new(), done: false };
    let mut token = start(cx)?;
    let result = loop {
        if is_stop(cx, token) || emit(cx, &mut s, token) {
            break Ok(());
        }
        match step(cx, token) {
            Ok(t) => token = t,
            Err(err) => break Err(err),
        }
    };
    cx.output = answer(&cx.options, s.text);
    result
}

fn compute_single<T: NnHost>(c: &mut C<'_, T>, ctx: u32) -> Result<(), NnError> {
    let cx = context(c, ctx)?;
    if cx.options.embedding {
        return Err(e(Kind::Unsupported, "embedding mode computes with `compute`, not `compute_single`"));
    }
    let mut s = match cx.single.take() {
        Some(s) => s,
        None => {
            let first = start(cx)?;
            Single { first: Some(first), last: None, decoder: StreamDecoder::new(), text: String::new(), done: false }
        }
    };
    let r = (|| {
        let token = match (s.done, s.first.take(), s.last.take()) {
            (true, _, _) => return Err(e(Kind::EndOfSequence, "the generation has ended")),
            (_, Some(t), _) => t,
            (_, None, Some(last)) => step(cx, last)?,
            (_, None, None) => return Err(e(Kind::EndOfSequence, "the generation has ended")),
        };
        if is_stop(cx, token) {
            s.done = true;
            cx.last_piece.clear();
            return Err(e(Kind::EndOfSequence, "end of sequence"));
        }
        // The piece is readable now; when it ends the answer, the next call says so.
        s.done = emit(cx, &mut s, token);
        s.last = Some(token);
        Ok(())
    })();
    cx.single = Some(s);
    r
}

fn fini_single<T: NnHost>(c: &mut C<'_, T>, ctx: u32) -> Result<(), NnError> {
    let cx = context(c, ctx)?;
    if let Some(s) = cx.single.take() {
        cx.output = answer(&cx.options, s.text);
    }
    Ok(())
}

pub(crate) fn metadata(cx: &Context) -> Vec<u8> {
    serde_json::json!({
        "input_tokens": cx.input_tokens,
        "output_tokens": cx.output_tokens,
        "reused_tokens": cx.reused_tokens,
        "llama_build_number": 0,
        "llama_commit": "shoal",
    })
    .to_string()
    .into_bytes()
}

fn get_output<T: NnHost>(
    c: &mut C<'_, T>,
    ctx: u32,
    index: u32,
    out: u32,
    cap: u32,
    size_out: u32,
    single: bool,
) -> Result<(), NnError> {
    let m = memory(c)?;
    let cx = context(c, ctx)?;
    let bytes = match index {
        0 if single => cx.last_piece.clone(),
        0 => match &cx.single {
            Some(s) => s.text.clone().into_bytes(),
            None => cx.output.clone(),
        },
        1 => metadata(cx),
        _ => return Err(e(Kind::InvalidArgument, format!("output {index}: 0 is the text, 1 the token counts"))),
    };
    // The size is written either way, so a guest whose buffer is too small learns how
    // large a one it needs.
    write(&mut *c, &m, size_out, &(bytes.len() as u32).to_le_bytes())?;
    if bytes.len() > cap as usize {
        return Err(e(Kind::TooSmall, format!("output {index} has {} bytes; the buffer holds {cap}", bytes.len())));
    }
    write(c, &m, out, &bytes)
}

/// The call's code; an interrupted call (deadline, kill) stops the guest with a trap.
fn ret<T: NnHost>(c: &mut C<'_, T>, name: &str, r: Result<(), NnError>) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(0),
        Err(err) => {
            if let Some(why) = err.interrupted() {
                log::info!("wasi-nn {name} stopped: {why}");
                return Err(wasmtime::Trap::Interrupt.into());
            }
            let code = err.nn_errno();
            if code != NnErrno::EndOfSequence {
                log::debug!("wasi-nn {name}: {} ({code:?})", err.message);
                nn(c).last_error = Some(format!("{name}: {}", err.message));
            }
            Ok(code as i32)
        }
    }
}

/// Adds `wasi_ephemeral_nn` to `linker`.
pub(crate) fn add_to_linker<T: NnHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, "load", |mut c: C<'_, T>, b: u32, n: u32, enc: u32, target: u32, out: u32| {
        let r = load(&mut c, b, n, enc, target, out);
        ret(&mut c, "load", r)
    })?;
    linker.func_wrap(MODULE, "load_by_name", |mut c: C<'_, T>, name: u32, len: u32, out: u32| {
        let r = load_by_name(&mut c, name, len, None, out);
        ret(&mut c, "load_by_name", r)
    })?;
    linker.func_wrap(
        MODULE,
        "load_by_name_with_config",
        |mut c: C<'_, T>, name: u32, len: u32, cfg: u32, cfg_len: u32, out: u32| {
            let r = load_by_name(&mut c, name, len, Some((cfg, cfg_len)), out);
            ret(&mut c, "load_by_name_with_config", r)
        },
    )?;
    linker.func_wrap(MODULE, "init_execution_context", |mut c: C<'_, T>, g: u32, out: u32| {
        let r = init_execution_context(&mut c, g, out);
        ret(&mut c, "init_execution_context", r)
    })?;
    linker.func_wrap(MODULE, "set_input", |mut c: C<'_, T>, ctx: u32, index: u32, tensor: u32| {
        let r = set_input(&mut c, ctx, index, tensor);
        ret(&mut c, "set_input", r)
    })?;
    linker.func_wrap(MODULE, "compute", |mut c: C<'_, T>, ctx: u32| {
        let r = compute(&mut c, ctx);
        ret(&mut c, "compute", r)
    })?;
    linker.func_wrap(MODULE, "compute_single", |mut c: C<'_, T>, ctx: u32| {
        let r = compute_single(&mut c, ctx);
        ret(&mut c, "compute_single", r)
    })?;
    linker.func_wrap(MODULE, "fini_single", |mut c: C<'_, T>, ctx: u32| {
        let r = fini_single(&mut c, ctx);
        ret(&mut c, "fini_single", r)
    })?;
    linker.func_wrap(
        MODULE,
        "get_output",
        |mut c: C<'_, T>, ctx: u32, index: u32, out: u32, cap: u32, size_out: u32| {
            let r = get_output(&mut c, ctx, index, out, cap, size_out, false);
            ret(&mut c, "get_output", r)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "get_output_single",
        |mut c: C<'_, T>, ctx: u32, index: u32, out: u32, cap: u32, size_out: u32| {
            let r = get_output(&mut c, ctx, index, out, cap, size_out, true);
            ret(&mut c, "get_output_single", r)
        },
    )?;
    linker.func_wrap(MODULE, "unload", |mut c: C<'_, T>, g: u32| {
        let r = nn(&mut c).graphs.remove(&g).map(drop).ok_or_else(|| e(Kind::InvalidArgument, format!("no graph {g}")));
        ret(&mut c, "unload", r)
    })?;
    linker.func_wrap(MODULE, "finalize_execution_context", |mut c: C<'_, T>, ctx: u32| {
        let r = nn(&mut c)
            .contexts
            .remove(&ctx)
            .map(drop)
            .ok_or_else(|| e(Kind::InvalidArgument, format!("no execution context {ctx}")));
        ret(&mut c, "finalize_execution_context", r)
    })?;
    Ok(())
}

impl Options {
    /// The options as the metadata JSON they were read from (WasmEdge's keys).
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ctx-size": self.ctx_size,
            "n-predict": self.n_predict.map_or(-1i64, |n| n as i64),
            "temperature": self.sampler.temperature,
            "top-p": self.sampler.top_p,
            "top-k": self.sampler.top_k,
            "repeat-penalty": self.sampler.repetition_penalty,
            "seed": self.sampler.seed,
            "reverse-prompt": self.reverse_prompt.clone().unwrap_or_default(),
            "stream-stdout": self.stream_stdout,
            "enable-log": self.log,
            "embedding": self.embedding,
            "prefix-reuse": self.prefix_reuse,
        })
    }

    fn from_json(v: &serde_json::Value) -> Result<Options, String> {
        let mut o = Options::default();
        o.apply(v.to_string().as_bytes()).map_err(|err| err.message)?;
        Ok(o)
    }
}

/// A graph as plain data.
#[derive(Debug, Clone)]
pub struct GraphState {
    /// The guest's handle.
    pub handle: u32,
    /// The model's name.
    pub model: String,
    /// Its metadata, as JSON with WasmEdge's keys.
    pub options: serde_json::Value,
}

/// An execution context as plain data (between computations).
#[derive(Debug, Clone)]
pub struct ContextState {
    /// The guest's handle.
    pub handle: u32,
    /// The model's name.
    pub model: String,
    /// Its metadata, as JSON.
    pub options: serde_json::Value,
    /// The prompt last set.
    pub prompt: Option<Vec<u8>>,
    /// Output 0.
    pub output: Vec<u8>,
    /// Token counts of the last computation: input, output, reused.
    pub counts: [usize; 3],
    /// The KV cache: its context length, the tokens in it, the cache.
    pub cache: Option<(usize, Vec<u32>, shoal_engine::kv::KvImage)>,
}

/// The `wasi_ephemeral_nn` state of an instance as plain data.
#[derive(Debug, Clone, Default)]
pub struct NnState {
    /// Graphs by handle.
    pub graphs: Vec<GraphState>,
    /// Execution contexts by handle.
    pub contexts: Vec<ContextState>,
    /// The next handle to give out.
    pub next: u32,
}

impl NnCtx {
    /// The models this instance's graphs use.
    pub(crate) fn model_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.graphs.values().map(|g| g.model.model.name.clone()).collect();
        v.extend(self.contexts.values().map(|c| c.model.name.clone()));
        v.sort();
        v.dedup();
        v
    }

    /// Whether a context holds a KV cache.
    pub(crate) fn has_caches(&self) -> bool {
        self.contexts.values().any(|c| c.cache.is_some())
    }

    /// Copies the graphs and contexts out, caches included. A context in the middle of a
    /// `compute_single` stream, or a graph loaded from bytes rather than by name, cannot be
    /// captured.
    pub(crate) fn capture(&self, parked: bool) -> Result<NnState, String> {
        let mut graphs = Vec::new();
        for (&handle, g) in &self.graphs {
            if g.model.private.is_some() {
                return Err(format!(
                    "wasi-nn graph {handle} was loaded from bytes; only graphs loaded by name (--nn-preload) can be snapshotted"
                ));
            }
            graphs.push(GraphState { handle, model: g.model.model.name.clone(), options: g.options.to_json() });
        }
        let mut contexts = Vec::new();
        for (&handle, cx) in &self.contexts {
            if cx._private.is_some() {
                return Err(format!("wasi-nn context {handle} runs a graph loaded from bytes"));
            }
            if cx.single.as_ref().is_some_and(|s| !s.done) {
                return Err(format!(
                    "wasi-nn context {handle} is in the middle of a compute_single stream; snapshot it after the answer ends"
                ));
            }
            let cache = match &cx.cache {
                Some((c, seen)) => Some((
                    c.capacity(),
                    seen.clone(),
                    if parked {
                        cx.model.llama.park_cache(c)
                    } else {
                        cx.model.llama.export_cache(c).map(shoal_engine::kv::KvImage::Portable)
                    }
                    .map_err(|err| format!("wasi-nn context {handle}: {err}"))?,
                )),
                None => None,
            };
            contexts.push(ContextState {
                handle,
                model: cx.model.name.clone(),
                options: cx.options.to_json(),
                prompt: cx.prompt.clone(),
                output: match &cx.single {
                    Some(s) => answer(&cx.options, s.text.clone()),
                    None => cx.output.clone(),
                },
                counts: [cx.input_tokens, cx.output_tokens, cx.reused_tokens],
                cache,
            });
        }
        graphs.sort_by_key(|g| g.handle);
        contexts.sort_by_key(|c| c.handle);
        Ok(NnState { graphs, contexts, next: self.next })
    }

    /// Rebuilds `st` on this host's models.
    pub(crate) fn restore(&mut self, st: &NnState) -> Result<(), String> {
        for g in &st.graphs {
            let model = GraphModel::shared(self.models.get(&g.model)?);
            self.graphs.insert(g.handle, Graph { model, options: Options::from_json(&g.options)? });
        }
        for s in &st.contexts {
            let model = self.models.get(&s.model)?;
            let what = |err: &dyn std::fmt::Display| format!("wasi-nn context {}: {err}", s.handle);
            let (cache, cache_charge) = match &s.cache {
                Some((context, seen, kv)) => {
                    // Held to the same limits as a new cache.
                    let charge = self.quota.kv_cache(&model, *context).map_err(|err| what(&err))?;
                    let cache = model.llama.import_image(kv, *context).map_err(|err| what(&err))?;
                    (Some((cache, seen.clone())), Some(charge))
                }
                None => (None, None),
            };
            let cx = Context {
                model,
                _private: None,
                quota: self.quota.clone(),
                cache_charge,
                options: Options::from_json(&s.options)?,
                prompt: s.prompt.clone(),
                cache,
                output: s.output.clone(),
                last_piece: Vec::new(),
                single: None,
                input_tokens: s.counts[0],
                output_tokens: s.counts[1],
                reused_tokens: s.counts[2],
            };
            self.contexts.insert(s.handle, cx);
        }
        self.next = st.next.max(1);
        Ok(())
    }
}
