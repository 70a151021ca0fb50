//! GPU slot pools: each cache pool is a preallocated pair of device tensors ([slots, 2I, H] and
//! [slots, H, I]) that the fused MoE kernels read through an expert→slot map. A miss is copied
//! into the slot the cache core gives it — straight from the registered expert files (direct)
//! or through page-locked staging buffers (staged), see `experts::direct` — and a decode step
//! may run as one CUDA graph over the resident experts when the speculation gate says a miss is
//! unlikely (`cache::speculation`).

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};

use super::super::direct::{self, DirectFiles, H2dPath};
use super::super::source::ExpertSource;
use super::super::upload::{PartDst, Staging};
use super::fill::DeviceFills;
use super::{CachedProvider, Loads};
use crate::cache::pool::{Admit, Pools, key};
use crate::cache::speculation::Gate;
use crate::cache::stats::CacheSnapshot;
use crate::model::checkpoint::TensorLocation;
use crate::model::error::{ModelError, Result};
use crate::model::ports::{Fp8Scales, GgmlLayout, Stacked};
use crate::model::safetensors_file::StDtype;
use crate::settings::Settings;
use crate::step_path::StepPath;

/// One pool's weights on the device: in the compute dtype, or FP8 bytes with their scales.
struct SlotTensors {
    gate_up: Tensor,
    down: Tensor,
    fp8: Option<Fp8Scales>,
}

pub(super) struct GpuSlots {
    /// Per cache pool.
    stores: Vec<SlotTensors>,
    /// Host buffer that slot misses are read into and uploaded from (pinned on CUDA).
    staging: Staging,
    /// Registered expert files that slot misses are copied from directly, when that path was
    /// chosen, and why the path is what it is.
    direct: Option<DirectFiles>,
    h2d_path: String,
    /// Per model layer: expert → slot on the device (for speculative graph steps), its host
    /// copy, and whether the device copy is behind.
    maps: Vec<Option<Tensor>>,
    map_host: Vec<Vec<u32>>,
    map_dirty: Vec<bool>,
    /// Misses counted when `speculate` last looked: whether the last step added any.
    misses_seen: u64,
    /// Slots the GPU fills itself, when every expert has one; whether this step runs the
    /// plain graph instead, and when to (a gate of its own).
    fills: Option<DeviceFills>,
    plain_step: bool,
    plain_gate: Gate,
    /// Whether a step is worth trying as a graph over the resident experts (the `speculate`
    /// setting `never` turns guessing off — the sweep does, to measure what a step that reads
    /// routing back costs).
    gate: Gate,
    /// FP8 experts' scale block: the slots hold e4m3 bytes and f32 scales.
    fp8: Option<[usize; 2]>,
    /// GGUF experts, per model layer: the slots hold each expert's blocks as stored, in this
    /// layer's layout (a pool shared by layers of other types has rows for the largest).
    ggml: Option<Vec<Option<GgmlLayout>>>,
}

impl GpuSlots {
    /// Slot pools for `pools` on `device`, the miss path chosen, and — with a slot for every
    /// expert on the direct path — GPU self-fill, in which case `pools` switches to home slots.
    /// `fp8`: the experts are block-scaled FP8 in these blocks, held so in the slots. `ggml`:
    /// they are GGUF blocks in these per-layer layouts, held as stored.
    pub fn new(
        source: &dyn ExpertSource,
        pools: &mut Pools,
        dtype: DType,
        device: &Device,
        settings: &Settings,
        fp8: Option<[usize; 2]>,
        ggml: Option<Vec<Option<GgmlLayout>>>,
    ) -> Result<Self> {
        let cfg = source.config();
        let (h, inter) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let wtype = if fp8.is_some() { DType::U8 } else { dtype };
        let stores = (0..pools.num_pools())
            .map(|p| {
                let n = pools.pool_capacity(p);
                if let Some(layouts) = &ggml {
                    // One row an expert, as long as the pool's largest layer needs.
                    let of_pool = cfg
                        .moe_layers()
                        .filter(|&l| pools.pool_of(l) == Some(p))
                        .filter_map(|l| layouts[l]);
                    let (gu, dn) = of_pool.fold((0, 0), |(a, b), l| {
                        (a.max(l.gate_up_bytes()), b.max(l.down_bytes()))
                    });
                    return Ok(SlotTensors {
                        gate_up: Tensor::zeros((n, gu), DType::U8, device)?,
                        down: Tensor::zeros((n, dn), DType::U8, device)?,
                        fp8: None,
                    });
                }
                Ok(SlotTensors {
                    gate_up: Tensor::zeros((n, 2 * inter, h), wtype, device)?,
                    down: Tensor::zeros((n, h, inter), wtype, device)?,
                    fp8: fp8
                        .map(|block @ [br, bc]| -> Result<Fp8Scales> {
                            Ok(Fp8Scales {
                                gate_up: Tensor::zeros(
                                    (n, 2 * inter.div_ceil(br), h.div_ceil(bc)),
                                    DType::F32,
                                    device,
                                )?,
                                down: Tensor::zeros(
                                    (n, h.div_ceil(br), inter.div_ceil(bc)),
                                    DType::F32,
                                    device,
                                )?,
                                block,
                            })
                        })
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let files = device
            .is_cuda()
            .then(|| direct::expert_files(source))
            .flatten();
        let choice = direct::choose_given(device, source, files.as_deref(), settings)?;
        let why = &choice.why;
        let (direct, h2d_path) = if choice.path == H2dPath::Direct {
            match DirectFiles::open(device, &choice.register, settings.copy_stream) {
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
        let mut homes = match &direct {
            // The fill kernels copy parts as stored: the compute dtype, GGUF blocks, or FP8
            // bytes with their scales (into the scale pools). They read every expert from its
            // registered file, so not where some files stage.
            Some(_) if settings.gpu_fill && !choice.partial => pools.home_slots(cfg.num_experts),
            _ => None,
        };
        // Self-fill hands the kernels every expert's address up front, so here (a slot for every
        // expert: the cache holds what native does) the load waits for the registration.
        let (mut direct, mut h2d_path) = (direct, h2d_path);
        if let (Some(d), Some(_)) = (direct.as_mut(), &homes)
            && let Err(e) = d.wait_registered()
        {
            eprintln!("moescope: direct expert copies unavailable ({e}); staging");
            h2d_path = format!("staged: registering the expert files failed: {e}");
            (direct, homes) = (None, None);
        }
        let fills = match (&direct, &homes) {
            (Some(d), Some(home)) => {
                DeviceFills::new(source, d, home, dtype, ggml.as_deref(), fp8, device)?
            }
            _ => None,
        };
        let h2d_path = match &fills {
            Some(_) => {
                format!("{h2d_path}; the GPU fills missing slots itself (a slot for every expert)")
            }
            None => h2d_path,
        };
        // Expert → slot. With fills every expert's entry is its home from the start (a plain
        // graph step that meets an expert not filled yet reads a valid slot and is redone).
        let map_host: Vec<Vec<u32>> = (0..cfg.num_hidden_layers)
            .map(|l| match (&fills, &homes) {
                (Some(_), Some(home)) if !home[l].is_empty() => home[l].clone(),
                _ => vec![0; cfg.num_experts],
            })
            .collect();
        if let (Some(_), Some(home)) = (&fills, homes) {
            pools.use_homes(home);
        }
        let mut maps = vec![None; cfg.num_hidden_layers];
        for l in cfg.moe_layers() {
            maps[l] = Some(Tensor::from_vec(
                map_host[l].clone(),
                cfg.num_experts,
                device,
            )?);
        }
        Ok(GpuSlots {
            stores,
            staging: Staging::new(settings.staged_piece),
            direct,
            h2d_path,
            maps,
            map_host,
            map_dirty: vec![false; cfg.num_hidden_layers],
            misses_seen: 0,
            fills,
            plain_step: false,
            // A wrong guess costs a whole step, a right one saves only the fill kernels'
            // launches (~5 % of a step): guess only at a clean rate of 95 %.
            plain_gate: Gate::new(settings.speculate).with_costs(0.95, 1.0),
            gate: Gate::new(settings.speculate),
            fp8,
            ggml,
        })
    }

    /// Bytes the slot pools hold on the device (allocated up front).
    pub fn bytes(&self) -> u64 {
        let t = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.stores
            .iter()
            .map(|s| {
                t(&s.gate_up)
                    + t(&s.down)
                    + s.fp8.as_ref().map_or(0, |f| t(&f.gate_up) + t(&f.down))
            })
            .sum()
    }

    /// `layer`'s GGUF block layout, when the slots hold GGUF experts.
    pub fn ggml_layout(&self, layer: usize) -> Option<GgmlLayout> {
        self.ggml
            .as_ref()
            .and_then(|l| l.get(layer).copied().flatten())
    }

    /// The GPU-side figures of a snapshot (the rest default), after counting the direct copies
    /// settled since the last one — without waiting: a batch still in flight counts later.
    pub fn snapshot(&mut self, loads: &mut Loads) -> CacheSnapshot {
        if let Some(Ok(done)) = self.direct.as_mut().map(|d| d.settle(false)) {
            count_direct(loads, done);
        }
        let (staged_bytes, staged_us, tail_us) = self.staging.copy_stats();
        let (direct_bytes, direct_us) = self.direct.as_ref().map_or((0, 0), |d| d.copy_stats());
        CacheSnapshot {
            h2d_bytes: staged_bytes + direct_bytes,
            h2d_time_us: staged_us + direct_us,
            h2d_direct_bytes: direct_bytes,
            h2d_direct_time_us: direct_us,
            h2d_tail_time_us: tail_us,
            h2d_path: Some(match self.direct.as_mut() {
                Some(d) => {
                    d.poll();
                    format!("{}{}", self.h2d_path, d.progress().describe())
                }
                None => self.h2d_path.clone(),
            }),
            host_pinned_bytes: self.direct.as_ref().map_or(0, |d| d.registered_bytes()),
            h2d_fill_bytes: self.fills.as_ref().map_or(0, |f| f.bytes),
            gpu_fills: self.fills.is_some(),
            ..Default::default()
        }
    }

    /// Page-locked staging buffers of `len` bytes each, allocated now (see `Staging::reserve`).
    pub fn reserve_staging(&mut self, device: &Device, len: usize) -> Result<()> {
        Ok(self.staging.reserve(device, len)?)
    }

    /// Whether misses can be served now without the driver pinning memory: no expert file is
    /// still being registered for direct copies (registration page-locks memory, which a gated
    /// step must not meet while its stream waits).
    pub fn registration_done(&mut self) -> bool {
        let Some(d) = self.direct.as_mut() else {
            return true;
        };
        d.poll();
        let p = d.progress();
        p.done >= p.total || p.failed.is_some()
    }

    /// Whether the next decode step should run as a graph; `misses` is the cache's count so
    /// far (a step added none if it is unchanged), `resident` its resident experts.
    pub fn speculate(&mut self, misses: u64, resident: usize) -> bool {
        if self.maps.iter().all(Option::is_none) {
            return false;
        }
        let clean = misses == self.misses_seen;
        self.misses_seen = misses;
        let guess = self.gate.next_step(clean);
        if let Some(f) = &self.fills {
            // A graph step either way: with the fill kernels (it loads its own misses, nothing
            // can fail), or plain when a miss is unlikely.
            let all_resident = resident >= f.total;
            self.plain_step = self.plain_gate.next_step(clean) || all_resident;
            return true;
        }
        guess
    }

    pub fn step_ran(&mut self, path: StepPath, secs: f64) {
        self.gate.step_ran(path, secs);
    }

    /// Pool `pool`'s slots with `layer`'s device expert→slot table, for a speculative step.
    pub fn resident_stacks(&self, pool: usize, layer: usize) -> Option<Stacked> {
        let (store, map) = (&self.stores[pool], self.maps[layer].as_ref()?);
        // A plain step leaves the fill kernels out (a graph of its own, see `graph_variant`).
        let fill = self
            .fills
            .as_ref()
            .filter(|_| !self.plain_step)
            .and_then(|f| f.tables[layer].clone());
        Some(Stacked {
            gate_up: store.gate_up.clone(),
            down: store.down.clone(),
            index: None,
            device_index: Some(map.clone()),
            fill,
            fp8: store.fp8.clone(),
            ggml: self.ggml_layout(layer),
        })
    }

    /// Brings the device expert→slot tables (and fill flags) up to date before a graph step.
    pub fn prepare_speculation(&mut self, device: &Device) -> Result<()> {
        for l in 0..self.maps.len() {
            if !self.map_dirty[l] {
                continue;
            }
            if let Some(map) = &self.maps[l] {
                let n = self.map_host[l].len();
                map.slice_set(
                    &Tensor::from_vec(self.map_host[l].clone(), n, device)?,
                    0,
                    0,
                )?;
            }
            self.map_dirty[l] = false;
        }
        match self.fills.as_mut() {
            Some(f) => f.upload_flags(device),
            None => Ok(()),
        }
    }

    pub fn graph_variant(&self) -> u64 {
        u64::from(self.fills_this_step())
    }

    /// Whether this step's graph fills its own misses.
    pub fn fills_this_step(&self) -> bool {
        self.fills.is_some() && !self.plain_step
    }

    /// The GPU filled (layer, expert)'s home slot itself.
    pub fn filled(&mut self, layer: usize, expert: usize, bytes: u64) {
        if let Some(f) = self.fills.as_mut() {
            // The device already says so (the kernel marked it): not dirty.
            f.flags_host[layer][expert] = 1;
            f.bytes += bytes;
        }
    }

    /// A host load put (layer, expert) into `slot`: the device tables must say so.
    fn loaded(&mut self, layer: usize, expert: usize, slot: usize) {
        self.map_host[layer][expert] = slot as u32;
        self.map_dirty[layer] = true;
        if let Some(f) = self.fills.as_mut() {
            f.flags_host[layer][expert] = 1;
            f.flags_dirty[layer] = true;
        }
    }
}

/// Charges a settled batch of direct copies to the miss statistics: each miss costs its share
/// of the batch's device copy time plus its own host time (queueing the copies).
fn count_direct(loads: &mut Loads, done: Option<direct::Settled>) {
    let Some(b) = done else { return };
    let total = b.copy_us + b.host_us;
    loads.time_us += total;
    for _ in 0..b.misses {
        loads.latency.record_us(total / b.misses.max(1) as u64);
    }
}

impl CachedProvider {
    /// The fused path: every expert in `needed` resident in the layer's slot pool (loading the
    /// misses into the slots the cache core gives), or — when the pool cannot hold them all at
    /// once, as in the prefill of a long prompt with a small cache — a temporary stack of
    /// exactly those experts. Either way one kernel call over the same weights as native.
    pub(super) fn stacked_slots(&self, layer: usize, needed: &[usize]) -> Result<Option<Stacked>> {
        let bypass = self.bypassed();
        let mut s = self.lock();
        let Some(pi) = s.pools.pool_of(layer) else {
            return Ok(None);
        };
        if s.gpu.is_none() {
            return Ok(None);
        }
        let num = self.source.config().num_experts;
        let ggml = s.gpu.as_ref().and_then(|g| g.ggml_layout(layer));
        if self.warming() {
            let fp8 = s.gpu.as_ref().and_then(|g| g.fp8);
            let (gate_up, down, fp8) = self.zero_stacks(needed.len(), fp8, ggml)?;
            let mut index = vec![u32::MAX; num];
            for (pos, &e) in needed.iter().enumerate() {
                index[e] = pos as u32;
            }
            return Ok(Some(Stacked {
                gate_up,
                down,
                index: Some(index),
                device_index: None,
                fill: None,
                fp8,
                ggml,
            }));
        }
        let mut missing = Vec::new();
        for &e in needed {
            let resident = if bypass {
                s.pools.contains(layer, e)
            } else {
                s.pools.request(layer, e).is_some()
            };
            if !resident {
                missing.push(e);
            }
        }
        if needed.len() <= s.pools.pool_capacity(pi) && !bypass {
            let pinned: HashSet<u32> = needed.iter().map(|&e| key(layer, e)).collect();
            for &e in &missing {
                let slot = s
                    .pools
                    .admit(layer, e, Admit::Demand, &pinned)
                    .ok_or_else(|| ModelError::Expert {
                        layer,
                        expert: e,
                        msg: "no free slot although the pool holds enough".into(),
                    })?
                    .slot;
                if let Err(err) = self.upload_miss(&mut s, pi, layer, e, slot) {
                    // The slot holds no valid copy of it: it is not resident.
                    s.pools.forget(layer, e);
                    return Err(err);
                }
            }
            let st = &mut *s;
            let gpu = st.gpu.as_mut().expect("slot mode");
            if let Some(done) = gpu.direct.as_mut().map(|d| d.end_batch()).transpose()? {
                count_direct(&mut st.loads, done);
            }
            let mut index = vec![u32::MAX; num];
            for &e in needed {
                index[e] = s.pools.slot(layer, e).expect("admitted above").1 as u32;
            }
            let store = &s.gpu.as_ref().expect("slot mode").stores[pi];
            return Ok(Some(Stacked {
                gate_up: store.gate_up.clone(),
                down: store.down.clone(),
                index: Some(index),
                device_index: None,
                fill: None,
                fp8: store.fp8.clone(),
                ggml,
            }));
        }
        // Overflow (or bypass): a temporary stack of exactly `needed`.
        let fp8 = s.gpu.as_ref().expect("slot mode").fp8;
        let mut parts: [Vec<Tensor>; 4] = Default::default();
        for &e in needed {
            let held = if let Some((_, slot)) = s.pools.slot(layer, e) {
                let store = &s.gpu.as_ref().expect("slot mode").stores[pi];
                if let Some(l) = ggml {
                    // This layer's bytes of the slot's row.
                    vec![
                        store.gate_up.get(slot)?.narrow(0, 0, l.gate_up_bytes())?,
                        store.down.get(slot)?.narrow(0, 0, l.down_bytes())?,
                    ]
                } else {
                    let mut held = vec![store.gate_up.get(slot)?, store.down.get(slot)?];
                    if let Some(sc) = &store.fp8 {
                        held.extend([sc.gate_up.get(slot)?, sc.down.get(slot)?]);
                    }
                    held
                }
            } else {
                let (w, bytes, us) = self.read(layer, e)?;
                if !bypass {
                    s.loads.record(bytes, us);
                    s.loads.overflow += 1;
                    s.loads.overflow_time_us += us;
                }
                match fp8 {
                    None if ggml.is_some() => {
                        let (g, d, _) = w.block_parts().ok_or_else(|| ModelError::Expert {
                            layer,
                            expert: e,
                            msg: "not GGUF blocks on the GPU, as the slot pool's experts are"
                                .into(),
                        })?;
                        vec![g.clone(), d.clone()]
                    }
                    Some(_) => {
                        let p = w.fp8_stack_parts()?.ok_or_else(|| ModelError::Expert {
                            layer,
                            expert: e,
                            msg: "not FP8 on the GPU, as the slot pool's experts are".into(),
                        })?;
                        vec![p.gate_up, p.down, p.gate_up_scale, p.down_scale]
                    }
                    None => {
                        let (g, d) = w.dense_or_err("a GPU slot pool")?;
                        vec![g.clone(), d.clone()]
                    }
                }
            };
            for (list, t) in parts.iter_mut().zip(held) {
                list.push(t);
            }
        }
        let mut index = vec![u32::MAX; num];
        for (pos, &e) in needed.iter().enumerate() {
            index[e] = pos as u32;
        }
        let [gu, dn, gus, dns] = parts;
        Ok(Some(Stacked {
            gate_up: Tensor::stack(&gu, 0)?,
            down: Tensor::stack(&dn, 0)?,
            index: Some(index),
            device_index: None,
            fill: None,
            fp8: match fp8 {
                Some(block) => Some(Fp8Scales {
                    gate_up: Tensor::stack(&gus, 0)?,
                    down: Tensor::stack(&dns, 0)?,
                    block,
                }),
                None => None,
            },
            ggml,
        }))
    }

    /// Copies (layer, e) into `slot` of pool `pi`: stored in the compute dtype at the slot's
    /// shapes, the bytes go in as they are — by DMA from the registered files, else staged —
    /// queued behind the kernels already on the stream; otherwise converted on the way.
    fn upload_miss(
        &self,
        s: &mut super::State,
        pi: usize,
        layer: usize,
        e: usize,
        slot: usize,
    ) -> Result<()> {
        let start = std::time::Instant::now();
        let gpu = s.gpu.as_mut().expect("slot mode");
        if let Some(layout) = gpu.ggml_layout(layer) {
            let (bytes, direct) = self.upload_blocks_miss(gpu, pi, layer, e, slot, layout)?;
            self.count_upload(s, layer, e, slot, bytes, direct, start);
            return Ok(());
        }
        if gpu.fp8.is_some() {
            let (bytes, direct) = self.upload_fp8_miss(gpu, pi, layer, e, slot)?;
            self.count_upload(s, layer, e, slot, bytes, direct, start);
            return Ok(());
        }
        let store = &gpu.stores[pi];
        let gu_n = store.gate_up.dim(1)? * store.gate_up.dim(2)?;
        let dn_n = store.down.dim(1)? * store.down.dim(2)?;
        let esize = self.dtype.size_in_bytes();
        let fits_slot = |parts: [(usize, StDtype); 3]| {
            parts[0].0 == gu_n / 2 * esize
                && parts[1].0 == gu_n / 2 * esize
                && parts[2].0 == dn_n * esize
                && parts.iter().all(|p| p.1.float_dtype() == Some(self.dtype))
        };
        let direct_locs = gpu
            .direct
            .as_ref()
            .and_then(|_| self.source.part_locations(layer, e))
            .filter(|l| fits_slot([0, 1, 2].map(|i| (l[i].len as usize, l[i].dtype))));
        let mut direct = false;
        if let (Some(d), Some([g, u, dl])) = (gpu.direct.as_mut(), &direct_locs) {
            // All three or none: a file still being registered stages the whole expert.
            direct = d.covers(&[g, u, dl])
                && d.upload(&store.gate_up, slot * gu_n, g)?
                && d.upload(&store.gate_up, slot * gu_n + gu_n / 2, u)?
                && d.upload(&store.down, slot * dn_n, dl)?;
        }
        let bytes = if direct {
            direct_locs.iter().flatten().map(|p| p.len).sum::<u64>()
        } else {
            let to = |t, at| PartDst {
                weights: (t, at),
                scale: None,
            };
            let (spans, copied) =
                gpu.staging
                    .stage_expert(&self.device, &*self.source, layer, e, |spans| {
                        let fits =
                            fits_slot([0, 1, 2].map(|i| (spans[i].range.len(), spans[i].dtype)));
                        Ok(fits.then(|| {
                            [
                                to(&store.gate_up, slot * gu_n),
                                to(&store.gate_up, slot * gu_n + gu_n / 2),
                                to(&store.down, slot * dn_n),
                            ]
                        }))
                    })?;
            if !copied {
                let (w, _) = self.read_general(layer, e)?;
                let (g, d) = w.dense_or_err("a GPU slot pool")?;
                store.gate_up.slice_set(&g.unsqueeze(0)?, 0, slot)?;
                store.down.slice_set(&d.unsqueeze(0)?, 0, slot)?;
            }
            spans.iter().map(|p| p.range.len() as u64).sum::<u64>()
        };
        self.count_upload(s, layer, e, slot, bytes, direct, start);
        Ok(())
    }

    /// Records a miss copied into its slot: the device tables, and its cost.
    #[allow(clippy::too_many_arguments)]
    fn count_upload(
        &self,
        s: &mut super::State,
        layer: usize,
        e: usize,
        slot: usize,
        bytes: u64,
        direct: bool,
        start: std::time::Instant,
    ) {
        let us = start.elapsed().as_micros() as u64;
        let gpu = s.gpu.as_mut().expect("slot mode");
        gpu.loaded(layer, e, slot);
        match gpu.direct.as_mut().filter(|_| direct) {
            // Its cost is the copy, known once the device has done it.
            Some(d) => {
                d.note_miss(us);
                s.loads.bytes_read += bytes;
            }
            None => s.loads.record(bytes, us),
        }
    }

    /// An FP8 miss into `slot`: the e4m3 bytes and the f32 scales go in as stored — by DMA from
    /// the registered files, else through the staging buffer — when the file holds them so
    /// (Qwen's layout); otherwise (scales in another float type) the expert is converted and
    /// copied in on the device. Returns the bytes read and whether they were copied directly.
    fn upload_fp8_miss(
        &self,
        gpu: &mut GpuSlots,
        pi: usize,
        layer: usize,
        e: usize,
        slot: usize,
    ) -> Result<(u64, bool)> {
        let store = &gpu.stores[pi];
        let sc = store.fp8.as_ref().expect("FP8 slots");
        let per = |t: &Tensor| -> Result<usize> { Ok(t.dim(1)? * t.dim(2)?) };
        let (gu_n, dn_n) = (per(&store.gate_up)?, per(&store.down)?);
        let (gus_n, dns_n) = (per(&sc.gate_up)?, per(&sc.down)?);
        // Gate, up, down: (weights' tensor, element offset, bytes), (scales' tensor, offset, count).
        let dst = [
            (
                (&store.gate_up, slot * gu_n, gu_n / 2),
                (&sc.gate_up, slot * gus_n, gus_n / 2),
            ),
            (
                (&store.gate_up, slot * gu_n + gu_n / 2, gu_n / 2),
                (&sc.gate_up, slot * gus_n + gus_n / 2, gus_n / 2),
            ),
            (
                (&store.down, slot * dn_n, dn_n),
                (&sc.down, slot * dns_n, dns_n),
            ),
        ];
        // Each part's [rows, cols] and its scales' shape in the slot's blocks: a file whose
        // parts or scales are laid out otherwise (even with the same byte counts) is converted
        // below, where what does not match the scheme is refused by name.
        let (i, h) = (store.gate_up.dim(1)? / 2, store.gate_up.dim(2)?);
        let [br, bc] = sc.block;
        let shapes = [[i, h], [i, h], [h, i]]
            .map(|[r, c]| (vec![r, c], vec![r.div_ceil(br), c.div_ceil(bc)]));
        type Part<'a> = (StDtype, &'a [usize], usize);
        let as_stored = |i: usize, (dtype, shape, len): Part, scale: Option<Part>| {
            let ((_, _, w), (_, _, n)) = dst[i];
            let (want, want_scale) = &shapes[i];
            dtype == StDtype::F8E4M3
                && shape == want.as_slice()
                && len == w
                && scale.is_some_and(|(sd, ss, sl)| {
                    sd == StDtype::F32 && ss == want_scale.as_slice() && sl == 4 * n
                })
        };
        if let (Some(d), Some(locs)) = (gpu.direct.as_mut(), self.source.part_locations(layer, e))
            && locs.iter().enumerate().all(|(i, l)| {
                let scale = l
                    .scale
                    .as_ref()
                    .map(|s| (s.dtype, s.shape.as_slice(), s.len as usize));
                as_stored(i, (l.dtype, &l.shape, l.len as usize), scale)
            })
        {
            let all: Vec<&TensorLocation> = locs
                .iter()
                .flat_map(|l| [l, l.scale.as_deref().expect("checked")])
                .collect();
            if d.covers(&all) {
                let mut copied = true;
                for (l, ((wt, wo, _), _)) in locs.iter().zip(dst) {
                    copied = copied && d.upload(wt, wo, l)?;
                }
                // The three scale tables by one kernel where the device sees the files (three
                // copies that small cost ~9 µs each, BENCHMARKS.md §103), else one by one.
                let scales: Vec<(&Tensor, usize, &TensorLocation)> = locs
                    .iter()
                    .zip(dst)
                    .map(|(l, (_, (st, so, _)))| (st, so, l.scale.as_deref().expect("checked")))
                    .collect();
                if copied && !d.upload_small(&scales)? {
                    for (st, so, scale) in scales {
                        copied = copied && d.upload(st, so, scale)?;
                    }
                }
                if copied {
                    return Ok((all.iter().map(|l| l.len).sum(), true));
                }
            }
        }
        let (spans, copied) =
            gpu.staging
                .stage_expert(&self.device, &*self.source, layer, e, |spans| {
                    let fits = spans.iter().enumerate().all(|(i, p)| {
                        let scale = p
                            .scale
                            .as_ref()
                            .map(|s| (s.dtype, s.shape.as_slice(), s.range.len()));
                        as_stored(i, (p.dtype, &p.shape, p.range.len()), scale)
                    });
                    Ok(fits.then(|| {
                        dst.map(|((wt, wo, _), (st, so, _))| PartDst {
                            weights: (wt, wo),
                            scale: Some((st, so)),
                        })
                    }))
                })?;
        if copied {
            let bytes = spans
                .iter()
                .map(|p| (p.range.len() + p.scale.as_ref().map_or(0, |s| s.range.len())) as u64)
                .sum::<u64>();
            return Ok((bytes, false));
        }
        let (w, read) = self.read_general(layer, e)?;
        let p = w.fp8_stack_parts()?.ok_or_else(|| ModelError::Expert {
            layer,
            expert: e,
            msg: "not FP8 on the GPU, as the slot pool's experts are".into(),
        })?;
        store.gate_up.slice_set(&p.gate_up.unsqueeze(0)?, 0, slot)?;
        store.down.slice_set(&p.down.unsqueeze(0)?, 0, slot)?;
        sc.gate_up
            .slice_set(&p.gate_up_scale.unsqueeze(0)?, 0, slot)?;
        sc.down.slice_set(&p.down_scale.unsqueeze(0)?, 0, slot)?;
        Ok((read, false))
    }

    /// A GGUF miss into `slot`: its three parts' blocks as stored — gate's then up's bytes into
    /// the slot's gate_up row, down's into its down row — by DMA from the registered file, else
    /// through the staging buffer. A part whose type, shape or size is not the layer's layout
    /// is refused by name (a GGUF file stores a layer's experts in one tensor a matrix, so they
    /// share it). Returns the bytes read and whether they were copied directly.
    fn upload_blocks_miss(
        &self,
        gpu: &mut GpuSlots,
        pi: usize,
        layer: usize,
        e: usize,
        slot: usize,
        layout: GgmlLayout,
    ) -> Result<(u64, bool)> {
        let store = &gpu.stores[pi];
        let (gu_n, dn_n) = (store.gate_up.dim(1)?, store.down.dim(1)?);
        let (h, i) = (layout.hidden, layout.intermediate);
        // Per part: its tensor, byte offset and length in the slot, and the type and shape it
        // must have.
        let dst = [
            (
                &store.gate_up,
                slot * gu_n,
                layout.gate_bytes(),
                layout.gate,
                [i, h],
            ),
            (
                &store.gate_up,
                slot * gu_n + layout.gate_bytes(),
                layout.up_bytes(),
                layout.up,
                [i, h],
            ),
            (
                &store.down,
                slot * dn_n,
                layout.down_bytes(),
                layout.down,
                [h, i],
            ),
        ];
        let check = |k: usize, dtype: StDtype, shape: &[usize], len: usize| -> Result<()> {
            let (_, _, n, t, want) = dst[k];
            if dtype == t && shape == want && len == n {
                return Ok(());
            }
            Err(ModelError::Expert {
                layer,
                expert: e,
                msg: format!(
                    "its {} is {} {shape:?} ({len} bytes), but this layer's slots hold {layout}",
                    ["gate", "up", "down"][k],
                    dtype.name()
                ),
            })
        };
        if let (Some(d), Some(locs)) = (gpu.direct.as_mut(), self.source.part_locations(layer, e)) {
            for (k, l) in locs.iter().enumerate() {
                check(k, l.dtype, &l.shape, l.len as usize)?;
            }
            let all: Vec<&TensorLocation> = locs.iter().collect();
            if d.covers(&all) {
                let mut copied = true;
                for (l, (t, off, _, _, _)) in locs.iter().zip(dst) {
                    copied = copied && d.upload(t, off, l)?;
                }
                if copied {
                    return Ok((all.iter().map(|l| l.len).sum(), true));
                }
            }
        }
        let (spans, _) =
            gpu.staging
                .stage_expert(&self.device, &*self.source, layer, e, |spans| {
                    for (k, p) in spans.iter().enumerate() {
                        check(k, p.dtype, &p.shape, p.range.len())?;
                    }
                    Ok(Some(dst.map(|(t, off, _, _, _)| PartDst {
                        weights: (t, off),
                        scale: None,
                    })))
                })?;
        Ok((spans.iter().map(|p| p.range.len() as u64).sum(), false))
    }
}

/// A slot-table entry for an expert that is not resident (the gate kernel's `NOT_RESIDENT`).
pub(super) const NOT_RESIDENT: u32 = u32::MAX;

/// Per MoE layer, the slot each expert sits in now ([`NOT_RESIDENT`] where none), on the host
/// and on the device: kept exact from the pools' change log, where the speculative step's
/// expert→slot tables only ever gain entries. What lets a gated GPU step tell on the device
/// that a layer misses nothing and go on without the host (`model/gates.rs`).
pub(super) struct Residency {
    host: Vec<Vec<u32>>,
    device: Vec<Option<Tensor>>,
    /// Entries changed since the last sync, each once.
    changed: Vec<(usize, usize)>,
    seen: HashSet<(usize, usize)>,
    /// How the changes reach the device. On CUDA (unless the settings keep the old way, for
    /// comparisons): written by one small kernel carrying them in its arguments, at each table's
    /// device address; otherwise each changed table copied whole.
    #[cfg(feature = "cuda")]
    scatter: Option<(crate::model::gates::WordScatter, Vec<u64>)>,
}

impl Residency {
    /// The tables as `pools` stand now; `pools` logs its changes from here on. `scatter`: keep
    /// them by [`WordScatter`](crate::model::gates::WordScatter) where the device is CUDA.
    pub fn new(
        pools: &mut Pools,
        moe_layers: &[usize],
        layers: usize,
        experts: usize,
        device: &Device,
        scatter: bool,
    ) -> Result<Self> {
        pools.log_changes();
        let mut host = vec![Vec::new(); layers];
        let mut dev = vec![None; layers];
        for &l in moe_layers {
            host[l] = (0..experts)
                .map(|e| {
                    pools
                        .slot(l, e)
                        .map_or(NOT_RESIDENT, |(_, slot)| slot as u32)
                })
                .collect();
            dev[l] = Some(Tensor::from_vec(host[l].clone(), experts, device)?);
        }
        #[cfg(feature = "cuda")]
        let scatter = match device {
            Device::Cuda(cuda) if scatter => {
                let mut at = vec![0u64; layers];
                for (l, t) in dev.iter().enumerate() {
                    if let Some(t) = t {
                        at[l] = crate::model::raw::device_range(t, 0, experts * 4)?.0;
                    }
                }
                Some((crate::model::gates::WordScatter::new(cuda)?, at))
            }
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = scatter;
        Ok(Residency {
            host,
            device: dev,
            changed: Vec::new(),
            seen: HashSet::new(),
            #[cfg(feature = "cuda")]
            scatter,
        })
    }

    pub fn table(&self, layer: usize) -> Option<Tensor> {
        self.device.get(layer).cloned().flatten()
    }

    /// Applies the pools' changes since the last call and queues them to the device tables (on
    /// candle's stream); whether any were.
    pub fn sync(&mut self, pools: &mut Pools, device: &Device) -> Result<bool> {
        for (l, e, slot) in pools.take_changes() {
            if let Some(entry) = self.host.get_mut(l).and_then(|t| t.get_mut(e)) {
                *entry = slot.map_or(NOT_RESIDENT, |s| s as u32);
                if self.device[l].is_some() && self.seen.insert((l, e)) {
                    self.changed.push((l, e));
                }
            }
        }
        if self.changed.is_empty() {
            return Ok(false);
        }
        self.seen.clear();
        let changed = std::mem::take(&mut self.changed);
        #[cfg(feature = "cuda")]
        if let Some((scatter, at)) = &self.scatter {
            let words: Vec<(u64, u32)> = changed
                .iter()
                .map(|&(l, e)| (at[l] + 4 * e as u64, self.host[l][e]))
                .collect();
            scatter.scatter(&words)?;
            return Ok(true);
        }
        let mut layers: Vec<usize> = changed.iter().map(|&(l, _)| l).collect();
        layers.sort_unstable();
        layers.dedup();
        for l in layers {
            if let Some(t) = &self.device[l] {
                let n = self.host[l].len();
                t.slice_set(&Tensor::from_vec(self.host[l].clone(), n, device)?, 0, 0)?;
            }
        }
        Ok(true)
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use crate::cache::policy::PolicyKind;
    use crate::cache::pool::Admit;
    use crate::cache::settings::Scope;

    /// The kernel that keeps the residency tables leaves on the device what copying each changed
    /// table whole leaves: every entry as the pools say, over syncs of a few changes, one of more
    /// than a launch's hundred words, and entries changed twice between two syncs.
    #[test]
    fn gpu_residency_tables_by_kernel_equal_tables_copied_whole() {
        let Some(device) = crate::util::gpu_test::device("residency table") else {
            return;
        };
        let layers = [0usize, 1, 3];
        let experts = 64;
        let make = || Pools::new(&layers, experts, 120, Scope::Global, PolicyKind::Lru);
        let (mut pk, mut pc) = (make(), make());
        let mut rk = Residency::new(&mut pk, &layers, 4, experts, &device, true).unwrap();
        let mut rc = Residency::new(&mut pc, &layers, 4, experts, &device, false).unwrap();
        assert!(rk.scatter.is_some() && rc.scatter.is_none());
        let none = HashSet::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let (mut largest, mut before) = (0, vec![vec![NOT_RESIDENT; experts]; layers.len()]);
        for round in 0..40 {
            let n = if round == 7 { 400 } else { 1 + round % 5 };
            for _ in 0..n {
                rng = rng
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let l = layers[(rng >> 33) as usize % layers.len()];
                let e = (rng >> 40) as usize % experts;
                let a = pk.admit(l, e, Admit::Demand, &none).map(|a| a.slot);
                let b = pc.admit(l, e, Admit::Demand, &none).map(|a| a.slot);
                assert_eq!(a, b);
            }
            assert_eq!(
                rk.sync(&mut pk, &device).unwrap(),
                rc.sync(&mut pc, &device).unwrap()
            );
            let mut changed = 0;
            for (i, &l) in layers.iter().enumerate() {
                let want: Vec<u32> = (0..experts)
                    .map(|e| pk.slot(l, e).map_or(NOT_RESIDENT, |(_, s)| s as u32))
                    .collect();
                let got = |r: &Residency| r.table(l).unwrap().to_vec1::<u32>().unwrap();
                assert_eq!(got(&rk), want, "kernel, round {round}, layer {l}");
                assert_eq!(got(&rc), want, "copies, round {round}, layer {l}");
                changed += want.iter().zip(&before[i]).filter(|(a, b)| a != b).count();
                before[i] = want;
            }
            largest = largest.max(changed);
        }
        let most = crate::model::gates::SCATTER_MAX;
        assert!(
            largest > most,
            "{largest} entries at most changed by one sync, want > {most}"
        );
    }
}
