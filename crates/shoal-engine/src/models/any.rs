//! A model on whichever backend it was loaded on, for callers that pick the backend at run
//! time (the host, the CLI): [`Model`] and its sessions' [`Cache`].

use std::path::Path;

use super::{EngineError, GenerateConfig, Generation, generate};
use crate::backend::{Backend, Cpu, KvStore};
use crate::gguf::GgufFile;
use crate::kv::KvCache;
use crate::models::llama::{Llama, LlamaConfig};
use crate::sampler::Sampler;
use crate::tokenizer::Tokenizer;

#[cfg(feature = "cuda")]
use crate::backend::cuda::{Cuda, CudaCache};

/// Which backend to load a model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// The CPU (always available).
    Cpu,
    /// An NVIDIA GPU (feature `cuda`, a driver and cuBLAS).
    Cuda,
}

impl EngineKind {
    /// `cpu` or `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Cpu => "cpu",
            EngineKind::Cuda => "cuda",
        }
    }
}

/// A Llama-family model on the CPU or a GPU.
#[derive(Debug)]
pub enum Model {
    /// On the CPU.
    Cpu(Llama<Cpu>),
    /// On an NVIDIA GPU.
    #[cfg(feature = "cuda")]
    Cuda(Llama<Cuda>),
}

/// A session's KV cache, on its model's backend.
pub enum Cache {
    /// Host memory, contiguous.
    Cpu(KvCache),
    /// Blocks in the GPU's KV pool.
    #[cfg(feature = "cuda")]
    Cuda(CudaCache),
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("backend", &self.backend_name()).field("len", &self.len()).finish()
    }
}

fn mismatch(model: &'static str, cache: &'static str) -> EngineError {
    EngineError::Backend {
        backend: model,
        message: format!("a {cache} KV cache was given to a model on {model}; make caches with the model's new_cache"),
    }
}

macro_rules! each {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            Model::Cpu($m) => $e,
            #[cfg(feature = "cuda")]
            Model::Cuda($m) => $e,
        }
    };
}

/// Runs `$e` with the model and the cache of the same backend, or says they differ.
macro_rules! pair {
    ($self:expr, $cache:expr, ($m:ident, $c:ident) => $e:expr) => {
        match ($self, $cache) {
            (Model::Cpu($m), Cache::Cpu($c)) => $e,
            #[cfg(feature = "cuda")]
            (Model::Cuda($m), Cache::Cuda($c)) => $e,
            #[allow(unreachable_patterns)]
            (m, c) => Err(mismatch(m.backend_name(), c.backend_name())),
        }
    };
}

impl Model {
    fn backend_for(kind: EngineKind) -> Result<Option<EngineKind>, EngineError> {
        match kind {
            EngineKind::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            EngineKind::Cuda => Ok(Some(kind)),
            #[cfg(not(feature = "cuda"))]
            EngineKind::Cuda => Err(EngineError::Backend {
                backend: "cuda",
                message: "this build of shoal has no CUDA support (feature `cuda`)".into(),
            }),
        }
    }

    /// Loads a GGUF file onto `kind`.
    pub fn load_gguf(file: &GgufFile, kind: EngineKind) -> Result<Model, EngineError> {
        Ok(match Self::backend_for(kind)? {
            None => Model::Cpu(Llama::load_gguf(file, Cpu)?),
            #[cfg(feature = "cuda")]
            Some(_) => Model::Cuda(Llama::load_gguf(file, Cuda::open()?)?),
            #[cfg(not(feature = "cuda"))]
            Some(_) => unreachable!(),
        })
    }

    /// Loads a Hugging Face model directory onto `kind`.
    pub fn load_safetensors(dir: &Path, kind: EngineKind) -> Result<Model, EngineError> {
        Ok(match Self::backend_for(kind)? {
            None => Model::Cpu(Llama::load_safetensors(dir, Cpu)?),
            #[cfg(feature = "cuda")]
            Some(_) => Model::Cuda(Llama::load_safetensors(dir, Cuda::open()?)?),
            #[cfg(not(feature = "cuda"))]
            Some(_) => unreachable!(),
        })
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        each!(self, m => m.config())
    }

    /// `cpu` or `cuda`.
    pub fn backend_name(&self) -> &'static str {
        each!(self, m => m.backend().name())
    }

    /// Bytes one cached key or value takes on this model's backend: 4 (f32) on the CPU, 2
    /// (bf16) on CUDA.
    pub fn kv_bytes_per_value(&self) -> usize {
        match self {
            Model::Cpu(_) => 4,
            #[cfg(feature = "cuda")]
            Model::Cuda(_) => crate::backend::cuda::KV_BYTES,
        }
    }

    /// An empty cache for up to `context` positions.
    pub fn new_cache(&self, context: usize) -> Result<Cache, EngineError> {
        Ok(match self {
            Model::Cpu(m) => Cache::Cpu(m.new_cache(context)?),
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => Cache::Cuda(m.new_cache(context)?),
        })
    }

    /// See [`Llama::batch_stats`].
    pub fn batch_stats(&self) -> crate::batch::BatchStats {
        each!(self, m => m.batch_stats())
    }

    /// See [`Llama::forward`].
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache) -> Result<Vec<f32>, EngineError> {
        pair!(self, cache, (m, c) => m.forward(tokens, c))
    }

    /// See [`Llama::export_cache`].
    pub fn export_cache(&self, cache: &Cache) -> Result<crate::kv::KvSnapshot, EngineError> {
        pair!(self, cache, (m, c) => m.export_cache(c))
    }

    /// See [`Llama::import_cache`]: a snapshot from any backend becomes a cache on this one.
    pub fn import_cache(&self, snap: &crate::kv::KvSnapshot, context: usize) -> Result<Cache, EngineError> {
        Ok(match self {
            Model::Cpu(m) => Cache::Cpu(m.import_cache(snap, context)?),
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => Cache::Cuda(m.import_cache(snap, context)?),
        })
    }

    /// See [`Llama::park_cache`].
    pub fn park_cache(&self, cache: &Cache) -> Result<crate::kv::KvImage, EngineError> {
        pair!(self, cache, (m, c) => m.park_cache(c))
    }

    /// See [`Llama::import_image`]: an image from any backend becomes a cache on this one.
    pub fn import_image(&self, image: &crate::kv::KvImage, context: usize) -> Result<Cache, EngineError> {
        Ok(match self {
            Model::Cpu(m) => Cache::Cpu(m.import_image(image, context)?),
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => Cache::Cuda(m.import_image(image, context)?),
        })
    }

    /// See [`Llama::hidden`].
    pub fn hidden(&self, tokens: &[u32], cache: &mut Cache) -> Result<Vec<f32>, EngineError> {
        pair!(self, cache, (m, c) => m.hidden(tokens, c))
    }

    /// See [`Llama::forward_sample`].
    pub fn forward_sample(
        &self,
        tokens: &[u32],
        cache: &mut Cache,
        sampler: &Sampler,
        history: &[u32],
        step: u64,
    ) -> Result<u32, EngineError> {
        pair!(self, cache, (m, c) => m.forward_sample(tokens, c, sampler, history, step))
    }

    /// See [`generate`].
    pub fn generate(
        &self,
        tokenizer: &Tokenizer,
        cache: &mut Cache,
        prompt: &[u32],
        config: &GenerateConfig,
        on_token: impl FnMut(u32, &str),
    ) -> Result<Generation, EngineError> {
        pair!(self, cache, (m, c) => generate(m, tokenizer, c, prompt, config, on_token))
    }
}

impl Cache {
    fn store(&self) -> &dyn KvStore {
        match self {
            Cache::Cpu(c) => c,
            #[cfg(feature = "cuda")]
            Cache::Cuda(c) => c,
        }
    }

    /// `cpu` or `cuda`.
    pub fn backend_name(&self) -> &'static str {
        match self {
            Cache::Cpu(_) => "cpu",
            #[cfg(feature = "cuda")]
            Cache::Cuda(_) => "cuda",
        }
    }

    /// Positions processed so far.
    pub fn len(&self) -> usize {
        self.store().len()
    }

    /// Whether no position is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most positions the cache holds.
    pub fn capacity(&self) -> usize {
        self.store().capacity()
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.store().remaining()
    }

    /// Keeps the first `n` positions.
    pub fn truncate(&mut self, n: usize) {
        match self {
            Cache::Cpu(c) => KvStore::truncate(c, n),
            #[cfg(feature = "cuda")]
            Cache::Cuda(c) => KvStore::truncate(c, n),
        }
    }
}
