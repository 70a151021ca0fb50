//! `moescope worker`: one backend in its own process, driven by JSON-line commands on stdin.
//! Its memory is measured alone, and a crash (or an out-of-memory kill) takes down only it.

use std::io::{BufRead, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use crate::engine::{BackendKind, Engine};
use crate::model::generate::{FinishReason, Timing};
use crate::model::sampling::SamplingParams;
use crate::model::tokenizer::{StreamDecoder, TextTokenizer, stop_ids};
use crate::session::event::{Backend, Finish, ResidentBytes, SessionEvent};

mod faults;
pub mod reference;
mod scoring;
mod trace;

use super::protocol::{Command, PROTOCOL_VERSION, PromptInput, WorkerEvent};
use faults::Faults;
use scoring::{opens_thinking, perplexity, prompt_ids, score};
use trace::TraceObserver;

/// Cache snapshots go out at most this often while generating.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(250);

struct Out {
    stdout: std::io::Stdout,
    /// The backend this worker runs (known once loaded), whose session events it reports.
    backend: Backend,
}

impl Out {
    /// Reports a session event of this worker's backend.
    fn session(&mut self, ev: SessionEvent) {
        let ev = ev.for_backend(self.backend);
        self.send(&WorkerEvent::Session(Box::new(ev)));
    }

    fn send(&mut self, ev: &WorkerEvent) {
        let mut line = serde_json::to_string(ev).expect("event serialises");
        line.push('\n');
        let mut lock = self.stdout.lock();
        // If the parent is gone there is nobody to tell; exit quietly.
        if lock
            .write_all(line.as_bytes())
            .and_then(|_| lock.flush())
            .is_err()
        {
            std::process::exit(0);
        }
    }
}

struct Loaded {
    engine: Engine,
    tokenizer: Option<TextTokenizer>,
    stops: Vec<u32>,
    trace: TraceObserver,
}

pub fn run() -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<Command, String>>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            let cmd = serde_json::from_str::<Command>(&line)
                .map_err(|e| format!("bad command {line:?}: {e}"));
            if tx.send(cmd).is_err() {
                break;
            }
        }
        // stdin closed: the parent is gone.
        let _ = tx.send(Ok(Command::Shutdown));
    });
    let mut out = Out {
        stdout: std::io::stdout(),
        backend: Backend::Native,
    };
    let mut faults = Faults::from_env();
    let mut state: Option<Loaded> = None;
    let mut greeted = false;
    loop {
        let cmd = match rx.recv() {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                out.send(&WorkerEvent::Error {
                    message: e,
                    fatal: false,
                });
                continue;
            }
            Err(_) => return Ok(()),
        };
        match cmd {
            Command::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    out.send(&WorkerEvent::Error {
                        message: format!(
                            "protocol version {version} requested, this worker speaks {PROTOCOL_VERSION}"
                        ),
                        fatal: true,
                    });
                    return Ok(());
                }
                greeted = true;
                out.send(&WorkerEvent::Ready {
                    version: PROTOCOL_VERSION,
                    pid: std::process::id(),
                });
            }
            _ if !greeted => out.send(&WorkerEvent::Error {
                message: "send hello first".into(),
                fatal: false,
            }),
            Command::Load {
                spec,
                trace_routing,
                trace_guesses,
            } => {
                let start = Instant::now();
                let mut last = Instant::now();
                out.backend = match spec.backend {
                    BackendKind::Native => Backend::Native,
                    BackendKind::Selective => Backend::Selective,
                };
                let backend = out.backend;
                let result = spec.load(|done, total| {
                    if last.elapsed() > Duration::from_millis(100) || done == total {
                        last = Instant::now();
                        out.session(SessionEvent::LoadProgress {
                            backend,
                            done,
                            total,
                        });
                    }
                });
                match result {
                    Ok(engine) => {
                        let tokenizer = TextTokenizer::from_dir(&spec.model_dir).ok();
                        let stops = stop_ids(&engine.cfg.eos_token_ids, tokenizer.as_ref());
                        let cfg = &engine.cfg;
                        let moe_layers: Vec<usize> = cfg.moe_layers().collect();
                        let mut moe_index = vec![None; cfg.num_hidden_layers];
                        for (i, &l) in moe_layers.iter().enumerate() {
                            moe_index[l] = Some(i);
                        }
                        let snap = engine.cache_snapshot();
                        // As held: the compute dtype, or a quantized expert's block bytes.
                        let expert_bytes = match &engine.cache {
                            Some(c) => c.expert_bytes(),
                            None => {
                                engine.provider.resident_bytes()
                                    / (cfg.total_experts() as u64).max(1)
                            }
                        };
                        let resident = ResidentBytes {
                            non_expert: engine.model.resident_bytes(),
                            experts: engine.provider.resident_bytes(),
                            cache_capacity: snap
                                .as_ref()
                                .map(|s| s.capacity_experts as u64 * expert_bytes)
                                .unwrap_or(0),
                            expert_bytes,
                        };
                        let describe = describe(&spec, &engine);
                        out.session(SessionEvent::Loaded {
                            backend,
                            load_s: start.elapsed().as_secs_f64(),
                            resident,
                            degraded: engine.degraded,
                            describe,
                            vocab_size: Some(cfg.vocab_size),
                            trained_context: Some(cfg.trained_context()),
                        });
                        state = Some(Loaded {
                            trace: TraceObserver {
                                moe_index,
                                per_position: Default::default(),
                                guesses: Default::default(),
                                layers: moe_layers.len(),
                                enabled: trace_routing,
                                with_guesses: trace_guesses,
                            },
                            engine,
                            tokenizer,
                            stops,
                        });
                    }
                    Err(e) => {
                        out.send(&WorkerEvent::Error {
                            message: e.to_string(),
                            fatal: true,
                        });
                        return Ok(());
                    }
                }
            }
            Command::Generate {
                prompt,
                input,
                sampling,
                stepped,
            } => {
                let Some(st) = state.as_mut() else {
                    out.send(&not_loaded());
                    continue;
                };
                match generate(
                    st,
                    &mut out,
                    &rx,
                    &mut faults,
                    prompt,
                    input,
                    sampling,
                    stepped,
                ) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Shutdown) => {
                        out.send(&WorkerEvent::Bye);
                        return Ok(());
                    }
                    Err(e) => {
                        // Not-a-number logits are the checkpoint's: every prompt after this
                        // one would fail the same way (as for scores below).
                        let fatal = e.contains("not finite");
                        out.send(&WorkerEvent::Error { message: e, fatal })
                    }
                }
            }
            Command::Score {
                prompt,
                input,
                continuation,
                support,
            } => {
                let Some(st) = state.as_mut() else {
                    out.send(&not_loaded());
                    continue;
                };
                st.engine.provider.set_bypass(true);
                let scored = prompt_ids(st, input).and_then(|mut ids| {
                    let from = ids.len() - 1;
                    let count = continuation.len();
                    ids.extend_from_slice(&continuation);
                    score(st, &ids, from, count, &support)
                });
                st.engine.provider.set_bypass(false);
                end_check();
                // A NaN or infinite log-probability cannot cross the JSON protocol (serde_json
                // writes it as null), and means the model's outputs are not numbers at all.
                let scored = scored.and_then(|(rows, full_vocab)| {
                    match rows
                        .iter()
                        .position(|r| r.logp.iter().any(|v| !v.is_finite()))
                    {
                        Some(at) => Err(format!(
                            "the model's log-probabilities are not finite (NaN or infinite) at \
                             position {at} of prompt {}: its weights or activations are not \
                             numbers — check the checkpoint",
                            prompt + 1
                        )),
                        None => Ok((rows, full_vocab)),
                    }
                });
                match scored {
                    Ok((rows, full_vocab)) => out.send(&WorkerEvent::Scored {
                        prompt,
                        rows,
                        full_vocab,
                    }),
                    Err(e) => {
                        // Not-a-number outputs are the checkpoint's fault: nothing this backend
                        // runs after them can be compared.
                        let fatal = e.contains("not finite");
                        out.send(&WorkerEvent::Error { message: e, fatal })
                    }
                }
            }
            Command::Perplexity { text, max_tokens } => {
                let Some(st) = state.as_mut() else {
                    out.send(&not_loaded());
                    continue;
                };
                st.engine.provider.set_bypass(true);
                let ppl = perplexity(st, &text, max_tokens);
                st.engine.provider.set_bypass(false);
                end_check();
                match ppl {
                    // As for scores: a NaN cannot cross the protocol and is the model's fault.
                    Ok((ppl, n)) if !ppl.is_finite() => out.send(&WorkerEvent::Error {
                        message: format!(
                            "the reference text's perplexity is not finite ({ppl}) over {n} \
                             tokens: the model's outputs are not numbers — check the checkpoint"
                        ),
                        fatal: true,
                    }),
                    Ok((ppl, n)) => out.session(SessionEvent::Perplexity {
                        backend: out.backend,
                        perplexity: ppl,
                        tokens: n,
                    }),
                    Err(e) => out.send(&WorkerEvent::Error {
                        message: e,
                        fatal: false,
                    }),
                }
            }
            Command::Step | Command::Pause | Command::Resume | Command::Cancel => {
                // Nothing is generating: these are no-ops (the parent may race a finish).
            }
            Command::Shutdown => {
                out.send(&WorkerEvent::Bye);
                return Ok(());
            }
        }
    }
}

fn not_loaded() -> WorkerEvent {
    WorkerEvent::Error {
        message: "no model loaded (send load first)".into(),
        fatal: false,
    }
}

fn describe(spec: &crate::engine::BackendSpec, engine: &Engine) -> String {
    let mut base = format!(
        "{} {} {}",
        engine.provider.kind(),
        engine.dtype.name(),
        engine.device
    );
    if let Some(format) = crate::model::held::expert_format(&spec.model_dir, Some(&engine.cfg)) {
        base.push_str(&format!(", {format}"));
    }
    if let Some(rope) = &engine.cfg.rope_scaling {
        base.push_str(&format!(", {}", rope.describe()));
    }
    match engine.cache_snapshot() {
        Some(s) => format!(
            "{base}: cache {} experts ({} scope, {}), source {}{}{}",
            s.capacity_experts,
            spec.cache.cache_scope.name(),
            spec.cache.policy.name(),
            spec.cache.expert_source,
            if spec.cache.cold {
                ", cold page cache"
            } else {
                ", warm page cache"
            },
            if s.prefetch.is_some() {
                ", prefetch next-layer"
            } else {
                ""
            },
        ),
        None => base,
    }
}

enum Flow {
    Continue,
    Shutdown,
}

/// After a quality check (teacher-forced scoring, perplexity): hand the check's freed buffers
/// back to the system and restart the kernel's high-water mark (`VmHWM`), so the peaks the
/// parent samples next are those of serving, not of moescope's own measurement. Where either
/// is unavailable the mark stays: peaks are then overstated, never understated.
fn end_check() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the system; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
    #[cfg(target_os = "linux")]
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[allow(clippy::too_many_arguments)]
fn generate(
    st: &mut Loaded,
    out: &mut Out,
    rx: &Receiver<Result<Command, String>>,
    faults: &mut Faults,
    prompt: usize,
    input: PromptInput,
    sampling: super::protocol::Sampling,
    stepped: bool,
) -> Result<Flow, String> {
    if faults.fail_generate_at_prompt == Some(prompt) {
        return Err(format!("prompt {prompt}: injected failure (test hook)"));
    }
    let ids = prompt_ids(st, input)?;
    let params = SamplingParams {
        max_new_tokens: sampling.max_new_tokens,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: sampling.top_k,
        seed: sampling.seed,
    };
    let model = &st.engine.model;
    let provider = st.engine.provider.clone();
    let snapshot = || st.engine.cache_snapshot();
    // Each token says which experts its step loaded (the dashboard's token inspector); the
    // log starts empty here, so a check's or an earlier prompt's loads are not counted.
    let cache = st.engine.cache.clone();
    if let Some(c) = &cache {
        c.log_misses(true);
        c.take_step_loads();
    }
    let mut g = st
        .engine
        .generation(ids.clone(), params, st.stops.clone())
        .map_err(|e| e.to_string())?;
    out.session(SessionEvent::PromptStarted {
        backend: out.backend,
        prompt,
        prompt_tokens: ids.len(),
        max_new_tokens: sampling.max_new_tokens,
        opens_thinking: opens_thinking(st, &ids),
    });
    let mut decoder = StreamDecoder::new();
    let mut text = String::new();
    let mut paused = false;
    let mut last_snapshot = Instant::now();
    let mut cancelled = false;
    loop {
        // Between tokens: obey commands. In stepped mode, wait for the next `step`.
        let mut go = !stepped && !paused;
        loop {
            let msg = if go {
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Ok(Flow::Shutdown),
                }
            } else {
                match rx.recv_timeout(Duration::from_millis(250)) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Some(s) = snapshot()
                            && last_snapshot.elapsed() > Duration::from_secs(1)
                        {
                            out.session(SessionEvent::Cache {
                                backend: out.backend,
                                snapshot: s,
                            });
                            last_snapshot = Instant::now();
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return Ok(Flow::Shutdown),
                }
            };
            match msg {
                Ok(Command::Step) => {
                    go = true;
                    if stepped || paused {
                        break;
                    }
                }
                Ok(Command::Pause) => {
                    paused = true;
                    go = false;
                }
                Ok(Command::Resume) => {
                    paused = false;
                    go = !stepped;
                    if go {
                        break;
                    }
                }
                Ok(Command::Cancel) => {
                    cancelled = true;
                    break;
                }
                Ok(Command::Shutdown) => return Ok(Flow::Shutdown),
                Ok(other) => out.send(&WorkerEvent::Error {
                    message: format!("busy generating; ignored {other:?}"),
                    fatal: false,
                }),
                Err(e) => out.send(&WorkerEvent::Error {
                    message: e,
                    fatal: false,
                }),
            }
        }
        if cancelled {
            g.cancel();
            break;
        }
        if stepped {
            // The other backend's process may have had the GPU since our last step.
            st.engine.take_turn_on_device().map_err(|e| e.to_string())?;
        }
        st.trace.per_position.clear();
        st.trace.guesses.clear();
        let step = match g.step(model, provider.as_ref(), &mut st.trace) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) => return Err(e.to_string()),
        };
        let mut guesses = std::mem::take(&mut st.trace.guesses);
        for (position, experts) in std::mem::take(&mut st.trace.per_position) {
            out.session(SessionEvent::Routing {
                backend: out.backend,
                prompt,
                position,
                experts,
                guesses: guesses.remove(&position).unwrap_or_default(),
            });
        }
        let piece = match &st.tokenizer {
            Some(t) => decoder.push(t, step.token),
            None => format!("{} ", step.token),
        };
        text.push_str(&piece);
        let (loaded, load_us) = match &cache {
            Some(c) => {
                let (m, us) = c.take_step_loads();
                (m, Some(us))
            }
            None => (Vec::new(), None),
        };
        out.session(SessionEvent::Token {
            backend: out.backend,
            prompt,
            index: step.index,
            id: step.token,
            text: piece,
            dt: step.step_time.as_secs_f64(),
            prefill: step.prefill,
            path: Some(step.path),
            loaded,
            load_us,
        });
        // After the token is out, so "crash after N tokens" means N were delivered.
        faults.on_token();
        if last_snapshot.elapsed() >= SNAPSHOT_EVERY {
            if let Some(s) = snapshot() {
                out.session(SessionEvent::Cache {
                    backend: out.backend,
                    snapshot: s,
                });
            }
            last_snapshot = Instant::now();
        }
        if step.finish.is_some() {
            break;
        }
    }
    // Text held back for an incomplete character goes into the final text (PromptDone), not
    // into a fake token: token counts must stay exact.
    if let Some(t) = &st.tokenizer {
        text.push_str(&decoder.finish(t));
    }
    if let Some(s) = snapshot() {
        out.session(SessionEvent::Cache {
            backend: out.backend,
            snapshot: s,
        });
    }
    let timing = Timing::of(&g, std::time::Duration::ZERO);
    let finish = match g.finished() {
        Some(FinishReason::Eos) => Finish::Eos,
        Some(FinishReason::Cancelled) => Finish::Cancelled,
        _ => Finish::MaxNewTokens,
    };
    out.session(SessionEvent::PromptDone {
        backend: out.backend,
        prompt,
        finish,
        token_ids: g.generated.clone(),
        text,
        ttft_s: timing.ttft_s,
        prefill_tok_s: timing.prefill_tok_s,
        decode_tok_s: timing.decode_tok_s,
    });
    // Its KV cache (and graphs) serve the next prompt where that gives the same bits.
    st.engine.keep(g);
    Ok(Flow::Continue)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    fn vm_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn end_check_restarts_the_high_water_mark() {
        // A check's transient: 256 MiB touched, then freed.
        let mut v = vec![1u8; 256 << 20];
        std::hint::black_box(&mut v);
        drop(v);
        let before = vm_kib("VmHWM:");
        super::end_check();
        let after = vm_kib("VmHWM:");
        // The mark falls back to about the current RSS: at least 128 MiB lower, whatever the
        // other tests in this process hold meanwhile.
        assert!(
            after + (128 << 10) < before,
            "VmHWM {before} kB -> {after} kB"
        );
    }
}
