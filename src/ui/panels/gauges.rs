//! Throughput: decode tok/s now (last 8 tokens) and on average, TTFT, per-token p50/p95, on a GPU
//! the share of decode steps that ran as one CUDA graph, and a bar of selective's speed against
//! native's with the profile's thresholds marked.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::session::event::Backend;
use crate::session::metrics::{PathShare, backend_metrics, percentile};
use crate::step_path::StepPath;
use crate::ui::app::App;

use super::num;

/// Decode tok/s over the last `n` decode steps of the prompt being shown.
pub fn recent_tok_s(app: &App, b: Backend, n: usize) -> Option<f64> {
    let run = app.session.backend(b).runs.get(app.prompt())?;
    let lat = run.decode_latencies();
    let tail = &lat[lat.len().saturating_sub(n)..];
    let s: f64 = tail.iter().sum();
    (s > 0.0).then(|| tail.len() as f64 / s)
}

/// "graph 87 %": the share of decode steps that ran as one CUDA graph — on a GPU the rest read
/// routing back or ran twice, which is where selective's time goes. None off the GPU (every step
/// op by op) or before any step said how it ran.
pub fn graph_share(paths: &[PathShare]) -> Option<String> {
    if paths.iter().all(|p| p.path == StepPath::Uncaptured) {
        return None;
    }
    let all: usize = paths.iter().map(|p| p.steps).sum();
    let graph: usize = paths
        .iter()
        .filter(|p| p.path == StepPath::Graph)
        .map(|p| p.steps)
        .sum();
    Some(format!("graph {:.0} %", 100.0 * graph as f64 / all as f64))
}

/// Speed-ratio thresholds from the profile (viable floor, native-preferred floor).
fn ratio_marks(app: &App) -> Vec<f64> {
    app.profile
        .viable
        .iter()
        .chain(&app.profile.native_preferred)
        .filter(|c| c.metric == "speed_ratio")
        .map(|c| c.value)
        .collect()
}

pub fn render(f: &mut Frame, area: Rect, app: &App, b: Backend, focused: bool) {
    let t = &app.theme;
    let compact = area.height < 5;
    let block = super::block(
        app,
        super::title("throughput", t.backend(b)),
        focused,
        compact,
    );
    let inner = block.inner(area);
    f.render_widget(block, area);
    let m = backend_metrics(&app.session, b);
    let run = app.session.backend(b).runs.get(app.prompt());
    let lat = run.map(|r| r.decode_latencies()).unwrap_or_default();
    let now = recent_tok_s(app, b, 8);
    let avg = run.and_then(|r| r.decode_tok_s());
    let ttft = run.and_then(|r| r.ttft());
    let line1 = Line::from(vec![
        Span::styled("decode ", t.muted),
        Span::styled(
            format!("{} tok/s", now.map(num).unwrap_or("–".into())),
            t.title,
        ),
        Span::styled(
            format!(" avg {}", avg.map(num).unwrap_or("–".into())),
            t.text,
        ),
        Span::styled(
            format!(" run {}", m.decode_tok_s.map(num).unwrap_or("–".into())),
            t.muted,
        ),
        Span::styled(
            format!(
                " · TTFT {}",
                ttft.map(|v| format!("{v:.3} s")).unwrap_or("–".into())
            ),
            t.text,
        ),
    ]);
    let mut line2 = Line::from(vec![
        Span::styled("token p50 ", t.muted),
        Span::styled(
            percentile(&lat, 0.5)
                .map(|v| format!("{:.1} ms", v * 1e3))
                .unwrap_or("–".into()),
            t.text,
        ),
        Span::styled(" p95 ", t.muted),
        Span::styled(
            percentile(&lat, 0.95)
                .map(|v| format!("{:.1} ms", v * 1e3))
                .unwrap_or("–".into()),
            t.text,
        ),
        Span::styled(
            format!(
                " · load {}",
                m.load_s.map(|v| format!("{v:.2} s")).unwrap_or("–".into())
            ),
            t.muted,
        ),
    ]);
    if let Some(g) = graph_share(&m.decode_paths) {
        line2.push_span(Span::styled(format!(" · {g}"), t.muted));
    }
    let mut lines = vec![line1, line2];
    if inner.height >= 3 {
        lines.push(speed_bar(app, b, inner.width as usize));
    }
    f.render_widget(Paragraph::new(lines), inner);
}

/// `[██████░░|░░░|░░] 0.62× native` with '|' at the profile's speed-ratio thresholds.
fn speed_bar(app: &App, b: Backend, width: usize) -> Line<'static> {
    let t = &app.theme;
    let nat = backend_metrics(&app.session, Backend::Native).decode_tok_s;
    let mine = backend_metrics(&app.session, b).decode_tok_s;
    let label = match (b, nat, mine) {
        (Backend::Native, _, Some(_)) => " 1.00× (reference)".to_string(),
        (Backend::Selective, Some(n), Some(s)) if n > 0.0 => format!(" {:.2}× native", s / n),
        _ => " –".to_string(),
    };
    let w = width.saturating_sub(label.chars().count() + 2).max(4);
    let ratio = match (nat, mine) {
        (Some(n), Some(s)) if n > 0.0 => s / n,
        _ => 0.0,
    };
    // Scale: 0 … 1.25× native, so "as fast" sits at 80 % of the bar.
    let pos = |r: f64| ((r / 1.25).clamp(0.0, 1.0) * w as f64).round() as usize;
    let fill = pos(ratio);
    let marks: Vec<usize> = if b == Backend::Selective {
        ratio_marks(app).into_iter().map(pos).collect()
    } else {
        vec![]
    };
    let (full, empty, mark) = if app.ascii {
        ('#', '-', '|')
    } else {
        ('█', '░', '│')
    };
    let mut spans = vec![Span::styled("[", t.muted)];
    for i in 0..w {
        let (c, style) = if marks.contains(&i) {
            (mark, t.warn)
        } else if i < fill {
            (full, if ratio >= 0.5 { t.good } else { t.bad })
        } else {
            (empty, t.muted)
        };
        spans.push(Span::styled(c.to_string(), style));
    }
    spans.push(Span::styled("]", t.muted));
    spans.push(Span::styled(label, t.text));
    Line::from(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(path: StepPath, steps: usize) -> PathShare {
        PathShare {
            path,
            steps,
            seconds: 0.0,
            mean_s: 0.0,
            time_pct: 0.0,
        }
    }

    #[test]
    fn graph_share_counts_steps_and_says_nothing_off_the_gpu() {
        let gpu = [
            share(StepPath::Graph, 6),
            share(StepPath::Piecewise, 1),
            share(StepPath::Redone, 1),
        ];
        assert_eq!(graph_share(&gpu).as_deref(), Some("graph 75 %"));
        assert_eq!(graph_share(&[share(StepPath::Uncaptured, 9)]), None);
        assert_eq!(graph_share(&[]), None);
    }
}
