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

use std::io::Write;
use std::time::Instant;

use shoal_guest::abi::Status;
use shoal_guest::{Model, SamplerParams, Session};

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
        params: SamplerParams::default(),
        max_tokens: 256,
        context: 0,
        context_policy: ContextPolicy::Error,
        prompts: Vec::new(),
        stats: false,
        bench: None,
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
}

impl Chat {
    /// Opens the model and a session for it.
    pub fn new(a: &Args) -> Result<Chat, String> {
        let model = Model::open(&a.model).map_err(|e| e.to_string())?;
        let session = Session::new(&model, a.context).map_err(|e| e.to_string())?;
        Ok(Chat { model, session, messages: Vec::new(), seen: Vec::new() })
    }

    /// Answers one user turn, streaming the reply; returns (tokens generated, seconds). When
    /// it fails, the conversation is as it was before.
    pub fn turn(&mut self, user: &str, a: &Args, out: &mut impl Write) -> Result<(u32, f64), TurnError> {
        let mut messages = self.messages.clone();
        messages.push(("user".into(), user.into()));
        self.answer(messages, a, out)
    }

    /// Replaces the conversation with `messages` (ending with a user turn) and answers it;
    /// the cache still serves whatever prefix the new conversation shares with the old. When
    /// it fails, the conversation is the old one still.
    pub fn answer(&mut self, messages: Messages, a: &Args, out: &mut impl Write) -> Result<(u32, f64), TurnError> {
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

    /// Evaluates the conversation's prompt (past the prefix the session has already seen)
    /// and samples the answer's first token; under [`ContextPolicy::Truncate`] drops the
    /// oldest turns until it fits.
    fn prefill(&mut self, a: &Args) -> Result<(u32, Vec<u32>), TurnError> {
        let mut dropped = 0;
        loop {
            let msgs: Vec<(&str, &str)> = self.messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            let text = self.model.render(&msgs, true)?;
            let prompt = self.model.tokenize(&text, true)?;
            if prompt.is_empty() {
                return Err(TurnError::Other("the conversation renders to no tokens".into()));
            }
            // Reuse the cache for the prefix the session has already seen.
            let common = self.seen.iter().zip(&prompt).take_while(|(x, y)| x == y).count();
            let common = common.min(prompt.len() - 1);
            if common < self.seen.len() {
                self.session.truncate(common as u32)?;
                self.seen.truncate(common);
            }
            // A call that fails leaves the session's cache as it was: `seen` still holds.
            match self.session.decode(&prompt[common..], &a.params) {
                Ok(next) => {
                    if dropped > 0 {
                        eprintln!("chat: dropped the {dropped} oldest turns to fit the context");
                    }
                    return Ok((next, prompt[common..].to_vec()));
                }
                Err(e) if e.code == Status::ContextFull.code() => {
                    if a.context_policy == ContextPolicy::Truncate && self.drop_oldest_turn() {
                        dropped += 1;
                        continue;
                    }
                    // The host's message names the call, then `context_length_exceeded: ...`.
                    let why =
                        e.message.split_once("context_length_exceeded:").map_or(e.message.as_str(), |(_, r)| r).trim();
                    let hint = match a.context_policy {
                        ContextPolicy::Truncate => "even with only the system prompt and the last message; shorten it",
                        ContextPolicy::Error => {
                            "shorten it (a chat started with --context-policy truncate drops its oldest turns instead)"
                        }
                    };
                    return Err(TurnError::ContextFull(format!(
                        "context_length_exceeded: the conversation is {} tokens, more than this chat's context holds ({why}); {hint}",
                        prompt.len()
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn respond(&mut self, a: &Args, out: &mut impl Write) -> Result<(u32, f64), TurnError> {
        let err = |e: shoal_guest::Error| e.to_string();
        let mut reply = Vec::<u8>::new();
        let mut printed = 0usize;
        let t0 = Instant::now();
        let (mut next, mut input) = if a.max_tokens > 0 { self.prefill(a)? } else { (0, Vec::new()) };
        let mut generated = 0;
        while generated < a.max_tokens {
            if generated > 0 {
                next = match self.session.decode(&input, &a.params) {
                    Ok(t) => t,
                    Err(e) if e.code == Status::ContextFull.code() => {
                        // The answer so far stands; the next turn makes room or fails clearly.
                        eprintln!("\nchat: the context is full");
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
            }
            self.seen.extend_from_slice(&input);
            generated += 1;
            if self.model.info.stop.contains(&next) || Some(next) == self.model.info.eos {
                // Keep the stop token in the conversation's cache on the next turn.
                break;
            }
            reply.extend(self.model.piece(next).map_err(err)?);
            // Send whole UTF-8 characters as they complete.
            let valid = match std::str::from_utf8(&reply[printed..]) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            if valid > 0 {
                let sent = out.write_all(&reply[printed..printed + valid]).and_then(|()| out.flush());
                printed += valid;
                if sent.is_err() {
                    // No one reads the answer any more (the client went away): stop making it.
                    break;
                }
            }
            input = vec![next];
        }
        let secs = t0.elapsed().as_secs_f64();
        let _ = writeln!(out);
        let _ = out.flush();
        self.messages.push(("assistant".into(), String::from_utf8_lossy(&reply).into_owned()));
        if a.stats {
            eprintln!("[{generated} tokens in {secs:.2} s, {:.1} tokens/s]", generated as f64 / secs.max(1e-9));
        }
        Ok((generated, secs))
    }
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

/// A message that carries a whole conversation (what `shoal serve`'s OpenAI endpoint sends):
///
/// ```text
/// \x01chat/1\n
/// key=value\n ...        (optional: max_tokens, temperature, seed, top_p, top_k)
/// \n
/// role\x1fcontent\x1e ... (the messages, the last one the user's)
/// ```
pub fn parse_conversation(msg: &str, base: &Args) -> Option<Result<(Args, Messages), String>> {
    let rest = msg.strip_prefix("\x01chat/1\n")?;
    Some((|| {
        let (head, body) = rest.split_once("\n\n").unwrap_or((rest, ""));
        let mut a = Args { prompts: Vec::new(), bench: None, ..base.clone() };
        for line in head.lines().filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once('=').ok_or_else(|| format!("`{line}` is not key=value"))?;
            let bad = |_| format!("bad {k}: `{v}`");
            match k {
                "max_tokens" => a.max_tokens = v.parse().map_err(|_| format!("bad {k}: `{v}`"))?,
                "temperature" => a.params.temperature = v.parse().map_err(bad)?,
                "top_p" => a.params.top_p = v.parse().map_err(|_| format!("bad {k}: `{v}`"))?,
                "top_k" => a.params.top_k = v.parse().map_err(|_| format!("bad {k}: `{v}`"))?,
                "seed" => a.params.seed = v.parse().map_err(|_| format!("bad {k}: `{v}`"))?,
                _ => return Err(format!("unknown setting `{k}`")),
            }
        }
        let mut msgs = Vec::new();
        for rec in body.split('\x1e').filter(|r| !r.is_empty()) {
            let (role, content) = rec.split_once('\x1f').ok_or("a message without a role")?;
            msgs.push((role.to_string(), content.to_string()));
        }
        if msgs.last().is_none_or(|(r, _)| r != "user") {
            return Err("the conversation must end with a user message".into());
        }
        Ok((a, msgs))
    })())
}

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

/// The chat as an actor: one message, one user turn (or a whole conversation: see
/// [`parse_conversation`]). A failed turn replies its error with the error mark and
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
        let r = match parse_conversation(user, a) {
            Some(Ok((settings, msgs))) => chat.answer(msgs, &settings, &mut ReplyWriter),
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
