//! Attention of one decode token on the GPU in three launches of moescope's own kernels
//! (`kernels/attn_decode.cu`): the q/k/v projections, then q/k norm + RoPE + the KV-cache write +
//! attention over the positions so far, then o_proj with the residual added — where candle's
//! ops took ~17 launches a layer, and a batch-1 step was bound by their latency (`bench steps`:
//! attention 43–48 % of a step at 16 % of the copy bandwidth).
//!
//! Only the device-positioned decode step uses it (the one CUDA graphs capture), in bf16, with
//! unbiased projections that are dense bf16, block-scaled FP8, or GGUF blocks of a type the
//! block kernels decode (their input then rounded to 8-bit blocks, as candle's quantized product
//! rounds it); anything else runs candle's ops (`layers.rs`). Native and
//! selective run the same attention, so they stay bit-identical; nothing here reads back to the
//! host.

use candle_core::cuda_backend::CudaStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::op::BackpropOp;
use candle_core::{DType, Storage, Tensor};
use half::bf16;

use super::error::{ModelError, Result};
use super::fp8::Fp8Matrix;
use super::layers::{Attention, DecodeInputs, KvCache};

const PTX: &str = include_str!("kernels/attn_decode.ptx");
const MODULE: &str = "moescope_attn_decode";
/// Warps per block of `gemv_rows_bf16` (its shared partial sums hold 8).
const WARPS_PER_BLOCK: u32 = 8;
/// Warps of an attention block (`ATTN_WARPS`).
const ATTN_WARPS: usize = 8;
/// Key/value heads the attention kernel takes (`ATTN_MAX_GROUPS`: its finish counters).
const MAX_GROUPS: usize = 1024;
/// Largest static KV capacity the attention kernel takes; past it, candle's ops run. The kernel
/// itself has no such limit (a grid of `cap / len` chunks a group); this is the capacity its
/// unit test covers.
pub const MAX_POSITIONS: usize = 8192;
/// Chunks of a run the combine takes in its first level (`ATTN_SUPER`), and runs a group may
/// have (`ATTN_MAX_SUPERS`: its counters) — MAX_POSITIONS over chunks of 16, over 16.
const SUPER: usize = 16;
const MAX_SUPERS: usize = 32;
/// Largest head_dim: a lane holds up to four pairs of a row's columns (`attn_decode_bf16_np4`).
const MAX_HEAD_DIM: usize = 256;
/// Dynamic shared memory a kernel may take without opting in.
const MAX_SHARED: usize = 48 * 1024;

/// How one attention launch is laid out for `nh` query and `nkv` key/value heads of `d` columns
/// over a cache of `cap` rows; `None` where the kernel does not apply.
#[derive(Debug, Clone, Copy, PartialEq)]
struct AttnShape {
    /// Entry point: `attn_decode_bf16_np{np}` (pairs of columns a lane holds), or
    /// `attn_decode_bf16_mma_np{np}` with `mma`.
    np: usize,
    /// The chunk's products on tensor cores: head_dim a multiple of 16 and groups of up to 16
    /// heads (one m16n8k16 product's rows), rows padded by 8 columns in shared memory.
    mma: bool,
    /// Positions of a chunk (`len`): one block's rows in shared memory.
    len: usize,
    /// Chunks of a group (the grid's y), enough for the capacity.
    chunks: usize,
    /// Bytes of shared memory for the chunk's keys and values (`rows_bytes`), which the
    /// combine reuses for a weight per (head, chunk) and a sum per head.
    rows_bytes: usize,
    shared: usize,
}

fn attn_shape(nh: usize, nkv: usize, d: usize, cap: usize) -> Option<AttnShape> {
    attn_shape_with(nh, nkv, d, cap, true)
}

/// [`attn_shape`], with the tensor-core entries allowed or not (the unit tests run both).
fn attn_shape_with(
    nh: usize,
    nkv: usize,
    d: usize,
    cap: usize,
    allow_mma: bool,
) -> Option<AttnShape> {
    if nkv == 0
        || !nh.is_multiple_of(nkv)
        || nkv > MAX_GROUPS
        || d == 0
        || !d.is_multiple_of(2)
        || d > MAX_HEAD_DIM
    {
        return None;
    }
    let g = nh / nkv;
    let np = (d / 2).div_ceil(32);
    let mma = allow_mma && d.is_multiple_of(16) && g <= 16;
    // Rows of keys, values and rotated queries `rs` apart (see the kernel's `rs`); the
    // tensor-core entries also keep 16 rows of bf16 probabilities, `len + 8` apart.
    let rs = if mma { d + 8 } else { d };
    // 64 positions a chunk (32 KB of rows at head_dim 128), fewer where that would not fit.
    [64, 32, 16].into_iter().find_map(|len| {
        let chunks = cap.div_ceil(len).max(1);
        let rows_bytes = (2 * len * rs * 2)
            .max(4 * g * (chunks + 2))
            .next_multiple_of(16);
        let probs = if mma { 2 * 16 * (len + 8) } else { 0 };
        let shared = rows_bytes + 4 * g * len + probs + 2 * (g * rs + d);
        let runs_fit = chunks.div_ceil(SUPER) <= MAX_SUPERS;
        (shared <= MAX_SHARED && chunks <= 65_535 && runs_fit).then_some(AttnShape {
            np,
            mma,
            len,
            chunks,
            rows_bytes,
            shared,
        })
    })
}

fn err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Input(format!("attention decode kernel ({what}): {e}"))
}

/// One projection matrix the kernels read: dense bf16, block-scaled FP8 on the device, or a GGUF
/// file's blocks on the device.
#[derive(Clone, Copy)]
enum Mat<'a> {
    Bf16(&'a Tensor),
    Fp8(&'a Fp8Matrix),
    Ggml(GgmlMat<'a>),
}

/// A GGUF matrix on the device in a type the block kernels decode (`ggml_blocks.cuh`), each row
/// whole blocks: held by candle's `QTensor`, or — a table-coded type candle does not read — as
/// its blocks in a U8 tensor (`LinearWeight::Lut4Device`).
#[derive(Clone, Copy)]
struct GgmlMat<'a> {
    blocks: GgmlBlocks<'a>,
    kernel_type: i32,
    row_bytes: i32,
    dims: [usize; 2],
    /// A table-coded type: the kernels' `_lut4` twin reads it.
    lut4: bool,
}

#[derive(Clone, Copy)]
enum GgmlBlocks<'a> {
    Candle(&'a candle_core::quantized::QTensor),
    Bytes(&'a Tensor),
}

impl<'a> GgmlMat<'a> {
    fn new(q: &'a candle_core::quantized::QTensor) -> Option<Self> {
        use super::ports::GgmlLayout;
        let t = q.dtype();
        let &[rows, cols] = q.shape().dims() else {
            return None;
        };
        let kernel_type = GgmlLayout::kernel_type_ggml(t)?;
        if !q.device().is_cuda() || cols == 0 || !cols.is_multiple_of(t.block_size()) {
            return None;
        }
        Some(GgmlMat {
            blocks: GgmlBlocks::Candle(q),
            kernel_type,
            row_bytes: i32::try_from(GgmlLayout::row_bytes_ggml(t, cols)).ok()?,
            dims: [rows, cols],
            lut4: false,
        })
    }

    /// A table-coded matrix's blocks (U8 [rows, row bytes] on the device).
    fn lut4(
        blocks: &'a Tensor,
        format: super::lut4::Lut4,
        [rows, cols]: [usize; 2],
    ) -> Option<Self> {
        use super::ports::GgmlLayout;
        let t = super::safetensors_file::StDtype::Lut4(format);
        let row_bytes = GgmlLayout::row_bytes(t, cols);
        let whole = cols > 0 && cols.is_multiple_of(format.block_weights());
        if !blocks.device().is_cuda()
            || !whole
            || blocks.dtype() != DType::U8
            || blocks.dims() != [rows, row_bytes]
        {
            return None;
        }
        Some(GgmlMat {
            blocks: GgmlBlocks::Bytes(blocks),
            kernel_type: GgmlLayout::kernel_type(t)?,
            row_bytes: i32::try_from(row_bytes).ok()?,
            dims: [rows, cols],
            lut4: true,
        })
    }

    /// The blocks' device address (valid while the tensor lives: the whole launch).
    fn addr(&self) -> Result<u64> {
        match self.blocks {
            GgmlBlocks::Candle(q) => Ok(q.device_ptr().map_err(|e| err("GGUF matrix", e))? as u64),
            GgmlBlocks::Bytes(t) => Ok(super::raw::device_range(t, 0, t.elem_count())
                .map_err(|e| err("GGUF matrix", e))?
                .0),
        }
    }
}

impl Mat<'_> {
    /// [rows, cols] ([0, 0] for a tensor that is not a matrix: no shape check passes).
    fn dims(&self) -> [usize; 2] {
        match self {
            Mat::Bf16(t) => match t.dims() {
                &[r, c] => [r, c],
                _ => [0, 0],
            },
            Mat::Fp8(m) => m.dims(),
            Mat::Ggml(m) => m.dims,
        }
    }
}

/// The matrices of an attention layer the kernels can read: q, k, v, o — all dense bf16, all
/// FP8 on the GPU in one block shape, or all GGUF blocks on the GPU (types may differ).
struct Weights<'a> {
    q: Mat<'a>,
    k: Mat<'a>,
    v: Mat<'a>,
    o: Mat<'a>,
}

fn dense(l: &super::layers::Linear) -> Option<Mat<'_>> {
    l.dense_unbiased()
        .filter(|t| t.dtype() == DType::BF16)
        .map(Mat::Bf16)
}

fn fp8(l: &super::layers::Linear) -> Option<&Fp8Matrix> {
    l.fp8_unbiased().filter(|m| m.device_parts().is_some())
}

fn fp8_parts(m: &Fp8Matrix) -> Result<(&Tensor, &Tensor)> {
    m.device_parts()
        .ok_or_else(|| err("FP8", "matrix not on the GPU"))
}

fn ggml(l: &super::layers::Linear) -> Option<Mat<'_>> {
    if let Some((blocks, format, dims)) = l.lut4_device_unbiased() {
        return GgmlMat::lut4(blocks, format, dims).map(Mat::Ggml);
    }
    match l.quantized_unbiased()? {
        candle_core::quantized::QMatMul::QTensor(q) => GgmlMat::new(q).map(Mat::Ggml),
        _ => None,
    }
}

/// The layer's four projections as `kind` reads them, when it reads all four.
fn all_four<'a>(
    a: &'a Attention,
    kind: impl Fn(&'a super::layers::Linear) -> Option<Mat<'a>>,
) -> Option<Weights<'a>> {
    Some(Weights {
        q: kind(&a.q_proj)?,
        k: kind(&a.k_proj)?,
        v: kind(&a.v_proj)?,
        o: kind(&a.o_proj)?,
    })
}

fn weights(a: &Attention) -> Option<Weights<'_>> {
    all_four(a, ggml)
        .or_else(|| all_four(a, dense))
        .or_else(|| {
            let w = all_four(a, |l| fp8(l).map(Mat::Fp8))?;
            let block = |m: Mat| match m {
                Mat::Fp8(f) => Some(f.block()),
                _ => None,
            };
            // The FP8 kernel takes one block shape for all four.
            let b = block(w.q);
            [w.k, w.v, w.o].iter().all(|&m| block(m) == b).then_some(w)
        })
}

/// `residual + attention(x)` for one decode token through the kernels, or `None` where they do
/// not apply (then the caller runs candle's ops): `x` and `residual` [1, H] bf16 on the GPU.
pub fn try_forward(
    a: &Attention,
    x: &Tensor,
    residual: &Tensor,
    layer: usize,
    cache: &KvCache,
    dec: &DecodeInputs,
) -> Result<Option<Tensor>> {
    let (nh, nkv, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let Some(w) = weights(a) else {
        return Ok(None);
    };
    let Some((kc, vc)) = cache.static_buffers(layer) else {
        return Ok(None);
    };
    let cap = kc.dim(1)?;
    let (t, hidden) = x.dims2()?;
    if t != 1
        || x.dtype() != DType::BF16
        || !x.device().is_cuda()
        || cap > MAX_POSITIONS
        || attn_shape(nh, nkv, d, cap).is_none()
        || kc.dims() != [nkv, cap, d]
        || vc.dims() != kc.dims()
        || kc.dtype() != DType::BF16
        || w.q.dims() != [nh * d, hidden]
        || w.k.dims() != [nkv * d, hidden]
        || w.v.dims() != [nkv * d, hidden]
        || w.o.dims() != [hidden, nh * d]
        || residual.dims() != [1, hidden]
    {
        return Ok(None);
    }
    let (q, k, v) = project(x, &w)?;
    let ctx = attend(a, [&q, &k, &v], dec, &kc, &vc, cap, true)?;
    Ok(Some(gemv_residual(w.o, &ctx, residual)?))
}

/// Binds `$name` to the device view of a contiguous tensor's elements (the storage guard lives
/// in the caller's scope, as long as the view).
macro_rules! bind {
    ($name:ident = $t:expr, $ty:ty) => {
        let t: &Tensor = $t;
        if !t.is_contiguous() {
            return Err(err("layout", "a kernel input is not contiguous"));
        }
        let (guard, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*guard else {
            return Err(err("device", "every input must be on the GPU"));
        };
        let $name = cs.as_cuda_slice::<$ty>()?.slice(layout.start_offset()..);
    };
}

fn wrap(
    s: candle_core::cuda_backend::cudarc::driver::CudaSlice<bf16>,
    dev: &candle_core::CudaDevice,
    n: usize,
) -> Tensor {
    let s = CudaStorage::wrap_cuda_slice(s, dev.clone());
    Tensor::from_storage(Storage::Cuda(s), (1, n), BackpropOp::none(), false)
}

/// q [1, nh·d], k and v [1, nkv·d] = x·Wᵀ, one launch.
fn project(x: &Tensor, w: &Weights) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = x.device().as_cuda_device()?.clone();
    let (n0, n1, n2) = (w.q.dims()[0], w.k.dims()[0], w.v.dims()[0]);
    let x = x.contiguous()?;
    // SAFETY: every row is written by its warp below before anything reads it.
    let (yq, yk, yv) = unsafe {
        (
            dev.alloc::<bf16>(n0)?,
            dev.alloc::<bf16>(n1)?,
            dev.alloc::<bf16>(n2)?,
        )
    };
    gemv_rows(&dev, [w.q, w.k, w.v], &x, [&yq, &yk, &yv], None)
        .map_err(|e| err("qkv launch", e))?;
    Ok((wrap(yq, &dev, n0), wrap(yk, &dev, n1), wrap(yv, &dev, n2)))
}

/// `residual + ctx·Wᵀ` [1, rows] bf16, one launch.
fn gemv_residual(w: Mat, ctx: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let dev = ctx.device().as_cuda_device()?.clone();
    let rows = w.dims()[0];
    let (ctx, residual) = (ctx.contiguous()?, residual.contiguous()?);
    // SAFETY: as above.
    let y = unsafe { dev.alloc::<bf16>(rows)? };
    // The unused matrices have no rows: only their (ignored) first matrix's pointers repeat.
    gemv_rows(&dev, [w, w, w], &ctx, [&y, &y, &y], Some(&residual))
        .map_err(|e| err("o_proj launch", e))?;
    Ok(wrap(y, &dev, rows))
}

type Slice = candle_core::cuda_backend::cudarc::driver::CudaSlice<bf16>;

/// One launch of `gemv_rows_bf16` / `gemv_rows_fp8`: rows of up to three matrices (all of one
/// kind; with `res`, the first only) into `ys`.
fn gemv_rows(
    dev: &candle_core::CudaDevice,
    mats: [Mat; 3],
    x: &Tensor,
    ys: [&Slice; 3],
    res: Option<&Tensor>,
) -> Result<()> {
    let cols = x.dim(1)?;
    let n = |m: Mat| m.dims()[0] as i32;
    let (n0, n1, n2) = match res {
        Some(_) => (n(mats[0]), 0, 0),
        None => (n(mats[0]), n(mats[1]), n(mats[2])),
    };
    let rows = (n0 + n1 + n2) as usize;
    let c_ = cols as i32;
    let res_at: u64 = match res {
        Some(r) => super::raw::device_range(r, 0, r.elem_count() * 2)?.0,
        None => 0,
    };
    bind!(xv = x, bf16);
    let split = split_for(cols);
    match mats {
        [Mat::Bf16(a), Mat::Bf16(b), Mat::Bf16(c)] => {
            let (a, b, c) = (a.contiguous()?, b.contiguous()?, c.contiguous()?);
            bind!(av = &a, bf16);
            bind!(bv = &b, bf16);
            bind!(cv = &c, bf16);
            let f = dev.get_or_load_custom_func("gemv_rows_bf16", MODULE, PTX)?;
            let mut l = f.builder();
            l.arg(&av).arg(&bv).arg(&cv).arg(&n0).arg(&n1).arg(&n2);
            l.arg(&xv).arg(&c_).arg(ys[0]).arg(ys[1]).arg(ys[2]);
            l.arg(&res_at).arg(&split);
            // SAFETY: argument order and types match the kernel; shapes checked by the caller.
            unsafe { l.launch(row_blocks(rows, split)) }.map_err(|e| err("gemv", e))?;
        }
        [Mat::Fp8(a), Mat::Fp8(b), Mat::Fp8(c)] => {
            let ((aw, as_), (bw, bs), (cw, cs)) = (fp8_parts(a)?, fp8_parts(b)?, fp8_parts(c)?);
            bind!(awv = aw, u8);
            bind!(bwv = bw, u8);
            bind!(cwv = cw, u8);
            bind!(asv = as_, f32);
            bind!(bsv = bs, f32);
            bind!(csv = cs, f32);
            let [br, bc] = a.block().map(|v| v as i32);
            let f = dev.get_or_load_custom_func("gemv_rows_fp8", MODULE, PTX)?;
            let mut l = f.builder();
            l.arg(&awv)
                .arg(&bwv)
                .arg(&cwv)
                .arg(&asv)
                .arg(&bsv)
                .arg(&csv);
            l.arg(&br).arg(&bc).arg(&n0).arg(&n1).arg(&n2);
            l.arg(&xv).arg(&c_).arg(ys[0]).arg(ys[1]).arg(ys[2]);
            l.arg(&res_at).arg(&split);
            // SAFETY: as above; each matrix's scales are its [ceil(rows / br), ceil(cols / bc)]
            // (checked when the matrix was made), one block shape (checked in `weights`).
            unsafe { l.launch(row_blocks(rows, split)) }.map_err(|e| err("FP8 gemv", e))?;
        }
        [Mat::Ggml(a), Mat::Ggml(b), Mat::Ggml(c)] => {
            let (xq, xd) = super::moe_decode::quantize_q8(dev, &xv, cols)?;
            let (aw, bw, cw) = (a.addr()?, b.addr()?, c.addr()?);
            // The twin that decodes the table-coded types only where one is read.
            let name = if a.lut4 || b.lut4 || c.lut4 {
                "gemv_rows_ggml_lut4"
            } else {
                "gemv_rows_ggml"
            };
            let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            let mut l = f.builder();
            l.arg(&aw).arg(&bw).arg(&cw);
            l.arg(&a.kernel_type)
                .arg(&b.kernel_type)
                .arg(&c.kernel_type);
            l.arg(&a.row_bytes).arg(&b.row_bytes).arg(&c.row_bytes);
            l.arg(&n0).arg(&n1).arg(&n2);
            l.arg(&xq)
                .arg(&xd)
                .arg(&c_)
                .arg(ys[0])
                .arg(ys[1])
                .arg(ys[2]);
            l.arg(&res_at).arg(&split);
            // SAFETY: argument order and types match the kernel; each matrix is [rows, cols]
            // whole blocks of a kernel type (`GgmlMat::new`), shapes checked by the caller; x's
            // codes and scales cover its columns.
            unsafe { l.launch(row_blocks(rows, split)) }.map_err(|e| err("GGUF gemv", e))?;
        }
        _ => return Err(err("gemv", "matrices of mixed kinds")),
    }
    Ok(())
}

/// The attention kernel: ctx [1, nh·d] bf16 (see `attn_decode_bf16` in the kernel file).
/// `allow_mma`: whether the tensor-core entries may run (where the shape allows; the unit
/// tests run both kinds on the same inputs).
fn attend(
    a: &Attention,
    [q, k, v]: [&Tensor; 3],
    dec: &DecodeInputs,
    kc: &Tensor,
    vc: &Tensor,
    cap: usize,
    allow_mma: bool,
) -> Result<Tensor> {
    let (nh, nkv, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let dev = q.device().as_cuda_device()?.clone();
    let (qn, kn) = (a.q_norm.weight(), a.k_norm.weight());
    if qn.dims() != [d] || kn.dims() != [d] || qn.dtype() != DType::BF16 {
        return Err(err(
            "norms",
            format!("q_norm {:?}, k_norm {:?}", qn.dims(), kn.dims()),
        ));
    }
    if dec.cos.elem_count() != d / 2 || dec.rows.dtype() != DType::U32 {
        return Err(err(
            "positions",
            format!("cos {:?}, rows {:?}", dec.cos.dims(), dec.rows.dtype()),
        ));
    }
    let (cos, sin) = (dec.cos.contiguous()?, dec.sin.contiguous()?);
    let (qn, kn) = (qn.contiguous()?, kn.contiguous()?);
    bind!(qv = q, bf16);
    bind!(kv = k, bf16);
    bind!(vv = v, bf16);
    bind!(qnv = &qn, bf16);
    bind!(knv = &kn, bf16);
    bind!(cv = &cos, bf16);
    bind!(sv = &sin, bf16);
    // Every entry of `rows` is the position: its first is the kernel's.
    bind!(pv = &dec.rows, u32);
    // The caches are written in place (the block of each group's first head writes row `pos`):
    // passed as addresses, as the other kernels that write into buffers they do not allocate.
    let kcv = super::raw::device_range(kc, 0, kc.elem_count() * 2)?.0;
    let vcv = super::raw::device_range(vc, 0, vc.elem_count() * 2)?.0;
    let shape = attn_shape_with(nh, nkv, d, cap, allow_mma).ok_or_else(|| {
        err(
            "attention",
            format!("{nh} heads, {nkv} kv heads, head_dim {d}, capacity {cap}"),
        )
    })?;
    // SAFETY: every element is written by the kernel (each head's columns by its group's one
    // chunk, or by the group's last block).
    let ctx = unsafe { dev.alloc::<bf16>(nh * d)? };
    // Past SUPER chunks the runs' shares follow, 16-byte aligned (the kernel's two-level
    // combine).
    let share = d.next_multiple_of(4) + 2;
    let runs = shape.chunks.div_ceil(SUPER);
    let part_len = (nh * shape.chunks * share).next_multiple_of(4) + nh * runs * share;
    // SAFETY: each chunk's (run's) share is written by its block before the group's (run's)
    // last block reads it; chunks past the position are neither written nor read.
    let part = unsafe { dev.alloc::<f32>(part_len)? };
    let eps = a.q_norm.eps();
    let scale = 1.0f32 / (d as f32).sqrt();
    let (nh_, nkv_, d_, cap_) = (nh as i32, nkv as i32, d as i32, cap as i32);
    let (len_, rows_) = (shape.len as i32, shape.rows_bytes as i32);
    let name = if shape.mma {
        [
            "",
            "attn_decode_bf16_mma_np1",
            "attn_decode_bf16_mma_np2",
            "attn_decode_bf16_mma_np3",
            "attn_decode_bf16_mma_np4",
        ][shape.np]
    } else {
        [
            "",
            "attn_decode_bf16_np1",
            "attn_decode_bf16_np2",
            "attn_decode_bf16_np3",
            "attn_decode_bf16_np4",
        ][shape.np]
    };
    let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&qv)
        .arg(&kv)
        .arg(&vv)
        .arg(&qnv)
        .arg(&knv)
        .arg(&eps)
        .arg(&cv)
        .arg(&sv)
        .arg(&pv)
        .arg(&kcv)
        .arg(&vcv)
        .arg(&ctx)
        .arg(&part)
        .arg(&nh_)
        .arg(&nkv_)
        .arg(&d_)
        .arg(&cap_)
        .arg(&scale)
        .arg(&len_)
        .arg(&rows_);
    let cfg = LaunchConfig {
        grid_dim: (nkv as u32, shape.chunks as u32, 1),
        block_dim: (32 * ATTN_WARPS as u32, 1, 1),
        shared_mem_bytes: shape.shared as u32,
    };
    // SAFETY: argument order and types match the kernel; shapes checked here and by the caller;
    // the position is below the capacity (the caller reserved its row); `attn_shape` kept the
    // shared memory under 48 KiB with room for the combine's weights, nkv ≤ MAX_GROUPS finish
    // counters and d within the entry's pairs a lane.
    unsafe { b.launch(cfg) }.map_err(|e| err("attention launch", e))?;
    Ok(wrap(ctx, &dev, nh * d))
}

/// Warps per row of `gemv_rows_*`: about 2,048 columns each (1, 2 or 4) for every kind of row.
/// Why: with 2,048 columns a warp Qwen3-30B-A3B's q/k/v GEMV is 640 blocks and o_proj 512, each
/// one wave on an H200 (five blocks an SM), where 1,024 columns made 1,280 and 1,024 blocks, two
/// waves: the 12-layer bf16 step 840.7 → 819.5 µs (BENCHMARKS.md §57); FP8 and GGUF rows, which
/// had kept ~1,024, gained the same way (§58: FP8 930 → 918 µs, Q4_K_M 950 → 924).
fn split_for(cols: usize) -> i32 {
    match cols {
        0..4096 => 1,
        4096..8192 => 2,
        _ => 4,
    }
}

/// Blocks of WARPS_PER_BLOCK warps, `split` of them per row.
fn row_blocks(rows: usize, split: i32) -> LaunchConfig {
    let rows_per_block = WARPS_PER_BLOCK / split as u32;
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(rows_per_block), 1, 1),
        block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// These run on a GPU (a `cuda` build's unit tests carried to the device: see
/// `scripts/gpu_unit_tests.sh`); without one each says so and passes vacuously.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::{Linear, LinearWeight, Positions, RmsNorm, Rope};
    use crate::util::gpu_test::{bf16_matrix as matrix, device, host};
    use crate::util::test_matrix;
    use candle_core::Device;
    use candle_core::quantized::GgmlDType;

    fn gpu() -> Option<Device> {
        device("attention kernel")
    }

    fn bf(x: f32) -> f32 {
        bf16::from_f32(x).to_f32()
    }

    /// One unit in the last place of a bf16 of magnitude |x| (0's: the smallest normal's).
    fn ulp(x: f32) -> f32 {
        let e = x.abs().max(f32::MIN_POSITIVE).log2().floor();
        2f32.powf(e - 7.0)
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum::<f64>() as f32
    }

    #[test]
    fn gemv_rows_are_rounded_dots_and_the_residual_a_bf16_add() {
        let Some(dev) = gpu() else { return };
        // One, two and four warps a row (split by width), aligned rows and widths that are no
        // multiple of 8 (the tail), rows past a block's last.
        for (rows, cols, seed) in [(300, 2048, 1), (70, 517, 2), (101, 4096, 3), (37, 9001, 4)] {
            let (w, wh) = matrix(rows, cols, seed, 251, 1.0 / 256.0, &dev);
            let (x, xh) = matrix(1, cols, seed + 5, 241, 1.0 / 128.0, &dev);
            let (r, rh) = matrix(1, rows, seed + 9, 239, 1.0 / 32.0, &dev);
            let y = host(&gemv_residual(Mat::Bf16(&w), &x, &r).unwrap());
            let (w3, w3h) = matrix(rows / 3, cols, seed + 11, 233, 1.0 / 256.0, &dev);
            let m = Weights {
                q: Mat::Bf16(&w),
                k: Mat::Bf16(&w3),
                v: Mat::Bf16(&w),
                o: Mat::Bf16(&w),
            };
            let (yq, yk, yv) = project(&x, &m).unwrap();
            let (yq, yk, yv) = (host(&yq), host(&yk), host(&yv));
            assert_eq!((yk.len(), yv.len()), (rows / 3, rows));
            for i in 0..rows {
                let o = bf(dot(&wh[i * cols..(i + 1) * cols], &xh));
                let want = bf(rh[i] + o);
                assert!(
                    (y[i] - want).abs() <= ulp(want),
                    "row {i}: {} vs {want}",
                    y[i]
                );
                assert!((yq[i] - o).abs() <= ulp(o), "q row {i}: {} vs {o}", yq[i]);
                assert_eq!(yq[i].to_bits(), yv[i].to_bits(), "same matrix, same bits");
            }
            for i in 0..rows / 3 {
                let o = bf(dot(&w3h[i * cols..(i + 1) * cols], &xh));
                assert!((yk[i] - o).abs() <= ulp(o), "k row {i}: {} vs {o}", yk[i]);
            }
        }
    }

    #[test]
    fn fp8_gemv_rows_are_the_fp8_products_rounded_and_the_residual_a_bf16_add() {
        let Some(dev) = gpu() else { return };
        // Split 1–4 warps a row; whole and partial blocks; bc 20 takes the one-by-one path.
        for (rows, cols, block, seed) in [
            (300, 2048, [128, 128], 1),
            (70, 520, [32, 48], 2),
            (101, 4096, [128, 128], 3),
            (37, 9000, [16, 20], 4),
        ] {
            let w = fp8_matrix(rows, cols, seed, block, &dev);
            let w3 = fp8_matrix(rows / 3, cols, seed + 11, block, &dev);
            let (x, _) = matrix(1, cols, seed + 5, 241, 1.0 / 8.0, &dev);
            let (r, rh) = matrix(1, rows, seed + 9, 239, 1.0 / 32.0, &dev);
            // The reference: the per-matrix FP8 product (its own kernel, another f32 order).
            let want = host(&w.forward(&x).unwrap());
            let want3 = host(&w3.forward(&x).unwrap());
            let y = host(&gemv_residual(Mat::Fp8(&w), &x, &r).unwrap());
            let m = Weights {
                q: Mat::Fp8(&w),
                k: Mat::Fp8(&w3),
                v: Mat::Fp8(&w),
                o: Mat::Fp8(&w),
            };
            let (yq, yk, yv) = project(&x, &m).unwrap();
            let (yq, yk, yv) = (host(&yq), host(&yk), host(&yv));
            for i in 0..rows {
                let o = want[i];
                assert!((yq[i] - o).abs() <= ulp(o), "q row {i}: {} vs {o}", yq[i]);
                assert_eq!(yq[i].to_bits(), yv[i].to_bits(), "same matrix, same bits");
                let res = bf(rh[i] + yq[i]);
                assert_eq!(y[i].to_bits(), res.to_bits(), "row {i}: residual + product");
            }
            for i in 0..rows / 3 {
                let o = want3[i];
                assert!((yk[i] - o).abs() <= ulp(o), "k row {i}: {} vs {o}", yk[i]);
            }
        }
    }

    /// A GGUF matrix [rows, cols] of type `t` on `dev` (candle's quantizer over a test
    /// pattern) and candle's CPU dequantisation of it.
    fn qmatrix(
        rows: usize,
        cols: usize,
        seed: usize,
        t: GgmlDType,
        dev: &Device,
    ) -> (candle_core::quantized::QTensor, Vec<f32>) {
        use candle_core::quantized::{QTensor, ggml_file::qtensor_from_ggml};
        let w = test_matrix(rows, cols, seed, 251, 1.0 / 256.0);
        let q = QTensor::quantize(&w, t).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let on_dev = qtensor_from_ggml(t, &q.data().unwrap(), vec![rows, cols], dev).unwrap();
        (on_dev, deq.to_vec1().unwrap())
    }

    /// `gemv_rows_ggml` over every type the block kernels decode, mixed within one launch:
    /// each output the f64 product of candle's dequantised weights and x rounded to 8-bit
    /// blocks (`gpu_test::q8_values`), rounded to bf16 — within a step, nearly always its bits,
    /// which the product over the unrounded x does not give; the residual a bf16 add.
    #[test]
    fn ggml_gemv_rows_are_products_over_8_bit_activations() {
        use GgmlDType as G;
        let Some(dev) = gpu() else { return };
        // Split 1–4 warps a row; 32- and 256-weight blocks in one launch.
        for (rows, cols, types, seed) in [
            (300, 2048, [G::Q4K, G::Q6K, G::Q8_0], 1),
            (70, 512, [G::Q5K, G::Q4_0, G::Q4_1], 2),
            (101, 4096, [G::Q5_0, G::Q5_1, G::Q4K], 3),
            (37, 96, [G::Q8_0, G::Q4_0, G::Q5_1], 4),
        ] {
            let ms: Vec<_> = (0..3)
                .map(|i| qmatrix(rows - 10 * i, cols, seed + i, types[i], &dev))
                .collect();
            let (x, xh) = matrix(1, cols, seed + 5, 241, 1.0 / 128.0, &dev);
            let (r, rh) = matrix(1, rows, seed + 9, 239, 1.0 / 32.0, &dev);
            let mat = |i: usize| Mat::Ggml(GgmlMat::new(&ms[i].0).expect("a kernel type"));
            let m = Weights {
                q: mat(0),
                k: mat(1),
                v: mat(2),
                o: mat(0),
            };
            let (yq, yk, yv) = project(&x, &m).unwrap();
            let ys = [host(&yq), host(&yk), host(&yv)];
            let y = host(&gemv_residual(mat(0), &x, &r).unwrap());
            let (xq, xe) = (
                crate::util::gpu_test::q8_values(&xh),
                xh.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            );
            let (mut same, mut same_unrounded, mut n) = (0, 0, 0);
            for (i, (got, (_, deq))) in ys.iter().zip(&ms).enumerate() {
                assert_eq!(got.len(), rows - 10 * i);
                for (row, &g) in got.iter().enumerate() {
                    let w = &deq[row * cols..(row + 1) * cols];
                    let prod = |x: &[f64]| -> f32 {
                        bf(w.iter().zip(x).map(|(a, b)| *a as f64 * b).sum::<f64>() as f32)
                    };
                    let (want, unrounded) = (prod(&xq), prod(&xe));
                    assert!(
                        (g - want).abs() <= ulp(want),
                        "{:?} row {row} ({rows}x{cols}): {g} vs {want}",
                        types[i]
                    );
                    same += (g == want) as usize;
                    same_unrounded += (g == unrounded) as usize;
                    n += 1;
                    if i == 0 {
                        assert_eq!(y[row].to_bits(), bf(rh[row] + g).to_bits(), "row {row}");
                    }
                }
            }
            let (hit, miss) = (same as f64 / n as f64, same_unrounded as f64 / n as f64);
            assert!(
                hit >= 0.95 && hit > miss + 0.1,
                "{types:?}: {hit} of the outputs are the 8-bit product's bits, {miss} the \
                 unrounded one's"
            );
        }
    }

    /// A table-coded matrix as `LinearWeight::Lut4Device` holds it (moescope's test quantizer)
    /// and the values its blocks decode to.
    fn lut4_matrix(
        rows: usize,
        cols: usize,
        seed: usize,
        format: crate::model::lut4::Lut4,
        dev: &Device,
    ) -> (Tensor, Vec<f32>) {
        let w: Vec<f32> = test_matrix(rows, cols, seed, 251, 1.0 / 256.0)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (bytes, deq) = crate::model::lut4::quantize_for_tests(format, &w);
        let n = bytes.len();
        (Tensor::from_vec(bytes, (rows, n / rows), dev).unwrap(), deq)
    }

    /// `gemv_rows_ggml_lut4` over the table-coded types beside a candle block type in one
    /// launch: each output the f64 product of the decoded weights and x rounded to 8-bit blocks
    /// within a bf16 step (nearly always its bits); and such a layer's prompt product (the
    /// blocks widened to bf16) is the widened matrix's product bit for bit.
    #[test]
    fn table_coded_gemv_rows_are_products_over_8_bit_activations() {
        use crate::model::lut4::Lut4;
        let Some(dev) = gpu() else { return };
        for (rows, cols, formats, seed) in [
            (300, 2048, [Lut4::Iq4Xs, Lut4::Mxfp4, Lut4::Iq4Nl], 1),
            (37, 512, [Lut4::Mxfp4, Lut4::Iq4Xs, Lut4::Mxfp4], 2),
        ] {
            let ms: Vec<_> = (0..3)
                .map(|i| lut4_matrix(rows - 10 * i, cols, seed + i, formats[i], &dev))
                .collect();
            // The third matrix a candle block type in the same launch.
            let (q8, q8_deq) = qmatrix(rows - 20, cols, seed + 2, GgmlDType::Q8_0, &dev);
            let linears: Vec<Linear> = (0..2)
                .map(|i| {
                    Linear::with_weight(
                        LinearWeight::Lut4Device {
                            blocks: ms[i].0.clone(),
                            format: formats[i],
                            dims: [rows - 10 * i, cols],
                        },
                        None,
                    )
                })
                .collect();
            let mats = [
                ggml(&linears[0]).expect("a kernel layout"),
                ggml(&linears[1]).expect("a kernel layout"),
                Mat::Ggml(GgmlMat::new(&q8).unwrap()),
            ];
            let (x, xh) = matrix(1, cols, seed + 5, 241, 1.0 / 128.0, &dev);
            let m = Weights {
                q: mats[0],
                k: mats[1],
                v: mats[2],
                o: mats[0],
            };
            let (yq, yk, yv) = project(&x, &m).unwrap();
            let ys = [host(&yq), host(&yk), host(&yv)];
            let xq = crate::util::gpu_test::q8_values(&xh);
            let deqs = [&ms[0].1, &ms[1].1, &q8_deq];
            let (mut same, mut n) = (0, 0);
            for (i, got) in ys.iter().enumerate() {
                assert_eq!(got.len(), rows - 10 * i);
                for (row, &g) in got.iter().enumerate() {
                    let w = &deqs[i][row * cols..(row + 1) * cols];
                    let want =
                        bf(w.iter().zip(&xq).map(|(a, b)| *a as f64 * b).sum::<f64>() as f32);
                    assert!(
                        (g - want).abs() <= ulp(want),
                        "{:?} row {row}: {g} vs {want}",
                        formats.get(i)
                    );
                    same += (g == want) as usize;
                    n += 1;
                }
            }
            assert!(same as f64 >= 0.95 * n as f64, "{same} of {n}");
            // A prompt's product: the blocks widened to bf16, then the dense product.
            let (xs, _) = matrix(5, cols, seed + 7, 241, 1.0 / 128.0, &dev);
            let got = host(&linears[0].forward(&xs).unwrap());
            let dense = Tensor::from_vec(ms[0].1.clone(), (rows, cols), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
                .to_device(&dev)
                .unwrap();
            let want = host(&Linear::new(dense, None).forward(&xs).unwrap());
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{:?}: prompt product not the widened matrix's",
                formats[0]
            );
        }
    }

    /// An FP8 matrix [rows, cols] on `dev` (codes from a fixed pattern, never NaN; scales
    /// around 2^-10) in `block`s.
    fn fp8_matrix(
        rows: usize,
        cols: usize,
        seed: usize,
        block: [usize; 2],
        dev: &Device,
    ) -> Fp8Matrix {
        let code = |n: usize| -> u8 {
            let b = ((n.wrapping_add(seed * 7919).wrapping_mul(2654435761) >> 9) % 256) as u8;
            if b & 0x7F == 0x7F { b ^ 1 } else { b }
        };
        let bytes: Vec<u8> = (0..rows * cols).map(code).collect();
        let n = rows.div_ceil(block[0]) * cols.div_ceil(block[1]);
        let scales = (0..n)
            .map(|i| 2f32.powi(-12) * (1.0 + ((i + seed) % 11) as f32 / 8.0))
            .collect();
        Fp8Matrix::new(&bytes, [rows, cols], scales, block, dev).unwrap()
    }

    fn attention(nh: usize, nkv: usize, d: usize, dev: &Device, kernel: bool) -> Attention {
        attention_of(nh, nkv, d, dev, kernel, Proj::Bf16)
    }

    /// What the test layer's projections hold.
    #[derive(Clone, Copy)]
    enum Proj {
        Bf16,
        /// Block-scaled FP8 in these blocks.
        Fp8([usize; 2]),
        /// GGUF blocks: q, k, v, o in these types (hidden 256, so K types fit).
        Ggml([GgmlDType; 4]),
    }

    fn attention_of(
        nh: usize,
        nkv: usize,
        d: usize,
        dev: &Device,
        kernel: bool,
        proj: Proj,
    ) -> Attention {
        let lin = |out: usize, inp: usize, seed: usize| match proj {
            Proj::Bf16 => Linear::new(matrix(out, inp, seed, 251, 1.0 / 512.0, dev).0, None),
            Proj::Fp8(block) => Linear::with_weight(
                LinearWeight::Fp8(fp8_matrix(out, inp, seed, block, dev)),
                None,
            ),
            Proj::Ggml(t) => {
                let (m, _) = qmatrix(out, inp, seed, t[seed - 21], dev);
                Linear::with_weight(
                    LinearWeight::Quantized {
                        matmul: candle_core::quantized::QMatMul::from_arc(std::sync::Arc::new(m))
                            .unwrap(),
                        bytes: 0,
                    },
                    None,
                )
            }
        };
        let h = match proj {
            Proj::Ggml(_) => 256,
            _ => 64,
        };
        let norm = |seed: usize| {
            // Weights near 1, as trained norms are.
            let w = (test_matrix(1, d, seed, 31, 1.0 / 64.0) + 1.0).unwrap();
            RmsNorm::new(
                w.reshape(d)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_device(dev)
                    .unwrap(),
                1e-6,
            )
            .unwrap()
        };
        Attention {
            q_proj: lin(nh * d, h, 21),
            k_proj: lin(nkv * d, h, 22),
            v_proj: lin(nkv * d, h, 23),
            o_proj: lin(h, nh * d, 24),
            q_norm: norm(25),
            k_norm: norm(26),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            attn_kernel: kernel,
        }
    }

    /// The kernel's rounding, on the host: RMSNorm then RoPE of one head, as bf16 values.
    fn norm_rope(x: &[f32], w: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
        let d = x.len();
        let ss = x.iter().map(|v| *v as f64 * *v as f64).sum::<f64>() as f32;
        let scale = 1.0 / (ss / d as f32 + 1e-6).sqrt();
        let n: Vec<f32> = x.iter().zip(w).map(|(v, w)| bf(scale * v * w)).collect();
        let mut out = n.clone();
        for i in 0..d / 2 {
            let (a, b, c, s) = (n[i], n[i + d / 2], cos[i], sin[i]);
            out[i] = bf(bf(a * c) - bf(b * s));
            out[i + d / 2] = bf(bf(a * s) + bf(b * c));
        }
        out
    }

    /// The grid and shared memory of the attention kernel, on the host (no GPU needed).
    #[test]
    fn attention_chunks_fit_shared_memory_and_cover_the_cache() {
        // Qwen3-30B-A3B: 4 kv groups of 8 heads, chunks of 64 positions.
        let s = attn_shape(32, 4, 128, MAX_POSITIONS).unwrap();
        assert_eq!((s.np, s.mma, s.len, s.chunks), (2, true, 64, 128));
        // Rows padded by 8 columns for the tensor cores' loads; 32 KB without.
        assert_eq!(s.rows_bytes, 2 * 64 * 136 * 2);
        let s = attn_shape_with(32, 4, 128, MAX_POSITIONS, false).unwrap();
        assert_eq!((s.mma, s.rows_bytes), (false, 32 * 1024));
        // Tensor cores take head_dims of whole 16s and groups of up to 16.
        assert!(!attn_shape(4, 2, 36, 512).unwrap().mma);
        assert!(!attn_shape(34, 2, 64, 512).unwrap().mma);
        assert!(attn_shape(32, 2, 96, 512).unwrap().mma);
        // Wide heads: 32 positions; a large group of them: 16.
        assert_eq!(attn_shape(32, 4, 256, 4096).unwrap().len, 32);
        assert_eq!(attn_shape(32, 1, 256, 512).unwrap().len, 16);
        // Every shape the kernel is offered up to its limits fits, with room for the combine.
        for d in (2..=MAX_HEAD_DIM).step_by(2) {
            for nkv in [1, 2, 3, 4, 8, 16, 64] {
                for g in [1, 2, 5, 8, 16, 20] {
                    for (cap, mma) in [1, 63, 64, 65, 4096, 5000, MAX_POSITIONS]
                        .into_iter()
                        .flat_map(|c| [(c, false), (c, true)])
                    {
                        let s = attn_shape_with(nkv * g, nkv, d, cap, mma)
                            .unwrap_or_else(|| panic!("nkv {nkv} g {g} d {d} cap {cap}"));
                        assert_eq!(s.mma, mma && d % 16 == 0 && g <= 16);
                        assert!(s.shared <= MAX_SHARED, "{s:?}");
                        assert!(
                            s.rows_bytes >= 4 * d * s.len && s.rows_bytes >= 4 * g * (s.chunks + 1)
                        );
                        assert!(s.chunks * s.len >= cap, "{s:?} covers {cap}");
                        assert!(d <= 64 * s.np && s.np <= 4);
                    }
                }
            }
        }
        // What it does not take: odd or too wide heads, heads that do not group.
        assert_eq!(attn_shape(8, 2, 258, 512), None);
        assert_eq!(attn_shape(8, 2, 127, 512), None);
        assert_eq!(attn_shape(8, 3, 128, 512), None);
        assert_eq!(attn_shape(8, 0, 128, 512), None);
    }

    #[test]
    fn attention_kernel_matches_its_reference_and_writes_only_its_row() {
        let Some(dev) = gpu() else { return };
        // GQA groups of 4, no grouping, and a head_dim that is no power of two; then capacities
        // of 64 chunks and of MAX_POSITIONS (128 chunks).
        for (nh, nkv, d, cap) in [
            (8, 2, 128, 512),
            (4, 4, 64, 512),
            (6, 3, 96, 512),
            // Groups past a block's 8 (4) heads at a time; head_dims of three and four pairs a lane.
            (16, 1, 64, 512),
            (12, 1, 64, 512),
            // Rows of 72 bytes: copied to shared memory 4 bytes at a time.
            (4, 2, 36, 512),
            (8, 2, 192, 512),
            (12, 2, 256, 512),
            (8, 2, 128, 4096),
            // The two-level combine's runs with a partial last run: a wide head (chunks of
            // 32) and rows of 72 bytes (the combine's one-column loads).
            (12, 2, 256, 4096),
            (4, 2, 36, 4096),
            (4, 2, 64, MAX_POSITIONS),
            // Qwen3-30B-A3B's groups; no grouping over 8 kv heads.
            (32, 4, 128, MAX_POSITIONS),
            (8, 8, 64, MAX_POSITIONS),
        ] {
            let a = attention(nh, nkv, d, &dev, true);
            let (kc0, kch) = matrix(nkv * cap, d, 3, 253, 1.0 / 64.0, &dev);
            let (vc0, vch) = matrix(nkv * cap, d, 4, 247, 1.0 / 64.0, &dev);
            let (q, qh) = matrix(1, nh * d, 5, 251, 1.0 / 16.0, &dev);
            let (k, kh) = matrix(1, nkv * d, 6, 241, 1.0 / 16.0, &dev);
            let (v, vh) = matrix(1, nkv * d, 7, 239, 1.0 / 16.0, &dev);
            let (qw, kw) = (host(a.q_norm.weight()), host(a.k_norm.weight()));
            let rope = Rope::new(d, 1e6);
            // A warp's first and second batch of positions (8 warps × 8), one chunk (64
            // positions; 32 for the wide heads) and its edges, several chunks, the last row;
            // on Qwen3's groups, positions around 4,096 and the last.
            let positions: &[usize] = if cap == 512 {
                &[0, 1, 7, 31, 32, 33, 63, 64, 65, 100, 300, cap - 1]
            } else if cap == 4096 {
                &[2500, cap - 1]
            } else if nkv == 4 {
                &[4095, 4096, 5000, cap - 1]
            } else {
                &[cap - 1]
            };
            // Both kinds of entry where the shape takes the tensor-core one.
            let kinds: &[bool] = if attn_shape(nh, nkv, d, cap).unwrap().mma {
                &[false, true]
            } else {
                &[false]
            };
            for (&pos, &mma) in positions
                .iter()
                .flat_map(|p| kinds.iter().map(move |m| (p, m)))
            {
                let kc = kc0.reshape((nkv, cap, d)).unwrap().copy().unwrap();
                let vc = vc0.reshape((nkv, cap, d)).unwrap().copy().unwrap();
                let (cos, sin) = rope.tables(pos, 1, DType::BF16, &dev).unwrap();
                let (ch, sh) = (host(&cos), host(&sin));
                let dec = DecodeInputs {
                    cos,
                    sin,
                    rows: Tensor::full(pos as u32, (nkv, 1, d), &dev).unwrap(),
                    mask: Tensor::zeros(cap, DType::BF16, &dev).unwrap(),
                };
                let ctx = host(&attend(&a, [&q, &k, &v], &dec, &kc, &vc, cap, mma).unwrap());
                let (kc_after, vc_after) = (host(&kc), host(&vc));
                let scale = 1.0f32 / (d as f32).sqrt();
                for g in 0..nkv {
                    let kr = norm_rope(&kh[g * d..(g + 1) * d], &kw, &ch, &sh);
                    for j in 0..cap {
                        let at = (g * cap + j) * d;
                        let (kn, vn) = (&kc_after[at..at + d], &vc_after[at..at + d]);
                        if j == pos {
                            for i in 0..d {
                                assert!((kn[i] - kr[i]).abs() <= ulp(kr[i]), "k row {pos} [{i}]");
                            }
                            assert_eq!(vn, &vh[g * d..(g + 1) * d], "v row {pos} written as is");
                        } else {
                            assert_eq!(kn, &kch[at..at + d], "k row {j} untouched (pos {pos})");
                            assert_eq!(vn, &vch[at..at + d], "v row {j} untouched (pos {pos})");
                        }
                    }
                    for h in g * (nh / nkv)..(g + 1) * (nh / nkv) {
                        let qr = norm_rope(&qh[h * d..(h + 1) * d], &qw, &ch, &sh);
                        let key = |j: usize| -> &[f32] {
                            if j == pos {
                                &kr
                            } else {
                                &kch[(g * cap + j) * d..(g * cap + j + 1) * d]
                            }
                        };
                        let val = |j: usize| -> &[f32] {
                            if j == pos {
                                &vh[g * d..(g + 1) * d]
                            } else {
                                &vch[(g * cap + j) * d..(g * cap + j + 1) * d]
                            }
                        };
                        let s: Vec<f32> = (0..=pos)
                            .map(|j| bf(bf(dot(&qr, key(j))) * scale))
                            .collect();
                        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let e: Vec<f64> = s.iter().map(|x| ((x - m) as f64).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        let p: Vec<f32> = e.iter().map(|x| bf((x / sum) as f32)).collect();
                        let vmax = vh.iter().chain(&vch).fold(0f32, |a, b| a.max(b.abs()));
                        for c in 0..d {
                            let want = bf((0..=pos)
                                .map(|j| p[j] as f64 * val(j)[c] as f64)
                                .sum::<f64>() as f32);
                            let got = ctx[h * d + c];
                            // A probability may round the other way (f32 against f64, or a
                            // score's bf16 the other way after a sum in another order), or be
                            // rounded differently (several chunks: f32, or bf16 of the
                            // unnormalised weight on tensor cores): within 2⁻⁸ of it either way.
                            assert!(
                                (got - want).abs() <= ulp(want) + vmax / 256.0,
                                "head {h} col {c} pos {pos} (d {d}, mma {mma}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Whole decode steps through `forward_residual`: the kernels against candle's ops, from an
    /// empty cache past its first growth (256 rows).
    #[test]
    fn decode_steps_match_candles_ops() {
        decode_steps_match_candles_ops_with(Proj::Bf16);
    }

    /// The same with FP8 projections: the kernels' `gemv_rows_fp8` against candle's ops over the
    /// per-matrix FP8 product.
    #[test]
    fn fp8_decode_steps_match_candles_ops() {
        decode_steps_match_candles_ops_with(Proj::Fp8([128, 128]));
        decode_steps_match_candles_ops_with(Proj::Fp8([32, 16]));
    }

    /// The same with GGUF projections (a `Q4_K_M`-like mix, and `Q8_0`): `gemv_rows_ggml`
    /// against candle's ops over candle's own quantized products (its Q8_1 activations: another
    /// rounding of the same inputs).
    #[test]
    fn ggml_decode_steps_match_candles_ops() {
        use GgmlDType as G;
        decode_steps_match_candles_ops_with(Proj::Ggml([G::Q4K, G::Q4K, G::Q6K, G::Q4K]));
        decode_steps_match_candles_ops_with(Proj::Ggml([G::Q8_0; 4]));
    }

    fn decode_steps_match_candles_ops_with(proj: Proj) {
        let Some(dev) = gpu() else { return };
        let (nh, nkv, d) = (8, 2, 128);
        let h = match proj {
            Proj::Ggml(_) => 256,
            _ => 64,
        };
        let ours = attention_of(nh, nkv, d, &dev, true, proj);
        let theirs = attention_of(nh, nkv, d, &dev, false, proj);
        let rope = Rope::new(d, 1e6);
        let mut caches = [KvCache::new(1), KvCache::new(1)];
        for step in 0..300usize {
            let (x, _) = matrix(1, h, 100 + step, 61, 1.0 / 8.0, &dev);
            let (r, rh) = matrix(1, h, 200 + step, 59, 1.0 / 4.0, &dev);
            let mut outs = Vec::new();
            for (a, cache) in [&ours, &theirs].into_iter().zip(caches.iter_mut()) {
                cache
                    .reserve_static(step + 1, |_| (nkv, d, DType::BF16, dev.clone()))
                    .unwrap();
                let cap = cache.static_capacity();
                let statics = cache.decode_statics(DType::BF16, &dev).unwrap();
                let (cos, sin) = rope.full(cap, DType::BF16, &dev).unwrap();
                let pos = Tensor::new(&[step as u32], &dev).unwrap();
                let dec = DecodeInputs::build(&pos, &statics, &cos, &sin, nkv, d).unwrap();
                let y = a
                    .forward_residual(&x, &r, 0, cache, &Positions::Device(&dec))
                    .unwrap();
                cache.advance(1);
                outs.push(host(&(y - &r).unwrap()));
            }
            let scale = outs[1].iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = outs[0]
                .iter()
                .zip(&outs[1])
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // candle's path rounds scores and probabilities to bf16 where the kernel keeps f32 or
            // rounds once: a few bf16 steps of the output's scale — plus one step of the
            // residual's, since both add it and round (the larger FP8 outputs cross its steps).
            let rmax = rh.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                diff.is_finite() && diff <= 0.03 * scale + 1e-3 + ulp(rmax + scale),
                "step {step}: {diff} (scale {scale}, residual up to {rmax})"
            );
        }
    }
}
