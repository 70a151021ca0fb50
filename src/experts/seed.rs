//! Read-only use of the directory layout the seed project wrote (see
//! shared/reference/qwen3-moe-layouts.md): one safetensors file per (layer, expert) named
//! `experts/thinker_expert_EEE_layer_LL.safetensors`, and the non-expert weights split over
//! `embeddings/`, `lm_head/`, `final_norm/`, `attention/`, `norms/` and `routers/`.
//!
//! Users have such directories with experts (and norms) missing; we never guess — what is not
//! there is reported by `verify` and refused at load unless the user accepts a DEGRADED run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::source::{ExpertSource, RawExpert, RawPart, drop_page_cache};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{ExpertProj, MoeConfig};
use crate::model::error::{ModelError, Result};
use crate::model::safetensors_file::SafetensorsFile;

/// Subdirectories holding the non-expert weights.
pub const NON_EXPERT_DIRS: [&str; 6] = [
    "embeddings",
    "lm_head",
    "final_norm",
    "attention",
    "norms",
    "routers",
];

/// Is `dir` a seed-layout directory?
pub fn looks_like_seed_layout(dir: &Path) -> bool {
    dir.join("experts").is_dir()
        && (dir.join("extraction_manifest.json").exists()
            || dir.join("expert_availability_map.json").exists()
            || dir.join("embeddings").is_dir())
        && !dir.join(super::extract::MANIFEST).exists()
}

/// Parses `…expert_EEE_layer_LL.safetensors` into (layer, expert).
pub fn parse_expert_file_name(name: &str) -> Option<(usize, usize)> {
    let stem = name.strip_suffix(".safetensors")?;
    let at = stem.rfind("expert_")?;
    let rest = &stem[at + "expert_".len()..];
    let (e, l) = rest.split_once("_layer_")?;
    if e.is_empty()
        || l.is_empty()
        || !e.bytes().all(|b| b.is_ascii_digit())
        || !l.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((l.parse().ok()?, e.parse().ok()?))
}

/// (layer, expert) → file, for every expert file present.
pub fn scan_expert_files(dir: &Path) -> Result<HashMap<(usize, usize), PathBuf>> {
    let experts = dir.join("experts");
    let rd = std::fs::read_dir(&experts).map_err(|e| ModelError::Io {
        path: experts.clone(),
        what: "listing the seed layout's expert files".into(),
        source: e,
    })?;
    let mut out = HashMap::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(k) = parse_expert_file_name(&name) {
            out.insert(k, entry.path());
        }
    }
    Ok(out)
}

/// The non-expert weights of a seed-layout directory, as a checkpoint.
pub fn open_non_expert_store(dir: &Path) -> Result<Checkpoint> {
    let mut files = Vec::new();
    for sub in NON_EXPERT_DIRS {
        let d = dir.join(sub);
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut names: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|p| p.strip_prefix(dir).ok().map(|p| p.to_path_buf()))
            .collect();
        names.sort();
        files.extend(names);
    }
    if files.is_empty() {
        return Err(ModelError::Checkpoint {
            file: dir.to_path_buf(),
            msg: format!(
                "no non-expert weight files found (expected safetensors under {})",
                NON_EXPERT_DIRS.join("/, ")
            ),
        });
    }
    Checkpoint::from_files(dir, &files)
}

/// Experts read from the seed layout's per-expert files.
pub struct SeedExpertSource {
    cfg: MoeConfig,
    dir: PathBuf,
    files: HashMap<(usize, usize), PathBuf>,
    cold: AtomicBool,
}

impl SeedExpertSource {
    pub fn open(dir: &Path, cfg: &MoeConfig) -> Result<Self> {
        Ok(SeedExpertSource {
            cfg: cfg.clone(),
            dir: dir.to_path_buf(),
            files: scan_expert_files(dir)?,
            cold: AtomicBool::new(false),
        })
    }

    pub fn file(&self, layer: usize, expert: usize) -> Option<&Path> {
        self.files.get(&(layer, expert)).map(|p| p.as_path())
    }
}

impl ExpertSource for SeedExpertSource {
    fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    fn has(&self, layer: usize, expert: usize) -> bool {
        self.files.contains_key(&(layer, expert))
    }

    fn read(&self, layer: usize, expert: usize) -> Result<RawExpert> {
        let path = self
            .file(layer, expert)
            .ok_or_else(|| super::source::missing_error(self, layer, expert))?;
        let file = SafetensorsFile::open(path)?;
        let mut parts = Vec::with_capacity(3);
        for proj in ExpertProj::ALL {
            let name = self.cfg.expert_tensor_name(layer, expert, proj);
            let info = file.info(&name).ok_or_else(|| ModelError::Tensor {
                file: path.to_path_buf(),
                tensor: name.clone(),
                msg: "missing from this expert file".into(),
            })?;
            if info.shape != proj.shape(&self.cfg) {
                return Err(ModelError::Tensor {
                    file: path.to_path_buf(),
                    tensor: name,
                    msg: format!(
                        "shape {:?}, expected {:?}",
                        info.shape,
                        proj.shape(&self.cfg)
                    ),
                });
            }
            parts.push(RawPart {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                bytes: file.bytes(info).to_vec(),
                scale: None,
            });
        }
        if self.cold.load(Ordering::Relaxed)
            && let Ok(f) = std::fs::File::open(path)
        {
            drop_page_cache(&f, 0, 0);
        }
        Ok(RawExpert {
            layer,
            expert,
            parts: parts.try_into().expect("three parts"),
        })
    }

    fn stored_bytes(&self, _layer: usize, _expert: usize) -> u64 {
        super::source::default_expert_bytes(&self.cfg)
    }

    fn describe(&self) -> String {
        format!("the seed layout in {}", self.dir.display())
    }

    fn set_cold(&self, cold: bool) {
        self.cold.store(cold, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_file_names() {
        assert_eq!(
            parse_expert_file_name("thinker_expert_007_layer_12.safetensors"),
            Some((12, 7))
        );
        assert_eq!(
            parse_expert_file_name("expert_1_layer_2.safetensors"),
            Some((2, 1))
        );
        assert_eq!(
            parse_expert_file_name("thinker_expert_x_layer_1.safetensors"),
            None
        );
        assert_eq!(parse_expert_file_name("notes.txt"), None);
    }
}
