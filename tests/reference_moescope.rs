//! `run --reference-impl moescope --reference-model DIR`: moescope native on the checkpoint a
//! quantized file was made from, as the run's reference — so a quantized run reports what its
//! quantization costs against the model's own weights. No Python needed.

mod common;

use std::path::PathBuf;

use common::*;
use moescope::session::state::SessionState;

fn repo(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .to_str()
        .unwrap()
        .to_string()
}

/// One headless run of the standard prompts, 8 tokens each; with `reference`, moescope's own
/// reference on that checkpoint. Returns (stdout, summary JSON, replayed session).
fn session(model: &str, reference: Option<&str>) -> (String, serde_json::Value, SessionState) {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("r.ndjson");
    let (model, rec_s) = (repo(model), rec.to_str().unwrap().to_string());
    let mut args = vec![
        "run",
        "--no-tui",
        "--model",
        &model,
        "--max-new-tokens",
        "8",
        "--reference",
        "none",
        "--record",
        &rec_s,
    ];
    let reference = reference.map(repo);
    if let Some(r) = &reference {
        args.extend(["--reference-impl", "moescope", "--reference-model", r]);
    }
    let (rc, out, err) = run(&args);
    assert_eq!(rc, 0, "{err}");
    let (sum, state) = summary_and_state(&rec);
    (out, sum, state)
}

/// The FP8 fixture against the bf16 checkpoint it was quantized from: the reference's tokens
/// are what native gives on the original (a run of its own), and the line says what FP8 costs —
/// some KL, not none, with the reference's own speed and memory.
#[test]
fn a_quantized_run_reports_its_cost_against_the_original() {
    let (out, sum, state) = session(
        "tests/fixtures/fp8/qwen3-moe-tiny-fp8",
        Some("tests/fixtures/qwen3-moe-tiny"),
    );
    let schema: serde_json::Value = serde_json::from_str(moescope::report::json::SCHEMA).unwrap();
    assert!(
        jsonschema::validator_for(&schema).unwrap().is_valid(&sum),
        "{sum}"
    );
    let r = &sum["reference"];
    assert!(r["unavailable"].is_null(), "{r}");
    let name = r["implementation"].as_str().unwrap();
    assert!(
        name.starts_with("moescope ") && name.contains("native on qwen3-moe-tiny (f32)"),
        "{name}"
    );
    let (mean, max) = (
        r["mean_kl"].as_f64().unwrap(),
        r["max_kl"].as_f64().unwrap(),
    );
    assert!(mean > 0.0 && mean <= max && max.is_finite(), "{r}");
    assert_eq!(r["exact"], true, "a small vocabulary: exact KL");
    let top1 = r["top1_agreement_pct"].as_f64().unwrap();
    assert!(top1 > 0.0 && top1 <= 100.0, "{r}");
    assert_eq!(r["first_divergence"].as_array().unwrap().len(), 6);
    assert!(r["routing_same_pct"].as_f64().is_some(), "{r}");
    assert!(r["peak_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(
        out.contains(&format!("moescope native matches {name}: mean KL")),
        "{out}"
    );
    assert_eq!(state.header.reference.as_deref(), Some("moescope"));

    // The original run as the backend: its native tokens are the reference's, prompt by prompt.
    let (_, _, original) = session("tests/fixtures/qwen3-moe-tiny", None);
    let reference = state.reference.as_ref().unwrap();
    for (p, r) in reference.prompts.iter().enumerate() {
        let r = r.as_ref().unwrap();
        let native = original.backends[0].runs[p].done.as_ref().unwrap();
        assert_eq!(r.text.concat(), native.text, "prompt {p}");
    }
    // And the FP8 run's own native did not give all of them: the cost is real.
    let differs = (0..6).any(|p| {
        state.backends[0].runs[p].done.as_ref().unwrap().text
            != original.backends[0].runs[p].done.as_ref().unwrap().text
    });
    assert!(differs || top1 < 100.0, "{r}");
}

/// The same checkpoint as its own reference: the same arithmetic, so no distance at all.
#[test]
fn the_checkpoint_itself_as_reference_is_exact() {
    let (_, sum, _) = session(
        "tests/fixtures/qwen3-moe-tiny",
        Some("tests/fixtures/qwen3-moe-tiny"),
    );
    let r = &sum["reference"];
    assert_eq!(r["mean_kl"].as_f64(), Some(0.0), "{r}");
    assert_eq!(r["max_kl"].as_f64(), Some(0.0), "{r}");
    assert_eq!(r["top1_agreement_pct"].as_f64(), Some(100.0), "{r}");
    assert_eq!(r["token_agreement_pct"].as_f64(), Some(100.0), "{r}");
    assert_eq!(r["routing_same_pct"].as_f64(), Some(100.0), "{r}");
    let div = r["first_divergence"].as_array().unwrap();
    assert!(div.iter().all(|d| d.is_null()), "{r}");
}

/// Requests that cannot work are refused before anything runs; a reference that cannot be
/// loaded, or of another vocabulary, is one line naming it, and the run goes on.
#[test]
fn bad_moescope_references_are_refused_or_reported() {
    let model = repo("tests/fixtures/qwen3-moe-tiny");
    let (rc, _, err) = run(&[
        "run",
        "--no-tui",
        "--model",
        &model,
        "--reference-impl",
        "moescope",
    ]);
    assert_eq!(rc, 2);
    assert!(
        err.contains("--reference-impl moescope runs moescope native on another checkpoint: give it --reference-model DIR"),
        "{err}"
    );
    let (rc, _, err) = run(&[
        "run",
        "--no-tui",
        "--model",
        &model,
        "--reference-model",
        &model,
    ]);
    assert_eq!(rc, 2);
    assert!(err.contains("give --reference-impl moescope"), "{err}");

    // The bundled model's vocabulary is not the fixture's.
    let (out, sum, _) = session("tests/fixtures/qwen3-moe-tiny", Some("models/tiny-moe"));
    let why = sum["reference"]["unavailable"].as_str().unwrap();
    assert!(
        why.contains("tiny-moe: its vocabulary has 4096 tokens, the model's 384"),
        "{why}"
    );
    assert!(out.contains("reference did not run"), "{out}");
    assert!(sum["verdict"]["outcome"].is_string());

    let (out, sum, _) = session("tests/fixtures/qwen3-moe-tiny", Some("no/such/model"));
    let why = sum["reference"]["unavailable"].as_str().unwrap();
    assert!(why.contains("no/such/model"), "{why}");
    assert!(out.contains("reference did not run"), "{out}");
}
