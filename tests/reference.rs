//! The reference implementation (`run --reference-impl transformers`): transformers on the same
//! weights and token ids, after both backends. Needs a Python with torch and transformers:
//! `MOESCOPE_REFERENCE_PYTHON`, else `target/reference-venv/bin/python3`
//! (`scripts/setup_reference_python.sh`, which CI runs).

mod common;

use std::path::PathBuf;

use common::*;
use moescope::session::state::SessionState;

fn python() -> PathBuf {
    let p = std::env::var_os("MOESCOPE_REFERENCE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/reference-venv/bin/python3")
        });
    let ok = std::process::Command::new(&p)
        .args(["-c", "import torch, transformers, safetensors"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import torch and transformers: run scripts/setup_reference_python.sh (or set \
         MOESCOPE_REFERENCE_PYTHON)",
        p.display()
    );
    p
}

fn run_with_reference(
    model: &str,
    python: &std::path::Path,
) -> (String, serde_json::Value, SessionState) {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("r.ndjson");
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(model);
    let (rc, out, err) = run(&[
        "run",
        "--no-tui",
        "--model",
        model.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--reference",
        "none",
        "--reference-impl",
        "transformers",
        "--python",
        python.to_str().unwrap(),
        "--record",
        rec.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{err}");
    let (sum, state) = summary_and_state(&rec);
    (out, sum, state)
}

/// moescope native against transformers in f32 on both fixture families and the bundled
/// model: the same greedy tokens, top-1 agreement 100 %, KL at f32 rounding (what the
/// fidelity tests' 1e-5 logit tolerance allows), the reference's own speed and memory shown.
#[test]
fn native_matches_transformers_on_fixtures_and_the_bundled_model() {
    let py = python();
    for model in [
        "tests/fixtures/qwen3-moe-tiny",
        "tests/fixtures/qwen3-omni-tiny",
        "models/tiny-moe",
    ] {
        let (out, sum, state) = run_with_reference(model, &py);
        // The dashboard's third column: named in the header from the start, and each prompt's
        // text decoded by moescope's tokenizer, one piece per token — native's text exactly,
        // since the tokens are the same.
        assert_eq!(state.header.reference.as_deref(), Some("transformers"));
        let reference = state.reference.as_ref().unwrap();
        for (p, r) in reference.prompts.iter().enumerate() {
            let r = r.as_ref().unwrap();
            let native = state.backends[0].runs[p].done.as_ref().unwrap();
            assert_eq!(r.text.len(), r.token_ids.len(), "{model} prompt {p}");
            assert_eq!(r.text.concat(), native.text, "{model} prompt {p}");
        }
        let schema: serde_json::Value =
            serde_json::from_str(moescope::report::json::SCHEMA).unwrap();
        assert!(
            jsonschema::validator_for(&schema).unwrap().is_valid(&sum),
            "{model}: {sum}"
        );
        let r = &sum["reference"];
        assert!(r["unavailable"].is_null(), "{model}: {r}");
        assert!(
            r["implementation"]
                .as_str()
                .unwrap()
                .starts_with("transformers "),
            "{r}"
        );
        assert!(r["mean_kl"].as_f64().unwrap() <= 1e-4, "{model}: {r}");
        assert!(r["max_kl"].as_f64().unwrap() <= 1e-3, "{model}: {r}");
        assert_eq!(
            r["exact"], true,
            "{model}: the vocabularies are small: exact KL"
        );
        assert_eq!(
            r["top1_agreement_pct"].as_f64(),
            Some(100.0),
            "{model}: {r}"
        );
        assert_eq!(
            r["token_agreement_pct"].as_f64(),
            Some(100.0),
            "{model}: {r}"
        );
        let div = r["first_divergence"].as_array().unwrap();
        assert_eq!(div.len(), 6, "{model}: every standard prompt compared");
        assert!(div.iter().all(|d| d.is_null()), "{model}: {r}");
        assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0);
        // Teacher-forced, transformers' routers pick native's experts at every (position,
        // MoE layer) — the same sets, not only the same tokens out.
        assert_eq!(r["routing_same_pct"].as_f64(), Some(100.0), "{model}: {r}");
        let pairs: usize = reference
            .prompts
            .iter()
            .flatten()
            .map(|p| p.routing.as_ref().unwrap().pairs)
            .sum();
        let moe_layers = state.header.moe.moe_layers.len();
        assert!(
            pairs >= 6 * 8 * moe_layers,
            "{model}: {pairs} pairs compared"
        );
        assert!(
            r["peak_bytes"].as_u64().unwrap() > 10 << 20,
            "{model}: a Python with torch"
        );
        assert!(
            out.contains("moescope native matches transformers"),
            "{out}"
        );
        // The verdict stays native against selective.
        assert!(
            sum["verdict"]["criteria"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| !c["label"].as_str().unwrap().contains("transformers"))
        );
    }
}

/// No Python, or one without torch: one line says so, the run goes on and is judged as usual.
#[test]
fn a_missing_reference_is_one_line_and_the_run_goes_on() {
    let (out, sum, _) = run_with_reference(
        "tests/fixtures/qwen3-moe-tiny",
        std::path::Path::new("/nonexistent/python3"),
    );
    assert!(
        out.contains("reference did not run: cannot start /nonexistent/python3"),
        "{out}"
    );
    assert!(
        sum["reference"]["unavailable"]
            .as_str()
            .unwrap()
            .contains("cannot start")
    );
    assert!(sum["verdict"]["outcome"].is_string());
    // A Python without torch names what is missing.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("python3");
    std::fs::write(&fake, "#!/bin/sh\nexec python3 -I -S \"$@\"\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (out, _, _) = run_with_reference("tests/fixtures/qwen3-moe-tiny", &fake);
    assert!(out.contains("torch is not installed"), "{out}");
}

/// Bad requests are refused before anything runs.
#[test]
fn bad_reference_requests_are_refused() {
    let (rc, _, err) = run(&["run", "--no-tui", "--reference-impl", "pytorch"]);
    assert_eq!(rc, 2);
    assert!(
        err.contains("--reference-impl pytorch: unknown reference implementation"),
        "{err}"
    );
    let (rc, _, err) = run(&[
        "run",
        "--no-tui",
        "--reference-impl",
        "transformers",
        "--no-score",
    ]);
    assert_eq!(rc, 2);
    assert!(err.contains("cannot be combined with --no-score"), "{err}");
}

/// `--reference-model` points transformers at another checkpoint: the FP8 fixture's bf16
/// original. transformers and moescope's own reference then measure the same thing — what FP8
/// costs against the original — and agree on it (two f32 implementations of the original).
#[test]
fn transformers_on_the_original_measures_what_moescope_measures() {
    let py = python();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fp8 = model.join("tests/fixtures/fp8/qwen3-moe-tiny-fp8");
    let original = model.join("tests/fixtures/qwen3-moe-tiny");
    let mut kl = Vec::new();
    for implementation in ["transformers", "moescope"] {
        let dir = tempfile::tempdir().unwrap();
        let (rc, _, err) = run(&[
            "run",
            "--no-tui",
            "--model",
            fp8.to_str().unwrap(),
            "--max-new-tokens",
            "8",
            "--reference",
            "none",
            "--reference-impl",
            implementation,
            "--reference-model",
            original.to_str().unwrap(),
            "--python",
            py.to_str().unwrap(),
            "--record",
            dir.path().join("r.ndjson").to_str().unwrap(),
        ]);
        assert_eq!(rc, 0, "{err}");
        let sum: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("r.summary.json")).unwrap(),
        )
        .unwrap();
        let r = &sum["reference"];
        assert!(
            r["implementation"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{implementation} ")),
            "{r}"
        );
        kl.push((
            r["mean_kl"].as_f64().unwrap(),
            r["top1_agreement_pct"].as_f64().unwrap(),
            r["token_agreement_pct"].as_f64().unwrap(),
        ));
    }
    let ((kt, tt, it), (km, tm, im)) = (kl[0], kl[1]);
    assert!(km > 0.0, "FP8 costs something: {kl:?}");
    assert!((kt - km).abs() <= 1e-4 + 1e-3 * km, "{kl:?}");
    assert_eq!((tt, it), (tm, im), "{kl:?}");
}
