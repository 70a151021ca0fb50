//! Runs without a dashboard (`--no-tui`, or stdout not a terminal): one progress line per prompt
//! per backend, a final side-by-side table with the verdict, and the paths of the files written.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::session::event::{SessionEvent, Stamped};
use crate::session::export::{self, Summary};
use crate::session::record::{Header, Recorder};
use crate::session::state::SessionState;
use crate::session::verdict::{Outcome, Profile};
use crate::util::fmt_bytes;
use crate::worker::scheduler::Control;

/// The progress line for an event, if it deserves one.
pub fn progress_line(state: &SessionState, ev: &Stamped) -> Option<String> {
    let n = state.num_prompts();
    match &ev.event {
        SessionEvent::Loaded {
            backend,
            load_s,
            resident,
            degraded,
            describe,
        } => Some(format!(
            "[{:>7.2}s] {backend:<9} loaded in {load_s:.2} s: {describe}; weights {} non-expert + {} experts{}",
            ev.t,
            fmt_bytes(resident.non_expert),
            fmt_bytes(resident.experts),
            if *degraded {
                " — DEGRADED (experts masked)"
            } else {
                ""
            }
        )),
        SessionEvent::PromptDone {
            backend,
            prompt,
            finish,
            token_ids,
            text,
            ttft_s,
            decode_tok_s,
            ..
        } => {
            let p = &state.header.prompts.prompts[*prompt];
            let short: String = text.trim().replace('\n', " ").chars().take(60).collect();
            Some(format!(
                "[{:>7.2}s] {backend:<9} prompt {}/{n} {:<9} {:>3} tokens ({:?}) TTFT {:.3} s, decode {:.1} tok/s | {short}",
                ev.t,
                prompt + 1,
                p.category,
                token_ids.len(),
                finish,
                ttft_s,
                decode_tok_s
            ))
        }
        SessionEvent::Agreement { prompt, stats } => Some(format!(
            "[{:>7.2}s] agreement prompt {}/{n}: top-1 {:.1} %, mean KL {:.2e}, max KL {:.2e}{}",
            ev.t,
            prompt + 1,
            stats.top1_agreement * 100.0,
            stats.mean_kl,
            stats.max_kl,
            if stats.exact {
                ""
            } else {
                " (top-256 support: lower bound)"
            }
        )),
        SessionEvent::Perplexity {
            backend,
            perplexity,
            tokens,
        } => Some(format!(
            "[{:>7.2}s] {backend:<9} perplexity {perplexity:.3} on {tokens} reference tokens",
            ev.t
        )),
        SessionEvent::Failed { backend, reason } => {
            Some(format!("[{:>7.2}s] {backend:<9} FAILED: {reason}", ev.t))
        }
        SessionEvent::Warning { backend, message } => Some(format!(
            "[{:>7.2}s] warning{}: {message}",
            ev.t,
            backend.map(|b| format!(" ({b})")).unwrap_or_default()
        )),
        SessionEvent::Finished { reason } => {
            Some(format!("[{:>7.2}s] run finished: {reason}", ev.t))
        }
        _ => None,
    }
}

/// Where the summary of a recording goes: next to it, `.summary.json`.
pub fn summary_path(recording: &Path) -> PathBuf {
    let stem = recording
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "session".into());
    recording.with_file_name(format!("{stem}.summary.json"))
}

/// Writes a file atomically (temp + rename), so an existing file is never half-replaced.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

pub fn final_report(summary: &Summary) -> String {
    let mut o = String::new();
    o.push('\n');
    o.push_str(&export::table(summary));
    o.push('\n');
    for l in summary.verdict.render_lines() {
        o.push_str(&l);
        o.push('\n');
    }
    o
}

pub async fn consume(
    header: Header,
    mut recorder: Recorder,
    profile: Profile,
    mut events: UnboundedReceiver<Stamped>,
    control: UnboundedSender<Control>,
) -> Result<Outcome> {
    let mut state = SessionState::new(header);
    println!("recording to {}", recorder.path().display());
    let mut quit_sent = false;
    // Listeners for the whole run, made before the first event: a `ctrl_c()` future made per
    // loop turn exists only while the loop waits, and a Ctrl-C landing while an event is being
    // recorded would be lost (the handler is installed, so nothing else would stop the run).
    // A dropped SSH session (SIGHUP) and `kill` (SIGTERM) stop the run the same way, so the
    // recording ends with its summary instead of a torn line.
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                state.apply(&ev);
                if let Err(e) = recorder.append(&ev) {
                    eprintln!("error: writing {}: {e}; stopping the run", recorder.path().display());
                    let _ = control.send(Control::Quit);
                }
                if let Some(line) = progress_line(&state, &ev) {
                    println!("{line}");
                }
            }
            why = async {
                tokio::select! {
                    _ = interrupt.recv() => "interrupted",
                    _ = hangup.recv() => "hung up",
                    _ = terminate.recv() => "terminated",
                }
            }, if !quit_sent => {
                if why == "hung up" {
                    silence_stdio();
                }
                eprintln!("{why}: stopping the workers (the recording stays complete up to here)");
                quit_sent = true;
                let _ = control.send(Control::Quit);
            }
        }
    }
    let rec_path = recorder.path().to_path_buf();
    recorder.close()?;
    let summary = export::summarize(&state, &profile);
    let spath = summary_path(&rec_path);
    write_atomic(&spath, &(serde_json::to_string_pretty(&summary)? + "\n"))?;
    print!("{}", final_report(&summary));
    println!("recording: {}", rec_path.display());
    println!("summary:   {}", spath.display());
    Ok(summary.verdict.outcome)
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
