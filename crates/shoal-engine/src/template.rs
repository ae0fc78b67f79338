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
//! Special tokens appear as text in the rendered prompt: encode it with `parse_special = true`.

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
}

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
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        match self {
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
        out
    }

    /// The texts of the tokens that end the assistant's turn.
    pub fn stop_tokens(&self) -> &'static [&'static str] {
        match self {
            ChatTemplate::ChatMl { .. } => &["<|im_end|>"],
            ChatTemplate::Llama3 => &["<|eot_id|>"],
        }
    }
}
