//! `SessionEvent`: the one type that crosses from workers (through the scheduler) to the UI, the
//! recorder and replay. Everything a screen or an export shows is derived from a sequence of
//! these, so a recording replays into exactly the state the live run had.

use serde::{Deserialize, Serialize};

use crate::cache::stats::CacheSnapshot;
use crate::step_path::StepPath;

/// The two backends compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Native,
    Selective,
}

impl Backend {
    pub const BOTH: [Backend; 2] = [Backend::Native, Backend::Selective];

    pub fn index(self) -> usize {
        match self {
            Backend::Native => 0,
            Backend::Selective => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Native => "native",
            Backend::Selective => "selective",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What kind of memory a number is (the seed project reported RSS alone and missed the GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuSource {
    /// NVML's per-process figure.
    NvmlProcess,
    /// Device-wide used-memory change since the worker started (integrated GPUs such as
    /// Jetson Thor, where NVML has no per-process figure).
    DeviceDelta,
}

/// One sample of a worker process's memory, taken from outside the process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySample {
    /// Anonymous resident memory (heap: weights we copied, the cache, the KV cache).
    pub rss_anon: u64,
    /// File-backed resident memory (mapped files: the checkpoint pages we touched).
    pub rss_file: u64,
    /// Shared-memory resident pages.
    pub rss_shmem: u64,
    /// Peak resident set size so far (VmHWM).
    pub peak_rss: u64,
    /// GPU memory of the process, when known; `None` means unavailable, not zero.
    pub gpu: Option<u64>,
    pub gpu_source: Option<GpuSource>,
    /// The system's available memory at the time (MemAvailable).
    pub system_available: u64,
    /// Where the RSS numbers came from ("/proc/PID/status" or "sysinfo").
    pub source: String,
    /// Taken while the worker ran moescope's quality checks (teacher-forced scoring,
    /// perplexity), not serving: kept out of the peaks the verdict judges.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checking: bool,
}

impl MemorySample {
    pub fn rss(&self) -> u64 {
        self.rss_anon + self.rss_file + self.rss_shmem
    }

    /// RSS plus GPU memory: what this backend costs the machine (unified memory on a Thor).
    pub fn total(&self) -> u64 {
        self.rss() + self.gpu.unwrap_or(0)
    }
}

/// Bytes a backend says it holds, by kind (to set against the measured process memory).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResidentBytes {
    pub non_expert: u64,
    pub experts: u64,
    /// What the selective cache may hold at most (0 for native).
    pub cache_capacity: u64,
    /// Bytes of one expert in memory.
    pub expert_bytes: u64,
}

impl ResidentBytes {
    /// non-expert + (capacity or all experts): the expected steady-state weight memory.
    pub fn expected(&self) -> u64 {
        self.non_expert
            + if self.cache_capacity > 0 {
                self.cache_capacity
            } else {
                self.experts
            }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Eos,
    MaxNewTokens,
    Cancelled,
}

/// Teacher-forced comparison of one prompt's continuation (native's tokens) between backends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgreementStats {
    pub positions: usize,
    pub mean_kl: f64,
    pub max_kl: f64,
    pub top1_agreement: f64,
    /// True when KL was computed over the full vocabulary; false when over native's top-K
    /// support with the tail lumped (then it is a lower bound).
    pub exact: bool,
}

/// Whether two implementations route alike: at every position both ran, per MoE layer, the
/// set of experts each picked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingAgreement {
    /// (position, layer) pairs compared.
    pub pairs: usize,
    /// Pairs where both picked the same set of experts.
    pub same: usize,
    /// Experts both picked, summed over pairs, and the number each picked (k) summed likewise:
    /// `shared / picked` is the share of picks in common.
    pub shared: usize,
    pub picked: usize,
}

impl RoutingAgreement {
    /// Adds one (position, layer) pair: the two implementations' picks, in any order.
    pub fn add(&mut self, a: &[u16], b: &[u16]) {
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        a.sort_unstable();
        b.sort_unstable();
        self.pairs += 1;
        self.same += usize::from(a == b);
        self.shared += a.iter().filter(|e| b.binary_search(e).is_ok()).count();
        self.picked += a.len().max(b.len());
    }

    pub fn merge(&mut self, o: &RoutingAgreement) {
        self.pairs += o.pairs;
        self.same += o.same;
        self.shared += o.shared;
        self.picked += o.picked;
    }

    pub fn same_pct(&self) -> Option<f64> {
        (self.pairs > 0).then(|| 100.0 * self.same as f64 / self.pairs as f64)
    }

    pub fn shared_pct(&self) -> Option<f64> {
        (self.picked > 0).then(|| 100.0 * self.shared as f64 / self.picked as f64)
    }
}

/// Everything that can happen in a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SessionEvent {
    /// A worker process started.
    WorkerStarted {
        backend: Backend,
        pid: u32,
    },
    LoadProgress {
        backend: Backend,
        done: usize,
        total: usize,
    },
    Loaded {
        backend: Backend,
        load_s: f64,
        resident: ResidentBytes,
        degraded: bool,
        /// Human description of the backend ("native f32 cpu", "selective: 48 experts, …").
        describe: String,
        /// The model's vocabulary (absent from the first recordings).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vocab_size: Option<usize>,
        /// Positions the model was trained for (the model config's `trained_context`):
        /// a prompt whose tokens and new tokens go past it is warned of (absent from older
        /// recordings).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trained_context: Option<usize>,
    },
    /// A backend begins a prompt (again, if rerun).
    PromptStarted {
        backend: Backend,
        prompt: usize,
        prompt_tokens: usize,
        max_new_tokens: usize,
        /// The prompt ended inside an open `<think>` block (a Thinking checkpoint's template):
        /// the output starts with reasoning (see `session::thinking`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        opens_thinking: bool,
    },
    Token {
        backend: Backend,
        prompt: usize,
        index: usize,
        id: u32,
        text: String,
        /// Seconds of the forward pass (and sampling) that produced this token.
        dt: f64,
        /// True for the first token (its forward pass was the whole prompt).
        prefill: bool,
        /// How its forward pass ran (absent in recordings made before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<StepPath>,
        /// Selective: the experts its forward pass had to load, as (layer, expert), and the
        /// load time counted during it, µs (absent for native and in older recordings).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        loaded: Vec<(u16, u16)>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        load_us: Option<u64>,
    },
    Cache {
        backend: Backend,
        snapshot: CacheSnapshot,
    },
    /// Experts selected per MoE layer for one token position (in top-k order).
    Routing {
        backend: Backend,
        prompt: usize,
        position: usize,
        experts: Vec<Vec<u16>>,
        /// Per MoE layer, what its router picked from the previous layer's hidden state (the
        /// `--prefetch next-layer` guess, ascending); empty for a layer with no guess, and absent
        /// when guesses were not recorded (`--trace-guesses` or prefetch on).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        guesses: Vec<Vec<u16>>,
    },
    Memory {
        backend: Backend,
        sample: MemorySample,
    },
    PromptDone {
        backend: Backend,
        prompt: usize,
        finish: Finish,
        token_ids: Vec<u32>,
        text: String,
        ttft_s: f64,
        prefill_tok_s: f64,
        decode_tok_s: f64,
    },
    /// Teacher-forced agreement of selective with native on native's tokens.
    Agreement {
        prompt: usize,
        stats: AgreementStats,
    },
    /// The same scoring, per position of native's output: each backend's top tokens and the
    /// KL there (the dashboard's token inspector).
    Alternatives {
        prompt: usize,
        positions: Vec<crate::session::quality::PositionDetail>,
    },
    /// A reference implementation (`--reference-impl`) loaded the same weights, after both
    /// backends had run: moescope native is checked against it; the verdict is not.
    ReferenceLoaded {
        implementation: String,
        load_s: f64,
    },
    /// The reference on one prompt: its own greedy tokens and speed, and teacher-forced on
    /// native's tokens, KL(native ‖ reference) and top-1 agreement.
    ReferencePrompt {
        prompt: usize,
        token_ids: Vec<u32>,
        ttft_s: f64,
        decode_tok_s: Option<f64>,
        agreement: Option<AgreementStats>,
        /// Its tokens as text, one piece per token (decoded by moescope's tokenizer, as the
        /// backends' are); absent from the first recordings.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        text: Vec<String>,
        /// Teacher-forced on native's tokens: its routing against native's, where native's
        /// was traced and the reference reports its own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        routing: Option<RoutingAgreement>,
    },
    /// The reference's peak memory (its process's high-water mark, plus GPU where known).
    ReferenceDone {
        peak_bytes: u64,
        peak_gpu: Option<u64>,
    },
    /// The reference could not run (no Python, torch or transformers; a load that failed):
    /// the run goes on without it.
    ReferenceUnavailable {
        reason: String,
    },
    Perplexity {
        backend: Backend,
        perplexity: f64,
        tokens: usize,
    },
    Failed {
        backend: Backend,
        reason: String,
    },
    Paused,
    Resumed,
    /// Step mode on or off (`--step`, or `s` in the dashboard): in step mode both backends
    /// stop after each prompt and the run waits for the user.
    StepMode {
        on: bool,
    },
    /// The user typed a prompt in the dashboard: it joins the prompt set at the end (category
    /// "ad hoc") and runs next, recorded and judged like any other.
    PromptAdded {
        prompt: crate::session::prompts::Prompt,
    },
    /// Step mode: prompt `prompt` is done on every backend; the run waits for the user.
    Waiting {
        prompt: usize,
    },
    /// The user went on after a wait (replay skips the time in between).
    Continued {
        prompt: usize,
    },
    /// The user moved to another prompt (or a backend finished one in sequential mode).
    Focus {
        prompt: usize,
    },
    Warning {
        backend: Option<Backend>,
        message: String,
    },
    Finished {
        reason: String,
    },
}

/// `$on` evaluated with `$b` bound to the event's backend field (by reference, as the match
/// takes `$ev`), for every event that belongs to one backend; `$else` for the others. The one
/// list of which events those are.
macro_rules! with_backend {
    ($ev:expr, $b:ident => $on:expr, warning $w:ident => $on_warning:expr, else $else:expr) => {{
        use SessionEvent::*;
        match $ev {
            WorkerStarted { backend: $b, .. }
            | LoadProgress { backend: $b, .. }
            | Loaded { backend: $b, .. }
            | PromptStarted { backend: $b, .. }
            | Token { backend: $b, .. }
            | Cache { backend: $b, .. }
            | Routing { backend: $b, .. }
            | Memory { backend: $b, .. }
            | PromptDone { backend: $b, .. }
            | Perplexity { backend: $b, .. }
            | Failed { backend: $b, .. } => $on,
            Warning { backend: $w, .. } => $on_warning,
            _ => $else,
        }
    }};
}

impl SessionEvent {
    /// The same event told of backend `b` (a worker's events are its backend's, whatever it
    /// says: the scheduler knows which worker spoke).
    pub fn for_backend(mut self, b: Backend) -> Self {
        with_backend!(&mut self, x => *x = b, warning w => *w = Some(b), else ());
        self
    }

    pub fn backend(&self) -> Option<Backend> {
        with_backend!(self, x => Some(*x), warning w => *w, else None)
    }
}

/// An event with the session time (seconds since the session started) it happened at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    pub t: f64,
    #[serde(flatten)]
    pub event: SessionEvent,
}
