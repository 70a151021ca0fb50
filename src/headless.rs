//! Runs without a dashboard (`--no-tui`, or stdout not a terminal): one progress line per prompt
//! per backend, a final side-by-side table with the verdict, and the paths of the files written.

use anyhow::Result;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::live::{LiveRun, StopSignals};
use crate::session::event::{SessionEvent, Stamped};
use crate::session::record::{Header, Recorder};
use crate::session::state::SessionState;
use crate::session::verdict::{Outcome, Profile};
use crate::util::fmt_bytes;
use crate::worker::scheduler::{Control, Stop};

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
            ..
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
        SessionEvent::ReferenceLoaded {
            implementation,
            load_s,
        } => Some(format!(
            "[{:>7.2}s] reference {implementation} loaded in {load_s:.2} s",
            ev.t
        )),
        SessionEvent::ReferencePrompt {
            prompt,
            token_ids,
            decode_tok_s,
            agreement,
            ..
        } => Some(format!(
            "[{:>7.2}s] reference prompt {}/{n}: {} tokens, decode {} tok/s{}",
            ev.t,
            prompt + 1,
            token_ids.len(),
            decode_tok_s.map_or("–".into(), |v| format!("{v:.1}")),
            agreement.as_ref().map_or(String::new(), |a| format!(
                "; native against it: top-1 {:.1} %, mean KL {:.2e}, max KL {:.2e}",
                a.top1_agreement * 100.0,
                a.mean_kl,
                a.max_kl
            ))
        )),
        SessionEvent::ReferenceUnavailable { reason } => Some(format!(
            "[{:>7.2}s] reference did not run: {reason} (the run goes on without it)",
            ev.t
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

/// Runs headless: prints a progress line per event that deserves one, stops on a signal as the
/// dashboard's `q` does, and ends with the final table and the files written.
pub async fn consume(
    header: Header,
    recorder: Recorder,
    profile: Profile,
    mut events: UnboundedReceiver<Stamped>,
    control: UnboundedSender<Control>,
) -> Result<Outcome> {
    let mut state = SessionState::new(header);
    let mut run = LiveRun::new(recorder);
    println!("recording to {}", run.recording().display());
    let mut quit_sent = false;
    let mut signals = StopSignals::new()?;
    loop {
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                if let Some(e) = run.record(&mut state, &ev) {
                    eprintln!("error: {e}; stopping the run");
                    let _ = control.send(Control::Quit(Stop::WriteFailed));
                }
                if let Some(line) = progress_line(&state, &ev) {
                    println!("{line}");
                }
            }
            why = signals.next(), if !quit_sent => {
                eprintln!(
                    "{}: stopping the workers (the recording stays complete up to here)",
                    why.reason()
                );
                quit_sent = true;
                let _ = control.send(Control::Quit(why));
            }
        }
    }
    let end = run.finish(&state, &profile);
    print!("{}", end.report());
    end.outcome()
}
