//! Snapshots of the whole dashboard on ratatui's TestBackend, at 80×24 and 160×50, driven from
//! recordings: mid-run, a failed worker, the final verdict, the help overlay, and one snapshot
//! per shipped theme (with styles, so a colour change shows).

mod common;

use std::path::PathBuf;

use moescope::session::record;
use moescope::session::state::SessionState;
use moescope::session::verdict::Profile;
use moescope::ui::app::{Action, App, Mode};
use moescope::ui::render_to_string;
use moescope::ui::theme::{BUILTIN, Depth, Theme};

fn recording(rel: &str) -> record::Recording {
    record::read(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// A live dashboard over `s`, judged under `profile`, in `theme`.
fn live_app(s: SessionState, profile: &str, theme: &str) -> App {
    App::new(
        s,
        Theme::load(theme, Depth::TrueColor).unwrap(),
        Depth::TrueColor,
        Profile::load(profile).unwrap(),
        Mode::Live,
    )
}

/// An app with the first `fraction` of a recording's events applied.
fn app_at(rel: &str, fraction: f64, theme: &str) -> App {
    let rec = recording(rel);
    let mut s = SessionState::new(rec.header.clone());
    let n = (rec.events.len() as f64 * fraction) as usize;
    for e in &rec.events[..n] {
        s.apply(e);
    }
    live_app(s, &rec.header.profile, theme)
}

const DEMO: &str = "recordings/demo-tiny-moe.ndjson";

/// The demo recording applied until selective has streamed `n` tokens of prompt 5 (the longest
/// answer): a moment with text in both panes, live gauges and a warm cache.
fn demo_mid_run(n: usize, theme: &str) -> App {
    let rec = recording(DEMO);
    let mut s = SessionState::new(rec.header.clone());
    for e in &rec.events {
        s.apply(e);
        if s.backends[1].runs[4].tokens.len() >= n {
            break;
        }
    }
    live_app(s, &rec.header.profile, theme)
}

#[test]
fn mid_run() {
    for (w, h) in [(80, 24), (160, 50)] {
        let mut app = demo_mid_run(30, "default");
        let text = render_to_string(&mut app, w, h);
        assert!(
            text.contains("prompt 5/6") && text.contains("cache"),
            "{text}"
        );
        insta::assert_snapshot!(format!("mid_run_{w}x{h}"), text);
    }
}

#[test]
fn worker_failed() {
    for (w, h) in [(80, 24), (160, 50)] {
        let mut app = app_at("tests/fixtures/events/failed.ndjson", 0.7, "default");
        let text = render_to_string(&mut app, w, h);
        assert!(text.contains("FAILED"), "{text}");
        insta::assert_snapshot!(format!("worker_failed_{w}x{h}"), text);
    }
}

#[test]
fn final_verdict() {
    for (w, h) in [(80, 24), (160, 50)] {
        let mut app = app_at(DEMO, 1.0, "default");
        let text = render_to_string(&mut app, w, h);
        assert!(text.contains("VERDICT"), "{text}");
        // Every criterion on one line, its value and threshold included, at either size; the
        // per-prompt table's headings whole.
        for l in text.lines().filter(|l| l.contains(" if ")) {
            assert!(
                [" ≥ ", " ≤ ", " < ", " > "].iter().any(|op| l.contains(op)),
                "{l}"
            );
        }
        assert!(
            text.contains("mean KL  ") || text.contains("mean KL │"),
            "{text}"
        );
        assert!(
            !text.contains("selective tok "),
            "a heading cut short:\n{text}"
        );
        insta::assert_snapshot!(format!("final_verdict_{w}x{h}"), text);
    }
    let mut app = app_at("tests/fixtures/events/hybrid.ndjson", 1.0, "default");
    insta::assert_snapshot!(
        "final_verdict_hybrid_160x50",
        render_to_string(&mut app, 160, 50)
    );
}

#[test]
fn help_overlay() {
    for (w, h) in [(80, 24), (160, 50)] {
        let mut app = app_at(DEMO, 0.3, "default");
        app.update(Action::ToggleHelp);
        let text = render_to_string(&mut app, w, h);
        assert!(text.contains("rerun the current prompt"), "{text}");
        insta::assert_snapshot!(format!("help_{w}x{h}"), text);
    }
}

#[test]
fn zoomed_heatmap_and_ascii() {
    let mut app = demo_mid_run(30, "default");
    for _ in 0..7 {
        app.update(Action::FocusNext);
    }
    app.update(Action::ToggleZoom);
    insta::assert_snapshot!(
        "zoom_selective_heatmap_160x50",
        render_to_string(&mut app, 160, 50)
    );
    let mut app = demo_mid_run(30, "default");
    app.ascii = true;
    let text = render_to_string(&mut app, 80, 24);
    assert!(text.is_ascii(), "--ascii draws with ASCII only:\n{text}");
    insta::assert_snapshot!("ascii_80x24", text);
}

#[test]
fn each_theme() {
    for (name, _) in BUILTIN {
        let mut app = demo_mid_run(30, name);
        let backend = ratatui::backend::TestBackend::new(80, 24);
        let mut term = ratatui::Terminal::new(backend).unwrap();
        term.draw(|f| app.render(f)).unwrap();
        insta::assert_debug_snapshot!(format!("theme_{name}"), term.backend().buffer());
    }
}

#[test]
fn readonly_and_replay_keys_do_not_drive_the_run() {
    let mut app = app_at(DEMO, 0.5, "default");
    app.readonly = true;
    assert_eq!(app.update(Action::TogglePause), None);
    assert_eq!(app.update(Action::Rerun), None);
    assert!(
        app.view
            .message
            .as_deref()
            .unwrap_or("")
            .contains("read-only")
    );
    let before = app.prompt();
    assert_eq!(
        app.update(Action::NextPrompt),
        None,
        "readonly n only changes the view"
    );
    assert_eq!(app.prompt(), (before + 1).min(5));
    let mut live = app_at(DEMO, 0.5, "default");
    assert!(matches!(
        live.update(Action::NextPrompt),
        Some(moescope::ui::app::Effect::Control(_))
    ));
}

/// A Thinking checkpoint: each pane shows its reasoning dimmed under "thinking ▸", then the
/// answer under "answer ▸", and counts the reasoning tokens in its title.
#[test]
fn reasoning_is_dimmed_and_set_apart() {
    // Prompt 2 of 3, both backends done: selective diverges in the answer.
    let rec = recording("tests/fixtures/events/thinking.ndjson");
    let mut s = SessionState::new(rec.header.clone());
    for e in &rec.events {
        s.apply(e);
        if s.backends[1].runs[1].done.is_some() {
            break;
        }
    }
    let mut app = live_app(s, &rec.header.profile, "default");
    let text = render_to_string(&mut app, 160, 50);
    assert!(text.contains("25/50 tok (18 thinking)"), "{text}");
    assert!(
        text.contains("thinking ▸") && text.contains("answer ▸"),
        "{text}"
    );
    // The blank lines after `</think>` are the label's: the answer starts on the next line.
    let lines: Vec<&str> = text.lines().collect();
    let label = lines.iter().position(|l| l.contains("│answer ▸")).unwrap();
    assert!(
        lines[label + 1].starts_with("│The capital of France is Paris ."),
        "{text}"
    );
    insta::assert_snapshot!("thinking_160x50", text);
    // The reasoning is drawn in the theme's muted colour, in italics; the answer is not.
    let theme = Theme::load("default", Depth::TrueColor).unwrap();
    let buf = moescope::ui::render_to_buffer(&mut app, 160, 50);
    let find = |word: &str| {
        let area = buf.area;
        for y in 0..area.height {
            let line: String = (0..area.width)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect();
            if let Some(col) = line.find(word) {
                let x = line[..col].chars().count() as u16;
                return buf[(x, y)].style();
            }
        }
        panic!("{word} not on screen");
    };
    let reasoning = find("asks");
    assert_eq!(reasoning.fg, theme.muted.fg);
    assert!(
        reasoning
            .add_modifier
            .contains(ratatui::style::Modifier::ITALIC)
    );
    // (Only its first token: the pane marks the tail after the divergence at token 19.)
    let answer = find("The capital of France is");
    assert_eq!(answer.fg, theme.text.fg);
}

/// Step mode waiting after prompt 2: the result card over the columns, at both sizes — both
/// outputs, agreement, speeds and their ratio, memory, and selective's hits for this prompt
/// alone (300 hits, 40 misses: its cache totals after less before).
#[test]
fn step_mode_result_card() {
    let rec = recording("tests/fixtures/events/step_mode.ndjson");
    let upto = rec
        .events
        .iter()
        .position(|e| {
            matches!(
                e.event,
                moescope::session::SessionEvent::Waiting { prompt: 1 }
            )
        })
        .unwrap();
    for (w, h) in [(80, 24), (160, 50)] {
        let mut s = SessionState::new(rec.header.clone());
        for e in &rec.events[..=upto] {
            s.apply(e);
        }
        let mut app = live_app(s, &rec.header.profile, "default");
        let text = render_to_string(&mut app, w, h);
        for needle in [
            "prompt 2/3 done · waiting",
            "first divergence at token 20",
            "ratio 0.600",
            "hit rate 88.2 % · 40 misses · 300 hits",
            "STEP: n/Enter",
        ] {
            assert!(text.contains(needle), "{w}x{h}: {needle}\n{text}");
        }
        insta::assert_snapshot!(format!("step_mode_card_{w}x{h}"), text);
        // n (or Enter) goes on; s switches step mode; read-only sessions may do neither.
        use moescope::ui::app::Effect;
        use moescope::worker::scheduler::Control;
        assert_eq!(
            app.update(Action::NextPrompt),
            Some(Effect::Control(Control::Continue))
        );
        assert_eq!(
            app.update(Action::Continue),
            Some(Effect::Control(Control::Continue))
        );
        assert_eq!(
            app.update(Action::ToggleStepMode),
            Some(Effect::Control(Control::ToggleStepMode))
        );
        app.readonly = true;
        assert_eq!(app.update(Action::Continue), None);
        assert_eq!(app.update(Action::ToggleStepMode), None);
    }
    // After the wait, no card.
    let mut s = SessionState::new(rec.header.clone());
    for e in &rec.events[..=upto + 1] {
        s.apply(e);
    }
    assert_eq!(s.waiting, None);
    assert!(s.step_mode);
}

/// The "ask" line with text being typed, at both sizes; read-only sessions and replays do not
/// offer it.
#[test]
fn ask_line_with_text() {
    for (w, h) in [(80, 24), (160, 50)] {
        let mut app = demo_mid_run(30, "default");
        assert_eq!(app.update(Action::Ask), None);
        assert!(app.ask.open);
        app.ask.paste("What is the sea?");
        let text = render_to_string(&mut app, w, h);
        assert!(text.contains("ask › What is the sea?"), "{text}");
        insta::assert_snapshot!(format!("ask_line_{w}x{h}"), text);
    }
    let mut app = demo_mid_run(30, "default");
    app.readonly = true;
    app.update(Action::Ask);
    assert!(!app.ask.open);
    let mut replay = app_at(DEMO, 0.5, "default");
    replay.mode = Mode::Replay;
    replay.update(Action::Ask);
    assert!(!replay.ask.open);
    assert_eq!(
        replay.view.message.as_deref(),
        Some("asking needs a live run")
    );
}

/// The prompt list mid-run: done prompts with their same-token share and speed ratio, the
/// running one, the pending ones; Enter jumps (live: runs it next; replay: seeks; read-only:
/// only the view moves).
#[test]
fn prompt_list() {
    use moescope::ui::app::Effect;
    use moescope::worker::scheduler::Control;
    let key = |c| crossterm::event::KeyEvent::new(c, crossterm::event::KeyModifiers::NONE);
    for (w, h) in [(80, 24), (160, 50)] {
        let mut app = demo_mid_run(30, "default");
        app.update(Action::ToggleList);
        assert_eq!(app.view.list, Some(4), "opens on the current prompt");
        let text = render_to_string(&mut app, w, h);
        for needle in ["prompts · ↑↓ select", "done", "running", "pending", "100 %"] {
            assert!(text.contains(needle), "{w}x{h}: {needle}\n{text}");
        }
        insta::assert_snapshot!(format!("prompt_list_{w}x{h}"), text);
    }
    let mut app = demo_mid_run(30, "default");
    app.update(Action::ToggleList);
    app.list_key(key(crossterm::event::KeyCode::Up));
    app.list_key(key(crossterm::event::KeyCode::Up));
    assert_eq!(
        app.list_key(key(crossterm::event::KeyCode::Enter)),
        Some(Effect::Control(Control::Goto(2)))
    );
    assert_eq!(app.view.list, None);
    let mut replay = app_at(DEMO, 1.0, "default");
    replay.mode = Mode::Replay;
    replay.update(Action::ToggleList);
    assert_eq!(
        replay.list_key(key(crossterm::event::KeyCode::Enter)),
        Some(Effect::PlaybackSeek(5))
    );
    let mut ro = demo_mid_run(30, "default");
    ro.readonly = true;
    ro.update(Action::ToggleList);
    ro.list_key(key(crossterm::event::KeyCode::Up));
    assert_eq!(ro.list_key(key(crossterm::event::KeyCode::Enter)), None);
    assert_eq!(ro.prompt(), 3);
}

/// The mouse: a click focuses the panel under it, the wheel scrolls the token panel under the
/// pointer, and on the prompt list a click selects a prompt and a second click jumps there.
#[test]
fn mouse_focuses_scrolls_and_picks_a_prompt() {
    use crossterm::event::{KeyModifiers, MouseButton, MouseEvent, MouseEventKind};
    use moescope::ui::app::{Effect, Panel};
    use moescope::worker::scheduler::Control;
    let at = |kind, column, row| MouseEvent {
        kind,
        column,
        row,
        modifiers: KeyModifiers::NONE,
    };
    let click = MouseEventKind::Down(MouseButton::Left);
    let mut app = demo_mid_run(30, "default");
    render_to_string(&mut app, 160, 50);
    assert_eq!(app.mouse(at(click, 100, 6)), None);
    assert_eq!(
        Panel::ORDER[app.view.focus],
        Panel::Tokens(moescope::session::Backend::Selective)
    );
    app.mouse(at(MouseEventKind::ScrollUp, 10, 6));
    app.mouse(at(MouseEventKind::ScrollUp, 10, 6));
    assert_eq!(app.view.scroll, [2, 0, 0]);
    app.mouse(at(MouseEventKind::ScrollDown, 10, 6));
    assert_eq!(app.view.scroll, [1, 0, 0]);
    // The prompt list: find prompt 2's row on screen, click it twice.
    app.update(Action::ToggleList);
    let text = render_to_string(&mut app, 160, 50);
    let row = text
        .lines()
        .position(|l| l.contains("What is a volcano?") && l.contains("done"))
        .unwrap() as u16;
    assert_eq!(app.mouse(at(click, 20, row)), None);
    assert_eq!(app.view.list, Some(1));
    render_to_string(&mut app, 160, 50);
    assert_eq!(
        app.mouse(at(click, 20, row)),
        Some(Effect::Control(Control::Goto(1)))
    );
}

/// `--reference-impl`: a third column from 120 columns on. While the backends run it says the
/// reference comes after them; at the end it shows, per prompt, the reference's own text with
/// the tail after it leaves native highlighted, its speed, and native's KL against it.
#[test]
fn reference_column() {
    use moescope::session::event::{AgreementStats, RoutingAgreement, SessionEvent, Stamped};
    let stamp = |event| Stamped { t: 9.0, event };
    let rec = recording(DEMO);
    let mut header = rec.header.clone();
    header.reference = Some("transformers".into());
    let mut s = SessionState::new(header);
    let mut during = None;
    for e in &rec.events {
        if matches!(e.event, SessionEvent::Finished { .. }) {
            continue;
        }
        s.apply(e);
        if during.is_none() && s.backends[1].runs[4].tokens.len() >= 30 {
            during = Some(s.clone());
        }
    }
    let mut app = live_app(during.unwrap(), &rec.header.profile, "default");
    let text = render_to_string(&mut app, 160, 50);
    assert!(
        text.contains("transformers runs when both backends"),
        "{text}"
    );
    insta::assert_snapshot!("reference_waiting_160x50", text);
    let narrow = render_to_string(&mut app, 80, 24);
    assert!(
        !narrow.contains("transformers"),
        "no room at 80 columns:\n{narrow}"
    );

    // The reference's results: its tokens are native's, except that on prompt 5 it leaves
    // native at token 12 (its own pieces from there on).
    s.apply(&stamp(SessionEvent::ReferenceLoaded {
        implementation: "transformers 5.24.0 (torch 2.15.0)".into(),
        load_s: 4.89,
    }));
    for p in 0..s.num_prompts() {
        let native = &s.backends[0].runs[p].tokens;
        let mut ids: Vec<u32> = native.iter().map(|t| t.id).collect();
        let mut text: Vec<String> = native.iter().map(|t| t.text.clone()).collect();
        if p == 4 {
            ids.truncate(12);
            text.truncate(12);
            ids.extend([7, 8, 9]);
            text.extend([" something".to_string(), " else".into(), " entirely".into()]);
        }
        s.apply(&stamp(SessionEvent::ReferencePrompt {
            prompt: p,
            token_ids: ids,
            ttft_s: 0.012,
            decode_tok_s: Some(107.1),
            agreement: Some(AgreementStats {
                positions: native.len(),
                mean_kl: 7e-6,
                max_kl: 7.7e-5,
                top1_agreement: 1.0,
                exact: true,
            }),
            text,
            routing: Some(RoutingAgreement {
                pairs: 100,
                same: 100,
                shared: 400,
                picked: 400,
            }),
        }));
    }
    s.apply(&stamp(SessionEvent::ReferenceDone {
        peak_bytes: 815 << 20,
        peak_gpu: None,
    }));
    let mut app = live_app(s, &rec.header.profile, "default");
    app.view.prompt = Some(4);
    let text = render_to_string(&mut app, 160, 50);
    assert!(
        text.contains("transformers 5.24.0 · 6/6 prompts")
            && text.contains("(torch 2.15.0)")
            && text.contains("decode 107.1 tok/s")
            && text.contains("KL 7.0e-6")
            && text.contains("same experts at 100.0 %")
            && text.contains("leaves native at token 12")
            && text.contains("something else"),
        "{text}"
    );
    // Tab reaches the column (the ninth panel) and the wheel/arrow keys scroll it.
    for _ in 0..8 {
        app.update(Action::FocusNext);
    }
    assert_eq!(app.focused(), moescope::ui::app::Panel::Reference);
    // ↓ on the focused column scrolls it down from its top (↑ back).
    app.update(Action::ScrollDown);
    assert_eq!(app.view.scroll, [0, 0, 1]);
    app.update(Action::ScrollUp);
    assert_eq!(app.view.scroll, [0, 0, 0]);
    insta::assert_snapshot!("reference_done_160x50", text);
}

/// The token inspector (`i`, then ←/→) on a real recording: the token under the cursor reversed
/// in both token panels; below them each backend's probability and top-5 there, the KL, and
/// the routing per layer, with what selective had to load for this token bracketed.
#[test]
fn token_inspector() {
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    for (w, h) in [(80, 24), (160, 50)] {
        let mut app = app_at("tests/fixtures/events/inspect.ndjson", 1.0, "default");
        app.view.verdict = Some(false);
        app.view.prompt = Some(1);
        app.update(Action::Inspect);
        // No divergence: it opens on native's last token; two steps back.
        assert_eq!(app.view.inspect, Some(11));
        for _ in 0..2 {
            app.inspect_key(KeyEvent::new(KeyCode::Left, KeyModifiers::NONE));
        }
        assert_eq!(app.view.inspect, Some(9));
        let text = render_to_string(&mut app, w, h);
        assert!(text.contains("token 10 of 12"), "{text}");
        if h >= 50 {
            assert!(
                text.contains("native top-5:")
                    && text.contains("selective top-5:")
                    && text.contains("KL here 0.00e0")
                    && text.contains("selective routing at position"),
                "{text}"
            );
        }
        insta::assert_snapshot!(format!("token_inspector_{w}x{h}"), text);
        // At 80 × 24 the routing lines are below the fold: ↓ brings selective's loads in.
        if h < 50 {
            assert!(!text.contains("selective routing"), "{text}");
            for _ in 0..4 {
                app.inspect_key(KeyEvent::new(KeyCode::Down, KeyModifiers::NONE));
            }
            let scrolled = render_to_string(&mut app, w, h);
            assert!(
                scrolled.contains("selective routing at position"),
                "{scrolled}"
            );
        }
        app.inspect_key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE));
        assert_eq!(app.view.inspect, None);
    }
}

/// A run's warnings reach the dashboard: the latest on a line of its own above the keys, with
/// how many there were; on a screen too short to spare the line, the keys alone.
#[test]
fn latest_warning_above_the_keys() {
    use moescope::session::event::{SessionEvent, Stamped};
    let mut app = demo_mid_run(30, "default");
    let text = render_to_string(&mut app, 80, 24);
    assert!(!text.contains("warning"), "{text}");
    for message in [
        "parallel schedule: both backends run at once, so their timings are contended",
        "prompt 5: 1100 prompt tokens + up to 64 new = 1164 positions, past the 1024 the model \
         was trained for (the prompt alone is longer); text there may degrade — shorten the \
         prompt or --max-new-tokens",
    ] {
        app.session.apply(&Stamped {
            t: 9.0,
            event: SessionEvent::Warning {
                backend: None,
                message: message.into(),
            },
        });
    }
    for (w, h) in [(80, 24), (160, 50)] {
        let text = render_to_string(&mut app, w, h);
        let lines: Vec<&str> = text.lines().collect();
        let warn = lines[lines.len() - 2];
        assert!(
            warn.starts_with("warning 2 of 2: prompt 5: 1100 prompt tokens"),
            "{text}"
        );
        assert!(lines[lines.len() - 1].starts_with("q quit"), "{text}");
        insta::assert_snapshot!(format!("latest_warning_{w}x{h}"), text);
    }
    let text = render_to_string(&mut app, 80, 15);
    assert!(!text.contains("warning"), "{text}");
    assert!(text.lines().last().unwrap().starts_with("q quit"), "{text}");
}
