//! scripts/gpu_verdict.py (what `scripts/gpu_check.sh` exits with) judges a real H200 fidelity
//! result (2026-12-01, the build with the attention decode kernels): it passes, naming the one
//! bf16 tie it let through, and fails when any check is broken.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn judge(v: &Value) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fidelity.json");
    std::fs::write(&path, v.to_string()).unwrap();
    let out = Command::new("python3")
        .arg(root().join("scripts/gpu_verdict.py"))
        .arg(&path)
        .output()
        .expect("python3 runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn gpu_verdict_passes_the_h200_run_and_fails_each_broken_check() {
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/gpu/fidelity-h200-2026-12-01.json"))
            .unwrap();
    let good: Value = serde_json::from_str(&text).unwrap();
    let (rc, out) = judge(&good);
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("passed") && out.contains("seq 0 (f32 gap 0.0171"),
        "{out}"
    );

    // A top-1 flip where f32's two best logits are far apart.
    let mut v = good.clone();
    v["cases"][1]["top1_same_as_f32"] = Value::Bool(false);
    let (rc, out) = judge(&v);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("seq 1: top-1 differs"), "{out}");
    // bf16 error over twice transformers' own plus 2 %.
    let mut v = good.clone();
    v["cases"][0]["ours_bf16_vs_f32"] = serde_json::json!(1.0);
    assert_eq!(judge(&v).0, 1);
    // Selective not bit-identical to native, in prefill and in decode.
    let mut v = good.clone();
    v["selective"][3]["identical"] = Value::Bool(false);
    assert_eq!(judge(&v).0, 1);
    let mut v = good.clone();
    v["decode"][7]["identical"] = Value::Bool(false);
    assert_eq!(judge(&v).0, 1);
    // Decode (the attention kernels) over twice transformers' own bf16 error plus 2 %, and a
    // run without the decode comparison.
    let mut v = good.clone();
    v["decode_vs_hf"][1]["kernels_vs_f32"]["max"] = serde_json::json!(9.0);
    let (rc, out) = judge(&v);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("models/tiny-moe decode: error 9.000"), "{out}");
    let mut v = good.clone();
    v["decode_vs_hf"] = serde_json::json!([]);
    assert_eq!(judge(&v).0, 1);
    // A part that produced nothing, and a file that is not JSON.
    let mut v = good.clone();
    v["decode"] = serde_json::json!([]);
    assert_eq!(judge(&v).0, 1);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.json"), "{").unwrap();
    let out = Command::new("python3")
        .arg(root().join("scripts/gpu_verdict.py"))
        .arg(dir.path().join("f.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
