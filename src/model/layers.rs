//! The small building blocks of the Qwen3-MoE decoder: RMSNorm, NeoX RoPE, linear layers,
//! grouped-query attention with a KV cache, and the dense SwiGLU MLP.
//!
//! Written here rather than borrowed because candle-transformers keeps its attention types
//! crate-private, and because each block must follow HF's numerics (where it casts, where it
//! accumulates in f32) for the fidelity tests to hold in every dtype.

use candle_core::{DType, Device, Tensor};

use super::config::RopeScaling;
use super::error::Result;
pub use super::kv_cache::{DecodeInputs, KvCache};

/// x·Wᵀ (+ b) for x of shape [T, in] and W of shape [out, in].
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    pub bias: Option<Tensor>,
}

/// A linear layer's matrix: dense in the compute dtype, or kept in a GGUF file's block format
/// and multiplied as it is — as llama.cpp does, its f32 activations rounded to 8-bit blocks.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Quantized {
        matmul: candle_core::quantized::QMatMul,
        /// Bytes held (the block format).
        bytes: u64,
    },
    /// A block-scaled FP8 matrix (see `fp8.rs`), dequantised inside its product.
    Fp8(super::fp8::Fp8Matrix),
    /// A GGUF matrix in a table-coded type candle does not read (IQ4_XS, IQ4_NL, MXFP4; see
    /// `lut4.rs`), held as stored on the CPU and decoded inside its product. Why not widened at
    /// load: an IQ4_XS file's attention then took 7.5× its bytes in f32, and a decode step read
    /// them all (BENCHMARKS.md §88).
    Lut4(super::lut4::Lut4Matrix),
    /// The same on a GPU in bf16 compute: the blocks as stored (U8 `[rows, row bytes]`), read by
    /// the decode kernels (`attn_decode.rs`), widened to bf16 for a prompt's product — each
    /// weight the exact value rounded once, what the matrix widened at load held.
    Lut4Device {
        blocks: Tensor,
        format: super::lut4::Lut4,
        dims: [usize; 2],
    },
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: LinearWeight::Dense(weight),
            bias,
        }
    }

    pub fn with_weight(weight: LinearWeight, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => super::cpu_gemv::matmul_t(x, w)?,
            LinearWeight::Quantized { matmul, .. } => {
                if let Some(mut ys) = quantized_rows(x, &[matmul])? {
                    ys.remove(0)
                } else {
                    super::quant_rows::product(matmul, &x.to_dtype(DType::F32)?)?
                        .to_dtype(x.dtype())?
                }
            }
            LinearWeight::Fp8(m) => as_rows(x, m.dims()[0], |x| m.forward(x))?,
            LinearWeight::Lut4(m) => as_rows(x, m.dims()[0], |x| m.forward(x))?,
            LinearWeight::Lut4Device {
                blocks,
                format,
                dims,
            } => super::cpu_gemv::matmul_t(x, &lut4_device_dense(blocks, *format, *dims)?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// `forward` of several layers on the same x: dense matrices on the CPU in one product
    /// (`cpu_gemv::narrow_matmul_t_many`: one trip through the pool instead of one each, the
    /// same bits), anything else one layer at a time.
    pub fn forward_many(x: &Tensor, layers: &[&Linear]) -> Result<Vec<Tensor>> {
        let dense: Option<Vec<&Tensor>> = layers
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Dense(w) => Some(w),
                _ => None,
            })
            .collect();
        if let Some(ys) = dense.and_then(|ws| super::cpu_gemv::narrow_matmul_t_many(x, &ws)) {
            return ys?
                .into_iter()
                .zip(layers)
                .map(|(y, l)| {
                    Ok(match &l.bias {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    })
                })
                .collect();
        }
        // Block-quantized matrices with no bias: one trip, candle's bits.
        let quantized: Option<Vec<&candle_core::quantized::QMatMul>> =
            layers.iter().map(|l| l.quantized_unbiased()).collect();
        if let Some(ys) = quantized
            .map(|q| quantized_rows(x, &q))
            .transpose()?
            .flatten()
        {
            return Ok(ys);
        }
        layers.iter().map(|l| l.forward(x)).collect()
    }

    /// The matrix, when it is dense and there is no bias (what the GPU decode kernels take).
    pub fn dense_unbiased(&self) -> Option<&Tensor> {
        match (&self.weight, &self.bias) {
            (LinearWeight::Dense(w), None) => Some(w),
            _ => None,
        }
    }

    /// The matrix, when it is kept in a GGUF file's block format and there is no bias (the GPU
    /// decode kernels read the blocks where their type is one the kernels decode).
    pub fn quantized_unbiased(&self) -> Option<&candle_core::quantized::QMatMul> {
        match (&self.weight, &self.bias) {
            (LinearWeight::Quantized { matmul, .. }, None) => Some(matmul),
            _ => None,
        }
    }

    /// The matrix, when it is block-scaled FP8 and there is no bias (the GPU decode kernels'
    /// FP8 form).
    pub fn fp8_unbiased(&self) -> Option<&super::fp8::Fp8Matrix> {
        match (&self.weight, &self.bias) {
            (LinearWeight::Fp8(m), None) => Some(m),
            _ => None,
        }
    }

    /// The blocks, type and [rows, cols] of a table-coded matrix on a GPU with no bias (the
    /// decode kernels read them as they read other GGUF blocks).
    pub fn lut4_device_unbiased(&self) -> Option<(&Tensor, super::lut4::Lut4, [usize; 2])> {
        match (&self.weight, &self.bias) {
            (
                LinearWeight::Lut4Device {
                    blocks,
                    format,
                    dims,
                },
                None,
            ) => Some((blocks, *format, *dims)),
            _ => None,
        }
    }

    /// Bytes the layer holds (weight and bias).
    pub fn bytes(&self) -> u64 {
        let t = |x: &Tensor| (x.elem_count() * x.dtype().size_in_bytes()) as u64;
        let w = match &self.weight {
            LinearWeight::Dense(w) => t(w),
            LinearWeight::Quantized { bytes, .. } => *bytes,
            LinearWeight::Fp8(m) => m.bytes(),
            LinearWeight::Lut4(m) => m.bytes(),
            LinearWeight::Lut4Device { blocks, .. } => blocks.elem_count() as u64,
        };
        w + self.bias.as_ref().map(t).unwrap_or(0)
    }
}

/// `forward` of x's tokens (its rows of the matrices' width, on the CPU) through block-quantized
/// matrices, all their rows in one trip through the pool with candle's own arithmetic
/// (`quant_rows::stacked_product`: `QMatMul::forward`'s bits), each output shaped as x with the
/// matrix's rows last, in x's dtype. None where that does not apply (a float matrix or one
/// candle repacks in a layout `quant_rows` does not reproduce, another device): candle's
/// product then.
fn quantized_rows(
    x: &Tensor,
    matmuls: &[&candle_core::quantized::QMatMul],
) -> Result<Option<Vec<Tensor>>> {
    use candle_core::quantized::QMatMul;
    let k = x.dims().last().copied().unwrap_or(0);
    if !x.device().is_cpu() || matmuls.is_empty() || x.rank() < 2 || k == 0 {
        return Ok(None);
    }
    let tokens = x.elem_count() / k;
    let Some(qs) = matmuls
        .iter()
        .map(|m| match m {
            QMatMul::QTensor(q) if super::quant_rows::takes(q, tokens) => Some(q.as_ref()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(None);
    };
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let Some(ys) = super::quant_rows::stacked_product(&qs, |_| &xs) else {
        return Ok(None);
    };
    ys.into_iter()
        .zip(&qs)
        .map(|(y, q)| {
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = q.shape().dims2()?.0;
            }
            Ok(Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())?)
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// `product` of x's rows: the FP8 and table-coded kernels take [rows, in] activations, so any
/// leading dims of x are flattened into rows and restored around the `out` columns.
fn as_rows(
    x: &Tensor,
    out: usize,
    product: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = dims.pop().unwrap_or(1);
    let y = product(&x.reshape(((), k))?)?;
    dims.push(out);
    Ok(y.reshape(dims)?)
}

/// A table-coded matrix's blocks on a GPU widened to a bf16 [rows, cols] matrix.
#[cfg(feature = "cuda")]
fn lut4_device_dense(
    blocks: &Tensor,
    format: super::lut4::Lut4,
    [rows, cols]: [usize; 2],
) -> Result<Tensor> {
    let ids = Tensor::arange(0u32, rows as u32, blocks.device())?;
    super::moe_decode::block_rows_bf16(
        blocks,
        super::safetensors_file::StDtype::Lut4(format),
        cols,
        &ids,
    )
}

#[cfg(not(feature = "cuda"))]
fn lut4_device_dense(_: &Tensor, format: super::lut4::Lut4, dims: [usize; 2]) -> Result<Tensor> {
    Err(super::error::ModelError::Input(format!(
        "a {format} matrix {dims:?} on a GPU needs a build with the cuda feature"
    )))
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

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f32 {
        self.eps
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        // On the GPU the fused kernel (it accumulates in f32) saves three launches per norm,
        // which is what batch-1 decode is bound by.
        if x.dtype() == DType::F32 || x.device().is_cuda() {
            return Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?);
        }
        if let Some(y) = self.forward_cpu_half(&x) {
            return y;
        }
        let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &self.ones_f32, self.eps)?;
        Ok(normed.to_dtype(x.dtype())?.broadcast_mul(&self.weight)?)
    }
}

impl RmsNorm {
    /// [`RmsNorm::forward`]'s bf16 and f16 path on the CPU in one pass over plain vectors
    /// instead of four tensor ops (widen, norm, round, scale), with their arithmetic: the sum of
    /// squares in f32 in order, `x / rms` in f32 rounded to the dtype, then `* weight` in the
    /// dtype. At batch 1 on a small model the ops' dispatch costs more than the arithmetic. None
    /// for any other case.
    fn forward_cpu_half(&self, x: &Tensor) -> Option<Result<Tensor>> {
        let n = self.weight.dim(0).ok()?;
        let dtype = x.dtype();
        if !x.device().is_cpu()
            || !matches!(dtype, DType::BF16 | DType::F16)
            || self.weight.dtype() != dtype
            || x.dims().last() != Some(&n)
            || n == 0
        {
            return None;
        }
        Some((|| {
            let xs = super::cpu_gemv::widened(x)?;
            let w = super::cpu_gemv::widened(&self.weight)?;
            // One copy of the loop per dtype, so the bf16 one vectorises.
            let y = if dtype == DType::BF16 {
                normed_rows(&xs, &w, self.eps, super::cpu_gemv::round_bf16)
            } else {
                normed_rows_f16(&xs, &w, self.eps)
            };
            // The values are the dtype's already: narrowing them is exact.
            Ok(super::cpu_gemv::narrowed(y, x.shape(), dtype)?)
        })())
    }
}

/// [`normed_rows`] in f16: F16C's rounding (half's, on such a CPU) compiled into the loop.
fn normed_rows_f16(xs: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_gemv::f16c() {
        /// # Safety
        /// The CPU has F16C.
        #[target_feature(enable = "f16c")]
        unsafe fn rows(xs: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
            // SAFETY: this function requires F16C.
            normed_rows(xs, w, eps, |v| unsafe {
                super::cpu_gemv::round_f16_f16c(v)
            })
        }
        // SAFETY: F16C was detected on this CPU.
        return unsafe { rows(xs, w, eps) };
    }
    normed_rows(xs, w, eps, |v| half::f16::from_f32(v).to_f32())
}

/// Each row of `xs` (rows of `w.len()`) over its root mean square, then scaled by `w`, each
/// step rounded by `round` (see [`RmsNorm::forward_cpu_half`]).
#[inline(always)]
fn normed_rows(xs: &[f32], w: &[f32], eps: f32, round: impl Fn(f32) -> f32) -> Vec<f32> {
    let n = w.len();
    let mut y = Vec::with_capacity(xs.len());
    for row in xs.chunks_exact(n) {
        let sum2 = row.iter().map(|&v| v * v).sum::<f32>();
        let rms = (sum2 / n as f32 + eps).sqrt();
        y.extend(row.iter().zip(w).map(|(&v, &w)| round(round(v / rms) * w)));
    }
    y
}

/// Standard (NeoX, rotate-half) RoPE over the full head_dim. For text-only input HF's
/// interleaved M-RoPE produces exactly these angles, because its three position streams are equal.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// cos and sin times this (YaRN's attention factor; 1 otherwise).
    scale: Option<f32>,
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
            scale: None,
            table: Default::default(),
        }
    }

    /// RoPE as the config asks for it: plain, or stretched by [`RopeScaling`], each step in
    /// transformers' float32 (or, where it computes in Python, float64) arithmetic and order.
    pub fn for_config(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        let mut rope = Rope::new(head_dim, theta);
        match scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                let f = *factor as f32;
                rope.inv_freq.iter_mut().for_each(|v| *v /= f);
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                attention_factor,
                beta_fast,
                beta_slow,
                truncate,
            }) => {
                let dim = head_dim as f64;
                let correction_dim = |rotations: f64| {
                    dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001; // transformers' guard against a zero-width ramp
                }
                let (lo, span) = (low as f32, (high - low) as f32);
                let f = *factor as f32;
                let base = theta as f32;
                for (j, v) in rope.inv_freq.iter_mut().enumerate() {
                    let pos_freq = base.powf((2 * j) as f32 / head_dim as f32);
                    let extrapolation = 1.0f32 / pos_freq;
                    let interpolation = 1.0f32 / (f * pos_freq);
                    let ramp = ((j as f32 - lo) / span).clamp(0.0, 1.0);
                    let keep = 1.0f32 - ramp;
                    *v = interpolation * (1.0f32 - keep) + extrapolation * keep;
                }
                rope.scale = Some(*attention_factor as f32);
            }
        }
        rope
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
                match self.scale {
                    None => {
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                    Some(m) => {
                        cos.push(a.cos() * m);
                        sin.push(a.sin() * m);
                    }
                }
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
    /// A one-token GPU decode step runs moescope's attention kernels (`attn_decode.rs`);
    /// off: candle's ops, for comparisons.
    pub attn_kernel: bool,
}

impl Attention {
    /// `residual + self.forward(x)`: through moescope's attention kernels where they apply (a
    /// device-positioned bf16 decode step on the GPU, the add folded into o_proj's output),
    /// else candle's ops and an add — the add's bits are the same either way.
    pub fn forward_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        pos: &Positions,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Positions::Device(dec), true, true) = (pos, self.attn_kernel, x.device().is_cuda())
            && let Some(y) = super::attn_decode::try_forward(self, x, residual, layer, cache, dec)?
        {
            return Ok(y);
        }
        Ok(super::cpu_gemv::add(
            residual,
            &self.forward(x, layer, cache, pos)?,
        )?)
    }

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

        let [q, k, v]: [Tensor; 3] =
            Linear::forward_many(x, &[&self.q_proj, &self.k_proj, &self.v_proj])?
                .try_into()
                .map_err(|_| super::error::ModelError::Input("three projections".into()))?;
        let q = q.reshape((t, nh, d))?;
        let k = k.reshape((t, nkv, d))?;
        let v = v.reshape((t, nkv, d))?;
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
        let ctx = match pos {
            Positions::Host { .. } => {
                attend_static_prompt(&q, &k, &v, nkv, offset, PROMPT_SCORE_BYTES)?
            }
            Positions::Device(dec) => attend_static_masked(&q, &k, &v, nkv, &dec.mask)?,
        };
        self.o_proj.forward(&ctx)
    }

    /// The CPU path: token-major throughout (rope on `[1, T, heads, D]`, the cache appended in
    /// place), then moescope's attention over the f32 cache (`cpu_attention`: one token, or a
    /// prompt), or else candle's fused CPU attention kernel, which handles GQA and the causal
    /// offset itself. It runs in f32 (bf16/f16 inputs are widened exactly), so in those dtypes it is at
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
        // One decode token: moescope's two-pass attention (`cpu_attention`), not candle's
        // online-softmax loop.
        if t == 1
            && let Some(ctx) = super::cpu_attention::attend_one(&q, &k, &v, scale)?
        {
            return self.o_proj.forward(&ctx.to_dtype(dtype)?);
        }
        if let Some(ctx) = super::cpu_attention::attend_prompt(&q, &k, &v, scale, offset)? {
            return self.o_proj.forward(&ctx.to_dtype(dtype)?);
        }
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

/// Attention of `t` query rows at positions offset.. over a static cache whose first
/// offset + t rows they may see, in chunks of query rows: chunk [i0, i1) reads only keys
/// 0..offset + i1 (the causal triangle, not the whole capacity) and its scores stay under
/// `score_bytes` ([`PROMPT_SCORE_BYTES`] in the model). Why: over the whole capacity a
/// 4,000-token prompt's scores were a [32 · 4,000, 4,096] matrix a layer (1 GiB in bf16,
/// several alive at once) — a memory peak the Thor cannot spare — and every row read every
/// row of the capacity (BENCHMARKS.md §54).
/// q `[nh, T, D]` (normalised, rotated), k and v `[nkv, capacity, D]`; returns `[T, nh·D]`.
fn attend_static_prompt(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    nkv: usize,
    offset: usize,
    score_bytes: usize,
) -> candle_core::Result<Tensor> {
    let (nh, t, d) = q.dims3()?;
    let groups = nh / nkv;
    let scale = 1.0 / (d as f64).sqrt();
    // Rows token-major within a kv head ([nkv, T · groups, D], row i · groups + g is token
    // i's query head g of the group), so a chunk of tokens is a contiguous run of rows of one
    // matmul per kv head — query head h reads kv head h / groups (HF's repeat_kv) without
    // copying K and V `groups` times.
    let q = if t == 1 {
        q.reshape((nkv, groups, d))?
    } else {
        q.reshape((nkv, groups, t, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((nkv, t * groups, d))?
    };
    let seen_all = offset + t;
    let row_bytes = nh * seen_all * q.dtype().size_in_bytes();
    let chunk = (score_bytes / row_bytes.max(1)).clamp(1, t);
    let mut parts = Vec::with_capacity(t.div_ceil(chunk));
    let mut i0 = 0;
    while i0 < t {
        let c = chunk.min(t - i0);
        let seen = offset + i0 + c;
        let (kc, vc) = (k.narrow(1, 0, seen)?, v.narrow(1, 0, seen)?);
        let qc = q.narrow(1, i0 * groups, c * groups)?;
        let scores = (qc.matmul(&kc.t()?)? * scale)?; // [nkv, c · groups, seen]
        if c > 1 {
            // Every row of the chunk sees keys 0..offset + i0; only the chunk's own c keys
            // (the last columns) take the causal mask — added there alone, in place, rather
            // than over the whole [c, seen] (a broadcast add over a layer's scores was 18 % of
            // a 4,000-token prefill on an H200).
            let tail = scores.narrow(2, seen - c, c)?.contiguous()?;
            let mask = causal_mask(c, 0, c, scores.dtype(), q.device())?;
            let tail = tail
                .reshape((nkv, c, groups, c))?
                .broadcast_add(&mask.unsqueeze(1)?)?
                .reshape((nkv, c * groups, c))?;
            scores.slice_set(&tail, 2, seen - c)?;
        }
        parts.push(softmax_probs(&scores)?.matmul(&vc)?); // [nkv, c · groups, D]
        i0 += c;
    }
    let ctx = if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(&parts, 1)?
    };
    // [nkv, T, groups, D] → [T, nh · D] (head h = kv head · groups + g).
    ctx.reshape((nkv, t, groups, d))?
        .transpose(0, 1)?
        .reshape((t, nh * d))
}

/// A device-positioned step (one token, positions known only on the device, so that the
/// step can be captured): attention over the whole capacity with the step's additive mask
/// `[capacity]` hiding the rows past its position — the path of the kernels' comparisons
/// (`attn_kernel` off). q `[nh, 1, D]`; returns `[1, nh·D]`.
fn attend_static_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    nkv: usize,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let (nh, t, d) = q.dims3()?;
    let groups = nh / nkv;
    let cap = k.dim(1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let q = q.reshape((nkv, groups * t, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?; // [nkv, groups·T, capacity]
    let scores = scores
        .reshape((nkv, groups, t, cap))?
        .broadcast_add(&mask.reshape((1, cap))?)?
        .reshape((nkv, groups * t, cap))?;
    let ctx = softmax_probs(&scores)?.matmul(v)?; // [nkv, groups·T, D]
    ctx.reshape((nh, t, d))?
        .transpose(0, 1)?
        .reshape((t, nh * d))
}

/// The most bytes one chunk of a prompt's attention scores may take on a static cache
/// (`attend_static_prompt`): 32 query heads over 4,096 keys in bf16 make chunks of
/// 512 tokens.
const PROMPT_SCORE_BYTES: usize = 128 << 20;

/// Softmax of scores over their last dimension, in f32, returned in the scores' dtype (as HF's
/// eager attention). candle's CUDA softmax accumulates in f32 already, so there the casts are
/// skipped.
fn softmax_probs(scores: &Tensor) -> candle_core::Result<Tensor> {
    if scores.device().is_cuda() {
        candle_nn::ops::softmax_last_dim(scores)
    } else {
        candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(scores.dtype())
    }
}

/// Additive mask [T, total]: query i (absolute position offset + i) sees keys 0..=offset + i —
/// 0 there, -inf after. Built where the scores are, from two index ranges: made on the host it
/// cost 66 ms a layer for a 4,000-token prompt over 4,096 rows (16 M values, then their upload).
fn causal_mask(
    t: usize,
    offset: usize,
    total: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let last_seen = Tensor::arange(offset as u32, (offset + t) as u32, device)?.reshape((t, 1))?;
    let keys = Tensor::arange(0u32, total as u32, device)?.reshape((1, total))?;
    let seen = keys.broadcast_le(&last_seen)?;
    let zero = Tensor::zeros((), dtype, device)?.broadcast_as((t, total))?;
    let hidden = Tensor::new(f32::NEG_INFINITY, device)?
        .to_dtype(dtype)?
        .broadcast_as((t, total))?;
    seen.where_cond(&zero, &hidden)
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

/// Index of the largest value, the lowest index on ties. NaN-aware (IEEE total order: a NaN is
/// above every number), so a NaN logit is picked — and noticed — rather than stepped over.
///
/// Two passes over integer keys (the bits ordered as `f32::total_cmp` orders the values): the
/// largest key, then its first index. Why: a scan carrying the best index through `total_cmp`
/// took ~190 µs over a 151,936-token vocabulary on the build machine — a tenth or more of a
/// 12-layer GPU decode step, spent on the host between two steps — and this ~55 µs.
pub fn argmax(r: &[f32]) -> usize {
    let top = r.iter().fold(i32::MIN, |m, &v| m.max(order_key(v)));
    r.iter().position(|&v| order_key(v) == top).unwrap_or(0)
}

/// [`argmax`] of a row that must hold numbers: `None` when any value is NaN (of either sign —
/// x86 makes negative ones, which the total order puts below every number, so the pick alone
/// would step over them) or +∞, or when the row is empty. One pass, as `argmax`'s: its keys
/// rotated so that negative NaNs come above +∞ and every number keeps its place, so the largest
/// key says both which value is largest and whether anything is not a number. Why not a second
/// reduction for the smallest key: on baseline x86-64 it cost 16 µs over a 151,936-token row
/// (36 → 52 µs), a step of a 12-layer GPU decode being ~1 ms; the rotation costs ~3.5.
pub fn argmax_of_numbers(r: &[f32]) -> Option<usize> {
    let key = |v: f32| order_key(v).wrapping_sub(0x007F_FFFF);
    let top = r.iter().fold(i32::MIN, |m, &v| m.max(key(v)));
    if r.is_empty() || top >= key(f32::INFINITY) {
        return None;
    }
    r.iter().position(|&v| key(v) == top)
}

/// An integer that orders as `f32::total_cmp` orders the value.
#[inline]
fn order_key(v: f32) -> i32 {
    let b = v.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The bf16 and f16 CPU passes give the bits of the tensor ops they stand for (widen,
    /// candle's f32 norm, round, scale in the dtype), over rows of mixed magnitudes, one and many.
    #[test]
    fn half_rms_norm_pass_is_the_tensor_ops_bit_for_bit() {
        for (dtype, (rows, n)) in [DType::BF16, DType::F16]
            .into_iter()
            .flat_map(|d| [(1usize, 256usize), (4, 64), (40, 48), (3, 7)].map(|s| (d, s)))
        {
            let x = crate::util::test_matrix(rows, n, 5, 131, 0.37)
                .to_dtype(dtype)
                .unwrap();
            let w = crate::util::test_matrix(1, n, 9, 17, 0.11)
                .affine(1.0, 1.0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let norm = RmsNorm::new(w.clone(), 1e-6).unwrap();
            let got = norm.forward(&x).unwrap();
            let ones = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
            let want = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32).unwrap(), &ones, 1e-6)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .broadcast_mul(&w)
                .unwrap();
            let bits = crate::util::f32_bits;
            assert_eq!(got.dtype(), dtype);
            assert_eq!(got.dims(), want.dims());
            assert_eq!(bits(&got), bits(&want), "{dtype:?} {rows} × {n}");
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

    /// Every entry is the definition's, in every dtype the model computes in (the values are
    /// exactly 0 and -inf in each).
    /// GQA causal attention in f64, query head h on kv head h / (nh / nkv), query row i at
    /// position offset + i seeing keys 0..=offset + i.
    fn attention_f64(
        q: &[Vec<Vec<f32>>],
        k: &[Vec<Vec<f32>>],
        v: &[Vec<Vec<f32>>],
        offset: usize,
    ) -> Vec<Vec<f64>> {
        let (nh, t, d) = (q.len(), q[0].len(), q[0][0].len());
        let groups = nh / k.len();
        let mut out = vec![vec![0f64; nh * d]; t];
        for h in 0..nh {
            let g = h / groups;
            for i in 0..t {
                let seen = offset + i + 1;
                let s: Vec<f64> = (0..seen)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[h][i][c] as f64 * k[g][j][c] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[i][h * d + c] = (0..seen).map(|j| e[j] / z * v[g][j][c] as f64).sum();
                }
            }
        }
        out
    }

    #[test]
    fn static_prompt_attention_reads_only_the_causal_triangle_in_any_chunking() {
        let (nh, nkv, d, cap) = (6, 2, 8, 24);
        let mut seed = 0x2545_f491u32;
        let mut rand = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        };
        for (offset, t) in [(0, 1), (0, 7), (5, 1), (5, 9), (3, 21)] {
            let q: Vec<Vec<Vec<f32>>> = (0..nh)
                .map(|_| (0..t).map(|_| (0..d).map(|_| rand()).collect()).collect())
                .collect();
            // Rows past offset + t are NaN: reading any of them would poison the result.
            let mut kv = |_| -> Vec<Vec<f32>> {
                (0..cap)
                    .map(|j| {
                        (0..d)
                            .map(|_| if j < offset + t { rand() } else { f32::NAN })
                            .collect()
                    })
                    .collect()
            };
            let k: Vec<Vec<Vec<f32>>> = (0..nkv).map(&mut kv).collect();
            let v: Vec<Vec<Vec<f32>>> = (0..nkv).map(&mut kv).collect();
            let want = attention_f64(&q, &k, &v, offset);
            let flat = |x: &[Vec<Vec<f32>>]| -> Vec<f32> {
                x.iter().flatten().flatten().copied().collect()
            };
            let qt = Tensor::from_vec(flat(&q), (nh, t, d), &Device::Cpu).unwrap();
            let kt = Tensor::from_vec(flat(&k), (nkv, cap, d), &Device::Cpu).unwrap();
            let vt = Tensor::from_vec(flat(&v), (nkv, cap, d), &Device::Cpu).unwrap();
            // One query row a chunk, three, and the whole prompt in one.
            for score_bytes in [1, 3 * nh * (offset + t) * 4, usize::MAX / 2] {
                let got: Vec<Vec<f32>> =
                    attend_static_prompt(&qt, &kt, &vt, nkv, offset, score_bytes)
                        .unwrap()
                        .to_vec2()
                        .unwrap();
                for i in 0..t {
                    for c in 0..nh * d {
                        let (g, w) = (got[i][c] as f64, want[i][c]);
                        assert!(
                            (g - w).abs() <= 2e-6 * (1.0 + w.abs()),
                            "offset {offset} t {t} bytes {score_bytes} [{i}][{c}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn causal_mask_is_the_definition() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (t, offset, total) in [(1, 0, 1), (3, 0, 8), (4, 5, 16), (7, 9, 16), (1, 255, 256)]
            {
                let m = causal_mask(t, offset, total, dtype, &Device::Cpu).unwrap();
                assert_eq!(m.dims(), [t, total]);
                assert_eq!(m.dtype(), dtype);
                let m: Vec<Vec<f32>> = m.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
                for (i, row) in m.iter().enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        let want = if j > offset + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        };
                        assert_eq!(
                            v.to_bits(),
                            want.to_bits(),
                            "{dtype:?} t {t} offset {offset} [{i}][{j}]"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn argmax_of_numbers_refuses_nan_of_either_sign_and_plus_infinity() {
        let some = |r: &[f32]| argmax_of_numbers(r);
        assert_eq!(some(&[1.0, 3.0, 3.0, f32::NEG_INFINITY]), Some(1));
        assert_eq!(some(&[-2.0, -1.0]), Some(1));
        assert_eq!(some(&[f32::NEG_INFINITY]), Some(0));
        assert_eq!(some(&[-0.0, 0.0, -0.0]), Some(1));
        assert_eq!(some(&[f32::MAX, f32::MIN]), Some(0));
        assert_eq!(some(&[]), None);
        let negative_nan = f32::from_bits(0xFFC0_0000);
        assert!(negative_nan.is_nan() && negative_nan.is_sign_negative());
        // Quiet and signalling, either sign, the extremes of the payloads.
        let nans = [0x7F80_0001u32, 0x7FFF_FFFF, 0xFF80_0001, 0xFFFF_FFFF].map(f32::from_bits);
        for bad in [f32::NAN, negative_nan, f32::INFINITY]
            .into_iter()
            .chain(nans)
        {
            for at in 0..3 {
                let mut r = vec![0.5f32, 2.0, -1.0];
                r[at] = bad;
                assert_eq!(some(&r), None, "{:#x} at {at}", bad.to_bits());
            }
        }
        // Where it answers, it answers as argmax does (ties, signed zeros, the extremes).
        let mut state = 7u32;
        for _ in 0..2000 {
            let row: Vec<f32> = (0..17)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    let v = f32::from_bits(state);
                    if v.is_nan() || v == f32::INFINITY {
                        -0.0
                    } else {
                        v
                    }
                })
                .collect();
            assert_eq!(some(&row), Some(argmax(&row)), "{row:?}");
        }
    }

    #[test]
    fn argmax_ties_pick_lowest() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    /// The key passes pick what a scan in `f32::total_cmp` order picks (ties to the lowest
    /// index; NaN above everything, a negative NaN below; +0 above −0).
    #[test]
    fn argmax_is_the_total_order_scan() {
        let scan = |r: &[f32]| {
            let mut best = 0;
            for (i, v) in r.iter().enumerate() {
                if v.total_cmp(&r[best]).is_gt() {
                    best = i;
                }
            }
            best
        };
        let neg_nan = f32::from_bits(0xFFC0_0000);
        let cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NEG_INFINITY],
            vec![-0.0, 0.0, -0.0],
            vec![0.0, -0.0],
            vec![1.0, f32::NAN, 2.0, f32::NAN],
            vec![neg_nan, f32::NEG_INFINITY, -1.0],
            vec![neg_nan, neg_nan],
            vec![-3.0, -1.0, -1.0, -2.0],
            vec![f32::INFINITY, 1e38, f32::INFINITY],
            (0..151_936)
                .map(|i| ((i as f32 * 0.37).sin() * 10.0).round() / 4.0)
                .collect(),
        ];
        for r in &cases {
            assert_eq!(argmax(r), scan(r), "{:?}", &r[..r.len().min(6)]);
        }
    }
}
