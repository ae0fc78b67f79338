//! The inference level's records: `model_info`, the sampler of `session_decode` and the
//! messages of `chat_render`.

use core::mem::{offset_of, size_of};

use crate::le;

/// The `model_info` record (32 bytes): a model's vocabulary and special tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct ModelInfo {
    /// Tokens in the vocabulary.
    pub vocab_size: u32,
    /// The longest context the model was trained for.
    pub context_length: u32,
    /// Beginning of sequence, or [`ModelInfo::NO_TOKEN`].
    pub bos: u32,
    /// End of sequence, or [`ModelInfo::NO_TOKEN`].
    pub eos: u32,
    /// Entries of `stop` used, at most [`ModelInfo::MAX_STOP`].
    pub n_stop: u32,
    /// Tokens that end an assistant turn (the first `n_stop`; the rest are 0).
    pub stop: [u32; ModelInfo::MAX_STOP],
}

const _: () = assert!(size_of::<ModelInfo>() == ModelInfo::SIZE);

impl ModelInfo {
    /// Bytes of the record.
    pub const SIZE: usize = 32;
    /// The most stop tokens the record holds.
    pub const MAX_STOP: usize = 3;
    /// `bos` or `eos` when the model has none.
    pub const NO_TOKEN: u32 = u32::MAX;

    /// The record for these values; `None` becomes [`ModelInfo::NO_TOKEN`], and only the first
    /// [`ModelInfo::MAX_STOP`] stop tokens are kept (`n_stop` counts those kept).
    pub fn new(vocab_size: u32, context_length: u32, bos: Option<u32>, eos: Option<u32>, stop: &[u32]) -> Self {
        let n = stop.len().min(Self::MAX_STOP);
        let mut info = ModelInfo {
            vocab_size,
            context_length,
            bos: bos.unwrap_or(Self::NO_TOKEN),
            eos: eos.unwrap_or(Self::NO_TOKEN),
            n_stop: n as u32,
            stop: [0; Self::MAX_STOP],
        };
        info.stop[..n].copy_from_slice(&stop[..n]);
        info
    }

    /// The beginning-of-sequence token, if any.
    pub fn bos_id(&self) -> Option<u32> {
        (self.bos != Self::NO_TOKEN).then_some(self.bos)
    }
    /// The end-of-sequence token, if any.
    pub fn eos_id(&self) -> Option<u32> {
        (self.eos != Self::NO_TOKEN).then_some(self.eos)
    }
    /// The stop tokens (`n_stop` of them, at most [`ModelInfo::MAX_STOP`]).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop[..(self.n_stop as usize).min(Self::MAX_STOP)]
    }

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        le::put_u32(&mut b, offset_of!(Self, vocab_size), self.vocab_size);
        le::put_u32(&mut b, offset_of!(Self, context_length), self.context_length);
        le::put_u32(&mut b, offset_of!(Self, bos), self.bos);
        le::put_u32(&mut b, offset_of!(Self, eos), self.eos);
        le::put_u32(&mut b, offset_of!(Self, n_stop), self.n_stop);
        for (i, s) in self.stop.iter().enumerate() {
            le::put_u32(&mut b, offset_of!(Self, stop) + 4 * i, *s);
        }
        b
    }
    /// Decodes the record. `n_stop` is kept as it is (see [`ModelInfo::stop_ids`]).
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let mut stop = [0u32; Self::MAX_STOP];
        for (i, s) in stop.iter_mut().enumerate() {
            *s = le::u32(b, offset_of!(Self, stop) + 4 * i);
        }
        ModelInfo {
            vocab_size: le::u32(b, offset_of!(Self, vocab_size)),
            context_length: le::u32(b, offset_of!(Self, context_length)),
            bos: le::u32(b, offset_of!(Self, bos)),
            eos: le::u32(b, offset_of!(Self, eos)),
            n_stop: le::u32(b, offset_of!(Self, n_stop)),
            stop,
        }
    }
}

/// The sampler record (24 bytes) that `session_decode` reads: how to pick the next token.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct SamplerParams {
    /// Softmax temperature; 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely (0 = all).
    pub top_k: u32,
    /// Keep the smallest set with this much probability.
    pub top_p: f32,
    /// Penalty on the tokens of the last 64 (1 = none).
    pub repetition_penalty: f32,
    /// Seed: the same seed gives the same tokens.
    pub seed: u64,
}

const _: () = assert!(size_of::<SamplerParams>() == SamplerParams::SIZE);

impl SamplerParams {
    /// Bytes of the record.
    pub const SIZE: usize = 24;

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        le::put_u32(&mut b, offset_of!(Self, temperature), self.temperature.to_bits());
        le::put_u32(&mut b, offset_of!(Self, top_k), self.top_k);
        le::put_u32(&mut b, offset_of!(Self, top_p), self.top_p.to_bits());
        le::put_u32(&mut b, offset_of!(Self, repetition_penalty), self.repetition_penalty.to_bits());
        le::put_u64(&mut b, offset_of!(Self, seed), self.seed);
        b
    }
    /// Decodes the record.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        SamplerParams {
            temperature: le::f32(b, offset_of!(Self, temperature)),
            top_k: le::u32(b, offset_of!(Self, top_k)),
            top_p: le::f32(b, offset_of!(Self, top_p)),
            repetition_penalty: le::f32(b, offset_of!(Self, repetition_penalty)),
            seed: le::u64(b, offset_of!(Self, seed)),
        }
    }
}

/// One message (16 bytes) of the array `chat_render` reads: two UTF-8 strings in guest
/// memory, each a byte offset and a length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct ChatMessage {
    /// Byte offset of the role (`"system"`, `"user"`, `"assistant"`).
    pub role_ptr: u32,
    /// Bytes of the role.
    pub role_len: u32,
    /// Byte offset of the content.
    pub content_ptr: u32,
    /// Bytes of the content.
    pub content_len: u32,
}

const _: () = assert!(size_of::<ChatMessage>() == ChatMessage::SIZE);

impl ChatMessage {
    /// Bytes of the record.
    pub const SIZE: usize = 16;

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        le::put_u32(&mut b, offset_of!(Self, role_ptr), self.role_ptr);
        le::put_u32(&mut b, offset_of!(Self, role_len), self.role_len);
        le::put_u32(&mut b, offset_of!(Self, content_ptr), self.content_ptr);
        le::put_u32(&mut b, offset_of!(Self, content_len), self.content_len);
        b
    }
    /// Decodes the record.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        ChatMessage {
            role_ptr: le::u32(b, offset_of!(Self, role_ptr)),
            role_len: le::u32(b, offset_of!(Self, role_len)),
            content_ptr: le::u32(b, offset_of!(Self, content_ptr)),
            content_len: le::u32(b, offset_of!(Self, content_len)),
        }
    }
}

/// One record (8 bytes) of what `session_decode_top` writes: a token and its
/// log-probability under the model (natural log, before temperature or truncation).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct TokenLogprob {
    /// The token.
    pub id: u32,
    /// Its log-probability (`-inf` for an impossible token).
    pub logprob: f32,
}

const _: () = assert!(size_of::<TokenLogprob>() == TokenLogprob::SIZE);

impl TokenLogprob {
    /// Bytes of the record.
    pub const SIZE: usize = 8;
    /// The most alternatives one call reports (as OpenAI's `top_logprobs`).
    pub const MAX_TOP: usize = 20;

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        le::put_u32(&mut b, offset_of!(Self, id), self.id);
        le::put_u32(&mut b, offset_of!(Self, logprob), self.logprob.to_bits());
        b
    }
    /// Decodes the record.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        TokenLogprob { id: le::u32(b, offset_of!(Self, id)), logprob: le::f32(b, offset_of!(Self, logprob)) }
    }
}
