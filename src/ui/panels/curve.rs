//! Final screen: hit rate against cache capacity for the run just made — every policy and
//! Belady's optimum, simulated on the run's own routing trace — with the chosen capacity marked.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::symbols::Marker;
use ratatui::text::Span;
use ratatui::widgets::{Axis, Chart, Dataset, GraphType, LegendPosition, Paragraph};

use crate::cache::study::Study;
use crate::ui::app::App;

/// One policy's curve: name, style, (capacity %, hit rate %) points.
type Series = (String, Style, Vec<(f64, f64)>);

pub fn render(f: &mut Frame, area: Rect, app: &App, study: Option<&Study>) {
    let t = &app.theme;
    let legend = [
        ("lru", t.selective),
        ("lfu", t.rss_file),
        ("fifo", t.muted),
        ("s3fifo", t.good),
        ("belady", t.bad),
        ("│this run", t.warn),
    ];
    let mut spans = vec![Span::styled(" hit rate vs capacity: ", t.title)];
    for (n, s) in legend {
        spans.push(Span::styled(format!("{n} "), s));
    }
    let block = super::block(app, ratatui::text::Line::from(spans), false, false);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let Some(s) = study else {
        f.render_widget(
            Paragraph::new(Span::styled("no routing trace in this session", t.muted)),
            inner,
        );
        return;
    };
    let styles: [(&str, Style); 5] = [
        ("lru", t.selective),
        ("lfu", t.rss_file),
        ("fifo", t.muted),
        ("s3fifo", t.good),
        ("belady", t.bad),
    ];
    let series: Vec<Series> = styles
        .iter()
        .map(|(name, style)| {
            let pts = s
                .points
                .iter()
                .filter(|p| p.policy == *name)
                .map(|p| (p.capacity_pct, 100.0 * p.hit_rate))
                .collect();
            (name.to_string(), *style, pts)
        })
        .collect();
    let chosen = app
        .session
        .backend(crate::session::Backend::Selective)
        .cache
        .as_ref()
        .map(|c| {
            let x = 100.0 * c.capacity_experts as f64 / s.total_experts.max(1) as f64;
            vec![(x, 0.0), (x, 100.0)]
        });
    let marker = if app.ascii {
        Marker::Dot
    } else {
        Marker::Braille
    };
    let mut sets: Vec<Dataset> = series
        .iter()
        .map(|(n, st, pts)| {
            Dataset::default()
                .name(n.clone())
                .marker(marker)
                .graph_type(GraphType::Line)
                .style(*st)
                .data(pts)
        })
        .collect();
    if let Some(c) = &chosen {
        sets.push(
            Dataset::default()
                .name("this run")
                .marker(marker)
                .graph_type(GraphType::Line)
                .style(t.warn)
                .data(c),
        );
    }
    let chart = Chart::new(sets)
        .x_axis(
            Axis::default()
                .bounds([0.0, 100.0])
                .labels(vec![
                    Span::styled("0", t.muted),
                    Span::styled("capacity 100 %", t.muted),
                ])
                .style(t.muted),
        )
        .y_axis(
            Axis::default()
                .bounds([0.0, 100.0])
                .labels(vec![
                    Span::styled("0", t.muted),
                    Span::styled("100 %", t.muted),
                ])
                .style(t.muted),
        )
        .legend_position(Some(LegendPosition::BottomRight))
        .hidden_legend_constraints((
            ratatui::layout::Constraint::Percentage(60),
            ratatui::layout::Constraint::Percentage(70),
        ));
    f.render_widget(chart, inner);
}
