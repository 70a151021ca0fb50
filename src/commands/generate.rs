//! `moescope generate` and `moescope logits`.

use std::io::Write;

use anyhow::Result;
use serde_json::json;

use crate::cli::{GenerateArgs, LogitsArgs};
use crate::engine::Engine;
use crate::model::generate::{Generation, Timing, non_numbers};
use crate::model::ports::{NoObserver, RoutingLog};
use crate::model::qwen3_moe::Logits;
use crate::model::sampling::SamplingParams;
use crate::model::tokenizer::{PromptStyle, StreamDecoder, TextTokenizer, stop_ids};
use crate::settings::Settings;

pub fn generate(args: &GenerateArgs, settings: &Settings) -> Result<()> {
    let spec = super::backend_spec(&args.model, &args.backend, settings);
    guard(&args.model, &spec, args.sampling.max_new_tokens + 2048)?;
    let engine = spec.load(|_, _| {})?;
    // The tokenizer is needed for text prompts and for printing text; token-id prompts work
    // without one (then only ids are printed).
    let tokenizer = match (&args.prompt, TextTokenizer::from_dir(&spec.model_dir)) {
        (Some(_), Err(e)) => return Err(e.into()),
        (_, t) => t.ok(),
    };
    if let Some(t) = &tokenizer {
        t.check_fits(engine.cfg.vocab_size)?;
    }
    let prompt_ids = match (&args.prompt, &args.token_ids) {
        (Some(p), _) => tokenizer.as_ref().expect("checked above").prompt_ids(
            p,
            PromptStyle {
                raw: args.raw,
                enable_thinking: args.enable_thinking,
            },
        )?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => unreachable!("clap requires one of them"),
    };
    let params = args.sampling.params();
    if let Some(rec) = &engine.cfg.recommended_sampling
        && params.temperature <= 0.0
        && rec.temperature.is_some_and(|t| t > 0.0)
    {
        eprintln!(
            "note: decoding greedily; the checkpoint's generation_config.json recommends {} \
             (--temperature/--top-p/--top-k)",
            rec.describe()
        );
    }
    if let Some(w) = engine.cfg.past_context_warning(
        "the prompt",
        prompt_ids.len(),
        args.sampling.max_new_tokens,
    ) {
        eprintln!("warning: {w}");
    }
    let stops = stop_ids(&engine.cfg.eos_token_ids, tokenizer.as_ref());
    let mut g = Generation::new(&engine.model, prompt_ids.clone(), params, stops)?;
    let mut decoder = StreamDecoder::new();
    let mut text = String::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    while let Some(step) = g.step(&engine.model, engine.provider.as_ref(), &mut NoObserver)? {
        if let Some(tok) = &tokenizer {
            let piece = decoder.push(tok, step.token);
            text.push_str(&piece);
            if !args.json {
                write!(out, "{piece}")?;
                out.flush()?;
            }
        } else if !args.json {
            write!(out, "{} ", step.token)?;
            out.flush()?;
        }
    }
    if let Some(tok) = &tokenizer {
        let rest = decoder.finish(tok);
        text.push_str(&rest);
        if !args.json {
            write!(out, "{rest}")?;
        }
    }
    let timing = Timing::of(&g, engine.load_time);
    let finish = g.finished();
    if args.json {
        let v = json!({
            "model": spec.model_dir,
            "backend": engine.provider.kind(),
            "dtype": engine.dtype.name(),
            "device": engine.device.0,
            "degraded": engine.degraded,
            "prompt": args.prompt,
            "prompt_token_ids": prompt_ids,
            "generated_token_ids": g.generated,
            "text": text,
            "finish_reason": finish,
            "timing": timing,
            "cache": engine.cache_snapshot().map(|s| json!({
                "hits": s.hits, "misses": s.misses, "evictions": s.evictions,
                "hit_rate": s.hit_rate(), "bytes_read": s.bytes_read,
                "capacity_experts": s.capacity_experts,
                "h2d_path": s.h2d_path, "host_pinned_bytes": s.host_pinned_bytes,
                "load_latency_us": s.load_latency,
                "prefetch": s.prefetch.as_ref().map(|p| json!({
                    "guessed": p.guessed, "loaded": p.loaded, "precision": p.precision(), "recall": p.recall(),
                })),
            })),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(out)?;
        writeln!(
            out,
            "[{} {} {} · load {:.2} s · TTFT {:.3} s · prefill {:.1} tok/s · decode {:.1} tok/s · {} tokens ({}){}{}]",
            engine.provider.kind(),
            engine.dtype.name(),
            engine.device,
            timing.load_s,
            timing.ttft_s,
            timing.prefill_tok_s,
            timing.decode_tok_s,
            timing.generated_tokens,
            match finish {
                Some(crate::model::generate::FinishReason::Eos) => "eos",
                _ => "max_new_tokens",
            },
            engine
                .cache_snapshot()
                .and_then(|s| s
                    .hit_rate()
                    .map(|h| format!(" · cache hit rate {:.1} %", 100.0 * h)))
                .unwrap_or_default(),
            if engine.degraded { " · DEGRADED" } else { "" },
        )?;
    }
    Ok(())
}

pub fn logits(args: &LogitsArgs, settings: &Settings) -> Result<()> {
    let spec = super::backend_spec(&args.model, &args.backend, settings);
    guard(&args.model, &spec, args.tokens.len() + args.greedy)?;
    let engine = spec.load(|_, _| {})?;
    let mut cache = engine.model.new_cache();
    let l = engine.model.forward(
        &args.tokens,
        &mut cache,
        engine.provider.as_ref(),
        &mut NoObserver,
        Logits::Last,
    )?;
    let row: Vec<f32> = l.squeeze(0)?.to_vec1()?;
    // JSON has no number for NaN or ±∞ (serde_json writes null): a row of nulls would read as
    // output, so it is refused by name.
    let when = format!("after the last of {} tokens", args.tokens.len());
    if let Some(e) = non_numbers(&row, &when, "NaN or infinite", |v| !v.is_finite()) {
        return Err(e.into());
    }
    let mut v = json!({ "tokens": args.tokens, "logits": row });
    if args.greedy > 0 {
        v["steps"] = greedy_steps(&engine, &args.tokens, args.greedy)?;
    }
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

/// `n` greedy tokens after `prompt` through [`Generation`], with each step's logits and routing.
fn greedy_steps(engine: &Engine, prompt: &[u32], n: usize) -> Result<serde_json::Value> {
    let params = SamplingParams {
        max_new_tokens: n,
        ..Default::default()
    };
    let mut g = Generation::new(&engine.model, prompt.to_vec(), params, vec![])?;
    let mut steps = Vec::new();
    loop {
        let mut log = RoutingLog::default();
        let Some(out) = g.step(&engine.model, engine.provider.as_ref(), &mut log)? else {
            break;
        };
        let routing: Vec<_> = log
            .entries
            .iter()
            .map(|(l, p, e)| json!([l, p, e]))
            .collect();
        steps.push(json!({
            "token": out.token,
            "logits": g.last_logits()?,
            "routing": routing,
            "path": out.path,
        }));
    }
    Ok(serde_json::Value::Array(steps))
}

/// The memory guard for one backend (see `commands::guard_memory`).
fn guard(
    model: &crate::cli::ModelArgs,
    spec: &crate::engine::BackendSpec,
    tokens: usize,
) -> Result<()> {
    let cfg = crate::model::MoeConfig::from_dir(&spec.model_dir)?;
    super::guard_memory(
        model,
        &[(spec.backend.name(), spec.footprint(&cfg, tokens))],
        false,
        &spec.model_dir,
    )
}
