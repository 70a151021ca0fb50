//! How a decode step's forward pass ran. A plain type of its own because four layers speak of
//! it: the model says how it ran each step, the cache core's speculation gate weighs its odds by
//! it, the worker protocol and the session's events carry it, and reports count steps by it.

use serde::{Deserialize, Serialize};

/// How a step's forward pass ran: what its time is made of. On a GPU a decode step is one
/// CUDA graph when it can be, and a selective step that may miss an expert is not: it reads each
/// layer's routing back to load what is missing (piecewise), or it guessed that nothing would
/// miss, was wrong and ran twice (redone). Counting steps by path says where decode time goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepPath {
    /// The prompt's forward pass (the first token).
    Prefill,
    /// One CUDA graph for the whole step: native, or selective with every expert it selected
    /// already resident.
    Graph,
    /// Selective: per-layer graphs with the routing read back and misses loaded in between.
    Piecewise,
    /// Selective: tried as one graph over the resident experts, a selected expert was not
    /// resident, so the step ran again piecewise (or op by op).
    Redone,
    /// Op by op (the CPU, f32, graphs turned off or given up).
    Uncaptured,
}

impl StepPath {
    pub const ALL: [StepPath; 5] = [
        StepPath::Prefill,
        StepPath::Graph,
        StepPath::Piecewise,
        StepPath::Redone,
        StepPath::Uncaptured,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StepPath::Prefill => "prefill",
            StepPath::Graph => "graph",
            StepPath::Piecewise => "piecewise",
            StepPath::Redone => "redone",
            StepPath::Uncaptured => "uncaptured",
        }
    }
}
