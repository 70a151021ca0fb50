//! Putting a backend together: config → checkpoint (validated) → resident weights → expert
//! provider. `native` and `selective` differ only in the provider they build here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::cache::settings::{CacheSettings, SourceSpec};
use crate::cache::stats::CacheSnapshot;
use crate::experts::cache::CachedProvider;
use crate::experts::resident::Resident;
use crate::experts::source::{ExpertSource, ShardSource, missing_error};
use crate::model::DecodeOptions;
use crate::model::checkpoint::{Checkpoint, ExpertInventory};
use crate::model::config::MoeConfig;
use crate::model::error::{ModelError, Result};
use crate::model::generate::{DecodeState, Generation};
use crate::model::ports::{ExpertProvider, ExpertWeights, Stacked};
use crate::model::qwen3_moe::{Qwen3Moe, WeightStore};
use crate::settings::{AttnKernel, MoeKernel, Settings};

/// Compute dtype for the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::F16];

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
        if let Some(n) = s
            .strip_prefix("cuda:")
            .or(if s == "cuda" { Some("0") } else { None })
        {
            n.parse::<usize>()
                .map(|n| DeviceSpec(format!("cuda:{n}")))
                .map_err(|_| format!("bad device \"{s}\": expected cpu or cuda:N"))
        } else {
            Err(format!("bad device \"{s}\": expected cpu or cuda:N"))
        }
    }

    pub fn is_cuda(&self) -> bool {
        self.0.starts_with("cuda")
    }

    /// N of `cuda:N`.
    pub fn cuda_index(&self) -> Option<u32> {
        self.0.strip_prefix("cuda:")?.parse().ok()
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
        let dev = Device::new_cuda(n)
            .map_err(|e| ModelError::Input(format!("opening {}: {e}", self.0)))?;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = &dev {
            crate::model::graph::prepare_device(cuda)
                .map_err(|e| ModelError::Input(format!("preparing {}: {e}", self.0)))?;
        }
        Ok(dev)
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
    /// The selective backend's cache (the same object as `provider`, or the one it wraps), for
    /// its statistics; None for native.
    pub cache: Option<Arc<CachedProvider>>,
    pub load_time: Duration,
    pub dtype: Dtype,
    pub device: DeviceSpec,
    /// True when missing experts were allowed and some are masked out (results are DEGRADED).
    pub degraded: bool,
    /// What the last generation kept for the next (its KV cache and CUDA graphs): see
    /// [`Engine::generation`].
    decode_state: std::sync::Mutex<Option<DecodeState>>,
}

impl Engine {
    /// A generation on this engine over what the last one handed back through
    /// [`Engine::keep`] left, where that gives a fresh generation's bits
    /// ([`Generation::reusing`]).
    pub fn generation(
        &self,
        prompt: Vec<u32>,
        params: crate::model::sampling::SamplingParams,
        stop_ids: Vec<u32>,
    ) -> Result<Generation> {
        let state = self.decode_state.lock().ok().and_then(|mut s| s.take());
        Generation::reusing(&self.model, state, prompt, params, stop_ids)
    }

    /// Keeps a generation's KV cache and graphs for the next [`Engine::generation`].
    pub fn keep(&self, g: Generation) {
        if let Ok(mut s) = self.decode_state.lock() {
            *s = Some(g.into_state());
        }
    }

    /// The cache's statistics now (selective only).
    pub fn cache_snapshot(&self) -> Option<CacheSnapshot> {
        self.cache.as_ref().map(|c| c.snapshot())
    }

    /// Runs a few tokens through every decode path once (prefill, the graph or speculative
    /// step, routing read back or not), on a scratch KV cache with the expert cache in bypass
    /// (nothing cached, nothing counted). On a GPU the driver JIT-compiles each kernel module on
    /// first use — seconds on a fresh machine — and that belongs to loading, not to the first
    /// prompt's tokens.
    pub fn warm_up(&self) -> Result<()> {
        use crate::model::ports::{NoObserver, RoutingLog, RoutingObserver};
        use crate::model::sampling::SamplingParams;
        self.provider.set_bypass(true);
        self.provider.set_warming(true);
        let run = || -> Result<()> {
            for observe in [false, true] {
                let params = SamplingParams {
                    max_new_tokens: 3,
                    ..Default::default()
                };
                let prompt = vec![0, 1.min(self.cfg.vocab_size as u32 - 1)];
                let mut g = Generation::new(&self.model, prompt, params, vec![])?;
                let (mut log, mut none) = (RoutingLog::default(), NoObserver);
                let obs: &mut dyn RoutingObserver = if observe { &mut log } else { &mut none };
                while g.step(&self.model, self.provider.as_ref(), obs)?.is_some() {}
            }
            Ok(())
        };
        let r = run();
        self.provider.set_warming(false);
        self.provider.set_bypass(false);
        r
    }

    /// Called before a timed step that follows another process's turn on the same GPU (the
    /// alternate schedule): a one-byte op and a wait, so that the GPU's switch back to this
    /// process's context — ~0.16 ms a switch on an H200, a quarter of a 0.7 ms step (BENCHMARKS
    /// §45) — is paid before the step's clock starts. A backend running alone never pays it, so
    /// timing it would slow both backends by the same amount and pull their ratio towards 1.
    /// Nothing on a CPU.
    pub fn take_turn_on_device(&self) -> Result<()> {
        let dev = self.model.device();
        if dev.is_cuda() {
            candle_core::Tensor::zeros(1, DType::U8, dev)?;
            dev.synchronize()?;
        }
        Ok(())
    }

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
            cache: None,
            load_time: start.elapsed(),
            dtype,
            device: device.clone(),
            degraded: !files.inventory.missing.is_empty() && allow_missing,
            decode_state: Default::default(),
        })
    }

    /// The selective backend: non-expert weights from `store`, experts through the cache that
    /// `make_cache` builds on the opened device.
    pub fn selective(
        cfg: &MoeConfig,
        store: &dyn WeightStore,
        dtype: Dtype,
        device: &DeviceSpec,
        make_cache: impl FnOnce(&Device) -> Result<Arc<CachedProvider>>,
        degraded: bool,
    ) -> Result<Self> {
        let start = Instant::now();
        let dev = device.open()?;
        let model = Qwen3Moe::load(store, cfg, dtype.candle(), &dev)?;
        let cache = make_cache(&dev)?;
        Ok(Engine {
            cfg: cfg.clone(),
            model,
            provider: cache.clone(),
            cache: Some(cache),
            load_time: start.elapsed(),
            dtype,
            device: device.clone(),
            degraded,
            decode_state: Default::default(),
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
                    return Err(missing_error(source, layer, e));
                }
                missing += 1;
            }
        }
    }
    Ok(missing)
}

/// Wraps a provider and masks extra experts out of routing (the hidden `--mask-experts` testing
/// aid: a deliberately perturbed backend that quality checks must catch).
pub struct MaskedProvider {
    inner: Arc<dyn ExpertProvider>,
    unavailable: Vec<Vec<usize>>,
}

impl MaskedProvider {
    pub fn new(
        inner: Arc<dyn ExpertProvider>,
        cfg: &MoeConfig,
        mask: &[(usize, usize)],
    ) -> Result<Self> {
        let mut unavailable: Vec<Vec<usize>> = (0..cfg.num_hidden_layers)
            .map(|l| {
                if cfg.layer_kinds[l] == crate::model::config::FfnKind::Moe {
                    inner.unavailable(l).to_vec()
                } else {
                    Vec::new()
                }
            })
            .collect();
        for &(l, e) in mask {
            if l >= cfg.num_hidden_layers
                || cfg.layer_kinds[l] != crate::model::config::FfnKind::Moe
                || e >= cfg.num_experts
            {
                return Err(ModelError::Input(format!(
                    "--mask-experts {l}:{e}: no such expert (MoE layers {:?}, {} experts)",
                    cfg.moe_layers().collect::<Vec<_>>(),
                    cfg.num_experts
                )));
            }
            if !unavailable[l].contains(&e) {
                unavailable[l].push(e);
            }
        }
        Ok(MaskedProvider { inner, unavailable })
    }
}

impl ExpertProvider for MaskedProvider {
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertWeights>> {
        self.inner.get(layer, expert)
    }
    fn unavailable(&self, layer: usize) -> &[usize] {
        &self.unavailable[layer]
    }
    fn will_use(&self, layer: usize, experts: &[usize]) {
        self.inner.will_use(layer, experts)
    }
    fn wants_hints(&self) -> bool {
        self.inner.wants_hints()
    }
    fn prefetch_hint(&self, layer: usize, experts: &[usize]) {
        self.inner.prefetch_hint(layer, experts)
    }
    fn resident_bytes(&self) -> u64 {
        self.inner.resident_bytes()
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn set_bypass(&self, on: bool) {
        self.inner.set_bypass(on)
    }
    fn set_warming(&self, on: bool) {
        self.inner.set_warming(on)
    }
    fn stacked(&self, layer: usize, needed: &[usize]) -> Result<Option<Stacked>> {
        self.inner.stacked(layer, needed)
    }
    fn needs_ids_on_host(&self) -> bool {
        self.inner.needs_ids_on_host()
    }
}

/// The two ways of running the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Every weight resident.
    Native,
    /// Experts loaded on demand through a bounded cache.
    Selective,
}

impl BackendKind {
    pub const ALL: [BackendKind; 2] = [BackendKind::Native, BackendKind::Selective];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Native => "native",
            BackendKind::Selective => "selective",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            BackendKind::Native => "Every weight resident",
            BackendKind::Selective => "Experts loaded on demand through a bounded cache",
        }
    }
}

/// Everything needed to load one backend, as chosen on the command line or by a worker command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendSpec {
    pub model_dir: PathBuf,
    pub dtype: Dtype,
    pub device: DeviceSpec,
    pub backend: BackendKind,
    pub cache: CacheSettings,
    /// The run's settings, so a worker runs as its parent was set up to (not by its own
    /// environment).
    pub settings: Settings,
}

impl BackendSpec {
    /// Loads the backend. `progress(done, total)` reports expert loading for native.
    pub fn load(&self, progress: impl FnMut(usize, usize)) -> Result<Engine> {
        let start = Instant::now();
        let c = &self.cache;
        let mut engine = match (self.backend, &c.expert_source) {
            (BackendKind::Native, SourceSpec::Shards) => {
                let files = ModelFiles::open(&self.model_dir)?;
                Engine::native(
                    &files,
                    self.dtype,
                    &self.device,
                    c.allow_missing_experts,
                    progress,
                )?
            }
            (BackendKind::Native, other) => {
                return Err(ModelError::Input(format!(
                    "--expert-source {other} applies to the selective backend; native reads the checkpoint"
                )));
            }
            (BackendKind::Selective, spec) => {
                let cfg = match spec {
                    SourceSpec::SeedLayout(d) if d.join("config.json").exists() => {
                        MoeConfig::from_dir(d)?
                    }
                    _ => MoeConfig::from_dir(&self.model_dir)?,
                };
                // Non-expert weights: the seed layout's own files, else the model checkpoint.
                let store: Checkpoint = match spec {
                    SourceSpec::SeedLayout(d) => {
                        let seed_store = crate::experts::seed::open_non_expert_store(d)?;
                        for (name, shape) in Checkpoint::required_tensors(&cfg) {
                            seed_store.check(&name, &shape)?;
                        }
                        seed_store
                    }
                    _ => ModelFiles::open(&self.model_dir)?.ckpt,
                };
                // Only the shards source reads experts from the checkpoint itself.
                let ckpt_ref = matches!(spec, SourceSpec::Shards).then_some(&store);
                let source = crate::experts::open_source(spec, &cfg, ckpt_ref)?;
                source.set_cold(c.cold);
                let missing = check_source_complete(source.as_ref(), c.allow_missing_experts)?;
                let cache_cfg = c.cache_config(cfg.total_experts(), cfg.num_experts_per_tok);
                let dtype = self.dtype;
                let settings = &self.settings;
                Engine::selective(
                    &cfg,
                    &store,
                    self.dtype,
                    &self.device,
                    |dev| {
                        let p = Arc::new(CachedProvider::new(
                            source,
                            cache_cfg,
                            dtype.candle(),
                            dev,
                            c.allow_missing_experts,
                            settings,
                        )?);
                        if c.prefetch.resolve(dev.is_cuda(), settings.cores).is_on() {
                            CachedProvider::start_prefetch(&p);
                        }
                        Ok(p)
                    },
                    missing > 0,
                )?
            }
        };
        if !c.mask_experts.is_empty() {
            engine.provider = Arc::new(MaskedProvider::new(
                engine.provider.clone(),
                &engine.cfg,
                &c.mask_experts,
            )?);
            engine.degraded = true;
        }
        engine.model.set_options(DecodeOptions {
            cuda_graphs: self.settings.cuda_graphs,
            moe_kernel: self.settings.moe_kernel == MoeKernel::Moescope,
            attn_kernel: self.settings.attn_kernel == AttnKernel::Moescope,
            gated_pieces: self.settings.gated_pieces,
            gated_whole: self.settings.gated_whole,
        });
        if engine.model.device().is_cuda() {
            engine.warm_up()?;
        }
        // Load time is until the backend can serve, warm-up included, whichever command asks
        // (`generate` once left it out and showed selective 20 s faster than `run` did).
        engine.load_time = start.elapsed();
        Ok(engine)
    }
}

/// What a loaded backend will hold, estimated from its config before anything is loaded:
/// weights in the compute dtype, the expert cache's capacity (GPU slot pools are allocated
/// whole), and a KV cache for `tokens` positions. Runtime overhead is left out, so this is a
/// floor: a run it does not fit cannot succeed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub host: u64,
    pub gpu: u64,
    /// Of `host + gpu`, the KV cache for the run's longest prompt and answer (what
    /// `--max-new-tokens` and the prompts' length set).
    pub kv: u64,
}

impl Footprint {
    pub fn total(&self) -> u64 {
        self.host + self.gpu
    }
}

impl BackendSpec {
    pub fn footprint(&self, cfg: &MoeConfig, tokens: usize) -> Footprint {
        let cuda = self.device.is_cuda();
        let esize = self.dtype.candle().size_in_bytes() as u64;
        // Quantized tensors (GGUF blocks, FP8) are held as stored, and so are 16-bit experts
        // for f32 on the CPU (`ports::held_dtype`).
        let bf16 = self.dtype.candle() == candle_core::DType::BF16;
        let sizes =
            crate::model::held::held_sizes(&self.model_dir, cfg, esize, !cuda, cuda && bf16);
        let expert = sizes.map_or(cfg.expert_params() as u64 * esize, |h| h.expert_max);
        let total = cfg.total_experts() as u64;
        let experts = match self.backend {
            BackendKind::Native => sizes.map_or(total * expert, |h| h.experts_total),
            BackendKind::Selective => {
                let cap = self
                    .cache
                    .cache_config(cfg.total_experts(), cfg.num_experts_per_tok)
                    .capacity_experts(expert) as u64;
                // A CPU cache holds at most every expert once; GPU slot pools are allocated
                // at their capacity.
                let held = if cuda { cap } else { cap.min(total) };
                held * expert
            }
        };
        // The CPU keeps keys and values in f32; the GPU in the compute dtype, in buffers
        // grown by doubling from 256 rows.
        let (kv_elem, rows) = if cuda {
            (esize, tokens.max(256).next_power_of_two() as u64)
        } else {
            (4, tokens as u64)
        };
        let kv = cfg.num_hidden_layers as u64
            * 2
            * (cfg.num_key_value_heads * cfg.head_dim) as u64
            * rows
            * kv_elem;
        let non_expert = sizes.map_or(cfg.non_expert_params() * esize, |h| h.non_expert);
        let held = non_expert + experts + kv;
        if cuda {
            Footprint {
                host: 0,
                gpu: held,
                kv,
            }
        } else {
            Footprint {
                host: held,
                gpu: 0,
                kv,
            }
        }
    }
}

/// Memory the machine has for a run: host (MemAvailable) and, where known, free GPU memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Available {
    pub host: u64,
    /// None where it is not known (no NVML, or an integrated GPU that shares host memory):
    /// then GPU needs are counted against host memory.
    pub gpu: Option<u64>,
}

/// Whether backends needing `needs` fit in `available`: `together` when they are loaded at the
/// same time (the alternate and parallel schedules), else one after the other. Err: one line
/// with what is needed and available, and what would help.
pub fn check_fits(
    needs: &[(&str, Footprint)],
    together: bool,
    available: Available,
    model: &Path,
) -> std::result::Result<(), String> {
    let combine = |f: fn(&Footprint) -> u64| -> u64 {
        let it = needs.iter().map(|(_, n)| f(n));
        if together {
            it.sum()
        } else {
            it.max().unwrap_or(0)
        }
    };
    let (host, gpu) = match available.gpu {
        Some(_) => (combine(|n| n.host), combine(|n| n.gpu)),
        None => (combine(Footprint::total), 0),
    };
    let parts = needs
        .iter()
        .map(|(name, n)| format!("{name} {}", crate::util::fmt_bytes(n.total())))
        .collect::<Vec<_>>()
        .join(" + ");
    let how = if needs.len() > 1 {
        if together {
            "loaded together"
        } else {
            "one at a time"
        }
    } else {
        "loaded"
    };
    // When the KV cache is most of what is needed, the length asked for is what to change.
    let kv = combine(|n| n.kv);
    let short = |what: &str, need: u64, have: u64| {
        format!(
            "{}: the run needs at least {} of {what} ({parts}, {how}{}) and {} is available; \
             {}--cache-mem sets the selective cache's share, --dtype bf16 halves f32 weights; \
             --force runs anyway",
            model.display(),
            crate::util::fmt_bytes(need),
            if kv > need / 2 {
                format!(
                    "; of that the KV cache is {}, set by --max-new-tokens and the prompts' \
                     length",
                    crate::util::fmt_bytes(kv)
                )
            } else {
                String::new()
            },
            crate::util::fmt_bytes(have),
            if together && needs.len() > 1 {
                "--schedule sequential loads one backend at a time, "
            } else {
                ""
            }
        )
    };
    if host > available.host {
        return Err(short(
            if available.gpu.is_some() {
                "host memory"
            } else {
                "memory"
            },
            host,
            available.host,
        ));
    }
    if let Some(free) = available.gpu
        && gpu > free
    {
        return Err(short("GPU memory", gpu, free));
    }
    Ok(())
}

/// `models/tiny-moe` next to the working directory, else next to this source tree (so
/// `cargo run` and the installed binary inside the repo both find the bundled model).
pub fn default_model_dir() -> PathBuf {
    let local = PathBuf::from("models/tiny-moe");
    if local.join("config.json").exists() {
        return local;
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-moe");
    if built.join("config.json").exists() {
        return built;
    }
    local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3-moe-tiny")
    }

    fn spec(backend: BackendKind, cache: CacheSettings) -> BackendSpec {
        BackendSpec {
            model_dir: fixture(),
            dtype: Dtype::F32,
            device: DeviceSpec::cpu(),
            backend,
            cache,
            settings: Settings::default(),
        }
    }

    /// The estimate counts the weights a loaded model really holds: checked against the
    /// loaded model's own count, for both backends.
    #[test]
    fn the_footprint_counts_what_loading_holds() {
        let cfg = MoeConfig::from_dir(&fixture()).unwrap();
        let native = spec(BackendKind::Native, CacheSettings::default())
            .load(|_, _| {})
            .unwrap();
        let kv = |tokens: u64| {
            cfg.num_hidden_layers as u64
                * 2
                * (cfg.num_key_value_heads * cfg.head_dim) as u64
                * tokens
                * 4
        };
        let f = spec(BackendKind::Native, CacheSettings::default()).footprint(&cfg, 100);
        let weights = native.model.resident_bytes() + native.provider.resident_bytes();
        assert_eq!(
            f,
            Footprint {
                host: weights + kv(100),
                gpu: 0,
                kv: kv(100),
            }
        );
        // Selective: non-expert weights and the cache's capacity (here 3 experts).
        let cache = CacheSettings {
            cache_experts: Some(3),
            ..Default::default()
        };
        let f = spec(BackendKind::Selective, cache.clone()).footprint(&cfg, 0);
        // f32 on the CPU holds the fixture's bf16 experts as stored (`ports::held_dtype`).
        let expert = (cfg.expert_params() * 2) as u64;
        assert_eq!(f.host, native.model.resident_bytes() + 3 * expert);
        // A CPU cache larger than the model holds the model once.
        let huge = CacheSettings {
            cache_experts: Some(1 << 20),
            ..Default::default()
        };
        let f = spec(BackendKind::Selective, huge).footprint(&cfg, 0);
        assert_eq!(f.host, weights);
    }

    #[test]
    fn a_run_that_cannot_fit_is_refused_saying_what_helps() {
        let gib = 1u64 << 30;
        let host = |h: u64| Footprint {
            host: h * gib,
            gpu: 0,
            kv: 0,
        };
        let m = Path::new("m");
        let avail = Available {
            host: 10 * gib,
            gpu: Some(0),
        };
        // 6 + 6 together do not fit 10; one at a time they do.
        let both = [("native", host(6)), ("selective", host(6))];
        let e = check_fits(&both, true, avail, m).unwrap_err();
        assert!(
            e.contains("12.0 GiB") && e.contains("10.0 GiB") && e.contains("--schedule sequential"),
            "{e}"
        );
        assert!(e.contains("--force") && e.contains("--cache-mem") && e.contains("--dtype bf16"));
        assert!(!e.contains("KV cache"), "{e}");
        assert!(check_fits(&both, false, avail, m).is_ok());
        // A run whose KV cache is most of it (a huge --max-new-tokens) says so.
        let long = [(
            "native",
            Footprint {
                host: 20 * gib,
                gpu: 0,
                kv: 18 * gib,
            },
        )];
        let e = check_fits(&long, true, avail, m).unwrap_err();
        assert!(
            e.contains("the KV cache is 18.0 GiB") && e.contains("--max-new-tokens"),
            "{e}"
        );
        // GPU needs against free GPU memory where it is known, else against host memory.
        let gpu = [(
            "native",
            Footprint {
                host: 0,
                gpu: 8 * gib,
                kv: 0,
            },
        )];
        let known = Available {
            host: 100 * gib,
            gpu: Some(4 * gib),
        };
        assert!(
            check_fits(&gpu, true, known, m)
                .unwrap_err()
                .contains("GPU memory")
        );
        let shared = Available {
            host: 6 * gib,
            gpu: None,
        };
        let e = check_fits(&gpu, true, shared, m).unwrap_err();
        assert!(e.contains("of memory") && !e.contains("sequential"), "{e}");
    }
}

/// On a GPU (`scripts/gpu_unit_tests.sh`; skipped where there is none): what
/// `tests/fidelity.rs` checks of decode-state reuse on the CPU, here with the CUDA graphs that
/// come along with the state.
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::*;
    use crate::cache::settings::Scope;
    use crate::model::ports::{NoObserver, RoutingObserver};
    use crate::model::sampling::SamplingParams;

    /// Each step's token and logits' bits.
    type Steps = Vec<(u32, Vec<u32>)>;

    /// A fixture of each format: bf16 (a dense layer among the MoE ones), GGUF Q4_K_M, FP8.
    const EVERY_FORMAT: [&str; 3] = [
        "qwen3-moe-tiny",
        "gguf/kquant-Q4_K_M.gguf",
        "fp8/qwen3-moe-tiny-fp8",
    ];

    fn run(e: &Engine, prompt: &[u32], n: usize, reuse: bool) -> Steps {
        run_observed(e, prompt, n, reuse, &mut NoObserver)
    }

    /// Every routing decision an observer is given: layer, position, experts, weights' bits.
    #[derive(Default, PartialEq, Debug)]
    struct Routes(Vec<(usize, usize, Vec<u32>, Vec<u32>)>);

    impl RoutingObserver for Routes {
        fn on_routing(&mut self, layer: usize, position: usize, experts: &[u32], w: &[f32]) {
            let w = w.iter().map(|v| v.to_bits()).collect();
            self.0.push((layer, position, experts.to_vec(), w));
        }
    }

    fn run_observed(
        e: &Engine,
        prompt: &[u32],
        n: usize,
        reuse: bool,
        observer: &mut dyn RoutingObserver,
    ) -> Steps {
        let params = SamplingParams {
            max_new_tokens: n,
            ..Default::default()
        };
        let mut g = if reuse {
            e.generation(prompt.to_vec(), params, vec![]).unwrap()
        } else {
            Generation::new(&e.model, prompt.to_vec(), params, vec![]).unwrap()
        };
        let mut steps = Vec::new();
        while let Some(out) = g.step(&e.model, e.provider.as_ref(), observer).unwrap() {
            steps.push((
                out.token,
                g.last_logits()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect(),
            ));
        }
        if reuse {
            e.keep(g);
        }
        steps
    }

    /// `model` in bf16 on the first GPU, a global cache of `cache_experts` for selective.
    fn gpu_spec(
        model: &std::path::Path,
        backend: BackendKind,
        cache_experts: Option<usize>,
    ) -> BackendSpec {
        BackendSpec {
            model_dir: model.to_path_buf(),
            dtype: Dtype::Bf16,
            device: DeviceSpec("cuda:0".into()),
            backend,
            cache: CacheSettings {
                cache_experts,
                cache_scope: Scope::Global,
                ..Default::default()
            },
            settings: Settings::default(),
        }
    }

    /// Native and selective (missing every step, its piecewise steps gated — as one graph, and
    /// piece by piece — and launched layer by layer; holding every expert, the GPU filling its
    /// slots inside the graphs) on the bundled
    /// model in bf16: a generation over the last one's
    /// state equals a fresh one and native, bit for bit, and replays the graphs it found (no
    /// capture) when the prompt's capacity is the last one's; a prompt of another capacity
    /// starts fresh and is still equal.
    #[test]
    fn gpu_reuse_of_the_decode_state_gives_fresh_bits_without_capturing_again() {
        if crate::util::gpu_test::device("decode-state reuse").is_none() {
            return;
        }
        let dir = PathBuf::from("models/tiny-moe");
        let cfg = MoeConfig::from_dir(&dir).unwrap();
        let spec = |backend, cache_experts| gpu_spec(&dir, backend, cache_experts);
        let vocab = cfg.vocab_size as u32;
        let (a, b) = (vec![3u32, 17, 42], vec![5u32, 9, 11, 30, 2]);
        // Past the smallest static capacity (256 rows): a state the short prompts cannot take.
        let long: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let mut reference: Option<Vec<Steps>> = None;
        // Gates: (on, the step as one graph).
        for (backend, cap, (gates, whole)) in [
            (BackendKind::Native, None, (true, true)),
            (
                BackendKind::Selective,
                Some(cfg.num_experts_per_tok),
                (true, true),
            ),
            (
                BackendKind::Selective,
                Some(cfg.num_experts_per_tok),
                (true, false),
            ),
            (
                BackendKind::Selective,
                Some(cfg.num_experts_per_tok),
                (false, false),
            ),
            (
                BackendKind::Selective,
                Some(cfg.total_experts()),
                (true, true),
            ),
        ] {
            let mut spec = spec(backend, cap);
            spec.settings.gated_pieces = gates;
            spec.settings.gated_whole = whole;
            let e = spec.load(|_, _| {}).unwrap();
            let what = format!("{backend:?} {cap:?}, gates {gates}, whole {whole}");
            let gated_before = crate::model::graph::gated_steps();
            let whole_before = crate::model::graph::gated_whole_steps();
            let fresh: Vec<Steps> = [(&a, 8), (&b, 12), (&long, 6), (&a, 8)]
                .iter()
                .map(|(p, n)| run(&e, p, *n, false))
                .collect();
            assert_eq!(run(&e, &a, 8, true), fresh[0], "{what}: first generation");
            let before = crate::model::graph::captures();
            assert_eq!(
                run(&e, &b, 12, true),
                fresh[1],
                "{what}: over the last state"
            );
            if backend == BackendKind::Native {
                assert_eq!(
                    crate::model::graph::captures(),
                    before,
                    "{what}: captured again"
                );
            }
            assert_eq!(
                run(&e, &long, 6, true),
                fresh[2],
                "{what}: a larger capacity"
            );
            assert_eq!(
                run(&e, &a, 8, true),
                fresh[3],
                "{what}: back to a smaller one"
            );
            // Missing every step, selective reads routing back at every layer: through the
            // gates when they are on (the step as one graph, or its pieces queued ahead),
            // layer by layer when not.
            let gated = crate::model::graph::gated_steps() - gated_before;
            let as_one = crate::model::graph::gated_whole_steps() - whole_before;
            let misses_every_step = cap == Some(cfg.num_experts_per_tok);
            assert_eq!(
                gated > 0,
                misses_every_step && gates,
                "{what}: {gated} gated steps"
            );
            assert_eq!(
                as_one,
                if whole { gated } else { 0 },
                "{what}: {as_one} of {gated} gated steps as one graph"
            );
            match &reference {
                None => reference = Some(fresh),
                Some(r) => assert!(r == &fresh, "{what}: not native's bits"),
            }
        }
    }

    /// Selective missing every step on every format (bf16 with a dense layer, GGUF Q4_K_M, FP8),
    /// its piecewise steps gated — as one graph and piece by piece — with an observer taking the
    /// routing: native's tokens, logits and routing (experts and weights), bit for bit; its
    /// misses copied direct, and staged — read in 4 KiB pieces, each run copied as it lands,
    /// and read whole, then copied.
    #[test]
    fn gpu_gated_steps_over_every_format_give_natives_bits_and_routing() {
        if crate::util::gpu_test::device("gated steps on every format").is_none() {
            return;
        }
        for file in EVERY_FORMAT {
            let model = PathBuf::from("tests/fixtures").join(file);
            let cfg = MoeConfig::from_dir(&model).unwrap();
            let prompt = [3u32, 17, 42, 5];
            let native = gpu_spec(&model, BackendKind::Native, None)
                .load(|_, _| {})
                .unwrap();
            let mut want_routes = Routes::default();
            let want = run_observed(&native, &prompt, 8, false, &mut want_routes);
            drop(native);
            assert_eq!(want.len(), 8, "{file}: eight tokens");
            let staged = [
                (
                    crate::settings::H2dChoice::Auto,
                    Settings::default().staged_piece,
                ),
                (crate::settings::H2dChoice::Staged, Some(4096)),
                (crate::settings::H2dChoice::Staged, None),
            ];
            for (whole, (h2d, piece)) in [true, false]
                .into_iter()
                .flat_map(|w| staged.map(|s| (w, s)))
            {
                let mut spec = gpu_spec(
                    &model,
                    BackendKind::Selective,
                    Some(cfg.num_experts_per_tok),
                );
                spec.settings.gated_whole = whole;
                spec.settings.h2d = h2d;
                spec.settings.staged_piece = piece;
                let sel = spec.load(|_, _| {}).unwrap();
                let (gated, as_one) = (
                    crate::model::graph::gated_steps(),
                    crate::model::graph::gated_whole_steps(),
                );
                let mut routes = Routes::default();
                let got = run_observed(&sel, &prompt, 8, false, &mut routes);
                let gated = crate::model::graph::gated_steps() - gated;
                let as_one = crate::model::graph::gated_whole_steps() - as_one;
                let what = format!("{file}, whole {whole}, {h2d:?} copies, pieces {piece:?}");
                assert!(got == want, "{what}: not native's bits");
                assert_eq!(routes, want_routes, "{what}: not native's routing");
                assert!(gated > 0, "{what}: no gated step");
                assert_eq!(as_one, if whole { gated } else { 0 }, "{what}");
            }
        }
    }

    /// A prompt past the quantized prompt kernels' 128 tokens, on every format: its experts go
    /// through the grouped products (`moe_grouped`; GGUF and FP8 over their routed experts
    /// dequantised), and selective — its slots filled in miss order, not expert order — gets
    /// native's tokens and logits bit for bit, prompt and decode.
    #[test]
    fn gpu_long_prompts_through_grouped_products_give_natives_bits() {
        if crate::util::gpu_test::device("long-prompt grouped products").is_none() {
            return;
        }
        for file in EVERY_FORMAT {
            let model = PathBuf::from("tests/fixtures").join(file);
            let cfg = MoeConfig::from_dir(&model).unwrap();
            let vocab = cfg.vocab_size as u32;
            let prompt: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % vocab).collect();
            let native = gpu_spec(&model, BackendKind::Native, None)
                .load(|_, _| {})
                .unwrap();
            let want = run(&native, &prompt, 6, false);
            drop(native);
            assert_eq!(want.len(), 6, "{file}: six tokens");
            let sel = gpu_spec(&model, BackendKind::Selective, Some(cfg.total_experts()))
                .load(|_, _| {})
                .unwrap();
            assert_eq!(
                run(&sel, &prompt, 6, false),
                want,
                "{file}: not native's bits"
            );
        }
    }

    /// GPU self-fill over quantized slots: on the k-quant fixtures (Q8_0; and Q4_K_M, whose
    /// layers mix block types in one shared pool) and the FP8 ones (e4m3 bytes into the slots,
    /// their scales into the scale pools; one file, and the Omni thinker's three shards),
    /// selective holding every expert has the GPU copy each missing expert into its home slot
    /// inside the step, and its tokens and logits' bits are native's — a prompt (the prompt
    /// kernels) and decode steps.
    #[test]
    fn gpu_quantized_self_fill_gives_natives_bits() {
        if crate::util::gpu_test::device("quantized self-fill").is_none() {
            return;
        }
        for file in [
            "gguf/kquant-Q8_0.gguf",
            "gguf/kquant-Q4_K_M.gguf",
            "fp8/qwen3-moe-tiny-fp8",
            "fp8/qwen3-omni-tiny-fp8",
        ] {
            let model = PathBuf::from("tests/fixtures").join(file);
            let cfg = MoeConfig::from_dir(&model).unwrap();
            let spec = |backend, cache_experts| gpu_spec(&model, backend, cache_experts);
            let vocab = cfg.vocab_size as u32;
            // One token first: its prompt step loads only its own experts on the host, so the
            // decode steps (graph steps with the fill kernels) meet the others (4 experts, top
            // 2); then a 7-token prompt (the prompt kernels) over the filled slots.
            let one = vec![13u32];
            let prompt: Vec<u32> = (0..7u32).map(|i| (i * 7919 + 13) % vocab).collect();
            let native = spec(BackendKind::Native, None).load(|_, _| {}).unwrap();
            let want = (
                run(&native, &one, 24, false),
                run(&native, &prompt, 12, false),
            );
            drop(native);
            let sel = spec(BackendKind::Selective, Some(cfg.total_experts()))
                .load(|_, _| {})
                .unwrap();
            assert!(
                sel.cache_snapshot().is_some_and(|c| c.gpu_fills),
                "{file}: the GPU should fill its slots itself"
            );
            assert_eq!(
                run(&sel, &one, 24, false),
                want.0,
                "{file}: not native's bits"
            );
            let c = sel.cache_snapshot().unwrap();
            assert!(
                c.h2d_fill_bytes > 0,
                "{file}: nothing filled by the GPU ({} hits, {} misses, {} bytes copied by the host)",
                c.hits,
                c.misses,
                c.h2d_bytes
            );
            assert_eq!(
                run(&sel, &prompt, 12, false),
                want.1,
                "{file}: a prompt, not native's bits"
            );
        }
    }
}
