//! The MoE expert MLP of one decode token on the GPU: two launches of moescope's own kernels
//! (`kernels/moe_decode.cu`) in place of candle's tiled MoE GEMM, which is built for many tokens
//! and ran ~10× under the weights' memory bandwidth at batch 1.
//!
//! The kernels read the same stacked weights as candle's kernel (native's full stacks, or the
//! selective slot pool with ids remapped to slots), so native and selective stay bit-identical.
//! Nothing here reads back to the host: the step stays capturable as a CUDA graph.

use candle_core::cuda_backend::CudaStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::op::BackpropOp;
use candle_core::{DType, Storage, Tensor};
use half::bf16;

use super::error::{ModelError, Result};
use super::ports::{GgmlLayout, StackFormat};
use super::safetensors_file::StDtype;

const PTX: &str = include_str!("kernels/moe_decode.ptx");
const MODULE: &str = "moescope_moe_decode";
/// The kernels keep one partial sum per selected expert in registers.
pub const MAX_TOPK: usize = super::ports::FUSED_DECODE_MAX_TOPK;
const WARPS_PER_BLOCK: u32 = 8;
/// Output rows per block of the down kernel (`DOWN_ROWS` in the kernel file).
const DOWN_ROWS: u32 = 4;

/// Whether [`moe_decode`] handles this case: one token, bf16, top-k within the kernels' limit.
pub fn applies(tokens: usize, dtype: DType, top_k: usize) -> bool {
    tokens == 1 && dtype == DType::BF16 && top_k <= MAX_TOPK
}

/// Most tokens one launch of the kernels takes (a prompt's; decode is one).
pub const MAX_TOKENS: usize = 65_535;

/// Prompts up to this many tokens over FP8 or GGUF stacks take the decode kernels, each token's
/// routed rows read for it alone, rather than dequantising every routed expert into a bf16
/// stack for candle's MoE GEMM: a 16-token prompt routes most of a layer's experts, and the
/// dequantised stack costs more to write and read again than the quantized rows a token at a
/// time (BENCHMARKS.md §38: on an H200, 12-layer Qwen3-30B-A3B, Q8_0 prefill 2.7× at 16
/// tokens, 1.7× at 64, 1.26× at 128, the gain shrinking as the tokens share more rows; not
/// measured past 128, so the dequantising road takes longer prompts).
pub const PROMPT_TOKENS: usize = 128;

/// Whether a `tokens`-token prompt over quantized (FP8 or GGUF) stacks takes the decode
/// kernels ([`PROMPT_TOKENS`]).
pub fn prompt_applies(tokens: usize, dtype: DType, top_k: usize) -> bool {
    (2..=PROMPT_TOKENS).contains(&tokens) && dtype == DType::BF16 && top_k <= MAX_TOPK
}

fn err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Input(format!("MoE decode kernel ({what}): {e}"))
}

/// `x` [T, H] bf16; `gate_up` [E, 2I, H] and `down` [E, H, I] bf16 stacks; `ids` [T, k] u32
/// rows of the stacks in top-k order — or, with `map` (u32 `[experts]`, the selective slot
/// pool's expert→slot table), expert ids whose rows the kernels look up there; `weights` [T, k]
/// f32 routing weights (already rounded to bf16). Returns Σ_s weight_s · expert_s(x) as [T, H]
/// bf16 — plus `residual` ([T, H] bf16) when given, in the kernel (candle's bf16 add, same
/// bits). `fmt` says what the stacks hold: bf16, FP8 bytes with their scales, or GGUF blocks.
/// T is 1 when decoding; each of T > 1 tokens (a short prompt, [`prompt_applies`]) gets the bits
/// a launch of that token alone gives.
#[allow(clippy::too_many_arguments)]
pub fn moe_decode(
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    ids: &Tensor,
    map: Option<&Tensor>,
    weights: &Tensor,
    residual: Option<&Tensor>,
    fmt: StackFormat,
) -> Result<Tensor> {
    let (_, hidden) = x.dims2()?;
    let (_, k) = ids.dims2()?;
    let (h3, inter) = match fmt {
        StackFormat::Ggml(l) => {
            ggml_stack(down, l.down_bytes(), "down")?;
            (l.hidden, l.intermediate)
        }
        _ => {
            let (_, two_i, h2) = gate_up.dims3()?;
            let (_, h3, inter) = down.dims3()?;
            if h2 != hidden || two_i != 2 * inter {
                return Err(err(
                    "shapes",
                    format!(
                        "x {:?}, gate_up {:?}, down {:?}",
                        x.dims(),
                        gate_up.dims(),
                        down.dims()
                    ),
                ));
            }
            (h3, inter)
        }
    };
    if h3 != hidden || k > MAX_TOPK {
        return Err(err(
            "shapes",
            format!("x {:?}, down of {h3} rows, {k} experts", x.dims()),
        ));
    }
    let mid = moe_gate_up(x, gate_up, ids, map, fmt)?;
    debug_assert_eq!(mid.dims(), [x.dim(0)? * k, inter]);
    moe_down(&mid, down, ids, map, weights, residual, fmt)
}

/// A GGUF stack's checked shape: U8 [n, stride] with at least `need` bytes an expert.
fn ggml_stack(w: &Tensor, need: usize, what: &str) -> Result<usize> {
    match w.dims() {
        &[_, stride] if w.dtype() == DType::U8 && stride >= need => Ok(stride),
        d => Err(err(
            "GGUF stacks",
            format!(
                "{what} is {:?} {d:?}, not U8 [experts, ≥ {need} bytes]",
                w.dtype()
            ),
        )),
    }
}

/// The kernel's id and a row's bytes for type `t` over `cols` columns, as kernel arguments.
/// Whether `t` needs a GGUF kernel's `_lut4` twin (MXFP4, IQ4_NL, IQ4_XS): the plain kernels
/// decode the eight types they always did and no more, since the table-coded types' code beside
/// them slowed every type (`kernels/ggml_blocks.cuh`).
pub(crate) fn is_lut4(t: StDtype) -> bool {
    t.lut4().is_some()
}

fn ggml_args(t: StDtype, cols: usize) -> Result<(i32, i32)> {
    let id = GgmlLayout::kernel_type(t)
        .ok_or_else(|| err("GGUF stacks", format!("no block kernel for {}", t.name())))?;
    Ok((id, GgmlLayout::row_bytes(t, cols) as i32))
}

/// The checked scale tensor of FP8 stacks ([n, rows blocks, cols blocks] f32 for [n, rows,
/// cols] byte stacks, with `row_groups` groups of rows blocked apart: gate_up's gate and up)
/// and the block as kernel arguments.
fn fp8_scales<'a>(
    w: &Tensor,
    scales: &'a Tensor,
    block: [usize; 2],
    row_groups: usize,
) -> Result<(&'a Tensor, i32, i32)> {
    let (n, rows, cols) = w.dims3()?;
    let [br, bc] = block;
    let want = if br == 0 || bc == 0 || rows % row_groups != 0 {
        None
    } else {
        Some([
            n,
            row_groups * (rows / row_groups).div_ceil(br),
            cols.div_ceil(bc),
        ])
    };
    if w.dtype() != DType::U8
        || scales.dtype() != DType::F32
        || want.is_none_or(|d| scales.dims() != d)
        || !scales.is_contiguous()
    {
        return Err(err(
            "FP8 stacks",
            format!(
                "{:?} weights {:?} with {:?} scales {:?} in {block:?} blocks",
                w.dtype(),
                w.dims(),
                scales.dtype(),
                scales.dims()
            ),
        ));
    }
    Ok((scales, br as i32, bc as i32))
}

/// The first of [`moe_decode`]'s two kernels: `silu(gate_s · x) * (up_s · x)` for each routed
/// expert `s` of each token, as [T·k, I] bf16. Apart so that the step profile
/// (`step_profile.rs`) can time it.
pub fn moe_gate_up(
    x: &Tensor,
    gate_up: &Tensor,
    ids: &Tensor,
    map: Option<&Tensor>,
    fmt: StackFormat,
) -> Result<Tensor> {
    let (t, hidden) = x.dims2()?;
    let k = match ids.dims2()? {
        (1, k) if t == 1 => k,
        // Several tokens: the FP8 and GGUF kernels only (bf16 prompts take candle's MoE GEMM).
        (ti, k) if ti == t && t > 1 && t <= MAX_TOKENS && !matches!(fmt, StackFormat::Dense) => k,
        d => {
            return Err(err("shapes", format!("x {:?} with ids {d:?}", x.dims())));
        }
    };
    let inter = match fmt {
        StackFormat::Ggml(l) if l.hidden == hidden && k <= MAX_TOPK => {
            ggml_stack(gate_up, l.gate_up_bytes(), "gate_up")?;
            l.intermediate
        }
        StackFormat::Ggml(l) => {
            return Err(err(
                "shapes",
                format!("x {:?} against {l}, {k} experts", x.dims()),
            ));
        }
        _ => {
            let (_, two_i, h2) = gate_up.dims3()?;
            if h2 != hidden || two_i % 2 != 0 || k > MAX_TOPK {
                return Err(err(
                    "shapes",
                    format!(
                        "x {:?}, gate_up {:?}, {k} experts",
                        x.dims(),
                        gate_up.dims()
                    ),
                ));
            }
            two_i / 2
        }
    };
    let dev = x.device().as_cuda_device()?.clone();
    let (x, gate_up, ids) = (x.contiguous()?, gate_up.contiguous()?, ids.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = gate_up.storage_and_layout();
    let (is, il) = ids.storage_and_layout();
    let (Storage::Cuda(xs), Storage::Cuda(gs), Storage::Cuda(is)) = (&*xs, &*gs, &*is) else {
        return Err(err("device", "every input must be on the GPU"));
    };
    let xv = xs.as_cuda_slice::<bf16>()?.slice(xl.start_offset()..);
    let iv = is.as_cuda_slice::<u32>()?.slice(il.start_offset()..);
    let map_at = map_addr(map)?;
    let (k_, i_, h_) = (k as i32, inter as i32, hidden as i32);

    // SAFETY: written in full by the kernel below (one warp per element) before any read.
    let mid = unsafe { dev.alloc::<bf16>(t * k * inter)? };
    // One warp per (slot, row) of a token, the tokens along y.
    let grid = LaunchConfig {
        grid_dim: (warp_blocks(k * inter).grid_dim.0, t as u32, 1),
        ..warp_blocks(k * inter)
    };
    match fmt {
        StackFormat::Dense => {
            let gv = gs.as_cuda_slice::<bf16>()?.slice(gl.start_offset()..);
            let f = dev.get_or_load_custom_func("moe_decode_gate_up_bf16", MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&gv)
                .arg(&iv)
                .arg(&map_at)
                .arg(&xv)
                .arg(&mid)
                .arg(&k_)
                .arg(&i_)
                .arg(&h_);
            // SAFETY: argument order and types match the kernel's signature; sizes checked
            // above.
            unsafe { b.launch(grid) }.map_err(|e| err("gate_up launch", e))?;
        }
        StackFormat::Ggml(l) => {
            let gv = gs.as_cuda_slice::<u8>()?.slice(gl.start_offset()..);
            let stride = gate_up.dim(1)? as u64;
            let (tg, rbg) = ggml_args(l.gate, hidden)?;
            let (tu, rbu) = ggml_args(l.up, hidden)?;
            let (xq, xd) = quantize_q8(&dev, &xv, t * hidden)?;
            let name = match (t > 1, is_lut4(l.gate) || is_lut4(l.up)) {
                (true, false) => "moe_tokens_gate_up_ggml",
                (false, false) => "moe_decode_gate_up_ggml",
                (true, true) => "moe_tokens_gate_up_ggml_lut4",
                (false, true) => "moe_decode_gate_up_ggml_lut4",
            };
            let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&gv)
                .arg(&stride)
                .arg(&tg)
                .arg(&rbg)
                .arg(&tu)
                .arg(&rbu)
                .arg(&iv)
                .arg(&map_at)
                .arg(&xq)
                .arg(&xd)
                .arg(&mid)
                .arg(&k_)
                .arg(&i_)
                .arg(&h_);
            let per_row = ggml_stage_per_row(rbg.max(rbu), 2 * WARPS_PER_BLOCK as usize);
            let rows_bytes = 2 * WARPS_PER_BLOCK * per_row;
            // x's codes and scales (H + H / 8 bytes, rounded up to a 16-byte word) staged too
            // where the launch's shared memory allows it: every warp of the block reads all
            // of x, and from shared memory that costs no L1/L2 traffic beside the rows' (Q8_0
            // gate_up 229.5 -> 209.5 us a step on an H200, BENCHMARKS.md §37).
            let x_bytes = (hidden + hidden / 8).next_multiple_of(16) as u32;
            let stage_x = rows_bytes + x_bytes <= GGML_LAUNCH_SHARED;
            let (per_row_, stage_x_) = (per_row as i32, stage_x as i32);
            b.arg(&per_row_).arg(&stage_x_);
            let cfg = LaunchConfig {
                shared_mem_bytes: rows_bytes + if stage_x { x_bytes } else { 0 },
                ..grid
            };
            // SAFETY: argument order and types match the kernel's signature; each stack row
            // holds at least the layout's gate and up bytes (`ggml_stack`), x's codes and
            // scales cover [T, H]; the shared memory holds x where staged, then every warp's
            // two staged rows.
            unsafe { b.launch(cfg) }.map_err(|e| err("GGUF gate_up launch", e))?;
        }
        StackFormat::Fp8(sc) => {
            let (scales, br, bc) = fp8_scales(&gate_up, &sc.gate_up, sc.block, 2)?;
            let gv = gs.as_cuda_slice::<u8>()?.slice(gl.start_offset()..);
            let sv_at = raw_addr(scales, "gate_up scales")?;
            let name = if t > 1 {
                "moe_tokens_gate_up_fp8"
            } else {
                "moe_decode_gate_up_fp8"
            };
            let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&gv)
                .arg(&sv_at)
                .arg(&iv)
                .arg(&map_at)
                .arg(&xv)
                .arg(&mid)
                .arg(&k_)
                .arg(&i_)
                .arg(&h_)
                .arg(&br)
                .arg(&bc);
            // SAFETY: argument order and types match the kernel's signature; the byte stack's
            // and its scales' shapes checked above (`fp8_scales`).
            unsafe { b.launch(grid) }.map_err(|e| err("FP8 gate_up launch", e))?;
        }
    }
    let mid = CudaStorage::wrap_cuda_slice(mid, dev);
    Ok(Tensor::from_storage(
        Storage::Cuda(mid),
        (t * k, inter),
        BackpropOp::none(),
        false,
    ))
}

/// The second of [`moe_decode`]'s kernels: `Σ_s weight_s · down_s · mid_s` for each token as
/// [T, H] bf16, `mid` [T·k, I] from [`moe_gate_up`]; plus `residual` when given.
pub fn moe_down(
    mid: &Tensor,
    down: &Tensor,
    ids: &Tensor,
    map: Option<&Tensor>,
    weights: &Tensor,
    residual: Option<&Tensor>,
    fmt: StackFormat,
) -> Result<Tensor> {
    let (hidden, inter) = match fmt {
        StackFormat::Ggml(l) => {
            ggml_stack(down, l.down_bytes(), "down")?;
            (l.hidden, l.intermediate)
        }
        _ => {
            let (_, hidden, inter) = down.dims3()?;
            (hidden, inter)
        }
    };
    let (t, k) = ids.dims2()?;
    if mid.dims() != [t * k, inter]
        || weights.dims() != [t, k]
        || k == 0
        || k > MAX_TOPK
        || t == 0
        || t > MAX_TOKENS
        || (t > 1 && matches!(fmt, StackFormat::Dense))
        || residual.is_some_and(|r| r.dims() != [t, hidden] || r.dtype() != DType::BF16)
    {
        return Err(err(
            "shapes",
            format!(
                "mid {:?}, down {:?}, {k} experts, weights {:?}",
                mid.dims(),
                down.dims(),
                weights.dims()
            ),
        ));
    }
    let dev = mid.device().as_cuda_device()?.clone();
    let (mid, down) = (mid.contiguous()?, down.contiguous()?);
    let (ids, weights) = (ids.contiguous()?, weights.contiguous()?);
    let (ms, ml) = mid.storage_and_layout();
    let (ds, dl) = down.storage_and_layout();
    let (is, il) = ids.storage_and_layout();
    let (ws, wl) = weights.storage_and_layout();
    let (Storage::Cuda(ms), Storage::Cuda(ds), Storage::Cuda(is), Storage::Cuda(ws)) =
        (&*ms, &*ds, &*is, &*ws)
    else {
        return Err(err("device", "every input must be on the GPU"));
    };
    let mv = ms.as_cuda_slice::<bf16>()?.slice(ml.start_offset()..);
    let iv = is.as_cuda_slice::<u32>()?.slice(il.start_offset()..);
    let wv = ws.as_cuda_slice::<f32>()?.slice(wl.start_offset()..);
    let map_at = map_addr(map)?;
    let (k_, i_, h_) = (k as i32, inter as i32, hidden as i32);
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let res_at = match &residual {
        Some(r) => raw_addr(r, "residual")?,
        None => 0,
    };

    // SAFETY: as above, one warp per output row.
    let y = unsafe { dev.alloc::<bf16>(t * hidden)? };
    // One block per DOWN_ROWS output rows of a token, one warp per routed expert (see the
    // kernel); the tokens along y.
    let cfg = LaunchConfig {
        grid_dim: ((hidden as u32).div_ceil(DOWN_ROWS), t as u32, 1),
        block_dim: (32 * k as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    match fmt {
        StackFormat::Dense => {
            let dv = ds.as_cuda_slice::<bf16>()?.slice(dl.start_offset()..);
            let f = dev.get_or_load_custom_func("moe_decode_down_bf16", MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&dv)
                .arg(&iv)
                .arg(&map_at)
                .arg(&wv)
                .arg(&mv)
                .arg(&y)
                .arg(&res_at)
                .arg(&k_)
                .arg(&i_)
                .arg(&h_);
            // SAFETY: as above; k ≤ MAX_TOPK (checked), the kernel's shared array.
            unsafe { b.launch(cfg) }.map_err(|e| err("down launch", e))?;
        }
        StackFormat::Ggml(l) => {
            let dv = ds.as_cuda_slice::<u8>()?.slice(dl.start_offset()..);
            let stride = down.dim(1)? as u64;
            let (td, rbd) = ggml_args(l.down, inter)?;
            let (mq, md) = quantize_q8(&dev, &mv, t * k * inter)?;
            let name = match (t > 1, is_lut4(l.down)) {
                (true, false) => "moe_tokens_down_ggml",
                (false, false) => "moe_decode_down_ggml",
                (true, true) => "moe_tokens_down_ggml_lut4",
                (false, true) => "moe_decode_down_ggml_lut4",
            };
            let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&dv)
                .arg(&stride)
                .arg(&td)
                .arg(&rbd)
                .arg(&iv)
                .arg(&map_at)
                .arg(&wv)
                .arg(&mq)
                .arg(&md)
                .arg(&y)
                .arg(&res_at)
                .arg(&k_)
                .arg(&i_)
                .arg(&h_);
            // SAFETY: as above; each stack row holds the layout's down bytes (`ggml_stack`),
            // mid's codes and scales cover [T·k, I].
            unsafe { b.launch(cfg) }.map_err(|e| err("GGUF down launch", e))?;
        }
        StackFormat::Fp8(sc) => {
            let (scales, br, bc) = fp8_scales(&down, &sc.down, sc.block, 1)?;
            let dv = ds.as_cuda_slice::<u8>()?.slice(dl.start_offset()..);
            let sv_at = raw_addr(scales, "down scales")?;
            let name = if t > 1 {
                "moe_tokens_down_fp8"
            } else {
                "moe_decode_down_fp8"
            };
            let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&dv)
                .arg(&sv_at)
                .arg(&iv)
                .arg(&map_at)
                .arg(&wv)
                .arg(&mv)
                .arg(&y)
                .arg(&res_at)
                .arg(&k_)
                .arg(&i_)
                .arg(&h_)
                .arg(&br)
                .arg(&bc);
            // SAFETY: as above, and the byte stack's and its scales' shapes checked by
            // `fp8_scales`.
            unsafe { b.launch(cfg) }.map_err(|e| err("FP8 down launch", e))?;
        }
    }

    let y = CudaStorage::wrap_cuda_slice(y, dev);
    Ok(Tensor::from_storage(
        Storage::Cuda(y),
        (t, hidden),
        BackpropOp::none(),
        false,
    ))
}

/// Rows `rows` (u32 [n], on the device) of an FP8 byte stack `w` [E, m, cols] dequantised into a
/// bf16 stack [n, m, cols] with the stack's `scales` (as [`Fp8Scales`] lays them out: `groups`
/// matrices of m / groups rows blocked apart — 2 for gate_up, 1 for down), each weight × its
/// block's scale rounded once. For a prompt's tokens, which then take candle's MoE GEMM.
pub fn fp8_dequant_stack(
    w: &Tensor,
    scales: &Tensor,
    block: [usize; 2],
    groups: usize,
    rows: &Tensor,
) -> Result<Tensor> {
    let (n_stack, m, cols) = w.dims3()?;
    let (scales, br, bc) = fp8_scales(w, scales, block, groups)?;
    let n = rows.elem_count();
    if rows.dtype() != DType::U32 || n == 0 {
        return Err(err(
            "FP8 dequantise",
            format!("rows {:?} {:?}", rows.dtype(), rows.dims()),
        ));
    }
    let dev = w.device().as_cuda_device()?.clone();
    let (w, rows) = (w.contiguous()?, rows.contiguous()?);
    let (ws, wl) = w.storage_and_layout();
    let (rs, rl) = rows.storage_and_layout();
    let (Storage::Cuda(ws), Storage::Cuda(rs)) = (&*ws, &*rs) else {
        return Err(err("device", "every input must be on the GPU"));
    };
    let wv = ws.as_cuda_slice::<u8>()?.slice(wl.start_offset()..);
    let rv = rs.as_cuda_slice::<u32>()?.slice(rl.start_offset()..);
    let sv_at = raw_addr(scales, "dequantise scales")?;
    let total = n * m * cols;
    // SAFETY: every element written by the grid-stride loop.
    let out = unsafe { dev.alloc::<bf16>(total)? };
    let (n_, e_, m_, c_, g_) = (
        n as i32,
        n_stack as i32,
        m as i32,
        cols as i32,
        groups as i32,
    );
    let f = dev.get_or_load_custom_func("fp8_dequant_stack_bf16", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&wv)
        .arg(&sv_at)
        .arg(&rv)
        .arg(&out)
        .arg(&n_)
        .arg(&e_)
        .arg(&m_)
        .arg(&c_)
        .arg(&g_)
        .arg(&br)
        .arg(&bc);
    let cfg = LaunchConfig {
        grid_dim: ((total as u32).div_ceil(256).clamp(1, 16384), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument order and types match the kernel; the stack's and scales' shapes checked
    // by `fp8_scales`; rows past the stack are not read (their outputs are zeros).
    unsafe { b.launch(cfg) }.map_err(|e| err("FP8 dequantise launch", e))?;
    let out = CudaStorage::wrap_cuda_slice(out, dev);
    Ok(Tensor::from_storage(
        Storage::Cuda(out),
        (n, m, cols),
        BackpropOp::none(),
        false,
    ))
}

/// A layer's GGUF stacks (U8 rows of `layout`'s expert bytes, see [`GgmlLayout`]).
pub struct GgmlStack<'a> {
    pub gate_up: &'a Tensor,
    pub down: &'a Tensor,
    pub layout: &'a GgmlLayout,
}

impl GgmlStack<'_> {
    /// Rows `rows` (u32 [n], on the device) of the stacks dequantised: bf16 gate_up
    /// [n, 2I, H] and down [n, H, I], each weight candle's f32 dequantisation rounded to bf16
    /// once; a row past the stacks gives zeros. For a prompt's tokens (candle's MoE GEMM).
    pub fn dequantised(&self, rows: &Tensor) -> Result<(Tensor, Tensor)> {
        let l = self.layout;
        let (h, i) = (l.hidden, l.intermediate);
        ggml_stack(self.gate_up, l.gate_up_bytes(), "gate_up")?;
        ggml_stack(self.down, l.down_bytes(), "down")?;
        let n = rows.elem_count();
        if rows.dtype() != DType::U32 || n == 0 {
            return Err(err(
                "GGUF dequantise",
                format!("rows {:?} {:?}", rows.dtype(), rows.dims()),
            ));
        }
        let dev = self.gate_up.device().as_cuda_device()?.clone();
        let rows = rows.contiguous()?;
        let (rs, rl) = rows.storage_and_layout();
        let Storage::Cuda(rs) = &*rs else {
            return Err(err("device", "every input must be on the GPU"));
        };
        let rv = rs.as_cuda_slice::<u32>()?.slice(rl.start_offset()..);
        // SAFETY: every element written by the launches below (gate's rows, up's, down's).
        let gu = unsafe { dev.alloc::<bf16>(n * 2 * i * h)? };
        let dn = unsafe { dev.alloc::<bf16>(n * h * i)? };
        // (stack, byte offset in an expert, type, rows, columns, output, its rows, first row)
        let parts = [
            (self.gate_up, 0, l.gate, i, h, &gu, 2 * i, 0),
            (self.gate_up, l.gate_bytes(), l.up, i, h, &gu, 2 * i, i),
            (self.down, 0, l.down, h, i, &dn, h, 0),
        ];
        for (w, off, t, m, cols, out, out_rows, row0) in parts {
            let w = w.contiguous()?;
            let (ws, wl) = w.storage_and_layout();
            let Storage::Cuda(ws) = &*ws else {
                return Err(err("device", "every input must be on the GPU"));
            };
            let wv = ws.as_cuda_slice::<u8>()?.slice(wl.start_offset()..);
            let (n_stack, stride) = w.dims2()?;
            let (ty, rb) = ggml_args(t, cols)?;
            let (stride, off) = (stride as u64, off as u64);
            let (n_, e_, m_, c_, or_, r0_) = (
                n as i32,
                n_stack as i32,
                m as i32,
                cols as i32,
                out_rows as i32,
                row0 as i32,
            );
            let f = dev.get_or_load_custom_func("ggml_dequant_stack_bf16", MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&wv)
                .arg(&stride)
                .arg(&off)
                .arg(&ty)
                .arg(&rb)
                .arg(&rv)
                .arg(&n_)
                .arg(&e_)
                .arg(&m_)
                .arg(&c_)
                .arg(out)
                .arg(&or_)
                .arg(&r0_);
            let units = n * m * cols / 8;
            let cfg = LaunchConfig {
                grid_dim: ((units as u32).div_ceil(256).clamp(1, 16384), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument order and types match the kernel; every stack row holds the
            // layout's bytes (`ggml_stack`); rows past the stack are not read.
            unsafe { b.launch(cfg) }.map_err(|e| err("GGUF dequantise launch", e))?;
        }
        let wrap = |s, shape: (usize, usize, usize)| {
            Tensor::from_storage(
                Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
                shape,
                BackpropOp::none(),
                false,
            )
        };
        Ok((wrap(gu, (n, 2 * i, h)), wrap(dn, (n, h, i))))
    }
}

/// Rows `ids` (u32, any shape, on the device) of a block-quantized table (U8 `[rows, row
/// bytes]` of type `t`, `cols` values a row) as bf16 `[n, cols]`: each value candle's f32
/// dequantisation rounded to bf16 once, what the dense bf16 table holds; an id past the table
/// gives zeros. One launch, nothing read back (a decode step's token lookup in a CUDA graph).
pub fn ggml_rows_bf16(
    table: &Tensor,
    t: candle_core::quantized::GgmlDType,
    cols: usize,
    ids: &Tensor,
) -> Result<Tensor> {
    let st = StDtype::from_ggml(t)
        .ok_or_else(|| err("GGUF table", format!("no block kernel for {t:?}")))?;
    block_rows_bf16(table, st, cols, ids)
}

/// [`ggml_rows_bf16`] for any type the block kernels decode, the table-coded ones included
/// (a table-coded attention matrix widened for a prompt's product, `layers.rs`).
pub fn block_rows_bf16(table: &Tensor, st: StDtype, cols: usize, ids: &Tensor) -> Result<Tensor> {
    let (n_rows, rb) = table.dims2()?;
    let (ty, want_rb) = ggml_args(st, cols)?;
    let whole = st
        .block_elems()
        .is_some_and(|b| cols.is_multiple_of(b as usize));
    if table.dtype() != DType::U8 || rb != want_rb as usize || !whole {
        return Err(err(
            "GGUF table",
            format!(
                "{:?} {:?} for {cols} {} values a row",
                table.dtype(),
                table.dims(),
                st.name()
            ),
        ));
    }
    let ids = ids.flatten_all()?.contiguous()?;
    let n = ids.elem_count();
    if ids.dtype() != DType::U32 || n == 0 {
        return Err(err(
            "GGUF table",
            format!("ids {:?} {:?}", ids.dtype(), ids.dims()),
        ));
    }
    let dev = table.device().as_cuda_device()?.clone();
    let table = table.contiguous()?;
    let (ws, wl) = table.storage_and_layout();
    let (rs, rl) = ids.storage_and_layout();
    let (Storage::Cuda(ws), Storage::Cuda(rs)) = (&*ws, &*rs) else {
        return Err(err("device", "every input must be on the GPU"));
    };
    let wv = ws.as_cuda_slice::<u8>()?.slice(wl.start_offset()..);
    let rv = rs.as_cuda_slice::<u32>()?.slice(rl.start_offset()..);
    // SAFETY: every element written by the launch (each id's row, or zeros past the table).
    let out = unsafe { dev.alloc::<bf16>(n * cols)? };
    let (stride, off) = (rb as u64, 0u64);
    let (n_, e_, m_, c_, or_, r0_) = (n as i32, n_rows as i32, 1i32, cols as i32, 1i32, 0i32);
    let f = dev.get_or_load_custom_func("ggml_dequant_stack_bf16", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&wv)
        .arg(&stride)
        .arg(&off)
        .arg(&ty)
        .arg(&want_rb)
        .arg(&rv)
        .arg(&n_)
        .arg(&e_)
        .arg(&m_)
        .arg(&c_)
        .arg(&out)
        .arg(&or_)
        .arg(&r0_);
    let cfg = LaunchConfig {
        grid_dim: (((n * cols / 8) as u32).div_ceil(256).clamp(1, 16384), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument order and types match the kernel; the table's row size checked above;
    // ids past the table are not read.
    unsafe { b.launch(cfg) }.map_err(|e| err("GGUF table launch", e))?;
    Ok(Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev)),
        (n, cols),
        BackpropOp::none(),
        false,
    ))
}

/// Dynamic shared memory a launch may take without opting in to more.
const GGML_LAUNCH_SHARED: u32 = 48 << 10;

/// Shared memory a GGUF expert kernel's block may stage rows in (`ggml_dot_q8_staged`): under
/// the 48 KiB a launch gets without opting in, and small enough for several blocks an SM.
const GGML_STAGE_BYTES: usize = 36 << 10;

/// Staging bytes for each of `rows` rows a block (of `row_bytes` bytes each): the whole row and
/// the 32 bytes that alignment may add where the budget allows (one chunk a row), else the
/// budget's share — a multiple of 16, at least 256 (a Q6_K block, 210 bytes, and its alignment).
fn ggml_stage_per_row(row_bytes: i32, rows: usize) -> u32 {
    let whole = (row_bytes.max(0) as usize + 32).next_multiple_of(16);
    let share = (GGML_STAGE_BYTES / rows.max(1)) / 16 * 16;
    whole.min(share).max(256) as u32
}

/// Enough blocks for one warp per output element.
fn warp_blocks(warps: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((warps as u32).div_ceil(WARPS_PER_BLOCK), 1, 1),
        block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `n` bf16 values (a multiple of 32, from `x`) rounded to 8-bit blocks on the device, for the
/// GGUF kernels: codes [n] and one f32 scale per 32 values (`quantize_q8_bf16`).
pub(crate) fn quantize_q8(
    dev: &candle_core::cuda_backend::CudaDevice,
    x: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, bf16>,
    n: usize,
) -> Result<(
    candle_core::cuda_backend::cudarc::driver::CudaSlice<i8>,
    candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
)> {
    if !n.is_multiple_of(32) || x.len() < n {
        return Err(err(
            "8-bit blocks",
            format!("{n} values of {}, not a multiple of 32", x.len()),
        ));
    }
    let blocks = n / 32;
    // SAFETY: written in full by the kernel below (one warp per block of 32) before any read.
    let q = unsafe { dev.alloc::<i8>(n)? };
    // SAFETY: as above, lane 0 of each block's warp.
    let d = unsafe { dev.alloc::<f32>(blocks)? };
    let f = dev.get_or_load_custom_func("quantize_q8_bf16", MODULE, PTX)?;
    let mut b = f.builder();
    let blocks_ = blocks as i32;
    b.arg(x).arg(&q).arg(&d).arg(&blocks_);
    // SAFETY: argument order and types match the kernel's signature; x holds n values.
    unsafe { b.launch(warp_blocks(blocks)) }.map_err(|e| err("8-bit blocks launch", e))?;
    Ok((q, d))
}

/// [`quantize_q8`] of a [rows, n] bf16 tensor, read back: the codes and scales the GGUF kernels
/// multiply (for tests that rebuild their products on the host).
#[cfg(test)]
pub fn quantize_q8_host(x: &Tensor) -> Result<(Vec<i8>, Vec<f32>)> {
    let x = x.contiguous()?;
    let dev = x.device().as_cuda_device()?.clone();
    let (xs, xl) = x.storage_and_layout();
    let Storage::Cuda(xs) = &*xs else {
        return Err(err("device", "x must be on the GPU"));
    };
    let xv = xs.as_cuda_slice::<bf16>()?.slice(xl.start_offset()..);
    let (q, d) = quantize_q8(&dev, &xv, x.elem_count())?;
    let q = dev.clone_dtoh(&q).map_err(|e| err("read back", e))?;
    let d = dev.clone_dtoh(&d).map_err(|e| err("read back", e))?;
    Ok((q, d))
}

/// A raw address (0: none): the kernels read `map` only through `ids`, within its length as long
/// as the ids are expert ids (the router's), which is what callers passing it give.
fn map_addr(map: Option<&Tensor>) -> Result<u64> {
    match map {
        Some(m) if m.dtype() != DType::U32 => Err(err("map", format!("{:?}, not u32", m.dtype()))),
        Some(m) => raw_addr(m, "map"),
        None => Ok(0),
    }
}

/// The device address of a whole tensor, for a kernel argument. It must be contiguous in place:
/// a contiguous copy made here would be freed before the kernel ran.
fn raw_addr(t: &Tensor, what: &str) -> Result<u64> {
    if !t.is_contiguous() {
        return Err(err(what, "not contiguous"));
    }
    super::raw::device_range(t, 0, t.elem_count() * t.dtype().size_in_bytes())
        .map(|(a, _)| a)
        .map_err(|e| err(what, e))
}

/// Fills, on the device, the slots of the experts in `ids` (u32, any shape) that `fill` says are
/// not resident, reading them from host memory, then records them as resident (see
/// `fill_routed_experts` in the kernel file). FP8 slots (`fill.scales`) take their block scales
/// into `scales`' pools in the same way first. Nothing is read back: capturable in a CUDA graph.
pub fn fill_routed(
    ids: &Tensor,
    fill: &super::ports::DeviceFill,
    gate_up: &Tensor,
    down: &Tensor,
    scales: Option<&super::ports::Fp8Scales>,
) -> Result<()> {
    const THREADS: u32 = 256;
    let ids = ids.flatten_all()?.contiguous()?;
    let n_ids = ids.elem_count();
    let n_experts = fill.resident.elem_count();
    if fill.home.elem_count() != n_experts {
        return Err(err("fill shapes", "tables do not match the slot pool"));
    }
    let (ids_at, res_at, home_at) = (
        raw_addr(&ids, "fill ids")?,
        raw_addr(&fill.resident, "fill residency")?,
        raw_addr(&fill.home, "fill homes")?,
    );
    let dev = ids.device().as_cuda_device()?.clone();
    let (n, e) = (n_ids as i32, n_experts as i32);
    let fills = FillArgs {
        ids: ids_at,
        resident: res_at,
        home: home_at,
        n_ids: n,
        n_experts: e,
    };
    match (&fill.scales, scales) {
        (Some(sf), Some(pools)) => fills.launch(
            &dev,
            &sf.sources,
            &pools.gate_up,
            &pools.down,
            sf.part_bytes,
            sf.part_at,
        )?,
        (None, None) => {}
        _ => return Err(err("fill shapes", "FP8 scales without their pools")),
    }
    fills.launch(
        &dev,
        &fill.sources,
        gate_up,
        down,
        fill.part_bytes,
        fill.part_at,
    )?;
    let f = dev.get_or_load_custom_func("mark_filled", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&ids_at).arg(&res_at).arg(&n).arg(&e);
    let cfg = LaunchConfig {
        grid_dim: ((n_ids as u32).div_ceil(THREADS), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel's signature; `ids` and `resident` are the tables
    // checked above.
    unsafe { b.launch(cfg) }.map_err(|e| err("mark launch", e))?;
    Ok(())
}

/// The routed ids and the residency tables one step's fill launches share.
struct FillArgs {
    ids: u64,
    resident: u64,
    home: u64,
    n_ids: i32,
    n_experts: i32,
}

impl FillArgs {
    /// One `fill_routed_experts` launch: the three parts of each routed expert not resident,
    /// `bytes` each, from the addresses in `sources` to `at` in its home slot's row of `gate_up`
    /// (gate, up) or `down`.
    fn launch(
        &self,
        dev: &candle_core::CudaDevice,
        sources: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
        [lg, lu, ld]: [usize; 3],
        [ag, au, ad]: [usize; 3],
    ) -> Result<()> {
        const BLOCKS_PER_PART: u32 = 16;
        const THREADS: u32 = 256;
        // A slot's row of each stack, in bytes (the pools are [slots, ...] in any dtype).
        let row = |t: &Tensor| -> Result<usize> {
            let slots = t.dim(0)?;
            Ok(t.elem_count() * t.dtype().size_in_bytes() / slots.max(1))
        };
        let (gu_row, dn_row) = (row(gate_up)?, row(down)?);
        if sources.elem_count() != 3 * self.n_experts as usize
            || ag + lg > gu_row
            || au + lu > gu_row
            || ad + ld > dn_row
            || !gate_up.is_contiguous()
            || !down.is_contiguous()
        {
            return Err(err("fill shapes", "tables do not match the slot pool"));
        }
        let (src_at, gu_at, dn_at) = (
            raw_addr(sources, "fill sources")?,
            raw_addr(gate_up, "fill gate_up")?,
            raw_addr(down, "fill down")?,
        );
        let u = |v: usize| v as u64;
        let (gu_row, dn_row) = (u(gu_row), u(dn_row));
        let (lg, lu, ld, ag, au, ad) = (u(lg), u(lu), u(ld), u(ag), u(au), u(ad));
        let f = dev.get_or_load_custom_func("fill_routed_experts", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&self.ids)
            .arg(&self.resident)
            .arg(&self.home)
            .arg(&src_at)
            .arg(&gu_at)
            .arg(&dn_at)
            .arg(&gu_row)
            .arg(&dn_row)
            .arg(&lg)
            .arg(&lu)
            .arg(&ld)
            .arg(&ag)
            .arg(&au)
            .arg(&ad)
            .arg(&self.n_ids)
            .arg(&self.n_experts);
        let cfg = LaunchConfig {
            grid_dim: (BLOCKS_PER_PART, self.n_ids as u32, 3),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel's signature; every table was checked against the
        // pool above, `home` holds slots inside it (checked when the tables were built) and
        // `sources` device addresses of registered host memory that stays registered while the
        // pool lives.
        unsafe { b.launch(cfg) }.map_err(|e| err("fill launch", e))?;
        Ok(())
    }
}

/// Largest expert count the routing kernel handles (one warp, 32 experts per lane).
pub const MAX_EXPERTS: usize = 1024;

/// Router output for `t` tokens: `logits` [T, E] bf16 → (ids [T, k] u32, weights [T, k] f32):
/// softmax in f32, top-k (ties to the lower index), renormalised when `norm`, weights rounded to
/// bf16 — one launch instead of the ten small ops of the generic path.
pub fn route(logits: &Tensor, k: usize, norm: bool) -> Result<(Tensor, Tensor)> {
    let (t, e) = logits.dims2()?;
    if logits.dtype() != DType::BF16 || e > MAX_EXPERTS || k > MAX_TOPK || k > e {
        return Err(err(
            "routing",
            format!("{:?} logits {:?}, top-{k}", logits.dtype(), logits.dims()),
        ));
    }
    let dev = logits.device().as_cuda_device()?.clone();
    let logits = logits.contiguous()?;
    let (ls, ll) = logits.storage_and_layout();
    let Storage::Cuda(ls) = &*ls else {
        return Err(err("device", "logits must be on the GPU"));
    };
    let lv = ls.as_cuda_slice::<bf16>()?.slice(ll.start_offset()..);
    // SAFETY: every element is written by the kernel (lane 0 of each token's warp).
    let ids = unsafe { dev.alloc::<u32>(t * k)? };
    let w = unsafe { dev.alloc::<f32>(t * k)? };
    let (e_, k_, n_) = (e as i32, k as i32, i32::from(norm));
    let f = dev.get_or_load_custom_func("moe_route_topk_bf16", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&lv).arg(&e_).arg(&k_).arg(&n_).arg(&ids).arg(&w);
    let cfg = LaunchConfig {
        grid_dim: (t as u32, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument order and types match the kernel; sizes checked above.
    unsafe { b.launch(cfg) }.map_err(|e| err("routing launch", e))?;
    let wrap = |s: CudaStorage, dims: (usize, usize)| {
        Tensor::from_storage(Storage::Cuda(s), dims, BackpropOp::none(), false)
    };
    Ok((
        wrap(CudaStorage::wrap_cuda_slice(ids, dev.clone()), (t, k)),
        wrap(CudaStorage::wrap_cuda_slice(w, dev), (t, k)),
    ))
}

/// Warps per block of the fused router: 4, so that 128 experts spread over 32 blocks.
const ROUTER_WARPS: u32 = 4;

/// The router of one decode token in one launch (`moe_router_topk_bf16`): `x` [1, H] bf16,
/// `router` [E, H] bf16 → (ids [1, k] u32, weights [1, k] f32), the same routing [`route`] gives
/// on the logits `x·routerᵀ` rounded to bf16. `arrived`: a u32 `[1]` on the device, zero, kept
/// for this router (the launch leaves it zero again); one launch at a time may use it.
pub fn route_fused(
    x: &Tensor,
    router: &Tensor,
    k: usize,
    norm: bool,
    arrived: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (t, hidden) = x.dims2()?;
    let (e, h2) = router.dims2()?;
    if t != 1
        || h2 != hidden
        || x.dtype() != DType::BF16
        || router.dtype() != DType::BF16
        || e > MAX_EXPERTS
        || k > MAX_TOPK
        || k > e
        || arrived.dtype() != DType::U32
        || arrived.elem_count() != 1
    {
        return Err(err(
            "fused routing",
            format!(
                "x {:?}, router {:?} {:?}, top-{k}",
                x.dims(),
                router.dims(),
                router.dtype()
            ),
        ));
    }
    let dev = x.device().as_cuda_device()?.clone();
    let (x, router) = (x.contiguous()?, router.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (rs, rl) = router.storage_and_layout();
    let (Storage::Cuda(xs), Storage::Cuda(rs)) = (&*xs, &*rs) else {
        return Err(err("device", "every input must be on the GPU"));
    };
    let xv = xs.as_cuda_slice::<bf16>()?.slice(xl.start_offset()..);
    let rv = rs.as_cuda_slice::<bf16>()?.slice(rl.start_offset()..);
    let arrived_at = raw_addr(arrived, "router counter")?;
    // SAFETY: the logits are written (one warp per expert) before the last block reads them;
    // ids and weights by the last block's first lane.
    let logits = unsafe { dev.alloc::<f32>(e)? };
    let ids = unsafe { dev.alloc::<u32>(k)? };
    let w = unsafe { dev.alloc::<f32>(k)? };
    let (e_, h_, k_, n_) = (e as i32, hidden as i32, k as i32, i32::from(norm));
    let f = dev.get_or_load_custom_func("moe_router_topk_bf16", MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&rv)
        .arg(&xv)
        .arg(&e_)
        .arg(&h_)
        .arg(&k_)
        .arg(&n_)
        .arg(&logits)
        .arg(&arrived_at)
        .arg(&ids)
        .arg(&w);
    let cfg = LaunchConfig {
        grid_dim: ((e as u32).div_ceil(ROUTER_WARPS), 1, 1),
        block_dim: (32 * ROUTER_WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument order and types match the kernel; sizes checked above; `arrived` is a
    // live u32 on this device that only this router's launches use, in stream order.
    unsafe { b.launch(cfg) }.map_err(|e| err("fused routing launch", e))?;
    let wrap =
        |s: CudaStorage| Tensor::from_storage(Storage::Cuda(s), (1, k), BackpropOp::none(), false);
    Ok((
        wrap(CudaStorage::wrap_cuda_slice(ids, dev.clone())),
        wrap(CudaStorage::wrap_cuda_slice(w, dev)),
    ))
}

/// These run on a GPU (`scripts/gpu_unit_tests.sh`); without one each says so and passes
/// vacuously.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ports::Fp8Scales;
    use crate::util::gpu_test::{bf16_matrix, device};

    /// `values` as a bf16 tensor of `shape` on `dev` (each value rounded to bf16).
    fn bf16_tensor(values: Vec<f32>, shape: (usize, usize), dev: &candle_core::Device) -> Tensor {
        Tensor::from_vec(values, shape, dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    #[test]
    fn fused_router_routes_like_the_host_on_rounded_logits_launch_after_launch() {
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        for (e, h, k, norm) in [
            (128, 2048, 8, true),
            (60, 520, 4, false),
            (1024, 64, 16, true),
        ] {
            let (router, rh) = bf16_matrix(e, h, 3, 251, 1.0 / 256.0, &dev);
            let arrived = Tensor::zeros(1, DType::U32, &dev).unwrap();
            for seed in 0..3 {
                let (x, xh) = bf16_matrix(1, h, 10 + seed, 241, 1.0 / 64.0, &dev);
                let logits: Vec<f32> = (0..e)
                    .map(|r| {
                        let d: f64 = (0..h).map(|c| rh[r * h + c] as f64 * xh[c] as f64).sum();
                        bf16::from_f64(d).to_f32()
                    })
                    .collect();
                let want = crate::model::moe_block::route(&logits, &[], k, norm);
                // The kth and (k+1)th logits apart: a tie could go either way in f32 vs f64.
                let mut sorted = logits.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let clear = sorted[k - 1] > sorted[k];
                // Replayed launches: the block counter must be back at zero each time.
                for _ in 0..2 {
                    let (ids, w) = route_fused(&x, &router, k, norm, &arrived).unwrap();
                    let ids: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
                    let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
                    if clear {
                        assert_eq!(ids, want.experts, "e {e} seed {seed}");
                        for (a, b) in w.iter().zip(&want.weights) {
                            assert!((a - b).abs() <= b.abs() / 128.0, "weight {a} vs {b}");
                        }
                    }
                    let again: Vec<u32> = route_fused(&x, &router, k, norm, &arrived)
                        .unwrap()
                        .0
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert_eq!(ids, again, "same inputs, same routing");
                }
                let n: Vec<u32> = arrived.to_vec1().unwrap();
                assert_eq!(n, [0], "the last block resets the counter");
            }
        }
    }

    /// Logits with many exact ties — x one-hot, so each logit is one router weight in any order
    /// of summation — routed by the fused kernel exactly as the host routes them: the ids in the
    /// host's order (larger first, the lower index on ties, ties at the k-th place too), the
    /// weights within a bf16 step. Up to 256 experts take the block-wide ranked routing, more the
    /// one-warp routing; a NaN logit falls back to the one-warp routing (valid ids, no hang).
    #[test]
    fn fused_router_breaks_ties_like_the_host() {
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        let h = 64;
        let mut x = vec![0f32; h];
        x[5] = 1.0;
        let xt = bf16_tensor(x, (1, h), &dev);
        for (e, k, norm, levels) in [
            (128, 8, true, 5),
            (128, 8, false, 3),
            (60, 4, true, 2),
            (200, 16, true, 7),
            (256, 8, true, 1),
            (300, 8, true, 4),
            (8, 8, true, 3),
        ] {
            // Column 5 holds the logits: a few levels, so every level is shared by many experts.
            let vals: Vec<f32> = (0..e)
                .map(|r| ((r * 7 + r / 3) % levels) as f32 * 0.25 - 0.5)
                .collect();
            let mut w = vec![0f32; e * h];
            for (r, v) in vals.iter().enumerate() {
                w[r * h + 5] = *v;
            }
            let router = bf16_tensor(w, (e, h), &dev);
            let arrived = Tensor::zeros(1, DType::U32, &dev).unwrap();
            let want = crate::model::moe_block::route(&vals, &[], k, norm);
            for _ in 0..2 {
                let (ids, wt) = route_fused(&xt, &router, k, norm, &arrived).unwrap();
                let ids: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
                let wt: Vec<f32> = wt.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(ids, want.experts, "e {e} k {k} levels {levels}");
                for (a, b) in wt.iter().zip(&want.weights) {
                    assert!((a - b).abs() <= b.abs() / 128.0, "e {e}: weight {a} vs {b}");
                }
            }
            assert_eq!(arrived.to_vec1::<u32>().unwrap(), [0], "counter reset");
        }
        // A NaN logit: the one-warp routing's picks, every id a real expert.
        let e = 128;
        let mut w = vec![0f32; e * h];
        for r in 0..e {
            w[r * h + 5] = if r == 17 {
                f32::NAN
            } else {
                (r % 9) as f32 * 0.125
            };
        }
        let router = bf16_tensor(w, (e, h), &dev);
        let arrived = Tensor::zeros(1, DType::U32, &dev).unwrap();
        let (ids, _) = route_fused(&xt, &router, 8, true, &arrived).unwrap();
        let ids: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < e), "ids {ids:?}");
        assert_eq!(arrived.to_vec1::<u32>().unwrap(), [0], "counter reset");
    }

    /// FP8 stacks of `e` experts (gate_up [e, 2i, h], down [e, h, i]) from a deterministic
    /// byte pattern avoiding the NaN codes, scales in `block`s; with their host copies.
    #[allow(clippy::type_complexity)]
    fn fp8_stacks(
        e: usize,
        h: usize,
        i: usize,
        block: [usize; 2],
        dev: &candle_core::Device,
    ) -> (Tensor, Tensor, Fp8Scales, [Vec<u8>; 2], [Vec<f32>; 2]) {
        let [br, bc] = block;
        let code = |n: usize| -> u8 {
            let b = ((n.wrapping_mul(2654435761) >> 7) % 256) as u8;
            if b & 0x7F == 0x7F { b ^ 1 } else { b }
        };
        let gu: Vec<u8> = (0..e * 2 * i * h).map(code).collect();
        let dn: Vec<u8> = (0..e * h * i).map(|n| code(n + 7)).collect();
        let (sr, sc) = (i.div_ceil(br), h.div_ceil(bc));
        let scale = |n: usize| 2f32.powi(-10) * (1.0 + (n % 13) as f32 / 8.0);
        let gus: Vec<f32> = (0..e * 2 * sr * sc).map(scale).collect();
        let (dsr, dsc) = (h.div_ceil(br), i.div_ceil(bc));
        let dns: Vec<f32> = (0..e * dsr * dsc).map(|n| scale(n + 5)).collect();
        let t = |v: &[u8], d: (usize, usize, usize)| Tensor::from_vec(v.to_vec(), d, dev).unwrap();
        let f = |v: &[f32], d: (usize, usize, usize)| Tensor::from_vec(v.to_vec(), d, dev).unwrap();
        let scales = Fp8Scales {
            gate_up: f(&gus, (e, 2 * sr, sc)),
            down: f(&dns, (e, dsr, dsc)),
            block,
        };
        (
            t(&gu, (e, 2 * i, h)),
            t(&dn, (e, h, i)),
            scales,
            [gu, dn],
            [gus, dns],
        )
    }

    fn bf16_bits(t: &Tensor) -> Vec<u16> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn fp8_kernels_compute_the_dequantised_experts() {
        use crate::model::fp8::E4M3;
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        let r = |v: f64| bf16::from_f64(v).to_f64();
        // Whole and partial blocks; 8-byte groups and (bc 20, h 130) the one-by-one path.
        for (e, h, i, block) in [
            (6, 256, 96, [128, 128]),
            (5, 200, 72, [32, 48]),
            (5, 130, 40, [16, 20]),
        ] {
            let (gu, dn, sc, [gub, dnb], [gus, dns]) = fp8_stacks(e, h, i, block, &dev);
            let [br, bc] = block;
            let (x, xh) = bf16_matrix(1, h, 3, 239, 1.0 / 8.0, &dev);
            let ids = Tensor::new(&[[3u32, 0, 4, 1]], &dev).unwrap();
            let wv = [0.5f32, 0.25, 0.125, 0.125];
            let w = Tensor::new(&[wv], &dev).unwrap();
            let mid = moe_gate_up(&x, &gu, &ids, None, StackFormat::Fp8(&sc)).unwrap();
            let mid_h = crate::util::gpu_test::host(&mid);
            let (sr, scn) = (i.div_ceil(br), h.div_ceil(bc));
            let wgu = |ex: usize, row: usize, c: usize| -> f64 {
                let srow = if row < i {
                    row / br
                } else {
                    sr + (row - i) / br
                };
                E4M3[gub[(ex * 2 * i + row) * h + c] as usize] as f64
                    * gus[(ex * 2 * sr + srow) * scn + c / bc] as f64
            };
            let mut worst = 0f64;
            for (s, &ex) in [3usize, 0, 4, 1].iter().enumerate() {
                for row in 0..i {
                    let g: f64 = (0..h).map(|c| wgu(ex, row, c) * xh[c] as f64).sum();
                    let u: f64 = (0..h).map(|c| wgu(ex, i + row, c) * xh[c] as f64).sum();
                    let (gb, ub) = (r(g), r(u));
                    let want = r(r(gb / (1.0 + (-gb).exp())) * ub);
                    let got = mid_h[s * i + row] as f64;
                    // f32 sums against f64 ones: at most a rounding step apart in bf16.
                    let d = (got - want).abs() / want.abs().max(1.0 / 16.0);
                    worst = worst.max(d);
                }
            }
            // Four bf16 rounding steps (g, u, the activation, the product), none large.
            assert!(
                worst <= 1.0 / 64.0,
                "gate_up {h}x{i} {block:?}: rel. error {worst}"
            );
            let y = moe_down(&mid, &dn, &ids, None, &w, None, StackFormat::Fp8(&sc)).unwrap();
            let yh = crate::util::gpu_test::host(&y);
            let (dsr, dsc) = (h.div_ceil(br), i.div_ceil(bc));
            let want: Vec<f64> = (0..h)
                .map(|row| {
                    let mut acc = 0f64;
                    for (s, &ex) in [3usize, 0, 4, 1].iter().enumerate() {
                        let d: f64 = (0..i)
                            .map(|c| {
                                E4M3[dnb[(ex * h + row) * i + c] as usize] as f64
                                    * dns[(ex * dsr + row / br) * dsc + c / bc] as f64
                                    * mid_h[s * i + c] as f64
                            })
                            .sum();
                        acc += r(r(d) * r(wv[s] as f64));
                    }
                    r(acc)
                })
                .collect();
            let top = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (row, (&a, &b)) in yh.iter().zip(&want).enumerate() {
                assert!(
                    (a as f64 - b).abs() <= top / 64.0,
                    "down {h}x{i} {block:?} row {row}: {a} vs {b} (largest {top})"
                );
            }
        }
    }

    #[test]
    fn fp8_stacks_dequantise_to_their_rounded_values() {
        use crate::model::fp8::E4M3;
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        for (e, h, i, block) in [(5, 200, 72, [32, 48]), (3, 130, 40, [16, 20])] {
            let (gu, dn, sc, [gub, dnb], [gus, dns]) = fp8_stacks(e, h, i, block, &dev);
            let [br, bc] = block;
            // Rows 4 and 1, then one past the stack (zeros).
            let rows = Tensor::new(&[4u32 % e as u32, 1, e as u32], &dev).unwrap();
            let got_gu = crate::util::gpu_test::host(
                &fp8_dequant_stack(&gu, &sc.gate_up, block, 2, &rows).unwrap(),
            );
            let got_dn = crate::util::gpu_test::host(
                &fp8_dequant_stack(&dn, &sc.down, block, 1, &rows).unwrap(),
            );
            let (sr, scn) = (i.div_ceil(br), h.div_ceil(bc));
            let (dsr, dsc) = (h.div_ceil(br), i.div_ceil(bc));
            let b = |v: f32| bf16::from_f32(v).to_f32().to_bits();
            for (j, ex) in [4 % e, 1].into_iter().enumerate() {
                for row in 0..2 * i {
                    let srow = if row < i {
                        row / br
                    } else {
                        sr + (row - i) / br
                    };
                    for c in 0..h {
                        let want = E4M3[gub[(ex * 2 * i + row) * h + c] as usize]
                            * gus[(ex * 2 * sr + srow) * scn + c / bc];
                        let got = got_gu[(j * 2 * i + row) * h + c];
                        assert_eq!(got.to_bits(), b(want), "gate_up {ex} ({row}, {c})");
                    }
                }
                for row in 0..h {
                    for c in 0..i {
                        let want = E4M3[dnb[(ex * h + row) * i + c] as usize]
                            * dns[(ex * dsr + row / br) * dsc + c / bc];
                        assert_eq!(got_dn[(j * h + row) * i + c].to_bits(), b(want), "down");
                    }
                }
            }
            assert!(got_gu[2 * 2 * i * h..].iter().all(|&v| v == 0.0));
            assert!(got_dn[2 * h * i..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn fp8_decode_is_exact_for_every_code_and_keeps_nan() {
        use crate::model::fp8::E4M3;
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        // Down rows h = 0..255 hold code h at column 5 and zeros elsewhere, scale 1; mid is
        // one-hot at column 5 and the weight 1, so y[h] is the decoded code itself.
        for (i, bc) in [(16, 16), (16, 4)] {
            let h = 256;
            let mut bytes = vec![0u8; h * i];
            for code in 0..h {
                bytes[code * i + 5] = code as u8;
            }
            let down = Tensor::from_vec(bytes, (1, h, i), &dev).unwrap();
            let sc = Fp8Scales {
                gate_up: Tensor::ones((1, 2, 1), DType::F32, &dev).unwrap(),
                down: Tensor::ones((1, 1, i.div_ceil(bc)), DType::F32, &dev).unwrap(),
                block: [256, bc],
            };
            let mut m = vec![0f32; i];
            m[5] = 1.0;
            let mid = bf16_tensor(m, (1, i), &dev);
            let ids = Tensor::new(&[[0u32]], &dev).unwrap();
            let w = Tensor::new(&[[1f32]], &dev).unwrap();
            let y = moe_down(&mid, &down, &ids, None, &w, None, StackFormat::Fp8(&sc)).unwrap();
            let y = crate::util::gpu_test::host(&y);
            for (code, (&got, &want)) in y.iter().zip(E4M3.iter()).enumerate() {
                if want.is_nan() {
                    assert!(got.is_nan(), "code {code:#04x} (NaN) gave {got}, bc {bc}");
                } else if want == 0.0 {
                    // -0 comes out +0: the kernel's f32 sum over experts starts at +0.
                    assert_eq!(got, 0.0, "code {code:#04x}, bc {bc}");
                } else {
                    assert_eq!(got.to_bits(), want.to_bits(), "code {code:#04x}, bc {bc}");
                }
            }
        }
    }

    #[test]
    fn fp8_slot_pool_through_its_map_gives_the_stacks_bits() {
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        let (e, h, i, block) = (6, 256, 96, [128, 128]);
        let (gu, dn, sc, _, _) = fp8_stacks(e, h, i, block, &dev);
        // A pool of 4 slots holding experts 3, 0, 4, 1 in slots 2, 0, 3, 1.
        let order = Tensor::new(&[0u32, 1, 3, 4], &dev).unwrap();
        let pick = |t: &Tensor| t.index_select(&order, 0).unwrap().contiguous().unwrap();
        let pool = Fp8Scales {
            gate_up: pick(&sc.gate_up),
            down: pick(&sc.down),
            block,
        };
        let mut map = vec![0u32; e];
        for (slot, &ex) in [0usize, 1, 3, 4].iter().enumerate() {
            map[ex] = slot as u32;
        }
        let map = Tensor::new(map.as_slice(), &dev).unwrap();
        let (x, _) = bf16_matrix(1, h, 5, 239, 1.0 / 8.0, &dev);
        let (res, _) = bf16_matrix(1, h, 6, 233, 1.0 / 8.0, &dev);
        let ids = Tensor::new(&[[3u32, 0, 4, 1]], &dev).unwrap();
        let w = Tensor::new(&[[0.5f32, 0.25, 0.125, 0.125]], &dev).unwrap();
        let native = moe_decode(
            &x,
            &gu,
            &dn,
            &ids,
            None,
            &w,
            Some(&res),
            StackFormat::Fp8(&sc),
        )
        .unwrap();
        let slots = moe_decode(
            &x,
            &pick(&gu),
            &pick(&dn),
            &ids,
            Some(&map),
            &w,
            Some(&res),
            StackFormat::Fp8(&pool),
        )
        .unwrap();
        assert_eq!(bf16_bits(&native), bf16_bits(&slots));
    }

    /// A GGUF expert quantized by candle on the CPU: gate_up's bytes (gate's then up's),
    /// down's, and their dequantised values ([2I, H] and [H, I], candle's CPU dequantisation).
    fn ggml_expert(l: &GgmlLayout, seed: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>, Vec<f32>) {
        use candle_core::quantized::QTensor;
        let (h, i) = (l.hidden, l.intermediate);
        let q = |rows, cols, s, t: StDtype| {
            let w = crate::util::test_matrix(rows, cols, s, 251, 1.0 / 64.0);
            if let Some(f) = t.lut4() {
                // The table-coded types, which candle does not quantize: moescope's test
                // quantizer, decoded as llama.cpp decodes them.
                let x: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
                return super::super::lut4::quantize_for_tests(f, &x);
            }
            let q = QTensor::quantize(&w, t.ggml().unwrap()).unwrap();
            let deq: Vec<f32> = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (q.data().unwrap().to_vec(), deq)
        };
        let (mut gu, mut gud) = q(i, h, seed, l.gate);
        let (ub, ud) = q(i, h, seed + 1, l.up);
        gu.extend(ub);
        gud.extend(ud);
        let (dn, dnd) = q(h, i, seed + 2, l.down);
        assert_eq!((gu.len(), dn.len()), (l.gate_up_bytes(), l.down_bytes()));
        (gu, dn, gud, dnd)
    }

    /// `e` GGUF experts stacked with `pad` spare bytes a row (as a slot pool shared with a
    /// larger layer has), with their dequantised values.
    #[allow(clippy::type_complexity)]
    fn ggml_stacks(
        l: &GgmlLayout,
        e: usize,
        pad: usize,
        dev: &candle_core::Device,
    ) -> (Tensor, Tensor, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let (sgu, sdn) = (l.gate_up_bytes() + pad, l.down_bytes() + pad);
        let (mut gu, mut dn) = (vec![0xA5u8; e * sgu], vec![0x5Au8; e * sdn]);
        let (mut gud, mut dnd) = (Vec::new(), Vec::new());
        for x in 0..e {
            let (g, d, gv, dv) = ggml_expert(l, 100 * x + 3);
            gu[x * sgu..x * sgu + g.len()].copy_from_slice(&g);
            dn[x * sdn..x * sdn + d.len()].copy_from_slice(&d);
            gud.push(gv);
            dnd.push(dv);
        }
        (
            Tensor::from_vec(gu, (e, sgu), dev).unwrap(),
            Tensor::from_vec(dn, (e, sdn), dev).unwrap(),
            gud,
            dnd,
        )
    }

    /// Layouts over every type the block kernels decode, K types at K-sized rows.
    fn ggml_layouts() -> Vec<GgmlLayout> {
        use super::super::lut4::Lut4;
        use StDtype as G;
        let l = |g, u, d, h, i| GgmlLayout::new([g, u, d], h, i).expect("a kernel layout");
        let (nl, xs, mx) = (
            G::Lut4(Lut4::Iq4Nl),
            G::Lut4(Lut4::Iq4Xs),
            G::Lut4(Lut4::Mxfp4),
        );
        vec![
            l(G::Q4K, G::Q4K, G::Q6K, 512, 256),
            l(G::Q5K, G::Q6K, G::Q4K, 256, 512),
            l(G::Q8_0, G::Q8_0, G::Q8_0, 160, 96),
            l(G::Q4_0, G::Q4_1, G::Q5_0, 96, 64),
            l(G::Q5_1, G::Q5_0, G::Q8_0, 64, 160),
            // A gate row longer than a warp's staging buffer (Q8_0, 2,448 bytes: staged in two
            // chunks), and long Q6_K down rows (2,310 bytes).
            l(G::Q8_0, G::Q4K, G::Q6K, 2304, 2816),
            // The IQ4 files' experts: IQ4_XS gate/up beside a k-quant down (what llama-quantize
            // writes for IQ4_XS), IQ4_NL throughout, and IQ4_XS down rows of three blocks.
            l(xs, xs, G::Q5K, 512, 256),
            l(nl, nl, nl, 96, 160),
            l(G::Q4K, nl, xs, 256, 768),
            // MXFP4_MOE's experts (17-byte blocks, so fields at every byte alignment): all
            // MXFP4; gate rows of 2,448 bytes (staged in two chunks that split no block) beside
            // a Q4_K down; MXFP4 beside the other table types.
            l(mx, mx, mx, 96, 160),
            l(mx, mx, G::Q4K, 4608, 256),
            l(xs, mx, nl, 256, 96),
        ]
    }

    /// A row is staged whole where the budget allows, else in the budget's share; always room
    /// for a Q6_K block and its alignment, in multiples of 16.
    #[test]
    fn ggml_staging_fits_the_budget_and_a_block() {
        assert_eq!(ggml_stage_per_row(2176, 16), 2208);
        assert_eq!(ggml_stage_per_row(2448, 16), 2304);
        assert_eq!(ggml_stage_per_row(816, 32), 848);
        assert_eq!(ggml_stage_per_row(816, 64), 576);
        assert_eq!(ggml_stage_per_row(210, 1000), 256);
        for (row, rows) in [(1, 1), (630, 4), (5000, 64), (3333, 7)] {
            let p = ggml_stage_per_row(row, rows) as usize;
            assert!(p.is_multiple_of(16) && p >= 256, "{row} {rows}: {p}");
            assert!(
                p * rows <= GGML_STAGE_BYTES || p == 256,
                "{row} {rows}: {p}"
            );
        }
    }

    #[test]
    fn activations_round_to_8_bit_blocks_as_the_host_does() {
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        let (x, mut xh) = bf16_matrix(3, 96, 7, 239, 1.0 / 8.0, &dev);
        let (q, d) = quantize_q8_host(&x).unwrap();
        let (wq, wd) = crate::util::gpu_test::q8_blocks(&xh);
        assert_eq!(q, wq);
        assert_eq!(
            d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            wd.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(q.contains(&127) && q.contains(&-127));
        // A block of zeros, and one holding a NaN (its scale NaN, so the products are too).
        xh[32..64].fill(0.0);
        xh[70] = f32::NAN;
        let x = Tensor::from_vec(
            xh.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(),
            (3, 96),
            &dev,
        )
        .unwrap();
        let (q, d) = quantize_q8_host(&x).unwrap();
        assert!(q[32..64].iter().all(|&v| v == 0) && d[1] == 0.0);
        assert!(d[2].is_nan() && q[64..96].iter().all(|&v| v == 0));
        assert!(d[3..].iter().all(|v| v.is_finite() && *v > 0.0));
        // Not a multiple of 32: refused, not misread.
        let (odd, _) = bf16_matrix(1, 40, 7, 239, 1.0 / 8.0, &dev);
        assert!(quantize_q8_host(&odd).is_err());
    }

    /// Each kernel's products against an f64 reference over candle's dequantised weights and the
    /// activations rounded to 8-bit blocks (the host's rounding, `gpu_test::q8_blocks`): every output within
    /// a bf16 rounding step, and nearly all of them its bits — which the same reference over
    /// the unrounded activations does not reach (so the test sees the rounding).
    #[test]
    fn ggml_kernels_compute_the_dequantised_experts() {
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        let r = |v: f64| bf16::from_f64(v).to_f64();
        let deq = crate::util::gpu_test::q8_values;
        for l in ggml_layouts() {
            let (h, i) = (l.hidden, l.intermediate);
            let (gu, dn, gud, dnd) = ggml_stacks(&l, 5, 6, &dev);
            let (x, xh) = bf16_matrix(1, h, 3, 239, 1.0 / 8.0, &dev);
            let order = [3usize, 0, 4, 1];
            let ids = Tensor::new(&[[3u32, 0, 4, 1]], &dev).unwrap();
            let wv = [0.5f32, 0.25, 0.125, 0.125];
            let w = Tensor::new(&[wv], &dev).unwrap();
            let fmt = StackFormat::Ggml(&l);
            let mid = moe_gate_up(&x, &gu, &ids, None, fmt).unwrap();
            let mid_h = crate::util::gpu_test::host(&mid);
            let exact: Vec<f64> = xh.iter().map(|&v| v as f64).collect();
            let mids = |xv: &[f64]| -> Vec<f64> {
                let mut out = Vec::new();
                for &ex in &order {
                    for row in 0..i {
                        let dot = |rr: usize| -> f64 {
                            (0..h).map(|c| gud[ex][rr * h + c] as f64 * xv[c]).sum()
                        };
                        let (gb, ub) = (r(dot(row)), r(dot(i + row)));
                        out.push(r(r(gb / (1.0 + (-gb).exp())) * ub));
                    }
                }
                out
            };
            let (want, unrounded) = (mids(&deq(&xh)), mids(&exact));
            let same = |a: &[f32], b: &[f64]| {
                a.iter().zip(b).filter(|(a, b)| **a as f64 == **b).count() as f64 / a.len() as f64
            };
            let mut worst = 0f64;
            for (&got, &want) in mid_h.iter().zip(&want) {
                worst = worst.max((got as f64 - want).abs() / want.abs().max(1.0 / 16.0));
            }
            assert!(worst <= 1.0 / 64.0, "gate_up {l}: rel. error {worst}");
            let (hit, miss) = (same(&mid_h, &want), same(&mid_h, &unrounded));
            assert!(
                hit >= 0.95 && hit > miss + 0.1,
                "gate_up {l}: {hit} of the outputs are the 8-bit reference's bits, {miss} the \
                 unrounded one's"
            );
            let y = crate::util::gpu_test::host(
                &moe_down(&mid, &dn, &ids, None, &w, None, fmt).unwrap(),
            );
            let ys = |rounded: bool| -> Vec<f64> {
                let mid_x: Vec<f64> = if rounded {
                    deq(&mid_h)
                } else {
                    mid_h.iter().map(|&v| v as f64).collect()
                };
                (0..h)
                    .map(|row| {
                        let mut acc = 0f64;
                        for (s, &ex) in order.iter().enumerate() {
                            let d: f64 = (0..i)
                                .map(|c| dnd[ex][row * i + c] as f64 * mid_x[s * i + c])
                                .sum();
                            acc += r(r(d) * r(wv[s] as f64));
                        }
                        r(acc)
                    })
                    .collect()
            };
            let (want, unrounded) = (ys(true), ys(false));
            let top = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(top > 0.0, "{l}: a zero reference tests nothing");
            for (row, (&a, &b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (a as f64 - b).abs() <= top / 64.0,
                    "down {l} row {row}: {a} vs {b} (largest {top})"
                );
            }
            let (hit, miss) = (same(&y, &want), same(&y, &unrounded));
            assert!(
                hit >= 0.9 && hit > miss + 0.1,
                "down {l}: {hit} of the outputs are the 8-bit reference's bits, {miss} the \
                 unrounded one's"
            );
        }
    }

    #[test]
    fn ggml_stacks_dequantise_to_candles_values_rounded() {
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        for l in ggml_layouts() {
            let (h, i) = (l.hidden, l.intermediate);
            let (gu, dn, gud, dnd) = ggml_stacks(&l, 3, 10, &dev);
            // Rows 2 and 0, then one past the stack (zeros).
            let rows = Tensor::new(&[2u32, 0, 3], &dev).unwrap();
            let st = GgmlStack {
                gate_up: &gu,
                down: &dn,
                layout: &l,
            };
            let (g, d) = st.dequantised(&rows).unwrap();
            assert_eq!((g.dims(), d.dims()), (&[3, 2 * i, h][..], &[3, h, i][..]));
            let (g, d) = (
                crate::util::gpu_test::host(&g),
                crate::util::gpu_test::host(&d),
            );
            let b = |v: f32| bf16::from_f32(v).to_f32().to_bits();
            for (j, ex) in [2usize, 0].into_iter().enumerate() {
                let got: Vec<u32> = g[j * 2 * i * h..(j + 1) * 2 * i * h]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let want: Vec<u32> = gud[ex].iter().map(|&v| b(v)).collect();
                assert!(
                    got == want,
                    "{l}: gate_up of expert {ex} not candle's values"
                );
                let got: Vec<u32> = d[j * h * i..(j + 1) * h * i]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let want: Vec<u32> = dnd[ex].iter().map(|&v| b(v)).collect();
                assert!(got == want, "{l}: down of expert {ex} not candle's values");
            }
            assert!(g[2 * 2 * i * h..].iter().all(|&v| v == 0.0));
            assert!(d[2 * h * i..].iter().all(|&v| v == 0.0));
        }
    }

    /// An MXFP4 block whose E8M0 scale byte is 0xFF (NaN in the format) decodes to NaN on the
    /// GPU, its 32 weights only — not to llama.cpp's 2^127 — so a corrupt block the GPU reads
    /// straight from the file shows as NaN, which the greedy pick refuses.
    #[test]
    fn mxfp4_nan_scale_decodes_to_nan() {
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        use super::super::lut4::Lut4;
        let mx = StDtype::Lut4(Lut4::Mxfp4);
        let l = GgmlLayout::new([mx, mx, mx], 96, 64).unwrap();
        let (mut gu, dn, _, _) = ggml_expert(&l, 7);
        // Row 1's second block of the gate (rows of 96 / 32 = 3 blocks of 17 bytes).
        gu[(3 + 1) * 17] = 0xFF;
        let (gn, dnn) = (gu.len(), dn.len());
        let gu = Tensor::from_vec(gu, (1, gn), &dev).unwrap();
        let dn = Tensor::from_vec(dn, (1, dnn), &dev).unwrap();
        let st = GgmlStack {
            gate_up: &gu,
            down: &dn,
            layout: &l,
        };
        let rows = Tensor::new(&[0u32], &dev).unwrap();
        let (g, _) = st.dequantised(&rows).unwrap();
        let g = crate::util::gpu_test::host(&g);
        let nan: Vec<usize> = (0..g.len()).filter(|&k| g[k].is_nan()).collect();
        assert_eq!(nan, (96 + 32..96 + 64).collect::<Vec<_>>());
    }

    #[test]
    fn ggml_slot_pool_through_its_map_gives_the_stacks_bits() {
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        for l in ggml_layouts() {
            let h = l.hidden;
            let (gu, dn, _, _) = ggml_stacks(&l, 6, 0, &dev);
            // A pool of 4 slots, rows 32 bytes longer than the layer's experts, holding experts
            // 0, 1, 3, 4 in slots 0..4 (built on the host).
            let pick = |t: &Tensor| {
                let (_, w) = t.dims2().unwrap();
                let rows: Vec<Vec<u8>> = t.to_vec2().unwrap();
                let mut pool = vec![0u8; 4 * (w + 32)];
                for (slot, ex) in [0usize, 1, 3, 4].into_iter().enumerate() {
                    pool[slot * (w + 32)..slot * (w + 32) + w].copy_from_slice(&rows[ex]);
                }
                Tensor::from_vec(pool, (4, w + 32), &dev).unwrap()
            };
            let mut map = vec![0u32; 6];
            for (slot, ex) in [0usize, 1, 3, 4].into_iter().enumerate() {
                map[ex] = slot as u32;
            }
            let map = Tensor::new(map.as_slice(), &dev).unwrap();
            let (x, _) = bf16_matrix(1, h, 5, 239, 1.0 / 8.0, &dev);
            let (res, _) = bf16_matrix(1, h, 6, 233, 1.0 / 8.0, &dev);
            let ids = Tensor::new(&[[3u32, 0, 4, 1]], &dev).unwrap();
            let w = Tensor::new(&[[0.5f32, 0.25, 0.125, 0.125]], &dev).unwrap();
            let fmt = StackFormat::Ggml(&l);
            let native = moe_decode(&x, &gu, &dn, &ids, None, &w, Some(&res), fmt).unwrap();
            let slots = moe_decode(
                &x,
                &pick(&gu),
                &pick(&dn),
                &ids,
                Some(&map),
                &w,
                Some(&res),
                fmt,
            )
            .unwrap();
            assert_eq!(bf16_bits(&native), bf16_bits(&slots), "{l}");
            // An unaligned x (a view one element in) is copied, not misread.
            let (x2, _) = bf16_matrix(1, h + 1, 5, 239, 1.0 / 8.0, &dev);
            let x2 = x2.narrow(1, 1, h).unwrap();
            let a = moe_decode(&x2, &gu, &dn, &ids, None, &w, None, fmt).unwrap();
            let b = moe_decode(
                &x2.force_contiguous().unwrap(),
                &gu,
                &dn,
                &ids,
                None,
                &w,
                None,
                fmt,
            )
            .unwrap();
            assert_eq!(bf16_bits(&a), bf16_bits(&b), "{l}: unaligned x");
        }
    }

    /// A block-quantized table looked up on the device: each row candle's CPU dequantisation of
    /// that row rounded to bf16 (the dense table's values), for every type the kernels decode;
    /// an id past the table gives zeros.
    #[test]
    fn ggml_table_rows_are_the_dense_tables_rows() {
        use candle_core::quantized::{GgmlDType as G, QTensor};
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        for (t, cols) in [
            (G::Q4K, 512),
            (G::Q5K, 256),
            (G::Q6K, 256),
            (G::Q8_0, 96),
            (G::Q4_0, 64),
            (G::Q4_1, 64),
            (G::Q5_0, 96),
            (G::Q5_1, 32),
        ] {
            let rows = 37;
            let w = crate::util::test_matrix(rows, cols, 11, 251, 1.0 / 32.0);
            let q = QTensor::quantize(&w, t).unwrap();
            let dense: Vec<Vec<f32>> = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2()
                .unwrap();
            let bytes = q.data().unwrap().to_vec();
            let table =
                Tensor::from_vec(bytes, (rows, cols / t.block_size() * t.type_size()), &dev)
                    .unwrap();
            let ids = Tensor::new(&[5u32, 36, 0, 5, 37], &dev).unwrap();
            let got: Vec<Vec<f32>> = ggml_rows_bf16(&table, t, cols, &ids)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (j, id) in [5usize, 36, 0, 5].into_iter().enumerate() {
                let a: Vec<u32> = got[j].iter().map(|v| v.to_bits()).collect();
                let b: Vec<u32> = dense[id].iter().map(|v| v.to_bits()).collect();
                assert!(a == b, "{t:?} row {id}");
            }
            assert!(got[4].iter().all(|&v| v == 0.0), "{t:?}: past the table");
            // A table whose rows are not the type's size is refused by name.
            let e = ggml_rows_bf16(&table, G::Q8_0, cols + 32, &ids).unwrap_err();
            assert!(e.to_string().contains("GGUF table"), "{e}");
        }
    }

    #[test]
    fn residual_folded_into_down_is_the_separate_bf16_add() {
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        let (e, h, i, k) = (16, 256, 96, 4);
        let (gate_up, _) = bf16_matrix(e * 2 * i, h, 1, 251, 1.0 / 256.0, &dev);
        let gate_up = gate_up.reshape((e, 2 * i, h)).unwrap();
        let (down, _) = bf16_matrix(e * h, i, 2, 241, 1.0 / 256.0, &dev);
        let down = down.reshape((e, h, i)).unwrap();
        let (x, _) = bf16_matrix(1, h, 3, 239, 1.0 / 32.0, &dev);
        let (res, _) = bf16_matrix(1, h, 4, 233, 1.0 / 8.0, &dev);
        let ids = Tensor::new(&[[3u32, 7, 0, 15]], &dev).unwrap();
        let w = Tensor::new(&[[0.5f32, 0.25, 0.125, 0.125]], &dev).unwrap();
        let y = moe_decode(
            &x,
            &gate_up,
            &down,
            &ids,
            None,
            &w,
            None,
            StackFormat::Dense,
        )
        .unwrap();
        let folded = moe_decode(
            &x,
            &gate_up,
            &down,
            &ids,
            None,
            &w,
            Some(&res),
            StackFormat::Dense,
        )
        .unwrap();
        assert_eq!(bf16_bits(&folded), bf16_bits(&(&res + &y).unwrap()));
        assert_eq!(k, ids.elem_count());
    }

    /// A prompt's tokens in one launch of the FP8 and GGUF kernels (the y dimension of their
    /// grids): each token's output the bits of a launch of that token alone, for FP8 and every
    /// GGUF layout, with its residual, through a slot pool's map as well as on the stacks' rows
    /// — tokens routed to the same experts and to different ones. bf16 stacks take one token.
    #[test]
    fn tokens_in_one_launch_are_each_tokens_own_launch() {
        let Some(dev) = device("MoE kernel") else {
            return;
        };
        let t = 5;
        let ids_v: Vec<[u32; 4]> = vec![
            [3, 0, 4, 1],
            [1, 4, 0, 3],
            [3, 0, 4, 1],
            [4, 3, 1, 0],
            [0, 1, 3, 4],
        ];
        let w_v: Vec<[f32; 4]> = (0..t)
            .map(|j| {
                let a = 0.5 - 0.0625 * j as f32;
                [a, 0.25, 0.125, 0.875 - a - 0.25]
            })
            .collect();
        let ids = Tensor::from_vec(ids_v.concat(), (t, 4), &dev).unwrap();
        let w = Tensor::from_vec(w_v.concat(), (t, 4), &dev).unwrap();
        // Experts 0, 1, 3, 4 of 6 in slots 3, 2, 1, 0.
        let mut map_v = vec![0u32; 6];
        for (slot, ex) in [4usize, 3, 1, 0].into_iter().enumerate() {
            map_v[ex] = slot as u32;
        }
        let map = Tensor::new(map_v.as_slice(), &dev).unwrap();
        let slots = |s: &Tensor| {
            let idx: Vec<u32> = [4u32, 3, 1, 0].to_vec();
            s.index_select(&Tensor::new(idx.as_slice(), &dev).unwrap(), 0)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let check = |what: &str, gu: &Tensor, dn: &Tensor, fmt: StackFormat, h: usize| {
            let (x, _) = bf16_matrix(t, h, 5, 239, 1.0 / 8.0, &dev);
            let (res, _) = bf16_matrix(t, h, 6, 233, 1.0 / 8.0, &dev);
            let all = moe_decode(&x, gu, dn, &ids, None, &w, Some(&res), fmt).unwrap();
            assert_eq!(all.dims(), [t, h], "{what}");
            let (sgu, sdn) = (slots(gu), slots(dn));
            let mapped = moe_decode(&x, &sgu, &sdn, &ids, Some(&map), &w, Some(&res), fmt).unwrap();
            assert_eq!(
                bf16_bits(&all),
                bf16_bits(&mapped),
                "{what}: through the map"
            );
            let bare = moe_decode(&x, gu, dn, &ids, None, &w, None, fmt).unwrap();
            for j in 0..t {
                let one = |v: &Tensor| v.narrow(0, j, 1).unwrap().contiguous().unwrap();
                let alone = moe_decode(
                    &one(&x),
                    gu,
                    dn,
                    &one(&ids),
                    None,
                    &one(&w),
                    Some(&one(&res)),
                    fmt,
                )
                .unwrap();
                assert_eq!(
                    bf16_bits(&one(&all)),
                    bf16_bits(&alone),
                    "{what}: token {j}"
                );
                let alone =
                    moe_decode(&one(&x), gu, dn, &one(&ids), None, &one(&w), None, fmt).unwrap();
                assert_eq!(
                    bf16_bits(&one(&bare)),
                    bf16_bits(&alone),
                    "{what}: token {j}, no residual"
                );
            }
        };
        for l in ggml_layouts() {
            let (gu, dn, _, _) = ggml_stacks(&l, 6, 0, &dev);
            check(&format!("{l}"), &gu, &dn, StackFormat::Ggml(&l), l.hidden);
        }
        let (h, i) = (200, 72);
        let (gu, dn, sc, _, _) = fp8_stacks(6, h, i, [32, 48], &dev);
        let slot_sc = Fp8Scales {
            gate_up: slots(&sc.gate_up),
            down: slots(&sc.down),
            block: sc.block,
        };
        // FP8's slot pool carries its scales in its own slots' order.
        let (x, _) = bf16_matrix(t, h, 5, 239, 1.0 / 8.0, &dev);
        let all = moe_decode(&x, &gu, &dn, &ids, None, &w, None, StackFormat::Fp8(&sc)).unwrap();
        let mapped = moe_decode(
            &x,
            &slots(&gu),
            &slots(&dn),
            &ids,
            Some(&map),
            &w,
            None,
            StackFormat::Fp8(&slot_sc),
        )
        .unwrap();
        assert_eq!(bf16_bits(&all), bf16_bits(&mapped), "FP8 through the map");
        for j in 0..t {
            let one = |v: &Tensor| v.narrow(0, j, 1).unwrap().contiguous().unwrap();
            let alone = moe_decode(
                &one(&x),
                &gu,
                &dn,
                &one(&ids),
                None,
                &one(&w),
                None,
                StackFormat::Fp8(&sc),
            )
            .unwrap();
            assert_eq!(bf16_bits(&one(&all)), bf16_bits(&alone), "FP8 token {j}");
        }
        let (gu, _) = bf16_matrix(6 * 2 * i, h, 7, 241, 1.0 / 16.0, &dev);
        let (dn, _) = bf16_matrix(6 * h, i, 8, 247, 1.0 / 16.0, &dev);
        let (gu, dn) = (
            gu.reshape((6, 2 * i, h)).unwrap(),
            dn.reshape((6, h, i)).unwrap(),
        );
        let e = moe_decode(&x, &gu, &dn, &ids, None, &w, None, StackFormat::Dense).unwrap_err();
        assert!(e.to_string().contains("shapes"), "{e}");
    }
}
