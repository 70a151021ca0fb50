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
    }
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
        let c = decode::compare(&spec, a.prompt_tokens, a.new_tokens, a.repeats)?;
        if !a.json {
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
            if let (Some(u), Some(eq)) = (c.ours_uncaptured_tok_s, c.uncaptured_tokens_equal) {
                println!(
                    "  moescope without CUDA graphs {u:.1} tok/s (graphs {:.2}×; same tokens: {eq})",
                    c.ours_tok_s / u.max(1e-12)
                );
            }
        }
        rows.push(c);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
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
