//! The requests of the OpenAI endpoints, typed and checked: wrong types and values are 400s
//! naming the field; fields shoal knows and does not honour are refused by name unless set
//! to what changes nothing; unknown fields are refused too. What is accepted becomes the chat
//! actor's message (guests/chat `api`, docs/abi.md "The chat actor's API messages"), one per
//! choice.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ApiError, shown};

/// The most tokens one answer may ask for.
pub const MAX_TOKENS: i64 = 1 << 20;
/// The most messages of one request.
pub const MAX_MESSAGES: usize = 4096;
/// The most choices one request asks for (`n`).
pub const MAX_CHOICES: i64 = 16;
/// The most stop sequences, and the longest one (bytes).
pub const MAX_STOPS: usize = 4;
pub const MAX_STOP_BYTES: usize = 256;
/// The most alternatives per token (`top_logprobs`; the completions API's `logprobs` is at
/// most 5, as OpenAI's).
pub const MAX_TOP_LOGPROBS: i64 = 20;

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
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

/// A request's fields, taken one by one: each typed on its own, so that a wrong type is a
/// 400 naming its field; what is left at the end was not asked for.
struct Fields(serde_json::Map<String, Value>);

impl Fields {
    fn take<T: serde::de::DeserializeOwned>(&mut self, name: &'static str) -> Result<Option<T>, ApiError> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v).map(Some).map_err(|e| {
                let e = shown(&e.to_string(), 160);
                ApiError::bad(format!("`{name}` is not what it should be: {e}")).param(name)
            }),
        }
    }
}

/// The fields both endpoints share.
struct Common {
    model: Option<String>,
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    n: Option<i64>,
    stop: Option<Stop>,
}

impl Common {
    fn take(f: &mut Fields) -> Result<Common, ApiError> {
        // Accepted and ignored: they change nothing in the answer.
        for ignored in ["user", "store", "metadata"] {
            f.0.remove(ignored);
        }
        Ok(Common {
            model: f.take("model")?,
            stream: f.take("stream")?.unwrap_or(false),
            stream_options: f.take("stream_options")?,
            max_tokens: f.take("max_tokens")?,
            temperature: f.take("temperature")?,
            top_p: f.take("top_p")?,
            seed: f.take("seed")?,
            n: f.take("n")?,
            stop: f.take("stop")?,
        })
    }
}

/// A chat completion request's body.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct ChatRequest(serde_json::Map<String, Value>);

/// A completion request's body.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct CompletionRequest(serde_json::Map<String, Value>);

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// Whether a field's value asks for nothing shoal would leave out.
type Inert = fn(&Value) -> bool;

fn empty(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|o| o.is_empty())
}

/// The fields of OpenAI's requests that shoal knows and does not honour, each with the
/// values that ask for nothing shoal would leave out (null always does).
const NOT_HONOURED: [(&str, Inert); 11] = [
    ("tools", empty),
    ("tool_choice", |v| matches!(v.as_str(), Some("none" | "auto"))),
    ("parallel_tool_calls", Value::is_boolean),
    ("functions", empty),
    ("function_call", |v| matches!(v.as_str(), Some("none" | "auto"))),
    ("presence_penalty", |v| v.as_f64() == Some(0.0)),
    ("frequency_penalty", |v| v.as_f64() == Some(0.0)),
    ("logit_bias", empty),
    ("echo", |v| *v == Value::Bool(false)),
    ("best_of", |v| v.as_u64() == Some(1)),
    ("suffix", |v| v.as_str() == Some("")),
];

fn refuse_unsupported(fields: &Fields, what: &str) -> Result<(), ApiError> {
    for (name, v) in fields.0.iter().filter(|(_, v)| !v.is_null()) {
        let (message, param) = match NOT_HONOURED.iter().find(|(n, _)| n == name) {
            Some((_, inert)) if inert(v) => continue,
            Some((n, _)) => (format!("`{n}` is not supported by shoal; leave it out (or null) and ask again"), *n),
            None => (format!("`{}` is not a field of a {what} request", shown(name, 48)), "body"),
        };
        return Err(ApiError::bad(message).code("unsupported_parameter").param(param));
    }
    Ok(())
}

fn bad(m: String, p: &'static str) -> ApiError {
    ApiError::bad(m).param(p)
}

/// What the chat actor is asked, once per choice.
pub struct Checked {
    /// The model.
    pub model: String,
    /// What a pool actor's last request is compared with (the messages, or the prompt).
    pub key: super::Key,
    /// The actor's messages, one per choice.
    pub msgs: Vec<String>,
    /// Streamed (server-sent events).
    pub stream: bool,
    /// The stream ends with a chunk of usage.
    pub include_usage: bool,
    /// Log-probabilities asked for, with this many alternatives.
    pub logprobs: Option<u32>,
    /// The endpoint: chat or completions.
    pub chat: bool,
    /// The most tokens a choice generates.
    pub max_tokens: u64,
}

/// The settings lines of the actor's message, and the number of choices.
fn settings(c: &Common, max_tokens: i64, logprobs: Option<u32>, json: bool) -> Result<(String, i64), ApiError> {
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(bad(format!("`n` is {n}; give 1 to {MAX_CHOICES}"), "n"));
    }
    if !(1..=MAX_TOKENS).contains(&max_tokens) {
        return Err(bad(format!("`max_tokens` is {max_tokens}; give 1 to {MAX_TOKENS}"), "max_tokens"));
    }
    let temperature = c.temperature.unwrap_or(f64::from(shoal_abi::DEFAULT_TEMPERATURE));
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(format!("`temperature` is {temperature}; give 0 to 2"), "temperature"));
    }
    let mut s = format!("max_tokens={max_tokens}\ntemperature={temperature}\n");
    if let Some(p) = c.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(bad(format!("`top_p` is {p}; give a number in (0, 1]"), "top_p"));
        }
        s += &format!("top_p={p}\n");
    }
    let stops = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > MAX_STOPS {
        return Err(bad(format!("{} stop sequences; give at most {MAX_STOPS}", stops.len()), "stop"));
    }
    for st in &stops {
        if st.is_empty() || st.len() > MAX_STOP_BYTES {
            return Err(bad(format!("a stop sequence of {} bytes; give 1 to {MAX_STOP_BYTES}", st.len()), "stop"));
        }
        let hex: String = st.bytes().map(|b| format!("{b:02x}")).collect();
        s += &format!("stop={hex}\n");
    }
    if let Some(k) = logprobs {
        s += &format!("logprobs={k}\n");
    }
    if json {
        s += "json=1\n";
    }
    Ok((s, n))
}

/// One message per choice: the same request, each with its own seed (the request's seed
/// plus the choice's index; a fresh one when the request gives none).
fn per_choice(head: &str, settings: &str, seed: Option<i64>, n: i64, body: &str) -> Result<Vec<String>, ApiError> {
    let seed = match seed {
        Some(s) if s < 0 => return Err(bad(format!("`seed` is {s}; give a number from 0"), "seed")),
        Some(s) => s as u64,
        None => super::fresh_seed(),
    };
    Ok((0..n as u64).map(|i| format!("{head}{settings}seed={}\n\n{body}", seed.wrapping_add(i))).collect())
}

fn clean(s: &str) -> String {
    s.chars().filter(|c| *c != '\u{1e}' && *c != '\u{1f}').collect()
}

/// Checks a chat completion request.
pub fn chat(r: ChatRequest, default_model: &str) -> Result<Checked, ApiError> {
    let mut f = Fields(r.0);
    let messages: Vec<Message> =
        f.take("messages")?.ok_or_else(|| bad("`messages` is missing: give the conversation".into(), "messages"))?;
    let max_completion_tokens: Option<i64> = f.take("max_completion_tokens")?;
    let logprobs: Option<bool> = f.take("logprobs")?;
    let top_logprobs: Option<i64> = f.take("top_logprobs")?;
    let response_format: Option<ResponseFormat> = f.take("response_format")?;
    let c = &Common::take(&mut f)?;
    refuse_unsupported(&f, "chat completion")?;
    let logprobs = match (logprobs, top_logprobs) {
        (Some(true), k) => {
            let k = k.unwrap_or(0);
            if !(0..=MAX_TOP_LOGPROBS).contains(&k) {
                return Err(bad(format!("`top_logprobs` is {k}; give 0 to {MAX_TOP_LOGPROBS}"), "top_logprobs"));
            }
            Some(k as u32)
        }
        (_, Some(k)) if k != 0 => {
            return Err(bad("`top_logprobs` needs `logprobs: true`".into(), "top_logprobs"));
        }
        _ => None,
    };
    let json = match response_format.as_ref().map(|f| f.kind.as_str()) {
        None | Some("text") => false,
        Some("json_object") => true,
        Some(k) => {
            return Err(ApiError::bad(format!(
                "`response_format.type` is `{}`; shoal answers `text` or `json_object` (JSON schemas are not supported)",
                shown(k, 32)
            ))
            .code("unsupported_parameter")
            .param("response_format"));
        }
    };
    let max_tokens = max_completion_tokens.or(c.max_tokens).unwrap_or(256);
    let (settings, n) = settings(c, max_tokens, logprobs, json)?;
    if messages.is_empty() || messages.len() > MAX_MESSAGES {
        return Err(bad(format!("give 1 to {MAX_MESSAGES} messages"), "messages"));
    }
    let mut conversation = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            let role = shown(&m.role, 32);
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
                            let k = shown(k, 32);
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
    let mut body = String::new();
    for (r, c) in &conversation {
        body += &format!("{r}\u{1f}{c}\u{1e}");
    }
    Ok(Checked {
        model: c.model.clone().unwrap_or_else(|| default_model.to_string()),
        msgs: per_choice("\u{1}chat/2\n", &settings, c.seed, n, &body)?,
        key: super::Key::Chat(conversation),
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs,
        chat: true,
        max_tokens: max_tokens as u64,
    })
}

/// Checks a (legacy) completion request: one prompt (a list of one is taken too).
pub fn completion(r: CompletionRequest, default_model: &str) -> Result<Checked, ApiError> {
    let mut f = Fields(r.0);
    let prompt: Prompt =
        f.take("prompt")?.ok_or_else(|| bad("`prompt` is missing: give the text to continue".into(), "prompt"))?;
    let logprobs: Option<i64> = f.take("logprobs")?;
    let c = &Common::take(&mut f)?;
    refuse_unsupported(&f, "completion")?;
    let prompt = match prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(v) => {
            return Err(bad(format!("{} prompts; shoal completes one prompt per request", v.len()), "prompt"));
        }
    };
    if prompt.is_empty() {
        return Err(bad("the prompt is empty".into(), "prompt"));
    }
    let logprobs = match logprobs {
        None => None,
        Some(k) if (0..=5).contains(&k) => Some(k as u32),
        Some(k) => return Err(bad(format!("`logprobs` is {k}; give 0 to 5"), "logprobs")),
    };
    let max_tokens = c.max_tokens.unwrap_or(16);
    let (settings, n) = settings(c, max_tokens, logprobs, false)?;
    Ok(Checked {
        model: c.model.clone().unwrap_or_else(|| default_model.to_string()),
        msgs: per_choice("\u{1}complete/2\n", &settings, c.seed, n, &prompt)?,
        key: super::Key::Text(prompt),
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs,
        chat: false,
        max_tokens: max_tokens as u64,
    })
}
