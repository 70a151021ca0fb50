//! `moescope reference-worker`: moescope's native backend as the reference of
//! `run --reference-impl moescope --reference-model DIR` — typically the bf16 original a GGUF or
//! FP8 file was made from, so a quantized run reports what its quantization costs (KL, top-1
//! agreement, identical tokens, same experts) against the model's own weights, in the same line
//! and panel as transformers' reference.
//!
//! It speaks the reference protocol of `scripts/reference_worker.py` (JSON lines; see that
//! file), so the parent's side (`worker::reference`) is one for both implementations:
//!   load {model, dtype, device, settings?} → loaded {implementation, load_s, vocab_size}
//!   generate {prompt_ids, max_new_tokens, stop_ids} → generated {ids, ttft_s, decode_s}
//!   score {prompt_ids, continuation, support, routing_top_k?} → scored {rows, routing}
//!   shutdown → bye
//! Any failure is `{"ev": "error", "message"}`; a failed load ends the worker.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{Value, json};

use super::super::protocol::Support;
use super::scoring::score_rows;
use super::trace::TraceObserver;
use crate::cache::settings::CacheSettings;
use crate::engine::{BackendKind, BackendSpec, DeviceSpec, Dtype, Engine};
use crate::model::generate::Generation;
use crate::model::sampling::SamplingParams;
use crate::settings::Settings;

fn send(ev: Value) {
    let mut out = std::io::stdout().lock();
    // If the parent is gone there is nobody to tell; exit quietly.
    if writeln!(out, "{ev}").and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

fn field<'a>(cmd: &'a Value, name: &str) -> Result<&'a Value, String> {
    cmd.get(name)
        .ok_or_else(|| format!("{}: no `{name}` field", cmd["cmd"].as_str().unwrap_or("?")))
}

fn ids_of(cmd: &Value, name: &str) -> Result<Vec<u32>, String> {
    serde_json::from_value(field(cmd, name)?.clone())
        .map_err(|e| format!("`{name}` is not a list of token ids: {e}"))
}

fn load(cmd: &Value) -> Result<(Engine, Value), String> {
    let model_dir = PathBuf::from(
        field(cmd, "model")?
            .as_str()
            .ok_or("load: `model` is not a path")?,
    );
    let dtype: Dtype = serde_json::from_value(field(cmd, "dtype")?.clone())
        .map_err(|e| format!("load: `dtype`: {e}"))?;
    let device = DeviceSpec::parse(
        field(cmd, "device")?
            .as_str()
            .ok_or("load: `device` is not a string")?,
    )?;
    // The parent's settings (read once at its start-up); absent, the defaults.
    let settings: Settings = match cmd.get("settings") {
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|e| format!("load: `settings`: {e}"))?
        }
        None => Settings::default(),
    };
    let spec = BackendSpec {
        model_dir: model_dir.clone(),
        dtype,
        device,
        backend: BackendKind::Native,
        cache: CacheSettings::default(),
        settings,
    };
    let start = Instant::now();
    let engine = spec
        .load(|_, _| {})
        .map_err(|e| format!("{}: {e}", model_dir.display()))?;
    let name = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| model_dir.display().to_string());
    let ev = json!({
        "ev": "loaded",
        "implementation": format!("moescope {} native on {name} ({})",
                                  env!("CARGO_PKG_VERSION"), dtype.name()),
        "load_s": start.elapsed().as_secs_f64(),
        "vocab_size": engine.cfg.vocab_size,
    });
    Ok((engine, ev))
}

/// Greedy, as the backends compare: its own tokens and speed.
fn generate(engine: &Engine, cmd: &Value) -> Result<Value, String> {
    let prompt = ids_of(cmd, "prompt_ids")?;
    let max_new_tokens = field(cmd, "max_new_tokens")?
        .as_u64()
        .ok_or("generate: `max_new_tokens` is not a count")? as usize;
    let stops = match cmd.get("stop_ids") {
        Some(_) => ids_of(cmd, "stop_ids")?,
        None => Vec::new(),
    };
    let vocab = engine.cfg.vocab_size;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!(
            "generate: token id {bad} is outside this model's vocabulary of {vocab}"
        ));
    }
    let params = SamplingParams {
        max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    };
    let model = &engine.model;
    let mut g = Generation::new(model, prompt, params, stops).map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    let (mut ttft, mut decode_s) = (0.0, 0.0);
    let mut observer = crate::model::ports::NoObserver;
    while let Some(step) = g
        .step(model, engine.provider.as_ref(), &mut observer)
        .map_err(|e| e.to_string())?
    {
        if step.prefill {
            ttft = step.step_time.as_secs_f64();
        } else {
            decode_s += step.step_time.as_secs_f64();
        }
        ids.push(step.token);
        if step.finish.is_some() {
            break;
        }
    }
    Ok(json!({"ev": "generated", "ids": ids, "ttft_s": ttft, "decode_s": decode_s}))
}

/// Teacher-forced on the parent's tokens, over its support; with `routing_top_k`, the experts
/// every position picked in every MoE layer.
fn score(engine: &Engine, cmd: &Value) -> Result<Value, String> {
    let mut ids = ids_of(cmd, "prompt_ids")?;
    let continuation = ids_of(cmd, "continuation")?;
    if ids.is_empty() {
        return Err("score: the prompt has no tokens".into());
    }
    let support = match field(cmd, "support")? {
        Value::Number(n) => {
            Support::TopK(n.as_u64().ok_or("score: `support` is not a count")? as usize)
        }
        v => Support::Ids(
            serde_json::from_value(v.clone())
                .map_err(|e| format!("score: `support` is neither a count nor id lists: {e}"))?,
        ),
    };
    let cfg = &engine.cfg;
    let moe_layers: Vec<usize> = cfg.moe_layers().collect();
    let mut moe_index = vec![None; cfg.num_hidden_layers];
    for (i, &l) in moe_layers.iter().enumerate() {
        moe_index[l] = Some(i);
    }
    let mut trace = TraceObserver {
        moe_index,
        per_position: Default::default(),
        guesses: Default::default(),
        layers: moe_layers.len(),
        enabled: cmd.get("routing_top_k").is_some_and(|k| !k.is_null()),
        with_guesses: false,
    };
    let from = ids.len() - 1;
    let count = continuation.len();
    ids.extend_from_slice(&continuation);
    let (rows, _) = score_rows(engine, &ids, from, count, &support, &mut trace)?;
    // Positions 0.. as the parent indexes them; none traced, no routing.
    let routing: Option<Vec<Vec<Vec<u16>>>> = (!trace.per_position.is_empty()).then(|| {
        (0..ids.len())
            .map(|p| {
                trace
                    .per_position
                    .get(&p)
                    .cloned()
                    .unwrap_or_else(|| vec![Vec::new(); moe_layers.len()])
            })
            .collect()
    });
    Ok(json!({"ev": "scored", "rows": rows, "routing": routing}))
}

pub fn run() -> anyhow::Result<()> {
    let mut engine: Option<Engine> = None;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let cmd: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                send(json!({"ev": "error", "message": format!("bad command {line:?}: {e}")}));
                continue;
            }
        };
        let answer = match (cmd["cmd"].as_str(), &engine) {
            (Some("load"), _) => match load(&cmd) {
                Ok((e, ev)) => {
                    engine = Some(e);
                    Ok(ev)
                }
                Err(message) => {
                    send(json!({"ev": "error", "message": message}));
                    return Ok(());
                }
            },
            (Some("shutdown"), _) => {
                send(json!({"ev": "bye"}));
                return Ok(());
            }
            (_, None) => Err("load first".to_string()),
            (Some("generate"), Some(e)) => generate(e, &cmd),
            (Some("score"), Some(e)) => score(e, &cmd),
            (other, Some(_)) => Err(format!("unknown command {other:?}")),
        };
        match answer {
            Ok(ev) => send(ev),
            Err(message) => send(json!({"ev": "error", "message": message})),
        }
    }
    Ok(())
}
