//! A capacity sweep's results (`moescope sweep`): the serde types its JSON is, and its table —
//! measured tok/s, memory and hit rate per capacity next to the simulated curve and the bound.

use serde::Serialize;

use crate::cache::sim::SimResult;
use crate::session::metrics::PathShare;
use crate::step_path::StepPath;

#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    pub capacity: usize,
    pub capacity_pct: f64,
    pub measured_decode_tok_s: Option<f64>,
    pub predicted_decode_tok_s: Option<f64>,
    /// None on the row the prediction was calibrated on (see `load_ahead_us`).
    pub prediction_error_pct: Option<f64>,
    /// The prediction's cost of a load ahead was fitted on this row's measured speed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub calibration: bool,
    pub measured_hit_rate: Option<f64>,
    pub simulated_hit_rate: f64,
    pub peak_memory: u64,
    pub peak_rss_anon: Option<u64>,
    pub expected_weights: Option<u64>,
    pub miss_cost_us: Option<f64>,
    /// Decode tok/s if each step cost native's step plus its missed bytes at the measured read
    /// bandwidth (the bound a cache cannot beat without prefetch; with prefetch, the experts
    /// loaded ahead count as bytes moved too).
    pub bound_decode_tok_s: Option<f64>,
    /// Measured decode step time / bound step time.
    pub step_vs_bound: Option<f64>,
    /// Peak RSS + GPU / (non-expert + capacity × expert bytes).
    pub memory_vs_expected: Option<f64>,
    /// With --passes ≥ 2: decode tok/s over the last pass only (the cache warm from the
    /// earlier passes), and that over native's last pass.
    pub steady_decode_tok_s: Option<f64>,
    pub steady_vs_native: Option<f64>,
    /// Host→device bytes copied into the GPU slot pool and the device time of those copies, µs
    /// (0 off the GPU).
    pub h2d_bytes: u64,
    pub h2d_time_us: u64,
    /// Staged misses: the device time a miss's copies still took once its read had ended, µs a
    /// miss (`CacheSnapshot::staged_copy_tail_s`). Read whole, the whole copy; streamed, what
    /// the copies had not caught up — which `h2d_time_us` cannot show, since a streamed miss's
    /// copies start while it is read and their span counts the waits for the pieces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_tail_us: Option<f64>,
    /// Bytes the GPU read from host memory itself, filling slots inside graph steps (a slot
    /// for every expert; their time is inside the steps').
    pub h2d_fill_bytes: u64,
    pub gpu_fills: bool,
    /// GPU memory of the process at its peak (part of `peak_memory`), when known.
    pub peak_gpu: Option<u64>,
    /// Host memory page-locked for direct copies (the registered expert files; part of
    /// `peak_memory`, since mapped pages count in the RSS).
    pub host_pinned_bytes: u64,
    /// Where only some expert files are registered: the share of `h2d_bytes` copied direct
    /// (the rest staged), which weighs the two paths' bandwidths in the bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_share: Option<f64>,
    /// Decode steps by how they ran (graph, piecewise, redone…), all passes and the last pass.
    pub decode_paths: Vec<PathShare>,
    pub steady_decode_paths: Vec<PathShare>,
    /// The simulation at this capacity: misses, and on a GPU the steps predicted to run
    /// piecewise or be redone.
    pub simulated: SimResult,
    pub failed: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub scope: String,
    pub policy: String,
    pub cold: bool,
    pub prefetch: bool,
    pub native_decode_tok_s: Option<f64>,
    /// On a GPU: selective with every expert resident and speculation off, warm — what a step
    /// that reads routing back (as one that misses must) costs before its loads.
    pub selective_uncaptured_decode_tok_s: Option<f64>,
    /// Passes over the prompt list in every run.
    pub passes: u32,
    /// Native's decode tok/s over the last pass (with --passes ≥ 2).
    pub native_steady_decode_tok_s: Option<f64>,
    pub native_decode_paths: Vec<PathShare>,
    pub native_peak_memory: u64,
    pub native_peak_gpu: Option<u64>,
    pub mean_miss_cost_us: Option<f64>,
    /// Bandwidth of the miss path, measured the way the run moves a miss (page cache warm, or
    /// evicted first with --cold), bytes/s: the staged reader, or on a GPU taking the direct
    /// path, DMA from the registered expert files.
    pub read_bandwidth: Option<f64>,
    /// On a GPU: which miss path the bound measured ("direct: …" / "staged: …", with why).
    pub miss_path: Option<String>,
    /// Where the direct path registers only some expert files: the staged pipeline's bandwidth,
    /// which misses in the other files move at (bytes/s; `read_bandwidth` is then the direct
    /// path's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_bandwidth: Option<f64>,
    pub rows: Vec<SweepRow>,
    /// On a GPU with every expert's capacity in the sweep and ≥ 2 passes: native and selective
    /// at that capacity in one session, prompts alternating, compared over the last pass.
    pub paired_steady: Option<PairedSteady>,
    /// Mean |predicted − measured| / measured over the capacities, %.
    pub mean_prediction_error_pct: Option<f64>,
    /// With prefetch: decode time each expert loaded ahead added, µs, fitted on the smallest
    /// cache (the row marked `calibration`); the other rows' predictions charge it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_ahead_us: Option<f64>,
    /// GGUF block experts on the CPU: the cost of a miss fitted on the smallest cache (the row
    /// marked `calibration`), µs — the read plus candle's repack of each new matrix at its
    /// first product, which `mean_miss_cost_us` (the cache's timed loads) leaves out. The other
    /// rows' predictions charge it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fitted_miss_cost_us: Option<f64>,
}

/// Steady-state selective against native measured side by side. Why: on a GPU, native's own
/// decode speed moved 570–660 tok/s between sessions minutes apart on one host, more than the
/// 5 % being judged; alternating prompts in one session gives both the same conditions.
#[derive(Debug, Clone, Serialize)]
pub struct PairedSteady {
    pub capacity: usize,
    pub native_tok_s: Option<f64>,
    pub selective_tok_s: Option<f64>,
    pub ratio: Option<f64>,
    pub native_paths: Vec<PathShare>,
    pub selective_paths: Vec<PathShare>,
    /// Why there is no figure (a backend failed).
    pub failed: Option<String>,
}

pub fn sweep_table(s: &Sweep) -> String {
    use crate::util::fmt_bytes;
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} · {} {} · {} scope, {}{}{} · native {} tok/s, peak {} · miss cost {}",
        s.model,
        s.device,
        s.dtype,
        s.scope,
        s.policy,
        if s.cold { ", cold" } else { ", warm" },
        if s.prefetch { ", prefetch" } else { "" },
        s.native_decode_tok_s
            .map(|v| format!("{v:.1}"))
            .unwrap_or("–".into()),
        fmt_bytes(s.native_peak_memory),
        s.mean_miss_cost_us
            .map(|v| format!("{v:.0} µs"))
            .unwrap_or("–".into())
    );
    if let Some(u) = s.selective_uncaptured_decode_tok_s {
        let _ = writeln!(
            o,
            "selective reading routing back, all resident: {u:.1} tok/s (a step that misses, before its loads)"
        );
    }
    if let Some(u) = s.load_ahead_us {
        let _ = writeln!(
            o,
            "each expert loaded ahead adds {u:.0} µs to decode (fitted on the row marked calib; \
             guesses replayed from the trace)"
        );
    }
    if let Some(m) = s.fitted_miss_cost_us {
        let _ = writeln!(
            o,
            "a miss costs {m:.0} µs to decode (fitted on the row marked calib: the load plus \
             what the expert's first product pays after it — candle's repack of GGUF blocks, \
             or a mapped expert's first read from memory)"
        );
    }
    if let Some(bw) = s.read_bandwidth {
        let _ = writeln!(
            o,
            "expert miss bandwidth {:.2} GB/s{} ({}{})",
            bw / 1e9,
            s.staged_bandwidth
                .map(|st| format!(" direct, {:.2} GB/s staged", st / 1e9))
                .unwrap_or_default(),
            if s.cold { "cold" } else { "warm" },
            s.miss_path
                .as_deref()
                .map(|p| format!("; {p}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        o,
        "{:>9} {:>7} {:>10} {:>10} {:>7} {:>9} {:>9} {:>11} {:>11} {:>9} {:>8}",
        "capacity",
        "%",
        "tok/s",
        "predicted",
        "error",
        "hit",
        "sim hit",
        "peak mem",
        "expected",
        "bound",
        "mem/exp"
    );
    let f = |v: Option<f64>, d: usize| v.map(|x| format!("{x:.d$}")).unwrap_or("–".into());
    for r in &s.rows {
        let _ = writeln!(
            o,
            "{:>9} {:>6.1}% {:>10} {:>10} {:>7} {:>8}% {:>8.1}% {:>11} {:>11} {:>9} {:>8}{}",
            r.capacity,
            r.capacity_pct,
            f(r.measured_decode_tok_s, 1),
            f(r.predicted_decode_tok_s, 1),
            match (r.calibration, r.prediction_error_pct) {
                (true, _) => "calib".to_string(),
                (false, Some(e)) => format!("{e:.1}%"),
                (false, None) => "–".into(),
            },
            f(r.measured_hit_rate.map(|h| h * 100.0), 1),
            r.simulated_hit_rate * 100.0,
            fmt_bytes(r.peak_memory),
            r.expected_weights.map(fmt_bytes).unwrap_or("–".into()),
            f(r.bound_decode_tok_s, 1),
            f(r.memory_vs_expected, 2),
            r.failed
                .as_ref()
                .map(|e| format!("  FAILED: {e}"))
                .unwrap_or_default()
        );
    }
    if s.passes > 1 {
        let _ = writeln!(
            o,
            "last of {} passes (cache warm): native {} tok/s",
            s.passes,
            f(s.native_steady_decode_tok_s, 1)
        );
        for r in &s.rows {
            let _ = writeln!(
                o,
                "{:>9} {:>6.1}% {:>10} tok/s  {:>6} × native",
                r.capacity,
                r.capacity_pct,
                f(r.steady_decode_tok_s, 1),
                f(r.steady_vs_native, 3)
            );
        }
    }
    if let Some(p) = &s.paired_steady {
        let _ = writeln!(
            o,
            "side by side at {} experts, last pass: native {} tok/s, selective {} tok/s = {} × native{}",
            p.capacity,
            f(p.native_tok_s, 1),
            f(p.selective_tok_s, 1),
            f(p.ratio, 3),
            p.failed
                .as_ref()
                .map(|e| format!("  FAILED: {e}"))
                .unwrap_or_default()
        );
        if !p.selective_paths.is_empty() {
            let _ = writeln!(
                o,
                "   native {}\n   selective {}",
                super::paths(&p.native_paths),
                super::paths(&p.selective_paths)
            );
        }
    }
    // On a GPU, where the decode time went: one graph per step, or steps that read routing
    // back (piecewise) or guessed wrong and ran twice (redone). The CPU runs every step op by op.
    let gpu_paths = |p: &[PathShare]| p.iter().any(|x| x.path != StepPath::Uncaptured);
    if gpu_paths(&s.native_decode_paths) || s.rows.iter().any(|r| gpu_paths(&r.decode_paths)) {
        let _ = writeln!(
            o,
            "decode steps by path (all passes; last pass):\n   native   {}",
            super::paths(&s.native_decode_paths)
        );
        for r in &s.rows {
            let sim = &r.simulated;
            let expected = if r.gpu_fills {
                "every step a graph: the GPU fills its slots".to_string()
            } else {
                format!(
                    "simulated: {} piecewise, {} redone",
                    sim.decode_miss_steps + sim.unguessed_clean_steps - sim.failed_speculations,
                    sim.failed_speculations
                )
            };
            let _ = writeln!(
                o,
                "{:>9} {}  [{expected}]",
                r.capacity,
                super::paths(&r.decode_paths)
            );
            if !r.steady_decode_paths.is_empty() {
                let _ = writeln!(o, "{:>9} {}", "", super::paths(&r.steady_decode_paths));
            }
        }
    }
    if s.rows.iter().any(|r| r.h2d_bytes > 0) {
        let _ = writeln!(
            o,
            "host→device copies into the slot pool (device time, each miss's first copy to its last{}); GPU memory at peak{}, host memory pinned:",
            if s.rows.iter().any(|r| r.copy_tail_us.is_some()) {
                "; a staged miss streamed is copied while it is read, so its rate counts the \
                 waits for the read, and \"after read\" is what its copies still took once it was read"
            } else {
                ""
            },
            s.native_peak_gpu
                .map(|g| format!(" (native {})", fmt_bytes(g)))
                .unwrap_or_default()
        );
        for r in s.rows.iter().filter(|r| r.h2d_bytes > 0) {
            let rate = if r.h2d_time_us > 0 {
                format!(
                    "{:.1} GB/s",
                    r.h2d_bytes as f64 / r.h2d_time_us as f64 / 1e3
                )
            } else {
                "—".into()
            };
            let _ = writeln!(
                o,
                "{:>9} {:>6.1}%   {:>10} in {:>8.1} ms   {rate:>10}   GPU {:>9}   pinned {:>9}{}{}{}",
                r.capacity,
                r.capacity_pct,
                fmt_bytes(r.h2d_bytes),
                r.h2d_time_us as f64 / 1e3,
                r.peak_gpu.map(fmt_bytes).unwrap_or("–".into()),
                fmt_bytes(r.host_pinned_bytes),
                r.copy_tail_us
                    .map(|t| format!("   after read {t:.0} µs a miss"))
                    .unwrap_or_default(),
                r.direct_share
                    .map(|f| format!("   {:.0} % direct", 100.0 * f))
                    .unwrap_or_default(),
                if r.h2d_fill_bytes > 0 {
                    format!("   + {} filled by the GPU", fmt_bytes(r.h2d_fill_bytes))
                } else {
                    String::new()
                }
            );
        }
    }
    if let Some(e) = s.mean_prediction_error_pct {
        let _ = writeln!(o, "mean |predicted − measured| / measured: {e:.1} %");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(capacity: usize, tail_us: Option<f64>) -> SweepRow {
        SweepRow {
            capacity,
            capacity_pct: 25.0,
            measured_decode_tok_s: Some(60.0),
            predicted_decode_tok_s: Some(63.0),
            prediction_error_pct: Some(5.0),
            calibration: false,
            measured_hit_rate: Some(0.83),
            simulated_hit_rate: 0.83,
            peak_memory: 18 << 30,
            peak_rss_anon: None,
            expected_weights: Some(16 << 30),
            miss_cost_us: Some(340.0),
            bound_decode_tok_s: Some(72.0),
            step_vs_bound: Some(1.2),
            memory_vs_expected: Some(1.1),
            steady_decode_tok_s: None,
            steady_vs_native: None,
            h2d_bytes: 2_000_000_000,
            h2d_time_us: 50_000,
            copy_tail_us: tail_us,
            h2d_fill_bytes: 0,
            gpu_fills: false,
            peak_gpu: Some(17 << 30),
            host_pinned_bytes: 0,
            direct_share: None,
            decode_paths: Vec::new(),
            steady_decode_paths: Vec::new(),
            simulated: SimResult::default(),
            failed: None,
        }
    }

    fn sweep(rows: Vec<SweepRow>) -> Sweep {
        Sweep {
            model: "m".into(),
            device: "cuda:0".into(),
            dtype: "bf16".into(),
            scope: "global".into(),
            policy: "s3fifo".into(),
            cold: false,
            prefetch: false,
            native_decode_tok_s: Some(280.0),
            selective_uncaptured_decode_tok_s: None,
            passes: 1,
            native_steady_decode_tok_s: None,
            native_decode_paths: Vec::new(),
            native_peak_memory: 60 << 30,
            native_peak_gpu: None,
            mean_miss_cost_us: Some(340.0),
            read_bandwidth: Some(28e9),
            miss_path: Some("staged: forced".into()),
            staged_bandwidth: None,
            rows,
            paired_steady: None,
            mean_prediction_error_pct: Some(5.0),
            load_ahead_us: None,
            fitted_miss_cost_us: None,
        }
    }

    /// A staged row says what its copies took after the read, and the heading says why its
    /// rate is not the copies' own; a sweep with no such row says neither.
    #[test]
    fn staged_rows_show_the_copies_after_the_read() {
        let t = sweep_table(&sweep(vec![row(1536, Some(12.4))]));
        let line = t.lines().find(|l| l.contains(" in ")).unwrap();
        assert!(
            line.contains("40.0 GB/s") && line.contains("after read 12 µs a miss"),
            "{t}"
        );
        assert!(t.contains("counts the waits for the read"), "{t}");
        let t = sweep_table(&sweep(vec![row(1536, None)]));
        assert!(
            !t.contains("after read") && !t.contains("waits for the read"),
            "{t}"
        );
    }
}
