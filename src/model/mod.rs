//! The model layer: config parsing, checkpoint access, the forward pass and generation. No UI.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod graph;
pub mod layers;
#[cfg(feature = "cuda")]
pub mod moe_decode;
pub mod ports;
pub mod qwen3_moe;
#[cfg(feature = "cuda")]
pub mod raw;
pub mod safetensors_file;

use std::sync::atomic::{AtomicBool, Ordering};

static CUDA_GRAPHS_OFF: AtomicBool = AtomicBool::new(false);

/// Whether native GPU decode steps may replay a captured CUDA graph (see `graph.rs`). On unless
/// `MOESCOPE_CUDA_GRAPHS=0` or [`set_cuda_graphs`]`(false)` — for comparisons, and as an escape
/// hatch should a driver refuse capture (moescope then falls back by itself anyway).
pub fn cuda_graphs_enabled() -> bool {
    !CUDA_GRAPHS_OFF.load(Ordering::Relaxed)
        && std::env::var("MOESCOPE_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

pub fn set_cuda_graphs(on: bool) {
    CUDA_GRAPHS_OFF.store(!on, Ordering::Relaxed);
}

pub use checkpoint::Checkpoint;
pub use config::MoeConfig;
pub use error::ModelError;
pub use qwen3_moe::Qwen3Moe;
