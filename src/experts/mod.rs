//! Expert sources, the cache and its policies, extraction and verification. No UI.

pub mod cache;
pub mod convert;
pub mod direct;
pub mod extract;
pub mod policy;
pub mod resident;
pub mod seed;
pub mod source;
pub mod speculation;
pub mod stats;
pub mod upload;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::config::MoeConfig;
use crate::model::error::{ModelError, Result};
use cache::{CacheConfig, Capacity, Scope};
use policy::PolicyKind;
use source::ExpertSource;

/// Where the selective backend reads experts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "dir", rename_all = "lowercase")]
pub enum SourceSpec {
    /// The checkpoint's own shards, at the byte ranges of the index.
    Shards,
    /// A directory made by `moescope extract`.
    Extracted(PathBuf),
    /// The seed project's layout (read-only).
    SeedLayout(PathBuf),
}

impl SourceSpec {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if s == "shards" {
            return Ok(SourceSpec::Shards);
        }
        let bad = || {
            format!("bad expert source \"{s}\": expected shards, extracted:DIR or seedlayout:DIR")
        };
        let (kind, dir) = s.split_once(':').ok_or_else(bad)?;
        if dir.is_empty() {
            return Err(bad());
        }
        match kind {
            "extracted" => Ok(SourceSpec::Extracted(dir.into())),
            "seedlayout" => Ok(SourceSpec::SeedLayout(dir.into())),
            _ => Err(bad()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            SourceSpec::Shards => "shards".into(),
            SourceSpec::Extracted(d) => format!("extracted:{}", d.display()),
            SourceSpec::SeedLayout(d) => format!("seedlayout:{}", d.display()),
        }
    }
}

impl std::fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Speculative loading of the next layer's experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PrefetchMode {
    #[default]
    None,
    /// While layer L runs, apply layer L+1's router to layer L's hidden state and load the
    /// experts it picks on a background thread.
    NextLayer,
    /// `next-layer` on a CPU with at least 4 cores, otherwise `none`: loading ahead paid where
    /// a core was spare and cost 7–14 % of decode speed on 2 cores (BENCHMARKS.md §3); on a GPU
    /// it is not built.
    Auto,
}

impl PrefetchMode {
    /// Fewest cores at which `auto` prefetches.
    pub const AUTO_MIN_CORES: usize = 4;

    /// What `auto` means here: `cuda` for a GPU run, `cores` available to this process.
    pub fn resolve(self, cuda: bool, cores: usize) -> PrefetchMode {
        match self {
            PrefetchMode::Auto if !cuda && cores >= Self::AUTO_MIN_CORES => PrefetchMode::NextLayer,
            PrefetchMode::Auto => PrefetchMode::None,
            m => m,
        }
    }

    /// [`resolve`](Self::resolve) on this machine. `MOESCOPE_TEST_CORES` stands in for the core
    /// count (a test hook: the suite runs both ways on any machine).
    pub fn resolve_here(self, cuda: bool) -> PrefetchMode {
        let cores = std::env::var("MOESCOPE_TEST_CORES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        self.resolve(cuda, cores)
    }

    pub fn is_on(self) -> bool {
        self == PrefetchMode::NextLayer
    }
}

/// The cache and source flags shared by every command that can run the selective backend.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize, PartialEq)]
pub struct CacheArgs {
    /// Cache capacity as a number of experts (default: 25 % of all experts).
    #[arg(long, value_name = "N", conflicts_with = "cache_mem")]
    pub cache_experts: Option<usize>,
    /// Cache capacity as a memory budget, e.g. 4GiB (experts in the compute dtype).
    #[arg(long, value_name = "SIZE", value_parser = crate::util::parse_bytes)]
    pub cache_mem: Option<u64>,
    /// One pool for all layers, or an equal share per layer.
    #[arg(long, value_enum, default_value_t = Scope::Global)]
    pub cache_scope: Scope,
    /// Eviction policy. Default S3-FIFO: on every routing trace measured (BENCHMARKS.md §3) it
    /// captures more of the optimum than LRU, LFU or FIFO at caches of 25 % and less.
    #[arg(long, value_enum, default_value_t = PolicyKind::S3fifo)]
    pub policy: PolicyKind,
    /// Where experts are read from: shards | extracted:DIR | seedlayout:DIR.
    #[arg(long, default_value = "shards", value_parser = SourceSpec::parse)]
    pub expert_source: SourceSpec,
    /// Run even if experts are missing: they are masked out of routing and every result of the
    /// run is labelled DEGRADED.
    #[arg(long)]
    pub allow_missing_experts: bool,
    /// Evict each expert's file pages after reading it (posix_fadvise DONTNEED), so every miss
    /// is a storage read. Default: warm (page cache left alone).
    #[arg(long)]
    pub cold: bool,
    /// Load the next layer's guessed experts on a background thread. Default auto: on a CPU
    /// with at least 4 cores (it needs a spare one), off on 2 cores and on a GPU.
    #[arg(long, value_enum, default_value_t = PrefetchMode::Auto)]
    pub prefetch: PrefetchMode,
    /// Testing aid: mask these experts (LAYER:EXPERT,…) out of routing, as if missing. The run is
    /// labelled DEGRADED. Used to prove that quality checks catch a perturbed backend.
    #[arg(long, value_delimiter = ',', value_parser = parse_layer_expert, hide = true)]
    pub mask_experts: Vec<(usize, usize)>,
}

impl Default for CacheArgs {
    fn default() -> Self {
        CacheArgs {
            cache_experts: None,
            cache_mem: None,
            cache_scope: Scope::Global,
            policy: PolicyKind::S3fifo,
            expert_source: SourceSpec::Shards,
            allow_missing_experts: false,
            cold: false,
            prefetch: PrefetchMode::None,
            mask_experts: Vec::new(),
        }
    }
}

fn parse_layer_expert(s: &str) -> std::result::Result<(usize, usize), String> {
    let (l, e) = s
        .split_once(':')
        .ok_or_else(|| format!("bad expert \"{s}\": expected LAYER:EXPERT"))?;
    Ok((
        l.parse().map_err(|_| format!("bad layer in \"{s}\""))?,
        e.parse().map_err(|_| format!("bad expert in \"{s}\""))?,
    ))
}

impl CacheArgs {
    /// The cache configuration for a model (fills in the default capacity).
    pub fn cache_config(&self, cfg: &MoeConfig) -> CacheConfig {
        let capacity = match (self.cache_experts, self.cache_mem) {
            (Some(n), _) => Capacity::Experts(n),
            (None, Some(b)) => Capacity::Bytes(b),
            (None, None) => Capacity::Experts(default_capacity(cfg)),
        };
        CacheConfig {
            capacity,
            scope: self.cache_scope,
            policy: self.policy,
        }
    }
}

/// 25 % of the model's experts, at least top-k per MoE layer's share.
pub fn default_capacity(cfg: &MoeConfig) -> usize {
    (cfg.total_experts() / 4).max(cfg.num_experts_per_tok)
}

/// Opens the expert source a spec names, for the model whose config is `cfg`.
pub fn open_source(
    spec: &SourceSpec,
    cfg: &MoeConfig,
    ckpt: Option<&crate::model::Checkpoint>,
) -> Result<Arc<dyn ExpertSource>> {
    match spec {
        SourceSpec::Shards => {
            let ckpt = ckpt.ok_or_else(|| {
                ModelError::Input("the shards source needs the model checkpoint".into())
            })?;
            Ok(Arc::new(source::ShardSource::new(ckpt, cfg)?))
        }
        SourceSpec::Extracted(dir) => Ok(Arc::new(extract::ExtractedSource::open(dir, cfg)?)),
        SourceSpec::SeedLayout(dir) => Ok(Arc::new(seed::SeedExpertSource::open(dir, cfg)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::PrefetchMode::{self, *};

    #[test]
    fn auto_prefetches_only_on_a_cpu_with_a_core_to_spare() {
        assert_eq!(Auto.resolve(false, 2), None);
        assert_eq!(Auto.resolve(false, 3), None);
        assert_eq!(Auto.resolve(false, PrefetchMode::AUTO_MIN_CORES), NextLayer);
        assert_eq!(Auto.resolve(true, 64), None, "not built on the GPU");
        // Explicit choices stand.
        assert_eq!(NextLayer.resolve(false, 2), NextLayer);
        assert_eq!(None.resolve(false, 64), None);
    }
}
