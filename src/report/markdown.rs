//! A session summary as markdown (`moescope export --format markdown`): verdict, the
//! side-by-side table, per-prompt figures and both outputs.

use super::opt;
use crate::session::export::Summary;

/// The summary as a markdown document.
pub fn markdown(sum: &Summary) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let si = &sum.session;
    let _ = writeln!(o, "# moescope session: {}", si.model);
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{} · {} · {} · {} · cache: {} · schedule {} · prompts: {} · recorded {} on {}",
        si.model_type,
        si.device,
        si.dtype,
        si.config_fingerprint,
        si.cache,
        si.schedule,
        si.prompt_set,
        si.created_utc,
        si.host
    );
    if let Some(changed) = si.settings.as_deref().filter(|c| !c.is_empty()) {
        let _ = writeln!(o, "\nSettings changed from the defaults: {changed}.");
    }
    if sum.degraded {
        let _ = writeln!(o, "\n**DEGRADED RUN**: experts were masked out of routing.");
    }
    let _ = writeln!(o, "\n## Verdict\n\n```");
    for l in super::table::verdict_lines(&sum.verdict) {
        let _ = writeln!(o, "{l}");
    }
    let _ = writeln!(o, "```\n\n## Backends\n");
    o.push_str(&super::table::summary_table(sum));
    let _ = writeln!(o, "\n## Prompts\n");
    let _ = writeln!(
        o,
        "| # | category | prompt | native tok/s | selective tok/s | identical tokens | first divergence | mean KL |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for p in &sum.prompts {
        let (same, div) = super::agreement_cells(p.token_agreement.as_ref());
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            p.index + 1,
            p.category,
            p.text.replace('|', "\\|"),
            opt(p.native.as_ref().and_then(|x| x.decode_tok_s), 2),
            opt(p.selective.as_ref().and_then(|x| x.decode_tok_s), 2),
            same,
            div,
            opt(p.distribution_agreement.as_ref().map(|a| a.mean_kl), 6),
        );
    }
    let _ = writeln!(o, "\n## Sample outputs\n");
    for p in &sum.prompts {
        let _ = writeln!(o, "**{}** ({})\n", p.text, p.category);
        for (name, out) in [("native", &p.native), ("selective", &p.selective)] {
            let flat = |s: &str| s.trim().replace('\n', " ");
            let text = match out {
                None => "(not run)".into(),
                Some(x) => match &x.thinking {
                    // Reasoning first, in italics and counted, then the answer.
                    Some(t) => format!(
                        "*reasoning ({} tokens): {}* — answer: {}",
                        t.thinking_tokens,
                        flat(&t.thinking_text).replace('*', "\\*"),
                        flat(&t.answer_text)
                    ),
                    None => flat(&x.text),
                },
            };
            let _ = writeln!(o, "- {name}: {text}");
        }
        let _ = writeln!(o);
    }
    if !sum.warnings.is_empty() {
        let _ = writeln!(o, "## Warnings\n");
        for w in &sum.warnings {
            let _ = writeln!(o, "- {w}");
        }
    }
    o
}
