//! The scheduler's side of each worker: starting it and loading its backend, waiting for what
//! it says (with timeouts), turning its messages into worker state and session events, failing
//! it with a reason, shutting it down.

use std::time::Duration;

use super::super::memory;
use super::super::process::{WorkerMsg, WorkerProcess};
use super::super::protocol::{Command, PROTOCOL_VERSION, WorkerEvent};
use super::{Scheduler, WorkerState};
use crate::engine::BackendSpec;
use crate::model::config::past_context_message;
use crate::session::event::{Backend, SessionEvent};

impl Scheduler {
    pub(super) fn spec(&self, b: Backend) -> &BackendSpec {
        match b {
            Backend::Native => &self.cfg.native,
            Backend::Selective => &self.cfg.selective,
        }
    }

    pub(super) fn ws(&mut self, b: Backend) -> &mut WorkerState {
        &mut self.w[b.index()]
    }

    pub(super) fn send(&mut self, b: Backend, c: Command) {
        if let Some(p) = &self.w[b.index()].proc {
            p.send(c);
        }
    }

    pub(super) fn alive(&self, b: Backend) -> bool {
        self.w[b.index()].alive
    }

    pub(super) fn fail(&mut self, b: Backend, reason: String) {
        let st = &mut self.w[b.index()];
        if !st.alive {
            return;
        }
        st.alive = false;
        st.generating = None;
        if let Some(p) = &st.proc {
            p.kill();
        }
        self.pids.lock().expect("pids").retain(|(x, _, _)| *x != b);
        self.em.emit(SessionEvent::Failed { backend: b, reason });
    }

    pub(super) async fn start_worker(&mut self, b: Backend) {
        let env = self.cfg.worker_env[b.index()].clone();
        let cpus = self.cfg.worker_cpus[b.index()].clone();
        match WorkerProcess::spawn(b, &self.cfg.exe, &env, cpus.as_deref(), self.tx.clone()) {
            Ok(p) => {
                let pid = p.pid;
                let base = if self.cfg.gpu_memory {
                    memory::Gpu::get().device_used()
                } else {
                    None
                };
                self.pids.lock().expect("pids").push((b, pid, base));
                p.send(Command::Hello {
                    version: PROTOCOL_VERSION,
                });
                let st = self.ws(b);
                st.proc = Some(p);
                st.alive = true;
                self.em
                    .emit(SessionEvent::WorkerStarted { backend: b, pid });
                let t = self.cfg.step_timeout;
                if !self.wait_for(b, t, |w| w.ready).await {
                    self.fail(
                        b,
                        format!("did not answer hello within {:.0} s", t.as_secs_f64()),
                    );
                }
            }
            Err(e) => {
                self.ws(b).alive = true;
                self.fail(
                    b,
                    format!(
                        "could not start worker process {}: {e}",
                        self.cfg.exe.display()
                    ),
                );
            }
        }
    }

    pub(super) fn send_load(&mut self, b: Backend) {
        if self.alive(b) {
            let spec = self.spec(b).clone();
            let trace = self.cfg.trace_routing;
            self.send(
                b,
                Command::Load {
                    spec,
                    trace_routing: trace,
                    trace_guesses: trace && self.cfg.trace_guesses,
                },
            );
        }
    }

    pub(super) async fn wait_loaded(&mut self, b: Backend) {
        if !self.alive(b) {
            return;
        }
        let t = self.cfg.load_timeout;
        if !self.wait_for(b, t, |w| w.loaded).await && self.alive(b) {
            self.fail(
                b,
                format!("did not finish loading within {:.0} s", t.as_secs_f64()),
            );
        }
    }

    /// Handles messages and controls until `cond` holds for `b`, `b` dies, or `timeout` passes
    /// without any message from `b`. True when the condition holds.
    pub(super) async fn wait_for(
        &mut self,
        b: Backend,
        timeout: Duration,
        cond: impl Fn(&WorkerState) -> bool,
    ) -> bool {
        let mut deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond(&self.w[b.index()]) {
                return true;
            }
            if !self.alive(b) {
                return false;
            }
            tokio::select! {
                msg = self.rx.recv() => {
                    let Some((from, msg)) = msg else { return false };
                    if from == b {
                        deadline = tokio::time::Instant::now() + timeout;
                    }
                    self.handle(from, msg);
                }
                c = self.ctl.recv(), if !self.ctl_closed => self.control(c),
                _ = tokio::time::sleep_until(deadline) => {
                    if !self.w[b.index()].paused {
                        return false;
                    }
                    deadline = tokio::time::Instant::now() + timeout;
                }
            }
        }
    }

    /// Quality checks (teacher-forced scoring, perplexity) are moescope's measurement, not the
    /// backend serving: a sample first (the high-water mark of serving so far), then every
    /// sample is marked until the check ends. The worker resets its high-water mark after each
    /// check, so the peaks judged are those of loading and generating.
    pub(super) fn begin_check(&self, b: Backend) {
        self.sample_now(b);
        self.checking.lock().expect("checking")[b.index()] = true;
    }

    pub(super) fn end_check(&self, b: Backend) {
        self.checking.lock().expect("checking")[b.index()] = false;
    }

    /// One memory sample of `b`'s worker now, beside the timer's: a fast model loads and
    /// generates between two ticks, and its peak would otherwise never be seen.
    pub(super) fn sample_now(&self, b: Backend) {
        let watched = self
            .pids
            .lock()
            .expect("pids")
            .iter()
            .find(|w| w.0 == b)
            .copied();
        if let Some((_, pid, base)) = watched
            && let Some(sample) = memory::sample(pid, self.cfg.gpu_memory, base)
        {
            let mut sample = sample;
            sample.checking = self.checking.lock().expect("checking")[b.index()];
            self.em.emit(SessionEvent::Memory { backend: b, sample });
        }
    }

    /// Turns one worker message into worker state and session events.
    pub(super) fn handle(&mut self, b: Backend, msg: WorkerMsg) {
        let em = self.em.clone();
        match msg {
            WorkerMsg::Event(ev) => match *ev {
                WorkerEvent::Ready { version, .. } => {
                    if version != PROTOCOL_VERSION {
                        self.fail(
                            b,
                            format!(
                                "worker speaks protocol {version}, expected {PROTOCOL_VERSION}"
                            ),
                        );
                    } else {
                        self.ws(b).ready = true;
                    }
                }
                WorkerEvent::Session(ev) if WorkerEvent::may_carry(&ev) => {
                    self.session_event(b, (*ev).for_backend(b))
                }
                WorkerEvent::Session(ev) => em.emit(SessionEvent::Warning {
                    backend: Some(b),
                    message: format!(
                        "worker sent an event that is not its to send: {}",
                        serde_json::to_string(&ev)
                            .unwrap_or_default()
                            .chars()
                            .take(200)
                            .collect::<String>()
                    ),
                }),
                WorkerEvent::Scored {
                    rows, full_vocab, ..
                } => self.ws(b).scored = Some((rows, full_vocab)),
                WorkerEvent::Error { message, fatal } => {
                    if fatal {
                        self.fail(b, message);
                    } else {
                        self.ws(b).error = Some(message.clone());
                        em.emit(SessionEvent::Warning {
                            backend: Some(b),
                            message,
                        });
                    }
                }
                WorkerEvent::Bye => {}
            },
            // Not the reply to anything: the worker died writing it, and its exit (next)
            // fails the backend with the reason — a signal, a panic in the log.
            WorkerMsg::TornLine(l) => em.emit(SessionEvent::Warning {
                backend: Some(b),
                message: format!(
                    "worker wrote a line outside the protocol, cut off as it ended: {}",
                    l.chars().take(200).collect::<String>()
                ),
            }),
            WorkerMsg::BadLine(l) => {
                let message = format!(
                    "worker wrote a line outside the protocol: {}",
                    l.chars().take(200).collect::<String>()
                );
                // The line may have been the reply the scheduler is waiting for (a score whose
                // NaN serde_json wrote as null once hung a run): end that wait as an error.
                self.ws(b).error = Some(message.clone());
                em.emit(SessionEvent::Warning {
                    backend: Some(b),
                    message,
                })
            }
            WorkerMsg::Exited {
                status,
                stderr_tail,
            } => {
                let tail = stderr_tail.join(" | ");
                let reason = if tail.is_empty() {
                    format!("worker {status}")
                } else {
                    format!("worker {status}; last log: {tail}")
                };
                self.fail(b, reason);
            }
        }
    }

    /// A worker's session event: what it tells the scheduler about the worker, then out to
    /// the session as it is.
    pub(super) fn session_event(&mut self, b: Backend, ev: SessionEvent) {
        match &ev {
            SessionEvent::Loaded {
                vocab_size,
                trained_context,
                ..
            } => {
                let st = self.ws(b);
                st.loaded = true;
                st.vocab = vocab_size.unwrap_or(0);
                st.trained_context = *trained_context;
                self.sample_now(b);
            }
            SessionEvent::PromptStarted {
                prompt,
                prompt_tokens,
                max_new_tokens,
                ..
            } => {
                // Workers may not send warnings (`WorkerEvent::may_carry`): the scheduler, which
                // knows both the limit and the prompt, says it once per prompt.
                if let Some(limit) = self.ws(b).trained_context
                    && prompt_tokens + max_new_tokens > limit
                    && self.past_context_warned.insert(*prompt)
                {
                    self.em.emit(SessionEvent::Warning {
                        backend: None,
                        message: past_context_message(
                            &format!("prompt {}", prompt + 1),
                            *prompt_tokens,
                            *max_new_tokens,
                            limit,
                        )
                        .unwrap_or_default(),
                    });
                }
                if b == Backend::Native {
                    // A rerun routes afresh.
                    self.native_routing.remove(prompt);
                }
                let st = self.ws(b);
                st.generating = Some(*prompt);
                st.tokens = 0;
                st.done = None;
            }
            SessionEvent::Token { .. } => self.ws(b).tokens += 1,
            SessionEvent::Routing {
                prompt,
                position,
                experts,
                ..
            } if b == Backend::Native && self.cfg.reference.is_some() => {
                self.native_routing
                    .entry(*prompt)
                    .or_default()
                    .insert(*position, experts.clone());
            }
            SessionEvent::PromptDone {
                prompt,
                finish,
                token_ids,
                ..
            } => {
                // Sampled before the prompt is marked done so it counts as memory "during"
                // generation: a short prompt can finish between two timer samples.
                self.sample_now(b);
                let st = self.ws(b);
                st.generating = None;
                st.done = Some((*prompt, *finish, token_ids.clone()));
            }
            SessionEvent::Perplexity {
                perplexity, tokens, ..
            } => self.ws(b).ppl = Some((*perplexity, *tokens)),
            _ => {}
        }
        self.em.emit(ev);
    }

    /// After waiting on `b` while it generates: a worker that reported a failure fails with its
    /// reason; one that `answered` nothing fails as hung, `silence` saying for how long.
    pub(super) fn check_generating(&mut self, b: Backend, answered: bool, silence: &str) {
        if !self.generation_failed(b) && !answered && self.alive(b) {
            self.fail(b, format!("stopped answering: {silence}"));
        }
    }

    /// A worker that reports an error instead of a token has given up on the prompt (it is
    /// idle again): the backend fails with the worker's reason rather than waiting out the step
    /// timeout for a token that will not come.
    pub(super) fn generation_failed(&mut self, b: Backend) -> bool {
        let w = &self.w[b.index()];
        if w.done.is_some() || !self.alive(b) {
            return false;
        }
        let Some(e) = w.error.clone() else {
            return false;
        };
        self.fail(b, format!("generation failed: {e}"));
        true
    }

    pub(super) async fn shutdown(&mut self, b: Backend) {
        if !self.alive(b) {
            return;
        }
        // A last sample: the worker's high-water mark covers all it did, scoring included,
        // whenever the timer last looked.
        self.sample_now(b);
        self.send(b, Command::Shutdown);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        // Wait for the process to exit; a clean exit is not a failure.
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some((from, WorkerMsg::Exited { .. })) if from == b => break,
                    Some((from, m)) => self.handle(from, m),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    if let Some(p) = &self.w[b.index()].proc { p.kill(); }
                    break;
                }
            }
        }
        let st = self.ws(b);
        st.alive = false;
        st.proc = None;
        self.pids.lock().expect("pids").retain(|(x, _, _)| *x != b);
    }

    pub(super) async fn shutdown_all(&mut self) {
        for b in Backend::BOTH {
            self.shutdown(b).await;
        }
    }
}
