//! `shoal demo [gemm|chat] [--backend B] [--model NAME] [--size N]... [--async] [--json]`

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use shoal_host::{RunOptions, Runtime};

use super::{BackendChoice, open_device};

/// Flags of `shoal demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Which demo: gemm or chat. Without it, both: the GEMM check, then (if it passed) the
    /// chat answer.
    #[arg(value_enum)]
    which: Option<Which>,
    /// The compute backend (the chat's model runs on CUDA's engine on an NVIDIA GPU, else on
    /// the CPU engine).
    #[arg(long, value_enum, default_value_t)]
    backend: BackendChoice,
    /// The chat demo's model: a name from the models directory (default `smollm2`), a GGUF
    /// file, or NAME=PATH.
    #[arg(long)]
    model: Option<String>,
    /// GEMM matrix size N (N×N·N×N); repeat for several. Default 128.
    #[arg(long = "size")]
    sizes: Vec<u32>,
    /// GEMM: use the asynchronous submit + fence path.
    #[arg(long = "async")]
    asynchronous: bool,
    /// Print JSON instead of a report: one object per GEMM size, one for the chat.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    /// The GEMM reference check.
    Gemm,
    /// A chat answer through the chat guest, from --model's model or the default one
    /// (`smollm2`, from the models directory: `shoal pull smollm2`).
    Chat,
}

/// One size's result as the guest prints it.
#[derive(Deserialize)]
struct GuestLine {
    size: u32,
    elements: u64,
    correct: u64,
    path: String,
    dispatches: u32,
    bytes_copied: u64,
    rss_delta_bytes: i64,
    gemm_ms: f64,
    gflops: f64,
}

/// What `--json` prints.
#[derive(Serialize)]
struct Report<'a> {
    demo: &'static str,
    backend: &'a str,
    adapter: &'a str,
    size: u32,
    elements: u64,
    correct: u64,
    ok: bool,
    in_place: bool,
    path: &'a str,
    dispatches: u32,
    bytes_copied: u64,
    rss_delta_bytes: i64,
    gemm_ms: f64,
    gflops: f64,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let gemm_ok = if a.which != Some(Which::Chat) { gemm(&a)? } else { 0 };
    if a.which == Some(Which::Gemm) || gemm_ok != 0 {
        return Ok(gemm_ok);
    }
    chat(&a)
}

/// A chat answer to "What is the capital of France?", greedy, with tokens/s.
fn chat(a: &Args) -> anyhow::Result<i32> {
    let device = open_device(a.backend)?;
    let (models, name) = super::models(a.model.as_slice(), super::engine_for(&device))?;
    let runtime = Runtime::with_models(device, models.clone())?;
    let t0 = std::time::Instant::now();
    let model = models.get(&name).map_err(anyhow::Error::msg)?;
    let load = t0.elapsed();
    let question = "What is the capital of France?";
    let args =
        ["--model", &name, "--temperature", "0", "--max-tokens", "24", "--prompt", question].map(String::from).to_vec();
    let outcome = runtime
        .run(
            shoal_guests::CHAT,
            &RunOptions { args, capture_stdout: true, program_name: Some("chat.wasm".into()), ..Default::default() },
        )
        .context("running the chat guest")?;
    let answer = String::from_utf8_lossy(outcome.stdout.as_deref().unwrap_or_default()).trim().to_string();
    let s = &outcome.stats;
    let decode = if s.decode_seconds > 0.0 { s.decode_steps as f64 / s.decode_seconds } else { 0.0 };
    let prefill = if s.prefill_seconds > 0.0 { s.prefill_tokens as f64 / s.prefill_seconds } else { 0.0 };
    let ok = outcome.exit_code == 0 && answer.contains("Paris");
    if a.json {
        let report = serde_json::json!({
            "demo": "chat", "model": name, "engine": model.llama.backend_name(), "path": model.path, "question": question, "answer": answer,
            "prefill_tokens": s.prefill_tokens, "prefill_tokens_per_s": prefill,
            "decode_tokens": s.decode_steps, "decode_tokens_per_s": decode, "ok": ok,
        });
        println!("{report}");
    } else {
        println!();
        println!("shoal demo: a Wasm chat guest asks the host's model ({} engine), greedy", model.llama.backend_name());
        println!("  model    {name} ({}, loaded in {load:.2?})", model.path.display());
        println!("  user     {question}");
        println!("  answer   {answer}");
        println!(
            "  speed    prefill {} tokens at {prefill:.0} tokens/s, decode {} tokens at {decode:.1} tokens/s",
            s.prefill_tokens, s.decode_steps
        );
        println!("{}", if ok { "chat demo passed" } else { "chat demo FAILED (no Paris in the answer)" });
    }
    Ok(if ok { 0 } else { 1 })
}

fn gemm(a: &Args) -> anyhow::Result<i32> {
    let device = open_device(a.backend)?;
    let info = device.info().clone();
    let runtime = Runtime::new(device)?;
    let sizes = if a.sizes.is_empty() { vec![128] } else { a.sizes.clone() };
    let mut args = vec!["--json".to_string()];
    for s in &sizes {
        args.extend(["--size".to_string(), s.to_string()]);
    }
    if a.asynchronous {
        args.push("--async".into());
    }
    if !a.json {
        println!("shoal demo: a Wasm guest asks the host for C = A·B on its own memory, then checks every element");
        println!("  backend  {} — {}", info.backend, info.name);
        let import = if info.imports_guest_memory { "imported in place" } else { "copied (no import on this device)" };
        println!("  memory   guest pages {import}");
    }
    let outcome = runtime
        .run(
            shoal_guests::GEMM,
            &RunOptions {
                args,
                capture_stdout: true,
                program_name: Some("gemm.wasm".into()),
                measure_rss: true,
                ..Default::default()
            },
        )
        .context("running the gemm guest")?;
    let stdout = String::from_utf8_lossy(outcome.stdout.as_deref().unwrap_or_default()).into_owned();
    let lines: Vec<GuestLine> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("the guest printed something unexpected:\n{stdout}"))?;
    if lines.len() != sizes.len() {
        bail!(
            "the guest exited with code {} after {} of {} sizes:\n{stdout}",
            outcome.exit_code,
            lines.len(),
            sizes.len()
        );
    }
    let mut all_ok = outcome.exit_code == 0;
    for l in &lines {
        let ok = l.correct == l.elements;
        all_ok &= ok;
        let report = Report {
            demo: "gemm",
            backend: info.backend.name(),
            adapter: &info.name,
            size: l.size,
            elements: l.elements,
            correct: l.correct,
            ok,
            in_place: l.path == "in_place",
            path: &l.path,
            dispatches: l.dispatches,
            bytes_copied: l.bytes_copied,
            rss_delta_bytes: l.rss_delta_bytes,
            gemm_ms: l.gemm_ms,
            gflops: l.gflops,
        };
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "  {n}×{n}×{n}  {}/{} correct  path {}  {:.2} ms ({:.1} GFLOP/s)  resident memory {:+} bytes  {}",
                l.correct,
                l.elements,
                l.path,
                l.gemm_ms,
                l.gflops,
                l.rss_delta_bytes,
                if ok { "OK" } else { "WRONG" },
                n = l.size,
            );
        }
    }
    if !a.json {
        let s = &outcome.stats;
        println!(
            "  host     {} device ops, {} on the guest's own pages, {} bytes copied",
            s.ops, s.in_place_ops, s.bytes_copied
        );
        println!("{}", if all_ok { "demo passed" } else { "demo FAILED" });
    }
    Ok(if all_ok { 0 } else { 1 })
}
