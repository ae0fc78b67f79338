//! Model architectures, one file each, and the generation loop over them.
//!
//! A model holds no device code and no session state (STYLE "models hold no device code"):
//! a config struct read from the model file, weights loaded by name, and a forward pass over
//! the operations of a [`crate::backend::Backend`], handed the session's KV cache.
//!
//! ```no_run
//! use std::path::Path;
//! use shoal_engine::gguf::GgufFile;
//! use shoal_engine::models::{generate, GenerateConfig, llama::Llama};
//! use shoal_engine::tokenizer::Tokenizer;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let file = GgufFile::open(Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf"))?;
//! let model = Llama::from_gguf(&file)?;
//! let tokenizer = Tokenizer::from_gguf(&file)?;
//! let mut cache = model.new_cache(2048)?;
//! let prompt = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", true);
//! let config = GenerateConfig {
//!     max_new_tokens: 32,
//!     stop: tokenizer.token_id("<|im_end|>").into_iter().collect(),
//!     ..GenerateConfig::default()
//! };
//! let out = generate(&model, &tokenizer, &mut cache, &prompt, &config, |_, text| print!("{text}"))?;
//! println!("\n{} tokens", out.tokens.len());
//! # Ok(())
//! # }
//! ```

mod any;
pub mod llama;

use std::time::{Duration, Instant};

use crate::backend::{Backend, KvStore};
use crate::gguf::GgufError;
use crate::kv::KvError;
use crate::safetensors::SafetensorsError;
use crate::sampler::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};

pub use any::{Cache, EngineKind, Model};
pub use llama::{Llama, LlamaConfig};

/// The part of [`EngineError::KvPoolFull`]'s message about the device's budget.
fn budget_note(budget: &Option<(usize, usize)>) -> String {
    match budget {
        Some((used, limit)) => format!(
            " (the GPU's KV budget, shared by every model on it, is spent: {} of {} MiB in use)",
            used >> 20,
            limit >> 20
        ),
        None => String::new(),
    }
}

/// What went wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file could not be read or lacks a key or tensor.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The session's KV cache is full (or could not be made).
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A safetensors file or `config.json` could not be read.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// The model file is of an architecture this crate does not run.
    #[error(
        "model architecture `{found}` is not supported: shoal runs {supported} (GGUF \
         `general.architecture`)"
    )]
    UnsupportedArchitecture {
        /// The file's `general.architecture`.
        found: String,
        /// The architectures that are supported.
        supported: &'static str,
    },
    /// A hyperparameter is missing a sensible value.
    #[error("model config `{key}` is {value}: {reason}")]
    InvalidConfig {
        /// The metadata key (or derived quantity).
        key: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A weight the architecture needs is not in the model file.
    #[error("tensor `{name}` is missing from the model file; is it a {arch} model?")]
    MissingTensor {
        /// The tensor's name.
        name: String,
        /// The architecture it was loaded as.
        arch: String,
    },
    /// A weight has other dimensions than the config implies.
    #[error(
        "tensor `{name}` has dimensions {found:?} (innermost first), but the model config \
         implies {expected:?}"
    )]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// Dimensions from the config, innermost first.
        expected: Vec<u64>,
        /// Dimensions in the file, innermost first.
        found: Vec<u64>,
    },
    /// A forward pass was given no tokens.
    #[error("no tokens to process: a forward pass needs at least one")]
    EmptyInput,
    /// A token id is not in the model's vocabulary.
    #[error("token id {id} is outside the vocabulary ({vocab} entries)")]
    TokenOutOfRange {
        /// The token id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A KV cache was asked for a longer context than the model was trained for.
    #[error(
        "a context of {requested} tokens was asked for, but the model supports at most \
         {max}; ask for {max} or fewer"
    )]
    ContextTooLong {
        /// Positions asked for.
        requested: usize,
        /// The model's context length.
        max: usize,
    },
    /// The backend failed (a device error, or no device).
    #[error("{backend} backend: {message}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// What went wrong, with the values involved.
        message: String,
    },
    /// The backend's shared KV memory has no room for more positions.
    #[error(
        "the {backend} KV pool is full: {needed} more blocks of 16 positions are needed and \
         {free} are free{}; end idle sessions, or give the pool more memory (SHOAL_KV_POOL_MB)",
        budget_note(.device_budget)
    )]
    KvPoolFull {
        /// The backend's name.
        backend: &'static str,
        /// Blocks asked for.
        needed: usize,
        /// Blocks free (or that could still be mapped for the pool).
        free: usize,
        /// When what ran out is the device's KV budget, shared by every model on the GPU:
        /// (bytes in use, limit).
        device_budget: Option<(usize, usize)>,
    },
    /// The work was stopped between two pieces (its deadline passed, or it was killed); the
    /// cache holds what it held before the call.
    #[error("stopped before the end: {0}")]
    Interrupted(#[from] crate::interrupt::Interrupted),
    /// A KV cache made for another model was passed to a forward pass.
    #[error(
        "the KV cache has {found_layers} layers of {found_kv_dim} values per position, but \
         the model needs {layers} layers of {kv_dim}; make it with the model's `new_cache`"
    )]
    CacheMismatch {
        /// The model's layers.
        layers: usize,
        /// The model's values per position and layer.
        kv_dim: usize,
        /// The cache's layers.
        found_layers: usize,
        /// The cache's values per position and layer.
        found_kv_dim: usize,
    },
}

/// Settings of one [`generate`] call.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// How to pick each token.
    pub sampler: Sampler,
    /// Tokens that end the generation (e.g. `<|im_end|>`, the tokenizer's EOS); they are not
    /// returned.
    pub stop: Vec<u32>,
    /// How many of the last context tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
}

impl Default for GenerateConfig {
    /// 256 tokens, greedy, no stop tokens, a penalty window of 64 (llama.cpp's).
    fn default() -> Self {
        Self { max_new_tokens: 256, sampler: Sampler::greedy(), stop: Vec::new(), repeat_last_n: 64 }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was chosen (it is not in [`Generation::tokens`] nor in the cache).
    Stop(u32),
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The KV cache is full.
    ContextFull,
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated tokens, stop token excluded.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub reason: StopReason,
    /// Time of the forward pass over the prompt.
    pub prefill_time: Duration,
    /// Time of the forward passes over one generated token each.
    pub decode_time: Duration,
    /// Number of those one-token forward passes.
    pub decode_steps: usize,
}

impl Generation {
    /// One-token forward passes per second (0 when there were none).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let s = self.decode_time.as_secs_f64();
        if self.decode_steps == 0 || s == 0.0 { 0.0 } else { self.decode_steps as f64 / s }
    }
}

/// Generates tokens after `prompt`, calling `on_token(id, text)` for each one, where `text`
/// is the new text it completes (empty while a multi-byte character is still incomplete).
///
/// The prompt is processed at positions `cache.len()..`, so a session can go on from an
/// earlier turn. Afterwards the cache holds the prompt and every returned token except the
/// last one (its forward pass is only needed if generation continues: feed it with the next
/// prompt). A prompt that does not fit in the cache is an error; running out of room while
/// generating ends the generation with [`StopReason::ContextFull`].
pub fn generate<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    cache: &mut B::Cache,
    prompt: &[u32],
    config: &GenerateConfig,
    mut on_token: impl FnMut(u32, &str),
) -> Result<Generation, EngineError> {
    let mut history: Vec<u32> = prompt.to_vec();
    let window = |h: &[u32]| h[h.len().saturating_sub(config.repeat_last_n)..].to_vec();
    let start = Instant::now();
    let mut next = model.forward_sample(prompt, cache, &config.sampler, &window(&history), 0)?;
    let prefill_time = start.elapsed();

    let mut tokens = Vec::new();
    let mut decode_time = Duration::ZERO;
    let mut decode_steps = 0;
    let mut stream = StreamDecoder::new();
    let reason = loop {
        if tokens.len() >= config.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if config.stop.contains(&next) {
            break StopReason::Stop(next);
        }
        tokens.push(next);
        history.push(next);

        // Stream whole characters only: byte-level tokens can split a UTF-8 sequence.
        let piece = stream.push(tokenizer, next);
        on_token(next, &piece);

        if tokens.len() >= config.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if cache.remaining() == 0 {
            break StopReason::ContextFull;
        }
        let t = Instant::now();
        let step = tokens.len() as u64;
        next = model.forward_sample(&[next], cache, &config.sampler, &window(&history), step)?;
        decode_time += t.elapsed();
        decode_steps += 1;
    };
    Ok(Generation { tokens, reason, prefill_time, decode_time, decode_steps })
}
