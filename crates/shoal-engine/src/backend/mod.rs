//! Where a model's forward pass runs.
//!
//! A model (see [`crate::models::llama`]) holds no device code: it loads its weights through a
//! [`Backend`] and writes its forward pass once, over the operations of [`Ops`]. Each backend
//! decides how an operation runs, where its weights and KV caches live, and how one pass is
//! executed ([`Backend::run`]). A pass is a batch of [`Seq`]s: each session's tokens at its own
//! positions, in its own cache (one decode token, or a chunk of a prompt), so that the weights
//! are read once for every session that is ready (see [`crate::batch`]). The CPU backend calls
//! the kernels of [`crate::cpu`];
//! the CUDA backend (feature `cuda`) keeps bf16 weights and paged KV caches in device memory,
//! uses cuBLAS for prompts, fused kernels for one-token steps, replays the one-token step as a
//! CUDA graph, and samples on the GPU.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::cpu::RopeStyle;
use crate::models::EngineError;
use crate::sampler::Sampler;

pub use cpu::Cpu;

/// The most sequences in one pass (the CUDA kernels' parameter block holds this many).
pub const MAX_SEQS: usize = 256;

/// A session's key/value cache, wherever it lives.
pub trait KvStore: Send {
    /// Positions processed so far (the position the next token will take).
    fn len(&self) -> usize;
    /// The most positions the cache holds.
    fn capacity(&self) -> usize;
    /// Number of layers.
    fn n_layers(&self) -> usize;
    /// Values per position and layer (`n_kv_heads * head_dim`).
    fn kv_dim(&self) -> usize;
    /// Keeps the first `n` positions and forgets the rest; nothing when `n >= len()`.
    fn truncate(&mut self, n: usize);
    /// Whether no position is in use.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Positions still free.
    fn remaining(&self) -> usize {
        self.capacity() - self.len()
    }
    /// Checks that `adding` more positions fit.
    fn check_room(&self, adding: usize) -> Result<(), crate::kv::KvError> {
        if adding > self.remaining() {
            return Err(crate::kv::KvError::ContextFull { len: self.len(), adding, capacity: self.capacity() });
        }
        Ok(())
    }
}

/// What one forward pass should hand back.
#[derive(Debug, Clone, Copy)]
pub enum Want<'a> {
    /// Nothing (a prompt chunk that is not the last).
    Nothing,
    /// The last token's logits, on the host.
    Logits,
    /// The body returns the last token's final hidden state (after the output norm)
    /// instead of logits; handed back on the host. Backends do not record or replay it.
    Hidden,
    /// The next token, chosen by `sampler` from the last token's logits; `history` is the
    /// window the repetition penalty looks at, `step` keys the random draw.
    Token {
        /// How to choose.
        sampler: &'a Sampler,
        /// Tokens the repetition penalty applies to.
        history: &'a [u32],
        /// The sampler's step.
        step: u64,
    },
}

/// What a forward pass handed back (see [`Want`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// For [`Want::Nothing`].
    Nothing,
    /// For [`Want::Logits`] and [`Want::Hidden`].
    Logits(Vec<f32>),
    /// For [`Want::Token`].
    Token(u32),
}

/// The shape of an attention call; positions come from the chunk being run.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub n_kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// One session's part of a pass: its tokens, at positions `cache.len()..`, and what it wants
/// back.
#[derive(Debug)]
pub struct Seq<'a, C> {
    /// The tokens (at least one).
    pub tokens: &'a [u32],
    /// The session's cache; it advances by `tokens.len()`.
    pub cache: &'a mut C,
    /// What to hand back for the last token.
    pub want: Want<'a>,
}

/// The operations a forward pass is written in, for one batch: the tokens of every sequence,
/// one after the other (each sequence's at consecutive positions of its own cache).
/// Activations are `[n_tokens, width]` row-major f32.
pub trait Ops {
    /// A weight as this backend stores it.
    type Weight;
    /// An activation buffer.
    type Act;
    /// The session's KV cache.
    type Cache;

    /// Tokens in this pass, all sequences together.
    fn n_tokens(&self) -> usize;
    /// Sequences in this pass.
    fn n_seqs(&self) -> usize;
    /// A new activation of `rows` rows of `width` values (contents unspecified).
    fn act(&mut self, rows: usize, width: usize) -> Self::Act;
    /// `out[t] = table[token t]` (`table` is `[vocab, width]`).
    fn embed(&mut self, out: &mut Self::Act, table: &Self::Weight);
    /// `out = x / rms(x) * w`, row by row.
    fn rmsnorm(&mut self, out: &mut Self::Act, x: &Self::Act, w: &Self::Weight, eps: f32);
    /// `out = x · wᵀ` (or `out += x · wᵀ` when `accumulate`); `w` is `[out width, in width]`.
    fn matmul(&mut self, out: &mut Self::Act, x: &Self::Act, w: &Self::Weight, accumulate: bool);
    /// `out = silu(x · gateᵀ) * (x · upᵀ)`.
    fn matmul_swiglu(&mut self, out: &mut Self::Act, x: &Self::Act, gate: &Self::Weight, up: &Self::Weight);
    /// The query, key and value projections of one input: `q = x · wqᵀ`, `k = x · wkᵀ`,
    /// `v = x · wvᵀ` (backends may fuse them).
    #[expect(clippy::too_many_arguments, reason = "three outputs and three weights of one projection")]
    fn matmul_qkv(
        &mut self,
        q: &mut Self::Act,
        k: &mut Self::Act,
        v: &mut Self::Act,
        x: &Self::Act,
        wq: &Self::Weight,
        wk: &Self::Weight,
        wv: &Self::Weight,
    ) {
        self.matmul(q, x, wq, false);
        self.matmul(k, x, wk, false);
        self.matmul(v, x, wv, false);
    }
    /// Rotary embedding of the queries and keys (see [`Ops::rope`]; backends may fuse it).
    #[expect(clippy::too_many_arguments, reason = "both tensors and the rotation's shape")]
    fn rope_qk(
        &mut self,
        q: &mut Self::Act,
        k: &mut Self::Act,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        inv_freq: &Self::Weight,
        style: RopeStyle,
    ) {
        self.rope(q, n_heads, head_dim, inv_freq, style);
        self.rope(k, n_kv_heads, head_dim, inv_freq, style);
    }
    /// Adds `bias` to every row.
    fn add_bias(&mut self, x: &mut Self::Act, bias: &Self::Weight);
    /// Rotary embedding of `n_heads` heads of `head_dim`, each token at its own position.
    fn rope(&mut self, x: &mut Self::Act, n_heads: usize, head_dim: usize, inv_freq: &Self::Weight, style: RopeStyle);
    /// Stores `k` and `v` as each token's position of `layer` in its sequence's cache, then
    /// causal attention of `q` over every position of that cache up to the token's own:
    /// `out` gets `[n_tokens, n_heads * head_dim]`.
    fn attention(
        &mut self,
        out: &mut Self::Act,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        layer: usize,
        heads: Heads,
    );
    /// The row of each sequence's last token: `[n_seqs, width]`.
    fn last_rows(&mut self, x: &Self::Act) -> Self::Act;
}

/// The body of a forward pass, run by [`Backend::run`] on one batch: it returns the
/// activation holding each sequence's last logits (`[n_seqs, vocab]`).
pub type Body<'b, B> = dyn for<'o> FnMut(&mut <B as Backend>::Ops<'o>) -> Result<<B as Backend>::Act, EngineError> + 'b;

/// A place where models run.
pub trait Backend: Send + Sync + Sized + 'static {
    /// A weight (matrix or vector) as this backend stores it.
    type Weight: Send + Sync;
    /// An activation buffer.
    type Act;
    /// A session's KV cache.
    type Cache: KvStore;
    /// The operations of one chunk.
    type Ops<'a>: Ops<Weight = Self::Weight, Act = Self::Act, Cache = Self::Cache>
    where
        Self: 'a;

    /// A short name (`cpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// Takes a `[rows, cols]` row-major matrix (a linear layer's weight or an embedding table).
    fn matrix(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Self::Weight, EngineError>;
    /// Takes a vector (norm weights, biases, RoPE frequencies).
    fn vector(&self, data: Vec<f32>) -> Result<Self::Weight, EngineError>;
    /// An empty cache of `n_layers` × `kv_dim` values per position for up to `context`
    /// positions.
    fn new_cache(&self, n_layers: usize, kv_dim: usize, context: usize) -> Result<Self::Cache, EngineError>;
    /// The positions `cache` holds, as plain data on the host.
    fn export_cache(&self, cache: &Self::Cache) -> Result<crate::kv::KvSnapshot, EngineError>;
    /// A cache of `context` positions holding `snap`, which must fit `n_layers` × `kv_dim`.
    fn import_cache(
        &self,
        snap: &crate::kv::KvSnapshot,
        n_layers: usize,
        kv_dim: usize,
        context: usize,
    ) -> Result<Self::Cache, EngineError>;
    /// `cache` copied out in this backend's own fastest form, or `None` when the backend has
    /// none (then [`Backend::export_cache`] is used).
    fn park(&self, _cache: &Self::Cache) -> Result<Option<std::sync::Arc<dyn crate::kv::NativeKv>>, EngineError> {
        Ok(None)
    }
    /// A cache of `context` positions from an image [`Backend::park`] made on this backend,
    /// or `None` when the image is not this backend's (then its portable form is imported).
    fn unpark(
        &self,
        _image: &dyn crate::kv::NativeKv,
        _n_layers: usize,
        _kv_dim: usize,
        _context: usize,
    ) -> Result<Option<Self::Cache>, EngineError> {
        Ok(None)
    }
    /// The most tokens one [`Backend::run`] takes, all sequences together; models split
    /// longer inputs.
    fn max_chunk(&self) -> usize;
    /// The most sequences one [`Backend::run`] takes.
    fn max_seqs(&self) -> usize {
        MAX_SEQS
    }
    /// Makes room in `cache` for `adding` more positions before a forward pass that may take
    /// several runs, so that it fails before changing anything (a shared pool may be full).
    fn reserve(&self, _cache: &mut Self::Cache, _adding: usize) -> Result<(), EngineError> {
        Ok(())
    }
    /// Runs `body` over every sequence's tokens at positions `cache.len()..` of its cache (the
    /// caller checked ids, room, shape, the totals against [`Backend::max_chunk`] and
    /// [`Backend::max_seqs`], that caches are distinct, and that either every sequence or none
    /// wants [`Want::Hidden`]), advances each cache, and hands back what each `want` asks for,
    /// in order. A `body` must issue the same operations on every call with the same numbers
    /// of tokens and sequences (backends may record and replay it).
    fn run(&self, seqs: &mut [Seq<'_, Self::Cache>], body: &mut Body<'_, Self>) -> Result<Vec<Output>, EngineError>;
}
