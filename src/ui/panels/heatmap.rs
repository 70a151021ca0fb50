//! Per-layer expert heatmap (layers × experts, binned to fit: 48 × 128 becomes whatever the panel
//! holds). Selective: colour = how often each expert was requested (hits + misses), a solid block
//! where it is resident in the cache; with per-layer hit rate at the right. Native: colour = how
//! often routing picked each expert.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::session::event::Backend;
use crate::ui::app::App;

/// Bins `values` (len n) into `bins` groups by max (so a hot expert never disappears).
pub fn bin_max(values: &[f64], bins: usize) -> Vec<f64> {
    let n = values.len();
    if n == 0 || bins == 0 {
        return Vec::new();
    }
    let bins = bins.min(n);
    (0..bins)
        .map(|i| {
            let a = i * n / bins;
            let b = ((i + 1) * n / bins).max(a + 1);
            values[a..b].iter().copied().fold(0.0, f64::max)
        })
        .collect()
}

/// One MoE layer: (layer, usage per expert, resident per expert, hit rate).
type HeatRow = (usize, Vec<f64>, Vec<bool>, Option<f64>);

pub fn render(f: &mut Frame, area: Rect, app: &App, b: Backend, focused: bool) {
    let t = &app.theme;
    let st = app.session.backend(b);
    let compact = area.height < 8;
    let (title, rows): (String, Vec<HeatRow>) = match (b, &st.cache) {
        (Backend::Selective, Some(c)) => (
            format!(
                "cache {}/{} experts · hit {}{} · {}{}",
                c.resident_experts,
                c.capacity_experts,
                c.hit_rate()
                    .map(|h| format!("{:.1} %", h * 100.0))
                    .unwrap_or("–".into()),
                c.prefetch
                    .as_ref()
                    .map(|p| format!(
                        " · prefetch P {} R {} late {}",
                        p.precision()
                            .map(|v| format!("{:.0}%", v * 100.0))
                            .unwrap_or("–".into()),
                        p.recall()
                            .map(|v| format!("{:.0}%", v * 100.0))
                            .unwrap_or("–".into()),
                        p.late_share()
                            .map(|v| format!("{:.0}%", v * 100.0))
                            .unwrap_or("–".into())
                    ))
                    .unwrap_or_default(),
                if c.load_latency.count > 0 {
                    format!(
                        "load p50 {:.2} ms p95 {:.2} ms",
                        c.load_latency.p50_us / 1e3,
                        c.load_latency.p95_us / 1e3
                    )
                } else {
                    "no loads yet".into()
                },
                gpu_copies(c)
            ),
            c.layers
                .iter()
                .map(|l| {
                    let use_: Vec<f64> = l
                        .hits
                        .iter()
                        .zip(&l.misses)
                        .map(|(h, m)| (*h + *m) as f64)
                        .collect();
                    (l.layer, use_, l.resident.clone(), l.hit_rate())
                })
                .collect(),
        ),
        _ => (
            "routing: experts picked per layer".into(),
            app.session
                .header
                .moe
                .moe_layers
                .iter()
                .zip(&st.usage)
                .map(|(l, u)| {
                    (
                        *l,
                        u.iter().map(|x| *x as f64).collect(),
                        vec![false; u.len()],
                        None,
                    )
                })
                .collect(),
        ),
    };
    let block = super::block(app, super::title(title, t.backend(b)), focused, compact);
    let inner = block.inner(area);
    f.render_widget(block, area);
    if inner.height == 0 || inner.width < 8 || rows.is_empty() {
        return;
    }
    let show_rate = b == Backend::Selective && inner.width >= 20;
    let label_w = 6usize;
    let rate_w = if show_rate { 5 } else { 0 };
    let cells = (inner.width as usize)
        .saturating_sub(label_w + rate_w)
        .max(1);
    // Layers binned into the available rows.
    let nrows = (inner.height as usize).min(rows.len());
    let mut lines = Vec::new();
    for r in 0..nrows {
        let a = r * rows.len() / nrows;
        let z = ((r + 1) * rows.len() / nrows).max(a + 1);
        let group = &rows[a..z];
        let experts = group[0].1.len();
        let mut usage = vec![0.0; experts];
        let mut resident = vec![false; experts];
        for (_, u, res, _) in group {
            for e in 0..experts {
                usage[e] += u[e];
                resident[e] |= res[e];
            }
        }
        let max = usage.iter().copied().fold(0.0, f64::max).max(1e-9);
        let u = bin_max(&usage, cells);
        // Few experts in a wide panel: draw each one several cells wide.
        let widen = (cells / u.len().max(1)).clamp(1, 3);
        let res_f: Vec<f64> = resident
            .iter()
            .map(|&x| if x { 1.0 } else { 0.0 })
            .collect();
        let res = bin_max(&res_f, cells);
        let label = if group.len() == 1 {
            format!("L{:<5}", group[0].0)
        } else {
            format!(
                "{:<6}",
                format!("L{}-{}", group[0].0, group[group.len() - 1].0)
            )
        };
        let mut spans = vec![Span::styled(label, t.muted)];
        for (i, v) in u.iter().enumerate() {
            let level = v / max;
            let (ch, style) = if res[i] > 0.0 {
                (if app.ascii { '#' } else { '█' }, t.heat(level.max(0.15)))
            } else if *v > 0.0 {
                (if app.ascii { '+' } else { '▒' }, t.heat(level))
            } else {
                (if app.ascii { '.' } else { '·' }, t.muted)
            };
            spans.push(Span::styled(ch.to_string().repeat(widen), style));
        }
        if show_rate {
            let rates: Vec<f64> = group.iter().filter_map(|g| g.3).collect();
            let txt = if rates.is_empty() {
                "   – ".to_string()
            } else {
                format!(
                    "{:>4.0}%",
                    100.0 * rates.iter().sum::<f64>() / rates.len() as f64
                )
            };
            let style = match rates.first() {
                Some(r) if *r >= 0.5 => t.good,
                Some(_) => t.warn,
                None => t.muted,
            };
            spans.push(Span::styled(txt, style));
        }
        lines.push(Line::from(spans));
    }
    f.render_widget(Paragraph::new(lines), inner);
}

/// " · direct 51.8 GB/s" on a GPU slot pool once copies have been timed: which path misses take
/// to the device (see `experts::direct`) and the rate they moved at — with some files registered
/// and the rest staged, the share copied direct; empty elsewhere. Every miss staged: how long a
/// miss's copies ran on after its read, since a streamed miss is copied while it is read and a
/// rate over its copies' span would count the waits for the read (BENCHMARKS.md §117).
fn gpu_copies(c: &crate::cache::stats::CacheSnapshot) -> String {
    if c.h2d_time_us == 0 {
        return String::new();
    }
    let all_staged = c.h2d_direct_bytes == 0
        && c.h2d_path
            .as_deref()
            .is_some_and(|p| p.starts_with("staged"));
    if all_staged
        && c.h2d_tail_time_us > 0
        && let Some(tail) = c.staged_copy_tail_s()
    {
        return format!(" · staged, copies end {:.0} µs after each read", tail * 1e6);
    }
    let path = if c.h2d_direct_bytes > 0 && c.h2d_direct_bytes < c.h2d_bytes {
        format!(
            "{:.0} % direct, rest staged,",
            100.0 * c.h2d_direct_bytes as f64 / c.h2d_bytes as f64
        )
    } else {
        c.h2d_path
            .as_deref()
            .and_then(|p| p.split(':').next())
            .unwrap_or("H2D")
            .to_string()
    };
    format!(
        " · {path} {:.1} GB/s",
        c.h2d_bytes as f64 / c.h2d_time_us as f64 / 1e3
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binning_keeps_hot_experts() {
        let mut v = vec![0.0; 128];
        v[77] = 5.0;
        let b = bin_max(&v, 40);
        assert_eq!(b.len(), 40);
        assert_eq!(b.iter().filter(|x| **x == 5.0).count(), 1);
        assert_eq!(
            bin_max(&[1.0, 2.0], 10),
            vec![1.0, 2.0],
            "never more bins than values"
        );
    }

    #[test]
    fn gpu_copies_name_the_path_and_rate() {
        let mut c = crate::cache::stats::CacheSnapshot::default();
        assert_eq!(gpu_copies(&c), "", "CPU caches copy nothing");
        c.h2d_bytes = 5_180_000_000;
        c.h2d_time_us = 100_000;
        c.h2d_path = Some("direct: 3 expert files, 10.4 GiB registered".into());
        assert_eq!(gpu_copies(&c), " · direct 51.8 GB/s");
        c.h2d_path = None;
        assert_eq!(gpu_copies(&c), " · H2D 51.8 GB/s");
        // Some files registered, the rest staged.
        c.h2d_direct_bytes = 3_500_000_000;
        assert_eq!(gpu_copies(&c), " · 68 % direct, rest staged, 51.8 GB/s");
        c.h2d_direct_bytes = c.h2d_bytes;
        assert_eq!(gpu_copies(&c), " · H2D 51.8 GB/s");
        // Every miss staged: the rate until the copies' time after the read is known, then that.
        c.h2d_direct_bytes = 0;
        c.h2d_path = Some("staged: MOESCOPE_H2D=staged".into());
        assert_eq!(gpu_copies(&c), " · staged 51.8 GB/s");
        c.load_latency.count = 200;
        c.h2d_tail_time_us = 2_400;
        assert_eq!(
            gpu_copies(&c),
            " · staged, copies end 12 µs after each read"
        );
    }
}
