//! Checkpoints whose experts are stored stacked, as transformers 5 holds them in memory — one
//! `mlp.experts.gate_up_proj` [E, 2I, H] (each expert's gate rows, then its up rows) and one
//! `mlp.experts.down_proj` [E, H, I] a layer — as a state dict saved without
//! `save_pretrained`'s per-expert conversion stores them. The stacked copies are made here from
//! the per-expert fixtures (the same bytes, restacked), so every result must be the original's
//! bit for bit: native and selective, both families (the Omni thinker's prefix included), and an
//! extraction — and within the fidelity tolerance of transformers' golden logits for the fixture.
//! Malformed stacks are refused by name.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use moescope::cache::settings::{CacheSettings, SourceSpec};
use moescope::engine::{BackendKind, BackendSpec, Dtype, Engine};
use moescope::model::MoeConfig;
use moescope::model::config::ExpertProj;
use moescope::model::safetensors_file::{OwnedTensor, SafetensorsFile, StDtype, write_atomic};

/// Every tensor of the fixture `name`: (dtype, shape, bytes) by name, from one file or shards.
fn tensors(dir: &Path) -> HashMap<String, (StDtype, Vec<usize>, Vec<u8>)> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let f = SafetensorsFile::open(&path).unwrap();
        for (name, info) in f.tensors() {
            out.insert(
                name.clone(),
                (info.dtype, info.shape.clone(), f.bytes(info).to_vec()),
            );
        }
    }
    out
}

/// A copy of fixture `name` with each MoE layer's experts stacked (and `mutate` applied to the
/// tensors before they are written), in one `model.safetensors`.
fn stacked_copy(
    name: &str,
    mutate: impl FnOnce(&mut Vec<(String, StDtype, Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let src = fixture(name);
    let cfg = MoeConfig::from_dir(&src).unwrap();
    let mut all = tensors(&src);
    let mut out: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in cfg.moe_layers() {
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        let mut dtype = None;
        for e in 0..cfg.num_experts {
            for proj in ExpertProj::ALL {
                let (dt, _, bytes) = all
                    .remove(&cfg.expert_tensor_name(layer, e, proj))
                    .expect("a per-expert fixture");
                dtype = Some(dt);
                match proj {
                    ExpertProj::Down => down.extend_from_slice(&bytes),
                    _ => gate_up.extend_from_slice(&bytes),
                }
            }
        }
        let (e, i, h) = (cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size);
        let stack =
            |rest: &str| cfg.tensor_name(&format!("model.layers.{layer}.mlp.experts.{rest}"));
        out.push((
            stack("gate_up_proj"),
            dtype.unwrap(),
            vec![e, 2 * i, h],
            gate_up,
        ));
        out.push((stack("down_proj"), dtype.unwrap(), vec![e, h, i], down));
    }
    out.extend(all.into_iter().map(|(n, (d, s, b))| (n, d, s, b)));
    out.sort_by(|a, b| a.0.cmp(&b.0));
    mutate(&mut out);
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        if !file.ends_with(".safetensors") && file != "model.safetensors.index.json" {
            std::fs::copy(&path, tmp.path().join(&file)).unwrap();
        }
    }
    let owned: Vec<OwnedTensor<'_>> = out
        .iter()
        .map(|(name, dtype, shape, bytes)| OwnedTensor {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
            bytes,
        })
        .collect();
    write_atomic(&tmp.path().join("model.safetensors"), &owned, None).unwrap();
    tmp
}

fn engine(dir: &Path, backend: BackendKind, cache: CacheSettings, dtype: Dtype) -> Engine {
    BackendSpec {
        model_dir: dir.to_path_buf(),
        dtype,
        device: moescope::engine::DeviceSpec::cpu(),
        backend,
        cache,
        settings: moescope::settings::Settings::default(),
    }
    .load(|_, _| {})
    .unwrap()
}

#[test]
fn stacked_experts_run_as_the_per_expert_original_bit_for_bit() {
    let seq: Vec<u32> = (0..16u32).map(|i| (i * 37 + 5) % 380).collect();
    for name in ["qwen3-moe-tiny", "qwen3-omni-tiny"] {
        let copy = stacked_copy(name, |_| {});
        // transformers' own logits for the fixture (its golden), read from the stacks.
        let g = golden(name);
        let f32_native = engine(
            copy.path(),
            BackendKind::Native,
            Default::default(),
            Dtype::F32,
        );
        for (seq, want) in g.sequences.iter().zip(&g.logits_f32) {
            let d = max_abs_diff(&last_logits(&f32_native, seq), want);
            assert!(d <= F32_LOGIT_TOLERANCE, "{name}: {d} from transformers");
        }
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let original = engine(
                &fixture(name),
                BackendKind::Native,
                Default::default(),
                dtype,
            );
            let want = bits_and_greedy(&original, &seq, 10);
            let native = engine(copy.path(), BackendKind::Native, Default::default(), dtype);
            assert!(
                bits_and_greedy(&native, &seq, 10) == want,
                "{name} {dtype:?} native"
            );
            let all = native.cfg.total_experts();
            for cache in identity_cache_settings(3, all) {
                let what = format!("{name} {dtype:?} {cache:?}");
                let sel = engine(copy.path(), BackendKind::Selective, cache, dtype);
                assert!(bits_and_greedy(&sel, &seq, 10) == want, "{what}");
                assert!(sel.cache_snapshot().unwrap().misses > 0, "{what}");
            }
        }
    }
}

/// An extraction of a stacked checkpoint is the usual per-expert one (`verify` accepts it), and
/// selective reading it gives native's bits.
#[test]
fn a_stacked_checkpoint_extracts_expert_by_expert() {
    let copy = stacked_copy("qwen3-moe-tiny", |_| {});
    let m = copy.path().to_str().unwrap();
    let out = copy.path().join("extracted");
    let o = out.to_str().unwrap();
    let (rc, _, err) = run(&["extract", "--model", m, "--out", o, "--quiet"]);
    assert_eq!(rc, 0, "{err}");
    // The stacked checkpoint holds every expert, and its extraction checks out.
    for dir in [m, o] {
        let (rc, out, err) = run(&["verify", dir]);
        assert_eq!(rc, 0, "{dir}: {out}{err}");
    }
    let seq: Vec<u32> = (0..12u32).map(|i| (i * 53 + 11) % 380).collect();
    let want = bits_and_greedy(
        &engine(
            copy.path(),
            BackendKind::Native,
            Default::default(),
            Dtype::F32,
        ),
        &seq,
        8,
    );
    let cache = CacheSettings {
        cache_experts: Some(3),
        expert_source: SourceSpec::Extracted(out.clone()),
        ..Default::default()
    };
    let sel = engine(copy.path(), BackendKind::Selective, cache, Dtype::F32);
    assert!(bits_and_greedy(&sel, &seq, 8) == want);
}

#[test]
fn malformed_stacks_are_refused_by_name() {
    let layer0 = |rest: &str| format!("model.layers.0.mlp.experts.{rest}");
    // A stack of the wrong shape (the same bytes as [2E, I, H]).
    let copy = stacked_copy("qwen3-moe-tiny", |t| {
        let gu = t
            .iter_mut()
            .find(|x| x.0 == layer0("gate_up_proj"))
            .unwrap();
        gu.2 = vec![gu.2[0] * 2, gu.2[1] / 2, gu.2[2]];
    });
    expect_failure(copy.path(), &[&layer0("gate_up_proj"), "shape"]);
    // Half the pair.
    let copy = stacked_copy("qwen3-moe-tiny", |t| {
        t.retain(|x| x.0 != layer0("down_proj"))
    });
    expect_failure(copy.path(), &[&layer0("down_proj"), "missing"]);
    // FP8 bytes stacked: not read as floats.
    let copy = stacked_copy("qwen3-moe-tiny", |t| {
        let gu = t
            .iter_mut()
            .find(|x| x.0 == layer0("gate_up_proj"))
            .unwrap();
        gu.1 = StDtype::F8E4M3;
        gu.3.truncate(gu.3.len() / 2);
    });
    expect_failure(copy.path(), &[&layer0("gate_up_proj"), "FP8"]);
}
