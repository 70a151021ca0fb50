//! The plain-text tables a terminal shows: the side-by-side summary of a run and its verdict,
//! one line per criterion (what headless runs, replays without a dashboard and the dashboard's
//! exit print; the markdown export embeds them too).

use super::{opt, opt_bytes};
use crate::session::export::{BackendOutput, Summary};
use crate::session::metrics::BackendMetrics;
use crate::session::verdict::Verdict;
use crate::util::fmt_bytes;

/// The summary table, then the verdict: what a run prints when it ends.
pub fn final_report(summary: &Summary) -> String {
    let mut o = String::new();
    o.push('\n');
    o.push_str(&summary_table(summary));
    o.push('\n');
    for l in verdict_lines(&summary.verdict) {
        o.push_str(&l);
        o.push('\n');
    }
    o
}

/// The side-by-side table printed by headless runs and used in the markdown export.
pub fn summary_table(sum: &Summary) -> String {
    use std::fmt::Write;
    let (n, s) = (&sum.backends.native, &sum.backends.selective);
    let mut o = String::new();
    let row = |o: &mut String, name: &str, a: String, b: String| {
        let _ = writeln!(o, "| {name:<32} | {a:>16} | {b:>16} |");
    };
    let _ = writeln!(o, "| {:<32} | {:>16} | {:>16} |", "", "native", "selective");
    let _ = writeln!(
        o,
        "|{}|{}|{}|",
        "-".repeat(34),
        "-".repeat(18),
        "-".repeat(18)
    );
    row(&mut o, "status", n.status.clone(), s.status.clone());
    row(&mut o, "load time (s)", opt(n.load_s, 2), opt(s.load_s, 2));
    row(
        &mut o,
        "prompts done",
        n.prompts_done.to_string(),
        s.prompts_done.to_string(),
    );
    row(
        &mut o,
        "tokens generated",
        n.generated_tokens.to_string(),
        s.generated_tokens.to_string(),
    );
    row(
        &mut o,
        "TTFT mean (s)",
        opt(n.ttft_mean_s, 3),
        opt(s.ttft_mean_s, 3),
    );
    row(
        &mut o,
        "decode tok/s",
        opt(n.decode_tok_s, 2),
        opt(s.decode_tok_s, 2),
    );
    row(
        &mut o,
        "token latency p50 / p95 (ms)",
        super::latency_ms(n, 1),
        super::latency_ms(s, 1),
    );
    row(
        &mut o,
        "memory before (RSS+GPU)",
        opt_bytes(n.memory.before),
        opt_bytes(s.memory.before),
    );
    row(
        &mut o,
        "memory during (mean)",
        opt_bytes(n.memory.during),
        opt_bytes(s.memory.during),
    );
    row(
        &mut o,
        "memory after",
        opt_bytes(n.memory.after),
        opt_bytes(s.memory.after),
    );
    row(
        &mut o,
        "memory peak",
        fmt_bytes(n.memory.peak),
        fmt_bytes(s.memory.peak),
    );
    row(
        &mut o,
        "  of which GPU (peak)",
        n.memory
            .peak_gpu
            .map(fmt_bytes)
            .unwrap_or_else(|| "unavailable".into()),
        s.memory
            .peak_gpu
            .map(fmt_bytes)
            .unwrap_or_else(|| "unavailable".into()),
    );
    row(
        &mut o,
        "expected weights",
        opt_bytes(n.memory.expected_weights),
        opt_bytes(s.memory.expected_weights),
    );
    row(
        &mut o,
        "cache hit rate",
        "–".into(),
        opt(s.cache_hit_rate.map(|h| h * 100.0), 1) + " %",
    );
    if s.prefetch_precision.is_some() || s.prefetch_recall.is_some() {
        row(
            &mut o,
            "prefetch precision / recall",
            "–".into(),
            format!(
                "{} / {} %",
                opt(s.prefetch_precision.map(|h| h * 100.0), 1),
                opt(s.prefetch_recall.map(|h| h * 100.0), 1)
            ),
        );
        row(
            &mut o,
            "prefetch guesses too late",
            "–".into(),
            opt(s.prefetch_late.map(|h| h * 100.0), 1) + " %",
        );
    }
    // Only where some step did not run the plain way (a GPU): on the CPU every step is
    // uncaptured, which says nothing.
    let plain = |m: &BackendMetrics| {
        m.decode_paths
            .iter()
            .all(|p| p.path == crate::step_path::StepPath::Uncaptured)
    };
    if !(plain(n) && plain(s)) {
        row(
            &mut o,
            "decode steps by path",
            super::paths(&n.decode_paths),
            super::paths(&s.decode_paths),
        );
    }
    row(
        &mut o,
        "perplexity (reference text)",
        opt(n.perplexity, 3),
        opt(s.perplexity, 3),
    );
    row(
        &mut o,
        "coherent outputs",
        opt(sum.quality.native_coherence_pct, 0) + " %",
        opt(sum.quality.selective_coherence_pct, 0) + " %",
    );
    // A Thinking checkpoint: its reasoning and its answers counted apart.
    let parts = |b: fn(&crate::session::export::PromptSummary) -> Option<&BackendOutput>| {
        let (mut thinking, mut answer, mut any) = (0, 0, false);
        for p in &sum.prompts {
            if let Some(t) = b(p).and_then(|o| o.thinking.as_ref()) {
                (thinking, answer, any) =
                    (thinking + t.thinking_tokens, answer + t.answer_tokens, true);
            }
        }
        any.then(|| format!("{thinking} / {answer}"))
    };
    let (nt, st) = (
        parts(|p| p.native.as_ref()),
        parts(|p| p.selective.as_ref()),
    );
    if nt.is_some() || st.is_some() {
        let dash = || "–".to_string();
        row(
            &mut o,
            "reasoning / answer tokens",
            nt.unwrap_or_else(dash),
            st.unwrap_or_else(dash),
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "memory reduction {} %{} · speed ratio {} · token agreement {} % · top-1 agreement {} % · mean KL {} · max KL {}",
        opt(sum.comparison.memory_reduction_pct, 1),
        sum.comparison
            .gpu_memory_reduction_pct
            .map(|g| format!(" (GPU {g:.1} %)"))
            .unwrap_or_default(),
        opt(sum.comparison.speed_ratio, 3),
        opt(sum.quality.token_agreement_pct, 1),
        opt(sum.quality.top1_agreement_pct, 1),
        opt(sum.quality.mean_kl, 6),
        opt(sum.quality.max_kl, 6),
    );
    if let Some(r) = &sum.reference {
        o.push_str(&reference_lines(r));
    }
    let q = &sum.quality;
    if q.thinking_token_agreement_pct.is_some() || q.answer_token_agreement_pct.is_some() {
        let _ = writeln!(
            o,
            "token agreement in native's reasoning {} % · in its answers {} %",
            opt(q.thinking_token_agreement_pct, 1),
            opt(q.answer_token_agreement_pct, 1)
        );
    }
    o
}

/// The reference check (`--reference-impl`): what the reference did, then how closely moescope
/// native matches it — its own line, apart from the verdict.
pub fn reference_lines(r: &crate::session::export::ReferenceSummary) -> String {
    if let Some(why) = &r.unavailable {
        return format!("reference implementation did not run: {why}\n");
    }
    let name = r.implementation.as_deref().unwrap_or("reference");
    let peak = r
        .peak_bytes
        .map(|p| {
            let gpu = r
                .peak_gpu
                .map(|g| format!(", GPU {}", fmt_bytes(g)))
                .unwrap_or_default();
            format!("{}{gpu}", fmt_bytes(p + r.peak_gpu.unwrap_or(0)))
        })
        .unwrap_or_else(|| "–".into());
    let divergence = match r.first_divergence.iter().flatten().min() {
        Some(d) => format!("first divergence at token {d}"),
        None if r.first_divergence.is_empty() => "no prompt compared".into(),
        None => "no divergence".into(),
    };
    let routing = r
        .routing_same_pct
        .map(|p| {
            format!(
                " · same experts {p:.1} % of (position, layer), {} % of picks",
                opt(r.routing_shared_pct, 1)
            )
        })
        .unwrap_or_default();
    format!(
        "reference {name}: load {} s · decode {} tok/s · memory peak {peak}\n\
         moescope native matches {name}: mean KL {}{} · max KL {} · top-1 agreement {} % · \
         identical tokens {} % · {divergence}{routing}\n",
        opt(r.load_s, 2),
        opt(r.decode_tok_s, 2),
        opt(r.mean_kl, 6),
        if r.exact { "" } else { " (lower bound)" },
        opt(r.max_kl, 6),
        opt(r.top1_agreement_pct, 1),
        opt(r.token_agreement_pct, 1),
    )
}

/// One line per criterion: measured value, threshold, pass/fail.
pub fn verdict_lines(v: &Verdict) -> Vec<String> {
    let mut out = vec![format!("verdict ({} profile): {}", v.profile, v.headline)];
    for c in &v.criteria {
        let measured = match (c.measured, c.noise) {
            (Some(v), Some(u)) => format!("{v:.3} ± {u:.3}"),
            (Some(v), None) => format!("{v:.3}"),
            _ => "not measured".into(),
        };
        // Viability criteria pass or fail; native-preferred conditions hold (bad for
        // selective) or are clear.
        let native_rule = c.group == "native_preferred";
        let mark = match (c.pass, native_rule) {
            _ if c.unclear => "unclr",
            (Some(true), false) => "pass ",
            (Some(false), false) => "FAIL ",
            (Some(true), true) => "clear",
            (Some(false), true) => "HOLDS",
            (None, _) => "n/a  ",
        };
        let group = match c.group.as_str() {
            "viable" => "viable if",
            "native_preferred" => "native if",
            "hybrid_short" => "short prompts",
            "hybrid_long" => "long prompts",
            g => g,
        };
        out.push(format!(
            "  [{mark}] {group:<13} {:<58} {measured:>14} {} {}",
            c.label, c.op, c.threshold
        ));
    }
    for r in &v.reasons {
        out.push(format!("  - {r}"));
    }
    out
}
