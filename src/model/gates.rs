//! Gates between the host and a stream for a selective step queued whole: at each MoE layer a
//! one-warp kernel (`kernels/words.cu`, `gate_layer`) hands the layer's routing to the host
//! through mapped page-locked memory and looks its experts up in an exact device residency
//! table. When all are resident it goes on at once; when one is not it waits until the host —
//! which serves every layer in order, loading misses and keeping the table — opens the layer's
//! point.
//!
//! Why: a piecewise step launched each layer's experts graph only after the host had read the
//! layer's routing back, so the device sat idle between layers for the round trip — ~23 µs a
//! layer at 48 layers on an H200, a step's 4.1 ms against native's 3.0 (BENCHMARKS.md §93).
//! Queued ahead, with the host out of the loop for layers that miss nothing, a layer costs one
//! small kernel. (Gating every layer on the host, with stream memory operations, measured no
//! better than the round trip it replaced: §93.) The step runs as **one graph**, its gates
//! inside (`graph.rs`'s `WholeGated`): no graph boundary and none of the pieces' static copies
//! between layers, so a step that misses nothing runs at 0.97–0.99× native's graph (§94); the
//! pieces queued a few layers ahead stay as the fallback (`MOESCOPE_GATES=pieces`).
//!
//! The one rule that keeps this from deadlocking: while the stream waits, nothing the host does
//! may wait for it — likely a kernel loaded for the first time too (with CUDA's lazy loading a
//! first load waits for an idle device; BENCHMARKS.md §95): every kernel launched meanwhile has
//! run, or been fetched, before the step is queued. The misses' copies go on candle's stream (or one it waits for), which the
//! waiting stream does not hold up; frees are stream-ordered (`cuMemFreeAsync`), so a gated
//! step needs a device with memory pools; no page-locked memory is allocated or registered
//! meanwhile (the staging buffers are sized for the largest expert up front, and steps are
//! gated only once the expert files are registered); and the pieces are queued a few layers
//! ahead, never all at once (a stream holds a bounded number of queued operations; the whole
//! step as one graph is one operation).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaStream, DeviceRepr, LaunchConfig, PinnedHostSlice,
    PushKernelArg, sys,
};

use super::error::{ModelError, Result};

fn gate_err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Input(format!("CUDA gate {what}: {e}"))
}

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(gate_err(what, format!("{e:?}"))),
    }
}

/// Whether gated steps are used on this device: a discrete GPU with stream-ordered frees (a
/// plain free would synchronise the device, waiting stream included). Not on an integrated
/// GPU (the Jetson Thor): measured on a discrete one only (BENCHMARKS.md §93) — whether an
/// integrated one sees the mapped words as promptly, and gains, is not known.
pub fn apply(ctx: &Arc<CudaContext>) -> bool {
    let integrated = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_INTEGRATED)
        .is_ok_and(|v| v != 0);
    !integrated && ctx.has_async_alloc()
}

/// Where the two words sit in the page-locked pair.
const SIGNAL: usize = 0;
const GO: usize = 1;

/// Two page-locked, device-mapped words: the last point a gate kernel has signalled, and the
/// last point the host has opened. Points are numbered from 1 within a step ([`reset`](Self::reset)
/// between steps, while the stream is idle).
pub struct GateFlags {
    words: MappedWords,
}

impl GateFlags {
    /// Allocates the words, both 0.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        Ok(GateFlags {
            words: MappedWords::new(ctx, 2)?,
        })
    }

    /// On the device only the gate kernel touches the words (writes SIGNAL, polls GO).
    fn word(&self, i: usize) -> &AtomicU32 {
        self.words.atomic(i)
    }

    /// Both words back to 0, for the next step. Only while no gate kernel is queued (the last
    /// step was waited for).
    pub fn reset(&self) {
        self.word(SIGNAL).store(0, Ordering::SeqCst);
        self.word(GO).store(0, Ordering::SeqCst);
    }

    /// The device addresses of the signal word (the gate kernel writes it) and the go word
    /// (it polls it).
    pub fn signal_addr(&self) -> sys::CUdeviceptr {
        self.words.device(SIGNAL)
    }
    pub fn go_addr(&self) -> sys::CUdeviceptr {
        self.words.device(GO)
    }

    /// Spins until the stream has signalled point `n`. Every few thousand turns it asks the
    /// stream how it is: an error on it, or the stream finished without the signal, ends the
    /// wait with an error instead of spinning for ever.
    pub fn await_signal(&self, stream: &CudaStream, n: u32) -> Result<()> {
        let mut turns = 0u32;
        while self.word(SIGNAL).load(Ordering::Acquire) < n {
            std::hint::spin_loop();
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(4096) {
                // SAFETY: a live stream of this context.
                match unsafe { sys::cuStreamQuery(stream.cu_stream()) } {
                    sys::CUresult::CUDA_ERROR_NOT_READY => {}
                    sys::CUresult::CUDA_SUCCESS => {
                        if self.word(SIGNAL).load(Ordering::Acquire) < n {
                            return Err(gate_err(
                                "signal",
                                format!("the stream finished without reaching point {n}"),
                            ));
                        }
                    }
                    e => return Err(gate_err("signal", format!("{e:?}"))),
                }
            }
        }
        Ok(())
    }

    /// Lets a gate kernel waiting at point `n` (or before) go on. The table updates it then
    /// reads were waited for before (on candle's stream); the store is a release all the same.
    pub fn open(&self, n: u32) {
        self.word(GO).store(n, Ordering::Release);
    }

    /// Lets the stream past every point (a step given up half-way: its results are dropped).
    pub fn open_all(&self) {
        self.open(u32::MAX);
    }
}

/// Launches a captured graph on `stream` (not necessarily the one it was captured on).
pub fn launch_on(g: &CudaGraph, stream: &CudaStream) -> Result<()> {
    // SAFETY: a live instantiated graph and stream of the same context.
    check("graph launch", unsafe {
        sys::cuGraphLaunch(g.cu_graph_exec(), stream.cu_stream())
    })
}

/// Waits for what candle's stream holds (a step's miss copies), without a driver call's wait
/// when it is already idle.
pub fn finish(stream: &CudaStream) -> Result<()> {
    // SAFETY: a live stream.
    match unsafe { sys::cuStreamQuery(stream.cu_stream()) } {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        sys::CUresult::CUDA_ERROR_NOT_READY => {
            stream.synchronize().map_err(|e| gate_err("miss copies", e))
        }
        e => Err(gate_err("miss copies", format!("{e:?}"))),
    }
}

const WORDS_PTX: &str = include_str!("kernels/words.ptx");
/// `copy_words` and `gate_layer` run as one block of one warp.
const ONE_WARP: LaunchConfig = LaunchConfig {
    grid_dim: (1, 1, 1),
    block_dim: (32, 1, 1),
    shared_mem_bytes: 0,
};
const WORDS_MODULE: &str = "moescope_words";

/// Loads the kernels of `words.cu` now: a capture (a whole gated step recorded as one graph)
/// must not load a module while the stream records.
pub fn preload(cuda: &candle_core::CudaDevice) -> Result<()> {
    for name in ["copy_words", "gate_layer", "copy_runs3", "scatter_words"] {
        cuda.get_or_load_custom_func(name, WORDS_MODULE, WORDS_PTX)?;
    }
    Ok(())
}

/// Queues `n` words (at most 1,024) from device address `src` to `dst` on `stream`, by a
/// one-block kernel (`kernels/words.cu`): either side may be mapped host memory.
pub fn copy_words(
    cuda: &candle_core::CudaDevice,
    stream: &Arc<CudaStream>,
    src: sys::CUdeviceptr,
    dst: sys::CUdeviceptr,
    n: usize,
) -> Result<()> {
    if n == 0 || n > 1024 {
        return Err(gate_err(
            "word copy",
            format!("{n} words: 1 to 1,024 wanted"),
        ));
    }
    let f = cuda
        .get_or_load_custom_func("copy_words", WORDS_MODULE, WORDS_PTX)?
        .into_cuda_function();
    let n_ = n as i32;
    let mut b = stream.launch_builder(&f);
    b.arg(&src).arg(&dst).arg(&n_);
    // SAFETY: the callers pass live device addresses of at least `n` words each.
    unsafe { b.launch(ONE_WARP) }
        .map(|_| ())
        .map_err(|e| gate_err("word copy", e))
}

/// `words.cu`'s `copy_runs3`, fetched now — before any step is queued, so that no launch of it
/// is its first load while a gated step waits (the module doc's rule) — for [`copy_runs3`].
pub fn runs_copier(cuda: &candle_core::CudaDevice) -> Result<CudaFunction> {
    Ok(cuda
        .get_or_load_custom_func("copy_runs3", WORDS_MODULE, WORDS_PTX)?
        .into_cuda_function())
}

/// Queues up to three runs of bytes — (source address, destination address, bytes), either
/// address device memory or mapped host memory — on `stream` as one kernel of a block per run
/// (`words.cu`'s `copy_runs3`, from [`runs_copier`]). Why: an FP8 miss's three block-scale
/// tables are a few hundred bytes each, and a copy-engine copy that small cost ~9 µs of the
/// copy engine's time on an H200 (BENCHMARKS.md §103).
pub fn copy_runs3(
    f: &CudaFunction,
    stream: &Arc<CudaStream>,
    runs: &[(sys::CUdeviceptr, sys::CUdeviceptr, usize)],
) -> Result<()> {
    if runs.len() > 3 || runs.iter().any(|r| r.2 > i32::MAX as usize) {
        return Err(gate_err(
            "run copy",
            format!("{} runs: at most 3 of under 2 GiB wanted", runs.len()),
        ));
    }
    let mut args = [(0u64, 0u64, 0i32); 3];
    for (a, &(s, d, n)) in args.iter_mut().zip(runs) {
        *a = (s, d, n as i32);
    }
    let [(s0, d0, n0), (s1, d1, n1), (s2, d2, n2)] = args;
    let mut b = stream.launch_builder(f);
    b.arg(&s0).arg(&d0).arg(&n0);
    b.arg(&s1).arg(&d1).arg(&n1);
    b.arg(&s2).arg(&d2).arg(&n2);
    let cfg = LaunchConfig {
        grid_dim: (3, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the callers pass live device addresses of at least each run's bytes; an absent
    // run has no bytes and its block does nothing.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| gate_err("run copy", e))
}

/// Words a [`WordScatter`] launch carries in its arguments (`words.cu`'s `SCATTER_MAX`).
pub const SCATTER_MAX: usize = 100;

/// `words.cu`'s `ScatterWords`, field for field: the launch's argument block.
#[repr(C)]
#[derive(Clone, Copy)]
struct ScatterArgs {
    n: u32,
    pad: u32,
    addr: [u64; SCATTER_MAX],
    val: [u32; SCATTER_MAX],
}

// SAFETY: plain integers in C's layout, as the kernel declares them.
unsafe impl DeviceRepr for ScatterArgs {}

/// Writes 32-bit words to scattered device addresses by one small kernel a hundred words
/// (`words.cu`'s `scatter_words`), the addresses and values in the launch's arguments. Why:
/// keeping the residency tables by a fresh tensor and a copy per changed table cost 32–65 µs of
/// the host's time for every layer that missed (BENCHMARKS.md §95); the arguments are copied
/// when the kernel is queued, so nothing on the host has to outlive the launch. The kernel is
/// fetched when this is made, before any step is queued (the module doc's rule).
pub struct WordScatter {
    f: CudaFunction,
    stream: Arc<CudaStream>,
}

impl WordScatter {
    pub fn new(cuda: &candle_core::CudaDevice) -> Result<Self> {
        Ok(WordScatter {
            f: cuda
                .get_or_load_custom_func("scatter_words", WORDS_MODULE, WORDS_PTX)?
                .into_cuda_function(),
            stream: cuda.cuda_stream(),
        })
    }

    /// Queues `words` (device address, value) on candle's stream; an address given twice gets
    /// either value, so callers give each once.
    pub fn scatter(&self, words: &[(sys::CUdeviceptr, u32)]) -> Result<()> {
        for chunk in words.chunks(SCATTER_MAX) {
            let mut a = ScatterArgs {
                n: chunk.len() as u32,
                pad: 0,
                addr: [0; SCATTER_MAX],
                val: [0; SCATTER_MAX],
            };
            for (i, &(at, v)) in chunk.iter().enumerate() {
                a.addr[i] = at;
                a.val[i] = v;
            }
            let mut b = self.stream.launch_builder(&self.f);
            b.arg(&a);
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the callers pass live, 4-byte aligned device addresses of u32 words.
            unsafe { b.launch(cfg) }
                .map(|_| ())
                .map_err(|e| gate_err("word scatter", e))?;
        }
        Ok(())
    }
}

/// Page-locked words mapped into the device's address space: host-side slices, device-side
/// addresses (what [`copy_words`] reads and writes).
pub struct MappedWords {
    _mem: PinnedHostSlice<u32>,
    host: *mut u32,
    device: sys::CUdeviceptr,
    len: usize,
}

// SAFETY: touched by the thread stepping the generation only.
unsafe impl Send for MappedWords {}

impl MappedWords {
    /// `len` words, all 0.
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        // SAFETY: zeroed below before anything reads them.
        let mut mem = unsafe {
            ctx.alloc_pinned_with_flags::<u32>(len.max(1), sys::CU_MEMHOSTALLOC_DEVICEMAP)
        }
        .map_err(|e| gate_err("host words", e))?;
        let host = mem.as_mut_ptr().map_err(|e| gate_err("host words", e))?;
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: a live page-locked allocation made with DEVICEMAP.
        check("host words", unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut device, host as *mut std::ffi::c_void, 0)
        })?;
        let mut w = MappedWords {
            _mem: mem,
            host,
            device,
            len: len.max(1),
        };
        w.words(0, w.len).fill(0);
        Ok(w)
    }

    /// Words `at..at + n` on the host. Read only after the stream has signalled that it wrote
    /// them; written only while no kernel behind an open gate reads them.
    pub fn words(&mut self, at: usize, n: usize) -> &mut [u32] {
        assert!(at + n <= self.len, "mapped words out of range");
        // SAFETY: in bounds; see above for who touches them when.
        unsafe { std::slice::from_raw_parts_mut(self.host.add(at), n) }
    }

    /// Word `at` as an atomic, for words the host and a kernel trade while both run.
    pub fn atomic(&self, at: usize) -> &AtomicU32 {
        assert!(at < self.len, "mapped words out of range");
        // SAFETY: an aligned u32 in bounds, alive as long as `self`.
        unsafe { AtomicU32::from_ptr(self.host.add(at)) }
    }

    /// The device address of word `at`.
    pub fn device(&self, at: usize) -> sys::CUdeviceptr {
        assert!(at < self.len, "mapped words out of range");
        self.device + (at * 4) as u64
    }
}

/// Queues the gate of one MoE layer (`gate_layer` in `kernels/words.cu`, one warp): the routed
/// ids at `route_ids` out to `host_ids` and a signal of `point`; their slots from `table` into
/// `slot_ids`, waiting for the host to open `point` when one is not resident.
#[allow(clippy::too_many_arguments)]
pub fn gate_layer(
    cuda: &candle_core::CudaDevice,
    stream: &Arc<CudaStream>,
    flags: &GateFlags,
    point: u32,
    route_ids: sys::CUdeviceptr,
    table: sys::CUdeviceptr,
    k: usize,
    host_ids: sys::CUdeviceptr,
    slot_ids: sys::CUdeviceptr,
) -> Result<()> {
    if k == 0 || k > 32 {
        return Err(gate_err("gate", format!("top-{k}: one warp takes 1 to 32")));
    }
    let f = cuda
        .get_or_load_custom_func("gate_layer", WORDS_MODULE, WORDS_PTX)?
        .into_cuda_function();
    let (k_, signal, go) = (k as i32, flags.signal_addr(), flags.go_addr());
    let mut b = stream.launch_builder(&f);
    b.arg(&route_ids)
        .arg(&table)
        .arg(&k_)
        .arg(&host_ids)
        .arg(&signal)
        .arg(&point)
        .arg(&go)
        .arg(&slot_ids);
    // SAFETY: the callers pass live device addresses: k ids, a table over every expert id the
    // router can give, k host words, k slot words; the flags' two mapped words.
    unsafe { b.launch(ONE_WARP) }
        .map(|_| ())
        .map_err(|e| gate_err("gate", e))
}
