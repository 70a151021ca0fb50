//! `moescope verify DIR`: counts every (layer, expert) the config implies and checks each one —
//! in a checkpoint (through its index), an extraction (size, BLAKE3, shapes) or a seed-layout
//! directory (present, readable, right names and shapes). Lists exactly what is missing or
//! corrupt; the directory is complete only when both lists are empty.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::extract::{MANIFEST, Manifest};
use super::seed;
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{ExpertProj, MoeConfig};
use crate::model::error::{ModelError, Result};
use crate::model::safetensors_file::{SafetensorsFile, StDtype};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    Checkpoint,
    Extracted,
    SeedLayout,
}

impl LayoutKind {
    pub fn describe(self) -> &'static str {
        match self {
            LayoutKind::Checkpoint => "checkpoint",
            LayoutKind::Extracted => "moescope extraction",
            LayoutKind::SeedLayout => "seed-project layout",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LayerRow {
    pub layer: usize,
    pub expected: usize,
    pub present: usize,
    pub missing: Vec<usize>,
    /// (expert, what is wrong)
    pub corrupt: Vec<(usize, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub kind: LayoutKind,
    pub model_type: String,
    pub config_fingerprint: String,
    pub layers: Vec<LayerRow>,
    /// Problems with non-expert tensors (missing norms, wrong shapes…), one line each.
    pub non_expert: Vec<String>,
    /// Expert files that the config does not account for.
    pub unexpected: Vec<String>,
}

impl VerifyReport {
    pub fn expected(&self) -> usize {
        self.layers.iter().map(|l| l.expected).sum()
    }
    pub fn present(&self) -> usize {
        self.layers.iter().map(|l| l.present).sum()
    }
    pub fn missing(&self) -> usize {
        self.layers.iter().map(|l| l.missing.len()).sum()
    }
    pub fn corrupt(&self) -> usize {
        self.layers.iter().map(|l| l.corrupt.len()).sum()
    }
    pub fn complete(&self) -> bool {
        self.missing() == 0 && self.corrupt() == 0 && self.non_expert.is_empty()
    }
}

/// Detects what `dir` is and verifies it. `config_dir` supplies config.json when `dir` has none
/// (seed-layout directories usually do not).
pub fn verify(dir: &Path, config_dir: Option<&Path>) -> Result<VerifyReport> {
    // A GGUF file is a checkpoint that carries its own config.
    let gguf = crate::model::gguf::is_gguf(dir);
    if !dir.is_dir() && !gguf {
        return Err(ModelError::Checkpoint {
            file: dir.to_path_buf(),
            msg: "not a directory (nor a GGUF file)".into(),
        });
    }
    let kind = if gguf {
        LayoutKind::Checkpoint
    } else if dir.join(MANIFEST).exists() || dir.join(super::extract::JOURNAL).exists() {
        LayoutKind::Extracted
    } else if seed::looks_like_seed_layout(dir) {
        LayoutKind::SeedLayout
    } else {
        LayoutKind::Checkpoint
    };
    let cfg_dir = if gguf || dir.join("config.json").exists() {
        dir.to_path_buf()
    } else if let Some(c) = config_dir {
        c.to_path_buf()
    } else {
        return Err(ModelError::Config {
            file: dir.join("config.json"),
            field: String::new(),
            msg: "missing; pass --model DIR to take the config from the original checkpoint".into(),
        });
    };
    let cfg = MoeConfig::from_dir(&cfg_dir)?;
    let mut report = VerifyReport {
        dir: dir.to_path_buf(),
        kind,
        model_type: cfg.family.model_type().into(),
        config_fingerprint: cfg.fingerprint(),
        layers: cfg
            .moe_layers()
            .map(|l| LayerRow {
                layer: l,
                expected: cfg.num_experts,
                ..Default::default()
            })
            .collect(),
        non_expert: Vec::new(),
        unexpected: Vec::new(),
    };
    match kind {
        LayoutKind::Checkpoint => verify_checkpoint(dir, &cfg, &mut report)?,
        LayoutKind::Extracted => verify_extracted(dir, &cfg, &mut report)?,
        LayoutKind::SeedLayout => verify_seed(dir, &cfg, &mut report)?,
    }
    Ok(report)
}

fn row(report: &mut VerifyReport, layer: usize) -> &mut LayerRow {
    report
        .layers
        .iter_mut()
        .find(|r| r.layer == layer)
        .expect("moe layer row")
}

fn check_non_expert(store: &Checkpoint, cfg: &MoeConfig, report: &mut VerifyReport) {
    for (name, shape) in Checkpoint::required_tensors(cfg) {
        if let Err(e) = store.check(&name, &shape).and_then(|loc| {
            store.check_fp8_scales(&loc)?;
            store.check_block_scales(&loc)
        }) {
            report.non_expert.push(e.to_string());
        }
    }
}

fn verify_checkpoint(dir: &Path, cfg: &MoeConfig, report: &mut VerifyReport) -> Result<()> {
    use rayon::prelude::*;
    let ckpt = Checkpoint::open(dir)?;
    check_non_expert(&ckpt, cfg, report);
    let experts: Vec<(usize, usize)> = cfg
        .moe_layers()
        .flat_map(|layer| (0..cfg.num_experts).map(move |e| (layer, e)))
        .collect();
    // On threads: checking a GGUF expert reads all of it, and one thread reads ~2 GB/s, so a
    // 17 GB file took ~9 s on one (BENCHMARKS.md §115). The outcomes come back in order.
    let outcomes: Vec<Result<bool>> = experts
        .par_iter()
        .map(|&(layer, e)| check_expert(&ckpt, cfg, layer, e))
        .collect();
    for (&(layer, e), outcome) in experts.iter().zip(outcomes) {
        let r = row(report, layer);
        match outcome {
            Ok(true) => r.present += 1,
            Ok(false) => r.missing.push(e),
            Err(err) => r.corrupt.push((e, err.to_string())),
        }
    }
    Ok(())
}

/// Whether (layer, e) is in the checkpoint, or what is wrong with it. An FP8 expert's scales are
/// read too (a few hundred bytes a matrix), and a GGUF expert's blocks for theirs (every block
/// carries one, so that reads the expert): nothing else looks at them before a GPU slot pool
/// copies them in as stored.
fn check_expert(ckpt: &Checkpoint, cfg: &MoeConfig, layer: usize, e: usize) -> Result<bool> {
    let Some(loc) = ckpt.expert_location(cfg, layer, e)? else {
        return Ok(false);
    };
    for p in &loc.parts {
        ckpt.check_fp8_scales(p)?;
        ckpt.check_block_scales(p)?;
    }
    Ok(true)
}

fn verify_extracted(dir: &Path, cfg: &MoeConfig, report: &mut VerifyReport) -> Result<()> {
    let manifest = match Manifest::read(dir) {
        Ok(m) => m,
        Err(e) => {
            // An interrupted extraction has only its journal: everything counts as missing.
            report.non_expert.push(e.to_string());
            for r in &mut report.layers {
                r.missing = (0..cfg.num_experts).collect();
            }
            return Ok(());
        }
    };
    if manifest.config_fingerprint != cfg.fingerprint() {
        report.non_expert.push(format!(
            "{}: config fingerprint {} does not match config.json ({})",
            dir.join(MANIFEST).display(),
            manifest.config_fingerprint,
            cfg.fingerprint()
        ));
    }
    let entries: BTreeMap<(usize, usize), _> = manifest
        .experts
        .iter()
        .map(|e| ((e.layer, e.expert), e))
        .collect();
    for layer in cfg.moe_layers() {
        for e in 0..cfg.num_experts {
            let outcome = entries
                .get(&(layer, e))
                .map(|entry| check_extracted_entry(dir, cfg, entry));
            let r = row(report, layer);
            match outcome {
                None => r.missing.push(e),
                Some(Ok(())) => r.present += 1,
                Some(Err(why)) if why.starts_with("missing") => r.missing.push(e),
                Some(Err(why)) => r.corrupt.push((e, why)),
            }
        }
    }
    for (l, e) in entries.keys() {
        if !cfg.moe_layers().any(|m| m == *l) || *e >= cfg.num_experts {
            report
                .unexpected
                .push(format!("manifest entry layer {l} expert {e}"));
        }
    }
    Ok(())
}

fn check_extracted_entry(
    dir: &Path,
    cfg: &MoeConfig,
    entry: &super::extract::ManifestEntry,
) -> std::result::Result<(), String> {
    use std::io::Read;
    entry.check()?;
    let path = super::extract::inside(dir, &entry.file)?;
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("missing file {}", entry.file));
        }
        Err(e) => return Err(format!("{}: {e}", entry.file)),
    };
    // Only a regular file of the manifest's size is read, and never past that size: a link to
    // a device (say /dev/zero) would otherwise be read for ever.
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", entry.file))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", entry.file));
    }
    if meta.len() != entry.size {
        return Err(format!(
            "{}: {} bytes, manifest says {}",
            entry.file,
            meta.len(),
            entry.size
        ));
    }
    let mut hasher = blake3::Hasher::new();
    let read = std::io::copy(&mut file.take(entry.size), &mut hasher)
        .map_err(|e| format!("{}: {e}", entry.file))?;
    if read != entry.size {
        return Err(format!(
            "{}: ended after {read} bytes, manifest says {}",
            entry.file, entry.size
        ));
    }
    let hash = hasher.finalize().to_hex().to_string();
    if hash != entry.blake3 {
        return Err(format!(
            "{}: BLAKE3 {} does not match the manifest's {}",
            entry.file,
            &hash[..16],
            entry.blake3.chars().take(16).collect::<String>()
        ));
    }
    check_expert_file(&path, cfg, entry.layer, entry.expert)?;
    // The manifest's ranges must be the file's own (a source reads what the manifest says).
    let own = SafetensorsFile::open(&path).map_err(|e| e.to_string())?;
    for t in &entry.tensors {
        let info = own
            .info(&t.name)
            .ok_or_else(|| format!("{}: tensor `{}` missing", entry.file, t.name))?;
        if (info.offset, info.len, info.dtype.name(), &info.shape)
            != (t.offset, t.len, t.dtype.as_str(), &t.shape)
        {
            return Err(format!(
                "{}: tensor `{}` is {} {:?} at {}+{} in the file, the manifest says {} {:?} at {}+{}",
                entry.file,
                t.name,
                info.dtype.name(),
                info.shape,
                info.offset,
                info.len,
                t.dtype,
                t.shape,
                t.offset,
                t.len
            ));
        }
    }
    Ok(())
}

fn check_expert_file(
    path: &Path,
    cfg: &MoeConfig,
    layer: usize,
    expert: usize,
) -> std::result::Result<(), String> {
    let file = SafetensorsFile::open(path).map_err(|e| e.to_string())?;
    for proj in ExpertProj::ALL {
        let name = cfg.expert_tensor_name(layer, expert, proj);
        let info = file
            .info(&name)
            .ok_or_else(|| format!("{}: tensor `{name}` missing", path.display()))?;
        if info.shape != proj.shape(cfg) {
            return Err(format!(
                "{}: tensor `{name}` shape {:?}, expected {:?}",
                path.display(),
                info.shape,
                proj.shape(cfg)
            ));
        }
        if info.dtype == StDtype::F8E4M3
            && let Some(scheme) = cfg.quantization
        {
            // An FP8 matrix travels with its block scales.
            let scale = crate::model::fp8::Fp8Scheme::scale_name(&name).unwrap_or_default();
            let want = scheme.scale_shape(&info.shape);
            match file.info(&scale) {
                Some(s) if s.shape == want && s.dtype.float_dtype().is_some() => {
                    let values = file
                        .load(&scale, candle_core::DType::F32, &candle_core::Device::Cpu)
                        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                        .map_err(|e| format!("{}: tensor `{scale}`: {e}", path.display()))?;
                    crate::model::fp8::check_scales_finite(&values, want[1])
                        .map_err(|msg| format!("{}: tensor `{name}`: {msg}", path.display()))?;
                    continue;
                }
                Some(s) => {
                    return Err(format!(
                        "{}: tensor `{scale}` is {} {:?}, expected float scales of shape {want:?}",
                        path.display(),
                        s.dtype.name(),
                        s.shape
                    ));
                }
                None => {
                    return Err(format!(
                        "{}: tensor `{name}` is F8_E4M3 but its scales `{scale}` are missing",
                        path.display()
                    ));
                }
            }
        }
        if info.dtype.float_dtype().is_none() {
            return Err(format!(
                "{}: tensor `{name}` has dtype {}",
                path.display(),
                info.dtype.name()
            ));
        }
    }
    Ok(())
}

fn verify_seed(dir: &Path, cfg: &MoeConfig, report: &mut VerifyReport) -> Result<()> {
    match seed::open_non_expert_store(dir) {
        Ok(store) => check_non_expert(&store, cfg, report),
        Err(e) => report.non_expert.push(e.to_string()),
    }
    let files = seed::scan_expert_files(dir)?;
    for layer in cfg.moe_layers() {
        for e in 0..cfg.num_experts {
            let outcome = files
                .get(&(layer, e))
                .map(|p| check_expert_file(p, cfg, layer, e));
            let r = row(report, layer);
            match outcome {
                None => r.missing.push(e),
                Some(Ok(())) => r.present += 1,
                Some(Err(why)) => r.corrupt.push((e, why)),
            }
        }
    }
    let mut extra: Vec<String> = files
        .iter()
        .filter(|((l, e), _)| !cfg.moe_layers().any(|m| m == *l) || *e >= cfg.num_experts)
        .map(|(_, p)| p.display().to_string())
        .collect();
    extra.sort();
    report.unexpected = extra;
    Ok(())
}
