//! `shoal chat [--model NAME|PATH|NAME=PATH] [--backend B] [--temperature T] [--seed S]
//! [--max-tokens N] [--prompt TEXT]...`

use anyhow::Context;
use shoal_host::{RunOptions, Runtime};

use super::{BackendChoice, models, open_device};

/// Flags of `shoal chat`.
#[derive(clap::Args)]
pub struct Args {
    /// The model: a name the host knows (default `smollm2`), a GGUF path, or NAME=PATH.
    #[arg(long)]
    model: Option<String>,
    /// The backend: the model runs on CUDA's engine when this is (or `auto` finds) an
    /// NVIDIA GPU, else on the CPU engine.
    #[arg(long, value_enum, default_value_t)]
    backend: BackendChoice,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Seed for sampling: the same seed gives the same answer.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The most tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// A user turn; repeat for several, answered in order. Without it, chat reads stdin.
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    /// Print tokens/s after each answer (to stderr).
    #[arg(long)]
    stats: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let device = open_device(a.backend)?;
    let (models, name) = models(a.model.as_slice(), super::engine_for(&device))?;
    let runtime = Runtime::with_models(device, models.clone())?;
    // Load before the guest starts, so a bad model file is reported here, clearly.
    models.get(&name).map_err(anyhow::Error::msg)?;
    let mut args = vec![
        "--model".to_string(),
        name,
        "--temperature".into(),
        a.temperature.to_string(),
        "--seed".into(),
        a.seed.to_string(),
        "--max-tokens".into(),
        a.max_tokens.to_string(),
    ];
    for p in &a.prompts {
        args.extend(["--prompt".to_string(), p.clone()]);
    }
    if a.stats {
        args.push("--stats".into());
    }
    if a.prompts.is_empty() {
        eprintln!("shoal chat: type a message and press enter; end with Ctrl-D");
    }
    let outcome = runtime
        .run(shoal_guests::CHAT, &RunOptions { args, program_name: Some("chat.wasm".into()), ..Default::default() })
        .context("running the chat guest")?;
    Ok(outcome.exit_code)
}
