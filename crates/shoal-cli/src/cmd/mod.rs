//! One module per subcommand.

pub mod demo;
pub mod devices;
pub mod run;

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
