//! `moescope verify`'s human report: per-layer counts, then the exact lists of what is missing,
//! corrupt or unexpected, and the one-word outcome.

use crate::experts::verify::VerifyReport;

/// The human report: per-layer table, then exact lists.
pub fn verify_table(r: &VerifyReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} ({}, {}, config {})",
        r.dir.display(),
        r.kind.describe(),
        r.model_type,
        r.config_fingerprint
    );
    let _ = writeln!(
        s,
        "{:>6} {:>9} {:>8} {:>8} {:>8}",
        "layer", "expected", "present", "missing", "corrupt"
    );
    for l in &r.layers {
        let _ = writeln!(
            s,
            "{:>6} {:>9} {:>8} {:>8} {:>8}",
            l.layer,
            l.expected,
            l.present,
            l.missing.len(),
            l.corrupt.len()
        );
    }
    let _ = writeln!(
        s,
        "{:>6} {:>9} {:>8} {:>8} {:>8}",
        "total",
        r.expected(),
        r.present(),
        r.missing(),
        r.corrupt()
    );
    if r.missing() > 0 {
        let _ = writeln!(s, "missing experts ({}):", r.missing());
        for l in r.layers.iter().filter(|l| !l.missing.is_empty()) {
            let list: Vec<String> = l.missing.iter().map(|e| e.to_string()).collect();
            let _ = writeln!(s, "  layer {}: {}", l.layer, list.join(", "));
        }
    }
    if r.corrupt() > 0 {
        let _ = writeln!(s, "corrupt experts ({}):", r.corrupt());
        for l in &r.layers {
            for (e, why) in &l.corrupt {
                let _ = writeln!(s, "  layer {} expert {e}: {why}", l.layer);
            }
        }
    }
    if !r.non_expert.is_empty() {
        let _ = writeln!(
            s,
            "non-expert tensors with problems ({}):",
            r.non_expert.len()
        );
        for p in &r.non_expert {
            let _ = writeln!(s, "  {p}");
        }
    }
    if !r.unexpected.is_empty() {
        let _ = writeln!(
            s,
            "files the config does not account for ({}):",
            r.unexpected.len()
        );
        for p in r.unexpected.iter().take(20) {
            let _ = writeln!(s, "  {p}");
        }
    }
    let _ = writeln!(
        s,
        "{}",
        if r.complete() {
            format!("COMPLETE: all {} experts present and intact", r.expected())
        } else {
            "INCOMPLETE".to_string()
        }
    );
    s
}
