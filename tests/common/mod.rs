//! Shared helpers for integration tests: fixture paths and golden outputs.
#![allow(dead_code)]

use std::path::PathBuf;

use serde::Deserialize;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub const FAMILIES: [&str; 2] = ["qwen3-moe-tiny", "qwen3-omni-tiny"];

#[derive(Debug, Deserialize)]
pub struct Greedy {
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    pub margins: Vec<f32>,
}

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub sequences: Vec<Vec<u32>>,
    pub logits_f32: Vec<Vec<f32>>,
    pub all_logits_f32: Vec<Vec<f32>>,
    pub logits_bf16: Vec<Vec<f32>>,
    pub greedy: Vec<Greedy>,
    pub routing: std::collections::BTreeMap<String, Vec<Vec<u32>>>,
}

pub fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(fixture(name).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The largest |a − b|, NaN-aware: a NaN on either side is an infinite difference (so no
/// tolerance passes it), where `f32::max` would have skipped it as a difference of 0.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() { f32::INFINITY } else { d }
        })
        .fold(0.0, f32::max)
}

/// How close moescope's f32 logits are to transformers' on the fixtures — what the README
/// claims, and what the fidelity tests assert.
pub const F32_LOGIT_TOLERANCE: f32 = 1e-5;

/// Copies a fixture directory into a temp dir so a test can damage it.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Path of the moescope binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moescope"))
}

use moescope::model::config::{ExpertProj, MoeConfig};
use moescope::model::safetensors_file::{OwnedTensor, SafetensorsFile, write_atomic};
use std::path::Path;

/// Writes a fixture checkpoint in the seed project's layout (one file per expert, non-expert
/// weights split by kind), as the earlier project's extractor did — complete.
pub fn make_seed_layout(fixture_dir: &Path, out: &Path, with_config: bool) {
    let cfg = MoeConfig::from_dir(fixture_dir).unwrap();
    let ckpt = moescope::model::Checkpoint::open(fixture_dir).unwrap();
    let read = |name: &str| -> (SafetensorsFile, String) {
        let (f, _) = ckpt.locate(name).unwrap();
        (SafetensorsFile::open(f.path()).unwrap(), name.to_string())
    };
    let write = |rel: &str, names: &[String]| {
        let path = out.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let files: Vec<(SafetensorsFile, String)> = names.iter().map(|n| read(n)).collect();
        let tensors: Vec<OwnedTensor<'_>> = files
            .iter()
            .map(|(f, n)| {
                let info = f.info(n).unwrap();
                OwnedTensor {
                    name: n.clone(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: f.bytes(info),
                }
            })
            .collect();
        write_atomic(&path, &tensors, None).unwrap();
    };
    let p = |s: &str| cfg.tensor_name(s);
    write(
        "embeddings/thinker_embeddings.safetensors",
        &[p("model.embed_tokens.weight")],
    );
    if !cfg.tie_word_embeddings {
        write(
            "lm_head/thinker_lm_head.safetensors",
            &[p("lm_head.weight")],
        );
    }
    write(
        "final_norm/thinker_final_norm.safetensors",
        &[p("model.norm.weight")],
    );
    for l in 0..cfg.num_hidden_layers {
        let lp = |s: &str| p(&format!("model.layers.{l}.{s}"));
        let attn: Vec<String> = ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"]
            .iter()
            .map(|n| lp(&format!("self_attn.{n}.weight")))
            .collect();
        write(
            &format!("attention/thinker_attention_layer_{l:02}.safetensors"),
            &attn,
        );
        let norms = vec![
            lp("input_layernorm.weight"),
            lp("post_attention_layernorm.weight"),
        ];
        write(
            &format!("norms/thinker_norms_layer_{l:02}.safetensors"),
            &norms,
        );
        match cfg.layer_kinds[l] {
            moescope::model::config::FfnKind::Moe => {
                write(
                    &format!("routers/thinker_router_layer_{l:02}.safetensors"),
                    &[lp("mlp.gate.weight")],
                );
                for e in 0..cfg.num_experts {
                    let names: Vec<String> = ExpertProj::ALL
                        .iter()
                        .map(|&pr| cfg.expert_tensor_name(l, e, pr))
                        .collect();
                    write(
                        &format!("experts/thinker_expert_{e:03}_layer_{l:02}.safetensors"),
                        &names,
                    );
                }
            }
            moescope::model::config::FfnKind::Dense => {
                let names = vec![
                    lp("mlp.gate_proj.weight"),
                    lp("mlp.up_proj.weight"),
                    lp("mlp.down_proj.weight"),
                ];
                // The seed layout has no place for dense MLPs; keep them with the norms' kin.
                write(
                    &format!("norms/thinker_dense_mlp_layer_{l:02}.safetensors"),
                    &names,
                );
            }
        }
    }
    std::fs::write(out.join("extraction_manifest.json"), "{}").unwrap();
    if with_config {
        std::fs::copy(fixture_dir.join("config.json"), out.join("config.json")).unwrap();
    }
}

/// What a headless run recorded at `rec` left: its summary (`<rec>.summary.json` beside it, as
/// JSON) and the session its recording replays to.
pub fn summary_and_state(
    rec: &Path,
) -> (serde_json::Value, moescope::session::state::SessionState) {
    let summary = rec.with_extension("summary.json");
    let sum: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    let rec = moescope::session::record::read(rec).unwrap();
    let mut state = moescope::session::state::SessionState::new(rec.header.clone());
    for e in &rec.events {
        state.apply(e);
    }
    (sum, state)
}

/// Runs the moescope binary; returns (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Whether a process is still running (a zombie waiting for its parent is not).
pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .contains("State:\tZ")
}

/// The final position's logits over `tokens`, from a fresh KV cache.
pub fn last_logits(e: &moescope::engine::Engine, tokens: &[u32]) -> Vec<f32> {
    use moescope::model::ports::NoObserver;
    use moescope::model::qwen3_moe::Logits;
    let mut cache = e.model.new_cache();
    let l = e
        .model
        .forward(
            tokens,
            &mut cache,
            e.provider.as_ref(),
            &mut NoObserver,
            Logits::Last,
        )
        .unwrap();
    l.squeeze(0).unwrap().to_vec1().unwrap()
}

/// Bits of every position's logits over `seq` (a fresh KV cache), then `n` greedy tokens after
/// it: what "bit-identical" compares between backends.
pub fn bits_and_greedy(
    e: &moescope::engine::Engine,
    seq: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<u32>) {
    use moescope::model::generate::Generation;
    use moescope::model::ports::NoObserver;
    use moescope::model::qwen3_moe::Logits;
    use moescope::model::sampling::SamplingParams;
    let mut cache = e.model.new_cache();
    let l = e
        .model
        .forward(
            seq,
            &mut cache,
            e.provider.as_ref(),
            &mut NoObserver,
            Logits::All,
        )
        .unwrap();
    let bits = l
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let params = SamplingParams {
        max_new_tokens: n,
        ..Default::default()
    };
    let mut g = Generation::new(&e.model, seq.to_vec(), params, vec![]).unwrap();
    while g
        .step(&e.model, e.provider.as_ref(), &mut NoObserver)
        .unwrap()
        .is_some()
    {}
    (bits, g.generated.clone())
}

/// Runs `logits` on a damaged model directory and checks the failure.
pub fn expect_failure(dir: &std::path::Path, needles: &[&str]) {
    let (rc, out, err) = run(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2,3",
    ]);
    assert_eq!(rc, 2, "exit code (stderr: {err})");
    assert!(out.is_empty(), "nothing on stdout: {out}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
}

pub fn edit_json(path: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Rewrites a safetensors file's JSON header (data section unchanged).
pub fn edit_header(path: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut header);
    let h = header.to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// Runs golden sequence 2 through `e` and checks that every router picked the experts
/// transformers picked, position by position.
pub fn assert_routing_is_golden(e: &moescope::engine::Engine, g: &Golden, what: &str) {
    use moescope::model::ports::RoutingLog;
    use moescope::model::qwen3_moe::Logits;
    let mut log = RoutingLog::default();
    let mut cache = e.model.new_cache();
    e.model
        .forward(
            &g.sequences[2],
            &mut cache,
            e.provider.as_ref(),
            &mut log,
            Logits::Last,
        )
        .unwrap();
    for (layer, per_pos) in &g.routing {
        let layer: usize = layer.parse().unwrap();
        let ours: Vec<Vec<u32>> = log
            .entries
            .iter()
            .filter(|(l, _, _)| *l == layer)
            .map(|(_, _, e)| e.clone())
            .collect();
        assert_eq!(&ours, per_pos, "{what} layer {layer}");
    }
}

/// Every cache setting the identity tests sweep: capacities 1, `mid` and `all`, every policy,
/// both scopes.
pub fn identity_cache_settings(
    mid: usize,
    all: usize,
) -> Vec<moescope::cache::settings::CacheSettings> {
    use moescope::cache::policy::PolicyKind;
    use moescope::cache::settings::{CacheSettings, Scope};
    let mut out = Vec::new();
    for cap in [1, mid, all] {
        for policy in PolicyKind::ALL {
            for scope in [Scope::Global, Scope::Layer] {
                out.push(CacheSettings {
                    cache_experts: Some(cap),
                    cache_scope: scope,
                    policy,
                    ..Default::default()
                });
            }
        }
    }
    out
}

/// A CPU backend over fixture `name` with default settings.
pub fn spec(
    name: &str,
    backend: moescope::engine::BackendKind,
    cache: moescope::cache::settings::CacheSettings,
    dtype: moescope::engine::Dtype,
) -> moescope::engine::BackendSpec {
    moescope::engine::BackendSpec {
        model_dir: fixture(name),
        dtype,
        device: moescope::engine::DeviceSpec::cpu(),
        backend,
        cache,
        settings: moescope::settings::Settings::default(),
    }
}
