//! The token inspector (`i`): for the token under the cursor (←/→), each backend's probability
//! and top-5 alternatives and the KL there (teacher-forced on native's tokens, recorded by the
//! quality check), the experts each layer routed it to, and for selective which of them it had
//! to load for this token and how long loading took.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::widgets::{Clear, Paragraph};

use super::tokens::wrap;
use crate::session::event::Backend;
use crate::session::quality::Alternative;
use crate::ui::app::App;

/// "\" cache\" 0.8200 · \" memory\" 0.0500 …"
fn alternatives(alts: &[Alternative]) -> String {
    alts.iter()
        .map(|a| format!("{:?} {:.4}", a.text, a.p))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// The routed experts of each MoE layer, e.g. "L0 3 7 12 19 │ L1 …"; experts in `mark` are
/// bracketed.
fn routing(experts: &[Vec<u16>], layers: &[usize], mark: &[(u16, u16)]) -> String {
    experts
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let layer = layers.get(i).copied().unwrap_or(i);
            let mut row = row.clone();
            row.sort_unstable();
            let cells: Vec<String> = row
                .iter()
                .map(|&e| {
                    if mark.contains(&(layer as u16, e)) {
                        format!("[{e}]")
                    } else {
                        e.to_string()
                    }
                })
                .collect();
            format!("L{layer} {}", cells.join(" "))
        })
        .collect::<Vec<_>>()
        .join(" │ ")
}

/// The lines of the inspector for token `i` of the prompt shown, with their styles.
pub fn lines(app: &App, i: usize) -> Vec<(String, Style)> {
    let t = &app.theme;
    let s = &app.session;
    let prompt = app.prompt();
    let runs = Backend::BOTH.map(|b| s.backend(b).runs.get(prompt));
    let n = runs[0].map_or(0, |r| r.tokens.len());
    let mut v: Vec<(String, Style)> = Vec::new();
    let token = |b: Backend| runs[b.index()].and_then(|r| r.tokens.get(i));
    let shown = |b: Backend| {
        token(b)
            .map(|k| format!("{:?} (id {})", k.text, k.id))
            .unwrap_or_else(|| "–".into())
    };
    v.push((
        format!(
            "token {} of {n} · native {} · selective {}",
            i + 1,
            shown(Backend::Native),
            shown(Backend::Selective)
        ),
        t.title,
    ));
    match s
        .alternatives
        .get(prompt)
        .and_then(Option::as_ref)
        .and_then(|a| a.get(i))
    {
        Some(d) => {
            let native_id = token(Backend::Native).map(|k| k.id);
            let p_of = |alts: &[Alternative]| {
                native_id
                    .and_then(|id| alts.iter().find(|a| a.id == id))
                    .map(|a| format!("{:.4}", a.p))
                    .unwrap_or_else(|| "< top 5".into())
            };
            v.push((
                format!(
                    "native's token: p {} native, {} selective · KL here {:.2e}",
                    p_of(&d.native),
                    p_of(d.selective()),
                    d.kl
                ),
                if d.kl <= 1e-3 { t.good } else { t.warn },
            ));
            v.push((
                format!("native top-5:    {}", alternatives(&d.native)),
                t.text,
            ));
            v.push((
                format!("selective top-5: {}", alternatives(d.selective())),
                t.text,
            ));
        }
        None => v.push((
            "no scores for this token (scoring off, or the prompt's check has not run yet)".into(),
            t.muted,
        )),
    }
    let layers = &s.header.moe.moe_layers;
    for b in Backend::BOTH {
        let Some(tok) = token(b) else { continue };
        let step = tok.position.and_then(|p| {
            s.traces[b.index()]
                .iter()
                .find(|x| x.prompt == prompt && x.position == p)
        });
        let Some(step) = step else {
            v.push((format!("{b}: no routing recorded for this token"), t.muted));
            continue;
        };
        let loads = match (b, tok.load_us) {
            (Backend::Selective, Some(us)) => {
                let routed: usize = step.experts.iter().map(Vec::len).sum();
                format!(
                    " — loaded [{}] of {routed} ({:.2} ms), the rest were hits",
                    tok.loaded.len(),
                    us as f64 / 1e3
                )
            }
            _ => String::new(),
        };
        v.push((
            format!(
                "{b} routing at position {}{loads}: {}",
                step.position,
                routing(&step.experts, layers, &tok.loaded)
            ),
            t.backend(b),
        ));
    }
    v
}

/// The inspector over the lower part of `area` (the token panels stay visible above it).
pub fn render(f: &mut Frame, area: Rect, app: &App, i: usize) {
    let t = &app.theme;
    let h = (area.height / 2).max(6).min(area.height);
    let rect = Rect {
        x: area.x,
        y: area.y + area.height - h,
        width: area.width,
        height: h,
    };
    f.render_widget(Clear, rect);
    let title = super::title("inspect · ←/→ token · ↑/↓ scroll · Esc closes", t.title);
    let block = super::block(app, title, true, false);
    let inner = block.inner(rect);
    f.render_widget(block, rect);
    let pieces: Vec<(String, Style)> = lines(app, i)
        .into_iter()
        .map(|(l, s)| (l + "\n", s))
        .collect();
    let wrapped = wrap(&pieces, inner.width as usize);
    let h = inner.height as usize;
    let start = (app.view.inspect_scroll as usize).min(wrapped.len().saturating_sub(h));
    let visible: Vec<_> = wrapped.into_iter().skip(start).take(h).collect();
    f.render_widget(Paragraph::new(visible), inner);
}
