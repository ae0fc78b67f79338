//! `shoal run MODULE.wasm [--backend B] [-- ARGS]`

use std::path::PathBuf;

use anyhow::Context;
use shoal_host::{RunOptions, Runtime};

use super::{BackendChoice, open_device};

/// Flags of `shoal run`.
#[derive(clap::Args)]
pub struct Args {
    /// The module: a wasm32-wasip1 command (binary .wasm or text .wat).
    module: PathBuf,
    /// The compute backend the guest's shoal_v1 calls run on.
    #[arg(long, value_enum, default_value_t)]
    backend: BackendChoice,
    /// A model the guest may open by name: NAME=PATH (a GGUF file or a Hugging Face
    /// directory); repeat for several. The default model is known when its file is found.
    #[arg(long = "model")]
    models: Vec<String>,
    /// Arguments passed to the guest (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let wasm = std::fs::read(&a.module).with_context(|| format!("cannot read {}", a.module.display()))?;
    let device = open_device(a.backend)?;
    log::info!("running {} on {}", a.module.display(), device.info().name);
    let engine = super::engine_for(&device);
    let models = if a.models.is_empty() && shoal_host::default_model_path().is_none() {
        std::sync::Arc::new(shoal_host::Models::with_engine(engine))
    } else {
        super::models(&a.models, engine)?.0
    };
    let runtime = Runtime::with_models(device, models)?;
    let name = a.module.file_name().map(|n| n.to_string_lossy().into_owned());
    let outcome = runtime
        .run(&wasm, &RunOptions { args: a.args, capture_stdout: false, program_name: name, measure_rss: false })
        .with_context(|| format!("running {}", a.module.display()))?;
    Ok(outcome.exit_code)
}
