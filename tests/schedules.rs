//! The three schedules run every prompt on both backends; --exit-code reflects the verdict.

mod common;

use common::*;
use moescope::session::record;
use moescope::session::{Backend, SessionEvent};

fn run_schedule(schedule: &str, tokens: &str, extra: &[&str]) -> (i32, Vec<SessionEvent>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("s.ndjson");
    let mut args = vec![
        "run",
        "--no-tui",
        "--record",
        rec.to_str().unwrap(),
        "--schedule",
        schedule,
        "--max-new-tokens",
        tokens,
    ];
    args.extend_from_slice(extra);
    let out = std::process::Command::new(bin())
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let events = record::read(&rec)
        .map(|r| r.events.into_iter().map(|e| e.event).collect())
        .unwrap_or_default();
    (
        out.status.code().unwrap_or(-1),
        events,
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

fn done(evs: &[SessionEvent], b: Backend) -> usize {
    evs.iter()
        .filter(|e| matches!(e, SessionEvent::PromptDone { backend, .. } if *backend == b))
        .count()
}

#[test]
fn sequential_runs_one_backend_after_the_other() {
    let (rc, evs, out) = run_schedule("sequential", "12", &[]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(
        (done(&evs, Backend::Native), done(&evs, Backend::Selective)),
        (6, 6)
    );
    // Native's worker was gone before selective's started (lowest peak memory).
    let last_native = evs
        .iter()
        .rposition(|e| {
            e.backend() == Some(Backend::Native) && !matches!(e, SessionEvent::Memory { .. })
        })
        .unwrap();
    let first_sel = evs
        .iter()
        .position(|e| {
            matches!(
                e,
                SessionEvent::WorkerStarted {
                    backend: Backend::Selective,
                    ..
                }
            )
        })
        .unwrap();
    assert!(
        first_sel > last_native,
        "selective started only after native finished"
    );
    assert!(
        evs.iter()
            .any(|e| matches!(e, SessionEvent::Agreement { .. })),
        "agreement scored against native's stored rows"
    );
}

/// Alternate (the default) loads one backend at a time, so each load time is its own: loaded
/// together, selective's measured load was native's.
#[test]
fn alternate_loads_one_backend_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("a.ndjson");
    let out = std::process::Command::new(bin())
        .args([
            "run",
            "--no-tui",
            "--schedule",
            "alternate",
            "--max-new-tokens",
            "4",
        ])
        .arg("--record")
        .arg(&rec)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let r = record::read(&rec).unwrap();
    // (time the scheduler saw the Loaded event, load_s the worker measured) per backend.
    let loaded = |b: Backend| {
        r.events
            .iter()
            .find_map(|s| match &s.event {
                SessionEvent::Loaded {
                    backend, load_s, ..
                } if *backend == b => Some((s.t, *load_s)),
                _ => None,
            })
            .unwrap()
    };
    let (sel_done, _) = loaded(Backend::Selective);
    let (nat_done, nat_load) = loaded(Backend::Native);
    let native_began = nat_done - nat_load;
    assert!(
        native_began >= sel_done,
        "native began loading at {native_began:.4} s, before selective had loaded ({sel_done:.4} s)"
    );
}

#[test]
fn parallel_runs_both_and_says_timings_are_contended() {
    let (rc, evs, out) = run_schedule("parallel", "12", &[]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(
        (done(&evs, Backend::Native), done(&evs, Backend::Selective)),
        (6, 6)
    );
    assert!(evs.iter().any(
        |e| matches!(e, SessionEvent::Warning { message, .. } if message.contains("contended"))
    ));
}

#[test]
fn exit_code_reflects_the_verdict_only_when_asked() {
    // Two tokens per prompt: too few to judge -> INCONCLUSIVE -> 12 with --exit-code.
    let (rc, evs, out) = run_schedule("alternate", "2", &["--exit-code"]);
    assert_eq!(rc, 12);
    // INCONCLUSIVE for the reason meant — too few tokens — not because a backend failed (which
    // gives 12 too): both ran every prompt.
    assert!(out.contains("too few tokens to judge"), "{out}");
    assert_eq!(
        (done(&evs, Backend::Native), done(&evs, Backend::Selective)),
        (6, 6)
    );
    assert!(!evs.iter().any(|e| matches!(e, SessionEvent::Failed { .. })));
    let (rc, _, _) = run_schedule("alternate", "2", &[]);
    assert_eq!(rc, 0);
}

/// Step mode waits for keys: without the dashboard it is refused before anything runs, and
/// nothing is recorded.
#[test]
fn step_mode_needs_the_dashboard() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("s.ndjson");
    let (rc, out, err) = run(&[
        "run",
        "--no-tui",
        "--step",
        "--record",
        rec.to_str().unwrap(),
    ]);
    assert_eq!(rc, 2, "{out}{err}");
    assert!(
        err.contains("--step waits for a key after each prompt"),
        "{err}"
    );
    assert!(!rec.exists());
}

/// A prompt plus its new tokens past the positions the model was trained for runs, and the run
/// says so once per prompt (the scheduler has the limit from the workers' `Loaded`); `generate`
/// says it too. Within the limit, not a word.
#[test]
fn running_past_the_trained_context_is_warned_of_once_per_prompt() {
    let dir = copy_fixture("qwen3-moe-tiny");
    let model = dir.path().to_str().unwrap();
    let past = |evs: &[SessionEvent]| -> Vec<String> {
        evs.iter()
            .filter_map(|e| match e {
                SessionEvent::Warning { message, .. } if message.contains("trained for") => {
                    Some(message.clone())
                }
                _ => None,
            })
            .collect()
    };
    let (rc, evs, out) = run_schedule("alternate", "4", &["--model", model]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(past(&evs), Vec::<String>::new(), "512 positions are plenty");
    edit_json(&dir.path().join("config.json"), |v| {
        v["max_position_embeddings"] = serde_json::json!(12)
    });
    let (rc, evs, out) = run_schedule("alternate", "4", &["--model", model]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(
        (done(&evs, Backend::Native), done(&evs, Backend::Selective)),
        (6, 6),
        "a warning, not a refusal"
    );
    let warned = past(&evs);
    assert_eq!(
        warned.len(),
        6,
        "one per prompt, not per backend: {warned:#?}"
    );
    for (i, w) in warned.iter().enumerate() {
        assert!(
            w.starts_with(&format!("prompt {}: ", i + 1))
                && w.contains("+ up to 4 new")
                && w.contains("past the 12 the model was trained for"),
            "{w}"
        );
    }
    assert!(
        out.contains("past the 12 the model was trained for"),
        "{out}"
    );

    let (rc, _, err) = run(&[
        "generate",
        "--model",
        model,
        "--token-ids",
        "1,2,3",
        "--max-new-tokens",
        "10",
    ]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        err.contains(
            "warning: the prompt: 3 prompt tokens + up to 10 new = 13 positions, past the 12"
        ),
        "{err}"
    );
    let (rc, _, err) = run(&[
        "generate",
        "--model",
        model,
        "--token-ids",
        "1,2,3",
        "--max-new-tokens",
        "9",
    ]);
    assert_eq!(rc, 0, "{err}");
    assert!(!err.contains("trained for"), "{err}");
}
