//! Safetensors loading: a tiny random model written both as a Hugging Face directory and as
//! the equivalent GGUF must give the same logits; corrupt files must be clear errors; the
//! `synth_weights` example must write a model that loads and runs.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_engine::gguf::{GgufFile, Value};
use shoal_engine::models::{EngineError, Llama};
use shoal_engine::safetensors::{SafetensorsError, SafetensorsFile, SafetensorsModel};

#[allow(dead_code)]
#[path = "../examples/synth_weights.rs"]
mod synth_weights;

// ---------------------------------------------------------------------------------------
// Scratch directories.

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-safetensors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------
// A minimal GGUF v3 writer (as in tests/gguf.rs).

fn wire_type(v: &Value) -> u32 {
    match v {
        Value::U32(_) => 4,
        Value::F32(_) => 6,
        Value::String(_) => 8,
        _ => unreachable!("not used here"),
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::String(s) => put_str(out, s),
        _ => unreachable!("not used here"),
    }
}

/// Writes a GGUF v3 file of F32 tensors: (name, dims innermost first, values).
fn write_gguf(kvs: &[(String, Value)], tensors: &[(String, Vec<u64>, Vec<f32>)]) -> Vec<u8> {
    let alignment = 32usize;
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        out.extend_from_slice(&wire_type(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0usize;
    for (name, dims, data) in tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&0u32.to_le_bytes()); // F32
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + data.len() * 4).next_multiple_of(alignment);
    }
    for (_, _, data) in tensors {
        out.resize(out.len().next_multiple_of(alignment), 0);
        for x in data {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The tiny model.

const LAYERS: usize = 2;
const DIM: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = DIM / HEADS;
const FFN: usize = 128;
const VOCAB: usize = 300;

/// One tensor in Hugging Face terms: name, shape (outermost first), values.
struct Tensor {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

struct Tiny {
    arch: &'static str,
    tied: bool,
    tensors: Vec<Tensor>,
}

fn tiny(arch: &'static str, tied: bool, seed: u64) -> Tiny {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, norm: bool| {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| if norm { 1.0 + rng.random_range(-0.1f32..0.1) } else { rng.random_range(-0.15f32..0.15) })
            .collect();
        tensors.push(Tensor { name, shape, data });
    };
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    push("model.embed_tokens.weight".into(), vec![VOCAB, DIM], false);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        push(format!("{p}.input_layernorm.weight"), vec![DIM], true);
        push(format!("{p}.self_attn.q_proj.weight"), vec![q, DIM], false);
        push(format!("{p}.self_attn.k_proj.weight"), vec![kv, DIM], false);
        push(format!("{p}.self_attn.v_proj.weight"), vec![kv, DIM], false);
        if arch == "qwen2" {
            push(format!("{p}.self_attn.q_proj.bias"), vec![q], false);
            push(format!("{p}.self_attn.k_proj.bias"), vec![kv], false);
            push(format!("{p}.self_attn.v_proj.bias"), vec![kv], false);
        }
        push(format!("{p}.self_attn.o_proj.weight"), vec![DIM, q], false);
        push(format!("{p}.post_attention_layernorm.weight"), vec![DIM], true);
        push(format!("{p}.mlp.gate_proj.weight"), vec![FFN, DIM], false);
        push(format!("{p}.mlp.up_proj.weight"), vec![FFN, DIM], false);
        push(format!("{p}.mlp.down_proj.weight"), vec![DIM, FFN], false);
    }
    push("model.norm.weight".into(), vec![DIM], true);
    if !tied {
        push("lm_head.weight".into(), vec![VOCAB, DIM], false);
    }
    Tiny { arch, tied, tensors }
}

fn config_json(arch: &str, tied: bool) -> serde_json::Value {
    serde_json::json!({
        "model_type": arch,
        "hidden_size": DIM,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "vocab_size": VOCAB,
        "tie_word_embeddings": tied,
    })
}

#[derive(Clone, Copy)]
enum Dt {
    F32,
    F16,
    Bf16,
}

/// A safetensors file holding `tensors` (written independently of the example's writer).
fn safetensors_bytes(tensors: &[&Tensor], dt: Dt) -> Vec<u8> {
    let (name, size) = match dt {
        Dt::F32 => ("F32", 4),
        Dt::F16 => ("F16", 2),
        Dt::Bf16 => ("BF16", 2),
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut data = Vec::new();
    for t in tensors {
        let begin = data.len();
        for &x in &t.data {
            match dt {
                Dt::F32 => data.extend_from_slice(&x.to_le_bytes()),
                Dt::F16 => data.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                Dt::Bf16 => data.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
            }
        }
        assert_eq!(data.len() - begin, t.data.len() * size);
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": name, "shape": t.shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
}

/// Writes the Hugging Face directory: one file, or `shards` files and an index.
fn write_hf(dir: &Path, m: &Tiny, shards: usize, dt: Dt) {
    std::fs::write(dir.join("config.json"), config_json(m.arch, m.tied).to_string()).unwrap();
    let all: Vec<&Tensor> = m.tensors.iter().collect();
    if shards == 1 {
        std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&all, dt)).unwrap();
        return;
    }
    let per = all.len().div_ceil(shards);
    let mut map = serde_json::Map::new();
    for (i, chunk) in all.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        std::fs::write(dir.join(&file), safetensors_bytes(chunk, dt)).unwrap();
        for t in chunk {
            map.insert(t.name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// llama.cpp's `permute`: rows reshaped `[n_head, 2, head_dim / 2, in]`, axes 1 and 2
/// swapped, so that the interleaved rotation reproduces the half-split one.
fn permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for j in 0..half {
            for s in 0..2 {
                let dst = h * hd + j * 2 + s;
                let src = h * hd + s * half + j;
                out[dst * cols..][..cols].copy_from_slice(&w[src * cols..][..cols]);
            }
        }
    }
    out
}

/// The same model as a GGUF file.
fn gguf_of(m: &Tiny) -> GgufFile {
    let a = m.arch;
    let kvs = vec![
        ("general.architecture".to_string(), Value::String(a.into())),
        (format!("{a}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{a}.embedding_length"), Value::U32(DIM as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(FFN as u32)),
        (format!("{a}.attention.head_count"), Value::U32(HEADS as u32)),
        (format!("{a}.attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (format!("{a}.context_length"), Value::U32(128)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (format!("{a}.rope.freq_base"), Value::F32(10000.0)),
    ];
    let mut tensors = Vec::new();
    for t in &m.tensors {
        let name = match t.name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            n => {
                let rest = n.strip_prefix("model.layers.").unwrap();
                let (i, t) = rest.split_once('.').unwrap();
                let g = match t {
                    "input_layernorm.weight" => "attn_norm.weight",
                    "self_attn.q_proj.weight" => "attn_q.weight",
                    "self_attn.k_proj.weight" => "attn_k.weight",
                    "self_attn.v_proj.weight" => "attn_v.weight",
                    "self_attn.q_proj.bias" => "attn_q.bias",
                    "self_attn.k_proj.bias" => "attn_k.bias",
                    "self_attn.v_proj.bias" => "attn_v.bias",
                    "self_attn.o_proj.weight" => "attn_output.weight",
                    "post_attention_layernorm.weight" => "ffn_norm.weight",
                    "mlp.gate_proj.weight" => "ffn_gate.weight",
                    "mlp.up_proj.weight" => "ffn_up.weight",
                    "mlp.down_proj.weight" => "ffn_down.weight",
                    other => panic!("unexpected {other}"),
                };
                format!("blk.{i}.{g}")
            }
        };
        let cols = *t.shape.last().unwrap();
        let data = if a == "llama" && name.ends_with("attn_q.weight") {
            permute(&t.data, HEADS, cols)
        } else if a == "llama" && name.ends_with("attn_k.weight") {
            permute(&t.data, KV_HEADS, cols)
        } else {
            t.data.clone()
        };
        let dims = t.shape.iter().rev().map(|&d| d as u64).collect();
        tensors.push((name, dims, data));
    }
    GgufFile::from_bytes(write_gguf(&kvs, &tensors)).unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
    diff / norm
}

/// Logits of a prompt and of two decode steps after it.
fn run(model: &Llama) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(32).unwrap();
    let mut out = vec![model.forward(&[1, 5, 299, 42, 7, 0, 150], &mut cache).unwrap()];
    out.push(model.forward(&[17], &mut cache).unwrap());
    out.push(model.forward(&[250], &mut cache).unwrap());
    out
}

fn check_same(arch: &'static str, tied: bool, shards: usize, seed: u64) {
    let m = tiny(arch, tied, seed);
    let dir = scratch(&format!("{arch}-{tied}-{shards}"));
    write_hf(&dir, &m, shards, Dt::F32);
    let hf = Llama::from_safetensors(&dir).unwrap();
    let gg = Llama::from_gguf(&gguf_of(&m)).unwrap();
    assert_eq!(hf.config().n_layers, LAYERS);
    assert_eq!(hf.config().vocab_size, VOCAB);
    assert_eq!(hf.config().qkv_bias, arch == "qwen2");
    for (a, b) in run(&hf).iter().zip(&run(&gg)) {
        assert!(a.iter().all(|x| x.is_finite()));
        let e = rel_err(a, b);
        assert!(e < 1e-5, "{arch} tied={tied} shards={shards}: relative error {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn llama_tied_matches_gguf() {
    check_same("llama", true, 1, 1);
}

#[test]
fn llama_untied_sharded_matches_gguf() {
    check_same("llama", false, 3, 2);
}

#[test]
fn qwen2_with_biases_matches_gguf() {
    check_same("qwen2", false, 1, 3);
    check_same("qwen2", true, 2, 4);
}

#[test]
fn f16_and_bf16_convert_exactly() {
    let m = tiny("llama", true, 5);
    let t = &m.tensors[1];
    for dt in [Dt::F16, Dt::Bf16] {
        let f = SafetensorsFile::from_bytes("x", safetensors_bytes(&[t], dt)).unwrap();
        let got = f.tensor_f32(&t.name).unwrap();
        let want: Vec<f32> = match dt {
            Dt::F16 => t.data.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
            _ => t.data.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        };
        assert_eq!(got, want);
        assert_eq!(f.tensor(&t.name).unwrap().shape, vec![DIM as u64]);
        assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    }
    // A whole bf16 model loads and runs close to its f32 original.
    let dir = scratch("bf16");
    write_hf(&dir, &m, 1, Dt::Bf16);
    let model = Llama::from_safetensors(&dir).unwrap();
    let logits = run(&model);
    assert!(logits.iter().flatten().all(|x| x.is_finite()));
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// Corrupt files.

fn small_file() -> Vec<u8> {
    let t = Tensor { name: "w".into(), shape: vec![3, 5], data: (0..15).map(|i| i as f32).collect() };
    let u = Tensor { name: "b".into(), shape: vec![4], data: vec![1.0; 4] };
    safetensors_bytes(&[&t, &u], Dt::F32)
}

fn with_header(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

#[test]
fn every_truncation_is_an_error() {
    let full = small_file();
    let f = SafetensorsFile::from_bytes("ok", full.clone()).unwrap();
    assert_eq!(f.tensor_f32("w").unwrap(), (0..15).map(|i| i as f32).collect::<Vec<_>>());
    for cut in 0..full.len() {
        let err = SafetensorsFile::from_bytes("cut", full[..cut].to_vec()).unwrap_err();
        assert!(
            matches!(err, SafetensorsError::Truncated { .. } | SafetensorsError::Corrupt { .. }),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn corrupt_headers_are_errors() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("huge header length", {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        ("header longer than file", {
            let mut b = 1000u64.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        ("not json", with_header("{not json", 0)),
        ("not an object", with_header("[1, 2]", 0)),
        ("no dtype", with_header(r#"{"w": {"shape": [2], "data_offsets": [0, 8]}}"#, 8)),
        ("bad shape", with_header(r#"{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}"#, 8)),
        ("one offset", with_header(r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}"#, 8)),
        ("reversed offsets", with_header(r#"{"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}"#, 8)),
        ("size mismatch", with_header(r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#, 8)),
        ("past the end", with_header(r#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#, 8)),
        (
            "huge offsets",
            with_header(
                r#"{"w": {"dtype": "U8", "shape": [8], "data_offsets": [18446744073709551600, 18446744073709551608]}}"#,
                8,
            ),
        ),
        (
            "overflowing shape",
            with_header(r#"{"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}}"#, 8),
        ),
        ("unknown dtype", with_header(r#"{"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}"#, 8)),
        ("bad metadata", with_header(r#"{"__metadata__": {"a": 1}}"#, 0)),
    ];
    for (what, bytes) in cases {
        match SafetensorsFile::from_bytes(what, bytes) {
            Err(SafetensorsError::Truncated { .. } | SafetensorsError::Corrupt { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    // A dtype with a known size parses, but is not converted.
    let f = SafetensorsFile::from_bytes(
        "i64",
        with_header(r#"{"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}"#, 8),
    )
    .unwrap();
    assert!(matches!(f.tensor_f32("w"), Err(SafetensorsError::UnsupportedDtype { .. })));
    assert!(matches!(f.tensor_f32("nope"), Err(SafetensorsError::MissingTensor(_))));
}

#[test]
fn model_directory_errors() {
    let m = tiny("llama", false, 6);
    // No files at all.
    let dir = scratch("empty");
    assert!(matches!(Llama::from_safetensors(&dir), Err(EngineError::Safetensors(SafetensorsError::Io { .. }))));
    // A truncated weight file.
    write_hf(&dir, &m, 1, Dt::F32);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    assert!(matches!(Llama::from_safetensors(&dir), Err(EngineError::Safetensors(SafetensorsError::Truncated { .. }))));
    // A missing tensor.
    let some: Vec<&Tensor> = m.tensors.iter().filter(|t| !t.name.contains("layers.1.mlp.up_proj")).collect();
    std::fs::write(&path, safetensors_bytes(&some, Dt::F32)).unwrap();
    match Llama::from_safetensors(&dir) {
        Err(EngineError::MissingTensor { name, .. }) => assert_eq!(name, "blk.1.ffn_up.weight"),
        other => panic!("{other:?}"),
    }
    // A config that does not match the weights.
    write_hf(&dir, &m, 1, Dt::F32);
    let mut c = config_json("llama", false);
    c["intermediate_size"] = 96.into();
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    assert!(matches!(Llama::from_safetensors(&dir), Err(EngineError::TensorShape { .. })));
    // Config errors.
    let mut c = config_json("llama", false);
    c["model_type"] = "gpt2".into();
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    assert!(matches!(Llama::from_safetensors(&dir), Err(EngineError::UnsupportedArchitecture { .. })));
    let mut c = config_json("llama", false);
    c.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    match Llama::from_safetensors(&dir) {
        Err(EngineError::InvalidConfig { key, .. }) => assert_eq!(key, "hidden_size"),
        other => panic!("{other:?}"),
    }
    std::fs::write(dir.join("config.json"), "{").unwrap();
    assert!(matches!(Llama::from_safetensors(&dir), Err(EngineError::Safetensors(SafetensorsError::Corrupt { .. }))));
    std::fs::remove_dir_all(&dir).unwrap();

    // A sharded directory whose index names a missing shard or a path outside it.
    let dir = scratch("shards");
    write_hf(&dir, &m, 2, Dt::F32);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert!(matches!(SafetensorsModel::open_dir(&dir), Err(SafetensorsError::Io { .. })));
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "../model.safetensors"}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert!(matches!(SafetensorsModel::open_dir(&dir), Err(SafetensorsError::Corrupt { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn llama3_rope_scaling_is_read() {
    let m = tiny("llama", true, 7);
    let dir = scratch("scaling");
    write_hf(&dir, &m, 1, Dt::F32);
    let plain = run(&Llama::from_safetensors(&dir).unwrap());
    let mut c = config_json("llama", true);
    c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let scaled = run(&Llama::from_safetensors(&dir).unwrap());
    // The first position is not rotated; later ones are, differently.
    assert!(rel_err(&scaled[2], &plain[2]) > 1e-4);
    c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    assert!(matches!(Llama::from_safetensors(&dir), Err(EngineError::InvalidConfig { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// The synth_weights example.

#[test]
fn synth_weights_tiny_loads_and_runs() {
    let dir = scratch("synth");
    let args: Vec<String> = ["--out", dir.to_str().unwrap(), "--shape", "tiny", "--seed", "7", "--dtype", "bf16"]
        .map(String::from)
        .to_vec();
    synth_weights::run(&args).unwrap();
    let model = Llama::from_safetensors(&dir).unwrap();
    let c = model.config();
    assert_eq!((c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size), (2, 64, 4, 2, 128, 300));
    let logits = run(&model);
    assert!(logits.iter().flatten().all(|x| x.is_finite()));
    assert!(logits[0].iter().any(|&x| x != 0.0));
    let first = std::fs::read(dir.join("model.safetensors")).unwrap();

    // The same arguments write the same bytes; another seed other ones.
    synth_weights::run(&args).unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), first);
    let mut other = args.clone();
    other[5] = "8".into();
    synth_weights::run(&other).unwrap();
    assert_ne!(std::fs::read(dir.join("model.safetensors")).unwrap(), first);

    // f32 too; the norms are 1 and the weights about 0.02 wide.
    let f32_args: Vec<String> =
        ["--out", dir.to_str().unwrap(), "--shape", "tiny", "--dtype", "f32"].map(String::from).to_vec();
    synth_weights::run(&f32_args).unwrap();
    let st = SafetensorsModel::open_dir(&dir).unwrap();
    assert!(st.tensor_f32("model.norm.weight").unwrap().iter().all(|&x| x == 1.0));
    let w = st.tensor_f32("model.layers.0.mlp.up_proj.weight").unwrap();
    let sd = (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    assert!((0.018..0.022).contains(&sd), "{sd}");
    Llama::from_safetensors(&dir).unwrap();

    assert!(synth_weights::run(&["--shape".into(), "tiny".into()]).is_err());
    assert!(synth_weights::run(&["--out".into(), "x".into(), "--shape".into(), "huge".into()]).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// Hostile files: refused before they allocate, and described without being quoted.

/// An error message is short and printable, whatever the file held.
fn assert_described(err: &SafetensorsError) -> String {
    let msg = err.to_string();
    assert!(msg.len() <= 1024, "{} bytes: {}", msg.len(), msg.chars().take(300).collect::<String>());
    assert!(!msg.chars().any(char::is_control), "{msg:?}");
    msg
}

#[test]
fn json_that_would_parse_into_gigabytes_is_refused_before_it_is_parsed() {
    // 16 MiB of `0,` were 8 Mi `serde_json::Value`s of 32 bytes, in a Vec up to twice that.
    let mut header = String::from(r#"{"a":["#);
    header.push_str(&"0,".repeat(8 << 20));
    header.push_str("0]}");
    let err = SafetensorsFile::from_bytes("zeros", with_header(&header, 0)).unwrap_err();
    assert!(matches!(err, SafetensorsError::Corrupt { .. }), "{err}");
    let msg = assert_described(&err);
    assert!(msg.contains("8388611 values") && msg.contains("would take about"), "{msg}");
    // 7 bytes of `{"":0},` were a B-tree node of some 640 bytes.
    let mut header = String::from(r#"{"a":["#);
    header.push_str(&r#"{"":0},"#.repeat(1 << 20));
    header.push_str("{}]}");
    let msg = assert_described(&SafetensorsFile::from_bytes("objects", with_header(&header, 0)).unwrap_err());
    assert!(msg.contains("1048578 objects"), "{msg}");
    // Not an object: refused before anything is parsed.
    let msg = assert_described(&SafetensorsFile::from_bytes("array", with_header(" [0, 0]", 0)).unwrap_err());
    assert!(msg.contains("not a JSON object"), "{msg}");
    // Braces and quotes inside strings are not structure.
    let header = format!(r#"{{"__metadata__": {{"k": "{}"}}}}"#, r#"[{\"\\:,"#.repeat(1 << 20));
    let f = SafetensorsFile::from_bytes("strings", with_header(&header, 0)).unwrap();
    assert_eq!(f.metadata()["k"].len(), 6 << 20);
}

#[test]
fn names_dtypes_and_shapes_are_escaped_and_cut_in_errors() {
    // The report: 290 KB of binary printed by one error. A name of terminal escapes:
    let name = r"\u001b[2J\u001b]0;owned\u0007\r\n".repeat(10_000);
    let entry = |dtype: &str, shape: &str, offsets: &str| {
        format!(r#"{{"{name}": {{"dtype": "{dtype}", "shape": [{shape}], "data_offsets": [{offsets}]}}}}"#)
    };
    let long_dtype = r"Q\u001b\u0000".repeat(20_000);
    let wide = vec!["3"; 100_000].join(",");
    let ones = vec!["1"; 100_000].join(",");
    let cases: Vec<(&str, String, usize)> = vec![
        ("no dtype", format!(r#"{{"{name}": {{"shape": [2]}}}}"#), 0),
        ("unknown dtype", entry(&long_dtype, "2", "0, 8"), 8),
        ("overflowing shape", entry("F32", &wide, "0, 8"), 8),
        ("size mismatch", entry("F32", &ones, "0, 8"), 8),
        ("past the end", entry("F32", "4", "0, 16"), 8),
        ("metadata not a string", format!(r#"{{"__metadata__": {{"{name}": 1}}}}"#), 0),
    ];
    let mut errors: Vec<(&str, SafetensorsError)> = cases
        .into_iter()
        .map(|(what, header, data)| (what, SafetensorsFile::from_bytes(what, with_header(&header, data)).unwrap_err()))
        .collect();
    // A dtype that parses but is not converted, and a missing tensor, asked by that name.
    let f = SafetensorsFile::from_bytes("i64", with_header(&entry("I64", "1", "0, 8"), 8)).unwrap();
    let real_name = f.tensors().keys().next().unwrap().clone();
    errors.push(("unsupported dtype", f.tensor_f32(&real_name).unwrap_err()));
    errors.push(("missing tensor", f.tensor_f32(&format!("{real_name}x")).unwrap_err()));
    for (what, err) in &errors {
        let msg = assert_described(err);
        println!("{what}: {msg}");
        assert!(msg.len() < 400, "{what}: {msg}");
    }
    let msg = errors[0].1.to_string();
    assert!(msg.contains(r"\u{1b}[2J\u{1b}]0;owned\u{7}\r\n") && msg.contains("…(160000 bytes)"), "{msg}");
    assert!(errors[2].1.to_string().contains("3, …(100000 dimensions)]"), "{}", errors[2].1);
    let Err(SafetensorsError::UnsupportedDtype { tensor, .. }) = f.tensor_f32(&real_name) else { panic!() };
    assert!(tensor.ends_with("…(160000 bytes)"), "{tensor}");
}

#[test]
fn an_index_too_large_or_naming_odd_files_is_refused_briefly() {
    let dir = scratch("hostile-index");
    let index = dir.join("model.safetensors.index.json");
    // Larger than a header may be: refused by its size, unread (the file is sparse).
    std::fs::File::create(&index).unwrap().set_len(100 * 1024 * 1024 + 1).unwrap();
    let msg = assert_described(&SafetensorsModel::open_dir(&dir).unwrap_err());
    assert!(msg.contains("104857601 bytes"), "{msg}");
    // A long name of control characters, naming a path outside the directory.
    let name = "\u{1b}[2J\n".repeat(20_000);
    for file in ["../model.safetensors".to_string(), format!("{name}/x")] {
        let json = serde_json::json!({"weight_map": {name.clone(): file}});
        std::fs::write(&index, json.to_string()).unwrap();
        let err = SafetensorsModel::open_dir(&dir).unwrap_err();
        assert!(matches!(err, SafetensorsError::Corrupt { .. }), "{err}");
        let msg = assert_described(&err);
        assert!(msg.len() < 600 && msg.contains("…(100000 bytes)"), "{msg}");
    }
    // An index naming half a million different files is refused quickly by the first of them
    // (the names were once deduplicated by a scan of a list: a trillion comparisons).
    let map: serde_json::Map<String, serde_json::Value> =
        (0..500_000).map(|i| (format!("t{i}"), format!("f{i}.safetensors").into())).collect();
    std::fs::write(&index, serde_json::json!({ "weight_map": map }).to_string()).unwrap();
    let start = std::time::Instant::now();
    assert!(matches!(SafetensorsModel::open_dir(&dir), Err(SafetensorsError::Io { .. })));
    assert!(start.elapsed().as_secs() < 20, "{:?}", start.elapsed());
    std::fs::remove_dir_all(&dir).unwrap();
}
