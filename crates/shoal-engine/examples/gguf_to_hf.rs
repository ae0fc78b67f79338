//! Writes a Llama-family GGUF model as a Hugging Face directory (`config.json` and a bf16
//! `model.safetensors`), so that an independent implementation (`transformers`) can run the
//! very weights shoal runs: quantized tensors are dequantized as shoal dequantizes them, and
//! the Q/K rows that GGUF `llama` files permute for the interleaved RoPE are put back in
//! Hugging Face order.
//!
//! `cargo run --release -p shoal-engine --example gguf_to_hf -- MODEL.gguf OUT_DIR`

use std::io::Write;
use std::path::PathBuf;

use shoal_engine::cpu::RopeStyle;
use shoal_engine::gguf::GgufFile;
use shoal_engine::models::LlamaConfig;
use shoal_engine::models::llama::hf_tensor_name;

/// Hugging Face rows of one head from GGUF's interleaved order: `hf[s * half + j] =
/// gguf[2 j + s]`.
fn unpermute(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let (dst, src) = (h * hd + s * half + j, h * hd + 2 * j + s);
                out[dst * cols..][..cols].copy_from_slice(&w[src * cols..][..cols]);
            }
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, out] = args.as_slice() else {
        eprintln!("usage: gguf_to_hf MODEL.gguf OUT_DIR");
        std::process::exit(2);
    };
    let out = PathBuf::from(out);
    let file = GgufFile::open(model.as_ref()).unwrap_or_else(|e| panic!("{e}"));
    let c = LlamaConfig::from_gguf(&file).unwrap_or_else(|e| panic!("{e}"));
    let tied = file.tensor("output.weight").is_none();
    std::fs::create_dir_all(&out).expect("create OUT_DIR");
    let config = serde_json::json!({
        "architectures": [if c.arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if c.arch == "qwen2" { "qwen2" } else { "llama" },
        "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "num_hidden_layers": c.n_layers, "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_base, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length, "tie_word_embeddings": tied,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "attention_bias": c.qkv_bias,
    });
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).expect("write config");

    let mut tensors = Vec::new();
    for info in &file.tensors {
        let Some(name) = hf_tensor_name(&info.name) else { continue };
        let mut data = file.tensor_f32(&info.name).unwrap_or_else(|e| panic!("{e}"));
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        if c.rope_style == RopeStyle::Interleaved {
            let cols = *shape.last().unwrap();
            if info.name.ends_with("attn_q.weight") {
                data = unpermute(&data, c.n_heads, cols);
            } else if info.name.ends_with("attn_k.weight") {
                data = unpermute(&data, c.n_kv_heads, cols);
            }
        }
        let bytes: Vec<u8> = data.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect();
        tensors.push((name, shape, bytes));
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape, bytes) in &tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(out.join("model.safetensors")).expect("create"));
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&header).unwrap();
    for (_, _, bytes) in &tensors {
        f.write_all(bytes).unwrap();
    }
    f.flush().unwrap();
    println!("wrote {} ({} tensors, {offset} bytes of weights)", out.display(), tensors.len());
}
