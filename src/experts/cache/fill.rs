//! GPU self-fill: a slot pool with a slot for every expert it serves (capacity 100 %), on the
//! direct path, for experts in the compute dtype, in GGUF blocks or in block-scaled FP8 (the
//! e4m3 bytes into the slots, their f32 scales into the scale pools, as the host's loads put
//! them). Each expert has its own *home* slot, nothing is ever evicted, and a graph step
//! fills the homes of the routed experts that are not resident itself, reading them from the
//! registered expert files over PCIe (`model::moe_decode::fill_routed`). Then every decode step
//! — misses included — runs as one CUDA graph: no routing read back per layer, no guess that can
//! fail. The fill kernels cost ~0.1 ms a step even when there is nothing to fill, so once nearly
//! every step is clean (or every expert is resident) steps run the plain graph over the resident
//! experts instead, redone if a guess fails. Off with the `gpu_fill` setting; outputs are the
//! same either way (the fill is a bitwise copy).

use candle_core::{DType, Device, Tensor};

use super::super::direct::DirectFiles;
use super::super::source::ExpertSource;
use super::{CachedProvider, State};
use crate::cache::pool::Admit;
use crate::model::checkpoint::TensorLocation;
use crate::model::error::Result;
use crate::model::ports::{DeviceFill, GgmlLayout, ScaleFill};
use crate::model::safetensors_file::StDtype;

pub(super) struct DeviceFills {
    /// Per model layer: the device tables (None for dense layers).
    pub tables: Vec<Option<DeviceFill>>,
    /// Host copy of each layer's residency flags (the device's are `tables[l].resident`), and
    /// whether the device copy is behind (host loads set flags; fills set both).
    pub flags_host: Vec<Vec<u32>>,
    pub flags_dirty: Vec<bool>,
    /// Experts with a slot in all, and bytes the GPU filled so far.
    pub total: usize,
    pub bytes: u64,
}

impl DeviceFills {
    /// The device tables; `None` (the host loads misses, as at any capacity) unless every
    /// expert with a home is stored as the slots hold it — in the compute dtype at the slot's
    /// shapes, (`ggml`, per model layer) in its layer's GGUF layout, or (`fp8`, the scale
    /// block) as e4m3 matrices with f32 scales of Qwen's shapes — in registered files the
    /// device can read.
    pub fn new(
        source: &dyn ExpertSource,
        direct: &DirectFiles,
        home: &[Vec<u32>],
        dtype: DType,
        ggml: Option<&[Option<GgmlLayout>]>,
        fp8: Option<[usize; 2]>,
        device: &Device,
    ) -> Result<Option<Self>> {
        let cfg = source.config();
        let mut tables = vec![None; cfg.num_hidden_layers];
        let mut total = 0;
        if let Some(block) = fp8 {
            for l in cfg.moe_layers() {
                match Self::fp8_table(source, direct, &home[l], block, l, device)? {
                    Some(t) => tables[l] = Some(t),
                    None => return Ok(None),
                }
                total += cfg.num_experts;
            }
            return Ok(Some(Self::with_tables(tables, total, cfg)));
        }
        for l in cfg.moe_layers() {
            // What each part must be: its bytes, and its type (the compute dtype, or the
            // layout's block type for that part).
            let layout = match ggml {
                Some(layouts) => match layouts.get(l).copied().flatten() {
                    Some(g) => Some(g),
                    None => return Ok(None),
                },
                None => None,
            };
            let (part_bytes, part_at) = match &layout {
                Some(g) => DeviceFill::ggml_parts(g),
                None => DeviceFill::dense_parts(
                    cfg.hidden_size * cfg.moe_intermediate_size * dtype.size_in_bytes(),
                ),
            };
            let is_stored_as = |i: usize, p: &TensorLocation| match &layout {
                Some(g) => p.dtype == [g.gate, g.up, g.down][i],
                None => p.dtype.float_dtype() == Some(dtype),
            };
            let mut sources = Vec::with_capacity(3 * cfg.num_experts);
            for e in 0..cfg.num_experts {
                let Some(parts) = source.part_locations(l, e) else {
                    return Ok(None);
                };
                for (i, p) in parts.iter().enumerate() {
                    match direct.device_address(p) {
                        Some(a) if p.len as usize == part_bytes[i] && is_stored_as(i, p) => {
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
                part_at,
                scales: None,
            });
        }
        Ok(Some(Self::with_tables(tables, total, cfg)))
    }

    fn with_tables(
        tables: Vec<Option<DeviceFill>>,
        total: usize,
        cfg: &crate::model::config::MoeConfig,
    ) -> Self {
        DeviceFills {
            tables,
            flags_host: vec![vec![0; cfg.num_experts]; cfg.num_hidden_layers],
            flags_dirty: vec![false; cfg.num_hidden_layers],
            total,
            bytes: 0,
        }
    }

    /// One FP8 layer's table: every expert's gate [I, H], up [I, H] and down [H, I] e4m3 with
    /// f32 scales of `block` ([ceil(rows / br), ceil(cols / bc)]), each readable by the device
    /// — the bytes the host's loads copy as stored (`upload_fp8_miss`); `None` otherwise.
    fn fp8_table(
        source: &dyn ExpertSource,
        direct: &DirectFiles,
        home: &[u32],
        block @ [br, bc]: [usize; 2],
        l: usize,
        device: &Device,
    ) -> Result<Option<DeviceFill>> {
        let cfg = source.config();
        let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let ((part_bytes, part_at), (scale_bytes, scale_at)) = DeviceFill::fp8_parts(h, i, block);
        let shapes = [[i, h], [i, h], [h, i]];
        let mut weights = Vec::with_capacity(3 * cfg.num_experts);
        let mut scales = Vec::with_capacity(3 * cfg.num_experts);
        for e in 0..cfg.num_experts {
            let Some(parts) = source.part_locations(l, e) else {
                return Ok(None);
            };
            for (k, p) in parts.iter().enumerate() {
                let [r, c] = shapes[k];
                let Some(s) = p.scale.as_deref() else {
                    return Ok(None);
                };
                let stored = p.dtype == StDtype::F8E4M3
                    && p.shape == [r, c]
                    && p.len as usize == part_bytes[k]
                    && s.dtype == StDtype::F32
                    && s.shape == [r.div_ceil(br), c.div_ceil(bc)]
                    && s.len as usize == scale_bytes[k];
                match (stored, direct.device_address(p), direct.device_address(s)) {
                    (true, Some(a), Some(b)) => {
                        weights.push(a as i64);
                        scales.push(b as i64);
                    }
                    _ => return Ok(None),
                }
            }
        }
        let n = 3 * cfg.num_experts;
        Ok(Some(DeviceFill {
            sources: Tensor::from_vec(weights, n, device)?,
            home: Tensor::from_vec(home.to_vec(), cfg.num_experts, device)?,
            resident: Tensor::zeros(cfg.num_experts, DType::U32, device)?,
            part_bytes,
            part_at,
            scales: Some(ScaleFill {
                sources: Tensor::from_vec(scales, n, device)?,
                part_bytes: scale_bytes,
                part_at: scale_at,
            }),
        }))
    }

    /// Brings the device's residency flags up to date with the host loads since the last step.
    pub fn upload_flags(&mut self, device: &Device) -> Result<()> {
        for l in 0..self.flags_dirty.len() {
            if let (true, Some(t)) = (self.flags_dirty[l], &self.tables[l]) {
                let n = self.flags_host[l].len();
                let flags = Tensor::from_vec(self.flags_host[l].clone(), n, device)?;
                t.resident.slice_set(&flags, 0, 0)?;
            }
            self.flags_dirty[l] = false;
        }
        Ok(())
    }
}

impl CachedProvider {
    /// After a graph step that stands: what the uncaptured step records, layer by layer (the
    /// layer's distinct experts in ascending order, each a hit or a miss) — misses only where
    /// the GPU filled them, which enter as resident in their home slots.
    pub(super) fn settle_step(&self, s: &mut State, routed: &[(usize, Vec<u32>)]) {
        for (layer, ids) in routed {
            let mut needed: Vec<usize> = ids.iter().map(|&e| e as usize).collect();
            needed.sort_unstable();
            needed.dedup();
            for e in needed {
                if s.pools.request(*layer, e).is_some() {
                    continue;
                }
                // Not resident: the GPU filled its home slot (only a pool with fills gets here:
                // a plain step stands only when every expert was resident).
                if s.pools
                    .admit(*layer, e, Admit::Demand, super::unpinned())
                    .is_none()
                {
                    continue;
                }
                if let Some(g) = s.gpu.as_mut() {
                    g.filled(*layer, e, self.expert_bytes);
                }
                s.loads.bytes_read += self.expert_bytes;
            }
        }
    }

    /// After a speculative step: it stands (counted as the uncaptured step would have been)
    /// when it filled its own misses or every routed expert was resident; otherwise nothing is
    /// recorded and the step runs again.
    pub(super) fn settle(&self, s: &mut State, routed: &[(usize, Vec<u32>)]) -> bool {
        let fills = s.gpu.as_ref().is_some_and(|g| g.fills_this_step());
        if !fills
            && !routed
                .iter()
                .all(|(l, ids)| ids.iter().all(|&e| s.pools.contains(*l, e as usize)))
        {
            return false;
        }
        // No prefetch guesses to score: prefetch never speculates.
        self.settle_step(s, routed);
        true
    }
}
