//! Prefill and decode speed of shoal's engine called natively (no Wasm), batch 1.
//!
//! `cargo bench -p shoal-engine --bench generate -- --model PATH [--backend cpu|cuda]
//!  [--prompt 128] [--gen 128] [--repeat 5]`
//!
//! PATH is a `.gguf` file or a Hugging Face directory. The prompt is `--prompt` fixed
//! pseudo-random token ids; decoding is greedy for `--gen` tokens (stop tokens ignored),
//! through `forward_sample` (sampling on the backend). Each repeat uses a fresh session
//! after one warm-up; the line printed holds the medians and every run, plus the bytes of
//! weights one decode step reads (for a roofline). After each prefill, the prompt's cache is
//! parked and unparked (`park_ms`, `unpark_ms`: what pausing and resuming an actor does to
//! its caches; on CUDA a DMA to and from pinned host memory of `kv_bytes`).

use std::path::PathBuf;
use std::time::Instant;

use shoal_engine::gguf::GgufFile;
use shoal_engine::models::{EngineKind, Model};
use shoal_engine::sampler::Sampler;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut model_path = None;
    let mut kind = EngineKind::Cpu;
    let (mut prompt, mut gen_n, mut repeat) = (128usize, 128usize, 5usize);
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--model" => model_path = Some(PathBuf::from(v())),
            "--backend" => {
                kind = match v().as_str() {
                    "cpu" => EngineKind::Cpu,
                    "cuda" => EngineKind::Cuda,
                    o => panic!("unknown backend {o}"),
                }
            }
            "--prompt" => prompt = v().parse().expect("--prompt N"),
            "--gen" => gen_n = v().parse().expect("--gen N"),
            "--repeat" => repeat = v().parse().expect("--repeat N"),
            _ => panic!("unknown argument {a}"),
        }
    }
    let Some(path) = model_path else {
        eprintln!("generate bench: no --model given; nothing to measure");
        return;
    };
    let t0 = Instant::now();
    let model = if path.extension().is_some_and(|e| e == "gguf") {
        Model::load_gguf(&GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}")), kind)
    } else {
        Model::load_safetensors(&path, kind)
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let load_s = t0.elapsed().as_secs_f64();
    let c = model.config().clone();
    let tokens: Vec<u32> =
        (0..prompt).map(|i| ((i as u64 * 2_654_435_761 + 17) % (c.vocab_size as u64 - 1)) as u32 + 1).collect();
    let per_layer = c.dim * c.q_dim() + 2 * c.dim * c.kv_dim() + c.q_dim() * c.dim + 3 * c.dim * c.ffn_dim;
    let params_read = c.n_layers * per_layer + c.vocab_size * c.dim;
    let bytes_per_param = if kind == EngineKind::Cpu { 4 } else { 2 };
    let greedy = Sampler::greedy();
    let (mut pre, mut dec, mut park, mut unpark) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut kv_bytes = 0;
    for r in 0..=repeat {
        let mut cache = model.new_cache(prompt + gen_n + 1).unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        let mut next = model.forward_sample(&tokens, &mut cache, &greedy, &[], 0).unwrap_or_else(|e| panic!("{e}"));
        let p = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let image = model.park_cache(&cache).unwrap_or_else(|e| panic!("{e}"));
        let pk = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let back = model.import_image(&image, prompt + gen_n + 1).unwrap_or_else(|e| panic!("{e}"));
        let upk = t.elapsed().as_secs_f64();
        kv_bytes = image.bytes();
        drop((back, image));
        let t = Instant::now();
        for i in 0..gen_n {
            next = model.forward_sample(&[next], &mut cache, &greedy, &[], i as u64).unwrap_or_else(|e| panic!("{e}"));
        }
        let d = t.elapsed().as_secs_f64();
        if r > 0 {
            pre.push(prompt as f64 / p);
            dec.push(gen_n as f64 / d);
            park.push(pk * 1e3);
            unpark.push(upk * 1e3);
        }
    }
    let runs =
        format!("{{\"prefill\":{pre:.1?},\"decode\":{dec:.1?},\"park_ms\":{park:.3?},\"unpark_ms\":{unpark:.3?}}}");
    println!(
        "{{\"driver\":\"native\",\"backend\":\"{}\",\"model\":\"{}\",\"prompt\":{prompt},\"gen\":{gen_n},\"repeat\":{repeat},\"load_s\":{load_s:.2},\"prefill_tok_s\":{:.1},\"decode_tok_s\":{:.1},\"weight_bytes_per_token\":{},\"kv_bytes\":{kv_bytes},\"park_ms\":{:.3},\"unpark_ms\":{:.3},\"runs\":{runs}}}",
        model.backend_name(),
        path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        median(&mut pre),
        median(&mut dec),
        params_read * bytes_per_param,
        median(&mut park),
        median(&mut unpark),
    );
}
