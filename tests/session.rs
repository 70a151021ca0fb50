//! The session layer from recordings: the reducer's derived metrics, every verdict outcome, the
//! export (validated against its schema), re-judging under another profile, torn recordings, and
//! a live run's own summary equal to the one replayed from its recording.

mod common;

use std::path::PathBuf;

use common::*;
use moescope::report::json::SCHEMA;
use moescope::session::event::Backend;
use moescope::session::export::summarize;
use moescope::session::metrics::{backend_metrics, comparison};
use moescope::session::record;
use moescope::session::state::{SessionState, Status};
use moescope::session::verdict::{Outcome, Profile, judge};

fn events_fixture(name: &str) -> PathBuf {
    fixture("events").join(format!("{name}.ndjson"))
}

fn state(path: &std::path::Path) -> SessionState {
    let rec = record::read(path).unwrap();
    let mut s = SessionState::new(rec.header.clone());
    for e in &rec.events {
        s.apply(e);
    }
    s
}

fn validate(v: &serde_json::Value) {
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(v)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "schema violations: {errors:#?}");
}

#[test]
fn reducer_derives_metrics_from_the_viable_fixture() {
    let s = state(&events_fixture("viable"));
    let n = backend_metrics(&s, Backend::Native);
    let sel = backend_metrics(&s, Backend::Selective);
    assert_eq!(n.prompts_done, 3);
    assert_eq!(sel.generated_tokens, 90);
    // 29 decode steps per prompt at 1/100 s (native) and 1/80 s (selective).
    assert!(
        (n.decode_tok_s.unwrap() - 100.0).abs() < 0.1,
        "{:?}",
        n.decode_tok_s
    );
    assert!((sel.decode_tok_s.unwrap() - 80.0).abs() < 0.1);
    assert!((n.ttft_mean_s.unwrap() - 0.03).abs() < 1e-9);
    assert!((sel.token_latency_p50_s.unwrap() - 0.0125).abs() < 1e-9);
    assert_eq!(n.load_s, Some(2.0));
    // Memory: before 10 MiB, steady 500 / 200 MiB → peak, during, after.
    assert_eq!(n.memory.before, Some(10 << 20));
    assert_eq!(n.memory.peak, 500 << 20);
    assert_eq!(sel.memory.after, Some(200 << 20));
    assert_eq!(sel.memory.during, Some(200 << 20));
    let c = comparison(&s);
    assert!((c.memory_reduction_pct.unwrap() - 60.0).abs() < 1e-9);
    assert!((c.speed_ratio.unwrap() - 0.8).abs() < 1e-3);
    assert!((sel.cache_hit_rate.unwrap() - 600.0 / 720.0).abs() < 0.01);
    assert_eq!(sel.cache_hit_rate_per_layer.len(), 6);
    assert_eq!(
        s.trace().len(),
        90,
        "native's routing trace, one step per token"
    );
}

#[test]
fn every_verdict_outcome_from_fixtures() {
    let relative = Profile::load("relative").unwrap();
    for (name, want) in [
        ("viable", Outcome::Viable),
        ("native_preferred", Outcome::NativePreferred),
        ("hybrid", Outcome::Hybrid),
        ("failed", Outcome::Inconclusive),
        ("too_few_tokens", Outcome::Inconclusive),
        ("perturbed", Outcome::NativePreferred),
    ] {
        let v = judge(&state(&events_fixture(name)), &relative);
        assert_eq!(v.outcome, want, "{name}: {:#?}", v.reasons);
        assert!(!v.criteria.is_empty());
        assert!(v.criteria.iter().all(|c| !c.label.is_empty()));
    }
    let seed = Profile::load("seed").unwrap();
    let v = judge(&state(&events_fixture("seed_numbers")), &seed);
    assert_eq!(v.outcome, Outcome::NativePreferred);
    assert!(
        v.reasons.iter().any(|r| r.contains("0.3 tok/s")),
        "{:?}",
        v.reasons
    );
}

#[test]
fn each_criterion_is_measured_and_judged() {
    let relative = Profile::load("relative").unwrap();
    let v = judge(&state(&events_fixture("perturbed")), &relative);
    let get = |metric: &str, group: &str| {
        v.criteria
            .iter()
            .find(|c| c.metric == metric && c.group == group)
            .unwrap_or_else(|| panic!("{metric}/{group}"))
            .clone()
    };
    assert_eq!(get("memory_reduction_pct", "viable").pass, Some(true));
    assert_eq!(get("speed_ratio", "viable").pass, Some(true));
    let agree = get("token_agreement_pct", "viable");
    assert_eq!(agree.pass, Some(false));
    assert!(
        (agree.measured.unwrap() - 20.0).abs() < 1e-9,
        "diverging at token 6 of 30"
    );
    assert_eq!(get("mean_kl", "viable").pass, Some(false));
    let ppl = get("perplexity_increase_pct", "native_preferred");
    assert_eq!(
        ppl.pass,
        Some(false),
        "a 30 % perplexity increase holds against selective"
    );
    assert!((ppl.measured.unwrap() - 30.0).abs() < 1e-9);
    // Seed profile criteria on the seed project's numbers.
    let seed = Profile::load("seed").unwrap();
    let v = judge(&state(&events_fixture("seed_numbers")), &seed);
    let mem = v
        .criteria
        .iter()
        .find(|c| c.metric == "selective_peak_gb")
        .unwrap();
    assert!((mem.measured.unwrap() - 9500.0 * 1048576.0 / 1e9).abs() < 1e-6);
    assert_eq!(mem.pass, Some(true));
    let coh = v
        .criteria
        .iter()
        .find(|c| c.metric == "coherence_ratio_pct")
        .unwrap();
    assert_eq!(coh.measured, Some(100.0), "fluent outputs are coherent");
}

#[test]
fn degraded_runs_are_never_plainly_viable() {
    let v = judge(
        &state(&events_fixture("degraded")),
        &Profile::load("relative").unwrap(),
    );
    assert!(v.degraded);
    assert!(v.headline.contains("DEGRADED"), "{}", v.headline);
    assert_ne!(v.headline, "VIABLE");
}

#[test]
fn export_json_matches_schema_for_every_fixture_and_the_demo() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture("events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recordings/demo-tiny-moe.ndjson"));
    for f in files {
        let (rc, out, err) = run(&["export", f.to_str().unwrap()]);
        assert_eq!(rc, 0, "{}: {err}", f.display());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        validate(&v);
        for k in [
            "memory_reduction_pct",
            "speed_ratio",
            "native_coherence_pct",
            "sage_coherence_pct",
        ] {
            assert!(
                v["comparison"].get(k).is_some(),
                "{}: comparison.{k}",
                f.display()
            );
        }
    }
}

#[test]
fn schema_rejects_a_broken_summary() {
    let s = state(&events_fixture("viable"));
    let mut v = serde_json::to_value(summarize(&s, &Profile::load("relative").unwrap())).unwrap();
    validate(&v);
    v["comparison"]
        .as_object_mut()
        .unwrap()
        .remove("speed_ratio");
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    assert!(
        !jsonschema::validator_for(&schema).unwrap().is_valid(&v),
        "the schema really checks"
    );
}

#[test]
fn export_rejudges_under_another_profile_and_writes_markdown() {
    let f = events_fixture("seed_numbers");
    let (_, out, _) = run(&["export", f.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["verdict"]["profile"], "seed",
        "recorded profile by default"
    );
    let (_, out, _) = run(&["export", f.to_str().unwrap(), "--profile", "relative"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"]["profile"], "relative");
    let tmp = tempfile::tempdir().unwrap();
    let md = tmp.path().join("s.md");
    let (rc, _, err) = run(&[
        "export",
        f.to_str().unwrap(),
        "--format",
        "markdown",
        "-o",
        md.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{err}");
    let text = std::fs::read_to_string(&md).unwrap();
    for needle in [
        "## Verdict",
        "NATIVE PREFERRED",
        "## Prompts",
        "## Sample outputs",
        "memory reduction",
    ] {
        assert!(text.contains(needle), "{needle}");
    }
    // A profile file works, and a bad one is explained.
    let prof = tmp.path().join("p.toml");
    std::fs::write(
        &prof,
        moescope::session::verdict::BUILTIN[0]
            .1
            .replace("value = 0.5", "value = 0.01"),
    )
    .unwrap();
    let (rc, _, _) = run(&[
        "export",
        f.to_str().unwrap(),
        "--profile",
        prof.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0);
    std::fs::write(&prof, "version = 1\nname='x'\ndescription=''\nmin_decode_tokens=1\nnative_preferred=[]\n[hybrid]\nenabled=false\nshort_max_new_tokens=1\n[[viable]]\nmetric='vibes'\nop='>'\nvalue=1\nlabel='good vibes'").unwrap();
    let (rc, _, err) = run(&[
        "export",
        f.to_str().unwrap(),
        "--profile",
        prof.to_str().unwrap(),
    ]);
    assert_eq!(rc, 2);
    assert!(
        err.contains("vibes") && err.contains("unknown metric"),
        "{err}"
    );
}

#[test]
fn torn_last_line_is_tolerated_and_bad_files_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(events_fixture("viable")).unwrap();
    let torn = tmp.path().join("torn.ndjson");
    std::fs::write(&torn, &src[..src.len() - 30]).unwrap();
    let r = record::read(&torn).unwrap();
    assert!(r.truncated_tail);
    let (rc, _, err) = run(&["export", torn.to_str().unwrap()]);
    assert_eq!(rc, 0);
    assert!(err.contains("incomplete"), "{err}");
    // Corruption in the middle is an error naming the line.
    let mut lines: Vec<&str> = src.lines().collect();
    lines[5] = "{not json";
    let bad = tmp.path().join("bad.ndjson");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let (rc, _, err) = run(&["export", bad.to_str().unwrap()]);
    assert_eq!(rc, 2);
    assert!(err.contains("line 6"), "{err}");
    let notrec = tmp.path().join("x.ndjson");
    std::fs::write(&notrec, "{\"hello\": 1}\n").unwrap();
    let (rc, _, err) = run(&["replay", "--no-tui", notrec.to_str().unwrap()]);
    assert_eq!(rc, 2);
    assert!(err.contains("not a moescope recording"), "{err}");
}

#[test]
fn live_summary_equals_the_replayed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("live.ndjson");
    let out = moescope_ok(&[
        "run",
        "--no-tui",
        "--record",
        rec.to_str().unwrap(),
        "--prompts",
        "prompts/standard.toml",
        "--max-new-tokens",
        "12",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("recording: ") && stdout.contains("summary: "),
        "{stdout}"
    );
    assert!(
        stdout.contains("native") && stdout.contains("prompt 6/6"),
        "a progress line per prompt per backend"
    );
    let live: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("live.summary.json")).unwrap(),
    )
    .unwrap();
    let (rc, replayed, _) = run(&["export", rec.to_str().unwrap()]);
    assert_eq!(rc, 0);
    let replayed: serde_json::Value = serde_json::from_str(&replayed).unwrap();
    assert_eq!(live, replayed, "the same events give the same state");
    validate(&live);
    // Bit-identical backends: full agreement, zero KL, equal perplexity.
    assert_eq!(live["quality"]["token_agreement_pct"], 100.0);
    assert_eq!(live["quality"]["mean_kl"], 0.0);
    assert_eq!(live["quality"]["perplexity_increase_pct"], 0.0);
    assert_eq!(live["backends"]["native"]["prompts_done"], 6);
    assert_eq!(live["backends"]["selective"]["prompts_done"], 6);
    assert!(
        live["backends"]["selective"]["cache_hit_rate"]
            .as_f64()
            .is_some()
    );
}

#[test]
fn a_perturbed_backend_is_caught_by_agreement_kl_and_perplexity() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("masked.ndjson");
    // The hidden testing aid masks one expert of layer 2 out of selective's routing.
    moescope_ok(&[
        "run",
        "--no-tui",
        "--record",
        rec.to_str().unwrap(),
        "--mask-experts",
        "2:7",
    ]);
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("masked.summary.json")).unwrap(),
    )
    .unwrap();
    let q = &v["quality"];
    assert_eq!(v["degraded"], true);
    assert!(
        q["token_agreement_pct"].as_f64().unwrap() < 99.0,
        "agreement: {q}"
    );
    assert!(q["mean_kl"].as_f64().unwrap() > 0.001, "KL: {q}");
    assert!(
        q["top1_agreement_pct"].as_f64().unwrap() < 100.0,
        "top-1: {q}"
    );
    let (pn, ps) = (
        q["native_perplexity"].as_f64().unwrap(),
        q["selective_perplexity"].as_f64().unwrap(),
    );
    assert!(
        ((ps - pn) / pn).abs() > 0.001,
        "perplexity differs: {pn} vs {ps}"
    );
    let crit = v["verdict"]["criteria"].as_array().unwrap();
    for metric in ["token_agreement_pct", "mean_kl", "perplexity_delta_pct"] {
        let c = crit
            .iter()
            .find(|c| c["metric"] == metric && c["group"] == "viable")
            .unwrap();
        assert_eq!(c["pass"], false, "{metric} flags the perturbed backend");
    }
    assert!(
        v["verdict"]["headline"]
            .as_str()
            .unwrap()
            .contains("DEGRADED")
    );
    assert_ne!(v["verdict"]["outcome"], "VIABLE");
}

#[test]
fn status_is_reduced_from_events() {
    let s = state(&events_fixture("failed"));
    assert!(matches!(
        s.backend(Backend::Selective).status,
        Status::Failed(_)
    ));
    assert_eq!(s.backend(Backend::Native).status, Status::Done);
    assert_eq!(s.finished.as_deref(), Some("completed"));
}

#[test]
fn simulation_reproduces_the_live_cache_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, flags) in [
        vec!["--cache-experts", "48", "--policy", "lru"],
        vec![
            "--cache-experts",
            "30",
            "--policy",
            "s3fifo",
            "--cache-scope",
            "layer",
        ],
        vec!["--cache-experts", "100", "--policy", "lfu"],
        vec!["--cache-experts", "48", "--policy", "next-use"],
    ]
    .into_iter()
    .enumerate()
    {
        let rec = tmp.path().join(format!("sim{i}.ndjson"));
        // Demand loading only: with prefetch the live hits depend on timing.
        let mut args = vec![
            "run",
            "--no-tui",
            "--prefetch",
            "none",
            "--record",
            rec.to_str().unwrap(),
            "--max-new-tokens",
            "20",
        ];
        args.extend(flags.iter().copied());
        moescope_ok(&args);
        let (rc, json, err) = run(&[
            "simulate",
            rec.to_str().unwrap(),
            "--json",
            "--capacities",
            "10%,50%",
        ]);
        assert_eq!(rc, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let c = &v["live_check"];
        assert_eq!(c["live_hits"], c["simulated_hits"], "{flags:?}: {c}");
        assert_eq!(c["live_misses"], c["simulated_misses"], "{flags:?}: {c}");
        assert!(c["live_hits"].as_u64().unwrap() + c["live_misses"].as_u64().unwrap() > 100);
        // Belady bounds every policy at every capacity.
        let pts = v["study"]["points"].as_array().unwrap();
        for p in pts {
            let opt = pts
                .iter()
                .find(|q| q["policy"] == "belady" && q["capacity"] == p["capacity"])
                .unwrap();
            assert!(p["hit_rate"].as_f64().unwrap() <= opt["hit_rate"].as_f64().unwrap() + 1e-12);
        }
        // A trace exported from the recording gives the same study.
        let trace = tmp.path().join(format!("sim{i}.trace"));
        let (rc, _, _) = run(&[
            "export",
            rec.to_str().unwrap(),
            "--format",
            "trace",
            "-o",
            trace.to_str().unwrap(),
        ]);
        assert_eq!(rc, 0);
        let (_, json2, _) = run(&[
            "simulate",
            trace.to_str().unwrap(),
            "--json",
            "--capacities",
            "10%,50%",
            "--scope",
            flags
                .iter()
                .position(|f| *f == "layer")
                .map(|_| "layer")
                .unwrap_or("global"),
        ]);
        let v2: serde_json::Value = serde_json::from_str(&json2).unwrap();
        assert_eq!(v["study"]["points"], v2["study"]["points"]);
    }
}

#[test]
fn sweep_measures_each_capacity_next_to_the_simulation() {
    let (text, v) = sweep(&[
        "--prefetch",
        "none",
        "--capacities",
        "25%,100%",
        "--max-new-tokens",
        "16",
    ]);
    assert!(
        text.contains("predicted") && text.contains("sim hit"),
        "{text}"
    );
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        // Greedy decoding is deterministic, so the selective run routes as native's trace did.
        assert!(
            (r["measured_hit_rate"].as_f64().unwrap() - r["simulated_hit_rate"].as_f64().unwrap())
                .abs()
                < 1e-12,
            "{r}"
        );
        assert!(r["measured_decode_tok_s"].as_f64().unwrap() > 0.0);
        assert!(r["predicted_decode_tok_s"].as_f64().unwrap() > 0.0);
        assert!(r["peak_memory"].as_u64().unwrap() > 0);
    }
    assert!(rows[0]["expected_weights"].as_u64() < rows[1]["expected_weights"].as_u64());
}

/// A run with prefetch exports its guessing accuracy (and one without does not invent any),
/// computed from the cache's own counters; its trace carries the guesses, so `simulate`
/// replays them and scores them exactly as the live cache did.
#[test]
fn export_reports_prefetch_precision_and_recall() {
    let tmp = tempfile::tempdir().unwrap();
    let mut live_accuracy = None;
    for prefetch in [true, false] {
        let rec = tmp.path().join(format!("pf-{prefetch}.ndjson"));
        let mut args = vec![
            "run",
            "--no-tui",
            "--no-score",
            "--record",
            rec.to_str().unwrap(),
            "--max-new-tokens",
            "16",
            "--cache-experts",
            "48",
        ];
        args.extend(["--prefetch", if prefetch { "next-layer" } else { "none" }]);
        moescope_ok(&args);
        let (rc, json, err) = run(&["export", rec.to_str().unwrap(), "--format", "json"]);
        assert_eq!(rc, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let sel = &v["backends"]["selective"];
        for key in ["prefetch_precision", "prefetch_recall", "prefetch_late"] {
            if prefetch {
                let x = sel[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{key} missing: {sel}"));
                // Late guesses may be none at all; a guess is right sometimes.
                let floor = if key == "prefetch_late" {
                    0.0
                } else {
                    f64::MIN_POSITIVE
                };
                assert!(x >= floor && x <= 1.0, "{key} = {x}");
            } else {
                assert!(sel.get(key).is_none(), "{key} without prefetch: {sel}");
            }
        }
        let (rc, md, _) = run(&["export", rec.to_str().unwrap(), "--format", "markdown"]);
        assert_eq!(rc, 0);
        assert_eq!(md.contains("prefetch precision / recall"), prefetch, "{md}");
        assert_eq!(md.contains("prefetch guesses too late"), prefetch, "{md}");
        let r = rec.to_str().unwrap();
        if prefetch {
            // Replayed by default (the run prefetched), scored like the live cache scored it.
            let v = simulate_json(&[r, "--capacities", "48"]);
            assert_eq!(v["study"]["prefetch"], true, "{v}");
            let acc = (
                v["study"]["guess_precision"].as_f64().unwrap(),
                v["study"]["guess_recall"].as_f64().unwrap(),
            );
            let live = (
                sel["prefetch_precision"].as_f64().unwrap(),
                sel["prefetch_recall"].as_f64().unwrap(),
            );
            assert!(
                (acc.0 - live.0).abs() < 1e-9 && (acc.1 - live.1).abs() < 1e-9,
                "trace {acc:?} vs live {live:?}"
            );
            live_accuracy = Some(acc);
            let p = &v["study"]["points"][0];
            assert!(
                p["prefetch_loads_per_decode_token"].as_f64().unwrap() > 0.0,
                "{p}"
            );
            // `--prefetch none` turns the replay off.
            let v = simulate_json(&[r, "--capacities", "48", "--prefetch", "none"]);
            assert_eq!(v["study"]["prefetch"], false);
            assert!(v["study"]["points"][0]["prefetch_loads_per_decode_token"].is_null());
        } else {
            // No guesses in this trace: asking for the replay is a clear input error.
            let (rc, _, err) = run(&["simulate", r, "--prefetch", "next-layer"]);
            assert_eq!(rc, 2, "{err}");
            assert!(
                err.contains(r) && err.contains("--trace-guesses"),
                "the error names the file and the fix: {err}"
            );
        }
    }
    // Guesses recorded without prefetch (`--trace-guesses`), by native as well: the same
    // routing and the same guesses, so the same accuracy.
    let rec = tmp.path().join("guesses.ndjson");
    let r = rec.to_str().unwrap();
    moescope_ok(&[
        "run",
        "--no-tui",
        "--no-score",
        "--record",
        r,
        "--max-new-tokens",
        "16",
        "--cache-experts",
        "48",
        "--prefetch",
        "none",
        "--trace-guesses",
    ]);
    let v = simulate_json(&[r, "--capacities", "48", "--prefetch", "next-layer"]);
    let acc = (
        v["study"]["guess_precision"].as_f64().unwrap(),
        v["study"]["guess_recall"].as_f64().unwrap(),
    );
    assert_eq!(Some(acc), live_accuracy);
}

/// `moescope sweep ARGS -o FILE`: what it printed, and the JSON it wrote.
fn sweep(args: &[&str]) -> (String, serde_json::Value) {
    let tmp = tempfile::tempdir().unwrap();
    let out_json = tmp.path().join("sweep.json");
    let mut a = vec!["sweep", "-o", out_json.to_str().unwrap()];
    a.extend_from_slice(args);
    let out = moescope_ok(&a);
    let v = serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), v)
}

fn simulate_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["simulate", "--json"];
    a.extend_from_slice(args);
    let (rc, out, err) = run(&a);
    assert_eq!(rc, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// `moescope export … | head` ends like a Unix filter when the reader goes away: killed by
/// SIGPIPE, no panic message.
#[test]
fn output_commands_end_quietly_on_a_closed_pipe() {
    use std::os::unix::process::ExitStatusExt;
    // The reader is gone before the child starts: closing it after the spawn raced the child,
    // which could write its whole output (25 KB) into the pipe's buffer first and exit 0.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = std::process::Command::new(bin())
        .args([
            "export",
            "recordings/demo-tiny-moe.ndjson",
            "--format",
            "trace",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {err}",
        out.status
    );
}

/// Runs the binary from the repository root and insists that it succeeded.
fn moescope_ok(args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(bin())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moescope {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// On a discrete GPU the selective worker can hold more host memory than native (the expert
/// files it registered for direct copies) while holding far less GPU memory: `relative` counts
/// both and prefers native on memory; `discrete-gpu` counts the GPU alone and finds selective
/// viable. Without GPU figures its memory criteria are reported as not measured.
#[test]
fn discrete_gpu_profile_counts_gpu_memory_alone() {
    use moescope::session::event::{GpuSource, SessionEvent};
    const GIB: u64 = 1 << 30;
    let rec = record::read(&events_fixture("viable")).unwrap();
    let on_gpu = |rss: u64, gpu: u64| {
        let mut s = SessionState::new(rec.header.clone());
        for e in &rec.events {
            let mut e = e.clone();
            if let SessionEvent::Memory { backend, sample } = &mut e.event {
                let (host, dev) = match backend {
                    Backend::Native => (GIB, 12 * GIB),
                    Backend::Selective => (rss, gpu),
                };
                sample.rss_anon = host;
                sample.rss_file = 0;
                sample.rss_shmem = 0;
                sample.gpu = Some(dev);
                sample.gpu_source = Some(GpuSource::NvmlProcess);
            }
            s.apply(&e);
        }
        s
    };
    // Selective: 11 GiB of host memory (10 of them registered files), 4 GiB of GPU memory.
    let s = on_gpu(11 * GIB, 4 * GIB);
    let c = comparison(&s);
    assert!((c.memory_reduction_pct.unwrap() - (13.0 - 15.0) / 13.0 * 100.0).abs() < 1e-9);
    assert!((c.gpu_memory_reduction_pct.unwrap() - (12.0 - 4.0) / 12.0 * 100.0).abs() < 1e-9);
    let relative = judge(&s, &Profile::load("relative").unwrap());
    assert_eq!(
        relative.outcome,
        Outcome::NativePreferred,
        "{:#?}",
        relative.reasons
    );
    let gpu = judge(&s, &Profile::load("discrete-gpu").unwrap());
    assert_eq!(gpu.outcome, Outcome::Viable, "{:#?}", gpu.reasons);
    // The CPU fixture has no GPU figures: nothing to judge memory by.
    let cpu = state(&events_fixture("viable"));
    assert_eq!(comparison(&cpu).gpu_memory_reduction_pct, None);
    let v = judge(&cpu, &Profile::load("discrete-gpu").unwrap());
    assert_ne!(v.outcome, Outcome::Viable);
    assert!(
        v.reasons.iter().any(|r| r.contains("not measured")),
        "{:#?}",
        v.reasons
    );
}

/// A GGUF file's block experts on a CPU where candle repacks them (Q8_0 with VNNI, aarch64):
/// candle packs each new matrix at its first product, outside the load the cache times, so the
/// sweep fits a miss's cost on its smallest cache (marked, left out of the error) and predicts
/// the others with it — as for a safetensors model's mapped misses (bf16 experts in bf16 or
/// f32). Where moescope's own products take every expert type (Q4_K and Q6_K on AVX2, no
/// VNNI) nothing is packed: the measured cost, and every row a prediction. Misses that are
/// read keep the measured cost.
#[test]
fn a_gguf_sweep_on_the_cpu_fits_its_miss_cost_where_candle_repacks() {
    let gguf = fixture("gguf").join("kquant-Q4_K_M.gguf");
    let (text, v) = sweep(&[
        "--model",
        gguf.to_str().unwrap(),
        "--prefetch",
        "none",
        "--capacities",
        "25%,50%",
        "--max-new-tokens",
        "12",
    ]);
    let rows = v["rows"].as_array().unwrap();
    assert!(rows[1]["prediction_error_pct"].as_f64().is_some(), "{v}");
    if moescope::model::gguf::experts_repacked_on_cpu(&gguf) {
        assert!(text.contains("fitted on the row marked calib"), "{text}");
        let fitted = v["fitted_miss_cost_us"]
            .as_f64()
            .expect("fitted on a GGUF file");
        let measured = v["mean_miss_cost_us"].as_f64().unwrap();
        assert!(fitted >= measured, "{fitted} < {measured}");
        assert_eq!(rows[0]["calibration"], true);
        assert!(rows[0]["prediction_error_pct"].is_null());
    } else {
        assert!(!text.contains("calib"), "{text}");
        assert!(v.get("fitted_miss_cost_us").is_none(), "{v}");
        assert!(rows[0].get("calibration").is_none(), "{v}");
        assert!(rows[0]["prediction_error_pct"].as_f64().is_some(), "{v}");
    }
    // The bundled model's bf16 experts in f16: read, converted and kept — the measured cost.
    let (_, v) = sweep(&[
        "--prefetch",
        "none",
        "--dtype",
        "f16",
        "--capacities",
        "25%,50%",
        "--max-new-tokens",
        "8",
    ]);
    assert!(v.get("fitted_miss_cost_us").is_none(), "{v}");
    assert!(v["rows"][0].get("calibration").is_none(), "{v}");
    // In f32 (the default) they are held as stored and mapped: fitted, as GGUF's are.
    let (_, v) = sweep(&[
        "--prefetch",
        "none",
        "--capacities",
        "25%,50%",
        "--max-new-tokens",
        "8",
    ]);
    assert!(v["fitted_miss_cost_us"].as_f64().is_some(), "{v}");
    assert_eq!(v["rows"][0]["calibration"], true, "{v}");
}

/// With prefetch the sweep replays the guesses its first selective run recorded, fits what a
/// load ahead costs on the smallest cache (marked, and left out of the error), and predicts
/// the other capacities with it.
#[test]
fn a_prefetch_sweep_calibrates_loads_ahead_on_its_smallest_cache() {
    let (text, v) = sweep(&[
        "--capacities",
        "12.5%,50%",
        "--prefetch",
        "next-layer",
        "--max-new-tokens",
        "12",
    ]);
    assert!(text.contains("calib"), "{text}");
    assert_eq!(v["prefetch"], true);
    let ahead = v["load_ahead_us"].as_f64().expect("load_ahead_us fitted");
    assert!(ahead >= 0.0, "{ahead}");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows[0]["calibration"], true);
    assert!(rows[0]["prediction_error_pct"].is_null());
    assert!(rows[1].get("calibration").is_none());
    assert!(rows[1]["prediction_error_pct"].as_f64().is_some());
    for r in rows {
        // The guesses were replayed: loads ahead are counted.
        assert!(
            r["simulated"]["decode_prefetch_loads"].as_u64().unwrap() > 0,
            "{r}"
        );
    }
    let mean = v["mean_prediction_error_pct"].as_f64().unwrap();
    let e1 = rows[1]["prediction_error_pct"].as_f64().unwrap();
    assert!(
        (mean - e1).abs() < 1e-9,
        "the mean leaves the calibration row out"
    );
}

/// `--prefetch auto` (the default) prefetches on a CPU with 4 or more cores and not on fewer;
/// the recording says which ran.
#[test]
fn auto_prefetch_follows_the_core_count() {
    let tmp = tempfile::tempdir().unwrap();
    for (cores, on) in [("2", false), ("8", true)] {
        let rec = tmp.path().join(format!("auto{cores}.ndjson"));
        let out = std::process::Command::new(bin())
            .args([
                "run",
                "--no-tui",
                "--no-score",
                "--reference",
                "none",
                "--max-new-tokens",
                "8",
                "--record",
                rec.to_str().unwrap(),
            ])
            .env("MOESCOPE_TEST_CORES", cores)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = moescope::session::record::read(&rec).unwrap();
        assert_eq!(r.header.cache.prefetch.is_on(), on, "{cores} cores");
        assert_eq!(
            r.header
                .cache_describe
                .contains("prefetch next-layer (auto)"),
            on,
            "{}",
            r.header.cache_describe
        );
        let (rc, json, _) = run(&["export", rec.to_str().unwrap()]);
        assert_eq!(rc, 0);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["backends"]["selective"]["prefetch_recall"].is_f64(),
            on,
            "{cores} cores"
        );
    }
}

/// The MOESCOPE_* knobs are read once, go into the recording's header as typed settings, and the
/// export names the ones that differ from the defaults; a value a knob cannot take stops the
/// program before anything runs, naming the variable.
#[test]
fn settings_are_recorded_and_a_bad_knob_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("knobs.ndjson");
    let args = [
        "run",
        "--no-tui",
        "--record",
        rec.to_str().unwrap(),
        "--prompt",
        "What is a cache?",
        "--max-new-tokens",
        "3",
        "--no-score",
        "--reference",
        "none",
    ];
    let out = std::process::Command::new(bin())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("MOESCOPE_SPECULATE", "last")
        .env("MOESCOPE_CUDA_GRAPHS", "0")
        .env("MOESCOPE_TEST_CORES", "3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = moescope::session::record::read(&rec).unwrap().header;
    let s = header.settings.expect("the header records the settings");
    assert_eq!(
        s.speculate,
        moescope::cache::speculation::Rule::AfterCleanStep
    );
    assert!(!s.cuda_graphs);
    assert_eq!(s.cores, 3);
    let (rc, json, _) = run(&["export", rec.to_str().unwrap()]);
    assert_eq!(rc, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    validate(&v);
    assert_eq!(
        v["session"]["settings"],
        "CUDA graphs off, speculation last"
    );
    // A recording made before settings were recorded says nothing of them.
    let demo =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recordings/demo-tiny-moe.ndjson");
    let (_, json, _) = run(&["export", demo.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["session"].get("settings").is_none());
    // A bad value: exit 2, the variable and what it takes named, no recording made.
    let bad = tmp.path().join("bad.ndjson");
    let out = std::process::Command::new(bin())
        .args(["run", "--no-tui", "--record", bad.to_str().unwrap()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("MOESCOPE_H2D", "dma")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("MOESCOPE_H2D") && err.contains("direct, staged or auto"),
        "{err}"
    );
    assert!(!bad.exists());
}

/// A Thinking checkpoint's outputs (the fixture's template opened `<think>`): reasoning and
/// answer counted apart, token agreement over each part, coherence of each, and the export and
/// its tables saying so.
#[test]
fn reasoning_and_answer_are_counted_and_compared_apart() {
    let s = state(&events_fixture("thinking"));
    let sum = summarize(&s, &Profile::load("relative").unwrap());
    let v = serde_json::to_value(&sum).unwrap();
    validate(&v);
    // 25 tokens: 17 words of reasoning and `</think>`, then 7 of answer.
    for p in &sum.prompts {
        let t = p.native.as_ref().unwrap().thinking.as_ref().unwrap();
        assert_eq!(
            (t.thinking_tokens, t.answer_tokens),
            (18, 7),
            "prompt {}",
            p.index
        );
        assert!(
            t.thinking_text.starts_with("The user asks"),
            "{}",
            t.thinking_text
        );
        assert!(!t.thinking_text.contains("think>"), "{}", t.thinking_text);
        assert_eq!(t.answer_text, "The capital of France is Paris .");
        assert!(t.answer_coherence.coherent && t.thinking_coherence.coherent);
    }
    let agree = |i: usize| {
        let p = &sum.prompts[i];
        let (t, a) = (
            p.thinking_agreement.as_ref().unwrap(),
            p.answer_agreement.as_ref().unwrap(),
        );
        (
            t.identical_pct,
            t.first_divergence,
            a.identical_pct,
            a.first_divergence,
        )
    };
    assert_eq!(agree(0), (100.0, None, 100.0, None));
    // Prompt 1 diverges in the answer (token 19): the reasoning is intact.
    let (t, td, a, ad) = agree(1);
    assert_eq!((t, td, ad), (100.0, None, Some(19)));
    assert!((a - 100.0 / 7.0).abs() < 1e-9, "{a}");
    // Prompt 2 diverges in the reasoning (token 4) and selective never closes it: all of its
    // 25 tokens are reasoning, none of native's answer is matched.
    let (t, td, a, ad) = agree(2);
    assert!((t - 400.0 / 18.0).abs() < 1e-9, "{t}");
    assert_eq!((td, a, ad), (Some(4), 0.0, Some(18)));
    let sel = sum.prompts[2]
        .selective
        .as_ref()
        .unwrap()
        .thinking
        .as_ref()
        .unwrap();
    assert_eq!((sel.thinking_tokens, sel.answer_tokens), (25, 0));
    let q = &sum.quality;
    let mean_t = (100.0 + 100.0 + 400.0 / 18.0) / 3.0;
    let mean_a = (100.0 + 100.0 / 7.0 + 0.0) / 3.0;
    assert!((q.thinking_token_agreement_pct.unwrap() - mean_t).abs() < 1e-9);
    assert!((q.answer_token_agreement_pct.unwrap() - mean_a).abs() < 1e-9);
    let table = moescope::report::table::summary_table(&sum);
    assert!(table.contains("reasoning / answer tokens"), "{table}");
    assert!(
        table.contains("54 / 21") && table.contains("61 / 14"),
        "{table}"
    );
    assert!(
        table.contains("in native's reasoning 74.1 % · in its answers 38.1 %"),
        "{table}"
    );
    let md = moescope::report::markdown::markdown(&sum);
    assert!(md.contains("*reasoning (18 tokens): The user asks"), "{md}");
    // An output without reasoning has none of it.
    let plain = summarize(
        &state(&events_fixture("viable")),
        &Profile::load("relative").unwrap(),
    );
    assert!(
        plain.prompts.iter().all(
            |p| p.thinking_agreement.is_none() && p.native.as_ref().unwrap().thinking.is_none()
        )
    );
    assert!(!moescope::report::table::summary_table(&plain).contains("reasoning"));
}

/// A Thinking checkpoint's template opens `<think>` in the generation prompt: the worker says
/// so when the prompt starts, and the reducer counts the output as reasoning. The same model
/// with its own template does not reason.
#[test]
fn a_template_that_opens_thinking_marks_the_output_as_reasoning() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-moe");
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::os::unix::fs::symlink(model.join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let template = cfg["chat_template"].as_str().unwrap().replace(
        "'<|im_start|>assistant\\n'",
        "'<|im_start|>assistant\\n<think>\\n'",
    );
    assert_ne!(
        template,
        cfg["chat_template"].as_str().unwrap(),
        "the template changed"
    );
    cfg["chat_template"] = template.into();
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    for (m, opens) in [(dir.path().to_path_buf(), true), (model.clone(), false)] {
        let rec = dir.path().join(format!("r-{opens}.ndjson"));
        let (rc, _, err) = run(&[
            "run",
            "--model",
            m.to_str().unwrap(),
            "--no-tui",
            "--prompt",
            "What is the sea?",
            "--max-new-tokens",
            "6",
            "--reference",
            "none",
            "--no-score",
            "--record",
            rec.to_str().unwrap(),
        ]);
        assert_eq!(rc, 0, "{err}");
        let r = record::read(&rec).unwrap();
        let started: Vec<bool> = r
            .events
            .iter()
            .filter_map(|e| match &e.event {
                moescope::session::SessionEvent::PromptStarted { opens_thinking, .. } => {
                    Some(*opens_thinking)
                }
                _ => None,
            })
            .collect();
        assert_eq!(started, [opens, opens]);
        let sum = summarize(&state(&rec), &Profile::load("relative").unwrap());
        let out = sum.prompts[0].native.as_ref().unwrap();
        match &out.thinking {
            // No `</think>` in this vocabulary: all six tokens are reasoning still open.
            Some(t) => assert!(opens && (t.thinking_tokens, t.answer_tokens) == (6, 0)),
            None => assert!(!opens),
        }
    }
}

/// A criterion within its own noise of its threshold is neither pass nor fail: selective's
/// per-prompt speed is 0.30, 0.80 and 0.45 of native's, so "at least half as fast" (measured
/// 0.44 over all tokens) and "under a fifth" are both unclear, and the verdict is INCONCLUSIVE
/// and says why. With the same speed on every prompt (the viable fixture) there is no noise.
#[test]
fn a_criterion_within_its_noise_of_the_threshold_is_unclear() {
    let profile = Profile::load("relative").unwrap();
    let v = judge(&state(&events_fixture("unclear_speed")), &profile);
    assert_eq!(v.outcome, Outcome::Inconclusive, "{v:#?}");
    let speed: Vec<_> = v
        .criteria
        .iter()
        .filter(|c| c.metric == "speed_ratio")
        .collect();
    assert_eq!(speed.len(), 2);
    let ratios = [0.3f64, 0.8, 0.45];
    let mean = ratios.iter().sum::<f64>() / 3.0;
    let sd = (ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    for c in &speed {
        assert!(c.unclear, "{c:#?}");
        // (The fixture's step times are rounded to microseconds.)
        assert!(
            (c.noise.unwrap() - 2.0 * sd / 3f64.sqrt()).abs() < 1e-4,
            "{c:#?}"
        );
    }
    assert!(
        v.reasons
            .iter()
            .any(|r| r.starts_with("unclear: decodes at least half as fast")),
        "{:#?}",
        v.reasons
    );
    // Memory and quality are clear of their thresholds: judged as usual.
    assert!(
        v.criteria
            .iter()
            .filter(|c| c.metric != "speed_ratio")
            .all(|c| !c.unclear)
    );
    let lines = moescope::report::table::verdict_lines(&v).join("\n");
    assert!(
        lines.contains("[unclr]") && lines.contains("± 0.2"),
        "{lines}"
    );
    let steady = judge(&state(&events_fixture("viable")), &profile);
    assert_eq!(steady.outcome, Outcome::Viable);
    assert!(
        steady
            .criteria
            .iter()
            .all(|c| !c.unclear && c.noise.is_none_or(|u| u < 1e-9))
    );
}

/// Peaks are the kernel's high-water marks (a transient between two samples counts), and
/// samples taken during moescope's own quality checks are graphed but never a peak.
#[test]
fn peaks_are_high_water_marks_and_quality_checks_are_left_out() {
    use moescope::session::event::{MemorySample, SessionEvent, Stamped};
    let rec = record::read(&events_fixture("viable")).unwrap();
    let mut s = SessionState::new(rec.header.clone());
    const MIB: u64 = 1 << 20;
    let sample = |rss: u64, hwm: u64, checking: bool| Stamped {
        t: 1.0,
        event: SessionEvent::Memory {
            backend: Backend::Selective,
            sample: MemorySample {
                rss_anon: rss * MIB,
                rss_file: 0,
                rss_shmem: 0,
                peak_rss: hwm * MIB,
                gpu: None,
                gpu_source: None,
                system_available: 0,
                source: "test".into(),
                checking,
            },
        },
    };
    s.apply(&sample(100, 150, false));
    assert_eq!(
        s.backends[1].mem_peak_total,
        150 * MIB,
        "the high-water mark counts"
    );
    s.apply(&sample(400, 400, true));
    assert_eq!(
        s.backends[1].mem_peak_total,
        150 * MIB,
        "a check's memory is not a peak"
    );
    assert_eq!(
        s.backends[1].mem_last.as_ref().unwrap().rss(),
        400 * MIB,
        "but it is shown"
    );
    s.apply(&sample(120, 130, false));
    assert_eq!(s.backends[1].mem_peak_total, 150 * MIB);
    s.apply(&sample(120, 170, false));
    assert_eq!(s.backends[1].mem_peak_total, 170 * MIB);
    assert_eq!(
        backend_metrics(&s, Backend::Selective).memory.peak,
        170 * MIB
    );
}
