//! Host → device copies straight into a slot of a preallocated pool: no temporary device tensor,
//! so no allocation and no free (which synchronises the whole device) per expert miss.

use std::ops::Range;

use candle_core::Tensor;

use super::source::{ExpertSource, PartSpan, spans_end};
use crate::model::error::{ModelError, Result};

/// Copies `bytes` (elements of `dst`'s dtype) into `dst` starting at element `elem_offset`.
#[cfg(feature = "cuda")]
pub fn htod_into(dst: &Tensor, elem_offset: usize, bytes: &[u8]) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let (at, stream) = crate::model::raw::device_range(dst, elem_offset, bytes.len())
        .map_err(|e| candle_core::Error::msg(format!("slot upload: {e}")))?;
    // SAFETY: the destination range was bounds-checked; the copy is ordered on candle's
    // stream and waited for, so `bytes` outlives it and no kernel sees a half-written slot.
    unsafe { result::memcpy_htod_async(at, bytes, stream.cu_stream()) }
        .map_err(candle_core::Error::wrap)?;
    stream.synchronize().map_err(candle_core::Error::wrap)?;
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn htod_into(_dst: &Tensor, _elem_offset: usize, _bytes: &[u8]) -> candle_core::Result<()> {
    candle_core::bail!("slot upload needs a build with --features cuda")
}

/// Where one part of a staged miss goes: its matrix's tensor and element offset there, and an
/// FP8 matrix's scale table's.
#[derive(Clone, Copy)]
pub struct PartDst<'a> {
    pub weights: (&'a Tensor, usize),
    pub scale: Option<(&'a Tensor, usize)>,
}

/// The host side of staged expert uploads: reusable buffers that misses are read into and
/// copied from. On a CUDA device they are page-locked, so the copy runs at full DMA speed
/// (pageable copies go through the driver's own bounce buffer at about half the rate) and is
/// queued on candle's stream without waiting; a ring of [`PINNED_RING`] buffers lets the next
/// miss be read while the previous one is still being copied (a buffer is reused only once its
/// own copies are done). Elsewhere it is a plain Vec.
#[derive(Default)]
pub struct Staging {
    host: Vec<u8>,
    /// Pageable-path counters (the synchronous copy is timed on the host, and all of it
    /// follows the read).
    copied_bytes: u64,
    copy_time_us: u64,
    /// Streamed reads' piece size (`Settings::staged_piece`); None: each miss read whole, then
    /// copied.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    piece: Option<usize>,
    #[cfg(feature = "cuda")]
    pinned: Vec<Option<cuda::Pinned>>,
    /// The ring buffer handed out last.
    #[cfg(feature = "cuda")]
    current: usize,
}

/// Page-locked staging buffers per pool (two: read one while the other is copied).
pub const PINNED_RING: usize = 2;

impl Staging {
    /// Staging whose misses are read in pieces of `piece` bytes, each run copied as it lands
    /// (None: read whole, then copied).
    pub fn new(piece: Option<usize>) -> Self {
        Staging {
            piece,
            ..Default::default()
        }
    }

    /// Grows every ring buffer to at least `len` bytes now (page-locked for a CUDA `device`), so
    /// that no miss allocates one later. Why: a gated GPU step must not allocate page-locked
    /// memory while its stream waits on the host (an implicit synchronisation would wait for
    /// the waiting stream: `model/gates.rs`).
    pub fn reserve(&mut self, device: &candle_core::Device, len: usize) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(d) = device {
            if self.pinned.len() < PINNED_RING {
                self.pinned.resize_with(PINNED_RING, || None);
            }
            for slot in self.pinned.iter_mut() {
                cuda::Pinned::ensure(slot, d, len)?;
            }
            return Ok(());
        }
        let _ = (device, len);
        Ok(())
    }

    /// Host→device bytes copied, the device time those copies took (from a miss's first copy
    /// to the end of its last), and of that the time after each miss's read had ended, µs
    /// (copies still in flight are counted once the next read waits for them).
    pub fn copy_stats(&self) -> (u64, u64, u64) {
        #[cfg(feature = "cuda")]
        if self.pinned.iter().any(Option::is_some) {
            return self
                .pinned
                .iter()
                .flatten()
                .fold((0, 0, 0), |(b, t, a), p| {
                    (b + p.copied_bytes, t + p.copy_time_us, a + p.after_read_us)
                });
        }
        (self.copied_bytes, self.copy_time_us, self.copy_time_us)
    }

    /// Reads (layer, expert) from `source` into the next staging buffer and queues copies of
    /// its parts to where `place` says. `place` is called once with the parts as read (types,
    /// shapes, where they lie) before anything is copied, and returns their destinations —
    /// or None to copy nothing (the caller then converts them its own way), or an error, which
    /// is returned. A part's matrix goes in by copies, with streamed reads run by run as it
    /// lands; the scale tables after the read, by one kernel where the device sees the buffer
    /// (three copies that small cost ~9 µs each on an H200: BENCHMARKS.md §103, §105). Pool
    /// slots are only read by kernels queued after this on the same stream, so nothing waits
    /// for the copies. Returns the parts and whether they were copied.
    pub fn stage_expert<'a>(
        &mut self,
        device: &candle_core::Device,
        source: &dyn ExpertSource,
        layer: usize,
        expert: usize,
        mut place: impl FnMut(&[PartSpan; 3]) -> Result<Option<[PartDst<'a>; 3]>>,
    ) -> Result<([PartSpan; 3], bool)> {
        let stored = source.stored_bytes(layer, expert) as usize;
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(d) = device {
            if self.pinned.len() < PINNED_RING {
                self.pinned.resize_with(PINNED_RING, || None);
            }
            self.current = (self.current + 1) % PINNED_RING;
            let piece = self.piece;
            let pinned = cuda::Pinned::ensure(&mut self.pinned[self.current], d, stored)?;
            let (buf, mut copier) = pinned.split(stored)?;
            let mut placed: Option<Option<[PartDst<'a>; 3]>> = None;
            let mut ready = |spans: &[PartSpan; 3], filled: Range<usize>| -> Result<()> {
                let dst = match &placed {
                    Some(d) => d,
                    None => placed.insert(place(spans)?),
                };
                if let Some(dst) = dst {
                    for (span, to) in spans.iter().zip(dst) {
                        if let Some((t, at, run)) = runs_within(span, to.weights, &filled)? {
                            copier.copy(t, at, run)?;
                        }
                    }
                }
                Ok(())
            };
            let spans = match piece {
                Some(piece) => {
                    source.read_into_for_copy_streamed(layer, expert, buf, piece, &mut ready)?
                }
                None => {
                    let spans = source.read_into_for_copy(layer, expert, buf)?;
                    ready(&spans, 0..spans_end(&spans))?;
                    spans
                }
            };
            let Some(Some(dst)) = placed else {
                return Ok((spans, false));
            };
            copier.read_done()?;
            let scales = scale_runs(&spans, &dst, layer, expert)?;
            if !scales.is_empty() && !copier.copy_small(&scales)? {
                for (t, at, run) in scales {
                    copier.copy(t, at, run)?;
                }
            }
            return Ok((spans, true));
        }
        let _ = device;
        if self.host.len() < stored {
            self.host.resize(stored, 0);
        }
        let spans = source.read_into_for_copy(layer, expert, &mut self.host[..stored])?;
        let Some(dst) = place(&spans)? else {
            return Ok((spans, false));
        };
        let all = 0..spans_end(&spans);
        let mut runs = Vec::new();
        for (span, to) in spans.iter().zip(&dst) {
            runs.extend(runs_within(span, to.weights, &all)?);
        }
        runs.extend(scale_runs(&spans, &dst, layer, expert)?);
        for (t, at, run) in runs {
            let start = std::time::Instant::now();
            htod_into(t, at, &self.host[run.clone()])?;
            self.copied_bytes += run.len() as u64;
            self.copy_time_us += start.elapsed().as_micros() as u64;
        }
        Ok((spans, true))
    }
}

/// The part of `span`'s matrix inside `filled` (bytes of the staging buffer), as a copy into
/// `to`'s tensor at the element its offset in the matrix falls on; none if they do not meet.
fn runs_within<'a>(
    span: &PartSpan,
    (t, at): (&'a Tensor, usize),
    filled: &Range<usize>,
) -> Result<Option<(&'a Tensor, usize, Range<usize>)>> {
    let (a, b) = (
        span.range.start.max(filled.start),
        span.range.end.min(filled.end),
    );
    if a >= b {
        return Ok(None);
    }
    let esize = t.dtype().size_in_bytes();
    let skip = a - span.range.start;
    if !skip.is_multiple_of(esize) {
        return Err(ModelError::Input(format!(
            "a staged run starts {skip} bytes into a matrix of {esize}-byte elements"
        )));
    }
    Ok(Some((t, at + skip / esize, a..b)))
}

/// Each part's scale table, with where it goes; an error naming the expert where a part has
/// one and its destination none, or the other way round.
fn scale_runs<'a>(
    spans: &[PartSpan; 3],
    dst: &[PartDst<'a>; 3],
    layer: usize,
    expert: usize,
) -> Result<Vec<(&'a Tensor, usize, Range<usize>)>> {
    let mut runs = Vec::new();
    for (k, (span, to)) in spans.iter().zip(dst).enumerate() {
        match (&span.scale, to.scale) {
            (Some(s), Some((t, at))) => runs.push((t, at, s.range.clone())),
            (None, None) => {}
            _ => {
                return Err(ModelError::Expert {
                    layer,
                    expert,
                    msg: format!(
                        "its {} has a scale table where the slot has none, or none where it has one",
                        ["gate", "up", "down"][k]
                    ),
                });
            }
        }
    }
    Ok(runs)
}

/// Bytes/s the staged miss path sustains on the CUDA `device`: up to 1 GiB of `source`'s
/// experts moved as misses are (`Staging::stage_expert` with the run's `piece`: read into the
/// staging ring, its lines demoted for the copy, and copied) into two alternating
/// expert-sized device buffers, timed to the end of the last copy; after an untimed pass (the
/// pages in the page cache, as a warm run finds them), the median of five timed passes. The
/// staged path's bound is this, not the read alone: every byte is read by the CPU *and* then
/// copied, and the two share the host's memory (BENCHMARKS.md §27: ~22 GB/s against a ~42 GB/s
/// read on an H200 host).
pub fn staged_bandwidth(
    device: &candle_core::Device,
    source: &dyn ExpertSource,
    piece: Option<usize>,
) -> Result<f64> {
    let cfg = source.config();
    let experts: Vec<(usize, usize)> = cfg
        .moe_layers()
        .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
        .filter(|&(l, e)| source.has(l, e))
        .collect();
    let largest = experts
        .iter()
        .map(|&(l, e)| source.stored_bytes(l, e) as usize)
        .max()
        .ok_or_else(|| ModelError::Input("the expert source holds no expert".into()))?;
    let scratch = Tensor::zeros(2 * largest, candle_core::DType::U8, device)?;
    let mut staging = Staging::new(piece);
    let mut pass = || -> Result<u64> {
        let mut total = 0u64;
        for (i, &(l, e)) in experts.iter().enumerate() {
            // As a miss moves them (`Staging::stage_expert`): each part's bytes, then its scale
            // table, back to back in one of two expert-sized halves of `scratch`.
            let (spans, _) = staging.stage_expert(device, source, l, e, |spans| {
                let mut at = (i % 2) * largest;
                let mut next = |n: usize| {
                    at += n;
                    (&scratch, at - n)
                };
                Ok(Some(spans.clone().map(|p| PartDst {
                    weights: next(p.range.len()),
                    scale: p.scale.map(|s| next(s.range.len())),
                })))
            })?;
            total += spans
                .iter()
                .map(|p| (p.range.len() + p.scale.as_ref().map_or(0, |s| s.range.len())) as u64)
                .sum::<u64>();
            if total >= 1 << 30 {
                break;
            }
        }
        device.synchronize()?;
        Ok(total)
    };
    pass()?;
    // The median of five timed passes: one pass read anywhere from 10.8 to 15.2 GB/s on the same
    // H200 host minutes apart (BENCHMARKS.md §82), and the sweep's bound is only as good as this.
    let mut rates = (0..5)
        .map(|_| {
            let start = std::time::Instant::now();
            let total = pass()?;
            Ok(total as f64 / start.elapsed().as_secs_f64().max(1e-9))
        })
        .collect::<Result<Vec<f64>>>()?;
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::Tensor;
    use candle_core::cuda_backend::cudarc::driver::sys::{self, CUevent_flags};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaEvent, CudaFunction, CudaStream, PinnedHostSlice,
    };

    pub struct Pinned {
        slice: PinnedHostSlice<u8>,
        /// Where the device sees `slice` (page-locked memory is mapped into its address space
        /// under unified addressing), and `words.cu`'s `copy_runs3`, fetched with the buffer
        /// (before any gated step: no first load while one waits); None where either is not
        /// to be had, and small runs are then copied.
        runs: Option<(u64, CudaFunction)>,
        /// Recorded before the first and after the last copy queued out of `slice` since it
        /// was last written (timing events: their distance is the copy time on the device).
        first_copy: Option<CudaEvent>,
        last_copy: Option<CudaEvent>,
        /// A stream of its own, left idle, and an event recorded on it as the host ends a
        /// miss's read: it completes at once, so its distance to `last_copy` is how long the
        /// copies ran on after the read (None where no such stream could be made).
        marker: Option<Arc<CudaStream>>,
        read_end: Option<CudaEvent>,
        pub copied_bytes: u64,
        pub copy_time_us: u64,
        pub after_read_us: u64,
    }

    impl Pinned {
        pub fn ensure<'a>(
            slot: &'a mut Option<Pinned>,
            device: &candle_core::CudaDevice,
            len: usize,
        ) -> candle_core::Result<&'a mut Pinned> {
            if slot.as_ref().is_none_or(|p| p.slice.len() < len) {
                let mut counters = (0, 0, 0);
                if let Some(mut old) = slot.take() {
                    old.wait()?;
                    counters = (old.copied_bytes, old.copy_time_us, old.after_read_us);
                }
                let ctx = device.cuda_stream().context().clone();
                // SAFETY: the memory is written by a read before any copy reads it. Flags 0:
                // ordinary page-locked memory (not write-combined, which the CPU reads slowly).
                let slice = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }
                    .map_err(candle_core::Error::wrap)?;
                let (copied_bytes, copy_time_us, after_read_us) = counters;
                // Non-blocking (cudarc's kind): it waits for nothing on candle's stream.
                let marker = ctx.new_stream().ok();
                let ptr = slice.as_ptr().map_err(candle_core::Error::wrap)?;
                let mut dptr: sys::CUdeviceptr = 0;
                // SAFETY: `ptr` is the start of a live page-locked allocation.
                let mapped = unsafe {
                    sys::cuMemHostGetDevicePointer_v2(&mut dptr, ptr as *mut std::ffi::c_void, 0)
                }
                .result()
                .is_ok();
                let runs = mapped
                    .then(|| crate::model::gates::runs_copier(device).ok())
                    .flatten()
                    .map(|f| (dptr, f));
                *slot = Some(Pinned {
                    slice,
                    runs,
                    first_copy: None,
                    last_copy: None,
                    marker,
                    read_end: None,
                    copied_bytes,
                    copy_time_us,
                    after_read_us,
                });
            }
            Ok(slot.as_mut().expect("just ensured"))
        }

        /// Waits for the queued copies and adds their device time to `copy_time_us`.
        fn wait(&mut self) -> candle_core::Result<()> {
            let read_end = self.read_end.take();
            if let (Some(a), Some(b)) = (self.first_copy.take(), self.last_copy.take()) {
                b.synchronize().map_err(candle_core::Error::wrap)?;
                let ms = a.elapsed_ms(&b).map_err(candle_core::Error::wrap)?;
                self.copy_time_us += (f64::from(ms) * 1000.0).round() as u64;
                if let Some(r) = read_end {
                    r.synchronize().map_err(candle_core::Error::wrap)?;
                    let ms = r.elapsed_ms(&b).map_err(candle_core::Error::wrap)?;
                    self.after_read_us += (f64::from(ms).max(0.0) * 1000.0).round() as u64;
                }
            }
            Ok(())
        }

        /// The buffer's first `len` bytes to write, once its earlier copies are done, and a
        /// [`Copier`] that queues copies out of it (their bytes must be written first).
        pub fn split(&mut self, len: usize) -> candle_core::Result<(&mut [u8], Copier<'_>)> {
            self.wait()?;
            // (`as_ptr` waits on cudarc's own event, which is never recorded: it returns at once.)
            let base = self.slice.as_ptr().map_err(candle_core::Error::wrap)? as usize;
            let have = self.slice.len();
            let Pinned {
                slice,
                runs,
                first_copy,
                last_copy,
                marker,
                read_end,
                copied_bytes,
                ..
            } = self;
            let all = slice.as_mut_slice().map_err(candle_core::Error::wrap)?;
            let copier = Copier {
                base,
                have,
                runs: runs.as_ref(),
                first_copy,
                last_copy,
                marker: marker.as_ref(),
                read_end,
                copied_bytes,
            };
            Ok((&mut all[..len], copier))
        }
    }

    /// Queues copies out of one page-locked buffer, between the timing events `Pinned::wait`
    /// reads. The buffer is not written again before the last event recorded here has
    /// completed (`Pinned::split` waits for it).
    pub struct Copier<'a> {
        /// The buffer's host address and length.
        base: usize,
        have: usize,
        runs: Option<&'a (u64, CudaFunction)>,
        first_copy: &'a mut Option<CudaEvent>,
        last_copy: &'a mut Option<CudaEvent>,
        marker: Option<&'a Arc<CudaStream>>,
        read_end: &'a mut Option<CudaEvent>,
        copied_bytes: &'a mut u64,
    }

    impl Copier<'_> {
        /// Marks the end of the miss's read (the copies queued so far may still be running):
        /// what `Pinned::wait` measures the time after the read from.
        pub fn read_done(&mut self) -> candle_core::Result<()> {
            if let Some(m) = self.marker {
                *self.read_end = Some(
                    m.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(candle_core::Error::wrap)?,
                );
            }
            Ok(())
        }

        fn check(&self, range: &std::ops::Range<usize>) -> candle_core::Result<()> {
            if range.end > self.have {
                candle_core::bail!(
                    "slot upload: {} bytes past the staging buffer's end",
                    range.len()
                )
            }
            Ok(())
        }

        fn first_event(&mut self, stream: &CudaStream) -> candle_core::Result<()> {
            if self.first_copy.is_none() {
                *self.first_copy = Some(
                    stream
                        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(candle_core::Error::wrap)?,
                );
            }
            Ok(())
        }

        fn last_event(&mut self, stream: &CudaStream, n: usize) -> candle_core::Result<()> {
            *self.last_copy = Some(
                stream
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(candle_core::Error::wrap)?,
            );
            *self.copied_bytes += n as u64;
            Ok(())
        }

        /// Queues a copy of the buffer's `range` (already written) into `dst` from element
        /// `elem_offset` on.
        pub fn copy(
            &mut self,
            dst: &Tensor,
            elem_offset: usize,
            range: std::ops::Range<usize>,
        ) -> candle_core::Result<()> {
            self.check(&range)?;
            let n = range.len();
            let (at, stream) = crate::model::raw::device_range(dst, elem_offset, n)
                .map_err(|e| candle_core::Error::msg(format!("slot upload: {e}")))?;
            self.first_event(&stream)?;
            // SAFETY: the range was bounds-checked within the page-locked buffer, whose bytes
            // there are written (the caller's contract); it is not written again before the
            // event recorded below has completed. A raw address, not a slice: the rest of the
            // buffer may be being written by reading threads meanwhile.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    at,
                    (self.base + range.start) as *const std::ffi::c_void,
                    n,
                    stream.cu_stream(),
                )
            }
            .result()
            .map_err(candle_core::Error::wrap)?;
            self.last_event(&stream, n)
        }

        /// Up to three small runs of the buffer (each into its `dst` at an element offset) by
        /// one kernel reading the buffer where the device sees it; false, nothing queued, where
        /// it cannot. Why: an FP8 miss's three scale tables are a few hundred bytes each, and a
        /// copy-engine copy that small costs ~9 µs on an H200 (BENCHMARKS.md §103, §105).
        pub fn copy_small(
            &mut self,
            runs: &[(&Tensor, usize, std::ops::Range<usize>)],
        ) -> candle_core::Result<bool> {
            let Some((base, f)) = self.runs.cloned() else {
                return Ok(false);
            };
            if runs.is_empty() || runs.len() > 3 {
                return Ok(false);
            }
            let mut queued = Vec::with_capacity(runs.len());
            let mut stream = None;
            for (dst, elem_offset, range) in runs {
                self.check(range)?;
                let (at, s) = crate::model::raw::device_range(dst, *elem_offset, range.len())
                    .map_err(|e| candle_core::Error::msg(format!("slot upload: {e}")))?;
                queued.push((base + range.start as u64, at, range.len()));
                stream = Some(s);
            }
            let stream = stream.expect("at least one run");
            self.first_event(&stream)?;
            crate::model::gates::copy_runs3(&f, &stream, &queued)
                .map_err(|e| candle_core::Error::msg(e.to_string()))?;
            self.last_event(&stream, queued.iter().map(|r| r.2).sum())?;
            Ok(true)
        }
    }
}
