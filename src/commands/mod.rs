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

/// Writes a command's output file (`-o`, `--save`) atomically, but never over a recording or a
/// routing trace: those are what sessions leave behind, and `export REC -o REC` had turned a
/// recording into its own report.
pub fn write_output(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    check_output(path)?;
    crate::util::write_atomic(path, text).map_err(|e| {
        anyhow::Error::new(crate::errors::InputError(format!(
            "{}: cannot write: {e}",
            path.display()
        )))
    })
}

/// Refuses an output path that holds a recording or a routing trace. A command that runs for a
/// long time before writing (`sweep`) asks first, so the refusal does not come after the run.
pub fn check_output(path: &std::path::Path) -> anyhow::Result<()> {
    if let Some(kind) = session_file_kind(path) {
        crate::bail_input!(
            "{}: is a moescope {kind}; an output is never written over one (choose another path)",
            path.display()
        );
    }
    Ok(())
}

/// "recording" or "routing trace" when `path` is a regular file whose first line is that
/// format's header (read up to 1 MiB: a header line is far shorter). Anything else — a pipe
/// above all, which reading would block on — is not looked into.
fn session_file_kind(path: &std::path::Path) -> Option<&'static str> {
    use std::io::{BufRead, Read};
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let file = std::fs::File::open(path).ok()?;
    let mut first = String::new();
    std::io::BufReader::new(file.take(1 << 20))
        .read_line(&mut first)
        .ok()?;
    if crate::session::record::parse_header(first.trim_end(), path).is_ok() {
        return Some("recording");
    }
    let v: serde_json::Value = serde_json::from_str(first.trim_end()).ok()?;
    crate::cache::trace::is_trace_header(&v).then_some("routing trace")
}

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
