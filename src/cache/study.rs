//! A cache study: every policy at every capacity with the optimum beside it — hit rate, share
//! of the optimum, the knee of each curve — and the decode speed each would give, predicted from
//! a run's measured costs.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::access::{Access, guess_accuracy};
use super::settings::Scope;
use super::sim::{SimPolicy, SimResult, simulate};
use super::stats::Costs;

/// The knee of an increasing, concave-ish curve (Kneedle): the point farthest above the chord
/// from the first to the last point, both axes normalised.
pub fn knee(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    if points.len() < 3 {
        return None;
    }
    let (x0, y0) = points[0];
    let (x1, y1) = points[points.len() - 1];
    let (dx, dy) = (x1 - x0, y1 - y0);
    if dx <= 0.0 || dy <= 0.0 {
        return None;
    }
    points
        .iter()
        .map(|&(x, y)| ((x, y), (y - y0) / dy - (x - x0) / dx))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|(_, d)| *d > 0.0)
        .map(|(p, _)| p)
}

/// Predicted decode tok/s: each step costs native's step (or, with graphs, see
/// `uncaptured_step_s`) plus its misses' load time.
pub fn predict_tok_s(costs: &Costs, r: &SimResult) -> f64 {
    let n = costs.decode_tokens.max(1) as f64;
    let misses = match costs.copy_s {
        None => {
            r.decode_misses as f64 * costs.miss_s
                + r.decode_miss_layers as f64 * costs.staged_tail_s.unwrap_or(0.0)
        }
        Some(c) => {
            r.decode_miss_layers as f64 * costs.miss_s.min(costs.copy_tail_s.unwrap_or(c))
                + r.decode_misses as f64 * costs.miss_s.max(c)
        }
    };
    let loads = misses + r.decode_prefetch_loads as f64 * costs.load_ahead_s.unwrap_or(0.0);
    let compute = match costs.uncaptured_step_s {
        None => n * costs.native_step_s,
        Some(u) => {
            let m = ((r.decode_miss_steps + r.unguessed_clean_steps) as f64).min(n);
            (n - m) * costs.native_step_s
                + m * u
                + r.failed_speculations as f64 * costs.native_step_s
        }
    };
    n / (compute + loads)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub capacity: usize,
    pub capacity_pct: f64,
    pub policy: String,
    pub hit_rate: f64,
    /// This policy's hit rate as a share of Belady's at the same capacity (%).
    pub pct_of_optimum: Option<f64>,
    pub misses_per_decode_token: f64,
    /// With prefetch replayed: experts loaded ahead per decode token (right or wrong guesses),
    /// the bandwidth prefetch spends on top of the misses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_loads_per_decode_token: Option<f64>,
    /// With prefetch replayed: share of prefetched experts never requested before eviction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_wasted: Option<f64>,
    pub predicted_decode_tok_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Study {
    pub total_experts: usize,
    pub scope: String,
    pub accesses: usize,
    pub decode_tokens: usize,
    /// Whether next-layer prefetch was replayed (hit rates are then of requests, with guesses
    /// loaded ahead; the optimum stays demand loading's).
    #[serde(default)]
    pub prefetch: bool,
    /// With prefetch replayed: precision and recall of the trace's guesses (see
    /// [`guess_accuracy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guess_precision: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guess_recall: Option<f64>,
    pub points: Vec<CurvePoint>,
    /// Knee capacity per policy.
    pub knees: Vec<(String, usize)>,
    pub costs: Option<Costs>,
}

/// Runs every policy at every capacity.
pub fn study(
    acc: &[Access],
    total_experts: usize,
    layers: usize,
    capacities: &[usize],
    policies: &[SimPolicy],
    scope: Scope,
    costs: Option<Costs>,
) -> Study {
    let decode_tokens = costs.map(|c| c.decode_tokens).unwrap_or(0);
    let prefetch = acc.iter().any(|a| a.prefetch);
    let accuracy = guess_accuracy(acc);
    let mut points = Vec::new();
    let mut opt: HashMap<usize, f64> = HashMap::new();
    for &c in capacities {
        opt.insert(
            c,
            simulate(acc, SimPolicy::Belady, c, scope, layers).hit_rate(),
        );
    }
    let mut knees = Vec::new();
    for &p in policies {
        let mut curve = Vec::new();
        for &c in capacities {
            let r = simulate(acc, p, c, scope, layers);
            let h = r.hit_rate();
            let o = opt[&c];
            curve.push((c as f64, h));
            points.push(CurvePoint {
                capacity: c,
                capacity_pct: 100.0 * c as f64 / total_experts.max(1) as f64,
                policy: p.name().into(),
                hit_rate: h,
                pct_of_optimum: (o > 0.0).then(|| 100.0 * h / o),
                misses_per_decode_token: r.decode_misses as f64 / decode_tokens.max(1) as f64,
                prefetch_loads_per_decode_token: (prefetch && p != SimPolicy::Belady)
                    .then(|| r.decode_prefetch_loads as f64 / decode_tokens.max(1) as f64),
                prefetch_wasted: (prefetch && r.prefetch_loads > 0)
                    .then(|| r.prefetch_wasted as f64 / r.prefetch_loads as f64),
                predicted_decode_tok_s: costs.map(|k| predict_tok_s(&k, &r)),
            });
        }
        if let Some((x, _)) = knee(&curve) {
            knees.push((p.name().to_string(), x as usize));
        }
    }
    Study {
        total_experts,
        scope: scope.name().into(),
        accesses: acc.iter().filter(|a| !a.prefetch).count(),
        decode_tokens,
        prefetch,
        guess_precision: accuracy.map(|x| x.0),
        guess_recall: accuracy.map(|x| x.1),
        points,
        knees,
        costs,
    }
}

/// The capacities a study looks at when none are given: 5–100 % of all experts in steps, and
/// the working set of one token (top-k per layer).
pub fn default_capacities(total: usize, working_set: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [
        5.0, 10.0, 12.5, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 75.0, 100.0,
    ]
    .iter()
    .map(|p| ((p / 100.0) * total as f64).round() as usize)
    .chain(std::iter::once(working_set.min(total)))
    .filter(|&c| c >= 1)
    .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Capacities from a list like "12.5%,25%,50%" or "8,16,32" (percent of all experts, or counts).
pub fn parse_capacities(s: &str, total: usize) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let c = if let Some(p) = part.strip_suffix('%') {
            let v: f64 = p.parse().map_err(|_| format!("bad capacity \"{part}\""))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("capacity {part} is outside 0–100 %"));
            }
            if v == 0.0 {
                return Err(format!("capacity {part} holds no expert"));
            }
            // A small share of a small model rounds to one expert, not to none.
            (((v / 100.0) * total as f64).round() as usize).max(1)
        } else {
            let c = part
                .parse::<usize>()
                .map_err(|_| format!("bad capacity \"{part}\": a count or a percentage"))?;
            if c == 0 {
                return Err(format!("capacity {part} holds no expert"));
            }
            if c > total {
                return Err(format!(
                    "capacity {part} is more than the model's {total} experts (100 % is {total})"
                ));
            }
            c
        };
        out.push(c);
    }
    if out.is_empty() {
        return Err("no capacities given".into());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knee_and_capacities() {
        let pts: Vec<(f64, f64)> =
            [(1.0, 0.1), (2.0, 0.7), (3.0, 0.8), (4.0, 0.85), (5.0, 0.9)].to_vec();
        assert_eq!(knee(&pts), Some((2.0, 0.7)));
        assert_eq!(
            parse_capacities("12.5%,25%,50%", 192).unwrap(),
            vec![24, 48, 96]
        );
        assert_eq!(parse_capacities("8, 16,8", 192).unwrap(), vec![8, 16]);
        assert!(parse_capacities("lots", 10).is_err());
        assert!(parse_capacities("150%", 10).is_err());
        // A share rounds to at least one expert; nothing, or more than the model has, is refused.
        assert_eq!(parse_capacities("0.1%,100%", 192).unwrap(), vec![1, 192]);
        assert_eq!(parse_capacities("192", 192).unwrap(), vec![192]);
        for (bad, says) in [
            ("0", "holds no expert"),
            ("0%", "holds no expert"),
            ("193", "more than the model's 192 experts"),
            ("nan%", "outside 0–100 %"),
        ] {
            let e = parse_capacities(bad, 192).unwrap_err();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn graph_prediction_charges_uncaptured_steps_and_wasted_launches() {
        let c = Costs {
            native_step_s: 0.001,
            miss_s: 0.002,
            decode_tokens: 4,
            uncaptured_step_s: Some(0.003),
            load_ahead_s: None,
            copy_s: None,
            staged_tail_s: None,
            copy_tail_s: None,
        };
        let r = SimResult {
            decode_misses: 2,
            decode_miss_steps: 1,
            failed_speculations: 1,
            unguessed_clean_steps: 0,
            ..Default::default()
        };
        // 3 clean steps at 1 ms, 1 uncaptured at 3 ms, 1 wasted launch at 1 ms, 2 loads at 2 ms.
        let want = 4.0 / (0.003 + 0.003 + 0.001 + 0.004);
        assert!((predict_tok_s(&c, &r) - want).abs() < 1e-9);
    }

    #[test]
    fn prediction_adds_miss_cost_to_native_step() {
        let c = Costs {
            native_step_s: 0.01,
            miss_s: 0.001,
            decode_tokens: 10,
            uncaptured_step_s: None,
            load_ahead_s: None,
            copy_s: None,
            staged_tail_s: None,
            copy_tail_s: None,
        };
        let misses = |m: u64| SimResult {
            decode_misses: m,
            ..Default::default()
        };
        assert!((predict_tok_s(&c, &misses(0)) - 100.0).abs() < 1e-9);
        assert!(
            (predict_tok_s(&c, &misses(100)) - 50.0).abs() < 1e-9,
            "10 misses per token double the step"
        );
    }

    /// Staged GPU misses: each layer that misses pays its first read and last copy one after
    /// the other, its other misses the longer of the two.
    #[test]
    fn staged_prediction_charges_each_missing_layer_its_unoverlapped_copy() {
        let c = Costs {
            native_step_s: 0.004,
            miss_s: 0.0004,
            decode_tokens: 2,
            uncaptured_step_s: None,
            load_ahead_s: None,
            copy_s: Some(0.0003),
            staged_tail_s: None,
            copy_tail_s: None,
        };
        // Two tokens: one layer with 3 misses, two layers with 1 each → 5 misses, 3 layers.
        let r = SimResult {
            decode_misses: 5,
            decode_miss_layers: 3,
            ..Default::default()
        };
        // 3 × (0.4 + 0.3) + 2 × 0.4 ms of loads beside 2 × 4 ms of steps.
        let want = 2.0 / (0.008 + 3.0 * 0.0007 + 2.0 * 0.0004);
        assert!((predict_tok_s(&c, &r) - want).abs() < 1e-9);
        // A copy slower than the read: the read is what overlaps.
        let slow = Costs {
            copy_s: Some(0.001),
            ..c
        };
        let want = 2.0 / (0.008 + 3.0 * 0.0014 + 2.0 * 0.001);
        assert!((predict_tok_s(&slow, &r) - want).abs() < 1e-9);
        // Without a copy time the layers do not matter.
        let plain = Costs { copy_s: None, ..c };
        assert!((predict_tok_s(&plain, &r) - 2.0 / (0.008 + 5.0 * 0.0004)).abs() < 1e-9);
        // Some files registered, the rest staged: every miss its own time, and each layer that
        // misses the staged copies' tail.
        let mixed = Costs {
            copy_s: None,
            staged_tail_s: Some(0.0001),
            copy_tail_s: None,
            ..c
        };
        let want = 2.0 / (0.008 + 5.0 * 0.0004 + 3.0 * 0.0001);
        assert!((predict_tok_s(&mixed, &r) - want).abs() < 1e-9);
        // Streamed reads: each layer waits only for its last miss's last run (0.05 ms), its
        // misses still for the longer of read and copy.
        let streamed = Costs {
            copy_tail_s: Some(0.00005),
            ..c
        };
        let want = 2.0 / (0.008 + 3.0 * 0.00005 + 5.0 * 0.0004);
        assert!((predict_tok_s(&streamed, &r) - want).abs() < 1e-9);
    }
}
