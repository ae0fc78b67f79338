//! `shoal chat [--model NAME|PATH|NAME=PATH] [--backend B] [--temperature T] [--seed S]
//! [--max-tokens N] [--prompt TEXT]... [--save DIR] [--resume DIR]`
//!
//! Runs the chat guest as an actor (`chat_actor.wasm`): each turn is one message, the answer
//! streams back. `--save` snapshots the actor after the last turn (its memory and its KV
//! cache); `--resume` brings one back, on any backend, and the conversation goes on (and is
//! saved back where it came from, unless `--save` names another directory).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use shoal_actor::{Actor, ActorConfig, Event};
use shoal_host::{InstanceOptions, Runtime};

use super::{BackendChoice, models, open_device};

/// Flags of `shoal chat`.
#[derive(clap::Args)]
pub struct Args {
    /// The model: a name from the models directory (default `smollm2`; `shoal models` lists
    /// them, `shoal pull` fetches them), a GGUF file or Hugging Face directory, or NAME=PATH.
    #[arg(long)]
    model: Option<String>,
    /// The backend: the model runs on CUDA's engine when this is (or `auto` finds) an
    /// NVIDIA GPU, else on the CPU engine.
    #[arg(long, value_enum, default_value_t)]
    backend: BackendChoice,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = shoal_abi::DEFAULT_TEMPERATURE)]
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
    /// After each answer's last token, print its tokens (the answer as the model's tokenizer
    /// reads it), time and tokens/s to stderr; new and resumed chats alike.
    #[arg(long)]
    stats: bool,
    /// After the last turn, write a snapshot of the chat (its memory and KV cache) to DIR
    /// (atomically: a snapshot already there is replaced only once the new one is complete).
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// Start from the snapshot in DIR instead of a new chat: the conversation goes on where
    /// it stopped, on this backend, with the settings it was started with (--temperature,
    /// --seed and --max-tokens are ignored). Its models must be known by the same names.
    /// After the last turn the chat is saved back to DIR (to --save's DIR instead, if given),
    /// so that no turn is lost.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
}

/// Sends `msg` and prints the reply as it streams; then, with `stats` (the model that
/// answers, to count the answer's tokens), its tokens and speed, after its last token.
pub fn turn(actor: &Actor, msg: &str, stats: Option<&shoal_host::LoadedModel>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let t0 = Instant::now();
    let mut answer = Vec::new();
    for ev in actor.send(msg.as_bytes().to_vec())? {
        match ev {
            Event::Chunk(c) => {
                out.write_all(&c)?;
                out.flush()?;
                if stats.is_some() {
                    answer.extend_from_slice(&c);
                }
            }
            Event::Done(Ok(())) => {
                if let Some(m) = stats {
                    let secs = t0.elapsed().as_secs_f64();
                    let text = String::from_utf8_lossy(&answer);
                    let n = m.tokenizer.encode(text.trim_end_matches('\n'), false).len();
                    eprintln!("[{n} tokens in {secs:.2} s, {:.1} tokens/s]", n as f64 / secs.max(1e-9));
                }
                return Ok(());
            }
            Event::Done(Err(e)) => anyhow::bail!("the chat actor failed: {e}"),
        }
    }
    anyhow::bail!("the chat actor stopped")
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let device = open_device(a.backend)?;
    let (models, name) = models(a.model.as_slice(), super::engine_for(&device))?;
    let runtime = Arc::new(Runtime::with_models(device, models.clone())?);
    let module = runtime.prepare(shoal_guests::CHAT_ACTOR).context("preparing the chat actor")?;
    // The model that answers, for --stats.
    let mut answering = name.clone();
    let actor = match &a.resume {
        Some(dir) => {
            let t0 = Instant::now();
            let snap =
                shoal_actor::read_dir(dir).with_context(|| format!("reading the snapshot in {}", dir.display()))?;
            let (positions, taken_on) = (snap.kv_positions(), snap.state.backend.clone());
            if let Some(m) = snap.models.first() {
                answering = m.name.clone();
            }
            let read = t0.elapsed();
            // Load the models first, so that their load time is not counted as the restore's.
            for m in &snap.models {
                let _ = models.get(&m.name);
            }
            let t1 = Instant::now();
            let actor = Actor::restore(runtime.clone(), module, snap, ActorConfig::default())
                .with_context(|| format!("resuming the chat in {}", dir.display()))?;
            eprintln!(
                "shoal chat: resumed from {} ({positions} cached tokens, taken on {taken_on}; read in {:.1} ms, restored in {:.1} ms)",
                dir.display(),
                read.as_secs_f64() * 1e3,
                t1.elapsed().as_secs_f64() * 1e3
            );
            actor
        }
        None => {
            // Load before the guest starts, so a bad model file is reported here, clearly.
            models.get(&name).map_err(anyhow::Error::msg)?;
            let args = vec![
                "--model".to_string(),
                name.clone(),
                "--temperature".into(),
                a.temperature.to_string(),
                "--seed".into(),
                a.seed.to_string(),
                "--max-tokens".into(),
                a.max_tokens.to_string(),
            ];
            let opts = InstanceOptions { args, program_name: Some("chat_actor.wasm".into()), ..Default::default() };
            Actor::spawn(runtime.clone(), module, opts, ActorConfig::default()).context("starting the chat actor")?
        }
    };
    let stats = if a.stats { Some(models.get(&answering).map_err(anyhow::Error::msg)?) } else { None };
    let stats = stats.as_deref();
    if a.prompts.is_empty() {
        eprintln!("shoal chat: type a message and press enter; end with Ctrl-D");
        for line in std::io::stdin().lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match turn(&actor, &line, stats) {
                // The turn is not kept: say so, and go on with the next one.
                Err(e) if format!("{e:#}").contains("context_length_exceeded") => eprintln!("shoal chat: {e:#}"),
                r => r?,
            }
        }
    }
    for p in &a.prompts {
        turn(&actor, p, stats)?;
    }
    // A resumed chat is saved back where it came from unless --save says elsewhere.
    if let Some(dir) = a.save.as_ref().or(a.resume.as_ref()) {
        let t0 = Instant::now();
        // Parked: device caches come off by DMA and are converted as they are written.
        let snap = actor.park().context("taking the snapshot")?;
        let t1 = Instant::now();
        let r =
            shoal_actor::write_dir(dir, &snap).with_context(|| format!("writing the snapshot to {}", dir.display()))?;
        eprintln!(
            "shoal chat: saved to {} ({} cached tokens; {:.1} MB: memory {:.1} MB, KV cache {:.1} MB; captured in {:.1} ms, written in {:.1} ms)",
            dir.display(),
            snap.kv_positions(),
            r.bytes as f64 / 1e6,
            r.memory_bytes as f64 / 1e6,
            r.kv_bytes as f64 / 1e6,
            (t1 - t0).as_secs_f64() * 1e3,
            t1.elapsed().as_secs_f64() * 1e3
        );
    }
    actor.stop();
    Ok(0)
}
