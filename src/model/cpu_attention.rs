//! Attention on the CPU over the f32 KV cache (`KvCache::append_token_major`): one decode token
//! ([`attend_one`]) and a prompt ([`attend_prompt`]).
//!
//! Why not candle's `flash_attn` for this case: its one-token path walks the positions once with
//! an online softmax — per position a scalar `exp`, a rescale of the head's accumulator and a
//! 64-wide multiply-add — which made attention about 40 % of a bundled-model decode step at
//! ~150 positions (`perf`, BENCHMARKS.md §48). Here each head takes two passes: its scores
//! (vectorised dots with the cached keys) and their softmax, then the values weighted by the
//! probabilities, one `axpy` per position. Same arithmetic as the reference definition
//! (softmax(q·kᵀ·scale)·v in f32), different rounding order from candle's online form: the tests
//! compare with a direct f64 evaluation, not bit for bit with candle.

use candle_core::{DType, Device, Storage, Tensor};

/// The attention of one query row through [`decode_f32`]: `q` [1, 1, nh, d] (after RoPE, any
/// float dtype), `k` and `v` [total, nkv, d] f32 as the cache returns them; the context
/// [1, nh·d] f32. `None` where these are not CPU tensors of those shapes (the caller then runs
/// candle's attention).
pub fn attend_one(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    let (&[1, 1, nh, d], &[total, nkv, dk]) = (q.dims(), k.dims()) else {
        return Ok(None);
    };
    if !q.device().is_cpu()
        || dk != d
        || v.dims() != k.dims()
        || nkv == 0
        || total == 0
        || !nh.is_multiple_of(nkv)
    {
        return Ok(None);
    }
    let qv = super::cpu_gemv::widened(q)?;
    let out = with_f32(k, |kv| {
        with_f32(v, |vv| decode_f32(&qv, kv, vv, nh, nkv, d, total, scale))
    })?;
    match out.transpose()?.flatten() {
        Some(out) => Ok(Some(Tensor::from_vec(out, (1, nh * d), &Device::Cpu)?)),
        None => Ok(None),
    }
}

/// Query rows a prompt's attention takes in one product per kv head (bounds the score matrix:
/// rows × group × visible positions f32).
const PROMPT_ROWS: usize = 256;

/// A prompt's attention on the CPU: `q` [1, T, nh, d] (after RoPE, any float dtype) for the
/// positions offset..offset+T, `k` and `v` [offset + T, nkv, d] f32 as the cache returns them;
/// the context [T, nh·d] f32. Per kv head and chunk of query rows, the scores of the group's
/// query heads as one matrix product with the keys the chunk can see, the causal mask and
/// softmax in one pass a row ([`causal_softmax`]), and the weighted values as a second product
/// — where candle's `flash_attn` walked every (query, key) pair with a scalar online softmax (48 %
/// of a 2,048-token CPU prefill, its `exp` 16 % more: BENCHMARKS.md §52). `None` where these are not CPU tensors of those shapes.
pub fn attend_prompt(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    offset: usize,
) -> candle_core::Result<Option<Tensor>> {
    let (&[1, t, nh, d], &[total, nkv, dk]) = (q.dims(), k.dims()) else {
        return Ok(None);
    };
    if !q.device().is_cpu()
        || dk != d
        || v.dims() != k.dims()
        || k.dtype() != DType::F32
        || v.dtype() != DType::F32
        || nkv == 0
        || t == 0
        || total != offset + t
        || !nh.is_multiple_of(nkv)
    {
        return Ok(None);
    }
    let group = nh / nkv;
    let q = q.to_dtype(DType::F32)?.reshape((t, nh, d))?;
    let mut heads = Vec::with_capacity(nkv);
    for g in 0..nkv {
        // Rows ordered (token, query head of the group).
        let qg = q
            .narrow(1, g * group, group)?
            .contiguous()?
            .reshape((t * group, d))?;
        let kg = k.narrow(1, g, 1)?.squeeze(1)?.contiguous()?;
        let vg = v.narrow(1, g, 1)?.squeeze(1)?.contiguous()?;
        let mut parts = Vec::with_capacity(t.div_ceil(PROMPT_ROWS));
        for t0 in (0..t).step_by(PROMPT_ROWS) {
            let n = PROMPT_ROWS.min(t - t0);
            // The chunk's last row sees positions 0..offset + t0 + n; no row sees past them.
            let seen = offset + t0 + n;
            let qc = qg.narrow(0, t0 * group, n * group)?;
            let scores = qc.matmul(&kg.narrow(0, 0, seen)?.t()?)?;
            let mut p = scores.flatten_all()?.to_vec1::<f32>()?;
            causal_softmax(&mut p, group, seen, offset + t0, scale);
            let probs = Tensor::from_vec(p, (n * group, seen), &Device::Cpu)?;
            parts.push(probs.matmul(&vg.narrow(0, 0, seen)?)?);
        }
        heads.push(Tensor::cat(&parts, 0)?.reshape((t, group, d))?);
    }
    Ok(Some(Tensor::cat(&heads, 1)?.reshape((t, nh * d))?))
}

/// Rows of q·kᵀ (`seen` wide, `group` rows a token, the chunk's first token at position
/// `first`) into probabilities in place: row r's token sees positions 0..=first + r / group;
/// softmax of scale · score over those, 0 past them — the scaling, the causal mask and candle's
/// softmax in one pass a row, and no `exp` of a masked score. Rows are shared out over candle's
/// CPU pool when there are enough of them.
fn causal_softmax(p: &mut [f32], group: usize, seen: usize, first: usize, scale: f32) {
    let rows = p.len() / seen;
    let out = super::cpu_gemv::RowsOut(p.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        for r in range {
            // SAFETY: rows are handed out once each.
            let row = unsafe { out.at(r * seen, seen) };
            let visible = (first + r / group + 1).min(seen);
            let (live, masked) = row.split_at_mut(visible);
            let mut m = f32::NEG_INFINITY;
            for x in live.iter_mut() {
                *x *= scale;
                m = m.max(*x);
            }
            let sum = exp_shifted_sum(live, m);
            for x in live.iter_mut() {
                *x /= sum;
            }
            masked.fill(0.0);
        }
    };
    if rows * seen < 1 << 15 {
        run(0..rows);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(rows, run);
    }
}

/// `xs[i] = exp(xs[i] - m)`, summed: each softmax row's exponentials in place (every
/// `xs[i] - m` ≤ 0), their sum returned. Eight at a time where the CPU has AVX2 and FMA
/// ([`exp_avx2`], within 2 ulp of the exact value; values below e⁻⁸⁷·³ become 0, NaN stays NaN);
/// libm's `exp` for the rest. Why: the softmaxes' scalar `exp` was 12–16 % of a long CPU prefill
/// (BENCHMARKS.md §53).
fn exp_shifted_sum(xs: &mut [f32], m: f32) -> f32 {
    let mut done = 0;
    let mut sum = 0f32;
    #[cfg(target_arch = "x86_64")]
    if super::cpu_gemv::avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        (done, sum) = unsafe { exp_avx2(xs, m) };
    }
    for x in &mut xs[done..] {
        *x = (*x - m).exp();
        sum += *x;
    }
    sum
}

/// [`exp_shifted_sum`] over the whole groups of eight: how many it did and their sum (eight
/// partial sums, added in lane order at the end). exp(x) = 2ⁿ · p(r) with n = round(x / ln 2),
/// r = x − n·ln 2 (ln 2 in two parts) and p Cephes' degree-7 polynomial for `expf`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(xs: &mut [f32], m: f32) -> (usize, f32) {
    use std::arch::x86_64::*;
    let n = xs.len() / 8 * 8;
    let mv = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    let lo = _mm256_set1_ps(-87.336_54);
    let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
    let ln2_hi = _mm256_set1_ps(0.693_359_4);
    let ln2_lo = _mm256_set1_ps(-2.121_944_4e-4);
    let c = [
        1.987_569_1e-4f32,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
    let one = _mm256_set1_ps(1.0);
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 ≤ n ≤ xs.len().
        let x = _mm256_sub_ps(unsafe { _mm256_loadu_ps(xs.as_ptr().add(i)) }, mv);
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
        let xc = _mm256_max_ps(x, lo);
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, log2e),
        );
        let r = _mm256_fnmadd_ps(k, ln2_lo, _mm256_fnmadd_ps(k, ln2_hi, xc));
        let mut p = _mm256_set1_ps(c[0]);
        for &ci in &c[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(ci));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), one);
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(k),
            _mm256_set1_epi32(127),
        )));
        let e = _mm256_andnot_ps(tiny, _mm256_mul_ps(y, pow2));
        let e = _mm256_blendv_ps(e, x, nan);
        // SAFETY: as the load.
        unsafe { _mm256_storeu_ps(xs.as_mut_ptr().add(i), e) };
        acc = _mm256_add_ps(acc, e);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: eight floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    (n, lanes.iter().sum())
}

/// `f` over a contiguous f32 CPU tensor's values, borrowed in place; `None` for any other.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<Option<R>> {
    let Some((a, b)) = t.layout().contiguous_offsets() else {
        return Ok(None);
    };
    if t.dtype() != DType::F32 {
        return Ok(None);
    }
    let (guard, _) = t.storage_and_layout();
    match &*guard {
        Storage::Cpu(c) => Ok(Some(f(&c.as_slice::<f32>()?[a..b]))),
        _ => Ok(None),
    }
}

/// `out[h]` = softmax_j(q[h] · k[j, g] · scale) · v[j, g] for each query head h of `nh` (kv head
/// g = h / (nh / nkv)), over the `total` cached positions; q [nh, d], k and v [total, nkv, d],
/// out [nh, d]. Heads are shared out over candle's CPU pool when the work is large enough to pay
/// for a trip through it.
#[allow(clippy::too_many_arguments)]
pub fn decode_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    nh: usize,
    nkv: usize,
    d: usize,
    total: usize,
    scale: f32,
) -> Vec<f32> {
    assert!(
        nkv > 0 && nh.is_multiple_of(nkv),
        "{nh} query heads over {nkv} kv heads"
    );
    assert!(q.len() >= nh * d && k.len() >= total * nkv * d && v.len() >= total * nkv * d);
    let mut out = vec![0f32; nh * d];
    let out_at = super::cpu_gemv::RowsOut(out.as_mut_ptr());
    let group = nh / nkv;
    // Work items are kv heads, each taking its group's query heads together so that a cached
    // row is read once for all of them (a group of 8 on Qwen3-30B-A3B read it 8 times) — or,
    // with one kv head, query heads, so that both threads work.
    let by_group = nkv > 1;
    let run = |items: std::ops::Range<usize>| {
        let mut p: Vec<Vec<f32>> = vec![Vec::with_capacity(total); group];
        for item in items {
            let (g, heads) = if by_group {
                (item, item * group..(item + 1) * group)
            } else {
                (item / group, item..item + 1)
            };
            // SAFETY: items are handed out once each and their heads are disjoint, so each
            // head's d outputs are written by one item only.
            let mut outs: Vec<&mut [f32]> = heads
                .clone()
                .map(|h| unsafe { out_at.at(h * d, d) })
                .collect();
            let qs: Vec<&[f32]> = heads.map(|h| &q[h * d..(h + 1) * d]).collect();
            heads_of_group(&qs, k, v, g, nkv, d, total, scale, &mut p, &mut outs);
        }
    };
    let items = if by_group { nkv } else { nh };
    // About what one product of the row kernels keeps on the calling thread (cpu_gemv).
    if nh * total * d < 1 << 15 {
        run(0..items);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, run);
    }
    out
}

/// Query heads `qs` against kv head `g`: each head's scores, their softmax and its weighted
/// values into its `outs` row — each head's arithmetic in the order one head alone takes it, the
/// heads interleaved only so that each cached row is read once for all of them.
#[allow(clippy::too_many_arguments)]
#[inline]
fn heads_of_group(
    qs: &[&[f32]],
    k: &[f32],
    v: &[f32],
    g: usize,
    nkv: usize,
    d: usize,
    total: usize,
    scale: f32,
    p: &mut [Vec<f32>],
    outs: &mut [&mut [f32]],
) {
    let n = qs.len();
    let mut m = [f32::NEG_INFINITY; MAX_GROUP];
    let m = &mut m[..n.min(MAX_GROUP)];
    if n > MAX_GROUP {
        // Larger groups than any model here: one head at a time.
        for (i, (qh, o)) in qs.iter().zip(outs.iter_mut()).enumerate() {
            heads_of_group(
                &[qh],
                k,
                v,
                g,
                nkv,
                d,
                total,
                scale,
                &mut p[i..i + 1],
                &mut [o],
            );
        }
        return;
    }
    for pi in p.iter_mut().take(n) {
        pi.clear();
    }
    for kr in k
        .chunks_exact(nkv * d)
        .take(total)
        .map(|r| &r[g * d..(g + 1) * d])
    {
        for i in 0..n {
            let s = dot(qs[i], kr) * scale;
            m[i] = m[i].max(s);
            p[i].push(s);
        }
    }
    let mut sums = [0f32; MAX_GROUP];
    for i in 0..n {
        sums[i] = exp_shifted_sum(&mut p[i], m[i]);
        outs[i].fill(0.0);
    }
    let v_rows = v
        .chunks_exact(nkv * d)
        .take(total)
        .map(|r| &r[g * d..(g + 1) * d]);
    for (j, vr) in v_rows.enumerate() {
        for i in 0..n {
            let w = p[i][j];
            // A multiply and an add (not `mul_add`: without FMA in the build's target features
            // that is a library call per element); each element on its own, so it vectorises.
            for (a, &x) in outs[i].iter_mut().zip(vr) {
                *a += w * x;
            }
        }
    }
    for i in 0..n {
        for a in outs[i].iter_mut() {
            *a /= sums[i];
        }
    }
}

/// Query heads a kv head's group takes together (Qwen3-30B-A3B: 8).
const MAX_GROUP: usize = 16;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_gemv::avx2_fma() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { super::cpu_gemv::dot_f32_avx2(a, b) };
    }
    super::cpu_gemv::dot_with(a, b, |x| x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each prompt row is the definition over the positions it sees (offset + its index + 1),
    /// within f32 rounding — across the chunks of query rows and with and without a cached
    /// prefix.
    #[test]
    fn prompt_attention_is_the_definition_row_by_row() {
        for (nh, nkv, d, t, offset) in [
            (4, 2, 64, 1, 0),
            (4, 2, 64, 7, 0),
            (8, 2, 32, PROMPT_ROWS + 9, 5),
            (6, 3, 7, 3, 40),
            (4, 4, 16, 2 * PROMPT_ROWS + 1, 0),
        ] {
            let total = offset + t;
            let q = values(t * nh * d, 11);
            let k = values(total * nkv * d, 12);
            let v = values(total * nkv * d, 13);
            let scale = 1.0 / (d as f32).sqrt();
            let qt = Tensor::from_vec(q.clone(), (1, t, nh, d), &Device::Cpu).unwrap();
            let kt = Tensor::from_vec(k.clone(), (total, nkv, d), &Device::Cpu).unwrap();
            let vt = Tensor::from_vec(v.clone(), (total, nkv, d), &Device::Cpu).unwrap();
            let got = attend_prompt(&qt, &kt, &vt, scale, offset)
                .unwrap()
                .expect("a CPU prompt of these shapes");
            assert_eq!(got.dims(), [t, nh * d]);
            let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
            let vmax = v.iter().fold(0f32, |a, b| a.max(b.abs())) as f64;
            for (ti, row) in got.iter().enumerate() {
                let seen = offset + ti + 1;
                let qr = &q[ti * nh * d..(ti + 1) * nh * d];
                let n = seen * nkv * d;
                let want = reference(qr, &k[..n], &v[..n], nh, nkv, d, seen, scale);
                for (i, (&g, &w)) in row.iter().zip(&want).enumerate() {
                    assert!(
                        g.is_finite() && (g as f64 - w).abs() <= 2e-5 * vmax,
                        "({nh}, {nkv}, {d}, t {t}, offset {offset}) row {ti} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
        // Not a prompt over this cache: declined, the caller runs candle's attention.
        let q = Tensor::zeros((1, 3, 4, 8), DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::zeros((5, 2, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(attend_prompt(&q, &k, &k, 1.0, 1).unwrap().is_none());
        let k16 = k.to_dtype(DType::F16).unwrap();
        assert!(attend_prompt(&q, &k16, &k16, 1.0, 2).unwrap().is_none());
    }

    /// The softmax exponentials within 2 ulp of exp's exact value over the whole range a
    /// shifted score takes (and its sum), 0 below e⁻⁸⁷·³ (libm's subnormals in the scalar tail),
    /// 0 for -inf, NaN for NaN — in the eight-wide groups and in the tail alike.
    #[test]
    fn shifted_exponentials_are_exp_within_two_ulp() {
        let m = 3.25f32;
        let mut xs: Vec<f32> = (0..20_000).map(|i| m - i as f32 * 0.0045).collect();
        xs.extend([
            m,
            m - 1e-7,
            m - 87.0,
            m - 87.3,
            m - 87.5,
            m - 103.0,
            f32::NEG_INFINITY,
        ]);
        xs.extend([m - 0.5, f32::NAN, m - 2.0, m - 1.0, m]); // a NaN inside a group of eight
        xs.extend([m - 0.25, m - 0.75, m - 3.0]); // and a tail
        let want: Vec<f64> = xs.iter().map(|&x| (x as f64 - m as f64).exp()).collect();
        let mut got = xs.clone();
        let sum = exp_shifted_sum(&mut got, m);
        let mut want_sum = 0f64;
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if xs[i].is_nan() {
                assert!(g.is_nan(), "[{i}] NaN in, {g} out");
                continue;
            }
            want_sum += w;
            if w < f32::MIN_POSITIVE as f64 {
                assert!(
                    g >= 0.0 && (g as f64) < f32::MIN_POSITIVE as f64,
                    "[{i}] {g} vs {w}"
                );
            } else {
                let ulp = (w as f32).abs() * f32::EPSILON;
                assert!(
                    ((g as f64) - w).abs() <= 2.0 * ulp as f64,
                    "[{i}] x-m {}: {g} vs {w}",
                    xs[i] - m
                );
            }
        }
        assert!(sum.is_nan(), "a NaN among them makes the sum NaN");
        let mut clean: Vec<f32> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
        let s = exp_shifted_sum(&mut clean, m) as f64;
        assert!(
            (s - want_sum).abs() <= 1e-5 * want_sum,
            "sum {s} vs {want_sum}"
        );
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// softmax(q·kᵀ·scale)·v per head in f64, straight from the definition.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        nh: usize,
        nkv: usize,
        d: usize,
        total: usize,
        scale: f32,
    ) -> Vec<f64> {
        let mut out = vec![0f64; nh * d];
        for h in 0..nh {
            let g = h / (nh / nkv);
            let s: Vec<f64> = (0..total)
                .map(|j| {
                    (0..d)
                        .map(|i| q[h * d + i] as f64 * k[(j * nkv + g) * d + i] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..d {
                out[h * d + i] = (0..total)
                    .map(|j| e[j] * v[(j * nkv + g) * d + i] as f64)
                    .sum::<f64>()
                    / sum;
            }
        }
        out
    }

    /// Against the definition in f64, within a few f32 roundings of the largest value, for
    /// grouped and ungrouped heads, one position and many, head widths that are no multiple of
    /// the dot's 32 (its tail), and sizes on both sides of the pool threshold.
    #[test]
    fn decode_attention_is_the_definition_within_f32_rounding() {
        for (nh, nkv, d, total) in [
            (4, 2, 64, 1),
            (4, 2, 64, 150),
            (8, 8, 40, 33),
            (16, 4, 128, 700),
            (6, 3, 7, 5),
        ] {
            let q = values(nh * d, 1);
            let k = values(total * nkv * d, 2);
            let v = values(total * nkv * d, 3);
            let scale = 1.0 / (d as f32).sqrt();
            let got = decode_f32(&q, &k, &v, nh, nkv, d, total, scale);
            let want = reference(&q, &k, &v, nh, nkv, d, total, scale);
            let vmax = v.iter().fold(0f32, |a, b| a.max(b.abs())) as f64;
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.is_finite(),
                    "({nh}, {nkv}, {d}, {total}) [{i}] not finite"
                );
                // Scores of |s| up to ~d·4·scale: each exp relative error ~1e-6 of the weights.
                let tol = 2e-5 * vmax;
                assert!(
                    (g as f64 - w).abs() <= tol,
                    "({nh}, {nkv}, {d}, {total}) [{i}]: {g} vs {w}"
                );
            }
        }
    }

    /// Through tensors: q in a half type after RoPE, the cache's f32 k and v; anything that is
    /// not that shape (or an empty cache) is left to candle's attention.
    #[test]
    fn attend_one_takes_the_caches_tensors_and_declines_other_shapes() {
        let (nh, nkv, d, total) = (4, 2, 16, 9);
        let qv = values(nh * d, 4);
        let (kv, vv) = (values(total * nkv * d, 5), values(total * nkv * d, 6));
        let q = Tensor::from_vec(qv.clone(), (1, 1, nh, d), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let k = Tensor::from_vec(kv.clone(), (total, nkv, d), &Device::Cpu).unwrap();
        let v = Tensor::from_vec(vv.clone(), (total, nkv, d), &Device::Cpu).unwrap();
        let got = attend_one(&q, &k, &v, 0.25).unwrap().expect("applies");
        assert_eq!(got.dims(), [1, nh * d]);
        let q16: Vec<f32> = q
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = decode_f32(&q16, &kv, &vv, nh, nkv, d, total, 0.25);
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        // Two query rows, a cache of another width, an empty cache: not this kernel's case.
        let q2 = Tensor::zeros((1, 2, nh, d), DType::F32, &Device::Cpu).unwrap();
        assert!(attend_one(&q2, &k, &v, 0.25).unwrap().is_none());
        let k8 = Tensor::zeros((total, nkv, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(attend_one(&q, &k8, &k8, 0.25).unwrap().is_none());
        let e = Tensor::zeros((0, nkv, d), DType::F32, &Device::Cpu).unwrap();
        assert!(attend_one(&q, &e, &e, 0.25).unwrap().is_none());
        // A cache in f16 (not what the KV cache holds on the CPU): declined, not converted.
        let k16 = k.to_dtype(DType::F16).unwrap();
        assert!(attend_one(&q, &k16, &k16, 0.25).unwrap().is_none());
    }

    /// One position: the output is that position's value row, whatever the score.
    #[test]
    fn one_position_gives_its_value_row() {
        let (nh, nkv, d) = (4, 2, 16);
        let q = values(nh * d, 7);
        let k = values(nkv * d, 8);
        let v = values(nkv * d, 9);
        let out = decode_f32(&q, &k, &v, nh, nkv, d, 1, 0.25);
        for h in 0..nh {
            let g = h / 2;
            assert_eq!(&out[h * d..(h + 1) * d], &v[g * d..(g + 1) * d], "head {h}");
        }
    }
}
