//! A session as one self-contained HTML page (`moescope export FILE --format html`): the
//! verdict with its criteria, both backends side by side, the per-prompt table, both outputs
//! with the first divergence marked, and charts (inline SVG, see [`super::charts`]) of memory
//! and decode speed over time, selective's per-layer cache and hit rate against capacity. No
//! script, stylesheet, font or image is fetched: the file is the report, to mail or attach.
//!
//! The markup is also well-formed XML (every element closed, text escaped), which is how the
//! tests check it.

use std::fmt::Write;

use super::charts::{self, Series};
use super::opt;
use crate::cache::study::Study;
use crate::session::event::{Backend, SessionEvent};
use crate::session::export::Summary;
use crate::session::record::Recording;
use crate::session::state::SessionState;
use crate::util::fmt_bytes;

/// Text for an element or an attribute.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            // Control characters other than newline and tab are not allowed in XML 1.0.
            c if c.is_control() && c != '\n' && c != '\t' => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;color:#1d2430;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #d5dbe3;padding-bottom:.2em}
.meta{color:#5b6573;font-size:.9em}table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
td,th{border:1px solid #d5dbe3;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f2f5f8}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.verdict{font-size:1.3em;font-weight:bold;padding:.4em .8em;display:inline-block;border-radius:4px;background:#eef2f6}
.VIABLE{background:#dff3e4;color:#1e6b34}.NATIVE_PREFERRED{background:#fbe3e1;color:#9b2a1f}
.HYBRID{background:#fff1d6;color:#8a5a00}.INCONCLUSIVE{background:#eceff3;color:#3d4653}
.pass{color:#1e6b34}.fail{color:#9b2a1f}.unclear{color:#8a5a00}
.outputs{display:grid;grid-template-columns:1fr 1fr;gap:1em}.out{white-space:pre-wrap;border:1px solid #d5dbe3;padding:.5em;border-radius:4px;font-size:.9em}
.think{color:#6b7480;font-style:italic}mark{background:#ffd7d2}.prompt{margin-top:1.2em;font-weight:bold}
figure{margin:1em 0}figcaption{color:#5b6573;font-size:.85em}
";

/// The report. `rec` gives the series over time, `state` the tokens and cache, `sum` every
/// number (the JSON export's), `study` the replayed policies when the run traced its routing.
pub fn html(rec: &Recording, state: &SessionState, sum: &Summary, study: Option<&Study>) -> String {
    let mut o = String::new();
    let si = &sum.session;
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\
         <title>moescope: {}</title><style>{STYLE}</style></head><body>\n",
        escape(&si.model)
    );
    let _ = writeln!(o, "<h1>moescope session: {}</h1>", escape(&si.model));
    let _ = writeln!(
        o,
        "<p class=\"meta\">{} · {} · {} · cache: {} · schedule {} · prompts: {} · recorded {} on {}</p>",
        escape(&si.model_type),
        escape(&si.device),
        escape(&si.dtype),
        escape(&si.cache),
        escape(&si.schedule),
        escape(&si.prompt_set),
        escape(&si.created_utc),
        escape(&si.host)
    );
    if sum.degraded {
        o.push_str(
            "<p class=\"fail\"><b>DEGRADED RUN</b>: experts were masked out of routing.</p>\n",
        );
    }
    verdict(&mut o, sum);
    backends(&mut o, sum);
    prompts(&mut o, sum);
    if let Some(r) = &sum.reference {
        o.push_str("<h2>Against the reference implementation</h2>\n<pre>");
        o.push_str(&escape(&super::table::reference_lines(r)));
        o.push_str("</pre>\n");
    }
    figures(&mut o, rec, state, sum, study);
    outputs(&mut o, state, sum);
    if !sum.warnings.is_empty() {
        o.push_str("<h2>Warnings</h2>\n<ul>");
        for w in &sum.warnings {
            let _ = write!(o, "<li>{}</li>", escape(w));
        }
        o.push_str("</ul>\n");
    }
    let _ = writeln!(
        o,
        "<p class=\"meta\">moescope {} · schema {} · every number here is in <code>moescope export --format json</code> of the same recording.</p>",
        escape(env!("CARGO_PKG_VERSION")),
        escape(&sum.schema)
    );
    o.push_str("</body></html>\n");
    o
}

fn verdict(o: &mut String, sum: &Summary) {
    let v = &sum.verdict;
    let _ = writeln!(
        o,
        "<h2>Verdict</h2>\n<p><span class=\"verdict {:?}\">{}</span> <span class=\"meta\">({} profile)</span></p>",
        v.outcome,
        escape(&v.headline),
        escape(&v.profile)
    );
    o.push_str(
        "<table><tr><th>criterion</th><th>measured</th><th>threshold</th><th>result</th></tr>\n",
    );
    for c in &v.criteria {
        let measured = match (c.measured, c.noise) {
            (Some(m), Some(n)) => format!("{m:.3} ± {n:.3}"),
            (Some(m), None) => format!("{m:.3}"),
            (None, _) => "–".into(),
        };
        // As in the terminal: viability criteria pass or fail; native-preferred conditions
        // hold (bad for selective) or are clear.
        let native_rule = c.group == "native_preferred";
        let (class, word) = match (c.pass, native_rule) {
            _ if c.unclear => ("unclear", "unclear (within noise)"),
            (Some(true), false) => ("pass", "pass"),
            (Some(false), false) => ("fail", "fail"),
            (Some(true), true) => ("pass", "clear"),
            (Some(false), true) => ("fail", "holds"),
            (None, _) => ("unclear", "not measured"),
        };
        let group = match c.group.as_str() {
            "viable" => "viable if",
            "native_preferred" => "native preferred if",
            "hybrid_short" => "short prompts:",
            "hybrid_long" => "long prompts:",
            g => g,
        };
        let _ = writeln!(
            o,
            "<tr><td>{} {}</td><td class=\"n\">{}</td><td class=\"n\">{} {}</td><td class=\"{class}\">{word}</td></tr>",
            escape(group),
            escape(&c.label),
            measured,
            escape(&c.op),
            c.threshold
        );
    }
    o.push_str("</table>\n");
    if !v.reasons.is_empty() {
        o.push_str("<ul>");
        for r in &v.reasons {
            let _ = write!(o, "<li>{}</li>", escape(r));
        }
        o.push_str("</ul>\n");
    }
}

fn backends(o: &mut String, sum: &Summary) {
    let (n, s) = (&sum.backends.native, &sum.backends.selective);
    let c = &sum.comparison;
    o.push_str("<h2>Native and selective</h2>\n<table><tr><th></th><th>native</th><th>selective</th></tr>\n");
    let mut row = |label: &str, a: String, b: String| {
        let _ = writeln!(
            o,
            "<tr><td>{label}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&a),
            escape(&b)
        );
    };
    row("load time, s", opt(n.load_s, 2), opt(s.load_s, 2));
    row(
        "decode tok/s",
        opt(n.decode_tok_s, 2),
        opt(s.decode_tok_s, 2),
    );
    row(
        "TTFT (mean), s",
        opt(n.ttft_mean_s, 3),
        opt(s.ttft_mean_s, 3),
    );
    row(
        "token latency p50 / p95, ms",
        super::latency_ms(n, 2),
        super::latency_ms(s, 2),
    );
    row(
        "memory peak (RSS + GPU)",
        fmt_bytes(n.memory.peak),
        fmt_bytes(s.memory.peak),
    );
    row(
        "expected weights",
        super::opt_bytes(n.memory.expected_weights),
        super::opt_bytes(s.memory.expected_weights),
    );
    row(
        "cache hit rate",
        "–".into(),
        s.cache_hit_rate
            .map(|h| format!("{:.1} %", 100.0 * h))
            .unwrap_or_else(|| "–".into()),
    );
    row(
        "perplexity (reference text)",
        opt(n.perplexity, 3),
        opt(s.perplexity, 3),
    );
    o.push_str("</table>\n");
    let q = &sum.quality;
    let _ = writeln!(
        o,
        "<p>Memory saved <b>{} %</b> · speed ratio (selective / native) <b>{}</b> · identical tokens {} % · top-1 agreement {} % · mean KL {} · max KL {}</p>",
        opt(c.memory_reduction_pct, 1),
        opt(c.speed_ratio, 3),
        opt(q.token_agreement_pct, 1),
        opt(q.top1_agreement_pct, 1),
        opt(q.mean_kl, 6),
        opt(q.max_kl, 6)
    );
}

fn prompts(o: &mut String, sum: &Summary) {
    o.push_str(
        "<h2>Prompts</h2>\n<table><tr><th>#</th><th>category</th><th>prompt</th><th>native tok/s</th>\
         <th>selective tok/s</th><th>identical tokens</th><th>first divergence</th><th>mean KL</th></tr>\n",
    );
    for p in &sum.prompts {
        let (same, div) = super::agreement_cells(p.token_agreement.as_ref());
        let _ = writeln!(
            o,
            "<tr><td class=\"n\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            p.index + 1,
            escape(&p.category),
            escape(&p.text),
            opt(p.native.as_ref().and_then(|x| x.decode_tok_s), 2),
            opt(p.selective.as_ref().and_then(|x| x.decode_tok_s), 2),
            same,
            div,
            opt(p.distribution_agreement.as_ref().map(|a| a.mean_kl), 6),
        );
    }
    o.push_str("</table>\n");
}

/// Both outputs per prompt, side by side: tokens from the first position where they differ
/// are marked, reasoning (a Thinking checkpoint's) in grey italics.
fn outputs(o: &mut String, state: &SessionState, sum: &Summary) {
    o.push_str("<h2>Outputs</h2>\n");
    for p in &sum.prompts {
        let div = p.token_agreement.as_ref().and_then(|a| a.first_divergence);
        let _ = writeln!(
            o,
            "<div class=\"prompt\">{}. {} <span class=\"meta\">({}{})</span></div>\n<div class=\"outputs\">",
            p.index + 1,
            escape(&p.text),
            escape(&p.category),
            div.map(|d| format!(", diverge at token {d}"))
                .unwrap_or_default()
        );
        for b in Backend::BOTH {
            o.push_str("<div class=\"out\">");
            let _ = writeln!(o, "<b>{}</b>", b.name());
            match state.backend(b).run(p.index) {
                None => o.push_str("<span class=\"meta\">(not run)</span>"),
                Some(run) => {
                    let parts = run.parts();
                    let mut marked = false;
                    for (i, (tok, part)) in run.tokens.iter().zip(&parts).enumerate() {
                        if !marked && div.is_some_and(|d| i >= d) {
                            o.push_str("<mark>");
                            marked = true;
                        }
                        let text = escape(&tok.text);
                        if *part == crate::session::thinking::Part::Thinking {
                            let _ = write!(o, "<span class=\"think\">{text}</span>");
                        } else {
                            o.push_str(&text);
                        }
                    }
                    if marked {
                        o.push_str("</mark>");
                    }
                }
            }
            o.push_str("</div>\n");
        }
        o.push_str("</div>\n");
    }
}

/// (session time, value) points, native's then selective's.
type PerBackend = [Vec<(f64, f64)>; 2];

/// Memory (RSS + GPU, checks included and marked by nothing: what the process held) and decode
/// speed (tokens per second of each decode step, a running mean over 8) over session time.
fn series(rec: &Recording) -> (PerBackend, PerBackend) {
    let mut mem = PerBackend::default();
    let mut speed = PerBackend::default();
    let mut window: [std::collections::VecDeque<f64>; 2] = Default::default();
    for e in &rec.events {
        match &e.event {
            SessionEvent::Memory { backend, sample } => {
                mem[backend.index()].push((e.t, sample.total() as f64 / (1u64 << 20) as f64));
            }
            SessionEvent::Token {
                backend,
                dt,
                prefill: false,
                ..
            } if *dt > 0.0 => {
                let w = &mut window[backend.index()];
                w.push_back(*dt);
                if w.len() > 8 {
                    w.pop_front();
                }
                let mean = w.iter().sum::<f64>() / w.len() as f64;
                speed[backend.index()].push((e.t, 1.0 / mean));
            }
            _ => {}
        }
    }
    (mem, speed)
}

fn figure(o: &mut String, svg: Result<Option<String>, String>, caption: &str) {
    match svg {
        Ok(Some(svg)) => {
            let _ = writeln!(
                o,
                "<figure>{svg}<figcaption>{}</figcaption></figure>",
                escape(caption)
            );
        }
        Ok(None) => {
            let _ = writeln!(
                o,
                "<p class=\"meta\">{}: no data in this recording.</p>",
                escape(caption)
            );
        }
        Err(e) => {
            let _ = writeln!(
                o,
                "<p class=\"fail\">{}: could not be drawn ({})</p>",
                escape(caption),
                escape(&e)
            );
        }
    }
}

fn figures(
    o: &mut String,
    rec: &Recording,
    state: &SessionState,
    sum: &Summary,
    study: Option<&Study>,
) {
    o.push_str("<h2>Over the session</h2>\n");
    let (mem, speed) = series(rec);
    let named = |v: PerBackend| -> Vec<Series<'static>> {
        let [n, s] = v;
        [("native", n), ("selective", s)]
            .into_iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(name, points)| Series { name, points })
            .collect()
    };
    figure(
        o,
        charts::lines("memory (RSS + GPU) of each worker", "MiB", &named(mem)),
        "Memory of each backend's worker process, as sampled during the run (loading, prompts and moescope's checks).",
    );
    figure(
        o,
        charts::lines("decode speed", "tokens/s", &named(speed)),
        "Decode speed of each backend: each decode step's tokens per second, a running mean over 8 steps.",
    );
    let sel = state.backend(Backend::Selective);
    if let Some(cache) = &sel.cache {
        let hits: Vec<Vec<u32>> = cache.layers.iter().map(|l| l.hits.clone()).collect();
        let misses: Vec<Vec<u32>> = cache.layers.iter().map(|l| l.misses.clone()).collect();
        let names: Vec<String> = cache
            .layers
            .iter()
            .map(|l| format!("L{}", l.layer))
            .collect();
        figure(
            o,
            charts::heatmap(&hits, &misses, &names),
            "Selective's cache at the end of the run: per MoE layer (rows) and expert (columns), the share of accesses that hit; faint cells were used rarely, grey never. Right: each layer's hit rate.",
        );
    }
    if let Some(s) = study {
        let this_run = sel.cache.as_ref().and_then(|c| {
            let total = state.header.moe.total_experts().max(1) as f64;
            let hit = sum.backends.selective.cache_hit_rate?;
            Some((100.0 * c.capacity_experts as f64 / total, 100.0 * hit))
        });
        figure(
            o,
            charts::study(s, this_run),
            "Every cache policy replayed on this run's routing at a range of capacities, against Belady's optimum (which knows the future); the red point is this run's capacity and measured hit rate.",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_drops_control_characters() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
        assert_eq!(escape("x\u{1}y\nz"), "x\u{fffd}y\nz");
    }
}
