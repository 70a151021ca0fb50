//! What both front ends of a live run — the dashboard and headless — do with it: record each
//! event as it is applied, stop on a signal as on `q`, and at the end write the recording's
//! summary, before anything touches the terminal. One implementation, so the two cannot drift.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::report;
use crate::session::event::{SessionEvent, Stamped};
use crate::session::export::{self, Summary};
use crate::session::record::{Recorder, summary_path};
use crate::session::state::SessionState;
use crate::session::verdict::{Outcome, Profile};
use crate::worker::scheduler::Stop;

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
    /// None when the summary could not be written.
    pub summary_path: Option<PathBuf>,
    pub write_error: Option<String>,
}

impl RunEnd {
    /// The verdict — or, when the recording could not be written, that failure: the run's
    /// exit code must say that its record is incomplete.
    pub fn outcome(&self) -> Result<Outcome> {
        match &self.write_error {
            Some(e) => Err(anyhow::anyhow!("{e}")),
            None => Ok(self.summary.verdict.outcome),
        }
    }

    /// The final table and verdict, and where the files are.
    pub fn report(&self) -> String {
        format!(
            "{}recording: {}\nsummary:   {}\n",
            report::table::final_report(&self.summary),
            self.recording.display(),
            self.summary_path
                .as_ref()
                .map_or_else(|| "not written".into(), |p| p.display().to_string())
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
        let mut written = self.recorder.append(ev);
        // Each prompt's end is made durable (and the file checked to be still there).
        if written.is_ok() && matches!(ev.event, SessionEvent::PromptDone { .. }) {
            written = self.recorder.sync();
        }
        let e = written.err()?;
        let msg = format!(
            "writing {}: {e}; recording stopped (everything before stays readable)",
            self.recorder.path().display()
        );
        self.write_error = Some(msg.clone());
        Some(msg)
    }

    /// Closes the recording (fsync) and writes its summary beside it (atomically). A failure
    /// of either is kept in the result, not raised: the summary is still printed, and the
    /// caller's exit code says the record is incomplete.
    pub fn finish(self, state: &SessionState, profile: &Profile) -> RunEnd {
        let recording = self.recorder.path().to_path_buf();
        let mut errors: Vec<String> = self.write_error.into_iter().collect();
        if let Err(e) = self.recorder.close() {
            errors.push(format!("closing {}: {e}", recording.display()));
        }
        let summary = export::summarize(state, profile);
        let summary_path = match write_summary(&recording, &summary) {
            Ok(p) => Some(p),
            Err(e) => {
                errors.push(format!(
                    "writing {}: {e}",
                    summary_path(&recording).display()
                ));
                None
            }
        };
        RunEnd {
            summary,
            recording,
            summary_path,
            write_error: (!errors.is_empty()).then(|| errors.join("; ")),
        }
    }
}

/// Writes `summary` next to `recording` (`.summary.json`); returns its path.
/// Where the dashboard's `e` writes the HTML report: `<recording>.report.html`.
pub fn report_path(recording: &Path) -> PathBuf {
    let mut s = recording.as_os_str().to_owned();
    s.push(".report.html");
    PathBuf::from(s)
}

pub fn write_summary(recording: &Path, summary: &Summary) -> std::io::Result<PathBuf> {
    let path = summary_path(recording);
    crate::util::write_atomic(&path, &report::json::summary(summary))?;
    Ok(path)
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

    /// The next stop signal. After a hang-up (the terminal is gone), stdout and stderr point
    /// at /dev/null.
    pub async fn next(&mut self) -> Stop {
        let why = tokio::select! {
            _ = self.interrupt.recv() => Stop::Sigint,
            _ = self.hangup.recv() => Stop::Sighup,
            _ = self.terminate.recv() => Stop::Sigterm,
        };
        if why == Stop::Sighup {
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
