//! The small building blocks of the Qwen3-MoE decoder: RMSNorm, NeoX RoPE, linear layers,
//! grouped-query attention with a KV cache, and the dense SwiGLU MLP.
//!
//! Written here rather than borrowed because candle-transformers keeps its attention types
//! crate-private, and because each block must follow HF's numerics (where it casts, where it
//! accumulates in f32) for the fidelity tests to hold in every dtype.

use candle_core::{DType, Device, Tensor};

use super::error::Result;

/// x·Wᵀ (+ b) for x of shape [T, in] and W of shape [out, in].
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// RMSNorm as HF computes it: normalise in f32, cast back to the compute dtype, then scale by the
/// weight in that dtype. (candle's fused kernel rounds the norm to bf16 before dividing, which
/// costs bf16 accuracy, so it is only used for the f32 part.)
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    ones_f32: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        let n = weight.dim(0)?;
        let ones_f32 = Tensor::ones(n, DType::F32, weight.device())?;
        Ok(RmsNorm {
            weight,
            ones_f32,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        // On the GPU the fused kernel (it accumulates in f32) saves three launches per norm,
        // which is what batch-1 decode is bound by.
        if x.dtype() == DType::F32 || x.device().is_cuda() {
            return Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?);
        }
        let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &self.ones_f32, self.eps)?;
        Ok(normed.to_dtype(x.dtype())?.broadcast_mul(&self.weight)?)
    }
}

/// Standard (NeoX, rotate-half) RoPE over the full head_dim. For text-only input HF's
/// interleaved M-RoPE produces exactly these angles, because its three position streams are equal.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// cos/sin for positions 0..n on the compute device, grown on demand: one table lookup per
    /// forward instead of two host→device copies (which dominate a GPU decode step's overhead).
    table: std::sync::Arc<std::sync::Mutex<Option<RopeTable>>>,
}

#[derive(Debug)]
struct RopeTable {
    dtype: DType,
    device: candle_core::DeviceLocation,
    len: usize,
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        // Same float32 arithmetic as HF: base ** (arange(0, dim, 2) / dim), then reciprocal.
        let base = theta as f32;
        let inv_freq = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0f32 / base.powf(i as f32 / head_dim as f32))
            .collect();
        Rope {
            inv_freq,
            table: Default::default(),
        }
    }

    /// cos and sin tables [T, head_dim / 2] for positions offset..offset+T, in `dtype`.
    pub fn tables(
        &self,
        offset: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.full(offset + len, dtype, device)?;
        Ok((cos.narrow(0, offset, len)?, sin.narrow(0, offset, len)?))
    }

    /// The whole cached tables, covering at least positions 0..len (a device-positioned decode
    /// step picks its row with an index read on the device).
    pub fn full(&self, len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let mut guard = self.table.lock().expect("rope table");
        let fresh = match guard.as_ref() {
            Some(t) => t.dtype != dtype || t.device != device.location() || t.len < len,
            None => true,
        };
        if fresh {
            let n = len.next_power_of_two().max(256);
            let (cos, sin) = self.compute(0, n, dtype, device)?;
            *guard = Some(RopeTable {
                dtype,
                device: device.location(),
                len: n,
                cos,
                sin,
            });
        }
        let t = guard.as_ref().expect("just filled");
        Ok((t.cos.clone(), t.sin.clone()))
    }

    fn compute(
        &self,
        offset: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in offset..offset + len {
            let p = p as f32;
            for &f in &self.inv_freq {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Applies RoPE to x of shape [1, heads, T, head_dim].
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?)
    }
}

/// Keys and values of every layer for the tokens seen so far.
///
/// Two layouts, chosen by the device of the first append:
/// - CPU: token-major `[capacity, kv_heads, head_dim]` buffers grown by doubling and written in
///   place, so a decode step appends one row instead of copying the whole history (the view
///   handed to attention is a prefix, still contiguous). Kept in f32 whatever the compute dtype:
///   bf16/f16 keys are stored exactly (every bf16 is an f32) and the f32 attention kernel reads
///   them without re-converting the history every step.
/// - GPU ("static"): head-major `[kv_heads, capacity, head_dim]` buffers, zero-filled, grown by
///   doubling, written in place, and attended over *whole* with a mask hiding the rows past the
///   current position. Attending over the capacity rather than the filled length is what lets a
///   decode step take its position from device memory, so the step can be captured once as a
///   CUDA graph and replayed (its buffers never move until the capacity doubles). Masked rows
///   are zeros or stale keys — always finite — so they contribute exactly 0 after the softmax.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    /// Use the static layout on any device (tests exercise the GPU layout on the CPU).
    force_static: bool,
    /// Smallest static capacity (rows).
    min_static: usize,
    /// Bumped whenever a static buffer is replaced: a captured graph holding the old buffers'
    /// addresses is stale from then on.
    epoch: u64,
    /// Per-capacity constants of the device-positioned decode step, made once per epoch.
    statics: Option<(u64, DecodeStatics)>,
}

/// Constants a device-positioned decode step derives its mask from: `[capacity]` row indices,
/// zeros and -inf in the compute dtype.
#[derive(Debug, Clone)]
pub struct DecodeStatics {
    rows: Tensor,
    zeros: Tensor,
    neg_inf: Tensor,
}

/// A one-token decode step's position-dependent inputs, computed on the device from the
/// position held in device memory — no host value in them, so the step can be captured.
#[derive(Debug, Clone)]
pub struct DecodeInputs {
    /// RoPE tables at the position, `[1, head_dim / 2]`.
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[kv_heads, 1, head_dim]` u32, every entry the position: where k and v are written.
    pub rows: Tensor,
    /// Additive attention mask `[capacity]`: 0 for rows ≤ the position, -inf after — the same
    /// values [`causal_mask`] gives a host-positioned step.
    pub mask: Tensor,
}

impl DecodeInputs {
    /// `pos`: u32 `[1]` on the device. `cos_full`/`sin_full`: RoPE tables covering the capacity.
    pub fn build(
        pos: &Tensor,
        statics: &DecodeStatics,
        cos_full: &Tensor,
        sin_full: &Tensor,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let cap = statics.rows.dim(0)?;
        let visible = statics.rows.le(&pos.broadcast_as(cap)?)?;
        Ok(DecodeInputs {
            cos: cos_full.index_select(pos, 0)?,
            sin: sin_full.index_select(pos, 0)?,
            rows: pos
                .reshape((1, 1, 1))?
                .broadcast_as((kv_heads, 1, head_dim))?
                .contiguous()?,
            mask: visible.where_cond(&statics.zeros, &statics.neg_inf)?,
        })
    }
}

/// Smallest static capacity: one doubling covers a typical prompt plus a few hundred tokens.
pub const MIN_STATIC_CAPACITY: usize = 256;

#[derive(Debug, Clone)]
enum LayerKv {
    /// Token-major buffers and how many rows of them are filled.
    Grown { k: Tensor, v: Tensor, filled: usize },
    /// Head-major `[kv_heads, capacity, head_dim]` buffers; rows at or past the cache length are
    /// masked out by attention.
    Static { k: Tensor, v: Tensor },
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            len: 0,
            force_static: false,
            min_static: MIN_STATIC_CAPACITY,
            epoch: 0,
            statics: None,
        }
    }

    /// A cache that uses the static (GPU) layout on every device, starting at `min_capacity`
    /// rows — how the CPU tests reach the GPU attention path.
    pub fn new_static(num_layers: usize, min_capacity: usize) -> Self {
        KvCache {
            force_static: true,
            min_static: min_capacity.max(1),
            ..KvCache::new(num_layers)
        }
    }

    /// Whether attention on `device` uses the static layout.
    pub fn is_static_on(&self, device: &Device) -> bool {
        self.force_static || !device.is_cpu()
    }

    /// Static capacity (rows) of the layers allocated so far; 0 before the first append.
    pub fn static_capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .find_map(|l| match l {
                LayerKv::Static { k, .. } => k.dim(1).ok(),
                LayerKv::Grown { .. } => None,
            })
            .unwrap_or(0)
    }

    /// Changes whenever a static buffer is reallocated.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The decode-step constants for the current static capacity (made once per epoch).
    pub fn decode_statics(&mut self, dtype: DType, device: &Device) -> Result<DecodeStatics> {
        if let Some((epoch, st)) = &self.statics
            && *epoch == self.epoch
            && st.zeros.dtype() == dtype
        {
            return Ok(st.clone());
        }
        let cap = self.static_capacity();
        let st = DecodeStatics {
            rows: Tensor::arange(0u32, cap as u32, device)?,
            zeros: Tensor::zeros(cap, dtype, device)?,
            neg_inf: Tensor::from_vec(vec![f32::NEG_INFINITY; cap], cap, device)?
                .to_dtype(dtype)?,
        };
        self.statics = Some((self.epoch, st.clone()));
        Ok(st)
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Drops cached positions from `len` on (used to rewind a generation).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for layer in self.layers.iter_mut().flatten() {
            match layer {
                LayerKv::Grown { filled, .. } => *filled = len,
                // Rows past `len` become masked; the next writes overwrite them.
                LayerKv::Static { .. } => {}
            }
        }
        self.len = len;
        Ok(())
    }

    /// Bytes held by the cache (for memory accounting): allocated capacity, not just the filled
    /// part, because that is what the process holds.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                let (k, v) = match l {
                    LayerKv::Grown { k, v, .. } | LayerKv::Static { k, v } => (k, v),
                };
                ((k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()) as u64
            })
            .sum()
    }

    /// Appends token-major k, v `[T, kv_heads, head_dim]`; returns every cached position,
    /// `[total, kv_heads, head_dim]` in f32.
    fn append_token_major(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (t, nkv, d) = k.dims3()?;
        let k = k.to_dtype(DType::F32)?.contiguous()?;
        let v = v.to_dtype(DType::F32)?.contiguous()?;
        let entry = &mut self.layers[layer];
        let (filled, capacity) = match entry {
            Some(LayerKv::Grown { k, filled, .. }) => (*filled, k.dim(0)?),
            _ => (0, 0),
        };
        let total = filled + t;
        if total > capacity {
            let cap = total.next_power_of_two().max(64);
            let nk = Tensor::zeros((cap, nkv, d), DType::F32, k.device())?;
            let nv = Tensor::zeros((cap, nkv, d), DType::F32, k.device())?;
            if let Some(LayerKv::Grown { k: ok, v: ov, .. }) = entry.as_ref()
                && filled > 0
            {
                nk.slice_set(&ok.narrow(0, 0, filled)?.contiguous()?, 0, 0)?;
                nv.slice_set(&ov.narrow(0, 0, filled)?.contiguous()?, 0, 0)?;
            }
            *entry = Some(LayerKv::Grown {
                k: nk,
                v: nv,
                filled,
            });
        }
        let Some(LayerKv::Grown {
            k: bk,
            v: bv,
            filled: f,
        }) = entry.as_mut()
        else {
            unreachable!("a grown layer was just ensured")
        };
        // Writes land past every view handed out so far (those end at `filled`), so in-place
        // writes never change what an earlier step saw.
        bk.slice_set(&k, 0, filled)?;
        bv.slice_set(&v, 0, filled)?;
        *f = total;
        Ok((bk.narrow(0, 0, total)?, bv.narrow(0, 0, total)?))
    }

    /// Makes every static layer hold at least `rows` rows (zero-filled, history copied), so that
    /// a captured decode step can run to position `rows - 1` without a reallocation.
    /// `shape_of(layer)` gives `(kv_heads, head_dim, dtype, device)` for layers not yet allocated.
    pub fn reserve_static(
        &mut self,
        rows: usize,
        shape_of: impl Fn(usize) -> (usize, usize, DType, Device),
    ) -> Result<()> {
        for layer in 0..self.layers.len() {
            let (nkv, d, dtype, device) = shape_of(layer);
            self.ensure_static(layer, rows, nkv, d, dtype, &device)?;
        }
        Ok(())
    }

    fn ensure_static(
        &mut self,
        layer: usize,
        rows: usize,
        nkv: usize,
        d: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let have = match &self.layers[layer] {
            Some(LayerKv::Static { k, .. }) => k.dim(1)?,
            _ => 0,
        };
        if rows <= have {
            return Ok(());
        }
        let cap = rows.next_power_of_two().max(self.min_static);
        let nk = Tensor::zeros((nkv, cap, d), dtype, device)?;
        let nv = Tensor::zeros((nkv, cap, d), dtype, device)?;
        if let Some(LayerKv::Static { k, v }) = &self.layers[layer] {
            nk.slice_set(k, 1, 0)?;
            nv.slice_set(v, 1, 0)?;
        }
        self.layers[layer] = Some(LayerKv::Static { k: nk, v: nv });
        self.epoch += 1;
        Ok(())
    }

    /// Writes head-major k, v `[kv_heads, T, head_dim]` at rows `offset..offset + T` (growing
    /// the buffers if needed); returns the whole static buffers.
    fn write_static(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        offset: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (nkv, t, d) = k.dims3()?;
        self.ensure_static(layer, offset + t, nkv, d, k.dtype(), k.device())?;
        let Some(LayerKv::Static { k: bk, v: bv }) = &self.layers[layer] else {
            unreachable!("a static layer was just ensured")
        };
        bk.slice_set(&k.contiguous()?, 1, offset)?;
        bv.slice_set(&v.contiguous()?, 1, offset)?;
        Ok((bk.clone(), bv.clone()))
    }

    /// Writes one decode token's k, v `[kv_heads, 1, head_dim]` at the row given in device
    /// memory by `rows` (`[kv_heads, 1, head_dim]` u32, every entry the position). The buffers
    /// must already hold that row ([`KvCache::reserve_static`]); nothing here reads the
    /// position on the host, which is what makes the step capturable.
    fn write_static_at(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        rows: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let Some(LayerKv::Static { k: bk, v: bv }) = &self.layers[layer] else {
            return Err(candle_core::Error::Msg(format!(
                "layer {layer}: device-positioned write into a cache without static buffers"
            ))
            .into());
        };
        bk.scatter_set(rows, &k.contiguous()?, 1)?;
        bv.scatter_set(rows, &v.contiguous()?, 1)?;
        Ok((bk.clone(), bv.clone()))
    }

    /// Called once per forward, after every layer appended `n` new positions.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// Where a forward's positions come from.
pub enum Positions<'a> {
    /// The cache length, known on the host: RoPE rows for positions offset..offset+T.
    Host { cos: &'a Tensor, sin: &'a Tensor },
    /// One decode token whose position lives in device memory (static cache only).
    Device(&'a DecodeInputs),
}

/// Grouped-query self-attention with per-head q/k RMSNorm (Qwen3).
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// x: [T, hidden] for positions offset..offset+T; returns [T, hidden].
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        pos: &Positions,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let offset = cache.len();

        let q = self.q_proj.forward(x)?.reshape((t, nh, d))?;
        let k = self.k_proj.forward(x)?.reshape((t, nkv, d))?;
        let v = self.v_proj.forward(x)?.reshape((t, nkv, d))?;
        let q = self.q_norm.forward(&q)?;
        let k = self.k_norm.forward(&k)?;

        let (cos, sin) = match pos {
            Positions::Host { cos, sin } => (*cos, *sin),
            Positions::Device(dec) => (&dec.cos, &dec.sin),
        };
        if !cache.is_static_on(x.device()) {
            return self.attend_cpu(q, k, v, layer, cache, cos, sin, offset);
        }

        // [1, heads, T, D] for the rope kernel. With one token the head-major layout is the
        // token-major one, so a reshape (no copy) stands in for transpose + contiguous.
        let heads_first = |x: Tensor, heads: usize| -> Result<Tensor> {
            if t == 1 {
                Ok(x.reshape((1, heads, 1, d))?)
            } else {
                Ok(x.transpose(0, 1)?.unsqueeze(0)?.contiguous()?)
            }
        };
        let q = Rope::apply(&heads_first(q, nh)?, cos, sin)?.squeeze(0)?;
        let k = Rope::apply(&heads_first(k, nkv)?, cos, sin)?.squeeze(0)?;
        let v = heads_first(v, nkv)?.squeeze(0)?;
        let (k, v) = match pos {
            Positions::Host { .. } => cache.write_static(layer, &k, &v, offset)?,
            Positions::Device(dec) => cache.write_static_at(layer, &k, &v, &dec.rows)?,
        };
        let cap = k.dim(1)?;

        // Query head h reads kv head h / groups (HF's repeat_kv), so group the query heads of
        // one kv head into the rows of one matmul instead of copying K and V `groups` times.
        let groups = nh / nkv;
        let q = q.reshape((nkv, groups * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?; // [nkv, groups*T, capacity]
        let mask = match pos {
            Positions::Host { .. } => causal_mask(t, offset, cap, scores.dtype(), x.device())?,
            Positions::Device(dec) => dec.mask.reshape((1, cap))?,
        };
        let scores = scores
            .reshape((nkv, groups, t, cap))?
            .broadcast_add(&mask)?
            .reshape((nkv, groups * t, cap))?;
        // Softmax in f32, then back to the compute dtype (as HF's eager attention). candle's
        // CUDA softmax accumulates in f32 already, so there the casts are skipped.
        let probs = if x.device().is_cuda() {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
        };
        let ctx = probs.matmul(&v)?; // [nkv, groups*T, D]
        let ctx = ctx
            .reshape((nh, t, d))?
            .transpose(0, 1)?
            .reshape((t, nh * d))?;
        self.o_proj.forward(&ctx)
    }

    /// The CPU path: token-major throughout (rope on `[1, T, heads, D]`, the cache appended in
    /// place) and candle's fused CPU attention kernel, which handles GQA and the causal offset
    /// itself. It runs in f32 (bf16/f16 inputs are widened exactly), so in those dtypes it is at
    /// least as accurate as HF's eager attention, whose scores and probabilities are rounded to
    /// the compute dtype; the fidelity tests bound the difference.
    #[allow(clippy::too_many_arguments)]
    fn attend_cpu(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layer: usize,
        cache: &mut KvCache,
        cos: &Tensor,
        sin: &Tensor,
        offset: usize,
    ) -> Result<Tensor> {
        let (t, nh, d) = q.dims3()?;
        let dtype = q.dtype();
        let q = candle_nn::rotary_emb::rope_thd(&q.unsqueeze(0)?.contiguous()?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_thd(&k.unsqueeze(0)?.contiguous()?, cos, sin)?;
        let (k, v) = cache.append_token_major(layer, &k.squeeze(0)?, &v)?;
        let scale = 1.0 / (d as f32).sqrt();
        let ctx = candle_nn::attention::flash_attn::<f32>(
            &q.to_dtype(DType::F32)?,
            &k.unsqueeze(0)?,
            &v.unsqueeze(0)?,
            scale,
            candle_nn::attention::AttnMask::causal_with_offset(offset),
            None,
            None,
        )?; // [1, heads, T, D]
        let ctx = if t == 1 {
            ctx.reshape((1, nh * d))?
        } else {
            ctx.squeeze(0)?.transpose(0, 1)?.reshape((t, nh * d))?
        };
        self.o_proj.forward(&ctx.to_dtype(dtype)?)
    }
}

/// Additive mask [T, total]: query i (absolute position offset + i) sees keys 0..=offset + i.
fn causal_mask(
    t: usize,
    offset: usize,
    total: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, total), device)?.to_dtype(dtype)?)
}

/// The dense SwiGLU MLP: down(silu(gate(x)) * up(x)).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        self.down_proj.forward(&(silu(&g)? * u)?)
    }
}

/// SiLU computed in f32 for half types: PyTorch's CPU kernel upcasts, so rounding happens once.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 || x.device().is_cuda() {
        return Ok(candle_nn::ops::silu(x)?);
    }
    Ok(candle_nn::ops::silu(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?)
}

/// Row-wise argmax of a [N, V] f32 tensor; ties go to the lowest index (as torch.argmax).
pub fn argmax_last(x: &Tensor) -> Result<Vec<u32>> {
    let rows: Vec<Vec<f32>> = x.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows.iter().map(|r| argmax(r) as u32).collect())
}

pub fn argmax(r: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in r.iter().enumerate() {
        if v > r[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grown_kv_cache_keeps_every_row_across_regrowth_and_rewind() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1);
        let row = |i: usize| Tensor::full(i as f32, (1, 2, 3), &dev).unwrap();
        // A 5-token prefill, then single tokens past the first capacity (64) and the second.
        let prefill = Tensor::cat(&(0..5).map(row).collect::<Vec<_>>(), 0).unwrap();
        cache.append_token_major(0, &prefill, &prefill).unwrap();
        cache.advance(5);
        let mut last = None;
        for i in 5..150 {
            let r = row(i).to_dtype(DType::BF16).unwrap();
            last = Some(cache.append_token_major(0, &r, &r).unwrap());
            cache.advance(1);
        }
        let (k, v) = last.unwrap();
        assert_eq!(k.dims(), &[150, 2, 3]);
        assert_eq!(k.dtype(), DType::F32, "stored widened, exactly");
        let firsts: Vec<f32> = k
            .narrow(2, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = (0..150).flat_map(|i| [i as f32; 2]).collect();
        assert_eq!(firsts, want);
        assert_eq!(k.to_vec3::<f32>().unwrap(), v.to_vec3::<f32>().unwrap());
        assert_eq!(
            cache.bytes(),
            2 * 256 * 2 * 3 * 4,
            "capacity is what is held"
        );

        // Rewind to 10 and append: position 10 is overwritten, the rows before it are kept.
        cache.truncate(10).unwrap();
        let (k2, _) = cache.append_token_major(0, &row(999), &row(999)).unwrap();
        assert_eq!(k2.dim(0).unwrap(), 11);
        assert_eq!(
            k2.get(10)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0],
            999.0
        );
        assert_eq!(
            k2.get(9)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0],
            9.0
        );
    }

    #[test]
    fn rope_inverse_frequencies_match_hf_formula() {
        let r = Rope::new(128, 1e6);
        assert_eq!(
            r.inv_freq.len(),
            64,
            "one frequency per pair over the full head_dim"
        );
        assert_eq!(r.inv_freq[0], 1.0);
        let last = 1.0f32 / 1e6f32.powf(126.0 / 128.0);
        assert_eq!(r.inv_freq[63], last);
    }

    #[test]
    fn rope_rotates_halves() {
        // head_dim 4: pairs (x0, x2) and (x1, x3) rotate by p*f0 and p*f1.
        let r = Rope::new(4, 10000.0);
        let (cos, sin) = r.tables(1, 1, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::new(&[[[[1f32, 0., 0., 0.]]]], &Device::Cpu).unwrap();
        let y: Vec<f32> = Rope::apply(&x, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((y[0] - 1f32.cos()).abs() < 1e-6);
        assert!((y[2] - 1f32.sin()).abs() < 1e-6);
        assert_eq!(y[1], 0.0);
    }

    #[test]
    fn rms_norm_matches_definition_in_bf16_and_f32() {
        let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 0.5, 2., 1.], &Device::Cpu).unwrap();
        let n = RmsNorm::new(w.clone(), 1e-6).unwrap();
        let y: Vec<f32> = n
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rms = ((1. + 4. + 9. + 16.) / 4.0f32 + 1e-6).sqrt();
        let want = [1. / rms, 2. / rms * 0.5, 3. / rms * 2., 4. / rms];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
        let nb = RmsNorm::new(w.to_dtype(DType::BF16).unwrap(), 1e-6).unwrap();
        let yb: Vec<f32> = nb
            .forward(&x.to_dtype(DType::BF16).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in yb.iter().zip(want) {
            assert!((a - b).abs() < 1e-2);
        }
    }

    #[test]
    fn causal_mask_respects_offset() {
        let m: Vec<Vec<f32>> = causal_mask(2, 3, 5, DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(m[0][3], 0.0);
        assert_eq!(m[0][4], f32::NEG_INFINITY);
        assert_eq!(m[1][4], 0.0);
    }

    #[test]
    fn argmax_ties_pick_lowest() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }
}
