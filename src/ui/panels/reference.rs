//! The third column (`run --reference-impl`): the reference implementation on the prompt shown —
//! its own greedy text with the tail after its first divergence from native highlighted, its
//! speed, and how close moescope native's distributions are to its own on native's tokens.
//!
//! The reference runs after both backends have finished (beside them a 30B model would not fit
//! where they barely do), so during the run the column says so and fills in at the end.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::Paragraph;

use super::tokens::wrap;
use crate::session::event::Backend;
use crate::session::state::ReferencePromptResult;
use crate::ui::app::App;
use crate::util::fmt_bytes;

/// What the column says above the text, one line each.
fn facts(app: &App, prompt: usize) -> Vec<(String, Style)> {
    let t = &app.theme;
    let Some(r) = &app.session.reference else {
        let name = app
            .session
            .header
            .reference
            .as_deref()
            .unwrap_or("reference");
        let when = if app.session.finished.is_some() {
            "did not run (the run did not complete)"
        } else {
            "runs when both backends are done"
        };
        return vec![(format!("{name} {when}"), t.muted)];
    };
    if let Some(why) = &r.unavailable {
        return vec![
            ("did not run:".into(), t.bad),
            (why.clone(), t.bad),
            ("the run goes on without it".into(), t.muted),
        ];
    }
    let Some(load) = r.load_s else {
        return vec![("loading the same weights…".into(), t.muted)];
    };
    let mut v = Vec::new();
    if let Some(full) = r.implementation.as_deref().filter(|n| n.contains(" (")) {
        v.push((full.to_string(), t.muted));
    }
    let peak = r.peak_bytes.map(|p| {
        let gpu = r
            .peak_gpu
            .map(|g| format!(" (GPU {})", fmt_bytes(g)))
            .unwrap_or_default();
        format!(" · peak {}{gpu}", fmt_bytes(p + r.peak_gpu.unwrap_or(0)))
    });
    v.push((
        format!("load {load:.2} s{}", peak.unwrap_or_default()),
        t.muted,
    ));
    match r.prompts.get(prompt).and_then(Option::as_ref) {
        Some(p) => {
            let speed = p
                .decode_tok_s
                .map(|s| format!("decode {s:.1} tok/s · "))
                .unwrap_or_default();
            v.push((format!("{speed}TTFT {:.3} s", p.ttft_s), t.text));
            match &p.agreement {
                Some(a) => v.push((
                    format!(
                        "native vs it: KL {:.1e}{} · top-1 {:.1} %",
                        a.mean_kl,
                        if a.exact { "" } else { " (≥)" },
                        a.top1_agreement * 100.0
                    ),
                    if a.top1_agreement >= 0.99 {
                        t.good
                    } else {
                        t.warn
                    },
                )),
                None => v.push(("native was not scored on this prompt".into(), t.muted)),
            }
            if let Some(same) = p.routing.as_ref().and_then(|r| r.same_pct()) {
                v.push((
                    format!("same experts at {same:.1} % of (token, layer)"),
                    if same >= 99.0 { t.good } else { t.warn },
                ));
            }
        }
        None => v.push(("this prompt: pending".into(), t.muted)),
    }
    v
}

/// First index where the reference's tokens leave native's.
fn divergence(app: &App, prompt: usize, r: &ReferencePromptResult) -> Option<usize> {
    let native = &app.session.backends[Backend::Native.index()]
        .runs
        .get(prompt)?
        .tokens;
    let common = native.len().min(r.token_ids.len());
    (0..common)
        .find(|&i| native[i].id != r.token_ids[i])
        .or_else(|| (native.len() != r.token_ids.len()).then_some(common))
}

pub fn render(f: &mut Frame, area: Rect, app: &App, focused: bool) {
    let t = &app.theme;
    let prompt = app.prompt();
    let r = app.session.reference.as_ref();
    // "transformers 5.24.0" in the title; what it ran on (torch's version) goes below.
    let name = r
        .and_then(|r| r.implementation.clone())
        .or_else(|| app.session.header.reference.clone())
        .map(|n| n.split(" (").next().unwrap_or_default().to_string())
        .unwrap_or_else(|| "reference".into());
    let done = r.map_or(0, |r| r.prompts.iter().flatten().count());
    let status = match r {
        Some(r) if r.unavailable.is_none() && r.load_s.is_some() => {
            format!(" · {done}/{} prompts", app.session.num_prompts())
        }
        _ => String::new(),
    };
    let compact = area.height < 8;
    let block = super::block(
        app,
        super::title(format!("{name}{status}"), t.title),
        focused,
        compact,
    );
    let inner = block.inner(area);
    f.render_widget(block, area);

    let mut pieces: Vec<(String, Style)> = facts(app, prompt)
        .into_iter()
        .map(|(l, s)| (l + "\n", s))
        .collect();
    if let Some(p) = r
        .and_then(|r| r.prompts.get(prompt))
        .and_then(Option::as_ref)
    {
        pieces.push(("\n".into(), t.text));
        let div = divergence(app, prompt, p);
        if p.text.is_empty() {
            // Recordings from before the text was kept: the ids are all there is.
            let ids: Vec<String> = p.token_ids.iter().map(u32::to_string).collect();
            pieces.push((format!("ids {}", ids.join(" ")), t.muted));
        }
        for (i, piece) in p.text.iter().enumerate() {
            let style = if div.is_some_and(|d| i >= d) {
                t.divergence
            } else {
                t.text
            };
            pieces.push((piece.clone(), style));
        }
        if let Some(d) = div
            && inner.height > 2
        {
            pieces.push((format!("\n⟂ leaves native at token {d}"), t.divergence));
        }
    }
    // Nothing streams here, so it reads from the top; scrolling moves down.
    let lines = wrap(&pieces, inner.width as usize);
    let h = inner.height as usize;
    let start = (app.view.scroll[2] as usize).min(lines.len().saturating_sub(h));
    let visible: Vec<Line> = lines.into_iter().skip(start).take(h).collect();
    f.render_widget(Paragraph::new(visible), inner);
}
