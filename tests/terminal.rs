//! The dashboard in a real terminal: the binary runs inside tmux, keys are sent, the screen is
//! captured, and we check what a person would see. Needs tmux (`.ci/run` installs it).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Workers paced (a few ms a token) so keys and signals land mid-run however fast the machine.
const PACED: &str =
    "MOESCOPE_TEST_NATIVE_TOKEN_DELAY_MS=5 MOESCOPE_TEST_SELECTIVE_TOKEN_DELAY_MS=5";

struct Tmux {
    name: String,
}

impl Tmux {
    /// A tmux session named `name` and this test process's id (several test runs on one
    /// machine must not share a session), `w` × `h`, running `cmd`.
    fn start(name: &str, w: u16, h: u16, cmd: &str) -> Self {
        let name = &format!("{name}-{}", std::process::id());
        assert!(
            Command::new("tmux").arg("-V").output().is_ok(),
            "tmux is needed for the real-terminal test (apt-get install tmux)"
        );
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", name])
            .output();
        let status = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                &w.to_string(),
                "-y",
                &h.to_string(),
            ])
            .arg(format!(
                "cd {} && TERM=xterm-256color {cmd}; echo \"EXITED-$?\"; sleep 60",
                env!("CARGO_MANIFEST_DIR")
            ))
            .status()
            .unwrap();
        assert!(status.success());
        Tmux { name: name.clone() }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn keys(&self, k: &str) {
        Command::new("tmux")
            .args(["send-keys", "-t", &self.name, k])
            .status()
            .unwrap();
    }

    /// Waits until the screen contains every needle.
    fn wait_for(&self, needles: &[&str], secs: u64) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if needles.iter().all(|n| s.contains(n)) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "waited for {needles:?}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .output();
    }
}

#[test]
fn live_dashboard_in_tmux() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("tui.ndjson");
    let cmd = format!(
        "{PACED} {} run --prompts prompts/long.toml --record {}",
        bin().display(),
        rec.display()
    );
    let t = Tmux::start("moescope-test-live", 160, 50, &cmd);
    // Both panes, the header, tokens streaming.
    let s = t.wait_for(
        &[
            "native ·",
            "selective ·",
            "prompt 1/4",
            "throughput",
            "cache",
        ],
        60,
    );
    assert!(s.contains("moescope tiny-moe"), "{s}");
    // Pause, then step one token.
    t.keys("Space");
    t.wait_for(&["PAUSED"], 20);
    t.keys(".");
    // Help overlay lists the keys; any key closes it.
    t.keys("?");
    t.wait_for(&["rerun the current prompt", "zoom the focused panel"], 10);
    t.keys("x");
    t.keys("Space");
    // The run finishes and the verdict screen appears.
    t.wait_for(&["VERDICT", "per prompt"], 120);
    // q restores the terminal and prints the report.
    t.keys("q");
    let s = t.wait_for(
        &["verdict (relative profile)", "recording:", "EXITED-0"],
        20,
    );
    assert!(s.contains("| native") || s.contains("native "), "{s}");
    let r = moescope::session::record::read(&rec).unwrap();
    assert!(matches!(
        r.events.last().unwrap().event,
        moescope::session::SessionEvent::Finished { .. }
    ));
}

#[test]
fn replay_in_a_small_terminal_and_quit_mid_run() {
    let demo =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recordings/demo-tiny-moe.ndjson");
    let cmd = format!(
        "{} replay {} --speed 0.5 --theme ansi16",
        bin().display(),
        demo.display()
    );
    let t = Tmux::start("moescope-test-replay", 80, 24, &cmd);
    t.wait_for(&["REPLAY", "native ·", "selective ·"], 30);
    t.keys("n");
    t.wait_for(&["prompt 2/6"], 10);
    t.keys("q");
    let s = t.wait_for(&["EXITED-0"], 10);
    assert!(!s.contains("REPLAY"), "terminal restored:\n{s}");
}

#[test]
fn watch_follows_a_recording_as_it_grows() {
    let tmp = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recordings/demo-tiny-moe.ndjson"),
    )
    .unwrap();
    let lines: Vec<&str> = src.lines().collect();
    let rec = tmp.path().join("growing.ndjson");
    // The header and the first events only: the "run" is still going.
    std::fs::write(&rec, lines[..40].join("\n") + "\n").unwrap();
    let cmd = format!("{} watch {}", bin().display(), rec.display());
    let t = Tmux::start("moescope-test-watch", 120, 40, &cmd);
    t.wait_for(&["WATCHING", "native ·"], 20);
    assert!(!t.screen().contains("prompt 6/6"));
    // The run writes the rest; the watcher shows it without being told.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(&rec).unwrap();
    f.write_all((lines[40..].join("\n") + "\n").as_bytes())
        .unwrap();
    t.wait_for(&["prompt 6/6", "VERDICT"], 20);
    // Read-only: space cannot pause anything.
    t.keys("v");
    t.keys("Space");
    t.wait_for(&["watching a run in progress"], 10);
    t.keys("q");
    t.wait_for(&["EXITED-0"], 10);
}

/// An SSH session dropping under the dashboard: the terminal goes away and the process gets
/// SIGHUP. The run stops as if `q` had been pressed — the recording ends with `Finished`, the
/// summary is written and no worker outlives it.
#[test]
fn dashboard_survives_its_terminal_going_away() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("hup.ndjson");
    let cmd = format!(
        "{PACED} {} run --prompts prompts/long.toml --record {}",
        bin().display(),
        rec.display()
    );
    let t = Tmux::start("moescope-test-hangup", 120, 40, &cmd);
    t.wait_for(&["native ·", "selective ·"], 60);
    let pids: Vec<u32> = {
        let start = Instant::now();
        loop {
            let r = moescope::session::record::read(&rec).unwrap();
            let p: Vec<u32> = r
                .events
                .iter()
                .filter_map(|e| match e.event {
                    moescope::session::SessionEvent::WorkerStarted { pid, .. } => Some(pid),
                    _ => None,
                })
                .collect();
            if p.len() == 2 {
                break p;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "workers: {p:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Killing the tmux session closes the terminal: its processes get SIGHUP.
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &t.name])
        .output();
    let summary = moescope::session::record::summary_path(&rec);
    let start = Instant::now();
    while !summary.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no summary after the hang-up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = moescope::session::record::read(&rec).unwrap();
    assert!(!r.truncated_tail);
    match &r.events.last().unwrap().event {
        // The hang-up or the terminal's end, whichever the dashboard noticed first.
        moescope::session::SessionEvent::Finished { reason } => assert!(
            reason == "stopped by SIGHUP (the terminal hung up)"
                || reason == "stopped: the terminal went away",
            "{reason}"
        ),
        other => panic!("last event {other:?}"),
    }
    for pid in pids {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!pid_alive(pid), "worker {pid} outlived the run");
    }
}

/// Step mode, driven as a user would: the run stops after the first prompt with its result card,
/// goes on only on `n`, switches to auto with `s` and runs to the verdict; the recording marks
/// the wait, and the header says the mode.
#[test]
fn step_mode_waits_on_a_result_card_until_told() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("step.ndjson");
    let cmd = format!(
        "{} run --step --max-new-tokens 12 --record {}",
        bin().display(),
        rec.display()
    );
    let t = Tmux::start("moescope-test-step", 160, 50, &cmd);
    let s = t.wait_for(
        &["prompt 1/6 done · waiting", "same tokens", "decode tok/s"],
        90,
    );
    assert!(s.contains("STEP: n/Enter"), "{s}");
    // It waits: a second later it still shows prompt 1's card.
    std::thread::sleep(Duration::from_secs(1));
    let s = t.screen();
    assert!(s.contains("prompt 1/6 done · waiting"), "{s}");
    t.keys("n");
    t.wait_for(&["prompt 2/6 done · waiting"], 60);
    // Auto mode from here: the run goes to its verdict without another wait.
    t.keys("s");
    t.keys("Enter");
    t.wait_for(&["VERDICT", "per prompt"], 120);
    t.keys("q");
    t.wait_for(&["EXITED-0"], 20);
    let r = moescope::session::record::read(&rec).unwrap();
    use moescope::session::SessionEvent as E;
    let marks: Vec<String> = r
        .events
        .iter()
        .filter_map(|e| match &e.event {
            E::StepMode { on } => Some(format!("mode {on}")),
            E::Waiting { prompt } => Some(format!("wait {prompt}")),
            E::Continued { prompt } => Some(format!("go {prompt}")),
            _ => None,
        })
        .collect();
    assert_eq!(
        marks,
        [
            "mode true",
            "wait 0",
            "go 0",
            "wait 1",
            "mode false",
            "go 1"
        ],
        "{marks:?}"
    );
}

/// Replay skips the time a step-mode run spent waiting for its user: the fixture waited 30 s
/// and 12 s of its 44 s; replayed at normal speed it reaches its verdict well before the first
/// wait would have ended (the rest of it takes under 3 s).
#[test]
fn replay_skips_step_mode_waits() {
    let fixture = fixture("events").join("step_mode.ndjson");
    let cmd = format!("{} replay {} --speed 1", bin().display(), fixture.display());
    let t = Tmux::start("moescope-test-replay-step", 160, 50, &cmd);
    let start = Instant::now();
    t.wait_for(&["VERDICT"], 25);
    assert!(
        start.elapsed() < Duration::from_secs(25),
        "the 30 s wait was replayed"
    );
    t.keys("q");
    t.wait_for(&["EXITED-0"], 10);
}

/// Asking a prompt of one's own: in step mode, `a` opens the line, the typed text (edited, with
/// a paste) runs next on both backends as an "ad hoc" prompt, gets its own result card, and
/// then the set goes on where it was; the recording holds it and replays.
#[test]
fn a_typed_prompt_runs_next_on_both_backends() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("ask.ndjson");
    let cmd = format!(
        "{} run --step --max-new-tokens 8 --record {}",
        bin().display(),
        rec.display()
    );
    let t = Tmux::start("moescope-test-ask", 160, 50, &cmd);
    t.wait_for(&["prompt 1/6 done · waiting"], 90);
    t.keys("a");
    t.wait_for(&["ask ›"], 10);
    for k in ["What", "Space", "is", "Space", "the", "Space", "sae?"] {
        t.keys(k);
    }
    // Fix the typo: cursor left over "?" and "e", delete "a", type "e" + "a" → "sea?".
    t.keys("Left");
    t.keys("Left");
    t.keys("BSpace");
    t.keys("e");
    t.keys("Right");
    t.keys("BSpace");
    t.keys("a");
    t.wait_for(&["ask › What is the sea?"], 10);
    t.keys("Enter");
    // It joins the set at the end (7 of 7) and runs now.
    // The card's lines may land a frame after the status line: wait for all of them.
    t.wait_for(
        &[
            "prompt 7/7 done · waiting",
            "[ad hoc] What is the sea?",
            "same tokens",
        ],
        60,
    );
    // The set resumes with its second prompt.
    t.keys("n");
    t.wait_for(&["prompt 2/7 done · waiting", "What is a volcano?"], 60);
    t.keys("s");
    t.keys("Enter");
    t.wait_for(&["VERDICT"], 120);
    t.keys("q");
    t.wait_for(&["EXITED-0"], 20);
    let r = moescope::session::record::read(&rec).unwrap();
    let s = moescope::session::SessionState::replayed(&r);
    assert_eq!(s.num_prompts(), 7);
    let p = &s.header.prompts.prompts[6];
    assert_eq!(
        (p.category.as_str(), p.text.as_str()),
        ("ad hoc", "What is the sea?")
    );
    // It ran second, on both backends, and counts like any other prompt.
    for b in &s.backends {
        assert!(b.runs[6].done.is_some());
    }
    let order: Vec<usize> = r
        .events
        .iter()
        .filter_map(|e| match &e.event {
            moescope::session::SessionEvent::PromptStarted {
                prompt,
                backend: moescope::session::Backend::Native,
                ..
            } => Some(*prompt),
            _ => None,
        })
        .collect();
    assert_eq!(order, [0, 6, 1, 2, 3, 4, 5]);
    let sum = moescope::session::export::summarize(
        &s,
        &moescope::session::verdict::Profile::load("relative").unwrap(),
    );
    assert!(sum.prompts[6].token_agreement.is_some());
}

/// The prompt list drives a live run: from the first result card, `l`, three down, Enter runs
/// prompt 4 next.
#[test]
fn the_prompt_list_jumps_a_live_run() {
    let cmd = format!(
        "{} run --step --max-new-tokens 6 --record none.ndjson",
        bin().display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let cmd = cmd.replace("none.ndjson", tmp.path().join("l.ndjson").to_str().unwrap());
    let t = Tmux::start("moescope-test-list", 160, 50, &cmd);
    t.wait_for(&["prompt 1/6 done · waiting"], 90);
    t.keys("l");
    t.wait_for(&["prompts · ↑↓ select", "pending"], 10);
    for _ in 0..3 {
        t.keys("Down");
    }
    t.keys("Enter");
    t.wait_for(&["prompt 4/6 done · waiting", "Use the word"], 60);
    t.keys("q");
    t.wait_for(&["EXITED-0"], 20);
}

/// The instrument end to end, as the issue describes it: a live run in step mode waits on its
/// card; a typed prompt runs next on both backends; a token of it is inspected; `e` exports the
/// summary and the HTML report; the run is finished and quit; the recording replays.
#[test]
fn step_ask_inspect_export_and_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("i.ndjson");
    let cmd = format!(
        "{} run --step --max-new-tokens 8 --record {}",
        bin().display(),
        rec.display()
    );
    let t = Tmux::start("moescope-test-inspect", 160, 50, &cmd);
    t.wait_for(&["prompt 1/6 done · waiting"], 90);
    t.keys("a");
    t.wait_for(&["ask ›"], 10);
    for k in ["Why", "Space", "is", "Space", "the", "Space", "sky?"] {
        t.keys(k);
    }
    t.keys("Enter");
    let s = t.wait_for(
        &["prompt 7/7 done · waiting", "[ad hoc] Why is the sky?"],
        60,
    );
    assert!(s.contains("same tokens"), "{s}");
    t.keys("i");
    let s = t.wait_for(
        &["inspect · ←/→ token", "native top-5:", "selective top-5:"],
        10,
    );
    assert!(s.contains("token 8 of 8"), "opens on the last token:\n{s}");
    t.keys("Left");
    let s = t.wait_for(&["token 7 of 8"], 10);
    assert!(
        s.contains("KL here") && s.contains("routing at position"),
        "{s}"
    );
    // `i` closes it (an Escape followed at once by `e` would read as Alt-e).
    t.keys("i");
    t.wait_for(&["n / Enter: next prompt"], 10);
    t.keys("e");
    t.wait_for(&["report.html"], 20);
    t.keys("s");
    t.keys("Enter");
    t.wait_for(&["VERDICT"], 120);
    t.keys("q");
    t.wait_for(&["EXITED-0"], 20);
    let html = std::fs::read_to_string(format!("{}.report.html", rec.display())).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("Why is the sky?"));
    let (rc, out, err) = run(&["replay", "--no-tui", rec.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("verdict"), "{out}");
}
