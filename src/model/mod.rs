//! The model layer: config parsing, checkpoint access, the forward pass and generation. No UI.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod layers;
pub mod qwen3_moe;
pub mod safetensors_file;

pub use checkpoint::Checkpoint;
pub use config::MoeConfig;
pub use error::ModelError;
pub use qwen3_moe::Qwen3Moe;
