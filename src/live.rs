//! What both front ends of a live run — the dashboard and headless — do with it: record each
//! event as it is applied, stop on a signal as on `q`, and at the end write the recording's
//! summary, before anything touches the terminal. One implementation, so the two cannot drift.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::report;
use crate::session::event::Stamped;
use crate::session::export::{self, Summary};
use crate::session::record::{Recorder, summary_path};
use crate::session::state::SessionState;
use crate::session::verdict::Profile;

/// A run's recording as it is written.
pub struct LiveRun {
    recorder: Recorder,
    /// The first failed write: recording stopped there.
    write_error: Option<String>,
}

/// What a finished run leaves: its summary and the files written.
pub struct RunEnd {
    pub summary: Summary,
    pub recording: PathBuf,
    pub summary_path: PathBuf,
    pub write_error: Option<String>,
}

impl RunEnd {
    /// The final table and verdict, and where the files are.
    pub fn report(&self) -> String {
        format!(
            "{}recording: {}\nsummary:   {}\n",
            report::table::final_report(&self.summary),
            self.recording.display(),
            self.summary_path.display()
        )
    }
}

impl LiveRun {
    pub fn new(recorder: Recorder) -> Self {
        LiveRun {
            recorder,
            write_error: None,
        }
    }

    pub fn recording(&self) -> &Path {
        self.recorder.path()
    }

    pub fn write_error(&self) -> Option<&str> {
        self.write_error.as_deref()
    }

    /// Applies `ev` to `state` and appends it to the recording. The first write that fails
    /// returns its message: the caller stops the run (the recording holds everything before).
    pub fn record(&mut self, state: &mut SessionState, ev: &Stamped) -> Option<String> {
        state.apply(ev);
        if self.write_error.is_some() {
            return None;
        }
        let e = self.recorder.append(ev).err()?;
        let msg = format!("writing {}: {e}", self.recorder.path().display());
        self.write_error = Some(msg.clone());
        Some(msg)
    }

    /// Closes the recording and writes its summary beside it (atomically).
    pub fn finish(self, state: &SessionState, profile: &Profile) -> Result<RunEnd> {
        let recording = self.recorder.path().to_path_buf();
        self.recorder.close()?;
        let summary = export::summarize(state, profile);
        let summary_path = write_summary(&recording, &summary)?;
        Ok(RunEnd {
            summary,
            recording,
            summary_path,
            write_error: self.write_error,
        })
    }
}

/// Writes `summary` next to `recording` (`.summary.json`); returns its path.
pub fn write_summary(recording: &Path, summary: &Summary) -> std::io::Result<PathBuf> {
    let path = summary_path(recording);
    crate::util::write_atomic(&path, &report::json::summary(summary))?;
    Ok(path)
}

/// Why a run was asked to stop from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Interrupted,
    /// The terminal went away (a dropped SSH session): nothing may be printed any more.
    HungUp,
    Terminated,
}

impl Stop {
    pub fn name(self) -> &'static str {
        match self {
            Stop::Interrupted => "interrupted",
            Stop::HungUp => "hung up",
            Stop::Terminated => "terminated",
        }
    }
}

/// Listeners for SIGINT, SIGHUP and SIGTERM for the whole run, made before the first event:
/// a listener made per loop turn exists only while the loop waits, and a signal landing while
/// an event is being recorded would be lost (the handler is installed, so nothing else would
/// stop the run). A dropped SSH session (SIGHUP) and `kill` (SIGTERM) stop a run as Ctrl-C and
/// `q` do, so the recording ends with its summary instead of a torn line.
pub struct StopSignals {
    interrupt: Signal,
    hangup: Signal,
    terminate: Signal,
}

impl StopSignals {
    pub fn new() -> std::io::Result<Self> {
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next stop signal. After a hang-up, stdout and stderr point at /dev/null.
    pub async fn next(&mut self) -> Stop {
        let why = tokio::select! {
            _ = self.interrupt.recv() => Stop::Interrupted,
            _ = self.hangup.recv() => Stop::HungUp,
            _ = self.terminate.recv() => Stop::Terminated,
        };
        if why == Stop::HungUp {
            silence_stdio();
        }
        why
    }
}

/// Points stdout and stderr at /dev/null. Why: after a hang-up the terminal is gone, and
/// `print!`/`eprintln!` (ours, and ratatui's when it restores the cursor) panic on a failed
/// write — which would cost the run its summary.
pub fn silence_stdio() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto the standard descriptors; `null` stays open until both are done.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
}

/// Prints without panicking: with the terminal gone a plain `print!` would, and the files are
/// what counts then.
pub fn print_quietly(text: &str) {
    let _ = write!(std::io::stdout(), "{text}");
}

/// As [`print_quietly`], on stderr.
pub fn print_error_quietly(text: &str) {
    let _ = write!(std::io::stderr(), "{text}");
}
