//! The chat agent's conversation, shared by the `chat` command (`src/main.rs`) and the chat
//! actor (this library built as a `cdylib`: `chat_actor.wasm`).
//!
//! The conversation lives in this guest's memory; each user turn is rendered with the
//! model's chat template, only the tokens the session has not seen are evaluated (the KV
//! cache keeps the rest), and the answer streams out as it is generated.
//!
//! As an actor, each message is one user turn (UTF-8 text) and the reply streams back
//! through `shoal_v1.reply`. Its settings are its arguments, given when it is spawned:
//! `[--model NAME] [--temperature T] [--seed S] [--top-k K] [--top-p P]
//! [--repeat-penalty R] [--max-tokens N] [--context N] [--context-policy error|truncate]
//! [--stats]`.
//!
//! A conversation longer than the session's context is an error whose message starts with
//! `context_length_exceeded` (`--context-policy error`, the default), or loses its oldest
//! turns, the system prompt kept, until it fits (`truncate`). Either way a turn that fails
//! leaves the conversation as it was before it: the next one works.

pub mod api;
pub mod json;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use shoal_guest::abi::{Status, TokenLogprob};
use shoal_guest::{Model, SamplerParams, Session};

use crate::api::{Finish, Usage};
use crate::json::Json;

/// What to do with a conversation longer than the session's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextPolicy {
    /// Fail the turn with `context_length_exceeded`.
    Error,
    /// Drop the oldest turns (the system prompt kept) until it fits.
    Truncate,
}

/// Chat settings.
#[derive(Clone)]
pub struct Args {
    pub model: String,
    pub params: SamplerParams,
    pub max_tokens: u32,
    pub context: u32,
    pub context_policy: ContextPolicy,
    pub prompts: Vec<String>,
    pub stats: bool,
    pub bench: Option<(usize, usize, usize)>,
    /// What the OpenAI endpoint asked for, when the message came from it (see [`api`]).
    pub api: Option<api::Options>,
}

/// Why a turn failed.
#[derive(Debug)]
pub enum TurnError {
    /// The conversation does not fit in the session's context; the message starts with
    /// `context_length_exceeded`.
    ContextFull(String),
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for TurnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TurnError::ContextFull(m) | TurnError::Other(m) => f.write_str(m),
        }
    }
}

impl From<shoal_guest::Error> for TurnError {
    fn from(e: shoal_guest::Error) -> Self {
        TurnError::Other(e.to_string())
    }
}

impl From<String> for TurnError {
    fn from(e: String) -> Self {
        TurnError::Other(e)
    }
}

/// Parses the chat's arguments (without the program name).
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        model: "smollm2".into(),
        params: SamplerParams { temperature: shoal_guest::abi::DEFAULT_TEMPERATURE, ..SamplerParams::default() },
        max_tokens: 256,
        context: 0,
        context_policy: ContextPolicy::Error,
        prompts: Vec::new(),
        stats: false,
        bench: None,
        api: None,
    };
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let bad = |_| format!("bad {flag}");
        match flag.as_str() {
            "--model" => a.model = val()?,
            "--temperature" => a.params.temperature = val()?.parse().map_err(bad)?,
            "--seed" => a.params.seed = val()?.parse().map_err(|_| format!("bad {flag}"))?,
            "--top-k" => a.params.top_k = val()?.parse().map_err(|_| format!("bad {flag}"))?,
            "--top-p" => a.params.top_p = val()?.parse().map_err(|_| format!("bad {flag}"))?,
            "--repeat-penalty" => a.params.repetition_penalty = val()?.parse().map_err(|_| format!("bad {flag}"))?,
            "--max-tokens" => a.max_tokens = val()?.parse().map_err(|_| format!("bad {flag}"))?,
            "--context" => a.context = val()?.parse().map_err(|_| format!("bad {flag}"))?,
            "--context-policy" => {
                a.context_policy = match val()?.as_str() {
                    "error" => ContextPolicy::Error,
                    "truncate" => ContextPolicy::Truncate,
                    v => return Err(format!("bad {flag} `{v}`: `error` or `truncate`")),
                }
            }
            "--prompt" => a.prompts.push(val()?),
            "--stats" => a.stats = true,
            "--bench" => a.bench = Some(a.bench.unwrap_or((128, 128, 5))),
            "--prompt-tokens" | "--gen" | "--repeat" => {
                let v: usize = val()?.parse().map_err(|_| format!("bad {flag}"))?;
                let b = a.bench.get_or_insert((128, 128, 5));
                match flag.as_str() {
                    "--prompt-tokens" => b.0 = v,
                    "--gen" => b.1 = v,
                    _ => b.2 = v.max(1),
                }
            }
            _ => return Err(format!("unknown argument `{flag}`")),
        }
    }
    Ok(a)
}

/// The conversation and what the session has already evaluated.
pub struct Chat {
    pub model: Model,
    session: Session,
    messages: Vec<(String, String)>,
    /// Tokens in the session's cache, in order.
    seen: Vec<u32>,
    /// Token pieces looked up for JSON mode.
    pieces: BTreeMap<u32, Vec<u8>>,
}

/// A chosen token, with its log-probability and the alternatives' when they were asked for.
struct Pick {
    id: u32,
    /// Its text forced in (JSON mode when no token could continue): no token id stands.
    forced: Option<Vec<u8>>,
    logprobs: Option<(TokenLogprob, Vec<TokenLogprob>)>,
}

/// The answer being made: its bytes, what has been sent, and JSON mode's state.
struct Answer {
    bytes: Vec<u8>,
    sent: usize,
    json: Option<Json>,
}

impl Chat {
    /// Opens the model and a session for it.
    pub fn new(a: &Args) -> Result<Chat, String> {
        let model = Model::open(&a.model).map_err(|e| e.to_string())?;
        let session = Session::new(&model, a.context).map_err(|e| e.to_string())?;
        Ok(Chat { model, session, messages: Vec::new(), seen: Vec::new(), pieces: BTreeMap::new() })
    }

    /// Answers one user turn, streaming the reply; returns what it took. When it fails, the
    /// conversation is as it was before.
    pub fn turn(&mut self, user: &str, a: &Args, out: &mut impl Write) -> Result<Usage, TurnError> {
        let mut messages = self.messages.clone();
        messages.push(("user".into(), user.into()));
        self.answer(messages, a, out)
    }

    /// Replaces the conversation with `messages` (ending with a user turn) and answers it;
    /// the cache still serves whatever prefix the new conversation shares with the old. When
    /// it fails, the conversation is the old one still.
    pub fn answer(&mut self, messages: Messages, a: &Args, out: &mut impl Write) -> Result<Usage, TurnError> {
        let before = std::mem::replace(&mut self.messages, messages);
        let r = self.respond(a, out);
        if r.is_err() {
            self.messages = before;
        }
        r
    }

    /// Drops the oldest turn after the system prompt (a user message and the answer to it);
    /// false when only the system prompt and the last message are left.
    fn drop_oldest_turn(&mut self) -> bool {
        let first = self.messages.iter().position(|(r, _)| r != "system").unwrap_or(self.messages.len());
        if first + 1 >= self.messages.len() {
            return false;
        }
        self.messages.remove(first);
        while first + 1 < self.messages.len() && self.messages[first].0 != "user" {
            self.messages.remove(first);
        }
        true
    }

    /// The tokens of the conversation's prompt (with the generation prompt), or of the raw
    /// text of a completion.
    fn prompt(&self, raw: Option<&str>) -> Result<Vec<u32>, TurnError> {
        let prompt = match raw {
            Some(text) => self.model.tokenize(text, true)?,
            None => {
                let msgs: Vec<(&str, &str)> = self.messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
                let text = self.model.render(&msgs, true)?;
                self.model.tokenize(&text, true)?
            }
        };
        if prompt.is_empty() {
            return Err(TurnError::Other("the prompt is no tokens".into()));
        }
        Ok(prompt)
    }

    /// Evaluates the prompt (past the prefix the session has already seen) and chooses the
    /// answer's first token; under [`ContextPolicy::Truncate`] drops the oldest turns of a
    /// conversation until it fits. Returns the pick, the tokens evaluated, and the prompt's
    /// length and its tokens served from the cache.
    fn prefill(
        &mut self,
        a: &Args,
        raw: Option<&str>,
        answer: &Answer,
    ) -> Result<(Pick, Vec<u32>, u32, u32), TurnError> {
        let mut dropped = 0;
        loop {
            let prompt = self.prompt(raw)?;
            // Reuse the cache for the prefix the session has already seen.
            let common = self.seen.iter().zip(&prompt).take_while(|(x, y)| x == y).count();
            let common = common.min(prompt.len() - 1);
            if common < self.seen.len() {
                self.session.truncate(common as u32)?;
                self.seen.truncate(common);
            }
            // A call that fails leaves the session's cache as it was: `seen` still holds.
            match self.first(&prompt[common..], common, a, answer) {
                Ok(next) => {
                    if dropped > 0 {
                        eprintln!("chat: dropped the {dropped} oldest turns to fit the context");
                    }
                    return Ok((next, prompt[common..].to_vec(), prompt.len() as u32, common as u32));
                }
                Err(e) if e.code == Status::ContextFull.code() => {
                    if raw.is_none() && a.context_policy == ContextPolicy::Truncate && self.drop_oldest_turn() {
                        dropped += 1;
                        continue;
                    }
                    // The host's message names the call, then `context_length_exceeded: ...`.
                    let why =
                        e.message.split_once("context_length_exceeded:").map_or(e.message.as_str(), |(_, r)| r).trim();
                    let hint = match (raw, a.context_policy) {
                        (Some(_), _) => "shorten it",
                        (None, ContextPolicy::Truncate) => {
                            "even with only the system prompt and the last message; shorten it"
                        }
                        (None, ContextPolicy::Error) => {
                            "shorten it (a chat started with --context-policy truncate drops its oldest turns instead)"
                        }
                    };
                    let what = if raw.is_some() { "prompt" } else { "conversation" };
                    return Err(TurnError::ContextFull(format!(
                        "context_length_exceeded: the {what} is {} tokens, more than this chat's context holds ({why}); {hint}",
                        prompt.len()
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Evaluates a prompt's tokens past the cached `common` and chooses the answer's first
    /// token. The last prompt token runs alone, as every later token does: its logits then
    /// come from the same kernels whatever the cache held before, so on a GPU (where a pass of
    /// many tokens rounds differently from a pass of one) the same request and seed get the
    /// same answer whether its prefix was cached or not. On failure the cache is as it was.
    fn first(&mut self, rest: &[u32], common: usize, a: &Args, answer: &Answer) -> Result<Pick, shoal_guest::Error> {
        let (head, last) = rest.split_at(rest.len() - 1);
        if head.is_empty() {
            return self.pick(last, a, answer);
        }
        self.session.eval(head)?;
        let r = self.pick(last, a, answer);
        if r.is_err() {
            let _ = self.session.truncate(common as u32);
        }
        r
    }

    /// A token's text, looked up once.
    fn piece_of(&mut self, id: u32) -> Result<&[u8], shoal_guest::Error> {
        if !self.pieces.contains_key(&id) {
            let p = self.model.piece(id)?;
            self.pieces.insert(id, p);
        }
        Ok(&self.pieces[&id])
    }

    /// Whether token `id` may come next in JSON mode.
    fn fits(&mut self, id: u32, json: &Json) -> Result<bool, shoal_guest::Error> {
        if self.is_stop(id) {
            return Ok(json.done());
        }
        Ok(json.feed(self.piece_of(id)?).is_some())
    }

    fn is_stop(&self, id: u32) -> bool {
        self.model.info.stop.contains(&id) || Some(id) == self.model.info.eos
    }

    /// Runs `input` and chooses the next token: the sampler's, or in JSON mode the first of
    /// the sampler's choice and the most likely alternatives that keeps the answer valid JSON.
    fn pick(&mut self, input: &[u32], a: &Args, answer: &Answer) -> Result<Pick, shoal_guest::Error> {
        let want = a.api.as_ref().and_then(|o| o.logprobs);
        let json = answer.json.as_ref();
        if want.is_none() && json.is_none() {
            let id = self.session.decode(input, &a.params)?;
            return Ok(Pick { id, forced: None, logprobs: None });
        }
        let top = if json.is_some() { TokenLogprob::MAX_TOP as u32 } else { want.unwrap_or(0) };
        let (chosen, alts) = self.session.decode_top(input, &a.params, top)?;
        let keep = |alts: &[TokenLogprob]| alts[..alts.len().min(want.unwrap_or(0) as usize)].to_vec();
        let Some(json) = json else {
            return Ok(Pick { id: chosen.id, forced: None, logprobs: Some((chosen, keep(&alts))) });
        };
        let json = json.clone();
        for c in std::iter::once(chosen).chain(alts.iter().copied()) {
            if self.fits(c.id, &json)? {
                let logprobs = want.map(|_| (c, keep(&alts)));
                return Ok(Pick { id: c.id, forced: None, logprobs });
            }
        }
        // None of the likely tokens continues the JSON: close it.
        Ok(Pick { id: 0, forced: Some(json.closing()), logprobs: None })
    }

    fn respond(&mut self, a: &Args, out: &mut impl Write) -> Result<Usage, TurnError> {
        self.generate(a, None, out)
    }

    /// Continues the raw text `prompt` (no chat template; a completion), streaming the
    /// continuation. The conversation is left as it was.
    pub fn complete(&mut self, prompt: &str, a: &Args, out: &mut impl Write) -> Result<Usage, TurnError> {
        self.generate(a, Some(prompt), out)
    }

    fn generate(&mut self, a: &Args, raw: Option<&str>, out: &mut impl Write) -> Result<Usage, TurnError> {
        let tagged = a.api.is_some();
        let stops: &[Vec<u8>] = a.api.as_ref().map_or(&[], |o| &o.stop);
        let mut answer =
            Answer { bytes: Vec::new(), sent: 0, json: a.api.as_ref().filter(|o| o.json).map(|_| Json::default()) };
        let t0 = Instant::now();
        let mut usage = Usage::default();
        let mut finish = Finish::Length;
        let mut generated = 0;
        if a.max_tokens > 0 {
            let (mut pick, mut input, prompt, cached) = self.prefill(a, raw, &answer)?;
            usage.prompt = prompt;
            usage.cached = cached;
            loop {
                if generated > 0 {
                    pick = match self.pick(&input, a, &answer) {
                        Ok(p) => p,
                        Err(e) if e.code == Status::ContextFull.code() => {
                            // The answer so far stands; the next turn makes room or fails clearly.
                            eprintln!("\nchat: the context is full");
                            break;
                        }
                        Err(e) => return Err(e.into()),
                    };
                }
                self.seen.extend_from_slice(&input);
                if let Some(text) = pick.forced {
                    answer.bytes.extend_from_slice(&text);
                    finish = Finish::Stop;
                    break;
                }
                generated += 1;
                if let Some((chosen, alts)) = &pick.logprobs
                    && tagged
                {
                    let _ = out.write_all(&api::logprob_part(chosen, alts));
                }
                if self.is_stop(pick.id) {
                    // Keep the stop token in the conversation's cache on the next turn.
                    finish = Finish::Stop;
                    break;
                }
                let piece = self.piece_of(pick.id).map_err(|e| e.to_string())?.to_vec();
                answer.bytes.extend_from_slice(&piece);
                if let Some(j) = &answer.json {
                    answer.json = j.feed(&piece);
                }
                // A stop sequence ends the answer before it; text that may begin one waits.
                let (end, hold) = api::stop_at(&answer.bytes[answer.sent..], stops);
                if let Some(end) = end {
                    answer.bytes.truncate(answer.sent + end);
                    finish = Finish::Stop;
                    break;
                }
                if !send(out, &mut answer, hold, tagged) {
                    // No one reads the answer any more (the client went away): stop making it.
                    break;
                }
                if answer.json.as_ref().is_some_and(Json::done) {
                    finish = Finish::Stop;
                    break;
                }
                if generated >= a.max_tokens {
                    break;
                }
                input = vec![pick.id];
            }
        }
        send(out, &mut answer, 0, tagged);
        // Bytes left that are not UTF-8 go as they are.
        if answer.sent < answer.bytes.len() {
            let rest = answer.bytes[answer.sent..].to_vec();
            let _ = out.write_all(&if tagged { [b"t".as_slice(), &rest].concat() } else { rest });
            answer.sent = answer.bytes.len();
        }
        let secs = t0.elapsed().as_secs_f64();
        usage.completion = generated;
        usage.finish = finish;
        if tagged {
            let _ = out.write_all(&usage.part());
        } else {
            let _ = writeln!(out);
        }
        let _ = out.flush();
        if raw.is_none() {
            self.messages.push(("assistant".into(), String::from_utf8_lossy(&answer.bytes).into_owned()));
        }
        if a.stats {
            eprintln!("[{generated} tokens in {secs:.2} s, {:.1} tokens/s]", generated as f64 / secs.max(1e-9));
        }
        usage.seconds = secs;
        Ok(usage)
    }
}

/// Sends the answer's whole UTF-8 characters not sent yet, but the last `hold` bytes (which
/// may begin a stop sequence); false when no one reads any more.
fn send(out: &mut impl Write, answer: &mut Answer, hold: usize, tagged: bool) -> bool {
    let end = answer.bytes.len() - hold.min(answer.bytes.len() - answer.sent);
    let valid = match std::str::from_utf8(&answer.bytes[answer.sent..end]) {
        Ok(s) => s.len(),
        Err(e) => e.valid_up_to(),
    };
    if valid == 0 {
        return true;
    }
    let text = &answer.bytes[answer.sent..answer.sent + valid];
    let r = if tagged { out.write_all(&[b"t".as_slice(), text].concat()) } else { out.write_all(text) };
    answer.sent += valid;
    r.and_then(|()| out.flush()).is_ok()
}

/// Replies, as an actor, as they are written.
struct ReplyWriter;

impl Write for ReplyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        shoal_guest::actor::reply(buf).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A conversation: (role, content) pairs.
pub type Messages = Vec<(String, String)>;

/// How an actor's handler says why it failed: a reply part that starts with these bytes is
/// the error's message, not part of the answer (`shoal_actor::ERROR_MARK`, docs/abi.md
/// "Actors").
const ERROR_MARK: &[u8] = b"\x15error\x1f";

/// Fails the current message with `message`; returns the handler's error code.
fn fail(code: i32, message: &str) -> i32 {
    let _ = shoal_guest::actor::reply(&[ERROR_MARK, message.as_bytes()].concat());
    code
}

/// The handler's code for a conversation that does not fit in the context (the status's).
const CODE_CONTEXT_FULL: i32 = Status::ContextFull.code();

/// The chat as an actor: one message, one user turn (or an API request: see [`api`]). A failed turn replies its error with the error mark and
/// returns non-zero ([`CODE_CONTEXT_FULL`] when the conversation does not fit).
pub struct ChatActor {
    chat: Result<(Args, Chat), String>,
}

impl shoal_guest::actor::Actor for ChatActor {
    fn start() -> Self {
        let chat = parse(std::env::args().skip(1)).and_then(|a| Chat::new(&a).map(|c| (a, c)));
        ChatActor { chat }
    }

    fn on_message(&mut self, msg: &[u8]) -> i32 {
        let (a, chat) = match &mut self.chat {
            Ok(x) => x,
            Err(e) => return fail(1, &format!("chat: {e}")),
        };
        let Ok(user) = std::str::from_utf8(msg) else {
            return fail(2, "chat: the message is not UTF-8");
        };
        let r = match api::parse(user, a) {
            Some(Ok((settings, api::Request::Chat(msgs)))) => chat.answer(msgs, &settings, &mut ReplyWriter),
            Some(Ok((settings, api::Request::Complete(prompt)))) => chat.complete(&prompt, &settings, &mut ReplyWriter),
            Some(Err(e)) => Err(TurnError::Other(e)),
            None => chat.turn(user, a, &mut ReplyWriter),
        };
        match r {
            Ok(_) => 0,
            Err(TurnError::ContextFull(e)) => fail(CODE_CONTEXT_FULL, &e),
            Err(TurnError::Other(e)) => fail(3, &format!("chat: {e}")),
        }
    }
}

shoal_guest::export_actor!(ChatActor);
