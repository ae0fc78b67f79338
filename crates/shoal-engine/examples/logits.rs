//! Runs shoal's engine on a Hugging Face-layout model (safetensors) and writes what an
//! independent implementation can be compared with: the logits of every position of a
//! fixed token sequence, and a greedy continuation.
//!
//! `cargo run --release -p shoal-engine --example logits -- --model-dir DIR --out FILE
//!  [--tokens 1,2,3] [--continue 32] [--backend cpu|cuda] [--prefill]`
//!
//! `--model-dir` also takes a `.gguf` file. `--prefill` runs the tokens as one prompt (only
//! the last position's logits are written) instead of one at a time.
//!
//! FILE gets little-endian f32 logits, `positions × vocab`; stdout one JSON line with the
//! shape, the greedy continuation and timings. `scripts/hf_compare.py` does the other side.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use shoal_engine::backend::{Backend, Cpu};
use shoal_engine::gguf::GgufFile;
use shoal_engine::models::llama::Llama;

struct Args {
    out: PathBuf,
    tokens: Vec<u32>,
    cont: usize,
    prefill: bool,
}

fn main() {
    let mut dir = None;
    let mut out = None;
    let mut tokens: Vec<u32> = vec![1, 450, 7, 1023, 88, 12000, 5, 640, 31, 2];
    let mut cont = 32usize;
    let mut backend = "cpu".to_string();
    let mut prefill = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--prefill" {
            prefill = true;
            continue;
        }
        let v = args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--model-dir" => dir = Some(PathBuf::from(v)),
            "--out" => out = Some(PathBuf::from(v)),
            "--tokens" => tokens = v.split(',').map(|t| t.trim().parse().expect("token id")).collect(),
            "--continue" => cont = v.parse().expect("count"),
            "--backend" => backend = v,
            _ => panic!("unknown argument {a}"),
        }
    }
    let dir: PathBuf = dir.expect("--model-dir DIR");
    let args = Args { out: out.expect("--out FILE"), tokens, cont, prefill };
    match backend.as_str() {
        "cpu" => run(&dir, Cpu, args),
        #[cfg(feature = "cuda")]
        "cuda" => run(&dir, shoal_engine::backend::cuda::Cuda::open().unwrap_or_else(|e| panic!("{e}")), args),
        other => panic!("unknown backend {other} (cpu, cuda)"),
    }
}

fn run<B: Backend>(dir: &std::path::Path, backend: B, args: Args) {
    let Args { out, tokens, cont, prefill } = args;
    let t0 = Instant::now();
    let model = if dir.extension().is_some_and(|e| e == "gguf") {
        let file = GgufFile::open(dir).unwrap_or_else(|e| panic!("{e}"));
        Llama::load_gguf(&file, backend)
    } else {
        Llama::load_safetensors(dir, backend)
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = model.config().vocab_size;
    // Logits at every position: one token at a time through the cache.
    let mut cache = model.new_cache(tokens.len() + cont + 1).expect("cache");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&out).expect("create --out"));
    let t1 = Instant::now();
    let mut last = Vec::new();
    let steps: Vec<&[u32]> = if prefill { vec![&tokens[..]] } else { tokens.chunks(1).collect() };
    for part in steps {
        last = model.forward(part, &mut cache).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(last.len(), vocab);
        for v in &last {
            file.write_all(&v.to_le_bytes()).expect("write");
        }
    }
    let prompt_s = t1.elapsed().as_secs_f64();
    // Greedy continuation.
    let argmax = |l: &[f32]| l.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap();
    let mut generated = Vec::new();
    let mut next = argmax(&last);
    let t2 = Instant::now();
    for _ in 0..cont {
        generated.push(next);
        let l = model.forward(&[next], &mut cache).unwrap_or_else(|e| panic!("{e}"));
        next = argmax(&l);
    }
    let decode_s = t2.elapsed().as_secs_f64();
    println!(
        "{{\"backend\":\"{}\",\"positions\":{},\"vocab\":{vocab},\"tokens\":{tokens:?},\"greedy\":{generated:?},\"load_s\":{load_s:.2},\"prompt_s\":{prompt_s:.3},\"decode_tokens_per_s\":{:.2}}}",
        model.backend().name(),
        if prefill { 1 } else { tokens.len() },
        cont as f64 / decode_s.max(1e-9)
    );
}
