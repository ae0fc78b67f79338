//! The chat actor's tagged reply parts (guests/chat `api`) turned into one choice of an
//! OpenAI answer: its text, its tokens' log-probabilities and its usage. The parts come
//! from the built-in chat actor, but are parsed as untrusted: an unknown tag or a malformed
//! part is skipped, and what a choice keeps is bounded by the tokens it may generate.

use serde_json::{Value, json};
use shoal_engine::tokenizer::Tokenizer;

use crate::stream::{Part, Utf8Carry};

/// What the actor said at the end of a choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
    /// `stop` (a stop token or sequence, a whole JSON object) rather than `length`.
    pub stopped: bool,
}

/// One token's log-probabilities: the chosen token's then the alternatives'.
pub type Logprobs = Vec<(u32, f32)>;

/// What one reply part adds.
#[derive(Debug, Default)]
pub struct Added {
    /// Text to send now.
    pub text: String,
    /// A token's log-probabilities.
    pub logprobs: Option<Logprobs>,
}

/// A choice being answered.
#[derive(Default)]
pub struct Choice {
    /// Its index among the request's choices.
    pub index: usize,
    /// The text so far.
    pub text: String,
    /// Every token's log-probabilities (when asked for).
    pub logprobs: Vec<Logprobs>,
    /// The actor's account, once it gave it.
    pub usage: Option<Usage>,
    carry: Utf8Carry,
}

fn parse_logprobs(s: &str) -> Option<Logprobs> {
    let v: Option<Logprobs> = s
        .split(' ')
        .take(1 + crate::openai::request::MAX_TOP_LOGPROBS as usize)
        .map(|e| {
            let (id, lp) = e.split_once(':')?;
            Some((id.parse().ok()?, lp.parse().ok()?))
        })
        .collect();
    v.filter(|v| !v.is_empty())
}

fn parse_usage(s: &str) -> Option<Usage> {
    let mut it = s.split(' ');
    let mut n = || it.next()?.parse::<u64>().ok();
    let (prompt, cached, completion) = (n()?, n()?, n()?);
    let stopped = match it.next()? {
        "stop" => true,
        "length" => false,
        _ => return None,
    };
    Some(Usage { prompt, cached, completion, stopped })
}

impl Choice {
    /// A choice numbered `index`.
    pub fn new(index: usize) -> Choice {
        Choice { index, ..Choice::default() }
    }

    /// Takes one reply part; `max_tokens` bounds the log-probabilities kept.
    pub fn push(&mut self, part: &[u8], max_tokens: u64) -> Added {
        let mut added = Added::default();
        let Some((&tag, rest)) = part.split_first() else { return added };
        match tag {
            b't' => {
                for p in self.carry.push(rest) {
                    match p {
                        Part::Text(t) => added.text += &t,
                        Part::Bytes(b) => added.text += &String::from_utf8_lossy(&b),
                    }
                }
                self.text += &added.text;
            }
            b'l' if (self.logprobs.len() as u64) < max_tokens => {
                if let Some(l) = std::str::from_utf8(rest).ok().and_then(parse_logprobs) {
                    self.logprobs.push(l.clone());
                    added.logprobs = Some(l);
                }
            }
            b'u' => self.usage = std::str::from_utf8(rest).ok().and_then(parse_usage),
            _ => {}
        }
        added
    }

    /// Ends the text (a character cut at the very end becomes U+FFFD); returns what to send.
    pub fn finish(&mut self) -> String {
        let t = match self.carry.finish() {
            Some(Part::Bytes(b)) => String::from_utf8_lossy(&b).into_owned(),
            Some(Part::Text(t)) => t,
            None => String::new(),
        };
        self.text += &t;
        t
    }

    /// OpenAI's `finish_reason`.
    pub fn finish_reason(&self) -> &'static str {
        match self.usage {
            Some(u) if u.stopped => "stop",
            _ => "length",
        }
    }
}

fn token_entry(t: &Tokenizer, id: u32, lp: f32) -> Value {
    let bytes = t.token_bytes(id);
    // JSON has no infinities: an impossible token's log-probability is the most negative.
    let lp = if lp.is_finite() { f64::from(lp) } else { -9999.0 };
    json!({"token": String::from_utf8_lossy(&bytes), "logprob": lp, "bytes": bytes})
}

/// The chat API's `logprobs` of these tokens: `{"content": [...], "refusal": null}`.
pub fn chat_logprobs(t: &Tokenizer, tokens: &[Logprobs]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|l| {
            let (id, lp) = l[0];
            let mut e = token_entry(t, id, lp);
            e["top_logprobs"] = l[1..].iter().map(|&(id, lp)| token_entry(t, id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The completions API's `logprobs` of these tokens (`offset`: where their text begins).
pub fn completion_logprobs(t: &Tokenizer, tokens: &[Logprobs], mut offset: usize) -> Value {
    let (mut words, mut lps, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for l in tokens {
        let e = token_entry(t, l[0].0, l[0].1);
        let word = e["token"].as_str().unwrap_or_default().to_string();
        offsets.push(offset);
        offset += word.len();
        words.push(word);
        lps.push(e["logprob"].clone());
        let top: serde_json::Map<String, Value> = l[1..]
            .iter()
            .map(|&(id, lp)| {
                let e = token_entry(t, id, lp);
                (e["token"].as_str().unwrap_or_default().to_string(), e["logprob"].clone())
            })
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": words, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_parsed_and_bad_ones_skipped() {
        let mut c = Choice::new(0);
        assert_eq!(c.push(b"tHel", 8).text, "Hel");
        let e = "é".as_bytes();
        assert_eq!(c.push(&[b't', b'l', b'o', e[0]], 8).text, "lo");
        assert_eq!(c.push(&[b't', e[1]], 8).text, "é");
        assert_eq!(
            c.push(b"l5:-0.5 7:-1.25 9:-inf", 8).logprobs,
            Some(vec![(5, -0.5), (7, -1.25), (9, f32::NEG_INFINITY)])
        );
        assert!(c.push(b"l5:x", 8).logprobs.is_none());
        assert!(c.push(b"l", 8).logprobs.is_none());
        assert_eq!(c.push(b"zwhatever", 8).text, "");
        assert_eq!(c.push(b"", 8).text, "");
        assert_eq!(c.finish_reason(), "length");
        c.push(b"u12 4 3 stop", 8);
        assert_eq!(c.usage, Some(Usage { prompt: 12, cached: 4, completion: 3, stopped: true }));
        assert_eq!(c.finish_reason(), "stop");
        c.push(b"u12 4 3 maybe", 8);
        assert_eq!(c.usage, None);
        assert_eq!(c.text, "Helloé");
        let mut d = Choice::new(1);
        for _ in 0..5 {
            d.push(b"l1:-1", 2);
        }
        assert_eq!(d.logprobs.len(), 2, "bounded by max_tokens");
    }
}
