//! The cache study as a table (`moescope simulate`): hit rate per capacity and policy, each as a
//! share of the optimum, the knees, and the predicted decode speed of the default policy.

use crate::cache::settings::{PrefetchMode, default_policy};
use crate::cache::study::{CurvePoint, Study};

/// The study, one row per capacity.
pub fn study_table(s: &Study) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let policies: Vec<String> = {
        let mut seen = Vec::new();
        for p in &s.points {
            if !seen.contains(&p.policy) {
                seen.push(p.policy.clone());
            }
        }
        seen
    };
    let _ = writeln!(
        o,
        "{} requests ({} decode tokens) over {} experts, {} scope; hit rate (and % of Belady's optimum)",
        s.accesses, s.decode_tokens, s.total_experts, s.scope
    );
    if s.prefetch {
        let _ = writeln!(
            o,
            "next-layer prefetch replayed: each guess loaded just before its layer (policies only; \
             Belady is the optimum of demand loading); guesses {} precision, {} recall",
            s.guess_precision
                .map_or("–".into(), |p| format!("{:.1} %", 100.0 * p)),
            s.guess_recall
                .map_or("–".into(), |p| format!("{:.1} %", 100.0 * p)),
        );
    }
    let _ = write!(o, "{:>10} {:>7}", "capacity", "%");
    for p in &policies {
        let _ = write!(o, " {:>16}", p);
    }
    // The speed prediction is shown for the default policy (what a run gets without --policy,
    // with the prefetch mode replayed).
    let pred_policy = default_policy(if s.prefetch {
        PrefetchMode::NextLayer
    } else {
        PrefetchMode::None
    })
    .name();
    if s.prefetch {
        let _ = write!(o, " {:>22}", format!("{pred_policy} ahead/tok (wrong)"));
    }
    if s.costs.is_some() {
        let _ = write!(o, " {:>16}", format!("{pred_policy} tok/s (pred)"));
    }
    let _ = writeln!(o);
    let mut caps: Vec<usize> = s.points.iter().map(|p| p.capacity).collect();
    caps.dedup();
    caps.sort_unstable();
    caps.dedup();
    for c in caps {
        let row: Vec<&CurvePoint> = s.points.iter().filter(|p| p.capacity == c).collect();
        let _ = write!(o, "{:>10} {:>6.1}%", c, row[0].capacity_pct);
        for p in &policies {
            match row.iter().find(|x| &x.policy == p) {
                Some(x) => {
                    let pct = x
                        .pct_of_optimum
                        .map(|v| format!("({v:.0}%)"))
                        .unwrap_or_default();
                    let _ = write!(
                        o,
                        " {:>9.1}% {:>6}",
                        100.0 * x.hit_rate,
                        if p == "belady" { String::new() } else { pct }
                    );
                }
                None => {
                    let _ = write!(o, " {:>16}", "–");
                }
            }
        }
        let default = row.iter().find(|x| x.policy == pred_policy);
        if s.prefetch {
            let ahead = default.and_then(|x| x.prefetch_loads_per_decode_token);
            let wrong = default.and_then(|x| x.prefetch_wasted);
            let cell = match (ahead, wrong) {
                (Some(a), Some(w)) => format!("{a:.2} ({:.0} %)", 100.0 * w),
                (Some(a), None) => format!("{a:.2}"),
                _ => "–".into(),
            };
            let _ = write!(o, " {:>22}", cell);
        }
        if let Some(x) = default.and_then(|x| x.predicted_decode_tok_s) {
            let _ = write!(o, " {:>16.1}", x);
        }
        let _ = writeln!(o);
    }
    for (p, k) in &s.knees {
        let _ = writeln!(
            o,
            "knee of the {p} curve: {k} experts ({:.1} %)",
            100.0 * *k as f64 / s.total_experts.max(1) as f64
        );
    }
    if let Some(c) = s.costs {
        let _ = writeln!(
            o,
            "prediction: native step {:.2} ms + misses per token × {:.3} ms per miss (measured in the run){}",
            c.native_step_s * 1e3,
            c.miss_s * 1e3,
            if s.prefetch {
                "; loads ahead assumed hidden behind compute"
            } else {
                ""
            }
        );
    }
    o
}
