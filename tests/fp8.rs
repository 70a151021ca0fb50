//! Block-scaled FP8 checkpoints in Qwen's published layout (`scripts/make_fp8_fixtures.py` makes
//! `tests/fixtures/fp8/` from the bf16 fixtures): the forward pass against transformers reading
//! the same FP8 file; selective bit-identical to native over FP8 experts, from the shards and
//! from an extraction; the cache budgeting FP8 bytes; and every malformed variant refused by name.

mod common;

use common::*;
use moescope::cache::settings::{CacheSettings, SourceSpec};
use moescope::engine::{BackendKind, Dtype, Engine};
use moescope::model::ports::NoObserver;
use moescope::model::qwen3_moe::Logits;
use moescope::model::{Checkpoint, MoeConfig};

const MOE: &str = "fp8/qwen3-moe-tiny-fp8";
const OMNI: &str = "fp8/qwen3-omni-tiny-fp8";

fn native(name: &str, dtype: Dtype) -> Engine {
    spec(name, BackendKind::Native, CacheSettings::default(), dtype)
        .load(|_, _| {})
        .unwrap()
}

fn logits(e: &Engine, tokens: &[u32], which: Logits) -> Vec<Vec<f32>> {
    let mut cache = e.model.new_cache();
    e.model
        .forward(
            tokens,
            &mut cache,
            e.provider.as_ref(),
            &mut NoObserver,
            which,
        )
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn the_scheme_comes_from_config_and_scales_are_located_through_the_index() {
    let cfg = MoeConfig::from_dir(&fixture(MOE)).unwrap();
    assert_eq!(cfg.quantization.unwrap().block, [32, 32]);
    let ckpt = Checkpoint::open(&fixture(OMNI)).unwrap();
    let cfg = MoeConfig::from_dir(&fixture(OMNI)).unwrap();
    assert_eq!(ckpt.fp8_scheme().unwrap().block, [128, 128]);
    let inv = ckpt.validate(&cfg).unwrap();
    assert_eq!((inv.present, inv.expected), (24, 24));
    // Layer 1's experts 0..3: weights in the first shard, scales in the second.
    let loc = ckpt.expert_location(&cfg, 1, 2).unwrap().unwrap();
    let (w, s) = (&loc.parts[0], loc.parts[0].scale.as_ref().unwrap());
    assert!(
        w.file.ends_with("model-00001-of-00003.safetensors"),
        "{w:?}"
    );
    assert!(
        s.file.ends_with("model-00002-of-00003.safetensors"),
        "{s:?}"
    );
    assert_eq!(s.shape, vec![1, 1]);
    // An expert is its FP8 bytes plus its scales: 3 × 32 × 64 + 3 × 4.
    assert_eq!(loc.bytes(), 3 * 32 * 64 + 3 * 4);
}

/// transformers' FineGrainedFP8 loader, reading the same file, dequantises into f32 exactly the
/// matrices moescope multiplies: only the summation order differs.
#[test]
fn f32_logits_match_transformers_reading_the_same_file() {
    let g = golden(MOE);
    let e = native(MOE, Dtype::F32);
    for (seq, want) in g.sequences.iter().zip(&g.logits_f32) {
        let got = logits(&e, seq, Logits::Last);
        let d = max_abs_diff(&got[0], want);
        eprintln!("fp8 f32 seq len {}: max abs diff {d:e}", seq.len());
        assert!(d <= F32_LOGIT_TOLERANCE, "seq len {}: {d}", seq.len());
    }
    let all = logits(&e, &g.sequences[2], Logits::All);
    for (i, (got, want)) in all.iter().zip(&g.all_logits_f32).enumerate() {
        let d = max_abs_diff(got, want);
        assert!(d <= F32_LOGIT_TOLERANCE, "position {i}: {d}");
    }
}

#[test]
fn greedy_tokens_and_routing_match_transformers() {
    let g = golden(MOE);
    let e = native(MOE, Dtype::F32);
    for case in &g.greedy {
        let (_, tokens) = bits_and_greedy(&e, &case.prompt, case.tokens.len());
        assert_eq!(tokens, case.tokens, "prompt {:?}", case.prompt);
    }
    assert_routing_is_golden(&e, &g, MOE);
}

/// bf16 compute against "dequantise, then bf16" (transformers reading the file in bf16): no
/// further from the f32 reference than twice transformers' own bf16 distance, plus 2 % of the
/// largest logit — the bound the bf16 fidelity test uses.
#[test]
fn bf16_logits_are_as_close_as_dequantise_then_bf16() {
    let g = golden(MOE);
    let e = native(MOE, Dtype::Bf16);
    for (i, seq) in g.sequences.iter().enumerate() {
        let got = logits(&e, seq, Logits::Last);
        let ours = max_abs_diff(&got[0], &g.logits_f32[i]);
        let theirs = max_abs_diff(&g.logits_bf16[i], &g.logits_f32[i]);
        let scale = g.logits_f32[i].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        eprintln!("fp8 bf16 seq {i}: ours {ours:.4} transformers {theirs:.4} max {scale:.2}");
        assert!(
            ours <= 2.0 * theirs + 0.02 * scale,
            "seq {i}: {ours} vs {theirs}"
        );
    }
}

/// Selective over FP8 experts — every capacity, policy and scope, f32 and bf16, both layouts —
/// gives native's logits bit for bit and the same tokens.
#[test]
fn selective_over_fp8_experts_is_bit_identical_to_native() {
    let seq: Vec<u32> = (0..16u32).map(|i| (i * 37 + 5) % 380).collect();
    for name in [MOE, OMNI] {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let want = bits_and_greedy(&native(name, dtype), &seq, 10);
            let all = native(name, dtype).cfg.total_experts();
            for cache in identity_cache_settings(3, all) {
                let what = format!("{name} {dtype:?} {cache:?}");
                let sel = spec(name, BackendKind::Selective, cache, dtype)
                    .load(|_, _| {})
                    .unwrap();
                assert!(bits_and_greedy(&sel, &seq, 10) == want, "{what}");
                assert!(sel.cache_snapshot().unwrap().misses > 0);
            }
        }
    }
}

/// `extract` writes each FP8 expert with its scales (checksummed), `verify` accepts the result,
/// and selective reading it gives native's bits.
#[test]
fn extraction_keeps_the_scales_and_runs_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let (rc, _, err) = run(&[
        "extract",
        "--model",
        fixture(OMNI).to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(rc, 0, "{err}");
    let (rc, text, _) = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(rc, 0, "{text}");
    assert!(text.contains("COMPLETE"), "{text}");
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(
        manifest.contains("weight_scale_inv"),
        "scales in the manifest"
    );
    let seq: Vec<u32> = (0..12u32).map(|i| (i * 53 + 9) % 380).collect();
    let want = bits_and_greedy(&native(OMNI, Dtype::F32), &seq, 8);
    let cache = CacheSettings {
        cache_experts: Some(4),
        expert_source: SourceSpec::Extracted(out.clone()),
        ..Default::default()
    };
    let sel = spec(OMNI, BackendKind::Selective, cache, Dtype::F32)
        .load(|_, _| {})
        .unwrap();
    assert!(bits_and_greedy(&sel, &seq, 8) == want);

    // A scale damaged inside an extracted file: verify finds it by its checksum.
    let file = out.join("experts/layer_001/expert_002.safetensors");
    let mut b = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    b[8 + n] ^= 0x40;
    std::fs::write(&file, b).unwrap();
    let (rc, text, _) = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(rc, 1, "{text}");
    assert!(
        text.contains("layer 1 expert 2") && text.contains("BLAKE3"),
        "{text}"
    );
}

/// The cache counts an FP8 expert as stored (one byte per weight, scales in f32), so
/// `--cache-mem` buys about four times the experts it buys in f32.
#[test]
fn the_cache_budgets_fp8_bytes() {
    let per_expert = 3 * 32 * 64 + 4 * (2 + 2 + 2); // gate/up [32,64]: 1×2 scales; down [64,32]: 2×1
    let cache = CacheSettings {
        cache_mem: Some(5 * per_expert as u64),
        ..Default::default()
    };
    let sel = spec(MOE, BackendKind::Selective, cache, Dtype::F32)
        .load(|_, _| {})
        .unwrap();
    let c = sel.cache.as_ref().unwrap();
    assert_eq!(c.expert_bytes(), per_expert as u64);
    assert_eq!(c.capacity_experts(), 5);
    let native = native(MOE, Dtype::F32);
    assert_eq!(
        native.provider.resident_bytes(),
        (native.cfg.total_experts() * per_expert) as u64
    );
    // Estimates and a miss's cost use the same figures: scales are stored in f32 here too.
    let sizes =
        moescope::model::held::held_sizes(&fixture(MOE), &native.cfg, 4, true, false).unwrap();
    assert_eq!(sizes.stored_mean, per_expert as f64);
    assert_eq!(sizes.expert_max, per_expert as u64);
    assert_eq!(sizes.experts_total, native.provider.resident_bytes());
    let non_expert = sizes.non_expert;
    // The attention and lm_head matrices are FP8 too: well under their f32 size.
    assert!(non_expert < native.cfg.non_expert_params() * 4 / 2);
    assert_eq!(
        moescope::model::held::expert_format(&fixture(MOE), Some(&native.cfg)).as_deref(),
        Some("FP8 experts (e4m3, 32×32 blocks)")
    );
}

#[test]
fn an_unsupported_or_incomplete_scheme_is_refused_by_field() {
    for (edit, needles) in [
        (
            serde_json::json!({"quant_method": "awq", "bits": 4}),
            vec!["quantization_config.quant_method", "awq", "fp8"],
        ),
        (
            serde_json::json!({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [32, 32]}),
            vec!["quantization_config.fmt", "e5m2"],
        ),
        (
            serde_json::json!({"quant_method": "fp8", "fmt": "e4m3"}),
            vec!["quantization_config.weight_block_size", "per tensor"],
        ),
        (
            serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static",
                               "weight_block_size": [32, 32]}),
            vec!["quantization_config.activation_scheme", "static", "dynamic"],
        ),
    ] {
        let d = copy_fixture(MOE);
        edit_json(&d.path().join("config.json"), |v| {
            v["quantization_config"] = edit.clone()
        });
        let mut want = vec!["config.json"];
        want.extend(needles);
        expect_failure(d.path(), &want);
    }
}

#[test]
fn fp8_tensors_without_a_scheme_or_scales_are_refused_by_name() {
    // No quantization_config: the first FP8 tensor met is named, and why it cannot be read.
    let d = copy_fixture(MOE);
    edit_json(&d.path().join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("quantization_config");
    });
    expect_failure(d.path(), &["F8_E4M3", "quantization_config", "self_attn"]);

    // A block size that does not fit the stored scales.
    let d = copy_fixture(MOE);
    edit_json(&d.path().join("config.json"), |v| {
        v["quantization_config"]["weight_block_size"] = serde_json::json!([64, 64])
    });
    expect_failure(d.path(), &["weight_scale_inv", "expected [2, 1]", "64×64"]);

    // An attention matrix's scales missing (renamed away in the header).
    let d = copy_fixture(MOE);
    edit_header(&d.path().join("model.safetensors"), |h| {
        let o = h.as_object_mut().unwrap();
        let v = o
            .remove("model.layers.1.self_attn.k_proj.weight_scale_inv")
            .unwrap();
        o.insert("unrelated.weight_scale_inv".into(), v);
    });
    expect_failure(
        d.path(),
        &[
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.1.self_attn.k_proj.weight_scale_inv",
            "not in the checkpoint",
        ],
    );

    // An expert's scales of the wrong shape (same byte count, so the file itself is sound).
    let d = copy_fixture(MOE);
    let name = "model.layers.2.mlp.experts.5.down_proj.weight_scale_inv";
    edit_header(&d.path().join("model.safetensors"), |h| {
        h[name]["shape"] = serde_json::json!([1, 2]);
    });
    expect_failure(d.path(), &[name, "[1, 2]", "expected [2, 1]"]);

    // Integer "scales".
    let d = copy_fixture(MOE);
    let name = "model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv";
    edit_header(&d.path().join("model.safetensors"), |h| {
        h[name]["dtype"] = "I32".into();
    });
    expect_failure(d.path(), &[name, "I32", "F32, BF16 or F16"]);

    // Scales shifted by one value onto their neighbour's bytes: the same length, so only the
    // file's layout shows it.
    let d = copy_fixture(MOE);
    let name = "model.layers.1.self_attn.o_proj.weight_scale_inv";
    edit_header(&d.path().join("model.safetensors"), |h| {
        let o = &mut h[name]["data_offsets"];
        let (a, z) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
        *o = serde_json::json!([a + 4, z + 4]);
    });
    expect_failure(
        d.path(),
        &["model.safetensors", name, "must tile the data section"],
    );

    // A NaN scale of an attention matrix, and an infinite one in every expert of layer 2 (so
    // selective meets one whatever the routing): refused where the matrix is built, naming it and
    // the block, not later as logits that are not numbers.
    let experts: Vec<String> = (0..8)
        .map(|e| format!("model.layers.2.mlp.experts.{e}.up_proj.weight_scale_inv"))
        .collect();
    for (names, bits, needles) in [
        (
            vec!["model.layers.0.self_attn.q_proj.weight_scale_inv".to_string()],
            f32::NAN.to_bits(),
            vec![
                "model.layers.0.self_attn.q_proj.weight",
                "weight_scale_inv[0][1]) is NaN",
            ],
        ),
        (
            experts,
            f32::INFINITY.to_bits(),
            vec![
                "model.layers.2.mlp.experts.",
                "up_proj.weight",
                "weight_scale_inv[0][1]) is inf",
            ],
        ),
    ] {
        let d = copy_fixture(MOE);
        let path = d.path().join("model.safetensors");
        let st = moescope::model::safetensors_file::SafetensorsFile::open(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        for name in &names {
            let at = st.info(name).unwrap().offset as usize + 4; // the second scale
            bytes[at..at + 4].copy_from_slice(&bits.to_le_bytes());
        }
        drop(st);
        std::fs::write(&path, bytes).unwrap();
        expect_failure(d.path(), &[&needles[..], &["damaged"]].concat());
        // Selective builds an expert at its first miss: the same refusal, exit 2, no panic.
        let (rc, _, err) = common::run(&[
            "generate",
            "--model",
            d.path().to_str().unwrap(),
            "--backend",
            "selective",
            "--token-ids",
            "1",
            "2",
            "3",
            "--max-new-tokens",
            "4",
        ]);
        assert_eq!(rc, 2, "{err}");
        assert!(
            needles.iter().all(|n| err.contains(n)) && !err.contains("panicked"),
            "{err}"
        );
        // `verify` reads the scales too (a GPU slot pool copies them as stored, so nothing
        // else would see them before the logits stop being numbers): the matrix named, with
        // its block, and the checkpoint not complete.
        let (rc, text, err) = common::run(&["verify", d.path().to_str().unwrap()]);
        assert_eq!(rc, 1, "{text}{err}");
        assert!(
            needles.iter().all(|n| text.contains(n)) && text.contains("INCOMPLETE"),
            "{text}"
        );
        if names.len() > 1 {
            for e in 0..8 {
                assert!(text.contains(&format!("layer 2 expert {e}")), "{text}");
            }
            // Extracted as stored (its checksums those of the damaged bytes), the scales are
            // still read by `verify` on the extraction.
            let out = d.path().join("x");
            let (rc, _, err) = common::run(&[
                "extract",
                "--model",
                d.path().to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--quiet",
            ]);
            assert_eq!(rc, 0, "{err}");
            let (rc, text, err) = common::run(&["verify", out.to_str().unwrap()]);
            assert_eq!(rc, 1, "{text}{err}");
            for e in 0..8 {
                assert!(text.contains(&format!("layer 2 expert {e}")), "{text}");
            }
            assert!(
                needles.iter().all(|n| text.contains(n)) && text.contains("INCOMPLETE"),
                "{text}"
            );
        }
    }
    // The undamaged fixture: every scale finite, complete.
    let (rc, text, err) = common::run(&["verify", fixture(MOE).to_str().unwrap()]);
    assert_eq!(rc, 0, "{text}{err}");
    assert!(
        text.contains("COMPLETE") && !text.contains("INCOMPLETE"),
        "{text}"
    );
}

/// `bench kld --against`: the quantization's own cost, against the checkpoint it was made from
/// (run by moescope in f32) — zero against itself, positive against the bf16 original.
#[test]
fn kld_against_the_bf16_original_reports_the_quantization() {
    // A few thousand characters of English: byte-level tokens, a few hundred positions.
    let words = std::fs::read_to_string(fixture("common_words.txt")).unwrap();
    let text = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(text.path(), &words[..words.len().min(3000)]).unwrap();
    let text = text.path();
    let kld = |model: &str, against: &str| -> serde_json::Value {
        let (rc, out, err) = run(&[
            "bench",
            "kld",
            "--model",
            fixture(model).to_str().unwrap(),
            "--against",
            fixture(against).to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--ctx",
            "32",
            "--json",
        ]);
        assert_eq!(rc, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let same = kld("qwen3-moe-tiny", "qwen3-moe-tiny");
    assert!(same["mean_kl"].as_f64().unwrap().abs() < 1e-6, "{same}");
    assert_eq!(same["top1_agreement_pct"].as_f64(), Some(100.0));
    let fp8 = kld(MOE, "qwen3-moe-tiny");
    let mean = fp8["mean_kl"].as_f64().unwrap();
    assert!(mean > 1e-6 && mean < 1.0, "{fp8}");
    assert!(fp8["positions"].as_u64().unwrap() > 100, "{fp8}");
    // Too short a text for one chunk: an error, not an empty result.
    let short = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(short.path(), "a b").unwrap();
    let (rc, _, err) = run(&[
        "bench",
        "kld",
        "--model",
        fixture(MOE).to_str().unwrap(),
        "--against",
        fixture("qwen3-moe-tiny").to_str().unwrap(),
        "--text",
        short.path().to_str().unwrap(),
    ]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("chunk of 64"), "{err}");
}

/// `bench kld --candle`: moescope against candle-transformers' own model of the same file, on
/// the same device and dtype. In f32 on the CPU the two compute the same arithmetic up to
/// summation order (both take candle's ops), so the distributions agree to float rounding; a
/// GGUF file's reference (`quantized_qwen3_moe`) runs on CUDA only, which the CPU run says.
#[test]
fn kld_against_candle_transformers_on_the_same_file() {
    let words = std::fs::read_to_string(fixture("common_words.txt")).unwrap();
    let text = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(text.path(), &words[..words.len().min(3000)]).unwrap();
    let args = |model: &std::path::Path, dtype: &'static str| -> Vec<String> {
        [
            "bench",
            "kld",
            "--candle",
            "--model",
            model.to_str().unwrap(),
            "--text",
            text.path().to_str().unwrap(),
            "--ctx",
            "32",
            "--dtype",
            dtype,
            "--json",
        ]
        .map(String::from)
        .to_vec()
    };
    let kld = |model: &std::path::Path, dtype: &'static str| -> serde_json::Value {
        let a = args(model, dtype);
        let (rc, out, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(rc, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    // The bundled model: every layer MoE, as candle-transformers' qwen3_moe requires.
    let bundled = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-moe");
    let f32 = kld(&bundled, "f32");
    assert!(f32["positions"].as_u64().unwrap() > 100, "{f32}");
    assert!(f32["mean_kl"].as_f64().unwrap().abs() < 1e-6, "{f32}");
    assert!(f32["max_kl"].as_f64().unwrap() < 1e-5, "{f32}");
    assert!(
        f32["max_likely_log_prob_diff"].as_f64().unwrap() < 1e-3,
        "{f32}"
    );
    assert_eq!(f32["top1_agreement_pct"].as_f64(), Some(100.0));
    // bf16: two roundings of the same weights — close, not equal.
    let bf16 = kld(&bundled, "bf16");
    let mean = bf16["mean_kl"].as_f64().unwrap();
    assert!(mean > 1e-7 && mean < 0.1, "{bf16}");

    let gguf = fixture("gguf").join("kquant-Q8_0.gguf");
    let a = args(&gguf, "f32");
    let (rc, _, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("CUDA only"), "{err}");
    // One reference at a time.
    let (rc, _, err) = run(&[
        "bench",
        "kld",
        "--candle",
        "--base",
        "x.bin",
        "--model",
        gguf.to_str().unwrap(),
    ]);
    assert_ne!(rc, 0);
    assert!(err.contains("--base") && err.contains("--candle"), "{err}");
}

/// candle-transformers has no FP8 model: its qwen3_moe would cast the e4m3 weights and never
/// read their scales, so `bench decode` and `bench kld --candle` refuse an FP8 checkpoint by
/// name instead of comparing against another model.
#[test]
fn candle_transformers_is_not_offered_as_an_fp8_reference() {
    let model = fixture(MOE);
    let model = model.to_str().unwrap();
    let decode = [
        "bench",
        "decode",
        "--model",
        model,
        "--prompt-tokens",
        "4",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
    ];
    for args in [
        decode.to_vec(),
        vec!["bench", "kld", "--candle", "--model", model, "--ctx", "32"],
    ] {
        let (rc, _, err) = run(&args);
        assert_eq!(rc, 2, "{args:?}: {err}");
        assert!(
            err.contains("qwen3-moe-tiny-fp8") && err.contains("no model for block-scaled FP8"),
            "{args:?}: {err}"
        );
    }
    // Without the reference the FP8 file is benchmarked as usual.
    let (rc, out, err) = run(&[&decode[..], &["--no-reference"]].concat());
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("tok/s"), "{out}");
}
