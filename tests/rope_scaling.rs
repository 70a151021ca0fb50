//! Stretched RoPE (`rope_type` "yarn" and "linear", as Qwen's instructions for long contexts
//! set it in config.json, and as llama.cpp's converter writes it into GGUF metadata): the
//! moe fixture's logits against transformers' on the same files with only the RoPE settings
//! changed (`tests/fixtures/rope/golden.json`, made by `scripts/make_rope_goldens.py`), and the
//! GGUF keys read into the same settings.

mod common;

use candle_core::quantized::gguf_file;
use common::*;
use moescope::engine::{DeviceSpec, Dtype, Engine, ModelFiles};
use moescope::model::MoeConfig;
use moescope::model::config::RopeScaling;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Deserialize)]
struct Case {
    rope_parameters: serde_json::Value,
    logits: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Goldens {
    sequences: Vec<Vec<u32>>,
    plain: Vec<Vec<f32>>,
    cases: BTreeMap<String, Case>,
}

fn goldens() -> Goldens {
    let text = std::fs::read_to_string(fixture("rope").join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The final logits of the f32 CPU model in `dir` over `seq`.
fn final_logits(dir: &Path, seq: &[u32]) -> Vec<f32> {
    let files = ModelFiles::open(dir).unwrap();
    let e = Engine::native(&files, Dtype::F32, &DeviceSpec::cpu(), false, |_, _| {}).unwrap();
    last_logits(&e, seq)
}

/// The fixture with its config's RoPE settings replaced by `f`.
fn with_rope(f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> tempfile::TempDir {
    let dir = copy_fixture("qwen3-moe-tiny");
    edit_json(&dir.path().join("config.json"), |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("rope_parameters");
        f(o);
    });
    dir
}

#[test]
fn stretched_rope_logits_match_transformers() {
    let g = goldens();
    assert_eq!(g.cases.len(), 4, "yarn, yarn_explicit, yarn_mscale, linear");
    for (name, case) in &g.cases {
        let params = case.rope_parameters.clone();
        let dir = with_rope(|o| {
            o.insert("rope_parameters".into(), params);
        });
        for ((seq, want), plain) in g.sequences.iter().zip(&case.logits).zip(&g.plain) {
            let got = final_logits(dir.path(), seq);
            let d = max_abs_diff(&got, want);
            eprintln!("{name}, {} tokens: max |Δ| {d:e}", seq.len());
            assert!(
                d <= F32_LOGIT_TOLERANCE,
                "{name}, {} tokens: max |Δ| {d} against transformers",
                seq.len()
            );
            // The scaling changes the outputs by far more than the tolerance: a model that
            // ignored it could not pass.
            assert!(
                max_abs_diff(want, plain) > 0.05,
                "{name}: the golden does not tell scaled from plain RoPE"
            );
        }
    }
    // Plain RoPE on the same sequences, so the comparison above is of the scaling alone.
    for (seq, want) in g.sequences.iter().zip(&g.plain) {
        let d = max_abs_diff(&final_logits(&fixture("qwen3-moe-tiny"), seq), want);
        assert!(d <= F32_LOGIT_TOLERANCE, "plain: max |Δ| {d}");
    }
}

#[test]
fn qwens_rope_scaling_spelling_is_the_same_model() {
    // Qwen's model cards: a top-level rope_theta and `"rope_scaling": {"rope_type": "yarn",
    // "factor": …, "original_max_position_embeddings": …}`; older files say "type".
    let g = goldens();
    let case = &g.cases["yarn"];
    for kind_key in ["rope_type", "type"] {
        let dir = with_rope(|o| {
            o.insert("rope_theta".into(), 10000.0.into());
            o.insert(
                "rope_scaling".into(),
                serde_json::json!({kind_key: "yarn", "factor": 8.0,
                                   "original_max_position_embeddings": 64}),
            );
        });
        let seq = &g.sequences[1];
        let d = max_abs_diff(&final_logits(dir.path(), seq), &case.logits[1]);
        assert!(d <= F32_LOGIT_TOLERANCE, "{kind_key}: max |Δ| {d}");
    }
}

#[test]
fn rope_settings_moescope_cannot_honour_are_refused_by_name() {
    let cases: [(serde_json::Value, &str); 6] = [
        (
            serde_json::json!({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
            "\"dynamic\" is not supported",
        ),
        (
            serde_json::json!({"rope_type": "longrope", "rope_theta": 1e4}),
            "\"longrope\" is not supported",
        ),
        (
            serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4, "factor": 0.5,
                               "original_max_position_embeddings": 64}),
            "rope_parameters.factor",
        ),
        (
            serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                               "original_max_position_embeddings": 0}),
            "rope_parameters.original_max_position_embeddings",
        ),
        (
            serde_json::json!({"rope_type": "linear", "rope_theta": 1e4}),
            "linear RoPE scaling needs one",
        ),
        (
            serde_json::json!({"rope_type": "default", "rope_theta": 1e4, "factor": 4.0}),
            "without a rope_type that uses it",
        ),
    ];
    for (params, want) in cases {
        let dir = with_rope(|o| {
            o.insert("rope_parameters".into(), params.clone());
        });
        let e = MoeConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains(want), "{params}: {e}");
        assert!(e.contains("config.json"), "names the file: {e}");
        expect_failure(dir.path(), &[want]);
    }
}

/// The Q8_0 GGUF fixture rewritten with `extra` metadata.
fn gguf_with(extra: &[(&str, gguf_file::Value)]) -> (tempfile::TempDir, std::path::PathBuf) {
    let src = fixture("gguf").join("kquant-Q8_0.gguf");
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let device = candle_core::Device::Cpu;
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), content.tensor(&mut f, n, &device).unwrap()))
        .collect();
    let mut meta: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.gguf");
    let mut w = std::fs::File::create(&out).unwrap();
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut w, &meta_refs, &tensor_refs).unwrap();
    (dir, out)
}

#[test]
fn gguf_rope_scaling_keys_are_read_as_llama_cpps_converter_writes_them() {
    use gguf_file::Value as V;
    let (_d, plain) = gguf_with(&[]);
    assert_eq!(MoeConfig::from_dir(&plain).unwrap().rope_scaling, None);
    let (_d, whole) = gguf_with(&[("qwen3moe.rope.dimension_count", V::U32(64))]);
    assert!(MoeConfig::from_dir(&whole).is_ok(), "RoPE over whole heads");

    let (_d, yarn) = gguf_with(&[
        ("qwen3moe.rope.scaling.type", V::String("yarn".into())),
        ("qwen3moe.rope.scaling.factor", V::F32(4.0)),
        ("qwen3moe.rope.scaling.original_context_length", V::U32(64)),
        ("qwen3moe.rope.scaling.yarn_beta_fast", V::F32(16.0)),
    ]);
    assert_eq!(
        MoeConfig::from_dir(&yarn).unwrap().rope_scaling,
        Some(RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 64.0,
            attention_factor: 0.1 * 4f64.ln() + 1.0,
            beta_fast: 16.0,
            beta_slow: 1.0,
            truncate: true,
        })
    );
    let (_d, linear) = gguf_with(&[("qwen3moe.rope.scale_linear", V::F32(2.0))]);
    assert_eq!(
        MoeConfig::from_dir(&linear).unwrap().rope_scaling,
        Some(RopeScaling::Linear { factor: 2.0 })
    );
    for (extra, want) in [
        (
            ("qwen3moe.rope.scaling.type", V::String("longrope".into())),
            "qwen3moe.rope.scaling.type",
        ),
        (
            ("qwen3moe.rope.scaling.yarn_ext_factor", V::F32(0.5)),
            "qwen3moe.rope.scaling.yarn_ext_factor",
        ),
        (
            // The fixture's heads are 64 wide; RoPE over 32 of them is not what moescope runs.
            ("qwen3moe.rope.dimension_count", V::U32(32)),
            "qwen3moe.rope.dimension_count",
        ),
    ] {
        let (_d, bad) = gguf_with(&[extra]);
        let e = MoeConfig::from_dir(&bad).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        expect_failure(&bad, &[want]);
    }
    // A YaRN factor below 1 is named by its GGUF key.
    let (_d, bad) = gguf_with(&[
        ("qwen3moe.rope.scaling.type", V::String("yarn".into())),
        ("qwen3moe.rope.scaling.factor", V::F32(0.5)),
    ]);
    let e = MoeConfig::from_dir(&bad).unwrap_err().to_string();
    assert!(e.contains("qwen3moe.rope.scaling.factor"), "{e}");
}
