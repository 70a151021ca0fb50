//! Two lines: what is being compared (model, device, dtype, cache, schedule) and where the run is
//! (prompt i/N with its category, elapsed, paused/finished).

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::ui::app::{App, Mode};

pub fn render(f: &mut Frame, area: Rect, app: &App) {
    let h = &app.session.header;
    let t = &app.theme;
    let model = std::path::Path::new(&h.model)
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| h.model.clone());
    let line1 = Line::from(vec![
        Span::styled("moescope ", t.title),
        Span::styled(format!("{model} ({})", h.model_type), t.text),
        Span::styled(format!(" · {} · {} · ", h.device, h.dtype), t.muted),
        Span::styled(format!("cache {}", h.cache_describe), t.selective),
        Span::styled(format!(" · {}", h.schedule.name()), t.muted),
    ]);
    let n = app.session.num_prompts();
    let i = app.prompt();
    let p = &h.prompts.prompts[i];
    let elapsed = app.session.now;
    let state = if let Some(r) = &app.session.finished {
        Span::styled(format!("finished ({r})"), t.good)
    } else if app.session.paused || (app.mode == Mode::Replay && app.playback_paused) {
        Span::styled("PAUSED", t.warn)
    } else {
        Span::styled("running", t.muted)
    };
    let mode = match app.mode {
        Mode::Live => String::new(),
        Mode::Replay => format!(" · REPLAY {}×", crate::ui::panels::num(app.speed)),
        Mode::Watch => " · WATCHING".into(),
    };
    let line2 = Line::from(vec![
        Span::styled(format!("prompt {}/{n} ", i + 1), t.title),
        Span::styled(format!("[{}] ", p.category), t.warn),
        Span::styled(p.text.replace('\n', " "), t.text),
        Span::styled(format!(" · {:.1} s · ", elapsed), t.muted),
        state,
        Span::styled(mode, t.warn),
    ]);
    f.render_widget(Paragraph::new(vec![line1, line2]), area);
}
