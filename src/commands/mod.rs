//! One module per subcommand. Each takes parsed arguments and returns `anyhow::Result`; `main`
//! turns errors into a one-line message and an exit code.

pub mod bench;
pub mod experts;
pub mod generate;
pub mod run;
pub mod session;
pub mod simulate;
pub mod sweep;

use std::path::PathBuf;

use crate::cli::{BackendArgs, ModelArgs, UiArgs};
use crate::engine::{Available, BackendSpec, default_model_dir};
use crate::settings::Settings;
use crate::ui::UiOptions;

/// The backend spec from the common flags (default model: the bundled one).
pub fn backend_spec(model: &ModelArgs, backend: &BackendArgs, settings: &Settings) -> BackendSpec {
    BackendSpec {
        model_dir: model_dir(model),
        dtype: model.dtype,
        device: model.device.clone(),
        backend: backend.backend,
        cache: backend
            .cache
            .settings(model.device.is_cuda(), settings.cores),
        settings: settings.clone(),
    }
}

/// The memory the machine has for a run on `device` (GPU memory where NVML knows it).
pub fn available_memory(device: &crate::engine::DeviceSpec) -> Available {
    Available {
        host: crate::util::mem_available(),
        gpu: match device.cuda_index() {
            Some(i) => crate::worker::memory::Gpu::get().device_free(i),
            None => Some(0),
        },
    }
}

/// Refuses, with one line saying what would help, backends whose estimated footprint does not
/// fit the machine (`together`: loaded at the same time). Skipped with `--force`, and where the
/// host's available memory cannot be read.
pub fn guard_memory(
    model: &ModelArgs,
    needs: &[(&str, crate::engine::Footprint)],
    together: bool,
    model_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let available = available_memory(&model.device);
    if model.force || available.host == 0 {
        return Ok(());
    }
    crate::engine::check_fits(needs, together, available, model_dir)
        .map_err(|e| crate::errors::InputError(e).into())
}

/// The dashboard's options from its flags.
pub fn ui_options(a: &UiArgs) -> UiOptions {
    UiOptions {
        theme: a.theme.clone(),
        color: a.color.clone(),
        ascii: a.ascii,
        readonly: a.readonly,
        fps: a.fps,
    }
}

pub fn model_dir(model: &ModelArgs) -> PathBuf {
    model.model.clone().unwrap_or_else(default_model_dir)
}
