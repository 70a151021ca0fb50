//! The dashboard's state: the session (from events) plus what the viewer chose to look at.
//! `update(Action)` changes only the view and returns what should happen to the run; `render`
//! draws everything from state alone, so a snapshot test of any moment is deterministic.

use std::path::PathBuf;

use ratatui::Frame;
use ratatui::layout::{Constraint, Direction, Layout, Rect};

use super::panels;
use super::theme::{BUILTIN, Depth, Theme};
use crate::session::event::Backend;
use crate::session::state::SessionState;
use crate::session::verdict::{Profile, Verdict, judge};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Live,
    Replay,
    Watch,
}

/// The panels `tab` cycles through (and `z` zooms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Panel {
    Tokens(Backend),
    Memory(Backend),
    Gauges(Backend),
    Heatmap(Backend),
    /// The reference implementation's column (`--reference-impl`), where there is room.
    Reference,
}

impl Panel {
    pub const ORDER: [Panel; 8] = [
        Panel::Tokens(Backend::Native),
        Panel::Tokens(Backend::Selective),
        Panel::Memory(Backend::Native),
        Panel::Memory(Backend::Selective),
        Panel::Gauges(Backend::Native),
        Panel::Gauges(Backend::Selective),
        Panel::Heatmap(Backend::Native),
        Panel::Heatmap(Backend::Selective),
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    NextPrompt,
    PrevPrompt,
    TogglePause,
    Step,
    Rerun,
    Export,
    CycleTheme,
    FocusNext,
    FocusPrev,
    ToggleZoom,
    ToggleHelp,
    ToggleVerdict,
    ScrollUp,
    ScrollDown,
    Quit,
    /// Step mode on/off (`s`).
    ToggleStepMode,
    /// Go on after a step-mode wait (Enter; `n` too while waiting).
    Continue,
    /// Open the line to ask a prompt of one's own (`a`).
    Ask,
    /// Open / close the prompt list (`l`).
    ToggleList,
    /// Open the token inspector (`i`).
    Inspect,
}

/// What the runner must do after an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Control(crate::worker::scheduler::Control),
    /// Replay/watch: pause/resume playback, advance one token, restart from the start.
    PlaybackToggle,
    PlaybackStep,
    PlaybackRestart,
    /// Replay: jump to where this prompt starts.
    PlaybackSeek(usize),
    Export,
    Quit,
}

#[derive(Debug, Clone)]
pub struct ViewState {
    /// Prompt shown; None follows the run's current prompt.
    pub prompt: Option<usize>,
    pub focus: usize,
    pub zoom: bool,
    pub help: bool,
    /// None: the final screen appears when the run finishes; Some: the viewer's choice.
    pub verdict: Option<bool>,
    /// Lines scrolled up from the bottom, per backend's token panel; then lines scrolled down
    /// in the reference column.
    pub scroll: [u16; 3],
    pub message: Option<String>,
    pub theme_index: usize,
    /// The prompt list is open, with this prompt selected.
    pub list: Option<usize>,
    /// Where the last frame drew each panel, and the prompt list's rows (for the mouse).
    pub hit: Vec<(Rect, Panel)>,
    pub list_rows: Option<(Rect, usize)>,
    /// The last frame had room for the reference column (it joins the focus order then).
    pub reference_shown: bool,
    /// The token inspector is open on this token of the prompt shown.
    pub inspect: Option<usize>,
    /// Lines the inspector's text is scrolled down (↑/↓ while it is open).
    pub inspect_scroll: u16,
}

pub struct App {
    pub session: SessionState,
    pub view: ViewState,
    /// The "ask your own prompt" line.
    pub ask: super::ask::AskLine,
    pub theme: Theme,
    pub depth: Depth,
    pub ascii: bool,
    pub readonly: bool,
    pub mode: Mode,
    pub profile: Profile,
    /// Playback speed shown in replay mode.
    pub speed: f64,
    pub playback_paused: bool,
    pub recording: Option<PathBuf>,
    verdict_cache: Option<(u64, Verdict)>,
    study_cache: Option<(u64, Option<crate::cache::study::Study>)>,
}

impl App {
    pub fn new(
        session: SessionState,
        theme: Theme,
        depth: Depth,
        profile: Profile,
        mode: Mode,
    ) -> Self {
        let theme_index = BUILTIN
            .iter()
            .position(|(n, _)| *n == theme.name)
            .unwrap_or(0);
        App {
            session,
            ask: Default::default(),
            view: ViewState {
                prompt: None,
                focus: 0,
                zoom: false,
                help: false,
                verdict: None,
                scroll: [0, 0, 0],
                message: None,
                theme_index,
                list: None,
                hit: Vec::new(),
                reference_shown: false,
                inspect: None,
                inspect_scroll: 0,
                list_rows: None,
            },
            theme,
            depth,
            ascii: false,
            readonly: false,
            mode,
            profile,
            speed: 1.0,
            playback_paused: false,
            recording: None,
            verdict_cache: None,
            study_cache: None,
        }
    }

    pub fn prompt(&self) -> usize {
        self.view
            .prompt
            .unwrap_or(self.session.current_prompt)
            .min(self.session.num_prompts().saturating_sub(1))
    }

    /// The panels Tab visits, in order: the reference column's last, where it is drawn.
    pub fn focus_order(&self) -> Vec<Panel> {
        let mut v = Panel::ORDER.to_vec();
        if self.view.reference_shown {
            v.push(Panel::Reference);
        }
        v
    }

    pub fn focused(&self) -> Panel {
        let order = self.focus_order();
        order[self.view.focus % order.len()]
    }

    /// Whether a reference implementation was asked for (its column is drawn where it fits).
    pub fn has_reference(&self) -> bool {
        self.session.header.reference.is_some() || self.session.reference.is_some()
    }

    pub fn show_verdict(&self) -> bool {
        self.view.verdict.unwrap_or(self.session.finished.is_some())
    }

    /// The verdict, recomputed only when new events arrived.
    pub fn verdict(&mut self) -> &Verdict {
        let n = self.session.events;
        if self.verdict_cache.as_ref().is_none_or(|(k, _)| *k != n) {
            self.verdict_cache = Some((n, judge(&self.session, &self.profile)));
        }
        &self.verdict_cache.as_ref().expect("just set").1
    }

    /// The cache study of the run, recomputed only when new events arrived.
    pub fn study(&mut self) -> Option<&crate::cache::study::Study> {
        let n = self.session.events;
        if self.study_cache.as_ref().is_none_or(|(k, _)| *k != n) {
            self.study_cache = Some((n, crate::session::study::run_study(&self.session)));
        }
        self.study_cache.as_ref().and_then(|(_, s)| s.as_ref())
    }

    /// Scrolls a text panel one line: token panels count up from their newest line, the
    /// reference column down from its top; other panels do not scroll.
    fn scroll(&mut self, panel: Panel, up: bool) {
        let (s, towards_top) = match panel {
            Panel::Tokens(b) => (&mut self.view.scroll[b.index()], up),
            Panel::Reference => (&mut self.view.scroll[2], !up),
            _ => return,
        };
        *s = if towards_top {
            s.saturating_add(1)
        } else {
            s.saturating_sub(1)
        };
    }

    /// Whether a key may change the run (false in readonly mode and in replays).
    fn may_drive(&self) -> bool {
        self.mode == Mode::Live && !self.readonly
    }

    pub fn update(&mut self, a: Action) -> Option<Effect> {
        use crate::worker::scheduler::Control;
        let n = self.session.num_prompts();
        match a {
            Action::Quit => return Some(Effect::Quit),
            Action::ToggleHelp => self.view.help = !self.view.help,
            Action::ToggleZoom => self.view.zoom = !self.view.zoom,
            Action::ToggleVerdict => self.view.verdict = Some(!self.show_verdict()),
            Action::FocusNext => {
                let n = self.focus_order().len();
                self.view.focus = (self.view.focus % n + 1) % n;
            }
            Action::FocusPrev => {
                let n = self.focus_order().len();
                self.view.focus = (self.view.focus % n + n - 1) % n;
            }
            Action::ScrollUp | Action::ScrollDown => {
                let panel = match self.focused() {
                    p @ (Panel::Tokens(_) | Panel::Reference) => p,
                    _ => Panel::Tokens(Backend::Native),
                };
                self.scroll(panel, a == Action::ScrollUp);
            }
            Action::CycleTheme => {
                self.view.theme_index = (self.view.theme_index + 1) % BUILTIN.len();
                let (name, _) = BUILTIN[self.view.theme_index];
                if let Ok(t) = Theme::load(name, self.depth) {
                    self.theme = t;
                    self.view.message = Some(format!("theme: {name}"));
                }
            }
            Action::NextPrompt | Action::Continue
                if self.may_drive() && self.session.waiting.is_some() =>
            {
                self.view.scroll = [0, 0, 0];
                return Some(Effect::Control(Control::Continue));
            }
            Action::Continue => {}
            Action::Inspect => {
                // Where the outputs part if they do, else native's newest token.
                let p = self.prompt();
                let n = self.session.backends[0]
                    .runs
                    .get(p)
                    .map_or(0, |r| r.tokens.len());
                if n == 0 {
                    self.view.message = Some("no token to inspect yet".into());
                } else {
                    let div = crate::ui::panels::tokens::first_divergence(self, p);
                    self.view.inspect = Some(div.unwrap_or(n - 1).min(n - 1));
                }
            }
            Action::ToggleList => {
                self.view.list = match self.view.list {
                    Some(_) => None,
                    None => Some(self.prompt()),
                };
            }
            Action::Ask => {
                if self.may_drive() && self.session.finished.is_none() {
                    self.ask.open();
                } else if self.may_drive() {
                    self.view.message = Some("the run is over: nothing more runs".into());
                } else {
                    self.view.message = Some(match self.mode {
                        Mode::Live => self.readonly_message(),
                        _ => "asking needs a live run".into(),
                    });
                }
            }
            Action::ToggleStepMode => {
                if self.may_drive() {
                    return Some(Effect::Control(Control::ToggleStepMode));
                }
                self.view.message = Some(self.readonly_message());
            }
            Action::NextPrompt | Action::PrevPrompt => {
                let cur = self.prompt();
                let next = if a == Action::NextPrompt {
                    (cur + 1).min(n.saturating_sub(1))
                } else {
                    cur.saturating_sub(1)
                };
                self.view.scroll = [0, 0, 0];
                self.view.verdict = Some(false);
                if self.may_drive() {
                    self.view.prompt = None;
                    return Some(Effect::Control(if a == Action::NextPrompt {
                        Control::Next
                    } else {
                        Control::Prev
                    }));
                }
                self.view.prompt = Some(next);
            }
            Action::TogglePause => {
                if self.may_drive() {
                    return Some(Effect::Control(Control::TogglePause));
                }
                if self.mode == Mode::Replay {
                    return Some(Effect::PlaybackToggle);
                }
                self.view.message = Some(self.readonly_message());
            }
            Action::Step => {
                if self.may_drive() {
                    return Some(Effect::Control(Control::Step));
                }
                if self.mode == Mode::Replay {
                    return Some(Effect::PlaybackStep);
                }
                self.view.message = Some(self.readonly_message());
            }
            Action::Rerun => {
                if self.may_drive() {
                    self.view.scroll = [0, 0, 0];
                    return Some(Effect::Control(Control::Rerun));
                }
                if self.mode == Mode::Replay {
                    return Some(Effect::PlaybackRestart);
                }
                self.view.message = Some(self.readonly_message());
            }
            Action::Export => return Some(Effect::Export),
        }
        None
    }

    /// A key while the inspector is open: ←/→ (h/l) move a token, Home/End jump, ↑/↓ (k/j)
    /// scroll its text, Esc, `i` or `q` close; `n`/`p` change prompt and start on its first
    /// token.
    pub fn inspect_key(&mut self, k: crossterm::event::KeyEvent) {
        use crossterm::event::KeyCode;
        let Some(i) = self.view.inspect else { return };
        let n = self.session.backends[0]
            .runs
            .get(self.prompt())
            .map_or(0, |r| r.tokens.len());
        let last = n.saturating_sub(1);
        self.view.inspect = match k.code {
            KeyCode::Left | KeyCode::Char('h') => Some(i.saturating_sub(1)),
            KeyCode::Right | KeyCode::Char('l') => Some((i + 1).min(last)),
            KeyCode::Home => Some(0),
            KeyCode::End => Some(last),
            KeyCode::Char('n') | KeyCode::Char('p') => {
                let p = self.prompt();
                let np = self.session.num_prompts();
                let to = if k.code == KeyCode::Char('n') {
                    (p + 1).min(np.saturating_sub(1))
                } else {
                    p.saturating_sub(1)
                };
                self.view.prompt = Some(to);
                self.view.scroll = [0, 0, 0];
                Some(0)
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.view.inspect_scroll = self.view.inspect_scroll.saturating_add(1);
                Some(i.min(last))
            }
            KeyCode::Up | KeyCode::Char('k') => {
                self.view.inspect_scroll = self.view.inspect_scroll.saturating_sub(1);
                Some(i.min(last))
            }
            KeyCode::Esc | KeyCode::Char('i') | KeyCode::Char('q') => None,
            _ => Some(i.min(last)),
        };
    }

    /// A key while the prompt list is open: ↑/↓ move, Enter jumps (live: runs it next, unless
    /// read-only; replay: seeks), Esc or `l` closes.
    pub fn list_key(&mut self, k: crossterm::event::KeyEvent) -> Option<Effect> {
        use crate::worker::scheduler::Control;
        use crossterm::event::KeyCode;
        let sel = self.view.list?;
        let n = self.session.num_prompts();
        match k.code {
            KeyCode::Up | KeyCode::Char('k') => self.view.list = Some(sel.saturating_sub(1)),
            KeyCode::Down | KeyCode::Char('j') => {
                self.view.list = Some((sel + 1).min(n.saturating_sub(1)))
            }
            KeyCode::Esc | KeyCode::Char('l') | KeyCode::Char('q') => self.view.list = None,
            KeyCode::Enter => {
                self.view.list = None;
                self.view.scroll = [0, 0, 0];
                return match self.mode {
                    Mode::Live if self.may_drive() && self.session.finished.is_none() => {
                        self.view.prompt = None;
                        Some(Effect::Control(Control::Goto(sel)))
                    }
                    Mode::Replay => Some(Effect::PlaybackSeek(sel)),
                    _ => {
                        // Read-only or watching: only the view moves.
                        self.view.prompt = Some(sel);
                        self.view.verdict = Some(false);
                        None
                    }
                };
            }
            _ => {}
        }
        None
    }

    /// A mouse event on the last frame: a click focuses the panel under it (or, on the prompt
    /// list, selects that prompt — a second click on it jumps there, as Enter does); the wheel
    /// scrolls the token panel under the pointer.
    pub fn mouse(&mut self, m: crossterm::event::MouseEvent) -> Option<Effect> {
        use crossterm::event::{MouseButton, MouseEventKind};
        let at = |r: &Rect| {
            m.column >= r.x && m.column < r.x + r.width && m.row >= r.y && m.row < r.y + r.height
        };
        if let (Some(sel), Some((rows, first))) = (self.view.list, self.view.list_rows) {
            if let MouseEventKind::Down(MouseButton::Left) = m.kind
                && at(&rows)
            {
                let i = first + (m.row - rows.y) as usize;
                if i < self.session.num_prompts() {
                    if i == sel {
                        let enter = crossterm::event::KeyEvent::new(
                            crossterm::event::KeyCode::Enter,
                            crossterm::event::KeyModifiers::NONE,
                        );
                        return self.list_key(enter);
                    }
                    self.view.list = Some(i);
                }
            }
            return None;
        }
        let panel = self.view.hit.iter().find(|(r, _)| at(r)).map(|(_, p)| *p)?;
        match m.kind {
            MouseEventKind::Down(MouseButton::Left) => {
                if let Some(k) = self.focus_order().iter().position(|p| *p == panel) {
                    self.view.focus = k;
                }
            }
            MouseEventKind::ScrollUp | MouseEventKind::ScrollDown => {
                self.scroll(panel, m.kind == MouseEventKind::ScrollUp);
            }
            _ => {}
        }
        None
    }

    fn readonly_message(&self) -> String {
        match self.mode {
            Mode::Live => "read-only session: keys that change the run are off".into(),
            Mode::Watch => "watching a run in progress: it cannot be driven from here".into(),
            Mode::Replay => String::new(),
        }
    }

    pub fn render(&mut self, f: &mut Frame) {
        let area = f.area();
        self.view.hit.clear();
        self.view.list_rows = None;
        // A warning (a run past the trained context, contended timings, a worker's stray line)
        // gets a line of its own above the keys while the screen has room for it.
        let footer = if !self.session.warnings.is_empty() && area.height >= 16 {
            2
        } else {
            1
        };
        let rows = Layout::default()
            .direction(Direction::Vertical)
            .constraints([
                Constraint::Length(2),
                Constraint::Min(3),
                Constraint::Length(footer),
            ])
            .split(area);
        panels::header::render(f, rows[0], self);
        if self.show_verdict() {
            let v = self.verdict().clone();
            let s = self.study().cloned();
            panels::verdict::render(f, rows[1], self, &v, s.as_ref());
        } else if self.view.zoom {
            self.render_panel(f, rows[1], self.focused());
        } else {
            self.render_columns(f, rows[1]);
        }
        panels::footer::render(f, rows[2], self);
        // Step mode: the prompt just done, over the columns, until the user goes on.
        if let Some(p) = self.session.waiting
            && !self.show_verdict()
        {
            panels::card::render(f, rows[1], self, p);
        }
        if let Some(i) = self.view.inspect
            && !self.show_verdict()
        {
            panels::inspect::render(f, rows[1], self, i);
        }
        if let Some(sel) = self.view.list {
            self.view.list_rows = Some(panels::prompts::render(f, rows[1], self, sel));
        }
        if self.view.help {
            panels::help::render(f, area, self);
        }
        if self.ascii {
            asciify(f.buffer_mut());
        }
    }

    fn render_columns(&mut self, f: &mut Frame, area: Rect) {
        // The reference gets a narrower third column where the two backends keep ~45 columns.
        self.view.reference_shown = self.has_reference() && area.width >= 120;
        let widths: &[Constraint] = if self.view.reference_shown {
            &[
                Constraint::Percentage(37),
                Constraint::Percentage(37),
                Constraint::Percentage(26),
            ]
        } else {
            &[Constraint::Percentage(50), Constraint::Percentage(50)]
        };
        let cols = Layout::default()
            .direction(Direction::Horizontal)
            .constraints(widths)
            .split(area);
        if self.view.reference_shown {
            self.render_panel(f, cols[2], Panel::Reference);
        }
        let compact = area.height < 30;
        for (i, b) in Backend::BOTH.iter().enumerate() {
            let h = cols[i].height;
            // Tokens take what is left after the fixed-size panels.
            let (mem, gauges, heat) = if compact {
                (h.saturating_sub(8).clamp(3, 5), 3, (h / 4).max(3))
            } else {
                (10, 5, (h / 4).clamp(6, 16))
            };
            let parts = Layout::default()
                .direction(Direction::Vertical)
                .constraints([
                    Constraint::Min(4),
                    Constraint::Length(mem),
                    Constraint::Length(gauges),
                    Constraint::Length(heat),
                ])
                .split(cols[i]);
            self.render_panel(f, parts[0], Panel::Tokens(*b));
            self.render_panel(f, parts[1], Panel::Memory(*b));
            self.render_panel(f, parts[2], Panel::Gauges(*b));
            self.render_panel(f, parts[3], Panel::Heatmap(*b));
        }
    }

    fn render_panel(&mut self, f: &mut Frame, area: Rect, p: Panel) {
        // Where each panel was drawn, for the mouse.
        self.view.hit.push((area, p));
        let focused = self.focused() == p;
        match p {
            Panel::Tokens(b) => panels::tokens::render(f, area, self, b, focused),
            Panel::Memory(b) => panels::memory::render(f, area, self, b, focused),
            Panel::Gauges(b) => panels::gauges::render(f, area, self, b, focused),
            Panel::Heatmap(b) => panels::heatmap::render(f, area, self, b, focused),
            Panel::Reference => panels::reference::render(f, area, self, focused),
        }
    }
}

/// For terminals without Unicode: every cell becomes ASCII — box drawing, blocks, Braille and
/// typographic symbols get look-alikes, anything else a '?'.
pub fn asciify(buf: &mut ratatui::buffer::Buffer) {
    let area = buf.area;
    for y in area.top()..area.bottom() {
        for x in area.left()..area.right() {
            let cell = &mut buf[(x, y)];
            let sym = cell.symbol();
            if sym.is_ascii() {
                continue;
            }
            let c = sym.chars().next().unwrap_or(' ');
            let r = match c {
                '─' | '━' | '═' | '–' | '—' | '░' => '-',
                '│' | '┃' | '║' | '‖' => '|',
                '┌' | '┐' | '└' | '┘' | '├' | '┤' | '┬' | '┴' | '┼' | '╭' | '╮' | '╰' | '╯' => {
                    '+'
                }
                '█' | '▓' => '#',
                '▒' => '+',
                '·' | '•' | '…' => '.',
                '×' | '✗' => 'x',
                '✓' => 'v',
                '≥' | '→' | '⟶' => '>',
                '≤' | '←' => '<',
                '⟂' => '!',
                '\u{2800}'..='\u{28ff}' => {
                    if c == '\u{2800}' {
                        ' '
                    } else {
                        '.'
                    }
                }
                _ => '?',
            };
            cell.set_char(r);
        }
    }
}
