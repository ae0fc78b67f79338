//! Multi-turn time to first token through `wasi_ephemeral_nn`, with the KV cache's shared
//! prefix reused (shoal's default) and with the cache cleared every turn (what the home
//! runtime does), for the guest written against the `wasmedge-wasi-nn` crate.
//!
//! `cargo bench -p shoal-host --bench nn_ttft -- [--model PATH] [--backend cpu|cuda]
//!  [--history 2000] [--turns 4] [--n-predict 16]`
//!
//! Each run is one chat of `--turns` turns; the system prompt is padded to about `--history`
//! tokens so the conversation carries that much history from the first turn. Greedy. One
//! JSON line per mode with every turn's time to first token.

use std::sync::Arc;

use shoal_gpu::{BackendKind, Device};
use shoal_host::{Models, RunOptions, Runtime};

fn main() {
    let mut model = shoal_host::default_model_path().map(|p| p.display().to_string());
    let (mut backend, mut history, mut turns, mut n_predict) = (BackendKind::Cpu, 2000usize, 4usize, 16usize);
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--model" => model = Some(v()),
            "--backend" => backend = v().parse().unwrap_or_else(|e| panic!("--backend: {e}")),
            "--history" => history = v().parse().expect("--history N"),
            "--turns" => turns = v().parse().expect("--turns N"),
            "--n-predict" => n_predict = v().parse().expect("--n-predict N"),
            _ => panic!("unknown argument {a}"),
        }
    }
    let Some(model) = model else {
        eprintln!("nn_ttft: no model (scripts/fetch-model.sh, or --model PATH); nothing to measure");
        return;
    };
    let device = Arc::new(Device::open(backend).unwrap_or_else(|e| panic!("{e}")));
    let engine = shoal_host::engine_for(&device);
    let models = Arc::new(Models::with_engine(engine));
    models.add("default", std::path::Path::new(&model));
    let rt = Runtime::with_models(device, models).unwrap();
    // About one token per word of this filler.
    let words = ["the", "quiet", "river", "runs", "past", "old", "stone", "mills", "and", "green", "fields"];
    let system: String = (0..history).map(|i| words[i % words.len()]).collect::<Vec<_>>().join(" ");
    let questions =
        ["What is the capital of France?", "And of Germany?", "And of Italy?", "And of Spain?", "And of Japan?"];
    for reuse in [true, false] {
        let mut a: Vec<String> = vec!["--temperature".into(), "0".into(), "--stats".into(), "--ctx-size".into()];
        a.push((history * 2 + 1024).to_string());
        a.extend(["--n-predict".into(), n_predict.to_string(), "--system".into(), system.clone()]);
        for q in questions.iter().cycle().take(turns) {
            a.extend(["--prompt".into(), q.to_string()]);
        }
        if !reuse {
            a.push("--no-prefix-reuse".into());
        }
        let opts = RunOptions {
            args: a,
            capture_stdout: true,
            program_name: Some("nnchat.wasm".into()),
            ..Default::default()
        };
        let out = rt.run(shoal_guests::NNCHAT, &opts).expect("nnchat runs");
        let text = String::from_utf8(out.stdout.unwrap()).unwrap();
        let stats: Vec<serde_json::Value> =
            text.lines().filter(|l| l.starts_with("{\"ttft_s\"")).map(|l| serde_json::from_str(l).unwrap()).collect();
        let ttft: Vec<f64> = stats.iter().map(|s| s["ttft_s"].as_f64().unwrap()).collect();
        let input: Vec<u64> = stats.iter().map(|s| s["metadata"]["input_tokens"].as_u64().unwrap()).collect();
        let reused: Vec<u64> = stats.iter().map(|s| s["metadata"]["reused_tokens"].as_u64().unwrap()).collect();
        println!(
            "{{\"bench\":\"nn_ttft\",\"backend\":\"{}\",\"prefix_reuse\":{reuse},\"turns\":{turns},\"history_words\":{history},\"ttft_s\":{ttft:.4?},\"input_tokens\":{input:?},\"reused_tokens\":{reused:?}}}",
            backend.name()
        );
    }
}
