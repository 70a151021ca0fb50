//! Cache statistics cheap enough to keep on: plain counters per (layer, expert), a log-bucketed
//! latency histogram, and a serialisable snapshot a worker sends out a few times per second.

use serde::{Deserialize, Serialize};

/// Log-scale histogram of durations in microseconds: 8 buckets per power of two from 1 µs to
/// ~1 hour. Percentiles are exact to within one bucket (~9 %), which is what a gauge needs.
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max_us: u64,
    sum_us: u64,
}

const SUB: usize = 8;
const OCTAVES: usize = 32;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; SUB * OCTAVES],
            count: 0,
            max_us: 0,
            sum_us: 0,
        }
    }
}

impl Histogram {
    fn bucket(us: u64) -> usize {
        if us == 0 {
            return 0;
        }
        let octave = 63 - us.leading_zeros() as usize;
        let frac = if octave >= 3 {
            ((us >> (octave - 3)) & 7) as usize
        } else {
            ((us << (3 - octave)) & 7) as usize
        };
        (octave * SUB + frac).min(SUB * OCTAVES - 1)
    }

    /// Upper edge of a bucket in µs.
    fn upper(b: usize) -> f64 {
        let octave = b / SUB;
        let frac = b % SUB;
        (1u64 << octave) as f64 * (1.0 + (frac + 1) as f64 / SUB as f64)
    }

    pub fn record_us(&mut self, us: u64) {
        self.buckets[Self::bucket(us)] += 1;
        self.count += 1;
        self.sum_us += us;
        self.max_us = self.max_us.max(us);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The q-quantile (0..=1) in µs, never above the observed maximum.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let target = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Self::upper(b).min(self.max_us as f64);
            }
        }
        self.max_us as f64
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count,
            mean_us: if self.count > 0 {
                self.sum_us as f64 / self.count as f64
            } else {
                0.0
            },
            p50_us: self.quantile_us(0.5),
            p95_us: self.quantile_us(0.95),
            max_us: self.max_us as f64,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p95_us: f64,
    pub max_us: f64,
}

/// Counters of one MoE layer, one entry per expert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    pub layer: usize,
    pub hits: Vec<u32>,
    pub misses: Vec<u32>,
    pub evictions: Vec<u32>,
    /// Whether each expert is resident now.
    pub resident: Vec<bool>,
}

impl LayerStats {
    pub fn new(layer: usize, experts: usize) -> Self {
        LayerStats {
            layer,
            hits: vec![0; experts],
            misses: vec![0; experts],
            evictions: vec![0; experts],
            resident: vec![false; experts],
        }
    }

    pub fn total_hits(&self) -> u64 {
        self.hits.iter().map(|&x| x as u64).sum()
    }

    pub fn total_misses(&self) -> u64 {
        self.misses.iter().map(|&x| x as u64).sum()
    }

    pub fn hit_rate(&self) -> Option<f64> {
        let (h, m) = (self.total_hits(), self.total_misses());
        (h + m > 0).then(|| h as f64 / (h + m) as f64)
    }
}

/// Everything the dashboard needs about the cache at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheSnapshot {
    pub layers: Vec<LayerStats>,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes_read: u64,
    pub resident_experts: usize,
    pub resident_bytes: u64,
    pub capacity_experts: usize,
    pub capacity_bytes: Option<u64>,
    pub load_latency: LatencySummary,
    /// Time spent reading and converting experts (the selective backend's overhead).
    pub load_time_us: u64,
    /// Prefetch accuracy, when prefetch is on.
    pub prefetch: Option<PrefetchStats>,
    /// GPU slot pools: bytes copied host→device and the device time of those copies, µs.
    #[serde(default)]
    pub h2d_bytes: u64,
    #[serde(default)]
    pub h2d_time_us: u64,
    /// Of `h2d_bytes` and `h2d_time_us`, those copied direct from registered expert files (the
    /// rest staged).
    #[serde(default)]
    pub h2d_direct_bytes: u64,
    #[serde(default)]
    pub h2d_direct_time_us: u64,
    /// Of `h2d_time_us` less `h2d_direct_time_us` (the staged copies), the device time that
    /// followed each staged miss's read — from the host's end of the read to the end of the
    /// miss's last copy, µs, summed (`Staging::copy_stats`). Read whole, that is the whole
    /// copy; streamed, what the copies had not caught up. 0 in a recording that did not say.
    #[serde(default)]
    pub h2d_tail_time_us: u64,
    /// Of the loads above, those through a temporary stack because the GPU slot pool could not
    /// hold one forward pass's experts at once (a long prompt in a small pool): count and µs.
    /// They skip the pinned path, so they are not what an ordinary miss costs.
    #[serde(default)]
    pub overflow_loads: u64,
    #[serde(default)]
    pub overflow_time_us: u64,
    /// GPU slot pools: how misses reach the device ("direct: …" or "staged: …", with why).
    #[serde(default)]
    pub h2d_path: Option<String>,
    /// Host memory page-locked for direct copies (the registered expert files), bytes.
    #[serde(default)]
    pub host_pinned_bytes: u64,
    /// Misses the GPU loaded itself inside graph steps (a slot for every expert, see
    /// `CachedProvider`): bytes read from host memory. Not in `h2d_bytes`, and their time is
    /// part of the step's, not measured apart.
    #[serde(default)]
    pub h2d_fill_bytes: u64,
    /// Whether the GPU fills missing slots itself (then every decode step is one graph).
    #[serde(default)]
    pub gpu_fills: bool,
}

impl CacheSnapshot {
    pub fn hit_rate(&self) -> Option<f64> {
        let t = self.hits + self.misses;
        (t > 0).then(|| self.hits as f64 / t as f64)
    }

    /// Mean time of an ordinary miss (overflow loads left out), seconds.
    pub fn miss_cost_s(&self) -> Option<f64> {
        let n = self.load_latency.count.saturating_sub(self.overflow_loads);
        let t = self.load_time_us.saturating_sub(self.overflow_time_us);
        (n > 0).then(|| t as f64 / 1e6 / n as f64)
    }

    /// On the staged GPU path, the device time of one ordinary miss's copy, seconds: what a
    /// layer's last miss still waits for once it is read (`Costs::copy_s`). None elsewhere: on
    /// the direct path a miss's time already is its copy's, and the CPU copies nothing.
    pub fn staged_copy_s(&self) -> Option<f64> {
        let staged = self.h2d_path.as_deref()?.starts_with("staged");
        let n = self.load_latency.count.saturating_sub(self.overflow_loads);
        (staged && n > 0 && self.h2d_time_us > 0).then(|| self.h2d_time_us as f64 / 1e6 / n as f64)
    }

    /// The device time a staged miss's copies still took once its read had ended, over all
    /// ordinary misses, seconds; None where the snapshot does not say.
    fn staged_after_read_s(&self) -> Option<f64> {
        let n = self.load_latency.count.saturating_sub(self.overflow_loads);
        (n > 0 && self.h2d_tail_time_us > 0).then(|| self.h2d_tail_time_us as f64 / 1e6 / n as f64)
    }

    /// What a layer's last staged miss still waits for once it is read (`Costs::copy_tail_s`):
    /// its copies' device time after the read, as measured; a snapshot that does not say
    /// charges the whole copy ([`staged_copy_s`](Self::staged_copy_s)), as a miss read whole
    /// and then copied costs.
    pub fn staged_copy_tail_s(&self) -> Option<f64> {
        let whole = self.staged_copy_s()?;
        Some(self.staged_after_read_s().unwrap_or(whole))
    }

    /// On the direct path with some expert files left unregistered (their misses staged), the
    /// staged copies' device time over all ordinary misses, seconds — what a layer that misses
    /// waits for beyond its misses' own times (`Costs::staged_tail_s`): the cache times a direct
    /// miss by its copy and a staged one by its read, and a layer's lone staged miss then waits
    /// for its copy, which happens in the staged share of such layers. None elsewhere.
    pub fn staged_tail_s(&self) -> Option<f64> {
        let direct = self.h2d_path.as_deref()?.starts_with("direct");
        let n = self.load_latency.count.saturating_sub(self.overflow_loads);
        let staged_us = self.h2d_time_us.saturating_sub(self.h2d_direct_time_us);
        (direct && n > 0 && staged_us > 0 && self.h2d_direct_bytes > 0).then(|| {
            self.staged_after_read_s()
                .unwrap_or(staged_us as f64 / 1e6 / n as f64)
        })
    }
}

/// How good next-layer guesses were: precision = useful guesses / guesses; recall = needed
/// experts that had been guessed / needed experts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefetchStats {
    pub guessed: u64,
    pub useful: u64,
    pub needed: u64,
    pub covered: u64,
    pub loaded: u64,
    /// Guessed experts not loaded because their layer had started before the prefetch thread
    /// got to them (it was behind).
    #[serde(default)]
    pub late: u64,
}

impl PrefetchStats {
    /// Scores one layer's guess against what the layer then needed (the live cache after each
    /// layer that had a guess, the simulator over a replayed trace: the same arithmetic).
    pub fn score(&mut self, guessed: &[usize], needed: &[usize]) {
        self.guessed += guessed.len() as u64;
        self.needed += needed.len() as u64;
        let right = needed.iter().filter(|e| guessed.contains(e)).count() as u64;
        self.covered += right;
        self.useful += right;
    }

    pub fn precision(&self) -> Option<f64> {
        (self.guessed > 0).then(|| self.useful as f64 / self.guessed as f64)
    }
    pub fn recall(&self) -> Option<f64> {
        (self.needed > 0).then(|| self.covered as f64 / self.needed as f64)
    }
    /// Share of guessed experts dropped because the prefetch thread reached them only after
    /// their layer had started: how far it fell behind.
    pub fn late_share(&self) -> Option<f64> {
        (self.guessed > 0).then(|| self.late as f64 / self.guessed as f64)
    }
}

/// Costs measured in a run, for predicting decode speed at other capacities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// Native's mean decode step, seconds.
    pub native_step_s: f64,
    /// Mean time to load one expert on a miss, seconds.
    pub miss_s: f64,
    /// Decode tokens in the trace.
    pub decode_tokens: usize,
    /// GPU with CUDA graphs: a selective step that reads routing back every layer (piecewise
    /// graphs), seconds. A step guessed clean and clean runs as a graph at native's speed; one
    /// with misses costs this plus its loads, plus one wasted graph launch when it was guessed
    /// clean; a clean step not guessed costs this.
    /// None (CPU, or unmeasured): every step costs native's step.
    #[serde(default)]
    pub uncaptured_step_s: Option<f64>,
    /// With prefetch: what each expert loaded ahead adds to the decode time, seconds — the part
    /// of its load that the forward pass did not hide (it competes for cores and memory
    /// bandwidth). None: assumed hidden entirely. `sweep` calibrates it on its smallest cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ahead_s: Option<f64>,
    /// Staged GPU misses: the device time of one miss's copy, after `miss_s` of reading it.
    /// A layer's misses chain — the first read, then each copy beside the next read, then the
    /// last copy — so a layer with m misses costs one `min(miss_s, copy_s)` plus m
    /// `max(miss_s, copy_s)` (BENCHMARKS.md §27). None: a miss costs `miss_s` and nothing waits
    /// for its copy (the CPU, the direct path, recordings that did not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_s: Option<f64>,
    /// The direct path with some files staged: what each layer that misses adds beyond its
    /// misses' `miss_s` ([`CacheSnapshot::staged_tail_s`]). None: nothing (one path only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_tail_s: Option<f64>,
    /// Staged GPU misses read in pieces, each run copied as it lands: the part of `copy_s` a
    /// layer's last miss still waits for once it is read (its last run's copy). None: all of
    /// `copy_s` (a miss read whole, then copied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_tail_s: Option<f64>,
}

#[cfg(test)]
mod tests {

    #[test]
    fn miss_cost_leaves_overflow_loads_out() {
        let mut c = CacheSnapshot {
            load_time_us: 10_000,
            ..Default::default()
        };
        c.load_latency.count = 10;
        assert!((c.miss_cost_s().unwrap() - 0.001).abs() < 1e-12);
        // Four of the ten were 2 ms overflow loads: the other six took 2 ms in all.
        c.overflow_loads = 4;
        c.overflow_time_us = 8_000;
        assert!((c.miss_cost_s().unwrap() - 2e-3 / 6.0).abs() < 1e-12);
        c.overflow_loads = 10;
        assert_eq!(c.miss_cost_s(), None, "no ordinary miss to learn from");
    }

    use super::*;

    #[test]
    fn histogram_quantiles_are_within_a_bucket() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record_us(us);
        }
        let p50 = h.quantile_us(0.5);
        let p95 = h.quantile_us(0.95);
        assert!((450.0..=560.0).contains(&p50), "{p50}");
        assert!((900.0..=1000.0).contains(&p95), "{p95}");
        assert_eq!(h.quantile_us(1.0), 1000.0);
        assert_eq!(h.summary().count, 1000);
    }

    #[test]
    fn empty_histogram_is_zero() {
        assert_eq!(Histogram::default().quantile_us(0.5), 0.0);
    }

    #[test]
    fn buckets_are_monotonic() {
        let mut last = 0;
        for us in [1u64, 2, 3, 7, 8, 9, 100, 1000, 10_000, 1 << 40] {
            let b = Histogram::bucket(us);
            assert!(b >= last);
            last = b;
            assert!(Histogram::upper(b) >= us as f64 || b == SUB * OCTAVES - 1);
        }
    }

    /// A staged GPU snapshot gives each ordinary miss's share of the copies' device time;
    /// the direct path, the CPU and a snapshot without copies give none.
    #[test]
    fn a_staged_miss_copy_time_comes_from_the_copies() {
        let mut c = CacheSnapshot {
            h2d_time_us: 4_000,
            h2d_path: Some("staged: the expert files exceed half the available memory".into()),
            overflow_loads: 2,
            ..Default::default()
        };
        c.load_latency.count = 12;
        assert_eq!(c.staged_copy_s(), Some(0.0004));
        c.h2d_path = Some("direct: 15 expert files registered".into());
        assert_eq!(c.staged_copy_s(), None);
        c.h2d_path = None;
        assert_eq!(c.staged_copy_s(), None);
        c.h2d_path = Some("staged: MOESCOPE_H2D=staged".into());
        c.h2d_time_us = 0;
        assert_eq!(c.staged_copy_s(), None);
    }

    /// With some expert files registered, the staged copies' device time over all misses is
    /// the tail a layer that misses adds; a path with one kind of copy gives none.
    #[test]
    fn a_partly_registered_path_charges_the_staged_copies_per_missing_layer() {
        let mut c = CacheSnapshot {
            h2d_bytes: 30,
            h2d_time_us: 5_000,
            h2d_direct_bytes: 20,
            h2d_direct_time_us: 2_000,
            h2d_path: Some("direct: 9 of the 15 expert files registered".into()),
            overflow_loads: 2,
            ..Default::default()
        };
        c.load_latency.count = 12;
        // 3 ms of staged copies over 10 ordinary misses.
        let tail = c.staged_tail_s().unwrap();
        assert!((tail - 0.0003).abs() < 1e-15, "{tail}");
        assert_eq!(c.staged_copy_s(), None);
        // Every copy direct, or none: no tail.
        let all_direct = CacheSnapshot {
            h2d_direct_time_us: 5_000,
            ..c.clone()
        };
        assert_eq!(all_direct.staged_tail_s(), None);
        let staged = CacheSnapshot {
            h2d_direct_bytes: 0,
            h2d_direct_time_us: 0,
            h2d_path: Some("staged: MOESCOPE_H2D=staged".into()),
            ..c.clone()
        };
        assert_eq!(staged.staged_tail_s(), None);
        assert!(staged.staged_copy_s().is_some());
    }

    /// The tail a staged miss leaves is the measured device time after its read, over the
    /// ordinary misses; a snapshot that does not say (0) charges the whole copy, as a miss read
    /// whole does.
    #[test]
    fn a_staged_miss_leaves_its_measured_time_after_the_read() {
        let mut c = CacheSnapshot {
            h2d_bytes: 1_000,
            h2d_time_us: 4_000,
            h2d_path: Some("staged: MOESCOPE_H2D=staged".into()),
            overflow_loads: 2,
            ..Default::default()
        };
        c.load_latency.count = 12;
        assert_eq!(c.staged_copy_tail_s(), c.staged_copy_s());
        c.h2d_tail_time_us = 1_000;
        let tail = c.staged_copy_tail_s().unwrap();
        assert!((tail - 0.0001).abs() < 1e-15, "{tail}");
        // Partly registered: the same measured time stands for the staged share's tail.
        let mixed = CacheSnapshot {
            h2d_direct_bytes: 500,
            h2d_direct_time_us: 1_000,
            h2d_tail_time_us: 750,
            h2d_path: Some("direct: 9 of the 15 expert files registered".into()),
            ..c.clone()
        };
        let tail = mixed.staged_tail_s().unwrap();
        assert!((tail - 0.000075).abs() < 1e-15, "{tail}");
    }

    #[test]
    fn costs_written_to_a_trace_read_back_exactly() {
        // A trace and the recording it came from must predict the same speed to the last bit.
        // serde_json's default float parser can be one ulp off: Cargo.toml turns on its
        // `float_roundtrip` (test builds get it from a dev-dependency too, so this guards the
        // property rather than proving the flag). Values the default parser reads back wrong:
        for bits in [
            4499942606667094846u64,
            4504504056015702419,
            4502118833659027169,
        ] {
            let c = Costs {
                native_step_s: f64::from_bits(bits),
                miss_s: f64::from_bits(bits + 1),
                decode_tokens: 1,
                uncaptured_step_s: Some(f64::from_bits(bits)),
                load_ahead_s: None,
                copy_s: Some(f64::from_bits(bits + 2)),
                staged_tail_s: None,
                copy_tail_s: Some(f64::from_bits(bits + 3)),
            };
            let back: Costs = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let c = Costs {
                native_step_s: f64::from_bits(0x3f00_0000_0000_0000 | (x >> 12)),
                miss_s: 1.0 / (1.0 + (x % 1_000_000) as f64 / 7.0),
                decode_tokens: 1,
                uncaptured_step_s: None,
                load_ahead_s: None,
                copy_s: None,
                staged_tail_s: None,
                copy_tail_s: None,
            };
            let back: Costs = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
    }
}
