//! The byte-level BPE tokenizer that GGUF files carry (`tokenizer.ggml.model = "gpt2"`), and the
//! same tokenizer read from a Hugging Face `tokenizer.json`.
//!
//! Encoding runs in three steps, as llama.cpp and Hugging Face `tokenizers` do:
//!
//! 1. **Special tokens** (control, user-defined and unknown tokens) are cut out of the text
//!    verbatim, longest first. User-defined tokens are always matched; control and unknown tokens
//!    only when `parse_special` is true (so that text typed by a user cannot forge
//!    `<|im_start|>`).
//! 2. **Pre-tokenization** splits each remaining fragment into words with the regular expression
//!    of the model's pre-tokenizer family (`tokenizer.ggml.pre`): GPT-2, SmolLM / StarCoder
//!    (every digit its own word, then GPT-2), Llama 3, Qwen2. The lookahead `\s+(?!\S)` of those
//!    expressions is done by hand on top of the `regex` crate (which has no lookaround): a run of
//!    whitespace that the plain `\s+` matched gives its last character back to the next word when
//!    a non-space follows.
//! 3. **BPE**: the word's bytes are mapped to GPT-2's printable "byte characters", one symbol per
//!    byte, and adjacent pairs are merged lowest merge rank first (leftmost first among equal
//!    ranks), as Hugging Face's `Word::merge_all` does, with a heap. Results are cached per word.
//!
//! Decoding maps every normal token's characters back to bytes; special and user-defined tokens
//! decode to their text as it is. [`StreamDecoder`] turns a stream of tokens into complete UTF-8.

use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use regex::Regex;

/// What went wrong building a [`Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key that the tokenizer needs is absent.
    #[error("GGUF metadata key `{0}` is missing: the file carries no usable tokenizer")]
    MissingKey(String),
    /// A metadata key holds a value of another type than expected.
    #[error("GGUF metadata key `{key}` should be {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What it should hold, in words.
        expected: &'static str,
    },
    /// The tokenizer is of a kind this module does not implement.
    #[error(
        "tokenizer model `{0}` is not supported: only byte-level BPE (`gpt2` in GGUF, `BPE` with a ByteLevel pre-tokenizer and decoder in tokenizer.json) is"
    )]
    UnsupportedModel(String),
    /// The pre-tokenizer (`tokenizer.ggml.pre`, or the `pre_tokenizer` of a tokenizer.json) is not
    /// one this module implements.
    #[error(
        "pre-tokenizer `{0}` is not supported (supported: gpt2 family, smollm/starcoder family, llama-bpe/llama3 family, qwen2 family)"
    )]
    UnsupportedPreTokenizer(String),
    /// A feature of a tokenizer.json that this module does not implement.
    #[error("tokenizer.json: {0} is not supported")]
    Unsupported(String),
    /// The vocabulary is empty.
    #[error("the tokenizer has an empty vocabulary")]
    EmptyVocab,
    /// The token list and the token-type list differ in length.
    #[error("{tokens} tokens but {types} token types: the two lists must have the same length")]
    TypeCountMismatch {
        /// Number of tokens.
        tokens: usize,
        /// Number of token types.
        types: usize,
    },
    /// A merge rule is not two symbols separated by one space.
    #[error("merge rule {index} ({rule:?}) is not of the form \"left right\"")]
    BadMerge {
        /// Rank (index) of the rule.
        index: usize,
        /// The rule as written.
        rule: String,
    },
    /// A special token id (BOS, EOS, …) lies outside the vocabulary.
    #[error("{what} token id {id} is outside the vocabulary of {vocab_size} tokens")]
    IdOutOfRange {
        /// Which special token.
        what: &'static str,
        /// The id given.
        id: u64,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A tokenizer.json could not be parsed.
    #[error("tokenizer.json is not valid: {0}")]
    Json(String),
    /// The regular expression that matches special tokens could not be built (too many or too
    /// long special tokens).
    #[error("cannot build the special-token matcher: {0}")]
    Regex(#[from] regex::Error),
}

/// The type of a token, as `tokenizer.ggml.token_type` numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// An ordinary BPE token (1).
    Normal,
    /// The unknown token (2).
    Unknown,
    /// A control token such as `<|im_start|>` (3): matched in text only with `parse_special`.
    Control,
    /// A user-defined (added, non-special) token (4): always matched verbatim in text.
    UserDefined,
    /// An unused slot (5).
    Unused,
    /// A byte token `<0xAB>` (6; SentencePiece vocabularies).
    Byte,
    /// Any other number.
    Other(i32),
}

impl TokenType {
    /// The type for a `tokenizer.ggml.token_type` number.
    pub fn from_i32(v: i32) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            other => TokenType::Other(other),
        }
    }

    /// Whether tokens of this type are matched verbatim in text rather than built by BPE.
    fn is_special(self) -> bool {
        matches!(self, TokenType::Unknown | TokenType::Control | TokenType::UserDefined)
    }
}

/// The pre-tokenizer families: how text is split into words before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// SmolLM, StarCoder and kin: every `\p{N}` character is a word of its own, then GPT-2 on
    /// the text between (Hugging Face: `Digits(individual_digits)` then `ByteLevel`).
    DigitsThenGpt2,
    /// Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`; whole words found in the vocabulary
    /// are taken as they are (`ignore_merges`).
    Llama3,
    /// Qwen2: as Llama 3 but one digit per word (`\p{N}`), and merges are not skipped.
    Qwen2,
}

/// The Llama 3 split expression as tokenizer.json writes it.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 split expression as tokenizer.json writes it.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The GPT-2 expression, as it can appear in a Split pre-tokenizer.
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

impl PreTokenizer {
    /// The family for a `tokenizer.ggml.pre` name (the names llama.cpp knows for these families).
    pub fn from_gguf_name(name: &str) -> Option<PreTokenizer> {
        Some(match name {
            "default" | "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "roberta-bpe" | "jina-es"
            | "jina-de" | "jina-v1-en" | "jina-v2-es" | "jina-v2-de" | "jina-v2-code" | "gigachat" | "trillion"
            | "exaone4" | "granite-docling" => PreTokenizer::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
                PreTokenizer::DigitsThenGpt2
            }
            "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "dbrx" | "smaug-bpe" | "pixtral" => PreTokenizer::Llama3,
            "qwen2" | "stablelm2" | "megrez" | "deepseek-r1-qwen" => PreTokenizer::Qwen2,
            _ => return None,
        })
    }

    /// The expression actually compiled: the `\s+(?!\S)` alternative removed (done by hand).
    fn compiled_pattern(self) -> &'static str {
        match self {
            PreTokenizer::Gpt2 | PreTokenizer::DigitsThenGpt2 => {
                r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"
            }
            PreTokenizer::Llama3 => {
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+"
            }
            PreTokenizer::Qwen2 => {
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+"
            }
        }
    }

    /// Whether a whitespace-only match came from the final `\s+` alternative (and so stands in
    /// for `\s+(?!\S)`). In the Llama 3 / Qwen2 expressions a whitespace match that holds a line
    /// break came from `\s*[\r\n]+`, which comes first and is not trimmed.
    fn is_trailing_space_match(self, m: &str) -> bool {
        match self {
            PreTokenizer::Gpt2 | PreTokenizer::DigitsThenGpt2 => m.chars().all(char::is_whitespace),
            PreTokenizer::Llama3 | PreTokenizer::Qwen2 => {
                m.chars().all(|c| c.is_whitespace() && c != '\r' && c != '\n')
            }
        }
    }
}

/// FxHash-style hasher for the integer keys of the merge table.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        // The product's low bits depend only on the key's low bits (the right-hand token), and
        // the table indexes by low bits: bring the well-mixed high bits down.
        self.0.rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Words longer than this (in bytes) are not cached.
const CACHE_MAX_WORD: usize = 64;
/// The word cache is emptied when it holds this many words.
const CACHE_MAX_ENTRIES: usize = 1 << 16;

/// GPT-2's map from bytes to printable characters: printable Latin-1 bytes map to themselves,
/// the others to U+0100 and on, in byte order.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[usize::from(b)] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).expect("U+0100..U+0143 are characters");
            n += 1;
            c
        };
    }
    table
}

/// A byte-level BPE tokenizer. Shareable between threads (the word cache is behind a mutex).
pub struct Tokenizer {
    /// Token strings as the vocabulary writes them (byte characters for normal tokens).
    tokens: Vec<String>,
    types: Vec<TokenType>,
    vocab: HashMap<String, u32>,
    /// `(left << 32 | right)` → `(rank, merged id)`.
    merges: FxMap<u64, (u32, u32)>,
    /// The token of each byte's single byte character.
    byte_ids: [Option<u32>; 256],
    byte_chars: [char; 256],
    /// Decoded bytes of every token, back to back; token `i` is `pieces[offsets[i]..offsets[i+1]]`.
    pieces: Vec<u8>,
    offsets: Vec<usize>,
    pre: PreTokenizer,
    pre_re: Regex,
    ignore_merges: bool,
    /// Matches every special token (unknown, control, user-defined), longest first.
    all_specials: Option<Regex>,
    /// Matches the user-defined tokens only.
    user_specials: Option<Regex>,
    special_ids: HashMap<String, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// Reads a GGUF string array.
fn gguf_strings(file: &crate::gguf::GgufFile, key: &str) -> Result<Vec<String>, TokenizerError> {
    let value = file.get(key).ok_or_else(|| TokenizerError::MissingKey(key.into()))?;
    let wrong = || TokenizerError::WrongType { key: key.into(), expected: "an array of strings" };
    let array = value.as_array().ok_or_else(wrong)?;
    array.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(wrong)).collect()
}

/// Reads an optional GGUF token id.
fn gguf_id(file: &crate::gguf::GgufFile, key: &str) -> Option<u64> {
    file.get(key).and_then(|v| v.as_u64())
}

impl Tokenizer {
    /// The tokenizer of a GGUF file (`tokenizer.ggml.*` metadata).
    pub fn from_gguf(file: &crate::gguf::GgufFile) -> Result<Tokenizer, TokenizerError> {
        let model = file
            .get("tokenizer.ggml.model")
            .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.model".into()))?
            .as_str()
            .ok_or_else(|| TokenizerError::WrongType { key: "tokenizer.ggml.model".into(), expected: "a string" })?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_owned()));
        }
        let tokens = gguf_strings(file, "tokenizer.ggml.tokens")?;
        let merges = gguf_strings(file, "tokenizer.ggml.merges")?;
        let types = match file.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => {
                let wrong = || TokenizerError::WrongType {
                    key: "tokenizer.ggml.token_type".into(),
                    expected: "an array of integers",
                };
                let array = v.as_array().ok_or_else(wrong)?;
                array
                    .iter()
                    .map(|t| t.as_i64().and_then(|t| i32::try_from(t).ok()).ok_or_else(wrong))
                    .collect::<Result<Vec<i32>, _>>()?
            }
        };
        let pre = file.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
        let n = tokens.len();
        let check = |what: &'static str, key: &str| -> Result<Option<u32>, TokenizerError> {
            match gguf_id(file, key) {
                None => Ok(None),
                Some(id) if id < n as u64 => Ok(Some(id as u32)),
                Some(id) => Err(TokenizerError::IdOutOfRange { what, id, vocab_size: n }),
            }
        };
        let bos = check("BOS", "tokenizer.ggml.bos_token_id")?;
        let eos = check("EOS", "tokenizer.ggml.eos_token_id")?;
        let unk = check("unknown", "tokenizer.ggml.unknown_token_id")?;
        let mut tok = Tokenizer::from_parts(tokens, merges, types, pre, bos, eos)?;
        tok.unk = unk;
        if let Some(add_bos) = file.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()) {
            tok.add_bos = add_bos;
        }
        Ok(tok)
    }

    /// A tokenizer from its parts: token strings (GPT-2 byte characters for normal tokens),
    /// merge rules `"left right"` (rank = index), token types (`tokenizer.ggml.token_type`
    /// numbers; empty means all normal), the `tokenizer.ggml.pre` name, BOS and EOS.
    pub fn from_parts(
        tokens: Vec<String>,
        merges: Vec<String>,
        token_types: Vec<i32>,
        pre: &str,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Tokenizer, TokenizerError> {
        let pairs = merges
            .into_iter()
            .enumerate()
            .map(|(index, rule)| match rule.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok((a.to_owned(), b.to_owned())),
                _ => Err(TokenizerError::BadMerge { index, rule }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pre_type =
            PreTokenizer::from_gguf_name(pre).ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(pre.to_owned()))?;
        let types = if token_types.is_empty() { vec![1; tokens.len()] } else { token_types };
        let ignore_merges = pre_type == PreTokenizer::Llama3;
        Tokenizer::build(tokens, pairs, types, pre_type, ignore_merges, bos, eos)
    }

    /// A tokenizer from a Hugging Face `tokenizer.json` of a byte-level BPE model: `model.vocab`,
    /// `model.merges` (strings or pairs), `added_tokens` (special ones become control tokens, the
    /// others user-defined), and a ByteLevel pre-tokenizer, alone or after `Digits` or a `Split`
    /// with the Llama 3 / Qwen2 / GPT-2 expression. A NFC normalizer is accepted and not applied
    /// (as llama.cpp does). BOS and EOS live in `tokenizer_config.json`: set them with
    /// [`Tokenizer::set_bos`] and [`Tokenizer::set_eos`].
    pub fn from_tokenizer_json(json: &str) -> Result<Tokenizer, TokenizerError> {
        use serde_json::Value as J;
        let root: J = serde_json::from_str(json).map_err(|e| TokenizerError::Json(e.to_string()))?;
        let model = &root["model"];
        let model_type = model["type"].as_str().unwrap_or("");
        if model_type != "BPE" {
            return Err(TokenizerError::UnsupportedModel(
                if model_type.is_empty() { "(none)" } else { model_type }.to_owned(),
            ));
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if model[key].as_str().is_some_and(|s| !s.is_empty()) {
                return Err(TokenizerError::Unsupported(format!("model.{key}")));
            }
        }
        if model["byte_fallback"].as_bool() == Some(true) {
            return Err(TokenizerError::Unsupported("model.byte_fallback (SentencePiece-style BPE)".into()));
        }
        match &root["normalizer"] {
            J::Null => {}
            n if n["type"] == "NFC" => {}
            n => return Err(TokenizerError::Unsupported(format!("normalizer {}", n["type"]))),
        }
        match &root["decoder"] {
            J::Null => {}
            d if d["type"] == "ByteLevel" => {}
            d => return Err(TokenizerError::Unsupported(format!("decoder {}", d["type"]))),
        }
        let pre = json_pre_tokenizer(&root["pre_tokenizer"])?;

        let vocab =
            model["vocab"].as_object().ok_or_else(|| TokenizerError::Json("model.vocab is not an object".into()))?;
        let mut entries: Vec<(u32, String, i32)> = Vec::with_capacity(vocab.len());
        for (text, id) in vocab {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| TokenizerError::Json(format!("model.vocab[{text:?}] is not a token id")))?;
            entries.push((id, text.clone(), 1));
        }
        if let Some(added) = root["added_tokens"].as_array() {
            for t in added {
                let id = t["id"]
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| TokenizerError::Json(format!("added token {t} has no id")))?;
                let content = t["content"]
                    .as_str()
                    .ok_or_else(|| TokenizerError::Json(format!("added token {t} has no content")))?;
                let ty = if t["special"].as_bool() == Some(true) { 3 } else { 4 };
                entries.push((id, content.to_owned(), ty));
            }
        }
        let n = entries.iter().map(|e| e.0 as usize + 1).max().ok_or(TokenizerError::EmptyVocab)?;
        let mut tokens = vec![String::new(); n];
        let mut types = vec![5; n]; // gaps are unused slots
        for (id, text, ty) in entries {
            tokens[id as usize] = text;
            types[id as usize] = ty;
        }

        let merges =
            model["merges"].as_array().ok_or_else(|| TokenizerError::Json("model.merges is not an array".into()))?;
        let mut pairs = Vec::with_capacity(merges.len());
        for (index, m) in merges.iter().enumerate() {
            let pair = match m {
                J::String(s) => s
                    .split_once(' ')
                    .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                    .map(|(a, b)| (a.to_owned(), b.to_owned())),
                J::Array(a) if a.len() == 2 => match (&a[0], &a[1]) {
                    (J::String(l), J::String(r)) => Some((l.clone(), r.clone())),
                    _ => None,
                },
                _ => None,
            };
            pairs.push(pair.ok_or_else(|| TokenizerError::BadMerge { index, rule: m.to_string() })?);
        }
        let ignore_merges = model["ignore_merges"].as_bool().unwrap_or(false);
        let mut tok = Tokenizer::build(tokens, pairs, types, pre, ignore_merges, None, None)?;
        if let Some(unk) = model["unk_token"].as_str() {
            tok.unk = tok.vocab.get(unk).copied();
        }
        Ok(tok)
    }

    fn build(
        tokens: Vec<String>,
        merges: Vec<(String, String)>,
        types: Vec<i32>,
        pre: PreTokenizer,
        ignore_merges: bool,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Tokenizer, TokenizerError> {
        let n = tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n > u32::MAX as usize {
            return Err(TokenizerError::IdOutOfRange { what: "vocabulary", id: n as u64, vocab_size: n });
        }
        if types.len() != n {
            return Err(TokenizerError::TypeCountMismatch { tokens: n, types: types.len() });
        }
        for (what, id) in [("BOS", bos), ("EOS", eos)] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(TokenizerError::IdOutOfRange { what, id: u64::from(id), vocab_size: n });
            }
        }
        let types: Vec<TokenType> = types.into_iter().map(TokenType::from_i32).collect();

        let mut vocab = HashMap::with_capacity(n);
        for (id, t) in tokens.iter().enumerate() {
            if !t.is_empty() {
                vocab.entry(t.clone()).or_insert(id as u32);
            }
        }

        let byte_chars = byte_to_char_table();
        let mut char_bytes: HashMap<char, u8> = HashMap::with_capacity(256);
        let mut byte_ids = [None; 256];
        for (b, &c) in byte_chars.iter().enumerate() {
            char_bytes.insert(c, b as u8);
            byte_ids[b] = vocab.get(c.encode_utf8(&mut [0; 4]) as &str).copied();
        }

        let mut merge_map: FxMap<u64, (u32, u32)> = FxMap::default();
        merge_map.reserve(merges.len());
        let mut joined = String::new();
        for (rank, (a, b)) in merges.iter().enumerate() {
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            // A rule whose parts or result is not in the vocabulary can never apply: skip it.
            if let (Some(&l), Some(&r), Some(&m)) = (vocab.get(a), vocab.get(b), vocab.get(&joined)) {
                merge_map.entry(u64::from(l) << 32 | u64::from(r)).or_insert((rank as u32, m));
            }
        }

        let mut pieces = Vec::new();
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        for (t, ty) in tokens.iter().zip(&types) {
            if ty.is_special() {
                pieces.extend_from_slice(t.as_bytes());
            } else {
                for c in t.chars() {
                    match char_bytes.get(&c) {
                        Some(&b) => pieces.push(b),
                        // Not a byte character (a vocabulary that is not byte-level): as it is.
                        None => pieces.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
            }
            offsets.push(pieces.len());
        }

        let mut special_ids = HashMap::new();
        let mut all: Vec<(&str, u32)> = Vec::new();
        let mut user: Vec<(&str, u32)> = Vec::new();
        for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            if ty.is_special() && !t.is_empty() {
                special_ids.entry(t.clone()).or_insert(id as u32);
                all.push((t, id as u32));
                if *ty == TokenType::UserDefined {
                    user.push((t, id as u32));
                }
            }
        }
        let matcher = |mut list: Vec<(&str, u32)>| -> Result<Option<Regex>, regex::Error> {
            if list.is_empty() {
                return Ok(None);
            }
            // Longest first: with leftmost-first alternation, this is leftmost-longest.
            list.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
            list.dedup_by(|a, b| a.0 == b.0);
            let pattern = list.iter().map(|(t, _)| regex::escape(t)).collect::<Vec<_>>().join("|");
            regex::RegexBuilder::new(&pattern).size_limit(1 << 26).build().map(Some)
        };
        let all_specials = matcher(all)?;
        let user_specials = matcher(user)?;

        let pre_re = Regex::new(pre.compiled_pattern()).expect("the pre-tokenizer expressions are valid");
        let unk = tokens.iter().zip(&types).position(|(_, ty)| *ty == TokenType::Unknown).map(|i| i as u32);
        Ok(Tokenizer {
            tokens,
            types,
            vocab,
            merges: merge_map,
            byte_ids,
            byte_chars,
            pieces,
            offsets,
            pre,
            pre_re,
            ignore_merges,
            all_specials,
            user_specials,
            special_ids,
            bos,
            eos,
            unk,
            add_bos: false,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Encodes text. With `parse_special`, control tokens written in the text (such as
    /// `<|im_start|>`) become their ids; without it they are tokenized as plain text.
    /// User-defined tokens are matched either way. No BOS is added: see [`Tokenizer::add_bos`].
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let matcher = if parse_special { self.all_specials.as_ref() } else { self.user_specials.as_ref() };
        let mut pos = 0;
        if let Some(re) = matcher {
            for m in re.find_iter(text) {
                self.encode_fragment(&text[pos..m.start()], &mut ids);
                ids.push(self.special_ids[m.as_str()]);
                pos = m.end();
            }
        }
        self.encode_fragment(&text[pos..], &mut ids);
        ids
    }

    /// Pre-tokenizes a fragment free of special tokens and BPE-encodes each word.
    fn encode_fragment(&self, text: &str, ids: &mut Vec<u32>) {
        self.for_each_word(text, &mut |word| self.encode_word(word, ids));
    }

    /// The words that pre-tokenization splits text into (special tokens are not cut out here):
    /// what BPE then runs on, one word at a time.
    pub fn pre_tokenize<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut words = Vec::new();
        self.for_each_word(text, &mut |word| words.push(word));
        words
    }

    /// Calls `f` on each pre-tokenized word of `text`, in order.
    fn for_each_word<'a>(&self, text: &'a str, f: &mut dyn FnMut(&'a str)) {
        if text.is_empty() {
            return;
        }
        match self.pre {
            PreTokenizer::DigitsThenGpt2 => {
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        self.split_words(&text[start..i], f);
                        let end = i + c.len_utf8();
                        f(&text[i..end]);
                        start = end;
                    }
                }
                self.split_words(&text[start..], f);
            }
            _ => self.split_words(text, f),
        }
    }

    /// Splits text into words with the pre-tokenizer expression.
    fn split_words<'a>(&self, text: &'a str, f: &mut dyn FnMut(&'a str)) {
        let mut pos = 0;
        while pos < text.len() {
            let Some(m) = self.pre_re.find_at(text, pos) else {
                f(&text[pos..]);
                return;
            };
            if m.start() > pos {
                // Text no alternative matched (none such with these expressions): a word of its own.
                f(&text[pos..m.start()]);
            }
            let mut end = m.end();
            let s = m.as_str();
            // `\s+(?!\S)`: a run of spaces followed by a non-space gives its last character to
            // the next word, unless the run is a single character.
            if end < text.len() && self.pre.is_trailing_space_match(s) {
                let last = s.chars().next_back().map_or(0, char::len_utf8);
                if s.len() > last {
                    end -= last;
                }
            }
            if end <= pos {
                // An empty match (none of these expressions has one): take one character.
                end = pos + text[pos..].chars().next().map_or(1, char::len_utf8);
                f(&text[pos..end]);
            } else {
                f(&text[m.start()..end]);
            }
            pos = end;
        }
    }

    /// BPE-encodes one word.
    fn encode_word(&self, word: &str, ids: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges || word.len() == 1 {
            let mapped: String = word.bytes().map(|b| self.byte_chars[usize::from(b)]).collect();
            if let Some(&id) = self.vocab.get(&mapped) {
                ids.push(id);
                return;
            }
        }
        let cacheable = word.len() <= CACHE_MAX_WORD;
        if cacheable && let Some(hit) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(word) {
            ids.extend_from_slice(hit);
            return;
        }
        let start = ids.len();
        self.bpe(word.as_bytes(), ids);
        if cacheable {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= CACHE_MAX_ENTRIES {
                cache.clear();
            }
            cache.insert(word.to_owned(), ids[start..].to_vec());
        }
    }

    /// The merge of two adjacent symbols, if a rule exists: `(rank, merged id)`.
    fn merge_of(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        self.merges.get(&(u64::from(left) << 32 | u64::from(right))).copied()
    }

    /// Byte-pair encoding of one word's bytes, lowest rank first, leftmost first among equals.
    fn bpe(&self, bytes: &[u8], ids: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        struct Sym {
            id: u32,
            prev: usize,
            next: usize,
            alive: bool,
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(bytes.len());
        for &b in bytes {
            // A byte without a token (not in a complete byte-level vocabulary): the unknown
            // token, or nothing.
            let Some(id) = self.byte_ids[usize::from(b)].or(self.unk) else { continue };
            let i = syms.len();
            syms.push(Sym { id, prev: i.wrapping_sub(1), next: i + 1, alive: true });
        }
        let Some(last) = syms.last_mut() else { return };
        last.next = NONE;
        if let Some(first) = syms.first_mut() {
            first.prev = NONE;
        }
        // Min-heap on (rank, position); the merged id is checked again on pop.
        let mut heap: BinaryHeap<std::cmp::Reverse<(u32, usize, u32)>> = BinaryHeap::new();
        for i in 0..syms.len().saturating_sub(1) {
            if let Some((rank, new_id)) = self.merge_of(syms[i].id, syms[i + 1].id) {
                heap.push(std::cmp::Reverse((rank, i, new_id)));
            }
        }
        while let Some(std::cmp::Reverse((rank, pos, new_id))) = heap.pop() {
            let next = syms[pos].next;
            if !syms[pos].alive || next == NONE {
                continue;
            }
            // Stale entry: one of the two symbols has changed since it was pushed.
            if self.merge_of(syms[pos].id, syms[next].id) != Some((rank, new_id)) {
                continue;
            }
            syms[pos].id = new_id;
            syms[next].alive = false;
            let after = syms[next].next;
            syms[pos].next = after;
            if after != NONE {
                syms[after].prev = pos;
            }
            let prev = syms[pos].prev;
            if prev != NONE
                && let Some((r, id)) = self.merge_of(syms[prev].id, new_id)
            {
                heap.push(std::cmp::Reverse((r, prev, id)));
            }
            if after != NONE
                && let Some((r, id)) = self.merge_of(new_id, syms[after].id)
            {
                heap.push(std::cmp::Reverse((r, pos, id)));
            }
        }
        let mut i = 0;
        while i != NONE {
            ids.push(syms[i].id);
            i = syms[i].next;
        }
    }

    /// Decodes ids to text; bytes that do not form UTF-8 (a character cut between tokens)
    /// become U+FFFD. Ids outside the vocabulary decode to nothing.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_piece(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes a token stands for (special tokens: their text). Empty for ids outside the
    /// vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.token_piece(id).to_vec()
    }

    /// [`Tokenizer::token_bytes`] without the copy.
    pub fn token_piece(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i >= self.tokens.len() {
            return &[];
        }
        &self.pieces[self.offsets[i]..self.offsets[i + 1]]
    }

    /// The token string as the vocabulary writes it (GPT-2 byte characters: `"Ġthe"` for `" the"`).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a vocabulary string (as the vocabulary writes it: `"Ġthe"`, `"<|im_end|>"`).
    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.vocab.get(s).copied()
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The unknown token.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Sets the beginning-of-sequence token (tokenizer.json does not carry it).
    pub fn set_bos(&mut self, bos: Option<u32>) {
        self.bos = bos.filter(|&id| (id as usize) < self.tokens.len());
    }

    /// Sets the end-of-sequence token (tokenizer.json does not carry it).
    pub fn set_eos(&mut self, eos: Option<u32>) {
        self.eos = eos.filter(|&id| (id as usize) < self.tokens.len());
    }

    /// Takes BOS, EOS and whether to add BOS from a Hugging Face directory's
    /// `tokenizer_config.json` (`bos_token`, `eos_token`: a token's text, or `{"content": text}`;
    /// `add_bos_token`), then, for what it leaves unsaid, from `config.json`'s `bos_token_id`
    /// and `eos_token_id` (a number, or a list whose first entry is taken). A token named that
    /// the vocabulary does not hold, or an id past it, is left unset.
    pub fn apply_hf_config(
        &mut self,
        tokenizer_config: Option<&serde_json::Value>,
        config: Option<&serde_json::Value>,
    ) {
        let text =
            |v: &serde_json::Value| v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str())).map(str::to_owned);
        let named = |key: &str| tokenizer_config.and_then(|c| c.get(key)).and_then(text);
        let numbered = |key: &str| {
            config.and_then(|c| c.get(key)).and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|f| f.as_u64())))
        };
        let id = |this: &Self, key: &str, id_key: &str| match named(key) {
            Some(t) => this.token_id(&t),
            None => numbered(id_key).and_then(|n| u32::try_from(n).ok()),
        };
        let (bos, eos) = (id(self, "bos_token", "bos_token_id"), id(self, "eos_token", "eos_token_id"));
        if bos.is_some() {
            self.set_bos(bos);
        }
        if eos.is_some() {
            self.set_eos(eos);
        }
        if let Some(add) = tokenizer_config.and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool()) {
            self.add_bos = add && self.bos.is_some();
        }
    }

    /// Whether the model expects BOS before a prompt (`tokenizer.ggml.add_bos_token`; false when
    /// absent). Chat templates that write BOS themselves (Llama 3) already include it.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Number of merge rules in use.
    pub fn merge_count(&self) -> usize {
        self.merges.len()
    }

    /// The pre-tokenizer family.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// The type of a token (`None` outside the vocabulary).
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether a token is special: control, user-defined or unknown (matched verbatim in text,
    /// decoded as its text).
    pub fn is_special(&self, id: u32) -> bool {
        self.token_type(id).is_some_and(TokenType::is_special)
    }
}

/// Reads the pre-tokenizer of a tokenizer.json.
fn json_pre_tokenizer(p: &serde_json::Value) -> Result<PreTokenizer, TokenizerError> {
    let unsupported = || TokenizerError::UnsupportedPreTokenizer(p.to_string());
    let byte_level = |b: &serde_json::Value, uses_regex: bool| -> Result<(), TokenizerError> {
        if b["type"] != "ByteLevel" {
            return Err(unsupported());
        }
        if b["add_prefix_space"].as_bool() == Some(true) {
            return Err(TokenizerError::Unsupported("ByteLevel with add_prefix_space".into()));
        }
        if b["use_regex"].as_bool().unwrap_or(true) != uses_regex {
            return Err(unsupported());
        }
        Ok(())
    };
    match p["type"].as_str() {
        Some("ByteLevel") => {
            byte_level(p, true)?;
            Ok(PreTokenizer::Gpt2)
        }
        Some("Sequence") => {
            let list = p["pretokenizers"].as_array().ok_or_else(unsupported)?;
            match list.as_slice() {
                [single] => json_pre_tokenizer(single),
                [first, second] if first["type"] == "Digits" && first["individual_digits"] == true => {
                    byte_level(second, true)?;
                    Ok(PreTokenizer::DigitsThenGpt2)
                }
                [first, second] if first["type"] == "Split" => {
                    if first["behavior"] != "Isolated" || first["invert"] == true {
                        return Err(unsupported());
                    }
                    byte_level(second, false)?;
                    match first["pattern"]["Regex"].as_str() {
                        Some(LLAMA3_PATTERN) => Ok(PreTokenizer::Llama3),
                        Some(QWEN2_PATTERN) => Ok(PreTokenizer::Qwen2),
                        Some(GPT2_PATTERN) => Ok(PreTokenizer::Gpt2),
                        _ => Err(unsupported()),
                    }
                }
                _ => Err(unsupported()),
            }
        }
        _ => Err(unsupported()),
    }
}

/// Turns a stream of tokens into text, holding back the bytes of a character that is split
/// between tokens until it is complete. Bytes that can never form UTF-8 become U+FFFD, as in
/// [`Tokenizer::decode`], so the concatenated output equals `decode` of all the tokens.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.push_bytes(tokenizer.token_piece(id))
    }

    /// Adds raw bytes; returns the text they complete (possibly empty).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[start..valid]).expect("checked valid"));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + bad;
                        }
                        None => {
                            // An incomplete character at the end: keep it for the next token.
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Whether bytes of an incomplete character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: whatever is held back, as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
