//! What a quantized checkpoint occupies once loaded, for memory estimates, budgets and a miss's
//! cost: GGUF blocks and FP8 bytes are held as stored, so the bf16 arithmetic of the float
//! checkpoints would overstate them three- to four-fold.

use std::path::Path;

use super::checkpoint::{Checkpoint, TensorLocation};
use super::config::MoeConfig;

/// (non-expert bytes held, bytes of one expert as stored, bytes of one expert held), float
/// tensors counted at `float_size` bytes an element, on the CPU (`cpu`) or a GPU; None for a
/// float checkpoint (the caller's parameter arithmetic is then exact) or one that cannot be
/// read.
pub fn held_sizes(
    path: &Path,
    cfg: &MoeConfig,
    float_size: u64,
    cpu: bool,
) -> Option<(u64, u64, u64)> {
    if super::gguf::is_gguf(path) {
        return super::gguf::held_sizes(path, cfg, float_size, cpu);
    }
    cfg.quantization?;
    let ckpt = Checkpoint::open(path).ok()?;
    // An FP8 matrix is held as its bytes plus f32 scales; anything else in the compute dtype.
    let held = |loc: &TensorLocation| match &loc.scale {
        Some(s) => loc.len + s.shape.iter().product::<usize>() as u64 * 4,
        None => loc.shape.iter().product::<usize>() as u64 * float_size,
    };
    let mut non_expert = 0;
    for (name, shape) in Checkpoint::required_tensors(cfg) {
        non_expert += held(&ckpt.check(&name, &shape).ok()?);
    }
    let layer = cfg.moe_layers().next()?;
    let loc = (0..cfg.num_experts).find_map(|e| ckpt.expert_location(cfg, layer, e).ok()?)?;
    Some((non_expert, loc.bytes(), loc.parts.iter().map(held).sum()))
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
