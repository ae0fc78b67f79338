//! The CPU backend: the reference. Weights are f32 in host memory, each session's KV cache
//! is a contiguous [`KvCache`], and every operation is a kernel of [`crate::cpu`], spread
//! over the rayon thread pool. A batch's matrix products read each weight once for every
//! sequence's rows; attention runs per sequence, over its own cache.

use super::{Backend, Body, Heads, KvStore, Ops, Output, Seq, Want};
use crate::cpu::{self as k, AttentionShape, RopeStyle};
use crate::kv::KvCache;
use crate::models::EngineError;

/// The CPU backend (stateless: the thread pool is rayon's).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// An activation: `data.len() / width` rows of `width` values.
#[derive(Debug, Clone)]
pub struct CpuAct {
    data: Vec<f32>,
    width: usize,
}

/// One sequence of a batch: its rows and its first position.
#[derive(Debug, Clone, Copy)]
struct Segment {
    row0: usize,
    n: usize,
    pos0: usize,
}

/// One batch's operations on the CPU.
#[derive(Debug)]
pub struct CpuOps<'a> {
    tokens: Vec<u32>,
    segs: Vec<Segment>,
    caches: Vec<&'a mut KvCache>,
}

impl CpuOps<'_> {
    /// The rows of sequence `s` in an activation of `width` values per row.
    fn rows(&self, s: usize, width: usize) -> std::ops::Range<usize> {
        let g = self.segs[s];
        g.row0 * width..(g.row0 + g.n) * width
    }
}

impl KvStore for KvCache {
    fn len(&self) -> usize {
        KvCache::len(self)
    }
    fn capacity(&self) -> usize {
        KvCache::capacity(self)
    }
    fn n_layers(&self) -> usize {
        KvCache::n_layers(self)
    }
    fn kv_dim(&self) -> usize {
        KvCache::kv_dim(self)
    }
    fn truncate(&mut self, n: usize) {
        KvCache::truncate(self, n)
    }
}

impl Ops for CpuOps<'_> {
    type Weight = Vec<f32>;
    type Act = CpuAct;
    type Cache = KvCache;

    fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    fn n_seqs(&self) -> usize {
        self.segs.len()
    }

    fn act(&mut self, rows: usize, width: usize) -> CpuAct {
        CpuAct { data: vec![0.0; rows * width], width }
    }

    fn embed(&mut self, out: &mut CpuAct, table: &Vec<f32>) {
        let w = out.width;
        for (row, &t) in out.data.chunks_mut(w).zip(&self.tokens) {
            row.copy_from_slice(&table[t as usize * w..][..w]);
        }
    }

    fn rmsnorm(&mut self, out: &mut CpuAct, x: &CpuAct, w: &Vec<f32>, eps: f32) {
        k::rmsnorm(&mut out.data, &x.data, w, eps);
    }

    fn matmul(&mut self, out: &mut CpuAct, x: &CpuAct, w: &Vec<f32>, accumulate: bool) {
        let m = x.data.len() / x.width.max(1);
        k::matmul_t(&mut out.data, &x.data, w, m, x.width, out.width, accumulate);
    }

    fn matmul_swiglu(&mut self, out: &mut CpuAct, x: &CpuAct, gate: &Vec<f32>, up: &Vec<f32>) {
        let mut u = self.act(out.data.len() / out.width.max(1), out.width);
        self.matmul(out, x, gate, false);
        self.matmul(&mut u, x, up, false);
        k::swiglu(&mut out.data, &u.data);
    }

    fn add_bias(&mut self, x: &mut CpuAct, bias: &Vec<f32>) {
        k::add_bias(&mut x.data, bias);
    }

    fn rope(&mut self, x: &mut CpuAct, n_heads: usize, head_dim: usize, inv_freq: &Vec<f32>, style: RopeStyle) {
        for s in 0..self.segs.len() {
            let rows = self.rows(s, n_heads * head_dim);
            k::rope(&mut x.data[rows], n_heads, head_dim, self.segs[s].pos0, inv_freq, style);
        }
    }

    fn attention(&mut self, out: &mut CpuAct, q: &CpuAct, key: &CpuAct, value: &CpuAct, layer: usize, heads: Heads) {
        let q_dim = heads.n_heads * heads.head_dim;
        for s in 0..self.segs.len() {
            let Segment { n, pos0, .. } = self.segs[s];
            let kv_dim = self.caches[s].kv_dim();
            let (rows, q_rows) = (self.rows(s, kv_dim), self.rows(s, q_dim));
            let cache = &mut *self.caches[s];
            let (k_cache, v_cache) = cache.layer_mut(layer);
            let new = pos0 * kv_dim..(pos0 + n) * kv_dim;
            k_cache[new.clone()].copy_from_slice(&key.data[rows.clone()]);
            v_cache[new].copy_from_slice(&value.data[rows]);
            let shape = AttentionShape {
                n_tokens: n,
                pos0,
                n_heads: heads.n_heads,
                n_kv_heads: heads.n_kv_heads,
                head_dim: heads.head_dim,
            };
            k::attention(&mut out.data[q_rows.clone()], &q.data[q_rows], k_cache, v_cache, shape);
        }
    }

    fn last_rows(&mut self, x: &CpuAct) -> CpuAct {
        let w = x.width;
        let mut data = Vec::with_capacity(self.segs.len() * w);
        for g in &self.segs {
            data.extend_from_slice(&x.data[(g.row0 + g.n - 1) * w..][..w]);
        }
        CpuAct { data, width: w }
    }
}

impl Backend for Cpu {
    type Weight = Vec<f32>;
    type Act = CpuAct;
    type Cache = KvCache;
    type Ops<'a> = CpuOps<'a>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matrix(&self, data: Vec<f32>, _rows: usize, _cols: usize) -> Result<Vec<f32>, EngineError> {
        Ok(data)
    }

    fn vector(&self, data: Vec<f32>) -> Result<Vec<f32>, EngineError> {
        Ok(data)
    }

    fn new_cache(&self, n_layers: usize, kv_dim: usize, context: usize) -> Result<KvCache, EngineError> {
        Ok(KvCache::new(n_layers, kv_dim, context)?)
    }

    fn max_chunk(&self) -> usize {
        usize::MAX
    }

    fn export_cache(&self, cache: &KvCache) -> Result<crate::kv::KvSnapshot, EngineError> {
        Ok(cache.export())
    }

    fn import_cache(
        &self,
        snap: &crate::kv::KvSnapshot,
        n_layers: usize,
        kv_dim: usize,
        context: usize,
    ) -> Result<KvCache, EngineError> {
        Ok(KvCache::import(snap, n_layers, kv_dim, context)?)
    }

    fn run(&self, seqs: &mut [Seq<'_, KvCache>], body: &mut Body<'_, Cpu>) -> Result<Vec<Output>, EngineError> {
        let mut tokens = Vec::with_capacity(seqs.iter().map(|s| s.tokens.len()).sum());
        let mut segs = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            segs.push(Segment { row0: tokens.len(), n: s.tokens.len(), pos0: s.cache.len() });
            tokens.extend_from_slice(s.tokens);
        }
        let caches = seqs.iter_mut().map(|s| &mut *s.cache).collect();
        let mut ops = CpuOps { tokens, segs, caches };
        let logits = body(&mut ops)?;
        let vocab = logits.width;
        let mut out = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter_mut().enumerate() {
            s.cache.advance(s.tokens.len())?;
            let row = &logits.data[i * vocab..][..vocab];
            out.push(match s.want {
                Want::Nothing => Output::Nothing,
                Want::Logits | Want::Hidden => Output::Logits(row.to_vec()),
                Want::Token { sampler, history, step } => {
                    Output::Token(sampler.sample(row, history, step).ok_or(EngineError::EmptyInput)?)
                }
            });
        }
        Ok(out)
    }
}
