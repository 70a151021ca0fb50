//! `bench steps`: where a GPU decode step's time goes, as a table.

use std::fmt::Write;

use crate::model::step_profile::StepProfile;
use crate::util::fmt_bytes;

pub fn table(p: &StepProfile) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} ({}), {}, {} layers ({} MoE), token at position {}, {} KV rows, {} rounds",
        p.gpu, p.device, p.dtype, p.layers, p.moe_layers, p.position, p.kv_rows, p.rounds
    );
    let _ = writeln!(
        o,
        "device copy: {:.0} GB/s of HBM traffic (read + write); a step reads {} → bound {:.0} tok/s",
        p.copy_gb_s,
        fmt_bytes(p.bytes_per_step),
        p.bound_tok_s
    );
    let _ = writeln!(
        o,
        "whole-step graph: {:.1} µs = {:.1} tok/s = {:.1} % of the bound; {} device ops",
        p.step_us, p.tok_s, p.pct_of_bound, p.step_ops
    );
    let _ = writeln!(
        o,
        "stages as separate graphs: {:.1} µs in all ({} segments; an empty stage costs {:.2} µs, \
         taken off each below)",
        p.segmented_us,
        p.segments.len(),
        p.empty_stage_us
    );
    let _ = writeln!(
        o,
        "floors: bytes at the copy bandwidth {:.1} µs; {} ops × {:.2} µs (one tiny op in a graph) = \
         {:.1} µs",
        p.bandwidth_floor_us(),
        p.step_ops,
        p.op_floor_us,
        p.latency_floor_us()
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "| {:<22} | {:>5} | {:>9} | {:>7} | {:>10} | {:>9} | {:>9} | {:>5} |",
        "stage", "segs", "µs/step", "share", "read", "GB/s", "of copy", "ops"
    );
    rule(&mut o, &[24, 7, 11, 9, 12, 11, 11, 7]);
    for r in &p.stages {
        let (gb, pct) = rate(r.bytes, r.gb_s, r.pct_of_copy);
        let _ = writeln!(
            o,
            "| {:<22} | {:>5} | {:>9.1} | {:>5.1} % | {:>10} | {:>9} | {:>9} | {:>5} |",
            r.name,
            r.count,
            r.net_us,
            r.share_pct,
            fmt_bytes(r.bytes),
            gb,
            pct,
            r.ops
        );
    }
    if !p.in_step.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "inside the step: every stage chained in one graph, {:.1} µs; each kind's cost is what \
             the chain saves with its segments replaced by the empty stage ({:.1} µs in all, \
             against the whole step's {:.1})",
            p.chained_us,
            p.in_step.iter().map(|r| r.us).sum::<f64>(),
            p.step_us
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "| {:<22} | {:>5} | {:>9} | {:>10} | {:>9} | {:>9} |",
            "stage", "segs", "µs/step", "read", "GB/s", "of copy"
        );
        rule(&mut o, &[24, 7, 11, 12, 11, 11]);
        for r in &p.in_step {
            let (gb, pct) = rate(r.bytes, r.gb_s, r.pct_of_copy);
            let _ = writeln!(
                o,
                "| {:<22} | {:>5} | {:>9.1} | {:>10} | {:>9} | {:>9} |",
                r.name,
                r.count,
                r.us,
                fmt_bytes(r.bytes),
                gb,
                pct
            );
        }
    }
    o
}

/// A markdown table's rule under its header, one run of dashes a column.
fn rule(o: &mut String, widths: &[usize]) {
    for w in widths {
        o.push('|');
        o.push_str(&"-".repeat(*w));
    }
    o.push_str("|\n");
}

/// A row's bandwidth and its share of the copy's, or dashes where nothing was read (or no time
/// was measured to read it in).
fn rate(bytes: u64, gb_s: f64, pct_of_copy: f64) -> (String, String) {
    if bytes > 0 && gb_s > 0.0 {
        (format!("{gb_s:.0}"), format!("{pct_of_copy:.1} %"))
    } else {
        ("–".into(), "–".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::step_profile::{SegmentTime, Stage, in_step_rows, stage_rows};

    #[test]
    fn the_table_shows_each_stage_net_of_the_empty_stage() {
        let seg = |layer, stage, us| SegmentTime {
            layer,
            stage,
            median_us: us,
            min_us: us,
        };
        // Two layers' gate_up (1 MB each at 10 µs + 2 µs boundary) and one lm_head.
        let segments = [
            (seg(Some(0), Stage::GateUp, 12.0), 1_000_000, 1),
            (seg(Some(1), Stage::GateUp, 12.0), 1_000_000, 1),
            (seg(None, Stage::LmHead, 22.0), 4_000_000, 2),
        ];
        let rows = stage_rows(&segments, 2.0, 1.5, 1000.0);
        assert_eq!(rows.len(), 2);
        let g = &rows[0];
        assert_eq!((g.count, g.bytes, g.ops), (2, 2_000_000, 2));
        assert!((g.net_us - 20.0).abs() < 1e-9);
        // 2 MB in 20 µs = 100 GB/s = 10 % of 1000 GB/s.
        assert!((g.gb_s - 100.0).abs() < 1e-9, "{}", g.gb_s);
        assert!((g.pct_of_copy - 10.0).abs() < 1e-9);
        assert!((g.share_pct - 50.0).abs() < 1e-9);
        let p = StepProfile {
            device: "Cuda { gpu_id: 0 }".into(),
            gpu: "Test GPU".into(),
            dtype: "bf16".into(),
            layers: 2,
            moe_layers: 2,
            position: 16,
            kv_rows: 32,
            rounds: 3,
            copy_gb_s: 1000.0,
            step_us: 50.0,
            step_ops: 10,
            segmented_us: 46.0,
            empty_stage_us: 2.0,
            op_floor_us: 1.5,
            bytes_per_step: 6_000_000,
            bound_tok_s: 1000.0 * 1e9 / 6e6,
            tok_s: 20_000.0,
            pct_of_bound: 12.0,
            stages: rows,
            segments: segments.iter().map(|s| s.0.clone()).collect(),
            chained_us: 48.0,
            in_step: in_step_rows(
                48.0,
                &[
                    (Stage::GateUp, 30.0, 2, 2_000_000),
                    (Stage::Router, 47.0, 1, 0),
                ],
                0.5,
                1000.0,
            ),
        };
        let t = table(&p);
        assert!(
            t.contains("| experts gate_up        |     2 |      20.0 |  50.0 % |"),
            "{t}"
        );
        assert!(t.contains("bytes at the copy bandwidth 6.0 µs"), "{t}");
        assert!(t.contains("10 ops × 1.50 µs"), "{t}");
        assert!(
            t.contains("(18.5 µs in all, against the whole step's 50.0)"),
            "{t}"
        );
        // gate_up: 48 − 30 = 18 µs for 2 MB = 111 GB/s = 11.1 % of the copy.
        assert!(
            t.contains("| experts gate_up        |     2 |      18.0 |   1.91 MiB |       111 |    11.1 % |"),
            "{t}"
        );
        // The router: 48 − 47 − one further copy (0.5) = 0.5 µs, nothing read.
        assert!(
            t.contains("| router (top-k)         |     1 |       0.5 |        0 B |         – |         – |"),
            "{t}"
        );
    }

    #[test]
    fn a_kind_faster_than_noise_costs_nothing_not_less() {
        let rows = in_step_rows(10.0, &[(Stage::Down, 10.4, 1, 1_000)], 0.0, 1000.0);
        assert_eq!(
            (rows[0].us, rows[0].gb_s, rows[0].pct_of_copy),
            (0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn the_router_loses_its_second_copy_too() {
        let seg = SegmentTime {
            layer: Some(0),
            stage: Stage::Router,
            median_us: 10.0,
            min_us: 10.0,
        };
        // 10 µs less the empty stage (3) and one more copy (1.5).
        let rows = stage_rows(&[(seg, 0, 2)], 3.0, 1.5, 1000.0);
        assert!((rows[0].net_us - 5.5).abs() < 1e-9, "{}", rows[0].net_us);
    }

    #[test]
    fn the_median_of_an_even_sample_is_the_mean_of_its_middle_pair() {
        use crate::model::step_profile::median;
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
        assert_eq!(median(&[5.0]), 5.0);
        assert_eq!(median(&[]), 0.0);
    }
}
