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
                expert_held_bytes(&loc.parts, float_size, cpu),
            ));
        }
    }
    HeldSizes::of_layers(non_expert, &layers)
}

/// Bytes one expert occupies once held, from its three parts as stored: the rule
/// `experts::convert` builds experts by, in the one place the memory estimates, the sweep and the
/// cache's budget read it. Block-quantized parts (GGUF, MXFP4 among them) as stored, the
/// expert's float parts then in f32 (the block products take f32); FP8 matrices as stored plus their scales in f32; float
/// experts in the compute dtype (`float_size` bytes an element), except three 16-bit parts of one
/// type for f32 compute on the CPU (`cpu`), which stay as stored ([`super::ports::held_dtype`]).
pub fn expert_held_bytes(parts: &[TensorLocation; 3], float_size: u64, cpu: bool) -> u64 {
    let elements = |p: &TensorLocation| p.shape.iter().product::<usize>() as u64;
    if parts.iter().any(|p| p.dtype.block_elems().is_some()) {
        return parts
            .iter()
            .map(|p| match p.dtype.block_elems() {
                Some(_) => p.len,
                None => elements(p) * 4,
            })
            .sum();
    }
    if parts.iter().any(|p| p.scale.is_some()) {
        return parts
            .iter()
            .map(|p| match &p.scale {
                Some(s) => p.len + elements(s) * 4,
                None => elements(p) * float_size,
            })
            .sum();
    }
    let one_16_bit_type = matches!(parts[0].dtype, StDtype::BF16 | StDtype::F16)
        && parts.iter().all(|p| p.dtype == parts[0].dtype);
    if one_16_bit_type && cpu && float_size == 4 {
        return parts.iter().map(|p| p.len).sum();
    }
    parts.iter().map(|p| elements(p) * float_size).sum()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn part(dtype: StDtype, shape: &[usize], len: u64) -> TensorLocation {
        TensorLocation {
            name: "p".into(),
            file: "f".into(),
            dtype,
            shape: shape.to_vec(),
            offset: 0,
            len,
            scale: None,
        }
    }

    /// The rule per storage and compute: what `experts::convert` builds.
    #[test]
    fn experts_are_held_as_convert_builds_them() {
        let (i, h) = (64usize, 256usize);
        let n = (i * h) as u64;
        let float = |d: StDtype, size: u64| {
            [
                part(d, &[i, h], n * size),
                part(d, &[i, h], n * size),
                part(d, &[h, i], n * size),
            ]
        };
        // 16-bit experts for f32 on the CPU: as stored; elsewhere in the compute dtype.
        assert_eq!(
            expert_held_bytes(&float(StDtype::BF16, 2), 4, true),
            3 * n * 2
        );
        assert_eq!(
            expert_held_bytes(&float(StDtype::F16, 2), 4, true),
            3 * n * 2
        );
        assert_eq!(
            expert_held_bytes(&float(StDtype::BF16, 2), 4, false),
            3 * n * 4
        );
        assert_eq!(
            expert_held_bytes(&float(StDtype::BF16, 2), 2, false),
            3 * n * 2
        );
        assert_eq!(
            expert_held_bytes(&float(StDtype::F32, 4), 2, true),
            3 * n * 2
        );
        assert_eq!(
            expert_held_bytes(&float(StDtype::F32, 4), 4, true),
            3 * n * 4
        );
        // Parts of two 16-bit types are converted to the compute dtype.
        let mut mixed = float(StDtype::BF16, 2);
        mixed[2] = part(StDtype::F16, &[h, i], n * 2);
        assert_eq!(expert_held_bytes(&mixed, 4, true), 3 * n * 4);
        // GGUF: blocks as stored, an F16 down (too narrow for blocks) in f32, whatever the
        // compute dtype.
        let q4k = n / 256 * 144;
        let gguf = [
            part(StDtype::Q4K, &[i, h], q4k),
            part(StDtype::Q4K, &[i, h], q4k),
            part(StDtype::F16, &[h, i], n * 2),
        ];
        for (size, cpu) in [(4, true), (2, false), (2, true)] {
            assert_eq!(expert_held_bytes(&gguf, size, cpu), 2 * q4k + n * 4);
        }
        // FP8: bytes plus f32 scales (128×128 blocks).
        let mut fp8 = float(StDtype::F8E4M3, 1);
        for p in &mut fp8 {
            let blocks = p.shape.iter().map(|d| d.div_ceil(128)).collect::<Vec<_>>();
            p.scale = Some(Box::new(part(StDtype::F32, &blocks, 0)));
        }
        assert_eq!(expert_held_bytes(&fp8, 2, false), 3 * n + 3 * 2 * 4);
    }
}
