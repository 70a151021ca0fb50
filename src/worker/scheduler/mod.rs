//! Drives a comparison run: starts the two workers, loads them, runs every prompt on both under
//! the chosen schedule, scores agreement and perplexity, and turns everything the workers say
//! into [`SessionEvent`]s. A failed worker is reported and the run goes on with the other.
//!
//! - `alternate`: both loaded; each token of native is followed by one of selective, so neither
//!   is timed while the other computes, and both panes stream together.
//! - `sequential`: one backend at a time (all prompts on native, then on selective): the lowest
//!   peak memory.
//! - `parallel`: both generate at once; timings are marked contended.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

mod workers;

use super::memory;
use super::process::{WorkerMsg, WorkerProcess};
use super::protocol::{Command, PromptInput, Sampling, Support};
use crate::engine::BackendSpec;
use crate::model::tokenizer::PromptStyle;
use crate::session::event::{Backend, Finish, SessionEvent, Stamped};
use crate::session::prompts::PromptSet;
use crate::session::quality::{ScoreRow, agreement, position_details};
use crate::session::record::Schedule;

/// The category of prompts typed in the dashboard.
pub const ADHOC: &str = "ad hoc";

/// Requests from the user interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    TogglePause,
    /// One token per backend (while paused).
    Step,
    /// Cancel the current prompt and go to the next / previous one.
    Next,
    Prev,
    /// Cancel and run the current prompt again.
    Rerun,
    /// Stop the run; why, in words, becomes the run's `Finished` reason.
    Quit(Stop),
    /// Step mode on/off: stop after each prompt and wait for `Continue`.
    ToggleStepMode,
    /// Go on after a step-mode wait.
    Continue,
    /// A prompt the user typed: run it next (then the set goes on where it was).
    AddPrompt(String),
    /// Run this prompt next (cancelling the current one), from the prompt list.
    Goto(usize),
}

/// Why a run was stopped before its end (recorded as the reason it finished).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `q` (or Ctrl-C) in the dashboard.
    Key,
    Sigint,
    Sigterm,
    /// A dropped SSH session.
    Sighup,
    /// The dashboard's terminal went away.
    TerminalGone,
    /// The recording could not be written.
    WriteFailed,
}

impl Stop {
    /// The `Finished` reason a run stopped so records.
    pub fn reason(self) -> &'static str {
        match self {
            Stop::Key => "quit by the user",
            Stop::Sigint => "stopped by SIGINT",
            Stop::Sigterm => "stopped by SIGTERM",
            Stop::Sighup => "stopped by SIGHUP (the terminal hung up)",
            Stop::TerminalGone => "stopped: the terminal went away",
            Stop::WriteFailed => "stopped: the recording could not be written",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub native: BackendSpec,
    pub selective: BackendSpec,
    pub schedule: Schedule,
    pub prompts: PromptSet,
    pub sampling: Sampling,
    /// How prompt texts become tokens (chat template or raw, thinking on or off).
    pub prompt_style: PromptStyle,
    /// Teacher-forced agreement after each prompt.
    pub score: bool,
    /// Perplexity of this text at the end of the run.
    pub reference_text: Option<String>,
    pub reference_max_tokens: usize,
    pub trace_routing: bool,
    /// Next-layer guesses in the trace too (see `RunArgs::trace_guesses`).
    pub trace_guesses: bool,
    /// Time allowed for loading a model.
    pub load_timeout: Duration,
    /// Time allowed for one answer (one token, one score) before a worker counts as hung.
    pub step_timeout: Duration,
    pub memory_interval: Duration,
    pub gpu_memory: bool,
    /// The moescope binary that runs `worker`.
    pub exe: PathBuf,
    /// Extra environment for the workers (fault tests).
    pub worker_env: [Vec<(String, String)>; 2],
    /// The cores of each worker (CPU runs with both alive at once; see `worker::cpus`).
    pub worker_cpus: [Option<Vec<usize>>; 2],
    /// Run only this backend (capacity sweeps measure selective alone).
    pub only: Option<Backend>,
    /// A reference implementation to check native against once both backends are done.
    pub reference: Option<super::reference::ReferenceConfig>,
    /// Start in step mode (`--step`).
    pub step: bool,
}

/// A worker the memory sampler watches: backend, pid, device-wide GPU use before it started.
type Watched = (Backend, u32, Option<u64>);

/// Top-K kept from native when the vocabulary is too large to compare in full.
const KL_SUPPORT: usize = 256;
const FULL_VOCAB_LIMIT: usize = 8192;

#[derive(Debug, Default)]
struct WorkerState {
    proc: Option<WorkerProcess>,
    alive: bool,
    ready: bool,
    loaded: bool,
    vocab: usize,
    /// Positions the loaded model was trained for (its `Loaded` event's).
    trained_context: Option<usize>,
    /// Prompt being generated and tokens seen so far.
    generating: Option<usize>,
    tokens: usize,
    done: Option<(usize, Finish, Vec<u32>)>,
    scored: Option<(Vec<ScoreRow>, bool)>,
    ppl: Option<(f64, usize)>,
    error: Option<String>,
    paused: bool,
}

/// The run's clock and the way out to the session.
#[derive(Clone)]
struct Emitter {
    start: Instant,
    out: UnboundedSender<Stamped>,
}

impl Emitter {
    fn emit(&self, event: SessionEvent) {
        let _ = self.out.send(Stamped {
            t: self.start.elapsed().as_secs_f64(),
            event,
        });
    }
}

enum Nav {
    Next,
    Prev,
    Rerun,
    /// Run this prompt next (the prompt list).
    Goto(usize),
    Quit(Stop),
}

struct Scheduler {
    cfg: RunConfig,
    em: Emitter,
    rx: UnboundedReceiver<(Backend, WorkerMsg)>,
    tx: UnboundedSender<(Backend, WorkerMsg)>,
    ctl: UnboundedReceiver<Control>,
    w: [WorkerState; 2],
    pids: Arc<Mutex<Vec<Watched>>>,
    /// Per backend: running moescope's quality checks now (its memory samples say so).
    checking: Arc<Mutex<[bool; 2]>>,
    paused: bool,
    step_mode: bool,
    /// The user said to go on after a step-mode wait.
    go_on: bool,
    /// Typed prompts (indices into the set) waiting to run, and where the set resumes after.
    adhoc: std::collections::VecDeque<usize>,
    resume_at: Option<usize>,
    /// Every typed prompt's index (a prompt file's own "ad hoc" category is not one).
    typed: std::collections::HashSet<usize>,
    step_once: bool,
    nav: Option<Nav>,
    ctl_closed: bool,
    /// Native's score rows per prompt (sequential schedule compares later).
    native_rows: HashMap<usize, (Vec<ScoreRow>, bool)>,
    native_tokens: HashMap<usize, Vec<u32>>,
    /// Native's routing per prompt (position → experts per MoE layer), kept only when a
    /// reference will be compared with it.
    native_routing: HashMap<usize, std::collections::BTreeMap<usize, Vec<Vec<u16>>>>,
    /// Decodes the alternatives the token inspector shows (see `inspect_tokenizer`).
    tokenizer: Option<Option<crate::model::tokenizer::TextTokenizer>>,
    /// Prompts already warned of running past the trained context (once, whichever backend
    /// starts them first).
    past_context_warned: std::collections::HashSet<usize>,
}

/// Runs the whole session. Returns when every prompt ran (or the user quit).
pub async fn run(
    cfg: RunConfig,
    out: UnboundedSender<Stamped>,
    ctl: UnboundedReceiver<Control>,
    start: Instant,
) -> String {
    let (tx, rx) = unbounded_channel();
    let em = Emitter { start, out };
    let pids: Arc<Mutex<Vec<Watched>>> = Arc::new(Mutex::new(Vec::new()));
    let checking: Arc<Mutex<[bool; 2]>> = Arc::default();
    // Memory sampling runs on its own task, so it never waits for a busy worker.
    let sampler = {
        let pids = pids.clone();
        let checking = checking.clone();
        let em = em.clone();
        let every = cfg.memory_interval;
        let gpu = cfg.gpu_memory;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let list = pids.lock().expect("pids").clone();
                for (b, pid, base) in list {
                    let s = tokio::task::spawn_blocking(move || memory::sample(pid, gpu, base))
                        .await
                        .ok()
                        .flatten();
                    if let Some(mut sample) = s {
                        sample.checking = checking.lock().expect("checking")[b.index()];
                        em.emit(SessionEvent::Memory { backend: b, sample });
                    }
                }
            }
        })
    };
    let mut s = Scheduler {
        cfg,
        em,
        rx,
        tx,
        ctl,
        w: Default::default(),
        pids,
        checking,
        paused: false,
        step_mode: false,
        go_on: false,
        adhoc: Default::default(),
        resume_at: None,
        typed: Default::default(),
        step_once: false,
        nav: None,
        ctl_closed: false,
        native_rows: HashMap::new(),
        native_tokens: HashMap::new(),
        native_routing: HashMap::new(),
        past_context_warned: Default::default(),
        tokenizer: None,
    };
    if s.cfg.step {
        s.step_mode = true;
        s.em.emit(SessionEvent::StepMode { on: true });
    }
    let reason = s.run_all().await;
    s.shutdown_all().await;
    sampler.abort();
    // After the backends are gone: a 30B reference beside them would not fit where they barely do.
    if let Some(rc) = s.cfg.reference.clone()
        && reason == "completed"
    {
        let inputs = s.reference_inputs();
        let stops = s.stop_ids();
        let em = s.em.clone();
        let _ = tokio::task::spawn_blocking(move || {
            super::reference::run(&rc, &inputs, &stops, &mut |ev| em.emit(ev))
        })
        .await;
    }
    s.em.emit(SessionEvent::Finished {
        reason: reason.clone(),
    });
    reason
}

impl Scheduler {
    async fn run_all(&mut self) -> String {
        if let Some(b) = self.cfg.only {
            return self.run_one(b).await.unwrap_or_else(|| "completed".into());
        }
        match self.cfg.schedule {
            Schedule::Alternate | Schedule::Parallel => {
                if self.cfg.schedule == Schedule::Parallel {
                    self.em.emit(SessionEvent::Warning {
                        backend: None,
                        message: "parallel schedule: both backends run at once, so their timings are contended".into(),
                    });
                }
                for b in Backend::BOTH {
                    self.start_worker(b).await;
                }
                if self.cfg.schedule == Schedule::Parallel {
                    for b in Backend::BOTH {
                        self.send_load(b);
                    }
                    for b in Backend::BOTH {
                        self.wait_loaded(b).await;
                    }
                } else {
                    // One load at a time, selective first, so each load time is its own: loaded
                    // together, both read the checkpoint at once and the load ratio meant
                    // nothing (BENCHMARKS.md §8).
                    for b in [Backend::Selective, Backend::Native] {
                        self.send_load(b);
                        self.wait_loaded(b).await;
                    }
                }
                if let Some(r) = self.run_prompts(&Backend::BOTH).await {
                    return r;
                }
                self.perplexity_all(&Backend::BOTH).await;
                "completed".into()
            }
            Schedule::Sequential => {
                for b in Backend::BOTH {
                    if let Some(r) = self.run_one(b).await {
                        return r;
                    }
                    self.shutdown(b).await;
                }
                "completed".into()
            }
        }
    }

    /// Every prompt, then the perplexity, on backend `b` alone. Some(reason) if the user quit.
    async fn run_one(&mut self, b: Backend) -> Option<String> {
        self.start_worker(b).await;
        self.send_load(b);
        self.wait_loaded(b).await;
        let quit = self.run_prompts(&[b]).await;
        if quit.is_none() {
            self.perplexity_all(&[b]).await;
        }
        quit
    }

    fn control(&mut self, c: Option<Control>) {
        let Some(c) = c else {
            self.ctl_closed = true;
            return;
        };
        match c {
            Control::TogglePause => {
                self.paused = !self.paused;
                self.em.emit(if self.paused {
                    SessionEvent::Paused
                } else {
                    SessionEvent::Resumed
                });
                if self.cfg.schedule != Schedule::Alternate {
                    for b in Backend::BOTH {
                        let cmd = if self.paused {
                            Command::Pause
                        } else {
                            Command::Resume
                        };
                        self.ws(b).paused = self.paused;
                        self.send(b, cmd);
                    }
                }
            }
            Control::Step => {
                if self.paused {
                    self.step_once = true;
                    if self.cfg.schedule != Schedule::Alternate {
                        for b in Backend::BOTH {
                            self.send(b, Command::Step);
                        }
                    }
                }
            }
            Control::Next => self.nav = Some(Nav::Next),
            Control::Prev => self.nav = Some(Nav::Prev),
            Control::Rerun => self.nav = Some(Nav::Rerun),
            Control::Quit(why) => self.nav = Some(Nav::Quit(why)),
            Control::ToggleStepMode => {
                self.step_mode = !self.step_mode;
                self.em.emit(SessionEvent::StepMode { on: self.step_mode });
            }
            Control::Continue => self.go_on = true,
            Control::Goto(i) if i < self.cfg.prompts.prompts.len() => {
                self.nav = Some(Nav::Goto(i));
            }
            Control::Goto(_) => {}
            Control::AddPrompt(text) => {
                let text = text.trim().to_string();
                if text.is_empty() {
                    return;
                }
                let set = &mut self.cfg.prompts.prompts;
                let k = self.typed.len() + 1;
                let prompt = crate::session::prompts::Prompt {
                    id: format!("ad-hoc-{k}"),
                    category: ADHOC.into(),
                    text,
                    max_new_tokens: None,
                };
                set.push(prompt.clone());
                self.adhoc.push_back(set.len() - 1);
                self.typed.insert(set.len() - 1);
                self.em.emit(SessionEvent::PromptAdded { prompt });
                // In a step-mode wait, a new question is the way on.
                self.go_on = true;
            }
        }
    }

    /// The prompt to run after `i`: a typed one first (the set then resumes after `i`).
    fn next_prompt(&mut self, i: usize) -> usize {
        if let Some(j) = self.adhoc.pop_front() {
            if self.resume_at.is_none() && !self.typed.contains(&i) {
                self.resume_at = Some(i + 1);
            }
            return j;
        }
        let mut next = self.resume_at.take().unwrap_or(i + 1);
        // Typed prompts sit at the end of the set but run from the queue: the set's own order
        // passes over them.
        while self.typed.contains(&next) {
            next += 1;
        }
        next
    }

    /// Step mode, after prompt `i` is done on every backend: wait for the user (`Continue`,
    /// a prompt move, step mode off or quit). Returns the move asked for, if any.
    async fn wait_for_user(&mut self, i: usize) -> Option<Nav> {
        self.em.emit(SessionEvent::Waiting { prompt: i });
        self.go_on = false;
        while !self.go_on && self.nav.is_none() && self.step_mode && !self.ctl_closed {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some((from, m)) => self.handle(from, m),
                    None => break,
                },
                c = self.ctl.recv() => self.control(c),
            }
        }
        self.em.emit(SessionEvent::Continued { prompt: i });
        self.nav.take()
    }

    /// What the reference needs per prompt native finished and was scored on: the token ids
    /// native was given (the same tokenizer and template as its worker), its tokens and rows.
    fn reference_inputs(&self) -> Vec<super::reference::ReferencePromptInput> {
        let tok = crate::model::tokenizer::TextTokenizer::from_dir(&self.cfg.native.model_dir).ok();
        let mut out = Vec::new();
        for i in 0..self.cfg.prompts.prompts.len() {
            let (Some(tokens), Some(rows)) = (self.native_tokens.get(&i), self.native_rows.get(&i))
            else {
                continue;
            };
            let Some(ids) = tok.as_ref().and_then(|t| {
                t.prompt_ids(&self.cfg.prompts.prompts[i].text, self.cfg.prompt_style)
                    .ok()
            }) else {
                continue;
            };
            out.push(super::reference::ReferencePromptInput {
                prompt: i,
                prompt_ids: ids,
                native_tokens: tokens.clone(),
                native_rows: Some(rows.clone()),
                native_routing: self.native_routing.get(&i).cloned().unwrap_or_default(),
                max_new_tokens: self.cfg.prompts.max_new_tokens_of(i),
            });
        }
        out
    }

    /// The tokenizer the alternatives are decoded with (loaded once; None without one).
    fn inspect_tokenizer(&mut self) -> Option<&crate::model::tokenizer::TextTokenizer> {
        if self.tokenizer.is_none() {
            let dir = &self.cfg.native.model_dir;
            self.tokenizer = Some(crate::model::tokenizer::TextTokenizer::from_dir(dir).ok());
        }
        self.tokenizer.as_ref().and_then(Option::as_ref)
    }

    /// The ids that end a generation, as the workers use them.
    fn stop_ids(&self) -> Vec<u32> {
        let dir = &self.cfg.native.model_dir;
        let tok = crate::model::tokenizer::TextTokenizer::from_dir(dir).ok();
        let eos = crate::model::config::MoeConfig::from_dir(dir)
            .map(|c| c.eos_token_ids)
            .unwrap_or_default();
        crate::model::tokenizer::stop_ids(&eos, tok.as_ref())
    }

    fn prompt_input(&self, i: usize) -> PromptInput {
        PromptInput::Text {
            text: self.cfg.prompts.prompts[i].text.clone(),
            raw: self.cfg.prompt_style.raw,
            enable_thinking: self.cfg.prompt_style.enable_thinking,
        }
    }

    /// Runs every prompt on `backends` (both for alternate/parallel, one for sequential).
    /// Returns Some(reason) if the user quit.
    async fn run_prompts(&mut self, backends: &[Backend]) -> Option<String> {
        let mut i = 0;
        // The set can grow while it runs (prompts typed in the dashboard).
        while i < self.cfg.prompts.prompts.len() {
            let n = self.cfg.prompts.prompts.len();
            let live: Vec<Backend> = backends
                .iter()
                .copied()
                .filter(|b| self.alive(*b))
                .collect();
            if live.is_empty() {
                return None;
            }
            self.em.emit(SessionEvent::Focus { prompt: i });
            let stepped = self.cfg.schedule == Schedule::Alternate && live.len() > 1;
            let mut sampling = self.cfg.sampling.clone();
            sampling.max_new_tokens = self.cfg.prompts.max_new_tokens_of(i);
            for &b in &live {
                let input = self.prompt_input(i);
                let paused = self.paused && !stepped;
                let st = self.ws(b);
                st.done = None;
                st.tokens = 0;
                st.error = None;
                st.paused = paused;
                if paused {
                    self.send(b, Command::Pause);
                }
                self.send(
                    b,
                    Command::Generate {
                        prompt: i,
                        input,
                        sampling: sampling.clone(),
                        stepped,
                    },
                );
            }
            if stepped {
                self.alternate(&live).await;
            } else {
                self.free_run(&live).await;
            }
            match self.nav.take() {
                Some(Nav::Quit(why)) => {
                    self.cancel_all(&live).await;
                    return Some(why.reason().into());
                }
                Some(Nav::Next) => {
                    self.cancel_all(&live).await;
                    i += 1;
                    continue;
                }
                Some(Nav::Prev) => {
                    self.cancel_all(&live).await;
                    i = i.saturating_sub(1);
                    continue;
                }
                Some(Nav::Rerun) => {
                    self.cancel_all(&live).await;
                    continue;
                }
                Some(Nav::Goto(j)) => {
                    self.cancel_all(&live).await;
                    i = j;
                    continue;
                }
                None => {}
            }
            if self.cfg.score {
                self.score_prompt(i, &live).await;
            }
            // Wait only where something follows (the set, or the set resuming after a typed one).
            let more = !self.adhoc.is_empty()
                || self.resume_at.is_some_and(|r| r < n)
                || (self.resume_at.is_none() && (i + 1..n).any(|j| !self.typed.contains(&j)));
            if self.step_mode && !self.ctl_closed && more {
                match self.wait_for_user(i).await {
                    Some(Nav::Quit(why)) => return Some(why.reason().into()),
                    Some(Nav::Prev) => {
                        i = i.saturating_sub(1);
                        continue;
                    }
                    Some(Nav::Rerun) => continue,
                    Some(Nav::Goto(j)) => {
                        i = j;
                        continue;
                    }
                    Some(Nav::Next) | None => {}
                }
            }
            i = self.next_prompt(i);
        }
        None
    }

    /// Token by token in turn.
    async fn alternate(&mut self, live: &[Backend]) {
        loop {
            if self.nav.is_some() {
                return;
            }
            let active: Vec<Backend> = live
                .iter()
                .copied()
                .filter(|b| self.alive(*b) && self.w[b.index()].done.is_none())
                .collect();
            if active.is_empty() {
                return;
            }
            if self.paused && !self.step_once {
                // Wait for a control (or any message) without stepping.
                tokio::select! {
                    c = self.ctl.recv(), if !self.ctl_closed => self.control(c),
                    msg = self.rx.recv() => if let Some((b, m)) = msg { self.handle(b, m) },
                }
                continue;
            }
            self.step_once = false;
            for b in active {
                if self.nav.is_some() {
                    return;
                }
                let before = self.w[b.index()].tokens;
                self.send(b, Command::Step);
                let t = self.cfg.step_timeout;
                let ok = self
                    .wait_for(b, t, move |w| {
                        w.tokens > before || w.done.is_some() || w.error.is_some()
                    })
                    .await;
                let silence = format!("no token within {:.0} s of a step", t.as_secs_f64());
                self.check_generating(b, ok, &silence);
            }
        }
    }

    /// Both (or one) generating freely until done.
    async fn free_run(&mut self, live: &[Backend]) {
        for &b in live {
            let t = self.cfg.step_timeout;
            let ok = self
                .wait_for(b, t, |w| w.done.is_some() || w.error.is_some())
                .await;
            if self.nav.is_some() {
                return;
            }
            let silence = format!("nothing for {:.0} s while generating", t.as_secs_f64());
            self.check_generating(b, ok, &silence);
        }
    }

    async fn cancel_all(&mut self, live: &[Backend]) {
        for &b in live {
            if self.alive(b) && self.w[b.index()].done.is_none() {
                self.send(b, Command::Step); // release a stepped worker waiting for a step
                self.send(b, Command::Cancel);
            }
        }
        for &b in live {
            let t = self.cfg.step_timeout;
            if self.alive(b) && !self.wait_for(b, t, |w| w.done.is_some()).await && self.alive(b) {
                self.fail(b, "did not stop when cancelled".into());
            }
        }
    }

    /// Teacher-forced agreement on native's tokens: native's top-K (or full) distribution at
    /// each position against selective's probabilities for the same ids.
    async fn score_prompt(&mut self, i: usize, live: &[Backend]) {
        let t = self.cfg.step_timeout;
        if live.contains(&Backend::Native) {
            let Some((p, finish, ids)) = self.w[0].done.clone() else {
                return;
            };
            if p != i || finish == Finish::Cancelled || ids.is_empty() {
                return;
            }
            let vocab = self.w[0].vocab;
            let k = if vocab <= FULL_VOCAB_LIMIT {
                vocab
            } else {
                KL_SUPPORT
            };
            self.w[0].scored = None;
            let input = self.prompt_input(i);
            self.begin_check(Backend::Native);
            self.send(
                Backend::Native,
                Command::Score {
                    prompt: i,
                    input,
                    continuation: ids.clone(),
                    support: Support::TopK(k),
                },
            );
            let answered = self
                .wait_for(Backend::Native, t, |w| {
                    w.scored.is_some() || w.error.is_some()
                })
                .await;
            self.end_check(Backend::Native);
            if answered {
                if let Some(rows) = self.w[0].scored.take() {
                    self.native_rows.insert(i, rows);
                    self.native_tokens.insert(i, ids);
                }
                self.w[0].error = None;
            }
        }
        if live.contains(&Backend::Selective) {
            let (Some((rows, full)), Some(ids)) = (
                self.native_rows.get(&i).cloned(),
                self.native_tokens.get(&i).cloned(),
            ) else {
                return;
            };
            self.w[1].scored = None;
            let input = self.prompt_input(i);
            let support = Support::Ids(rows.iter().map(|r| r.ids.clone()).collect());
            self.begin_check(Backend::Selective);
            self.send(
                Backend::Selective,
                Command::Score {
                    prompt: i,
                    input,
                    continuation: ids,
                    support,
                },
            );
            let answered = self
                .wait_for(Backend::Selective, t, |w| {
                    w.scored.is_some() || w.error.is_some()
                })
                .await;
            self.end_check(Backend::Selective);
            if answered {
                if let Some((sel, _)) = self.w[1].scored.take() {
                    let stats = agreement(&rows, &sel, full);
                    self.em.emit(SessionEvent::Agreement { prompt: i, stats });
                    let mut positions = position_details(&rows, &sel, 5);
                    if let Some(tok) = self.inspect_tokenizer() {
                        for alt in positions
                            .iter_mut()
                            .flat_map(|p| p.native.iter_mut().chain(p.selective.iter_mut()))
                            .filter(|a| a.text.is_empty())
                        {
                            alt.text = tok.decode(&[alt.id]);
                        }
                    }
                    self.em.emit(SessionEvent::Alternatives {
                        prompt: i,
                        positions,
                    });
                }
                self.w[1].error = None;
            }
        }
    }

    async fn perplexity_all(&mut self, backends: &[Backend]) {
        let Some(text) = self.cfg.reference_text.clone() else {
            return;
        };
        for &b in backends {
            if !self.alive(b) {
                continue;
            }
            self.ws(b).ppl = None;
            self.begin_check(b);
            self.send(
                b,
                Command::Perplexity {
                    text: text.clone(),
                    max_tokens: self.cfg.reference_max_tokens,
                },
            );
            let t = self.cfg.load_timeout;
            self.wait_for(b, t, |w| w.ppl.is_some() || w.error.is_some())
                .await;
            self.end_check(b);
            self.ws(b).error = None;
        }
    }
}
