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
use crate::engine::{BackendSpec, default_model_dir};
use crate::settings::Settings;
use crate::ui::UiOptions;

/// The backend spec from the common flags (default model: the bundled one).
pub fn backend_spec(model: &ModelArgs, backend: &BackendArgs, settings: &Settings) -> BackendSpec {
    BackendSpec {
        model_dir: model_dir(model),
        dtype: model.dtype,
        device: model.device.clone(),
        backend: backend.backend,
        cache: backend.cache.settings(),
        settings: settings.clone(),
    }
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
