//! The worker protocol: JSON lines. Parent → worker [`Command`]s on stdin, worker → parent
//! [`WorkerEvent`]s on stdout; stderr is for logs only. Versioned: the parent sends `hello`
//! with its version and a worker of another version refuses with an error.

use serde::{Deserialize, Serialize};

use crate::engine::BackendSpec;
use crate::session::event::SessionEvent;
use crate::session::quality::ScoreRow;

/// 2: session events travel as themselves (`{"ev": "session", "type": …}`).
pub const PROTOCOL_VERSION: u32 = 2;

/// Decoding settings on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PromptInput {
    /// Text, sent through the model's chat template unless `raw`, with Qwen3's
    /// `enable_thinking` (absent from protocol-2 peers that predate it: off).
    Text {
        text: String,
        raw: bool,
        #[serde(default)]
        enable_thinking: bool,
    },
    /// Token ids as they are.
    Tokens { ids: Vec<u32> },
}

/// Which next-token probabilities a `score` should return per position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Support {
    /// The k most likely tokens (the whole vocabulary if k ≥ vocab).
    TopK(usize),
    /// These ids, one list per scored position (another backend's top-k).
    Ids(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    Hello {
        version: u32,
    },
    Load {
        spec: BackendSpec,
        trace_routing: bool,
        /// Compute and send next-layer guesses with the routing even without prefetch.
        #[serde(default)]
        trace_guesses: bool,
    },
    /// Starts a generation. `stepped`: produce a token only on each `step` (alternate schedule);
    /// otherwise run freely until done, paused or cancelled.
    Generate {
        prompt: usize,
        input: PromptInput,
        sampling: Sampling,
        stepped: bool,
    },
    Step,
    Pause,
    Resume,
    Cancel,
    /// Teacher-forced next-token log-probabilities at each token of `continuation` after the
    /// prompt (the worker tokenizes `input` as for `generate`): one row per continuation token,
    /// the distribution that predicted it.
    Score {
        prompt: usize,
        input: PromptInput,
        continuation: Vec<u32>,
        support: Support,
    },
    /// Perplexity of a reference text (at most `max_tokens` tokens of it).
    Perplexity {
        text: String,
        max_tokens: usize,
    },
    Shutdown,
}

/// What a worker says. Everything that belongs to the session — loading, tokens, routing,
/// cache statistics, prompt results, perplexity — is a [`SessionEvent`] of the worker's own
/// backend, forwarded by the scheduler as it is (and recorded): no second vocabulary to
/// translate. The rest is the conversation with the scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum WorkerEvent {
    Ready {
        version: u32,
        pid: u32,
    },
    /// One of the session events a worker may report (see [`WorkerEvent::may_carry`]).
    Session(Box<SessionEvent>),
    Scored {
        prompt: usize,
        rows: Vec<ScoreRow>,
        /// True when each row covers the whole vocabulary.
        full_vocab: bool,
    },
    /// `fatal`: the worker cannot go on (it exits after sending this).
    Error {
        message: String,
        fatal: bool,
    },
    Bye,
}

impl WorkerEvent {
    /// Whether a worker may report this session event: its backend's own doings, not what the
    /// parent decides (worker start and failure, memory samples, focus, the run's end).
    pub fn may_carry(ev: &SessionEvent) -> bool {
        use SessionEvent::*;
        matches!(
            ev,
            LoadProgress { .. }
                | Loaded { .. }
                | PromptStarted { .. }
                | Token { .. }
                | Cache { .. }
                | Routing { .. }
                | PromptDone { .. }
                | Perplexity { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::event::Backend;
    use crate::step_path::StepPath;

    #[test]
    fn commands_and_events_round_trip_as_single_lines() {
        let cmds = vec![
            Command::Hello {
                version: PROTOCOL_VERSION,
            },
            Command::Generate {
                prompt: 2,
                input: PromptInput::Text {
                    text: "hi\nthere".into(),
                    raw: false,
                    enable_thinking: true,
                },
                sampling: Sampling {
                    max_new_tokens: 5,
                    temperature: 0.0,
                    top_p: 1.0,
                    top_k: 0,
                    seed: 1,
                },
                stepped: true,
            },
            Command::Score {
                prompt: 0,
                input: PromptInput::Tokens { ids: vec![1, 2] },
                continuation: vec![3, 4],
                support: Support::Ids(vec![vec![4, 5], vec![6]]),
            },
            Command::Step,
            Command::Shutdown,
        ];
        for c in cmds {
            let line = serde_json::to_string(&c).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Command>(&line).unwrap(), c);
        }
        let line = r#"{"cmd":"step"}"#;
        assert_eq!(
            serde_json::from_str::<Command>(line).unwrap(),
            Command::Step
        );
        let ev = WorkerEvent::Session(Box::new(SessionEvent::Token {
            backend: Backend::Selective,
            prompt: 0,
            index: 3,
            id: 7,
            text: "a\"b".into(),
            dt: 0.01,
            prefill: false,
            path: Some(StepPath::Piecewise),
            loaded: vec![(1, 5), (2, 0)],
            load_us: Some(420),
        }));
        let line = serde_json::to_string(&ev).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""path":"piecewise""#), "{line}");
        assert!(
            line.contains(r#""loaded":[[1,5],[2,0]],"load_us":420"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<WorkerEvent>(&line).unwrap(), ev);
        // A token line that does not say how the step ran still parses.
        let old = r#"{"ev":"session","type":"token","backend":"native","prompt":0,"index":1,"id":2,"text":"x","dt":0.5,"prefill":false}"#;
        match serde_json::from_str::<WorkerEvent>(old) {
            Ok(WorkerEvent::Session(ev)) => match *ev {
                SessionEvent::Token { path, .. } => assert_eq!(path, None),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        // What the parent decides is not a worker's to say.
        assert!(WorkerEvent::may_carry(&SessionEvent::PromptStarted {
            backend: Backend::Native,
            prompt: 0,
            prompt_tokens: 3,
            max_new_tokens: 4,
            opens_thinking: false,
        }));
        assert!(!WorkerEvent::may_carry(&SessionEvent::Finished {
            reason: "x".into()
        }));
        assert!(!WorkerEvent::may_carry(&SessionEvent::Failed {
            backend: Backend::Native,
            reason: "x".into()
        }));
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"fly"}"#).is_err());
    }
}
