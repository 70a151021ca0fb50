//! A reference implementation on the user's own weights (`run --reference-impl transformers`):
//! after both backends have run, `scripts/reference_worker.py` (embedded here, written to a
//! temporary file) runs in the user's Python with torch + transformers, on the same token ids
//! moescope used. It generates greedily (its own speed and tokens) and scores native's tokens
//! teacher-forced on native's support, so the session can say how closely moescope native
//! matches transformers — a check of moescope itself, kept apart from the verdict.
//!
//! `run --reference-impl moescope --reference-model DIR` runs moescope's own native backend on
//! another checkpoint instead (`moescope reference-worker`, the same protocol): against the
//! original a GGUF or FP8 file was made from, the line says what the quantization costs.
//!
//! Anything missing (Python, torch, transformers, the reference model) or failing is one
//! `ReferenceUnavailable` event with the reason; the run goes on.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

use serde_json::{Value, json};

use super::memory;
use crate::model::tokenizer::{StreamDecoder, TextTokenizer};
use crate::session::event::{RoutingAgreement, SessionEvent};
use crate::session::quality::{ScoreRow, agreement};

/// The worker script, carried in the binary so an installed moescope needs no source tree.
pub const SCRIPT: &str = include_str!("../../scripts/reference_worker.py");

/// Which reference implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferenceImpl {
    /// Hugging Face transformers (PyTorch), eager experts.
    Transformers,
    /// moescope's native backend on another checkpoint (`--reference-model`).
    Moescope,
}

impl ReferenceImpl {
    pub fn name(self) -> &'static str {
        match self {
            ReferenceImpl::Transformers => "transformers",
            ReferenceImpl::Moescope => "moescope",
        }
    }
}

impl std::str::FromStr for ReferenceImpl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "transformers" => Ok(ReferenceImpl::Transformers),
            "moescope" => Ok(ReferenceImpl::Moescope),
            other => Err(format!(
                "--reference-impl {other}: unknown reference implementation (known: \
                 transformers, moescope)"
            )),
        }
    }
}

/// What the reference needs to know.
#[derive(Debug, Clone)]
pub struct ReferenceConfig {
    pub implementation: ReferenceImpl,
    /// The Python interpreter (with torch and transformers).
    pub python: PathBuf,
    /// This moescope binary (the `moescope` implementation runs `exe reference-worker`).
    pub exe: PathBuf,
    /// The run's settings, for the `moescope` implementation's worker.
    pub settings: crate::settings::Settings,
    pub model_dir: PathBuf,
    /// The vocabulary of --model: a reference of another vocabulary is refused (the token ids
    /// would not mean the same).
    pub vocab_size: usize,
    /// "f32", "bf16" or "f16", as the backends ran.
    pub dtype: String,
    /// "cpu" or "cuda:N".
    pub device: String,
    /// Time allowed for loading, and for each answer after it.
    pub load_timeout: Duration,
    pub step_timeout: Duration,
    pub gpu_memory: bool,
}

/// One prompt as native ran it: the ids it was given, its greedy tokens, its score rows
/// (None without scoring) and the token budget.
pub struct ReferencePromptInput {
    pub prompt: usize,
    pub prompt_ids: Vec<u32>,
    pub native_tokens: Vec<u32>,
    pub native_rows: Option<(Vec<ScoreRow>, bool)>,
    pub max_new_tokens: usize,
    /// Native's routing on this prompt: position → experts per MoE layer (empty when it was
    /// not traced).
    pub native_routing: BTreeMap<usize, Vec<Vec<u16>>>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr_tail: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The Python script written for this worker (removed when it ends).
    script: Option<PathBuf>,
}

impl Worker {
    fn spawn(cfg: &ReferenceConfig) -> Result<Worker, String> {
        let (program, script) = match cfg.implementation {
            ReferenceImpl::Transformers => {
                let script = std::env::temp_dir().join(format!(
                    "moescope-reference-{}-{}.py",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos())
                ));
                std::fs::write(&script, SCRIPT).map_err(|e| {
                    format!(
                        "cannot write the reference worker script {}: {e}",
                        script.display()
                    )
                })?;
                (cfg.python.clone(), Some(script))
            }
            ReferenceImpl::Moescope => (cfg.exe.clone(), None),
        };
        let mut command = Command::new(&program);
        match &script {
            Some(s) => command.arg(s),
            None => command.arg("reference-worker"),
        };
        let child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                if let Some(s) = &script {
                    let _ = std::fs::remove_file(s);
                }
                return Err(format!("cannot start {}: {e}", program.display()));
            }
        };
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tail = stderr_tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut t = tail.lock().expect("tail");
                t.push(line);
                if t.len() > 5 {
                    t.remove(0);
                }
            }
        });
        Ok(Worker {
            child,
            stdin,
            lines,
            stderr_tail,
            script,
        })
    }

    /// Sends one command and waits for its one answer (an `error` answer is an Err).
    fn call(&mut self, cmd: Value, timeout: Duration) -> Result<Value, String> {
        let what = cmd["cmd"].as_str().unwrap_or("?").to_string();
        writeln!(self.stdin, "{cmd}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("{what}: the reference worker is gone ({e}){}", self.tail()))?;
        loop {
            let line = match self.lines.recv_timeout(timeout) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("{what}: no answer within {} s", timeout.as_secs()));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "{what}: the reference worker exited{}",
                        self.tail()
                    ));
                }
            };
            // Libraries may print to stdout; only JSON objects with an `ev` are answers.
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            match v["ev"].as_str() {
                Some("error") => {
                    return Err(v["message"].as_str().unwrap_or("unknown error").to_string());
                }
                Some(_) => return Ok(v),
                None => continue,
            }
        }
    }

    fn tail(&self) -> String {
        let t = self.stderr_tail.lock().expect("tail");
        if t.is_empty() {
            String::new()
        } else {
            format!(": {}", t.join(" | "))
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "shutdown"}));
        let _ = self.stdin.flush();
        let remove = |s: &Option<PathBuf>| {
            if let Some(s) = s {
                let _ = std::fs::remove_file(s);
            }
        };
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                remove(&self.script);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove(&self.script);
    }
}

fn rows_from(v: &Value) -> Result<Vec<ScoreRow>, String> {
    serde_json::from_value(v["rows"].clone()).map_err(|e| format!("score: bad rows: {e}"))
}

/// Native's routing against the reference's (`theirs[position][moe layer]`), at every position
/// both have; `None` when none is shared (a layer count that differs is not compared).
fn compare_routing(
    native: &BTreeMap<usize, Vec<Vec<u16>>>,
    theirs: &[Vec<Vec<u16>>],
) -> Option<RoutingAgreement> {
    let mut a = RoutingAgreement::default();
    for (&pos, layers) in native {
        let Some(other) = theirs.get(pos).filter(|o| o.len() == layers.len()) else {
            continue;
        };
        for (mine, their) in layers.iter().zip(other) {
            if !mine.is_empty() {
                a.add(mine, their);
            }
        }
    }
    (a.pairs > 0).then_some(a)
}

/// One text piece per token, as a backend streams them (a character split over tokens shows
/// with the token that completes it; what is held back at the end joins the last piece).
fn pieces(tok: &TextTokenizer, ids: &[u32]) -> Vec<String> {
    let mut d = StreamDecoder::new();
    let mut out: Vec<String> = ids.iter().map(|&id| d.push(tok, id)).collect();
    let rest = d.finish(tok);
    if let Some(last) = out.last_mut() {
        last.push_str(&rest);
    }
    out
}

/// Runs the reference on every prompt; every result (or the reason there is none) is an event.
pub fn run(
    cfg: &ReferenceConfig,
    prompts: &[ReferencePromptInput],
    stop_ids: &[u32],
    emit: &mut dyn FnMut(SessionEvent),
) {
    if let Err(reason) = run_inner(cfg, prompts, stop_ids, emit) {
        emit(SessionEvent::ReferenceUnavailable { reason });
    }
}

fn run_inner(
    cfg: &ReferenceConfig,
    prompts: &[ReferencePromptInput],
    stop_ids: &[u32],
    emit: &mut dyn FnMut(SessionEvent),
) -> Result<(), String> {
    let mut w = Worker::spawn(cfg)?;
    // The same tokenizer the backends' workers decode with, so the three columns compare.
    let tokenizer = TextTokenizer::from_dir(&cfg.model_dir).ok();
    let gpu_base = cfg
        .gpu_memory
        .then(|| memory::Gpu::get().device_used())
        .flatten();
    let loaded = w.call(
        json!({"cmd": "load", "model": cfg.model_dir, "dtype": cfg.dtype, "device": cfg.device,
               "settings": cfg.settings}),
        cfg.load_timeout,
    )?;
    if let Some(v) = loaded["vocab_size"].as_u64()
        && v as usize != cfg.vocab_size
    {
        return Err(format!(
            "{}: its vocabulary has {v} tokens, the model's {}: the token ids would not mean \
             the same (give the checkpoint the model was made from)",
            cfg.model_dir.display(),
            cfg.vocab_size
        ));
    }
    emit(SessionEvent::ReferenceLoaded {
        implementation: loaded["implementation"]
            .as_str()
            .unwrap_or("transformers")
            .to_string(),
        load_s: loaded["load_s"].as_f64().unwrap_or(0.0),
    });
    for p in prompts {
        // Its own greedy run: its tokens and its speed, as the user ran it before.
        let budget = cfg.step_timeout * (p.max_new_tokens as u32 + 1);
        let g = w.call(
            json!({"cmd": "generate", "prompt_ids": p.prompt_ids,
                   "max_new_tokens": p.max_new_tokens, "stop_ids": stop_ids}),
            budget,
        )?;
        let token_ids: Vec<u32> = serde_json::from_value(g["ids"].clone())
            .map_err(|e| format!("generate: bad ids: {e}"))?;
        let decode_s = g["decode_s"].as_f64().unwrap_or(0.0);
        let decode_tok_s = (token_ids.len() > 1 && decode_s > 0.0)
            .then(|| (token_ids.len() - 1) as f64 / decode_s);
        // Teacher-forced on native's tokens, over native's support: KL(native ‖ reference),
        // and where native's routing was traced, the reference's beside it.
        let top_k = p.native_routing.values().flatten().map(Vec::len).max();
        let (agreement, routing) = match &p.native_rows {
            Some((rows, full)) if !p.native_tokens.is_empty() => {
                let support: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
                let scored = w.call(
                    json!({"cmd": "score", "prompt_ids": p.prompt_ids,
                           "continuation": p.native_tokens, "support": support,
                           "routing_top_k": top_k}),
                    budget,
                )?;
                let theirs: Option<Vec<Vec<Vec<u16>>>> =
                    serde_json::from_value(scored["routing"].clone()).ok();
                let routing = theirs.and_then(|t| compare_routing(&p.native_routing, &t));
                (Some(agreement(rows, &rows_from(&scored)?, *full)), routing)
            }
            _ => (None, None),
        };
        let text = tokenizer
            .as_ref()
            .map(|t| pieces(t, &token_ids))
            .unwrap_or_default();
        emit(SessionEvent::ReferencePrompt {
            prompt: p.prompt,
            text,
            routing,
            token_ids,
            ttft_s: g["ttft_s"].as_f64().unwrap_or(0.0),
            decode_tok_s,
            agreement,
        });
    }
    // Its high-water mark covers loading and every prompt.
    if let Some(s) = memory::sample(w.child.id(), cfg.gpu_memory, gpu_base) {
        emit(SessionEvent::ReferenceDone {
            peak_bytes: s.peak_rss.max(s.rss()),
            peak_gpu: s.gpu,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_compared_per_position_and_layer_as_sets() {
        // Native traced positions 3 and 4 over two MoE layers (k = 2).
        let native = BTreeMap::from([
            (3, vec![vec![5, 1], vec![2, 7]]),
            (4, vec![vec![0, 9], vec![3, 4]]),
        ]);
        // The reference at positions 0..5: same sets in another order at 3; at 4 one layer
        // shares one expert of two.
        let mut theirs = vec![vec![vec![0, 0], vec![0, 0]]; 5];
        theirs[3] = vec![vec![1, 5], vec![7, 2]];
        theirs[4] = vec![vec![9, 0], vec![4, 8]];
        let a = compare_routing(&native, &theirs).unwrap();
        assert_eq!((a.pairs, a.same, a.shared, a.picked), (4, 3, 7, 8));
        assert_eq!(a.same_pct(), Some(75.0));
        assert_eq!(a.shared_pct(), Some(87.5));
        // Positions the reference did not report, or another layer count: nothing compared.
        assert!(compare_routing(&native, &theirs[..3]).is_none());
        let other_layers = vec![vec![vec![1, 5]]; 5];
        assert!(compare_routing(&native, &other_layers).is_none());
    }
}
