//! Weights stored as 4-bit codes looked up in a 16-value table, one scale per 32 weights — the
//! GGUF block types candle's quantized module does not read and moescope decodes itself:
//!
//! - **MXFP4** (GGML type 39, `block_mxfp4`, the OCP Microscaling format's FP4): blocks of 32, an
//!   E8M0 scale byte `e` (2^(e−127)) then 16 bytes of E2M1 codes. `llama-quantize … MXFP4_MOE`
//!   writes a MoE's expert stacks so (the rest in Q8_0).
//! - **IQ4_NL** (type 20, `block_iq4_nl`): blocks of 32, an f16 scale `d` then 16 code bytes,
//!   each code an index into llama.cpp's non-linear `kvalues_iq4nl`.
//! - **IQ4_XS** (type 23, `block_iq4_xs`): super-blocks of 256 — f16 `d`, `scales_h` (u16),
//!   `scales_l[4]`, 128 code bytes — whose eight 32-weight sub-blocks each scale by `d · (ls −
//!   32)`, `ls` six bits from `scales_l` and `scales_h`; the same table. The `IQ4_XS` files shared
//!   for Qwen3-30B-A3B hold experts and attention so (llama-quantize needs no importance matrix
//!   for it).
//!
//! In every block the weight j of a 32-weight (sub-)block is the low nibble of code byte j and
//! weight j + 16 the high nibble. Decoding follows llama.cpp's `dequantize_row_*` exactly: the
//! table value times the (sub-)block's scale, computed in f32 as there. Every such weight is
//! exact in f32 (MXFP4: a small integer times a power of two; IQ4: an f16 times a 6-bit integer
//! times a 7-bit one, at most 24 significant bits), so the product here — [`Lut4Matrix::forward`],
//! the weights decoded inside the dot, activations kept in f32 (not rounded to 8-bit blocks, as
//! llama.cpp's CPU product does) — gives the bits of [`dot_with`](super::cpu_gemv::dot_with)
//! over the dequantised row, whichever CPU form runs (unit tests). A scale that is NaN or
//! infinite (E8M0's 0xFF; an f16 `d` llama.cpp's row validation would refuse too) is refused
//! when the matrix is built, naming the row and block.
//!
//! This module is the CPU's side. On a GPU in bf16 compute the same blocks stay on the device
//! and moescope's block kernels decode them (`kernels/ggml_blocks.cuh`, the `_lut4` twins of
//! the GGUF expert and attention kernels), with [`check_scales`] run on each load.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

#[cfg(test)]
use super::cpu_gemv::dot_with;

/// Weights per 32-weight (sub-)block: each scale's share, the unit of the kernels' loops.
pub const BLOCK: usize = 32;
/// Bytes of an MXFP4 block: the scale, then 16 bytes of two codes each.
pub const BLOCK_BYTES: usize = 1 + BLOCK / 2;

/// llama.cpp's `kvalues_mxfp4`: each E2M1 code as twice its value (so that they are integers).
const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// llama.cpp's `kvalues_iq4nl`.
const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Which of the table-coded block types a matrix is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Lut4 {
    Mxfp4,
    Iq4Nl,
    Iq4Xs,
}

impl Lut4 {
    /// The type for GGML type id `id`, if it is one of these.
    pub fn from_ggml(id: u32) -> Option<Self> {
        match id {
            39 => Some(Lut4::Mxfp4),
            20 => Some(Lut4::Iq4Nl),
            23 => Some(Lut4::Iq4Xs),
            _ => None,
        }
    }

    pub fn ggml_type(self) -> u32 {
        match self {
            Lut4::Mxfp4 => 39,
            Lut4::Iq4Nl => 20,
            Lut4::Iq4Xs => 23,
        }
    }

    /// llama.cpp's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Lut4::Mxfp4 => "MXFP4",
            Lut4::Iq4Nl => "IQ4_NL",
            Lut4::Iq4Xs => "IQ4_XS",
        }
    }

    /// Weights per block as stored (a row is whole blocks).
    pub fn block_weights(self) -> usize {
        match self {
            Lut4::Mxfp4 | Lut4::Iq4Nl => BLOCK,
            Lut4::Iq4Xs => 256,
        }
    }

    /// Bytes per block as stored.
    pub fn block_bytes(self) -> usize {
        match self {
            Lut4::Mxfp4 => <Mx as Layout>::BYTES,
            Lut4::Iq4Nl => <Nl as Layout>::BYTES,
            Lut4::Iq4Xs => <Xs as Layout>::BYTES,
        }
    }

    /// Why block `b` (its bytes) cannot be decoded, if it cannot: a scale that is not finite.
    fn bad_scale(self, b: &[u8]) -> Option<String> {
        let f16_of = |at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]);
        match self {
            Lut4::Mxfp4 => {
                (b[0] == 0xFF).then(|| "has scale byte 0xFF, which E8M0 defines as NaN".into())
            }
            Lut4::Iq4Nl | Lut4::Iq4Xs => {
                let d = f16_of(0);
                (!d.is_finite())
                    .then(|| format!("has scale d = {d} (f16 bits {:#06x})", d.to_bits()))
            }
        }
    }
}

impl std::fmt::Display for Lut4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A block type's shape for the kernels, resolved at compile time so that each type's loops are
/// their own (no branch per block).
trait Layout {
    /// Weights and bytes per stored block.
    const WEIGHTS: usize;
    const BYTES: usize;
    const TABLE: [i8; 16];
    /// Scale of 32-weight sub-block `s` of the block `b`, as llama.cpp computes it.
    fn scale(b: &[u8], s: usize) -> f32;
    /// Offset in the block of sub-block `s`'s 16 code bytes.
    fn codes(s: usize) -> usize;
}

struct Mx;
struct Nl;
struct Xs;

impl Layout for Mx {
    const WEIGHTS: usize = BLOCK;
    const BYTES: usize = BLOCK_BYTES;
    const TABLE: [i8; 16] = KVALUES;
    #[inline(always)]
    fn scale(b: &[u8], _: usize) -> f32 {
        half_scale(b[0])
    }
    #[inline(always)]
    fn codes(_: usize) -> usize {
        1
    }
}

impl Layout for Nl {
    const WEIGHTS: usize = BLOCK;
    const BYTES: usize = 2 + BLOCK / 2;
    const TABLE: [i8; 16] = KVALUES_IQ4NL;
    #[inline(always)]
    fn scale(b: &[u8], _: usize) -> f32 {
        half::f16::from_le_bytes([b[0], b[1]]).to_f32()
    }
    #[inline(always)]
    fn codes(_: usize) -> usize {
        2
    }
}

impl Layout for Xs {
    const WEIGHTS: usize = 256;
    const BYTES: usize = 2 + 2 + 4 + 128;
    const TABLE: [i8; 16] = KVALUES_IQ4NL;
    #[inline(always)]
    fn scale(b: &[u8], s: usize) -> f32 {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let high = u16::from_le_bytes([b[2], b[3]]);
        let ls = ((b[4 + s / 2] >> (4 * (s % 2))) & 0x0F) as i32
            | ((((high >> (2 * s)) & 3) as i32) << 4);
        d * (ls - 32) as f32
    }
    #[inline(always)]
    fn codes(s: usize) -> usize {
        8 + 16 * s
    }
}

/// Half an E8M0 scale, 2^(e−128), as llama.cpp's `ggml_e8m0_to_fp32_half` builds it (subnormal
/// for e < 2). Not for e = 0xFF, which the matrix refuses.
#[inline(always)]
pub fn half_scale(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000 << e)
    } else {
        f32::from_bits((e as u32 - 1) << 23)
    }
}

/// `x` (whole blocks of [`BLOCK`]) encoded as llama.cpp's `quantize_row_mxfp4_ref` encodes it,
/// appended to `out`: each block's scale the power of two that puts its largest magnitude in
/// E2M1's top binade (`floor(log2(amax)) - 2`, biased by 127; 0 for a block of zeros), each
/// weight the nearest of the sixteen codes at that scale, the first on ties. A block whose
/// largest magnitude is below the smallest scale gets scale 0, where llama.cpp's cast of a
/// negative value is undefined; none reaches 0xFF (NaN) from finite input.
pub fn quantize_row(x: &[f32], out: &mut Vec<u8>) {
    debug_assert!(x.len().is_multiple_of(BLOCK));
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let e = if amax > 0.0 {
            (amax.log2().floor() - 2.0 + 127.0).clamp(0.0, 254.0) as u8
        } else {
            0
        };
        let d = half_scale(e);
        let nearest = |v: f32| -> u8 {
            let mut best = 0;
            let mut best_err = (KVALUES[0] as f32 * d - v).abs();
            for (i, &k) in KVALUES.iter().enumerate().skip(1) {
                let err = (k as f32 * d - v).abs();
                if err < best_err {
                    best = i;
                    best_err = err;
                }
            }
            best as u8
        };
        out.push(e);
        for j in 0..BLOCK / 2 {
            out.push(nearest(block[j]) | (nearest(block[j + BLOCK / 2]) << 4));
        }
    }
}

/// One row's blocks widened to f32 (`out` the row's weights). Exact.
fn decode_row_as<L: Layout>(blocks: &[u8], out: &mut [f32]) {
    for (b, o) in blocks
        .chunks_exact(L::BYTES)
        .zip(out.chunks_exact_mut(L::WEIGHTS))
    {
        for (s, o) in o.chunks_exact_mut(BLOCK).enumerate() {
            let d = L::scale(b, s);
            let q = &b[L::codes(s)..L::codes(s) + BLOCK / 2];
            let (lo, hi) = o.split_at_mut(BLOCK / 2);
            for ((q, l), h) in q.iter().zip(lo).zip(hi) {
                *l = L::TABLE[(q & 0x0F) as usize] as f32 * d;
                *h = L::TABLE[(q >> 4) as usize] as f32 * d;
            }
        }
    }
}

/// An MXFP4 row's blocks widened to f32. Exact.
pub fn decode_row(blocks: &[u8], out: &mut [f32]) {
    decode_row_as::<Mx>(blocks, out)
}

/// A row of `format` widened to f32 (the same values as llama.cpp's `dequantize_row_*`), with
/// the CPU's vector forms where it has them (the same values: each is exact).
pub fn decode_row_fast(format: Lut4, blocks: &[u8], out: &mut [f32]) {
    match format {
        Lut4::Mxfp4 => decode_fast_as::<Mx>(blocks, out),
        Lut4::Iq4Nl => decode_fast_as::<Nl>(blocks, out),
        Lut4::Iq4Xs => decode_fast_as::<Xs>(blocks, out),
    }
}

fn decode_fast_as<L: Layout>(blocks: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_gemv::avx2_fma() {
        // SAFETY: AVX2 was detected on this CPU.
        return unsafe { decode_row_avx2::<L>(blocks, out) };
    }
    decode_row_as::<L>(blocks, out)
}

/// [`decode_row_as`] in AVX2: per 32 weights the codes looked up by one byte shuffle each half,
/// widened to f32 and scaled.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_row_avx2<L: Layout>(blocks: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): AVX2 as required; each load is one sub-block's 16 code bytes and
    // each store 8 of its 32 outputs, inside the chunks the loop hands out.
    unsafe {
        for (b, o) in blocks
            .chunks_exact(L::BYTES)
            .zip(out.chunks_exact_mut(L::WEIGHTS))
        {
            for (s, o) in o.chunks_exact_mut(BLOCK).enumerate() {
                let d = _mm256_set1_ps(L::scale(b, s));
                let (lo, hi) = codes::<L>(b.as_ptr().add(L::codes(s)));
                let widen =
                    |v: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d);
                let p = o.as_mut_ptr();
                _mm256_storeu_ps(p, widen(lo));
                _mm256_storeu_ps(p.add(8), widen(_mm_srli_si128(lo, 8)));
                _mm256_storeu_ps(p.add(16), widen(hi));
                _mm256_storeu_ps(p.add(24), widen(_mm_srli_si128(hi, 8)));
            }
        }
    }
}

/// A matrix [rows, cols] in one of the [`Lut4`] types (cols whole blocks), held as stored and
/// multiplied on the CPU without being widened as a whole.
/// Every block's scale of a matrix of `format` with rows of `cols` weights (whole blocks, which
/// the caller has checked) finite: else the first that is not, named by row and block. What a
/// [`Lut4Matrix`] checks when built, and the GPU's loads of blocks it decodes itself.
pub fn check_scales(format: Lut4, bytes: &[u8], cols: usize) -> std::result::Result<(), String> {
    let per_row = (cols / format.block_weights()).max(1);
    for (at, b) in bytes.chunks_exact(format.block_bytes()).enumerate() {
        if let Some(why) = format.bad_scale(b) {
            return Err(format!("row {} block {} {why}", at / per_row, at % per_row));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Lut4Matrix {
    format: Lut4,
    bytes: Arc<Vec<u8>>,
    rows: usize,
    cols: usize,
}

impl Lut4Matrix {
    /// From a matrix's bytes as stored. The caller names the tensor in errors; here the sizes
    /// and every block's scale are checked (a scale that is not finite is named by row and
    /// block).
    pub fn new(
        format: Lut4,
        bytes: Vec<u8>,
        [rows, cols]: [usize; 2],
    ) -> std::result::Result<Self, String> {
        let (per, block_bytes) = (format.block_weights(), format.block_bytes());
        if !cols.is_multiple_of(per) {
            return Err(format!(
                "{format} rows of {cols} weights are not whole blocks of {per}"
            ));
        }
        let row_bytes = cols / per * block_bytes;
        if Some(bytes.len()) != rows.checked_mul(row_bytes) {
            return Err(format!(
                "{} bytes of {format} for a [{rows}, {cols}] matrix ({} expected)",
                bytes.len(),
                rows.saturating_mul(row_bytes)
            ));
        }
        check_scales(format, &bytes, cols)?;
        Ok(Lut4Matrix {
            format,
            bytes: Arc::new(bytes),
            rows,
            cols,
        })
    }

    pub fn format(&self) -> Lut4 {
        self.format
    }

    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Bytes held: as stored (17 per 32 weights in MXFP4, 18 in IQ4_NL, 136 per 256 in IQ4_XS).
    pub fn bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn row(&self, r: usize) -> &[u8] {
        let n = self.cols / self.format.block_weights() * self.format.block_bytes();
        &self.bytes[r * n..(r + 1) * n]
    }

    /// The dense matrix in f32 (exact), as `dtype`.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            decode_row_fast(self.format, self.row(r), o);
        }
        Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?.to_dtype(dtype)
    }

    /// x·Wᵀ for x [n, cols] on the CPU, in f32 (x of any float dtype; the result in x's): up
    /// to `cpu_gemv::MAX_TOKENS` tokens by the row kernels (each dot `dot_with`'s bits over the
    /// dequantised row), more by candle's GEMM over blocks of decoded rows.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, cols) = x.dims2()?;
        let format = self.format;
        if cols != self.cols {
            candle_core::bail!(
                "{format} product: input has {cols} columns, the matrix {:?}",
                self.dims()
            )
        }
        if !x.device().is_cpu() {
            candle_core::bail!(
                "{format} matrices are multiplied on the CPU only (input on {:?})",
                x.device()
            )
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if !super::cpu_gemv::row_kernels_take(DType::F32, n) {
            // A prompt past the row kernels: blocks of rows decoded (exact) and multiplied by
            // candle's GEMM, as f32 prompts over dense experts are (in the GEMM's order, so
            // not `dot_with`'s bits — the same for native and selective all the same).
            let widen = |r: std::ops::Range<usize>, dst: &mut [f32]| {
                for (row, o) in r.zip(dst.chunks_exact_mut(cols)) {
                    decode_row_fast(format, self.row(row), o);
                }
            };
            let y = super::cpu_gemv::widened_blocks_product(&xs, n, cols, self.rows, &widen);
            return Tensor::from_vec(y, (n, self.rows), x.device())?.to_dtype(x.dtype());
        }
        let kernel = row_kernel(format);
        let out = super::cpu_gemv::rows_product(self.rows, cols, n, |r, out| {
            kernel(self.row(r), &xs, out)
        });
        Tensor::from_vec(out, (n, self.rows), x.device())?.to_dtype(x.dtype())
    }
}

/// Several matrices of one width (each in its own [`Lut4`] type), each multiplied by one token
/// of its own (`x(e)` for matrix e), all their rows in one trip through the worker pool; the
/// outputs concatenated in matrix order. Each row's dot is the one [`Lut4Matrix::forward`]
/// computes for it. Why: at batch 1 a small expert's product is mostly its dispatch (as for
/// dense experts, `cpu_gemv::experts_one_token`).
pub fn stacked_product<'a>(
    mats: &[&Lut4Matrix],
    x: impl Fn(usize) -> &'a [f32] + Sync,
) -> candle_core::Result<Vec<f32>> {
    let Some(cols) = mats.first().map(|m| m.cols) else {
        return Ok(Vec::new());
    };
    let mut starts = Vec::with_capacity(mats.len() + 1);
    starts.push(0);
    for (e, m) in mats.iter().enumerate() {
        if m.cols != cols || x(e).len() != cols {
            candle_core::bail!(
                "{} stacked product: matrix {e} is {:?} with {} inputs, the first {cols} wide",
                m.format,
                m.dims(),
                x(e).len()
            )
        }
        starts.push(starts[e] + m.rows);
    }
    let kernels: Vec<RowKernel> = mats.iter().map(|m| row_kernel(m.format)).collect();
    let pairs: Vec<Option<PairKernel>> = mats.iter().map(|m| pair_kernel(m.format)).collect();
    let total = starts[mats.len()];
    let mut y = vec![0f32; total];
    let out = &super::cpu_gemv::RowsOut(y.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        let mut r = range.start;
        while r < range.end {
            let e = starts.partition_point(|&s| s <= r) - 1;
            let i = r - starts[e];
            // The next row in the same matrix and range: both rows at once.
            if let Some(pair) = pairs[e]
                && r + 1 < range.end
                && r + 1 < starts[e + 1]
            {
                let (y0, y1) = pair(mats[e].row(i), mats[e].row(i + 1), x(e));
                // SAFETY: rows r and r + 1 own outputs r and r + 1, handed to them alone.
                let o = unsafe { out.at(r, 2) };
                (o[0], o[1]) = (y0, y1);
                r += 2;
                continue;
            }
            // SAFETY: row r owns output r, handed to it alone.
            kernels[e](mats[e].row(i), x(e), unsafe { out.at(r, 1) });
            r += 1;
        }
    };
    // As `cpu_gemv::rows_product` decides for one token.
    if total * cols < 1 << 15 {
        run(0..total);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(total, run);
    }
    Ok(y)
}

/// Several matrices of one width, matrix e multiplied by its own `ns[e]` tokens (`x(e)`,
/// `ns[e]` × the width, each at most `cpu_gemv::MAX_TOKENS`), all their rows in one trip
/// through the worker pool; each matrix's output [ns[e], rows], each dot the one
/// [`Lut4Matrix::forward`] computes for it. Why: a short prompt gives each expert a token or
/// two, so its products are mostly their dispatch (as for dense experts,
/// `cpu_gemv::experts_few_tokens`).
pub fn ragged_product<'a>(
    mats: &[&Lut4Matrix],
    ns: &[usize],
    x: impl Fn(usize) -> &'a [f32] + Sync,
) -> candle_core::Result<Vec<Vec<f32>>> {
    let Some(cols) = mats.first().map(|m| m.cols) else {
        return Ok(Vec::new());
    };
    let mut starts = Vec::with_capacity(mats.len() + 1);
    let mut outs = Vec::with_capacity(mats.len() + 1);
    starts.push(0);
    outs.push(0);
    for (e, m) in mats.iter().enumerate() {
        let n = ns.get(e).copied().unwrap_or(0);
        if m.cols != cols
            || x(e).len() != n * cols
            || !super::cpu_gemv::row_kernels_take(DType::F32, n)
        {
            candle_core::bail!(
                "{} ragged product: matrix {e} is {:?} with {} inputs for {n} tokens, the \
                 first {cols} wide",
                m.format,
                m.dims(),
                x(e).len()
            )
        }
        starts.push(starts[e] + m.rows);
        outs.push(outs[e] + m.rows * n);
    }
    let kernels: Vec<RowKernel> = mats.iter().map(|m| row_kernel(m.format)).collect();
    let pairs: Vec<Option<PairKernel>> = mats.iter().map(|m| pair_kernel(m.format)).collect();
    // Transposed per matrix ([rows, n]): each row's outputs one contiguous chunk.
    let mut yt = vec![0f32; outs[mats.len()]];
    let out = &super::cpu_gemv::RowsOut(yt.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        let mut r = range.start;
        while r < range.end {
            let e = starts.partition_point(|&s| s <= r) - 1;
            let n = ns[e];
            // One token, and the next row in the same matrix and range: both rows at once.
            if let (1, Some(pair)) = (n, pairs[e])
                && r + 1 < range.end
                && r + 1 < starts[e + 1]
            {
                let i = r - starts[e];
                let (y0, y1) = pair(mats[e].row(i), mats[e].row(i + 1), x(e));
                // SAFETY: rows r and r + 1 of matrix e own one output each, outs[e] + i and the
                // next, inside yt and handed to these rows alone.
                unsafe {
                    out.at(outs[e] + i, 1)[0] = y0;
                    out.at(outs[e] + i + 1, 1)[0] = y1;
                }
                r += 2;
                continue;
            }
            // SAFETY: row r of matrix e owns outputs outs[e] + (r − starts[e])·n … + n, inside
            // yt (the sums above) and handed to this row alone.
            let o = unsafe { out.at(outs[e] + (r - starts[e]) * n, n) };
            kernels[e](mats[e].row(r - starts[e]), x(e), o);
            r += 1;
        }
    };
    let total = starts[mats.len()];
    if total * cols < 1 << 15 {
        run(0..total);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(total, run);
    }
    Ok(mats
        .iter()
        .enumerate()
        .map(|(e, m)| {
            let (n, t) = (ns[e], &yt[outs[e]..outs[e + 1]]);
            let mut y = vec![0f32; n * m.rows];
            for r in 0..m.rows {
                for k in 0..n {
                    y[k * m.rows + r] = t[r * n + k];
                }
            }
            y
        })
        .collect())
}

/// One row (its blocks) for every token: `xs` n × cols activations, `out` n results.
type RowKernel = fn(&[u8], &[f32], &mut [f32]);

/// Two rows' dots with one token's values, each with the bits of its own [`RowKernel`].
type PairKernel = fn(&[u8], &[u8], &[f32]) -> (f32, f32);

/// Where the CPU has AVX-512: [`dot2_avx512`]; where it has AVX2 and FMA only: [`dot2_avx2`].
/// Why: one row's dot is a few chains of dependent multiply-adds (BENCHMARKS.md §96); two rows
/// make twice as many, and share the activations' loads.
fn pair_kernel(format: Lut4) -> Option<PairKernel> {
    #[cfg(target_arch = "x86_64")]
    {
        use super::cpu_gemv::{avx2_fma, avx512};
        if avx2_fma() && avx512() {
            // SAFETY (each): AVX-512F/BW, AVX2 and FMA were detected on this CPU; x is the
            // token's values, each row that many weights' blocks.
            return Some(match format {
                Lut4::Mxfp4 => |a, b, x| unsafe { dot2_avx512::<Mx>(a, b, x) },
                Lut4::Iq4Nl => |a, b, x| unsafe { dot2_avx512::<Nl>(a, b, x) },
                Lut4::Iq4Xs => |a, b, x| unsafe { dot2_avx512::<Xs>(a, b, x) },
            });
        }
        if avx2_fma() {
            // SAFETY (each): AVX2 and FMA were detected on this CPU; as above.
            return Some(match format {
                Lut4::Mxfp4 => |a, b, x| unsafe { dot2_avx2::<Mx>(a, b, x) },
                Lut4::Iq4Nl => |a, b, x| unsafe { dot2_avx2::<Nl>(a, b, x) },
                Lut4::Iq4Xs => |a, b, x| unsafe { dot2_avx2::<Xs>(a, b, x) },
            });
        }
    }
    let _ = format;
    None
}

fn row_kernel(format: Lut4) -> RowKernel {
    match format {
        Lut4::Mxfp4 => row_kernel_as::<Mx>(),
        Lut4::Iq4Nl => row_kernel_as::<Nl>(),
        Lut4::Iq4Xs => row_kernel_as::<Xs>(),
    }
}

fn row_kernel_as<L: Layout>() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        use super::cpu_gemv::{avx2_fma, avx512};
        if avx2_fma() && avx512() {
            return |w, xs, out| match out {
                // SAFETY: AVX-512F/BW, AVX2 and FMA were detected on this CPU; x is the one
                // token's values, `w` that many weights' blocks.
                [y] => *y = unsafe { dot_avx512::<L>(w, xs) },
                _ => row_decoded::<L>(w, xs, out),
            };
        }
        if avx2_fma() {
            return |w, xs, out| match out {
                // SAFETY: AVX2 and FMA were detected on this CPU; as above.
                [y] => *y = unsafe { dot_avx2::<L>(w, xs) },
                _ => row_decoded::<L>(w, xs, out),
            };
        }
    }
    row_decoded::<L>
}

/// The row decoded once into the thread's buffer, then the f32 row kernel (`dot_with`'s order
/// and bits, `cpu_gemv`) for every token. Why: for a prompt, decoding inside each token's dot
/// decoded the row once per token.
fn row_decoded<L: Layout>(w: &[u8], xs: &[f32], out: &mut [f32]) {
    thread_local! {
        static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let cols = w.len() / L::BYTES * L::WEIGHTS;
    ROW.with_borrow_mut(|row| {
        row.resize(cols, 0.0);
        decode_fast_as::<L>(w, row);
        #[cfg(target_arch = "x86_64")]
        if super::cpu_gemv::avx512() {
            // SAFETY: AVX-512F was detected on this CPU; the row is whole 32-blocks and `xs`
            // holds out.len() tokens of its width.
            return unsafe { tokens_avx512(row, xs, out) };
        }
        super::cpu_gemv::f32_row_kernel()(row, xs, out)
    })
}

/// A decoded row's dot with every token, four tokens a pass over the row (each weight loaded
/// once for them), each token in two 16-lane accumulators that are `dot_with`'s four 8-lane
/// ones (lanes 0–7 and 8–15 of the first: vectors 0 and 1; of the second: 2 and 3), finished as
/// there — each token's multiply-adds in its own order, so `dot_with`'s bits. Why: a prompt's
/// product is otherwise one latency-bound chain of FMAs per vector and token.
///
/// # Safety
/// The CPU has AVX-512F; `row.len()` is a multiple of 32 and `xs` holds `out.len()` rows of it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tokens_avx512(row: &[f32], xs: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let cols = row.len();
    assert!(
        cols.is_multiple_of(BLOCK) && xs.len() >= out.len() * cols,
        "MXFP4 tokens"
    );
    /// T tokens from `t0` on.
    #[inline(always)]
    unsafe fn pass<const T: usize>(row: &[f32], xs: &[f32], t0: usize, out: &mut [f32]) {
        let cols = row.len();
        // SAFETY (whole body): AVX-512F as the caller guarantees; loads at i + 16 < cols of
        // the row and of tokens t0 … t0 + T − 1, all inside `xs` (the caller's assert).
        unsafe {
            let mut a = [_mm512_setzero_ps(); T];
            let mut b = [_mm512_setzero_ps(); T];
            let mut i = 0;
            while i < cols {
                let w0 = _mm512_loadu_ps(row.as_ptr().add(i));
                let w1 = _mm512_loadu_ps(row.as_ptr().add(i + 16));
                for t in 0..T {
                    let x = xs.as_ptr().add((t0 + t) * cols + i);
                    a[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), a[t]);
                    b[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x.add(16)), b[t]);
                }
                i += BLOCK;
            }
            for t in 0..T {
                out[t0 + t] = finish512(a[t], b[t]);
            }
        }
    }
    let n = out.len();
    let mut t = 0;
    // SAFETY: as this function requires; t + 4 ≤ n, then t < n.
    unsafe {
        while t + 4 <= n {
            pass::<4>(row, xs, t, out);
            t += 4;
        }
        while t < n {
            pass::<1>(row, xs, t, out);
            t += 1;
        }
    }
}

/// The row decoded once, then `dot_with` for each token: the reference form.
#[cfg(test)]
fn row_portable(format: Lut4, w: &[u8], xs: &[f32], out: &mut [f32]) {
    let cols = w.len() / format.block_bytes() * format.block_weights();
    let mut row = vec![0f32; cols];
    match format {
        Lut4::Mxfp4 => decode_row_as::<Mx>(w, &mut row),
        Lut4::Iq4Nl => decode_row_as::<Nl>(w, &mut row),
        Lut4::Iq4Xs => decode_row_as::<Xs>(w, &mut row),
    }
    for (t, y) in out.iter_mut().enumerate() {
        *y = dot_with(&row, &xs[t * cols..(t + 1) * cols], |v| v);
    }
}

/// 32 codes looked up in the type's table (as i8): the low nibbles' 16 (weights 0–15), then
/// the high nibbles' (16–31). `q` points at the sub-block's 16 code bytes.
///
/// # Safety
/// The CPU has SSSE3 (every AVX2 CPU); 16 bytes are readable at `q`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn codes<L: Layout>(
    q: *const u8,
) -> (std::arch::x86_64::__m128i, std::arch::x86_64::__m128i) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let table = _mm_loadu_si128(L::TABLE.as_ptr() as *const __m128i);
        let low = _mm_set1_epi8(0x0F);
        let q = _mm_loadu_si128(q as *const __m128i);
        (
            _mm_shuffle_epi8(table, _mm_and_si128(q, low)),
            _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), low)),
        )
    }
}

/// Two 16-lane accumulators (`a` holding `dot_with`'s vectors 0 and 1, `b` 2 and 3) finished as
/// `dot_with` finishes its four: added lane by lane, (0 + 1) + (2 + 3), then the eight lanes.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finish512(a: std::arch::x86_64::__m512, b: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let upper = |v: __m512| _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        let sum = _mm256_add_ps(
            _mm256_add_ps(_mm512_castps512_ps256(a), upper(a)),
            _mm256_add_ps(_mm512_castps512_ps256(b), upper(b)),
        );
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        super::cpu_gemv::reduce8(&lanes)
    }
}

/// The whole blocks of a row, checked against the values they multiply: the bound every
/// vector kernel's loads rely on.
#[cfg(target_arch = "x86_64")]
fn blocks_of<L: Layout>(w: &[u8], x: &[f32]) -> usize {
    let blocks = w.len() / L::BYTES;
    assert!(
        x.len() >= blocks * L::WEIGHTS,
        "table-coded dot: {blocks} blocks, {} values",
        x.len()
    );
    blocks
}

/// [`blocks_of`] for two rows, which must have as many blocks.
#[cfg(target_arch = "x86_64")]
fn blocks_of_pair<L: Layout>(w0: &[u8], w1: &[u8], x: &[f32]) -> usize {
    let blocks = w0.len() / L::BYTES;
    assert!(
        w1.len() / L::BYTES == blocks && x.len() >= blocks * L::WEIGHTS,
        "table-coded dot: {blocks} and {} blocks, {} values",
        w1.len() / L::BYTES,
        x.len()
    );
    blocks
}

/// [`dot_avx2`] sixteen lanes at a time: per 32 weights the low nibbles' 16 into one 16-lane
/// accumulator and the high nibbles' into another — lanes 0–7 and 8–15 of each being
/// `dot_with`'s four 8-lane vectors — then those four added as there, so the same bits.
///
/// # Safety
/// The CPU has AVX-512F/BW, AVX2 and FMA; `w` holds the blocks of `x.len()` weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn dot_avx512<L: Layout>(w: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let blocks = blocks_of::<L>(w, x);
    // SAFETY (whole body): the features as required; every load lies inside `w`'s block k or
    // x's values of that block (the loop bound and the assert).
    unsafe {
        let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for k in 0..blocks {
            let blk = std::slice::from_raw_parts(w.as_ptr().add(k * L::BYTES), L::BYTES);
            for s in 0..L::WEIGHTS / BLOCK {
                let d = _mm512_set1_ps(L::scale(blk, s));
                let (lo, hi) = codes::<L>(blk.as_ptr().add(L::codes(s)));
                let widen =
                    |v: __m128i| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), d);
                let xp = x.as_ptr().add(k * L::WEIGHTS + s * BLOCK);
                a = _mm512_fmadd_ps(widen(lo), _mm512_loadu_ps(xp), a);
                b = _mm512_fmadd_ps(widen(hi), _mm512_loadu_ps(xp.add(16)), b);
            }
        }
        finish512(a, b)
    }
}

/// [`dot_avx512`] of two rows with the same values at once: each row's multiply-adds in its own
/// two accumulators, in `dot_avx512`'s order, so each row's bits are its own dot's.
///
/// # Safety
/// The CPU has AVX-512F/BW, AVX2 and FMA; `w0` and `w1` hold the blocks of `x.len()` weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn dot2_avx512<L: Layout>(w0: &[u8], w1: &[u8], x: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let blocks = blocks_of_pair::<L>(w0, w1, x);
    // SAFETY (whole body): the features as required; every load lies inside block k of `w0`
    // or `w1` or x's values of that block (the loop bound and the assert).
    unsafe {
        let (mut a0, mut b0) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (mut a1, mut b1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for k in 0..blocks {
            let blk0 = std::slice::from_raw_parts(w0.as_ptr().add(k * L::BYTES), L::BYTES);
            let blk1 = std::slice::from_raw_parts(w1.as_ptr().add(k * L::BYTES), L::BYTES);
            for s in 0..L::WEIGHTS / BLOCK {
                let xp = x.as_ptr().add(k * L::WEIGHTS + s * BLOCK);
                let (xl, xh) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
                let d0 = _mm512_set1_ps(L::scale(blk0, s));
                let d1 = _mm512_set1_ps(L::scale(blk1, s));
                let (lo0, hi0) = codes::<L>(blk0.as_ptr().add(L::codes(s)));
                let (lo1, hi1) = codes::<L>(blk1.as_ptr().add(L::codes(s)));
                let widen = |v: __m128i, d: __m512| {
                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), d)
                };
                a0 = _mm512_fmadd_ps(widen(lo0, d0), xl, a0);
                b0 = _mm512_fmadd_ps(widen(hi0, d0), xh, b0);
                a1 = _mm512_fmadd_ps(widen(lo1, d1), xl, a1);
                b1 = _mm512_fmadd_ps(widen(hi1, d1), xh, b1);
            }
        }
        (finish512(a0, b0), finish512(a1, b1))
    }
}

/// `dot_with` over the decoded row in AVX2, decoding as it goes: per 32 weights the codes
/// looked up by one byte shuffle each half (the table as i8), widened to f32 and scaled (exact),
/// then multiply-added into the four 8-lane accumulators in `dot_with`'s order — 32 weights are
/// one of its steps — so the same bits.
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` holds the blocks of `x.len()` weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<L: Layout>(w: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let blocks = blocks_of::<L>(w, x);
    // SAFETY (whole body): AVX2 and FMA as required; every load lies inside `w`'s block k
    // or x's values of that block (the loop bound and the assert).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        for k in 0..blocks {
            let blk = std::slice::from_raw_parts(w.as_ptr().add(k * L::BYTES), L::BYTES);
            for s in 0..L::WEIGHTS / BLOCK {
                let d = _mm256_set1_ps(L::scale(blk, s));
                let (lo, hi) = codes::<L>(blk.as_ptr().add(L::codes(s)));
                let widen =
                    |v: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d);
                let ws = [
                    widen(lo),
                    widen(_mm_srli_si128(lo, 8)),
                    widen(hi),
                    widen(_mm_srli_si128(hi, 8)),
                ];
                let xp = x.as_ptr().add(k * L::WEIGHTS + s * BLOCK);
                for (j, (a, wv)) in acc.iter_mut().zip(ws).enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(8 * j)), *a);
                }
            }
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        super::cpu_gemv::reduce8(&lanes)
    }
}

/// [`dot_avx2`] of two rows with the same values at once: each row's multiply-adds in its own
/// four accumulators, in `dot_avx2`'s order, so each row's bits are its own dot's.
///
/// # Safety
/// The CPU has AVX2 and FMA; `w0` and `w1` hold the blocks of `x.len()` weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot2_avx2<L: Layout>(w0: &[u8], w1: &[u8], x: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let blocks = blocks_of_pair::<L>(w0, w1, x);
    /// `dot_avx2`'s finish: the four vectors added (0 + 1) + (2 + 3), then the eight lanes.
    #[inline(always)]
    unsafe fn finish(acc: [__m256; 4]) -> f32 {
        // SAFETY: the caller's features.
        unsafe {
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
            super::cpu_gemv::reduce8(&lanes)
        }
    }
    // SAFETY (whole body): AVX2 and FMA as required; every load lies inside block k of `w0`
    // or `w1` or x's values of that block (the loop bound and the assert).
    unsafe {
        let mut acc0 = [_mm256_setzero_ps(); 4];
        let mut acc1 = [_mm256_setzero_ps(); 4];
        for k in 0..blocks {
            let blk0 = std::slice::from_raw_parts(w0.as_ptr().add(k * L::BYTES), L::BYTES);
            let blk1 = std::slice::from_raw_parts(w1.as_ptr().add(k * L::BYTES), L::BYTES);
            for s in 0..L::WEIGHTS / BLOCK {
                let xp = x.as_ptr().add(k * L::WEIGHTS + s * BLOCK);
                let d0 = _mm256_set1_ps(L::scale(blk0, s));
                let d1 = _mm256_set1_ps(L::scale(blk1, s));
                let (lo0, hi0) = codes::<L>(blk0.as_ptr().add(L::codes(s)));
                let (lo1, hi1) = codes::<L>(blk1.as_ptr().add(L::codes(s)));
                // Each vector widened right before its multiply-add: the 8 accumulators, the
                // codes and the scales already fill most of AVX2's 16 registers.
                let widen = |v: __m128i, d: __m256| {
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d)
                };
                let parts = [
                    (lo0, lo1),
                    (_mm_srli_si128(lo0, 8), _mm_srli_si128(lo1, 8)),
                    (hi0, hi1),
                    (_mm_srli_si128(hi0, 8), _mm_srli_si128(hi1, 8)),
                ];
                for (j, (c0, c1)) in parts.into_iter().enumerate() {
                    let xv = _mm256_loadu_ps(xp.add(8 * j));
                    acc0[j] = _mm256_fmadd_ps(widen(c0, d0), xv, acc0[j]);
                    acc1[j] = _mm256_fmadd_ps(widen(c1, d1), xv, acc1[j]);
                }
            }
        }
        (finish(acc0), finish(acc1))
    }
}

/// Blocks of every code, with scales across E8M0's range (0, 1 and 2 for the subnormal halves,
/// 127 for 1.0) — finite weights only (the decoding test covers 254's overflow). For tests.
#[cfg(test)]
pub(crate) fn sample_blocks(rows: usize, cols: usize, seed: usize) -> Vec<u8> {
    let mut b = Vec::new();
    let scales = [0u8, 1, 2, 100, 120, 122, 124, 126, 127, 128, 130];
    for k in 0..rows * cols / BLOCK {
        b.push(scales[(k + seed) % scales.len()]);
        b.extend((0..16).map(|j| ((k * 7 + j * 13 + seed * 31) % 256) as u8));
    }
    b
}

/// Blocks of `format` for tests: MXFP4 as [`sample_blocks`]; IQ4 with every code and f16 scales
/// from subnormal to large, both signs, and (IQ4_XS) every six-bit sub-block scale.
#[cfg(test)]
pub(crate) fn sample_format(format: Lut4, rows: usize, cols: usize, seed: usize) -> Vec<u8> {
    let ds = [1.0e-7f32, 3.1e-5, 0.0123, -0.5, 1.0, 7.75, -100.0, 0.0];
    let blocks = rows * cols / format.block_weights();
    let mut b = Vec::new();
    for k in 0..blocks {
        let at = k + seed;
        match format {
            Lut4::Mxfp4 => return sample_blocks(rows, cols, seed),
            Lut4::Iq4Nl => {
                b.extend(half::f16::from_f32(ds[at % ds.len()]).to_le_bytes());
                b.extend((0..16).map(|j| ((at * 7 + j * 13 + seed * 31) % 256) as u8));
            }
            Lut4::Iq4Xs => {
                b.extend(half::f16::from_f32(ds[at % ds.len()]).to_le_bytes());
                b.extend(((at * 40503) as u16).to_le_bytes());
                b.extend((0..4).map(|j| ((at * 29 + j * 71) % 256) as u8));
                b.extend((0..128).map(|j| ((at * 7 + j * 13 + seed * 31) % 256) as u8));
            }
        }
    }
    b
}

/// `x` (whole blocks of `format`, IQ4 only) as blocks, appended to `out`, by a simple rule —
/// each 32 weights' scale puts their largest magnitude near the table's end (IQ4_XS: the
/// super-block's f16 `d` and six-bit sub-block scales fitted to that), each weight the nearest
/// code. Not llama.cpp's search (which tries several scales against an importance weighting):
/// for files written to be measured (`bench random-checkpoint --gguf IQ4_XS_MOE`) and for
/// tests, where the decoding, not the rule, is what matters.
pub fn quantize_row_iq4(format: Lut4, x: &[f32], out: &mut Vec<u8>) {
    let f16 = half::f16::from_f32;
    let codes = |vals: &[f32], dl: f32, out: &mut Vec<u8>| {
        let nearest = |v: f32| -> u8 {
            (0..16u8)
                .min_by(|&a, &b| {
                    let da = (KVALUES_IQ4NL[a as usize] as f32 * dl - v).abs();
                    let db = (KVALUES_IQ4NL[b as usize] as f32 * dl - v).abs();
                    da.total_cmp(&db)
                })
                .unwrap_or(0)
        };
        for j in 0..BLOCK / 2 {
            out.push(nearest(vals[j]) | (nearest(vals[j + BLOCK / 2]) << 4));
        }
    };
    let amax = |v: &[f32]| v.iter().fold(0f32, |m, a| m.max(a.abs()));
    match format {
        Lut4::Iq4Nl => {
            for b in x.chunks_exact(BLOCK) {
                let d = f16(amax(b) / 113.0);
                out.extend(d.to_le_bytes());
                codes(b, d.to_f32(), out);
            }
        }
        Lut4::Iq4Xs => {
            for sb in x.chunks_exact(256) {
                let want: Vec<f32> = sb.chunks_exact(BLOCK).map(|b| amax(b) / 113.0).collect();
                let d = f16(want.iter().fold(0f32, |m, &v| m.max(v)) / 31.0);
                let ls: Vec<u8> = want
                    .iter()
                    .map(|&w| {
                        let r = if d.to_f32() > 0.0 {
                            (w / d.to_f32()).round()
                        } else {
                            0.0
                        };
                        (r.clamp(-32.0, 31.0) as i32 + 32) as u8
                    })
                    .collect();
                out.extend(d.to_le_bytes());
                let high: u16 = (0..8).map(|i| ((ls[i] as u16 >> 4) & 3) << (2 * i)).sum();
                out.extend(high.to_le_bytes());
                out.extend((0..4).map(|i| (ls[2 * i] & 15) | ((ls[2 * i + 1] & 15) << 4)));
                for (i, b) in sb.chunks_exact(BLOCK).enumerate() {
                    codes(b, d.to_f32() * (ls[i] as i32 - 32) as f32, out);
                }
            }
        }
        Lut4::Mxfp4 => quantize_row(x, out),
    }
}

/// [`quantize_row_iq4`] with the blocks' values decoded as `forward` sees them. For tests.
#[cfg(test)]
pub(crate) fn quantize_for_tests(format: Lut4, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut out = Vec::new();
    quantize_row_iq4(format, x, &mut out);
    let mut back = vec![0f32; x.len()];
    decode_row_fast(format, &out, &mut back);
    (out, back)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `quantize_row` writes the bytes gguf-py's `MXFP4.quantize_blocks` (llama.cpp's rule)
    /// writes for the same values — checkpoint-sized weights, zeros, a block of zeros, exact
    /// codes and the midpoints between them (ties) — and decoding gives back each value's
    /// nearest code at the block's scale.
    #[test]
    fn quantizing_is_gguf_pys_bit_for_bit() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gguf/mxfp4-quantize.json"
        );
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let rows = golden["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 4);
        for (r, row) in rows.iter().enumerate() {
            let x: Vec<f32> = row["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let want: Vec<u8> = row["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u8)
                .collect();
            let mut got = Vec::new();
            quantize_row(&x, &mut got);
            assert_eq!(got, want, "row {r}");
            let mut back = vec![0f32; x.len()];
            decode_row(&got, &mut back);
            for (i, (&v, &b)) in x.iter().zip(&back).enumerate() {
                let d = half_scale(got[i / BLOCK * BLOCK_BYTES]);
                let best = KVALUES
                    .iter()
                    .map(|&k| (k as f32 * d - v).abs())
                    .fold(f32::INFINITY, f32::min);
                assert_eq!((b - v).abs(), best, "row {r} value {i}");
            }
        }
    }

    fn sample(rows: usize, cols: usize) -> Vec<u8> {
        super::sample_blocks(rows, cols, 0)
    }

    /// The decoding, from the OCP definition rather than llama.cpp's doubled table: E2M1 is
    /// sign, two exponent bits (bias 1) and one mantissa bit; E8M0 is 2^(e−127).
    fn by_definition(code: u8, e: u8) -> f32 {
        let sign = if code & 8 != 0 { -1.0 } else { 1.0 };
        let (exp, man) = ((code >> 1) & 3, (code & 1) as f32);
        let mag = if exp == 0 {
            man * 0.5
        } else {
            (1.0 + man * 0.5) * 2f32.powi(exp as i32 - 1)
        };
        let v = sign * mag * 2f64.powi(e as i32 - 127) as f32;
        // Code 8 (−0) is +0 in llama.cpp's table, and so here.
        if v == 0.0 { 0.0 } else { v }
    }

    #[test]
    fn decodes_every_code_at_every_scale_as_defined() {
        for e in 0..=254u8 {
            let mut block = vec![e];
            block.extend((0..16u8).map(|j| j | (((j + 5) % 16) << 4)));
            let mut out = [0f32; BLOCK];
            decode_row(&block, &mut out);
            let mut fast = [0f32; BLOCK];
            decode_row_fast(Lut4::Mxfp4, &block, &mut fast);
            assert_eq!(out.map(f32::to_bits), fast.map(f32::to_bits), "e {e}");
            for j in 0..16u8 {
                for (code, got) in [(j, out[j as usize]), ((j + 5) % 16, out[16 + j as usize])] {
                    let want = by_definition(code, e);
                    assert!(
                        got.to_bits() == want.to_bits()
                            || (got.is_infinite() && want.is_infinite()),
                        "e {e} code {code}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_product_is_dot_with_over_the_dequantised_rows_bit_for_bit() {
        for format in [Lut4::Mxfp4, Lut4::Iq4Nl, Lut4::Iq4Xs] {
            for (rows, cols, n) in [
                (3, 256, 1),
                (5, 512, 2),
                (7, 256, 3),
                (64, 512, 5),
                (130, 768, 1),
                (9, 1024, 8),
            ] {
                products_agree(format, rows, cols, n);
            }
        }
        for (rows, cols, n) in [(3, 32, 1), (5, 64, 2), (130, 96, 1), (9, 128, 8)] {
            products_agree(Lut4::Mxfp4, rows, cols, n);
            products_agree(Lut4::Iq4Nl, rows, cols, n);
        }
    }

    fn products_agree(format: Lut4, rows: usize, cols: usize, n: usize) {
        let m =
            Lut4Matrix::new(format, sample_format(format, rows, cols, 0), [rows, cols]).unwrap();
        let dense: Vec<f32> = m
            .dequantize(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xs: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.013)
            .collect();
        let x = Tensor::from_vec(xs.clone(), (n, cols), &Device::Cpu).unwrap();
        let y: Vec<f32> = m
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut portable = vec![0f32; n];
        for r in 0..rows {
            let want: Vec<f32> = (0..n)
                .map(|t| {
                    dot_with(
                        &dense[r * cols..(r + 1) * cols],
                        &xs[t * cols..(t + 1) * cols],
                        |v| v,
                    )
                })
                .collect();
            row_portable(format, m.row(r), &xs, &mut portable);
            let mut decoded = vec![0f32; n];
            match format {
                Lut4::Mxfp4 => row_decoded::<Mx>(m.row(r), &xs, &mut decoded),
                Lut4::Iq4Nl => row_decoded::<Nl>(m.row(r), &xs, &mut decoded),
                Lut4::Iq4Xs => row_decoded::<Xs>(m.row(r), &xs, &mut decoded),
            }
            let what = format!("{format} [{rows}, {cols}] row {r}");
            for t in 0..n {
                let x = &xs[t * cols..(t + 1) * cols];
                #[cfg(target_arch = "x86_64")]
                {
                    use crate::model::cpu_gemv::{avx2_fma, avx512};
                    // SAFETY: the features are detected first; `x` is this row's width.
                    let (a2, a512) = unsafe {
                        match format {
                            Lut4::Mxfp4 => (
                                avx2_fma().then(|| dot_avx2::<Mx>(m.row(r), x)),
                                (avx2_fma() && avx512()).then(|| dot_avx512::<Mx>(m.row(r), x)),
                            ),
                            Lut4::Iq4Nl => (
                                avx2_fma().then(|| dot_avx2::<Nl>(m.row(r), x)),
                                (avx2_fma() && avx512()).then(|| dot_avx512::<Nl>(m.row(r), x)),
                            ),
                            Lut4::Iq4Xs => (
                                avx2_fma().then(|| dot_avx2::<Xs>(m.row(r), x)),
                                (avx2_fma() && avx512()).then(|| dot_avx512::<Xs>(m.row(r), x)),
                            ),
                        }
                    };
                    for (form, got) in [("avx2", a2), ("avx512", a512)] {
                        if let Some(got) = got {
                            assert_eq!(got.to_bits(), want[t].to_bits(), "{form} {what}");
                        }
                    }
                }
                assert_eq!(decoded[t].to_bits(), want[t].to_bits(), "decoded {what}");
                let got = y[t * rows + r];
                assert!(
                    got.to_bits() == want[t].to_bits() || (got.is_nan() && want[t].is_nan()),
                    "{what} token {t}: {got} vs {}",
                    want[t]
                );
                assert_eq!(portable[t].to_bits(), want[t].to_bits(), "portable {what}");
            }
        }
        // Two rows at once: each row's bits its own dot's, in both forms this CPU can run.
        #[cfg(target_arch = "x86_64")]
        for r in 0..rows.saturating_sub(1) {
            use crate::model::cpu_gemv::{avx2_fma, avx512};
            let (w0, w1) = (m.row(r), m.row(r + 1));
            for t in 0..n {
                let x = &xs[t * cols..(t + 1) * cols];
                let want =
                    |row: usize| dot_with(&dense[row * cols..(row + 1) * cols], x, |v| v).to_bits();
                // SAFETY: the features are detected first; `x` is these rows' width.
                let (p2, p512) = unsafe {
                    match format {
                        Lut4::Mxfp4 => (
                            avx2_fma().then(|| dot2_avx2::<Mx>(w0, w1, x)),
                            (avx2_fma() && avx512()).then(|| dot2_avx512::<Mx>(w0, w1, x)),
                        ),
                        Lut4::Iq4Nl => (
                            avx2_fma().then(|| dot2_avx2::<Nl>(w0, w1, x)),
                            (avx2_fma() && avx512()).then(|| dot2_avx512::<Nl>(w0, w1, x)),
                        ),
                        Lut4::Iq4Xs => (
                            avx2_fma().then(|| dot2_avx2::<Xs>(w0, w1, x)),
                            (avx2_fma() && avx512()).then(|| dot2_avx512::<Xs>(w0, w1, x)),
                        ),
                    }
                };
                for (form, got) in [("avx2 pair", p2), ("avx512 pair", p512)] {
                    if let Some((a, b)) = got {
                        let what = format!("{form} {format} [{rows}, {cols}] rows {r}, {}", r + 1);
                        assert_eq!(a.to_bits(), want(r), "{what} token {t}");
                        assert_eq!(b.to_bits(), want(r + 1), "{what} token {t}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_test_quantizer_lands_near_its_input() {
        for format in [Lut4::Iq4Nl, Lut4::Iq4Xs] {
            let x: Vec<f32> = (0..1024)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
                .collect();
            let (b, back) = quantize_for_tests(format, &x);
            assert_eq!(
                b.len(),
                1024 / format.block_weights() * format.block_bytes()
            );
            let worst = x
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Half the table's widest gap (113 − 89 = 24 steps) at d = amax / 113, plus for
            // IQ4_XS half a step of its 6-bit block scale (d / 31 of 31 steps): 0.5 · (12 / 113
            // + 1 / 62) = 0.0612. Both bounds are met on every value.
            let bound = if format == Lut4::Iq4Nl {
                0.0532
            } else {
                0.0612
            };
            assert!(worst <= bound, "{format}: {worst}");
        }
    }

    /// IQ4_NL and IQ4_XS decode as llama.cpp's `dequantize_row_iq4_nl` / `_iq4_xs` define it,
    /// written out here from the block structs (not through the kernels' layout code): every
    /// code, every six-bit sub-block scale, f16 scales of both signs down to subnormal.
    #[test]
    fn iq4_decodes_as_llama_cpp_defines_it() {
        let table = [
            -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
        ];
        for seed in 0..8 {
            let b = sample_format(Lut4::Iq4Nl, 2, 64, seed);
            let mut out = vec![0f32; 128];
            decode_row_fast(Lut4::Iq4Nl, &b, &mut out);
            for (k, blk) in b.chunks_exact(18).enumerate() {
                let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                for j in 0..16 {
                    let q = blk[2 + j];
                    let lo = d * table[(q & 15) as usize] as f32;
                    let hi = d * table[(q >> 4) as usize] as f32;
                    assert_eq!(out[32 * k + j].to_bits(), lo.to_bits(), "nl {k} {j}");
                    assert_eq!(out[32 * k + j + 16].to_bits(), hi.to_bits(), "nl {k} {j}");
                }
            }
            let b = sample_format(Lut4::Iq4Xs, 2, 512, seed);
            let mut out = vec![0f32; 1024];
            decode_row_fast(Lut4::Iq4Xs, &b, &mut out);
            let mut portable = vec![0f32; 1024];
            decode_row_as::<Xs>(&b, &mut portable);
            assert_eq!(
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let mut seen = std::collections::HashSet::new();
            for (k, blk) in b.chunks_exact(136).enumerate() {
                let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let scales_h = u16::from_le_bytes([blk[2], blk[3]]) as i32;
                for ib in 0..8 {
                    let ls = ((blk[4 + ib / 2] as i32 >> (4 * (ib % 2))) & 0xf)
                        | (((scales_h >> (2 * ib)) & 3) << 4);
                    seen.insert(ls);
                    let dl = d * (ls - 32) as f32;
                    for j in 0..16 {
                        let q = blk[8 + 16 * ib + j];
                        let at = 256 * k + 32 * ib + j;
                        let lo = dl * table[(q & 15) as usize] as f32;
                        let hi = dl * table[(q >> 4) as usize] as f32;
                        assert_eq!(out[at].to_bits(), lo.to_bits(), "xs {k} {ib} {j}");
                        assert_eq!(out[at + 16].to_bits(), hi.to_bits(), "xs {k} {ib} {j}");
                    }
                }
            }
            assert!(seen.len() > 8, "sub-block scales exercised: {seen:?}");
        }
    }

    /// Past the row kernels (a prompt's many tokens), the GEMM over decoded rows: the product
    /// with the dequantised matrix up to f32 summation order.
    #[test]
    fn a_long_prompt_takes_the_gemm_over_decoded_rows() {
        let (rows, cols, n) = (300, 256, 3 * crate::model::cpu_gemv::MAX_TOKENS + 1);
        let m = Lut4Matrix::new(
            Lut4::Iq4Xs,
            sample_format(Lut4::Iq4Xs, rows, cols, 5),
            [rows, cols],
        )
        .unwrap();
        let x = crate::util::test_matrix(n, cols, 3, 89, 1.0 / 32.0);
        let got: Vec<f32> = m
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let dense = m.dequantize(DType::F32).unwrap();
        let want: Vec<f32> = x
            .matmul(&dense.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| {
                if a.is_nan() || b.is_nan() {
                    f32::INFINITY
                } else {
                    (a - b).abs()
                }
            })
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5 * scale, "{worst} of {scale}");
    }

    #[test]
    fn bad_shapes_and_nan_scales_are_refused_by_row_and_block() {
        let mx = Lut4::Mxfp4;
        assert!(
            Lut4Matrix::new(mx, vec![0; 17], [1, 16])
                .unwrap_err()
                .contains("whole blocks")
        );
        let e = Lut4Matrix::new(mx, vec![0; 33], [1, 64]).unwrap_err();
        assert!(
            e.contains("33 bytes of MXFP4") && e.contains("34 expected"),
            "{e}"
        );
        let mut b = sample(4, 64);
        b[5 * BLOCK_BYTES] = 0xFF;
        let e = Lut4Matrix::new(mx, b, [4, 64]).unwrap_err();
        assert!(e.contains("row 2 block 1") && e.contains("0xFF"), "{e}");
        let e = Lut4Matrix::new(Lut4::Iq4Xs, vec![0; 136], [1, 128]).unwrap_err();
        assert!(
            e.contains("IQ4_XS rows of 128 weights are not whole blocks of 256"),
            "{e}"
        );
        for (format, bytes) in [(Lut4::Iq4Nl, 18), (Lut4::Iq4Xs, 136)] {
            let cols = format.block_weights() * 2;
            let mut b = sample_format(format, 3, cols, 0);
            b[3 * bytes..3 * bytes + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
            let e = Lut4Matrix::new(format, b.clone(), [3, cols]).unwrap_err();
            assert!(
                e.contains("row 1 block 1 has scale d = NaN"),
                "{format}: {e}"
            );
            b[3 * bytes..3 * bytes + 2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
            let e = Lut4Matrix::new(format, b, [3, cols]).unwrap_err();
            assert!(
                e.contains("row 1 block 1 has scale d = inf"),
                "{format}: {e}"
            );
        }
    }
}
