//! scripts/hostile_inputs.py as a regression test: a fixed set of one-field mutations of the
//! fixtures (GGUF records and metadata, safetensors headers, scale tables, config and tokenizer
//! fields), each run through `generate` (native and selective) and `verify` — none may panic,
//! hang or fail without saying why. BENCHMARKS.md §107 has the long campaigns; this keeps a
//! short one on every build. The harness itself is checked first against a binary that panics.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn campaign(bin: &std::path::Path, rounds: u32, seed: u32, out: &std::path::Path) -> (i32, String) {
    let o = Command::new("python3")
        .arg(root().join("scripts/hostile_inputs.py"))
        .arg(bin)
        .args(["--rounds", &rounds.to_string(), "--seed", &seed.to_string()])
        .arg("--out")
        .arg(out)
        .output()
        .expect("python3 runs");
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn the_harness_reports_a_panicking_binary() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("panics");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"thread 'main' panicked at src/x.rs:1:1\" >&2\nexit 101\n",
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
    let (rc, out) = campaign(&fake, 3, 1, &dir.path().join("out"));
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("FINDING panic") && out.contains("3 findings"),
        "{out}"
    );
}

#[test]
fn mutated_fixtures_are_refused_or_run_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_moescope"));
    let (rc, out) = campaign(&bin, 40, 7, &dir.path().join("out"));
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("40 mutated inputs") && out.contains(", 0 findings"),
        "{out}"
    );
}
