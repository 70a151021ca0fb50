//! `moescope bench …`.

use anyhow::Result;

use crate::bench::{decode, random};
use crate::cache::settings::CacheSettings;
use crate::cli::{BenchCommand, BenchDecodeArgs, RandomCheckpointArgs};
use crate::engine::{BackendKind, BackendSpec, default_model_dir};
use crate::settings::Settings;

pub fn run(cmd: &BenchCommand, settings: &Settings) -> Result<()> {
    match cmd {
        BenchCommand::Decode(a) => bench_decode(a, settings),
        BenchCommand::RandomCheckpoint(a) => random_checkpoint(a),
        BenchCommand::Kld(a) => kld(a, settings),
        BenchCommand::Steps(a) => steps(a, settings),
        BenchCommand::Kernels(a) => {
            let secs = kernels(a, settings)?;
            println!(
                "kernels ready on {} ({}) in {secs:.2} s",
                a.device,
                a.dtype.name()
            );
            Ok(())
        }
    }
}

/// Runs native and selective (a cache of half the experts, so misses happen) through a few
/// tokens of a tiny random checkpoint: every kernel module either backend loads is compiled,
/// and the driver keeps the result for the next process. Seconds taken.
pub fn kernels(a: &crate::cli::KernelsArgs, settings: &Settings) -> Result<f64> {
    let start = std::time::Instant::now();
    let dir = tempfile::tempdir()?;
    let g = random::Geometry {
        layers: 2,
        hidden: 256,
        experts: 8,
        top_k: 2,
        moe_intermediate: 128,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        vocab: 512,
    };
    random::write(&g, dir.path(), 1, 1 << 30)?;
    for backend in [BackendKind::Native, BackendKind::Selective] {
        let spec = BackendSpec {
            model_dir: dir.path().to_path_buf(),
            dtype: a.dtype,
            device: a.device.clone(),
            backend,
            cache: CacheSettings {
                cache_experts: Some(g.layers * g.experts / 2),
                ..CacheSettings::default()
            },
            settings: settings.clone(),
        };
        let engine = spec.load(|_, _| {})?;
        decode::run_ours(&engine, &decode::prompt(8, g.vocab), 6)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn kld(a: &crate::cli::KldArgs, settings: &Settings) -> Result<()> {
    let spec = |model: &std::path::Path, dtype: crate::engine::Dtype| BackendSpec {
        model_dir: model.to_path_buf(),
        dtype,
        device: a.device.clone(),
        backend: BackendKind::Native,
        cache: CacheSettings::default(),
        settings: settings.clone(),
    };
    let text_tokens = |dir: &std::path::Path| -> Result<Vec<u32>> {
        let text_path = a
            .text
            .clone()
            .unwrap_or_else(|| crate::util::repo_file("prompts/reference.txt"));
        let text =
            std::fs::read_to_string(&text_path).map_err(|e| crate::model::ModelError::Io {
                path: text_path.clone(),
                what: "reading the text to score".into(),
                source: e,
            })?;
        Ok(crate::model::tokenizer::TextTokenizer::from_dir(dir)?.encode(&text)?)
    };
    let mut ours = None;
    let (base, against) = match (&a.base, &a.against) {
        (Some(file), _) => (
            crate::bench::kld::BaseLogits::read(file)?,
            "llama.cpp".to_string(),
        ),
        (None, Some(dir)) => {
            let tokens = text_tokens(dir)?;
            // One model at a time: the reference's log-probabilities are kept, it is dropped.
            let reference = spec(dir, crate::engine::Dtype::F32).load(|_, _| {})?;
            let base = crate::bench::kld::BaseLogits::from_engine(&reference, &tokens, a.ctx)?;
            (base, format!("{} (f32)", dir.display()))
        }
        (None, None) if a.candle => {
            crate::bench::decode::Reference::check_device(&a.model, a.device.is_cuda())?;
            let tokens = text_tokens(&a.model)?;
            let engine = spec(&a.model, a.dtype).load(|_, _| {})?;
            let mut reference = crate::bench::decode::Reference::load(
                &a.model,
                &engine.cfg,
                a.dtype.candle(),
                engine.model.device(),
            )?;
            let base = crate::bench::kld::BaseLogits::from_candle(
                &mut reference,
                &tokens,
                a.ctx,
                engine.cfg.vocab_size,
            )?;
            ours = Some(engine);
            (base, format!("candle-transformers' {}", reference.name()))
        }
        (None, None) => unreachable!("clap requires --base, --against or --candle"),
    };
    let engine = match ours {
        Some(e) => e,
        None => spec(&a.model, a.dtype).load(|_, _| {})?,
    };
    let k = crate::bench::kld::compare(&engine, &base)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&k)?);
    } else {
        println!(
            "{} ({} {}) against {against}: {} positions in {} chunks of {}; mean KL {:.3e}, \
             p99 {:.3e}, max {:.3e}; top-1 agreement {:.2} %; |Δ log p| ≤ {:.3e} where p ≥ {}",
            a.model.display(),
            a.dtype.name(),
            a.device,
            k.positions,
            base.chunks.len(),
            base.n_ctx,
            k.mean_kl,
            k.p99_kl,
            k.max_kl,
            k.top1_agreement_pct,
            k.max_likely_log_prob_diff,
            crate::bench::kld::Kld::LIKELY,
        );
    }
    Ok(())
}

fn bench_decode(a: &BenchDecodeArgs, settings: &Settings) -> Result<()> {
    let model = a.model.clone().unwrap_or_else(default_model_dir);
    let mut rows = Vec::new();
    for &dtype in &a.dtype {
        let spec = BackendSpec {
            model_dir: model.clone(),
            dtype,
            device: a.device.clone(),
            backend: BackendKind::Native,
            cache: CacheSettings::default(),
            settings: settings.clone(),
        };
        let c = decode::compare(
            &spec,
            a.prompt_tokens,
            a.new_tokens,
            a.repeats,
            !a.no_reference,
        )?;
        if !a.json && a.no_reference {
            println!(
                "{} {} {}: moescope {:.1} tok/s decode, {:.0} tok/s prefill ({} prompt tokens, \
                 {} new, best of {}; first decode step {:.2} ms, {:.1} tok/s after it)",
                c.model,
                c.dtype,
                c.device,
                c.ours_tok_s,
                c.ours_prefill_tok_s,
                c.prompt_tokens,
                c.new_tokens,
                c.repeats,
                c.ours_first_step_ms,
                c.ours_after_first_tok_s
            );
            if let (Some(f), Some(ms)) = (c.ours_fresh_tok_s, c.ours_fresh_first_step_ms) {
                println!(
                    "  each run on a fresh KV cache, capturing its graphs: {f:.1} tok/s, first \
                     decode step {ms:.2} ms (reuse {:.2}×)",
                    c.ours_tok_s / f.max(1e-12)
                );
            }
            print_step_split(&c);
        } else if !a.json {
            println!(
                "{} {} {}: moescope {:.1} tok/s, candle-transformers {:.1} tok/s, ratio {:.3} \
                 (prefill {:.0} vs {:.0} tok/s; first {} of {} greedy tokens agree)",
                c.model,
                c.dtype,
                c.device,
                c.ours_tok_s,
                c.reference_tok_s,
                c.ratio,
                c.ours_prefill_tok_s,
                c.reference_prefill_tok_s,
                c.agreeing_tokens,
                c.new_tokens
            );
            println!(
                "  moescope's first decode step {:.2} ms (on a GPU: with its graph capture), \
                 {:.1} tok/s after it",
                c.ours_first_step_ms, c.ours_after_first_tok_s
            );
            if let (Some(f), Some(ms), Some(eq)) = (
                c.ours_fresh_tok_s,
                c.ours_fresh_first_step_ms,
                c.fresh_tokens_equal,
            ) {
                println!(
                    "  moescope starting each run fresh (KV cache and graphs anew) {f:.1} tok/s, \
                     first decode step {ms:.2} ms (reuse {:.2}×; same tokens: {eq})",
                    c.ours_tok_s / f.max(1e-12)
                );
            }
            if let (Some(u), Some(eq)) = (c.ours_uncaptured_tok_s, c.uncaptured_tokens_equal) {
                println!(
                    "  moescope without CUDA graphs {u:.1} tok/s (graphs {:.2}×; same tokens: {eq})",
                    c.ours_tok_s / u.max(1e-12)
                );
            }
            print_step_split(&c);
        }
        rows.push(c);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

/// `bench steps`: the native backend in bf16 on the GPU, one step profiled (see
/// `model::step_profile`).
/// Where a GPU decode step's wall time went, when every step after the first replayed a graph.
fn print_step_split(c: &decode::Comparison) {
    if let (Some(d), Some(h)) = (c.ours_step_device_ms, c.ours_step_host_ms) {
        println!(
            "  a decode step after the first: {d:.3} ms on the device (the graph), {h:.3} ms on \
             the host around it"
        );
    }
}

fn steps(a: &crate::cli::StepsArgs, settings: &Settings) -> Result<()> {
    if let Some(path) = &a.save {
        super::check_output(path)?;
    }
    if !a.device.is_cuda() {
        crate::bail_input!(
            "bench steps profiles CUDA graphs: pass --device cuda:N (got {})",
            a.device
        );
    }
    let spec = BackendSpec {
        model_dir: a.model.clone().unwrap_or_else(default_model_dir),
        dtype: crate::engine::Dtype::Bf16,
        device: a.device.clone(),
        backend: BackendKind::Native,
        cache: CacheSettings::default(),
        settings: settings.clone(),
    };
    let engine = spec.load(|_, _| {})?;
    let prompt = decode::prompt(a.prompt_tokens.max(1), engine.cfg.vocab_size);
    let p = profile_step(&engine, &prompt, a.rounds)?;
    if let Some(path) = &a.save {
        super::write_output(path, &serde_json::to_string_pretty(&p)?)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", crate::report::steps::table(&p));
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn profile_step(
    engine: &crate::engine::Engine,
    prompt: &[u32],
    rounds: usize,
) -> Result<crate::model::step_profile::StepProfile> {
    Ok(crate::model::step_profile::profile(
        &engine.model,
        engine.provider.as_ref(),
        prompt,
        rounds,
    )?)
}

#[cfg(not(feature = "cuda"))]
fn profile_step(
    _: &crate::engine::Engine,
    _: &[u32],
    _: usize,
) -> Result<crate::model::step_profile::StepProfile> {
    crate::bail_input!("this moescope was built without CUDA (cargo build --features cuda)")
}

fn random_checkpoint(a: &RandomCheckpointArgs) -> Result<()> {
    let Some(mut g) = random::Geometry::preset(&a.preset) else {
        crate::bail_input!(
            "unknown preset \"{}\": expected one of {}",
            a.preset,
            random::Geometry::PRESETS.join(", ")
        );
    };
    if let Some(l) = a.layers {
        g.layers = l;
    }
    let (ne, ex) = g.params();
    // A random checkpoint is written over nothing: `--out` at a real model (or a GGUF someone
    // downloaded) would otherwise lose it to random weights.
    let occupied = match std::fs::read_dir(&a.out) {
        Ok(mut entries) => a.gguf.is_some() || entries.next().is_some(),
        Err(_) => a.out.exists(),
    };
    if occupied {
        crate::bail_input!(
            "{}: already exists{}; a random checkpoint is written only to a new {}",
            a.out.display(),
            if a.out.is_dir() {
                " and is not empty"
            } else {
                ""
            },
            if a.gguf.is_some() {
                "file"
            } else {
                "or empty directory"
            }
        );
    }
    if let Some(q) = &a.gguf {
        let Some(quant) = random::GgufQuant::parse(q) else {
            crate::bail_input!(
                "--gguf {q}: expected Q8_0, Q4_K, Q4_K_M, MXFP4_MOE, IQ4_XS_MOE, IQ4_NL_MOE, IQ4_XS or BF16"
            );
        };
        random::write_gguf(&g, &a.out, a.seed, quant)?;
        println!(
            "wrote {} ({ne} non-expert + {ex} expert parameters, {q}) to {}",
            a.preset,
            a.out.display()
        );
        return Ok(());
    }
    random::write(&g, &a.out, a.seed, a.shard_size)?;
    println!(
        "wrote {} ({} non-expert + {} expert parameters, bf16) to {}",
        a.preset,
        ne,
        ex,
        a.out.display()
    );
    // `run` and `sweep` send text prompts: give the checkpoint the bundled model's tokenizer,
    // whose ids all exist in the preset's larger vocabulary.
    let bundled = crate::engine::default_model_dir();
    match random::copy_tokenizer(&bundled, &a.out, g.vocab)? {
        Some(n) => println!("tokenizer: the bundled model's ({n} ids), for text prompts"),
        None => println!(
            "no tokenizer written (the bundled one at {} is missing or has more ids than the \
             vocabulary): `run` and `sweep` need a tokenizer.json there",
            bundled.display()
        ),
    }
    Ok(())
}
