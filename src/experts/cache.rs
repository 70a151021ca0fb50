//! The selective backend's provider: experts loaded on demand from an [`ExpertSource`] into a
//! bounded cache.
//!
//! Capacity is a count of experts or a byte budget (converted to a count: every expert of a
//! model has the same size); scope is one pool for all layers (`global`, what the seed project
//! used) or an equal share per layer (`layer`). Reads happen outside the lock, so a prefetch
//! thread and the forward pass can load different experts at the same time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::convert;
use super::policy::{Policy, PolicyKind};
use super::source::{ExpertSource, missing_error};
use super::stats::{CacheSnapshot, Histogram, LayerStats, PrefetchStats};
use crate::model::error::{ModelError, Result};
use crate::model::ports::{DeviceFill, ExpertProvider, ExpertWeights, Stacked, fused_capable};
use crate::model::safetensors_file::StDtype;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    Experts(usize),
    Bytes(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// One pool shared by all layers.
    Global,
    /// Each MoE layer gets an equal share of the capacity.
    Layer,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Layer => "layer",
        }
    }
}

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

/// A prefetch request: load these experts of this layer, for the guess numbered so.
type PrefetchJob = (usize, Vec<usize>, u64);

fn key(layer: usize, expert: usize) -> u32 {
    ((layer as u32) << 16) | expert as u32
}

fn unkey(k: u32) -> (usize, usize) {
    ((k >> 16) as usize, (k & 0xffff) as usize)
}

struct Pool {
    capacity: usize,
    entries: HashMap<u32, Arc<ExpertWeights>>,
    policy: Box<dyn Policy>,
    /// GPU slot mode: experts live in preallocated stacked tensors instead of `entries`.
    slots: Option<SlotStore>,
}

/// A preallocated pool of expert slots on the device: [slots, 2I, H] and [slots, H, I].
struct SlotStore {
    gate_up: Tensor,
    down: Tensor,
    slot_of: HashMap<u32, usize>,
    free: Vec<usize>,
}

impl Pool {
    fn contains(&self, k: u32) -> bool {
        match &self.slots {
            Some(s) => s.slot_of.contains_key(&k),
            None => self.entries.contains_key(&k),
        }
    }
}

struct State {
    pools: Vec<Pool>,
    /// Model layer → index into `pools` (all MoE layers → 0 for global scope).
    pool_of: Vec<usize>,
    /// Model layer → index into `layers` stats.
    stats_of: Vec<Option<usize>>,
    layers: Vec<LayerStats>,
    hits: u64,
    misses: u64,
    evictions: u64,
    bytes_read: u64,
    resident_bytes: u64,
    latency: Histogram,
    load_time_us: u64,
    /// Loads through the temporary-stack path (see `CacheSnapshot::overflow_loads`).
    overflow_loads: u64,
    overflow_time_us: u64,
    /// Keys being read right now (by the forward pass or the prefetcher).
    loading: HashSet<u32>,
    prefetch: Option<PrefetchStats>,
    /// Keys inserted by prefetch and not used yet (to score its precision).
    prefetched_unused: HashSet<u32>,
    /// The latest guess for each layer (its number, the experts), scored when that layer runs;
    /// a prefetch job whose guess is no longer here is late and is dropped.
    guesses: HashMap<usize, (u64, Vec<usize>)>,
    guess_seq: u64,
    /// Host buffer that slot misses are read into and uploaded from (pinned on CUDA).
    staging: super::upload::Staging,
    /// Registered expert files that slot misses are copied from directly, when that path was
    /// chosen (see `direct.rs`), and why the path is what it is.
    direct: Option<super::direct::DirectFiles>,
    h2d_path: Option<String>,
    /// Slot mode, per model layer: expert → slot on the device (for speculative graph steps),
    /// its host copy, and whether the device copy is behind.
    maps: Vec<Option<Tensor>>,
    map_host: Vec<Vec<u32>>,
    map_dirty: Vec<bool>,
    /// `misses` when `speculate` last looked: whether the last step added any.
    misses_seen: u64,
    /// Slots the GPU fills itself (see [`DeviceFills`]), when every expert has one; whether
    /// this step runs the plain graph instead, and when to (a gate of its own, see there).
    fills: Option<DeviceFills>,
    plain_step: bool,
    plain_gate: super::speculation::Gate,
    /// Whether a step is worth trying as a graph over the resident experts (see
    /// `speculation.rs`; `MOESCOPE_SPECULATE=0` turns guessing off — the sweep does, to measure
    /// what a step that reads routing back costs).
    gate: super::speculation::Gate,
}

/// A slot pool with a slot for every expert it serves (capacity 100 %), on the direct path: each
/// expert has its own *home* slot, nothing is ever evicted, and a graph step fills the homes of
/// the routed experts that are not resident itself, reading them from the registered expert
/// files over PCIe (`moe_decode::fill_routed`). Then every decode step — misses included — runs
/// as one CUDA graph: no routing read back per layer, no guess that can fail. The fill kernels
/// cost ~0.1 ms a step even when there is nothing to fill, so once nearly every step is clean
/// (or every expert is resident) steps run the plain graph over the resident experts instead,
/// redone if a guess fails. Off with `MOESCOPE_FILL=0`; outputs are the same either way (the
/// fill is a bitwise copy).
struct DeviceFills {
    /// Per model layer: the device tables (None for dense layers).
    tables: Vec<Option<DeviceFill>>,
    /// Per model layer: expert → home slot.
    home: Vec<Vec<u32>>,
    /// Host copy of each layer's residency flags (the device's are `tables[l].resident`), and
    /// whether the device copy is behind (host loads set flags; fills set both).
    flags_host: Vec<Vec<u32>>,
    flags_dirty: Vec<bool>,
    /// Experts with a slot in all, and bytes the GPU filled so far.
    total: usize,
    bytes: u64,
}

/// Home slots when every pool holds every expert it serves: `pools[p]` = (capacity, the MoE
/// layers it serves in order); the i-th layer of a pool owns slots i·E .. (i+1)·E. `None` when
/// some pool is smaller than that.
fn home_slots(
    pools: &[(usize, Vec<usize>)],
    num_layers: usize,
    num_experts: usize,
) -> Option<Vec<Vec<u32>>> {
    let mut home = vec![Vec::new(); num_layers];
    for (capacity, layers) in pools {
        if *capacity < layers.len() * num_experts {
            return None;
        }
        for (i, &l) in layers.iter().enumerate() {
            home[l] = (0..num_experts)
                .map(|e| (i * num_experts + e) as u32)
                .collect();
        }
    }
    Some(home)
}

/// The device tables for [`DeviceFills`]; `None` (the host loads misses, as at any capacity)
/// unless every expert with a home is stored in the compute dtype at the slot's shapes, in
/// registered files the device can read.
fn device_fills(
    source: &dyn ExpertSource,
    direct: &super::direct::DirectFiles,
    home: Vec<Vec<u32>>,
    dtype: DType,
    device: &Device,
) -> Result<Option<DeviceFills>> {
    let cfg = source.config();
    let part_bytes = cfg.hidden_size * cfg.moe_intermediate_size * dtype.size_in_bytes();
    let mut tables = vec![None; cfg.num_hidden_layers];
    let mut total = 0;
    for l in cfg.moe_layers() {
        let mut sources = Vec::with_capacity(3 * cfg.num_experts);
        for e in 0..cfg.num_experts {
            let Some(parts) = source.part_locations(l, e) else {
                return Ok(None);
            };
            for p in &parts {
                let addr = direct.device_address(p);
                match addr {
                    Some(a)
                        if p.len as usize == part_bytes && p.dtype.float_dtype() == Some(dtype) =>
                    {
                        sources.push(a as i64)
                    }
                    _ => return Ok(None),
                }
            }
        }
        total += cfg.num_experts;
        tables[l] = Some(DeviceFill {
            sources: Tensor::from_vec(sources, 3 * cfg.num_experts, device)?,
            home: Tensor::from_vec(home[l].clone(), cfg.num_experts, device)?,
            resident: Tensor::zeros(cfg.num_experts, DType::U32, device)?,
            part_bytes,
        });
    }
    Ok(Some(DeviceFills {
        tables,
        home,
        flags_host: vec![vec![0; cfg.num_experts]; cfg.num_hidden_layers],
        flags_dirty: vec![false; cfg.num_hidden_layers],
        total,
        bytes: 0,
    }))
}

/// Counts a hit on `key(layer, e)` in pool `pi` (layer stats `li`), as the uncaptured and the
/// speculative step both must.
fn count_hit(s: &mut State, pi: usize, li: usize, e: usize, k: u32) {
    if s.prefetched_unused.remove(&k) {
        s.pools[pi].policy.on_first_use(k);
    } else {
        s.pools[pi].policy.on_hit(k);
    }
    s.hits += 1;
    s.layers[li].hits[e] += 1;
}

/// Experts on demand through a bounded cache.
pub struct CachedProvider {
    source: Arc<dyn ExpertSource>,
    dtype: DType,
    device: Device,
    config: CacheConfig,
    expert_bytes: u64,
    unavailable: Vec<Vec<usize>>,
    state: Mutex<State>,
    loaded: Condvar,
    bypass: std::sync::atomic::AtomicBool,
    /// Jobs for the prefetch thread, when prefetch is on.
    prefetcher: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<PrefetchJob>>>,
}

impl CachedProvider {
    /// `expert_bytes` is one expert's size in the compute dtype (for byte budgets and display).
    pub fn new(
        source: Arc<dyn ExpertSource>,
        config: CacheConfig,
        dtype: DType,
        device: &Device,
        allow_missing: bool,
    ) -> Result<Self> {
        let cfg = source.config().clone();
        let expert_bytes = (cfg.expert_params() * dtype.size_in_bytes()) as u64;
        let mut unavailable = vec![Vec::new(); cfg.num_hidden_layers];
        for layer in cfg.moe_layers() {
            for e in 0..cfg.num_experts {
                if !source.has(layer, e) {
                    if !allow_missing {
                        return Err(missing_error(source.as_ref(), layer, e));
                    }
                    unavailable[layer].push(e);
                }
            }
        }
        let total = config.capacity_experts(expert_bytes);
        if total == 0 {
            return Err(ModelError::Input(format!(
                "cache capacity {} holds no expert (one expert is {} in {:?})",
                config.describe(),
                crate::util::fmt_bytes(expert_bytes),
                dtype
            )));
        }
        let moe_layers: Vec<usize> = cfg.moe_layers().collect();
        let mut pool_of = vec![usize::MAX; cfg.num_hidden_layers];
        let mut stats_of = vec![None; cfg.num_hidden_layers];
        let pools: Vec<Pool> = match config.scope {
            Scope::Global => {
                moe_layers.iter().for_each(|&l| pool_of[l] = 0);
                vec![Pool {
                    capacity: total,
                    entries: HashMap::new(),
                    policy: config.policy.build(total),
                    slots: None,
                }]
            }
            Scope::Layer => {
                let share = total / moe_layers.len().max(1);
                moe_layers
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| {
                        pool_of[l] = i;
                        Pool {
                            capacity: share,
                            entries: HashMap::new(),
                            policy: config.policy.build(share),
                            slots: None,
                        }
                    })
                    .collect()
            }
        };
        let mut pools = pools;
        let slot_mode = fused_capable(device, dtype);
        if slot_mode {
            // GPU: one preallocated slot pool per cache pool, filled by the fused path.
            let (h, inter) = (cfg.hidden_size, cfg.moe_intermediate_size);
            for p in &mut pools {
                p.slots = Some(SlotStore {
                    gate_up: Tensor::zeros((p.capacity, 2 * inter, h), dtype, device)?,
                    down: Tensor::zeros((p.capacity, h, inter), dtype, device)?,
                    slot_of: HashMap::new(),
                    free: (0..p.capacity).rev().collect(),
                });
            }
        }
        let (direct, h2d_path) = if slot_mode {
            let files = device
                .is_cuda()
                .then(|| super::direct::expert_files(source.as_ref()))
                .flatten();
            let (path, why) = super::direct::choose_given(
                device,
                source.as_ref(),
                files.as_deref(),
                &std::env::var("MOESCOPE_H2D").unwrap_or_default(),
            )?;
            let (direct, label) = if path == super::direct::H2dPath::Direct {
                match super::direct::DirectFiles::open(device, files.as_deref().unwrap_or(&[])) {
                    Ok(d) => (Some(d), format!("direct: {why}")),
                    // Not fatal: the staged path works everywhere, only slower.
                    Err(e) => {
                        eprintln!("moescope: direct expert copies unavailable ({e}); staging");
                        (
                            None,
                            format!("staged: registering the expert files failed: {e}"),
                        )
                    }
                }
            } else {
                (None, format!("staged: {why}"))
            };
            (direct, Some(label))
        } else {
            (None, None)
        };
        let fills = match &direct {
            Some(d) if std::env::var("MOESCOPE_FILL").map_or(true, |v| v != "0") => {
                let served: Vec<(usize, Vec<usize>)> = pools
                    .iter()
                    .enumerate()
                    .map(|(pi, p)| {
                        let ls = moe_layers.iter().copied().filter(|&l| pool_of[l] == pi);
                        (p.capacity, ls.collect())
                    })
                    .collect();
                home_slots(&served, cfg.num_hidden_layers, cfg.num_experts)
                    .map(|home| device_fills(source.as_ref(), d, home, dtype, device))
                    .transpose()?
                    .flatten()
            }
            _ => None,
        };
        let h2d_path = match (&fills, h2d_path) {
            (Some(_), Some(p)) => Some(format!(
                "{p}; the GPU fills missing slots itself (a slot for every expert)"
            )),
            (_, p) => p,
        };
        // Expert → slot. With fills every expert's entry is its home from the start (a plain
        // graph step that meets an expert not filled yet reads a valid slot and is redone).
        let map_host: Vec<Vec<u32>> = (0..cfg.num_hidden_layers)
            .map(|l| match &fills {
                Some(f) if !f.home[l].is_empty() => f.home[l].clone(),
                _ => vec![0; cfg.num_experts],
            })
            .collect();
        let mut maps = vec![None; cfg.num_hidden_layers];
        if slot_mode {
            for &l in &moe_layers {
                maps[l] = Some(Tensor::from_vec(
                    map_host[l].clone(),
                    cfg.num_experts,
                    device,
                )?);
            }
        }
        let slot_bytes: u64 = pools.iter().map(|p| p.capacity as u64).sum::<u64>() * expert_bytes;
        let layers = moe_layers
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                stats_of[l] = Some(i);
                LayerStats::new(l, cfg.num_experts)
            })
            .collect();
        Ok(CachedProvider {
            source,
            dtype,
            device: device.clone(),
            config,
            expert_bytes,
            unavailable,
            state: Mutex::new(State {
                pools,
                pool_of,
                stats_of,
                layers,
                hits: 0,
                misses: 0,
                evictions: 0,
                bytes_read: 0,
                // Slot pools are allocated up front: that memory is held from the start.
                resident_bytes: if slot_mode { slot_bytes } else { 0 },
                latency: Histogram::default(),
                load_time_us: 0,
                overflow_loads: 0,
                overflow_time_us: 0,
                loading: HashSet::new(),
                prefetch: None,
                prefetched_unused: HashSet::new(),
                guesses: HashMap::new(),
                guess_seq: 0,
                staging: Default::default(),
                direct,
                h2d_path,
                maps,
                map_host,
                map_dirty: vec![false; cfg.num_hidden_layers],
                misses_seen: 0,
                gate: super::speculation::Gate::new(super::speculation::Rule::from_env()),
                fills,
                plain_step: false,
                // A wrong guess costs a whole step, a right one saves only the fill kernels'
                // launches (~5 % of a step): guess only at a clean rate of 95 %.
                plain_gate: super::speculation::Gate::new(super::speculation::Rule::from_env())
                    .with_costs(0.95, 1.0),
            }),
            loaded: Condvar::new(),
            bypass: std::sync::atomic::AtomicBool::new(false),
            prefetcher: std::sync::OnceLock::new(),
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// One expert's size in memory.
    pub fn expert_bytes(&self) -> u64 {
        self.expert_bytes
    }

    /// Total capacity in experts (after the per-layer split for layer scope).
    pub fn capacity_experts(&self) -> usize {
        let s = self.state.lock().expect("cache lock");
        s.pools.iter().map(|p| p.capacity).sum()
    }

    pub fn source(&self) -> &Arc<dyn ExpertSource> {
        &self.source
    }

    fn read(&self, layer: usize, expert: usize) -> Result<(ExpertWeights, u64, u64)> {
        let start = Instant::now();
        if self.device.is_cpu() {
            thread_local! {
                // One read buffer per thread (the forward pass and the prefetch thread).
                static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            let stored = self.source.stored_bytes(layer, expert) as usize;
            let fast = READ_BUF.with(|b| {
                let mut b = b.borrow_mut();
                if b.len() < stored {
                    b.resize(stored, 0);
                }
                // A failed read here is retried below, where it gets its proper error.
                let spans = self
                    .source
                    .read_into(layer, expert, &mut b[..stored])
                    .ok()?;
                let bytes = spans.iter().map(|p| p.range.len() as u64).sum::<u64>();
                convert::from_spans_exact(&b, &spans, self.dtype).map(|w| (w, bytes))
            });
            if let Some((w, bytes)) = fast {
                return Ok((w, bytes, start.elapsed().as_micros() as u64));
            }
        }
        let raw = self.source.read(layer, expert)?;
        let w = convert::from_raw(&raw, self.dtype, &self.device)?;
        Ok((w, raw.bytes(), start.elapsed().as_micros() as u64))
    }

    /// Inserts into the layer's pool, evicting as needed. Capacity 0 (a layer-scope share
    /// smaller than one) stores nothing: the caller's `Arc` is the only copy.
    fn insert(s: &mut State, layer: usize, expert: usize, w: Arc<ExpertWeights>, prefetched: bool) {
        let k = key(layer, expert);
        let pi = s.pool_of[layer];
        if s.pools[pi].capacity == 0 || s.pools[pi].entries.contains_key(&k) {
            return;
        }
        while s.pools[pi].entries.len() >= s.pools[pi].capacity {
            let Some(victim) = s.pools[pi].policy.evict() else {
                break;
            };
            if let Some(old) = s.pools[pi].entries.remove(&victim) {
                s.resident_bytes -= old.bytes();
                s.evictions += 1;
                let (vl, ve) = unkey(victim);
                if let Some(li) = s.stats_of[vl] {
                    s.layers[li].evictions[ve] += 1;
                    s.layers[li].resident[ve] = false;
                }
                s.prefetched_unused.remove(&victim);
            }
        }
        s.resident_bytes += w.bytes();
        s.pools[pi].entries.insert(k, w);
        if prefetched {
            s.pools[pi].policy.on_prefetch(k);
            s.prefetched_unused.insert(k);
        } else {
            s.pools[pi].policy.on_insert(k);
        }
        if let Some(li) = s.stats_of[layer] {
            s.layers[li].resident[expert] = true;
        }
    }

    /// Loads an expert in the background (prefetch): no hit/miss is counted, and nothing
    /// happens if it is already resident or being loaded — or, when `guess` is given, if that
    /// guess is no longer the layer's latest (the layer has started: loading now would only
    /// evict something for an expert nobody is waiting for).
    pub fn prefetch(&self, layer: usize, expert: usize, guess: Option<u64>) -> Result<()> {
        let k = key(layer, expert);
        {
            let mut s = self.state.lock().expect("cache lock");
            if let Some(g) = guess
                && s.guesses.get(&layer).map(|x| x.0) != Some(g)
            {
                if let Some(p) = s.prefetch.as_mut() {
                    p.late += 1;
                }
                return Ok(());
            }
            let pi = s.pool_of[layer];
            if s.pools[pi].entries.contains_key(&k) || s.loading.contains(&k) {
                return Ok(());
            }
            s.loading.insert(k);
        }
        let result = self.read(layer, expert);
        let mut s = self.state.lock().expect("cache lock");
        s.loading.remove(&k);
        let out = match result {
            Ok((w, bytes, us)) => {
                s.bytes_read += bytes;
                s.load_time_us += us;
                s.latency.record_us(us);
                Self::insert(&mut s, layer, expert, Arc::new(w), true);
                if let Some(p) = s.prefetch.as_mut() {
                    p.loaded += 1;
                }
                Ok(())
            }
            Err(e) => Err(e),
        };
        drop(s);
        self.loaded.notify_all();
        out
    }

    /// Starts the prefetch thread: it loads guessed experts into the cache while the forward pass
    /// computes. It holds only a weak reference, so dropping the provider ends it.
    pub fn start_prefetch(this: &Arc<Self>) {
        if this
            .state
            .lock()
            .expect("cache lock")
            .pools
            .iter()
            .any(|p| p.slots.is_some())
        {
            // GPU slot pools are filled by the fused path on the compute stream; background
            // loading into them is not implemented, so prefetch stays off there.
            eprintln!(
                "moescope: --prefetch next-layer is not available with GPU slot pools; running without it"
            );
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel::<PrefetchJob>();
        if this.prefetcher.set(Mutex::new(tx)).is_err() {
            return;
        }
        this.state.lock().expect("cache lock").prefetch = Some(PrefetchStats::default());
        let weak = Arc::downgrade(this);
        std::thread::Builder::new()
            .name("moescope-prefetch".into())
            .spawn(move || {
                while let Ok((layer, experts, guess)) = rx.recv() {
                    let Some(me) = weak.upgrade() else { break };
                    for e in experts {
                        // A failed prefetch is not an error: the forward pass will load it.
                        let _ = me.prefetch(layer, e, Some(guess));
                    }
                }
            })
            .expect("spawning the prefetch thread");
    }

    /// Records prefetch guesses for a layer against what it then needed.
    pub fn score_prefetch(&self, guessed: &[usize], needed: &[usize]) {
        let mut s = self.state.lock().expect("cache lock");
        let p = s.prefetch.get_or_insert_with(PrefetchStats::default);
        p.guessed += guessed.len() as u64;
        p.needed += needed.len() as u64;
        let hit = needed.iter().filter(|e| guessed.contains(e)).count() as u64;
        p.covered += hit;
        p.useful += hit;
    }

    /// Evicts from pool `pi` until a slot is free, never evicting a key in `pinned` (the experts
    /// the current kernel call needs). Returns the free slot.
    fn free_slot(s: &mut State, pi: usize, pinned: &HashSet<u32>) -> Option<usize> {
        if let Some(slot) = s.pools[pi].slots.as_mut().and_then(|x| x.free.pop()) {
            return Some(slot);
        }
        let mut deferred = Vec::new();
        let mut got = None;
        while let Some(v) = s.pools[pi].policy.evict() {
            if pinned.contains(&v) {
                deferred.push(v);
                continue;
            }
            let slot = s.pools[pi]
                .slots
                .as_mut()
                .and_then(|x| x.slot_of.remove(&v));
            if let Some(slot) = slot {
                s.evictions += 1;
                let (vl, ve) = unkey(v);
                if let Some(li) = s.stats_of[vl] {
                    s.layers[li].evictions[ve] += 1;
                    s.layers[li].resident[ve] = false;
                }
                s.prefetched_unused.remove(&v);
                got = Some(slot);
                break;
            }
        }
        for d in deferred {
            s.pools[pi].policy.on_insert(d);
        }
        got
    }

    /// Charges a settled batch of direct copies to the miss statistics: each miss costs its
    /// share of the batch's device copy time plus its own host time (queueing the copies).
    fn count_direct(s: &mut State, done: Option<super::direct::Settled>) {
        let Some(b) = done else { return };
        let total = b.copy_us + b.host_us;
        s.load_time_us += total;
        for _ in 0..b.misses {
            s.latency.record_us(total / b.misses.max(1) as u64);
        }
    }

    /// The fused path: every expert in `needed` resident in the layer's slot pool (loading the
    /// misses into free or evicted slots), or — when the pool cannot hold them all at once, as
    /// in the prefill of a long prompt with a small cache — a temporary stack of exactly those
    /// experts. Either way one kernel call over the same weights as native.
    fn stacked_slots(&self, layer: usize, needed: &[usize]) -> Result<Option<Stacked>> {
        let bypass = self.bypass.load(std::sync::atomic::Ordering::Relaxed);
        let mut s = self.state.lock().expect("cache lock");
        let pi = s.pool_of[layer];
        if s.pools[pi].slots.is_none() {
            return Ok(None);
        }
        let li = s.stats_of[layer].expect("moe layer has stats");
        let num = self.source.config().num_experts;
        let keys: Vec<u32> = needed.iter().map(|&e| key(layer, e)).collect();
        let mut missing = Vec::new();
        for (&e, &k) in needed.iter().zip(&keys) {
            if s.pools[pi].contains(k) {
                if !bypass {
                    count_hit(&mut s, pi, li, e, k);
                }
            } else {
                if !bypass {
                    s.misses += 1;
                    s.layers[li].misses[e] += 1;
                }
                missing.push(e);
            }
        }
        let fits = needed.len() <= s.pools[pi].capacity && !bypass;
        if fits {
            let pinned: HashSet<u32> = keys.iter().copied().collect();
            for &e in &missing {
                let home = s.fills.as_ref().map(|f| f.home[layer][e] as usize);
                let slot = match home {
                    // Its own slot: a pool with fills never evicts.
                    Some(h) => h,
                    None => {
                        Self::free_slot(&mut s, pi, &pinned).ok_or_else(|| ModelError::Expert {
                            layer,
                            expert: e,
                            msg: "no free slot although the pool holds enough".into(),
                        })?
                    }
                };
                let start = std::time::Instant::now();
                let st = &mut *s;
                let store = st.pools[pi].slots.as_mut().expect("slot mode");
                let gu_n = store.gate_up.dim(1)? * store.gate_up.dim(2)?;
                let dn_n = store.down.dim(1)? * store.down.dim(2)?;
                let esize = self.dtype.size_in_bytes();
                // Stored in the compute dtype at the slot's shapes: the bytes go into the slot
                // as they are, queued behind the kernels already on the stream.
                let fits_slot = |parts: [(usize, StDtype); 3]| {
                    parts[0].0 == gu_n / 2 * esize
                        && parts[1].0 == gu_n / 2 * esize
                        && parts[2].0 == dn_n * esize
                        && parts.iter().all(|p| p.1.float_dtype() == Some(self.dtype))
                };
                let direct_locs = st
                    .direct
                    .as_ref()
                    .and_then(|_| self.source.part_locations(layer, e))
                    .filter(|l| fits_slot([0, 1, 2].map(|i| (l[i].len as usize, l[i].dtype))));
                let mut direct = false;
                if let (Some(d), Some([g, u, dl])) = (st.direct.as_mut(), &direct_locs) {
                    direct = d.upload(&store.gate_up, slot * gu_n, g)?
                        && d.upload(&store.gate_up, slot * gu_n + gu_n / 2, u)?
                        && d.upload(&store.down, slot * dn_n, dl)?;
                }
                let bytes = if direct {
                    direct_locs.iter().flatten().map(|p| p.len).sum::<u64>()
                } else {
                    let stored = self.source.stored_bytes(layer, e) as usize;
                    let buf = st.staging.buffer(&self.device, stored)?;
                    let spans = self.source.read_into(layer, e, buf)?;
                    if fits_slot([0, 1, 2].map(|i| (spans[i].range.len(), spans[i].dtype))) {
                        let [g, u, d] = spans.clone();
                        st.staging.upload(&store.gate_up, slot * gu_n, g.range)?;
                        st.staging
                            .upload(&store.gate_up, slot * gu_n + gu_n / 2, u.range)?;
                        st.staging.upload(&store.down, slot * dn_n, d.range)?;
                    } else {
                        let raw = self.source.read(layer, e)?;
                        let w = convert::from_raw(&raw, self.dtype, &self.device)?;
                        store.gate_up.slice_set(&w.gate_up.unsqueeze(0)?, 0, slot)?;
                        store.down.slice_set(&w.down.unsqueeze(0)?, 0, slot)?;
                    }
                    spans.iter().map(|p| p.range.len() as u64).sum::<u64>()
                };
                let us = start.elapsed().as_micros() as u64;
                store.slot_of.insert(key(layer, e), slot);
                s.map_host[layer][e] = slot as u32;
                s.map_dirty[layer] = true;
                if let Some(f) = s.fills.as_mut() {
                    f.flags_host[layer][e] = 1;
                    f.flags_dirty[layer] = true;
                }
                s.pools[pi].policy.on_insert(key(layer, e));
                s.layers[li].resident[e] = true;
                s.bytes_read += bytes;
                match s.direct.as_mut().filter(|_| direct) {
                    // Its cost is the copy, known once the device has done it.
                    Some(d) => d.note_miss(us),
                    None => {
                        s.load_time_us += us;
                        s.latency.record_us(us);
                    }
                }
            }
            if let Some(done) = s.direct.as_mut().map(|d| d.end_batch()).transpose()? {
                Self::count_direct(&mut s, done);
            }
            let store = s.pools[pi].slots.as_ref().expect("slot mode");
            let mut index = vec![u32::MAX; num];
            for (&e, k) in needed.iter().zip(&keys) {
                index[e] = store.slot_of[k] as u32;
            }
            return Ok(Some(Stacked {
                gate_up: store.gate_up.clone(),
                down: store.down.clone(),
                index: Some(index),
                device_index: None,
                fill: None,
            }));
        }
        // Overflow (or bypass): a temporary stack of exactly `needed`.
        let mut gu = Vec::with_capacity(needed.len());
        let mut dn = Vec::with_capacity(needed.len());
        for (&e, k) in needed.iter().zip(&keys) {
            let store = s.pools[pi].slots.as_ref().expect("slot mode");
            if let Some(&slot) = store.slot_of.get(k) {
                gu.push(store.gate_up.get(slot)?);
                dn.push(store.down.get(slot)?);
            } else {
                let (w, bytes, us) = self.read(layer, e)?;
                if !bypass {
                    s.bytes_read += bytes;
                    s.load_time_us += us;
                    s.latency.record_us(us);
                    s.overflow_loads += 1;
                    s.overflow_time_us += us;
                }
                gu.push(w.gate_up);
                dn.push(w.down);
            }
        }
        let mut index = vec![u32::MAX; num];
        for (pos, &e) in needed.iter().enumerate() {
            index[e] = pos as u32;
        }
        Ok(Some(Stacked {
            gate_up: Tensor::stack(&gu, 0)?,
            down: Tensor::stack(&dn, 0)?,
            index: Some(index),
            device_index: None,
            fill: None,
        }))
    }

    fn all_resident(s: &State) -> bool {
        let resident: usize = s
            .pools
            .iter()
            .filter_map(|p| p.slots.as_ref())
            .map(|x| x.slot_of.len())
            .sum();
        s.fills.as_ref().is_some_and(|f| resident >= f.total)
    }

    /// After a graph step that stands: what the uncaptured step records, layer by layer (the
    /// layer's distinct experts in ascending order, each a hit or a miss) — misses only where
    /// the GPU filled them, which enter as resident in their home slots.
    fn settle_step(&self, s: &mut State, routed: &[(usize, Vec<u32>)]) {
        for (layer, ids) in routed {
            let mut needed: Vec<usize> = ids.iter().map(|&e| e as usize).collect();
            needed.sort_unstable();
            needed.dedup();
            let (pi, li) = (s.pool_of[*layer], s.stats_of[*layer].expect("moe layer"));
            for e in needed {
                let k = key(*layer, e);
                if s.pools[pi].contains(k) {
                    count_hit(s, pi, li, e, k);
                    continue;
                }
                let Some(home) = s.fills.as_ref().map(|f| f.home[*layer][e]) else {
                    continue;
                };
                s.misses += 1;
                s.layers[li].misses[e] += 1;
                if let Some(store) = s.pools[pi].slots.as_mut() {
                    store.slot_of.insert(k, home as usize);
                }
                if let Some(f) = s.fills.as_mut() {
                    // The device already says so (the kernel marked it): not dirty.
                    f.flags_host[*layer][e] = 1;
                    f.bytes += self.expert_bytes;
                }
                s.pools[pi].policy.on_insert(k);
                s.layers[li].resident[e] = true;
                s.bytes_read += self.expert_bytes;
            }
        }
    }

    /// Drops every cached expert (statistics are kept).
    pub fn clear(&self) {
        let mut s = self.state.lock().expect("cache lock");
        let keys: Vec<u32> = s
            .pools
            .iter()
            .flat_map(|p| p.entries.keys().copied())
            .collect();
        for k in keys {
            let (l, e) = unkey(k);
            let pi = s.pool_of[l];
            s.pools[pi].entries.remove(&k);
            s.pools[pi].policy.remove(k);
            if let Some(li) = s.stats_of[l] {
                s.layers[li].resident[e] = false;
            }
        }
        s.resident_bytes = 0;
    }

    pub fn snapshot(&self) -> CacheSnapshot {
        let mut s = self.state.lock().expect("cache lock");
        // Without waiting: a batch still in flight is counted at a later snapshot.
        if let Some(Ok(done)) = s.direct.as_mut().map(|d| d.settle(false)) {
            Self::count_direct(&mut s, done);
        }
        let (staged_bytes, staged_us) = s.staging.copy_stats();
        let (direct_bytes, direct_us) = s.direct.as_ref().map_or((0, 0), |d| d.copy_stats());
        CacheSnapshot {
            layers: s.layers.clone(),
            hits: s.hits,
            misses: s.misses,
            evictions: s.evictions,
            bytes_read: s.bytes_read,
            resident_experts: s
                .pools
                .iter()
                .map(|p| {
                    p.slots
                        .as_ref()
                        .map(|x| x.slot_of.len())
                        .unwrap_or(p.entries.len())
                })
                .sum(),
            resident_bytes: s.resident_bytes,
            capacity_experts: s.pools.iter().map(|p| p.capacity).sum(),
            capacity_bytes: match self.config.capacity {
                Capacity::Bytes(b) => Some(b),
                Capacity::Experts(n) => Some(n as u64 * self.expert_bytes),
            },
            load_latency: s.latency.summary(),
            load_time_us: s.load_time_us,
            prefetch: s.prefetch.clone(),
            h2d_bytes: staged_bytes + direct_bytes,
            h2d_time_us: staged_us + direct_us,
            overflow_loads: s.overflow_loads,
            overflow_time_us: s.overflow_time_us,
            h2d_path: s.h2d_path.clone(),
            host_pinned_bytes: s.direct.as_ref().map_or(0, |d| d.registered_bytes()),
            h2d_fill_bytes: s.fills.as_ref().map_or(0, |f| f.bytes),
            gpu_fills: s.fills.is_some(),
        }
    }
}

impl ExpertProvider for CachedProvider {
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertWeights>> {
        let k = key(layer, expert);
        let slot_mode = {
            let s = self.state.lock().expect("cache lock");
            s.pool_of
                .get(layer)
                .is_some_and(|&pi| pi != usize::MAX && s.pools[pi].slots.is_some())
        };
        if slot_mode {
            // The fused path owns the slots; a per-expert request is served without caching.
            return self.read(layer, expert).map(|(w, _, _)| Arc::new(w));
        }
        if self.bypass.load(std::sync::atomic::Ordering::Relaxed) {
            let resident = {
                let s = self.state.lock().expect("cache lock");
                let pi = *s.pool_of.get(layer).unwrap_or(&usize::MAX);
                if pi == usize::MAX {
                    None
                } else {
                    s.pools[pi].entries.get(&k).cloned()
                }
            };
            return match resident {
                Some(w) => Ok(w),
                None => self.read(layer, expert).map(|(w, _, _)| Arc::new(w)),
            };
        }
        let li;
        {
            let mut s = self.state.lock().expect("cache lock");
            if layer >= s.pool_of.len() || s.pool_of[layer] == usize::MAX {
                return Err(ModelError::Expert {
                    layer,
                    expert,
                    msg: "layer has no experts".into(),
                });
            }
            li = s.stats_of[layer].expect("moe layer has stats");
            // Wait for a prefetch of this very expert rather than reading it twice.
            while s.loading.contains(&k) {
                s = self.loaded.wait(s).expect("cache lock");
            }
            let pi = s.pool_of[layer];
            if let Some(w) = s.pools[pi].entries.get(&k).cloned() {
                count_hit(&mut s, pi, li, expert, k);
                return Ok(w);
            }
            s.misses += 1;
            s.layers[li].misses[expert] += 1;
            s.loading.insert(k);
        }
        let result = self.read(layer, expert);
        let mut s = self.state.lock().expect("cache lock");
        s.loading.remove(&k);
        let out = match result {
            Ok((w, bytes, us)) => {
                s.bytes_read += bytes;
                s.load_time_us += us;
                s.latency.record_us(us);
                let w = Arc::new(w);
                Self::insert(&mut s, layer, expert, w.clone(), false);
                Ok(w)
            }
            Err(e) => Err(e),
        };
        drop(s);
        self.loaded.notify_all();
        out
    }

    fn unavailable(&self, layer: usize) -> &[usize] {
        &self.unavailable[layer]
    }

    fn resident_bytes(&self) -> u64 {
        self.state.lock().expect("cache lock").resident_bytes
    }

    fn kind(&self) -> &'static str {
        "selective"
    }

    fn set_bypass(&self, on: bool) {
        self.bypass.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn stacked(&self, layer: usize, needed: &[usize]) -> Result<Option<Stacked>> {
        self.stacked_slots(layer, needed)
    }

    fn needs_ids_on_host(&self) -> bool {
        true
    }

    fn speculate(&self) -> bool {
        if self.bypass.load(std::sync::atomic::Ordering::Relaxed) || self.prefetcher.get().is_some()
        {
            return false;
        }
        let mut s = self.state.lock().expect("cache lock");
        if s.maps.iter().all(Option::is_none) {
            return false;
        }
        let clean = s.misses == s.misses_seen;
        s.misses_seen = s.misses;
        let guess = s.gate.next_step(clean);
        if s.fills.is_some() {
            // A graph step either way: with the fill kernels (it loads its own misses, nothing
            // can fail), or plain when a miss is unlikely.
            let plain = s.plain_gate.next_step(clean) || Self::all_resident(&s);
            s.plain_step = plain;
            return true;
        }
        guess
    }

    fn step_ran(&self, path: crate::step_path::StepPath, secs: f64) {
        self.state
            .lock()
            .expect("cache lock")
            .gate
            .step_ran(path, secs);
    }

    fn resident_stacks(&self, layer: usize) -> Result<Option<Stacked>> {
        let s = self.state.lock().expect("cache lock");
        let (Some(store), Some(map)) = (&s.pools[s.pool_of[layer]].slots, &s.maps[layer]) else {
            return Ok(None);
        };
        // A plain step leaves the fill kernels out (a graph of its own, see `graph_variant`).
        let fill = s
            .fills
            .as_ref()
            .filter(|_| !s.plain_step)
            .and_then(|f| f.tables[layer].clone());
        Ok(Some(Stacked {
            gate_up: store.gate_up.clone(),
            down: store.down.clone(),
            index: None,
            device_index: Some(map.clone()),
            fill,
        }))
    }

    fn prepare_speculation(&self) -> Result<()> {
        let mut s = self.state.lock().expect("cache lock");
        for l in 0..s.maps.len() {
            if !s.map_dirty[l] {
                continue;
            }
            if let Some(map) = &s.maps[l] {
                let n = s.map_host[l].len();
                map.slice_set(
                    &Tensor::from_vec(s.map_host[l].clone(), n, &self.device)?,
                    0,
                    0,
                )?;
            }
            s.map_dirty[l] = false;
        }
        if let Some(f) = s.fills.as_mut() {
            for l in 0..f.flags_dirty.len() {
                if let (true, Some(t)) = (f.flags_dirty[l], &f.tables[l]) {
                    let n = f.flags_host[l].len();
                    let flags = Tensor::from_vec(f.flags_host[l].clone(), n, &self.device)?;
                    t.resident.slice_set(&flags, 0, 0)?;
                }
                f.flags_dirty[l] = false;
            }
        }
        Ok(())
    }

    fn graph_variant(&self) -> u64 {
        let s = self.state.lock().expect("cache lock");
        u64::from(s.fills.is_some() && !s.plain_step)
    }

    fn settle_speculation(&self, routed: &[(usize, Vec<u32>)]) -> bool {
        let mut s = self.state.lock().expect("cache lock");
        if s.fills.is_some() && !s.plain_step {
            self.settle_step(&mut s, routed);
            return true;
        }
        let resident = |s: &State, layer: usize, e: u32| {
            s.pools[s.pool_of[layer]].contains(key(layer, e as usize))
        };
        if !routed
            .iter()
            .all(|(l, ids)| ids.iter().all(|&e| resident(&s, *l, e)))
        {
            return false;
        }
        // Every selected expert resident: each a hit. (No prefetch guesses to score: prefetch
        // never speculates.)
        self.settle_step(&mut s, routed);
        true
    }

    fn wants_hints(&self) -> bool {
        self.prefetcher.get().is_some() && !self.bypass.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn prefetch_hint(&self, layer: usize, experts: &[usize]) {
        let Some(tx) = self.prefetcher.get() else {
            return;
        };
        let wanted: Vec<usize> = experts
            .iter()
            .copied()
            .filter(|e| !self.unavailable[layer].contains(e))
            .collect();
        let seq = {
            let mut s = self.state.lock().expect("cache lock");
            s.guess_seq += 1;
            let seq = s.guess_seq;
            s.guesses.insert(layer, (seq, wanted.clone()));
            seq
        };
        let _ = tx
            .lock()
            .expect("prefetch sender")
            .send((layer, wanted, seq));
    }

    fn will_use(&self, layer: usize, experts: &[usize]) {
        let guess = self
            .state
            .lock()
            .expect("cache lock")
            .guesses
            .remove(&layer);
        if let Some((_, g)) = guess {
            self.score_prefetch(&g, experts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_cache(capacity: usize, policy: PolicyKind) -> (CachedProvider, usize) {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3-moe-tiny");
        let ckpt = crate::model::Checkpoint::open(&dir).unwrap();
        let cfg = crate::model::MoeConfig::from_dir(&dir).unwrap();
        let layer = cfg.moe_layers().next().unwrap();
        let source = Arc::new(super::super::source::ShardSource::new(&ckpt, &cfg).unwrap());
        let config = CacheConfig {
            capacity: Capacity::Experts(capacity),
            scope: Scope::Global,
            policy,
        };
        let c = CachedProvider::new(source, config, DType::F32, &Device::Cpu, false).unwrap();
        (c, layer)
    }

    #[test]
    fn a_late_prefetch_is_dropped_and_a_used_guess_is_its_first_use_not_a_second() {
        let (c, layer) = fixture_cache(4, PolicyKind::S3fifo);
        c.state.lock().unwrap().prefetch = Some(PrefetchStats::default());
        // The layer's latest guess is number 7; a job for guess 6 is late: nothing loads.
        c.state.lock().unwrap().guesses.insert(layer, (7, vec![0]));
        c.prefetch(layer, 0, Some(6)).unwrap();
        let s = c.snapshot();
        assert_eq!(
            (s.resident_experts, s.prefetch.as_ref().unwrap().late),
            (0, 1)
        );
        // The current guess loads, counted as a prefetch load, not as a miss.
        c.prefetch(layer, 0, Some(7)).unwrap();
        let s = c.snapshot();
        assert_eq!((s.resident_experts, s.misses), (1, 0));
        assert_eq!(s.prefetch.as_ref().unwrap().loaded, 1);
        // Its first request is a hit, and for the policy its first use: S3-FIFO keeps it on
        // probation, so the next insert into the full probation queue evicts it...
        c.get(layer, 0).unwrap();
        assert_eq!(c.snapshot().hits, 1);
        for e in 1..=4 {
            c.get(layer, e).unwrap();
        }
        let st = c.state.lock().unwrap();
        assert!(
            !st.pools[0].contains(key(layer, 0)),
            "a guess used once was promoted"
        );
        drop(st);
        // ...whereas an expert requested twice is promoted and survives the same inserts.
        let (c, layer) = fixture_cache(4, PolicyKind::S3fifo);
        c.get(layer, 0).unwrap();
        c.get(layer, 0).unwrap();
        for e in 1..=4 {
            c.get(layer, e).unwrap();
        }
        assert!(c.state.lock().unwrap().pools[0].contains(key(layer, 0)));
    }

    #[test]
    fn every_expert_gets_its_own_home_slot_only_when_every_pool_holds_all_it_serves() {
        // Global scope: one pool serving layers 1 and 3 of a model with a dense layer 0.
        let home = home_slots(&[(8, vec![1, 3])], 4, 4).expect("8 slots hold 2 × 4 experts");
        assert_eq!(home[0], Vec::<u32>::new());
        assert_eq!(home[1], [0, 1, 2, 3]);
        assert_eq!(home[3], [4, 5, 6, 7]);
        assert!(
            home_slots(&[(7, vec![1, 3])], 4, 4).is_none(),
            "one slot short"
        );
        // Layer scope: a pool per layer, each its own 0..E.
        let home = home_slots(&[(4, vec![0]), (5, vec![1])], 2, 4).unwrap();
        assert_eq!(home, [vec![0, 1, 2, 3], vec![0, 1, 2, 3]]);
        assert!(home_slots(&[(4, vec![0]), (3, vec![1])], 2, 4).is_none());
    }
}
