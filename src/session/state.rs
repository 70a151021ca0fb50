//! `SessionState::apply(&event)`: the pure reducer every view (live dashboard, replay, headless
//! table, export, verdict) is computed from.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::event::{
    AgreementStats, Backend, Finish, MemorySample, ResidentBytes, SessionEvent, Stamped,
};
use super::record::Header;
use super::thinking::{self, Part, Thinking};
use crate::cache::stats::CacheSnapshot;
use crate::cache::trace::TraceStep;
use crate::step_path::StepPath;

/// Memory samples kept for the live graph (older ones are summarised, not kept).
pub const GRAPH_POINTS: usize = 1200;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Status {
    #[default]
    Starting,
    Loading {
        done: usize,
        total: usize,
    },
    Ready,
    Running,
    Done,
    Failed(String),
}

impl Status {
    pub fn is_failed(&self) -> bool {
        matches!(self, Status::Failed(_))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: u32,
    pub text: String,
    pub dt: f64,
    pub prefill: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StepPath>,
    /// Selective: the experts this token's step loaded, (layer, expert), and their load time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loaded: Vec<(u16, u16)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_us: Option<u64>,
    /// The position whose routing produced this token (the last one traced before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub finish: Finish,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub ttft_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// One backend's run of one prompt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptRun {
    pub started: bool,
    pub prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub tokens: Vec<TokenRecord>,
    pub text: String,
    pub done: Option<Done>,
    pub started_at: f64,
    pub finished_at: Option<f64>,
    /// The prompt opened a `<think>` block (see `session::thinking`).
    #[serde(default)]
    pub opens_thinking: bool,
    /// The cache's cumulative (hits, misses) when the prompt started (selective), so a prompt's
    /// own share can be told once it is done.
    #[serde(default)]
    pub cache_before: Option<(u64, u64)>,
}

impl PromptRun {
    /// Seconds of each decode step (tokens after the first).
    pub fn decode_latencies(&self) -> Vec<f64> {
        self.tokens
            .iter()
            .filter(|t| !t.prefill)
            .map(|t| t.dt)
            .collect()
    }

    /// Which part (reasoning or answer) each token so far belongs to.
    pub fn parts(&self) -> Vec<Part> {
        thinking::split(
            self.tokens.iter().map(|t| t.text.as_str()),
            self.opens_thinking,
        )
    }

    /// Reasoning and answer of the output so far (None: no reasoning).
    pub fn thinking(&self) -> Option<Thinking> {
        let mut texts: Vec<&str> = self.tokens.iter().map(|t| t.text.as_str()).collect();
        // The streaming decoder may hold back an incomplete character until the end: the rest
        // of the final text belongs to the last token.
        if let (Some(d), Some(last)) = (&self.done, texts.last().copied()) {
            let before_last: usize = texts.iter().map(|t| t.len()).sum::<usize>() - last.len();
            if d.text.len() > before_last + last.len() && d.text.is_char_boundary(before_last) {
                *texts.last_mut().expect("non-empty") = &d.text[before_last..];
            }
        }
        Thinking::of(&texts, self.opens_thinking)
    }

    pub fn ttft(&self) -> Option<f64> {
        self.tokens.first().map(|t| t.dt)
    }

    /// Decode tokens per second over this prompt so far.
    pub fn decode_tok_s(&self) -> Option<f64> {
        let l = self.decode_latencies();
        let s: f64 = l.iter().sum();
        (s > 0.0).then(|| l.len() as f64 / s)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendState {
    pub status: Status,
    pub pid: Option<u32>,
    pub load_s: Option<f64>,
    pub resident: Option<ResidentBytes>,
    pub degraded: bool,
    pub describe: String,
    /// Recent samples for the graph: (session time, sample).
    pub memory: VecDeque<(f64, MemorySample)>,
    /// First sample (the process before loading).
    pub mem_before: Option<MemorySample>,
    /// Most recent sample.
    pub mem_last: Option<MemorySample>,
    /// Peak RSS + GPU: the largest RSS high-water mark (VmHWM) plus the largest GPU figure seen
    /// (or a larger sampled total) — and the largest VmHWM reported.
    pub mem_peak_total: u64,
    pub mem_peak_rss: u64,
    pub mem_peak_gpu: Option<u64>,
    /// Sum and count of totals sampled while generating (for the "during" mean).
    pub mem_during_sum: f64,
    pub mem_during_n: u64,
    pub generating: Option<usize>,
    pub cache: Option<CacheSnapshot>,
    /// Routing counts per MoE layer (index into header.moe.moe_layers) × expert.
    pub usage: Vec<Vec<u32>>,
    pub runs: Vec<PromptRun>,
    pub perplexity: Option<(f64, usize)>,
    pub failed_at: Option<f64>,
}

impl BackendState {
    pub fn run(&self, prompt: usize) -> Option<&PromptRun> {
        self.runs.get(prompt).filter(|r| r.started)
    }

    pub fn mem_during(&self) -> Option<f64> {
        (self.mem_during_n > 0).then(|| self.mem_during_sum / self.mem_during_n as f64)
    }
}

/// The reference implementation's results (`--reference-impl`), when one was asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReferenceState {
    pub implementation: Option<String>,
    pub load_s: Option<f64>,
    /// Per prompt: (its greedy tokens, TTFT, decode tok/s, agreement on native's tokens).
    pub prompts: Vec<Option<ReferencePromptResult>>,
    pub peak_bytes: Option<u64>,
    pub peak_gpu: Option<u64>,
    pub unavailable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferencePromptResult {
    pub token_ids: Vec<u32>,
    /// One text piece per token (empty in recordings made before the dashboard showed them).
    #[serde(default)]
    pub text: Vec<String>,
    #[serde(default)]
    pub routing: Option<crate::session::event::RoutingAgreement>,
    pub ttft_s: f64,
    pub decode_tok_s: Option<f64>,
    pub agreement: Option<AgreementStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    pub header: Header,
    pub backends: [BackendState; 2],
    /// The prompt most recently started by any backend.
    pub current_prompt: usize,
    pub paused: bool,
    pub agreement: Vec<Option<AgreementStats>>,
    /// Per prompt, per position of native's output: both backends' top tokens and the KL.
    #[serde(default)]
    pub alternatives: Vec<Option<Vec<crate::session::quality::PositionDetail>>>,
    pub warnings: Vec<String>,
    pub finished: Option<String>,
    /// Session time of the last event applied.
    pub now: f64,
    pub events: u64,
    /// Routing trace per backend (for the cache study): native's by preference.
    pub traces: [Vec<TraceStep>; 2],
    /// The reference implementation's check of native, when asked for.
    #[serde(default)]
    pub reference: Option<ReferenceState>,
    /// Step mode (the run stops after each prompt), and the prompt it is waiting after.
    #[serde(default)]
    pub step_mode: bool,
    #[serde(default)]
    pub waiting: Option<usize>,
}

impl SessionState {
    fn reference_mut(&mut self, prompts: usize) -> &mut ReferenceState {
        self.reference.get_or_insert_with(|| ReferenceState {
            prompts: vec![None; prompts],
            ..Default::default()
        })
    }

    pub fn new(header: Header) -> Self {
        let n = header.prompts.prompts.len();
        let layers = header.moe.moe_layers.len();
        let experts = header.moe.num_experts;
        let backend = || BackendState {
            runs: vec![PromptRun::default(); n],
            usage: vec![vec![0; experts]; layers],
            ..Default::default()
        };
        SessionState {
            header,
            backends: [backend(), backend()],
            current_prompt: 0,
            paused: false,
            agreement: vec![None; n],
            alternatives: vec![None; n],
            warnings: Vec::new(),
            finished: None,
            now: 0.0,
            events: 0,
            traces: [Vec::new(), Vec::new()],
            reference: None,
            step_mode: false,
            waiting: None,
        }
    }

    /// The state a recording ends in: every event applied to a fresh state.
    pub fn replayed(rec: &super::record::Recording) -> Self {
        Self::from_events(rec.header.clone(), &rec.events)
    }

    /// A fresh state for `header` with `events` applied in order.
    pub fn from_events<'a>(header: Header, events: impl IntoIterator<Item = &'a Stamped>) -> Self {
        let mut s = Self::new(header);
        for ev in events {
            s.apply(ev);
        }
        s
    }

    pub fn backend(&self, b: Backend) -> &BackendState {
        &self.backends[b.index()]
    }

    fn backend_mut(&mut self, b: Backend) -> &mut BackendState {
        &mut self.backends[b.index()]
    }

    pub fn num_prompts(&self) -> usize {
        self.header.prompts.prompts.len()
    }

    /// Applies one event. Pure: the same events in the same order give the same state.
    pub fn apply(&mut self, ev: &Stamped) {
        self.now = self.now.max(ev.t);
        self.events += 1;
        let t = ev.t;
        match &ev.event {
            SessionEvent::WorkerStarted { backend, pid } => {
                // A new worker process (sequential schedule, or a restart) starts afresh.
                let b = self.backend_mut(*backend);
                b.pid = Some(*pid);
                b.status = Status::Starting;
                b.failed_at = None;
            }
            SessionEvent::LoadProgress {
                backend,
                done,
                total,
            } => {
                let b = self.backend_mut(*backend);
                if !b.status.is_failed() {
                    b.status = Status::Loading {
                        done: *done,
                        total: *total,
                    };
                }
            }
            SessionEvent::Loaded {
                backend,
                load_s,
                resident,
                degraded,
                describe,
                ..
            } => {
                let b = self.backend_mut(*backend);
                if b.status.is_failed() {
                    return;
                }
                b.load_s = Some(*load_s);
                b.resident = Some(resident.clone());
                b.degraded = *degraded;
                b.describe = describe.clone();
                b.status = Status::Ready;
            }
            SessionEvent::PromptStarted {
                backend,
                prompt,
                prompt_tokens,
                max_new_tokens,
                opens_thinking,
            } => {
                if *prompt >= self.num_prompts() {
                    return;
                }
                self.current_prompt = *prompt;
                self.waiting = None;
                let b = self.backend_mut(*backend);
                if b.status.is_failed() {
                    // A failed worker produces nothing more; a stray event cannot revive it.
                    return;
                }
                b.status = Status::Running;
                b.generating = Some(*prompt);
                let cache_before = b.cache.as_ref().map(|c| (c.hits, c.misses));
                b.runs[*prompt] = PromptRun {
                    cache_before,
                    started: true,
                    prompt_tokens: *prompt_tokens,
                    max_new_tokens: *max_new_tokens,
                    opens_thinking: *opens_thinking,
                    started_at: t,
                    ..Default::default()
                };
                if *backend == Backend::Selective {
                    self.agreement[*prompt] = None;
                    if let Some(a) = self.alternatives.get_mut(*prompt) {
                        *a = None;
                    }
                }
                let bi = backend.index();
                self.traces[bi].retain(|s| s.prompt != *prompt);
            }
            SessionEvent::Token {
                backend,
                prompt,
                id,
                text,
                dt,
                prefill,
                path,
                loaded,
                load_us,
                ..
            } => {
                let position = self.traces[backend.index()]
                    .last()
                    .filter(|s| s.prompt == *prompt)
                    .map(|s| s.position);
                let b = self.backend_mut(*backend);
                if let Some(run) = b.runs.get_mut(*prompt) {
                    run.tokens.push(TokenRecord {
                        id: *id,
                        text: text.clone(),
                        dt: *dt,
                        prefill: *prefill,
                        path: *path,
                        loaded: loaded.clone(),
                        load_us: *load_us,
                        position,
                    });
                    run.text.push_str(text);
                }
            }
            SessionEvent::Cache { backend, snapshot } => {
                self.backend_mut(*backend).cache = Some(snapshot.clone());
            }
            SessionEvent::Routing {
                backend,
                prompt,
                position,
                experts,
                guesses,
            } => {
                let b = self.backend_mut(*backend);
                for (li, layer) in experts.iter().enumerate() {
                    if let Some(row) = b.usage.get_mut(li) {
                        for &e in layer {
                            if let Some(c) = row.get_mut(e as usize) {
                                *c += 1;
                            }
                        }
                    }
                }
                let step = TraceStep {
                    prompt: *prompt,
                    position: *position,
                    experts: experts.clone(),
                    guesses: guesses.clone(),
                };
                // A row the header's model cannot have (a damaged or hand-made recording) is
                // left out of the trace rather than sized into every study made from it.
                if crate::cache::trace::check_step(&step, &self.header.moe).is_ok() {
                    self.traces[backend.index()].push(step);
                }
            }
            SessionEvent::Memory { backend, sample } => {
                let b = self.backend_mut(*backend);
                if b.mem_before.is_none() {
                    b.mem_before = Some(sample.clone());
                }
                if sample.checking {
                    // The quality checks' memory is moescope's, not the backend's (the worker
                    // resets its high-water mark after each check): graphed, never a peak.
                    b.mem_last = Some(sample.clone());
                    b.memory.push_back((t, sample.clone()));
                    while b.memory.len() > GRAPH_POINTS {
                        b.memory.pop_front();
                    }
                    return;
                }
                b.mem_peak_rss = b.mem_peak_rss.max(sample.peak_rss).max(sample.rss());
                if let Some(g) = sample.gpu {
                    b.mem_peak_gpu = Some(b.mem_peak_gpu.unwrap_or(0).max(g));
                }
                // The kernel's high-water mark catches every transient; a sample taken every
                // 0.6 s catches some. Judged on sampled maxima, the bundled model's memory saving
                // moved 29.7–33.5 % over six identical runs (across a 30 % line); on the
                // high-water marks, checks left out, 32.7–33.5 % over ten (BENCHMARKS.md §9).
                b.mem_peak_total = b
                    .mem_peak_total
                    .max(sample.total())
                    .max(b.mem_peak_rss + b.mem_peak_gpu.unwrap_or(0));
                if b.generating.is_some() {
                    b.mem_during_sum += sample.total() as f64;
                    b.mem_during_n += 1;
                }
                b.mem_last = Some(sample.clone());
                b.memory.push_back((t, sample.clone()));
                while b.memory.len() > GRAPH_POINTS {
                    b.memory.pop_front();
                }
            }
            SessionEvent::PromptDone {
                backend,
                prompt,
                finish,
                token_ids,
                text,
                ttft_s,
                prefill_tok_s,
                decode_tok_s,
            } => {
                let n = self.num_prompts();
                let b = self.backend_mut(*backend);
                if let Some(run) = b.runs.get_mut(*prompt) {
                    // The final text includes anything the streaming decoder held back.
                    run.text = text.clone();
                    run.done = Some(Done {
                        finish: *finish,
                        token_ids: token_ids.clone(),
                        text: text.clone(),
                        ttft_s: *ttft_s,
                        prefill_tok_s: *prefill_tok_s,
                        decode_tok_s: *decode_tok_s,
                    });
                    run.finished_at = Some(t);
                }
                b.generating = None;
                if !b.status.is_failed() {
                    let all = (0..n).all(|i| b.runs[i].done.is_some());
                    b.status = if all { Status::Done } else { Status::Ready };
                }
            }
            SessionEvent::Alternatives { prompt, positions } => {
                if let Some(a) = self.alternatives.get_mut(*prompt) {
                    *a = Some(positions.clone());
                }
            }
            SessionEvent::Agreement { prompt, stats } => {
                if let Some(a) = self.agreement.get_mut(*prompt) {
                    *a = Some(stats.clone());
                }
            }
            SessionEvent::ReferenceLoaded {
                implementation,
                load_s,
            } => {
                let n = self.num_prompts();
                let r = self.reference_mut(n);
                r.implementation = Some(implementation.clone());
                r.load_s = Some(*load_s);
            }
            SessionEvent::ReferencePrompt {
                prompt,
                token_ids,
                ttft_s,
                decode_tok_s,
                agreement,
                text,
                routing,
            } => {
                let n = self.num_prompts();
                if let Some(slot) = self.reference_mut(n).prompts.get_mut(*prompt) {
                    *slot = Some(ReferencePromptResult {
                        token_ids: token_ids.clone(),
                        text: text.clone(),
                        routing: routing.clone(),
                        ttft_s: *ttft_s,
                        decode_tok_s: *decode_tok_s,
                        agreement: agreement.clone(),
                    });
                }
            }
            SessionEvent::ReferenceDone {
                peak_bytes,
                peak_gpu,
            } => {
                let n = self.num_prompts();
                let r = self.reference_mut(n);
                r.peak_bytes = Some(*peak_bytes);
                r.peak_gpu = *peak_gpu;
            }
            SessionEvent::PromptAdded { prompt } => {
                self.header.prompts.prompts.push(prompt.clone());
                for b in &mut self.backends {
                    b.runs.push(PromptRun::default());
                }
                self.agreement.push(None);
                self.alternatives.push(None);
                if let Some(r) = &mut self.reference {
                    r.prompts.push(None);
                }
            }
            SessionEvent::StepMode { on } => {
                self.step_mode = *on;
            }
            SessionEvent::Waiting { prompt } => {
                self.waiting = Some(*prompt);
            }
            SessionEvent::Continued { .. } => {
                self.waiting = None;
            }
            SessionEvent::ReferenceUnavailable { reason } => {
                let n = self.num_prompts();
                self.reference_mut(n).unavailable = Some(reason.clone());
            }
            SessionEvent::Perplexity {
                backend,
                perplexity,
                tokens,
            } => {
                self.backend_mut(*backend).perplexity = Some((*perplexity, *tokens));
            }
            SessionEvent::Failed { backend, reason } => {
                let b = self.backend_mut(*backend);
                b.status = Status::Failed(reason.clone());
                b.generating = None;
                b.failed_at = Some(t);
            }
            SessionEvent::Paused => self.paused = true,
            SessionEvent::Resumed => self.paused = false,
            SessionEvent::Focus { prompt } => {
                if *prompt < self.num_prompts() {
                    self.current_prompt = *prompt;
                }
            }
            SessionEvent::Warning { backend, message } => {
                self.warnings.push(match backend {
                    Some(b) => format!("{b}: {message}"),
                    None => message.clone(),
                });
            }
            SessionEvent::Finished { reason } => {
                self.finished = Some(reason.clone());
                self.paused = false;
            }
        }
    }

    /// The trace the cache study replays: native's if it has one, else selective's.
    pub fn trace(&self) -> &[TraceStep] {
        if !self.traces[0].is_empty() {
            &self.traces[0]
        } else {
            &self.traces[1]
        }
    }

    /// Any backend ran with experts masked out (missing allowed, or the testing mask).
    pub fn degraded(&self) -> bool {
        self.backends.iter().any(|b| b.degraded)
    }
}
