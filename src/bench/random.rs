//! Random checkpoints in the real on-disk layout (qwen3_moe config.json, one tensor per expert and
//! projection, bf16, sharded with an index when large) — for benchmarks at geometries we cannot
//! download. Random routers route almost uniformly, the worst case for an expert cache; that is
//! stated wherever these numbers are reported.

use std::collections::BTreeMap;
use std::path::Path;

use half::bf16;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::model::error::{ModelError, Result};
use crate::model::safetensors_file::{OwnedTensor, StDtype, write_atomic};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Geometry {
    pub layers: usize,
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
    pub moe_intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

impl Geometry {
    /// Named geometries used in BENCHMARKS.md.
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            // issue: "8 layers, hidden 512, 32 experts, top-4"
            "engine" => Geometry {
                layers: 8,
                hidden: 512,
                experts: 32,
                top_k: 4,
                moe_intermediate: 256,
                heads: 8,
                kv_heads: 2,
                head_dim: 64,
                vocab: 8192,
            },
            // experts dominate: "16 layers, 64 experts, top-8, hidden 1024"
            "selective" => Geometry {
                layers: 16,
                hidden: 1024,
                experts: 64,
                top_k: 8,
                moe_intermediate: 512,
                heads: 16,
                kv_heads: 4,
                head_dim: 64,
                vocab: 16384,
            },
            // Qwen3-30B-A3B geometry with 12 of its 48 layers.
            "qwen3-30b-a3b-12l" => Geometry {
                layers: 12,
                hidden: 2048,
                experts: 128,
                top_k: 8,
                moe_intermediate: 768,
                heads: 32,
                kv_heads: 4,
                head_dim: 128,
                vocab: 151936,
            },
            // The smallest whole-block model with the bundled tokenizer: a ~250 KB GGUF (Q8_0)
            // that seeds the GGUF fuzzer (scripts/fuzz.sh).
            "fuzz" => Geometry {
                layers: 2,
                hidden: 32,
                experts: 4,
                top_k: 2,
                moe_intermediate: 32,
                heads: 2,
                kv_heads: 1,
                head_dim: 16,
                vocab: 4096,
            },
            _ => return None,
        })
    }

    pub const PRESETS: [&'static str; 4] = ["engine", "selective", "qwen3-30b-a3b-12l", "fuzz"];

    pub fn params(&self) -> (u64, u64) {
        let h = self.hidden as u64;
        let expert = 3 * h * self.moe_intermediate as u64;
        let experts = expert * (self.experts * self.layers) as u64;
        let q = (self.heads * self.head_dim) as u64;
        let kv = (self.kv_heads * self.head_dim) as u64;
        let attn = 2 * h * q + 2 * h * kv + 2 * self.head_dim as u64;
        let layer = attn + 2 * h + self.experts as u64 * h;
        let non_expert = layer * self.layers as u64 + 2 * self.vocab as u64 * h + h;
        (non_expert, experts)
    }
}

/// xorshift64* — fast, seeded, good enough for benchmark weights.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // uniform in [-1, 1)
        ((v >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// SplitMix64's finaliser: turns (seed, tensor, chunk) into independent xorshift states.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Elements per independently seeded chunk: the unit of parallel work.
const FILL_CHUNK: usize = 1 << 20;

/// `n` random bf16 values (uniform in ±`scale`; `scale` 0: norm weights, 1 ± 0.1), filled on
/// every core. Each chunk has its own generator seeded from (seed, tensor, chunk), so the bytes
/// depend only on the seed, never on the number of threads.
fn random_bf16(n: usize, scale: f32, seed: u64, tensor: u64) -> Vec<u8> {
    use rayon::prelude::*;
    let mut out = vec![0u8; n * 2];
    out.par_chunks_mut(FILL_CHUNK * 2)
        .enumerate()
        .for_each(|(c, buf)| {
            let mut rng = Rng(mix(seed ^ mix(tensor ^ mix(c as u64))) | 1);
            for px in buf.chunks_exact_mut(2) {
                let v = if scale == 0.0 {
                    1.0 + 0.1 * rng.next_f32()
                } else {
                    rng.next_f32() * scale
                };
                px.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
            }
        });
    out
}

/// The checkpoint's tensors in their fixed order, each (name, shape, scale); a tensor's index
/// in this order seeds its values, so every writer of the same seed writes the same model.
fn hf_specs(g: &Geometry) -> Vec<(String, Vec<usize>, f32)> {
    let mut specs: Vec<(String, Vec<usize>, f32)> = Vec::new();
    let h = g.hidden;
    let (q, kv) = (g.heads * g.head_dim, g.kv_heads * g.head_dim);
    let std_of = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    specs.push(("model.embed_tokens.weight".into(), vec![g.vocab, h], 1.0));
    for l in 0..g.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        specs.push((p("input_layernorm.weight"), vec![h], 0.0));
        specs.push((p("post_attention_layernorm.weight"), vec![h], 0.0));
        specs.push((p("self_attn.q_proj.weight"), vec![q, h], std_of(h)));
        specs.push((p("self_attn.k_proj.weight"), vec![kv, h], std_of(h)));
        specs.push((p("self_attn.v_proj.weight"), vec![kv, h], std_of(h)));
        specs.push((p("self_attn.o_proj.weight"), vec![h, q], std_of(q)));
        specs.push((p("self_attn.q_norm.weight"), vec![g.head_dim], 0.0));
        specs.push((p("self_attn.k_norm.weight"), vec![g.head_dim], 0.0));
        specs.push((p("mlp.gate.weight"), vec![g.experts, h], std_of(h) * 4.0));
        for e in 0..g.experts {
            let i = g.moe_intermediate;
            specs.push((
                p(&format!("mlp.experts.{e}.gate_proj.weight")),
                vec![i, h],
                std_of(h),
            ));
            specs.push((
                p(&format!("mlp.experts.{e}.up_proj.weight")),
                vec![i, h],
                std_of(h),
            ));
            specs.push((
                p(&format!("mlp.experts.{e}.down_proj.weight")),
                vec![h, i],
                std_of(i),
            ));
        }
    }
    specs.push(("model.norm.weight".into(), vec![h], 0.0));
    specs.push(("lm_head.weight".into(), vec![g.vocab, h], std_of(h)));

    specs
}

/// Writes the checkpoint; shards of at most `shard_bytes` with an index when it is larger.
pub fn write(geom: &Geometry, out: &Path, seed: u64, shard_bytes: u64) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::Io {
        path: out.to_path_buf(),
        what: "creating directory".into(),
        source: e,
    })?;
    let g = geom;
    let config = json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": g.vocab,
        "hidden_size": g.hidden,
        "intermediate_size": g.moe_intermediate * 4,
        "moe_intermediate_size": g.moe_intermediate,
        "num_hidden_layers": g.layers,
        "num_attention_heads": g.heads,
        "num_key_value_heads": g.kv_heads,
        "head_dim": g.head_dim,
        "num_experts": g.experts,
        "num_experts_per_tok": g.top_k,
        "norm_topk_prob": true,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 4096,
        "max_window_layers": g.layers,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "use_sliding_window": false,
        "sliding_window": null,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        // An id greedy decoding will practically never pick, so benchmarks run their full length.
        "eos_token_id": g.vocab - 1,
    });
    let io = |p: &Path, e: std::io::Error| ModelError::Io {
        path: p.to_path_buf(),
        what: "writing".into(),
        source: e,
    };
    let cfg_path = out.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .map_err(|e| io(&cfg_path, e))?;

    let specs = hf_specs(g);
    let total: u64 = specs
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>() as u64 * 2)
        .sum();
    let nshards = total.div_ceil(shard_bytes.max(1)).max(1);
    // Shards first (by size, in tensor order), then each shard's tensors filled in parallel —
    // across tensors and within each — and written; one shard in memory at a time.
    /// (index in the checkpoint's tensor order — it seeds the fill —, name, shape, scale).
    type Planned = (usize, String, Vec<usize>, f32);
    let mut shards: Vec<Vec<Planned>> = vec![Vec::new()];
    let mut shard_size = 0u64;
    for (index, (name, shape, scale)) in specs.into_iter().enumerate() {
        let len = shape.iter().product::<usize>() as u64 * 2;
        if shard_size + len > shard_bytes
            && !shards.last().expect("one shard").is_empty()
            && (shards.len() as u64) < nshards
        {
            shards.push(Vec::new());
            shard_size = 0;
        }
        shard_size += len;
        shards
            .last_mut()
            .expect("one shard")
            .push((index, name, shape, scale));
    }
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        use rayon::prelude::*;
        let name = if nshards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{nshards:05}.safetensors", i + 1)
        };
        let filled: Vec<Vec<u8>> = shard
            .par_iter()
            .map(|(index, _, shape, scale)| {
                random_bf16(shape.iter().product(), *scale, seed, *index as u64)
            })
            .collect();
        let tensors: Vec<OwnedTensor<'_>> = shard
            .iter()
            .zip(&filled)
            .map(|((_, n, s, _), b)| OwnedTensor {
                name: n.clone(),
                dtype: StDtype::BF16,
                shape: s.clone(),
                bytes: b,
            })
            .collect();
        write_atomic(&out.join(&name), &tensors, None)?;
        for (_, n, _, _) in shard {
            weight_map.insert(n.clone(), name.clone());
        }
    }
    if nshards > 1 {
        let idx = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = out.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&idx).expect("json"))
            .map_err(|e| io(&p, e))?;
    }
    Ok(())
}

/// Copies `from`'s tokenizer.json (and tokenizer_config.json, when present) into `to` if every
/// id it can produce is below `vocab`. Returns its vocabulary size, or None when not copied.
pub fn copy_tokenizer(from: &Path, to: &Path, vocab: usize) -> Result<Option<usize>> {
    let src = from.join("tokenizer.json");
    let Ok(tok) = tokenizers::Tokenizer::from_file(&src) else {
        return Ok(None);
    };
    let n = tok.get_vocab_size(true);
    if n > vocab {
        return Ok(None);
    }
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let (s, d) = (from.join(name), to.join(name));
        if s.exists() {
            std::fs::copy(&s, &d).map_err(|e| ModelError::Io {
                path: d.clone(),
                what: format!("copying {}", s.display()),
                source: e,
            })?;
        }
    }
    Ok(Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint geometry small enough to write in a test.
    fn tiny() -> Geometry {
        Geometry {
            layers: 2,
            hidden: 32,
            experts: 4,
            top_k: 2,
            moe_intermediate: 16,
            heads: 2,
            kv_heads: 1,
            head_dim: 16,
            vocab: 64,
        }
    }
    use crate::engine::ModelFiles;

    /// The bytes depend on the seed only: one thread and four give the same checkpoint, and a
    /// tensor spanning several chunks is filled alike.
    #[test]
    fn checkpoint_bytes_do_not_depend_on_the_thread_count() {
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        let n = FILL_CHUNK * 2 + 12_345;
        let one = pool(1).install(|| random_bf16(n, 0.5, 9, 3));
        let four = pool(4).install(|| random_bf16(n, 0.5, 9, 3));
        assert_eq!(one, four);
        assert_ne!(one, random_bf16(n, 0.5, 10, 3), "another seed, other bytes");
        let values: Vec<f32> = one
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        assert!(values.iter().all(|v| v.abs() <= 0.5));
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!(mean.abs() < 0.01, "uniform around 0: mean {mean}");
        // Chunks are not copies of each other.
        assert_ne!(one[..1000], one[FILL_CHUNK * 2..FILL_CHUNK * 2 + 1000]);

        let g = tiny();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        pool(1).install(|| write(&g, a.path(), 7, 20_000)).unwrap();
        pool(3).install(|| write(&g, b.path(), 7, 20_000)).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(a.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert!(names.len() > 3);
        for name in names {
            assert_eq!(
                std::fs::read(a.path().join(&name)).unwrap(),
                std::fs::read(b.path().join(&name)).unwrap(),
                "{name:?}"
            );
        }
    }

    /// Every position's f32 logits of `tokens` through the native backend on the CPU.
    fn logits_of(model: &Path, tokens: &[u32]) -> Vec<f32> {
        use crate::engine::{BackendKind, BackendSpec, DeviceSpec, Dtype};
        let spec = BackendSpec {
            model_dir: model.to_path_buf(),
            dtype: Dtype::F32,
            device: DeviceSpec::parse("cpu").unwrap(),
            backend: BackendKind::Native,
            cache: Default::default(),
            settings: Default::default(),
        };
        let engine = spec.load(|_, _| {}).unwrap();
        let mut cache = engine.model.new_cache();
        engine
            .model
            .forward(
                tokens,
                &mut cache,
                engine.provider.as_ref(),
                &mut crate::model::ports::NoObserver,
                crate::model::qwen3_moe::Logits::All,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// `write_gguf` writes the model `write` writes (same seed): as BF16 the logits are the
    /// safetensors checkpoint's bit for bit; as Q8_0 within the quantization's error (2 % of
    /// the largest logit here), as MXFP4_MOE within its (12 %: 4-bit experts). What
    /// lets BENCHMARKS compare formats (and engines that read GGUF only) on one model.
    #[test]
    fn gguf_files_hold_the_safetensors_model() {
        let g = Geometry {
            layers: 2,
            hidden: 64,
            experts: 4,
            top_k: 2,
            moe_intermediate: 32,
            heads: 2,
            kv_heads: 1,
            head_dim: 32,
            vocab: 64,
        };
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("st");
        write(&g, &st, 11, 1 << 30).unwrap();
        let tokens = [1u32, 5, 9, 33, 2, 60, 17, 8];
        let want = logits_of(&st, &tokens);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.1 && want.iter().all(|v| v.is_finite()), "{scale}");
        let diff = |got: &[f32]| -> f32 {
            assert_eq!(got.len(), want.len());
            got.iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) })
        };
        for (quant, tolerance) in [
            (GgufQuant::Bf16, 0.0),
            (GgufQuant::Q8_0, 0.05),
            (GgufQuant::Mxfp4Moe, 0.15),
            (GgufQuant::Iq4NlMoe, 0.15),
        ] {
            let f = dir.path().join(format!("{quant:?}.gguf"));
            write_gguf(&g, &f, 11, quant).unwrap();
            let d = diff(&logits_of(&f, &tokens));
            assert!(
                d <= tolerance * scale,
                "{quant:?}: max diff {d} (largest logit {scale})"
            );
        }
        // MXFP4_MOE's expert stacks are MXFP4 at their real shapes (the placeholder retyped),
        // every other matrix Q8_0.
        let f = dir.path().join("Mxfp4Moe.gguf");
        let ckpt = crate::model::Checkpoint::open(&f).unwrap();
        let cfg = crate::model::MoeConfig::from_dir(&f).unwrap();
        let src = crate::experts::source::ShardSource::new(&ckpt, &cfg).unwrap();
        for l in 0..g.layers {
            for e in 0..g.experts {
                let parts = crate::experts::source::ExpertSource::part_locations(&src, l, e);
                let [gate, up, down] = parts.unwrap();
                for (p, shape) in [(&gate, [32, 64]), (&up, [32, 64]), (&down, [64, 32])] {
                    assert_eq!(
                        p.dtype,
                        StDtype::Lut4(crate::model::lut4::Lut4::Mxfp4),
                        "{}",
                        p.name
                    );
                    assert_eq!(p.shape, shape, "{}", p.name);
                    assert_eq!(p.len, 32 * 64 / 32 * 17, "{}", p.name);
                }
            }
        }
        let gguf = ckpt.gguf().unwrap();
        let q = gguf.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.dtype, StDtype::Q8_0);
        // What llama.cpp's tools print the file as (LLAMA_FTYPE_MOSTLY_MXFP4_MOE).
        let mut r = std::fs::File::open(&f).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut r);
        let content = content.unwrap_or_else(|_| {
            let (header, _) = crate::model::gguf_types::with_lut4_as_f32(&mut r).unwrap();
            candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(header))
                .unwrap()
        });
        let ftype = content.metadata["general.file_type"].to_u32().unwrap();
        assert_eq!(ftype, 38);
        // Another seed is another model.
        let f = dir.path().join("other.gguf");
        write_gguf(&g, &f, 12, GgufQuant::Bf16).unwrap();
        assert!(diff(&logits_of(&f, &tokens)) > 0.1 * scale);
    }

    /// Rows that are not whole blocks (the bundled model's 48-wide down rows for MXFP4, any row
    /// under 256 for IQ4_XS) are refused by name, not written as a file no reader takes.
    #[test]
    fn table_coded_stacks_need_whole_blocks() {
        use crate::model::lut4::Lut4;
        let err = lut4_rows(&[0.5; 96], 48, "blk.0.ffn_down_exps.weight", Lut4::Mxfp4);
        let msg = err.unwrap_err().to_string();
        assert!(
            msg.contains("blk.0.ffn_down_exps.weight") && msg.contains("48"),
            "{msg}"
        );
        let msg = lut4_rows(&[0.5; 128], 64, "up", Lut4::Iq4Xs)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("up: IQ4_XS") && msg.contains("256"), "{msg}");
        let rows = |format| lut4_rows(&[0.5; 512], 256, "x", format).unwrap().len();
        assert_eq!(rows(Lut4::Mxfp4), 16 * 17);
        assert_eq!(rows(Lut4::Iq4Nl), 16 * 18);
        assert_eq!(rows(Lut4::Iq4Xs), 2 * 136);
    }

    /// IQ4_XS_MOE at a geometry of whole super-blocks: the expert stacks are IQ4_XS at their
    /// real shapes, the logits the safetensors model's within 4-bit error (as MXFP4_MOE's).
    #[test]
    fn iq4_xs_experts_are_written_at_their_shapes() {
        let g = Geometry {
            layers: 1,
            hidden: 256,
            experts: 2,
            top_k: 1,
            moe_intermediate: 256,
            heads: 2,
            kv_heads: 1,
            head_dim: 64,
            vocab: 64,
        };
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("st");
        write(&g, &st, 5, 1 << 30).unwrap();
        let tokens = [1u32, 5, 9, 33];
        let want = logits_of(&st, &tokens);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let f = dir.path().join("iq4xs.gguf");
        write_gguf(&g, &f, 5, GgufQuant::Iq4XsMoe).unwrap();
        let got = logits_of(&f, &tokens);
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) });
        assert!(d <= 0.15 * scale, "max diff {d} (largest logit {scale})");
        assert!(
            d > 0.0,
            "4-bit experts cannot give the bf16 logits bit for bit"
        );
        let ckpt = crate::model::Checkpoint::open(&f).unwrap();
        let gguf = ckpt.gguf().unwrap();
        let up = gguf.tensor("blk.0.ffn_up_exps.weight").unwrap();
        assert_eq!(up.dtype, StDtype::Lut4(crate::model::lut4::Lut4::Iq4Xs));
        assert_eq!(up.shape, [2, 256, 256]);
        let q = gguf.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.dtype, StDtype::Q8_0);
        // IQ4_XS: attention's projections too (o_proj's rows then need 256 weights: four
        // heads), its norms and the rest as before; two heads' rows are refused by name.
        let err = write_gguf(&g, &dir.path().join("no.gguf"), 5, GgufQuant::Iq4Xs).unwrap_err();
        assert!(
            err.to_string().contains("blk.0.attn_output.weight"),
            "{err}"
        );
        let g = Geometry { heads: 4, ..g };
        let f = dir.path().join("iq4xs-all.gguf");
        write_gguf(&g, &f, 5, GgufQuant::Iq4Xs).unwrap();
        let got = logits_of(&f, &tokens);
        assert!(got.iter().all(|v| v.is_finite()));
        let ckpt = crate::model::Checkpoint::open(&f).unwrap();
        let gguf = ckpt.gguf().unwrap();
        let xs = StDtype::Lut4(crate::model::lut4::Lut4::Iq4Xs);
        for name in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_down_exps"] {
            let t = gguf.tensor(&format!("blk.0.{name}.weight")).unwrap();
            assert_eq!(t.dtype, xs, "{name}");
        }
        let norm = gguf.tensor("blk.0.attn_q_norm.weight").unwrap();
        assert_eq!(norm.dtype, StDtype::F32);
        assert_eq!(gguf.tensor("output.weight").unwrap().dtype, StDtype::Q8_0);
    }

    #[test]
    fn random_checkpoint_is_a_valid_sharded_model() {
        let dir = tempfile::tempdir().unwrap();
        let g = tiny();
        write(&g, dir.path(), 7, 20_000).unwrap();
        assert!(dir.path().join("model.safetensors.index.json").exists());
        let files = ModelFiles::open(dir.path()).unwrap();
        assert!(files.inventory.missing.is_empty());
        assert_eq!(files.inventory.present, 8);
        assert!(files.ckpt.num_shards() > 1);
        // The bundled tokenizer (4,096 ids) fits a vocabulary of 8,192 but not one of 64.
        let bundled = crate::engine::default_model_dir();
        assert_eq!(copy_tokenizer(&bundled, dir.path(), 64).unwrap(), None);
        assert!(!dir.path().join("tokenizer.json").exists());
        assert_eq!(
            copy_tokenizer(&bundled, dir.path(), 8192).unwrap(),
            Some(4096)
        );
        crate::model::tokenizer::TextTokenizer::from_dir(dir.path()).unwrap();
    }
}

/// The bundled model's tokenizer as GGUF metadata (what llama.cpp's converter writes for a
/// Qwen2-style BPE), padded with unused tokens up to `vocab` ids; empty when the bundled
/// tokenizer is missing or larger than `vocab` (moescope then runs on token ids only).
fn tokenizer_metadata(
    dir: &Path,
    vocab: usize,
) -> Vec<(String, candle_core::quantized::gguf_file::Value)> {
    use candle_core::quantized::gguf_file::Value;
    let Ok(text) = std::fs::read_to_string(dir.join("tokenizer.json")) else {
        return Vec::new();
    };
    let Ok(t) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    let mut tokens = vec![None; vocab];
    let mut types = vec![5i32; vocab]; // unused
    let mut put = |id: u64, s: &str, kind: i32| {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(s.to_string());
            types[id as usize] = kind;
        }
    };
    for (s, id) in t["model"]["vocab"].as_object().into_iter().flatten() {
        put(id.as_u64().unwrap_or(u64::MAX), s, 1);
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let kind = if a["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
        put(
            a["id"].as_u64().unwrap_or(u64::MAX),
            a["content"].as_str().unwrap_or(""),
            kind,
        );
    }
    let merges: Vec<Value> = t["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) => {
                Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
            }
            _ => None,
        })
        .map(Value::String)
        .collect();
    if merges.is_empty() || tokens.iter().flatten().count() == 0 {
        return Vec::new();
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Value::String(t.unwrap_or_else(|| format!("<|unused_{i}|>"))))
        .collect();
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]
}

/// How `write_gguf` quantizes: every matrix in one type, or llama.cpp's `Q4_K_M` mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    Q8_0,
    Q4K,
    /// Q4_K, with Q6_K for `ffn_down` and `attn_v` in the layers llama-quantize gives more bits
    /// (its `use_more_bits`: the first and last eighth, and every third between) and for the
    /// output matrix.
    Q4KM,
    /// Every matrix in bf16: the unquantized model for engines that read GGUF only (llama.cpp).
    Bf16,
    /// llama-quantize's `MXFP4_MOE`: the expert stacks in MXFP4 (`lut4::quantize_row`, llama.cpp's
    /// rule), every other matrix in Q8_0.
    Mxfp4Moe,
    /// Ours, after `MXFP4_MOE`: the expert stacks in IQ4_XS (`lut4::quantize_row_iq4`, a simpler
    /// search than llama-quantize's, the same block format), every other matrix in Q8_0. Rows
    /// must be whole 256-weight super-blocks. What lets the GPU step benchmark time IQ4 experts
    /// at a real geometry.
    Iq4XsMoe,
    /// As `Iq4XsMoe` with IQ4_NL (32-weight blocks) experts.
    Iq4NlMoe,
    /// After llama-quantize's `IQ4_XS`: the expert stacks and attention's four projections in
    /// IQ4_XS, the embedding and output in Q8_0 (llama-quantize gives them Q6_K). What lets the
    /// GPU step benchmark time table-coded attention at a real geometry.
    Iq4Xs,
}

impl GgufQuant {
    /// The table-coded type this mix stores expert stacks in, if any.
    fn expert_lut4(self) -> Option<crate::model::lut4::Lut4> {
        use crate::model::lut4::Lut4;
        match self {
            Self::Mxfp4Moe => Some(Lut4::Mxfp4),
            Self::Iq4XsMoe | Self::Iq4Xs => Some(Lut4::Iq4Xs),
            Self::Iq4NlMoe => Some(Lut4::Iq4Nl),
            _ => None,
        }
    }

    /// The table-coded type this mix stores matrix `name` in, if any (norms never).
    fn lut4_of(self, name: &str) -> Option<crate::model::lut4::Lut4> {
        let attention = name.contains(".attn_") && !name.contains("norm");
        let coded = name.ends_with("_exps.weight") || (self == Self::Iq4Xs && attention);
        self.expert_lut4().filter(|_| coded)
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "Q8_0" => Self::Q8_0,
            "Q4_K" => Self::Q4K,
            "Q4_K_M" => Self::Q4KM,
            "BF16" => Self::Bf16,
            "MXFP4_MOE" => Self::Mxfp4Moe,
            "IQ4_XS_MOE" => Self::Iq4XsMoe,
            "IQ4_NL_MOE" => Self::Iq4NlMoe,
            "IQ4_XS" => Self::Iq4Xs,
            _ => return None,
        })
    }

    /// llama.cpp's `llama_ftype` for this mix (`llama.h`), where it has one.
    fn llama_ftype(self) -> Option<usize> {
        match self {
            Self::Q8_0 => Some(7),
            Self::Q4KM => Some(15),
            Self::Bf16 => Some(32),
            Self::Mxfp4Moe => Some(38),
            Self::Iq4Xs => Some(30),
            Self::Q4K | Self::Iq4XsMoe | Self::Iq4NlMoe => None,
        }
    }

    fn pick(self, name: &str, layer: usize, layers: usize) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        let eighth = layers / 8;
        let more_bits = layer < eighth || layer >= 7 * layers / 8 || (layer - eighth) % 3 == 2;
        match self {
            Self::Q8_0 | Self::Mxfp4Moe | Self::Iq4XsMoe | Self::Iq4NlMoe | Self::Iq4Xs => G::Q8_0,
            Self::Q4K => G::Q4K,
            Self::Q4KM if name == "output.weight" => G::Q6K,
            Self::Q4KM if (name.contains("ffn_down") || name.contains("attn_v")) && more_bits => {
                G::Q6K
            }
            Self::Q4KM => G::Q4K,
            Self::Bf16 => G::BF16,
        }
    }
}

/// Rows of `values` ([rows, cols] row-major) quantized to `dtype` on every core, row blocks
/// apart; GGML rows are independent, so the pieces' bytes concatenate to the whole tensor's.
fn quantize_rows(
    values: &[f32],
    cols: usize,
    dtype: candle_core::quantized::GgmlDType,
) -> Result<Vec<u8>> {
    use candle_core::quantized::QTensor;
    use rayon::prelude::*;
    let per = (FILL_CHUNK / cols).max(1);
    let pieces: Vec<Vec<u8>> = values
        .par_chunks(per * cols)
        .map(|chunk| -> Result<Vec<u8>> {
            let t = candle_core::Tensor::from_slice(
                chunk,
                (chunk.len() / cols, cols),
                &candle_core::Device::Cpu,
            )?;
            Ok(QTensor::quantize(&t, dtype)?.data()?.into_owned())
        })
        .collect::<Result<_>>()?;
    Ok(pieces.concat())
}

fn bf16_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

/// The same random model as [`write`] — each tensor's values seeded by its index in
/// [`hf_specs`], a layer's experts stacked in expert order — as one GGUF file in llama.cpp's
/// `qwen3moe` layout: matrices quantized with candle's quantizer (BF16 keeps the values as they
/// are: the safetensors checkpoint's logits bit for bit, unit test), norms and the router in
/// f32, the bundled tokenizer in the metadata where it fits the vocabulary; eos is the last id,
/// so decoding runs its full length. moescope's own writer, for geometries llama.cpp's converter
/// cannot be run on (the GPU machine); the tests use files written by llama.cpp itself.
pub fn write_gguf(geom: &Geometry, out: &Path, seed: u64, quant: GgufQuant) -> Result<()> {
    use candle_core::quantized::gguf_file::{Value, write};
    use candle_core::quantized::{GgmlDType, QTensor, ggml_file::qtensor_from_ggml};
    let g = geom;
    let h = g.hidden;
    let hf = hf_specs(g);
    let index_of: BTreeMap<&str, usize> = hf
        .iter()
        .enumerate()
        .map(|(i, (name, _, _))| (name.as_str(), i))
        .collect();
    // (gguf name, shape, the checkpoint tensors it is made of — one, or a layer's experts
    // stacked —, layer)
    let mut specs: Vec<(String, Vec<usize>, Vec<String>, usize)> = Vec::new();
    let one = |gguf: &str, name: &str, layer: usize| -> (String, Vec<usize>, Vec<String>, usize) {
        let shape = hf[index_of[name]].1.clone();
        (gguf.to_string(), shape, vec![name.to_string()], layer)
    };
    specs.push(one("token_embd.weight", "model.embed_tokens.weight", 0));
    for l in 0..g.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        for (gguf, name) in [
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("attn_q_norm", "self_attn.q_norm"),
            ("attn_k_norm", "self_attn.k_norm"),
            ("ffn_gate_inp", "mlp.gate"),
        ] {
            specs.push(one(
                &format!("blk.{l}.{gguf}.weight"),
                &p(&format!("{name}.weight")),
                l,
            ));
        }
        for (gguf, proj) in [
            ("gate", "gate_proj"),
            ("up", "up_proj"),
            ("down", "down_proj"),
        ] {
            let parts: Vec<String> = (0..g.experts)
                .map(|e| p(&format!("mlp.experts.{e}.{proj}.weight")))
                .collect();
            let mut shape = vec![g.experts];
            shape.extend(&hf[index_of[parts[0].as_str()]].1);
            specs.push((format!("blk.{l}.ffn_{gguf}_exps.weight"), shape, parts, l));
        }
    }
    specs.push(one("output_norm.weight", "model.norm.weight", 0));
    specs.push(one("output.weight", "lm_head.weight", 0));

    // Table-coded stacks, written as placeholders and retyped once the file is out.
    let mut lut4: Vec<(String, Vec<usize>, crate::model::lut4::Lut4)> = Vec::new();
    let tensors: Vec<(String, QTensor)> = specs
        .iter()
        .map(|(name, shape, parts, layer)| -> Result<(String, QTensor)> {
            let mut values = Vec::with_capacity(shape.iter().product());
            for part in parts {
                let (_, part_shape, scale) = &hf[index_of[part.as_str()]];
                let n = part_shape.iter().product();
                values.extend(bf16_to_f32(&random_bf16(
                    n,
                    *scale,
                    seed,
                    index_of[part.as_str()] as u64,
                )));
            }
            let dev = &candle_core::Device::Cpu;
            let coded = quant.lut4_of(name);
            let t = if let Some(format) = coded {
                let bytes = lut4_rows(&values, *shape.last().expect("a matrix"), name, format)?;
                // candle's writer has none of these types: a 16-bit tensor of the same bytes
                // holds its place (same rank, so the header entry keeps its length) until
                // `mark_lut4`.
                let mut dims = vec![1; shape.len() - 1];
                dims.push(bytes.len() / 2);
                lut4.push((name.clone(), shape.clone(), format));
                qtensor_from_ggml(GgmlDType::F16, &bytes, dims, dev)?
            } else if shape.len() == 1 || name.contains("ffn_gate_inp") {
                QTensor::quantize(
                    &candle_core::Tensor::from_vec(values, shape.as_slice(), dev)?,
                    GgmlDType::F32,
                )?
            } else {
                let dtype = quant.pick(name, *layer, g.layers);
                let cols = *shape.last().expect("a matrix");
                let bytes = quantize_rows(&values, cols, dtype)?;
                qtensor_from_ggml(dtype, &bytes, shape.clone(), dev)?
            };
            Ok((name.clone(), t))
        })
        .collect::<Result<_>>()?;
    let a = "qwen3moe";
    let u = |v: usize| Value::U32(v as u32);
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), u(g.layers)),
        (format!("{a}.context_length"), u(4096)),
        (format!("{a}.embedding_length"), u(h)),
        (
            format!("{a}.feed_forward_length"),
            u(g.moe_intermediate * 4),
        ),
        (
            format!("{a}.expert_feed_forward_length"),
            u(g.moe_intermediate),
        ),
        (format!("{a}.attention.head_count"), u(g.heads)),
        (format!("{a}.attention.head_count_kv"), u(g.kv_heads)),
        (format!("{a}.attention.key_length"), u(g.head_dim)),
        (format!("{a}.attention.value_length"), u(g.head_dim)),
        (format!("{a}.rope.freq_base"), Value::F32(1_000_000.0)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (format!("{a}.expert_count"), u(g.experts)),
        (format!("{a}.expert_used_count"), u(g.top_k)),
        ("tokenizer.ggml.eos_token_id".into(), u(g.vocab - 1)),
    ];
    let mut meta = meta;
    // llama.cpp's name for the mix (`llama_ftype`), which its tools print; an all-Q4_K file is
    // none of its mixes, so it is left for them to guess.
    if let Some(ftype) = quant.llama_ftype() {
        meta.push(("general.file_type".into(), u(ftype)));
        meta.push(("general.quantization_version".into(), u(2)));
    }
    meta.extend(tokenizer_metadata(
        &crate::engine::default_model_dir(),
        g.vocab,
    ));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let io = |e: std::io::Error| ModelError::Io {
        path: out.to_path_buf(),
        what: "writing the GGUF file".into(),
        source: e,
    };
    // Written beside the target and renamed into place: a failed write (a full disk) leaves no
    // half file at `out`.
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let written = (|| -> Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        write(&mut f, &meta_refs, &tensor_refs)?;
        use std::io::Write;
        f.flush().map_err(io)?;
        f.get_ref().sync_all().map_err(io)?;
        drop(f);
        if !lut4.is_empty() {
            crate::model::gguf_types::mark_lut4(&tmp, &lut4).map_err(io)?;
        }
        std::fs::rename(&tmp, out).map_err(io)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Rows of `values` ([rows, cols] row-major) as `format`'s blocks, on every core; an even
/// number of bytes (the placeholder is 16-bit).
fn lut4_rows(
    values: &[f32],
    cols: usize,
    name: &str,
    format: crate::model::lut4::Lut4,
) -> Result<Vec<u8>> {
    use crate::model::lut4::quantize_row_iq4;
    use rayon::prelude::*;
    let rows = values.len() / cols;
    let (block, bytes) = (format.block_weights(), format.block_bytes());
    if !cols.is_multiple_of(block) || !(rows * cols / block * bytes).is_multiple_of(2) {
        return Err(ModelError::Input(format!(
            "{name}: {} needs rows of whole {block}-weight blocks and an even number of bytes \
             in the stack ([{rows}, {cols}] here)",
            format.name()
        )));
    }
    let per = (FILL_CHUNK / cols).max(1);
    Ok(values
        .par_chunks(per * cols)
        .map(|chunk| {
            let mut out = Vec::with_capacity(chunk.len() / block * bytes);
            for row in chunk.chunks_exact(cols) {
                quantize_row_iq4(format, row, &mut out);
            }
            out
        })
        .collect::<Vec<_>>()
        .concat())
}
