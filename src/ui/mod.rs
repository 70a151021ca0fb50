//! The terminal dashboard — the only module that knows ratatui and crossterm. Live runs, replays
//! and `watch` all feed the same `SessionEvent`s into the same `SessionState` and the same
//! [`App`]; only where the events come from differs.

pub mod app;
pub mod input;
pub mod panels;
pub mod terminal;
pub mod theme;

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use crossterm::event::Event;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::cli::UiArgs;
use crate::session::event::Stamped;
use crate::session::export;
use crate::session::record::{Follower, Header, Recorder, Recording};
use crate::session::state::SessionState;
use crate::session::verdict::{Outcome, Profile};
use crate::worker::scheduler::Control;
use app::{App, Effect, Mode};
use theme::{Depth, Theme};

/// Theme and colour depth from the flags and the environment.
pub fn appearance(ui: &UiArgs) -> Result<(Theme, Depth)> {
    let depth = match Depth::parse(&ui.color).map_err(crate::errors::InputError)? {
        Some(d) if std::env::var("NO_COLOR").is_ok_and(|v| !v.is_empty()) && d != Depth::None => {
            // An explicit --color wins over NO_COLOR: the user asked for it on this command.
            d
        }
        Some(d) => d,
        None => Depth::detect(|k| std::env::var(k).ok()),
    };
    let theme = Theme::load(&ui.theme, depth).map_err(crate::errors::InputError)?;
    Ok((theme, depth))
}

pub fn new_app(state: SessionState, ui: &UiArgs, profile: Profile, mode: Mode) -> Result<App> {
    let (theme, depth) = appearance(ui)?;
    let mut app = App::new(state, theme, depth, profile, mode);
    app.ascii = ui.ascii;
    app.readonly = ui.readonly || mode == Mode::Watch;
    Ok(app)
}

fn frame_interval(fps: u32) -> Duration {
    Duration::from_millis(1000 / fps.clamp(1, 60) as u64)
}

/// Writes the session summary next to the recording.
fn export_now(app: &App) -> String {
    let Some(rec) = &app.recording else {
        return "no recording to export next to".into();
    };
    let sum = export::summarize(&app.session, &app.profile);
    let path = crate::headless::summary_path(rec);
    match serde_json::to_string_pretty(&sum)
        .map_err(std::io::Error::other)
        .and_then(|j| crate::headless::write_atomic(&path, &(j + "\n")))
    {
        Ok(()) => format!("exported {}", path.display()),
        Err(e) => format!("export failed: {e}"),
    }
}

/// Terminal input (keys, resizes) read on a thread of its own and handed over through a channel.
///
/// Why not crossterm's `EventStream` in the `select!`: the loop goes round once per session event
/// (thousands a second: tokens, routing), and every round polled the terminal again — a syscall
/// and a wake-up each time, which on a 2-core machine cost the measured workers several % of
/// their decode speed. A blocked `read` costs nothing until a key arrives. The thread ends when
/// the receiver is dropped (at the next event) or with the process.
fn terminal_events() -> UnboundedReceiver<std::io::Result<Event>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("moescope-keys".into())
        .spawn(move || {
            loop {
                let ev = crossterm::event::read();
                let failed = ev.is_err();
                if tx.send(ev).is_err() || failed {
                    break;
                }
            }
        })
        .expect("spawning the terminal input thread");
    rx
}

/// The live dashboard over a running session.
pub async fn live(
    header: Header,
    mut recorder: Recorder,
    profile: Profile,
    mut events: UnboundedReceiver<Stamped>,
    control: UnboundedSender<Control>,
    ui: &UiArgs,
) -> Result<Outcome> {
    let mut app = new_app(SessionState::new(header), ui, profile, Mode::Live)?;
    app.recording = Some(recorder.path().to_path_buf());
    let mut guard = terminal::init()?;
    let mut keys = terminal_events();
    let mut tick = tokio::time::interval(frame_interval(ui.fps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut dirty = true;
    let mut run_over = false;
    let mut quitting: Option<tokio::time::Instant> = None;
    let mut write_error: Option<String> = None;
    // A dropped SSH session (SIGHUP), `kill` (SIGTERM) or an outside SIGINT stop the run as `q`
    // does, so the recording and summary are complete; after a hang-up there is no terminal
    // left to draw on.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminal_gone = false;
    loop {
        tokio::select! {
            why = async {
                tokio::select! {
                    _ = hangup.recv() => "hung up",
                    _ = terminate.recv() => "terminated",
                    _ = interrupt.recv() => "interrupted",
                }
            }, if quitting.is_none() => {
                let _ = control.send(Control::Quit);
                quitting = Some(tokio::time::Instant::now());
                if why == "hung up" {
                    terminal_gone = true;
                    crate::headless::silence_stdio();
                }
                app.view.message = Some(format!("{why}: stopping workers…"));
                dirty = true;
            }
            ev = events.recv(), if !run_over => match ev {
                Some(ev) => {
                    app.session.apply(&ev);
                    if let Err(e) = recorder.append(&ev)
                        && write_error.is_none() {
                            write_error = Some(format!("writing {}: {e}", recorder.path().display()));
                            app.view.message = write_error.clone();
                            let _ = control.send(Control::Quit);
                        }
                    dirty = true;
                }
                None => {
                    run_over = true;
                    dirty = true;
                    if quitting.is_some() {
                        break;
                    }
                }
            },
            k = keys.recv() => {
                match k {
                    Some(Ok(Event::Key(key))) => {
                        if app.view.help {
                            app.view.help = false;
                        } else if let Some(a) = input::action(key) {
                            match app.update(a) {
                                Some(Effect::Control(c)) => { let _ = control.send(c); }
                                Some(Effect::Quit) => {
                                    if run_over { break; }
                                    let _ = control.send(Control::Quit);
                                    quitting = Some(tokio::time::Instant::now());
                                    app.view.message = Some("quitting: stopping workers…".into());
                                }
                                Some(Effect::Export) => app.view.message = Some(export_now(&app)),
                                _ => {}
                            }
                        }
                        dirty = true;
                    }
                    Some(Ok(Event::Resize(_, _))) => dirty = true,
                    Some(Err(_)) | None
                        // No terminal input any more (the SSH session went away): stop cleanly.
                        if quitting.is_none() => {
                            let _ = control.send(Control::Quit);
                            quitting = Some(tokio::time::Instant::now());
                        }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                if dirty && !terminal_gone {
                    // A terminal that can no longer be drawn on has gone away: stop cleanly
                    // rather than lose the run's summary.
                    if guard.term.draw(|f| app.render(f)).is_err() {
                        terminal_gone = true;
                        crate::headless::silence_stdio();
                        if quitting.is_none() {
                            let _ = control.send(Control::Quit);
                            quitting = Some(tokio::time::Instant::now());
                        }
                    }
                    dirty = false;
                }
                if let Some(q) = quitting
                    && (run_over || q.elapsed() > Duration::from_secs(15)) {
                        break;
                    }
            }
        }
    }
    // The files first: nothing that touches the terminal may stand between the run and them.
    let rec_path = recorder.path().to_path_buf();
    recorder.close()?;
    let summary = export::summarize(&app.session, &app.profile);
    let spath = crate::headless::summary_path(&rec_path);
    crate::headless::write_atomic(&spath, &(serde_json::to_string_pretty(&summary)? + "\n"))?;
    drop(guard);
    // Not `print!`: with the terminal gone it would panic; the files above are what counts.
    use std::io::Write;
    let _ = write!(
        std::io::stdout(),
        "{}recording: {}\nsummary:   {}\n",
        crate::headless::final_report(&summary),
        rec_path.display(),
        spath.display()
    );
    if let Some(e) = write_error {
        let _ = writeln!(std::io::stderr(), "error: {e}");
    }
    Ok(summary.verdict.outcome)
}

/// Replays a recording (and with `follow`, keeps reading what is appended).
pub async fn replay(
    path: &Path,
    rec: Recording,
    speed: f64,
    profile: Profile,
    ui: &UiArgs,
    follow: Option<Follower>,
) -> Result<()> {
    let mode = if follow.is_some() {
        Mode::Watch
    } else {
        Mode::Replay
    };
    let header = rec.header.clone();
    let mut app = new_app(SessionState::new(header.clone()), ui, profile, mode)?;
    app.speed = speed;
    app.recording = Some(path.to_path_buf());
    if rec.truncated_tail {
        app.view.message = Some("the recording's last line was incomplete and was skipped".into());
    }
    let mut guard = terminal::init()?;
    let mut keys = terminal_events();
    let mut tick = tokio::time::interval(frame_interval(ui.fps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut events = rec.events;
    let mut next = 0usize;
    let mut follower = follow;
    // Playback clock: session time shown = base + elapsed × speed.
    let mut clock_start = tokio::time::Instant::now();
    let mut clock_base = 0.0f64;
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    let mut dirty = true;
    loop {
        tokio::select! {
            k = keys.recv() => {
                if let Some(Ok(Event::Key(key))) = k {
                    if app.view.help {
                        app.view.help = false;
                    } else if let Some(a) = input::action(key) {
                        match app.update(a) {
                            Some(Effect::Quit) => break,
                            Some(Effect::PlaybackToggle) => {
                                if app.playback_paused {
                                    clock_start = tokio::time::Instant::now();
                                } else {
                                    clock_base += clock_start.elapsed().as_secs_f64() * speed;
                                }
                                app.playback_paused = !app.playback_paused;
                            }
                            Some(Effect::PlaybackStep) => {
                                // Apply events up to and including the next token.
                                while next < events.len() {
                                    let ev = &events[next];
                                    app.session.apply(ev);
                                    clock_base = ev.t;
                                    next += 1;
                                    if matches!(ev.event, crate::session::SessionEvent::Token { .. }) { break; }
                                }
                                app.playback_paused = true;
                            }
                            Some(Effect::PlaybackRestart) => {
                                app.session = SessionState::new(header.clone());
                                next = 0;
                                clock_base = 0.0;
                                clock_start = tokio::time::Instant::now();
                            }
                            Some(Effect::Export) => app.view.message = Some(export_now(&app)),
                            _ => {}
                        }
                    }
                    dirty = true;
                } else if let Some(Ok(Event::Resize(_, _))) = k {
                    dirty = true;
                } else if k.is_none() {
                    break;
                }
            }
            _ = poll.tick(), if follower.is_some() => {
                if let Some(f) = follower.as_mut() {
                    match f.poll() {
                        Ok(new) if !new.is_empty() => { events.extend(new); dirty = true; }
                        Ok(_) => {}
                        Err(e) => app.view.message = Some(format!("following: {e}")),
                    }
                }
            }
            _ = tick.tick() => {
                let now = if app.playback_paused { clock_base } else { clock_base + clock_start.elapsed().as_secs_f64() * speed };
                while next < events.len() && (speed <= 0.0 || mode == Mode::Watch || events[next].t <= now) && !(app.playback_paused && mode == Mode::Replay) {
                    app.session.apply(&events[next]);
                    next += 1;
                    dirty = true;
                }
                if dirty {
                    guard.term.draw(|f| app.render(f))?;
                    dirty = false;
                }
            }
        }
    }
    drop(guard);
    Ok(())
}

/// Names of the themes, for `moescope themes`.
pub fn list_themes() -> Vec<(String, String)> {
    theme::list()
}

/// Renders one frame of an app into a string of the given size (for captures and tests).
pub fn render_to_string(app: &mut App, width: u16, height: u16) -> String {
    let backend = ratatui::backend::TestBackend::new(width, height);
    let mut term = ratatui::Terminal::new(backend).expect("test backend");
    term.draw(|f| app.render(f)).expect("draw");
    let buf = term.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let mut line = String::new();
        for x in 0..buf.area.width {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
