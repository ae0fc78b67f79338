//! One module per subcommand.

pub mod attach;
pub mod bench;
pub mod chat;
pub mod ctl;
pub mod demo;
pub mod devices;
mod http;
pub mod models;
pub mod pull;
pub mod run;
pub mod serve;

use std::sync::Arc;

use anyhow::Context;
use shoal_gpu::{BackendKind, Device};

/// A failure with its own exit code (see `AFTER_HELP` in main.rs); other errors exit with 2.
#[derive(Debug)]
pub struct Failure {
    /// The process's exit code.
    pub code: i32,
    /// What happened, and what to do about it.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Exit code: the guest ran past `--deadline` (as `timeout(1)` does).
pub const EXIT_DEADLINE: i32 = 124;
/// Exit code: the guest was killed.
pub const EXIT_KILLED: i32 = 137;
/// Exit code: the actor answered with an error (`shoal send`).
pub const EXIT_ACTOR_ERROR: i32 = 3;

/// What one instance may use (`shoal run`, and each actor of `shoal serve`); the defaults are
/// [`shoal_host::Limits::default`]'s.
#[derive(clap::Args, Clone, Debug)]
pub struct LimitArgs {
    /// The most memory one instance (for `serve`: each actor, spawned or restored) may hold
    /// in all: its linear memory, device buffers, KV caches and the models it loads from its
    /// own bytes (binary units: 512M, 4G). Past it,
    /// the guest's call fails with status 14 (LimitExceeded; TooLarge to wasi-nn guests) and
    /// a growth of its memory fails.
    #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = parse_size)]
    pub max_memory: u64,
    /// The most positions one session's KV cache may hold (also at most the model's own
    /// context length); a session asked for more is refused (status 14), and a conversation
    /// longer than its session fails with status 13 (context_length_exceeded).
    #[arg(long, value_name = "N", default_value_t = 32_768)]
    pub max_context: usize,
}

impl LimitArgs {
    /// The limits these flags give, with `deadline`.
    pub fn limits(&self, deadline: Option<std::time::Duration>) -> shoal_host::Limits {
        shoal_host::Limits {
            max_memory: self.max_memory,
            max_context: self.max_context,
            deadline,
            ..shoal_host::Limits::default()
        }
    }
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let n = shoal_host::budget::parse_bytes(s)?;
    if n == 0 {
        return Err("a size of 0 leaves the guest no memory at all".into());
    }
    Ok(n)
}

/// A `--deadline`-style number of seconds: positive and finite.
pub fn parse_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

/// `--backend` values: a kind, or `auto` for the best available.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// The best available: CUDA, Metal, Vulkan, then CPU.
    #[default]
    Auto,
    /// The multi-threaded CPU reference.
    Cpu,
    /// Vulkan through wgpu (on machines without a GPU: Mesa's lavapipe).
    Vulkan,
    /// Metal through wgpu (Apple).
    Metal,
    /// NVIDIA CUDA.
    Cuda,
}

/// Opens the device `choice` names, saying why when it cannot.
pub fn open_device(choice: BackendChoice) -> anyhow::Result<Arc<Device>> {
    let kind = match choice {
        BackendChoice::Auto => {
            let (device, skipped) = Device::open_best();
            for e in skipped {
                log::info!("skipped: {e}");
            }
            return Ok(Arc::new(device));
        }
        BackendChoice::Cpu => BackendKind::Cpu,
        BackendChoice::Vulkan => BackendKind::Vulkan,
        BackendChoice::Metal => BackendKind::Metal,
        BackendChoice::Cuda => BackendKind::Cuda,
    };
    let device = Device::open(kind).with_context(|| {
        format!("cannot open the {kind} backend (run `shoal devices` to see what this machine has, or pick another with --backend)")
    })?;
    Ok(Arc::new(device))
}

pub use shoal_host::engine_for;

/// Builds the host's model registry from `--model` values: `NAME=PATH`, a bare `PATH`
/// (a GGUF file or a Hugging Face directory, named after it), or a bare name, found in the
/// models directories ([`crate::catalog::resolve`]: `$SHOAL_MODELS` or the user's data
/// directory, then a checkout's `models/`). Without one, the default model (`smollm2`).
/// Models load on `engine`.
pub fn models(
    specs: &[String],
    engine: shoal_engine::models::EngineKind,
) -> anyhow::Result<(Arc<shoal_host::Models>, String)> {
    let models = Arc::new(shoal_host::Models::with_engine(engine));
    let mut chosen = shoal_host::DEFAULT_MODEL.to_string();
    if let Some(p) = shoal_host::default_model_path() {
        models.add(shoal_host::DEFAULT_MODEL, &p);
    }
    for spec in specs {
        chosen = add_model(&models, spec)?;
    }
    if !models.names().contains(&chosen) {
        // Only the default model can be missing here: every --model was added or refused.
        return Err(crate::catalog::resolve(&chosen).unwrap_err().into());
    }
    Ok((models, chosen))
}

/// Adds one `--model` value to `models`; the name it is known by.
fn add_model(models: &shoal_host::Models, spec: &str) -> anyhow::Result<String> {
    use std::path::{Path, PathBuf};
    let (name, path) = match spec.split_once('=') {
        Some((n, p)) => {
            anyhow::ensure!(!n.is_empty() && !p.is_empty(), "--model {spec}: expected NAME=PATH, NAME or PATH");
            (n.to_string(), PathBuf::from(p))
        }
        None if Path::new(spec).exists() => {
            let p = PathBuf::from(spec);
            (crate::catalog::name_of(&p), p)
        }
        None if crate::catalog::is_name(spec) => {
            if models.names().iter().any(|n| n == spec) {
                return Ok(spec.to_string());
            }
            let p = crate::catalog::resolve(spec)?;
            (spec.to_string(), p)
        }
        None => (crate::catalog::name_of(Path::new(spec)), PathBuf::from(spec)),
    };
    anyhow::ensure!(
        path.exists(),
        "--model {spec}: no such file: {} (give a GGUF file, a Hugging Face directory, or a model's name)",
        path.display()
    );
    models.add(&name, &path);
    Ok(name)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        limits: LimitArgs,
    }

    #[test]
    fn the_limit_flags_default_to_the_hosts_limits() {
        let p = Probe::parse_from(["probe"]);
        assert_eq!(p.limits.limits(None), shoal_host::Limits::default());
        let p = Probe::parse_from(["probe", "--max-memory", "512M", "--max-context", "64"]);
        assert_eq!((p.limits.max_memory, p.limits.max_context), (512 << 20, 64));
        assert!(Probe::try_parse_from(["probe", "--max-memory", "lots"]).is_err());
        assert!(parse_secs("0").is_err() && parse_secs("inf").is_err() && parse_secs("1.5").is_ok());
    }
}
