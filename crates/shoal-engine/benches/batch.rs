//! Aggregate decode speed of many sessions on one model, each on its own thread, as actors
//! call the engine: the model's batcher runs the sessions ready at the same moment in one
//! pass (see `shoal_engine::batch`).
//!
//! `cargo bench -p shoal-engine --bench batch -- --model PATH [--backend cpu|cuda]
//!  [--n 1,4,16,64,256] [--prompt 128] [--gen 128]`
//!
//! For each N: N sessions prefill `--prompt` pseudo-random tokens (each its own), wait for one
//! another, then decode `--gen` greedy tokens each (stop tokens ignored) through
//! `forward_sample`. One JSON line per N: the aggregate decode rate (N × gen tokens over the
//! wall time from the start of decoding to the last token), the inter-token latency p50/p99
//! over every session's steps, the prefill time of all N prompts together, and the mean number
//! of sequences per pass. Each N is run once to warm up (kernels compiled, CUDA graphs
//! recorded), then measured.

use std::path::PathBuf;
use std::sync::Barrier;
use std::time::Instant;

use shoal_engine::gguf::GgufFile;
use shoal_engine::models::{EngineKind, Model};
use shoal_engine::sampler::Sampler;

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let mut model_path = None;
    let mut kind = EngineKind::Cpu;
    let (mut prompt, mut gen_n) = (128usize, 128usize);
    let mut ns = vec![1usize, 4, 16, 64, 256];
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--model" => model_path = Some(PathBuf::from(v())),
            "--backend" => {
                kind = match v().as_str() {
                    "cpu" => EngineKind::Cpu,
                    "cuda" => EngineKind::Cuda,
                    o => panic!("unknown backend {o} (cpu or cuda)"),
                }
            }
            "--n" => ns = v().split(',').map(|s| s.parse().expect("--n N,N,...")).collect(),
            "--prompt" => prompt = v().parse().expect("--prompt N"),
            "--gen" => gen_n = v().parse().expect("--gen N"),
            _ => panic!("unknown argument {a}"),
        }
    }
    let Some(path) = model_path else {
        eprintln!("batch bench: no --model given; nothing to measure");
        return;
    };
    let model = if path.extension().is_some_and(|e| e == "gguf") {
        Model::load_gguf(&GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}")), kind)
    } else {
        Model::load_safetensors(&path, kind)
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let vocab = model.config().vocab_size as u64;
    let greedy = Sampler::greedy();
    let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    // Each N runs twice, the first as a warm-up (kernels compiled, graphs recorded, memory
    // pools grown); the second is reported.
    for (round, &n) in ns.iter().flat_map(|n| [n, n]).enumerate() {
        let warmup = round % 2 == 0;
        let gen_n = if warmup { gen_n.min(32) } else { gen_n };
        let start = Barrier::new(n + 1);
        let decode = Barrier::new(n + 1);
        let before = model.batch_stats();
        let (t_prefill, t_decode, mut gaps) = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let (start, decode, model, greedy) = (&start, &decode, &model, &greedy);
                    s.spawn(move || {
                        let tokens: Vec<u32> = (0..prompt)
                            .map(|j| (((i * 7919 + j) as u64 * 2_654_435_761 + 17) % (vocab - 1)) as u32 + 1)
                            .collect();
                        let mut cache = model.new_cache(prompt + gen_n + 1).unwrap_or_else(|e| panic!("{e}"));
                        start.wait();
                        let mut next =
                            model.forward_sample(&tokens, &mut cache, greedy, &[], 0).unwrap_or_else(|e| panic!("{e}"));
                        decode.wait();
                        let mut gaps = Vec::with_capacity(gen_n);
                        let mut t = Instant::now();
                        for k in 0..gen_n {
                            next = model
                                .forward_sample(&[next], &mut cache, greedy, &[], k as u64 + 1)
                                .unwrap_or_else(|e| panic!("{e}"));
                            let now = Instant::now();
                            gaps.push((now - t).as_secs_f64());
                            t = now;
                        }
                        gaps
                    })
                })
                .collect();
            start.wait();
            let t0 = Instant::now();
            decode.wait();
            let t_prefill = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let gaps: Vec<f64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
            (t_prefill, t1.elapsed().as_secs_f64(), gaps)
        });
        if warmup {
            continue;
        }
        let after = model.batch_stats();
        let passes = (after.passes - before.passes).max(1);
        gaps.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{{\"bench\":\"batch\",\"backend\":\"{}\",\"model\":\"{name}\",\"n\":{n},\"prompt\":{prompt},\"gen\":{gen_n},\"prefill_s\":{t_prefill:.3},\"decode_tok_s\":{:.1},\"itl_p50_ms\":{:.2},\"itl_p99_ms\":{:.2},\"mean_seqs_per_pass\":{:.1},\"passes\":{passes},\"busy_share\":{:.2}}}",
            model.backend_name(),
            (n * gen_n) as f64 / t_decode,
            pct(&gaps, 0.5) * 1e3,
            pct(&gaps, 0.99) * 1e3,
            (after.seqs - before.seqs) as f64 / passes as f64,
            (after.busy_us - before.busy_us) as f64 * 1e-6 / (t_prefill + t_decode),
        );
    }
}
