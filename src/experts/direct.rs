//! Expert misses on a discrete GPU as one DMA each, straight out of the expert files' pages.
//!
//! The staged path ([`super::upload::Staging`]) has the CPU copy every missed byte from the page
//! cache into a page-locked buffer and then DMA it. On an H100 host that chain moved misses at
//! 15–23 GB/s while a lone pinned copy reaches 55 GB/s: the CPU's copy of the next expert
//! competes with the DMA of the last one for host memory, and a layer's last copy overlaps
//! nothing. Here the expert files are mapped read-only and registered with the driver
//! (`cuMemHostRegister`, read-only flag), which page-locks their page-cache pages; a miss is
//! then an async copy from the mapping into its slot, queued on candle's stream ahead of the
//! kernel that reads it, and the host never waits for it.
//!
//! The price: every page of every registered file stays resident in host memory for the
//! cache's life, used or not. Pinning is slow too (about 0.5 GB/s on an H200 host, 18 s for
//! 8 layers of Qwen3-30B-A3B — four times native's whole load), so it runs on a thread of its
//! own after [`DirectFiles::open`] returns: a miss whose file is not registered yet is staged,
//! and the cache is usable at once. So [`choose`] takes this path only on a discrete GPU with
//! cold mode off (a pinned page cannot be dropped to force storage reads), and registers no more
//! than half the available memory (the `pin_budget` setting, `MOESCOPE_PIN_BUDGET`, says
//! otherwise): all the files where they fit, else their first bytes in file order up to the
//! budget — whole files, then a prefix of the next, so a single large GGUF file is registered in
//! part — and a miss outside stages (a model twice the host's spare memory still has about half
//! its misses copied direct, BENCHMARKS.md §90). The `h2d` setting
//! (`MOESCOPE_H2D=direct|staged|auto`) overrides. On an
//! integrated GPU (Jetson Thor) host memory *is* the GPU's memory: pinning the whole checkpoint
//! there would undo what the cache saves.

use std::collections::BTreeSet;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::source::ExpertSource;
use crate::model::checkpoint::TensorLocation;
use crate::model::error::{ModelError, Result};
use crate::settings::{H2dChoice, Settings};

/// How a GPU slot miss reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2dPath {
    /// Read into a page-locked staging buffer by the CPU, then DMA'd.
    Staged,
    /// DMA'd straight from the registered file mapping.
    Direct,
}

impl H2dPath {
    pub fn name(self) -> &'static str {
        match self {
            H2dPath::Staged => "staged",
            H2dPath::Direct => "direct",
        }
    }
}

/// The distinct files holding the source's experts, or `None` when some expert is not a plain
/// byte range of a file (the seed layout, say).
pub fn expert_files(source: &dyn ExpertSource) -> Option<Vec<PathBuf>> {
    let cfg = source.config();
    let mut files = BTreeSet::new();
    for layer in cfg.moe_layers() {
        for e in (0..cfg.num_experts).filter(|&e| source.has(layer, e)) {
            for p in source.part_locations(layer, e)? {
                files.insert(p.file);
            }
        }
    }
    Some(files.into_iter().collect())
}

/// The first `len` bytes of an expert file, registered for direct copies (the whole file, or
/// where the pin budget ends inside it, a prefix ending on a 2 MiB boundary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub file: PathBuf,
    pub len: u64,
}

impl Region {
    /// Whether `loc`'s bytes lie inside the region.
    pub fn holds(&self, loc: &TensorLocation) -> bool {
        loc.file == self.file && within(loc, self.len)
    }
}

/// Whether `loc`'s bytes end within the first `len` bytes of its file.
fn within(loc: &TensorLocation, len: u64) -> bool {
    loc.offset
        .checked_add(loc.len)
        .is_some_and(|end| end <= len)
}

/// How GPU misses will reach the device, and why (for logs and statistics).
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub path: H2dPath,
    pub why: String,
    /// On the direct path, what to register: every expert file, or as many of their bytes as
    /// the pin budget allows, in file order (misses outside stage). Empty on the staged path.
    pub register: Vec<Region>,
    /// Whether `register` leaves expert bytes out.
    pub partial: bool,
}

/// Which path a GPU cache over `source` on `device` takes under `settings` (`h2d`,
/// `pin_budget`).
pub fn choose(device: &Device, source: &dyn ExpertSource, settings: &Settings) -> Result<Choice> {
    let files = device.is_cuda().then(|| expert_files(source)).flatten();
    choose_given(device, source, files.as_deref(), settings)
}

/// [`choose`] with the expert files already listed (`None`: not plain file ranges), so a
/// caller that then registers them lists them once.
pub fn choose_given(
    device: &Device,
    source: &dyn ExpertSource,
    files: Option<&[PathBuf]>,
    settings: &Settings,
) -> Result<Choice> {
    let cuda = device.is_cuda();
    let sizes: Option<Vec<u64>> = files.map(|f| {
        f.iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .collect()
    });
    let facts = Facts {
        cuda,
        integrated: cuda && is_integrated(device),
        cold: source.is_cold(),
        files: sizes.clone(),
        available: if cuda {
            crate::util::mem_available()
        } else {
            0
        },
        pin_budget: settings.pin_budget,
    };
    let d = decide(settings.h2d, &facts)?;
    let all = files.unwrap_or(&[]);
    let sizes = sizes.unwrap_or_default();
    let partial = d.path == H2dPath::Direct
        && (d.register.len() < all.len() || d.register.iter().any(|&(i, n)| n < sizes[i]));
    Ok(Choice {
        path: d.path,
        why: d.why,
        partial,
        register: d
            .register
            .iter()
            .map(|&(i, len)| Region {
                file: all[i].clone(),
                len,
            })
            .collect(),
    })
}

/// [`decide`]'s answer: the path, why, and what to register on the direct path: (index into
/// [`Facts::files`], bytes from the file's start).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub path: H2dPath,
    pub why: String,
    pub register: Vec<(usize, u64)>,
}

/// Where a registered prefix may end inside a file: on a 2 MiB boundary, a whole number of
/// pages whatever the host's page size (4 KiB; 64 KiB on some arm64 hosts such as GH200; 2 MiB
/// huge pages).
const PREFIX_ALIGN: u64 = 2 << 20;

/// The first `budget` bytes of the files of `sizes`, in order: (file, bytes from its start),
/// each file whole while the budget lasts, then a prefix of the next ending on a
/// [`PREFIX_ALIGN`] boundary. Which bytes
/// hardly matters: a model's misses are spread over all its layers, so the share of misses copied
/// direct follows the share of expert bytes registered (BENCHMARKS.md §90).
pub fn bytes_within(sizes: &[u64], budget: u64) -> Vec<(usize, u64)> {
    let mut left = budget;
    let mut out = Vec::new();
    for (i, &s) in sizes.iter().enumerate() {
        let take = if s <= left {
            s
        } else {
            left / PREFIX_ALIGN * PREFIX_ALIGN
        };
        if take > 0 {
            out.push((i, take));
        }
        left -= take;
        if take < s {
            break;
        }
    }
    out
}

/// What the choice of path depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub cuda: bool,
    /// An integrated GPU (host memory is its memory).
    pub integrated: bool,
    pub cold: bool,
    /// The sizes of the distinct files holding the experts, in order; `None` when the experts
    /// are not plain byte ranges of files.
    pub files: Option<Vec<u64>>,
    /// The host's available memory, bytes.
    pub available: u64,
    /// The `pin_budget` setting: host memory the direct path may page-lock (default: half of
    /// `available`).
    pub pin_budget: Option<u64>,
}

/// The rules of [`choose`]: the `h2d` setting (`MOESCOPE_H2D`) and the facts. Forcing
/// `direct` where it cannot work (cold mode, experts that are not file ranges) is an error
/// rather than a silent fallback; forced, every file is registered.
pub fn decide(forced: H2dChoice, f: &Facts) -> Result<Decision> {
    let staged = |why: String| {
        Ok(Decision {
            path: H2dPath::Staged,
            why,
            register: Vec::new(),
        })
    };
    let forced_direct = match forced {
        H2dChoice::Auto => false,
        H2dChoice::Direct => true,
        H2dChoice::Staged => return staged("MOESCOPE_H2D=staged".into()),
    };
    if !f.cuda {
        return staged("not a CUDA device".into());
    }
    let refuse = |why: &str| {
        Err(ModelError::Input(format!(
            "MOESCOPE_H2D=direct cannot be used here: {why}"
        )))
    };
    if f.cold {
        const WHY: &str = "cold mode drops each expert's pages, which a registered page cannot";
        return if forced_direct {
            refuse(WHY)
        } else {
            staged(WHY.into())
        };
    }
    let Some(sizes) = &f.files else {
        const WHY: &str = "the expert source is not plain file ranges";
        return if forced_direct {
            refuse(WHY)
        } else {
            staged(WHY.into())
        };
    };
    let (count, bytes) = (sizes.len(), sizes.iter().sum::<u64>());
    let sized = format!("{count} expert files, {}", crate::util::fmt_bytes(bytes));
    let all = || (0..count).map(|i| (i, sizes[i])).collect();
    let direct = |why: String, register: Vec<(usize, u64)>| {
        Ok(Decision {
            path: H2dPath::Direct,
            why,
            register,
        })
    };
    if forced_direct {
        return direct(format!("MOESCOPE_H2D=direct ({sized})"), all());
    }
    if f.integrated {
        return staged(
            "integrated GPU: host memory is device memory, pinning the files would use it".into(),
        );
    }
    let (budget, limit) = match f.pin_budget {
        Some(b) => (
            b,
            format!(
                "the pin budget (MOESCOPE_PIN_BUDGET={})",
                crate::util::fmt_bytes(b)
            ),
        ),
        None => (
            f.available / 2,
            format!(
                "half the available memory ({})",
                crate::util::fmt_bytes(f.available / 2)
            ),
        ),
    };
    if bytes <= budget {
        return direct(format!("{sized} registered"), all());
    }
    let fit = bytes_within(sizes, budget);
    if fit.is_empty() {
        return staged(format!("the expert files ({sized}) exceed {limit}"));
    }
    let fit_bytes: u64 = fit.iter().map(|&(_, n)| n).sum();
    let whole = fit.iter().filter(|&&(i, n)| n == sizes[i]).count();
    let files = match (whole, whole < fit.len()) {
        (w, false) => format!("{w} of the {count} files"),
        (0, true) if count == 1 => "the start of the one file".to_string(),
        (0, true) => format!("the start of the first of {count} files"),
        (w, true) => format!("{w} of the {count} files whole and the start of one more"),
    };
    direct(
        format!(
            "{} of the {} of expert files registered ({files}), as much as fits in {limit}; \
             misses outside stage",
            crate::util::fmt_bytes(fit_bytes),
            crate::util::fmt_bytes(bytes)
        ),
        fit,
    )
}

#[cfg(feature = "cuda")]
fn is_integrated(device: &Device) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let Ok(d) = device.as_cuda_device() else {
        return false;
    };
    d.cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_INTEGRATED)
        .is_ok_and(|v| v != 0)
}

#[cfg(not(feature = "cuda"))]
fn is_integrated(_device: &Device) -> bool {
    false
}

/// Registered expert files and the copies queued out of them.
pub struct DirectFiles {
    #[cfg(feature = "cuda")]
    inner: cuda::Inner,
    /// Misses queued since the last [`end_batch`](Self::end_batch) and their host time.
    batch: (usize, u64),
}

/// The background registration's state: files registered, files in all, the first refusal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    pub failed: Option<String>,
}

impl Progress {
    /// For the cache's miss-path line: empty once every file is registered.
    pub fn describe(&self) -> String {
        match &self.failed {
            Some(e) => format!(
                " ({} of {} files registered; {e}: the rest stage)",
                self.done, self.total
            ),
            None if self.done < self.total => {
                format!(
                    " (registering in the background: {} of {} files; misses stage meanwhile)",
                    self.done, self.total
                )
            }
            None => String::new(),
        }
    }
}

/// A finished batch of direct copies: device time of the copies, misses, host time, µs.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    pub copy_us: u64,
    pub misses: usize,
    pub host_us: u64,
}

impl DirectFiles {
    /// Maps the regions' files and starts registering the regions with `device`'s driver on a
    /// background thread, one after the other; a tensor's copies go direct once its region is
    /// registered
    /// ([`covers`](Self::covers)). Fails when any file cannot be opened or mapped; a file the
    /// driver refuses stays staged (see [`progress`](Self::progress)), or fails
    /// [`wait_registered`](Self::wait_registered). `copy_stream`: queue the copies on a second
    /// stream (the `copy_stream` setting, a measurement switch).
    pub fn open(device: &Device, regions: &[Region], copy_stream: bool) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let d = device.as_cuda_device()?;
            Ok(DirectFiles {
                inner: cuda::Inner::open(d, regions, copy_stream)?,
                batch: (0, 0),
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (device, regions, copy_stream);
            Err(ModelError::Input(
                "direct expert uploads need a build with --features cuda".into(),
            ))
        }
    }

    /// Bytes of host memory page-locked by the registration so far.
    pub fn registered_bytes(&self) -> u64 {
        #[cfg(feature = "cuda")]
        return self.inner.registered;
        #[cfg(not(feature = "cuda"))]
        0
    }

    /// Takes in the files the background thread has registered since the last call.
    pub fn poll(&mut self) {
        #[cfg(feature = "cuda")]
        self.inner.poll();
    }

    /// How far the registration is.
    pub fn progress(&self) -> Progress {
        #[cfg(feature = "cuda")]
        return self.inner.progress();
        #[cfg(not(feature = "cuda"))]
        Progress::default()
    }

    /// Whether every one of `locs` can be copied direct now (its file registered).
    pub fn covers(&mut self, locs: &[&TensorLocation]) -> bool {
        #[cfg(feature = "cuda")]
        return self.inner.covers(locs);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = locs;
            false
        }
    }

    /// Blocks until every file is registered; the driver's error for the first file it refused.
    /// For the callers that need every address up front (GPU self-fill, the bandwidth probe).
    pub fn wait_registered(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        return self.inner.wait_registered();
        #[cfg(not(feature = "cuda"))]
        Ok(())
    }

    /// Host→device bytes queued and the device time of the settled copies, µs.
    pub fn copy_stats(&self) -> (u64, u64) {
        #[cfg(feature = "cuda")]
        return (self.inner.copied_bytes, self.inner.copy_time_us);
        #[cfg(not(feature = "cuda"))]
        (0, 0)
    }

    /// Queues a copy of `loc`'s bytes into `dst` from element `elem_offset` on, on candle's
    /// stream. `Ok(false)` when `loc`'s file is not registered (the caller stages it instead).
    pub fn upload(
        &mut self,
        dst: &Tensor,
        elem_offset: usize,
        loc: &TensorLocation,
    ) -> candle_core::Result<bool> {
        #[cfg(feature = "cuda")]
        return self.inner.upload(dst, elem_offset, loc);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (dst, elem_offset, loc);
            Ok(false)
        }
    }

    /// Up to three small tensors' bytes (`loc`s, each into its `dst` at an element offset) by
    /// one kernel reading them where the device sees the registered files — an FP8 miss's
    /// scale tables; false, nothing queued, where it cannot, and the caller copies them.
    pub fn upload_small(
        &mut self,
        runs: &[(&Tensor, usize, &TensorLocation)],
    ) -> candle_core::Result<bool> {
        #[cfg(feature = "cuda")]
        return self.inner.upload_small(runs);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = runs;
            Ok(false)
        }
    }

    /// Where the device sees `loc`'s bytes (its file registered and mapped into the device's
    /// address space), for a kernel that reads the expert itself; `None` where it cannot.
    pub fn device_address(&self, loc: &TensorLocation) -> Option<u64> {
        #[cfg(feature = "cuda")]
        return self.inner.device_address(loc);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = loc;
            None
        }
    }

    /// Waits for every copy queued so far (on whichever stream they run).
    pub fn synchronize(&self) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        return self.inner.synchronize();
        #[cfg(not(feature = "cuda"))]
        Ok(())
    }

    /// Counts one miss whose parts were all queued, with its host time.
    pub fn note_miss(&mut self, host_us: u64) {
        self.batch.0 += 1;
        self.batch.1 += host_us;
    }

    /// Closes the batch of copies queued since the last call (one layer's misses); its device
    /// time is read by a later [`settle`](Self::settle).
    pub fn end_batch(&mut self) -> candle_core::Result<Option<Settled>> {
        let (misses, host_us) = std::mem::take(&mut self.batch);
        if misses == 0 {
            return Ok(None);
        }
        #[cfg(feature = "cuda")]
        return self.inner.end_batch(misses, host_us);
        #[cfg(not(feature = "cuda"))]
        Ok(Some(Settled {
            copy_us: 0,
            misses,
            host_us,
        }))
    }

    /// The batch closed last, once its copies are done; `wait` blocks for them, otherwise a
    /// batch still in flight gives `None` and is settled later.
    pub fn settle(&mut self, wait: bool) -> candle_core::Result<Option<Settled>> {
        #[cfg(feature = "cuda")]
        return self.inner.settle(wait);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = wait;
            Ok(None)
        }
    }
}

/// Host→device bandwidth of the direct path on this machine, bytes/s: up to 1 GiB of the
/// source's experts copied from their registered files into two alternating device buffers,
/// as misses are (a warm-up pass first, so the pages are resident and the driver is warm).
/// `regions`: what the cache registers ([`Choice::register`]); only experts wholly in them count.
pub fn bandwidth(device: &Device, source: &dyn ExpertSource, regions: &[Region]) -> Result<f64> {
    let mut d = DirectFiles::open(device, regions, false)?;
    d.wait_registered()?;
    let cfg = source.config();
    let experts: Vec<[TensorLocation; 3]> = cfg
        .moe_layers()
        .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
        .filter_map(|(l, e)| source.part_locations(l, e))
        .filter(|parts| parts.iter().all(|p| regions.iter().any(|r| r.holds(p))))
        .collect();
    let largest = experts
        .iter()
        .map(|p| p.iter().map(|t| t.len as usize).sum::<usize>())
        .max()
        .ok_or_else(|| ModelError::Input("the expert source holds no expert".into()))?;
    let scratch = Tensor::zeros(2 * largest, candle_core::DType::U8, device)?;
    let pass = |d: &mut DirectFiles| -> Result<u64> {
        let mut total = 0u64;
        for (i, parts) in experts.iter().enumerate() {
            let mut at = (i % 2) * largest;
            for p in parts {
                if !d.upload(&scratch, at, p)? {
                    return Err(ModelError::Input(format!(
                        "{}: not registered for direct copies",
                        p.file.display()
                    )));
                }
                at += p.len as usize;
                total += p.len;
            }
            if total >= 1 << 30 {
                break;
            }
        }
        d.synchronize()?;
        Ok(total)
    };
    pass(&mut d)?;
    let start = std::time::Instant::now();
    let total = pass(&mut d)?;
    Ok(total as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, mpsc};
    use std::thread::JoinHandle;

    use candle_core::Tensor;
    use candle_core::cuda_backend::cudarc::driver::sys::{self, CUevent_flags};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaContext, CudaEvent, CudaFunction, CudaStream,
    };

    use super::Settled;
    use crate::model::checkpoint::TensorLocation;
    use crate::model::error::{ModelError, Result};

    pub struct Inner {
        /// The stream copies are queued on: candle's own, or with the `copy_stream` setting a
        /// second stream ordered against candle's by events both ways (a measurement switch:
        /// see BENCHMARKS.md §5 — a miss's copy depends on routing just read, so there is no
        /// compute for it to overlap).
        stream: Arc<CudaStream>,
        /// candle's stream, when `stream` is a separate one.
        compute: Option<Arc<CudaStream>>,
        /// Every expert file, mapped; only those in `ready` are registered.
        maps: HashMap<PathBuf, memmap2::Mmap>,
        /// Registered files, each with where the device sees its mapping (registered with the
        /// device-map flag), for kernels that read experts themselves, and how many bytes from
        /// its start are registered.
        ready: HashMap<PathBuf, (Option<u64>, u64)>,
        /// The registering thread's reports; `None` once it has finished and all are read.
        reports: Option<mpsc::Receiver<Report>>,
        registrar: Option<JoinHandle<()>>,
        stop: Arc<AtomicBool>,
        failed: Option<String>,
        pub registered: u64,
        /// `words.cu`'s `copy_runs3`, fetched when the files are opened (no first load while
        /// a gated step waits); None where it could not be, and small runs are then copied.
        runs: Option<CudaFunction>,
        /// Recorded before the first copy of the open batch.
        first: Option<CudaEvent>,
        /// A closed batch whose device time is not read yet.
        pending: Option<(CudaEvent, CudaEvent, usize, u64)>,
        pub copied_bytes: u64,
        pub copy_time_us: u64,
    }

    /// What the registering thread says about one file.
    enum Report {
        Registered {
            path: PathBuf,
            device_base: Option<u64>,
            len: u64,
        },
        Refused(String),
    }

    fn register_error(path: &std::path::Path, what: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::Io {
            path: path.to_path_buf(),
            what: format!("{what} for direct GPU copies"),
            source: std::io::Error::other(e.to_string()),
        }
    }

    /// Registers each mapping in turn (the addresses stay mapped until the owner has joined
    /// this thread); stops at the first refusal or when told to.
    fn register_all(
        ctx: Arc<CudaContext>,
        maps: Vec<(PathBuf, usize, usize)>,
        stop: Arc<AtomicBool>,
        tx: mpsc::Sender<Report>,
    ) {
        if let Err(e) = ctx.bind_to_thread() {
            let _ = tx.send(Report::Refused(format!("binding the CUDA context: {e}")));
            return;
        }
        for (path, addr, len) in maps {
            if !populate(addr, len, &stop) {
                return;
            }
            let host = addr as *mut std::ffi::c_void;
            let register = |flags| {
                // SAFETY: registers exactly a live mapping, which the owner unregisters (in
                // `drop`, after joining this thread) before unmapping it.
                unsafe { sys::cuMemHostRegister_v2(host, len, flags) }.result()
            };
            // Mapped into the device's address space too where the driver allows it (kernels
            // may then read experts themselves); plain registration is enough for copies.
            let mapped =
                register(sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_DEVICEMAP)
                    .is_ok();
            if !mapped && let Err(e) = register(sys::CU_MEMHOSTREGISTER_READ_ONLY) {
                let e = register_error(&path, "registering (cuMemHostRegister)", e);
                let _ = tx.send(Report::Refused(e.to_string()));
                return;
            }
            let mut dptr: sys::CUdeviceptr = 0;
            // SAFETY: `host` was registered with the device-map flag just above.
            let device_base = (mapped
                && unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, host, 0) }
                    .result()
                    .is_ok())
            .then_some(dptr);
            let report = Report::Registered {
                path,
                device_base,
                len: len as u64,
            };
            if tx.send(report).is_err() {
                return;
            }
        }
    }

    /// Reads `len` mapped bytes at `addr` into memory, a piece at a time; `false` when told to
    /// stop. Why: registering pins every page, and pinning a page not in memory reads it from
    /// storage while the driver holds its lock — every CUDA call of the process waited behind
    /// it (an H200 host, 10 GB of cold files: selective load 6.4 s against 1.7 s staged).
    /// Pages already in memory register in a fraction of a second.
    fn populate(addr: usize, len: usize, stop: &AtomicBool) -> bool {
        const PIECE: usize = 256 << 20;
        let mut at = 0;
        while at < len {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            let n = PIECE.min(len - at);
            let piece = (addr + at) as *mut libc::c_void;
            // SAFETY: a read-only hint over part of a live mapping (page-aligned: the mapping
            // is, and PIECE is a multiple of the page size).
            let populated = unsafe { libc::madvise(piece, n, libc::MADV_POPULATE_READ) } == 0;
            if !populated {
                // Kernels before 5.14: touch one byte a page.
                for off in (0..n).step_by(4096) {
                    // SAFETY: within the live mapping.
                    unsafe { std::ptr::read_volatile((addr + at + off) as *const u8) };
                }
            }
            at += n;
        }
        !stop.load(Ordering::Relaxed)
    }

    impl Inner {
        pub fn open(
            device: &candle_core::CudaDevice,
            regions: &[super::Region],
            separate: bool,
        ) -> Result<Self> {
            let candle_stream = device.cuda_stream();
            let ctx = candle_stream.context().clone();
            ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
            let (stream, compute) = if separate {
                let s = ctx.new_stream().map_err(candle_core::Error::wrap)?;
                (s, Some(candle_stream))
            } else {
                (candle_stream, None)
            };
            let mut maps = HashMap::new();
            let mut order = Vec::new();
            for super::Region { file: path, len } in regions {
                let file = std::fs::File::open(path).map_err(|e| ModelError::Io {
                    path: path.clone(),
                    what: "opening expert file for direct GPU copies".into(),
                    source: e,
                })?;
                // SAFETY: the mapping is read-only and the files are not modified while moescope
                // runs (the same assumption every reader of a checkpoint makes).
                let map = unsafe { memmap2::Mmap::map(&file) }
                    .map_err(|e| register_error(path, "mapping", e))?;
                if map.is_empty() {
                    continue;
                }
                // A prefix ends on a page boundary (`bytes_within`); a whole file may end inside a page.
                let n = (*len as usize).min(map.len());
                if n == 0 {
                    continue;
                }
                order.push((path.clone(), map.as_ptr() as usize, n));
                maps.insert(path.clone(), map);
            }
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, rx) = mpsc::channel();
            let registrar = {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name("moescope-register".into())
                    .spawn(move || register_all(ctx, order, stop, tx))
                    .map_err(|e| {
                        ModelError::Input(format!("starting the registering thread: {e}"))
                    })?
            };
            Ok(Inner {
                stream,
                compute,
                maps,
                ready: HashMap::new(),
                reports: Some(rx),
                registrar: Some(registrar),
                stop,
                failed: None,
                registered: 0,
                runs: crate::model::gates::runs_copier(device).ok(),
                first: None,
                pending: None,
                copied_bytes: 0,
                copy_time_us: 0,
            })
        }

        fn take(&mut self, report: Report) {
            match report {
                Report::Registered {
                    path,
                    device_base,
                    len,
                } => {
                    self.registered += len;
                    self.ready.insert(path, (device_base, len));
                }
                Report::Refused(e) => self.failed = Some(e),
            }
        }

        pub fn poll(&mut self) {
            let Some(rx) = &self.reports else { return };
            let mut got = Vec::new();
            let finished = loop {
                match rx.try_recv() {
                    Ok(r) => got.push(r),
                    Err(mpsc::TryRecvError::Empty) => break false,
                    Err(mpsc::TryRecvError::Disconnected) => break true,
                }
            };
            for r in got {
                self.take(r);
            }
            if finished {
                self.reports = None;
                if let Some(t) = self.registrar.take() {
                    let _ = t.join();
                }
            }
        }

        pub fn wait_registered(&mut self) -> Result<()> {
            if let Some(rx) = self.reports.take() {
                let got: Vec<Report> = rx.iter().collect();
                for r in got {
                    self.take(r);
                }
                if let Some(t) = self.registrar.take() {
                    let _ = t.join();
                }
            }
            match &self.failed {
                Some(e) => Err(ModelError::Input(e.clone())),
                None => Ok(()),
            }
        }

        pub fn progress(&self) -> super::Progress {
            super::Progress {
                done: self.ready.len(),
                total: self.maps.len(),
                failed: self.failed.clone(),
            }
        }

        pub fn covers(&mut self, locs: &[&TensorLocation]) -> bool {
            if self.ready.len() < self.maps.len() {
                self.poll();
            }
            locs.iter().all(|l| {
                self.ready
                    .get(&l.file)
                    .is_some_and(|&(_, n)| super::within(l, n))
            })
        }

        pub fn upload(
            &mut self,
            dst: &Tensor,
            elem_offset: usize,
            loc: &TensorLocation,
        ) -> candle_core::Result<bool> {
            if !self.covers(&[loc]) {
                return Ok(false);
            }
            let Some(map) = self.maps.get(&loc.file) else {
                return Ok(false);
            };
            let (off, len) = (loc.offset as usize, loc.len as usize);
            let Some(src) = map.get(off..off + len) else {
                candle_core::bail!(
                    "{}: tensor {} at {off} + {len} bytes lies past the end of the file ({} bytes)",
                    loc.file.display(),
                    loc.name,
                    map.len()
                )
            };
            let src = src.as_ptr() as u64;
            let (at, _) = crate::model::raw::device_range(dst, elem_offset, len).map_err(|e| {
                candle_core::Error::msg(format!("direct upload of {}: {e}", loc.name))
            })?;
            self.begin_batch()?;
            // SAFETY: the range was bounds-checked; the source is registered read-only memory
            // that stays mapped until `drop`, which waits for the stream first.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    at,
                    src as *const std::ffi::c_void,
                    len,
                    self.stream.cu_stream(),
                )
            }
            .result()
            .map_err(candle_core::Error::wrap)?;
            self.copied_bytes += len as u64;
            Ok(true)
        }

        /// Before the open batch's first copy: marks its start, ordered after the kernels
        /// already queued (a slot being refilled may still be read by them).
        fn begin_batch(&mut self) -> candle_core::Result<()> {
            if self.first.is_none() {
                if let Some(c) = &self.compute {
                    let queued = c.record_event(None).map_err(candle_core::Error::wrap)?;
                    self.stream
                        .wait(&queued)
                        .map_err(candle_core::Error::wrap)?;
                }
                self.first = Some(self.record()?);
            }
            Ok(())
        }

        /// Up to three small tensors' bytes (`loc`s, each into `dst` at an element offset) by
        /// one kernel that reads them where the device sees the registered files; false —
        /// nothing queued — where it cannot (a file not device-mapped or not registered yet,
        /// no kernel), and the caller copies them one by one. Why: an FP8 miss's three scale
        /// tables are a few hundred bytes each, and three copy-engine copies that small cost
        /// about a quarter of the miss on an H200 (BENCHMARKS.md §103).
        pub fn upload_small(
            &mut self,
            runs: &[(&Tensor, usize, &TensorLocation)],
        ) -> candle_core::Result<bool> {
            let Some(f) = self.runs.clone() else {
                return Ok(false);
            };
            let locs: Vec<&TensorLocation> = runs.iter().map(|r| r.2).collect();
            if runs.len() > 3 || !self.covers(&locs) {
                return Ok(false);
            }
            let mut queued = Vec::with_capacity(runs.len());
            for &(dst, elem_offset, loc) in runs {
                let Some(src) = self.device_address(loc) else {
                    return Ok(false);
                };
                let len = loc.len as usize;
                let (at, _) =
                    crate::model::raw::device_range(dst, elem_offset, len).map_err(|e| {
                        candle_core::Error::msg(format!("direct upload of {}: {e}", loc.name))
                    })?;
                queued.push((src, at, len));
            }
            self.begin_batch()?;
            crate::model::gates::copy_runs3(&f, &self.stream, &queued)
                .map_err(|e| candle_core::Error::msg(e.to_string()))?;
            self.copied_bytes += queued.iter().map(|r| r.2 as u64).sum::<u64>();
            Ok(true)
        }

        /// The device address of `loc`'s bytes, when its file is registered and device-mapped.
        pub fn device_address(&self, loc: &TensorLocation) -> Option<u64> {
            let (base, len) = *self.ready.get(&loc.file)?;
            super::within(loc, len).then_some(base? + loc.offset)
        }

        fn record(&self) -> candle_core::Result<CudaEvent> {
            self.stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(candle_core::Error::wrap)
        }

        pub fn end_batch(
            &mut self,
            misses: usize,
            host_us: u64,
        ) -> candle_core::Result<Option<Settled>> {
            let Some(first) = self.first.take() else {
                return Ok(None);
            };
            let older = self.settle(true)?;
            let last = self.record()?;
            if let Some(c) = &self.compute {
                // The kernels that read the new slots wait for their copies.
                c.wait(&last).map_err(candle_core::Error::wrap)?;
            }
            self.pending = Some((first, last, misses, host_us));
            Ok(older)
        }

        pub fn synchronize(&self) -> candle_core::Result<()> {
            self.stream.synchronize().map_err(candle_core::Error::wrap)
        }

        pub fn settle(&mut self, wait: bool) -> candle_core::Result<Option<Settled>> {
            let Some((first, last, misses, host_us)) = self.pending.take() else {
                return Ok(None);
            };
            if !wait && !last.is_complete() {
                self.pending = Some((first, last, misses, host_us));
                return Ok(None);
            }
            last.synchronize().map_err(candle_core::Error::wrap)?;
            let ms = first.elapsed_ms(&last).map_err(candle_core::Error::wrap)?;
            let copy_us = (f64::from(ms) * 1000.0).round() as u64;
            self.copy_time_us += copy_us;
            Ok(Some(Settled {
                copy_us,
                misses,
                host_us,
            }))
        }
    }

    impl Drop for Inner {
        fn drop(&mut self) {
            // Copies may still read the mappings: wait for them before unregistering.
            let _ = self.stream.synchronize();
            if let Some(c) = &self.compute {
                let _ = c.synchronize();
            }
            // Registered files are unregistered below, so the thread must be done first.
            self.stop.store(true, Ordering::Relaxed);
            let _ = self.wait_registered();
            let _ = self.stream.context().bind_to_thread();
            for path in self.ready.keys() {
                let Some(map) = self.maps.get(path) else {
                    continue;
                };
                // SAFETY: registered by the thread at this address; nothing is in flight.
                let _ = unsafe { sys::cuMemHostUnregister(map.as_ptr() as *mut std::ffi::c_void) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Three small runs read by one kernel where the device sees the registered file land
    /// where three copies would put them — at a word-aligned offset, an odd one (safetensors
    /// does not align tensors) and a length that is not whole words — and nothing else moves.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_small_runs_from_a_registered_file_land_as_copies_would() {
        let Some(device) = crate::util::gpu_test::device("small runs from registered files") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("scales.bin");
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i * 37 + 11) as u8).collect();
        std::fs::write(&file, &bytes).unwrap();
        let region = Region {
            file: file.clone(),
            len: bytes.len() as u64,
        };
        let mut d = DirectFiles::open(&device, &[region], false).unwrap();
        d.wait_registered().unwrap();
        let loc = |offset: u64, len: u64| TensorLocation {
            name: format!("run at {offset}"),
            file: file.clone(),
            dtype: crate::model::safetensors_file::StDtype::U8,
            shape: vec![len as usize],
            offset,
            len,
            scale: None,
        };
        let runs = [loc(256, 384), loc(1001, 384), loc(4096, 131)];
        let dst = candle_core::Tensor::zeros(4096, candle_core::DType::U8, &device).unwrap();
        let at = [0usize, 1000, 2003];
        let queued: Vec<(&candle_core::Tensor, usize, &TensorLocation)> =
            runs.iter().zip(at).map(|(l, a)| (&dst, a, l)).collect();
        if !d.upload_small(&queued).unwrap() {
            eprintln!("the file is not mapped into the device's address space here: skipped");
            return;
        }
        d.synchronize().unwrap();
        device.synchronize().unwrap();
        let got = dst.to_vec1::<u8>().unwrap();
        let mut want = vec![0u8; 4096];
        for (l, a) in runs.iter().zip(at) {
            let (o, n) = (l.offset as usize, l.len as usize);
            want[a..a + n].copy_from_slice(&bytes[o..o + n]);
        }
        assert_eq!(got, want);
    }

    fn gpu(files: Option<Vec<u64>>, available: u64) -> Facts {
        Facts {
            cuda: true,
            integrated: false,
            cold: false,
            files,
            available,
            pin_budget: None,
        }
    }

    #[test]
    fn direct_only_where_the_files_fit_and_stay_warm() {
        use H2dChoice::{Auto, Direct, Staged};
        let path = |forced: H2dChoice, f: &Facts| decide(forced, f).map(|d| d.path);
        let fits = gpu(Some(vec![4 * GIB, 4 * GIB, 2 * GIB]), 100 * GIB);
        let d = decide(Auto, &fits).unwrap();
        assert_eq!(d.path, H2dPath::Direct);
        assert_eq!(d.register, vec![(0, 4 * GIB), (1, 4 * GIB), (2, 2 * GIB)]);
        assert_eq!(path(Staged, &fits).unwrap(), H2dPath::Staged);
        assert!(decide(Staged, &fits).unwrap().register.is_empty());
        // Over half the available memory: as many bytes as fit in it, in file order, the rest
        // staged.
        let big = gpu(Some(vec![18 * GIB; 3]), 100 * GIB);
        let d = decide(Auto, &big).unwrap();
        assert_eq!(d.path, H2dPath::Direct);
        assert_eq!(
            d.register,
            vec![(0, 18 * GIB), (1, 18 * GIB), (2, 14 * GIB)]
        );
        assert!(
            d.why
                .contains("50.0 GiB of the 54.0 GiB of expert files registered")
                && d.why
                    .contains("(2 of the 3 files whole and the start of one more)")
                && d.why.contains("half the available memory (50.0 GiB)"),
            "{}",
            d.why
        );
        // One file larger than the budget (a GGUF file): its first half.
        let one = gpu(Some(vec![60 * GIB]), 100 * GIB);
        let d = decide(Auto, &one).unwrap();
        assert_eq!(d.register, vec![(0, 50 * GIB)]);
        assert!(d.why.contains("(the start of the one file)"), "{}", d.why);
        let d = decide(Auto, &gpu(Some(vec![60 * GIB, 9 * GIB]), 100 * GIB)).unwrap();
        assert!(
            d.why.contains("(the start of the first of 2 files)"),
            "{}",
            d.why
        );
        let d = decide(
            Auto,
            &gpu(Some(vec![20 * GIB, 20 * GIB, 20 * GIB]), 80 * GIB),
        )
        .unwrap();
        assert_eq!(d.register, vec![(0, 20 * GIB), (1, 20 * GIB)]);
        assert!(d.why.contains("(2 of the 3 files)"), "{}", d.why);
        // Forced: every file whole.
        assert_eq!(
            decide(Direct, &big).unwrap().register,
            vec![(0, 18 * GIB), (1, 18 * GIB), (2, 18 * GIB)]
        );
        // The pin budget setting replaces half the available memory; 0 pins nothing.
        let budget = |b| Facts {
            pin_budget: Some(b),
            ..big.clone()
        };
        let d = decide(Auto, &budget(20 * GIB)).unwrap();
        assert_eq!(d.register, vec![(0, 18 * GIB), (1, 2 * GIB)]);
        assert!(d.why.contains("MOESCOPE_PIN_BUDGET=20.0 GiB"), "{}", d.why);
        assert_eq!(
            decide(Auto, &budget(60 * GIB)).unwrap().register.len(),
            3,
            "a budget above half the memory is the user's to give"
        );
        let d = decide(Auto, &budget(0)).unwrap();
        assert_eq!(d.path, H2dPath::Staged);
        assert!(d.why.contains("exceed the pin budget"), "{}", d.why);
        assert_eq!(path(Direct, &budget(0)).unwrap(), H2dPath::Direct);
        // Integrated GPU (Thor): staged unless forced.
        let thor = Facts {
            integrated: true,
            ..fits.clone()
        };
        assert_eq!(path(Auto, &thor).unwrap(), H2dPath::Staged);
        assert_eq!(path(Direct, &thor).unwrap(), H2dPath::Direct);
        // Cold mode or experts that are not file ranges: staged, and forcing direct is an error.
        for f in [
            Facts {
                cold: true,
                ..fits.clone()
            },
            gpu(None, 100 * GIB),
        ] {
            assert_eq!(path(Auto, &f).unwrap(), H2dPath::Staged);
            let err = decide(Direct, &f).unwrap_err().to_string();
            assert!(
                err.contains("MOESCOPE_H2D=direct cannot be used here"),
                "{err}"
            );
        }
        // Off a GPU nothing is copied: staged whatever is asked.
        let cpu = Facts {
            cuda: false,
            ..fits.clone()
        };
        assert_eq!(path(Direct, &cpu).unwrap(), H2dPath::Staged);
    }

    #[test]
    fn bytes_within_takes_files_whole_then_an_aligned_prefix() {
        const M: u64 = 1 << 20;
        assert_eq!(
            bytes_within(&[5 * M, 3 * M], 8 * M),
            vec![(0, 5 * M), (1, 3 * M)]
        );
        // Whole files need no alignment; a prefix ends on a 2 MiB boundary.
        assert_eq!(
            bytes_within(&[5000, 3000], 8000),
            vec![(0, 5000), (1, 3000)]
        );
        assert_eq!(bytes_within(&[5 * M, 9 * M, 1], 6 * M), vec![(0, 5 * M)]);
        assert_eq!(
            bytes_within(&[5 * M, 9 * M, 1], 8 * M),
            vec![(0, 5 * M), (1, 2 * M)]
        );
        assert_eq!(bytes_within(&[20 * M], 9 * M), vec![(0, 8 * M)]);
        assert_eq!(bytes_within(&[0, 7 * M], 3), Vec::<(usize, u64)>::new());
        assert_eq!(bytes_within(&[], 8), Vec::<(usize, u64)>::new());
        assert_eq!(bytes_within(&[u64::MAX, 1], u64::MAX), vec![(0, u64::MAX)]);
    }

    #[test]
    fn the_miss_path_line_says_how_far_the_registration_is() {
        let p = |done, failed: Option<&str>| Progress {
            done,
            total: 3,
            failed: failed.map(String::from),
        };
        assert_eq!(
            p(1, None).describe(),
            " (registering in the background: 1 of 3 files; misses stage meanwhile)"
        );
        assert_eq!(p(3, None).describe(), "");
        let refused = p(2, Some("x.safetensors: registering failed")).describe();
        assert!(
            refused.contains("2 of 3 files registered") && refused.contains("the rest stage"),
            "{refused}"
        );
    }
}
