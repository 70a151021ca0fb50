//! The model layer: config parsing, checkpoint access, the forward pass and generation. No UI.

#[cfg(feature = "cuda")]
pub mod attn_decode;
pub mod block_scales;
pub mod bpe_files;
pub mod chat;
pub mod checkpoint;
pub mod config;
mod config_fields;
pub mod cpu_attention;
pub mod cpu_gemv;
pub mod embedding;
pub mod error;
pub mod fp8;
#[cfg(feature = "cuda")]
pub mod gates;
pub mod generate;
pub mod gguf;
pub mod gguf_types;
#[cfg(feature = "cuda")]
pub mod graph;
pub mod held;
pub mod kv_cache;
pub mod layers;
pub mod lut4;
pub mod mapped;
pub mod moe_block;
#[cfg(feature = "cuda")]
pub mod moe_decode;
#[cfg(feature = "cuda")]
pub mod moe_grouped;
#[cfg(feature = "cuda")]
pub mod pick;
pub mod ports;
pub mod quant_rows;
pub mod qwen3_moe;
#[cfg(feature = "cuda")]
pub mod raw;
pub mod safetensors_file;
pub mod sampling;
pub mod step_profile;
pub mod tokenizer;

/// How the forward pass may run on a GPU. The model reads no environment: these come from the
/// run's settings (`crate::settings`), set on the loaded model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Decode steps may replay a captured CUDA graph (see `graph.rs`). Off for comparisons, and
    /// as an escape hatch should a driver refuse capture (moescope then falls back by itself).
    pub cuda_graphs: bool,
    /// One-token MoE blocks run moescope's own kernels (`moe_decode.rs`) and a prompt's experts
    /// cuBLAS grouped products (`moe_grouped.rs`); off: candle's fused MoE GEMM for both, for
    /// comparisons.
    pub moe_kernel: bool,
    /// One-token attention runs moescope's own kernels (`attn_decode.rs`); off: candle's ops,
    /// for comparisons.
    pub attn_kernel: bool,
    /// A piecewise step (selective, routing read back at every MoE layer) is queued ahead of the
    /// host, each MoE layer behind a gate kernel that waits for the host only when an expert is
    /// missing (`gates.rs`, `graph.rs`'s gated step); off: the host launches each layer's graphs
    /// once it has the routing.
    pub gated_pieces: bool,
    /// With `gated_pieces`, the gated step replays as one captured graph, its gate kernels
    /// inside; off: each layer's graphs are queued a few MoE layers ahead of the host.
    pub gated_whole: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            cuda_graphs: true,
            moe_kernel: true,
            attn_kernel: true,
            gated_pieces: true,
            gated_whole: true,
        }
    }
}

pub use checkpoint::Checkpoint;
pub use config::MoeConfig;
pub use error::ModelError;
pub use qwen3_moe::Qwen3Moe;
