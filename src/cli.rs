//! The command line (clap derive). Parsing only: the commands live in `commands/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::Dtype;

#[derive(Debug, Parser)]
#[command(
    name = "moescope",
    version,
    about = "Run a Mixture-of-Experts model natively and with experts loaded on demand, side by side",
    long_about = "moescope compares two ways of running a MoE model: native (every weight resident) \
and selective (experts loaded on demand through a bounded cache). Without a subcommand it opens \
the live dashboard on the bundled model (models/tiny-moe) with prompts/standard.toml."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt with one backend; streams tokens, ends with a timing line.
    Generate(GenerateArgs),
    /// Print the final-position logits for a token sequence as JSON.
    Logits(LogitsArgs),
    /// Write every expert to its own file with a checksummed manifest (resumable, atomic).
    Extract(ExtractArgs),
    /// Count and check every expert of a checkpoint, extraction or seed-layout directory.
    Verify(VerifyArgs),
    /// Benchmarks (decode speed against candle-transformers, selective sweeps, random models).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Native decode tok/s against candle-transformers' qwen3_moe on the same files.
    Decode(BenchDecodeArgs),
    /// Write a random checkpoint in the real per-expert layout.
    RandomCheckpoint(RandomCheckpointArgs),
}

#[derive(Debug, Args)]
pub struct BenchDecodeArgs {
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Compute dtypes to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtype: Vec<Dtype>,
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: crate::engine::DeviceSpec,
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed repeats (best is kept) after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RandomCheckpointArgs {
    /// engine | selective | qwen3-30b-a3b-12l
    #[arg(long, default_value = "engine")]
    pub preset: String,
    /// Override the preset's layer count.
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Largest shard (bigger checkpoints get an index), e.g. 2GiB.
    #[arg(long, default_value = "2GiB", value_parser = crate::util::parse_bytes)]
    pub shard_size: u64,
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// The checkpoint to extract from (default: the bundled model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Output directory (created; an interrupted extraction there is resumed).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Testing aid: abort after writing this many new expert files (simulates a crash).
    #[arg(long, hide = true)]
    pub abort_after: Option<usize>,
    /// Testing aid: sleep this many milliseconds after each expert.
    #[arg(long, hide = true, default_value_t = 0)]
    pub delay_ms: u64,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A checkpoint, a `moescope extract` output, or a seed-project layout directory.
    pub dir: PathBuf,
    /// Take config.json from this model directory (for layouts that carry none).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model directory (config.json + safetensors). Default: the bundled models/tiny-moe.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: crate::engine::DeviceSpec,
}

fn parse_device(s: &str) -> Result<crate::engine::DeviceSpec, String> {
    crate::engine::DeviceSpec::parse(s)
}

#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Which backend runs the model.
    #[arg(long, value_enum, default_value_t = BackendKind::Native)]
    pub backend: BackendKind,
    #[command(flatten)]
    pub cache: crate::experts::CacheArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Every weight resident.
    Native,
    /// Experts loaded on demand through a bounded cache.
    Selective,
}

#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Stop after this many new tokens (honoured exactly).
    #[arg(long, default_value_t = 50)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = no top-k filter.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> crate::model::generate::SamplingParams {
        crate::model::generate::SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// The prompt (sent through the model's chat template unless --raw).
    #[arg(long, conflicts_with = "token_ids", required_unless_present = "token_ids")]
    pub prompt: Option<String>,
    /// Comma-separated prompt token ids (no tokenizer needed).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub token_ids: Option<Vec<u32>>,
    /// Use the prompt text as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (text, generated_token_ids, timing) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', num_args = 1.., required = true)]
    pub tokens: Vec<u32>,
}
