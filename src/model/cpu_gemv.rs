//! Products of a few tokens with a matrix on the CPU — every decode step's linear layers and
//! experts, in f32, bf16 and f16 (FP8 in `fp8.rs` uses the same dot). candle's GEMM is built for many
//! tokens; at batch 1 a product is a GEMV and memory-bound, and candle's bf16 path widened each
//! matrix before multiplying. Here each row is read once, 2 bytes a weight in bf16, widened in
//! registers.
//!
//! Each output is one row's dot product computed by one thread in a fixed order (eight lanes,
//! then the tail), so results depend neither on the thread count nor on how many tokens share a
//! call: native and selective, and prefill and decode, get the same bits. Rows are spread over
//! candle's own worker pool, whose threads are awake from the operation before — a second pool
//! would take turns spinning with it on the same cores (BENCHMARKS.md §9).

use candle_core::{DType, Device, Tensor};

use super::ports::MatRef;

/// Any dtype: up to this many tokens go through these kernels (a decode step, a routed
/// expert's few tokens of a prompt).
pub const MAX_TOKENS: usize = 8;

/// bf16 and f16: up to this many. candle's GEMM converts 16-bit operands on the way and lost to
/// the row kernels at every size measured — 16 to 128 tokens at 512 and 2,048 columns, 1.2–2.2×
/// slower (BENCHMARKS.md §28); longer prompts stay with it, unmeasured.
pub const MAX_TOKENS_HALF: usize = 128;

/// Whether [`narrow_matmul_t`] takes `n` tokens in `dtype`. f32 stays at [`MAX_TOKENS`]:
/// candle's tiled f32 GEMM converts nothing, and beyond a few tokens the row kernels' gains
/// were small and not steady — 1.05–1.3× at 512 columns, 0.8–0.9× at 2,048 (§28). That holds
/// for f32 over matrices held in bf16 or f16 too (`ports::held_dtype`): a 600-token prompt
/// prefilled 0.94–0.96× as fast with its experts' products on the row kernels as on the GEMM
/// over the whole matrix widened first — and the GEMM over blocks widened in cache
/// ([`matmul_t_blocks`]) is faster than that (BENCHMARKS.md §70).
pub fn row_kernels_take(dtype: DType, n: usize) -> bool {
    n <= MAX_TOKENS || (matches!(dtype, DType::BF16 | DType::F16) && n <= MAX_TOKENS_HALF)
}

/// Σ decode(w)·x over one row: 32 independent fused multiply-adds per step (four 8-lane
/// vectors: lane l of vector j takes element 8j + l of each 32); past the last 32, whole groups
/// of 8 into vectors 0, 1, 2 in turn; the four vectors added lane by lane, the eight lanes in a
/// fixed tree, then the last < 8 in order. `f32::mul_add` is one IEEE rounding on every
/// target, so this portable form, the compiler's vectorisation of it and the hand-written AVX2
/// forms below give the same bits. Why groups of 8 past the 32s: a row of 48 (the bundled
/// model's down rows) otherwise ended in 16 multiply-adds each waiting on the last.
#[inline(always)]
pub fn dot_with<W: Copy>(w: &[W], x: &[f32], decode: impl Fn(W) -> f32) -> f32 {
    let mut acc = [[0f32; 8]; 4];
    let (wc, xc) = (w.chunks_exact(32), x.chunks_exact(32));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (a, b) in wc.zip(xc) {
        for (j, acc) in acc.iter_mut().enumerate() {
            for l in 0..8 {
                acc[l] = decode(a[8 * j + l]).mul_add(b[8 * j + l], acc[l]);
            }
        }
    }
    let (wg, xg) = (wr.chunks_exact(8), xr.chunks_exact(8));
    let (wt, xt) = (wg.remainder(), xg.remainder());
    for ((a, b), acc) in wg.zip(xg).zip(acc.iter_mut()) {
        for l in 0..8 {
            acc[l] = decode(a[l]).mul_add(b[l], acc[l]);
        }
    }
    let mut lanes = [0f32; 8];
    for (l, v) in lanes.iter_mut().enumerate() {
        *v = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    let mut s = reduce8(&lanes);
    for (a, b) in wt.iter().zip(xt) {
        s = decode(*a).mul_add(*b, s);
    }
    s
}

/// The fixed order eight lanes are summed in.
#[inline(always)]
pub fn reduce8(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// [`dot_with`] for bf16 bits in AVX2: eight weights widened per instruction.
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` and `x` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 and FMA, as this function requires.
    unsafe {
        dot16_avx2(
            w,
            x,
            |v| _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)),
            bf16_bits,
        )
    }
}

/// [`dot_with`] for f16 bits in AVX2: eight weights widened per instruction (F16C, exact for
/// every finite f16, subnormals included, as `half::f16::to_f32` is).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `w` and `x` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16_avx2(w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2, FMA and F16C, as this function requires.
    unsafe { dot16_avx2(w, x, |v| _mm256_cvtph_ps(v), f16_bits) }
}

/// The AVX2 dot over 16-bit weights that [`dot_bf16_avx2`] and [`dot_f16_avx2`] share: `widen`
/// turns eight weights' bits into eight f32s, `decode` one (for the tail). Inlined into each,
/// so the widening compiles with the caller's target features.
///
/// # Safety
/// The CPU has AVX2 and FMA (and what `widen` needs); `w` and `x` have the same length.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot16_avx2(
    w: &[u16],
    x: &[f32],
    widen: impl Fn(std::arch::x86_64::__m128i) -> std::arch::x86_64::__m256,
    decode: fn(u16) -> f32,
) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    // SAFETY (whole body): the caller guarantees AVX2 and FMA.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                // i + 8j + 8 ≤ n for both slices (loop bound).
                let wv = _mm_loadu_si128(w.as_ptr().add(i + 8 * j) as *const __m128i);
                let xv = _mm256_loadu_ps(x.as_ptr().add(i + 8 * j));
                *acc = _mm256_fmadd_ps(widen(wv), xv, *acc);
            }
            i += 32;
        }
        groups_then_finish(acc, i, w, x, widen, decode)
    }
}

/// The end of the 16-bit AVX2 and AVX-512 dots: the whole groups of 8 left after `i` (at most
/// 3) into the 8-lane vectors in turn, as `dot_with` does, then [`finish`].
///
/// # Safety
/// The CPU has AVX2 and FMA (and what `widen8` needs); `i ≤ n`, the shorter slice's length.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn groups_then_finish(
    mut acc: [std::arch::x86_64::__m256; 4],
    mut i: usize,
    w: &[u16],
    x: &[f32],
    widen8: impl Fn(std::arch::x86_64::__m128i) -> std::arch::x86_64::__m256,
    decode: fn(u16) -> f32,
) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    // SAFETY (whole body): AVX2 and FMA, as the caller guarantees; each load is within both
    // slices (i + 8 ≤ n).
    unsafe {
        for acc in acc.iter_mut() {
            if i + 8 > n {
                break;
            }
            let wv = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            *acc = _mm256_fmadd_ps(widen8(wv), xv, *acc);
            i += 8;
        }
        finish(acc, i, n, |k, s| decode(w[k]).mul_add(x[k], s))
    }
}

/// [`dot_with`] for bf16 bits in AVX-512: sixteen weights widened per instruction, two 16-lane
/// accumulators standing for the four 8-lane ones — lanes 0–7 of the first are `acc[0]`, 8–15
/// `acc[1]`, of the second `acc[2]` and `acc[3]` — so every lane sees the same multiply-adds in
/// the same order, and the combination below is `finish`'s: the same bits as the AVX2 and
/// portable forms, in half the instructions. Why: a bf16 decode step on the CPU was bound by
/// widening, not by memory (BENCHMARKS.md §13: bf16 slower than f32 on the same model).
///
/// # Safety
/// The CPU has AVX-512F and AVX-512BW; `w` and `x` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
pub unsafe fn dot_bf16_avx512(w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512F/BW, AVX2 and FMA, as this function requires.
    unsafe {
        dot16_avx512(
            w,
            x,
            |v| _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)),
            |v| _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)),
            bf16_bits,
        )
    }
}

/// [`dot_bf16_avx512`] for f16 bits: sixteen weights widened per `vcvtph2ps` (exact for every
/// finite f16, as F16C's eight are), the same lanes and order, so the same bits as
/// [`dot_f16_avx2`] and the portable form. Why: f16 was the CPU's slowest precision against
/// llama.cpp (BENCHMARKS.md §76: 0.83–0.92×), its AVX2 form widening eight weights at a time
/// where bf16 had widened sixteen since §20.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512BW, AVX2, FMA and F16C; `w` and `x` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub unsafe fn dot_f16_avx512(w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512F/BW, AVX2, FMA and F16C, as this function requires.
    unsafe {
        dot16_avx512(
            w,
            x,
            |v| _mm512_cvtph_ps(v),
            |v| _mm256_cvtph_ps(v),
            f16_bits,
        )
    }
}

/// The AVX-512 dot over 16-bit weights that [`dot_bf16_avx512`] and [`dot_f16_avx512`] share:
/// `widen16` turns sixteen weights' bits into sixteen f32s, `widen8` eight, `decode` one. Two
/// 16-lane accumulators stand for `dot_with`'s four 8-lane ones (lanes 0–7 of the first are
/// `acc[0]`, 8–15 `acc[1]`, of the second `acc[2]` and `acc[3]`), so every lane sees the same
/// multiply-adds in the same order. Inlined into each caller, so the widening compiles with its
/// target features.
///
/// # Safety
/// The CPU has AVX-512F/BW, AVX2 and FMA (and what the widenings need); `w` and `x` have the same
/// length.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot16_avx512(
    w: &[u16],
    x: &[f32],
    widen16: impl Fn(std::arch::x86_64::__m256i) -> std::arch::x86_64::__m512,
    widen8: impl Fn(std::arch::x86_64::__m128i) -> std::arch::x86_64::__m256,
    decode: fn(u16) -> f32,
) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    // SAFETY (whole body): the caller guarantees AVX-512F/BW, AVX2 and FMA; every load below is
    // within both slices (the loop bounds).
    unsafe {
        let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            let w0 = _mm256_loadu_si256(w.as_ptr().add(i) as *const __m256i);
            let w1 = _mm256_loadu_si256(w.as_ptr().add(i + 16) as *const __m256i);
            let x0 = _mm512_loadu_ps(x.as_ptr().add(i));
            let x1 = _mm512_loadu_ps(x.as_ptr().add(i + 16));
            a = _mm512_fmadd_ps(widen16(w0), x0, a);
            b = _mm512_fmadd_ps(widen16(w1), x1, b);
            i += 32;
        }
        let acc = [
            _mm512_castps512_ps256(a),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)),
            _mm512_castps512_ps256(b),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)),
        ];
        groups_then_finish(acc, i, w, x, widen8, decode)
    }
}

/// [`dot_with`] for e4m3 codes in AVX2: eight codes decoded per instruction sequence (the
/// formula of `fp8::e4m3`).
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` and `x` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_e4m3_avx2(w: &[u8], x: &[f32], decode: fn(u8) -> f32) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let (m7f, m7, m80) = (
        _mm256_set1_epi32(0x7F),
        _mm256_set1_epi32(7),
        _mm256_set1_epi32(0x80),
    );
    let (eight, bias, nan) = (
        _mm256_set1_epi32(8),
        _mm256_set1_epi32(120 << 23),
        _mm256_set1_epi32(0x7FC0_0000),
    );
    let sub_scale = _mm256_set1_ps(1.0 / 512.0);
    // Eight codes from w[at] decoded, times x[at..at + 8], into acc.
    let step = |at: usize, acc: &mut __m256| {
        // SAFETY: the callers keep at + 8 ≤ n for both slices.
        let (wv, xv) = unsafe {
            (
                _mm_loadl_epi64(w.as_ptr().add(at) as *const __m128i),
                _mm256_loadu_ps(x.as_ptr().add(at)),
            )
        };
        let b = _mm256_cvtepu8_epi32(wv);
        let mag = _mm256_and_si256(b, m7f);
        let normal = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), bias);
        let sub = _mm256_castps_si256(_mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_and_si256(mag, m7)),
            sub_scale,
        ));
        let is_sub = _mm256_cmpgt_epi32(eight, mag);
        let bits = _mm256_blendv_epi8(normal, sub, is_sub);
        let bits = _mm256_blendv_epi8(bits, nan, _mm256_cmpeq_epi32(mag, m7f));
        let sign = _mm256_slli_epi32(_mm256_and_si256(b, m80), 24);
        let wf = _mm256_castsi256_ps(_mm256_or_si256(bits, sign));
        *acc = _mm256_fmadd_ps(wf, xv, *acc);
    };
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            step(i + 8 * j, acc);
        }
        i += 32;
    }
    // Whole groups of 8 left (at most 3): into the vectors in turn, as `dot_with`.
    for acc in acc.iter_mut() {
        if i + 8 > n {
            break;
        }
        step(i, acc);
        i += 8;
    }
    // SAFETY: AVX2 and FMA, as this function requires.
    unsafe { finish(acc, i, n, |k, s| decode(w[k]).mul_add(x[k], s)) }
}

/// The reduction and tail of the AVX2 dots, in [`dot_with`]'s order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn finish(
    acc: [std::arch::x86_64::__m256; 4],
    from: usize,
    n: usize,
    step: impl Fn(usize, f32) -> f32,
) -> f32 {
    use std::arch::x86_64::*;
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    // SAFETY: eight floats into an eight-float array.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    let mut s = reduce8(&lanes);
    for k in from..n {
        s = step(k, s);
    }
    s
}

/// f16 bits as f32 (exact).
#[inline(always)]
pub fn f16_bits(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// bf16 bits as f32 (exact: a shift).
#[inline(always)]
pub fn bf16_bits(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// y [n, rows]: `row(r, out)` writes row r's n results. Small products stay on this thread.
pub fn rows_product(
    rows: usize,
    cols: usize,
    n: usize,
    row: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    // Transposed ([rows, n]) so that each row's outputs are one contiguous chunk.
    let mut yt = vec![0f32; rows * n];
    let out = RowsOut(yt.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        for r in range {
            // SAFETY: rows are handed out once each, so each writes its own n outputs.
            let o = unsafe { out.row(r, n) };
            row(r, o);
        }
    };
    if rows * cols * n < 1 << 15 {
        run(0..rows);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(rows, run);
    }
    if n == 1 {
        return yt;
    }
    let mut y = vec![0f32; n * rows];
    for r in 0..rows {
        for t in 0..n {
            y[t * rows + r] = yt[r * n + t];
        }
    }
    y
}

/// Where a product's rows (or an attention's heads, `cpu_attention`) write their results.
pub(crate) struct RowsOut(pub(crate) *mut f32);
// SAFETY: only used to write disjoint rows from the pool's threads while the owner waits.
unsafe impl Sync for RowsOut {}
unsafe impl Send for RowsOut {}

impl RowsOut {
    /// The `n` outputs from element `at` on.
    ///
    /// # Safety
    /// In bounds, and no other live slice over them.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn at(&self, at: usize, n: usize) -> &mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), n) }
    }

    /// The `n` outputs of row `r`.
    ///
    /// # Safety
    /// `r` in bounds, and no other live slice of the same row.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize, n: usize) -> &mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(r * n), n) }
    }
}

/// x·Wᵀ for x [n, k] and W [rows, k] on the CPU, both bf16, f16 or f32 (or W 16-bit for an f32
/// x, [`takes`]), W contiguous, n
/// tokens few enough ([`row_kernels_take`]): each row dotted with every token in f32 (16-bit weights
/// widened on the fly), the result rounded once to the input's dtype. None when the case is not
/// one of these (the caller uses candle's matmul).
pub fn narrow_matmul_t(x: &Tensor, w: &Tensor) -> Option<candle_core::Result<Tensor>> {
    let dtype = x.dtype();
    if !matches!(x.device(), Device::Cpu)
        || !matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
        || !takes(w.dtype(), dtype)
        || x.rank() != 2
        || w.rank() != 2
        || !w.is_contiguous()
    {
        return None;
    }
    let (n, k) = x.dims2().ok()?;
    let (rows, cols) = w.dims2().ok()?;
    if k != cols || !row_kernels_take(dtype, n) {
        return None;
    }
    Some((|| {
        let xs = widened(x)?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("CPU product: the matrix is not on the CPU")
        };
        let start = layout.start_offset();
        let y = if w.dtype() != DType::F32 {
            let bits = &half_matrix(cpu, w.dtype())?[start..start + rows * cols];
            let kernel = half_row_kernel(w.dtype());
            rows_product(rows, cols, n, |r, out| {
                kernel(&bits[r * cols..(r + 1) * cols], &xs, out)
            })
        } else {
            let wv = &cpu.as_slice::<f32>()?[start..start + rows * cols];
            let kernel = f32_row_kernel();
            rows_product(rows, cols, n, |r, out| {
                kernel(&wv[r * cols..(r + 1) * cols], &xs, out)
            })
        };
        narrowed(y, (n, rows), dtype)
    })())
}

/// x·Wᵢᵀ for several matrices against the same x (an attention's q, k and v projections), in
/// one trip through the pool and one widening of x: [`narrow_matmul_t`]'s case for each, the
/// same bits (each output is the same row's dot), returned one tensor per matrix. None when any
/// matrix is not that case (the caller multiplies one at a time).
pub fn narrow_matmul_t_many(
    x: &Tensor,
    ws: &[&Tensor],
) -> Option<candle_core::Result<Vec<Tensor>>> {
    let dtype = x.dtype();
    let (n, k) = x.dims2().ok()?;
    if ws.is_empty()
        || !matches!(x.device(), Device::Cpu)
        || !matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
        || !row_kernels_take(dtype, n)
        || !ws.iter().all(|w| {
            w.dtype() == dtype
                && w.is_contiguous()
                && w.device().is_cpu()
                && w.dims2().is_ok_and(|(_, cols)| cols == k)
        })
    {
        return None;
    }
    Some((|| {
        let xs = widened(x)?;
        let rows: Vec<usize> = ws
            .iter()
            .map(|w| w.dim(0))
            .collect::<candle_core::Result<_>>()?;
        // Matrix of each global row, and that row within it.
        let mut at = Vec::with_capacity(rows.iter().sum());
        for (i, &r) in rows.iter().enumerate() {
            at.extend((0..r).map(|j| (i, j)));
        }
        let held: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
        let y = if dtype != DType::F32 {
            let bits = held
                .iter()
                .map(|(g, l)| half_matrix_at(g, l, dtype))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let kernel = half_row_kernel(dtype);
            rows_product(at.len(), k, n, |r, out| {
                let (i, j) = at[r];
                kernel(&bits[i][j * k..(j + 1) * k], &xs, out)
            })
        } else {
            let wv = held
                .iter()
                .map(|(g, l)| f32_matrix(g, l))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let kernel = f32_row_kernel();
            rows_product(at.len(), k, n, |r, out| {
                let (i, j) = at[r];
                kernel(&wv[i][j * k..(j + 1) * k], &xs, out)
            })
        };
        // y is [n, Σ rows]: each matrix's columns, token by token.
        let total = at.len();
        let mut outs = Vec::with_capacity(ws.len());
        let mut c0 = 0;
        for &r in &rows {
            let mut yi = Vec::with_capacity(n * r);
            for t in 0..n {
                yi.extend_from_slice(&y[t * total + c0..t * total + c0 + r]);
            }
            outs.push(narrowed(yi, (n, r), dtype)?);
            c0 += r;
        }
        Ok(outs)
    })())
}

/// One f32 row for every token.
pub(crate) type F32RowKernel = fn(&[f32], &[f32], &mut [f32]);

fn f32_row_portable(w: &[f32], xs: &[f32], out: &mut [f32]) {
    each_token(w, xs, out, |w, x| dot_with(w, x, |v| v))
}

/// [`dot_with`] for f32 in AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32_avx2(w: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 ≤ n for both slices (loop bound).
            let (wv, xv) = unsafe {
                (
                    _mm256_loadu_ps(w.as_ptr().add(i + 8 * j)),
                    _mm256_loadu_ps(x.as_ptr().add(i + 8 * j)),
                )
            };
            *acc = _mm256_fmadd_ps(wv, xv, *acc);
        }
        i += 32;
    }
    // Whole groups of 8 left (at most 3): into the vectors in turn, as `dot_with`.
    for acc in acc.iter_mut() {
        if i + 8 > n {
            break;
        }
        // SAFETY: i + 8 ≤ n for both slices.
        let (wv, xv) = unsafe {
            (
                _mm256_loadu_ps(w.as_ptr().add(i)),
                _mm256_loadu_ps(x.as_ptr().add(i)),
            )
        };
        *acc = _mm256_fmadd_ps(wv, xv, *acc);
        i += 8;
    }
    // SAFETY: AVX2 and FMA, as this function requires.
    unsafe { finish(acc, i, n, |k, s| w[k].mul_add(x[k], s)) }
}

pub(crate) fn f32_row_kernel() -> F32RowKernel {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        return |w, xs, out| {
            // SAFETY: AVX2 and FMA were detected on this CPU (avx2_fma).
            each_token(w, xs, out, |w, x| unsafe { dot_f32_avx2(w, x) })
        };
    }
    f32_row_portable
}

/// Shortest 16-bit row the AVX-512 dots take where they do not take every row
/// ([`avx512_every_row`]): on an Intel Xeon the wide form paid off from 512-wide rows on and cost
/// 3–4 % on shorter ones (BENCHMARKS.md §20).
#[cfg(target_arch = "x86_64")]
const AVX512_MIN_COLS: usize = 512;

/// Whether the AVX-512 dots take 16-bit rows of every width on this CPU. Both forms give the
/// same bits, so this is speed alone, measured per vendor: on an AMD EPYC (Zen 5) the wide form
/// was as fast or faster at every width — 256- and 48-wide rows decoded 1–6 % and prefilled
/// 2–13 % faster on it (§78) — where Intel's lost below 512 columns.
#[cfg(target_arch = "x86_64")]
fn avx512_every_row() -> bool {
    static EVERY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // CPUID traps to the hypervisor in a VM: asked once.
    *EVERY.get_or_init(|| {
        let id = std::arch::x86_64::__cpuid(0);
        let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        vendor == b"AuthenticAMD"
    })
}

/// One bf16 row for every token: `w` the row's bits, `xs` the tokens (n × cols), `out` the n
/// results.
type Bf16RowKernel = fn(&[u16], &[f32], &mut [f32]);

fn bf16_row_portable(w: &[u16], xs: &[f32], out: &mut [f32]) {
    each_token(w, xs, out, |w, x| dot_with(w, x, bf16_bits))
}

fn bf16_row_kernel() -> Bf16RowKernel {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() && avx512() && avx512_every_row() {
        // SAFETY: AVX-512F/BW, AVX2 and FMA were detected on this CPU.
        return |w, xs, out| each_token(w, xs, out, |w, x| unsafe { dot_bf16_avx512(w, x) });
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() && avx512() {
        return |w, xs, out| {
            // Both forms give the same bits, so the choice is speed alone (AVX512_MIN_COLS).
            if w.len() >= AVX512_MIN_COLS {
                // SAFETY: AVX-512F/BW, AVX2 and FMA were detected on this CPU.
                each_token(w, xs, out, |w, x| unsafe { dot_bf16_avx512(w, x) })
            } else {
                // SAFETY: AVX2 and FMA were detected on this CPU.
                each_token(w, xs, out, |w, x| unsafe { dot_bf16_avx2(w, x) })
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        return |w, xs, out| {
            // SAFETY: AVX2 and FMA were detected on this CPU (avx2_fma).
            each_token(w, xs, out, |w, x| unsafe { dot_bf16_avx2(w, x) })
        };
    }
    bf16_row_portable
}

fn f16_row_portable(w: &[u16], xs: &[f32], out: &mut [f32]) {
    each_token(w, xs, out, |w, x| dot_with(w, x, f16_bits))
}

/// One f16 row for every token, as [`Bf16RowKernel`].
fn f16_row_kernel() -> Bf16RowKernel {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() && avx512() && avx512_every_row() && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: AVX-512F/BW, AVX2, FMA and F16C were detected on this CPU.
        return |w, xs, out| each_token(w, xs, out, |w, x| unsafe { dot_f16_avx512(w, x) });
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() && avx512() && std::arch::is_x86_feature_detected!("f16c") {
        return |w, xs, out| {
            // The same bits either way; the wide form from the row length bf16's pays at.
            if w.len() >= AVX512_MIN_COLS {
                // SAFETY: AVX-512F/BW, AVX2, FMA and F16C were detected on this CPU.
                each_token(w, xs, out, |w, x| unsafe { dot_f16_avx512(w, x) })
            } else {
                // SAFETY: AVX2, FMA and F16C were detected on this CPU.
                each_token(w, xs, out, |w, x| unsafe { dot_f16_avx2(w, x) })
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() && std::arch::is_x86_feature_detected!("f16c") {
        return |w, xs, out| {
            // SAFETY: AVX2, FMA and F16C were detected on this CPU.
            each_token(w, xs, out, |w, x| unsafe { dot_f16_avx2(w, x) })
        };
    }
    f16_row_portable
}

/// The row kernel for 16-bit weights of `dtype` (bf16 or f16), as bits.
fn half_row_kernel(dtype: DType) -> Bf16RowKernel {
    if dtype == DType::F16 {
        f16_row_kernel()
    } else {
        bf16_row_kernel()
    }
}

/// One row's results for every token (`xs` is n × the row's length).
#[inline(always)]
pub fn each_token<W>(w: &[W], xs: &[f32], out: &mut [f32], dot: impl Fn(&[W], &[f32]) -> f32) {
    let cols = w.len();
    for (t, y) in out.iter_mut().enumerate() {
        *y = dot(w, &xs[t * cols..(t + 1) * cols]);
    }
}

/// Whether the AVX-512 forms may run on this CPU (with [`avx2_fma`]).
#[cfg(target_arch = "x86_64")]
pub fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// Whether the AVX2 + FMA forms may run on this CPU.
#[cfg(target_arch = "x86_64")]
pub fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// One token through several dense experts on the CPU, each expert's products those of
/// [`narrow_matmul_t`] but batched: every expert's gate_up rows in one product, then every
/// down row in another — two trips through the worker pool per layer instead of two per expert
/// (at batch 1 the dispatch, not the arithmetic, is most of a small expert's time). Each output
/// is the same row's dot in the same order as the per-expert product, rounded the same way, so
/// the bits are those of `down(silu(gate(x)) * up(x))` per expert.
///
/// The activation and the weighted sum are done here too, on plain vectors, with the tensor
/// ops' own roundings: `silu` in f32 then rounded to the dtype (`layers::silu`), `* up` in the
/// dtype, each expert's output rounded to the dtype, scaled by its weight rounded to the dtype
/// (`affine`), summed in the dtype from the first expert on — a dozen tensor ops a layer
/// fewer, which at batch 1 on a small model cost more than the arithmetic.
///
/// `x` [1, H]; `experts` (gate_up [2I, H], down [H, I]) all in x's dtype (bf16, f16 or f32),
/// contiguous; `weights` the routing weights, one per expert. Returns the weighted sum [1, H].
/// None when the case is not this one.
pub fn experts_one_token(
    x: &Tensor,
    experts: &[(MatRef, MatRef)],
    weights: &[f32],
) -> Option<candle_core::Result<Tensor>> {
    let dtype = x.dtype();
    let (n, h) = x.dims2().ok()?;
    let [two_i, _] = experts.first()?.0.dims();
    let inter = two_i / 2;
    let fits = |m: &MatRef, dims: [usize; 2]| mat_fits(m, dtype, dims);
    if n != 1
        || weights.len() != experts.len()
        || !x.device().is_cpu()
        || !matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
        || !experts
            .iter()
            .all(|(gu, d)| fits(gu, [2 * inter, h]) && fits(d, [h, inter]))
    {
        return None;
    }
    // Rounding to the compute dtype and the dtype's own arithmetic, as candle's ops do it; one
    // copy of the loops per dtype, so each is specialised (and the bf16 and f32 ones vectorise).
    Some(match dtype {
        DType::BF16 => one_token_sum(x, experts, weights, round_bf16),
        DType::F16 => one_token_sum_f16(x, experts, weights),
        _ => one_token_sum(x, experts, weights, |v| v),
    })
}

/// Whether a product in `dtype` reads a matrix held in `held`: its own dtype, or 16-bit values
/// in an f32 product (experts kept as stored, [`crate::model::ports::held_dtype`]: widened
/// exactly in the dot, so the bits are those of the widened matrix).
pub fn takes(held: DType, dtype: DType) -> bool {
    held == dtype || (dtype == DType::F32 && matches!(held, DType::BF16 | DType::F16))
}

/// Whether `m` is a CPU matrix of `dims` the expert kernels read in `dtype`: a contiguous
/// tensor [`takes`] takes, or bf16 rows in place.
fn mat_fits(m: &MatRef, dtype: DType, dims: [usize; 2]) -> bool {
    match m {
        MatRef::Tensor(t) => {
            takes(t.dtype(), dtype) && t.is_contiguous() && t.dims() == dims && t.device().is_cpu()
        }
        MatRef::Bf16(v, d) => {
            takes(DType::BF16, dtype) && *d == dims && v.len() == dims[0] * dims[1]
        }
    }
}

/// A prompt's routed experts' outputs on the CPU, dense and all held, in two trips through the
/// pool (every expert's gate_up rows, then every expert's down rows) instead of two per expert.
/// Why: a short prompt gives each expert a token or two, so each product is too small to split
/// over the cores, and the per-expert launches and tensor ops cost more than the arithmetic (a
/// prefill profile had the second core idle a third of the time, BENCHMARKS.md §32).
///
/// Expert e's output for its tokens (`idx[e]`, rows of x) is [n_e, H], each value of the dtype
/// (as f32): the bits of `ExpertWeights::forward` over those rows — the products are the row
/// kernels' dots rounded to the dtype, `silu` and `* up` rounded as there ([`experts_one_token`]
/// says how). None when the case is not this one: another dtype or device, a matrix not
/// contiguous in x's dtype, an expert without tokens or with more than the row kernels take
/// (candle's GEMM runs there, in another order: [`row_kernels_take`]), a row past x.
pub fn experts_few_tokens(
    x: &Tensor,
    experts: &[(MatRef, MatRef)],
    idx: &[&[u32]],
) -> Option<candle_core::Result<Vec<Vec<f32>>>> {
    let dtype = x.dtype();
    let (t, h) = x.dims2().ok()?;
    let [two_i, _] = experts.first()?.0.dims();
    let inter = two_i / 2;
    let fits = |m: &MatRef, dims: [usize; 2]| mat_fits(m, dtype, dims);
    if idx.len() != experts.len()
        || !x.device().is_cpu()
        || !matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
        || !experts
            .iter()
            .all(|(gu, d)| fits(gu, [2 * inter, h]) && fits(d, [h, inter]))
        || idx.iter().any(|rows| {
            rows.is_empty()
                || !row_kernels_take(dtype, rows.len())
                || rows.iter().any(|&i| i as usize >= t)
        })
    {
        return None;
    }
    Some(match dtype {
        DType::BF16 => few_tokens_outputs(x, experts, idx, round_bf16),
        DType::F16 => few_tokens_outputs_f16(x, experts, idx),
        _ => few_tokens_outputs(x, experts, idx, |v| v),
    })
}

/// [`few_tokens_outputs`] in f16, with the hardware's rounding where the CPU has F16C.
fn few_tokens_outputs_f16(
    x: &Tensor,
    experts: &[(MatRef, MatRef)],
    idx: &[&[u32]],
) -> candle_core::Result<Vec<Vec<f32>>> {
    #[cfg(target_arch = "x86_64")]
    if f16c() && avx2_fma() {
        /// # Safety
        /// The CPU has F16C, AVX2 and FMA.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn run(
            x: &Tensor,
            experts: &[(MatRef, MatRef)],
            idx: &[&[u32]],
        ) -> candle_core::Result<Vec<Vec<f32>>> {
            // SAFETY: this function's caller has checked for F16C.
            few_tokens_outputs(x, experts, idx, |v| unsafe { round_f16_f16c(v) })
        }
        // SAFETY: F16C, AVX2 and FMA were detected on this CPU.
        return unsafe { run(x, experts, idx) };
    }
    few_tokens_outputs(x, experts, idx, |v| half::f16::from_f32(v).to_f32())
}

/// [`experts_few_tokens`]' work, `round` rounding an f32 to the compute dtype.
#[inline(always)]
fn few_tokens_outputs(
    x: &Tensor,
    experts: &[(MatRef, MatRef)],
    idx: &[&[u32]],
    round: impl Fn(f32) -> f32 + Copy,
) -> candle_core::Result<Vec<Vec<f32>>> {
    let dtype = x.dtype();
    let h = x.dim(1)?;
    let two_i = experts[0].0.dims()[0];
    let inter = two_i / 2;
    let xs = widened(x)?;
    let ns: Vec<usize> = idx.iter().map(|rows| rows.len()).collect();
    let xe: Vec<Vec<f32>> = idx
        .iter()
        .map(|rows| {
            rows.iter()
                .flat_map(|&i| xs[i as usize * h..(i as usize + 1) * h].iter().copied())
                .collect()
        })
        .collect();
    let gate_ups: Vec<MatRef> = experts.iter().map(|(gu, _)| *gu).collect();
    let gu = ragged_stacked_product(&gate_ups, two_i, h, dtype, &xe, &ns)?;
    let hs: Vec<Vec<f32>> = gu
        .iter()
        .map(|ge| {
            let mut he = Vec::with_capacity(ge.len() / 2);
            for row in ge.chunks_exact(two_i) {
                let (g, u) = row.split_at(inter);
                he.extend(g.iter().zip(u).map(|(&g, &u)| {
                    let g = round(g);
                    let act = round(g / (1.0 + (-g).exp()));
                    round(act * round(u))
                }));
            }
            he
        })
        .collect();
    let downs: Vec<MatRef> = experts.iter().map(|(_, d)| *d).collect();
    let ys = ragged_stacked_product(&downs, h, inter, dtype, &hs, &ns)?;
    Ok(ys
        .into_iter()
        .map(|y| y.into_iter().map(round).collect())
        .collect())
}

/// Whether the F16C forms may run on this CPU.
pub fn f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`one_token_sum`] in f16, with the hardware's rounding where the CPU has F16C.
fn one_token_sum_f16(
    x: &Tensor,
    experts: &[(MatRef, MatRef)],
    weights: &[f32],
) -> candle_core::Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if f16c() && avx2_fma() {
        // SAFETY: F16C, AVX2 and FMA were detected on this CPU.
        return unsafe { one_token_sum_f16c(x, experts, weights) };
    }
    one_token_sum(x, experts, weights, |v| half::f16::from_f32(v).to_f32())
}

/// [`one_token_sum`] compiled for F16C, so the rounding inlines and its loops vectorise.
///
/// # Safety
/// The CPU has F16C, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_token_sum_f16c(
    x: &Tensor,
    experts: &[(MatRef, MatRef)],
    weights: &[f32],
) -> candle_core::Result<Tensor> {
    // SAFETY: this function's caller has checked for F16C.
    one_token_sum(x, experts, weights, |v| unsafe { round_f16_f16c(v) })
}

/// `v` rounded to f16 and back by F16C (to nearest, ties to even — what `half` does on such a
/// CPU, since it uses the same instructions).
///
/// # Safety
/// The CPU has F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
#[inline]
pub(crate) unsafe fn round_f16_f16c(v: f32) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v));
    _mm_cvtss_f32(_mm_cvtph_ps(h))
}

/// [`experts_one_token`]'s work, `round` rounding an f32 to the compute dtype.
#[inline(always)]
fn one_token_sum(
    x: &Tensor,
    experts: &[(MatRef, MatRef)],
    weights: &[f32],
    round: impl Fn(f32) -> f32 + Copy,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let h = x.dim(1)?;
    let two_i = experts[0].0.dims()[0];
    let inter = two_i / 2;
    let xs = widened(x)?;
    let gate_ups: Vec<MatRef> = experts.iter().map(|(gu, _)| *gu).collect();
    let gu = stacked_product(&gate_ups, two_i, h, dtype, |_| &xs)?;
    let mut hs = vec![0f32; experts.len() * inter];
    for (e, row) in gu.chunks_exact(two_i).enumerate() {
        let (g, u) = row.split_at(inter);
        for ((o, &g), &u) in hs[e * inter..(e + 1) * inter].iter_mut().zip(g).zip(u) {
            let g = round(g);
            let act = round(g / (1.0 + (-g).exp()));
            *o = round(act * round(u));
        }
    }
    let downs: Vec<MatRef> = experts.iter().map(|(_, d)| *d).collect();
    let y = stacked_product(&downs, h, inter, dtype, |e| &hs[e * inter..(e + 1) * inter])?;
    let mut acc = vec![0f32; h];
    for (e, (ye, &w)) in y.chunks_exact(h).zip(weights).enumerate() {
        // affine(w, 0): `v * w + 0` with w and each step in the dtype; then the sum, from the
        // first expert on. Branch-free for bf16 and f32, so the loops vectorise.
        let w = round(w);
        let scaled = |v: f32| round(round(round(v) * w) + 0.0);
        if e == 0 {
            acc.iter_mut().zip(ye).for_each(|(a, &v)| *a = scaled(v));
        } else {
            acc.iter_mut()
                .zip(ye)
                .for_each(|(a, &v)| *a = round(*a + scaled(v)));
        }
    }
    narrowed(acc, (1, h), dtype)
}

/// `v` rounded to bf16 and back, as `half::bf16::from_f32` rounds it (to nearest, ties to
/// even; a NaN stays a NaN, quietened, its sign and top payload bits kept), without branches,
/// so loops over it vectorise.
#[inline(always)]
pub fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    let nan = (b | 0x0040_0000) & 0xffff_0000;
    f32::from_bits(if v.is_nan() {
        nan
    } else {
        rounded & 0xffff_0000
    })
}

/// `v` as a bf16, rounded as [`round_bf16`] (and `half::bf16::from_f32`) round it.
#[inline(always)]
pub fn to_bf16(v: f32) -> half::bf16 {
    half::bf16::from_bits((round_bf16(v).to_bits() >> 16) as u16)
}

/// `a + b` for two contiguous CPU bf16 or f16 tensors of one shape (the residual adds of a
/// decode step) in one pass: each sum in f32 rounded to the dtype, as candle's add rounds it.
/// None for any other case (the caller adds with candle).
pub fn add_half(a: &Tensor, b: &Tensor) -> Option<candle_core::Result<Tensor>> {
    let dtype = a.dtype();
    if !a.device().is_cpu()
        || !b.device().is_cpu()
        || !matches!(dtype, DType::BF16 | DType::F16)
        || b.dtype() != dtype
        || a.dims() != b.dims()
        || !a.is_contiguous()
        || !b.is_contiguous()
    {
        return None;
    }
    Some((|| {
        let (xa, xb) = (widened(a)?, widened(b)?);
        if dtype == DType::BF16 {
            let y: Vec<half::bf16> = xa.iter().zip(&xb).map(|(&p, &q)| to_bf16(p + q)).collect();
            return Tensor::from_vec(y, a.shape(), &Device::Cpu);
        }
        #[cfg(target_arch = "x86_64")]
        if f16c() {
            /// The sums rounded by F16C, so the loop vectorises.
            ///
            /// # Safety
            /// The CPU has F16C.
            #[target_feature(enable = "f16c")]
            unsafe fn sums(xa: &[f32], xb: &[f32]) -> Vec<f32> {
                let round = |v: f32| {
                    // SAFETY: this function requires F16C.
                    unsafe { round_f16_f16c(v) }
                };
                xa.iter().zip(xb).map(|(&p, &q)| round(p + q)).collect()
            }
            // SAFETY: F16C was detected; the rounded sums are f16 values, so narrowing is exact.
            return narrowed(unsafe { sums(&xa, &xb) }, a.shape(), dtype);
        }
        let y: Vec<half::f16> = xa
            .iter()
            .zip(&xb)
            .map(|(&p, &q)| half::f16::from_f32(p + q))
            .collect();
        Tensor::from_vec(y, a.shape(), &Device::Cpu)
    })())
}

/// `a + b` through [`add_half`] where it applies, else candle's add.
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    match add_half(a, b) {
        Some(y) => y,
        None => a + b,
    }
}

/// A CPU tensor's values widened to f32, in its logical order: one pass over a contiguous
/// bf16 or f32 tensor (the decode path's case), candle's conversion otherwise.
pub fn widened(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    if let (Device::Cpu, Some((a, b))) = (x.device(), x.layout().contiguous_offsets()) {
        let (storage, _) = x.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            match x.dtype() {
                DType::BF16 => {
                    return Ok(cpu.as_slice::<half::bf16>()?[a..b]
                        .iter()
                        .map(|v| v.to_f32())
                        .collect());
                }
                DType::F16 => return Ok(widened_f16(&cpu.as_slice::<half::f16>()?[a..b])),
                DType::F32 => return Ok(cpu.as_slice::<f32>()?[a..b].to_vec()),
                _ => {}
            }
        }
    }
    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// f32 results as a CPU tensor of `shape` in `dtype` (bf16, f16 or f32), rounded once as
/// candle's `to_dtype` rounds (to nearest, ties to even).
pub fn narrowed(
    y: Vec<f32>,
    shape: impl Into<candle_core::Shape>,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    match dtype {
        DType::BF16 => Tensor::from_vec(
            y.into_iter().map(to_bf16).collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        ),
        DType::F16 => Tensor::from_vec(narrowed_f16(&y), shape, &Device::Cpu),
        _ => Tensor::from_vec(y, shape, &Device::Cpu)?.to_dtype(dtype),
    }
}

/// f16 values widened to f32 (exact). Why not `half`'s `to_f32` per element: on an F16C CPU each
/// call is a function with a feature check, a few percent of an f16 decode step (perf); eight at
/// a time the conversion is one instruction.
pub fn widened_f16(v: &[half::f16]) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if f16c() {
        // SAFETY: F16C (and the AVX it implies) was detected on this CPU.
        return unsafe { widened_f16_f16c(v) };
    }
    v.iter().map(|h| h.to_f32()).collect()
}

/// f32 values rounded to f16 as `half::f16::from_f32` rounds them (to nearest, ties to even; on
/// an F16C CPU `half` uses the same instruction, so the bits are the same), eight at a time.
pub fn narrowed_f16(y: &[f32]) -> Vec<half::f16> {
    #[cfg(target_arch = "x86_64")]
    if f16c() {
        // SAFETY: F16C (and the AVX it implies) was detected on this CPU.
        return unsafe { narrowed_f16_f16c(y) };
    }
    y.iter().map(|&v| half::f16::from_f32(v)).collect()
}

/// One expert's share of a prompt's MoE sum on the CPU, in place: row j of `y` ([n, h], the
/// expert's outputs for its tokens) scaled by `w[j]` and added into row `idx[j]` of `acc`
/// ([t, h]), with the roundings of `acc.index_add(idx, y.broadcast_mul(w))` in `dtype` — the
/// weight rounded to it, the product rounded, the sum rounded (an f32 product or sum of two
/// values of the dtype, rounded once, is what `half`'s arithmetic does) — so the bits are
/// candle's; `acc` holds values of the dtype as f32. Why: candle's f16/bf16 ops convert each
/// value by a call and allocate a tensor per step, a visible share of a 16-bit prefill.
pub fn add_weighted_rows(
    acc: &mut [f32],
    h: usize,
    y: &[f32],
    idx: &[u32],
    w: &[f32],
    dtype: DType,
) -> candle_core::Result<()> {
    if y.len() != idx.len() * h || w.len() != idx.len() {
        candle_core::bail!(
            "weighted rows: {} values for {} rows of {h}",
            y.len(),
            idx.len()
        )
    }
    if let Some(&i) = idx.iter().find(|&&i| (i as usize + 1) * h > acc.len()) {
        candle_core::bail!(
            "weighted rows: row {i} past the {} rows",
            acc.len() / h.max(1)
        )
    }
    match dtype {
        DType::BF16 => weighted_rows(acc, h, y, idx, w, round_bf16),
        DType::F16 => {
            #[cfg(target_arch = "x86_64")]
            if f16c() {
                // SAFETY: F16C was detected on this CPU.
                unsafe { weighted_rows_f16c(acc, h, y, idx, w) };
                return Ok(());
            }
            weighted_rows(acc, h, y, idx, w, |v| half::f16::from_f32(v).to_f32())
        }
        DType::F32 => weighted_rows(acc, h, y, idx, w, |v| v),
        other => candle_core::bail!("weighted rows in {other:?}"),
    }
    Ok(())
}

/// [`add_weighted_rows`]' loop for one rounding (inlined into each caller, so the rounding
/// inlines too).
#[inline(always)]
fn weighted_rows(
    acc: &mut [f32],
    h: usize,
    y: &[f32],
    idx: &[u32],
    w: &[f32],
    round: impl Fn(f32) -> f32,
) {
    for ((row, &i), &wj) in y.chunks_exact(h).zip(idx).zip(w) {
        let wj = round(wj);
        let out = &mut acc[i as usize * h..(i as usize + 1) * h];
        for (o, &v) in out.iter_mut().zip(row) {
            *o = round(*o + round(v * wj));
        }
    }
}

/// [`weighted_rows`] in f16 compiled for F16C: `half`'s per-value call becomes two
/// instructions and the loop vectorises.
///
/// # Safety
/// The CPU has F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn weighted_rows_f16c(acc: &mut [f32], h: usize, y: &[f32], idx: &[u32], w: &[f32]) {
    // SAFETY: this function's caller has checked for F16C.
    weighted_rows(acc, h, y, idx, w, |v| unsafe { round_f16_f16c(v) })
}

/// bf16 values as f16, rounded as candle's `to_dtype` rounds them (`half`'s f16 of the exact
/// f32), eight at a time with F16C: what loading a bf16 checkpoint for f16 compute spends its
/// time on, one call per value otherwise.
pub fn bf16_to_f16(v: &[half::bf16]) -> Vec<half::f16> {
    #[cfg(target_arch = "x86_64")]
    if f16c() && avx2_fma() {
        // SAFETY: F16C and AVX2 were detected on this CPU.
        return unsafe { bf16_to_f16_f16c(v) };
    }
    v.iter().map(|b| half::f16::from_f32(b.to_f32())).collect()
}

/// [`bf16_to_f16`] with AVX2 and F16C.
///
/// # Safety
/// The CPU has AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn bf16_to_f16_f16c(v: &[half::bf16]) -> Vec<half::f16> {
    use std::arch::x86_64::*;
    let mut out: Vec<half::f16> = Vec::with_capacity(v.len());
    let whole = v.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 ≤ v.len() and ≤ out's capacity; each lane is written before set_len.
        unsafe {
            let b = _mm_loadu_si128(v.as_ptr().add(i) as *const __m128i);
            let f = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(b)));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f);
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, h);
        }
    }
    // SAFETY: the first `whole` values were written above.
    unsafe { out.set_len(whole) };
    out.extend(v[whole..].iter().map(|b| half::f16::from_f32(b.to_f32())));
    out
}

/// [`widened_f16`] with F16C.
///
/// # Safety
/// The CPU has AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widened_f16_f16c(v: &[half::f16]) -> Vec<f32> {
    use std::arch::x86_64::*;
    let mut out: Vec<f32> = Vec::with_capacity(v.len());
    let whole = v.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 ≤ v.len() and ≤ out's capacity; each lane is written before set_len.
        unsafe {
            let h = _mm_loadu_si128(v.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    // SAFETY: the first `whole` values were written above.
    unsafe { out.set_len(whole) };
    out.extend(v[whole..].iter().map(|h| h.to_f32()));
    out
}

/// [`narrowed_f16`] with F16C.
///
/// # Safety
/// The CPU has AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn narrowed_f16_f16c(y: &[f32]) -> Vec<half::f16> {
    use std::arch::x86_64::*;
    let mut out: Vec<half::f16> = Vec::with_capacity(y.len());
    let whole = y.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 ≤ y.len() and ≤ out's capacity; each lane is written before set_len.
        unsafe {
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(y.as_ptr().add(i)));
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, h);
        }
    }
    // SAFETY: the first `whole` values were written above.
    unsafe { out.set_len(whole) };
    out.extend(y[whole..].iter().map(|&v| half::f16::from_f32(v)));
    out
}

/// One product over the rows of several [rows_each, cols] CPU matrices in `dtype` (bf16, f16 or
/// f32), one after another: row r of matrix e dotted with `x_of(e)`. One trip through the pool.
fn stacked_product<'x>(
    mats: &[MatRef],
    rows_each: usize,
    cols: usize,
    dtype: DType,
    x_of: impl Fn(usize) -> &'x [f32],
) -> candle_core::Result<Vec<f32>> {
    let xs: Vec<&[f32]> = (0..mats.len()).map(x_of).collect();
    // One token each: the ragged layout ([rows_each, 1] per matrix) is this one.
    ragged_products(mats, rows_each, cols, dtype, &xs, &vec![1; mats.len()])
}

/// Per matrix e of several [rows_each, cols] CPU matrices in `dtype`: matrix e's rows dotted
/// with each of its n_e = `ns[e]` tokens (`xs[e]`, n_e × cols), every row of every matrix in one
/// trip through the pool. Returned per matrix, one after another, transposed — [rows_each, n_e],
/// each row's outputs together (for one token each, the plain stacked layout). Each output is
/// the row kernels' dot, so the bits are those of one product per matrix ([`narrow_matmul_t`],
/// before its rounding to the dtype).
fn ragged_products(
    mats: &[MatRef],
    rows_each: usize,
    cols: usize,
    dtype: DType,
    xs: &[&[f32]],
    ns: &[usize],
) -> candle_core::Result<Vec<f32>> {
    // The tensors' storage held for the slices below; rows in place need nothing held.
    let held: Vec<_> = mats
        .iter()
        .map(|m| match m {
            MatRef::Tensor(t) => Some(t.storage_and_layout()),
            MatRef::Bf16(..) => None,
        })
        .collect();
    let w = held
        .iter()
        .zip(mats)
        .map(|(h, m)| match (h, m) {
            (Some((g, l)), MatRef::Tensor(t)) => Rows::of_tensor(g, l, t.dtype(), dtype),
            _ => Rows::in_place(m, dtype),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut offs = Vec::with_capacity(ns.len() + 1);
    offs.push(0);
    for &n in ns {
        offs.push(offs.last().copied().unwrap_or(0) + rows_each * n);
    }
    let total = offs[ns.len()];
    let mut yt = vec![0f32; total];
    let out = RowsOut(yt.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        for r in range {
            let (e, rr) = (r / rows_each, r % rows_each);
            let n = ns[e];
            // SAFETY: each (matrix, row) is handed out once and owns its n outputs.
            let o = unsafe { out.at(offs[e] + rr * n, n) };
            w[e].row(rr, cols, xs[e], o);
        }
    };
    let rows = w.len() * rows_each;
    if total * cols < 1 << 15 {
        run(0..rows);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(rows, run);
    }
    Ok(yt)
}

/// One matrix of a [`ragged_products`] call as its kernel reads it: f32 values, or 16-bit bits
/// with the row kernel of their type. An f32 product may take 16-bit matrices (experts held as
/// stored, [`crate::model::ports::held_dtype`]): the widening is exact and every dot form sums
/// in one order, so the bits are those of the same product over the widened f32 matrix.
enum Rows<'a> {
    F32(&'a [f32], F32RowKernel),
    Half(&'a [u16], Bf16RowKernel),
}

impl<'a> Rows<'a> {
    /// A held tensor of `held` dtype for a product in `dtype`.
    fn of_tensor(
        storage: &'a candle_core::Storage,
        layout: &candle_core::Layout,
        held: DType,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        if !takes(held, dtype) || !matches!(held, DType::F32 | DType::BF16 | DType::F16) {
            candle_core::bail!("CPU product: a {held:?} matrix in a {dtype:?} product")
        }
        Ok(if held == DType::F32 {
            Rows::F32(f32_matrix(storage, layout)?, f32_row_kernel())
        } else {
            Rows::Half(
                half_matrix_at(storage, layout, held)?,
                half_row_kernel(held),
            )
        })
    }

    /// bf16 rows in place, for a bf16 or an f32 product.
    fn in_place(m: &MatRef<'a>, dtype: DType) -> candle_core::Result<Self> {
        match *m {
            MatRef::Bf16(v, _) if takes(DType::BF16, dtype) => {
                use half::slice::HalfFloatSliceExt;
                Ok(Rows::Half(v.reinterpret_cast(), bf16_row_kernel()))
            }
            _ => candle_core::bail!("CPU product: bf16 rows in place for a {dtype:?} product"),
        }
    }

    /// Row `r` (of `cols` values) dotted with each token of `xs`, into `out`.
    #[inline]
    fn row(&self, r: usize, cols: usize, xs: &[f32], out: &mut [f32]) {
        match self {
            Rows::F32(w, k) => k(&w[r * cols..(r + 1) * cols], xs, out),
            Rows::Half(w, k) => k(&w[r * cols..(r + 1) * cols], xs, out),
        }
    }
}

/// [`ragged_products`] per matrix, each [n_e, rows_each] (token-major).
fn ragged_stacked_product(
    mats: &[MatRef],
    rows_each: usize,
    cols: usize,
    dtype: DType,
    xs: &[Vec<f32>],
    ns: &[usize],
) -> candle_core::Result<Vec<Vec<f32>>> {
    let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
    let yt = ragged_products(mats, rows_each, cols, dtype, &refs, ns)?;
    let mut at = 0;
    Ok(ns
        .iter()
        .map(|&n| {
            let ye = &yt[at..at + rows_each * n];
            at += rows_each * n;
            let mut y = vec![0f32; n * rows_each];
            for r in 0..rows_each {
                for t in 0..n {
                    y[t * rows_each + r] = ye[r * n + t];
                }
            }
            y
        })
        .collect())
}

/// A held CPU bf16 or f16 tensor as bits, from where it starts.
fn half_matrix_at<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
    dtype: DType,
) -> candle_core::Result<&'a [u16]> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        candle_core::bail!("CPU product: the matrix is not on the CPU")
    };
    Ok(&half_matrix(cpu, dtype)?[layout.start_offset()..])
}

/// CPU storage of bf16 or f16 values as their bits.
fn half_matrix(cpu: &candle_core::CpuStorage, dtype: DType) -> candle_core::Result<&[u16]> {
    let (ptr, len) = if dtype == DType::F16 {
        let v = cpu.as_slice::<half::f16>()?;
        (v.as_ptr() as *const u16, v.len())
    } else {
        let v = cpu.as_slice::<half::bf16>()?;
        (v.as_ptr() as *const u16, v.len())
    };
    // SAFETY: bf16 and f16 are plain 16-bit values; their bits read as u16 are what the
    // kernels widen, and the slice is the storage's own.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A held CPU f32 tensor, from where it starts.
fn f32_matrix<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        candle_core::bail!("CPU product: the matrix is not on the CPU")
    };
    Ok(&cpu.as_slice::<f32>()?[layout.start_offset()..])
}

/// x·Wᵀ through [`narrow_matmul_t`] where it applies, else candle's matmul — over W widened to
/// f32 where it is held narrower for an f32 x ([`takes`]; exact, so the bits are the widened
/// matrix's).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match narrow_matmul_t(x, w) {
        Some(y) => y,
        None if w.dtype() != x.dtype() && takes(w.dtype(), x.dtype()) => matmul_t_blocks(x, w),
        None => x.matmul(&w.t()?),
    }
}

/// Widens a range of a matrix's rows into a buffer of their length.
pub(crate) type WidenRows<'a> = dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync + 'a;

/// Rows of a 16-bit matrix widened together, into a thread's buffer (512 KiB at 1,024 columns:
/// it stays in the core's L2 for the product that reads it).
const WIDE_BLOCK: usize = 128;

/// [`matmul_t`] for an f32 x [n, k] and a bf16 or f16 W [rows, k] past the row kernels: blocks
/// of [`WIDE_BLOCK`] rows widened (exact) into the thread's buffer, each multiplied by the GEMM
/// candle's matmul calls, on one thread, into its own columns of y; blocks spread over the
/// worker pool. The blocks are fixed, so the bits depend on neither the thread count nor the
/// machine's threads. Why: widening the whole matrix first wrote it to memory at 4 bytes a
/// weight and read it back, which cost f32 prompts over 16-bit experts 8–17 % of their speed
/// (BENCHMARKS.md §70).
fn matmul_t_blocks(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    use half::slice::HalfFloatSliceExt;
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let ((n, k), (rows, cols)) = (x.dims2()?, w.dims2()?);
    if k != cols || x.dtype() != DType::F32 || !x.device().is_cpu() || !w.device().is_cpu() {
        candle_core::bail!(
            "CPU product: x {:?} {:?} over a {:?} matrix {:?}",
            x.dims(),
            x.dtype(),
            w.dtype(),
            w.dims()
        )
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(xc), candle_core::Storage::Cpu(wc)) = (&*xs, &*ws) else {
        candle_core::bail!("CPU product: not on the CPU")
    };
    let xv = &xc.as_slice::<f32>()?[xl.start_offset()..xl.start_offset() + n * k];
    let at = wl.start_offset()..wl.start_offset() + rows * k;
    // One block's rows widened into `dst` (exact either way).
    let widen: Box<WidenRows> = match w.dtype() {
        DType::BF16 => {
            let v = &wc.as_slice::<half::bf16>()?[at];
            Box::new(move |r, dst| v[r.start * k..r.end * k].convert_to_f32_slice(dst))
        }
        DType::F16 => {
            let v = &wc.as_slice::<half::f16>()?[at];
            Box::new(move |r, dst| v[r.start * k..r.end * k].convert_to_f32_slice(dst))
        }
        d => candle_core::bail!("CPU product: widening a {d:?} matrix"),
    };
    let y = widened_blocks_product(xv, n, k, rows, widen.as_ref());
    Tensor::from_vec(y, (n, rows), &Device::Cpu)
}

/// y [n, rows] = x [n, k] · Wᵀ for a W whose rows `widen` writes as f32 (exact), a block of
/// [`WIDE_BLOCK`] rows at a time into the thread's buffer, each block multiplied by candle's
/// GEMM on one thread into its own columns of y, blocks spread over the worker pool — the work
/// of [`matmul_t_blocks`], for any row format (`lut4.rs` too).
pub(crate) fn widened_blocks_product(
    xv: &[f32],
    n: usize,
    k: usize,
    rows: usize,
    widen: &WidenRows,
) -> Vec<f32> {
    assert!(
        xv.len() >= n * k,
        "widened product: x of {} for [{n}, {k}]",
        xv.len()
    );
    thread_local! {
        static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut y = vec![0f32; n * rows];
    // Borrowed whole, so the closure captures the Sync wrapper rather than its pointer.
    let out = &RowsOut(y.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(WIDE_BLOCK), |blocks| {
        for b in blocks {
            let r = b * WIDE_BLOCK..((b + 1) * WIDE_BLOCK).min(rows);
            let m = r.len();
            WIDE.with(|buf| {
                let mut buf = buf.borrow_mut();
                if buf.len() < m * k {
                    buf.resize(m * k, 0.0);
                }
                widen(r.clone(), &mut buf[..m * k]);
                // SAFETY: y is [n, rows] row-major and this block writes only its columns
                // r (each block once); x is [n, k] row-major; the buffer holds the block's
                // rows [m, k] row-major, read as their transpose [k, m] (column stride k).
                unsafe {
                    gemm::gemm(
                        n,
                        m,
                        k,
                        out.0.add(r.start),
                        1,
                        rows as isize,
                        false,
                        xv.as_ptr(),
                        1,
                        k as isize,
                        buf.as_ptr(),
                        k as isize,
                        1,
                        0f32,
                        1f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            });
        }
    });
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bf16 dot's portable, AVX2 and AVX-512 forms give the same bits: every length from 0
    /// to 100 (whole 32-blocks and tails), then long rows, weights and inputs of mixed signs and
    /// magnitudes so the order of the sums matters. The vector forms are checked where this CPU
    /// has them.
    #[test]
    fn bf16_dot_forms_give_the_same_bits() {
        let bits = |i: usize, salt: usize| -> u16 {
            let v = ((i * 2654435761 + salt) % 20011) as f32 / 20011.0 - 0.5;
            half::bf16::from_f32(v * (1 << (i % 13)) as f32).to_bits()
        };
        for n in (0..=100).chain([255, 256, 1000, 2048, 4099]) {
            let w: Vec<u16> = (0..n).map(|i| bits(i, 7)).collect();
            let x: Vec<f32> = (0..n)
                .map(|i| half::bf16::from_bits(bits(i, 99)).to_f32() * 3.0)
                .collect();
            let want = dot_with(&w, &x, bf16_bits).to_bits();
            #[cfg(target_arch = "x86_64")]
            {
                if avx2_fma() {
                    // SAFETY: detected.
                    assert_eq!(
                        unsafe { dot_bf16_avx2(&w, &x) }.to_bits(),
                        want,
                        "avx2, {n}"
                    );
                }
                if avx2_fma() && avx512() {
                    // SAFETY: detected.
                    let got = unsafe { dot_bf16_avx512(&w, &x) }.to_bits();
                    assert_eq!(got, want, "avx512, {n}");
                }
            }
            let _ = want;
            // f16: the F16C form gives the portable form's bits too.
            let w16: Vec<u16> = w
                .iter()
                .map(|&b| half::f16::from_f32(bf16_bits(b)).to_bits())
                .collect();
            let want16 = dot_with(&w16, &x, f16_bits).to_bits();
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() && std::arch::is_x86_feature_detected!("f16c") {
                // SAFETY: detected.
                let got = unsafe { dot_f16_avx2(&w16, &x) }.to_bits();
                assert_eq!(got, want16, "f16c, {n}");
                if avx512() {
                    // SAFETY: detected.
                    let got = unsafe { dot_f16_avx512(&w16, &x) }.to_bits();
                    assert_eq!(got, want16, "f16 avx512, {n}");
                }
            }
            let _ = want16;
            // f32 and e4m3: their AVX2 forms give the portable form's bits too.
            let wf: Vec<f32> = w.iter().map(|&b| bf16_bits(b)).collect();
            let want32 = dot_with(&wf, &x, |v| v).to_bits();
            let w8: Vec<u8> = w
                .iter()
                .map(|&b| (b as u8) & !0x80 | (b >> 8) as u8 & 0x80)
                .map(|c| if c & 0x7F == 0x7F { c ^ 1 } else { c })
                .collect();
            let want8 = dot_with(&w8, &x, crate::model::fp8::e4m3).to_bits();
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                // SAFETY: detected.
                let got = unsafe { dot_f32_avx2(&wf, &x) }.to_bits();
                assert_eq!(got, want32, "f32 avx2, {n}");
                // SAFETY: detected.
                let got = unsafe { dot_e4m3_avx2(&w8, &x, crate::model::fp8::e4m3) }.to_bits();
                assert_eq!(got, want8, "e4m3 avx2, {n}");
            }
            let _ = (want32, want8);
        }
    }

    /// The order `dot_with` documents, spelled out for a row of 53 (one block of 32, two groups
    /// of 8, five left): the groups go into vectors 0 and 1, the five after the lane tree.
    #[test]
    fn a_rows_groups_of_eight_past_the_last_32_go_into_the_vectors() {
        let n = 53;
        let w: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.37)
            .collect();
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 11 % 23) as f32 - 11.0) * 1.13e3)
            .collect();
        let mut acc = [[0f32; 8]; 4];
        for (j, acc) in acc.iter_mut().enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                *a = w[8 * j + l].mul_add(x[8 * j + l], *a);
            }
        }
        for (g, acc) in acc.iter_mut().take(2).enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                let k = 32 + 8 * g + l;
                *a = w[k].mul_add(x[k], *a);
            }
        }
        let lanes: [f32; 8] =
            std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
        let mut s = reduce8(&lanes);
        for k in 48..n {
            s = w[k].mul_add(x[k], s);
        }
        assert_eq!(dot_with(&w, &x, |v| v).to_bits(), s.to_bits());
    }

    /// x·Wᵀ by the row kernels: in x's dtype, within `b / rel + abs` of candle's f32 product of
    /// the same values (returned), and each token's row the bits of its own one-token product.
    fn product_checks(x: &Tensor, w: &Tensor, rel: f32, abs: f32) -> Vec<Vec<f32>> {
        let ours = narrow_matmul_t(x, w).unwrap().unwrap();
        assert_eq!(ours.dtype(), x.dtype());
        let ours: Vec<Vec<f32>> = ours.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let f32_ref: Vec<Vec<f32>> = x
            .to_dtype(DType::F32)
            .unwrap()
            .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        for (a, b) in ours.iter().flatten().zip(f32_ref.iter().flatten()) {
            assert!((a - b).abs() <= b.abs() / rel + abs, "{a} vs {b}");
        }
        for (t, want) in ours.iter().enumerate() {
            let one: Vec<Vec<f32>> = narrow_matmul_t(&x.narrow(0, t, 1).unwrap(), w)
                .unwrap()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2()
                .unwrap();
            assert_eq!(&one[0], want, "token {t}");
        }
        f32_ref
    }

    /// f16 matrices: close to candle's f32 product of the same values (one f16 rounding),
    /// independent of batching, the kernel the portable rows' bits.
    #[test]
    fn f16_product_matches_and_is_batch_independent() {
        let w = crate::util::test_matrix(70, 300, 3, 101, 0.01)
            .to_dtype(DType::F16)
            .unwrap();
        let x = crate::util::test_matrix(40, 300, 5, 17, 0.1)
            .to_dtype(DType::F16)
            .unwrap();
        product_checks(&x, &w, 1024.0, 1e-4);
        let bits: Vec<u16> = w
            .flatten_all()
            .unwrap()
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|b| b.to_bits())
            .collect();
        let xs = widened(&x).unwrap();
        let (mut a, mut b) = (vec![0f32; 40], vec![0f32; 40]);
        for r in 0..70 {
            let row = &bits[r * 300..(r + 1) * 300];
            f16_row_portable(row, &xs, &mut a);
            f16_row_kernel()(row, &xs, &mut b);
            assert_eq!(a, b, "row {r}");
        }
    }

    /// The branch-free rounding is half's: ties both ways, subnormals, the largest finite
    /// values (which round to infinity), infinities and NaNs of both signs, and a spread of
    /// ordinary bit patterns.
    #[test]
    fn round_bf16_is_halfs_rounding() {
        let special = [
            0u32,
            0x8000_0000,
            0x0000_8000,
            0x0001_8000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x007f_ffff,
            0x0000_0001,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f7f_8000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0xffc0_0001,
            0x7f80_0001,
            0xff80_8000,
            0x7fff_ffff,
        ];
        let spread = (0..u32::MAX / 65_521).map(|i| i.wrapping_mul(65_521).wrapping_add(i >> 3));
        for b in special.into_iter().chain(spread) {
            let v = f32::from_bits(b);
            let want = half::bf16::from_f32(v).to_f32().to_bits();
            assert_eq!(round_bf16(v).to_bits(), want, "{b:#010x}");
            assert_eq!(to_bf16(v).to_bits(), half::bf16::from_f32(v).to_bits());
        }
    }

    /// The residual add's pass gives candle's bf16 and f16 adds bit for bit, ties and signed zeros
    /// included; other dtypes and layouts are left to candle.
    #[test]
    fn half_add_is_candles_add() {
        for dtype in [DType::BF16, DType::F16] {
            let a = crate::util::test_matrix(3, 100, 1, 211, 0.013)
                .to_dtype(dtype)
                .unwrap();
            let b = crate::util::test_matrix(3, 100, 7, 97, 0.29)
                .to_dtype(dtype)
                .unwrap();
            let bits = crate::util::f32_bits;
            for (p, q) in [(&a, &b), (&b, &a), (&a, &a.neg().unwrap())] {
                let got = add_half(p, q).unwrap().unwrap();
                assert_eq!((got.dims(), got.dtype()), (p.dims(), dtype));
                assert_eq!(bits(&got), bits(&(p + q).unwrap()), "{dtype:?}");
            }
            assert!(add_half(&a.to_dtype(DType::F32).unwrap(), &b).is_none());
            assert!(add_half(&a.t().unwrap(), &b.t().unwrap()).is_none());
        }
    }

    /// Against candle's bf16 matmul widened to f32 (same values, other summation order): within
    /// one bf16 rounding; independent of batching; the vector build gives the portable bits.
    #[test]
    fn bf16_product_matches_and_is_batch_independent() {
        let (rows, cols) = (70usize, 300usize);
        let w = Tensor::from_vec(
            (0..rows * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
                .collect::<Vec<_>>(),
            (rows, cols),
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
        // A prompt's worth of tokens (more than a decode step's 8): each still its own product.
        let x = Tensor::from_vec(
            (0..40 * cols)
                .map(|i| ((i * 11 % 17) as f32 - 8.0) * 0.1)
                .collect::<Vec<_>>(),
            (40, cols),
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
        let f32_ref = product_checks(&x, &w, 128.0, 1e-6);
        let bits: Vec<u16> = w
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|b| b.to_bits())
            .collect();
        let xs: Vec<f32> = x
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (mut a, mut b) = (vec![0f32; 40], vec![0f32; 40]);
        for r in 0..rows {
            let row = &bits[r * cols..(r + 1) * cols];
            bf16_row_portable(row, &xs, &mut a);
            bf16_row_kernel()(row, &xs, &mut b);
            assert_eq!(a, b, "row {r}");
        }
        // f32 goes through the same dot for a decode step's tokens (a prompt's 40 stay with
        // candle's GEMM); mixed dtypes and too many tokens do not.
        let (x32, w32) = (
            x.to_dtype(DType::F32).unwrap(),
            w.to_dtype(DType::F32).unwrap(),
        );
        assert!(narrow_matmul_t(&x32, &w32).is_none());
        let x32 = x32.narrow(0, 0, MAX_TOKENS).unwrap();
        let y32: Vec<Vec<f32>> = narrow_matmul_t(&x32, &w32)
            .unwrap()
            .unwrap()
            .to_vec2()
            .unwrap();
        for (a, b) in y32.iter().flatten().zip(f32_ref.iter().flatten()) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        let w32v: Vec<f32> = w32.flatten_all().unwrap().to_vec1().unwrap();
        for r in 0..rows {
            let row = &w32v[r * cols..(r + 1) * cols];
            f32_row_portable(row, &xs, &mut a);
            f32_row_kernel()(row, &xs, &mut b);
            assert_eq!(a, b, "f32 row {r}");
        }
        // bf16 rows for an f32 x (experts held as stored, `ports::held_dtype`): the widened
        // matrix's bits, through the row kernels and through candle's GEMM past them.
        let bits = crate::util::f32_bits;
        let held = narrow_matmul_t(&x32, &w).unwrap().unwrap();
        assert_eq!(held.dtype(), DType::F32);
        assert_eq!(
            bits(&held),
            bits(&narrow_matmul_t(&x32, &w32).unwrap().unwrap())
        );
        // Past 8 tokens an f32 x goes to candle's GEMM, over the widened matrix: its bits.
        let x40 = x.to_dtype(DType::F32).unwrap();
        assert!(narrow_matmul_t(&x40, &w).is_none());
        assert_eq!(
            bits(&matmul_t(&x40, &w).unwrap()),
            bits(&x40.matmul(&w32.t().unwrap()).unwrap())
        );
        let many = Tensor::zeros((MAX_TOKENS_HALF + 1, cols), DType::BF16, &Device::Cpu).unwrap();
        assert!(narrow_matmul_t(&many, &w).is_none());
    }

    /// The f16 narrowing and widening give `half`'s bits for every f16 value, the values between
    /// them (ties), NaNs, infinities, overflow and subnormals, at lengths with and without a tail;
    /// bf16 to f16 gives candle's `to_dtype` bits for every bf16 value.
    #[test]
    fn f16_narrowing_and_widening_are_halfs() {
        let mut ys: Vec<f32> = (0..=u16::MAX)
            .flat_map(|b| {
                let v = half::f16::from_bits(b).to_f32();
                let next = half::f16::from_bits(b.wrapping_add(1)).to_f32();
                [v, (v + next) / 2.0, v * 1.000_1]
            })
            .collect();
        ys.extend([
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            1e10,
            -7e4,
            65_520.0,
            1e-8,
            -3e-6,
        ]);
        for len in [ys.len(), ys.len() - 3, 7, 1, 0] {
            let y = &ys[..len];
            let want: Vec<u16> = y
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let got: Vec<u16> = narrowed_f16(y).iter().map(|h| h.to_bits()).collect();
            assert!(got == want, "narrowing, {len} values");
        }
        let bf: Vec<half::bf16> = (0..=u16::MAX).map(half::bf16::from_bits).collect();
        for len in [bf.len(), bf.len() - 1, 5] {
            let want: Vec<u16> = bf[..len]
                .iter()
                .map(|b| half::f16::from_f32(b.to_f32()).to_bits())
                .collect();
            let got: Vec<u16> = bf16_to_f16(&bf[..len])
                .iter()
                .map(|h| h.to_bits())
                .collect();
            assert!(got == want, "bf16 to f16, {len} values");
        }
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        for len in [all.len(), all.len() - 5, 3] {
            let want: Vec<u32> = all[..len].iter().map(|h| h.to_f32().to_bits()).collect();
            let got: Vec<u32> = widened_f16(&all[..len])
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert!(got == want, "widening, {len} values");
        }
    }

    /// A prompt's weighted expert rows added in place give candle's bits for
    /// `acc.index_add(idx, y.broadcast_mul(w))`, expert after expert, in bf16, f16 and f32.
    #[test]
    fn weighted_rows_are_candles_index_add() {
        let (t, h) = (7usize, 37usize);
        let val = |i: usize, m: usize| ((i * 2654435761 % m) as f32 / m as f32 - 0.5) * 4.0;
        // Three experts' tokens (a token may go to several) and their weights.
        let experts: [(Vec<u32>, Vec<f32>); 3] = [
            (vec![0, 2, 3, 6], vec![0.31, 0.07, 0.55, 0.123_456]),
            (vec![1, 2, 5], vec![0.9, 0.333, 0.0001]),
            (
                vec![0, 1, 2, 3, 4, 5, 6],
                (0..7).map(|j| val(j, 97).abs() / 2.0).collect(),
            ),
        ];
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let mut want = Tensor::zeros((t, h), dtype, &Device::Cpu).unwrap();
            let mut ours = vec![0f32; t * h];
            for (e, (idx, w)) in experts.iter().enumerate() {
                let n = idx.len();
                let y = Tensor::from_vec(
                    (0..n * h)
                        .map(|i| val(i + 1000 * e, 1009))
                        .collect::<Vec<_>>(),
                    (n, h),
                    &Device::Cpu,
                )
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
                let wt = Tensor::from_vec(w.clone(), (n, 1), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let it = Tensor::from_vec(idx.clone(), n, &Device::Cpu).unwrap();
                want = want
                    .index_add(&it, &y.broadcast_mul(&wt).unwrap(), 0)
                    .unwrap();
                add_weighted_rows(&mut ours, h, &widened(&y).unwrap(), idx, w, dtype).unwrap();
            }
            let want: Vec<u32> = widened(&want)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let got: Vec<u32> = ours.iter().map(|v| v.to_bits()).collect();
            assert!(got == want, "{dtype:?}");
        }
        let mut acc = vec![0f32; 2 * h];
        let e = add_weighted_rows(&mut acc, h, &[0.0; 37], &[2], &[1.0], DType::F32).unwrap_err();
        assert!(e.to_string().contains("row 2"), "{e}");
    }

    /// An f32 prompt over a 16-bit matrix past the row kernels (blocks widened into a buffer,
    /// each through candle's GEMM) gives the bits of candle's matmul over the whole widened
    /// matrix — rows past one block and not a multiple of it, a view off the storage's start,
    /// both 16-bit types, columns enough for the GEMM to block them.
    #[test]
    fn widened_blocks_give_candles_matmul_over_the_widened_matrix() {
        let bits = crate::util::f32_bits;
        for dtype in [DType::BF16, DType::F16] {
            for (n, rows, k) in [(40, 300, 1536), (9, 2 * WIDE_BLOCK, 64), (129, 7, 96)] {
                let x = crate::util::test_matrix(n, k, 3, 97, 1.0 / 32.0);
                let w = crate::util::test_matrix(rows + 2, k, 5, 89, 1.0 / 64.0)
                    .to_dtype(dtype)
                    .unwrap()
                    .narrow(0, 2, rows)
                    .unwrap();
                let w32 = w.to_dtype(DType::F32).unwrap();
                let want = bits(&x.matmul(&w32.t().unwrap()).unwrap());
                assert!(narrow_matmul_t(&x, &w).is_none());
                let got = matmul_t(&x, &w).unwrap();
                assert_eq!(got.dims(), [n, rows]);
                assert_eq!(bits(&got), want, "{dtype:?} {n} x {rows} x {k}");
            }
        }
        let f = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(matmul_t_blocks(&f, &f).is_err());
    }

    /// Which products the row kernels take: any dtype up to 8 tokens; 16-bit ones up to 128.
    #[test]
    fn row_kernels_take_short_products_and_16_bit_prompts() {
        for d in [DType::BF16, DType::F16, DType::F32] {
            assert!(row_kernels_take(d, MAX_TOKENS), "{d:?}");
        }
        assert!(row_kernels_take(DType::BF16, 128));
        assert!(!row_kernels_take(DType::F16, 129));
        assert!(!row_kernels_take(DType::F32, MAX_TOKENS + 1));
    }

    /// Batched experts give, row by row, the bits of each expert's own forward.
    #[test]
    fn batched_experts_are_each_experts_own_forward() {
        use crate::model::ports::ExpertWeights;
        let (h, i, k) = (96usize, 40usize, 3usize);
        let mat = |rows, cols, seed| crate::util::test_matrix(rows, cols, seed, 257, 0.004);
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let experts: Vec<ExpertWeights> = (0..k)
                .map(|e| {
                    ExpertWeights::new(
                        mat(2 * i, h, 11 * e).to_dtype(dtype).unwrap(),
                        mat(h, i, 13 * e + 5).to_dtype(dtype).unwrap(),
                        i,
                    )
                })
                .collect();
            let x = mat(1, h, 3).to_dtype(dtype).unwrap();
            let mats: Vec<(MatRef, MatRef)> = experts.iter().map(|w| w.rows().unwrap()).collect();
            // Weights whose products round differently in bf16 and in f32.
            let weights = [0.4137f32, 0.3311, 0.2552];
            let y = experts_one_token(&x, &mats, &weights).unwrap().unwrap();
            assert_eq!(y.dims(), [1, h]);
            assert_eq!(y.dtype(), dtype);
            // What the tensor ops give: each expert's own forward, scaled by `affine`, summed.
            let one_by_one = |experts: &[ExpertWeights]| {
                let mut want: Option<Tensor> = None;
                for (w, &r) in experts.iter().zip(&weights) {
                    let ye = w.forward(&x).unwrap().affine(f64::from(r), 0.0).unwrap();
                    want = Some(match want {
                        None => ye,
                        Some(a) => (a + ye).unwrap(),
                    });
                }
                want.unwrap()
            };
            let bits = crate::util::f32_bits;
            assert_eq!(bits(&y), bits(&one_by_one(&experts)), "{dtype:?}");
            // bf16 rows read in place (a mapped expert's form) give the tensors' bits; other
            // dtypes do not take them.
            let values = |t: &Tensor| {
                t.to_dtype(DType::BF16)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::bf16>()
                    .unwrap()
            };
            let held: Vec<(Vec<half::bf16>, Vec<half::bf16>)> = experts
                .iter()
                .map(|w| {
                    let (g, d) = w.dense().unwrap();
                    (values(g), values(d))
                })
                .collect();
            let in_place: Vec<(MatRef, MatRef)> = held
                .iter()
                .map(|(g, d)| (MatRef::Bf16(g, [2 * i, h]), MatRef::Bf16(d, [h, i])))
                .collect();
            let got = experts_one_token(&x, &in_place, &weights);
            match dtype {
                DType::BF16 => {
                    assert_eq!(bits(&got.unwrap().unwrap()), bits(&y), "bf16 rows in place")
                }
                DType::F32 => {
                    // f32 over bf16 matrices (rows in place, or bf16 tensors): the bits of
                    // the same experts widened to f32, one expert at a time.
                    let widened: Vec<ExpertWeights> = held
                        .iter()
                        .map(|(g, d)| {
                            let t = |v: &[half::bf16], r, c| {
                                Tensor::from_slice(v, (r, c), &Device::Cpu)
                                    .unwrap()
                                    .to_dtype(DType::F32)
                                    .unwrap()
                            };
                            ExpertWeights::new(t(g, 2 * i, h), t(d, h, i), i)
                        })
                        .collect();
                    let want = bits(&one_by_one(&widened));
                    assert_eq!(bits(&got.unwrap().unwrap()), want, "f32 over bf16 rows");
                    let bf16: Vec<(Tensor, Tensor)> = widened
                        .iter()
                        .map(|w| {
                            let (g, d) = w.dense().unwrap();
                            (
                                g.to_dtype(DType::BF16).unwrap(),
                                d.to_dtype(DType::BF16).unwrap(),
                            )
                        })
                        .collect();
                    let tensors: Vec<(MatRef, MatRef)> = bf16
                        .iter()
                        .map(|(g, d)| (MatRef::Tensor(g), MatRef::Tensor(d)))
                        .collect();
                    let y = experts_one_token(&x, &tensors, &weights).unwrap().unwrap();
                    assert_eq!(bits(&y), want, "f32 over bf16 tensors");
                }
                _ => assert!(got.is_none(), "{dtype:?} does not take bf16 rows in place"),
            }
            // Two tokens, or mixed dtypes: not this path.
            let two = mat(2, h, 1).to_dtype(dtype).unwrap();
            assert!(experts_one_token(&two, &mats, &weights).is_none());
            assert!(experts_one_token(&x, &mats, &weights[..2]).is_none());
        }
    }

    /// A prompt's experts in two trips through the pool give `ExpertWeights::forward`'s bits
    /// over each expert's tokens, in bf16, f16 and f32, with rows of a whole 32-block and a tail
    /// and experts of one to eight tokens; products large enough to be split over the pool and
    /// too small to be. An expert with more tokens than the row kernels take, none, or a row
    /// past the prompt is not this case.
    #[test]
    fn a_prompts_experts_batched_give_the_per_expert_bits() {
        use crate::model::ports::ExpertWeights;
        for (h, inter, t) in [(70, 24, 7), (256, 96, 16)] {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let x = crate::util::test_matrix(t, h, 5, 97, 1.0 / 64.0)
                    .to_dtype(dtype)
                    .unwrap();
                let experts: Vec<(Tensor, Tensor)> = (0..5)
                    .map(|e| {
                        let gu =
                            crate::util::test_matrix(2 * inter, h, 11 * e + 1, 89, 1.0 / 128.0);
                        let dn = crate::util::test_matrix(h, inter, 13 * e + 2, 83, 1.0 / 96.0);
                        (gu.to_dtype(dtype).unwrap(), dn.to_dtype(dtype).unwrap())
                    })
                    .collect();
                // Expert e takes the tokens i with (i + e) % (e + 2) == 0, eight at most: half
                // of them for expert 0, one in six for expert 4.
                let idx: Vec<Vec<u32>> = (0..5u32)
                    .map(|e| {
                        (0..t as u32)
                            .filter(|i| (i + e) % (e + 2) == 0)
                            .take(8)
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[u32]> = idx.iter().map(|v| v.as_slice()).collect();
                let mats: Vec<(MatRef, MatRef)> = experts
                    .iter()
                    .map(|(g, d)| (MatRef::Tensor(g), MatRef::Tensor(d)))
                    .collect();
                let got = experts_few_tokens(&x, &mats, &refs)
                    .expect("this case")
                    .unwrap();
                for (e, ((gu, dn), rows)) in experts.iter().zip(&idx).enumerate() {
                    let xe = x
                        .index_select(&Tensor::new(rows.as_slice(), &Device::Cpu).unwrap(), 0)
                        .unwrap();
                    let want = widened(
                        &ExpertWeights::new(gu.clone(), dn.clone(), inter)
                            .forward(&xe)
                            .unwrap(),
                    )
                    .unwrap();
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got[e]), bits(&want), "{dtype:?} h {h} expert {e}");
                }
                if dtype == DType::F32 {
                    // f32 over the same experts held in bf16 (`ports::held_dtype`), as tensors
                    // and as rows in place: the bits of those bf16 values widened to f32.
                    let narrow = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
                    let bf16: Vec<(Tensor, Tensor)> = experts
                        .iter()
                        .map(|(g, d)| (narrow(g), narrow(d)))
                        .collect();
                    let values: Vec<(Vec<half::bf16>, Vec<half::bf16>)> = bf16
                        .iter()
                        .map(|(g, d)| {
                            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1().unwrap();
                            (v(g), v(d))
                        })
                        .collect();
                    let as_tensors: Vec<(MatRef, MatRef)> = bf16
                        .iter()
                        .map(|(g, d)| (MatRef::Tensor(g), MatRef::Tensor(d)))
                        .collect();
                    let in_place: Vec<(MatRef, MatRef)> = values
                        .iter()
                        .map(|(g, d)| {
                            (MatRef::Bf16(g, [2 * inter, h]), MatRef::Bf16(d, [h, inter]))
                        })
                        .collect();
                    let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                    for held in [&as_tensors, &in_place] {
                        let got = experts_few_tokens(&x, held, &refs)
                            .expect("this case")
                            .unwrap();
                        for (e, ((gu, dn), rows)) in bf16.iter().zip(&idx).enumerate() {
                            let xe = x
                                .index_select(
                                    &Tensor::new(rows.as_slice(), &Device::Cpu).unwrap(),
                                    0,
                                )
                                .unwrap();
                            let want = widened(
                                &ExpertWeights::new(widen(gu), widen(dn), inter)
                                    .forward(&xe)
                                    .unwrap(),
                            )
                            .unwrap();
                            let bits =
                                |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&got[e]),
                                bits(&want),
                                "f32 over bf16, h {h} expert {e}"
                            );
                        }
                    }
                }
                // Not this case: more tokens than the row kernels take (f32: 8), no tokens, a
                // row past the prompt, an expert without its rows.
                let all: Vec<u32> = (0..t as u32).collect();
                let mut bad = refs.clone();
                bad[0] = &all;
                assert_eq!(
                    experts_few_tokens(&x, &mats, &bad).is_some(),
                    row_kernels_take(dtype, t),
                    "{dtype:?} {t} tokens"
                );
                let mut bad = refs.clone();
                bad[1] = &[];
                assert!(experts_few_tokens(&x, &mats, &bad).is_none());
                let past = [t as u32];
                let mut bad = refs.clone();
                bad[2] = &past;
                assert!(experts_few_tokens(&x, &mats, &bad).is_none());
                assert!(experts_few_tokens(&x, &mats, &refs[..4]).is_none());
            }
        }
    }

    /// Several matrices against the same x in one product give each matrix's own product's
    /// bits ([`narrow_matmul_t`]), for 1 and 5 tokens in bf16, f16 and f32, at sizes that stay
    /// on one thread and that go through the pool; not the case where one of them is not.
    #[test]
    fn projections_in_one_product_give_each_ones_bits() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for (n, cols) in [(1, 70), (5, 256)] {
                let x = crate::util::test_matrix(n, cols, 3, 101, 1.0 / 32.0)
                    .to_dtype(dtype)
                    .unwrap();
                let ws: Vec<Tensor> = [(256, 1), (128, 2), (40, 3)]
                    .iter()
                    .map(|&(rows, seed)| {
                        crate::util::test_matrix(rows, cols, seed, 89, 1.0 / 64.0)
                            .to_dtype(dtype)
                            .unwrap()
                    })
                    .collect();
                let refs: Vec<&Tensor> = ws.iter().collect();
                let got = narrow_matmul_t_many(&x, &refs).expect("this case").unwrap();
                for (w, g) in ws.iter().zip(&got) {
                    let want = narrow_matmul_t(&x, w).expect("this case").unwrap();
                    assert_eq!(g.dims(), want.dims());
                    let bits = |t: &Tensor| {
                        widened(t)
                            .unwrap()
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(bits(g), bits(&want), "{dtype:?} {n} tokens");
                }
                let other = crate::util::test_matrix(8, cols + 1, 1, 89, 1.0)
                    .to_dtype(dtype)
                    .unwrap();
                assert!(narrow_matmul_t_many(&x, &[&ws[0], &other]).is_none());
                assert!(narrow_matmul_t_many(&x, &[]).is_none());
            }
            let many = crate::util::test_matrix(MAX_TOKENS + 1, 64, 1, 89, 1.0)
                .to_dtype(dtype)
                .unwrap();
            let w = crate::util::test_matrix(16, 64, 2, 89, 1.0)
                .to_dtype(dtype)
                .unwrap();
            assert_eq!(
                narrow_matmul_t_many(&many, &[&w]).is_some(),
                row_kernels_take(dtype, MAX_TOKENS + 1)
            );
        }
    }
}
