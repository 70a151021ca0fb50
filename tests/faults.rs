//! Faults: a worker killed mid-generation, the user quitting mid-run, a worker that stops
//! answering. In each case the run goes on (or stops) cleanly, the recording holds everything
//! up to that point, and export and replay still work.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use moescope::session::record;
use moescope::session::{Backend, SessionEvent};

fn run_headless(rec: &Path, extra: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args([
        "run",
        "--no-tui",
        "--record",
        rec.to_str().unwrap(),
        "--reference",
        "none",
    ])
    .args(extra)
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Prompts `backend` finished in a recording's events.
fn prompts_done(evs: &[SessionEvent], backend: Backend) -> usize {
    evs.iter()
        .filter(|e| matches!(e, SessionEvent::PromptDone { backend: b, .. } if *b == backend))
        .count()
}

fn events(rec: &Path) -> Vec<SessionEvent> {
    record::read(rec)
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.event)
        .collect()
}

#[test]
fn worker_killed_mid_generation_run_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("crash.ndjson");
    let (rc, out, err) = run_headless(
        &rec,
        &[],
        &[("MOESCOPE_TEST_SELECTIVE_CRASH_AFTER_TOKENS", "5")],
    );
    assert_eq!(rc, 0, "{out}\n{err}");
    assert!(
        out.contains("selective FAILED") && out.contains("signal 9"),
        "{out}"
    );
    let evs = events(&rec);
    let failed = evs
        .iter()
        .position(|e| {
            matches!(
                e,
                SessionEvent::Failed {
                    backend: Backend::Selective,
                    ..
                }
            )
        })
        .expect("failure recorded");
    // Selective produced exactly its 5 tokens before dying, all recorded.
    let sel_tokens = evs[..failed]
        .iter()
        .filter(|e| {
            matches!(
                e,
                SessionEvent::Token {
                    backend: Backend::Selective,
                    ..
                }
            )
        })
        .count();
    assert_eq!(sel_tokens, 5);
    // Native finished every prompt.
    let native_done = prompts_done(&evs, Backend::Native);
    assert_eq!(native_done, 6);
    // Export still works and says what happened.
    let (rc, json, err) = run(&["export", rec.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["backends"]["selective"]["status"], "failed");
    assert!(
        v["backends"]["selective"]["failed"]
            .as_str()
            .unwrap()
            .contains("signal 9")
    );
    assert_eq!(v["verdict"]["outcome"], "INCONCLUSIVE");
    assert_eq!(v["backends"]["native"]["prompts_done"], 6);
}

#[test]
fn external_kill_9_is_survived() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("kill.ndjson");
    let mut child = Command::new(bin())
        .args([
            "run",
            "--no-tui",
            "--record",
            rec.to_str().unwrap(),
            "--reference",
            "none",
            "--prompts",
            "prompts/long.toml",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the selective worker has streamed a few tokens, then kill -9 it from outside.
    let start = Instant::now();
    let pid = loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "selective never started"
        );
        if let Ok(r) = record::read(&rec) {
            let pid = r.events.iter().find_map(|e| match e.event {
                SessionEvent::WorkerStarted {
                    backend: Backend::Selective,
                    pid,
                } => Some(pid),
                _ => None,
            });
            let toks = r
                .events
                .iter()
                .filter(|e| {
                    matches!(
                        e.event,
                        SessionEvent::Token {
                            backend: Backend::Selective,
                            ..
                        }
                    )
                })
                .count();
            if let (Some(p), true) = (pid, toks >= 3) {
                break p;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert!(status.success());
    let evs = events(&rec);
    assert!(evs.iter().any(|e| matches!(e, SessionEvent::Failed { backend: Backend::Selective, reason } if reason.contains("signal 9"))));
    assert!(matches!(evs.last(), Some(SessionEvent::Finished { .. })));
    let native_done = prompts_done(&evs, Backend::Native);
    assert_eq!(native_done, 4, "native ran every long prompt");
}

#[test]
fn ctrl_c_mid_run_leaves_a_complete_recording_and_no_orphans() {
    stopped_mid_run_by(libc::SIGINT);
}

/// What a dropped SSH session (SIGHUP) or `kill` (SIGTERM) does to a headless run: the same as
/// Ctrl-C — the workers stop and the recording stays complete.
#[test]
fn hangup_and_terminate_stop_a_run_like_ctrl_c() {
    stopped_mid_run_by(libc::SIGHUP);
    stopped_mid_run_by(libc::SIGTERM);
}

fn stopped_mid_run_by(signal: i32) {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("int.ndjson");
    let child = Command::new(bin())
        .args([
            "run",
            "--no-tui",
            "--record",
            rec.to_str().unwrap(),
            "--reference",
            "none",
            "--prompts",
            "prompts/long.toml",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // Paced so the run is still going when the signal lands, however fast the machine.
        .env("MOESCOPE_TEST_NATIVE_TOKEN_DELAY_MS", "20")
        .env("MOESCOPE_TEST_SELECTIVE_TOKEN_DELAY_MS", "20")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let pids: Vec<u32> = loop {
        assert!(start.elapsed() < Duration::from_secs(60));
        if let Ok(r) = record::read(&rec) {
            let toks = r
                .events
                .iter()
                .filter(|e| matches!(e.event, SessionEvent::Token { .. }))
                .count();
            if toks >= 10 {
                break r
                    .events
                    .iter()
                    .filter_map(|e| match e.event {
                        SessionEvent::WorkerStarted { pid, .. } => Some(pid),
                        _ => None,
                    })
                    .collect();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(pids.len(), 2);
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = record::read(&rec).unwrap();
    assert!(!r.truncated_tail);
    // The recording says which signal stopped the run.
    let want = match signal {
        libc::SIGINT => "stopped by SIGINT",
        libc::SIGTERM => "stopped by SIGTERM",
        libc::SIGHUP => "stopped by SIGHUP (the terminal hung up)",
        _ => unreachable!(),
    };
    match &r.events.last().unwrap().event {
        SessionEvent::Finished { reason } => assert_eq!(reason, want),
        other => panic!("last event {other:?}"),
    }
    // Not every prompt ran: it really stopped early.
    let done = r
        .events
        .iter()
        .filter(|e| {
            matches!(
                e.event,
                SessionEvent::PromptDone {
                    backend: Backend::Native,
                    ..
                }
            )
        })
        .count();
    assert!(done < 4, "{done}");
    for pid in pids {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!pid_alive(pid), "worker {pid} outlived the run");
    }
    let (rc, out, err) = run(&["replay", "--no-tui", rec.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("verdict"), "{out}");
}

#[test]
fn a_hung_worker_is_timed_out_not_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("hang.ndjson");
    let start = Instant::now();
    let (rc, out, err) = run_headless(
        &rec,
        &[
            "--step-timeout",
            "2",
            "--prompt",
            "What is a volcano?",
            "--max-new-tokens",
            "20",
        ],
        &[("MOESCOPE_TEST_SELECTIVE_HANG_AFTER_TOKENS", "3")],
    );
    assert_eq!(rc, 0, "{out}\n{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        out.contains("selective FAILED") && out.contains("stopped answering"),
        "{out}"
    );
    let evs = events(&rec);
    assert!(evs.iter().any(|e| matches!(
        e,
        SessionEvent::PromptDone {
            backend: Backend::Native,
            ..
        }
    )));
    // The hung worker is gone, not left behind sleeping.
    let hung = evs
        .iter()
        .find_map(|e| match e {
            SessionEvent::WorkerStarted {
                backend: Backend::Selective,
                pid,
            } => Some(*pid),
            _ => None,
        })
        .expect("the selective worker started");
    assert!(!pid_alive(hung), "the hung worker {hung} is still running");
}

#[test]
fn recording_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("x.ndjson");
    std::fs::write(&rec, "precious").unwrap();
    let (rc, _, err) = run_headless(&rec, &["--prompt", "hi", "--max-new-tokens", "2"], &[]);
    assert_eq!(rc, 2);
    assert!(err.contains("never overwrites"), "{err}");
    assert_eq!(std::fs::read_to_string(&rec).unwrap(), "precious");
}

/// A worker that answers a prompt with an error (it cannot tokenize it, an expert file went
/// bad) fails its backend at once with that reason — it does not sit out the step timeout —
/// in either schedule, and the other backend finishes.
#[test]
fn a_generation_error_fails_the_backend_with_its_reason() {
    for schedule in ["alternate", "sequential"] {
        let tmp = tempfile::tempdir().unwrap();
        let rec = tmp.path().join("genfail.ndjson");
        let (rc, out, err) = run_headless(
            &rec,
            &[
                "--schedule",
                schedule,
                "--step-timeout",
                "600",
                "--no-score",
            ],
            &[("MOESCOPE_TEST_SELECTIVE_FAIL_GENERATE_AT_PROMPT", "1")],
        );
        assert_eq!(rc, 0, "{out}\n{err}");
        assert!(
            out.contains("selective FAILED") && out.contains("injected failure"),
            "{schedule}: {out}"
        );
        assert!(!out.contains("stopped answering"), "{schedule}: {out}");
        let evs = events(&rec);
        let native_done = prompts_done(&evs, Backend::Native);
        assert_eq!(native_done, 6, "{schedule}");
    }
}

/// A model without a tokenizer cannot take text prompts: one clear error naming the file,
/// before any worker starts, and exit code 2.
#[test]
fn a_model_without_a_tokenizer_is_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let (rc, _, err) = run(&[
        "bench",
        "random-checkpoint",
        "--layers",
        "1",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{err}");
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let rec = tmp.path().join("r.ndjson");
    let (rc, out, err) = run_headless(&rec, &["--model", model.to_str().unwrap()], &[]);
    assert_eq!(rc, 2, "{out}\n{err}");
    assert!(
        err.contains(&format!("{}", model.join("tokenizer.json").display()))
            && err.contains("missing"),
        "{err}"
    );
    assert!(
        !rec.exists(),
        "nothing recorded for a run that never started"
    );
}

/// A disk that fills up mid-run — here a file-size limit on the process, which fails writes as a
/// full disk does, partial writes included: the run stops at the first failed write with a
/// non-zero exit code saying so, and the recording holds every event before it, whole lines
/// only, readable by export and replay.
#[test]
fn a_full_disk_stops_the_recording_cleanly_and_the_exit_code_says_so() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("full.ndjson");
    let mut cmd = Command::new(bin());
    cmd.args([
        "run",
        "--no-tui",
        "--record",
        rec.to_str().unwrap(),
        "--reference",
        "none",
        "--prompts",
        "prompts/long.toml",
    ])
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 60_000,
                rlim_max: 60_000,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("recording stopped") && err.contains(rec.to_str().unwrap()),
        "{err}"
    );
    // Cut back to whole lines: nothing torn, nothing glued, everything before readable.
    let size = std::fs::metadata(&rec).unwrap().len();
    assert!(size <= 60_000, "{size}");
    let bytes = std::fs::read(&rec).unwrap();
    assert_eq!(bytes.last(), Some(&b'\n'));
    let r = record::read(&rec).unwrap();
    assert!(!r.truncated_tail);
    assert!(
        r.events
            .iter()
            .any(|e| matches!(e.event, SessionEvent::Token { .. })),
        "the recording holds the run up to the failure"
    );
    let (rc, json, _) = run(&["export", rec.to_str().unwrap()]);
    assert_eq!(rc, 0);
    assert!(json.contains("\"verdict\""));
    let (rc, _, e) = run(&["replay", "--no-tui", rec.to_str().unwrap()]);
    assert_eq!(rc, 0, "{e}");
}

/// A recordings directory nothing can be written in: refused before any worker starts, exit 2.
#[test]
fn a_read_only_recordings_directory_is_refused_up_front() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    // Permissions do not stop root; a directory of procfs stops everyone.
    let rec = if unsafe { libc::geteuid() } == 0 {
        Path::new("/proc/moescope-test/rec.ndjson").to_path_buf()
    } else {
        let ro = tmp.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        ro.join("rec.ndjson")
    };
    let (rc, out, err) = run_headless(&rec, &["--max-new-tokens", "2"], &[]);
    assert_eq!(rc, 2, "{out}\n{err}");
    assert!(
        err.contains("cannot create the recording") && err.contains("rec.ndjson"),
        "{err}"
    );
    assert!(!out.contains("loaded"), "no worker was started: {out}");
}

/// A recording deleted while the run writes it would take every later event with it, silently:
/// the run notices at the next prompt's end, stops, and exits non-zero naming what happened.
#[test]
fn a_recording_deleted_mid_run_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("deleted.ndjson");
    let child = Command::new(bin())
        .args([
            "run",
            "--no-tui",
            "--record",
            rec.to_str().unwrap(),
            "--reference",
            "none",
            "--prompts",
            "prompts/long.toml",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("MOESCOPE_TEST_NATIVE_TOKEN_DELAY_MS", "5")
        .env("MOESCOPE_TEST_SELECTIVE_TOKEN_DELAY_MS", "5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(60));
        if record::read(&rec).is_ok_and(|r| {
            r.events
                .iter()
                .any(|e| matches!(e.event, SessionEvent::Token { .. }))
        }) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_file(&rec).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the recording was deleted"), "{err}");
    // It stopped early: not every prompt ran.
    assert!(
        !stdout.contains("prompt 4/4"),
        "the run went on after its recording was deleted: {stdout}"
    );
}

/// A worker that dies in the middle of writing a protocol line: the torn line is reported as
/// such, the backend fails with the signal, the other goes on, and the recording exports and
/// replays.
#[test]
fn a_worker_killed_mid_line_is_reported_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("torn.ndjson");
    let (rc, out, err) = run_headless(
        &rec,
        &["--max-new-tokens", "8"],
        &[("MOESCOPE_TEST_SELECTIVE_TEAR_LINE_AFTER_TOKENS", "3")],
    );
    assert_eq!(rc, 0, "{out}\n{err}");
    assert!(
        out.contains("selective FAILED") && out.contains("signal 9"),
        "{out}"
    );
    let evs = events(&rec);
    assert!(
        evs.iter()
            .any(|e| matches!(e, SessionEvent::Warning { message, .. }
            if message.contains("line outside the protocol") && message.contains("\"nat"))),
        "the torn line is reported"
    );
    assert_eq!(
        prompts_done(&evs, Backend::Native),
        6,
        "native ran every prompt"
    );
    let (rc, json, _) = run(&["export", rec.to_str().unwrap()]);
    assert_eq!(rc, 0);
    assert!(json.contains("\"verdict\""));
    let (rc, _, e) = run(&["replay", "--no-tui", rec.to_str().unwrap()]);
    assert_eq!(rc, 0, "{e}");
}

/// `kill -9` of the run itself: no worker outlives it, and its recording — whose last line a
/// kill can tear — still exports and replays, saying the tail was incomplete.
#[test]
fn kill_9_of_the_run_leaves_no_worker_and_a_readable_recording() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("k9.ndjson");
    let mut child = Command::new(bin())
        .args([
            "run",
            "--no-tui",
            "--record",
            rec.to_str().unwrap(),
            "--reference",
            "none",
            "--prompts",
            "prompts/long.toml",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("MOESCOPE_TEST_NATIVE_TOKEN_DELAY_MS", "20")
        .env("MOESCOPE_TEST_SELECTIVE_TOKEN_DELAY_MS", "20")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let pids: Vec<u32> = loop {
        assert!(start.elapsed() < Duration::from_secs(60));
        if let Ok(r) = record::read(&rec) {
            let pids: Vec<u32> = r
                .events
                .iter()
                .filter_map(|e| match e.event {
                    SessionEvent::WorkerStarted { pid, .. } => Some(pid),
                    _ => None,
                })
                .collect();
            let tokens = r
                .events
                .iter()
                .filter(|e| matches!(e.event, SessionEvent::Token { .. }))
                .count();
            if pids.len() == 2 && tokens >= 4 {
                break pids;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for pid in pids {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!pid_alive(pid), "worker {pid} outlived the killed run");
    }
    // A kill mid-write leaves a torn last line; make sure this one has one, then read it.
    let bytes = std::fs::read(&rec).unwrap();
    let keep = bytes.len() - 7.min(bytes.len() / 2);
    std::fs::write(&rec, &bytes[..keep]).unwrap();
    let r = record::read(&rec).unwrap();
    assert!(r.truncated_tail);
    let (rc, json, err) = run(&["export", rec.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert!(json.contains("\"verdict\""));
    assert!(err.contains("last line was incomplete"), "{err}");
    let (rc, _, err) = run(&["replay", "--no-tui", rec.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("last line was incomplete"), "{err}");
}

/// Generation from NaN logits stops with an error naming them, with either sign of NaN (x86
/// makes negative ones, which the greedy pick's total order puts below every number: before,
/// greedy decoding emitted token after token from such rows without a word), greedy or sampled,
/// on both backends; `logits` refuses to print them (as JSON nulls).
#[test]
fn generation_from_nan_logits_fails_by_name() {
    for bits in [0x7FC0u16, 0xFFC0] {
        let model = with_nan_bits("model.norm.weight", bits);
        for extra in [
            &["--backend", "native"][..],
            &[
                "--backend",
                "selective",
                "--temperature",
                "0.8",
                "--seed",
                "3",
            ],
        ] {
            let mut args = vec![
                "generate",
                "--model",
                model.path().to_str().unwrap(),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "4",
            ];
            args.extend_from_slice(extra);
            let (rc, out, err) = run(&args);
            assert_eq!(rc, 2, "{bits:#x} {extra:?}: {out}\n{err}");
            assert!(
                err.contains("logits after the prompt are not finite")
                    && err.contains("check the checkpoint"),
                "{bits:#x} {extra:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
        // `logits` prints JSON, which has no number for NaN: refused, not written as nulls.
        let (rc, out, err) = run(&[
            "logits",
            "--model",
            model.path().to_str().unwrap(),
            "--tokens",
            "1,2,3",
        ]);
        assert_eq!(rc, 2, "{bits:#x}: {out}\n{err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("logits after the last of 3 tokens are not finite"),
            "{err}"
        );
    }
}

/// The moe fixture with a NaN at the start of `tensor` (bf16) in its one shard.
fn with_nan_weight(tensor: &str) -> tempfile::TempDir {
    with_nan_bits(tensor, 0x7FC0)
}

/// The moe fixture with the bf16 value `bits` at the start of `tensor` in its one shard.
fn with_nan_bits(tensor: &str, bits: u16) -> tempfile::TempDir {
    let dir = copy_fixture("qwen3-moe-tiny");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header[tensor]["dtype"], "BF16");
    let at = 8 + n + header[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at..at + 2].copy_from_slice(&bits.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    dir
}

#[test]
fn a_model_whose_outputs_are_nan_fails_by_name_instead_of_hanging() {
    // Its scores and perplexity were NaN, which serde_json writes as null: the reply did not
    // parse, and the run waited for it until the step timeout.
    let model = with_nan_weight("model.norm.weight");
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("nan.ndjson");
    let start = Instant::now();
    let (rc, out, err) = run_headless(
        &rec,
        &[
            "--model",
            model.path().to_str().unwrap(),
            "--step-timeout",
            "120",
            "--max-new-tokens",
            "3",
        ],
        &[],
    );
    assert_eq!(rc, 0, "{out}\n{err}");
    assert!(
        out.contains("native FAILED") && out.contains("not finite"),
        "{out}\n{err}"
    );
    assert!(!out.contains("stopped answering"), "{out}");
    assert!(
        start.elapsed() < Duration::from_secs(100),
        "waited {:?}: the step timeout ended it, not the error",
        start.elapsed()
    );
}
