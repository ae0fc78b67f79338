//! The messages `shoal serve`'s OpenAI endpoints send the chat actor, and the tagged reply
//! parts it answers them with (docs/abi.md, "The chat actor's API messages").
//!
//! A message:
//!
//! ```text
//! \x01chat/2\n  or  \x01complete/2\n
//! key=value\n ...         (max_tokens, temperature, seed, top_p, top_k, logprobs, json,
//!                          stop: the stop sequence in hex, repeatable)
//! \n
//! role\x1fcontent\x1e ...  (chat/2: the messages, the last one the user's)
//! TEXT                     (complete/2: the prompt, continued without a chat template)
//! ```
//!
//! Every reply part then starts with a tag byte: `t` text of the answer (whole UTF-8
//! characters, or the bytes left at its end); `l` a token's log-probabilities,
//! `ID:LOGPROB` for the chosen token then for each alternative, space-separated; `u` once at
//! the end, `PROMPT CACHED COMPLETION FINISH` (tokens of the prompt, of them served from the
//! cache, generated, and `stop` or `length`). Errors use the actor's error mark as before.

use shoal_guest::abi::TokenLogprob;

use crate::{Args, Messages};

/// The most stop sequences one request gives (as OpenAI's).
pub const MAX_STOPS: usize = 4;
/// The longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// What an API request asks for beyond the sampler.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    /// Sequences that end the answer (not included in it).
    pub stop: Vec<Vec<u8>>,
    /// Report log-probabilities, with this many alternatives per token.
    pub logprobs: Option<u32>,
    /// Answer with one JSON object.
    pub json: bool,
}

/// Why an answer ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or sequence, or a whole JSON object.
    Stop,
    /// `max_tokens`, or a full context.
    #[default]
    Length,
}

/// What a turn took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt: u32,
    /// Of them, served from the session's cache.
    pub cached: u32,
    /// Tokens generated.
    pub completion: u32,
    /// Why it ended.
    pub finish: Finish,
    /// Seconds it took.
    pub seconds: f64,
}

impl Usage {
    /// The `u` part.
    pub fn part(&self) -> Vec<u8> {
        let finish = match self.finish {
            Finish::Stop => "stop",
            Finish::Length => "length",
        };
        format!("u{} {} {} {finish}", self.prompt, self.cached, self.completion).into_bytes()
    }
}

/// The `l` part of a token.
pub fn logprob_part(chosen: &TokenLogprob, alts: &[TokenLogprob]) -> Vec<u8> {
    let mut s = String::from("l");
    for (i, t) in std::iter::once(chosen).chain(alts).enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s += &format!("{}:{}", t.id, t.logprob);
    }
    s.into_bytes()
}

/// Where the first stop sequence begins in `unsent` (the answer's text not sent yet), and
/// otherwise how many bytes at its end may begin one (to hold back).
pub fn stop_at(unsent: &[u8], stops: &[Vec<u8>]) -> (Option<usize>, usize) {
    let found = stops.iter().filter_map(|s| unsent.windows(s.len()).position(|w| w == s.as_slice())).min();
    if found.is_some() {
        return (found, 0);
    }
    let hold = stops
        .iter()
        .map(|s| (1..s.len().min(unsent.len() + 1)).rev().find(|&k| unsent.ends_with(&s[..k])).unwrap_or(0))
        .max()
        .unwrap_or(0);
    (None, hold)
}

fn unhex(v: &str) -> Option<Vec<u8>> {
    if !v.len().is_multiple_of(2) {
        return None;
    }
    (0..v.len()).step_by(2).map(|i| u8::from_str_radix(v.get(i..i + 2)?, 16).ok()).collect()
}

/// What an API message asks for.
pub enum Request {
    /// Answer this conversation.
    Chat(Messages),
    /// Continue this text.
    Complete(String),
}

/// Parses an API message (`None` when `msg` is not one: a plain user turn).
pub fn parse(msg: &str, base: &Args) -> Option<Result<(Args, Request), String>> {
    let (rest, chat) = match (msg.strip_prefix("\x01chat/2\n"), msg.strip_prefix("\x01complete/2\n")) {
        (Some(r), _) => (r, true),
        (_, Some(r)) => (r, false),
        _ => return None,
    };
    Some((|| {
        let (head, body) = match rest.strip_prefix('\n') {
            Some(body) => ("", body),
            None => rest.split_once("\n\n").unwrap_or((rest, "")),
        };
        let mut a = Args { prompts: Vec::new(), bench: None, ..base.clone() };
        let mut o = Options::default();
        for line in head.lines().filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once('=').ok_or_else(|| format!("`{line}` is not key=value"))?;
            let bad = || format!("bad {k}: `{v}`");
            match k {
                "max_tokens" => a.max_tokens = v.parse().map_err(|_| bad())?,
                "temperature" => a.params.temperature = v.parse().map_err(|_| bad())?,
                "top_p" => a.params.top_p = v.parse().map_err(|_| bad())?,
                "top_k" => a.params.top_k = v.parse().map_err(|_| bad())?,
                "seed" => a.params.seed = v.parse().map_err(|_| bad())?,
                "logprobs" => {
                    let n: u32 = v.parse().map_err(|_| bad())?;
                    if n as usize > TokenLogprob::MAX_TOP {
                        return Err(bad());
                    }
                    o.logprobs = Some(n);
                }
                "json" => o.json = v == "1",
                "stop" => {
                    let s = unhex(v).filter(|s| !s.is_empty() && s.len() <= MAX_STOP_BYTES).ok_or_else(bad)?;
                    if o.stop.len() == MAX_STOPS {
                        return Err(format!("more than {MAX_STOPS} stop sequences"));
                    }
                    o.stop.push(s);
                }
                _ => return Err(format!("unknown setting `{k}`")),
            }
        }
        a.api = Some(o);
        if !chat {
            return Ok((a, Request::Complete(body.to_string())));
        }
        let mut msgs = Vec::new();
        for rec in body.split('\x1e').filter(|r| !r.is_empty()) {
            let (role, content) = rec.split_once('\x1f').ok_or("a message without a role")?;
            msgs.push((role.to_string(), content.to_string()));
        }
        if msgs.last().is_none_or(|(r, _)| r != "user") {
            return Err("the conversation must end with a user message".into());
        }
        Ok((a, Request::Chat(msgs)))
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_are_found_or_held_back() {
        let stops = vec![b"END".to_vec(), b"\n\n".to_vec()];
        assert_eq!(stop_at(b"abc", &stops), (None, 0));
        assert_eq!(stop_at(b"abcE", &stops), (None, 1));
        assert_eq!(stop_at(b"abcEN", &stops), (None, 2));
        assert_eq!(stop_at(b"abcENDx", &stops), (Some(3), 0));
        assert_eq!(stop_at(b"a\n\nEND", &stops), (Some(1), 0));
        assert_eq!(stop_at(b"a\n", &stops), (None, 1));
        assert_eq!(stop_at(b"abc", &[]), (None, 0));
    }

    #[test]
    fn api_messages_parse_and_bad_ones_say_why() {
        let base = crate::parse(Vec::new()).unwrap();
        let Some(Ok((a, Request::Chat(m)))) =
            parse("\x01chat/2\nmax_tokens=5\nstop=454e44\nlogprobs=2\njson=1\n\nuser\x1fhi\x1e", &base)
        else {
            panic!("a chat message")
        };
        assert_eq!(a.max_tokens, 5);
        assert_eq!(a.api, Some(Options { stop: vec![b"END".to_vec()], logprobs: Some(2), json: true }));
        assert_eq!(m, vec![("user".to_string(), "hi".to_string())]);
        let Some(Ok((_, Request::Complete(p)))) = parse("\x01complete/2\n\nOnce upon", &base) else {
            panic!("a completion")
        };
        assert_eq!(p, "Once upon");
        assert!(parse("hello", &base).is_none());
        for bad in ["stop=4", "stop=zz", "stop=", "logprobs=21", "nope=1"] {
            assert!(matches!(parse(&format!("\x01chat/2\n{bad}\n\nuser\x1fhi\x1e"), &base), Some(Err(_))), "{bad}");
        }
        let five = "stop=41\n".repeat(5);
        assert!(matches!(parse(&format!("\x01chat/2\n{five}\nuser\x1fhi\x1e"), &base), Some(Err(_))));
    }
}
