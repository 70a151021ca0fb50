//! The key hints, the latest status message, and (given a second line) the latest warning.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::ui::app::{App, Mode};

pub fn render(f: &mut Frame, area: Rect, app: &App) {
    let t = &app.theme;
    if app.ask.open {
        // The prompt being typed, the cursor as a block; it runs next on both backends.
        let text = app.ask.text.clone();
        let before: String = text[..app.ask.cursor].iter().collect();
        let at: String = text
            .get(app.ask.cursor)
            .map_or(" ".into(), |c| c.to_string());
        let after: String = text
            .get(app.ask.cursor + 1..)
            .map_or(String::new(), |r| r.iter().collect());
        let line = Line::from(vec![
            Span::styled("ask › ", t.title),
            Span::styled(before, t.text),
            Span::styled(at, t.focus.add_modifier(ratatui::style::Modifier::REVERSED)),
            Span::styled(after, t.text),
            Span::styled("   Enter: run it next · Esc: cancel · ↑↓ history", t.muted),
        ]);
        f.render_widget(Paragraph::new(line), area);
        return;
    }
    let mut lines = vec![];
    if area.height >= 2
        && let Some(latest) = app.session.warnings.last()
    {
        let n = app.session.warnings.len();
        // Short, so the message itself fits 80 columns; every warning is in the export.
        let count = if n > 1 {
            format!("warning {n} of {n}: ")
        } else {
            "warning: ".into()
        };
        lines.push(Line::from(vec![
            Span::styled(count, t.warn),
            Span::styled(latest.replace('\n', " "), t.text),
        ]));
    }
    let mut spans = vec![];
    if app.readonly {
        spans.push(Span::styled("READ-ONLY ", t.warn));
    }
    if let Some(m) = &app.view.message {
        spans.push(Span::styled(format!("{m} · "), t.good));
    }
    let keys = match app.mode {
        Mode::Live if !app.readonly => {
            "q quit  space pause  . step  n/p prompt  r rerun  e export  t theme  tab focus  z zoom  v verdict  ? help"
        }
        Mode::Replay => {
            "q quit  space pause  . step  n/p prompt  r restart  e export  t theme  tab focus  z zoom  v verdict  ? help"
        }
        _ => "q quit  n/p prompt  e export  t theme  tab focus  z zoom  v verdict  ? help",
    };
    spans.push(Span::styled(keys, t.muted));
    lines.push(Line::from(spans));
    f.render_widget(Paragraph::new(lines), area);
}
