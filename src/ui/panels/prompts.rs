//! The prompt list (`l`): every prompt of the set with its state — done, running, pending — and
//! for done ones the same-token share and selective's speed against native's. ↑/↓ select,
//! Enter jumps there (live: it runs next; replay: playback seeks to it), Esc or `l` closes.

use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::widgets::{Cell, Clear, Row, Table};

use crate::session::event::Backend;
use crate::session::quality::token_agreement;
use crate::ui::app::App;

/// One prompt's state and figures, as the list shows them.
pub fn row_texts(app: &App, i: usize) -> [String; 6] {
    let s = &app.session;
    let p = &s.header.prompts.prompts[i];
    let run = |b: Backend| s.backend(b).runs.get(i);
    let (n, x) = (run(Backend::Native), run(Backend::Selective));
    let done = |r: Option<&crate::session::state::PromptRun>| r.is_some_and(|r| r.done.is_some());
    let started = |r: Option<&crate::session::state::PromptRun>| r.is_some_and(|r| r.started);
    let state = if done(n) && done(x) {
        "done"
    } else if started(n) || started(x) {
        "running"
    } else {
        "pending"
    };
    let same = match (
        n.and_then(|r| r.done.as_ref()),
        x.and_then(|r| r.done.as_ref()),
    ) {
        (Some(a), Some(b)) => format!(
            "{:.0} %",
            token_agreement(&a.token_ids, &b.token_ids).identical_pct
        ),
        _ => "–".into(),
    };
    let ratio = match (
        n.and_then(|r| r.decode_tok_s()),
        x.and_then(|r| r.decode_tok_s()),
    ) {
        (Some(a), Some(b)) if a > 0.0 && state == "done" => format!("{:.2}×", b / a),
        _ => "–".into(),
    };
    [
        format!("{}", i + 1),
        state.into(),
        p.category.clone(),
        p.text.replace('\n', " "),
        same,
        ratio,
    ]
}

/// Returns where its rows lie and the prompt of the first (for the mouse).
pub fn render(f: &mut Frame, area: Rect, app: &App, selected: usize) -> (Rect, usize) {
    let t = &app.theme;
    let n = app.session.num_prompts();
    let w = area.width.saturating_sub(4).max(20).min(area.width);
    let h = (n as u16 + 4).min(area.height);
    let rect = super::centered(area, w, h);
    let header = Row::new(vec!["#", "state", "category", "prompt", "same", "speed"]).style(t.title);
    // Keep the selection in view when the set is longer than the overlay.
    let rows_fit = h.saturating_sub(3) as usize;
    let first = selected.saturating_sub(rows_fit.saturating_sub(1));
    let rows: Vec<Row> = (first..n)
        .map(|i| {
            let cells = row_texts(app, i);
            let style = if i == selected {
                t.focus.add_modifier(ratatui::style::Modifier::REVERSED)
            } else if cells[1] == "running" {
                t.warn
            } else if cells[1] == "pending" {
                t.muted
            } else {
                t.text
            };
            Row::new(cells.map(Cell::from)).style(style)
        })
        .collect();
    let widths = [
        Constraint::Length(3),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Min(10),
        Constraint::Length(6),
        Constraint::Length(7),
    ];
    let title = super::title(
        "prompts · ↑↓ select · Enter: go there · Esc: close",
        t.title,
    );
    f.render_widget(Clear, rect);
    f.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(super::block(app, title, true, false)),
        rect,
    );
    // Inside the border, below the heading.
    let rows_rect = Rect {
        x: rect.x + 1,
        y: rect.y + 2,
        width: rect.width.saturating_sub(2),
        height: rect.height.saturating_sub(3),
    };
    (rows_rect, first)
}
