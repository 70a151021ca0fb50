//! Two lines: what is being compared (model, device, dtype, cache, schedule) and where the run is
//! (prompt i/N with its category, elapsed, paused/finished).

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::ui::app::{App, Mode};

/// The run's sampling beside the checkpoint's recommendation, when they differ in kind (a
/// greedy comparison of a checkpoint meant to be sampled) — so nobody mistakes a comparison
/// setting for how the model is meant to be used. Empty otherwise.
fn sampling_note(h: &crate::session::record::Header) -> String {
    let Some(rec) = &h.recommended_sampling else {
        return String::new();
    };
    let recommends_sampling =
        rec.do_sample != Some(false) && rec.temperature.is_some_and(|t| t > 0.0);
    let run_greedy = h.sampling.temperature <= 0.0;
    if recommends_sampling && run_greedy {
        format!(" · greedy (checkpoint recommends {})", rec.describe())
    } else {
        String::new()
    }
}

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
        Span::styled(sampling_note(h), t.muted),
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
    let stepping = match (app.session.step_mode, app.session.waiting) {
        (_, Some(_)) => " · STEP: n/Enter for the next prompt",
        (true, None) => " · step mode",
        (false, None) if app.mode == Mode::Live => " · auto",
        _ => "",
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
        Span::styled(stepping, t.warn),
        Span::styled(mode, t.warn),
    ]);
    f.render_widget(Paragraph::new(vec![line1, line2]), area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::RecommendedSampling;

    #[test]
    fn greedy_run_of_a_sampled_checkpoint_says_so() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("recordings/demo-tiny-moe.ndjson");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut h =
            crate::session::record::parse_header(text.lines().next().unwrap(), &path).unwrap();
        assert_eq!(
            sampling_note(&h),
            "",
            "no generation_config recommendation recorded"
        );
        h.recommended_sampling = Some(RecommendedSampling {
            do_sample: Some(true),
            temperature: Some(0.6),
            top_p: Some(0.95),
            top_k: Some(20),
            repetition_penalty: None,
        });
        h.sampling.temperature = 0.0;
        assert_eq!(
            sampling_note(&h),
            " · greedy (checkpoint recommends temperature 0.6, top_p 0.95, top_k 20)"
        );
        h.sampling.temperature = 0.7;
        assert_eq!(
            sampling_note(&h),
            "",
            "the run samples: nothing to point out"
        );
        h.sampling.temperature = 0.0;
        h.recommended_sampling.as_mut().unwrap().do_sample = Some(false);
        assert_eq!(sampling_note(&h), "", "the checkpoint itself is greedy");
    }
}
