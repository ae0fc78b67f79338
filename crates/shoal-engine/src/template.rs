//! Chat templates: turning a conversation into the prompt text a chat model was trained on.
//!
//! GGUF files carry the template as Jinja (`tokenizer.chat_template`). Rather than run Jinja,
//! [`detect`] recognises the two families that the supported models use and [`ChatTemplate`]
//! renders them:
//!
//! - **ChatML** (SmolLM2, Qwen2): `<|im_start|>{role}\n{content}<|im_end|>\n` per message, and
//!   `<|im_start|>assistant\n` as the generation prompt. Templates that insert a default system
//!   message when the conversation does not start with one (SmolLM2: "You are a helpful AI
//!   assistant named SmolLM, trained by Hugging Face") carry it in
//!   [`ChatTemplate::ChatMl::default_system`], read from the Jinja text.
//! - **Llama 3**: `<|begin_of_text|>`, then `<|start_header_id|>{role}<|end_header_id|>\n\n`
//!   `{content}<|eot_id|>` per message (content trimmed, as Meta's template does), and
//!   `<|start_header_id|>assistant<|end_header_id|>\n\n` as the generation prompt. The rendered
//!   text already holds BOS: tokenize it with `parse_special` and add no other BOS. (The Llama 3.1
//!   template's automatic "Cutting Knowledge Date" system message is not reproduced.)
//!
//! - **Any other template** ([`ChatTemplate::Jinja`], [`JinjaTemplate`]): the file's own Jinja
//!   run by `minijinja` (with Python's string methods, as Hugging Face templates use them, and
//!   `raise_exception`), given `messages`, `add_generation_prompt`, `bos_token` and
//!   `eos_token`. A template is untrusted input: at most [`MAX_TEMPLATE_BYTES`], compiled
//!   when the model loads (a template that does not compile fails the load, never a silent
//!   fallback), and each rendering bounded in work ([`RENDER_FUEL`]) and output
//!   ([`MAX_RENDER_BYTES`]).
//!
//! Special tokens appear as text in the rendered prompt: encode it with `parse_special = true`.

use std::sync::Arc;

/// The largest chat template taken.
pub const MAX_TEMPLATE_BYTES: usize = 64 << 10;
/// The most work one rendering may do (minijinja's fuel: about one unit per instruction).
pub const RENDER_FUEL: u64 = 20_000_000;
/// The most text one rendering may write.
pub const MAX_RENDER_BYTES: usize = 16 << 20;

/// Why a chat template cannot be used or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template is larger than [`MAX_TEMPLATE_BYTES`].
    #[error("the chat template is {0} bytes; at most {MAX_TEMPLATE_BYTES} are taken")]
    TooLarge(usize),
    /// The template does not compile.
    #[error("the chat template does not compile: {0}")]
    Syntax(String),
    /// Rendering failed: the template raised an error, used something shoal does not
    /// provide, or ran past its bounds.
    #[error("the chat template failed: {0}")]
    Render(String),
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant` (any role is written as given).
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl Message {
    /// A message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

/// A chat template family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// ChatML.
    ChatMl {
        /// The system message inserted before the first message when that one is not a system
        /// message (SmolLM2's template does this); `None` for none.
        default_system: Option<String>,
    },
    /// Llama 3.
    Llama3,
    /// The model's own Jinja template.
    Jinja(Arc<JinjaTemplate>),
}

/// A model's own Jinja chat template, checked and compiled once (see the module docs).
#[derive(Debug, PartialEq, Eq)]
pub struct JinjaTemplate {
    source: String,
    bos: String,
    eos: String,
}

/// Collects a rendering, refusing past [`MAX_RENDER_BYTES`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDER_BYTES {
            return Err(std::io::Error::other(format!("the rendering is past {MAX_RENDER_BYTES} bytes")));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl JinjaTemplate {
    /// Checks and compiles `source`; `bos` and `eos` are the texts of the model's BOS and EOS
    /// tokens (empty when it has none).
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<JinjaTemplate, TemplateError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::TooLarge(source.len()));
        }
        let t = JinjaTemplate { source: source.to_owned(), bos: bos.to_owned(), eos: eos.to_owned() };
        t.environment().map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(t)
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn environment(&self) -> Result<minijinja::Environment<'static>, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(RENDER_FUEL));
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", self.source.clone())?;
        Ok(env)
    }

    /// Renders `messages` (see [`ChatTemplate::render`]).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let fail = |e: minijinja::Error| TemplateError::Render(describe(&e));
        let env = self.environment().map_err(|e| TemplateError::Syntax(describe(&e)))?;
        let t = env.get_template("chat").map_err(fail)?;
        let msgs: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| minijinja::context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let ctx = minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        };
        let mut out = Bounded(Vec::new());
        t.render_captured_to(ctx, &mut out).map_err(fail)?;
        String::from_utf8(out.0).map_err(|e| TemplateError::Render(e.to_string()))
    }
}

/// An error of minijinja, with its cause, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s += &format!(": {c}");
        src = c.source();
    }
    s.chars().take(512).collect()
}

/// Tokens that end a turn in the chat templates of common model families.
const TURN_ENDS: [&str; 5] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"];

/// SmolLM2's default system message, as its template writes it.
pub const SMOLLM2_DEFAULT_SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// The template family of a Jinja chat template (`tokenizer.chat_template`): `<|im_start|>` means
/// ChatML (with the default system message the template writes, if any), `<|start_header_id|>`
/// Llama 3. `None` for anything else.
pub fn detect(jinja: &str) -> Option<ChatTemplate> {
    if jinja.contains("<|im_start|>") {
        Some(ChatTemplate::ChatMl { default_system: chatml_default_system(jinja) })
    } else if jinja.contains("<|start_header_id|>") {
        Some(ChatTemplate::Llama3)
    } else {
        None
    }
}

/// Finds a literal default system message in a ChatML Jinja template: a string literal
/// `'<|im_start|>system\n…<|im_end|>'` whose text is plain (no quotes, no Jinja). The newline
/// may be written as a real newline or as the escape `\n`.
fn chatml_default_system(jinja: &str) -> Option<String> {
    const HEAD: &str = "<|im_start|>system";
    const END: &str = "<|im_end|>";
    let mut rest = jinja;
    while let Some(at) = rest.find(HEAD) {
        rest = &rest[at + HEAD.len()..];
        let body = if let Some(b) = rest.strip_prefix("\\n") {
            b
        } else if let Some(b) = rest.strip_prefix('\n') {
            b
        } else {
            continue;
        };
        let Some(end) = body.find(END) else { continue };
        let text = &body[..end];
        if text.is_empty() || text.contains(['\'', '"', '{', '}']) {
            continue;
        }
        return Some(unescape_jinja(text));
    }
    None
}

/// Undoes the escapes of a Jinja string literal (`\n`, `\t`, `\\`, `\'`, `\"`).
fn unescape_jinja(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

impl ChatTemplate {
    /// The template of a model file whose chat template is `jinja`: a family shoal renders
    /// itself ([`detect`]), else the Jinja itself, checked and compiled (`bos` and `eos`: the
    /// texts of its BOS and EOS tokens). A file without a template gets ChatML (`None` says
    /// so, for the caller to tell the user).
    pub fn from_file(jinja: Option<&str>, bos: &str, eos: &str) -> Result<Option<ChatTemplate>, TemplateError> {
        let Some(src) = jinja else { return Ok(None) };
        if let Some(t) = detect(src) {
            return Ok(Some(t));
        }
        JinjaTemplate::new(src, bos, eos).map(|t| Some(ChatTemplate::Jinja(Arc::new(t))))
    }

    /// ChatML with no default system message.
    pub fn chat_ml() -> ChatTemplate {
        ChatTemplate::ChatMl { default_system: None }
    }

    /// SmolLM2's template: ChatML with its default system message.
    pub fn smollm2() -> ChatTemplate {
        ChatTemplate::ChatMl { default_system: Some(SMOLLM2_DEFAULT_SYSTEM.to_owned()) }
    }

    /// The prompt text for a conversation; with `add_generation_prompt`, ending with the header
    /// of the assistant's turn so that the model writes the reply.
    ///
    /// Fails only for a [`ChatTemplate::Jinja`] template (it raised an error, or ran past its
    /// bounds).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let mut out = String::new();
        match self {
            ChatTemplate::Jinja(t) => return t.render(messages, add_generation_prompt),
            ChatTemplate::ChatMl { default_system } => {
                if let (Some(system), Some(first)) = (default_system, messages.first())
                    && first.role != "system"
                {
                    out.push_str("<|im_start|>system\n");
                    out.push_str(system);
                    out.push_str("<|im_end|>\n");
                }
                for m in messages {
                    out.push_str("<|im_start|>");
                    out.push_str(&m.role);
                    out.push('\n');
                    out.push_str(&m.content);
                    out.push_str("<|im_end|>\n");
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
            }
            ChatTemplate::Llama3 => {
                out.push_str("<|begin_of_text|>");
                for m in messages {
                    out.push_str("<|start_header_id|>");
                    out.push_str(&m.role);
                    out.push_str("<|end_header_id|>\n\n");
                    out.push_str(m.content.trim());
                    out.push_str("<|eot_id|>");
                }
                if add_generation_prompt {
                    out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
        }
        Ok(out)
    }

    /// The texts of the tokens that end the assistant's turn.
    /// For a Jinja template, the usual end-of-turn tokens its text writes (the model's EOS
    /// ends a turn too; the loader adds it).
    pub fn stop_tokens(&self) -> Vec<&'static str> {
        match self {
            ChatTemplate::ChatMl { .. } => vec!["<|im_end|>"],
            ChatTemplate::Llama3 => vec!["<|eot_id|>"],
            ChatTemplate::Jinja(t) => TURN_ENDS.iter().copied().filter(|e| t.source.contains(e)).collect(),
        }
    }
}
