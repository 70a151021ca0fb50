//! The HTML report's charts, drawn by plotters into SVG strings that the page inlines (no
//! script, no network): memory and decode speed over the session for both backends, selective's
//! per-layer cache heatmap, and hit rate against capacity for every policy and the optimum.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::cache::study::Study;

const NATIVE: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
const SELECTIVE: RGBColor = RGBColor(0xd9, 0x6c, 0x06);
/// One colour per policy in the study, Belady's (the optimum) drawn black and dashed.
const POLICY: [RGBColor; 6] = [
    RGBColor(0x2b, 0x6c, 0xb0),
    RGBColor(0xd9, 0x6c, 0x06),
    RGBColor(0x2f, 0x85, 0x5a),
    RGBColor(0x80, 0x4b, 0xa0),
    RGBColor(0xb8, 0x32, 0x80),
    RGBColor(0x6b, 0x6b, 0x6b),
];

/// A time series per backend: (seconds into the session, value).
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

fn colour(i: usize) -> RGBColor {
    if i == 0 { NATIVE } else { SELECTIVE }
}

/// Plotters reports drawing errors as its own type; here they can only come from the string
/// backend, so they become a message.
fn draw<F>(w: u32, h: u32, f: F) -> Result<String, String>
where
    F: FnOnce(&DrawingArea<SVGBackend, plotters::coord::Shift>) -> Result<(), String>,
{
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        f(&root)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn bounds(series: &[Series]) -> Option<(f64, f64, f64)> {
    let all = series.iter().flat_map(|s| &s.points);
    let t_max = all.clone().map(|p| p.0).fold(f64::NAN, f64::max);
    let v_max = all.map(|p| p.1).fold(f64::NAN, f64::max);
    (t_max.is_finite() && v_max.is_finite()).then_some((0.0, t_max.max(1e-3), v_max * 1.1))
}

/// Lines over session time, one per backend, with a legend; `y_desc` names the unit.
pub fn lines(title: &str, y_desc: &str, series: &[Series]) -> Result<Option<String>, String> {
    let Some((t0, t1, vmax)) = bounds(series) else {
        return Ok(None);
    };
    let vmax = if vmax > 0.0 { vmax } else { 1.0 };
    draw(760, 300, |root| {
        let mut c = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(t0..t1, 0.0..vmax)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_desc("session time, s")
            .y_desc(y_desc)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, s) in series.iter().enumerate() {
            let col = colour(i);
            c.draw_series(LineSeries::new(
                s.points.iter().copied(),
                col.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2)));
        }
        c.configure_series_labels()
            .border_style(BLACK.mix(0.3))
            .background_style(WHITE.mix(0.9))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())
    })
    .map(Some)
}

/// Selective's cache per MoE layer (rows) and expert (columns): colour from red (every access
/// missed) to green (every access hit), faint where an expert was rarely used, grey where never;
/// each row's hit rate at its end.
pub fn heatmap(
    hits: &[Vec<u32>],
    misses: &[Vec<u32>],
    layer_names: &[String],
) -> Result<Option<String>, String> {
    let rows = hits.len().min(misses.len());
    let cols = hits.iter().map(Vec::len).max().unwrap_or(0);
    if rows == 0 || cols == 0 {
        return Ok(None);
    }
    let most = (0..rows)
        .flat_map(|l| (0..cols).map(move |e| (l, e)))
        .map(|(l, e)| hits[l].get(e).unwrap_or(&0) + misses[l].get(e).unwrap_or(&0))
        .max()
        .unwrap_or(0)
        .max(1);
    let cell_h = (320 / rows as u32).clamp(4, 18);
    let h = cell_h * rows as u32 + 70;
    draw(760, h, |root| {
        let mut c = ChartBuilder::on(root)
            .caption(
                "selective cache: hits (green) and misses (red) per layer and expert",
                ("sans-serif", 15),
            )
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(48)
            // Three columns past the experts hold each row's hit rate.
            .build_cartesian_2d(0..cols + 3, (0..rows).into_segmented())
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .disable_mesh()
            .x_desc("expert")
            .x_label_formatter(&|e| {
                if *e < cols {
                    e.to_string()
                } else {
                    String::new()
                }
            })
            .y_labels(rows.min(24))
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(l) => layer_names.get(*l).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| e.to_string())?;
        let cells = (0..rows)
            .flat_map(|l| (0..cols).map(move |e| (l, e)))
            .map(|(l, e)| {
                let (hit, miss) = (
                    *hits[l].get(e).unwrap_or(&0),
                    *misses[l].get(e).unwrap_or(&0),
                );
                let n = hit + miss;
                let style = if n == 0 {
                    RGBColor(0xee, 0xee, 0xee).filled()
                } else {
                    let rate = f64::from(hit) / f64::from(n);
                    let base = RGBColor(
                        (220.0 * (1.0 - rate)) as u8 + 20,
                        (170.0 * rate) as u8 + 40,
                        60,
                    );
                    base.mix(0.25 + 0.75 * f64::from(n) / f64::from(most))
                        .filled()
                };
                Rectangle::new(
                    [
                        (e, SegmentValue::Exact(l)),
                        (e + 1, SegmentValue::Exact(l + 1)),
                    ],
                    style,
                )
            });
        c.draw_series(cells).map_err(|e| e.to_string())?;
        // Each layer's hit rate, right of its row.
        let labels = (0..rows).map(|l| {
            let (h, m): (u32, u32) = (hits[l].iter().sum(), misses[l].iter().sum());
            let text = if h + m == 0 {
                "–".to_string()
            } else {
                format!("{:.0} %", 100.0 * f64::from(h) / f64::from(h + m))
            };
            let style = ("sans-serif", 11)
                .into_font()
                .into_text_style(root)
                .pos(Pos::new(HPos::Left, VPos::Center));
            Text::new(text, (cols + 1, SegmentValue::CenterOf(l)), style)
        });
        c.draw_series(labels).map_err(|e| e.to_string())?;
        Ok(())
    })
    .map(Some)
}

/// Hit rate against capacity (% of all experts) for every policy the study replayed, Belady's
/// optimum dashed, and this run's capacity and measured hit rate as a point.
pub fn study(s: &Study, this_run: Option<(f64, f64)>) -> Result<Option<String>, String> {
    let mut policies: Vec<&str> = Vec::new();
    for p in &s.points {
        if !policies.contains(&p.policy.as_str()) {
            policies.push(&p.policy);
        }
    }
    if policies.is_empty() {
        return Ok(None);
    }
    draw(760, 340, |root| {
        let mut c = ChartBuilder::on(root)
            .caption(
                "hit rate against cache capacity, replayed on this run's routing",
                ("sans-serif", 15),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..100.0, 0.0..100.0)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_desc("capacity, % of all experts")
            .y_desc("hit rate, %")
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, name) in policies.iter().enumerate() {
            let mut pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|p| p.policy == *name)
                .map(|p| (p.capacity_pct, 100.0 * p.hit_rate))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let optimum = *name == "belady";
            let col = if optimum {
                BLACK
            } else {
                POLICY[i % POLICY.len()]
            };
            let label = if optimum {
                "belady (optimum)".to_string()
            } else {
                name.to_string()
            };
            if optimum {
                c.draw_series(DashedLineSeries::new(
                    pts.iter().copied(),
                    6,
                    4,
                    col.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2))
                });
            } else {
                c.draw_series(LineSeries::new(pts.iter().copied(), col.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2))
                    });
            }
        }
        if let Some((cap, hit)) = this_run {
            c.draw_series(std::iter::once(Circle::new((cap, hit), 5, RED.filled())))
                .map_err(|e| e.to_string())?
                .label("this run")
                .legend(|(x, y)| Circle::new((x + 9, y), 4, RED.filled()));
        }
        c.configure_series_labels()
            .border_style(BLACK.mix(0.3))
            .background_style(WHITE.mix(0.9))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| e.to_string())
    })
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_and_empty_data_draws_nothing() {
        let s = [Series {
            name: "native",
            points: vec![(0.0, 1.0), (2.0, 3.0)],
        }];
        let svg = lines("memory", "MiB", &s).unwrap().unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("native"), "{svg}");
        assert!(lines("memory", "MiB", &[]).unwrap().is_none());
        let hm = heatmap(&[vec![3, 0]], &[vec![1, 0]], &["L0".into()])
            .unwrap()
            .unwrap();
        assert!(
            hm.contains("75 %"),
            "the layer's hit rate is written beside its row"
        );
        assert!(heatmap(&[], &[], &[]).unwrap().is_none());
    }
}
