//! Host → device copies straight into a slot of a preallocated pool: no temporary device tensor,
//! so no allocation and no free (which synchronises the whole device) per expert miss.

use candle_core::Tensor;

use super::source::ExpertSource;
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

/// The host side of expert uploads: reusable buffers that misses are read into and copied
/// from. On a CUDA device they are page-locked, so the copy runs at full DMA speed (pageable
/// copies go through the driver's own bounce buffer at about half the rate) and is queued on
/// candle's stream without waiting; a ring of [`PINNED_RING`] buffers lets the next miss be
/// read while the previous one is still being copied (a buffer is reused only once its own
/// copies are done). Elsewhere it is a plain Vec.
#[derive(Default)]
pub struct Staging {
    host: Vec<u8>,
    /// Pageable-path counters (the synchronous copy is timed on the host).
    copied_bytes: u64,
    copy_time_us: u64,
    #[cfg(feature = "cuda")]
    pinned: Vec<Option<cuda::Pinned>>,
    /// The ring buffer handed out last (the one `upload` copies from).
    #[cfg(feature = "cuda")]
    current: usize,
}

/// Page-locked staging buffers per pool (two: read one while the other is copied).
pub const PINNED_RING: usize = 2;

impl Staging {
    /// A buffer of at least `len` bytes that is safe to overwrite, pinned for a CUDA `device`.
    pub fn buffer(
        &mut self,
        device: &candle_core::Device,
        len: usize,
    ) -> candle_core::Result<&mut [u8]> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(d) = device {
            if self.pinned.len() < PINNED_RING {
                self.pinned.resize_with(PINNED_RING, || None);
            }
            self.current = (self.current + 1) % PINNED_RING;
            return cuda::Pinned::ensure(&mut self.pinned[self.current], d, len)?.buffer(len);
        }
        let _ = device;
        if self.host.len() < len {
            self.host.resize(len, 0);
        }
        Ok(&mut self.host[..len])
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

    /// Host→device bytes copied and the device time those copies took, µs (copies still in
    /// flight are counted once the next read waits for them).
    pub fn copy_stats(&self) -> (u64, u64) {
        #[cfg(feature = "cuda")]
        if self.pinned.iter().any(Option::is_some) {
            return self
                .pinned
                .iter()
                .flatten()
                .fold((0, 0), |(b, t), p| (b + p.copied_bytes, t + p.copy_time_us));
        }
        (self.copied_bytes, self.copy_time_us)
    }

    /// Up to three small runs of the current buffer (an FP8 miss's scale tables), each into
    /// its `dst` at an element offset, by one kernel where the device sees the buffer; false,
    /// nothing queued, elsewhere (the caller then [`upload`](Self::upload)s them).
    pub fn upload_small(
        &mut self,
        runs: &[(&Tensor, usize, std::ops::Range<usize>)],
    ) -> candle_core::Result<bool> {
        #[cfg(feature = "cuda")]
        if let Some(p) = self.pinned.get_mut(self.current).and_then(Option::as_mut) {
            return p.upload_small(runs);
        }
        let _ = runs;
        Ok(false)
    }

    /// Queues a copy of `buffer[range]` into `dst` from element `elem_offset` on. Pool slots are
    /// only read by kernels queued after this on the same stream, so nothing waits here.
    pub fn upload(
        &mut self,
        dst: &Tensor,
        elem_offset: usize,
        range: std::ops::Range<usize>,
    ) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(p) = self.pinned.get_mut(self.current).and_then(Option::as_mut) {
            return p.upload(dst, elem_offset, range);
        }
        let t = std::time::Instant::now();
        htod_into(dst, elem_offset, &self.host[range.clone()])?;
        self.copied_bytes += range.len() as u64;
        self.copy_time_us += t.elapsed().as_micros() as u64;
        Ok(())
    }
}

/// Bytes/s the staged miss path sustains on the CUDA `device`: up to 1 GiB of `source`'s
/// experts moved as misses are — each read whole into the staging ring (its lines demoted for
/// the copy, `ExpertSource::read_into_for_copy`), then copied — into two alternating
/// expert-sized device buffers, timed to the end of the last copy; after an untimed pass (the
/// pages in the page cache, as a warm run finds them), the median of five timed passes. The
/// staged path's bound is this, not the read alone: every byte is read by the CPU *and* then
/// copied, and the two share the host's memory (BENCHMARKS.md §27: ~22 GB/s against a ~42 GB/s
/// read on an H200 host).
pub fn staged_bandwidth(device: &candle_core::Device, source: &dyn ExpertSource) -> Result<f64> {
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
    let mut staging = Staging::default();
    let mut pass = || -> Result<u64> {
        let mut total = 0u64;
        for (i, &(l, e)) in experts.iter().enumerate() {
            let mut at = (i % 2) * largest;
            let stored = source.stored_bytes(l, e) as usize;
            let spans = source.read_into_for_copy(l, e, staging.buffer(device, stored)?)?;
            // As a miss moves them: the parts by copies, an FP8 expert's scale tables by one
            // kernel where the device sees the buffer (`Staging::upload_small`).
            let mut scales = Vec::new();
            for p in &spans {
                let n = p.range.len();
                staging.upload(&scratch, at, p.range.clone())?;
                at += n;
                total += n as u64;
                if let Some(s) = &p.scale {
                    scales.push((&scratch, at, s.range.clone()));
                    at += s.range.len();
                    total += s.range.len() as u64;
                }
            }
            if !scales.is_empty() && !staging.upload_small(&scales)? {
                for (dst, at, range) in scales {
                    staging.upload(dst, at, range)?;
                }
            }
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
    use candle_core::Tensor;
    use candle_core::cuda_backend::cudarc::driver::sys::{self, CUevent_flags};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaEvent, CudaFunction, PinnedHostSlice, result,
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
        pub copied_bytes: u64,
        pub copy_time_us: u64,
    }

    impl Pinned {
        pub fn ensure<'a>(
            slot: &'a mut Option<Pinned>,
            device: &candle_core::CudaDevice,
            len: usize,
        ) -> candle_core::Result<&'a mut Pinned> {
            if slot.as_ref().is_none_or(|p| p.slice.len() < len) {
                let mut counters = (0, 0);
                if let Some(mut old) = slot.take() {
                    old.wait()?;
                    counters = (old.copied_bytes, old.copy_time_us);
                }
                let ctx = device.cuda_stream().context().clone();
                // SAFETY: the memory is written by a read before any copy reads it. Flags 0:
                // ordinary page-locked memory (not write-combined, which the CPU reads slowly).
                let slice = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }
                    .map_err(candle_core::Error::wrap)?;
                let (copied_bytes, copy_time_us) = counters;
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
                    copied_bytes,
                    copy_time_us,
                });
            }
            Ok(slot.as_mut().expect("just ensured"))
        }

        /// Waits for the queued copies and adds their device time to `copy_time_us`.
        fn wait(&mut self) -> candle_core::Result<()> {
            if let (Some(a), Some(b)) = (self.first_copy.take(), self.last_copy.take()) {
                b.synchronize().map_err(candle_core::Error::wrap)?;
                let ms = a.elapsed_ms(&b).map_err(candle_core::Error::wrap)?;
                self.copy_time_us += (f64::from(ms) * 1000.0).round() as u64;
            }
            Ok(())
        }

        pub fn buffer(&mut self, len: usize) -> candle_core::Result<&mut [u8]> {
            self.wait()?;
            let all = self
                .slice
                .as_mut_slice()
                .map_err(candle_core::Error::wrap)?;
            Ok(&mut all[..len])
        }

        pub fn upload(
            &mut self,
            dst: &Tensor,
            elem_offset: usize,
            range: std::ops::Range<usize>,
        ) -> candle_core::Result<()> {
            let n = range.len();
            if range.end > self.slice.len() {
                candle_core::bail!("slot upload: {n} bytes past the staging buffer's end")
            }
            let (at, stream) = crate::model::raw::device_range(dst, elem_offset, n)
                .map_err(|e| candle_core::Error::msg(format!("slot upload: {e}")))?;
            // SAFETY: bounds checked above. The source is page-locked and is not written again
            // before `last_copy` (recorded below, after this copy) has completed.
            // (`as_ptr` waits on cudarc's own event, which is never recorded: it returns at once.)
            let ptr = self.slice.as_ptr().map_err(candle_core::Error::wrap)?;
            let src = unsafe { std::slice::from_raw_parts(ptr, self.slice.len()) };
            let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
            if self.first_copy.is_none() {
                self.first_copy = Some(
                    stream
                        .record_event(timing)
                        .map_err(candle_core::Error::wrap)?,
                );
            }
            unsafe { result::memcpy_htod_async(at, &src[range], stream.cu_stream()) }
                .map_err(candle_core::Error::wrap)?;
            self.last_copy = Some(
                stream
                    .record_event(timing)
                    .map_err(candle_core::Error::wrap)?,
            );
            self.copied_bytes += n as u64;
            Ok(())
        }

        /// Up to three small runs of the buffer (`range`s, each into its `dst` at an element
        /// offset) by one kernel reading the buffer where the device sees it, between the same
        /// timing events as copies; false, nothing queued, where it cannot. Why: an FP8 miss's
        /// three scale tables are a few hundred bytes each, and a copy-engine copy that small
        /// costs ~9 µs on an H200 (BENCHMARKS.md §103, §105).
        pub fn upload_small(
            &mut self,
            runs: &[(&Tensor, usize, std::ops::Range<usize>)],
        ) -> candle_core::Result<bool> {
            let Some((base, f)) = self.runs.clone() else {
                return Ok(false);
            };
            if runs.is_empty() || runs.len() > 3 {
                return Ok(false);
            }
            let mut queued = Vec::with_capacity(runs.len());
            let mut stream = None;
            for (dst, elem_offset, range) in runs {
                let n = range.len();
                if range.end > self.slice.len() {
                    candle_core::bail!("slot upload: {n} bytes past the staging buffer's end")
                }
                let (at, s) = crate::model::raw::device_range(dst, *elem_offset, n)
                    .map_err(|e| candle_core::Error::msg(format!("slot upload: {e}")))?;
                queued.push((base + range.start as u64, at, n));
                stream = Some(s);
            }
            let stream = stream.expect("at least one run");
            let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
            if self.first_copy.is_none() {
                self.first_copy = Some(
                    stream
                        .record_event(timing)
                        .map_err(candle_core::Error::wrap)?,
                );
            }
            // The buffer is not written again before `last_copy` (recorded below, after the
            // kernel) has completed, as for copies.
            crate::model::gates::copy_runs3(&f, &stream, &queued)
                .map_err(|e| candle_core::Error::msg(e.to_string()))?;
            self.last_copy = Some(
                stream
                    .record_event(timing)
                    .map_err(candle_core::Error::wrap)?,
            );
            self.copied_bytes += queued.iter().map(|r| r.2 as u64).sum::<u64>();
            Ok(true)
        }
    }
}
