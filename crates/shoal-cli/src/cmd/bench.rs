//! `shoal bench`: a model's prefill and decode speed on this machine, as `llama-bench` reports
//! it. Each run evaluates a prompt of `--prompt` pseudo-random token ids at once (prefill), then
//! decodes `--gen` tokens one at a time (greedy, stop tokens ignored), in a fresh session; one
//! warm-up run comes first and is not counted. The table gives the mean ± standard deviation
//! of the runs; `--json` prints one object per run instead.

use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use shoal_engine::sampler::Sampler;

use super::BackendChoice;

/// Flags of `shoal bench`.
#[derive(clap::Args)]
pub struct Args {
    /// The model: a name from the models directory (`smollm2`; `shoal models` lists them),
    /// a GGUF file or Hugging Face directory, or NAME=PATH.
    #[arg(long, default_value = shoal_host::DEFAULT_MODEL)]
    model: String,
    /// The backend whose engine runs it (CUDA's on an NVIDIA GPU, the CPU's otherwise).
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Prompt tokens evaluated at once (prefill); at least 1.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    prompt: u32,
    /// Tokens then decoded one at a time (0: prefill only).
    #[arg(long = "gen", default_value_t = 128)]
    generate: u32,
    /// Measured runs, after one warm-up run (1 to 100).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// One JSON object per run (`prefill_tok_s`, `decode_tok_s`, …) instead of the table.
    #[arg(long)]
    json: bool,
}

/// The mean and standard deviation of `v`.
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let device = super::open_device(a.backend)?;
    let engine = super::engine_for(&device);
    let (models, name) = super::models(std::slice::from_ref(&a.model), engine)?;
    eprintln!("shoal bench: loading {name} on the {} engine …", format!("{engine:?}").to_lowercase());
    let t = Instant::now();
    let loaded = models.get(&name).map_err(anyhow::Error::msg).with_context(|| format!("loading {name}"))?;
    let load_s = t.elapsed().as_secs_f64();
    let model = &loaded.llama;
    let c = model.config();
    let (prompt, gen_n) = (a.prompt as usize, a.generate as usize);
    anyhow::ensure!(
        prompt + gen_n < c.context_length,
        "--prompt {prompt} and --gen {gen_n} need {} positions, past {name}'s context of {} tokens: ask for fewer",
        prompt + gen_n + 1,
        c.context_length
    );
    let vocab = (c.vocab_size as u64).saturating_sub(1).max(1);
    let tokens: Vec<u32> = (0..prompt as u64).map(|i| ((i * 2_654_435_761 + 17) % vocab) as u32 + 1).collect();
    let greedy = Sampler::greedy();
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for r in 0..=a.repeat {
        let mut cache = model.new_cache(prompt + gen_n + 1)?;
        let t = Instant::now();
        let mut next = model.forward_sample(&tokens, &mut cache, &greedy, &[], 0)?;
        let p = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..gen_n {
            next = model.forward_sample(&[next], &mut cache, &greedy, &[], i as u64)?;
        }
        let d = t.elapsed().as_secs_f64();
        if r == 0 {
            continue;
        }
        let (pp, tg) = (prompt as f64 / p, (gen_n > 0).then(|| gen_n as f64 / d));
        if a.json {
            let line = json!({
                "model": name, "path": loaded.path, "backend": model.backend_name(),
                "prompt": prompt, "gen": gen_n, "run": r, "load_s": load_s,
                "prefill_tok_s": pp, "decode_tok_s": tg,
            });
            println!("{line}");
        } else {
            eprintln!(
                "run {r}/{}: prefill {pp:.1} tokens/s{}",
                a.repeat,
                tg.map_or(String::new(), |t| format!(", decode {t:.1} tokens/s"))
            );
        }
        pre.push(pp);
        dec.extend(tg);
    }
    if !a.json {
        let row = |test: String, v: &[f64]| {
            let (m, sd) = mean_sd(v);
            println!("| {name:<12} | {:<8} | {test:>7} | {m:>12.1} ± {sd:<9.1} |", model.backend_name());
        };
        println!("| {:<12} | {:<8} | {:>7} | {:>24} |", "model", "backend", "test", "tokens/s");
        println!("| {:-<12} | {:-<8} | {:->7} | {:->24} |", "", "", "", "");
        row(format!("pp{prompt}"), &pre);
        if !dec.is_empty() {
            row(format!("tg{gen_n}"), &dec);
        }
        eprintln!("loaded in {load_s:.2} s from {}", loaded.path.display());
    }
    Ok(0)
}
