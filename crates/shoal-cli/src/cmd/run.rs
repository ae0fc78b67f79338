//! `shoal run MODULE.wasm [--backend B] [--deadline SECS] [--max-memory SIZE]
//! [--max-context N] [-- ARGS]`

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use shoal_host::{HostError, RunOptions, Runtime};

use super::{BackendChoice, EXIT_DEADLINE, EXIT_KILLED, Failure, LimitArgs, open_device, parse_secs};

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
    /// A model for wasi-nn guests, as WasmEdge takes it: NAME:GGML:TARGET:PATH (TARGET is
    /// AUTO, CPU or GPU; the model runs on this host's engine either way). Repeatable.
    #[arg(long = "nn-preload", value_name = "NAME:GGML:TARGET:PATH")]
    nn_preload: Vec<String>,
    /// The longest the whole run may take, in seconds, host calls included (a prompt stops
    /// between its chunks, a GEMM between its pieces); past it the guest is stopped and shoal
    /// exits with 124. Default: no limit.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    deadline: Option<f64>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Arguments passed to the guest (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let wasm = std::fs::read(&a.module).with_context(|| format!("cannot read {}", a.module.display()))?;
    let device = open_device(a.backend)?;
    log::info!("running {} on {}", a.module.display(), device.info().name);
    let engine = super::engine_for(&device);
    let mut specs = a.models.clone();
    for p in &a.nn_preload {
        specs.push(nn_preload(p)?);
    }
    let models = if specs.is_empty() && shoal_host::default_model_path().is_none() {
        std::sync::Arc::new(shoal_host::Models::with_engine(engine))
    } else {
        super::models(&specs, engine)?.0
    };
    let runtime = Runtime::with_models(device, models)?;
    let name = a.module.file_name().map(|n| n.to_string_lossy().into_owned());
    let limits = a.limits.limits(a.deadline.map(Duration::from_secs_f64));
    let opts = RunOptions { args: a.args, capture_stdout: false, program_name: name, measure_rss: false, limits };
    let outcome = match runtime.run(&wasm, &opts) {
        Ok(o) => o,
        Err(HostError::Deadline) => {
            return Err(Failure {
                code: EXIT_DEADLINE,
                message: format!(
                    "{} ran past its deadline of {} s and was stopped (raise --deadline)",
                    a.module.display(),
                    a.deadline.unwrap_or(0.0)
                ),
            }
            .into());
        }
        Err(HostError::Killed) => {
            return Err(Failure { code: EXIT_KILLED, message: format!("{} was killed", a.module.display()) }.into());
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("running {}", a.module.display()))),
    };
    Ok(outcome.exit_code)
}

/// `NAME:GGML:TARGET:PATH` as `NAME=PATH`, checking the encoding and target.
fn nn_preload(spec: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = spec.splitn(4, ':').collect();
    let [name, encoding, target, path] = parts.as_slice() else {
        anyhow::bail!("--nn-preload {spec}: expected NAME:GGML:TARGET:PATH, e.g. default:GGML:AUTO:model.gguf");
    };
    anyhow::ensure!(
        encoding.eq_ignore_ascii_case("GGML"),
        "--nn-preload {spec}: encoding `{encoding}`; shoal runs GGML models"
    );
    anyhow::ensure!(
        ["AUTO", "CPU", "GPU"].iter().any(|t| t.eq_ignore_ascii_case(target)),
        "--nn-preload {spec}: target `{target}` (AUTO, CPU or GPU)"
    );
    anyhow::ensure!(!name.is_empty(), "--nn-preload {spec}: the name is empty");
    Ok(format!("{name}={path}"))
}
