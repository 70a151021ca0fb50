//! One MoE block, as HF's `Qwen3MoeSparseMoeBlock` computes it: router logits in the compute
//! dtype, softmax in f32 over *all* experts, top-k, optional renormalisation in f32, weights cast
//! to the compute dtype, then experts applied in ascending expert order and summed into a zero
//! tensor. Expert weights come from an [`ExpertProvider`]; on a GPU the fused path routes on the
//! device and runs one kernel over stacked weights (native's full stacks or selective's slots).

use candle_core::{DType, Tensor};

use super::error::{ModelError, Result};
use super::ports::{ExpertProvider, MatRef, RoutingObserver, StackFormat};

/// Routing of MoE layers kept on the device — (layer, ids u32 `[T, k]`, weights f32 `[T, k]`) —
/// until the forward ends, when every layer is read back with one copy instead of one
/// device→host synchronisation per layer (and inside a captured CUDA graph, not at all).
pub type DeviceRouting = Vec<(usize, Tensor, Tensor)>;

/// The router of one MoE layer. Expert weights are *not* here: they come from the provider.
#[derive(Debug, Clone)]
pub(super) struct MoeBlock {
    pub layer: usize,
    pub router: Tensor,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// moescope's MoE kernels on the GPU ([`DecodeOptions::moe_kernel`]): one token's decode
    /// kernels, a prompt's grouped products (`moe_grouped`); off, candle's MoE GEMM for both.
    pub moe_kernel: bool,
    /// The fused router's block counter (a zero u32 on the GPU, made at load: not inside a
    /// graph capture); None on the CPU.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub router_arrived: Option<Tensor>,
}

/// A token's routing decision in one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Softmax over all experts (f32), masked experts excluded, then top-k (ties to the lower index)
/// and optional renormalisation — HF's `Qwen3MoeTopKRouter`.
pub fn route(logits: &[f32], masked: &[usize], top_k: usize, norm_topk_prob: bool) -> Route {
    let mut l = logits.to_vec();
    for &m in masked {
        if let Some(v) = l.get_mut(m) {
            *v = f32::NEG_INFINITY;
        }
    }
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = l.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let probs: Vec<f32> = exps.iter().map(|e| e / sum).collect();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(top_k);
    let mut weights: Vec<f32> = order.iter().map(|&i| probs[i]).collect();
    if norm_topk_prob {
        let s: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
    }
    Route {
        experts: order.into_iter().map(|i| i as u32).collect(),
        weights,
    }
}

/// Fewest prompt tokens whose experts run as cuBLAS grouped products (`moe_grouped`) rather
/// than candle's MoE GEMM (BENCHMARKS.md §54).
#[cfg(feature = "cuda")]
const GROUPED_MIN_TOKENS: usize = 2;

/// Whether a prompt of `t` tokens takes `moe_grouped`: on a GPU, past [`GROUPED_MIN_TOKENS`].
#[cfg(feature = "cuda")]
fn grouped_applies(t: usize, x: &Tensor) -> bool {
    t >= GROUPED_MIN_TOKENS
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16 | DType::F32)
}

/// Most (token, expert) pairs one `sort_last_dim` on the GPU takes: 8,192 u32 in shared memory.
const SORT_MAX: usize = 8192;

/// [`moe_gemm_tokens`] over a prompt of any length. candle's GPU sort keeps a row in one block's
/// shared memory (its length padded to a power of two, 4 bytes each, within the 48 KiB a launch
/// gets — past it the launch fails), so a prompt routing more than [`SORT_MAX`] (token, expert)
/// pairs runs in chunks of tokens. Each output row is its own token's, so the chunks give the
/// bits of one launch (a GPU unit test says so).
fn moe_gemm_chunked(
    x: &Tensor,
    gate_up_w: &Tensor,
    down_w: &Tensor,
    ids: &Tensor,
    topk_w: &Tensor,
    k: usize,
) -> Result<Tensor> {
    let t = x.dim(0)?;
    let chunk = (SORT_MAX / k.max(1)).max(1);
    if t <= chunk {
        return moe_gemm_tokens(x, gate_up_w, down_w, ids, topk_w, k);
    }
    let mut ys = Vec::with_capacity(t.div_ceil(chunk));
    for t0 in (0..t).step_by(chunk) {
        let n = chunk.min(t - t0);
        ys.push(moe_gemm_tokens(
            &x.narrow(0, t0, n)?,
            gate_up_w,
            down_w,
            &ids.narrow(0, t0, n)?,
            &topk_w.narrow(0, t0, n)?,
            k,
        )?);
    }
    Ok(Tensor::cat(&ys, 0)?)
}

/// `t` as a tensor whose elements start its storage, row-major: candle's MoE GEMM reads its
/// inputs from their storage's first element whatever their layout says (a chunk of a prompt,
/// `narrow`ed, would be read as the prompt's first rows).
fn from_start(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t.clone())
    } else {
        Ok(t.force_contiguous()?)
    }
}

/// Σ over each token's `k` routed experts of weight · expert(x) through candle's MoE GEMM:
/// `x` [T, H]; `ids` [T, k] rows of the stacks; `topk_w` [T, k] f32. Returns [T, H].
fn moe_gemm_tokens(
    x: &Tensor,
    gate_up_w: &Tensor,
    down_w: &Tensor,
    ids: &Tensor,
    topk_w: &Tensor,
    k: usize,
) -> Result<Tensor> {
    let (t, h) = x.dims2()?;
    let (expert_ids, sorted_token_ids) = ids.flatten_all()?.sort_last_dim(true)?;
    let is_prefill = t > 1;
    let (x, gate_up_w, down_w) = (from_start(x)?, from_start(gate_up_w)?, from_start(down_w)?);
    let gate_up = candle_nn::moe::moe_gemm(
        &x,
        &gate_up_w,
        &None,
        &sorted_token_ids,
        &expert_ids,
        k,
        is_prefill,
    )?;
    let i = gate_up.dim(1)? / 2;
    let g = gate_up.narrow(1, 0, i)?.contiguous()?;
    let u = gate_up.narrow(1, i, i)?.contiguous()?;
    let mid = (super::layers::silu(&g)? * u)?.contiguous()?;
    Ok(candle_nn::moe::moe_gemm(
        &mid,
        &down_w,
        &Some(from_start(topk_w)?),
        &sorted_token_ids,
        &expert_ids,
        k,
        is_prefill,
    )?
    .reshape((t, k, h))?
    .sum(1)?)
}

impl MoeBlock {
    /// The GPU path: routing on the device (f32 softmax over all experts, top-k, renormalised,
    /// weights rounded to the compute dtype as HF does) and both projections through candle's
    /// fused MoE kernel over stacked weights. Native passes its full stacks; selective passes
    /// its slot pool with expert ids remapped to slots — the same kernel on the same weights, so
    /// the two stay bit-identical. None when the provider has no stacked form.
    fn forward_fused(
        &self,
        x: &Tensor,
        residual: &Tensor,
        offset: usize,
        experts: &dyn ExpertProvider,
        observer: &mut dyn RoutingObserver,
        sink: Option<&mut DeviceRouting>,
    ) -> Result<Option<Tensor>> {
        let t = x.dim(0)?;
        let k = self.top_k;
        let dev = x.device();
        let num_experts = self.router.dim(0)?;
        let masked = experts.unavailable(self.layer);
        let (topk_ids, topk_w) = match self.route_on_device(x, t, masked)? {
            Some(r) => r,
            None => {
                let mut logits = x.matmul(&self.router.t()?)?.to_dtype(DType::F32)?;
                if !masked.is_empty() {
                    let mut m = vec![0f32; num_experts];
                    for &e in masked {
                        m[e] = f32::NEG_INFINITY;
                    }
                    logits = logits.broadcast_add(&Tensor::from_vec(m, num_experts, dev)?)?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&logits)?;
                let topk_ids = probs
                    .arg_sort_last_dim(false)?
                    .narrow(1, 0, k)?
                    .contiguous()?;
                let mut topk_w = probs.gather(&topk_ids, 1)?;
                if self.norm_topk_prob {
                    topk_w = topk_w.broadcast_div(&topk_w.sum_keepdim(1)?)?;
                }
                let topk_w = topk_w
                    .to_dtype(x.dtype())?
                    .to_dtype(DType::F32)?
                    .contiguous()?;
                (topk_ids, topk_w)
            }
        };
        // Selective must see the ids now (they decide what to load); an observer can wait for
        // the end of the forward when a sink collects the routing on the device.
        let observe_now =
            observer.wants_routing() && (sink.is_none() || experts.needs_ids_on_host());
        let host_ids: Option<Vec<Vec<u32>>> = if observe_now || experts.needs_ids_on_host() {
            Some(topk_ids.to_vec2()?)
        } else {
            None
        };
        if let (Some(ids), true) = (&host_ids, observe_now) {
            let w: Vec<Vec<f32>> = topk_w.to_vec2()?;
            for (i, (row, wr)) in ids.iter().zip(&w).enumerate() {
                observer.on_routing(self.layer, offset + i, row, wr);
            }
        } else if let (Some(sink), true) = (sink, observer.wants_routing()) {
            sink.push((self.layer, topk_ids.clone(), topk_w.clone()));
        }
        let needed: Vec<usize> = match &host_ids {
            Some(ids) => {
                let mut v: Vec<usize> = ids.iter().flatten().map(|&e| e as usize).collect();
                v.sort_unstable();
                v.dedup();
                v
            }
            None => Vec::new(),
        };
        experts.will_use(self.layer, &needed);
        let Some(st) = experts.stacked(self.layer, &needed)? else {
            return Ok(None);
        };
        // FP8 and GGUF stacks have no candle decode kernel: moescope's run whatever
        // `moe_kernel` says.
        #[cfg(feature = "cuda")]
        let decode_kernel = super::moe_decode::applies(t, x.dtype(), k)
            && (self.moe_kernel || st.fp8.is_some() || st.ggml.is_some());
        // A short prompt over FP8 or GGUF stacks: the same kernels, a token at a time in one
        // launch, rather than every routed expert dequantised (`moe_decode::PROMPT_TOKENS`).
        #[cfg(feature = "cuda")]
        let prompt_kernel = super::moe_decode::prompt_applies(t, x.dtype(), k)
            && (st.fp8.is_some() || st.ggml.is_some());
        // A slot pool's device table and the decode kernels: they look slots up themselves.
        #[cfg(feature = "cuda")]
        if let (Some(map), true) = (&st.device_index, decode_kernel) {
            fill_slots(&st, &topk_ids)?;
            return Ok(Some(super::moe_decode::moe_decode(
                x,
                &st.gate_up,
                &st.down,
                &topk_ids,
                Some(map),
                &topk_w,
                Some(residual),
                st.format(),
            )?));
        }
        let ids = match (&st.index, &host_ids) {
            _ if st.device_index.is_some() => {
                let map = st.device_index.as_ref().expect("checked");
                #[cfg(feature = "cuda")]
                fill_slots(&st, &topk_ids)?;
                map.index_select(&topk_ids.flatten_all()?, 0)?
                    .reshape((t, k))?
            }
            (None, _) => topk_ids.clone(),
            (Some(map), Some(ids)) => {
                let flat: Vec<u32> = ids.iter().flatten().map(|&e| map[e as usize]).collect();
                Tensor::from_vec(flat, (t, k), dev)?
            }
            (Some(_), None) => {
                return Err(ModelError::Input(
                    "stacked experts need host routing ids".into(),
                ));
            }
        };
        #[cfg(feature = "cuda")]
        if decode_kernel || prompt_kernel {
            return Ok(Some(super::moe_decode::moe_decode(
                x,
                &st.gate_up,
                &st.down,
                &ids,
                None,
                &topk_w,
                Some(residual),
                st.format(),
            )?));
        }
        // FP8 and GGUF stacks outside the decode kernels (a long prompt's tokens): the routed
        // experts dequantised into a bf16 stack, then candle's MoE GEMM as for bf16.
        let (gate_up_w, down_w, ids) = match st.format() {
            StackFormat::Dense => (st.gate_up.clone(), st.down.clone(), ids),
            _ => routed_dequantised(&st, &topk_ids, &ids)?,
        };
        #[cfg(feature = "cuda")]
        if self.moe_kernel && grouped_applies(t, x) {
            // Grouped by expert id, not stack row: selective's slots are in another order, and
            // the same groups in the same order make the same products.
            let experts: Vec<u32> = match &host_ids {
                Some(v) => v.concat(),
                None => topk_ids.flatten_all()?.to_vec1()?,
            };
            let rows: Vec<u32> = ids.flatten_all()?.to_vec1()?;
            let y = super::moe_grouped::moe_grouped(
                x, &gate_up_w, &down_w, &experts, &rows, &topk_w, k,
            )?;
            return Ok(Some((residual + y)?));
        }
        let y = moe_gemm_chunked(x, &gate_up_w, &down_w, &ids, &topk_w, k)?;
        Ok(Some((residual + y)?))
    }

    /// Routing of one decode token in one kernel (see `moe_decode::route_fused`); None where the
    /// generic path must run (prompts, masked experts, other dtypes, no CUDA build).
    #[cfg(feature = "cuda")]
    pub(super) fn route_on_device(
        &self,
        x: &Tensor,
        t: usize,
        masked: &[usize],
    ) -> Result<Option<(Tensor, Tensor)>> {
        let e = self.router.dim(0)?;
        if !(super::moe_decode::applies(t, x.dtype(), self.top_k)
            && self.moe_kernel
            && masked.is_empty()
            && e <= super::moe_decode::MAX_EXPERTS)
        {
            return Ok(None);
        }
        if let Some(arrived) = &self.router_arrived {
            return Ok(Some(super::moe_decode::route_fused(
                x,
                &self.router,
                self.top_k,
                self.norm_topk_prob,
                arrived,
            )?));
        }
        let logits = x.matmul(&self.router.t()?)?;
        Ok(Some(super::moe_decode::route(
            &logits,
            self.top_k,
            self.norm_topk_prob,
        )?))
    }

    #[cfg(not(feature = "cuda"))]
    pub(super) fn route_on_device(
        &self,
        _: &Tensor,
        _: usize,
        _: &[usize],
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// The experts this router would pick for each row of `x` (each ascending).
    pub(super) fn guess(&self, x: &Tensor) -> Result<Vec<Vec<usize>>> {
        let logits: Vec<Vec<f32>> = x
            .matmul(&self.router.t()?)?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        Ok(logits
            .iter()
            .map(|row| {
                let mut g: Vec<usize> = route(row, &[], self.top_k, false)
                    .experts
                    .into_iter()
                    .map(|e| e as usize)
                    .collect();
                g.sort_unstable();
                g
            })
            .collect())
    }

    /// `residual + moe(x)`. On a GPU's fused path the add is folded into the experts' last
    /// kernel (the same bf16 add, one launch fewer); elsewhere it follows the block.
    pub(super) fn forward_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        offset: usize,
        experts: &dyn ExpertProvider,
        observer: &mut dyn RoutingObserver,
        sink: Option<&mut DeviceRouting>,
    ) -> Result<Tensor> {
        if super::ports::fused_capable(x.device(), x.dtype())
            && let Some(y) = self.forward_fused(x, residual, offset, experts, observer, sink)?
        {
            return Ok(y);
        }
        Ok(super::cpu_gemv::add(
            residual,
            &self.forward_unfused(x, offset, experts, observer)?,
        )?)
    }

    /// The block without the fused GPU path: routing on the host, experts one by one (or
    /// batched for one CPU token).
    fn forward_unfused(
        &self,
        x: &Tensor,
        offset: usize,
        experts: &dyn ExpertProvider,
        observer: &mut dyn RoutingObserver,
    ) -> Result<Tensor> {
        let (t, _h) = x.dims2()?;
        let logits: Vec<Vec<f32>> = x
            .matmul(&self.router.t()?)?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        let masked = experts.unavailable(self.layer);
        let num_experts = self.router.dim(0)?;
        // Per expert: the token rows routed to it and their weights, in token order.
        let mut rows: Vec<Vec<(u32, f32)>> = vec![Vec::new(); num_experts];
        for (i, row) in logits.iter().enumerate() {
            let r = route(row, masked, self.top_k, self.norm_topk_prob);
            observer.on_routing(self.layer, offset + i, &r.experts, &r.weights);
            for (&e, &w) in r.experts.iter().zip(&r.weights) {
                rows[e as usize].push((i as u32, w));
            }
        }
        let used: Vec<usize> = (0..num_experts).filter(|&e| !rows[e].is_empty()).collect();
        experts.will_use(self.layer, &used);

        // One token on the CPU, every routed expert dense and held at once: their products
        // batched (`cpu_gemv::experts_one_token`), the same bits as one expert at a time.
        if t == 1 && !x.device().is_cuda() && used.len() <= experts.holds_at_once(self.layer) {
            let held = used
                .iter()
                .map(|&e| experts.get(self.layer, e))
                .collect::<Result<Vec<_>>>()?;
            let mats: Option<Vec<(MatRef, MatRef)>> = held.iter().map(|w| w.rows()).collect();
            let weights: Vec<f32> = used.iter().map(|&e| rows[e][0].1).collect();
            if let Some(y) = mats.and_then(|m| super::cpu_gemv::experts_one_token(x, &m, &weights))
            {
                return Ok(y?);
            }
            // Not this case (quantized experts): their gate_up products in one call where
            // candle can, else block-quantized and table-coded ones in two trips through the
            // pool, else one expert at a time, over the experts already held.
            let refs: Vec<&super::ports::ExpertWeights> = held.iter().map(|w| w.as_ref()).collect();
            let outs = match super::ports::ExpertWeights::quantized_one_token(x, &refs)? {
                Some(ys) => ys,
                None => match super::ports::ExpertWeights::quantized_stacked_one_token(x, &refs)? {
                    Some(ys) => ys,
                    None => match super::ports::ExpertWeights::lut4_one_token(x, &refs)? {
                        Some(ys) => ys,
                        None => held
                            .iter()
                            .map(|w| w.forward(x))
                            .collect::<Result<Vec<_>>>()?,
                    },
                },
            };
            let mut acc: Option<Tensor> = None;
            for (y, &e) in outs.into_iter().zip(&used) {
                let y = y.affine(f64::from(rows[e][0].1), 0.0)?;
                acc = Some(match acc {
                    None => y,
                    Some(a) => (a + y)?,
                });
            }
            return Ok(acc.unwrap_or(x.zeros_like()?));
        }
        // A prompt on the CPU: each expert's rows weighted and summed in one pass over f32
        // values with candle's roundings (`cpu_gemv::add_weighted_rows`), the same bits.
        if t > 1 && x.device().is_cpu() {
            // Every routed expert held at once where the provider can; then the dense ones
            // with few enough tokens for the row kernels all computed in two trips through the
            // pool (`cpu_gemv::experts_few_tokens`, the bits of one expert at a time), the rest
            // one at a time — and the sum in expert order either way.
            let held = if used.len() <= experts.holds_at_once(self.layer) {
                Some(
                    used.iter()
                        .map(|&e| experts.get(self.layer, e))
                        .collect::<Result<Vec<_>>>()?,
                )
            } else {
                None
            };
            let mut batched: Vec<Option<Vec<f32>>> = vec![None; used.len()];
            if let Some(held) = &held {
                let pick: Vec<usize> = (0..used.len())
                    .filter(|&i| {
                        held[i].rows().is_some()
                            && super::cpu_gemv::row_kernels_take(x.dtype(), rows[used[i]].len())
                    })
                    .collect();
                let mats: Vec<(MatRef, MatRef)> =
                    pick.iter().filter_map(|&i| held[i].rows()).collect();
                let idx: Vec<Vec<u32>> = pick
                    .iter()
                    .map(|&i| rows[used[i]].iter().map(|r| r.0).collect())
                    .collect();
                let refs: Vec<&[u32]> = idx.iter().map(|v| v.as_slice()).collect();
                if pick.len() > 1
                    && let Some(ys) = super::cpu_gemv::experts_few_tokens(x, &mats, &refs)
                {
                    for (&i, y) in pick.iter().zip(ys?) {
                        batched[i] = Some(y);
                    }
                }
                // Table-coded experts (`lut4.rs`: MXFP4, IQ4) the same way, when every one is;
                // block-quantized ones (`quant_rows.rs`) likewise.
                if pick.is_empty() && used.len() > 1 {
                    let all: Vec<&super::ports::ExpertWeights> =
                        held.iter().map(|w| w.as_ref()).collect();
                    let idx: Vec<Vec<u32>> = used
                        .iter()
                        .map(|&e| rows[e].iter().map(|r| r.0).collect())
                        .collect();
                    let refs: Vec<&[u32]> = idx.iter().map(|v| v.as_slice()).collect();
                    let ys = match super::ports::ExpertWeights::lut4_few_tokens(x, &all, &refs)? {
                        Some(ys) => Some(ys),
                        None => super::ports::ExpertWeights::quantized_stacked_few_tokens(
                            x, &all, &refs,
                        )?,
                    };
                    for (b, y) in batched.iter_mut().zip(ys.into_iter().flatten()) {
                        *b = Some(y);
                    }
                }
            }
            let h = x.dim(1)?;
            let mut acc = vec![0f32; t * h];
            for (i, &e) in used.iter().enumerate() {
                let (idx, w): (Vec<u32>, Vec<f32>) = rows[e].iter().copied().unzip();
                let y = match batched[i].take() {
                    Some(y) => y,
                    None => {
                        let weights = match &held {
                            Some(held) => held[i].clone(),
                            None => experts.get(self.layer, e)?,
                        };
                        let xe = x.index_select(
                            &Tensor::from_vec(idx.clone(), idx.len(), x.device())?,
                            0,
                        )?;
                        super::cpu_gemv::widened(&weights.forward(&xe)?)?
                    }
                };
                super::cpu_gemv::add_weighted_rows(&mut acc, h, &y, &idx, &w, x.dtype())?;
            }
            return Ok(super::cpu_gemv::narrowed(acc, (t, h), x.dtype())?);
        }
        let mut acc: Option<Tensor> = None;
        for e in used {
            let weights = experts.get(self.layer, e)?;
            let (idx, w): (Vec<u32>, Vec<f32>) = rows[e].iter().copied().unzip();
            let n = idx.len();
            if t == 1 {
                // One token: scale by the weight as a scalar (affine rounds it to the compute
                // dtype, as HF's cast of routing_weights does) and start the sum from the first
                // expert rather than zeros; 0 + y == y, so the result is unchanged and two tensor
                // allocations per expert are saved on the decode path.
                let y = weights.forward(x)?.affine(f64::from(w[0]), 0.0)?;
                acc = Some(match acc {
                    None => y,
                    Some(a) => (a + y)?,
                });
            } else {
                let w = Tensor::from_vec(w, (n, 1), x.device())?.to_dtype(x.dtype())?;
                let acc_t = match acc.take() {
                    Some(a) => a,
                    None => x.zeros_like()?,
                };
                let idx = Tensor::from_vec(idx, n, x.device())?;
                let xe = x.index_select(&idx, 0)?;
                let y = weights.forward(&xe)?.broadcast_mul(&w)?;
                acc = Some(acc_t.index_add(&idx, &y, 0)?);
            }
            // `weights` (an Arc) drops here: a cache may now evict this expert for the next one.
        }
        match acc {
            Some(a) => Ok(a),
            None => Ok(x.zeros_like()?),
        }
    }
}

/// The routed experts of FP8 or GGUF stacks dequantised into a bf16 stack ([n, 2I, H],
/// [n, H, I]), for the tokens the decode kernels do not take (a prompt's), with the routing's
/// ids remapped to positions in it. Positions follow the expert ids, not the stack rows, so
/// native's stacks and selective's slots give the same stack — and the same bits. `expert_ids`
/// are the routing's expert ids, `rows` their rows of the stacks (both [T, k]).
#[cfg(feature = "cuda")]
fn routed_dequantised(
    st: &super::ports::Stacked,
    expert_ids: &Tensor,
    rows: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ids: Vec<Vec<u32>> = expert_ids.to_vec2()?;
    let rows_h: Vec<Vec<u32>> = rows.to_vec2()?;
    // Expert id → stack row, ascending by expert id; then each expert's position.
    let mut row_of = std::collections::BTreeMap::new();
    for (ids, rows) in ids.iter().zip(&rows_h) {
        for (&e, &r) in ids.iter().zip(rows) {
            row_of.insert(e, r);
        }
    }
    let pos: std::collections::HashMap<u32, u32> = row_of
        .keys()
        .enumerate()
        .map(|(p, &e)| (e, p as u32))
        .collect();
    let dev = rows.device();
    let order: Vec<u32> = row_of.values().copied().collect();
    let order = Tensor::from_vec(order, row_of.len(), dev)?;
    let (gate_up, down) = match st.format() {
        StackFormat::Fp8(scales) => (
            super::moe_decode::fp8_dequant_stack(
                &st.gate_up,
                &scales.gate_up,
                scales.block,
                2,
                &order,
            )?,
            super::moe_decode::fp8_dequant_stack(&st.down, &scales.down, scales.block, 1, &order)?,
        ),
        StackFormat::Ggml(layout) => super::moe_decode::GgmlStack {
            gate_up: &st.gate_up,
            down: &st.down,
            layout,
        }
        .dequantised(&order)?,
        StackFormat::Dense => {
            return Err(ModelError::Input(
                "dense stacks need no dequantising".into(),
            ));
        }
    };
    let (t, k) = (ids.len(), ids.first().map_or(0, Vec::len));
    let remapped: Vec<u32> = ids.iter().flatten().map(|e| pos[e]).collect();
    Ok((gate_up, down, Tensor::from_vec(remapped, (t, k), dev)?))
}

#[cfg(not(feature = "cuda"))]
fn routed_dequantised(
    _: &super::ports::Stacked,
    _: &Tensor,
    _: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    Err(ModelError::Input(
        "FP8 and GGUF expert stacks exist only on a GPU (a build with the cuda feature)".into(),
    ))
}

/// A self-filling slot pool's step: the GPU fills the routed experts' slots that are not
/// resident before they are read (`moe_decode::fill_routed`); nothing for any other stack.
#[cfg(feature = "cuda")]
fn fill_slots(st: &super::ports::Stacked, ids: &Tensor) -> Result<()> {
    match &st.fill {
        Some(fill) => {
            super::moe_decode::fill_routed(ids, fill, &st.gate_up, &st.down, st.fp8.as_ref())
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_is_softmax_topk_renormalised() {
        let r = route(&[0.0, 2.0, 1.0, 2.0], &[], 2, true);
        assert_eq!(r.experts, vec![1, 3], "ties go to the lower index first");
        assert!((r.weights[0] - 0.5).abs() < 1e-6 && (r.weights[1] - 0.5).abs() < 1e-6);
        let r = route(&[0.0, 2.0, 1.0, 2.0], &[], 2, false);
        let z: f32 = [0.0f32, 2.0, 1.0, 2.0].iter().map(|v| v.exp()).sum();
        assert!((r.weights[0] - 2f32.exp() / z).abs() < 1e-6);
    }

    /// A prompt routing more (token, expert) pairs than candle's GPU sort takes in one launch
    /// runs in chunks of tokens, and every row has the bits of its tokens run alone — here rows
    /// at the start and across the chunks' boundary. Runs on a GPU (`scripts/gpu_unit_tests.sh`);
    /// without one it says so and passes vacuously.
    #[cfg(feature = "cuda")]
    #[test]
    fn moe_gemm_long_prompt_runs_in_chunks_with_each_tokens_bits() {
        use crate::util::gpu_test::{bf16_matrix, device};
        let Some(dev) = device("long-prompt MoE GEMM") else {
            return;
        };
        let (e, h, i, k) = (8, 64, 32, 4);
        let t = SORT_MAX / k + 37;
        let gu = bf16_matrix(e * 2 * i, h, 1, 251, 1.0 / 32.0, &dev).0;
        let gu = gu.reshape((e, 2 * i, h)).unwrap();
        let dn = bf16_matrix(e * h, i, 2, 241, 1.0 / 32.0, &dev).0;
        let dn = dn.reshape((e, h, i)).unwrap();
        let x = bf16_matrix(t, h, 3, 239, 1.0 / 8.0, &dev).0;
        // k distinct experts a token (offsets 0, 5, 2, 7 modulo 8).
        let ids: Vec<u32> = (0..t)
            .flat_map(|r| (0..k).map(move |s| ((r * 3 + s * 5) % e) as u32))
            .collect();
        let ids = Tensor::from_vec(ids, (t, k), &dev).unwrap();
        let w: Vec<f32> = (0..t * k).map(|j| 0.25 + (j % 7) as f32 / 64.0).collect();
        let w = Tensor::from_vec(w, (t, k), &dev).unwrap();
        let all = moe_gemm_chunked(&x, &gu, &dn, &ids, &w, k).unwrap();
        assert_eq!(all.dims(), [t, h]);
        let chunk = SORT_MAX / k;
        for (t0, n) in [(0, 37), (chunk - 5, 42)] {
            let rows = |a: &Tensor| a.narrow(0, t0, n).unwrap();
            let alone = moe_gemm_tokens(&rows(&x), &gu, &dn, &rows(&ids), &rows(&w), k).unwrap();
            let got = crate::util::f32_bits(&rows(&all));
            let want = crate::util::f32_bits(&alone);
            assert_eq!(got, want, "rows {t0}..{}", t0 + n);
            assert!(
                got.iter().any(|&b| f32::from_bits(b) != 0.0),
                "rows {t0}.. not all zero"
            );
        }
    }

    #[test]
    fn masked_experts_are_never_selected() {
        let r = route(&[5.0, 1.0, 0.0], &[0], 2, true);
        assert_eq!(r.experts, vec![1, 2]);
    }
}
