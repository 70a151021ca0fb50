//! The forward pass's ports: what the MoE block asks of whoever supplies expert weights
//! ([`ExpertProvider`]) and tells whoever watches routing ([`RoutingObserver`]).
//!
//! The model owns these interfaces and knows nothing of their implementations: `experts/`
//! implements them (native's resident experts, selective's bounded cache), the worker and the
//! commands observe. Both providers hand out the same [`ExpertWeights`] built by the same
//! conversion from the same bytes, so the forward pass is bit-identical between them.

use std::sync::Arc;

use super::quant_rows::product;
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Tensor};

use super::error::Result;
use super::fp8::Fp8Matrix;
use super::layers::silu;
use super::lut4::Lut4Matrix;
use super::mapped::MappedBf16;
use super::safetensors_file::StDtype;
pub use crate::step_path::StepPath;

/// One expert, ready to compute with. Dense: gate and up stacked as one [2I, H] matrix (one
/// matmul instead of two, as transformers 5 fuses them), down as [H, I]. Quantized (GGUF): the
/// three matrices kept in their block format and multiplied as they are (candle's `QMatMul`),
/// gate and up apart since a mixed file (`Q4_K_M`) may store them in different types.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    mats: Mats,
    intermediate: usize,
}

#[derive(Debug, Clone)]
enum Mats {
    Dense {
        gate_up: Tensor,
        down: Tensor,
    },
    Quantized {
        gate_up: GateUp,
        down: QMatMul,
        /// Bytes as stored (the block format), what a cache budgets.
        bytes: u64,
    },
    /// GGUF blocks on a GPU, as the file stores them, for moescope's block decode kernels:
    /// `gate_up` U8 [gate bytes + up bytes] (gate's rows then up's), `down` U8 [down bytes].
    Blocks {
        gate_up: Tensor,
        down: Tensor,
        layout: GgmlLayout,
    },
    /// bf16 rows read in place from the checkpoint's pages (`mapped.rs`): gate's rows then up's
    /// as one [2I, H] range, down [H, I]. The CPU expert kernels read them as they are; other
    /// paths take a tensor copy.
    Mapped {
        gate_up: Arc<MappedBf16>,
        down: Arc<MappedBf16>,
    },
    /// Block-scaled FP8 (see `fp8.rs`): each matrix dequantised inside its product.
    Fp8 {
        gate: Fp8Matrix,
        up: Fp8Matrix,
        down: Fp8Matrix,
    },
    /// A GGUF expert with table-coded parts (MXFP4, IQ4_NL, IQ4_XS; see `lut4.rs`), on the CPU:
    /// those decoded inside moescope's own product, any other part as a [`Mats::Quantized`]
    /// one's.
    Lut4 {
        gate_up: Lut4GateUp,
        down: BlockMat,
        /// Bytes as held (as stored; a float part in f32), what a cache budgets.
        bytes: u64,
    },
}

/// One matrix of an expert with table-coded parts: table-coded, or what candle's quantized
/// product takes (another block type, or a float part held in f32).
#[derive(Debug, Clone)]
pub enum BlockMat {
    Lut4(Lut4Matrix),
    Candle(QMatMul),
}

impl BlockMat {
    /// x·Wᵀ for an f32 x [n, cols].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            BlockMat::Lut4(m) => m.forward(x)?,
            BlockMat::Candle(m) => super::quant_rows::product(m, x)?,
        })
    }
}

/// Gate and up of an expert with table-coded parts: one [2I, H] product when both are of one
/// table-coded type (GGUF rows are independent, so gate's bytes then up's are that matrix),
/// else two.
#[derive(Debug, Clone)]
pub enum Lut4GateUp {
    Fused(Lut4Matrix),
    Apart(BlockMat, BlockMat),
}

/// A dense expert matrix as the CPU expert kernels read it: a CPU tensor, or bf16 rows in place
/// (with their [rows, cols]).
#[derive(Debug, Clone, Copy)]
pub enum MatRef<'a> {
    Tensor(&'a Tensor),
    Bf16(&'a [half::bf16], [usize; 2]),
}

impl MatRef<'_> {
    pub fn dims(&self) -> [usize; 2] {
        match self {
            MatRef::Tensor(t) => match t.dims() {
                &[r, c] => [r, c],
                _ => [0, 0],
            },
            MatRef::Bf16(_, d) => *d,
        }
    }
}

/// The output of [`GateUp`]'s product(s).
enum GateUpOut {
    Fused(Tensor),
    Apart(Tensor, Tensor),
}

/// A quantized expert's gate and up: one [2I, H] product when both are stored in the same type
/// (the activations are rounded to blocks once, not twice), else two.
#[derive(Debug, Clone)]
pub enum GateUp {
    Fused(QMatMul),
    Apart(QMatMul, QMatMul),
}

impl ExpertWeights {
    /// `gate_up` is [2I, H], `down` [H, I].
    pub fn new(gate_up: Tensor, down: Tensor, intermediate: usize) -> Self {
        ExpertWeights {
            mats: Mats::Dense { gate_up, down },
            intermediate,
        }
    }

    /// Block-quantized matrices: gate and up ([2I, H] fused, or [I, H] each), `down` [H, I];
    /// `bytes` as held.
    pub fn quantized(gate_up: GateUp, down: QMatMul, intermediate: usize, bytes: u64) -> Self {
        ExpertWeights {
            mats: Mats::Quantized {
                gate_up,
                down,
                bytes,
            },
            intermediate,
        }
    }

    /// bf16 matrices mapped from the checkpoint: `gate_up` [2I, H] (gate's rows then up's),
    /// `down` [H, I]. Errors when the shapes do not say so.
    pub fn mapped(gate_up: MappedBf16, down: MappedBf16) -> Result<Self> {
        let [two_i, h] = gate_up.dims();
        if two_i % 2 != 0 || down.dims() != [h, two_i / 2] {
            return Err(super::error::ModelError::Input(format!(
                "mapped expert: gate_up {:?} and down {:?} are not [2I, H] and [H, I]",
                gate_up.dims(),
                down.dims()
            )));
        }
        Ok(ExpertWeights {
            mats: Mats::Mapped {
                gate_up: Arc::new(gate_up),
                down: Arc::new(down),
            },
            intermediate: two_i / 2,
        })
    }

    /// The dense matrices as the CPU expert kernels read them — tensors, or bf16 rows in
    /// place; None for quantized experts.
    pub fn rows(&self) -> Option<(MatRef<'_>, MatRef<'_>)> {
        match &self.mats {
            Mats::Dense { gate_up, down } => Some((MatRef::Tensor(gate_up), MatRef::Tensor(down))),
            Mats::Mapped { gate_up, down } => Some((
                MatRef::Bf16(gate_up.values(), gate_up.dims()),
                MatRef::Bf16(down.values(), down.dims()),
            )),
            _ => None,
        }
    }

    /// Block-scaled FP8 matrices: gate and up [I, H], down [H, I].
    pub fn fp8(gate: Fp8Matrix, up: Fp8Matrix, down: Fp8Matrix) -> Self {
        let intermediate = gate.dims()[0];
        ExpertWeights {
            mats: Mats::Fp8 { gate, up, down },
            intermediate,
        }
    }

    /// A GGUF expert with table-coded parts: gate and up ([2I, H] fused, or [I, H] each), `down`
    /// [H, I]; `bytes` as held.
    pub fn lut4(gate_up: Lut4GateUp, down: BlockMat, intermediate: usize, bytes: u64) -> Self {
        ExpertWeights {
            mats: Mats::Lut4 {
                gate_up,
                down,
                bytes,
            },
            intermediate,
        }
    }

    /// GGUF blocks on a GPU as stored (see [`GgmlLayout`]): `gate_up` U8 holding gate's then
    /// up's bytes, `down` U8 holding down's. Errors when the byte counts are not the layout's.
    pub fn blocks(gate_up: Tensor, down: Tensor, layout: GgmlLayout) -> Result<Self> {
        if gate_up.dtype() != DType::U8
            || down.dtype() != DType::U8
            || gate_up.elem_count() != layout.gate_up_bytes()
            || down.elem_count() != layout.down_bytes()
        {
            return Err(super::error::ModelError::Input(format!(
                "GGUF expert blocks: gate_up {:?} {:?} and down {:?} {:?}, but {layout} takes \
                 {} and {} bytes",
                gate_up.dtype(),
                gate_up.dims(),
                down.dtype(),
                down.dims(),
                layout.gate_up_bytes(),
                layout.down_bytes()
            )));
        }
        Ok(ExpertWeights {
            mats: Mats::Blocks {
                gate_up: gate_up.flatten_all()?,
                down: down.flatten_all()?,
                layout,
            },
            intermediate: layout.intermediate,
        })
    }

    /// A GPU GGUF expert's bytes and layout (see [`blocks`](Self::blocks)); None otherwise.
    pub fn block_parts(&self) -> Option<(&Tensor, &Tensor, GgmlLayout)> {
        match &self.mats {
            Mats::Blocks {
                gate_up,
                down,
                layout,
            } => Some((gate_up, down, *layout)),
            _ => None,
        }
    }

    /// The dense matrices (gate_up [2I, H], down [H, I]); None for quantized experts, which
    /// have no stacked form for the fused GPU kernels.
    pub fn dense(&self) -> Option<(&Tensor, &Tensor)> {
        match &self.mats {
            Mats::Dense { gate_up, down } => Some((gate_up, down)),
            Mats::Quantized { .. }
            | Mats::Blocks { .. }
            | Mats::Fp8 { .. }
            | Mats::Lut4 { .. }
            | Mats::Mapped { .. } => None,
        }
    }

    /// The dense matrices, or an error naming why a quantized expert cannot go where they must.
    pub fn dense_or_err(&self, what: &str) -> Result<(&Tensor, &Tensor)> {
        self.dense().ok_or_else(|| {
            super::error::ModelError::Input(format!(
                "{what} needs dense expert matrices, but this expert is block-quantized"
            ))
        })
    }

    /// down(silu(gate(x)) * up(x)) for x of shape [n, H].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.mats {
            Mats::Dense { gate_up, down } => {
                use super::cpu_gemv::matmul_t;
                let gu = matmul_t(x, gate_up)?;
                let g = gu.narrow(1, 0, self.intermediate)?;
                let u = gu.narrow(1, self.intermediate, self.intermediate)?;
                let h = (silu(&g)? * u)?;
                Ok(matmul_t(&h, down)?)
            }
            Mats::Quantized { gate_up, down, .. } => {
                // Quantized products take f32 activations (candle's CPU kernels quantize them
                // to Q8 blocks themselves, as llama.cpp does); the result returns to the
                // compute dtype.
                let dtype = x.dtype();
                let x = x.to_dtype(DType::F32)?;
                let gu = match gate_up {
                    GateUp::Fused(m) => GateUpOut::Fused(product(m, &x)?),
                    GateUp::Apart(g, u) => GateUpOut::Apart(product(g, &x)?, product(u, &x)?),
                };
                self.quantized_rest(gu, down, dtype)
            }
            Mats::Blocks {
                gate_up,
                down,
                layout,
            } => {
                // Outside the fused kernels (which read the blocks themselves): the expert
                // dequantised to the compute dtype, then as a dense one.
                let (gu, dn) = blocks_dequantised(gate_up, down, layout)?;
                let dtype = x.dtype();
                ExpertWeights::new(gu.to_dtype(dtype)?, dn.to_dtype(dtype)?, self.intermediate)
                    .forward(x)
            }
            Mats::Fp8 { gate, up, down } => {
                let h = (silu(&gate.forward(x)?)? * up.forward(x)?)?;
                Ok(down.forward(&h)?)
            }
            Mats::Lut4 { gate_up, down, .. } => {
                // In f32, as the quantized products (activations are not rounded to blocks).
                let dtype = x.dtype();
                let x = x.to_dtype(DType::F32)?;
                let (g, u) = match gate_up {
                    Lut4GateUp::Fused(m) => {
                        let gu = m.forward(&x)?;
                        let i = self.intermediate;
                        (gu.narrow(1, 0, i)?, gu.narrow(1, i, i)?)
                    }
                    Lut4GateUp::Apart(g, u) => (g.forward(&x)?, u.forward(&x)?),
                };
                let h = (silu(&g)? * u)?;
                Ok(down.forward(&h)?.to_dtype(dtype)?)
            }
            Mats::Mapped { gate_up, down } => {
                // Outside the CPU expert kernels: a tensor copy, then as a dense expert.
                ExpertWeights::new(gate_up.to_tensor()?, down.to_tensor()?, self.intermediate)
                    .forward(x)
            }
        }
    }

    /// A quantized expert's output from its gate_up product(s): `down(silu(gate) * up)` in
    /// `dtype`.
    fn quantized_rest(&self, gu: GateUpOut, down: &QMatMul, dtype: DType) -> Result<Tensor> {
        let (g, u) = match gu {
            GateUpOut::Fused(gu) => {
                let i = self.intermediate;
                (gu.narrow(1, 0, i)?, gu.narrow(1, i, i)?)
            }
            GateUpOut::Apart(g, u) => (g, u),
        };
        let h = (silu(&g)? * u)?;
        Ok(product(down, &h)?.to_dtype(dtype)?)
    }

    /// [`forward`](Self::forward) of one token `x` [1, H] through several table-coded experts
    /// (gate and up fused, down table-coded) on the CPU: every expert's gate_up rows in one product and
    /// every down row in another ([`super::lut4::stacked_product`]) — two trips through the
    /// worker pool a layer instead of two an expert — with each row's dot and the tensor ops
    /// between them those of `forward`, so the same bits. None where that does not apply.
    pub fn lut4_one_token(x: &Tensor, experts: &[&ExpertWeights]) -> Result<Option<Vec<Tensor>>> {
        if experts.is_empty() || !x.device().is_cpu() || x.dim(0)? != 1 {
            return Ok(None);
        }
        let mut gate_ups = Vec::with_capacity(experts.len());
        let mut downs = Vec::with_capacity(experts.len());
        for w in experts {
            match &w.mats {
                Mats::Lut4 {
                    gate_up: Lut4GateUp::Fused(gu),
                    down,
                    ..
                } => {
                    gate_ups.push(gu);
                    downs.push(down);
                }
                _ => return Ok(None),
            }
        }
        let dtype = x.dtype();
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let gu = super::lut4::stacked_product(&gate_ups, |_| &xs)?;
        let mut hs = Vec::with_capacity(experts.len());
        let mut at = 0;
        for w in experts {
            let i = w.intermediate;
            let g_u = Tensor::from_slice(&gu[at..at + 2 * i], (1, 2 * i), x.device())?;
            at += 2 * i;
            hs.push((silu(&g_u.narrow(1, 0, i)?)? * g_u.narrow(1, i, i)?)?);
        }
        // Table-coded downs in one more trip; a down in another block type (llama-quantize's
        // IQ4_XS files keep some down stacks in Q5_K) by candle's product on the same h, as
        // `forward` runs it.
        let coded: Vec<(usize, &Lut4Matrix)> = downs
            .iter()
            .enumerate()
            .filter_map(|(e, d)| match d {
                BlockMat::Lut4(m) => Some((e, m)),
                BlockMat::Candle(_) => None,
            })
            .collect();
        let h_rows: Vec<Vec<f32>> = coded
            .iter()
            .map(|&(e, _)| hs[e].flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        let mats: Vec<&Lut4Matrix> = coded.iter().map(|&(_, m)| m).collect();
        let y = super::lut4::stacked_product(&mats, |k| &h_rows[k])?;
        let mut outs: Vec<Option<Tensor>> = vec![None; experts.len()];
        let mut at = 0;
        for &(e, m) in &coded {
            let rows = m.dims()[0];
            outs[e] = Some(Tensor::from_slice(
                &y[at..at + rows],
                (1, rows),
                x.device(),
            )?);
            at += rows;
        }
        downs_as(outs, &hs, dtype, |e, h| downs[e].forward(h)).map(Some)
    }

    /// A prompt's rows through several table-coded experts (gate and up fused, down too) on the
    /// CPU: expert e's tokens are rows `idx[e]` of `x`, each expert at most
    /// `cpu_gemv::MAX_TOKENS` of them; every expert's gate_up rows in one product and every
    /// down row in another ([`super::lut4::ragged_product`]). Each expert's output [n_e, H]
    /// as f32 values of x's dtype — the bits of `forward` over its rows. None where that does
    /// not apply.
    pub fn lut4_few_tokens(
        x: &Tensor,
        experts: &[&ExpertWeights],
        idx: &[&[u32]],
    ) -> Result<Option<Vec<Vec<f32>>>> {
        let (t, h) = x.dims2()?;
        if experts.is_empty() || experts.len() != idx.len() || !x.device().is_cpu() {
            return Ok(None);
        }
        let mut gate_ups = Vec::with_capacity(experts.len());
        let mut downs = Vec::with_capacity(experts.len());
        for (w, rows) in experts.iter().zip(idx) {
            let fits = !rows.is_empty()
                && super::cpu_gemv::row_kernels_take(DType::F32, rows.len())
                && rows.iter().all(|&r| (r as usize) < t);
            match &w.mats {
                Mats::Lut4 {
                    gate_up: Lut4GateUp::Fused(gu),
                    down: BlockMat::Lut4(d),
                    ..
                } if fits && gu.dims()[1] == h => {
                    gate_ups.push(gu);
                    downs.push(d);
                }
                _ => return Ok(None),
            }
        }
        let dtype = x.dtype();
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let ns: Vec<usize> = idx.iter().map(|r| r.len()).collect();
        let xe = gathered_rows(&xs, h, idx);
        let gu = super::lut4::ragged_product(&gate_ups, &ns, |e| &xe[e])?;
        let mut hs = Vec::with_capacity(experts.len());
        for ((w, g_u), &n) in experts.iter().zip(gu).zip(&ns) {
            let i = w.intermediate;
            let g_u = Tensor::from_vec(g_u, (n, 2 * i), x.device())?;
            let h = (silu(&g_u.narrow(1, 0, i)?)? * g_u.narrow(1, i, i)?)?;
            hs.push(h.flatten_all()?.to_vec1::<f32>()?);
        }
        let ys = super::lut4::ragged_product(&downs, &ns, |e| &hs[e])?;
        ys.into_iter()
            .zip(&ns)
            .map(|(y, &n)| {
                let y = Tensor::from_vec(y, (n, h), x.device())?.to_dtype(dtype)?;
                Ok(super::cpu_gemv::widened(&y)?)
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// [`forward`](Self::forward) of a prompt's tokens through several block-quantized experts on
    /// the CPU — expert e on x's rows `idx[e]` — every gate_up matrix in one trip through the
    /// pool and every down in another ([`super::quant_rows::stacked_product`]: candle's
    /// quantization and row dots, so each token's row the bits of `QMatMul::forward` on that
    /// token), a down it does not take by candle on the same rows, the tensor ops between them
    /// those of `forward`. Each output is the expert's `[rows, H]` in f32 (widened from
    /// x's dtype, as the caller widens `forward`'s). None where an expert is not block-quantized
    /// on the CPU or a gate_up is one the stacked product leaves to candle: the caller then runs
    /// the experts one by one.
    pub fn quantized_stacked_few_tokens(
        x: &Tensor,
        experts: &[&ExpertWeights],
        idx: &[&[u32]],
    ) -> Result<Option<Vec<Vec<f32>>>> {
        let (t, h) = x.dims2()?;
        if experts.is_empty() || experts.len() != idx.len() || !x.device().is_cpu() {
            return Ok(None);
        }
        // Each expert's gate_up matrices (one fused, or gate and up), in expert order.
        let mut ups: Vec<&QMatMul> = Vec::with_capacity(2 * experts.len());
        for (w, rows) in experts.iter().zip(idx) {
            if rows.is_empty() || rows.iter().any(|&r| r as usize >= t) {
                return Ok(None);
            }
            match &w.mats {
                Mats::Quantized {
                    gate_up: GateUp::Fused(m),
                    ..
                } => ups.push(m),
                Mats::Quantized {
                    gate_up: GateUp::Apart(g, u),
                    ..
                } => ups.extend([g, u]),
                _ => return Ok(None),
            }
        }
        // The expert of each gate_up matrix.
        let owner: Vec<usize> = experts
            .iter()
            .enumerate()
            .flat_map(|(e, w)| match &w.mats {
                Mats::Quantized {
                    gate_up: GateUp::Apart(..),
                    ..
                } => vec![e, e],
                _ => vec![e],
            })
            .collect();
        // The gate_ups all in the stacked product or none: where it leaves one to candle (a
        // layout candle packs that it does not reproduce) the gathering here would only add to
        // the experts' products one by one (BENCHMARKS.md §100).
        let mut qs: Vec<&candle_core::quantized::QTensor> = Vec::with_capacity(ups.len());
        for (m, e) in ups.iter().zip(&owner) {
            match m {
                QMatMul::QTensor(q) if super::quant_rows::takes(q, idx[*e].len()) => qs.push(q),
                _ => return Ok(None),
            }
        }
        let dtype = x.dtype();
        let dev = x.device();
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let xe = gathered_rows(&xs, h, idx);
        let Some(gu) = super::quant_rows::stacked_product(&qs, |j| &xe[owner[j]]) else {
            return Ok(None);
        };
        let mut hs: Vec<Vec<f32>> = Vec::with_capacity(experts.len());
        let mut gu = gu
            .into_iter()
            .enumerate()
            .map(|(j, y)| {
                let m = idx[owner[j]].len();
                let n = y.len() / m;
                Tensor::from_vec(y, (m, n), dev)
            })
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter();
        let mut downs: Vec<&QMatMul> = Vec::with_capacity(experts.len());
        for w in experts {
            let Mats::Quantized { gate_up, down, .. } = &w.mats else {
                unreachable!("checked above: every expert is quantized")
            };
            downs.push(down);
            let i = w.intermediate;
            let mut next = || gu.next().expect("one output per gate_up matrix");
            let (g, u) = match gate_up {
                GateUp::Fused(_) => {
                    let g_u = next();
                    (g_u.narrow(1, 0, i)?, g_u.narrow(1, i, i)?)
                }
                GateUp::Apart(..) => (next(), next()),
            };
            hs.push((silu(&g)? * u)?.flatten_all()?.to_vec1::<f32>()?);
        }
        let ys = products(&downs, |e| &hs[e], |e| idx[e].len(), dev)?;
        ys.into_iter()
            .map(|y| Ok(super::cpu_gemv::widened(&y.to_dtype(dtype)?)?))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// [`forward`](Self::forward) of one token `x` [1, H] through several block-quantized
    /// experts on the CPU, every expert's fused gate_up product in one call of candle's
    /// shared-input GEMV (`QTensor::gemv_fused_shared_lhs`: x quantized to blocks once, one
    /// parallel region) — the products llama.cpp's `mul_mat_id` batches — then each expert's
    /// down as before. None where that call does not apply (other experts, types or CPUs); the
    /// caller then runs the experts one by one. Why: at batch 1 a small quantized product is
    /// mostly its dispatch and the quantization of its input.
    pub fn quantized_one_token(
        x: &Tensor,
        experts: &[&ExpertWeights],
    ) -> Result<Option<Vec<Tensor>>> {
        use candle_core::quantized::QTensor;
        if experts.is_empty() || !x.device().is_cpu() || x.dim(0)? != 1 {
            return Ok(None);
        }
        let mut gate_ups: Vec<&QTensor> = Vec::with_capacity(experts.len());
        for w in experts {
            match &w.mats {
                Mats::Quantized {
                    gate_up: GateUp::Fused(QMatMul::QTensor(t)),
                    ..
                } => gate_ups.push(t),
                _ => return Ok(None),
            }
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?.contiguous()?;
        let Some(outs) = QTensor::gemv_fused_shared_lhs(&gate_ups, &xf)? else {
            return Ok(None);
        };
        experts
            .iter()
            .zip(outs)
            .map(|(w, gu)| match &w.mats {
                Mats::Quantized { down, .. } => w.quantized_rest(GateUpOut::Fused(gu), down, dtype),
                _ => unreachable!("checked above: every expert is quantized"),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// [`forward`](Self::forward) of one token `x` [1, H] through several block-quantized
    /// experts on the CPU where candle's shared-input GEMV does not apply (CPUs without AVX-512
    /// VNNI, the downs): every expert's gate_up rows in one trip through the pool and every
    /// block-quantized down row in another ([`super::quant_rows::stacked_gemv`], candle's own
    /// quantization and row dots, so `QMatMul::forward`'s bits), the tensor ops between them
    /// those of `forward`. A down held as a float tensor is candle's product on the same h, as
    /// `forward` runs it. None where that does not apply (a matrix candle repacks in a layout
    /// `quant_rows` does not reproduce, other experts): the caller then runs the experts one by
    /// one.
    pub fn quantized_stacked_one_token(
        x: &Tensor,
        experts: &[&ExpertWeights],
    ) -> Result<Option<Vec<Tensor>>> {
        use candle_core::quantized::QTensor;
        if experts.is_empty() || !x.device().is_cpu() || x.dim(0)? != 1 {
            return Ok(None);
        }
        // Each expert's gate_up matrices (one fused, or gate and up) and its down.
        let mut ups: Vec<&QTensor> = Vec::with_capacity(2 * experts.len());
        let mut downs: Vec<&QMatMul> = Vec::with_capacity(experts.len());
        for w in experts {
            match &w.mats {
                Mats::Quantized {
                    gate_up: GateUp::Fused(QMatMul::QTensor(t)),
                    ..
                } => ups.push(t),
                Mats::Quantized {
                    gate_up: GateUp::Apart(QMatMul::QTensor(g), QMatMul::QTensor(u)),
                    ..
                } => ups.extend([g, u].map(|t| t.as_ref())),
                _ => return Ok(None),
            }
            let Mats::Quantized { down, .. } = &w.mats else {
                unreachable!("matched above")
            };
            downs.push(down);
        }
        let dtype = x.dtype();
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let Some(gu) = super::quant_rows::stacked_gemv(&ups, |_| &xs) else {
            return Ok(None);
        };
        let dev = x.device();
        let row = |v: &[f32]| Tensor::from_slice(v, (1, v.len()), dev);
        let mut hs = Vec::with_capacity(experts.len());
        let mut at = 0;
        for w in experts {
            let i = w.intermediate;
            let gu_out = match &w.mats {
                Mats::Quantized {
                    gate_up: GateUp::Fused(_),
                    ..
                } => {
                    at += 1;
                    GateUpOut::Fused(row(&gu[at - 1])?)
                }
                _ => {
                    at += 2;
                    GateUpOut::Apart(row(&gu[at - 2])?, row(&gu[at - 1])?)
                }
            };
            let (g, u) = match gu_out {
                GateUpOut::Fused(gu) => (gu.narrow(1, 0, i)?, gu.narrow(1, i, i)?),
                GateUpOut::Apart(g, u) => (g, u),
            };
            hs.push((silu(&g)? * u)?);
        }
        // Block-quantized downs in one more trip; float ones by candle on the same h.
        let blocks: Vec<(usize, &QTensor)> = downs
            .iter()
            .enumerate()
            .filter_map(|(e, d)| match d {
                QMatMul::QTensor(t) => Some((e, t.as_ref())),
                _ => None,
            })
            .collect();
        let h_rows: Vec<Vec<f32>> = blocks
            .iter()
            .map(|&(e, _)| hs[e].flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        let mats: Vec<&QTensor> = blocks.iter().map(|&(_, t)| t).collect();
        let Some(ys) = super::quant_rows::stacked_gemv(&mats, |k| &h_rows[k]) else {
            return Ok(None);
        };
        let mut outs: Vec<Option<Tensor>> = vec![None; experts.len()];
        for (&(e, _), y) in blocks.iter().zip(&ys) {
            outs[e] = Some(row(y)?);
        }
        downs_as(outs, &hs, dtype, |e, h| product(downs[e], h)).map(Some)
    }

    /// Bytes this expert occupies in memory (compute dtype; quantized: as stored).
    pub fn bytes(&self) -> u64 {
        match &self.mats {
            Mats::Dense { gate_up, down } => {
                ((gate_up.elem_count() + down.elem_count()) * down.dtype().size_in_bytes()) as u64
            }
            Mats::Quantized { bytes, .. } | Mats::Lut4 { bytes, .. } => *bytes,
            Mats::Blocks { gate_up, down, .. } => (gate_up.elem_count() + down.elem_count()) as u64,
            Mats::Fp8 { gate, up, down } => gate.bytes() + up.bytes() + down.bytes(),
            Mats::Mapped { gate_up, down } => {
                ((gate_up.values().len() + down.values().len()) * 2) as u64
            }
        }
    }

    /// Whether the matrices are quantized (GGUF blocks or FP8): no stacked dense form.
    pub fn is_quantized(&self) -> bool {
        !matches!(self.mats, Mats::Dense { .. } | Mats::Mapped { .. })
    }

    /// The block of an FP8 expert held on a GPU whose three matrices share it; None otherwise.
    pub fn fp8_block(&self) -> Option<[usize; 2]> {
        match &self.mats {
            Mats::Fp8 { gate, up, down }
                if gate.device_parts().is_some()
                    && up.device_parts().is_some()
                    && down.device_parts().is_some()
                    && gate.block() == up.block()
                    && gate.block() == down.block() =>
            {
                Some(gate.block())
            }
            _ => None,
        }
    }

    /// An FP8 expert held on a GPU, in the layout of FP8 stacks (gate and up concatenated, as
    /// bytes and as scales); None for any other expert, or FP8 blocks that do not tile gate
    /// and up the same way.
    pub fn fp8_stack_parts(&self) -> Result<Option<Fp8StackParts>> {
        let Mats::Fp8 { gate, up, down } = &self.mats else {
            return Ok(None);
        };
        let (Some((gw, gs)), Some((uw, us)), Some((dw, ds))) =
            (gate.device_parts(), up.device_parts(), down.device_parts())
        else {
            return Ok(None);
        };
        if gate.block() != up.block() || gate.block() != down.block() {
            return Ok(None);
        }
        Ok(Some(Fp8StackParts {
            gate_up: Tensor::cat(&[gw, uw], 0)?,
            gate_up_scale: Tensor::cat(&[gs, us], 0)?,
            down: dw.clone(),
            down_scale: ds.clone(),
            block: gate.block(),
        }))
    }

    /// An FP8 expert whose matrices are views into FP8 stacks' rows (`parts` as
    /// [`fp8_stack_parts`](Self::fp8_stack_parts) lays them out, e.g. one slot of a pool):
    /// the same bytes, no copy.
    pub fn fp8_from_stack_parts(parts: &Fp8StackParts) -> Result<Self> {
        let two_i = parts.gate_up.dim(0)?;
        let (i, sr) = (two_i / 2, parts.gate_up_scale.dim(0)? / 2);
        let m = |w: Tensor, s: Tensor| Fp8Matrix::from_device(w, s, parts.block);
        Ok(ExpertWeights::fp8(
            m(
                parts.gate_up.narrow(0, 0, i)?,
                parts.gate_up_scale.narrow(0, 0, sr)?,
            )?,
            m(
                parts.gate_up.narrow(0, i, i)?,
                parts.gate_up_scale.narrow(0, sr, sr)?,
            )?,
            m(parts.down.clone(), parts.down_scale.clone())?,
        ))
    }
}

/// Experts stacked for a fused kernel (`candle_nn::moe::moe_gemm`): `gate_up` is
/// [n, 2I, H], `down` [n, H, I]; `index` maps an expert id to its position along the first
/// dimension (None: position = expert id, the native layout).
#[derive(Clone)]
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
    /// expert); then no step needs the routing on the host.
    pub fill: Option<DeviceFill>,
    /// Block-scaled FP8 experts: `gate_up` and `down` then hold e4m3 bytes (U8) and these are
    /// their scales, read by the FP8 decode kernels.
    pub fp8: Option<Fp8Scales>,
    /// GGUF experts as GGML blocks: `gate_up` and `down` then hold each expert's bytes as
    /// stored, one row of the U8 stack an expert (see [`GgmlLayout`]).
    pub ggml: Option<GgmlLayout>,
}

impl Stacked {
    /// What the stacks hold.
    pub fn format(&self) -> StackFormat<'_> {
        match (&self.fp8, &self.ggml) {
            (Some(s), _) => StackFormat::Fp8(s),
            (None, Some(l)) => StackFormat::Ggml(l),
            (None, None) => StackFormat::Dense,
        }
    }
}

/// One GGUF expert (or a layer's experts) as GGML blocks in moescope's GPU decode kernels: the
/// types of gate, up and down as the file stores them (GGML's block types, or IQ4_NL / IQ4_XS,
/// which candle does not read), and the matrices' sizes. An expert's bytes are gate's I rows of
/// H columns, then up's, then (apart) down's H rows of I columns, each row whole blocks — the
/// GGUF stacked tensors' per-expert slices, as they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlLayout {
    pub gate: StDtype,
    pub up: StDtype,
    pub down: StDtype,
    pub hidden: usize,
    pub intermediate: usize,
}

impl GgmlLayout {
    /// The layout when the kernels decode every type and each row is whole blocks; None
    /// otherwise (the experts then take candle's quantized products one by one).
    pub fn new([gate, up, down]: [StDtype; 3], hidden: usize, intermediate: usize) -> Option<Self> {
        let whole = |t: StDtype, cols: usize| {
            Self::kernel_type(t).is_some()
                && cols > 0
                && t.block_elems()
                    .is_some_and(|b| cols.is_multiple_of(b as usize))
        };
        (whole(gate, hidden) && whole(up, hidden) && whole(down, intermediate) && intermediate > 0)
            .then_some(GgmlLayout {
                gate,
                up,
                down,
                hidden,
                intermediate,
            })
    }

    /// GGML's id of a type the block kernels decode (`ggml_blocks.cuh`); None for the others.
    pub fn kernel_type(t: StDtype) -> Option<i32> {
        use super::lut4::Lut4;
        Some(match t {
            StDtype::Q4_0 => 2,
            StDtype::Q4_1 => 3,
            StDtype::Q5_0 => 6,
            StDtype::Q5_1 => 7,
            StDtype::Q8_0 => 8,
            StDtype::Q4K => 12,
            StDtype::Q5K => 13,
            StDtype::Q6K => 14,
            StDtype::Lut4(Lut4::Iq4Nl) => 20,
            StDtype::Lut4(Lut4::Iq4Xs) => 23,
            StDtype::Lut4(Lut4::Mxfp4) => 39,
            _ => return None,
        })
    }

    /// [`kernel_type`](Self::kernel_type) of a type candle holds (attention, embeddings).
    pub fn kernel_type_ggml(t: GgmlDType) -> Option<i32> {
        StDtype::from_ggml(t).and_then(Self::kernel_type)
    }

    /// Bytes of one row of `cols` weights in type `t` (whole blocks, checked by `new`).
    pub fn row_bytes(t: StDtype, cols: usize) -> usize {
        t.bytes_for(cols as u64).unwrap_or(0) as usize
    }

    /// [`row_bytes`](Self::row_bytes) of a type candle holds.
    pub fn row_bytes_ggml(t: GgmlDType, cols: usize) -> usize {
        cols / t.block_size() * t.type_size()
    }

    pub fn gate_bytes(&self) -> usize {
        self.intermediate * Self::row_bytes(self.gate, self.hidden)
    }

    pub fn up_bytes(&self) -> usize {
        self.intermediate * Self::row_bytes(self.up, self.hidden)
    }

    pub fn gate_up_bytes(&self) -> usize {
        self.gate_bytes() + self.up_bytes()
    }

    pub fn down_bytes(&self) -> usize {
        self.hidden * Self::row_bytes(self.down, self.intermediate)
    }
}

impl std::fmt::Display for GgmlLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GGUF blocks (gate {}, up {}, down {}; hidden {}, intermediate {})",
            self.gate.name(),
            self.up.name(),
            self.down.name(),
            self.hidden,
            self.intermediate
        )
    }
}

/// A GPU GGUF expert's matrices dequantised: gate_up [2I, H] and down [H, I] in bf16.
#[cfg(feature = "cuda")]
fn blocks_dequantised(
    gate_up: &Tensor,
    down: &Tensor,
    layout: &GgmlLayout,
) -> Result<(Tensor, Tensor)> {
    let rows = Tensor::new(&[0u32], gate_up.device())?;
    let st = super::moe_decode::GgmlStack {
        gate_up: &gate_up.unsqueeze(0)?,
        down: &down.unsqueeze(0)?,
        layout,
    };
    let (gu, dn) = st.dequantised(&rows)?;
    Ok((gu.squeeze(0)?, dn.squeeze(0)?))
}

#[cfg(not(feature = "cuda"))]
fn blocks_dequantised(_: &Tensor, _: &Tensor, _: &GgmlLayout) -> Result<(Tensor, Tensor)> {
    Err(super::error::ModelError::Input(
        "GGUF expert blocks on a GPU need a build with the cuda feature".into(),
    ))
}

/// What a [`Stacked`]'s tensors hold, for the kernels that read them.
#[derive(Clone, Copy)]
pub enum StackFormat<'a> {
    /// The compute dtype: gate_up [n, 2I, H], down [n, H, I].
    Dense,
    /// e4m3 bytes with these scales, in the dense shapes.
    Fp8(&'a Fp8Scales),
    /// GGUF blocks: gate_up U8 [n, stride ≥ gate_up bytes], down U8 [n, stride ≥ down bytes].
    Ggml(&'a GgmlLayout),
}

/// The block scales of FP8 stacks (see [`Stacked::fp8`]), in f32.
#[derive(Clone)]
pub struct Fp8Scales {
    /// `[n, 2·ceil(I/br), ceil(H/bc)]`: each expert's gate scales, then its up scales.
    pub gate_up: Tensor,
    /// `[n, ceil(H/br), ceil(I/bc)]`.
    pub down: Tensor,
    /// Rows × columns of weights per scale.
    pub block: [usize; 2],
}

/// One FP8 expert on the device in the stacks' per-expert layout: gate and up bytes as one
/// [2I, H] matrix with their scales one after the other, down [H, I] with its scales.
pub struct Fp8StackParts {
    pub gate_up: Tensor,
    pub gate_up_scale: Tensor,
    pub down: Tensor,
    pub down_scale: Tensor,
    pub block: [usize; 2],
}

/// Bytes of an expert's gate, up and down parts, and where each starts in its slot's row (see
/// [`DeviceFill::part_bytes`]).
pub type PartLayout = ([usize; 3], [usize; 3]);

/// Where each expert of one layer comes from and goes when the GPU fills its slot itself.
#[derive(Clone)]
pub struct DeviceFill {
    /// i64 `[num_experts × 3]`: device addresses of each expert's gate, up and down parts in
    /// registered host memory, stored as the slots hold them (the compute dtype, or GGUF blocks).
    pub sources: Tensor,
    /// u32 `[num_experts]`: the slot each expert fills (its own; the pool never evicts).
    pub home: Tensor,
    /// u32 `[num_experts]`: 1 for experts in their slot (set by the fill and by host loads).
    pub resident: Tensor,
    /// Bytes of the gate, up and down parts, and where each starts in its slot's row (gate and
    /// up in the gate_up row, down in the down row).
    pub part_bytes: [usize; 3],
    pub part_at: [usize; 3],
    /// FP8 slots: the parts' block scales, filled into the scale pools ([`Fp8Scales`]) the same
    /// way, before the experts are marked resident.
    pub scales: Option<ScaleFill>,
}

/// The block scales of FP8 experts that the GPU fills itself: each expert's gate, up and down
/// scales' device addresses in registered host memory (i64 `[num_experts × 3]`, f32 as the
/// scale pools hold them), their bytes and where each starts in its slot's scale rows.
#[derive(Clone)]
pub struct ScaleFill {
    pub sources: Tensor,
    pub part_bytes: [usize; 3],
    pub part_at: [usize; 3],
}

impl DeviceFill {
    /// A bf16 (compute dtype) layout: three parts of `part` bytes, up right after gate.
    pub fn dense_parts(part: usize) -> PartLayout {
        ([part; 3], [0, part, 0])
    }

    /// FP8 experts of I × H with `block` scales: the e4m3 parts (gate's bytes then up's in the
    /// gate_up row; down's) and their f32 scales (gate's then up's; down's), as the slots hold
    /// them.
    pub fn fp8_parts(
        hidden: usize,
        inter: usize,
        [br, bc]: [usize; 2],
    ) -> (PartLayout, PartLayout) {
        let w = inter * hidden;
        let gate_scales = inter.div_ceil(br) * hidden.div_ceil(bc) * 4;
        let down_scales = hidden.div_ceil(br) * inter.div_ceil(bc) * 4;
        (
            ([w; 3], [0, w, 0]),
            ([gate_scales, gate_scales, down_scales], [0, gate_scales, 0]),
        )
    }

    /// A GGUF layer's layout, as its slots hold it (gate's blocks, then up's; down's).
    pub fn ggml_parts(l: &GgmlLayout) -> PartLayout {
        (
            [l.gate_bytes(), l.up_bytes(), l.down_bytes()],
            [0, l.gate_bytes(), 0],
        )
    }
}

/// The most experts per token moescope's one-token MoE kernels take (`moe_decode.rs`). FP8
/// stacks are built only where those kernels run every decode step (bf16 on a GPU, top-k at
/// most this): FP8 has no other fused kernel, and its per-expert path reads routing back, which
/// a captured decode step cannot.
pub const FUSED_DECODE_MAX_TOPK: usize = 16;

/// True when the fused GPU kernel can run in this dtype on this device.
pub fn fused_capable(device: &Device, dtype: DType) -> bool {
    device.is_cuda() && matches!(dtype, DType::BF16 | DType::F16)
}

/// The dtype a dense expert stored in `stored` is held in for compute in `compute` on `device`:
/// the compute dtype, except bf16 and f16 experts for f32 on the CPU, which stay as stored —
/// the CPU expert kernels widen them inside the dot (exact, in the order every dot form sums
/// in), so the bits are those of the widened matrices, at half the memory and half the bytes a
/// token reads. Why: widening at load doubled every expert's footprint and each decode step's
/// reads for values that carry no more information, and made an f32 cache miss cross memory
/// twice (BENCHMARKS.md §61, §70).
pub fn held_dtype(stored: DType, compute: DType, device: &Device) -> DType {
    if compute == DType::F32 && device.is_cpu() && matches!(stored, DType::BF16 | DType::F16) {
        stored
    } else {
        compute
    }
}

/// Where the MoE block gets expert weights from.
pub trait ExpertProvider: Send + Sync {
    /// The weights of (layer, expert), loading them first if needed. The returned `Arc` keeps
    /// them alive while they are applied, even if a cache evicts them meanwhile — which is what
    /// lets a cache smaller than top-k work.
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertWeights>>;
    /// How many of `layer`'s experts the forward pass may hold at once without exceeding what
    /// the provider budgets: the CPU batches one token's experts into two products when all of
    /// them fit (else it takes them one at a time, each dropped before the next is asked for).
    fn holds_at_once(&self, _layer: usize) -> usize {
        usize::MAX
    }

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
    /// now (a slot pool whose recent steps missed nothing). Asked once per decode step.
    fn speculate(&self) -> bool {
        false
    }

    /// Changes when a graph captured over [`resident_stacks`](Self::resident_stacks) no longer
    /// matches what they return (slot fills added or dropped): the step is captured again.
    fn graph_variant(&self) -> u64 {
        0
    }

    /// After each decode step: how it ran and its time (what guessing weighs its odds against).
    fn step_ran(&self, _path: StepPath, _secs: f64) {}

    /// The layer's slot pool with a device expert→slot table, for the speculative step.
    fn resident_stacks(&self, _layer: usize) -> Result<Option<Stacked>> {
        Ok(None)
    }

    /// Whether [`stacked`](Self::stacked) serves each MoE layer of a one-token step from the
    /// slot pool [`resident_stacks`](Self::resident_stacks) returns (never a temporary stack)
    /// and copies its misses on candle's stream (or on one candle's stream waits for): what a
    /// piecewise step queued whole up front needs, since its experts graphs read those pools
    /// behind gates the host opens (`graph.rs`). False in bypass and warm-up, which serve other
    /// stacks.
    fn serves_a_token_from_pools(&self) -> bool {
        false
    }

    /// The layer's exact device residency table — per expert its slot in the layer's pool, or
    /// `u32::MAX` where it is not resident — made (and kept from then on) at the first call;
    /// None where the provider has no slot pools. A gated step's kernels read it to go on
    /// without the host when a layer misses nothing (`graph.rs`).
    fn residency_table(&self, _layer: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Brings the residency tables up to date with every load and eviction since the last call,
    /// queued on candle's stream; whether anything changed.
    fn sync_residency(&self) -> Result<bool> {
        Ok(false)
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

    /// Warm-up mode: the forward pass runs only to compile kernels and allocate buffers, and its
    /// outputs are thrown away, so any weights of the right shape will do. A provider that would
    /// have to read experts serves zeros instead: nothing read, cached or counted. (Reading the
    /// real ones cost selective 17–21 s of a 48-layer model's load on an H200, BENCHMARKS.md §8.)
    fn set_warming(&self, _on: bool) {}
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

/// For each expert, its rows `idx[e]` of the `[tokens, h]` values `xs`, one after another.
fn gathered_rows(xs: &[f32], h: usize, idx: &[&[u32]]) -> Vec<Vec<f32>> {
    idx.iter()
        .map(|rows| {
            rows.iter()
                .flat_map(|&r| xs[r as usize * h..(r as usize + 1) * h].iter().copied())
                .collect()
        })
        .collect()
}

/// Matrix j of `mats` times its rows `x(j)` (`m(j)` of them, f32), each `[m(j), out]` in f32:
/// the block-quantized matrices `quant_rows::stacked_each` takes in one trip through the pool,
/// the rest by candle on the same rows — `QMatMul::forward`'s bits either way.
fn products<'a>(
    mats: &[&QMatMul],
    x: impl Fn(usize) -> &'a [f32],
    m: impl Fn(usize) -> usize,
    dev: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    use candle_core::quantized::QTensor;
    let blocks: Vec<(usize, &QTensor)> = mats
        .iter()
        .enumerate()
        .filter_map(|(j, q)| match q {
            QMatMul::QTensor(t) => Some((j, t.as_ref())),
            _ => None,
        })
        .collect();
    let qs: Vec<&QTensor> = blocks.iter().map(|&(_, q)| q).collect();
    let mut done: Vec<Option<Vec<f32>>> = vec![None; mats.len()];
    for (&(j, _), y) in blocks
        .iter()
        .zip(super::quant_rows::stacked_each(&qs, |b| x(blocks[b].0)))
    {
        done[j] = y;
    }
    done.into_iter()
        .enumerate()
        .map(|(j, y)| {
            let y = match y {
                Some(y) => {
                    let n = y.len() / m(j).max(1);
                    Tensor::from_vec(y, (m(j), n), dev)?
                }
                None => {
                    let xj = Tensor::from_slice(x(j), (m(j), x(j).len() / m(j).max(1)), dev)?;
                    product(mats[j], &xj)?
                }
            };
            Ok(y)
        })
        .collect()
}

/// The experts' down outputs of a one-token stacked step, as `dtype`: those the stacked product
/// made (`done[e]`), the rest by `forward(e, h_e)` — candle's product on the same h, as
/// [`ExpertWeights::forward`] runs it.
fn downs_as<E>(
    done: Vec<Option<Tensor>>,
    hs: &[Tensor],
    dtype: DType,
    forward: impl Fn(usize, &Tensor) -> std::result::Result<Tensor, E>,
) -> Result<Vec<Tensor>>
where
    super::error::ModelError: From<E>,
{
    done.into_iter()
        .zip(hs)
        .enumerate()
        .map(|(e, (y, h))| {
            let y = match y {
                Some(y) => y,
                None => forward(e, h)?,
            };
            Ok(y.to_dtype(dtype)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    fn quantized_expert(
        seed: usize,
        h: usize,
        i: usize,
        gu: GgmlDType,
        dn: GgmlDType,
    ) -> ExpertWeights {
        let m = |rows, cols, s, t| {
            let w = crate::util::test_matrix(rows, cols, s, 251, 1.0 / 64.0);
            QMatMul::from_qtensor(QTensor::quantize(&w, t).unwrap()).unwrap()
        };
        ExpertWeights::quantized(
            GateUp::Fused(m(2 * i, h, seed, gu)),
            m(h, i, seed + 1, dn),
            i,
            0,
        )
    }

    /// The block kernels' layouts: GGML's row sizes, only types they decode, only whole blocks.
    /// An FP8 self-fill puts each part where a host load puts it: gate's bytes then up's in
    /// the slot's [2I, H] row, down's in its [H, I] row, and the scales the same way in rows of
    /// the scale pools' shapes — [2·ceil(I/br), ceil(H/bc)] and [ceil(H/br), ceil(I/bc)] f32 —
    /// also where the blocks do not divide the matrices.
    #[test]
    fn fp8_parts_fill_the_slot_and_scale_rows_as_host_loads_do() {
        for (h, i, [br, bc]) in [
            (64, 32, [32, 32]),
            (100, 40, [32, 32]),
            (2048, 768, [128, 128]),
        ] {
            let ((w, w_at), (sc, sc_at)) = DeviceFill::fp8_parts(h, i, [br, bc]);
            assert_eq!(w, [i * h; 3]);
            assert_eq!(w_at, [0, i * h, 0], "up after gate in the [2I, H] row");
            let gate_up_row = 2 * i.div_ceil(br) * h.div_ceil(bc) * 4;
            let down_row = h.div_ceil(br) * i.div_ceil(bc) * 4;
            assert_eq!(sc[0] + sc[1], gate_up_row, "{h}x{i}");
            assert_eq!(sc_at, [0, gate_up_row / 2, 0], "{h}x{i}");
            assert_eq!(sc[2], down_row, "{h}x{i}");
        }
        // The tiny FP8 fixture: 2 × 1 down scales, 1 × 2 for gate and up (its file's shapes).
        let (_, (sc, _)) = DeviceFill::fp8_parts(64, 32, [32, 32]);
        assert_eq!(sc, [2 * 4, 2 * 4, 2 * 4]);
    }

    #[test]
    fn ggml_layouts_are_whole_blocks_of_decoded_types() {
        use super::super::lut4::Lut4;
        use StDtype as G;
        let l = GgmlLayout::new([G::Q4K, G::Q4K, G::Q6K], 2048, 768).unwrap();
        // Qwen3-30B-A3B's expert in Q4_K_M: 144 bytes per 256 weights, Q6_K 210.
        assert_eq!(l.gate_bytes(), 768 * 8 * 144);
        assert_eq!(l.gate_up_bytes(), 2 * 768 * 8 * 144);
        assert_eq!(l.down_bytes(), 2048 * 3 * 210);
        assert_eq!(GgmlLayout::row_bytes(G::Q8_0, 64), 68);
        assert_eq!(GgmlLayout::row_bytes(G::Q5K, 512), 352);
        assert_eq!(GgmlLayout::row_bytes_ggml(GgmlDType::Q5K, 512), 352);
        // In IQ4_XS: 136 bytes per 256 weights; IQ4_NL 18 per 32.
        let (xs, nl) = (G::Lut4(Lut4::Iq4Xs), G::Lut4(Lut4::Iq4Nl));
        let l = GgmlLayout::new([xs, xs, G::Q5K], 2048, 768).unwrap();
        assert_eq!(l.gate_bytes(), 768 * 8 * 136);
        assert_eq!(GgmlLayout::row_bytes(nl, 96), 54);
        assert_eq!(
            l.to_string(),
            "GGUF blocks (gate IQ4_XS, up IQ4_XS, down Q5_K; hidden 2048, intermediate 768)"
        );
        for t in [
            G::Q4_0,
            G::Q4_1,
            G::Q5_0,
            G::Q5_1,
            G::Q8_0,
            G::Q4K,
            G::Q5K,
            G::Q6K,
            nl,
            xs,
            G::Lut4(Lut4::Mxfp4),
        ] {
            assert!(GgmlLayout::kernel_type(t).is_some(), "{t:?}");
        }
        // MXFP4: 17 bytes per 32 weights (gpt-oss-style MXFP4_MOE experts, Q8_0 beside them).
        let mx = G::Lut4(Lut4::Mxfp4);
        let l = GgmlLayout::new([mx, mx, mx], 2048, 768).unwrap();
        assert_eq!(l.gate_bytes(), 768 * 64 * 17);
        assert_eq!(l.down_bytes(), 2048 * 24 * 17);
        assert!(GgmlLayout::new([mx, mx, mx], 2048, 48).is_none());
        // Types the kernels do not decode, rows of part blocks, empty matrices.
        for t in [G::Q2K, G::Q3K, G::F16, G::BF16, G::F32] {
            assert!(
                GgmlLayout::new([t, G::Q4K, G::Q4K], 512, 256).is_none(),
                "{t:?}"
            );
        }
        assert!(GgmlLayout::kernel_type_ggml(GgmlDType::Q8K).is_none());
        assert!(GgmlLayout::new([G::Q4K, G::Q4K, G::Q4K], 512, 96).is_none());
        assert!(GgmlLayout::new([xs, xs, nl], 128, 96).is_none());
        assert!(GgmlLayout::new([xs, xs, nl], 256, 96).is_some());
        assert!(GgmlLayout::new([G::Q8_0, G::Q8_0, G::Q8_0], 96, 0).is_none());
        assert!(GgmlLayout::new([G::Q8_0, G::Q8_0, G::Q8_0], 96, 64).is_some());
    }

    /// One token through several quantized experts with their gate_up products in one shared-
    /// input call: each expert's output bit for bit what its own `forward` gives (Q4_K and Q8_0
    /// gate_up, Q6_K / Q4_K down, as `Q4_K_M` and `Q8_0` files store them).
    #[test]
    fn quantized_experts_of_one_token_are_their_own_forwards() {
        let (h, i) = (512, 256);
        for (gu, dn) in [
            (GgmlDType::Q4K, GgmlDType::Q6K),
            (GgmlDType::Q8_0, GgmlDType::Q8_0),
            (GgmlDType::Q4K, GgmlDType::Q4K),
        ] {
            let experts: Vec<ExpertWeights> = (0..4)
                .map(|e| quantized_expert(10 * e + 1, h, i, gu, dn))
                .collect();
            let refs: Vec<&ExpertWeights> = experts.iter().collect();
            for dtype in [DType::F32, DType::BF16] {
                let x = crate::util::test_matrix(1, h, 7, 97, 1.0 / 16.0)
                    .to_dtype(dtype)
                    .unwrap();
                let fused = ExpertWeights::quantized_one_token(&x, &refs).unwrap();
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                {
                    assert!(
                        fused.is_some(),
                        "{gu:?}: candle's shared-input GEMV applies here"
                    );
                }
                let Some(fused) = fused else { continue };
                for (w, y) in experts.iter().zip(&fused) {
                    let want = w.forward(&x).unwrap();
                    assert_eq!(y.dtype(), dtype);
                    let bits = |t: &Tensor| crate::util::f32_bits(&t.to_dtype(DType::F32).unwrap());
                    assert_eq!(bits(y), bits(&want), "{gu:?}/{dn:?} {dtype:?}");
                }
            }
        }
        // Not every expert quantized with a fused gate_up: the caller's path.
        let dense = ExpertWeights::new(
            Tensor::zeros((2 * i, h), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((h, i), DType::F32, &Device::Cpu).unwrap(),
            i,
        );
        let q = quantized_expert(1, h, i, GgmlDType::Q4K, GgmlDType::Q6K);
        let x = Tensor::zeros((1, h), DType::F32, &Device::Cpu).unwrap();
        assert!(
            ExpertWeights::quantized_one_token(&x, &[&q, &dense])
                .unwrap()
                .is_none()
        );
    }

    /// A prompt's tokens through block-quantized experts, each on its own rows (one, a few, more
    /// than a token tile, repeated rows), gate and up fused or apart, Q8_0 / Q4_K / Q6_K downs,
    /// in f32 and bf16: each output is the bits of the expert's own `forward` on its rows.
    #[test]
    fn quantized_experts_of_a_prompt_are_their_own_forwards() {
        let (h, i, t) = (512, 256, 40);
        let apart = |seed: usize, t: GgmlDType| {
            let m = |rows, cols, s| {
                let w = crate::util::test_matrix(rows, cols, s, 251, 1.0 / 64.0);
                QMatMul::from_qtensor(QTensor::quantize(&w, t).unwrap()).unwrap()
            };
            ExpertWeights::quantized(
                GateUp::Apart(m(i, h, seed), m(i, h, seed + 5)),
                m(h, i, seed + 1),
                i,
                0,
            )
        };
        let idx: [Vec<u32>; 5] = [
            vec![3],
            vec![0, 7, 8, 39],
            (0..t as u32).collect(),
            (0..t as u32).step_by(2).collect(),
            vec![5, 5, 6],
        ];
        let refs_idx: Vec<&[u32]> = idx.iter().map(|v| v.as_slice()).collect();
        for (gu, dn) in [
            (GgmlDType::Q8_0, GgmlDType::Q8_0),
            (GgmlDType::Q4K, GgmlDType::Q6K),
            (GgmlDType::Q4K, GgmlDType::Q4K),
            (GgmlDType::Q5K, GgmlDType::Q8_0),
        ] {
            let mut experts: Vec<ExpertWeights> = (0..4)
                .map(|e| quantized_expert(10 * e + 1, h, i, gu, dn))
                .collect();
            experts.push(apart(77, gu));
            let refs: Vec<&ExpertWeights> = experts.iter().collect();
            for dtype in [DType::F32, DType::BF16] {
                let x = crate::util::test_matrix(t, h, 7, 97, 1.0 / 16.0)
                    .to_dtype(dtype)
                    .unwrap();
                let got =
                    ExpertWeights::quantized_stacked_few_tokens(&x, &refs, &refs_idx).unwrap();
                let Some(got) = got else {
                    // Only where candle packs the gate_ups in a layout not reproduced here.
                    let q = QTensor::quantize(&crate::util::test_matrix(2 * i, h, 1, 251, 1.0), gu);
                    assert!(
                        !super::super::quant_rows::takes(&q.unwrap(), 1),
                        "{gu:?} refused"
                    );
                    continue;
                };
                for ((w, rows), y) in experts.iter().zip(&idx).zip(&got) {
                    let sel = Tensor::from_vec(rows.clone(), rows.len(), &Device::Cpu).unwrap();
                    let xe = x.index_select(&sel, 0).unwrap();
                    let want = crate::model::cpu_gemv::widened(&w.forward(&xe).unwrap()).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(y),
                        bits(&want),
                        "{gu:?}/{dn:?} {dtype:?} rows {rows:?}"
                    );
                }
            }
        }
        // A row outside x, or an expert that is not block-quantized: the caller's path.
        let q = quantized_expert(1, h, i, GgmlDType::Q8_0, GgmlDType::Q8_0);
        let x = Tensor::zeros((2, h), DType::F32, &Device::Cpu).unwrap();
        let out = ExpertWeights::quantized_stacked_few_tokens(&x, &[&q], &[&[2]]).unwrap();
        assert!(out.is_none());
        let dense = ExpertWeights::new(
            Tensor::zeros((2 * i, h), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((h, i), DType::F32, &Device::Cpu).unwrap(),
            i,
        );
        let out = ExpertWeights::quantized_stacked_few_tokens(&x, &[&q, &dense], &[&[0], &[1]]);
        assert!(out.unwrap().is_none());
    }

    /// Table-coded experts of one token (MXFP4, IQ4_NL, IQ4_XS, mixed as files mix them), every
    /// gate_up row in one product and every down row in another: the bits of each expert's own
    /// forward, in f32 and bf16; experts that are not all table-coded with a fused gate_up are
    /// left to the caller.
    #[test]
    fn table_coded_experts_of_one_token_are_their_own_forwards() {
        use super::super::lut4::{Lut4, Lut4Matrix, sample_format};
        let (h, i) = (256, 96);
        let formats = [
            (Lut4::Mxfp4, Lut4::Mxfp4),
            (Lut4::Iq4Xs, Lut4::Iq4Nl),
            (Lut4::Iq4Nl, Lut4::Iq4Nl),
            (Lut4::Iq4Xs, Lut4::Mxfp4),
            (Lut4::Mxfp4, Lut4::Iq4Nl),
        ];
        let expert = |seed: usize| {
            let (fg, fd) = formats[seed / 3];
            let gu = Lut4Matrix::new(fg, sample_format(fg, 2 * i, h, seed), [2 * i, h]).unwrap();
            let dn = Lut4Matrix::new(fd, sample_format(fd, h, i, seed + 1), [h, i]).unwrap();
            let bytes = gu.bytes() + dn.bytes();
            ExpertWeights::lut4(Lut4GateUp::Fused(gu), BlockMat::Lut4(dn), i, bytes)
        };
        let experts: Vec<ExpertWeights> = (0..5).map(|e| expert(3 * e)).collect();
        let refs: Vec<&ExpertWeights> = experts.iter().collect();
        for dtype in [DType::F32, DType::BF16] {
            let x = crate::util::test_matrix(1, h, 7, 97, 1.0 / 16.0)
                .to_dtype(dtype)
                .unwrap();
            let batched = ExpertWeights::lut4_one_token(&x, &refs).unwrap().unwrap();
            for (w, y) in experts.iter().zip(&batched) {
                let want = w.forward(&x).unwrap();
                assert_eq!(y.dtype(), dtype);
                let bits = |t: &Tensor| crate::util::f32_bits(&t.to_dtype(DType::F32).unwrap());
                assert_eq!(bits(y), bits(&want), "{dtype:?}");
                assert!(bits(y).iter().any(|&b| b != 0));
            }
        }
        // A prompt's rows, a few per expert (one expert with the row kernels' most).
        let most = crate::model::cpu_gemv::MAX_TOKENS as u32;
        let idx: Vec<Vec<u32>> = vec![
            vec![0],
            vec![1, 4],
            (0..most).collect(),
            vec![9],
            vec![3, 9],
        ];
        let refs_idx: Vec<&[u32]> = idx.iter().map(|v| v.as_slice()).collect();
        for dtype in [DType::F32, DType::BF16] {
            let x = crate::util::test_matrix(10, h, 5, 97, 1.0 / 16.0)
                .to_dtype(dtype)
                .unwrap();
            let ys = ExpertWeights::lut4_few_tokens(&x, &refs, &refs_idx)
                .unwrap()
                .unwrap();
            for ((w, y), rows) in experts.iter().zip(&ys).zip(&idx) {
                let sel = Tensor::from_vec(rows.clone(), rows.len(), &Device::Cpu).unwrap();
                let xe = x.index_select(&sel, 0).unwrap();
                let want = crate::model::cpu_gemv::widened(&w.forward(&xe).unwrap()).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(y), bits(&want), "{dtype:?} rows {rows:?}");
            }
        }
        // More tokens than the row kernels take: the caller's path.
        let long: Vec<Vec<u32>> = vec![(0..most + 1).map(|r| r % 10).collect()];
        let x = crate::util::test_matrix(10, h, 5, 97, 1.0 / 16.0);
        assert!(
            ExpertWeights::lut4_few_tokens(&x, &refs[..1], &[long[0].as_slice()])
                .unwrap()
                .is_none()
        );
        let q = quantized_expert(1, h, i, GgmlDType::Q8_0, GgmlDType::Q8_0);
        let x = Tensor::zeros((1, h), DType::F32, &Device::Cpu).unwrap();
        assert!(
            ExpertWeights::lut4_one_token(&x, &[&experts[0], &q])
                .unwrap()
                .is_none()
        );
        // Table-coded gate_up beside a down in a candle block type (IQ4_XS files' Q5_K downs):
        // one token still in two trips, each output its expert's own forward, bit for bit.
        let mixed: Vec<ExpertWeights> = (0..4)
            .map(|e| {
                let gu = Lut4Matrix::new(
                    Lut4::Iq4Xs,
                    sample_format(Lut4::Iq4Xs, 2 * i, h, e),
                    [2 * i, h],
                )
                .unwrap();
                let down = if e % 2 == 0 {
                    BlockMat::Lut4(
                        Lut4Matrix::new(Lut4::Iq4Nl, sample_format(Lut4::Iq4Nl, h, i, e), [h, i])
                            .unwrap(),
                    )
                } else {
                    let w = crate::util::test_matrix(h, i, e, 89, 1.0 / 32.0);
                    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
                    BlockMat::Candle(QMatMul::from_qtensor(q).unwrap())
                };
                ExpertWeights::lut4(Lut4GateUp::Fused(gu), down, i, 0)
            })
            .collect();
        let refs: Vec<&ExpertWeights> = mixed.iter().collect();
        for dtype in [DType::F32, DType::BF16] {
            let x = crate::util::test_matrix(1, h, 3, 97, 1.0 / 16.0)
                .to_dtype(dtype)
                .unwrap();
            let batched = ExpertWeights::lut4_one_token(&x, &refs).unwrap().unwrap();
            for (w, y) in mixed.iter().zip(&batched) {
                let bits = |t: &Tensor| crate::util::f32_bits(&t.to_dtype(DType::F32).unwrap());
                assert_eq!(bits(y), bits(&w.forward(&x).unwrap()), "mixed {dtype:?}");
            }
        }
    }
}
