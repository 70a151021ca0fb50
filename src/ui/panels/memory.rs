//! Live memory of one worker process: anonymous and file-backed RSS, GPU memory when known, the
//! peak, and — for selective — the expected level (non-expert weights + cache capacity).

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Chart, Dataset, GraphType, Paragraph};

use crate::session::event::Backend;
use crate::ui::app::App;
use crate::util::fmt_bytes;

pub fn render(f: &mut Frame, area: Rect, app: &App, b: Backend, focused: bool) {
    let t = &app.theme;
    let st = app.session.backend(b);
    let compact = area.height < 8;
    let last = st.mem_last.as_ref();
    let summary = match last {
        Some(m) => format!(
            "mem {} (anon {} file {}{}) peak {}",
            fmt_bytes(m.total()),
            fmt_bytes(m.rss_anon),
            fmt_bytes(m.rss_file),
            match m.gpu {
                Some(g) => format!(" gpu {}", fmt_bytes(g)),
                None => String::new(),
            },
            fmt_bytes(st.mem_peak_total)
        ),
        None => "memory: no sample yet".into(),
    };
    let block = super::block(app, super::title(summary, t.backend(b)), focused, compact);
    let inner = block.inner(area);
    f.render_widget(block, area);
    if inner.height < 2 || st.memory.len() < 2 {
        let gpu = if last.is_some_and(|m| m.gpu.is_none()) {
            "GPU: unavailable (no NVML figure)"
        } else {
            ""
        };
        f.render_widget(
            Paragraph::new(Line::from(Span::styled(gpu, t.muted))),
            inner,
        );
        return;
    }
    let mib = |v: u64| v as f64 / (1u64 << 20) as f64;
    let anon: Vec<(f64, f64)> = st
        .memory
        .iter()
        .map(|(x, m)| (*x, mib(m.rss_anon)))
        .collect();
    let file: Vec<(f64, f64)> = st
        .memory
        .iter()
        .map(|(x, m)| (*x, mib(m.rss_file)))
        .collect();
    let total: Vec<(f64, f64)> = st
        .memory
        .iter()
        .map(|(x, m)| (*x, mib(m.total())))
        .collect();
    let gpu: Vec<(f64, f64)> = st
        .memory
        .iter()
        .filter_map(|(x, m)| m.gpu.map(|g| (*x, mib(g))))
        .collect();
    let x0 = st.memory.front().map(|p| p.0).unwrap_or(0.0);
    let x1 = st.memory.back().map(|p| p.0).unwrap_or(1.0).max(x0 + 1e-3);
    let peak = mib(st.mem_peak_total);
    let peak_line = vec![(x0, peak), (x1, peak)];
    let expected = st
        .resident
        .as_ref()
        .filter(|r| r.cache_capacity > 0)
        .map(|r| mib(r.expected()));
    let exp_line: Vec<(f64, f64)> = expected.map(|e| vec![(x0, e), (x1, e)]).unwrap_or_default();
    let ymax = [peak, expected.unwrap_or(0.0)]
        .iter()
        .copied()
        .fold(1.0, f64::max)
        * 1.15;
    let marker = if app.ascii {
        Marker::Dot
    } else {
        Marker::Braille
    };
    let mut sets = vec![
        Dataset::default()
            .name("total")
            .marker(marker)
            .graph_type(GraphType::Line)
            .style(t.text)
            .data(&total),
        Dataset::default()
            .name("anon")
            .marker(marker)
            .graph_type(GraphType::Line)
            .style(t.rss_anon)
            .data(&anon),
        Dataset::default()
            .name("file")
            .marker(marker)
            .graph_type(GraphType::Line)
            .style(t.rss_file)
            .data(&file),
        Dataset::default()
            .name("peak")
            .marker(marker)
            .graph_type(GraphType::Line)
            .style(t.peak)
            .data(&peak_line),
    ];
    if !gpu.is_empty() {
        sets.push(
            Dataset::default()
                .name("gpu")
                .marker(marker)
                .graph_type(GraphType::Line)
                .style(t.gpu)
                .data(&gpu),
        );
    }
    if !exp_line.is_empty() {
        sets.push(
            Dataset::default()
                .name("expected")
                .marker(marker)
                .graph_type(GraphType::Line)
                .style(t.expected)
                .data(&exp_line),
        );
    }
    let y_labels = vec![
        Span::styled("0", t.muted),
        Span::styled(fmt_bytes((ymax * (1u64 << 20) as f64) as u64), t.muted),
    ];
    let chart = Chart::new(sets)
        .x_axis(Axis::default().bounds([x0, x1]).style(t.muted))
        .y_axis(
            Axis::default()
                .bounds([0.0, ymax])
                .labels(y_labels)
                .style(t.muted),
        )
        .hidden_legend_constraints((
            ratatui::layout::Constraint::Percentage(45),
            ratatui::layout::Constraint::Percentage(60),
        ));
    f.render_widget(chart, inner);
}
