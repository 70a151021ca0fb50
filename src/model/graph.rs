//! CUDA-graph replay of decode steps.
//!
//! Batch-1 decode on a GPU is launch-bound: a step of the Qwen3-30B-A3B geometry is a few hundred
//! small kernels, and candle spends more host time issuing each than the GPU spends running it.
//! A CUDA graph records kernels once and replays them with one launch. Three ways a step runs:
//!
//! - **whole step** ([`step`]): native every step; selective when its last step missed nothing —
//!   over the resident experts, redone if routing then shows a miss;
//! - **piecewise** ([`piecewise_step`]): a selective step that must read routing back — per MoE
//!   layer one graph up to the experts and one for them, the host loading misses in between;
//! - uncaptured, where neither applies (CPU, f32, graphs turned off).
//!
//! What makes a step replayable: its inputs that change from step to step — the token and its
//! position — live in device buffers written before each launch, and everything derived from the
//! position (RoPE rows, where k/v are written, the attention mask) is computed on the device
//! ([`super::layers::DecodeInputs`]); the KV buffers are static until their capacity doubles
//! (then the graphs are captured again); logits and routing are copied into static outputs. The
//! captured code is the code that runs uncaptured ([`Qwen3Moe::decode_step`] and its pieces), so
//! every path gives bit-identical logits — native, selective, captured or not.
//!
//! One file for one concern: the whole-step graph and the piecewise graphs share the static
//! buffers, the page-locked host words, the capture rules and the KV-epoch checks below.
//!
//! candle 0.11 supports capture: with its host→device cache on, the small parameter uploads of
//! strided kernels are served from device copies made during a warm-up run. cudarc's per-buffer
//! events must be off ([`prepare_device`]): a capture may not wait on events recorded outside it.

use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaGraph, CudaStream, PinnedHostSlice, result, sys,
};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::error::{ModelError, Result};
use super::gates::{GateFlags, MappedWords, copy_words, finish, gate_layer, launch_on};
use super::layers::{DecodeInputs, KvCache};
use super::moe_block::DeviceRouting;
use super::pick::DevicePick;
use super::ports::{ExpertProvider, ResidentView, RoutingObserver};
use super::qwen3_moe::{Qwen3Moe, deliver_rows};

/// cuBLAS workspace given to every handle up front (what PyTorch gives Hopper cards).
const CUBLAS_WORKSPACE: usize = 32 << 20;

/// Readies a freshly opened device for capturable work, before anything runs on it:
/// - cudarc's per-buffer events off: it records and waits on two events per buffer per use so
///   that several streams can share buffers safely, but moescope issues all device work on
///   candle's one stream (`experts::upload` copies on it too), so the events only cost host time
///   on every op of a launch-bound decode — and a capture may not wait on events recorded
///   outside it;
/// - a fixed cuBLAS workspace, so that no matmul inside a capture needs to allocate one. Set
///   before the first matmul, so every run in the process (captured or not, native or
///   selective) lets cuBLAS choose its algorithms with the same workspace.
pub fn prepare_device(cuda: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::sys as blas;
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    // SAFETY: single stream, as above.
    unsafe { cuda.disable_event_tracking() };
    let ws = cuda.alloc_zeros::<u8>(CUBLAS_WORKSPACE)?;
    let stream = cuda.cuda_stream();
    let (ptr, _sync) = ws.device_ptr(&stream);
    let handle = cuda.cublas_handle();
    // SAFETY: the workspace outlives the handle (it is never freed; one per opened device).
    let status = unsafe {
        blas::cublasSetWorkspace_v2(
            *handle.handle(),
            ptr as *mut std::ffi::c_void,
            CUBLAS_WORKSPACE,
        )
    };
    drop(_sync);
    std::mem::forget(ws);
    if status != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(cuda_err("cuBLAS workspace", format!("{status:?}")));
    }
    Ok(())
}

/// Routing read back from a launch: MoE layers, and per layer the ids and weights.
type Routed = (Vec<usize>, Vec<Vec<u32>>, Vec<Vec<f32>>);

/// A captured decode step and the static buffers it reads and writes.
pub struct DecodeGraph {
    graph: CudaGraph,
    /// The KV cache epoch the graph's buffer addresses belong to.
    epoch: u64,
    /// The provider the graph was captured against (its stacks' addresses are in the graph),
    /// and what its stacks were then (see [`ExpertProvider::graph_variant`]).
    provider: usize,
    variant: u64,
    ids: Tensor,
    pos: Tensor,
    logits: Tensor,
    routing: Option<RoutingOut>,
    /// The greedy pick the step ends with: the token, without reading the logits back.
    pick: DevicePick,
    /// Token and position go in through page-locked words (see `HostWords`).
    words: HostWords,
    /// Timing events recorded around each replay, and whether the last run was one (a capture
    /// runs its step uncaptured): the step's device time.
    began: CudaEvent,
    ended: CudaEvent,
    timed: bool,
}

struct RoutingOut {
    layers: Vec<usize>,
    ids: Tensor,
    weights: Tensor,
}

// SAFETY: the graph handles are only used by the thread that owns the generation at the time
// (a `Generation` is stepped by one thread at a time, never concurrently).
unsafe impl Send for DecodeGraph {}

fn provider_key(p: &dyn ExpertProvider) -> usize {
    p as *const dyn ExpertProvider as *const () as usize
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Input(format!("CUDA graph {what}: {e}"))
}

/// Writes a u32 into a one-element device tensor (outside any capture).
fn set_u32(dst: &Tensor, v: u32) -> Result<()> {
    let src = Tensor::from_vec(vec![v], 1, dst.device())?;
    dst.slice_set(&src, 0, 0)?;
    Ok(())
}

impl DecodeGraph {
    /// Whether this graph can run the next step as captured.
    fn fits(&self, cache: &KvCache, provider: usize, variant: u64, want_routing: bool) -> bool {
        self.variant == variant
            && self.epoch == cache.epoch()
            && self.provider == provider
            && self.routing.is_some() == want_routing
    }

    /// The step's body as recorded: the decode step into the static outputs — the logits, the
    /// greedy pick over them, and the routing.
    fn body(
        model: &Qwen3Moe,
        cache: &mut KvCache,
        experts: &dyn ExpertProvider,
        ids: &Tensor,
        pos: &Tensor,
        (logits, pick): (&Tensor, &DevicePick),
        routing: Option<&RoutingOut>,
    ) -> Result<()> {
        let mut sink = DeviceRouting::new();
        let out = model.decode_step(
            ids,
            pos,
            cache,
            experts,
            &mut RoutingTap(routing.is_some()),
            routing.is_some().then_some(&mut sink),
        )?;
        logits.slice_set(&out, 0, 0)?;
        pick.launch(logits)?;
        if let Some(r) = routing {
            let i = Tensor::cat(&sink.iter().map(|(_, i, _)| i).collect::<Vec<_>>(), 0)?;
            let w = Tensor::cat(&sink.iter().map(|(_, _, w)| w).collect::<Vec<_>>(), 0)?;
            r.ids.slice_set(&i, 0, 0)?;
            r.weights.slice_set(&w, 0, 0)?;
        }
        Ok(())
    }

    /// Captures the step for `token` at `cache.len()`, running it once uncaptured first (that
    /// run is this step's result and fills candle's parameter caches). The cache must already
    /// hold the row.
    fn capture(
        model: &Qwen3Moe,
        cache: &mut KvCache,
        experts: &dyn ExpertProvider,
        provider: usize,
        variant: u64,
        token: u32,
        want_routing: bool,
    ) -> Result<Self> {
        let dev = model.device().clone();
        let Device::Cuda(cuda) = &dev else {
            return Err(ModelError::Input("CUDA graphs need a CUDA device".into()));
        };
        // Everything the graph reads or writes outside itself is made before capture (and
        // before the host→device cache is on: cached uploads may share memory).
        let ids = Tensor::zeros(1, DType::U32, &dev)?;
        let pos = Tensor::zeros(1, DType::U32, &dev)?;
        let logits = Tensor::zeros((1, model.config().vocab_size), DType::F32, &dev)?;
        let routing = if want_routing {
            let layers: Vec<usize> = model.config().moe_layers().collect();
            let k = model.config().num_experts_per_tok;
            Some(RoutingOut {
                ids: Tensor::zeros((layers.len(), k), DType::U32, &dev)?,
                weights: Tensor::zeros((layers.len(), k), DType::F32, &dev)?,
                layers,
            })
        } else {
            None
        };
        let pick = DevicePick::new(&dev)?;
        let ctx = cuda.cuda_stream().context().clone();
        let timing = || {
            ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_err("timing event", e))
        };
        let (began, ended) = (timing()?, timing()?);
        set_u32(&ids, token)?;
        set_u32(&pos, cache.len() as u32)?;
        let cap = cache.static_capacity();
        cache.decode_statics(model.dtype(), &dev)?;
        model.rope_full(cap)?;

        let _cache_uploads = cuda.enable_cuda_graph_htod_cache();
        let run = |cache: &mut KvCache| {
            let head = (&logits, &pick);
            Self::body(model, cache, experts, &ids, &pos, head, routing.as_ref())
        };
        run(cache)?;
        let graph = capture_piece(&cuda.cuda_stream(), || run(cache))?;
        // [token] [position] [logits] [routing ids] [routing weights] [pick]
        let words = HostWords::new(
            cuda,
            2 + logits.elem_count() + routing.as_ref().map_or(0, |r| 2 * r.ids.elem_count()) + 2,
        )?;
        Ok(DecodeGraph {
            graph,
            epoch: cache.epoch(),
            provider,
            variant,
            ids,
            pos,
            logits,
            routing,
            pick,
            words,
            began,
            ended,
            timed: false,
        })
    }

    fn replay(&mut self, token: u32, position: usize) -> Result<()> {
        let stream = self.ids.device().as_cuda_device()?.cuda_stream();
        self.words.write(&stream, 0, &[token], &self.ids)?;
        self.words
            .write(&stream, 1, &[position as u32], &self.pos)?;
        let mark = |e: &CudaEvent| e.record(&stream).map_err(|e| cuda_err("timing event", e));
        mark(&self.began)?;
        self.graph.launch().map_err(|e| cuda_err("launch", e))?;
        mark(&self.ended)?;
        self.timed = true;
        Ok(())
    }

    /// Where the logits and the pick's two words sit among the host words: [token] [position]
    /// [logits] [routing ids] [routing weights] [pick].
    fn row_at(&self) -> RowAt {
        let routing = self.routing.as_ref().map_or(0, |r| 2 * r.ids.elem_count());
        RowAt {
            logits: 2,
            pick: 2 + self.logits.elem_count() + routing,
        }
    }

    /// What the last run wrote: the logits (`full`) or only the greedy pick, and (layer, ids,
    /// weights) per MoE layer when routing is captured — all read back behind one wait.
    fn outputs(&mut self, stream: &Arc<CudaStream>, full: bool) -> Result<(Row, Option<Routed>)> {
        let n = self.logits.elem_count();
        let at = self.row_at();
        self.words
            .read_row(stream, full, at, &self.logits, &self.pick)?;
        if let Some(r) = &self.routing {
            self.words.read(stream, 2 + n, &r.ids)?;
            self.words
                .read(stream, 2 + n + r.ids.elem_count(), &r.weights)?;
        }
        self.words.wait(stream)?;
        let row = self.words.row(full, at, n);
        let Some(r) = &self.routing else {
            return Ok((row, None));
        };
        let (rows, k) = r.ids.dims2()?;
        let at = 2 + n;
        let ids = (0..rows)
            .map(|i| self.words.words(at + i * k, k).to_vec())
            .collect();
        let w = (0..rows)
            .map(|i| self.words.floats(at + rows * k + i * k, k))
            .collect();
        Ok((row, Some((r.layers.clone(), ids, w))))
    }

    /// The device time of the last replay, seconds (None after a capture, whose step ran
    /// uncaptured). Call after [`outputs`](Self::outputs), which waited for it.
    fn device_s(&self) -> Option<f64> {
        self.timed
            .then(|| self.began.elapsed_ms(&self.ended).ok())
            .flatten()
            .map(|ms| f64::from(ms) / 1e3)
    }

    /// The logits of the last run, read back from the graph's static buffer (valid until the
    /// next run).
    fn logits(&mut self) -> Result<Vec<f32>> {
        let stream = self.ids.device().as_cuda_device()?.cuda_stream();
        self.words
            .read_now(&stream, self.row_at().logits, &self.logits)
    }
}

/// What a whole-step graph gives back for the token.
pub enum Row {
    /// The step's logits (when the caller asked for them).
    Logits(Vec<f32>),
    /// The greedy pick made on the device (`super::pick`): the token, and whether every logit
    /// was a number (when not, the caller reads the logits to say which was not).
    Pick { token: u32, numbers: bool },
}

/// A whole step that ran: its token or logits, which of the generation's graphs ran it (its
/// logits stay readable there until the next step: [`logits_of`]), and its device time.
pub struct Ran {
    pub row: Row,
    pub graph: usize,
    pub device_s: Option<f64>,
}

/// Which graphs ran a step, so its logits can be read back from their static buffer until
/// the next step ([`logits_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RanBy {
    /// The generation's whole-step graph at this index.
    Whole(usize),
    /// Its piecewise graphs.
    Pieces,
}

/// The logits of the last step, from the graphs that ran it.
pub fn logits_of(
    graphs: &mut [DecodeGraph],
    pieces: &mut Option<Piecewise>,
    by: RanBy,
) -> Result<Vec<f32>> {
    match by {
        RanBy::Whole(at) => graphs
            .get_mut(at)
            .ok_or_else(|| cuda_err("logits", format!("no graph {at}")))?
            .logits(),
        RanBy::Pieces => pieces
            .as_mut()
            .ok_or_else(|| cuda_err("logits", "no piecewise graphs"))?
            .logits(),
    }
}

/// Tells `decode_step` whether routing is wanted, without observing anything itself: inside a
/// graph, routing goes to the sink and reaches the real observer after the launch.
struct RoutingTap(bool);

impl RoutingObserver for RoutingTap {
    fn on_routing(&mut self, _: usize, _: usize, _: &[u32], _: &[f32]) {}
    fn wants_routing(&self) -> bool {
        self.0
    }
}

/// What [`step`] did.
pub enum Whole {
    /// The step ran (the cache advanced).
    Ran(Ran),
    /// This step does not run as one graph; the caller runs it another way.
    NotApplicable,
    /// It ran over the resident experts and routing showed a miss: the result was dropped and
    /// the caller runs the step again another way (it rewrites the same KV row).
    Missed,
}

/// Decodes `token` at `cache.len()` through a CUDA graph held in `slot`, capturing (again) when
/// there is none or it no longer fits (capacity doubled, another provider, routing wanted or
/// not). See [`Whole`] for what comes back.
///
/// Two kinds of provider qualify. Native ([`ExpertProvider::graph_safe`]): every step. A
/// selective slot pool whose last step missed nothing ([`ExpertProvider::speculate`]): the step
/// runs over the experts resident now, routing is read back after the launch, and if any
/// selected expert was not resident the result is dropped and the step redone uncaptured (it
/// rewrites the same KV row) — so at a capacity holding the working set, selective decodes at
/// native's speed, and with misses it loses one graph launch per failed guess.
///
/// `graphs` holds one graph per variant of the provider's stacks (see
/// [`ExpertProvider::graph_variant`]): a provider that alternates between two keeps both.
pub fn step(
    graphs: &mut Vec<DecodeGraph>,
    model: &Qwen3Moe,
    cache: &mut KvCache,
    experts: &dyn ExpertProvider,
    observer: &mut dyn RoutingObserver,
    token: u32,
    full: bool,
) -> Result<Whole> {
    if !model.device().is_cuda() || !model.options().cuda_graphs {
        return Ok(Whole::NotApplicable);
    }
    let speculative = if experts.graph_safe() {
        false
    } else if experts.speculate() {
        true
    } else {
        return Ok(Whole::NotApplicable);
    };
    let position = cache.len();
    model.reserve_decode(cache, position + 1)?;
    if speculative {
        experts.prepare_speculation()?;
    }
    let view = ResidentView(experts);
    let runs_on: &dyn ExpertProvider = if speculative { &view } else { experts };
    let want_routing = observer.wants_routing() || speculative;
    let key = provider_key(experts);
    let variant = experts.graph_variant();
    let at = match graphs
        .iter()
        .position(|g| g.fits(cache, key, variant, want_routing))
    {
        Some(i) => {
            graphs[i].replay(token, position)?;
            i
        }
        None => {
            // Drop stale graphs first (this variant's, and any of another cache epoch or
            // provider): their memory goes back before the new capture takes some.
            graphs
                .retain(|g| g.variant != variant && g.epoch == cache.epoch() && g.provider == key);
            graphs.push(DecodeGraph::capture(
                model,
                cache,
                runs_on,
                key,
                variant,
                token,
                want_routing,
            )?);
            graphs.len() - 1
        }
    };
    let g = &mut graphs[at];
    let stream = g.ids.device().as_cuda_device()?.cuda_stream();
    let (row, routed) = g.outputs(&stream, full)?;
    let device_s = g.device_s();
    if speculative {
        let (layers, ids, _) = routed.as_ref().expect("a speculative step reads routing");
        let per_layer: Vec<(usize, Vec<u32>)> = layers.iter().copied().zip(ids.clone()).collect();
        if !experts.settle_speculation(&per_layer) {
            return Ok(Whole::Missed);
        }
    }
    if let (Some((layers, ids, w)), true) = (&routed, observer.wants_routing()) {
        deliver_rows(layers.iter().copied(), ids, w, position, observer);
    }
    cache.advance(1);
    Ok(Whole::Ran(Ran {
        row,
        graph: at,
        device_s,
    }))
}

/// Piecewise CUDA graphs for a selective decode step that must read routing back: one graph up
/// to each MoE layer's experts, one for the experts, one for the start and one for the head.
/// Between a layer's two graphs the host reads the layer's routing (the one synchronisation a
/// miss needs), loads what is missing into the slot pool and writes the slot ids — and the
/// GPU work itself still runs as graphs instead of hundreds of single launches. The pieces run
/// exactly the ops of the uncaptured step, so the result is bit-identical to it.
pub struct Piecewise {
    epoch: u64,
    provider: usize,
    /// Per layer, the slot pool its experts graph was captured with (one pool for all layers
    /// in global scope, one each in layer scope).
    pools: Vec<Option<candle_core::TensorId>>,
    ids: Tensor,
    pos: Tensor,
    dec: DecodeInputs,
    x: Tensor,
    x_mid: Tensor,
    h: Tensor,
    route_ids: Tensor,
    route_w: Tensor,
    slot_ids: Tensor,
    logits: Tensor,
    /// The greedy pick the head ends with, as a whole step's (`super::pick`).
    pick: DevicePick,
    words: HostWords,
    graphs: Option<Pieces>,
    /// Capture failed once: the step still ran (uncaptured pieces); later steps run uncaptured.
    disabled: bool,
    /// What a gated step needs ([`gated_step`]), made at the first one; `gates_refused` once
    /// the device would not take gates (steps then launch layer by layer).
    gated: Option<Gated>,
    gates_refused: bool,
    /// The gated step captured whole ([`WholeGated`]), made at the first gated step that may
    /// use one; `whole_refused` once its capture failed (gated steps then queue the pieces).
    whole: Option<WholeGated>,
    whole_refused: bool,
}

/// A whole gated step as one graph: the start, every layer's attention, each MoE layer's gate
/// kernel and experts, the head — what [`gated_step`] otherwise queues piece by piece. One
/// launch puts the whole step on the gated stream (a stream's bounded queue is not a limit for
/// one operation), and the device goes from layer to layer without a graph boundary between
/// them; the host serves the layers as before.
struct WholeGated {
    graph: CudaGraph,
    /// Whether each gate's layer hands its routing weights to the host too (an observer wants
    /// them).
    weights: bool,
    /// Per layer, the residency table its gate reads (0 for a dense layer): a provider that
    /// makes new tables needs a new capture.
    tables: Vec<sys::CUdeviceptr>,
}

/// A gated step's own stream, its gates, and per MoE layer mapped page-locked words: the
/// layer's routing ids and weights as the gate kernel hands them to the host.
struct Gated {
    stream: Arc<CudaStream>,
    flags: GateFlags,
    words: MappedWords,
}

impl Gated {
    fn new(cuda: &candle_core::CudaDevice, model: &Qwen3Moe) -> Result<Self> {
        let ctx = cuda.cuda_stream().context().clone();
        let stream = ctx.new_stream().map_err(|e| cuda_err("gated stream", e))?;
        let flags = GateFlags::new(&ctx)?;
        let cfg = model.config();
        let words = MappedWords::new(&ctx, cfg.moe_layers().count() * 2 * cfg.num_experts_per_tok)?;
        Ok(Gated {
            stream,
            flags,
            words,
        })
    }
}

struct Pieces {
    start: CudaGraph,
    attention: Vec<CudaGraph>,
    experts: Vec<Option<CudaGraph>>,
    head: CudaGraph,
}

// SAFETY: as for `DecodeGraph`.
unsafe impl Send for Piecewise {}

/// Graphs captured in this process so far (whole steps and pieces): how a test tells a replay of
/// an earlier generation's graph from a fresh capture, whose bits would be the same.
static CAPTURES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many graphs this process has captured ([`CAPTURES`]).
pub fn captures() -> usize {
    CAPTURES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Piecewise steps run through gates in this process ([`gated_step`]): how a test tells them
/// from steps launched layer by layer, whose bits are the same.
static GATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many gated steps this process has run ([`GATED`]).
pub fn gated_steps() -> usize {
    GATED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Gated steps that ran as one graph ([`WholeGated`]), of [`GATED`].
static GATED_WHOLE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many gated steps this process has run as one graph ([`GATED_WHOLE`]).
pub fn gated_whole_steps() -> usize {
    GATED_WHOLE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Records what `body` queues on `stream` as a graph, instantiated and uploaded.
pub(crate) fn capture_piece(
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    body: impl FnOnce() -> Result<()>,
) -> Result<CudaGraph> {
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| cuda_err("capture start", e))?;
    let recorded = body();
    // End the capture whatever happened, or the stream stays unusable.
    let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    recorded?;
    let g = ended
        .map_err(|e| cuda_err("instantiation", e))?
        .ok_or_else(|| cuda_err("capture", "nothing was recorded"))?;
    g.upload().map_err(|e| cuda_err("upload", e))?;
    CAPTURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(g)
}

fn warn_once(e: &ModelError) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("moescope: selective steps without piecewise CUDA graphs: {e}"));
}

/// Runs `f` with candle's host→device upload cache on when `on` (a step that a capture follows).
fn caching_uploads<T>(
    cuda: &candle_core::CudaDevice,
    on: bool,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let _cached = on.then(|| cuda.enable_cuda_graph_htod_cache());
    f()
}

fn launch(g: &CudaGraph) -> Result<()> {
    g.launch().map_err(|e| cuda_err("launch", e))
}

/// The device address of a u32 / f32 tensor's first element (its whole extent checked).
fn device_addr(t: &Tensor) -> Result<sys::CUdeviceptr> {
    let (at, _) = super::raw::device_range(t, 0, t.elem_count() * 4)
        .map_err(|e| cuda_err("host words", e))?;
    Ok(at)
}

/// Where a step's row sits among its host words: the logits, and the greedy pick's two words.
#[derive(Debug, Clone, Copy)]
struct RowAt {
    logits: usize,
    pick: usize,
}

/// Page-locked words the host trades with the device around a graph launch: outputs read back
/// (several async copies, one wait, where reading each tensor costs a wait of its own) and
/// small inputs written (an async copy straight into the static buffer, where a fresh tensor
/// costs an allocation and a copy kernel). Every tensor is contiguous u32 or f32 (f32 as bits).
struct HostWords {
    _mem: PinnedHostSlice<u32>,
    ptr: *mut u32,
    len: usize,
}

impl HostWords {
    fn new(cuda: &candle_core::CudaDevice, len: usize) -> Result<Self> {
        let ctx = cuda.cuda_stream().context().clone();
        // SAFETY: every word is written (by the host or a copy) before it is read.
        let mut mem = unsafe { ctx.alloc_pinned_with_flags::<u32>(len.max(1), 0) }
            .map_err(|e| cuda_err("host words", e))?;
        // cudarc's event on the slice is never recorded: this returns at once.
        let ptr = mem.as_mut_ptr().map_err(|e| cuda_err("host words", e))?;
        Ok(HostWords {
            _mem: mem,
            ptr,
            len,
        })
    }

    fn words(&mut self, at: usize, n: usize) -> &mut [u32] {
        assert!(at + n <= self.len, "host words out of range");
        // SAFETY: in bounds (checked above); the host touches a range only when no copy into
        // or out of it is pending (see `read` and `write`).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), n) }
    }

    /// Queues a copy of `src` into words `at..`; valid once [`wait`](Self::wait) returns.
    fn read(&mut self, stream: &Arc<CudaStream>, at: usize, src: &Tensor) -> Result<()> {
        let from = device_addr(src)?;
        let to = self.words(at, src.elem_count());
        // SAFETY: `src.elem_count()` words each side; read by the host only after `wait`.
        unsafe { result::memcpy_dtoh_async(to, from, stream.cu_stream()) }
            .map_err(|e| cuda_err("read back", e))
    }

    fn wait(&self, stream: &Arc<CudaStream>) -> Result<()> {
        stream.synchronize().map_err(|e| cuda_err("read back", e))
    }

    /// Reads `src` (f32) back now: its copy, the wait, the values.
    fn read_now(&mut self, stream: &Arc<CudaStream>, at: usize, src: &Tensor) -> Result<Vec<f32>> {
        self.read(stream, at, src)?;
        self.wait(stream)?;
        Ok(self.floats(at, src.elem_count()))
    }

    /// Queues the copy of a step's row: every logit (`full`), or only the greedy pick's two
    /// words. Valid once [`wait`](Self::wait) returns; then [`row`](Self::row).
    fn read_row(
        &mut self,
        stream: &Arc<CudaStream>,
        full: bool,
        at: RowAt,
        logits: &Tensor,
        pick: &DevicePick,
    ) -> Result<()> {
        if full {
            self.read(stream, at.logits, logits)
        } else {
            self.read(stream, at.pick, pick.out())
        }
    }

    /// The row [`read_row`](Self::read_row) queued, after the wait.
    fn row(&mut self, full: bool, at: RowAt, vocab: usize) -> Row {
        if full {
            Row::Logits(self.floats(at.logits, vocab))
        } else {
            let w = self.words(at.pick, 2);
            Row::Pick {
                token: w[0],
                numbers: w[1] == 0,
            }
        }
    }

    fn floats(&mut self, at: usize, n: usize) -> Vec<f32> {
        self.words(at, n)
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect()
    }

    /// Queues `values` into `dst` through words `at..`. The caller must not rewrite those
    /// words before the stream has passed this copy (every caller waits on the stream between
    /// two writes of the same words: a routing read, or the step's logits).
    fn write(
        &mut self,
        stream: &Arc<CudaStream>,
        at: usize,
        values: &[u32],
        dst: &Tensor,
    ) -> Result<()> {
        if dst.elem_count() < values.len() {
            return Err(cuda_err("host words", "destination too small"));
        }
        let to = device_addr(dst)?;
        let w = self.words(at, values.len());
        w.copy_from_slice(values);
        // SAFETY: `dst` holds at least `values.len()` words (checked above).
        unsafe { result::memcpy_htod_async(to, &*w, stream.cu_stream()) }
            .map_err(|e| cuda_err("host words", e))
    }
}

impl Piecewise {
    fn new(model: &Qwen3Moe, cache: &KvCache, provider: usize) -> Result<Self> {
        let dev = model.device().clone();
        let cfg = model.config();
        let (h, k, dt) = (cfg.hidden_size, cfg.num_experts_per_tok, model.dtype());
        let (nkv, d, cap) = (
            cfg.num_key_value_heads,
            cfg.head_dim,
            cache.static_capacity(),
        );
        Ok(Piecewise {
            epoch: cache.epoch(),
            provider,
            pools: Vec::new(),
            ids: Tensor::zeros(1, DType::U32, &dev)?,
            pos: Tensor::zeros(1, DType::U32, &dev)?,
            dec: DecodeInputs {
                cos: Tensor::zeros((1, d / 2), dt, &dev)?,
                sin: Tensor::zeros((1, d / 2), dt, &dev)?,
                rows: Tensor::zeros((nkv, 1, d), DType::U32, &dev)?,
                mask: Tensor::zeros(cap, dt, &dev)?,
            },
            x: Tensor::zeros((1, h), dt, &dev)?,
            x_mid: Tensor::zeros((1, h), dt, &dev)?,
            h: Tensor::zeros((1, h), dt, &dev)?,
            route_ids: Tensor::zeros((1, k), DType::U32, &dev)?,
            route_w: Tensor::zeros((1, k), DType::F32, &dev)?,
            slot_ids: Tensor::zeros((1, k), DType::U32, &dev)?,
            logits: Tensor::zeros((1, cfg.vocab_size), DType::F32, &dev)?,
            pick: DevicePick::new(&dev)?,
            // [token] [position] [routing ids; k] [routing weights; k] [slot ids; k] [logits]
            // [pick; 2]
            words: HostWords::new(dev.as_cuda_device()?, 2 + 3 * k + cfg.vocab_size + 2)?,
            graphs: None,
            disabled: false,
            gated: None,
            gates_refused: false,
            whole: None,
            whole_refused: false,
        })
    }

    /// Whether this step can be gated: the gates made (the first time) and taken by the device.
    fn gates_ready(&mut self, cuda: &candle_core::CudaDevice, model: &Qwen3Moe) -> bool {
        if self.gated.is_some() {
            return true;
        }
        if self.gates_refused {
            return false;
        }
        if !super::gates::apply(cuda.cuda_stream().context()) {
            self.gates_refused = true;
            return false;
        }
        match Gated::new(cuda, model) {
            Ok(g) => {
                self.gated = Some(g);
                true
            }
            Err(e) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    eprintln!("moescope: piecewise steps launched layer by layer: {e}")
                });
                self.gates_refused = true;
                false
            }
        }
    }

    /// The last piece: the logits from the final hidden state, then the greedy pick over them.
    fn head(&self, model: &Qwen3Moe) -> Result<()> {
        model.piece_head(&self.x, &self.logits)?;
        self.pick.launch(&self.logits)
    }

    /// Where the logits and the pick's two words sit among the host words.
    fn row_at(&self) -> RowAt {
        let logits = 2 + 3 * self.route_ids.elem_count();
        RowAt {
            logits,
            pick: logits + self.logits.elem_count(),
        }
    }

    /// The logits of the last step, read back from the static buffer (valid until the next).
    fn logits(&mut self) -> Result<Vec<f32>> {
        let stream = self.ids.device().as_cuda_device()?.cuda_stream();
        self.words
            .read_now(&stream, self.row_at().logits, &self.logits)
    }

    /// Records every piece (after a step ran them uncaptured, which filled candle's caches).
    fn capture(
        &mut self,
        model: &Qwen3Moe,
        cache: &mut KvCache,
        experts: &dyn ExpertProvider,
        cuda: &candle_core::CudaDevice,
    ) -> Result<()> {
        let stream = cuda.cuda_stream();
        let _cache_uploads = cuda.enable_cuda_graph_htod_cache();
        let start = capture_piece(&stream, || {
            model.piece_start(&self.ids, &self.pos, cache, &self.dec, &self.x)
        })?;
        let mut attention = Vec::new();
        let mut expert_graphs = Vec::new();
        let mut pools = Vec::new();
        for l in 0..model.config().num_hidden_layers {
            attention.push(capture_piece(&stream, || {
                model.piece_attention(
                    l,
                    cache,
                    &self.dec,
                    &self.x,
                    &self.x_mid,
                    &self.h,
                    &self.route_ids,
                    &self.route_w,
                )
            })?);
            let g = if model.is_moe_layer(l) {
                let Some(st) = experts.resident_stacks(l)? else {
                    return Err(cuda_err("capture", format!("layer {l} has no slot pool")));
                };
                pools.push(Some(st.gate_up.id()));
                Some(capture_piece(&stream, || {
                    model.piece_experts(
                        &st,
                        &self.x_mid,
                        &self.h,
                        &self.slot_ids,
                        &self.route_w,
                        &self.x,
                    )
                })?)
            } else {
                pools.push(None);
                None
            };
            expert_graphs.push(g);
        }
        let head = capture_piece(&stream, || self.head(model))?;
        self.pools = pools;
        self.graphs = Some(Pieces {
            start,
            attention,
            experts: expert_graphs,
            head,
        });
        Ok(())
    }
}

impl Piecewise {
    /// Makes sure a whole gated step ([`WholeGated`]) fits this one — captured with `weights`
    /// over `tables` — capturing it when there is none or it does not; false when it cannot be
    /// had (its capture failed once: said once, and gated steps queue the pieces from then on).
    fn whole_ready(
        &mut self,
        model: &Qwen3Moe,
        cache: &mut KvCache,
        experts: &dyn ExpertProvider,
        cuda: &candle_core::CudaDevice,
        weights: bool,
        tables: &[sys::CUdeviceptr],
    ) -> bool {
        if self.whole_refused {
            return false;
        }
        if self
            .whole
            .as_ref()
            .is_some_and(|w| w.weights == weights && w.tables == tables)
        {
            return true;
        }
        // The old graph's memory goes back before the new capture takes some.
        self.whole = None;
        match self.capture_whole(model, cache, experts, cuda, weights, tables) {
            Ok(graph) => {
                self.whole = Some(WholeGated {
                    graph,
                    weights,
                    tables: tables.to_vec(),
                });
                true
            }
            Err(e) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    eprintln!("moescope: gated steps queued piece by piece, not as one graph: {e}")
                });
                self.whole_refused = true;
                false
            }
        }
    }

    /// Records the gated step whole on candle's stream: the ops of every piece in the order
    /// [`gated_step`] queues them, each MoE layer's gate between its attention and its experts
    /// (the pieces' own captures ran first, so every parameter the ops upload is in candle's
    /// cache). Nothing runs: a gate recorded here cannot wait.
    fn capture_whole(
        &self,
        model: &Qwen3Moe,
        cache: &mut KvCache,
        experts: &dyn ExpertProvider,
        cuda: &candle_core::CudaDevice,
        weights: bool,
        tables: &[sys::CUdeviceptr],
    ) -> Result<CudaGraph> {
        let g = self
            .gated
            .as_ref()
            .ok_or_else(|| cuda_err("whole gated step", "no gates"))?;
        let cfg = model.config();
        let k = cfg.num_experts_per_tok;
        let mut stacks = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            if !model.is_moe_layer(l) {
                stacks.push(None);
                continue;
            }
            let st = experts
                .resident_stacks(l)?
                .ok_or_else(|| cuda_err("whole gated step", format!("layer {l}: no slot pool")))?;
            // The host checks each layer's experts against the pool its pieces read: the
            // whole step must read the same one.
            if self.pools.get(l).copied().flatten() != Some(st.gate_up.id()) {
                return Err(cuda_err(
                    "whole gated step",
                    format!("layer {l}: not the slot pool of its pieces"),
                ));
            }
            stacks.push(Some(st));
        }
        super::gates::preload(cuda)?;
        let main = cuda.cuda_stream();
        let word = |at: usize| g.words.device(at);
        let slot_ids = device_addr(&self.slot_ids)?;
        let _cache_uploads = cuda.enable_cuda_graph_htod_cache();
        capture_piece(&main, || {
            model.piece_start(&self.ids, &self.pos, cache, &self.dec, &self.x)?;
            let mut x = self.x.clone();
            let mut i = 0usize;
            for (l, st) in stacks.iter().enumerate() {
                let mut gate = |ids: &Tensor, w: &Tensor| -> Result<Tensor> {
                    let (at, point) = (i * 2 * k, i as u32 + 1);
                    if weights {
                        copy_words(cuda, &main, device_addr(w)?, word(at + k), k)?;
                    }
                    gate_layer(
                        cuda,
                        &main,
                        &g.flags,
                        point,
                        device_addr(ids)?,
                        tables[l],
                        k,
                        word(at),
                        slot_ids,
                    )?;
                    i += 1;
                    Ok(self.slot_ids.clone())
                };
                x = model.layer_gated(l, cache, &self.dec, &x, st.as_ref(), &mut gate)?;
            }
            model.piece_head(&x, &self.logits)?;
            self.pick.launch(&self.logits)
        })
    }
}

/// A selective decode step through piecewise graphs (see [`Piecewise`]); `Ok(None)` where it
/// does not apply (CPU, graphs off, no slot pool, dtypes or sizes the kernels do not cover).
pub fn piecewise_step(
    slot: &mut Option<Piecewise>,
    model: &Qwen3Moe,
    cache: &mut KvCache,
    experts: &dyn ExpertProvider,
    observer: &mut dyn RoutingObserver,
    token: u32,
    full: bool,
) -> Result<Option<Row>> {
    let Device::Cuda(cuda) = model.device() else {
        return Ok(None);
    };
    let cfg = model.config();
    let applies = model.options().cuda_graphs
        && model.options().moe_kernel
        && super::moe_decode::applies(1, model.dtype(), cfg.num_experts_per_tok)
        && cfg.num_experts <= super::moe_decode::MAX_EXPERTS
        && experts.needs_ids_on_host()
        && !experts.wants_hints()
        && cfg.moe_layers().all(|l| experts.unavailable(l).is_empty())
        && cfg
            .moe_layers()
            .next()
            .map(|l| experts.resident_stacks(l))
            .transpose()?
            .flatten()
            .is_some();
    if !applies {
        return Ok(None);
    }
    let position = cache.len();
    model.reserve_decode(cache, position + 1)?;
    let key = provider_key(experts);
    if slot.as_ref().is_some_and(|p| p.disabled) {
        return Ok(None);
    }
    if !matches!(slot, Some(p) if p.epoch == cache.epoch() && p.provider == key) {
        *slot = None;
        *slot = Some(Piecewise::new(model, cache, key)?);
    }
    let p = slot.as_mut().expect("just set");
    if p.graphs.is_some()
        && model.options().gated_pieces
        && experts.serves_a_token_from_pools()
        && p.gates_ready(cuda, model)
    {
        let row = gated_step(
            p, model, cache, experts, observer, cuda, token, position, full,
        )?;
        cache.advance(1);
        return Ok(Some(row));
    }
    let stream = cuda.cuda_stream();
    let k = cfg.num_experts_per_tok;
    p.words.write(&stream, 0, &[token], &p.ids)?;
    p.words.write(&stream, 1, &[position as u32], &p.pos)?;
    let capture_after = p.graphs.is_none();
    let want_w = observer.wants_routing();
    // The first step runs every piece uncaptured, with candle's upload cache on so that the
    // capture after it finds every parameter it needs.
    caching_uploads(cuda, capture_after, || match &p.graphs {
        Some(g) => launch(&g.start),
        None => model.piece_start(&p.ids, &p.pos, cache, &p.dec, &p.x),
    })?;
    for l in 0..cfg.num_hidden_layers {
        caching_uploads(cuda, capture_after, || match &p.graphs {
            Some(g) => launch(&g.attention[l]),
            None => model.piece_attention(
                l,
                cache,
                &p.dec,
                &p.x,
                &p.x_mid,
                &p.h,
                &p.route_ids,
                &p.route_w,
            ),
        })?;
        if !model.is_moe_layer(l) {
            continue;
        }
        // The host's part: this layer's routing, its misses loaded, slot ids written.
        p.words.read(&stream, 2, &p.route_ids)?;
        if want_w {
            p.words.read(&stream, 2 + k, &p.route_w)?;
        }
        p.words.wait(&stream)?;
        let ids = p.words.words(2, k).to_vec();
        if want_w {
            observer.on_routing(l, position, &ids, &p.words.floats(2 + k, k));
        }
        let mut needed: Vec<usize> = ids.iter().map(|&e| e as usize).collect();
        needed.sort_unstable();
        needed.dedup();
        experts.will_use(l, &needed);
        let Some(st) = experts.stacked(l, &needed)? else {
            return Err(cuda_err(
                "piecewise step",
                format!("layer {l}: no stacked experts"),
            ));
        };
        let Some(index) = &st.index else {
            return Err(cuda_err(
                "piecewise step",
                format!("layer {l}: no slot index"),
            ));
        };
        let slots: Vec<u32> = ids.iter().map(|&e| index[e as usize]).collect();
        p.words.write(&stream, 2 + 2 * k, &slots, &p.slot_ids)?;
        let same_pool = p.pools.get(l).copied().flatten() == Some(st.gate_up.id());
        caching_uploads(cuda, capture_after, || match (&p.graphs, same_pool) {
            (Some(g), true) => launch(g.experts[l].as_ref().expect("a MoE layer's graph")),
            // First step, or a temporary stack (the pool cannot hold the layer's experts at
            // once): the same ops, launched one by one.
            _ => model.piece_experts(&st, &p.x_mid, &p.h, &p.slot_ids, &p.route_w, &p.x),
        })?;
    }
    caching_uploads(cuda, capture_after, || match &p.graphs {
        Some(g) => launch(&g.head),
        None => p.head(model),
    })?;
    let at = p.row_at();
    p.words.read_row(&stream, full, at, &p.logits, &p.pick)?;
    p.words.wait(&stream)?;
    let row = p.words.row(full, at, cfg.vocab_size);
    // The step has run and been counted: a failed capture must not make the caller run it again.
    if capture_after && let Err(e) = p.capture(model, cache, experts, cuda) {
        warn_once(&e);
        p.graphs = None;
        p.disabled = true;
    }
    cache.advance(1);
    Ok(Some(row))
}

/// A piecewise step queued ahead of the host on the gated stream (`super::gates`): the start,
/// then per layer its attention graph and, for a MoE layer, its gate kernel (routing out to
/// the host; slot ids from the layer's exact residency table, waiting for the host only when an
/// expert is not resident) and its experts graph; then the head. With `gated_whole` all of it
/// is one graph ([`WholeGated`]) launched at once, the same ops less the pieces' copies. The host serves the layers in
/// order as the layer-by-layer step does — the same calls in the same order, so the same cache
/// decisions and the same slots, hence the same bits — and after a layer that loaded experts
/// brings the tables up to date before it opens the layer's point. A layer that misses nothing
/// never waits for the host.
///
/// If anything fails half-way every point is opened (a gate still missing an expert then reads
/// slot 0, so the queued pieces run on to the end inside the pool) and the step's results are
/// dropped with the error.
#[allow(clippy::too_many_arguments)]
fn gated_step(
    p: &mut Piecewise,
    model: &Qwen3Moe,
    cache: &mut KvCache,
    experts: &dyn ExpertProvider,
    observer: &mut dyn RoutingObserver,
    cuda: &candle_core::CudaDevice,
    token: u32,
    position: usize,
    full: bool,
) -> Result<Row> {
    let cfg = model.config();
    let k = cfg.num_experts_per_tok;
    let want_w = observer.wants_routing();
    let row_at = p.row_at();
    let main = cuda.cuda_stream();
    let mut tables = vec![0; cfg.num_hidden_layers];
    for l in cfg.moe_layers() {
        let t = experts
            .residency_table(l)?
            .ok_or_else(|| cuda_err("gated step", format!("layer {l} has no residency table")))?;
        tables[l] = device_addr(&t)?;
    }
    let whole =
        model.options().gated_whole && p.whole_ready(model, cache, experts, cuda, want_w, &tables);
    let Piecewise {
        ids: token_in,
        pos,
        route_ids,
        route_w,
        slot_ids,
        logits,
        pick,
        words,
        graphs,
        pools,
        gated,
        whole: whole_graph,
        ..
    } = p;
    let graphs = graphs.as_ref().expect("gated steps replay captured pieces");
    let whole_graph = whole_graph.as_ref().filter(|_| whole).map(|w| &w.graph);
    let g = gated.as_mut().expect("made by gates_ready");
    let s = g.stream.clone();
    // Loads and evictions since the last gated step (the prompt's, say) reach the tables first.
    experts.sync_residency()?;
    // The step follows everything on candle's stream: the prompt, the KV cache grown for this
    // position, the last step's reads.
    let before = main
        .record_event(None)
        .map_err(|e| cuda_err("gated step", e))?;
    s.wait(&before).map_err(|e| cuda_err("gated step", e))?;
    g.flags.reset();
    words.write(&s, 0, &[token], token_in)?;
    words.write(&s, 1, &[position as u32], pos)?;
    match whole_graph {
        Some(w) => {
            launch_on(w, &s)?;
            words.read_row(&s, full, row_at, logits, pick)?;
        }
        None => launch_on(&graphs.start, &s)?,
    }
    let moe: Vec<usize> = cfg.moe_layers().collect();
    let words_at = g.words.device(0);
    let word = |at: usize| words_at + (at * 4) as u64;
    let flags = &g.flags;
    // Layers are queued a few MoE layers ahead of the one being served, not all at once: a
    // stream holds a bounded number of queued operations, and a stream waiting at a gate while
    // the host queues the rest of the step would wait for all of it.
    let (mut next_layer, mut queued_moe, mut head_queued) = (0usize, 0usize, false);
    let mut queue_to = |target: usize| -> Result<()> {
        if whole_graph.is_some() {
            return Ok(());
        }
        while queued_moe < target && next_layer < cfg.num_hidden_layers {
            let l = next_layer;
            next_layer += 1;
            launch_on(&graphs.attention[l], &s)?;
            if !model.is_moe_layer(l) {
                continue;
            }
            let (at, point) = (queued_moe * 2 * k, queued_moe as u32 + 1);
            if want_w {
                copy_words(cuda, &s, device_addr(route_w)?, word(at + k), k)?;
            }
            gate_layer(
                cuda,
                &s,
                flags,
                point,
                device_addr(route_ids)?,
                tables[l],
                k,
                word(at),
                device_addr(slot_ids)?,
            )?;
            let experts_graph = graphs.experts[l]
                .as_ref()
                .ok_or_else(|| cuda_err("gated step", format!("layer {l} has no experts graph")))?;
            launch_on(experts_graph, &s)?;
            queued_moe += 1;
        }
        while next_layer < cfg.num_hidden_layers && !model.is_moe_layer(next_layer) {
            launch_on(&graphs.attention[next_layer], &s)?;
            next_layer += 1;
        }
        if next_layer == cfg.num_hidden_layers && !head_queued {
            head_queued = true;
            launch_on(&graphs.head, &s)?;
            words.read_row(&s, full, row_at, logits, pick)?;
        }
        Ok(())
    };
    const AHEAD: usize = 4;
    let served = (|| -> Result<()> {
        for (i, &l) in moe.iter().enumerate() {
            queue_to(i + AHEAD)?;
            let (at, point) = (i * 2 * k, i as u32 + 1);
            flags.await_signal(&s, point)?;
            let ids = g.words.words(at, k).to_vec();
            if want_w {
                let w: Vec<f32> = g
                    .words
                    .words(at + k, k)
                    .iter()
                    .map(|&b| f32::from_bits(b))
                    .collect();
                observer.on_routing(l, position, &ids, &w);
            }
            let mut needed: Vec<usize> = ids.iter().map(|&e| e as usize).collect();
            needed.sort_unstable();
            needed.dedup();
            experts.will_use(l, &needed);
            let st = experts
                .stacked(l, &needed)?
                .ok_or_else(|| cuda_err("gated step", format!("layer {l}: no stacked experts")))?;
            if pools.get(l).copied().flatten() != Some(st.gate_up.id()) {
                return Err(cuda_err(
                    "gated step",
                    format!("layer {l}: its experts are not in the pool its graph reads"),
                ));
            }
            // A layer that loaded experts (and evicted others) updates the tables, and its
            // gate, waiting on the device, reads them once they and the loads have landed.
            if experts.sync_residency()? {
                finish(&main)?;
            }
            flags.open(point);
        }
        queue_to(usize::MAX)
    })();
    if let Err(e) = served {
        // Whatever was queued runs on to the end (every gate open, slots from the pool's
        // range) before the error goes back: nothing may still be using the step's buffers.
        g.flags.open_all();
        let _ = s.synchronize();
        return Err(e);
    }
    words.wait(&s)?;
    GATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if whole_graph.is_some() {
        GATED_WHOLE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(words.row(full, row_at, cfg.vocab_size))
}
