//! One file per panel. Each renders from the [`App`](super::app::App) alone.

pub mod card;
pub mod curve;
pub mod footer;
pub mod gauges;
pub mod header;
pub mod heatmap;
pub mod help;
pub mod inspect;
pub mod memory;
pub mod prompts;
pub mod reference;
pub mod tokens;
pub mod verdict;

use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders};

use super::app::App;

/// A panel frame: full borders when there is room, a top rule with the title when compact.
pub fn block<'a>(app: &App, title: Line<'a>, focused: bool, compact: bool) -> Block<'a> {
    let border = if focused {
        app.theme.focus
    } else {
        app.theme.border
    };
    let b = Block::default()
        .borders(if compact { Borders::TOP } else { Borders::ALL })
        .border_style(border)
        .title(title);
    if app.ascii {
        b.border_set(ratatui::symbols::border::Set {
            top_left: "+",
            top_right: "+",
            bottom_left: "+",
            bottom_right: "+",
            vertical_left: "|",
            vertical_right: "|",
            horizontal_top: "-",
            horizontal_bottom: "-",
        })
    } else {
        b
    }
}

pub fn title<'a>(text: impl Into<String>, style: Style) -> Line<'a> {
    Line::from(Span::styled(
        format!(" {} ", text.into()),
        style.add_modifier(Modifier::BOLD),
    ))
}

/// A `w` × `h` box in the middle of `area` (an overlay), no larger than it.
pub fn centered(area: ratatui::layout::Rect, w: u16, h: u16) -> ratatui::layout::Rect {
    let (w, h) = (w.min(area.width), h.min(area.height));
    ratatui::layout::Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

/// "12.3", "1.23 k" — compact numbers for narrow panels.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
