//! A prompt's routed experts on the GPU as two grouped matrix products (cuBLAS
//! `cublasGemmGroupedBatchedEx`): the prompt's (token, expert) pairs sorted by expert, each
//! expert's tokens gathered into consecutive rows, then one product per expert for gate_up and
//! one for down — every expert's in one call each.
//!
//! Why not candle's MoE GEMM (`candle_nn::moe::moe_gemm`, 16×16 wmma tiles): on an H200 it ran a
//! 4,000-token prompt's experts (12 layers of Qwen3-30B-A3B's geometry) at ~20 TFLOP/s, more than
//! half of the prefill's time (BENCHMARKS.md §54). cuBLAS picks tiles for each expert's shape.
//!
//! The arithmetic is transformers' per-expert loop: `down(silu(gate(x)) · up(x))` rounded to the
//! compute dtype at each product, times the routing weight (rounded), the token's k results
//! summed. Native passes its full stacks, selective its slot pool with ids remapped to slots —
//! the same products on the same bytes, so the two stay bit-identical.

use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
use candle_core::{DType, Device, Tensor};

use super::error::{ModelError, Result};

fn err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Input(format!("grouped MoE GEMM ({what}): {e}"))
}

/// Σ over each token's `k` routed experts of weight · expert(x): `x` [T, H]; `gate_up_w`
/// [E, 2I, H] and `down_w` [E, H, I] stacks (bf16, f16 or f32, x's dtype); `experts` the expert
/// ids each token routes to and `rows` where each one's weights are in the stacks, token-major
/// (T · k of each, on the host; an expert id always at the same row); `topk_w` [T, k] f32
/// routing weights. Returns [T, H] in x's dtype. The pairs are grouped by expert id, so a slot
/// pool (rows in another order) gets the products of the full stacks.
pub fn moe_grouped(
    x: &Tensor,
    gate_up_w: &Tensor,
    down_w: &Tensor,
    experts: &[u32],
    rows: &[u32],
    topk_w: &Tensor,
    k: usize,
) -> Result<Tensor> {
    let (t, h) = x.dims2()?;
    let (e, two_i, h_gu) = gate_up_w.dims3()?;
    let (e_d, h_d, i) = down_w.dims3()?;
    let dtype = x.dtype();
    if h_gu != h || h_d != h || e_d != e || two_i != 2 * i {
        return Err(err(
            "shapes",
            format!(
                "x [{t}, {h}], gate_up {:?}, down {:?}: expected [E, 2I, {h}] and [E, {h}, I]",
                gate_up_w.dims(),
                down_w.dims()
            ),
        ));
    }
    if gate_up_w.dtype() != dtype || down_w.dtype() != dtype {
        return Err(err("dtypes", "stacks and activations must share a dtype"));
    }
    if experts.len() != t * k || rows.len() != t * k {
        return Err(err(
            "ids",
            format!(
                "{} experts and {} rows for {t} tokens × {k}",
                experts.len(),
                rows.len()
            ),
        ));
    }
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= e) {
        return Err(err("ids", format!("row {bad} of a stack of {e}")));
    }
    let dev = x.device();

    // Pairs sorted by expert (stable: within an expert, token order).
    let mut order: Vec<u32> = (0..(t * k) as u32).collect();
    order.sort_by_key(|&p| experts[p as usize]);
    let mut inverse = vec![0u32; t * k];
    for (at, &p) in order.iter().enumerate() {
        inverse[p as usize] = at as u32;
    }
    // (stack row, first sorted pair, pairs) per expert used.
    let mut groups: Vec<(usize, usize, usize)> = Vec::new();
    let mut last_expert = None;
    for (at, &p) in order.iter().enumerate() {
        let (expert, row) = (experts[p as usize], rows[p as usize] as usize);
        match groups.last_mut() {
            Some(g) if last_expert == Some(expert) => {
                if g.0 != row {
                    return Err(err(
                        "ids",
                        format!("expert {expert} at rows {} and {row}", g.0),
                    ));
                }
                g.2 += 1
            }
            _ => groups.push((row, at, 1)),
        }
        last_expert = Some(expert);
    }
    let n = t * k;
    let tokens: Vec<u32> = order.iter().map(|&p| p / k as u32).collect();
    let tokens = Tensor::from_vec(tokens, n, dev)?;
    let xs = x.contiguous()?.index_select(&tokens, 0)?; // [P, H]
    let gate_up_w = gate_up_w.contiguous()?;
    let down_w = down_w.contiguous()?;

    let gu = Tensor::zeros((n, two_i), dtype, dev)?;
    grouped_products(&gate_up_w, &xs, &gu, &groups, two_i, h, dev)?;
    let g = gu.narrow(1, 0, i)?;
    let u = gu.narrow(1, i, i)?;
    let mid = (super::layers::silu(&g.contiguous()?)? * u.contiguous()?)?.contiguous()?;
    let y = Tensor::zeros((n, h), dtype, dev)?;
    grouped_products(&down_w, &mid, &y, &groups, h, i, dev)?;

    let order = Tensor::from_vec(order, n, dev)?;
    let w = topk_w
        .flatten_all()?
        .index_select(&order, 0)?
        .to_dtype(dtype)?
        .unsqueeze(1)?;
    let y = y.broadcast_mul(&w)?;
    let inverse = Tensor::from_vec(inverse, n, dev)?;
    Ok(y.index_select(&inverse, 0)?.reshape((t, k, h))?.sum(1)?)
}

/// For each (stack row r, first row a, rows m) of `groups`: out[a..a+m] = inp[a..a+m] · W_rᵀ,
/// W = `w` [E, n_out, n_in] row-major, inp [P, n_in], out [P, n_out], all contiguous, one
/// cuBLAS call. In cuBLAS's column-major terms each product is outᵀ (n_out × m) = W_r (stored
/// n_in × n_out, so transposed) · inpᵀ (n_in × m).
fn grouped_products(
    w: &Tensor,
    inp: &Tensor,
    out: &Tensor,
    groups: &[(usize, usize, usize)],
    n_out: usize,
    n_in: usize,
    dev: &Device,
) -> Result<()> {
    if groups.is_empty() {
        return Ok(());
    }
    let esize = w.dtype().size_in_bytes();
    let data_type = match w.dtype() {
        DType::BF16 => cublas::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => cublas::cudaDataType_t::CUDA_R_16F,
        DType::F32 => cublas::cudaDataType_t::CUDA_R_32F,
        other => return Err(err("dtype", format!("{other:?} is not bf16, f16 or f32"))),
    };
    let addr = |t: &Tensor| -> Result<u64> {
        super::raw::device_range(t, 0, t.elem_count() * esize)
            .map(|(a, _)| a)
            .map_err(|e| err("address", e))
    };
    let (wa, ia, oa) = (addr(w)?, addr(inp)?, addr(out)?);
    let count = groups.len();
    let mut ptrs: Vec<i64> = Vec::with_capacity(3 * count);
    ptrs.extend(
        groups
            .iter()
            .map(|&(r, _, _)| (wa + (r * n_out * n_in * esize) as u64) as i64),
    );
    ptrs.extend(
        groups
            .iter()
            .map(|&(_, a, _)| (ia + (a * n_in * esize) as u64) as i64),
    );
    ptrs.extend(
        groups
            .iter()
            .map(|&(_, a, _)| (oa + (a * n_out * esize) as u64) as i64),
    );
    // The pointer arrays live on the device; the tensor keeps them alive until the call is
    // queued, and candle frees device memory in stream order.
    let ptrs_dev = Tensor::from_vec(ptrs, 3 * count, dev)?;
    let pa = super::raw::device_range(&ptrs_dev, 0, 3 * count * 8)
        .map_err(|e| err("pointer array", e))?
        .0;

    let ta = vec![cublas::cublasOperation_t::CUBLAS_OP_T; count];
    let tb = vec![cublas::cublasOperation_t::CUBLAS_OP_N; count];
    let ms = vec![n_out as i32; count];
    let ns: Vec<i32> = groups.iter().map(|&(_, _, m)| m as i32).collect();
    let ks = vec![n_in as i32; count];
    let alphas = vec![1f32; count];
    let betas = vec![0f32; count];
    let ldas = vec![n_in as i32; count];
    let ldbs = vec![n_in as i32; count];
    let ldcs = vec![n_out as i32; count];
    let sizes = vec![1i32; count];
    let Device::Cuda(cuda) = dev else {
        return Err(err("device", "not a CUDA device"));
    };
    let blas = cuda.cublas_handle();
    // SAFETY: every pointer addresses a whole matrix inside its tensor (rows a..a+m of P, a
    // stack row below E: checked by the caller), the arrays hold `count` entries each, and the
    // handle runs on candle's stream, where the tensors were written.
    let status = unsafe {
        cublas::cublasGemmGroupedBatchedEx(
            *blas.handle(),
            ta.as_ptr(),
            tb.as_ptr(),
            ms.as_ptr(),
            ns.as_ptr(),
            ks.as_ptr(),
            alphas.as_ptr().cast(),
            pa as *const *const std::ffi::c_void,
            data_type,
            ldas.as_ptr(),
            (pa + (count * 8) as u64) as *const *const std::ffi::c_void,
            data_type,
            ldbs.as_ptr(),
            betas.as_ptr().cast(),
            (pa + (2 * count * 8) as u64) as *const *mut std::ffi::c_void,
            data_type,
            ldcs.as_ptr(),
            count as i32,
            sizes.as_ptr(),
            cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        )
    };
    if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(err("cublasGemmGroupedBatchedEx", format!("{status:?}")));
    }
    drop(ptrs_dev);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::gpu_test::{device, host};

    /// Stacks and a prompt in `dtype` on `dev`, their values on the host, `t` tokens routed to
    /// `k` of `e` experts each (skewed: expert 0 takes many, the last two none).
    #[allow(clippy::type_complexity)]
    fn case(
        t: usize,
        dtype: DType,
        dev: &Device,
    ) -> (
        (Tensor, Tensor, Tensor, Tensor),
        (Vec<f32>, Vec<f32>, Vec<f32>),
        Vec<u32>,
        Vec<f32>,
    ) {
        let (e, h, i, k) = (16, 64, 32, 4);
        let make = |rows, cols, seed, m, scale| {
            let m = crate::util::test_matrix(rows, cols, seed, m, scale)
                .to_dtype(dtype)
                .unwrap();
            let values = host(&m);
            (m.to_device(dev).unwrap(), values)
        };
        let (gu, gu_h) = make(e * 2 * i, h, 1, 251, 1.0 / 64.0);
        let (dn, dn_h) = make(e * h, i, 2, 241, 1.0 / 64.0);
        let (x, x_h) = make(t, h, 3, 239, 1.0 / 16.0);
        // Expert 0 in every token, then three distinct ones of 1..=13; 14 and 15 unused.
        let experts: Vec<u32> = (0..t)
            .flat_map(|r| {
                [
                    0,
                    1 + (r * 5) % 13,
                    1 + (r * 5 + 4) % 13,
                    1 + (r * 5 + 9) % 13,
                ]
            })
            .map(|x| x as u32)
            .collect();
        assert_eq!(experts.len(), t * k);
        let w: Vec<f32> = (0..t * k)
            .map(|j| half::bf16::from_f32(0.1 + (j % 7) as f32 / 32.0).to_f32())
            .collect();
        let wt = Tensor::from_vec(w.clone(), (t, k), dev).unwrap();
        (
            (
                x,
                gu.reshape((e, 2 * i, h)).unwrap(),
                dn.reshape((e, h, i)).unwrap(),
                wt,
            ),
            (x_h, gu_h, dn_h),
            experts,
            w,
        )
    }

    /// transformers' expert loop in f64: Σ_s w_s · down_e(silu(gate_e x) · up_e x).
    fn reference(
        (x, gu, dn): &(Vec<f32>, Vec<f32>, Vec<f32>),
        experts: &[u32],
        w: &[f32],
        t: usize,
    ) -> Vec<f64> {
        let (h, i, k) = (64, 32, 4);
        let mut y = vec![0f64; t * h];
        for r in 0..t {
            for s in 0..k {
                let e = experts[r * k + s] as usize;
                let dot = |row: &[f32], xs: &[f64]| -> f64 {
                    row.iter().zip(xs).map(|(&a, &b)| a as f64 * b).sum()
                };
                let xr: Vec<f64> = x[r * h..(r + 1) * h].iter().map(|&v| v as f64).collect();
                let mid: Vec<f64> = (0..i)
                    .map(|j| {
                        let g = dot(&gu[(e * 2 * i + j) * h..][..h], &xr);
                        let u = dot(&gu[(e * 2 * i + i + j) * h..][..h], &xr);
                        g / (1.0 + (-g).exp()) * u
                    })
                    .collect();
                for c in 0..h {
                    y[r * h + c] += w[r * k + s] as f64 * dot(&dn[(e * h + c) * i..][..i], &mid);
                }
            }
        }
        y
    }

    #[test]
    fn grouped_products_are_the_expert_loop_in_f32_and_bf16() {
        let Some(dev) = device("grouped MoE GEMM") else {
            return;
        };
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            for t in [1, 2, 37, 300] {
                let ((x, gu, dn, wt), values, experts, w) = case(t, dtype, &dev);
                let got = moe_grouped(&x, &gu, &dn, &experts, &experts, &wt, 4).unwrap();
                assert_eq!(got.dims(), [t, 64]);
                assert_eq!(got.dtype(), dtype);
                let got = host(&got);
                let want = reference(&values, &experts, &w, t);
                let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                assert!(
                    scale > 0.01,
                    "a test whose outputs are all ~0 shows nothing"
                );
                for (j, (&g, &r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - r).abs() <= tol * scale,
                        "{dtype:?} t {t} [{j}]: {g} vs {r} (scale {scale})"
                    );
                }
            }
        }
    }

    #[test]
    fn a_slot_pool_in_another_order_gets_the_stacks_bits() {
        let Some(dev) = device("grouped MoE GEMM") else {
            return;
        };
        let t = 300;
        let ((x, gu, dn, wt), _, experts, _) = case(t, DType::BF16, &dev);
        let full = moe_grouped(&x, &gu, &dn, &experts, &experts, &wt, 4).unwrap();
        // Slots in reverse order, one spare: expert e at slot 16 - e.
        let slot_of = |e: u32| 16 - e;
        let order: Vec<u32> = (0..17).map(|s| if s == 0 { 3 } else { 16 - s }).collect();
        let order = Tensor::from_vec(order, 17, &dev).unwrap();
        let (pool_gu, pool_dn) = (
            gu.index_select(&order, 0).unwrap(),
            dn.index_select(&order, 0).unwrap(),
        );
        let rows: Vec<u32> = experts.iter().map(|&e| slot_of(e)).collect();
        let pooled = moe_grouped(&x, &pool_gu, &pool_dn, &experts, &rows, &wt, 4).unwrap();
        assert_eq!(crate::util::f32_bits(&full), crate::util::f32_bits(&pooled));
        // An expert at two rows is a caller's error, named.
        let mut bad = rows.clone();
        bad[4] = 0; // expert 0's pair at the spare slot
        let e = moe_grouped(&x, &pool_gu, &pool_dn, &experts, &bad, &wt, 4).unwrap_err();
        assert!(e.to_string().contains("expert 0 at rows"), "{e}");
    }
}
