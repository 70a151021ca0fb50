//! Where a GPU decode step's time goes (`moescope bench steps`).
//!
//! A CUDA graph replays a step as one launch, so nothing inside it can be timed from the host.
//! The profile cuts the step at its stages — per layer: attention norm, attention, FFN norm,
//! router, the experts' gate_up and down kernels, the residual add — captures each stage as its
//! own graph and replays them back to back with a CUDA event between any two. Each stage runs the
//! ops the real step runs (`Qwen3Moe::piece_stage`), plus one copy into a static buffer; that
//! copy and the graph boundary are measured on their own (an *empty stage*: the copy alone) and
//! taken off. The whole-step graph is timed beside it, so the sum of the stages can be checked
//! against the step they were cut from.
//!
//! Why a head start before each round: the host needs several µs to launch a graph and record
//! an event, longer than the small stages take on the GPU; a 2 GiB device copy queued first keeps
//! the GPU busy until every launch of the round is queued, so the events measure the GPU, not
//! the host.
//!
//! Bandwidth is judged against a device-to-device copy measured in the same run, counted as
//! HBM traffic (a copy of N bytes reads N and writes N): the rate a kernel that only reads its
//! weights could reach at best.

use serde::{Deserialize, Serialize};

/// One stage of a decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The token's embedding and the position-derived inputs (RoPE rows, mask, KV rows).
    Start,
    AttnNorm,
    /// q/k/v projections, q/k norms, RoPE, the KV write, attention over the cache, o_proj and
    /// the residual add.
    Attention,
    FfnNorm,
    /// Router logits, softmax and top-k on the device.
    Router,
    /// The routed experts' gate and up projections with SiLU (moescope's kernel).
    GateUp,
    /// The routed experts' down projections, weighted and summed (moescope's kernel).
    Down,
    Residual,
    /// A dense layer's MLP and its residual add.
    DenseMlp,
    FinalNorm,
    LmHead,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Start => "embedding + positions",
            Stage::AttnNorm => "attention norm",
            Stage::Attention => "attention",
            Stage::FfnNorm => "FFN norm",
            Stage::Router => "router (top-k)",
            Stage::GateUp => "experts gate_up",
            Stage::Down => "experts down + residual",
            Stage::Residual => "residual add",
            Stage::DenseMlp => "dense MLP",
            Stage::FinalNorm => "final norm",
            Stage::LmHead => "lm_head",
        }
    }

    /// Copies into static buffers that end this stage's graph (the router writes ids and
    /// weights); the profile takes them off its time.
    pub fn boundary_copies(self) -> usize {
        if self == Stage::Router { 2 } else { 1 }
    }

    /// The stages of a MoE layer, in order. (The residual add is part of the down kernel, as
    /// in the whole step; [`Stage::Residual`] stays for profiles saved before it was.)
    pub const MOE_LAYER: [Stage; 6] = [
        Stage::AttnNorm,
        Stage::Attention,
        Stage::FfnNorm,
        Stage::Router,
        Stage::GateUp,
        Stage::Down,
    ];
    pub const DENSE_LAYER: [Stage; 4] = [
        Stage::AttnNorm,
        Stage::Attention,
        Stage::FfnNorm,
        Stage::DenseMlp,
    ];
}

/// One kind of stage, summed over a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRow {
    pub stage: Stage,
    pub name: String,
    /// Segments of this kind per step (one per layer, or one).
    pub count: usize,
    /// GPU time per step, the sum of the per-segment medians (µs).
    pub us: f64,
    /// The same less the empty stage's time per segment (µs), floored at 0.
    pub net_us: f64,
    /// Share of the step's summed net time (%).
    pub share_pct: f64,
    /// Weights (and KV rows) read per step.
    pub bytes: u64,
    /// `bytes / net_us` (GB/s), 0 where nothing is read.
    pub gb_s: f64,
    /// `gb_s` against the measured copy bandwidth (%).
    pub pct_of_copy: f64,
    /// Device operations (kernels, copies, memsets) per step in the stage's graphs, the
    /// boundary copies excluded.
    pub ops: usize,
}

/// One kind of stage measured inside a chain of the whole step: what the chain loses when every
/// segment of the kind is replaced by the empty stage's copy. Why beside [`StageRow`]: a stage
/// graph of its own starts from an idle GPU after an event, where in the step a kernel follows
/// the one before it inside one graph; a short kernel's ramp-up weighs differently in the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InStepRow {
    pub stage: Stage,
    pub name: String,
    pub count: usize,
    /// The chain's time less the chain's without this kind (µs per step), floored at 0.
    pub us: f64,
    pub bytes: u64,
    /// `bytes / us` (GB/s), 0 where nothing is read.
    pub gb_s: f64,
    /// `gb_s` against the measured copy bandwidth (%).
    pub pct_of_copy: f64,
}

/// What each kind of stage costs inside the chained step. `without` holds, per kind, the chain's
/// time with every segment of the kind replaced by the empty stage (µs), the segments replaced
/// and the bytes they read. A kind whose segments end in more than one boundary copy (the
/// router) left the further copies out of the replaced chain too; each is put back at one op
/// inside a graph (`op_floor_us`) so that only the stage's own work is counted.
pub fn in_step_rows(
    chained_us: f64,
    without: &[(Stage, f64, usize, u64)],
    op_floor_us: f64,
    copy_gb_s: f64,
) -> Vec<InStepRow> {
    without
        .iter()
        .map(|&(stage, us_without, count, bytes)| {
            let extra = (stage.boundary_copies().saturating_sub(1) * count) as f64 * op_floor_us;
            let us = (chained_us - us_without - extra).max(0.0);
            let gb_s = if bytes > 0 && us > 0.0 {
                bytes as f64 / (us * 1e3)
            } else {
                0.0
            };
            InStepRow {
                stage,
                name: stage.name().to_string(),
                count,
                us,
                bytes,
                gb_s,
                pct_of_copy: 100.0 * gb_s / copy_gb_s.max(1e-12),
            }
        })
        .collect()
}

/// Per-layer medians (µs) of every stage, for the JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentTime {
    pub layer: Option<usize>,
    pub stage: Stage,
    pub median_us: f64,
    pub min_us: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepProfile {
    pub device: String,
    pub gpu: String,
    pub dtype: String,
    pub layers: usize,
    pub moe_layers: usize,
    /// The position the profiled token decodes at, and the KV rows attention reads: positions
    /// 0..=position with moescope's attention kernel, the whole static capacity with candle's
    /// ops (they attend over it under a mask).
    pub position: usize,
    pub kv_rows: usize,
    pub rounds: usize,
    /// A device-to-device copy of 1 GiB as HBM traffic (read + write bytes per second, GB/s).
    pub copy_gb_s: f64,
    /// The whole-step graph (median of rounds of back-to-back replays), µs.
    pub step_us: f64,
    pub step_ops: usize,
    /// Sum of one round's segments, first event to last (median of rounds), µs.
    pub segmented_us: f64,
    /// The empty stage: one boundary copy as its own graph between two events, µs.
    pub empty_stage_us: f64,
    /// One tiny copy inside a graph of many (what each further op of a graph costs at least), µs.
    pub op_floor_us: f64,
    pub bytes_per_step: u64,
    /// `copy_gb_s` over `bytes_per_step`: the step's bandwidth bound (tok/s).
    pub bound_tok_s: f64,
    /// `1 / step_us` (tok/s).
    pub tok_s: f64,
    pub pct_of_bound: f64,
    pub stages: Vec<StageRow>,
    pub segments: Vec<SegmentTime>,
    /// Every segment chained in one graph, boundary copies kept (median of rounds), µs; 0 in
    /// profiles saved before it was measured.
    #[serde(default)]
    pub chained_us: f64,
    /// Each kind of stage inside the chain (see [`InStepRow`]).
    #[serde(default)]
    pub in_step: Vec<InStepRow>,
}

impl StepProfile {
    /// The step's op count times the per-op floor: what the step would cost if it read nothing.
    pub fn latency_floor_us(&self) -> f64 {
        self.step_ops as f64 * self.op_floor_us
    }

    /// What the bytes cost at the copy bandwidth (µs).
    pub fn bandwidth_floor_us(&self) -> f64 {
        self.bytes_per_step as f64 / (self.copy_gb_s * 1e3)
    }
}

/// Rolls per-segment times into one row per stage kind. A segment's net time is its median less
/// the empty stage (a graph boundary and one copy) and, for each further boundary copy, one
/// op inside a graph (`op_floor_us`).
pub fn stage_rows(
    segments: &[(SegmentTime, u64, usize)],
    empty_stage_us: f64,
    op_floor_us: f64,
    copy_gb_s: f64,
) -> Vec<StageRow> {
    let mut rows: Vec<StageRow> = Vec::new();
    for (s, bytes, ops) in segments {
        let extra = s.stage.boundary_copies().saturating_sub(1) as f64 * op_floor_us;
        let net = (s.median_us - empty_stage_us - extra).max(0.0);
        match rows.iter_mut().find(|r| r.stage == s.stage) {
            Some(r) => {
                r.count += 1;
                r.us += s.median_us;
                r.net_us += net;
                r.bytes += bytes;
                r.ops += ops;
            }
            None => rows.push(StageRow {
                stage: s.stage,
                name: s.stage.name().to_string(),
                count: 1,
                us: s.median_us,
                net_us: net,
                share_pct: 0.0,
                bytes: *bytes,
                gb_s: 0.0,
                pct_of_copy: 0.0,
                ops: *ops,
            }),
        }
    }
    let total: f64 = rows.iter().map(|r| r.net_us).sum();
    for r in &mut rows {
        r.share_pct = 100.0 * r.net_us / total.max(1e-12);
        r.gb_s = if r.bytes > 0 && r.net_us > 0.0 {
            r.bytes as f64 / (r.net_us * 1e3)
        } else {
            0.0
        };
        r.pct_of_copy = 100.0 * r.gb_s / copy_gb_s.max(1e-12);
    }
    rows
}

/// Median of a sample (NaNs sorted last; 0 for an empty one).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{StageBuffers, profile};

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::sys::{self, CUevent_flags};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaEvent, CudaGraph, CudaStream, DevicePtr, result,
    };
    use candle_core::{DType, Device, Tensor};

    use super::super::error::{ModelError, Result};
    use super::super::graph::capture_piece;
    use super::super::kv_cache::DecodeInputs;
    use super::super::ports::{ExpertProvider, NoObserver, StackFormat, Stacked};
    use super::super::qwen3_moe::{Logits, Qwen3Moe};
    use super::{SegmentTime, Stage, StepProfile, in_step_rows, median, stage_rows};

    /// The static buffers the stage graphs read and write.
    pub struct StageBuffers {
        pub ids_in: Tensor,
        pub pos: Tensor,
        pub dec: DecodeInputs,
        pub x: Tensor,
        pub hn: Tensor,
        pub x_mid: Tensor,
        pub h: Tensor,
        pub route_ids: Tensor,
        pub route_w: Tensor,
        pub mid: Tensor,
        pub y: Tensor,
        pub logits: Tensor,
        /// The empty stage copies into this.
        scratch: Tensor,
    }

    fn err(what: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::Input(format!("step profile ({what}): {e}"))
    }

    /// Profiles one decode step of `model` over `experts` (native: full stacks) after `prompt`,
    /// `rounds` times.
    pub fn profile(
        model: &Qwen3Moe,
        experts: &dyn ExpertProvider,
        prompt: &[u32],
        rounds: usize,
    ) -> Result<StepProfile> {
        let dev = model.device().clone();
        let Device::Cuda(cuda) = &dev else {
            return Err(err("device", "needs a CUDA device"));
        };
        let cfg = model.config().clone();
        let (h, k, dt) = (cfg.hidden_size, cfg.num_experts_per_tok, model.dtype());
        if !super::super::moe_decode::applies(1, dt, k) || !model.options().moe_kernel {
            return Err(err(
                "dtype",
                "moescope's MoE decode kernels run bf16 only (--dtype bf16)",
            ));
        }
        if prompt.is_empty() {
            return Err(err("prompt", "needs at least one token"));
        }
        let stream = cuda.cuda_stream();

        // The prompt, then the next token's step at its position (rewritten every round: the
        // same token at the same position writes the same KV row).
        let mut cache = model.new_cache();
        model.reserve_decode(&mut cache, prompt.len() + 1)?;
        let row = model
            .forward(prompt, &mut cache, experts, &mut NoObserver, Logits::Last)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let token = super::super::layers::argmax(&row) as u32;
        let position = cache.len();
        model.reserve_decode(&mut cache, position + 1)?;
        let capacity = cache.static_capacity();
        let kv_rows = if model.options().attn_kernel
            && dt == DType::BF16
            && capacity <= super::super::attn_decode::MAX_POSITIONS
        {
            position + 1
        } else {
            capacity
        };

        let (nkv, d) = (cfg.num_key_value_heads, cfg.head_dim);
        let b = StageBuffers {
            ids_in: Tensor::new(&[token], &dev)?,
            pos: Tensor::new(&[position as u32], &dev)?,
            dec: DecodeInputs {
                cos: Tensor::zeros((1, d / 2), dt, &dev)?,
                sin: Tensor::zeros((1, d / 2), dt, &dev)?,
                rows: Tensor::zeros((nkv, 1, d), DType::U32, &dev)?,
                mask: Tensor::zeros(capacity, dt, &dev)?,
            },
            x: Tensor::zeros((1, h), dt, &dev)?,
            hn: Tensor::zeros((1, h), dt, &dev)?,
            x_mid: Tensor::zeros((1, h), dt, &dev)?,
            h: Tensor::zeros((1, h), dt, &dev)?,
            route_ids: Tensor::zeros((1, k), DType::U32, &dev)?,
            route_w: Tensor::zeros((1, k), DType::F32, &dev)?,
            mid: Tensor::zeros((k, cfg.moe_intermediate_size), dt, &dev)?,
            y: Tensor::zeros((1, h), dt, &dev)?,
            logits: Tensor::zeros((1, cfg.vocab_size), DType::F32, &dev)?,
            scratch: Tensor::zeros((1, h), dt, &dev)?,
        };
        let logits_whole = Tensor::zeros((1, cfg.vocab_size), DType::F32, &dev)?;

        // The segments in step order, with what each reads.
        let mut plan: Vec<(Option<usize>, Stage, Option<Stacked>)> =
            vec![(None, Stage::Start, None)];
        for l in 0..cfg.num_hidden_layers {
            if model.is_moe_layer(l) {
                let st = experts
                    .stacked(l, &[])?
                    .filter(|s| s.index.is_none())
                    .ok_or_else(|| {
                        err(
                            "backend",
                            format!(
                                "layer {l} has no stacked experts: the profile times the fused \
                                 decode path (bf16, FP8 and GGUF block stacks), which these \
                                 experts do not take"
                            ),
                        )
                    })?;
                for s in Stage::MOE_LAYER {
                    plan.push((Some(l), s, Some(st.clone())));
                }
            } else {
                for s in Stage::DENSE_LAYER {
                    plan.push((Some(l), s, None));
                }
            }
        }
        plan.push((None, Stage::FinalNorm, None));
        plan.push((None, Stage::LmHead, None));

        let run = |cache: &mut super::super::layers::KvCache,
                   (l, s, st): &(Option<usize>, Stage, Option<Stacked>)|
         -> Result<()> {
            model.piece_stage(l.unwrap_or(0), *s, &b, cache, st.as_ref())
        };
        let whole = |cache: &mut super::super::layers::KvCache| -> Result<()> {
            let out =
                model.decode_step(&b.ids_in, &b.pos, cache, experts, &mut NoObserver, None)?;
            logits_whole.slice_set(&out, 0, 0)?;
            Ok(())
        };
        let empty = || -> Result<()> { Ok(b.scratch.slice_set(&b.x, 0, 0)?) };

        // The kinds of stage the step has, in step order: each is also timed inside the chain.
        let mut kinds: Vec<Stage> = Vec::new();
        for (_, s, _) in &plan {
            if !kinds.contains(s) {
                kinds.push(*s);
            }
        }

        // One run of everything uncaptured with candle's upload cache on, then the captures.
        let (graphs, whole_graph, empty_graph, floor_graph, chain_graph, without_graphs) = {
            let _cache_uploads = cuda.enable_cuda_graph_htod_cache();
            for seg in &plan {
                run(&mut cache, seg)?;
            }
            whole(&mut cache)?;
            empty()?;
            let mut graphs = Vec::with_capacity(plan.len());
            for seg in &plan {
                graphs.push(capture_piece(&stream, || run(&mut cache, seg))?);
            }
            let whole_graph = capture_piece(&stream, || whole(&mut cache))?;
            let empty_graph = capture_piece(&stream, empty)?;
            let floor_graph = capture_piece(&stream, || {
                for _ in 0..FLOOR_OPS {
                    empty()?;
                }
                Ok(())
            })?;
            let chain_graph = capture_piece(&stream, || {
                for seg in &plan {
                    run(&mut cache, seg)?;
                }
                Ok(())
            })?;
            let mut without_graphs = Vec::with_capacity(kinds.len());
            for kind in &kinds {
                without_graphs.push(capture_piece(&stream, || {
                    for seg in &plan {
                        if seg.1 == *kind {
                            empty()?;
                        } else {
                            run(&mut cache, seg)?;
                        }
                    }
                    Ok(())
                })?);
            }
            (
                graphs,
                whole_graph,
                empty_graph,
                floor_graph,
                chain_graph,
                without_graphs,
            )
        };
        // The stage graphs must compute the step the whole graph computes.
        for g in &graphs {
            g.launch().map_err(|e| err("launch", e))?;
        }
        whole_graph.launch().map_err(|e| err("launch", e))?;
        let (a, w) = (b.logits.to_vec2::<f32>()?, logits_whole.to_vec2::<f32>()?);
        if a != w {
            return Err(err(
                "check",
                "the stages did not compute the step's logits bit for bit",
            ));
        }
        // And so must the stages chained in one graph.
        b.logits.slice_set(&b.logits.zeros_like()?, 0, 0)?;
        launch(&chain_graph)?;
        if b.logits.to_vec2::<f32>()? != w {
            return Err(err(
                "check",
                "the chained stages did not compute the step's logits bit for bit",
            ));
        }

        let head = HeadStart::new(cuda)?;
        let ctx = stream.context().clone();
        let new_event = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| err("event", e))
        };
        let events: Vec<CudaEvent> = (0..=graphs.len())
            .map(|_| new_event())
            .collect::<Result<_>>()?;
        let ms = |a: &CudaEvent, b: &CudaEvent| -> Result<f64> {
            Ok(a.elapsed_ms(b).map_err(|e| err("event", e))? as f64)
        };

        let rounds = rounds.max(1);
        let mut per_segment: Vec<Vec<f64>> = vec![Vec::new(); graphs.len()];
        let mut segmented = Vec::new();
        let mut step = Vec::new();
        let mut empty_t = Vec::new();
        let mut floor_t = Vec::new();
        let mut chain_t = Vec::new();
        let mut without_t: Vec<Vec<f64>> = vec![Vec::new(); without_graphs.len()];
        // `n` replays of one graph back to back, after a head start: ms a replay.
        let replays_ms = |g: &CudaGraph, n: usize| -> Result<f64> {
            head.queue(&stream)?;
            events[0].record(&stream).map_err(|e| err("event", e))?;
            for _ in 0..n {
                launch(g)?;
            }
            events[1].record(&stream).map_err(|e| err("event", e))?;
            stream.synchronize().map_err(|e| err("sync", e))?;
            Ok(ms(&events[0], &events[1])? / n as f64)
        };
        // The graphs one after another after a head start, an event between any two: ms each,
        // and ms from the first's start to the last's end.
        let each_ms = |gs: &[&CudaGraph]| -> Result<(Vec<f64>, f64)> {
            head.queue(&stream)?;
            events[0].record(&stream).map_err(|e| err("event", e))?;
            for (g, e) in gs.iter().zip(&events[1..]) {
                launch(g)?;
                e.record(&stream).map_err(|e| err("event", e))?;
            }
            stream.synchronize().map_err(|e| err("sync", e))?;
            let times = events[..=gs.len()]
                .windows(2)
                .map(|w| ms(&w[0], &w[1]))
                .collect::<Result<_>>()?;
            Ok((times, ms(&events[0], &events[gs.len()])?))
        };
        let chain_us = |g: &CudaGraph| -> Result<f64> { Ok(replays_ms(g, CHAIN_REPLAYS)? * 1e3) };
        let segments: Vec<&CudaGraph> = graphs.iter().collect();
        let empties_in_a_row = vec![&empty_graph; graphs.len()];
        for round in 0..=rounds {
            // Segments, an event between any two.
            let (times, total) = each_ms(&segments)?;
            // Whole steps back to back.
            let whole_ms = replays_ms(&whole_graph, WHOLE_REPLAYS)?;
            // The empty stage, as many times as there are segments, and the op floor.
            let (empties, _) = each_ms(&empties_in_a_row)?;
            let floor_ms = replays_ms(&floor_graph, 1)? / FLOOR_OPS as f64;
            // The chain, then the chain without each kind, alternated within the round.
            let chained = chain_us(&chain_graph)?;
            let withouts: Vec<f64> = without_graphs
                .iter()
                .map(&chain_us)
                .collect::<Result<_>>()?;
            if round == 0 {
                continue; // warm-up
            }
            chain_t.push(chained);
            for (v, t) in without_t.iter_mut().zip(withouts) {
                v.push(t);
            }
            for (v, t) in per_segment.iter_mut().zip(&times) {
                v.push(t * 1e3);
            }
            segmented.push(total * 1e3);
            step.push(whole_ms * 1e3);
            empty_t.push(median(&empties) * 1e3);
            floor_t.push(floor_ms * 1e3);
        }
        let copy_gb_s = head.copy_bandwidth(&stream, &events)?;
        let empty_stage_us = median(&empty_t);
        let empty_ops = device_ops(&empty_graph)?;

        let mut detailed = Vec::with_capacity(plan.len());
        let mut bytes_per_step = 0u64;
        for ((seg, g), times) in plan.iter().zip(&graphs).zip(&per_segment) {
            let (l, s, st) = seg;
            let bytes = st
                .as_ref()
                .and_then(|st| stored_expert_bytes(st, *s, cfg.num_experts_per_tok as u64))
                .unwrap_or_else(|| model.stage_bytes(l.unwrap_or(0), *s, kv_rows));
            bytes_per_step += bytes;
            let boundary = s.boundary_copies() * empty_ops;
            let ops = device_ops(g)?.saturating_sub(boundary);
            let min = times.iter().copied().fold(f64::INFINITY, f64::min);
            detailed.push((
                SegmentTime {
                    layer: *l,
                    stage: *s,
                    median_us: median(times),
                    min_us: min,
                },
                bytes,
                ops,
            ));
        }
        let op_floor_us = median(&floor_t);
        let stages = stage_rows(&detailed, empty_stage_us, op_floor_us, copy_gb_s);
        let chained_us = median(&chain_t);
        let without: Vec<(Stage, f64, usize, u64)> = kinds
            .iter()
            .zip(&without_t)
            .map(|(kind, t)| {
                let (count, bytes) = detailed
                    .iter()
                    .filter(|(s, _, _)| s.stage == *kind)
                    .fold((0, 0), |(n, b), (_, bytes, _)| (n + 1, b + bytes));
                (*kind, median(t), count, bytes)
            })
            .collect();
        let in_step = in_step_rows(chained_us, &without, op_floor_us, copy_gb_s);
        let step_us = median(&step);
        let bound_tok_s = copy_gb_s * 1e9 / bytes_per_step.max(1) as f64;
        let tok_s = 1e6 / step_us.max(1e-12);
        Ok(StepProfile {
            device: format!("{:?}", model.device().location()),
            gpu: gpu_name(cuda),
            dtype: format!("{dt:?}").to_lowercase(),
            layers: cfg.num_hidden_layers,
            moe_layers: cfg.moe_layers().count(),
            position,
            kv_rows,
            rounds,
            copy_gb_s,
            step_us,
            step_ops: device_ops(&whole_graph)?,
            segmented_us: median(&segmented),
            empty_stage_us,
            op_floor_us,
            bytes_per_step,
            bound_tok_s,
            tok_s,
            pct_of_bound: 100.0 * tok_s / bound_tok_s.max(1e-12),
            stages,
            segments: detailed.into_iter().map(|(s, _, _)| s).collect(),
            chained_us,
            in_step,
        })
    }

    /// Whole steps replayed back to back per round.
    const WHOLE_REPLAYS: usize = 20;
    /// Chains replayed back to back per measurement (each about a whole step).
    const CHAIN_REPLAYS: usize = 10;
    /// Tiny copies in the op-floor graph.
    const FLOOR_OPS: usize = 128;
    /// The head start's copy, and the copy-bandwidth measurement's.
    const COPY_BYTES: usize = 1 << 30;

    fn launch(g: &CudaGraph) -> Result<()> {
        g.launch().map_err(|e| err("launch", e))
    }

    /// Two device buffers: copied between to give the GPU a head start, and to measure the
    /// copy bandwidth.
    struct HeadStart {
        src: candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>,
        dst: candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>,
    }

    impl HeadStart {
        fn new(cuda: &candle_core::CudaDevice) -> Result<Self> {
            Ok(HeadStart {
                src: cuda.alloc_zeros::<u8>(COPY_BYTES)?,
                dst: cuda.alloc_zeros::<u8>(COPY_BYTES)?,
            })
        }

        /// Queues 2 GiB of copying (two 1 GiB copies), ~1 ms of GPU time on an H200.
        fn queue(&self, stream: &Arc<CudaStream>) -> Result<()> {
            for _ in 0..2 {
                self.copy(stream)?;
            }
            Ok(())
        }

        fn copy(&self, stream: &Arc<CudaStream>) -> Result<()> {
            let (s, _g1) = self.src.device_ptr(stream);
            let (d, _g2) = self.dst.device_ptr(stream);
            // SAFETY: both buffers hold COPY_BYTES and live as long as `self`.
            unsafe { result::memcpy_dtod_async(d, s, COPY_BYTES, stream.cu_stream()) }
                .map_err(|e| err("copy", e))
        }

        /// Best of five 1 GiB device copies, as HBM traffic (2 × bytes / s), GB/s.
        fn copy_bandwidth(&self, stream: &Arc<CudaStream>, events: &[CudaEvent]) -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                events[0].record(stream).map_err(|e| err("event", e))?;
                self.copy(stream)?;
                events[1].record(stream).map_err(|e| err("event", e))?;
                stream.synchronize().map_err(|e| err("sync", e))?;
                let ms = events[0]
                    .elapsed_ms(&events[1])
                    .map_err(|e| err("event", e))? as f64;
                best = best.min(ms);
            }
            Ok(2.0 * COPY_BYTES as f64 / (best * 1e-3) / 1e9)
        }
    }

    /// Kernel, copy and memset nodes of a graph.
    /// What `k` routed experts' gate_up or down read from quantized stacks as stored (GGUF
    /// blocks; FP8 bytes, their scales — 1/16,384 of them — not counted); None for bf16 stacks,
    /// which the model's dtype arithmetic counts.
    fn stored_expert_bytes(st: &Stacked, stage: Stage, k: u64) -> Option<u64> {
        let (gate_up, down) = match st.format() {
            StackFormat::Ggml(l) => (l.gate_up_bytes() as u64, l.down_bytes() as u64),
            StackFormat::Fp8(_) => (
                st.gate_up.dims().iter().skip(1).product::<usize>() as u64,
                st.down.dims().iter().skip(1).product::<usize>() as u64,
            ),
            StackFormat::Dense => return None,
        };
        match stage {
            Stage::GateUp => Some(k * gate_up),
            Stage::Down => Some(k * down),
            _ => None,
        }
    }

    fn device_ops(g: &CudaGraph) -> Result<usize> {
        let graph = g.cu_graph();
        let mut n = 0usize;
        // SAFETY: a null array asks for the count only.
        unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n) }
            .result()
            .map_err(|e| err("graph nodes", e))?;
        let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
        // SAFETY: `nodes` holds `n` entries.
        unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n) }
            .result()
            .map_err(|e| err("graph nodes", e))?;
        let mut ops = 0;
        for node in nodes.into_iter().take(n) {
            let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: a node of this graph.
            unsafe { sys::cuGraphNodeGetType(node, &mut t) }
                .result()
                .map_err(|e| err("graph nodes", e))?;
            if matches!(
                t,
                sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL
                    | sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY
                    | sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET
            ) {
                ops += 1;
            }
        }
        Ok(ops)
    }

    fn gpu_name(cuda: &candle_core::CudaDevice) -> String {
        let ctx = cuda.cuda_stream().context().clone();
        ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }
}
