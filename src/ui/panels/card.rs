//! Step mode's result card: the prompt just done on both backends — both outputs, same-token
//! share and first divergence, KL, each backend's decode speed and their ratio, memory peaks,
//! and selective's hits and misses for this prompt — drawn over the columns until the user goes
//! on (`n` / Enter).

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Clear, Paragraph, Wrap};

use crate::session::event::Backend;
use crate::session::quality::token_agreement;
use crate::ui::app::App;
use crate::util::fmt_bytes;

/// The card's lines for prompt `p` (also what the tests read).
pub fn lines(app: &App, p: usize) -> Vec<Line<'static>> {
    let t = &app.theme;
    let s = &app.session;
    let prompt = &s.header.prompts.prompts[p];
    let run = |b: Backend| s.backend(b).run(p);
    let (nat, sel) = (run(Backend::Native), run(Backend::Selective));
    let mut out = vec![Line::from(vec![
        Span::styled(format!("[{}] ", prompt.category), t.warn),
        Span::styled(prompt.text.replace('\n', " "), t.text),
    ])];
    for (b, r) in [(Backend::Native, nat), (Backend::Selective, sel)] {
        let text = r
            .map(|r| r.done.as_ref().map_or(r.text.clone(), |d| d.text.clone()))
            .map(|x| x.trim().replace('\n', " "))
            .filter(|x| !x.is_empty())
            .unwrap_or_else(|| "(no output)".into());
        out.push(Line::from(vec![
            Span::styled(format!("{:<10}", b.name()), t.backend(b)),
            Span::styled(text, t.text),
        ]));
    }
    let ids = |r: Option<&crate::session::state::PromptRun>| {
        r.and_then(|r| r.done.as_ref()).map(|d| d.token_ids.clone())
    };
    let agree = match (ids(nat), ids(sel)) {
        (Some(a), Some(b)) => {
            let a = token_agreement(&a, &b);
            format!(
                "same tokens {:.1} % · {}",
                a.identical_pct,
                a.first_divergence
                    .map_or("no divergence".into(), |d| format!(
                        "first divergence at token {d}"
                    ))
            )
        }
        _ => "same tokens –".into(),
    };
    let kl = s
        .agreement
        .get(p)
        .and_then(|a| a.as_ref())
        .map_or("KL –".to_string(), |a| {
            format!(
                "mean KL {:.2e} · max {:.2e} · top-1 {:.1} %",
                a.mean_kl,
                a.max_kl,
                100.0 * a.top1_agreement
            )
        });
    out.push(Line::from(Span::styled(format!("{agree} · {kl}"), t.text)));
    let speed = |r: Option<&crate::session::state::PromptRun>| r.and_then(|r| r.decode_tok_s());
    let (ns, ss) = (speed(nat), speed(sel));
    let f = |v: Option<f64>| v.map_or("–".into(), super::num);
    out.push(Line::from(Span::styled(
        format!(
            "decode tok/s: native {} · selective {} · ratio {}",
            f(ns),
            f(ss),
            match (ns, ss) {
                (Some(a), Some(b)) if a > 0.0 => format!("{:.3}", b / a),
                _ => "–".into(),
            }
        ),
        t.text,
    )));
    let peak = |b: Backend| {
        let v = s.backend(b).mem_peak_total;
        if v > 0 { fmt_bytes(v) } else { "–".into() }
    };
    out.push(Line::from(Span::styled(
        format!(
            "memory peak so far: native {} · selective {}",
            peak(Backend::Native),
            peak(Backend::Selective)
        ),
        t.text,
    )));
    // This prompt's own hits and misses: the cache's totals now less those when it started.
    let cache = s.backend(Backend::Selective).cache.as_ref();
    let hits = match (sel.and_then(|r| r.cache_before), cache) {
        (Some((h0, m0)), Some(c)) => {
            let (h, m) = (c.hits.saturating_sub(h0), c.misses.saturating_sub(m0));
            let rate = if h + m > 0 {
                format!("{:.1} %", 100.0 * h as f64 / (h + m) as f64)
            } else {
                "–".into()
            };
            format!("selective cache this prompt: hit rate {rate} · {m} misses · {h} hits")
        }
        _ => "selective cache this prompt: –".into(),
    };
    out.push(Line::from(Span::styled(hits, t.text)));
    out.push(Line::from(Span::styled(
        "n / Enter: next prompt · r: run it again · p: previous · s: auto mode · q: quit",
        t.muted,
    )));
    out
}

pub fn render(f: &mut Frame, area: Rect, app: &App, p: usize) {
    let n = app.session.num_prompts();
    let lines = lines(app, p);
    let w = area.width.saturating_sub(4).max(20).min(area.width);
    let inner_w = w.saturating_sub(2).max(1) as usize;
    // Height: each line wrapped to the card's width, plus the borders.
    let rows: usize = lines
        .iter()
        .map(|l| l.width().div_ceil(inner_w).max(1))
        .sum();
    let h = (rows as u16 + 2).min(area.height);
    let rect = super::centered(area, w, h);
    let title = super::title(
        format!("prompt {}/{n} done · waiting", p + 1),
        app.theme.title,
    );
    let block = super::block(app, title, true, false);
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false }),
        rect,
    );
}
