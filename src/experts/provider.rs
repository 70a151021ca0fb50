//! The expert seam: the MoE block asks an [`ExpertProvider`] for an expert's weights and knows
//! nothing else about where they come from. `Resident` (native) holds every expert; the cached
//! provider (selective) loads them on demand. Both hand out the same [`ExpertWeights`] built by the
//! same conversion from the same bytes, so the forward pass is bit-identical between them.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::experts::source::{ExpertSource, PartSpan, RawExpert};
use crate::model::error::{ModelError, Result};
use crate::model::layers::silu;
use crate::model::safetensors_file::{TensorInfo, bytes_to_tensor};

/// One expert, ready to compute with: gate and up stacked as one [2I, H] matrix (one matmul
/// instead of two, as transformers 5 fuses them), down as [H, I].
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    pub gate_up: Tensor,
    pub down: Tensor,
    intermediate: usize,
}

impl ExpertWeights {
    /// Builds compute tensors from an expert's on-disk bytes. Gate and up are both [I, H]
    /// row-major, so their byte concatenation *is* the stacked [2I, H] matrix.
    pub fn from_raw(raw: &RawExpert, dtype: DType, device: &Device) -> Result<Self> {
        let [gate, up, down] = &raw.parts;
        let (i, h) = (gate.shape[0], gate.shape[1]);
        let gate_up = if gate.dtype == up.dtype {
            let mut bytes = Vec::with_capacity(gate.bytes.len() + up.bytes.len());
            bytes.extend_from_slice(&gate.bytes);
            bytes.extend_from_slice(&up.bytes);
            let info = TensorInfo {
                dtype: gate.dtype,
                shape: vec![2 * i, h],
                offset: 0,
                len: bytes.len() as u64,
            };
            bytes_to_tensor(&bytes, &info, dtype, device)
        } else {
            let g = bytes_to_tensor(&gate.bytes, &gate.info(), dtype, device)?;
            let u = bytes_to_tensor(&up.bytes, &up.info(), dtype, device)?;
            Tensor::cat(&[&g, &u], 0)
        }
        .map_err(|e| raw.error(format!("converting gate/up: {e}")))?;
        let down = bytes_to_tensor(&down.bytes, &down.info(), dtype, device)
            .map_err(|e| raw.error(format!("converting down_proj: {e}")))?;
        Ok(ExpertWeights {
            gate_up,
            down,
            intermediate: i,
        })
    }

    /// Builds a CPU expert straight out of a read buffer (the spans of
    /// [`ExpertSource::read_into`]) when the conversion is exact — the same dtype, or bf16 / f16
    /// widened to f32 — so the result is bit-for-bit what [`Self::from_raw`] makes. One
    /// allocation per matrix and the conversion spread over threads: an expert miss on the CPU
    /// otherwise spends more time allocating and copying transients than reading. `None` for
    /// any other combination or an unexpected shape (the caller falls back to `from_raw`).
    pub fn from_spans_exact(buf: &[u8], spans: &[PartSpan; 3], dtype: DType) -> Option<Self> {
        let [g, u, d] = spans;
        if cfg!(target_endian = "big") {
            return None; // the views below read safetensors' little-endian bytes natively
        }
        if g.shape.len() != 2 || g.shape != u.shape || d.shape != [g.shape[1], g.shape[0]] {
            return None;
        }
        let (i, h) = (g.shape[0], g.shape[1]);
        let src = g.dtype.float_dtype()?;
        if u.dtype.float_dtype()? != src || d.dtype.float_dtype()? != src {
            return None;
        }
        let n = i * h;
        let esize = src.size_in_bytes();
        if [g, u, d]
            .iter()
            .any(|p| p.range.len() != n * esize || p.range.end > buf.len())
        {
            return None;
        }
        if u.range.start != g.range.end {
            return None; // gate and up not adjacent: not worth a special case
        }
        let (gu, dn) = (&buf[g.range.start..u.range.end], &buf[d.range.clone()]);
        let (gate_up, down) = match (src, dtype) {
            (DType::BF16, DType::F32) => cpu_pair(gu, dn, i, h, widen_bf16)?,
            (DType::F16, DType::F32) => cpu_pair(gu, dn, i, h, widen::<half::f16>)?,
            (DType::F32, DType::F32) => cpu_pair(gu, dn, i, h, same::<f32>)?,
            (DType::BF16, DType::BF16) => cpu_pair(gu, dn, i, h, same::<half::bf16>)?,
            (DType::F16, DType::F16) => cpu_pair(gu, dn, i, h, same::<half::f16>)?,
            _ => return None,
        };
        Some(ExpertWeights {
            gate_up,
            down,
            intermediate: i,
        })
    }

    /// down(silu(gate(x)) * up(x)) for x of shape [n, H].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = x.matmul(&self.gate_up.t()?)?;
        let g = gu.narrow(1, 0, self.intermediate)?;
        let u = gu.narrow(1, self.intermediate, self.intermediate)?;
        let h = (silu(&g)? * u)?;
        Ok(h.matmul(&self.down.t()?)?)
    }

    /// Bytes this expert occupies in memory (compute dtype).
    pub fn bytes(&self) -> u64 {
        ((self.gate_up.elem_count() + self.down.elem_count()) * self.down.dtype().size_in_bytes())
            as u64
    }
}

/// Experts stacked for a fused kernel (`candle_nn::moe::moe_gemm`): `gate_up` is
/// [n, 2I, H], `down` [n, H, I]; `index` maps an expert id to its position along the first
/// dimension (None: position = expert id, the native layout).
pub struct Stacked {
    pub gate_up: Tensor,
    pub down: Tensor,
    pub index: Option<Vec<u32>>,
    /// The same map kept on the device (u32 `[num_experts]`), for a step that must not read
    /// routing back: the speculative graph step of a slot pool. Only resident experts' entries
    /// are meaningful; the others point at some slot and the step is redone (see
    /// [`ExpertProvider::settle_speculation`]).
    pub device_index: Option<Tensor>,
    /// With `device_index`: the GPU fills the slots of routed experts that are not resident
    /// itself, from host memory, before the kernel reads them (a pool with a slot for every
    /// expert, see `CachedProvider`); then no step needs the routing on the host.
    pub fill: Option<DeviceFill>,
}

/// Where each expert of one layer comes from and goes when the GPU fills its slot itself.
#[derive(Clone)]
pub struct DeviceFill {
    /// i64 `[num_experts × 3]`: device addresses of each expert's gate, up and down parts in
    /// registered host memory (each `part_bytes` long, stored in the compute dtype).
    pub sources: Tensor,
    /// u32 `[num_experts]`: the slot each expert fills (its own; the pool never evicts).
    pub home: Tensor,
    /// u32 `[num_experts]`: 1 for experts in their slot (set by the fill and by host loads).
    pub resident: Tensor,
    pub part_bytes: usize,
}

/// True when the fused GPU kernel can run in this dtype on this device.
pub fn fused_capable(device: &Device, dtype: DType) -> bool {
    device.is_cuda() && matches!(dtype, DType::BF16 | DType::F16)
}

/// Where the MoE block gets expert weights from.
pub trait ExpertProvider: Send + Sync {
    /// The weights of (layer, expert), loading them first if needed. The returned `Arc` keeps
    /// them alive while they are applied, even if a cache evicts them meanwhile — which is what
    /// lets a cache smaller than top-k work.
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertWeights>>;

    /// Experts of `layer` that cannot be provided. Non-empty only in a run where the user allowed
    /// missing experts; the router masks them out and the run is labelled DEGRADED.
    fn unavailable(&self, layer: usize) -> &[usize];

    /// Called with the experts a layer selected, before they are fetched (statistics, prefetch).
    fn will_use(&self, _layer: usize, _experts: &[usize]) {}

    /// Stacked weights holding at least the experts in `needed` (ascending ids), for the fused GPU
    /// kernel; None when the provider keeps experts one by one.
    fn stacked(&self, _layer: usize, _needed: &[usize]) -> Result<Option<Stacked>> {
        Ok(None)
    }

    /// Whether `stacked` needs the selected expert ids on the host (a selective cache must know
    /// what to load; native's full stacks do not).
    fn needs_ids_on_host(&self) -> bool {
        false
    }

    /// Whether the provider wants guesses of the next layer's experts (prefetch on).
    fn wants_hints(&self) -> bool {
        false
    }

    /// Whether a decode step through this provider may be captured once as a CUDA graph and
    /// replayed: every expert resident in device stacks, nothing read back to the host, no
    /// upload and no masking tensor made per step. Only native's device stacks qualify.
    fn graph_safe(&self) -> bool {
        false
    }

    /// Whether the next decode step should be tried as a CUDA graph over the experts resident
    /// now (a slot pool whose recent steps missed nothing, see `speculation.rs`). Asked once
    /// per decode step.
    fn speculate(&self) -> bool {
        false
    }

    /// Changes when a graph captured over [`resident_stacks`](Self::resident_stacks) no longer
    /// matches what they return (slot fills added or dropped): the step is captured again.
    fn graph_variant(&self) -> u64 {
        0
    }

    /// After each decode step: how it ran and its time (what guessing weighs its odds against).
    fn step_ran(&self, _path: crate::model::generate::StepPath, _secs: f64) {}

    /// The layer's slot pool with a device expert→slot table, for the speculative step.
    fn resident_stacks(&self, _layer: usize) -> Result<Option<Stacked>> {
        Ok(None)
    }

    /// Brings the device expert→slot tables up to date, before a speculative step launches.
    fn prepare_speculation(&self) -> Result<()> {
        Ok(())
    }

    /// After a speculative step: the experts each MoE layer selected, in layer order. When all
    /// were resident the step stands: they are counted as the hits the uncaptured step would
    /// have counted, in the same order, and true is returned. Otherwise nothing is recorded and
    /// the step must be run again uncaptured (it rewrites the same KV row, so nothing is lost).
    fn settle_speculation(&self, _routed: &[(usize, Vec<u32>)]) -> bool {
        false
    }

    /// A guess of the experts `layer` will select, made while the layer before it runs.
    fn prefetch_hint(&self, _layer: usize, _experts: &[usize]) {}

    /// Bytes of expert weights held in memory now.
    fn resident_bytes(&self) -> u64;

    /// "native" or "selective" — for display.
    fn kind(&self) -> &'static str;

    /// Bypass mode (teacher-forced scoring, perplexity): serve experts without changing what is
    /// cached or counting hits and misses, so the cache and its statistics describe generation
    /// alone.
    fn set_bypass(&self, _on: bool) {}

    /// Cache statistics, for providers that cache.
    fn cache_snapshot(&self) -> Option<crate::experts::stats::CacheSnapshot> {
        None
    }
}

/// A provider seen through a speculative decode step: stacks come from the resident slot pool
/// with the device expert→slot table, and nothing is read back to the host.
pub struct ResidentView<'a>(pub &'a dyn ExpertProvider);

impl ExpertProvider for ResidentView<'_> {
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertWeights>> {
        self.0.get(layer, expert)
    }
    fn unavailable(&self, layer: usize) -> &[usize] {
        self.0.unavailable(layer)
    }
    fn stacked(&self, layer: usize, _needed: &[usize]) -> Result<Option<Stacked>> {
        self.0.resident_stacks(layer)
    }
    fn graph_safe(&self) -> bool {
        true
    }
    fn resident_bytes(&self) -> u64 {
        self.0.resident_bytes()
    }
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
}

/// Receives each token's routing decision in each MoE layer (heatmaps, traces, cache studies).
pub trait RoutingObserver {
    /// `position` is the token's absolute position; `experts` and `weights` are in top-k order.
    fn on_routing(&mut self, layer: usize, position: usize, experts: &[u32], weights: &[f32]);

    /// False when nothing is listening (the GPU path then skips copying routing to the host).
    fn wants_routing(&self) -> bool {
        true
    }

    /// Whether to compute next-layer guesses for [`on_guess`](Self::on_guess) even when the
    /// provider does not prefetch (a routing trace for the simulator's prefetch replay). Costs
    /// one router product per layer, so off unless asked for.
    fn wants_guesses(&self) -> bool {
        false
    }

    /// The experts `layer`'s router would pick for the token at `position` if applied to the
    /// hidden state of the layer before it (what `--prefetch next-layer` loads), ascending.
    fn on_guess(&mut self, _layer: usize, _position: usize, _experts: &[usize]) {}
}

/// An observer that ignores everything.
pub struct NoObserver;

impl RoutingObserver for NoObserver {
    fn on_routing(&mut self, _: usize, _: usize, _: &[u32], _: &[f32]) {}
    fn wants_routing(&self) -> bool {
        false
    }
}

/// Collects every routing decision: (layer, position, experts).
#[derive(Debug, Default, Clone)]
pub struct RoutingLog {
    pub entries: Vec<(usize, usize, Vec<u32>)>,
}

impl RoutingObserver for RoutingLog {
    fn on_routing(&mut self, layer: usize, position: usize, experts: &[u32], _: &[f32]) {
        self.entries.push((layer, position, experts.to_vec()));
    }
}

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
                    let w = ExpertWeights::from_raw(&raw, dtype, device)?;
                    bytes += w.bytes();
                    row.push(Some(Arc::new(w)));
                }
                done += 1;
                progress(done, total);
            }
            experts[layer] = row;
        }
        let mut stacks = vec![None; cfg.num_hidden_layers];
        if fused_capable(device, dtype) {
            for layer in cfg.moe_layers() {
                let (gu, dn) = stack_layer(&experts[layer], cfg, dtype, device)?;
                // Views into the stacks replace the separate tensors: one copy in memory.
                for (e, slot) in experts[layer].iter_mut().enumerate() {
                    if slot.is_some() {
                        *slot = Some(Arc::new(ExpertWeights {
                            gate_up: gu.get(e)?,
                            down: dn.get(e)?,
                            intermediate: cfg.moe_intermediate_size,
                        }));
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
                .map(|w| w.gate_up.clone())
                .unwrap_or_else(|| zgu.clone())
        })
        .collect();
    let dn: Vec<Tensor> = row
        .iter()
        .map(|e| {
            e.as_ref()
                .map(|w| w.down.clone())
                .unwrap_or_else(|| zdn.clone())
        })
        .collect();
    Ok((Tensor::stack(&gu, 0)?, Tensor::stack(&dn, 0)?))
}

pub fn missing_error(source: &dyn ExpertSource, layer: usize, expert: usize) -> ModelError {
    ModelError::Expert {
        layer,
        expert,
        msg: format!(
            "missing from {} (run `moescope verify` for the full list; \
             --allow-missing-experts runs anyway, masked out of routing and labelled DEGRADED)",
            source.describe()
        ),
    }
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

/// gate_up [2I, H] and down [H, I] as CPU tensors made by `conv` from their bytes.
fn cpu_pair<T: candle_core::WithDType>(
    gu: &[u8],
    dn: &[u8],
    i: usize,
    h: usize,
    conv: fn(&[u8]) -> Option<Vec<T>>,
) -> Option<(Tensor, Tensor)> {
    let a = Tensor::from_vec(conv(gu)?, (2 * i, h), &Device::Cpu).ok()?;
    let b = Tensor::from_vec(conv(dn)?, (h, i), &Device::Cpu).ok()?;
    Some((a, b))
}

/// Elements per parallel conversion task.
const PIECE: usize = 1 << 16;

/// `bytes` viewed as elements of `S` (None when misaligned, which a `Vec<u8>` from the
/// allocator never is at the offsets of a safetensors part).
fn view<S: PlainData>(bytes: &[u8]) -> Option<&[S]> {
    // SAFETY: `PlainData` types are plain old data: every bit pattern is a valid value.
    let (pre, mid, post) = unsafe { bytes.align_to::<S>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// Element types for which any bit pattern is a valid value.
trait PlainData: Copy {}
impl PlainData for u16 {}
impl PlainData for f32 {}
impl PlainData for half::bf16 {}
impl PlainData for half::f16 {}

/// bf16 / f16 little-endian bytes widened to f32 (exact), with half's SIMD slice conversion.
fn widen<S>(bytes: &[u8]) -> Option<Vec<f32>>
where
    S: PlainData + Sync,
    [S]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    let src = view::<S>(bytes)?;
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(PIECE)
        .zip(src.par_chunks(PIECE))
        .for_each(|(d, s)| s.convert_to_f32_slice(d));
    Some(out)
}

/// bf16 → f32 is a 16-bit shift (exactly `bf16::to_f32`); written as one so it vectorises,
/// straight into uninitialised memory (no memset of a buffer about to be overwritten).
fn widen_bf16(bytes: &[u8]) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    let src = view::<u16>(bytes)?;
    let mut out: Vec<f32> = Vec::with_capacity(src.len());
    out.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(PIECE)
        .zip(src.par_chunks(PIECE))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                d.write(f32::from_bits(u32::from(s) << 16));
            }
        });
    // SAFETY: every element up to src.len() was written just above.
    unsafe { out.set_len(src.len()) };
    Some(out)
}

/// Same dtype: a copy into an owned, aligned Vec.
fn same<S: PlainData>(bytes: &[u8]) -> Option<Vec<S>> {
    Some(view::<S>(bytes)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::source::RawPart;
    use crate::model::safetensors_file::StDtype;

    /// The fast CPU path must make exactly what `from_raw` makes, bit for bit, for every
    /// stored/compute dtype pair it accepts — including NaN, infinities and subnormals.
    #[test]
    fn spans_path_is_bit_identical_to_from_raw() {
        let (i, h) = (3usize, 5usize);
        for (st, esize) in [(StDtype::BF16, 2), (StDtype::F16, 2), (StDtype::F32, 4)] {
            let part = |name: &str, shape: Vec<usize>, seed: u8| RawPart {
                name: name.into(),
                dtype: st,
                shape,
                bytes: (0..i * h * esize)
                    .map(|b| (b as u8).wrapping_mul(37).wrapping_add(seed))
                    .collect(),
            };
            let raw = RawExpert {
                layer: 0,
                expert: 0,
                parts: [
                    part("g", vec![i, h], 1),
                    part("u", vec![i, h], 99),
                    part("d", vec![h, i], 200),
                ],
            };
            let mut buf = Vec::new();
            let mut spans = Vec::new();
            for p in &raw.parts {
                let at = buf.len();
                buf.extend_from_slice(&p.bytes);
                spans.push(PartSpan {
                    dtype: p.dtype,
                    shape: p.shape.clone(),
                    range: at..buf.len(),
                });
            }
            let spans: [PartSpan; 3] = spans.try_into().unwrap();
            let src = st.float_dtype().unwrap();
            for dtype in [DType::F32, src] {
                let fast = ExpertWeights::from_spans_exact(&buf, &spans, dtype)
                    .unwrap_or_else(|| panic!("{st:?} -> {dtype:?} has a fast path"));
                let slow = ExpertWeights::from_raw(&raw, dtype, &Device::Cpu).unwrap();
                for (a, b) in [(&fast.gate_up, &slow.gate_up), (&fast.down, &slow.down)] {
                    assert_eq!(a.dims(), b.dims());
                    // Widening to f32 is exact for every storage dtype, so f32 bits compare all.
                    let bits = |t: &Tensor| -> Vec<u32> {
                        t.to_dtype(DType::F32)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .map(|x| x.to_bits())
                            .collect()
                    };
                    assert_eq!(bits(a), bits(b), "{st:?} -> {dtype:?}");
                }
            }
            // A narrowing conversion is not "exact": no fast path.
            if src == DType::F32 {
                assert!(ExpertWeights::from_spans_exact(&buf, &spans, DType::BF16).is_none());
            }
        }
    }
}
