//! One module per subcommand.

pub mod chat;
pub mod ctl;
pub mod demo;
pub mod devices;
mod http;
pub mod run;
pub mod serve;

use std::sync::Arc;

use anyhow::Context;
use shoal_gpu::{BackendKind, Device};

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
/// (a GGUF file or a Hugging Face directory, named after it), or a bare known name; the
/// default model is always known when its file is found (`scripts/fetch-model.sh`, which
/// `make demo` runs). Models load on `engine`.
pub fn models(
    specs: &[String],
    engine: shoal_engine::models::EngineKind,
) -> anyhow::Result<(Arc<shoal_host::Models>, String)> {
    let models = Arc::new(shoal_host::Models::with_engine(engine));
    if let Some(p) = shoal_host::default_model_path() {
        models.add(shoal_host::DEFAULT_MODEL, &p);
    }
    let mut chosen = shoal_host::DEFAULT_MODEL.to_string();
    for spec in specs {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) => (n.to_string(), std::path::PathBuf::from(p)),
            None if std::path::Path::new(spec).exists() => {
                let p = std::path::PathBuf::from(spec);
                let n = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| spec.clone());
                (n, p)
            }
            None => {
                chosen = spec.clone();
                continue;
            }
        };
        anyhow::ensure!(
            path.exists(),
            "--model {spec}: nothing at {} (a GGUF file or a Hugging Face directory)",
            path.display()
        );
        models.add(&name, &path);
        chosen = name;
    }
    if !models.names().contains(&chosen) {
        anyhow::bail!(
            "no model named `{chosen}`{}: fetch the default one with `scripts/fetch-model.sh` (make demo does), or name a GGUF file with --model NAME=PATH",
            if chosen == shoal_host::DEFAULT_MODEL {
                " (its file was not found in ./models or $SHOAL_MODELS)"
            } else {
                ""
            }
        );
    }
    Ok((models, chosen))
}
