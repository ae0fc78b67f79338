//! Writes a Hugging Face model directory (`config.json` + `model.safetensors`) of random
//! weights with the shape of a real model, for speed tests without downloading one.
//!
//! ```text
//! cargo run --release -p shoal-engine --example synth_weights -- \
//!     --out DIR [--shape llama-3.2-1b|heads-128|tiny] [--seed N] [--dtype bf16|f32]
//! ```
//!
//! Weights are `normal * 0.02` from a fixed-seed generator (each tensor seeded from the seed
//! and its index, so the output depends only on the arguments), norms are 1. The data are
//! streamed to the file a chunk at a time.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The hyperparameters of the model to imitate.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Decoder layers.
    pub layers: usize,
    /// Residual width.
    pub dim: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Training context.
    pub max_pos: usize,
    /// Whether Llama 3.1-style RoPE scaling is in the config.
    pub llama3_scaling: bool,
}

impl Shape {
    /// Looks a shape up by name.
    pub fn named(name: &str) -> Option<Shape> {
        match name {
            "llama-3.2-1b" => Some(Shape {
                layers: 16,
                dim: 2048,
                heads: 32,
                kv_heads: 8,
                head_dim: 64,
                ffn: 8192,
                vocab: 128_256,
                rope_theta: 500_000.0,
                max_pos: 131_072,
                llama3_scaling: true,
            }),
            // Heads of 128 values, as Llama 3 8B's, in a small model (4 query heads per
            // key/value head, 4 layers).
            "heads-128" => Some(Shape {
                layers: 4,
                dim: 1024,
                heads: 8,
                kv_heads: 2,
                head_dim: 128,
                ffn: 2816,
                vocab: 32_000,
                rope_theta: 500_000.0,
                max_pos: 8192,
                llama3_scaling: false,
            }),
            "tiny" => Some(Shape {
                layers: 2,
                dim: 64,
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                ffn: 128,
                vocab: 300,
                rope_theta: 10_000.0,
                max_pos: 256,
                llama3_scaling: false,
            }),
            _ => None,
        }
    }

    /// `config.json` for this shape (Llama, tied embeddings).
    pub fn config_json(&self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_pos,
            "vocab_size": self.vocab,
            "tie_word_embeddings": true,
            "hidden_act": "silu",
            "attention_bias": false,
            "torch_dtype": "bfloat16",
        });
        if self.llama3_scaling {
            c["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            });
        }
        c
    }

    /// Every tensor: Hugging Face name, shape (outermost first), whether it is a norm.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, bool)> {
        let (d, q, kv, f) = (self.dim, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.ffn);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, d], false)];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            t.push((format!("{p}.input_layernorm.weight"), vec![d], true));
            t.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d], false));
            t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d], false));
            t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d], false));
            t.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q], false));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![d], true));
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d], false));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![f, d], false));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![d, f], false));
        }
        t.push(("model.norm.weight".to_string(), vec![d], true));
        t
    }
}

/// SplitMix64 with Box–Muller normals: small, fixed, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Two standard normals.
    fn normal_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * self.uniform();
        (r * a.cos(), r * a.sin())
    }
}

/// The element type written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// bfloat16 (what Llama 3.2 ships as).
    Bf16,
    /// f32.
    F32,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "BF16",
            Dtype::F32 => "F32",
        }
    }
}

/// A byte-level BPE `tokenizer.json` without merges: ids 0..256 are the bytes (GPT-2's byte
/// characters), the rest placeholders, the last two `<|im_start|>` / `<|im_end|>`. Enough
/// for a host to open the model and a guest to tokenize and run it (speed tests).
fn tokenizer_json(vocab: usize) -> serde_json::Value {
    let mut n = 0u32;
    let mut map = serde_json::Map::new();
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("U+0100.. are characters")
        };
        map.insert(c.to_string(), serde_json::json!(b));
    }
    for id in 256..vocab - 2 {
        map.insert(format!("<|synthetic_{id}|>"), serde_json::json!(id));
    }
    let special = |id: usize, s: &str| serde_json::json!({"id": id, "content": s, "special": true});
    serde_json::json!({
        "model": {"type": "BPE", "vocab": map, "merges": []},
        "added_tokens": [special(vocab - 2, "<|im_start|>"), special(vocab - 1, "<|im_end|>")],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
        "decoder": {"type": "ByteLevel"},
        "normalizer": null,
    })
}

/// Writes `config.json`, `tokenizer.json` and `model.safetensors` of `shape` into `out`.
pub fn write_model(out: &Path, shape: &Shape, seed: u64, dtype: Dtype) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&shape.config_json())?)?;
    std::fs::write(out.join("tokenizer.json"), serde_json::to_string(&tokenizer_json(shape.vocab))?)?;

    let tensors = shape.tensors();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, dims, _) in &tensors {
        let bytes = dims.iter().product::<usize>() * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": dims, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // Pad the header with spaces so that the data start 8-byte aligned, as the reference
    // writer does.
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(out.join("model.safetensors"))?);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    const CHUNK: usize = 1 << 16;
    let mut buf = Vec::with_capacity(CHUNK * 4);
    for (index, (_, dims, is_norm)) in tensors.iter().enumerate() {
        let mut rng = Rng(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut left = dims.iter().product::<usize>();
        while left > 0 {
            let n = left.min(CHUNK);
            buf.clear();
            let mut i = 0;
            while i < n {
                let (a, b) = if *is_norm { (1.0, 1.0) } else { rng.normal_pair() };
                for v in [a, b].into_iter().take(n - i) {
                    let v = if *is_norm { 1.0f32 } else { (v * 0.02) as f32 };
                    match dtype {
                        Dtype::Bf16 => buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                        Dtype::F32 => buf.extend_from_slice(&v.to_le_bytes()),
                    }
                }
                i += 2;
            }
            w.write_all(&buf)?;
            left -= n;
        }
    }
    w.flush()
}

/// Parses the command line (without the program name) and writes the model.
pub fn run(args: &[String]) -> Result<PathBuf, String> {
    let mut out = None;
    let mut shape = "llama-3.2-1b".to_string();
    let mut seed = 0u64;
    let mut dtype = Dtype::Bf16;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--shape" => shape = value()?,
            "--seed" => seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--dtype" => {
                dtype = match value()?.as_str() {
                    "bf16" => Dtype::Bf16,
                    "f32" => Dtype::F32,
                    d => return Err(format!("--dtype {d}: expected bf16 or f32")),
                }
            }
            "-h" | "--help" => {
                return Err(
                    "usage: synth_weights --out DIR [--shape llama-3.2-1b|heads-128|tiny] [--seed N] [--dtype bf16|f32]".into()
                );
            }
            other => return Err(format!("unknown argument {other} (see --help)")),
        }
    }
    let out = out.ok_or("--out DIR is required")?;
    let s = Shape::named(&shape)
        .ok_or_else(|| format!("unknown --shape {shape}: expected llama-3.2-1b, heads-128 or tiny"))?;
    write_model(&out, &s, seed, dtype).map_err(|e| format!("writing {}: {e}", out.display()))?;
    Ok(out)
}

#[allow(dead_code)]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(out) => println!("wrote {}", out.display()),
        Err(e) => {
            eprintln!("synth_weights: {e}");
            std::process::exit(2);
        }
    }
}
