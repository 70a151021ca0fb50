//! The streamed tokens of the current prompt: wrapped, scrolled to the newest unless the viewer
//! scrolled up, the tail after the first divergence from native highlighted, and a failed
//! worker's reason in red.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::session::event::Backend;
use crate::session::state::Status;
use crate::session::thinking::Part;
use crate::ui::app::App;

/// First index where the two backends' tokens differ (only once both have a token there).
pub fn first_divergence(app: &App, prompt: usize) -> Option<usize> {
    let a = &app.session.backends[0].runs.get(prompt)?.tokens;
    let b = &app.session.backends[1].runs.get(prompt)?.tokens;
    a.iter().zip(b.iter()).position(|(x, y)| x.id != y.id)
}

/// Wraps styled pieces into lines of at most `width` characters: greedy, breaking after the
/// last space that fits, or inside a word longer than the line; newlines always break.
pub fn wrap<'a>(pieces: &[(String, Style)], width: usize) -> Vec<Line<'a>> {
    let width = width.max(1);
    let mut out: Vec<Vec<(char, Style)>> = Vec::new();
    let mut line: Vec<(char, Style)> = Vec::new();
    for (text, style) in pieces {
        for c in text.chars() {
            if c == '\n' {
                out.push(std::mem::take(&mut line));
                continue;
            }
            if c.is_control() {
                continue;
            }
            if line.len() == width {
                // Break after the last space, carrying the partial word over.
                match line.iter().rposition(|(ch, _)| *ch == ' ') {
                    Some(i) if i + 1 < line.len() => {
                        let rest = line.split_off(i + 1);
                        out.push(std::mem::replace(&mut line, rest));
                    }
                    _ => out.push(std::mem::take(&mut line)),
                }
                if c == ' ' && line.is_empty() {
                    continue;
                }
            }
            line.push((c, *style));
        }
    }
    if !line.is_empty() {
        out.push(line);
    }
    out.into_iter()
        .map(|l| {
            let mut spans: Vec<Span<'a>> = Vec::new();
            let mut buf = String::new();
            let mut cur: Option<Style> = None;
            for (c, st) in l {
                if cur.is_some_and(|x| x != st) {
                    spans.push(Span::styled(std::mem::take(&mut buf), cur.expect("set")));
                }
                cur = Some(st);
                buf.push(c);
            }
            if let Some(st) = cur {
                spans.push(Span::styled(buf, st));
            }
            Line::from(spans)
        })
        .collect()
}

pub fn render(f: &mut Frame, area: Rect, app: &App, b: Backend, focused: bool) {
    let t = &app.theme;
    let prompt = app.prompt();
    let st = app.session.backend(b);
    let run = st.runs.get(prompt);
    let compact = area.height < 8;
    let count = run.map(|r| r.tokens.len()).unwrap_or(0);
    let max = run.map(|r| r.max_new_tokens).unwrap_or(0);
    let status = match &st.status {
        Status::Failed(_) => "FAILED".to_string(),
        Status::Loading { done, total } => format!("loading {done}/{total}"),
        Status::Starting => "starting".into(),
        _ => {
            let thinking = run
                .and_then(|r| r.thinking())
                .map(|t| format!(" ({} thinking)", t.thinking_tokens))
                .unwrap_or_default();
            match run.and_then(|r| r.done.as_ref()) {
                Some(d) => format!("{count}/{max} tok{thinking} · {:?}", d.finish).to_lowercase(),
                None if run.is_some_and(|r| r.started) => format!("{count}/{max} tok{thinking}"),
                None => "waiting".into(),
            }
        }
    };
    let title = super::title(format!("{} · {status}", b.name()), t.backend(b));
    let block = super::block(app, title, focused, compact);
    let inner = block.inner(area);
    f.render_widget(block, area);

    if let Status::Failed(reason) = &st.status {
        let msg = [
            Line::from(Span::styled(format!("{b} failed"), t.bad)),
            Line::from(Span::styled(reason.clone(), t.bad)),
            Line::from(Span::styled("the other backend goes on", t.muted)),
        ];
        let lines = wrap(
            &msg.iter()
                .map(|l| (l.to_string() + "\n", l.spans[0].style))
                .collect::<Vec<_>>(),
            inner.width as usize,
        );
        f.render_widget(Paragraph::new(lines), inner);
        return;
    }
    let div = first_divergence(app, prompt);
    let pieces: Vec<(String, Style)> = match run {
        Some(r) if r.started => {
            // Reasoning (a Thinking checkpoint's `<think>` block) is dimmed and set apart from
            // the answer under a label of its own.
            let parts = r.parts();
            let thinking = t.muted.add_modifier(Modifier::ITALIC);
            let mut v: Vec<(String, Style)> = Vec::new();
            if parts.first() == Some(&Part::Thinking) {
                v.push(("thinking ▸\n".into(), t.muted));
            }
            let mut in_answer_gap = false;
            for (i, (tok, part)) in r.tokens.iter().zip(&parts).enumerate() {
                let diverged = div.is_some_and(|d| i >= d);
                let style = match (diverged, part) {
                    (true, Part::Thinking) => t.divergence.add_modifier(Modifier::DIM),
                    (true, Part::Answer) => t.divergence,
                    (false, Part::Thinking) => thinking,
                    (false, Part::Answer) => t.text,
                };
                // The token under the inspector's cursor.
                let style = if app.view.inspect == Some(i) {
                    style.add_modifier(Modifier::REVERSED)
                } else {
                    style
                };
                if *part == Part::Answer && i > 0 && parts[i - 1] == Part::Thinking {
                    v.push(("\nanswer ▸\n".into(), t.muted));
                    in_answer_gap = true;
                }
                // The blank lines a model writes after `</think>` are the label's job now.
                let text = if in_answer_gap {
                    let trimmed = tok.text.trim_start_matches(['\n', ' ']);
                    in_answer_gap = trimmed.is_empty();
                    trimmed.to_string()
                } else {
                    tok.text.clone()
                };
                v.push((text, style));
            }
            // Text the streaming decoder held back (an incomplete character) arrives with the end.
            if let Some(d) = &r.done {
                let streamed: usize = r.tokens.iter().map(|x| x.text.len()).sum();
                if d.text.len() > streamed && d.text.is_char_boundary(streamed) {
                    v.push((d.text[streamed..].to_string(), t.text));
                }
            }
            v
        }
        _ => vec![(String::from("(not started)"), t.muted)],
    };
    let mut lines = wrap(&pieces, inner.width as usize);
    if let Some(d) = div
        && b == Backend::Selective
        && inner.height > 2
    {
        lines.push(Line::from(Span::styled(
            format!("⟂ diverges from native at token {d}"),
            t.divergence,
        )));
    }
    let h = inner.height as usize;
    let scroll = app.view.scroll[b.index()] as usize;
    let end = lines
        .len()
        .saturating_sub(scroll.min(lines.len().saturating_sub(h)));
    let start = end.saturating_sub(h);
    let visible: Vec<Line> = lines[start..end].to_vec();
    f.render_widget(Paragraph::new(visible), inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_spaces_and_newlines() {
        let s = Style::default();
        let lines = wrap(
            &[("hello world, how".into(), s), (" are you\nnext".into(), s)],
            11,
        );
        let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        assert_eq!(text, vec!["hello ", "world, how ", "are you", "next"]);
        let long = wrap(&[("abcdefghijklmnop".into(), s)], 5);
        assert_eq!(long.len(), 4);
    }
}
