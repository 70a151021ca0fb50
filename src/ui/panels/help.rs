//! The `?` overlay: every key and what it does here.

use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Clear, Paragraph, Wrap};

use crate::ui::app::{App, Mode};

pub const KEYS: [(&str, &str); 19] = [
    (
        "n / p",
        "next / previous prompt (live: cancels the current one)",
    ),
    ("space", "pause / resume (replay: pause playback)"),
    (".", "step one token on each backend while paused"),
    ("s", "step mode on / off: stop after each prompt (--step)"),
    ("n / Enter", "step mode: on to the next prompt"),
    ("a", "ask a prompt of your own: it runs next (Esc cancels)"),
    (
        "l",
        "prompt list: Enter runs one next (replay: seeks to it)",
    ),
    ("i", "inspect a token: ←/→ move, top-5, KL, routing, loads"),
    ("r", "rerun the current prompt (replay: restart)"),
    (
        "e",
        "export summary JSON + HTML report (every warning in it)",
    ),
    ("t", "cycle colour theme"),
    ("tab / shift-tab", "focus the next / previous panel"),
    ("z", "zoom the focused panel (again to return)"),
    ("↑ ↓ / k j", "scroll the focused token panel"),
    ("v", "show / hide the verdict screen"),
    ("?", "this help"),
    (
        "q / Ctrl-C",
        "quit: workers stopped, recording closed, screen back",
    ),
    (
        "--readonly",
        "n/p only change the view; space . r s a are off",
    ),
    (
        "mouse",
        "click focuses / picks, wheel scrolls; Shift+drag selects",
    ),
];

pub fn render(f: &mut Frame, area: Rect, app: &App) {
    let t = &app.theme;
    let w = area.width.saturating_sub(4).min(86);
    let h = (KEYS.len() as u16 + 4).min(area.height.saturating_sub(2));
    let [row] = Layout::vertical([Constraint::Length(h)])
        .flex(Flex::Center)
        .areas(area);
    let [rect] = Layout::horizontal([Constraint::Length(w)])
        .flex(Flex::Center)
        .areas(row);
    f.render_widget(Clear, rect);
    let mut lines: Vec<Line> = KEYS
        .iter()
        .map(|(k, d)| {
            Line::from(vec![
                Span::styled(format!("{k:>16}  "), t.focus),
                Span::styled(*d, t.text),
            ])
        })
        .collect();
    let mode = match app.mode {
        Mode::Live if app.readonly => "live, read-only",
        Mode::Live => "live",
        Mode::Replay => "replay",
        Mode::Watch => "watching a recording",
    };
    lines.push(Line::from(Span::styled(
        format!("mode: {mode} · any key closes this help"),
        t.muted,
    )));
    let block = super::block(app, super::title("keys", t.title), true, false);
    f.render_widget(
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false }),
        rect,
    );
}
