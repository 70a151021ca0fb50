//! What a quantized checkpoint occupies once loaded, for memory estimates, budgets and a miss's
//! cost: GGUF blocks and FP8 bytes are held as stored, so the bf16 arithmetic of the float
//! checkpoints would overstate them three- to four-fold.

use std::path::Path;

use super::checkpoint::{Checkpoint, TensorLocation};
use super::config::MoeConfig;
use super::safetensors_file::StDtype;

/// What a quantized checkpoint holds once loaded. Per-expert figures are taken from each MoE
/// layer's first expert present: a mixed file (`Q4_K_M`) stores some layers' experts larger.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldSizes {
    /// Everything but the experts.
    pub non_expert: u64,
    /// One expert as stored, averaged over the MoE layers: what a miss moves on average.
    pub stored_mean: f64,
    /// One expert held, its largest layer's: what a cache budgets a slot at.
    pub expert_max: u64,
    /// Every expert held, summed layer by layer: what native holds.
    pub experts_total: u64,
}

impl HeldSizes {
    /// From each MoE layer's (experts present, one expert as stored, one expert held).
    pub(super) fn of_layers(non_expert: u64, layers: &[(u64, u64, u64)]) -> Option<Self> {
        if layers.is_empty() {
            return None;
        }
        Some(HeldSizes {
            non_expert,
            stored_mean: layers.iter().map(|l| l.1 as f64).sum::<f64>() / layers.len() as f64,
            expert_max: layers.iter().map(|l| l.2).max()?,
            experts_total: layers.iter().map(|l| l.0 * l.2).sum(),
        })
    }
}

/// What `path` holds once loaded (see [`HeldSizes`]), float tensors counted at `float_size`
/// bytes an element, on the CPU (`cpu`) or a GPU (`gpu_bf16`: in bf16, where a GGUF token table
/// of a block-kernel type stays in its blocks) — except 16-bit experts for f32 on the CPU, held
/// as stored (`ports::held_dtype`); None for a float checkpoint held wholly in the compute dtype
/// (the caller's parameter arithmetic is then exact) or one that cannot be read.
pub fn held_sizes(
    path: &Path,
    cfg: &MoeConfig,
    float_size: u64,
    cpu: bool,
    gpu_bf16: bool,
) -> Option<HeldSizes> {
    if super::gguf::is_gguf(path) {
        return super::gguf::held_sizes(path, cfg, float_size, cpu, gpu_bf16);
    }
    let experts_as_stored = cpu && float_size == 4;
    if cfg.quantization.is_none() && !experts_as_stored {
        return None;
    }
    let ckpt = Checkpoint::open(path).ok()?;
    // An FP8 matrix is held as its bytes plus f32 scales; anything else in the compute dtype.
    let held = |loc: &TensorLocation| match &loc.scale {
        Some(s) => loc.len + s.shape.iter().product::<usize>() as u64 * 4,
        None => loc.shape.iter().product::<usize>() as u64 * float_size,
    };
    let held_expert = |loc: &TensorLocation| match loc.dtype {
        StDtype::BF16 | StDtype::F16 if experts_as_stored && loc.scale.is_none() => loc.len,
        _ => held(loc),
    };
    let mut non_expert = 0;
    for (name, shape) in Checkpoint::required_tensors(cfg) {
        non_expert += held(&ckpt.check(&name, &shape).ok()?);
    }
    let mut layers = Vec::new();
    for layer in cfg.moe_layers() {
        let present = (0..cfg.num_experts)
            .filter(|&e| matches!(ckpt.expert_location(cfg, layer, e), Ok(Some(_))))
            .count() as u64;
        let loc = (0..cfg.num_experts).find_map(|e| ckpt.expert_location(cfg, layer, e).ok()?);
        if let Some(loc) = loc {
            layers.push((
                present,
                loc.bytes(),
                loc.parts.iter().map(held_expert).sum(),
            ));
        }
    }
    HeldSizes::of_layers(non_expert, &layers)
}

/// How the experts are stored, for the header: "GGUF experts Q4_K ×66 + Q6_K ×30",
/// "FP8 experts (e4m3, 128×128 blocks)"; None for float checkpoints.
pub fn expert_format(path: &Path, cfg: Option<&MoeConfig>) -> Option<String> {
    if let Some(types) = super::gguf::expert_types_of(path) {
        return Some(format!("GGUF experts {types}"));
    }
    let scheme = cfg?.quantization?;
    Some(format!(
        "FP8 experts (e4m3, {}×{} blocks)",
        scheme.block[0], scheme.block[1]
    ))
}
