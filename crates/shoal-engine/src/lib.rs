//! Inference for shoal: model files, tokenizers, chat templates and the Llama-family
//! forward pass, on the CPU.
//!
//! - [`gguf`]: GGUF v2/v3 files (memory-mapped; metadata, tensors; every offset and
//!   length checked), with [`quant`] dequantizing F32, F16, BF16, Q8_0, Q4_0, Q4_1,
//!   Q5_0, Q5_1, Q4_K, Q5_K and Q6_K;
//! - [`tokenizer`]: the byte-level BPE that GGUF files carry (and `tokenizer.json`),
//!   with the GPT-2, SmolLM, Llama 3 and Qwen2 pre-tokenizers and special tokens;
//!   [`template`]: the ChatML and Llama 3 chat templates;
//! - [`models::llama`]: Llama and Qwen2 (config from GGUF metadata, weights by name, an
//!   explicit [`kv::KvCache`]), over the CPU ops of [`cpu`]; [`sampler`] and
//!   [`models::generate`].
//!
//! ```no_run
//! use shoal_engine::{gguf::GgufFile, models, tokenizer::Tokenizer};
//! let file = GgufFile::open("models/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref()).unwrap();
//! let model = models::llama::Llama::from_gguf(&file).unwrap();
//! let tokenizer = Tokenizer::from_gguf(&file).unwrap();
//! let mut cache = model.new_cache(2048).unwrap();
//! let prompt = tokenizer.encode("Hello", false);
//! let logits = model.forward(&prompt, &mut cache).unwrap();
//! # let _ = logits;
//! ```
//!
//! - [`safetensors`]: Hugging Face model directories (`config.json` and F32/F16/BF16
//!   safetensors, one file or sharded), loaded by [`models::llama::Llama::from_safetensors`].
//!
//! - [`backend`]: where the forward pass runs: [`backend::Cpu`] (the reference) and, with
//!   feature `cuda`, [`backend::cuda::Cuda`] (bf16 weights, cuBLAS prompts, fused one-token
//!   kernels replayed as a CUDA graph, a paged KV pool, sampling on the GPU);
//!   [`models::Model`] picks one at run time.
//!
//! - [`batch`]: continuous batching: the sessions of a model that are ready at the same
//!   moment share one forward pass (decode steps and chunks of prompts together).
//!
//! - [`interrupt`]: deadlines and kills, checked between the pieces of a forward pass.

pub mod backend;
pub mod batch;
pub mod cpu;
pub mod gguf;
pub mod gpu;
pub mod interrupt;
pub mod kv;
mod mapped;
pub mod models;
pub mod quant;
pub mod safetensors;
pub mod sampler;
pub mod template;
pub mod tokenizer;
