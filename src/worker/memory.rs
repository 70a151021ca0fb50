//! Per-process memory, sampled from outside the worker: RSS split into anonymous and
//! file-backed pages (Linux `/proc/PID/status`; `sysinfo` elsewhere), peak RSS, GPU memory of the
//! process through NVML when it exists (reported as unavailable otherwise — never as zero), and
//! the system's available memory.

use std::sync::OnceLock;

use crate::session::event::{GpuSource, MemorySample};

/// Reads `/proc/PID/status` (kB fields) — the cheap, exact path on Linux.
pub fn parse_proc_status(text: &str) -> Option<(u64, u64, u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l[name.len()..].split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((
        field("RssAnon:")?,
        field("RssFile:")?,
        field("RssShmem:").unwrap_or(0),
        field("VmHWM:").unwrap_or(0),
    ))
}

pub use crate::util::mem_available;

/// GPU memory per process through NVML (loaded at run time; absent NVML = unavailable).
pub struct Gpu {
    nvml: Option<nvml_wrapper::Nvml>,
}

impl Gpu {
    pub fn get() -> &'static Gpu {
        static GPU: OnceLock<Gpu> = OnceLock::new();
        GPU.get_or_init(|| Gpu {
            nvml: nvml_wrapper::Nvml::init().ok(),
        })
    }

    pub fn available(&self) -> bool {
        self.nvml.is_some()
    }

    /// (bytes, source) for `pid`, or None when NVML has no figure for it.
    pub fn process_memory(&self, pid: u32) -> Option<(u64, GpuSource)> {
        let nvml = self.nvml.as_ref()?;
        let count = nvml.device_count().ok()?;
        let mut total = 0u64;
        let mut found = false;
        for i in 0..count {
            let Ok(dev) = nvml.device_by_index(i) else {
                continue;
            };
            let procs = dev
                .running_compute_processes()
                .unwrap_or_default()
                .into_iter()
                .chain(dev.running_graphics_processes().unwrap_or_default());
            for p in procs {
                if p.pid == pid
                    && let nvml_wrapper::enums::device::UsedGpuMemory::Used(b) = p.used_gpu_memory
                {
                    total += b;
                    found = true;
                }
            }
        }
        found.then_some((total, GpuSource::NvmlProcess))
    }

    /// Free memory of device `index`, when NVML reports it (not on every integrated GPU).
    pub fn device_free(&self, index: u32) -> Option<u64> {
        let nvml = self.nvml.as_ref()?;
        let dev = nvml.device_by_index(index).ok()?;
        dev.memory_info().ok().map(|m| m.free)
    }

    /// Device-wide used memory (for the integrated-GPU fallback).
    pub fn device_used(&self) -> Option<u64> {
        let nvml = self.nvml.as_ref()?;
        let dev = nvml.device_by_index(0).ok()?;
        dev.memory_info().ok().map(|m| m.used)
    }
}

/// The GPU figure of a worker: NVML's per-process figure where there is one (discrete GPUs);
/// else — the Thor's integrated GPU lists no processes — the device-wide used memory's change
/// since the worker started, labelled `DeviceDelta`; else (no NVML, or a device that reports no
/// memory at all) unknown — never zero.
fn gpu_figure(
    process: Option<(u64, GpuSource)>,
    device_used: impl FnOnce() -> Option<u64>,
    device_baseline: Option<u64>,
) -> (Option<u64>, Option<GpuSource>) {
    if let Some((b, s)) = process {
        return (Some(b), Some(s));
    }
    match (device_used(), device_baseline) {
        (Some(now), Some(base)) => (Some(now.saturating_sub(base)), Some(GpuSource::DeviceDelta)),
        _ => (None, None),
    }
}

/// Samples one worker. `device_baseline` is the device-wide GPU use before the worker started,
/// used only where NVML has no per-process figure (Jetson's integrated GPU).
pub fn sample(pid: u32, gpu_enabled: bool, device_baseline: Option<u64>) -> Option<MemorySample> {
    let (anon, file, shmem, peak, source) =
        match std::fs::read_to_string(format!("/proc/{pid}/status")) {
            Ok(text) => {
                let (a, f, s, p) = parse_proc_status(&text)?;
                (a, f, s, p, format!("/proc/{pid}/status"))
            }
            Err(_) if cfg!(target_os = "linux") => return None, // the process is gone
            Err(_) => {
                let mut sys = sysinfo::System::new().ok()?;
                let spid = sysinfo::Pid::from_u32(pid);
                sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[spid]), true);
                let p = sys.process(spid)?;
                // sysinfo gives only the total: report it as anonymous and say where it came from.
                (
                    p.memory(),
                    0,
                    0,
                    p.memory(),
                    "sysinfo (RSS not split)".to_string(),
                )
            }
        };
    let (gpu, gpu_source) = if gpu_enabled {
        let g = Gpu::get();
        gpu_figure(g.process_memory(pid), || g.device_used(), device_baseline)
    } else {
        (None, None)
    };
    Some(MemorySample {
        rss_anon: anon,
        rss_file: file,
        rss_shmem: shmem,
        peak_rss: peak,
        gpu,
        gpu_source,
        system_available: mem_available(),
        source,
        checking: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let t = "Name:\tmoescope\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nRssAnon:\t   81920 kB\nRssFile:\t   20480 kB\nRssShmem:\t       0 kB\n";
        let (a, f, s, p) = parse_proc_status(t).unwrap();
        assert_eq!(a, 80 << 20);
        assert_eq!(f, 20 << 20);
        assert_eq!(s, 0);
        assert_eq!(p, 200 << 20);
        assert!(parse_proc_status("Name: x").is_none());
    }

    #[test]
    fn integrated_gpu_without_per_process_figures_falls_back_to_the_device_delta() {
        // Discrete GPU: NVML's per-process figure, whatever the device says.
        assert_eq!(
            gpu_figure(
                Some((5 << 30, GpuSource::NvmlProcess)),
                || Some(70 << 30),
                Some(1)
            ),
            (Some(5 << 30), Some(GpuSource::NvmlProcess))
        );
        // Integrated GPU (Thor): no process listed, the device's used memory grew by 3 GiB.
        assert_eq!(
            gpu_figure(None, || Some(10 << 30), Some(7 << 30)),
            (Some(3 << 30), Some(GpuSource::DeviceDelta))
        );
        // Memory freed by others since the start: zero growth, not an underflow.
        assert_eq!(
            gpu_figure(None, || Some(1 << 30), Some(7 << 30)),
            (Some(0), Some(GpuSource::DeviceDelta))
        );
        // No device figure (NVML absent, or memory info not supported) or no baseline: unknown.
        assert_eq!(gpu_figure(None, || None, Some(7 << 30)), (None, None));
        assert_eq!(gpu_figure(None, || Some(10 << 30), None), (None, None));
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id(), false, None).unwrap();
        assert!(s.rss() > 0 && s.peak_rss >= s.rss_anon);
        assert!(s.gpu.is_none(), "GPU off: unavailable, not zero");
        assert!(s.system_available > 0);
    }
}
