//! Final screen: hit rate against cache capacity for the run just made — every policy and
//! Belady's optimum, simulated on the run's own routing trace — with the chosen capacity marked.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::symbols::Marker;
use ratatui::text::Span;
use ratatui::widgets::{Axis, Chart, Dataset, GraphType, LegendPosition, Paragraph};

use crate::session::cachesim::{self, SimPolicy, Study};
use crate::ui::app::App;

/// The study behind the chart (capacities 5–100 % of all experts plus the run's own).
pub fn study(app: &App) -> Option<Study> {
    let input = cachesim::from_state(&app.session);
    if input.steps.is_empty() {
        return None;
    }
    let total = input.moe.moe_layers.len() * input.moe.num_experts;
    let layers = input.moe.moe_layers.len();
    let mut caps = crate::commands::simulate::default_capacities(total, input.moe.top_k * layers);
    if let Some(l) = &input.live {
        caps.push(l.capacity);
        caps.sort_unstable();
        caps.dedup();
    }
    // A run that prefetched is shown with its guesses replayed, so the marked point is
    // comparable with what the cache did.
    let acc =
        if input.live.as_ref().is_some_and(|l| l.prefetch) && cachesim::has_guesses(&input.steps) {
            cachesim::accesses_prefetched(&input.steps, &input.prompt_tokens)
        } else {
            cachesim::accesses(&input.steps, &input.prompt_tokens)
        };
    let scope = input
        .live
        .as_ref()
        .map(|l| l.scope)
        .unwrap_or(crate::experts::cache::Scope::Global);
    Some(cachesim::study(
        &acc,
        total,
        layers,
        &caps,
        &SimPolicy::all(),
        scope,
        input.costs,
    ))
}

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
