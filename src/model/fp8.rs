//! Block-scaled FP8 checkpoints, as Qwen (and DeepSeek before it) publish them: `config.json`
//! carries `quantization_config {quant_method: "fp8", fmt: "e4m3", weight_block_size: [128, 128]}`,
//! each quantized linear layer stores its matrix `X.weight` as `F8_E4M3` and beside it
//! `X.weight_scale_inv`, one f32 per block of `weight_block_size` (rows × columns, the last block
//! of a row or column possibly partial): the real matrix is `weight × weight_scale_inv`, block by
//! block. Layers the writer left unquantized (router, norms, embedding, usually lm_head) are
//! plain floats and read as such — which tensors are FP8 is decided by the file, not guessed.
//!
//! moescope keeps the FP8 bytes as they are and dequantises inside the product ([`Fp8Matrix`]):
//! on the CPU one pass per row (each byte decoded through a 256-entry table, times its block's
//! scale, in f32) followed by the dot products for every token; on a GPU the matrix is widened
//! on the device just before its product. Activations are not quantized (`activation_scheme` is
//! for engines with FP8 tensor cores), so the result is the product with the dequantised matrix —
//! what the fidelity tests compare against.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cpu_gemv::dot_with;
use super::error::{ModelError, Result};

/// The block scheme of an FP8 checkpoint (from `config.json`'s `quantization_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fp8Scheme {
    /// Rows × columns of the matrix that share one scale.
    pub block: [usize; 2],
}

impl Fp8Scheme {
    /// Reads `quantization_config` from the top level of a `config.json` value. `None` when the
    /// checkpoint is not quantized; an error naming the field for any scheme moescope does not
    /// read (another `quant_method`, `fmt: "e5m2"`, per-tensor scales).
    pub fn from_config(v: &Value, path: &Path) -> Result<Option<Self>> {
        let Some(q) = v.get("quantization_config") else {
            return Ok(None);
        };
        let err = |field: &str, msg: String| ModelError::Config {
            file: path.to_path_buf(),
            field: format!("quantization_config.{field}"),
            msg,
        };
        if q.is_null() {
            return Ok(None);
        }
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .ok_or_else(|| err("quant_method", "missing or not a string".into()))?;
        if method != "fp8" {
            return Err(err(
                "quant_method",
                format!(
                    "\"{method}\" is not supported: moescope reads block-scaled \"fp8\" safetensors \
                     (Qwen's published FP8 layout) and GGUF files"
                ),
            ));
        }
        match q.get("fmt") {
            None | Some(Value::Null) => {}
            Some(Value::String(f)) if f == "e4m3" || f == "float8_e4m3fn" => {}
            Some(other) => {
                return Err(err(
                    "fmt",
                    format!("{other} is not supported (expected \"e4m3\")"),
                ));
            }
        }
        // "static" means the checkpoint carries activation scales that its runtime multiplies
        // inputs by; moescope never quantizes activations, so it would compute another model.
        // transformers' FP8 reader takes "dynamic" alone too.
        match q.get("activation_scheme") {
            None | Some(Value::Null) => {}
            Some(Value::String(a)) if a == "dynamic" => {}
            Some(other) => {
                return Err(err(
                    "activation_scheme",
                    format!(
                        "{other} is not supported (expected \"dynamic\": activations are not \
                         quantized, only the weights are)"
                    ),
                ));
            }
        }
        let block = match q.get("weight_block_size") {
            None | Some(Value::Null) => {
                return Err(err(
                    "weight_block_size",
                    "missing: FP8 with one scale per tensor is not supported \
                     (expected block scales, e.g. [128, 128])"
                        .into(),
                ));
            }
            Some(Value::Array(a)) if a.len() == 2 => {
                let dim = |i: usize| {
                    a[i].as_u64()
                        .filter(|&n| n > 0 && n <= 1 << 20)
                        .map(|n| n as usize)
                };
                match (dim(0), dim(1)) {
                    (Some(r), Some(c)) => [r, c],
                    _ => {
                        return Err(err(
                            "weight_block_size",
                            format!("{} is not two positive integers", Value::Array(a.clone())),
                        ));
                    }
                }
            }
            Some(other) => {
                return Err(err(
                    "weight_block_size",
                    format!("{other} is not two positive integers"),
                ));
            }
        };
        Ok(Some(Fp8Scheme { block }))
    }

    /// The scale tensor's shape for a matrix of `shape` [rows, columns]: one per block, the
    /// last ones covering what is left.
    pub fn scale_shape(&self, shape: &[usize]) -> Vec<usize> {
        shape
            .iter()
            .zip(self.block)
            .map(|(&n, b)| n.div_ceil(b))
            .collect()
    }

    /// `X.weight` → `X.weight_scale_inv`.
    pub fn scale_name(weight: &str) -> Option<String> {
        weight
            .strip_suffix(".weight")
            .map(|s| format!("{s}.weight_scale_inv"))
    }
}

/// Every e4m3fn value as f32: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
/// subnormal; S.1111.111 is NaN (e4m3fn has no infinities).
const fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut b = 0;
    while b < 256 {
        let exp = ((b >> 3) & 0xF) as i32;
        let man = (b & 0x7) as f32;
        let mag = if exp == 0xF && (b & 0x7) == 0x7 {
            f32::NAN
        } else if exp == 0 {
            // m/8 × 2^-6
            man / 512.0
        } else {
            let mut p = 1.0f32;
            let mut e = exp - 7;
            while e > 0 {
                p *= 2.0;
                e -= 1;
            }
            while e < 0 {
                p /= 2.0;
                e += 1;
            }
            (1.0 + man / 8.0) * p
        };
        t[b] = if b & 0x80 != 0 { -mag } else { mag };
        b += 1;
    }
    t
}

/// The decoding table (exact: every e4m3 value is an f32).
pub static E4M3: [f32; 256] = e4m3_table();

/// An FP8 matrix [rows, cols] with its block scales, multiplied without being widened as a whole.
#[derive(Debug, Clone)]
pub struct Fp8Matrix {
    held: Held,
    rows: usize,
    cols: usize,
    block: [usize; 2],
}

/// Where the bytes live: plain host vectors for the CPU kernel; on a GPU a `U8` tensor of the
/// codes and the scales as an f32 tensor [ceil(rows / block rows), ceil(cols / block cols)],
/// read by moescope's kernels (`kernels/fp8.cu`).
#[derive(Debug, Clone)]
enum Held {
    Cpu {
        weight: std::sync::Arc<Vec<u8>>,
        scale: std::sync::Arc<Vec<f32>>,
    },
    Device {
        weight: Tensor,
        scale: Tensor,
    },
}

/// Every block scale of a table `cols` blocks wide must be a finite number: a scale is amax / 448
/// of its block whatever the weights, so NaN or ±inf can only be damage, and would turn every
/// product through the block into NaN far from where it sits (the greedy pick's check would then
/// say only "not finite"). The first one that is not, in words naming its block.
pub fn check_scales_finite(scale: &[f32], cols: usize) -> std::result::Result<(), String> {
    let cols = cols.max(1);
    match scale.iter().position(|s| !s.is_finite()) {
        None => Ok(()),
        Some(i) => Err(format!(
            "its scale for block [{}, {}] (weight_scale_inv[{}][{}]) is {}: a block scale must \
             be a finite number, so the scale table is damaged",
            i / cols,
            i % cols,
            i / cols,
            i % cols,
            scale[i]
        )),
    }
}

impl Fp8Matrix {
    /// From the bytes of `X.weight` (one per element) and the already-widened f32 scales. The
    /// caller names the tensor in errors; here only the sizes are checked.
    pub fn new(
        weight: &[u8],
        shape: [usize; 2],
        scale: Vec<f32>,
        block: [usize; 2],
        device: &Device,
    ) -> candle_core::Result<Self> {
        let [rows, cols] = shape;
        let sshape = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
        if weight.len() != rows * cols {
            candle_core::bail!(
                "{} bytes of FP8 weights for a [{rows}, {cols}] matrix ({} expected)",
                weight.len(),
                rows * cols
            )
        }
        if scale.len() != sshape[0] * sshape[1] {
            candle_core::bail!(
                "{} scales for a [{rows}, {cols}] matrix in {}×{} blocks ({sshape:?} expected)",
                scale.len(),
                block[0],
                block[1]
            )
        }
        if let Err(msg) = check_scales_finite(&scale, sshape[1]) {
            candle_core::bail!("{msg}")
        }
        let held = if device.is_cpu() {
            Held::Cpu {
                weight: std::sync::Arc::new(weight.to_vec()),
                scale: std::sync::Arc::new(scale),
            }
        } else {
            Held::Device {
                weight: Tensor::from_raw_buffer(weight, DType::U8, &[rows, cols], device)?,
                scale: Tensor::from_vec(scale, (sshape[0], sshape[1]), device)?,
            }
        };
        Ok(Fp8Matrix {
            held,
            rows,
            cols,
            block,
        })
    }

    /// A matrix already on a GPU: `weight` U8 [rows, cols] of e4m3 codes and `scale` f32
    /// [ceil(rows / block rows), ceil(cols / block cols)], both contiguous — e.g. views into
    /// the rows of FP8 expert stacks, which the matrix then shares.
    pub fn from_device(
        weight: Tensor,
        scale: Tensor,
        block: [usize; 2],
    ) -> candle_core::Result<Self> {
        let (rows, cols) = weight.dims2()?;
        let want = [
            rows.div_ceil(block[0].max(1)),
            cols.div_ceil(block[1].max(1)),
        ];
        if weight.dtype() != DType::U8
            || scale.dtype() != DType::F32
            || scale.dims() != want
            || block.contains(&0)
            || !weight.is_contiguous()
            || !scale.is_contiguous()
            || !weight.device().is_cuda()
            || !weight.device().same_device(scale.device())
        {
            candle_core::bail!(
                "FP8 matrix from device tensors: weight {:?} {:?}, scale {:?} {:?}, blocks {block:?} \
                 (expected contiguous U8 [rows, cols] and f32 {want:?} on one GPU)",
                weight.dtype(),
                weight.dims(),
                scale.dtype(),
                scale.dims()
            )
        }
        Ok(Fp8Matrix {
            held: Held::Device { weight, scale },
            rows,
            cols,
            block,
        })
    }

    /// The codes (U8 [rows, cols]) and f32 scales of a matrix held on a GPU; None on the CPU.
    pub fn device_parts(&self) -> Option<(&Tensor, &Tensor)> {
        match &self.held {
            Held::Device { weight, scale } => Some((weight, scale)),
            Held::Cpu { .. } => None,
        }
    }

    /// Rows × columns of weights per scale.
    pub fn block(&self) -> [usize; 2] {
        self.block
    }

    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Bytes held: one per weight, four per scale.
    pub fn bytes(&self) -> u64 {
        let scales = self.rows.div_ceil(self.block[0]) * self.cols.div_ceil(self.block[1]);
        (self.rows * self.cols + 4 * scales) as u64
    }

    /// The dense matrix (weight × its block's scale, in f32, rounded once) as `dtype`.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let dense = match &self.held {
            Held::Cpu { weight, scale } => {
                let mut out = vec![0f32; self.rows * self.cols];
                for (r, row) in out.chunks_mut(self.cols).enumerate() {
                    self.decode_row(&weight[r * self.cols..(r + 1) * self.cols], scale, r, row);
                }
                Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?
            }
            Held::Device { weight, scale } => self.device_dequantize(weight, scale, dtype)?,
        };
        dense.to_dtype(dtype)
    }

    /// x·Wᵀ for x [n, cols] in any float dtype; the result in x's dtype.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, cols) = x.dims2()?;
        if cols != self.cols {
            candle_core::bail!(
                "FP8 product: input has {cols} columns, the matrix {:?}",
                self.dims()
            )
        }
        match &self.held {
            Held::Device { weight, scale } => self.device_forward(weight, scale, x),
            Held::Cpu { weight, scale } => {
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let out = self.cpu_product(weight, scale, &xs, n);
                Tensor::from_vec(out, (n, self.rows), x.device())?.to_dtype(x.dtype())
            }
        }
    }

    /// The CPU product: rows spread over threads. For each row and each block of columns the
    /// products with the raw e4m3 values are summed (eight lanes, fixed order), then the sum is
    /// multiplied by the block's scale — the order FP8 kernels use, and the same arithmetic for
    /// one token as for many (a row is decoded once and dotted with every token), so the result
    /// depends neither on the thread count nor on how tokens are batched.
    fn cpu_product(&self, w: &[u8], s: &[f32], xs: &[f32], n: usize) -> Vec<f32> {
        let (cols, bc) = (self.cols, self.block[1]);
        let scols = cols.div_ceil(bc);
        let kernel = row_kernel();
        super::cpu_gemv::rows_product(self.rows, cols, n, |r, out| {
            let srow = &s[(r / self.block[0]) * scols..][..scols];
            kernel(&w[r * cols..(r + 1) * cols], srow, bc, xs, out);
        })
    }

    /// Row `r` widened: each byte through the table, times the scale of its block.
    fn decode_row(&self, bytes: &[u8], s: &[f32], r: usize, out: &mut [f32]) {
        let [br, bc] = self.block;
        let srow = &s[(r / br) * self.cols.div_ceil(bc)..];
        for (j, (o, b)) in out.chunks_mut(bc).zip(bytes.chunks(bc)).enumerate() {
            let scale = srow[j];
            for (o, &b) in o.iter_mut().zip(b) {
                *o = E4M3[b as usize] * scale;
            }
        }
    }

    /// On a GPU: one warp per row for a few tokens (the decode case: nothing dense is written);
    /// for more, the matrix is dequantised once and multiplied by cuBLAS.
    #[cfg(feature = "cuda")]
    fn device_forward(&self, w: &Tensor, s: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        const GEMV_TOKENS: usize = 8;
        let n = x.dim(0)?;
        if n <= GEMV_TOKENS && matches!(x.dtype(), DType::BF16 | DType::F32) {
            return gpu::gemv(w, s, &x.contiguous()?, self.dims(), self.block);
        }
        let dense = self.device_dequantize(w, s, x.dtype())?;
        x.matmul(&dense.t()?)
    }

    #[cfg(feature = "cuda")]
    fn device_dequantize(
        &self,
        w: &Tensor,
        s: &Tensor,
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        let out = if dtype == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        gpu::dequantize(w, s, self.dims(), self.block, out)?.to_dtype(dtype)
    }

    #[cfg(not(feature = "cuda"))]
    fn device_forward(&self, w: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Tensor> {
        candle_core::bail!(
            "FP8 matrices on {:?} need a build with the cuda feature",
            w.device()
        )
    }

    #[cfg(not(feature = "cuda"))]
    fn device_dequantize(&self, w: &Tensor, _: &Tensor, _: DType) -> candle_core::Result<Tensor> {
        candle_core::bail!(
            "FP8 matrices on {:?} need a build with the cuda feature",
            w.device()
        )
    }
}

/// Launches of `kernels/fp8.cu`.
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Storage, Tensor};
    use half::bf16;

    const PTX: &str = include_str!("kernels/fp8.ptx");
    const MODULE: &str = "moescope_fp8";
    const WARPS_PER_BLOCK: u32 = 8;

    fn err(what: &str, e: impl std::fmt::Display) -> candle_core::Error {
        candle_core::Error::Msg(format!("FP8 kernel ({what}): {e}"))
    }

    /// y [n, rows] = x [n, cols] · Wᵀ, x bf16 or f32 (contiguous), y in x's dtype.
    pub fn gemv(
        w: &Tensor,
        s: &Tensor,
        x: &Tensor,
        [rows, cols]: [usize; 2],
        [br, bc]: [usize; 2],
    ) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let dev = x.device().as_cuda_device()?.clone();
        let (ws, wl) = w.storage_and_layout();
        let (ss, sl) = s.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (Storage::Cuda(ws), Storage::Cuda(ss), Storage::Cuda(xs)) = (&*ws, &*ss, &*xs) else {
            return Err(err("device", "every input must be on the GPU"));
        };
        let wv = ws.as_cuda_slice::<u8>()?.slice(wl.start_offset()..);
        let sv = ss.as_cuda_slice::<f32>()?.slice(sl.start_offset()..);
        let (r, c, br, bc, n_) = (rows as i32, cols as i32, br as i32, bc as i32, n as i32);
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(WARPS_PER_BLOCK), 1, 1),
            block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // One launch per element type: the kernels differ only in it.
        macro_rules! launch {
            ($t:ty, $name:literal) => {{
                let xv = xs.as_cuda_slice::<$t>()?.slice(xl.start_offset()..);
                // SAFETY: every element written by the kernel (one warp per row, every token).
                let y = unsafe { dev.alloc::<$t>(n * rows)? };
                let f = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&wv).arg(&sv).arg(&xv).arg(&y);
                b.arg(&r).arg(&c).arg(&br).arg(&bc).arg(&n_);
                // SAFETY: argument order and types match the kernel; sizes from the matrix.
                unsafe { b.launch(cfg) }.map_err(|e| err("gemv launch", e))?;
                CudaStorage::wrap_cuda_slice(y, dev)
            }};
        }
        let y = match x.dtype() {
            DType::BF16 => launch!(bf16, "fp8_gemv_bf16"),
            DType::F32 => launch!(f32, "fp8_gemv_f32"),
            other => return Err(err("gemv", format!("{other:?} activations"))),
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(y),
            (n, rows),
            BackpropOp::none(),
            false,
        ))
    }

    /// The dense [rows, cols] matrix in `dtype` (bf16 or f32).
    pub fn dequantize(
        w: &Tensor,
        s: &Tensor,
        [rows, cols]: [usize; 2],
        [br, bc]: [usize; 2],
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        let dev = w.device().as_cuda_device()?.clone();
        let (ws, wl) = w.storage_and_layout();
        let (ss, sl) = s.storage_and_layout();
        let (Storage::Cuda(ws), Storage::Cuda(ss)) = (&*ws, &*ss) else {
            return Err(err("device", "every input must be on the GPU"));
        };
        let wv = ws.as_cuda_slice::<u8>()?.slice(wl.start_offset()..);
        let sv = ss.as_cuda_slice::<f32>()?.slice(sl.start_offset()..);
        let total = rows * cols;
        let cfg = LaunchConfig {
            grid_dim: ((total as u32).div_ceil(256).clamp(1, 8192), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (r, c, br, bc) = (rows as i32, cols as i32, br as i32, bc as i32);
        macro_rules! launch {
            ($t:ty, $name:literal) => {{
                // SAFETY: every element written by the grid-stride loop.
                let out = unsafe { dev.alloc::<$t>(total)? };
                let f = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&wv)
                    .arg(&sv)
                    .arg(&out)
                    .arg(&r)
                    .arg(&c)
                    .arg(&br)
                    .arg(&bc);
                // SAFETY: argument order and types match the kernel.
                unsafe { b.launch(cfg) }.map_err(|e| err("dequantize launch", e))?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }};
        }
        let out = match dtype {
            DType::BF16 => launch!(bf16, "fp8_dequant_bf16"),
            _ => launch!(f32, "fp8_dequant_f32"),
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(out),
            (rows, cols),
            BackpropOp::none(),
            false,
        ))
    }
}

/// One e4m3 code as f32 without a table, so that a loop of them vectorises: normal codes by
/// moving the exponent from bias 7 to bias 127, subnormal ones (exponent 0) as m × 2^-9 from the
/// integer m, S.1111.111 as NaN. Exact, like the table (the tests compare all 256 codes).
#[inline(always)]
pub(crate) fn e4m3(b: u8) -> f32 {
    let b = b as u32;
    let mag = b & 0x7F;
    let normal = (mag << 20) + (120 << 23);
    let sub = ((mag & 7) as f32 * (1.0 / 512.0)).to_bits();
    let bits = if mag < 8 { sub } else { normal };
    let bits = if mag == 0x7F { 0x7FC0_0000 } else { bits };
    f32::from_bits(bits | ((b & 0x80) << 24))
}

/// One row of the product for every token: `w` the row's codes, `srow` its block scales, `bc`
/// the block width, `xs` the tokens' activations (n × cols), `out` the n results.
type RowKernel = fn(&[u8], &[f32], usize, &[f32], &mut [f32]);

/// Each token: per block, the dot with the raw codes, times the block's scale, summed in order.
#[inline(always)]
fn row_body(
    w: &[u8],
    srow: &[f32],
    bc: usize,
    xs: &[f32],
    out: &mut [f32],
    dot: impl Fn(&[u8], &[f32]) -> f32,
) {
    let cols = w.len();
    for (t, y) in out.iter_mut().enumerate() {
        let x = &xs[t * cols..(t + 1) * cols];
        let mut total = 0f32;
        for (j, (wb, xb)) in w.chunks(bc).zip(x.chunks(bc)).enumerate() {
            total = dot(wb, xb).mul_add(srow[j], total);
        }
        *y = total;
    }
}

fn row_portable(w: &[u8], srow: &[f32], bc: usize, xs: &[f32], out: &mut [f32]) {
    row_body(w, srow, bc, xs, out, |w, x| dot_with(w, x, e4m3))
}

fn row_kernel() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_gemv::avx2_fma() {
        return |w, s, bc, xs, out| {
            row_body(w, s, bc, xs, out, |w, x| {
                // SAFETY: AVX2 and FMA were detected on this CPU (avx2_fma); equal lengths.
                unsafe { super::cpu_gemv::dot_e4m3_avx2(w, x, e4m3) }
            })
        };
    }
    row_portable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views into stacks are only taken on a GPU, of U8 codes with f32 scales of the blocks'
    /// shape: anything else is refused with the shapes and types it got.
    #[test]
    fn from_device_refuses_what_is_not_a_gpu_fp8_matrix() {
        let w = Tensor::zeros((4, 8), DType::U8, &Device::Cpu).unwrap();
        let s = Tensor::ones((1, 1), DType::F32, &Device::Cpu).unwrap();
        let e = Fp8Matrix::from_device(w.clone(), s.clone(), [4, 8]).unwrap_err();
        assert!(e.to_string().contains("one GPU"), "{e}");
        let bad = Tensor::ones((2, 1), DType::F32, &Device::Cpu).unwrap();
        let e = Fp8Matrix::from_device(w.clone(), bad, [4, 8]).unwrap_err();
        assert!(
            e.to_string().contains("[2, 1]") && e.to_string().contains("[1, 1]"),
            "{e}"
        );
        let e = Fp8Matrix::from_device(w.to_dtype(DType::F32).unwrap(), s, [4, 8]).unwrap_err();
        assert!(e.to_string().contains("F32"), "{e}");
    }

    /// Every code decoded by candle's own cast (the float8 crate), as an independent decoder.
    fn candle_decode(bytes: &[u8]) -> Vec<f32> {
        Tensor::from_raw_buffer(bytes, DType::F8E4M3, &[bytes.len()], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The table agrees with the float8 crate's decoder on all 256 codes (NaN where it says NaN).
    #[test]
    fn table_decodes_every_e4m3_code() {
        let all: Vec<u8> = (0..=255).collect();
        let decoded = candle_decode(&all);
        for b in 0..=255u8 {
            let ours = E4M3[b as usize];
            let theirs = decoded[b as usize];
            if theirs.is_nan() {
                assert!(ours.is_nan(), "code {b:#04x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "code {b:#04x}");
            }
        }
        for b in 0..=255u8 {
            let (t, f) = (E4M3[b as usize], e4m3(b));
            assert!(
                t.to_bits() == f.to_bits() || (t.is_nan() && f.is_nan()),
                "code {b:#04x}"
            );
        }
        assert_eq!(E4M3[0x7E], 448.0);
        assert_eq!(E4M3[0x01], 2f32.powi(-9));
        assert!(E4M3[0x7F].is_nan() && E4M3[0xFF].is_nan());
    }

    fn sample(rows: usize, cols: usize, block: [usize; 2]) -> (Vec<u8>, Vec<f32>) {
        let w: Vec<u8> = (0..rows * cols)
            .map(|i| {
                let b = (i * 37 % 251) as u8;
                if b & 0x7F == 0x7F { b ^ 1 } else { b } // no NaN
            })
            .collect();
        let ns = rows.div_ceil(block[0]) * cols.div_ceil(block[1]);
        let s: Vec<f32> = (0..ns).map(|i| 0.001 * (1 + i % 7) as f32).collect();
        (w, s)
    }

    /// Dequantisation by the definition, element by element in f64 (then rounded).
    fn reference(w: &[u8], s: &[f32], rows: usize, cols: usize, block: [usize; 2]) -> Vec<f32> {
        let sc = cols.div_ceil(block[1]);
        let decoded = candle_decode(w);
        (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let f = decoded[i] as f64;
                (f * s[(r / block[0]) * sc + c / block[1]] as f64) as f32
            })
            .collect()
    }

    /// Partial blocks in both directions, square and oblong blocks, one token and several: the
    /// product equals x·(dequantised W)ᵀ within f32 summation error, and dequantize() equals the
    /// element-wise definition exactly.
    #[test]
    fn product_matches_the_dequantised_matrix() {
        for (rows, cols, block) in [
            (5usize, 7usize, [2usize, 3usize]),
            (48, 256, [128, 128]),
            (200, 130, [128, 128]),
            (64, 96, [32, 48]),
        ] {
            let (w, s) = sample(rows, cols, block);
            let m = Fp8Matrix::new(&w, [rows, cols], s.clone(), block, &Device::Cpu).unwrap();
            let dense = m.dequantize(DType::F32).unwrap();
            let want = reference(&w, &s, rows, cols, block);
            let got: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "dequantize {rows}x{cols} {block:?}");
            for n in [1usize, 3] {
                let x = Tensor::from_vec(
                    (0..n * cols)
                        .map(|i| ((i % 13) as f32 - 6.0) * 0.25)
                        .collect(),
                    (n, cols),
                    &Device::Cpu,
                )
                .unwrap();
                let y: Vec<Vec<f32>> = m.forward(&x).unwrap().to_vec2().unwrap();
                let r: Vec<Vec<f32>> = x.matmul(&dense.t().unwrap()).unwrap().to_vec2().unwrap();
                for (a, b) in y.iter().flatten().zip(r.iter().flatten()) {
                    let scale: f32 = b.abs().max(1e-3);
                    assert!((a - b).abs() <= 1e-5 * scale.max(1.0), "{a} vs {b}");
                }
            }
        }
    }

    /// A token's result does not depend on which other tokens share the call, nor on whether
    /// the vector build of the kernel runs — so prefill and decode, and any two machines with
    /// the same arithmetic, agree bit for bit.
    #[test]
    fn results_do_not_depend_on_batching_or_the_vector_build() {
        let (rows, cols, block) = (130usize, 300usize, [128usize, 128usize]);
        let (w, s) = sample(rows, cols, block);
        let m = Fp8Matrix::new(&w, [rows, cols], s.clone(), block, &Device::Cpu).unwrap();
        let xs: Vec<f32> = (0..4 * cols)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
            .collect();
        let x4 = Tensor::from_vec(xs.clone(), (4, cols), &Device::Cpu).unwrap();
        let all: Vec<Vec<f32>> = m.forward(&x4).unwrap().to_vec2().unwrap();
        for (t, want) in all.iter().enumerate() {
            let one = x4.narrow(0, t, 1).unwrap();
            let y: Vec<Vec<f32>> = m.forward(&one).unwrap().to_vec2().unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y[0]), bits(want), "token {t}");
        }
        let scols = cols.div_ceil(block[1]);
        let (mut a, mut b) = (vec![0f32; 4], vec![0f32; 4]);
        for r in 0..rows {
            let srow = &s[(r / block[0]) * scols..][..scols];
            let row = &w[r * cols..(r + 1) * cols];
            row_portable(row, srow, block[1], &xs, &mut a);
            row_kernel()(row, srow, block[1], &xs, &mut b);
            assert_eq!(a, b, "row {r}");
        }
    }

    /// bf16 input gives bf16 output; a wrong width is an error, not a panic.
    #[test]
    fn dtype_follows_the_input_and_widths_are_checked() {
        let (w, s) = sample(4, 8, [2, 4]);
        let m = Fp8Matrix::new(&w, [4, 8], s, [2, 4], &Device::Cpu).unwrap();
        let x = Tensor::ones((2, 8), DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x).unwrap().dtype(), DType::BF16);
        let bad = Tensor::ones((2, 7), DType::F32, &Device::Cpu).unwrap();
        assert!(m.forward(&bad).is_err());
        assert!(Fp8Matrix::new(&[0u8; 31], [4, 8], vec![1.0; 4], [2, 4], &Device::Cpu).is_err());
        assert!(Fp8Matrix::new(&[0u8; 32], [4, 8], vec![1.0; 3], [2, 4], &Device::Cpu).is_err());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut s = vec![1.0; 4];
            s[3] = bad;
            let Err(e) = Fp8Matrix::new(&[0u8; 32], [4, 8], s, [2, 4], &Device::Cpu) else {
                panic!("a non-finite scale ({bad}) is refused");
            };
            let e = e.to_string();
            assert!(
                e.contains("weight_scale_inv[1][1]") && e.contains(&bad.to_string()),
                "{e}"
            );
        }
        // Zero and negative scales are numbers (an all-zero block quantizes to scale 0).
        assert!(
            Fp8Matrix::new(
                &[0u8; 32],
                [4, 8],
                vec![0.0, -1.0, 1.0, 2.0],
                [2, 4],
                &Device::Cpu
            )
            .is_ok()
        );
    }

    #[test]
    fn config_parsing_names_the_field() {
        let p = Path::new("config.json");
        let parse = |s: &str| Fp8Scheme::from_config(&serde_json::from_str(s).unwrap(), p);
        assert_eq!(parse("{}").unwrap(), None);
        let ok = parse(
            r#"{"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                "quant_method": "fp8", "weight_block_size": [128, 128]}}"#,
        )
        .unwrap();
        assert_eq!(ok, Some(Fp8Scheme { block: [128, 128] }));
        assert_eq!(ok.unwrap().scale_shape(&[768, 2048]), vec![6, 16]);
        assert_eq!(ok.unwrap().scale_shape(&[48, 256]), vec![1, 2]);
        for (text, field) in [
            (
                r#"{"quantization_config": {"quant_method": "gptq"}}"#,
                "quant_method",
            ),
            (
                r#"{"quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128,128]}}"#,
                "fmt",
            ),
            (
                r#"{"quantization_config": {"quant_method": "fp8"}}"#,
                "weight_block_size",
            ),
            (
                r#"{"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 128]}}"#,
                "weight_block_size",
            ),
            (
                r#"{"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}"#,
                "weight_block_size",
            ),
            (
                r#"{"quantization_config": {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}}"#,
                "activation_scheme",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains(&format!("quantization_config.{field}")),
                "{text}: {e}"
            );
        }
    }
}
