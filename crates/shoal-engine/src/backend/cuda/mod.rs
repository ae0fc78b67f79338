//! The CUDA backend: bf16 weights in device memory, KV caches in a pool of fixed-size
//! blocks shared by every session of a model, cuBLAS for prompts, fused kernels and a
//! recorded CUDA graph for one-token steps, and greedy sampling on the GPU.
//!
//! One [`Cuda`] is made per loaded model ([`Cuda::open`]); the model's sessions share it, and
//! its batcher (`crate::batch`) runs the sessions ready at once in one pass. Passes are
//! serialised on one stream (a lock), so callers on many threads are safe. Every model (and
//! the compute ABI's backend) on one GPU shares the process's [`shoal_cuda::Device`]: its
//! context, the loaded kernels, the pinned buffers kept for parked caches, and the KV budget.
//!
//! - **Weights**: linear weights and the embedding table are bf16 (converted once at load),
//!   norm weights, biases and RoPE frequencies f32; activations are f32.
//! - **Passes**: a pass is a batch of sequences (decode tokens and prompt chunks of several
//!   sessions, at most [`MAX_CHUNK`] tokens and [`MAX_SEQS`] sequences); every token's id,
//!   position and block table come from a parameter block uploaded per pass.
//! - **Many rows** (prompts, batches): activations are rounded to bf16 and multiplied with
//!   `cublasGemmEx` (bf16 inputs, f32 accumulation and output). Passes with prompt chunks
//!   attend per tile of a sequence's tokens, flash-attention style on tensor cores (bf16
//!   `mma.sync`, keys and values loaded once per tile into shared memory; compute capability
//!   8.0+, heads of 64 or 128; `SHOAL_CUDA_MMA_ATTENTION=0` uses CUDA cores instead).
//! - **One token**: matrix–vector kernels read each weight once with 16-byte loads (the
//!   SwiGLU gate and up projections fused in one kernel). A pass of one token per sequence
//!   (~10 launches per layer) is recorded once per bucket of sequences as a CUDA graph and
//!   replayed (`SHOAL_CUDA_GRAPHS=0` turns that off).
//! - **KV cache**: bf16 (portable snapshots stay f32), in blocks of 16 positions × every
//!   layer, taken from the model's pool (lowest blocks first) and given back when a session
//!   is truncated or dropped. The pool is an address range reserved at the first session for
//!   the most the model may hold (`open_with_pool`'s cap, or the device's whole KV budget);
//!   physical memory is mapped into it in 64 MiB chunks as sessions need blocks, charged to
//!   the device's KV budget (`SHOAL_KV_POOL_MB`, default half the free memory up to 8 GiB,
//!   shared by every model on the GPU), and the top chunks are unmapped and given back to
//!   the budget when a dropped session leaves them free. Block 0 is the sink. Attention reads each key and value
//!   row once per step for all the query heads that share it, split over positions across
//!   the GPU and merged with an online softmax.
//! - **Sampling**: the repetition penalty and the greedy choice run on the GPU and only the
//!   token (4 bytes) comes back. Stochastic sampling (temperature, top-k up to 1024, top-p)
//!   has a GPU kernel that follows the CPU sampler's exact procedure (radix top-k select,
//!   sort, softmax in f64, top-p, the same seeded draw), checked against the CPU sampler in
//!   `tests/cuda.rs`, so only the token comes back. `SHOAL_CUDA_GPU_SAMPLING=0` (or
//!   [`Cuda::set_gpu_sampling`]) turns it off: the logits are then copied back and
//!   [`crate::sampler::Sampler`] runs on the host, as it does for top-k above 1024 or none.

use std::collections::BTreeSet;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use shoal_cuda::sys::{self, blas};
use shoal_cuda::{CudaError, Device, DeviceBuffer, Graph, GrowableBuffer, Module, PinnedBuffer, Stream};

use super::{Backend, Body, Heads, KvStore, MAX_SEQS, Ops, Output, Seq, Want};
use crate::cpu::RopeStyle;
use crate::models::EngineError;

/// The kernels' CUDA C++ source.
pub const KERNELS_SOURCE: &str = include_str!("kernels.cu");
/// Most tokens per forward chunk (bounds the scratch memory of a prompt).
pub const MAX_CHUNK: usize = 512;
/// Positions per KV block (the kernels' `KV_BLOCK`).
pub const KV_BLOCK: usize = 16;
/// Bytes per cached key or value: bf16, as the weights (half the bytes of f32 to read per
/// step, to hold in the pool and to move when parked).
pub const KV_BYTES: usize = 2;

fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

fn f32_to_bf16(f: f32) -> u16 {
    half::bf16::from_f32(f).to_bits()
}
/// Offsets (in `int`s) in the pass parameters (the kernels' `TOK`, `POS`, `TAB`, `LAST`):
/// token ids, positions, block-table offsets (each [`MAX_CHUNK`]), the row of each sequence's
/// last token, the token chosen for each sequence ([`MAX_SEQS`] each), then the block tables.
const TOK: usize = 4;
const POS: usize = TOK + MAX_CHUNK;
const TAB: usize = POS + MAX_CHUNK;
const LAST: usize = TAB + MAX_CHUNK;
const OUTW: usize = LAST + MAX_SEQS;
/// The tiles of a pass with prompt chunks (the kernels' `TILES`): first row | count << 16.
const TILE: usize = OUTW + MAX_SEQS;
const TABLES: usize = TILE + MAX_CHUNK;
/// Passes of a bucket padded to a larger recorded one before the bucket gets its own graph.
const PADDED_BEFORE_RECORDING: u64 = 64;
/// Recorded passes kept (one per number of sequences of a pass of one token each).
const MAX_GRAPHS: usize = 64;
/// Threads of the attention kernel (`ATT_WARPS * 32`).
const ATT_THREADS: u32 = 128;
/// The largest top-k sampled on the GPU (the kernel's `SAMPLE_MAX`); larger (or 0, all)
/// go to the host sampler.
const SAMPLE_MAX_K: usize = 1024;

fn cu(r: sys::CUresult, what: &str) -> Result<(), EngineError> {
    Ok(shoal_cuda::check(r, what)?)
}

/// A device layer error as the engine's (the one place they are mapped; a spent KV budget is
/// turned into [`EngineError::KvPoolFull`] where blocks are taken).
impl From<CudaError> for EngineError {
    fn from(e: CudaError) -> EngineError {
        fail(e.to_string())
    }
}

fn fail(message: String) -> EngineError {
    EngineError::Backend { backend: "cuda", message }
}

/// The model's state on the device, shared by the backend, its weights and its caches.
struct Shared {
    /// The state used under the lock: stream, kernels, scratch, recorded passes (first, so
    /// that its stream is synchronised before the pool below is freed).
    inner: Mutex<Inner>,
    device: Arc<Device>,
    pool: Mutex<Option<Pool>>,
}

/// The most bytes of one KV copy through pageable host memory (the staging buffer's size).
const STAGING: usize = 16 << 20;

/// Physical memory is added to (and taken from) a KV pool in chunks of about this many bytes.
const POOL_CHUNK: usize = 64 << 20;

/// A model's KV blocks: an address range reserved for the most blocks the model may hold
/// (its `pool_bytes`, or the device's whole KV budget), mapped chunk by chunk as caches need
/// blocks and charged to the device's KV budget, so that every model on the GPU draws on one
/// budget. The range never moves: kernels and recorded graphs address block `b` at
/// `ptr + b × block_bytes`.
struct Pool {
    mem: GrowableBuffer,
    n_layers: usize,
    kv_dim: usize,
    /// Mapped blocks no cache holds; handed out lowest first. Block 0, the sink (written by
    /// the padding rows of a pass and read by no one), is never in it.
    free: BTreeSet<u32>,
}

impl Pool {
    /// Blocks caches may take now: the free ones, and those the device's budget could still
    /// map within the pool's range.
    fn available(&self, device: &Device) -> usize {
        let plan = self.mem.plan();
        let mapped = self.mem.mapped_chunks();
        let room = device.kv_budget().map_or(0, |b| b.available() / plan.chunk_bytes);
        let more = (plan.max_chunks - mapped).min(room);
        self.free.len() + plan.units_in(mapped + more) - self.mem.mapped_units()
    }

    /// Maps chunks until `need` blocks are free (new blocks join the free list).
    fn grow(&mut self, device: &Device, need: usize) -> Result<(), EngineError> {
        let have = self.mem.mapped_units();
        let full = |pool: &Pool, budget| EngineError::KvPoolFull {
            backend: "cuda",
            needed: need,
            free: pool.available(device),
            device_budget: budget,
        };
        let Some(chunks) = self.mem.plan().chunks_for(have + (need - self.free.len())) else {
            return Err(full(self, None));
        };
        match self.mem.grow_to(chunks) {
            Ok(()) => {}
            Err(CudaError::OverBudget { used, limit, .. }) => return Err(full(self, Some((used, limit)))),
            Err(e) => return Err(e.into()),
        }
        self.free.extend(have as u32..self.mem.mapped_units() as u32);
        Ok(())
    }

    /// Chunks to keep mapped: up to the highest block in use (the sink's at least).
    fn keep(&self) -> usize {
        self.mem.plan().chunks_to_keep(self.mem.mapped_units(), &self.free).max(1)
    }

    /// Unmaps the chunks above the highest block in use (never the sink's), giving their
    /// bytes back to the device's budget. `stream` is the model's (the only one that uses
    /// the pool), held under its lock.
    fn trim(&mut self, stream: &Stream) {
        let keep = self.keep();
        if keep < self.mem.mapped_chunks() && stream.synchronize().is_ok() {
            // SAFETY: only the model's stream uses the pool, and it is idle (synchronised
            // above, and held under the lock, so nothing is queued meanwhile); no cache holds
            // a block above `keep` chunks (they are all free), and they leave the free list.
            unsafe { self.mem.shrink_to(keep) };
            let mapped = self.mem.mapped_units() as u32;
            self.free.retain(|&b| b < mapped);
        }
    }
}

impl Shared {
    fn current(&self) -> Result<(), EngineError> {
        Ok(self.device.bind()?)
    }

    fn give_back(&self, blocks: &mut Vec<u32>, keep: usize) {
        if blocks.len() <= keep {
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pool.as_mut() {
            p.free.extend(blocks.drain(keep..));
        }
    }

    /// Gives the pool's unused top chunks back to the device's budget.
    fn trim(&self) {
        {
            let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if pool.as_ref().is_none_or(|p| p.keep() >= p.mem.mapped_chunks()) {
                // Nothing to give back: no need to wait for the model's lock (a pass).
                return;
            }
        }
        // The model's lock first, then the pool's (no path takes them the other way round).
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = self.pool.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            p.trim(&inner.stream);
        }
    }
}

/// Device memory, and its address and size as the launch code reads them.
struct DevBuf {
    ptr: sys::CUdeviceptr,
    len: usize,
    _mem: DeviceBuffer,
}

impl DevBuf {
    fn new(shared: &Arc<Shared>, len: usize) -> Result<DevBuf, EngineError> {
        let mem = DeviceBuffer::new(&shared.device, len)?;
        Ok(DevBuf { ptr: mem.ptr(), len, _mem: mem })
    }
}

/// A weight in device memory.
pub struct CudaWeight {
    buf: DevBuf,
    rows: usize,
    cols: usize,
}

impl CudaWeight {
    /// Bytes of device memory it takes.
    pub fn bytes(&self) -> usize {
        self.buf.len
    }
}

/// An activation in the backend's scratch memory: `rows × width` f32.
#[derive(Debug, Clone, Copy)]
pub struct CudaAct {
    ptr: sys::CUdeviceptr,
    rows: usize,
    width: usize,
}

/// A session's KV cache: its blocks in the model's pool.
pub struct CudaCache {
    shared: Arc<Shared>,
    blocks: Vec<u32>,
    len: usize,
    capacity: usize,
    n_layers: usize,
    kv_dim: usize,
}

impl Drop for CudaCache {
    fn drop(&mut self) {
        self.shared.give_back(&mut self.blocks, 0);
        self.shared.trim();
    }
}

impl KvStore for CudaCache {
    fn len(&self) -> usize {
        self.len
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn n_layers(&self) -> usize {
        self.n_layers
    }
    fn kv_dim(&self) -> usize {
        self.kv_dim
    }
    fn truncate(&mut self, n: usize) {
        if n < self.len {
            self.len = n;
            let keep = n.div_ceil(KV_BLOCK);
            if keep < self.blocks.len() {
                self.shared.give_back(&mut self.blocks, keep);
            }
        }
    }
}

impl CudaCache {
    /// Blocks this cache holds.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }
}

struct Funcs {
    embed: sys::CUfunction,
    rmsnorm: sys::CUfunction,
    gemv: sys::CUfunction,
    gemv_swiglu: sys::CUfunction,
    gemv3: sys::CUfunction,
    rope_qk: sys::CUfunction,
    to_bf16: sys::CUfunction,
    swiglu: sys::CUfunction,
    add_bias: sys::CUfunction,
    rope: sys::CUfunction,
    kv_store: sys::CUfunction,
    attention: sys::CUfunction,
    attention_merge: sys::CUfunction,
    attention_tiled: sys::CUfunction,
    /// Decode attention by chunks of 32 positions, for head sizes 64 and 128.
    attention_d64: sys::CUfunction,
    attention_d128: sys::CUfunction,
    /// Prompt attention on tensor cores (sm_80+), for head sizes 64 and 128.
    attention_mma64: sys::CUfunction,
    attention_mma128: sys::CUfunction,
    gather_rows: sys::CUfunction,
    penalize: sys::CUfunction,
    argmax: sys::CUfunction,
    sample: sys::CUfunction,
}

/// State used under the lock.
struct Inner {
    /// The model's stream and cuBLAS handle (first, so that it is synchronised before the
    /// buffers below are freed).
    stream: Stream,
    /// The kernels' module (shared with every model on the device), which `f` points into.
    _module: Arc<Module>,
    f: Funcs,
    /// Scratch chunks; a run takes activations from them in order (so a replayed graph
    /// finds its buffers where it recorded them). Chunks are added, never freed.
    arena: Vec<DevBuf>,
    /// Step parameters and block table (device) and their host mirror.
    params: Option<(DevBuf, PinnedBuffer)>,
    /// Penalised token ids (device), grown on demand.
    ids: Option<DevBuf>,
    /// Logits / token coming back.
    host_out: Option<PinnedBuffer>,
    /// Recorded passes of one token per sequence, by number of sequences, and their logits.
    graphs: std::collections::HashMap<usize, (Graph, CudaAct)>,
    /// Such passes run so far, by number of sequences (the first is run eagerly, to size the
    /// scratch; the second is recorded).
    seen: std::collections::HashMap<usize, u64>,
    use_graphs: bool,
    /// Tiled attention for passes with prompt chunks (on unless
    /// `SHOAL_CUDA_TILED_ATTENTION=0`).
    tiled: bool,
    /// Prompt attention on tensor cores (compute capability 8.0 or later, unless
    /// `SHOAL_CUDA_MMA_ATTENTION=0`).
    mma: bool,
    /// Stochastic sampling on the GPU (on unless `SHOAL_CUDA_GPU_SAMPLING=0`; greedy always is).
    gpu_sampling: bool,
    sms: u32,
}

// SAFETY: the kernel handles point into a loaded module that `Inner` keeps alive and that
// never changes; launching them from any thread (with the context current) is allowed.
unsafe impl Send for Funcs {}

/// The CUDA backend of one model.
pub struct Cuda {
    shared: Arc<Shared>,
    name: String,
    pool_bytes: Option<usize>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda").field("device", &self.name).finish_non_exhaustive()
    }
}

/// A kernel argument.
#[derive(Clone, Copy)]
enum A {
    P(u64),
    I(i32),
    F(f32),
}

impl Cuda {
    /// Whether a CUDA driver and cuBLAS can be loaded on this machine.
    pub fn available() -> bool {
        Device::available()
    }

    /// Opens GPU 0 (or `SHOAL_CUDA_DEVICE`) for one model, or says why it cannot. Its KV
    /// pool draws on the device's KV budget ([`Device::kv_budget`]: `SHOAL_KV_POOL_MB` MiB, or
    /// half the free memory up to 8 GiB), shared with every other model on the GPU.
    pub fn open() -> Result<Cuda, EngineError> {
        Self::open_with_pool(None)
    }

    /// Like [`Cuda::open`], with this model's KV pool capped at `pool_bytes` (rounded down to
    /// whole blocks, at least one) when given; it still draws on the device's budget.
    pub fn open_with_pool(pool_bytes: Option<usize>) -> Result<Cuda, EngineError> {
        if !Self::available() {
            return Err(fail("no NVIDIA driver (libcuda.so) and cuBLAS (libcublas.so.13) on this machine".into()));
        }
        let device = Device::open_default()?;
        let module = device.module("engine", KERNELS_SOURCE)?;
        let get = |n: &str| module.function(n);
        let f = Funcs {
            embed: get("shoal_embed")?,
            rmsnorm: get("shoal_rmsnorm")?,
            gemv: get("shoal_gemv")?,
            gemv_swiglu: get("shoal_gemv_swiglu")?,
            gemv3: get("shoal_gemv3")?,
            rope_qk: get("shoal_rope_qk")?,
            to_bf16: get("shoal_to_bf16")?,
            swiglu: get("shoal_swiglu")?,
            add_bias: get("shoal_add_bias")?,
            rope: get("shoal_rope")?,
            kv_store: get("shoal_kv_store")?,
            attention: get("shoal_attention")?,
            attention_merge: get("shoal_attention_merge")?,
            gather_rows: get("shoal_gather_rows")?,
            attention_tiled: get("shoal_attention_tiled")?,
            attention_d64: get("shoal_attention_d64")?,
            attention_d128: get("shoal_attention_d128")?,
            attention_mma64: get("shoal_attention_mma64")?,
            attention_mma128: get("shoal_attention_mma128")?,
            penalize: get("shoal_penalize")?,
            argmax: get("shoal_argmax")?,
            sample: get("shoal_sample")?,
        };
        let stream = device.stream()?;
        let use_graphs = std::env::var("SHOAL_CUDA_GRAPHS").map(|v| v != "0").unwrap_or(true);
        let inner = Inner {
            stream,
            _module: module,
            f,
            arena: Vec::new(),
            params: None,
            ids: None,
            host_out: None,
            graphs: Default::default(),
            seen: Default::default(),
            use_graphs,
            tiled: std::env::var("SHOAL_CUDA_TILED_ATTENTION").map_or(true, |v| v != "0"),
            gpu_sampling: std::env::var("SHOAL_CUDA_GPU_SAMPLING").map_or(true, |v| v != "0"),
            mma: device.attributes().compute_capability.0 >= 8
                && std::env::var("SHOAL_CUDA_MMA_ATTENTION").map_or(true, |v| v != "0"),
            sms: device.attributes().sms,
        };
        let name = device.attributes().name.clone();
        let shared = Arc::new(Shared { inner: Mutex::new(inner), device: device.clone(), pool: Mutex::new(None) });
        Ok(Cuda { shared, name, pool_bytes })
    }

    /// The device layer this model runs on (shared by every model and the compute backend
    /// on the same GPU in this process).
    pub fn device(&self) -> &Arc<Device> {
        &self.shared.device
    }

    /// Turns stochastic sampling on the GPU on or off (on by default: see the module
    /// docs); greedy choice always runs on the GPU.
    pub fn set_gpu_sampling(&self, on: bool) {
        self.lock().gpu_sampling = on;
    }

    /// The GPU's name.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn upload(&self, bytes: &[u8], rows: usize, cols: usize) -> Result<CudaWeight, EngineError> {
        let buf = DevBuf::new(&self.shared, bytes.len())?;
        cu(
            // SAFETY: `buf` holds `bytes.len()` bytes; a synchronous copy from pageable memory.
            unsafe { sys::cuMemcpyHtoD_v2(buf.ptr, bytes.as_ptr() as *const c_void, bytes.len()) },
            "cuMemcpyHtoD(weight)",
        )?;
        Ok(CudaWeight { buf, rows, cols })
    }

    /// Makes the KV pool for caches of this shape (once per model).
    fn ensure_pool(&self, n_layers: usize, kv_dim: usize) -> Result<(), EngineError> {
        let mut pool = self.shared.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pool.as_ref() {
            if (p.n_layers, p.kv_dim) != (n_layers, kv_dim) {
                return Err(fail(format!(
                    "this backend's KV pool holds {} layers × {} values, not {n_layers} × {kv_dim}",
                    p.n_layers, p.kv_dim
                )));
            }
            return Ok(());
        }
        let block_bytes = n_layers * 2 * KV_BLOCK * kv_dim * KV_BYTES;
        let device = &self.shared.device;
        let cap = match self.pool_bytes {
            Some(bytes) => bytes,
            None => device.kv_budget()?.limit(),
        };
        // The model's blocks, and the sink (block 0) below them.
        let blocks = (cap / block_bytes.max(1)).max(1) + 1;
        let mut mem = GrowableBuffer::new(device, block_bytes, blocks, POOL_CHUNK).map_err(|e| match e {
            CudaError::OverBudget { used, limit, .. } => {
                EngineError::KvPoolFull { backend: "cuda", needed: 1, free: 0, device_budget: Some((used, limit)) }
            }
            e => e.into(),
        })?;
        // The sink's chunk is always mapped.
        mem.grow_to(1).map_err(|e| match e {
            CudaError::OverBudget { used, limit, .. } => {
                EngineError::KvPoolFull { backend: "cuda", needed: 1, free: 0, device_budget: Some((used, limit)) }
            }
            e => e.into(),
        })?;
        let blocks = mem.plan().max_units;
        let free = (1..mem.mapped_units() as u32).collect();
        *pool = Some(Pool { mem, n_layers, kv_dim, free });
        drop(pool);
        // The pass parameters and block tables long enough for the whole pool (a pass's
        // caches are distinct, so their tables together list at most every block once).
        let ints = TABLES + blocks + 1;
        let params = (DevBuf::new(&self.shared, ints * 4)?, PinnedBuffer::new(device, ints * 4)?);
        self.lock().params = Some(params);
        Ok(())
    }

    /// Gives `cache` the blocks for `adding` more positions (mapping more of the pool when the
    /// free ones are too few); returns the pool's address, its layer count and its sink block
    /// (see [`Pool::free`]).
    fn take_blocks(&self, cache: &mut CudaCache, adding: usize) -> Result<(u64, usize, usize), EngineError> {
        if !Arc::ptr_eq(&cache.shared, &self.shared) {
            return Err(fail("this KV cache belongs to another model's backend".into()));
        }
        let mut pool = self.shared.pool.lock().unwrap_or_else(|e| e.into_inner());
        let p = pool.as_mut().ok_or_else(|| fail("no KV pool (make caches with new_cache)".into()))?;
        let need = (cache.len + adding).div_ceil(KV_BLOCK).saturating_sub(cache.blocks.len());
        if need > p.free.len() {
            p.grow(&self.shared.device, need)?;
        }
        // The lowest free blocks first: a cache's blocks ascend, so that its runs of
        // consecutive blocks are long (one DMA each when parked), and the pool's top stays
        // free to be given back.
        cache.blocks.extend((0..need).map_while(|_| p.free.pop_first()));
        Ok((p.mem.ptr(), p.n_layers, 0))
    }

    /// Calls `f(stream, device address, first block index in the cache, blocks)` for each
    /// run of the cache's blocks that are consecutive in the pool (a block holds every
    /// layer's K and V for [`KV_BLOCK`] positions, contiguous: `[layer][K|V][position][kv_dim]`),
    /// up to the blocks its length uses, each run at most `most_bytes`; runs are excluded
    /// meanwhile, and the stream is synchronised before it returns (`f` may queue copies on it).
    fn block_runs(
        &self,
        cache: &CudaCache,
        most_bytes: usize,
        mut f: impl FnMut(sys::CUstream, u64, usize, usize) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        if !Arc::ptr_eq(&cache.shared, &self.shared) {
            return Err(fail("this KV cache belongs to another model's backend".into()));
        }
        let pool_ptr = {
            let pool = self.shared.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.as_ref().ok_or_else(|| fail("no KV pool".into()))?.mem.ptr()
        };
        self.shared.current()?;
        let runs = self.lock();
        let block_bytes = (cache.n_layers * 2 * KV_BLOCK * cache.kv_dim * KV_BYTES) as u64;
        let used = &cache.blocks[..cache.len.div_ceil(KV_BLOCK).min(cache.blocks.len())];
        let most = (most_bytes as u64 / block_bytes).max(1) as usize;
        let mut i = 0;
        while i < used.len() {
            let mut n = 1;
            while n < most && i + n < used.len() && used[i + n] == used[i] + n as u32 {
                n += 1;
            }
            if let Err(e) = f(runs.stream.raw(), pool_ptr + u64::from(used[i]) * block_bytes, i, n) {
                // SAFETY: our stream; what was queued finishes before the error is returned.
                unsafe { sys::cuStreamSynchronize(runs.stream.raw()) };
                return Err(e);
            }
            i += n;
        }
        // SAFETY: waits for our own stream.
        cu(unsafe { sys::cuStreamSynchronize(runs.stream.raw()) }, "cuStreamSynchronize(KV runs)")
    }

    /// A cache of `context` positions holding `len`, its pool blocks written by
    /// `fill(stream, device address, first block, blocks)` for each run (see
    /// [`Cuda::block_runs`]).
    fn filled_cache(
        &self,
        (n_layers, kv_dim, context, len): (usize, usize, usize, usize),
        most_bytes: usize,
        fill: impl FnMut(sys::CUstream, u64, usize, usize) -> Result<(), EngineError>,
    ) -> Result<CudaCache, EngineError> {
        let mut cache = self.new_cache(n_layers, kv_dim, context)?;
        self.take_blocks(&mut cache, len)?;
        cache.len = len;
        self.block_runs(&cache, most_bytes, fill)?;
        Ok(cache)
    }

    /// Calls `f(rows in the block, layer, K or V, offset in a snapshot array, floats)` for
    /// each layer's K and V rows of the staged blocks (pool layout, the cache's blocks from
    /// `first` on) that hold positions of a cache of `len`; a snapshot array is
    /// `[layer][position][kv_dim]`.
    fn each_row<T>(
        staged: &mut [T],
        (n_layers, kv_dim, len): (usize, usize, usize),
        first: usize,
        mut f: impl FnMut(&mut [T], usize, usize),
    ) {
        let row = KV_BLOCK * kv_dim;
        for (j, block) in staged.chunks_exact_mut(n_layers * 2 * row).enumerate() {
            let p0 = (first + j) * KV_BLOCK;
            if p0 >= len {
                break;
            }
            let rows = (len - p0).min(KV_BLOCK) * kv_dim;
            for l in 0..n_layers {
                let at = (l * len + p0) * kv_dim;
                for which in 0..2 {
                    f(&mut block[(l * 2 + which) * row..][..rows], which, at);
                }
            }
        }
    }

    /// Positions the KV pool may hold in all (its cap: `pool_bytes`, or the device's whole
    /// KV budget, in blocks), and may take now (its free blocks, and those the device's
    /// budget could still map for it: other models on the GPU draw on the same budget).
    pub fn pool_positions(&self) -> (usize, usize) {
        let pool = self.shared.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.as_ref()
            .map_or((0, 0), |p| ((p.mem.plan().max_units - 1) * KV_BLOCK, p.available(&self.shared.device) * KV_BLOCK))
    }
}

/// A pinned buffer for staging runs of KV blocks (from the device's kept pinned buffers,
/// given back when dropped).
struct Staging {
    buf: PinnedBuffer,
}

impl Staging {
    /// Room for the largest run [`Cuda::block_runs`] makes with [`STAGING`] for `blocks`
    /// blocks of `block_bytes`.
    fn new(shared: &Shared, block_bytes: usize, blocks: usize) -> Result<Staging, EngineError> {
        let bytes = ((STAGING / block_bytes).max(1) * block_bytes).min(blocks * block_bytes).max(4);
        Ok(Staging { buf: PinnedBuffer::new(&shared.device, bytes)? })
    }

    /// The first `n` bf16 values of the buffer (as bits).
    fn values(&mut self, n: usize) -> &mut [u16] {
        let cap = self.buf.capacity();
        assert!(n * KV_BYTES <= cap, "a run of {n} values in a staging buffer of {cap} bytes");
        // SAFETY: the buffer holds `cap` ≥ `n * 2` bytes, page-aligned (so aligned for u16),
        // owned by this value alone; any bit pattern is a u16.
        unsafe { std::slice::from_raw_parts_mut(self.buf.ptr() as *mut u16, n) }
    }
}

/// A CUDA session's KV cache parked in pinned host memory, in the pool's block layout
/// (`[block][layer][K|V][position][kv_dim]`), so that it comes back by DMA alone.
pub struct PinnedKv {
    /// The pinned buffer (its capacity ≥ `bytes`: buffers are reused), given back to the
    /// device's kept buffers when dropped.
    buf: PinnedBuffer,
    bytes: usize,
    blocks: usize,
    n_layers: usize,
    kv_dim: usize,
    len: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PinnedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedKv").field("len", &self.len).field("bytes", &self.bytes).finish_non_exhaustive()
    }
}

impl PinnedKv {
    /// The image's values (bf16 bits), in the pool's block layout.
    fn values(&self) -> &[u16] {
        let n = self.blocks * self.n_layers * 2 * KV_BLOCK * self.kv_dim;
        // SAFETY: the buffer holds `bytes` = `n * 2` bytes written by `park`, aligned for u16
        // (page-aligned pinned memory); nothing writes it after `park`.
        unsafe { std::slice::from_raw_parts(self.buf.ptr() as *const u16, n) }
    }
}

impl crate::kv::NativeKv for PinnedKv {
    fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> usize {
        self.bytes
    }

    fn to_snapshot(&self) -> crate::kv::KvSnapshot {
        let (n_layers, kv_dim, len) = (self.n_layers, self.kv_dim, self.len);
        let (mut k, mut v) = (vec![0f32; n_layers * len * kv_dim], vec![0f32; n_layers * len * kv_dim]);
        let staged = self.values();
        let row = KV_BLOCK * kv_dim;
        let widen = |dst: &mut [f32], src: &[u16]| dst.iter_mut().zip(src).for_each(|(d, &b)| *d = bf16_to_f32(b));
        for (j, block) in staged.chunks_exact(n_layers * 2 * row).enumerate() {
            let p0 = j * KV_BLOCK;
            let rows = (len - p0).min(KV_BLOCK) * kv_dim;
            for l in 0..n_layers {
                let at = (l * len + p0) * kv_dim;
                widen(&mut k[at..at + rows], &block[l * 2 * row..][..rows]);
                widen(&mut v[at..at + rows], &block[(l * 2 + 1) * row..][..rows]);
            }
        }
        crate::kv::KvSnapshot { n_layers, kv_dim, len, k, v }
    }

    fn write_safetensors(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        use std::io::Write;
        let (n_layers, kv_dim, len) = (self.n_layers, self.kv_dim, self.len);
        // Rows of one block and layer are small: gathered into large writes.
        let mut w = std::io::BufWriter::with_capacity(4 << 20, w);
        crate::kv::KvSnapshot::write_header(&mut w, n_layers, len, kv_dim)?;
        let row = KV_BLOCK * kv_dim;
        let staged = self.values();
        let mut out = Vec::with_capacity(row);
        for which in 0..2 {
            for l in 0..n_layers {
                for (j, block) in staged.chunks_exact(n_layers * 2 * row).enumerate() {
                    let rows = (len - j * KV_BLOCK).min(KV_BLOCK) * kv_dim;
                    out.clear();
                    for &b in &block[(l * 2 + which) * row..][..rows] {
                        out.extend_from_slice(&bf16_to_f32(b).to_le_bytes());
                    }
                    w.write_all(&out)?;
                }
            }
        }
        w.flush()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// One chunk's operations on the GPU.
pub struct CudaOps<'a> {
    inner: &'a mut Inner,
    shared: &'a Arc<Shared>,
    n: usize,
    /// Bytes of scratch handed out so far in this run: (chunk, offset).
    at: (usize, usize),
    /// Sequences in the pass.
    seqs: usize,
    /// Each sequence's first row and rows (for the tiles of a pass with prompt chunks).
    segs: &'a [(usize, usize)],
    /// Tiles uploaded for this pass (on the first attention call), if tiled.
    tiles: Option<usize>,
    step_ptr: u64,
    table_ptr: u64,
    pool_ptr: u64,
    n_layers: usize,
    /// The first failure; later operations are skipped.
    err: Option<EngineError>,
}

impl CudaOps<'_> {
    fn scratch(&mut self, bytes: usize) -> u64 {
        let bytes = bytes.next_multiple_of(256).max(256);
        loop {
            let (c, off) = self.at;
            if let Some(chunk) = self.inner.arena.get(c) {
                if off + bytes <= chunk.len {
                    self.at.1 += bytes;
                    return chunk.ptr + off as u64;
                }
                self.at = (c + 1, 0);
                continue;
            }
            match DevBuf::new(self.shared, bytes.max(64 << 20)) {
                Ok(b) => self.inner.arena.push(b),
                Err(e) => {
                    self.err.get_or_insert(e);
                    return 0;
                }
            }
        }
    }

    fn launch(&mut self, f: sys::CUfunction, grid: (u32, u32, u32), block: u32, args: &[A]) {
        if self.err.is_some() {
            return;
        }
        let mut slots = [0u64; 16];
        for (s, a) in slots.iter_mut().zip(args) {
            *s = match *a {
                A::P(p) => p,
                A::I(i) => i as u32 as u64,
                A::F(x) => x.to_bits() as u64,
            };
        }
        let mut ptrs = [std::ptr::null_mut::<c_void>(); 16];
        for (p, s) in ptrs.iter_mut().zip(slots.iter_mut()) {
            *p = s as *mut u64 as *mut c_void;
        }
        // SAFETY: `args` match the kernel's parameters in order (4-byte values sit in the
        // low bytes of their little-endian slots); every pointer is device memory of the
        // sizes the kernel reads (checked by the model's shapes and the backend's
        // allocations).
        let r = unsafe {
            sys::cuLaunchKernel(
                f,
                grid.0,
                grid.1,
                grid.2,
                block,
                1,
                1,
                0,
                self.inner.stream.raw(),
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        if let Err(e) = cu(r, "cuLaunchKernel") {
            self.err = Some(e);
        }
    }

    /// `x` rounded to bf16 in scratch memory (the A operand of [`CudaOps::gemm_bf16`]).
    fn round_bf16(&mut self, x: &CudaAct) -> u64 {
        let count = x.rows * x.width;
        let xb = self.scratch(count * 2);
        let blocks = (count as u64).div_ceil(256).min(65535) as u32;
        self.launch(self.inner.f.to_bf16, (blocks, 1, 1), 256, &[A::P(xb), A::P(x.ptr), A::P(count as u64)]);
        xb
    }

    /// `out (+)= x · wᵀ` with cuBLAS (bf16 inputs, f32 out) for several rows.
    fn gemm(&mut self, out: &CudaAct, x: &CudaAct, w: &CudaWeight, accumulate: bool) {
        let xb = self.round_bf16(x);
        self.gemm_bf16(out, xb, x, w, accumulate);
    }

    /// [`CudaOps::gemm`] of `x` already rounded to bf16 at `xb`.
    fn gemm_bf16(&mut self, out: &CudaAct, xb: u64, x: &CudaAct, w: &CudaWeight, accumulate: bool) {
        if self.err.is_some() {
            return;
        }
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        // Row-major out[m, n] = x[m, k] · w[n, k]ᵀ is column-major outᵀ = w · xᵀ:
        // A = w seen as k × n (transposed), B = x seen as k × m.
        // SAFETY: w holds n × k bf16, xb m × k bf16, out m × n f32, all device memory.
        let st = unsafe {
            blas::cublasGemmEx(
                self.inner.stream.blas(),
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                w.rows as i32,
                x.rows as i32,
                w.cols as i32,
                &alpha as *const f32 as *const c_void,
                w.buf.ptr as *const c_void,
                blas::cudaDataType_t::CUDA_R_16BF,
                w.cols as i32,
                xb as *const c_void,
                blas::cudaDataType_t::CUDA_R_16BF,
                x.width as i32,
                &beta as *const f32 as *const c_void,
                out.ptr as *mut c_void,
                blas::cudaDataType_t::CUDA_R_32F,
                out.width as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if st != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            self.err = Some(fail(format!("cublasGemmEx({}×{}×{}): {st:?}", x.rows, w.rows, w.cols)));
        }
    }

    /// The tiles of this pass for `group` query heads per key/value head (each sequence's rows
    /// in runs of at most 32 / group, so a tile has at most 32 (token, head) pairs), written to
    /// the parameters on the device once per pass; returns how many.
    fn upload_tiles(&mut self, group: usize, rows: usize) -> usize {
        if let Some(n) = self.tiles {
            return n;
        }
        let per = (rows / group.max(1)).clamp(1, 64);
        let mut descs = Vec::new();
        for &(row0, count) in self.segs {
            for k in (0..count).step_by(per) {
                descs.push(((row0 + k) | ((per.min(count - k)) << 16)) as i32);
            }
        }
        let Some((_, mirror)) = self.inner.params.as_ref() else {
            self.err.get_or_insert(fail("no pass parameters".into()));
            return 0;
        };
        debug_assert!(descs.len() <= MAX_CHUNK);
        // SAFETY: the mirror holds TILE + MAX_CHUNK ints and there are at most as many tiles
        // as tokens (≤ MAX_CHUNK); nothing else writes this region during the pass, and the
        // pass ends synchronised before the next one rewrites it.
        let r = unsafe {
            let at = (mirror.ptr() as *mut i32).add(TILE);
            std::ptr::copy_nonoverlapping(descs.as_ptr(), at, descs.len());
            sys::cuMemcpyHtoDAsync_v2(
                self.step_ptr + (TILE * 4) as u64,
                at as *const c_void,
                descs.len() * 4,
                self.inner.stream.raw(),
            )
        };
        if let Err(e) = cu(r, "cuMemcpyHtoDAsync(tiles)") {
            self.err.get_or_insert(e);
        }
        self.tiles = Some(descs.len());
        descs.len()
    }

    /// Threads per output row of a matrix–vector product with rows of `k` values: about
    /// four 16-byte loads each, from one warp to the whole block of 256.
    fn gemv_shape(rows: usize, k: usize) -> ((u32, u32, u32), i32) {
        let tpr = (k / 8 / 4).next_power_of_two().clamp(32, 256);
        (((rows * tpr).div_ceil(256) as u32, 1, 1), tpr as i32)
    }
}

impl Ops for CudaOps<'_> {
    type Weight = CudaWeight;
    type Act = CudaAct;
    type Cache = CudaCache;

    fn n_tokens(&self) -> usize {
        self.n
    }

    fn n_seqs(&self) -> usize {
        self.seqs
    }

    fn act(&mut self, rows: usize, width: usize) -> CudaAct {
        CudaAct { ptr: self.scratch(rows * width * 4), rows, width }
    }

    fn embed(&mut self, out: &mut CudaAct, table: &CudaWeight) {
        let f = self.inner.f.embed;
        self.launch(
            f,
            (out.rows as u32, 1, 1),
            256,
            &[A::P(out.ptr), A::P(table.buf.ptr), A::P(self.step_ptr), A::I(out.width as i32)],
        );
    }

    fn rmsnorm(&mut self, out: &mut CudaAct, x: &CudaAct, w: &CudaWeight, eps: f32) {
        let f = self.inner.f.rmsnorm;
        self.launch(
            f,
            (x.rows as u32, 1, 1),
            512,
            &[A::P(out.ptr), A::P(x.ptr), A::P(w.buf.ptr), A::I(x.width as i32), A::F(eps)],
        );
    }

    fn matmul(&mut self, out: &mut CudaAct, x: &CudaAct, w: &CudaWeight, accumulate: bool) {
        if x.rows == 1 {
            let f = self.inner.f.gemv;
            let (grid, tpr) = Self::gemv_shape(w.rows, w.cols);
            self.launch(
                f,
                grid,
                256,
                &[
                    A::P(out.ptr),
                    A::P(x.ptr),
                    A::P(w.buf.ptr),
                    A::I(w.rows as i32),
                    A::I(w.cols as i32),
                    A::I(accumulate as i32),
                    A::I(tpr),
                ],
            );
        } else {
            self.gemm(out, x, w, accumulate);
        }
    }

    fn matmul_swiglu(&mut self, out: &mut CudaAct, x: &CudaAct, gate: &CudaWeight, up: &CudaWeight) {
        if x.rows == 1 {
            let f = self.inner.f.gemv_swiglu;
            let (grid, tpr) = Self::gemv_shape(gate.rows, gate.cols);
            self.launch(
                f,
                grid,
                256,
                &[
                    A::P(out.ptr),
                    A::P(x.ptr),
                    A::P(gate.buf.ptr),
                    A::P(up.buf.ptr),
                    A::I(gate.rows as i32),
                    A::I(gate.cols as i32),
                    A::I(tpr),
                ],
            );
        } else {
            let u = self.act(out.rows, out.width);
            let xb = self.round_bf16(x);
            self.gemm_bf16(out, xb, x, gate, false);
            self.gemm_bf16(&u, xb, x, up, false);
            let count = (out.rows * out.width) as u64;
            let f = self.inner.f.swiglu;
            self.launch(
                f,
                (count.div_ceil(256).min(65535) as u32, 1, 1),
                256,
                &[A::P(out.ptr), A::P(u.ptr), A::P(count)],
            );
        }
    }

    fn matmul_qkv(
        &mut self,
        q: &mut CudaAct,
        k: &mut CudaAct,
        v: &mut CudaAct,
        x: &CudaAct,
        wq: &CudaWeight,
        wk: &CudaWeight,
        wv: &CudaWeight,
    ) {
        if x.rows != 1 {
            let xb = self.round_bf16(x);
            self.gemm_bf16(q, xb, x, wq, false);
            self.gemm_bf16(k, xb, x, wk, false);
            self.gemm_bf16(v, xb, x, wv, false);
            return;
        }
        let f = self.inner.f.gemv3;
        let rows = wq.rows + wk.rows + wv.rows;
        let (grid, tpr) = Self::gemv_shape(rows, wq.cols);
        self.launch(
            f,
            grid,
            256,
            &[
                A::P(q.ptr),
                A::P(k.ptr),
                A::P(v.ptr),
                A::P(x.ptr),
                A::P(wq.buf.ptr),
                A::P(wk.buf.ptr),
                A::P(wv.buf.ptr),
                A::I(wq.rows as i32),
                A::I(wk.rows as i32),
                A::I(wv.rows as i32),
                A::I(wq.cols as i32),
                A::I(tpr),
            ],
        );
    }

    fn rope_qk(
        &mut self,
        q: &mut CudaAct,
        k: &mut CudaAct,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        inv_freq: &CudaWeight,
        style: RopeStyle,
    ) {
        let f = self.inner.f.rope_qk;
        self.launch(
            f,
            (q.rows as u32, 1, 1),
            256,
            &[
                A::P(q.ptr),
                A::P(k.ptr),
                A::P(inv_freq.buf.ptr),
                A::P(self.step_ptr),
                A::I(n_heads as i32),
                A::I(n_kv_heads as i32),
                A::I(head_dim as i32),
                A::I(inv_freq.rows as i32),
                A::I((style == RopeStyle::Neox) as i32),
            ],
        );
    }

    fn add_bias(&mut self, x: &mut CudaAct, bias: &CudaWeight) {
        let f = self.inner.f.add_bias;
        self.launch(f, (x.rows as u32, 1, 1), 256, &[A::P(x.ptr), A::P(bias.buf.ptr), A::I(x.width as i32)]);
    }

    fn rope(&mut self, x: &mut CudaAct, n_heads: usize, head_dim: usize, inv_freq: &CudaWeight, style: RopeStyle) {
        let f = self.inner.f.rope;
        let half = inv_freq.rows;
        self.launch(
            f,
            (x.rows as u32, 1, 1),
            256,
            &[
                A::P(x.ptr),
                A::P(inv_freq.buf.ptr),
                A::P(self.step_ptr),
                A::I(n_heads as i32),
                A::I(head_dim as i32),
                A::I(half as i32),
                A::I((style == RopeStyle::Neox) as i32),
            ],
        );
    }

    fn attention(&mut self, out: &mut CudaAct, q: &CudaAct, k: &CudaAct, v: &CudaAct, layer: usize, heads: Heads) {
        let Heads { n_heads, n_kv_heads, head_dim } = heads;
        if head_dim > 128 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 || n_heads / n_kv_heads > 8 {
            self.err.get_or_insert(fail(format!(
                "attention with {n_heads} query heads over {n_kv_heads} key/value heads of {head_dim} values is not \
                 supported by the CUDA kernels (at most 8 query heads per key/value head, head size at most 128); \
                 use the CPU backend"
            )));
            return;
        }
        let kv_dim = n_kv_heads * head_dim;
        let (nl, n) = (self.n_layers as i32, self.n);
        let f = self.inner.f.kv_store;
        self.launch(
            f,
            (n as u32, 1, 1),
            256,
            &[
                A::P(self.pool_ptr),
                A::P(k.ptr),
                A::P(v.ptr),
                A::P(self.step_ptr),
                A::P(self.table_ptr),
                A::I(layer as i32),
                A::I(nl),
                A::I(kv_dim as i32),
            ],
        );
        let scale = 1.0 / (head_dim as f32).sqrt();
        // Both kernels take their output first, then the same arguments.
        let (pool, step, table) = (self.pool_ptr, self.step_ptr, self.table_ptr);
        let args = |first: u64| {
            [
                A::P(first),
                A::P(q.ptr),
                A::P(pool),
                A::P(step),
                A::P(table),
                A::I(layer as i32),
                A::I(nl),
                A::I(n_heads as i32),
                A::I(n_kv_heads as i32),
                A::I(head_dim as i32),
                A::F(scale),
            ]
        };
        let group = n_heads / n_kv_heads;
        let mma = match head_dim {
            64 => Some(self.inner.f.attention_mma64),
            128 => Some(self.inner.f.attention_mma128),
            _ => None,
        }
        .filter(|_| self.inner.mma);
        if n > self.seqs && (self.inner.tiled || mma.is_some()) {
            // A tile's rows are (token, query head) pairs of one key/value head: 64 on tensor
            // cores, 32 otherwise.
            let (f, rows) = match mma {
                Some(f) => (f, 64),
                None => (self.inner.f.attention_tiled, 32),
            };
            let tiles = self.upload_tiles(group, rows);
            self.launch(f, (n_kv_heads as u32, tiles as u32, 1), ATT_THREADS, &args(out.ptr));
            return;
        }
        // Enough blocks to fill the GPU twice over, at most 32 splits of the positions.
        let per_split = (n_kv_heads * n).max(1);
        let splits = ((2 * self.inner.sms as usize).div_ceil(per_split)).clamp(1, 32);
        let part = self.scratch(n * n_heads * splits * (head_dim + 2) * 4);
        let f = match head_dim {
            64 => self.inner.f.attention_d64,
            128 => self.inner.f.attention_d128,
            _ => self.inner.f.attention,
        };
        self.launch(f, (n_kv_heads as u32, n as u32, splits as u32), ATT_THREADS, &args(part));
        let f = self.inner.f.attention_merge;
        self.launch(
            f,
            (n_heads as u32, n as u32, 1),
            head_dim.min(128) as u32,
            &[A::P(out.ptr), A::P(part), A::I(n_heads as i32), A::I(head_dim as i32), A::I(splits as i32)],
        );
    }

    fn last_rows(&mut self, x: &CudaAct) -> CudaAct {
        if self.seqs == 1 {
            return CudaAct { ptr: x.ptr + ((x.rows - 1) * x.width * 4) as u64, rows: 1, width: x.width };
        }
        let out = self.act(self.seqs, x.width);
        let f = self.inner.f.gather_rows;
        self.launch(
            f,
            (self.seqs as u32, 1, 1),
            256,
            &[A::P(out.ptr), A::P(x.ptr), A::P(self.step_ptr), A::I(x.width as i32)],
        );
        out
    }
}

impl Backend for Cuda {
    type Weight = CudaWeight;
    type Act = CudaAct;
    type Cache = CudaCache;
    type Ops<'a> = CudaOps<'a>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn matrix(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<CudaWeight, EngineError> {
        use rayon::prelude::*;
        debug_assert_eq!(data.len(), rows * cols);
        let bits: Vec<u16> = data.par_iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        drop(data);
        // SAFETY: u16 has no padding; the slice covers exactly `bits`.
        let bytes = unsafe { std::slice::from_raw_parts(bits.as_ptr() as *const u8, bits.len() * 2) };
        self.upload(bytes, rows, cols)
    }

    fn vector(&self, data: Vec<f32>) -> Result<CudaWeight, EngineError> {
        // SAFETY: f32 has no padding; the slice covers exactly `data`.
        let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, data.len() * 4) };
        self.upload(bytes, data.len(), 1)
    }

    fn new_cache(&self, n_layers: usize, kv_dim: usize, context: usize) -> Result<CudaCache, EngineError> {
        if context == 0 {
            return Err(crate::kv::KvError::EmptyContext.into());
        }
        self.ensure_pool(n_layers, kv_dim)?;
        Ok(CudaCache { shared: self.shared.clone(), blocks: Vec::new(), len: 0, capacity: context, n_layers, kv_dim })
    }

    fn max_chunk(&self) -> usize {
        MAX_CHUNK
    }

    fn max_seqs(&self) -> usize {
        MAX_SEQS
    }

    fn export_cache(&self, cache: &CudaCache) -> Result<crate::kv::KvSnapshot, EngineError> {
        let (n_layers, kv_dim, len) = (cache.n_layers, cache.kv_dim, cache.len);
        let (mut k, mut v) = (vec![0f32; n_layers * len * kv_dim], vec![0f32; n_layers * len * kv_dim]);
        let block = n_layers * 2 * KV_BLOCK * kv_dim;
        // Runs of at most 16 MiB through a pinned staging buffer (DMA at the link's speed),
        // rearranged from there into the portable layout.
        let mut stage = Staging::new(&self.shared, block * KV_BYTES, len.div_ceil(KV_BLOCK))?;
        self.block_runs(cache, STAGING, |_, dev, first, blocks| {
            let staged = stage.values(blocks * block);
            let dst = staged.as_mut_ptr() as *mut c_void;
            // SAFETY: `dev` starts `blocks` consecutive pool blocks, `staged` holds exactly
            // their values (pinned); runs are excluded by the lock `block_runs` holds.
            let r = unsafe { sys::cuMemcpyDtoH_v2(dst, dev, staged.len() * KV_BYTES) };
            cu(r, "cuMemcpyDtoH(KV blocks)")?;
            Self::each_row(staged, (n_layers, kv_dim, len), first, |b, which, at| {
                let dst = if which == 0 { &mut k } else { &mut v };
                dst[at..at + b.len()].iter_mut().zip(b.iter()).for_each(|(d, &x)| *d = bf16_to_f32(x));
            });
            Ok(())
        })?;
        Ok(crate::kv::KvSnapshot { n_layers, kv_dim, len, k, v })
    }

    fn import_cache(
        &self,
        snap: &crate::kv::KvSnapshot,
        n_layers: usize,
        kv_dim: usize,
        context: usize,
    ) -> Result<CudaCache, EngineError> {
        snap.check(n_layers, kv_dim, context)?;
        let len = snap.len;
        let block = n_layers * 2 * KV_BLOCK * kv_dim;
        // Rows past the length in the last block are copied as whatever the staging buffer
        // held (never read).
        let mut stage = Staging::new(&self.shared, block * KV_BYTES, len.div_ceil(KV_BLOCK))?;
        self.filled_cache((n_layers, kv_dim, context, len), STAGING, |_, dev, first, blocks| {
            let staged = stage.values(blocks * block);
            Self::each_row(staged, (n_layers, kv_dim, len), first, |b, which, at| {
                let src = if which == 0 { &snap.k } else { &snap.v };
                let n = b.len();
                b.iter_mut().zip(&src[at..at + n]).for_each(|(d, &x)| *d = f32_to_bf16(x));
            });
            // SAFETY: as in export_cache, the other way.
            cu(
                unsafe { sys::cuMemcpyHtoD_v2(dev, staged.as_ptr() as *const c_void, staged.len() * KV_BYTES) },
                "cuMemcpyHtoD(KV blocks)",
            )
        })
    }

    fn park(&self, cache: &CudaCache) -> Result<Option<Arc<dyn crate::kv::NativeKv>>, EngineError> {
        let block_bytes = cache.n_layers * 2 * KV_BLOCK * cache.kv_dim * KV_BYTES;
        let blocks = cache.len.div_ceil(KV_BLOCK).min(cache.blocks.len());
        let bytes = (blocks * block_bytes).max(1);
        let buf = PinnedBuffer::new(&self.shared.device, bytes)?;
        self.shared.current()?;
        let image = PinnedKv {
            buf,
            bytes,
            blocks,
            n_layers: cache.n_layers,
            kv_dim: cache.kv_dim,
            len: cache.len,
            shared: self.shared.clone(),
        };
        // Pinned memory: one DMA per run of consecutive blocks, whatever its size, all queued
        // at once (`block_runs` waits for them).
        let (t, mut runs) = (std::time::Instant::now(), 0);
        self.block_runs(cache, usize::MAX, |stream, dev, first, n| {
            let dst = (image.buf.ptr() as usize + first * block_bytes) as *mut c_void;
            runs += 1;
            // SAFETY: `dev` starts `n` pool blocks; `dst` has room for them (the image holds
            // every block the cache uses) and is pinned, and it outlives the copy
            // (`block_runs` synchronises the stream before returning); runs are excluded by
            // `block_runs`' lock.
            let r = unsafe { sys::cuMemcpyDtoHAsync_v2(dst, dev, n * block_bytes, stream) };
            cu(r, "cuMemcpyDtoHAsync(KV image)")
        })?;
        log::debug!("park: {bytes} bytes in {runs} runs, {:.3} ms", t.elapsed().as_secs_f64() * 1e3);
        Ok(Some(Arc::new(image)))
    }

    fn unpark(
        &self,
        image: &dyn crate::kv::NativeKv,
        n_layers: usize,
        kv_dim: usize,
        context: usize,
    ) -> Result<Option<CudaCache>, EngineError> {
        let Some(img) = image.as_any().downcast_ref::<PinnedKv>() else { return Ok(None) };
        if !Arc::ptr_eq(&img.shared, &self.shared) || (img.n_layers, img.kv_dim) != (n_layers, kv_dim) {
            return Ok(None);
        }
        if img.len > context {
            return Err(crate::kv::KvError::Mismatch {
                expected: format!("at most {context} positions"),
                found: format!("{} positions", img.len),
            }
            .into());
        }
        let block_bytes = n_layers * 2 * KV_BLOCK * kv_dim * KV_BYTES;
        let (t, mut runs) = (std::time::Instant::now(), 0);
        let cache = self.filled_cache((n_layers, kv_dim, context, img.len), usize::MAX, |stream, dev, first, n| {
            let src = (img.buf.ptr() as usize + first * block_bytes) as *const c_void;
            runs += 1;
            // SAFETY: as in `park`, the other way: `src` holds the image's blocks `first..`,
            // borrowed until `filled_cache` has synchronised the stream.
            let r = unsafe { sys::cuMemcpyHtoDAsync_v2(dev, src, n * block_bytes, stream) };
            cu(r, "cuMemcpyHtoDAsync(KV image)")
        })?;
        log::debug!("unpark: {} bytes in {runs} runs, {:.3} ms", img.bytes, t.elapsed().as_secs_f64() * 1e3);
        Ok(Some(cache))
    }

    fn reserve(&self, cache: &mut CudaCache, adding: usize) -> Result<(), EngineError> {
        self.take_blocks(cache, adding).map(drop)
    }

    fn run(&self, seqs: &mut [Seq<'_, CudaCache>], body: &mut Body<'_, Cuda>) -> Result<Vec<Output>, EngineError> {
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let n_seqs = seqs.len();
        if n_seqs == 0 || n_seqs > MAX_SEQS || n > MAX_CHUNK || seqs.iter().any(|s| s.tokens.is_empty()) {
            return Err(fail(format!(
                "a pass of {n_seqs} sequences and {n} tokens (1..={MAX_SEQS} sequences of at least one token, at \
                 most {MAX_CHUNK} tokens)"
            )));
        }
        let mut pool = (0, 0, 0);
        for s in seqs.iter_mut() {
            pool = self.take_blocks(s.cache, s.tokens.len())?;
        }
        let (pool_ptr, n_layers, sink) = pool;
        // A pass of one token per sequence is padded to a bucket of sequences, so that a few
        // recorded graphs serve every batch: padding rows read token 0 at position 0 of the
        // sink block and are dropped.
        let hidden = seqs.iter().any(|s| matches!(s.want, Want::Hidden));
        self.shared.current()?;
        let mut guard = self.lock();
        let inner = &mut *guard;
        let rows = if n == n_seqs && !hidden { inner.rows_for(n_seqs) } else { n_seqs };
        let stream = inner.stream.raw();
        let (step_ptr, table_ptr) = {
            let (dev, host) = inner.params.as_ref().ok_or_else(|| fail("no step parameters".into()))?;
            let room = host.len() / 4;
            let ints = host.ptr() as *mut i32;
            let mut table_len = 0;
            let mut t = 0;
            // SAFETY: the pinned mirror holds TABLES + pool blocks + 1 ints; tokens and rows
            // ≤ MAX_CHUNK and sequences ≤ MAX_SEQS (checked above, and buckets stay within
            // them), and the caches are distinct, so their tables together hold at most the
            // pool's blocks (checked again per write) and the sink's table one more; the
            // previous run ended synchronised, so no copy reads the mirror now.
            unsafe {
                *ints = rows.max(n) as i32;
                *ints.add(1) = rows as i32;
                for (i, s) in seqs.iter().enumerate() {
                    let blocks = &s.cache.blocks;
                    if TABLES + table_len + blocks.len() > room {
                        return Err(fail(format!(
                            "the block tables of a pass hold more than the pool's {} blocks",
                            room - TABLES
                        )));
                    }
                    for (j, &b) in blocks.iter().enumerate() {
                        *ints.add(TABLES + table_len + j) = b as i32;
                    }
                    for (j, &tok) in s.tokens.iter().enumerate() {
                        *ints.add(TOK + t) = tok as i32;
                        *ints.add(POS + t) = (s.cache.len + j) as i32;
                        *ints.add(TAB + t) = table_len as i32;
                        t += 1;
                    }
                    *ints.add(LAST + i) = (t - 1) as i32;
                    table_len += blocks.len();
                }
                if rows > n_seqs {
                    *ints.add(TABLES + table_len) = sink as i32;
                    for r in n_seqs..rows {
                        *ints.add(TOK + r) = 0;
                        *ints.add(POS + r) = 0;
                        *ints.add(TAB + r) = table_len as i32;
                        *ints.add(LAST + r) = r as i32;
                    }
                    table_len += 1;
                }
                cu(
                    sys::cuMemcpyHtoDAsync_v2(dev.ptr, ints as *const c_void, (TABLES + table_len) * 4, stream),
                    "cuMemcpyHtoDAsync(pass parameters)",
                )?;
            }
            (dev.ptr, dev.ptr + (TABLES * 4) as u64)
        };

        // Passes of one token per sequence are recorded, one graph per bucket of sequences
        // (a hidden-state body differs, and is not).
        let graphable = n == n_seqs && inner.use_graphs && !hidden;
        let (n, n_seqs) = (rows.max(n), rows);
        let ptrs = (step_ptr, table_ptr, pool_ptr, n_layers);
        let mut segs = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for s in seqs.iter() {
            segs.push((row, s.tokens.len()));
            row += s.tokens.len();
        }
        let recorded = if graphable { inner.graphs.get(&n_seqs).map(|(_, logits)| *logits) } else { None };
        let logits = match recorded {
            Some(logits) => {
                // The graph was recorded from this backend's kernels on buffers that are still
                // allocated (scratch chunks are never freed, the pool's range never moves) for
                // a pass of the same shape, and reads positions and tables from the
                // parameters just uploaded.
                inner.graphs[&n_seqs].0.launch(&inner.stream)?;
                logits
            }
            None => {
                let record =
                    graphable && inner.seen.get(&n_seqs).copied().unwrap_or(0) >= 1 && inner.graphs.len() < MAX_GRAPHS;
                match self.eager(inner, body, (n, n_seqs), &segs, ptrs, record) {
                    Ok(l) => l,
                    Err(e) if record => {
                        log::warn!("recording a CUDA graph of {n_seqs} sequences failed ({e}); running without graphs");
                        inner.use_graphs = false;
                        self.eager(inner, body, (n, n_seqs), &segs, ptrs, false)?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if graphable {
            *inner.seen.entry(n_seqs).or_default() += 1;
        }
        let wants: Vec<Want<'_>> = seqs.iter().map(|s| s.want).collect();
        let out = finish(inner, &self.shared, logits, &wants)?;
        for s in seqs.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        Ok(out)
    }
}

impl Cuda {
    /// Issues the body's kernels on the stream (recording them as the graph of `n_seqs` when
    /// `record`); returns the logits activation.
    fn eager(
        &self,
        inner: &mut Inner,
        body: &mut Body<'_, Cuda>,
        (n, n_seqs): (usize, usize),
        segs: &[(usize, usize)],
        (step_ptr, table_ptr, pool_ptr, n_layers): (u64, u64, u64, usize),
        record: bool,
    ) -> Result<CudaAct, EngineError> {
        if record {
            inner.stream.begin_capture()?;
        }
        let mut ops = CudaOps {
            inner,
            shared: &self.shared,
            n,
            at: (0, 0),
            seqs: n_seqs,
            segs,
            tiles: None,
            step_ptr,
            table_ptr,
            pool_ptr,
            n_layers,
            err: None,
        };
        let result = body(&mut ops);
        let err = ops.err.take();
        let inner = ops.inner;
        let result = match (result, err) {
            (Ok(a), None) => Ok(a),
            (Err(e), _) | (_, Some(e)) => Err(e),
        };
        if !record {
            return result;
        }
        // The capture ends on failure too, so the stream is usable again.
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                inner.stream.discard_capture();
                return Err(e);
            }
        };
        let graph = inner.stream.end_capture()?;
        graph.launch(&inner.stream)?;
        inner.graphs.insert(n_seqs, (graph, logits));
        Ok(logits)
    }
}

/// The number of rows a pass of `n` sequences of one token each is padded to.
impl Inner {
    /// The rows a pass of `n_seqs` one-token sequences is padded to: its bucket, or, when that
    /// bucket has no recorded graph yet, the smallest recorded one up to twice as large (a
    /// padded replay costs less than running the pass eagerly and recording another graph,
    /// which stalls every sequence of the pass for milliseconds). A bucket padded so
    /// [`PADDED_BEFORE_RECORDING`] times is then run and recorded as itself.
    fn rows_for(&mut self, n_seqs: usize) -> usize {
        let b = bucket(n_seqs);
        if !self.use_graphs || self.graphs.contains_key(&b) {
            return b;
        }
        let seen = self.seen.entry(b).or_default();
        if *seen >= PADDED_BEFORE_RECORDING {
            return b;
        }
        match self.graphs.keys().copied().filter(|&k| k > b && k <= 2 * b).min() {
            Some(k) => {
                *seen += 1;
                k
            }
            None => b,
        }
    }
}

fn bucket(n: usize) -> usize {
    const BUCKETS: [usize; 14] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256];
    BUCKETS.iter().copied().find(|&b| b >= n).unwrap_or(n).min(MAX_SEQS)
}

/// Hands back what each sequence's `want` asks for from the logits on the device (`[rows,
/// vocab]`, a row per sequence), and waits for the pass.
fn finish(
    inner: &mut Inner,
    shared: &Arc<Shared>,
    logits: CudaAct,
    wants: &[Want<'_>],
) -> Result<Vec<Output>, EngineError> {
    let stream = inner.stream.raw();
    let (vocab, rows) = (logits.width, wants.len());
    let on_gpu = |s: &crate::sampler::Sampler, gpu_sampling: bool| {
        s.is_greedy() || (gpu_sampling && (1..=SAMPLE_MAX_K).contains(&s.top_k))
    };
    let gpu = inner.gpu_sampling;
    let mut host_rows = false;
    let mut penalized = false;
    let mut greedy = false;
    // The repetition penalty of the rows sampled on the GPU, in one upload and one launch:
    // offsets[rows + 1], penalties[rows], then the ids.
    let mut buf: Vec<i32> = vec![0; 2 * rows + 1];
    for (i, w) in wants.iter().enumerate() {
        let mut penalty = 1.0f32;
        match w {
            Want::Nothing => {}
            Want::Logits | Want::Hidden => host_rows = true,
            Want::Token { sampler, history, .. } if on_gpu(sampler, gpu) => {
                greedy |= sampler.is_greedy();
                let p = sampler.repetition_penalty;
                if p.is_finite() && p > 0.0 && p != 1.0 && !history.is_empty() {
                    let at = buf.len();
                    buf.extend(history.iter().filter(|&&t| (t as usize) < vocab).map(|&t| t as i32));
                    buf[at..].sort_unstable();
                    let mut kept = at;
                    for j in at..buf.len() {
                        if j == at || buf[j] != buf[kept - 1] {
                            buf[kept] = buf[j];
                            kept += 1;
                        }
                    }
                    buf.truncate(kept);
                    penalty = p;
                    penalized = true;
                }
            }
            Want::Token { .. } => host_rows = true,
        }
        buf[rows + 1 + i] = penalty.to_bits() as i32;
        buf[i + 1] = (buf.len() - (2 * rows + 1)) as i32;
    }
    let word =
        inner.params.as_ref().map(|(d, _)| d.ptr + (OUTW * 4) as u64).ok_or_else(|| fail("no parameters".into()))?;
    if penalized {
        let most = (1..=rows).map(|i| buf[i] - buf[i - 1]).max().unwrap_or(0).max(1) as u32;
        if inner.ids.as_ref().is_none_or(|b| b.len < buf.len() * 4) {
            // The old buffer is idle: the previous run ended synchronised.
            inner.ids = Some(DevBuf::new(shared, (buf.len() * 4).max(4096))?);
        }
        let dev = inner.ids.as_ref().expect("just made").ptr;
        cu(
            // SAFETY: `dev` holds at least buf.len() ints; the copy is synchronous, so `buf`
            // may be dropped after it.
            unsafe { sys::cuMemcpyHtoD_v2(dev, buf.as_ptr() as *const c_void, buf.len() * 4) },
            "cuMemcpyHtoD(penalty ids)",
        )?;
        let mut a = [logits.ptr, dev, rows as u64, vocab as u64];
        launch_raw(inner.f.penalize, (most.div_ceil(256), rows as u32, 1), 256, stream, &mut a)?;
    }
    if greedy {
        let mut a = [word, logits.ptr, vocab as u64];
        launch_raw(inner.f.argmax, (rows as u32, 1, 1), 1024, stream, &mut a)?;
    }
    for (i, w) in wants.iter().enumerate() {
        if let Want::Token { sampler, step, .. } = w
            && on_gpu(sampler, gpu)
            && !sampler.is_greedy()
        {
            let mut a = [
                word + (i * 4) as u64,
                logits.ptr + (i * vocab * 4) as u64,
                vocab as u64,
                (1.0 / sampler.temperature).to_bits() as u64,
                sampler.top_k as u64,
                sampler.top_p.to_bits() as u64,
                sampler.draw(*step).to_bits(),
            ];
            launch_raw(inner.f.sample, (1, 1, 1), 1024, stream, &mut a)?;
        }
    }
    if host_rows && inner.host_out.as_ref().is_none_or(|h| h.len() < rows * vocab * 4) {
        inner.host_out = Some(PinnedBuffer::new(&shared.device, rows * vocab * 4)?);
    }
    let (_, mirror) = inner.params.as_ref().expect("checked above");
    // SAFETY: the mirror holds OUTW + MAX_SEQS ints ≥ OUTW + rows; the pinned logits buffer
    // (when used) holds rows × vocab floats, as does the logits activation; the stream is
    // synchronised before either is read.
    let (words, host_logits) = unsafe {
        let words = (mirror.ptr() as *mut i32).add(OUTW);
        cu(sys::cuMemcpyDtoHAsync_v2(words as *mut c_void, word, rows * 4, stream), "cuMemcpyDtoHAsync(tokens)")?;
        let host_logits = if host_rows {
            let h = inner.host_out.as_ref().expect("just made").ptr();
            cu(
                sys::cuMemcpyDtoHAsync_v2(h as *mut c_void, logits.ptr, rows * vocab * 4, stream),
                "cuMemcpyDtoHAsync(logits)",
            )?;
            Some(h as *const f32)
        } else {
            None
        };
        cu(sys::cuStreamSynchronize(stream), "cuStreamSynchronize")?;
        (
            std::slice::from_raw_parts(words as *const u32, rows).to_vec(),
            host_logits.map(|h| std::slice::from_raw_parts(h, rows * vocab)),
        )
    };
    let row = |i: usize| &host_logits.expect("copied for host rows")[i * vocab..][..vocab];
    wants
        .iter()
        .enumerate()
        .map(|(i, w)| {
            Ok(match w {
                Want::Nothing => Output::Nothing,
                Want::Logits | Want::Hidden => Output::Logits(row(i).to_vec()),
                Want::Token { sampler, history, step } => {
                    if on_gpu(sampler, gpu) {
                        Output::Token(words[i])
                    } else {
                        Output::Token(sampler.sample(row(i), history, *step).ok_or(EngineError::EmptyInput)?)
                    }
                }
            })
        })
        .collect()
}

/// Launches `f` with 8-byte argument slots (4-byte values in their low bytes).
fn launch_raw(
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    block: u32,
    stream: sys::CUstream,
    slots: &mut [u64],
) -> Result<(), EngineError> {
    let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
    // SAFETY: the slots match the kernel's parameters in order; the caller passes device
    // pointers of the sizes the kernel reads.
    cu(
        unsafe {
            sys::cuLaunchKernel(
                f,
                grid.0,
                grid.1,
                grid.2,
                block,
                1,
                1,
                0,
                stream,
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        },
        "cuLaunchKernel",
    )
}
