//! Every bad input gets a one-line error naming the file and the tensor or field, exit code 2,
//! and no panic.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

#[test]
fn unsupported_model_type() {
    let d = copy_fixture("qwen3-moe-tiny");
    edit_json(&d.path().join("config.json"), |v| {
        v["model_type"] = "mixtral".into()
    });
    expect_failure(
        d.path(),
        &[
            "config.json",
            "model_type",
            "mixtral",
            "qwen3_moe",
            "qwen3_omni_moe",
        ],
    );
}

#[test]
fn values_that_would_run_silently_wrong_are_refused() {
    // Each of these ran before: NaN logits (a negative epsilon), an end-of-sequence token that
    // can never be generated, a context of no positions.
    let cases: [(&str, &str, Value, &[&str]); 5] = [
        (
            "config.json",
            "rms_norm_eps",
            (-1.0).into(),
            &["rms_norm_eps", "-1"],
        ),
        (
            "config.json",
            "eos_token_id",
            99_999.into(),
            &["eos_token_id", "99999", "vocab_size 384"],
        ),
        (
            "config.json",
            "bos_token_id",
            384.into(),
            &["bos_token_id", "384"],
        ),
        (
            "config.json",
            "max_position_embeddings",
            0.into(),
            &["max_position_embeddings"],
        ),
        (
            "generation_config.json",
            "eos_token_id",
            serde_json::json!([2, 500]),
            &["generation_config.json", "eos_token_id", "500"],
        ),
    ];
    for (file, key, value, needles) in cases {
        let d = copy_fixture("qwen3-moe-tiny");
        edit_json(&d.path().join(file), |v| v[key] = value.clone());
        expect_failure(d.path(), needles);
    }
}

#[test]
fn unparsable_config() {
    let d = copy_fixture("qwen3-moe-tiny");
    std::fs::write(
        d.path().join("config.json"),
        "{\"model_type\": \"qwen3_moe\",",
    )
    .unwrap();
    expect_failure(d.path(), &["config.json", "not valid JSON"]);
}

#[test]
fn incomplete_config() {
    let d = copy_fixture("qwen3-moe-tiny");
    edit_json(&d.path().join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    expect_failure(d.path(), &["config.json", "hidden_size", "missing"]);
    let d = copy_fixture("qwen3-omni-tiny");
    edit_json(&d.path().join("config.json"), |v| {
        v["thinker_config"]["text_config"]
            .as_object_mut()
            .unwrap()
            .remove("num_experts");
    });
    expect_failure(
        d.path(),
        &["thinker_config.text_config.num_experts", "missing"],
    );
}

#[test]
fn missing_config_and_weights() {
    let d = copy_fixture("qwen3-moe-tiny");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    expect_failure(d.path(), &["config.json"]);
    let d = copy_fixture("qwen3-moe-tiny");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    expect_failure(d.path(), &["model.safetensors", "found"]);
}

#[test]
fn missing_shard() {
    let d = copy_fixture("qwen3-omni-tiny");
    std::fs::remove_file(d.path().join("model-00002-of-00003.safetensors")).unwrap();
    expect_failure(
        d.path(),
        &[
            "model-00002-of-00003.safetensors",
            "missing shard",
            "index.json",
        ],
    );
}

#[test]
fn missing_tensor() {
    let d = copy_fixture("qwen3-omni-tiny");
    edit_json(&d.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("thinker.model.layers.2.self_attn.k_norm.weight");
    });
    expect_failure(
        d.path(),
        &["thinker.model.layers.2.self_attn.k_norm.weight", "missing"],
    );
}

#[test]
fn index_points_to_a_shard_without_the_tensor() {
    let d = copy_fixture("qwen3-omni-tiny");
    edit_json(&d.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"]["thinker.model.norm.weight"] = "model-00001-of-00003.safetensors".into();
    });
    expect_failure(
        d.path(),
        &[
            "model-00001-of-00003.safetensors",
            "thinker.model.norm.weight",
            "does not contain",
        ],
    );
}

#[test]
fn wrong_shape() {
    let d = copy_fixture("qwen3-moe-tiny");
    edit_json(&d.path().join("config.json"), |v| {
        v["vocab_size"] = 500.into()
    });
    expect_failure(
        d.path(),
        &[
            "model.safetensors",
            "model.embed_tokens.weight",
            "[384, 64]",
            "[500, 64]",
        ],
    );
    let d = copy_fixture("qwen3-moe-tiny");
    edit_json(&d.path().join("config.json"), |v| {
        v["moe_intermediate_size"] = 16.into()
    });
    expect_failure(
        d.path(),
        &["mlp.experts.0.gate_proj.weight", "[32, 64]", "[16, 64]"],
    );
}

#[test]
fn wrong_dtype() {
    let d = copy_fixture("qwen3-moe-tiny");
    edit_header(&d.path().join("model.safetensors"), |h| {
        h["model.norm.weight"]["dtype"] = "I16".into();
    });
    expect_failure(
        d.path(),
        &["model.safetensors", "model.norm.weight", "I16", "BF16"],
    );
}

#[test]
fn truncated_file() {
    let d = copy_fixture("qwen3-moe-tiny");
    let p = d.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 1000).unwrap();
    expect_failure(
        d.path(),
        &["model.safetensors", "beyond the end of the file"],
    );
}

#[test]
fn absurd_header_length() {
    let d = copy_fixture("qwen3-moe-tiny");
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(u64::MAX - 7).to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    expect_failure(d.path(), &["model.safetensors", "header length", "absurd"]);
}

#[test]
fn data_offsets_beyond_the_file() {
    let d = copy_fixture("qwen3-omni-tiny");
    edit_header(&d.path().join("model-00002-of-00003.safetensors"), |h| {
        let t = &mut h["thinker.model.norm.weight"];
        t["data_offsets"] = serde_json::json!([10_000_000, 10_000_128]);
    });
    expect_failure(
        d.path(),
        &[
            "model-00002-of-00003.safetensors",
            "thinker.model.norm.weight",
            "beyond the end",
        ],
    );
}

#[test]
fn bad_token_ids_and_prompts() {
    let m = fixture("qwen3-moe-tiny");
    let (rc, _, err) = run(&[
        "logits",
        "--model",
        m.to_str().unwrap(),
        "--tokens",
        "1,99999",
    ]);
    assert_eq!(rc, 2);
    assert!(err.contains("99999") && err.contains("vocab_size"), "{err}");
    let (rc, _, err) = run(&["generate", "--model", m.to_str().unwrap(), "--prompt", ""]);
    assert_eq!(rc, 2);
    assert!(err.contains("empty"), "{err}");
    let (rc, _, err) = run(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "x",
        "--top-p",
        "0",
    ]);
    assert_eq!(rc, 2);
    assert!(err.contains("top-p"), "{err}");
}

#[test]
fn missing_experts_are_refused_unless_allowed() {
    let d = copy_fixture("qwen3-omni-tiny");
    edit_json(&d.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("thinker.model.layers.1.mlp.experts.5.up_proj.weight");
    });
    let dir = d.path().to_str().unwrap();
    for backend in ["native", "selective"] {
        let (rc, _, err) = run(&[
            "generate",
            "--model",
            dir,
            "--token-ids",
            "1,2",
            "--backend",
            backend,
        ]);
        assert_eq!(rc, 2, "{backend}: {err}");
        assert!(
            err.contains("layer 1, expert 5") && err.contains("--allow-missing-experts"),
            "{err}"
        );
        let (rc, out, err) = run(&[
            "generate",
            "--model",
            dir,
            "--token-ids",
            "1,2",
            "--backend",
            backend,
            "--allow-missing-experts",
            "--json",
            "--max-new-tokens",
            "3",
        ]);
        assert_eq!(rc, 0, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["degraded"], true,
            "{backend}: a run with masked experts is DEGRADED"
        );
    }
}

#[test]
fn bad_flags() {
    let m = fixture("qwen3-moe-tiny");
    let m = m.to_str().unwrap();
    let (rc, _, err) = run(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--backend",
        "selective",
        "--cache-mem",
        "4 parsecs",
    ]);
    assert_eq!(rc, 2);
    assert!(err.contains("unknown unit"), "{err}");
    let (rc, _, err) = run(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--backend",
        "selective",
        "--expert-source",
        "nfs:/x",
    ]);
    assert_eq!(rc, 2);
    assert!(err.contains("expert source"), "{err}");
    let (rc, _, err) = run(&[
        "generate", "--model", m, "--prompt", "x", "--device", "tpu:0",
    ]);
    assert_eq!(rc, 2);
    assert!(err.contains("tpu:0"), "{err}");
    let (rc, _, err) = run(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--backend",
        "selective",
        "--expert-source",
        "extracted:/nonexistent",
    ]);
    assert_eq!(rc, 2);
    assert!(err.contains("/nonexistent"), "{err}");
    // A sweep or a study of a cache that holds nothing, or more experts than the model has
    // (the fixture has three MoE layers of 8), is refused before anything runs.
    for (caps, says) in [
        ("0%", "holds no expert"),
        ("0,16", "holds no expert"),
        ("25", "more than the model's 24 experts"),
    ] {
        let (rc, _, err) = run(&["sweep", "--model", m, "--capacities", caps]);
        assert_eq!(rc, 2, "{caps}: {err}");
        assert!(err.contains(says), "{caps}: {err}");
    }
}

/// A model directory whose headers claim far more than this machine has: a config with large
/// dimensions and one sparse safetensors file laid out to match it (its data is a hole: nothing
/// is written, nothing is used on disk).
fn make_oversized_model(dir: &Path) {
    use moescope::model::checkpoint::Checkpoint;
    use moescope::model::config::{ExpertProj, MoeConfig};
    let fx = fixture("qwen3-moe-tiny");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tokenizer").join(f), dir.join(f))
            .or_else(|_| std::fs::copy(fx.join(f), dir.join(f)))
            .unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = 4096.into();
    cfg["moe_intermediate_size"] = 4096.into();
    cfg["intermediate_size"] = 4096.into();
    cfg["num_local_experts"] = 64.into();
    cfg["mlp_only_layers"] = serde_json::json!([]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let c = MoeConfig::from_dir(dir).unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> = Checkpoint::required_tensors(&c);
    for l in c.moe_layers() {
        for e in 0..c.num_experts {
            for p in ExpertProj::ALL {
                tensors.push((c.expert_tensor_name(l, e, p), p.shape(&c).to_vec()));
            }
        }
    }
    let mut header = serde_json::Map::new();
    let mut at = 0u64;
    for (name, shape) in tensors {
        let len = 2 * shape.iter().product::<usize>() as u64;
        header.insert(
            name,
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [at, at + len]}),
        );
        at += len;
    }
    let h = Value::Object(header).to_string();
    let mut f = std::fs::File::create(dir.join("model.safetensors")).unwrap();
    use std::io::Write;
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(h.as_bytes()).unwrap();
    f.set_len(8 + h.len() as u64 + at).unwrap();
}

/// A model that cannot fit is refused before anything is loaded — one line saying how much is
/// needed and available and which flags help — instead of an out-of-memory kill mid-load.
#[test]
fn a_model_that_cannot_fit_is_refused_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("huge");
    make_oversized_model(&dir);
    let rec = tmp.path().join("huge.ndjson");
    let start = std::time::Instant::now();
    let (rc, out, err) = run(&[
        "run",
        "--no-tui",
        "--model",
        dir.to_str().unwrap(),
        "--record",
        rec.to_str().unwrap(),
    ]);
    assert_eq!(rc, 2, "{out}\n{err}");
    assert!(!err.contains("panicked"));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for want in [
        "the run needs at least",
        "is available",
        "--schedule sequential",
        "--cache-mem",
        "--dtype bf16",
        "--force",
    ] {
        assert!(err.contains(want), "{want:?} missing: {err}");
    }
    assert!(
        !rec.exists(),
        "nothing recorded for a run that never started"
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(20),
        "refused up front"
    );
    // One backend alone, the same.
    let (rc, _, err) = run(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--token-ids",
        "1,2",
    ]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("native") && err.contains("--force"), "{err}");
}

#[test]
fn the_step_profile_refuses_a_cpu_device_by_name() {
    // `bench steps` times CUDA graphs; on the CPU it must say so, not profile nothing.
    let (rc, out, err) = run(&["bench", "steps", "--device", "cpu"]);
    assert_eq!(rc, 2, "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("--device cuda:N"), "{err}");
}

/// Nothing already written is lost to an output: a report is never written over a recording or
/// a routing trace (`export REC -o REC` had replaced the recording with its own report), a
/// random checkpoint never over an existing file or a directory with files in it, an extraction
/// never over another model's config.json. Each is refused with exit code 2 and leaves the file
/// byte for byte as it was.
#[test]
fn outputs_never_replace_what_was_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("session.ndjson");
    std::fs::copy(root.join("recordings/demo-tiny-moe.ndjson"), &rec).unwrap();
    let trace = tmp.path().join("routing.trace");
    let r = rec.to_str().unwrap();
    let (rc, _, err) = run(&[
        "export",
        r,
        "--format",
        "trace",
        "-o",
        trace.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{err}");
    let kept = |p: &Path| std::fs::read(p).unwrap();
    let (rec_bytes, trace_bytes) = (kept(&rec), kept(&trace));
    for (target, kind) in [(&rec, "recording"), (&trace, "routing trace")] {
        for format in ["html", "json", "markdown", "trace"] {
            let (rc, _, err) = run(&[
                "export",
                r,
                "--format",
                format,
                "-o",
                target.to_str().unwrap(),
            ]);
            assert_eq!(rc, 2, "{format} over the {kind}: {err}");
            assert!(
                err.contains(kind) && err.contains("never written over"),
                "{err}"
            );
        }
    }
    // A sweep is refused before it runs, not after.
    let (rc, out, err) = run(&[
        "sweep",
        "--capacities",
        "50%",
        "-o",
        trace.to_str().unwrap(),
    ]);
    assert_eq!(rc, 2, "{err}");
    assert!(
        err.contains("routing trace") && out.is_empty(),
        "{out}{err}"
    );
    assert_eq!(kept(&rec), rec_bytes);
    assert_eq!(kept(&trace), trace_bytes);
    // A run records to a new file only: not over a recording, not into a directory's name.
    for (target, says) in [
        (rec.as_path(), "never overwrites a recording"),
        (tmp.path(), "a directory"),
    ] {
        let (rc, _, err) = run(&[
            "run",
            "--no-tui",
            "--max-new-tokens",
            "1",
            "--record",
            target.to_str().unwrap(),
        ]);
        assert_eq!(rc, 2, "{err}");
        assert!(err.contains(says), "{err}");
    }
    assert_eq!(kept(&rec), rec_bytes);
    // An output that is not a session file is replaced as asked.
    let out = tmp.path().join("summary.json");
    std::fs::write(&out, "old").unwrap();
    let (rc, _, err) = run(&["export", r, "--format", "json", "-o", out.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert_ne!(kept(&out), b"old");

    // Random checkpoints: not into a directory with files, not over a file.
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), "{\"mine\": true}").unwrap();
    let gguf = tmp.path().join("mine.gguf");
    std::fs::write(&gguf, "GGUF mine").unwrap();
    for args in [
        vec!["--out", model.to_str().unwrap()],
        vec!["--gguf", "Q8_0", "--out", gguf.to_str().unwrap()],
    ] {
        let mut all = vec!["bench", "random-checkpoint", "--preset", "fuzz"];
        all.extend(args);
        let (rc, _, err) = run(&all);
        assert_eq!(rc, 2, "{all:?}: {err}");
        assert!(err.contains("already exists"), "{err}");
    }
    assert_eq!(kept(&model.join("config.json")), b"{\"mine\": true}");
    assert_eq!(kept(&gguf), b"GGUF mine");

    // An extraction into a directory holding another model's config.json.
    let (rc, _, err) = run(&[
        "extract",
        "--model",
        root.join("models/tiny-moe").to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("another config.json"), "{err}");
    assert_eq!(kept(&model.join("config.json")), b"{\"mine\": true}");
}
