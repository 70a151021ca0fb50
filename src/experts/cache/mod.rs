//! The selective backend's provider: experts loaded on demand from an [`ExpertSource`] into a
//! bounded cache.
//!
//! What is resident, where, and what to evict is the cache core's ([`Pools`]); this module
//! keeps the weights in the slots the core hands out — on the CPU a vector of shared tensors per
//! pool, on a GPU preallocated slot tensors ([`slots`]) that the GPU may fill itself ([`fill`]) —
//! and does the reading. Reads happen outside the lock, so the prefetch thread ([`prefetch`])
//! and the forward pass can load different experts at the same time.

mod fill;
mod prefetch;
mod slots;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::convert;
use super::source::{ExpertSource, missing_error};
use crate::cache::pool::{Admit, Pools, key};
use crate::cache::settings::{CacheConfig, Capacity};
use crate::cache::stats::{CacheSnapshot, Histogram};
use crate::model::error::{ModelError, Result};
use crate::model::ports::{
    ExpertProvider, ExpertWeights, FUSED_DECODE_MAX_TOPK, Fp8Scales, GgmlLayout, Stacked, StepPath,
    fused_capable, held_dtype,
};
use crate::model::safetensors_file::StDtype;
use crate::settings::Settings;

/// Time and bytes spent loading experts (what the selective backend pays for its memory).
#[derive(Default)]
struct Loads {
    bytes_read: u64,
    latency: Histogram,
    time_us: u64,
    /// Loads through the temporary-stack path (see `CacheSnapshot::overflow_loads`).
    overflow: u64,
    overflow_time_us: u64,
    /// `time_us` when the last step's loads were taken (see `CachedProvider::take_step_loads`).
    taken_us: u64,
}

impl Loads {
    fn record(&mut self, bytes: u64, us: u64) {
        self.bytes_read += bytes;
        self.time_us += us;
        self.latency.record_us(us);
    }
}

struct State {
    pools: Pools,
    /// CPU: the weights in each pool's slots (grown as slots are handed out).
    host: Vec<Vec<Option<Arc<ExpertWeights>>>>,
    /// GPU: the slot pools on the device and how misses reach them.
    gpu: Option<slots::GpuSlots>,
    resident_bytes: u64,
    loads: Loads,
    /// Keys being read right now (by the forward pass or the prefetcher).
    loading: HashSet<u32>,
    prefetch: Option<prefetch::Guesses>,
    /// Exact device residency tables, made when a gated GPU step first asks.
    residency: Option<slots::Residency>,
}

/// Experts on demand through a bounded cache.
pub struct CachedProvider {
    source: Arc<dyn ExpertSource>,
    dtype: DType,
    device: Device,
    config: CacheConfig,
    expert_bytes: u64,
    /// Experts kept as stored (GGUF blocks, FP8): no exact float conversion from a read buffer.
    quantized: bool,
    /// Whether bf16 CPU misses are mapped in place (`read_mapped`): only where the cache
    /// cannot hold every expert, so that misses recur.
    map_misses: bool,
    /// GGUF experts held as GPU blocks in the slot pools (see `convert::gpu_block_layouts`).
    gpu_blocks: bool,
    /// The residency tables kept by one kernel (the `table_kernel` setting).
    table_kernel: bool,
    unavailable: Vec<Vec<usize>>,
    state: Mutex<State>,
    loaded: Condvar,
    bypass: AtomicBool,
    /// Warm-up: every expert served as zeros (see `ExpertProvider::set_warming`).
    warming: AtomicBool,
    /// Jobs for the prefetch thread, when prefetch is on.
    prefetcher: OnceLock<Mutex<std::sync::mpsc::Sender<prefetch::Job>>>,
}

/// No key pinned (the CPU path: nothing is in flight while a slot is reused).
fn unpinned() -> &'static HashSet<u32> {
    static NONE: OnceLock<HashSet<u32>> = OnceLock::new();
    NONE.get_or_init(HashSet::new)
}

impl CachedProvider {
    /// A cache over `source` for compute in `dtype` on `device`; `settings` choose the GPU's
    /// miss path and speculation.
    pub fn new(
        source: Arc<dyn ExpertSource>,
        config: CacheConfig,
        dtype: DType,
        device: &Device,
        allow_missing: bool,
        settings: &Settings,
    ) -> Result<Self> {
        let cfg = source.config().clone();
        // Budgets count experts as held: quantized ones as stored, float ones in the compute
        // dtype or, for f32 on the CPU, as stored.
        let expert_bytes = convert::held_bytes(source.as_ref(), dtype, device);
        let quantized = convert::kept_as_stored(source.as_ref());
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
                "cache capacity {} holds no expert (one expert is {} as held for {:?} compute)",
                config.describe(),
                crate::util::fmt_bytes(expert_bytes),
                dtype
            )));
        }
        let moe_layers: Vec<usize> = cfg.moe_layers().collect();
        let mut pools = Pools::new(
            &moe_layers,
            cfg.num_experts,
            total,
            config.scope,
            config.policy,
        );
        // The slot pools and the fused kernels read dense, FP8 or GGUF block matrices (the last
        // two in bf16 compute, where the block kernels decode every type: see
        // `convert::gpu_block_layout`); other GGUF experts are served one by one (QMatMul on the
        // device). (Where the FP8 decode kernels take every step: see `FUSED_DECODE_MAX_TOPK`.)
        let fp8 = super::convert::fp8_block(source.as_ref())
            .filter(|_| dtype == DType::BF16 && cfg.num_experts_per_tok <= FUSED_DECODE_MAX_TOPK);
        let ggml = match (fused_capable(device, dtype), fp8) {
            (true, None) => super::convert::gpu_block_layouts(source.as_ref(), dtype, device),
            _ => None,
        };
        let gpu_blocks = ggml.is_some();
        let gpu = if fused_capable(device, dtype) && (!quantized || fp8.is_some() || ggml.is_some())
        {
            Some(slots::GpuSlots::new(
                source.as_ref(),
                &mut pools,
                dtype,
                device,
                settings,
                fp8,
                ggml,
            )?)
        } else {
            None
        };
        // Slot pools are allocated up front: that memory is held from the start.
        let resident_bytes = gpu.as_ref().map_or(0, |g| g.bytes());
        Ok(CachedProvider {
            source,
            dtype,
            device: device.clone(),
            config,
            expert_bytes,
            quantized,
            map_misses: total < cfg.total_experts(),
            gpu_blocks,
            table_kernel: settings.table_kernel,
            unavailable,
            state: Mutex::new(State {
                host: vec![Vec::new(); pools.num_pools()],
                pools,
                gpu,
                resident_bytes,
                loads: Loads::default(),
                loading: HashSet::new(),
                prefetch: None,
                residency: None,
            }),
            loaded: Condvar::new(),
            bypass: AtomicBool::new(false),
            warming: AtomicBool::new(false),
            prefetcher: OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("cache lock")
    }

    fn warming(&self) -> bool {
        self.warming.load(Ordering::Relaxed)
    }

    /// `n` experts of zeros, stacked as the fused kernels take them ([n, 2I, H] and [n, H, I]).
    /// `n` zero experts as slot pools of FP8 experts in `fp8` blocks, or of GGUF experts in
    /// `ggml` layout (neither: dense), store them.
    fn zero_stacks(
        &self,
        n: usize,
        fp8: Option<[usize; 2]>,
        ggml: Option<GgmlLayout>,
    ) -> Result<(Tensor, Tensor, Option<Fp8Scales>)> {
        if let Some(l) = ggml {
            let dev = &self.device;
            return Ok((
                Tensor::zeros((n, l.gate_up_bytes()), DType::U8, dev)?,
                Tensor::zeros((n, l.down_bytes()), DType::U8, dev)?,
                None,
            ));
        }
        let Some(block) = fp8 else {
            let (gu, dn) = self.zero_experts(n)?;
            return Ok((gu, dn, None));
        };
        let cfg = self.source.config();
        let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let [br, bc] = block;
        let dev = &self.device;
        Ok((
            Tensor::zeros((n, 2 * i, h), DType::U8, dev)?,
            Tensor::zeros((n, h, i), DType::U8, dev)?,
            Some(Fp8Scales {
                gate_up: Tensor::zeros((n, 2 * i.div_ceil(br), h.div_ceil(bc)), DType::F32, dev)?,
                down: Tensor::zeros((n, h.div_ceil(br), i.div_ceil(bc)), DType::F32, dev)?,
                block,
            }),
        ))
    }

    fn zero_experts(&self, n: usize) -> Result<(Tensor, Tensor)> {
        let cfg = self.source.config();
        let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
        Ok((
            Tensor::zeros((n, 2 * i, h), self.dtype, &self.device)?,
            Tensor::zeros((n, h, i), self.dtype, &self.device)?,
        ))
    }

    fn bypassed(&self) -> bool {
        self.bypass.load(Ordering::Relaxed)
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
        self.lock().pools.capacity()
    }

    pub fn source(&self) -> &Arc<dyn ExpertSource> {
        &self.source
    }

    /// Reads and converts one expert: (weights, bytes read, µs).
    fn read(&self, layer: usize, expert: usize) -> Result<(ExpertWeights, u64, u64)> {
        let start = Instant::now();
        // Quantized experts have no fast float path: read them once, below, not twice.
        if self.device.is_cpu() && !self.quantized {
            if let Some(w) = self.read_mapped(layer, expert)? {
                let bytes = w.bytes();
                return Ok((w, bytes, start.elapsed().as_micros() as u64));
            }
            if let Some((w, bytes)) = self.read_whole(layer, expert)? {
                return Ok((w, bytes, start.elapsed().as_micros() as u64));
            }
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
        if self.device.is_cpu()
            && self.quantized
            && let Some((w, bytes)) = self.read_quantized_direct(layer, expert)?
        {
            return Ok((w, bytes, start.elapsed().as_micros() as u64));
        }
        let (w, bytes) = self.read_general(layer, expert)?;
        Ok((w, bytes, start.elapsed().as_micros() as u64))
    }

    /// A bf16-stored expert for bf16 or f32 compute on the CPU (`held_dtype`: held as stored),
    /// mapped in place from the checkpoint
    /// (`ExpertSource::map_bf16`: nothing copied; the slot is the map, dropped on eviction);
    /// None where the dtype, the source or the layout does not allow it, and where the cache
    /// holds every expert: then each is read once, and the expert kernels read a copy in the
    /// process's own memory ~7 % faster than mapped file pages (BENCHMARKS.md §69).
    fn read_mapped(&self, layer: usize, expert: usize) -> Result<Option<ExpertWeights>> {
        if held_dtype(DType::BF16, self.dtype, &self.device) != DType::BF16 || !self.map_misses {
            return Ok(None);
        }
        match self.source.map_bf16(layer, expert)? {
            Some((gate_up, down)) => Ok(Some(ExpertWeights::mapped(gate_up, down)?)),
            None => Ok(None),
        }
    }

    /// (layer, expert) read as stored and converted for this cache's compute — the path every
    /// source and format takes — with the bytes read.
    fn read_general(&self, layer: usize, expert: usize) -> Result<(ExpertWeights, u64)> {
        let raw = self.source.read(layer, expert)?;
        let w = convert::from_raw_with(
            &raw,
            self.source.config().quantization,
            self.dtype,
            &self.device,
            self.gpu_blocks,
        )?;
        Ok((w, raw.bytes()))
    }

    /// A block-quantized CPU miss straight into its block storage (`convert::quantized_direct`),
    /// or None where the source or the parts do not allow it (then the general path reads).
    fn read_quantized_direct(
        &self,
        layer: usize,
        expert: usize,
    ) -> Result<Option<(ExpertWeights, u64)>> {
        let Some(locs) = self.source.part_locations(layer, expert) else {
            return Ok(None);
        };
        let bytes = locs.iter().map(|l| l.len).sum::<u64>();
        let parts = [0, 1, 2].map(|k| (locs[k].dtype, locs[k].shape.as_slice()));
        let w = convert::quantized_direct(parts, |gate_up, down| {
            // A failed read is retried by the general path, which reports it properly.
            Ok(self
                .source
                .read_split_into_uninit(layer, expert, gate_up, down)
                .unwrap_or(false))
        })?;
        Ok(w.map(|w| (w, bytes)))
    }

    /// The CPU miss that copies once: when the expert is stored in the compute dtype, it is
    /// read straight into its tensors' storage (`convert::from_whole_buffer`); stored otherwise
    /// but of the same size (f16 for bf16), converted from that buffer. f32 compute holds bf16
    /// and f16 experts as stored (`held_dtype`), so they too are read whole. None when the
    /// sizes say a conversion is needed: the caller's path handles it.
    fn read_whole(&self, layer: usize, expert: usize) -> Result<Option<(ExpertWeights, u64)>> {
        match self.dtype {
            DType::BF16 => self.read_whole_as::<half::bf16>(layer, expert),
            DType::F16 => self.read_whole_as::<half::f16>(layer, expert),
            // 16-bit experts stay as stored: read them as what the file says they are (an f16
            // expert read as bf16 would be copied once more to become f16 again).
            DType::F32 => match self
                .source
                .part_locations(layer, expert)
                .map(|l| l[0].dtype)
            {
                Some(StDtype::F16) => self.read_whole_as::<half::f16>(layer, expert),
                Some(StDtype::BF16) => self.read_whole_as::<half::bf16>(layer, expert),
                _ => match self.read_whole_as::<f32>(layer, expert)? {
                    Some(w) => Ok(Some(w)),
                    None => self.read_whole_as::<half::bf16>(layer, expert),
                },
            },
            _ => Ok(None),
        }
    }

    fn read_whole_as<T: candle_core::WithDType>(
        &self,
        layer: usize,
        expert: usize,
    ) -> Result<Option<(ExpertWeights, u64)>> {
        let esize = std::mem::size_of::<T>();
        let stored = self.source.stored_bytes(layer, expert) as usize;
        let cfg = self.source.config();
        if stored != cfg.expert_params() * esize {
            return Ok(None);
        }
        let n = stored / esize;
        // Read straight into the fresh allocation where the source can (no clearing first).
        let mut whole: Vec<T> = Vec::with_capacity(n);
        let spare = whole.spare_capacity_mut();
        // SAFETY: the spare capacity is `n` elements, `stored` bytes; `MaybeUninit<u8>` asks
        // nothing of the bytes it views.
        let uninit = unsafe {
            std::slice::from_raw_parts_mut(
                spare.as_mut_ptr() as *mut std::mem::MaybeUninit<u8>,
                stored,
            )
        };
        let spans = match self.source.read_into_uninit(layer, expert, uninit) {
            Ok(Some(spans)) if spans_end(&spans) == stored => {
                // SAFETY: the read wrote every byte up to its spans' end, which is all `stored`
                // bytes; every bit pattern is a valid T (plain numbers).
                unsafe { whole.set_len(n) };
                spans
            }
            Err(_) => return Ok(None), // the caller's path reads again and reports it properly
            Ok(_) => {
                whole = zeroed_vec::<T>(n);
                // SAFETY: `whole` is initialised and holds exactly `stored` bytes of plain
                // numbers, every bit pattern of which is a valid T.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(whole.as_mut_ptr() as *mut u8, stored)
                };
                let Ok(spans) = self.source.read_into(layer, expert, bytes) else {
                    return Ok(None);
                };
                spans
            }
        };
        let read = spans.iter().map(|p| p.range.len() as u64).sum::<u64>();
        let held = spans[0]
            .dtype
            .float_dtype()
            .map_or(self.dtype, |s| held_dtype(s, self.dtype, &self.device));
        match convert::from_whole_buffer(whole, &spans, held) {
            Ok(w) => Ok(Some((w, read))),
            Err(whole) => {
                // SAFETY: as above.
                let bytes =
                    unsafe { std::slice::from_raw_parts(whole.as_ptr() as *const u8, stored) };
                Ok(convert::from_spans_exact(bytes, &spans, self.dtype).map(|w| (w, read)))
            }
        }
    }

    /// Keeps `w` in the slot the core gives (layer, expert), dropping whatever it evicted there.
    /// A pool of no slots keeps nothing: the caller's `Arc` is the only copy.
    fn keep(s: &mut State, layer: usize, expert: usize, w: Arc<ExpertWeights>, how: Admit) {
        let Some(a) = s.pools.admit(layer, expert, how, unpinned()) else {
            return;
        };
        let slots = &mut s.host[a.pool];
        if slots.len() <= a.slot {
            slots.resize(a.slot + 1, None);
        }
        s.resident_bytes += w.bytes();
        if let Some(old) = slots[a.slot].replace(w) {
            s.resident_bytes -= old.bytes();
        }
    }

    /// The CPU path: the expert from its slot, or read, converted and kept.
    fn get_cached(&self, layer: usize, expert: usize) -> Result<Arc<ExpertWeights>> {
        let k = key(layer, expert);
        {
            let mut s = self.lock();
            if !s.pools.serves(layer) {
                return Err(ModelError::Expert {
                    layer,
                    expert,
                    msg: "layer has no experts".into(),
                });
            }
            // Wait for a prefetch of this very expert rather than reading it twice.
            while s.loading.contains(&k) {
                s = self.loaded.wait(s).expect("cache lock");
            }
            if let Some((p, slot)) = s.pools.request(layer, expert) {
                return Ok(s.host[p][slot]
                    .clone()
                    .expect("a resident expert is stored"));
            }
            s.loading.insert(k);
        }
        self.load(layer, expert, Admit::Demand)
    }

    /// Reads (layer, expert) — marked as loading by the caller — outside the lock, then keeps
    /// it as `how` says and wakes whoever waits for it.
    fn load(&self, layer: usize, expert: usize, how: Admit) -> Result<Arc<ExpertWeights>> {
        let result = self.read(layer, expert);
        let mut s = self.lock();
        s.loading.remove(&key(layer, expert));
        let out = result.map(|(w, bytes, us)| {
            s.loads.record(bytes, us);
            let w = Arc::new(w);
            Self::keep(&mut s, layer, expert, w.clone(), how);
            if let (Admit::Prefetch, Some(p)) = (how, s.prefetch.as_mut()) {
                p.stats.loaded += 1;
            }
            w
        });
        drop(s);
        self.loaded.notify_all();
        out
    }

    /// Logs each miss from now on, for [`Self::take_step_loads`] (the dashboard's token
    /// inspector asks, per decode step, which experts were loaded).
    pub fn log_misses(&self, on: bool) {
        self.lock().pools.log_misses(on);
    }

    /// The experts that missed since the last call, as (layer, expert), and the load time
    /// counted since, µs. On the GPU's direct path a copy's time is counted once the device has
    /// done it, so it may land on the next step.
    pub fn take_step_loads(&self) -> (Vec<(u16, u16)>, u64) {
        let mut s = self.lock();
        let misses = s.pools.take_misses();
        let us = s.loads.time_us.saturating_sub(s.loads.taken_us);
        s.loads.taken_us = s.loads.time_us;
        (misses, us)
    }

    pub fn snapshot(&self) -> CacheSnapshot {
        let mut s = self.lock();
        let st = &mut *s;
        let gpu = st.gpu.as_mut().map(|g| g.snapshot(&mut st.loads));
        let gpu = gpu.unwrap_or_default();
        CacheSnapshot {
            layers: s.pools.layer_stats().to_vec(),
            hits: s.pools.hits(),
            misses: s.pools.misses(),
            evictions: s.pools.evictions(),
            bytes_read: s.loads.bytes_read,
            resident_experts: s.pools.resident(),
            resident_bytes: s.resident_bytes,
            capacity_experts: s.pools.capacity(),
            capacity_bytes: match self.config.capacity {
                Capacity::Bytes(b) => Some(b),
                Capacity::Experts(n) => Some(n as u64 * self.expert_bytes),
            },
            load_latency: s.loads.latency.summary(),
            load_time_us: s.loads.time_us,
            prefetch: s.prefetch.as_ref().map(|p| p.stats.clone()),
            overflow_loads: s.loads.overflow,
            overflow_time_us: s.loads.overflow_time_us,
            ..gpu
        }
    }
}

impl ExpertProvider for CachedProvider {
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertWeights>> {
        if self.warming() {
            let (gate_up, down) = self.zero_experts(1)?;
            let i = self.source.config().moe_intermediate_size;
            return Ok(Arc::new(ExpertWeights::new(
                gate_up.squeeze(0)?,
                down.squeeze(0)?,
                i,
            )));
        }
        if self.lock().gpu.is_some() {
            // The fused path owns the slots; a per-expert request is served without caching.
            return self.read(layer, expert).map(|(w, _, _)| Arc::new(w));
        }
        if self.bypassed() {
            let resident = {
                let s = self.lock();
                s.pools
                    .slot(layer, expert)
                    .and_then(|(p, slot)| s.host[p][slot].clone())
            };
            return match resident {
                Some(w) => Ok(w),
                None => self.read(layer, expert).map(|(w, _, _)| Arc::new(w)),
            };
        }
        self.get_cached(layer, expert)
    }

    fn unavailable(&self, layer: usize) -> &[usize] {
        &self.unavailable[layer]
    }

    fn holds_at_once(&self, layer: usize) -> usize {
        let s = self.lock();
        s.pools
            .pool_of(layer)
            .map_or(0, |p| s.pools.pool_capacity(p))
    }

    fn resident_bytes(&self) -> u64 {
        self.lock().resident_bytes
    }

    fn kind(&self) -> &'static str {
        "selective"
    }

    fn set_bypass(&self, on: bool) {
        self.bypass.store(on, Ordering::Relaxed);
    }

    fn set_warming(&self, on: bool) {
        self.warming.store(on, Ordering::Relaxed);
    }

    fn stacked(&self, layer: usize, needed: &[usize]) -> Result<Option<Stacked>> {
        self.stacked_slots(layer, needed)
    }

    fn needs_ids_on_host(&self) -> bool {
        true
    }

    fn speculate(&self) -> bool {
        if self.bypassed() || self.warming() || self.prefetcher.get().is_some() {
            return false;
        }
        let mut s = self.lock();
        let misses = s.pools.misses();
        let resident = s.pools.resident();
        s.gpu
            .as_mut()
            .is_some_and(|g| g.speculate(misses, resident))
    }

    fn step_ran(&self, path: StepPath, secs: f64) {
        if let Some(g) = self.lock().gpu.as_mut() {
            g.step_ran(path, secs);
        }
    }

    fn serves_a_token_from_pools(&self) -> bool {
        if self.bypassed() || self.warming() {
            return false;
        }
        // `stacked_slots` falls back to a temporary stack only when a layer's pool cannot hold
        // the experts it needs at once; a token needs top-k of them at most.
        let k = self.source.config().num_experts_per_tok;
        let mut s = self.lock();
        s.gpu.as_mut().is_some_and(|g| g.registration_done())
            && self.source.config().moe_layers().all(|l| {
                s.pools
                    .pool_of(l)
                    .is_some_and(|p| s.pools.pool_capacity(p) >= k)
            })
    }

    fn residency_table(&self, layer: usize) -> Result<Option<Tensor>> {
        let mut s = self.lock();
        if s.gpu.is_none() {
            return Ok(None);
        }
        if s.residency.is_none() {
            let cfg = self.source.config();
            let moe: Vec<usize> = cfg.moe_layers().collect();
            // Every staging buffer at the largest expert's size now: a miss during a gated step
            // must not allocate page-locked memory (`Staging::reserve`).
            let largest = moe
                .iter()
                .flat_map(|&l| (0..cfg.num_experts).map(move |e| (l, e)))
                .map(|(l, e)| self.source.stored_bytes(l, e))
                .max()
                .unwrap_or(0) as usize;
            if let Some(g) = s.gpu.as_mut() {
                g.reserve_staging(&self.device, largest)?;
            }
            let r = slots::Residency::new(
                &mut s.pools,
                &moe,
                cfg.num_hidden_layers,
                cfg.num_experts,
                &self.device,
                self.table_kernel,
            )?;
            s.residency = Some(r);
        }
        Ok(s.residency.as_ref().and_then(|r| r.table(layer)))
    }

    fn sync_residency(&self) -> Result<bool> {
        let st = &mut *self.lock();
        match st.residency.as_mut() {
            Some(r) => r.sync(&mut st.pools, &self.device),
            None => Ok(false),
        }
    }

    fn resident_stacks(&self, layer: usize) -> Result<Option<Stacked>> {
        let s = self.lock();
        Ok(match (&s.gpu, s.pools.pool_of(layer)) {
            (Some(g), Some(p)) => g.resident_stacks(p, layer),
            _ => None,
        })
    }

    fn prepare_speculation(&self) -> Result<()> {
        match self.lock().gpu.as_mut() {
            Some(g) => g.prepare_speculation(&self.device),
            None => Ok(()),
        }
    }

    fn graph_variant(&self) -> u64 {
        self.lock().gpu.as_ref().map_or(0, |g| g.graph_variant())
    }

    fn settle_speculation(&self, routed: &[(usize, Vec<u32>)]) -> bool {
        let mut s = self.lock();
        self.settle(&mut s, routed)
    }

    fn wants_hints(&self) -> bool {
        self.prefetcher.get().is_some() && !self.bypassed()
    }

    fn prefetch_hint(&self, layer: usize, experts: &[usize]) {
        self.hint(layer, experts);
    }

    fn will_use(&self, layer: usize, experts: &[usize]) {
        self.score_guess(layer, experts);
    }
}

/// Where the last of an expert's spans (scales included) ends in its buffer.
fn spans_end(spans: &[crate::experts::source::PartSpan; 3]) -> usize {
    spans
        .iter()
        .flat_map(|p| std::iter::once(p.range.end).chain(p.scale.as_ref().map(|s| s.range.end)))
        .max()
        .unwrap_or(0)
}

/// `n` zeros of `T` straight from the allocator's zeroed memory. Why not `vec![T::zero(); n]`:
/// for a generic `T` that is a loop writing every element — on a CPU miss it cost about as much
/// as the read itself (`perf`, a 12.5 % selective run: 13 % of the time) — where zeroed
/// allocation is a `calloc` (fresh pages come zeroed; reused memory is cleared at memset speed).
fn zeroed_vec<T: candle_core::WithDType>(n: usize) -> Vec<T> {
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Vec::new();
    }
    let layout =
        std::alloc::Layout::array::<T>(n).expect("an expert's size fits the address space");
    // SAFETY: the layout has a non-zero size; the memory is zeroed, and all-zero bits are a
    // valid value (zero) of every candle dtype (plain integers and IEEE-style floats); the Vec
    // takes the allocation with the layout it was made with (length = capacity = n).
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(p, n, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::PolicyKind;
    use crate::cache::settings::Scope;
    use crate::model::ports::MatRef;

    #[test]
    fn zeroed_vec_is_zeros_of_the_asked_length() {
        let b = super::zeroed_vec::<half::bf16>(3 << 20);
        assert_eq!(b.len(), 3 << 20);
        assert!(b.iter().all(|v| v.to_bits() == 0));
        let f = super::zeroed_vec::<f32>(5);
        assert_eq!(f, vec![0.0f32; 5]);
        assert!(super::zeroed_vec::<f32>(0).is_empty());
    }

    /// A block-quantized expert read straight into its block storage is the expert the general
    /// path makes: the same bytes held, the same products bit for bit — every expert of the
    /// GGUF fixtures (Q8_0; Q4_K_M's Q4_K gate/up with Q6_K or Q4_K down; MXFP4, IQ4_XS and
    /// IQ4_NL gate, up and down).
    #[test]
    fn quantized_experts_read_into_their_blocks_are_the_general_paths() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for kind in [
            "Q8_0",
            "Q4_K_M",
            "MXFP4_MOE",
            "MXFP4_ATTN",
            "IQ4_XS",
            "IQ4_NL",
        ] {
            let path = root.join(format!("tests/fixtures/gguf/kquant-{kind}.gguf"));
            let cfg = &crate::model::MoeConfig::from_dir(&path).unwrap();
            let ckpt = crate::model::Checkpoint::open(&path).unwrap();
            let source = super::super::source::ShardSource::new(&ckpt, cfg).unwrap();
            // What sends a CPU miss down this path rather than the float reads.
            assert!(convert::kept_as_stored(&source), "{kind}");
            let x = crate::util::test_matrix(2, cfg.hidden_size, 5, 97, 1.0 / 16.0);
            let mut down_types = std::collections::BTreeSet::new();
            for layer in cfg.moe_layers() {
                for e in 0..cfg.num_experts {
                    let locs = source.part_locations(layer, e).unwrap();
                    down_types.insert(locs[2].dtype.name());
                    let parts = [0, 1, 2].map(|k| (locs[k].dtype, locs[k].shape.as_slice()));
                    let direct = convert::quantized_direct(parts, |a, b| {
                        source.read_split_into_uninit(layer, e, a, b)
                    })
                    .unwrap()
                    .expect("block parts: the direct path applies");
                    let raw = source.read(layer, e).unwrap();
                    let general = convert::from_raw(&raw, None, DType::F32, &Device::Cpu).unwrap();
                    assert_eq!(direct.bytes(), general.bytes(), "{kind} {layer}/{e}");
                    let (a, b) = (direct.forward(&x).unwrap(), general.forward(&x).unwrap());
                    let bits = crate::util::f32_bits;
                    assert_eq!(bits(&a), bits(&b), "{kind} layer {layer} expert {e}");
                }
            }
            assert!(!down_types.is_empty(), "{kind}: {down_types:?}");
        }
        // Buffers that the parts do not fill exactly: the source says it cannot.
        let path = root.join("tests/fixtures/gguf/kquant-Q8_0.gguf");
        let cfg = crate::model::MoeConfig::from_dir(&path).unwrap();
        let ckpt = crate::model::Checkpoint::open(&path).unwrap();
        let source = super::super::source::ShardSource::new(&ckpt, &cfg).unwrap();
        let layer = cfg.moe_layers().next().unwrap();
        let (mut a, mut b) = (vec![std::mem::MaybeUninit::new(0u8); 8], vec![]);
        assert!(
            !source
                .read_split_into_uninit(layer, 0, &mut a, &mut b)
                .unwrap()
        );
    }

    /// f32 compute on the CPU holds bf16-stored experts as stored: a miss below full capacity
    /// maps them, a full cache reads them whole in bf16 — half the bytes of the widened
    /// matrices, which the budget counts — and either way a token's output (the batched row
    /// kernels and the one-expert product) is, bit for bit, that of the expert widened to f32,
    /// for every expert of the fixture. f16 compute widens nothing and maps nothing.
    #[test]
    fn f32_compute_holds_bf16_experts_as_stored_with_the_widened_bits() {
        let (source, cfg, _) = fixture_source();
        let mapped = cpu_cache(&source, 4, DType::F32);
        let full = cpu_cache(&source, cfg.total_experts(), DType::F32);
        let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
        assert_eq!(mapped.expert_bytes(), (3 * h * i * 2) as u64);
        assert_eq!(full.expert_bytes(), mapped.expert_bytes());
        assert_eq!(
            cpu_cache(&source, 4, DType::F16).expert_bytes(),
            mapped.expert_bytes()
        );
        let x = crate::util::test_matrix(1, h, 5, 97, 1.0 / 16.0);
        let bits = crate::util::f32_bits;
        for layer in cfg.moe_layers() {
            for e in 0..cfg.num_experts {
                let raw = source.read(layer, e).unwrap();
                let bf16 = convert::from_raw(&raw, None, DType::BF16, &Device::Cpu).unwrap();
                let (g, d) = bf16.dense().unwrap();
                let widened = ExpertWeights::new(
                    g.to_dtype(DType::F32).unwrap(),
                    d.to_dtype(DType::F32).unwrap(),
                    i,
                );
                let want = bits(&widened.forward(&x).unwrap());
                let (m, _, _) = mapped.read(layer, e).unwrap();
                assert!(m.dense().is_none(), "mapped {layer}/{e}");
                let (w, bytes, _) = full.read(layer, e).unwrap();
                assert_eq!(w.dense().unwrap().0.dtype(), DType::BF16);
                assert_eq!(bytes, source.stored_bytes(layer, e));
                for held in [&m, &w] {
                    assert_eq!(held.bytes(), mapped.expert_bytes());
                    assert_eq!(bits(&held.forward(&x).unwrap()), want, "{layer}/{e}");
                    let rows = [held.rows().unwrap()];
                    let y = crate::model::cpu_gemv::experts_one_token(&x, &rows, &[1.0])
                        .expect("the batched kernels take 16-bit matrices in f32")
                        .unwrap();
                    assert_eq!(bits(&y), want, "batched {layer}/{e}");
                }
            }
        }
        let f16 = cpu_cache(&source, 4, DType::F16);
        let layer = cfg.moe_layers().next().unwrap();
        assert!(f16.read_mapped(layer, 0).unwrap().is_none());
    }

    /// A bf16-stored expert for bf16 compute on the CPU is mapped in place, and its rows, its
    /// bytes and its output are the general path's, bit for bit, for every expert of the
    /// fixture (whose shards store gate's rows right before up's); cold mode and a full cache
    /// do not map.
    #[test]
    fn bf16_experts_mapped_in_place_are_the_general_paths() {
        let (source, cfg, _) = fixture_source();
        let bf16_cache = cpu_cache(&source, 4, DType::BF16);
        let x = crate::util::test_matrix(2, cfg.hidden_size, 5, 97, 1.0 / 16.0)
            .to_dtype(DType::BF16)
            .unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
        for layer in cfg.moe_layers() {
            for e in 0..cfg.num_experts {
                let w = bf16_cache
                    .read_mapped(layer, e)
                    .unwrap()
                    .expect("gate and up back to back in bf16");
                assert!(w.dense().is_none() && !w.is_quantized());
                assert_eq!(w.bytes(), source.stored_bytes(layer, e));
                let raw = source.read(layer, e).unwrap();
                let general = convert::from_raw(&raw, None, DType::BF16, &Device::Cpu).unwrap();
                let (g, d) = general.dense().unwrap();
                let Some((MatRef::Bf16(mg, dg), MatRef::Bf16(md, dd))) = w.rows() else {
                    panic!("mapped rows");
                };
                assert_eq!(
                    (dg, dd),
                    (
                        [g.dim(0).unwrap(), g.dim(1).unwrap()],
                        [d.dim(0).unwrap(), d.dim(1).unwrap()]
                    )
                );
                assert_eq!(mg, values(g).as_slice(), "gate_up {layer}/{e}");
                assert_eq!(md, values(d).as_slice(), "down {layer}/{e}");
                let bits = crate::util::f32_bits;
                assert_eq!(
                    bits(&w.forward(&x).unwrap()),
                    bits(&general.forward(&x).unwrap())
                );
            }
        }
        source.set_cold(true);
        let layer = cfg.moe_layers().next().unwrap();
        assert!(
            bf16_cache.read_mapped(layer, 0).unwrap().is_none(),
            "cold mode"
        );
        source.set_cold(false);
        // A cache that holds every expert reads each once, into its own memory.
        let full = cpu_cache(&source, cfg.total_experts(), DType::BF16);
        assert!(
            full.read_mapped(layer, 0).unwrap().is_none(),
            "full capacity"
        );
    }

    /// A global LRU cache of `experts` over `source` on the CPU, computing in `dtype`.
    fn cpu_cache(source: &Arc<dyn ExpertSource>, experts: usize, dtype: DType) -> CachedProvider {
        let config = CacheConfig {
            capacity: Capacity::Experts(experts),
            scope: Scope::Global,
            policy: PolicyKind::Lru,
        };
        let settings = crate::settings::Settings::default();
        CachedProvider::new(
            source.clone(),
            config,
            dtype,
            &Device::Cpu,
            false,
            &settings,
        )
        .unwrap()
    }

    /// The fixture's shards, its config and its first MoE layer.
    fn fixture_source() -> (Arc<dyn ExpertSource>, crate::model::MoeConfig, usize) {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3-moe-tiny");
        let ckpt = crate::model::Checkpoint::open(&dir).unwrap();
        let cfg = crate::model::MoeConfig::from_dir(&dir).unwrap();
        let layer = cfg.moe_layers().next().unwrap();
        let source = Arc::new(super::super::source::ShardSource::new(&ckpt, &cfg).unwrap());
        (source, cfg, layer)
    }

    /// A CPU cache of `capacity` experts over `source`.
    fn cache_over(
        source: Arc<dyn ExpertSource>,
        capacity: usize,
        policy: PolicyKind,
    ) -> CachedProvider {
        let config = CacheConfig {
            capacity: Capacity::Experts(capacity),
            scope: Scope::Global,
            policy,
        };
        CachedProvider::new(
            source,
            config,
            DType::F32,
            &Device::Cpu,
            false,
            &Settings::default(),
        )
        .unwrap()
    }

    fn fixture_cache(capacity: usize, policy: PolicyKind) -> (CachedProvider, usize) {
        let (source, _, layer) = fixture_source();
        (cache_over(source, capacity, policy), layer)
    }

    /// A source that counts what it is asked to read.
    struct Counting(Arc<dyn ExpertSource>, std::sync::atomic::AtomicUsize);

    impl ExpertSource for Counting {
        fn config(&self) -> &crate::model::MoeConfig {
            self.0.config()
        }
        fn has(&self, layer: usize, expert: usize) -> bool {
            self.0.has(layer, expert)
        }
        fn read(&self, layer: usize, expert: usize) -> Result<super::super::source::RawExpert> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.read(layer, expert)
        }
        fn stored_bytes(&self, layer: usize, expert: usize) -> u64 {
            self.0.stored_bytes(layer, expert)
        }
        fn describe(&self) -> String {
            self.0.describe()
        }
        fn set_cold(&self, cold: bool) {
            self.0.set_cold(cold)
        }
    }

    #[test]
    fn warming_serves_zeros_of_the_right_shape_without_reading_or_caching() {
        let (inner, cfg, layer) = fixture_source();
        let source = Arc::new(Counting(inner, Default::default()));
        let c = cache_over(source.clone(), 4, PolicyKind::Lru);
        c.set_warming(true);
        let zero = c.get(layer, 1).unwrap();
        let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let (zgu, zdn) = zero.dense().unwrap();
        assert_eq!(zgu.dims(), &[2 * i, h]);
        assert_eq!(zdn.dims(), &[h, i]);
        let sum = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(sum(zgu) + sum(zdn), 0.0);
        assert_eq!(
            source.1.load(Ordering::Relaxed),
            0,
            "warming read an expert"
        );
        assert_eq!(c.lock().pools.resident(), 0, "warming cached an expert");
        assert!(!c.speculate());
        // Warm-up over, the same request reads the real weights and caches them.
        c.set_warming(false);
        let real = c.get(layer, 1).unwrap();
        assert_eq!(source.1.load(Ordering::Relaxed), 1);
        assert!(sum(real.dense().unwrap().0) > 0.0);
        assert_eq!(c.lock().pools.resident(), 1);
    }

    #[test]
    fn a_late_prefetch_is_dropped_and_a_used_guess_is_its_first_use_not_a_second() {
        let (c, layer) = fixture_cache(4, PolicyKind::S3fifo);
        c.lock().prefetch = Some(prefetch::Guesses::default());
        // The layer's latest guess is number 7; a job for guess 6 is late: nothing loads.
        c.lock()
            .prefetch
            .as_mut()
            .unwrap()
            .latest
            .insert(layer, (7, vec![0]));
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
        assert!(
            !c.lock().pools.contains(layer, 0),
            "a guess used once was promoted"
        );
        // ...whereas an expert requested twice is promoted and survives the same inserts.
        let (c, layer) = fixture_cache(4, PolicyKind::S3fifo);
        c.get(layer, 0).unwrap();
        c.get(layer, 0).unwrap();
        for e in 1..=4 {
            c.get(layer, e).unwrap();
        }
        assert!(c.lock().pools.contains(layer, 0));
    }

    #[test]
    fn evicted_weights_leave_memory_and_resident_bytes_follow_the_slots() {
        let (c, layer) = fixture_cache(2, PolicyKind::Lru);
        let one = c.expert_bytes();
        for e in 0..5 {
            c.get(layer, e).unwrap();
            let s = c.snapshot();
            assert_eq!(s.resident_bytes, one * s.resident_experts as u64);
        }
        let s = c.snapshot();
        assert_eq!((s.resident_experts, s.misses, s.evictions), (2, 5, 3));
        // The two most recent are the resident ones, each in one of the two slots.
        let st = c.lock();
        assert!(st.pools.contains(layer, 3) && st.pools.contains(layer, 4));
        assert_eq!(st.host[0].iter().flatten().count(), 2);
    }
}
