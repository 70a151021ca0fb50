//! Every output format in one place, each a function of plain results (ripgrep's "one result,
//! many printers"): the session summary as JSON with its schema and as markdown, the headless
//! final table and verdict lines, the sweep, simulate and verify tables, routing traces.

pub mod charts;
pub mod html;
pub mod json;
pub mod markdown;
pub mod simulate;
pub mod steps;
pub mod sweep;
pub mod table;
pub mod trace;
pub mod verify;

use crate::session::metrics::PathShare;
use crate::util::fmt_bytes;

/// A number to `digits` decimals, or "–" when there is none.
pub(crate) fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

/// A size for humans, or "–" when there is none.
pub(crate) fn opt_bytes(v: Option<u64>) -> String {
    v.map(fmt_bytes).unwrap_or_else(|| "–".into())
}

/// "p50 / p95" of a backend's per-token latency, in ms to `digits` decimals.
pub(crate) fn latency_ms(m: &crate::session::metrics::BackendMetrics, digits: usize) -> String {
    format!(
        "{} / {}",
        opt(m.token_latency_p50_s.map(|v| v * 1e3), digits),
        opt(m.token_latency_p95_s.map(|v| v * 1e3), digits)
    )
}

/// A prompt's same-token share ("97.5 %") and first divergence ("12", "none"), "–" when the
/// prompt was not compared.
pub(crate) fn agreement_cells(
    a: Option<&crate::session::quality::TokenAgreement>,
) -> (String, String) {
    match a {
        Some(a) => (
            format!("{:.1} %", a.identical_pct),
            a.first_divergence
                .map(|d| d.to_string())
                .unwrap_or_else(|| "none".into()),
        ),
        None => ("–".into(), "–".into()),
    }
}

/// "graph 412 × 1.52 ms (91 %), piecewise …": one line for summaries.
pub fn paths(shares: &[PathShare]) -> String {
    shares
        .iter()
        .map(|p| {
            format!(
                "{} {} × {:.2} ms ({:.0} %)",
                p.path.name(),
                p.steps,
                p.mean_s * 1e3,
                p.time_pct
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step_path::StepPath;

    #[test]
    fn decode_paths_read_as_steps_times_mean_and_share() {
        let p = [PathShare {
            path: StepPath::Graph,
            steps: 2,
            seconds: 2.0,
            mean_s: 1.0,
            time_pct: 25.0,
        }];
        assert_eq!(paths(&p), "graph 2 × 1000.00 ms (25 %)");
        assert_eq!(
            (opt(None, 2), opt(Some(1.234), 1)),
            ("–".into(), "1.2".into())
        );
        assert_eq!(opt_bytes(Some(9 << 20)), "9.00 MiB");
    }
}
