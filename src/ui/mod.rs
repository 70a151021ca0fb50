//! The terminal dashboard — the only module that knows ratatui and crossterm. Live runs, replays
//! and `watch` feed the same `SessionEvent`s into the same `SessionState` and the same [`App`],
//! through one event loop; only where the events come from differs ([`Source`]).

pub mod app;
pub mod ask;
pub mod input;
pub mod panels;
pub mod terminal;
pub mod theme;

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use crossterm::event::Event;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use crate::live::{LiveRun, StopSignals, print_quietly, silence_stdio, write_summary};
use crate::session::event::{SessionEvent, Stamped};
use crate::session::export;
use crate::session::record::{Follower, Header, Recorder, Recording};
use crate::session::state::SessionState;
use crate::session::verdict::{Outcome, Profile};
use crate::worker::scheduler::{Control, Stop};
use app::{App, Effect, Mode};
use theme::{Depth, Theme};

/// How the dashboard looks and what it lets the viewer do (the command line's `UiArgs`).
#[derive(Debug, Clone, PartialEq)]
pub struct UiOptions {
    /// Colour theme (see `moescope themes`).
    pub theme: String,
    /// Colour depth: auto, truecolor, 256, 16, none.
    pub color: String,
    /// ASCII only.
    pub ascii: bool,
    /// Keys that change the run are off.
    pub readonly: bool,
    /// Frames per second at most.
    pub fps: u32,
}

/// Theme and colour depth from the options and the environment.
pub fn appearance(ui: &UiOptions) -> Result<(Theme, Depth)> {
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

pub fn new_app(state: SessionState, ui: &UiOptions, profile: Profile, mode: Mode) -> Result<App> {
    let (theme, depth) = appearance(ui)?;
    let mut app = App::new(state, theme, depth, profile, mode);
    app.ascii = ui.ascii;
    app.readonly = ui.readonly || mode == Mode::Watch;
    Ok(app)
}

fn frame_interval(fps: u32) -> Duration {
    Duration::from_millis(1000 / fps.clamp(1, 60) as u64)
}

/// Writes the session summary next to the recording (the `e` key).
fn export_now(app: &App) -> String {
    let Some(rec) = &app.recording else {
        return "no recording to export next to".into();
    };
    let summary = export::summarize(&app.session, &app.profile);
    let json = match write_summary(rec, &summary) {
        Ok(path) => path,
        Err(e) => return format!("export failed: {e}"),
    };
    // The HTML report beside it: its charts need the whole event history, read back from the
    // recording (complete up to the last event written).
    let html = crate::live::report_path(rec);
    let written = crate::session::record::read(rec).and_then(|r| {
        let study = crate::session::study::run_study(&app.session);
        let page = crate::report::html::html(&r, &app.session, &summary, study.as_ref());
        crate::util::write_atomic(&html, &page).map_err(|e| e.to_string())
    });
    // Names only: the footer is one line, and both files sit beside the recording.
    let name = |p: &std::path::Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    match written {
        Ok(()) => format!(
            "exported {} and {} beside the recording",
            name(&json),
            name(&html)
        ),
        Err(e) => format!("exported {}; the HTML report failed: {e}", name(&json)),
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

/// Playback of a recording: session time shown = base + elapsed × speed (0: as fast as possible).
struct Clock {
    speed: f64,
    base: f64,
    start: Instant,
}

impl Clock {
    fn now(&self, paused: bool) -> f64 {
        if paused {
            self.base
        } else {
            self.base + self.start.elapsed().as_secs_f64() * self.speed
        }
    }
}

/// Where the dashboard's events come from.
enum Source {
    /// A run in progress: events from the scheduler, recorded as they are applied; keys that
    /// change the run become controls.
    Live {
        events: UnboundedReceiver<Stamped>,
        run: LiveRun,
        control: UnboundedSender<Control>,
        over: bool,
    },
    /// A recording played back on a clock; keys pause, step and restart the playback.
    Replay {
        header: Box<Header>,
        events: Vec<Stamped>,
        next: usize,
        clock: Clock,
    },
    /// A recording still being written: new lines as they arrive.
    Watch {
        follower: Follower,
        pending: VecDeque<Stamped>,
        next_poll: Instant,
    },
}

/// How often `watch` looks for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

impl Source {
    /// The next event to apply, when it is due; `None` once a live run's events have ended (a
    /// recording's end simply never yields). Cancel-safe — the loop drops this future whenever
    /// a key or a frame comes first — so every wait is until an absolute time.
    async fn next(&mut self, app: &mut App) -> Option<Stamped> {
        match self {
            Source::Live { events, over, .. } => {
                if *over {
                    return std::future::pending().await;
                }
                let ev = events.recv().await;
                *over = ev.is_none();
                ev
            }
            Source::Replay {
                events,
                next,
                clock,
                ..
            } => {
                let Some(ev) = events.get(*next) else {
                    return std::future::pending().await;
                };
                if app.playback_paused {
                    return std::future::pending().await;
                }
                // A step-mode wait is the user reading, not the run: replay skips it.
                if matches!(ev.event, SessionEvent::Continued { .. }) {
                    clock.base = ev.t;
                    clock.start = Instant::now();
                }
                if clock.speed > 0.0 {
                    let due = (ev.t - clock.base) / clock.speed;
                    if due > 0.0 {
                        // A time no clock reaches (a hand-edited recording) is never due.
                        let at = Duration::try_from_secs_f64(due)
                            .ok()
                            .and_then(|d| clock.start.checked_add(d));
                        match at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => return std::future::pending().await,
                        }
                    }
                }
                *next += 1;
                Some(ev.clone())
            }
            Source::Watch {
                follower,
                pending,
                next_poll,
            } => loop {
                if let Some(ev) = pending.pop_front() {
                    return Some(ev);
                }
                tokio::time::sleep_until(*next_poll).await;
                *next_poll = Instant::now() + FOLLOW_EVERY;
                match follower.poll() {
                    Ok(new) => pending.extend(new),
                    Err(e) => app.view.message = Some(format!("following: {e}")),
                }
            },
        }
    }

    /// Applies an event (and records it, live). A live write failure stops the run.
    fn apply(&mut self, app: &mut App, ev: &Stamped) {
        match self {
            Source::Live { run, control, .. } => {
                if let Some(e) = run.record(&mut app.session, ev) {
                    app.view.message = Some(e);
                    let _ = control.send(Control::Quit(Stop::WriteFailed));
                }
            }
            _ => app.session.apply(ev),
        }
    }

    fn live_over(&self) -> bool {
        matches!(self, Source::Live { over: true, .. })
    }

    /// Asks a live run to stop, saying why (workers are told; events keep coming until they
    /// have).
    fn quit(&self, why: Stop) {
        if let Source::Live { control, .. } = self {
            let _ = control.send(Control::Quit(why));
        }
    }

    /// What an effect of a key does to the run or the playback.
    fn act(&mut self, app: &mut App, effect: Effect) {
        match (self, effect) {
            (Source::Live { control, .. }, Effect::Control(c)) => {
                let _ = control.send(c);
            }
            (Source::Replay { clock, .. }, Effect::PlaybackToggle) => {
                if app.playback_paused {
                    clock.start = Instant::now();
                } else {
                    clock.base = clock.now(false);
                }
                app.playback_paused = !app.playback_paused;
            }
            (
                Source::Replay {
                    events,
                    next,
                    clock,
                    ..
                },
                Effect::PlaybackStep,
            ) => {
                // Everything up to and including the next token.
                while let Some(ev) = events.get(*next) {
                    app.session.apply(ev);
                    clock.base = ev.t;
                    *next += 1;
                    if matches!(ev.event, SessionEvent::Token { .. }) {
                        break;
                    }
                }
                app.playback_paused = true;
            }
            (
                Source::Replay {
                    header,
                    next,
                    clock,
                    ..
                },
                Effect::PlaybackRestart,
            ) => {
                app.session = SessionState::new((**header).clone());
                *next = 0;
                clock.base = 0.0;
                clock.start = Instant::now();
            }
            (
                Source::Replay {
                    header,
                    events,
                    next,
                    clock,
                },
                Effect::PlaybackSeek(p),
            ) => {
                // Replayed afresh up to where the prompt starts (a typed prompt's start lies
                // after the event that added it), playback going on from there.
                let start = events
                    .iter()
                    .position(|e| {
                        matches!(e.event, SessionEvent::PromptStarted { prompt, .. } if prompt == p)
                    })
                    .unwrap_or(events.len());
                app.session = SessionState::new((**header).clone());
                for e in &events[..start] {
                    app.session.apply(e);
                }
                *next = start;
                clock.base = events.get(start).map_or(app.session.now, |e| e.t);
                clock.start = Instant::now();
                app.view.prompt = None;
            }
            (_, Effect::Export) => app.view.message = Some(export_now(app)),
            _ => {}
        }
    }
}

/// The one event loop of the dashboard: events from `source`, keys, frames at `fps`, and stop
/// signals. A live run ends once the user (or a signal, or a failed write) stopped it and its
/// workers have finished — or 15 s after asking; a replay ends on `q`. Returns the terminal
/// still set up: the caller writes its files first, then drops it (nothing that touches the
/// terminal may stand between a run and its files).
async fn event_loop(app: &mut App, source: &mut Source, fps: u32) -> Result<terminal::Guard> {
    let mut guard = terminal::init()?;
    let mut keys = terminal_events();
    let mut tick = tokio::time::interval(frame_interval(fps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut signals = StopSignals::new()?;
    let live = matches!(source, Source::Live { .. });
    let mut dirty = true;
    let mut quitting: Option<Instant> = None;
    let mut terminal_gone = false;
    loop {
        tokio::select! {
            why = signals.next(), if quitting.is_none() => {
                if !live {
                    break;
                }
                source.quit(why);
                quitting = Some(Instant::now());
                terminal_gone |= why == Stop::Sighup;
                app.view.message = Some(format!("{}: stopping workers…", why.reason()));
                dirty = true;
            }
            ev = source.next(app) => {
                match ev {
                    Some(ev) => source.apply(app, &ev),
                    None if quitting.is_some() => break,
                    None => {}
                }
                dirty = true;
            }
            k = keys.recv() => {
                match k {
                    Some(Ok(Event::Key(key))) if app.ask.open => {
                        if key.kind != crossterm::event::KeyEventKind::Release
                            && let ask::AskOutcome::Submitted(text) = app.ask.key(key)
                        {
                            app.view.message = Some(format!("asked: {text}"));
                            source.act(app, Effect::Control(Control::AddPrompt(text)));
                        }
                        dirty = true;
                    }
                    Some(Ok(Event::Key(key))) if app.view.inspect.is_some() => {
                        if key.kind != crossterm::event::KeyEventKind::Release {
                            app.inspect_key(key);
                        }
                        dirty = true;
                    }
                    Some(Ok(Event::Key(key))) if app.view.list.is_some() => {
                        if key.kind != crossterm::event::KeyEventKind::Release
                            && let Some(effect) = app.list_key(key)
                        {
                            source.act(app, effect);
                        }
                        dirty = true;
                    }
                    Some(Ok(Event::Mouse(m))) => {
                        if let Some(effect) = app.mouse(m) {
                            source.act(app, effect);
                        }
                        dirty = true;
                    }
                    Some(Ok(Event::Paste(text))) => {
                        if app.ask.open {
                            app.ask.paste(&text);
                        }
                        dirty = true;
                    }
                    Some(Ok(Event::Key(key))) => {
                        if app.view.help {
                            app.view.help = false;
                        } else if let Some(a) = input::action(key) {
                            match app.update(a) {
                                Some(Effect::Quit) if !live || source.live_over() => break,
                                Some(Effect::Quit) => {
                                    source.quit(Stop::Key);
                                    quitting = Some(Instant::now());
                                    app.view.message = Some("quitting: stopping workers…".into());
                                }
                                Some(effect) => source.act(app, effect),
                                None => {}
                            }
                        }
                        dirty = true;
                    }
                    Some(Ok(Event::Resize(_, _))) => dirty = true,
                    // No terminal input any more (the SSH session went away): stop cleanly.
                    Some(Err(_)) | None if !live => break,
                    Some(Err(_)) | None if quitting.is_none() => {
                        source.quit(Stop::TerminalGone);
                        quitting = Some(Instant::now());
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                if dirty && !terminal_gone {
                    // A terminal that can no longer be drawn on has gone away: stop cleanly
                    // rather than lose the run's summary.
                    if guard.term.draw(|f| app.render(f)).is_err() {
                        if !live {
                            break;
                        }
                        terminal_gone = true;
                        silence_stdio();
                        if quitting.is_none() {
                            source.quit(Stop::TerminalGone);
                            quitting = Some(Instant::now());
                        }
                    }
                    dirty = false;
                }
                if let Some(q) = quitting
                    && (source.live_over() || q.elapsed() > Duration::from_secs(15))
                {
                    break;
                }
            }
        }
    }
    Ok(guard)
}

/// The live dashboard over a running session.
pub async fn live(
    header: Header,
    recorder: Recorder,
    profile: Profile,
    events: UnboundedReceiver<Stamped>,
    control: UnboundedSender<Control>,
    ui: &UiOptions,
) -> Result<Outcome> {
    let mut app = new_app(SessionState::new(header), ui, profile, Mode::Live)?;
    app.recording = Some(recorder.path().to_path_buf());
    let mut source = Source::Live {
        events,
        run: LiveRun::new(recorder),
        control,
        over: false,
    };
    let guard = event_loop(&mut app, &mut source, ui.fps).await?;
    let Source::Live { run, .. } = source else {
        unreachable!("a live source stays live")
    };
    let end = run.finish(&app.session, &app.profile);
    drop(guard);
    print_quietly(&end.report());
    end.outcome()
}

/// Replays a recording (and with `follow`, keeps reading what is appended: `watch`).
pub async fn replay(
    path: &Path,
    rec: Recording,
    speed: f64,
    profile: Profile,
    ui: &UiOptions,
    follow: Option<Follower>,
) -> Result<()> {
    let mode = if follow.is_some() {
        Mode::Watch
    } else {
        Mode::Replay
    };
    let mut app = new_app(SessionState::new(rec.header.clone()), ui, profile, mode)?;
    app.speed = speed;
    app.recording = Some(path.to_path_buf());
    if rec.truncated_tail {
        app.view.message = Some("the recording's last line was incomplete and was skipped".into());
    }
    let mut source = match follow {
        Some(follower) => Source::Watch {
            follower,
            pending: rec.events.into(),
            next_poll: Instant::now(),
        },
        None => Source::Replay {
            header: Box::new(rec.header),
            events: rec.events,
            next: 0,
            clock: Clock {
                speed,
                base: 0.0,
                start: Instant::now(),
            },
        },
    };
    drop(event_loop(&mut app, &mut source, ui.fps).await?);
    Ok(())
}

/// Names of the themes, for `moescope themes`.
pub fn list_themes() -> Vec<(String, String)> {
    theme::list()
}

/// One frame on ratatui's TestBackend, cells and styles (what the snapshot tests inspect).
pub fn render_to_buffer(app: &mut App, width: u16, height: u16) -> ratatui::buffer::Buffer {
    let backend = ratatui::backend::TestBackend::new(width, height);
    let mut term = ratatui::Terminal::new(backend).expect("test backend");
    term.draw(|f| app.render(f)).expect("draw");
    term.backend().buffer().clone()
}

/// Renders one frame of an app into a string of the given size (for captures and tests).
pub fn render_to_string(app: &mut App, width: u16, height: u16) -> String {
    let buf = render_to_buffer(app, width, height);
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
