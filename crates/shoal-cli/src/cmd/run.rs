//! `shoal run [--dir HOST:GUEST]... [--env K=V]... [--nn-preload NAME:GGML:TARGET:PATH]...
//! [--backend B] [--deadline SECS] [--max-memory SIZE] [--max-context N] MODULE.wasm [ARGS]...`
//!
//! Takes WasmEdge's command lines as they are pasted: shoal's flags come before the module,
//! everything after it is the guest's.`

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use shoal_host::{HostError, RunOptions, Runtime};

use super::{BackendChoice, EXIT_DEADLINE, EXIT_KILLED, Failure, LimitArgs, open_device, parse_secs};

/// Flags of `shoal run`.
#[derive(clap::Args)]
pub struct Args {
    /// A host directory the guest may open, read and write, as WasmEdge takes it: HOST:GUEST
    /// (`--dir .:.`), or DIR for the same path on both sides. Repeatable. Without it the guest
    /// sees no files at all.
    #[arg(long = "dir", value_name = "HOST:GUEST")]
    dirs: Vec<String>,
    /// An environment variable for the guest: K=V. Repeatable. The guest sees no other.
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// The compute backend the guest's shoal_v1 calls run on.
    #[arg(long, value_enum, default_value_t)]
    backend: BackendChoice,
    /// A model the guest may open by name: NAME=PATH (a GGUF file or a Hugging Face
    /// directory), a path, or a name from the models directory (`shoal models`); repeat for
    /// several. The default model (`smollm2`) is known when its file is found.
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
    /// The module, then the guest's arguments. The module is a WASI command (a wasm32-wasip1
    /// module, binary .wasm or text .wat, or a wasm32-wasip2 component). Shoal's flags come
    /// before it; everything after it is passed to the guest, flags included, even those
    /// shoal also has (`app.wasm --model NAME --prompt hi`; a `--` right after the module is
    /// dropped).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "MODULE [ARGS]")]
    command: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let mut command = a.command.into_iter();
    let module = PathBuf::from(command.next().unwrap_or_default());
    let module_name = module.to_string_lossy().into_owned();
    anyhow::ensure!(
        !module_name.starts_with('-'),
        "unknown option `{module_name}` (shoal run's options come before the module; see shoal run --help)"
    );
    let mut args: Vec<String> = command.collect();
    // `app.wasm -- ARGS`: the `--` is shoal's, not the guest's.
    if args.first().is_some_and(|s| s == "--") {
        args.remove(0);
    }
    let dirs = a.dirs.iter().map(|d| dir(d)).collect::<anyhow::Result<Vec<_>>>()?;
    let env = a.env.iter().map(|e| env_var(e)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut specs = a.models.clone();
    for p in &a.nn_preload {
        specs.push(nn_preload(p)?);
    }
    let wasm = std::fs::read(&module).with_context(|| format!("cannot read {}", module.display()))?;
    let device = open_device(a.backend)?;
    log::info!("running {} on {}", module.display(), device.info().name);
    let engine = super::engine_for(&device);
    let models = if specs.is_empty() && shoal_host::default_model_path().is_none() {
        std::sync::Arc::new(shoal_host::Models::with_engine(engine))
    } else {
        super::models(&specs, engine)?.0
    };
    let runtime = Runtime::with_models(device, models)?;
    let name = module.file_name().map(|n| n.to_string_lossy().into_owned());
    let limits = a.limits.limits(a.deadline.map(Duration::from_secs_f64));
    let opts = RunOptions { args, program_name: name, limits, dirs, env, ..Default::default() };
    let outcome = match runtime.run(&wasm, &opts) {
        Ok(o) => o,
        Err(HostError::Deadline) => {
            return Err(Failure {
                code: EXIT_DEADLINE,
                message: format!(
                    "{} ran past its deadline of {} s and was stopped (raise --deadline)",
                    module.display(),
                    a.deadline.unwrap_or(0.0)
                ),
            }
            .into());
        }
        Err(HostError::Killed) => {
            return Err(Failure { code: EXIT_KILLED, message: format!("{} was killed", module.display()) }.into());
        }
        Err(HostError::Trap(e)) if e.downcast_ref::<shoal_host::NnFailure>().is_some() => {
            // The guest stopped itself (a panic, an unwrap) on a wasi-nn error: the error is
            // what to fix; the guest's backtrace is for `RUST_LOG=debug`.
            let nn = e.downcast_ref::<shoal_host::NnFailure>().map(|f| f.0.clone()).unwrap_or_default();
            log::debug!("the guest's trap: {e:?}");
            anyhow::bail!("{} stopped ({}) after wasi-nn failed: {nn}", module.display(), e.root_cause());
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("running {}", module.display()))),
    };
    if outcome.exit_code != 0
        && let Some(e) = &outcome.stats.last_error
    {
        // What the guest did not say: why its last host call failed (a model name not
        // preloaded, say).
        eprintln!("shoal: {} exited with code {}; its last failed host call: {e}", module.display(), outcome.exit_code);
    }
    Ok(outcome.exit_code)
}

/// `--dir HOST:GUEST` (or `DIR`): the host directory, which must exist, and the guest's path.
fn dir(spec: &str) -> anyhow::Result<(PathBuf, String)> {
    let (host, guest) = spec.split_once(':').unwrap_or((spec, spec));
    anyhow::ensure!(
        !host.is_empty() && !guest.is_empty(),
        "--dir {spec}: expected HOST:GUEST (e.g. `.:.`) or DIR, with neither side empty"
    );
    let path = PathBuf::from(host);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => Ok((path, guest.to_string())),
        Ok(_) => anyhow::bail!("--dir {spec}: {host} is not a directory"),
        Err(e) => anyhow::bail!("--dir {spec}: no such directory: {host} ({e})"),
    }
}

/// `--env K=V`.
fn env_var(spec: &str) -> anyhow::Result<(String, String)> {
    match spec.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => Ok((k.to_string(), v.to_string())),
        _ => anyhow::bail!("--env {spec:?}: expected K=V, with a name before the `=`"),
    }
}

/// The form `--nn-preload` takes, for its messages.
const PRELOAD_FORM: &str = "NAME:GGML:TARGET:PATH (e.g. default:GGML:AUTO:model.gguf; TARGET is AUTO, CPU or GPU)";

/// `NAME:GGML:TARGET:PATH` as `NAME=PATH`, checking each part and that the file is there.
fn nn_preload(spec: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = spec.splitn(4, ':').collect();
    let [name, encoding, target, path] = parts.as_slice() else {
        anyhow::bail!("--nn-preload {spec}: {} of the 4 parts separated by `:`; expected {PRELOAD_FORM}", parts.len());
    };
    anyhow::ensure!(!name.is_empty(), "--nn-preload {spec}: the name (first part) is empty; expected {PRELOAD_FORM}");
    anyhow::ensure!(
        encoding.eq_ignore_ascii_case("GGML"),
        "--nn-preload {spec}: encoding `{encoding}` (second part); shoal runs GGML models: expected {PRELOAD_FORM}"
    );
    anyhow::ensure!(
        ["AUTO", "CPU", "GPU"].iter().any(|t| t.eq_ignore_ascii_case(target)),
        "--nn-preload {spec}: target `{target}` (third part) is none of AUTO, CPU, GPU; expected {PRELOAD_FORM}"
    );
    anyhow::ensure!(!path.is_empty(), "--nn-preload {spec}: the path (fourth part) is empty; expected {PRELOAD_FORM}");
    anyhow::ensure!(std::path::Path::new(path).exists(), "--nn-preload {spec}: no such file: {path}");
    Ok(format!("{name}={path}"))
}
