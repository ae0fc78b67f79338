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
//! [--repeat-penalty R] [--max-tokens N] [--context N] [--stats]`.

use std::io::Write;
use std::time::Instant;

use shoal_guest::{Model, SamplerParams, Session};

/// Chat settings.
#[derive(Clone)]
pub struct Args {
    pub model: String,
    pub params: SamplerParams,
    pub max_tokens: u32,
    pub context: u32,
    pub prompts: Vec<String>,
    pub stats: bool,
    pub bench: Option<(usize, usize, usize)>,
}

/// Parses the chat's arguments (without the program name).
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        model: "smollm2".into(),
        params: SamplerParams::default(),
        max_tokens: 256,
        context: 0,
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

    /// Answers one user turn, streaming the reply; returns (tokens generated, seconds).
    pub fn turn(&mut self, user: &str, a: &Args, out: &mut impl Write) -> Result<(u32, f64), String> {
        self.messages.push(("user".into(), user.into()));
        self.respond(a, out)
    }

    /// Replaces the conversation with `messages` (ending with a user turn) and answers it;
    /// the cache still serves whatever prefix the new conversation shares with the old.
    pub fn answer(&mut self, messages: Messages, a: &Args, out: &mut impl Write) -> Result<(u32, f64), String> {
        self.messages = messages;
        self.respond(a, out)
    }

    fn respond(&mut self, a: &Args, out: &mut impl Write) -> Result<(u32, f64), String> {
        let err = |e: shoal_guest::Error| e.to_string();
        let msgs: Vec<(&str, &str)> = self.messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
        let text = self.model.render(&msgs, true).map_err(err)?;
        let prompt = self.model.tokenize(&text, true).map_err(err)?;
        // Reuse the cache for the prefix the session has already seen.
        let common = self.seen.iter().zip(&prompt).take_while(|(x, y)| x == y).count();
        let common = common.min(prompt.len() - 1);
        if common < self.seen.len() {
            self.session.truncate(common as u32).map_err(err)?;
            self.seen.truncate(common);
        }
        let mut input: Vec<u32> = prompt[common..].to_vec();
        let mut reply = Vec::<u8>::new();
        let mut printed = 0usize;
        let t0 = Instant::now();
        let mut generated = 0;
        while generated < a.max_tokens {
            let next = match self.session.decode(&input, &a.params) {
                Ok(t) => t,
                Err(e) if e.code == 13 => {
                    eprintln!("\nchat: the context is full");
                    break;
                }
                Err(e) => return Err(e.to_string()),
            };
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
                let _ = out.write_all(&reply[printed..printed + valid]);
                let _ = out.flush();
                printed += valid;
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

/// The chat as an actor: one message, one user turn (or a whole conversation: see
/// [`parse_conversation`]).
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
            Err(e) => {
                let _ = shoal_guest::actor::reply(format!("chat: {e}\n").as_bytes());
                return 1;
            }
        };
        let Ok(user) = std::str::from_utf8(msg) else {
            let _ = shoal_guest::actor::reply(b"chat: the message is not UTF-8\n");
            return 2;
        };
        let r = match parse_conversation(user, a) {
            Some(Ok((settings, msgs))) => chat.answer(msgs, &settings, &mut ReplyWriter),
            Some(Err(e)) => Err(e),
            None => chat.turn(user, a, &mut ReplyWriter),
        };
        match r {
            Ok(_) => 0,
            Err(e) => {
                let _ = shoal_guest::actor::reply(format!("chat: {e}\n").as_bytes());
                3
            }
        }
    }
}

shoal_guest::export_actor!(ChatActor);
