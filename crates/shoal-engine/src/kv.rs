//! The key/value cache of one session.
//!
//! A decoder attends over every earlier position; the keys and values of those positions are
//! kept here so that each new token costs one position of work, not the whole prefix again.
//! The cache belongs to a session (DESIGN §4): the model is shared and holds no per-session
//! state, and every forward pass is given the cache to read and extend.
//!
//! Layout: for each layer, K and V are row-major `[max_seq, kv_dim]` f32 matrices, where
//! `kv_dim = n_kv_heads * head_dim`; row `p` holds position `p`, heads side by side.

/// What went wrong with a [`KvCache`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The tokens do not fit in the context the cache was sized for.
    #[error(
        "context is full: {len} positions are in use and {adding} more were given, but the \
         cache holds {capacity}; start a new session, truncate the cache, or ask for a larger \
         context"
    )]
    ContextFull {
        /// Positions already in the cache.
        len: usize,
        /// Positions that were to be added.
        adding: usize,
        /// The most positions the cache holds.
        capacity: usize,
    },
    /// A cache of zero positions was asked for.
    #[error("a KV cache needs a context of at least one position")]
    EmptyContext,
    /// The cache would not fit in memory (its size overflows `usize`).
    #[error("a KV cache of {layers} layers × {context} positions × {kv_dim} values is too large")]
    TooLarge {
        /// Layers asked for.
        layers: usize,
        /// Positions asked for.
        context: usize,
        /// Values per position and layer.
        kv_dim: usize,
    },
}

/// Keys and values of every layer for the positions a session has processed so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer, `[capacity, kv_dim]` keys.
    k: Vec<Vec<f32>>,
    /// Per layer, `[capacity, kv_dim]` values.
    v: Vec<Vec<f32>>,
    kv_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `kv_dim` values per position, holding at most
    /// `context` positions.
    ///
    /// The memory is reserved zeroed; on most systems untouched pages cost nothing until used.
    /// Models offer a checked constructor that sizes it for themselves
    /// ([`crate::models::llama::Llama::new_cache`]).
    pub fn new(n_layers: usize, kv_dim: usize, context: usize) -> Result<Self, KvError> {
        if context == 0 {
            return Err(KvError::EmptyContext);
        }
        let too_large = KvError::TooLarge { layers: n_layers, context, kv_dim };
        let per_layer = context.checked_mul(kv_dim).ok_or(too_large.clone())?;
        // Both K and V, in bytes, must be addressable.
        per_layer
            .checked_mul(n_layers)
            .and_then(|n| n.checked_mul(2 * std::mem::size_of::<f32>()))
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .ok_or(too_large)?;
        Ok(Self {
            k: (0..n_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..n_layers).map(|_| vec![0.0; per_layer]).collect(),
            kv_dim,
            capacity: context,
            len: 0,
        })
    }

    /// Positions processed so far (the position the next token will take).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position has been processed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.k.len()
    }

    /// Values per position and layer (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Forgets every position; the memory is kept for the next conversation.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the first `n` positions and forgets the rest (for example to rewind a turn).
    /// Does nothing when `n >= len()`.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Checks that `adding` more positions fit.
    pub fn check_room(&self, adding: usize) -> Result<(), KvError> {
        if adding > self.remaining() {
            return Err(KvError::ContextFull { len: self.len, adding, capacity: self.capacity });
        }
        Ok(())
    }

    /// Keys of `layer` for the positions in use, `[len, kv_dim]` row-major, or `None` when
    /// there is no such layer.
    pub fn keys(&self, layer: usize) -> Option<&[f32]> {
        self.k.get(layer).map(|k| &k[..self.len * self.kv_dim])
    }

    /// Values of `layer` for the positions in use, `[len, kv_dim]` row-major, or `None` when
    /// there is no such layer.
    pub fn values(&self, layer: usize) -> Option<&[f32]> {
        self.v.get(layer).map(|v| &v[..self.len * self.kv_dim])
    }

    /// The whole K and V storage of `layer` (`[capacity, kv_dim]` each), for a forward pass
    /// that writes positions `len()..` and reads `..len() + n`. Panics if `layer` is out of
    /// range; models check the cache's shape first.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.k[layer], &mut self.v[layer])
    }

    /// Marks `n` more positions as in use once every layer has written them.
    pub(crate) fn advance(&mut self, n: usize) -> Result<(), KvError> {
        self.check_room(n)?;
        self.len += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_is_an_error() {
        let mut c = KvCache::new(2, 4, 3).unwrap();
        c.advance(2).unwrap();
        assert_eq!(c.check_room(2), Err(KvError::ContextFull { len: 2, adding: 2, capacity: 3 }));
        c.advance(1).unwrap();
        assert!(c.advance(1).is_err());
        c.truncate(1);
        assert_eq!(c.len(), 1);
        assert_eq!(c.keys(0).unwrap().len(), 4);
        assert!(c.keys(2).is_none());
        c.clear();
        assert!(c.is_empty());
        assert_eq!(KvCache::new(1, 1, 0).unwrap_err(), KvError::EmptyContext);
        assert!(matches!(KvCache::new(1 << 20, 1 << 20, 1 << 30), Err(KvError::TooLarge { .. })));
    }
}
