//! Several of candle's block-quantized matrices on the CPU, each multiplied by one token of its
//! own, all their rows in one trip through candle's worker pool — with candle's own arithmetic,
//! so each output has the bits `QMatMul::forward` gives for that matrix and token.
//!
//! Why: at batch 1 a small expert's quantized product is mostly its dispatch — a trip through
//! the pool, the token quantized to blocks, a tensor made — and a decode token's routed experts
//! made two such products each (BENCHMARKS.md §98: on an AVX2-only CPU the `engine` preset's
//! Q8_0 decode ran at 0.49–0.65× llama.cpp). Where candle has its own shared-input kernel
//! (`QTensor::gemv_fused_shared_lhs`, AVX-512 VNNI and aarch64 only) the caller takes that
//! first.
//!
//! What "candle's own arithmetic" means here is `k_quants::matmul` for one row of input, which
//! `QMatMul::forward` runs wherever candle does not repack the matrix into its tiled layout:
//! the token quantized once by the vec-dot type's `from_float` (or copied, for the types that
//! take f32 as they are), then the rows four at a time by `vec_dot_4` from the matrix's first
//! row, the last two or three by `vec_dot_2` and `vec_dot`. A matrix candle would repack
//! ([`candle_repacks`]) runs in the arithmetic of candle's tiled kernel where that is written
//! here (Q4_K on x86 with AVX2: [`prepare_q4k_tiled`]); any other is refused, so the caller
//! keeps candle's product for it.

use super::cpu_gemv::RowsOut;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use std::any::{Any, TypeId};
use std::sync::Arc;

/// Unit u of a matrix's product: one group of rows (four, or the last one to three; eight for
/// [`prepare_q4k_tiled`]) times one tile of its tokens, written into the matrix's `[tokens,
/// rows]` output.
type Unit<'a> = Box<dyn Fn(usize, &RowsOut) + Sync + 'a>;

/// One matrix prepared for the stacked product.
struct Prepared<'a> {
    rows: usize,
    width: usize,
    tokens: usize,
    /// Row groups times token tiles, the groups of one tile together (as candle's prompt
    /// product orders its work: a worker's run of units keeps one tile of tokens hot).
    units: usize,
    unit: Unit<'a>,
}

/// Tokens a unit multiplies by its rows: candle's `MATMUL_ROW_TILE`. Why: the rows stay in L1
/// while the tile's tokens pass, and the tile's quantized tokens stay hot across the rows.
const TOKEN_TILE: usize = 16;

/// The token tile of unit `u` (of a matrix with `groups` row groups and `m` tokens) and its
/// row group.
fn unit_place(u: usize, groups: usize, m: usize) -> (std::ops::Range<usize>, usize) {
    let (tile, group) = (u / groups, u % groups);
    let first = tile * TOKEN_TILE;
    (first..m.min(first + TOKEN_TILE), group)
}

/// The tokens of one stacked product, each quantized once for each block type it is multiplied
/// in. Why: a decode token's routed experts all take the same token for their gate_up products,
/// and q, k and v share theirs; candle quantizes it again for every matrix (BENCHMARKS.md §99).
#[derive(Default)]
struct Tokens(Vec<(TokenKey, Arc<dyn Any + Send + Sync>)>);

/// Where a token is, its length, the block type it was quantized to, and whether copied.
type TokenKey = (usize, usize, TypeId, bool);

impl Tokens {
    /// `x` as `blocks` blocks of `V`, as `k_quants::matmul` makes them: copied where the
    /// matrix's type takes f32 as it is (`direct`), else `V::from_float`. Keyed by the slice's
    /// address: every token of one product is borrowed for the whole product.
    fn quantized<V: GgmlType + Send + Sync + 'static>(
        &mut self,
        x: &[f32],
        blocks: usize,
        direct: bool,
    ) -> Arc<Vec<V>> {
        let key = (x.as_ptr() as usize, x.len(), TypeId::of::<V>(), direct);
        let known = self.0.iter().find(|(k, _)| *k == key);
        if let Some(v) = known.and_then(|(_, v)| v.clone().downcast::<Vec<V>>().ok()) {
            return v;
        }
        let mut lhs = vec![V::zeros(); blocks];
        if direct {
            V::direct_copy(x, &mut lhs);
        } else {
            V::from_float(x, &mut lhs);
        }
        let lhs = Arc::new(lhs);
        self.0.push((key, lhs.clone()));
        lhs
    }
}

/// The matrix's blocks and the tokens (`x`: `m` rows of the matrix's width) quantized as
/// `k_quants::matmul` quantizes them. None where the storage is not whole, aligned blocks of
/// `T` of the matrix's shape.
fn prepare_as<'a, T: GgmlType + Sync + 'static>(
    bytes: &'a [u8],
    (n, k): (usize, usize),
    x: &[f32],
    tokens: &mut Tokens,
) -> Option<Prepared<'a>>
where
    T::VecDotType: Send + Sync + 'static,
{
    if k == 0 || !k.is_multiple_of(T::BLCK_SIZE) || x.is_empty() || !x.len().is_multiple_of(k) {
        return None;
    }
    let m = x.len() / k;
    let per_row = k / T::BLCK_SIZE;
    let size = std::mem::size_of::<T>();
    if bytes.len() != n * per_row * size
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: the bytes are candle's storage of `n * per_row` blocks of `T` (a plain
    // `#[repr(C)]` struct of integers and halves, any bit pattern valid), aligned for `T`
    // (both checked above), and borrowed for 'a.
    let blocks: &'a [T] = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), n * per_row) };
    // Each token's blocks as `k_quants::matmul` makes them row by row: a row is whole blocks,
    // so all rows at once are the same blocks.
    let lhs = tokens.quantized::<T::VecDotType>(x, m * per_row, T::DIRECT_COPY);
    let row = move |r: usize| &blocks[r * per_row..(r + 1) * per_row];
    let quads = n / 4;
    let groups = n.div_ceil(4);
    let (quad, prefetch) = quad_kernel::<T>();
    let quad_bytes = 4 * per_row * size;
    // The rows of group g times token y, into `out` (the group's outputs for that token).
    let rows_times = move |g: usize, y: &[T::VecDotType], out: &mut [f32]| {
        let c = 4 * g;
        if g < quads {
            let (a, b, d, e) = quad(k, [row(c), row(c + 1), row(c + 2), row(c + 3)], y);
            out.copy_from_slice(&[a, b, d, e]);
            return;
        }
        // candle's tail: the first two of the last one to three rows together, an odd last
        // row alone.
        let len = out.len();
        if len >= 2 {
            (out[0], out[1]) = T::vec_dot_2(k, row(c), row(c + 1), y);
        }
        if len & 1 == 1 {
            out[len - 1] = T::vec_dot(k, row(n - 1), y);
        }
    };
    let unit: Unit<'a> = if m == 1 {
        // A decode product: the group is the unit (no tile to find, no token loop).
        Box::new(move |g: usize, out: &RowsOut| {
            if prefetch {
                prefetch_bytes(bytes, (g + 1) * quad_bytes..(g + 2) * quad_bytes);
            }
            let c = 4 * g;
            // SAFETY: unit g alone owns rows c … c + 3 (or to the last row) of the output.
            rows_times(g, &lhs, unsafe { out.at(c, (n - c).min(4)) });
        })
    } else {
        Box::new(move |u: usize, out: &RowsOut| {
            let (tile, g) = unit_place(u, groups, m);
            if prefetch {
                prefetch_bytes(bytes, (g + 1) * quad_bytes..(g + 2) * quad_bytes);
            }
            let c = 4 * g;
            for t in tile {
                // SAFETY: unit u alone owns rows c … c + 3 (or to the last row) of token t's
                // outputs, inside the matrix's [m, n] output.
                let out = unsafe { out.at(t * n + c, (n - c).min(4)) };
                rows_times(g, &lhs[t * per_row..(t + 1) * per_row], out);
            }
        })
    };
    Some(Prepared {
        rows: n,
        width: k,
        tokens: m,
        units: groups * m.div_ceil(TOKEN_TILE),
        unit,
    })
}

/// Four rows' dots with one quantized token.
type QuadKernel<T> = fn(usize, [&[T]; 4], &[<T as GgmlType>::VecDotType]) -> (f32, f32, f32, f32);

/// Asks the CPU to start loading `bytes[range]` (clipped to the slice) into its caches; a hint
/// that changes no result. Why: a quad of short rows (a 512-wide Q8_0 row is 9 cache lines) is
/// four interleaved streams too short for the hardware prefetcher to pick up, so with the
/// interleaved Q8_0 dot each quad waited on memory; asking for the next quad while this one
/// runs made a product over matrices that do not fit the caches 1.5–1.6× faster, and the
/// same trick cost the slower Q6_K dot 2–4 % (BENCHMARKS.md §99), so only that dot asks.
fn prefetch_bytes(bytes: &[u8], range: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let end = range.end.min(bytes.len());
        for at in (range.start..end).step_by(64) {
            // SAFETY: a prefetch reads nothing architecturally and cannot fault; the address
            // is inside the slice anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(at).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, range);
}

/// candle's `vec_dot_4`, or where candle's x86 dot is `avx::vec_dot_q8_0_q8_0` or
/// `avx::vec_dot_q6k_q8k` for each row, [`q8_0_dot4_avx2`] or [`q6k_dot4_avx2`]: the same four
/// dots with the same bits, interleaved — and whether the quad after the current one is worth
/// prefetching ([`prefetch_bytes`]).
fn quad_kernel<T: GgmlType + 'static>() -> (QuadKernel<T>, bool) {
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == GgmlDType::Q8_0
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<BlockQ8_0>()
        && super::cpu_gemv::avx2_fma()
        && std::arch::is_x86_feature_detected!("f16c")
    {
        let kernel: QuadKernel<T> = |k, rows, lhs| {
            // SAFETY: T is BlockQ8_0 and so is its vec-dot type (checked above, the type ids
            // equal); the casts only restate it. AVX2, FMA and F16C were detected.
            unsafe {
                let rows = rows
                    .map(|r| std::slice::from_raw_parts(r.as_ptr().cast::<BlockQ8_0>(), r.len()));
                let lhs = std::slice::from_raw_parts(lhs.as_ptr().cast::<BlockQ8_0>(), lhs.len());
                q8_0_dot4_avx2(k, rows, lhs)
            }
        };
        return (kernel, true);
    }
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == GgmlDType::Q6K
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<BlockQ6K>()
        && super::cpu_gemv::avx2_fma()
    {
        let kernel: QuadKernel<T> = |k, rows, lhs| {
            // SAFETY: T is BlockQ6K (the type ids equal) and its vec-dot type is BlockQ8K; the
            // casts restate them through structs of the same layout (asserted at the structs).
            // AVX2 and FMA were detected.
            unsafe {
                let rows = rows
                    .map(|r| std::slice::from_raw_parts(r.as_ptr().cast::<Q6kBlock>(), r.len()));
                let lhs = std::slice::from_raw_parts(lhs.as_ptr().cast::<Q8kBlock>(), lhs.len());
                q6k_dot4_avx2(k, rows, lhs)
            }
        };
        // A compute-bound dot: the prefetch cost it 2–4 % (BENCHMARKS.md §99).
        return (kernel, false);
    }
    (
        |k, [a, b, c, d], lhs| T::vec_dot_4(k, a, b, c, d, lhs),
        false,
    )
}

/// candle's Q6_K block, field by field.
#[cfg(target_arch = "x86_64")]
#[repr(C)]
struct Q6kBlock {
    ql: [u8; 128],
    qh: [u8; 64],
    scales: [i8; 16],
    d: u16,
}
#[cfg(target_arch = "x86_64")]
const _: () = assert!(std::mem::size_of::<Q6kBlock>() == std::mem::size_of::<BlockQ6K>());
#[cfg(target_arch = "x86_64")]
const _: () = assert!(std::mem::align_of::<Q6kBlock>() == std::mem::align_of::<BlockQ6K>());

/// Four Q6_K rows' dots with one Q8_K token, each row's the bits of candle's
/// `avx::vec_dot_q6k_q8k` (what `vec_dot_4` runs for each row on an AVX2 CPU): the same
/// instructions for each row, so the same integer lanes, multiply-added with
/// `d_token · f32(d_row)` into the row's one 8-lane accumulator in block order, then candle's
/// `hsum_float_8`. Why: the token's loads and its `32 · q8` sums are the same for every row, and
/// four rows are four chains.
///
/// # Safety
/// The CPU has AVX2 and FMA; every row and `ys` hold `k / 256` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q6k_dot4_avx2(k: usize, rows: [&[Q6kBlock]; 4], ys: &[Q8kBlock]) -> (f32, f32, f32, f32) {
    use std::arch::x86_64::*;
    // candle's `get_scale_shuffle`: scale i's byte in all sixteen lanes' eight-byte halves.
    const SHUFFLE: [u8; 128] = {
        let mut t = [0u8; 128];
        let mut i = 0;
        while i < 128 {
            t[i] = (i / 8) as u8;
            i += 1;
        }
        t
    };
    let blocks = k / 256;
    assert!(
        ys.len() >= blocks && rows.iter().all(|r| r.len() >= blocks),
        "Q6_K rows of {k}: {} token blocks",
        ys.len()
    );
    let (m4, m2, m32s) = (
        _mm256_set1_epi8(0xF),
        _mm256_set1_epi8(3),
        _mm256_set1_epi8(32),
    );
    // SAFETY: sixteen bytes from 16·i, i < 8.
    let shuffle = |i: usize| unsafe { _mm_loadu_si128(SHUFFLE.as_ptr().add(16 * i).cast()) };
    let mut acc = [_mm256_setzero_ps(); 4];
    for b in 0..blocks {
        let y = &ys[b];
        // SAFETY: 256 quants in the token's block.
        let q8: [__m256i; 8] = std::array::from_fn(|i| unsafe {
            _mm256_loadu_si256(y.qs.as_ptr().add(32 * i).cast())
        });
        let q8s = q8.map(|v| _mm256_maddubs_epi16(m32s, v));
        for (a, r) in acc.iter_mut().zip(&rows) {
            let x = &r[b];
            let d = y.d * half::f16::from_bits(x.d).to_f32();
            // SAFETY: the block's 16 scales, 128 low and 64 high bytes.
            let (scales, ql, qh) = unsafe {
                (
                    _mm_loadu_si128(x.scales.as_ptr().cast()),
                    x.ql.as_ptr(),
                    x.qh.as_ptr(),
                )
            };
            let mut sumi = _mm256_setzero_si256();
            for j in 0..2 {
                let is = j * 4;
                let sc: [__m256i; 4] = std::array::from_fn(|i| {
                    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, shuffle(is + i)))
                });
                // SAFETY: inside the block's low and high bytes (j < 2).
                let (bits1, bits2, bits_h) = unsafe {
                    (
                        _mm256_loadu_si256(ql.add(64 * j).cast()),
                        _mm256_loadu_si256(ql.add(64 * j + 32).cast()),
                        _mm256_loadu_si256(qh.add(32 * j).cast()),
                    )
                };
                let h0 = _mm256_slli_epi16(_mm256_and_si256(bits_h, m2), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits_h, 2), m2), 4);
                let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits_h, 4), m2), 4);
                let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits_h, 6), m2), 4);
                let q = [
                    _mm256_or_si256(_mm256_and_si256(bits1, m4), h0),
                    _mm256_or_si256(_mm256_and_si256(bits2, m4), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m4), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m4), h3),
                ];
                let p: [__m256i; 4] = std::array::from_fn(|i| {
                    let p16 =
                        _mm256_sub_epi16(_mm256_maddubs_epi16(q[i], q8[4 * j + i]), q8s[4 * j + i]);
                    _mm256_madd_epi16(sc[i], p16)
                });
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[0], p[1]));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[2], p[3]));
            }
            *a = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), *a);
        }
    }
    let hsum = |x: __m256| {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
    };
    (hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3]))
}

/// Four Q8_0 rows' dots with one Q8_0 token, each row's the bits of candle's
/// `avx::vec_dot_q8_0_q8_0` (what `vec_dot_4` runs for each row on an AVX2 CPU): per block the
/// row's bytes times the token's as `mul_sum_i8_pairs_float` forms them (exact integer sums,
/// exact conversions), multiply-added with the scale product `f32(d_row) · f32(d_token)` into
/// the row's one 8-lane accumulator in block order, then candle's `hsum_float_8`. Why: that
/// dot is one chain of dependent multiply-adds and two calls converting halves per block; four
/// rows interleaved are four chains, the token's block loaded and its scale converted once.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; every row and `ys` hold `k / 32` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_dot4_avx2(
    k: usize,
    rows: [&[BlockQ8_0]; 4],
    ys: &[BlockQ8_0],
) -> (f32, f32, f32, f32) {
    use std::arch::x86_64::*;
    // candle's block, field by field (its fields are not public): the scale's half bits,
    // then 32 signed quants.
    #[repr(C)]
    struct Block {
        d: u16,
        qs: [i8; 32],
    }
    const _: () = assert!(std::mem::size_of::<Block>() == std::mem::size_of::<BlockQ8_0>());
    const _: () = assert!(std::mem::align_of::<Block>() == std::mem::align_of::<BlockQ8_0>());
    // SAFETY: the same layout (repr(C) both, sizes and alignments asserted), plain data.
    let view = |b: &[BlockQ8_0]| unsafe {
        std::slice::from_raw_parts(b.as_ptr().cast::<Block>(), b.len())
    };
    let (rows, ys) = (rows.map(view), view(ys));
    let blocks = k / 32;
    assert!(
        ys.len() >= blocks && rows.iter().all(|r| r.len() >= blocks),
        "Q8_0 rows of {k}: {} token blocks",
        ys.len()
    );
    let half = |h: u16| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    for b in 0..blocks {
        let y = &ys[b];
        let dy = half(y.d);
        // SAFETY: 32 bytes of quants in each block.
        let by = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
        for (a, r) in acc.iter_mut().zip(&rows) {
            let x = &r[b];
            // SAFETY: as above.
            let bx = unsafe { _mm256_loadu_si256(x.qs.as_ptr().cast()) };
            let dot = _mm256_maddubs_epi16(_mm256_sign_epi8(bx, bx), _mm256_sign_epi8(by, bx));
            let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, dot));
            *a = _mm256_fmadd_ps(_mm256_set1_ps(half(x.d) * dy), q, *a);
        }
    }
    let hsum = |x: __m256| {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
    };
    (hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3]))
}

/// Whether the stacked products take matrix `q` times `tokens` tokens — the check [`prepare`]
/// makes, without quantizing anything. Why public: a caller with tokens to gather first asks
/// before it gathers them. What they reproduce is candle's product of *one* token, token by
/// token: where candle multiplies a prompt in other arithmetic than a single token (Q6_K, which
/// it packs for prompts only), each token's output is still its one-token product's bits.
pub fn takes(q: &QTensor, tokens: usize) -> bool {
    let Ok((n, k)) = q.shape().dims2() else {
        return false;
    };
    if !q.device().is_cpu() || k == 0 || tokens == 0 {
        return false;
    }
    if candle_repacks(q.dtype(), 1, n, k) {
        return takes_packed(q.dtype(), n);
    }
    // Float types are multiplied as dense tensors (`QMatMul::Tensor`), not here.
    !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Whether the stacked products take a `rows`-row matrix of `dtype` that candle would repack:
/// Q4_K from its compact blocks in the packed layout's arithmetic (the same for one token and
/// many); other packed layouts are candle's.
fn takes_packed(dtype: GgmlDType, rows: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return dtype == GgmlDType::Q4K
        && rows.is_multiple_of(8)
        && super::cpu_gemv::avx2_fma()
        && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, rows);
        false
    }
}

/// Whether candle packs a copy of a `rows × width` matrix of `dtype` on this CPU when it is
/// multiplied — one candle repacks that the stacked products do not take instead (on x86:
/// Q8_0 where the CPU has VNNI; on aarch64 most types). Why public: such a pack happens at a
/// matrix's first product, after the load the cache times, so the sweep's measured miss cost
/// leaves it out and has to be fitted instead (BENCHMARKS.md §19).
pub fn candle_keeps_packed_copy(dtype: GgmlDType, rows: usize, width: usize) -> bool {
    candle_repacks(dtype, 1, rows, width) && !takes_packed(dtype, rows)
}

/// Matrix `q` times the tokens `x` (whole rows of its width), prepared; None where this does
/// not reproduce what candle would do with it ([`takes`]).
fn prepare<'a>(q: &'a QTensor, x: &[f32], tokens: &mut Tokens) -> Option<Prepared<'a>> {
    let (n, k) = q.shape().dims2().ok()?;
    if k == 0 || x.is_empty() || !x.len().is_multiple_of(k) || !takes(q, x.len() / k) {
        return None;
    }
    let std::borrow::Cow::Borrowed(bytes) = q.data().ok()? else {
        return None;
    };
    #[cfg(target_arch = "x86_64")]
    if candle_repacks(q.dtype(), 1, n, k) {
        // `takes` allows only this one.
        return prepare_q4k_tiled(bytes, (n, k), x, tokens);
    }
    match q.dtype() {
        GgmlDType::Q4_0 => prepare_as::<BlockQ4_0>(bytes, (n, k), x, tokens),
        GgmlDType::Q4_1 => prepare_as::<BlockQ4_1>(bytes, (n, k), x, tokens),
        GgmlDType::Q5_0 => prepare_as::<BlockQ5_0>(bytes, (n, k), x, tokens),
        GgmlDType::Q5_1 => prepare_as::<BlockQ5_1>(bytes, (n, k), x, tokens),
        GgmlDType::Q8_0 => prepare_as::<BlockQ8_0>(bytes, (n, k), x, tokens),
        GgmlDType::Q8_1 => prepare_as::<BlockQ8_1>(bytes, (n, k), x, tokens),
        GgmlDType::Q2K => prepare_as::<BlockQ2K>(bytes, (n, k), x, tokens),
        GgmlDType::Q3K => prepare_as::<BlockQ3K>(bytes, (n, k), x, tokens),
        GgmlDType::Q4K => prepare_as::<BlockQ4K>(bytes, (n, k), x, tokens),
        GgmlDType::Q5K => prepare_as::<BlockQ5K>(bytes, (n, k), x, tokens),
        GgmlDType::Q6K => prepare_as::<BlockQ6K>(bytes, (n, k), x, tokens),
        GgmlDType::Q8K => prepare_as::<BlockQ8K>(bytes, (n, k), x, tokens),
        // Float types are multiplied as dense tensors (`QMatMul::Tensor`), not here.
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => None,
    }
}

/// A Q4_K matrix candle repacks, its rows multiplied with the arithmetic of candle's tiled
/// kernels (`repack_x86::kernels*::q4k_tile*`, the same at every x86 level): the token
/// quantized to Q8_K blocks as candle's `quantize_lhs` does; per row, per 256-value block, per
/// 32-value sub-block `s` in order, the exact integer dot `i` of the row's 4-bit quants with the
/// token's, then `acc = fma(f32(i), (d·sc_s)·d_tok, acc)` and
/// `acc = fma(−(dmin·mn_s), d_tok·(bsum_2s + bsum_2s+1), acc)` — each product rounded to f32
/// where candle rounds it, from `acc = 0`. Why not leave it to candle: candle multiplies each
/// matrix in its own trip through the pool, and a decode token's experts are many small
/// matrices that do not stay in the caches; here they share one trip and are read from the
/// compact blocks (144 bytes per 256 weights where candle's tiles take 192), the next eight rows
/// prefetched. On one matrix that fits the caches this kernel is about half as fast as candle's
/// tiled one (the compact blocks need a horizontal sum per sub-block and a scale unpack per
/// block); over a layer's experts read from memory it wins (BENCHMARKS.md §99).
#[cfg(target_arch = "x86_64")]
fn prepare_q4k_tiled<'a>(
    bytes: &'a [u8],
    (n, k): (usize, usize),
    x: &[f32],
    tokens: &mut Tokens,
) -> Option<Prepared<'a>> {
    const QK_K: usize = 256;
    if k == 0
        || !k.is_multiple_of(QK_K)
        || x.is_empty()
        || !x.len().is_multiple_of(k)
        || !n.is_multiple_of(8)
    {
        return None;
    }
    let m = x.len() / k;
    let per_row = k / QK_K;
    if bytes.len() != n * per_row * std::mem::size_of::<BlockQ4K>()
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<BlockQ4K>())
    {
        return None;
    }
    // SAFETY: as in `prepare_as`: whole aligned blocks of candle's repr(C) Q4_K struct, read
    // through a struct of the same layout.
    let blocks: &'a [Q4kBlock] =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), n * per_row) };
    let lhs = tokens.quantized::<BlockQ8K>(x, m * per_row, false);
    let lhs_tile = lhs.clone();
    let groups = n / 8;
    let unit_bytes = 8 * per_row * std::mem::size_of::<BlockQ4K>();
    // Rows 8g … 8g + 7 times token t, into the token's outputs.
    let rows_times = move |g: usize, t: usize, out: &RowsOut| {
        // SAFETY: the same layout (asserted below), plain data.
        let lhs: &[Q8kBlock] =
            unsafe { std::slice::from_raw_parts(lhs.as_ptr().cast(), lhs.len()) };
        let row = |i: usize| &blocks[(8 * g + i) * per_row..(8 * g + i + 1) * per_row];
        // SAFETY: AVX2, FMA and F16C were detected (`takes`); every row holds `per_row`
        // blocks, as does each token.
        let got = unsafe {
            q4k_tiled_rows8_avx2(
                std::array::from_fn(row),
                &lhs[t * per_row..(t + 1) * per_row],
            )
        };
        // SAFETY: the calling unit alone owns rows 8g … 8g + 7 of token t's outputs.
        unsafe { out.at(t * n + 8 * g, 8) }.copy_from_slice(&got);
    };
    let unit: Unit<'a> = if m == 1 {
        Box::new(move |g: usize, out: &RowsOut| {
            prefetch_bytes(bytes, (g + 1) * unit_bytes..(g + 2) * unit_bytes);
            rows_times(g, 0, out);
        })
    } else {
        Box::new(move |u: usize, out: &RowsOut| {
            let (tile, g) = unit_place(u, groups, m);
            prefetch_bytes(bytes, (g + 1) * unit_bytes..(g + 2) * unit_bytes);
            // SAFETY: the same layout (asserted below), plain data.
            let lhs: &[Q8kBlock] =
                unsafe { std::slice::from_raw_parts(lhs_tile.as_ptr().cast(), lhs_tile.len()) };
            let row = |i: usize| &blocks[(8 * g + i) * per_row..(8 * g + i + 1) * per_row];
            let ys: Vec<&[Q8kBlock]> = tile
                .clone()
                .map(|t| &lhs[t * per_row..(t + 1) * per_row])
                .collect();
            let mut got = [[0f32; 8]; TOKEN_TILE];
            let got = &mut got[..ys.len()];
            // SAFETY: AVX2, FMA and F16C were detected (`takes`); every row holds `per_row`
            // blocks, as does each token.
            unsafe { q4k_tiled_rows8_tokens_avx2(std::array::from_fn(row), &ys, got) };
            for (t, y) in tile.zip(got.iter()) {
                // SAFETY: unit u alone owns rows 8g … 8g + 7 of token t's outputs.
                unsafe { out.at(t * n + 8 * g, 8) }.copy_from_slice(y);
            }
        })
    };
    Some(Prepared {
        rows: n,
        width: k,
        tokens: m,
        units: groups * m.div_ceil(TOKEN_TILE),
        unit,
    })
}

/// candle's Q4_K block, field by field (its fields are not public).
#[cfg(target_arch = "x86_64")]
#[repr(C)]
struct Q4kBlock {
    d: u16,
    dmin: u16,
    scales: [u8; 12],
    qs: [u8; 128],
}
#[cfg(target_arch = "x86_64")]
const _: () = assert!(std::mem::size_of::<Q4kBlock>() == std::mem::size_of::<BlockQ4K>());
#[cfg(target_arch = "x86_64")]
const _: () = assert!(std::mem::align_of::<Q4kBlock>() == std::mem::align_of::<BlockQ4K>());

/// candle's Q8_K block, field by field.
#[cfg(target_arch = "x86_64")]
#[repr(C)]
struct Q8kBlock {
    d: f32,
    qs: [i8; 256],
    bsums: [i16; 16],
}
#[cfg(target_arch = "x86_64")]
const _: () = assert!(std::mem::size_of::<Q8kBlock>() == std::mem::size_of::<BlockQ8K>());
#[cfg(target_arch = "x86_64")]
const _: () = assert!(std::mem::align_of::<Q8kBlock>() == std::mem::align_of::<BlockQ8K>());

/// A Q4_K block's eight 6-bit scales and eight mins, one byte each (little-endian in the
/// two words), unpacked as ggml's AVX2 dot does — candle's `get_scale_min_k4` for every `j`.
#[cfg(target_arch = "x86_64")]
fn scales_and_mins_k4(s: &[u8; 12]) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    let scales_hi = (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4);
    let mins_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4);
    (
        u64::from(w0 & LOW6) | (u64::from(scales_hi) << 32),
        u64::from(w1 & LOW6) | (u64::from(mins_hi) << 32),
    )
}

/// Eight Q4_K rows' products with a Q8_K token in candle's tiled arithmetic (see
/// [`prepare_q4k_tiled`]), the rows in the eight lanes as candle's tile holds them. The
/// integer dots are exact whatever their order (4-bit times 8-bit pairs stay far inside i16, a
/// sub-block's sum inside 2^24), so they are summed here from the compact blocks; the scale
/// products and the float chain are candle's, step for step.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; every row holds as many blocks as `ys`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_tiled_rows8_avx2(rows: [&[Q4kBlock]; 8], ys: &[Q8kBlock]) -> [f32; 8] {
    use std::arch::x86_64::*;
    assert!(
        rows.iter().all(|r| r.len() == ys.len()),
        "Q4_K rows and token of different widths"
    );
    let mask = _mm256_set1_epi8(0x0F);
    let (reduce8, transpose_bytes, column) = (q4k_reduce8, q4k_transpose_bytes, q4k_column);
    let mut acc = _mm256_setzero_ps();
    for (b, y) in ys.iter().enumerate() {
        // The integer dots, [sub-block][row].
        let mut isum = [_mm256_setzero_ps(); 8];
        for c in 0..4 {
            // SAFETY: 256 quants in the token's block, 128 bytes in each row's.
            let (a_lo, a_hi) = unsafe {
                (
                    _mm256_loadu_si256(y.qs.as_ptr().add(64 * c).cast()),
                    _mm256_loadu_si256(y.qs.as_ptr().add(64 * c + 32).cast()),
                )
            };
            let mut lo = [_mm256_setzero_si256(); 8];
            let mut hi = [_mm256_setzero_si256(); 8];
            for r in 0..8 {
                // SAFETY: as above.
                let w = unsafe { _mm256_loadu_si256(rows[r][b].qs.as_ptr().add(32 * c).cast()) };
                lo[r] = _mm256_maddubs_epi16(_mm256_and_si256(w, mask), a_lo);
                hi[r] = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), mask), a_hi);
            }
            isum[2 * c] = reduce8(lo);
            isum[2 * c + 1] = reduce8(hi);
        }
        // Each row's d and dmin (exact widenings), its scales and mins by sub-block.
        let halves = |f: fn(&Q4kBlock) -> u16| {
            let h: [u16; 8] = std::array::from_fn(|r| f(&rows[r][b]));
            // SAFETY: eight u16 read from an array of eight.
            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(h.as_ptr().cast()) })
        };
        let (d, dmin) = (halves(|x| x.d), halves(|x| x.dmin));
        let packed: [(u64, u64); 8] =
            std::array::from_fn(|r| scales_and_mins_k4(&rows[r][b].scales));
        let scales = transpose_bytes(packed.map(|p| p.0));
        let mins = transpose_bytes(packed.map(|p| p.1));
        let dall = _mm256_set1_ps(y.d);
        for (s, &isum) in isum.iter().enumerate() {
            // candle's d·sc and dmin·mn, as its packing rounds them.
            let scale = _mm256_mul_ps(d, column(&scales, s));
            let min = _mm256_mul_ps(dmin, column(&mins, s));
            let bsum = (i32::from(y.bsums[2 * s]) + i32::from(y.bsums[2 * s + 1])) as f32;
            acc = _mm256_fmadd_ps(isum, _mm256_mul_ps(scale, dall), acc);
            acc = _mm256_fnmadd_ps(min, _mm256_set1_ps(y.d * bsum), acc);
        }
    }
    let mut out = [0f32; 8];
    // SAFETY: eight lanes into eight floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

/// [Σ v[0], …, Σ v[7]] as floats: each vector's sixteen pair sums added. Exact in i16 up to the
/// two lanes' halves (a pair is at most 2·15·128, eight of them 30,720 < 2^15), in i32 after.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn q4k_reduce8(v: [std::arch::x86_64::__m256i; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let g0 = _mm256_hadd_epi16(_mm256_hadd_epi16(v[0], v[1]), _mm256_hadd_epi16(v[2], v[3]));
    let g1 = _mm256_hadd_epi16(_mm256_hadd_epi16(v[4], v[5]), _mm256_hadd_epi16(v[6], v[7]));
    let f = _mm256_hadd_epi16(g0, g1);
    _mm256_cvtepi32_ps(_mm256_add_epi32(
        _mm256_cvtepi16_epi32(_mm256_castsi256_si128(f)),
        _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(f)),
    ))
}

/// Eight rows' bytes (one u64 a row) to [column pair][row]: byte s of every row in the low half
/// of result s / 2 for even s, the high half for odd.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn q4k_transpose_bytes(r: [u64; 8]) -> [std::arch::x86_64::__m128i; 4] {
    use std::arch::x86_64::*;
    let v = |i: usize| _mm_cvtsi64_si128(r[i] as i64);
    let t01 = _mm_unpacklo_epi8(v(0), v(1));
    let t23 = _mm_unpacklo_epi8(v(2), v(3));
    let t45 = _mm_unpacklo_epi8(v(4), v(5));
    let t67 = _mm_unpacklo_epi8(v(6), v(7));
    let (u0, u1) = (_mm_unpacklo_epi16(t01, t23), _mm_unpackhi_epi16(t01, t23));
    let (v0, v1) = (_mm_unpacklo_epi16(t45, t67), _mm_unpackhi_epi16(t45, t67));
    [
        _mm_unpacklo_epi32(u0, v0),
        _mm_unpackhi_epi32(u0, v0),
        _mm_unpacklo_epi32(u1, v1),
        _mm_unpackhi_epi32(u1, v1),
    ]
}

/// Column s of the transposed bytes as eight floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn q4k_column(w: &[std::arch::x86_64::__m128i; 4], s: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let pair = w[s / 2];
    let bytes = if s.is_multiple_of(2) {
        pair
    } else {
        _mm_srli_si128::<8>(pair)
    };
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes))
}

/// [`q4k_tiled_rows8_avx2`] for several tokens: the same steps for each token, so each token's
/// eight outputs are that kernel's bits, but the rows' 4-bit quants split into bytes and their
/// scales, mins and scale products formed once a block for all the tokens. Why: on a prompt the
/// same rows meet up to a tile of tokens; decoding them again for each token made Q4_K prompts
/// 0.66–0.84× candle's packed tiles (BENCHMARKS.md §101, §102).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; every row holds as many blocks as each token.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_tiled_rows8_tokens_avx2(
    rows: [&[Q4kBlock]; 8],
    ys: &[&[Q8kBlock]],
    out: &mut [[f32; 8]],
) {
    use std::arch::x86_64::*;
    assert!(
        out.len() == ys.len() && ys.iter().all(|y| rows.iter().all(|r| r.len() == y.len())),
        "Q4_K rows and tokens of different widths"
    );
    let mask = _mm256_set1_epi8(0x0F);
    let blocks = rows[0].len();
    let mut acc = vec![_mm256_setzero_ps(); ys.len()];
    for b in 0..blocks {
        // The rows' quants as bytes: [sub-block pair c][low or high][row].
        let mut q = [[[_mm256_setzero_si256(); 8]; 2]; 4];
        for (c, qc) in q.iter_mut().enumerate() {
            for r in 0..8 {
                // SAFETY: 128 bytes in each row's block.
                let w = unsafe { _mm256_loadu_si256(rows[r][b].qs.as_ptr().add(32 * c).cast()) };
                qc[0][r] = _mm256_and_si256(w, mask);
                qc[1][r] = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
            }
        }
        let halves = |f: fn(&Q4kBlock) -> u16| {
            let h: [u16; 8] = std::array::from_fn(|r| f(&rows[r][b]));
            // SAFETY: eight u16 read from an array of eight.
            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(h.as_ptr().cast()) })
        };
        let (d, dmin) = (halves(|x| x.d), halves(|x| x.dmin));
        let packed: [(u64, u64); 8] =
            std::array::from_fn(|r| scales_and_mins_k4(&rows[r][b].scales));
        let scales = q4k_transpose_bytes(packed.map(|p| p.0));
        let mins = q4k_transpose_bytes(packed.map(|p| p.1));
        // candle's d·sc and dmin·mn, as its packing rounds them.
        let scale: [__m256; 8] = std::array::from_fn(|s| _mm256_mul_ps(d, q4k_column(&scales, s)));
        let min: [__m256; 8] = std::array::from_fn(|s| _mm256_mul_ps(dmin, q4k_column(&mins, s)));
        for (a, y) in acc.iter_mut().zip(ys) {
            let y = &y[b];
            let mut isum = [_mm256_setzero_ps(); 8];
            for (c, qc) in q.iter().enumerate() {
                // SAFETY: 256 quants in the token's block.
                let (a_lo, a_hi) = unsafe {
                    (
                        _mm256_loadu_si256(y.qs.as_ptr().add(64 * c).cast()),
                        _mm256_loadu_si256(y.qs.as_ptr().add(64 * c + 32).cast()),
                    )
                };
                isum[2 * c] = q4k_reduce8(qc[0].map(|w| _mm256_maddubs_epi16(w, a_lo)));
                isum[2 * c + 1] = q4k_reduce8(qc[1].map(|w| _mm256_maddubs_epi16(w, a_hi)));
            }
            let dall = _mm256_set1_ps(y.d);
            for (s, &isum) in isum.iter().enumerate() {
                let bsum = (i32::from(y.bsums[2 * s]) + i32::from(y.bsums[2 * s + 1])) as f32;
                *a = _mm256_fmadd_ps(isum, _mm256_mul_ps(scale[s], dall), *a);
                *a = _mm256_fnmadd_ps(min[s], _mm256_set1_ps(y.d * bsum), *a);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: eight lanes into eight floats.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
    }
}

/// Whether candle 0.11's `QMatMul::forward` of `m` rows would multiply this matrix in its
/// repacked, tiled layout (different arithmetic from `k_quants::matmul`) — its rule
/// (`repack_x86::select`, `repack::PackedKind::select` on aarch64) read as conservatively as
/// it can be from outside: any doubt counts as a repack, which only sends the matrix back to
/// candle's own product.
fn candle_repacks(dtype: GgmlDType, m: usize, n: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let vnni512 = has!("avx512f") && has!("avx512vnni");
        let vnni = has!("avxvnni") && has!("avx2");
        let avx2 = has!("avx2") && has!("fma");
        if !(vnni512 || vnni || avx2) || !n.is_multiple_of(16) || !k.is_multiple_of(256) {
            return false;
        }
        match dtype {
            GgmlDType::Q4K => true,
            // Candle packs Q8_0 where it has a dot of unsigned by signed bytes (VNNI).
            GgmlDType::Q8_0 => vnni512 || vnni,
            // Q6_K is packed for prompts only (m > 1); the others never.
            GgmlDType::Q6K => m > 1,
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // aarch64 repacks by its own rules; elsewhere nothing is known: candle's product.
        let _ = (dtype, m, n, k);
        true
    }
}

/// Matrix e of `mats` times its own token `x(e)` (its width), every row in one trip through the
/// pool; the outputs in matrix order, each `[rows]` with the bits of `QMatMul::forward` on
/// `x(e)` as a `[1, width]` f32 tensor. None where any matrix is not one this takes (candle
/// repacks it, a float type, not on the CPU, a token of the wrong width): the caller then uses
/// candle's products.
pub fn stacked_gemv<'a>(
    mats: &[&QTensor],
    x: impl Fn(usize) -> &'a [f32],
) -> Option<Vec<Vec<f32>>> {
    if !one_token_each(mats, &x) {
        return None;
    }
    stacked_product(mats, x)
}

/// `q` times `x` (f32 rows of q's width, any leading dims) on the CPU, each row the bits
/// `QMatMul::forward` gives for that row alone, the output shaped as x with q's rows last —
/// without candle's packed copy of the matrix. Why: candle multiplies some block types by
/// tiles it packs from the matrix on first use and keeps for the matrix's life (on x86 Q4_K
/// always, Q6_K for prompts, Q8_0 on CPUs with VNNI); a Q4_K copy is 4/3 of the matrix's
/// bytes, so a native Q4_K_M model grew by that much of its Q4_K bytes once prompts had
/// touched its experts, and a selective cache held more than it budgeted (BENCHMARKS.md
/// §101). A matrix the stacked product takes ([`takes`]) goes there; anything else is
/// candle's product as it is (Q8_0 on a VNNI CPU, and aarch64, where candle packs most types,
/// keep candle's copies). Packing a transient copy for each prompt product instead cost the
/// `engine` preset's Q4_K_M prefill 4× (§101).
pub fn product(
    q: &candle_core::quantized::QMatMul,
    x: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::Module;
    use candle_core::quantized::QMatMul;
    let QMatMul::QTensor(t) = q else {
        return q.forward(x);
    };
    let (n, k) = t.shape().dims2()?;
    if !t.device().is_cpu() || !x.device().is_cpu() || k == 0 || x.dims().last() != Some(&k) {
        return q.forward(x);
    }
    let m = x.elem_count() / k;
    let shaped = |y: Vec<f32>| {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        candle_core::Tensor::from_vec(y, dims, x.device())
    };
    if x.dtype() == candle_core::DType::F32 && takes(t, m) {
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        if let Some(mut ys) = stacked_product(&[t.as_ref()], |_| &xs) {
            return shaped(ys.remove(0));
        }
    }
    q.forward(x)
}

/// Whether every matrix takes exactly one token (a decode step's product).
fn one_token_each<'a>(mats: &[&QTensor], x: &impl Fn(usize) -> &'a [f32]) -> bool {
    let k = |e: usize| mats[e].shape().dims2().map_or(0, |(_, k)| k);
    (0..mats.len()).all(|e| x(e).len() == k(e))
}

/// Matrix e of `mats` times its own tokens `x(e)` (whole rows of its width, one or more), every
/// row of every matrix in one trip through the pool; the outputs in matrix order, each
/// `[tokens, rows]` row-major with the bits of `QMatMul::forward` on `x(e)` as a `[tokens,
/// width]` f32 tensor. Why for prompts: the routed experts of a prompt's layer each take a few
/// of its tokens, and candle multiplied each in its own trip, quantizing its tokens again, with
/// the row dot that is one dependent chain on an AVX2 CPU (BENCHMARKS.md §100). None where any
/// matrix is not one this takes: the caller then uses candle's products.
pub fn stacked_product<'a>(
    mats: &[&QTensor],
    x: impl Fn(usize) -> &'a [f32],
) -> Option<Vec<Vec<f32>>> {
    let mut tokens = Tokens::default();
    let prepared: Vec<Prepared> = mats
        .iter()
        .enumerate()
        .map(|(e, q)| prepare(q, x(e), &mut tokens))
        .collect::<Option<_>>()?;
    Some(
        run(prepared.into_iter().map(Some).collect())
            .into_iter()
            .flatten()
            .collect(),
    )
}

/// [`stacked_product`] of the matrices it takes, each output None where it does not take that
/// matrix (the caller multiplies that one with candle). Why: a prompt's Q4_K_M experts mix
/// matrices this takes (Q4_K) with ones candle repacks for prompts (Q6_K).
pub fn stacked_each<'a>(
    mats: &[&QTensor],
    x: impl Fn(usize) -> &'a [f32],
) -> Vec<Option<Vec<f32>>> {
    let mut tokens = Tokens::default();
    let prepared = mats
        .iter()
        .enumerate()
        .map(|(e, q)| prepare(q, x(e), &mut tokens))
        .collect();
    run(prepared)
}

/// The prepared matrices' products, all their units in one trip through the pool.
fn run(prepared: Vec<Option<Prepared>>) -> Vec<Option<Vec<f32>>> {
    let mut starts = Vec::with_capacity(prepared.len() + 1);
    starts.push(0usize);
    for p in &prepared {
        starts.push(starts[starts.len() - 1] + p.as_ref().map_or(0, |p| p.units));
    }
    let total = starts[prepared.len()];
    let mut outs: Vec<Option<Vec<f32>>> = prepared
        .iter()
        .map(|p| p.as_ref().map(|p| vec![0f32; p.tokens * p.rows]))
        .collect();
    let ptrs: Vec<RowsOut> = outs
        .iter_mut()
        .map(|o| RowsOut(o.as_mut().map_or(std::ptr::null_mut(), |o| o.as_mut_ptr())))
        .collect();
    let run = |range: std::ops::Range<usize>| {
        for u in range {
            // The matrix whose units hold u: the last start at or before it (a matrix left
            // out has no units, so its start equals the next one's).
            let e = starts.partition_point(|&s| s <= u) - 1;
            if let Some(p) = &prepared[e] {
                // Each unit writes only its own rows of its own tokens (`Unit`).
                (p.unit)(u - starts[e], &ptrs[e]);
            }
        }
    };
    let work: usize = prepared
        .iter()
        .flatten()
        .map(|p| p.tokens * p.rows * p.width)
        .sum();
    // As `cpu_gemv::rows_product` decides for one token: small work is not worth the pool.
    if work < 1 << 15 {
        run(0..total);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(total, run);
    }
    outs
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    fn matrix(rows: usize, cols: usize, seed: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) * 1e-3)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// `QMatMul::forward` of one token, as the model runs it.
    fn candles_product(q: impl Into<Arc<QTensor>>, x: &[f32]) -> Vec<f32> {
        candles_rows(q, x, 1)
    }

    /// `QMatMul::forward` of `m` tokens (`x`'s rows), as candle runs a prompt.
    fn candles_rows(q: impl Into<Arc<QTensor>>, x: &[f32], m: usize) -> Vec<f32> {
        let x = Tensor::from_vec(x.to_vec(), (m, x.len() / m), &Device::Cpu).unwrap();
        let y = QMatMul::from_arc(q.into()).unwrap().forward(&x).unwrap();
        y.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Every block type, shapes with and without a tail of one to three rows, each matrix's
    /// own token: the stacked outputs are `QMatMul::forward`'s bits.
    #[test]
    fn stacked_rows_are_candles_products_bit_for_bit() {
        let types = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ];
        for dtype in types {
            for shapes in [
                &[(64usize, 256usize), (64, 256), (64, 256)][..],
                &[(35, 512), (6, 512), (1, 512), (130, 512)],
                &[(512, 256)],
                // candle repacks the first (rows a multiple of 16) and not the second.
                &[(48, 768), (35, 768), (16, 256)],
            ] {
                let qs: Vec<QTensor> = shapes
                    .iter()
                    .enumerate()
                    .map(|(s, &(r, c))| QTensor::quantize(&matrix(r, c, s), dtype).unwrap())
                    .collect();
                let xs: Vec<Vec<f32>> = shapes
                    .iter()
                    .enumerate()
                    .map(|(s, &(_, c))| {
                        (0..c)
                            .map(|i| (((i * 31 + s * 17) % 97) as f32 - 48.0) * 0.013)
                            .collect()
                    })
                    .collect();
                let refs: Vec<&QTensor> = qs.iter().collect();
                let got = stacked_gemv(&refs, |e| &xs[e]);
                let Some(got) = got else {
                    // Only a matrix candle repacks on this CPU, in a layout other than Q4_K's
                    // (or Q4_K without AVX2), is refused.
                    assert!(
                        shapes.iter().any(|&(r, c)| candle_repacks(dtype, 1, r, c)),
                        "{dtype:?} {shapes:?} refused"
                    );
                    #[cfg(target_arch = "x86_64")]
                    assert!(
                        dtype != GgmlDType::Q4K
                            || !crate::model::cpu_gemv::avx2_fma()
                            || !std::arch::is_x86_feature_detected!("f16c"),
                        "{dtype:?} {shapes:?} refused"
                    );
                    continue;
                };
                for (e, q) in qs.into_iter().enumerate() {
                    let same = same_bits(&candles_product(q, &xs[e]), &got[e]);
                    assert!(same, "{dtype:?} matrix {e} {:?}", shapes[e]);
                }
            }
        }
    }

    /// Matrices of several block types sharing one token (quantized once per vec-dot type) and
    /// one with a token of its own: each output is still `QMatMul::forward`'s bits.
    #[test]
    fn a_shared_token_gives_each_matrix_candles_bits() {
        let kinds = [
            (GgmlDType::Q4_0, 40),
            (GgmlDType::Q8_0, 24),
            (GgmlDType::Q4_1, 40),
            (GgmlDType::Q6K, 40),
            (GgmlDType::Q5K, 24),
            (GgmlDType::Q8_0, 40),
        ];
        let qs: Vec<QTensor> = kinds
            .iter()
            .enumerate()
            .map(|(s, &(dtype, rows))| QTensor::quantize(&matrix(rows, 512, s), dtype).unwrap())
            .collect();
        let shared: Vec<f32> = (0..512).map(|i| ((i % 89) as f32 - 44.0) * 0.021).collect();
        let own: Vec<f32> = (0..512).map(|i| ((i % 53) as f32 - 26.0) * 0.017).collect();
        let token = |e: usize| if e == 5 { &own } else { &shared };
        let refs: Vec<&QTensor> = qs.iter().collect();
        let Some(got) = stacked_gemv(&refs, |e| token(e)) else {
            // Only where candle repacks Q8_0 (a VNNI CPU).
            assert!(
                candle_repacks(GgmlDType::Q8_0, 1, 40, 512)
                    || candle_repacks(GgmlDType::Q8_0, 1, 24, 512)
            );
            return;
        };
        for (e, q) in qs.into_iter().enumerate() {
            let same = same_bits(&candles_product(q, token(e)), &got[e]);
            assert!(same, "matrix {e} {:?}", kinds[e]);
        }
    }

    /// Every block type, each matrix with its own number of tokens — one, a few, and more than
    /// one tile (`TOKEN_TILE`) with a part tile after it — rows with and without a tail: each
    /// token's outputs are the bits of `QMatMul::forward` on that token alone, and, but for
    /// Q6_K where candle packs prompts into other arithmetic, of `QMatMul::forward` on all the
    /// tokens at once. A unit writing another token's or row's place, or a kernel rounding once
    /// differently, fails it.
    #[test]
    fn stacked_prompts_are_candles_products_bit_for_bit() {
        let types = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ];
        // (rows, width, tokens)
        let mats = [
            (35usize, 512usize, 3usize),
            (64, 256, 1),
            (48, 768, 37),
            (6, 512, 16),
        ];
        for dtype in types {
            for pick in [&[0usize, 1, 2, 3][..], &[0, 3], &[2]] {
                let shapes: Vec<(usize, usize, usize)> = pick.iter().map(|&i| mats[i]).collect();
                let qs: Vec<Arc<QTensor>> = shapes
                    .iter()
                    .enumerate()
                    .map(|(s, &(r, c, _))| {
                        Arc::new(QTensor::quantize(&matrix(r, c, s + 3), dtype).unwrap())
                    })
                    .collect();
                let xs: Vec<Vec<f32>> = shapes
                    .iter()
                    .enumerate()
                    .map(|(s, &(_, c, m))| {
                        (0..c * m)
                            .map(|i| (((i * 37 + s * 11) % 101) as f32 - 50.0) * 0.011)
                            .collect()
                    })
                    .collect();
                let refs: Vec<&QTensor> = qs.iter().map(|q| q.as_ref()).collect();
                let Some(got) = stacked_product(&refs, |e| &xs[e]) else {
                    let refused = |&(r, c, m): &(usize, usize, usize)| {
                        let q = QTensor::quantize(&matrix(r, c, 0), dtype).unwrap();
                        !takes(&q, m)
                    };
                    assert!(shapes.iter().any(refused), "{dtype:?} {shapes:?} refused");
                    // Only a layout candle packs for one token, other than Q4_K's.
                    assert!(
                        shapes
                            .iter()
                            .any(|&(r, c, _)| candle_repacks(dtype, 1, r, c)),
                        "{dtype:?} {shapes:?} refused"
                    );
                    continue;
                };
                for (e, q) in qs.into_iter().enumerate() {
                    let (r, c, m) = shapes[e];
                    let whole =
                        (dtype != GgmlDType::Q6K).then(|| candles_rows(q.clone(), &xs[e], m));
                    for t in 0..m {
                        let alone = candles_product(q.clone(), &xs[e][t * c..(t + 1) * c]);
                        let ours = &got[e][t * r..(t + 1) * r];
                        assert!(
                            same_bits(&alone, ours),
                            "{dtype:?} matrix {e} {:?} token {t}",
                            shapes[e]
                        );
                    }
                    if let Some(whole) = whole {
                        assert!(
                            same_bits(&whole, &got[e]),
                            "{dtype:?} matrix {e} {:?}",
                            shapes[e]
                        );
                    }
                }
            }
        }
    }

    /// `takes` says what `prepare` does, for every type, one token and several — so a caller
    /// that asks first gathers tokens only for a product that will run.
    #[test]
    fn takes_answers_as_prepare_does() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::F16,
        ] {
            for (r, c) in [(48usize, 768usize), (35, 512), (16, 256)] {
                let q = QTensor::quantize(&matrix(r, c, 1), dtype).unwrap();
                for m in [1usize, 3, 17] {
                    let x = vec![0.25f32; m * c];
                    let prepared = prepare(&q, &x, &mut Tokens::default()).is_some();
                    assert_eq!(takes(&q, m), prepared, "{dtype:?} {r}x{c} m={m}");
                }
                // A block matrix candle packs is exactly one its products repack that the
                // stacked products do not take: what the sweep asks before fitting a miss.
                let packs = candle_keeps_packed_copy(dtype, r, c);
                let float = dtype == GgmlDType::F16;
                assert_eq!(
                    packs,
                    !float && candle_repacks(dtype, 1, r, c) && !takes(&q, 1),
                    "{dtype:?} {r}x{c}"
                );
                #[cfg(target_arch = "x86_64")]
                if dtype == GgmlDType::Q4K && crate::model::cpu_gemv::avx2_fma() {
                    // Taken from its compact blocks wherever AVX2 is (BENCHMARKS.md §101).
                    assert!(!packs, "{r}x{c}");
                }
            }
        }
    }

    #[test]
    fn a_token_of_the_wrong_width_or_a_float_matrix_is_left_to_candle() {
        let q = QTensor::quantize(&matrix(8, 256, 0), GgmlDType::Q5K).unwrap();
        let x = vec![0.5f32; 128];
        assert!(stacked_gemv(&[&q], |_| &x).is_none());
        let f = QTensor::quantize(&matrix(8, 256, 0), GgmlDType::F16).unwrap();
        let x = vec![0.5f32; 256];
        assert!(stacked_gemv(&[&f], |_| &x).is_none());
        assert_eq!(stacked_gemv(&[], |_| &x), Some(vec![]));
    }
}
