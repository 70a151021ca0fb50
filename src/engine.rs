//! Putting a backend together: config → checkpoint (validated) → resident weights → expert
//! provider. `native` and `selective` differ only in the provider they build here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::experts::provider::{ExpertProvider, Resident};
use crate::experts::source::{ExpertSource, ShardSource};
use crate::model::checkpoint::{Checkpoint, ExpertInventory};
use crate::model::config::MoeConfig;
use crate::model::error::{ModelError, Result};
use crate::model::qwen3_moe::{Qwen3Moe, WeightStore};

/// Compute dtype for the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn candle(self) -> DType {
        match self {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
            Dtype::F16 => DType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

/// `cpu` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec(pub String);

impl DeviceSpec {
    pub fn cpu() -> Self {
        DeviceSpec("cpu".into())
    }

    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if s == "cpu" {
            return Ok(Self::cpu());
        }
        if let Some(n) = s.strip_prefix("cuda:").or(if s == "cuda" { Some("0") } else { None }) {
            n.parse::<usize>()
                .map(|n| DeviceSpec(format!("cuda:{n}")))
                .map_err(|_| format!("bad device \"{s}\": expected cpu or cuda:N"))
        } else {
            Err(format!("bad device \"{s}\": expected cpu or cuda:N"))
        }
    }

    pub fn open(&self) -> Result<Device> {
        if self.0 == "cpu" {
            return Ok(Device::Cpu);
        }
        let n: usize = self.0.trim_start_matches("cuda:").parse().unwrap_or(0);
        if !cfg!(feature = "cuda") {
            return Err(ModelError::Input(format!(
                "device {} needs a build with CUDA support (cargo build --release --features cuda)",
                self.0
            )));
        }
        Device::new_cuda(n).map_err(|e| ModelError::Input(format!("opening {}: {e}", self.0)))
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A model directory opened and checked: config, checkpoint, expert inventory.
pub struct ModelFiles {
    pub dir: PathBuf,
    pub cfg: MoeConfig,
    pub ckpt: Checkpoint,
    pub inventory: ExpertInventory,
}

impl ModelFiles {
    /// Reads the config and validates every tensor the config implies against the checkpoint.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg = MoeConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let inventory = ckpt.validate(&cfg)?;
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            cfg,
            ckpt,
            inventory,
        })
    }
}

/// A loaded model ready to run: resident non-expert weights + an expert provider.
pub struct Engine {
    pub cfg: MoeConfig,
    pub model: Qwen3Moe,
    pub provider: Arc<dyn ExpertProvider>,
    pub load_time: Duration,
    pub dtype: Dtype,
    pub device: DeviceSpec,
    /// True when missing experts were allowed and some are masked out (results are DEGRADED).
    pub degraded: bool,
}

impl Engine {
    /// The native backend: every expert resident.
    pub fn native(
        files: &ModelFiles,
        dtype: Dtype,
        device: &DeviceSpec,
        allow_missing: bool,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let start = Instant::now();
        let dev = device.open()?;
        let source = ShardSource::new(&files.ckpt, &files.cfg)?;
        let model = Qwen3Moe::load(&files.ckpt, &files.cfg, dtype.candle(), &dev)?;
        let provider = Resident::load(&source, dtype.candle(), &dev, allow_missing, progress)?;
        Ok(Engine {
            cfg: files.cfg.clone(),
            model,
            provider: Arc::new(provider),
            load_time: start.elapsed(),
            dtype,
            device: device.clone(),
            degraded: !files.inventory.missing.is_empty() && allow_missing,
        })
    }

    /// Any provider over non-expert weights from `store` (used by the selective backend).
    pub fn with_provider(
        cfg: &MoeConfig,
        store: &dyn WeightStore,
        dtype: Dtype,
        device: &DeviceSpec,
        make_provider: impl FnOnce(&Device) -> Result<Arc<dyn ExpertProvider>>,
        degraded: bool,
    ) -> Result<Self> {
        let start = Instant::now();
        let dev = device.open()?;
        let model = Qwen3Moe::load(store, cfg, dtype.candle(), &dev)?;
        let provider = make_provider(&dev)?;
        Ok(Engine {
            cfg: cfg.clone(),
            model,
            provider,
            load_time: start.elapsed(),
            dtype,
            device: device.clone(),
            degraded,
        })
    }
}

/// Checks that an expert source can supply every expert the config implies.
pub fn check_source_complete(source: &dyn ExpertSource, allow_missing: bool) -> Result<usize> {
    let cfg = source.config();
    let mut missing = 0;
    for layer in cfg.moe_layers() {
        for e in 0..cfg.num_experts {
            if !source.has(layer, e) {
                if !allow_missing {
                    return Err(crate::experts::provider::missing_error(source, layer, e));
                }
                missing += 1;
            }
        }
    }
    Ok(missing)
}
