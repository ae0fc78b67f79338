//! `shoal`: run sandboxed WebAssembly guests that compute on the GPU in place.
//!
//! A thin binary: flags become plain values, then one library call per subcommand
//! (one module per subcommand under `cmd/`).

mod cmd;

use clap::{Parser, Subcommand};

const EXIT_CODES: &str = "\
Exit codes:
  0  success (for `run`: the guest's own exit code is passed through)
  1  a check failed (the demo found wrong results)
  2  shoal could not do what was asked (bad flags, unreadable module, no such backend)";

/// Sandboxed WebAssembly actors that compute on the GPU with zero copies.
#[derive(Parser)]
#[command(name = "shoal", version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a WASI command module (wasm32-wasip1) with the shoal_v1 ABI.
    Run(cmd::run::Args),
    /// List the compute backends: available or why not, adapter, in-place import.
    Devices(cmd::devices::Args),
    /// Run the built-in demo: a GEMM computed by the host on the guest's own memory
    /// and checked element by element by the guest, then a chat answer.
    Demo(cmd::demo::Args),
    /// Chat with a model through the chat guest (one user turn per --prompt, or stdin).
    Chat(cmd::chat::Args),
}

fn main() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // Mesa's Vulkan drivers complain on every device open without it, though
        // shoal opens no window; point it at the temporary directory.
        // SAFETY: first thing in main, before any other thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,wgpu_hal=error,wgpu_core=error,naga=error"),
    )
    .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(a),
        Command::Devices(a) => cmd::devices::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Chat(a) => cmd::chat::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("shoal: error: {e:#}");
            std::process::exit(2);
        }
    }
}
