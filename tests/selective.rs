//! The selective backend changes nothing but where expert bytes come from: logits and greedy
//! tokens are bit-identical to native for every capacity, policy, scope and source.

mod common;

use candle_core::Device;
use common::*;
use moescope::cache::policy::PolicyKind;
use moescope::cache::settings::{CacheSettings, PrefetchMode, Scope, SourceSpec};
use moescope::engine::{BackendKind, Dtype, Engine};
use moescope::model::ports::NoObserver;
use moescope::model::qwen3_moe::Logits;
use moescope::settings::Settings;

/// Bits of the final logits of a sequence, then the 12 greedy tokens after it.
fn run(e: &Engine, seq: &[u32]) -> (Vec<u32>, Vec<u32>) {
    bits_and_greedy(e, seq, 12)
}

#[test]
fn selective_is_bit_identical_to_native_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        let g = golden(name);
        let seq = &g.sequences[2];
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let native = spec(name, BackendKind::Native, CacheSettings::default(), dtype)
                .load(|_, _| {})
                .unwrap();
            let want = run(&native, seq);
            let cfg = native.cfg.clone();
            let top_k = cfg.num_experts_per_tok;
            let layers = cfg.num_moe_layers();
            let all = cfg.total_experts();

            // Sources: shards, an extraction, and the seed layout.
            let extracted = tmp.path().join(format!("{name}-extracted"));
            if !extracted.exists() {
                let (rc, _, err) = run_cli(&[
                    "extract",
                    "--model",
                    fixture(name).to_str().unwrap(),
                    "--out",
                    extracted.to_str().unwrap(),
                ]);
                assert_eq!(rc, 0, "{err}");
            }
            let seed = tmp.path().join(format!("{name}-seed"));
            if !seed.exists() {
                make_seed_layout(&fixture(name), &seed, true);
            }
            let sources = [
                SourceSpec::Shards,
                SourceSpec::Extracted(extracted.clone()),
                SourceSpec::SeedLayout(seed.clone()),
            ];
            for source in &sources {
                for cap in [1, top_k, top_k * layers, all] {
                    for policy in PolicyKind::ALL {
                        for scope in [Scope::Global, Scope::Layer] {
                            let cache = CacheSettings {
                                cache_experts: Some(cap),
                                cache_scope: scope,
                                policy,
                                expert_source: source.clone(),
                                ..Default::default()
                            };
                            let sel = spec(name, BackendKind::Selective, cache, dtype)
                                .load(|_, _| {})
                                .unwrap();
                            let got = run(&sel, seq);
                            assert!(
                                got == want,
                                "{name} {dtype:?} {source} cap {cap} {policy:?} {scope:?}: differs from native"
                            );
                            let snap = sel.cache_snapshot().unwrap();
                            assert!(snap.misses > 0, "the cache really loaded experts");
                            if cap == all && scope == Scope::Global {
                                // Everything fits: each expert is read at most once.
                                assert!(
                                    snap.evictions == 0,
                                    "{name} {policy:?}: evicted at full capacity"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn run_cli(args: &[&str]) -> (i32, String, String) {
    common::run(args)
}

#[test]
fn prefetch_never_changes_outputs_and_reports_accuracy() {
    for name in FAMILIES {
        let g = golden(name);
        let native = spec(
            name,
            BackendKind::Native,
            CacheSettings::default(),
            Dtype::F32,
        )
        .load(|_, _| {})
        .unwrap();
        let want = run(&native, &g.sequences[2]);
        for cap in [1, 4, 12] {
            for scope in [Scope::Global, Scope::Layer] {
                let cache = CacheSettings {
                    cache_experts: Some(cap),
                    cache_scope: scope,
                    prefetch: PrefetchMode::NextLayer,
                    ..Default::default()
                };
                let sel = spec(name, BackendKind::Selective, cache, Dtype::F32)
                    .load(|_, _| {})
                    .unwrap();
                assert!(
                    run(&sel, &g.sequences[2]) == want,
                    "{name} cap {cap} {scope:?}: prefetch changed the output"
                );
                let p = sel
                    .cache_snapshot()
                    .unwrap()
                    .prefetch
                    .expect("prefetch stats");
                assert!(p.guessed > 0 && p.needed > 0);
                let (pr, rc) = (p.precision().unwrap(), p.recall().unwrap());
                assert!((0.0..=1.0).contains(&pr) && (0.0..=1.0).contains(&rc));
            }
        }
    }
}

#[test]
fn capacity_smaller_than_top_k_never_holds_more_than_capacity() {
    let cache = CacheSettings {
        cache_experts: Some(1),
        ..Default::default()
    };
    let e = spec("qwen3-omni-tiny", BackendKind::Selective, cache, Dtype::F32)
        .load(|_, _| {})
        .unwrap();
    let g = golden("qwen3-omni-tiny");
    let mut kv = e.model.new_cache();
    e.model
        .forward(
            &g.sequences[2],
            &mut kv,
            e.provider.as_ref(),
            &mut NoObserver,
            Logits::Last,
        )
        .unwrap();
    let s = e.cache_snapshot().unwrap();
    assert_eq!(s.resident_experts, 1);
    assert_eq!(s.capacity_experts, 1);
    assert!(s.evictions > 0);
    assert_eq!(
        s.hits + s.misses,
        s.layers
            .iter()
            .map(|l| l.total_hits() + l.total_misses())
            .sum::<u64>()
    );
}

#[test]
fn byte_budget_converts_to_whole_experts() {
    let cfg = moescope::model::MoeConfig::from_dir(&fixture("qwen3-moe-tiny")).unwrap();
    // f32 compute holds the fixture's bf16-stored experts as stored: 2 bytes a parameter.
    let one = (cfg.expert_params() * 2) as u64;
    let cache = CacheSettings {
        cache_mem: Some(3 * one + one / 2),
        ..Default::default()
    };
    let e = spec("qwen3-moe-tiny", BackendKind::Selective, cache, Dtype::F32)
        .load(|_, _| {})
        .unwrap();
    assert_eq!(e.cache_snapshot().unwrap().capacity_experts, 3);
    let too_small = CacheSettings {
        cache_mem: Some(one / 2),
        ..Default::default()
    };
    let err = spec(
        "qwen3-moe-tiny",
        BackendKind::Selective,
        too_small,
        Dtype::F32,
    )
    .load(|_, _| {})
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("holds no expert"), "{err}");
}

#[test]
fn statistics_add_up() {
    let cache = CacheSettings {
        cache_experts: Some(6),
        ..Default::default()
    };
    let e = spec("qwen3-moe-tiny", BackendKind::Selective, cache, Dtype::F32)
        .load(|_, _| {})
        .unwrap();
    let g = golden("qwen3-moe-tiny");
    let (_, toks) = run(&e, &g.sequences[1]);
    assert_eq!(toks.len(), 12);
    let s = e.cache_snapshot().unwrap();
    // 3 MoE layers × top-2 per token; prefill groups tokens by expert, so requests ≤ that.
    assert!(s.hits + s.misses > 0);
    assert_eq!(s.resident_experts, 6);
    let stored = (e.cfg.expert_params() * 2) as u64; // bf16 on disk
    assert_eq!(s.bytes_read, s.misses * stored);
    assert_eq!(s.load_latency.count, s.misses);
    assert!(
        s.load_latency.p50_us <= s.load_latency.p95_us
            && s.load_latency.p95_us <= s.load_latency.max_us
    );
    let per_layer_resident: usize = s
        .layers
        .iter()
        .map(|l| l.resident.iter().filter(|&&r| r).count())
        .sum();
    assert_eq!(per_layer_resident, 6);
}

/// The load-time warm-up (run on GPUs so kernel JIT is not charged to the first prompt) leaves
/// a selective cache exactly as it found it — nothing cached, nothing counted — and the run
/// after it gives the same tokens as one without it.
#[test]
fn warm_up_leaves_the_cache_untouched() {
    let cache = CacheSettings {
        cache_experts: Some(6),
        ..Default::default()
    };
    let load = || {
        spec(
            "qwen3-moe-tiny",
            BackendKind::Selective,
            cache.clone(),
            Dtype::F32,
        )
        .load(|_, _| {})
        .unwrap()
    };
    let e = load();
    e.warm_up().unwrap();
    let s = e.cache_snapshot().unwrap();
    assert_eq!((s.hits, s.misses, s.bytes_read), (0, 0, 0));
    assert_eq!(s.resident_experts, 0);
    let g = golden("qwen3-moe-tiny");
    assert_eq!(run(&e, &g.sequences[1]), run(&load(), &g.sequences[1]));
}

/// `read_into` and `read_into_for_copy` (what a GPU cache reads into its pinned buffer) return
/// the same bytes, dtypes and shapes as `read`, for the shard source, an extraction and the
/// seed layout (which uses the trait's defaults), and say so when the buffer is too small.
#[test]
fn read_into_matches_read_for_every_source() {
    let (_tmp, cfg, sources) = every_source("qwen3-moe-tiny");
    for src in &sources {
        for layer in cfg.moe_layers() {
            for e in [0, cfg.num_experts - 1] {
                let raw = src.read(layer, e).unwrap();
                let mut buf = vec![0xAAu8; src.stored_bytes(layer, e) as usize + 3];
                let spans = src.read_into(layer, e, &mut buf).unwrap();
                for (p, s) in raw.parts.iter().zip(&spans) {
                    assert_eq!(&buf[s.range.clone()], &p.bytes[..], "{}", src.describe());
                    assert_eq!((s.dtype, &s.shape), (p.dtype, &p.shape));
                }
                let mut for_copy = vec![0x55u8; buf.len()];
                let copy_spans = src.read_into_for_copy(layer, e, &mut for_copy).unwrap();
                assert_eq!(copy_spans, spans, "{}", src.describe());
                let end = spans.iter().map(|s| s.range.end).max().unwrap();
                assert_eq!(&for_copy[..end], &buf[..end], "{}", src.describe());
                let mut small = vec![0u8; 10];
                let err = src.read_into(layer, e, &mut small).unwrap_err().to_string();
                assert!(err.contains("too small"), "{err}");
                let err = src
                    .read_into_for_copy(layer, e, &mut small)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains("too small"), "{err}");
            }
        }
    }
}

/// What a GPU cache copies straight out of the expert files (the direct path) is exactly what
/// `read` returns: every part's location covers its bytes, for the shard source and an
/// extraction; the seed layout has no plain locations, so it is never copied directly.
#[test]
fn part_locations_are_the_bytes_read() {
    use moescope::experts::direct::{self, H2dPath};

    let (_tmp, cfg, sources) = every_source("qwen3-omni-tiny");
    let (file_sources, seed) = sources.split_at(2);
    for src in file_sources {
        let files = direct::expert_files(src.as_ref()).expect("file ranges");
        for layer in cfg.moe_layers() {
            for e in 0..cfg.num_experts {
                let raw = src.read(layer, e).unwrap();
                let locs = src.part_locations(layer, e).expect("located");
                for (p, loc) in raw.parts.iter().zip(&locs) {
                    assert!(
                        files.contains(&loc.file),
                        "{} not listed",
                        loc.file.display()
                    );
                    let bytes = std::fs::read(&loc.file).unwrap();
                    let at = loc.offset as usize..(loc.offset + loc.len) as usize;
                    assert_eq!(&bytes[at], &p.bytes[..], "{} {layer}/{e}", src.describe());
                    assert_eq!((loc.dtype, &loc.shape), (p.dtype, &p.shape));
                }
            }
        }
        // Off a GPU the staged path is the only one, and says why.
        let c = direct::choose(&Device::Cpu, src.as_ref(), &Settings::default()).unwrap();
        assert_eq!(
            (c.path, c.why.as_str(), c.register.len(), c.partial),
            (H2dPath::Staged, "not a CUDA device", 0, false)
        );
        let err = Settings::from_vars(|k| (k == "MOESCOPE_H2D").then(|| "dma".to_string()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MOESCOPE_H2D") && err.contains("direct, staged or auto"),
            "{err}"
        );
        let regions: Vec<direct::Region> = files
            .iter()
            .map(|f| direct::Region {
                file: f.clone(),
                len: u64::MAX,
            })
            .collect();
        let err = direct::DirectFiles::open(&Device::Cpu, &regions, false)
            .err()
            .expect("no direct copies without a GPU")
            .to_string();
        assert!(err.to_lowercase().contains("cuda"), "{err}");
    }
    assert!(seed[0].part_locations(0, 0).is_none());
    assert!(direct::expert_files(seed[0].as_ref()).is_none());
}

/// On the CPU a bf16 run maps a miss's expert in place (gate's rows and up's back to back, then
/// down's) instead of reading it: for the shard source and an extraction every expert maps, to
/// exactly the bytes `read` returns — so `selective_is_bit_identical_to_native_everywhere`'s
/// bf16 runs over those sources go through the maps; the seed layout and cold mode do not map.
#[test]
fn mapped_bf16_experts_are_the_bytes_read() {
    for name in ["qwen3-moe-tiny", "qwen3-omni-tiny"] {
        let (_tmp, cfg, sources) = every_source(name);
        let (file_sources, seed) = sources.split_at(2);
        for src in file_sources {
            for layer in cfg.moe_layers() {
                for e in 0..cfg.num_experts {
                    let (gu, dn) = src
                        .map_bf16(layer, e)
                        .unwrap()
                        .unwrap_or_else(|| panic!("{name} {} {layer}/{e} maps", src.describe()));
                    let raw = src.read(layer, e).unwrap();
                    let le = |v: &[half::bf16]| -> Vec<u8> {
                        v.iter().flat_map(|x| x.to_le_bytes()).collect()
                    };
                    let gate_up: Vec<u8> =
                        [&raw.parts[0].bytes[..], &raw.parts[1].bytes[..]].concat();
                    assert_eq!(
                        le(gu.values()),
                        gate_up,
                        "{name} {} {layer}/{e}",
                        src.describe()
                    );
                    assert_eq!(le(dn.values()), raw.parts[2].bytes, "{name} {layer}/{e}");
                    assert_eq!(gu.dims(), [2 * cfg.moe_intermediate_size, cfg.hidden_size]);
                    assert_eq!(dn.dims(), [cfg.hidden_size, cfg.moe_intermediate_size]);
                }
            }
            src.set_cold(true);
            assert!(
                src.map_bf16(cfg.moe_layers().next().unwrap(), 0)
                    .unwrap()
                    .is_none()
            );
            src.set_cold(false);
        }
        assert!(
            seed[0]
                .map_bf16(cfg.moe_layers().next().unwrap(), 0)
                .unwrap()
                .is_none()
        );
    }
}

/// A fixture's experts through every source: its shards, an extraction made here and the seed
/// layout, in that order (the temporary directory holds the last two).
fn every_source(
    name: &str,
) -> (
    tempfile::TempDir,
    moescope::model::MoeConfig,
    Vec<Box<dyn moescope::experts::source::ExpertSource>>,
) {
    use moescope::experts::extract::ExtractedSource;
    use moescope::experts::seed::SeedExpertSource;
    use moescope::experts::source::ShardSource;
    use moescope::model::{Checkpoint, MoeConfig};

    let dir = fixture(name);
    let cfg = MoeConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ext = tmp.path().join("ext");
    let (rc, _, err) = moescope_cli(&[
        "extract",
        "--model",
        dir.to_str().unwrap(),
        "--out",
        ext.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{err}");
    let seed = tmp.path().join("seed");
    make_seed_layout(&dir, &seed, true);
    let sources: Vec<Box<dyn moescope::experts::source::ExpertSource>> = vec![
        Box::new(ShardSource::new(&ckpt, &cfg).unwrap()),
        Box::new(ExtractedSource::open(&ext, &cfg).unwrap()),
        Box::new(SeedExpertSource::open(&seed, &cfg).unwrap()),
    ];
    (tmp, cfg, sources)
}

fn moescope_cli(args: &[&str]) -> (i32, String, String) {
    common::run(args)
}

/// f32 compute holds 16-bit experts as stored (`ports::held_dtype`) and widens them inside the
/// products: the same values stored in bf16, f16 or f32 give the same f32 logits and tokens, bit
/// for bit, native and selective (a cache of top-k experts, so misses map or are read), and the
/// 16-bit copies hold their experts in half the memory. Both fixtures, every shard rewritten.
#[test]
fn f32_compute_gives_the_same_bits_whatever_the_storage_dtype() {
    use candle_core::DType;
    let tmp = tempfile::tempdir().unwrap();
    // A copy of `name` with every tensor of every shard converted by `conv`.
    let rewrite =
        |name: &str, tag: &str, conv: &dyn Fn(&candle_core::Tensor) -> candle_core::Tensor| {
            let dir = tmp.path().join(format!("{name}-{tag}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in std::fs::read_dir(fixture(name)).unwrap() {
                let p = f.unwrap().path();
                let out = dir.join(p.file_name().unwrap());
                if p.extension().is_some_and(|e| e == "safetensors") {
                    let ts = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
                    let ts: std::collections::HashMap<String, candle_core::Tensor> =
                        ts.iter().map(|(k, t)| (k.clone(), conv(t))).collect();
                    candle_core::safetensors::save(&ts, &out).unwrap();
                } else {
                    std::fs::copy(&p, &out).unwrap();
                }
            }
            dir
        };
    let load = |dir: &std::path::Path, name: &str, backend, cache: CacheSettings| {
        moescope::engine::BackendSpec {
            model_dir: dir.to_path_buf(),
            ..spec(name, backend, cache, Dtype::F32)
        }
        .load(|_, _| {})
        .unwrap()
    };
    for name in FAMILIES {
        let seq = &golden(name).sequences[2];
        let to = |d: DType| move |t: &candle_core::Tensor| t.to_dtype(d).unwrap();
        let f32_copy = rewrite(name, "f32", &to(DType::F32));
        let f16_copy = rewrite(name, "f16", &to(DType::F16));
        let f16_as_f32 = rewrite(name, "f16-as-f32", &|t| {
            t.to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        });
        for (held, wide) in [(fixture(name), f32_copy), (f16_copy, f16_as_f32)] {
            let native = load(&wide, name, BackendKind::Native, CacheSettings::default());
            let want = bits_and_greedy(&native, seq, 12);
            let narrow = load(&held, name, BackendKind::Native, CacheSettings::default());
            assert!(
                bits_and_greedy(&narrow, seq, 12) == want,
                "{name}: native over {} differs from its f32 copy",
                held.display()
            );
            assert_eq!(
                2 * narrow.provider.resident_bytes(),
                native.provider.resident_bytes(),
                "{name}: 16-bit experts held in half the memory"
            );
            let top_k = native.cfg.num_experts_per_tok;
            let cache = CacheSettings {
                cache_experts: Some(top_k),
                ..Default::default()
            };
            let sel = load(&held, name, BackendKind::Selective, cache);
            assert!(
                bits_and_greedy(&sel, seq, 12) == want,
                "{name}: selective over {} differs",
                held.display()
            );
            assert!(sel.cache_snapshot().unwrap().misses > 0);
        }
    }
}
