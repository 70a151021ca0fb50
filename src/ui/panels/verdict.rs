//! The final screen: the verdict with one line per criterion, a per-prompt table, and the
//! outputs of both backends side by side for the prompt in focus.

use ratatui::Frame;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table, Wrap};

use crate::session::event::Backend;
use crate::session::quality::token_agreement;
use crate::session::verdict::{Outcome, Verdict};
use crate::ui::app::App;

pub fn render(
    f: &mut Frame,
    area: Rect,
    app: &App,
    v: &Verdict,
    study: Option<&crate::cache::study::Study>,
) {
    let t = &app.theme;
    let n = app.session.num_prompts() as u16;
    let crit = v.criteria.len() as u16 + v.reasons.len() as u16 + 1;
    let parts = Layout::default()
        .direction(Direction::Vertical)
        .constraints([
            Constraint::Length((crit + 2).min(area.height / 2).max(3)),
            Constraint::Length((n + 3).min(area.height / 3).max(3)),
            Constraint::Min(3),
        ])
        .split(area);

    let head_style = match v.outcome {
        Outcome::Viable if !v.degraded => t.good,
        Outcome::Viable | Outcome::Hybrid => t.warn,
        Outcome::NativePreferred => t.bad,
        Outcome::Inconclusive => t.warn,
    };
    let mut lines = vec![Line::from(vec![
        Span::styled("VERDICT ", t.title),
        Span::styled(v.headline.clone(), head_style),
        Span::styled(format!("  ({} profile)", v.profile), t.muted),
    ])];
    let label_w = v
        .criteria
        .iter()
        .map(|c| c.label.chars().count())
        .max()
        .unwrap_or(10)
        .min(60);
    // Inside the block's borders (and beside the cache study when it has room).
    let inner_w = if area.width >= 120 && study.is_some() {
        (area.width as usize * 62 / 100).saturating_sub(2)
    } else {
        (area.width as usize).saturating_sub(2)
    };
    for c in &v.criteria {
        let native_rule = c.group == "native_preferred";
        let (mark, style) = match (c.pass, native_rule) {
            // Within its own noise of the threshold: neither pass nor fail.
            _ if c.unclear => ("~", t.warn),
            (Some(true), false) => (if app.ascii { "ok" } else { "✓" }, t.good),
            (Some(false), false) => (if app.ascii { "x" } else { "✗" }, t.bad),
            (Some(true), true) => ("clear", t.good),
            (Some(false), true) => ("HOLDS", t.bad),
            (None, _) => ("?", t.muted),
        };
        let group = match c.group.as_str() {
            "viable" => "viable if",
            "native_preferred" => "native if",
            "hybrid_short" => "short:",
            "hybrid_long" => "long:",
            g => g,
        };
        let value = match (c.measured, c.noise) {
            (Some(m), Some(u)) if c.unclear => format!("{m:>10.3} ±{u:.2}"),
            (Some(m), _) => format!("{m:>10.3}"),
            _ => "  not measured".into(),
        };
        let tail = format!(" {} {}", c.op, c.threshold);
        // One line per criterion at any width: the label gives way, ending in "…".
        let room = inner_w.saturating_sub(6 + 10 + value.chars().count() + tail.chars().count());
        let w = label_w.min(room.max(8));
        lines.push(Line::from(vec![
            Span::styled(format!("{mark:>5} "), style),
            Span::styled(format!("{group:<10}"), t.muted),
            Span::styled(format!("{:<w$}", fit(&c.label, w)), t.text),
            Span::styled(value, style),
            Span::styled(tail, t.muted),
        ]));
    }
    for r in &v.reasons {
        lines.push(Line::from(Span::styled(format!("  · {r}"), t.muted)));
    }
    // The reference check is its own line, apart from the verdict.
    if let Some(r) = crate::session::export::reference_summary(&app.session) {
        for l in crate::report::table::reference_lines(&r).lines() {
            lines.push(Line::from(Span::styled(l.to_string(), t.text)));
        }
    }
    let block = super::block(app, super::title("verdict", t.title), false, false);
    // The cache study beside the verdict when there is room for both.
    let (vrect, crect) = if area.width >= 120 && study.is_some() {
        let c = Layout::default()
            .direction(Direction::Horizontal)
            .constraints([Constraint::Percentage(62), Constraint::Percentage(38)])
            .split(parts[0]);
        (c[0], Some(c[1]))
    } else {
        (parts[0], None)
    };
    f.render_widget(
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false }),
        vrect,
    );
    if let Some(r) = crect {
        super::curve::render(f, r, app, study);
    }

    // Per-prompt table (shorter headings where the full ones would be cut).
    let narrow = area.width < 100;
    let header = Row::new(if narrow {
        vec![
            "#",
            "category",
            "nat tok/s",
            "sel tok/s",
            "same",
            "diverges",
            "mean KL",
        ]
    } else {
        vec![
            "#",
            "category",
            "native tok/s",
            "selective tok/s",
            "same tokens",
            "diverges at",
            "mean KL",
        ]
    })
    .style(t.title);
    let rows: Vec<Row> = (0..app.session.num_prompts())
        .map(|i| {
            let p = &app.session.header.prompts.prompts[i];
            let nr = app.session.backends[0].runs.get(i);
            let sr = app.session.backends[1].runs.get(i);
            let tps = |r: Option<&crate::session::state::PromptRun>| {
                r.and_then(|r| r.decode_tok_s())
                    .map(super::num)
                    .unwrap_or("–".into())
            };
            let ag = match (
                nr.and_then(|r| r.done.as_ref()),
                sr.and_then(|r| r.done.as_ref()),
            ) {
                (Some(a), Some(b)) => Some(token_agreement(&a.token_ids, &b.token_ids)),
                _ => None,
            };
            let kl = app.session.agreement[i]
                .as_ref()
                .map(|a| format!("{:.1e}", a.mean_kl))
                .unwrap_or("–".into());
            let style = if i == app.prompt() { t.focus } else { t.text };
            Row::new(vec![
                Cell::from(format!("{}", i + 1)),
                Cell::from(p.category.clone()),
                Cell::from(tps(nr)),
                Cell::from(tps(sr)),
                Cell::from(
                    ag.as_ref()
                        .map(|a| format!("{:.0} %", a.identical_pct))
                        .unwrap_or("–".into()),
                ),
                Cell::from(
                    ag.as_ref()
                        .map(|a| {
                            a.first_divergence
                                .map(|d| d.to_string())
                                .unwrap_or("never".into())
                        })
                        .unwrap_or("–".into()),
                ),
                Cell::from(kl),
            ])
            .style(style)
        })
        .collect();
    let widths = if narrow {
        [
            Constraint::Length(3),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(6),
            Constraint::Length(9),
            Constraint::Length(9),
        ]
    } else {
        [
            Constraint::Length(3),
            Constraint::Length(10),
            Constraint::Length(13),
            Constraint::Length(16),
            Constraint::Length(12),
            Constraint::Length(12),
            Constraint::Length(9),
        ]
    };
    let block = super::block(app, super::title("per prompt", t.title), false, false);
    f.render_widget(
        Table::new(rows, widths).header(header).block(block),
        parts[1],
    );

    // Outputs side by side.
    let cols = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Percentage(50), Constraint::Percentage(50)])
        .split(parts[2]);
    let i = app.prompt();
    for (k, b) in Backend::BOTH.iter().enumerate() {
        let text = app
            .session
            .backend(*b)
            .runs
            .get(i)
            .map(|r| r.text.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "(no output)".into());
        let block = super::block(
            app,
            super::title(
                format!("{} output · prompt {}", b.name(), i + 1),
                t.backend(*b),
            ),
            false,
            false,
        );
        f.render_widget(
            Paragraph::new(text)
                .style(t.text)
                .block(block)
                .wrap(Wrap { trim: false }),
            cols[k],
        );
    }
}

/// `s` in at most `w` characters, "…" marking a cut.
fn fit(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(w.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}
