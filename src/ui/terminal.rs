//! Terminal setup and teardown. The guard restores the terminal on every way out — normal
//! return, error, or panic (the panic hook restores it before the message is printed).

use std::io::{Stdout, stdout};

use crossterm::execute;
use crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;

pub type Term = Terminal<CrosstermBackend<Stdout>>;

pub struct Guard {
    pub term: Term,
}

static ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Restores the terminal if the dashboard had set it up (an error path in `main`).
pub fn restore_if_active() {
    if ACTIVE.load(std::sync::atomic::Ordering::SeqCst) {
        restore();
    }
}

pub fn restore() {
    ACTIVE.store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = disable_raw_mode();
    let _ = execute!(
        stdout(),
        crossterm::event::DisableBracketedPaste,
        crossterm::event::DisableMouseCapture,
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

pub fn init() -> std::io::Result<Guard> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        hook(info);
    }));
    enable_raw_mode()?;
    ACTIVE.store(true, std::sync::atomic::Ordering::SeqCst);
    // Bracketed paste: a pasted prompt arrives as one piece, not as keys.
    execute!(
        stdout(),
        EnterAlternateScreen,
        crossterm::cursor::Hide,
        crossterm::event::EnableBracketedPaste,
        crossterm::event::EnableMouseCapture
    )?;
    let term = Terminal::new(CrosstermBackend::new(stdout()))?;
    Ok(Guard { term })
}

impl Drop for Guard {
    fn drop(&mut self) {
        restore();
    }
}
