//! The cache's settings as plain serde types: what a recording's header, a worker's load
//! command and the simulator all read. The command line converts its flags into these
//! (`cli.rs`), so renaming a flag never changes the recording format.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::policy::PolicyKind;

/// How big the cache is: a count of experts, or a byte budget (converted to a count, since every
/// expert of a model has the same size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    Experts(usize),
    Bytes(u64),
}

/// One pool for all layers, or an equal share per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// One pool shared by all layers.
    Global,
    /// Each MoE layer gets an equal share of the capacity.
    Layer,
}

impl Scope {
    pub const ALL: [Scope; 2] = [Scope::Global, Scope::Layer];

    pub fn name(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Layer => "layer",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Scope::Global => "One pool shared by all layers",
            Scope::Layer => "Each MoE layer gets an equal share of the capacity",
        }
    }
}

/// Capacity, scope and policy: what the cache's bookkeeping needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    pub capacity: Capacity,
    pub scope: Scope,
    pub policy: PolicyKind,
}

impl CacheConfig {
    /// Capacity in experts for a model whose experts take `expert_bytes` each in memory.
    pub fn capacity_experts(&self, expert_bytes: u64) -> usize {
        match self.capacity {
            Capacity::Experts(n) => n,
            Capacity::Bytes(b) => (b / expert_bytes.max(1)) as usize,
        }
    }

    pub fn describe(&self) -> String {
        let cap = match self.capacity {
            Capacity::Experts(n) => format!("{n} experts"),
            Capacity::Bytes(b) => crate::util::fmt_bytes(b),
        };
        format!("{cap}, {} scope, {}", self.scope.name(), self.policy.name())
    }
}

/// Speculative loading of the next layer's experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
    pub const ALL: [PrefetchMode; 3] = [
        PrefetchMode::None,
        PrefetchMode::NextLayer,
        PrefetchMode::Auto,
    ];

    /// Fewest cores at which `auto` prefetches.
    pub const AUTO_MIN_CORES: usize = 4;

    pub fn name(self) -> &'static str {
        match self {
            PrefetchMode::None => "none",
            PrefetchMode::NextLayer => "next-layer",
            PrefetchMode::Auto => "auto",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            PrefetchMode::None => "Load experts only when a layer asks for them",
            PrefetchMode::NextLayer => {
                "While layer L runs, load what layer L+1's router picks from layer L's hidden \
                 state, on a background thread"
            }
            PrefetchMode::Auto => "next-layer on a CPU with at least 4 cores, otherwise none",
        }
    }

    /// What `auto` means on a machine: `cuda` for a GPU run, `cores` available to the process.
    pub fn resolve(self, cuda: bool, cores: usize) -> PrefetchMode {
        match self {
            PrefetchMode::Auto if !cuda && cores >= Self::AUTO_MIN_CORES => PrefetchMode::NextLayer,
            PrefetchMode::Auto => PrefetchMode::None,
            m => m,
        }
    }

    pub fn is_on(self) -> bool {
        self == PrefetchMode::NextLayer
    }
}

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
    pub fn parse(s: &str) -> Result<Self, String> {
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

/// Everything the selective backend's cache is set up with, as recorded in a recording's header
/// and sent to a worker. The field names are the recording format (they match the flags of the
/// first recordings, which still read back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheSettings {
    /// Capacity as a number of experts (None: see `cache_mem`, else 25 % of all experts).
    pub cache_experts: Option<usize>,
    /// Capacity as a memory budget in bytes (experts as held: `ports::held_dtype`).
    pub cache_mem: Option<u64>,
    pub cache_scope: Scope,
    pub policy: PolicyKind,
    pub expert_source: SourceSpec,
    /// Run even if experts are missing: they are masked out of routing (DEGRADED).
    pub allow_missing_experts: bool,
    /// Evict each expert's file pages after reading it, so every miss is a storage read.
    pub cold: bool,
    pub prefetch: PrefetchMode,
    /// Testing aid: these (layer, expert) pairs are masked out of routing, as if missing.
    pub mask_experts: Vec<(usize, usize)>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
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

impl CacheSettings {
    /// The cache configuration for a model of `total_experts` experts, `top_k` per token
    /// (fills in the default capacity).
    pub fn cache_config(&self, total_experts: usize, top_k: usize) -> CacheConfig {
        let capacity = match (self.cache_experts, self.cache_mem) {
            (Some(n), _) => Capacity::Experts(n),
            (None, Some(b)) => Capacity::Bytes(b),
            (None, None) => Capacity::Experts(default_capacity(total_experts, top_k)),
        };
        CacheConfig {
            capacity,
            scope: self.cache_scope,
            policy: self.policy,
        }
    }
}

/// The eviction policy when none is chosen, for the prefetch mode that runs (resolved, see
/// [`PrefetchMode::resolve`]): S3-FIFO on demand loading — on every routing trace measured it
/// captured more of the optimum than LRU, LFU or FIFO at caches of 25 % and less — and LRU with
/// next-layer prefetch, where S3-FIFO's probation queue lets guessed experts go before their
/// layer asks for them: on the trained bundled model's trace at 25 %, 71.4 % hits against 53.8 %
/// (replayed), 49.5 % against 42.8 % live (BENCHMARKS.md §35).
pub fn default_policy(prefetch: PrefetchMode) -> PolicyKind {
    if prefetch.is_on() {
        PolicyKind::Lru
    } else {
        PolicyKind::S3fifo
    }
}

/// 25 % of the model's experts, at least top-k.
pub fn default_capacity(total_experts: usize, top_k: usize) -> usize {
    (total_experts / 4).max(top_k)
}

#[cfg(test)]
mod tests {
    use super::PrefetchMode::{self, *};
    use super::*;

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

    #[test]
    fn settings_read_back_from_the_first_recordings() {
        // A header's `cache` as the first recordings wrote it (from the clap struct).
        let v1 = r#"{"cache_experts":null,"cache_mem":null,"cache_scope":"global","policy":"lru",
            "expert_source":{"kind":"shards"},"allow_missing_experts":false,"cold":false,
            "prefetch":"none","mask_experts":[[1,2]]}"#;
        let s: CacheSettings = serde_json::from_str(v1).unwrap();
        assert_eq!(s.policy, PolicyKind::Lru);
        assert_eq!(s.mask_experts, [(1, 2)]);
        let back: CacheSettings =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
