//! The Llama forward pass against SmolLM2-135M-Instruct, and the CPU kernels it is built on
//! against naive f64 versions.
//!
//! The model tests need `models/SmolLM2-135M-Instruct.Q4_1.gguf` (`scripts/fetch-model.sh`)
//! and skip with a message where it is missing.

use std::path::PathBuf;
use std::sync::OnceLock;

use shoal_engine::cpu::{
    AttentionShape, RopeStyle, attention, matmul_t, rmsnorm, rope, rope_inv_freq, softmax, swiglu,
};
use shoal_engine::gguf::GgufFile;
use shoal_engine::kv::KvError;
use shoal_engine::models::{EngineError, GenerateConfig, Llama, LlamaConfig, StopReason, generate};
use shoal_engine::sampler::Sampler;
use shoal_engine::template::{self, ChatTemplate, Message};
use shoal_engine::tokenizer::Tokenizer;

// ---------------------------------------------------------------------------------------------
// The model

struct Loaded {
    model: Llama,
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

/// The model, loaded once for every test; `None` (and a message) when the file is missing.
fn smollm2() -> Option<&'static Loaded> {
    static MODEL: OnceLock<Option<Loaded>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
            if !path.exists() {
                return None;
            }
            let file = GgufFile::open(&path).expect("open the model");
            let start = std::time::Instant::now();
            let model = Llama::from_gguf(&file).expect("load the model");
            eprintln!("loaded {:?} in {:.2?}", model, start.elapsed());
            let tokenizer = Tokenizer::from_gguf(&file).expect("load the tokenizer");
            let jinja = file.get_str("tokenizer.chat_template").expect("the file has a chat template");
            let template = template::detect(jinja).expect("a known chat template");
            Some(Loaded { model, tokenizer, template })
        })
        .as_ref()
        .or_else(|| {
            println!("skipping: run scripts/fetch-model.sh");
            None
        })
}

#[test]
fn smollm2_config_is_read_from_the_file() {
    let Some(m) = smollm2() else { return };
    let c = m.model.config();
    assert_eq!(c.arch, "llama");
    assert_eq!((c.n_layers, c.dim, c.ffn_dim), (30, 576, 1536));
    assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim, c.rope_dim), (9, 3, 64, 64));
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_style, RopeStyle::Interleaved);
    assert!(!c.qkv_bias);
}

#[test]
fn smollm2_answers_the_capital_of_france() {
    let Some(m) = smollm2() else { return };
    let prompt = m.template.render(&[Message::new("user", "What is the capital of France?")], true).unwrap();
    let tokens = m.tokenizer.encode(&prompt, true);
    let im_end = m.tokenizer.token_id("<|im_end|>").expect("<|im_end|> is a token");
    let mut cache = m.model.new_cache(512).unwrap();
    let config =
        GenerateConfig { max_new_tokens: 24, sampler: Sampler::greedy(), stop: vec![im_end], repeat_last_n: 64 };
    let mut streamed = String::new();
    let out =
        generate(&m.model, &m.tokenizer, &mut cache, &tokens, &config, |_, piece| streamed.push_str(piece)).unwrap();
    let answer = m.tokenizer.decode(&out.tokens);
    println!("prompt: {} tokens; answer ({} tokens, {:?}): {answer:?}", tokens.len(), out.tokens.len(), out.reason);
    println!(
        "prefill {:.2?} ({:.1} tokens/s); decode {} steps in {:.2?} ({:.1} tokens/s) on {} threads",
        out.prefill_time,
        tokens.len() as f64 / out.prefill_time.as_secs_f64(),
        out.decode_steps,
        out.decode_time,
        out.decode_tokens_per_sec(),
        rayon::current_num_threads(),
    );
    assert_eq!(streamed, answer, "the streamed pieces add up to the answer");
    assert!(answer.contains("Paris"), "answer: {answer:?}");
    assert_eq!(out.reason, StopReason::Stop(im_end), "the answer ends with <|im_end|>: {answer:?}");
    assert_eq!(cache.len(), tokens.len() + out.tokens.len());
}

#[test]
fn batched_prefill_matches_token_by_token() {
    let Some(m) = smollm2() else { return };
    let tokens = m.tokenizer.encode("The quick brown fox jumps over the lazy dog. It", false);
    let mut batched = m.model.new_cache(64).unwrap();
    let a = m.model.forward(&tokens, &mut batched).unwrap();
    let mut single = m.model.new_cache(64).unwrap();
    let mut b = Vec::new();
    for &t in &tokens {
        b = m.model.forward(&[t], &mut single).unwrap();
    }
    // Split prefill: a prompt, then a continuation that attends to the cached prompt.
    let mut split = m.model.new_cache(64).unwrap();
    m.model.forward(&tokens[..4], &mut split).unwrap();
    let c = m.model.forward(&tokens[4..], &mut split).unwrap();
    assert_eq!(a.len(), 49152);
    let scale = a.iter().fold(0.0f32, |s, v| s.max(v.abs()));
    for other in [&b, &c] {
        let diff = a.iter().zip(other).fold(0.0f32, |d, (x, y)| d.max((x - y).abs()));
        assert!(diff <= 1e-3 * scale, "max difference {diff} (logit scale {scale})");
    }
    let argmax = |l: &[f32]| Sampler::greedy().sample(l, &[], 0).unwrap();
    assert_eq!(argmax(&a), argmax(&b));
    assert_eq!(batched.len(), tokens.len());
    assert_eq!(single.len(), tokens.len());
}

#[test]
fn kv_cache_overflow_and_bad_input_are_errors() {
    let Some(m) = smollm2() else { return };
    let mut cache = m.model.new_cache(4).unwrap();
    let err = m.model.forward(&[1, 2, 3, 4, 5], &mut cache).unwrap_err();
    assert!(matches!(err, EngineError::Kv(KvError::ContextFull { len: 0, adding: 5, capacity: 4 })), "{err}");
    assert!(cache.is_empty(), "a failed call leaves the cache alone");
    m.model.forward(&[1, 2, 3], &mut cache).unwrap();
    assert!(matches!(m.model.forward(&[4, 5], &mut cache), Err(EngineError::Kv(KvError::ContextFull { .. }))));
    assert_eq!(cache.len(), 3);
    m.model.forward(&[4], &mut cache).unwrap();
    cache.truncate(2);
    m.model.forward(&[3, 4], &mut cache).unwrap();

    let max = m.model.config().context_length;
    let err = m.model.new_cache(max + 1).unwrap_err();
    assert!(matches!(err, EngineError::ContextTooLong { .. }), "{err}");
    assert!(matches!(m.model.new_cache(0), Err(EngineError::Kv(KvError::EmptyContext))));

    let mut cache = m.model.new_cache(8).unwrap();
    assert!(matches!(m.model.forward(&[], &mut cache), Err(EngineError::EmptyInput)));
    let err = m.model.forward(&[1, 49152], &mut cache).unwrap_err();
    assert!(matches!(err, EngineError::TokenOutOfRange { id: 49152, vocab: 49152 }), "{err}");
    let mut wrong = shoal_engine::kv::KvCache::new(2, 192, 8).unwrap();
    assert!(matches!(m.model.forward(&[1], &mut wrong), Err(EngineError::CacheMismatch { .. })));

    // A prompt longer than the context is an error from generate too.
    let err = generate(&m.model, &m.tokenizer, &mut cache, &[1; 9], &GenerateConfig::default(), |_, _| {}).unwrap_err();
    assert!(matches!(err, EngineError::Kv(KvError::ContextFull { .. })), "{err}");
    // Running out of room while generating ends the generation.
    let out = generate(&m.model, &m.tokenizer, &mut cache, &[1; 6], &GenerateConfig::default(), |_, _| {}).unwrap();
    assert_eq!(out.reason, StopReason::ContextFull);
    assert_eq!(out.tokens.len(), 3);
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let Some(m) = smollm2() else { return };
    let tokens = m.tokenizer.encode("Once upon a time", false);
    let sampler = Sampler { temperature: 0.8, top_k: 40, top_p: 0.95, repetition_penalty: 1.1, seed: 1234 };
    let config = GenerateConfig { max_new_tokens: 8, sampler, ..GenerateConfig::default() };
    let run = || {
        let mut cache = m.model.new_cache(64).unwrap();
        generate(&m.model, &m.tokenizer, &mut cache, &tokens, &config, |_, _| {}).unwrap().tokens
    };
    assert_eq!(run(), run());
}

// ---------------------------------------------------------------------------------------------
// Model files of other architectures

/// A GGUF v3 file with the given string metadata and no tensors.
fn gguf_with_strings(kvs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    for (k, v) in kvs {
        string(&mut b, k);
        b.extend_from_slice(&8u32.to_le_bytes());
        string(&mut b, v);
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    let file = GgufFile::from_bytes(gguf_with_strings(&[("general.architecture", "gpt2")])).unwrap();
    let err = LlamaConfig::from_gguf(&file).unwrap_err();
    assert!(matches!(&err, EngineError::UnsupportedArchitecture { found, .. } if found == "gpt2"), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`gpt2`") && msg.contains("llama") && msg.contains("qwen2"), "{msg}");
    assert!(Llama::from_gguf(&file).is_err());
}

#[test]
fn missing_hyperparameter_names_the_key() {
    let file = GgufFile::from_bytes(gguf_with_strings(&[("general.architecture", "qwen2")])).unwrap();
    let msg = LlamaConfig::from_gguf(&file).unwrap_err().to_string();
    assert!(msg.contains("qwen2.block_count"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// CPU kernels against naive f64 versions

/// Deterministic test data in [-1, 1) (xorshift).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn assert_close(a: &[f32], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!((x as f64 - y).abs() <= tol * (1.0 + y.abs()), "index {i}: {x} vs {y}");
    }
}
#[test]
fn matmul_matches_naive() {
    for &(m, k, n) in &[(1, 576, 1536), (7, 64, 33), (1, 3, 5), (40, 96, 130)] {
        let x = data(m * k, 1);
        let w = data(n * k, 2);
        let init = data(m * n, 3);
        let mut naive = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                naive[i * n + j] = (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l] as f64).sum();
            }
        }
        let mut out = vec![f32::NAN; m * n];
        matmul_t(&mut out, &x, &w, m, k, n, false);
        assert_close(&out, &naive, 1e-4);
        let mut acc = init.clone();
        matmul_t(&mut acc, &x, &w, m, k, n, true);
        let want: Vec<f64> = naive.iter().zip(&init).map(|(a, &b)| a + b as f64).collect();
        assert_close(&acc, &want, 1e-4);
    }
}

#[test]
fn rmsnorm_matches_naive() {
    let d = 576;
    let x = data(3 * d, 4);
    let w = data(d, 5);
    let mut out = vec![0.0; 3 * d];
    rmsnorm(&mut out, &x, &w, 1e-5);
    let mut want = vec![0.0f64; 3 * d];
    for r in 0..3 {
        let row = &x[r * d..][..d];
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
        let s = 1.0 / (ms + 1e-5).sqrt();
        for i in 0..d {
            want[r * d + i] = row[i] as f64 * s * w[i] as f64;
        }
    }
    assert_close(&out, &want, 1e-5);
}

#[test]
fn softmax_matches_naive() {
    let mut x: Vec<f32> = data(100, 6).iter().map(|v| v * 30.0).collect();
    let max = x.iter().copied().fold(f64::MIN, |a, b| a.max(b as f64));
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    let want: Vec<f64> = e.iter().map(|v| v / sum).collect();
    softmax(&mut x);
    assert_close(&x, &want, 1e-5);
    let mut inf = vec![f32::NEG_INFINITY; 4];
    softmax(&mut inf);
    assert_eq!(inf, vec![0.25; 4]);
    let mut masked = vec![1.0, f32::NEG_INFINITY];
    softmax(&mut masked);
    assert_eq!(masked, vec![1.0, 0.0]);
}

fn rope_naive(x: &[f32], n_heads: usize, hd: usize, rot: usize, pos0: usize, base: f64, neox: bool) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let row = n_heads * hd;
    for (t, r) in out.chunks_mut(row).enumerate() {
        let p = (pos0 + t) as f64;
        for h in r.chunks_mut(hd) {
            for i in 0..rot / 2 {
                let theta = p * base.powf(-2.0 * i as f64 / rot as f64);
                let (a, b) = if neox { (i, i + rot / 2) } else { (2 * i, 2 * i + 1) };
                let (x0, x1) = (h[a], h[b]);
                h[a] = x0 * theta.cos() - x1 * theta.sin();
                h[b] = x0 * theta.sin() + x1 * theta.cos();
            }
        }
    }
    out
}

#[test]
fn rope_matches_naive() {
    for (style, neox) in [(RopeStyle::Interleaved, false), (RopeStyle::Neox, true)] {
        for &(n_heads, hd, rot, pos0, t) in &[(3, 64, 64, 0, 5), (2, 16, 8, 1000, 3), (9, 64, 64, 7, 60)] {
            let x = data(t * n_heads * hd, 7);
            let mut y = x.clone();
            rope(&mut y, n_heads, hd, pos0, &rope_inv_freq(rot, 10000.0, None), style);
            assert_close(&y, &rope_naive(&x, n_heads, hd, rot, pos0, 10000.0, neox), 1e-5);
        }
    }
}

#[test]
fn attention_matches_naive() {
    let (n_heads, n_kv, hd, pos0, t) = (6, 2, 16, 5, 4);
    let n_ctx = pos0 + t;
    let q = data(t * n_heads * hd, 8);
    let k = data(n_ctx * n_kv * hd, 9);
    let v = data(n_ctx * n_kv * hd, 10);
    let mut out = vec![0.0; t * n_heads * hd];
    let shape = AttentionShape { n_tokens: t, pos0, n_heads, n_kv_heads: n_kv, head_dim: hd };
    attention(&mut out, &q, &k, &v, shape);
    let mut want = vec![0.0f64; out.len()];
    for ti in 0..t {
        for h in 0..n_heads {
            let kh = h / (n_heads / n_kv);
            let qv = &q[(ti * n_heads + h) * hd..][..hd];
            let s: Vec<f64> = (0..=pos0 + ti)
                .map(|p| {
                    (0..hd).map(|i| qv[i] as f64 * k[(p * n_kv + kh) * hd + i] as f64).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().copied().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for i in 0..hd {
                want[(ti * n_heads + h) * hd + i] =
                    e.iter().enumerate().map(|(p, w)| w / z * v[(p * n_kv + kh) * hd + i] as f64).sum();
            }
        }
    }
    assert_close(&out, &want, 1e-5);
}

#[test]
fn swiglu_matches_naive() {
    let mut g = data(50, 11);
    let u = data(50, 12);
    let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64).collect();
    swiglu(&mut g, &u);
    assert_close(&g, &want, 1e-6);
}

#[test]
fn hidden_states_fill_the_cache_as_forward_does() {
    let Some(m) = smollm2() else {
        eprintln!("skipping: no SmolLM2 model (scripts/fetch-model.sh)");
        return;
    };
    let ids = m.tokenizer.encode("The quick brown fox", false);
    let mut a = m.model.new_cache(32).unwrap();
    let mut b = m.model.new_cache(32).unwrap();
    let h = m.model.hidden(&ids, &mut a).unwrap();
    assert_eq!(h.len(), m.model.config().dim);
    assert!(h.iter().all(|v| v.is_finite()) && h.iter().any(|&v| v != 0.0));
    m.model.forward(&ids, &mut b).unwrap();
    assert_eq!(a.len(), b.len());
    // The next step sees the same cache either way.
    assert_eq!(m.model.forward(&[11], &mut a).unwrap(), m.model.forward(&[11], &mut b).unwrap());
    let mut c = m.model.new_cache(32).unwrap();
    assert_eq!(m.model.hidden(&ids, &mut c).unwrap(), h);
}

#[test]
fn a_cache_snapshot_round_trips_through_a_file_and_continues_exactly() {
    use shoal_engine::kv::KvSnapshot;
    let Some(m) = smollm2() else {
        eprintln!("skipping: no SmolLM2 model (scripts/fetch-model.sh)");
        return;
    };
    let ids = m.tokenizer.encode("<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n", true);
    let mut a = m.model.new_cache(128).unwrap();
    m.model.forward(&ids, &mut a).unwrap();
    let snap = m.model.export_cache(&a).unwrap();
    assert_eq!((snap.len, snap.n_layers, snap.kv_dim), (ids.len(), 30, 192));
    let dir = std::env::temp_dir().join(format!("shoal-kv-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kv.safetensors");
    snap.write(&path).unwrap();
    let back = KvSnapshot::read(&path).unwrap();
    assert_eq!(back, snap);
    let mut b = m.model.import_cache(&back, 128).unwrap();
    let greedy = Sampler::greedy();
    let (mut x, mut y) = (11u32, 11u32);
    for step in 0..16 {
        x = m.model.forward_sample(&[x], &mut a, &greedy, &[], step).unwrap();
        y = m.model.forward_sample(&[y], &mut b, &greedy, &[], step).unwrap();
        assert_eq!(x, y, "step {step}");
    }

    // Refused: truncated, another format, another version, another model's shape, a
    // context too small.
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, &bytes[..bytes.len() - 100]).unwrap();
    assert!(KvSnapshot::read(&bad).unwrap_err().to_string().contains("truncated"));
    for (from, to, expect) in [
        ("shoal-kv-cache", "shoal-kv-cachX", "not a shoal KV cache"),
        ("\"version\":\"1\"", "\"version\":\"2\"", "version"),
    ] {
        let mut b2 = bytes.clone();
        let at = bytes.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
        b2[at..at + to.len()].copy_from_slice(to.as_bytes());
        std::fs::write(&bad, &b2).unwrap();
        let e = KvSnapshot::read(&bad).unwrap_err().to_string();
        assert!(e.contains(expect), "{e}");
    }
    let mut other = snap.clone();
    other.n_layers = 29;
    assert!(m.model.import_cache(&other, 128).unwrap_err().to_string().contains("does not fit"));
    assert!(m.model.import_cache(&snap, ids.len() - 1).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
