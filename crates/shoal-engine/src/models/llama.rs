//! Llama-family decoders: Llama 2/3, SmolLM2, TinyLlama, Mistral (GGUF `llama`) and Qwen2
//! (GGUF `qwen2`).
//!
//! The graph, per layer: RMSNorm → Q/K/V projections (Qwen2 adds biases) → rotary position
//! embedding → grouped-query causal attention over the KV cache → output projection and
//! residual → RMSNorm → SwiGLU feed-forward and residual. Then a final RMSNorm and the output
//! projection (tied to the token embedding when the file has no `output.weight`).
//!
//! Rotary embeddings: GGUF `llama` files store Q and K permuted at conversion so that the
//! interleaved (GPT-J, adjacent pairs) rotation reproduces Hugging Face's; GGUF `qwen2` files
//! are not permuted and use the half-split (NeoX) rotation. Hugging Face safetensors
//! ([`Llama::from_safetensors`]) are unpermuted too, so both `llama` and `qwen2` use NeoX there;
//! their tensors are looked up by GGUF name through a mapping to the Hugging Face names.
//!
//! The file holds no device code: weights are loaded through a [`Backend`] (dequantized to
//! f32 first; the CPU keeps them so, CUDA stores bf16) and the forward pass is written over
//! its [`Ops`].

use std::path::Path;

use rayon::prelude::*;

use super::EngineError;
use crate::backend::{Backend, Cpu, Heads, KvStore, Ops, Output, Seq, Want};
use crate::batch::Batcher;
use crate::cpu::{self, RopeStyle};
use crate::gguf::GgufFile;
use crate::safetensors::{SafetensorsError, SafetensorsModel};
use crate::sampler::Sampler;

/// The GGUF architectures this file runs.
const SUPPORTED: &str = "`llama` (Llama, SmolLM2, TinyLlama, Mistral) and `qwen2`";

/// The hyperparameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// The GGUF architecture (`llama` or `qwen2`), the prefix of its metadata keys.
    pub arch: String,
    /// Decoder layers (`block_count`).
    pub n_layers: usize,
    /// Width of the residual stream (`embedding_length`).
    pub dim: usize,
    /// Hidden width of the feed-forward network (`feed_forward_length`).
    pub ffn_dim: usize,
    /// Query heads (`attention.head_count`).
    pub n_heads: usize,
    /// Key/value heads (`attention.head_count_kv`; equal to `n_heads` without GQA).
    pub n_kv_heads: usize,
    /// Values per head (`attention.key_length`, else `dim / n_heads`).
    pub head_dim: usize,
    /// Vocabulary size (the outer dimension of `token_embd.weight`).
    pub vocab_size: usize,
    /// RMSNorm epsilon (`attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
    /// RoPE base frequency (`rope.freq_base`, default 10000).
    pub rope_base: f32,
    /// Values of each head that RoPE rotates (`rope.dimension_count`, default `head_dim`).
    pub rope_dim: usize,
    /// Which pairs RoPE rotates (interleaved for `llama`, NeoX for `qwen2`).
    pub rope_style: RopeStyle,
    /// The context the model was trained for (`context_length`).
    pub context_length: usize,
    /// Whether Q, K and V have biases (Qwen2).
    pub qkv_bias: bool,
}

impl LlamaConfig {
    /// Reads the hyperparameters from a GGUF file's metadata (`{arch}.block_count`, …) and
    /// the vocabulary size from `token_embd.weight`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, EngineError> {
        let arch = file.architecture()?.to_string();
        let (rope_style, qkv_bias) = match arch.as_str() {
            "llama" => (RopeStyle::Interleaved, false),
            "qwen2" => (RopeStyle::Neox, true),
            _ => {
                return Err(EngineError::UnsupportedArchitecture { found: arch, supported: SUPPORTED });
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let count = |k: &str| -> Result<usize, EngineError> {
            let full = key(k);
            let v = file.get_u64(&full)?;
            usize::try_from(v).map_err(|_| EngineError::InvalidConfig {
                key: full,
                value: v.to_string(),
                reason: "too large for this machine",
            })
        };
        let optional_count = |k: &str| -> Result<Option<usize>, EngineError> {
            if file.get(&key(k)).is_some() { count(k).map(Some) } else { Ok(None) }
        };

        let n_layers = count("block_count")?;
        let dim = count("embedding_length")?;
        let ffn_dim = count("feed_forward_length")?;
        let n_heads = count("attention.head_count")?;
        let n_kv_heads = optional_count("attention.head_count_kv")?.unwrap_or(n_heads);
        let context_length = count("context_length")?;
        let rms_eps = file.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_base =
            if file.get(&key("rope.freq_base")).is_some() { file.get_f32(&key("rope.freq_base"))? } else { 10000.0 };
        let invalid = |k: &str, value: String, reason| EngineError::InvalidConfig { key: key(k), value, reason };
        for (k, v) in [
            ("block_count", n_layers),
            ("embedding_length", dim),
            ("feed_forward_length", ffn_dim),
            ("attention.head_count", n_heads),
            ("attention.head_count_kv", n_kv_heads),
            ("context_length", context_length),
        ] {
            if v == 0 {
                return Err(invalid(k, "0".into(), "must be at least 1"));
            }
        }
        if n_heads % n_kv_heads != 0 {
            return Err(invalid("attention.head_count_kv", n_kv_heads.to_string(), "must divide attention.head_count"));
        }
        let head_dim = match optional_count("attention.key_length")? {
            Some(h) => h,
            None if dim % n_heads == 0 => dim / n_heads,
            None => {
                return Err(invalid("attention.head_count", n_heads.to_string(), "must divide embedding_length"));
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(invalid(
                "attention.key_length",
                head_dim.to_string(),
                "the head size must be even and at least 2",
            ));
        }
        let rope_dim = optional_count("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dim % 2 != 0 || rope_dim > head_dim {
            return Err(invalid(
                "rope.dimension_count",
                rope_dim.to_string(),
                "must be even and at most the head size",
            ));
        }
        if !(rms_eps.is_finite() && rms_eps >= 0.0) {
            return Err(invalid(
                "attention.layer_norm_rms_epsilon",
                rms_eps.to_string(),
                "must be a non-negative number",
            ));
        }
        if !(rope_base.is_finite() && rope_base > 0.0) {
            return Err(invalid("rope.freq_base", rope_base.to_string(), "must be a positive number"));
        }
        let embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| EngineError::MissingTensor { name: "token_embd.weight".into(), arch: arch.clone() })?;
        let vocab_size = match embd.dims.as_slice() {
            &[d, v] if d == dim as u64 && v > 0 => usize::try_from(v).map_err(|_| EngineError::InvalidConfig {
                key: "token_embd.weight".into(),
                value: v.to_string(),
                reason: "vocabulary too large for this machine",
            })?,
            found => {
                return Err(EngineError::TensorShape {
                    name: "token_embd.weight".into(),
                    expected: vec![dim as u64, 0],
                    found: found.to_vec(),
                });
            }
        };
        Ok(Self {
            arch,
            n_layers,
            dim,
            ffn_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rms_eps,
            rope_base,
            rope_dim,
            rope_style,
            context_length,
            qkv_bias,
        })
    }

    /// Reads the hyperparameters from a Hugging Face `config.json` of `model_type` `llama` or
    /// `qwen2`. Hugging Face stores Q and K unpermuted, so both use the half-split (NeoX)
    /// rotation; Qwen2 (and Llama with `attention_bias`) has Q/K/V biases.
    pub fn from_hf_config(json: &serde_json::Value) -> Result<Self, EngineError> {
        let invalid = |k: &str, value: String, reason| EngineError::InvalidConfig { key: k.to_string(), value, reason };
        let arch = json
            .get("model_type")
            .and_then(|m| m.as_str())
            .ok_or_else(|| invalid("model_type", "missing".into(), "config.json must name the model type"))?
            .to_string();
        let qkv_bias = match arch.as_str() {
            "llama" => json.get("attention_bias").and_then(|b| b.as_bool()).unwrap_or(false),
            "qwen2" => true,
            _ => {
                return Err(EngineError::UnsupportedArchitecture { found: arch, supported: SUPPORTED });
            }
        };
        let optional_count = |k: &str| -> Result<Option<usize>, EngineError> {
            match json.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => {
                    let n = v.as_u64().ok_or_else(|| invalid(k, v.to_string(), "must be a non-negative integer"))?;
                    let n = usize::try_from(n).map_err(|_| invalid(k, n.to_string(), "too large for this machine"))?;
                    if n == 0 {
                        return Err(invalid(k, "0".into(), "must be at least 1"));
                    }
                    Ok(Some(n))
                }
            }
        };
        let count = |k: &str| optional_count(k)?.ok_or_else(|| invalid(k, "missing".into(), "config.json must set it"));
        let float = |k: &str, default: Option<f64>| -> Result<f32, EngineError> {
            match json.get(k) {
                None | Some(serde_json::Value::Null) => {
                    default.map(|d| d as f32).ok_or_else(|| invalid(k, "missing".into(), "config.json must set it"))
                }
                Some(v) => v.as_f64().map(|f| f as f32).ok_or_else(|| invalid(k, v.to_string(), "must be a number")),
            }
        };
        let n_layers = count("num_hidden_layers")?;
        let dim = count("hidden_size")?;
        let ffn_dim = count("intermediate_size")?;
        let n_heads = count("num_attention_heads")?;
        let n_kv_heads = optional_count("num_key_value_heads")?.unwrap_or(n_heads);
        let vocab_size = count("vocab_size")?;
        let context_length = count("max_position_embeddings")?;
        let rms_eps = float("rms_norm_eps", None)?;
        let rope_base = float("rope_theta", Some(10000.0))?;
        if n_heads % n_kv_heads != 0 {
            return Err(invalid("num_key_value_heads", n_kv_heads.to_string(), "must divide num_attention_heads"));
        }
        let head_dim = match optional_count("head_dim")? {
            Some(h) => h,
            None if dim % n_heads == 0 => dim / n_heads,
            None => return Err(invalid("num_attention_heads", n_heads.to_string(), "must divide hidden_size")),
        };
        if head_dim % 2 != 0 {
            return Err(invalid("head_dim", head_dim.to_string(), "the head size must be even"));
        }
        if !(rms_eps.is_finite() && rms_eps >= 0.0) {
            return Err(invalid("rms_norm_eps", rms_eps.to_string(), "must be a non-negative number"));
        }
        if !(rope_base.is_finite() && rope_base > 0.0) {
            return Err(invalid("rope_theta", rope_base.to_string(), "must be a positive number"));
        }
        Ok(Self {
            arch,
            n_layers,
            dim,
            ffn_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rms_eps,
            rope_base,
            rope_dim: head_dim,
            rope_style: RopeStyle::Neox,
            context_length,
            qkv_bias,
        })
    }

    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Values per position and layer in the KV cache (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// The weights of one decoder layer, linear weights as `[out, in]` matrices.
struct Layer<W> {
    attn_norm: W,
    wq: W,
    wk: W,
    wv: W,
    bq: Option<W>,
    bk: Option<W>,
    bv: Option<W>,
    wo: W,
    ffn_norm: W,
    w_gate: W,
    w_up: W,
    w_down: W,
}

/// A loaded Llama-family model, shared by every session that runs it, with its weights on
/// backend `B` (the CPU unless said otherwise).
pub struct Llama<B: Backend = Cpu> {
    config: LlamaConfig,
    backend: B,
    /// `[vocab, dim]`.
    token_embd: B::Weight,
    output_norm: B::Weight,
    /// `[vocab, dim]`, or `None` when tied to `token_embd`.
    output: Option<B::Weight>,
    layers: Vec<Layer<B::Weight>>,
    /// RoPE inverse frequencies, `rope_dim / 2` of them.
    inv_freq: B::Weight,
    /// Sessions ready at the same moment share a pass.
    batcher: Batcher<B>,
}

impl<B: Backend> std::fmt::Debug for Llama<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .field("backend", &self.backend.name())
            .field("tied_output", &self.output.is_none())
            .finish_non_exhaustive()
    }
}

/// Where weights come from: tensors by their GGUF name, dimensions innermost first.
trait WeightSource: Sync {
    /// The dimensions of `name` (innermost first), or `None` when the model has no such
    /// tensor.
    fn dims(&self, name: &str) -> Option<Vec<u64>>;
    /// The values of `name` as f32.
    fn f32(&self, name: &str) -> Result<Vec<f32>, EngineError>;
}

impl WeightSource for GgufFile {
    fn dims(&self, name: &str) -> Option<Vec<u64>> {
        self.tensor(name).map(|t| t.dims.clone())
    }

    fn f32(&self, name: &str) -> Result<Vec<f32>, EngineError> {
        Ok(self.tensor_f32(name)?)
    }
}

/// Hugging Face weights seen through GGUF names.
struct HfWeights<'a> {
    model: &'a SafetensorsModel,
    tied: bool,
}

impl HfWeights<'_> {
    /// The Hugging Face name of the tensor GGUF calls `name`.
    fn hf_name(&self, name: &str) -> Option<String> {
        if self.tied && name == "output.weight" {
            return None;
        }
        hf_tensor_name(name)
    }
}

/// The Hugging Face (`transformers` Llama/Qwen2) name of the tensor GGUF calls `name`, for
/// the tensors this file loads.
pub fn hf_tensor_name(name: &str) -> Option<String> {
    Some(match name {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let (layer, t) = name.strip_prefix("blk.")?.split_once('.')?;
            let hf = match t {
                "attn_norm.weight" => "input_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_q.bias" => "self_attn.q_proj.bias",
                "attn_k.bias" => "self_attn.k_proj.bias",
                "attn_v.bias" => "self_attn.v_proj.bias",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                _ => return None,
            };
            format!("model.layers.{layer}.{hf}")
        }
    })
}

impl WeightSource for HfWeights<'_> {
    fn dims(&self, name: &str) -> Option<Vec<u64>> {
        let t = self.model.tensor(&self.hf_name(name)?)?;
        Some(t.shape.iter().rev().copied().collect())
    }

    fn f32(&self, name: &str) -> Result<Vec<f32>, EngineError> {
        let hf = self.hf_name(name).ok_or_else(|| SafetensorsError::MissingTensor(name.to_string()))?;
        Ok(self.model.tensor_f32(&hf)?)
    }
}

/// Loads `name`, checking that its dimensions (innermost first) are `dims`.
fn load(file: &dyn WeightSource, arch: &str, name: &str, dims: &[usize]) -> Result<Vec<f32>, EngineError> {
    let found =
        file.dims(name).ok_or_else(|| EngineError::MissingTensor { name: name.to_string(), arch: arch.to_string() })?;
    let expected: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    if found != expected {
        return Err(EngineError::TensorShape { name: name.to_string(), expected, found });
    }
    file.f32(name)
}

/// Loads `name` if the file has it.
fn load_optional(
    file: &dyn WeightSource,
    arch: &str,
    name: &str,
    dims: &[usize],
) -> Result<Option<Vec<f32>>, EngineError> {
    match file.dims(name) {
        Some(_) => load(file, arch, name, dims).map(Some),
        None => Ok(None),
    }
}

impl Llama<Cpu> {
    /// Reads the config and every weight from a GGUF file, dequantizing them to f32, for
    /// the CPU.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, EngineError> {
        Self::load_gguf(file, Cpu)
    }

    /// Reads a Hugging Face model directory for the CPU; see [`Llama::load_safetensors`].
    pub fn from_safetensors(dir: &Path) -> Result<Self, EngineError> {
        Self::load_safetensors(dir, Cpu)
    }
}

impl<B: Backend> Llama<B> {
    /// Reads the config and every weight from a GGUF file (dequantized) onto `backend`.
    pub fn load_gguf(file: &GgufFile, backend: B) -> Result<Self, EngineError> {
        let c = LlamaConfig::from_gguf(file)?;
        Self::load_weights(c, file, None, backend)
    }

    /// Reads a Hugging Face model directory onto `backend`: `config.json` (see
    /// [`LlamaConfig::from_hf_config`]) and the weights of `model.safetensors` or of the
    /// shards `model.safetensors.index.json` lists.
    pub fn load_safetensors(dir: &Path, backend: B) -> Result<Self, EngineError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| SafetensorsError::Io { path: config_path.clone(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| SafetensorsError::Corrupt { path: config_path, reason: format!("not valid JSON: {e}") })?;
        let c = LlamaConfig::from_hf_config(&json)?;
        let model = SafetensorsModel::open_dir(dir)?;
        let tied = json.get("tie_word_embeddings").and_then(|t| t.as_bool()).unwrap_or(false)
            || model.tensor("lm_head.weight").is_none();
        let rope_freqs = llama3_rope_factors(&json, &c)?;
        Self::load_weights(c, &HfWeights { model: &model, tied }, rope_freqs, backend)
    }

    /// Loads every weight named as in GGUF. `rope_freqs` overrides `rope_freqs.weight`.
    fn load_weights(
        c: LlamaConfig,
        file: &dyn WeightSource,
        rope_freqs: Option<Vec<f32>>,
        backend: B,
    ) -> Result<Self, EngineError> {
        let arch = c.arch.as_str();
        let (dim, q_dim, kv_dim, ffn) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let b = &backend;
        let mat =
            |name: String, rows: usize, cols: usize| b.matrix(load(file, arch, &name, &[cols, rows])?, rows, cols);
        let vec = |name: String, d: usize| b.vector(load(file, arch, &name, &[d])?);
        let layers = (0..c.n_layers)
            .into_par_iter()
            .map(|i| {
                let bias = |n: &str, d: usize| {
                    let name = format!("blk.{i}.{n}");
                    if c.qkv_bias || file.dims(&name).is_some() { vec(name, d).map(Some) } else { Ok(None) }
                };
                Ok(Layer {
                    attn_norm: vec(format!("blk.{i}.attn_norm.weight"), dim)?,
                    wq: mat(format!("blk.{i}.attn_q.weight"), q_dim, dim)?,
                    wk: mat(format!("blk.{i}.attn_k.weight"), kv_dim, dim)?,
                    wv: mat(format!("blk.{i}.attn_v.weight"), kv_dim, dim)?,
                    bq: bias("attn_q.bias", q_dim)?,
                    bk: bias("attn_k.bias", kv_dim)?,
                    bv: bias("attn_v.bias", kv_dim)?,
                    wo: mat(format!("blk.{i}.attn_output.weight"), dim, q_dim)?,
                    ffn_norm: vec(format!("blk.{i}.ffn_norm.weight"), dim)?,
                    w_gate: mat(format!("blk.{i}.ffn_gate.weight"), ffn, dim)?,
                    w_up: mat(format!("blk.{i}.ffn_up.weight"), ffn, dim)?,
                    w_down: mat(format!("blk.{i}.ffn_down.weight"), dim, ffn)?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let token_embd = mat("token_embd.weight".into(), c.vocab_size, dim)?;
        let output_norm = vec("output_norm.weight".into(), dim)?;
        let output = match file.dims("output.weight") {
            Some(_) => Some(mat("output.weight".into(), c.vocab_size, dim)?),
            None => None,
        };
        // Llama 3.1+ scales the RoPE frequencies by per-pair factors.
        let rope_freqs = match rope_freqs {
            Some(f) => Some(f),
            None => load_optional(file, arch, "rope_freqs.weight", &[c.rope_dim / 2])?,
        };
        let inv_freq = b.vector(cpu::rope_inv_freq(c.rope_dim, c.rope_base, rope_freqs.as_deref()))?;
        Ok(Self { config: c, backend, token_embd, output_norm, output, layers, inv_freq, batcher: Batcher::new() })
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The backend the weights live on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// An empty KV cache for a session of up to `context` positions (at most the model's
    /// context length).
    pub fn new_cache(&self, context: usize) -> Result<B::Cache, EngineError> {
        let c = &self.config;
        if context > c.context_length {
            return Err(EngineError::ContextTooLong { requested: context, max: c.context_length });
        }
        self.backend.new_cache(c.n_layers, c.kv_dim(), context)
    }

    /// The positions `cache` holds, as plain data (see [`crate::kv::KvSnapshot`]).
    pub fn export_cache(&self, cache: &B::Cache) -> Result<crate::kv::KvSnapshot, EngineError> {
        self.backend.export_cache(cache)
    }

    /// A cache of `context` positions (at most the model's) holding `snap`, made on this
    /// model's backend (whichever backend exported it).
    pub fn import_cache(&self, snap: &crate::kv::KvSnapshot, context: usize) -> Result<B::Cache, EngineError> {
        let c = &self.config;
        if context > c.context_length {
            return Err(EngineError::ContextTooLong { requested: context, max: c.context_length });
        }
        self.backend.import_cache(snap, c.n_layers, c.kv_dim(), context)
    }

    /// `cache` copied out to be brought back soon, on this backend if possible: the backend's
    /// own image where it has one (CUDA: pinned host memory, DMA both ways), else the portable
    /// form.
    pub fn park_cache(&self, cache: &B::Cache) -> Result<crate::kv::KvImage, EngineError> {
        Ok(match self.backend.park(cache)? {
            Some(n) => crate::kv::KvImage::Native(n),
            None => crate::kv::KvImage::Portable(self.export_cache(cache)?),
        })
    }

    /// A cache of `context` positions holding `image`: straight from the backend's own image
    /// when it is this backend's, else through the portable form.
    pub fn import_image(&self, image: &crate::kv::KvImage, context: usize) -> Result<B::Cache, EngineError> {
        match image {
            crate::kv::KvImage::Portable(s) => self.import_cache(s, context),
            crate::kv::KvImage::Native(n) => {
                let c = &self.config;
                if context > c.context_length {
                    return Err(EngineError::ContextTooLong { requested: context, max: c.context_length });
                }
                match self.backend.unpark(n.as_ref(), c.n_layers, c.kv_dim(), context)? {
                    Some(cache) => Ok(cache),
                    None => self.import_cache(&n.to_snapshot(), context),
                }
            }
        }
    }

    /// Runs `tokens` at positions `cache.len()..`, appends their keys and values to the
    /// cache, and returns the logits of the last token (`vocab_size` values).
    ///
    /// Several tokens (a prompt) go through each layer together as matrix products; one
    /// token at a time is the decoding step. Nothing is written to the cache unless the
    /// whole call can succeed: an empty input, an unknown token id, a cache made for another
    /// model, or tokens that do not fit in the cache are errors.
    pub fn forward(&self, tokens: &[u32], cache: &mut B::Cache) -> Result<Vec<f32>, EngineError> {
        match self.run(tokens, cache, Want::Logits)? {
            Output::Logits(l) => Ok(l),
            _ => unreachable!("a backend answered Want::Logits with something else"),
        }
    }

    /// Runs `tokens` like [`Llama::forward`] and returns the last token's final hidden state
    /// (after the output norm, `dim` values): the model's embedding of the sequence as a
    /// causal model sees it.
    pub fn hidden(&self, tokens: &[u32], cache: &mut B::Cache) -> Result<Vec<f32>, EngineError> {
        match self.run(tokens, cache, Want::Hidden)? {
            Output::Logits(h) => Ok(h),
            _ => unreachable!("a backend answered Want::Hidden with something else"),
        }
    }

    /// Like [`Llama::forward`], but chooses the next token with `sampler` on the backend
    /// (on the GPU for CUDA) instead of returning the logits. `history` is the window the
    /// repetition penalty looks at; `step` keys the random draw.
    pub fn forward_sample(
        &self,
        tokens: &[u32],
        cache: &mut B::Cache,
        sampler: &Sampler,
        history: &[u32],
        step: u64,
    ) -> Result<u32, EngineError> {
        match self.run(tokens, cache, Want::Token { sampler, history, step })? {
            Output::Token(t) => Ok(t),
            _ => unreachable!("a backend answered Want::Token with something else"),
        }
    }

    /// Checks one sequence's input against the model and its cache.
    fn check(&self, tokens: &[u32], cache: &B::Cache) -> Result<(), EngineError> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if cache.n_layers() != c.n_layers || cache.kv_dim() != c.kv_dim() {
            return Err(EngineError::CacheMismatch {
                layers: c.n_layers,
                kv_dim: c.kv_dim(),
                found_layers: cache.n_layers(),
                found_kv_dim: cache.kv_dim(),
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::TokenOutOfRange { id, vocab: c.vocab_size });
        }
        cache.check_room(tokens.len())?;
        Ok(())
    }

    /// Checks the input, makes room, then runs it: through the model's [`Batcher`] (sharing
    /// passes with the other sessions ready at the same moment), or alone, in chunks the
    /// backend accepts, for a hidden state.
    fn run(&self, tokens: &[u32], cache: &mut B::Cache, want: Want<'_>) -> Result<Output, EngineError> {
        self.check(tokens, cache)?;
        self.backend.reserve(cache, tokens.len())?;
        crate::interrupt::check()?;
        if !matches!(want, Want::Hidden) {
            return self.batcher.submit(self, tokens, cache, want);
        }
        let chunk = self.backend.max_chunk().max(1);
        let n_chunks = tokens.len().div_ceil(chunk);
        let start = cache.len();
        let mut out = Output::Nothing;
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let w = if i + 1 == n_chunks { want } else { Want::Nothing };
            let r = crate::interrupt::check().map_err(EngineError::from).and_then(|()| {
                let mut seq = [Seq { tokens: part, cache: &mut *cache, want: w }];
                self.pass(&mut seq, true)
            });
            match r {
                Ok(mut o) => out = o.pop().unwrap_or(Output::Nothing),
                // Stopped (or failed) part-way: the call leaves the cache as it found it.
                Err(e) => {
                    cache.truncate(start);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Runs one pass over several sessions at once: each sequence's tokens at its own cache's
    /// positions, each handed back what its `want` asks for, in order. The sequences together
    /// take at most [`Backend::max_chunk`] tokens and [`Backend::max_seqs`] sequences;
    /// [`Want::Hidden`] is refused (ask [`Llama::hidden`]). Checked like [`Llama::forward`];
    /// on failure every cache is left as it was found. The caches are distinct (a `&mut` each).
    ///
    /// Calls from many threads are batched already (see [`crate::batch`]); this is for
    /// callers that hold many sessions themselves.
    pub fn forward_batch(&self, seqs: &mut [Seq<'_, B::Cache>]) -> Result<Vec<Output>, EngineError> {
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let (most_tokens, most_seqs) = (self.backend.max_chunk(), self.backend.max_seqs());
        if seqs.len() > most_seqs || total > most_tokens {
            return Err(EngineError::Backend {
                backend: self.backend.name(),
                message: format!(
                    "a batch of {} sequences and {total} tokens; one pass takes at most {most_seqs} sequences \
                     and {most_tokens} tokens",
                    seqs.len()
                ),
            });
        }
        for (i, s) in seqs.iter().enumerate() {
            self.check(s.tokens, s.cache)?;
            if matches!(s.want, Want::Hidden) {
                return Err(EngineError::Backend {
                    backend: self.backend.name(),
                    message: format!("sequence {i} of a batch wants a hidden state; ask `hidden` alone"),
                });
            }
        }
        let starts: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
        let r = seqs.iter_mut().try_for_each(|s| self.backend.reserve(s.cache, s.tokens.len()));
        let r = r.and_then(|()| self.pass(seqs, false));
        if r.is_err() {
            for (s, &n) in seqs.iter_mut().zip(&starts) {
                s.cache.truncate(n);
            }
        }
        r
    }

    /// One backend run over checked sequences (room reserved); `interruptible` lets a
    /// multi-token pass stop between layers at the current thread's interrupt (a pass of one
    /// caller's own chunks; never a shared batch).
    pub(crate) fn pass(&self, seqs: &mut [Seq<'_, B::Cache>], interruptible: bool) -> Result<Vec<Output>, EngineError> {
        let hidden = seqs.iter().all(|s| matches!(s.want, Want::Hidden));
        self.backend.run(seqs, &mut |ops| self.body(ops, hidden, interruptible))
    }

    /// The forward pass over one batch: returns each sequence's last logits (or final hidden
    /// state when `hidden`), `[n_seqs, width]`.
    fn body<O>(&self, ops: &mut O, hidden: bool, interruptible: bool) -> Result<O::Act, EngineError>
    where
        O: Ops<Weight = B::Weight, Cache = B::Cache>,
    {
        let c = &self.config;
        let (dim, q_dim, kv_dim, ffn) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let heads = Heads { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };

        let n = ops.n_tokens();
        let mut x = ops.act(n, dim);
        ops.embed(&mut x, &self.token_embd);
        let mut xn = ops.act(n, dim);
        let mut q = ops.act(n, q_dim);
        let mut k = ops.act(n, kv_dim);
        let mut v = ops.act(n, kv_dim);
        let mut att = ops.act(n, q_dim);
        let mut gate = ops.act(n, ffn);

        for (l, layer) in self.layers.iter().enumerate() {
            // A prompt stops between layers when its deadline passes (the CPU runs each op as
            // it is called; on a GPU the check costs nothing). One-token steps and shared
            // batches run whole: a recorded CUDA graph must not be cut, and one caller's
            // deadline must not stop the others' work.
            if interruptible && n > 1 {
                crate::interrupt::check()?;
            }
            // Attention block.
            ops.rmsnorm(&mut xn, &x, &layer.attn_norm, c.rms_eps);
            ops.matmul_qkv(&mut q, &mut k, &mut v, &xn, &layer.wq, &layer.wk, &layer.wv);
            for (t, b) in [(&mut q, &layer.bq), (&mut k, &layer.bk), (&mut v, &layer.bv)] {
                if let Some(b) = b {
                    ops.add_bias(t, b);
                }
            }
            ops.rope_qk(&mut q, &mut k, c.n_heads, c.n_kv_heads, c.head_dim, &self.inv_freq, c.rope_style);
            ops.attention(&mut att, &q, &k, &v, l, heads);
            ops.matmul(&mut x, &att, &layer.wo, true);

            // Feed-forward block (SwiGLU).
            ops.rmsnorm(&mut xn, &x, &layer.ffn_norm, c.rms_eps);
            ops.matmul_swiglu(&mut gate, &xn, &layer.w_gate, &layer.w_up);
            ops.matmul(&mut x, &gate, &layer.w_down, true);
        }

        // Logits of each sequence's last token only.
        let last = ops.last_rows(&x);
        let s = ops.n_seqs();
        let mut last_norm = ops.act(s, dim);
        ops.rmsnorm(&mut last_norm, &last, &self.output_norm, c.rms_eps);
        if hidden {
            return Ok(last_norm);
        }
        let mut logits = ops.act(s, c.vocab_size);
        let out_w = self.output.as_ref().unwrap_or(&self.token_embd);
        ops.matmul(&mut logits, &last_norm, out_w, false);
        Ok(logits)
    }

    /// Statistics of the model's batcher (passes run, sequences and tokens in them).
    pub fn batch_stats(&self) -> crate::batch::BatchStats {
        self.batcher.stats()
    }
}

/// The per-pair frequency divisors of Llama 3.1+ (`rope_scaling.rope_type` `llama3` in
/// `config.json`), as llama.cpp's converter computes them for `rope_freqs.weight`; `None`
/// without such scaling.
fn llama3_rope_factors(json: &serde_json::Value, c: &LlamaConfig) -> Result<Option<Vec<f32>>, EngineError> {
    let Some(scaling) = json.get("rope_scaling").filter(|s| !s.is_null()) else {
        return Ok(None);
    };
    let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|t| t.as_str()).unwrap_or("");
    if kind != "llama3" {
        return Err(EngineError::InvalidConfig {
            key: "rope_scaling.rope_type".into(),
            value: kind.to_string(),
            reason: "only `llama3` RoPE scaling is supported",
        });
    }
    let get = |k: &str, default: f64| scaling.get(k).and_then(|v| v.as_f64()).unwrap_or(default);
    let factor = get("factor", 8.0);
    let low = get("low_freq_factor", 1.0);
    let high = get("high_freq_factor", 4.0);
    let old_ctx = get("original_max_position_embeddings", 8192.0);
    if !(factor > 0.0 && high > low && old_ctx > 0.0) {
        return Err(EngineError::InvalidConfig {
            key: "rope_scaling".into(),
            value: scaling.to_string(),
            reason: "needs factor > 0, high_freq_factor > low_freq_factor and a positive original context",
        });
    }
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    let factors = (0..c.rope_dim / 2)
        .map(|i| {
            let freq = (c.rope_base as f64).powf(-2.0 * i as f64 / c.rope_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect();
    Ok(Some(factors))
}
