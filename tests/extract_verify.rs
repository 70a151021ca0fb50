//! Extraction is resumable and ends byte-identical after a crash; verify finds exactly the
//! planted missing and corrupt experts in every layout it reads.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Every file under `dir` (relative path → BLAKE3 of its bytes).
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.insert(
                    rel,
                    blake3::hash(&std::fs::read(&p).unwrap())
                        .to_hex()
                        .to_string(),
                );
            }
        }
    }
    out
}

fn extract(model: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "extract",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn crash_then_resume_ends_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen3-omni-tiny");
    let clean = tmp.path().join("clean");
    let (rc, out, err) = extract(&model, &clean, &[]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        out.contains("extracted 24 of 24") && out.contains("MiB/s"),
        "{out}"
    );

    // A crash right after an expert file was renamed into place but before it was journalled.
    let crashed = tmp.path().join("crashed");
    let (rc, _, _) = extract(&model, &crashed, &["--abort-after", "7"]);
    assert_ne!(rc, 0, "the aborted run fails");
    assert!(
        !crashed.join("manifest.json").exists(),
        "no manifest before completion"
    );
    let (rc, _, err) = run(&["verify", crashed.to_str().unwrap()]);
    assert_eq!(rc, 1, "an interrupted extraction is incomplete: {err}");
    let (rc, out, err) = extract(&model, &crashed, &[]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        out.contains("(6 already done)"),
        "the journalled 6 are skipped: {out}"
    );
    assert_eq!(
        tree(&clean),
        tree(&crashed),
        "resumed extraction is byte-identical"
    );

    // A second run over a complete extraction does nothing.
    let (rc, out, _) = extract(&model, &crashed, &[]);
    assert_eq!(rc, 0);
    assert!(
        out.contains("extracted 0 of 24 experts (24 already done)"),
        "{out}"
    );
    assert_eq!(tree(&clean), tree(&crashed));
}

#[test]
fn kill_9_then_resume_ends_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen3-moe-tiny");
    let clean = tmp.path().join("clean");
    assert_eq!(extract(&model, &clean, &[]).0, 0);
    let killed = tmp.path().join("killed");
    let mut child = std::process::Command::new(bin())
        .args([
            "extract",
            "--model",
            model.to_str().unwrap(),
            "--out",
            killed.to_str().unwrap(),
            "--quiet",
            "--delay-ms",
            "40",
        ])
        .spawn()
        .unwrap();
    let journal = killed.join("manifest.partial.jsonl");
    let start = std::time::Instant::now();
    loop {
        let lines = std::fs::read_to_string(&journal)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if lines >= 4 || start.elapsed() > Duration::from_secs(20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("manifest.json").exists(),
        "killed before the end"
    );
    let (rc, out, err) = extract(&model, &killed, &[]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        !out.contains("(0 already done)"),
        "resumed, not restarted: {out}"
    );
    assert_eq!(tree(&clean), tree(&killed));
}

#[test]
fn verify_extracted_finds_planted_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("x");
    assert_eq!(extract(&fixture("qwen3-moe-tiny"), &dir, &[]).0, 0);
    let (rc, out, _) = run(&["verify", dir.to_str().unwrap()]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("COMPLETE: all 24 experts"), "{out}");
    // Plant: one missing file, one flipped byte, one truncated file.
    std::fs::remove_file(dir.join("experts/layer_002/expert_003.safetensors")).unwrap();
    let p = dir.join("experts/layer_003/expert_007.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0xff;
    std::fs::write(&p, b).unwrap();
    let p = dir.join("experts/layer_000/expert_001.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    let (rc, out, _) = run(&["verify", dir.to_str().unwrap()]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("layer 2: 3"), "missing listed: {out}");
    assert!(
        out.contains("layer 3 expert 7") && out.contains("BLAKE3"),
        "{out}"
    );
    assert!(out.contains("layer 0 expert 1"), "{out}");
    assert!(out.contains("INCOMPLETE"));
    let (rc, json, _) = run(&["verify", dir.to_str().unwrap(), "--json"]);
    assert_eq!(rc, 1);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let missing: usize = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["missing"].as_array().unwrap().len())
        .sum();
    assert_eq!(missing, 1);
}

#[test]
fn verify_seed_layout_lists_missing_and_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("seed");
    make_seed_layout(&fixture("qwen3-omni-tiny"), &dir, false);
    // No config.json in the seed dir: verify needs --model, and says so.
    let (rc, _, err) = run(&["verify", dir.to_str().unwrap()]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("--model"), "{err}");
    let m = fixture("qwen3-omni-tiny");
    let (rc, out, _) = run(&[
        "verify",
        dir.to_str().unwrap(),
        "--model",
        m.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("seed-project layout"));
    // The seed project's failure: a layer that lost experts (and its norms).
    for e in [1, 4, 6] {
        std::fs::remove_file(dir.join(format!(
            "experts/thinker_expert_{e:03}_layer_01.safetensors"
        )))
        .unwrap();
    }
    std::fs::remove_file(dir.join("norms/thinker_norms_layer_01.safetensors")).unwrap();
    let p = dir.join("experts/thinker_expert_002_layer_02.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 10]).unwrap();
    let (rc, out, _) = run(&[
        "verify",
        dir.to_str().unwrap(),
        "--model",
        m.to_str().unwrap(),
    ]);
    assert_eq!(rc, 1);
    assert!(out.contains("layer 1: 1, 4, 6"), "{out}");
    assert!(out.contains("layer 2 expert 2"), "{out}");
    assert!(
        out.contains("thinker.model.layers.1.input_layernorm.weight"),
        "{out}"
    );
    // Running on it: refused, naming the lost norm (experts can be allowed missing; norms not).
    let (rc, _, err) = run(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--backend",
        "selective",
        "--expert-source",
        &format!("seedlayout:{}", dir.display()),
        "--token-ids",
        "1,2",
        "--allow-missing-experts",
    ]);
    assert_eq!(rc, 2);
    assert!(
        err.contains("thinker.model.layers.1.input_layernorm.weight"),
        "{err}"
    );
}

#[test]
fn verify_checkpoint_counts_through_the_index() {
    let d = copy_fixture("qwen3-omni-tiny");
    let idx = d.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
    v["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("thinker.model.layers.1.mlp.experts.6.down_proj.weight");
    std::fs::write(&idx, v.to_string()).unwrap();
    let (rc, out, _) = run(&["verify", d.path().to_str().unwrap()]);
    assert_eq!(rc, 1);
    assert!(out.contains("layer 1: 6"), "{out}");
    assert!(out.contains("total        24       23        1"), "{out}");
}

#[test]
fn extraction_of_another_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("x");
    assert_eq!(extract(&fixture("qwen3-moe-tiny"), &dir, &[]).0, 0);
    let (rc, _, err) = extract(&fixture("qwen3-omni-tiny"), &dir, &[]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("different model"), "{err}");
    let (rc, _, err) = run(&[
        "generate",
        "--model",
        fixture("qwen3-omni-tiny").to_str().unwrap(),
        "--backend",
        "selective",
        "--expert-source",
        &format!("extracted:{}", dir.display()),
        "--token-ids",
        "1",
    ]);
    assert_eq!(rc, 2);
    assert!(err.contains("different model"), "{err}");
}

/// A write that fails part-way (here: a file where a layer's directory must go) stops every
/// writer, names the path, keeps what was journalled, and a rerun after the fix ends identical.
#[test]
fn failed_write_mid_extraction_keeps_the_journal_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen3-omni-tiny");
    let clean = tmp.path().join("clean");
    assert_eq!(extract(&model, &clean, &[]).0, 0);
    let out = tmp.path().join("blocked");
    std::fs::create_dir_all(out.join("experts")).unwrap();
    let blocker = out.join("experts/layer_002");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let (rc, _, err) = extract(&model, &out, &[]);
    assert_ne!(rc, 0, "the blocked run fails");
    assert!(err.contains("layer_002"), "the error names the path: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !out.join("manifest.json").exists(),
        "no manifest for a partial run"
    );
    std::fs::remove_file(&blocker).unwrap();
    let (rc, text, err) = extract(&model, &out, &[]);
    assert_eq!(rc, 0, "{err}");
    assert!(!text.contains("(0 already done)"), "resumed: {text}");
    let mut want = tree(&clean);
    let mut got = tree(&out);
    // The blocked run's journal is gone once the manifest is written; nothing else may differ.
    want.remove("manifest.partial.jsonl");
    got.remove("manifest.partial.jsonl");
    assert_eq!(want, got);
}

/// `dir`'s manifest, edited by `change`, written back.
fn edit_manifest(dir: &Path, change: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    change(&mut m);
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

/// The checkpoint's own copy with different weights and the same config (a fine-tune): every
/// 64th byte after the header flipped.
fn fine_tune_of(model: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    for e in std::fs::read_dir(model).unwrap().flatten() {
        let mut bytes = std::fs::read(e.path()).unwrap();
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            for b in bytes[header..].iter_mut().step_by(64) {
                *b ^= 1;
            }
        }
        std::fs::write(out.join(e.file_name()), bytes).unwrap();
    }
}

/// Resuming into a directory that holds another model's partial extraction — even a fine-tune
/// with the very same config — is refused, naming both, instead of reusing its experts.
#[test]
fn resuming_another_models_partial_extraction_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen3-moe-tiny");
    let tuned = tmp.path().join("tuned");
    fine_tune_of(&model, &tuned);
    let dir = tmp.path().join("partial");
    let (rc, _, _) = extract(&model, &dir, &["--abort-after", "5"]);
    assert_ne!(rc, 0, "the first run was cut short");
    assert!(!dir.join("manifest.json").exists());
    let (rc, _, err) = extract(&tuned, &dir, &[]);
    assert_eq!(rc, 2, "{err}");
    assert!(
        err.contains("partial extraction of a different model")
            && err.contains(model.to_str().unwrap())
            && err.contains(tuned.to_str().unwrap()),
        "{err}"
    );
    // Its own model resumes it; then the finished extraction refuses the fine-tune too.
    assert_eq!(extract(&model, &dir, &[]).0, 0);
    let (rc, _, err) = extract(&tuned, &dir, &[]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("an extraction of a different model"), "{err}");
}

/// Nothing in a manifest is trusted: a path out of the directory, a link to a device, a length
/// its shape cannot have, a hash that is not hex — each a clear error or a corrupt expert, no
/// panic, no read outside, no endless read, no huge allocation.
#[test]
fn a_hostile_manifest_is_refused_without_panics_or_endless_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen3-moe-tiny");
    let clean = tmp.path().join("clean");
    assert_eq!(extract(&model, &clean, &[]).0, 0);
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        for (rel, _) in tree(&clean) {
            let to = d.join(&rel);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(clean.join(&rel), to).unwrap();
        }
        d
    };
    let generate = |dir: &Path| {
        run(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--backend",
            "selective",
            "--expert-source",
            &format!("extracted:{}", dir.display()),
            "--token-ids",
            "1,2",
            "--max-new-tokens",
            "2",
        ])
    };
    // 1. A path that leaves the directory.
    let d = copy("escape");
    std::fs::write(tmp.path().join("outside.safetensors"), b"secret").unwrap();
    edit_manifest(&d, |m| {
        m["experts"][0]["file"] = "../outside.safetensors".into();
    });
    let (rc, _, err) = generate(&d);
    assert_eq!(rc, 2, "{err}");
    assert!(
        err.contains("not a path inside the extraction directory"),
        "{err}"
    );
    let (rc, out, err) = run(&["verify", d.to_str().unwrap()]);
    assert_ne!(rc, 0);
    assert!(
        !err.contains("panicked") && out.contains("INCOMPLETE"),
        "{out}{err}"
    );
    // 2. An expert file replaced by a link to /dev/zero: verify ends, and says why.
    let d = copy("zero");
    let rel = {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap())
                .unwrap();
        m["experts"][0]["file"].as_str().unwrap().to_string()
    };
    std::fs::remove_file(d.join(&rel)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.join(&rel)).unwrap();
    let start = std::time::Instant::now();
    let (rc, out, _) = run(&["verify", d.to_str().unwrap()]);
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("leads outside the extraction directory"),
        "{out}"
    );
    let (rc, _, err) = generate(&d);
    assert_eq!(rc, 2, "{err}");
    // 3. A length its shape cannot have (it would size an allocation).
    let d = copy("len");
    edit_manifest(&d, |m| {
        m["experts"][0]["tensors"][0]["len"] = 1_000_000_000_000_000u64.into();
    });
    let (rc, _, err) = generate(&d);
    assert_eq!(rc, 2, "{err}");
    assert!(
        err.contains("bytes, but") && err.contains("experts[0]"),
        "{err}"
    );
    // 4. A hash that is not hex (a non-ASCII one panicked at a slice).
    let d = copy("hash");
    edit_manifest(&d, |m| {
        m["experts"][0]["blake3"] = "é".repeat(32).into();
    });
    let (rc, out, err) = run(&["verify", d.to_str().unwrap()]);
    assert_ne!(rc, 0);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.contains("64 hex digits"), "{out}");
    // 5. Offsets that are not the file's own.
    let d = copy("offset");
    edit_manifest(&d, |m| {
        let t = &mut m["experts"][0]["tensors"][0];
        let off = t["offset"].as_u64().unwrap();
        t["offset"] = (off + 2).into();
    });
    let (rc, out, _) = run(&["verify", d.to_str().unwrap()]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("in the file, the manifest says"), "{out}");
}

/// One extractor at a time; and cleaning up after a killed run never follows a link out.
#[test]
fn a_second_extractor_is_refused_and_cleanup_follows_no_links() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen3-omni-tiny");
    let dir = tmp.path().join("busy");
    let mut first = std::process::Command::new(bin())
        .args(["extract", "--model", model.to_str().unwrap(), "--out"])
        .arg(&dir)
        .args(["--quiet", "--delay-ms", "100"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !dir.join("manifest.partial.jsonl").exists() {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (rc, _, err) = extract(&model, &dir, &[]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("being written by another"), "{err}");
    assert!(first.wait().unwrap().success());
    // A stale temporary in a directory elsewhere, linked from inside: left alone.
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join(".keep.tmp-1"), b"not ours").unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("experts/linked")).unwrap();
    assert_eq!(extract(&model, &dir, &[]).0, 0);
    assert!(elsewhere.join(".keep.tmp-1").exists());
}
