//! The native backend's provider: every expert of every MoE layer loaded up front (on a GPU in
//! bf16/f16, stacked per layer for the fused kernel).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::convert;
use super::source::{ExpertSource, missing_error};
use crate::model::error::{ModelError, Result};
use crate::model::ports::{ExpertProvider, ExpertWeights, Stacked, fused_capable};

/// The native backend's provider: every expert of every MoE layer loaded up front.
pub struct Resident {
    /// Indexed by model layer; empty for dense layers.
    experts: Vec<Vec<Option<Arc<ExpertWeights>>>>,
    /// On a GPU in bf16/f16: every layer's experts stacked for the fused kernel (the per-expert
    /// tensors above are then views into these, not copies).
    stacks: Vec<Option<(Tensor, Tensor)>>,
    unavailable: Vec<Vec<usize>>,
    bytes: u64,
}

impl Resident {
    /// Loads all experts from `source`. Missing experts are an error unless `allow_missing`.
    pub fn load(
        source: &dyn ExpertSource,
        dtype: DType,
        device: &Device,
        allow_missing: bool,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg = source.config();
        let mut experts: Vec<Vec<Option<Arc<ExpertWeights>>>> =
            vec![Vec::new(); cfg.num_hidden_layers];
        let mut unavailable = vec![Vec::new(); cfg.num_hidden_layers];
        let total = cfg.total_experts();
        let mut done = 0;
        let mut bytes = 0;
        for layer in cfg.moe_layers() {
            let mut row = Vec::with_capacity(cfg.num_experts);
            for e in 0..cfg.num_experts {
                if !source.has(layer, e) {
                    if !allow_missing {
                        return Err(missing_error(source, layer, e));
                    }
                    unavailable[layer].push(e);
                    row.push(None);
                } else {
                    let raw = source.read(layer, e)?;
                    let w = convert::from_raw(&raw, cfg.quantization, dtype, device)?;
                    bytes += w.bytes();
                    row.push(Some(Arc::new(w)));
                }
                done += 1;
                progress(done, total);
            }
            experts[layer] = row;
        }
        let mut stacks = vec![None; cfg.num_hidden_layers];
        // Quantized experts have no stacked form (the fused kernels read dense matrices): they
        // stay one by one and the MoE block applies them in turn.
        let quantized = experts.iter().flatten().flatten().any(|w| w.is_quantized());
        if fused_capable(device, dtype) && !quantized {
            for layer in cfg.moe_layers() {
                let (gu, dn) = stack_layer(&experts[layer], cfg, dtype, device)?;
                // Views into the stacks replace the separate tensors: one copy in memory.
                for (e, slot) in experts[layer].iter_mut().enumerate() {
                    if slot.is_some() {
                        *slot = Some(Arc::new(ExpertWeights::new(
                            gu.get(e)?,
                            dn.get(e)?,
                            cfg.moe_intermediate_size,
                        )));
                    }
                }
                stacks[layer] = Some((gu, dn));
            }
        }
        Ok(Resident {
            experts,
            stacks,
            unavailable,
            bytes,
        })
    }
}

/// Stacks one layer's experts ([E, 2I, H], [E, H, I]); missing experts become zeros (they are
/// masked out of routing, so never used).
fn stack_layer(
    row: &[Option<Arc<ExpertWeights>>],
    cfg: &crate::model::MoeConfig,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let zgu = Tensor::zeros((2 * i, h), dtype, device)?;
    let zdn = Tensor::zeros((h, i), dtype, device)?;
    let gu: Vec<Tensor> = row
        .iter()
        .map(|e| {
            e.as_ref()
                .map(|w| Ok(w.dense_or_err("stacking experts")?.0.clone()))
                .unwrap_or_else(|| Ok(zgu.clone()))
        })
        .collect::<Result<_>>()?;
    let dn: Vec<Tensor> = row
        .iter()
        .map(|e| {
            e.as_ref()
                .map(|w| Ok(w.dense_or_err("stacking experts")?.1.clone()))
                .unwrap_or_else(|| Ok(zdn.clone()))
        })
        .collect::<Result<_>>()?;
    Ok((Tensor::stack(&gu, 0)?, Tensor::stack(&dn, 0)?))
}

impl ExpertProvider for Resident {
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertWeights>> {
        self.experts
            .get(layer)
            .and_then(|row| row.get(expert))
            .and_then(|e| e.clone())
            .ok_or_else(|| ModelError::Expert {
                layer,
                expert,
                msg: "not loaded".into(),
            })
    }

    fn unavailable(&self, layer: usize) -> &[usize] {
        &self.unavailable[layer]
    }

    fn resident_bytes(&self) -> u64 {
        self.bytes
    }

    fn kind(&self) -> &'static str {
        "native"
    }

    fn graph_safe(&self) -> bool {
        self.stacks.iter().any(Option::is_some) && self.unavailable.iter().all(Vec::is_empty)
    }

    fn stacked(&self, layer: usize, _needed: &[usize]) -> Result<Option<Stacked>> {
        Ok(self
            .stacks
            .get(layer)
            .and_then(|s| s.clone())
            .map(|(gate_up, down)| Stacked {
                gate_up,
                down,
                index: None,
                device_index: None,
                fill: None,
            }))
    }
}
