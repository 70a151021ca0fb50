//! GGUF files written by llama.cpp's own converter and `llama-quantize`
//! (`scripts/make_gguf_fixtures.sh` makes `tests/fixtures/gguf/`): the config, tokenizer and
//! weights are read from the file; selective over block-quantized experts is bit-identical to
//! native; and the file's weights, dequantised and run through the safetensors path, give the
//! same tokens. (candle-transformers' `quantized_qwen3_moe` runs its experts on CUDA only.)

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use moescope::cache::settings::CacheSettings;
use moescope::engine::{BackendKind, BackendSpec, DeviceSpec, Dtype, Engine};
use moescope::model::lut4::{Lut4, Lut4Matrix};
use moescope::model::ports::RoutingLog;
use moescope::model::qwen3_moe::Logits;
use moescope::model::safetensors_file::StDtype;
use moescope::model::tokenizer::TextTokenizer;
use moescope::model::{Checkpoint, MoeConfig};
use moescope::settings::Settings;

/// llama-quantize's Q8_0, Q4_K_M (mixed: Q4_K and Q6_K experts), MXFP4_MOE (experts in
/// MXFP4, which moescope decodes itself; the rest Q8_0), that with the tied token embedding
/// and the query projections in MXFP4 too (`--tensor-type`; widened at load), and IQ4_XS and
/// IQ4_NL (experts and attention in the i-quant, decoded by moescope; the token embedding Q6_K).
const TYPES: [&str; 6] = [
    "Q8_0",
    "Q4_K_M",
    "MXFP4_MOE",
    "MXFP4_ATTN",
    "IQ4_XS",
    "IQ4_NL",
];

fn gguf(kind: &str) -> std::path::PathBuf {
    fixture("gguf").join(format!("kquant-{kind}.gguf"))
}

fn spec(kind: &str, backend: BackendKind, cache: CacheSettings, dtype: Dtype) -> BackendSpec {
    BackendSpec {
        model_dir: gguf(kind),
        dtype,
        device: DeviceSpec::cpu(),
        backend,
        cache,
        settings: Settings::default(),
    }
}

/// A fixed token sequence inside the fixtures' 4,096-token vocabulary.
fn sequence() -> Vec<u32> {
    (0..20u32).map(|i| (i * 977 + 31) % 4000).collect()
}

/// Bits of every position's logits, then 12 greedy tokens.
fn run(e: &Engine, seq: &[u32]) -> (Vec<u32>, Vec<u32>) {
    bits_and_greedy(e, seq, 12)
}

#[test]
fn config_comes_from_the_metadata() {
    for kind in TYPES {
        let cfg = MoeConfig::from_dir(&gguf(kind)).unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
            ),
            (4096, 256, 2, 4, 2, 64),
            "{kind}"
        );
        assert_eq!(
            (
                cfg.num_experts,
                cfg.num_experts_per_tok,
                cfg.moe_intermediate_size,
                cfg.norm_topk_prob,
                cfg.tie_word_embeddings,
            ),
            (4, 2, 256, true, true),
            "{kind}"
        );
        assert!(cfg.eos_token_ids.contains(&2), "{:?}", cfg.eos_token_ids);
        assert!((cfg.rms_norm_eps - 1e-6).abs() < 1e-12);
    }
}

#[test]
fn experts_are_byte_ranges_of_the_stacked_tensors_in_their_own_types() {
    let ckpt = Checkpoint::open(&gguf("Q4_K_M")).unwrap();
    let cfg = MoeConfig::from_dir(&gguf("Q4_K_M")).unwrap();
    let inv = ckpt.validate(&cfg).unwrap();
    assert_eq!((inv.present, inv.expected), (8, 8));
    let types = ckpt.gguf().unwrap().expert_types();
    // Q4_K_M keeps some ffn_down stacks in Q6_K: a mixed file.
    assert!(types.contains_key("Q4_K"), "{types:?}");
    assert!(types.keys().any(|t| *t != "Q4_K"), "{types:?}");
    for layer in 0..2 {
        let a = ckpt.expert_location(&cfg, layer, 0).unwrap().unwrap();
        let b = ckpt.expert_location(&cfg, layer, 1).unwrap().unwrap();
        for (pa, pb) in a.parts.iter().zip(&b.parts) {
            assert_eq!(pa.offset + pa.len, pb.offset, "experts follow each other");
            assert_eq!(pa.shape.iter().product::<usize>(), 256 * 256);
            // Block bytes, not bf16 ones: Q4_K is 144 bytes per 256, Q6_K 210.
            assert!(pa.len == 256 * 144 || pa.len == 256 * 210, "{}", pa.len);
        }
    }
}

#[test]
fn tokenizer_and_template_come_from_the_file() {
    let from_file = TextTokenizer::from_dir(&gguf("Q8_0")).unwrap();
    let from_repo = TextTokenizer::from_dir(&moescope::engine::default_model_dir()).unwrap();
    for text in [
        "Hello, world! It's 2026.",
        "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n",
        "  spaces\tand\nnewlines  ",
        "naïve café — 東京",
    ] {
        assert_eq!(
            from_file.encode(text).unwrap(),
            from_repo.encode(text).unwrap(),
            "{text:?}"
        );
    }
    let ids = from_repo.encode("The sun is a star.").unwrap();
    assert_eq!(from_file.decode(&ids), from_repo.decode(&ids));
    let style = moescope::model::tokenizer::PromptStyle::default();
    assert_eq!(
        from_file.prompt_ids("Why is the sky blue?", style).unwrap(),
        from_repo.prompt_ids("Why is the sky blue?", style).unwrap()
    );
}

#[test]
fn selective_over_quantized_experts_is_bit_identical_to_native() {
    let seq = sequence();
    for kind in TYPES {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let native = spec(kind, BackendKind::Native, CacheSettings::default(), dtype)
                .load(|_, _| {})
                .unwrap();
            let want = run(&native, &seq);
            let all = native.cfg.total_experts();
            for cache in identity_cache_settings(2, all) {
                let what = format!("{kind} {dtype:?} {cache:?}");
                let sel = spec(kind, BackendKind::Selective, cache, dtype)
                    .load(|_, _| {})
                    .unwrap();
                assert!(run(&sel, &seq) == want, "{what}: differs from native");
                let snap = sel.cache_snapshot().unwrap();
                assert!(snap.misses > 0);
            }
        }
    }
}

#[test]
fn a_quantized_cache_budgets_block_bytes() {
    // Q8_0: 34 bytes per 32 weights, MXFP4 17, IQ4_XS 17 (136 per 256), IQ4_NL 18; an expert
    // is 3 × 256 × 256 weights.
    for (kind, per_32) in [
        ("Q8_0", 34),
        ("MXFP4_MOE", 17),
        ("IQ4_XS", 17),
        ("IQ4_NL", 18),
    ] {
        let per_expert = 3 * 256 * 256 / 32 * per_32;
        let cache = CacheSettings {
            cache_mem: Some(3 * per_expert as u64),
            ..Default::default()
        };
        let sel = spec(kind, BackendKind::Selective, cache, Dtype::F32)
            .load(|_, _| {})
            .unwrap();
        let c = sel.cache.as_ref().unwrap();
        assert_eq!(c.expert_bytes(), per_expert as u64, "{kind}");
        assert_eq!(c.capacity_experts(), 3, "{kind}");
    }
}

/// moescope's decoding of the table-coded types (MXFP4, IQ4_XS, IQ4_NL) against gguf-py's
/// (llama.cpp's Python package, run by `scripts/make_gguf_fixtures.sh` on the same files): one
/// row of expert 3 of each of the six stacks, bit for bit.
#[test]
fn table_coded_decoding_is_gguf_pys_bit_for_bit() {
    for (kind, format) in [
        ("MXFP4_MOE", Lut4::Mxfp4),
        ("IQ4_XS", Lut4::Iq4Xs),
        ("IQ4_NL", Lut4::Iq4Nl),
    ] {
        decoded_rows_match(kind, format);
    }
}

fn decoded_rows_match(kind: &str, format: Lut4) {
    let path = gguf(kind);
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gguf").join(format!("kquant-{kind}.rows.json"))).unwrap(),
    )
    .unwrap();
    let (expert, row) = (want["expert"].as_u64().unwrap() as usize, 5);
    assert_eq!(want["row"], 5);
    let ckpt = Checkpoint::open(&path).unwrap();
    let cfg = MoeConfig::from_dir(&path).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let mut seen = 0;
    for layer in cfg.moe_layers() {
        let loc = ckpt.expert_location(&cfg, layer, expert).unwrap().unwrap();
        for part in &loc.parts {
            assert_eq!(part.dtype, StDtype::Lut4(format), "{}", part.name);
            let bits: Vec<u32> = want["f32_bits"][part.name.as_str()]
                .as_array()
                .unwrap_or_else(|| panic!("{} not in the fixture", part.name))
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let mut bytes = vec![0u8; part.len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, part.offset).unwrap();
            let m = Lut4Matrix::new(format, bytes, [part.shape[0], part.shape[1]]).unwrap();
            let got: Vec<u32> = m
                .dequantize(DType::F32)
                .unwrap()
                .get(row)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, bits, "{} expert {expert} row {row}", part.name);
            assert!(bits.iter().any(|&b| b != 0));
            seen += 1;
        }
    }
    assert_eq!(seen, 6);
}

/// A mixed file (Q4_K_M: some layers' ffn_down in Q6_K, others in Q4_K) is budgeted at its
/// largest layer's expert, so `--cache-mem` is never exceeded by the layers stored larger.
#[test]
fn a_mixed_quantized_cache_budgets_its_largest_experts() {
    let ckpt = Checkpoint::open(&gguf("Q4_K_M")).unwrap();
    let cfg = MoeConfig::from_dir(&gguf("Q4_K_M")).unwrap();
    let sizes: Vec<u64> = cfg
        .moe_layers()
        .map(|l| {
            let loc = ckpt.expert_location(&cfg, l, 0).unwrap().unwrap();
            loc.parts.iter().map(|p| p.len).sum()
        })
        .collect();
    let (small, large) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
    assert!(small < large, "the fixture mixes down types: {sizes:?}");
    let cache = CacheSettings {
        cache_mem: Some(3 * large),
        ..Default::default()
    };
    let sel = spec("Q4_K_M", BackendKind::Selective, cache, Dtype::F32)
        .load(|_, _| {})
        .unwrap();
    let c = sel.cache.as_ref().unwrap();
    assert_eq!(c.expert_bytes(), large);
    assert_eq!(c.capacity_experts(), 3);
}

/// The file's weights dequantised to f32 and written as a safetensors checkpoint — the layout
/// moescope's other tests check against transformers — so the GGUF path (names, shapes, row
/// order, expert slicing, block decoding) is checked against the safetensors path.
fn dequantised_copy(kind: &str, dir: &std::path::Path) {
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    use moescope::model::config::ExpertProj;
    use std::os::unix::fs::FileExt;
    let path = gguf(kind);
    let ckpt = Checkpoint::open(&path).unwrap();
    let cfg = MoeConfig::from_dir(&path).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in Checkpoint::required_tensors(&cfg) {
        let t = ckpt.load(&name, &shape, DType::F32, &Device::Cpu).unwrap();
        tensors.insert(name, t);
    }
    let file = std::fs::File::open(&path).unwrap();
    for layer in cfg.moe_layers() {
        for e in 0..cfg.num_experts {
            let loc = ckpt.expert_location(&cfg, layer, e).unwrap().unwrap();
            for (proj, part) in ExpertProj::ALL.into_iter().zip(&loc.parts) {
                let mut bytes = vec![0u8; part.len as usize];
                file.read_exact_at(&mut bytes, part.offset).unwrap();
                let t = match part.dtype.ggml() {
                    Some(g) => qtensor_from_ggml(g, &bytes, part.shape.clone(), &Device::Cpu)
                        .unwrap()
                        .dequantize(&Device::Cpu)
                        .unwrap(),
                    // Decoded as `table_coded_decoding_is_gguf_pys_bit_for_bit` checks.
                    None if part.dtype.lut4().is_some() => {
                        let [r, c] = [part.shape[0], part.shape[1]];
                        Lut4Matrix::new(part.dtype.lut4().unwrap(), bytes, [r, c])
                            .unwrap()
                            .dequantize(DType::F32)
                            .unwrap()
                    }
                    None => Tensor::from_raw_buffer(
                        &bytes,
                        part.dtype.float_dtype().unwrap(),
                        &part.shape,
                        &Device::Cpu,
                    )
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
                };
                tensors.insert(cfg.expert_tensor_name(layer, e, proj), t);
            }
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "qwen3_moe", "vocab_size": 4096, "hidden_size": 256,
        "intermediate_size": 512, "moe_intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": true,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": true, "eos_token_id": [2, 0]
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

#[test]
fn matches_its_own_weights_dequantised_through_the_safetensors_path() {
    let seq = sequence();
    for kind in TYPES {
        let dir = tempfile::tempdir().unwrap();
        dequantised_copy(kind, dir.path());
        let load = |model: std::path::PathBuf| {
            BackendSpec {
                model_dir: model,
                dtype: Dtype::F32,
                device: DeviceSpec::cpu(),
                backend: BackendKind::Native,
                cache: CacheSettings::default(),
                settings: Settings::default(),
            }
            .load(|_, _| {})
            .unwrap()
        };
        let quant = load(gguf(kind));
        let dense = load(dir.path().to_path_buf());
        let logits = |e: &Engine| -> (Vec<f32>, RoutingLog) {
            let mut cache = e.model.new_cache();
            let mut log = RoutingLog::default();
            let l = e
                .model
                .forward(&seq, &mut cache, e.provider.as_ref(), &mut log, Logits::All)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (l, log)
        };
        let ((q, qr), (d, dr)) = (logits(&quant), logits(&dense));
        // Positions where every layer picked the same experts. The random fixture's router
        // has near ties that the activations' rounding can flip; where it does, the outputs
        // are of different experts and not comparable.
        let same: Vec<usize> = (0..seq.len())
            .filter(|&p| {
                let at = |r: &RoutingLog| -> Vec<Vec<u32>> {
                    r.entries
                        .iter()
                        .filter(|(_, pos, _)| *pos == p)
                        .map(|(_, _, ex)| {
                            let mut ex = ex.clone();
                            ex.sort();
                            ex
                        })
                        .collect()
                };
                at(&qr) == at(&dr)
            })
            .collect();
        assert!(
            same.len() * 10 >= seq.len() * 8,
            "{kind}: routing agrees at only {} of {} positions",
            same.len(),
            seq.len()
        );
        let v = 4096;
        let mut worst = 0f32;
        for &p in &same {
            let (a, b) = (&q[p * v..(p + 1) * v], &d[p * v..(p + 1) * v]);
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = max_abs_diff(a, b);
            worst = worst.max(diff / scale);
            let argmax = |x: &[f32]| (0..x.len()).max_by(|&i, &j| x[i].total_cmp(&x[j])).unwrap();
            // The top token must be the same wherever the dense run's lead over the runner-up
            // is more than twice the difference (the random fixture has near ties).
            let mut sorted = b.to_vec();
            sorted.sort_by(|x, y| y.total_cmp(x));
            if sorted[0] - sorted[1] > 2.0 * diff {
                assert_eq!(argmax(a), argmax(b), "{kind} position {p}: top-1");
            }
        }
        eprintln!(
            "{kind}: routing the same at {} of {} positions; there, max |Δlogit| ≤ {:.2} % of the largest logit",
            same.len(),
            seq.len(),
            100.0 * worst
        );
        // What is left is the quantized products rounding their f32 activations to 8-bit
        // blocks (Q8_0, or Q8_K for k-quants) before the dot product, as llama.cpp does.
        assert!(
            worst <= 0.06,
            "{kind}: logits differ by {:.2} %",
            100.0 * worst
        );
    }
}

/// Damaged and foreign files: an error naming the file and what is wrong, a non-zero exit, no
/// panic — for every command that opens a model.
#[test]
fn damaged_or_foreign_gguf_files_are_refused_by_name() {
    let good = std::fs::read(gguf("Q8_0")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let at = good
        .windows(8)
        .position(|w| w == b"qwen3moe")
        .expect("the architecture string");
    let mut foreign = good.clone();
    foreign[at..at + 8].copy_from_slice(b"llama4xx");
    // One expert stack retyped to llama.cpp's IQ2_XXS (GGML type 16), which neither candle nor
    // moescope reads.
    let iquant = retyped(&good, "blk.0.ffn_down_exps.weight", 8, 16);
    // Retyped to Q4_0 (type 2), a type both read: 18 bytes a block instead of 34, so the stack
    // still fits the file and only the layout shows it would be read from the wrong bytes.
    let shrunk = retyped(&good, "blk.0.ffn_down_exps.weight", 8, 2);
    // attn_v renamed attn_k: candle's reader keeps one of the two under that name.
    let mut twice = good.clone();
    let v = twice
        .windows(19)
        .position(|w| w == b"blk.0.attn_v.weight")
        .expect("attn_v");
    twice[v..v + 19].copy_from_slice(b"blk.0.attn_k.weight");
    // block_count edited down from 2 to 1 (a u32 after the key and its type): block 1's
    // tensors would be left out of the forward pass.
    let mut fewer = good.clone();
    let key = b"qwen3moe.block_count";
    let k = fewer
        .windows(key.len())
        .position(|w| w == key)
        .expect("block_count")
        + key.len();
    assert_eq!(fewer[k..k + 8], [4, 0, 0, 0, 2, 0, 0, 0], "u32 2");
    fewer[k + 4] = 1;
    // The norms' epsilon renamed away: llama.cpp requires it, and a guess changes every norm.
    let mut no_eps = good.clone();
    let key = b"qwen3moe.attention.layer_norm_rms_epsilon";
    let k = no_eps
        .windows(key.len())
        .position(|w| w == key)
        .expect("rms eps");
    no_eps[k + key.len() - 1] = b'X';
    let cases = [
        (
            write("fewer.gguf", &fewer),
            "field `qwen3moe.block_count`: 1, but the file holds tensors of block 1",
        ),
        (
            write("no-eps.gguf", &no_eps),
            "field `qwen3moe.attention.layer_norm_rms_epsilon`: missing",
        ),
        (
            write("shrunk.gguf", &shrunk),
            "tensor `blk.0.ffn_down_exps.weight`: its 147456 bytes (Q4_0, shape [4, 256, 256])",
        ),
        (
            write("twice.gguf", &twice),
            "tensor `blk.0.attn_k.weight`: listed twice in the tensor table",
        ),
        (
            write("iquant.gguf", &iquant),
            "tensor `blk.0.ffn_down_exps.weight`: stored as IQ2_XXS (GGML type 16), which \
             moescope cannot compute with",
        ),
        (
            write("truncated.gguf", &good[..good.len() / 2]),
            "beyond the end of the file",
        ),
        (
            write("header.gguf", &good[..3000]),
            "not a readable GGUF header",
        ),
        (write("foreign.gguf", &foreign), "general.architecture"),
        (
            write("magic-only.gguf", b"GGUF"),
            "not a readable GGUF header",
        ),
    ];
    for (path, want) in &cases {
        let p = path.to_str().unwrap();
        for args in [
            vec![
                "generate",
                "--model",
                p,
                "--prompt",
                "hi",
                "--max-new-tokens",
                "2",
            ],
            vec![
                "generate",
                "--model",
                p,
                "--backend",
                "selective",
                "--token-ids",
                "1",
                "2",
            ],
            vec![
                "run",
                "--no-tui",
                "--model",
                p,
                "--prompt",
                "hi",
                "--max-new-tokens",
                "2",
            ],
            vec!["verify", p],
        ] {
            let (rc, _, err) = common::run(&args);
            assert_ne!(rc, 0, "{args:?}");
            assert!(err.contains(p) && err.contains(want), "{args:?}: {err}");
            assert!(!err.contains("panicked"), "{args:?}: {err}");
        }
    }
    mxfp4_files_with_a_nan_scale_or_a_foreign_type_are_refused_by_name(dir.path());
    let (rc, out, err) = common::run(&["verify", gguf("Q4_K_M").to_str().unwrap()]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("COMPLETE: all 8 experts present"), "{out}");
    let (rc, _, err) = common::run(&[
        "extract",
        "--model",
        gguf("Q8_0").to_str().unwrap(),
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_ne!(rc, 0);
    assert!(err.contains("read from the file itself"), "{err}");
}

/// `file` with the stacked tensor `name` (three dimensions) retyped from GGML type `from` to
/// `to` in its header: the type id follows the name, the dimension count and the dimensions.
fn retyped(file: &[u8], name: &str, from: u32, to: u32) -> Vec<u8> {
    let at_name = file
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .expect("the tensor's name");
    let ty = at_name + name.len() + 4 + 3 * 8;
    let mut out = file.to_vec();
    assert_eq!(
        &out[ty..ty + 4],
        &from.to_le_bytes(),
        "{name}: type {from} before"
    );
    out[ty..ty + 4].copy_from_slice(&to.to_le_bytes());
    out
}

/// An MXFP4_MOE file whose first block of every layer-0 down expert has scale 0xFF (NaN in
/// E8M0), and an IQ4_XS one whose down experts' first super-block scale is an f16 NaN, are
/// refused when an expert is built, naming the tensor, row and block — by native at load, by
/// selective at the first miss; one whose down stack is retyped to IQ2_XXS is refused naming
/// that stack, not the MXFP4 ones moescope reads.
fn mxfp4_files_with_a_nan_scale_or_a_foreign_type_are_refused_by_name(dir: &std::path::Path) {
    let path = gguf("MXFP4_MOE");
    let good = std::fs::read(&path).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    let cfg = MoeConfig::from_dir(&path).unwrap();
    let mut nan = good.clone();
    for e in 0..cfg.num_experts {
        let down = &ckpt.expert_location(&cfg, 0, e).unwrap().unwrap().parts[2];
        assert_eq!(down.name, "blk.0.ffn_down_exps.weight");
        nan[down.offset as usize] = 0xFF;
    }
    let iquant = retyped(&good, "blk.1.ffn_down_exps.weight", 39, 16);
    let xs_path = gguf("IQ4_XS");
    let mut xs_nan = std::fs::read(&xs_path).unwrap();
    let xs = Checkpoint::open(&xs_path).unwrap();
    for e in 0..cfg.num_experts {
        let down = &xs.expert_location(&cfg, 0, e).unwrap().unwrap().parts[2];
        let at = down.offset as usize;
        xs_nan[at..at + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    }
    let cases = [
        (
            "xs-nan-scale.gguf",
            xs_nan,
            "blk.0.ffn_down_exps.weight (IQ4_XS): row 0 block 0 has scale d = NaN",
        ),
        (
            "nan-scale.gguf",
            nan,
            "blk.0.ffn_down_exps.weight (MXFP4): row 0 block 0 has scale byte 0xFF",
        ),
        (
            "mxfp4-iquant.gguf",
            iquant,
            "tensor `blk.1.ffn_down_exps.weight`: stored as IQ2_XXS (GGML type 16), which \
             moescope cannot compute with",
        ),
    ];
    for (name, bytes, want) in cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let p = p.to_str().unwrap();
        for backend in ["native", "selective"] {
            let (rc, _, err) = common::run(&[
                "generate",
                "--model",
                p,
                "--backend",
                backend,
                "--prompt",
                "Why is the sky blue?",
                "--max-new-tokens",
                "4",
            ]);
            assert_ne!(rc, 0, "{name} {backend}");
            assert!(err.contains(want), "{name} {backend}: {err}");
            assert!(!err.contains("panicked"), "{name} {backend}: {err}");
        }
    }
}

#[test]
fn estimates_count_quantized_bytes_as_the_cache_does() {
    for kind in TYPES {
        let cfg = MoeConfig::from_dir(&gguf(kind)).unwrap();
        let sizes = moescope::model::gguf::held_sizes(&gguf(kind), &cfg, 4, true, false).unwrap();
        let held = sizes.expert_max;
        // Every part is block-quantized, so an expert is held as stored; a mixed file's mean
        // lies below its largest layer's expert.
        assert!(sizes.stored_mean <= held as f64, "{kind}: {sizes:?}");
        let mixed = kind.ends_with("_M");
        assert_eq!(sizes.stored_mean < held as f64, mixed, "{kind}: {sizes:?}");
        let sel = spec(
            kind,
            BackendKind::Selective,
            CacheSettings::default(),
            Dtype::F32,
        )
        .load(|_, _| {})
        .unwrap();
        assert_eq!(sel.cache.as_ref().unwrap().expert_bytes(), held, "{kind}");
        let native = spec(
            kind,
            BackendKind::Native,
            CacheSettings::default(),
            Dtype::F32,
        );
        // The same model held dense in f32, as the estimate counted it before GGUF.
        let dense =
            (cfg.total_experts() * cfg.expert_params() * 4) as u64 + cfg.non_expert_params() * 4;
        let f = native.footprint(&cfg, 0);
        assert!(f.host < dense * 2 / 3, "{kind}: {} vs {dense}", f.host);
        assert!(f.host >= sizes.experts_total);
        // Native holds each layer's experts at that layer's size, as loaded.
        let loaded = native.load(|_, _| {}).unwrap();
        assert_eq!(
            loaded.provider.resident_bytes(),
            sizes.experts_total,
            "{kind}"
        );
        // And the rest as the estimate counts it (table-coded attention held as stored on the
        // CPU: `model::gguf`'s unit test).
        assert_eq!(loaded.model.resident_bytes(), sizes.non_expert, "{kind}");
    }
}

/// The whole product on a GGUF file: both workers, the recording, the summary; the header
/// names the experts' block types.
#[test]
fn a_run_on_a_gguf_file_records_its_expert_types() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("r.ndjson");
    let (rc, out, err) = common::run(&[
        "run",
        "--no-tui",
        "--model",
        gguf("Q4_K_M").to_str().unwrap(),
        "--prompt",
        "Why is the sky blue?",
        "--max-new-tokens",
        "6",
        "--record",
        rec.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{out}\n{err}");
    let text = std::fs::read_to_string(&rec).unwrap();
    assert!(
        text.contains("GGUF experts Q4_K"),
        "no expert types in the header"
    );
    assert!(out.contains("token agreement 100.0 %"), "{out}");
}

/// A model split by llama.cpp's `llama-gguf-split` (tests/fixtures/gguf/split: the Q4_K_M
/// fixture in three parts) runs as the single file does, bit for bit; a missing or wrong part
/// is refused by name.
#[test]
fn a_split_model_is_the_same_model() {
    let split = fixture("gguf/split");
    let first = split.join("kquant-Q4_K_M-00001-of-00003.gguf");
    let seq = sequence();
    let load = |model: std::path::PathBuf, backend, cache| {
        BackendSpec {
            model_dir: model,
            dtype: Dtype::F32,
            device: DeviceSpec::cpu(),
            backend,
            cache,
            settings: Settings::default(),
        }
        .load(|_, _| {})
        .unwrap()
    };
    let whole = run(
        &load(
            gguf("Q4_K_M"),
            BackendKind::Native,
            CacheSettings::default(),
        ),
        &seq,
    );
    assert!(
        run(
            &load(first.clone(), BackendKind::Native, CacheSettings::default()),
            &seq
        ) == whole
    );
    let small = CacheSettings {
        cache_experts: Some(2),
        ..Default::default()
    };
    assert!(run(&load(first.clone(), BackendKind::Selective, small), &seq) == whole);
    let ckpt = Checkpoint::open(&first).unwrap();
    let cfg = MoeConfig::from_dir(&first).unwrap();
    assert_eq!(ckpt.validate(&cfg).unwrap().present, 8);

    // Only the first part names the model; a missing part is named.
    let second = split.join("kquant-Q4_K_M-00002-of-00003.gguf");
    let e = Checkpoint::open(&second).unwrap_err().to_string();
    assert!(e.contains("pass the first part"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    for k in [1, 2] {
        let name = format!("kquant-Q4_K_M-0000{k}-of-00003.gguf");
        std::fs::copy(split.join(&name), dir.path().join(&name)).unwrap();
    }
    let e = Checkpoint::open(&dir.path().join("kquant-Q4_K_M-00001-of-00003.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("kquant-Q4_K_M-00003-of-00003.gguf"), "{e}");
}

/// `verify` reads a GGUF file's block scales (candle computes with the blocks as stored and a
/// GPU slot pool copies them so): a NaN `d` in one expert's down matrix (Q4_K_M's down type,
/// whichever it is), an infinite one in every layer-1 gate expert of a Q8_0 file, and an
/// infinite one in an attention matrix are each named — file, tensor, row, block and field — and
/// the file is INCOMPLETE (exit 1); the undamaged files stay COMPLETE.
#[test]
fn verify_reads_every_block_scale_of_a_gguf_file() {
    // Byte offset of the `d` field in a block of `dtype`.
    let d_at = |dtype: StDtype| match dtype {
        StDtype::Q6K => 208,
        StDtype::Q3K => 108,
        StDtype::Q2K => 80,
        StDtype::Q4_0 | StDtype::Q4_1 | StDtype::Q5_0 | StDtype::Q5_1 | StDtype::Q8_0 => 0,
        StDtype::Q4K | StDtype::Q5K => 0,
        other => panic!("no d field in {other:?}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let damaged = |kind: &str, name: &str, f: &dyn Fn(&Checkpoint, &MoeConfig, &mut Vec<u8>)| {
        let path = gguf(kind);
        let ckpt = Checkpoint::open(&path).unwrap();
        let cfg = MoeConfig::from_dir(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        f(&ckpt, &cfg, &mut bytes);
        let out = dir.path().join(name);
        std::fs::write(&out, bytes).unwrap();
        out
    };
    let down_nan = damaged("Q4_K_M", "down-nan.gguf", &|ckpt, cfg, b| {
        let down = &ckpt.expert_location(cfg, 0, 3).unwrap().unwrap().parts[2];
        assert_eq!(down.name, "blk.0.ffn_down_exps.weight");
        let at = down.offset as usize + d_at(down.dtype);
        b[at..at + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    });
    let gate_inf = damaged("Q8_0", "gate-inf.gguf", &|ckpt, cfg, b| {
        for e in 0..cfg.num_experts {
            let gate = &ckpt.expert_location(cfg, 1, e).unwrap().unwrap().parts[0];
            // The expert's second row, its first block.
            let row = gate.len as usize / gate.shape[0];
            let at = gate.offset as usize + row + d_at(gate.dtype);
            b[at..at + 2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
        }
    });
    let attn_inf = damaged("Q8_0", "attn-inf.gguf", &|ckpt, cfg, b| {
        let name = cfg.tensor_name("model.layers.0.self_attn.q_proj.weight");
        let h = cfg.hidden_size;
        let q = ckpt
            .check(&name, &[cfg.num_attention_heads * cfg.head_dim, h])
            .unwrap();
        assert_eq!(q.dtype, StDtype::Q8_0, "{name}");
        let at = q.offset as usize + 34; // the first row's second block
        b[at..at + 2].copy_from_slice(&half::f16::NEG_INFINITY.to_le_bytes());
    });
    let cases: [(&std::path::Path, Vec<String>); 3] = [
        (
            &down_nan,
            vec![
                "layer 0 expert 3".into(),
                "blk.0.ffn_down_exps.weight".into(),
                "row 0 block 0 has scale d = NaN".into(),
            ],
        ),
        (
            &gate_inf,
            (0..MoeConfig::from_dir(&gguf("Q8_0")).unwrap().num_experts)
                .map(|e| format!("layer 1 expert {e}"))
                .chain([
                    "tensor `blk.1.ffn_gate_exps.weight`: Q8_0 row 1 block 0 has scale d = inf"
                        .into(),
                ])
                .collect(),
        ),
        (
            &attn_inf,
            vec![
                "blk.0.attn_q.weight".into(),
                "row 0 block 1 has scale d = -inf".into(),
            ],
        ),
    ];
    for (path, needles) in cases {
        let (rc, text, err) = common::run(&["verify", path.to_str().unwrap()]);
        assert_eq!(rc, 1, "{}: {text}{err}", path.display());
        assert!(text.contains("INCOMPLETE"), "{text}");
        for n in needles {
            assert!(text.contains(&n), "{}: {n:?} not in {text}", path.display());
        }
        assert!(text.contains(path.to_str().unwrap()), "{text}");
    }
    for kind in ["Q4_K_M", "Q8_0"] {
        let (rc, text, err) = common::run(&["verify", gguf(kind).to_str().unwrap()]);
        assert_eq!(rc, 0, "{kind}: {text}{err}");
        assert!(
            text.contains("COMPLETE") && !text.contains("INCOMPLETE"),
            "{text}"
        );
    }
}
