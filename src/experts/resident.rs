//! The native backend's provider: every expert of every MoE layer loaded up front (on a GPU in
//! bf16/f16, stacked per layer for the fused kernel).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::convert;
use super::source::{ExpertSource, missing_error};
use crate::model::error::{ModelError, Result};
use crate::model::ports::{
    ExpertProvider, ExpertWeights, FUSED_DECODE_MAX_TOPK, Fp8Scales, Fp8StackParts, Stacked,
    fused_capable,
};

/// The native backend's provider: every expert of every MoE layer loaded up front.
pub struct Resident {
    /// Indexed by model layer; empty for dense layers.
    experts: Vec<Vec<Option<Arc<ExpertWeights>>>>,
    /// On a GPU in bf16/f16 (FP8 experts: in bf16): every layer's experts stacked for the fused
    /// kernels (the per-expert tensors above are then views into these, not copies).
    stacks: Vec<Option<Stacked>>,
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
        // GGUF experts become GPU blocks only when every MoE layer's types allow it.
        let gpu_blocks = convert::gpu_block_layouts(source, dtype, device).is_some();
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
                    let w =
                        convert::from_raw_with(&raw, cfg.quantization, dtype, device, gpu_blocks)?;
                    bytes += w.bytes();
                    row.push(Some(Arc::new(w)));
                }
                done += 1;
                progress(done, total);
            }
            experts[layer] = row;
        }
        let mut stacks = vec![None; cfg.num_hidden_layers];
        // GGUF experts have no stacked form (the fused kernels read dense or FP8 matrices): they
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
                stacks[layer] = Some(stacked(gu, dn, None));
            }
        } else if let Some(block) = fp8_stackable(&experts, cfg.num_experts_per_tok, device, dtype)?
        {
            for layer in cfg.moe_layers() {
                let st = stack_layer_fp8(&experts[layer], cfg, block, device)?;
                let scales = st.fp8.as_ref().expect("FP8 stacks");
                for (e, slot) in experts[layer].iter_mut().enumerate() {
                    if slot.is_some() {
                        *slot = Some(Arc::new(ExpertWeights::fp8_from_stack_parts(
                            &Fp8StackParts {
                                gate_up: st.gate_up.get(e)?,
                                gate_up_scale: scales.gate_up.get(e)?,
                                down: st.down.get(e)?,
                                down_scale: scales.down.get(e)?,
                                block,
                            },
                        )?));
                    }
                }
                stacks[layer] = Some(st);
            }
        } else if experts
            .iter()
            .flatten()
            .flatten()
            .all(|w| w.block_parts().is_some())
            && experts.iter().flatten().flatten().next().is_some()
        {
            // GGUF blocks on the GPU: each layer's experts stacked as stored for the block
            // decode kernels; views into the stacks replace the per-expert tensors.
            for layer in cfg.moe_layers() {
                let st = stack_layer_blocks(&experts[layer], layer, device)?;
                let layout = st.ggml.expect("block stacks");
                for (e, slot) in experts[layer].iter_mut().enumerate() {
                    if slot.is_some() {
                        *slot = Some(Arc::new(ExpertWeights::blocks(
                            st.gate_up.get(e)?,
                            st.down.get(e)?,
                            layout,
                        )?));
                    }
                }
                stacks[layer] = Some(st);
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

fn stacked(gate_up: Tensor, down: Tensor, fp8: Option<Fp8Scales>) -> Stacked {
    Stacked {
        gate_up,
        down,
        index: None,
        device_index: None,
        fill: None,
        fp8,
        ggml: None,
    }
}

/// Stacks one layer's GGUF experts as stored: U8 [E, gate_up bytes] and [E, down bytes], one
/// layout for all (a GGUF file stores a layer's experts in one tensor per matrix); missing
/// experts become zeros (masked out of routing, so never used).
fn stack_layer_blocks(
    row: &[Option<Arc<ExpertWeights>>],
    layer: usize,
    device: &Device,
) -> Result<Stacked> {
    let mut layout = None;
    for w in row.iter().flatten() {
        let (_, _, l) = w.block_parts().expect("checked by the caller");
        if layout.is_some_and(|k| k != l) {
            return Err(ModelError::Input(format!(
                "layer {layer}: GGUF experts in different block layouts ({} and {l})",
                layout.expect("checked")
            )));
        }
        layout = Some(l);
    }
    let layout =
        layout.ok_or_else(|| ModelError::Input(format!("layer {layer}: no expert to stack")))?;
    let zgu = Tensor::zeros(layout.gate_up_bytes(), DType::U8, device)?;
    let zdn = Tensor::zeros(layout.down_bytes(), DType::U8, device)?;
    let (mut gu, mut dn) = (Vec::with_capacity(row.len()), Vec::with_capacity(row.len()));
    for w in row {
        match w.as_ref().and_then(|w| w.block_parts()) {
            Some((g, d, _)) => {
                gu.push(g.clone());
                dn.push(d.clone());
            }
            None => {
                gu.push(zgu.clone());
                dn.push(zdn.clone());
            }
        }
    }
    Ok(Stacked {
        ggml: Some(layout),
        ..stacked(Tensor::stack(&gu, 0)?, Tensor::stack(&dn, 0)?, None)
    })
}

/// The block of FP8 experts that can be stacked for the FP8 decode kernels (bf16 compute on a
/// GPU, top-k within the kernels' limit, every expert FP8 on the device with one block shape);
/// None otherwise.
fn fp8_stackable(
    experts: &[Vec<Option<Arc<ExpertWeights>>>],
    top_k: usize,
    device: &Device,
    dtype: DType,
) -> Result<Option<[usize; 2]>> {
    if !device.is_cuda() || dtype != DType::BF16 || top_k > FUSED_DECODE_MAX_TOPK {
        return Ok(None);
    }
    let mut block = None;
    for w in experts.iter().flatten().flatten() {
        match w.fp8_block() {
            Some(b) if block.is_none_or(|k| k == b) => block = Some(b),
            _ => return Ok(None),
        }
    }
    Ok(block)
}

/// Stacks one layer's FP8 experts: bytes [E, 2I, H] and [E, H, I] with their scales (see
/// [`Fp8Scales`]); missing experts become zeros (masked out of routing, so never used).
fn stack_layer_fp8(
    row: &[Option<Arc<ExpertWeights>>],
    cfg: &crate::model::MoeConfig,
    block: [usize; 2],
    device: &Device,
) -> Result<Stacked> {
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let [br, bc] = block;
    let zero = || -> Result<Fp8StackParts> {
        Ok(Fp8StackParts {
            gate_up: Tensor::zeros((2 * i, h), DType::U8, device)?,
            gate_up_scale: Tensor::zeros((2 * i.div_ceil(br), h.div_ceil(bc)), DType::F32, device)?,
            down: Tensor::zeros((h, i), DType::U8, device)?,
            down_scale: Tensor::zeros((h.div_ceil(br), i.div_ceil(bc)), DType::F32, device)?,
            block,
        })
    };
    let parts: Vec<Fp8StackParts> = row
        .iter()
        .map(|e| match e {
            Some(w) => w.fp8_stack_parts()?.ok_or_else(|| {
                ModelError::Input("stacking FP8 experts: an expert is not FP8 on the GPU".into())
            }),
            None => zero(),
        })
        .collect::<Result<_>>()?;
    let stack = |f: fn(&Fp8StackParts) -> &Tensor| -> Result<Tensor> {
        Ok(Tensor::stack(&parts.iter().map(f).collect::<Vec<_>>(), 0)?)
    };
    Ok(stacked(
        stack(|p| &p.gate_up)?,
        stack(|p| &p.down)?,
        Some(Fp8Scales {
            gate_up: stack(|p| &p.gate_up_scale)?,
            down: stack(|p| &p.down_scale)?,
            block,
        }),
    ))
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
        Ok(self.stacks.get(layer).and_then(|s| s.clone()))
    }
}
